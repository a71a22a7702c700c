//! The BE side: the receiver on `BATON_HANDOFF_ADDR` that restores offered
//! connections and serves them from the local application; and the FE side of the
//! BE's notices ("closed", "alive").
//!
//! Each accepted connection carries a sequence of messages (see [`super::control`]):
//! an FE's control connection carries the offers and "go"s of all its handoffs to
//! this BE, interleaved; each offer is handled on its own task, and its "go" reaches
//! it by the offer's nonce. A BE's notices arrive on short connections of their own
//! (see [`Handoff::notices`] for why they do not use a control connection).

use super::{
    control::{self, FrameReader, Outgoing, Writer},
    diag, pass, repair,
    wire::{self, Flow, Message, Offer, Refusal},
    Handoff, Notices, ReadError,
};
use crate::proxy::tcp::{self, ForwardMetrics};
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsFd,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, watch},
};

/// How long a new connection may take to send its first message (an idle
/// unauthenticated connection is not kept).
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Offers one control connection may have in flight (restoring or waiting for
/// "go"); more are refused as busy.
const MAX_IN_FLIGHT: usize = 1024;
/// Beyond twice the FE's timeout, how long a restored socket waits for "go".
const GO_GRACE: Duration = Duration::from_millis(500);
/// The longest wait for "ready" an offer may ask for.
const MAX_OFFER_TIMEOUT_MS: u32 = 10_000;
/// How often queued "closed" notices go out.
const NOTICE_EVERY: Duration = Duration::from_millis(100);
/// Connecting to the local application.
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Without sock_diag: how long after a moved connection ends its entries stay (its
/// socket may still be closing: FIN exchange, TIME_WAIT).
const FORGET_AFTER: Duration = Duration::from_secs(60);

impl Handoff {
    /// Accepts handoff control connections on `listener` until `drain` fires. Each
    /// moved connection's task holds a clone of `drain`, so shutdown waits for them
    /// (up to the grace period).
    pub async fn receive(self: Arc<Self>, listener: TcpListener, mut drain: watch::Receiver<bool>) {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = drain.changed() => return,
            };
            match accepted {
                Ok((conn, from)) => {
                    let trusted = match from.ip() {
                        IpAddr::V4(ip) => self.trusted_source(ip),
                        IpAddr::V6(_) => false,
                    };
                    if !trusted {
                        // Not a frontend it accepts nor a peer: not worth a byte.
                        self.metrics().refused.get("source").incr();
                        continue;
                    }
                    let Ok(permit) = self.control.clone().try_acquire_owned() else {
                        self.metrics().refused.get("busy").incr();
                        continue;
                    };
                    control::tune(&conn);
                    let this = self.clone();
                    let drain = drain.clone();
                    tokio::spawn(async move {
                        this.control(conn, from, drain, permit).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "handoff accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn refuse_read(&self, from: SocketAddr, e: &ReadError) {
        if let ReadError::Wire(w) = e {
            self.metrics().refused.get(w.as_str()).incr();
            tracing::warn!(%from, reason = w.as_str(), "refused a handoff message");
        }
    }

    /// Handles one accepted connection: its messages in order until it ends, fails,
    /// or carries a message that is refused (the rest of the stream cannot be
    /// trusted then). Its end fails the handoffs on it that still wait for "go".
    async fn control(
        self: Arc<Self>,
        conn: TcpStream,
        from: SocketAddr,
        mut drain: watch::Receiver<bool>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        self.metrics().control_connections.incr();
        let me = conn.local_addr().ok();
        let (rd, wr) = conn.into_split();
        let (out, rx) = mpsc::unbounded_channel();
        // It closes the connection once this loop and every offer's task are done
        // with it, after their last answers.
        tokio::spawn(control::write_frames(wr, rx, None));
        let waiting = Waiting::new();
        let mut frames = FrameReader::new(rd);
        let key = &self.cfg.key;
        let mut first = true;
        let mut draining = false;
        loop {
            if draining && waiting.is_empty() {
                break; // shutting down, and no handoff on it is in flight
            }
            let next = async {
                if first {
                    tokio::time::timeout(READ_TIMEOUT, frames.next(key))
                        .await
                        .unwrap_or(Ok(None))
                } else {
                    frames.next(key).await
                }
            };
            let env = tokio::select! {
                env = next => env,
                _ = drain.changed(), if !draining => {
                    draining = true;
                    continue;
                }
            };
            first = false;
            let env = match env {
                Ok(Some(env)) => env,
                Ok(None) => break,
                Err(e) => {
                    self.refuse_read(from, &e);
                    break;
                }
            };
            if let Err(e) = self.replay.check(&env, wire::now_ms()) {
                self.refuse_read(from, &ReadError::Wire(e));
                break;
            }
            let nonce = env.nonce;
            match env.msg {
                Message::Offer(offer) => {
                    let go = if waiting.len() >= MAX_IN_FLIGHT {
                        None
                    } else {
                        waiting.wait(nonce)
                    };
                    let Some(go) = go else {
                        self.metrics().offers.incr();
                        self.refuse(&out, from, nonce, offer.flow(), Refusal::Busy);
                        continue;
                    };
                    let this = self.clone();
                    let (out, waiting, drain) = (out.clone(), waiting.clone(), drain.clone());
                    tokio::spawn(async move {
                        let taken = this
                            .take(me, &out, from, nonce, offer, go, &waiting, &drain)
                            .await;
                        drop(out);
                        if let Some(taken) = taken {
                            this.serve_moved(taken, drain).await;
                        }
                    });
                }
                Message::Go(n) => {
                    if !waiting.go(n) {
                        // Its offer gave up waiting (and dropped the restored copy).
                        tracing::debug!(%from, "\"go\" for an offer no longer waiting");
                    }
                }
                // FE role. A notice concerns only the redirects to its sender: a BE ends
                // or keeps the flows it was given, never another BE's, and "alive" never
                // brings back a redirect that is gone.
                Message::Closed(flows) => {
                    // The BE's copies of these moved connections are gone.
                    let IpAddr::V4(be) = from.ip() else { break };
                    match self.cfg.tables.forget_moved_from(&flows, be) {
                        Ok(n) => {
                            self.metrics().closed_applied.add(n as u64);
                            self.ignored(from, "closed", flows.len() - n);
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot remove redirects"),
                    }
                }
                Message::Alive(flows) => {
                    // The BE still serves these: keep their redirects (to it) from expiring.
                    let IpAddr::V4(be) = from.ip() else { break };
                    match self.cfg.tables.refresh_moved(&flows, be) {
                        Ok(n) => self.ignored(from, "alive", flows.len() - n),
                        Err(e) => tracing::warn!(error = %e, "cannot refresh redirects"),
                    }
                }
                Message::Ready(_) | Message::Refused(..) => {
                    self.metrics().refused.get("malformed").incr();
                    tracing::warn!(%from, "unexpected handoff message");
                    break;
                }
            }
        }
        // No "go" comes any more: the offers still waiting for one drop their copies.
        waiting.close();
        drop(permit);
    }

    /// Answers the offer `nonce` with a refusal for `why`.
    fn refuse(&self, out: &Writer, from: SocketAddr, nonce: [u8; 16], flow: Flow, why: Refusal) {
        self.metrics().refused.get(why.as_str()).incr();
        tracing::warn!(%from, client = %flow.client, fe = %flow.local, reason = why.as_str(), "refused a handoff");
        let frame = wire::encode(&self.cfg.key, &wire::envelope(Message::Refused(nonce, why)));
        let _ = out.send(Outgoing {
            frame,
            written: None,
        });
    }

    /// Counts the flows of a notice from `from` that had no redirect to it.
    fn ignored(&self, from: SocketAddr, notice: &'static str, flows: usize) {
        if flows > 0 {
            self.metrics().notices_ignored.add(flows as u64);
            tracing::debug!(%from, notice, flows, "notice about flows not redirected to its sender ignored");
        }
    }

    /// Checks and restores an offered connection and completes the ready/go exchange
    /// (`go` fires when the offer's "go" arrives on the connection, `me`); the restored
    /// socket once "go" came.
    ///
    /// Whether the offer is late is not judged here: comparing its timestamp with this
    /// host's clock would make the handoff depend on the two clocks agreeing within
    /// the FE's timeout (tens of milliseconds). The timestamp only has to be inside
    /// the freshness window [`wire::MAX_SKEW`], which bounds how long nonces are
    /// remembered against replays. Lateness is the FE's timeout's business: an FE that
    /// stopped waiting for "ready" has thawed the connection and proxies it, never
    /// sends "go", and without "go" this side never writes a byte.
    #[allow(clippy::too_many_arguments)]
    async fn take(
        &self,
        me: Option<SocketAddr>,
        out: &Writer,
        from: SocketAddr,
        nonce: [u8; 16],
        offer: Offer,
        mut go: oneshot::Receiver<()>,
        waiting: &Waiting,
        drain: &watch::Receiver<bool>,
    ) -> Option<Taken> {
        let m = self.metrics();
        m.offers.incr();
        let flow = offer.flow();
        // The FE's receiver, and this BE as the FE's redirect will name it.
        let notices = Notices {
            fe: SocketAddrV4::new(*flow.local.ip(), offer.fe_port),
            be: *offer.be.ip(),
        };
        let timeout_ms = offer.timeout_ms.min(MAX_OFFER_TIMEOUT_MS);
        let refuse = |why: Refusal| {
            waiting.forget(nonce);
            self.refuse(out, from, nonce, flow, why);
            None
        };
        let refusal = if !self
            .cfg
            .fe_cidrs
            .iter()
            .any(|n| n.contains(flow.local.ip()))
        {
            Some(Refusal::Cidr)
        } else if me != Some(SocketAddr::V4(offer.be)) {
            Some(Refusal::Target)
        } else if offer.app_port != self.cfg.app_addr.port() {
            Some(Refusal::App)
        } else if *drain.borrow() {
            Some(Refusal::Busy)
        } else {
            None
        };
        if let Some(why) = refusal {
            return refuse(why);
        }
        let t0 = std::time::Instant::now();
        let socket = match repair::restore(&offer.tcp) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot restore the offered socket");
                return refuse(Refusal::Restore);
            }
        };
        let t_restore = t0.elapsed();
        if let Err(e) = self.cfg.tables.deliver(flow) {
            tracing::warn!(error = %e, "cannot install local delivery");
            repair::close_silently(&socket);
            return refuse(Refusal::Table);
        }
        // Restored and reachable: say so, then write nothing before "go".
        let ready = wire::encode(&self.cfg.key, &wire::envelope(Message::Ready(nonce)));
        let wait = Duration::from_millis(2 * u64::from(timeout_ms)) + GO_GRACE;
        let (written, on_wire) = oneshot::channel();
        let queued = out
            .send(Outgoing {
                frame: ready,
                written: Some(written),
            })
            .is_ok();
        tracing::trace!(restore = ?t_restore, ready = ?t0.elapsed(), "offer phases (from the restore)");
        // "go" is the only permission to serve (see `fe`, "The switch decides who
        // serves"): the FE sends it only after its switch, and once switched never
        // takes the connection back. So a control connection that closes, fails or
        // stays silent means "no go", whether or not the FE switched: before its switch
        // the FE serves, after it nobody does (and the client gets a reset), but never
        // both.
        let wait_go = async {
            queued
                && match tokio::time::timeout(wait, &mut go).await {
                    Ok(got) => got.is_ok(),
                    // Gave up; unless "go" arrived in the meantime (it is then in `go`).
                    Err(_) => !waiting.forget(nonce) && go.try_recv().is_ok(),
                }
        };
        // The connection to the local application is opened while "go" travels, not
        // after it: the first response comes a connection setup sooner. Without "go"
        // it is closed unused. It starts once "ready" is on the wire, which it must
        // not delay.
        let app = async {
            let _ = on_wire.await;
            self.open_app().await
        };
        let (got, app) = tokio::join!(wait_go, app);
        if !got {
            waiting.forget(nonce);
            // Leave no trace. Should the FE have switched, the notice removes its
            // redirect, so the client gets a reset rather than silence; should it not
            // have, the notice matches no redirect to this BE and changes nothing.
            m.aborted.incr();
            repair::close_silently(&socket);
            let _ = self.cfg.tables.forget_restored(flow);
            self.notify_closed(flow, notices);
            tracing::debug!(client = %flow.client, "handoff aborted before go");
            return None;
        }
        self.live().insert(flow, notices);
        Some(Taken {
            socket,
            flow,
            data: offer.data,
            app,
        })
    }

    /// Serves a moved connection: the carried bytes, then everything both ways, between
    /// the client and the local application.
    async fn serve_moved(self: Arc<Self>, taken: Taken, _drain: watch::Receiver<bool>) {
        let flow = taken.flow;
        let passed = {
            let _active = self.metrics().active.track();
            self.relay(taken).await
        };
        if !passed && !self.diag.load(Ordering::Acquire) {
            // No destruction notices: forget the flow once its socket has surely gone.
            // (A passed connection lives on in the application: [`Handoff::refresh`]
            // sweeps it once its socket is gone.)
            tokio::time::sleep(FORGET_AFTER).await;
            self.destroyed(flow).await;
        }
    }

    /// The connection to the local application for a moved connection: the
    /// handoff-aware application's Unix socket when there is one and it answers, else
    /// its TCP address.
    async fn open_app(&self) -> Result<App, String> {
        if let Some(path) = &self.cfg.app_pass {
            match pass::connect(path).await {
                Ok(conn) => return Ok(App::Pass(conn)),
                Err(error) => self.pass_failed(&error),
            }
        }
        self.connect_app().await.map(App::Tcp)
    }

    async fn connect_app(&self) -> Result<TcpStream, String> {
        match tokio::time::timeout(APP_CONNECT_TIMEOUT, TcpStream::connect(self.cfg.app_addr)).await
        {
            Ok(Ok(app)) => Ok(app),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".to_string()),
        }
    }

    fn pass_failed(&self, error: &std::io::Error) {
        self.metrics().pass_fallbacks.incr();
        tracing::debug!(%error, "cannot pass a moved connection to the application; relaying it");
    }

    /// Serves a moved connection: passes it to the handoff-aware application, or
    /// relays the carried bytes, then everything both ways, between the client and
    /// the local application. Whether it was passed.
    async fn relay(&self, taken: Taken) -> bool {
        let Taken {
            socket,
            flow,
            data,
            app,
        } = taken;
        let app = match app {
            Ok(App::Pass(mut conn)) => match pass::give(&mut conn, socket.as_fd(), &data).await {
                Ok(()) => {
                    self.metrics().passed.incr();
                    tracing::debug!(client = %flow.client, "moved connection passed to the application");
                    return true;
                }
                Err(pass::GiveError::NotTaken(error)) => {
                    drop(conn);
                    self.pass_failed(&error);
                    self.connect_app().await
                }
                Err(error @ pass::GiveError::InDoubt(_)) => {
                    // The application may serve it: relaying too could answer the
                    // client twice. Its fate is the application's now.
                    self.metrics().pass_in_doubt.incr();
                    tracing::warn!(client = %flow.client, %error, "a moved connection passed to the application was never confirmed; left to it");
                    return true;
                }
            },
            Ok(App::Tcp(app)) => Ok(app),
            Err(error) => Err(error),
        };
        let std: std::net::TcpStream = socket.into();
        let mut client = match TcpStream::from_std(std) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot register a restored socket");
                return false;
            }
        };
        let mut app = match app {
            Ok(app) => app,
            Err(error) => {
                tracing::warn!(app = %self.cfg.app_addr, %error, "local application unreachable for a moved connection");
                let _ = client.write_all(BAD_GATEWAY).await;
                let _ = client.shutdown().await;
                return false;
            }
        };
        let _ = app.set_nodelay(true);
        let metrics = ForwardMetrics::default();
        match tcp::forward(&mut client, &data, &mut app, &metrics).await {
            Ok((up, down)) => {
                tracing::debug!(client = %flow.client, to_app = up, to_client = down, "moved connection done")
            }
            Err(e) => tracing::debug!(client = %flow.client, error = %e, "moved connection ended"),
        }
        false
    }

    /// Takes over the moved connections a backend baton that ran here before left in
    /// the `restored` set (`flows`): those whose socket still exists (passed to the
    /// application, which outlived that baton) are watched and refreshed as if taken
    /// here, their notices going to the frontend at `flow.local`:`fe_port` from `be`
    /// (this host's address on the handoff interface); the others are forgotten at
    /// once, and their frontends told, instead of lingering for
    /// `BATON_HANDOFF_FLOW_TTL`. (kept, gone).
    pub async fn adopt(
        &self,
        flows: Vec<Flow>,
        be: Ipv4Addr,
        fe_port: u16,
    ) -> std::io::Result<(usize, usize)> {
        if flows.is_empty() {
            return Ok((0, 0));
        }
        // Listed first, then checked: a socket destroyed meanwhile has its notice
        // find the flow, and one destroyed before shows up as gone below. If the
        // check fails, they stay listed and the periodic sweep sorts them out.
        {
            let mut live = self.live();
            for &flow in &flows {
                let fe = SocketAddrV4::new(*flow.local.ip(), fe_port);
                live.entry(flow).or_insert(Notices { fe, be });
            }
        }
        let listed = flows.len();
        let gone = tokio::task::spawn_blocking(move || diag::gone(&flows))
            .await
            .map_err(std::io::Error::other)??;
        for &flow in &gone {
            self.destroyed(flow).await;
        }
        Ok((listed - gone.len(), gone.len()))
    }

    /// Whether `flow` is a moved connection this BE serves.
    pub fn is_live(&self, flow: &Flow) -> bool {
        self.live().contains_key(flow)
    }

    /// Records whether sock_diag notices arrive.
    pub fn set_diag(&self, on: bool) {
        self.diag.store(on, Ordering::Release);
    }

    /// The kernel destroyed a socket: if it was a moved connection, remove its local
    /// delivery and tell its FE to remove the redirect.
    pub async fn destroyed(&self, flow: Flow) {
        let Some(notices) = self.live().remove(&flow) else {
            return;
        };
        if let Err(e) = self.cfg.tables.forget_restored(flow) {
            tracing::warn!(error = %e, "cannot remove local delivery");
        }
        self.notify_closed(flow, notices);
    }

    /// Queues the notice that `flow` is gone for its FE; [`Handoff::notices`] sends
    /// the queue in batches, so a churn of short connections costs each FE one
    /// notice connection per batch, not one per connection.
    fn notify_closed(&self, flow: Flow, notices: Notices) {
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        closed.entry(notices).or_default().push(flow);
    }

    /// Sends the queued "closed" notices every `NOTICE_EVERY` (100 ms), batched per FE.
    /// Runs until the process ends.
    ///
    /// Notices keep a short connection of their own per batch rather than riding a
    /// control connection: control connections run FE -> BE and exist only while an
    /// FE hands connections to this BE, but a notice must reach an FE that has none
    /// (it restarted and kept its redirects, or the connection died), so this path
    /// would be needed anyway; and the FE tells whose flows a notice may touch by the
    /// address it comes from, which a connection bound here to the redirect's BE
    /// address gives. Notices are off every handoff's critical path, and batching
    /// makes them one connection per FE per `NOTICE_EVERY` at most.
    pub async fn notices(self: Arc<Self>) {
        loop {
            tokio::time::sleep(NOTICE_EVERY).await;
            let queued =
                std::mem::take(&mut *self.closed.lock().unwrap_or_else(|e| e.into_inner()));
            for (to, flows) in queued {
                for chunk in flows.chunks(wire::MAX_ALIVE) {
                    if self.notify(to, Message::Closed(chunk.to_vec())).await {
                        self.metrics().closed_sent.add(chunk.len() as u64);
                    } else {
                        tracing::info!(fe = %to.fe, flows = chunk.len(), "cannot tell a frontend moved connections closed; its redirects expire on their own");
                    }
                }
            }
        }
    }

    /// Sends `msg` to `to.fe`, from `to.be`: the address the FE's redirects name,
    /// which is how the FE tells which flows are this BE's to refresh or end.
    async fn notify(&self, to: Notices, msg: Message) -> bool {
        let frame = wire::encode(&self.cfg.key, &wire::envelope(msg));
        let sent = tokio::time::timeout(READ_TIMEOUT, async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            // Notices are short connections this side closes first: let the bind
            // reuse ports whose TIME_WAIT is still running.
            socket.set_reuseaddr(true)?;
            socket.bind(SocketAddr::from((to.be, 0)))?;
            let mut c = socket.connect(SocketAddr::V4(to.fe)).await?;
            c.write_all(&frame).await?;
            c.shutdown().await
        })
        .await;
        matches!(sent, Ok(Ok(())))
    }

    /// Checks that every live moved connection still has its socket (sock_diag, see
    /// [`diag::gone`]) and treats those that do not as destroyed: what their lost
    /// destroy notices would have done. How many were gone.
    pub async fn sweep(&self) -> std::io::Result<usize> {
        let flows: Vec<Flow> = self.live().keys().copied().collect();
        if flows.is_empty() {
            return Ok(0);
        }
        let gone = tokio::task::spawn_blocking(move || diag::gone(&flows))
            .await
            .map_err(std::io::Error::other)??;
        for &flow in &gone {
            self.destroyed(flow).await;
        }
        Ok(gone.len())
    }

    /// Keeps the kernel entries of live moved connections from expiring: every third
    /// of `BATON_HANDOFF_FLOW_TTL`, checks that each one's socket still exists
    /// ([`Handoff::sweep`]: a lost destroy notice must not keep a flow alive forever),
    /// then refreshes this BE's local delivery of the rest and tells each FE which of
    /// its redirects are still in use. Runs until the process ends.
    pub async fn refresh(self: Arc<Self>) {
        let every = self.cfg.tables.flow_ttl() / 3;
        loop {
            tokio::time::sleep(every).await;
            match self.sweep().await {
                Ok(0) => {}
                Ok(gone) => {
                    tracing::info!(
                        gone,
                        "moved connections whose socket was gone without a notice forgotten"
                    )
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check moved connections' sockets; refreshing them all")
                }
            }
            let live: Vec<(Flow, Notices)> = self.live().iter().map(|(f, n)| (*f, *n)).collect();
            if live.is_empty() {
                continue;
            }
            let flows: Vec<Flow> = live.iter().map(|(f, _)| *f).collect();
            if let Err(e) = self.cfg.tables.refresh_restored(&flows) {
                tracing::warn!(error = %e, "cannot refresh local delivery");
            }
            let mut by_fe: HashMap<Notices, Vec<Flow>> = HashMap::new();
            for (flow, to) in live {
                by_fe.entry(to).or_default().push(flow);
            }
            for (to, flows) in by_fe {
                for chunk in flows.chunks(wire::MAX_ALIVE) {
                    if !self.notify(to, Message::Alive(chunk.to_vec())).await {
                        tracing::info!(fe = %to.fe, "cannot refresh a frontend's redirects");
                    }
                }
            }
        }
    }
}

/// The offers on one control connection that wait for their "go", by nonce; `None`
/// once the connection has ended (no "go" can come).
#[derive(Clone, Debug)]
struct Waiting(Arc<Mutex<Option<GoSenders>>>);

/// What fires each waiting offer's "go", by nonce.
type GoSenders = HashMap<[u8; 16], oneshot::Sender<()>>;

impl Waiting {
    fn new() -> Self {
        Self(Arc::new(Mutex::new(Some(HashMap::new()))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<GoSenders>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the offer `nonce`: what its "go" fires. `None` if the nonce waits
    /// already (it cannot: the replay check came first) or the connection ended.
    fn wait(&self, nonce: [u8; 16]) -> Option<oneshot::Receiver<()>> {
        let mut g = self.lock();
        let map = g.as_mut()?;
        if map.contains_key(&nonce) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        map.insert(nonce, tx);
        Some(rx)
    }

    /// Delivers the "go" for `nonce`; whether its offer was waiting.
    fn go(&self, nonce: [u8; 16]) -> bool {
        let tx = self.lock().as_mut().and_then(|m| m.remove(&nonce));
        tx.is_some_and(|tx| tx.send(()).is_ok())
    }

    /// Stops waiting for `nonce`; whether it was still waiting.
    fn forget(&self, nonce: [u8; 16]) -> bool {
        self.lock()
            .as_mut()
            .is_some_and(|m| m.remove(&nonce).is_some())
    }

    fn len(&self) -> usize {
        self.lock().as_ref().map_or(0, HashMap::len)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The connection ended: every offer still waiting fails.
    fn close(&self) {
        self.lock().take();
    }
}

/// A moved connection the BE got "go" for: the restored socket, the bytes the FE
/// carried, and the connection to the local application (or why there is none).
struct Taken {
    socket: socket2::Socket,
    flow: Flow,
    data: Vec<u8>,
    app: Result<App, String>,
}

/// The connection to the local application for a moved connection.
enum App {
    /// Its TCP address: the BE relays.
    Tcp(TcpStream),
    /// A handoff-aware application's Unix socket: the BE passes the connection.
    Pass(tokio::net::UnixStream),
}

const BAD_GATEWAY: &[u8] = b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 31\r\nconnection: close\r\nx-baton-error: upstream-refused\r\n\r\nlocal application unreachable\r\n";
