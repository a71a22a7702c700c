//! Routing: pick the logical service for a request (or an opaque connection).
//!
//! Routes are an ordered list; the first that matches wins:
//!
//! | match | matches |
//! |---|---|
//! | `path:/prefix` | a path equal to `/prefix` or below it (`/prefix/...`); segment-aware, so `/objects` does not match `/objectsfoo` (a prefix ending in `/` matches anything under it) |
//! | `host:NAME` | the request's host (`Host` header, or the HTTP/2 authority), port ignored, case-insensitive; `host:*.example.com` matches any subdomain |
//! | `port:N` | the connection's original destination port |
//! | `*` | everything |
//!
//! Opaque TCP connections have no path or host: only `port:` and `*` routes apply.
//! [`Router`] sits above the logical cache; a request that matches nothing is answered
//! `404` right here. The router is always ready: readiness belongs to the routed
//! service, which is driven inside the response future.

use crate::{
    body::Body, errors, metrics::Counter, new_service::NewService, target::ClientInfo, Error,
};
use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use std::{
    fmt,
    future::Future,
    pin::Pin,
    str::FromStr,
    sync::Arc,
    task::{Context, Poll},
};
use tower::util::Oneshot;
use tower_service::Service;

/// What a route matches on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    /// A path prefix (segment-aware).
    Path(String),
    /// A host name, or a `*.suffix` wildcard (stored as `.suffix`).
    Host(String),
    /// An original destination port.
    Port(u16),
    /// Everything.
    Any,
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(p) => write!(f, "path:{p}"),
            Self::Host(h) if h.starts_with('.') => write!(f, "host:*{h}"),
            Self::Host(h) => write!(f, "host:{h}"),
            Self::Port(p) => write!(f, "port:{p}"),
            Self::Any => f.write_str("*"),
        }
    }
}

impl FromStr for Match {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(Self::Any);
        }
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| format!("match {s:?} is not path:/PREFIX, host:NAME, port:N or *"))?;
        match kind {
            "path" if value.starts_with('/') => Ok(Self::Path(value.to_string())),
            "path" => Err(format!("path prefix {value:?} must start with /")),
            "host" if value.is_empty() => Err("empty host name".to_string()),
            "host" => Ok(Self::Host(
                value
                    .strip_prefix('*')
                    .unwrap_or(value)
                    .to_ascii_lowercase(),
            )),
            "port" => value
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .map(Self::Port)
                .ok_or_else(|| format!("port {value:?} is not a number in 1..=65535")),
            _ => Err(format!(
                "match {s:?} is not path:/PREFIX, host:NAME, port:N or *"
            )),
        }
    }
}

impl Match {
    fn matches_http(&self, port: u16, host: Option<&str>, path: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Port(p) => *p == port,
            Self::Path(prefix) => {
                path.starts_with(prefix.as_str())
                    && (path.len() == prefix.len()
                        || prefix.ends_with('/')
                        || path.as_bytes()[prefix.len()] == b'/')
            }
            Self::Host(name) => host.is_some_and(|h| {
                let h = strip_port(h);
                if name.starts_with('.') {
                    h.len() > name.len() && h[h.len() - name.len()..].eq_ignore_ascii_case(name)
                } else {
                    h.eq_ignore_ascii_case(name)
                }
            }),
        }
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// A route target. Most are the same whatever the connection; the reserved `local`
/// target ([`LOCAL`](crate::target::LOCAL)) is bound to the original destination.
pub trait RouteTarget: Clone {
    /// The target for a request or connection whose original destination is `dst`.
    fn for_dst(&self, _dst: std::net::SocketAddr) -> Self {
        self.clone()
    }
}

impl RouteTarget for String {}

/// An ordered route table mapping matches to targets (logical services).
#[derive(Clone, Debug)]
pub struct Routes<L> {
    entries: Arc<[(Match, L)]>,
}

/// Parses `MATCH=SERVICE;MATCH=SERVICE;...` into (match, service name) pairs.
pub fn parse(text: &str) -> Result<Vec<(Match, String)>, String> {
    text.split(';')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|entry| {
            let (m, service) = entry
                .rsplit_once('=')
                .ok_or_else(|| format!("route {entry:?} is not MATCH=SERVICE"))?;
            let service = service.trim();
            if service.is_empty() {
                return Err(format!("route {entry:?} has an empty service name"));
            }
            Ok((m.trim().parse()?, service.to_string()))
        })
        .collect()
}

impl<L> Routes<L> {
    /// A table from ordered entries.
    pub fn new(entries: Vec<(Match, L)>) -> Self {
        Self {
            entries: entries.into(),
        }
    }

    /// The target for an HTTP request.
    pub fn route_http(&self, port: u16, host: Option<&str>, path: &str) -> Option<&L> {
        self.entries
            .iter()
            .find(|(m, _)| m.matches_http(port, host, path))
            .map(|(_, l)| l)
    }

    /// The target for an opaque connection to `port`.
    pub fn route_opaque(&self, port: u16) -> Option<&L> {
        self.entries
            .iter()
            .find(|(m, _)| matches!(m, Match::Any) || *m == Match::Port(port))
            .map(|(_, l)| l)
    }

    /// The entries, in order.
    pub fn entries(&self) -> &[(Match, L)] {
        &self.entries
    }
}

/// The host a request is addressed to: the `Host` header, else the URI authority
/// (HTTP/2 `:authority`).
pub fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
}

/// Routes HTTP requests to the service built by `N` for the matching target.
#[derive(Clone, Debug)]
pub struct Router<L, N> {
    routes: Routes<L>,
    new_logical: N,
    unrouted: Counter,
}

impl<L, N> Router<L, N> {
    /// Routes with `routes`, building (or fetching cached) services with `new_logical`.
    pub fn new(routes: Routes<L>, new_logical: N) -> Self {
        Self {
            routes,
            new_logical,
            unrouted: Counter::default(),
        }
    }

    /// Counts requests that match no route in `counter`.
    pub fn on_unrouted(mut self, counter: Counter) -> Self {
        self.unrouted = counter;
        self
    }
}

impl<L, N, S> Service<Request<Body>> for Router<L, N>
where
    L: RouteTarget,
    N: NewService<L, Service = S>,
    S: Service<Request<Body>, Response = Response<Body>, Error = Error>,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = RouteFuture<S>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if req.method() == http::Method::CONNECT {
            // A sidecar is not a forward proxy.
            let rsp = errors::response(
                StatusCode::NOT_IMPLEMENTED,
                "connect-unsupported",
                "CONNECT is not supported".to_string(),
            );
            return RouteFuture::Answered { rsp: Some(rsp) };
        }
        let dst = req
            .extensions()
            .get::<ClientInfo>()
            .map_or(([0, 0, 0, 0], 0).into(), |c| c.accept.orig_dst);
        let port = dst.port();
        let host = request_host(&req);
        match self.routes.route_http(port, host, req.uri().path()) {
            Some(target) => {
                let svc = self.new_logical.new_service(target.for_dst(dst));
                RouteFuture::Routed {
                    inner: Oneshot::new(svc, req),
                }
            }
            None => {
                self.unrouted.incr();
                tracing::info!(
                    host = host.unwrap_or(""),
                    path = req.uri().path(),
                    "no route"
                );
                let line = format!(
                    "no route for host {:?} path {:?}",
                    host.unwrap_or(""),
                    req.uri().path()
                );
                RouteFuture::Answered {
                    rsp: Some(errors::response(StatusCode::NOT_FOUND, "no-route", line)),
                }
            }
        }
    }
}

pin_project! {
    /// Response future of [`Router`].
    #[project = RouteProj]
    #[allow(missing_docs)]
    pub enum RouteFuture<S: Service<Request<Body>>> {
        /// Waiting on the routed service.
        Routed {
            #[pin]
            inner: Oneshot<S, Request<Body>>,
        },
        /// Answered here (404, 501).
        Answered {
            rsp: Option<Response<Body>>,
        },
    }
}

impl<S> Future for RouteFuture<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error>,
{
    type Output = Result<Response<Body>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RouteProj::Routed { inner } => inner.poll(cx),
            RouteProj::Answered { rsp } => {
                Poll::Ready(rsp.take().ok_or_else(|| "polled after completion".into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::new_service::NewServiceFn;
    use tower::{service_fn, ServiceExt};

    fn table(text: &str) -> Routes<String> {
        Routes::new(parse(text).unwrap())
    }

    #[test]
    fn parses_the_documented_example() {
        let r = parse("path:/objects=objects;host:meta=meta;*=web").unwrap();
        assert_eq!(
            r,
            [
                (Match::Path("/objects".into()), "objects".into()),
                (Match::Host("meta".into()), "meta".into()),
                (Match::Any, "web".into()),
            ]
        );
        assert_eq!(parse("port:8080=a").unwrap()[0].0, Match::Port(8080));
        assert_eq!(parse("").unwrap(), []);
    }

    #[test]
    fn rejects_bad_routes() {
        for bad in [
            "web",
            "path:x=a",
            "port:0=a",
            "port:99999=a",
            "queue:x=a",
            "*=",
            "host:=a",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn first_match_wins() {
        let t = table("path:/objects=objects;host:meta=meta;port:9000=nine;*=web");
        let r = |port, host, path| t.route_http(port, host, path).map(String::as_str);
        assert_eq!(r(80, Some("meta"), "/objects/1"), Some("objects"));
        assert_eq!(r(80, Some("META:8080"), "/x"), Some("meta"));
        assert_eq!(r(9000, Some("other"), "/"), Some("nine"));
        assert_eq!(r(80, None, "/objectsfoo"), Some("web"));
        assert_eq!(r(80, None, "/objects"), Some("objects"));
        let no_default = table("path:/a/=a;host:*.example.com=ex");
        assert_eq!(
            no_default.route_http(1, None, "/a/b"),
            Some(&"a".to_string())
        );
        assert_eq!(
            no_default.route_http(1, Some("x.example.com"), "/"),
            Some(&"ex".to_string())
        );
        assert_eq!(no_default.route_http(1, Some("example.com"), "/"), None);
        assert_eq!(no_default.route_http(1, Some("[::1]:80"), "/"), None);
    }

    #[test]
    fn opaque_routes_use_only_port_and_default() {
        let t = table("path:/=p;host:h=h;port:5432=pg;*=web");
        assert_eq!(t.route_opaque(5432).map(String::as_str), Some("pg"));
        assert_eq!(t.route_opaque(1).map(String::as_str), Some("web"));
        assert_eq!(table("path:/=p").route_opaque(1), None);
    }

    #[tokio::test]
    async fn router_answers_404_and_forwards_matches() {
        let new = NewServiceFn::new(|name: String| {
            service_fn(move |_: Request<Body>| {
                let name = name.clone();
                async move { Ok::<_, Error>(Response::new(Body::full(name))) }
            })
        });
        let router = Router::new(table("host:a=svc-a"), new);
        let req = Request::builder()
            .header("host", "a")
            .body(Body::Empty)
            .unwrap();
        let rsp = router.clone().oneshot(req).await.unwrap();
        assert_eq!(rsp.status(), 200);
        let req = Request::builder().uri("/nope").body(Body::Empty).unwrap();
        let rsp = router.oneshot(req).await.unwrap();
        assert_eq!(rsp.status(), 404);
        assert_eq!(rsp.headers()["x-baton-error"], "no-route");
    }
}
