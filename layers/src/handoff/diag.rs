//! Learning when a moved connection's socket is really gone: the kernel's sock_diag
//! destroy notifications (`SKNLGRP_INET_TCP_DESTROY`), which fire when a TCP socket is
//! freed — after the FIN exchange, not when the application closes it — and, because
//! notices can be lost, a check of the sockets themselves ([`gone`]): a dump of the
//! namespace's TCP sockets, with an exact lookup of each flow the dump did not show.

use super::{wire::Flow, Handoff};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, AsyncSocket, AsyncSocketExt, Socket, TokioSocket};
use std::{collections::HashSet, io, net::SocketAddrV4, sync::Arc};

const SKNLGRP_INET_TCP_DESTROY: u32 = 1;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
/// `sizeof(struct inet_diag_req_v2)`.
const REQ_LEN: usize = 56;
const INET_DIAG_NOCOOKIE: u32 = !0;

const TCP_TIME_WAIT: u8 = 6;
const TCP_LISTEN: u8 = 10;
const TCP_NEW_SYN_RECV: u8 = 12;
/// States of a full socket, the kind whose freeing a destroy notice reports: every
/// state but TIME_WAIT (a timewait socket outlives its full socket), LISTEN and
/// NEW_SYN_RECV (request sockets).
const FULL_STATES: u32 =
    !((1 << TCP_TIME_WAIT) | (1 << TCP_LISTEN) | (1 << TCP_NEW_SYN_RECV)) & 0xfff;

fn is_full(state: u8) -> bool {
    state < 12 && FULL_STATES & (1 << state) != 0
}

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
/// so the notices keep being read) until the socket fails. When notices overran the
/// socket's buffer (`ENOBUFS`: some are lost, which ones is unknown), a resync checks
/// every live moved connection's socket ([`Handoff::sweep`]) instead of waiting for
/// notices that will never come; overruns during a resync queue one more.
pub async fn watch(handoff: Arc<Handoff>, socket: TokioSocket) -> io::Result<()> {
    handoff.set_diag(true);
    let resync = Arc::new(tokio::sync::Notify::new());
    let resyncer = tokio::spawn({
        let handoff = handoff.clone();
        let resync = resync.clone();
        async move {
            loop {
                resync.notified().await;
                match handoff.sweep().await {
                    Ok(gone) => {
                        tracing::info!(
                            gone,
                            "resynced moved connections after lost socket destruction notices"
                        )
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot check moved connections' sockets; the next refresh tries again")
                    }
                }
            }
        }
    });
    let result = loop {
        let buf = match socket.recv_from_full().await {
            Ok((buf, _)) => buf,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                tracing::debug!("socket destruction notices overran; resyncing");
                resync.notify_one();
                continue;
            }
            Err(e) => break Err(e),
        };
        for (flow, _) in parse(&buf) {
            if handoff.is_live(&flow) {
                let h = handoff.clone();
                tokio::spawn(async move { h.destroyed(flow).await });
            }
        }
    };
    resyncer.abort();
    handoff.set_diag(false);
    result
}

/// Which of `flows` (IPv4 TCP, keyed as the socket sees them: local is the flow's
/// `local`, remote its `client`) have no full socket in this namespace any more. A
/// dump lists the sockets; a flow the dump did not show is looked up exactly before
/// it counts as gone, since a dump racing with other sockets' changes can skip one.
/// Blocking (a few netlink round trips); no privileges needed.
pub fn gone(flows: &[Flow]) -> io::Result<Vec<Flow>> {
    if flows.is_empty() {
        return Ok(Vec::new());
    }
    let mut s = Socket::new(NETLINK_SOCK_DIAG)?;
    s.bind_auto()?;
    let present = dump(&s)?;
    let mut gone = Vec::new();
    for (seq, flow) in (2..).zip(flows.iter().filter(|f| !present.contains(f))) {
        if !exists(&s, seq, *flow)? {
            gone.push(*flow);
        }
    }
    Ok(gone)
}

/// The flows of every full IPv4 TCP socket.
fn dump(s: &Socket) -> io::Result<HashSet<Flow>> {
    s.send(&request(1, NLM_F_REQUEST | NLM_F_DUMP, None), 0)?;
    let mut flows = HashSet::new();
    loop {
        let (buf, _) = s.recv_from_full()?;
        for m in messages(&buf) {
            match m.kind {
                NLMSG_DONE => return Ok(flows),
                NLMSG_ERROR => return Err(error(m.payload)),
                _ => flows.extend(
                    diag_msg(m.kind, m.payload)
                        .filter(|(_, state)| is_full(*state))
                        .map(|(f, _)| f),
                ),
            }
        }
    }
}

/// Whether `flow` has a full socket: an exact lookup (which falls back to a listener
/// on the local port, so the answer must be the flow's own socket).
fn exists(s: &Socket, seq: u32, flow: Flow) -> io::Result<bool> {
    s.send(&request(seq, NLM_F_REQUEST, Some(flow)), 0)?;
    loop {
        let (buf, _) = s.recv_from_full()?;
        for m in messages(&buf).filter(|m| m.seq == seq) {
            if m.kind == NLMSG_ERROR {
                let e = error(m.payload);
                return match e.raw_os_error() {
                    Some(libc::ENOENT) => Ok(false),
                    _ => Err(e),
                };
            }
            if let Some((found, state)) = diag_msg(m.kind, m.payload) {
                return Ok(found == flow && is_full(state));
            }
        }
    }
}

/// A `SOCK_DIAG_BY_FAMILY` request for IPv4 TCP sockets in the full states: a dump,
/// or the socket of `flow`.
fn request(seq: u32, flags: u16, flow: Option<Flow>) -> Vec<u8> {
    let mut b = Vec::with_capacity(NLMSG_HDRLEN + REQ_LEN);
    b.extend_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    // inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid.
    b.extend_from_slice(&[libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    b.extend_from_slice(&FULL_STATES.to_ne_bytes());
    let (local, remote) = flow.map_or(
        (
            SocketAddrV4::new(0.into(), 0),
            SocketAddrV4::new(0.into(), 0),
        ),
        |f| (f.local, f.client),
    );
    b.extend_from_slice(&local.port().to_be_bytes());
    b.extend_from_slice(&remote.port().to_be_bytes());
    for a in [local, remote] {
        b.extend_from_slice(&a.ip().octets());
        b.extend_from_slice(&[0; 12]);
    }
    b.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    b.extend_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
    b.extend_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
    b
}

/// The error of an `NLMSG_ERROR` payload.
fn error(payload: &[u8]) -> io::Error {
    match payload.get(..4) {
        Some(&[a, b, c, d]) => io::Error::from_raw_os_error(-i32::from_ne_bytes([a, b, c, d])),
        _ => io::Error::other("truncated netlink error"),
    }
}

/// One netlink message of a datagram.
struct Nlmsg<'a> {
    kind: u16,
    seq: u32,
    payload: &'a [u8],
}

/// The well-formed messages of a netlink datagram, up to the first malformed one.
fn messages(buf: &[u8]) -> impl Iterator<Item = Nlmsg<'_>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let h = buf.get(at..at + NLMSG_HDRLEN)?;
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let kind = u16::from_ne_bytes([h[4], h[5]]);
        let seq = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
        if len < NLMSG_HDRLEN {
            return None;
        }
        let payload = buf.get(at + NLMSG_HDRLEN..at.checked_add(len)?)?;
        at += (len + 3) & !3;
        Some(Nlmsg { kind, seq, payload })
    })
}

/// The flow (local, remote) and state of an IPv4 `inet_diag_msg`.
fn diag_msg(kind: u16, msg: &[u8]) -> Option<(Flow, u8)> {
    // inet_diag_msg: family, state, timer, retrans, then inet_diag_sockid:
    // sport(be16) dport(be16) src[16] dst[16] ...
    if kind != SOCK_DIAG_BY_FAMILY || msg.len() < 40 || i32::from(msg[0]) != libc::AF_INET {
        return None;
    }
    let port = |i: usize| u16::from_be_bytes([msg[i], msg[i + 1]]);
    let ip = |i: usize| std::net::Ipv4Addr::new(msg[i], msg[i + 1], msg[i + 2], msg[i + 3]);
    let flow = Flow {
        local: SocketAddrV4::new(ip(8), port(4)),
        client: SocketAddrV4::new(ip(24), port(6)),
    };
    // A timewait socket (the timewait timer, 3) reports its substate, FIN_WAIT2 for
    // an orphan closed before its peer: either way no full socket is left, and none
    // will be destroyed (and announced) later.
    const TIMER_TIMEWAIT: u8 = 3;
    let state = if msg[2] == TIMER_TIMEWAIT {
        TCP_TIME_WAIT
    } else {
        msg[1]
    };
    Some((flow, state))
}

/// The flows (client, local) and states of the `inet_diag_msg`s in a netlink
/// datagram.
fn parse(buf: &[u8]) -> Vec<(Flow, u8)> {
    messages(buf)
        .filter_map(|m| diag_msg(m.kind, m.payload))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn v4(a: std::net::SocketAddr) -> SocketAddrV4 {
        match a {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!("an IPv4 test socket"),
        }
    }

    /// The flow of `s` as its own socket sees it.
    fn flow_of(s: &tokio::net::TcpStream) -> Flow {
        Flow {
            local: v4(s.local_addr().unwrap()),
            client: v4(s.peer_addr().unwrap()),
        }
    }

    /// A connected loopback pair: (client, server).
    async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[test]
    fn parses_the_socket_id_of_a_destroy_notice() {
        let mut msg = vec![0u8; 16 + 72];
        msg[..4].copy_from_slice(&(88u32).to_ne_bytes());
        msg[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        let d = &mut msg[16..];
        d[0] = libc::AF_INET as u8;
        d[1] = 7;
        d[4..6].copy_from_slice(&8080u16.to_be_bytes());
        d[6..8].copy_from_slice(&40000u16.to_be_bytes());
        d[8..12].copy_from_slice(&[10, 0, 0, 2]);
        d[24..28].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(
            parse(&msg),
            [(
                Flow {
                    local: "10.0.0.2:8080".parse().unwrap(),
                    client: "10.0.0.1:40000".parse().unwrap(),
                },
                7
            )]
        );
        assert!(parse(&msg[..50]).is_empty(), "truncated input is ignored");
        let mut short = msg.clone();
        short[..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(
            parse(&short).is_empty(),
            "a length under the header's is ignored"
        );
    }

    #[test]
    fn a_lookup_request_names_the_socket_as_it_sees_itself() {
        let flow = Flow {
            local: "10.0.0.2:8080".parse().unwrap(),
            client: "10.0.0.1:40000".parse().unwrap(),
        };
        let r = request(5, NLM_F_REQUEST, Some(flow));
        assert_eq!(r.len(), NLMSG_HDRLEN + REQ_LEN);
        assert_eq!(
            u32::from_ne_bytes(r[..4].try_into().unwrap()) as usize,
            r.len()
        );
        assert_eq!(u32::from_ne_bytes(r[8..12].try_into().unwrap()), 5);
        let req = &r[NLMSG_HDRLEN..];
        assert_eq!(req[..2], [libc::AF_INET as u8, libc::IPPROTO_TCP as u8]);
        // sport is the local port, src the local address (inet_diag_sockid).
        assert_eq!(req[8..10], 8080u16.to_be_bytes());
        assert_eq!(req[10..12], 40000u16.to_be_bytes());
        assert_eq!(req[12..16], [10, 0, 0, 2]);
        assert_eq!(req[28..32], [10, 0, 0, 1]);
        assert!(!is_full(TCP_TIME_WAIT) && !is_full(TCP_LISTEN) && is_full(1));
    }

    /// An orphan closed before its peer lingers as a timewait socket in the FIN_WAIT2
    /// substate: no full socket, so it counts as gone (no destruction notice follows).
    #[test]
    fn a_timewait_socket_in_its_fin_wait2_substate_is_not_full() {
        const TCP_FIN_WAIT2: u8 = 5;
        let mut msg = vec![0u8; 72];
        msg[0] = libc::AF_INET as u8;
        msg[1] = TCP_FIN_WAIT2;
        msg[2] = 3; // the timewait timer
        let (_, state) = diag_msg(SOCK_DIAG_BY_FAMILY, &msg).unwrap();
        assert!(!is_full(state));
        msg[2] = 0; // a full socket in FIN_WAIT2
        assert!(is_full(diag_msg(SOCK_DIAG_BY_FAMILY, &msg).unwrap().1));
    }

    /// Live sockets are found, absent ones (even with a listener on their local port,
    /// which an exact lookup falls back to) and timewait ones are gone.
    #[tokio::test]
    async fn gone_tells_live_sockets_from_absent_and_closed_ones() {
        let (client, server) = pair().await;
        let (c, s) = (flow_of(&client), flow_of(&server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let never = Flow {
            local: v4(listener.local_addr().unwrap()),
            client: "127.0.0.9:9".parse().unwrap(),
        };
        let all = [c, s, never];
        let gone = tokio::task::spawn_blocking(move || super::gone(&all))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(gone, [never]);
        // The client closes first: its side waits in TIME_WAIT (no full socket), the
        // server's is freed after the FIN exchange.
        drop(client);
        drop(server);
        let mut left = vec![c, s];
        for _ in 0..100 {
            let flows = [c, s];
            let gone = tokio::task::spawn_blocking(move || super::gone(&flows))
                .await
                .unwrap()
                .unwrap();
            left.retain(|f| !gone.contains(f));
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(left.is_empty(), "still reported: {left:?}");
    }

    /// What a lost notice leaves behind is cleaned up by the sweep: the flow leaves
    /// `live` and its FE is told, while a flow with a socket stays.
    #[tokio::test]
    async fn a_sweep_forgets_live_flows_without_a_socket_and_tells_their_frontend() {
        let h = Handoff::for_tests();
        h.set_diag(true);
        let (_client, server) = pair().await;
        let alive = flow_of(&server);
        let lost = Flow {
            local: "127.0.0.1:1".parse().unwrap(),
            client: "127.0.0.9:2".parse().unwrap(),
        };
        let to = |port| crate::handoff::Notices {
            fe: SocketAddrV4::new([127, 0, 0, 1].into(), port),
            be: [127, 0, 0, 1].into(),
        };
        h.live().insert(alive, to(15010));
        h.live().insert(lost, to(15011));
        assert_eq!(h.sweep().await.unwrap(), 1);
        assert!(h.is_live(&alive) && !h.is_live(&lost));
        let closed = h.closed.lock().unwrap();
        assert_eq!(
            closed.get(&to(15011)),
            Some(&vec![lost]),
            "its FE's redirect is to be removed"
        );
        assert_eq!(closed.len(), 1);
    }

    /// An overrun subscription (ENOBUFS: notices lost) resyncs: a live flow without a
    /// socket, which no notice will ever report, is forgotten. Needs CAP_NET_ADMIN;
    /// skipped without it.
    #[tokio::test]
    async fn lost_notices_are_resynced_with_a_dump() {
        let Ok(socket) = subscribe() else {
            eprintln!("skipping: sock_diag destroy notifications need CAP_NET_ADMIN");
            return;
        };
        // The smallest buffer, then far more notices than it holds, unread.
        socket.socket_ref().set_rx_buf_sz(1).unwrap();
        for _ in 0..300 {
            let _ = pair().await;
        }
        let h = Handoff::for_tests();
        let lost = Flow {
            local: "127.0.0.1:1".parse().unwrap(),
            client: "127.0.0.9:2".parse().unwrap(),
        };
        h.live().insert(
            lost,
            crate::handoff::Notices {
                fe: "127.0.0.1:15010".parse().unwrap(),
                be: [127, 0, 0, 1].into(),
            },
        );
        let watch = tokio::spawn(watch(h.clone(), socket));
        let mut forgotten = false;
        for _ in 0..200 {
            if !h.is_live(&lost) {
                forgotten = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        watch.abort();
        assert!(forgotten, "the resync after the overrun forgot the flow");
    }

    /// A real notice: a loopback connection closes and the kernel reports it. Needs
    /// CAP_NET_ADMIN; skipped without it.
    #[tokio::test]
    async fn the_kernel_reports_a_closed_connection() {
        let Ok(socket) = subscribe() else {
            eprintln!("skipping: sock_diag destroy notifications need CAP_NET_ADMIN");
            return;
        };
        let (client, server) = pair().await;
        let want = flow_of(&server);
        drop(client);
        drop(server);
        let seen = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let (buf, _) = socket.recv_from_full().await.unwrap();
                if parse(&buf).iter().any(|(f, _)| *f == want) {
                    return;
                }
            }
        })
        .await;
        assert!(seen.is_ok(), "no destroy notice for {want:?}");
    }
}
