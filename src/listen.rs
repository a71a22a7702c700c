//! Listeners: binding in each inbound mode, learning original destinations, accepting.

use crate::{config::InboundMode, serve::Server};
use baton_layers::target::Accept;
use socket2::{Domain, SockRef, Socket, Type};
use std::{io, net::SocketAddr, sync::Arc, time::Duration};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// Listen backlog (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// Binds a listener on `addr` for `mode`. In `tproxy` mode the socket is
/// `IP_TRANSPARENT` (needs CAP_NET_ADMIN), so it accepts connections addressed to any
/// IP that the TPROXY rules send to it. With a `keepalive` idle time the accepted
/// connections have TCP keepalive (`BATON_TCP_KEEPALIVE`): set on the listener, Linux
/// gives it to every connection it accepts, at no cost per connection.
pub fn bind(
    addr: SocketAddr,
    mode: InboundMode,
    keepalive: Option<Duration>,
) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if let Some(idle) = keepalive {
        socket.set_tcp_keepalive(&baton_layers::proxy::connect::keepalive(idle))?;
    }
    if mode == InboundMode::Tproxy {
        if addr.is_ipv4() {
            socket.set_ip_transparent_v4(true)?;
        } else {
            socket.set_ip_transparent_v6(true)?;
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Binds a plain listener (the admin server).
pub fn bind_plain(addr: SocketAddr) -> io::Result<TcpListener> {
    bind(addr, InboundMode::Plain, None)
}

/// The destination the client meant to reach.
pub fn original_dst(stream: &TcpStream, mode: InboundMode) -> io::Result<SocketAddr> {
    match mode {
        // TPROXY keeps the original destination as the socket's local address.
        InboundMode::Plain | InboundMode::Tproxy => stream.local_addr(),
        // REDIRECT rewrote it; conntrack remembers it.
        InboundMode::Redirect => {
            let sock = SockRef::from(stream);
            let local = stream.local_addr()?;
            let dst = if local.is_ipv4() {
                sock.original_dst_v4()?
            } else {
                sock.original_dst_v6()?
            };
            dst.as_socket()
                .ok_or_else(|| io::Error::other("SO_ORIGINAL_DST returned a non-IP address"))
        }
    }
}

/// Accepts connections until `drain` fires, serving each on its own task. Then takes
/// the connections the kernel had already completed (they wait in the backlog, and
/// closing the listener would reset them) and serves them too: each gets its request
/// answered and is closed, like every connection during the drain.
pub async fn accept_loop(
    listener: TcpListener,
    mode: InboundMode,
    server: Arc<Server>,
    drain: watch::Receiver<bool>,
) {
    // Each connection gets a receiver of the signal; this loop watches its own.
    let mut stop = drain.clone();
    let serve = |(stream, client): (TcpStream, SocketAddr), drain: watch::Receiver<bool>| {
        // Responses are written whole by the HTTP server or spliced: Nagle would only
        // hold back the tail of a response for a delayed ACK.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%client, %error, "cannot set TCP_NODELAY");
        }
        let orig_dst = match original_dst(&stream, mode) {
            Ok(dst) => dst,
            Err(error) => {
                tracing::warn!(%client, %error, "no original destination; closing");
                return;
            }
        };
        let accept = Accept { client, orig_dst };
        tokio::spawn(server.clone().serve(stream, accept, drain));
    };
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => break,
        };
        match accepted {
            Ok(conn) => serve(conn, drain.clone()),
            Err(error) => {
                // EMFILE/ENFILE/ENOBUFS: the process is out of something; accepting
                // again at once would spin. Back off briefly.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // The connections still in the listen backlog: like every connection accepted
    // before the signal, each gets its first request answered and is then closed, as
    // draining connections are (see serve.rs), instead of being reset with the
    // listener.
    // Straight from the socket: the runtime may not know yet that the listener is
    // readable (and would not even try), the kernel does.
    let mut backlog = 0usize;
    while let Some(conn) = accept_now(&listener) {
        serve(conn, stop.clone());
        backlog += 1;
    }
    tracing::info!(backlog, "stopped accepting");
}

/// A connection already waiting on `listener`, without waiting for one.
fn accept_now(listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
    let (socket, client) = SockRef::from(listener).accept().ok()?;
    let client = client.as_socket()?;
    let stream: std::net::TcpStream = socket.into();
    stream.set_nonblocking(true).ok()?;
    Some((TcpStream::from_std(stream).ok()?, client))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_inherit_the_listeners_keepalive() {
        let idle = Duration::from_secs(37);
        for keepalive in [Some(idle), None] {
            let listener = bind(([127, 0, 0, 1], 0).into(), InboundMode::Plain, keepalive).unwrap();
            let addr = listener.local_addr().unwrap();
            let _client = TcpStream::connect(addr).await.unwrap();
            let (accepted, _) = listener.accept().await.unwrap();
            let sock = SockRef::from(&accepted);
            assert_eq!(sock.keepalive().unwrap(), keepalive.is_some());
            if keepalive.is_some() {
                assert_eq!(sock.tcp_keepalive_time().unwrap(), idle);
                assert_eq!(
                    sock.tcp_keepalive_interval().unwrap(),
                    Duration::from_secs(10)
                );
                assert_eq!(sock.tcp_keepalive_retries().unwrap(), 6);
            }
        }
    }
}
