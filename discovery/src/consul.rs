//! Consul: discovery by blocking-query watches and registration through the local agent.
//!
//! - [`watch`] keeps one service's instances in the [`Registry`](crate::Registry), from
//!   `GET /v1/health/service/<name>?passing` blocking queries, following Consul's rules
//!   for them (index handling, a rate limit, jittered backoff) and keeping the last
//!   known instances while Consul cannot be reached.
//! - [`register`] registers the local service with the agent, re-registers it when the
//!   agent loses it, and deregisters it on shutdown.
//! - [`env`](mod@env) reads the consul CLI's standard environment (`CONSUL_HTTP_ADDR`, tokens,
//!   TLS) into [`ClientSettings`]; [`Client`] speaks HTTP/1.1 to the agent over TCP,
//!   TLS (rustls) or a Unix socket.
//!
//! Why not rs-consul: its health-service types drop `Service.Meta` and `Weights` (baton
//! needs both: the handoff port and the balancing weight), its health query takes no
//! consistency mode, it has no agent service endpoints, and its client can reach
//! neither a `unix://` agent nor take `CONSUL_CACERT`/client certificates without
//! replacing its transport. Every call baton makes is one HTTP request with a small
//! JSON body, so a thin client on hyper-util (already in the tree for proxying) with
//! the types from Consul's API documentation ([`api`]) is less code than working
//! around it.

pub mod api;
mod client;
mod connect;
pub mod env;
pub mod register;
mod retry;
#[cfg(test)]
mod test_agent;
pub mod watch;

pub use client::{go_duration, Client, Error, Response};
pub use env::{Address, ClientSettings, Consistency, TlsSettings};
