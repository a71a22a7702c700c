//! The BE side: the receiver on `BATON_HANDOFF_ADDR` that restores offered
//! connections and serves them from the local application; and the FE side of the
//! BE's notices ("closed", "alive").

use super::{
    diag, read_message, repair,
    wire::{self, Envelope, Flow, Message, Offer, Refusal},
    write_message, Handoff, Notices, ReadError,
};
use crate::proxy::tcp::{self, ForwardMetrics};
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// How long a control connection may take to send its message.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
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
                    let _ = conn.set_nodelay(true);
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

    async fn control(
        self: Arc<Self>,
        mut conn: TcpStream,
        from: SocketAddr,
        drain: watch::Receiver<bool>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let key = &self.cfg.key;
        let env = match tokio::time::timeout(READ_TIMEOUT, read_message(&mut conn, key)).await {
            Ok(Ok(env)) => env,
            Ok(Err(e)) => return self.refuse_read(from, &e),
            Err(_) => return,
        };
        if let Err(e) = self.replay.check(&env, wire::now_ms()) {
            return self.refuse_read(from, &ReadError::Wire(e));
        }
        let Envelope { nonce, msg, .. } = env;
        match msg {
            Message::Offer(offer) => {
                // The exchange is done with the control connection either way.
                let taken = self.take(conn, from, nonce, offer, &drain).await;
                if let Some((socket, flow, data)) = taken {
                    drop(permit);
                    self.serve_moved(socket, flow, data, drain).await;
                }
            }
            // FE role. A notice concerns only the redirects to its sender: a BE ends
            // or keeps the flows it was given, never another BE's, and "alive" never
            // brings back a redirect that is gone.
            Message::Closed(flows) => {
                // The BE's copies of these moved connections are gone.
                let IpAddr::V4(be) = from.ip() else { return };
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
                let IpAddr::V4(be) = from.ip() else { return };
                match self.cfg.tables.refresh_moved(&flows, be) {
                    Ok(n) => self.ignored(from, "alive", flows.len() - n),
                    Err(e) => tracing::warn!(error = %e, "cannot refresh redirects"),
                }
            }
            _ => {
                self.metrics().refused.get("malformed").incr();
                tracing::warn!(%from, "unexpected handoff message");
            }
        }
    }

    /// Counts the flows of a notice from `from` that had no redirect to it.
    fn ignored(&self, from: SocketAddr, notice: &'static str, flows: usize) {
        if flows > 0 {
            self.metrics().notices_ignored.add(flows as u64);
            tracing::debug!(%from, notice, flows, "notice about flows not redirected to its sender ignored");
        }
    }

    /// Checks and restores an offered connection and completes the ready/go exchange;
    /// the restored socket once "go" came.
    ///
    /// Whether the offer is late is not judged here: comparing its timestamp with this
    /// host's clock would make the handoff depend on the two clocks agreeing within
    /// the FE's timeout (tens of milliseconds). The timestamp only has to be inside
    /// the freshness window [`wire::MAX_SKEW`], which bounds how long nonces are
    /// remembered against replays. Lateness is the FE's timeout's business: an FE that
    /// stopped waiting for "ready" has thawed the connection and proxies it, never
    /// sends "go", and without "go" this side never writes a byte.
    async fn take(
        &self,
        mut conn: TcpStream,
        from: SocketAddr,
        nonce: [u8; 16],
        offer: Offer,
        drain: &watch::Receiver<bool>,
    ) -> Option<(socket2::Socket, Flow, Vec<u8>)> {
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
            m.refused.get(why.as_str()).incr();
            tracing::warn!(%from, client = %flow.client, fe = %flow.local, reason = why.as_str(), "refused a handoff");
            wire::encode(&self.cfg.key, &wire::envelope(Message::Refused(nonce, why)))
        };
        let me = conn.local_addr().ok();
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
            let _ = write_message(&mut conn, &refuse(why)).await;
            return None;
        }
        let socket = match repair::restore(&offer.tcp) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot restore the offered socket");
                let _ = write_message(&mut conn, &refuse(Refusal::Restore)).await;
                return None;
            }
        };
        if let Err(e) = self.cfg.tables.deliver(flow) {
            tracing::warn!(error = %e, "cannot install local delivery");
            repair::close_silently(&socket);
            let _ = write_message(&mut conn, &refuse(Refusal::Table)).await;
            return None;
        }
        // Restored and reachable: say so, then write nothing before "go".
        let ready = wire::encode(&self.cfg.key, &wire::envelope(Message::Ready(nonce)));
        let wait = Duration::from_millis(2 * u64::from(timeout_ms)) + GO_GRACE;
        let go = async {
            write_message(&mut conn, &ready).await?;
            let env = read_message(&mut conn, &self.cfg.key).await?;
            self.replay.check(&env, wire::now_ms())?;
            Ok::<_, ReadError>(env.msg == Message::Go(nonce))
        };
        // "go" is the only permission to serve (see `fe`, "The switch decides who
        // serves"): the FE sends it only after its switch, and once switched never
        // takes the connection back. So a control connection that closes, fails or
        // stays silent means "no go", whether or not the FE switched: before its switch
        // the FE serves, after it nobody does (and the client gets a reset), but never
        // both.
        if !matches!(tokio::time::timeout(wait, go).await, Ok(Ok(true))) {
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
        Some((socket, flow, offer.data))
    }

    /// Serves a moved connection: the carried bytes, then everything both ways, between
    /// the client and the local application.
    async fn serve_moved(
        self: Arc<Self>,
        socket: socket2::Socket,
        flow: Flow,
        data: Vec<u8>,
        _drain: watch::Receiver<bool>,
    ) {
        {
            let _active = self.metrics().active.track();
            self.relay(socket, flow, &data).await;
        }
        if !self.diag.load(Ordering::Acquire) {
            // No destruction notices: forget the flow once its socket has surely gone.
            tokio::time::sleep(FORGET_AFTER).await;
            self.destroyed(flow).await;
        }
    }

    async fn relay(&self, socket: socket2::Socket, flow: Flow, data: &[u8]) {
        let std: std::net::TcpStream = socket.into();
        let mut client = match TcpStream::from_std(std) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot register a restored socket");
                return;
            }
        };
        let app = tokio::time::timeout(APP_CONNECT_TIMEOUT, TcpStream::connect(self.cfg.app_addr));
        let mut app = match app.await {
            Ok(Ok(app)) => app,
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                tracing::warn!(app = %self.cfg.app_addr, %error, "local application unreachable for a moved connection");
                let _ = client.write_all(BAD_GATEWAY).await;
                let _ = client.shutdown().await;
                return;
            }
        };
        let _ = app.set_nodelay(true);
        let metrics = ForwardMetrics::default();
        match tcp::forward(&mut client, data, &mut app, &metrics).await {
            Ok((up, down)) => {
                tracing::debug!(client = %flow.client, to_app = up, to_client = down, "moved connection done")
            }
            Err(e) => tracing::debug!(client = %flow.client, error = %e, "moved connection ended"),
        }
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

    /// Sends the queued "closed" notices every [`NOTICE_EVERY`], batched per FE.
    /// Runs until the process ends.
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
            write_message(&mut c, &frame).await?;
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

const BAD_GATEWAY: &[u8] = b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 31\r\nconnection: close\r\nx-baton-error: upstream-refused\r\n\r\nlocal application unreachable\r\n";
