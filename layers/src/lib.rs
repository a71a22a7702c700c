//! baton's Tower layers.
//!
//! One concern per module, each with the same shape: `FooLayer` (configuration),
//! `Foo<S>` (the middleware), a named `ResponseFuture`, and a small error type when the
//! layer can fail. Per-target factories are `NewFoo` ([`new_service::NewService`]).
//!
//! The HTTP request path, outermost first (see `src/stack.rs` in the binary for the
//! assembly and why each layer sits where it does):
//!
//! ```text
//! limit::InFlightLimit  -> route::Router -> cache::NewCache<Logical>
//!   -> trace -> errors::ErrorResponse -> metrics -> timeout -> retry -> share::Share
//!   -> balance::Balancer (p2c | rr | hash) over discovery
//!   -> endpoint: trace -> metrics::Count -> proxy::http::HttpProxy
//!      (the terminal; the handoff terminal joins here)
//! ```

#![warn(missing_docs, unreachable_pub)]
#![deny(unsafe_code)]

pub mod balance;
pub mod body;
pub mod cache;
pub mod detect;
pub mod eject;
pub mod errors;
pub mod handoff;
pub mod io;
pub mod limit;
pub mod metrics;
pub mod new_service;
pub mod proxy;
pub mod retry;
pub mod route;
pub mod share;
pub mod sys;
pub mod target;
pub mod trace;

/// The error type every layer returns.
pub type Error = Box<dyn std::error::Error + Send + Sync + 'static>;
