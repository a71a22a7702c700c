//! Metrics: lock-free counters on the request path, Prometheus text on scrape.
//!
//! Handles ([`ServiceMetrics`], [`Counter`]) are created when a stack is built (the
//! registry's lock is taken then and on scrape, never per request) and recorded with
//! relaxed atomics. General-purpose metric crates keep label families behind a lock
//! and histograms behind a mutex, which is the cost this module exists to avoid.
//!
//! [`RequestMetricsLayer`] sits in each logical stack: it counts responses by status
//! and observes the time to response headers. [`Count`] counts calls (the balancer
//! choosing an endpoint).

use crate::{errors, Error};
use http::Response;
use pin_project_lite::pin_project;
use std::{
    collections::BTreeMap,
    fmt::Write,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    task::{ready, Context, Poll},
    time::{Duration, Instant},
};
use tower_layer::Layer;
use tower_service::Service;

/// A monotonically increasing count.
#[derive(Clone, Debug, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Adds one.
    pub fn incr(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Clone, Debug, Default)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    /// Adds one.
    pub fn incr(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    /// Subtracts one.
    pub fn decr(&self) {
        self.0.fetch_sub(1, Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }

    /// Increments now and decrements when the returned guard is dropped.
    pub fn track(&self) -> GaugeGuard {
        self.incr();
        GaugeGuard(self.clone())
    }
}

/// Decrements its gauge when dropped.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decr();
    }
}

/// Upper bounds (seconds) of the latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds (seconds) of the handoff latency buckets: microseconds matter there.
pub const HANDOFF_BUCKETS: [f64; 15] = [
    0.00005, 0.0001, 0.00015, 0.0002, 0.00025, 0.0003, 0.0004, 0.0005, 0.00075, 0.001, 0.002,
    0.005, 0.01, 0.025, 0.05,
];

/// A fixed-bucket histogram of durations.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts; the last is `+Inf`.
    buckets: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::with_bounds(&LATENCY_BUCKETS)
    }
}

impl Histogram {
    /// A histogram with these bucket upper bounds (seconds, ascending).
    pub fn with_bounds(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    /// Appends the exposition of this histogram as `name` with `labels` (which may be
    /// empty).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.buckets[self.bounds.len()].load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// A counter per label value of one label.
#[derive(Debug)]
pub struct Labeled {
    label: &'static str,
    values: &'static [&'static str],
    counters: Box<[Counter]>,
}

impl Labeled {
    /// Counters for each of `values` of `label`.
    pub fn new(label: &'static str, values: &'static [&'static str]) -> Self {
        Self {
            label,
            values,
            counters: values.iter().map(|_| Counter::default()).collect(),
        }
    }

    /// The counter of `value` (a value not declared counts as the last one; the
    /// declared lists are tested to cover every reason the code uses).
    pub fn get(&self, value: &str) -> &Counter {
        let i = self
            .values
            .iter()
            .position(|v| *v == value)
            .unwrap_or(self.values.len() - 1);
        &self.counters[i]
    }

    /// Appends the exposition as `name`.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "counter");
        for (v, c) in self.values.iter().zip(self.counters.iter()) {
            let _ = writeln!(out, "{name}{{{}=\"{v}\"}} {}", self.label, c.get());
        }
    }
}

/// Connection handoff, both roles.
#[derive(Debug)]
pub struct HandoffMetrics {
    /// 1 when handoff is on and the kernel allows it.
    pub enabled: Gauge,
    /// FE: eligible requests that started a handoff.
    pub attempts: Counter,
    /// FE: connections handed off.
    pub handed_off: Counter,
    /// FE: handoffs that fell back to proxying, by reason.
    pub fallbacks: Labeled,
    /// FE: eligible requests the size policy proxied, by reason.
    pub skipped: Labeled,
    /// FE: freeze to "go".
    pub latency: Histogram,
    /// FE: switched connections whose "go" could not be written (still the BE's).
    pub go_failed: Counter,
    /// FE: control connections opened to BEs.
    pub control_opened: Counter,
    /// BE: control connections accepted (from FEs, or carrying a BE's notices).
    pub control_connections: Counter,
    /// BE: offers received.
    pub offers: Counter,
    /// BE: messages refused, by reason.
    pub refused: Labeled,
    /// BE: restored connections that never got "go".
    pub aborted: Counter,
    /// BE: moved connections being served now.
    pub active: Gauge,
    /// BE: moved connections passed to the handoff-aware application.
    pub passed: Counter,
    /// BE: moved connections the handoff-aware application did not take (relayed).
    pub pass_fallbacks: Counter,
    /// BE: moved connections sent to the application but never confirmed (left to it).
    pub pass_in_doubt: Counter,
    /// "Closed" notices (BE sent, FE applied).
    pub closed_sent: Counter,
    /// FE: redirects removed on a BE's notice.
    pub closed_applied: Counter,
    /// FE: flows in a BE's notice with no redirect to that BE (left alone).
    pub notices_ignored: Counter,
}

/// Reasons a handoff falls back to proxying.
pub const FALLBACK_REASONS: &[&str] = &[
    "socket",
    "table",
    "unreachable",
    "refused",
    "timeout",
    "protocol",
    "disconnected",
];
/// Reasons a BE refuses a message.
pub const REFUSAL_REASONS: &[&str] = &[
    "malformed",
    "auth",
    "stale",
    "replay",
    "cidr",
    "restore",
    "table",
    "busy",
    "target",
    "app",
    "late",
    "source",
];

impl Default for HandoffMetrics {
    fn default() -> Self {
        Self {
            enabled: Gauge::default(),
            attempts: Counter::default(),
            handed_off: Counter::default(),
            fallbacks: Labeled::new("reason", FALLBACK_REASONS),
            skipped: Labeled::new("reason", crate::handoff::policy::SKIP_REASONS),
            latency: Histogram::with_bounds(&HANDOFF_BUCKETS),
            go_failed: Counter::default(),
            control_opened: Counter::default(),
            control_connections: Counter::default(),
            offers: Counter::default(),
            refused: Labeled::new("reason", REFUSAL_REASONS),
            aborted: Counter::default(),
            active: Gauge::default(),
            passed: Counter::default(),
            pass_fallbacks: Counter::default(),
            pass_in_doubt: Counter::default(),
            closed_sent: Counter::default(),
            closed_applied: Counter::default(),
            notices_ignored: Counter::default(),
        }
    }
}

impl HandoffMetrics {
    fn render(&self, out: &mut String) {
        gauge(
            out,
            "baton_handoff_enabled",
            "1 when connection handoff is on and permitted by the kernel, else 0.",
            self.enabled.get(),
        );
        counter(
            out,
            "baton_handoff_attempts_total",
            "Eligible requests whose connection baton tried to hand off.",
            self.attempts.get(),
        );
        counter(
            out,
            "baton_handoffs_total",
            "Connections handed off to a backend's baton.",
            self.handed_off.get(),
        );
        self.fallbacks.render(
            out,
            "baton_handoff_fallbacks_total",
            "Handoffs abandoned before the switch; the request was proxied.",
        );
        self.skipped.render(
            out,
            "baton_handoff_skipped_total",
            "Requests that could have been handed off but were proxied by the size policy (BATON_HANDOFF_MIN_BYTES): small = their responses are small, unknown = nothing measured yet, sample = expected large, proxied to measure again.",
        );
        header(
            out,
            "baton_handoff_duration_seconds",
            "Time from freezing the client's socket to \"go\".",
            "histogram",
        );
        self.latency
            .render(out, "baton_handoff_duration_seconds", "");
        counter(
            out,
            "baton_handoff_go_failed_total",
            "Connections switched to a backend whose \"go\" could not be sent; they stay the backend's, which drops them unless \"go\" arrived (the client then gets a reset).",
            self.go_failed.get(),
        );
        counter(
            out,
            "baton_handoff_control_opened_total",
            "Control connections this frontend opened to backends' batons (one is kept per backend and reused by every handoff to it).",
            self.control_opened.get(),
        );
        counter(
            out,
            "baton_handoff_control_connections_total",
            "Connections this baton's handoff receiver accepted: frontends' control connections and backends' notices.",
            self.control_connections.get(),
        );
        counter(
            out,
            "baton_handoff_offers_total",
            "Offers received from frontends.",
            self.offers.get(),
        );
        self.refused.render(
            out,
            "baton_handoff_refused_total",
            "Handoff messages refused, by reason.",
        );
        counter(
            out,
            "baton_handoff_aborted_total",
            "Restored connections dropped because \"go\" never came.",
            self.aborted.get(),
        );
        gauge(
            out,
            "baton_handoff_active_connections",
            "Moved connections this baton serves now.",
            self.active.get(),
        );
        counter(
            out,
            "baton_handoff_passed_total",
            "Moved connections passed to the handoff-aware application (BATON_APP_PASS), which serves them without this baton.",
            self.passed.get(),
        );
        counter(
            out,
            "baton_handoff_pass_fallbacks_total",
            "Moved connections the handoff-aware application did not take (not listening, refused, too slow); this baton relayed them to BATON_APP_ADDR.",
            self.pass_fallbacks.get(),
        );
        counter(
            out,
            "baton_handoff_pass_unconfirmed_total",
            "Moved connections sent to the handoff-aware application that it neither confirmed nor refused in time; left to it (relaying as well could answer the client twice).",
            self.pass_in_doubt.get(),
        );
        counter(
            out,
            "baton_handoff_closed_sent_total",
            "Notices sent to frontends that a moved connection is gone.",
            self.closed_sent.get(),
        );
        counter(
            out,
            "baton_handoff_closed_applied_total",
            "Redirects removed on a backend's notice.",
            self.closed_applied.get(),
        );
        counter(
            out,
            "baton_handoff_notices_ignored_total",
            "Flows in a backend's closed or alive notice that this frontend does not redirect to that backend; left alone.",
            self.notices_ignored.get(),
        );
    }
}

/// Per-service request metrics.
#[derive(Debug)]
pub struct ServiceMetrics {
    /// Responses by status code (100..=599).
    statuses: Box<[AtomicU64]>,
    latency: Histogram,
}

impl ServiceMetrics {
    fn new() -> Self {
        Self {
            statuses: (100..600).map(|_| AtomicU64::new(0)).collect(),
            latency: Histogram::default(),
        }
    }

    /// Records a response.
    pub fn record(&self, status: u16, latency: Duration) {
        if let Some(c) = self.statuses.get(usize::from(status).wrapping_sub(100)) {
            c.fetch_add(1, Relaxed);
        }
        self.latency.observe(latency);
    }

    /// Responses with `status` so far.
    pub fn count(&self, status: u16) -> u64 {
        self.statuses
            .get(usize::from(status).wrapping_sub(100))
            .map_or(0, |c| c.load(Relaxed))
    }
}

/// Process-wide gauges and counters that are not per service.
#[derive(Debug, Default)]
pub struct Global {
    /// Accepted connections still open.
    pub open_connections: Gauge,
    /// Connections by detected protocol.
    pub connections_http1: Counter,
    /// HTTP/2 connections.
    pub connections_http2: Counter,
    /// Opaque TCP connections.
    pub connections_opaque: Counter,
    /// Connections closed because detection timed out.
    pub detect_timeouts: Counter,
    /// Times an idle HTTP/1 connection was parked (its buffers released).
    pub idle_parks: Counter,
    /// Requests answered 400 by baton (malformed).
    pub bad_requests: Counter,
    /// Requests that matched no route (404).
    pub unrouted: Counter,
    /// Requests in flight (HTTP).
    pub in_flight: Gauge,
    /// Requests shed because `BATON_MAX_IN_FLIGHT` was reached.
    pub shed: Counter,
    /// Bytes copied client -> upstream on opaque connections.
    pub opaque_bytes_in: Counter,
    /// Bytes copied upstream -> client on opaque connections.
    pub opaque_bytes_out: Counter,
    /// Connection handoff.
    pub handoff: HandoffMetrics,
}

/// The metrics registry.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    global: Global,
    services: Mutex<BTreeMap<Arc<str>, Arc<ServiceMetrics>>>,
    choices: Mutex<BTreeMap<(Arc<str>, String), Counter>>,
    ejections: Mutex<BTreeMap<(Arc<str>, String), Counter>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Process-wide metrics.
    pub fn global(&self) -> &Global {
        &self.inner.global
    }

    /// The request metrics of `service` (created on first use, kept for the life of the
    /// process so counters survive a balancer being rebuilt).
    pub fn service(&self, service: &Arc<str>) -> Arc<ServiceMetrics> {
        lock(&self.inner.services)
            .entry(service.clone())
            .or_insert_with(|| Arc::new(ServiceMetrics::new()))
            .clone()
    }

    /// The counter of balancer choices of `endpoint` in `service`. It is reported while
    /// something holds it (the endpoint's stack).
    pub fn choices(&self, service: &Arc<str>, endpoint: String) -> Counter {
        lock(&self.inner.choices)
            .entry((service.clone(), endpoint))
            .or_default()
            .clone()
    }

    /// The counter of ejections of `endpoint` in `service` (see `eject`), reported
    /// while something holds it.
    pub fn ejections(&self, service: &Arc<str>, endpoint: String) -> Counter {
        lock(&self.inner.ejections)
            .entry((service.clone(), endpoint))
            .or_default()
            .clone()
    }

    /// Appends the Prometheus text exposition of everything registered here.
    pub fn render(&self, out: &mut String) {
        let g = &self.inner.global;
        gauge(
            out,
            "baton_open_connections",
            "Accepted connections currently open.",
            g.open_connections.get(),
        );
        header(
            out,
            "baton_connections_total",
            "Accepted connections by detected protocol.",
            "counter",
        );
        for (p, c) in [
            ("http1", &g.connections_http1),
            ("http2", &g.connections_http2),
            ("opaque", &g.connections_opaque),
        ] {
            let _ = writeln!(
                out,
                "baton_connections_total{{protocol=\"{p}\"}} {}",
                c.get()
            );
        }
        counter(
            out,
            "baton_detect_timeouts_total",
            "Connections closed because the client sent nothing to detect in time.",
            g.detect_timeouts.get(),
        );
        counter(
            out,
            "baton_idle_parks_total",
            "Times an idle HTTP/1 keep-alive connection released its buffers (BATON_IDLE_PARK).",
            g.idle_parks.get(),
        );
        counter(
            out,
            "baton_bad_requests_total",
            "Malformed requests answered 400.",
            g.bad_requests.get(),
        );
        counter(
            out,
            "baton_unrouted_requests_total",
            "Requests that matched no route (404).",
            g.unrouted.get(),
        );
        gauge(
            out,
            "baton_in_flight_requests",
            "HTTP requests in flight.",
            g.in_flight.get(),
        );
        counter(
            out,
            "baton_load_shed_total",
            "Requests refused with 503 because BATON_MAX_IN_FLIGHT was reached.",
            g.shed.get(),
        );
        header(
            out,
            "baton_opaque_bytes_total",
            "Bytes forwarded on opaque TCP connections.",
            "counter",
        );
        let _ = writeln!(
            out,
            "baton_opaque_bytes_total{{direction=\"to_upstream\"}} {}",
            g.opaque_bytes_in.get()
        );
        let _ = writeln!(
            out,
            "baton_opaque_bytes_total{{direction=\"to_client\"}} {}",
            g.opaque_bytes_out.get()
        );
        g.handoff.render(out);

        let services = lock(&self.inner.services).clone();
        header(
            out,
            "baton_requests_total",
            "HTTP responses by service and status (including baton's own).",
            "counter",
        );
        for (name, m) in &services {
            let name = escape(name);
            for (i, c) in m.statuses.iter().enumerate() {
                let n = c.load(Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "baton_requests_total{{service=\"{name}\",status=\"{}\"}} {n}",
                        i + 100
                    );
                }
            }
        }
        header(
            out,
            "baton_request_duration_seconds",
            "Time from request to response headers, by service.",
            "histogram",
        );
        for (name, m) in &services {
            m.latency.render(
                out,
                "baton_request_duration_seconds",
                &format!("service=\"{}\"", escape(name)),
            );
        }
        header(
            out,
            "baton_balancer_choices_total",
            "Times the balancer chose each endpoint.",
            "counter",
        );
        per_endpoint(out, &self.inner.choices, "baton_balancer_choices_total");
        header(
            out,
            "baton_endpoint_ejections_total",
            "Times each endpoint was taken out of its balancer after consecutive connect failures.",
            "counter",
        );
        per_endpoint(out, &self.inner.ejections, "baton_endpoint_ejections_total");
    }
}

/// Writes the samples of per-endpoint counters. An endpoint that left (no balancer
/// holds its counter any more) leaves the exposition too, so churn does not grow it
/// without bound.
fn per_endpoint(
    out: &mut String,
    counters: &Mutex<BTreeMap<(Arc<str>, String), Counter>>,
    name: &str,
) {
    let mut counters = lock(counters);
    counters.retain(|_, c| Arc::strong_count(&c.0) > 1);
    for ((service, endpoint), c) in counters.iter() {
        let _ = writeln!(
            out,
            "{name}{{service=\"{}\",endpoint=\"{}\"}} {}",
            escape(service),
            escape(endpoint),
            c.get()
        );
    }
}

/// Writes `# HELP` and `# TYPE` lines.
pub fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Writes an unlabelled counter.
pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, help, "counter");
    let _ = writeln!(out, "{name} {value}");
}

/// Writes an unlabelled gauge.
pub fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, help, "gauge");
    let _ = writeln!(out, "{name} {value}");
}

/// Escapes a Prometheus label value.
pub fn escape(v: &str) -> std::borrow::Cow<'_, str> {
    if v.contains(['\\', '"', '\n']) {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        v.into()
    }
}

/// Records each response's status and latency in a [`ServiceMetrics`].
#[derive(Clone, Debug)]
pub struct RequestMetrics<S> {
    inner: S,
    metrics: Arc<ServiceMetrics>,
}

/// Layer for [`RequestMetrics`].
#[derive(Clone, Debug)]
pub struct RequestMetricsLayer {
    metrics: Arc<ServiceMetrics>,
}

impl RequestMetricsLayer {
    /// Records into `metrics`.
    pub fn new(metrics: Arc<ServiceMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RequestMetricsLayer {
    type Service = RequestMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

impl<S, Req, B> Service<Req> for RequestMetrics<S>
where
    S: Service<Req, Response = Response<B>>,
    S::Error: Into<Error>,
{
    type Response = Response<B>;
    type Error = Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
            start: Instant::now(),
            metrics: self.metrics.clone(),
        }
    }
}

pin_project! {
    /// Response future of [`RequestMetrics`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        start: Instant,
        metrics: Arc<ServiceMetrics>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<Error>,
{
    type Output = Result<Response<B>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx)).map_err(Into::into);
        let status = match &result {
            Ok(rsp) => rsp.status().as_u16(),
            Err(e) => errors::status_for(&**e).0.as_u16(),
        };
        this.metrics.record(status, this.start.elapsed());
        Poll::Ready(result)
    }
}

/// Counts calls into a [`Counter`].
#[derive(Clone, Debug)]
pub struct Count<S> {
    inner: S,
    counter: Counter,
}

impl<S> Count<S> {
    /// Counts calls to `inner` in `counter`.
    pub fn new(inner: S, counter: Counter) -> Self {
        Self { inner, counter }
    }
}

impl<S: Service<Req>, Req> Service<Req> for Count<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> S::Future {
        self.counter.incr();
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, ServiceExt};

    #[tokio::test]
    async fn records_statuses_and_latency_and_renders_them() {
        let metrics = Metrics::new();
        let web = metrics.service(&"web".into());
        let svc = RequestMetricsLayer::new(web.clone()).layer(service_fn(|code: u16| async move {
            if code == 0 {
                return Err::<Response<()>, Error>(
                    crate::errors::NoEndpoints {
                        service: "web".into(),
                    }
                    .into(),
                );
            }
            let mut rsp = Response::new(());
            *rsp.status_mut() = http::StatusCode::from_u16(code).unwrap();
            Ok(rsp)
        }));
        svc.clone().oneshot(200).await.unwrap();
        svc.clone().oneshot(200).await.unwrap();
        svc.clone().oneshot(404).await.unwrap();
        svc.oneshot(0).await.unwrap_err();
        assert_eq!(web.count(200), 2);
        assert_eq!(
            web.count(503),
            1,
            "errors are counted with the status they map to"
        );
        let c = metrics.choices(&"web".into(), "10.0.0.1:80".into());
        Count::new(service_fn(|()| async { Ok::<_, Error>(()) }), c.clone())
            .oneshot(())
            .await
            .unwrap();

        let mut out = String::new();
        metrics.render(&mut out);
        assert!(
            out.contains("baton_requests_total{service=\"web\",status=\"200\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("baton_requests_total{service=\"web\",status=\"404\"} 1\n"));
        assert!(out.contains("baton_request_duration_seconds_count{service=\"web\"} 4\n"));
        assert!(
            out.contains("baton_request_duration_seconds_bucket{service=\"web\",le=\"+Inf\"} 4\n")
        );
        assert!(out.contains(
            "baton_balancer_choices_total{service=\"web\",endpoint=\"10.0.0.1:80\"} 1\n"
        ));
        drop(c);
        let mut out = String::new();
        metrics.render(&mut out);
        assert!(
            !out.contains("endpoint=\"10.0.0.1:80\""),
            "a departed endpoint is forgotten"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.0005\"} 1\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.005\"} 2\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"10\"} 2\n"));
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"));
        assert_eq!(escape("a\"b"), "a\\\"b");
    }
}
