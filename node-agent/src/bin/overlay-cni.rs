//! `overlay-cni`: the CNI plugin binary. The runtime passes the command in CNI_* variables
//! and the network config on stdin; the result or the spec's error JSON goes to stdout.
//! See `overlay_agent::cni` for what each command does.

use std::io::Write;

use anyhow::Context;
use overlay_agent::cni::{self, CniEnv, CniError, ErrorCode};

fn main() {
    let code = match run() {
        Ok(code) => code,
        Err(e) => {
            // Only reached when the plugin cannot even start (no stdin, no runtime):
            // still answer in the spec's shape.
            let error = CniError::new(ErrorCode::Io, "overlay-cni could not run")
                .with_details(format!("{e:#}"));
            println!("{}", error.to_json(cni::config::LATEST_VERSION));
            1
        }
    };
    std::process::exit(code);
}

fn run() -> anyhow::Result<i32> {
    let env = CniEnv::from_vars(|k| std::env::var(k).ok());
    // VERSION may come with no stdin at all; every other command needs the config. Read
    // with a bound: a config over it is refused by `cni::run` with the spec's error.
    let stdin = cni::config::read_stdin(std::io::stdin().lock())
        .context("reading the network config from stdin")?;
    // One thread: the netlink sockets are opened in the namespace of the calling thread,
    // and a single thread makes "the calling thread" unambiguous.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let output = runtime.block_on(cni::run(&env, &stdin));
    let mut stdout = std::io::stdout().lock();
    if !output.stdout.is_empty() {
        writeln!(stdout, "{}", output.stdout).context("writing the result")?;
    }
    stdout.flush().context("writing the result")?;
    Ok(output.exit_code)
}
