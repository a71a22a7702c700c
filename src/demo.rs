//! `baton demo`: the sidecar on the static default, with its own demo upstreams.
//!
//! Starts two small HTTP servers on loopback and runs baton in front of them on
//! `127.0.0.1:15006` (admin on `127.0.0.1:15021`), round-robin, so that
//! `curl http://127.0.0.1:15006/` answers alternately from each. Every `BATON_*`
//! variable still applies and overrides the demo's defaults.

use crate::config::{self, Strings};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::{collections::HashMap, convert::Infallible, net::SocketAddr};

/// Upstreams started by the demo.
pub const UPSTREAMS: usize = 2;

/// Listeners for the demo upstreams, bound before the runtime starts so their ports
/// can go into the configuration.
pub fn bind_upstreams() -> std::io::Result<Vec<std::net::TcpListener>> {
    (0..UPSTREAMS)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .collect()
}

/// The demo's configuration defaults for upstreams at `addrs`.
pub fn defaults(addrs: &[SocketAddr]) -> impl Strings {
    let endpoints: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let map: HashMap<String, String> = [
        (config::BATON_INBOUND_ADDR, "127.0.0.1:15006".to_string()),
        (config::BATON_ADMIN_ADDR, "127.0.0.1:15021".to_string()),
        (config::BATON_ROUTES, "*=demo".to_string()),
        (
            config::BATON_STATIC_SERVICES,
            format!("demo={}", endpoints.join(",")),
        ),
        (config::BATON_LB, "rr".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    map
}

/// Serves the demo upstreams: each answers with its number, the method and the path,
/// and echoes request bodies.
pub async fn serve_upstreams(listeners: Vec<std::net::TcpListener>) -> std::io::Result<()> {
    for (i, l) in listeners.into_iter().enumerate() {
        let listener = tokio::net::TcpListener::from_std(l)?;
        let addr = listener.local_addr()?;
        tracing::info!(upstream = i + 1, %addr, "demo upstream listening");
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| answer(i + 1, addr, req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }
    Ok(())
}

async fn answer(
    n: usize,
    addr: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let head = format!(
        "hello from demo upstream {n} ({addr}): {} {}\n",
        req.method(),
        req.uri().path()
    );
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    Ok(Response::new(Full::new(Bytes::from(out))))
}
