//! Protocol detection: read the first bytes of a connection and decide what it speaks.
//!
//! - HTTP/2 with prior knowledge: the 24-byte client preface `PRI * HTTP/2.0...`;
//! - HTTP/1: a complete request line, `METHOD SP TARGET SP HTTP/1.x CRLF` (a method
//!   token followed by a space is not enough: `EHLO host` is SMTP);
//! - TLS (a handshake record, `0x16 0x03`) and anything else: opaque TCP.
//!
//! The bytes are *read*, not peeked (a peek returns the same bytes again and again
//! until more arrive, which cannot be waited on), so the caller replays them with
//! [`PrefixedIo`](crate::io::PrefixedIo). Detection is bounded in time
//! (`BATON_DETECT_TIMEOUT`): a client that sends nothing, or too little to decide, is
//! closed rather than holding a task forever. It is bounded in size too: a request line
//! longer than the limit is handed to the HTTP server, which answers it 414.

use bytes::BytesMut;
use std::{io, time::Duration};
use tokio::io::{AsyncRead, AsyncReadExt};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.0 or HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// Anything else (including TLS, for now).
    Opaque,
}

/// Why detection did not decide.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// The client did not send enough to decide in time.
    #[error("client sent too little to detect its protocol within {0:?}")]
    Timeout(Duration),
    /// The client closed the connection without sending anything.
    #[error("client closed the connection before sending anything")]
    Closed,
    /// Reading failed.
    #[error("reading the first bytes failed: {0}")]
    Io(#[from] io::Error),
}

/// Reads from `io` into `buf` until the protocol is known, for at most `timeout` and
/// `limit` bytes. `buf` keeps everything read, to be replayed.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    timeout: Duration,
    limit: usize,
) -> Result<Detected, DetectError> {
    let work = async {
        loop {
            if let Some(d) = classify(buf, limit) {
                return Ok(d);
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(4096);
            }
            if io.read_buf(buf).await? == 0 {
                return match buf.is_empty() {
                    true => Err(DetectError::Closed),
                    // Closed mid-way: whatever it was, it is not HTTP we can serve.
                    false => Ok(Detected::Opaque),
                };
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(DetectError::Timeout(timeout)))
}

/// Decides from the bytes so far; `None` means "need more".
pub fn classify(buf: &[u8], limit: usize) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Detected::Http2);
    }
    match http1_request_line(buf) {
        Line::Yes => Some(Detected::Http1),
        Line::No => Some(Detected::Opaque),
        Line::More if buf.len() >= limit => Some(Detected::Http1),
        Line::More => None,
    }
}

enum Line {
    Yes,
    No,
    More,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Checks `METHOD SP TARGET SP HTTP/1.d (CR)LF`, allowing leading empty lines.
fn http1_request_line(mut buf: &[u8]) -> Line {
    while let Some(rest) = buf
        .strip_prefix(b"\r\n")
        .or_else(|| buf.strip_prefix(b"\n"))
    {
        buf = rest;
    }
    let mut parts = 0; // 0: method, 1: target, 2: version
    let mut start = 0;
    for (i, &b) in buf.iter().enumerate() {
        match parts {
            0 if b == b' ' => {
                if i == 0 {
                    return Line::No;
                }
                parts = 1;
                start = i + 1;
            }
            0 if !is_tchar(b) => return Line::No,
            1 if b == b' ' => {
                if i == start {
                    return Line::No;
                }
                parts = 2;
                start = i + 1;
            }
            1 if b.is_ascii_control() => return Line::No,
            2 if b == b'\r' || b == b'\n' => {
                return if is_http1_version(&buf[start..i]) {
                    Line::Yes
                } else {
                    Line::No
                };
            }
            2 => {
                let so_far = &buf[start..=i];
                let want = b"HTTP/1.x";
                if so_far.len() > want.len()
                    || !so_far
                        .iter()
                        .zip(want)
                        .all(|(g, w)| *w == b'x' && g.is_ascii_digit() || g == w)
                {
                    return Line::No;
                }
            }
            _ => {}
        }
    }
    Line::More
}

fn is_http1_version(v: &[u8]) -> bool {
    v.len() == 8 && v.starts_with(b"HTTP/1.") && v[7].is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const LIMIT: usize = 8192;

    #[test]
    fn classifies_protocols() {
        let c = |b: &[u8]| classify(b, LIMIT);
        assert_eq!(
            c(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some(Detected::Http1)
        );
        assert_eq!(c(b"\r\nPOST /x?y HTTP/1.0\r\n"), Some(Detected::Http1));
        assert_eq!(c(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(c(b"\x16\x03\x01\x02\x00"), Some(Detected::Opaque));
        assert_eq!(c(b"EHLO mail.example.com\r\n"), Some(Detected::Opaque));
        assert_eq!(c(b"SSH-2.0-OpenSSH_9.2\r\n"), Some(Detected::Opaque));
        assert_eq!(c(b"*1\r\n$4\r\nPING\r\n"), Some(Detected::Opaque));
        assert_eq!(c(b"GET / HTTP/2.0\r\n"), Some(Detected::Opaque));
    }

    #[test]
    fn waits_for_enough_bytes() {
        let c = |b: &[u8]| classify(b, LIMIT);
        assert_eq!(c(b""), None);
        assert_eq!(c(b"PRI * HTTP/2"), None, "a prefix of the h2 preface");
        assert_eq!(c(b"GET"), None);
        assert_eq!(c(b"GET /very/long"), None);
        assert_eq!(c(b"GET / HTTP/1."), None);
        // A request line longer than the limit goes to the HTTP server (-> 414).
        let mut long = b"GET /".to_vec();
        long.resize(LIMIT, b'a');
        assert_eq!(c(&long), Some(Detected::Http1));
    }

    #[tokio::test]
    async fn reads_until_decided() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let d = detect(&mut server, &mut buf, Duration::from_secs(5), LIMIT).await;
            (d.unwrap(), buf)
        });
        client.write_all(b"GET /index.html HT").await.unwrap();
        tokio::task::yield_now().await;
        client
            .write_all(b"TP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (d, buf) = task.await.unwrap();
        assert_eq!(d, Detected::Http1);
        assert!(
            buf.starts_with(b"GET /index.html HTTP/1.1\r\n"),
            "everything read is kept"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silent_client_times_out() {
        let (_client, mut server) = tokio::io::duplex(1024);
        let mut buf = BytesMut::new();
        let err = detect(&mut server, &mut buf, Duration::from_secs(10), LIMIT)
            .await
            .unwrap_err();
        assert!(matches!(err, DetectError::Timeout(_)));
    }

    #[tokio::test]
    async fn closed_client_is_reported() {
        let (client, mut server) = tokio::io::duplex(1024);
        drop(client);
        let mut buf = BytesMut::new();
        let err = detect(&mut server, &mut buf, Duration::from_secs(1), LIMIT)
            .await
            .unwrap_err();
        assert!(matches!(err, DetectError::Closed));
    }
}
