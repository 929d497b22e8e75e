//! overlay-controller binary: flags, logging, and wiring of the library parts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use overlay_common::daemon::ListenOrOff;
use overlay_common::flags::TlsArgs;
use overlay_common::tls::Transport;
use overlay_controller::election;
use overlay_controller::fanout::Fanout;
use overlay_controller::grpc::{AgentService, Api, Auth, MAX_REQUEST_BYTES};
use overlay_controller::health::{self, HealthState, Readiness};
use overlay_controller::janitor::{self, JanitorConfig};
use overlay_controller::leases::{Keys, LeaseManager};
use overlay_controller::limits::RateLimiter;
use overlay_controller::listener::{self, Limits, Plaintext};
use overlay_controller::metrics::{MeteredStore, Metrics};
use overlay_controller::store::{EtcdOptions, EtcdStore, Store, StoreError};
use overlay_core::backoff::Backoff;
use overlay_core::config::parse_duration_in;
use overlay_proto::v1::admin_server::AdminServer;

/// HTTP/2 flow-control windows the controller grants: a stream's (a request is at most
/// `MAX_REQUEST_BYTES`), and the connection's, shared by its streams.
const STREAM_WINDOW: u32 = MAX_REQUEST_BYTES as u32;
const CONNECTION_WINDOW: u32 = 2 * MAX_REQUEST_BYTES as u32;
/// The largest HTTP/2 frame we accept: the protocol's minimum.
const MAX_FRAME: u32 = 16 * 1024;
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "overlay-controller",
    version,
    about = "Overlay controller: subnet leases in etcd, served to agents over gRPC"
)]
struct Args {
    /// etcd endpoints, comma separated.
    #[arg(
        long,
        env = "OVERLAY_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    etcd_endpoints: Vec<String>,
    /// Key prefix of this cluster in etcd.
    #[arg(long, env = "OVERLAY_ETCD_PREFIX", default_value = "/overlay")]
    etcd_prefix: String,
    /// CA that etcd's server certificate must chain to (PEM); needed for https:// endpoints.
    #[arg(long, env = "OVERLAY_ETCD_CACERT")]
    etcd_cacert: Option<PathBuf>,
    /// Client certificate for etcd (PEM), for an etcd started with --client-cert-auth.
    #[arg(long, env = "OVERLAY_ETCD_CERT")]
    etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert (PEM).
    #[arg(long, env = "OVERLAY_ETCD_KEY")]
    etcd_key: Option<PathBuf>,
    /// etcd user, for an etcd with authentication enabled.
    #[arg(long, env = "OVERLAY_ETCD_USER")]
    etcd_user: Option<String>,
    /// Password of --etcd-user (--etcd-password-file keeps it out of `ps`).
    #[arg(
        long,
        env = "OVERLAY_ETCD_PASSWORD",
        hide_env_values = true,
        conflicts_with = "etcd_password_file"
    )]
    etcd_password: Option<String>,
    /// File holding the password of --etcd-user (a trailing newline is ignored).
    #[arg(long, env = "OVERLAY_ETCD_PASSWORD_FILE")]
    etcd_password_file: Option<PathBuf>,
    /// TTL of the leader lease: how long a crashed leader delays the janitor (2s..5m).
    #[arg(
        long,
        env = "OVERLAY_LEADER_TTL",
        default_value = "6s",
        value_parser = parse_duration_in(Duration::from_secs(2), Duration::from_secs(300)),
        hide = true
    )]
    leader_ttl: Duration,
    /// Time between janitor sweeps (orphaned etcd leases, compaction) (100ms..1h).
    #[arg(
        long,
        env = "OVERLAY_JANITOR_INTERVAL",
        default_value = "30s",
        value_parser = parse_duration_in(Duration::from_millis(100), Duration::from_secs(3600)),
        hide = true
    )]
    janitor_interval: Duration,
    /// How long a keyless etcd lease may go without keepalive before the janitor revokes it
    /// (1s..24h).
    #[arg(
        long,
        env = "OVERLAY_ORPHAN_GRACE",
        default_value = "60s",
        value_parser = parse_duration_in(Duration::from_secs(1), Duration::from_secs(86_400)),
        hide = true
    )]
    orphan_grace: Duration,
    /// etcd revisions kept by the janitor's compaction; 0 disables compaction
    /// (0..1000000000).
    #[arg(
        long,
        env = "OVERLAY_KEEP_REVISIONS",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(i64).range(0..=1_000_000_000),
        hide = true
    )]
    keep_revisions: i64,
    /// gRPC listen address.
    #[arg(long, env = "OVERLAY_LISTEN", default_value = "0.0.0.0:7400")]
    listen: SocketAddr,
    /// Health endpoint (/healthz, /readyz, /metrics); "off" disables it.
    #[arg(long, env = "OVERLAY_HEALTH_LISTEN", default_value = "127.0.0.1:7401", value_parser = clap::value_parser!(ListenOrOff))]
    health_listen: ListenOrOff,
    /// Once listening, write the bound addresses here (`grpc=ADDR`, `health=ADDR`): what
    /// port 0 in --listen or --health-listen became.
    #[arg(long, env = "OVERLAY_ADDR_FILE")]
    addr_file: Option<PathBuf>,
    /// Certificate identities (CN) allowed to change config, reserve and revoke, and to act
    /// for any node; comma separated.
    #[arg(
        long,
        env = "OVERLAY_ADMIN_IDENTITIES",
        default_value = "admin",
        value_delimiter = ','
    )]
    admin_identities: Vec<String>,
    /// How long a client may take to finish the TLS handshake before its connection is
    /// closed (100ms..5m).
    #[arg(long, env = "OVERLAY_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_handshake_timeout)]
    tls_handshake_timeout: Duration,
    /// gRPC connections open at once, handshaking or established (1..1000000). At the cap
    /// a new connection replaces the oldest unfinished handshake, or is closed when every
    /// connection is established. Lowered at start to leave a quarter of the open-file limit
    /// (LimitNOFILE) free.
    #[arg(
        long,
        env = "OVERLAY_MAX_CONNECTIONS",
        default_value = "4096",
        value_parser = clap::value_parser!(u32).range(1..=1_000_000)
    )]
    max_connections: u32,
    /// Concurrent calls (HTTP/2 streams) per connection (1..10000).
    #[arg(
        long,
        env = "OVERLAY_MAX_CONCURRENT_STREAMS",
        default_value = "100",
        value_parser = clap::value_parser!(u32).range(1..=10_000)
    )]
    max_concurrent_streams: u32,
    /// Deadline of every call except the lease watch stream; a call that takes longer
    /// fails with DEADLINE_EXCEEDED (100ms..10m).
    #[arg(long, env = "OVERLAY_REQUEST_TIMEOUT", default_value = "8s", value_parser = parse_request_timeout)]
    request_timeout: Duration,
    /// Largest response message in bytes, such as a lease listing or a watch snapshot
    /// (64KiB..1GiB, written as a number of bytes).
    #[arg(
        long,
        env = "OVERLAY_MAX_RESPONSE_BYTES",
        default_value = "16777216",
        value_parser = clap::value_parser!(u32).range(65_536..=1_073_741_824)
    )]
    max_response_bytes: u32,
    /// Listing calls (ListLeases, GetConfig, WatchLeases) per second allowed to each
    /// certificate identity; admin identities are not limited (0.01..100000).
    #[arg(long, env = "OVERLAY_LIST_RATE", default_value = "5", value_parser = parse_list_rate)]
    list_rate: f64,
    /// Listing calls an identity may make at once before --list-rate applies (1..100000).
    #[arg(
        long,
        env = "OVERLAY_LIST_BURST",
        default_value = "20",
        value_parser = clap::value_parser!(u32).range(1..=100_000)
    )]
    list_burst: u32,
    /// Log format: text or json.
    #[arg(long, env = "OVERLAY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(flatten)]
    tls: TlsArgs,
}

fn parse_handshake_timeout(s: &str) -> Result<Duration, String> {
    parse_bounded(s, Duration::from_millis(100), Duration::from_secs(300))
}

fn parse_request_timeout(s: &str) -> Result<Duration, String> {
    parse_bounded(s, Duration::from_millis(100), Duration::from_secs(600))
}

fn parse_list_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.01..=100_000.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "{s:?} is not a rate from 0.01 to 100000 calls per second"
        )),
    }
}

/// --max-connections, lowered when the open-file limit could not hold that many.
fn connection_cap(requested: u32) -> usize {
    let requested = requested as usize;
    let Some(fd_limit) = listener::raise_fd_limit() else {
        return requested;
    };
    let cap = listener::connection_budget(requested, fd_limit);
    if cap < requested {
        warn!(
            max_connections = requested,
            open_file_limit = fd_limit,
            using = cap,
            "--max-connections lowered to leave descriptors free; raise LimitNOFILE to allow more"
        );
    }
    cap
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    overlay_core::config::parse_duration(s)
}

/// A duration within `min..=max`.
fn parse_bounded(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < min || d > max {
        return Err(format!(
            "{s:?} is out of range: write a duration from {} to {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// The etcd TLS and authentication flags, with the password file read.
fn etcd_options(args: &Args) -> anyhow::Result<EtcdOptions> {
    let password = match (&args.etcd_password, &args.etcd_password_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("--etcd-password-file {}", file.display()))?;
            Some(text.trim_end_matches(['\n', '\r']).to_string())
        }
        (None, None) => None,
    };
    Ok(EtcdOptions {
        ca_cert: args.etcd_cacert.clone(),
        client_cert: args.etcd_cert.clone(),
        client_key: args.etcd_key.clone(),
        user: args.etcd_user.clone(),
        password,
    })
}

/// Connects, retrying while etcd is unreachable; unusable options or refused credentials
/// are fatal.
async fn connect_etcd(endpoints: &[String], options: &EtcdOptions) -> anyhow::Result<EtcdStore> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match EtcdStore::connect_with(endpoints, options).await {
            Ok(store) => return Ok(store),
            Err(e @ (StoreError::InvalidOptions(_) | StoreError::AccessDenied(_))) => {
                return Err(e).context("cannot use etcd")
            }
            Err(e) => {
                let wait = backoff.next_delay();
                warn!(endpoints = ?endpoints, error = %e, retry_in = ?wait, "cannot connect to etcd");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

const ETCD_ACCESS_HINT: &str =
    "check --etcd-user/--etcd-password, and --etcd-cacert/--etcd-cert/--etcd-key for an etcd with TLS";

/// Exits when etcd refuses us (no or wrong credentials only show on the first request
/// when no user is given); keeps trying while etcd is unreachable.
async fn check_etcd_access(store: Arc<dyn Store>, key: String) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match store.get(&key).await {
            Ok(_) => return,
            Err(StoreError::AccessDenied(m)) => {
                error!(error = %m, "etcd denied access; {ETCD_ACCESS_HINT}");
                std::process::exit(1);
            }
            Err(e) => {
                let wait = backoff.next_delay();
                warn!(error = %e, retry_in = ?wait, "etcd access check failed");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Tells systemd (Type=notify) we are ready once the lease cache is loaded, keeps STATUS=
/// current, and pings the watchdog while the process is healthy enough to run this loop.
async fn notify_systemd(state: HealthState) {
    use sd_notify::NotifyState;
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let mut ready_sent = false;
    let mut last_status = String::new();
    loop {
        let status = match state.ready() {
            Ok(()) => format!("ready; {} watch clients", state.fanout.clients()),
            Err(why) => format!("not ready: {why}"),
        };
        if status != last_status {
            let _ = sd_notify::notify(&[NotifyState::Status(&status)]);
            last_status = status;
        }
        if !ready_sent && state.ready().is_ok() {
            let _ = sd_notify::notify(&[NotifyState::Ready]);
            ready_sent = true;
        }
        if watchdog.is_some() {
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
        }
        tokio::time::sleep(
            watchdog
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1)),
        )
        .await;
    }
}

fn main() -> std::process::ExitCode {
    // `{:#}` joins anyhow's causes on one line.
    overlay_common::daemon::exit_code("overlay-controller", run().map_err(|e| format!("{e:#}")))
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    overlay_common::daemon::init_logging(&args.log_format);
    let health_addr = args.health_listen.0;
    let transport = args.tls.transport()?;
    let tls_acceptor = match &transport {
        Transport::Tls(files) => Some(tokio_rustls::TlsAcceptor::from(
            files.server_config().context("TLS setup")?,
        )),
        Transport::Insecure => None,
    };
    let limits = Limits {
        max_connections: connection_cap(args.max_connections),
        handshake_timeout: args.tls_handshake_timeout,
    };
    // Bind first so a taken port fails at once, with the port in the message.
    let grpc_listener = listener::bind(args.listen)
        .with_context(|| format!("--listen: cannot listen on {}", args.listen))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let health_listener = match health_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--health-listen: cannot listen on {addr}"))?,
        ),
        None => None,
    };
    if let Some(path) = &args.addr_file {
        let mut addrs = vec![("grpc", grpc_addr)];
        if let Some(l) = &health_listener {
            addrs.push(("health", l.local_addr()?));
        }
        overlay_common::daemon::write_addr_file(path, &addrs)
            .with_context(|| format!("--addr-file: cannot write {}", path.display()))?;
    }

    info!(endpoints = ?args.etcd_endpoints, prefix = %args.etcd_prefix, "connecting to etcd");
    let metrics = Arc::new(Metrics::new());
    let etcd_options = etcd_options(&args)?;
    let etcd: Arc<dyn Store> = Arc::new(connect_etcd(&args.etcd_endpoints, &etcd_options).await?);
    let store: Arc<dyn Store> = Arc::new(MeteredStore::new(etcd, metrics.clone()));
    // One request before anything else uses etcd: alone on its connection, it is the one
    // that sees why a TLS handshake fails (concurrent requests only see "connection closed").
    let probe_key = Keys::new(&args.etcd_prefix).config();
    if let Err(e) = EtcdStore::check_tls(&args.etcd_endpoints, &etcd_options).await {
        anyhow::bail!("{e} ({ETCD_ACCESS_HINT})");
    }
    match store.get(&probe_key).await {
        Ok(_) => {}
        Err(e @ StoreError::AccessDenied(_)) => anyhow::bail!("{e} ({ETCD_ACCESS_HINT})"),
        Err(_) => {
            tokio::spawn(check_etcd_access(store.clone(), probe_key));
        }
    }
    let manager = Arc::new(LeaseManager::new(
        store.clone(),
        Keys::new(&args.etcd_prefix),
    ));
    let election = janitor::spawn(
        store.clone(),
        &args.etcd_prefix,
        election::default_identity(grpc_addr),
        args.leader_ttl,
        JanitorConfig {
            interval: args.janitor_interval,
            orphan_grace: args.orphan_grace,
            keep_revisions: args.keep_revisions,
        },
        metrics.clone(),
        manager.view().clone(),
    );
    let fanout = Arc::new(Fanout::with_metrics(metrics.clone()));
    let readiness = Arc::new(Readiness::default());
    let health_state = HealthState {
        readiness: readiness.clone(),
        fanout: fanout.clone(),
        leases: manager.clone(),
        metrics: metrics.clone(),
    };
    if let Some(listener) = health_listener {
        let router = health::router(health_state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                error!(error = %e, "health endpoint failed");
            }
        });
    }
    tokio::spawn(readiness.clone().watch_store(store.clone()));
    tokio::spawn(fanout.clone().run(manager.clone()));
    tokio::spawn(notify_systemd(health_state));

    let auth = match &transport {
        Transport::Tls(_) => Auth::Mtls {
            admins: args.admin_identities.iter().cloned().collect(),
        },
        Transport::Insecure => Auth::Open,
    };
    let stopping = fanout.clone();
    let shutdown = async move {
        overlay_common::daemon::shutdown_signal("shutting down").await;
        stopping.close();
    };
    let api = Api {
        auth,
        leases: manager,
        fanout,
        metrics: metrics.clone(),
        list_limiter: Arc::new(RateLimiter::new(args.list_rate, args.list_burst)),
        request_timeout: args.request_timeout,
    };
    info!(
        listen = %grpc_addr,
        max_connections = limits.max_connections,
        tls_handshake_timeout = ?limits.handshake_timeout,
        max_concurrent_streams = args.max_concurrent_streams,
        request_timeout = ?args.request_timeout,
        "serving gRPC"
    );
    if let Transport::Tls(files) = &transport {
        info!(cert = %files.cert.display(), ca = %files.ca.display(), "mutual TLS on: clients need a certificate from the CA");
    }
    let max_response = args.max_response_bytes as usize;
    // HTTP/2 windows: what a client may send us before we read it. Requests are at most
    // MAX_REQUEST_BYTES, so small windows cost callers nothing and bound what thousands of
    // connections can make us buffer (see docs/benchmarks.md, controller memory).
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(args.max_concurrent_streams)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .add_service(AgentService::new(api.clone(), max_response))
        .add_service(
            AdminServer::new(api)
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(max_response),
        );
    // Our own accept loop (handshake timeout, connection cap), not tonic's TLS.
    match tls_acceptor {
        Some(tls) => {
            let incoming = listener::incoming(grpc_listener, tls, limits, metrics);
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        None => {
            let incoming = listener::incoming(grpc_listener, Plaintext, limits, metrics);
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    }
    .context("gRPC server failed")?;
    election.resign().await;
    info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(flag: &str) -> Result<Args, clap::Error> {
        Args::try_parse_from(["overlay-controller", "--insecure", flag])
    }

    #[test]
    fn limits_have_safe_defaults_and_refuse_zero_or_absurd_values() {
        let a = Args::try_parse_from(["overlay-controller", "--insecure"]).unwrap();
        assert_eq!(a.tls_handshake_timeout, Duration::from_secs(10));
        assert_eq!(a.max_connections, 4096);
        assert_eq!(a.max_concurrent_streams, 100);
        assert_eq!(a.request_timeout, Duration::from_secs(8));
        assert_eq!(a.max_response_bytes, 16 << 20);
        assert_eq!((a.list_rate, a.list_burst), (5.0, 20));
        for bad in [
            "--tls-handshake-timeout=0",
            "--tls-handshake-timeout=1h",
            "--max-connections=0",
            "--max-connections=100000000",
            "--max-concurrent-streams=0",
            "--request-timeout=0s",
            "--request-timeout=1d",
            "--max-response-bytes=0",
            "--max-response-bytes=99999999999",
            "--list-rate=0",
            "--list-rate=-1",
            "--list-rate=NaN",
            "--list-rate=inf",
            "--list-burst=0",
        ] {
            let e = parse(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad} was accepted"));
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{bad}: {e}"
            );
        }
        assert_eq!(
            parse("--tls-handshake-timeout=2s")
                .unwrap()
                .tls_handshake_timeout,
            Duration::from_secs(2)
        );
        assert_eq!(parse("--list-rate=0.5").unwrap().list_rate, 0.5);
    }
}
