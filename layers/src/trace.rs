//! Spans per stack level: each request runs inside a span built from its target.
//!
//! `TraceLayer::new(|| debug_span!("logical", service = %name))` wraps a service so that
//! everything logged while its future runs (in any layer below) carries that context.
//! The connection level's span is made by the server; the logical and endpoint levels
//! use this layer. Spans below the enabled level cost one relaxed atomic load.

use std::task::{Context, Poll};
use tower_layer::Layer;
use tower_service::Service;
use tracing::{instrument::Instrumented, Instrument, Span};

/// Layer for [`Trace`].
#[derive(Clone, Debug)]
pub struct TraceLayer<F> {
    make_span: F,
}

impl<F: Fn() -> Span + Clone> TraceLayer<F> {
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
    F: Fn() -> Span,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let span = (self.make_span)();
        let _enter = span.enter();
        self.inner.call(req).instrument(span.clone())
    }
}
