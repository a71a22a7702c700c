//! Test support: a baton process, upstream servers and HTTP clients on loopback.
//!
//! Each test starts its own baton (the real binary, configured by env) and its own
//! upstreams on ephemeral loopback ports, so tests run in parallel and assert on what
//! a client and an application would really see.

#![allow(dead_code)]

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use std::{
    collections::HashMap,
    convert::Infallible,
    io::Read,
    net::SocketAddr,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};
use tokio::net::TcpListener;

/// A free loopback port: bound then released, and never handed out twice by this
/// process (the kernel may offer a just-released port again at once).
pub fn free_addr() -> SocketAddr {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return addr;
        }
    }
}

/// A running baton process.
pub struct Baton {
    child: Option<Child>,
    /// The inbound (data) address.
    pub addr: SocketAddr,
    /// The admin address.
    pub admin: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Baton {
    /// Starts baton with `env` (plus fresh inbound/admin ports unless given) and waits
    /// until `/ready` answers 200.
    pub async fn start(env: &[(&str, &str)]) -> Baton {
        let b = Self::spawn(env);
        b.wait_ready().await;
        b
    }

    /// Starts baton without waiting for readiness.
    pub fn spawn(env: &[(&str, &str)]) -> Baton {
        let mut vars: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let addr = vars
            .entry("BATON_INBOUND_ADDR".into())
            .or_insert_with(|| free_addr().to_string())
            .clone();
        let admin = vars
            .entry("BATON_ADMIN_ADDR".into())
            .or_insert_with(|| free_addr().to_string())
            .clone();
        vars.entry("BATON_LOG".into())
            .or_insert_with(|| "info".into());
        vars.entry("BATON_WORKERS".into())
            .or_insert_with(|| "2".into());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton"));
        cmd.env_clear()
            .envs(&vars)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn baton");
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Baton {
            child: Some(child),
            addr: addr.parse().unwrap(),
            admin: admin.parse().unwrap(),
            log,
        }
    }

    /// Everything baton logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Whether baton logs `needle`, waiting up to 10 s for it: its log reaches the test
    /// through a pipe and a reader thread, a little after baton wrote it.
    pub async fn logged(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(needle) {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Waits for `/ready` to answer 200 (panics with the log after 15 s).
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok((status, _, _)) = try_get(self.admin, "/ready", &[]).await {
                if status == StatusCode::OK {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!("baton not ready in time; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The admin `/metrics` text.
    pub async fn metrics(&self) -> String {
        let (_, _, body) = get(self.admin, "/metrics").await;
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends `signal` (e.g. "TERM", "HUP") to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().unwrap().id();
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {pid} failed");
    }

    /// Waits for the process to exit (panics after `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("baton did not exit in time; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Baton {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `NAME=ADDR,ADDR` for `BATON_STATIC_SERVICES`.
pub fn services(name: &str, ups: &[&Upstream]) -> String {
    let addrs: Vec<String> = ups.iter().map(|u| u.addr.to_string()).collect();
    format!("{name}={}", addrs.join(","))
}

/// Starts baton routing everything (`*`) to service `name` on `ups`, with `extra` env.
pub async fn route_all(name: &str, ups: &[&Upstream], extra: &[(&str, &str)]) -> Baton {
    let routes = format!("*={name}");
    let svc = services(name, ups);
    let mut env = vec![
        ("BATON_ROUTES", routes.as_str()),
        ("BATON_STATIC_SERVICES", svc.as_str()),
    ];
    env.extend_from_slice(extra);
    Baton::start(&env).await
}

/// An upstream that speaks HTTP/2 only.
pub async fn h2_upstream(name: &'static str) -> Upstream {
    Upstream::start(
        name,
        Behaviour {
            h2_only: true,
            ..Default::default()
        },
    )
    .await
}

/// Runs the baton binary with `env` (only) and returns its exit status and stderr.
pub fn run_to_exit(env: &[(&str, &str)], args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run baton");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// How a test upstream behaves.
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    /// Delay before answering every request.
    pub delay: Duration,
    /// Serve HTTP/2 only (prior knowledge).
    pub h2_only: bool,
}

/// A test upstream. Answers:
/// - `/echo`: the request body, streamed back;
/// - `/bytes/N`: N deterministic bytes ([`pattern`]);
/// - `/headers`: the request's headers, one `name: value` per line;
/// - `/slow/MS`: after MS milliseconds, its name;
/// - anything else: its name.
///
/// Every response carries `x-upstream: NAME` and `x-version: HTTP/..`.
pub struct Upstream {
    /// Its address.
    pub addr: SocketAddr,
    /// Its name.
    pub name: &'static str,
    hits: Arc<AtomicUsize>,
    conns: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Starts an upstream on a fresh loopback port.
    pub async fn start(name: &'static str, behaviour: Behaviour) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, name, behaviour)
    }

    /// Serves on `listener`.
    pub fn serve(listener: TcpListener, name: &'static str, behaviour: Behaviour) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(AtomicUsize::new(0));
        let (h, c) = (hits.clone(), conns.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (h, b) = (h.clone(), behaviour.clone());
                let h2_only = b.h2_only;
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        h.fetch_add(1, Ordering::SeqCst);
                        answer(name, b.clone(), req)
                    });
                    let io = TokioIo::new(stream);
                    if h2_only {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    }
                });
            }
        });
        Upstream {
            addr,
            name,
            hits,
            conns,
            task,
        }
    }

    /// Requests served so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    /// Stops accepting (the port then refuses connections).
    pub fn stop(self) {
        self.task.abort();
    }
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

async fn answer(
    name: &'static str,
    b: Behaviour,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, Infallible> {
    if !b.delay.is_zero() {
        tokio::time::sleep(b.delay).await;
    }
    let path = req.uri().path().to_string();
    let version = format!("{:?}", req.version());
    let body: BoxBody = if path == "/echo" {
        req.into_body().boxed()
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        let n: usize = n.parse().unwrap_or(0);
        full(pattern(n))
    } else if path == "/headers" {
        let mut text = String::new();
        for (k, v) in req.headers() {
            text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
        }
        full(text.into())
    } else if let Some(spec) = path.strip_prefix("/drip/") {
        // /drip/N/MS: N chunks of 1000 bytes, MS milliseconds apart.
        let (n, ms) = spec.split_once('/').unwrap_or(("0", "0"));
        let (n, ms): (usize, u64) = (n.parse().unwrap_or(0), ms.parse().unwrap_or(0));
        let chunks = futures_util::stream::unfold(0, move |i| async move {
            if i == n {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let frame = hyper::body::Frame::data(Bytes::from(vec![b'a' + (i % 26) as u8; 1000]));
            Some((Ok::<_, hyper::Error>(frame), i + 1))
        });
        http_body_util::StreamBody::new(chunks).boxed()
    } else if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        full(name.into())
    } else {
        full(name.into())
    };
    let mut rsp = Response::new(body);
    rsp.headers_mut()
        .insert("x-upstream", name.parse().unwrap());
    rsp.headers_mut()
        .insert("x-version", version.parse().unwrap());
    Ok(rsp)
}

fn full(b: Bytes) -> BoxBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

/// `n` deterministic, non-repeating-looking bytes.
pub fn pattern(n: usize) -> Bytes {
    let mut x: u32 = 0x9e37_79b9;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// SHA-256 of `b`, hex.
pub fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// A response: status, headers, body.
pub type Got = (StatusCode, http::HeaderMap, Bytes);

/// GET `path` from `addr` over HTTP/1.1.
pub async fn get(addr: SocketAddr, path: &str) -> Got {
    try_get(addr, path, &[]).await.expect("request failed")
}

/// GET with extra headers, over HTTP/1.1.
pub async fn try_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Got, String> {
    let mut req = Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(&http1_client(), req.body(Full::new(Bytes::new())).unwrap()).await
}

/// An HTTP/1.1 client (pooled: reuse it for keep-alive).
pub fn http1_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 (prior knowledge) client.
pub fn http2_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Sends `req` with `client` and collects the response.
pub async fn send(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<Got, String> {
    let rsp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = rsp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// The `x-upstream` header of a response.
pub fn upstream_of(got: &Got) -> String {
    got.1
        .get("x-upstream")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// The value of a metric line `name{labels} value` (exact label text), or 0.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}
pub mod consul;
pub mod netns;
