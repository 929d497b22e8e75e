//! Dialling the controllers.
//!
//! [`endpoint`] holds the settings every client uses (TLS, `https://` for `http://` URLs
//! under TLS, connect timeout, keepalives). [`Controllers`] is the failover pool of
//! long-running clients (the agent): calls go to the current controller, and a transport
//! failure ([`is_transport_failure`]) moves to the next, so an agent fails over within one
//! connect timeout when a controller dies. Channels are made lazily and reused.

use std::sync::Mutex;
use std::time::Duration;

use crate::tls::Transport;
use tonic::transport::{Channel, Endpoint};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid controller URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot reach any controller ({urls}): {last}")]
    Unreachable { urls: String, last: String },
}

pub struct Controllers {
    endpoints: Vec<Endpoint>,
    current: Mutex<(usize, Option<Channel>)>,
}

impl Controllers {
    /// Plaintext connections (tests, labs with `--insecure`).
    pub fn new(urls: &[String]) -> Result<Self, ClientError> {
        Self::with_transport(urls, &Transport::Insecure)
    }

    /// Connections over `transport` (see [`endpoint`]).
    pub fn with_transport(urls: &[String], transport: &Transport) -> Result<Self, ClientError> {
        let endpoints = urls
            .iter()
            .map(|u| {
                endpoint(u, transport).map(|e| {
                    // Long-lived: HTTP/2 pings find a dead controller between calls.
                    e.http2_keep_alive_interval(Duration::from_secs(5))
                        .keep_alive_timeout(Duration::from_secs(5))
                        .keep_alive_while_idle(true)
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(ClientError::BadUrl {
                url: String::new(),
                reason: "no controller given".into(),
            });
        }
        Ok(Controllers {
            endpoints,
            current: Mutex::new((0, None)),
        })
    }

    pub fn urls(&self) -> String {
        self.endpoints
            .iter()
            .map(|e| e.uri().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A channel to the current controller, connecting (and failing over) if needed.
    pub async fn channel(&self) -> Result<Channel, ClientError> {
        let start = {
            let cur = self.current.lock().expect("lock");
            if let Some(ch) = &cur.1 {
                return Ok(ch.clone());
            }
            cur.0
        };
        let mut last = String::new();
        for i in 0..self.endpoints.len() {
            let idx = (start + i) % self.endpoints.len();
            match self.endpoints[idx].connect().await {
                Ok(ch) => {
                    if i > 0 || self.endpoints.len() > 1 {
                        tracing::info!(controller = %self.endpoints[idx].uri(), "connected to controller");
                    }
                    *self.current.lock().expect("lock") = (idx, Some(ch.clone()));
                    return Ok(ch);
                }
                Err(e) => {
                    last = format!("{}: {}", self.endpoints[idx].uri(), error_chain(&e));
                }
            }
        }
        Err(ClientError::Unreachable {
            urls: self.urls(),
            last,
        })
    }

    /// Drops the current channel after a transport failure; the next call tries the next
    /// controller first.
    pub fn failed(&self) {
        let mut cur = self.current.lock().expect("lock");
        cur.1 = None;
        cur.0 = (cur.0 + 1) % self.endpoints.len();
    }
}

/// The endpoint of one controller URL, with the settings every client uses: under TLS,
/// `http://` is dialled as `https://` with the client certificate; a connect timeout; no
/// Nagle delay.
pub fn endpoint(url: &str, transport: &Transport) -> Result<Endpoint, ClientError> {
    let bad = |url: &str, reason: String| ClientError::BadUrl {
        url: url.to_string(),
        reason,
    };
    let url = match transport {
        Transport::Tls(_) => url.replacen("http://", "https://", 1),
        Transport::Insecure => url.to_string(),
    };
    let mut e = Endpoint::from_shared(url.clone()).map_err(|e| bad(&url, e.to_string()))?;
    if let Transport::Tls(files) = transport {
        let tls = files
            .client_config()
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        e = e.tls_config(tls).map_err(|e| bad(&url, e.to_string()))?;
    }
    Ok(e.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true))
}

/// Whether a status means "this controller could not answer" (the connection broke, or no
/// answer came in time), as opposed to the controller's answer. The one rule of the agent
/// and `overlayctl`: on such a failure the agent moves to the next controller, and
/// `overlayctl` says it lost the controller rather than quoting an answer.
pub fn is_transport_failure(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    )
}

/// An error with its causes, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}
