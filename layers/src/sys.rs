//! The system calls no safe crate wraps: `splice(2)` through a pipe here, the
//! TCP repair socket options and ioctls in [`tcp`].
//!
//! Every `unsafe` block of the crate lives in this module tree, each with its `SAFETY`
//! reasoning.

#![allow(unsafe_code)]

pub mod tcp;

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// Pipe capacity requested for splicing (the kernel may round it).
pub const PIPE_SIZE: usize = 1 << 20;

/// A non-blocking pipe used as the in-kernel buffer between two sockets.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// Creates a non-blocking, close-on-exec pipe and tries to grow it to
    /// [`PIPE_SIZE`] (falling back to the default size when not allowed).
    pub fn new() -> io::Result<Self> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid, writable array of two c_ints, as pipe2 requires.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ takes an int argument; the fd is a valid pipe.
        let set = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        let capacity = if set > 0 {
            set as usize
        } else {
            // SAFETY: F_GETPIPE_SZ takes no argument; the fd is a valid pipe.
            let got = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
            if got > 0 {
                got as usize
            } else {
                1 << 16
            }
        };
        Ok(Self {
            read,
            write,
            capacity,
        })
    }

    /// Bytes the pipe can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Moves up to `len` bytes from the socket `from` into the pipe. `Ok(0)` is EOF.
    pub fn fill_from(&self, from: RawFd, len: usize) -> io::Result<usize> {
        splice(from, self.write.as_raw_fd(), len)
    }

    /// Moves up to `len` bytes from the pipe to the socket `to`.
    pub fn drain_to(&self, to: RawFd, len: usize) -> io::Result<usize> {
        splice(self.read.as_raw_fd(), to, len)
    }
}

/// Takes ownership of descriptors that arrived with a received message
/// (`SCM_RIGHTS`, as `recvmsg` reports them), so that each is closed exactly once.
pub fn received_fds(fds: Vec<RawFd>) -> Vec<OwnedFd> {
    fds.into_iter()
        // SAFETY: the kernel installed each of these in this process for the message
        // just received; nothing else refers to them yet.
        .map(|raw| unsafe { OwnedFd::from_raw_fd(raw) })
        .collect()
}

/// Loads an eBPF socket filter that drops every packet (`r0 = 0; exit`), for
/// attaching with [`attach_bpf`]. Needs CAP_BPF (or CAP_SYS_ADMIN) unless the kernel
/// allows unprivileged eBPF.
pub fn load_drop_all_filter() -> io::Result<OwnedFd> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
    // struct bpf_insn { code, regs, off, imm }, all zero but the code (so the same
    // bytes on either endianness): mov64 r0, 0 (BPF_ALU64 | BPF_MOV | BPF_K); exit
    // (BPF_JMP | BPF_EXIT).
    let insns: [[u8; 8]; 2] = [[0xb7, 0, 0, 0, 0, 0, 0, 0], [0x95, 0, 0, 0, 0, 0, 0, 0]];
    let license = c"GPL";
    /// The head of `union bpf_attr` for BPF_PROG_LOAD; the rest stays zero.
    #[repr(C, align(8))]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        rest: [u8; 64],
    }
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: *b"baton_hold\0\0\0\0\0\0",
        rest: [0; 64],
    };
    // SAFETY: `attr` is a valid BPF_PROG_LOAD attribute of the size passed, and the
    // instruction and license buffers it points to outlive the call. The kernel
    // returns a new descriptor (close-on-exec) or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoad,
            std::mem::size_of::<ProgLoad>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned to this process and owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Attaches the loaded eBPF socket filter `prog` to `socket` (`SO_ATTACH_BPF`): a
/// reference to the program, with no compilation (unlike a classic filter, which
/// the kernel translates and JIT-compiles at every attach).
pub fn attach_bpf(socket: RawFd, prog: RawFd) -> io::Result<()> {
    let fd: libc::c_int = prog;
    // SAFETY: SO_ATTACH_BPF takes an int (the program's descriptor); invalid
    // descriptors only produce an error.
    let r = unsafe {
        libc::setsockopt(
            socket,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_BPF,
            &fd as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: null offsets are allowed for pipes and sockets; the descriptors are
    // borrowed for the duration of the call and invalid ones only produce EBADF.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn moves_bytes_between_sockets_through_the_pipe() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let (c, mut d) = UnixStream::pair().unwrap();
        let pipe = Pipe::new().unwrap();
        assert!(pipe.capacity() >= 4096);
        a.write_all(b"hello splice").unwrap();
        let n = pipe.fill_from(b.as_raw_fd(), 64).unwrap();
        assert_eq!(n, 12);
        assert_eq!(pipe.drain_to(c.as_raw_fd(), n).unwrap(), 12);
        let mut buf = [0u8; 12];
        d.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello splice");
        drop(a);
        assert_eq!(pipe.fill_from(b.as_raw_fd(), 64).unwrap(), 0, "EOF");
    }
}

/// `CAP_NET_ADMIN`'s number.
const CAP_NET_ADMIN: u32 = 12;
/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets in two 32-bit words.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// This process's effective user ID.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Lets the programs this process runs (`nft`, `ip`) inherit CAP_NET_ADMIN when the
/// process is not root and holds it as a file capability (`setcap cap_net_admin+ep`):
/// raises it into the inheritable and ambient sets. Without that a child starts over
/// from its own binary's capabilities, and iproute2's `ip` even drops those unless
/// CAP_NET_ADMIN is inheritable. Capabilities are per thread and new threads copy
/// them, so call this first thing in `main`, before any other thread exists.
///
/// Returns whether it raised the capability; `Ok(false)` for root (whose children keep
/// their capabilities) or when the process does not hold CAP_NET_ADMIN.
pub fn inherit_net_admin() -> io::Result<bool> {
    if euid() == 0 {
        return Ok(false);
    }
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget with a version-3 header writes exactly two CapData structs, and
    // `data` is a valid, writable array of two.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let bit = 1u32 << CAP_NET_ADMIN;
    if data[0].permitted & bit == 0 {
        return Ok(false);
    }
    // Allowed without CAP_SETPCAP: the new inheritable set stays within the
    // permitted one.
    data[0].inheritable |= bit;
    // SAFETY: capset reads one version-3 header and two CapData structs, both valid.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: PR_CAP_AMBIENT_RAISE takes the capability number and three zero
    // arguments; it only reads them.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
            CAP_NET_ADMIN as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

/// The signals that stop (SIGTERM, SIGINT) or reload (SIGHUP) the sidecar.
const CONTROL_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Holds SIGTERM, SIGINT and SIGHUP pending in the calling thread and in every thread it
/// starts from now on, instead of letting them kill the process, until
/// [`release_control_signals`] (called once their handlers are installed). Call it
/// before any thread starts. Child processes start with an empty mask (std's `Command`
/// resets it).
pub fn hold_control_signals() -> io::Result<()> {
    control_signal_mask(libc::SIG_BLOCK)
}

/// Lets the signals [`hold_control_signals`] held reach the calling thread again; any
/// that arrived meanwhile are delivered now.
pub fn release_control_signals() -> io::Result<()> {
    control_signal_mask(libc::SIG_UNBLOCK)
}

fn control_signal_mask(how: libc::c_int) -> io::Result<()> {
    // SAFETY: `set` is a sigset_t owned here, initialised by sigemptyset before
    // sigaddset and pthread_sigmask read it; pthread_sigmask accepts a null old set.
    let rc = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in CONTROL_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}
