//! Connections to the agent: TCP (hyper-util's connector: DNS, timeouts), TLS over it
//! (rustls), or a Unix socket.

use super::env::{Address, ClientSettings};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::{
    client::legacy::connect::{Connected, Connection, HttpConnector},
    rt::TokioIo,
};
use rustls::pki_types::ServerName;
use std::{
    future::Future,
    io,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpStream, UnixStream},
};
use tokio_rustls::{client::TlsStream, TlsConnector};
use tower::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// TCP keepalive on agent connections. A blocking query idles for minutes, so a dead
/// or blackholed agent (no ACKs) would otherwise go unnoticed until its deadline, or
/// for the kernel's defaults (probes every 75 s, 9 of them): with these the connection
/// fails after 30 s + 3 × 10 s without an answer to the probes, the query with it, and
/// the watch marks the service stale and retries. (An agent whose kernel still answers
/// but whose process hangs is caught by the query's deadline instead.)
pub(crate) const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Between two unanswered keepalive probes.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the connection is given up.
pub(crate) const KEEPALIVE_RETRIES: u32 = 3;

/// Makes connections to the agent, whatever the URI says (the client only ever talks
/// to one agent).
#[derive(Clone)]
pub(crate) enum Connector {
    Tcp(HttpConnector),
    Tls {
        tcp: HttpConnector,
        tls: TlsConnector,
        name: ServerName<'static>,
    },
    Unix(Arc<Path>),
}

impl Connector {
    pub(crate) fn new(settings: &ClientSettings, connect_timeout: Duration) -> Self {
        let tcp = || {
            let mut c = HttpConnector::new();
            c.enforce_http(false);
            c.set_nodelay(true);
            c.set_connect_timeout(Some(connect_timeout));
            c.set_keepalive(Some(KEEPALIVE_IDLE));
            c.set_keepalive_interval(Some(KEEPALIVE_INTERVAL));
            c.set_keepalive_retries(Some(KEEPALIVE_RETRIES));
            c
        };
        match (&settings.addr, &settings.tls) {
            (Address::Unix(path), _) => Self::Unix(path.as_path().into()),
            (Address::Tcp { .. }, None) => Self::Tcp(tcp()),
            (Address::Tcp { .. }, Some(tls)) => Self::Tls {
                tcp: tcp(),
                tls: TlsConnector::from(tls.config.clone()),
                name: tls.server_name.clone(),
            },
        }
    }
}

impl Service<http::Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Self::Tcp(c) | Self::Tls { tcp: c, .. } => c.poll_ready(cx).map_err(Into::into),
            Self::Unix(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        match self {
            Self::Tcp(c) => {
                let connecting = c.call(uri);
                Box::pin(async move {
                    let tcp = connecting.await?.into_inner();
                    Ok(Conn(TokioIo::new(Stream::Tcp(tcp))))
                })
            }
            Self::Tls { tcp, tls, name } => {
                let connecting = tcp.call(uri);
                let (tls, name) = (tls.clone(), name.clone());
                Box::pin(async move {
                    let tcp = connecting.await?.into_inner();
                    let stream = tls.connect(name, tcp).await?;
                    Ok(Conn(TokioIo::new(Stream::Tls(Box::new(stream)))))
                })
            }
            Self::Unix(path) => {
                let path = path.clone();
                Box::pin(async move {
                    let stream = UnixStream::connect(&*path).await.map_err(|e| {
                        io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                    })?;
                    Ok(Conn(TokioIo::new(Stream::Unix(stream))))
                })
            }
        }
    }
}

enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Unix(UnixStream),
}

macro_rules! each {
    ($self:ident, $method:ident($($arg:ident),*)) => {
        match $self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).$method($($arg),*),
            Stream::Tls(s) => Pin::new(s.as_mut()).$method($($arg),*),
            Stream::Unix(s) => Pin::new(s).$method($($arg),*),
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, poll_shutdown(cx))
    }
}

/// A connection to the agent, as hyper uses it.
pub(crate) struct Conn(TokioIo<Stream>);

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::env;
    use std::collections::HashMap;

    #[tokio::test]
    async fn agent_connections_probe_a_silent_peer_within_a_minute() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let vars: HashMap<String, String> = [(env::CONSUL_HTTP_ADDR.to_string(), addr.clone())]
            .into_iter()
            .collect();
        let settings = env::from_env(&move |n| vars.get(n).cloned()).unwrap();
        let mut connector = Connector::new(&settings, Duration::from_secs(1));
        let uri: http::Uri = format!("http://{addr}/").parse().unwrap();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .unwrap();
        let conn = connector.call(uri).await.unwrap();
        let Stream::Tcp(tcp) = conn.0.inner() else {
            panic!("a TCP agent address gives a TCP connection");
        };
        let sock = socket2::SockRef::from(tcp);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_RETRIES);
        assert!(KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_RETRIES <= Duration::from_secs(60));
    }
}
