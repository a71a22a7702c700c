//! Watching a service's healthy instances with blocking queries.
//!
//! One loop per routed service asks `GET /v1/health/service/<name>?passing` with the
//! `index` of the previous answer and `wait`, so the agent answers when the instances
//! change (or after `wait`). It follows the rules of Consul's "Blocking Queries"
//! documentation:
//!
//! - the index comes from the last `X-Consul-Index`; if it goes backwards (a server
//!   restored from a snapshot, a failover to a server that is behind) it is reset to 0,
//!   a full read, instead of blocking on an index that may never be reached;
//! - after the first read the index is at least 1: a query with index 0 never blocks,
//!   and looping on it would hammer the servers;
//! - the loop is rate-limited by a token bucket, so answers that come back at once (a
//!   busy service, a proxy that does not block) cannot make it spin;
//! - failures back off exponentially with jitter.
//!
//! Instances whose address is a DNS host name (Consul allows one) are resolved here,
//! afresh for every answer, before publishing: never on the request path. A name that
//! stops resolving keeps its last address.
//!
//! Each answer replaces the service's snapshot in the [`Registry`]; the registry hands
//! every balancer only the difference (insertions and removals by instance ID). When
//! Consul cannot be reached or answers an error, nothing is published: the last known
//! instances keep serving and the service is marked stale (its age shows in
//! `/metrics`) until a query succeeds again.

use super::{
    api::{Host, ServiceEntry, Target},
    client::{blocking_deadline, encode, go_duration, Client, Error, CALL_TIMEOUT},
    retry::{self, Backoff, Exit, TokenBucket},
};
use crate::{Instance, Registry};
use futures_util::StreamExt;
use http::Method;
use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

/// Settings of the watches (`BATON_CONSUL_*`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct WatchSettings {
    /// How long the agent may hold a blocking query (Consul caps it at 10 minutes).
    #[serde(with = "secs")]
    pub wait: Duration,
    /// Sustained queries per second per service.
    pub rate: f64,
    /// Queries that may go out at once before the rate applies.
    pub burst: u32,
    /// First retry delay after a failure.
    #[serde(with = "secs")]
    pub backoff_base: Duration,
    /// Longest retry delay.
    #[serde(with = "secs")]
    pub backoff_max: Duration,
}

mod secs {
    pub(super) fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
}

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            wait: Duration::from_secs(300),
            rate: 10.0,
            burst: 5,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// One answer of the health endpoint.
#[derive(Debug)]
pub struct Health {
    /// The instances (with `passing`, only those whose checks all pass); an entry that
    /// does not decode comes with its JSON and the reason.
    pub entries: Vec<Entry>,
    /// `X-Consul-Index`.
    pub index: Option<u64>,
    /// Consul left out results the token may not read.
    pub filtered_by_acl: bool,
}

/// `GET /v1/health/service/<service>?passing`, blocking while the index is `index`
/// (when it is not 0) for up to `wait`.
pub async fn health_service(
    client: &Client,
    service: &str,
    index: u64,
    wait: Duration,
) -> Result<Health, Error> {
    let mut path = format!("/v1/health/service/{}?passing", encode(service));
    client.read_options(&mut path);
    let mut timeout = CALL_TIMEOUT;
    if index > 0 {
        let (wait, deadline) = blocking_deadline(wait);
        path.push_str(&format!("&index={index}&wait={}", go_duration(wait)));
        timeout = deadline;
    }
    let rsp = client
        .request(Method::GET, &path, None, timeout)
        .await?
        .success()?;
    // Without the index the loop could not block: something between baton and Consul
    // strips headers. Treated as a failure (backoff), not as an index going backwards.
    let index = rsp.index().ok_or(Error::MissingIndex)?;
    // Entry by entry: one malformed instance must not hide the others.
    let entries: Option<Vec<serde_json::Value>> = serde_json::from_slice(&rsp.body)?;
    let entries = entries
        .unwrap_or_default()
        .into_iter()
        .map(|e| serde_json::from_value::<ServiceEntry>(e.clone()).map_err(|err| (e, err)))
        .collect();
    Ok(Health {
        entries,
        index: Some(index),
        filtered_by_acl: rsp
            .header("x-consul-results-filtered-by-acls")
            .is_some_and(|v| v == "true"),
    })
}

/// The index for the next query, after an answer carrying `returned` to a query that
/// sent `sent`; `None` when the index went backwards and the loop starts over.
pub fn next_index(sent: u64, returned: Option<u64>) -> Option<u64> {
    let returned = returned.unwrap_or(0);
    if returned < sent {
        None
    } else {
        Some(returned.max(1))
    }
}

/// The watch of one service.
#[derive(Clone, Debug)]
pub struct Watch {
    client: Client,
    service: Arc<str>,
    registry: Registry,
    settings: WatchSettings,
}

impl Watch {
    /// A watch publishing `service`'s instances into `registry`.
    pub fn new(
        client: Client,
        service: Arc<str>,
        registry: Registry,
        settings: WatchSettings,
    ) -> Self {
        Self {
            client,
            service,
            registry,
            settings,
        }
    }

    /// Watches until dropped, in a task of its own that is restarted whenever it ends
    /// or panics (neither should happen; if one does, the service must not silently
    /// stop following Consul): the failure is logged at error, the service marked
    /// stale — its last known instances keep serving — and the watch started again
    /// after a backoff.
    pub async fn supervise(self) {
        let backoff = Backoff {
            base: self.settings.backoff_base,
            max: self.settings.backoff_max,
        };
        let (service, registry) = (self.service.clone(), self.registry.clone());
        supervise(&service, &registry, backoff, move || self.clone().run()).await;
    }

    /// Watches until dropped.
    pub async fn run(self) {
        let mut bucket = TokenBucket::new(self.settings.rate, self.settings.burst);
        let backoff = Backoff {
            base: self.settings.backoff_base,
            max: self.settings.backoff_max,
        };
        let service = &*self.service;
        let mut index = 0u64;
        let mut failures = 0u32;
        let mut published: Option<usize> = None;
        let mut acl_warned = false;
        let mut skipped = HashSet::new();
        let mut resolved = HashMap::new();
        loop {
            bucket.acquire().await;
            match health_service(&self.client, service, index, self.settings.wait).await {
                Ok(health) => {
                    if failures > 0 {
                        tracing::info!(service, failures, "Consul answers again; watching");
                        failures = 0;
                    }
                    if health.filtered_by_acl && !acl_warned {
                        acl_warned = true;
                        tracing::warn!(service, "Consul hid instances this ACL token may not read (X-Consul-Results-Filtered-By-ACLs); grant it service:read");
                    }
                    let instances = self
                        .instances(&health.entries, &mut skipped, &mut resolved)
                        .await;
                    let count = instances.len();
                    self.registry.publish(service, instances);
                    if published != Some(count) {
                        tracing::info!(service, instances = count, index = ?health.index, "Consul: instances updated");
                        published = Some(count);
                    }
                    index = match next_index(index, health.index) {
                        Some(i) => i,
                        None => {
                            tracing::warn!(
                                service,
                                sent = index,
                                returned = ?health.index,
                                "Consul's index went backwards; starting over with a full read"
                            );
                            0
                        }
                    };
                }
                Err(error) => {
                    // After a failure the first query is a full read: blocking on the
                    // old index would leave the service stale until `wait` ends if
                    // nothing changed, and never see changes if Consul came back with
                    // a lower index (a restore, a rebuilt cluster).
                    index = 0;
                    failures = failures.saturating_add(1);
                    self.registry.mark_stale(service);
                    let delay = backoff.delay(failures);
                    let kept = self.registry.instances(service).len();
                    // The first failure, then every tenth, at warn: an outage is seen
                    // without a line per retry.
                    if failures % 10 == 1 {
                        tracing::warn!(service, %error, failures, retry_in = ?delay, kept_instances = kept,
                            "Consul query failed; serving the last known instances");
                    } else {
                        tracing::debug!(service, %error, failures, retry_in = ?delay, "Consul query failed");
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// The usable instances, host names resolved; each unusable one (and each bad
    /// handoff port) is logged at warn the first time it is seen (answers repeat the
    /// whole list), then at debug.
    async fn instances(
        &self,
        entries: &[Entry],
        skipped: &mut HashSet<String>,
        resolved: &mut HashMap<String, IpAddr>,
    ) -> Vec<Instance> {
        let mut now_skipped = HashSet::new();
        let mut note = |key: String, what: &str, why: &str| {
            if skipped.contains(&key) {
                tracing::debug!(service = %self.service, instance = %key, "{what}: {why}");
            } else {
                tracing::warn!(service = %self.service, instance = %key, "{what}: {why}");
            }
            now_skipped.insert(key);
        };
        for e in entries.iter().flatten() {
            if let Err(why) = e.handoff_port() {
                let what = "a Consul instance's handoff port is ignored (it is proxied to)";
                note(format!("{} (meta)", e.key()), what, &why);
            }
        }
        let instances = resolve_entries(entries, lookup, resolved)
            .await
            .into_iter()
            .filter_map(|e| match e {
                Ok(i) => Some(i),
                Err((key, why)) => {
                    note(key, "skipping a Consul instance", &why);
                    None
                }
            })
            .collect();
        *skipped = now_skipped;
        instances
    }
}

/// An entry of a health answer, or the JSON that did not decode and why.
type Entry = Result<ServiceEntry, (serde_json::Value, serde_json::Error)>;

/// How long resolving one host name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Host names resolved at once.
const RESOLVE_CONCURRENCY: usize = 8;

/// Resolves `name` with the system resolver (getaddrinfo, on tokio's blocking pool:
/// never on a thread that serves requests).
async fn lookup(name: String) -> Result<Vec<IpAddr>, String> {
    tokio::net::lookup_host((name.as_str(), 0))
        .await
        .map(|addrs| addrs.map(|a| a.ip()).collect())
        .map_err(|e| e.to_string())
}

/// The entries as instances, or the key and the reason each unusable one is skipped.
/// Host names are resolved with `resolve` — each name once per call, so every answer
/// from Consul resolves them afresh, several at a time, each within
/// [`RESOLVE_TIMEOUT`]. A name with IPv4 addresses gets the first of them (most
/// services listen there), otherwise the first address. `last` holds the address each
/// name last resolved to: a name that does not resolve now keeps that one (a resolver
/// outage must not take healthy instances out, just as a Consul outage does not), and
/// only an instance whose name never resolved is skipped. Names no longer in the answer
/// are forgotten.
pub(crate) async fn resolve_entries<R, Fut>(
    entries: &[Entry],
    resolve: R,
    last: &mut HashMap<String, IpAddr>,
) -> Vec<Result<Instance, (String, String)>>
where
    R: Fn(String) -> Fut,
    Fut: Future<Output = Result<Vec<IpAddr>, String>>,
{
    let targets: Vec<Result<Target, (String, String)>> = entries
        .iter()
        .map(|e| match e {
            Ok(e) => e.to_target().map_err(|why| (e.key(), why)),
            Err((json, err)) => Err((
                format!(
                    "{}/{}",
                    json["Node"]["Node"].as_str().unwrap_or("?"),
                    json["Service"]["ID"].as_str().unwrap_or("?")
                ),
                format!("cannot decode it: {err}"),
            )),
        })
        .collect();
    // Owned names: a stream of futures borrowing them would not be provably `Send`.
    let names: HashSet<String> = targets
        .iter()
        .filter_map(|t| match t {
            Ok(Target {
                host: Host::Name(n),
                ..
            }) => Some(n.clone()),
            _ => None,
        })
        .collect();
    let resolved: HashMap<String, Result<IpAddr, String>> = futures_util::stream::iter(names)
        .map(|name| {
            let resolving = tokio::time::timeout(RESOLVE_TIMEOUT, resolve(name.clone()));
            async move {
                let ip = match resolving.await {
                    Err(_) => Err(format!("no answer within {RESOLVE_TIMEOUT:?}")),
                    Ok(Err(e)) => Err(e),
                    Ok(Ok(ips)) => ips
                        .iter()
                        .find(|ip| ip.is_ipv4())
                        .or(ips.first())
                        .copied()
                        .ok_or_else(|| "no addresses".to_string()),
                };
                (name, ip)
            }
        })
        .buffer_unordered(RESOLVE_CONCURRENCY)
        .collect()
        .await;
    last.retain(|name, _| resolved.contains_key(name));
    let resolved: HashMap<String, Result<IpAddr, String>> = resolved
        .into_iter()
        .map(|(name, ip)| {
            let ip = match ip {
                Ok(ip) => {
                    last.insert(name.clone(), ip);
                    Ok(ip)
                }
                Err(e) => match last.get(&name) {
                    Some(&ip) => {
                        tracing::warn!(host = %name, error = %e, last = %ip,
                            "cannot resolve a Consul instance's host name; keeping its last address");
                        Ok(ip)
                    }
                    None => Err(e),
                },
            };
            (name, ip)
        })
        .collect();
    targets
        .iter()
        .map(|t| {
            let t = t.clone()?;
            match &t.host {
                Host::Ip(ip) => Ok(t.at(*ip)),
                Host::Name(name) => match resolved.get(name) {
                    Some(Ok(ip)) => Ok(t.at(*ip)),
                    Some(Err(e)) => Err((
                        t.id.to_string(),
                        format!("cannot resolve its host name {name:?}: {e}"),
                    )),
                    None => Err((t.id.to_string(), format!("{name:?} was not resolved"))),
                },
            }
        })
        .collect()
}

/// Runs `start()`'s future in a task, again and again: see [`Watch::supervise`].
/// Dropping the supervisor stops the task.
pub(crate) async fn supervise<F, Fut>(
    service: &str,
    registry: &Registry,
    backoff: Backoff,
    mut start: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    retry::supervise(
        backoff,
        move || {
            let run = start();
            async move {
                run.await;
                Exit::Restart
            }
        },
        |why, restarts, delay| {
            registry.mark_stale(service);
            let kept = registry.instances(service).len();
            tracing::error!(service, restarts, retry_in = ?delay, kept_instances = kept,
                "the Consul watch {why}; serving the last known instances and restarting it");
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::test_agent::TestAgent;

    #[tokio::test]
    async fn a_wait_beyond_consuls_limit_is_cut_to_it() {
        let agent =
            TestAgent::start(|_| (200, vec![("x-consul-index", "7".into())], "[]".into())).await;
        let health = health_service(&agent.client(), "web", 5, Duration::MAX)
            .await
            .unwrap();
        assert_eq!(health.index, Some(7));
        let asked = agent.asked();
        assert_eq!(asked.len(), 1);
        assert!(
            asked[0]
                .uri
                .ends_with("/v1/health/service/web?passing&index=5&wait=600s"),
            "{asked:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_that_panics_or_ends_is_restarted_and_the_service_marked_stale() {
        use std::sync::Mutex;
        let registry = Registry::new();
        registry.publish("web", vec![Instance::new(([127, 0, 0, 1], 1).into())]);
        // Whether the service was stale as each start began.
        let starts = Arc::new(Mutex::new(Vec::new()));
        let backoff = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let supervisor = tokio::spawn({
            let (registry, starts) = (registry.clone(), starts.clone());
            async move {
                supervise("web", &registry.clone(), backoff, move || {
                    let n = {
                        let mut s = starts.lock().unwrap();
                        s.push(registry.states()[0].stale_since.is_some());
                        s.len()
                    };
                    let registry = registry.clone();
                    async move {
                        match n {
                            1 => panic!("a bug in the watch"),
                            // Publishes fresh data, runs for a while, then returns.
                            2 => {
                                let fresh = Instance::new(([127, 0, 0, 1], 2).into());
                                registry.publish("web", vec![fresh]);
                                tokio::time::sleep(Duration::from_secs(5)).await;
                            }
                            _ => std::future::pending().await,
                        }
                    }
                })
                .await
            }
        });
        // Paused time: this sleep lets the supervisor run to its third start, which
        // never ends.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(
            *starts.lock().unwrap(),
            [false, true, true],
            "restarted after the panic and after the end, stale both times"
        );
        let state = &registry.states()[0];
        assert!(
            state.stale_since.is_some(),
            "stale until the watch publishes"
        );
        assert_eq!(state.instances, 1, "still serving the last known instances");
        assert!(!supervisor.is_finished());
        supervisor.abort();
    }

    fn entry(address: &str, id: &str, port: u16) -> Entry {
        Ok(serde_json::from_value(serde_json::json!({
            "Node": {"Node": "n", "Address": "10.0.0.1"},
            "Service": {"ID": id, "Service": "web", "Address": address, "Port": port}
        }))
        .unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn host_names_are_resolved_each_time_and_failures_skip_only_their_instances() {
        use std::sync::Mutex;
        let asked = Mutex::new(Vec::new());
        let resolver = |name: String| {
            asked.lock().unwrap().push(name.clone());
            async move {
                match name.as_str() {
                    "dual.test" => Ok(vec![
                        "2001:db8::1".parse().unwrap(),
                        "192.0.2.7".parse().unwrap(),
                    ]),
                    "v6.test" => Ok(vec!["2001:db8::2".parse().unwrap()]),
                    "empty.test" => Ok(vec![]),
                    "slow.test" => std::future::pending().await,
                    _ => Err("Name or service not known".to_string()),
                }
            }
        };
        let entries = [
            entry("10.0.0.9", "ip", 80),
            entry("dual.test", "dual-a", 81),
            entry("dual.test", "dual-b", 82),
            entry("v6.test", "v6", 83),
            entry("gone.test", "gone", 84),
            entry("empty.test", "empty", 85),
            entry("slow.test", "slow", 86),
        ];
        let mut last = HashMap::new();
        let got = resolve_entries(&entries, resolver, &mut last).await;
        let ok: Vec<String> = got
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|i| format!("{} {}", i.id, i.addr))
            .collect();
        assert_eq!(
            ok,
            [
                "n/ip 10.0.0.9:80",
                "n/dual-a 192.0.2.7:81",
                "n/dual-b 192.0.2.7:82",
                "n/v6 [2001:db8::2]:83"
            ]
        );
        let skipped: Vec<(String, String)> = got.into_iter().filter_map(Result::err).collect();
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert_eq!(skipped[0].0, "n/gone");
        assert!(
            skipped[0].1.contains("\"gone.test\"") && skipped[0].1.contains("not known"),
            "{skipped:?}"
        );
        assert!(skipped[1].1.contains("no addresses"), "{skipped:?}");
        assert!(skipped[2].1.contains("no answer within"), "{skipped:?}");
        // Each name once per answer, and again on the next one.
        let mut once = asked.lock().unwrap().clone();
        once.sort();
        assert_eq!(
            once,
            [
                "dual.test",
                "empty.test",
                "gone.test",
                "slow.test",
                "v6.test"
            ]
        );
        resolve_entries(&entries[1..2], resolver, &mut last).await;
        assert_eq!(asked.lock().unwrap().len(), 6);
        // Only names still in the answer are remembered.
        assert_eq!(last.len(), 1, "{last:?}");
    }

    #[tokio::test]
    async fn a_name_that_stops_resolving_keeps_its_last_address() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dns_up = AtomicBool::new(true);
        let resolver = |name: String| {
            let up = dns_up.load(Ordering::SeqCst);
            async move {
                match (up, name.as_str()) {
                    (true, "db.test") => Ok(vec!["192.0.2.8".parse().unwrap()]),
                    _ => Err("Temporary failure in name resolution".to_string()),
                }
            }
        };
        let entries = [entry("db.test", "db", 5432), entry("new.test", "new", 5432)];
        let mut last = HashMap::new();
        let ok = |got: &[Result<Instance, (String, String)>]| -> Vec<String> {
            got.iter()
                .filter_map(|r| r.as_ref().ok())
                .map(|i| format!("{} {}", i.id, i.addr))
                .collect()
        };
        let got = resolve_entries(&entries, resolver, &mut last).await;
        assert_eq!(ok(&got), ["n/db 192.0.2.8:5432"]);
        dns_up.store(false, Ordering::SeqCst);
        let got = resolve_entries(&entries, resolver, &mut last).await;
        assert_eq!(ok(&got), ["n/db 192.0.2.8:5432"], "kept through the outage");
        assert!(
            matches!(&got[1], Err((key, why)) if key == "n/new" && why.contains("Temporary")),
            "a name never resolved is still skipped: {got:?}"
        );
    }

    #[tokio::test]
    async fn localhost_resolves_with_the_system_resolver() {
        let got = resolve_entries(
            &[entry("localhost", "local", 8080)],
            lookup,
            &mut HashMap::new(),
        )
        .await;
        let i = got[0].as_ref().expect("localhost resolves");
        assert!(i.addr.ip().is_loopback(), "{i:?}");
        assert_eq!(i.addr.port(), 8080);
    }

    #[test]
    fn index_rules() {
        // First read: whatever comes back, at least 1 so the next query blocks.
        assert_eq!(next_index(0, Some(0)), Some(1));
        assert_eq!(next_index(0, None), Some(1));
        assert_eq!(next_index(0, Some(42)), Some(42));
        // Unchanged after a wait timeout; forward on change.
        assert_eq!(next_index(42, Some(42)), Some(42));
        assert_eq!(next_index(42, Some(50)), Some(50));
        // Backwards: reset.
        assert_eq!(next_index(50, Some(7)), None);
        assert_eq!(next_index(50, None), None);
    }
}
