//! One module per subcommand. Each checks its input and builds its request first, then
//! connects: nothing invalid ever reaches the network, and `--controller` only matters to
//! commands that got that far.

pub mod config;
pub mod lease;
pub mod leases;
pub mod watch;

use crate::{Cli, Command};

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli {
        controller,
        output,
        command,
    } = cli;
    match command {
        Command::Config(c) => config::run(c, &controller, output).await,
        Command::Leases => leases::run(&controller, output).await,
        Command::Lease(c) => lease::run(c, &controller, output).await,
        Command::Watch(args) => watch::run(args, &controller, output).await,
    }
}
