//! The one body type that flows through the HTTP stack.
//!
//! A streaming body from hyper passes through untouched (never buffered); baton's own
//! answers (errors, admin) are a single chunk. An enum rather than a boxed trait object
//! keeps the per-request path free of allocations.

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use std::{
    pin::Pin,
    task::{Context, Poll},
};

/// A request or response body.
#[derive(Debug, Default)]
pub enum Body {
    /// A body streamed from a peer.
    Incoming(hyper::body::Incoming),
    /// A response body streamed from a pooled upstream connection, which goes back to
    /// its pool when the body has been read.
    Pooled(crate::proxy::pool::PooledBody),
    /// A complete body held in memory (taken on first poll).
    Full(Option<Bytes>),
    /// No body.
    #[default]
    Empty,
}

impl Body {
    /// A body of `bytes`.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() {
            Self::Empty
        } else {
            Self::Full(Some(bytes))
        }
    }
}

impl From<hyper::body::Incoming> for Body {
    fn from(body: hyper::body::Incoming) -> Self {
        Self::Incoming(body)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    // A concrete error (not a boxed one): the only fallible variant is hyper's, and a
    // `Box<dyn Error>` here trips rustc's `Send` inference for hyper's HTTP/2 server.
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Incoming(body) => Pin::new(body).poll_frame(cx),
            Self::Pooled(body) => Pin::new(body).poll_frame(cx),
            Self::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Self::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Incoming(body) => body.is_end_stream(),
            Self::Pooled(body) => body.is_end_stream(),
            Self::Full(data) => data.is_none(),
            Self::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Incoming(body) => body.size_hint(),
            Self::Pooled(body) => body.size_hint(),
            Self::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Self::Empty => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn full_body_yields_its_bytes_once() {
        let body = Body::full("hello");
        assert_eq!(http_body::Body::size_hint(&body).exact(), Some(5));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, "hello");
        assert!(http_body::Body::is_end_stream(&Body::full("")));
    }
}
