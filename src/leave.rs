//! Leaving the fleet: stop being chosen before stopping to serve.
//!
//! Leaving deregisters the instance from Consul (after stopping the registration loop,
//! so it cannot register again, and after any registration call it had already sent
//! has been answered, so that call cannot land later) and turns `/ready` to 503,
//! while baton keeps serving.
//! It happens on `POST /drain` to the admin server — a Kubernetes `preStop` hook of the
//! application calls it, because Kubernetes stops a native sidecar only after the
//! application has exited — or at the start of a SIGTERM shutdown, whichever comes
//! first.
//!
//! A `preStop` hook also runs when only the application container restarts (a failed
//! liveness probe): then no SIGTERM follows, and `POST /resume` (the application's
//! `postStart` hook) joins again — ready, and registered. After SIGTERM there is no
//! way back.

use crate::admin::State;
use baton_discovery::consul::register::Registrar;
use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};
use tokio::{sync::watch, task::JoinHandle};

/// How long leaving waits for Consul to confirm the deregistration, and then for the
/// registration loop to end: an unreachable agent must not hold up a shutdown. (A
/// registration call in flight is waited for first, for at most its own timeout.)
const STEP_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the instance stands. One lock orders leaving, joining and shutting down.
#[derive(Default)]
struct Membership {
    registrar: Option<Arc<Registrar>>,
    /// The registration loop while registered: its task and stop signal.
    running: Option<(JoinHandle<()>, watch::Sender<bool>)>,
    left: bool,
    shutting_down: bool,
}

/// What [`Leave::resume`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Joined again.
    Joined,
    /// Had not left.
    AlreadyIn,
    /// Shutting down: no way back.
    ShuttingDown,
}

/// See the module docs.
pub struct Leave {
    state: Arc<State>,
    membership: tokio::sync::Mutex<Membership>,
}

impl Leave {
    /// Leaving for a process whose readiness is `state`.
    pub fn new(state: Arc<State>) -> Self {
        Self {
            state,
            membership: tokio::sync::Mutex::new(Membership::default()),
        }
    }

    /// Keeps `registrar`'s instance registered until leaving (from the moment of
    /// joining again, if it has already left).
    pub async fn register(&self, registrar: Arc<Registrar>) {
        let mut m = self.membership.lock().await;
        m.registrar = Some(registrar);
        if m.left {
            tracing::info!("left before registering: registering when resumed");
        } else {
            start(&mut m);
        }
    }

    /// Leaves, if not left already; true when this call did it.
    pub async fn leave(&self) -> bool {
        let mut m = self.membership.lock().await;
        if m.left {
            return false;
        }
        // The loop ends at its next wait; a registration call it has already sent
        // is not cut short (abandoned, it could land after the deregistration).
        let running = m.running.take().map(|(task, stop)| {
            let _ = stop.send(true);
            task
        });
        if let Some(registrar) = &m.registrar {
            // Waits for that call to be answered (at most its own timeout), then
            // deregisters.
            match registrar.deregister(STEP_TIMEOUT).await {
                Ok(()) => tracing::info!(id = registrar.id(), "deregistered from Consul"),
                Err(error) => {
                    tracing::warn!(id = registrar.id(), %error, "cannot deregister from Consul; its check on /ready fails from now on, and DeregisterCriticalServiceAfter removes the instance")
                }
            }
        }
        if let Some(mut task) = running {
            // Registration is closed now: the loop can do nothing more but end.
            if tokio::time::timeout(STEP_TIMEOUT, &mut task).await.is_err() {
                task.abort();
            }
        }
        self.state.draining.store(true, Ordering::Release);
        m.left = true;
        true
    }

    /// Leaves for good (SIGTERM): afterwards [`resume`](Self::resume) refuses. True
    /// when this call did the leaving.
    pub async fn shut_down(&self) -> bool {
        self.membership.lock().await.shutting_down = true;
        self.leave().await
    }

    /// Joins again after a [`leave`](Self::leave): ready, and registered again.
    pub async fn resume(&self) -> Resume {
        let mut m = self.membership.lock().await;
        if m.shutting_down {
            return Resume::ShuttingDown;
        }
        if !m.left {
            return Resume::AlreadyIn;
        }
        m.left = false;
        start(&mut m);
        self.state.draining.store(false, Ordering::Release);
        Resume::Joined
    }
}

/// Starts the registration loop, if there is a registration.
fn start(m: &mut Membership) {
    let Some(registrar) = m.registrar.clone() else {
        return;
    };
    let (stop, stop_rx) = watch::channel(false);
    registrar.reopen();
    let task = tokio::spawn(registrar.supervise(stop_rx));
    m.running = Some((task, stop));
}
