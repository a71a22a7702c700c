//! HTTP/2 connections: keep-alive pings, an idle bound, GOAWAY on drain.
//!
//! A connection with no stream open for `BATON_HEADER_READ_TIMEOUT` (checked on a
//! timer, so within one to two periods) — including one that sent only the preface —
//! is sent GOAWAY, as is every connection when the drain signal fires. hyper then lets
//! open streams finish. A peer that never acknowledges the GOAWAY's ping would hold the
//! connection until the grace period ends, so once no stream is open a second after
//! the GOAWAY, the connection is dropped. Keep-alive pings close connections to peers
//! that have gone away silently.

use super::conn::{ConnService, ConnState};
use crate::stack::HttpStack;
use baton_layers::{handoff::fe::TakeoverIo, io::PrefixedIo};
use futures_util::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};
use tokio::{sync::watch, time::Sleep};
use tokio_stream::wrappers::WatchStream;

/// Interval and timeout of keep-alive pings.
const KEEPALIVE: Duration = Duration::from_secs(20);
/// How long after GOAWAY a connection with no open stream is dropped.
const GOAWAY_LINGER: Duration = Duration::from_secs(1);

type Conn = hyper::server::conn::http2::Connection<
    TokioIo<PrefixedIo<TakeoverIo>>,
    ConnService<HttpStack>,
    TokioExecutor,
>;

/// Serves an HTTP/2 connection until it ends (see the module docs).
///
/// A plain function returning a boxed future, not an `async` block: proving a hyper
/// connection `Send` from inside the connection's `async fn` hits a rustc limitation
/// (higher-ranked lifetimes of boxed error types in generator witnesses), while here
/// the types are concrete. One allocation per connection is the price.
pub(super) fn serve(
    io: PrefixedIo<TakeoverIo>,
    svc: ConnService<HttpStack>,
    state: Arc<ConnState>,
    idle: Duration,
    drain: watch::Receiver<bool>,
) -> Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(KEEPALIVE))
        .keep_alive_timeout(KEEPALIVE);
    Box::pin(Http2 {
        conn: builder.serve_connection(TokioIo::new(io), svc),
        state,
        drain: super::drain_signal(drain),
        idle,
        timer: Box::pin(tokio::time::sleep(idle)),
        seen: None,
        goaway: false,
    })
}

pin_project_lite::pin_project! {
    struct Http2 {
        #[pin]
        conn: Conn,
        state: Arc<ConnState>,
        drain: WatchStream<bool>,
        idle: Duration,
        // Idle check, then (after GOAWAY) the linger before dropping.
        timer: Pin<Box<Sleep>>,
        // At the last idle check: requests started so far, if no stream was open.
        seen: Option<usize>,
        goaway: bool,
    }
}

impl Future for Http2 {
    type Output = Result<(), hyper::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let goaway = |conn: Pin<&mut Conn>, timer: &mut Pin<Box<Sleep>>, done: &mut bool| {
            if !*done {
                *done = true;
                conn.graceful_shutdown();
                timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + GOAWAY_LINGER);
            }
        };
        if !*this.goaway && this.drain.poll_next_unpin(cx).is_ready() {
            this.state.set_draining();
            goaway(this.conn.as_mut(), this.timer, this.goaway);
        }
        while this.timer.as_mut().poll(cx).is_ready() {
            let quiet = this.state.quiet().then(|| this.state.started());
            if *this.goaway {
                if quiet.is_some() {
                    // GOAWAY sent and nothing open: do not wait for the peer.
                    return Poll::Ready(Ok(()));
                }
                this.timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + GOAWAY_LINGER);
            } else if quiet.is_some() && quiet == *this.seen {
                goaway(this.conn.as_mut(), this.timer, this.goaway);
            } else {
                *this.seen = quiet;
                this.timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + *this.idle);
            }
        }
        this.conn.poll(cx)
    }
}
