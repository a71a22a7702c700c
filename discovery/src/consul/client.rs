//! The HTTP client for the agent's API.

use super::{
    connect::Connector,
    env::{Address, ClientSettings, Consistency},
};
use bytes::Bytes;
use http::{header::HeaderValue, HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{client::legacy, rt::TokioExecutor};
use std::{
    fmt::Write,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

/// The largest answer read from the agent (a health list of thousands of instances is a
/// few MiB).
const MAX_BODY: usize = 64 << 20;
/// How long a connection to the agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a call may take, besides the `wait` of a blocking query.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `wait` Consul honours (its `maxQueryTime`): it cuts longer ones to this.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(600);

/// A blocking query's `wait` as sent (at most [`MAX_WAIT`], as Consul would cut it
/// anyway) and the deadline of its answer: that wait, the up to wait/16 of jitter the
/// agent adds to it, and [`CALL_TIMEOUT`]. A query still unanswered then is a failure.
pub(crate) fn blocking_deadline(wait: Duration) -> (Duration, Duration) {
    let wait = wait.min(MAX_WAIT);
    (
        wait,
        CALL_TIMEOUT.saturating_add(wait).saturating_add(wait / 16),
    )
}

/// A Consul API call that did not give an answer to use.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection, or it broke.
    #[error("cannot reach the Consul agent at {url}: {reason}")]
    Transport {
        /// The agent.
        url: String,
        /// The error and its causes, as one line.
        reason: String,
    },
    /// No complete answer in time.
    #[error("no answer from the Consul agent within {0:?}")]
    Timeout(Duration),
    /// An answer other than success.
    #[error("Consul answered {status}: {body}")]
    Status {
        /// Its status.
        status: StatusCode,
        /// The start of its body (Consul explains errors there).
        body: String,
    },
    /// A success whose body is not what the API documents.
    #[error("cannot decode Consul's answer: {0}")]
    Decode(#[from] serde_json::Error),
    /// A blocking-query answer without a valid `X-Consul-Index`.
    #[error(
        "Consul's answer has no valid X-Consul-Index header (a proxy in between dropping it?)"
    )]
    MissingIndex,
}

impl Error {
    /// The status of an error answer.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An answer from the agent.
#[derive(Clone, Debug)]
pub struct Response {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body.
    pub body: Bytes,
}

impl Response {
    /// `X-Consul-Index`, the blocking-query index, when present and valid.
    pub fn index(&self) -> Option<u64> {
        self.header("x-consul-index")?.parse().ok()
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }

    /// `Ok` for a 2xx answer, else the error carrying its status and body.
    pub fn success(self) -> Result<Self, Error> {
        if self.status.is_success() {
            return Ok(self);
        }
        let text = String::from_utf8_lossy(&self.body);
        let mut body: String = text.trim().chars().take(300).collect();
        if body.is_empty() {
            body = "(no body)".into();
        }
        Err(Error::Status {
            status: self.status,
            body,
        })
    }
}

/// A client of one Consul agent. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    http: legacy::Client<Connector, Full<Bytes>>,
    base: Arc<str>,
    token: Arc<Mutex<Token>>,
    settings: Arc<ClientSettings>,
}

/// The token sent, and where it comes from.
#[derive(Debug)]
struct Token {
    value: Option<HeaderValue>,
    /// `CONSUL_HTTP_TOKEN_FILE` and the modification time of what was read from it.
    file: Option<(PathBuf, Option<SystemTime>)>,
}

fn header(token: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(token).ok()?;
    v.set_sensitive(true);
    Some(v)
}

impl Token {
    /// The token to send: a token file that changed since it was read (a rotation by
    /// consul-k8s or a Vault agent, a Kubernetes Secret update) is read again. A file
    /// that cannot be read, or is empty, keeps the last token.
    fn current(&mut self) -> Option<HeaderValue> {
        if let Some((path, seen)) = &mut self.file {
            let modified = std::fs::metadata(&*path).and_then(|m| m.modified()).ok();
            if modified.is_some() && modified != *seen {
                *seen = modified;
                match std::fs::read_to_string(&*path).map(|t| header(t.trim())) {
                    Ok(Some(v)) if !v.is_empty() => {
                        if self.value.as_ref() != Some(&v) {
                            tracing::info!(path = %path.display(), "the Consul token file changed; using the new token");
                        }
                        self.value = Some(v);
                    }
                    Ok(_) => {
                        tracing::warn!(path = %path.display(), "the Consul token file is empty or not a valid header value; keeping the last token")
                    }
                    Err(error) => {
                        tracing::warn!(path = %path.display(), %error, "cannot read the Consul token file; keeping the last token")
                    }
                }
            }
        }
        self.value.clone()
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("agent", &self.settings.url())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for the agent `settings` describe.
    pub fn new(settings: ClientSettings) -> Self {
        let base = match (&settings.addr, &settings.tls) {
            // The socket is what matters; the host only fills the Host header.
            (Address::Unix(_), _) => "http://localhost".to_string(),
            (addr, Some(_)) => format!("https://{addr}"),
            (addr, None) => format!("http://{addr}"),
        };
        let token = Token {
            value: settings.token.as_ref().and_then(|t| header(&t.0)),
            file: settings.token_file.clone().map(|path| {
                let read = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
                (path, read)
            }),
        };
        let http = legacy::Client::builder(TokioExecutor::new())
            // Blocking queries hold a connection each; the rest reuse idle ones.
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(8)
            .build(Connector::new(&settings, CONNECT_TIMEOUT));
        Self {
            http,
            base: base.into(),
            token: Arc::new(Mutex::new(token)),
            settings: Arc::new(settings),
        }
    }

    /// The settings this client was made with.
    pub fn settings(&self) -> &ClientSettings {
        &self.settings
    }

    /// Appends the datacenter and consistency parameters of reads to a query string
    /// that already has at least one parameter.
    pub(crate) fn read_options(&self, query: &mut String) {
        if let Some(dc) = &self.settings.datacenter {
            let _ = write!(query, "&dc={}", encode(dc));
        }
        match self.settings.consistency {
            Consistency::Default => {}
            Consistency::Stale => query.push_str("&stale"),
            Consistency::Consistent => query.push_str("&consistent"),
        }
    }

    /// Sends one request and reads the whole answer, whatever its status, within
    /// `timeout`.
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Response, Error> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path_and_query}", self.base));
        let token = self
            .token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .current();
        if let Some(token) = token {
            req = req.header("x-consul-token", token);
        }
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| Error::Transport {
                url: self.settings.url(),
                reason: format!("bad request {path_and_query:?}: {e}"),
            })?;
        let exchange = async {
            let rsp = self
                .http
                .request(req)
                .await
                .map_err(|e| self.transport(&e))?;
            let (parts, body) = rsp.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| self.transport(&*e))?
                .to_bytes();
            Ok(Response {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(Error::Timeout(timeout)))
    }

    fn transport(&self, e: &(dyn std::error::Error + 'static)) -> Error {
        let mut reason = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            let _ = write!(reason, ": {c}");
            cause = c.source();
        }
        Error::Transport {
            url: self.settings.url(),
            reason,
        }
    }
}

/// Percent-encodes `s` for a path segment or a query value.
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A duration in Go's syntax, as Consul's parameters and check definitions take it.
pub fn go_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_deadlines_are_bounded() {
        let (wait, deadline) = blocking_deadline(Duration::from_secs(300));
        assert_eq!(wait, Duration::from_secs(300));
        assert_eq!(deadline, Duration::from_millis(300_000 + 18_750 + 10_000));
        assert_eq!(
            blocking_deadline(Duration::ZERO),
            (Duration::ZERO, CALL_TIMEOUT)
        );
        // A wait beyond Consul's limit (or absurd) is cut to it: no overflow.
        for huge in [Duration::from_secs(601), Duration::MAX] {
            let (wait, deadline) = blocking_deadline(huge);
            assert_eq!(wait, MAX_WAIT);
            assert_eq!(deadline, Duration::from_millis(600_000 + 37_500 + 10_000));
        }
    }

    #[test]
    fn encoding() {
        assert_eq!(encode("web-1_a.b~"), "web-1_a.b~");
        assert_eq!(encode("a b/c?d"), "a%20b%2Fc%3Fd");
        assert_eq!(go_duration(Duration::from_secs(300)), "300s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
    }
}

/// The client against real transports: a Unix socket, and TLS with a private CA and
/// client certificates, as `CONSUL_*` variables configure them.
#[cfg(test)]
mod transport_tests {
    use super::*;
    use crate::consul::env;
    use hyper_util::rt::TokioIo;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use std::{collections::HashMap, convert::Infallible, path::Path};
    use tokio::net::{TcpListener, UnixListener};

    /// Answers every request with `X-Consul-Index: 7` and the token it got as the body.
    fn serve<I>(io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| {
                let token = req
                    .headers()
                    .get("x-consul-token")
                    .map(|v| v.as_bytes().to_vec())
                    .unwrap_or_default();
                async move {
                    Ok::<_, Infallible>(
                        http::Response::builder()
                            .header("x-consul-index", "7")
                            .body(Full::new(Bytes::from(token)))
                            .unwrap(),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), svc)
                .await;
        });
    }

    fn client(vars: &[(&str, &str)]) -> Client {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Client::new(env::from_env(&move |n| map.get(n).cloned()).expect("valid settings"))
    }

    async fn leader(c: &Client) -> Result<Response, Error> {
        c.request(
            Method::GET,
            "/v1/status/leader",
            None,
            Duration::from_secs(5),
        )
        .await
    }

    #[tokio::test]
    async fn unix_socket_agent() {
        let dir = std::env::temp_dir().join(format!("baton-consul-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("http.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                serve(s);
            }
        });
        let addr = format!("unix://{}", path.display());
        let c = client(&[
            (env::CONSUL_HTTP_ADDR, &addr),
            (env::CONSUL_HTTP_TOKEN, "t0ken"),
        ]);
        let rsp = leader(&c).await.unwrap();
        assert_eq!(rsp.index(), Some(7));
        assert_eq!(&rsp.body[..], b"t0ken");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_rotated_token_file_is_read_again() {
        let dir = std::env::temp_dir().join(format!("baton-rotate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (sock, token) = (dir.join("http.sock"), dir.join("token"));
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                serve(s);
            }
        });
        std::fs::write(&token, "first\n").unwrap();
        let addr = format!("unix://{}", sock.display());
        let c = client(&[
            (env::CONSUL_HTTP_ADDR, &addr),
            (env::CONSUL_HTTP_TOKEN_FILE, token.to_str().unwrap()),
        ]);
        assert_eq!(&leader(&c).await.unwrap().body[..], b"first");
        // A rotation replaces the file (as a Kubernetes Secret update does).
        std::thread::sleep(Duration::from_millis(20));
        let next = dir.join("token.new");
        std::fs::write(&next, "second\n").unwrap();
        std::fs::rename(&next, &token).unwrap();
        assert_eq!(&leader(&c).await.unwrap().body[..], b"second");
        // An emptied or vanished file keeps the last token.
        std::fs::write(&token, "").unwrap();
        assert_eq!(&leader(&c).await.unwrap().body[..], b"second");
        std::fs::remove_file(&token).unwrap();
        assert_eq!(&leader(&c).await.unwrap().body[..], b"second");
        let _ = std::fs::remove_dir_all(&dir);
    }

    struct Pki {
        dir: std::path::PathBuf,
        server: rustls::ServerConfig,
    }

    impl Pki {
        /// A CA, a server certificate for `consul.test` and a client certificate, all
        /// written as PEM files; the server requires client certificates of the CA.
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("baton-pki-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
            let leaf = |name: &str| {
                let key = KeyPair::generate().unwrap();
                let cert = CertificateParams::new(vec![name.to_string()])
                    .unwrap()
                    .signed_by(&key, &ca)
                    .unwrap();
                (cert, key)
            };
            let (server_cert, server_key) = leaf("consul.test");
            let (client_cert, client_key) = leaf("baton");
            let write = |name: &str, pem: String| std::fs::write(dir.join(name), pem).unwrap();
            write("ca.pem", ca.pem());
            write("client.pem", client_cert.pem());
            write("client-key.pem", client_key.serialize_pem());
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.der().clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider.clone(),
            )
            .build()
            .unwrap();
            let server = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(
                    vec![server_cert.der().clone()],
                    rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).unwrap(),
                )
                .unwrap();
            Self { dir, server }
        }

        fn path(&self, name: &str) -> String {
            Path::new(&self.dir).join(name).display().to_string()
        }
    }

    #[tokio::test]
    async fn tls_agent_with_a_private_ca_and_client_certificates() {
        let pki = Pki::new();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(pki.server.clone()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("https://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(s).await {
                        serve(tls);
                    }
                });
            }
        });
        let (ca, cert, key) = (
            pki.path("ca.pem"),
            pki.path("client.pem"),
            pki.path("client-key.pem"),
        );
        let full = [
            (env::CONSUL_HTTP_ADDR, addr.as_str()),
            (env::CONSUL_CACERT, ca.as_str()),
            (env::CONSUL_CLIENT_CERT, cert.as_str()),
            (env::CONSUL_CLIENT_KEY, key.as_str()),
            (env::CONSUL_TLS_SERVER_NAME, "consul.test"),
        ];
        let rsp = leader(&client(&full)).await.unwrap();
        assert_eq!(rsp.index(), Some(7));

        // The certificate is for consul.test, not the IP in the address.
        let err = leader(&client(&full[..4])).await.unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");
        // Without a client certificate the agent refuses the handshake.
        let err = leader(&client(&[full[0], full[1], full[4]]))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Transport { .. }), "{err}");
        // Not verifying accepts the name mismatch (still with the client certificate).
        let rsp = leader(&client(&[
            full[0],
            full[2],
            full[3],
            (env::CONSUL_HTTP_SSL_VERIFY, "false"),
        ]))
        .await
        .unwrap();
        assert_eq!(rsp.index(), Some(7));
        let _ = std::fs::remove_dir_all(&pki.dir);
    }
}
