//! The terminal of the endpoint stack: proxying to the chosen endpoint.
//!
//! - [`http::HttpProxy`]: HTTP requests over a pooled hyper client, bodies streamed;
//! - [`tcp`]: opaque connections, forwarded with `splice(2)` (bytes never enter user
//!   space);
//! - [`connect`]: how baton opens connections to endpoints (timeouts, socket options).
//!
//! This is the seam where the handoff terminal joins: an endpoint-level service that,
//! for an eligible request, moves the client connection instead of proxying it, and
//! otherwise falls through to these.

pub mod connect;
pub mod headers;
pub mod http;
pub mod pool;
pub mod tcp;
