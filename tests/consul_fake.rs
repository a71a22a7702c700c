//! The Consul test support held to Consul's documented behaviour: blocking queries
//! that wait out or wake on a change, `X-Consul-Index`, `?passing` against TTL and
//! HTTP checks, `DeregisterCriticalServiceAfter`, hash blocking on the agent's
//! service endpoint, errors, and the relay's faults (a cut, a shifted index).
//!
//! Runs against `support::consul::FakeConsul`, or against a real agent when
//! `CONSUL_HTTP_ADDR` is set; what needs the fake's knobs (`set_index`,
//! `forget_agent`, `require_token`, reaping within seconds) then returns early. HTTP
//! checks need the agent to reach this host's loopback (a local agent).

mod support;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU16, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};
use support::{
    consul::{consul_index, unique_name, ConsulApi, ConsulRelay, ConsulUnderTest},
    try_get, Got,
};
use tokio::net::{TcpListener, TcpStream};

fn text(got: &Got) -> String {
    String::from_utf8_lossy(&got.2).into_owned()
}

fn entries(got: &Got) -> Vec<Value> {
    serde_json::from_slice(&got.2).unwrap_or_else(|e| panic!("{e}: {}", text(got)))
}

/// The status of check `check_id` in a health entry.
fn status_of(entry: &Value, check_id: &str) -> String {
    entry["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["CheckID"] == check_id)
        .map(|c| c["Status"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no check {check_id} in {entry}"))
}

/// Retries `attempt` every 50 ms until it is `Ok`, panicking with its last `Err`
/// after `timeout`.
async fn eventually<F, Fut>(timeout: Duration, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match attempt().await {
            Ok(()) => return,
            Err(why) if Instant::now() > deadline => panic!("not within {timeout:?}: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Sends a GET from a task and reports how long it took.
fn timed_get(
    api: &ConsulApi,
    path: String,
) -> tokio::task::JoinHandle<(Duration, Result<Got, String>)> {
    let api = api.clone();
    tokio::spawn(async move {
        let t = Instant::now();
        let got = api.try_request(Method::GET, &path, None).await;
        (t.elapsed(), got)
    })
}

/// An HTTP server answering every request with the status in `code`, recording each
/// request's User-Agent.
async fn status_server(code: Arc<AtomicU16>, agents: Arc<Mutex<Vec<String>>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (code, agents) = (code.clone(), agents.clone());
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let ua = req
                            .headers()
                            .get("user-agent")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        agents.lock().unwrap().push(ua);
                        let status = StatusCode::from_u16(code.load(Ordering::SeqCst)).unwrap();
                        let body = if status.is_success() { "ok" } else { "boom" };
                        async move {
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_query_waits_out_then_wakes_on_a_change() {
    let consul = ConsulUnderTest::start().await;
    let api = consul.api();
    let name = unique_name("block");
    let (a, b) = (format!("{name}-a"), format!("{name}-b"));
    api.register(json!({"ID": a, "Name": name, "Port": 8001}))
        .await;
    let (index, list) = api.health(&name, false).await;
    assert_eq!(list.len(), 1);

    // Nothing changes: the answer comes after `wait` (plus at most wait/16), same index.
    let t = Instant::now();
    let got = api
        .request(
            Method::GET,
            &format!("/v1/health/service/{name}?index={index}&wait=1s"),
            None,
        )
        .await;
    let took = t.elapsed();
    assert_eq!(got.0, StatusCode::OK, "{}", text(&got));
    assert_eq!(consul_index(&got), index);
    assert_eq!(entries(&got).len(), 1);
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(2500),
        "{took:?}"
    );

    // A registration wakes it long before `wait`.
    let blocked = timed_get(
        &api,
        format!("/v1/health/service/{name}?index={index}&wait=10s"),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.register(json!({"ID": b, "Name": name, "Port": 8002}))
        .await;
    let (took, got) = blocked.await.unwrap();
    let got = got.unwrap();
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(consul_index(&got) > index);
    assert_eq!(entries(&got).len(), 2);

    api.deregister(&a).await;
    api.deregister(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_moves_on_every_change_and_comes_with_errors() {
    let consul = ConsulUnderTest::start().await;
    let api = consul.api();
    let name = unique_name("index");
    let id = format!("{name}-1");
    api.register(json!({"ID": id, "Name": name, "Port": 8001, "Check": {"TTL": "30s"}}))
        .await;
    let (registered, _) = api.health(&name, false).await;
    api.check(&format!("service:{id}"), "pass").await;
    let (passed, _) = api.health(&name, false).await;
    assert!(passed > registered, "{passed} after {registered}");
    api.deregister(&id).await;
    let (gone, list) = api.health(&name, false).await;
    assert!(gone > passed, "{gone} after {passed}");
    assert!(list.is_empty());

    let Some(fake) = &consul.fake else {
        return;
    };
    // The fake puts the index on every answer, errors included.
    let got = api.request(Method::GET, "/v1/no/such/thing", None).await;
    assert_eq!(got.0, StatusCode::NOT_FOUND);
    assert_eq!(consul_index(&got), fake.index());
    let got = api
        .request(
            Method::PUT,
            &format!("/v1/agent/service/deregister/{id}"),
            None,
        )
        .await;
    assert_eq!(got.0, StatusCode::NOT_FOUND);
    assert_eq!(
        text(&got),
        format!("Unknown service ID \"{id}\". Ensure that the service ID is passed, not the service name.")
    );
    assert_eq!(consul_index(&got), fake.index());
    fake.require_token("t0ken");
    let got = api
        .request(Method::GET, &format!("/v1/health/service/{name}"), None)
        .await;
    assert_eq!(got.0, StatusCode::FORBIDDEN);
    assert!(consul_index(&got) >= 1);
    assert_eq!(got.1["x-consul-knownleader"], "true");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_token_is_required_once_set() {
    let consul = ConsulUnderTest::start().await;
    let Some(fake) = &consul.fake else {
        return;
    };
    fake.require_token("s3cret");
    let url = fake.url();
    let path = "/v1/agent/services";
    let none = ConsulApi::new(&url, None)
        .request(Method::GET, path, None)
        .await;
    assert_eq!(
        (none.0, text(&none).as_str()),
        (StatusCode::FORBIDDEN, "Permission denied")
    );
    let wrong = ConsulApi::new(&url, Some("nope".into()))
        .request(Method::GET, path, None)
        .await;
    assert_eq!(
        (wrong.0, text(&wrong).as_str()),
        (StatusCode::FORBIDDEN, "ACL not found")
    );
    let right = ConsulApi::new(&url, Some("s3cret".into()))
        .request(Method::GET, path, None)
        .await;
    assert_eq!(right.0, StatusCode::OK);
    let bearer = try_get(fake.addr(), path, &[("authorization", "Bearer s3cret")])
        .await
        .unwrap();
    assert_eq!(bearer.0, StatusCode::OK);
    let query = try_get(fake.addr(), "/v1/agent/services?token=s3cret", &[])
        .await
        .unwrap();
    assert_eq!(query.0, StatusCode::OK);
    // Status endpoints need no token.
    let leader = try_get(fake.addr(), "/v1/status/leader", &[])
        .await
        .unwrap();
    assert_eq!(
        (leader.0, text(&leader).as_str()),
        (StatusCode::OK, "\"127.0.0.1:8300\"")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passing_follows_ttl_check_status() {
    let consul = ConsulUnderTest::start().await;
    let api = consul.api();
    let name = unique_name("ttl");
    let id = format!("{name}-1");
    let check = format!("service:{id}");
    api.register(json!({
        "ID": id, "Name": name, "Tags": ["v1"], "Port": 8001, "Check": {"TTL": "30s"},
    }))
    .await;

    // Registered without a status: critical, so not in ?passing.
    let (_, all) = api.health(&name, false).await;
    assert_eq!(all.len(), 1);
    let e = &all[0];
    assert_eq!(status_of(e, "serfHealth"), "passing");
    assert_eq!(status_of(e, &check), "critical");
    assert_eq!(e["Service"]["ID"], id.as_str());
    assert_eq!(e["Service"]["Service"], name.as_str());
    assert_eq!(
        e["Service"]["Address"], "",
        "no address given: clients use Node.Address"
    );
    assert_eq!(e["Service"]["Port"], 8001);
    assert_eq!(e["Service"]["Tags"], json!(["v1"]));
    assert_eq!(e["Service"]["Weights"], json!({"Passing": 1, "Warning": 1}));
    assert!(!e["Node"]["Address"].as_str().unwrap().is_empty());
    let c = e["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["CheckID"] == check.as_str())
        .unwrap();
    assert_eq!(c["Type"], "ttl");
    assert_eq!(c["ServiceID"], id.as_str());
    assert_eq!(c["ServiceTags"], json!(["v1"]));
    if consul.fake.is_some() {
        assert_eq!(e["Node"]["Node"], "fake-node");
        assert_eq!(e["Node"]["Datacenter"], "dc1");
        assert_eq!(e["Checks"][0]["CheckID"], "serfHealth");
    }
    assert!(api.health(&name, true).await.1.is_empty());

    api.check(&check, "pass").await;
    assert_eq!(api.health(&name, true).await.1.len(), 1);
    // Warning is not passing.
    api.check(&check, "warn").await;
    assert!(api.health(&name, true).await.1.is_empty());
    let (_, all) = api.health(&name, false).await;
    assert_eq!(status_of(&all[0], &check), "warning");
    // The update endpoint sets the status and the output.
    let got = api
        .request(
            Method::PUT,
            &format!("/v1/agent/check/update/{check}"),
            Some(&json!({"Status": "passing", "Output": "all good"})),
        )
        .await;
    assert_eq!(got.0, StatusCode::OK, "{}", text(&got));
    let (_, passing) = api.health(&name, true).await;
    assert_eq!(passing.len(), 1);
    let out = passing[0]["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["CheckID"] == check.as_str())
        .unwrap()["Output"]
        .clone();
    assert_eq!(out, "all good");
    // Tags filter.
    for (tag, n) in [("v1", 1), ("v2", 0)] {
        let got = api
            .request(
                Method::GET,
                &format!("/v1/health/service/{name}?tag={tag}"),
                None,
            )
            .await;
        assert_eq!(entries(&got).len(), n, "tag {tag}");
    }
    api.check(&check, "fail").await;
    assert!(api.health(&name, true).await.1.is_empty());
    api.deregister(&id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_ids_and_ttl_expiry() {
    let consul = ConsulUnderTest::start().await;
    let api = consul.api();
    let name = unique_name("ids");
    let (one, two) = (format!("{name}-1"), format!("{name}-2"));
    // One check (even in Checks) is service:<id>; several are service:<id>:<n>.
    api.register(json!({"ID": one, "Name": name, "Checks": [{"TTL": "1s", "Status": "passing"}]}))
        .await;
    api.register(json!({
        "ID": two, "Name": name,
        "Check": {"TTL": "30s"},
        "Checks": [{"TTL": "30s", "Name": "second"}],
    }))
    .await;
    let (_, all) = api.health(&name, false).await;
    let ids = |id: &str| -> Vec<String> {
        let e = all.iter().find(|e| e["Service"]["ID"] == id).unwrap();
        let mut ids: Vec<String> = e["Checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["CheckID"].as_str().unwrap().to_string())
            .filter(|c| c != "serfHealth")
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&one), vec![format!("service:{one}")]);
    assert_eq!(
        ids(&two),
        vec![format!("service:{two}:1"), format!("service:{two}:2")]
    );
    let e = all
        .iter()
        .find(|e| e["Service"]["ID"] == two.as_str())
        .unwrap();
    let names: Vec<&str> = e["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["Name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&format!("Service '{name}' check").as_str()),
        "{names:?}"
    );
    assert!(names.contains(&"second"), "{names:?}");

    // A TTL not renewed turns critical.
    let (api, check) = (&api, format!("service:{one}"));
    let (check, name) = (&check, &name);
    eventually(Duration::from_secs(4), move || async move {
        let (_, all) = api.health(name, false).await;
        let e = all
            .iter()
            .find(|e| {
                e["Service"]["Address"].is_string()
                    && e["Checks"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|c| c["CheckID"] == check.as_str())
            })
            .ok_or("gone")?;
        let c = e["Checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["CheckID"] == check.as_str())
            .unwrap();
        if c["Status"] == "critical" && c["Output"].as_str().unwrap().starts_with("TTL expired") {
            Ok(())
        } else {
            Err(format!("{c}"))
        }
    })
    .await;
    api.deregister(&one).await;
    api.deregister(&two).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_follows_the_server_then_deregisters() {
    let consul = ConsulUnderTest::start().await;
    let api = consul.api();
    let code = Arc::new(AtomicU16::new(200));
    let agents = Arc::new(Mutex::new(Vec::new()));
    let addr = status_server(code.clone(), agents.clone()).await;
    let name = unique_name("http");
    let id = format!("{name}-1");
    let check = format!("service:{id}");
    let url = format!("http://{addr}/health");
    api.register(json!({
        "ID": id, "Name": name, "Address": "127.0.0.1", "Port": addr.port(),
        "Check": {"HTTP": url, "Interval": "1s", "DeregisterCriticalServiceAfter": "2s"},
    }))
    .await;

    let (a, n, c) = (&api, &name, &check);
    let expect = format!("HTTP GET {url}: 200 OK Output: ok");
    let expect = &expect;
    eventually(Duration::from_secs(5), move || async move {
        let (_, list) = a.health(n, true).await;
        let e = list.first().ok_or("not passing yet")?;
        let chk = e["Checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["CheckID"] == c.as_str())
            .unwrap();
        if chk["Output"] == expect.as_str() && chk["Type"] == "http" {
            Ok(())
        } else {
            Err(chk.to_string())
        }
    })
    .await;
    assert!(agents
        .lock()
        .unwrap()
        .iter()
        .all(|ua| ua == "Consul Health Check"));
    let (_, list) = api.health(&name, false).await;
    assert_eq!(
        list[0]["Service"]["TaggedAddresses"]["lan_ipv4"],
        json!({"Address": "127.0.0.1", "Port": addr.port()})
    );
    // The agent owns an HTTP check: no TTL updates.
    let got = api
        .request(Method::PUT, &format!("/v1/agent/check/pass/{check}"), None)
        .await;
    assert_eq!(got.0, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        text(&got).contains("does not have associated TTL"),
        "{}",
        text(&got)
    );

    code.store(500, Ordering::SeqCst);
    eventually(Duration::from_secs(5), move || async move {
        let (_, list) = a.health(n, false).await;
        let e = list.first().ok_or("gone too early")?;
        match status_of(e, c).as_str() {
            "critical" => Ok(()),
            other => Err(other.to_string()),
        }
    })
    .await;
    assert!(api.health(&name, true).await.1.is_empty());

    if consul.fake.is_none() {
        // A real agent reaps after at least a minute, every 30 s.
        api.deregister(&id).await;
        return;
    }
    let i = id.clone();
    let i = &i;
    eventually(Duration::from_secs(5), move || async move {
        let (_, list) = a.health(n, false).await;
        if list.is_empty() && a.agent_service(i).await.is_none() {
            Ok(())
        } else {
            Err(format!("{} instances", list.len()))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_index_goes_backwards_and_ends_blocking_queries() {
    let consul = ConsulUnderTest::start().await;
    let Some(fake) = &consul.fake else {
        return;
    };
    let api = consul.api();
    let name = unique_name("restore");
    api.register(json!({"ID": format!("{name}-1"), "Name": name}))
        .await;
    let (before, _) = api.health(&name, false).await;
    assert!(before > 3);
    let blocked = timed_get(
        &api,
        format!("/v1/health/service/{name}?index={before}&wait=10s"),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.set_index(3);
    let (took, got) = blocked.await.unwrap();
    let got = got.unwrap();
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(consul_index(&got), 3);
    assert_eq!(entries(&got).len(), 1);
    assert_eq!(api.health(&name, false).await.0, 3);

    // Changes count on from there; a client still holding the old index blocks on.
    api.register(json!({"ID": format!("{name}-2"), "Name": name}))
        .await;
    assert_eq!(api.health(&name, false).await.0, 4);
    let t = Instant::now();
    let got = api
        .request(
            Method::GET,
            &format!("/v1/health/service/{name}?index={before}&wait=400ms"),
            None,
        )
        .await;
    assert!(
        t.elapsed() >= Duration::from_millis(380),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(consul_index(&got), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_agent_drops_its_services_and_wakes_blockers() {
    let consul = ConsulUnderTest::start().await;
    let Some(fake) = &consul.fake else {
        return;
    };
    let api = consul.api();
    let (web, db) = (unique_name("web"), unique_name("db"));
    api.register(json!({"Name": web, "Check": {"TTL": "30s", "Status": "passing"}}))
        .await;
    api.register(json!({"Name": db})).await;
    let (index, _) = api.health(&web, true).await;
    let blocked = timed_get(
        &api,
        format!("/v1/health/service/{web}?index={index}&wait=10s"),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.forget_agent();
    let (took, got) = blocked.await.unwrap();
    let got = got.unwrap();
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(consul_index(&got) > index);
    assert!(entries(&got).is_empty());
    assert_eq!(api.health(&db, false).await.1.len(), 0);
    let got = api.request(Method::GET, "/v1/agent/services", None).await;
    assert_eq!(text(&got), "{}");
    assert!(api.agent_service(&web).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_service_blocks_on_its_hash() {
    let consul = ConsulUnderTest::start().await;
    let api = consul.api();
    let name = unique_name("hash");
    let id = format!("{name}-1");
    let def = json!({"ID": id, "Name": name, "Port": 8001, "Meta": {"v": "1"}});
    api.register(def.clone()).await;
    let svc = api.agent_service(&id).await.unwrap();
    assert_eq!(svc["ID"], id.as_str());
    assert_eq!(svc["Service"], name.as_str());
    assert_eq!(svc["Port"], 8001);
    assert_eq!(svc["Tags"], json!([]));
    assert_eq!(svc["Meta"], json!({"v": "1"}));
    assert_eq!(svc["Weights"], json!({"Passing": 1, "Warning": 1}));
    let path = format!("/v1/agent/service/{id}");
    let got = api.request(Method::GET, &path, None).await;
    let hash = got.1["x-consul-contenthash"].to_str().unwrap().to_string();
    assert_eq!(entries_obj(&got)["ContentHash"], hash.as_str());
    // Re-registering the same definition changes nothing.
    api.register(def).await;

    let t = Instant::now();
    let got = api
        .request(Method::GET, &format!("{path}?hash={hash}&wait=1s"), None)
        .await;
    let took = t.elapsed();
    assert_eq!(got.1["x-consul-contenthash"], hash.as_str());
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(2500),
        "{took:?}"
    );

    let blocked = timed_get(&api, format!("{path}?hash={hash}&wait=10s"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.register(json!({"ID": id, "Name": name, "Port": 8001, "Meta": {"v": "1"}, "Tags": ["v2"]}))
        .await;
    let (took, got) = blocked.await.unwrap();
    let got = got.unwrap();
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_ne!(got.1["x-consul-contenthash"], hash.as_str());
    assert_eq!(entries_obj(&got)["Tags"], json!(["v2"]));

    let got = api
        .request(Method::GET, &format!("/v1/agent/service/{id}-nope"), None)
        .await;
    assert_eq!(got.0, StatusCode::NOT_FOUND);
    assert!(
        text(&got).starts_with("unknown service ID: "),
        "{}",
        text(&got)
    );
    api.deregister(&id).await;
}

fn entries_obj(got: &Got) -> Value {
    serde_json::from_slice(&got.2).unwrap_or_else(|e| panic!("{e}: {}", text(got)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_read_as_consul_writes_them() {
    let consul = ConsulUnderTest::start().await;
    let api = consul.api();
    let name = unique_name("errors");
    let cases: Vec<(Method, String, Option<Value>, StatusCode, &str)> = vec![
        (
            Method::PUT,
            "/v1/agent/service/register".into(),
            Some(json!({"Port": 1})),
            StatusCode::BAD_REQUEST,
            "Missing service name",
        ),
        (
            Method::PUT,
            "/v1/agent/service/register".into(),
            Some(json!({"Name": name, "Check": {"Name": "x"}})),
            StatusCode::BAD_REQUEST,
            "Invalid check: TTL must be > 0 for TTL checks",
        ),
        (
            Method::PUT,
            format!("/v1/agent/check/pass/{name}-nope"),
            None,
            StatusCode::NOT_FOUND,
            "Unknown check ID",
        ),
        (
            Method::GET,
            format!("/v1/health/service/{name}?wait=soon"),
            None,
            StatusCode::BAD_REQUEST,
            "Invalid wait time",
        ),
        (
            Method::GET,
            format!("/v1/health/service/{name}?index=x"),
            None,
            StatusCode::BAD_REQUEST,
            "Invalid index",
        ),
        (
            Method::GET,
            format!("/v1/health/service/{name}?stale&consistent"),
            None,
            StatusCode::BAD_REQUEST,
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        ),
        (
            Method::GET,
            format!("/v1/health/service/{name}?dc=nowhere"),
            None,
            StatusCode::INTERNAL_SERVER_ERROR,
            "No path to datacenter",
        ),
        (
            Method::GET,
            format!("/v1/health/service/{name}?passing=maybe"),
            None,
            StatusCode::BAD_REQUEST,
            "Invalid value for ?passing",
        ),
        (
            Method::PUT,
            format!("/v1/health/service/{name}"),
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method PUT not allowed",
        ),
    ];
    for (method, path, body, status, starts) in cases {
        let got = api.request(method.clone(), &path, body.as_ref()).await;
        assert_eq!(got.0, status, "{method} {path}: {}", text(&got));
        assert!(
            text(&got).starts_with(starts),
            "{method} {path}: {}",
            text(&got)
        );
    }
    // Go durations: fractions and compound units are fine.
    let got = api
        .request(
            Method::GET,
            &format!("/v1/health/service/{name}?index=1&wait=0.2s"),
            None,
        )
        .await;
    assert_eq!(got.0, StatusCode::OK);
    let got = api.request(Method::GET, "/v1/status/leader", None).await;
    assert_eq!(got.0, StatusCode::OK);
    assert!(
        serde_json::from_slice::<String>(&got.2).is_ok(),
        "{}",
        text(&got)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_cut_refuses_and_resets_then_restore_listens_again() {
    let consul = ConsulUnderTest::start().await;
    let relay = ConsulRelay::start(&consul.agent_url).await;
    let via = ConsulApi::new(&relay.url(), consul.token.clone());
    let name = unique_name("relay");
    let id = format!("{name}-1");
    via.register(json!({"ID": id, "Name": name})).await;
    let (index, list) = via.health(&name, false).await;
    assert_eq!(list.len(), 1);

    let blocked = timed_get(
        &via,
        format!("/v1/health/service/{name}?index={index}&wait=10s"),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.cut();
    let (took, got) = blocked.await.unwrap();
    assert!(
        got.is_err(),
        "a forward in flight survived the cut: {got:?}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
    let refused = TcpStream::connect(relay.addr()).await;
    assert!(refused.is_err(), "the relay still accepts connections");
    assert!(via
        .try_request(Method::GET, &format!("/v1/health/service/{name}"), None)
        .await
        .is_err());

    let port = relay.addr().port();
    relay.restore().await;
    assert_eq!(relay.addr().port(), port);
    let (again, list) = via.health(&name, false).await;
    assert_eq!((again, list.len()), (index, 1));

    let log = relay.requests();
    let blocking = log
        .iter()
        .find(|r| r.query.contains(&format!("index={index}")))
        .expect("the blocking query is logged");
    assert_eq!(blocking.method, "GET");
    assert_eq!(blocking.path, format!("/v1/health/service/{name}"));
    assert_eq!(blocking.token, consul.token);
    assert!(log.windows(2).all(|w| w[0].at <= w[1].at));
    relay.clear_requests();
    assert!(relay.requests().is_empty());
    via.deregister(&id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_index_shift_makes_the_index_go_backwards() {
    let consul = ConsulUnderTest::start().await;
    let direct = consul.api();
    let relay = ConsulRelay::start(&consul.agent_url).await;
    let via = ConsulApi::new(&relay.url(), consul.token.clone());
    let name = unique_name("shift");
    let id = format!("{name}-1");
    direct.register(json!({"ID": id, "Name": name})).await;
    let (upstream, _) = direct.health(&name, false).await;
    assert_eq!(via.health(&name, false).await.0, upstream);

    let shift = 5;
    relay.set_index_shift(shift);
    let (seen, list) = via.health(&name, false).await;
    assert_eq!(seen, upstream.saturating_sub(shift).max(1));
    assert_eq!(list.len(), 1);
    if upstream > shift + 1 {
        // Blocking on the shifted index blocks upstream on the real one.
        let t = Instant::now();
        let got = via
            .request(
                Method::GET,
                &format!("/v1/health/service/{name}?index={seen}&wait=1s"),
                None,
            )
            .await;
        assert!(
            t.elapsed() >= Duration::from_millis(950),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(consul_index(&got), seen);
        let last = relay.requests().pop().unwrap();
        assert_eq!(
            last.query,
            format!("index={seen}&wait=1s"),
            "logged as sent"
        );
    }
    relay.set_index_shift(0);
    assert_eq!(via.health(&name, false).await.0, upstream);
    direct.deregister(&id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_hang_holds_requests_and_answers_until_unhang() {
    let consul = ConsulUnderTest::start().await;
    let direct = consul.api();
    let relay = ConsulRelay::start(&consul.agent_url).await;
    let via = ConsulApi::new(&relay.url(), consul.token.clone());
    let name = unique_name("hang");
    let id = format!("{name}-1");
    direct.register(json!({"ID": id, "Name": name})).await;
    let (index, _) = via.health(&name, false).await;

    // A blocking query in flight when the agent hangs: its answer never comes.
    let blocked = timed_get(
        &via,
        format!("/v1/health/service/{name}?index={index}&wait=1s"),
    );
    eventually(Duration::from_secs(5), || async {
        let n = relay
            .requests()
            .iter()
            .filter(|r| r.query.contains("wait=1s"))
            .count();
        (n == 1)
            .then_some(())
            .ok_or(format!("{n} blocking queries seen"))
    })
    .await;
    relay.hang();
    // New connections are still accepted, and requests read, but not answered.
    let stream = TcpStream::connect(relay.addr()).await;
    assert!(stream.is_ok(), "a hung agent still accepts connections");
    let fresh = timed_get(&via, format!("/v1/health/service/{name}"));
    eventually(Duration::from_secs(5), || async {
        let n = relay.requests().len();
        (n == 3).then_some(()).ok_or(format!("{n} requests logged"))
    })
    .await;
    // Well past the 1 s wait (and its jitter): neither has an answer.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!blocked.is_finished(), "the blocking query was answered");
    assert!(!fresh.is_finished(), "the new request was answered");

    relay.unhang();
    for task in [blocked, fresh] {
        let (_, got) = task.await.unwrap();
        let got = got.expect("answered after unhang");
        assert_eq!(got.0, StatusCode::OK, "{}", text(&got));
        assert_eq!(entries(&got).len(), 1);
    }
    direct.deregister(&id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_fail_answers_errors_as_consul_writes_them() {
    let consul = ConsulUnderTest::start().await;
    let direct = consul.api();
    let relay = ConsulRelay::start(&consul.agent_url).await;
    let via = ConsulApi::new(&relay.url(), consul.token.clone());
    let name = unique_name("fail");
    let id = format!("{name}-1");
    direct.register(json!({"ID": id, "Name": name})).await;
    let health = format!("/v1/health/service/{name}?passing");

    for (status, body, leader) in [
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "No cluster leader",
            "false",
        ),
        (StatusCode::FORBIDDEN, "ACL not found", "true"),
    ] {
        relay.fail("/v1/health/service/", status, body);
        let got = via.request(Method::GET, &health, None).await;
        assert_eq!((got.0, text(&got).as_str()), (status, body));
        assert_eq!(consul_index(&got), 1, "never 0");
        assert_eq!(got.1["x-consul-knownleader"], leader);
        assert!(got.1["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        // Other paths are forwarded.
        assert!(via.agent_service(&id).await.is_some());
        relay.clear_failures();
        let got = via.request(Method::GET, &health, None).await;
        assert_eq!(got.0, StatusCode::OK, "{}", text(&got));
    }
    let failed = relay
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/v1/health/service/"))
        .count();
    assert_eq!(failed, 4, "failed requests are logged too");
    direct.deregister(&id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_delay_carries_out_a_call_the_client_gave_up_on() {
    let consul = ConsulUnderTest::start().await;
    let direct = consul.api();
    let relay = ConsulRelay::start(&consul.agent_url).await;
    let via = ConsulApi::new(&relay.url(), consul.token.clone());
    let name = unique_name("late");
    let id = format!("{name}-1");
    relay.delay(
        Method::PUT,
        "/v1/agent/service/register",
        Duration::from_secs(2),
    );
    let body = json!({"ID": id, "Name": name});
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        via.try_request(Method::PUT, "/v1/agent/service/register", Some(&body)),
    )
    .await;
    assert!(gave_up.is_err(), "answered before the delay: {gave_up:?}");
    assert_eq!(relay.delayed_in_flight(), 1);
    eventually(Duration::from_secs(10), || async {
        match relay.delayed_in_flight() {
            0 => Ok(()),
            n => Err(format!("{n} delayed")),
        }
    })
    .await;
    assert!(
        direct.agent_service(&id).await.is_some(),
        "the delayed registration was carried out"
    );
    let logged = relay.requests();
    let put = logged.iter().find(|r| r.method == "PUT").unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&put.body).unwrap(),
        body,
        "bodies are logged"
    );
    relay.clear_delays();
    via.register(body).await;
    direct.deregister(&id).await;
}
