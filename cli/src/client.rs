//! Connecting to the controller.
//!
//! The connection is made eagerly, with a short timeout, before the first call: a person
//! at a terminal should hear "cannot reach the controller at URL: connection refused"
//! within seconds, not a gRPC status after a long default timeout. With a comma list,
//! the URLs are tried in order and the first that connects is used for every call of
//! this run (controllers are interchangeable: they share one etcd).
//!
//! With `--tls-cert/--tls-key/--tls-ca` the connection is mutual TLS (and `http://` URLs
//! are dialled as `https://`); plaintext needs `--insecure`. The flags are checked only
//! by commands that connect, so `overlayctl certs` works before any certificate exists.

use std::future::Future;
use std::time::Duration;

use anyhow::anyhow;
use overlay_proto::v1::admin_client::AdminClient;
use overlay_proto::v1::agent_client::AgentClient;
use std::sync::OnceLock;

use overlay_common::connect::endpoint;
pub use overlay_common::connect::is_transport_failure;
use overlay_common::flags::TlsArgs;
use overlay_common::tls::Transport;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};

pub const DEFAULT_CONTROLLER: &str = "http://127.0.0.1:7400";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// For unary calls only; a watch runs as long as the controller keeps it open.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

static TLS_FLAGS: OnceLock<TlsArgs> = OnceLock::new();

/// Records the TLS flags for every later [`connect`] (validated when a command connects).
pub fn configure_tls(flags: TlsArgs) {
    let _ = TLS_FLAGS.set(flags);
}

fn transport() -> anyhow::Result<Transport> {
    TLS_FLAGS
        .get()
        .cloned()
        .unwrap_or_default()
        .transport()
        .map_err(|e| anyhow!("{e}"))
}

/// The `--controller` list, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerUrls(Vec<String>);

impl ControllerUrls {
    pub fn urls(&self) -> &[String] {
        &self.0
    }

    /// Just one of the controllers (to ask each in turn).
    pub fn single(url: &str) -> ControllerUrls {
        ControllerUrls(vec![url.to_string()])
    }
}

/// Parses `URL[,URL...]`. A URL without a scheme gets `http://`.
pub fn parse_controllers(text: &str) -> Result<ControllerUrls, String> {
    let mut urls = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let url = if part.contains("://") {
            part.to_string()
        } else {
            format!("http://{part}")
        };
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(format!(
                "{part:?} is not supported: use an http:// or https:// URL"
            ));
        }
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|_| format!("{part:?} is not a URL such as {DEFAULT_CONTROLLER}"))?;
        if endpoint.uri().host().is_none_or(str::is_empty) {
            return Err(format!("{part:?} has no host"));
        }
        urls.push(url);
    }
    if urls.is_empty() {
        return Err(format!("no URL given; write e.g. {DEFAULT_CONTROLLER}"));
    }
    Ok(ControllerUrls(urls))
}

/// A connection to one controller.
pub struct Controller {
    url: String,
    channel: Channel,
}

/// Connects to the first controller of the list that answers.
pub async fn connect(controllers: &ControllerUrls) -> anyhow::Result<Controller> {
    let mut failures = Vec::new();
    let transport = transport()?;
    for url in controllers.urls() {
        let endpoint = endpoint(url, &transport)
            .map_err(|e| anyhow!("{e}"))?
            .tcp_keepalive(Some(Duration::from_secs(30)));
        // connect_timeout bounds the TCP connect; this also bounds the HTTP/2 handshake
        // with a peer that accepts and then says nothing.
        match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
            Ok(Ok(channel)) => {
                return Ok(Controller {
                    url: url.clone(),
                    channel,
                })
            }
            Ok(Err(e)) => failures.push((url.clone(), connect_failure(&e))),
            Err(_) => failures.push((url.clone(), "timed out".to_string())),
        }
    }
    Err(anyhow!(unreachable_message(&failures)))
}

/// `cannot reach the controller at URL: reason`, or for several URLs each with its reason.
pub fn unreachable_message(failures: &[(String, String)]) -> String {
    match failures {
        [(url, why)] => format!("cannot reach the controller at {url}: {why}"),
        _ => {
            let each: Vec<String> = failures
                .iter()
                .map(|(url, why)| format!("{url} ({why})"))
                .collect();
            format!("cannot reach the controller at any of {}", each.join(", "))
        }
    }
}

/// The most specific reason in a connect error's chain: "connection refused" rather than
/// tonic's "transport error".
fn connect_failure(e: &(dyn std::error::Error + 'static)) -> String {
    let mut deepest = e.to_string();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return match io.kind() {
                ConnectionRefused | ConnectionReset | ConnectionAborted | TimedOut
                | HostUnreachable | NetworkUnreachable | AddrNotAvailable | PermissionDenied => {
                    io.kind().to_string()
                }
                BrokenPipe | UnexpectedEof => "the connection was closed".to_string(),
                _ => io.to_string(),
            };
        }
        deepest = c.to_string();
        cause = c.source();
    }
    deepest
}

impl Controller {
    pub fn agent(&self) -> AgentClient<Channel> {
        AgentClient::new(self.channel.clone())
    }

    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
    }

    /// Awaits a unary call, turning a status or a timeout into a one-line error.
    pub async fn call<T>(
        &self,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(self.status_error(&status)),
            Err(_) => Err(anyhow!(
                "the controller at {} did not answer within {}s",
                self.url,
                CALL_TIMEOUT.as_secs()
            )),
        }
    }

    /// A gRPC status as a line: the controller's own message (it names the problem, e.g.
    /// "subnet range exhausted"); with the URL when the failure is not the controller's
    /// answer but the connection, or a server that is not a gRPC server.
    pub fn status_error(&self, status: &Status) -> anyhow::Error {
        status_error(&self.url, status)
    }
}

/// See [`Controller::status_error`].
pub fn status_error(url: &str, status: &Status) -> anyhow::Error {
    let message = if status.message().is_empty() {
        status.code().description().to_string()
    } else {
        status.message().to_string()
    };
    // Statuses made by tonic from a transport failure carry the failure as source;
    // those sent by the controller never do.
    if let Some(cause) = std::error::Error::source(status) {
        return anyhow!("lost the controller at {url}: {}", connect_failure(cause));
    }
    if message.starts_with("grpc-status header missing")
        || message.contains("missing grpc-status trailer")
    {
        return anyhow!("the server at {url} did not answer as an Overlay controller: {message}");
    }
    match status.code() {
        Code::Unavailable => anyhow!("lost the controller at {url}: {message}"),
        Code::Unimplemented => {
            anyhow!("the controller at {url} does not support this call: {message}")
        }
        _ => anyhow!(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_lists() {
        let c = parse_controllers("http://10.0.0.1:7400, ctl-2:7400,").unwrap();
        assert_eq!(c.urls(), ["http://10.0.0.1:7400", "http://ctl-2:7400"]);
        assert!(parse_controllers("").unwrap_err().contains("no URL"));
        assert_eq!(
            parse_controllers("https://c:7400").unwrap().urls(),
            ["https://c:7400"]
        );
        assert!(parse_controllers("ftp://c:7400")
            .unwrap_err()
            .contains("http:// or https://"));
        assert!(parse_controllers("http://").is_err());
        assert!(parse_controllers("http://a b:1").is_err());
    }

    #[test]
    fn unreachable_names_every_url() {
        let one =
            unreachable_message(&[("http://127.0.0.1:7400".into(), "connection refused".into())]);
        assert_eq!(
            one,
            "cannot reach the controller at http://127.0.0.1:7400: connection refused"
        );
        let two = unreachable_message(&[
            ("http://a:1".into(), "connection refused".into()),
            ("http://b:2".into(), "timed out".into()),
        ]);
        assert_eq!(
            two,
            "cannot reach the controller at any of http://a:1 (connection refused), http://b:2 (timed out)"
        );
    }

    #[test]
    fn statuses_keep_the_controllers_message() {
        let url = "http://127.0.0.1:7400";
        let line = |s: Status| format!("{:#}", status_error(url, &s));
        assert_eq!(
            line(Status::resource_exhausted("subnet range exhausted")),
            "subnet range exhausted"
        );
        assert_eq!(
            line(Status::not_found("")),
            "Some requested entity was not found"
        );
        assert_eq!(
            line(Status::unavailable("etcd is unreachable")),
            "lost the controller at http://127.0.0.1:7400: etcd is unreachable"
        );
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            line(Status::from_error(Box::new(refused))),
            "lost the controller at http://127.0.0.1:7400: connection refused"
        );
    }

    #[tokio::test]
    async fn connect_reports_the_refused_url() {
        configure_tls(TlsArgs {
            insecure: true,
            ..Default::default()
        });
        // A port of this process's own that nothing binds.
        let addr = overlay_tests::loopback_addr(overlay_tests::next_port());
        let urls = parse_controllers(&addr).unwrap();
        let err = connect(&urls).await.err().expect("nothing listens there");
        assert_eq!(
            err.to_string(),
            format!("cannot reach the controller at http://{addr}: connection refused")
        );
    }
}
