//! Sharing a single-owner service (a balancer) between connections, without a task hop.
//!
//! A balancer is `&mut self`: it owns its endpoints and their readiness. tower's
//! `Buffer` shares one by moving it into a task of its own and sending every request
//! there over a channel, its response future back over a oneshot: two task wake-ups and
//! a channel round trip per request, about 4,000 instructions on the proxy's hot path.
//! [`Share`] runs the balancer in the caller's task instead. The response future
//! takes the balancer for the few hundred nanoseconds of `poll_ready` + `call` and
//! gives it back; the endpoint's future it gets is then polled by the caller alone.
//!
//! No thread ever waits for the balancer. It sits in a `Mutex` that is only ever
//! `try_lock`ed: a task that finds it taken (another worker thread is inside
//! `poll_ready` + `call`, which never await) asks to be polled again and yields, so the
//! other tasks of its thread run meanwhile. With one worker thread it is never taken.
//!
//! When the balancer is not ready (all endpoints unready, e.g. ejected), every waiting
//! task parks its waker in a list, and the balancer is always polled with one waker
//! that wakes the whole list: whichever endpoint or discovery change makes it ready
//! again wakes every task that waited, and they take turns. A generation counter closes
//! the race between a task finding the balancer pending and parking its waker.
//!
//! Like `Buffer`, a `Share` is always ready and unbounded: the in-flight limit at the
//! top of the stack bounds what waits here.

use crate::Error;
use pin_project_lite::pin_project;
use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, TryLockError,
    },
    task::{Context, Poll, Wake, Waker},
};
use tower_service::Service;

/// A cloneable handle to one shared service (see the module docs).
pub struct Share<S> {
    shared: Arc<Shared<S>>,
}

struct Shared<S> {
    service: Mutex<S>,
    wake_all: Arc<WakeAll>,
    /// `wake_all` as a waker, made once: the service sees the same waker every time.
    waker: Waker,
}

/// The tasks waiting for the service to become ready.
#[derive(Default)]
struct WakeAll {
    waiters: Mutex<Vec<Waker>>,
    /// Bumped on every wake: a task that saw the service pending checks it did not
    /// miss a wake-up before its waker was parked.
    generation: AtomicU64,
}

impl Wake for WakeAll {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let waiters = {
            let mut waiters = lock(&self.waiters);
            self.generation.fetch_add(1, Ordering::AcqRel);
            std::mem::take(&mut *waiters)
        };
        for waker in waiters {
            waker.wake();
        }
    }
}

/// Locks a mutex whose holder cannot leave it inconsistent (a panic while holding it
/// leaves valid data behind).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<S> Share<S> {
    /// Shares `service`.
    pub fn new(service: S) -> Self {
        let wake_all = Arc::new(WakeAll::default());
        let waker = Waker::from(wake_all.clone());
        Self {
            shared: Arc::new(Shared {
                service: Mutex::new(service),
                wake_all,
                waker,
            }),
        }
    }
}

impl<S> Clone for Share<S> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<S> std::fmt::Debug for Share<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share").finish_non_exhaustive()
    }
}

impl<S, Req> Service<Req> for Share<S>
where
    S: Service<Req>,
    S::Error: Into<Error>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = ResponseFuture<S, Req>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture {
            state: State::Waiting {
                req: Some(req),
                shared: self.shared.clone(),
                parked: None,
            },
        }
    }
}

pin_project! {
    /// Response future of [`Share`]: dispatches the request through the shared service
    /// on its first poll that finds it ready, then is the service's future.
    pub struct ResponseFuture<S: Service<Req>, Req> {
        #[pin]
        state: State<S, Req>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Req>, Req> {
        Waiting {
            req: Option<Req>,
            shared: Arc<Shared<S>>,
            // The generation at which this task's waker was parked: while it is
            // current, the waker is still in the list.
            parked: Option<u64>,
        },
        Called {
            #[pin]
            future: S::Future,
        },
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<Error>,
{
    type Output = Result<S::Response, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project().state.project() {
                StateProj::Called { future } => return future.poll(cx).map_err(Into::into),
                StateProj::Waiting {
                    req,
                    shared,
                    parked,
                } => {
                    let future = match dispatch(shared, req, parked, cx) {
                        Poll::Ready(Ok(future)) => future,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    };
                    self.as_mut().project().state.set(State::Called { future });
                }
            }
        }
    }
}

/// Takes the shared service, and calls it with `req` if it is ready.
fn dispatch<S, Req>(
    shared: &Shared<S>,
    req: &mut Option<Req>,
    parked: &mut Option<u64>,
    cx: &mut Context<'_>,
) -> Poll<Result<S::Future, Error>>
where
    S: Service<Req>,
    S::Error: Into<Error>,
{
    let mut service = match shared.service.try_lock() {
        Ok(service) => service,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => {
            // Another thread is inside poll_ready + call, which never await: come back
            // after the other tasks of this thread have had their turn.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
    };
    let generation = shared.wake_all.generation.load(Ordering::Acquire);
    match service.poll_ready(&mut Context::from_waker(&shared.waker)) {
        Poll::Ready(Ok(())) => {
            let Some(req) = req.take() else {
                return Poll::Ready(Err("request dispatched twice".into()));
            };
            Poll::Ready(Ok(service.call(req)))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
        Poll::Pending => {
            drop(service);
            let mut waiters = lock(&shared.wake_all.waiters);
            if shared.wake_all.generation.load(Ordering::Acquire) != generation {
                // Woken between our poll and now: the service may be ready already.
                cx.waker().wake_by_ref();
            } else if *parked != Some(generation) {
                // (A task polled again before any wake-up is in the list already.)
                waiters.push(cx.waker().clone());
                *parked = Some(generation);
            }
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tower::ServiceExt;
    use tower_test::mock;

    #[tokio::test]
    async fn requests_go_through_in_the_callers_task() {
        let (svc, mut handle) = mock::pair::<&'static str, &'static str>();
        let share = Share::new(svc);
        handle.allow(2);
        let a = tokio::spawn(share.clone().oneshot("a"));
        let b = tokio::spawn(share.clone().oneshot("b"));
        for _ in 0..2 {
            let (req, rsp) = handle.next_request().await.unwrap();
            rsp.send_response(req);
        }
        assert_eq!(a.await.unwrap().unwrap(), "a");
        assert_eq!(b.await.unwrap().unwrap(), "b");
    }

    #[tokio::test]
    async fn every_task_waiting_for_readiness_is_woken_when_it_comes() {
        let (svc, mut handle) = mock::pair::<u32, u32>();
        handle.allow(0);
        let share = Share::new(svc);
        let tasks: Vec<_> = (0..5)
            .map(|i| tokio::spawn(share.clone().oneshot(i)))
            .collect();
        // Let every task find the service not ready and park.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(tasks.iter().all(|t| !t.is_finished()));
        handle.allow(5);
        let mut seen = Vec::new();
        for _ in 0..5 {
            let (req, rsp) = handle.next_request().await.unwrap();
            seen.push(req);
            rsp.send_response(req * 10);
        }
        seen.sort();
        assert_eq!(seen, [0, 1, 2, 3, 4]);
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap().unwrap(), i as u32 * 10);
        }
    }

    #[tokio::test]
    async fn readiness_errors_fail_the_request_and_keep_the_handle_usable() {
        let (svc, mut handle) = mock::pair::<u32, u32>();
        let share = Share::new(svc);
        handle.send_error("endpoint failed");
        let err = share.clone().oneshot(1).await.unwrap_err();
        assert_eq!(err.to_string(), "endpoint failed");
        handle.allow(1);
        let rsp = tokio::spawn(share.oneshot(2));
        let (req, tx) = handle.next_request().await.unwrap();
        tx.send_response(req + 1);
        assert_eq!(rsp.await.unwrap().unwrap(), 3);
    }

    /// Many tasks on several threads calling one service that counts how often it is
    /// entered concurrently: it never is, and every request gets its own answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_service_is_entered_by_one_task_at_a_time() {
        #[derive(Clone)]
        struct Exclusive {
            inside: Arc<AtomicUsize>,
            overlaps: Arc<AtomicUsize>,
        }
        impl Service<u64> for Exclusive {
            type Response = u64;
            type Error = Error;
            type Future = std::future::Ready<Result<u64, Error>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
                if self.inside.fetch_add(1, Ordering::SeqCst) != 0 {
                    self.overlaps.fetch_add(1, Ordering::SeqCst);
                }
                std::hint::spin_loop();
                self.inside.fetch_sub(1, Ordering::SeqCst);
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, req: u64) -> Self::Future {
                std::future::ready(Ok(req * 2))
            }
        }
        let overlaps = Arc::new(AtomicUsize::new(0));
        let share = Share::new(Exclusive {
            inside: Arc::default(),
            overlaps: overlaps.clone(),
        });
        let tasks: Vec<_> = (0..8u64)
            .map(|t| {
                let share = share.clone();
                tokio::spawn(async move {
                    for i in 0..2_000 {
                        let n = t * 10_000 + i;
                        assert_eq!(share.clone().oneshot(n).await.unwrap(), n * 2);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(overlaps.load(Ordering::SeqCst), 0);
    }
}
