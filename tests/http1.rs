//! HTTP/1 connection handling against raw sockets: idle parking never cuts, splits or
//! misreads a message — early responses, pipelining, slow readers, slow heads.

mod support;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A raw upstream: records request lines; answers a POST at once without reading its
/// body, and anything else with its path.
async fn raw_upstream() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let line = head.lines().next().unwrap_or("").to_string();
                        record.lock().unwrap().push(line.clone());
                        if line.starts_with("POST") {
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly")
                                .await;
                            // Keep reading and discarding: the body is not wanted.
                            while s.read(&mut chunk).await.unwrap_or(0) > 0 {}
                            return;
                        }
                        let path = line.split(' ').nth(1).unwrap_or("/").to_string();
                        let rsp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{path}",
                            path.len()
                        );
                        if s.write_all(rsp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
            });
        }
    });
    (addr, seen)
}

async fn baton(up: std::net::SocketAddr, park: &str) -> Baton {
    Baton::start(&[
        ("BATON_ROUTES", "*=web"),
        ("BATON_STATIC_SERVICES", &format!("web={up}")),
        ("BATON_IDLE_PARK", park),
        ("BATON_RETRIES", "0"),
    ])
    .await
}

/// Reads one response with a content-length body; `None` when the connection closed
/// or nothing came within `wait`.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>, wait: Duration) -> Option<String> {
    let mut chunk = [0u8; 65536];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                buf.drain(..end + 4 + len);
                return Some(body);
            }
        }
        match tokio::time::timeout(wait, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_still_arriving_after_an_early_response_is_never_read_as_a_request() {
    let (up, seen) = raw_upstream().await;
    let baton = baton(up, "100ms").await;
    let smuggled = b"GET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n";
    let mut s = TcpStream::connect(baton.addr).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: web\r\nContent-Length: {}\r\n\r\n",
        10 + smuggled.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(b"0123456789").await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(
        read_response(&mut s, &mut buf, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("early")
    );
    // Pause well past the park time, then send the rest of the body: it looks like a
    // request, but it is body.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let _ = s.write_all(smuggled).await;
    let after = read_response(&mut s, &mut buf, Duration::from_millis(800)).await;
    assert_eq!(
        after, None,
        "the body's remainder was answered as a request"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(*seen.lock().unwrap(), ["POST /upload HTTP/1.1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipelined_request_split_across_the_park_time_is_answered() {
    let (up, seen) = raw_upstream().await;
    let baton = baton(up, "100ms").await;
    let mut s = TcpStream::connect(baton.addr).await.unwrap();
    // The first request and the start of the second in one write.
    s.write_all(b"GET /first HTTP/1.1\r\nHost: web\r\n\r\nGET /second HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(
        read_response(&mut s, &mut buf, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("/first")
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    s.write_all(b"st: web\r\n\r\n").await.unwrap();
    assert_eq!(
        read_response(&mut s, &mut buf, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("/second")
    );
    assert_eq!(
        *seen.lock().unwrap(),
        ["GET /first HTTP/1.1", "GET /second HTTP/1.1"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_readers_get_whole_bodies() {
    let up = Upstream::start("web", Behaviour::default()).await;
    let baton = Baton::start(&[
        ("BATON_ROUTES", "*=web"),
        ("BATON_STATIC_SERVICES", &format!("web={}", up.addr)),
        ("BATON_IDLE_PARK", "300ms"),
        ("BATON_WORKERS", "1"),
    ])
    .await;
    // Clients that ask, then stop reading for longer than the park time while baton
    // holds what the small receive buffer could not take.
    let addr = baton.addr;
    let trials: Vec<_> = (0..16usize)
        .map(|i| {
            let n = (64 << 10) + i * (192 << 10);
            tokio::spawn(async move {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.set_recv_buffer_size(32 << 10).unwrap();
                let mut s = socket.connect(addr).await.unwrap();
                s.write_all(format!("GET /bytes/{n} HTTP/1.1\r\nHost: web\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let mut got = Vec::new();
                let mut chunk = vec![0u8; 1 << 20];
                let body = loop {
                    let read =
                        tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await;
                    let k = read.unwrap_or(Ok(0)).unwrap_or(0);
                    got.extend_from_slice(&chunk[..k]);
                    let start = got.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
                    match start {
                        Some(b) if got.len() - b >= n || k == 0 => break got[b..].to_vec(),
                        None if k == 0 => break Vec::new(),
                        _ => {}
                    }
                };
                (n, sha256(&body) == sha256(&pattern(n)), body.len())
            })
        })
        .collect();
    for t in trials {
        let (n, intact, len) = t.await.unwrap();
        assert!(intact, "a {n}-byte body arrived as {len} bytes");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parked_connection_closes_at_shutdown_and_an_unparsed_first_request_is_answered() {
    let (up, _) = raw_upstream().await;
    let mut baton = baton(up, "50ms").await;
    // A connection that idles into the parked state.
    let mut parked = TcpStream::connect(baton.addr).await.unwrap();
    parked
        .write_all(b"GET /a HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    assert!(read_response(&mut parked, &mut buf, Duration::from_secs(5))
        .await
        .is_some());
    wait_metric(&baton, "baton_idle_parks_total", 1.0).await;
    // A connection whose first request has begun, but not ended, when the drain does.
    let mut fresh = TcpStream::connect(baton.addr).await.unwrap();
    fresh.write_all(b"GET /b HTTP/1.1\r\nHo").await.unwrap();
    baton.signal("TERM");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), parked.read_to_end(&mut rest))
        .await
        .expect("closed");
    assert_eq!(n.unwrap_or(0), 0, "a parked connection just closes");
    // Draining (no longer ready) before the rest of the head arrives.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while get(baton.admin, "/ready").await.0 != http::StatusCode::SERVICE_UNAVAILABLE {
        assert!(std::time::Instant::now() < deadline, "never drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fresh.write_all(b"st: web\r\n\r\n").await.unwrap();
    let answer = read_all(&mut fresh).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "answered, then closed: {answer}"
    );
    assert!(answer.ends_with("\r\n\r\n/b"), "{answer}");
    let exit = tokio::task::spawn_blocking(move || baton.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrades_become_tunnels_and_connect_is_refused() {
    // An endpoint that accepts an upgrade, then echoes bytes upper-cased.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                assert!(head.contains("connection: upgrade"), "{head}");
                assert!(head.contains("upgrade: websocket"), "{head}");
                s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                    .await
                    .unwrap();
                let mut buf = [0u8; 1024];
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    let upper: Vec<u8> = buf[..n].to_ascii_uppercase();
                    if s.write_all(&upper).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let baton = baton(up, "50ms").await;
    let mut s = TcpStream::connect(baton.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).await.unwrap(), 1);
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    // Longer than the park time: a tunnel is never parked.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for word in [&b"hello"[..], b"tunnel"] {
        s.write_all(word).await.unwrap();
        let mut echo = vec![0u8; word.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echo, word.to_ascii_uppercase());
    }

    let mut c = TcpStream::connect(baton.addr).await.unwrap();
    c.write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let got = read_response(&mut c, &mut buf, Duration::from_secs(5)).await;
    assert_eq!(got.as_deref(), Some("CONNECT is not supported\n"));
}

/// Waits (up to 10 s) until baton's metric `series` reaches `at_least`.
async fn wait_metric(baton: &Baton, series: &str, at_least: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric(&baton.metrics().await, series) < at_least {
        assert!(
            std::time::Instant::now() < deadline,
            "{series} never reached {at_least}; log:\n{}",
            baton.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (up to 10 s) until baton has logged a line containing every one of `parts`.
async fn wait_log_line(baton: &Baton, parts: &[&str]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = baton.log();
        if log.lines().any(|l| parts.iter().all(|p| l.contains(p))) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no log line with {parts:?}; log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads until baton closes the connection (panics after 5 s).
async fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("baton closes the connection");
    String::from_utf8_lossy(&out).into_owned()
}

/// A keep-alive connection to `baton` whose first request (`GET /a`) was answered, and
/// its client address as baton logs it.
async fn first_request(baton: &Baton) -> (TcpStream, String) {
    let mut s = TcpStream::connect(baton.addr).await.unwrap();
    let client = s.local_addr().unwrap().to_string();
    s.write_all(b"GET /a HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let first = read_response(&mut s, &mut buf, Duration::from_secs(5)).await;
    assert_eq!(first.as_deref(), Some("/a"));
    (s, client)
}

const MALFORMED: &[u8] = b"GET /bad HTTP/1.1\r\nHost: web\r\nthis line has no colon\r\n\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_second_request_after_a_park_gets_batons_400() {
    let (up, seen) = raw_upstream().await;
    let baton = baton(up, "50ms").await;
    let (mut s, client) = first_request(&baton).await;
    // The keep-alive connection parks; its next head is checked by baton.
    wait_metric(&baton, "baton_idle_parks_total", 1.0).await;
    s.write_all(MALFORMED).await.unwrap();
    let text = read_all(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(
        text.contains("\r\nx-baton-error: bad-request\r\n"),
        "{text}"
    );
    assert!(
        text.ends_with("\r\n\r\nmalformed request: invalid header name\n"),
        "{text}"
    );
    assert_eq!(
        metric(&baton.metrics().await, "baton_bad_requests_total"),
        1.0
    );
    wait_log_line(&baton, &["rejecting malformed request", &client]).await;
    assert_eq!(*seen.lock().unwrap(), ["GET /a HTTP/1.1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_second_request_on_a_live_connection_is_counted_and_logged() {
    let (up, seen) = raw_upstream().await;
    // Never parked during the test: hyper reads the second head itself.
    let baton = baton(up, "30s").await;
    let (mut s, client) = first_request(&baton).await;
    s.write_all(MALFORMED).await.unwrap();
    let text = read_all(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    wait_metric(&baton, "baton_bad_requests_total", 1.0).await;
    wait_log_line(
        &baton,
        &["malformed request rejected by the HTTP server", &client],
    )
    .await;
    assert_eq!(*seen.lock().unwrap(), ["GET /a HTTP/1.1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn baton_and_hyper_agree_on_the_header_count_limit() {
    let (up, seen) = raw_upstream().await;
    let baton = baton(up, "30s").await;
    let head = |n: usize| {
        let mut h = String::from("GET /many HTTP/1.1\r\nHost: web\r\n");
        for i in 1..n {
            h.push_str(&format!("x-h{i}: v\r\n"));
        }
        h + "\r\n"
    };
    // At the limit (100 headers, Host included): answered.
    let mut s = TcpStream::connect(baton.addr).await.unwrap();
    s.write_all(head(100).as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let got = read_response(&mut s, &mut buf, Duration::from_secs(5)).await;
    assert_eq!(got.as_deref(), Some("/many"));
    // One more, as a connection's first request: baton's 431.
    let mut s = TcpStream::connect(baton.addr).await.unwrap();
    s.write_all(head(101).as_bytes()).await.unwrap();
    let text = read_all(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
    assert!(text.ends_with("too many request headers\n"), "{text}");
    assert_eq!(*seen.lock().unwrap(), ["GET /many HTTP/1.1"]);
}
