//! [`Store`] on a real etcd (v3 API, via `etcd-client`).
//!
//! Design notes:
//! - Every unary request runs under our own deadline ([`REQUEST_TIMEOUT`]) on top of
//!   tonic's per-request timeout. tonic's timeout only starts once a connection was picked,
//!   and etcd-client's balanced channel parks a request while no endpoint is reachable, so
//!   without the outer deadline a down etcd would hang callers instead of returning
//!   [`StoreError::Unavailable`].
//! - With several endpoints (an etcd cluster), a request that fails before it was sent (a
//!   connect error) is sent again, within the same deadline: etcd-client's balanced channel
//!   keeps a dead member in its pick (tonic's reconnecting service reports itself ready and
//!   fails the call with its connect error), so without this a member that is down would
//!   fail a share of all requests while the others answer. Nothing was sent, so any
//!   request, a transaction included, may go again; each try picks an endpoint anew.
//!   Requests already sent are never repeated: their outcome is unknown.
//! - With several endpoints, each member is also asked for its status every second on a
//!   connection of its own ([`member_health`]), and a member that does not answer within a
//!   second is taken out of the balanced channel until it answers again (never the last
//!   one). Without that, a member that is alive to TCP but stuck (a stalled disk, a
//!   frozen process, a partition that leaves connections open) would hold a third of all
//!   requests until their deadline, since tonic's balancer picks endpoints without
//!   regard to requests pending on them.
//! - [`EtcdStore::connect`] does not wait for etcd: the channel connects lazily, so the
//!   controller can start before etcd and report "not ready" through [`Store::ping`].
//! - HTTP/2 keepalive pings run only while a stream (watch) is open: etcd's default
//!   enforcement policy answers idle pings with GOAWAY ("too many pings"). The pings make a
//!   watch on a silently dead etcd fail instead of waiting forever.
//! - Compare-and-set writes are single etcd transactions, so the revision returned is the
//!   one etcd assigned and watchers see exactly one event per write.
//! - `keep_alive` opens a keepalive stream per call. etcd-client's `keep_alive` already sends
//!   one request and checks its answer but does not hand out the TTL, so we send a second
//!   request on the same stream to learn the TTL granted. Callers refresh every few seconds,
//!   so the extra message is noise, and it keeps the API free of long-lived keeper state.
//! - Watches wait for etcd's "created" answer before returning, so a write made after
//!   `watch()` returned is always seen by a watch from revision 0. The created answer itself
//!   is not passed on; progress notifications are, as batches with no events, so callers can
//!   advance their revision while nothing changes.
//! - TLS and authentication ([`EtcdOptions`]) are checked as far as possible before any
//!   request: files are read and the TLS config is built up front, so a bad file is an
//!   [`StoreError::InvalidOptions`] naming the flag and the file, not an endless
//!   "unavailable". Credentials etcd refuses are [`StoreError::AccessDenied`], so callers
//!   can stop instead of retrying. Tokens are refreshed automatically when etcd expires
//!   them (its simple tokens live 5 minutes by default).
//! - A client certificate etcd refuses cannot be told from a dropped connection through
//!   gRPC: with TLS 1.3 the client's handshake is done before etcd checks the certificate,
//!   so etcd's alert reaches the connection after a request was sent, and the request only
//!   sees "connection closed". [`EtcdStore::check_tls`] makes one direct handshake and reads
//!   etcd's first answer (its HTTP/2 settings, or the alert) to say why.
//! - With a user, connecting authenticates, so it needs etcd reachable; without one it
//!   stays lazy. A user given to an etcd without authentication is ignored with a warning,
//!   as etcd's own Go client does.

use std::fmt;
use std::future::Future;
use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, CompactionOptions, Compare, CompareOp, ConnectOptions, DeleteOptions,
    EventType, GetOptions, Identity, LeaseTimeToLiveOptions, PutOptions, TlsOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions, WatchResponse,
};
use futures::StreamExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use tonic::Code;
use tracing::{info, warn};

use super::{
    Condition, KeyValue, LeaseId, LeaseInfo, Store, StoreError, StoreEvent, TxnWrite, WatchBatch,
    WatchStream, Written,
};

/// Time allowed to open a TCP connection to an etcd endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for one request (including waiting for a reachable endpoint).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for [`Store::ping`]: readiness checks want a quick answer.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// HTTP/2 keepalive while a stream is open (above etcd's 5 s minimum ping interval).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`Store`] backed by etcd. Cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    /// How many times a request that was never sent is tried (see the module notes).
    tries: usize,
    /// Dropped with the last clone, which ends the [`member_health`] task.
    _alive: Arc<()>,
}

/// How to secure the connection to etcd, beyond the endpoints. Each field is named after
/// the controller flag that sets it, and errors name that flag.
#[derive(Clone, Default)]
pub struct EtcdOptions {
    /// The CA etcd's server certificate must chain to (`--etcd-cacert`); required for
    /// `https://` endpoints.
    pub ca_cert: Option<PathBuf>,
    /// A client certificate to present, for etcd's `--client-cert-auth` (`--etcd-cert`).
    pub client_cert: Option<PathBuf>,
    /// The key of `client_cert` (`--etcd-key`).
    pub client_key: Option<PathBuf>,
    /// etcd user (`--etcd-user`), for etcd's own authentication.
    pub user: Option<String>,
    /// The user's password (`--etcd-password` or `--etcd-password-file`).
    pub password: Option<String>,
}

impl fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("ca_cert", &self.ca_cert)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn invalid(message: impl Into<String>) -> StoreError {
    StoreError::InvalidOptions(message.into())
}

/// Reads a PEM file given by `flag`.
fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>, StoreError> {
    let bytes =
        std::fs::read(path).map_err(|e| invalid(format!("{flag} {}: {e}", path.display())))?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        return Err(invalid(format!(
            "{flag} {}: not a PEM file",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Parses the certificates of a PEM file given by `flag`; at least one.
fn pem_certs(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let bytes = read_pem(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("{flag} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "{flag} {}: no certificate in the file",
            path.display()
        )));
    }
    Ok(certs)
}

impl EtcdOptions {
    /// A rustls client config with the same trust and identity as the gRPC channel's; it
    /// checks the files in detail and drives [`EtcdStore::check_tls`].
    fn rustls_config(&self) -> Result<Option<Arc<ClientConfig>>, StoreError> {
        let Some(ca) = &self.ca_cert else {
            return Ok(None);
        };
        let mut roots = RootCertStore::empty();
        for cert in pem_certs("--etcd-cacert", ca)? {
            roots
                .add(cert)
                .map_err(|e| invalid(format!("--etcd-cacert {}: {e}", ca.display())))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(format!("TLS setup: {e}")))?
            .with_root_certificates(roots);
        let mut config = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let chain = pem_certs("--etcd-cert", cert)?;
                let key_der = PrivateKeyDer::from_pem_slice(&read_pem("--etcd-key", key)?)
                    .map_err(|e| {
                        invalid(format!(
                            "--etcd-key {}: no usable private key in the file ({e})",
                            key.display()
                        ))
                    })?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    invalid(format!(
                        "--etcd-cert {} with --etcd-key {}: {e}",
                        cert.display(),
                        key.display()
                    ))
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Some(Arc::new(config)))
    }

    fn uses_tls(&self) -> bool {
        self.ca_cert.is_some() || self.client_cert.is_some() || self.client_key.is_some()
    }

    /// Checks the options against `endpoints` and loads the TLS files; `None` for plaintext.
    fn tls(&self, endpoints: &[String]) -> Result<Option<TlsOptions>, StoreError> {
        if self.user.is_some() != self.password.is_some() {
            return Err(invalid(
                "--etcd-user and --etcd-password (or --etcd-password-file) go together: pass both",
            ));
        }
        if self.user.as_deref() == Some("") {
            return Err(invalid("--etcd-user is empty"));
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(invalid("--etcd-cert and --etcd-key go together: pass both"));
        }
        let https = endpoints.iter().filter(|e| e.starts_with("https://"));
        let http = endpoints.iter().filter(|e| e.starts_with("http://"));
        if !self.uses_tls() {
            if let Some(e) = https.clone().next() {
                return Err(invalid(format!(
                    "etcd endpoint {e} is https: pass --etcd-cacert (the CA of etcd's server certificate)"
                )));
            }
            return Ok(None);
        }
        if let Some(e) = http.clone().next() {
            return Err(invalid(format!(
                "--etcd-cacert/--etcd-cert/--etcd-key need https:// endpoints, got {e}"
            )));
        }
        let Some(ca) = &self.ca_cert else {
            return Err(invalid(
                "--etcd-cert/--etcd-key need --etcd-cacert (the CA of etcd's server certificate)",
            ));
        };
        self.rustls_config()?;
        let mut tls =
            TlsOptions::new().ca_certificate(Certificate::from_pem(read_pem("--etcd-cacert", ca)?));
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            let identity =
                Identity::from_pem(read_pem("--etcd-cert", cert)?, read_pem("--etcd-key", key)?);
            tls = tls.identity(identity);
        }
        // Building an endpoint parses the certificates and the key (nothing is sent), so a
        // file that is PEM but not a usable certificate or key fails here, by name.
        for e in endpoints {
            let url = if e.contains("://") {
                e.clone()
            } else {
                format!("https://{e}")
            };
            tonic::transport::Endpoint::from_shared(url)
                .map_err(|err| invalid(format!("etcd endpoint {e}: {err}")))?
                .tls_config(tls.clone())
                .map_err(|err| {
                    invalid(format!(
                        "TLS setup from --etcd-cacert {}, --etcd-cert {}, --etcd-key {}: {}",
                        ca.display(),
                        display_opt(&self.client_cert),
                        display_opt(&self.client_key),
                        error_chain(&err),
                    ))
                })?;
        }
        Ok(Some(tls))
    }
}

fn display_opt(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map_or_else(|| "(none)".to_string(), |p| p.display().to_string())
}

/// An error and all its sources, "a: b: c".
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}

fn is_auth_not_enabled(e: &StoreError) -> bool {
    matches!(e, StoreError::Other(m) if m.contains("authentication is not enabled"))
}

impl EtcdStore {
    /// Creates a client for plaintext `endpoints` (`http://host:port`). Does not contact etcd.
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        Self::connect_with(endpoints, &EtcdOptions::default()).await
    }

    /// Creates a client with TLS and/or a user. Without a user it does not contact etcd;
    /// with one it authenticates, so it fails with [`StoreError::Unavailable`] while etcd is
    /// unreachable and with [`StoreError::AccessDenied`] when etcd refuses the credentials.
    pub async fn connect_with(
        endpoints: &[String],
        options: &EtcdOptions,
    ) -> Result<Self, StoreError> {
        if endpoints.is_empty() {
            return Err(invalid("no etcd endpoints given"));
        }
        let tls = options.tls(endpoints)?;
        let base = || {
            let mut connect = ConnectOptions::new()
                .with_connect_timeout(CONNECT_TIMEOUT)
                .with_timeout(REQUEST_TIMEOUT)
                .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
                .with_keep_alive_while_idle(false);
            if let Some(tls) = &tls {
                connect = connect.with_tls(tls.clone());
            }
            connect
        };
        let with_user = match (&options.user, &options.password) {
            (Some(user), Some(password)) => Some(
                base()
                    .with_user(user.clone(), password.clone())
                    .with_auto_token_refresh(true),
            ),
            _ => None,
        };
        let client = match with_user {
            None => Self::connect_client(endpoints, base()).await?,
            Some(connect) => match Self::connect_client(endpoints, connect).await {
                Err(e) if is_auth_not_enabled(&e) => {
                    warn!(
                        user = options.user.as_deref().unwrap_or_default(),
                        "etcd has authentication disabled: connecting without --etcd-user"
                    );
                    Self::connect_client(endpoints, base()).await?
                }
                Err(StoreError::AccessDenied(m)) => {
                    return Err(StoreError::AccessDenied(format!(
                        "etcd user {:?} (--etcd-user, --etcd-password): {m}",
                        options.user.as_deref().unwrap_or_default()
                    )))
                }
                other => other?,
            },
        };
        let alive = Arc::new(());
        if endpoints.len() > 1 {
            let mut probes = Vec::new();
            for endpoint in endpoints {
                let mut options = ConnectOptions::new()
                    .with_connect_timeout(MEMBER_PROBE_TIMEOUT)
                    .with_timeout(MEMBER_PROBE_TIMEOUT);
                if let Some(tls) = &tls {
                    options = options.with_tls(tls.clone());
                }
                let probe = within(
                    CONNECT_TIMEOUT,
                    "connect",
                    Client::connect([endpoint], Some(options)),
                )
                .await?;
                // As etcd-client names it in the balanced channel (scheme included).
                let url = match (endpoint.contains("://"), &tls) {
                    (true, _) => endpoint.clone(),
                    (false, Some(_)) => format!("https://{endpoint}"),
                    (false, None) => format!("http://{endpoint}"),
                };
                probes.push((url, probe));
            }
            tokio::spawn(member_health(
                client.clone(),
                probes,
                Arc::downgrade(&alive),
            ));
        }
        Ok(EtcdStore {
            client,
            tries: unsent_tries(endpoints.len()),
            _alive: alive,
        })
    }

    /// Makes one TLS handshake with every https endpoint, as the client would, and returns
    /// [`StoreError::AccessDenied`] with etcd's or our verifier's reason when it fails over
    /// certificates. Unreachable endpoints and plaintext options pass: other requests report
    /// those.
    pub async fn check_tls(endpoints: &[String], options: &EtcdOptions) -> Result<(), StoreError> {
        let Some(config) = options.rustls_config()? else {
            return Ok(());
        };
        for endpoint in endpoints.iter().filter(|e| e.starts_with("https://")) {
            let uri: tonic::codegen::http::Uri = endpoint
                .parse()
                .map_err(|e| invalid(format!("etcd endpoint {endpoint}: {e}")))?;
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(2379);
            let config = config.clone();
            let refusal = tokio::task::spawn_blocking(move || tls_refusal(&host, port, config))
                .await
                .map_err(|e| StoreError::Other(format!("TLS check of {endpoint}: {e}")))?;
            if let Some(why) = refusal {
                return Err(StoreError::AccessDenied(format!(
                    "TLS handshake with etcd {endpoint} failed: {why}"
                )));
            }
        }
        Ok(())
    }

    async fn connect_client(
        endpoints: &[String],
        options: ConnectOptions,
    ) -> Result<Client, StoreError> {
        within(
            REQUEST_TIMEOUT,
            "connect",
            Client::connect(endpoints, Some(options)),
        )
        .await
        .map_err(|e| match e {
            StoreError::Other(m) => StoreError::Other(format!("etcd endpoints {endpoints:?}: {m}")),
            e => e,
        })
    }

    /// The underlying etcd client, for what the [`Store`] trait does not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// Why a TLS connection to `host:port` fails, if it fails over TLS: a direct handshake,
/// then a read of etcd's first answer (see the module notes). Nothing is sent after the
/// handshake: data etcd has not read when it drops us would turn its close into a reset
/// that can discard the alert.
fn tls_refusal(host: &str, port: u16, config: Arc<ClientConfig>) -> Option<String> {
    let name = match ServerName::try_from(host.to_string()) {
        Ok(name) => name,
        Err(e) => return Some(format!("{host:?} is not a valid TLS server name: {e}")),
    };
    let addr = (host, port).to_socket_addrs().ok()?.next()?;
    let mut tcp = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).ok()?;
    tcp.set_read_timeout(Some(REQUEST_TIMEOUT)).ok()?;
    tcp.set_write_timeout(Some(REQUEST_TIMEOUT)).ok()?;
    let mut connection = match ClientConnection::new(config, name) {
        Ok(c) => c,
        Err(e) => return Some(e.to_string()),
    };
    while connection.is_handshaking() {
        if let Err(e) = connection.complete_io(&mut tcp) {
            return tls_error(&e);
        }
    }
    // etcd either sends its HTTP/2 settings or, refusing our certificate, an alert.
    tcp.set_read_timeout(Some(TLS_ANSWER_TIMEOUT)).ok()?;
    let mut tls = StreamOwned::new(connection, tcp);
    let e = tls.read(&mut [0u8; 64]).err()?;
    tls_error(&e)
}

/// How long [`tls_refusal`] waits for etcd's first answer after the handshake.
const TLS_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// The TLS failure inside an I/O error: rustls reports alerts and certificate checks as
/// I/O errors wrapping its own error; anything else (a reset, a timeout) says nothing
/// about TLS.
fn tls_error(e: &std::io::Error) -> Option<String> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map(|tls_error| tls_error.to_string())
}

/// How often, and how patiently, [`member_health`] asks each member for its status.
const MEMBER_PROBE_INTERVAL: Duration = Duration::from_secs(1);
const MEMBER_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Keeps the members that do not answer out of `client`'s balanced channel (see the
/// module notes): asks each member (a client of its own, `probes`) for its status every
/// [`MEMBER_PROBE_INTERVAL`], and removes or adds endpoints as [`members_to_change`] says.
/// Ends when `alive` is gone (the last clone of the store was dropped).
async fn member_health(client: Client, probes: Vec<(String, Client)>, alive: std::sync::Weak<()>) {
    let mut removed = vec![false; probes.len()];
    let mut tick = tokio::time::interval(MEMBER_PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if alive.upgrade().is_none() {
            return;
        }
        let answers = futures::future::join_all(probes.iter().map(|(_, probe)| async move {
            let mut maintenance = probe.maintenance_client();
            answers_status(
                tokio::time::timeout(MEMBER_PROBE_TIMEOUT, maintenance.status())
                    .await
                    .ok(),
            )
        }))
        .await;
        for (i, take_out) in members_to_change(&answers, &removed) {
            let endpoint = &probes[i].0;
            let done = if take_out {
                client.remove_endpoint(endpoint).await
            } else {
                client.add_endpoint(endpoint).await
            };
            match done {
                Ok(()) if take_out => {
                    warn!(endpoint = %endpoint, timeout = ?MEMBER_PROBE_TIMEOUT, "etcd member does not answer; sending requests to the others until it does");
                }
                Ok(()) => {
                    info!(endpoint = %endpoint, "etcd member answers again; sending it requests")
                }
                Err(e) => {
                    warn!(endpoint = %endpoint, error = %e, "cannot change the etcd endpoints in use");
                    continue;
                }
            }
            removed[i] = take_out;
        }
    }
}

/// Whether a status probe got an answer from the member: any answer but a timeout or a
/// failed connection (an error status from etcd itself, say for missing credentials,
/// is an answer too).
fn answers_status<T>(probe: Option<Result<T, etcd_client::Error>>) -> bool {
    match probe {
        None => false,
        Some(Ok(_)) => true,
        Some(Err(etcd_client::Error::GRpcStatus(s))) => !matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
        ),
        Some(Err(_)) => false,
    }
}

/// Which endpoints to take out (`true`) of the balanced channel or put back (`false`),
/// given which members answered and which are out now. Members that answer are always
/// in; the others are out, unless none answers: then every endpoint goes back in, so that
/// requests find whichever member comes back first.
fn members_to_change(answered: &[bool], removed: &[bool]) -> Vec<(usize, bool)> {
    let none = !answered.iter().any(|&a| a);
    answered
        .iter()
        .zip(removed)
        .enumerate()
        .filter_map(|(i, (&answers, &out))| {
            let want_out = !answers && !none;
            (want_out != out).then_some((i, want_out))
        })
        .collect()
}

/// Tries for a request that fails before being sent: one with a single endpoint (nothing
/// else to pick), else four per endpoint, so that a random pick misses a dead member with
/// near certainty while all members down still fails within milliseconds.
fn unsent_tries(endpoints: usize) -> usize {
    if endpoints <= 1 {
        1
    } else {
        4 * endpoints
    }
}

/// Pause between tries of a request that was never sent.
const UNSENT_RETRY_PAUSE: Duration = Duration::from_millis(5);

/// Runs one etcd request made by `request` under `limit`, trying it up to `tries` times
/// while it fails before being sent (see the module notes), and maps its error; `lease`
/// as for [`within_lease`].
async fn request<T, F, Fut>(
    tries: usize,
    limit: Duration,
    what: &str,
    lease: Option<LeaseId>,
    mut request: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut tried = 0;
    loop {
        tried += 1;
        match tokio::time::timeout_at(deadline, request()).await {
            Ok(Err(e)) if tried < tries && never_sent(&e) => {
                tokio::time::sleep(UNSENT_RETRY_PAUSE).await;
            }
            Ok(result) => return result.map_err(|e| store_error(e, lease)),
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "etcd {what} timed out after {limit:?}"
                )))
            }
        }
    }
}

/// Whether a request failed before it left: no connection to the endpoint it was given
/// (tonic's `ConnectError` behind an `Unavailable` status).
fn never_sent(e: &etcd_client::Error) -> bool {
    use std::error::Error as _;
    let etcd_client::Error::GRpcStatus(status) = e else {
        return false;
    };
    if status.code() != Code::Unavailable {
        return false;
    }
    let mut source = status.source();
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Runs one etcd request under `limit`, mapping its error.
async fn within<T>(
    limit: Duration,
    what: &str,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    within_lease(limit, what, None, request).await
}

/// Like [`within`], for requests naming a lease (so "lease not found" maps to
/// [`StoreError::LeaseNotFound`]).
async fn within_lease<T>(
    limit: Duration,
    what: &str,
    lease: Option<LeaseId>,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, request).await {
        Ok(result) => result.map_err(|e| store_error(e, lease)),
        Err(_) => Err(StoreError::Unavailable(format!(
            "etcd {what} timed out after {limit:?}"
        ))),
    }
}

fn is_lease_not_found(message: &str) -> bool {
    message.contains("lease not found")
}

/// etcd's answers to missing, wrong or insufficient credentials. Most come with their own
/// status code, but a few share `InvalidArgument`/`FailedPrecondition` with other errors.
fn is_access_denied(code: Code, message: &str) -> bool {
    matches!(code, Code::Unauthenticated | Code::PermissionDenied)
        || [
            "authentication failed",
            "user name is empty",
            "user name not found",
            "permission denied",
            "invalid auth token",
        ]
        .iter()
        .any(|m| message.contains(m))
}

/// Maps an etcd-client error: unreachable etcd -> `Unavailable`, a missing lease ->
/// `LeaseNotFound` (when the request named one), anything else -> `Other` with the message.
fn store_error(e: etcd_client::Error, lease: Option<LeaseId>) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(status) => {
            let message = status.message();
            match (status.code(), lease) {
                (Code::NotFound, Some(id)) if is_lease_not_found(message) => {
                    StoreError::LeaseNotFound(id)
                }
                (code, _) if is_access_denied(code, message) => {
                    StoreError::AccessDenied(message.to_string())
                }
                (
                    Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Cancelled
                    | Code::Aborted
                    | Code::Unknown,
                    _,
                ) if status.code() != Code::Unknown
                    || message.contains("transport")
                    || message.contains("connect") =>
                {
                    // Connection-level failures (Unknown with the transport's text among
                    // them) carry what went wrong in their sources only.
                    connection_error(&transport_detail(&status))
                }
                (code, _) => StoreError::Other(format!("etcd: {message} ({code:?})")),
            }
        }
        E::LeaseKeepAliveError(m) if is_lease_not_found(&m) => match lease {
            Some(id) => StoreError::LeaseNotFound(id),
            None => StoreError::Other(format!("etcd: {m}")),
        },
        E::TransportError(e) => connection_error(&format!("transport: {}", error_chain(&e))),
        E::IoError(e) => StoreError::Unavailable(format!("etcd i/o: {e}")),
        // Stream plumbing errors: the stream to etcd broke.
        E::LeaseKeepAliveError(m) | E::WatchError(m) => {
            StoreError::Unavailable(format!("etcd stream: {m}"))
        }
        other => StoreError::Other(format!("etcd: {other}")),
    }
}

/// A status's message and the sources behind it (tonic keeps the transport error there).
fn transport_detail(status: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut text = status.message().to_string();
    if let Some(source) = status.source() {
        let more = error_chain(source);
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
    }
    text
}

/// A failed connection: a TLS handshake that failed over certificates is a setup problem
/// (wrong CA, missing or untrusted client certificate) that retrying does not fix, so it
/// is [`StoreError::AccessDenied`]; anything else is [`StoreError::Unavailable`].
fn connection_error(detail: &str) -> StoreError {
    let lower = detail.to_ascii_lowercase();
    if lower.contains("certificate") || lower.contains("fatal alert") {
        StoreError::AccessDenied(format!("TLS handshake with etcd failed: {detail}"))
    } else {
        StoreError::Unavailable(format!("etcd: {detail}"))
    }
}

fn key_value(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<i64, StoreError> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| StoreError::Other("etcd response without a header".into()))
}

fn put_options(lease: LeaseId) -> Option<PutOptions> {
    (lease != 0).then(|| PutOptions::new().with_lease(lease))
}

/// Whole seconds, rounded up, at least 1 (etcd's lease TTL unit).
fn ttl_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    secs.clamp(1, i64::MAX as u64) as i64
}

fn seconds(ttl: i64) -> Duration {
    Duration::from_secs(ttl.max(0) as u64)
}

impl EtcdStore {
    /// Runs a one-comparison transaction whose success branch is `then`.
    async fn txn(
        &self,
        compare: Compare,
        then: TxnOp,
        lease: Option<LeaseId>,
    ) -> Result<etcd_client::TxnResponse, StoreError> {
        let txn = Txn::new().when([compare]).and_then([then]);
        let kv = self.client.kv_client();
        request(self.tries, REQUEST_TIMEOUT, "txn", lease, || {
            let (mut kv, txn) = (kv.clone(), txn.clone());
            async move { kv.txn(txn).await }
        })
        .await
    }
}

/// What one etcd watch response means for our stream.
enum WatchStep {
    /// Nothing for the caller (the "created" acknowledgement).
    Skip,
    Batch(WatchBatch),
    /// The watch is over; the error is the last item.
    End(StoreError),
}

fn watch_step(resp: &WatchResponse, requested: i64) -> WatchStep {
    if resp.compact_revision() > 0 {
        return WatchStep::End(StoreError::Compacted {
            requested,
            compact_revision: resp.compact_revision(),
        });
    }
    if resp.canceled() {
        let reason = match resp.cancel_reason() {
            "" => "no reason given",
            r => r,
        };
        if is_access_denied(Code::Unknown, reason) {
            return WatchStep::End(StoreError::AccessDenied(format!(
                "etcd canceled the watch: {reason}"
            )));
        }
        return WatchStep::End(StoreError::Unavailable(format!(
            "etcd canceled the watch: {reason}"
        )));
    }
    if resp.created() && resp.events().is_empty() {
        return WatchStep::Skip;
    }
    let events = resp
        .events()
        .iter()
        .filter_map(|event| {
            let kv = event.kv()?;
            Some(match event.event_type() {
                EventType::Put => StoreEvent::Put(key_value(kv)),
                EventType::Delete => StoreEvent::Delete {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    revision: kv.mod_revision(),
                },
            })
        })
        .collect::<Vec<_>>();
    let header = resp.header().map(|h| h.revision()).unwrap_or_default();
    let revision = events
        .iter()
        .map(StoreEvent::revision)
        .fold(header, i64::max);
    WatchStep::Batch(WatchBatch { events, revision })
}

/// The state of one watch stream: the etcd stream (dropping it cancels the etcd watch) and
/// an answer already read while waiting for "created".
struct WatchState {
    etcd: etcd_client::WatchStream,
    requested: i64,
    first: Option<WatchStep>,
}

async fn next_watch_item(
    state: Option<WatchState>,
) -> Option<(Result<WatchBatch, StoreError>, Option<WatchState>)> {
    // `None` once the stream yielded its final error.
    let mut state = state?;
    let mut step = state.first.take();
    loop {
        let current = match step.take() {
            Some(s) => s,
            None => match state.etcd.message().await {
                Ok(Some(resp)) => watch_step(&resp, state.requested),
                Ok(None) => WatchStep::End(StoreError::Unavailable(
                    "etcd closed the watch stream".into(),
                )),
                Err(e) => WatchStep::End(StoreError::Unavailable(format!(
                    "etcd watch stream broke: {e}"
                ))),
            },
        };
        match current {
            WatchStep::Skip => continue,
            WatchStep::Batch(batch) => return Some((Ok(batch), Some(state))),
            WatchStep::End(e) => return Some((Err(e), None)),
        }
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let kv = self.client.kv_client();
        let resp = request(self.tries, REQUEST_TIMEOUT, "get", None, || {
            let mut kv = kv.clone();
            async move { kv.get(key, None).await }
        })
        .await?;
        Ok(resp.kvs().first().map(key_value))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let kv = self.client.kv_client();
        let resp = request(self.tries, REQUEST_TIMEOUT, "list", None, || {
            let mut kv = kv.clone();
            async move { kv.get(prefix, Some(GetOptions::new().with_prefix())).await }
        })
        .await?;
        let revision = header_revision(resp.header())?;
        // etcd returns a range sorted by key already.
        Ok((resp.kvs().iter().map(key_value).collect(), revision))
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<i64, StoreError> {
        let kv = self.client.kv_client();
        let resp = request(self.tries, REQUEST_TIMEOUT, "put", None, || {
            let (mut kv, value) = (kv.clone(), value.clone());
            async move { kv.put(key, value, None).await }
        })
        .await?;
        header_revision(resp.header())
    }

    async fn create(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<Written, StoreError> {
        // Expected revision 0 is "only if absent".
        self.update(key, value, 0, lease).await
    }

    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected_mod_revision: i64,
        lease: LeaseId,
    ) -> Result<Written, StoreError> {
        let compare = if expected_mod_revision == 0 {
            Compare::create_revision(key, CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key, CompareOp::Equal, expected_mod_revision)
        };
        let resp = self
            .txn(
                compare,
                TxnOp::put(key, value, put_options(lease)),
                Some(lease),
            )
            .await?;
        if !resp.succeeded() {
            return Ok(Written::Conflict);
        }
        Ok(Written::Yes(header_revision(resp.header())?))
    }

    async fn delete(
        &self,
        key: &str,
        expected_mod_revision: Option<i64>,
    ) -> Result<Written, StoreError> {
        let Some(expected) = expected_mod_revision else {
            let kv = self.client.kv_client();
            let resp = request(self.tries, REQUEST_TIMEOUT, "delete", None, || {
                let mut kv = kv.clone();
                async move { kv.delete(key, None).await }
            })
            .await?;
            if resp.deleted() == 0 {
                return Ok(Written::Conflict);
            }
            return Ok(Written::Yes(header_revision(resp.header())?));
        };
        let resp = self
            .txn(
                Compare::mod_revision(key, CompareOp::Equal, expected),
                TxnOp::delete(key, None::<DeleteOptions>),
                None,
            )
            .await?;
        // `expected` 0 matches a missing key: then nothing was deleted, which is a conflict too.
        let deleted: i64 = resp
            .op_responses()
            .iter()
            .map(|r| match r {
                TxnOpResponse::Delete(d) => d.deleted(),
                _ => 0,
            })
            .sum();
        if !resp.succeeded() || deleted == 0 {
            return Ok(Written::Conflict);
        }
        Ok(Written::Yes(header_revision(resp.header())?))
    }

    async fn txn(
        &self,
        conditions: Vec<Condition>,
        writes: Vec<TxnWrite>,
    ) -> Result<Written, StoreError> {
        let compares: Vec<Compare> = conditions
            .into_iter()
            .map(|c| match c {
                Condition::CreateRevision(key, r) => {
                    Compare::create_revision(key, CompareOp::Equal, r)
                }
                Condition::ModRevision(key, r) => Compare::mod_revision(key, CompareOp::Equal, r),
            })
            .collect();
        // The lease a "lease not found" answer is about (one per transaction in practice).
        let lease = writes.iter().find_map(|w| match w {
            TxnWrite::Put { lease, .. } if *lease != 0 => Some(*lease),
            _ => None,
        });
        let ops: Vec<TxnOp> = writes
            .into_iter()
            .map(|w| match w {
                TxnWrite::Put { key, value, lease } => TxnOp::put(key, value, put_options(lease)),
                TxnWrite::Delete { key } => TxnOp::delete(key, None::<DeleteOptions>),
            })
            .collect();
        let txn = Txn::new().when(compares).and_then(ops);
        let kv = self.client.kv_client();
        let resp = request(self.tries, REQUEST_TIMEOUT, "txn", lease, || {
            let (mut kv, txn) = (kv.clone(), txn.clone());
            async move { kv.txn(txn).await }
        })
        .await?;
        if !resp.succeeded() {
            return Ok(Written::Conflict);
        }
        Ok(Written::Yes(header_revision(resp.header())?))
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let leases = self.client.lease_client();
        let resp = request(self.tries, REQUEST_TIMEOUT, "lease grant", None, || {
            let mut leases = leases.clone();
            async move { leases.grant(ttl_seconds(ttl), None).await }
        })
        .await?;
        if !resp.error().is_empty() {
            return Err(StoreError::Other(format!(
                "etcd lease grant: {}",
                resp.error()
            )));
        }
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let leases = self.client.lease_client();
        let id = Some(lease);
        // Sends the first keepalive and fails with "lease not found" when its TTL is 0.
        let (mut keeper, mut responses) =
            request(self.tries, REQUEST_TIMEOUT, "lease keepalive", id, || {
                let mut leases = leases.clone();
                async move { leases.keep_alive(lease).await }
            })
            .await?;
        within_lease(REQUEST_TIMEOUT, "lease keepalive", id, keeper.keep_alive()).await?;
        match within_lease(REQUEST_TIMEOUT, "lease keepalive", id, responses.message()).await? {
            Some(resp) if resp.ttl() > 0 => Ok(seconds(resp.ttl())),
            Some(_) => Err(StoreError::LeaseNotFound(lease)),
            None => Err(StoreError::Unavailable(
                "etcd closed the lease keepalive stream".into(),
            )),
        }
    }

    async fn time_to_live(&self, lease: LeaseId) -> Result<Option<Duration>, StoreError> {
        let leases = self.client.lease_client();
        match request(
            self.tries,
            REQUEST_TIMEOUT,
            "lease time-to-live",
            Some(lease),
            || {
                let mut leases = leases.clone();
                async move { leases.time_to_live(lease, None).await }
            },
        )
        .await
        {
            // etcd answers -1 for a lease it does not know.
            Ok(resp) if resp.ttl() < 0 => Ok(None),
            Ok(resp) => Ok(Some(seconds(resp.ttl()))),
            Err(StoreError::LeaseNotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let leases = self.client.lease_client();
        match request(
            self.tries,
            REQUEST_TIMEOUT,
            "lease revoke",
            Some(lease),
            || {
                let mut leases = leases.clone();
                async move { leases.revoke(lease).await }
            },
        )
        .await
        {
            Ok(_) | Err(StoreError::LeaseNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn list_leases(&self) -> Result<Vec<LeaseId>, StoreError> {
        let leases = self.client.lease_client();
        let resp = request(self.tries, REQUEST_TIMEOUT, "lease list", None, || {
            let mut leases = leases.clone();
            async move { leases.leases().await }
        })
        .await?;
        Ok(resp.leases().iter().map(|l| l.id()).collect())
    }

    async fn lease_info(&self, lease: LeaseId) -> Result<Option<LeaseInfo>, StoreError> {
        let leases = self.client.lease_client();
        let resp = match request(
            self.tries,
            REQUEST_TIMEOUT,
            "lease time-to-live",
            Some(lease),
            || {
                let mut leases = leases.clone();
                let options = LeaseTimeToLiveOptions::new().with_keys();
                async move { leases.time_to_live(lease, Some(options)).await }
            },
        )
        .await
        {
            Ok(resp) => resp,
            Err(StoreError::LeaseNotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        // etcd answers -1 for a lease it does not know.
        if resp.ttl() < 0 {
            return Ok(None);
        }
        let mut keys: Vec<String> = resp
            .keys()
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        keys.sort();
        Ok(Some(LeaseInfo {
            id: lease,
            granted_ttl: seconds(resp.granted_ttl()),
            remaining: seconds(resp.ttl()),
            keys,
        }))
    }

    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, StoreError> {
        let mut options = WatchOptions::new().with_prefix().with_progress_notify();
        if start_revision > 0 {
            options = options.with_start_revision(start_revision);
        }
        let watches = self.client.watch_client();
        let mut etcd = request(self.tries, REQUEST_TIMEOUT, "watch", None, || {
            let (mut watches, options) = (watches.clone(), options.clone());
            async move { watches.watch(prefix, Some(options)).await }
        })
        .await?;
        // Wait for "created" (or the cancellation that replaces it), see the module notes.
        let first = match within(REQUEST_TIMEOUT, "watch", etcd.message()).await? {
            Some(resp) => watch_step(&resp, start_revision),
            None => {
                return Err(StoreError::Unavailable(
                    "etcd closed the watch stream before it was created".into(),
                ))
            }
        };
        let state = WatchState {
            etcd,
            requested: start_revision,
            first: Some(first),
        };
        Ok(futures::stream::unfold(Some(state), next_watch_item).boxed())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let maintenance = self.client.maintenance_client();
        request(self.tries, PING_TIMEOUT, "status", None, || {
            let mut maintenance = maintenance.clone();
            async move { maintenance.status().await }
        })
        .await
        .map(|_| ())
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        let kv = self.client.kv_client();
        match request(self.tries, REQUEST_TIMEOUT, "compact", None, || {
            let mut kv = kv.clone();
            let options = CompactionOptions::new().with_physical();
            async move { kv.compact(revision, Some(options)).await }
        })
        .await
        {
            Ok(_) => Ok(()),
            // Compacting what is already compacted is a no-op, not a failure.
            Err(StoreError::Other(m)) if m.contains("required revision has been compacted") => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_failed_connection_counts_as_never_sent() {
        let status = |s: tonic::Status| etcd_client::Error::GRpcStatus(s);
        let refused = tonic::Status::from_error(Box::new(tonic::ConnectError(
            "tcp connect error: Connection refused".into(),
        )));
        assert_eq!(refused.code(), Code::Unavailable);
        assert!(never_sent(&status(refused)));
        // Sent, outcome unknown: never repeated.
        for sent in [
            tonic::Status::unavailable("etcdserver: leader changed"),
            tonic::Status::unavailable("connection reset"),
            tonic::Status::cancelled("Timeout expired"),
            tonic::Status::unknown("etcdserver: request timed out"),
        ] {
            assert!(!never_sent(&status(sent)));
        }
        assert_eq!(unsent_tries(1), 1, "one endpoint: nothing else to pick");
    }

    #[test]
    fn members_that_do_not_answer_are_taken_out_but_never_all() {
        // m1 stops answering: out. It answers again: back in.
        assert_eq!(
            members_to_change(&[true, false, true], &[false; 3]),
            [(1, true)]
        );
        assert_eq!(
            members_to_change(&[true, false, true], &[false, true, false]),
            []
        );
        assert_eq!(
            members_to_change(&[true, true, true], &[false, true, false]),
            [(1, false)]
        );
        // Nobody answers: everything back in, whoever returns first gets the requests.
        assert_eq!(
            members_to_change(&[false; 3], &[false, true, false]),
            [(1, false)]
        );
        assert_eq!(members_to_change(&[false; 3], &[false; 3]), []);
        let timeout: Option<Result<(), etcd_client::Error>> = None;
        assert!(!answers_status(timeout));
        let refused =
            etcd_client::Error::GRpcStatus(tonic::Status::unavailable("tcp connect error"));
        assert!(!answers_status::<()>(Some(Err(refused))));
        let denied = etcd_client::Error::GRpcStatus(tonic::Status::permission_denied("no"));
        assert!(
            answers_status::<()>(Some(Err(denied))),
            "an answer, if not a welcome one"
        );
        assert_eq!(unsent_tries(3), 12);
    }

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(ttl_seconds(Duration::from_millis(1)), 1);
        assert_eq!(ttl_seconds(Duration::ZERO), 1);
        assert_eq!(ttl_seconds(Duration::from_secs(2)), 2);
        assert_eq!(ttl_seconds(Duration::from_millis(2001)), 3);
    }

    #[test]
    fn lease_not_found_maps_only_for_lease_requests() {
        let status = || tonic::Status::not_found("etcdserver: requested lease not found");
        assert!(matches!(
            store_error(etcd_client::Error::GRpcStatus(status()), Some(7)),
            StoreError::LeaseNotFound(7)
        ));
        assert!(matches!(
            store_error(etcd_client::Error::GRpcStatus(status()), None),
            StoreError::Other(_)
        ));
        assert!(matches!(
            store_error(
                etcd_client::Error::GRpcStatus(tonic::Status::unavailable("no leader")),
                None
            ),
            StoreError::Unavailable(_)
        ));
    }
}
