//! `overlayctl`: inspect and manage an Overlay network through its controller.
//!
//! Every failure ends in one line on stderr, `overlayctl: <message>`, printed in exactly one
//! place ([`main`]): commands return errors with messages that already name the problem
//! (the argument, the field, the controller URL), so nothing else prints errors. Input is
//! checked locally, before connecting, so a typo never costs a network round trip and the
//! message points at the flag rather than at whatever the controller would say about it.
//!
//! Exit codes: 0 success, 1 any failure, 2 usage errors (clap's convention).

mod client;
mod cmd;
mod output;

use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Parser, Subcommand};

use crate::client::ControllerUrls;
use crate::output::Format;

#[derive(Debug, Parser)]
#[command(
    name = "overlayctl",
    version,
    about = "Inspect and manage an Overlay network through its controller",
    propagate_version = true
)]
pub struct Cli {
    /// Controller gRPC URL; a comma-separated list is tried in turn
    #[arg(
        long,
        global = true,
        env = "OVERLAY_CONTROLLER",
        default_value = client::DEFAULT_CONTROLLER,
        value_name = "URL[,URL...]",
        value_parser = client::parse_controllers
    )]
    pub controller: ControllerUrls,

    #[command(flatten)]
    pub tls: overlay_common::flags::TlsArgs,

    /// Output format
    #[arg(
        short = 'o',
        long,
        global = true,
        value_enum,
        default_value_t = Format::Table
    )]
    pub output: Format,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show or set the network config
    #[command(subcommand)]
    Config(cmd::config::ConfigCommand),
    /// List all leases, sorted by subnet
    Leases,
    /// Reserve a subnet for a node, or revoke a lease
    #[command(subcommand)]
    Lease(cmd::reserve_revoke::LeaseCommand),
    /// Follow lease changes: a line per added or removed lease
    Watch(cmd::watch::WatchArgs),
    /// The routes (and VXLAN entries) a node should have, from the leases
    Routes(cmd::routes::RoutesArgs),
    /// Ask an agent what it programmed, what drifted, which peers it skipped
    #[command(subcommand)]
    Agent(cmd::agent::AgentCommand),
    /// Cluster health: controllers, etcd, leases used and free, leases close to expiry
    Status,
    /// Issue a CA and certificates for controllers, nodes and admins
    #[command(subcommand)]
    Certs(cmd::certs::CertsCommand),
    /// A whole Overlay cluster on this machine, in network namespaces (root)
    #[command(subcommand)]
    Lab(cmd::lab::LabCommand),
    /// Print dockerd's --bip/--mtu flags for this host's subnet (from subnet.env)
    DockerOpts(cmd::docker_opts::DockerOptsArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions(cmd::completions::CompletionsArgs),
    /// Print the manual page, or write one per subcommand with --out DIR
    Man(cmd::completions::ManArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    // Two workers: while one blocks writing to a stalled stdout (`watch | slow reader`),
    // the other keeps the HTTP/2 connection answering keepalives.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("overlayctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cmd::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // `overlayctl leases | head -1`: the reader left; that is not our failure.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("overlayctl: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, [escaped](output::escape): a message can carry
/// what a server or an agent said.
fn error_line(e: &anyhow::Error) -> String {
    output::escape(&one_line(&format!("{e:#}"))).into_owned()
}

fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Prints a clap error: help and version as clap does, anything else as one line.
fn usage_error(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
        }
        _ => eprintln!("overlayctl: {}", usage_message(&e)),
    }
    ExitCode::from(e.exit_code().clamp(0, 255) as u8)
}

/// One line for a clap error, naming the argument: `--subnet: "10.1.2.300/24" is not an
/// IPv4 CIDR`.
pub fn usage_message(e: &clap::Error) -> String {
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(a)) => Some(arg_name(a)),
        _ => None,
    };
    match (e.kind(), arg) {
        (ErrorKind::ValueValidation, Some(arg)) => match std::error::Error::source(e) {
            Some(cause) => format!("{arg}: {}", one_line(&cause.to_string())),
            None => format!("{arg}: invalid value"),
        },
        (ErrorKind::InvalidValue, Some(arg)) => {
            let value = match e.get(ContextKind::InvalidValue) {
                Some(ContextValue::String(v)) => v.clone(),
                _ => String::new(),
            };
            match e.get(ContextKind::ValidValue) {
                Some(ContextValue::Strings(valid)) if !valid.is_empty() => {
                    format!("{arg}: {value:?} is not one of {}", valid.join(", "))
                }
                _ if value.is_empty() => format!("{arg}: a value is required"),
                _ => format!("{arg}: {value:?} is not a valid value"),
            }
        }
        _ => {
            // clap's own text, up to its first blank line (after which come usage and tips).
            let rendered = e.render().to_string();
            let head = rendered.split("\n\n").next().unwrap_or_default();
            let head = one_line(head);
            let head = head.strip_prefix("error: ").unwrap_or(&head);
            format!("{head} (see --help)")
        }
    }
}

/// `--subnet <CIDR>` -> `--subnet`; `<SUBNET>` -> `SUBNET`.
fn arg_name(display: &str) -> String {
    let first = display.split_whitespace().next().unwrap_or(display);
    first.trim_matches(|c| c == '<' || c == '>').to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("overlayctl").chain(args.iter().copied()))
    }

    fn usage(args: &[&str]) -> String {
        usage_message(&parse(args).expect_err("must be rejected"))
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_parse_anywhere() {
        let cli = parse(&["leases", "-o", "json", "--controller", "http://a:1,b:2"]).unwrap();
        assert_eq!(cli.output, Format::Json);
        assert_eq!(cli.controller.urls(), ["http://a:1", "http://b:2"]);
        let cli = parse(&["-o", "table", "leases"]).unwrap();
        assert_eq!(cli.output, Format::Table);
    }

    #[test]
    fn invalid_values_name_the_argument() {
        assert_eq!(
            usage(&[
                "lease",
                "reserve",
                "--subnet",
                "10.1.2.300/24",
                "--node",
                "n1",
                "--public-ip",
                "192.0.2.1"
            ]),
            r#"--subnet: "10.1.2.300/24" is not a CIDR"#
        );
        assert_eq!(
            usage(&["lease", "revoke", "10.244.7.5/24"]),
            r#"SUBNET: "10.244.7.5/24" has host bits set (did you mean 10.244.7.0/24?)"#
        );
        let msg = usage(&[
            "lease",
            "reserve",
            "--subnet",
            "10.244.7.0/24",
            "--node",
            "a/b",
            "--public-ip",
            "192.0.2.1",
        ]);
        assert!(
            msg.starts_with("--node: invalid node name \"a/b\""),
            "{msg}"
        );
        let msg = usage(&[
            "lease",
            "reserve",
            "--subnet",
            "10.244.7.0/24",
            "--node",
            "n1",
            "--public-ip",
            "224.0.0.1",
        ]);
        assert!(
            msg.starts_with("--public-ip: invalid public IP 224.0.0.1"),
            "{msg}"
        );
        let msg = usage(&["leases", "--controller", "ftp://c:7400"]);
        assert!(msg.starts_with("--controller: "), "{msg}");
        let msg = usage(&[
            "config",
            "set",
            "--network",
            "10.0.0.0/16",
            "--backend",
            "udp",
        ]);
        assert_eq!(
            msg,
            r#"--backend: "udp" is not one of vxlan, host-gw, alloc"#
        );
        let msg = usage(&["watch", "--after-revision", "-3"]);
        assert!(msg.contains("--after-revision"), "{msg}");
    }

    #[test]
    fn other_usage_errors_are_one_line() {
        let msg = usage(&["lease", "reserve", "--subnet", "10.244.7.0/24"]);
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains("--node"), "{msg}");
        let msg = usage(&["config", "set", "--network", "10.0.0.0/16", "--file", "x"]);
        assert!(msg.contains("--file") && msg.contains("--network"), "{msg}");
        let msg = usage(&["config", "set"]);
        assert!(msg.contains("--network") || msg.contains("--file"), "{msg}");
        let msg = usage(&["lease", "frobnicate"]);
        assert!(msg.contains("frobnicate") && !msg.contains('\n'), "{msg}");
    }
}
