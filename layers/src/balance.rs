//! Balancing: one balancer per logical service, over a discovery stream of endpoints.
//!
//! [`NewBalance`] is the `NewService<Logical>` that builds a [`Balancer`]: it resolves
//! the service (a [`Discover`] stream of [`Endpoint`] targets), builds each endpoint's
//! service with the endpoint stack (a `NewService<Endpoint>`), and balances over them
//! with the service's algorithm:
//!
//! - `p2c` — tower's power-of-two-choices over PeakEWMA load (Mitzenmacher's "The Power
//!   of Two Choices"; Finagle's peak EWMA): two random ready endpoints, the one with
//!   the lower `rtt × (in-flight + 1)` wins, so a slow or busy endpoint gets less;
//! - `rr` — [`RoundRobin`], in discovery order over ready endpoints;
//! - `hash` — [`HashBalance`], Maglev consistent hashing of a request key.
//!
//! A balancer is a single-owner `Service` (`&mut self`): the logical stack puts it
//! behind a `Buffer` so all connections share it. With no endpoints at all it does not
//! wait for some to appear: it answers ready and fails the request with
//! [`NoEndpoints`] (503), so a missing service fails fast instead of queueing until the
//! request timeout. With endpoints that are all not ready, it is not ready.

mod hash;
mod rr;

pub use self::{
    hash::{HashBalance, HashKey, HttpHashKey, Maglev},
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
    balance::p2c,
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

/// A balancer of one algorithm over a discovery stream (see the module docs).
pub struct Balancer<D: Discover, Req, K>
where
    D::Key: Hash,
{
    algo: Algo<D, Req, K>,
    service: Arc<str>,
    /// `poll_ready` found no endpoints: fail the next call.
    fail_next: bool,
}

enum Algo<D: Discover, Req, K>
where
    D::Key: Hash,
{
    P2c(p2c::Balance<PeakEwmaDiscover<D>, Req>),
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
    D::Service: Service<Req>,
    <D::Service as Service<Req>>::Error: Into<Error>,
    K: HashKey<Req>,
{
    /// A balancer for `service` with algorithm `lb`.
    pub fn new(service: Arc<str>, lb: Lb, discover: D, ewma: EwmaConfig, key: K) -> Self {
        let algo = match lb {
            Lb::P2c => Algo::P2c(p2c::Balance::new(PeakEwmaDiscover::new::<Req>(
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
        }
    }
}

impl<D, Req, K> Service<Req> for Balancer<D, Req, K>
where
    D: Discover + Unpin,
    D::Key: Hash + Eq + Clone,
    D::Error: Into<Error>,
    D::Service: Service<Req>,
    <D::Service as Service<Req>>::Error: Into<Error>,
    K: HashKey<Req>,
{
    type Response = <D::Service as Service<Req>>::Response;
    type Error = Error;
    type Future = ResponseFuture<
        <p2c::Balance<PeakEwmaDiscover<D>, Req> as Service<Req>>::Future,
        <RoundRobin<D> as Service<Req>>::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let (poll, empty) = match &mut self.algo {
            Algo::P2c(b) => (b.poll_ready(cx), b.is_empty()),
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
/// endpoint services with `new_endpoint`, extracts hash keys with `key`.
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
    type Service = Balancer<DiscoverNew<D, N>, Req, K>;

    fn new_service(&self, logical: Logical) -> Self::Service {
        tracing::debug!(service = %logical.service, lb = ?logical.lb, "building balancer");
        let discover = DiscoverNew::new((self.resolve)(&logical), self.new_endpoint.clone());
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

    type Mock = mock::Mock<&'static str, &'static str>;
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
            tx.send(Change::Insert(1, svc)).unwrap();
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
            let (svc, mut handle): (Mock, _) = mock::pair();
            handle.allow(0);
            tx.send(Change::Insert(1, svc)).unwrap();
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
        type Svc = BoxService<&'static str, &'static str, Error>;
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
            tx.send(Change::Insert(key, BoxService::new(svc))).unwrap();
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
}
