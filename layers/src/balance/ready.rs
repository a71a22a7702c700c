//! The endpoint set under round-robin and p2c: discovery's services in discovery order,
//! each with what it is known to be (ready or not) and the algorithm's own state.
//!
//! `poll_ready` polls every endpoint not known to be ready (one that was polled ready
//! and not called since stays ready, as tower's contract says), so an endpoint that is
//! not ready neither receives requests nor stalls the others. An endpoint whose
//! readiness fails is removed (discovery re-inserts it if it comes back). The
//! algorithm's choice among the ready ones is polled once more before it is promised to
//! `call`; with no ready endpoint the set is not ready, and it has registered interest
//! in every endpoint and in discovery.

use crate::Error;
use indexmap::IndexMap;
use std::{
    hash::Hash,
    pin::Pin,
    task::{Context, Poll},
};
use tower::discover::{Change, Discover};
use tower_service::Service;

/// Discovery's endpoints with their readiness and per-endpoint state `X`.
pub(super) struct ReadySet<D: Discover, X> {
    discover: D,
    /// In discovery order (round-robin breaks ties by it).
    endpoints: IndexMap<D::Key, Slot<D::Service, X>>,
    /// The endpoint made ready for the next `call`.
    selected: Option<usize>,
}

/// An endpoint's service, its readiness and the algorithm's state for it.
pub(super) struct Slot<S, X> {
    pub(super) service: S,
    /// Polled ready and not called since.
    pub(super) ready: bool,
    pub(super) state: X,
}

impl<D: Discover, X> ReadySet<D, X> {
    /// Number of endpoints, ready or not.
    pub(super) fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Number of endpoints known to be ready.
    pub(super) fn ready_len(&self) -> usize {
        self.endpoints.values().filter(|e| e.ready).count()
    }

    /// The endpoints, in discovery order.
    pub(super) fn slots(&self) -> impl ExactSizeIterator<Item = &Slot<D::Service, X>> {
        self.endpoints.values()
    }

    /// The endpoint at `i` in discovery order.
    pub(super) fn slot(&self, i: usize) -> &Slot<D::Service, X> {
        &self.endpoints[i]
    }

    /// The endpoints, mutably.
    pub(super) fn slots_mut(&mut self) -> impl Iterator<Item = &mut Slot<D::Service, X>> {
        self.endpoints.values_mut()
    }

    /// The endpoint the last ready `poll_ready` selected, no longer known to be ready
    /// (it is about to be called). `None` if `poll_ready` did not return ready since.
    pub(super) fn take_selected(&mut self) -> Option<(usize, &mut Slot<D::Service, X>)> {
        let i = self.selected.take()?;
        let slot = &mut self.endpoints[i];
        slot.ready = false;
        Some((i, slot))
    }
}

impl<D, X> ReadySet<D, X>
where
    D: Discover + Unpin,
    D::Key: Hash + Eq,
    D::Error: Into<Error>,
    X: Default,
{
    pub(super) fn new(discover: D) -> Self {
        Self {
            discover,
            endpoints: IndexMap::new(),
            selected: None,
        }
    }

    /// Applies discovery's changes: a new endpoint starts with `X::default()`, a
    /// re-inserted one (e.g. with a new weight) keeps its position and state.
    fn update(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        while let Poll::Ready(Some(change)) = Pin::new(&mut self.discover).poll_discover(cx) {
            // Any change may move indices: forget the selection.
            self.selected = None;
            match change.map_err(Into::into)? {
                Change::Insert(key, service) => match self.endpoints.get_mut(&key) {
                    Some(slot) => {
                        slot.service = service;
                        slot.ready = false;
                    }
                    None => {
                        self.endpoints.insert(
                            key,
                            Slot {
                                service,
                                ready: false,
                                state: X::default(),
                            },
                        );
                    }
                },
                Change::Remove(key) => {
                    // `shift_remove` keeps the order of the others.
                    self.endpoints.shift_remove(&key);
                }
            }
        }
        Ok(())
    }

    fn drop_failed(&mut self, i: usize, error: Error) {
        tracing::debug!(%error, "dropping failed endpoint");
        self.endpoints.shift_remove_index(i);
        self.selected = None;
    }

    /// Updates the set, learns which endpoints are ready, and selects the one `choose`
    /// picks among the ready ones (given the set, `choose` returns an index of a ready
    /// slot, or `None` when there is none).
    pub(super) fn poll_select<Req>(
        &mut self,
        cx: &mut Context<'_>,
        mut choose: impl FnMut(&Self) -> Option<usize>,
    ) -> Poll<Result<(), Error>>
    where
        D::Service: Service<Req>,
        <D::Service as Service<Req>>::Error: Into<Error>,
    {
        self.update(cx)?;
        let mut i = 0;
        while i < self.endpoints.len() {
            let slot = &mut self.endpoints[i];
            if !slot.ready {
                match slot.service.poll_ready(cx) {
                    Poll::Ready(Ok(())) => slot.ready = true,
                    Poll::Pending => {}
                    Poll::Ready(Err(e)) => {
                        self.drop_failed(i, e.into());
                        continue;
                    }
                }
            }
            i += 1;
        }
        // Check the choice once more before promising it to `call` (it was ready, but
        // may have failed since); each round removes one endpoint from the choice.
        while let Some(i) = choose(self) {
            match self.endpoints[i].service.poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    self.selected = Some(i);
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending => self.endpoints[i].ready = false,
                Poll::Ready(Err(e)) => self.drop_failed(i, e.into()),
            }
        }
        self.selected = None;
        Poll::Pending
    }
}
