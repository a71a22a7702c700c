//! `HttpProxy`: forwards a request to one endpoint and streams the response back.
//!
//! One per endpoint, built by [`NewHttpProxy`]. Each holds pooled hyper clients whose
//! connector always dials that endpoint, so the pool is per endpoint and goes away with
//! it. Bodies stream in both directions (never buffered). The request keeps its `Host`
//! (the upstream sees the name the client used); hop-by-hop headers are removed both
//! ways; `x-forwarded-for` and `forwarded` are added.
//!
//! An HTTP/1 upgrade request (WebSocket) keeps its `Connection: upgrade` and `Upgrade`
//! headers towards an HTTP/1 endpoint; when the endpoint answers 101, the response
//! carries hyper's upgrade handle for the endpoint's connection, and the server side
//! joins the two connections into a tunnel. CONNECT is refused by the router.
//!
//! The upstream HTTP version follows the logical service's setting: `auto` keeps the
//! client's (HTTP/2 in, HTTP/2 with prior knowledge out), `http1`/`http2` force one, so
//! an HTTP/2 client can reach an HTTP/1-only application and the reverse.
//!
//! HTTP/1 goes through the endpoint's [`H1Pool`] of keep-alive connections. HTTP/2
//! multiplexes every request
//! to an endpoint over one connection ([`H2Conn`]), opened on demand and replaced when
//! it closes: a pool keyed by `:authority` would open a connection per distinct Host a
//! client sends.
//!
//! A request the HTTP/2 connection hands back unsent (GOAWAY, or the connection
//! closing under it before it was written) is resent once on a fresh connection,
//! whatever its method. Streams the upstream refuses after they were written
//! (`REFUSED_STREAM`, or above a GOAWAY's last stream id) are not: hyper has consumed
//! their bodies.
//!
//! Always ready: connections are opened on demand. Failures are typed:
//! [`ConnectError`] when no connection could be made (the
//! request was not sent; retryable), [`UpstreamError`] otherwise.

use super::{
    connect::{connect, ConnectConfig},
    headers,
    pool::H1Pool,
};
use crate::{
    body::Body,
    errors::{ConnectError, UpstreamError},
    new_service::NewService,
    target::{ClientInfo, Endpoint, UpstreamProtocol},
    Error,
};
use arc_swap::ArcSwapOption;
use http::{header, uri, HeaderValue, Request, Response, Uri, Version};
use hyper::{body::Incoming, client::conn::http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pin_project_lite::pin_project;
use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};
use tower_service::Service;

/// Upstream client settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// How connections are opened.
    pub connect: Arc<ConnectConfig>,
    /// Idle pooled connections are closed after this long (`BATON_POOL_IDLE_TIMEOUT`).
    pub pool_idle_timeout: Duration,
    /// At most this many idle connections are kept per endpoint (`BATON_POOL_MAX_IDLE`).
    pub pool_max_idle: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect: Arc::default(),
            pool_idle_timeout: Duration::from_secs(30),
            pool_max_idle: 256,
        }
    }
}

/// Builds an [`HttpProxy`] per endpoint.
#[derive(Clone, Debug)]
pub struct NewHttpProxy {
    cfg: Arc<ClientConfig>,
}

impl NewHttpProxy {
    /// Proxies with `cfg`.
    pub fn new(cfg: ClientConfig) -> Self {
        Self { cfg: Arc::new(cfg) }
    }
}

impl NewService<Endpoint> for NewHttpProxy {
    type Service = HttpProxy;

    fn new_service(&self, endpoint: Endpoint) -> HttpProxy {
        let h1 = H1Pool::new(
            endpoint.addr,
            self.cfg.connect.clone(),
            self.cfg.pool_max_idle,
            self.cfg.pool_idle_timeout,
        );
        let authority = uri::Authority::try_from(endpoint.addr.to_string().as_str())
            .expect("a socket address is a valid authority");
        HttpProxy {
            h1,
            h2: Arc::new(H2Conn {
                addr: endpoint.addr,
                cfg: self.cfg.connect.clone(),
                sender: ArcSwapOption::empty(),
                connecting: tokio::sync::Mutex::new(()),
            }),
            addr: endpoint.addr,
            authority,
            upstream: endpoint.logical.upstream,
        }
    }
}

/// Proxies requests to one endpoint (see the module docs).
#[derive(Clone, Debug)]
pub struct HttpProxy {
    h1: Arc<H1Pool>,
    h2: Arc<H2Conn>,
    addr: SocketAddr,
    authority: uri::Authority,
    upstream: UpstreamProtocol,
}

impl HttpProxy {
    /// Rewrites a client's request into the request sent upstream.
    fn prepare(&self, req: Request<Body>) -> Request<Body> {
        let (mut parts, body) = req.into_parts();
        let upgrade = headers::upgrade_of(&parts.headers);
        headers::remove_hop_by_hop(&mut parts.headers);
        if let Some(client) = parts.extensions.get::<ClientInfo>() {
            headers::add_forwarded(&mut parts.headers, client);
        }
        let h2 = match self.upstream {
            UpstreamProtocol::Auto => parts.version == Version::HTTP_2,
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
        };
        let client_authority = parts.uri.authority().cloned();
        let mut uri = uri::Parts::default();
        uri.scheme = Some(uri::Scheme::HTTP);
        uri.path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .or_else(|| Some(uri::PathAndQuery::from_static("/")));
        if h2 {
            // HTTP/2 carries the host as :authority, taken from the URI.
            let host = parts
                .headers
                .remove(header::HOST)
                .and_then(|h| uri::Authority::try_from(h.as_bytes()).ok());
            uri.authority = host
                .or(client_authority)
                .or_else(|| Some(self.authority.clone()));
            parts.version = Version::HTTP_2;
        } else {
            // An HTTP/1 upgrade (WebSocket) is passed on; the connection then becomes a
            // tunnel if the endpoint agrees (101).
            if let Some(protocol) = upgrade {
                headers::set_upgrade(&mut parts.headers, protocol);
            }
            headers::join_cookies(&mut parts.headers);
            if !parts.headers.contains_key(header::HOST) {
                // From HTTP/2 (or an HTTP/1.0 client without Host): name the host.
                let host = client_authority.as_ref().unwrap_or(&self.authority);
                if let Ok(v) = HeaderValue::from_str(host.as_str()) {
                    parts.headers.insert(header::HOST, v);
                }
            }
            // Origin-form: hyper writes the URI as it is.
            uri.scheme = None;
            parts.version = Version::HTTP_11;
        }
        parts.uri = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
        Request::from_parts(parts, body)
    }
}

impl Service<Request<Body>> for HttpProxy {
    type Response = Response<Body>;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> ResponseFuture {
        let downstream = match req.version() {
            Version::HTTP_2 => Version::HTTP_2,
            _ => Version::HTTP_11,
        };
        let req = self.prepare(req);
        let inner = if req.version() == Version::HTTP_2 {
            Inner::H2 {
                inner: self.h2.clone().send(req),
            }
        } else {
            Inner::H1 {
                inner: Box::pin(self.h1.clone().send(req)),
            }
        };
        ResponseFuture {
            inner,
            addr: self.addr,
            downstream,
        }
    }
}

/// One multiplexed HTTP/2 connection to an endpoint.
#[derive(Debug)]
pub struct H2Conn {
    addr: SocketAddr,
    cfg: Arc<ConnectConfig>,
    sender: ArcSwapOption<http2::SendRequest<Body>>,
    /// Serializes opening a connection; never held while sending.
    connecting: tokio::sync::Mutex<()>,
}

type H2Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, Error>> + Send>>;
type H1Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Error>> + Send>>;

impl H2Conn {
    /// The live connection's sender, if any.
    fn live(&self) -> Option<http2::SendRequest<Body>> {
        self.sender
            .load()
            .as_deref()
            .filter(|s| !s.is_closed())
            .cloned()
    }

    async fn sender(&self) -> Result<http2::SendRequest<Body>, Error> {
        if let Some(s) = self.live() {
            return Ok(s);
        }
        let _opening = self.connecting.lock().await;
        if let Some(s) = self.live() {
            return Ok(s);
        }
        let stream = connect(self.addr, &self.cfg).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .keep_alive_timeout(Duration::from_secs(20))
            .handshake::<_, Body>(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError {
                addr: self.addr,
                source: e.into(),
            })?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%addr, %error, "HTTP/2 upstream connection ended");
            }
        });
        self.sender.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }

    /// Sends `req` on the live connection. A request the connection hands back unsent
    /// (it was closing: GOAWAY received, or closed under the request before it was
    /// written) is sent once more on a fresh connection: the upstream never saw it, so
    /// this is safe whatever the method, and its body is still unread.
    fn send(self: Arc<Self>, req: Request<Body>) -> H2Future {
        Box::pin(async move {
            let mut sender = self.sender().await?;
            let unsent = match sender.try_send_request(req).await {
                Ok(rsp) => return Ok(rsp),
                Err(mut e) => match e.take_message() {
                    Some(req) => req,
                    None => return Err(e.into_error().into()),
                },
            };
            tracing::debug!(addr = %self.addr, "HTTP/2 upstream connection closed before the request was sent; resending on a new one");
            // The handed-back request's connection is closed (`live` skips it).
            let mut sender = self.sender().await?;
            sender
                .try_send_request(unsent)
                .await
                .map_err(|e| e.into_error().into())
        })
    }
}

pin_project! {
    #[project = InnerProj]
    enum Inner {
        H1 { inner: H1Future },
        H2 { inner: H2Future },
    }
}

pin_project! {
    /// Response future of [`HttpProxy`].
    pub struct ResponseFuture {
        #[pin]
        inner: Inner,
        addr: SocketAddr,
        downstream: Version,
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<Body>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result: Result<Response<Body>, Error> = match this.inner.project() {
            InnerProj::H1 { inner } => ready!(inner.as_mut().poll(cx)),
            InnerProj::H2 { inner } => {
                ready!(inner.as_mut().poll(cx)).map(|r| r.map(Body::Incoming))
            }
        };
        match result {
            Ok(rsp) => {
                let (mut parts, body) = rsp.into_parts();
                let upgrade = (parts.status == http::StatusCode::SWITCHING_PROTOCOLS)
                    .then(|| headers::upgrade_of(&parts.headers))
                    .flatten();
                headers::remove_hop_by_hop(&mut parts.headers);
                // A 101 keeps its upgrade headers, and hyper's upgrade handle for the
                // endpoint's side rides along in the extensions to the server side.
                if let Some(protocol) = upgrade {
                    headers::set_upgrade(&mut parts.headers, protocol);
                }
                parts.version = *this.downstream;
                Poll::Ready(Ok(Response::from_parts(parts, body)))
            }
            // Typed failures (connect errors, already-wrapped upstream errors) pass as
            // they are; anything else is the upstream's.
            Err(e) if e.is::<ConnectError>() || e.is::<UpstreamError>() => Poll::Ready(Err(e)),
            Err(e) => Poll::Ready(Err(UpstreamError {
                addr: *this.addr,
                source: e,
            }
            .into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::{Accept, Lb, Logical, Protocol};

    fn proxy(upstream: UpstreamProtocol) -> HttpProxy {
        let logical = Logical {
            service: "web".into(),
            protocol: Protocol::Http,
            lb: Lb::P2c,
            upstream,
            dst: None,
        };
        NewHttpProxy::new(ClientConfig::default()).new_service(Endpoint {
            logical,
            id: "e".into(),
            addr: "10.0.0.5:8080".parse().unwrap(),
            handoff_port: None,
            weight: 1,
        })
    }

    fn client() -> ClientInfo {
        ClientInfo::new(Accept {
            client: "10.0.0.9:4000".parse().unwrap(),
            orig_dst: "10.0.0.1:80".parse().unwrap(),
        })
    }

    #[tokio::test]
    async fn http1_request_keeps_host_and_targets_the_endpoint() {
        let mut req = Request::get("/a?b=c")
            .header("host", "web.example")
            .header("connection", "close")
            .body(Body::Empty)
            .unwrap();
        req.extensions_mut().insert(client());
        let out = proxy(UpstreamProtocol::Auto).prepare(req);
        assert_eq!(out.uri(), "/a?b=c");
        assert_eq!(out.headers()["host"], "web.example");
        assert!(!out.headers().contains_key("connection"));
        assert_eq!(out.headers()["x-forwarded-for"], "10.0.0.9");
        assert_eq!(out.version(), Version::HTTP_11);
    }

    #[tokio::test]
    async fn versions_translate_both_ways() {
        // HTTP/2 client to an HTTP/1 upstream: :authority becomes Host.
        let req = Request::get("http://web.example/x")
            .version(Version::HTTP_2)
            .body(Body::Empty)
            .unwrap();
        let out = proxy(UpstreamProtocol::Http1).prepare(req);
        assert_eq!(out.version(), Version::HTTP_11);
        assert_eq!(out.headers()["host"], "web.example");

        // HTTP/1 client to an HTTP/2 upstream: Host becomes :authority.
        let req = Request::get("/x")
            .header("host", "web.example")
            .body(Body::Empty)
            .unwrap();
        let out = proxy(UpstreamProtocol::Http2).prepare(req);
        assert_eq!(out.version(), Version::HTTP_2);
        assert_eq!(out.uri(), "http://web.example/x");
        assert!(!out.headers().contains_key("host"));
    }
}
