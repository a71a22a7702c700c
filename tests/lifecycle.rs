//! The process: configuration errors, the admin server, graceful shutdown, the demo.

mod support;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[test]
fn invalid_configuration_exits_2_naming_every_variable() {
    let (status, stderr) = run_to_exit(
        &[
            ("BATON_LB", "fastest"),
            ("BATON_INBOUND_ADDR", "localhost"),
            ("BATON_DETECT_TIMEOUT", "10"),
            ("BATON_ROUTES", "*=web"),
        ],
        &[],
    );
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("BATON_LB=\"fastest\": expected p2c, rr or hash"),
        "{stderr}"
    );
    assert!(
        stderr.contains("BATON_INBOUND_ADDR=\"localhost\": expected IP:PORT"),
        "{stderr}"
    );
    assert!(
        stderr.contains("BATON_DETECT_TIMEOUT=\"10\": expected a duration"),
        "{stderr}"
    );
    assert!(
        stderr.contains("BATON_ROUTES=\"*=web\": routes to \"web\" not defined"),
        "{stderr}"
    );
    assert!(stderr.contains("4 problems"), "{stderr}");
}

#[test]
fn handoff_without_a_usable_key_exits_2() {
    let (status, stderr) = run_to_exit(&[("BATON_HANDOFF", "on")], &[]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("BATON_HANDOFF_KEY_FILE=\"\": required when BATON_HANDOFF=on"),
        "{stderr}"
    );
    let short = std::env::temp_dir().join(format!("baton-short-key-{}", std::process::id()));
    std::fs::write(&short, "too short\n").unwrap();
    let (status, stderr) = run_to_exit(
        &[
            ("BATON_HANDOFF", "on"),
            ("BATON_HANDOFF_KEY_FILE", short.to_str().unwrap()),
            ("BATON_HANDOFF_FE_CIDRS", "10.0.0.0/33"),
        ],
        &[],
    );
    let _ = std::fs::remove_file(&short);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the key is 9 bytes; at least 32"),
        "{stderr}"
    );
    assert!(
        stderr.contains("BATON_HANDOFF_FE_CIDRS=\"10.0.0.0/33\""),
        "{stderr}"
    );
}

#[test]
fn unknown_arguments_exit_2() {
    let (status, stderr) = run_to_exit(&[], &["frobnicate"]);
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("usage: baton"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_port_fails_startup_naming_the_variable() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (status, stderr) = run_to_exit(
        &[
            ("BATON_INBOUND_ADDR", &addr),
            ("BATON_ADMIN_ADDR", &free_addr().to_string()),
        ],
        &[],
    );
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains(&format!("BATON_INBOUND_ADDR={addr}")),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_endpoints_report_state() {
    let up = Upstream::start("web", Behaviour::default()).await;
    let baton = Baton::start(&[
        ("BATON_ROUTES", "path:/api=web"),
        ("BATON_STATIC_SERVICES", &format!("web={}", up.addr)),
        ("BATON_REQUEST_TIMEOUT", "7s"),
    ])
    .await;
    assert_eq!(get(baton.admin, "/live").await.0, StatusCode::OK);
    let (status, _, body) = get(baton.admin, "/ready").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ready\n"[..]));
    assert_eq!(get(baton.admin, "/nope").await.0, StatusCode::NOT_FOUND);

    let (_, headers, body) = get(baton.admin, "/config").await;
    assert_eq!(headers["content-type"], "application/json");
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["request_timeout"], "7s");
    assert_eq!(json["routes"][0]["match"], "path:/api");
    assert_eq!(json["routes"][0]["logical"]["service"], "web");

    get(baton.addr, "/api/x").await;
    let m = baton.metrics().await;
    assert_eq!(metric(&m, "baton_ready"), 1.0);
    assert_eq!(metric(&m, "baton_endpoints{service=\"web\"}"), 1.0);
    assert_eq!(
        metric(&m, "baton_requests_total{service=\"web\",status=\"200\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "baton_request_duration_seconds_count{service=\"web\"}"),
        1.0
    );
    assert!(m.contains("# TYPE baton_request_duration_seconds histogram"));
    let series = format!(
        "baton_balancer_choices_total{{service=\"web\",endpoint=\"{}\"}}",
        up.addr
    );
    assert_eq!(metric(&m, &series), 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_an_in_flight_request_then_exits_0() {
    let up = Upstream::start("web", Behaviour::default()).await;
    let mut baton = Baton::start(&[
        ("BATON_ROUTES", "*=web"),
        ("BATON_STATIC_SERVICES", &format!("web={}", up.addr)),
    ])
    .await;
    let addr = baton.addr;
    let slow = tokio::spawn(async move { get(addr, "/slow/1500").await });
    // An idle keep-alive connection must not hold the shutdown up.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    while up.hits() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    baton.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _, body) = get(baton.admin, "/ready").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "not ready while draining"
    );
    assert_eq!(body, "not ready: draining\n");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no new connections while draining"
    );
    let n = idle.read(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0, "idle keep-alive connection closed at once");

    let (status, _, body) = slow.await.unwrap();
    assert_eq!(status, StatusCode::OK, "the in-flight request completed");
    assert_eq!(body, "web");
    let exit = tokio::task::spawn_blocking(move || baton.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_grace_period_bounds_shutdown() {
    let up = Upstream::start("web", Behaviour::default()).await;
    let mut baton = Baton::start(&[
        ("BATON_ROUTES", "*=web"),
        ("BATON_STATIC_SERVICES", &format!("web={}", up.addr)),
        ("BATON_SHUTDOWN_GRACE", "300ms"),
    ])
    .await;
    let addr = baton.addr;
    let stuck = tokio::spawn(async move { try_get(addr, "/slow/30000", &[]).await });
    while up.hits() < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    baton.signal("TERM");
    let log = tokio::task::spawn_blocking(move || {
        let exit = baton.wait_exit(Duration::from_secs(10));
        (exit, baton.log())
    });
    let (exit, log) = log.await.unwrap();
    assert_eq!(exit.code(), Some(0));
    assert!(
        log.contains("grace period over; closing the remaining connections"),
        "ended by the grace period, not by the request: {log}"
    );
    assert!(
        stuck.await.unwrap().is_err(),
        "the request past the grace period was cut"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_connections_get_goaway_and_finish_streams() {
    let up = Upstream::start("web", Behaviour::default()).await;
    let mut baton = Baton::start(&[
        ("BATON_ROUTES", "*=web"),
        ("BATON_STATIC_SERVICES", &format!("web={}", up.addr)),
    ])
    .await;
    let client = http2_client();
    let req = Request::get(format!("http://{}/", baton.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&client, req).await.unwrap().0, StatusCode::OK);
    let addr = baton.addr;
    let c = client.clone();
    let slow = tokio::spawn(async move {
        let req = Request::get(format!("http://{addr}/slow/800"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        send(&c, req).await
    });
    while up.hits() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    baton.signal("TERM");
    let (status, _, _) = slow.await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    let exit = tokio::task::spawn_blocking(move || baton.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_per_line() {
    let baton = Baton::start(&[
        ("BATON_ROUTES", "*=web"),
        ("BATON_STATIC_SERVICES", "web="),
        ("BATON_LOG_FORMAT", "json"),
    ])
    .await;
    get(baton.addr, "/").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = baton.log();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 2, "{log}");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string());
    }
    assert!(
        log.contains("\"service\":\"web\""),
        "the 503 is logged with its service: {log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_proxies_to_its_own_upstreams() {
    let inbound = free_addr();
    let admin = free_addr();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .arg("demo")
        .env_clear()
        .env("BATON_INBOUND_ADDR", inbound.to_string())
        .env("BATON_ADMIN_ADDR", admin.to_string())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut ready = false;
    for _ in 0..200 {
        if let Ok((StatusCode::OK, _, _)) = try_get(admin, "/ready", &[]).await {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut bodies = Vec::new();
    if ready {
        for _ in 0..2 {
            bodies.push(String::from_utf8(get(inbound, "/hi").await.2.to_vec()).unwrap());
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(ready, "demo never became ready");
    assert!(
        bodies
            .iter()
            .all(|b| b.starts_with("hello from demo upstream ") && b.contains("GET /hi")),
        "{bodies:?}"
    );
    assert_ne!(
        bodies[0], bodies[1],
        "the demo balances round-robin over two upstreams"
    );
}

/// Opens an HTTP/2 connection that sends the preface and a SETTINGS frame, then
/// nothing, and reads until baton closes it.
async fn silent_h2_client(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap(); // empty SETTINGS
    s
}

async fn read_until_closed(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            _ => {}
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_http2_connection_is_closed() {
    let up = Upstream::start("web", Behaviour::default()).await;
    let baton = Baton::start(&[
        ("BATON_ROUTES", "*=web"),
        ("BATON_STATIC_SERVICES", &format!("web={}", up.addr)),
        ("BATON_HEADER_READ_TIMEOUT", "300ms"),
    ])
    .await;
    let mut s = silent_h2_client(baton.addr).await;
    assert!(
        read_until_closed(&mut s, Duration::from_secs(10)).await,
        "an HTTP/2 client that only sent its preface holds a task"
    );
    assert_eq!(
        metric(&baton.metrics().await, "baton_open_connections"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_http2_client_does_not_hold_up_shutdown() {
    let up = Upstream::start("web", Behaviour::default()).await;
    let mut baton = Baton::start(&[
        ("BATON_ROUTES", "*=web"),
        ("BATON_STATIC_SERVICES", &format!("web={}", up.addr)),
    ])
    .await;
    let mut s = silent_h2_client(baton.addr).await;
    // Accepted and detected as HTTP/2 before the signal.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        &baton.metrics().await,
        "baton_connections_total{protocol=\"http2\"}",
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "{}", baton.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    baton.signal("TERM");
    assert!(read_until_closed(&mut s, Duration::from_secs(10)).await);
    let (exit, log) = tokio::task::spawn_blocking(move || {
        let exit = baton.wait_exit(Duration::from_secs(10));
        (exit, baton.log())
    })
    .await
    .unwrap();
    assert_eq!(exit.code(), Some(0));
    // The grace period is 30s; a silent peer must not use it up.
    assert!(log.contains("all connections drained"), "{log}");
    assert!(!log.contains("grace period over"), "{log}");
}

/// Waits until baton's own code runs with SIGTERM, SIGINT and SIGHUP held: the first
/// moment a signal can be told apart from one sent before the process image started
/// (which no program can catch). baton holds them from its first initialiser on, in
/// every thread it starts, until its handlers are installed; its runtime's threads keep
/// the mask, so one of them shows it at any later moment too.
fn wait_signals_held(baton: &Baton) {
    // Bit n-1 for signal n: SIGTERM (15), SIGINT (2), SIGHUP (1).
    const HELD: u64 = (1 << 14) | (1 << 1) | 1;
    let deadline = Instant::now() + Duration::from_secs(10);
    let tasks = format!("/proc/{}/task", baton.pid());
    loop {
        let held = std::fs::read_dir(&tasks)
            .into_iter()
            .flatten()
            .flatten()
            .any(|t| {
                let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("SigBlk:"))
                    .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
                    .is_some_and(|m| m & HELD == HELD)
            });
        if held {
            return;
        }
        assert!(Instant::now() < deadline, "baton never held its signals");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_during_startup_does_not_kill_baton() {
    let up = Upstream::start("web", Behaviour::default()).await;
    let baton = Baton::spawn(&[
        ("BATON_ROUTES", "*=web"),
        ("BATON_STATIC_SERVICES", &format!("web={}", up.addr)),
    ]);
    wait_signals_held(&baton);
    baton.signal("HUP");
    baton.wait_ready().await;
    assert_eq!(get(baton.addr, "/").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_startup_exits_0_once_started() {
    let up = Upstream::start("web", Behaviour::default()).await;
    let mut baton = Baton::spawn(&[
        ("BATON_ROUTES", "*=web"),
        ("BATON_STATIC_SERVICES", &format!("web={}", up.addr)),
    ]);
    wait_signals_held(&baton);
    baton.signal("TERM");
    let (exit, log) = tokio::task::spawn_blocking(move || {
        let exit = baton.wait_exit(Duration::from_secs(10));
        (exit, baton.log())
    })
    .await
    .unwrap();
    assert_eq!(exit.code(), Some(0), "{log}");
    assert!(log.contains("shutting down"), "drained, not killed: {log}");
}

#[tokio::test]
async fn connections_waiting_in_the_backlog_at_sigterm_are_served() {
    let up = Upstream::start("up", Behaviour::default()).await;
    let mut baton = route_all("web", &[&up], &[("BATON_WORKERS", "1")]).await;
    // Frozen, baton accepts nothing: the kernel completes the handshakes and queues
    // the connections (and their requests) in the listen backlog.
    baton.signal("STOP");
    let addr = baton.addr;
    let clients: Vec<_> = (0..20)
        .map(|i| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.expect("the kernel accepts");
                let req = format!("GET /{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                s.write_all(req.as_bytes()).await.unwrap();
                let mut rsp = Vec::new();
                let read = s.read_to_end(&mut rsp).await;
                (read.map(|_| rsp).map_err(|e| e.to_string()), i)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SIGTERM arrives as baton wakes up: whatever it had not accepted yet must still
    // be answered, not reset with the listener.
    baton.signal("TERM");
    baton.signal("CONT");
    for c in clients {
        let (rsp, i) = c.await.unwrap();
        let rsp = rsp.unwrap_or_else(|e| panic!("client {i}: {e}\n{}", baton.log()));
        let text = String::from_utf8_lossy(&rsp);
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "client {i}: {text:?}\n{}",
            baton.log()
        );
    }
    assert!(baton.wait_exit(Duration::from_secs(10)).success());
}
