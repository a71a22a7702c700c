//! Control connections: one long-lived connection from each FE to each BE receiver it
//! hands connections to, carrying the offers, "ready"s, refusals and "go"s of every
//! handoff between the two, concurrent ones interleaved.
//!
//! Opening a TCP connection per handoff cost a connect, an accept and a handshake
//! round trip on every handoff's critical path (and a TIME_WAIT per handoff on one
//! side). Now the FE opens the connection on its first handoff to a BE, keeps it (TCP
//! keepalive and a user timeout find a peer that vanished), and opens a new one on
//! the next handoff after it failed.
//!
//! A peer that cannot be connected to (no baton runs there, or it is restarting) is
//! not tried again for a while: 1 s after the first failure, doubling up to 30 s. In
//! between, handoffs to it fall back at once (reason `unreachable`) without freezing
//! the socket or sending a SYN, so an endpoint without a baton costs its keep-alive
//! connections nothing. The FE gets the connection before it freezes anything.
//!
//! Multiplexing changes nothing about trust: every message on the connection is a
//! complete authenticated frame (see [`super::wire`]) checked on its own — HMAC,
//! freshness window and nonce cache — exactly as when each connection carried one
//! exchange. A reply is matched to its handoff by the offer's nonce, which it
//! carries; a reply whose nonce matches no handoff waiting on this connection (one
//! that timed out already) is ignored. A message that fails any check ends the
//! connection: the byte stream can no longer be trusted.
//!
//! A connection that ends fails exactly the handoffs waiting on it, on both sides:
//! the FE's fall back to proxying (they have not switched: the switch needs "ready"),
//! and the BE's that said "ready" and wait for "go" are dropped unseen, as when a
//! per-handoff connection closed without "go".

use super::{
    wire::{self, Envelope, Key, Message, Refusal},
    Handoff, ReadError,
};
use bytes::BytesMut;
use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{tcp::OwnedWriteHalf, TcpStream},
    sync::{mpsc, oneshot, Notify},
};

/// Idle time before TCP keepalive probes a control connection.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Between two unanswered keepalive probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes before the connection counts as dead.
const KEEPALIVE_RETRIES: u32 = 3;
/// How long written bytes may stay unacknowledged before the kernel gives the
/// connection up (a BE host that vanished while offers were in flight).
const USER_TIMEOUT: Duration = Duration::from_secs(5);
/// Most frames written in one `write` (concurrent handoffs' frames coalesce).
const MAX_WRITE: usize = 64 * 1024;
/// How long a peer that could not be connected to is left alone, after its first
/// failure in a row (doubling with each one after).
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// The longest such wait.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(30);

/// Reads frames from a byte stream. Unlike a sequence of `read_exact`s, waiting for
/// the next frame can be cancelled (in a `select!`) without losing bytes: what
/// arrived stays in the buffer.
#[derive(Debug)]
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Frames from `io`.
    pub fn new(io: R) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
        }
    }

    /// The next message, verified under `key` (clock window included; replays are
    /// the caller's); `None` when the stream ends between two frames.
    pub async fn next(&mut self, key: &Key) -> Result<Option<Envelope>, ReadError> {
        loop {
            let want = match self.buf.get(..4) {
                Some(&[a, b, c, d]) => {
                    let len = wire::frame_len([a, b, c, d])?;
                    if self.buf.len() >= 4 + len {
                        let frame = self.buf.split_to(4 + len);
                        return Ok(Some(wire::decode(key, &frame[4..], wire::now_ms())?));
                    }
                    4 + len - self.buf.len()
                }
                _ => 4096,
            };
            // Memory follows what actually arrives, not what a prefix claims.
            self.buf.reserve(want.min(64 * 1024));
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into())
                };
            }
        }
    }
}

/// A frame to write, and who wants to know that it was.
#[derive(Debug)]
pub(super) struct Outgoing {
    pub frame: Vec<u8>,
    pub written: Option<oneshot::Sender<bool>>,
}

/// Queues frames for one connection's [`write_frames`].
pub(super) type Writer = mpsc::UnboundedSender<Outgoing>;

/// Writes the queued frames in order (those queued together in one `write`) until
/// every [`Writer`] is gone, a write fails or `stop` is notified; then closes the
/// sending side. Each frame's `written` learns whether it went out (`false`, or a
/// dropped sender, if not).
pub(super) async fn write_frames(
    mut w: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    stop: Option<Arc<Notify>>,
) {
    let mut buf = Vec::new();
    let mut acks = Vec::new();
    loop {
        let first = match &stop {
            Some(stop) => tokio::select! {
                biased;
                () = stop.notified() => break,
                m = rx.recv() => m,
            },
            None => rx.recv().await,
        };
        let Some(first) = first else { break };
        buf.clear();
        let mut next = Some(first);
        while let Some(out) = next.take() {
            buf.extend_from_slice(&out.frame);
            acks.extend(out.written);
            if buf.len() < MAX_WRITE {
                next = rx.try_recv().ok();
            }
        }
        let ok = w.write_all(&buf).await.is_ok();
        for ack in acks.drain(..) {
            let _ = ack.send(ok);
        }
        if !ok {
            return;
        }
    }
    let _ = w.shutdown().await;
}

/// Sets the options of a control connection: no Nagle delay (frames are small and
/// latency-bound), and keepalive plus a user timeout, so that a peer that vanished is
/// noticed while the connection idles or while bytes are in flight.
pub(super) fn tune(conn: &TcpStream) {
    let _ = conn.set_nodelay(true);
    let s = socket2::SockRef::from(conn);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let _ = s.set_tcp_keepalive(&keepalive);
    let _ = s.set_tcp_user_timeout(Some(USER_TIMEOUT));
}

/// What a BE answered an offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reply {
    Ready,
    Refused(Refusal),
}

/// FE: a control connection to one BE receiver.
#[derive(Debug)]
pub(super) struct Control {
    peer: SocketAddrV4,
    out: Writer,
    /// Handoffs waiting for their answer, by offer nonce; `None` once the connection
    /// is dead (which drops the waiters' senders: they fail).
    waiting: Mutex<Option<HashMap<[u8; 16], oneshot::Sender<Reply>>>>,
    /// Tells the writer to close the connection.
    dead: Arc<Notify>,
}

impl Control {
    fn waiting(&self) -> MutexGuard<'_, Option<HashMap<[u8; 16], oneshot::Sender<Reply>>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the connection still works as far as anyone knows.
    fn alive(&self) -> bool {
        self.waiting().is_some() && !self.out.is_closed()
    }

    /// Ends the connection for everyone: the handoffs waiting fail, frames not yet
    /// written are not, and the writer closes the connection (the reader is ending
    /// already).
    fn die(&self) {
        self.waiting().take();
        self.dead.notify_one();
    }

    /// Sends `frame`, the offer with `nonce`; its answer comes through the result.
    pub(super) fn offer(self: &Arc<Self>, nonce: [u8; 16], frame: Vec<u8>) -> Option<Pending> {
        let (tx, rx) = oneshot::channel();
        self.waiting().as_mut()?.insert(nonce, tx);
        // Registered first: the answer cannot overtake the registration.
        let pending = Pending {
            control: self.clone(),
            nonce,
            rx,
        };
        self.out
            .send(Outgoing {
                frame,
                written: None,
            })
            .ok()?;
        Some(pending)
    }

    /// Sends `frame` and waits until it is written: `false` if it could not be.
    pub(super) async fn send(&self, frame: Vec<u8>) -> bool {
        let (tx, rx) = oneshot::channel();
        let queued = self.out.send(Outgoing {
            frame,
            written: Some(tx),
        });
        queued.is_ok() && rx.await.unwrap_or(false)
    }
}

/// An offer waiting for its answer; dropping it (the handoff gave up) stops waiting.
#[derive(Debug)]
pub(super) struct Pending {
    control: Arc<Control>,
    nonce: [u8; 16],
    rx: oneshot::Receiver<Reply>,
}

impl Pending {
    /// The answer; `None` if the connection ended first.
    pub(super) async fn reply(&mut self) -> Option<Reply> {
        (&mut self.rx).await.ok()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(w) = self.control.waiting().as_mut() {
            w.remove(&self.nonce);
        }
    }
}

/// FE: the control connections, one per BE receiver (a slot per receiver, locked
/// while a connection to it is being opened so concurrent handoffs share one).
pub(super) type Controls = Mutex<HashMap<SocketAddrV4, Arc<tokio::sync::Mutex<Slot>>>>;

/// One BE receiver's control connection, and how connecting to it went.
#[derive(Debug, Default)]
pub(super) struct Slot {
    control: Option<Arc<Control>>,
    /// Connects that failed in a row.
    failures: u32,
    /// Until then, do not try to connect (the last one failed).
    retry_at: Option<std::time::Instant>,
}

impl Slot {
    fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        let wait = RETRY_AFTER
            .saturating_mul(1u32 << (self.failures - 1).min(16))
            .min(RETRY_AFTER_MAX);
        self.retry_at = Some(std::time::Instant::now() + wait);
    }
}

impl Handoff {
    /// FE: the working control connection to `peer`, opened if there is none. Opening
    /// one waits at most `BATON_HANDOFF_TIMEOUT`; a connect that fails or times out
    /// backs the peer off, so a caller waiting for the slot behind it returns at once.
    pub(super) async fn control_to(
        self: &Arc<Self>,
        peer: SocketAddrV4,
    ) -> std::io::Result<Arc<Control>> {
        let slot = self
            .controls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(peer)
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(c) = slot.control.as_ref().filter(|c| c.alive()) {
            return Ok(c.clone());
        }
        if slot
            .retry_at
            .is_some_and(|at| std::time::Instant::now() < at)
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "backing off after failed connects",
            ));
        }
        let connect = tokio::time::timeout(self.cfg.timeout, TcpStream::connect(peer));
        let connected = connect.await.unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer to the control connection's SYN",
            ))
        });
        let conn = match connected {
            Ok(conn) => conn,
            Err(e) => {
                slot.failed();
                tracing::debug!(be = %peer, error = %e, failures = slot.failures, "cannot open a control connection");
                return Err(e);
            }
        };
        slot.failures = 0;
        slot.retry_at = None;
        tune(&conn);
        self.metrics().control_opened.incr();
        tracing::debug!(be = %peer, "control connection opened");
        let (rd, wr) = conn.into_split();
        let (out, rx) = mpsc::unbounded_channel();
        let dead = Arc::new(Notify::new());
        let control = Arc::new(Control {
            peer,
            out,
            waiting: Mutex::new(Some(HashMap::new())),
            dead: dead.clone(),
        });
        tokio::spawn(write_frames(wr, rx, Some(dead)));
        tokio::spawn(self.clone().answers(FrameReader::new(rd), control.clone()));
        slot.control = Some(control.clone());
        Ok(control)
    }

    /// FE: reads a control connection's answers and hands each to the handoff
    /// waiting for it, until the connection ends or carries something it must not.
    async fn answers<R: AsyncRead + Unpin>(
        self: Arc<Self>,
        mut frames: FrameReader<R>,
        control: Arc<Control>,
    ) {
        let be = control.peer;
        let why = loop {
            let env = match frames.next(&self.cfg.key).await {
                Ok(Some(env)) => env,
                Ok(None) => break "closed by the backend".to_string(),
                Err(e) => break e.to_string(),
            };
            if let Err(e) = self.replay.check(&env, wire::now_ms()) {
                break e.to_string();
            }
            let (nonce, reply) = match env.msg {
                Message::Ready(n) => (n, Reply::Ready),
                Message::Refused(n, why) => (n, Reply::Refused(why)),
                _ => break "an unexpected message".to_string(),
            };
            let waiter = control.waiting().as_mut().and_then(|w| w.remove(&nonce));
            match waiter {
                Some(w) => {
                    let _ = w.send(reply);
                }
                // Its handoff gave up waiting (and thawed): nothing to do. A BE that
                // said "ready" drops its restored copy unseen, as no "go" comes.
                None => tracing::debug!(%be, ?reply, "answer to an offer no longer waiting"),
            }
        };
        let in_flight = control.waiting().as_ref().map_or(0, HashMap::len);
        tracing::debug!(%be, reason = %why, in_flight, "control connection ended");
        control.die();
        // Forget the dead connection unless a handoff is replacing it right now.
        let mut controls = self.controls.lock().unwrap_or_else(|e| e.into_inner());
        let unused = controls.get(&be).is_some_and(|slot| {
            slot.try_lock()
                .is_ok_and(|s| s.control.as_ref().is_none_or(|c| Arc::ptr_eq(c, &control)))
        });
        if unused {
            controls.remove(&be);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::net::TcpListener;

    fn frame(key: &Key, msg: Message) -> (Envelope, Vec<u8>) {
        let env = wire::envelope(msg);
        let f = wire::encode(key, &env);
        (env, f)
    }

    #[tokio::test]
    async fn frames_split_anywhere_are_read_whole_and_a_torn_one_is_an_error() {
        let key = Key::new(&[3; 32]).unwrap();
        let (a, fa) = frame(&key, Message::Go([1; 16]));
        let (b, fb) = frame(&key, Message::Ready([2; 16]));
        let bytes = [fa, fb].concat();
        for cut in 0..bytes.len() {
            let (mut tx, rx) = tokio::io::duplex(1 << 16);
            let mut frames = FrameReader::new(rx);
            tx.write_all(&bytes[..cut]).await.unwrap();
            // Waiting is cancelled while only part of the bytes are in: nothing is lost.
            let early = tokio::time::timeout(Duration::from_millis(1), frames.next(&key)).await;
            tx.write_all(&bytes[cut..]).await.unwrap();
            drop(tx);
            let mut got = vec![];
            if let Ok(first) = early {
                got.push(first.unwrap().unwrap());
            }
            while let Some(env) = frames.next(&key).await.unwrap() {
                got.push(env);
            }
            assert_eq!(got, [a.clone(), b.clone()], "cut at {cut}");
        }
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        tx.write_all(&bytes[..bytes.len() - 1]).await.unwrap();
        drop(tx);
        let mut frames = FrameReader::new(rx);
        assert!(frames.next(&key).await.unwrap().is_some());
        assert!(frames.next(&key).await.is_err(), "a frame cut short");
    }

    /// A BE that answers two offers in the opposite order, gets the "go" of the one
    /// it took, then closes with a third in flight: each handoff gets its own answer
    /// on the one connection, and the third learns the connection is gone.
    #[tokio::test]
    async fn answers_reach_their_own_offer_and_a_closed_connection_fails_the_rest() {
        let h = Handoff::for_tests();
        let key = h.cfg.key.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let SocketAddr::V4(peer) = listener.local_addr().unwrap() else {
            unreachable!("bound to IPv4")
        };
        let be = tokio::spawn({
            let key = key.clone();
            async move {
                let (conn, _) = listener.accept().await.unwrap();
                let (rd, mut wr) = conn.into_split();
                let mut frames = FrameReader::new(rd);
                let a = frames.next(&key).await.unwrap().unwrap();
                let b = frames.next(&key).await.unwrap().unwrap();
                for msg in [
                    Message::Refused(b.nonce, Refusal::Busy),
                    Message::Ready(a.nonce),
                ] {
                    wr.write_all(&frame(&key, msg).1).await.unwrap();
                }
                let go = frames.next(&key).await.unwrap().unwrap();
                assert_eq!(go.msg, Message::Go(a.nonce));
                let c = frames.next(&key).await.unwrap().unwrap();
                c.nonce
            }
        });
        let control = h.control_to(peer).await.unwrap();
        let (a, fa) = frame(&key, Message::Alive(vec![]));
        let (b, fb) = frame(&key, Message::Alive(vec![]));
        let mut pa = control.offer(a.nonce, fa).unwrap();
        let mut pb = control.offer(b.nonce, fb).unwrap();
        assert_eq!(pb.reply().await, Some(Reply::Refused(Refusal::Busy)));
        assert_eq!(pa.reply().await, Some(Reply::Ready));
        assert!(control.send(frame(&key, Message::Go(a.nonce)).1).await);
        let again = h.control_to(peer).await.unwrap();
        assert!(Arc::ptr_eq(&again, &control), "the connection is reused");
        let (c, fc) = frame(&key, Message::Alive(vec![]));
        let mut pc = control.offer(c.nonce, fc).unwrap();
        assert_eq!(be.await.unwrap(), c.nonce);
        assert_eq!(pc.reply().await, None, "the connection ended under it");
        assert!(!control.alive());
        assert!(!control.send(frame(&key, Message::Go(c.nonce)).1).await);
        assert_eq!(h.metrics().control_opened.get(), 1);
    }
}
