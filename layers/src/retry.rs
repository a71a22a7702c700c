//! Retries of requests that never reached an endpoint.
//!
//! A [`ConnectRetry`] policy for tower's `Retry`: when the endpoint refused or did not
//! answer the connection, the request was never sent, so an idempotent request
//! (RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE) without a body is sent
//! again — through the balancer, which picks again — at most `BATON_RETRIES` times.
//! Nothing else is retried: a request that may have reached the application is never
//! repeated, and a body is never buffered to make a retry possible.
//!
//! Sits below the request timeout (retries share one deadline) and above the shared
//! balancer.

use crate::{body::Body, errors, proxy::tcp::OpaqueRequest, Error};
use http::{Method, Request, Response};
use tokio::net::TcpStream;
use tower::retry::Policy;

/// Retry requests whose connection attempt failed (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct ConnectRetry {
    remaining: usize,
}

impl ConnectRetry {
    /// At most `retries` retries per request.
    pub fn new(retries: usize) -> Self {
        Self { remaining: retries }
    }
}

impl ConnectRetry {
    /// Decides after an attempt: retry only a connect failure, within the bound.
    fn after<T>(&mut self, result: &Result<T, Error>) -> Option<std::future::Ready<()>> {
        match result {
            Err(e) if self.remaining > 0 && errors::is_connect_error(&**e) => {
                self.remaining -= 1;
                tracing::debug!(error = %e, left = self.remaining, "retrying on another endpoint");
                Some(std::future::ready(()))
            }
            _ => None,
        }
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl Policy<Request<Body>, Response<Body>, Error> for ConnectRetry {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _req: &mut Request<Body>,
        result: &mut Result<Response<Body>, Error>,
    ) -> Option<Self::Future> {
        self.after(result)
    }

    fn clone_request(&mut self, req: &Request<Body>) -> Option<Request<Body>> {
        if self.remaining == 0
            || !is_idempotent(req.method())
            || !http_body::Body::is_end_stream(req.body())
        {
            return None;
        }
        let mut copy = Request::new(Body::Empty);
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        *copy.extensions_mut() = req.extensions().clone();
        Some(copy)
    }
}

/// Opaque connections are retried on another endpoint when connecting fails: nothing
/// was sent yet.
impl Policy<OpaqueRequest, TcpStream, Error> for ConnectRetry {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _req: &mut OpaqueRequest,
        result: &mut Result<TcpStream, Error>,
    ) -> Option<Self::Future> {
        self.after(result)
    }

    fn clone_request(&mut self, req: &OpaqueRequest) -> Option<OpaqueRequest> {
        (self.remaining > 0).then_some(*req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::errors::ConnectError;
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };
    use tower::{retry::RetryLayer, service_fn, Layer, ServiceExt};

    /// Fails the first `fail` calls with `error`, then answers 200.
    fn flaky(
        fail: usize,
        error: fn() -> Error,
    ) -> (
        impl tower::Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let svc = service_fn(move |_req: Request<Body>| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < fail {
                    Err(error())
                } else {
                    Ok(Response::new(Body::Empty))
                }
            }
        });
        (svc, calls)
    }

    fn refused() -> Error {
        ConnectError::Refused("10.0.0.1:80".parse().unwrap()).into()
    }

    #[tokio::test]
    async fn retries_idempotent_requests_on_connect_failure() {
        let (svc, calls) = flaky(2, refused);
        let svc = RetryLayer::new(ConnectRetry::new(2)).layer(svc);
        let rsp = svc
            .oneshot(Request::get("/").body(Body::Empty).unwrap())
            .await;
        assert!(rsp.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn gives_up_after_the_bound() {
        let (svc, calls) = flaky(5, refused);
        let svc = RetryLayer::new(ConnectRetry::new(2)).layer(svc);
        let err = svc
            .oneshot(Request::get("/").body(Body::Empty).unwrap())
            .await
            .unwrap_err();
        assert!(errors::is_connect_error(&*err));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn never_retries_what_may_have_reached_the_app() {
        // Not idempotent.
        let (svc, calls) = flaky(1, refused);
        let svc = RetryLayer::new(ConnectRetry::new(2)).layer(svc);
        assert!(svc
            .oneshot(Request::post("/").body(Body::Empty).unwrap())
            .await
            .is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Has a body.
        let (svc, calls) = flaky(1, refused);
        let svc = RetryLayer::new(ConnectRetry::new(2)).layer(svc);
        assert!(svc
            .oneshot(Request::put("/").body(Body::full("x")).unwrap())
            .await
            .is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Failed after connecting.
        let (svc, calls) = flaky(1, || "reset by peer".into());
        let svc = RetryLayer::new(ConnectRetry::new(2)).layer(svc);
        assert!(svc
            .oneshot(Request::get("/").body(Body::Empty).unwrap())
            .await
            .is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
