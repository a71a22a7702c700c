//! Opening connections to endpoints.

use crate::errors::ConnectError;
use std::{net::SocketAddr, time::Duration};
use tokio::net::{TcpSocket, TcpStream};

/// Socket settings for upstream connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectConfig {
    /// Give up connecting after this long (`BATON_CONNECT_TIMEOUT`).
    pub timeout: Duration,
    /// TCP keepalive idle time, if any (`BATON_TCP_KEEPALIVE`; see [`keepalive`]).
    pub keepalive: Option<Duration>,
    /// `SO_MARK` for upstream sockets, so capture rules can exclude baton's own
    /// traffic (needs CAP_NET_ADMIN).
    pub mark: Option<u32>,
}

impl Default for ConnectConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(1),
            keepalive: Some(Duration::from_secs(60)),
            mark: None,
        }
    }
}

/// TCP keepalive that probes after `idle` without traffic, then every `idle` up to
/// 10 s, and gives the peer up after 6 unanswered probes: a peer that vanished without
/// a FIN or RST (a crashed node, a dropped NAT entry) is noticed within about
/// `idle + 1 min`, instead of holding its connection (and, for a tunnel, the one on the
/// other side) until the process ends.
pub fn keepalive(idle: Duration) -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(idle.min(Duration::from_secs(10)))
        .with_retries(6)
}

/// Connects to `addr`: non-blocking, `TCP_NODELAY`, bounded by the timeout.
pub async fn connect(addr: SocketAddr, cfg: &ConnectConfig) -> Result<TcpStream, ConnectError> {
    let io = |e| ConnectError::from_io(addr, e);
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(io)?;
    socket.set_nodelay(true).map_err(io)?;
    let sock = socket2::SockRef::from(&socket);
    if let Some(idle) = cfg.keepalive {
        sock.set_tcp_keepalive(&keepalive(idle)).map_err(io)?;
    }
    if let Some(mark) = cfg.mark {
        sock.set_mark(mark).map_err(io)?;
    }
    match tokio::time::timeout(cfg.timeout, socket.connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(ConnectError::from_io(addr, e)),
        Err(_) => Err(ConnectError::Timeout(addr, cfg.timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn classifies_refused_and_connects() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = connect(addr, &ConnectConfig::default()).await.unwrap();
        assert!(stream.nodelay().unwrap());
        drop(listener);
        let err = connect(addr, &ConnectConfig::default()).await.unwrap_err();
        assert!(
            matches!(err, ConnectError::Refused(a) if a == addr),
            "{err}"
        );
    }
}
