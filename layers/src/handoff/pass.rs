//! Passing a moved connection to a handoff-aware application (`BATON_APP_PASS`).
//!
//! By default a BE relays a moved connection to its local application over loopback
//! TCP, so every response still crosses two TCP stacks on the backend. An application
//! that can take a connected socket (as Prism's backends do) can have the client's
//! socket itself: the BE sends it, with the bytes already read from it, over a Unix
//! socket (`SCM_RIGHTS`), and leaves the data path as the FE did. If the application
//! is not listening or refuses, the BE relays to `BATON_APP_ADDR` as before: the
//! client cannot tell. If it got the socket but answers neither way within
//! [`GIVE_TIMEOUT`], the connection is left to it ([`GiveError::InDoubt`]): relaying
//! it as well could answer the client twice.
//!
//! The protocol, for applications in any language, one Unix stream connection per
//! passed socket, opened by baton:
//!
//! ```text
//! baton -> app   "BTP1" | prefix length (u32, big endian) | prefix bytes
//!                the socket travels as SCM_RIGHTS on the first bytes of the message
//! app -> baton   "+"    the app owns the socket now; baton closes its copy
//! ```
//!
//! The prefix is what the client sent that the FE already read (the first request,
//! and any pipelined bytes behind it): the application must handle it as the start of
//! the stream, then read the socket. The application acknowledges before it writes
//! anything, and closes the Unix connection without "+" to refuse (baton then serves
//! the connection). The socket is non-blocking (its file status is shared), the
//! client is its peer address and the address the client dialled its local one.
//! baton keeps watching the connection (sock_diag) to remove its kernel entries when
//! the application closes it. [`PassListener`] is the application side in Rust.
//!
//! Whoever can connect to the application's socket can hand it connections, so the
//! receiver takes offers only from the user IDs it trusts (`SO_PEERCRED`: by default
//! root and its own; [`PassListener::allow_uids`] when baton runs as another user), and
//! the socket's directory should be writable by baton and the application alone.

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use std::{
    io::{self, IoSlice, IoSliceMut},
    os::fd::{AsRawFd, BorrowedFd, OwnedFd},
    path::Path,
    time::Duration,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, Interest},
    net::{UnixListener, UnixStream},
};

/// The message's first bytes.
pub const MAGIC: [u8; 4] = *b"BTP1";
/// The application's acknowledgement.
pub const ACK: u8 = b'+';
/// The largest prefix a receiver accepts.
pub const MAX_PREFIX: usize = 1 << 20;
/// How long the BE waits for the application to connect and acknowledge.
pub const GIVE_TIMEOUT: Duration = Duration::from_millis(500);

const HEADER: usize = MAGIC.len() + 4;

/// Opens the Unix connection to the application at `path`.
pub async fn connect(path: &Path) -> io::Result<UnixStream> {
    tokio::time::timeout(GIVE_TIMEOUT, UnixStream::connect(path))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Why [`give`] failed, which says who may serve the connection now.
#[derive(Debug)]
pub enum GiveError {
    /// The application does not have the socket: it was never sent, or the
    /// application read the whole offer and closed without "+". The caller still owns
    /// the connection (and may relay it).
    NotTaken(io::Error),
    /// The socket was sent, but the application neither took nor refused it (no
    /// answer in time, a reset, a wrong answer): it may still serve the connection, so
    /// the caller must not, and only closes its copy.
    InDoubt(io::Error),
}

impl std::fmt::Display for GiveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GiveError::NotTaken(e) => write!(f, "not taken: {e}"),
            GiveError::InDoubt(e) => write!(f, "sent, never confirmed: {e}"),
        }
    }
}

/// Gives `socket` and `prefix` to the application on `conn`; `Ok` once it
/// acknowledged, after which it owns the connection and the caller closes its copy.
pub async fn give(
    conn: &mut UnixStream,
    socket: BorrowedFd<'_>,
    prefix: &[u8],
) -> Result<(), GiveError> {
    let len = u32::try_from(prefix.len())
        .ok()
        .filter(|&n| n as usize <= MAX_PREFIX)
        .ok_or_else(|| {
            GiveError::NotTaken(io::Error::new(
                io::ErrorKind::InvalidInput,
                "prefix too long",
            ))
        })?;
    let mut header = [0u8; HEADER];
    header[..4].copy_from_slice(&MAGIC);
    header[4..].copy_from_slice(&len.to_be_bytes());
    let mut sent_fd = false;
    let result = tokio::time::timeout(GIVE_TIMEOUT, async {
        let fds = [socket.as_raw_fd()];
        let sent = loop {
            conn.writable().await?;
            let iov = [IoSlice::new(&header), IoSlice::new(prefix)];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            match conn.try_io(Interest::WRITABLE, || {
                socket::sendmsg::<()>(conn.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        sent_fd = true;
        // The socket went with the first bytes; the rest is plain data.
        if sent < HEADER {
            conn.write_all(&header[sent..]).await?;
            conn.write_all(prefix).await?;
        } else {
            conn.write_all(&prefix[sent - HEADER..]).await?;
        }
        let mut ack = [0u8; 1];
        match conn.read(&mut ack).await? {
            1 if ack[0] == ACK => Ok(()),
            0 => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the application refused the connection",
            )),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the application answered neither \"+\" nor nothing",
            )),
        }
    })
    .await;
    match result {
        Ok(Ok(())) => Ok(()),
        // A clean close after the whole offer: the protocol's refusal.
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionAborted => Err(GiveError::NotTaken(e)),
        Ok(Err(e)) if !sent_fd => Err(GiveError::NotTaken(e)),
        Ok(Err(e)) => Err(GiveError::InDoubt(e)),
        Err(_) => {
            let e = io::Error::new(io::ErrorKind::TimedOut, "no acknowledgement");
            Err(if sent_fd {
                GiveError::InDoubt(e)
            } else {
                GiveError::NotTaken(e)
            })
        }
    }
}

/// A connection baton passed: the client's socket and the bytes to handle before
/// reading it.
#[derive(Debug)]
pub struct Passed {
    /// The client's connection (non-blocking).
    pub stream: std::net::TcpStream,
    /// What the client sent that was read before the handoff.
    pub prefix: Vec<u8>,
}

/// The application side: where baton passes moved connections.
#[derive(Debug)]
pub struct PassListener {
    listener: UnixListener,
    allowed: std::sync::Arc<[u32]>,
}

impl PassListener {
    /// Listens at `path`, taking offers from root and from this process's user.
    ///
    /// A socket file left by an earlier run is replaced; one that a running process
    /// still accepts on is not (`AddrInUse`): two receivers would split its offers.
    pub fn bind(path: impl AsRef<Path>) -> io::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        let path = path.as_ref();
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.file_type().is_socket() {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("{} is in use by a running receiver", path.display()),
                    ));
                }
                std::fs::remove_file(path)?;
            }
        }
        let own = crate::sys::euid();
        Ok(Self {
            listener: UnixListener::bind(path)?,
            allowed: [0, own].into(),
        })
    }

    /// Takes offers only from these user IDs (instead of root and this process's).
    pub fn allow_uids(mut self, uids: impl IntoIterator<Item = u32>) -> Self {
        self.allowed = uids.into_iter().collect();
        self
    }

    /// The next offer from baton; [`Incoming::take`] receives its connection (run it
    /// on its own task, so that one slow offer does not hold up the others).
    pub async fn accept(&self) -> io::Result<Incoming> {
        let (conn, _) = self.listener.accept().await?;
        Ok(Incoming {
            conn,
            allowed: self.allowed.clone(),
        })
    }
}

/// One offer from baton, not yet read.
#[derive(Debug)]
pub struct Incoming {
    conn: UnixStream,
    allowed: std::sync::Arc<[u32]>,
}

impl Incoming {
    /// Checks who sent the offer, reads it, checks that it carries a TCP socket, and
    /// acknowledges it; fails if that takes longer than [`GIVE_TIMEOUT`] (baton has
    /// given up by then). An offer from a user not allowed fails with
    /// `PermissionDenied`; it is read and dropped, unacknowledged, so that the sender
    /// sees the protocol's refusal and relays the connection itself (closing with the
    /// offer unread would look to it like a failure after the socket left).
    pub async fn take(mut self) -> io::Result<Passed> {
        let uid = self.conn.peer_cred()?.uid();
        let trusted = self.allowed.contains(&uid);
        let offer = tokio::time::timeout(GIVE_TIMEOUT, async {
            let passed = self.read_offer().await?;
            if trusted {
                self.conn.write_all(&[ACK]).await?;
            }
            Ok::<_, io::Error>(passed)
        })
        .await;
        if !trusted {
            // Dropping the offer closes this process's copy of its socket; the stream
            // closes with nothing unread.
            drop(offer);
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("offer from user {uid}, who may not pass connections"),
            ));
        }
        offer.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "incomplete offer"))?
    }

    /// Reads the offer and checks its socket; acknowledging is the caller's.
    async fn read_offer(&mut self) -> io::Result<Passed> {
        let mut header = [0u8; HEADER];
        let mut got = 0;
        let mut socket = None;
        while got < HEADER {
            let (n, fd) = self.recv(&mut header[got..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            got += n;
            socket = socket.or(fd);
        }
        if header[..4] != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a baton offer",
            ));
        }
        // The socket came with the header's bytes: check it before taking the prefix.
        let socket = socket.ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "the offer carried no socket")
        })?;
        let socket = socket2::Socket::from(socket);
        if socket.r#type()? != socket2::Type::STREAM || socket.peer_addr()?.as_socket().is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the offer's socket is not a connected TCP socket",
            ));
        }
        let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
        if len > MAX_PREFIX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "prefix too long",
            ));
        }
        let mut prefix = vec![0u8; len];
        self.conn.read_exact(&mut prefix).await?;
        // Non-blocking whatever the sender left it as: the caller registers it with an
        // event loop.
        socket.set_nonblocking(true)?;
        Ok(Passed {
            stream: socket.into(),
            prefix,
        })
    }

    /// Reads into `buf` with the descriptor that came along, if any (extra ones are
    /// closed).
    async fn recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
        loop {
            self.conn.readable().await?;
            let fd = self.conn.as_raw_fd();
            let got = self.conn.try_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(buf)];
                // Room for the most descriptors one message can carry (SCM_MAX_FD),
                // so that none is ever cut off unowned (and leaked).
                let mut space = nix::cmsg_space!([std::os::fd::RawFd; 253]);
                let msg = socket::recvmsg::<()>(
                    fd,
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut first = None;
                for cmsg in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(fds) = cmsg {
                        for owned in crate::sys::received_fds(fds) {
                            // Extra descriptors close when dropped here.
                            first = first.or(Some(owned));
                        }
                    }
                }
                Ok((msg.bytes, first))
            });
            match got {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    /// A scratch directory for one test's pass socket, removed when dropped.
    struct Scratch {
        dir: std::path::PathBuf,
        path: std::path::PathBuf,
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// An application listening in a fresh scratch directory named after `test`.
    fn listening(test: &str) -> (Scratch, PassListener) {
        let dir = std::env::temp_dir().join(format!("baton-pass-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.sock");
        let app = PassListener::bind(&path).unwrap();
        (Scratch { dir, path }, app)
    }

    /// A loopback TCP connection (client, server); the server side is what baton
    /// gives away.
    fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        (client, server)
    }

    /// Whether `a` and `b` are the same connection.
    fn same_socket(a: BorrowedFd<'_>, b: &std::net::TcpStream) -> bool {
        let (a, b) = (socket2::SockRef::from(&a), socket2::SockRef::from(b));
        matches!((a.local_addr(), b.local_addr()), (Ok(x), Ok(y)) if x.as_socket() == y.as_socket())
            && matches!((a.peer_addr(), b.peer_addr()), (Ok(x), Ok(y)) if x.as_socket() == y.as_socket())
    }

    #[tokio::test]
    async fn a_socket_and_its_prefix_reach_the_application_which_then_owns_it() {
        let (scratch, app) = listening("given");
        let (mut client, server) = tcp_pair();
        let taker = tokio::spawn(async move { app.accept().await.unwrap().take().await });
        let mut conn = connect(&scratch.path).await.unwrap();
        give(&mut conn, server.as_fd(), b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let passed = taker.await.unwrap().unwrap();
        assert_eq!(passed.prefix, b"GET / HTTP/1.1\r\n\r\n");
        assert!(same_socket(server.as_fd(), &passed.stream));
        drop(server);
        // baton's copy is closed; the application's still talks to the client.
        let mut stream = passed.stream;
        stream.set_nonblocking(false).unwrap();
        stream.write_all(b"from the app").unwrap();
        drop(stream);
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"from the app");
    }

    #[tokio::test]
    async fn an_application_that_closes_without_acknowledging_has_refused() {
        let (scratch, app) = listening("refused");
        let (_client, server) = tcp_pair();
        let refuser = tokio::spawn(async move {
            let Incoming { mut conn, .. } = app.accept().await.unwrap();
            // Reads the whole offer (header and the one-byte prefix), then closes.
            let mut b = [0u8; HEADER + 1];
            conn.read_exact(&mut b).await.unwrap();
        });
        let mut conn = connect(&scratch.path).await.unwrap();
        let err = give(&mut conn, server.as_fd(), b"x").await.unwrap_err();
        assert!(
            matches!(&err, GiveError::NotTaken(e) if e.kind() == io::ErrorKind::ConnectionAborted),
            "{err}"
        );
        refuser.await.unwrap();
    }

    /// Read but never answered: the application may serve it, so baton must not.
    #[tokio::test]
    async fn an_offer_read_but_never_answered_is_in_doubt() {
        let (scratch, app) = listening("doubt");
        let (_client, server) = tcp_pair();
        let silent = tokio::spawn(async move {
            let Incoming { mut conn, .. } = app.accept().await.unwrap();
            let mut b = [0u8; HEADER + 1];
            conn.read_exact(&mut b).await.unwrap();
            tokio::time::sleep(GIVE_TIMEOUT * 3).await;
        });
        let mut conn = connect(&scratch.path).await.unwrap();
        let err = give(&mut conn, server.as_fd(), b"x").await.unwrap_err();
        assert!(matches!(err, GiveError::InDoubt(_)), "{err}");
        silent.abort();
    }

    #[tokio::test]
    async fn an_offer_without_a_socket_is_rejected_by_the_receiver() {
        let (scratch, app) = listening("nofd");
        let taker = tokio::spawn(async move { app.accept().await.unwrap().take().await });
        let mut conn = connect(&scratch.path).await.unwrap();
        conn.write_all(b"BTP1\0\0\0\x01x").await.unwrap();
        let err = taker.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        // The receiver closes without reading the prefix: end of stream or a reset.
        let mut ack = [0u8; 1];
        match conn.read(&mut ack).await {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("expected no acknowledgement, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_offer_from_a_user_not_allowed_is_refused() {
        let (scratch, app) = listening("uid");
        // No real sender runs as this user.
        let app = app.allow_uids([u32::MAX - 7]);
        let (_client, server) = tcp_pair();
        let taker = tokio::spawn(async move { app.accept().await.unwrap().take().await });
        let mut conn = connect(&scratch.path).await.unwrap();
        let err = give(&mut conn, server.as_fd(), b"x").await.unwrap_err();
        assert!(matches!(err, GiveError::NotTaken(_)), "{err}");
        let err = taker.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
    }

    #[tokio::test]
    async fn binding_over_a_running_receiver_fails_and_leaves_it_working() {
        let (scratch, app) = listening("twice");
        let err = PassListener::bind(&scratch.path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        // The first receiver still gets offers at the same path.
        let (_client, server) = tcp_pair();
        let taker = tokio::spawn(async move {
            // bind's probe is the first connection in the backlog: an empty offer.
            let probe = app.accept().await.unwrap().take().await.unwrap_err();
            assert_eq!(probe.kind(), io::ErrorKind::UnexpectedEof, "{probe}");
            app.accept().await.unwrap().take().await
        });
        let mut conn = connect(&scratch.path).await.unwrap();
        give(&mut conn, server.as_fd(), b"x").await.unwrap();
        assert_eq!(taker.await.unwrap().unwrap().prefix, b"x");
    }

    #[tokio::test]
    async fn a_stale_socket_file_is_replaced() {
        let (scratch, app) = listening("stale");
        drop(app); // the file stays behind, nobody accepts on it
        assert!(scratch.path.exists());
        let app = PassListener::bind(&scratch.path).unwrap();
        let (_client, server) = tcp_pair();
        let taker = tokio::spawn(async move { app.accept().await.unwrap().take().await });
        let mut conn = connect(&scratch.path).await.unwrap();
        give(&mut conn, server.as_fd(), b"y").await.unwrap();
        assert_eq!(taker.await.unwrap().unwrap().prefix, b"y");
    }
}
