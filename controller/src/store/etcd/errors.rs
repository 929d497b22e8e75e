//! etcd's and the transport's failures as [`StoreError`]s, deadlines on requests, and the
//! direct TLS handshake that says why etcd refused a client certificate.

use super::*;

/// An error and all its sources, "a: b: c".
pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
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

pub(super) fn is_auth_not_enabled(e: &StoreError) -> bool {
    matches!(e, StoreError::Other(m) if m.contains("authentication is not enabled"))
}

/// Why a TLS connection to `host:port` fails, if it fails over TLS: a direct handshake,
/// then a read of etcd's first answer (see the module notes). Nothing is sent after the
/// handshake: data etcd has not read when it drops us would turn its close into a reset
/// that can discard the alert.
pub(super) fn tls_refusal(host: &str, port: u16, config: Arc<ClientConfig>) -> Option<String> {
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
pub(super) const TLS_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// The TLS failure inside an I/O error: rustls reports alerts and certificate checks as
/// I/O errors wrapping its own error; anything else (a reset, a timeout) says nothing
/// about TLS.
pub(super) fn tls_error(e: &std::io::Error) -> Option<String> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map(|tls_error| tls_error.to_string())
}

/// Runs one etcd request under `limit`, mapping its error.
pub(super) async fn within<T>(
    limit: Duration,
    what: &str,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    within_lease(limit, what, None, request).await
}

/// Like [`within`], for requests naming a lease (so "lease not found" maps to
/// [`StoreError::LeaseNotFound`]).
pub(super) async fn within_lease<T>(
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

pub(super) fn is_lease_not_found(message: &str) -> bool {
    message.contains("lease not found")
}

/// etcd's answers to missing, wrong or insufficient credentials. Most come with their own
/// status code, but a few share `InvalidArgument`/`FailedPrecondition` with other errors.
pub(super) fn is_access_denied(code: Code, message: &str) -> bool {
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
pub(super) fn store_error(e: etcd_client::Error, lease: Option<LeaseId>) -> StoreError {
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
pub(super) fn transport_detail(status: &tonic::Status) -> String {
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
pub(super) fn connection_error(detail: &str) -> StoreError {
    let lower = detail.to_ascii_lowercase();
    if lower.contains("certificate") || lower.contains("fatal alert") {
        StoreError::AccessDenied(format!("TLS handshake with etcd failed: {detail}"))
    } else {
        StoreError::Unavailable(format!("etcd: {detail}"))
    }
}
