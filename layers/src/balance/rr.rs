//! Round-robin over ready endpoints.
//!
//! Endpoints are kept in discovery order. Each `poll_ready` starts at the endpoint after
//! the last one used and selects the first that is ready, so with every endpoint ready
//! requests alternate exactly (A, B, C, A, B, C, ...), and an endpoint that is not ready
//! is skipped without stalling the others. An endpoint whose readiness fails is removed
//! (discovery re-inserts it if it comes back). With no ready endpoint the balancer is
//! not ready, and it has registered interest in every endpoint and in discovery.

use crate::Error;
use indexmap::IndexMap;
use std::{
    hash::Hash,
    pin::Pin,
    task::{Context, Poll},
};
use tower::discover::{Change, Discover};
use tower_service::Service;

/// A round-robin balancer over a [`Discover`] stream of services.
pub struct RoundRobin<D: Discover> {
    discover: D,
    services: IndexMap<D::Key, D::Service>,
    /// Where the next search starts.
    next: usize,
    /// The endpoint made ready for the next `call`.
    selected: Option<usize>,
}

impl<D: Discover> std::fmt::Debug for RoundRobin<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoundRobin")
            .field("endpoints", &self.services.len())
            .field("next", &self.next)
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
            discover,
            services: IndexMap::new(),
            next: 0,
            selected: None,
        }
    }

    /// Number of endpoints, ready or not.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether there are no endpoints.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    fn update(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        while let Poll::Ready(Some(change)) = Pin::new(&mut self.discover).poll_discover(cx) {
            // Any change may move indices: forget the selection.
            self.selected = None;
            match change.map_err(Into::into)? {
                // `insert` keeps the position of a replaced key.
                Change::Insert(key, svc) => {
                    self.services.insert(key, svc);
                }
                Change::Remove(key) => {
                    // `shift_remove` keeps the rotation order of the others.
                    self.services.shift_remove(&key);
                }
            }
        }
        Ok(())
    }
}

impl<D, Req> Service<Req> for RoundRobin<D>
where
    D: Discover + Unpin,
    D::Key: Hash + Eq,
    D::Error: Into<Error>,
    D::Service: Service<Req>,
    <D::Service as Service<Req>>::Error: Into<Error>,
{
    type Response = <D::Service as Service<Req>>::Response;
    type Error = Error;
    type Future = futures_util::future::MapErr<
        <D::Service as Service<Req>>::Future,
        fn(<D::Service as Service<Req>>::Error) -> Error,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.update(cx)?;
        'search: loop {
            if let Some(i) = self.selected {
                match self.services[i].poll_ready(cx) {
                    Poll::Ready(Ok(())) => return Poll::Ready(Ok(())),
                    Poll::Pending => self.selected = None,
                    Poll::Ready(Err(e)) => {
                        self.drop_failed(i, e.into());
                        continue 'search;
                    }
                }
            }
            let len = self.services.len();
            for step in 0..len {
                let i = (self.next + step) % len;
                match self.services[i].poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        self.selected = Some(i);
                        self.next = (i + 1) % len;
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Pending => {}
                    Poll::Ready(Err(e)) => {
                        self.drop_failed(i, e.into());
                        continue 'search;
                    }
                }
            }
            return Poll::Pending;
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        use futures_util::TryFutureExt;
        let i = self
            .selected
            .take()
            .expect("RoundRobin::call before poll_ready returned Ready");
        self.services[i]
            .call(req)
            .map_err(Into::into as fn(_) -> Error)
    }
}

impl<D: Discover> RoundRobin<D>
where
    D::Key: Hash + Eq,
{
    fn drop_failed(&mut self, i: usize, error: Error) {
        tracing::debug!(%error, "dropping failed endpoint");
        self.services.shift_remove_index(i);
        self.selected = None;
        if self.next > i {
            self.next -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_util::Receiver;
    use futures_util::future::poll_fn;
    use tokio::sync::mpsc;
    use tower_test::mock;

    type Mock = mock::Mock<&'static str, &'static str>;
    type Handle = mock::Handle<&'static str, &'static str>;

    fn endpoint() -> (Mock, Handle) {
        let (svc, mut handle) = mock::pair();
        handle.allow(100);
        (svc, handle)
    }

    async fn send(
        rr: &mut RoundRobin<Receiver<Change<u32, Mock>>>,
        handles: &mut [Handle],
    ) -> usize {
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

    #[tokio::test]
    async fn alternates_exactly_and_follows_membership() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut rr = RoundRobin::new(Receiver(rx));
        let mut handles = Vec::new();
        for key in 0..3 {
            let (svc, h) = endpoint();
            tx.send(Change::Insert(key, svc)).unwrap();
            handles.push(h);
        }
        let mut order = Vec::new();
        for _ in 0..9 {
            order.push(send(&mut rr, &mut handles).await);
        }
        assert_eq!(order, [0, 1, 2, 0, 1, 2, 0, 1, 2]);

        // Remove the middle endpoint: the other two keep alternating.
        tx.send(Change::Remove(1)).unwrap();
        let mut order = Vec::new();
        for _ in 0..4 {
            order.push(send(&mut rr, &mut handles).await);
        }
        order.sort();
        assert_eq!(order, [0, 0, 2, 2]);
        assert_eq!(rr.len(), 2);
    }

    #[tokio::test]
    async fn skips_endpoints_that_are_not_ready() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut rr = RoundRobin::new(Receiver(rx));
        let mut handles = Vec::new();
        for key in 0..2 {
            let (svc, h) = endpoint();
            tx.send(Change::Insert(key, svc)).unwrap();
            handles.push(h);
        }
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
        let (tx, rx) = mpsc::unbounded_channel();
        let mut rr = RoundRobin::new(Receiver(rx));
        let mut handles = Vec::new();
        for key in 0..2 {
            let (svc, h) = endpoint();
            tx.send(Change::Insert(key, svc)).unwrap();
            handles.push(h);
        }
        handles[0].send_error("broken");
        for _ in 0..2 {
            assert_eq!(send(&mut rr, &mut handles).await, 1);
        }
        assert_eq!(rr.len(), 1);
    }

    #[tokio::test]
    async fn empty_is_not_ready() {
        let (_tx, rx) = mpsc::unbounded_channel::<Change<u32, Mock>>();
        let mut rr = RoundRobin::new(Receiver(rx));
        assert!(rr.is_empty());
        assert!(
            futures_util::poll!(poll_fn(|cx| Service::<&str>::poll_ready(&mut rr, cx)))
                .is_pending()
        );
    }
}
