//! Balancing: one balancer per logical service, over a discovery stream of endpoints.
//!
//! [`NewBalance`] is the `NewService<Logical>` that builds a [`Balancer`]: it resolves
//! the service (a [`Discover`] stream of [`Endpoint`] targets), builds each endpoint's
//! service with the endpoint stack (a `NewService<Endpoint>`), and balances over them
//! with the service's algorithm:
//!
//! - `p2c` — [`P2c`], power of two choices (Mitzenmacher's "The Power of Two Choices")
//!   over tower's PeakEWMA load (Finagle's peak EWMA): two random ready endpoints, the
//!   one with the lower `rtt × (in-flight + 1)` wins, so a slow or busy endpoint gets
//!   less;
//! - `rr` — [`RoundRobin`], smooth weighted round-robin over ready endpoints;
//! - `hash` — [`HashBalance`], weighted Maglev consistent hashing of a request key.
//!
//! # Weights
//!
//! Discovery reports a relative weight per instance ([`Endpoint::weight`], 1 by
//! default). [`NewBalance`] builds each endpoint's service through [`NewWeighted`],
//! which wraps it in a [`Weighted`]: the endpoint service itself is unchanged, and the
//! wrapper carries the weight to the balancers, which read it through the [`Weight`]
//! trait. `rr` gives an endpoint of weight `w` a `w / Σw` share of the picks, spread
//! out rather than in bursts; `hash` gives it a `w / Σw` share of the Maglev table.
//! `p2c` ignores weights: tower's p2c compares opaque PeakEWMA costs and has no place
//! for a static weight. It needs none to protect a weak endpoint, though: PeakEWMA
//! already shifts load away from endpoints that answer slowly or pile up requests.
//!
//! A balancer is a single-owner `Service` (`&mut self`): the logical stack shares it
//! between connections with [`Share`](crate::share::Share). With no endpoints at all it does not
//! wait for some to appear: it answers ready and fails the request with
//! [`NoEndpoints`] (503), so a missing service fails fast instead of queueing until the
//! request timeout. With endpoints that are all not ready, it is not ready.

mod hash;
mod p2c;
mod ready;
mod rr;

pub use self::{
    hash::{HashBalance, HashKey, HttpHashKey, Maglev},
    p2c::P2c,
    rr::RoundRobin,
};

use crate::{
    errors::NoEndpoints,
    new_service::NewService,
    target::{Endpoint, Lb, Logical},
    Error,
};
use futures_util::Stream;
use pin_project_lite::pin_project;
use std::{
    future::Future,
    hash::Hash,
    marker::PhantomData,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};
use tower::{
    discover::{Change, Discover},
    load::{CompleteOnResponse, PeakEwmaDiscover},
};
use tower_service::Service;

/// PeakEWMA parameters (`BATON_EWMA_DEFAULT_RTT`, `BATON_EWMA_DECAY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EwmaConfig {
    /// The RTT assumed for an endpoint before it has answered anything.
    pub default_rtt: Duration,
    /// How fast old RTT observations fade.
    pub decay: Duration,
}

impl Default for EwmaConfig {
    fn default() -> Self {
        Self {
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(10),
        }
    }
}

pin_project! {
    /// Maps a discovery stream of targets to a stream of services built for them.
    pub struct DiscoverNew<D, N> {
        #[pin]
        discover: D,
        new: N,
    }
}

impl<D, N> DiscoverNew<D, N> {
    /// Builds services for the targets `discover` yields with `new`.
    pub fn new(discover: D, new: N) -> Self {
        Self { discover, new }
    }
}

impl<D, N, K, T, E> Stream for DiscoverNew<D, N>
where
    D: Stream<Item = Result<Change<K, T>, E>>,
    N: NewService<T>,
{
    type Item = Result<Change<K, N::Service>, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        this.discover.poll_next(cx).map(|change| {
            change.map(|c| {
                c.map(|c| match c {
                    Change::Insert(k, t) => Change::Insert(k, this.new.new_service(t)),
                    Change::Remove(k) => Change::Remove(k),
                })
            })
        })
    }
}

/// The relative weight of a balanced service: its share of the traffic is its weight
/// over the sum of the weights (for the balancers that honour weights, see the module
/// docs). Balancers read a weight of 0 as 1.
pub trait Weight {
    /// The service's weight.
    fn weight(&self) -> u32;
}

/// A service with the weight of the endpoint it was built for. It is the inner service
/// for everything else: `poll_ready` and `call` go straight through.
#[derive(Clone, Debug)]
pub struct Weighted<S> {
    inner: S,
    weight: u32,
}

impl<S> Weighted<S> {
    /// `inner`, with weight `weight`.
    pub fn new(inner: S, weight: u32) -> Self {
        Self { inner, weight }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, without the weight.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Weight for Weighted<S> {
    fn weight(&self) -> u32 {
        self.weight
    }
}

impl<S: Service<Req>, Req> Service<Req> for Weighted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> S::Future {
        self.inner.call(req)
    }
}

/// Builds endpoint services with `N` and wraps each in a [`Weighted`] carrying the
/// endpoint's [`weight`](Endpoint::weight).
#[derive(Clone, Debug)]
pub struct NewWeighted<N> {
    inner: N,
}

impl<N> NewWeighted<N> {
    /// Weights the services `inner` builds.
    pub fn new(inner: N) -> Self {
        Self { inner }
    }
}

impl<N: NewService<Endpoint>> NewService<Endpoint> for NewWeighted<N> {
    type Service = Weighted<N::Service>;

    fn new_service(&self, endpoint: Endpoint) -> Self::Service {
        let weight = endpoint.weight;
        Weighted::new(self.inner.new_service(endpoint), weight)
    }
}

/// A balancer of one algorithm over a discovery stream (see the module docs).
pub struct Balancer<D: Discover, Req, K>
where
    D::Key: Hash,
{
    algo: Algo<D, K>,
    service: Arc<str>,
    /// `poll_ready` found no endpoints: fail the next call.
    fail_next: bool,
    _req: PhantomData<fn(Req)>,
}

enum Algo<D: Discover, K>
where
    D::Key: Hash,
{
    P2c(P2c<PeakEwmaDiscover<D>>),
    Rr(RoundRobin<D>),
    Hash(HashBalance<D, K>),
}

impl<D: Discover, Req, K> std::fmt::Debug for Balancer<D, Req, K>
where
    D::Key: Hash,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algo = match self.algo {
            Algo::P2c(_) => "p2c",
            Algo::Rr(_) => "rr",
            Algo::Hash(_) => "hash",
        };
        f.debug_struct("Balancer")
            .field("service", &self.service)
            .field("algo", &algo)
            .finish()
    }
}

impl<D, Req, K> Balancer<D, Req, K>
where
    D: Discover + Unpin,
    D::Key: Hash + Eq + Clone,
    D::Error: Into<Error>,
    D::Service: Service<Req> + Weight,
    <D::Service as Service<Req>>::Error: Into<Error>,
    K: HashKey<Req>,
{
    /// A balancer for `service` with algorithm `lb`.
    pub fn new(service: Arc<str>, lb: Lb, discover: D, ewma: EwmaConfig, key: K) -> Self {
        let algo = match lb {
            Lb::P2c => Algo::P2c(P2c::new(PeakEwmaDiscover::new::<Req>(
                discover,
                ewma.default_rtt,
                ewma.decay,
                CompleteOnResponse::default(),
            ))),
            Lb::Rr => Algo::Rr(RoundRobin::new(discover)),
            Lb::Hash => Algo::Hash(HashBalance::new(discover, key)),
        };
        Self {
            algo,
            service,
            fail_next: false,
            _req: PhantomData,
        }
    }
}

impl<D, Req, K> Service<Req> for Balancer<D, Req, K>
where
    D: Discover + Unpin,
    D::Key: Hash + Eq + Clone,
    D::Error: Into<Error>,
    D::Service: Service<Req> + Weight,
    <D::Service as Service<Req>>::Error: Into<Error>,
    K: HashKey<Req>,
{
    type Response = <D::Service as Service<Req>>::Response;
    type Error = Error;
    type Future = ResponseFuture<
        <P2c<PeakEwmaDiscover<D>> as Service<Req>>::Future,
        <RoundRobin<D> as Service<Req>>::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let (poll, empty) = match &mut self.algo {
            Algo::P2c(b) => (Service::<Req>::poll_ready(b, cx), b.is_empty()),
            Algo::Rr(b) => (Service::<Req>::poll_ready(b, cx), b.is_empty()),
            Algo::Hash(b) => (Service::<Req>::poll_ready(b, cx), b.is_empty()),
        };
        match poll {
            Poll::Pending if empty => {
                self.fail_next = true;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(())) => {
                self.fail_next = false;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if std::mem::take(&mut self.fail_next) {
            return ResponseFuture::Failed {
                service: Some(self.service.clone()),
            };
        }
        match &mut self.algo {
            Algo::P2c(b) => ResponseFuture::P2c { f: b.call(req) },
            Algo::Rr(b) => ResponseFuture::Other { f: b.call(req) },
            Algo::Hash(b) => ResponseFuture::Other { f: b.call(req) },
        }
    }
}

pin_project! {
    /// Response future of [`Balancer`].
    #[project = ResponseFutureProj]
    #[allow(missing_docs)]
    pub enum ResponseFuture<A, B> {
        /// From the p2c balancer.
        P2c {
            #[pin]
            f: A,
        },
        /// From round-robin or hash.
        Other {
            #[pin]
            f: B,
        },
        /// No endpoints.
        Failed {
            service: Option<Arc<str>>,
        },
    }
}

impl<A, B, T> Future for ResponseFuture<A, B>
where
    A: Future<Output = Result<T, Error>>,
    B: Future<Output = Result<T, Error>>,
{
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::P2c { f } => f.poll(cx),
            ResponseFutureProj::Other { f } => f.poll(cx),
            ResponseFutureProj::Failed { service } => Poll::Ready(Err(NoEndpoints {
                service: service.take().unwrap_or_else(|| "".into()),
            }
            .into())),
        }
    }
}

/// Builds a [`Balancer`] per logical service: resolves it with `resolve`, builds
/// endpoint services with `new_endpoint` (each [`Weighted`] with its endpoint's weight),
/// extracts hash keys with `key`.
pub struct NewBalance<R, N, K, Req> {
    resolve: R,
    new_endpoint: N,
    key: K,
    ewma: EwmaConfig,
    _req: PhantomData<fn(Req)>,
}

impl<R: Clone, N: Clone, K: Clone, Req> Clone for NewBalance<R, N, K, Req> {
    fn clone(&self) -> Self {
        Self {
            resolve: self.resolve.clone(),
            new_endpoint: self.new_endpoint.clone(),
            key: self.key.clone(),
            ewma: self.ewma,
            _req: PhantomData,
        }
    }
}

impl<R, N, K, Req> NewBalance<R, N, K, Req> {
    /// A balancer factory.
    pub fn new(resolve: R, new_endpoint: N, key: K, ewma: EwmaConfig) -> Self {
        Self {
            resolve,
            new_endpoint,
            key,
            ewma,
            _req: PhantomData,
        }
    }
}

impl<R, D, N, K, Req> NewService<Logical> for NewBalance<R, N, K, Req>
where
    R: Fn(&Logical) -> D,
    D: Discover<Service = Endpoint> + Unpin,
    D: Stream<Item = Result<Change<D::Key, Endpoint>, D::Error>>,
    D::Key: Hash + Eq + Clone,
    D::Error: Into<Error>,
    N: NewService<Endpoint> + Clone,
    N::Service: Service<Req>,
    <N::Service as Service<Req>>::Error: Into<Error>,
    K: HashKey<Req> + Clone,
{
    type Service = Balancer<DiscoverNew<D, NewWeighted<N>>, Req, K>;

    fn new_service(&self, logical: Logical) -> Self::Service {
        tracing::debug!(service = %logical.service, lb = ?logical.lb, "building balancer");
        let discover = DiscoverNew::new(
            (self.resolve)(&logical),
            NewWeighted::new(self.new_endpoint.clone()),
        );
        Balancer::new(
            logical.service.clone(),
            logical.lb,
            discover,
            self.ewma,
            self.key.clone(),
        )
    }
}

/// Helpers shared by the balancer tests.
#[cfg(test)]
pub(crate) mod test_util {
    use super::*;
    use std::convert::Infallible;
    use tokio::sync::mpsc;

    /// A discovery stream fed through a channel.
    pub(crate) struct Receiver<T>(pub(crate) mpsc::UnboundedReceiver<T>);

    impl<T> Stream for Receiver<T> {
        type Item = Result<T, Infallible>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            match self.0.poll_recv(cx) {
                Poll::Ready(Some(t)) => Poll::Ready(Some(Ok(t))),
                // A closed channel means "no more changes", not "no endpoints".
                Poll::Ready(None) | Poll::Pending => Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{test_util::Receiver, *};
    use futures_util::future::poll_fn;
    use tokio::sync::mpsc;
    use tower::ServiceExt;
    use tower_test::mock;

    type Mock = Weighted<mock::Mock<&'static str, &'static str>>;
    type TestBalancer = Balancer<Receiver<Change<u32, Mock>>, &'static str, NoKey>;

    fn balancer(lb: Lb) -> (TestBalancer, mpsc::UnboundedSender<Change<u32, Mock>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Balancer::new("web".into(), lb, Receiver(rx), EwmaConfig::default(), NoKey),
            tx,
        )
    }

    #[derive(Clone)]
    struct NoKey;
    impl HashKey<&'static str> for NoKey {
        fn hash_key(&self, _: &&'static str) -> Option<u64> {
            None
        }
    }

    #[tokio::test]
    async fn no_endpoints_fails_fast_for_every_algorithm() {
        for lb in [Lb::P2c, Lb::Rr, Lb::Hash] {
            let (mut b, _tx) = balancer(lb);
            let err = b.ready().await.unwrap().call("req").await.unwrap_err();
            let err = err.downcast::<NoEndpoints>().expect("NoEndpoints");
            assert_eq!(&*err.service, "web");
        }
    }

    #[tokio::test]
    async fn endpoints_appearing_later_are_used() {
        for lb in [Lb::P2c, Lb::Rr, Lb::Hash] {
            let (mut b, tx) = balancer(lb);
            assert!(b.ready().await.unwrap().call("req").await.is_err());
            let (svc, mut handle) = mock::pair();
            handle.allow(1);
            tx.send(Change::Insert(1, Weighted::new(svc, 1))).unwrap();
            poll_fn(|cx| b.poll_ready(cx)).await.unwrap();
            let fut = b.call("req");
            let (req, rsp) = handle.next_request().await.unwrap();
            assert_eq!(req, "req");
            rsp.send_response("ok");
            assert_eq!(fut.await.unwrap(), "ok");
        }
    }

    #[tokio::test]
    async fn all_endpoints_unready_is_not_ready() {
        for lb in [Lb::P2c, Lb::Rr, Lb::Hash] {
            let (mut b, tx) = balancer(lb);
            let (svc, mut handle) = mock::pair();
            handle.allow(0);
            tx.send(Change::Insert(1, Weighted::new(svc, 1))).unwrap();
            assert!(
                futures_util::poll!(poll_fn(|cx| b.poll_ready(cx))).is_pending(),
                "{lb:?}"
            );
            handle.allow(1);
            assert!(
                futures_util::poll!(poll_fn(|cx| b.poll_ready(cx))).is_ready(),
                "{lb:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_sends_most_requests_to_the_faster_endpoint() {
        use std::sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        };
        use tower::{service_fn, util::BoxService};
        type Svc = Weighted<BoxService<&'static str, &'static str, Error>>;
        let (tx, rx) = mpsc::unbounded_channel::<Change<u32, Svc>>();
        let mut b: Balancer<_, &'static str, NoKey> = Balancer::new(
            "web".into(),
            Lb::P2c,
            Receiver(rx),
            EwmaConfig::default(),
            NoKey,
        );
        let counts: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::default()).collect();
        for (key, delay_ms) in [(0u32, 1u64), (1, 50)] {
            let count = counts[key as usize].clone();
            let svc = service_fn(move |_: &'static str| {
                count.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
                    Ok::<_, Error>("ok")
                }
            });
            // Weights are ignored by p2c: the heavier slow endpoint still gets little.
            let weight = 1 + 9 * key;
            tx.send(Change::Insert(
                key,
                Weighted::new(BoxService::new(svc), weight),
            ))
            .unwrap();
        }
        for _ in 0..200 {
            b.ready().await.unwrap().call("req").await.unwrap();
        }
        let (fast, slow) = (
            counts[0].load(Ordering::SeqCst),
            counts[1].load(Ordering::SeqCst),
        );
        assert_eq!(fast + slow, 200);
        // Round-robin would send 100 to each; PeakEWMA learns the slow one's latency.
        assert!(slow < 20, "slow endpoint got {slow} of 200");
    }

    #[tokio::test]
    async fn discover_new_builds_services_from_targets() {
        use crate::new_service::NewServiceFn;
        use futures_util::StreamExt;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut d = DiscoverNew::new(Receiver(rx), NewServiceFn::new(|t: u32| t * 10));
        tx.send(Change::Insert("a", 4)).unwrap();
        tx.send(Change::Remove("a")).unwrap();
        match d.next().await.unwrap().unwrap() {
            Change::Insert(k, s) => assert_eq!((k, s), ("a", 40)),
            Change::Remove(_) => panic!("expected insert"),
        }
        assert!(matches!(
            d.next().await.unwrap().unwrap(),
            Change::Remove("a")
        ));
    }

    #[tokio::test]
    async fn new_balance_passes_endpoint_weights_to_the_balancer() {
        use crate::{
            new_service::NewServiceFn,
            target::{Protocol, UpstreamProtocol},
        };
        use std::sync::Mutex;
        let logical = Logical {
            service: "web".into(),
            protocol: Protocol::Http,
            lb: Lb::Rr,
            upstream: UpstreamProtocol::Auto,
            dst: None,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        for (id, weight) in [("a", 3), ("b", 1)] {
            let endpoint = Endpoint {
                logical: logical.clone(),
                id: id.into(),
                addr: "10.0.0.1:80".parse().unwrap(),
                handoff_port: None,
                weight,
            };
            tx.send(Change::Insert(id, endpoint)).unwrap();
        }
        let rx = Mutex::new(Some(Receiver(rx)));
        let resolve = move |_: &Logical| rx.lock().unwrap().take().expect("resolved once");
        // Endpoint services answer with their id.
        let endpoint = NewServiceFn::new(|ep: Endpoint| {
            tower::service_fn(move |_: &'static str| {
                std::future::ready(Ok::<_, Error>(ep.id.clone()))
            })
        });
        let new = NewBalance::new(resolve, endpoint, NoKey, EwmaConfig::default());
        let mut b = new.new_service(logical);
        let mut order = Vec::new();
        for _ in 0..8 {
            order.push(b.ready().await.unwrap().call("req").await.unwrap());
        }
        assert_eq!(order.join(""), "aabaaaba");
    }
}
