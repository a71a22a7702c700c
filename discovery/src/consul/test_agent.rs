//! A scripted agent for unit tests: answers each request with what a closure says and
//! records what it was asked. (The faithful Consul API server is `tests/support`.)

use super::{env, Client};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::net::TcpListener;

/// One request the agent got.
#[derive(Clone, Debug)]
pub(crate) struct Asked {
    pub(crate) method: http::Method,
    /// Path and query.
    pub(crate) uri: String,
}

/// What the agent answers: status, headers, body.
pub(crate) type Answer = (u16, Vec<(&'static str, String)>, String);

type Script = dyn Fn(&Asked) -> Answer + Send + Sync;

pub(crate) struct TestAgent {
    pub(crate) addr: SocketAddr,
    asked: Arc<Mutex<Vec<Asked>>>,
    events: Arc<Mutex<Vec<String>>>,
    delays: Arc<Mutex<Vec<(String, Duration)>>>,
}

impl TestAgent {
    pub(crate) async fn start(script: impl Fn(&Asked) -> Answer + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let events = Arc::new(Mutex::new(Vec::new()));
        let delays: Arc<Mutex<Vec<(String, Duration)>>> = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let shared = (asked.clone(), events.clone(), delays.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (script, shared) = (script.clone(), shared.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (script, (log, events, delays)) = (script.clone(), shared.clone());
                            async move {
                                let asked = Asked {
                                    method: req.method().clone(),
                                    uri: req.uri().to_string(),
                                };
                                let _ = req.into_body().collect().await;
                                log.lock().unwrap().push(asked.clone());
                                let event = format!("{} {}", asked.method, asked.uri);
                                events.lock().unwrap().push(format!("asked {event}"));
                                let delay = delays
                                    .lock()
                                    .unwrap()
                                    .iter()
                                    .find(|(part, _)| asked.uri.contains(part.as_str()))
                                    .map(|(_, d)| *d);
                                if let Some(d) = delay {
                                    tokio::time::sleep(d).await;
                                }
                                events.lock().unwrap().push(format!("answered {event}"));
                                let (status, headers, body) = script(&asked);
                                let mut rsp = http::Response::builder().status(status);
                                for (k, v) in headers {
                                    rsp = rsp.header(k, v);
                                }
                                Ok::<_, Infallible>(rsp.body(Full::new(Bytes::from(body))).unwrap())
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            asked,
            events,
            delays,
        }
    }

    /// From now on answers requests whose path and query contain `part` after `by`.
    pub(crate) fn delay(&self, part: &str, by: Duration) {
        self.delays.lock().unwrap().push((part.to_string(), by));
    }

    /// `asked METHOD URI` and `answered METHOD URI`, in the order they happened.
    pub(crate) fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }

    /// A client of this agent.
    pub(crate) fn client(&self) -> Client {
        let addr = self.addr.to_string();
        let vars: HashMap<String, String> = [(env::CONSUL_HTTP_ADDR.to_string(), addr)]
            .into_iter()
            .collect();
        Client::new(env::from_env(&move |n| vars.get(n).cloned()).expect("valid settings"))
    }

    /// What it was asked so far.
    pub(crate) fn asked(&self) -> Vec<Asked> {
        self.asked.lock().unwrap().clone()
    }
}
