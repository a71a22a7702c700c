//! Failure modes of the HTTP stack, and the one place they become HTTP statuses.
//!
//! Layers fail with small typed errors ([`NoEndpoints`], [`ConnectError`],
//! [`UpstreamError`], tower's timeout `Elapsed`). [`ErrorResponse`] sits above them in each
//! logical stack, finds the most specific known error in the source chain, logs one
//! line naming the service, and answers with the matching status and a one-line body:
//!
//! | error | status |
//! |---|---|
//! | malformed request | 400 |
//! | no route | 404 |
//! | [`NoEndpoints`], overload | 503 |
//! | [`ConnectError::Refused`], [`UpstreamError`], anything else | 502 |
//! | [`ConnectError::Timeout`], request timeout (`tower::timeout::error::Elapsed`) | 504 |

use crate::{body::Body, Error};
use http::{header, HeaderValue, Response, StatusCode};
use pin_project_lite::pin_project;
use std::{
    error::Error as StdError,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};
use tower_layer::Layer;
use tower_service::Service;

/// The balancer had no endpoint for the service.
#[derive(Debug, thiserror::Error)]
#[error("no endpoints available for service {service}")]
pub struct NoEndpoints {
    /// The service.
    pub service: Arc<str>,
}

/// Connecting to an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The endpoint refused the connection (nothing listening).
    #[error("connection to {0} refused")]
    Refused(SocketAddr),
    /// The endpoint did not answer in time.
    #[error("connect to {0} timed out after {1:?}")]
    Timeout(SocketAddr, Duration),
    /// Any other socket error.
    #[error("connect to {addr} failed: {source}")]
    Io {
        /// The endpoint.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
}

impl ConnectError {
    /// Classifies a failed `connect` to `addr`.
    pub fn from_io(addr: SocketAddr, source: std::io::Error) -> Self {
        match source.kind() {
            std::io::ErrorKind::ConnectionRefused => Self::Refused(addr),
            std::io::ErrorKind::TimedOut => Self::Timeout(addr, Duration::ZERO),
            _ => Self::Io { addr, source },
        }
    }
}

/// The endpoint accepted the connection but the exchange failed (reset, closed early,
/// protocol error).
#[derive(Debug, thiserror::Error)]
#[error("upstream {addr} failed: {source}")]
pub struct UpstreamError {
    /// The endpoint.
    pub addr: SocketAddr,
    /// What went wrong.
    #[source]
    pub source: Error,
}

/// The status baton answers with for `error`, and a short machine-readable reason.
pub fn status_for(error: &(dyn StdError + 'static)) -> (StatusCode, &'static str) {
    let mut cur = Some(error);
    while let Some(e) = cur {
        if e.is::<NoEndpoints>() {
            return (StatusCode::SERVICE_UNAVAILABLE, "no-endpoints");
        }
        if e.is::<tower::timeout::error::Elapsed>() {
            return (StatusCode::GATEWAY_TIMEOUT, "request-timeout");
        }
        if let Some(c) = e.downcast_ref::<ConnectError>() {
            return match c {
                ConnectError::Timeout(..) => (StatusCode::GATEWAY_TIMEOUT, "connect-timeout"),
                ConnectError::Refused(_) => (StatusCode::BAD_GATEWAY, "connect-refused"),
                ConnectError::Io { .. } => (StatusCode::BAD_GATEWAY, "connect-failed"),
            };
        }
        if e.is::<UpstreamError>() {
            // Keep looking: a connect error may sit below the upstream error.
            let inner = e.source();
            if inner.is_some_and(has_connect_error) {
                cur = inner;
                continue;
            }
            return (StatusCode::BAD_GATEWAY, "upstream-failed");
        }
        cur = e.source();
    }
    (StatusCode::BAD_GATEWAY, "proxy-error")
}

fn has_connect_error(mut e: &(dyn StdError + 'static)) -> bool {
    loop {
        if e.is::<ConnectError>() {
            return true;
        }
        match e.source() {
            Some(s) => e = s,
            None => return false,
        }
    }
}

/// Whether `error` is (or was caused by) a failure to connect, so the request was never
/// sent and may be retried elsewhere.
pub fn is_connect_error(error: &(dyn StdError + 'static)) -> bool {
    has_connect_error(error)
}

/// The line a client is told for `reason`: what failed, never where (endpoint addresses
/// stay in the log line).
pub fn public_line(reason: &str, service: &str) -> String {
    match reason {
        "no-endpoints" => format!("no endpoints available for service {service}"),
        "request-timeout" => format!("service {service} did not answer in time"),
        "connect-timeout" => format!("connecting to service {service} timed out"),
        "connect-refused" => format!("service {service} refused the connection"),
        "connect-failed" => format!("connecting to service {service} failed"),
        "upstream-failed" => format!("service {service} failed before completing its response"),
        _ => format!("proxy error for service {service}"),
    }
}

/// Answers `error` for `service`: status, `x-baton-error` reason, one-line body.
pub fn error_response(error: &(dyn StdError + 'static), service: &str) -> Response<Body> {
    let (status, reason) = status_for(error);
    response(status, reason, public_line(reason, service))
}

/// A response baton generates itself: `status`, a one-line `text/plain` body, and an
/// `x-baton-error` header carrying `reason` so clients can tell it from an upstream's.
pub fn response(status: StatusCode, reason: &'static str, line: String) -> Response<Body> {
    let mut body = line;
    body.push('\n');
    let mut rsp = Response::new(Body::full(body));
    *rsp.status_mut() = status;
    let headers = rsp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert("x-baton-error", HeaderValue::from_static(reason));
    rsp
}

/// Turns errors from the inner service into HTTP responses (see the module docs).
///
/// Sits at the top of each logical stack, so everything below it can fail with a typed
/// error and the client still gets an answer. Readiness is the inner service's, except
/// that a readiness *error* (e.g. discovery failing under the balancer) makes this
/// service ready and answers the next request with that error's status: the stack above
/// never sees an error.
#[derive(Debug)]
pub struct ErrorResponse<S> {
    inner: S,
    service: Arc<str>,
    not_ready: Option<Error>,
}

impl<S: Clone> Clone for ErrorResponse<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            service: self.service.clone(),
            not_ready: None,
        }
    }
}

/// Layer for [`ErrorResponse`]: names the service in log lines.
#[derive(Clone, Debug)]
pub struct ErrorResponseLayer {
    service: Arc<str>,
}

impl ErrorResponseLayer {
    /// Answers errors of `service`'s stack with statuses.
    pub fn new(service: Arc<str>) -> Self {
        Self { service }
    }
}

impl<S> Layer<S> for ErrorResponseLayer {
    type Service = ErrorResponse<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ErrorResponse {
            inner,
            service: self.service.clone(),
            not_ready: None,
        }
    }
}

impl<S, Req> Service<Req> for ErrorResponse<S>
where
    S: Service<Req, Response = Response<Body>>,
    S::Error: Into<Error>,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.not_ready.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Ready(Err(e)) => {
                self.not_ready = Some(e.into());
                Poll::Ready(Ok(()))
            }
            other => other.map_err(Into::into),
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.not_ready.take() {
            None => ResponseFuture {
                inner: Some(self.inner.call(req)),
                failed: None,
                service: self.service.clone(),
            },
            Some(error) => ResponseFuture {
                inner: None,
                failed: Some(error),
                service: self.service.clone(),
            },
        }
    }
}

pin_project! {
    /// Response future of [`ErrorResponse`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<F>,
        failed: Option<Error>,
        service: Arc<str>,
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
    E: Into<Error>,
{
    type Output = Result<Response<Body>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.inner.as_pin_mut() {
            Some(inner) => ready!(inner.poll(cx)).map_err(Into::into),
            None => Err(this
                .failed
                .take()
                .unwrap_or_else(|| "response polled after completion".into())),
        };
        Poll::Ready(Ok(match result {
            Ok(rsp) => rsp,
            Err(error) => {
                let rsp = error_response(&*error, this.service);
                let status = rsp.status().as_u16();
                tracing::warn!(service = %this.service, status, %error, "request failed");
                rsp
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, ServiceExt};

    fn status(e: Error) -> StatusCode {
        status_for(&*e).0
    }

    #[test]
    fn maps_each_failure_to_its_status() {
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        assert_eq!(
            status(
                NoEndpoints {
                    service: "web".into()
                }
                .into()
            ),
            503
        );
        assert_eq!(status(tower::timeout::error::Elapsed::new().into()), 504);
        assert_eq!(status(ConnectError::Refused(addr).into()), 502);
        assert_eq!(
            status(ConnectError::Timeout(addr, Duration::ZERO).into()),
            504
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(
            status(
                UpstreamError {
                    addr,
                    source: reset.into()
                }
                .into()
            ),
            502
        );
        // A connect error wrapped by the HTTP client is still a connect error.
        let wrapped = UpstreamError {
            addr,
            source: ConnectError::Timeout(addr, Duration::ZERO).into(),
        };
        assert_eq!(status(wrapped.into()), 504);
        assert_eq!(status("anything else".into()), 502);
    }

    #[tokio::test]
    async fn errors_become_responses_with_a_one_line_body() {
        use http_body_util::BodyExt;
        let svc = ErrorResponseLayer::new("web".into()).layer(service_fn(|_: ()| async {
            Err::<Response<Body>, _>(NoEndpoints {
                service: "web".into(),
            })
        }));
        let rsp = svc.oneshot(()).await.unwrap();
        assert_eq!(rsp.status(), 503);
        assert_eq!(rsp.headers()["x-baton-error"], "no-endpoints");
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "no endpoints available for service web\n");
    }

    #[tokio::test]
    async fn readiness_errors_are_answered_too() {
        use tower_test::mock;
        let (svc, mut handle) = mock::pair::<(), Response<Body>>();
        handle.send_error(ConnectError::Refused("10.0.0.1:80".parse().unwrap()));
        let mut svc = ErrorResponseLayer::new("web".into()).layer(svc);
        let rsp = svc.ready().await.unwrap().call(()).await.unwrap();
        assert_eq!(rsp.status(), 502);
    }
}
