//! overlay-agent binary: flags (each with an OVERLAY_* environment variable), logging,
//! signals, and the health endpoint around [`overlay_agent::agent::Agent`].

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use overlay_agent::agent::{Agent, AgentOptions, SharedStatus};
use overlay_agent::backend::HostEffects;
use overlay_agent::control_plane::grpc::GrpcControlPlane;
use overlay_agent::firewall::{self, FirewallKind};
use overlay_agent::health;
use overlay_agent::metrics::AgentMetrics;
use overlay_common::connect::Controllers;
use overlay_common::daemon::ListenOrOff;
use overlay_common::flags::TlsArgs;
use overlay_common::tls::Transport;
use overlay_core::config::parse_duration_in;
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "overlay-agent",
    version,
    about = "Overlay agent: leases this host's subnet and programs the datapath"
)]
struct Args {
    /// Controller URL(s), comma separated; tried in turn.
    #[arg(
        long,
        env = "OVERLAY_CONTROLLER",
        default_value = "http://127.0.0.1:7400",
        value_delimiter = ','
    )]
    controller: Vec<String>,
    /// This node's name (default: the common name of --tls-cert, else the hostname).
    #[arg(long, env = "OVERLAY_NODE_NAME")]
    node_name: Option<String>,
    /// The underlay IPv4 address other hosts reach this one at (default: the first IPv4
    /// address of --iface).
    #[arg(long, env = "OVERLAY_PUBLIC_IP")]
    public_ip: Option<Ipv4Addr>,
    /// The underlay IPv6 address other hosts reach this one at (default: the first
    /// global IPv6 address of --iface, in a cluster with IPv6).
    #[arg(long, env = "OVERLAY_PUBLIC_IPV6", value_parser = parse_public_ipv6)]
    public_ipv6: Option<Ipv6Addr>,
    /// The underlay interface (default: the interface of the default route).
    #[arg(long, env = "OVERLAY_IFACE")]
    iface: Option<String>,
    #[arg(long, env = "OVERLAY_RUN_DIR", default_value = "/run/overlay")]
    run_dir: PathBuf,
    #[arg(long, env = "OVERLAY_STATE_DIR", default_value = "/var/lib/overlay")]
    state_dir: PathBuf,
    /// The workloads' bridge; "none" leaves it to another runtime (e.g. Docker's --bip).
    #[arg(long, env = "OVERLAY_BRIDGE", default_value = "ovl0")]
    bridge: String,
    /// Masquerade traffic from the overlay to outside the cluster network.
    #[arg(long, env = "OVERLAY_IP_MASQ")]
    ip_masq: bool,
    /// How to install the FORWARD and masquerade rules: auto (what the host already
    /// uses), nftables, iptables-nft, iptables-legacy, iptables (whatever `iptables` is)
    /// or none.
    #[arg(long, env = "OVERLAY_FIREWALL", default_value = "auto")]
    firewall: FirewallKind,
    /// Remove the firewall rules agents made (with --firewall auto: from nftables,
    /// iptables-nft and iptables-legacy alike) and exit. The lease, devices, routes and
    /// files stay (see "Decommission a node" in docs/operations.md).
    #[arg(long)]
    cleanup: bool,
    /// Health endpoint (/healthz, /readyz, /status, /metrics); "off" disables it.
    #[arg(long, env = "OVERLAY_HEALTH_LISTEN", default_value = "127.0.0.1:7402", value_parser = clap::value_parser!(ListenOrOff))]
    health_listen: ListenOrOff,
    /// Once listening, write the health endpoint's bound address here (`health=ADDR`): what
    /// port 0 in --health-listen became.
    #[arg(long, env = "OVERLAY_ADDR_FILE")]
    addr_file: Option<PathBuf>,
    /// Full reconcile interval even without events (1s..1h).
    #[arg(
        long,
        env = "OVERLAY_RESYNC_INTERVAL",
        default_value = "30s",
        value_parser = parse_duration_in(Duration::from_secs(1), Duration::from_secs(3600))
    )]
    resync_interval: Duration,
    /// Install the CNI conflist (overlay-cni + portmap) in this directory once ready,
    /// e.g. /etc/cni/net.d. Ignored with --bridge none.
    #[arg(long, env = "OVERLAY_CNI_CONF_DIR")]
    cni_conf_dir: Option<PathBuf>,
    /// Where overlay-cni keeps its address reservations (written into the conflist as
    /// dataDir; default /var/lib/cni/overlay). Every runtime on the host shares it.
    #[arg(long, env = "OVERLAY_CNI_DATA_DIR")]
    cni_data_dir: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, env = "OVERLAY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(flatten)]
    tls: TlsArgs,
}

/// `--cleanup`: removes the agents' firewall rules, says what it removed, and fails if any
/// removal failed.
fn cleanup(kind: FirewallKind, path: &std::ffi::OsString) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for (name, result) in firewall::cleanup(kind, path) {
        match result {
            Ok(true) => info!(firewall = %name, "removed Overlay's rules"),
            Ok(false) => info!(firewall = %name, "no Overlay rules found"),
            Err(e) => failed.push(format!("{name}: {e}")),
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("--cleanup: {}", failed.join("; "));
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn main() -> std::process::ExitCode {
    // `{:#}` joins anyhow's causes on one line.
    overlay_common::daemon::exit_code("overlay-agent", run().map_err(|e| format!("{e:#}")))
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    overlay_common::daemon::init_logging(&args.log_format);
    let path = firewall::search_path();
    if args.cleanup {
        return cleanup(args.firewall, &path);
    }
    // TLS with all three files, or plaintext only when asked for with --insecure.
    let transport = args.tls.transport()?;
    let node = match (&args.node_name, &transport) {
        (Some(n), _) => n.clone(),
        // With a certificate, the node is who the certificate says it is.
        (None, Transport::Tls(files)) => files.own_identity().context("--tls-cert")?,
        (None, Transport::Insecure) => hostname(),
    };
    overlay_core::lease::validate_node_name(&node).context("--node-name")?;
    let controllers =
        Controllers::with_transport(&args.controller, &transport).context("--controller")?;
    let health_addr = args.health_listen.0;
    let status = SharedStatus::default();
    let metrics = Arc::new(AgentMetrics::new());
    if let Some(addr) = health_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--health-listen: cannot listen on {addr}"))?;
        if let Some(path) = &args.addr_file {
            overlay_common::daemon::write_addr_file(path, &[("health", listener.local_addr()?)])
                .with_context(|| format!("--addr-file: cannot write {}", path.display()))?;
        }
        let router = health::router(status.clone(), metrics.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                error!(error = %e, "health endpoint failed");
            }
        });
    }
    let host =
        overlay_agent::hostnet::detect(args.public_ip, args.public_ipv6, args.iface.as_deref())?;
    let chosen = firewall::select(args.firewall, &path).context("--firewall")?;
    info!(firewall = chosen.firewall.name(), reason = %chosen.reason, "firewall chosen");
    for (name, result) in firewall::remove_others(chosen.firewall.as_ref(), &path) {
        match result {
            Ok(true) => {
                warn!(firewall = %name, "removed Overlay's rules left there by an earlier choice")
            }
            Ok(false) => {}
            Err(e) => {
                warn!(firewall = %name, error = %e, "cannot remove Overlay's rules left there by an earlier choice")
            }
        }
    }
    status.write().expect("status").firewall.reason = Some(chosen.reason);
    let effects = HostEffects::kernel(chosen.firewall).context("netlink")?;
    let opts = AgentOptions {
        node,
        run_dir: args.run_dir,
        state_dir: args.state_dir,
        bridge: (args.bridge != "none").then_some(args.bridge),
        ip_masq: args.ip_masq,
        resync_interval: args.resync_interval,
        cni_conf_dir: args.cni_conf_dir,
        cni_data_dir: args.cni_data_dir,
    };
    let control = Arc::new(GrpcControlPlane::new(controllers));
    let agent = Agent::new(opts, host, control, effects, Arc::clone(&status)).with_metrics(metrics);
    agent
        .run(overlay_common::daemon::shutdown_signal(
            "stopping; the lease and the datapath stay in place",
        ))
        .await?;
    Ok(())
}

/// `--public-ipv6`: an IPv6 address that peers can send to (an IPv4 address given here
/// is refused by name: it belongs in --public-ip).
fn parse_public_ipv6(text: &str) -> Result<Ipv6Addr, String> {
    let ip: std::net::IpAddr = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not an IPv6 address"))?;
    match ip {
        std::net::IpAddr::V4(v4) => Err(format!(
            "{v4} is an IPv4 address; give it as --public-ip, and an IPv6 address here"
        )),
        std::net::IpAddr::V6(v6) => overlay_core::lease::validate_public_ipv6(v6)
            .map(|()| v6)
            .map_err(|e| e.to_string()),
    }
}
