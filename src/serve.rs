//! Serving one accepted connection: detect, then HTTP (hyper) or opaque (splice).
//!
//! The connection level of the stack: the open-connections gauge, a span naming the
//! client and original destination, detection with its timeout, and — for HTTP/1 — a
//! check of the first request head (a malformed one is answered `400` with a body and
//! closed; one over `BATON_MAX_HEADER_BYTES` is answered `431`). Every request then
//! carries the connection's [`ClientInfo`] into the request stack.
//!
//! Shutdown: each connection holds a receiver of the drain signal. When it fires,
//! HTTP/1 connections finish the request in flight and close (idle keep-alives close
//! at once), HTTP/2 connections send GOAWAY and finish open streams, connections still
//! being detected are closed, and opaque connections run on until they end or the
//! grace period does.

use crate::stack::{HttpStack, Stacks};
use baton_layers::{
    body::Body,
    detect::{self, DetectError, Detected},
    errors,
    io::PrefixedIo,
    metrics::Metrics,
    new_service::NewService,
    proxy::tcp::{self, ForwardMetrics, OpaqueRequest},
    target::{Accept, ClientInfo},
    Error,
};
use bytes::BytesMut;
use futures_util::StreamExt;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    task::{ready, Context, Poll},
    time::Duration,
};
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::watch};
use tokio_stream::wrappers::WatchStream;
use tower::{util::Oneshot, ServiceExt};
use tracing::Instrument;

/// Connection-level settings.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// `BATON_DETECT_TIMEOUT`.
    pub detect_timeout: Duration,
    /// `BATON_MAX_HEADER_BYTES`.
    pub max_header_bytes: usize,
    /// `BATON_HEADER_READ_TIMEOUT`.
    pub header_read_timeout: Duration,
    /// `BATON_OPAQUE_PORTS`.
    pub opaque_ports: Vec<u16>,
}

/// Serves accepted connections with the stacks.
pub struct Server {
    cfg: ServeConfig,
    stacks: Stacks,
    metrics: Metrics,
    forward: ForwardMetrics,
}

impl Server {
    /// A server for `stacks`.
    pub fn new(cfg: ServeConfig, stacks: Stacks, metrics: Metrics) -> Self {
        let g = metrics.global();
        let forward = ForwardMetrics {
            to_upstream: g.opaque_bytes_in.clone(),
            to_client: g.opaque_bytes_out.clone(),
        };
        Self {
            cfg,
            stacks,
            metrics,
            forward,
        }
    }

    /// Serves one connection until it ends. `drain` fires at shutdown.
    pub fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        accept: Accept,
        drain: watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let span = tracing::info_span!("conn", client = %accept.client, dst = %accept.orig_dst);
        async move {
            let _open = self.metrics.global().open_connections.track();
            if let Err(error) = self.serve_inner(stream, accept, drain).await {
                tracing::debug!(%error, "connection ended with an error");
            }
        }
        .instrument(span)
    }

    async fn serve_inner(
        &self,
        mut stream: TcpStream,
        accept: Accept,
        mut drain: watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let g = self.metrics.global();
        let mut buf = BytesMut::new();
        let detected = if self.cfg.opaque_ports.contains(&accept.orig_dst.port()) {
            Detected::Opaque
        } else {
            let limit = self.cfg.max_header_bytes;
            let detect = detect::detect(&mut stream, &mut buf, self.cfg.detect_timeout, limit);
            tokio::select! {
                d = detect => match d {
                    Ok(d) => d,
                    Err(DetectError::Timeout(t)) => {
                        g.detect_timeouts.incr();
                        tracing::info!(timeout = ?t, "closing a client that sent nothing to detect");
                        return Ok(());
                    }
                    Err(e) => return Err(e.into()),
                },
                _ = drain.changed() => return Ok(()),
            }
        };
        match detected {
            Detected::Http1 => {
                g.connections_http1.incr();
                if let Err(reject) = self.check_first_head(&mut stream, &mut buf).await {
                    g.bad_requests.incr();
                    tracing::info!(status = reject.status, reason = %reject.reason, "rejecting malformed request");
                    let _ = stream.write_all(reject.response().as_bytes()).await;
                    let _ = stream.shutdown().await;
                    return Ok(());
                }
                let io = TokioIo::new(PrefixedIo::new(buf.freeze(), stream));
                let state = Arc::new(ConnState::default());
                let svc = ConnService::new(self.stacks.http.clone(), accept, state.clone());
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(self.cfg.header_read_timeout)
                    .max_buf_size(self.cfg.max_header_bytes);
                graceful(builder.serve_connection(io, svc), state, drain)
                    .await
                    .map_err(Into::into)
            }
            Detected::Http2 => {
                g.connections_http2.incr();
                let io = TokioIo::new(PrefixedIo::new(buf.freeze(), stream));
                let state = Arc::new(ConnState::default());
                let svc = ConnService::new(self.stacks.http.clone(), accept, state.clone());
                let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                builder.timer(TokioTimer::new());
                graceful(builder.serve_connection(io, svc), state, drain)
                    .await
                    .map_err(Into::into)
            }
            Detected::Opaque => {
                g.connections_opaque.incr();
                self.serve_opaque(stream, &buf, accept).await
            }
        }
    }

    async fn serve_opaque(
        &self,
        mut client: TcpStream,
        prefix: &[u8],
        accept: Accept,
    ) -> Result<(), Error> {
        let Some(logical) = self
            .stacks
            .opaque_routes
            .route_opaque(accept.orig_dst.port())
        else {
            tracing::info!("no route for opaque connection; closing");
            return Ok(());
        };
        let svc = self.stacks.opaque.new_service(logical.clone());
        let mut upstream = match svc
            .oneshot(OpaqueRequest {
                client: accept.client,
            })
            .await
        {
            Ok(upstream) => upstream,
            Err(error) => {
                tracing::warn!(service = %logical.service, %error, "opaque connection failed; closing");
                return Ok(());
            }
        };
        let (up, down) = tcp::forward(&mut client, prefix, &mut upstream, &self.forward).await?;
        tracing::debug!(service = %logical.service, to_upstream = up, to_client = down, "opaque connection done");
        Ok(())
    }

    /// Reads the first HTTP/1 request head completely and checks it parses.
    async fn check_first_head(
        &self,
        stream: &mut TcpStream,
        buf: &mut BytesMut,
    ) -> Result<(), Reject> {
        let limit = self.cfg.max_header_bytes;
        let read = async {
            loop {
                let mut headers = [httparse::EMPTY_HEADER; 128];
                match httparse::Request::new(&mut headers).parse(buf) {
                    Ok(httparse::Status::Complete(_)) => return Ok(()),
                    Ok(httparse::Status::Partial) if buf.len() >= limit => {
                        return Err(Reject::new(431, "request header too large"))
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(httparse::Error::TooManyHeaders) => {
                        return Err(Reject::new(431, "too many request headers"))
                    }
                    Err(e) => return Err(Reject::new(400, format!("malformed request: {e}"))),
                }
                buf.reserve(4096);
                match tokio::io::AsyncReadExt::read_buf(stream, buf).await {
                    Ok(0) | Err(_) => {
                        return Err(Reject::new(
                            400,
                            "connection closed inside the request head",
                        ))
                    }
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(self.cfg.header_read_timeout, read)
            .await
            .unwrap_or_else(|_| Err(Reject::new(408, "request head not received in time")))
    }
}

/// A hyper connection that can be asked to finish gracefully.
trait GracefulConn: Future<Output = Result<(), hyper::Error>> + Send + 'static {
    /// HTTP/1 only finishes what it has *parsed*: a request whose head baton already
    /// read (the first one) would be dropped by an early shutdown, so HTTP/1 shuts down
    /// only when idle between requests (see [`Graceful`]). HTTP/2's GOAWAY is safe at
    /// any time.
    const HTTP1: bool;
    fn graceful_shutdown(self: Pin<&mut Self>);
}

type Io = TokioIo<PrefixedIo<TcpStream>>;

impl GracefulConn for hyper::server::conn::http1::Connection<Io, ConnService<HttpStack>> {
    const HTTP1: bool = true;
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::Connection::graceful_shutdown(self)
    }
}

impl GracefulConn
    for hyper::server::conn::http2::Connection<Io, ConnService<HttpStack>, TokioExecutor>
{
    const HTTP1: bool = false;
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self)
    }
}

/// Runs `conn`; when `drain` fires, finishes it gracefully: HTTP/2 sends GOAWAY and
/// completes open streams; HTTP/1 closes at once when idle between requests, and
/// otherwise answers the request in flight (or the first one, already read) with
/// `connection: close` and then closes.
///
/// A plain function returning a boxed future, not an `async` block: proving a hyper
/// connection `Send` from inside the connection's `async fn` hits a rustc limitation
/// (higher-ranked lifetimes of boxed error types in generator witnesses), while here
/// the types are concrete. One allocation per connection is the price.
fn graceful<C: GracefulConn>(
    conn: C,
    state: Arc<ConnState>,
    drain: watch::Receiver<bool>,
) -> Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>> {
    Box::pin(Graceful {
        conn,
        state,
        drain: WatchStream::from_changes(drain),
        shutdown: false,
    })
}

pin_project_lite::pin_project! {
    struct Graceful<C> {
        #[pin]
        conn: C,
        state: Arc<ConnState>,
        drain: WatchStream<bool>,
        shutdown: bool,
    }
}

impl<C: GracefulConn> Future for Graceful<C> {
    type Output = Result<(), hyper::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if !this.state.draining.load(Ordering::Relaxed) && this.drain.poll_next_unpin(cx).is_ready()
        {
            this.state.draining.store(true, Ordering::Relaxed);
        }
        if !*this.shutdown && this.state.draining.load(Ordering::Relaxed) {
            let now = !C::HTTP1
                || (this.state.in_flight.load(Ordering::Relaxed) == 0
                    && this.state.started.load(Ordering::Relaxed) > 0);
            if now {
                *this.shutdown = true;
                this.conn.as_mut().graceful_shutdown();
            }
            // Otherwise the response in flight carries `connection: close`.
        }
        this.conn.poll(cx)
    }
}

/// A request refused before the HTTP server takes the connection.
struct Reject {
    status: u16,
    reason: String,
}

impl Reject {
    fn new(status: u16, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }

    fn response(&self) -> String {
        let phrase = http::StatusCode::from_u16(self.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Error");
        let body = format!("{}\n", self.reason);
        format!(
            "HTTP/1.1 {} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\nx-baton-error: bad-request\r\n\r\n{body}",
            self.status,
            body.len()
        )
    }
}

/// Per-connection request accounting, for graceful shutdown.
#[derive(Debug, Default)]
struct ConnState {
    started: AtomicUsize,
    in_flight: AtomicUsize,
    draining: AtomicBool,
}

/// The per-connection hyper service: attaches [`ClientInfo`] and calls the stack.
#[derive(Clone)]
struct ConnService<S> {
    stack: S,
    info: ClientInfo,
    state: Arc<ConnState>,
}

impl<S> ConnService<S> {
    fn new(stack: S, accept: Accept, state: Arc<ConnState>) -> Self {
        Self {
            stack,
            info: ClientInfo::new(accept),
            state,
        }
    }
}

impl<S> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ConnFuture<Oneshot<S, Request<Body>>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.state.started.fetch_add(1, Ordering::Relaxed);
        self.state.in_flight.fetch_add(1, Ordering::Relaxed);
        let http1 = req.version() != http::Version::HTTP_2;
        let mut req = req.map(Body::Incoming);
        req.extensions_mut().insert(self.info.clone());
        ConnFuture {
            inner: Oneshot::new(self.stack.clone(), req),
            state: self.state.clone(),
            http1,
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`ConnService`]. The stack answers every failure itself, so
    /// an error reaching here is a bug below; it is still answered, never turned into
    /// a dropped connection.
    struct ConnFuture<F> {
        #[pin]
        inner: F,
        state: Arc<ConnState>,
        http1: bool,
    }
}

impl<F> Future for ConnFuture<F>
where
    F: Future<Output = Result<Response<Body>, Error>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut rsp = match ready!(this.inner.poll(cx)) {
            Ok(rsp) => rsp,
            Err(e) => {
                tracing::error!(error = %e, "request stack failed");
                let (status, reason) = errors::status_for(&*e);
                errors::response(status, reason, e.to_string())
            }
        };
        this.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        if *this.http1 && this.state.draining.load(Ordering::Relaxed) {
            rsp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        Poll::Ready(Ok(rsp))
    }
}
