//! Leaving the fleet: stop being chosen before stopping to serve.
//!
//! Leaving deregisters the instance from Consul (after stopping the registration loop,
//! so it cannot register again) and turns `/ready` to 503, while baton keeps serving.
//! It happens once: on `POST /drain` to the admin server (a Kubernetes `preStop` hook
//! of the application calls it, because Kubernetes stops a native sidecar only after
//! the application has exited) or at the start of a SIGTERM shutdown, whichever comes
//! first.

use crate::admin::State;
use baton_discovery::consul::{self, register::Registrar};
use std::{
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};
use tokio::{sync::watch, task::JoinHandle};

/// How long leaving waits for the registration loop to stop, and then for Consul to
/// confirm the deregistration: an unreachable agent must not hold up a shutdown.
const STEP_TIMEOUT: Duration = Duration::from_secs(3);

/// A running registration: the registrar, its loop, and the loop's stop signal.
type Registration = (Arc<Registrar>, JoinHandle<()>, watch::Sender<bool>);

/// See the module docs.
pub struct Leave {
    state: Arc<State>,
    registration: Mutex<Option<Registration>>,
    done: tokio::sync::Mutex<bool>,
}

impl Leave {
    /// Leaving for a process whose readiness is `state`.
    pub fn new(state: Arc<State>) -> Self {
        Self {
            state,
            registration: Mutex::new(None),
            done: tokio::sync::Mutex::new(false),
        }
    }

    /// Starts keeping `registrar`'s instance registered, until leaving (not at all if
    /// leaving has begun: a `POST /drain` that came first must hold).
    pub fn register(&self, registrar: Arc<Registrar>) {
        match self.done.try_lock() {
            Ok(done) if !*done => {}
            _ => {
                tracing::info!("left before registering: not registering in Consul");
                return;
            }
        }
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn({
            let registrar = registrar.clone();
            async move { registrar.run(stop_rx).await }
        });
        *self.registration.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((registrar, task, stop));
    }

    /// Whether leaving has happened (or is happening).
    pub fn started(&self) -> bool {
        self.state.draining.load(Ordering::Acquire)
    }

    /// Leaves, if not done yet; true when this call did it (later calls wait for the
    /// first to finish and return false).
    pub async fn leave(&self) -> bool {
        let mut done = self.done.lock().await;
        if *done {
            return false;
        }
        let registration = self
            .registration
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((registrar, mut task, stop)) = registration {
            // The loop finishes a registration already sent (it must not land after
            // the deregistration), then ends.
            let _ = stop.send(true);
            if tokio::time::timeout(STEP_TIMEOUT, &mut task).await.is_err() {
                task.abort();
            }
            let deregistered = tokio::time::timeout(STEP_TIMEOUT, registrar.deregister())
                .await
                .unwrap_or(Err(consul::Error::Timeout(STEP_TIMEOUT)));
            match deregistered {
                Ok(()) => tracing::info!(id = registrar.id(), "deregistered from Consul"),
                Err(error) => {
                    tracing::warn!(id = registrar.id(), %error, "cannot deregister from Consul; its check on /ready fails from now on, and DeregisterCriticalServiceAfter removes the instance")
                }
            }
        }
        self.state.draining.store(true, Ordering::Release);
        *done = true;
        true
    }
}
