//! Consul for tests: [`FakeConsul`], an agent and server HTTP API in this process that
//! follows Consul's documented behaviour (blocking queries, `?passing`, agent checks);
//! [`ConsulRelay`], an HTTP relay in front of a fake or a real agent that injects
//! faults (a dead or hung agent, error answers, late calls, an index that goes
//! backwards); [`ConsulApi`], the test's own
//! client; and [`ConsulUnderTest`], a real agent when `CONSUL_HTTP_ADDR` is set and a
//! fake otherwise.
//!
//! The fake is one node (`fake-node`, 127.0.0.1, datacenter `dc1`) whose agent writes
//! to the catalog before its HTTP call returns, as a real agent does (it syncs each
//! change before answering). Where the fake departs from Consul on purpose, the item
//! says so.

use super::Got;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioIo},
};
use serde_json::{json, Map, Value};
use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::watch,
    task::JoinHandle,
};

const NODE: &str = "fake-node";
const NODE_ID: &str = "e4d1c0b2-6a8f-4f3e-9b7a-2c5d8e1f0a93";
const NODE_ADDR: &str = "127.0.0.1";
const DC: &str = "dc1";
/// The raft index a fresh fake starts at (never 0: clients treat 0 as "no index").
const FIRST_INDEX: u64 = 10;
/// When the node and its `serfHealth` check were registered.
const NODE_INDEX: u64 = 5;
/// Consul's `defaultQueryTime` and `maxQueryTime`.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Consul raises shorter check intervals to this (`checks.MinInterval`).
const MIN_CHECK_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Check output kept (`checks.DefaultBufSize`).
const OUTPUT_MAX: usize = 4096;
/// How often TTLs expire and critical services are reaped.
const REAP_EVERY: Duration = Duration::from_millis(50);
const PASSING: &str = "passing";
const WARNING: &str = "warning";
const CRITICAL: &str = "critical";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------
// Small helpers: randomness, Go durations, URL coding.
// ---------------------------------------------------------------------------------

/// A xorshift64 step over a process-wide state seeded from the clock.
fn random() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut cur = STATE.load(Ordering::Relaxed);
    loop {
        let mut x = if cur == 0 {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x9e37_79b9);
            (t ^ (u64::from(std::process::id()) << 32)) | 1
        } else {
            cur
        };
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        match STATE.compare_exchange_weak(cur, x, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return x,
            Err(actual) => cur = actual,
        }
    }
}

/// A random duration in `[0, d)` (zero for zero), like Consul's `lib.RandomStagger`.
fn stagger(d: Duration) -> Duration {
    let n = d.as_nanos().min(u128::from(u64::MAX)) as u64;
    if n == 0 {
        Duration::ZERO
    } else {
        Duration::from_nanos(random() % n)
    }
}

/// Parses a Go duration as `time.ParseDuration` does ("300ms", "1m30s", "1.5h",
/// "-2s", "0"), in signed nanoseconds.
fn parse_go_duration(s: &str) -> Option<i128> {
    let (neg, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let int: u128 = if digits > 0 {
            rest[..digits].parse().ok()?
        } else {
            0
        };
        rest = &rest[digits..];
        let (mut frac, mut scale) = (0u128, 1u128);
        if let Some(r) = rest.strip_prefix('.') {
            let frac_digits = r.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 && frac_digits == 0 {
                return None;
            }
            for b in r[..frac_digits].bytes() {
                if scale < 10u128.pow(20) {
                    frac = frac * 10 + u128::from(b - b'0');
                    scale *= 10;
                }
            }
            rest = &r[frac_digits..];
        } else if digits == 0 {
            return None;
        }
        let unit_len = rest
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit: u128 = match &rest[..unit_len] {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total = total
            .checked_add(int.checked_mul(unit)?)?
            .checked_add(frac * unit / scale)?;
    }
    if total > i64::MAX as u128 {
        return None;
    }
    Some(if neg { -(total as i128) } else { total as i128 })
}

/// Formats a duration as Go's `Duration.String` does ("10s", "1m30s", "1h0m0s",
/// "500ms").
fn go_duration(d: Duration) -> String {
    fn frac(v: u128, unit: u128) -> String {
        let (i, f) = (v / unit, v % unit);
        if f == 0 {
            return i.to_string();
        }
        let width = unit.to_string().len() - 1;
        let f = format!("{f:0width$}");
        format!("{i}.{}", f.trim_end_matches('0'))
    }
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    if ns < 1_000 {
        return format!("{ns}ns");
    }
    if ns < 1_000_000 {
        return format!("{}\u{b5}s", frac(ns, 1_000));
    }
    if ns < 1_000_000_000 {
        return format!("{}ms", frac(ns, 1_000_000));
    }
    let secs = ns / 1_000_000_000;
    let (h, m) = (secs / 3600, (secs / 60) % 60);
    let s = frac(ns % 60_000_000_000, 1_000_000_000);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// Percent-decodes `s` (and `+` as a space in query strings), or `None` when it is
/// malformed.
fn pct_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes everything but unreserved characters (for one path segment).
fn pct_encode(s: &str) -> String {
    s.bytes()
        .map(|c| {
            if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect()
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A URL query decoded like Go's `url.ParseQuery`.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: Option<&str>) -> Option<Query> {
        let mut pairs = Vec::new();
        for part in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            pairs.push((pct_decode(k, true)?, pct_decode(v, true)?));
        }
        Some(Query(pairs))
    }

    /// The first value (Go's `Values.Get`).
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Consul's `getBoolQueryParam`: absent is false, present without a value is
    /// true, otherwise `strconv.ParseBool`.
    fn flag(&self, key: &str) -> Result<bool, ()> {
        match self.get(key) {
            None => Ok(false),
            Some("") => Ok(true),
            Some(v) => parse_go_bool(v).ok_or(()),
        }
    }
}

/// The request's ACL token, in Consul's order: `?token=`, `X-Consul-Token`, then
/// `Authorization: Bearer <token>`.
fn request_token(q: &Query, headers: &HeaderMap) -> String {
    if let Some(t) = q.get("token").filter(|t| !t.is_empty()) {
        return t.to_string();
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let t = header("x-consul-token");
    if !t.is_empty() {
        return t;
    }
    let auth = header("authorization");
    let parts: Vec<&str> = auth.split(' ').collect();
    if parts.len() > 1 && parts[0].eq_ignore_ascii_case("bearer") {
        let value = parts[1..].join(" ");
        return value.trim().split(' ').next().unwrap_or("").to_string();
    }
    String::new()
}

// ---------------------------------------------------------------------------------
// The fake's state.
// ---------------------------------------------------------------------------------

/// What blocked queries watch: every change bumps `seq`; a restore (`set_index`)
/// bumps `restored` too, which ends blocking queries at once, as Consul does when
/// its state store is abandoned for a snapshot.
#[derive(Clone, Copy, Default)]
struct Wake {
    seq: u64,
    restored: u64,
}

#[derive(Clone, Debug, PartialEq)]
struct HttpSpec {
    url: String,
    method: String,
    header: Vec<(String, Vec<String>)>,
    body: String,
    /// As registered (the runner raises it to [`MIN_CHECK_INTERVAL`]).
    interval: Duration,
    timeout: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
enum Kind {
    Ttl(Duration),
    Http(HttpSpec),
}

#[derive(Clone)]
struct Chk {
    id: String,
    name: String,
    notes: String,
    kind: Kind,
    status: String,
    output: String,
    create_index: u64,
    modify_index: u64,
    critical_since: Option<Instant>,
    deregister_after: Option<Duration>,
    /// When a TTL check expires unless updated (none once expired, as Consul's timer
    /// is only re-armed by an update).
    ttl_deadline: Option<Instant>,
    /// The last output a TTL update set, quoted when the TTL expires.
    last_output: String,
    /// Which runner owns an HTTP check; a re-registration starts a new one.
    epoch: u64,
}

impl Chk {
    fn same_definition(&self, other: &Chk) -> bool {
        self.name == other.name
            && self.notes == other.notes
            && self.kind == other.kind
            && self.deregister_after == other.deregister_after
    }

    fn json(&self, svc: &Svc) -> Value {
        let (kind, interval, timeout) = match &self.kind {
            Kind::Ttl(_) => ("ttl", String::new(), String::new()),
            Kind::Http(h) => (
                "http",
                go_duration(h.interval),
                h.timeout.map(go_duration).unwrap_or_default(),
            ),
        };
        json!({
            "Node": NODE,
            "CheckID": self.id,
            "Name": self.name,
            "Status": self.status,
            "Notes": self.notes,
            "Output": self.output,
            "ServiceID": svc.id,
            "ServiceName": svc.name,
            "ServiceTags": svc.tags,
            "Type": kind,
            "Interval": interval,
            "Timeout": timeout,
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        })
    }
}

#[derive(Clone)]
struct Svc {
    id: String,
    name: String,
    tags: Vec<String>,
    address: String,
    port: i64,
    meta: Option<Map<String, Value>>,
    tagged: Map<String, Value>,
    weights: (i64, i64),
    enable_tag_override: bool,
    create_index: u64,
    modify_index: u64,
    checks: Vec<Chk>,
}

impl Svc {
    fn same_service(&self, other: &Svc) -> bool {
        self.name == other.name
            && self.tags == other.tags
            && self.address == other.address
            && self.port == other.port
            && self.meta == other.meta
            && self.tagged == other.tagged
            && self.weights == other.weights
            && self.enable_tag_override == other.enable_tag_override
    }

    /// `/v1/agent/service/<id>` without `ContentHash` (as `buildAgentService`).
    fn agent_json(&self) -> Value {
        json!({
            "ID": self.id,
            "Service": self.name,
            "Tags": self.tags,
            "Meta": self.meta.clone().unwrap_or_default(),
            "Port": self.port,
            "Address": self.address,
            "TaggedAddresses": self.tagged,
            "Weights": {"Passing": self.weights.0, "Warning": self.weights.1},
            "EnableTagOverride": self.enable_tag_override,
            "Datacenter": DC,
        })
    }

    fn content_hash(&self) -> String {
        format!("{:x}", fnv1a(self.agent_json().to_string().as_bytes()))
    }
}

/// A registration, decoded and validated.
struct Registration {
    svc: Svc,
    checks: Vec<CheckDef>,
}

struct CheckDef {
    id: Option<String>,
    name: Option<String>,
    notes: String,
    status: Option<String>,
    kind: Kind,
    deregister_after: Option<Duration>,
}

/// An HTTP check to start running.
struct Runner {
    check_id: String,
    epoch: u64,
    spec: HttpSpec,
}

enum TtlError {
    Unknown,
    NotTtl,
}

struct St {
    index: u64,
    node_index: u64,
    /// Each service name's last change.
    names: HashMap<String, u64>,
    /// When a service name last lost its last instance (Consul's extinction index,
    /// which queries for absent names report).
    extinction: u64,
    services: BTreeMap<String, Svc>,
    epoch: u64,
}

impl St {
    fn new() -> St {
        St {
            index: FIRST_INDEX,
            node_index: NODE_INDEX,
            names: HashMap::new(),
            extinction: 0,
            services: BTreeMap::new(),
            epoch: 0,
        }
    }

    fn present(&self, name: &str) -> bool {
        self.services.values().any(|s| s.name == name)
    }

    /// The index a health query for `name` reports (at least 1).
    fn name_index(&self, name: &str) -> u64 {
        let i = if self.present(name) {
            self.names.get(name).copied().unwrap_or(self.index)
        } else if self.extinction > 0 {
            self.extinction
        } else {
            self.index
        };
        i.max(1)
    }

    /// Records that `name` changed at `idx` (call after the change is applied).
    fn touch(&mut self, name: &str, idx: u64) {
        self.names.insert(name.to_string(), idx);
        if !self.present(name) {
            self.extinction = idx;
        }
    }

    fn find_check(&self, id: &str) -> Option<(String, usize)> {
        self.services.iter().find_map(|(sid, s)| {
            s.checks
                .iter()
                .position(|c| c.id == id)
                .map(|i| (sid.clone(), i))
        })
    }

    /// Sets a check's status and output; returns whether the status changed (which
    /// is what the agent syncs at once and what moves the index).
    fn set_status(&mut self, sid: &str, ci: usize, status: &str, output: String) -> bool {
        let idx = self.index + 1;
        let Some(svc) = self.services.get_mut(sid) else {
            return false;
        };
        let Some(c) = svc.checks.get_mut(ci) else {
            return false;
        };
        c.output = output;
        if c.status == status {
            return false;
        }
        c.status = status.to_string();
        c.modify_index = idx;
        c.critical_since = (status == CRITICAL).then(Instant::now);
        let name = svc.name.clone();
        self.index = idx;
        self.touch(&name, idx);
        true
    }

    fn remove_service(&mut self, id: &str) -> bool {
        let Some(svc) = self.services.remove(id) else {
            return false;
        };
        self.index += 1;
        let idx = self.index;
        self.touch(&svc.name, idx);
        true
    }

    /// Applies a registration as the agent's `addServiceInternal` does: check IDs
    /// default to `service:<id>` (`:<n>` when there are several), a check that
    /// already existed keeps its status and output, checks not named again stay
    /// unless `replace`. Returns whether the catalog changed and HTTP checks to run.
    fn register(&mut self, reg: Registration, replace: bool) -> (bool, Vec<Runner>) {
        let now = Instant::now();
        let idx = self.index + 1;
        let Registration { mut svc, checks } = reg;
        let n = checks.len();
        let ids: Vec<String> = checks
            .iter()
            .enumerate()
            .map(|(i, c)| match &c.id {
                Some(id) => id.clone(),
                None if n > 1 => format!("service:{}:{}", svc.id, i + 1),
                None => format!("service:{}", svc.id),
            })
            .collect();
        let old = self.services.remove(&svc.id);
        let mut changed = old.as_ref().is_none_or(|o| !o.same_service(&svc));
        svc.create_index = old.as_ref().map_or(idx, |o| o.create_index);
        svc.modify_index = match &old {
            Some(o) if !changed => o.modify_index,
            _ => idx,
        };
        let old_name = old.as_ref().map(|o| o.name.clone());
        let mut prev: Vec<(Chk, bool)> = old
            .map(|o| o.checks.into_iter().map(|c| (c, true)).collect())
            .unwrap_or_default();
        // Check IDs are agent-wide: one another service holds moves here.
        let mut robbed = Vec::new();
        for other in self.services.values_mut() {
            let before = other.checks.len();
            let (taken, kept): (Vec<Chk>, Vec<Chk>) = std::mem::take(&mut other.checks)
                .into_iter()
                .partition(|c| ids.contains(&c.id));
            other.checks = kept;
            prev.extend(taken.into_iter().map(|c| (c, false)));
            if other.checks.len() != before {
                robbed.push(other.name.clone());
            }
        }
        changed |= !robbed.is_empty();
        let mut runners = Vec::new();
        for (def, id) in checks.into_iter().zip(ids) {
            let before = prev
                .iter()
                .position(|(c, _)| c.id == id)
                .map(|p| prev.remove(p));
            self.epoch += 1;
            let mut chk = Chk {
                id,
                name: def
                    .name
                    .unwrap_or_else(|| format!("Service '{}' check", svc.name)),
                notes: def.notes,
                kind: def.kind,
                status: def.status.unwrap_or_else(|| CRITICAL.to_string()),
                output: String::new(),
                create_index: idx,
                modify_index: idx,
                critical_since: None,
                deregister_after: def.deregister_after,
                ttl_deadline: None,
                last_output: String::new(),
                epoch: self.epoch,
            };
            match before {
                Some((b, same_service)) => {
                    chk.status = b.status.clone();
                    chk.output = b.output.clone();
                    chk.last_output = b.last_output.clone();
                    chk.critical_since = b.critical_since;
                    chk.create_index = b.create_index;
                    if same_service && b.same_definition(&chk) {
                        chk.modify_index = b.modify_index;
                    } else {
                        changed = true;
                    }
                }
                None => changed = true,
            }
            if chk.status == CRITICAL && chk.critical_since.is_none() {
                chk.critical_since = Some(now);
            }
            match &chk.kind {
                Kind::Ttl(ttl) => chk.ttl_deadline = Some(now + *ttl),
                Kind::Http(spec) => runners.push(Runner {
                    check_id: chk.id.clone(),
                    epoch: chk.epoch,
                    spec: spec.clone(),
                }),
            }
            svc.checks.push(chk);
        }
        for (c, same_service) in prev {
            if same_service && !replace {
                svc.checks.push(c);
            } else if same_service {
                changed = true;
            }
        }
        let name = svc.name.clone();
        self.services.insert(svc.id.clone(), svc);
        if changed {
            self.index = idx;
            self.touch(&name, idx);
            for other in old_name.into_iter().chain(robbed) {
                self.touch(&other, idx);
            }
        }
        (changed, runners)
    }

    /// Health entries for `name`, as `/v1/health/service/<name>` lists them.
    fn health(&self, name: &str, passing: bool, tags: &[&str]) -> Vec<Value> {
        let node = json!({
            "ID": NODE_ID,
            "Node": NODE,
            "Address": NODE_ADDR,
            "Datacenter": DC,
            "TaggedAddresses": {"lan": NODE_ADDR, "wan": NODE_ADDR},
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": self.node_index,
            "ModifyIndex": self.node_index,
        });
        let serf = json!({
            "Node": NODE,
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": PASSING,
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": self.node_index,
            "ModifyIndex": self.node_index,
        });
        self.services
            .values()
            .filter(|s| s.name == name)
            .filter(|s| {
                tags.iter()
                    .all(|t| s.tags.iter().any(|have| have.eq_ignore_ascii_case(t)))
            })
            .filter(|s| !passing || s.checks.iter().all(|c| c.status == PASSING))
            .map(|s| {
                let mut checks: Vec<(String, Value)> =
                    s.checks.iter().map(|c| (c.id.clone(), c.json(s))).collect();
                checks.push(("serfHealth".into(), serf.clone()));
                checks.sort_by(|a, b| a.0.cmp(&b.0));
                json!({
                    "Node": node,
                    "Service": {
                        "ID": s.id,
                        "Service": s.name,
                        "Tags": s.tags,
                        "Address": s.address,
                        "TaggedAddresses": s.tagged,
                        "Meta": s.meta,
                        "Port": s.port,
                        "Weights": {"Passing": s.weights.0, "Warning": s.weights.1},
                        "EnableTagOverride": s.enable_tag_override,
                        "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
                        "Connect": {},
                        "PeerName": "",
                        "CreateIndex": s.create_index,
                        "ModifyIndex": s.modify_index,
                    },
                    "Checks": checks.into_iter().map(|(_, c)| c).collect::<Vec<_>>(),
                })
            })
            .collect()
    }

    /// Updates a TTL check (the `/v1/agent/check/...` endpoints); `Ok(changed)`.
    fn ttl_update(&mut self, check_id: &str, status: &str, output: &str) -> Result<bool, TtlError> {
        let (sid, ci) = self.find_check(check_id).ok_or(TtlError::Unknown)?;
        let output = truncate_output(output);
        let c = self
            .services
            .get_mut(&sid)
            .and_then(|s| s.checks.get_mut(ci))
            .ok_or(TtlError::Unknown)?;
        let Kind::Ttl(ttl) = c.kind else {
            return Err(TtlError::NotTtl);
        };
        c.ttl_deadline = Some(Instant::now() + ttl);
        c.last_output = output.clone();
        Ok(self.set_status(&sid, ci, status, output))
    }

    /// Expires TTLs and reaps services critical for longer than their
    /// `DeregisterCriticalServiceAfter`; returns whether anything changed.
    fn reap(&mut self, now: Instant) -> bool {
        let mut changed = false;
        let expired: Vec<(String, usize)> = self
            .services
            .iter()
            .flat_map(|(sid, s)| {
                s.checks
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.ttl_deadline.is_some_and(|d| d <= now))
                    .map(|(ci, _)| (sid.clone(), ci))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (sid, ci) in expired {
            let Some(c) = self
                .services
                .get_mut(&sid)
                .and_then(|s| s.checks.get_mut(ci))
            else {
                continue;
            };
            c.ttl_deadline = None;
            let output = if c.last_output.is_empty() {
                "TTL expired".to_string()
            } else {
                format!(
                    "TTL expired (last output before timeout follows): {}",
                    c.last_output
                )
            };
            changed |= self.set_status(&sid, ci, CRITICAL, output);
        }
        let doomed: Vec<String> = self
            .services
            .values()
            .filter(|s| {
                s.checks
                    .iter()
                    .any(|c| match (c.deregister_after, c.critical_since) {
                        (Some(after), Some(since)) => now.duration_since(since) >= after,
                        _ => false,
                    })
            })
            .map(|s| s.id.clone())
            .collect();
        for id in doomed {
            changed |= self.remove_service(&id);
        }
        changed
    }
}

/// Keeps the first [`OUTPUT_MAX`] bytes, as a TTL update does.
fn truncate_output(output: &str) -> String {
    if output.len() <= OUTPUT_MAX {
        return output.to_string();
    }
    let mut cut = OUTPUT_MAX;
    while !output.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(
        "{} ... (captured {OUTPUT_MAX} of {} bytes)",
        &output[..cut],
        output.len()
    )
}

struct Shared {
    st: Mutex<St>,
    wake: watch::Sender<Wake>,
    stop: watch::Sender<bool>,
    token: Mutex<Option<String>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, St> {
        lock(&self.st)
    }

    /// Wakes blocked queries to look again.
    fn changed(&self) {
        self.wake.send_modify(|w| w.seq += 1);
    }

    fn acl(&self, token: &str) -> Result<(), Reply> {
        match lock(&self.token).as_deref() {
            None => Ok(()),
            Some(want) if want == token => Ok(()),
            Some(_) if token.is_empty() => {
                Err(Reply::text(StatusCode::FORBIDDEN, "Permission denied"))
            }
            Some(_) => Err(Reply::text(StatusCode::FORBIDDEN, "ACL not found")),
        }
    }

    /// Runs `fut` until the fake is dropped.
    fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = fut => {}
                _ = stopped(stop) => {}
            }
        });
    }

    /// Waits until `done` holds, `timeout` passes or (if `restorable`) the state is
    /// restored by `set_index`.
    async fn block(&self, timeout: Duration, restorable: bool, mut done: impl FnMut(&St) -> bool) {
        let mut rx = self.wake.subscribe();
        let restored = rx.borrow_and_update().restored;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if done(&self.lock()) {
                return;
            }
            tokio::select! {
                r = rx.changed() => {
                    if r.is_err() || (restorable && rx.borrow_and_update().restored != restored) {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------
// The fake's HTTP API.
// ---------------------------------------------------------------------------------

struct Reply {
    status: StatusCode,
    body: Bytes,
    content_type: Option<&'static str>,
    index: Option<u64>,
    consistency: &'static str,
    /// More headers (`X-Consul-ContentHash`, `Allow`).
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn text(status: StatusCode, msg: impl Into<String>) -> Reply {
        Reply {
            status,
            body: Bytes::from(msg.into()),
            content_type: Some("text/plain; charset=utf-8"),
            index: None,
            consistency: "leader",
            headers: Vec::new(),
        }
    }

    fn json(v: &Value) -> Reply {
        Reply {
            content_type: Some("application/json"),
            ..Reply::text(StatusCode::OK, v.to_string())
        }
    }

    fn empty() -> Reply {
        Reply {
            content_type: None,
            ..Reply::text(StatusCode::OK, "")
        }
    }
}

fn bad(msg: impl Into<String>) -> Reply {
    Reply::text(StatusCode::BAD_REQUEST, msg)
}

type Handled = Result<Reply, Reply>;

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = match route(&shared, req).await {
        Ok(r) | Err(r) => r,
    };
    let index = reply.index.unwrap_or_else(|| shared.lock().index).max(1);
    let mut rsp = Response::new(Full::new(reply.body));
    *rsp.status_mut() = reply.status;
    let h = rsp.headers_mut();
    h.insert("x-consul-index", HeaderValue::from(index));
    h.insert("x-consul-knownleader", HeaderValue::from_static("true"));
    h.insert("x-consul-lastcontact", HeaderValue::from_static("0"));
    h.insert(
        "x-consul-effective-consistency",
        HeaderValue::from_static(reply.consistency),
    );
    if let Some(ct) = reply.content_type {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    for (name, value) in reply.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    Ok(rsp)
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Handled {
    let (parts, body) = req.into_parts();
    let path =
        pct_decode(parts.uri.path(), false).ok_or_else(|| bad("invalid URL escape in path"))?;
    let q = Query::parse(parts.uri.query()).ok_or_else(|| bad("invalid URL escape in query"))?;
    let token = request_token(&q, &parts.headers);
    let body = body
        .collect()
        .await
        .map_err(|_| bad("failed to read the request body"))?
        .to_bytes();
    let only = |allowed: Method, allow: &'static str| {
        if parts.method == allowed {
            Ok(())
        } else {
            Err(Reply {
                headers: vec![("allow", allow.to_string())],
                ..Reply::text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("method {} not allowed", parts.method),
                )
            })
        }
    };
    let get = || only(Method::GET, "OPTIONS,GET");
    let put = || only(Method::PUT, "OPTIONS,PUT");

    if path == "/v1/status/leader" {
        // Consul answers status endpoints without resolving a token.
        get()?;
        return Ok(Reply::json(&json!("127.0.0.1:8300")));
    }
    if path == "/v1/agent/services" {
        get()?;
        shared.acl(&token)?;
        let st = shared.lock();
        let map: Map<String, Value> = st
            .services
            .values()
            .map(|s| (s.id.clone(), s.agent_json()))
            .collect();
        return Ok(Reply::json(&Value::Object(map)));
    }
    if path == "/v1/agent/service/register" {
        put()?;
        return register(shared, &q, &token, &body);
    }
    if let Some(id) = path.strip_prefix("/v1/agent/service/deregister/") {
        put()?;
        shared.acl(&token)?;
        if !shared.lock().remove_service(id) {
            return Err(Reply::text(
                StatusCode::NOT_FOUND,
                format!("Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."),
            ));
        }
        shared.changed();
        return Ok(Reply::empty());
    }
    if let Some(id) = path.strip_prefix("/v1/agent/service/") {
        get()?;
        return agent_service(shared, id, &q, &token).await;
    }
    for (prefix, status) in [
        ("/v1/agent/check/pass/", Some(PASSING)),
        ("/v1/agent/check/warn/", Some(WARNING)),
        ("/v1/agent/check/fail/", Some(CRITICAL)),
        ("/v1/agent/check/update/", None),
    ] {
        if let Some(id) = path.strip_prefix(prefix) {
            put()?;
            return check_update(shared, id, status, &q, &token, &body);
        }
    }
    if let Some(name) = path.strip_prefix("/v1/health/service/") {
        get()?;
        return health(shared, name, &q, &token).await;
    }
    Err(Reply::text(StatusCode::NOT_FOUND, "404 page not found\n"))
}

/// `wait` as Consul bounds it: default 5 minutes, at most 10.
fn bounded_wait(ns: i128) -> Duration {
    if ns <= 0 {
        DEFAULT_WAIT
    } else {
        Duration::from_nanos(ns.min(u64::MAX as i128) as u64).min(MAX_WAIT)
    }
}

/// Consul's `parseWait`: `(index, wait)`.
fn parse_wait(q: &Query) -> Result<(u64, Duration), Reply> {
    let wait = match q.get("wait").filter(|w| !w.is_empty()) {
        None => 0,
        Some(w) => parse_go_duration(w).ok_or_else(|| bad("Invalid wait time"))?,
    };
    let index = match q.get("index").filter(|i| !i.is_empty()) {
        None => 0,
        Some(i) if i.bytes().all(|b| b.is_ascii_digit()) => {
            i.parse().map_err(|_| bad("Invalid index"))?
        }
        Some(_) => return Err(bad("Invalid index")),
    };
    Ok((index, bounded_wait(wait)))
}

async fn health(shared: &Arc<Shared>, name: &str, q: &Query, token: &str) -> Handled {
    let (stale, consistent) = (q.has("stale"), q.has("consistent"));
    if stale && consistent {
        return Err(bad(
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        ));
    }
    let consistency = if stale {
        "stale"
    } else if consistent {
        "consistent"
    } else {
        "leader"
    };
    let (min_index, wait) = parse_wait(q)?;
    let passing = q
        .flag("passing")
        .map_err(|_| bad("Invalid value for ?passing"))?;
    if q.get("dc").is_some_and(|dc| !dc.is_empty() && dc != DC) {
        return Err(Reply::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "No path to datacenter",
        ));
    }
    shared.acl(token)?;
    if name.is_empty() {
        return Err(bad("Missing service name"));
    }
    // `filter` (a bexpr expression) is accepted and ignored.
    let tags = q.all("tag");
    if min_index > 0 {
        let timeout = wait + stagger(wait / 16);
        shared
            .block(timeout, true, |st| st.name_index(name) > min_index)
            .await;
    }
    let st = shared.lock();
    Ok(Reply {
        index: Some(st.name_index(name)),
        consistency,
        ..Reply::json(&Value::Array(st.health(name, passing, &tags)))
    })
}

async fn agent_service(shared: &Arc<Shared>, id: &str, q: &Query, token: &str) -> Handled {
    let (_, wait) = parse_wait(q)?;
    shared.acl(token)?;
    let hash = q.get("hash").unwrap_or("");
    if !hash.is_empty() {
        let timeout = wait + stagger(wait / 16);
        shared
            .block(timeout, false, |st| {
                st.services.get(id).is_none_or(|s| s.content_hash() != hash)
            })
            .await;
    }
    let st = shared.lock();
    let Some(svc) = st.services.get(id) else {
        return Err(Reply::text(
            StatusCode::NOT_FOUND,
            format!("unknown service ID: {id}"),
        ));
    };
    let hash = svc.content_hash();
    let mut body = svc.agent_json();
    if let Value::Object(o) = &mut body {
        o.insert("ContentHash".into(), json!(hash));
    }
    Ok(Reply {
        headers: vec![("x-consul-contenthash", hash)],
        ..Reply::json(&body)
    })
}

fn check_update(
    shared: &Arc<Shared>,
    id: &str,
    fixed: Option<&str>,
    q: &Query,
    token: &str,
    body: &[u8],
) -> Handled {
    let (status, output) = match fixed {
        Some(s) => (s.to_string(), q.get("note").unwrap_or("").to_string()),
        None => {
            let o = decode_object(body)?;
            let status = str_field(&o, "Status").map_err(decode_failed)?;
            let output = str_field(&o, "Output").map_err(decode_failed)?;
            if ![PASSING, WARNING, CRITICAL].contains(&status.as_str()) {
                return Err(bad(format!("Invalid check status: '{status}'")));
            }
            (status, output)
        }
    };
    shared.acl(token)?;
    let result = shared.lock().ttl_update(id, &status, &output);
    match result {
        Ok(changed) => {
            if changed {
                shared.changed();
            }
            Ok(Reply::empty())
        }
        Err(TtlError::Unknown) => Err(Reply::text(
            StatusCode::NOT_FOUND,
            format!(
                "Unknown check ID {id:?}. Ensure that the check ID is passed, not the check name."
            ),
        )),
        Err(TtlError::NotTtl) => Err(Reply::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("CheckID {id:?} does not have associated TTL"),
        )),
    }
}

fn register(shared: &Arc<Shared>, q: &Query, token: &str, body: &[u8]) -> Handled {
    let reg = parse_registration(body, || shared.acl(token))?;
    let replace = q.has("replace-existing-checks")
        && matches!(q.get("replace-existing-checks"), Some("") | Some("true"));
    let (changed, runners) = shared.lock().register(reg, replace);
    if changed {
        shared.changed();
    }
    for r in runners {
        shared.spawn(run_http_check(shared.clone(), r.check_id, r.epoch, r.spec));
    }
    Ok(Reply::empty())
}

// ---------------------------------------------------------------------------------
// Decoding a registration.
// ---------------------------------------------------------------------------------

fn decode_failed(why: String) -> Reply {
    bad(format!("Request decode failed: {why}"))
}

/// A JSON object body (`null` reads as an empty object, as Go's decoder leaves the
/// struct zero).
fn decode_object(body: &[u8]) -> Result<Map<String, Value>, Reply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(decode_failed("EOF".into()));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(Value::Null) => Ok(Map::new()),
        Ok(other) => Err(decode_failed(format!(
            "json: cannot unmarshal {} into an object",
            json_kind(&other)
        ))),
        Err(e) => Err(decode_failed(e.to_string())),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn wrong(key: &str, want: &str, got: &Value) -> String {
    format!(
        "json: cannot unmarshal {} into field {key} of type {want}",
        json_kind(got)
    )
}

fn present<'a>(o: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    o.get(key).filter(|v| !v.is_null())
}

fn str_field(o: &Map<String, Value>, key: &str) -> Result<String, String> {
    match present(o, key) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(wrong(key, "string", v)),
    }
}

fn int_field(o: &Map<String, Value>, key: &str) -> Result<i64, String> {
    match present(o, key) {
        None => Ok(0),
        Some(v) => v.as_i64().ok_or_else(|| wrong(key, "int", v)),
    }
}

fn bool_field(o: &Map<String, Value>, key: &str) -> Result<bool, String> {
    match present(o, key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(wrong(key, "bool", v)),
    }
}

fn obj_field<'a>(
    o: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a Map<String, Value>>, String> {
    match present(o, key) {
        None => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(v) => Err(wrong(key, "object", v)),
    }
}

fn str_list(v: &Value, key: &str) -> Result<Vec<String>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(String::from)
                    .ok_or_else(|| wrong(key, "[]string", i))
            })
            .collect(),
        other => Err(wrong(key, "[]string", other)),
    }
}

/// A duration field: a Go duration string or a number of nanoseconds.
fn duration_field(o: &Map<String, Value>, key: &str) -> Result<i128, String> {
    match present(o, key) {
        None => Ok(0),
        Some(Value::String(s)) if s.is_empty() => Ok(0),
        Some(Value::String(s)) => {
            parse_go_duration(s).ok_or_else(|| format!("time: invalid duration {s:?}"))
        }
        Some(v) => v
            .as_i64()
            .map(i128::from)
            .ok_or_else(|| wrong(key, "time.Duration", v)),
    }
}

fn positive(ns: i128) -> Option<Duration> {
    (ns > 0).then(|| Duration::from_nanos(ns.min(u64::MAX as i128) as u64))
}

fn is_zero_value(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_zero_value),
    }
}

/// One check of a registration (`None` for an empty one, which Consul skips).
fn parse_check(o: &Map<String, Value>) -> Result<Option<(CheckDef, Option<String>)>, Reply> {
    if o.values().all(is_zero_value) {
        return Ok(None);
    }
    for other in [
        "TCP",
        "UDP",
        "GRPC",
        "H2PING",
        "Args",
        "ScriptArgs",
        "DockerContainerID",
        "AliasNode",
        "AliasService",
        "OSService",
    ] {
        if present(o, other).is_some_and(|v| !is_zero_value(v)) {
            return Err(bad(format!(
                "fake consul: only TTL and HTTP checks are supported (got {other})"
            )));
        }
    }
    let http = str_field(o, "HTTP").map_err(decode_failed)?;
    let ttl = duration_field(o, "TTL").map_err(decode_failed)?;
    let interval = duration_field(o, "Interval").map_err(decode_failed)?;
    let timeout = duration_field(o, "Timeout").map_err(decode_failed)?;
    let dereg = duration_field(o, "DeregisterCriticalServiceAfter").map_err(decode_failed)?;
    let mut header = Vec::new();
    if let Some(h) = obj_field(o, "Header").map_err(decode_failed)? {
        for (k, v) in h {
            header.push((k.clone(), str_list(v, "Header").map_err(decode_failed)?));
        }
    }
    let method = str_field(o, "Method").map_err(decode_failed)?;
    let body = str_field(o, "Body").map_err(decode_failed)?;
    bool_field(o, "TLSSkipVerify").map_err(decode_failed)?;
    let status = str_field(o, "Status").map_err(decode_failed)?;
    let id = str_field(o, "CheckID").map_err(decode_failed)?;
    let name = str_field(o, "Name").map_err(decode_failed)?;
    let notes = str_field(o, "Notes").map_err(decode_failed)?;
    // CheckType.Validate, in its order.
    let is_http = !http.is_empty();
    if interval > 0 && ttl > 0 {
        return Err(bad(
            "Invalid check: Interval and TTL cannot both be specified",
        ));
    }
    if is_http && interval <= 0 {
        return Err(bad(
            "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks",
        ));
    }
    if !is_http && ttl <= 0 {
        return Err(bad("Invalid check: TTL must be > 0 for TTL checks"));
    }
    let kind = match (positive(ttl), positive(interval)) {
        (Some(ttl), _) if !is_http => Kind::Ttl(ttl),
        (_, Some(interval)) => Kind::Http(HttpSpec {
            url: http,
            method,
            header,
            body,
            interval,
            timeout: positive(timeout),
        }),
        _ => return Err(bad("Invalid check")),
    };
    let def = CheckDef {
        id: (!id.is_empty()).then_some(id),
        name: (!name.is_empty()).then_some(name),
        notes,
        status: None,
        kind,
        deregister_after: positive(dereg),
    };
    Ok(Some((def, (!status.is_empty()).then_some(status))))
}

/// Decodes and validates a `/v1/agent/service/register` body in the order Consul
/// does, calling `acl` where Consul resolves the token.
fn parse_registration(
    body: &[u8],
    acl: impl FnOnce() -> Result<(), Reply>,
) -> Result<Registration, Reply> {
    let o = decode_object(body)?;
    let name = str_field(&o, "Name").map_err(decode_failed)?;
    let mut id = str_field(&o, "ID").map_err(decode_failed)?;
    let tags = match present(&o, "Tags") {
        None => Vec::new(),
        Some(v) => str_list(v, "Tags").map_err(decode_failed)?,
    };
    let address = str_field(&o, "Address").map_err(decode_failed)?;
    let port = int_field(&o, "Port").map_err(decode_failed)?;
    let meta = match obj_field(&o, "Meta").map_err(decode_failed)? {
        None => None,
        Some(m) => {
            if let Some((k, v)) = m.iter().find(|(_, v)| !v.is_string()) {
                return Err(decode_failed(wrong(&format!("Meta.{k}"), "string", v)));
            }
            Some(m.clone())
        }
    };
    let mut tagged = Map::new();
    if let Some(m) = obj_field(&o, "TaggedAddresses").map_err(decode_failed)? {
        for (k, v) in m {
            let Value::Object(a) = v else {
                return Err(decode_failed(wrong("TaggedAddresses", "ServiceAddress", v)));
            };
            let addr = str_field(a, "Address").map_err(decode_failed)?;
            let port = int_field(a, "Port").map_err(decode_failed)?;
            tagged.insert(k.clone(), json!({"Address": addr, "Port": port}));
        }
    }
    let weights = match obj_field(&o, "Weights").map_err(decode_failed)? {
        None => None,
        Some(w) => Some((
            int_field(w, "Passing").map_err(decode_failed)?,
            int_field(w, "Warning").map_err(decode_failed)?,
        )),
    };
    let enable_tag_override = bool_field(&o, "EnableTagOverride").map_err(decode_failed)?;
    let mut raw_checks = Vec::new();
    if let Some(c) = obj_field(&o, "Check").map_err(decode_failed)? {
        raw_checks.push(c.clone());
    }
    match present(&o, "Checks") {
        None => {}
        Some(Value::Array(items)) => {
            for c in items {
                match c {
                    Value::Object(c) => raw_checks.push(c.clone()),
                    Value::Null => {}
                    other => return Err(decode_failed(wrong("Checks", "CheckType", other))),
                }
            }
        }
        Some(other) => return Err(decode_failed(wrong("Checks", "CheckTypes", other))),
    }

    if name.is_empty() {
        return Err(bad("Missing service name"));
    }
    if matches!(address.as_str(), "0.0.0.0" | "::" | "[::]") {
        return Err(bad("Invalid service address"));
    }
    acl()?;
    if let Some((passing, warning)) = weights {
        if passing < 1 {
            return Err(bad("Invalid Weights: Passing must be greater than 0"));
        }
        if warning < 0 {
            return Err(bad(
                "Invalid Weights: Warning must be greater or equal than 0",
            ));
        }
        if passing > 65535 || warning > 65535 {
            return Err(bad(
                "Invalid Weights: DNS Weight must be between 0 and 65535",
            ));
        }
    }
    let mut checks = Vec::new();
    for raw in &raw_checks {
        if let Some((mut def, status)) = parse_check(raw)? {
            if let Some(s) = status {
                if ![PASSING, WARNING, CRITICAL].contains(&s.as_str()) {
                    return Err(bad(
                        "Status for checks must 'passing', 'warning', 'critical'",
                    ));
                }
                def.status = Some(s);
            }
            checks.push(def);
        }
    }
    if id.is_empty() {
        id = name.clone();
    }
    // The agent tags an IP service address for the LAN and the WAN.
    let (lan, wan) = match address.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => ("lan_ipv4", "wan_ipv4"),
        Ok(IpAddr::V6(_)) => ("lan_ipv6", "wan_ipv6"),
        Err(_) => ("", ""),
    };
    if !lan.is_empty() {
        for key in [lan, wan] {
            tagged
                .entry(key)
                .or_insert_with(|| json!({"Address": address, "Port": port}));
        }
    }
    Ok(Registration {
        svc: Svc {
            id,
            name,
            tags,
            address,
            port,
            meta,
            tagged,
            weights: weights.unwrap_or((1, 1)),
            enable_tag_override,
            create_index: 0,
            modify_index: 0,
            checks: Vec::new(),
        },
        checks,
    })
}

// ---------------------------------------------------------------------------------
// The agent's own work: HTTP checks, TTL expiry, reaping critical services.
// ---------------------------------------------------------------------------------

async fn run_http_check(shared: Arc<Shared>, check_id: String, epoch: u64, spec: HttpSpec) {
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    let every = spec.interval.max(MIN_CHECK_INTERVAL);
    tokio::time::sleep(stagger(every)).await;
    loop {
        let alive = |st: &St| {
            st.find_check(&check_id)
                .and_then(|(sid, ci)| st.services.get(&sid).and_then(|s| s.checks.get(ci)))
                .is_some_and(|c| c.epoch == epoch)
        };
        if !alive(&shared.lock()) {
            return;
        }
        let (status, output) = probe(&client, &spec).await;
        let changed = {
            let mut st = shared.lock();
            if !alive(&st) {
                return;
            }
            match st.find_check(&check_id) {
                Some((sid, ci)) => st.set_status(&sid, ci, status, output),
                None => return,
            }
        };
        if changed {
            shared.changed();
        }
        tokio::time::sleep(every).await;
    }
}

/// One HTTP check run, judged and described as Consul's `CheckHTTP.check` does.
async fn probe(client: &HttpClient, spec: &HttpSpec) -> (&'static str, String) {
    let method = if spec.method.is_empty() {
        "GET"
    } else {
        spec.method.as_str()
    };
    // Go's url.Error names the operation like "Get".
    let op: String = method
        .chars()
        .take(1)
        .chain(method.chars().skip(1).flat_map(char::to_lowercase))
        .collect();
    let fail = |why: String| (CRITICAL, format!("{op} {:?}: {why}", spec.url));
    let uri: http::Uri = match spec.url.parse() {
        Ok(u) => u,
        Err(e) => return (CRITICAL, format!("parse {:?}: {e}", spec.url)),
    };
    if uri.scheme_str() != Some("http") {
        return fail("fake consul: only http:// checks are supported".into());
    }
    let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
    let Ok(m) = Method::from_bytes(method.as_bytes()) else {
        return fail(format!("net/http: invalid method {method:?}"));
    };
    let mut req = Request::builder().method(m).uri(uri);
    let mut has_ua = false;
    let mut has_accept = false;
    for (k, values) in &spec.header {
        has_ua |= k.eq_ignore_ascii_case("user-agent");
        has_accept |= k.eq_ignore_ascii_case("accept");
        for v in values {
            req = req.header(k.as_str(), v.as_str());
        }
    }
    if !has_ua {
        req = req.header(header::USER_AGENT, "Consul Health Check");
    }
    if !has_accept {
        req = req.header(header::ACCEPT, "text/plain, text/*, */*");
    }
    let req = match req.body(Full::new(Bytes::from(spec.body.clone()))) {
        Ok(r) => r,
        Err(e) => return fail(e.to_string()),
    };
    let timeout = spec.timeout.unwrap_or(DEFAULT_HTTP_TIMEOUT);
    let run = async {
        let rsp = client
            .request(req)
            .await
            .map_err(|e| describe_error(&e, &authority))?;
        let status = rsp.status();
        let reason = rsp
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
            .or_else(|| status.canonical_reason().map(String::from))
            .unwrap_or_default();
        // Like Consul's circular buffer: the last OUTPUT_MAX bytes.
        let mut body = rsp.into_body();
        let mut kept: Vec<u8> = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(d) = frame.data_ref() {
                kept.extend_from_slice(d);
                if kept.len() > OUTPUT_MAX {
                    kept.drain(..kept.len() - OUTPUT_MAX);
                }
            }
        }
        Ok::<_, String>((status, reason, kept))
    };
    match tokio::time::timeout(timeout, run).await {
        Err(_) => fail(
            "context deadline exceeded (Client.Timeout exceeded while awaiting headers)".into(),
        ),
        Ok(Err(why)) => fail(why),
        Ok(Ok((status, reason, body))) => {
            let output = format!(
                "HTTP {method} {}: {} {reason} Output: {}",
                spec.url,
                status.as_u16(),
                String::from_utf8_lossy(&body)
            );
            let verdict = if status.is_success() {
                PASSING
            } else if status == StatusCode::TOO_MANY_REQUESTS {
                WARNING
            } else {
                CRITICAL
            };
            (verdict, output)
        }
    }
}

/// A client error in Go's words where it matters ("dial tcp ...: connect: connection
/// refused"), else the error chain.
fn describe_error(e: &(dyn std::error::Error + 'static), authority: &str) -> String {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut chain = Vec::new();
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return format!("dial tcp {authority}: connect: connection refused");
            }
        }
        chain.push(err.to_string());
        cur = err.source();
    }
    chain.join(": ")
}

async fn reap_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let changed = shared.lock().reap(Instant::now());
        if changed {
            shared.changed();
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let s = shared.clone();
        shared.spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(s.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A Consul agent (and the servers behind it) for one node, `fake-node` at
/// 127.0.0.1 in datacenter `dc1`, serving Consul's HTTP API on a loopback port:
///
/// - `GET /v1/health/service/<name>` with `passing`, `tag` (repeatable, case
///   insensitive), `index`/`wait` blocking (default 5 minutes, at most 10, plus up to
///   wait/16 of jitter), `dc`, `stale`/`consistent`, `filter` (accepted, ignored);
/// - `PUT /v1/agent/service/register` (`replace-existing-checks`) with TTL and HTTP
///   checks, `DeregisterCriticalServiceAfter`; `PUT /v1/agent/service/deregister/<id>`;
/// - `GET /v1/agent/service/<id>` (blocking on `hash`), `GET /v1/agent/services`;
/// - `PUT /v1/agent/check/{pass,warn,fail}/<id>` (`note`), `PUT
///   /v1/agent/check/update/<id>`;
/// - `GET /v1/status/leader`.
///
/// The raft index starts at 10 and moves on every catalog change: a registration
/// that changes something, a deregistration, a check's status (not its output
/// alone: the agent defers output-only changes). Every response carries
/// `X-Consul-Index` (the service name's index on health queries, else the raft
/// index), `X-Consul-KnownLeader`, `X-Consul-LastContact` and
/// `X-Consul-Effective-Consistency`.
///
/// Deliberate differences from Consul: `DeregisterCriticalServiceAfter` has no
/// 1-minute minimum and is enforced within 50 ms (Consul reaps every 30 s); JSON
/// field names are matched exactly as documented (Go's decoder would also accept
/// other cases); only TTL and HTTP (`http://`) checks exist; ACLs are one token
/// that may do everything.
pub struct FakeConsul {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FakeConsul {
    /// Starts a fake agent on a fresh loopback port.
    pub async fn start() -> FakeConsul {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake consul");
        let addr = listener.local_addr().unwrap();
        let (wake, _) = watch::channel(Wake::default());
        let (stop, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            st: Mutex::new(St::new()),
            wake,
            stop,
            token: Mutex::new(None),
        });
        shared.spawn(accept_loop(shared.clone(), listener));
        shared.spawn(reap_loop(shared.clone()));
        FakeConsul { addr, shared }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on every request (but `/v1/status/*`, which Consul answers without a
    /// token) must carry `token` (`X-Consul-Token`, `Authorization: Bearer` or
    /// `?token=`): without one it gets 403 `Permission denied`, with another one 403
    /// `ACL not found`.
    pub fn require_token(&self, token: &str) {
        *lock(&self.shared.token) = Some(token.to_string());
    }

    /// Forces the raft index to `n`, also backwards (as after a snapshot restore):
    /// every recorded index becomes at most `n`, and blocked queries return at once
    /// with the new state, as Consul's do when its state store is restored.
    pub fn set_index(&self, n: u64) {
        {
            let mut st = self.shared.lock();
            st.index = n;
            st.node_index = st.node_index.min(n);
            st.extinction = st.extinction.min(n);
            for v in st.names.values_mut() {
                *v = (*v).min(n);
            }
            for svc in st.services.values_mut() {
                svc.create_index = svc.create_index.min(n);
                svc.modify_index = svc.modify_index.min(n);
                for c in &mut svc.checks {
                    c.create_index = c.create_index.min(n);
                    c.modify_index = c.modify_index.min(n);
                }
            }
        }
        self.shared.wake.send_modify(|w| {
            w.seq += 1;
            w.restored += 1;
        });
    }

    /// An agent restart that lost its local services: every service and its checks
    /// leave the catalog in one change (the index moves once; blocked queries wake).
    pub fn forget_agent(&self) {
        {
            let mut st = self.shared.lock();
            if st.services.is_empty() {
                return;
            }
            let names: Vec<String> = st.services.values().map(|s| s.name.clone()).collect();
            st.services.clear();
            st.index += 1;
            let idx = st.index;
            for n in names {
                st.touch(&n, idx);
            }
        }
        self.shared.changed();
    }

    /// The current raft index.
    pub fn index(&self) -> u64 {
        self.shared.lock().index
    }
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
    }
}

// ---------------------------------------------------------------------------------
// The relay.
// ---------------------------------------------------------------------------------

/// A request the relay forwarded, as the client sent it.
#[derive(Clone, Debug)]
pub struct Logged {
    /// When it arrived.
    pub at: Instant,
    /// Its method.
    pub method: String,
    /// Its path (still percent-encoded).
    pub path: String,
    /// Its query string (without `?`; empty if none), before any index shift.
    pub query: String,
    /// Its `X-Consul-Token`.
    pub token: Option<String>,
    /// Its body.
    pub body: Bytes,
}

impl Logged {
    /// Whether the query string has parameter `key` (with or without a value).
    pub fn has_param(&self, key: &str) -> bool {
        self.param(key).is_some()
    }

    /// The (still percent-encoded) value of query parameter `key`; `""` for a bare flag.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query.split('&').find_map(|p| match p.split_once('=') {
            Some((k, v)) if k == key => Some(v),
            None if p == key => Some(""),
            _ => None,
        })
    }
}

/// An answer the relay gives instead of forwarding (see [`ConsulRelay::fail`]).
#[derive(Clone)]
struct Failure {
    path_prefix: String,
    status: StatusCode,
    body: String,
}

/// Requests the relay holds back before forwarding (see [`ConsulRelay::delay`]).
#[derive(Clone)]
struct Delay {
    method: Method,
    path_prefix: String,
    by: Duration,
}

/// Runs the relay's upstream connections until the next cut.
#[derive(Clone)]
struct CutExec(watch::Receiver<u64>);

impl<F> hyper::rt::Executor<F> for CutExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let mut cut = self.0.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = fut => {}
                _ = cut.changed() => {}
            }
        });
    }
}

type RelayBody = BoxBody<Bytes, hyper::Error>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct RelayInner {
    upstream: String,
    shift: AtomicU64,
    /// True while the relay answers nothing ([`ConsulRelay::hang`]).
    hung: watch::Sender<bool>,
    failures: Mutex<Vec<Failure>>,
    delays: Mutex<Vec<Delay>>,
    /// Delayed requests not yet answered by the upstream.
    delayed: Arc<AtomicUsize>,
    log: Mutex<Vec<Logged>>,
    cut: watch::Sender<u64>,
    client: Mutex<HttpClient>,
    listener: Mutex<Option<(Arc<TcpListener>, JoinHandle<()>)>>,
}

fn relay_client(cut: watch::Receiver<u64>) -> HttpClient {
    Client::builder(CutExec(cut)).build_http()
}

fn bind_reuse(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(1024)
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
];

/// Adds `shift` to a positive `index=` parameter.
fn shift_query(query: &str, shift: u64) -> String {
    query
        .split('&')
        .map(|part| match part.split_once('=') {
            Some(("index", v)) => match v.parse::<u64>() {
                Ok(n) if n > 0 => format!("index={}", n.saturating_add(shift)),
                _ => part.to_string(),
            },
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn full_body(b: Bytes) -> RelayBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

/// Waits while the relay is hung.
async fn unhung(inner: &RelayInner) {
    let mut rx = inner.hung.subscribe();
    let _ = rx.wait_for(|hung| !*hung).await;
}

async fn forward(
    inner: Arc<RelayInner>,
    req: Request<Incoming>,
) -> Result<Response<RelayBody>, BoxError> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let body = body.collect().await?.to_bytes();
    lock(&inner.log).push(Logged {
        at: Instant::now(),
        method: parts.method.to_string(),
        path: path.clone(),
        query: query.clone(),
        token: parts
            .headers
            .get("x-consul-token")
            .and_then(|v| v.to_str().ok())
            .map(String::from),
        body: body.clone(),
    });
    unhung(&inner).await;
    let failure = lock(&inner.failures)
        .iter()
        .find(|f| path.starts_with(&f.path_prefix))
        .cloned();
    if let Some(f) = failure {
        // As Consul answers when the call fails: a plain-text reason, and an index of
        // 1 (it never sends 0, which would make clients spin).
        let rsp = Response::builder()
            .status(f.status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header("x-consul-index", "1")
            .header(
                "x-consul-knownleader",
                if f.status == StatusCode::INTERNAL_SERVER_ERROR {
                    "false"
                } else {
                    "true"
                },
            )
            .body(full_body(Bytes::from(f.body)))?;
        return Ok(rsp);
    }
    let delay = lock(&inner.delays)
        .iter()
        .find(|d| d.method == parts.method && path.starts_with(&d.path_prefix))
        .map(|d| d.by);
    let shift = inner.shift.load(Ordering::SeqCst);
    let query = if shift > 0 {
        shift_query(&query, shift)
    } else {
        query
    };
    let uri = if query.is_empty() {
        format!("{}{path}", inner.upstream)
    } else {
        format!("{}{path}?{query}", inner.upstream)
    };
    let mut out = Request::builder()
        .method(parts.method)
        .uri(uri)
        .body(Full::new(body))?;
    for (k, v) in &parts.headers {
        if !HOP_BY_HOP.contains(&k.as_str()) {
            out.headers_mut().append(k.clone(), v.clone());
        }
    }
    let client = lock(&inner.client).clone();
    // No timeout: blocking queries hang for minutes by design.
    let rsp = match delay {
        None => client.request(out).await?.map(BodyExt::boxed),
        Some(by) => {
            // Held, then forwarded whether or not the client still waits: an agent
            // that has read a request carries it out even if the caller gave up.
            let delayed = inner.delayed.clone();
            delayed.fetch_add(1, Ordering::SeqCst);
            let sent = tokio::spawn(async move {
                tokio::time::sleep(by).await;
                let rsp = client.request(out).await;
                let rsp = match rsp {
                    Ok(rsp) => {
                        let (parts, body) = rsp.into_parts();
                        body.collect()
                            .await
                            .map(|b| Response::from_parts(parts, b.to_bytes()))
                            .map_err(BoxError::from)
                    }
                    Err(e) => Err(BoxError::from(e)),
                };
                delayed.fetch_sub(1, Ordering::SeqCst);
                rsp
            });
            sent.await??.map(full_body)
        }
    };
    // An answer that comes back while the relay is hung is held until it is not.
    unhung(&inner).await;
    let (mut rparts, rbody) = rsp.into_parts();
    for h in HOP_BY_HOP {
        rparts.headers.remove(h);
    }
    // The shift in force when the answer comes back: a query blocked before the shift
    // was set sees the index go backwards as soon as it returns, as it would when the
    // server it waits on is replaced by one that is behind.
    let shift = inner.shift.load(Ordering::SeqCst);
    if shift > 0 {
        let name = HeaderName::from_static("x-consul-index");
        let shifted = rparts
            .headers
            .get(&name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|i| i.saturating_sub(shift).max(1));
        if let Some(i) = shifted {
            rparts.headers.insert(name, HeaderValue::from(i));
        }
    }
    Ok(Response::from_parts(rparts, rbody))
}

async fn relay_accept(
    inner: Arc<RelayInner>,
    listener: Arc<TcpListener>,
    mut cut: watch::Receiver<u64>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = cut.changed() => return,
        };
        // Closing with linger 0 sends a reset, as a dead process's kernel would for
        // a connection with a request in flight.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        let _ = stream.set_nodelay(true);
        let (inner, mut cut) = (inner.clone(), cut.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| forward(inner.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = cut.changed() => {}
            }
        });
    }
}

/// An HTTP relay between baton and a Consul agent (a [`FakeConsul`] or a real one),
/// for faults both can suffer: [`cut`](Self::cut) kills it like a dead agent
/// process, [`hang`](Self::hang) makes it a hung one, [`fail`](Self::fail) answers
/// errors (no leader, an unknown token), [`delay`](Self::delay) carries out calls
/// late, [`set_index_shift`](Self::set_index_shift) makes the index go backwards
/// as baton sees it. Requests are forwarded as they come (method, path and query,
/// headers, body) and responses streamed back; an upstream that cannot be reached
/// closes the client's connection without a response.
pub struct ConsulRelay {
    addr: SocketAddr,
    inner: Arc<RelayInner>,
}

impl ConsulRelay {
    /// Starts a relay on a fresh loopback port in front of `upstream`
    /// (`http://host:port`).
    pub async fn start(upstream: &str) -> ConsulRelay {
        let upstream = upstream.trim_end_matches('/').to_string();
        assert!(
            upstream.starts_with("http://"),
            "ConsulRelay relays to http:// only, not {upstream}"
        );
        let listener = bind_reuse("127.0.0.1:0".parse().unwrap()).expect("bind relay");
        let addr = listener.local_addr().unwrap();
        let (cut, _) = watch::channel(0u64);
        let client = relay_client(cut.subscribe());
        let relay = ConsulRelay {
            addr,
            inner: Arc::new(RelayInner {
                upstream,
                shift: AtomicU64::new(0),
                hung: watch::Sender::new(false),
                failures: Mutex::new(Vec::new()),
                delays: Mutex::new(Vec::new()),
                delayed: Arc::new(AtomicUsize::new(0)),
                log: Mutex::new(Vec::new()),
                cut,
                client: Mutex::new(client),
                listener: Mutex::new(None),
            }),
        };
        relay.listen(listener);
        relay
    }

    fn listen(&self, listener: TcpListener) {
        let listener = Arc::new(listener);
        let task = tokio::spawn(relay_accept(
            self.inner.clone(),
            listener.clone(),
            self.inner.cut.subscribe(),
        ));
        *lock(&self.inner.listener) = Some((listener, task));
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops listening at once (new connections are refused) and resets every open
    /// client connection and every forward in flight, as if the agent died.
    pub fn cut(&self) {
        if let Some((listener, task)) = lock(&self.inner.listener).take() {
            // Shutting a listening socket down stops it listening now; the task
            // that owns it goes away later.
            let _ = socket2::SockRef::from(&*listener).shutdown(std::net::Shutdown::Both);
            task.abort();
        }
        self.inner.cut.send_modify(|g| *g += 1);
        let fresh = relay_client(self.inner.cut.subscribe());
        *lock(&self.inner.client) = fresh;
    }

    /// Listens again on the same port after [`cut`](Self::cut) (no-op if listening).
    pub async fn restore(&self) {
        if lock(&self.inner.listener).is_some() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match bind_reuse(self.addr) {
                Ok(l) => break l,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("relay could not listen on {} again: {e}", self.addr),
            }
        };
        self.listen(listener);
    }

    /// From now on subtracts `shift` from `X-Consul-Index` in responses, but never
    /// below 1, and adds it to a positive `index=` in requests, so the client sees
    /// the index go backwards while the upstream stays consistent. 0 turns it off.
    pub fn set_index_shift(&self, shift: u64) {
        self.inner.shift.store(shift, Ordering::SeqCst);
    }

    /// From now on accepts connections and reads requests but answers nothing, like
    /// an agent process that hangs while its kernel still talks TCP: new requests are
    /// held before forwarding, answers to those in flight are held before sending.
    /// [`unhang`](Self::unhang) lets them all go on.
    pub fn hang(&self) {
        self.inner.hung.send_replace(true);
    }

    /// Ends [`hang`](Self::hang): held requests are forwarded, held answers sent.
    pub fn unhang(&self) {
        self.inner.hung.send_replace(false);
    }

    /// From now on answers every request whose path starts with `path_prefix` itself,
    /// with `status` and `body` as Consul writes a failed call (plain text,
    /// `X-Consul-Index: 1`, `X-Consul-KnownLeader: false` for a 500), e.g. 500 `No
    /// cluster leader` or 403 `ACL not found`. The requests are still logged.
    pub fn fail(&self, path_prefix: &str, status: StatusCode, body: &str) {
        lock(&self.inner.failures).push(Failure {
            path_prefix: path_prefix.to_string(),
            status,
            body: body.to_string(),
        });
    }

    /// Forwards everything again after [`fail`](Self::fail).
    pub fn clear_failures(&self) {
        lock(&self.inner.failures).clear();
    }

    /// From now on holds each `method` request whose path starts with `path_prefix`
    /// for `by` before forwarding it, and forwards it even if the client has given up
    /// meanwhile: an agent slow to carry out a call it has read.
    pub fn delay(&self, method: Method, path_prefix: &str, by: Duration) {
        lock(&self.inner.delays).push(Delay {
            method,
            path_prefix: path_prefix.to_string(),
            by,
        });
    }

    /// Stops delaying requests (those already held still are).
    pub fn clear_delays(&self) {
        lock(&self.inner.delays).clear();
    }

    /// Delayed requests the upstream has not answered yet.
    pub fn delayed_in_flight(&self) -> usize {
        self.inner.delayed.load(Ordering::SeqCst)
    }

    /// The requests forwarded so far, oldest first.
    pub fn requests(&self) -> Vec<Logged> {
        lock(&self.inner.log).clone()
    }

    /// Forgets the requests logged so far.
    pub fn clear_requests(&self) {
        lock(&self.inner.log).clear();
    }
}

impl Drop for ConsulRelay {
    fn drop(&mut self) {
        self.cut();
    }
}

// ---------------------------------------------------------------------------------
// The test's own client, and the agent under test.
// ---------------------------------------------------------------------------------

/// The `X-Consul-Index` of a response (panics if it has none).
pub fn consul_index(got: &Got) -> u64 {
    got.1
        .get("x-consul-index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no X-Consul-Index in {:?}", got.1))
}

/// A small Consul client for a test's own calls (to a fake, a relay or a real
/// agent), sending its token as `X-Consul-Token`. Helpers panic on answers they do
/// not expect, with the body in the message.
#[derive(Clone)]
pub struct ConsulApi {
    base: String,
    token: Option<String>,
    client: HttpClient,
}

impl ConsulApi {
    /// A client for the agent at `url` (`http://host:port`).
    pub fn new(url: &str, token: Option<String>) -> ConsulApi {
        ConsulApi {
            base: url.trim_end_matches('/').to_string(),
            token,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// The agent's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Sends `method path_and_query` with a JSON `body`; transport errors are `Err`.
    pub async fn try_request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<Got, String> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path_and_query}", self.base));
        if let Some(t) = &self.token {
            req = req.header("x-consul-token", t.as_str());
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        // Longer than any blocking query (10 minutes plus jitter).
        let rsp = tokio::time::timeout(Duration::from_secs(660), self.client.request(req))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = rsp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((parts.status, parts.headers, body))
    }

    /// Like [`try_request`](Self::try_request), panicking on transport errors.
    pub async fn request(&self, method: Method, path_and_query: &str, body: Option<&Value>) -> Got {
        self.try_request(method.clone(), path_and_query, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path_and_query} on {}: {e}", self.base))
    }

    /// `PUT /v1/agent/service/register` with `body` (a Consul service definition);
    /// panics unless 200.
    pub async fn register(&self, body: Value) {
        let got = self
            .request(Method::PUT, "/v1/agent/service/register", Some(&body))
            .await;
        assert_eq!(
            got.0,
            StatusCode::OK,
            "register {body}: {}",
            String::from_utf8_lossy(&got.2)
        );
    }

    /// `PUT /v1/agent/service/deregister/<id>`; an unknown ID is fine.
    pub async fn deregister(&self, id: &str) {
        let path = format!("/v1/agent/service/deregister/{}", pct_encode(id));
        let got = self.request(Method::PUT, &path, None).await;
        assert!(
            got.0 == StatusCode::OK || got.0 == StatusCode::NOT_FOUND,
            "deregister {id}: {} {}",
            got.0,
            String::from_utf8_lossy(&got.2)
        );
    }

    /// `PUT /v1/agent/check/<status>/<check_id>` with `status` `pass`, `warn` or
    /// `fail`; panics unless 200.
    pub async fn check(&self, check_id: &str, status: &str) {
        assert!(
            ["pass", "warn", "fail"].contains(&status),
            "check status is pass, warn or fail, not {status}"
        );
        let path = format!("/v1/agent/check/{status}/{}", pct_encode(check_id));
        let got = self.request(Method::PUT, &path, None).await;
        assert_eq!(
            got.0,
            StatusCode::OK,
            "{status} {check_id}: {}",
            String::from_utf8_lossy(&got.2)
        );
    }

    /// `GET /v1/health/service/<name>` (with `?passing` if `passing`): the
    /// `X-Consul-Index` and the entries; panics unless 200.
    pub async fn health(&self, name: &str, passing: bool) -> (u64, Vec<Value>) {
        let mut path = format!("/v1/health/service/{}", pct_encode(name));
        if passing {
            path.push_str("?passing");
        }
        let got = self.request(Method::GET, &path, None).await;
        assert_eq!(
            got.0,
            StatusCode::OK,
            "health {name}: {}",
            String::from_utf8_lossy(&got.2)
        );
        let entries: Vec<Value> = serde_json::from_slice(&got.2)
            .unwrap_or_else(|e| panic!("health {name}: {e}: {}", String::from_utf8_lossy(&got.2)));
        (consul_index(&got), entries)
    }

    /// `GET /v1/agent/service/<id>`: the definition, or `None` on 404.
    pub async fn agent_service(&self, id: &str) -> Option<Value> {
        let path = format!("/v1/agent/service/{}", pct_encode(id));
        let got = self.request(Method::GET, &path, None).await;
        match got.0 {
            StatusCode::OK => Some(serde_json::from_slice(&got.2).unwrap_or_else(|e| {
                panic!(
                    "agent service {id}: {e}: {}",
                    String::from_utf8_lossy(&got.2)
                )
            })),
            StatusCode::NOT_FOUND => None,
            other => panic!(
                "agent service {id}: {other} {}",
                String::from_utf8_lossy(&got.2)
            ),
        }
    }
}

/// The Consul agent a test runs against: the real one at `CONSUL_HTTP_ADDR` (with
/// `CONSUL_HTTP_TOKEN`) when that is set, else a [`FakeConsul`] of its own.
pub struct ConsulUnderTest {
    /// The fake, when there is no real agent (tests of fake-only knobs return early
    /// without it).
    pub fake: Option<FakeConsul>,
    /// The agent's base URL, `http://host:port`.
    pub agent_url: String,
    /// The token to send, if any.
    pub token: Option<String>,
}

impl ConsulUnderTest {
    /// Uses the agent at `CONSUL_HTTP_ADDR` (`host:port` or `http://host:port`) if set,
    /// else starts a fake.
    pub async fn start() -> ConsulUnderTest {
        match std::env::var("CONSUL_HTTP_ADDR") {
            Ok(addr) if !addr.trim().is_empty() => {
                let addr = addr.trim().trim_end_matches('/');
                let agent_url = if addr.starts_with("http://") {
                    addr.to_string()
                } else if addr.contains("://") {
                    panic!("CONSUL_HTTP_ADDR: only http:// agents are supported, not {addr}");
                } else {
                    format!("http://{addr}")
                };
                let token = std::env::var("CONSUL_HTTP_TOKEN")
                    .ok()
                    .filter(|t| !t.is_empty());
                ConsulUnderTest {
                    fake: None,
                    agent_url,
                    token,
                }
            }
            _ => {
                let fake = FakeConsul::start().await;
                ConsulUnderTest {
                    agent_url: fake.url(),
                    fake: Some(fake),
                    token: None,
                }
            }
        }
    }

    /// A client for the agent, with the token.
    pub fn api(&self) -> ConsulApi {
        ConsulApi::new(&self.agent_url, self.token.clone())
    }
}

/// `<prefix>-<pid>-<counter>`: a name no other test, nor another run, uses on a
/// shared agent.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}
