//! Configuration: every `BATON_*` variable, parsed once into a typed [`Config`].
//!
//! Variables are read through the [`Strings`] seam (the process environment in
//! production, a map in tests: nothing here calls `set_var`). Each variable's name and
//! default sit side by side as constants. Parsing never stops at the first problem:
//! every bad variable is reported, by name, with the value and the expected form, and
//! `main` exits with status 2. An empty variable counts as unset.

use baton_discovery::{
    consul::{self, watch::WatchSettings, ClientSettings, Consistency},
    static_source::{self, ServiceMap},
};
use baton_layers::{
    balance::HttpHashKey,
    handoff::{tables, wire::Key},
    route::{self, Match},
    target::{Lb, Logical, Protocol, UpstreamProtocol, LOCAL},
};
use ipnet::Ipv4Net;
use serde::{Serialize, Serializer};
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    sync::Arc,
    time::Duration,
};

/// Where configuration strings come from.
pub trait Strings {
    /// The value of `name`, if set.
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Env;

impl Strings for Env {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Strings for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

impl Strings for HashMap<&str, &str> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).map(|s| s.to_string())
    }
}

/// Values from `first`, falling back to `then` (e.g. demo defaults under the env).
#[derive(Debug)]
pub struct Overlay<A, B>(pub A, pub B);

impl<A: Strings, B: Strings> Strings for Overlay<A, B> {
    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).or_else(|| self.1.get(name))
    }
}

macro_rules! vars {
    ($( $(#[$doc:meta])* $name:ident = $default_name:ident : $default:expr; )*) => {
        $(
            $(#[$doc])*
            pub const $name: &str = stringify!($name);
            #[doc = concat!("Default of `", stringify!($name), "`.")]
            pub const $default_name: &str = $default;
        )*
        /// Every variable with its default, in README order.
        pub const ALL: &[(&str, &str)] = &[$((stringify!($name), $default)),*];
    };
}

vars! {
    /// Address of the inbound (data) listener.
    BATON_INBOUND_ADDR = DEFAULT_INBOUND_ADDR: "0.0.0.0:15006";
    /// `plain`, `tproxy` or `redirect`.
    BATON_INBOUND_MODE = DEFAULT_INBOUND_MODE: "plain";
    /// Address of the admin server.
    BATON_ADMIN_ADDR = DEFAULT_ADMIN_ADDR: "0.0.0.0:15021";
    /// How long a new connection may take to show its protocol.
    BATON_DETECT_TIMEOUT = DEFAULT_DETECT_TIMEOUT: "10s";
    /// Original-destination ports forwarded as opaque TCP without detection.
    BATON_OPAQUE_PORTS = DEFAULT_OPAQUE_PORTS: "";
    /// Largest accepted HTTP/1 request head.
    BATON_MAX_HEADER_BYTES = DEFAULT_MAX_HEADER_BYTES: "65536";
    /// Time allowed for a request head, counted from when the connection waits for one.
    BATON_HEADER_READ_TIMEOUT = DEFAULT_HEADER_READ_TIMEOUT: "60s";
    /// An HTTP/1 keep-alive connection idle this long releases its HTTP buffers.
    BATON_IDLE_PARK = DEFAULT_IDLE_PARK: "1s";
    /// Ordered routes, `MATCH=SERVICE;...`.
    BATON_ROUTES = DEFAULT_ROUTES: "";
    /// Discovery source: `static` or `consul`.
    BATON_DISCOVERY = DEFAULT_DISCOVERY: "static";
    /// Longest time Consul may hold a blocking query (at most 10m).
    BATON_CONSUL_WAIT = DEFAULT_CONSUL_WAIT: "5m";
    /// The Consul datacenter to discover services in (empty: the agent's).
    BATON_CONSUL_DATACENTER = DEFAULT_CONSUL_DATACENTER: "";
    /// Consul read consistency: `default`, `stale` or `consistent`.
    BATON_CONSUL_CONSISTENCY = DEFAULT_CONSUL_CONSISTENCY: "default";
    /// Sustained Consul queries per second per watched service (a token bucket).
    BATON_CONSUL_QUERY_RATE = DEFAULT_CONSUL_QUERY_RATE: "10";
    /// Longest retry delay after Consul failures (exponential backoff with jitter).
    BATON_CONSUL_BACKOFF_MAX = DEFAULT_CONSUL_BACKOFF_MAX: "10s";
    /// Register this service in Consul under this name (empty: no registration).
    BATON_SERVICE_NAME = DEFAULT_SERVICE_NAME: "";
    /// The registered service's port (required with `BATON_SERVICE_NAME`).
    BATON_SERVICE_PORT = DEFAULT_SERVICE_PORT: "";
    /// The registered address (empty: `POD_IP`, else the default-route interface's).
    BATON_SERVICE_ADDRESS = DEFAULT_SERVICE_ADDRESS: "";
    /// The registered instance ID (empty: `NAME-HOSTNAME`).
    BATON_SERVICE_ID = DEFAULT_SERVICE_ID: "";
    /// Tags of the registration, `a,b`.
    BATON_SERVICE_TAGS = DEFAULT_SERVICE_TAGS: "";
    /// Metadata of the registration, `key=value,...`.
    BATON_SERVICE_META = DEFAULT_SERVICE_META: "";
    /// The registration's balancing weight while passing.
    BATON_SERVICE_WEIGHT = DEFAULT_SERVICE_WEIGHT: "1";
    /// How often the agent checks baton's `/ready`.
    BATON_SERVICE_CHECK_INTERVAL = DEFAULT_SERVICE_CHECK_INTERVAL: "10s";
    /// How long each check may take.
    BATON_SERVICE_CHECK_TIMEOUT = DEFAULT_SERVICE_CHECK_TIMEOUT: "2s";
    /// The agent removes the instance after its check has been critical this long.
    BATON_SERVICE_DEREGISTER_AFTER = DEFAULT_SERVICE_DEREGISTER_AFTER: "1m";
    /// On shutdown, how long baton keeps accepting after deregistering, before draining.
    BATON_SERVICE_DEREGISTER_DELAY = DEFAULT_SERVICE_DEREGISTER_DELAY: "2s";
    /// The local application's address for the route target `local` (empty: the
    /// original destination's; the port is always the original destination's).
    BATON_LOCAL_IP = DEFAULT_LOCAL_IP: "";
    /// Static services, `NAME=IP:PORT[@HANDOFF],...;...`.
    BATON_STATIC_SERVICES = DEFAULT_STATIC_SERVICES: "";
    /// A file with static services, re-read on change and SIGHUP.
    BATON_STATIC_FILE = DEFAULT_STATIC_FILE: "";
    /// Default balancing algorithm.
    BATON_LB = DEFAULT_LB: "p2c";
    /// Per-service algorithms, `SERVICE=ALGO,...`.
    BATON_LB_OVERRIDES = DEFAULT_LB_OVERRIDES: "";
    /// The key of `hash` balancing.
    BATON_HASH_KEY = DEFAULT_HASH_KEY: "path";
    /// HTTP version spoken upstream.
    BATON_UPSTREAM_PROTOCOL = DEFAULT_UPSTREAM_PROTOCOL: "auto";
    /// Per-service upstream versions, `SERVICE=VERSION,...`.
    BATON_UPSTREAM_PROTOCOL_OVERRIDES = DEFAULT_UPSTREAM_PROTOCOL_OVERRIDES: "";
    /// Timeout for connecting to an endpoint.
    BATON_CONNECT_TIMEOUT = DEFAULT_CONNECT_TIMEOUT: "1s";
    /// TCP keepalive idle time on client and upstream connections (0: off).
    BATON_TCP_KEEPALIVE = DEFAULT_TCP_KEEPALIVE: "60s";
    /// Timeout from request to response headers (all retries included).
    BATON_REQUEST_TIMEOUT = DEFAULT_REQUEST_TIMEOUT: "30s";
    /// Retries of idempotent, bodiless requests whose connection failed.
    BATON_RETRIES = DEFAULT_RETRIES: "2";
    /// Requests in flight before new ones are answered 503.
    BATON_MAX_IN_FLIGHT = DEFAULT_MAX_IN_FLIGHT: "10000";
    /// Idle upstream connections are closed after this long.
    BATON_POOL_IDLE_TIMEOUT = DEFAULT_POOL_IDLE_TIMEOUT: "30s";
    /// Idle upstream connections kept per endpoint.
    BATON_POOL_MAX_IDLE = DEFAULT_POOL_MAX_IDLE: "256";
    /// PeakEWMA: RTT assumed for a new endpoint.
    BATON_EWMA_DEFAULT_RTT = DEFAULT_EWMA_DEFAULT_RTT: "30ms";
    /// PeakEWMA: decay time of RTT observations.
    BATON_EWMA_DECAY = DEFAULT_EWMA_DECAY: "10s";
    /// Consecutive connect failures that take an endpoint out of its balancer (0: never).
    BATON_EJECT_FAILURES = DEFAULT_EJECT_FAILURES: "3";
    /// How long an endpoint's first ejection lasts (doubling with each in a row).
    BATON_EJECT_TIME = DEFAULT_EJECT_TIME: "1s";
    /// The longest ejection.
    BATON_EJECT_TIME_MAX = DEFAULT_EJECT_TIME_MAX: "30s";
    /// A service's balancer unused this long is dropped (rebuilt on next use).
    BATON_SERVICE_IDLE_TIMEOUT = DEFAULT_SERVICE_IDLE_TIMEOUT: "5m";
    /// Log filter (tracing env-filter syntax).
    BATON_LOG = DEFAULT_LOG: "info";
    /// `plain` or `json`.
    BATON_LOG_FORMAT = DEFAULT_LOG_FORMAT: "plain";
    /// Tokio worker threads (default: the number of cores).
    BATON_WORKERS = DEFAULT_WORKERS: "";
    /// How long shutdown waits for in-flight requests.
    BATON_SHUTDOWN_GRACE = DEFAULT_SHUTDOWN_GRACE: "30s";
    /// `baton init`: original-destination ports captured (empty: all).
    BATON_CAPTURE_PORTS = DEFAULT_CAPTURE_PORTS: "";
    /// `baton init`: ports never captured (baton's own ports always are not).
    BATON_CAPTURE_EXCLUDE_PORTS = DEFAULT_CAPTURE_EXCLUDE_PORTS: "";
    /// `baton init`: new connections to captured ports while baton is not listening:
    /// `closed` (dropped, the client retries) or `open` (reach the app directly).
    BATON_CAPTURE_FAIL = DEFAULT_CAPTURE_FAIL: "closed";
    /// Connection handoff: `off` or `on`.
    BATON_HANDOFF = DEFAULT_HANDOFF: "off";
    /// Services whose requests may be handed off, `a,b` (empty: all).
    BATON_HANDOFF_ROUTES = DEFAULT_HANDOFF_ROUTES: "";
    /// The smallest expected response a frontend hands off, in bytes (learned from the
    /// responses it proxies; 0: every eligible request).
    BATON_HANDOFF_MIN_BYTES = DEFAULT_HANDOFF_MIN_BYTES: "32768";
    /// How long the frontend waits for a backend's "ready" before proxying instead.
    BATON_HANDOFF_TIMEOUT = DEFAULT_HANDOFF_TIMEOUT: "50ms";
    /// The interface the handoff table hooks (empty: the default route's).
    BATON_HANDOFF_INTERFACE = DEFAULT_HANDOFF_INTERFACE: "";
    /// Address of the handoff receiver.
    BATON_HANDOFF_ADDR = DEFAULT_HANDOFF_ADDR: "0.0.0.0:15010";
    /// A peer's handoff port when discovery does not give one.
    BATON_HANDOFF_PORT = DEFAULT_HANDOFF_PORT: "15010";
    /// File holding the fleet's handoff key (at least 32 bytes); required when on.
    BATON_HANDOFF_KEY_FILE = DEFAULT_HANDOFF_KEY_FILE: "";
    /// Frontend addresses a backend accepts connections of, `CIDR,...` (empty: the
    /// handoff interface's networks).
    BATON_HANDOFF_FE_CIDRS = DEFAULT_HANDOFF_FE_CIDRS: "";
    /// Lifetime of a moved connection's kernel entries when no close is seen.
    BATON_HANDOFF_FLOW_TTL = DEFAULT_HANDOFF_FLOW_TTL: "1h";
    /// The local application moved connections are served from.
    BATON_APP_ADDR = DEFAULT_APP_ADDR: "127.0.0.1:8080";
    /// Unix socket of a handoff-aware local application that takes moved
    /// connections' sockets (empty: relay them to BATON_APP_ADDR).
    BATON_APP_PASS = DEFAULT_APP_PASS: "";
}

/// How the inbound listener learns a connection's original destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundMode {
    /// The listener's own address.
    Plain,
    /// An `IP_TRANSPARENT` listener: the accepted socket's local address.
    Tproxy,
    /// `SO_ORIGINAL_DST` (iptables/nft REDIRECT).
    Redirect,
}

/// Where discovery comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryKind {
    /// `BATON_STATIC_SERVICES` and `BATON_STATIC_FILE`.
    Static,
    /// Consul blocking-query watches (services defined statically still come from the
    /// static source).
    Consul,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    Plain,
    /// One JSON object per line.
    Json,
}

/// One route: a match and the logical service it selects.
#[derive(Clone, Debug, Serialize)]
pub struct RouteConfig {
    /// What the route matches (as written: `path:/x`, `host:h`, `port:n`, `*`).
    #[serde(rename = "match", serialize_with = "display")]
    pub matches: Match,
    /// The service and its per-service settings.
    pub logical: Logical,
}

/// The effective configuration (served at `/config`).
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// Inbound listener address.
    pub inbound_addr: SocketAddr,
    /// Inbound listener mode.
    pub inbound_mode: InboundMode,
    /// Admin server address.
    pub admin_addr: SocketAddr,
    /// Protocol detection timeout.
    #[serde(serialize_with = "duration")]
    pub detect_timeout: Duration,
    /// Ports forwarded as opaque TCP without detection.
    pub opaque_ports: Vec<u16>,
    /// Largest HTTP/1 request head.
    pub max_header_bytes: usize,
    /// Request head timeout (and keep-alive idle bound).
    #[serde(serialize_with = "duration")]
    pub header_read_timeout: Duration,
    /// Idle time after which an HTTP/1 connection is parked without buffers.
    #[serde(serialize_with = "duration")]
    pub idle_park: Duration,
    /// Routes, in order.
    pub routes: Vec<RouteConfig>,
    /// Discovery source.
    pub discovery: DiscoveryKind,
    /// The local application's address (route target `local`; `None`: the original
    /// destination's).
    pub local_ip: Option<IpAddr>,
    /// Static services from the environment.
    pub static_services: ServiceMap,
    /// Static service file.
    pub static_file: Option<PathBuf>,
    /// Static services read from the file at startup (validated with the routes).
    #[serde(skip)]
    pub static_file_services: ServiceMap,
    /// Hash balancing key.
    #[serde(serialize_with = "display")]
    pub hash_key: HttpHashKey,
    /// Connect timeout.
    #[serde(serialize_with = "duration")]
    pub connect_timeout: Duration,
    /// TCP keepalive idle time (zero: off).
    #[serde(serialize_with = "duration")]
    pub tcp_keepalive: Duration,
    /// Request timeout.
    #[serde(serialize_with = "duration")]
    pub request_timeout: Duration,
    /// Connect-failure retries.
    pub retries: usize,
    /// Load-shedding bound.
    pub max_in_flight: usize,
    /// Upstream pool idle timeout.
    #[serde(serialize_with = "duration")]
    pub pool_idle_timeout: Duration,
    /// Idle upstream connections per endpoint.
    pub pool_max_idle: usize,
    /// PeakEWMA default RTT.
    #[serde(serialize_with = "duration")]
    pub ewma_default_rtt: Duration,
    /// PeakEWMA decay.
    #[serde(serialize_with = "duration")]
    pub ewma_decay: Duration,
    /// Consecutive connect failures that eject an endpoint (0: never).
    pub eject_failures: u32,
    /// First ejection time.
    #[serde(serialize_with = "duration")]
    pub eject_time: Duration,
    /// Longest ejection time.
    #[serde(serialize_with = "duration")]
    pub eject_time_max: Duration,
    /// Balancer idle eviction.
    #[serde(serialize_with = "duration")]
    pub service_idle_timeout: Duration,
    /// Log filter.
    pub log: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Worker threads.
    pub workers: usize,
    /// Shutdown grace period.
    #[serde(serialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// Connection handoff, when on.
    pub handoff: Option<HandoffSettings>,
    /// The Consul agent, when discovery or registration uses it.
    pub consul: Option<ConsulSettings>,
    /// Registration of the local service in Consul, when `BATON_SERVICE_NAME` is set.
    pub registration: Option<RegistrationSettings>,
}

/// How baton talks to Consul.
#[derive(Clone, Debug, Serialize)]
pub struct ConsulSettings {
    /// The agent and how to reach it (from the `CONSUL_*` variables).
    #[serde(serialize_with = "consul_client")]
    pub client: ClientSettings,
    /// The watches' pacing.
    pub watch: WatchSettings,
}

fn consul_client<S: Serializer>(c: &ClientSettings, s: S) -> Result<S::Ok, S::Error> {
    serde_json::json!({
        "address": c.url(),
        "tls": c.tls.as_ref().map(|t| serde_json::json!({"verify": t.verify})),
        "token": c.token.as_ref().map(|_| "<redacted>"),
        "datacenter": c.datacenter,
        "consistency": c.consistency,
    })
    .serialize(s)
}

/// The local service as registered in Consul.
#[derive(Clone, Debug, Serialize)]
pub struct RegistrationSettings {
    /// Service name.
    pub name: String,
    /// Instance ID.
    pub id: String,
    /// Address peers reach it at.
    pub address: IpAddr,
    /// Port peers reach it at.
    pub port: u16,
    /// Tags.
    pub tags: Vec<String>,
    /// User metadata.
    pub meta: BTreeMap<String, String>,
    /// Weight while passing.
    pub weight: u32,
    /// Check interval.
    #[serde(serialize_with = "duration")]
    pub check_interval: Duration,
    /// Check timeout.
    #[serde(serialize_with = "duration")]
    pub check_timeout: Duration,
    /// Deregistration after critical.
    #[serde(serialize_with = "duration")]
    pub deregister_after: Duration,
    /// Time between deregistering and draining on shutdown.
    #[serde(serialize_with = "duration")]
    pub deregister_delay: Duration,
}

/// Connection handoff settings (`BATON_HANDOFF=on`).
#[derive(Clone, Debug, Serialize)]
pub struct HandoffSettings {
    /// Services whose requests may be handed off (`None`: all).
    pub routes: Option<Vec<Arc<str>>>,
    /// Wait for "ready".
    #[serde(serialize_with = "duration")]
    pub timeout: Duration,
    /// Interface of the handoff table (`None`: the default route's).
    pub interface: Option<String>,
    /// Receiver address.
    pub addr: SocketAddr,
    /// Peers' default handoff port.
    pub port: u16,
    /// The key file (its content is never shown).
    pub key_file: PathBuf,
    /// The key.
    #[serde(skip)]
    pub key: Key,
    /// Accepted frontend networks (`None`: the interface's).
    #[serde(serialize_with = "display_list")]
    pub fe_cidrs: Option<Vec<Ipv4Net>>,
    /// The smallest expected response handed off (0: all).
    pub min_bytes: u64,
    /// Lifetime of kernel entries of moved connections.
    #[serde(serialize_with = "duration")]
    pub flow_ttl: Duration,
    /// The local application.
    pub app_addr: SocketAddr,
    /// The handoff-aware application's Unix socket, if any.
    pub app_pass: Option<PathBuf>,
}

fn display_list<T: fmt::Display, S: Serializer>(
    v: &Option<Vec<T>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        None => s.serialize_none(),
        Some(v) => s.collect_seq(v.iter().map(|x| x.to_string())),
    }
}

fn duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

fn display<T: fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// One bad variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VarError {
    /// The variable.
    pub name: &'static str,
    /// Its value.
    pub value: String,
    /// What was expected (or what is wrong).
    pub expected: String,
}

/// Every bad variable found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(pub Vec<VarError>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}={:?}: {}", e.name, e.value, e.expected)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

struct Parser<'a, S> {
    strings: &'a S,
    errors: Vec<VarError>,
}

impl<S: Strings> Parser<'_, S> {
    fn raw(&self, name: &str) -> Option<String> {
        self.strings.get(name).filter(|v| !v.trim().is_empty())
    }

    fn fail(&mut self, name: &'static str, value: &str, expected: impl Into<String>) {
        self.errors.push(VarError {
            name,
            value: value.to_string(),
            expected: expected.into(),
        });
    }

    /// Parses `name` (or `default` when unset) with `parse`; on error, records it and
    /// returns the parse of the default.
    fn var<T>(
        &mut self,
        name: &'static str,
        default: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let value = self.raw(name);
        let text = value.as_deref().unwrap_or(default);
        match parse(text.trim()) {
            Ok(v) => Some(v),
            Err(expected) => {
                self.fail(name, text, expected);
                None
            }
        }
    }
}

fn parse_from<T: FromStr>(expected: &'static str) -> impl Fn(&str) -> Result<T, String> {
    move |s| s.parse().map_err(|_| expected.to_string())
}

/// The longest duration accepted anywhere: beyond it, deadlines overflow clocks.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn parse_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d <= MAX_DURATION => Ok(d),
        Ok(_) => Err("expected a duration of at most 365 days".into()),
        Err(_) => Err("expected a duration such as 500ms, 10s or 5m".into()),
    }
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("expected a duration greater than zero".into()),
        d => Ok(d),
    }
}

fn parse_overrides<T: FromStr>(
    expected: &'static str,
) -> impl Fn(&str) -> Result<BTreeMap<String, T>, String> {
    move |s| {
        let mut map = BTreeMap::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (service, value) = entry
                .split_once('=')
                .ok_or_else(|| format!("expected SERVICE=VALUE,... with VALUE {expected}"))?;
            let value = value
                .trim()
                .parse()
                .map_err(|_| format!("{:?}: expected {expected}", value.trim()))?;
            if map.insert(service.trim().to_string(), value).is_some() {
                return Err(format!("service {:?} is listed twice", service.trim()));
            }
        }
        Ok(map)
    }
}

/// Parses the `BATON_HANDOFF_*` variables (all of them, so that mistakes show even
/// while handoff is off); `Some(None)` when handoff is off.
fn handoff_settings<S: Strings>(
    p: &mut Parser<'_, S>,
    on: bool,
    routes: Option<&Vec<(Match, String)>>,
) -> Option<Option<HandoffSettings>> {
    let names = p.var(BATON_HANDOFF_ROUTES, DEFAULT_HANDOFF_ROUTES, |s| {
        let names: Vec<Arc<str>> = s
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(Arc::from)
            .collect();
        Ok((!names.is_empty()).then_some(names))
    });
    if let (Some(Some(names)), Some(routes)) = (&names, routes) {
        for n in names
            .iter()
            .filter(|n| !routes.iter().any(|(_, s)| s == &***n))
        {
            let value = p.raw(BATON_HANDOFF_ROUTES).unwrap_or_default();
            p.fail(
                BATON_HANDOFF_ROUTES,
                &value,
                format!("service {n:?} is not routed by BATON_ROUTES"),
            );
        }
    }
    let min_bytes = p.var(BATON_HANDOFF_MIN_BYTES, DEFAULT_HANDOFF_MIN_BYTES, |s| {
        s.parse::<u64>()
            .ok()
            .filter(|n| *n <= 1 << 40)
            .ok_or_else(|| {
                "expected a byte count, e.g. 32768 (0: hand off every eligible request)".into()
            })
    });
    let timeout = p.var(
        BATON_HANDOFF_TIMEOUT,
        DEFAULT_HANDOFF_TIMEOUT,
        |s| match positive_duration(s)? {
            d if d > Duration::from_secs(10) => Err("expected at most 10s".into()),
            d => Ok(d),
        },
    );
    let interface = p.raw(BATON_HANDOFF_INTERFACE).map(|s| s.trim().to_string());
    if let Some(i) = &interface {
        if i.len() > 15 || i.contains(['/', '"', ' ']) {
            p.fail(
                BATON_HANDOFF_INTERFACE,
                i,
                "expected an interface name such as eth0",
            );
        }
    }
    let addr = p.var(
        BATON_HANDOFF_ADDR,
        DEFAULT_HANDOFF_ADDR,
        parse_from::<SocketAddr>("expected IP:PORT, e.g. 0.0.0.0:15010"),
    );
    let port = p.var(BATON_HANDOFF_PORT, DEFAULT_HANDOFF_PORT, |s| {
        s.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| "expected a port from 1 to 65535".into())
    });
    let fe_cidrs = p.var(BATON_HANDOFF_FE_CIDRS, DEFAULT_HANDOFF_FE_CIDRS, |s| {
        let nets = s
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| {
                n.parse::<Ipv4Net>().map(|n| n.trunc()).map_err(|_| {
                    format!("{n:?}: expected IPv4 CIDRs such as 10.0.0.0/8,192.168.1.0/24")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((!nets.is_empty()).then_some(nets))
    });
    let flow_ttl =
        p.var(
            BATON_HANDOFF_FLOW_TTL,
            DEFAULT_HANDOFF_FLOW_TTL,
            |s| match positive_duration(s)? {
                d if d < Duration::from_secs(1) => Err("expected at least 1s".into()),
                d if d > Duration::from_secs(7 * 24 * 3600) => {
                    Err("expected at most 7 days".into())
                }
                d => Ok(d),
            },
        );
    let app_addr = p.var(
        BATON_APP_ADDR,
        DEFAULT_APP_ADDR,
        parse_from::<SocketAddr>("expected IP:PORT, e.g. 127.0.0.1:8080"),
    );
    let app_pass = p.var(BATON_APP_PASS, DEFAULT_APP_PASS, |s| {
        if s.is_empty() {
            Ok(None)
        } else if s.len() >= 108 {
            // sun_path holds 108 bytes with the terminating NUL.
            Err("expected a Unix socket path shorter than 108 bytes".into())
        } else if !s.starts_with('/') {
            Err("expected an absolute path to a Unix socket, e.g. /run/baton/app.sock".into())
        } else {
            Ok(Some(PathBuf::from(s)))
        }
    });
    let key_file = p
        .raw(BATON_HANDOFF_KEY_FILE)
        .map(|s| PathBuf::from(s.trim()));
    if !on {
        return Some(None);
    }
    let key = match &key_file {
        None => {
            p.fail(
                BATON_HANDOFF_KEY_FILE,
                "",
                "required when BATON_HANDOFF=on: a file holding the fleet's key (at least 32 bytes, e.g. from `head -c 32 /dev/urandom | base64`)",
            );
            None
        }
        Some(path) => match std::fs::read(path) {
            Err(e) => {
                p.fail(
                    BATON_HANDOFF_KEY_FILE,
                    &path.display().to_string(),
                    format!("cannot read the key file: {e}"),
                );
                None
            }
            Ok(bytes) => match Key::new(bytes.trim_ascii()) {
                Ok(k) => Some(k),
                Err(e) => {
                    p.fail(BATON_HANDOFF_KEY_FILE, &path.display().to_string(), e);
                    None
                }
            },
        },
    };
    Some(Some(HandoffSettings {
        routes: names?,
        min_bytes: min_bytes?,
        timeout: timeout?,
        interface,
        addr: addr?,
        port: port?,
        key_file: key_file?,
        key: key?,
        fe_cidrs: fe_cidrs?,
        flow_ttl: flow_ttl?,
        app_addr: app_addr?,
        app_pass: app_pass?,
    }))
}

/// What `baton init` captures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    /// baton's inbound listener (where captured connections go).
    pub inbound: SocketAddr,
    /// Captured ports (`None`: all).
    pub ports: Option<Vec<u16>>,
    /// Ports never captured: the configured ones plus baton's own (inbound, admin,
    /// handoff receiver), sorted.
    pub exclude: Vec<u16>,
    /// What happens to a new connection on a captured port while no baton listens.
    pub fail: CaptureFail,
}

/// What the capture does with a new connection while baton is not listening
/// (`BATON_CAPTURE_FAIL`): between a sidecar's crash or restart and its listener
/// coming back, the `tproxy` rule finds no socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureFail {
    /// Drop the connection's SYN: nothing reaches the app without baton, and the
    /// client's TCP retransmits the SYN (after 1 s, 3 s, ...), so a restart that comes
    /// back within the client's connect timeout costs it a delay, not an error.
    Closed,
    /// Let it through to the app directly, bypassing baton (no metrics, no
    /// `X-Forwarded-For`): availability over consistency.
    Open,
}

fn port_list(s: &str) -> Result<Vec<u16>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{p:?}: expected a comma-separated list of ports"))
        })
        .collect()
}

impl CaptureConfig {
    /// Parses what `baton init` needs (nothing else is required of its environment).
    pub fn from_strings(strings: &impl Strings) -> Result<Self, ConfigError> {
        let mut p = Parser {
            strings,
            errors: Vec::new(),
        };
        let addr = parse_from::<SocketAddr>("expected IP:PORT, e.g. 0.0.0.0:15006");
        let inbound = p.var(BATON_INBOUND_ADDR, DEFAULT_INBOUND_ADDR, &addr);
        let admin = p.var(BATON_ADMIN_ADDR, DEFAULT_ADMIN_ADDR, &addr);
        let handoff = p.var(BATON_HANDOFF_ADDR, DEFAULT_HANDOFF_ADDR, &addr);
        let ports = p.var(BATON_CAPTURE_PORTS, DEFAULT_CAPTURE_PORTS, port_list);
        let exclude = p.var(
            BATON_CAPTURE_EXCLUDE_PORTS,
            DEFAULT_CAPTURE_EXCLUDE_PORTS,
            port_list,
        );
        let fail = p.var(BATON_CAPTURE_FAIL, DEFAULT_CAPTURE_FAIL, |s| match s {
            "closed" => Ok(CaptureFail::Closed),
            "open" => Ok(CaptureFail::Open),
            _ => Err("expected closed or open".into()),
        });
        if let Some(SocketAddr::V6(_)) = inbound {
            let value = p.raw(BATON_INBOUND_ADDR).unwrap_or_default();
            p.fail(
                BATON_INBOUND_ADDR,
                &value,
                "baton init captures IPv4 only: expected an IPv4 address",
            );
        }
        if !p.errors.is_empty() {
            return Err(ConfigError(p.errors));
        }
        let missing = || ConfigError(Vec::new());
        let (inbound, admin, handoff) = (
            inbound.ok_or_else(missing)?,
            admin.ok_or_else(missing)?,
            handoff.ok_or_else(missing)?,
        );
        let mut exclude = exclude.ok_or_else(missing)?;
        exclude.extend([inbound.port(), admin.port(), handoff.port()]);
        exclude.sort_unstable();
        exclude.dedup();
        let ports = ports.ok_or_else(missing)?;
        Ok(Self {
            inbound,
            ports: (!ports.is_empty()).then_some(ports),
            exclude,
            fail: fail.ok_or_else(missing)?,
        })
    }
}

/// Parses the `BATON_CONSUL_*` variables (always, so mistakes show even when unused).
fn consul_watch_settings<S: Strings>(
    p: &mut Parser<'_, S>,
) -> Option<(WatchSettings, Option<String>, Consistency)> {
    let wait = p.var(BATON_CONSUL_WAIT, DEFAULT_CONSUL_WAIT, |s| {
        match positive_duration(s)? {
            d if d < Duration::from_secs(1) => Err("expected at least 1s".into()),
            // Consul caps the wait at 10 minutes.
            d if d > Duration::from_secs(600) => {
                Err("expected at most 10m (Consul's limit)".into())
            }
            d => Ok(d),
        }
    });
    let datacenter = p.raw(BATON_CONSUL_DATACENTER).map(|s| s.trim().to_string());
    if let Some(dc) = &datacenter {
        if !dc
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            p.fail(
                BATON_CONSUL_DATACENTER,
                dc,
                "expected a datacenter name (letters, digits, - and _)",
            );
        }
    }
    let consistency = p.var(
        BATON_CONSUL_CONSISTENCY,
        DEFAULT_CONSUL_CONSISTENCY,
        parse_from::<Consistency>("expected default, stale or consistent"),
    );
    let rate = p.var(BATON_CONSUL_QUERY_RATE, DEFAULT_CONSUL_QUERY_RATE, |s| {
        s.parse::<f64>()
            .ok()
            .filter(|r| (0.01..=1000.0).contains(r))
            .ok_or_else(|| "expected queries per second from 0.01 to 1000".into())
    });
    let backoff_max =
        p.var(
            BATON_CONSUL_BACKOFF_MAX,
            DEFAULT_CONSUL_BACKOFF_MAX,
            |s| match positive_duration(s)? {
                d if d < Duration::from_millis(200) => Err("expected at least 200ms".into()),
                d => Ok(d),
            },
        );
    let watch = WatchSettings {
        wait: wait?,
        rate: rate?,
        backoff_max: backoff_max?,
        ..WatchSettings::default()
    };
    Some((watch, datacenter, consistency?))
}

/// Reads the consul CLI's `CONSUL_*` variables.
fn consul_client_settings<S: Strings>(p: &mut Parser<'_, S>) -> Option<ClientSettings> {
    let strings = p.strings;
    match consul::env::from_env(&|name| strings.get(name)) {
        Ok(c) => Some(c),
        Err(errors) => {
            for e in errors {
                p.fail(e.name, &e.value, e.expected);
            }
            None
        }
    }
}

/// Parses the `BATON_SERVICE_*` variables; `Some(None)` when no name is set.
fn registration_settings<S: Strings>(
    p: &mut Parser<'_, S>,
) -> Option<Option<RegistrationSettings>> {
    let name = p.raw(BATON_SERVICE_NAME).map(|s| s.trim().to_string());
    if let Some(n) = &name {
        if !valid_name(n) {
            p.fail(
                BATON_SERVICE_NAME,
                n,
                "expected a service name of letters, digits and dashes",
            );
        }
    }
    let port = match p.raw(BATON_SERVICE_PORT) {
        None if name.is_some() => {
            p.fail(
                BATON_SERVICE_PORT,
                "",
                "required with BATON_SERVICE_NAME: the port peers reach the service at",
            );
            None
        }
        None => Some(0),
        Some(v) => match v.trim().parse::<u16>().ok().filter(|p| *p != 0) {
            Some(port) => Some(port),
            None => {
                p.fail(BATON_SERVICE_PORT, &v, "expected a port from 1 to 65535");
                None
            }
        },
    };
    let address = match p.raw(BATON_SERVICE_ADDRESS) {
        Some(v) => match v.trim().parse::<IpAddr>() {
            Ok(ip) => Some(Some(ip)),
            Err(_) => {
                p.fail(BATON_SERVICE_ADDRESS, &v, "expected an IP address");
                None
            }
        },
        None => Some(None),
    };
    let id = p.raw(BATON_SERVICE_ID).map(|s| s.trim().to_string());
    if let Some(i) = &id {
        if i.contains(['/', '?', '#', ' ']) {
            p.fail(
                BATON_SERVICE_ID,
                i,
                "expected an ID without /, ?, # or spaces",
            );
        }
    }
    let tags = p.var(BATON_SERVICE_TAGS, DEFAULT_SERVICE_TAGS, |s| {
        Ok(s.split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(String::from)
            .collect::<Vec<_>>())
    });
    let meta = p.var(BATON_SERVICE_META, DEFAULT_SERVICE_META, parse_meta);
    let weight = p.var(BATON_SERVICE_WEIGHT, DEFAULT_SERVICE_WEIGHT, |s| {
        s.parse::<u32>()
            .ok()
            .filter(|w| (1..=65535).contains(w))
            .ok_or_else(|| "expected a weight from 1 to 65535".into())
    });
    let check_interval = p.var(
        BATON_SERVICE_CHECK_INTERVAL,
        DEFAULT_SERVICE_CHECK_INTERVAL,
        |s| match positive_duration(s)? {
            // Consul's minimum check interval.
            d if d < Duration::from_secs(1) => {
                Err("expected at least 1s (Consul's minimum)".into())
            }
            d => Ok(d),
        },
    );
    let check_timeout = p.var(
        BATON_SERVICE_CHECK_TIMEOUT,
        DEFAULT_SERVICE_CHECK_TIMEOUT,
        positive_duration,
    );
    let deregister_after = p.var(
        BATON_SERVICE_DEREGISTER_AFTER,
        DEFAULT_SERVICE_DEREGISTER_AFTER,
        |s| match positive_duration(s)? {
            // Consul raises anything shorter to one minute (its reaper runs every 30s).
            d if d < Duration::from_secs(60) => {
                Err("expected at least 1m (Consul's minimum)".into())
            }
            d => Ok(d),
        },
    );
    let deregister_delay = p.var(
        BATON_SERVICE_DEREGISTER_DELAY,
        DEFAULT_SERVICE_DEREGISTER_DELAY,
        |s| match parse_duration(s)? {
            d if d > Duration::from_secs(300) => Err("expected at most 5m".into()),
            d => Ok(d),
        },
    );
    let Some(name) = name else {
        return Some(None);
    };
    let address = match address? {
        Some(ip) => ip,
        None => match default_service_address(p.strings) {
            Ok(ip) => ip,
            Err(why) => {
                p.fail(
                    BATON_SERVICE_ADDRESS,
                    "",
                    format!("not set, and no default: {why}; set it (or POD_IP)"),
                );
                return None;
            }
        },
    };
    let id = match id {
        Some(id) => id,
        None => format!("{name}-{}", hostname()),
    };
    Some(Some(RegistrationSettings {
        name,
        id,
        address,
        port: port?,
        tags: tags?,
        meta: meta?,
        weight: weight?,
        check_interval: check_interval?,
        check_timeout: check_timeout?,
        deregister_after: deregister_after?,
        deregister_delay: deregister_delay?,
    }))
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 255
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// `key=value,...` service metadata, within Consul's limits.
fn parse_meta(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut meta = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?}: expected key=value,..."))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty()
            || k.len() > 128
            || !k
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "key {k:?}: expected at most 128 letters, digits, - and _"
            ));
        }
        if k.starts_with("consul-") || k.starts_with("baton-") {
            return Err(format!(
                "key {k:?}: the consul- and baton- prefixes are reserved"
            ));
        }
        if v.len() > 512 {
            return Err(format!("value of {k:?}: at most 512 characters"));
        }
        meta.insert(k.to_string(), v.to_string());
    }
    // Consul allows 64 pairs; baton adds two of its own.
    if meta.len() > 62 {
        return Err("at most 62 pairs".into());
    }
    Ok(meta)
}

/// The address to register when none is configured: `POD_IP` (Kubernetes' downward
/// API), else the first IPv4 address of the default route's interface.
fn default_service_address(strings: &impl Strings) -> Result<IpAddr, String> {
    if let Some(ip) = strings.get("POD_IP").filter(|s| !s.trim().is_empty()) {
        return ip
            .trim()
            .parse()
            .map_err(|_| format!("POD_IP={ip:?} is not an IP address"));
    }
    let interface = tables::default_interface()?;
    tables::interface_addrs(&interface)?
        .first()
        .map(|a| a.addr().into())
        .ok_or_else(|| format!("{interface} has no IPv4 address"))
}

/// This host's name (the pod name in Kubernetes).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Config {
    /// Parses and validates the configuration from `strings`.
    pub fn from_strings(strings: &impl Strings) -> Result<Self, ConfigError> {
        let mut p = Parser {
            strings,
            errors: Vec::new(),
        };
        let addr = parse_from::<SocketAddr>("expected IP:PORT, e.g. 0.0.0.0:15006");
        let inbound_addr = p.var(BATON_INBOUND_ADDR, DEFAULT_INBOUND_ADDR, &addr);
        let inbound_mode = p.var(BATON_INBOUND_MODE, DEFAULT_INBOUND_MODE, |s| match s {
            "plain" => Ok(InboundMode::Plain),
            "tproxy" => Ok(InboundMode::Tproxy),
            "redirect" => Ok(InboundMode::Redirect),
            _ => Err("expected plain, tproxy or redirect".into()),
        });
        let admin_addr = p.var(BATON_ADMIN_ADDR, DEFAULT_ADMIN_ADDR, &addr);
        let detect_timeout = p.var(
            BATON_DETECT_TIMEOUT,
            DEFAULT_DETECT_TIMEOUT,
            positive_duration,
        );
        let opaque_ports = p.var(BATON_OPAQUE_PORTS, DEFAULT_OPAQUE_PORTS, port_list);
        let max_header_bytes = p.var(BATON_MAX_HEADER_BYTES, DEFAULT_MAX_HEADER_BYTES, |s| {
            s.parse::<usize>()
                .ok()
                .filter(|n| (8192..=16 << 20).contains(n))
                .ok_or_else(|| "expected a byte count between 8192 and 16777216".into())
        });
        let header_read_timeout = p.var(
            BATON_HEADER_READ_TIMEOUT,
            DEFAULT_HEADER_READ_TIMEOUT,
            positive_duration,
        );
        let idle_park = p.var(BATON_IDLE_PARK, DEFAULT_IDLE_PARK, positive_duration);
        let routes = p.var(BATON_ROUTES, DEFAULT_ROUTES, |s| {
            route::parse(s).map_err(|e| format!("{e}; expected MATCH=SERVICE;... with MATCH path:/PREFIX, host:NAME, port:N or *"))
        });
        let discovery = p.var(BATON_DISCOVERY, DEFAULT_DISCOVERY, |s| match s {
            "static" => Ok(DiscoveryKind::Static),
            "consul" => Ok(DiscoveryKind::Consul),
            _ => Err("expected static or consul".into()),
        });
        let consul_watch = consul_watch_settings(&mut p);
        let registration = registration_settings(&mut p);
        let local_ip = p.var(BATON_LOCAL_IP, DEFAULT_LOCAL_IP, |s| {
            if s.is_empty() {
                return Ok(None);
            }
            s.parse::<IpAddr>()
                .map(Some)
                .map_err(|_| "expected an IP address, e.g. 127.0.0.1".to_string())
        });
        let static_services = p.var(BATON_STATIC_SERVICES, DEFAULT_STATIC_SERVICES, |s| {
            static_source::parse(s)
                .map_err(|e| format!("{e}; expected NAME=IP:PORT[@HANDOFF_PORT],...;NAME=..."))
        });
        if static_services
            .as_ref()
            .is_some_and(|s| s.contains_key(LOCAL))
        {
            let value = p.raw(BATON_STATIC_SERVICES).unwrap_or_default();
            p.fail(
                BATON_STATIC_SERVICES,
                &value,
                "\"local\" is the reserved route target for the local application; name the service otherwise",
            );
        }
        let static_file = p.raw(BATON_STATIC_FILE).map(PathBuf::from);
        let static_file_services = match &static_file {
            None => ServiceMap::new(),
            Some(path) => match std::fs::read_to_string(path) {
                Err(e) => {
                    p.fail(
                        BATON_STATIC_FILE,
                        &path.display().to_string(),
                        format!("cannot read the file: {e}"),
                    );
                    ServiceMap::new()
                }
                Ok(text) => static_source::parse(&text).unwrap_or_else(|e| {
                    p.fail(
                        BATON_STATIC_FILE,
                        &path.display().to_string(),
                        format!("bad content: {e}"),
                    );
                    ServiceMap::new()
                }),
            },
        };
        let lb = p.var(
            BATON_LB,
            DEFAULT_LB,
            parse_from::<Lb>("expected p2c, rr or hash"),
        );
        let lb_overrides = p.var(
            BATON_LB_OVERRIDES,
            DEFAULT_LB_OVERRIDES,
            parse_overrides::<Lb>("p2c, rr or hash"),
        );
        let hash_key = p.var(
            BATON_HASH_KEY,
            DEFAULT_HASH_KEY,
            parse_from::<HttpHashKey>("expected path or header:NAME"),
        );
        let upstream = p.var(
            BATON_UPSTREAM_PROTOCOL,
            DEFAULT_UPSTREAM_PROTOCOL,
            parse_from::<UpstreamProtocol>("expected auto, http1 or http2"),
        );
        let upstream_overrides = p.var(
            BATON_UPSTREAM_PROTOCOL_OVERRIDES,
            DEFAULT_UPSTREAM_PROTOCOL_OVERRIDES,
            parse_overrides::<UpstreamProtocol>("auto, http1 or http2"),
        );
        let connect_timeout = p.var(
            BATON_CONNECT_TIMEOUT,
            DEFAULT_CONNECT_TIMEOUT,
            positive_duration,
        );
        let tcp_keepalive = p.var(BATON_TCP_KEEPALIVE, DEFAULT_TCP_KEEPALIVE, parse_duration);
        let request_timeout = p.var(
            BATON_REQUEST_TIMEOUT,
            DEFAULT_REQUEST_TIMEOUT,
            positive_duration,
        );
        let retries = p.var(BATON_RETRIES, DEFAULT_RETRIES, |s| {
            s.parse::<usize>()
                .ok()
                .filter(|n| *n <= 10)
                .ok_or_else(|| "expected a number from 0 to 10".into())
        });
        let max_in_flight = p.var(BATON_MAX_IN_FLIGHT, DEFAULT_MAX_IN_FLIGHT, |s| {
            s.parse::<usize>()
                .ok()
                .filter(|n| (1..=100_000_000).contains(n))
                .ok_or_else(|| "expected a number from 1 to 100000000".to_string())
        });
        let pool_idle_timeout = p.var(
            BATON_POOL_IDLE_TIMEOUT,
            DEFAULT_POOL_IDLE_TIMEOUT,
            positive_duration,
        );
        let pool_max_idle = p.var(BATON_POOL_MAX_IDLE, DEFAULT_POOL_MAX_IDLE, |s| {
            s.parse::<usize>()
                .ok()
                .filter(|n| *n <= 100_000)
                .ok_or_else(|| "expected an integer from 0 to 100000".to_string())
        });
        let ewma_default_rtt = p.var(
            BATON_EWMA_DEFAULT_RTT,
            DEFAULT_EWMA_DEFAULT_RTT,
            positive_duration,
        );
        let ewma_decay = p.var(BATON_EWMA_DECAY, DEFAULT_EWMA_DECAY, positive_duration);
        let eject_failures = p.var(BATON_EJECT_FAILURES, DEFAULT_EJECT_FAILURES, |s| {
            s.parse::<u32>()
                .ok()
                .filter(|n| *n <= 1000)
                .ok_or_else(|| "expected a number of failures from 0 (never eject) to 1000".into())
        });
        let eject_time = p.var(BATON_EJECT_TIME, DEFAULT_EJECT_TIME, positive_duration);
        let eject_time_max = p.var(
            BATON_EJECT_TIME_MAX,
            DEFAULT_EJECT_TIME_MAX,
            positive_duration,
        );
        if let (Some(t), Some(max)) = (eject_time, eject_time_max) {
            if max < t {
                let value = p.raw(BATON_EJECT_TIME_MAX).unwrap_or_default();
                p.fail(
                    BATON_EJECT_TIME_MAX,
                    &value,
                    "expected a duration no shorter than BATON_EJECT_TIME",
                );
            }
        }
        let service_idle_timeout = p.var(
            BATON_SERVICE_IDLE_TIMEOUT,
            DEFAULT_SERVICE_IDLE_TIMEOUT,
            |s| match parse_duration(s)? {
                d if d < Duration::from_secs(1) => Err("expected at least 1s".to_string()),
                d => Ok(d),
            },
        );
        let log = p.var(BATON_LOG, DEFAULT_LOG, |s| {
            tracing_subscriber::EnvFilter::try_new(s)
                .map(|_| s.to_string())
                .map_err(|e| {
                    format!("expected a tracing filter such as info or baton=debug,info ({e})")
                })
        });
        let log_format = p.var(BATON_LOG_FORMAT, DEFAULT_LOG_FORMAT, |s| match s {
            "plain" => Ok(LogFormat::Plain),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected plain or json".into()),
        });
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = p.var(BATON_WORKERS, &cores.to_string(), |s| {
            s.parse::<usize>()
                .ok()
                .filter(|n| (1..=1024).contains(n))
                .ok_or_else(|| "expected a number of threads from 1 to 1024".into())
        });
        let shutdown_grace = p.var(BATON_SHUTDOWN_GRACE, DEFAULT_SHUTDOWN_GRACE, parse_duration);
        let handoff_on = p.var(BATON_HANDOFF, DEFAULT_HANDOFF, |s| match s {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err("expected off or on".into()),
        });
        let handoff = handoff_settings(&mut p, handoff_on.unwrap_or(false), routes.as_ref());
        let consul = match (discovery, &registration) {
            (Some(DiscoveryKind::Consul), _) | (_, Some(Some(_))) => consul_client_settings(&mut p)
                .zip(consul_watch)
                .map(|(mut client, (watch, datacenter, consistency))| {
                    client.datacenter = datacenter;
                    client.consistency = consistency;
                    Some(ConsulSettings { client, watch })
                }),
            _ => Some(None),
        };

        // Cross-variable checks, only when the parts themselves parsed.
        let mut route_configs = Vec::new();
        if let (Some(routes), Some(lb), Some(lbo), Some(up), Some(upo)) =
            (&routes, lb, &lb_overrides, upstream, &upstream_overrides)
        {
            let routed = |name: &str| routes.iter().any(|(_, s)| s == name);
            for service in lbo.keys().filter(|s| !routed(s)) {
                let value = p.raw(BATON_LB_OVERRIDES).unwrap_or_default();
                p.fail(
                    BATON_LB_OVERRIDES,
                    &value,
                    format!("service {service:?} is not routed by BATON_ROUTES"),
                );
            }
            for service in upo.keys().filter(|s| !routed(s)) {
                let value = p.raw(BATON_UPSTREAM_PROTOCOL_OVERRIDES).unwrap_or_default();
                p.fail(
                    BATON_UPSTREAM_PROTOCOL_OVERRIDES,
                    &value,
                    format!("service {service:?} is not routed by BATON_ROUTES"),
                );
            }
            let mut names: HashMap<&str, Arc<str>> = HashMap::new();
            for (matches, service) in routes {
                let name = names
                    .entry(service)
                    .or_insert_with(|| service.as_str().into())
                    .clone();
                route_configs.push(RouteConfig {
                    matches: matches.clone(),
                    logical: Logical {
                        service: name,
                        protocol: Protocol::Http,
                        lb: lbo.get(service).copied().unwrap_or(lb),
                        upstream: upo.get(service).copied().unwrap_or(up),
                        dst: None,
                    },
                });
            }
        }
        if let (Some(InboundMode::Plain), Some(routes)) = (inbound_mode, &routes) {
            if routes.iter().any(|(_, s)| s == LOCAL) {
                let value = p.raw(BATON_ROUTES).unwrap_or_default();
                p.fail(
                    BATON_ROUTES,
                    &value,
                    "the route target local needs BATON_INBOUND_MODE=tproxy or redirect (in plain mode every original destination is baton's own listener)",
                );
            }
        }
        if let (Some(DiscoveryKind::Static), Some(routes), Some(services)) =
            (discovery, &routes, &static_services)
        {
            let mut missing: Vec<&str> = routes
                .iter()
                .map(|(_, s)| s.as_str())
                .filter(|s| *s != LOCAL)
                .filter(|s| !services.contains_key(*s) && !static_file_services.contains_key(*s))
                .collect();
            missing.dedup();
            if !missing.is_empty() {
                let value = p.raw(BATON_ROUTES).unwrap_or_default();
                p.fail(
                    BATON_ROUTES,
                    &value,
                    format!(
                        "routes to {} not defined by BATON_STATIC_SERVICES or BATON_STATIC_FILE (define it, with no endpoints if need be: NAME=)",
                        missing.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ")
                    ),
                );
            }
        }

        if !p.errors.is_empty() {
            return Err(ConfigError(p.errors));
        }
        // Every `None` above recorded an error, so all are `Some` here.
        let missing = || ConfigError(Vec::new());
        Ok(Config {
            inbound_addr: inbound_addr.ok_or_else(missing)?,
            inbound_mode: inbound_mode.ok_or_else(missing)?,
            admin_addr: admin_addr.ok_or_else(missing)?,
            detect_timeout: detect_timeout.ok_or_else(missing)?,
            opaque_ports: opaque_ports.ok_or_else(missing)?,
            max_header_bytes: max_header_bytes.ok_or_else(missing)?,
            header_read_timeout: header_read_timeout.ok_or_else(missing)?,
            idle_park: idle_park.ok_or_else(missing)?,
            routes: route_configs,
            discovery: discovery.ok_or_else(missing)?,
            local_ip: local_ip.ok_or_else(missing)?,
            static_services: static_services.ok_or_else(missing)?,
            static_file,
            static_file_services,
            hash_key: hash_key.ok_or_else(missing)?,
            connect_timeout: connect_timeout.ok_or_else(missing)?,
            tcp_keepalive: tcp_keepalive.ok_or_else(missing)?,
            request_timeout: request_timeout.ok_or_else(missing)?,
            retries: retries.ok_or_else(missing)?,
            max_in_flight: max_in_flight.ok_or_else(missing)?,
            pool_idle_timeout: pool_idle_timeout.ok_or_else(missing)?,
            pool_max_idle: pool_max_idle.ok_or_else(missing)?,
            ewma_default_rtt: ewma_default_rtt.ok_or_else(missing)?,
            ewma_decay: ewma_decay.ok_or_else(missing)?,
            eject_failures: eject_failures.ok_or_else(missing)?,
            eject_time: eject_time.ok_or_else(missing)?,
            eject_time_max: eject_time_max.ok_or_else(missing)?,
            service_idle_timeout: service_idle_timeout.ok_or_else(missing)?,
            log: log.ok_or_else(missing)?,
            log_format: log_format.ok_or_else(missing)?,
            workers: workers.ok_or_else(missing)?,
            shutdown_grace: shutdown_grace.ok_or_else(missing)?,
            handoff: handoff.ok_or_else(missing)?,
            consul: consul.ok_or_else(missing)?,
            registration: registration.ok_or_else(missing)?,
        })
    }

    /// The distinct logical services the routes select, that discovery provides (the
    /// reserved target `local` needs none).
    pub fn routed_services(&self) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> = self
            .routes
            .iter()
            .filter(|r| !r.logical.is_local())
            .map(|r| r.logical.service.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The effective configuration as JSON (served at `/config`). Secrets are never
    /// in it: the handoff key is skipped, the Consul token redacted.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<&str, &str> = vars.iter().copied().collect();
        Config::from_strings(&map)
    }

    #[test]
    fn defaults_parse() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.inbound_addr, DEFAULT_INBOUND_ADDR.parse().unwrap());
        assert_eq!(c.inbound_mode, InboundMode::Plain);
        assert_eq!(c.detect_timeout, Duration::from_secs(10));
        assert_eq!(c.tcp_keepalive, Duration::from_secs(60));
        assert_eq!(c.retries, 2);
        assert!(c.routes.is_empty());
        assert!(c.workers >= 1);
    }

    #[test]
    fn routes_carry_per_service_settings() {
        let c = parse(&[
            (BATON_ROUTES, "path:/objects=objects;*=web"),
            (BATON_STATIC_SERVICES, "web=127.0.0.1:1;objects=127.0.0.1:2"),
            (BATON_LB, "rr"),
            (BATON_LB_OVERRIDES, "objects=hash"),
            (BATON_UPSTREAM_PROTOCOL_OVERRIDES, "web=http2"),
        ])
        .unwrap();
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.routes[0].logical.lb, Lb::Hash);
        assert_eq!(c.routes[1].logical.lb, Lb::Rr);
        assert_eq!(c.routes[1].logical.upstream, UpstreamProtocol::Http2);
        assert_eq!(c.routed_services().len(), 2);
        let json = c.to_json();
        assert_eq!(json["routes"][0]["match"], "path:/objects");
        assert_eq!(json["request_timeout"], "30s");
    }

    #[test]
    fn every_bad_variable_is_reported_by_name() {
        let err = parse(&[
            (BATON_INBOUND_ADDR, "nonsense"),
            (BATON_LB, "random"),
            (BATON_DETECT_TIMEOUT, "5"),
            (BATON_WORKERS, "0"),
            (BATON_ROUTES, "bogus"),
        ])
        .unwrap_err();
        let names: Vec<_> = err.0.iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            [
                BATON_INBOUND_ADDR,
                BATON_DETECT_TIMEOUT,
                BATON_ROUTES,
                BATON_LB,
                BATON_WORKERS
            ]
        );
        let text = err.to_string();
        assert!(
            text.contains("BATON_LB=\"random\": expected p2c, rr or hash"),
            "{text}"
        );
        assert!(
            text.contains("BATON_INBOUND_ADDR=\"nonsense\": expected IP:PORT"),
            "{text}"
        );
    }

    #[test]
    fn tcp_keepalive_takes_a_duration_or_zero_for_off() {
        let c = parse(&[(BATON_TCP_KEEPALIVE, "15s")]).unwrap();
        assert_eq!(c.tcp_keepalive, Duration::from_secs(15));
        let c = parse(&[(BATON_TCP_KEEPALIVE, "0")]).unwrap();
        assert!(c.tcp_keepalive.is_zero());
        let err = parse(&[(BATON_TCP_KEEPALIVE, "often")]).unwrap_err();
        assert_eq!(err.0[0].name, BATON_TCP_KEEPALIVE);
    }

    #[test]
    fn routes_to_undefined_services_are_rejected() {
        let err = parse(&[(BATON_ROUTES, "*=web")]).unwrap_err();
        assert_eq!(err.0[0].name, BATON_ROUTES);
        assert!(err.0[0].expected.contains("\"web\""));
        let err = parse(&[
            (BATON_ROUTES, "*=web"),
            (BATON_STATIC_SERVICES, "web="),
            (BATON_LB_OVERRIDES, "other=rr"),
        ])
        .unwrap_err();
        assert_eq!(err.0[0].name, BATON_LB_OVERRIDES);
    }

    #[test]
    fn handoff_settings_parse_and_cross_check() {
        let key = std::env::temp_dir().join(format!("baton-key-{}", std::process::id()));
        std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
        let key_path = key.to_str().unwrap();
        let base = [
            (BATON_ROUTES, "*=objects"),
            (BATON_STATIC_SERVICES, "objects=10.0.0.5:80@15011"),
            (BATON_HANDOFF, "on"),
            (BATON_HANDOFF_KEY_FILE, key_path),
        ];
        let c = parse(&base).unwrap();
        let h = c.handoff.as_ref().expect("handoff on");
        assert_eq!(h.timeout, Duration::from_millis(50));
        assert_eq!(h.port, 15010);
        assert!(h.routes.is_none() && h.fe_cidrs.is_none() && h.interface.is_none());
        assert!(
            h.app_pass.is_none(),
            "moved connections are relayed by default"
        );
        let json = c.to_json();
        assert_eq!(json["handoff"]["key_file"], key_path);
        assert!(
            json["handoff"].get("key").is_none(),
            "the key is never shown"
        );

        let mut bad = base.to_vec();
        bad.extend([
            (BATON_HANDOFF_ROUTES, "objects,media"),
            (BATON_HANDOFF_TIMEOUT, "1m"),
            (BATON_HANDOFF_INTERFACE, "eth0\"; flush"),
            (BATON_APP_PASS, "run/app.sock"),
        ]);
        let err = parse(&bad).unwrap_err();
        let names: Vec<_> = err.0.iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            [
                BATON_HANDOFF_ROUTES,
                BATON_HANDOFF_TIMEOUT,
                BATON_HANDOFF_INTERFACE,
                BATON_APP_PASS
            ]
        );
        assert!(err.to_string().contains("absolute path"));
        let mut pass = base.to_vec();
        pass.push((BATON_APP_PASS, "/run/baton/app.sock"));
        let c = parse(&pass).unwrap();
        assert_eq!(
            c.handoff.unwrap().app_pass.as_deref(),
            Some(std::path::Path::new("/run/baton/app.sock"))
        );
        let long = format!("/{}", "x".repeat(120));
        let mut pass = base.to_vec();
        pass.push((BATON_APP_PASS, &long));
        assert!(parse(&pass).unwrap_err().to_string().contains("108 bytes"));
        assert!(err.to_string().contains("\"media\" is not routed"));
        // Off: nothing is required, but bad values are still reported.
        assert!(parse(&[]).unwrap().handoff.is_none());
        assert!(parse(&[(BATON_HANDOFF_PORT, "0")]).is_err());
        let _ = std::fs::remove_file(&key);
    }

    #[test]
    fn readme_documents_every_variable_with_its_default() {
        let readme = include_str!("../README.md");
        for (name, default) in ALL {
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{name}` |")))
                .unwrap_or_else(|| panic!("README has no row for {name}"));
            if !default.is_empty() {
                assert!(
                    row.contains(&format!("| `{default}` |")),
                    "README row for {name} lacks its default {default:?}"
                );
            }
        }
    }

    #[test]
    fn values_that_would_break_at_runtime_are_refused() {
        let err = parse(&[
            (BATON_IDLE_PARK, "300000000000y"),
            (BATON_MAX_IN_FLIGHT, "18446744073709551615"),
            (BATON_SERVICE_IDLE_TIMEOUT, "500ms"),
        ])
        .unwrap_err();
        let names: Vec<_> = err.0.iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            [
                BATON_IDLE_PARK,
                BATON_MAX_IN_FLIGHT,
                BATON_SERVICE_IDLE_TIMEOUT
            ]
        );
    }

    #[test]
    fn consul_discovery_and_registration() {
        // Routed services need no static definition with Consul.
        let c = parse(&[
            (BATON_ROUTES, "*=web"),
            (BATON_DISCOVERY, "consul"),
            ("CONSUL_HTTP_ADDR", "unix:///run/consul.sock"),
            ("CONSUL_HTTP_TOKEN", "s3cr3t"),
            (BATON_CONSUL_DATACENTER, "eu-west"),
            (BATON_CONSUL_CONSISTENCY, "stale"),
            (BATON_SERVICE_NAME, "web"),
            (BATON_SERVICE_PORT, "8080"),
            ("POD_IP", "10.1.2.3"),
            (BATON_SERVICE_META, "team=storage, tier=1"),
        ])
        .unwrap();
        let consul = c.consul.as_ref().expect("consul settings");
        assert_eq!(consul.client.datacenter.as_deref(), Some("eu-west"));
        assert_eq!(consul.client.consistency, Consistency::Stale);
        assert_eq!(consul.watch.wait, Duration::from_secs(300));
        let reg = c.registration.as_ref().expect("registration");
        assert_eq!(reg.address, "10.1.2.3".parse::<IpAddr>().unwrap());
        assert!(reg.id.starts_with("web-"));
        assert_eq!(reg.meta["tier"], "1");
        let json = c.to_json().to_string();
        assert!(!json.contains("s3cr3t"), "the token is never shown: {json}");
        assert!(json.contains("<redacted>"));
        // Static discovery needs no Consul unless registering.
        assert!(parse(&[]).unwrap().consul.is_none());
    }

    #[test]
    fn consul_mistakes_are_reported_by_name() {
        let err = parse(&[
            (BATON_DISCOVERY, "etcd"),
            (BATON_CONSUL_WAIT, "20m"),
            (BATON_SERVICE_NAME, "web"),
            (BATON_SERVICE_META, "consul-x=1"),
            ("POD_IP", "10.1.2.3"),
        ])
        .unwrap_err();
        let names: Vec<_> = err.0.iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            [
                BATON_DISCOVERY,
                BATON_CONSUL_WAIT,
                BATON_SERVICE_PORT,
                BATON_SERVICE_META
            ]
        );
        let err = parse(&[
            (BATON_ROUTES, "*=web"),
            (BATON_DISCOVERY, "consul"),
            ("CONSUL_HTTP_ADDR", "ftp://consul:8500"),
        ])
        .unwrap_err();
        assert_eq!(err.0[0].name, "CONSUL_HTTP_ADDR");
    }

    #[test]
    fn the_local_target_needs_a_capturing_listener_and_no_definition() {
        let err = parse(&[(BATON_ROUTES, "*=local")]).unwrap_err();
        assert_eq!(err.0[0].name, BATON_ROUTES);
        assert!(err.0[0].expected.contains("tproxy or redirect"));
        let c = parse(&[(BATON_ROUTES, "*=local"), (BATON_INBOUND_MODE, "tproxy")]).unwrap();
        assert!(c.routed_services().is_empty(), "local needs no discovery");
        assert!(c.local_ip.is_none());
        let err = parse(&[
            (BATON_ROUTES, "*=local"),
            (BATON_INBOUND_MODE, "redirect"),
            (BATON_STATIC_SERVICES, "local=127.0.0.1:1"),
        ])
        .unwrap_err();
        assert_eq!(err.0[0].name, BATON_STATIC_SERVICES);
    }

    #[test]
    fn empty_values_mean_default() {
        let c = parse(&[(BATON_LB, ""), (BATON_LOG, " ")]).unwrap();
        assert_eq!(c.log, "info");
    }
}
