//! The FE side: the terminal that hands an eligible request's connection off, and the
//! per-connection [`Takeover`] that lets it.
//!
//! The HTTP server owns the client socket, so the connection layer gives the first
//! request of an HTTP/1 connection a [`Takeover`]: a duplicate of the socket's
//! descriptor, the bytes baton read before the server (the request head and anything
//! after it), and a gate on the server's I/O ([`TakeoverIo`]). The gate records what
//! the server reads beyond those bytes (pipelined requests travel along), holds the
//! server's reads while the socket is frozen, and after a handoff fails every
//! operation, so the server gives the connection up without writing to it.
//!
//! ## The switch decides who serves
//!
//! The nft batch that installs the redirect (the socket is held until then) is the
//! point of no return.
//! Before it, any failure thaws the socket and the FE proxies the request; it then
//! never sends "go", and the BE, which writes nothing before "go", drops its copy
//! unseen. Once the batch is committed the connection is the BE's: the FE never thaws
//! it again, not even when writing "go" fails or times out, because such a write may
//! still have reached the BE, and thawing would let both answer the same request. A BE
//! that did not get "go" drops its copy and sends "closed", which removes the redirect,
//! so the client gets a reset when it next sends, instead of a response from both. So
//! at most one side ever serves: the FE only before the switch, the BE only after "go",
//! and "go" only ever follows the switch.

use super::{
    control::Reply,
    policy::{self, Slot},
    repair,
    wire::{self, Flow, Message, Offer},
    Handoff,
};
use crate::{
    body::Body, new_service::NewService, proxy::headers::keeps_alive, target::Endpoint, Error,
};
use bytes::Bytes;
use futures_util::future::Either;
use http::{header, Method, Request, Response, Version};
use std::{
    future::Future,
    io,
    net::SocketAddrV4,
    os::fd::{AsFd, OwnedFd},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll, Waker},
    time::Instant,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tower_service::Service;

/// Most bytes the gate records beyond what baton read itself.
const MAX_CAPTURE: usize = 64 * 1024;
/// Most request bytes an offer carries (with the unread ones, it stays well inside
/// [`wire::MAX_MESSAGE`]).
const MAX_OFFER_DATA: usize = 128 * 1024;

/// The right to take one HTTP/1 connection away from its server, attached to the
/// connection's first request.
#[derive(Clone, Debug)]
pub struct Takeover(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    flow: Flow,
    gate: Mutex<Gate>,
    taken: AtomicBool,
}

#[derive(Debug, Default)]
struct Gate {
    /// A duplicate of the socket's descriptor, until the first request is decided
    /// (it keeps the socket alive while a handoff works on it).
    fd: Option<OwnedFd>,
    /// What baton read before the server: the first request head and what followed.
    read: Bytes,
    /// Recording what the server reads (until the first request is decided).
    capturing: bool,
    /// The socket is frozen: the server's reads wait.
    frozen: bool,
    /// The connection is gone to a BE: every server operation fails.
    moved: bool,
    captured: Vec<u8>,
    /// The server's read and write waiting on a frozen socket.
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl Takeover {
    /// A takeover of `stream`, accepted for `orig_dst`, whose server will first replay
    /// `read` (the first request head and whatever followed it). `None` for what
    /// cannot move: not IPv4, or a socket whose local address is not the one on the
    /// wire (REDIRECT capture rewrites it, so kernel tables keyed by it would miss).
    pub fn new(stream: &TcpStream, read: Bytes, orig_dst: std::net::SocketAddr) -> Option<Self> {
        let (std::net::SocketAddr::V4(local), std::net::SocketAddr::V4(client)) =
            (stream.local_addr().ok()?, stream.peer_addr().ok()?)
        else {
            return None;
        };
        if std::net::SocketAddr::V4(local) != orig_dst {
            return None;
        }
        let fd = stream.as_fd().try_clone_to_owned().ok()?;
        Some(Self(Arc::new(Shared {
            flow: Flow { client, local },
            gate: Mutex::new(Gate {
                fd: Some(fd),
                read,
                capturing: true,
                ..Gate::default()
            }),
            taken: AtomicBool::new(false),
        })))
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.0.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims the takeover; only the first caller gets `true`.
    fn claim(&self) -> bool {
        !self.0.taken.swap(true, Ordering::AcqRel)
    }

    /// The first request is decided without a handoff: stop recording and let go of
    /// the descriptor and the bytes (a clone may outlive the decision).
    pub fn release(&self) {
        let mut g = self.gate();
        if g.frozen {
            return; // a handoff is in progress; it opens the gate itself
        }
        g.capturing = false;
        g.captured = Vec::new();
        g.read = Bytes::new();
        g.fd = None;
    }

    /// Whether the connection went to a BE (the server's error is expected then).
    pub fn moved(&self) -> bool {
        self.gate().moved
    }

    /// Holds the server's reads and returns the descriptor and everything the server
    /// has not answered: baton's read, then what the server read since.
    fn freeze_gate(&self) -> Option<(OwnedFd, Vec<u8>)> {
        let mut g = self.gate();
        if !g.capturing || g.read.len() + g.captured.len() > MAX_OFFER_DATA {
            return None; // cannot know (or carry) what the server holds
        }
        let fd = g.fd.take()?;
        g.frozen = true;
        let mut data = Vec::with_capacity(g.read.len() + g.captured.len());
        data.extend_from_slice(&g.read);
        data.extend_from_slice(&g.captured);
        g.read = Bytes::new();
        g.captured = Vec::new();
        Some((fd, data))
    }

    fn open_gate(&self) {
        let mut g = self.gate();
        g.frozen = false;
        g.capturing = false;
        for w in [g.reader.take(), g.writer.take()].into_iter().flatten() {
            w.wake();
        }
    }

    fn moved_gate(&self) {
        let mut g = self.gate();
        g.moved = true;
        g.frozen = false;
        // The reader is not woken: it would only learn the connection is gone, and
        // the server finishes the connection through the request's answer instead. A
        // write that waited (an answer given up on) fails now.
        g.reader = None;
        if let Some(w) = g.writer.take() {
            w.wake();
        }
    }
}

/// The client socket as the HTTP server sees it, gated by an optional [`Takeover`].
#[derive(Debug)]
pub struct TakeoverIo {
    stream: TcpStream,
    takeover: Option<Takeover>,
}

impl TakeoverIo {
    /// Wraps `stream`.
    pub fn new(stream: TcpStream, takeover: Option<Takeover>) -> Self {
        Self { stream, takeover }
    }

    /// The socket (once the server is done with it).
    pub fn into_inner(self) -> TcpStream {
        self.stream
    }

    /// Waits until the socket is readable.
    pub async fn readable(&self) -> io::Result<()> {
        self.stream.readable().await
    }

    /// Checks the gate: `Some(result)` answers the operation without touching the
    /// socket. Drops the takeover once it can no longer matter.
    ///
    /// After a move, reads stay pending and writes fail: the server then ends the
    /// connection when it writes the (empty) answer of the handed-off request — after
    /// that request's future has completed, so it is counted like any other.
    fn gated(&mut self, cx: &mut Context<'_>, read: bool) -> Option<Poll<io::Result<()>>> {
        let t = self.takeover.as_ref()?;
        let mut g = t.gate();
        if g.moved {
            return Some(if read {
                Poll::Pending
            } else {
                Poll::Ready(Err(io::Error::other("connection handed off")))
            });
        }
        if g.frozen {
            let slot = if read { &mut g.reader } else { &mut g.writer };
            *slot = Some(cx.waker().clone());
            return Some(Poll::Pending);
        }
        if !g.capturing {
            drop(g);
            self.takeover = None;
        }
        None
    }
}

impl AsyncRead for TakeoverIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(gated) = self.gated(cx, true) {
            return gated;
        }
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let (Some(t), Poll::Ready(Ok(()))) = (&this.takeover, &polled) {
            let mut g = t.gate();
            let new = &buf.filled()[before..];
            if g.capturing && g.captured.len() + new.len() <= MAX_CAPTURE {
                g.captured.extend_from_slice(new);
            } else {
                g.capturing = false;
                g.captured = Vec::new();
            }
        }
        polled
    }
}

impl AsyncWrite for TakeoverIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(gated) = self.gated(cx, false) {
            return gated.map_ok(|()| 0);
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(gated) = self.gated(cx, false) {
            return gated.map_ok(|()| 0);
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(gated) = self.gated(cx, false) {
            return gated;
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(gated) = self.gated(cx, false) {
            return gated;
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Marks the response of a request whose connection was handed off (nothing is
/// written for it: the BE answers).
#[derive(Clone, Copy, Debug)]
pub struct HandedOff;

/// Builds a [`Terminal`] per endpoint over the proxy terminal `N`.
#[derive(Clone, Debug)]
pub struct NewTerminal<N> {
    inner: N,
    handoff: Option<Arc<Handoff>>,
}

impl<N> NewTerminal<N> {
    /// Hands off through `handoff` when it is `Some` (handoff on and permitted).
    pub fn new(inner: N, handoff: Option<Arc<Handoff>>) -> Self {
        Self { inner, handoff }
    }
}

impl<N: NewService<Endpoint>> NewService<Endpoint> for NewTerminal<N> {
    type Service = Terminal<N::Service>;

    fn new_service(&self, ep: Endpoint) -> Self::Service {
        let peer = match (&self.handoff, ep.addr.ip()) {
            // `local` is this pod's own application: nothing to hand off to.
            (Some(h), std::net::IpAddr::V4(ip))
                if !ep.logical.is_local() && h.serves(&ep.logical.service) =>
            {
                h.peer(ip, ep.handoff_port).map(|p| Peer {
                    service: h.policy().service(&ep.logical.service),
                    handoff: h.clone(),
                    addr: p,
                    app_port: ep.addr.port(),
                })
            }
            _ => None,
        };
        Terminal {
            inner: self.inner.new_service(ep),
            peer,
        }
    }
}

/// The endpoint's terminal: hands the connection off when the request and connection
/// allow it and its response is expected to be large enough (see [`super::policy`]),
/// else (and whenever the handoff fails) proxies with `S`.
#[derive(Clone, Debug)]
pub struct Terminal<S> {
    inner: S,
    peer: Option<Peer>,
}

/// Where an endpoint's connections can go.
#[derive(Clone, Debug)]
struct Peer {
    handoff: Arc<Handoff>,
    /// The peer's receiver.
    addr: SocketAddrV4,
    /// The endpoint's (the BE application's) port.
    app_port: u16,
    /// The service's hash in the size policy.
    service: u64,
}

type HandoffFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Error>> + Send>>;

impl<S> Service<Request<Body>> for Terminal<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = Either<Measured<S::Future>, HandoffFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let Some(peer) = &self.peer else {
            return Either::Left(Measured::new(self.inner.call(req), None));
        };
        let policy = peer.handoff.policy();
        // What the response will teach the policy: GET and HEAD responses only (a
        // HEAD's announces its GET's length), of every version and position on the
        // connection, as only the handoff's own cannot be seen.
        let slot =
            (policy.active() && matches!(*req.method(), Method::GET | Method::HEAD)).then(|| {
                let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
                policy.slot(peer.service, target)
            });
        let measure = slot.map(|s| (peer.handoff.clone(), s));
        let Some(takeover) = eligible(&req) else {
            return Either::Left(Measured::new(self.inner.call(req), measure));
        };
        if let Some(slot) = slot {
            if let Err(skip) = policy.decide(slot) {
                takeover.release();
                peer.handoff.metrics().skipped.get(skip.as_str()).incr();
                return Either::Left(Measured::new(self.inner.call(req), measure));
            }
        }
        // The ready service goes into the future, for the fallback.
        let fresh = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, fresh);
        let (handoff, addr, app_port) = (peer.handoff.clone(), peer.addr, peer.app_port);
        Either::Right(Box::pin(async move {
            // On its own task: if this request is abandoned (its deadline passes), the
            // handoff still runs to a clean end — moved, or thawed and released —
            // instead of leaving a frozen socket behind.
            let moved = tokio::spawn(handoff.hand_off(takeover, addr, app_port))
                .await
                .unwrap_or(false);
            if moved {
                let mut rsp = Response::new(Body::Empty);
                rsp.extensions_mut().insert(HandedOff);
                return Ok(rsp);
            }
            Measured::new(ready.call(req), measure).await
        }))
    }
}

pin_project_lite::pin_project! {
    /// A proxied response's future that tells the size policy the response's length.
    pub struct Measured<F> {
        #[pin]
        inner: F,
        measure: Option<(Arc<Handoff>, Slot)>,
    }
}

impl<F> Measured<F> {
    fn new(inner: F, measure: Option<(Arc<Handoff>, Slot)>) -> Self {
        Self { inner, measure }
    }
}

impl<F> Future for Measured<F>
where
    F: Future<Output = Result<Response<Body>, Error>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        if let (Ok(rsp), Some((handoff, slot))) = (&out, this.measure.take()) {
            let length = policy::announced_length(rsp.status(), rsp.headers());
            handoff.policy().observe(slot, length);
        }
        Poll::Ready(out)
    }
}

/// The request's takeover, if the request may be handed off: HTTP/1.x GET or HEAD
/// without a body or upgrade, first on a connection that stays open after it (and
/// claimed here).
///
/// A connection that closes after its one request is proxied: moving it costs a
/// freeze, a round trip and a restore for a single response, which loses to
/// proxying at every object size measured (benches/RESULTS.md, "Handoff mode"). Even
/// for 1 MiB responses the size policy would expect large, handing closing
/// connections off cut the frontend's CPU to 0.3-0.4x of proxying but made p50
/// 1.2-1.7x and, with a backend relaying to nginx, throughput 0.7x (a trial run).
fn eligible(req: &Request<Body>) -> Option<Takeover> {
    let t = req.extensions().get::<Takeover>()?;
    let h = req.headers();
    let ok = matches!(*req.method(), Method::GET | Method::HEAD)
        && matches!(req.version(), Version::HTTP_11 | Version::HTTP_10)
        && keeps_alive(req.version(), h)
        && http_body::Body::is_end_stream(req.body())
        && !h.contains_key(header::TRANSFER_ENCODING)
        && h.get(header::CONTENT_LENGTH).is_none_or(|v| v == "0")
        && !h.contains_key(header::UPGRADE)
        && !h.contains_key(header::EXPECT);
    if !ok {
        t.release();
        return None;
    }
    t.claim().then(|| t.clone())
}

impl Handoff {
    /// Hands `t`'s connection to the baton at `peer` (its application on `app_port`).
    /// `true` once the BE has it; `false` after any failure, with the connection back
    /// as it was.
    pub async fn hand_off(self: Arc<Self>, t: Takeover, peer: SocketAddrV4, app_port: u16) -> bool {
        let m = self.metrics();
        m.attempts.incr();
        let flow = t.0.flow;
        match self.try_hand_off(&t, peer, app_port).await {
            Ok(started) => {
                m.handed_off.incr();
                m.latency.observe(started.elapsed());
                tracing::debug!(client = %flow.client, be = %peer, "connection handed off");
                true
            }
            Err(reason) => {
                m.fallbacks.get(reason).incr();
                tracing::debug!(client = %flow.client, be = %peer, reason, "handoff fell back to proxying");
                t.release();
                false
            }
        }
    }

    async fn try_hand_off(
        self: &Arc<Self>,
        t: &Takeover,
        peer: SocketAddrV4,
        app_port: u16,
    ) -> Result<Instant, &'static str> {
        let m = self.metrics();
        let flow = t.0.flow;
        let tables = &self.cfg.tables;
        // 0. the control connection to the BE, before anything is frozen: opening one
        // (or finding its peer unreachable, or backing off from it) costs the socket
        // nothing.
        // (Bounded inside: a connect that times out counts as a failure there, so an
        // endpoint whose handoff port drops SYNs is backed off from like one that
        // refuses.)
        let control = match self.control_to(peer).await {
            Ok(control) => control,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err("timeout"),
            Err(_) => return Err("unreachable"),
        };
        let Some((owned, mut data)) = t.freeze_gate() else {
            return Err("socket");
        };
        let fd = owned.as_fd();
        // Puts everything back as it was; the request is then proxied.
        // (Released first, so that the client's answer to the thaw's window probe
        // gets through.)
        let thaw = |reason| {
            if let Err(e) = repair::release(fd) {
                tracing::error!(error = %e, client = %flow.client, "cannot release a held socket");
            }
            if let Err(e) = repair::thaw(fd) {
                tracing::error!(error = %e, "cannot thaw a frozen socket");
            }
            t.open_gate();
            Err(reason)
        };
        let t0 = Instant::now();
        // 1. hold: nothing reaches the socket (or draws an RST) while it moves. A
        // socket filter, not an nft element: the redirect below is then the one nft
        // transaction per handoff (see `repair::hold`).
        if let Err(e) = repair::hold(fd) {
            tracing::warn!(error = %e, "cannot hold the flow");
            t.open_gate();
            return Err("socket");
        }
        let started = Instant::now();
        // 2. freeze and dump.
        let (tcp, unread) = match repair::dump(fd) {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "socket cannot move");
                // dump() left the socket thawed.
                let _ = repair::release(fd);
                t.open_gate();
                return Err("socket");
            }
        };
        data.extend_from_slice(&unread);
        let offer = wire::envelope(Message::Offer(Offer {
            tcp,
            fe_port: self.cfg.listen_port,
            be: peer,
            app_port,
            timeout_ms: u32::try_from(self.cfg.timeout.as_millis()).unwrap_or(u32::MAX),
            data,
        }));
        let t_dump = started.elapsed();
        // 3. offer on the control connection to the BE, and wait (bounded) for "ready".
        let frame = wire::encode(&self.cfg.key, &offer);
        let ready = tokio::time::timeout(
            self.cfg.timeout,
            offer_on(&control, peer, offer.nonce, frame),
        )
        .await;
        let t_ready = started.elapsed();
        match ready {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return thaw(reason),
            Err(_) => return thaw("timeout"),
        }
        // Nothing may have reached the socket since the dump: it would not travel.
        if !matches!(repair::unchanged(fd, &tcp, unread.len()), Ok(true)) {
            return thaw("socket");
        }
        // 4. switch: the redirect, one nft transaction, then "go". From its commit on
        // the flow's packets are forwarded at ingress and no longer reach the held
        // socket, which stays until then, so none ever finds the FE's stack without
        // a socket (and draws an RST).
        if let Err(e) = tables.redirect(flow, *peer.ip()) {
            tracing::warn!(error = %e, "cannot install the redirect");
            // A failed batch changed nothing; removing the redirect anyway covers one
            // that was applied but whose acknowledgement went missing. No "go" follows,
            // so the BE never serves.
            let _ = tables.forget_moved(flow);
            return thaw("table");
        }
        // From here on the connection is the BE's, whatever becomes of "go" (see "The
        // switch decides who serves" above). The frozen socket closes without a trace
        // once the server lets go of it (this descriptor closes when `fd`'s owner
        // drops, in repair mode too).
        t.moved_gate();
        let go = wire::encode(&self.cfg.key, &wire::envelope(Message::Go(offer.nonce)));
        let sent = tokio::time::timeout(self.cfg.timeout, control.send(go)).await;
        if !matches!(sent, Ok(true)) {
            // Not thawing: "go" may have arrived all the same. If it did not, the BE
            // drops its copy and its "closed" notice removes the redirect.
            m.go_failed.incr();
            tracing::warn!(client = %flow.client, be = %peer, "cannot send \"go\" after the switch; the backend keeps the connection only if it got it");
        }
        tracing::trace!(
            hold = ?started.duration_since(t0),
            dump = ?t_dump,
            ready = ?t_ready,
            go = ?started.elapsed(),
            "handoff phases (from the freeze)"
        );
        Ok(started)
    }
}

/// Sends the offer `frame` (whose nonce is `nonce`) on `control`, the connection to
/// `peer`, and waits for the answer: `Ok` when it is "ready".
async fn offer_on(
    control: &Arc<super::control::Control>,
    peer: SocketAddrV4,
    nonce: [u8; 16],
    frame: Vec<u8>,
) -> Result<(), &'static str> {
    // A connection that ended, or ends before the answer, fails only the handoffs
    // waiting on it: this one falls back, the next opens a new connection.
    let mut pending = control.offer(nonce, frame).ok_or("disconnected")?;
    match pending.reply().await.ok_or("disconnected")? {
        Reply::Ready => Ok(()),
        Reply::Refused(why) => {
            tracing::info!(be = %peer, reason = why.as_str(), "backend refused the handoff");
            Err("refused")
        }
    }
}
