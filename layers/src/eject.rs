//! `Eject`: take an endpoint that cannot be connected to out of its balancer for a
//! while (passive health checking, Envoy's outlier ejection, linkerd's failure
//! accrual).
//!
//! An endpoint that refuses connections answers at once, so PeakEWMA would record it
//! as the fastest endpoint of all and p2c would keep choosing it; round-robin would
//! send it every n-th request. Discovery may not notice (static configuration has no
//! health checks; Consul's checks run every few seconds). So every endpoint service
//! sits in an [`Eject`]: after `BATON_EJECT_FAILURES` consecutive connect failures
//! (refused, unreachable, timed out — the request was never sent) the endpoint is
//! *ejected*: it answers not ready for `BATON_EJECT_TIME`, doubling with each
//! ejection in a row up to `BATON_EJECT_TIME_MAX`, and the balancers pick among the
//! others. When the time is up it is ready again; its next result decides: a success
//! forgets its failures, one more connect failure ejects it again, for longer.
//!
//! Only connect failures count: a response, even a 5xx, means the endpoint is there,
//! and errors after a request was sent are the application's to report. And the last
//! endpoint of a balancer that is not ejected is never ejected (the panic rule of
//! Envoy's outlier detection): with every endpoint failing, requests fail fast with
//! 502 instead of waiting for an ejection to end.
//!
//! Sits at the endpoint level, outside the terminal, inside the balancer (which reads
//! its readiness). Not ready only while ejected, and then it wakes the task that
//! polled it when the ejection ends.

use crate::{
    errors::ConnectError,
    metrics::Counter,
    new_service::NewService,
    target::{Endpoint, Logical},
    Error,
};
use pin_project_lite::pin_project;
use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
        Arc, Mutex, Weak,
    },
    task::{ready, Context, Poll},
    time::Duration,
};
use tokio::time::{Instant, Sleep};
use tower_service::Service;

/// Ejection settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EjectConfig {
    /// Consecutive connect failures that eject an endpoint (0: never eject).
    pub failures: u32,
    /// How long the first ejection lasts.
    pub time: Duration,
    /// The longest ejection (each one in a row doubles the time up to this).
    pub time_max: Duration,
}

impl Default for EjectConfig {
    fn default() -> Self {
        Self {
            failures: 3,
            time: Duration::from_secs(1),
            time_max: Duration::from_secs(30),
        }
    }
}

/// How many of a service's endpoints exist and how many are ejected.
#[derive(Debug, Default)]
struct ServiceHealth {
    endpoints: AtomicUsize,
    ejected: AtomicUsize,
}

impl ServiceHealth {
    /// Counts one more ejected endpoint unless that would leave none in.
    fn try_eject(&self) -> bool {
        let endpoints = self.endpoints.load(Ordering::Acquire);
        self.ejected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |e| {
                (e + 1 < endpoints).then_some(e + 1)
            })
            .is_ok()
    }
}

/// One endpoint's failure record, shared with its response futures.
#[derive(Debug)]
struct State {
    cfg: EjectConfig,
    health: Arc<ServiceHealth>,
    /// Connect failures in a row.
    failures: AtomicU32,
    /// Ejections in a row (the next one lasts `time * 2^ejections`).
    ejections: AtomicU32,
    /// Set by a response future that ejected the endpoint; the service then starts
    /// the ejection's timer.
    ejected: AtomicBool,
    counter: Counter,
}

impl State {
    fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.ejections.store(0, Ordering::Relaxed);
    }

    fn failed(&self) {
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures < self.cfg.failures || self.ejected.load(Ordering::Acquire) {
            return;
        }
        // Count it first, so the count never lags the flag; undo if another failure
        // of this endpoint won the race.
        if !self.health.try_eject() {
            return;
        }
        if self
            .ejected
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.counter.incr();
        } else {
            self.health.ejected.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// How long the ejection just begun lasts.
    fn ejection_time(&self) -> Duration {
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        self.cfg
            .time
            .saturating_mul(1u32 << n)
            .min(self.cfg.time_max)
    }

    /// The ejection is over: back in, one failure away from the next.
    fn reinstate(&self) {
        self.failures
            .store(self.cfg.failures.saturating_sub(1), Ordering::Relaxed);
        self.ejected.store(false, Ordering::Release);
        self.health.ejected.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An endpoint service that is not ready while ejected (see the module docs).
#[derive(Debug)]
pub struct Eject<S> {
    inner: S,
    state: Arc<State>,
    service: Arc<str>,
    addr: std::net::SocketAddr,
    /// While ejected: when it ends.
    until: Option<Pin<Box<Sleep>>>,
}

impl<S> Drop for Eject<S> {
    fn drop(&mut self) {
        // Only the service itself ever leaves; response futures keep only the record.
        self.state.health.endpoints.fetch_sub(1, Ordering::AcqRel);
        if self.state.ejected.swap(false, Ordering::AcqRel) {
            self.state.health.ejected.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl<S, Req> Service<Req> for Eject<S>
where
    S: Service<Req>,
    S::Error: Into<Error>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.until.is_none() && self.state.ejected.load(Ordering::Acquire) {
            let time = self.state.ejection_time();
            tracing::warn!(
                service = %self.service,
                endpoint = %self.addr,
                ejected_for = ?time,
                failures = self.state.failures.load(Ordering::Relaxed),
                "endpoint ejected after consecutive connect failures"
            );
            self.until = Some(Box::pin(tokio::time::sleep_until(Instant::now() + time)));
        }
        if let Some(until) = &mut self.until {
            ready!(until.as_mut().poll(cx));
            self.until = None;
            self.state.reinstate();
            tracing::info!(service = %self.service, endpoint = %self.addr, "endpoint back from ejection");
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
            state: (self.state.cfg.failures > 0).then(|| self.state.clone()),
        }
    }
}

pin_project! {
    /// Response future of [`Eject`]: records the outcome.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        state: Option<Arc<State>>,
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<Error>,
{
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx)).map_err(Into::into);
        if let Some(state) = this.state.take() {
            match &result {
                Ok(_) => state.succeeded(),
                Err(e) if e.is::<ConnectError>() => state.failed(),
                // Sent, then failed: not the endpoint's absence.
                Err(_) => {}
            }
        }
        Poll::Ready(result)
    }
}

/// Builds an [`Eject`] around every endpoint service `N` builds; endpoints of one
/// logical target (one balancer: a service and protocol, a `local` destination) share
/// the count that keeps the last one in.
#[derive(Clone)]
pub struct NewEject<N> {
    inner: N,
    cfg: EjectConfig,
    services: Arc<Mutex<HashMap<Logical, Weak<ServiceHealth>>>>,
    counters: Arc<dyn Fn(&Endpoint) -> Counter + Send + Sync>,
}

impl<N: std::fmt::Debug> std::fmt::Debug for NewEject<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewEject")
            .field("inner", &self.inner)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl<N> NewEject<N> {
    /// Ejects failing endpoints of the services `inner` builds, counting each
    /// ejection in the counter `counter` gives for the endpoint.
    pub fn new(
        inner: N,
        cfg: EjectConfig,
        counter: impl Fn(&Endpoint) -> Counter + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner,
            cfg,
            services: Arc::default(),
            counters: Arc::new(counter),
        }
    }
}

impl<N: NewService<Endpoint>> NewService<Endpoint> for NewEject<N> {
    type Service = Eject<N::Service>;

    fn new_service(&self, endpoint: Endpoint) -> Self::Service {
        let health = {
            let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
            services.retain(|_, h| h.strong_count() > 0);
            // By the whole target, not the service's name: the `local` target has one
            // balancer per destination, and a service routed both as HTTP and as
            // opaque TCP has a balancer for each.
            let entry = services.entry(endpoint.logical.clone()).or_default();
            entry.upgrade().unwrap_or_else(|| {
                let health = Arc::new(ServiceHealth::default());
                *entry = Arc::downgrade(&health);
                health
            })
        };
        health.endpoints.fetch_add(1, Ordering::AcqRel);
        let counter = (self.counters)(&endpoint);
        let (service, addr) = (endpoint.logical.service.clone(), endpoint.addr);
        Eject {
            service,
            addr,
            inner: self.inner.new_service(endpoint),
            state: Arc::new(State {
                cfg: self.cfg,
                health,
                failures: AtomicU32::new(0),
                ejections: AtomicU32::new(0),
                ejected: AtomicBool::new(false),
                counter,
            }),
            until: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::{Lb, Protocol, UpstreamProtocol};
    use tower_test::mock;

    fn refused() -> crate::Error {
        ConnectError::Refused("127.0.0.1:1".parse().unwrap()).into()
    }

    fn endpoint(service: &str, port: u16) -> Endpoint {
        Endpoint {
            logical: Logical {
                service: service.into(),
                protocol: Protocol::Http,
                lb: Lb::P2c,
                upstream: UpstreamProtocol::Auto,
                dst: None,
            },
            id: format!("e{port}").into(),
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            handoff_port: None,
            weight: 1,
        }
    }

    type Mock = mock::Mock<(), ()>;
    type Handle = mock::Handle<(), ()>;

    /// `n` endpoints of one service, each an [`Eject`] over a mock.
    fn endpoints(n: u16, cfg: EjectConfig) -> (Vec<Eject<Mock>>, Vec<Handle>, Counter) {
        let counter = Counter::default();
        let handles = std::sync::Mutex::new(Vec::new());
        let c = counter.clone();
        let new = NewEject::new(
            crate::new_service::NewServiceFn::new(|_: Endpoint| {
                let (svc, handle) = mock::pair::<(), ()>();
                handles.lock().unwrap().push(handle);
                svc
            }),
            cfg,
            move |_| c.clone(),
        );
        let svcs = (0..n)
            .map(|i| new.new_service(endpoint("web", 8000 + i)))
            .collect();
        (svcs, handles.into_inner().unwrap(), counter)
    }

    /// One request through `svc`, answered by its mock with `answer`.
    async fn request(svc: &mut Eject<Mock>, handle: &mut Handle, answer: Result<(), crate::Error>) {
        handle.allow(1);
        std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
        let rsp = svc.call(());
        let (_, send) = handle.next_request().await.unwrap();
        match answer {
            Ok(()) => send.send_response(()),
            Err(e) => send.send_error(e),
        }
        let _ = rsp.await;
    }

    fn ready(svc: &mut Eject<Mock>, handle: &mut Handle) -> bool {
        handle.allow(1);
        let waker = futures_util::task::noop_waker();
        matches!(
            svc.poll_ready(&mut std::task::Context::from_waker(&waker)),
            Poll::Ready(Ok(()))
        )
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_connect_failures_eject_until_the_time_is_up() {
        let cfg = EjectConfig {
            failures: 3,
            time: Duration::from_secs(1),
            time_max: Duration::from_secs(4),
        };
        let (mut svcs, mut handles, ejections) = endpoints(2, cfg);
        let (svc, handle) = (&mut svcs[0], &mut handles[0]);
        for _ in 0..2 {
            request(svc, handle, Err(refused())).await;
        }
        assert!(ready(svc, handle), "two failures: still in");
        request(svc, handle, Err(refused())).await;
        assert!(!ready(svc, handle), "three: ejected");
        assert_eq!(ejections.get(), 1);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!ready(svc, handle));
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(ready(svc, handle), "back after 1 s");

        // One more failure ejects it again, for twice as long; then up to the max.
        request(svc, handle, Err(refused())).await;
        assert!(!ready(svc, handle));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(!ready(svc, handle), "the second ejection lasts 2 s");
        tokio::time::advance(Duration::from_millis(501)).await;
        assert!(ready(svc, handle));
        for _ in 0..2 {
            request(svc, handle, Err(refused())).await;
            assert!(!ready(svc, handle));
            tokio::time::advance(Duration::from_millis(3999)).await;
            assert!(!ready(svc, handle), "capped at 4 s");
            tokio::time::advance(Duration::from_millis(2)).await;
            assert!(ready(svc, handle));
        }
        assert_eq!(ejections.get(), 4);

        // A success forgets it all: three failures are needed again, and 1 s.
        request(svc, handle, Ok(())).await;
        for _ in 0..2 {
            request(svc, handle, Err(refused())).await;
        }
        assert!(ready(svc, handle));
        request(svc, handle, Err(refused())).await;
        assert!(!ready(svc, handle));
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(ready(svc, handle));
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejected_endpoint_wakes_its_balancer_when_it_is_back() {
        let (mut svcs, mut handles, _) = endpoints(2, EjectConfig::default());
        for _ in 0..3 {
            request(&mut svcs[0], &mut handles[0], Err(refused())).await;
        }
        handles[0].allow(1);
        let svc = &mut svcs[0];
        // Pending until the ejection ends, then ready: the timer woke the task.
        std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn only_connect_failures_count() {
        let (mut svcs, mut handles, ejections) = endpoints(2, EjectConfig::default());
        for _ in 0..10 {
            let sent_then_failed: crate::Error = "reset by peer".into();
            request(&mut svcs[0], &mut handles[0], Err(sent_then_failed)).await;
        }
        assert!(ready(&mut svcs[0], &mut handles[0]));
        assert_eq!(ejections.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_endpoint_in_stays_in() {
        let (mut svcs, mut handles, ejections) = endpoints(2, EjectConfig::default());
        // Three failures each (a fourth request would wait out the first's ejection).
        for i in 0..2 {
            for _ in 0..3 {
                request(&mut svcs[i], &mut handles[i], Err(refused())).await;
            }
        }
        assert!(!ready(&mut svcs[0], &mut handles[0]), "the first is out");
        assert!(
            ready(&mut svcs[1], &mut handles[1]),
            "the second is all that is left"
        );
        assert_eq!(ejections.get(), 1);
        // When the first leaves discovery, the second still stays; when a new one
        // joins, the second may go.
        drop(svcs.remove(0));
        let (svc, handle) = (&mut svcs[0], &mut handles[1]);
        for _ in 0..5 {
            request(svc, handle, Err(refused())).await;
        }
        assert!(ready(svc, handle));
    }

    #[tokio::test(start_paused = true)]
    async fn balancers_of_one_service_name_each_keep_their_last_endpoint() {
        // `local` has a balancer of one endpoint per destination, all named "local";
        // and "web" routed as HTTP and as opaque TCP has two balancers of its one
        // endpoint.
        let handles = std::sync::Mutex::new(Vec::new());
        let new = NewEject::new(
            crate::new_service::NewServiceFn::new(|_: Endpoint| {
                let (svc, handle) = mock::pair::<(), ()>();
                handles.lock().unwrap().push(handle);
                svc
            }),
            EjectConfig::default(),
            |_| Counter::default(),
        );
        let mut app = endpoint(crate::target::LOCAL, 8080);
        app.logical.dst = Some(app.addr);
        let mut metrics = endpoint(crate::target::LOCAL, 9090);
        metrics.logical.dst = Some(metrics.addr);
        let http = endpoint("web", 8000);
        let mut opaque = endpoint("web", 8000);
        opaque.logical.protocol = Protocol::Opaque;
        let mut svcs: Vec<_> = [app, metrics, http, opaque]
            .into_iter()
            .map(|e| new.new_service(e))
            .collect();
        let mut handles = handles.into_inner().unwrap();
        for (svc, handle) in svcs.iter_mut().zip(handles.iter_mut()) {
            for _ in 0..5 {
                request(svc, handle, Err(refused())).await;
            }
            assert!(
                ready(svc, handle),
                "the only endpoint of its balancer stays in"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn zero_failures_never_ejects() {
        let cfg = EjectConfig {
            failures: 0,
            ..EjectConfig::default()
        };
        let (mut svcs, mut handles, ejections) = endpoints(3, cfg);
        for _ in 0..10 {
            request(&mut svcs[0], &mut handles[0], Err(refused())).await;
        }
        assert!(ready(&mut svcs[0], &mut handles[0]));
        assert_eq!(ejections.get(), 0);
    }
}
