//! The admin server: `/live`, `/ready`, `/metrics`, `/config`, and `POST /drain`,
//! `POST /resume`.

use crate::leave::{Leave, Resume};
use baton_discovery::Registry;
use baton_layers::metrics::{self, Metrics};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::{
    convert::Infallible,
    fmt::Write,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};
use tokio::{net::TcpListener, sync::watch};

/// What readiness depends on, shared with the rest of the process.
#[derive(Debug, Default)]
pub struct State {
    /// The inbound listener is bound and accepting.
    pub listening: AtomicBool,
    /// Shutdown has begun: not ready, so load balancers stop sending.
    pub draining: AtomicBool,
}

/// The admin endpoints' data.
pub struct Admin {
    /// Readiness state.
    pub state: Arc<State>,
    /// The effective configuration, rendered once.
    pub config_json: Bytes,
    /// Metrics registry.
    pub metrics: Metrics,
    /// Discovery registry.
    pub registry: Registry,
    /// Services that must be resolved before ready.
    pub routed: Vec<Arc<str>>,
    /// Leaving the fleet (`POST /drain`).
    pub leave: Arc<Leave>,
}

/// `POST /drain` and `POST /resume` from `peer`. Drain: leave (deregister from Consul,
/// stop being ready) and keep serving until SIGTERM. Resume: join again (the app came
/// back without a SIGTERM: its container alone restarted). Only from this host (the
/// app's `preStop`/`postStart` hooks in the pod): anyone who can reach the admin port
/// must not be able to take the instance out.
async fn membership(
    admin: &Admin,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n".into());
    }
    // A request baton itself proxied here comes from loopback too, but carries the
    // forwarding headers it adds to everything it proxies.
    let proxied = req.headers().contains_key("x-forwarded-for")
        || req.headers().contains_key(header::FORWARDED);
    if !peer.ip().to_canonical().is_loopback() || proxied {
        tracing::warn!(%peer, path, "refused from outside this host");
        return text(
            StatusCode::FORBIDDEN,
            format!("POST {path} is accepted from loopback only\n"),
        );
    }
    if path == "/resume" {
        return match admin.leave.resume().await {
            Resume::Joined => {
                tracing::info!("POST /resume: joined again");
                text(StatusCode::OK, "resumed: ready and registered\n".into())
            }
            Resume::AlreadyIn => text(StatusCode::OK, "not draining\n".into()),
            Resume::ShuttingDown => text(
                StatusCode::CONFLICT,
                "shutting down: cannot resume\n".into(),
            ),
        };
    }
    if admin.leave.leave().await {
        tracing::info!("POST /drain: left; serving until SIGTERM or POST /resume");
    }
    text(
        StatusCode::OK,
        "draining: deregistered and not ready; serving until SIGTERM\n".into(),
    )
}

impl Admin {
    /// `Ok` when ready, else why not.
    pub fn readiness(&self) -> Result<(), String> {
        if self.state.draining.load(Ordering::Acquire) {
            return Err("draining".into());
        }
        if !self.state.listening.load(Ordering::Acquire) {
            return Err("inbound listener not up".into());
        }
        let waiting: Vec<&str> = self
            .routed
            .iter()
            .filter(|s| !self.registry.is_resolved(s))
            .map(|s| &**s)
            .collect();
        if !waiting.is_empty() {
            return Err(format!("waiting for discovery of {}", waiting.join(", ")));
        }
        Ok(())
    }

    fn render_metrics(&self) -> String {
        let mut out = String::with_capacity(8192);
        metrics::gauge(
            &mut out,
            "baton_ready",
            "1 when /ready answers 200.",
            u8::from(self.readiness().is_ok()),
        );
        metrics::header(&mut out, "baton_build_info", "Build information.", "gauge");
        let _ = writeln!(
            out,
            "baton_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        self.metrics.render(&mut out);
        let states = self.registry.states();
        metrics::header(
            &mut out,
            "baton_endpoints",
            "Endpoints discovered per service.",
            "gauge",
        );
        for s in &states {
            let _ = writeln!(
                out,
                "baton_endpoints{{service=\"{}\"}} {}",
                metrics::escape(&s.name),
                s.instances
            );
        }
        metrics::header(
            &mut out,
            "baton_discovery_resolved",
            "1 once a service has had its first discovery update.",
            "gauge",
        );
        for s in &states {
            let _ = writeln!(
                out,
                "baton_discovery_resolved{{service=\"{}\"}} {}",
                metrics::escape(&s.name),
                u8::from(s.resolved)
            );
        }
        metrics::header(
            &mut out,
            "baton_discovery_stale_seconds",
            "How long a service's discovery data has been out of date (0 when fresh).",
            "gauge",
        );
        let now = SystemTime::now();
        for s in &states {
            let age = s
                .stale_since
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or(Duration::ZERO);
            let _ = writeln!(
                out,
                "baton_discovery_stale_seconds{{service=\"{}\"}} {}",
                metrics::escape(&s.name),
                age.as_secs_f64()
            );
        }
        out
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
        }
        match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n".into()),
            "/ready" => match self.readiness() {
                Ok(()) => text(StatusCode::OK, "ready\n".into()),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            },
            "/metrics" => {
                let mut rsp = text(StatusCode::OK, self.render_metrics());
                rsp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                rsp
            }
            "/config" => {
                let mut rsp = Response::new(Full::new(self.config_json.clone()));
                rsp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                rsp
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /live, /ready, /metrics, /config, POST /drain, POST /resume\n"
                    .into(),
            ),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

/// Serves the admin endpoints on `listener` until the process exits (it keeps
/// answering during the drain, so `/ready` can say "draining").
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let admin = admin.clone();
                async move {
                    let rsp = if matches!(req.uri().path(), "/drain" | "/resume") {
                        membership(&admin, &req, peer).await
                    } else {
                        admin.handle(&req)
                    };
                    Ok::<_, Infallible>(rsp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(error) = conn.await {
                tracing::debug!(%error, "admin connection error");
            }
        });
    }
}
