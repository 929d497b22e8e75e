//! overlay-controller binary: flags, logging, and wiring of the library parts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use overlay_controller::fanout::Fanout;
use overlay_controller::grpc::{Api, Auth, MAX_REQUEST_BYTES};
use overlay_proto::tls::Transport;
use overlay_controller::health::{self, HealthState, Readiness};
use overlay_controller::leases::{Keys, LeaseManager};
use overlay_controller::metrics::{MeteredStore, Metrics};
use overlay_controller::store::{EtcdStore, Store};
use overlay_proto::v1::{admin_server::AdminServer, agent_server::AgentServer};
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
    /// gRPC listen address.
    #[arg(long, env = "OVERLAY_LISTEN", default_value = "0.0.0.0:7400")]
    listen: SocketAddr,
    /// Health endpoint (/healthz, /readyz); "off" disables it.
    #[arg(long, env = "OVERLAY_HEALTH_LISTEN", default_value = "127.0.0.1:7401")]
    health_listen: String,
    /// This controller's certificate (PEM); with --tls-key and --tls-ca enables mutual TLS.
    #[arg(long, env = "OVERLAY_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "OVERLAY_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// The CA that client (agent, admin) certificates must chain to (PEM).
    #[arg(long, env = "OVERLAY_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Serve plaintext gRPC without client authentication (labs and tests only).
    #[arg(long, env = "OVERLAY_INSECURE")]
    insecure: bool,
    /// Certificate identities (CN) allowed to change config, reserve and revoke, and to act
    /// for any node; comma separated.
    #[arg(long, env = "OVERLAY_ADMIN_IDENTITIES", default_value = "admin", value_delimiter = ',')]
    admin_identities: Vec<String>,
    /// Log format: text or json.
    #[arg(long, env = "OVERLAY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn init_logging(format: &str) {
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

fn transport(args: &Args) -> anyhow::Result<Transport> {
    let t = Transport::from_flags(args.tls_cert.as_deref(), args.tls_key.as_deref(), args.tls_ca.as_deref(), args.insecure);
    match t {
        // Until every deployment passes one or the other, no flag at all still means
        // plaintext, loudly.
        Err(_) if args.tls_cert.is_none() && args.tls_key.is_none() && args.tls_ca.is_none() => {
            warn!("no TLS credentials and no --insecure: serving plaintext; pass --tls-cert/--tls-key/--tls-ca or --insecure");
            Ok(Transport::Insecure)
        }
        other => Ok(other?),
    }
}

async fn connect_etcd(endpoints: &[String]) -> EtcdStore {
    let mut backoff = Duration::from_millis(200);
    loop {
        match EtcdStore::connect(endpoints).await {
            Ok(store) => return store,
            Err(e) => {
                warn!(endpoints = ?endpoints, error = %e, retry_in = ?backoff, "cannot connect to etcd");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
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

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args.log_format);
    let health_addr: Option<SocketAddr> = match args.health_listen.as_str() {
        "off" => None,
        a => Some(a.parse().with_context(|| {
            format!("--health-listen: {a:?} is not an address:port or \"off\"")
        })?),
    };
    let transport = transport(&args)?;
    // Bind first so a taken port fails at once, with the port in the message.
    let grpc_listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen: cannot listen on {}", args.listen))?;

    info!(endpoints = ?args.etcd_endpoints, prefix = %args.etcd_prefix, "connecting to etcd");
    let metrics = Arc::new(Metrics::new());
    let etcd: Arc<dyn Store> = Arc::new(connect_etcd(&args.etcd_endpoints).await);
    let store: Arc<dyn Store> = Arc::new(MeteredStore::new(etcd, metrics.clone()));
    let manager = Arc::new(LeaseManager::new(
        store.clone(),
        Keys::new(&args.etcd_prefix),
    ));
    let fanout = Arc::new(Fanout::with_metrics(metrics.clone()));
    let readiness = Arc::new(Readiness::default());
    let health_state = HealthState {
        readiness: readiness.clone(),
        fanout: fanout.clone(),
        leases: manager.clone(),
        metrics: metrics.clone(),
    };
    if let Some(addr) = health_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--health-listen: cannot listen on {addr}"))?;
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
        Transport::Tls(_) => Auth::Mtls { admins: args.admin_identities.iter().cloned().collect() },
        Transport::Insecure => Auth::Open,
    };
    let stopping = fanout.clone();
    let shutdown = async move {
        shutdown_signal().await;
        stopping.close();
    };
    let api = Api {
        auth,
        leases: manager,
        fanout,
        metrics,
    };
    info!(listen = %args.listen, "serving gRPC");
    let mut server = tonic::transport::Server::builder();
    if let Transport::Tls(files) = &transport {
        server = server.tls_config(files.server_config()?).context("TLS setup")?;
        info!(cert = %files.cert.display(), ca = %files.ca.display(), "mutual TLS on: clients need a certificate from the CA");
    }
    server
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(AgentServer::new(api.clone()).max_decoding_message_size(MAX_REQUEST_BYTES))
        .add_service(AdminServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
            shutdown,
        )
        .await
        .context("gRPC server failed")?;
    info!("stopped");
    Ok(())
}
