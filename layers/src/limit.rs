//! Load shedding: a global bound on requests in flight (`BATON_MAX_IN_FLIGHT`).
//!
//! Outermost in the HTTP stack, so a request over the limit costs nothing but a 503:
//! no routing, no balancer queue. Unlike tower's `ConcurrencyLimit` + `LoadShed` it
//! never waits for a permit and keeps no per-clone state: one shared atomic counts every
//! request from its arrival until its response headers are produced (the count is
//! also the `baton_in_flight_requests` gauge). Always ready.

use crate::{body::Body, errors, metrics::Counter, metrics::Gauge, Error};
use http::{Response, StatusCode};
use pin_project_lite::pin_project;
use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};
use tower_layer::Layer;
use tower_service::Service;

/// Layer for [`InFlightLimit`].
#[derive(Clone, Debug)]
pub struct InFlightLimitLayer {
    max: usize,
    in_flight: Gauge,
    shed: Counter,
}

impl InFlightLimitLayer {
    /// At most `max` requests in flight, counted in `in_flight`; refusals in `shed`.
    pub fn new(max: usize, in_flight: Gauge, shed: Counter) -> Self {
        Self {
            max,
            in_flight,
            shed,
        }
    }
}

impl<S> Layer<S> for InFlightLimitLayer {
    type Service = InFlightLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        InFlightLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// Answers 503 when too many requests are in flight (see the module docs).
#[derive(Clone, Debug)]
pub struct InFlightLimit<S> {
    inner: S,
    layer: InFlightLimitLayer,
}

impl<S, Req> Service<Req> for InFlightLimit<S>
where
    S: Service<Req, Response = Response<Body>, Error = Error>,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let guard = self.layer.in_flight.track();
        if self.layer.in_flight.get() > self.layer.max as i64 {
            drop(guard);
            self.layer.shed.incr();
            tracing::debug!(max = self.layer.max, "load shed");
            let rsp = errors::response(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!(
                    "overloaded: more than {} requests in flight",
                    self.layer.max
                ),
            );
            return ResponseFuture::Shed { rsp: Some(rsp) };
        }
        ResponseFuture::Inner {
            inner: self.inner.call(req),
            _guard: guard,
        }
    }
}

pin_project! {
    /// Response future of [`InFlightLimit`].
    #[project = Proj]
    #[allow(missing_docs)]
    pub enum ResponseFuture<F> {
        Inner { #[pin] inner: F, _guard: crate::metrics::GaugeGuard },
        Shed { rsp: Option<Response<Body>> },
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, Error>>,
{
    type Output = Result<Response<Body>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Inner { inner, .. } => inner.poll(cx),
            Proj::Shed { rsp } => {
                Poll::Ready(rsp.take().ok_or_else(|| "polled after completion".into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;
    use tower_test::mock;

    #[tokio::test]
    async fn sheds_over_the_limit_and_recovers() {
        let (svc, mut handle) = mock::pair::<(), Response<Body>>();
        handle.allow(10);
        let gauge = Gauge::default();
        let shed = Counter::default();
        let mut svc = InFlightLimitLayer::new(2, gauge.clone(), shed.clone()).layer(svc);
        let a = svc.ready().await.unwrap().call(());
        let b = svc.ready().await.unwrap().call(());
        assert_eq!(gauge.get(), 2);
        let c = svc.ready().await.unwrap().call(()).await.unwrap();
        assert_eq!(c.status(), 503);
        assert_eq!(shed.get(), 1);
        assert_eq!(gauge.get(), 2, "a refused request is not counted");

        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(Body::Empty));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(Body::Empty));
        assert_eq!(a.await.unwrap().status(), 200);
        assert_eq!(b.await.unwrap().status(), 200);
        assert_eq!(gauge.get(), 0);

        let d = svc.ready().await.unwrap().call(());
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(Body::Empty));
        assert_eq!(d.await.unwrap().status(), 200, "capacity is back");
    }
}
