//! HTTP/2 connections, with GOAWAY on drain.

use super::conn::{ConnService, ConnState};
use crate::stack::HttpStack;
use baton_layers::io::PrefixedIo;
use futures_util::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};
use tokio::{net::TcpStream, sync::watch};
use tokio_stream::wrappers::WatchStream;

type Conn = hyper::server::conn::http2::Connection<
    TokioIo<PrefixedIo<TcpStream>>,
    ConnService<HttpStack>,
    TokioExecutor,
>;

/// Serves an HTTP/2 connection; when `drain` fires, sends GOAWAY and finishes the open
/// streams.
///
/// A plain function returning a boxed future, not an `async` block: proving a hyper
/// connection `Send` from inside the connection's `async fn` hits a rustc limitation
/// (higher-ranked lifetimes of boxed error types in generator witnesses), while here
/// the types are concrete. One allocation per connection is the price.
pub(super) fn serve(
    io: PrefixedIo<TcpStream>,
    svc: ConnService<HttpStack>,
    state: Arc<ConnState>,
    drain: watch::Receiver<bool>,
) -> Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new());
    Box::pin(Graceful {
        conn: builder.serve_connection(TokioIo::new(io), svc),
        state,
        drain: WatchStream::from_changes(drain),
        shutdown: false,
    })
}

pin_project_lite::pin_project! {
    struct Graceful {
        #[pin]
        conn: Conn,
        state: Arc<ConnState>,
        drain: WatchStream<bool>,
        shutdown: bool,
    }
}

impl Future for Graceful {
    type Output = Result<(), hyper::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if !*this.shutdown && this.drain.poll_next_unpin(cx).is_ready() {
            *this.shutdown = true;
            this.state.set_draining();
            this.conn.as_mut().graceful_shutdown();
        }
        this.conn.poll(cx)
    }
}
