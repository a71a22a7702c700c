//! Socket options and ioctls for TCP connection repair (`TCP_REPAIR` and friends),
//! which no safe crate wraps. Callers in `handoff::repair` give them meaning.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `setsockopt(fd, level, name, value)` with a raw byte value.
pub fn set_opt(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> io::Result<()> {
    // SAFETY: `value` is a valid readable buffer of the length passed; the kernel
    // copies it and validates the length for `name`.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// `getsockopt(fd, level, name)` into `out`; returns the length the kernel wrote.
pub fn get_opt(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    out: &mut [u8],
) -> io::Result<usize> {
    let mut len = out.len() as libc::socklen_t;
    // SAFETY: `out` is a valid writable buffer of `len` bytes and `len` a valid
    // in/out length; the kernel writes at most `len` bytes.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            out.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    Ok(len as usize)
}

/// An ioctl whose result is an `int` written through the pointer argument
/// (`SIOCINQ`, `SIOCOUTQ`, `SIOCOUTQNSD`, `SIOCATMARK`).
pub fn ioctl_int(fd: BorrowedFd<'_>, request: libc::c_ulong) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    // SAFETY: these requests write exactly one c_int through the pointer, which
    // points at a live local.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request as _, &mut value as *mut libc::c_int) })?;
    Ok(value)
}

/// `recv(fd, out, MSG_PEEK | MSG_DONTWAIT)`: reads without consuming.
pub fn recv_peek(fd: BorrowedFd<'_>, out: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `out` is a valid writable buffer of the length passed.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            out.as_mut_ptr().cast(),
            out.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
