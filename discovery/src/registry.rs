//! The registry: latest snapshot per service, and per-subscriber delta streams.

use crate::Instance;
use futures_util::Stream;
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    convert::Infallible,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::{Instant, SystemTime},
};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tower::discover::Change;

/// All instances of one service, keyed by instance ID.
type Snapshot = Arc<BTreeMap<Arc<str>, Instance>>;

/// The latest state of every service that a source published or a balancer asked for.
///
/// Cloning is cheap; clones share the state. The lock inside is taken only when a
/// source publishes, a balancer subscribes, or the admin server reads — never per
/// request.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    services: Arc<Mutex<HashMap<Arc<str>, Entry>>>,
}

#[derive(Debug)]
struct Entry {
    /// `None` until the service's first update arrives.
    tx: watch::Sender<Option<Snapshot>>,
    updated: Option<Instant>,
    /// Set by a source that could not refresh this service (e.g. Consul unreachable):
    /// the snapshot is still served, but it may be out of date.
    stale_since: Option<SystemTime>,
}

impl Entry {
    fn new() -> Self {
        Self {
            tx: watch::Sender::new(None),
            updated: None,
            stale_since: None,
        }
    }
}

/// What the admin server reports about one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceState {
    /// The service name.
    pub name: Arc<str>,
    /// Whether the service has had its first discovery update.
    pub resolved: bool,
    /// Number of instances in the latest snapshot.
    pub instances: usize,
    /// When the source last failed to refresh the service, if it has not recovered.
    pub stale_since: Option<SystemTime>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent (every
        // critical section is a single insert or read), so poisoning is ignored.
        self.services.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the instance set of `service`. Subscribers receive only the difference.
    pub fn publish(&self, service: &str, instances: impl IntoIterator<Item = Instance>) {
        let snapshot: BTreeMap<_, _> = instances.into_iter().map(|i| (i.id.clone(), i)).collect();
        let mut services = self.lock();
        let entry = services.entry(service.into()).or_insert_with(Entry::new);
        entry.updated = Some(Instant::now());
        entry.stale_since = None;
        entry.tx.send_if_modified(|current| {
            if current.as_deref() == Some(&snapshot) {
                return false;
            }
            *current = Some(Arc::new(snapshot));
            true
        });
    }

    /// Marks `service` as possibly out of date (its source cannot refresh it). The last
    /// snapshot keeps being served; the next [`publish`](Self::publish) clears the mark.
    pub fn mark_stale(&self, service: &str) {
        let mut services = self.lock();
        let entry = services.entry(service.into()).or_insert_with(Entry::new);
        entry.stale_since.get_or_insert_with(SystemTime::now);
    }

    /// Subscribes to `service`: a stream of deltas starting from the current snapshot.
    ///
    /// A service nobody has published yet is registered as unresolved; its stream
    /// yields nothing until the first snapshot arrives.
    pub fn resolve(&self, service: &str) -> Resolution {
        let rx = {
            let mut services = self.lock();
            let entry = services.entry(service.into()).or_insert_with(Entry::new);
            entry.tx.subscribe()
        };
        Resolution {
            updates: WatchStream::new(rx),
            current: Snapshot::default(),
            pending: VecDeque::new(),
        }
    }

    /// Whether `service` has had its first update.
    pub fn is_resolved(&self, service: &str) -> bool {
        self.lock()
            .get(service)
            .is_some_and(|e| e.tx.borrow().is_some())
    }

    /// The current instances of `service`, in ID order.
    pub fn instances(&self, service: &str) -> Vec<Instance> {
        self.lock()
            .get(service)
            .and_then(|e| e.tx.borrow().clone())
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    /// A report on every known service, sorted by name.
    pub fn states(&self) -> Vec<ServiceState> {
        let services = self.lock();
        let mut states: Vec<_> = services
            .iter()
            .map(|(name, e)| {
                let snapshot = e.tx.borrow();
                ServiceState {
                    name: name.clone(),
                    resolved: snapshot.is_some(),
                    instances: snapshot.as_ref().map_or(0, |s| s.len()),
                    stale_since: e.stale_since,
                }
            })
            .collect();
        states.sort_by(|a, b| a.name.cmp(&b.name));
        states
    }
}

/// A subscription to one service: yields the changes that turn what this subscriber
/// has seen into the latest snapshot. Implements [`tower::discover::Discover`].
///
/// Intermediate snapshots may be skipped (only the latest matters), so a burst of
/// updates costs a subscriber one diff.
pub struct Resolution {
    updates: WatchStream<Option<Snapshot>>,
    current: Snapshot,
    pending: VecDeque<Change<Arc<str>, Instance>>,
}

impl std::fmt::Debug for Resolution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolution")
            .field("instances", &self.current.len())
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl Resolution {
    fn diff(&mut self, next: Snapshot) {
        for (id, instance) in next.iter() {
            if self.current.get(id) != Some(instance) {
                self.pending
                    .push_back(Change::Insert(id.clone(), instance.clone()));
            }
        }
        for id in self.current.keys() {
            if !next.contains_key(id) {
                self.pending.push_back(Change::Remove(id.clone()));
            }
        }
        self.current = next;
    }
}

impl Stream for Resolution {
    type Item = Result<Change<Arc<str>, Instance>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match Pin::new(&mut self.updates).poll_next(cx) {
                Poll::Ready(Some(Some(next))) => self.diff(next),
                // Not resolved yet: wait for the first snapshot.
                Poll::Ready(Some(None)) => {}
                // The registry is gone: the process is shutting down. Keep what we have.
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{FutureExt, StreamExt};

    fn inst(port: u16) -> Instance {
        Instance::new(([127, 0, 0, 1], port).into())
    }

    fn next_now(r: &mut Resolution) -> Option<Change<Arc<str>, Instance>> {
        r.next().now_or_never().flatten().map(|c| c.unwrap())
    }

    fn key(c: &Change<Arc<str>, Instance>) -> String {
        match c {
            Change::Insert(k, _) => format!("+{k}"),
            Change::Remove(k) => format!("-{k}"),
        }
    }

    #[tokio::test]
    async fn unresolved_service_yields_nothing_until_published() {
        let reg = Registry::new();
        let mut r = reg.resolve("web");
        assert!(next_now(&mut r).is_none());
        assert!(!reg.is_resolved("web"));
        reg.publish("web", vec![inst(1)]);
        assert!(reg.is_resolved("web"));
        assert_eq!(key(&next_now(&mut r).unwrap()), "+127.0.0.1:1");
        assert!(next_now(&mut r).is_none());
    }

    #[tokio::test]
    async fn emits_only_deltas() {
        let reg = Registry::new();
        reg.publish("web", vec![inst(1), inst(2)]);
        let mut r = reg.resolve("web");
        let mut first: Vec<_> = std::iter::from_fn(|| next_now(&mut r))
            .map(|c| key(&c))
            .collect();
        first.sort();
        assert_eq!(first, ["+127.0.0.1:1", "+127.0.0.1:2"]);

        reg.publish("web", vec![inst(2), inst(3)]);
        let mut delta: Vec<_> = std::iter::from_fn(|| next_now(&mut r))
            .map(|c| key(&c))
            .collect();
        delta.sort();
        assert_eq!(delta, ["+127.0.0.1:3", "-127.0.0.1:1"]);

        // Republishing the same set produces nothing.
        reg.publish("web", vec![inst(3), inst(2)]);
        assert!(next_now(&mut r).is_none());
    }

    #[tokio::test]
    async fn changed_attributes_are_reinserted() {
        let reg = Registry::new();
        reg.publish("web", vec![inst(1)]);
        let mut r = reg.resolve("web");
        next_now(&mut r).unwrap();
        let mut heavier = inst(1);
        heavier.weight = 5;
        reg.publish("web", vec![heavier]);
        match next_now(&mut r).unwrap() {
            Change::Insert(_, i) => assert_eq!(i.weight, 5),
            Change::Remove(_) => panic!("expected an insert"),
        }
    }

    #[tokio::test]
    async fn late_subscriber_starts_from_current_snapshot() {
        let reg = Registry::new();
        reg.publish("web", vec![inst(1)]);
        reg.publish("web", vec![inst(2)]);
        let mut r = reg.resolve("web");
        assert_eq!(key(&next_now(&mut r).unwrap()), "+127.0.0.1:2");
        assert!(next_now(&mut r).is_none());
    }

    #[test]
    fn states_report_counts_and_staleness() {
        let reg = Registry::new();
        reg.publish("b", vec![inst(1), inst(2)]);
        let _ = reg.resolve("a");
        reg.mark_stale("b");
        let states = reg.states();
        assert_eq!(states.len(), 2);
        assert_eq!(states[0].name.as_ref(), "a");
        assert!(!states[0].resolved);
        assert_eq!(states[1].instances, 2);
        assert!(states[1].stale_since.is_some());
        reg.publish("b", vec![inst(1)]);
        assert!(reg.states()[1].stale_since.is_none());
    }
}
