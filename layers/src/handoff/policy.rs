//! Which eligible requests are worth a handoff: the size policy
//! (`BATON_HANDOFF_MIN_BYTES`).
//!
//! A handoff costs a freeze, a round trip to the BE and a restore before the first
//! response byte; what it saves is the FE's share of carrying the response, which
//! grows with the response. For small responses the cost wins: a 1 KiB first request
//! took 1.1-1.3x as long handed off as proxied, for a keep-alive throughput gain of
//! only 1.05x (1.6x at 1 MiB; benches/RESULTS.md, "Handoff mode"). So the FE hands
//! off only requests whose response it expects to be at least `min` bytes, and learns
//! what to expect from the responses it proxies:
//!
//! - per request target (path and query, per service): the size class of the last
//!   response seen for it, in a fixed table of byte-sized slots indexed by a hash
//!   (collisions only blur a guess; memory stays bounded whatever the paths);
//! - per service: a moving average of how often its responses were large, for targets
//!   never seen (an object store whose objects are each fetched once).
//!
//! A target predicted small is proxied, and so measured again each time; one predicted
//! large is handed off, and the BE never reports sizes back, so one in [`SAMPLE`] of
//! those is proxied to keep the guess fresh — one in [`SAMPLE_UNSEEN`] when the guess
//! is only the service's, so that a small target of a mostly large service is soon
//! found out. With nothing known at all the request is proxied (and measured). A response without a length (chunked, or ending with the
//! connection) counts as large: streams are what the handoff serves best.
//!
//! Everything is atomics, without locks: a request costs one hash and two loads, a
//! proxied response one hash-free store (the slot travels with the request).

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU8, Ordering};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// One in this many requests predicted large is proxied, to measure it again.
pub const SAMPLE: u32 = 64;
/// The same for targets never measured, predicted large from their service.
pub const SAMPLE_UNSEEN: u32 = 16;
/// Target slots (one byte each).
const PATHS: usize = 1 << 14;
/// Service slots (two bytes each).
const SERVICES: usize = 256;
/// Path slot values.
const UNKNOWN: u8 = 0;
const SMALL: u8 = 1;
const LARGE: u8 = 2;
/// Service averages: the share of large responses in 1/1024ths, with [`SEEN`] set
/// once anything was measured.
const SEEN: u16 = 1 << 15;
const ONE: i32 = 1024;

/// Why the policy proxied an eligible request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Its target's responses are small.
    Small,
    /// Nothing is known about its target or service yet.
    Unknown,
    /// Predicted large, proxied to measure it again.
    Sample,
}

impl Skip {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Small => "small",
            Skip::Unknown => "unknown",
            Skip::Sample => "sample",
        }
    }
}

/// The labels of [`Skip`], for the metric.
pub const SKIP_REASONS: &[&str] = &["small", "unknown", "sample"];

/// Where a request's observation goes: its target's slot and its service's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    path: u16,
    service: u8,
}

/// The learned sizes; one per FE, shared by every endpoint's terminal.
#[derive(Debug)]
pub struct SizePolicy {
    /// `BATON_HANDOFF_MIN_BYTES`; 0 hands off every eligible request.
    min: u64,
    paths: Box<[AtomicU8]>,
    services: Box<[AtomicU16]>,
    /// Decisions "large" from the target's own record, and from its service's.
    ticks: AtomicU32,
    ticks_unseen: AtomicU32,
}

impl SizePolicy {
    /// A policy handing off responses of at least `min` bytes (0: all).
    pub fn new(min: u64) -> Self {
        let (paths, services) = if min == 0 { (0, 0) } else { (PATHS, SERVICES) };
        Self {
            min,
            paths: (0..paths).map(|_| AtomicU8::new(UNKNOWN)).collect(),
            services: (0..services).map(|_| AtomicU16::new(0)).collect(),
            ticks: AtomicU32::new(0),
            ticks_unseen: AtomicU32::new(0),
        }
    }

    /// Whether the policy looks at sizes at all.
    pub fn active(&self) -> bool {
        self.min > 0
    }

    /// The service part of a slot, computed once per endpoint.
    pub fn service(&self, name: &str) -> u64 {
        xxh3_64(name.as_bytes())
    }

    /// The slot of a request for `target` (path and query) of the service hashed as
    /// `service`.
    pub fn slot(&self, service: u64, target: &str) -> Slot {
        let h = xxh3_64_with_seed(target.as_bytes(), service);
        // Both tables' sizes are powers of two no larger than 2^16 and 2^8.
        Slot {
            path: (h as usize % PATHS) as u16,
            service: (service as usize % SERVICES) as u8,
        }
    }

    /// Whether to hand off the request in `slot`: `Ok` to try, else why not.
    pub fn decide(&self, slot: Slot) -> Result<(), Skip> {
        if !self.active() {
            return Ok(());
        }
        let (large, ticks, every) = match self.paths[usize::from(slot.path)].load(Ordering::Relaxed)
        {
            LARGE => (true, &self.ticks, SAMPLE),
            SMALL => (false, &self.ticks, SAMPLE),
            _ => match self.services[usize::from(slot.service)].load(Ordering::Relaxed) {
                s if s & SEEN == 0 => return Err(Skip::Unknown),
                s => (
                    i32::from(s & !SEEN) * 2 >= ONE,
                    &self.ticks_unseen,
                    SAMPLE_UNSEEN,
                ),
            },
        };
        if !large {
            return Err(Skip::Small);
        }
        let n = ticks.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        if n % every == 0 {
            return Err(Skip::Sample);
        }
        Ok(())
    }

    /// Records that the response to the request in `slot` carries `bytes` of body
    /// (`None`: no length, as for a chunked response).
    pub fn observe(&self, slot: Slot, bytes: Option<u64>) {
        if !self.active() {
            return;
        }
        let large = bytes.is_none_or(|b| b >= self.min);
        let class = if large { LARGE } else { SMALL };
        let path = &self.paths[usize::from(slot.path)];
        if path.load(Ordering::Relaxed) != class {
            path.store(class, Ordering::Relaxed);
        }
        // An exponential moving average with weight 1/8, the first sample taken as
        // it is. Racing updates may lose one; a guess does not need them all.
        let service = &self.services[usize::from(slot.service)];
        let old = service.load(Ordering::Relaxed);
        let x = if large { ONE } else { 0 };
        let avg = if old & SEEN == 0 {
            x
        } else {
            let old = i32::from(old & !SEEN);
            old + (x - old) / 8
        };
        let new = SEEN | u16::try_from(avg.clamp(0, ONE)).unwrap_or(0);
        if new != old {
            service.store(new, Ordering::Relaxed);
        }
    }
}

/// The body length a response announces for the request's method: `Some(0)` for
/// responses without a body, `None` when it has no length (chunked, or until close).
/// A `HEAD` response announces the length of the `GET` it stands for.
pub fn announced_length(status: http::StatusCode, headers: &http::HeaderMap) -> Option<u64> {
    if status.is_informational()
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::NOT_MODIFIED
    {
        return Some(0);
    }
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> (SizePolicy, u64) {
        let p = SizePolicy::new(32 * 1024);
        let svc = p.service("objects");
        (p, svc)
    }

    #[test]
    fn off_hands_off_everything_and_learns_nothing() {
        let p = SizePolicy::new(0);
        let slot = p.slot(p.service("objects"), "/a");
        p.observe(slot, Some(10));
        for _ in 0..1000 {
            assert_eq!(p.decide(slot), Ok(()));
        }
    }

    #[test]
    fn nothing_known_is_proxied_then_learned_per_target() {
        let (p, svc) = policy();
        let small = p.slot(svc, "/small");
        let large = p.slot(svc, "/large");
        assert_eq!(p.decide(small), Err(Skip::Unknown));
        assert_eq!(p.decide(large), Err(Skip::Unknown));
        p.observe(small, Some(1024));
        p.observe(large, Some(1 << 20));
        assert_eq!(p.decide(small), Err(Skip::Small));
        assert_eq!(p.decide(large), Ok(()));
        // A target that changes size is re-learned from its next proxied response.
        p.observe(small, Some(1 << 20));
        assert_eq!(p.decide(small), Ok(()));
        p.observe(large, Some(100));
        assert_eq!(p.decide(large), Err(Skip::Small));
    }

    #[test]
    fn the_threshold_is_inclusive_and_unknown_lengths_are_large() {
        let (p, svc) = policy();
        let a = p.slot(svc, "/exactly");
        p.observe(a, Some(32 * 1024));
        assert_eq!(p.decide(a), Ok(()));
        let b = p.slot(svc, "/just-below");
        p.observe(b, Some(32 * 1024 - 1));
        assert_eq!(p.decide(b), Err(Skip::Small));
        let c = p.slot(svc, "/chunked");
        p.observe(c, None);
        assert_eq!(p.decide(c), Ok(()));
    }

    #[test]
    fn unseen_targets_follow_their_service() {
        let (p, objects) = policy();
        let pages = p.service("pages");
        // An object store: every object fetched once, all large.
        for i in 0..20 {
            p.observe(p.slot(objects, &format!("/o/{i}")), Some(1 << 20));
        }
        for i in 0..20 {
            p.observe(p.slot(pages, &format!("/p/{i}")), Some(900));
        }
        assert_eq!(p.decide(p.slot(objects, "/o/new")), Ok(()));
        assert_eq!(p.decide(p.slot(pages, "/p/new")), Err(Skip::Small));
        // The service average moves with what it serves: mostly small now.
        for i in 0..30 {
            p.observe(p.slot(objects, &format!("/thumb/{i}")), Some(2000));
        }
        assert_eq!(p.decide(p.slot(objects, "/o/newer")), Err(Skip::Small));
    }

    #[test]
    fn one_in_sample_of_the_large_is_proxied_to_measure_again() {
        let (p, svc) = policy();
        let large = p.slot(svc, "/large");
        p.observe(large, Some(1 << 20));
        let decisions: Vec<_> = (0..SAMPLE * 4).map(|_| p.decide(large)).collect();
        let sampled = decisions
            .iter()
            .filter(|d| **d == Err(Skip::Sample))
            .count();
        assert_eq!(sampled, 4);
        assert!(decisions[..usize::try_from(SAMPLE - 1).unwrap()]
            .iter()
            .all(|d| d.is_ok()));
    }

    #[test]
    fn a_small_target_of_a_large_service_is_found_out_by_sampling() {
        let (p, svc) = policy();
        p.observe(p.slot(svc, "/large"), Some(1 << 20));
        let thumb = p.slot(svc, "/thumb");
        let tries = (1..=SAMPLE_UNSEEN)
            .find(|_| p.decide(thumb) == Err(Skip::Sample))
            .expect("sampled within SAMPLE_UNSEEN decisions");
        assert_eq!(tries, SAMPLE_UNSEEN);
        p.observe(thumb, Some(2048));
        assert_eq!(p.decide(thumb), Err(Skip::Small));
    }

    #[test]
    fn announced_lengths() {
        use http::{header::CONTENT_LENGTH, HeaderMap, HeaderValue, StatusCode};
        let mut h = HeaderMap::new();
        assert_eq!(announced_length(StatusCode::OK, &h), None);
        assert_eq!(announced_length(StatusCode::NO_CONTENT, &h), Some(0));
        assert_eq!(announced_length(StatusCode::NOT_MODIFIED, &h), Some(0));
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("4096"));
        assert_eq!(announced_length(StatusCode::OK, &h), Some(4096));
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("nonsense"));
        assert_eq!(announced_length(StatusCode::OK, &h), None);
    }
}
