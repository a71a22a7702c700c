//! The handoff wire format: length-prefixed, authenticated messages between batons.
//!
//! ```text
//! frame   = length:u32 (of the rest) | message
//! message = "BTN1" | kind:u8 | nonce:[16] | sent_ms:u64 | payload | hmac:[32]
//! ```
//!
//! Integers are big-endian. `hmac` is HMAC-SHA256 under the fleet key over everything
//! before it, so every message is authenticated and tamper-evident. `sent_ms` (Unix
//! milliseconds) and the random `nonce` refuse replays: a receiver accepts a message only
//! within [`MAX_SKEW`] of its own clock and only once per nonce (see [`ReplayGuard`]).
//! The window is seconds wide on purpose: it only bounds how long nonces must be
//! remembered, so hosts' clocks need not agree closely. Nothing judges timeliness by
//! comparing two hosts' clocks more finely (a late "ready" is the FE's timeout's
//! business, see `be`).
//! Replies carry the nonce of the offer they answer, so a reply cannot be replayed into
//! another handoff; the nonce is also how the concurrent handoffs sharing one control
//! connection (see `control`) are told apart. The decoder never trusts a length it has not bounds-checked; the
//! fuzz target in `layers/fuzz` feeds it arbitrary bytes.

use super::repair::{RepairWindow, TcpState};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

const MAGIC: &[u8; 4] = b"BTN1";
const MAC_LEN: usize = 32;
const HEADER_LEN: usize = 4 + 1 + 16 + 8;
/// Largest message accepted (the request head and unread bytes travel inside).
pub const MAX_MESSAGE: usize = 256 * 1024;
/// How far a message's clock may be from the receiver's.
pub const MAX_SKEW: Duration = Duration::from_secs(10);
/// Shortest key accepted.
pub const MIN_KEY_LEN: usize = 32;

/// The fleet's shared key.
#[derive(Clone)]
pub struct Key(Hmac<Sha256>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(redacted)")
    }
}

impl Key {
    /// A key from secret bytes, at least [`MIN_KEY_LEN`] long.
    pub fn new(secret: &[u8]) -> Result<Self, String> {
        if secret.len() < MIN_KEY_LEN {
            return Err(format!(
                "the key is {} bytes; at least {MIN_KEY_LEN} are required",
                secret.len()
            ));
        }
        Hmac::new_from_slice(secret)
            .map(Self)
            .map_err(|e| e.to_string())
    }
}

/// A 4-tuple as the client sees it: client address and the address it connected to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    /// The client.
    pub client: SocketAddrV4,
    /// The address the client connected to (the FE's).
    pub local: SocketAddrV4,
}

/// A connection offered to a BE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// The socket state (its addresses are the flow).
    pub tcp: TcpState,
    /// The FE's handoff port, for the BE's "closed" and "alive" notices.
    pub fe_port: u16,
    /// The BE receiver the FE dialled: a BE refuses offers meant for another, so a
    /// captured offer cannot be replayed elsewhere.
    pub be: SocketAddrV4,
    /// The port of the endpoint the FE chose: the BE serves it only from an
    /// application on that port.
    pub app_port: u16,
    /// How long the FE waits for "ready" (the BE gives up waiting for "go" after it).
    pub timeout_ms: u32,
    /// Bytes the client sent that the BE's application must see first: the request
    /// head and anything received after it.
    pub data: Vec<u8>,
}

impl Offer {
    /// The offered flow.
    pub fn flow(&self) -> Flow {
        Flow {
            client: self.tcp.peer,
            local: self.tcp.local,
        }
    }
}

/// Why a BE refused an offer (also the `reason` label of its counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Refusal {
    /// The flow's local address is outside `BATON_HANDOFF_FE_CIDRS`.
    Cidr = 1,
    /// Restoring the socket failed.
    Restore = 2,
    /// The kernel table update failed.
    Table = 3,
    /// The BE is shutting down or at capacity.
    Busy = 4,
    /// The offer names another BE.
    Target = 5,
    /// The offer's endpoint port is not this BE's application.
    App = 6,
    /// The FE has given up waiting already. No longer sent (it compared the two
    /// hosts' clocks); still understood from older batons.
    Late = 7,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cidr => "cidr",
            Self::Restore => "restore",
            Self::Table => "table",
            Self::Busy => "busy",
            Self::Target => "target",
            Self::App => "app",
            Self::Late => "late",
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Cidr,
            2 => Self::Restore,
            3 => Self::Table,
            4 => Self::Busy,
            5 => Self::Target,
            6 => Self::App,
            7 => Self::Late,
            _ => return None,
        })
    }
}

/// A handoff message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// FE -> BE: take this connection.
    Offer(Offer),
    /// BE -> FE: restored, waiting for "go". Carries the offer's nonce.
    Ready([u8; 16]),
    /// BE -> FE: will not take it.
    Refused([u8; 16], Refusal),
    /// FE -> BE: the redirect is in place; the connection is yours.
    Go([u8; 16]),
    /// BE -> FE: these moved connections are gone; remove their redirects.
    Closed(Vec<Flow>),
    /// BE -> FE: these moved connections are alive; keep their redirects (to the
    /// sender) from expiring.
    Alive(Vec<Flow>),
}

/// Most flows one "alive" or "closed" notice carries.
pub const MAX_ALIVE: usize = 4096;

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Self::Offer(_) => 1,
            Self::Ready(_) => 2,
            Self::Refused(..) => 3,
            Self::Go(_) => 4,
            Self::Closed(_) => 5,
            Self::Alive(_) => 6,
        }
    }
}

/// A decoded, authenticated message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Unique per message.
    pub nonce: [u8; 16],
    /// Sender's clock, Unix milliseconds.
    pub sent_ms: u64,
    /// The message.
    pub msg: Message,
}

/// Why a message was not accepted (also the `reason` label of its counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Too short, too long, bad magic or kind, or a payload that does not parse.
    #[error("malformed message")]
    Malformed,
    /// The HMAC does not verify: wrong key or tampered.
    #[error("authentication failed")]
    Auth,
    /// Sent too long ago (or in the future).
    #[error("message outside the clock window")]
    Stale,
    /// This nonce was seen before.
    #[error("replayed message")]
    Replay,
}

impl WireError {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Auth => "auth",
            Self::Stale => "stale",
            Self::Replay => "replay",
        }
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A fresh envelope for `msg`.
pub fn envelope(msg: Message) -> Envelope {
    Envelope {
        nonce: rand::random(),
        sent_ms: now_ms(),
        msg,
    }
}

/// Encodes `env` as a frame (length prefix included), authenticated with `key`.
pub fn encode(key: &Key, env: &Envelope) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(MAGIC);
    b.push(env.msg.kind());
    b.extend_from_slice(&env.nonce);
    b.extend_from_slice(&env.sent_ms.to_be_bytes());
    match &env.msg {
        Message::Offer(o) => {
            put_flow(&mut b, o.flow());
            let t = &o.tcp;
            for v in [t.snd_seq, t.rcv_seq, t.mss, t.timestamp] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            b.extend_from_slice(&[t.snd_wscale, t.rcv_wscale, t.options]);
            let w = &t.window;
            for v in [w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            b.extend_from_slice(&o.fe_port.to_be_bytes());
            b.extend_from_slice(&o.be.ip().octets());
            b.extend_from_slice(&o.be.port().to_be_bytes());
            b.extend_from_slice(&o.app_port.to_be_bytes());
            b.extend_from_slice(&o.timeout_ms.to_be_bytes());
            b.extend_from_slice(&(o.data.len() as u32).to_be_bytes());
            b.extend_from_slice(&o.data);
        }
        Message::Ready(n) | Message::Go(n) => b.extend_from_slice(n),
        Message::Refused(n, r) => {
            b.extend_from_slice(n);
            b.push(*r as u8);
        }
        Message::Closed(flows) | Message::Alive(flows) => {
            let n = flows.len().min(MAX_ALIVE);
            b.extend_from_slice(&(n as u16).to_be_bytes());
            for f in &flows[..n] {
                put_flow(&mut b, *f);
            }
        }
    }
    let mut mac = key.0.clone();
    mac.update(&b[4..]);
    b.extend_from_slice(&mac.finalize().into_bytes());
    let len = (b.len() - 4) as u32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    b
}

fn put_flow(b: &mut Vec<u8>, f: Flow) {
    for a in [f.client, f.local] {
        b.extend_from_slice(&a.ip().octets());
        b.extend_from_slice(&a.port().to_be_bytes());
    }
}

/// Reads the length prefix of a frame: how many bytes of message follow.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if !(HEADER_LEN + MAC_LEN..=MAX_MESSAGE).contains(&len) {
        return Err(WireError::Malformed);
    }
    Ok(len)
}

/// Verifies and decodes one message (the bytes after the length prefix). Checks the
/// HMAC first, then the clock window (`now_ms` is the receiver's clock); replays are
/// the caller's [`ReplayGuard`]'s business.
pub fn decode(key: &Key, msg: &[u8], now_ms: u64) -> Result<Envelope, WireError> {
    if msg.len() < HEADER_LEN + MAC_LEN || msg.len() > MAX_MESSAGE {
        return Err(WireError::Malformed);
    }
    let (body, tag) = msg.split_at(msg.len() - MAC_LEN);
    let mut mac = key.0.clone();
    mac.update(body);
    mac.verify_slice(tag).map_err(|_| WireError::Auth)?;
    let mut r = Reader(body);
    if r.take(4)? != MAGIC {
        return Err(WireError::Malformed);
    }
    let kind = r.u8()?;
    let nonce = r.array::<16>()?;
    let sent_ms = r.u64()?;
    if sent_ms.abs_diff(now_ms) > MAX_SKEW.as_millis() as u64 {
        return Err(WireError::Stale);
    }
    let msg = match kind {
        1 => {
            let flow = r.flow()?;
            let (snd_seq, rcv_seq, mss, timestamp) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
            let (snd_wscale, rcv_wscale, options) = (r.u8()?, r.u8()?, r.u8()?);
            let window = RepairWindow {
                snd_wl1: r.u32()?,
                snd_wnd: r.u32()?,
                max_window: r.u32()?,
                rcv_wnd: r.u32()?,
                rcv_wup: r.u32()?,
            };
            let fe_port = r.u16()?;
            let be = r.addr()?;
            let app_port = r.u16()?;
            let timeout_ms = r.u32()?;
            let len = r.u32()? as usize;
            let data = r.take(len)?.to_vec();
            Message::Offer(Offer {
                tcp: TcpState {
                    local: flow.local,
                    peer: flow.client,
                    snd_seq,
                    rcv_seq,
                    mss,
                    snd_wscale,
                    rcv_wscale,
                    options,
                    timestamp,
                    window,
                },
                fe_port,
                be,
                app_port,
                timeout_ms,
                data,
            })
        }
        2 => Message::Ready(r.array()?),
        3 => {
            let n = r.array()?;
            let reason = Refusal::from_u8(r.u8()?).ok_or(WireError::Malformed)?;
            Message::Refused(n, reason)
        }
        4 => Message::Go(r.array()?),
        5 | 6 => {
            let n = usize::from(r.u16()?);
            if n > MAX_ALIVE {
                return Err(WireError::Malformed);
            }
            let flows = (0..n).map(|_| r.flow()).collect::<Result<_, _>>()?;
            if kind == 5 {
                Message::Closed(flows)
            } else {
                Message::Alive(flows)
            }
        }
        _ => return Err(WireError::Malformed),
    };
    if !r.0.is_empty() {
        return Err(WireError::Malformed);
    }
    Ok(Envelope {
        nonce,
        sent_ms,
        msg,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Malformed);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn addr(&mut self) -> Result<SocketAddrV4, WireError> {
        let ip = Ipv4Addr::from(self.array::<4>()?);
        Ok(SocketAddrV4::new(ip, self.u16()?))
    }

    fn flow(&mut self) -> Result<Flow, WireError> {
        Ok(Flow {
            client: self.addr()?,
            local: self.addr()?,
        })
    }
}

/// Remembers the nonces of accepted messages for as long as their timestamps could
/// still pass the clock check, and refuses any nonce seen again.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    nonces: HashMap<[u8; 16], u64>,
    pruned_ms: u64,
}

impl ReplayGuard {
    /// Records `env`'s nonce; `Err(Replay)` if it was seen before. Entries older than
    /// the clock window are pruned as it goes.
    pub fn check(&self, env: &Envelope, now_ms: u64) -> Result<(), WireError> {
        let window = MAX_SKEW.as_millis() as u64;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        // A message older than the window fails the clock check, so its nonce can go;
        // sweeping at most once a second keeps each check O(1) on average.
        if now_ms.saturating_sub(seen.pruned_ms) >= 1000 {
            seen.nonces
                .retain(|_, sent| sent.saturating_add(window) >= now_ms);
            seen.pruned_ms = now_ms;
        }
        match seen.nonces.entry(env.nonce) {
            std::collections::hash_map::Entry::Occupied(_) => Err(WireError::Replay),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(env.sent_ms);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        Key::new(&[b; 32]).unwrap()
    }

    fn offer() -> Message {
        Message::Offer(Offer {
            tcp: TcpState {
                local: "10.0.0.2:80".parse().unwrap(),
                peer: "10.0.0.1:40000".parse().unwrap(),
                snd_seq: 1,
                rcv_seq: 2,
                mss: 1448,
                snd_wscale: 7,
                rcv_wscale: 9,
                options: 7,
                timestamp: 12345,
                window: RepairWindow {
                    snd_wl1: 3,
                    snd_wnd: 4,
                    max_window: 5,
                    rcv_wnd: 6,
                    rcv_wup: 7,
                },
            },
            fe_port: 15010,
            be: "10.0.0.3:15010".parse().unwrap(),
            app_port: 8080,
            timeout_ms: 50,
            data: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        })
    }

    fn all() -> Vec<Message> {
        let flow = Flow {
            client: "10.0.0.1:1".parse().unwrap(),
            local: "10.0.0.2:2".parse().unwrap(),
        };
        vec![
            offer(),
            Message::Ready([1; 16]),
            Message::Refused([2; 16], Refusal::Cidr),
            Message::Go([3; 16]),
            Message::Closed(vec![flow]),
            Message::Alive(vec![flow, flow]),
            Message::Alive(vec![]),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for msg in all() {
            let env = envelope(msg);
            let frame = encode(&key(1), &env);
            let len = frame_len(frame[..4].try_into().unwrap()).unwrap();
            assert_eq!(len, frame.len() - 4);
            assert_eq!(decode(&key(1), &frame[4..], env.sent_ms).unwrap(), env);
        }
    }

    #[test]
    fn a_wrong_key_or_any_flipped_bit_fails_authentication() {
        let env = envelope(offer());
        let frame = encode(&key(1), &env);
        assert_eq!(
            decode(&key(2), &frame[4..], env.sent_ms),
            Err(WireError::Auth)
        );
        for i in 4..frame.len() {
            let mut f = frame.clone();
            f[i] ^= 0x40;
            assert_eq!(
                decode(&key(1), &f[4..], env.sent_ms),
                Err(WireError::Auth),
                "bit flip at {i}"
            );
        }
    }

    #[test]
    fn old_and_future_messages_are_stale() {
        let env = envelope(Message::Go([0; 16]));
        let frame = encode(&key(1), &env);
        let skew = MAX_SKEW.as_millis() as u64;
        assert!(decode(&key(1), &frame[4..], env.sent_ms + skew).is_ok());
        assert_eq!(
            decode(&key(1), &frame[4..], env.sent_ms + skew + 1),
            Err(WireError::Stale)
        );
        assert_eq!(
            decode(&key(1), &frame[4..], env.sent_ms - skew - 1),
            Err(WireError::Stale)
        );
    }

    #[test]
    fn a_nonce_is_accepted_once() {
        let guard = ReplayGuard::default();
        let env = envelope(offer());
        assert_eq!(guard.check(&env, env.sent_ms), Ok(()));
        assert_eq!(guard.check(&env, env.sent_ms), Err(WireError::Replay));
        assert_eq!(guard.check(&envelope(offer()), env.sent_ms), Ok(()));
    }

    /// Clocks apart by up to the window: a message is accepted once, and every later
    /// copy is refused — as a replay while it is fresh, as stale after — however the
    /// guard prunes in between.
    #[test]
    fn skewed_messages_are_accepted_once_and_never_again() {
        let k = key(1);
        let skew = MAX_SKEW.as_millis() as u64;
        for offset in [skew - 1, skew / 2, 0] {
            for ahead in [true, false] {
                let guard = ReplayGuard::default();
                let env = envelope(offer());
                let frame = encode(&k, &env);
                // The receiver's clock, `offset` ahead of or behind the sender's.
                let now = if ahead {
                    env.sent_ms + offset
                } else {
                    env.sent_ms - offset
                };
                let got = decode(&k, &frame[4..], now).unwrap();
                assert_eq!(guard.check(&got, now), Ok(()), "{offset} ms, ahead {ahead}");
                for later in (1..=2 * skew + 2000).step_by(250) {
                    let t = now + later;
                    let refused = match decode(&k, &frame[4..], t) {
                        Err(e) => e,
                        Ok(again) => guard.check(&again, t).unwrap_err(),
                    };
                    assert!(
                        matches!(refused, WireError::Replay | WireError::Stale),
                        "{offset} ms, ahead {ahead}, {later} ms later: {refused:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_refusal_reason_has_a_metric_label() {
        let reasons = [
            Refusal::Cidr,
            Refusal::Restore,
            Refusal::Table,
            Refusal::Busy,
            Refusal::Target,
            Refusal::App,
            Refusal::Late,
        ];
        for r in reasons {
            assert!(
                crate::metrics::REFUSAL_REASONS.contains(&r.as_str()),
                "{r:?}"
            );
            assert_eq!(Refusal::from_u8(r as u8), Some(r));
        }
        for e in [
            WireError::Malformed,
            WireError::Auth,
            WireError::Stale,
            WireError::Replay,
        ] {
            assert!(
                crate::metrics::REFUSAL_REASONS.contains(&e.as_str()),
                "{e:?}"
            );
        }
    }

    #[test]
    fn short_keys_and_bad_lengths_are_refused() {
        assert!(Key::new(&[0; 31]).is_err());
        assert_eq!(frame_len([0, 0, 0, 3]), Err(WireError::Malformed));
        assert_eq!(frame_len([0, 0x10, 0, 0]), Err(WireError::Malformed));
    }

    /// The decoder never panics on arbitrary or truncated input, including validly
    /// authenticated but malformed bodies (what the fuzz target explores at length).
    #[test]
    fn decoding_garbage_never_panics() {
        let k = key(1);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for msg in all() {
            let env = envelope(msg);
            let frame = encode(&k, &env);
            for cut in 0..frame.len() {
                let _ = decode(&k, &frame[4..cut.max(4)], env.sent_ms);
            }
        }
        for _ in 0..20_000 {
            let len = (next() % 200) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = decode(&k, &bytes, 0);
            // A correctly signed body with random contents must parse or be refused.
            let mut body = b"BTN1".to_vec();
            body.extend_from_slice(&bytes);
            let mut mac = k.0.clone();
            mac.update(&body);
            body.extend_from_slice(&mac.finalize().into_bytes());
            assert_ne!(decode(&k, &body, 0).err(), Some(WireError::Auth));
        }
    }
}
