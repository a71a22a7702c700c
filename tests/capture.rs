//! `baton init` TPROXY capture in a pod-like network namespace (root only): the rules
//! it installs send the pod's inbound TCP to baton, which serves it from the local app
//! (`BATON_ROUTES='*=local'`); excluded ports and baton's own ports bypass it; nothing
//! loops; re-running changes nothing and `--cleanup` restores the namespace; a baton
//! restart drains what it accepted.

mod support;

use std::time::Duration;
use support::netns::Testbed;

const BATON: &str = env!("CARGO_BIN_EXE_baton");

/// The pod's application: HTTP on :8080 and :9090, answering
/// `app PORT from PEER xff X-FORWARDED-FOR`, `/slow/MS` after MS milliseconds, and
/// `/hits` with the number of other requests its port served.
const APP: &str = r#"
import threading, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
hits = {}
lock = threading.Lock()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        port = self.server.server_address[1]
        path = self.path.split("?")[0]
        if path == "/hits":
            with lock:
                body = str(hits.get(port, 0))
        else:
            if path.startswith("/slow/"):
                time.sleep(int(path[6:]) / 1000)
            with lock:
                hits[port] = hits.get(port, 0) + 1
            xff = self.headers.get("x-forwarded-for", "-")
            body = f"app {port} from {self.client_address[0]} xff {xff}"
        body = (body + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
for port in (8080, 9090):
    server = ThreadingHTTPServer(("0.0.0.0", port), H)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
# A server-speaks-first TCP protocol on :7000: a banner naming the peer, then echo.
import socketserver
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(f"banner from {self.client_address[0]}\n".encode())
        while data := self.request.recv(4096):
            self.request.sendall(data)
socketserver.ThreadingTCPServer.allow_reuse_address = True
echo = socketserver.ThreadingTCPServer(("0.0.0.0", 7000), Echo)
echo.daemon_threads = True
threading.Thread(target=echo.serve_forever, daemon=True).start()
threading.Event().wait()
"#;

/// A client of the :7000 protocol: prints the banner and the echo of `ping`.
const ECHO_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], 7000), timeout=5)
f = s.makefile("rb")
banner = f.readline().decode()
s.sendall(b"ping\n")
print(banner + f.readline().decode(), end="")
"#;

fn start_app(bed: &Testbed) {
    bed.spawn("pod", &["python3", "-c", APP], &[]);
    bed.wait_200("pod", "http://127.0.0.1:8080/hits");
    bed.wait_200("pod", "http://127.0.0.1:9090/hits");
}

const CAPTURE_ENV: &[(&str, &str)] = &[("BATON_CAPTURE_EXCLUDE_PORTS", "9090")];

fn init(bed: &Testbed, args: &[&str]) -> String {
    init_with(bed, "BATON_CAPTURE_EXCLUDE_PORTS=9090", args)
}

fn init_with(bed: &Testbed, var: &str, args: &[&str]) -> String {
    let mut cmd = vec!["env", var, BATON, "init"];
    cmd.extend_from_slice(args);
    bed.must("pod", &cmd)
}

fn start_baton(bed: &Testbed, extra: &[(&str, &str)]) -> u32 {
    let mut env = vec![
        ("BATON_INBOUND_MODE", "tproxy"),
        ("BATON_ROUTES", "*=local"),
        ("BATON_WORKERS", "1"),
    ];
    env.extend_from_slice(CAPTURE_ENV);
    env.extend_from_slice(extra);
    let pid = bed.spawn("pod", &[BATON], &env);
    bed.wait_200("pod", "http://127.0.0.1:15021/ready");
    pid
}

/// The sum of baton's metric samples whose series starts with `series`.
fn metric(bed: &Testbed, series: &str) -> u64 {
    let metrics = bed.must("pod", &["curl", "-s", "http://127.0.0.1:15021/metrics"]);
    metrics
        .lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<u64>().ok())
        .sum()
}

/// `baton_requests_total` of the `local` target with status 200.
fn captured(bed: &Testbed) -> u64 {
    metric(
        bed,
        "baton_requests_total{service=\"local\",status=\"200\"} ",
    )
}

/// `baton_requests_total` of the `local` target, every status.
fn handled(bed: &Testbed) -> u64 {
    metric(bed, "baton_requests_total{service=\"local\",")
}

fn app_hits(bed: &Testbed, port: u16) -> u64 {
    bed.must(
        "pod",
        &["curl", "-s", &format!("http://127.0.0.1:{port}/hits")],
    )
    .trim()
    .parse()
    .unwrap()
}

/// The namespace's ruleset, policy rules and routes, to compare.
fn kernel_state(bed: &Testbed) -> String {
    [
        bed.must("pod", &["nft", "list", "ruleset"]),
        bed.must("pod", &["ip", "-4", "rule", "show"]),
        bed.must("pod", &["ip", "-4", "route", "show", "table", "all"]),
    ]
    .join("\n--\n")
}

#[test]
fn inbound_tcp_is_captured_and_served_by_the_local_app() {
    let Some(bed) = Testbed::new(&["client", "pod"]) else {
        return;
    };
    start_app(&bed);
    init(&bed, &[]);
    start_baton(&bed, &[]);
    let (pod, client) = (bed.ip("pod"), bed.ip("client"));

    // Captured: baton counts it, the app answers it (reached at the original
    // destination, over loopback, with the client's address in x-forwarded-for).
    let (status, body) = bed.curl("client", &format!("http://{pod}:8080/hello"));
    assert_eq!(status, 200);
    assert_eq!(body, format!("app 8080 from {pod} xff {client}\n"));
    assert_eq!(captured(&bed), 1);
    // No loop: baton's own connection to the app was not captured again — the app saw
    // exactly one request and baton counted exactly one.
    assert_eq!(app_hits(&bed, 8080), 1);

    // An excluded port bypasses baton: the app sees the client itself.
    let (status, body) = bed.curl("client", &format!("http://{pod}:9090/hello"));
    assert_eq!(status, 200);
    assert_eq!(body, format!("app 9090 from {client} xff -\n"));
    assert_eq!(captured(&bed), 1, "not through baton");

    // baton's own ports stay reachable from outside and are not captured: the admin
    // server answers, and the inbound listener, reached at its own port, is the
    // original destination `local` refuses (it would loop) without touching the app.
    let (status, _) = bed.curl("client", &format!("http://{pod}:15021/live"));
    assert_eq!(status, 200);
    let (status, body) = bed.curl("client", &format!("http://{pod}:15006/own"));
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        app_hits(&bed, 8080),
        1,
        "the app saw only the captured request"
    );

    // Keep-alive: several requests on one captured connection.
    let out = bed.must(
        "client",
        &[
            "curl",
            "-s",
            "--max-time",
            "5",
            &format!("http://{pod}:8080/a"),
            &format!("http://{pod}:8080/b"),
            &format!("http://{pod}:8080/c"),
        ],
    );
    assert_eq!(out.matches("app 8080").count(), 3, "{out}");
    assert_eq!(captured(&bed), 4);
    assert_eq!(app_hits(&bed, 8080), 4);
}

#[test]
fn init_is_idempotent_and_cleanup_restores_the_namespace() {
    let Some(bed) = Testbed::new(&["pod"]) else {
        return;
    };
    let before = kernel_state(&bed);
    init(&bed, &[]);
    let once = kernel_state(&bed);
    assert_ne!(once, before, "init installed something");
    assert!(once.contains("table inet baton_capture"), "{once}");
    assert!(
        once.contains("fwmark 0x20000/0x20000 lookup 15006"),
        "{once}"
    );
    assert!(once.contains("local default dev lo table 15006"), "{once}");
    init(&bed, &[]);
    assert_eq!(
        kernel_state(&bed),
        once,
        "running init twice changes nothing"
    );

    // --dry-run shows what is installed, and changes nothing.
    let printed = init(&bed, &["--dry-run"]);
    assert!(
        printed.contains("tproxy ip to 127.0.0.1:15006"),
        "{printed}"
    );
    assert!(
        printed.contains("tcp dport { 9090, 15006, 15010, 15021 } return"),
        "{printed}"
    );
    assert_eq!(kernel_state(&bed), once);

    init(&bed, &["--cleanup"]);
    assert_eq!(
        kernel_state(&bed),
        before,
        "--cleanup removes exactly what init added"
    );
    init(&bed, &["--cleanup"]);
    assert_eq!(kernel_state(&bed), before, "and is idempotent too");
}

#[test]
fn the_capture_coexists_with_rules_already_there() {
    let Some(bed) = Testbed::new(&["pod"]) else {
        return;
    };
    // Someone else's table and policy rule in the namespace.
    bed.nft(
        "pod",
        "table inet other {
            chain input {
                type filter hook input priority 0; policy accept;
            }
        }",
    );
    bed.must(
        "pod",
        &[
            "ip", "rule", "add", "fwmark", "0x1", "lookup", "100", "pref", "100",
        ],
    );
    // Even at init's own priority and in its own routing table.
    bed.must(
        "pod",
        &[
            "ip", "rule", "add", "fwmark", "0x2", "lookup", "101", "pref", "15006",
        ],
    );
    bed.must(
        "pod",
        &[
            "ip",
            "route",
            "add",
            "local",
            "10.99.0.0/24",
            "dev",
            "lo",
            "table",
            "15006",
        ],
    );
    let before = kernel_state(&bed);
    init(&bed, &[]);
    let after = kernel_state(&bed);
    assert!(after.contains("table inet other"), "{after}");
    assert!(
        after.contains("100:\tfrom all fwmark 0x1 lookup 100"),
        "{after}"
    );
    assert!(
        after.contains("15006:\tfrom all fwmark 0x20000/0x20000 lookup 15006"),
        "{after}"
    );
    init(&bed, &[]);
    assert_eq!(kernel_state(&bed), after, "idempotent beside them");
    init(&bed, &["--cleanup"]);
    assert_eq!(kernel_state(&bed), before);
}

/// `curl` from `host` with a 15 s budget (a SYN dropped while baton restarts is
/// retransmitted after 1 s and 3 s): (status, body), status 0 when it failed.
fn curl_patient(bed: &Testbed, host: &str, url: &str) -> (u16, String) {
    let out = bed.exec(
        host,
        &[
            "curl",
            "-s",
            "--max-time",
            "15",
            "-w",
            "\n%{http_code}",
            url,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn a_restart_under_load_finishes_every_accepted_request() {
    let Some(bed) = Testbed::new(&["client", "pod"]) else {
        return;
    };
    start_app(&bed);
    init(&bed, &[]);
    let baton = start_baton(&bed, &[("BATON_SHUTDOWN_GRACE", "10s")]);
    let (pod, client) = (bed.ip("pod"), bed.ip("client"));
    // Through baton: the app sees baton's connection from the pod's own address, with
    // the client in x-forwarded-for (around baton it would see the client itself).
    let via_baton = format!("app 8080 from {pod} xff {client}\n");

    let stop = std::sync::atomic::AtomicBool::new(false);
    let (slow, load) = std::thread::scope(|s| {
        // Requests baton accepted and the app has not answered yet when SIGTERM comes.
        let slow: Vec<_> = (0..8)
            .map(|i| {
                let (bed, url) = (&bed, format!("http://{pod}:8080/slow/1500?{i}"));
                s.spawn(move || curl_patient(bed, "client", &url))
            })
            .collect();
        // And new connections all the way through the restart, two at a time.
        let load: Vec<_> = (0..2)
            .map(|t| {
                let (bed, stop, pod) = (&bed, &stop, &pod);
                s.spawn(move || {
                    let mut results = Vec::new();
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let url = format!("http://{pod}:8080/load?{t}-{i}");
                        results.push(curl_patient(bed, "client", &url));
                        i += 1;
                    }
                    results
                })
            })
            .collect();
        // Wait until baton holds every slow request (the app counts them on answering,
        // so read baton's gauge of open connections: the 8 plus the load's).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while open_connections(&bed) < 8 {
            assert!(
                std::time::Instant::now() < deadline,
                "slow requests never arrived"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        bed.signal(baton, "TERM");
        assert_eq!(bed.wait_exit(baton, Duration::from_secs(15)), Some(0));
        // A gap with no baton listening, then a new one picks the traffic up.
        std::thread::sleep(Duration::from_millis(300));
        start_baton(&bed, &[]);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let slow: Vec<_> = slow.into_iter().map(|t| t.join().unwrap()).collect();
        let load: Vec<_> = load.into_iter().flat_map(|t| t.join().unwrap()).collect();
        (slow, load)
    });
    for (status, body) in &slow {
        assert_eq!((*status, body.as_str()), (200, via_baton.as_str()));
    }
    // Every connection, also those whose SYN came while no baton listened, was served
    // through a baton: none was lost, none reached the app around it.
    assert!(load.len() >= 4, "load ran through the restart: {load:?}");
    for (status, body) in &load {
        assert_eq!((*status, body.as_str()), (200, via_baton.as_str()));
    }
    assert_eq!(
        app_hits(&bed, 8080),
        (slow.len() + load.len()) as u64,
        "the app served each request once"
    );
}

/// `baton_open_connections` (client connections baton holds).
fn open_connections(bed: &Testbed) -> u64 {
    metric(bed, "baton_open_connections ")
}

#[test]
fn without_baton_new_connections_wait_or_bypass_as_configured() {
    let Some(bed) = Testbed::new(&["client", "pod"]) else {
        return;
    };
    start_app(&bed);
    let (pod, client) = (bed.ip("pod"), bed.ip("client"));
    let url = format!("http://{pod}:8080/nobaton");

    // Closed (the default): no baton listening, the SYN is dropped — the connection
    // neither reaches the app nor is refused; it times out.
    init(&bed, &[]);
    let out = bed.exec(
        "client",
        &[
            "curl",
            "-s",
            "--connect-timeout",
            "2",
            "-w",
            "%{http_code}",
            &url,
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(28),
        "curl timed out connecting: {out:?}"
    );
    assert_eq!(
        app_hits(&bed, 8080),
        0,
        "nothing reached the app around baton"
    );

    // Open: it reaches the app directly.
    init_with(&bed, "BATON_CAPTURE_FAIL=open", &[]);
    let (status, body) = bed.curl("client", &url);
    assert_eq!(
        (status, body),
        (200, format!("app 8080 from {client} xff -\n"))
    );
    // And with baton back, it goes through baton again.
    start_baton(&bed, &[]);
    let (status, body) = bed.curl("client", &url);
    assert_eq!(
        (status, body),
        (200, format!("app 8080 from {pod} xff {client}\n"))
    );
}

#[test]
fn capture_and_handoff_tables_coexist() {
    let Some(bed) = Testbed::new(&["client", "pod"]) else {
        return;
    };
    start_app(&bed);
    init(&bed, &[]);
    let key = std::env::temp_dir().join(format!("baton-capture-key-{}", std::process::id()));
    std::fs::write(&key, "0123456789abcdef0123456789abcdef").unwrap();
    let key_path = key.to_str().unwrap();
    start_baton(
        &bed,
        &[
            ("BATON_HANDOFF", "on"),
            ("BATON_HANDOFF_KEY_FILE", key_path),
            ("BATON_HANDOFF_INTERFACE", "eth0"),
        ],
    );
    let metrics = bed.must("pod", &["curl", "-s", "http://127.0.0.1:15021/metrics"]);
    assert!(
        metrics.lines().any(|l| l == "baton_handoff_enabled 1"),
        "handoff runs beside the capture:\n{metrics}"
    );
    let state = kernel_state(&bed);
    assert!(state.contains("table netdev baton"), "{state}");
    assert!(state.contains("table inet baton_capture"), "{state}");

    // Captured traffic still flows, and the handoff receiver's port is not captured.
    let pod = bed.ip("pod");
    let (status, body) = bed.curl("client", &format!("http://{pod}:8080/x"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(captured(&bed), 1);
    // Were it captured, baton would answer it as route target `local` for one of its
    // own ports: an HTTP 503 with x-baton-error. The receiver itself speaks no HTTP.
    let before = handled(&bed);
    let out = bed.exec(
        "client",
        &[
            "curl",
            "-s",
            "-i",
            "--max-time",
            "2",
            &format!("http://{pod}:15010/"),
        ],
    );
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(!reply.contains("x-baton-error"), "{reply}");
    assert_eq!(handled(&bed), before, "the handoff port is not captured");

    // Cleanup removes the capture only.
    init(&bed, &["--cleanup"]);
    let state = kernel_state(&bed);
    assert!(!state.contains("baton_capture"), "{state}");
    assert!(state.contains("table netdev baton"), "{state}");
    assert!(state.contains("lookup 15010"), "{state}");
    let _ = std::fs::remove_file(&key);
}

#[test]
fn init_runs_as_a_non_root_user_holding_the_file_capability() {
    // What the image does: baton runs as UID 65532 with cap_net_admin as a file
    // capability, and nft and ip (no capabilities of their own) must still work.
    let Some(bed) = Testbed::new(&["pod"]) else {
        return;
    };
    let dir = std::path::PathBuf::from(format!("/var/tmp/baton-capcheck-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("baton");
    std::fs::copy(BATON, &copy).unwrap();
    let copy = copy.to_str().unwrap();
    bed.must("pod", &["chmod", "755", dir.to_str().unwrap(), copy]);
    bed.must("pod", &["setcap", "cap_net_admin+ep", copy]);
    let as_user = |args: &[&str]| {
        let mut cmd = vec![
            "setpriv",
            "--reuid=65532",
            "--regid=65532",
            "--clear-groups",
            "--inh-caps=-all",
            "env",
            "BATON_CAPTURE_EXCLUDE_PORTS=9090",
            copy,
            "init",
        ];
        cmd.extend_from_slice(args);
        bed.exec("pod", &cmd)
    };
    let before = kernel_state(&bed);
    let out = as_user(&[]);
    assert!(
        out.status.success(),
        "baton init as UID 65532: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = kernel_state(&bed);
    assert!(state.contains("table inet baton_capture"), "{state}");
    assert!(
        state.contains("fwmark 0x20000/0x20000 lookup 15006"),
        "{state}"
    );
    assert!(
        state.contains("local default dev lo table 15006"),
        "{state}"
    );
    let out = as_user(&["--cleanup"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(kernel_state(&bed), before);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn only_the_listed_ports_are_captured() {
    let Some(bed) = Testbed::new(&["client", "pod"]) else {
        return;
    };
    start_app(&bed);
    init_with(&bed, "BATON_CAPTURE_PORTS=8080", &[]);
    start_baton(&bed, &[]);
    let (pod, client) = (bed.ip("pod"), bed.ip("client"));
    let (status, body) = bed.curl("client", &format!("http://{pod}:8080/in"));
    assert_eq!(
        (status, body),
        (200, format!("app 8080 from {pod} xff {client}\n"))
    );
    let (status, body) = bed.curl("client", &format!("http://{pod}:9090/out"));
    assert_eq!(
        (status, body),
        (200, format!("app 9090 from {client} xff -\n"))
    );
    assert_eq!(captured(&bed), 1);
}

#[test]
fn opaque_tcp_is_captured_and_relayed_to_the_local_app() {
    let Some(bed) = Testbed::new(&["client", "pod"]) else {
        return;
    };
    start_app(&bed);
    init(&bed, &[]);
    // The server speaks first: baton must not wait to detect a protocol on this port.
    start_baton(&bed, &[("BATON_OPAQUE_PORTS", "7000")]);
    let pod = bed.ip("pod");
    let out = bed.must("client", &["python3", "-c", ECHO_CLIENT, &pod]);
    // Through baton: the app's peer is baton, at the pod's own address.
    assert_eq!(out, format!("banner from {pod}\nping\n"));
    assert_eq!(
        metric(&bed, "baton_connections_total{protocol=\"opaque\"} "),
        1
    );
}
