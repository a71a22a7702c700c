//! Connection handoff (Prism): the frontend (FE) moves the client's TCP connection to
//! the chosen instance's baton (BE), which answers the client directly.
//!
//! ```text
//! FE terminal (fe)                                     BE receiver (be)
//!   hold: drop the flow's packets     (socket filter)
//!   freeze: TCP_REPAIR, dump state    (repair)
//!   offer: state + request bytes  ---- wire ---->   verify key, clock, nonce, FE CIDR
//!                                                    restore socket (repair), bound to
//!                                                    the FE address; deliver locally (nft)
//!                                 <--- ready ----
//!   redirect, one transaction         (nft)
//!   close silently (repair mode)
//!   go                            ---- go ------>    serve the request and follow-ups
//!                                                    from the local app, splicing
//!                                                    ... socket gone (diag):
//!   remove redirect               <--- closed ---    remove local delivery
//! ```
//!
//! Any failure before the redirect thaws the socket and the request is proxied as usual:
//! the client never sees the difference. After the redirect the connection is the BE's,
//! even if "go" is lost (the BE then drops it, and the client gets a reset): the FE
//! serves only before the redirect, the BE only after "go", never both. Why each piece of TCP state travels, and the
//! order of the restore, follow CRIU's soccr: wrong sequence numbers blackhole the
//! flow, no MSS means 536-byte segments, no window scale means tiny windows, no
//! timestamp offset means the client drops segments (PAWS). The two-phase
//! ready/go exchange exists because the BE must not transmit before the FE's redirect
//! exists: the client's ACKs would be dropped by the hold and the BE would wait out a
//! one-second initial RTO.
//!
//! Offer, ready, refusal and go travel on one long-lived control connection per FE ->
//! BE pair, shared by every handoff between the two and matched by the offer's nonce
//! (see [`control`]): no connection setup on the critical path. A control connection
//! that ends fails only the handoffs in flight on it — the FE's fall back (before the
//! switch, so they thaw), the BE's that said "ready" drop their copies — and the next
//! handoff opens a new one. The BE's "closed" and "alive" notices keep short
//! connections of their own, batched (see [`be`]).
//!
//! Kernel plumbing (see [`tables`]): one `netdev` table `baton` on the handoff
//! interface holds the FE's `moved` map (`fwd` to the BE; its `held` drop set is no
//! longer used by the handoff, which holds with a socket filter) and the
//! BE's `restored` set (mark, then `ip rule fwmark` to a table that delivers locally).
//! Elements carry timeouts, so a crash leaks nothing for long.

pub mod be;
pub mod control;
pub mod diag;
pub mod fe;
pub mod nft;
pub mod pass;
pub mod policy;
pub mod repair;
pub mod tables;
pub mod wire;

use crate::metrics::Metrics;
use ipnet::Ipv4Net;
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};
use wire::{Flow, Key, ReplayGuard};

/// Handoff settings, both roles (every baton with handoff on is FE and BE).
#[derive(Clone, Debug)]
pub struct HandoffConfig {
    /// The fleet key (`BATON_HANDOFF_KEY_FILE`).
    pub key: Key,
    /// How long the FE waits for "ready" (`BATON_HANDOFF_TIMEOUT`).
    pub timeout: Duration,
    /// This baton's receiver port, told to BEs for their "closed" notices.
    pub listen_port: u16,
    /// A peer's handoff port when discovery does not say (`BATON_HANDOFF_PORT`).
    pub default_port: u16,
    /// Flows a BE accepts: their local (FE) address must be in one of these.
    pub fe_cidrs: Vec<Ipv4Net>,
    /// Networks reachable on the handoff interface's segment: only endpoints there can
    /// take a connection (the redirect is an L2 forward).
    pub peer_nets: Vec<Ipv4Net>,
    /// Services whose requests may be handed off; `None` is all.
    pub services: Option<Vec<Arc<str>>>,
    /// The BE's local application (`BATON_APP_ADDR`).
    pub app_addr: SocketAddr,
    /// The handoff-aware application moved connections are passed to
    /// (`BATON_APP_PASS`; `None`: relay them to `app_addr`).
    pub app_pass: Option<std::path::PathBuf>,
    /// FE: the smallest expected response worth a handoff
    /// (`BATON_HANDOFF_MIN_BYTES`; 0: every eligible request).
    pub min_bytes: u64,
    /// The kernel sets.
    pub tables: nft::Tables,
}

/// The handoff runtime shared by the FE terminal and the BE receiver.
#[derive(Debug)]
pub struct Handoff {
    cfg: HandoffConfig,
    metrics: Metrics,
    replay: ReplayGuard,
    /// BE: moved connections being served, with where their notices go.
    live: Mutex<HashMap<Flow, Notices>>,
    /// BE: control connections being handled (bounds what unauthenticated peers cost).
    control: Arc<tokio::sync::Semaphore>,
    /// Whether sock_diag notices arrive (else moved flows are forgotten on a timer).
    diag: std::sync::atomic::AtomicBool,
    /// BE: "closed" notices waiting to go out, per FE receiver (and source).
    closed: Mutex<HashMap<Notices, Vec<Flow>>>,
    /// FE: the control connection to each BE receiver.
    controls: control::Controls,
    /// FE: which requests are worth a handoff.
    policy: policy::SizePolicy,
}

/// Where a BE's notices about a moved connection go, and the address they come from:
/// the BE address the FE dialled, which is the one its redirect forwards to, so the FE
/// can tell that the notice concerns a flow it gave this BE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Notices {
    /// The FE's receiver.
    fe: std::net::SocketAddrV4,
    /// The BE's address in the FE's redirect.
    be: Ipv4Addr,
}

/// Control connections a BE handles at once.
const MAX_CONTROL: usize = 512;

impl Handoff {
    /// The runtime for `cfg`.
    pub fn new(cfg: HandoffConfig, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            replay: ReplayGuard::default(),
            live: Mutex::new(HashMap::new()),
            control: Arc::new(tokio::sync::Semaphore::new(MAX_CONTROL)),
            diag: std::sync::atomic::AtomicBool::new(false),
            closed: Mutex::new(HashMap::new()),
            controls: Mutex::new(HashMap::new()),
            policy: policy::SizePolicy::new(cfg.min_bytes),
            cfg,
        })
    }

    /// The settings.
    pub fn config(&self) -> &HandoffConfig {
        &self.cfg
    }

    /// The FE's size policy.
    pub fn policy(&self) -> &policy::SizePolicy {
        &self.policy
    }

    fn metrics(&self) -> &crate::metrics::HandoffMetrics {
        &self.metrics.global().handoff
    }

    /// Whether requests of `service` may be handed off.
    pub fn serves(&self, service: &str) -> bool {
        self.cfg
            .services
            .as_ref()
            .is_none_or(|s| s.iter().any(|n| &**n == service))
    }

    /// Where an endpoint at `ip` takes connections, if it can: it must sit on the
    /// handoff interface's segment, and not be this host (an endpoint here is served
    /// from here: offering it to our own receiver could only fail, its 4-tuple being
    /// in use).
    pub fn peer(&self, ip: Ipv4Addr, port: Option<u16>) -> Option<std::net::SocketAddrV4> {
        let nets = &self.cfg.peer_nets;
        (nets.iter().any(|n| n.contains(&ip)) && !nets.iter().any(|n| n.addr() == ip))
            .then(|| std::net::SocketAddrV4::new(ip, port.unwrap_or(self.cfg.default_port)))
    }

    /// Whether `ip` is a peer that may talk to this receiver: a frontend it accepts, or
    /// a baton on the segment.
    fn trusted_source(&self, ip: Ipv4Addr) -> bool {
        self.cfg
            .fe_cidrs
            .iter()
            .chain(&self.cfg.peer_nets)
            .any(|n| n.contains(&ip))
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<Flow, Notices>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
impl Handoff {
    /// A runtime for unit tests: a fresh key, loopback addresses, and a kernel table
    /// name no test creates (its element operations fail, which the code under test
    /// logs and survives).
    pub(crate) fn for_tests() -> Arc<Self> {
        Self::for_tests_on(vec!["127.0.0.0/8".parse().expect("a network")])
    }

    /// [`for_tests`](Self::for_tests) with this host's addresses on the handoff
    /// interface being `peer_nets`.
    pub(crate) fn for_tests_on(peer_nets: Vec<Ipv4Net>) -> Arc<Self> {
        let cfg = HandoffConfig {
            key: Key::new(&[9; 32]).expect("a 32-byte key"),
            timeout: Duration::from_millis(50),
            listen_port: 15010,
            default_port: 15010,
            fe_cidrs: vec!["127.0.0.0/8".parse().expect("a network")],
            peer_nets,
            services: None,
            app_addr: "127.0.0.1:8080".parse().expect("an address"),
            app_pass: None,
            min_bytes: 0,
            tables: nft::Tables::new(
                "baton-unit-test-absent",
                Duration::from_secs(5),
                Duration::from_secs(60),
            ),
        };
        Self::new(cfg, Metrics::new())
    }
}

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The connection failed or closed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The bytes were not an acceptable message.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_on_the_segment_and_not_this_host() {
        let h = Handoff::for_tests_on(vec!["10.1.0.5/24".parse().unwrap()]);
        assert_eq!(
            h.peer(Ipv4Addr::new(10, 1, 0, 7), None),
            Some("10.1.0.7:15010".parse().unwrap())
        );
        assert_eq!(
            h.peer(Ipv4Addr::new(10, 1, 0, 7), Some(16000)),
            Some("10.1.0.7:16000".parse().unwrap())
        );
        assert_eq!(h.peer(Ipv4Addr::new(10, 1, 0, 5), None), None, "this host");
        assert_eq!(
            h.peer(Ipv4Addr::new(10, 2, 0, 7), None),
            None,
            "off the segment"
        );
    }
}
