//! Registering the local service with the Consul agent, and keeping it registered.
//!
//! [`Registrar::run`] registers (`PUT /v1/agent/service/register`) and then watches the
//! registration with a blocking query on `GET /v1/agent/service/<id>` (by content
//! hash): idle, that is one request per `wait`. When the agent answers 404 (it was
//! restarted without its state, or someone deregistered the instance) it registers
//! again. [`Registrar::deregister`] removes the instance; the application stops the
//! loop and calls it on shutdown *before* draining, so peers stop choosing this
//! instance while it still serves.
//!
//! The deregistration strictly follows any registration already sent: it first closes
//! registration (no registration call starts any more), then waits for one in flight
//! to be answered (bounded by that call's own timeout), and only then deregisters. A
//! registration call abandoned instead could reach the agent after the deregistration
//! and bring the instance back.

use super::{
    api::Registration,
    client::{blocking_deadline, encode, go_duration, Client, Error, CALL_TIMEOUT},
    retry::{self, Backoff, Exit, TokenBucket},
};
use bytes::Bytes;
use http::{Method, StatusCode};
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::sync::{watch, Mutex};

/// Keeps one service instance registered.
#[derive(Debug)]
pub struct Registrar {
    client: Client,
    id: String,
    name: String,
    body: Bytes,
    wait: Duration,
    backoff: Backoff,
    /// Set when deregistering begins: no registration call starts from then on,
    /// until [`reopen`](Self::reopen).
    closed: AtomicBool,
    /// Held by a registration call while it is in flight, and by the deregistration,
    /// so that the two never overlap.
    in_flight: Mutex<()>,
}

impl Registrar {
    /// A registrar of `registration`; `wait` bounds its blocking queries.
    pub fn new(
        client: Client,
        registration: &Registration,
        wait: Duration,
        backoff_base: Duration,
        backoff_max: Duration,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            client,
            id: registration.id.clone(),
            name: registration.name.clone(),
            body: serde_json::to_vec(registration)?.into(),
            wait,
            backoff: Backoff {
                base: backoff_base,
                max: backoff_max,
            },
            closed: AtomicBool::new(false),
            in_flight: Mutex::new(()),
        })
    }

    /// Allows registering again after a [`deregister`](Self::deregister) (joining
    /// again: call it before starting [`run`](Self::run) anew).
    pub fn reopen(&self) {
        self.closed.store(false, Ordering::SeqCst);
    }

    /// The instance's ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Registers (or re-registers, replacing the definition) the instance: `Ok(true)`
    /// once the agent has it, `Ok(false)` without asking when deregistering has begun.
    ///
    /// Cancelling the returned future while the call is in flight gives up ordering
    /// it before the deregistration: [`run`](Self::run) never does.
    pub async fn register(&self) -> Result<bool, Error> {
        let _in_flight = self.in_flight.lock().await;
        if self.closed.load(Ordering::SeqCst) {
            return Ok(false);
        }
        self.client
            .request(
                Method::PUT,
                "/v1/agent/service/register?replace-existing-checks=true",
                Some(self.body.clone()),
                CALL_TIMEOUT,
            )
            .await?
            .success()
            .map(|_| true)
    }

    /// Deregisters the instance, strictly after any registration call in flight (see
    /// the module docs): closes registration, waits for such a call to be answered or
    /// time out, then asks the agent, within `timeout`. An instance the agent does not
    /// know is already gone.
    pub async fn deregister(&self, timeout: Duration) -> Result<(), Error> {
        self.closed.store(true, Ordering::SeqCst);
        // A registration call holds the lock for at most its own timeout, CALL_TIMEOUT:
        // this bound is only a safety net.
        let _in_flight = match tokio::time::timeout(
            CALL_TIMEOUT + Duration::from_secs(1),
            self.in_flight.lock(),
        )
        .await
        {
            Ok(guard) => Some(guard),
            Err(_) => {
                tracing::warn!(id = %self.id, "a Consul registration call is still in flight; deregistering anyway");
                None
            }
        };
        let path = format!("/v1/agent/service/deregister/{}", encode(&self.id));
        let rsp = self
            .client
            .request(Method::PUT, &path, None, timeout)
            .await?;
        if rsp.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        rsp.success().map(drop)
    }

    /// [`run`](Self::run) in a task of its own, started again after a backoff should it
    /// panic (it should not; if it did, the instance would silently stop being kept
    /// registered): logged at error. Returns when `run` does; dropping it stops the task.
    pub async fn supervise(self: Arc<Self>, stop: watch::Receiver<bool>) {
        let (id, service) = (self.id.clone(), self.name.clone());
        let backoff = self.backoff;
        retry::supervise(
            backoff,
            move || {
                let (me, stop) = (self.clone(), stop.clone());
                async move {
                    me.run(stop).await;
                    Exit::Done
                }
            },
            |why, restarts, delay| {
                tracing::error!(service = &*service, id = &*id, restarts, retry_in = ?delay,
                    "the Consul registration loop {why}; restarting it");
            },
        )
        .await
    }

    /// Registers, then keeps the registration in place until `stop` turns true (or its
    /// sender is dropped), or deregistering begins. A registration call that went out
    /// is always finished before returning (a stop does not cut it short), so a
    /// [`deregister`](Self::deregister) waiting for it is never overtaken.
    pub async fn run(&self, mut stop: watch::Receiver<bool>) {
        let (id, service) = (&*self.id, &*self.name);
        // At most one query a second sustained, whatever the agent does.
        let mut bucket = TokenBucket::new(1.0, 3);
        let mut registered = false;
        let mut hash: Option<String> = None;
        let mut failures = 0u32;
        loop {
            tokio::select! {
                biased;
                _ = stopped(&mut stop) => return,
                _ = bucket.acquire() => {}
            }
            if !registered {
                match self.register().await {
                    Ok(false) => return,
                    Ok(true) => {
                        tracing::info!(service, id, agent = %self.client.settings().url(), "registered in Consul");
                        registered = true;
                        failures = 0;
                        hash = None;
                    }
                    Err(error) => {
                        failures = failures.saturating_add(1);
                        let delay = self.backoff.delay(failures);
                        if failures % 10 == 1 {
                            tracing::warn!(service, id, %error, failures, retry_in = ?delay, "cannot register in Consul");
                        }
                        if pause(&mut stop, delay).await {
                            return;
                        }
                    }
                }
                continue;
            }
            let mut path = format!("/v1/agent/service/{}", encode(id));
            let mut timeout = CALL_TIMEOUT;
            if let Some(h) = &hash {
                let (wait, deadline) = blocking_deadline(self.wait);
                path.push_str(&format!("?hash={}&wait={}", encode(h), go_duration(wait)));
                timeout = deadline;
            }
            let answer = tokio::select! {
                biased;
                _ = stopped(&mut stop) => return,
                a = self.client.request(Method::GET, &path, None, timeout) => a,
            };
            match answer {
                Ok(rsp) if rsp.status == StatusCode::NOT_FOUND => {
                    tracing::warn!(service, id, "the Consul agent no longer has this instance (agent restarted?); registering again");
                    registered = false;
                }
                Ok(rsp) if rsp.status.is_success() => {
                    failures = 0;
                    hash = rsp.header("x-consul-contenthash").map(str::to_string);
                    // An agent that cannot block on the hash is polled, gently.
                    if hash.is_none() && pause(&mut stop, NO_HASH_POLL).await {
                        return;
                    }
                }
                other => {
                    let error = match other {
                        Ok(rsp) => rsp.success().err(),
                        Err(e) => Some(e),
                    };
                    failures = failures.saturating_add(1);
                    let delay = self.backoff.delay(failures);
                    if let Some(error) = error {
                        if failures % 10 == 1 {
                            tracing::warn!(service, id, %error, retry_in = ?delay, "cannot check the Consul registration");
                        }
                    }
                    // Ask without the hash next time: after an outage, learn at once
                    // whether the agent still has the instance.
                    hash = None;
                    if pause(&mut stop, delay).await {
                        return;
                    }
                }
            }
        }
    }
}

/// How often the registration is read when the agent gives no content hash to block on.
const NO_HASH_POLL: Duration = Duration::from_secs(10);

/// Resolves once `stop` is true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Sleeps `d` unless stopped first; true when stopped.
async fn pause(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        biased;
        _ = stopped(stop) => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::{
        api::{HttpCheck, Weights},
        test_agent::{Asked, TestAgent},
    };
    use std::{collections::BTreeMap, sync::Arc};

    pub(super) fn registration() -> Registration {
        Registration {
            id: "web-1".into(),
            name: "web".into(),
            tags: Vec::new(),
            address: "127.0.0.1".into(),
            port: 8080,
            meta: BTreeMap::new(),
            weights: Weights::default(),
            check: HttpCheck {
                name: "baton ready".into(),
                http: "http://127.0.0.1:15021/ready".into(),
                interval: "10s".into(),
                timeout: "2s".into(),
                deregister_critical_service_after: "1m".into(),
            },
        }
    }

    /// Waits (real time, bounded) until the agent has been asked something `pred` likes.
    pub(super) async fn until_asked(agent: &TestAgent, pred: impl Fn(&Asked) -> bool) {
        for _ in 0..500 {
            if agent.asked().iter().any(&pred) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never asked; got {:?}", agent.asked());
    }

    #[tokio::test]
    async fn a_wait_beyond_consuls_limit_is_cut_to_it() {
        let agent = TestAgent::start(|_| {
            (
                200,
                vec![("x-consul-contenthash", "h1".into())],
                "{}".into(),
            )
        })
        .await;
        let registrar = Arc::new(
            Registrar::new(
                agent.client(),
                &registration(),
                Duration::MAX,
                Duration::from_millis(10),
                Duration::from_millis(10),
            )
            .unwrap(),
        );
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn({
            let r = registrar.clone();
            async move { r.run(stop_rx).await }
        });
        until_asked(&agent, |a| {
            a.uri.ends_with("/v1/agent/service/web-1?hash=h1&wait=600s")
        })
        .await;
        stop.send(true).unwrap();
        task.await
            .expect("the loop neither panics nor hangs on stop");
        let first = &agent.asked()[0];
        assert_eq!(first.method, Method::PUT);
        assert!(
            first.uri.contains("/v1/agent/service/register"),
            "{first:?}"
        );
    }

    #[tokio::test]
    async fn deregistering_waits_for_a_registration_in_flight() {
        let agent = TestAgent::start(|_| (200, Vec::new(), "{}".into())).await;
        agent.delay("/v1/agent/service/register", Duration::from_millis(300));
        let registrar = Arc::new(
            Registrar::new(
                agent.client(),
                &registration(),
                Duration::from_secs(1),
                Duration::from_millis(10),
                Duration::from_millis(10),
            )
            .unwrap(),
        );
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn({
            let r = registrar.clone();
            async move { r.run(stop_rx).await }
        });
        until_asked(&agent, |a| a.uri.contains("/register")).await;
        // Leaving, while the agent has not answered the registration yet.
        stop.send(true).unwrap();
        registrar.deregister(Duration::from_secs(1)).await.unwrap();
        let events = agent.events();
        let answered = events
            .iter()
            .position(|e| e.starts_with("answered PUT") && e.contains("/register"))
            .expect("the registration was answered");
        let deregister = events
            .iter()
            .position(|e| e.starts_with("asked PUT") && e.contains("/deregister/web-1"))
            .expect("deregistered");
        assert!(answered < deregister, "{events:?}");
        task.await.unwrap();
        // Closed: no registration starts any more, until reopened.
        assert!(!registrar.register().await.unwrap());
        let puts = |agent: &TestAgent| {
            agent
                .asked()
                .iter()
                .filter(|a| a.uri.contains("/register"))
                .count()
        };
        assert_eq!(puts(&agent), 1);
        registrar.reopen();
        assert!(registrar.register().await.unwrap());
        assert_eq!(puts(&agent), 2);
    }
}
