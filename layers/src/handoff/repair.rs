//! Freezing a live TCP socket, reading its state, and rebuilding it elsewhere, with
//! `TCP_REPAIR` — in the order CRIU's soccr uses (see the module docs of
//! [`crate::handoff`] for why each field matters).

use crate::sys::tcp::{get_opt, ioctl_int, recv_peek, set_opt};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use std::{
    io,
    net::{SocketAddr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

const TCP_REPAIR: libc::c_int = 19;
const TCP_REPAIR_QUEUE: libc::c_int = 20;
const TCP_QUEUE_SEQ: libc::c_int = 21;
const TCP_REPAIR_OPTIONS: libc::c_int = 22;
const TCP_TIMESTAMP: libc::c_int = 24;
const TCP_REPAIR_WINDOW: libc::c_int = 29;

/// `TCP_REPAIR_OFF_NO_WP` (-1): leave repair mode without sending a window probe.
const TCP_REPAIR_OFF_NO_WP: u32 = u32::MAX;
const TCP_RECV_QUEUE: u32 = 1;
const TCP_SEND_QUEUE: u32 = 2;

const TCPOPT_MSS: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;

/// `tcpi_options` bits.
pub const OPT_TIMESTAMPS: u8 = 1;
/// SACK was negotiated.
pub const OPT_SACK: u8 = 2;
/// Window scaling was negotiated.
pub const OPT_WSCALE: u8 = 4;

const TCP_ESTABLISHED: u8 = 1;
const SIOCINQ: libc::c_ulong = libc::FIONREAD;
const SIOCOUTQ: libc::c_ulong = libc::TIOCOUTQ;
const SIOCATMARK: libc::c_ulong = 0x8905;

/// Most bytes a frozen socket may hold unread and still be handed off (they travel
/// with the request).
pub const MAX_UNREAD: usize = 64 * 1024;

/// `struct tcp_repair_window`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepairWindow {
    /// `snd_wl1`.
    pub snd_wl1: u32,
    /// `snd_wnd`.
    pub snd_wnd: u32,
    /// `max_window`.
    pub max_window: u32,
    /// `rcv_wnd`.
    pub rcv_wnd: u32,
    /// `rcv_wup`.
    pub rcv_wup: u32,
}

impl RepairWindow {
    fn to_bytes(self) -> [u8; 20] {
        let mut b = [0u8; 20];
        for (i, v) in [
            self.snd_wl1,
            self.snd_wnd,
            self.max_window,
            self.rcv_wnd,
            self.rcv_wup,
        ]
        .into_iter()
        .enumerate()
        {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }

    fn from_bytes(b: &[u8; 20]) -> Self {
        let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Self {
            snd_wl1: w(0),
            snd_wnd: w(4),
            max_window: w(8),
            rcv_wnd: w(12),
            rcv_wup: w(16),
        }
    }
}

/// Everything needed to rebuild an established TCP connection's socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpState {
    /// The connection's local address (the FE's, which the BE binds to).
    pub local: SocketAddrV4,
    /// The client.
    pub peer: SocketAddrV4,
    /// `write_seq`: the next sequence number to send.
    pub snd_seq: u32,
    /// `rcv_nxt`: the next sequence number expected from the client.
    pub rcv_seq: u32,
    /// MSS clamp.
    pub mss: u32,
    /// Our send window scale (the client's announced shift).
    pub snd_wscale: u8,
    /// Our receive window scale.
    pub rcv_wscale: u8,
    /// `tcpi_options`: [`OPT_TIMESTAMPS`] | [`OPT_SACK`] | [`OPT_WSCALE`].
    pub options: u8,
    /// `TCP_TIMESTAMP` (the socket's timestamp clock offset), when negotiated.
    pub timestamp: u32,
    /// `TCP_REPAIR_WINDOW`.
    pub window: RepairWindow,
}

/// Why a socket cannot be frozen and moved. The socket is left (or put back) in normal
/// mode whenever this is returned by [`dump`].
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// Not an established IPv4 connection.
    #[error("socket is not an established IPv4 connection")]
    NotEstablished,
    /// Bytes written to the client are not all acknowledged.
    #[error("{0} bytes sent but not acknowledged")]
    Unacked(i32),
    /// The client sent urgent data.
    #[error("urgent data pending")]
    Urgent,
    /// More unread bytes than travel with a handoff.
    #[error("{0} unread bytes")]
    TooMuchUnread(i32),
    /// Segments kept arriving while the state was read.
    #[error("the receive queue kept changing")]
    Moving,
    /// A system call failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Whether the frozen socket is still exactly as [`dump`] saw it: established,
/// nothing received since (`rcv_seq` and `unread` bytes unchanged). Checked right
/// before the switch: anything that arrived after the dump would be lost by moving.
pub fn unchanged(fd: BorrowedFd<'_>, state: &TcpState, unread: usize) -> io::Result<bool> {
    let mut info = [0u8; 8];
    get_opt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)?;
    set_u32(fd, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
    let seq = get_u32(fd, TCP_QUEUE_SEQ)?;
    let inq = ioctl_int(fd, SIOCINQ)?;
    set_u32(fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
    Ok(info[0] == TCP_ESTABLISHED && seq == state.rcv_seq && inq as usize == unread)
}

fn set_u32(fd: BorrowedFd<'_>, name: libc::c_int, v: u32) -> io::Result<()> {
    set_opt(fd, libc::IPPROTO_TCP, name, &v.to_ne_bytes())
}

fn get_u32(fd: BorrowedFd<'_>, name: libc::c_int) -> io::Result<u32> {
    let mut b = [0u8; 4];
    get_opt(fd, libc::IPPROTO_TCP, name, &mut b)?;
    Ok(u32::from_ne_bytes(b))
}

/// The FE's hold: from now on every segment of the flow that reaches the socket is
/// dropped, before TCP sees it — no ACK, no RST, nothing queued — by a classic BPF
/// socket filter that accepts nothing (TCP runs a socket's filter before processing
/// a segment). It replaces an nft `held` set element: one `setsockopt` on the socket
/// instead of a netfilter transaction, and since the socket stays open until the
/// redirect is committed, nothing of the flow ever reaches the FE's stack without
/// a socket (which would draw an RST).
///
/// The filter is an eBPF program loaded once ([`hold_kind`]), so that each hold only
/// takes a reference to it; where loading eBPF is not allowed (no CAP_BPF), each hold
/// attaches a classic filter, which the kernel compiles anew every time (~25 µs on
/// the benchmark machine, the largest part of the hold).
pub fn hold(fd: BorrowedFd<'_>) -> io::Result<()> {
    hold_with(fd, drop_all())
}

/// [`hold`] with the eBPF program `prog`, or a classic filter without one.
fn hold_with(fd: BorrowedFd<'_>, prog: Option<&OwnedFd>) -> io::Result<()> {
    const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K: return the constant (0: drop)
    match prog {
        Some(prog) => crate::sys::attach_bpf(fd.as_raw_fd(), prog.as_raw_fd()),
        None => SockRef::from(&fd).attach_filter(&[socket2::SockFilter::new(BPF_RET_K, 0, 0, 0)]),
    }
}

/// The preloaded eBPF drop-all filter, loaded at the first call; `None` if the
/// kernel refused it.
fn drop_all() -> Option<&'static OwnedFd> {
    static PROG: std::sync::OnceLock<Option<OwnedFd>> = std::sync::OnceLock::new();
    PROG.get_or_init(|| crate::sys::load_drop_all_filter().ok())
        .as_ref()
}

/// Which filter [`hold`] attaches, loading the eBPF one if it can (call at startup,
/// so the first handoff does not pay for the load): "ebpf" or "classic".
pub fn hold_kind() -> &'static str {
    if drop_all().is_some() {
        "ebpf"
    } else {
        "classic"
    }
}

/// Ends [`hold`]: segments reach the socket again.
pub fn release(fd: BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&fd).detach_filter()
}

/// Enters repair mode: the socket stops transmitting (it keeps receiving — the caller
/// must already be dropping the flow's packets, see [`hold`]).
pub fn freeze(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_u32(fd, TCP_REPAIR, 1)
}

/// Leaves repair mode; the connection resumes exactly where it was (a window probe
/// tells the client so). Leaving repair mode clears the socket's address reuse,
/// which an accepted socket had from its listener: it is set again, or the
/// connection's TIME_WAIT would keep a restarted baton from binding its port.
pub fn thaw(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_u32(fd, TCP_REPAIR, 0)?;
    SockRef::from(&fd).set_reuse_address(true)
}

/// Whether this process may use `TCP_REPAIR` (it needs CAP_NET_ADMIN).
pub fn probe() -> io::Result<()> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    freeze(s.as_fd())
}

/// Checks that `fd` can move now, freezes it and reads its state, plus any bytes it
/// received but the application has not read (they travel with the request). On error
/// the socket is thawed again.
pub fn dump(fd: BorrowedFd<'_>) -> Result<(TcpState, Vec<u8>), DumpError> {
    let sock = SockRef::from(&fd);
    let (Some(local), Some(peer)) = (
        sock.local_addr()?.as_socket().and_then(v4),
        sock.peer_addr()?.as_socket().and_then(v4),
    ) else {
        return Err(DumpError::NotEstablished);
    };
    let outq = ioctl_int(fd, SIOCOUTQ)?;
    if outq != 0 {
        return Err(DumpError::Unacked(outq));
    }
    if ioctl_int(fd, SIOCATMARK)? != 0 {
        return Err(DumpError::Urgent);
    }
    freeze(fd)?;
    let dumped = dump_frozen(fd, local, peer);
    if dumped.is_err() {
        let _ = thaw(fd);
    }
    dumped
}

fn dump_frozen(
    fd: BorrowedFd<'_>,
    local: SocketAddrV4,
    peer: SocketAddrV4,
) -> Result<(TcpState, Vec<u8>), DumpError> {
    let mut info = [0u8; 8];
    get_opt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)?;
    if info[0] != TCP_ESTABLISHED {
        return Err(DumpError::NotEstablished);
    }
    // Checked again now that nothing moves any more.
    let outq = ioctl_int(fd, SIOCOUTQ)?;
    if outq != 0 {
        return Err(DumpError::Unacked(outq));
    }
    let options = info[5];
    let mut state = TcpState {
        local,
        peer,
        snd_seq: 0,
        rcv_seq: 0,
        mss: 0,
        snd_wscale: info[6] & 0x0f,
        rcv_wscale: info[6] >> 4,
        options,
        timestamp: 0,
        window: RepairWindow::default(),
    };
    let mut mss = [0u8; 4];
    get_opt(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG, &mut mss)?;
    state.mss = u32::from_ne_bytes(mss);
    if options & OPT_TIMESTAMPS != 0 {
        state.timestamp = get_u32(fd, TCP_TIMESTAMP)?;
    }
    let mut win = [0u8; 20];
    get_opt(fd, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, &mut win)?;
    state.window = RepairWindow::from_bytes(&win);
    // Repair mode still receives: a segment that slipped past the hold (or sat in the
    // backlog) may land while we read. Read until the receive side holds still.
    set_u32(fd, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
    let mut unread = Vec::new();
    let mut stable = false;
    for _ in 0..3 {
        let seq = get_u32(fd, TCP_QUEUE_SEQ)?;
        let inq = ioctl_int(fd, SIOCINQ)?;
        if inq < 0 || inq as usize > MAX_UNREAD {
            return Err(DumpError::TooMuchUnread(inq));
        }
        unread.resize(inq as usize, 0);
        let n = if inq > 0 {
            recv_peek(fd, &mut unread)?
        } else {
            0
        };
        unread.truncate(n);
        if get_u32(fd, TCP_QUEUE_SEQ)? == seq && ioctl_int(fd, SIOCINQ)? == inq && n == inq as usize
        {
            state.rcv_seq = seq;
            stable = true;
            break;
        }
    }
    if !stable {
        return Err(DumpError::Moving);
    }
    set_u32(fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
    state.snd_seq = get_u32(fd, TCP_QUEUE_SEQ)?;
    // The send queue stays selected: should anything still try to transmit on the
    // frozen socket, repair mode keeps it off the wire.
    Ok((state, unread))
}

fn v4(a: SocketAddr) -> Option<SocketAddrV4> {
    match a {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(_) => None,
    }
}

/// Rebuilds the connection described by `state` as a socket bound (transparently) to
/// the FE's address, established with no SYN, and out of repair mode. `unread` bytes
/// were already acknowledged by the FE, so they are not replayed into the kernel; the
/// caller hands them to the application first.
pub fn restore(state: &TcpState) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_cloexec(true)?;
    let fd = s.as_fd();
    // Repair mode forces address reuse (even over a listener on the port); setting
    // SO_REUSEADDR afterwards would undo that.
    freeze(fd)?;
    s.set_ip_transparent_v4(true)?;
    s.bind(&SocketAddr::V4(state.local).into())?;
    set_u32(fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
    set_u32(fd, TCP_QUEUE_SEQ, state.snd_seq)?;
    set_u32(fd, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
    set_u32(fd, TCP_QUEUE_SEQ, state.rcv_seq)?;
    // In repair mode connect() sends no SYN: the socket is ESTABLISHED at once. It
    // also resets the MSS clamp, send window and window scale, so options follow.
    s.connect(&SocketAddr::V4(state.peer).into())?;
    let mut opts = Vec::with_capacity(4 * 8);
    let mut opt = |code: u32, val: u32| {
        opts.extend_from_slice(&code.to_ne_bytes());
        opts.extend_from_slice(&val.to_ne_bytes());
    };
    opt(TCPOPT_MSS, state.mss);
    if state.options & OPT_WSCALE != 0 {
        opt(
            TCPOPT_WINDOW,
            u32::from(state.snd_wscale) | (u32::from(state.rcv_wscale) << 16),
        );
    }
    if state.options & OPT_SACK != 0 {
        opt(TCPOPT_SACK_PERM, 0);
    }
    if state.options & OPT_TIMESTAMPS != 0 {
        opt(TCPOPT_TIMESTAMP, 0);
    }
    set_opt(fd, libc::IPPROTO_TCP, TCP_REPAIR_OPTIONS, &opts)?;
    if state.options & OPT_TIMESTAMPS != 0 {
        set_u32(fd, TCP_TIMESTAMP, state.timestamp)?;
    }
    set_opt(
        fd,
        libc::IPPROTO_TCP,
        TCP_REPAIR_WINDOW,
        &state.window.to_bytes(),
    )?;
    // Options that could fail come before leaving repair mode: dropping a socket in
    // repair mode is silent, afterwards it would send a FIN from the FE's address.
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    // Out of repair mode without the usual window probe: the BE must not transmit
    // before "go" (see the module docs of `handoff`).
    set_u32(fd, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)?;
    // Reuse, as for an accepted socket: its TIME_WAIT must not block the BE's own
    // listener on the same port from binding after a restart.
    let _ = s.set_reuse_address(true);
    Ok(s)
}

/// Closes a socket without a trace on the wire: in repair mode the kernel sends
/// neither FIN nor RST.
pub fn close_silently(s: impl AsFd) {
    let _ = freeze(s.as_fd());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repair_window_round_trips_through_the_kernel_layout() {
        let w = RepairWindow {
            snd_wl1: 1,
            snd_wnd: 2,
            max_window: 3,
            rcv_wnd: 4,
            rcv_wup: 5,
        };
        assert_eq!(RepairWindow::from_bytes(&w.to_bytes()), w);
    }

    /// A held socket receives nothing and acknowledges nothing; released, it gets
    /// what the client sends next (TCP retransmits what was dropped).
    /// Both filters: the preloaded eBPF one (where it loads: as root) and the
    /// classic one.
    #[test]
    fn a_held_socket_drops_what_arrives_until_released() {
        if let Some(prog) = drop_all() {
            held_socket_drops_until_released(Some(prog));
        }
        held_socket_drops_until_released(None);
    }

    fn held_socket_drops_until_released(prog: Option<&OwnedFd>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        hold_with(server.as_fd(), prog).unwrap();
        client.write_all(b"dropped").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            ioctl_int(server.as_fd(), SIOCINQ).unwrap(),
            0,
            "nothing queued"
        );
        assert_eq!(
            ioctl_int(client.as_fd(), SIOCOUTQ).unwrap(),
            7,
            "nothing acknowledged"
        );
        release(server.as_fd()).unwrap();
        let mut got = [0u8; 7];
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        server.read_exact(&mut got).unwrap(); // the retransmission
        assert_eq!(&got, b"dropped");
    }

    /// Micro-benchmark of the FE's per-handoff kernel work (hold and its release, the
    /// redirect) as a socket filter and as nft transactions. Needs root and a scratch
    /// network namespace, where it installs the handoff table on `lo`:
    /// `ip netns add hb && ip netns exec hb ip link set lo up && ip netns exec hb
    /// target/debug/deps/baton_layers-* hold_costs --ignored --nocapture`.
    #[test]
    #[ignore]
    fn hold_costs() {
        use crate::handoff::{nft::Tables, tables, wire::Flow};
        use std::time::{Duration, Instant};
        tables::install("lo", std::time::Duration::from_secs(60)).unwrap();
        let t = Tables::new(
            tables::TABLE,
            Duration::from_secs(5),
            Duration::from_secs(60),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let flow = Flow {
            client: "10.0.0.1:1".parse().unwrap(),
            local: "10.0.0.2:2".parse().unwrap(),
        };
        let n = 2000u32;
        let time = |what: &str, f: &mut dyn FnMut()| {
            let start = Instant::now();
            for _ in 0..n {
                f();
            }
            eprintln!("{what}: {:?} each", start.elapsed() / n);
        };
        if let Some(prog) = drop_all() {
            time(
                "socket filter hold + release (eBPF, preloaded)",
                &mut || {
                    hold_with(server.as_fd(), Some(prog)).unwrap();
                    release(server.as_fd()).unwrap();
                },
            );
        }
        time("socket filter hold + release (classic)", &mut || {
            hold_with(server.as_fd(), None).unwrap();
            release(server.as_fd()).unwrap();
        });
        time("nft hold + release (held set add, remove)", &mut || {
            t.hold(flow).unwrap();
            t.release(flow).unwrap();
        });
        time("nft redirect (one batch)", &mut || {
            t.redirect(flow, "10.0.0.3".parse().unwrap()).unwrap()
        });
        t.forget_moved(flow).unwrap();
    }

    /// Freezes one side of a loopback connection, rebuilds it from the dump (after
    /// closing the original silently), and checks the client can keep talking to the
    /// rebuilt socket in both directions. Needs CAP_NET_ADMIN; skipped without it.
    #[test]
    fn a_dumped_socket_is_restored_and_keeps_talking() {
        use std::io::{Read, Write};
        if probe().is_err() {
            eprintln!("skipping: TCP_REPAIR needs CAP_NET_ADMIN");
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"first").unwrap();
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).unwrap();
        server.write_all(b"hello").unwrap();
        client.read_exact(&mut buf).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20)); // let the ACK land
        client.write_all(b"unread").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (state, unread) = dump(server.as_fd()).unwrap();
        assert_eq!(unread, b"unread");
        assert!(unchanged(server.as_fd(), &state, unread.len()).unwrap());
        assert!(state.mss > 0);
        close_silently(&server);
        drop(server);
        drop(listener); // the port must not answer the client's next segment
        let restored = restore(&state).unwrap();
        let mut restored = std::net::TcpStream::from(restored);
        restored.set_nonblocking(false).unwrap();
        restored.write_all(b"from the copy").unwrap();
        let mut got = [0u8; 13];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"from the copy");
        client.write_all(b"more").unwrap();
        let mut more = [0u8; 4];
        restored.read_exact(&mut more).unwrap();
        assert_eq!(&more, b"more");
    }
}
