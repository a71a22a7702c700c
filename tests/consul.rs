//! Consul discovery and registration, end to end: the real baton binary, real upstream
//! servers, and a Consul HTTP API — the test fake (`support/consul.rs`), or a real agent
//! when `CONSUL_HTTP_ADDR` is set (see tests/README.md). baton always reaches Consul
//! through a relay the test controls, so outages and an index that goes backwards can be
//! staged against either.

mod support;

use serde_json::json;
use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use support::{
    consul::{unique_name, ConsulApi, ConsulRelay, ConsulUnderTest},
    get, metric, try_get, upstream_of, Baton, Behaviour, Upstream,
};

/// A leaked name, for upstreams (their names are `&'static str`).
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// A test upstream named `PREFIX-PID-N`.
async fn instance(prefix: &str) -> Upstream {
    Upstream::start(leak(unique_name(prefix)), Behaviour::default()).await
}

/// Consul (the test server, or the agent `CONSUL_HTTP_ADDR` names), a client of it, a
/// relay in front of it for baton, and a service name unique to this run.
async fn setup(prefix: &str) -> (ConsulUnderTest, ConsulApi, ConsulRelay, String) {
    let consul = ConsulUnderTest::start().await;
    let api = consul.api();
    let relay = ConsulRelay::start(&consul.agent_url).await;
    (consul, api, relay, unique_name(prefix))
}

/// Registers `up` as an instance of `service` with a TTL check that starts passing.
async fn register(api: &ConsulApi, service: &str, up: &Upstream, extra: serde_json::Value) {
    let mut body = json!({
        "ID": up.name,
        "Name": service,
        "Address": up.addr.ip().to_string(),
        "Port": up.addr.port(),
        "Check": {"TTL": "10m", "Status": "passing"},
    });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    api.register(body).await;
}

/// Starts baton discovering `service` in Consul through `relay`.
async fn baton_for(
    service: &str,
    relay: &ConsulRelay,
    consul: &ConsulUnderTest,
    extra: &[(&str, &str)],
) -> Baton {
    let routes = format!("*={service}");
    let url = relay.url();
    let mut env = vec![
        ("BATON_ROUTES", routes.as_str()),
        ("BATON_DISCOVERY", "consul"),
        ("BATON_LB", "rr"),
        ("CONSUL_HTTP_ADDR", url.as_str()),
        ("BATON_CONSUL_BACKOFF_MAX", "1s"),
    ];
    if let Some(t) = &consul.token {
        env.push(("CONSUL_HTTP_TOKEN", t.as_str()));
    }
    env.extend_from_slice(extra);
    Baton::start(&env).await
}

/// Polls GET / through baton until `pred` holds for the upstream names seen in a
/// window of `n` requests (panics after 10 s with what was seen).
async fn until_routed(baton: &Baton, n: usize, pred: impl Fn(&[String]) -> bool) -> Duration {
    let start = Instant::now();
    let mut seen = Vec::new();
    while start.elapsed() < Duration::from_secs(10) {
        seen.clear();
        for _ in 0..n {
            match try_get(baton.addr, "/", &[]).await {
                Ok(got) if got.0 == 200 => seen.push(upstream_of(&got)),
                Ok(got) => seen.push(format!("status {}", got.0.as_u16())),
                Err(e) => seen.push(format!("error {e}")),
            }
        }
        if pred(&seen) {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "routing never matched; last window {seen:?}\nlog:\n{}",
        baton.log()
    );
}

fn only(names: &[&str]) -> impl Fn(&[String]) -> bool {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    move |seen: &[String]| {
        seen.iter().all(|s| names.contains(s)) && names.iter().all(|n| seen.contains(n))
    }
}

#[tokio::test]
async fn instances_appear_and_disappear_and_traffic_follows() {
    let (consul, api, relay, service) = setup("appear").await;
    let baton = baton_for(&service, &relay, &consul, &[]).await;

    // Known to nobody yet: resolved (ready) but empty, so 503.
    let (status, _, body) = get(baton.addr, "/").await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));

    let a = instance("a").await;
    let b = Upstream::start(
        leak(unique_name("b")),
        Behaviour {
            delay: Duration::from_millis(0),
            ..Default::default()
        },
    )
    .await;
    register(&api, &service, &a, json!({})).await;
    until_routed(&baton, 4, only(&[a.name])).await;
    register(&api, &service, &b, json!({})).await;
    until_routed(&baton, 4, only(&[a.name, b.name])).await;

    // A request in flight to `a` when it leaves still completes.
    let slow = tokio::spawn({
        let addr = baton.addr;
        async move {
            // rr alternates: one of the two goes to `a`, slowly.
            let x = tokio::spawn(async move { try_get(addr, "/slow/700", &[]).await });
            let y = try_get(addr, "/slow/700", &[]).await;
            (x.await.unwrap(), y)
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    api.deregister(a.name).await;
    until_routed(&baton, 4, only(&[b.name])).await;
    let (x, y) = slow.await.unwrap();
    let mut served: Vec<String> = [x, y]
        .into_iter()
        .map(|r| {
            let got = r.expect("in-flight request completes");
            assert_eq!(got.0, 200);
            upstream_of(&got)
        })
        .collect();
    served.sort();
    let mut expected = vec![a.name.to_string(), b.name.to_string()];
    expected.sort();
    assert_eq!(
        served, expected,
        "one slow request was on the removed instance"
    );

    api.deregister(b.name).await;
    until_routed(&baton, 2, |seen| seen.iter().all(|s| s == "status 503")).await;
    let m = baton.metrics().await;
    assert_eq!(
        metric(&m, &format!("baton_endpoints{{service=\"{service}\"}}")),
        0.0
    );
}

#[tokio::test]
async fn a_check_turning_critical_removes_the_instance() {
    let (consul, api, relay, service) = setup("critical").await;
    let a = instance("a").await;
    let b = instance("b").await;
    register(&api, &service, &a, json!({})).await;
    register(&api, &service, &b, json!({})).await;
    let baton = baton_for(&service, &relay, &consul, &[]).await;
    until_routed(&baton, 4, only(&[a.name, b.name])).await;

    api.check(&format!("service:{}", a.name), "fail").await;
    until_routed(&baton, 4, only(&[b.name])).await;
    // Warning is not passing either.
    api.check(&format!("service:{}", a.name), "warn").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    until_routed(&baton, 4, only(&[b.name])).await;
    api.check(&format!("service:{}", a.name), "pass").await;
    until_routed(&baton, 4, only(&[a.name, b.name])).await;
    api.deregister(a.name).await;
    api.deregister(b.name).await;
}

#[tokio::test]
async fn metadata_and_weights_reach_the_balancer() {
    let (consul, api, relay, service) = setup("weights").await;
    let a = instance("a").await;
    let b = instance("b").await;
    register(
        &api,
        &service,
        &a,
        json!({"Weights": {"Passing": 3, "Warning": 1}}),
    )
    .await;
    register(
        &api,
        &service,
        &b,
        json!({"Weights": {"Passing": 1, "Warning": 1}}),
    )
    .await;
    let baton = baton_for(&service, &relay, &consul, &[]).await;
    until_routed(&baton, 4, only(&[a.name, b.name])).await;
    let (a0, b0) = (a.hits(), b.hits());
    for _ in 0..400 {
        let (status, _, _) = get(baton.addr, "/").await;
        assert_eq!(status, 200);
    }
    let (da, db) = (a.hits() - a0, b.hits() - b0);
    assert_eq!((da, db), (300, 100), "weighted round-robin 3:1");
    api.deregister(a.name).await;
    api.deregister(b.name).await;
}

#[tokio::test]
async fn datacenter_and_consistency_go_on_every_query() {
    let (consul, api, _relay, service) = setup("readopts").await;
    let a = instance("a").await;
    register(&api, &service, &a, json!({})).await;
    let (_, entries) = api.health(&service, true).await;
    let dc = entries[0]["Node"]["Datacenter"]
        .as_str()
        .expect("the agent's datacenter")
        .to_string();
    for (extra, want_dc, want) in [
        (
            vec![
                ("BATON_CONSUL_DATACENTER", dc.as_str()),
                ("BATON_CONSUL_CONSISTENCY", "stale"),
            ],
            Some(dc.as_str()),
            Some("stale"),
        ),
        (
            vec![("BATON_CONSUL_CONSISTENCY", "consistent")],
            None,
            Some("consistent"),
        ),
        (vec![], None, None),
    ] {
        // A relay of its own, so that only this baton's queries are seen.
        let relay = ConsulRelay::start(&consul.agent_url).await;
        let baton = baton_for(&service, &relay, &consul, &extra).await;
        until_routed(&baton, 2, only(&[a.name])).await;
        let queries: Vec<_> = relay
            .requests()
            .into_iter()
            .filter(|r| r.path.ends_with(&service))
            .collect();
        assert!(!queries.is_empty());
        for q in &queries {
            assert_eq!(q.param("dc"), want_dc, "{extra:?}: {q:?}");
            for mode in ["stale", "consistent"] {
                assert_eq!(q.has_param(mode), want == Some(mode), "{extra:?}: {q:?}");
            }
        }
    }
    api.deregister(a.name).await;
}

#[tokio::test]
async fn host_name_addresses_are_resolved() {
    let (consul, api, relay, service) = setup("dns").await;
    let a = instance("a").await;
    let b = instance("b").await;
    // Consul allows a DNS name as the address; `a` is at localhost.
    register(&api, &service, &a, json!({"Address": "localhost"})).await;
    register(&api, &service, &b, json!({})).await;
    let baton = baton_for(&service, &relay, &consul, &[]).await;
    until_routed(&baton, 4, only(&[a.name, b.name])).await;
    // An update is resolved too: instance `a` moves to `c`'s port, still at localhost.
    let c = instance("c").await;
    api.deregister(a.name).await;
    register(
        &api,
        &service,
        &c,
        json!({"ID": a.name, "Address": "localhost"}),
    )
    .await;
    until_routed(&baton, 4, only(&[c.name, b.name])).await;
    assert!(
        !baton.log().contains("skipping a Consul instance"),
        "{}",
        baton.log()
    );
    api.deregister(a.name).await;
    api.deregister(b.name).await;
}

#[tokio::test]
async fn index_going_backwards_restarts_the_watch() {
    let (consul, api, relay, service) = setup("reset").await;
    let a = instance("a").await;
    register(&api, &service, &a, json!({})).await;
    let baton = baton_for(&service, &relay, &consul, &[]).await;
    until_routed(&baton, 2, only(&[a.name])).await;

    // From now on baton sees indexes far below the one it is blocking on.
    let (index, _) = api.health(&service, true).await;
    relay.clear_requests();
    relay.set_index_shift(index - 1);
    // Wake the blocking query with a change.
    let b = instance("b").await;
    register(&api, &service, &b, json!({})).await;
    until_routed(&baton, 4, only(&[a.name, b.name])).await;
    // The answer with the lower index made baton start over with a full read (no
    // index), then block again on the new, lower index.
    let health = until("a full read, then blocking again", async || {
        let health: Vec<_> = relay
            .requests()
            .into_iter()
            .filter(|r| r.path.ends_with(&service))
            .collect();
        let reset = health
            .iter()
            .position(|r| !r.query.contains("index=") || r.query.contains("index=0"))?;
        health[reset + 1..]
            .iter()
            .any(|r| r.query.contains("index="))
            .then_some(health)
    })
    .await;
    assert!(!health.is_empty());
    assert!(
        baton.logged("index went backwards").await,
        "{}",
        baton.log()
    );

    // Still watching: a later change arrives.
    api.deregister(a.name).await;
    until_routed(&baton, 4, only(&[b.name])).await;
    // And the loop did not spin.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let n = relay
        .requests()
        .iter()
        .filter(|r| r.path.ends_with(&service))
        .count();
    assert!(
        n < 15,
        "{n} health queries in a few seconds: the watch spins"
    );
    api.deregister(b.name).await;
}

/// Sends requests through baton from `clients` tasks until `stop`; returns the number
/// of requests and the failures (anything but 200).
fn load(
    baton: &Baton,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    let addr = baton.addr;
    tokio::spawn(async move {
        let total = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let (stop, total) = (stop.clone(), total.clone());
                tokio::spawn(async move {
                    let client = support::http1_client();
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let req = http::Request::get(format!("http://{addr}/"))
                            .body(http_body_util::Full::new(bytes::Bytes::new()))
                            .unwrap();
                        match support::send(&client, req).await {
                            Ok(got) if got.0 == 200 => {}
                            Ok(got) => failures.push(format!("status {}", got.0.as_u16())),
                            Err(e) => failures.push(e),
                        }
                        total.fetch_add(1, Ordering::Relaxed);
                    }
                    failures
                })
            })
            .collect();
        let mut failures = Vec::new();
        for t in tasks {
            failures.extend(t.await.unwrap());
        }
        (total.load(Ordering::Relaxed), failures)
    })
}

#[tokio::test]
async fn consul_down_for_ten_seconds_under_load_fails_nothing() {
    let (consul, api, relay, service) = setup("outage").await;
    let a = instance("a").await;
    let b = instance("b").await;
    register(&api, &service, &a, json!({})).await;
    register(&api, &service, &b, json!({})).await;
    let baton = baton_for(&service, &relay, &consul, &[]).await;
    until_routed(&baton, 4, only(&[a.name, b.name])).await;

    let stop = Arc::new(AtomicBool::new(false));
    let running = load(&baton, 4, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.cut();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = baton.metrics().await;
    let stale = metric(
        &during,
        &format!("baton_discovery_stale_seconds{{service=\"{service}\"}}"),
    );
    assert!(
        stale > 0.0,
        "the service is marked stale while Consul is down:\n{during}"
    );
    assert_eq!(
        metric(
            &during,
            &format!("baton_endpoints{{service=\"{service}\"}}")
        ),
        2.0
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    relay.restore().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (total, failures) = running.await.unwrap();
    assert!(total > 100, "only {total} requests under load");
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    // Consul is back and nothing changed: the watch recovers on its own (a full read
    // after the failures, not a query blocking on the old index until `wait` ends).
    let stale = format!("baton_discovery_stale_seconds{{service=\"{service}\"}}");
    until("the stale mark to clear", async || {
        (metric(&baton.metrics().await, &stale) == 0.0).then_some(())
    })
    .await;
    // Watching again: a change made after the outage arrives.
    let c = instance("c").await;
    register(&api, &service, &c, json!({})).await;
    until_routed(&baton, 6, only(&[a.name, b.name, c.name])).await;
    assert!(
        baton.logged("serving the last known instances").await,
        "{}",
        baton.log()
    );
    for up in [&a, &b, &c] {
        api.deregister(up.name).await;
    }
}

#[tokio::test]
async fn a_hung_agent_is_noticed_at_the_query_deadline() {
    let (consul, api, relay, service) = setup("hung").await;
    let a = instance("a").await;
    let b = instance("b").await;
    register(&api, &service, &a, json!({})).await;
    register(&api, &service, &b, json!({})).await;
    // A short wait: the blocking query's deadline is wait + wait/16 + 10 s.
    let baton = baton_for(&service, &relay, &consul, &[("BATON_CONSUL_WAIT", "1s")]).await;
    until_routed(&baton, 4, only(&[a.name, b.name])).await;

    // The agent accepts connections but answers nothing, not even the blocking query
    // in flight: no error, no reset, only silence.
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(&baton, 2, stop.clone());
    let hung_at = Instant::now();
    relay.hang();
    let stale = format!("baton_discovery_stale_seconds{{service=\"{service}\"}}");
    let endpoints = format!("baton_endpoints{{service=\"{service}\"}}");
    let during = until_within(
        "the service marked stale",
        Duration::from_secs(40),
        async || {
            let m = baton.metrics().await;
            (metric(&m, &stale) > 0.0).then_some(m)
        },
    )
    .await;
    assert_eq!(metric(&during, &endpoints), 2.0, "{during}");
    // It retries, with a full read (and that query hangs too, until its own deadline).
    until_within("a retry", Duration::from_secs(10), async || {
        relay
            .requests()
            .iter()
            .any(|r| r.at > hung_at && r.path.ends_with(&service) && !r.has_param("index"))
            .then_some(())
    })
    .await;
    let log = baton.log();
    assert!(
        log.contains("no answer from the Consul agent within")
            && log.contains("serving the last known instances"),
        "{log}"
    );
    stop.store(true, Ordering::Relaxed);
    let (total, failures) = running.await.unwrap();
    assert!(total > 0);
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed while the agent hung: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    relay.unhang();
    until_within(
        "the stale mark to clear",
        Duration::from_secs(30),
        async || (metric(&baton.metrics().await, &stale) == 0.0).then_some(()),
    )
    .await;
    let c = instance("c").await;
    register(&api, &service, &c, json!({})).await;
    until_routed(&baton, 6, only(&[a.name, b.name, c.name])).await;
    for up in [&a, &b, &c] {
        api.deregister(up.name).await;
    }
}

/// Consul answers `status` with `body` to every health query for a while: baton keeps
/// serving the last known instances, marks the service stale, retries with backoff,
/// and resumes watching once Consul answers again.
async fn error_answers_mid_run_keep_serving(prefix: &str, status: http::StatusCode, body: &str) {
    let (consul, api, relay, service) = setup(prefix).await;
    let a = instance("a").await;
    let b = instance("b").await;
    register(&api, &service, &a, json!({})).await;
    register(&api, &service, &b, json!({})).await;
    // A short wait, so that the next query goes out soon.
    let baton = baton_for(&service, &relay, &consul, &[("BATON_CONSUL_WAIT", "1s")]).await;
    until_routed(&baton, 4, only(&[a.name, b.name])).await;

    let stop = Arc::new(AtomicBool::new(false));
    let running = load(&baton, 2, stop.clone());
    let since = Instant::now();
    relay.fail("/v1/health/service/", status, body);
    let stale = format!("baton_discovery_stale_seconds{{service=\"{service}\"}}");
    let endpoints = format!("baton_endpoints{{service=\"{service}\"}}");
    let during = until("the service marked stale", async || {
        let m = baton.metrics().await;
        (metric(&m, &stale) > 0.0).then_some(m)
    })
    .await;
    assert_eq!(metric(&during, &endpoints), 2.0, "{during}");
    // Retried, each time after a longer pause: backoff (from 200 ms, with equal
    // jitter: at least 100, 200, 400 ms), not a loop at the query rate.
    let failed = until("four failed queries", async || {
        let failed: Vec<Instant> = relay
            .requests()
            .iter()
            .filter(|r| r.at > since && r.path.ends_with(&service))
            .map(|r| r.at)
            .collect();
        (failed.len() >= 4).then_some(failed)
    })
    .await;
    let gaps: Vec<Duration> = failed.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, least) in gaps.iter().zip([100, 200, 400]) {
        assert!(
            *gap >= Duration::from_millis(least - 5),
            "retries without backoff: {gaps:?}"
        );
    }
    let log = baton.log();
    assert!(
        log.contains(status.as_str()) && log.contains(body),
        "the failure is logged with Consul's answer:\n{log}"
    );
    until_routed(&baton, 4, only(&[a.name, b.name])).await;

    relay.clear_failures();
    until("the stale mark to clear", async || {
        (metric(&baton.metrics().await, &stale) == 0.0).then_some(())
    })
    .await;
    let c = instance("c").await;
    register(&api, &service, &c, json!({})).await;
    until_routed(&baton, 6, only(&[a.name, b.name, c.name])).await;
    stop.store(true, Ordering::Relaxed);
    let (total, failures) = running.await.unwrap();
    assert!(total > 0);
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed while Consul answered {status}: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    for up in [&a, &b, &c] {
        api.deregister(up.name).await;
    }
}

#[tokio::test]
async fn no_cluster_leader_mid_run_keeps_serving() {
    error_answers_mid_run_keep_serving(
        "noleader",
        http::StatusCode::INTERNAL_SERVER_ERROR,
        "No cluster leader",
    )
    .await;
}

#[tokio::test]
async fn acl_not_found_mid_run_keeps_serving() {
    error_answers_mid_run_keep_serving("aclgone", http::StatusCode::FORBIDDEN, "ACL not found")
        .await;
}

#[tokio::test]
async fn churn_under_load_fails_no_request() {
    let (consul, api, relay, service) = setup("churn").await;
    let a = instance("a").await;
    let b = instance("b").await;
    // The churning instance is healthy while registered: every request it gets must
    // succeed too, including those in flight when it leaves.
    let c = instance("c").await;
    register(&api, &service, &a, json!({})).await;
    register(&api, &service, &b, json!({})).await;
    let baton = baton_for(&service, &relay, &consul, &[("BATON_LB", "p2c")]).await;
    until_routed(&baton, 8, |seen| {
        seen.iter().all(|s| s == a.name || s == b.name)
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let running = load(&baton, 4, stop.clone());
    let start = Instant::now();
    let mut changes = 0;
    while start.elapsed() < Duration::from_secs(20) {
        register(&api, &service, &c, json!({})).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        api.deregister(c.name).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        changes += 2;
    }
    stop.store(true, Ordering::Relaxed);
    let (total, failures) = running.await.unwrap();
    assert!(changes >= 100, "only {changes} changes");
    assert!(total > 500, "only {total} requests under load");
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        c.hits() > 0,
        "the churning instance was discovered at least once"
    );
    until_routed(&baton, 8, |seen| {
        seen.iter().all(|s| s == a.name || s == b.name)
    })
    .await;
    api.deregister(a.name).await;
    api.deregister(b.name).await;
}

#[tokio::test]
async fn the_acl_token_goes_in_x_consul_token() {
    let consul = ConsulUnderTest::start().await;
    let token = match (&consul.fake, &consul.token) {
        (Some(fake), _) => {
            fake.require_token("baton-test-token");
            "baton-test-token".to_string()
        }
        (None, Some(t)) => t.clone(),
        // A real agent without ACLs: nothing to check.
        (None, None) => return,
    };
    let api = ConsulApi::new(&consul.agent_url, Some(token.clone()));
    let relay = ConsulRelay::start(&consul.agent_url).await;
    let service = unique_name("acl");
    let a = instance("a").await;
    register(&api, &service, &a, json!({})).await;
    let routes = format!("*={service}");
    let url = relay.url();
    let baton = Baton::start(&[
        ("BATON_ROUTES", routes.as_str()),
        ("BATON_DISCOVERY", "consul"),
        ("CONSUL_HTTP_ADDR", url.as_str()),
        ("CONSUL_HTTP_TOKEN", token.as_str()),
    ])
    .await;
    until_routed(&baton, 2, only(&[a.name])).await;
    let requests = relay.requests();
    assert!(!requests.is_empty());
    assert!(
        requests
            .iter()
            .all(|r| r.token.as_deref() == Some(token.as_str())),
        "every request carries the token: {requests:?}"
    );
    assert!(!baton.log().contains(&token), "the token is never logged");
    let (_, _, config) = get(baton.admin, "/config").await;
    assert!(
        !String::from_utf8_lossy(&config).contains(&token),
        "nor shown"
    );

    if consul.fake.is_some() {
        // A wrong token: Consul refuses, baton says so and never becomes ready.
        let other = Baton::spawn(&[
            ("BATON_ROUTES", routes.as_str()),
            ("BATON_DISCOVERY", "consul"),
            ("CONSUL_HTTP_ADDR", url.as_str()),
            ("CONSUL_HTTP_TOKEN", "wrong"),
        ]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (status, _, body) = get(other.admin, "/ready").await;
        assert_eq!(status, 503);
        assert!(String::from_utf8_lossy(&body).contains("waiting for discovery"));
        assert!(other.logged("403").await, "{}", other.log());
    }
    api.deregister(a.name).await;
}

/// Env for a baton that registers itself as `service` (its own inbound port).
/// It routes everything to a statically defined `peer`.
fn registering(
    service: &str,
    peer: &Upstream,
    relay: &ConsulRelay,
    consul: &ConsulUnderTest,
) -> Vec<(String, String)> {
    let inbound = support::free_addr();
    let mut env = vec![
        ("BATON_INBOUND_ADDR".to_string(), inbound.to_string()),
        ("BATON_ROUTES".into(), "*=peer".into()),
        (
            "BATON_STATIC_SERVICES".into(),
            format!("peer={}", peer.addr),
        ),
        ("BATON_SERVICE_NAME".into(), service.to_string()),
        ("BATON_SERVICE_PORT".into(), inbound.port().to_string()),
        ("BATON_SERVICE_ADDRESS".into(), "127.0.0.1".into()),
        ("BATON_SERVICE_ID".into(), format!("{service}-1")),
        ("BATON_SERVICE_TAGS".into(), "blue,canary".into()),
        ("BATON_SERVICE_META".into(), "team=storage".into()),
        ("BATON_SERVICE_CHECK_INTERVAL".into(), "1s".into()),
        ("BATON_CONSUL_BACKOFF_MAX".into(), "1s".into()),
        ("CONSUL_HTTP_ADDR".into(), relay.url()),
    ];
    if let Some(t) = &consul.token {
        env.push(("CONSUL_HTTP_TOKEN".into(), t.clone()));
    }
    env
}

/// Starts a baton that registers itself as `service` (see [`registering`]) and waits
/// until the agent has it: the baton, its peer upstream, its ID and the agent's record.
async fn start_registering(
    service: &str,
    relay: &ConsulRelay,
    consul: &ConsulUnderTest,
    api: &ConsulApi,
) -> (Baton, Upstream, String, serde_json::Value) {
    let peer = instance("peer").await;
    let env = registering(service, &peer, relay, consul);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let baton = Baton::start(&env).await;
    let id = format!("{service}-1");
    let registered = until("the registration", async || api.agent_service(&id).await).await;
    (baton, peer, id, registered)
}

async fn until<T>(what: &str, f: impl AsyncFnMut() -> Option<T>) -> T {
    until_within(what, Duration::from_secs(15), f).await
}

async fn until_within<T>(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn registers_on_start_and_deregisters_before_draining() {
    let (consul, api, relay, service) = setup("reg").await;
    let (mut baton, _peer, id, registered) =
        start_registering(&service, &relay, &consul, &api).await;
    assert_eq!(registered["Service"], service.as_str());
    assert_eq!(registered["Port"], baton.addr.port());
    assert_eq!(registered["Address"], "127.0.0.1");
    assert_eq!(registered["Meta"]["team"], "storage");
    assert_eq!(
        registered["Meta"]["baton-version"],
        env!("CARGO_PKG_VERSION")
    );
    assert!(
        registered["Meta"].get("baton-handoff-port").is_none(),
        "no handoff, no port"
    );
    let mut tags: Vec<_> = registered["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    tags.sort();
    assert_eq!(tags, ["blue", "canary"]);
    // The agent's HTTP check of /ready passes: the instance becomes healthy.
    let healthy = until("a passing check", async || {
        let (_, healthy) = api.health(&service, true).await;
        (healthy.len() == 1).then_some(healthy)
    })
    .await;
    // What baton sent: the check is a GET of /ready on the admin port, at the
    // configured interval (1s here) and the default timeout and reaping delay.
    let ready = format!("http://127.0.0.1:{}/ready", baton.admin.port());
    let sent = relay
        .requests()
        .into_iter()
        .find(|r| r.method == "PUT" && r.path == "/v1/agent/service/register")
        .expect("a registration went through the relay");
    let sent: serde_json::Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(sent["ID"], id.as_str());
    assert_eq!(sent["Name"], service.as_str());
    assert_eq!(sent["Check"]["HTTP"], ready.as_str(), "{sent}");
    assert_eq!(sent["Check"]["Interval"], "1s");
    assert_eq!(sent["Check"]["Timeout"], "2s");
    assert_eq!(sent["Check"]["DeregisterCriticalServiceAfter"], "60s");
    assert_eq!(sent["Meta"]["baton-version"], env!("CARGO_PKG_VERSION"));
    // And what the agent made of it.
    let check = healthy[0]["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["ServiceID"] == id.as_str())
        .cloned()
        .expect("the instance's check");
    assert_eq!(check["Type"], "http", "{check}");
    assert_eq!(check["Name"], "baton ready");
    assert_eq!(check["Interval"], "1s");
    assert_eq!(check["Timeout"], "2s");
    let output = check["Output"].as_str().unwrap();
    assert!(
        output.starts_with(&format!("HTTP GET {ready}: 200 OK")),
        "the agent checks baton's /ready: {output}"
    );

    // SIGTERM with a request in flight: the instance leaves Consul while that request
    // is still being served, and baton exits 0 after it completes.
    let addr = baton.addr;
    let in_flight = tokio::spawn(async move { try_get(addr, "/slow/2000", &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    baton.signal("TERM");
    until("the deregistration", async || {
        api.agent_service(&id).await.is_none().then_some(())
    })
    .await;
    assert!(
        !in_flight.is_finished(),
        "deregistered while the request is still in flight"
    );
    // During BATON_SERVICE_DEREGISTER_DELAY a peer that has not yet seen the removal
    // still gets served, on a new connection, while /ready already says no.
    let (status, _, _) = get(addr, "/").await;
    assert_eq!(status, 200, "still serving after deregistering");
    let (status, _, _) = get(baton.admin, "/ready").await;
    assert_eq!(status, 503, "no longer ready");
    let got = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(got.0, 200);
    let status = baton.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}\n{}", baton.log());
    let log = baton.log();
    let dereg = log.find("deregistered from Consul").expect("logged");
    let drained = log.find("all connections drained").expect("drained");
    assert!(
        dereg < drained,
        "deregistration comes before the drain:\n{log}"
    );
}

#[tokio::test]
async fn registers_again_when_the_agent_loses_it() {
    let (consul, api, relay, service) = setup("rereg").await;
    let (_baton, _peer, id, _) = start_registering(&service, &relay, &consul, &api).await;

    // Someone (or an agent that restarted without its state) removes it.
    api.deregister(&id).await;
    until("the re-registration", async || api.agent_service(&id).await).await;
    if let Some(fake) = &consul.fake {
        fake.forget_agent();
        assert!(api.agent_service(&id).await.is_none());
        until("the re-registration after an agent restart", async || {
            api.agent_service(&id).await
        })
        .await;
    }
    // Idle, the registration costs blocking queries only, not polling (after the
    // re-registrations settle: the loop is rate-limited to one request a second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    relay.clear_requests();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let polls = relay
        .requests()
        .iter()
        .filter(|r| r.path.contains(&id))
        .count();
    assert!(
        polls <= 1,
        "{polls} requests in 2 s for an idle registration: {:?}",
        relay.requests()
    );
    api.deregister(&id).await;
}

#[tokio::test]
async fn post_drain_leaves_consul_and_keeps_serving_until_sigterm() {
    let (consul, api, relay, service) = setup("drain").await;
    let (mut baton, _peer, id, _) = start_registering(&service, &relay, &consul, &api).await;

    let (status, _, _) = get(baton.admin, "/drain").await;
    assert_eq!(status, 405, "GET does not drain");
    assert!(api.agent_service(&id).await.is_some());

    // What an application's preStop hook does.
    let post = |path: &'static str| {
        let admin = baton.admin;
        async move {
            let req = http::Request::post(format!("http://{admin}{path}"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            support::send(&support::http1_client(), req).await.unwrap()
        }
    };
    let (status, _, body) = post("/drain").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(
        api.agent_service(&id).await.is_none(),
        "deregistered before answering"
    );
    let (status, _, _) = get(baton.admin, "/ready").await;
    assert_eq!(status, 503);
    // Still serving, and it stays out of Consul (the registration loop has stopped).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        api.agent_service(&id).await.is_none(),
        "not registered again"
    );
    let (status, _, _) = get(baton.addr, "/").await;
    assert_eq!(status, 200);
    // Draining twice is fine.
    let (status, _, _) = post("/drain").await;
    assert_eq!(status, 200);
    // A request baton proxied to its own admin port (it carries forwarding headers)
    // may not drain.
    let req = http::Request::post(format!("http://{}/drain", baton.admin))
        .header("x-forwarded-for", "10.0.0.1")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let (status, _, _) = support::send(&support::http1_client(), req).await.unwrap();
    assert_eq!(status, 403);

    // The app's container alone restarted (its preStop drained, no SIGTERM came):
    // its postStart hook resumes — ready and registered again.
    let (status, _, body) = post("/resume").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (status, _, _) = get(baton.admin, "/ready").await;
    assert_eq!(status, 200);
    until("the registration again", async || {
        api.agent_service(&id).await
    })
    .await;
    let (status, _, _) = post("/drain").await;
    assert_eq!(status, 200);
    assert!(api.agent_service(&id).await.is_none());

    // SIGTERM then drains at once: the deregistration delay has already passed.
    baton.signal("TERM");
    let status = baton.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}\n{}", baton.log());
    let log = baton.log();
    assert_eq!(log.matches("deregistered from Consul").count(), 2, "{log}");
    assert!(!log.contains("accepting until peers"), "{log}");
}

/// `POST` to baton's admin server (what an application's lifecycle hooks do).
async fn post(admin: std::net::SocketAddr, path: &str) -> support::Got {
    let req = http::Request::post(format!("http://{admin}{path}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    support::send(&support::http1_client(), req).await.unwrap()
}

#[tokio::test]
async fn a_registration_in_flight_never_lands_after_the_deregistration() {
    let (consul, api, relay, service) = setup("late").await;
    let (mut baton, _peer, id, _) = start_registering(&service, &relay, &consul, &api).await;
    // From now on the agent carries out registrations 5 s late: longer than leaving
    // once waited for one (3 s), within what a registration call may take (10 s).
    relay.delay(
        http::Method::PUT,
        "/v1/agent/service/register",
        Duration::from_secs(5),
    );
    // The agent loses the instance; baton registers it again, and that call is held.
    api.deregister(&id).await;
    until("the re-registration in flight", async || {
        (relay.delayed_in_flight() == 1).then_some(())
    })
    .await;

    // Leaving now: the deregistration must come after that registration.
    let (status, _, body) = post(baton.admin, "/drain").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    until("the delayed registration carried out", async || {
        (relay.delayed_in_flight() == 0).then_some(())
    })
    .await;
    assert!(
        api.agent_service(&id).await.is_none(),
        "a registration sent before leaving landed after the deregistration:\n{}",
        baton.log()
    );
    let requests = relay.requests();
    let register = requests
        .iter()
        .rposition(|r| r.path == "/v1/agent/service/register")
        .unwrap();
    let deregister = requests
        .iter()
        .rposition(|r| r.path.starts_with("/v1/agent/service/deregister/"))
        .expect("baton deregistered");
    assert!(register < deregister, "{requests:?}");

    baton.signal("TERM");
    let status = baton.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", baton.log());
    assert!(api.agent_service(&id).await.is_none(), "{}", baton.log());
}
