//! Smooth weighted round-robin over ready endpoints.
//!
//! The algorithm is nginx's smooth weighted round-robin: every endpoint keeps a current
//! value, and each pick adds every eligible endpoint's weight ([`Weight`]) to its
//! current value, picks the endpoint with the largest (the first in discovery order on
//! a tie) and subtracts the sum of the eligible weights from the picked one. Over any
//! `Σw` consecutive picks with a stable set, an endpoint of weight `w` is picked exactly
//! `w` times, and its picks are spread out rather than bunched: weights 5, 1, 1 give
//! `a a b a c a a`, and equal weights alternate exactly (A, B, C, A, B, C, ...).
//!
//! The eligible endpoints are the ready ones (readiness as in `ready.rs`). An
//! endpoint that is not ready gathers no credit meanwhile: when it becomes ready it
//! takes its share again rather than a burst of catching up.
//!
//! Membership: a new endpoint starts with a current value of 0, a re-inserted one (e.g.
//! with a new weight) keeps its position and current value, and the others keep theirs.

use super::{
    ready::{ReadySet, Slot},
    Weight,
};
use crate::Error;
use std::{
    hash::Hash,
    task::{Context, Poll},
};
use tower::discover::Discover;
use tower_service::Service;

/// A smooth weighted round-robin balancer over a [`Discover`] stream of services.
pub struct RoundRobin<D: Discover> {
    /// Each endpoint's state is its smooth weighted round-robin current value.
    set: ReadySet<D, i64>,
}

fn weight<S: Weight>(slot: &Slot<S, i64>) -> i64 {
    i64::from(slot.service.weight().max(1))
}

impl<D: Discover> std::fmt::Debug for RoundRobin<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoundRobin")
            .field("endpoints", &self.set.len())
            .field("ready", &self.set.ready_len())
            .finish()
    }
}

impl<D> RoundRobin<D>
where
    D: Discover + Unpin,
    D::Key: Hash + Eq,
    D::Error: Into<Error>,
{
    /// Balances over the services `discover` yields.
    pub fn new(discover: D) -> Self {
        Self {
            set: ReadySet::new(discover),
        }
    }
}

impl<D: Discover> RoundRobin<D> {
    /// Number of endpoints, ready or not.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether there are no endpoints.
    pub fn is_empty(&self) -> bool {
        self.set.len() == 0
    }
}

/// The ready endpoint the next pick goes to: the largest `current + weight`.
fn candidate<D: Discover>(set: &ReadySet<D, i64>) -> Option<usize>
where
    D::Service: Weight,
{
    let mut best: Option<(usize, i64)> = None;
    for (i, slot) in set.slots().enumerate() {
        if slot.ready {
            let value = slot.state + weight(slot);
            // Strictly greater: the first in discovery order wins a tie.
            if best.is_none_or(|(_, b)| value > b) {
                best = Some((i, value));
            }
        }
    }
    best.map(|(i, _)| i)
}

impl<D, Req> Service<Req> for RoundRobin<D>
where
    D: Discover + Unpin,
    D::Key: Hash + Eq,
    D::Error: Into<Error>,
    D::Service: Service<Req> + Weight,
    <D::Service as Service<Req>>::Error: Into<Error>,
{
    type Response = <D::Service as Service<Req>>::Response;
    type Error = Error;
    type Future = futures_util::future::MapErr<
        <D::Service as Service<Req>>::Future,
        fn(<D::Service as Service<Req>>::Error) -> Error,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.set.poll_select::<Req>(cx, candidate)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        use futures_util::TryFutureExt;
        // The credits move when a request is sent, so a `poll_ready` that is not
        // followed by a `call` changes nothing: every ready endpoint gains its weight,
        // the picked one pays the sum of them.
        let mut total = 0;
        for slot in self.set.slots_mut().filter(|s| s.ready) {
            let w = weight(slot);
            slot.state += w;
            total += w;
        }
        let (_, slot) = self
            .set
            .take_selected()
            .expect("RoundRobin::call before poll_ready returned Ready");
        slot.state -= total;
        slot.service.call(req).map_err(Into::into as fn(_) -> Error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{test_util::Receiver, Weighted};
    use futures_util::future::poll_fn;
    use tokio::sync::mpsc;
    use tower::discover::Change;
    use tower_test::mock;

    type Mock = Weighted<mock::Mock<&'static str, &'static str>>;
    type Handle = mock::Handle<&'static str, &'static str>;
    type Rr = RoundRobin<Receiver<Change<u32, Mock>>>;

    fn endpoint(weight: u32) -> (Mock, Handle) {
        let (svc, mut handle) = mock::pair();
        handle.allow(1000);
        (Weighted::new(svc, weight), handle)
    }

    /// A balancer over endpoints 0, 1, ... with `weights`.
    fn balancer(weights: &[u32]) -> (Rr, mpsc::UnboundedSender<Change<u32, Mock>>, Vec<Handle>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut handles = Vec::new();
        for (key, &w) in (0..).zip(weights) {
            let (svc, h) = endpoint(w);
            tx.send(Change::Insert(key, svc)).unwrap();
            handles.push(h);
        }
        (RoundRobin::new(Receiver(rx)), tx, handles)
    }

    async fn send(rr: &mut Rr, handles: &mut [Handle]) -> usize {
        // Each request polls the mocks' channels once, without waiting: yield so that
        // tokio's cooperative budget does not run out over hundreds of requests.
        tokio::task::yield_now().await;
        poll_fn(|cx| rr.poll_ready(cx)).await.unwrap();
        let fut = rr.call("req");
        for (i, h) in handles.iter_mut().enumerate() {
            if let Poll::Ready(Some((_, rsp))) = futures_util::poll!(Box::pin(h.next_request())) {
                rsp.send_response("ok");
                fut.await.unwrap();
                return i;
            }
        }
        panic!("no endpoint received the request");
    }

    async fn picks(rr: &mut Rr, handles: &mut [Handle], n: usize) -> Vec<usize> {
        let mut order = Vec::with_capacity(n);
        for _ in 0..n {
            order.push(send(rr, handles).await);
        }
        order
    }

    /// The longest run of consecutive picks of `endpoint`.
    fn longest_run(order: &[usize], endpoint: usize) -> usize {
        order
            .split(|&i| i != endpoint)
            .map(<[usize]>::len)
            .max()
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn alternates_exactly_and_follows_membership() {
        let (mut rr, tx, mut handles) = balancer(&[1, 1, 1]);
        let order = picks(&mut rr, &mut handles, 9).await;
        assert_eq!(order, [0, 1, 2, 0, 1, 2, 0, 1, 2]);

        // Remove the middle endpoint: the other two keep alternating.
        tx.send(Change::Remove(1)).unwrap();
        let order = picks(&mut rr, &mut handles, 4).await;
        assert_eq!(order, [0, 2, 0, 2]);
        assert_eq!(rr.len(), 2);
    }

    #[tokio::test]
    async fn equal_weights_other_than_one_alternate_exactly() {
        let (mut rr, _tx, mut handles) = balancer(&[4, 4, 4]);
        let order = picks(&mut rr, &mut handles, 9).await;
        assert_eq!(order, [0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[tokio::test]
    async fn weights_are_spread_smoothly() {
        // nginx's example: weights 5, 1, 1.
        let (mut rr, _tx, mut handles) = balancer(&[5, 1, 1]);
        let order = picks(&mut rr, &mut handles, 14).await;
        let period = [0, 0, 1, 0, 2, 0, 0];
        assert_eq!(order[..7], period);
        assert_eq!(order[7..], period);
    }

    #[tokio::test]
    async fn three_to_one_gives_exact_shares_spread_out() {
        let (mut rr, _tx, mut handles) = balancer(&[3, 1]);
        let order = picks(&mut rr, &mut handles, 400).await;
        let heavy = order.iter().filter(|&&i| i == 0).count();
        assert_eq!((heavy, order.len() - heavy), (300, 100));
        // Exactly periodic: every 4 picks hold 3 of the heavy and 1 of the light.
        for (n, window) in order.chunks(4).enumerate() {
            assert_eq!(window, [0, 0, 1, 0], "period {n}: {order:?}");
        }
        // Spread, not bursts: every prefix is within one pick of the ideal share
        // (a burst of four or more would break this), the light endpoint is never
        // picked twice in a row and the heavy at most `3 / 1` times.
        for k in 1..=order.len() {
            let heavy = order[..k].iter().filter(|&&i| i == 0).count() as f64;
            assert!(
                (heavy - k as f64 * 0.75).abs() < 1.0,
                "prefix {k} has {heavy} heavy picks"
            );
        }
        assert_eq!(longest_run(&order, 1), 1);
        assert_eq!(longest_run(&order, 0), 3);
    }

    #[tokio::test]
    async fn an_unready_heavy_endpoint_sends_everything_to_the_others() {
        let (mut rr, _tx, mut handles) = balancer(&[5, 1, 1]);
        handles[0].allow(0);
        let order = picks(&mut rr, &mut handles, 10).await;
        assert_eq!(order, [1, 2, 1, 2, 1, 2, 1, 2, 1, 2]);
        // Back: it takes its share again, without a burst of catching up (it gathered
        // no credit while it was not ready).
        handles[0].allow(1000);
        let order = picks(&mut rr, &mut handles, 14).await;
        let period = [0, 0, 1, 0, 2, 0, 0];
        assert_eq!(order[..7], period);
        assert_eq!(order[7..], period);
    }

    #[tokio::test]
    async fn a_reinserted_endpoint_gets_its_new_weight() {
        let (mut rr, tx, mut handles) = balancer(&[1, 1]);
        assert_eq!(picks(&mut rr, &mut handles, 4).await, [0, 1, 0, 1]);
        // Discovery reports endpoint 1 again, now with weight 3.
        let (svc, h) = endpoint(3);
        tx.send(Change::Insert(1, svc)).unwrap();
        handles[1] = h;
        let order = picks(&mut rr, &mut handles, 40).await;
        let light = order.iter().filter(|&&i| i == 0).count();
        assert_eq!((light, order.len() - light), (10, 30), "{order:?}");
        assert_eq!(rr.len(), 2);
    }

    #[tokio::test]
    async fn skips_endpoints_that_are_not_ready() {
        let (mut rr, _tx, mut handles) = balancer(&[1, 1]);
        handles[0].allow(0);
        for _ in 0..3 {
            assert_eq!(send(&mut rr, &mut handles).await, 1);
        }
        handles[1].allow(0);
        assert!(futures_util::poll!(poll_fn(|cx| rr.poll_ready(cx))).is_pending());
        handles[0].allow(1);
        assert_eq!(send(&mut rr, &mut handles).await, 0);
    }

    #[tokio::test]
    async fn failed_endpoint_is_removed() {
        let (mut rr, _tx, mut handles) = balancer(&[1, 1]);
        handles[0].send_error("broken");
        for _ in 0..2 {
            assert_eq!(send(&mut rr, &mut handles).await, 1);
        }
        assert_eq!(rr.len(), 1);
    }

    #[tokio::test]
    async fn empty_is_not_ready() {
        let (mut rr, _tx, _) = balancer(&[]);
        assert!(rr.is_empty());
        assert!(
            futures_util::poll!(poll_fn(|cx| Service::<&str>::poll_ready(&mut rr, cx)))
                .is_pending()
        );
    }
}
