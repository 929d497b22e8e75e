//! One module per subcommand. Each checks its input and builds its request first, then
//! connects: nothing invalid ever reaches the network, and `--controller` only matters to
//! commands that got that far.

pub mod agent;
pub mod certs;
pub mod completions;
pub mod config;
pub mod docker_opts;
pub mod lab;
pub mod list_leases;
pub mod reserve_revoke;
pub mod routes;
pub mod status;
pub mod watch;

use crate::{Cli, Command};

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli {
        controller,
        output,
        command,
        tls,
    } = cli;
    crate::client::configure_tls(tls);
    match command {
        Command::Config(c) => config::run(c, &controller, output).await,
        Command::Leases => list_leases::run(&controller, output).await,
        Command::Lease(c) => reserve_revoke::run(c, &controller, output).await,
        Command::Watch(args) => watch::run(args, &controller, output).await,
        Command::Routes(args) => routes::run(args, &controller, output).await,
        Command::Agent(c) => agent::run(c, output).await,
        Command::Status => status::run(&controller, output).await,
        Command::Certs(c) => certs::run(c),
        Command::Lab(c) => lab::run(c, output).await,
        Command::DockerOpts(args) => docker_opts::run(args, output).await,
        Command::Completions(args) => completions::run_completions(args),
        Command::Man(args) => completions::run_man(args, output),
    }
}
