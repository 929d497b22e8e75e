//! [`Store`] on a real etcd (v3 API, via `etcd-client`).
//!
//! Layout: this file holds the store itself (connecting, the [`Store`] methods);
//! `options.rs` the TLS and authentication options and their checks, `errors.rs` how etcd's
//! and the transport's failures become [`StoreError`]s (and the TLS handshake probe),
//! `members.rs` the members' health checks and the retry of requests never sent,
//! `watch.rs` what each watch response means for the stream.
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

mod errors;
mod members;
mod options;
mod watch;

use errors::*;
use members::*;
pub use options::EtcdOptions;
use options::*;
use watch::*;

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
