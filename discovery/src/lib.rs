//! Service discovery for baton.
//!
//! Every discovery source (static configuration, a watched file, and Consul in [`consul`]) publishes *snapshots* — the complete set of instances of one service — into a
//! [`Registry`]. Balancers subscribe with [`Registry::resolve`] and receive a
//! [`Resolution`]: a [`tower::discover::Discover`] stream of
//! [`Change::Insert`](tower::discover::Change)/[`Change::Remove`](tower::discover::Change)
//! deltas keyed by instance ID. Sources therefore never need to know who listens, and a
//! balancer built late (after idle eviction, say) starts from the current snapshot.
//!
//! The registry also answers the questions the admin server asks: has a service had its
//! first update yet (readiness), and how many instances does it have (metrics).

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod consul;
mod registry;
pub mod static_source;

pub use registry::{Registry, Resolution, ServiceState};

use std::{net::SocketAddr, sync::Arc};

/// One instance of a service, as discovery reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Instance {
    /// Stable identity of the instance within its service (Consul's service ID; for
    /// static config the address as written). Deltas are keyed by it.
    pub id: Arc<str>,
    /// Where the instance accepts traffic.
    pub addr: SocketAddr,
    /// The port of the instance's baton handoff receiver, when it advertises one.
    pub handoff_port: Option<u16>,
    /// Relative weight for balancers that honour weights (1 when unspecified).
    pub weight: u32,
}

impl Instance {
    /// An instance identified by its address, with default weight and no handoff port.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            id: addr.to_string().into(),
            addr,
            handoff_port: None,
            weight: 1,
        }
    }
}
