//! gRPC handlers. Each one converts the request, delegates to [`LeaseManager`] or
//! [`Fanout`], and converts the answer. Every unary result goes through [`Api::finish`],
//! the one place where outcomes are counted and errors become `tonic::Status`
//! (`impl From<ControlError> for Status`).
//!
//! `WatchLeases` is served by [`AgentService`] next to the generated server: its answer is
//! a body of gRPC frames the fan-out encoded once for every stream ([`crate::frames`]), so a
//! stream holds no encoding buffer and no copy of any message. Everything else about the
//! call (authorization, rate limit, the request's size limit, status codes) is as for the
//! other calls.

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use overlay_proto::v1::agent_server::AgentServer;
use tonic::codec::{Codec, Streaming};
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;

use futures::{Stream, StreamExt};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use overlay_common::tls::peer_identity;
use overlay_core::lease::{unix_millis, BackendData};
use overlay_core::MacAddr;
use overlay_proto::v1::{self, admin_server::Admin, agent_server::Agent};
use overlay_proto::{backend_from_proto, config_to_proto, lease_to_proto};
use tonic::{Request, Response, Status};

use crate::error::ControlError;
use crate::fanout::Fanout;
use crate::leases::{AcquireRequest, Reservation, LeaseManager};
use crate::limits::RateLimiter;
use crate::metrics::Metrics;

/// Largest request accepted from a client; every field we take is small.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Who may do what.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Plaintext (`--insecure`): every caller may do everything.
    Open,
    /// Mutual TLS: a node's certificate names the only node it may act for; identities in
    /// `admins` may act for any node and make admin calls.
    Mtls { admins: HashSet<String> },
}

#[derive(Clone)]
pub struct Api {
    pub leases: Arc<LeaseManager>,
    pub fanout: Arc<Fanout>,
    pub metrics: Arc<Metrics>,
    pub auth: Auth,
    /// Listing calls (ListLeases, GetConfig, WatchLeases) per node identity.
    pub list_limiter: Arc<RateLimiter>,
    /// Deadline of every unary call (not of the watch stream).
    pub request_timeout: Duration,
}

impl Api {
    fn identity<T>(&self, req: &Request<T>) -> Result<Option<String>, ControlError> {
        match &self.auth {
            Auth::Open => Ok(None),
            Auth::Mtls { .. } => peer_identity(req).map(Some).ok_or_else(|| {
                ControlError::Forbidden("the client certificate carries no identity".into())
            }),
        }
    }

    /// The caller may act for `node`: it is that node, or an admin.
    fn authorize_node<T>(&self, req: &Request<T>, node: &str) -> Result<(), ControlError> {
        match (&self.auth, self.identity(req)?) {
            (Auth::Mtls { admins }, Some(id)) if id != node && !admins.contains(&id) => {
                Err(ControlError::Forbidden(format!(
                    "the certificate of {id:?} may not act for node {node:?}"
                )))
            }
            _ => Ok(()),
        }
    }

    fn authorize_admin<T>(&self, req: &Request<T>, op: &str) -> Result<(), ControlError> {
        match (&self.auth, self.identity(req)?) {
            (Auth::Mtls { admins }, Some(id)) if !admins.contains(&id) => Err(
                ControlError::Forbidden(format!("{op} needs an admin identity; {id:?} is not one")),
            ),
            _ => Ok(()),
        }
    }

    /// Takes a listing call from the caller's bucket. Admins and plaintext clients are not
    /// limited.
    fn rate_limit<T>(&self, req: &Request<T>) -> Result<(), ControlError> {
        match (&self.auth, self.identity(req)?) {
            (Auth::Mtls { admins }, Some(id)) if !admins.contains(&id) => {
                self.list_limiter.check(&id)
            }
            _ => Ok(()),
        }
    }

    /// Runs a unary call's work under `--request-timeout`.
    async fn bounded<T>(
        &self,
        work: impl Future<Output = Result<T, ControlError>>,
    ) -> Result<T, ControlError> {
        tokio::time::timeout(self.request_timeout, work)
            .await
            .unwrap_or(Err(ControlError::Timeout(self.request_timeout)))
    }

    fn finish<T>(&self, op: &str, result: Result<T, ControlError>) -> Result<Response<T>, Status> {
        self.metrics.record(op, &result);
        result.map(Response::new).map_err(Status::from)
    }
}

fn parse_subnet<N: std::str::FromStr + Copy + Into<IpNet>>(
    field: &str,
    text: &str,
) -> Result<N, ControlError> {
    let parsed: N = text.parse().map_err(|_| {
        let what = if std::any::type_name::<N>().ends_with("Ipv6Net") {
            "an IPv6 CIDR"
        } else {
            "a CIDR"
        };
        ControlError::InvalidArgument(format!("{field}: {text:?} is not {what}"))
    })?;
    let net: IpNet = parsed.into();
    if net.addr() != net.network() {
        return Err(ControlError::InvalidArgument(format!(
            "{field}: {text} has host bits set"
        )));
    }
    Ok(parsed)
}

fn parse_prefix(field: &str, text: &str) -> Result<Ipv4Net, ControlError> {
    text.parse::<Ipv4Net>().map(|n| n.trunc()).map_err(|_| {
        ControlError::InvalidArgument(format!("{field}: {text:?} is not an IPv4 CIDR"))
    })
}

fn parse_prefix6(field: &str, text: &str) -> Result<Ipv6Net, ControlError> {
    text.parse::<Ipv6Net>().map(|n| n.trunc()).map_err(|_| {
        ControlError::InvalidArgument(format!("{field}: {text:?} is not an IPv6 CIDR"))
    })
}

/// An optional IPv4 address: the empty string is "none" (a host without one).
fn parse_ip(field: &str, text: &str) -> Result<Option<Ipv4Addr>, ControlError> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        ControlError::InvalidArgument(format!("{field}: {text:?} is not an IPv4 address"))
    })
}

fn parse_ip6(field: &str, text: Option<&str>) -> Result<Option<Ipv6Addr>, ControlError> {
    text.map(|t| {
        t.parse().map_err(|_| {
            ControlError::InvalidArgument(format!("{field}: {t:?} is not an IPv6 address"))
        })
    })
    .transpose()
}

fn parse_mac(field: &str, text: &str) -> Result<MacAddr, ControlError> {
    text.parse()
        .map_err(|e| ControlError::InvalidArgument(format!("{field}: {e}")))
}

impl Api {
    async fn acquire(
        &self,
        r: v1::AcquireLeaseRequest,
    ) -> Result<v1::AcquireLeaseResponse, ControlError> {
        let request = AcquireRequest {
            node: r.node,
            public_ip: parse_ip("public_ip", &r.public_ip)?,
            public_ipv6: parse_ip6("public_ipv6", r.public_ipv6.as_deref())?,
            backend: backend_from_proto(r.backend)
                .map_err(|e| ControlError::InvalidArgument(e.0))?,
            data: BackendData {
                vtep_mac: r
                    .vtep_mac
                    .as_deref()
                    .map(|m| parse_mac("vtep_mac", m))
                    .transpose()?,
                iface: r.iface,
                underlay: r
                    .underlay
                    .as_deref()
                    .map(|u| parse_prefix("underlay", u))
                    .transpose()?,
                underlay_v6: r
                    .underlay_v6
                    .as_deref()
                    .map(|u| parse_prefix6("underlay_v6", u))
                    .transpose()?,
            },
            preferred: r
                .preferred_subnet
                .as_deref()
                .map(|s| parse_subnet::<IpNet>("preferred_subnet", s))
                .transpose()?,
            preferred6: r
                .preferred_ipv6_subnet
                .as_deref()
                .map(|s| parse_subnet::<Ipv6Net>("preferred_ipv6_subnet", s))
                .transpose()?,
        };
        let acquired = self.leases.acquire(&request).await?;
        let expires = acquired
            .ttl
            .map(|t| unix_millis(std::time::SystemTime::now() + t));
        Ok(v1::AcquireLeaseResponse {
            lease: Some(lease_to_proto(&acquired.lease, expires)),
            config: Some(config_to_proto(&acquired.config)),
            ttl_secs: acquired.ttl.map(|t| t.as_secs()).unwrap_or(0),
        })
    }

    async fn list(&self) -> Result<v1::ListLeasesResponse, ControlError> {
        let listing = self.leases.list_all().await?;
        Ok(v1::ListLeasesResponse {
            leases: listing
                .leases
                .iter()
                .map(|l| lease_to_proto(&l.lease, l.expires_at.map(unix_millis)))
                .collect(),
            revision: listing.revision,
            ignored: listing
                .ignored
                .into_iter()
                .map(|i| v1::IgnoredLeaseKey {
                    key: i.key,
                    reason: i.reason.label().to_string(),
                    detail: i.detail,
                })
                .collect(),
        })
    }
}

#[tonic::async_trait]
impl Agent for Api {
    async fn get_config(
        &self,
        req: Request<v1::GetConfigRequest>,
    ) -> Result<Response<v1::GetConfigResponse>, Status> {
        let r = match self.rate_limit(&req) {
            Ok(()) => self.bounded(self.leases.config()).await,
            Err(e) => Err(e),
        }
        .map(|c| v1::GetConfigResponse {
            config: Some(config_to_proto(&c)),
        });
        self.finish("get_config", r)
    }

    async fn acquire_lease(
        &self,
        req: Request<v1::AcquireLeaseRequest>,
    ) -> Result<Response<v1::AcquireLeaseResponse>, Status> {
        let r = match self.authorize_node(&req, &req.get_ref().node) {
            Ok(()) => self.bounded(self.acquire(req.into_inner())).await,
            Err(e) => Err(e),
        };
        self.finish("acquire", r)
    }

    async fn renew_lease(
        &self,
        req: Request<v1::RenewLeaseRequest>,
    ) -> Result<Response<v1::RenewLeaseResponse>, Status> {
        let allowed = self.authorize_node(&req, &req.get_ref().node);
        let r = req.into_inner();
        let result = self
            .bounded(async {
                allowed?;
                let ttl = self
                    .leases
                    .renew(&r.node, parse_subnet("subnet", &r.subnet)?)
                    .await?;
                Ok(v1::RenewLeaseResponse {
                    ttl_secs: ttl.map(|t| t.as_secs()).unwrap_or(0),
                })
            })
            .await;
        self.finish("renew", result)
    }

    async fn release_lease(
        &self,
        req: Request<v1::ReleaseLeaseRequest>,
    ) -> Result<Response<v1::ReleaseLeaseResponse>, Status> {
        let allowed = self.authorize_node(&req, &req.get_ref().node);
        let r = req.into_inner();
        let result = self
            .bounded(async {
                allowed?;
                self.leases
                    .release(&r.node, parse_subnet("subnet", &r.subnet)?)
                    .await?;
                Ok(v1::ReleaseLeaseResponse {})
            })
            .await;
        self.finish("release", result)
    }

    async fn list_leases(
        &self,
        req: Request<v1::ListLeasesRequest>,
    ) -> Result<Response<v1::ListLeasesResponse>, Status> {
        let r = match self.rate_limit(&req) {
            Ok(()) => self.bounded(self.list()).await,
            Err(e) => Err(e),
        };
        self.finish("list", r)
    }

    type WatchLeasesStream =
        Pin<Box<dyn Stream<Item = Result<v1::WatchLeasesResponse, Status>> + Send>>;

    async fn watch_leases(
        &self,
        req: Request<v1::WatchLeasesRequest>,
    ) -> Result<Response<Self::WatchLeasesStream>, Status> {
        if !self.fanout.is_synced() {
            return Err(Status::unavailable(
                "the controller has not loaded the leases from etcd yet",
            ));
        }
        self.rate_limit(&req)?;
        let after = req.into_inner().after_revision;
        if after < 0 {
            return Err(ControlError::InvalidArgument(format!(
                "after_revision: {after} is negative"
            ))
            .into());
        }
        let stream: Self::WatchLeasesStream = Box::pin(self.fanout.subscribe(after).map(Ok));
        Ok(Response::new(stream))
    }
}

#[tonic::async_trait]
impl Admin for Api {
    async fn set_config(
        &self,
        req: Request<v1::SetConfigRequest>,
    ) -> Result<Response<v1::SetConfigResponse>, Status> {
        let allowed = self.authorize_admin(&req, "set config");
        let r = req.into_inner();
        let result = self
            .bounded(async {
                allowed?;
                self.leases.set_config(&r.json, r.force).await
            })
            .await
            .map(|(config, revoked)| v1::SetConfigResponse {
                config: Some(config_to_proto(&config)),
                revoked: revoked.iter().map(|l| l.subnet.to_string()).collect(),
            });
        self.finish("set_config", result)
    }

    async fn reserve_subnet(
        &self,
        req: Request<v1::ReserveSubnetRequest>,
    ) -> Result<Response<v1::ReserveSubnetResponse>, Status> {
        let allowed = self.authorize_admin(&req, "reserve");
        let r = req.into_inner();
        let result = self
            .bounded(async {
                allowed?;
                let reservation = Reservation {
                    subnet: parse_subnet::<IpNet>("subnet", &r.subnet)?,
                    subnet6: r
                        .ipv6_subnet
                        .as_deref()
                        .map(|s| parse_subnet::<Ipv6Net>("ipv6_subnet", s))
                        .transpose()?,
                    node: r.node.clone(),
                    public_ip: parse_ip("public_ip", &r.public_ip)?,
                    public_ipv6: parse_ip6("public_ipv6", r.public_ipv6.as_deref())?,
                };
                let lease = self.leases.reserve(&reservation).await?;
                Ok(v1::ReserveSubnetResponse {
                    lease: Some(lease_to_proto(&lease, None)),
                })
            })
            .await;
        self.finish("reserve", result)
    }

    async fn revoke_lease(
        &self,
        req: Request<v1::RevokeLeaseRequest>,
    ) -> Result<Response<v1::RevokeLeaseResponse>, Status> {
        let allowed = self.authorize_admin(&req, "revoke");
        let result = self
            .bounded(async {
                allowed?;
                let subnet = parse_subnet::<IpNet>("subnet", &req.into_inner().subnet)?;
                self.leases.revoke(subnet).await?;
                Ok(v1::RevokeLeaseResponse {})
            })
            .await;
        self.finish("revoke", result)
    }
}

/// The path of `overlay.v1.Agent/WatchLeases`.
const WATCH_PATH: &str = "/overlay.v1.Agent/WatchLeases";

/// The `overlay.v1.Agent` service: the generated server, except for `WatchLeases`, which is
/// answered with the fan-out's shared frames (see the module notes).
#[derive(Clone)]
pub struct AgentService {
    inner: AgentServer<Api>,
    api: Api,
}

impl AgentService {
    /// Requests up to [`MAX_REQUEST_BYTES`], unary answers up to `max_response` bytes.
    pub fn new(api: Api, max_response: usize) -> Self {
        AgentService {
            inner: AgentServer::new(api.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(max_response),
            api,
        }
    }
}

impl NamedService for AgentService {
    const NAME: &'static str = <AgentServer<Api> as NamedService>::NAME;
}

type BoxResponse =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, Infallible>> + Send>>;

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for AgentService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxResponse;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tonic::codegen::Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path() == WATCH_PATH {
            let api = self.api.clone();
            Box::pin(async move { Ok(api.watch_http(req).await) })
        } else {
            Box::pin(self.inner.call(req))
        }
    }
}

impl Api {
    /// `WatchLeases` as an HTTP exchange: the request decoded as tonic would, the answer a
    /// body of the fan-out's frames, then the OK status; a refusal is a trailers-only
    /// answer with its status.
    async fn watch_http(
        &self,
        req: http::Request<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        match self.open_watch(req).await {
            Ok(frames) => {
                let mut response = http::Response::new(tonic::body::Body::new(WatchBody {
                    frames: Box::pin(frames),
                    done: false,
                }));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/grpc"),
                );
                response
            }
            Err(status) => status.into_http(),
        }
    }

    async fn open_watch(
        &self,
        req: http::Request<tonic::body::Body>,
    ) -> Result<impl futures::Stream<Item = Bytes> + Send + 'static, Status> {
        if req
            .headers()
            .get("grpc-encoding")
            .is_some_and(|e| e.as_bytes() != b"identity")
        {
            return Err(Status::unimplemented(
                "compressed requests are not supported; send them uncompressed",
            ));
        }
        let (parts, body) = req.into_parts();
        let caller = Request::from_parts(
            MetadataMap::from_headers(parts.headers),
            parts.extensions,
            (),
        );
        if !self.fanout.is_synced() {
            return Err(Status::unavailable(
                "the controller has not loaded the leases from etcd yet",
            ));
        }
        self.rate_limit(&caller)?;
        let mut codec =
            tonic_prost::ProstCodec::<v1::WatchLeasesResponse, v1::WatchLeasesRequest>::default();
        let mut messages =
            Streaming::new_request(codec.decoder(), body, None, Some(MAX_REQUEST_BYTES));
        let request = messages
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no WatchLeasesRequest was sent"))?;
        let after = request.after_revision;
        if after < 0 {
            return Err(ControlError::InvalidArgument(format!(
                "after_revision: {after} is negative"
            ))
            .into());
        }
        Ok(self.fanout.subscribe_frames(after))
    }
}

/// The body of a watch answer: the stream's frames, then `grpc-status: 0` when it ends
/// (the controller shuts down).
struct WatchBody {
    frames: Pin<Box<dyn futures::Stream<Item = Bytes> + Send>>,
    done: bool,
}

impl http_body::Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.frames.as_mut().poll_next(cx) {
            Poll::Ready(Some(frame)) => Poll::Ready(Some(Ok(Frame::data(frame)))),
            Poll::Ready(None) => {
                self.done = true;
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
