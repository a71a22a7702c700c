//! Opaque TCP: connect to the balanced endpoint, then move bytes both ways with
//! `splice(2)`.
//!
//! The balancer for an opaque service balances *connections*: its request is an
//! [`OpaqueRequest`] and its response the connected upstream stream. [`forward`] then
//! replays what detection read, and splices each direction through a pipe, so payload
//! bytes never enter user space. When one side finishes sending, the other side's
//! write half is shut down (half-close is preserved); an error on either side ends both.

use super::connect::{connect, ConnectConfig};
use crate::{
    balance::HashKey, errors::ConnectError, metrics::Counter, new_service::NewService, sys::Pipe,
    target::Endpoint,
};
use std::{
    future::Future,
    io,
    net::{Shutdown, SocketAddr},
    os::fd::AsRawFd,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};
use tokio::{
    io::{AsyncWriteExt, Interest},
    net::TcpStream,
};
use tower_service::Service;
use xxhash_rust::xxh3::xxh3_64;

/// A request to an opaque balancer: "give me a connection for this client".
#[derive(Clone, Copy, Debug)]
pub struct OpaqueRequest {
    /// The client, whose IP is the hash key.
    pub client: SocketAddr,
}

/// Hashes opaque connections by client IP (so a client sticks to an endpoint).
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientIpKey;

impl HashKey<OpaqueRequest> for ClientIpKey {
    fn hash_key(&self, req: &OpaqueRequest) -> Option<u64> {
        Some(match req.client.ip() {
            std::net::IpAddr::V4(ip) => xxh3_64(&ip.octets()),
            std::net::IpAddr::V6(ip) => xxh3_64(&ip.octets()),
        })
    }
}

/// Builds a [`TcpConnect`] per endpoint.
#[derive(Clone, Debug)]
pub struct NewTcpConnect {
    cfg: Arc<ConnectConfig>,
}

impl NewTcpConnect {
    /// Connects with `cfg`.
    pub fn new(cfg: Arc<ConnectConfig>) -> Self {
        Self { cfg }
    }
}

impl NewService<Endpoint> for NewTcpConnect {
    type Service = TcpConnect;
    fn new_service(&self, endpoint: Endpoint) -> TcpConnect {
        TcpConnect {
            addr: endpoint.addr,
            cfg: self.cfg.clone(),
        }
    }
}

/// Connects to one endpoint. Always ready.
#[derive(Clone, Debug)]
pub struct TcpConnect {
    addr: SocketAddr,
    cfg: Arc<ConnectConfig>,
}

impl Service<OpaqueRequest> for TcpConnect {
    type Response = TcpStream;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<TcpStream, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: OpaqueRequest) -> Self::Future {
        let (addr, cfg) = (self.addr, self.cfg.clone());
        // Once per connection: boxing is fine here.
        Box::pin(async move { connect(addr, &cfg).await })
    }
}

/// Byte counters for [`forward`].
#[derive(Clone, Debug, Default)]
pub struct ForwardMetrics {
    /// Client -> upstream.
    pub to_upstream: Counter,
    /// Upstream -> client.
    pub to_client: Counter,
}

/// Forwards `client` <-> `upstream` until both directions are done, after writing
/// `prefix` (bytes already read from the client) upstream. Returns bytes moved in each
/// direction (client -> upstream including the prefix, upstream -> client).
pub async fn forward(
    client: &mut TcpStream,
    prefix: &[u8],
    upstream: &mut TcpStream,
    metrics: &ForwardMetrics,
) -> io::Result<(u64, u64)> {
    upstream.write_all(prefix).await?;
    metrics.to_upstream.add(prefix.len() as u64);
    let (pipe_in, pipe_out) = (Pipe::new()?, Pipe::new()?);
    let (client, upstream) = (&*client, &*upstream);
    let (up, down) = tokio::try_join!(
        splice_one_way(client, upstream, &pipe_in, &metrics.to_upstream),
        splice_one_way(upstream, client, &pipe_out, &metrics.to_client),
    )?;
    Ok((up + prefix.len() as u64, down))
}

/// Moves bytes `from` -> `to` through `pipe` until EOF, then shuts down `to`'s write
/// half. The pipe is always drained before it is filled again.
async fn splice_one_way(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    counter: &Counter,
) -> io::Result<u64> {
    let mut total = 0;
    loop {
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                pipe.fill_from(from.as_raw_fd(), pipe.capacity())
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // EOF from `from`: pass the half-close on. The peer may be gone already.
            match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) => return Err(e),
            }
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || pipe.drain_to(to.as_raw_fd(), left)) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
        counter.add(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn forwards_both_ways_with_prefix_and_half_close() {
        // client_app <-> [client_side | baton | upstream_side] <-> upstream_app
        let (mut client_app, mut client_side) = pair().await;
        let (mut upstream_side, mut upstream_app) = pair().await;
        let metrics = ForwardMetrics::default();
        let m = metrics.clone();
        let task = tokio::spawn(async move {
            forward(&mut client_side, b"HEAD", &mut upstream_side, &m).await
        });
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let big2 = big.clone();
        let writer = tokio::spawn(async move {
            client_app.write_all(&big2).await.unwrap();
            client_app.shutdown().await.unwrap();
            let mut back = Vec::new();
            client_app.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        upstream_app.read_to_end(&mut got).await.unwrap();
        assert_eq!(&got[..4], b"HEAD");
        assert!(got[4..] == big[..], "payload intact");
        upstream_app
            .write_all(b"reply after half-close")
            .await
            .unwrap();
        drop(upstream_app);
        assert_eq!(writer.await.unwrap(), b"reply after half-close");
        let (up, down) = task.await.unwrap().unwrap();
        assert_eq!(up, big.len() as u64 + 4);
        assert_eq!(down, 22);
        assert_eq!(metrics.to_client.get(), 22);
    }

    #[test]
    fn client_ip_key_ignores_the_port() {
        let k = |a: &str| {
            ClientIpKey.hash_key(&OpaqueRequest {
                client: a.parse().unwrap(),
            })
        };
        assert_eq!(k("10.0.0.1:1000"), k("10.0.0.1:2000"));
        assert_ne!(k("10.0.0.1:1000"), k("10.0.0.2:1000"));
    }
}
