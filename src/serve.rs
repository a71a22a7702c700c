//! Serving one accepted connection: detect, then HTTP (hyper) or opaque (splice).
//!
//! The connection level of the stack: the open-connections gauge, a span naming the
//! client and original destination, detection with its timeout, and — for HTTP/1 — a
//! check of the first request head and of each head that wakes a parked connection (a
//! malformed one is answered `400` with a body and closed; one over
//! `BATON_MAX_HEADER_BYTES` or `MAX_HEADERS` (100) is answered `431`). Every request then
//! carries the connection's [`ClientInfo`] into the request stack.
//!
//! Idle HTTP/1 keep-alive connections are parked without buffers (see the `http1` module).
//!
//! Shutdown: each connection holds a receiver of the drain signal. When it fires,
//! HTTP/1 connections finish the request in flight and close (idle keep-alives close
//! at once), HTTP/2 connections send GOAWAY and finish open streams, a connection
//! still waiting for its first request gets it answered (a client does not retry a
//! request that failed on a fresh connection; the detection and header timeouts bound
//! a silent one) and then closes, and opaque connections run on until they end or the
//! grace period does.

mod conn;
mod http1;
mod http2;

use self::{
    conn::{ConnService, ConnState},
    http1::Http1Config,
};
use crate::stack::{HttpStack, Stacks};
use baton_layers::{
    detect::{self, DetectError, Detected},
    handoff::{
        fe::{Takeover, TakeoverIo},
        Handoff,
    },
    io::PrefixedIo,
    metrics::{Counter, Metrics},
    new_service::NewService,
    proxy::tcp::{self, ForwardMetrics, OpaqueRequest},
    route::RouteTarget,
    target::{Accept, ClientInfo},
    Error,
};
use bytes::{Bytes, BytesMut};
use std::{future::Future, sync::Arc, time::Duration};
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::watch};
use tower::ServiceExt;
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
    /// `BATON_IDLE_PARK`.
    pub idle_park: Duration,
}

/// Serves accepted connections with the stacks.
pub struct Server {
    cfg: ServeConfig,
    http1: Http1Config,
    stacks: Stacks,
    metrics: Metrics,
    forward: ForwardMetrics,
    handoff: Option<Arc<Handoff>>,
}

impl Server {
    /// A server for `stacks`.
    pub fn new(
        cfg: ServeConfig,
        stacks: Stacks,
        metrics: Metrics,
        handoff: Option<Arc<Handoff>>,
    ) -> Self {
        let g = metrics.global();
        let forward = ForwardMetrics {
            to_upstream: g.opaque_bytes_in.clone(),
            to_client: g.opaque_bytes_out.clone(),
        };
        let http1 = Http1Config {
            header_read_timeout: cfg.header_read_timeout,
            max_header_bytes: cfg.max_header_bytes,
            park_after: cfg.idle_park,
            parks: metrics.global().idle_parks.clone(),
            bad_requests: metrics.global().bad_requests.clone(),
        };
        Self {
            cfg,
            http1,
            stacks,
            metrics,
            forward,
            handoff,
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
        drain: watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let g = self.metrics.global();
        let mut buf = BytesMut::new();
        let detected = if self.cfg.opaque_ports.contains(&accept.orig_dst.port()) {
            Detected::Opaque
        } else {
            let limit = self.cfg.max_header_bytes;
            // Not cut short by a drain: a new connection's first request may already be
            // on its way, and a client does not retry a request that failed on a fresh
            // connection. The detection timeout bounds a silent one.
            match detect::detect(&mut stream, &mut buf, self.cfg.detect_timeout, limit).await {
                Ok(d) => d,
                Err(DetectError::Timeout(t)) => {
                    g.detect_timeouts.incr();
                    tracing::info!(timeout = ?t, "closing a client that sent nothing to detect");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        };
        match detected {
            Detected::Http1 => {
                g.connections_http1.incr();
                // The first request is answered even when a drain begins meanwhile
                // (the header read timeout bounds it); the connection closes after it.
                let limit = self.cfg.max_header_bytes;
                let timeout = self.cfg.header_read_timeout;
                match read_head(&mut stream, &mut buf, limit, timeout).await {
                    Ok(true) => {}
                    Ok(false) => return Ok(()),
                    Err(r) => {
                        reject(&mut stream, &r, &g.bad_requests).await;
                        return Ok(());
                    }
                }
                let read = buf.freeze();
                // A connection whose first request may be handed off (see handoff::fe).
                let takeover = self
                    .handoff
                    .as_ref()
                    .and_then(|_| Takeover::new(&stream, read.clone(), accept.orig_dst));
                let (io, svc, state) = self.http_conn(stream, read, accept, takeover.clone());
                let served = http1::serve(io, svc, state, &self.http1, drain).await;
                if takeover.is_some_and(|t| t.moved()) {
                    // The server failed on purpose: the connection lives on at a BE.
                    return Ok(());
                }
                served
            }
            Detected::Http2 => {
                g.connections_http2.incr();
                let (io, svc, state) = self.http_conn(stream, buf.freeze(), accept, None);
                http2::serve(io, svc, state, self.cfg.header_read_timeout, drain)
                    .await
                    .map_err(Into::into)
            }
            Detected::Opaque => {
                g.connections_opaque.incr();
                self.serve_opaque(stream, &buf, accept).await
            }
        }
    }

    /// What an HTTP connection is served with: the socket replaying what detection
    /// read, the per-connection service, and the connection's accounting.
    fn http_conn(
        &self,
        stream: TcpStream,
        read: Bytes,
        accept: Accept,
        takeover: Option<Takeover>,
    ) -> (
        PrefixedIo<TakeoverIo>,
        ConnService<HttpStack>,
        Arc<ConnState>,
    ) {
        let state = Arc::new(ConnState::default());
        let info = ClientInfo::new(accept);
        let svc = ConnService::new(
            self.stacks.http.clone(),
            info,
            state.clone(),
            takeover.clone(),
        );
        let io = TakeoverIo::new(stream, takeover);
        (PrefixedIo::new(read, io), svc, state)
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
        let logical = logical.for_dst(accept.orig_dst);
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
}

/// The drain signal as a stream that yields once shutdown has begun — at once if it
/// already has (a connection taken from the listen backlog after the signal).
fn drain_signal(drain: watch::Receiver<bool>) -> tokio_stream::wrappers::WatchStream<bool> {
    if *drain.borrow() {
        tokio_stream::wrappers::WatchStream::new(drain)
    } else {
        tokio_stream::wrappers::WatchStream::from_changes(drain)
    }
}

/// The most request headers baton accepts, in its own check of a request head and in
/// hyper's parser alike, so both answer the same request the same way (`431` beyond).
/// hyper keeps up to 100 header slots on the stack and allocates for more, on every
/// request: 100 keeps its parser allocation-free.
pub(super) const MAX_HEADERS: usize = 100;

/// Reads one HTTP/1 request head completely into `buf` (after what `buf` already
/// holds) and checks it parses, within `timeout`. Used for a connection's first
/// request and for the first request after a park, while baton holds the bare socket.
///
/// `Ok(false)`: the client closed the connection before sending anything (an idle
/// keep-alive connection ending), which is no malformed request.
pub(super) async fn read_head<I>(
    io: &mut I,
    buf: &mut BytesMut,
    limit: usize,
    timeout: Duration,
) -> Result<bool, Reject>
where
    I: tokio::io::AsyncRead + Unpin,
{
    let read = async {
        while buf.is_empty() || !parse_head(buf, limit)? {
            buf.reserve(4096);
            match tokio::io::AsyncReadExt::read_buf(io, buf).await {
                Ok(0) | Err(_) if buf.is_empty() => return Ok(false),
                Ok(0) | Err(_) => {
                    return Err(Reject::new(
                        400,
                        "connection closed inside the request head",
                    ))
                }
                Ok(_) => {}
            }
        }
        Ok(true)
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| Err(Reject::new(408, "request head not received in time")))
}

/// Answers a request head baton refused (see [`read_head`]): counts it, logs it (the
/// connection's span names the client), writes the response and closes.
pub(super) async fn reject<I>(io: &mut I, reject: &Reject, bad_requests: &Counter)
where
    I: tokio::io::AsyncWrite + Unpin,
{
    bad_requests.incr();
    tracing::info!(status = reject.status, reason = %reject.reason, "rejecting malformed request");
    let _ = io.write_all(reject.response().as_bytes()).await;
    let _ = io.shutdown().await;
}

/// Whether `buf` holds a complete, valid request head. A plain function so that the
/// parser's header array lives on the stack, not in every connection's task.
fn parse_head(buf: &[u8], limit: usize) -> Result<bool, Reject> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::Request::new(&mut headers).parse(buf) {
        // A head that arrived whole in one read is held to the limit all the same.
        Ok(httparse::Status::Complete(n)) if n > limit => {
            Err(Reject::new(431, "request header too large"))
        }
        Ok(httparse::Status::Complete(_)) => Ok(true),
        Ok(httparse::Status::Partial) if buf.len() >= limit => {
            Err(Reject::new(431, "request header too large"))
        }
        Ok(httparse::Status::Partial) => Ok(false),
        Err(httparse::Error::TooManyHeaders) => Err(Reject::new(431, "too many request headers")),
        Err(e) => Err(Reject::new(400, format!("malformed request: {e}"))),
    }
}

/// A request refused before the HTTP server takes the connection.
pub(super) struct Reject {
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn head(bytes: &[u8], limit: usize) -> Result<bool, u16> {
        let mut io = bytes;
        // Room for everything: one read takes it all, as when it all arrived at once.
        let mut buf = BytesMut::with_capacity(bytes.len() + 4096);
        read_head(&mut io, &mut buf, limit, Duration::from_secs(1))
            .await
            .map_err(|r| r.status)
    }

    #[tokio::test]
    async fn a_head_over_the_limit_is_431_however_it_arrives() {
        let big = format!("GET / HTTP/1.1\r\nx-big: {}\r\n\r\n", "a".repeat(70_000));
        // Whole (one read takes all of it) and cut short (still partial at the limit).
        assert_eq!(head(big.as_bytes(), 65_536).await, Err(431));
        assert_eq!(head(&big.as_bytes()[..66_000], 65_536).await, Err(431));
        assert_eq!(head(big.as_bytes(), 80_000).await, Ok(true));
        assert_eq!(
            head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 8192).await,
            Ok(true)
        );
        assert_eq!(
            head(b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 8192).await,
            Err(400)
        );
        assert_eq!(head(b"", 8192).await, Ok(false));
        assert_eq!(head(b"GET / HTTP/1.1\r\n", 8192).await, Err(400));
    }
}
