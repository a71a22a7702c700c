//! `NewCache`: build a target's service once, share it, drop it when idle.
//!
//! Per-service balancers are expensive to build (a discovery subscription, endpoint
//! pools, load estimates) and must be shared by every connection routed to the service,
//! so the logical stack is built through a `NewCache`. Lookups are lock-free: the map is
//! an immutable snapshot behind an [`ArcSwap`], replaced copy-on-write when a target is
//! added or evicted (rare). A target unused for the idle timeout is evicted by a
//! background sweep; connections still holding a clone keep working with it, and the
//! next lookup builds a fresh one.

use crate::new_service::NewService;
use arc_swap::ArcSwap;
use std::{
    collections::HashMap,
    hash::Hash,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::Duration,
};
use tokio::time::Instant;
use xxhash_rust::xxh3::Xxh3Builder;

/// The cache's map: looked up on every request, so hashed with xxh3 rather than SipHash
/// (keys are configuration, not attacker-chosen).
type Map<T, S> = HashMap<T, Arc<Entry<S>>, Xxh3Builder>;

/// A caching `NewService` (see the module docs).
pub struct NewCache<T, N: NewService<T>> {
    inner: N,
    shared: Arc<Shared<T, N::Service>>,
}

struct Shared<T, S> {
    entries: ArcSwap<Map<T, S>>,
    /// Serializes writers; readers never take it.
    write: Mutex<()>,
    epoch: Instant,
}

struct Entry<S> {
    service: S,
    /// Seconds since `epoch` of the last lookup.
    last_used: AtomicU64,
}

impl<T, N: NewService<T> + Clone> Clone for NewCache<T, N> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<T, S> Shared<T, S> {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T, N> NewCache<T, N>
where
    T: Clone + Eq + Hash + Send + Sync + 'static,
    N: NewService<T>,
    N::Service: Send + Sync + 'static,
{
    /// Caches the services `inner` builds; those unused for `idle` are evicted.
    /// Must be called within a tokio runtime (the sweep is a task).
    pub fn new(inner: N, idle: Duration) -> Self {
        let shared = Arc::new(Shared {
            entries: ArcSwap::default(),
            write: Mutex::new(()),
            epoch: Instant::now(),
        });
        tokio::spawn(sweep(Arc::downgrade(&shared), idle));
        Self { inner, shared }
    }

    /// Number of cached targets.
    pub fn len(&self) -> usize {
        self.shared.entries.load().len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

async fn sweep<T, S>(shared: Weak<Shared<T, S>>, idle: Duration)
where
    T: Clone + Eq + Hash,
{
    let period = (idle / 2).max(Duration::from_secs(1));
    loop {
        tokio::time::sleep(period).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let now = shared.now();
        let idle = idle.as_secs();
        let expired =
            |e: &Entry<S>| now.saturating_sub(e.last_used.load(Ordering::Relaxed)) >= idle;
        if !shared.entries.load().values().any(|e| expired(e)) {
            continue;
        }
        let _write = shared.lock();
        let current = shared.entries.load_full();
        let kept: Map<T, S> = current
            .iter()
            .filter(|(_, e)| !expired(e))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        tracing::debug!(
            evicted = current.len() - kept.len(),
            "idle services evicted"
        );
        shared.entries.store(Arc::new(kept));
    }
}

impl<T, N> NewService<T> for NewCache<T, N>
where
    T: Clone + Eq + Hash,
    N: NewService<T>,
    N::Service: Clone,
{
    type Service = N::Service;

    fn new_service(&self, target: T) -> N::Service {
        let now = self.shared.now();
        let touch = |e: &Entry<N::Service>| {
            // Only write when the second changed, so hot lookups stay read-only.
            if e.last_used.load(Ordering::Relaxed) != now {
                e.last_used.store(now, Ordering::Relaxed);
            }
            e.service.clone()
        };
        if let Some(entry) = self.shared.entries.load().get(&target) {
            return touch(entry);
        }
        let _write = self.shared.lock();
        let current = self.shared.entries.load_full();
        if let Some(entry) = current.get(&target) {
            return touch(entry);
        }
        let service = self.inner.new_service(target.clone());
        let mut next = Map::clone(&current);
        next.insert(
            target,
            Arc::new(Entry {
                service: service.clone(),
                last_used: AtomicU64::new(now),
            }),
        );
        self.shared.entries.store(Arc::new(next));
        service
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::new_service::NewServiceFn;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test(start_paused = true)]
    async fn builds_once_and_evicts_when_idle() {
        let built = Arc::new(AtomicUsize::new(0));
        let counter = built.clone();
        let cache = NewCache::new(
            NewServiceFn::new(move |t: &'static str| {
                counter.fetch_add(1, Ordering::SeqCst);
                Arc::new(t)
            }),
            Duration::from_secs(60),
        );
        let a1 = cache.new_service("a");
        let a2 = cache.new_service("a");
        assert!(Arc::ptr_eq(&a1, &a2), "the same service is shared");
        cache.new_service("b");
        assert_eq!(built.load(Ordering::SeqCst), 2);
        assert_eq!(cache.len(), 2);

        // "a" stays in use, "b" goes idle.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(30)).await;
            cache.new_service("a");
        }
        assert_eq!(cache.len(), 1, "idle target evicted");
        let a3 = cache.new_service("a");
        assert!(Arc::ptr_eq(&a1, &a3), "busy target kept");
        cache.new_service("b");
        assert_eq!(
            built.load(Ordering::SeqCst),
            3,
            "evicted target rebuilt on demand"
        );
    }
}
