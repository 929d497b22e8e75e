//! What both daemons (controller and agent) set up the same way: logging and the signals
//! that stop them.

/// Logs to stderr, one line per event (journald adds time and unit), filtered by
/// `OVERLAY_LOG` (default `info`); `format` "json" gives JSON lines for log shippers.
pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OVERLAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.with_ansi(false).init();
    }
}

/// Resolves on SIGTERM or SIGINT, logging which one and `what` happens next.
pub async fn shutdown_signal(what: &'static str) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: {what}"),
        _ = int.recv() => tracing::info!("SIGINT: {what}"),
    }
}

/// Writes the addresses a daemon actually listens on, one `NAME=ADDR` line each (e.g.
/// `grpc=127.0.0.1:41234`), for `--addr-file`: with port 0 in a listen flag the kernel picks
/// the port, and whoever started the daemon learns it here instead of guessing a free port
/// beforehand (which another process can take first). Written with
/// [`crate::durable::write`], so a reader sees the whole file or none.
pub fn write_addr_file(
    path: &std::path::Path,
    addrs: &[(&str, std::net::SocketAddr)],
) -> Result<(), crate::durable::FileError> {
    let text: String = addrs.iter().map(|(n, a)| format!("{n}={a}\n")).collect();
    crate::durable::write(
        path,
        text.as_bytes(),
        crate::durable::WriteOptions::replace(0o644),
    )
}

/// The exit of a daemon's `main`: a failure is one line on stderr, `NAME: error: ` and its
/// causes joined (no backtrace, whatever RUST_BACKTRACE says: what went wrong is in the
/// message), and exit status 1.
pub fn exit_code<E: std::fmt::Display>(
    name: &str,
    result: Result<(), E>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A listen flag that may be "off" (`--health-listen`): an address, or nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenOrOff(pub Option<std::net::SocketAddr>);

impl std::str::FromStr for ListenOrOff {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(ListenOrOff(None));
        }
        s.parse()
            .map(|a| ListenOrOff(Some(a)))
            .map_err(|_| format!("{s:?} is not an address:port or \"off\""))
    }
}
