//! The gRPC listener's accept loop: a cap on open connections, TLS handshakes with a
//! timeout, and accepting that never stops on an error.
//!
//! tonic's own TLS accept has neither a handshake timeout nor a connection cap, and on
//! EMFILE it retries `accept` at once, forever: 1100 clients that each sent five bytes of a
//! ClientHello and then nothing used every descriptor of a controller with the common limit
//! of 1024, and locked out every other client, admins included. Here:
//!
//! - At most `max_connections` connections are open, handshaking or established, so the
//!   process keeps descriptors free for etcd and the health endpoint. When the cap is
//!   reached, the connection that has been handshaking longest is closed to make room
//!   (established connections have proven a certificate and are never closed for this);
//!   when every open connection is established, the new one is closed at once.
//! - A handshake that does not finish within `handshake_timeout` is closed.
//! - An `accept` error never ends the loop: a closed-by-peer error is skipped, anything
//!   else (EMFILE, ENFILE, ENOBUFS) backs off 10 ms, doubling up to 1 s, and tries again.
//!
//! The handshaken streams are handed to tonic (`serve_with_incoming`) as [`Conn`]s, which
//! pass on the stream's own connect info: for TLS, tonic's `TlsConnectInfo`, so
//! `Request::peer_certs` (and with it authorization by certificate identity) works as with
//! tonic's built-in TLS.

use overlay_core::backoff::Backoff;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;

const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The listener's limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once, handshaking or established.
    pub max_connections: usize,
    /// How long a client may take to complete the TLS handshake.
    pub handshake_timeout: Duration,
}

/// What turns an accepted TCP connection into the stream tonic serves.
pub trait Handshake: Clone + Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static;
    /// Whether there is a handshake to wait for (and to time out, and to evict).
    const HANDSHAKES: bool;
    fn handshake(&self, tcp: TcpStream) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

/// Plaintext (`--insecure`): the TCP connection as it is.
#[derive(Clone, Copy, Debug)]
pub struct Plaintext;

impl Handshake for Plaintext {
    type Io = TcpStream;
    const HANDSHAKES: bool = false;
    async fn handshake(&self, tcp: TcpStream) -> io::Result<TcpStream> {
        Ok(tcp)
    }
}

impl Handshake for tokio_rustls::TlsAcceptor {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    const HANDSHAKES: bool = true;
    fn handshake(&self, tcp: TcpStream) -> impl Future<Output = io::Result<Self::Io>> + Send {
        self.accept(tcp)
    }
}

/// The connections the cap counts, and the handshakes that may be evicted, oldest first.
#[derive(Default)]
struct GateState {
    open: usize,
    next_id: u64,
    handshaking: BTreeMap<u64, Arc<Notify>>,
}

struct Gate {
    max: usize,
    state: Mutex<GateState>,
    metrics: Arc<Metrics>,
}

/// Why a new connection could not be admitted.
enum Refused {
    /// Every open connection is established.
    Full,
}

impl Gate {
    /// Admits a connection, closing the oldest handshake to make room when at the cap.
    fn admit(self: &Arc<Self>, handshakes: bool) -> Result<Slot, Refused> {
        let mut st = self.state.lock().expect("gate lock");
        if st.open >= self.max {
            // The evicted connection's task closes it and frees its place in a moment;
            // until then the count is over the cap by the evictions in flight.
            let Some((_, evict)) = st.handshaking.pop_first() else {
                return Err(Refused::Full);
            };
            evict.notify_one();
            self.metrics.connection_closed("evicted");
        }
        st.open += 1;
        let id = st.next_id;
        st.next_id += 1;
        let evict = Arc::new(Notify::new());
        if handshakes {
            st.handshaking.insert(id, evict.clone());
        }
        self.metrics.grpc_connections.set(st.open as i64);
        self.metrics
            .tls_handshakes_pending
            .set(st.handshaking.len() as i64);
        Ok(Slot {
            gate: self.clone(),
            id,
            evict,
        })
    }
}

/// A connection's place under the cap, given back on drop.
struct Slot {
    gate: Arc<Gate>,
    id: u64,
    evict: Arc<Notify>,
}

impl Slot {
    /// The handshake is done: the connection can no longer be evicted.
    fn established(&self) {
        let mut st = self.gate.state.lock().expect("gate lock");
        st.handshaking.remove(&self.id);
        self.gate
            .metrics
            .tls_handshakes_pending
            .set(st.handshaking.len() as i64);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.gate.state.lock().expect("gate lock");
        st.open -= 1;
        st.handshaking.remove(&self.id);
        self.gate.metrics.grpc_connections.set(st.open as i64);
        self.gate
            .metrics
            .tls_handshakes_pending
            .set(st.handshaking.len() as i64);
    }
}

/// An established connection, holding its place under the cap until tonic drops it.
pub struct Conn<IO> {
    io: IO,
    _slot: Slot,
}

impl<IO: Connected> Connected for Conn<IO> {
    type ConnectInfo = IO::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The stream of established connections for `serve_with_incoming`. Accepting runs in a
/// task of its own; it stops, closing the listening socket, once the stream is dropped.
pub fn incoming<H: Handshake>(
    listener: TcpListener,
    handshake: H,
    limits: Limits,
    metrics: Arc<Metrics>,
) -> ReceiverStream<Result<Conn<H::Io>, Infallible>> {
    let (tx, rx) = mpsc::channel(64);
    let gate = Arc::new(Gate {
        max: limits.max_connections.max(1),
        state: Mutex::default(),
        metrics,
    });
    tokio::spawn(accept_loop(listener, handshake, limits, gate, tx));
    ReceiverStream::new(rx)
}

/// Errors of one connection that was closed before we took it: skip it and go on.
fn connection_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

async fn accept_loop<H: Handshake>(
    listener: TcpListener,
    handshake: H,
    limits: Limits,
    gate: Arc<Gate>,
    tx: mpsc::Sender<Result<Conn<H::Io>, Infallible>>,
) {
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    let mut failing = 0u64;
    let mut full_warned = false;
    loop {
        let accepted = tokio::select! {
            _ = tx.closed() => return,
            r = listener.accept() => r,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) if connection_gone(&e) => continue,
            Err(e) => {
                // EMFILE and friends: the connection stays in the backlog; try again soon.
                gate.metrics.accept_errors.inc();
                if failing == 0 {
                    warn!(error = %e, "cannot accept gRPC connections; retrying with backoff");
                } else {
                    debug!(error = %e, "accept failed again");
                }
                failing += 1;
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        if failing > 0 {
            info!(errors = failing, "accepting gRPC connections again");
            failing = 0;
            backoff.reset();
        }
        let slot = match gate.admit(H::HANDSHAKES) {
            Ok(slot) => slot,
            Err(Refused::Full) => {
                gate.metrics.connection_closed("over_limit");
                if !full_warned {
                    warn!(
                        max_connections = gate.max,
                        "connection cap reached with every connection established; closing new ones (--max-connections)"
                    );
                    full_warned = true;
                }
                continue;
            }
        };
        full_warned = false;
        let _ = tcp.set_nodelay(true);
        let (handshake, tx) = (handshake.clone(), tx.clone());
        tokio::spawn(async move {
            let evict = slot.evict.clone();
            let done = tokio::select! {
                r = tokio::time::timeout(limits.handshake_timeout, handshake.handshake(tcp)) => r,
                _ = evict.notified() => return,
            };
            let io = match done {
                Ok(Ok(io)) => io,
                Ok(Err(e)) => {
                    debug!(error = %e, "TLS handshake failed");
                    slot.gate.metrics.connection_closed("handshake_failed");
                    return;
                }
                Err(_) => {
                    slot.gate.metrics.connection_closed("handshake_timeout");
                    return;
                }
            };
            slot.established();
            let _ = tx.send(Ok(Conn { io, _slot: slot })).await;
        });
    }
}

/// Connections the kernel may hold for us before `accept` (capped by
/// `net.core.somaxconn`). tokio's `TcpListener::bind` asks for 1024: thousands of agents
/// that start at once then overflow the queue, and their connections are dropped or reset
/// before the accept loop ever sees them.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as
/// `TcpListener::bind` sets, so a restarted controller gets its port back at once).
pub fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// RLIMIT_NOFILE: raises the soft limit to the hard one (as Go's runtime does), and returns
/// the limit now in force, or `None` when it cannot be read.
pub fn raise_fd_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    Some(lim.rlim_cur)
}

/// The connections a process with `fd_limit` descriptors may hold: `requested`, but no
/// more than leaves a quarter of the limit (at least 256) for etcd, the health endpoint,
/// logs and the runtime.
pub fn connection_budget(requested: usize, fd_limit: u64) -> usize {
    let reserve = (fd_limit / 4).max(256);
    let usable = fd_limit.saturating_sub(reserve).max(16);
    requested.min(usize::try_from(usable).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio_stream::StreamExt;

    #[test]
    fn budget_keeps_descriptors_free() {
        assert_eq!(connection_budget(4096, 1024), 768);
        assert_eq!(connection_budget(4096, 65536), 4096);
        assert_eq!(connection_budget(100, 1024), 100);
        assert_eq!(connection_budget(4096, 300), 44);
    }

    fn gate(max: usize) -> Arc<Gate> {
        Arc::new(Gate {
            max,
            state: Mutex::default(),
            metrics: Arc::new(Metrics::new()),
        })
    }

    #[test]
    fn at_the_cap_the_oldest_handshake_makes_room() {
        let g = gate(2);
        let a = g.admit(true).ok().unwrap();
        let b = g.admit(true).ok().unwrap();
        b.established();
        // a is evicted for c; b, established, never is.
        let c = g.admit(true).ok().unwrap();
        let evict = a.evict.clone();
        let evicted = evict.notified();
        tokio::pin!(evicted);
        // notify_one left a permit: the first wait on it completes at once.
        assert!(
            futures::FutureExt::now_or_never(evicted).is_some(),
            "a was not told to go"
        );
        drop(a);
        c.established();
        assert!(matches!(g.admit(true), Err(Refused::Full)));
        drop(b);
        let _d = g.admit(true).ok().unwrap();
        assert_eq!(g.state.lock().unwrap().open, 2);
    }

    #[tokio::test]
    async fn plaintext_connections_over_the_cap_are_closed_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_connections: 2,
            handshake_timeout: Duration::from_secs(10),
        };
        let mut conns = incoming(listener, Plaintext, limits, Arc::new(Metrics::new()));
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let held = [conns.next().await.unwrap(), conns.next().await.unwrap()];
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await;
        assert!(
            matches!(n, Ok(Ok(0)) | Ok(Err(_))),
            "the third connection was not closed: {n:?}"
        );
        drop(held);
    }

    /// A handshake that never finishes, like a client that sends five bytes and stops.
    #[derive(Clone)]
    struct Stall;

    impl Handshake for Stall {
        type Io = TcpStream;
        const HANDSHAKES: bool = true;
        async fn handshake(&self, tcp: TcpStream) -> io::Result<TcpStream> {
            std::future::pending::<()>().await;
            Ok(tcp)
        }
    }

    async fn closed(c: &mut TcpStream) -> bool {
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await;
        matches!(n, Ok(Ok(0)) | Ok(Err(_)))
    }

    #[tokio::test]
    async fn a_stalled_handshake_is_closed_after_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_connections: 8,
            handshake_timeout: Duration::from_millis(200),
        };
        let metrics = Arc::new(Metrics::new());
        let _conns = incoming(listener, Stall, limits, metrics.clone());
        let started = std::time::Instant::now();
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut c).await);
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(metrics
            .encode()
            .contains("grpc_connections_closed_total{reason=\"handshake_timeout\"} 1"));
    }

    #[tokio::test]
    async fn a_new_connection_evicts_the_oldest_stalled_handshake() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_connections: 2,
            handshake_timeout: Duration::from_secs(60),
        };
        let _conns = incoming(listener, Stall, limits, Arc::new(Metrics::new()));
        let mut a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut a).await, "the oldest handshake was not evicted");
    }
}
