//! Learning when a moved connection's socket is really gone: the kernel's sock_diag
//! destroy notifications (`SKNLGRP_INET_TCP_DESTROY`), which fire when a TCP socket is
//! freed — after the FIN exchange, not when the application closes it.

use super::{wire::Flow, Handoff};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, AsyncSocket, AsyncSocketExt, TokioSocket};
use std::{io, net::SocketAddrV4, sync::Arc};

const SKNLGRP_INET_TCP_DESTROY: u32 = 1;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_HDRLEN: usize = 16;

/// Subscribes to TCP socket destruction (needs CAP_NET_ADMIN).
pub fn subscribe() -> io::Result<TokioSocket> {
    let mut s = TokioSocket::new(NETLINK_SOCK_DIAG)?;
    s.socket_mut().bind_auto()?;
    s.socket_mut().add_membership(SKNLGRP_INET_TCP_DESTROY)?;
    // Every TCP socket of the namespace is reported: room for bursts.
    let _ = s.socket_mut().set_rx_buf_sz(4 << 20);
    Ok(s)
}

/// Hands destroyed moved connections to [`Handoff::destroyed`] (on their own tasks,
/// so the notices keep being read) until the socket fails. Notices lost to an
/// overrun only delay cleanup to the entries' timeouts.
pub async fn watch(handoff: Arc<Handoff>, socket: TokioSocket) -> io::Result<()> {
    handoff.set_diag(true);
    let result = loop {
        let buf = match socket.recv_from_full().await {
            Ok((buf, _)) => buf,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                tracing::debug!(
                    "socket destruction notices overran; some flows expire by their timeout"
                );
                continue;
            }
            Err(e) => break Err(e),
        };
        for flow in parse(&buf) {
            if handoff.is_live(&flow) {
                let h = handoff.clone();
                tokio::spawn(async move { h.destroyed(flow).await });
            }
        }
    };
    handoff.set_diag(false);
    result
}

/// The flows (client, local) of the `inet_diag_msg`s in a netlink datagram.
fn parse(buf: &[u8]) -> Vec<Flow> {
    let mut flows = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            break;
        }
        let msg = &buf[at + NLMSG_HDRLEN..at + len];
        // inet_diag_msg: family, state, timer, retrans, then inet_diag_sockid:
        // sport(be16) dport(be16) src[16] dst[16] ...
        if kind == SOCK_DIAG_BY_FAMILY && msg.len() >= 40 && i32::from(msg[0]) == libc::AF_INET {
            let port = |i: usize| u16::from_be_bytes([msg[i], msg[i + 1]]);
            let ip = |i: usize| std::net::Ipv4Addr::new(msg[i], msg[i + 1], msg[i + 2], msg[i + 3]);
            flows.push(Flow {
                local: SocketAddrV4::new(ip(8), port(4)),
                client: SocketAddrV4::new(ip(24), port(6)),
            });
        }
        at += (len + 3) & !3;
    }
    flows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_socket_id_of_a_destroy_notice() {
        let mut msg = vec![0u8; 16 + 72];
        msg[..4].copy_from_slice(&(88u32).to_ne_bytes());
        msg[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        let d = &mut msg[16..];
        d[0] = libc::AF_INET as u8;
        d[4..6].copy_from_slice(&8080u16.to_be_bytes());
        d[6..8].copy_from_slice(&40000u16.to_be_bytes());
        d[8..12].copy_from_slice(&[10, 0, 0, 2]);
        d[24..28].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(
            parse(&msg),
            [Flow {
                local: "10.0.0.2:8080".parse().unwrap(),
                client: "10.0.0.1:40000".parse().unwrap(),
            }]
        );
        assert!(parse(&msg[..50]).is_empty(), "truncated input is ignored");
    }

    /// A real notice: a loopback connection closes and the kernel reports it. Needs
    /// CAP_NET_ADMIN; skipped without it.
    #[tokio::test]
    async fn the_kernel_reports_a_closed_connection() {
        let Ok(socket) = subscribe() else {
            eprintln!("skipping: sock_diag destroy notifications need CAP_NET_ADMIN");
            return;
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let want = Flow {
            local: match server.local_addr().unwrap() {
                std::net::SocketAddr::V4(a) => a,
                _ => unreachable!(),
            },
            client: match server.peer_addr().unwrap() {
                std::net::SocketAddr::V4(a) => a,
                _ => unreachable!(),
            },
        };
        drop(client);
        drop(server);
        let seen = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                let (buf, _) = socket.recv_from_full().await.unwrap();
                if parse(&buf).contains(&want) {
                    return;
                }
            }
        })
        .await;
        assert!(seen.is_ok(), "no destroy notice for {want:?}");
    }
}
