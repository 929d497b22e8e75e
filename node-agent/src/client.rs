//! The agent's connection to the controller(s).
//!
//! `--controller` may list several controllers. Calls go to the current one; a transport
//! failure moves to the next, so an agent fails over within one connect timeout when a
//! controller dies. Channels are made lazily and reused.

use std::sync::Mutex;
use std::time::Duration;

use overlay_proto::tls::Transport;
use overlay_proto::v1::agent_client::AgentClient;
use tonic::transport::{Channel, Endpoint};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

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

    /// Connections over `transport`: with TLS, `http://` URLs are dialled as `https://`.
    pub fn with_transport(urls: &[String], transport: &Transport) -> Result<Self, ClientError> {
        let tls = match transport {
            Transport::Tls(files) => Some(
                files
                    .client_config()
                    .map_err(|e| ClientError::Tls(e.to_string()))?,
            ),
            Transport::Insecure => None,
        };
        let endpoints = urls
            .iter()
            .map(|u| {
                let u = if tls.is_some() {
                    u.replacen("http://", "https://", 1)
                } else {
                    u.clone()
                };
                let e = Endpoint::from_shared(u.clone()).map_err(|e| ClientError::BadUrl {
                    url: u.clone(),
                    reason: e.to_string(),
                })?;
                match &tls {
                    Some(t) => e.tls_config(t.clone()).map_err(|e| ClientError::BadUrl {
                        url: u.clone(),
                        reason: e.to_string(),
                    }),
                    None => Ok(e),
                }
            })
            .map(|e: Result<Endpoint, ClientError>| {
                e.map(|e| {
                    e.connect_timeout(CONNECT_TIMEOUT)
                        .http2_keep_alive_interval(Duration::from_secs(5))
                        .keep_alive_timeout(Duration::from_secs(5))
                        .keep_alive_while_idle(true)
                        .tcp_nodelay(true)
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

    /// A client for the current controller, connecting (and failing over) as needed.
    pub async fn client(&self) -> Result<AgentClient<Channel>, ClientError> {
        let start = {
            let cur = self.current.lock().expect("lock");
            if let Some(ch) = &cur.1 {
                return Ok(AgentClient::new(ch.clone()));
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
                    return Ok(AgentClient::new(ch));
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

/// Whether a status means "this controller is not there" (as opposed to a real answer).
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
