//! Consul benchmark (not a timed test): how fast a registration reaches baton's
//! balancer, and how much load an idle baton puts on Consul.
//!
//! `cargo bench --bench consul` runs against the test suite's Consul API server, or
//! against a real agent when `CONSUL_HTTP_ADDR` is set. It prints a Markdown section
//! for `benches/RESULTS.md`:
//!
//! - propagation: for each of `BENCH_CHANGES` (100) new instances, the time from the
//!   registration call returning to the first request baton routes to the instance,
//!   measured by a client sending requests back to back through baton (round-robin
//!   over a stable instance and the new one); p50/p99/max. Twice: with changes paced
//!   `BENCH_PACE_MS` (300) apart, under the watch's rate limit, which is the latency a
//!   change sees; and back to back (each change right after the previous one was seen),
//!   which shows what the token bucket (`BATON_CONSUL_QUERY_RATE`) costs a burst;
//! - idle load: Consul requests per minute per watched service over `BENCH_IDLE_SECS`
//!   (60) with nothing changing, counted at a relay in front of Consul, and how many of
//!   them were blocking queries. `BENCH_WAIT` sets `BATON_CONSUL_WAIT` (default 5m).

#[path = "../tests/support/mod.rs"]
mod support;

use serde_json::json;
use std::time::{Duration, Instant};
use support::{
    consul::{unique_name, ConsulRelay, ConsulUnderTest},
    try_get, upstream_of, Baton, Behaviour, Upstream,
};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let changes = env_num("BENCH_CHANGES", 100) as usize;
    let idle = Duration::from_secs(env_num("BENCH_IDLE_SECS", 60));
    let pace = Duration::from_millis(env_num("BENCH_PACE_MS", 300));
    let wait = std::env::var("BENCH_WAIT").unwrap_or_else(|_| "5m".into());
    let consul = ConsulUnderTest::start().await;
    let api = consul.api();
    let relay = ConsulRelay::start(&consul.agent_url).await;
    let service = unique_name("bench");
    let url = relay.url();
    let routes = format!("*={service}");
    let own = unique_name("bench-self");
    let inbound = support::free_addr();
    let inbound_text = inbound.to_string();
    let port_text = inbound.port().to_string();
    let mut env = vec![
        ("BATON_INBOUND_ADDR", inbound_text.as_str()),
        ("BATON_ROUTES", routes.as_str()),
        ("BATON_DISCOVERY", "consul"),
        ("BATON_LB", "rr"),
        ("BATON_LOG", "warn"),
        ("CONSUL_HTTP_ADDR", url.as_str()),
        ("BATON_SERVICE_NAME", own.as_str()),
        ("BATON_SERVICE_PORT", port_text.as_str()),
        ("BATON_SERVICE_ADDRESS", "127.0.0.1"),
        ("BATON_CONSUL_WAIT", wait.as_str()),
    ];
    if let Some(t) = &consul.token {
        env.push(("CONSUL_HTTP_TOKEN", t.as_str()));
    }
    let stable = Upstream::start(leak(unique_name("stable")), Behaviour::default()).await;
    let register = |up: &Upstream| {
        json!({
            "ID": up.name, "Name": service, "Address": "127.0.0.1", "Port": up.addr.port(),
            "Check": {"TTL": "10m", "Status": "passing"},
        })
    };
    api.register(register(&stable)).await;
    let baton = Baton::start(&env).await;

    let mut ups = Vec::with_capacity(changes);
    for i in 0..changes {
        ups.push(Upstream::start(leak(format!("{service}-new-{i}")), Behaviour::default()).await);
    }
    let mut runs = Vec::new();
    for paced in [Some(pace), None] {
        let mut latencies = Vec::with_capacity(changes);
        for up in &ups {
            if let Some(pace) = paced {
                tokio::time::sleep(pace).await;
            }
            let body = register(up);
            api.register(body).await;
            let registered = Instant::now();
            loop {
                if let Ok(got) = try_get(baton.addr, "/", &[]).await {
                    if upstream_of(&got) == up.name {
                        break;
                    }
                }
                assert!(
                    registered.elapsed() < Duration::from_secs(30),
                    "instance never routed; log:\n{}",
                    baton.log()
                );
            }
            latencies.push(registered.elapsed());
            api.deregister(up.name).await;
        }
        latencies.sort();
        runs.push((paced, latencies));
    }

    // Idle: nothing changes; count what reaches Consul.
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.clear_requests();
    tokio::time::sleep(idle).await;
    let requests = relay.requests();
    let health: Vec<_> = requests
        .iter()
        .filter(|r| r.path == format!("/v1/health/service/{service}"))
        .collect();
    let blocking = health
        .iter()
        .filter(|r| r.query.contains("index=") && r.query.contains("wait="))
        .count();
    let registration = requests.iter().filter(|r| r.path.contains(&own)).count();
    let per_min = |n: usize| n as f64 * 60.0 / idle.as_secs_f64();

    let against = if consul.fake.is_some() {
        "the test suite's Consul API server (tests/support/consul.rs)"
    } else {
        "a real Consul agent"
    };
    println!("### Consul: propagation and idle load\n");
    println!(
        "Against {against}, through the test relay, baton with `BATON_DISCOVERY=consul` \
         `BATON_CONSUL_WAIT={wait}`, rr over one stable instance and the new one.\n"
    );
    println!("| measure | value |\n|---|---|");
    for (paced, latencies) in &runs {
        let how = match paced {
            Some(p) => format!("changes {} ms apart", p.as_millis()),
            None => "changes back to back".to_string(),
        };
        println!(
            "| propagation, {how} ({} changes): p50 / p99 / max | {} / {} / {} |",
            latencies.len(),
            ms(percentile(latencies, 0.50)),
            ms(percentile(latencies, 0.99)),
            ms(latencies[latencies.len() - 1])
        );
    }
    println!(
        "| idle health queries per minute per watched service | {:.2} ({} in {}s, {} of them blocking) |",
        per_min(health.len()),
        health.len(),
        idle.as_secs(),
        blocking
    );
    println!(
        "| idle registration queries per minute | {:.2} ({} in {}s) |",
        per_min(registration),
        registration,
        idle.as_secs()
    );
    println!(
        "| all Consul requests while idle | {} in {}s |",
        requests.len(),
        idle.as_secs()
    );
    api.deregister(stable.name).await;
    drop(baton);
}
