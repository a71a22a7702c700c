//! Connection handoff across network namespaces (root only; CI runs as root).
//!
//! A client, a frontend (fe) and two backends (be1, be2) on one bridge. Each backend
//! runs nginx as its application on :8080 and a baton; fe runs baton with handoff on,
//! balancing `objects` over the backends. Every case checks what the client sees; those
//! that hand off or proxy responses also check where the bytes went, by what fe's
//! interface transmitted ([`Fleet::fe_sent`]): after a handoff the responses do not
//! cross fe (it forwards only the client's packets), when proxied they do. The
//! responses are large enough (256 KiB and up) for the difference to show.

mod support;

use serde_json::json;
use sha2::{Digest, Sha256};
use std::{
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};
use support::netns::Testbed;

const BATON: &str = env!("CARGO_BIN_EXE_baton");
const PASS_APP: &str = env!("CARGO_BIN_EXE_baton-pass-app");
const MIB: usize = 1 << 20;
const KIB256: usize = 256 << 10;

/// The testbed with its applications and batons.
struct Fleet {
    bed: Testbed,
    dir: PathBuf,
    key: PathBuf,
    fe: Option<u32>,
    be: Vec<(&'static str, u32)>,
    nginx: Vec<(&'static str, u32)>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Deterministic content of `len` bytes.
fn content(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 4);
    let mut i = 0u32;
    while v.len() < len {
        v.extend_from_slice(&i.wrapping_mul(2_654_435_761).to_le_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

/// The X-Served-By of a response head (lower case; empty if missing).
fn served_by(head: &str) -> String {
    head.lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-served-by:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

impl Fleet {
    /// Builds the testbed and starts nginx on both backends. `None` without root.
    fn new() -> Option<Fleet> {
        let bed = Testbed::new(&["client", "fe", "be1", "be2"])?;
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("baton-handoff-{}-{n}", std::process::id()));
        let www = dir.join("www");
        std::fs::create_dir_all(www.join("slow")).unwrap();
        for (name, len) in [("1k", 1024), ("256k", KIB256), ("1m", MIB)] {
            std::fs::write(www.join(name), content(len)).unwrap();
        }
        std::fs::write(www.join("slow").join("8m"), content(8 * MIB)).unwrap();
        let key = dir.join("key");
        std::fs::write(&key, "a-test-key-of-at-least-32-bytes-for-the-fleet\n").unwrap();
        let mut fleet = Fleet {
            bed,
            dir,
            key,
            fe: None,
            be: Vec::new(),
            nginx: Vec::new(),
        };
        for be in ["be1", "be2"] {
            fleet.start_nginx(be);
        }
        Some(fleet)
    }

    fn start_nginx(&mut self, be: &'static str) {
        let conf_dir = self.dir.join(be);
        std::fs::create_dir_all(conf_dir.join("tmp")).unwrap();
        let d = conf_dir.display();
        let www = self.dir.join("www");
        let conf = format!(
            "worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp;
  proxy_temp_path {d}/tmp;
  fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp;
  scgi_temp_path {d}/tmp;
  keepalive_requests 10000;
  server {{
    listen 8080 reuseport;
    root {www};
    add_header X-Served-By {be} always;
    location /slow/ {{ limit_rate 1m; }}
  }}
}}
",
            www = www.display()
        );
        let path = conf_dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let pid = self.bed.spawn(
            be,
            &["nginx", "-c", path.to_str().unwrap(), "-g", "daemon off;"],
            &[],
        );
        self.nginx.push((be, pid));
        self.bed.wait_200(be, "http://127.0.0.1:8080/1k");
    }

    /// Starts the handoff-aware application on `be`: it serves the same files on
    /// :9090 and takes passed connections on the returned socket path, answering as
    /// `{be}-pass`. Its PID.
    fn start_pass_app(&self, be: &str) -> (PathBuf, u32) {
        let path = self.dir.join(format!("{be}-app.sock"));
        let www = self.dir.join("www");
        let name = format!("{be}-pass");
        let pid = self.bed.spawn(
            be,
            &[
                PASS_APP,
                "--root",
                www.to_str().unwrap(),
                "--listen",
                "127.0.0.1:9090",
                "--pass",
                path.to_str().unwrap(),
                "--name",
                &name,
            ],
            &[],
        );
        self.bed.wait_200(be, "http://127.0.0.1:9090/1k");
        (path, pid)
    }

    fn env(&self, extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("BATON_INBOUND_ADDR", "0.0.0.0:15006".to_string()),
            ("BATON_ADMIN_ADDR", "0.0.0.0:15021".into()),
            ("BATON_HANDOFF", "on".into()),
            ("BATON_HANDOFF_KEY_FILE", self.key.display().to_string()),
            ("BATON_HANDOFF_INTERFACE", "eth0".into()),
            // The mechanism's tests hand off every eligible request; the size
            // policy has a test of its own.
            ("BATON_HANDOFF_MIN_BYTES", "0".into()),
            ("BATON_WORKERS", "1".into()),
            ("BATON_LOG", "baton=debug,baton_layers=debug,info".into()),
        ];
        for (k, v) in extra {
            env.retain(|(n, _)| n != k);
            env.push((k, v.clone()));
        }
        env
    }

    fn spawn_baton(&self, host: &str, env: &[(&'static str, String)]) -> u32 {
        self.spawn_baton_with(host, env, &[])
    }

    /// Starts baton on `host` behind the command `wrapper` (e.g. one dropping
    /// capabilities) and waits until it is ready.
    fn spawn_baton_with(
        &self,
        host: &str,
        env: &[(&'static str, String)],
        wrapper: &[&str],
    ) -> u32 {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let log = self.dir.join(format!("{host}.log"));
        let cmd: Vec<&str> = wrapper.iter().copied().chain([BATON]).collect();
        let pid = self.bed.spawn_logged(host, &cmd, &env, Some(&log));
        self.bed.wait_200(host, "http://127.0.0.1:15021/ready");
        pid
    }

    /// Starts baton on a backend, serving moved connections from its nginx.
    fn start_be(&mut self, be: &'static str, extra: &[(&'static str, String)]) {
        let pid = self.spawn_be(be, extra);
        self.be.push((be, pid));
    }

    /// Starts baton on a backend (without recording it); its PID.
    fn spawn_be(&self, be: &str, extra: &[(&'static str, String)]) -> u32 {
        let mut env = self.env(&[("BATON_APP_ADDR", "127.0.0.1:8080".into())]);
        env.extend(extra.iter().cloned());
        self.spawn_baton(be, &env)
    }

    /// Starts baton on fe, balancing `objects` round-robin over both backends.
    fn start_fe(&mut self, extra: &[(&'static str, String)]) {
        self.fe = Some(self.spawn_fe(extra));
    }

    /// Starts baton on fe with `be` as the only endpoint of `objects`.
    fn start_fe_to(&mut self, be: &str) {
        let services = format!("objects={}:8080", self.bed.ip(be));
        self.start_fe(&[("BATON_STATIC_SERVICES", services)]);
    }

    fn spawn_fe(&self, extra: &[(&'static str, String)]) -> u32 {
        self.spawn_fe_with(extra, &[])
    }

    fn spawn_fe_with(&self, extra: &[(&'static str, String)], wrapper: &[&str]) -> u32 {
        let services = format!(
            "objects={}:8080,{}:8080",
            self.bed.ip("be1"),
            self.bed.ip("be2")
        );
        let mut env = self.env(&[
            ("BATON_ROUTES", "*=objects".into()),
            ("BATON_STATIC_SERVICES", services),
            ("BATON_LB", "rr".into()),
        ]);
        for (k, v) in extra {
            env.retain(|(n, _)| n != k);
            env.push((k, v.clone()));
        }
        self.spawn_baton_with("fe", &env, wrapper)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}:15006{path}", self.bed.ip("fe"))
    }

    /// GETs `path` from the client: (status, X-Served-By, body).
    fn get(&self, path: &str) -> (u16, String, Vec<u8>) {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let body = self.dir.join(format!("body-{n}"));
        let headers = self.dir.join(format!("headers-{n}"));
        let out = self.bed.exec(
            "client",
            &[
                "curl",
                "-s",
                "--max-time",
                "30",
                "-o",
                body.to_str().unwrap(),
                "-D",
                headers.to_str().unwrap(),
                "-w",
                "%{http_code}",
                &self.url(path),
            ],
        );
        let status = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        let by = served_by(&std::fs::read_to_string(&headers).unwrap_or_default());
        let bytes = std::fs::read(&body).unwrap_or_default();
        let _ = std::fs::remove_file(&body);
        (status, by, bytes)
    }

    /// Bytes fe's interface sent (transmitted, forwarded ones included) while `run`
    /// ran, with what `run` returned. After a handoff fe only forwards the client's
    /// packets (ACKs and requests) to the backend; a response it proxies crosses it.
    fn fe_sent<R>(&self, run: impl FnOnce() -> R) -> (R, u64) {
        let before = self.bed.eth0_bytes("fe").1;
        let r = run();
        (r, self.bed.eth0_bytes("fe").1 - before)
    }

    /// Asserts that `responses` bytes of responses did not cross fe, which sent only
    /// `sent` bytes: far less (a tenth) than the responses, which a proxy would have
    /// sent in full.
    fn assert_skipped_fe(&self, sent: u64, responses: usize, what: &str) {
        assert!(
            sent < responses as u64 / 10,
            "{what}: fe sent {sent} bytes for {responses} bytes of responses; fe log:\n{}",
            self.log("fe")
        );
    }

    /// Asserts that `responses` bytes of responses crossed fe (it sent `sent`).
    fn assert_crossed_fe(&self, sent: u64, responses: usize, what: &str) {
        assert!(
            sent >= responses as u64,
            "{what}: fe sent only {sent} bytes for {responses} bytes of proxied responses"
        );
    }

    /// A metric's value on `host` (the first sample whose line starts with `prefix`).
    fn metric(&self, host: &str, prefix: &str) -> f64 {
        let out = self.bed.exec(
            host,
            &[
                "curl",
                "-s",
                "--max-time",
                "5",
                "http://127.0.0.1:15021/metrics",
            ],
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Elements of the handoff set or map `set` on `host`.
    fn elements(&self, host: &str, set: &str) -> usize {
        let kind = if set == "moved" { "map" } else { "set" };
        let out = self
            .bed
            .exec(host, &["nft", "-j", "list", kind, "netdev", "baton", set]);
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        json["nftables"]
            .as_array()
            .and_then(|items| items.iter().find_map(|i| i[kind]["elem"].as_array()))
            .map_or(0, |e| e.len())
    }

    /// Runs the scripted client (`CLIENT_PY`) against fe with `plan`: the responses it
    /// read, as JSON objects {status, by, len, sha}.
    fn script(&self, plan: serde_json::Value) -> Vec<serde_json::Value> {
        let script = self.dir.join("client.py");
        std::fs::write(&script, format!("{READ_RESPONSE_PY}{CLIENT_PY}")).unwrap();
        let out = self.bed.exec(
            "client",
            &[
                "python3",
                script.to_str().unwrap(),
                &self.bed.ip("fe"),
                "15006",
                &plan.to_string(),
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        match serde_json::from_str::<serde_json::Value>(text.trim()) {
            Ok(serde_json::Value::Array(v)) => v,
            _ => panic!(
                "client failed: {text}{}\nfe log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log("fe")
            ),
        }
    }

    /// Kills every nginx process on `be`.
    fn kill_nginx(&self, be: &str) {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.bed.ns(be)])
            .output()
            .unwrap();
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "nginx" {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
    }

    /// The fleet key.
    fn key(&self) -> baton_layers::handoff::wire::Key {
        let secret = std::fs::read(&self.key).unwrap();
        baton_layers::handoff::wire::Key::new(secret.trim_ascii()).unwrap()
    }

    /// Sends the raw `frame` from `host` to the handoff receiver at `to` (`ip:port`),
    /// half-closes, and returns what came back before the receiver closed.
    fn send_frame(&self, host: &str, to: &str, frame: &[u8]) -> Vec<u8> {
        let path = self
            .dir
            .join(format!("frame-{}", NEXT.fetch_add(1, Ordering::SeqCst)));
        std::fs::write(&path, frame).unwrap();
        let (ip, port) = to.rsplit_once(':').unwrap();
        let py = format!(
            "import socket,sys\ns=socket.create_connection(('{ip}',{port}),timeout=5)\ns.sendall(open('{}','rb').read())\ns.shutdown(socket.SHUT_WR)\nb=b''\nwhile True:\n  d=s.recv(4096)\n  if not d: break\n  b+=d\nsys.stdout.write(b.hex())",
            path.display()
        );
        let out = self.bed.must(host, &["python3", "-c", &py]);
        (0..out.trim().len() / 2)
            .filter_map(|i| u8::from_str_radix(&out.trim()[2 * i..2 * i + 2], 16).ok())
            .collect()
    }

    /// fe's redirects: each moved flow and the backend address it goes to.
    fn moved(&self) -> Vec<(baton_layers::handoff::wire::Flow, String)> {
        let out = self.bed.exec(
            "fe",
            &["nft", "-j", "list", "map", "netdev", "baton", "moved"],
        );
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let elems = json["nftables"]
            .as_array()
            .and_then(|items| items.iter().find_map(|i| i["map"]["elem"].as_array()))
            .cloned()
            .unwrap_or_default();
        elems
            .iter()
            .map(|e| {
                let key = &e[0]["elem"]["val"]["concat"];
                let addr = |i: usize| format!("{}:{}", key[i].as_str().unwrap(), key[i + 1]);
                let flow = baton_layers::handoff::wire::Flow {
                    client: addr(0).parse().unwrap(),
                    local: addr(2).parse().unwrap(),
                };
                (flow, e[1].as_str().unwrap().to_string())
            })
            .collect()
    }

    fn log(&self, host: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{host}.log"))).unwrap_or_default()
    }
}

/// The Python both scripted clients read responses with: `read_response(s, buf)`
/// reads one Content-Length-framed response from socket `s` (bytes already read in
/// `buf`) and returns ({status, by, len, sha}, what is left of `buf`).
const READ_RESPONSE_PY: &str = r#"
import hashlib
def read_response(s, buf):
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            raise EOFError("closed inside a response head")
        buf += d
    head, buf = buf.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    h = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip() for l in lines[1:]}
    k = int(h.get("content-length", "0"))
    while len(buf) < k:
        d = s.recv(1 << 20)
        if not d:
            raise EOFError("closed inside a response body")
        buf += d
    body, buf = buf[:k], buf[k:]
    return {"status": int(lines[0].split()[1]), "by": h.get("x-served-by", ""),
            "len": k, "sha": hashlib.sha256(body).hexdigest()}, buf
"#;

/// A client on one connection, scripted by a JSON plan of steps: ["send", text],
/// ["sleep", seconds], ["read"] (one response, Content-Length framed), ["wait", path]
/// (until the file exists: the test says when to go on), ["read_or_error"] (like read,
/// but a failure is recorded as {error} and ends the plan). Prints the responses read
/// as JSON.
const CLIENT_PY: &str = r#"
import json, os, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
buf = b""
out = []
for step in json.loads(sys.argv[3]):
    if step[0] == "send":
        s.sendall(step[1].encode())
    elif step[0] == "sleep":
        time.sleep(step[1])
    elif step[0] == "read":
        r, buf = read_response(s, buf)
        out.append(r)
    elif step[0] == "read_or_error":
        try:
            r, buf = read_response(s, buf)
            out.append(r)
        except Exception as e:
            out.append({"error": repr(e)})
            break
    elif step[0] == "wait":
        deadline = time.time() + 60
        while not os.path.exists(step[1]) and time.time() < deadline:
            time.sleep(0.01)
print(json.dumps(out))
"#;

/// A backend receiver that answers one offer "ready" and then resets the control
/// connection, so the frontend cannot deliver "go". Steps are files in argv[2]:
/// it creates `listening`, then `offered` once the offer is in, waits for `answer`,
/// answers, and creates `answered`. argv[1] is the key file.
const FAKE_BE_PY: &str = r#"
import hashlib, hmac, os, socket, struct, sys, time
key = open(sys.argv[1], "rb").read().strip()
steps = sys.argv[2]
def step(name):
    open(os.path.join(steps, name), "w").close()
def wait(name):
    while not os.path.exists(os.path.join(steps, name)):
        time.sleep(0.01)
def recv_exact(c, n):
    b = b""
    while len(b) < n:
        d = c.recv(n - len(b))
        if not d:
            raise EOFError("closed")
        b += d
    return b
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 15010))
l.listen()
step("listening")
c, _ = l.accept()
body = recv_exact(c, struct.unpack(">I", recv_exact(c, 4))[0])
assert body[:4] == b"BTN1" and body[4] == 1, "an offer"
nonce = body[5:21]
step("offered")
wait("answer")
msg = b"BTN1" + bytes([2]) + os.urandom(16) + struct.pack(">Q", int(time.time() * 1000)) + nonce
msg += hmac.new(key, msg, hashlib.sha256).digest()
c.sendall(struct.pack(">I", len(msg)) + msg)
c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
c.close()
step("answered")
time.sleep(3600)
"#;

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: objects\r\n\r\n")
}

/// Waits up to `limit` for `cond`.
fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

#[test]
fn objects_are_handed_off_intact_and_bytes_skip_the_frontend() {
    let Some(mut f) = Fleet::new() else { return };
    std::fs::write(f.dir.join("www").join("64m"), content(64 * MIB)).unwrap();
    f.start_be("be1", &[]);
    f.start_be("be2", &[]);
    f.start_fe(&[]);
    for (name, len) in [("1k", 1024), ("1m", MIB), ("64m", 64 * MIB)] {
        let handed = f.metric("fe", "baton_handoffs_total");
        let ((status, by, body), sent) = f.fe_sent(|| f.get(&format!("/{name}")));
        assert_eq!(status, 200, "{name}: fe log:\n{}", f.log("fe"));
        assert!(by == "be1" || by == "be2", "{name}: served by {by:?}");
        assert_eq!(body.len(), len, "{name}");
        assert_eq!(sha256(&body), sha256(&content(len)), "{name} intact");
        assert_eq!(
            f.metric("fe", "baton_handoffs_total"),
            handed + 1.0,
            "{name} was handed off; fe log:\n{}\nbe1 log:\n{}\nbe2 log:\n{}",
            f.log("fe"),
            f.log("be1"),
            f.log("be2")
        );
        // The response did not cross fe: it sent (forwarded) only the client's ACKs,
        // far less than the body. (For 1 KiB the handshake and the handoff's own
        // messages outweigh the body, so the counters cannot tell; the other cases
        // carry enough bytes to.)
        if len >= MIB {
            f.assert_skipped_fe(sent, len, name);
        }
    }
    assert!(f.metric("be1", "baton_handoff_offers_total") >= 1.0);
    assert!(f.metric("be2", "baton_handoff_offers_total") >= 1.0);
    // A connection that closes after its one request is proxied (the policy:
    // moving it costs more than proxying one response).
    let attempts = f.metric("fe", "baton_handoff_attempts_total");
    let (got, sent) = f.fe_sent(|| {
        f.script(json!([
            [
                "send",
                "GET /1m HTTP/1.1\r\nHost: objects\r\nConnection: close\r\n\r\n"
            ],
            ["read"]
        ]))
    });
    assert_eq!(got[0]["status"], 200);
    assert_eq!(got[0]["sha"], sha256(&content(MIB)));
    assert_eq!(f.metric("fe", "baton_handoff_attempts_total"), attempts);
    f.assert_crossed_fe(sent, MIB, "Connection: close, proxied");
}

#[test]
fn the_size_policy_hands_off_only_what_it_learned_is_large() {
    let Some(mut f) = Fleet::new() else { return };
    f.start_be("be1", &[]);
    f.start_be("be2", &[]);
    f.start_fe(&[("BATON_HANDOFF_MIN_BYTES", "32768".into())]);
    let skipped = |f: &Fleet, why: &str| {
        f.metric(
            "fe",
            &format!("baton_handoff_skipped_total{{reason=\"{why}\"}}"),
        )
    };
    let handoffs = |f: &Fleet| f.metric("fe", "baton_handoffs_total");
    // Each request on a new keep-alive connection (curl), so each is eligible.
    let fetch = |f: &Fleet, path: &str, len: usize| {
        let ((status, by, body), sent) = f.fe_sent(|| f.get(path));
        assert_eq!(status, 200, "{path}");
        assert!(by == "be1" || by == "be2", "{path}: served by {by:?}");
        assert_eq!(sha256(&body), sha256(&content(len)), "{path} intact");
        sent
    };
    // Nothing known yet: proxied, and measured.
    let sent = fetch(&f, "/1m", MIB);
    f.assert_crossed_fe(sent, MIB, "first /1m, nothing known");
    assert_eq!(skipped(&f, "unknown"), 1.0);
    assert_eq!(handoffs(&f), 0.0);
    // Now known to be large: handed off, the response skips fe.
    let sent = fetch(&f, "/1m", MIB);
    f.assert_skipped_fe(sent, MIB, "second /1m, known large");
    assert_eq!(handoffs(&f), 1.0, "fe log:\n{}", f.log("fe"));
    // Another target of the same service follows the service's record (large),
    let sent = fetch(&f, "/256k", KIB256);
    f.assert_skipped_fe(sent, KIB256, "/256k, its service's responses are large");
    assert_eq!(handoffs(&f), 2.0);
    // ...a small one too, until one in 16 such guesses is proxied to measure it;
    // from then on it is known small and proxied every time.
    let mut tries = 0;
    while skipped(&f, "sample") == 0.0 {
        tries += 1;
        assert!(tries <= 16, "an unseen target is sampled within 16 guesses");
        fetch(&f, "/1k", 1024);
    }
    let handed = handoffs(&f);
    let small = skipped(&f, "small");
    for _ in 0..3 {
        fetch(&f, "/1k", 1024);
    }
    assert_eq!(handoffs(&f), handed, "/1k is known small: proxied");
    assert_eq!(skipped(&f, "small"), small + 3.0);
    // ...while /1m stays handed off.
    let sent = fetch(&f, "/1m", MIB);
    f.assert_skipped_fe(sent, MIB, "/1m still known large");
    assert_eq!(handoffs(&f), handed + 1.0);
    assert_eq!(f.metric("fe", "baton_handoff_fallbacks_total"), 0.0);
}

#[test]
fn keep_alive_requests_after_a_handoff_are_all_served_by_the_backend() {
    let Some(mut f) = Fleet::new() else { return };
    f.start_be("be1", &[]);
    f.start_be("be2", &[]);
    f.start_fe(&[]);
    let proxied_before = f.metric(
        "fe",
        "baton_requests_total{service=\"objects\",status=\"200\"}",
    );
    let mut plan = vec![];
    for _ in 0..20 {
        plan.push(json!(["send", get("/256k")]));
        plan.push(json!(["read"]));
    }
    let (got, sent) = f.fe_sent(|| f.script(json!(plan)));
    assert_eq!(got.len(), 20);
    let by = got[0]["by"].as_str().unwrap().to_string();
    assert!(by == "be1" || by == "be2", "served by {by:?}");
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r["status"], 200, "request {i}");
        assert_eq!(
            r["by"],
            by.as_str(),
            "request {i} served by the same backend"
        );
        assert_eq!(r["sha"], sha256(&content(KIB256)), "request {i} intact");
    }
    // Not one of the 20 responses crossed fe.
    f.assert_skipped_fe(sent, 20 * KIB256, "20 keep-alive responses");
    assert_eq!(f.metric("fe", "baton_handoffs_total"), 1.0);
    // fe saw one request (the handed-off one); the other 19 went to the backend.
    assert_eq!(
        f.metric(
            "fe",
            "baton_requests_total{service=\"objects\",status=\"200\"}"
        ),
        proxied_before + 1.0
    );
}

#[test]
fn pipelined_requests_and_bytes_sent_during_the_freeze_are_not_lost() {
    let Some(mut f) = Fleet::new() else { return };
    f.start_be("be1", &[]);
    f.start_be("be2", &[]);
    f.start_fe(&[]);
    for _ in 0..5 {
        // Two requests in one segment, a third right behind them (it arrives while
        // the socket is frozen or moving), then a fourth after the move.
        let got = f.script(json!([
            ["send", format!("{}{}", get("/1k"), get("/1m"))],
            ["send", get("/1k")],
            ["read"],
            ["read"],
            ["read"],
            ["sleep", 0.05],
            ["send", get("/1m")],
            ["read"]
        ]));
        let lens = [1024, MIB, 1024, MIB];
        for (r, len) in got.iter().zip(lens) {
            assert_eq!(r["status"], 200);
            assert_eq!(r["sha"], sha256(&content(len)));
            assert_eq!(r["by"], got[0]["by"]);
        }
        assert_eq!(got.len(), 4);
    }
    assert_eq!(
        f.metric("fe", "baton_handoffs_total"),
        5.0,
        "fe log:\n{}",
        f.log("fe")
    );
}

#[test]
fn the_frontend_falls_back_to_proxying_when_a_backend_cannot_take_over() {
    let Some(mut f) = Fleet::new() else { return };
    // be1 has no baton at all: its handoff port refuses connections.
    // be2's baton accepts no frontend (its CIDRs exclude fe).
    f.start_be("be2", &[("BATON_HANDOFF_FE_CIDRS", "192.0.2.0/24".into())]);
    f.start_fe(&[]);
    let ((), sent) = f.fe_sent(|| {
        for _ in 0..4 {
            let (status, by, body) = f.get("/1m");
            assert_eq!(status, 200);
            assert!(by == "be1" || by == "be2");
            assert_eq!(sha256(&body), sha256(&content(MIB)));
        }
    });
    // Proxied: every response crossed fe.
    f.assert_crossed_fe(sent, 4 * MIB, "down or refusing backends");
    assert_eq!(f.metric("fe", "baton_handoffs_total"), 0.0);
    assert_eq!(
        f.metric(
            "fe",
            "baton_handoff_fallbacks_total{reason=\"unreachable\"}"
        ),
        2.0
    );
    assert_eq!(
        f.metric("fe", "baton_handoff_fallbacks_total{reason=\"refused\"}"),
        2.0
    );
    assert_eq!(
        f.metric("be2", "baton_handoff_refused_total{reason=\"cidr\"}"),
        2.0
    );

    // A backend too slow to answer within BATON_HANDOFF_TIMEOUT: stopped outright.
    let be2 = f.be[0].1;
    f.bed.signal(be2, "STOP");
    let started = Instant::now();
    let ((), sent) = f.fe_sent(|| {
        for _ in 0..2 {
            let (status, _, body) = f.get("/256k");
            assert_eq!(status, 200);
            assert_eq!(sha256(&body), sha256(&content(KIB256)));
        }
    });
    f.bed.signal(be2, "CONT");
    assert!(started.elapsed() < Duration::from_secs(5));
    f.assert_crossed_fe(sent, 2 * KIB256, "a stopped backend");
    assert_eq!(
        f.metric("fe", "baton_handoff_fallbacks_total{reason=\"timeout\"}"),
        1.0
    );
    // Nothing stays held.
    assert_eq!(f.elements("fe", "held"), 0);
    assert_eq!(f.elements("fe", "moved"), 0);
}

#[test]
fn a_backend_app_killed_mid_response_ends_the_client_connection() {
    let Some(mut f) = Fleet::new() else { return };
    f.start_be("be1", &[]);
    f.start_be("be2", &[]);
    f.start_fe(&[]);
    let (status, by, _) = f.get("/1k"); // rr: the next request goes to the other one
    assert_eq!(status, 200);
    let next = if by == "be1" { "be2" } else { "be1" };
    let url = f.url("/slow/8m");
    let started = Instant::now();
    let out = std::thread::scope(|s| {
        let curl = s.spawn(|| {
            f.bed.exec(
                "client",
                &[
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "--max-time",
                    "30",
                    "-w",
                    "%{size_download}",
                    &url,
                ],
            )
        });
        std::thread::sleep(Duration::from_millis(1500));
        f.kill_nginx(next);
        curl.join().unwrap()
    });
    let got: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(!out.status.success(), "the transfer cannot complete");
    assert!(got > 0 && got < 8 * MIB as u64, "partial body, got {got}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the client was not left hanging ({:?})",
        started.elapsed()
    );
    assert_eq!(f.metric("fe", "baton_handoffs_total"), 2.0);
}

/// The backend's application is down when a connection arrives: the backend baton,
/// which owns the connection after "go", answers it 502 itself and closes.
#[test]
fn a_moved_connection_whose_app_is_down_gets_a_502() {
    let Some(mut f) = Fleet::new() else { return };
    f.start_be("be1", &[]);
    f.start_fe_to("be1");
    let (status, _, _) = f.get("/1k");
    assert_eq!(status, 200);
    f.kill_nginx("be1");
    let got = f.script(json!([["send", get("/1k")], ["read"]]));
    assert_eq!(got[0]["status"], 502, "{got:?}");
    assert_eq!(f.metric("fe", "baton_handoffs_total"), 2.0);
}

/// A handoff-aware application (`BATON_APP_PASS`) gets the client's socket itself:
/// the moved connection's requests are answered by it, not relayed by be1's baton
/// (nginx, the relay's application, would say `be1`); with the application gone, the
/// next moved connection is relayed to nginx instead, and the client cannot tell.
#[test]
fn a_handoff_aware_application_takes_the_socket_and_the_backend_baton_leaves_the_path() {
    let Some(mut f) = Fleet::new() else { return };
    let (sock, app) = f.start_pass_app("be1");
    f.start_be("be1", &[("BATON_APP_PASS", sock.display().to_string())]);
    f.start_fe_to("be1");
    let (got, sent) = f.fe_sent(|| {
        f.script(json!([
            ["send", get("/1m")],
            ["read"],
            ["send", get("/1m")],
            ["read"],
            ["send", format!("{}{}", get("/1k"), get("/256k"))],
            ["read"],
            ["read"]
        ]))
    });
    let lens = [MIB, MIB, 1024, KIB256];
    assert_eq!(got.len(), lens.len(), "{got:?}");
    for (r, len) in got.iter().zip(lens) {
        assert_eq!(r["status"], 200, "{got:?}\nbe1 log:\n{}", f.log("be1"));
        assert_eq!(r["by"], "be1-pass", "served by the application: {got:?}");
        assert_eq!(r["sha"], sha256(&content(len)), "{len} bytes intact");
    }
    f.assert_skipped_fe(sent, 2 * MIB + KIB256, "passed connection");
    assert_eq!(f.metric("fe", "baton_handoffs_total"), 1.0);
    assert_eq!(f.metric("be1", "baton_handoff_passed_total"), 1.0);
    assert_eq!(f.metric("be1", "baton_handoff_pass_fallbacks_total"), 0.0);
    // The socket lives in the application, so be1's baton serves nothing.
    assert_eq!(f.metric("be1", "baton_handoff_active_connections"), 0.0);
    // Closed by the client, the connection's entries go (sock_diag sees the
    // application's socket end).
    let clean = eventually(Duration::from_secs(10), || {
        f.elements("fe", "moved") == 0 && f.elements("be1", "restored") == 0
    });
    assert!(clean, "entries left after a passed connection closed");

    f.bed.kill(app);
    let got = f.script(json!([
        ["send", get("/1m")],
        ["read"],
        ["send", get("/1k")],
        ["read"]
    ]));
    for r in &got {
        assert_eq!(r["status"], 200, "{got:?}");
        assert_eq!(r["by"], "be1", "relayed to nginx: {got:?}");
    }
    assert_eq!(got.len(), 2);
    assert_eq!(f.metric("fe", "baton_handoffs_total"), 2.0);
    assert_eq!(f.metric("be1", "baton_handoff_passed_total"), 1.0);
    assert_eq!(f.metric("be1", "baton_handoff_pass_fallbacks_total"), 1.0);
}

/// A passed connection lives in the application, so it outlives the backend's baton:
/// the baton started after it adopts the flow from the kernel's `restored` set and
/// watches it as its own, so that when the connection closes the entries on both
/// sides go at once (not after `BATON_HANDOFF_FLOW_TTL`). A relayed connection dies
/// with its baton; the next baton forgets its entries at once as well.
#[test]
fn a_new_backend_baton_adopts_passed_connections_and_forgets_ended_ones() {
    let Some(mut f) = Fleet::new() else { return };
    let (sock, app) = f.start_pass_app("be1");
    let pass = [("BATON_APP_PASS", sock.display().to_string())];
    f.start_be("be1", &pass);
    f.start_fe_to("be1");
    let clean = |f: &Fleet| {
        eventually(Duration::from_secs(10), || {
            f.elements("fe", "moved") == 0 && f.elements("be1", "restored") == 0
        })
    };
    // Passed: the old baton stops gracefully with the connection open and idle.
    let go = f.dir.join("go-passed");
    let old = f.be[0].1;
    let got = std::thread::scope(|s| {
        let client = s.spawn(|| {
            f.script(json!([
                ["send", get("/1k")],
                ["read"],
                ["wait", go.to_str().unwrap()],
                ["send", get("/256k")],
                ["read"]
            ]))
        });
        assert!(eventually(Duration::from_secs(10), || f
            .metric("be1", "baton_handoff_passed_total")
            == 1.0));
        f.bed.signal(old, "TERM");
        assert_eq!(f.bed.wait_exit(old, Duration::from_secs(10)), Some(0));
        let new = f.spawn_be("be1", &pass);
        std::fs::write(&go, "").unwrap();
        assert!(
            f.log("be1").contains("kept=1 gone=0"),
            "the new baton adopted the passed connection; be1 log:\n{}",
            f.log("be1")
        );
        (client.join().unwrap(), new)
    });
    let (got, new) = got;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[1]["status"], 200, "{got:?}");
    assert_eq!(got[1]["by"], "be1-pass", "still the application's: {got:?}");
    assert_eq!(got[1]["sha"], sha256(&content(KIB256)));
    assert!(
        clean(&f),
        "entries left after the adopted connection closed"
    );
    assert!(f.metric("be1", "baton_handoff_closed_sent_total") >= 1.0);

    // Relayed (the application is gone): the baton is killed under the connection.
    f.bed.kill(app);
    let go = f.dir.join("go-relayed");
    std::thread::scope(|s| {
        let client = s.spawn(|| {
            f.script(json!([
                ["send", get("/1k")],
                ["read"],
                ["wait", go.to_str().unwrap()],
                ["send", get("/1k")],
                ["read_or_error"]
            ]))
        });
        assert!(eventually(Duration::from_secs(10), || f
            .metric("be1", "baton_handoff_pass_fallbacks_total")
            == 1.0));
        f.bed.kill(new);
        let _newer = f.spawn_be("be1", &pass);
        std::fs::write(&go, "").unwrap();
        let got = client.join().unwrap();
        assert_eq!(got[0]["by"], "be1", "relayed to nginx: {got:?}");
        // The connection ended with its baton: the client's next request gets a
        // reset or the close, not an answer and not a hang.
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[1].get("error").is_some(), "{got:?}");
    });
    assert!(
        clean(&f),
        "entries of the connection that died with its baton left: be1 log:\n{}",
        f.log("be1")
    );
}

/// "go" cannot be written after the switch (the backend reset the control connection
/// right after "ready"): the frontend does not take the connection back and proxy it,
/// since "go" might have arrived. The backend that did not get "go" says "closed", and
/// the client gets a reset: the request is answered by nobody rather than twice.
#[test]
fn after_the_switch_a_lost_go_never_makes_the_frontend_serve() {
    use baton_layers::handoff::wire::{self, Message};
    let Some(mut f) = Fleet::new() else { return };
    let steps = f.dir.join("fake-be");
    std::fs::create_dir_all(&steps).unwrap();
    let script = f.dir.join("fake_be.py");
    std::fs::write(&script, FAKE_BE_PY).unwrap();
    let args = [
        "python3",
        script.to_str().unwrap(),
        f.key.to_str().unwrap(),
        steps.to_str().unwrap(),
    ];
    f.bed.spawn("be2", &args, &[]);
    assert!(eventually(Duration::from_secs(10), || steps
        .join("listening")
        .exists()));
    // Only be2 (the fake receiver in front of its nginx); a timeout long enough for
    // fe to be stopped for a moment while waiting for "ready".
    let services = format!("objects={}:8080", f.bed.ip("be2"));
    f.start_fe(&[
        ("BATON_STATIC_SERVICES", services),
        ("BATON_HANDOFF_TIMEOUT", "5s".into()),
    ]);
    let fe = f.fe.unwrap();
    let go_on = f.dir.join("go-on");
    let (got, sent) = f.fe_sent(|| {
        std::thread::scope(|s| {
            let client = s.spawn(|| {
                f.script(json!([
                    ["send", get("/1m")],
                    ["wait", go_on.display().to_string()],
                    ["send", get("/1k")],
                    ["read_or_error"]
                ]))
            });
            assert!(
                eventually(Duration::from_secs(10), || steps.join("offered").exists()),
                "fe log:\n{}",
                f.log("fe")
            );
            // "ready" and the reset both arrive while fe is stopped: once it runs again it
            // reads "ready", switches, and finds the connection to the backend reset.
            f.bed.signal(fe, "STOP");
            std::fs::write(steps.join("answer"), "").unwrap();
            let answered = eventually(Duration::from_secs(10), || steps.join("answered").exists());
            f.bed.signal(fe, "CONT");
            assert!(answered);
            assert!(
                eventually(Duration::from_secs(10), || f
                    .metric("fe", "baton_handoff_go_failed_total")
                    == 1.0),
                "fe log:\n{}",
                f.log("fe")
            );
            // Still switched: the redirect stays, nothing was thawed or proxied.
            let moved = f.moved();
            assert_eq!(moved.len(), 1, "{moved:?}");
            assert_eq!(moved[0].1, f.bed.ip("be2"));
            assert_eq!(f.metric("fe", "baton_handoffs_total"), 1.0);
            let fallbacks: f64 = baton_layers::metrics::FALLBACK_REASONS
                .iter()
                .map(|r| {
                    f.metric(
                        "fe",
                        &format!("baton_handoff_fallbacks_total{{reason=\"{r}\"}}"),
                    )
                })
                .sum();
            assert_eq!(fallbacks, 0.0);
            // What a backend does without "go": "closed" (from its address), which takes
            // the redirect away; the client's next bytes meet fe's stack and a reset.
            let closed = wire::encode(&f.key(), &wire::envelope(Message::Closed(vec![moved[0].0])));
            f.send_frame("be2", &format!("{}:15010", f.bed.ip("fe")), &closed);
            assert!(f.moved().is_empty());
            std::fs::write(&go_on, "").unwrap();
            client.join().unwrap()
        })
    });
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("Reset")),
        "no response, a reset: {got:?}"
    );
    // Nor did fe answer the first request (1 MiB) itself.
    f.assert_skipped_fe(sent, MIB, "a lost go");
}

#[test]
fn a_moved_connection_survives_a_frontend_restart() {
    let Some(mut f) = Fleet::new() else { return };
    f.start_be("be1", &[]);
    f.start_be("be2", &[]);
    f.start_fe(&[]);
    let fe = f.fe.take().unwrap();
    let restarted = f.dir.join("restarted");
    let mut plan = vec![
        json!(["send", get("/256k")]),
        json!(["read"]),
        json!(["wait", restarted.display().to_string()]),
    ];
    for _ in 0..4 {
        plan.push(json!(["send", get("/256k")]));
        plan.push(json!(["read"]));
    }
    let (got, sent) = f.fe_sent(|| {
        std::thread::scope(|s| {
            let client = s.spawn(|| f.script(json!(plan)));
            assert!(eventually(Duration::from_secs(10), || f
                .elements("fe", "moved")
                == 1));
            // Crash fe, then start it again while the client is idle.
            f.bed.kill(fe);
            f.spawn_fe(&[]);
            std::fs::write(&restarted, "").unwrap();
            client.join().unwrap()
        })
    });
    assert_eq!(got.len(), 5);
    for r in &got {
        assert_eq!(r["status"], 200);
        assert_eq!(r["by"], got[0]["by"]);
        assert_eq!(r["sha"], sha256(&content(KIB256)));
    }
    assert!(f.log("fe").contains("kept_existing_table=true"));
    // Before and after the restart, the responses went around fe.
    f.assert_skipped_fe(sent, 5 * KIB256, "across a frontend restart");
}

#[test]
fn concurrent_handoffs_are_balanced_across_backends() {
    let Some(mut f) = Fleet::new() else { return };
    f.start_be("be1", &[]);
    f.start_be("be2", &[]);
    // 50 at a time through debug builds on two cores: this asserts the mechanism under
    // concurrency, not its speed (benches/ measures that), so the wait is generous.
    f.start_fe(&[("BATON_HANDOFF_TIMEOUT", "2s".into())]);
    let out = f.dir.join("concurrent");
    std::fs::create_dir_all(&out).unwrap();
    let cmd = format!(
        "seq 200 | xargs -P 50 -I{{}} curl -s --max-time 20 -o {d}/body-{{}} -D {d}/head-{{}} {url}",
        d = out.display(),
        url = f.url("/256k")
    );
    // Its status does not matter: each response is checked below.
    let (_, sent) = f.fe_sent(|| f.bed.exec("client", &["sh", "-c", &cmd]));
    let want = sha256(&content(KIB256));
    let mut by = std::collections::BTreeMap::new();
    for i in 1..=200 {
        let head = std::fs::read_to_string(out.join(format!("head-{i}"))).unwrap_or_default();
        let status = head
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1));
        assert_eq!(status, Some("200"), "request {i}: {head:?}");
        let body = std::fs::read(out.join(format!("body-{i}"))).unwrap_or_default();
        assert_eq!(body.len(), KIB256, "request {i}");
        assert_eq!(sha256(&body), want, "request {i} intact");
        *by.entry(served_by(&head)).or_insert(0) += 1;
    }
    let _ = std::fs::remove_dir_all(&out);
    assert_eq!(
        by.into_iter().collect::<Vec<_>>(),
        [("be1".to_string(), 100), ("be2".to_string(), 100)],
        "round-robin over both backends"
    );
    // None of the 200 responses crossed fe.
    f.assert_skipped_fe(sent, 200 * KIB256, "200 concurrent handoffs");
    let fallbacks: String = baton_layers::metrics::FALLBACK_REASONS
        .iter()
        .map(|r| {
            format!(
                "{r}={} ",
                f.metric(
                    "fe",
                    &format!("baton_handoff_fallbacks_total{{reason=\"{r}\"}}")
                )
            )
        })
        .collect();
    assert_eq!(
        f.metric("fe", "baton_handoffs_total"),
        200.0,
        "fallbacks: {fallbacks}"
    );
}

#[test]
fn forged_replayed_and_foreign_offers_are_refused() {
    use baton_layers::handoff::{
        repair::{RepairWindow, TcpState},
        wire::{self, Key, Message, Offer, Refusal},
    };
    let Some(mut f) = Fleet::new() else { return };
    f.start_be("be1", &[]);
    let key = f.key();
    let be1 = f.bed.ip("be1");
    // Sends raw frames from the client namespace; returns the reply's bytes.
    let send = |frame: &[u8]| f.send_frame("client", &format!("{be1}:15010"), frame);
    let be1_receiver = format!("{be1}:15010").parse().unwrap();
    let offer = |local: &str, be: std::net::SocketAddrV4| {
        wire::envelope(Message::Offer(Offer {
            tcp: TcpState {
                local: local.parse().unwrap(),
                peer: format!("{}:40000", f.bed.ip("client")).parse().unwrap(),
                snd_seq: 1,
                rcv_seq: 1,
                mss: 1460,
                snd_wscale: 7,
                rcv_wscale: 7,
                options: 7,
                timestamp: 1,
                window: RepairWindow::default(),
            },
            fe_port: 15010,
            be,
            app_port: 8080,
            timeout_ms: 50,
            data: get("/1k").into_bytes(),
        }))
    };
    let fe_addr = format!("{}:15006", f.bed.ip("fe"));
    // Wrong key: no answer at all.
    let forged = wire::encode(&Key::new(&[7; 32]).unwrap(), &offer(&fe_addr, be1_receiver));
    assert!(send(&forged).is_empty());
    assert_eq!(
        f.metric("be1", "baton_handoff_refused_total{reason=\"auth\"}"),
        1.0
    );
    // A valid notice is taken once (its flow is not redirected to the sender, so it
    // is ignored); the same bytes again are a replay, refused before that.
    let notice = wire::encode(
        &key,
        &wire::envelope(Message::Closed(vec![wire::Flow {
            client: "10.0.0.1:1".parse().unwrap(),
            local: "10.0.0.2:2".parse().unwrap(),
        }])),
    );
    // (The receiver closes a notice's connection once it has handled it.)
    send(&notice);
    let ignored = "baton_handoff_notices_ignored_total";
    assert_eq!(f.metric("be1", ignored), 1.0);
    send(&notice);
    assert_eq!(
        f.metric("be1", "baton_handoff_refused_total{reason=\"replay\"}"),
        1.0
    );
    assert_eq!(f.metric("be1", ignored), 1.0);
    assert_eq!(f.metric("be1", "baton_handoff_closed_applied_total"), 0.0);
    let refusal = |reply: Vec<u8>| {
        assert!(reply.len() > 4, "a refusal is answered");
        wire::decode(&key, &reply[4..], wire::now_ms()).unwrap().msg
    };
    // A genuine offer for a flow whose frontend address is outside the CIDRs.
    let foreign = wire::encode(&key, &offer("192.0.2.9:80", be1_receiver));
    let env = wire::decode(&key, &foreign[4..], wire::now_ms()).unwrap();
    assert_eq!(
        refusal(send(&foreign)),
        Message::Refused(env.nonce, Refusal::Cidr)
    );
    assert_eq!(
        f.metric("be1", "baton_handoff_refused_total{reason=\"cidr\"}"),
        1.0
    );
    // The same offer again is a replay: refused before anything is looked at.
    assert!(send(&foreign).is_empty());
    assert_eq!(
        f.metric("be1", "baton_handoff_refused_total{reason=\"replay\"}"),
        2.0
    );
    // An offer meant for another backend (captured and replayed here) is refused.
    let be2_receiver = format!("{}:15010", f.bed.ip("be2")).parse().unwrap();
    let elsewhere = offer(&fe_addr, be2_receiver);
    assert_eq!(
        refusal(send(&wire::encode(&key, &elsewhere))),
        Message::Refused(elsewhere.nonce, Refusal::Target)
    );
    assert_eq!(
        f.metric("be1", "baton_handoff_refused_total{reason=\"target\"}"),
        1.0
    );
    // Clocks seconds apart (far beyond the FE's 50 ms timeout) are no reason to
    // refuse: an offer stamped 5 s behind or ahead of be1's clock is restored and
    // answered "ready". This sender never says "go", so be1 then drops it unseen.
    for skew in [-5000i64, 5000] {
        let mut skewed = offer(&fe_addr, be1_receiver);
        skewed.sent_ms = skewed.sent_ms.saturating_add_signed(skew);
        let reply = send(&wire::encode(&key, &skewed));
        assert!(reply.len() > 4, "an offer {skew} ms off is answered");
        assert_eq!(
            wire::decode(&key, &reply[4..], wire::now_ms()).unwrap().msg,
            Message::Ready(skewed.nonce),
            "an offer {skew} ms off; be1 log:\n{}",
            f.log("be1")
        );
    }
    assert_eq!(
        f.metric("be1", "baton_handoff_refused_total{reason=\"late\"}"),
        0.0
    );
    assert_eq!(f.metric("be1", "baton_handoff_aborted_total"), 2.0);
    // Outside the freshness window (which bounds the replay cache): no answer.
    let mut stale = offer(&fe_addr, be1_receiver);
    stale.sent_ms -= 11_000;
    assert!(send(&wire::encode(&key, &stale)).is_empty());
    assert_eq!(
        f.metric("be1", "baton_handoff_refused_total{reason=\"stale\"}"),
        1.0
    );
    assert_eq!(f.metric("be1", "baton_handoff_offers_total"), 4.0);
    assert_eq!(f.metric("be1", "baton_handoff_active_connections"), 0.0);
    assert_eq!(f.elements("be1", "restored"), 0);
}

#[test]
fn no_flow_entries_remain_after_the_connections_close() {
    let Some(mut f) = Fleet::new() else { return };
    f.start_be("be1", &[]);
    f.start_be("be2", &[]);
    f.start_fe(&[]);
    for _ in 0..6 {
        assert_eq!(f.get("/1m").0, 200);
    }
    assert_eq!(f.metric("fe", "baton_handoffs_total"), 6.0);
    let clean = eventually(Duration::from_secs(10), || {
        f.elements("fe", "moved") == 0
            && f.elements("fe", "held") == 0
            && f.elements("be1", "restored") == 0
            && f.elements("be2", "restored") == 0
    });
    assert!(
        clean,
        "entries left: fe moved {} held {}, be1 {}, be2 {}",
        f.elements("fe", "moved"),
        f.elements("fe", "held"),
        f.elements("be1", "restored"),
        f.elements("be2", "restored")
    );
    assert_eq!(f.metric("fe", "baton_handoff_closed_applied_total"), 6.0);
}

#[test]
fn backend_notices_touch_only_the_redirects_to_their_sender() {
    use baton_layers::handoff::wire::{self, Flow, Message};
    let Some(mut f) = Fleet::new() else { return };
    f.start_be("be1", &[]);
    f.start_be("be2", &[]);
    f.start_fe(&[]);
    let key = f.key();
    let fe_receiver = format!("{}:15010", f.bed.ip("fe"));
    let ignored = "baton_handoff_notices_ignored_total";
    // Sends `msg` from `host` to fe's receiver, which has handled it once it closes.
    let notify = |host: &str, msg: Message| {
        f.send_frame(
            host,
            &fe_receiver,
            &wire::encode(&key, &wire::envelope(msg)),
        );
    };
    let go_on = f.dir.join("go-on");
    let got = std::thread::scope(|s| {
        let client = s.spawn(|| {
            f.script(json!([
                ["send", get("/1k")],
                ["read"],
                ["wait", go_on.display().to_string()],
                ["send", get("/1m")],
                ["read"]
            ]))
        });
        assert!(
            eventually(Duration::from_secs(10), || f.moved().len() == 1),
            "the connection was handed off; fe log:\n{}",
            f.log("fe")
        );
        let (flow, owner_ip) = f.moved().remove(0);
        let (owner, other) = if owner_ip == f.bed.ip("be1") {
            ("be1", "be2")
        } else {
            ("be2", "be1")
        };
        // Another backend can neither end nor take over the flow.
        notify(other, Message::Closed(vec![flow]));
        assert_eq!(f.metric("fe", ignored), 1.0);
        notify(other, Message::Alive(vec![flow]));
        assert_eq!(f.metric("fe", ignored), 2.0);
        assert_eq!(f.moved(), [(flow, owner_ip.clone())]);
        // The owner cannot create a redirect by calling a flow alive.
        let unknown = Flow {
            client: format!("{}:9", f.bed.ip("client")).parse().unwrap(),
            local: flow.local,
        };
        notify(owner, Message::Alive(vec![unknown, flow]));
        assert_eq!(f.metric("fe", ignored), 3.0);
        assert_eq!(f.moved(), [(flow, owner_ip.clone())]);
        std::fs::write(&go_on, "").unwrap();
        let got = client.join().unwrap();
        assert_eq!(got[1]["by"], owner, "still served by its backend");
        // Closed: the owner's notice removes the redirect, and a late "alive" from
        // the owner does not bring it back.
        assert!(
            eventually(Duration::from_secs(10), || f.moved().is_empty()),
            "redirect left: {:?}",
            f.moved()
        );
        assert_eq!(f.metric("fe", "baton_handoff_closed_applied_total"), 1.0);
        notify(owner, Message::Alive(vec![flow]));
        assert_eq!(f.metric("fe", ignored), 4.0);
        assert!(f.moved().is_empty(), "resurrected: {:?}", f.moved());
        got
    });
    assert_eq!(got.len(), 2);
    assert_eq!(got[1]["status"], 200);
    assert_eq!(got[1]["sha"], sha256(&content(MIB)));
}

#[test]
fn without_net_admin_handoff_is_off_and_requests_are_proxied() {
    let Some(mut f) = Fleet::new() else { return };
    f.start_be("be1", &[]);
    f.start_be("be2", &[]);
    // No CAP_NET_ADMIN (nor NET_RAW) in the bounding set: TCP_REPAIR is refused.
    let wrapper = ["setpriv", "--bounding-set", "-net_admin,-net_raw", "--"];
    f.fe = Some(f.spawn_fe_with(&[], &wrapper));
    assert_eq!(f.metric("fe", "baton_handoff_enabled"), 0.0);
    let ((), sent) = f.fe_sent(|| {
        for _ in 0..2 {
            let (status, by, body) = f.get("/1m");
            assert_eq!(status, 200);
            assert!(by == "be1" || by == "be2");
            assert_eq!(body.len(), MIB);
        }
    });
    f.assert_crossed_fe(sent, 2 * MIB, "proxy mode");
    assert_eq!(f.metric("fe", "baton_handoff_attempts_total"), 0.0);
    let log = f.log("fe");
    assert_eq!(log.matches("running in proxy mode").count(), 1, "{log}");
    assert!(f
        .bed
        .exec("fe", &["nft", "list", "table", "netdev", "baton"])
        .stdout
        .is_empty());
    assert_eq!(f.metric("be1", "baton_handoff_enabled"), 1.0);
}

#[test]
fn a_moved_connection_outlives_the_flow_ttl_while_in_use() {
    let Some(mut f) = Fleet::new() else { return };
    let ttl = [("BATON_HANDOFF_FLOW_TTL", "2s".to_string())];
    f.start_be("be1", &ttl);
    f.start_be("be2", &ttl);
    f.start_fe(&ttl);
    // Idle for twice the TTL between requests: the backend's refreshes keep both
    // sides' entries alive.
    let got = f.script(json!([
        ["send", get("/1k")],
        ["read"],
        ["sleep", 4],
        ["send", get("/1m")],
        ["read"]
    ]));
    assert_eq!(got.len(), 2);
    assert_eq!(got[1]["status"], 200);
    assert_eq!(got[1]["by"], got[0]["by"]);
    assert_eq!(got[1]["sha"], sha256(&content(MIB)));
    assert_eq!(f.metric("fe", "baton_handoffs_total"), 1.0);
}

#[test]
fn a_backend_deployed_as_in_the_manifests_takes_handoffs_behind_its_capture() {
    // The layout of deploy/kubernetes/backend-objects.yaml: `baton init` captures the
    // backend pod's inbound TCP, its baton runs the tproxy listener with `*=local`
    // and takes handoffs, serving moved connections from the app on loopback. The
    // frontend's endpoint is the pod's app port, so what it proxies goes through the
    // backend's capture too.
    let Some(mut f) = Fleet::new() else { return };
    let init = f.bed.exec(
        "be1",
        &[
            "env",
            "BATON_INBOUND_ADDR=0.0.0.0:15006",
            "BATON_ADMIN_ADDR=0.0.0.0:15021",
            BATON,
            "init",
        ],
    );
    assert!(
        init.status.success(),
        "baton init: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    f.start_be(
        "be1",
        &[
            ("BATON_INBOUND_MODE", "tproxy".into()),
            ("BATON_ROUTES", "*=local".into()),
        ],
    );
    f.start_fe_to("be1");
    let local_200 = "baton_requests_total{service=\"local\",status=\"200\"}";

    // Proxied (a connection that closes after one request): fe -> be1:8080, captured
    // by be1's baton and served by its app.
    let (got, sent) = f.fe_sent(|| {
        f.script(json!([
            [
                "send",
                "GET /256k HTTP/1.1\r\nHost: objects\r\nConnection: close\r\n\r\n"
            ],
            ["read"]
        ]))
    });
    assert_eq!(
        (&got[0]["status"], &got[0]["by"]),
        (&json!(200), &json!("be1"))
    );
    assert_eq!(got[0]["sha"], sha256(&content(KIB256)));
    f.assert_crossed_fe(sent, KIB256, "Connection: close, proxied");
    assert_eq!(f.metric("be1", local_200), 1.0, "through be1's capture");
    assert_eq!(f.metric("fe", "baton_handoffs_total"), 0.0);

    // Keep-alive: handed off to be1's baton through the capture's table, then every
    // request served from be1's app straight to the client.
    let mut plan = vec![];
    for _ in 0..5 {
        plan.push(json!(["send", get("/256k")]));
        plan.push(json!(["read"]));
    }
    let (got, sent) = f.fe_sent(|| f.script(json!(plan)));
    assert_eq!(got.len(), 5, "{got:?}");
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r["status"], 200, "request {i}");
        assert_eq!(r["by"], "be1", "request {i}");
        assert_eq!(r["sha"], sha256(&content(KIB256)), "request {i} intact");
    }
    assert_eq!(f.metric("fe", "baton_handoffs_total"), 1.0);
    f.assert_skipped_fe(
        sent,
        5 * KIB256,
        "5 keep-alive responses from a captured backend",
    );
    // The moved connection was served by be1's handoff path, not its capture.
    assert_eq!(f.metric("be1", local_200), 1.0);
}

/// Clients on `n` connections at once (argv[3]), released together by a barrier:
/// connection `i` asks for `/n/{i}` twice. Prints, per connection, its local port
/// and the responses ({status, by, len, sha}), or {error}.
const CONCURRENT_PY: &str = r#"
import json, socket, sys, threading
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
barrier = threading.Barrier(n)
out = [None] * n
def run(i):
    try:
        s = socket.create_connection((host, port), timeout=30)
        barrier.wait()
        buf, got = b"", []
        for _ in range(2):
            s.sendall(("GET /n/%d HTTP/1.1\r\nHost: objects\r\n\r\n" % i).encode())
            r, buf = read_response(s, buf)
            got.append(r)
        out[i] = {"port": s.getsockname()[1], "responses": got}
    except Exception as e:
        out[i] = {"error": repr(e)}
threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(out))
"#;

/// The fallback counters of `host`, as "reason=count " pairs (for messages).
fn fallbacks(f: &Fleet) -> String {
    baton_layers::metrics::FALLBACK_REASONS
        .iter()
        .map(|r| {
            format!(
                "{r}={} ",
                f.metric(
                    "fe",
                    &format!("baton_handoff_fallbacks_total{{reason=\"{r}\"}}")
                )
            )
        })
        .collect()
}

/// Established connections to `host`'s handoff receiver, as its kernel sees them.
fn receiver_connections(f: &Fleet, host: &str) -> usize {
    f.bed
        .must(
            host,
            &["ss", "-Htn", "state", "established", "sport", "= :15010"],
        )
        .lines()
        .count()
}

#[test]
fn handoffs_to_a_backend_share_one_control_connection() {
    let Some(mut f) = Fleet::new() else { return };
    f.start_be("be1", &[]);
    f.start_be("be2", &[]);
    // Concurrent handoffs through debug builds: a generous timeout (see below).
    f.start_fe(&[("BATON_HANDOFF_TIMEOUT", "2s".into())]);
    for i in 0..10 {
        let (status, by, body) = f.get("/1k");
        assert_eq!(status, 200, "request {i}");
        assert!(by == "be1" || by == "be2", "request {i} served by {by:?}");
        assert_eq!(sha256(&body), sha256(&content(1024)), "request {i}");
    }
    // And 20 at once.
    let cmd = format!(
        "seq 20 | xargs -P 20 -I{{}} curl -s --max-time 20 -o /dev/null -w '%{{http_code}}\\n' {}",
        f.url("/256k")
    );
    let codes = f.bed.must("client", &["sh", "-c", &cmd]);
    assert_eq!(codes.lines().filter(|c| *c == "200").count(), 20, "{codes}");
    assert_eq!(
        f.metric("fe", "baton_handoffs_total"),
        30.0,
        "fallbacks: {}",
        fallbacks(&f)
    );
    for be in ["be1", "be2"] {
        assert_eq!(f.metric(be, "baton_handoff_offers_total"), 15.0, "{be}");
        assert_eq!(
            f.metric(be, "baton_handoff_control_connections_total"),
            1.0,
            "{be} accepted one control connection for its 15 handoffs"
        );
        assert_eq!(
            receiver_connections(&f, be),
            1,
            "{be}: the one is still open"
        );
    }
    assert_eq!(f.metric("fe", "baton_handoff_control_opened_total"), 2.0);
}

#[test]
fn a_backend_restart_fails_only_the_handoffs_in_flight_and_later_ones_reconnect() {
    let Some(mut f) = Fleet::new() else { return };
    f.start_be("be1", &[]);
    // Only be1, and a timeout longer than this test waits: the fallbacks below are
    // the lost connection's doing, not the timeout's.
    let services = format!("objects={}:8080", f.bed.ip("be1"));
    f.start_fe(&[
        ("BATON_STATIC_SERVICES", services),
        ("BATON_HANDOFF_TIMEOUT", "10s".into()),
    ]);
    let (status, by, _) = f.get("/1k");
    assert_eq!((status, by.as_str()), (200, "be1"));
    assert_eq!(f.metric("fe", "baton_handoffs_total"), 1.0);
    // be1's baton stops: the next offers wait on the control connection, unanswered;
    // then it dies, and the kernel resets its connections.
    let be1 = f.be.remove(0).1;
    f.bed.signal(be1, "STOP");
    let started = Instant::now();
    let got = std::thread::scope(|s| {
        let clients: Vec<_> = (0..3).map(|_| s.spawn(|| f.get("/256k"))).collect();
        assert!(eventually(Duration::from_secs(10), || f
            .metric("fe", "baton_handoff_attempts_total")
            == 4.0));
        std::thread::sleep(Duration::from_millis(300)); // the offers go out
        f.bed.kill(be1);
        clients
            .into_iter()
            .map(|c| c.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "fell back when the connection died, not after the 10 s timeout ({:?})",
        started.elapsed()
    );
    for (i, (status, by, body)) in got.iter().enumerate() {
        assert_eq!(*status, 200, "in flight {i}: fe log:\n{}", f.log("fe"));
        assert_eq!(by, "be1", "in flight {i}");
        assert_eq!(sha256(body), sha256(&content(KIB256)), "in flight {i}");
    }
    assert_eq!(
        f.metric(
            "fe",
            "baton_handoff_fallbacks_total{reason=\"disconnected\"}"
        ),
        3.0,
        "fallbacks: {}",
        fallbacks(&f)
    );
    assert_eq!(f.metric("fe", "baton_handoffs_total"), 1.0);
    // A new baton on be1: the next handoffs open a new connection, and share it.
    f.start_be("be1", &[]);
    for i in 0..3 {
        let ((status, by, body), sent) = f.fe_sent(|| f.get("/1m"));
        assert_eq!((status, by.as_str()), (200, "be1"), "after the restart {i}");
        assert_eq!(sha256(&body), sha256(&content(MIB)));
        f.assert_skipped_fe(sent, MIB, "handed off after the restart");
    }
    assert_eq!(
        f.metric("fe", "baton_handoffs_total"),
        4.0,
        "fallbacks: {}",
        fallbacks(&f)
    );
    assert_eq!(
        f.metric("be1", "baton_handoff_control_connections_total"),
        1.0
    );
    assert_eq!(f.metric("fe", "baton_handoff_control_opened_total"), 2.0);
}

#[test]
fn concurrent_handoffs_on_one_control_connection_go_to_their_own_backend() {
    let Some(mut f) = Fleet::new() else { return };
    const N: usize = 40;
    let len = |i: usize| 4096 + 997 * i;
    let dir = f.dir.join("www").join("n");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..N {
        std::fs::write(dir.join(i.to_string()), content(len(i))).unwrap();
    }
    f.start_be("be1", &[]);
    f.start_be("be2", &[]);
    f.start_fe(&[("BATON_HANDOFF_TIMEOUT", "2s".into())]);
    let script = f.dir.join("concurrent.py");
    std::fs::write(&script, format!("{READ_RESPONSE_PY}{CONCURRENT_PY}")).unwrap();
    let out = f.bed.exec(
        "client",
        &[
            "python3",
            script.to_str().unwrap(),
            &f.bed.ip("fe"),
            "15006",
            &N.to_string(),
        ],
    );
    let got: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client failed ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        f.metric("fe", "baton_handoffs_total"),
        N as f64,
        "fallbacks: {}",
        fallbacks(&f)
    );
    // Which backend fe gave each connection to, from its log.
    let log = f.log("fe");
    let client = f.bed.ip("client");
    let given_to = |port: u64| -> Option<String> {
        let line = log.lines().find(|l| {
            l.contains("connection handed off") && l.contains(&format!("client={client}:{port} "))
        })?;
        let be = line.split("be=").nth(1)?.split(':').next()?;
        ["be1", "be2"]
            .into_iter()
            .find(|h| f.bed.ip(h) == be)
            .map(str::to_string)
    };
    let mut by = std::collections::BTreeMap::new();
    for (i, conn) in got.iter().enumerate() {
        let rs = conn["responses"]
            .as_array()
            .unwrap_or_else(|| panic!("connection {i}: {conn}"));
        let owner = given_to(conn["port"].as_u64().unwrap())
            .unwrap_or_else(|| panic!("connection {i} not in the fe log:\n{log}"));
        for (k, r) in rs.iter().enumerate() {
            assert_eq!(r["status"], 200, "connection {i}, request {k}");
            assert_eq!(r["len"], len(i), "connection {i}, request {k}");
            assert_eq!(
                r["sha"],
                sha256(&content(len(i))),
                "connection {i}, request {k}"
            );
            assert_eq!(r["by"], owner.as_str(), "connection {i}, request {k}");
        }
        *by.entry(owner).or_insert(0) += 1;
    }
    assert_eq!(
        by.into_iter().collect::<Vec<_>>(),
        [("be1".to_string(), N / 2), ("be2".to_string(), N / 2)]
    );
    for be in ["be1", "be2"] {
        assert_eq!(f.metric(be, "baton_handoff_control_connections_total"), 1.0);
        assert_eq!(f.metric(be, "baton_handoff_aborted_total"), 0.0);
    }
}

#[test]
fn a_backend_without_a_baton_is_not_tried_on_every_connection() {
    // be1 runs only its app: every keep-alive connection fe takes is eligible, but
    // after one refused control connection fe leaves be1's handoff port alone for a
    // while (1 s, doubling) and proxies at once, without freezing anything.
    let Some(mut f) = Fleet::new() else { return };
    f.start_fe_to("be1");
    // Count the SYNs reaching be1's handoff port.
    f.bed.nft(
        "be1",
        "table inet probe {
            chain input {
                type filter hook input priority 0; policy accept;
                tcp dport 15010 tcp flags & (syn | ack) == syn counter
            }
        }",
    );
    let connections = 20;
    for i in 0..connections {
        let got = f.script(json!([["send", get("/1k")], ["read"]]));
        assert_eq!(got[0]["status"], 200, "connection {i}");
        assert_eq!(got[0]["sha"], sha256(&content(1024)), "connection {i}");
    }
    assert_eq!(
        f.metric(
            "fe",
            "baton_handoff_fallbacks_total{reason=\"unreachable\"}"
        ),
        f64::from(connections)
    );
    let ruleset = f
        .bed
        .must("be1", &["nft", "list", "table", "inet", "probe"]);
    let syns: u32 = ruleset
        .split("packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {ruleset}"));
    // Tried at 0 s, then after 1, 3, 7, 15 s at most: far fewer than 20 connections.
    assert!(
        (1..=5).contains(&syns),
        "{syns} SYNs for {connections} connections"
    );
    assert_eq!(f.metric("fe", "baton_handoff_control_opened_total"), 0.0);
}

#[test]
fn a_new_connection_reusing_a_stale_moved_tuple_is_served_by_the_frontend() {
    // Moved entries whose connections ended without fe hearing of it (a backend that
    // crashed says no "closed"; the entries live until BATON_HANDOFF_FLOW_TTL), and a
    // client that reuses those ports: the new connections' SYNs must not be forwarded
    // to be1, which has nothing for them.
    let Some(mut f) = Fleet::new() else { return };
    f.start_be("be1", &[]);
    let be1 = f.bed.ip("be1");
    f.start_fe_to("be1");
    let (client, fe) = (f.bed.ip("client"), f.bed.ip("fe"));
    for port in [40123, 40124] {
        f.bed.must(
            "fe",
            &[
                "nft",
                &format!(
                    "add element netdev baton moved {{ {client} . {port} . {fe} . 15006 timeout 1h : {be1} }}"
                ),
            ],
        );
    }
    assert_eq!(f.elements("fe", "moved"), 2);
    let curl = |port: &str, extra: &[&str]| {
        let url = f.url("/256k");
        let mut cmd = vec![
            "curl",
            "-s",
            "--max-time",
            "10",
            "--local-port",
            port,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
        ];
        cmd.extend_from_slice(extra);
        cmd.push(&url);
        let out = f.bed.exec("client", &cmd);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Proxied by fe (it closes after one request): the whole exchange reached fe.
    let (out, sent) = f.fe_sent(|| curl("40123", &["-H", "Connection: close"]));
    assert_eq!(out, format!("200 {KIB256}"), "fe log:\n{}", f.log("fe"));
    f.assert_crossed_fe(sent, KIB256, "a reused tuple, proxied");
    assert_eq!(f.elements("fe", "fresh"), 1, "kept off the stale redirect");

    // Keep-alive this time: the connection reaches fe, is handed off, and its new
    // redirect replaces the fresh mark (which would otherwise keep it off).
    let (out, sent) = f.fe_sent(|| curl("40124", &[]));
    assert_eq!(out, format!("200 {KIB256}"), "fe log:\n{}", f.log("fe"));
    assert_eq!(f.metric("fe", "baton_handoffs_total"), 1.0);
    f.assert_skipped_fe(sent, KIB256, "a reused tuple, handed off");
    assert_eq!(f.elements("fe", "fresh"), 1, "40124 left the fresh set");
}
