//! Proxying through a real baton process to real upstreams on loopback: bodies,
//! headers, HTTP versions, opaque TCP, and every error a client can get.

mod support;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::Full;
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test(flavor = "multi_thread")]
async fn proxies_with_forwarding_headers_and_without_hop_by_hop() {
    let up = Upstream::start("web", Behaviour::default()).await;
    let baton = route_all("web", &[&up], &[]).await;

    let got = try_get(
        baton.addr,
        "/headers",
        &[
            ("x-forwarded-for", "192.0.2.7"),
            ("connection", "x-secret"),
            ("x-secret", "1"),
            ("x-kept", "yes"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(got.0, StatusCode::OK);
    let headers = String::from_utf8(got.2.to_vec()).unwrap();
    assert!(
        headers.contains("x-forwarded-for: 192.0.2.7, 127.0.0.1\n"),
        "{headers}"
    );
    assert!(
        headers.contains("forwarded: for=127.0.0.1;proto=http\n"),
        "{headers}"
    );
    assert!(
        headers.contains(&format!("host: {}\n", baton.addr)),
        "the client's Host is kept: {headers}"
    );
    assert!(headers.contains("x-kept: yes\n"));
    assert!(
        !headers.contains("x-secret"),
        "headers named in Connection are removed: {headers}"
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_mib_bodies_pass_intact_both_ways() {
    let up = Upstream::start("web", Behaviour::default()).await;
    let baton = route_all("web", &[&up], &[]).await;
    const N: usize = 10 << 20;

    // Response body.
    let (status, _, body) = get(baton.addr, &format!("/bytes/{N}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), N);
    assert_eq!(sha256(&body), sha256(&pattern(N)));

    // Request body, echoed back (streamed both ways).
    let payload = pattern(N);
    let req = Request::post(format!("http://{}/echo", baton.addr))
        .body(Full::new(payload.clone()))
        .unwrap();
    let (status, _, body) = send(&http1_client(), req).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sha256(&body), sha256(&payload));

    // Same over HTTP/2 from the client.
    let req = Request::post(format!("http://{}/echo", baton.addr))
        .body(Full::new(payload.clone()))
        .unwrap();
    let (status, headers, body) = send(&http2_client(), req).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers["x-version"], "HTTP/2.0",
        "auto keeps HTTP/2 upstream"
    );
    assert_eq!(sha256(&body), sha256(&payload));
}

#[tokio::test(flavor = "multi_thread")]
async fn keep_alive_connections_are_reused() {
    let up = Upstream::start("web", Behaviour::default()).await;
    let baton = route_all("web", &[&up], &[]).await;
    // One client connection, twenty requests on it.
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(baton.addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(io)
        .await
        .unwrap();
    tokio::spawn(conn);
    for i in 0..20 {
        let req = Request::get(format!("/{i}"))
            .header("host", "web")
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.ready().await.unwrap();
        let rsp = sender.send_request(req).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        http_body_util::BodyExt::collect(rsp.into_body())
            .await
            .unwrap();
    }
    let m = baton.metrics().await;
    assert_eq!(
        metric(&m, "baton_connections_total{protocol=\"http1\"}"),
        1.0,
        "one client connection for 20 requests"
    );
    assert_eq!(
        metric(&m, "baton_requests_total{service=\"web\",status=\"200\"}"),
        20.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_upstreams_and_version_translation() {
    let h2 = h2_upstream("grpc").await;
    let baton = route_all(
        "grpc",
        &[&h2],
        &[("BATON_UPSTREAM_PROTOCOL_OVERRIDES", "grpc=http2")],
    )
    .await;
    // An HTTP/1.1 client reaches an HTTP/2-only upstream.
    let got = get(baton.addr, "/headers").await;
    assert_eq!(got.0, StatusCode::OK);
    assert_eq!(got.1["x-version"], "HTTP/2.0");
    let headers = String::from_utf8(got.2.to_vec()).unwrap();
    assert!(headers.contains("x-forwarded-for: 127.0.0.1"), "{headers}");
    // And an HTTP/2 client too.
    let req = Request::get(format!("http://{}/x", baton.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = send(&http2_client(), req).await.unwrap();
    assert_eq!(got.0, StatusCode::OK);
    assert_eq!(got.1["x-upstream"], "grpc");

    // An HTTP/2 client to an HTTP/1-only path.
    let h1 = Upstream::start("legacy", Behaviour::default()).await;
    let baton = route_all("legacy", &[&h1], &[("BATON_UPSTREAM_PROTOCOL", "http1")]).await;
    let req = Request::get(format!("http://{}/headers", baton.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = send(&http2_client(), req).await.unwrap();
    assert_eq!(got.0, StatusCode::OK);
    assert_eq!(got.1["x-version"], "HTTP/1.1");
    let headers = String::from_utf8(got.2.to_vec()).unwrap();
    assert!(
        headers.contains(&format!("host: {}", baton.addr)),
        "the :authority became Host: {headers}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_select_services_and_unknown_routes_get_404() {
    let web = Upstream::start("web", Behaviour::default()).await;
    let objects = Upstream::start("objects", Behaviour::default()).await;
    let meta = Upstream::start("meta", Behaviour::default()).await;
    let svc = format!(
        "{};{};{}",
        services("web", &[&web]),
        services("objects", &[&objects]),
        services("meta", &[&meta])
    );
    let baton = Baton::start(&[
        (
            "BATON_ROUTES",
            "path:/objects=objects;host:meta=meta;path:/web=web",
        ),
        ("BATON_STATIC_SERVICES", &svc),
    ])
    .await;
    assert_eq!(upstream_of(&get(baton.addr, "/objects/1").await), "objects");
    assert_eq!(
        upstream_of(
            &try_get(baton.addr, "/x", &[("host", "meta")])
                .await
                .unwrap()
        ),
        "meta"
    );
    assert_eq!(
        upstream_of(&get(baton.addr, "/web/index.html").await),
        "web"
    );
    let (status, headers, body) = get(baton.addr, "/nowhere").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers["x-baton-error"], "no-route");
    assert_eq!(
        body.iter().filter(|b| **b == b'\n').count(),
        1,
        "one-line body"
    );
    assert!(String::from_utf8_lossy(&body).contains("/nowhere"));
    let m = baton.metrics().await;
    assert_eq!(metric(&m, "baton_unrouted_requests_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_endpoints_is_503() {
    let baton = Baton::start(&[
        ("BATON_ROUTES", "*=empty"),
        ("BATON_STATIC_SERVICES", "empty="),
    ])
    .await;
    let (status, headers, body) = get(baton.addr, "/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-baton-error"], "no-endpoints");
    assert_eq!(body, "no endpoints available for service empty\n");
    let m = baton.metrics().await;
    assert_eq!(
        metric(&m, "baton_requests_total{service=\"empty\",status=\"503\"}"),
        1.0
    );
    assert!(
        baton.logged("service=empty").await,
        "the failure is logged with its target"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_upstream_is_502_after_bounded_retries() {
    let dead = free_addr();
    let baton = Baton::start(&[
        ("BATON_ROUTES", "*=web"),
        ("BATON_STATIC_SERVICES", &format!("web={dead}")),
        ("BATON_RETRIES", "2"),
    ])
    .await;
    let (status, headers, body) = get(baton.addr, "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["x-baton-error"], "connect-refused");
    assert_eq!(body, "service web refused the connection\n");
    // The client is not told where; the log is.
    assert!(
        baton.logged(&dead.to_string()).await,
        "the log names the endpoint"
    );
    // Three attempts (one plus two retries), all on the dead endpoint.
    let m = baton.metrics().await;
    let series = format!("baton_balancer_choices_total{{service=\"web\",endpoint=\"{dead}\"}}");
    assert_eq!(metric(&m, &series), 3.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_move_idempotent_requests_off_a_dead_endpoint() {
    let live = Upstream::start("live", Behaviour::default()).await;
    let dead = free_addr();
    let baton = Baton::start(&[
        ("BATON_ROUTES", "*=web"),
        (
            "BATON_STATIC_SERVICES",
            &format!("web={dead},{}", live.addr),
        ),
        ("BATON_LB", "rr"),
        ("BATON_RETRIES", "1"),
        // Retries alone (ejection would take the dead endpoint out).
        ("BATON_EJECT_FAILURES", "0"),
    ])
    .await;
    for _ in 0..10 {
        let (status, _, _) = get(baton.addr, "/").await;
        assert_eq!(status, StatusCode::OK, "GET retried on the live endpoint");
    }
    // A POST is not retried: the dead endpoint's turn fails it.
    let client = http1_client();
    let mut failures = 0;
    for _ in 0..4 {
        let req = Request::post(format!("http://{}/", baton.addr))
            .body(Full::new(Bytes::new()))
            .unwrap();
        if send(&client, req).await.unwrap().0 == StatusCode::BAD_GATEWAY {
            failures += 1;
        }
    }
    assert_eq!(
        failures, 2,
        "round-robin sends every other POST to the dead endpoint"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_refusing_connections_is_ejected_for_every_balancer() {
    // PeakEWMA alone would rate a refusing endpoint the fastest (it fails at once), so
    // p2c would keep choosing it; ejection takes it out after 3 connect failures.
    for lb in ["p2c", "rr", "hash"] {
        let live = Upstream::start("live", Behaviour::default()).await;
        let dead = free_addr();
        let baton = Baton::start(&[
            ("BATON_ROUTES", "*=web"),
            (
                "BATON_STATIC_SERVICES",
                &format!("web={dead},{}", live.addr),
            ),
            ("BATON_LB", lb),
            ("BATON_HASH_KEY", "header:x-user"),
            // Long enough that it does not come back during the test.
            ("BATON_EJECT_TIME", "1m"),
            ("BATON_EJECT_TIME_MAX", "1m"),
        ])
        .await;
        // POSTs are never retried: each one the balancer gives the dead endpoint fails.
        let client = http1_client();
        let mut failures = 0;
        for i in 0..60 {
            let req = Request::post(format!("http://{}/", baton.addr))
                .header("x-user", format!("user-{}", i % 20))
                .body(Full::new(Bytes::new()))
                .unwrap();
            match send(&client, req).await.unwrap().0 {
                StatusCode::OK => {}
                StatusCode::BAD_GATEWAY => failures += 1,
                other => panic!("{lb}: unexpected {other}"),
            }
        }
        assert!(
            failures <= 3,
            "{lb}: {failures} POSTs failed; ejection stops it at 3"
        );
        let m = baton.metrics().await;
        let ejected =
            format!("baton_endpoint_ejections_total{{service=\"web\",endpoint=\"{dead}\"}}");
        assert_eq!(metric(&m, &ejected), 1.0, "{lb}:\n{m}");
        assert_eq!(
            live.hits(),
            60 - failures,
            "{lb}: the rest went to the live one"
        );
        assert!(baton.logged("endpoint ejected").await, "{lb}: logged");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_last_endpoint_is_never_ejected() {
    // Both endpoints refuse: one is ejected, the other stays in, so requests fail fast
    // with 502 instead of waiting for an ejection to end.
    let (a, b) = (free_addr(), free_addr());
    let baton = Baton::start(&[
        ("BATON_ROUTES", "*=web"),
        ("BATON_STATIC_SERVICES", &format!("web={a},{b}")),
        ("BATON_EJECT_TIME", "1m"),
        ("BATON_EJECT_TIME_MAX", "1m"),
    ])
    .await;
    for _ in 0..10 {
        // Not queued behind an ejection (a minute: the request timeout, 504, first).
        let (status, headers, _) = get(baton.addr, "/").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(headers["x-baton-error"], "connect-refused");
    }
    let m = baton.metrics().await;
    let ejections: f64 = [a, b]
        .iter()
        .map(|e| {
            metric(
                &m,
                &format!("baton_endpoint_ejections_total{{service=\"web\",endpoint=\"{e}\"}}"),
            )
        })
        .sum();
    assert_eq!(ejections, 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_upstream_is_504() {
    let slow = Upstream::start(
        "slow",
        Behaviour {
            delay: Duration::from_secs(5),
            ..Default::default()
        },
    )
    .await;
    let baton = route_all("web", &[&slow], &[("BATON_REQUEST_TIMEOUT", "300ms")]).await;
    let (status, headers, _) = get(baton.addr, "/").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(headers["x-baton-error"], "request-timeout");
}

#[tokio::test(flavor = "multi_thread")]
async fn unanswered_connect_is_504() {
    // A listener whose accept queue is full drops further SYNs: connects hang.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    let baton = Baton::start(&[
        ("BATON_ROUTES", "*=web"),
        ("BATON_STATIC_SERVICES", &format!("web={addr}")),
        ("BATON_CONNECT_TIMEOUT", "200ms"),
        ("BATON_RETRIES", "0"),
    ])
    .await;
    let (status, headers, _) = get(baton.addr, "/").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(headers["x-baton-error"], "connect-timeout");
    drop(socket);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_request_is_400_and_closed() {
    let up = Upstream::start("web", Behaviour::default()).await;
    let baton = route_all("web", &[&up], &[]).await;
    let mut s = TcpStream::connect(baton.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nthis line has no colon\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("closed")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(text.contains("connection: close"));
    assert!(
        text.ends_with("malformed request: invalid header name\n"),
        "{text}"
    );
    assert_eq!(up.hits(), 0, "nothing reached the upstream");

    // Oversized head: 431.
    let mut s = TcpStream::connect(baton.addr).await.unwrap();
    let big = format!("GET / HTTP/1.1\r\nx-big: {}\r\n\r\n", "a".repeat(70_000));
    let _ = s.write_all(big.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("closed");
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 431 "));
    let m = baton.metrics().await;
    assert_eq!(metric(&m, "baton_bad_requests_total"), 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn opaque_tcp_is_balanced_and_forwarded() {
    // Two echo servers that prefix their name.
    let mut addrs = Vec::new();
    for name in ["one", "two"] {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(l.local_addr().unwrap().to_string());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    s.write_all(name.as_bytes()).await.unwrap();
                    loop {
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            let _ = s.shutdown().await;
                            return;
                        }
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }
    let baton = Baton::start(&[
        ("BATON_ROUTES", "*=echo"),
        (
            "BATON_STATIC_SERVICES",
            &format!("echo={}", addrs.join(",")),
        ),
        ("BATON_LB", "rr"),
    ])
    .await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(baton.addr).await.unwrap();
        // Not HTTP: binary bytes, forwarded as they are.
        let payload = pattern(300_000);
        s.write_all(&[0x00, 0x01, 0xff]).await.unwrap();
        s.write_all(&payload).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        let (name, rest) = out.split_at(3);
        seen.push(String::from_utf8_lossy(name).into_owned());
        assert_eq!(&rest[..3], &[0x00, 0x01, 0xff]);
        assert_eq!(sha256(&rest[3..]), sha256(&payload));
    }
    assert_ne!(seen[0], seen[1], "balanced round-robin: {seen:?}");
    assert_eq!(
        (&seen[0], &seen[1]),
        (&seen[2], &seen[3]),
        "balanced round-robin: {seen:?}"
    );
    let m = baton.metrics().await;
    assert_eq!(
        metric(&m, "baton_connections_total{protocol=\"opaque\"}"),
        4.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn server_first_protocols_work_on_opaque_ports() {
    // An upstream that speaks first (a banner), as SMTP or MySQL do.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"220 banner\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        s.write_all(&buf[..n]).await.unwrap();
    });
    let inbound = free_addr();
    let baton = Baton::start(&[
        ("BATON_INBOUND_ADDR", &inbound.to_string()),
        ("BATON_ROUTES", "*=smtp"),
        ("BATON_STATIC_SERVICES", &format!("smtp={up}")),
        ("BATON_OPAQUE_PORTS", &inbound.port().to_string()),
    ])
    .await;
    let mut s = TcpStream::connect(baton.addr).await.unwrap();
    let mut buf = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"220 banner\r\n");
    s.write_all(b"EHLO me\r\n").await.unwrap();
    let mut buf = [0u8; 9];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"EHLO me\r\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_client_is_closed_after_the_detect_timeout() {
    let baton = Baton::start(&[
        ("BATON_ROUTES", "*=web"),
        ("BATON_STATIC_SERVICES", "web="),
        ("BATON_DETECT_TIMEOUT", "1s"),
    ])
    .await;
    let mut s = TcpStream::connect(baton.addr).await.unwrap();
    let mut buf = [0u8; 16];
    // Half the default (10 s): closed within it, baton honoured BATON_DETECT_TIMEOUT.
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("baton must close a silent client after BATON_DETECT_TIMEOUT")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a response");
    let m = baton.metrics().await;
    assert_eq!(metric(&m, "baton_detect_timeouts_total"), 1.0);
    assert_eq!(
        metric(&m, "baton_open_connections"),
        0.0,
        "no task left behind"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn load_is_shed_over_max_in_flight() {
    let slow = Upstream::start(
        "slow",
        Behaviour {
            delay: Duration::from_millis(500),
            ..Default::default()
        },
    )
    .await;
    let baton = route_all("web", &[&slow], &[("BATON_MAX_IN_FLIGHT", "2")]).await;
    let addr = baton.addr;
    let tasks: Vec<_> = (0..5)
        .map(|_| tokio::spawn(async move { get(addr, "/").await.0 }))
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let shed = statuses
        .iter()
        .filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    assert_eq!((ok, shed), (2, 3), "{statuses:?}");
    let m = baton.metrics().await;
    assert_eq!(metric(&m, "baton_load_shed_total"), 3.0);
    // Capacity comes back.
    assert_eq!(get(addr, "/").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn version_is_http11_towards_http1_clients() {
    let up = h2_upstream("web").await;
    let baton = route_all("web", &[&up], &[("BATON_UPSTREAM_PROTOCOL", "http2")]).await;
    let mut s = TcpStream::connect(baton.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    let _ = Version::HTTP_11;
}

/// Sends `GET path` on `s` and reads the test upstream's answer (its body is "web").
async fn exchange(s: &mut TcpStream, path: &str) -> String {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: web\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"web") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(got).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_keep_alive_connections_park_and_resume() {
    let up = Upstream::start("web", Behaviour::default()).await;
    let baton = route_all("web", &[&up], &[("BATON_IDLE_PARK", "100ms")]).await;
    let mut s = TcpStream::connect(baton.addr).await.unwrap();
    let first = exchange(&mut s, "/one").await;
    assert!(first.starts_with("HTTP/1.1 200 OK"), "{first}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let m = baton.metrics().await;
    assert!(
        metric(&m, "baton_idle_parks_total") >= 1.0,
        "the idle connection was parked"
    );
    // The parked connection serves the next request.
    let second = exchange(&mut s, "/two").await;
    assert!(second.starts_with("HTTP/1.1 200 OK"), "{second}");

    // A head that arrives slowly, across more than the park time, is not cut.
    s.write_all(b"GET /three HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(b"Host: web\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200 OK"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let m = baton.metrics().await;
    assert_eq!(
        metric(&m, "baton_connections_total{protocol=\"http1\"}"),
        1.0,
        "one connection throughout"
    );
    assert_eq!(up.hits(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_response_stalled_longer_than_the_park_time_is_not_cut() {
    let up = Upstream::start("web", Behaviour::default()).await;
    let baton = route_all("web", &[&up], &[("BATON_IDLE_PARK", "50ms")]).await;
    let (status, _, body) = get(baton.addr, "/drip/4/200").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), 4000, "every chunk arrived");
    assert_eq!(&body[3000..3005], b"ddddd");
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_upstreams_get_one_connection_whatever_the_host() {
    let h2 = h2_upstream("grpc").await;
    let baton = route_all("grpc", &[&h2], &[("BATON_UPSTREAM_PROTOCOL", "http2")]).await;
    let client = http1_client();
    for i in 0..20 {
        let req = Request::get(format!("http://{}/headers", baton.addr))
            .header("host", format!("tenant-{i}.example"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, _, _) = send(&client, req).await.unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(h2.hits(), 20);
    assert_eq!(
        h2.connections(),
        1,
        "one multiplexed connection, not one per Host"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cookies_split_by_an_http2_client_reach_an_http1_upstream_as_one_line() {
    let up = Upstream::start("web", Behaviour::default()).await;
    let baton = route_all("web", &[&up], &[("BATON_UPSTREAM_PROTOCOL", "http1")]).await;
    let req = Request::get(format!("http://{}/headers", baton.addr))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, body) = send(&http2_client(), req).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let headers = String::from_utf8(body.to_vec()).unwrap();
    assert!(headers.contains("cookie: a=1; b=2\n"), "{headers}");
    assert_eq!(headers.matches("cookie:").count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_resetting_mid_request_is_502_upstream_failed() {
    // Reads the request head, then resets the connection (RST, not FIN).
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let (reset_tx, mut reset_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
            let _ = reset_tx.send(());
        }
    });
    let baton = Baton::start(&[
        ("BATON_ROUTES", "*=web"),
        ("BATON_STATIC_SERVICES", &format!("web={up}")),
        ("BATON_RETRIES", "0"),
    ])
    .await;
    let (status, headers, body) = get(baton.addr, "/reset").await;
    assert!(
        reset_rx.recv().await.is_some(),
        "the upstream reset the request"
    );
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["x-baton-error"], "upstream-failed");
    assert_eq!(body, "service web failed before completing its response\n");
    let m = baton.metrics().await;
    assert_eq!(
        metric(&m, "baton_requests_total{service=\"web\",status=\"502\"}"),
        1.0
    );
}

/// An HTTP/2 upstream that answers `per_conn` requests on each connection and then
/// closes it gracefully (GOAWAY), as a server recycling connections or restarting does.
/// Returns its address and the number of connections it accepted.
async fn recycling_h2_upstream(per_conn: usize) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = l.accept().await else {
                return;
            };
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let served = Arc::new(AtomicUsize::new(0));
                let enough = Arc::new(tokio::sync::Notify::new());
                let (s, e) = (served.clone(), enough.clone());
                let svc = hyper::service::service_fn(move |_req| {
                    if s.fetch_add(1, Ordering::SeqCst) + 1 == per_conn {
                        e.notify_one();
                    }
                    async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    }
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = enough.notified() => conn.as_mut().graceful_shutdown(),
                }
                let _ = conn.await;
            });
        }
    });
    (addr, conns)
}

// Reproduces what is left of the HTTP/2 retry gap (see layers/src/proxy/http.rs): baton
// resends requests hyper hands back unsent, which took the 502s of this run from about
// 40 to a few, but a stream h2 has already queued when the GOAWAY arrives is written
// after h2 acknowledges the server's PING, lands above the final GOAWAY's last stream id
// and fails without its request (hyper consumed it). Passing needs a replayable copy of
// such requests.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "known gap: streams refused above a GOAWAY's last stream id are not resent"]
async fn requests_turned_away_by_a_recycling_http2_upstream_are_resent() {
    let (up, conns) = recycling_h2_upstream(5).await;
    let baton = Baton::start(&[
        ("BATON_ROUTES", "*=grpc"),
        ("BATON_STATIC_SERVICES", &format!("grpc={up}")),
        ("BATON_UPSTREAM_PROTOCOL", "http2"),
        // Only the HTTP/2 client's own resend may save a request.
        ("BATON_RETRIES", "0"),
    ])
    .await;
    let addr = baton.addr;
    let clients: Vec<_> = (0..4)
        .map(|c| {
            tokio::spawn(async move {
                let client = http1_client();
                let mut failed = Vec::new();
                for i in 0..50 {
                    let method = if i % 2 == 0 { "GET" } else { "POST" };
                    let req = Request::builder()
                        .method(method)
                        .uri(format!("http://{addr}/{c}/{i}"))
                        .body(Full::new(Bytes::from_static(b"payload")))
                        .unwrap();
                    match send(&client, req).await {
                        Ok((StatusCode::OK, _, _)) => {}
                        other => failed.push(format!("{method} /{c}/{i}: {other:?}")),
                    }
                }
                failed
            })
        })
        .collect();
    let mut failed = Vec::new();
    for c in clients {
        failed.extend(c.await.unwrap());
    }
    assert!(failed.is_empty(), "{failed:#?}\n{}", baton.log());
    assert!(
        conns.load(Ordering::SeqCst) >= 200 / 5,
        "the upstream recycled its connections"
    );
}
