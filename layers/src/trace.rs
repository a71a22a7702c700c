//! Spans per stack level: each request runs inside a span built from its target.
//!
//! `TraceLayer::new(|| debug_span!("logical", service = %name))` wraps a service so that
//! everything logged while its future runs (in any layer below) carries that context.
//! The connection level's span is made by the server; the logical and endpoint levels
//! use this layer. Spans below the enabled level cost one relaxed atomic load.

use crate::target::Endpoint;
use std::{
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
};
use tower_layer::Layer;
use tower_service::Service;
use tracing::{instrument::Instrumented, Instrument, Span};

/// Makes the span each call of a [`Trace`] runs in.
pub trait MakeSpan {
    /// A new span.
    fn make_span(&self) -> Span;
}

impl<F: Fn() -> Span> MakeSpan for F {
    fn make_span(&self) -> Span {
        self()
    }
}

/// The endpoint level's span: `endpoint{service, addr}` at debug (a named type, so
/// the endpoint service built per discovered endpoint has a nameable type).
#[derive(Clone, Debug)]
pub struct EndpointSpan {
    service: Arc<str>,
    addr: SocketAddr,
}

impl From<&Endpoint> for EndpointSpan {
    fn from(ep: &Endpoint) -> Self {
        Self {
            service: ep.logical.service.clone(),
            addr: ep.addr,
        }
    }
}

impl MakeSpan for EndpointSpan {
    fn make_span(&self) -> Span {
        tracing::debug_span!("endpoint", service = %self.service, addr = %self.addr)
    }
}

/// Layer for [`Trace`].
#[derive(Clone, Debug)]
pub struct TraceLayer<F> {
    make_span: F,
}

impl<F: MakeSpan + Clone> TraceLayer<F> {
    /// Runs each request in a span made by `make_span`.
    pub fn new(make_span: F) -> Self {
        Self { make_span }
    }
}

impl<S, F: Clone> Layer<S> for TraceLayer<F> {
    type Service = Trace<S, F>;
    fn layer(&self, inner: S) -> Self::Service {
        Trace {
            inner,
            make_span: self.make_span.clone(),
        }
    }
}

/// Runs each call's future inside a span. Readiness is the inner service's.
#[derive(Clone, Debug)]
pub struct Trace<S, F> {
    inner: S,
    make_span: F,
}

impl<S, F, Req> Service<Req> for Trace<S, F>
where
    S: Service<Req>,
    F: MakeSpan,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let span = self.make_span.make_span();
        let _enter = span.enter();
        self.inner.call(req).instrument(span.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        convert::Infallible,
        sync::{Arc, Mutex},
    };
    use tower::ServiceExt;

    /// The name of the span the caller runs in, if any.
    fn current() -> Option<&'static str> {
        Span::current().metadata().map(|m| m.name())
    }

    #[tokio::test]
    async fn the_inner_call_and_its_future_run_inside_the_span() {
        // A registry tracks the current span (the default no-op subscriber does not).
        let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let inner = tower::service_fn(move |()| {
            record.lock().unwrap().push(("call", current()));
            let record = record.clone();
            async move {
                tokio::task::yield_now().await;
                record.lock().unwrap().push(("future", current()));
                Ok::<_, Infallible>(())
            }
        });
        let svc = TraceLayer::new(|| tracing::info_span!("endpoint")).layer(inner);
        svc.oneshot(()).await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [("call", Some("endpoint")), ("future", Some("endpoint"))]
        );
        assert_eq!(current(), None, "the span is left after the call");
    }
}
