//! `baton-pass-app`: a static file server that takes moved connections from baton.
//!
//! The reference for a handoff-aware application (`BATON_APP_PASS`, see
//! `baton_layers::handoff::pass`): it serves the files under `--root` over HTTP/1.1
//! on `--listen` like any server, and also takes the sockets its baton passes on
//! `--pass`, serving those clients itself, so that neither baton is in their data path.
//! Responses say how their connection arrived (`x-connection: accepted|passed`) and
//! who served them (`x-served-by: --name`).
//!
//! ```text
//! baton-pass-app --root DIR [--listen 127.0.0.1:8080] [--pass /run/baton/app.sock [--allow-uid UID]...] [--name NAME]
//! ```
//!
//! `--allow-uid` names a user whose offers it takes (repeatable), instead of the
//! default of root and its own user: for a baton running as neither.
//!
//! Files are read into memory at startup (it serves what tests and benchmarks ask of
//! it, not a changing tree).

use baton_layers::{handoff::pass::PassListener, io::PrefixedIo};
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};
use tokio::io::{AsyncRead, AsyncWrite};

/// How long accepting pauses after an error.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(10);

struct Args {
    root: PathBuf,
    listen: SocketAddr,
    pass: Option<PathBuf>,
    allow_uids: Vec<u32>,
    name: String,
}

const USAGE: &str = "usage: baton-pass-app --root DIR [--listen 127.0.0.1:8080] [--pass /run/baton/app.sock [--allow-uid UID]...] [--name NAME]";

fn parse_args() -> Result<Args, String> {
    let mut root = None;
    let mut listen: SocketAddr = ([127, 0, 0, 1], 8080).into();
    let mut pass = None;
    let mut allow_uids = Vec::new();
    let mut name = "baton-pass-app".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--root" => root = Some(PathBuf::from(value()?)),
            "--listen" => {
                let v = value()?;
                listen = v
                    .parse()
                    .map_err(|_| format!("--listen {v}: expected IP:PORT"))?;
            }
            "--pass" => pass = Some(PathBuf::from(value()?)),
            "--allow-uid" => {
                let v = value()?;
                allow_uids.push(
                    v.parse()
                        .map_err(|_| format!("--allow-uid {v}: expected a numeric user ID"))?,
                );
            }
            "--name" => name = value()?,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        root: root.ok_or("--root is required")?,
        listen,
        pass,
        allow_uids,
        name,
    })
}

/// Every regular file under `root`, by URL path (`/a/b` for `root/a/b`).
fn load(root: &Path) -> std::io::Result<HashMap<String, Bytes>> {
    let mut files = HashMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            // Not following symlinked directories: a loop would never end.
            if entry.file_type()?.is_dir() {
                dirs.push(path);
            } else if let Ok(rel) = path.strip_prefix(root) {
                let url = format!("/{}", rel.to_string_lossy());
                files.insert(url, Bytes::from(std::fs::read(&path)?));
            }
        }
    }
    Ok(files)
}

struct Site {
    files: HashMap<String, Bytes>,
    name: HeaderValue,
}

fn answer(site: &Site, how: &'static str, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let found = match *req.method() {
        Method::GET | Method::HEAD => site.files.get(req.uri().path()).cloned(),
        _ => None,
    };
    let (status, body) = match found {
        Some(b) => (StatusCode::OK, b),
        None if matches!(*req.method(), Method::GET | Method::HEAD) => {
            (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n"))
        }
        None => (
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from_static(b"GET or HEAD only\n"),
        ),
    };
    let len = body.len();
    let body = if req.method() == Method::HEAD {
        Bytes::new()
    } else {
        body
    };
    let mut rsp = Response::new(Full::new(body));
    *rsp.status_mut() = status;
    let h = rsp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert("x-served-by", site.name.clone());
    h.insert("x-connection", HeaderValue::from_static(how));
    rsp
}

fn serve<I>(site: Arc<Site>, how: &'static str, io: I)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let rsp = answer(&site, how, &req);
            async move { Ok::<_, Infallible>(rsp) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), svc)
            .await;
    });
}

async fn run(args: Args) -> std::io::Result<()> {
    let site = Arc::new(Site {
        files: load(&args.root)?,
        name: HeaderValue::from_str(&args.name)
            .map_err(|_| std::io::Error::other("--name: not a valid header value"))?,
    });
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    if let Some(path) = &args.pass {
        let mut passes = PassListener::bind(path)?;
        if !args.allow_uids.is_empty() {
            passes = passes.allow_uids(args.allow_uids.iter().copied());
        }
        let site = site.clone();
        tokio::spawn(async move {
            loop {
                let incoming = match passes.accept().await {
                    Ok(i) => i,
                    Err(e) => {
                        // E.g. out of descriptors: let connections close first.
                        eprintln!("baton-pass-app: accept on the pass socket: {e}");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let site = site.clone();
                tokio::spawn(async move {
                    let passed = match incoming.take().await {
                        Ok(p) => p,
                        Err(e) => return eprintln!("baton-pass-app: a bad pass: {e}"),
                    };
                    match tokio::net::TcpStream::from_std(passed.stream) {
                        Ok(stream) => {
                            let _ = stream.set_nodelay(true);
                            let io = PrefixedIo::new(Bytes::from(passed.prefix), stream);
                            serve(site, "passed", io);
                        }
                        Err(e) => eprintln!("baton-pass-app: cannot register a passed socket: {e}"),
                    }
                });
            }
        });
    }
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("baton-pass-app: accept: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        serve(site.clone(), "accepted", stream);
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("baton-pass-app: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baton-pass-app: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baton-pass-app: {e}");
            ExitCode::FAILURE
        }
    }
}
