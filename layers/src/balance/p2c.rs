//! Power of two choices over the endpoints' load (PeakEWMA, [`tower::load::PeakEwma`]).
//!
//! Each pick takes two distinct endpoints at random among the ready ones and sends the
//! request to the one with the lower load (the first drawn on a tie); with one ready
//! endpoint it gets every request. Readiness as in `ready.rs`: the endpoints are
//! polled directly, one at a time, rather than through tower's `ReadyCache` (a
//! cancellation channel and a `FuturesUnordered` node per call), which tower's own p2c
//! uses and which cost this balancer ~2,800 instructions per request.

use super::ready::ReadySet;
use crate::Error;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::{
    hash::Hash,
    task::{Context, Poll},
};
use tower::{discover::Discover, load::Load};
use tower_service::Service;

/// A power-of-two-choices balancer over a [`Discover`] stream of services with a
/// [`Load`].
pub struct P2c<D: Discover> {
    set: ReadySet<D, ()>,
    rng: SmallRng,
}

impl<D: Discover> std::fmt::Debug for P2c<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("P2c")
            .field("endpoints", &self.set.len())
            .field("ready", &self.set.ready_len())
            .finish()
    }
}

impl<D> P2c<D>
where
    D: Discover + Unpin,
    D::Key: Hash + Eq,
    D::Error: Into<Error>,
{
    /// Balances over the services `discover` yields.
    pub fn new(discover: D) -> Self {
        Self::with_rng(discover, SmallRng::from_os_rng())
    }

    /// Balances with the choices drawn from `rng`.
    pub fn with_rng(discover: D, rng: SmallRng) -> Self {
        Self {
            set: ReadySet::new(discover),
            rng,
        }
    }
}

impl<D: Discover> P2c<D> {
    /// Number of endpoints, ready or not.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether there are no endpoints.
    pub fn is_empty(&self) -> bool {
        self.set.len() == 0
    }
}

/// The less loaded of two ready endpoints drawn at random.
fn choose<D>(set: &ReadySet<D, ()>, rng: &mut SmallRng) -> Option<usize>
where
    D: Discover,
    D::Service: Load,
    <D::Service as Load>::Metric: PartialOrd,
{
    let ready = set.ready_len();
    let nth_ready = |n: usize| {
        set.slots()
            .enumerate()
            .filter(|(_, s)| s.ready)
            .nth(n)
            .map(|(i, _)| i)
    };
    match ready {
        0 => None,
        1 => nth_ready(0),
        _ => {
            let a = rng.random_range(0..ready);
            let mut b = rng.random_range(0..ready - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (nth_ready(a)?, nth_ready(b)?);
            let a_wins = set.slot(a).service.load() <= set.slot(b).service.load();
            Some(if a_wins { a } else { b })
        }
    }
}

impl<D, Req> Service<Req> for P2c<D>
where
    D: Discover + Unpin,
    D::Key: Hash + Eq,
    D::Error: Into<Error>,
    D::Service: Service<Req> + Load,
    <D::Service as Load>::Metric: PartialOrd,
    <D::Service as Service<Req>>::Error: Into<Error>,
{
    type Response = <D::Service as Service<Req>>::Response;
    type Error = Error;
    type Future = futures_util::future::MapErr<
        <D::Service as Service<Req>>::Future,
        fn(<D::Service as Service<Req>>::Error) -> Error,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let Self { set, rng } = self;
        set.poll_select::<Req>(cx, |set| choose(set, rng))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        use futures_util::TryFutureExt;
        let (_, slot) = self
            .set
            .take_selected()
            .expect("P2c::call before poll_ready returned Ready");
        slot.service.call(req).map_err(Into::into as fn(_) -> Error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_util::Receiver;
    use futures_util::future::poll_fn;
    use std::sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    };
    use tokio::sync::mpsc;
    use tower::discover::Change;

    /// An endpoint with a fixed load that counts its requests and can be made unready.
    #[derive(Clone, Default)]
    struct Fixed {
        load: u32,
        calls: Arc<AtomicUsize>,
        unready: Arc<AtomicBool>,
    }

    impl Load for Fixed {
        type Metric = u32;
        fn load(&self) -> u32 {
            self.load
        }
    }

    impl Service<()> for Fixed {
        type Response = ();
        type Error = Error;
        type Future = std::future::Ready<Result<(), Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
            if self.unready.load(Ordering::SeqCst) {
                Poll::Pending
            } else {
                Poll::Ready(Ok(()))
            }
        }
        fn call(&mut self, _: ()) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(()))
        }
    }

    fn balancer(loads: &[u32]) -> (P2c<Receiver<Change<usize, Fixed>>>, Vec<Fixed>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let endpoints: Vec<Fixed> = loads
            .iter()
            .map(|&load| Fixed {
                load,
                ..Fixed::default()
            })
            .collect();
        for (i, e) in endpoints.iter().enumerate() {
            tx.send(Change::Insert(i, e.clone())).unwrap();
        }
        // The receiver reads the closed channel as "no more changes".
        (
            P2c::with_rng(Receiver(rx), SmallRng::seed_from_u64(7)),
            endpoints,
        )
    }

    async fn send(b: &mut P2c<Receiver<Change<usize, Fixed>>>, n: usize) {
        for _ in 0..n {
            poll_fn(|cx| Service::<()>::poll_ready(b, cx))
                .await
                .unwrap();
            b.call(()).await.unwrap();
        }
    }

    fn calls(endpoints: &[Fixed]) -> Vec<usize> {
        endpoints
            .iter()
            .map(|e| e.calls.load(Ordering::SeqCst))
            .collect()
    }

    #[tokio::test]
    async fn the_less_loaded_of_two_wins() {
        let (mut b, endpoints) = balancer(&[1, 5]);
        send(&mut b, 100).await;
        assert_eq!(calls(&endpoints), [100, 0]);
    }

    #[tokio::test]
    async fn the_most_loaded_of_three_gets_nothing_and_the_least_loaded_most() {
        // Every pair includes one of the two lighter ones, so the heaviest never wins;
        // the lightest wins both pairs it is drawn in: two thirds of the picks.
        let (mut b, endpoints) = balancer(&[3, 1, 2]);
        send(&mut b, 3000).await;
        let c = calls(&endpoints);
        assert_eq!(c[0], 0, "{c:?}");
        assert!((1800..2200).contains(&c[1]), "{c:?}");
        assert_eq!(c[1] + c[2], 3000);
    }

    #[tokio::test]
    async fn equal_loads_share_evenly() {
        let (mut b, endpoints) = balancer(&[1, 1, 1, 1]);
        send(&mut b, 4000).await;
        for c in calls(&endpoints) {
            assert!((800..1200).contains(&c), "{:?}", calls(&endpoints));
        }
    }

    #[tokio::test]
    async fn unready_endpoints_are_skipped_and_come_back() {
        let (mut b, endpoints) = balancer(&[1, 2, 3]);
        endpoints[0].unready.store(true, Ordering::SeqCst);
        send(&mut b, 50).await;
        assert_eq!(calls(&endpoints), [0, 50, 0]);
        endpoints[1].unready.store(true, Ordering::SeqCst);
        send(&mut b, 10).await;
        assert_eq!(calls(&endpoints), [0, 50, 10]);
        endpoints[2].unready.store(true, Ordering::SeqCst);
        assert!(
            futures_util::poll!(poll_fn(|cx| Service::<()>::poll_ready(&mut b, cx))).is_pending()
        );
        endpoints[0].unready.store(false, Ordering::SeqCst);
        send(&mut b, 10).await;
        assert_eq!(calls(&endpoints), [10, 50, 10]);
    }
}
