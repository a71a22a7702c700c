//! `H1Pool`: the idle HTTP/1 connections to one endpoint.
//!
//! Each [`HttpProxy`](super::http::HttpProxy) serves exactly one endpoint, so its pool
//! needs no key: it is a lock-free queue of idle connections' senders (hyper's
//! `client::conn::http1`), bounded by `BATON_POOL_MAX_IDLE`. The queue grows in small
//! blocks as connections go idle, so an endpoint that never had many connections
//! costs little memory whatever the bound (a sidecar may know thousands of endpoints). A request pops an idle
//! connection (or dials a new one when none is left), sends, and its response body
//! carries the connection ([`PooledBody`]): when the body has been read to its end the
//! connection goes back to the queue, and if the body is dropped early (a client that
//! went away mid-response) or the exchange failed, the connection is dropped and hyper
//! closes it, so a half-read response is never followed by another request.
//!
//! This replaces hyper-util's pooled client on the per-request path, which keys its
//! pool by scheme and authority behind a mutex and spawns a task per request to wait
//! for the connection to be reusable: here checkout and return are one atomic queue
//! operation each, and nothing is spawned except the connection's own task.
//!
//! - **Stale connections**: a popped connection that hyper knows closed is skipped;
//!   one the endpoint closed while idle, before the request was written, hands the
//!   request back (`try_send_request`), which then goes on the next connection — the
//!   request was not sent, so this is safe for any method.
//! - **Idle timeout** (`BATON_POOL_IDLE_TIMEOUT`): connections idle longer are skipped
//!   at checkout, and a reaper task, started with the pool's first connection and
//!   ended with the pool, closes them when no request comes.
//! - **Upgrades**: connections run `with_upgrades`, so a 101 hands hyper's upgrade
//!   handle to the server side; such a connection never returns to the pool.

use super::connect::{connect, ConnectConfig};
use crate::{body::Body, errors::UpstreamError, Error};
use bytes::Bytes;
use crossbeam_queue::SegQueue;
use http::{Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use hyper::{body::Incoming, client::conn::http1};
use hyper_util::rt::TokioIo;
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Weak,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

type Sender = http1::SendRequest<Body>;

/// An idle connection.
struct Idle {
    sender: Sender,
    since: Instant,
}

/// The idle HTTP/1 connections to one endpoint (see the module docs).
pub struct H1Pool {
    addr: SocketAddr,
    cfg: Arc<ConnectConfig>,
    idle: SegQueue<Idle>,
    max_idle: usize,
    idle_timeout: Duration,
    reaping: AtomicBool,
}

impl std::fmt::Debug for H1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool")
            .field("addr", &self.addr)
            .field("idle", &self.idle.len())
            .finish()
    }
}

impl H1Pool {
    /// A pool of at most `max_idle` idle connections to `addr`.
    pub fn new(
        addr: SocketAddr,
        cfg: Arc<ConnectConfig>,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            addr,
            cfg,
            idle: SegQueue::new(),
            max_idle,
            idle_timeout,
            reaping: AtomicBool::new(false),
        })
    }

    /// Idle connections now.
    pub fn idle(&self) -> usize {
        self.idle.len()
    }

    fn push(&self, idle: Idle) {
        // Over the bound: drop it (hyper closes it). Two returns racing may keep one
        // more than the bound for a moment; nothing depends on the exact count.
        if self.idle.len() < self.max_idle {
            self.idle.push(idle);
        }
    }

    /// Sends `req` (origin-form URI, `Host` set) on an idle connection or a new one.
    pub async fn send(self: Arc<Self>, mut req: Request<Body>) -> Result<Response<Body>, Error> {
        while let Some(idle) = self.idle.pop() {
            if idle.sender.is_closed() || idle.since.elapsed() >= self.idle_timeout {
                continue;
            }
            let mut sender = idle.sender;
            // Reusable once hyper has finished the previous exchange: at once, or
            // closed (the endpoint hung up), never stuck.
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(rsp) => return Ok(self.pooled(rsp, sender)),
                Err(mut e) => match e.take_message() {
                    // Not written: the connection was closed under us; try the next.
                    Some(back) => req = back,
                    None => return Err(self.failed(e.into_error())),
                },
            }
        }
        let stream = connect(self.addr, &self.cfg).await?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake::<_, Body>(TokioIo::new(stream))
            .await
            .map_err(|e| self.failed(e))?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(error) = conn.with_upgrades().await {
                tracing::debug!(%addr, %error, "HTTP/1 upstream connection ended");
            }
        });
        self.start_reaper();
        match sender.try_send_request(req).await {
            Ok(rsp) => Ok(self.pooled(rsp, sender)),
            Err(e) => Err(self.failed(e.into_error())),
        }
    }

    fn failed(&self, e: hyper::Error) -> Error {
        UpstreamError {
            addr: self.addr,
            source: e.into(),
        }
        .into()
    }

    /// The response, its body carrying the connection back to the pool.
    fn pooled(self: &Arc<Self>, rsp: Response<Incoming>, sender: Sender) -> Response<Body> {
        // An upgraded connection belongs to the tunnel now.
        let back = (rsp.status() != StatusCode::SWITCHING_PROTOCOLS)
            .then(|| (sender, Arc::downgrade(self)));
        rsp.map(|body| Body::Pooled(PooledBody { body, back }))
    }

    fn put(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        self.push(Idle {
            sender,
            since: Instant::now(),
        });
    }

    /// Closes connections idle past the timeout even when no request comes to find
    /// them; runs while the pool lives.
    fn start_reaper(self: &Arc<Self>) {
        if self.reaping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(self);
        let every = (self.idle_timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = pool.upgrade() else { return };
                pool.reap();
            }
        });
    }

    fn reap(&self) {
        for _ in 0..self.idle.len() {
            let Some(idle) = self.idle.pop() else { return };
            if !idle.sender.is_closed() && idle.since.elapsed() < self.idle_timeout {
                self.push(idle);
            }
        }
    }
}

/// A response body from a pooled connection: returns the connection to its pool once
/// read to the end (see the module docs).
pub struct PooledBody {
    body: Incoming,
    back: Option<(Sender, Weak<H1Pool>)>,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").finish_non_exhaustive()
    }
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((sender, pool)) = self.back.take() {
            if let Some(pool) = pool.upgrade() {
                pool.put(sender);
            }
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let poll = Pin::new(&mut self.body).poll_frame(cx);
        match &poll {
            Poll::Ready(None) => self.release(),
            // The exchange failed: the connection is not reusable.
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Read to the end (a server stops polling once the length is reached): reuse.
        if http_body::Body::is_end_stream(&self.body) {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::AtomicUsize;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    /// A raw HTTP/1.1 endpoint: answers `GET /N` with N bytes; counts connections
    /// opened and closed (by the client); with `hang_up`, closes each connection
    /// after one response without saying so (as an endpoint's idle timeout does).
    struct Endpoint {
        addr: SocketAddr,
        opened: Arc<AtomicUsize>,
        closed: Arc<AtomicUsize>,
    }

    async fn serve(sock: &mut tokio::net::TcpStream, hang_up: bool) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = sock.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                buf.drain(..end + 4);
                let path = head.split(' ').nth(1).unwrap_or("/0");
                let len: usize = path[1..].parse().unwrap_or(0);
                let mut rsp =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n").into_bytes();
                rsp.resize(rsp.len() + len, b'x');
                if sock.write_all(&rsp).await.is_err() || hang_up {
                    return;
                }
            }
        }
    }

    async fn endpoint(hang_up: bool) -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (opened, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (o, c) = (opened.clone(), closed.clone());
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                o.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    serve(&mut sock, hang_up).await;
                    // The client closed it, reset it, or this side hung up.
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Endpoint {
            addr,
            opened,
            closed,
        }
    }

    fn pool(ep: &Endpoint, max_idle: usize, idle_timeout: Duration) -> Arc<H1Pool> {
        H1Pool::new(ep.addr, Arc::default(), max_idle, idle_timeout)
    }

    fn get(path: &str) -> Request<Body> {
        Request::get(path)
            .header("host", "test")
            .body(Body::Empty)
            .unwrap()
    }

    async fn fetch(pool: &Arc<H1Pool>, path: &str) -> usize {
        let rsp = pool.clone().send(get(path)).await.unwrap();
        rsp.into_body().collect().await.unwrap().to_bytes().len()
    }

    async fn eventually(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never: {what}");
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let ep = endpoint(false).await;
        let pool = pool(&ep, 8, Duration::from_secs(30));
        for n in [10, 0, 70_000, 5] {
            assert_eq!(fetch(&pool, &format!("/{n}")).await, n);
        }
        assert_eq!(ep.opened.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle(), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_open_connections_and_keep_them() {
        let ep = endpoint(false).await;
        let pool = pool(&ep, 8, Duration::from_secs(30));
        let rsps: Vec<_> =
            futures_util::future::join_all((0..3).map(|_| pool.clone().send(get("/100")))).await;
        for rsp in rsps {
            let body = rsp.unwrap().into_body().collect().await.unwrap();
            assert_eq!(body.to_bytes().len(), 100);
        }
        assert_eq!(ep.opened.load(Ordering::SeqCst), 3);
        assert_eq!(pool.idle(), 3);
        assert_eq!(fetch(&pool, "/1").await, 1);
        assert_eq!(ep.opened.load(Ordering::SeqCst), 3, "reused");
    }

    #[tokio::test]
    async fn a_response_dropped_half_read_closes_its_connection() {
        let ep = endpoint(false).await;
        let pool = pool(&ep, 8, Duration::from_secs(30));
        let mut body = pool
            .clone()
            .send(get("/4000000"))
            .await
            .unwrap()
            .into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop(body);
        assert_eq!(pool.idle(), 0, "not returned");
        eventually("the half-read connection is closed", || {
            ep.closed.load(Ordering::SeqCst) == 1
        })
        .await;
        assert_eq!(fetch(&pool, "/3").await, 3);
        assert_eq!(ep.opened.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_endpoint_closed_while_idle_is_skipped() {
        let ep = endpoint(true).await;
        let pool = pool(&ep, 8, Duration::from_secs(30));
        assert_eq!(fetch(&pool, "/3").await, 3);
        // hyper sees the endpoint's FIN: the connection is not kept, or is skipped.
        eventually("the endpoint hung up", || {
            ep.closed.load(Ordering::SeqCst) == 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(fetch(&pool, "/4").await, 4);
        assert_eq!(ep.opened.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let ep = endpoint(false).await;
        let pool = pool(&ep, 8, Duration::from_millis(200));
        assert_eq!(fetch(&pool, "/3").await, 3);
        assert_eq!(pool.idle(), 1);
        // No request comes: the reaper closes it.
        eventually("the reaper closes the idle connection", || {
            ep.closed.load(Ordering::SeqCst) == 1
        })
        .await;
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn no_more_than_max_idle_connections_are_kept() {
        let ep = endpoint(false).await;
        let pool = pool(&ep, 2, Duration::from_secs(30));
        let rsps: Vec<_> =
            futures_util::future::join_all((0..4).map(|_| pool.clone().send(get("/10")))).await;
        for rsp in rsps {
            rsp.unwrap().into_body().collect().await.unwrap();
        }
        assert_eq!(ep.opened.load(Ordering::SeqCst), 4);
        assert_eq!(pool.idle(), 2);
        eventually("the two beyond the bound are closed", || {
            ep.closed.load(Ordering::SeqCst) == 2
        })
        .await;
    }

    #[tokio::test]
    async fn a_pool_of_zero_keeps_nothing() {
        let ep = endpoint(false).await;
        let pool = pool(&ep, 0, Duration::from_secs(30));
        assert_eq!(fetch(&pool, "/3").await, 3);
        assert_eq!(fetch(&pool, "/3").await, 3);
        assert_eq!(pool.idle(), 0);
        assert_eq!(ep.opened.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let pool = H1Pool::new(addr, Arc::default(), 8, Duration::from_secs(30));
        let err = pool.send(get("/1")).await.unwrap_err();
        assert!(err.is::<crate::errors::ConnectError>(), "{err}");
    }
}
