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
            // A blocking query idles for minutes: notice a dead peer before `wait` ends.
            c.set_keepalive(Some(Duration::from_secs(30)));
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
