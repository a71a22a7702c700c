//! HTTP/1 connections, parked while idle.
//!
//! hyper keeps about 16 KiB of buffers per connection (8 KiB to read, 8 KiB of header
//! space to write) for as long as the connection lives. A sidecar holds thousands of
//! idle keep-alive connections, so baton *parks* them: when a connection has been idle
//! between requests for `BATON_IDLE_PARK` (checked on a timer, so after one to two
//! periods), baton asks hyper to finish the connection gracefully — for an idle
//! connection hyper stops at once, at a message boundary, after flushing everything —
//! and takes the socket back (`poll_without_shutdown` + `into_parts`) together with
//! any bytes hyper had read ahead. Then it waits for readability with no buffers at
//! all; the next request gets a fresh hyper connection, fed first with the read-ahead
//! bytes. hyper does all HTTP framing, so nothing is cut or misread: a connection that
//! turns out to be busy when asked just finishes its exchange first. The head that
//! wakes a parked connection is read and checked by baton before hyper sees it, as a
//! connection's first is, so a malformed one gets baton's `400` (or `431`) with its
//! one-line body; one that hyper itself rejects on a live connection is counted and
//! logged.
//!
//! It also carries upgrades: after a 101, hyper hands the socket back the same way and
//! baton joins it to the endpoint's upgraded connection (a WebSocket tunnel).
//!
//! The same seam implements graceful shutdown: when the drain signal fires, hyper is
//! asked to finish (an idle connection closes at once, a busy one answers its request
//! with `connection: close` first). A connection whose first request baton has read
//! but hyper has not yet parsed is left to answer it (`connection: close` again).

use super::conn::{ConnService, ConnState};
use crate::stack::HttpStack;
use baton_layers::{handoff::fe::TakeoverIo, io::PrefixedIo, metrics::Counter, Error};
use bytes::BytesMut;
use futures_util::StreamExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};
use tokio::{sync::watch, time::Sleep};
use tokio_stream::wrappers::WatchStream;

/// HTTP/1 settings.
#[derive(Clone, Debug)]
pub(super) struct Http1Config {
    /// `BATON_HEADER_READ_TIMEOUT`: also bounds how long a connection may stay idle.
    pub(super) header_read_timeout: Duration,
    /// `BATON_MAX_HEADER_BYTES`.
    pub(super) max_header_bytes: usize,
    /// `BATON_IDLE_PARK`.
    pub(super) park_after: Duration,
    /// Counts parks.
    pub(super) parks: Counter,
    /// Counts malformed requests.
    pub(super) bad_requests: Counter,
}

/// Why baton asked hyper to finish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Asked {
    /// Idle long enough: park, then resume.
    Park,
    /// Draining: close.
    Drain,
}

/// Serves an HTTP/1 connection until it ends, parking it whenever it idles.
pub(super) async fn serve(
    mut io: PrefixedIo<TakeoverIo>,
    svc: ConnService<HttpStack>,
    state: Arc<ConnState>,
    cfg: &Http1Config,
    mut drain: watch::Receiver<bool>,
) -> Result<(), Error> {
    loop {
        let ran = run(io, svc.clone(), state.clone(), cfg, drain.clone()).await;
        let (parts, asked) = match ran {
            Ok(ended) => ended,
            Err(e) if rejected_by_hyper(&e, &cfg.bad_requests) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if let Some(upstream) = state.take_upgrade() {
            // A 101 went out: the connection is now a tunnel to the endpoint.
            let (rest, stream) = parts.io.into_inner().into_parts();
            let prefix = if parts.read_buf.is_empty() {
                rest
            } else {
                parts.read_buf
            };
            return tunnel(PrefixedIo::new(prefix, stream), upstream).await;
        }
        if asked != Some(Asked::Park) || state.draining() || *drain.borrow() {
            // hyper ended it (client closed, keep-alive off) or shutdown did: close.
            return Ok(());
        }
        let (rest, stream) = parts.io.into_inner().into_parts();
        // Bytes hyper read ahead (the start of the next request) come first.
        let prefix = if parts.read_buf.is_empty() {
            rest
        } else {
            parts.read_buf
        };
        let mut stream = stream;
        if prefix.is_empty() {
            // Parked: no hyper state, no buffers; only the socket's readiness.
            cfg.parks.incr();
            let wait = cfg.header_read_timeout.saturating_sub(cfg.park_after);
            tokio::select! {
                ready = stream.readable() => ready?,
                _ = tokio::time::sleep(wait) => return Ok(()),
                _ = drain.changed() => return Ok(()),
            }
        }
        // At a message boundary with the bare socket: the next head gets the same
        // check as a connection's first (a malformed one is answered by baton).
        let mut head = BytesMut::from(prefix);
        let (limit, timeout) = (cfg.max_header_bytes, cfg.header_read_timeout);
        match super::read_head(&mut stream, &mut head, limit, timeout).await {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(r) => {
                super::reject(&mut stream, &r, &cfg.bad_requests).await;
                return Ok(());
            }
        }
        io = PrefixedIo::new(head.freeze(), stream);
    }
}

/// Whether hyper ended a connection because a request head did not parse. hyper has
/// then answered it itself (`400`/`431`/`414`, empty body), as baton cannot check a
/// head hyper reads on a live keep-alive connection: hyper offers no hook at message
/// boundaries. Counted and logged all the same.
fn rejected_by_hyper(e: &hyper::Error, bad_requests: &Counter) -> bool {
    if !(e.is_parse() || e.is_parse_too_large()) {
        return false;
    }
    bad_requests.incr();
    tracing::info!(error = %e, "malformed request rejected by the HTTP server");
    true
}

/// Copies both ways between the client and the endpoint's upgraded connection.
async fn tunnel(mut client: PrefixedIo<TakeoverIo>, upstream: OnUpgrade) -> Result<(), Error> {
    let mut upstream = TokioIo::new(upstream.await?);
    let (up, down) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    tracing::debug!(
        to_upstream = up,
        to_client = down,
        "upgraded connection done"
    );
    Ok(())
}

type Conn =
    hyper::server::conn::http1::Connection<TokioIo<PrefixedIo<TakeoverIo>>, ConnService<HttpStack>>;
type Parts =
    hyper::server::conn::http1::Parts<TokioIo<PrefixedIo<TakeoverIo>>, ConnService<HttpStack>>;
/// How one hyper connection ended: its parts, and whether baton asked for the end.
type Ended = hyper::Result<(Parts, Option<Asked>)>;

/// Runs one hyper connection to its end without shutting the socket, and says whether
/// baton asked for that end.
///
/// A plain function returning a boxed future, not an `async` block: proving a hyper
/// connection `Send` from inside the connection's `async fn` hits a rustc limitation
/// (higher-ranked lifetimes of boxed error types in generator witnesses), while here
/// the types are concrete. One allocation per hyper connection is the price.
fn run(
    io: PrefixedIo<TakeoverIo>,
    svc: ConnService<HttpStack>,
    state: Arc<ConnState>,
    cfg: &Http1Config,
    drain: watch::Receiver<bool>,
) -> Pin<Box<dyn Future<Output = Ended> + Send>> {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes)
        .max_headers(super::MAX_HEADERS);
    Box::pin(Http1 {
        conn: Some(builder.serve_connection(TokioIo::new(io), svc)),
        state,
        drain: super::drain_signal(drain),
        park_after: cfg.park_after,
        timer: Box::pin(tokio::time::sleep(cfg.park_after)),
        seen: None,
        asked: None,
    })
}

/// A hyper HTTP/1 connection that baton can end at a message boundary.
struct Http1 {
    conn: Option<Conn>,
    state: Arc<ConnState>,
    drain: WatchStream<bool>,
    park_after: Duration,
    timer: Pin<Box<Sleep>>,
    /// At the last timer expiry: requests started so far, if the connection was idle.
    seen: Option<usize>,
    asked: Option<Asked>,
}

impl Http1 {
    fn ask(&mut self, why: Asked) {
        if self.asked.is_none() {
            self.asked = Some(why);
            if let Some(conn) = self.conn.as_mut() {
                Pin::new(conn).graceful_shutdown();
            }
        }
    }

    /// Checks the drain signal and the idle timer.
    fn poll_signals(&mut self, cx: &mut Context<'_>) {
        if !self.state.draining() && self.drain.poll_next_unpin(cx).is_ready() {
            self.state.set_draining();
        }
        // Before its first request is parsed, a connection would close without
        // answering it: let that request be answered (with `connection: close`).
        if self.state.draining() && self.state.started() > 0 {
            self.ask(Asked::Drain);
        }
        while self.asked.is_none() && self.timer.as_mut().poll(cx).is_ready() {
            // Idle now, and already idle with the same requests at the last expiry.
            let now = self.state.idle().then(|| self.state.started());
            if now.is_some() && now == self.seen {
                self.ask(Asked::Park);
            } else {
                self.seen = now;
                let next = tokio::time::Instant::now() + self.park_after;
                self.timer.as_mut().reset(next);
            }
        }
    }
}

impl Future for Http1 {
    type Output = Ended;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        this.poll_signals(cx);
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Pending;
        };
        if let Err(e) = ready!(conn.poll_without_shutdown(cx)) {
            return Poll::Ready(Err(e));
        }
        match this.conn.take() {
            Some(conn) => Poll::Ready(Ok((conn.into_parts(), this.asked))),
            None => Poll::Pending,
        }
    }
}
