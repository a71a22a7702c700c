//! baton: a sidecar proxy built as a Tower stack.
//!
//! The binary's library half: configuration, stack assembly, connection serving,
//! listeners, the admin server and the demo. `main.rs` only parses arguments, sets up
//! logging and the runtime, and calls [`app::run`].

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod demo;
pub mod init;
pub mod leave;
pub mod listen;
pub mod serve;
pub mod stack;
