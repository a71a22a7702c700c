//! HTTP/1 connections, parked while idle.
//!
//! hyper keeps about 16 KiB of buffers per connection (8 KiB to read, 8 KiB of header
//! space to write) for as long as the connection lives. A sidecar holds thousands of
//! idle keep-alive connections, so baton *parks* them: once a connection has been idle
//! between requests for `BATON_IDLE_PARK`, [`IdleIo`] ends hyper's connection as a
//! clean close would (end of stream at a message boundary, which hyper handles without
//! error), takes the socket back without shutting it down, and waits for readability
//! with no buffers at all. When the client sends its next request, a fresh hyper
//! connection serves it. Nothing is lost: the end of stream is only reported after the
//! socket itself said "no data", and the next bytes stay in the kernel until then.
//!
//! The same seam implements graceful shutdown: when the drain signal fires, an idle
//! connection is ended at once, and a busy one answers its request in flight with
//! `connection: close` (see [`ConnFuture`](super::conn::ConnFuture)) and then ends.

use super::conn::{ConnService, ConnState};
use crate::stack::HttpStack;
use baton_layers::{io::PrefixedIo, metrics::Counter, Error};
use futures_util::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::watch,
    time::{Instant, Sleep},
};
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
}

/// Why hyper's connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// hyper ended it (client closed, keep-alive off, error).
    Hyper,
    /// Idle for `park_after`: park.
    Idle,
    /// Draining: close.
    Drain,
}

/// Serves an HTTP/1 connection until it ends, parking it whenever it idles.
pub(super) async fn serve(
    mut io: PrefixedIo<TcpStream>,
    svc: ConnService<HttpStack>,
    state: Arc<ConnState>,
    cfg: &Http1Config,
    mut drain: watch::Receiver<bool>,
) -> Result<(), Error> {
    loop {
        let idle = IdleIo::new(io, state.clone(), drain.clone(), cfg.park_after);
        let parts = run(idle, svc.clone(), cfg).await?;
        let idle = parts.io.into_inner();
        let ended = idle.ended;
        let (rest, stream) = idle.io.into_parts();
        // hyper only stops at a message boundary, but keep whatever it read ahead.
        let prefix = if parts.read_buf.is_empty() {
            rest
        } else {
            parts.read_buf
        };
        if ended != Ended::Idle || state.draining() || *drain.borrow() {
            return Ok(());
        }
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
        io = PrefixedIo::new(prefix, stream);
    }
}

type Conn = hyper::server::conn::http1::Connection<TokioIo<IdleIo>, ConnService<HttpStack>>;
type Parts = hyper::server::conn::http1::Parts<TokioIo<IdleIo>, ConnService<HttpStack>>;

/// Runs one hyper connection to its end, keeping the socket open.
///
/// A plain function returning a boxed future, not an `async` block: proving a hyper
/// connection `Send` from inside the connection's `async fn` hits a rustc limitation
/// (higher-ranked lifetimes of boxed error types in generator witnesses), while here
/// the types are concrete. One allocation per hyper connection is the price.
fn run(
    io: IdleIo,
    svc: ConnService<HttpStack>,
    cfg: &Http1Config,
) -> Pin<Box<dyn Future<Output = hyper::Result<Parts>> + Send>> {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes);
    let conn: Conn = builder.serve_connection(TokioIo::new(io), svc);
    Box::pin(conn.without_shutdown())
}

/// The connection's socket as hyper sees it: reports end of stream when the connection
/// has idled long enough to park, or is idle while draining (see the module docs).
pub(super) struct IdleIo {
    io: PrefixedIo<TcpStream>,
    state: Arc<ConnState>,
    drain: WatchStream<bool>,
    park_after: Duration,
    last_read: Instant,
    /// Armed at the first idle poll; on expiry it re-arms itself if reads happened
    /// since (so a busy connection resets it at most once per `park_after`).
    timer: Option<Pin<Box<Sleep>>>,
    ended: Ended,
}

impl IdleIo {
    fn new(
        io: PrefixedIo<TcpStream>,
        state: Arc<ConnState>,
        drain: watch::Receiver<bool>,
        park_after: Duration,
    ) -> Self {
        Self {
            io,
            state,
            drain: WatchStream::from_changes(drain),
            park_after,
            last_read: Instant::now(),
            timer: None,
            ended: Ended::Hyper,
        }
    }

    /// Whether to end the stream now (the socket has no data).
    ///
    /// The timer is armed whenever hyper waits for data, busy or not: the exchange may
    /// finish (its response body dropped) without hyper reading again, so the timer is
    /// what comes back to check. It is reset at most once per `park_after`.
    fn poll_end(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.state.draining() && self.drain.poll_next_unpin(cx).is_ready() {
            self.state.set_draining();
        }
        if self.state.draining() && self.state.idle() {
            self.ended = Ended::Drain;
            return true;
        }
        let deadline = self.last_read + self.park_after;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline && self.state.idle() {
                self.ended = Ended::Idle;
                return true;
            }
            // Reads happened since it was armed, or an exchange is still running.
            timer.as_mut().reset(if now >= deadline {
                now + self.park_after
            } else {
                deadline
            });
        }
    }
}

impl AsyncRead for IdleIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.last_read = Instant::now();
                    self.state.mark_partial();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // Nothing to read. Ending the stream here reads as a clean close to hyper.
            Poll::Pending if self.poll_end(cx) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for IdleIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
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

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
