//! The per-connection hyper service and its accounting.

use baton_layers::{body::Body, errors, handoff::fe::Takeover, target::ClientInfo, Error};
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::{body::Incoming, upgrade::OnUpgrade};
use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{ready, Context, Poll},
};
use tower::util::Oneshot;

/// What a connection is doing, shared by its service, its response bodies and its I/O.
#[derive(Debug, Default)]
pub(super) struct ConnState {
    /// Requests received so far.
    started: AtomicUsize,
    /// Requests whose response has not been completely written yet.
    active: AtomicUsize,
    /// Shutdown has begun: answer what is in flight with `connection: close`.
    draining: AtomicBool,
    /// The endpoint's side of an upgrade answered 101: the connection becomes a tunnel.
    upgrade: Mutex<Option<OnUpgrade>>,
}

impl ConnState {
    /// Between requests as far as baton can tell: a request was served and no response
    /// is being produced or written. (hyper knows better — a head may be arriving — and
    /// an HTTP/1 connection asked to finish while busy finishes its exchange first.)
    pub(super) fn idle(&self) -> bool {
        self.quiet() && self.started() > 0
    }

    /// No response is being produced or written (a fresh connection is quiet too).
    pub(super) fn quiet(&self) -> bool {
        self.active.load(Ordering::Acquire) == 0
    }

    /// Requests received so far.
    pub(super) fn started(&self) -> usize {
        self.started.load(Ordering::Acquire)
    }

    /// The endpoint's side of a switched connection, if a 101 went out.
    pub(super) fn take_upgrade(&self) -> Option<OnUpgrade> {
        self.upgrade
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    pub(super) fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub(super) fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// The per-connection hyper service: attaches [`ClientInfo`] and calls the stack.
#[derive(Clone)]
pub(super) struct ConnService<S> {
    stack: S,
    info: ClientInfo,
    state: Arc<ConnState>,
    /// Given to the connection's first request (see `handoff::fe`).
    takeover: Option<Takeover>,
}

impl<S> ConnService<S> {
    pub(super) fn new(
        stack: S,
        info: ClientInfo,
        state: Arc<ConnState>,
        takeover: Option<Takeover>,
    ) -> Self {
        Self {
            stack,
            info,
            state,
            takeover,
        }
    }
}

impl<S> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone,
{
    type Response = Response<ConnBody>;
    type Error = Infallible;
    type Future = ConnFuture<Oneshot<S, Request<Body>>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let first = self.state.started.fetch_add(1, Ordering::AcqRel) == 0;
        self.state.active.fetch_add(1, Ordering::AcqRel);
        let http1 = req.version() != http::Version::HTTP_2;
        let mut req = req.map(Body::Incoming);
        req.extensions_mut().insert(self.info.clone());
        let takeover = self.takeover.as_ref().filter(|_| first).cloned();
        if let Some(t) = &takeover {
            req.extensions_mut().insert(t.clone());
        }
        ConnFuture {
            inner: Oneshot::new(self.stack.clone(), req),
            state: Some(self.state.clone()),
            http1,
            takeover,
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`ConnService`]. The stack answers every failure itself, so
    /// an error reaching here is a bug below; it is still answered, never turned into
    /// a dropped connection.
    pub(super) struct ConnFuture<F> {
        #[pin]
        inner: F,
        // Moved into the response body; released here if the future is dropped first.
        state: Option<Arc<ConnState>>,
        http1: bool,
        takeover: Option<Takeover>,
    }

    impl<F> PinnedDrop for ConnFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(state) = this.project().state.take() {
                state.active.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl<F> Future for ConnFuture<F>
where
    F: Future<Output = Result<Response<Body>, Error>>,
{
    type Output = Result<Response<ConnBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut rsp = match ready!(this.inner.poll(cx)) {
            Ok(rsp) => rsp,
            Err(e) => {
                tracing::error!(error = %e, "request stack failed");
                errors::error_response(&*e, "-")
            }
        };
        if let Some(t) = this.takeover.take() {
            // Decided: the gate stops recording (a no-op after a handoff).
            t.release();
        }
        let state = this.state.take();
        if rsp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            // Keep the endpoint's connection for the tunnel (see `http1::serve`).
            if let (Some(state), true) = (&state, *this.http1) {
                let upstream = hyper::upgrade::on(&mut rsp);
                *state.upgrade.lock().unwrap_or_else(|e| e.into_inner()) = Some(upstream);
            }
        }
        if *this.http1 && state.as_ref().is_some_and(|s| s.draining()) {
            rsp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        Poll::Ready(Ok(rsp.map(|body| ConnBody { body, state })))
    }
}

/// A response body that marks its exchange finished when hyper is done with it (fully
/// written, or abandoned).
pub(super) struct ConnBody {
    body: Body,
    state: Option<Arc<ConnState>>,
}

impl Drop for ConnBody {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            state.active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl http_body::Body for ConnBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
