//! Per-flow changes to baton's nftables sets, sent as nfnetlink batches.
//!
//! The static table (sets, map, chain and rules, see [`super::tables`]) is made once at
//! startup; per handoff only set elements change, and they change here — one
//! `sendmsg` of a batch and its acknowledgements, no process, no parsing. Batches are
//! atomic. Per handoff the FE makes one transaction, the redirect: its hold is a
//! socket filter on the frozen socket (`repair::hold`), which stays until the redirect
//! is committed, so no packet of the flow ever finds neither.
//!
//! Each worker thread keeps its own netlink socket (an operation is a few microseconds
//! of synchronous kernel work, with no await inside), so handoffs on different threads
//! never wait for each other.
//!
//! A BE's notices change the FE's `moved` map only where it maps the flow to that BE:
//! "alive" refreshes such an entry and never creates one, "closed" removes only such
//! an entry. Both read the element first (NFT_MSG_GETSETELEM); one lock orders these
//! read-then-write steps with each other and with new redirects, so a notice never
//! acts on an entry that changed under it.

use super::wire::Flow;
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};
use std::{
    cell::RefCell,
    io,
    net::Ipv4Addr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
/// Like DELSETELEM, but a missing element is not an error (Linux 6.3+).
const NFT_MSG_DESTROYSETELEM: u16 = 30;
const NFPROTO_NETDEV: u8 = 5;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_DATA_VALUE: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// The FE's set of flows being frozen: their packets are dropped.
pub const HELD: &str = "held";
/// The FE's map of moved flows to the BE that has them.
pub const MOVED: &str = "moved";
/// The BE's set of restored flows: their packets are marked for local delivery.
pub const RESTORED: &str = "restored";
/// FE: new connections that reused a moved flow's 4-tuple (filled by the packet path,
/// see `tables::ruleset`); they skip the redirect.
pub const FRESH: &str = "fresh";

/// Flows per refresh batch: two acknowledged messages each, and every acknowledgement
/// waits in the socket's receive buffer until the batch is sent (each costs far more
/// than its 36 bytes there), so a batch must stay well inside the default buffer.
const REFRESH_CHUNK: usize = 64;
/// Element lookups per `sendmsg`: their replies (an element and an acknowledgement
/// each) must fit in the socket's receive buffer at once.
const QUERY_CHUNK: usize = 32;

/// The `netdev` table baton's handoff sets live in.
#[derive(Clone, Debug)]
pub struct Tables {
    table: String,
    hold_ttl: Duration,
    flow_ttl: Duration,
    /// Orders the read-then-write changes of `moved` (see the module docs).
    moved: Arc<Mutex<()>>,
}

/// One element change.
enum Op {
    Add {
        set: &'static str,
        flow: Flow,
        data: Option<Ipv4Addr>,
        ttl: Duration,
    },
    Remove {
        set: &'static str,
        flow: Flow,
    },
}

impl Tables {
    /// Element operations on `table`; held flows expire after `hold_ttl`, moved and
    /// restored ones after `flow_ttl`.
    pub fn new(table: impl Into<String>, hold_ttl: Duration, flow_ttl: Duration) -> Self {
        Self {
            table: table.into(),
            hold_ttl,
            flow_ttl,
            moved: Arc::default(),
        }
    }

    /// Checks the per-flow path end to end: removes an element that is not there from
    /// every set (which only Linux 6.3+ accepts without an error).
    pub fn probe(&self) -> io::Result<()> {
        let flow = Flow {
            client: std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            local: std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        };
        self.apply(&[HELD, MOVED, RESTORED, FRESH].map(|set| Op::Remove { set, flow }))
    }

    /// FE: drop the flow's packets (the `held` set). The handoff holds a frozen
    /// socket with a socket filter instead (`repair::hold`: a `setsockopt`, not a
    /// transaction); the set stays for tools and for tables made by older batons.
    pub fn hold(&self, flow: Flow) -> io::Result<()> {
        self.apply(&[Op::Add {
            set: HELD,
            flow,
            data: None,
            ttl: self.hold_ttl,
        }])
    }

    /// FE: stop dropping (the handoff did not happen).
    pub fn release(&self, flow: Flow) -> io::Result<()> {
        self.apply(&[Op::Remove { set: HELD, flow }])
    }

    /// FE: redirect the flow to `be`: one transaction with one element. (The FE holds
    /// a frozen flow with a socket filter, `repair::hold`, so nothing of the hold is
    /// left to swap out here.)
    ///
    /// The flow leaves `fresh` in the same transaction: a connection that once reused
    /// a stale moved tuple and is now handed off itself must not skip its redirect.
    pub fn redirect(&self, flow: Flow, be: Ipv4Addr) -> io::Result<()> {
        let _moved = self.lock_moved();
        self.apply(&[
            Op::Remove { set: FRESH, flow },
            Op::Add {
                set: MOVED,
                flow,
                data: Some(be),
                ttl: self.flow_ttl,
            },
        ])
    }

    /// FE: the moved connection is gone (whichever BE it went to).
    pub fn forget_moved(&self, flow: Flow) -> io::Result<()> {
        let _moved = self.lock_moved();
        self.apply(&[Op::Remove { set: MOVED, flow }])
    }

    /// FE: the BE `be` says these moved connections are gone: removes the redirects
    /// of those that `moved` maps to `be` (another BE's flows, or a flow redirected
    /// anew, are not its to end). How many were removed.
    pub fn forget_moved_from(&self, flows: &[Flow], be: Ipv4Addr) -> io::Result<usize> {
        self.change_moved_of(flows, be, |flow| vec![Op::Remove { set: MOVED, flow }])
    }

    /// FE: the BE `be` says these moved connections are alive: keeps the redirects of
    /// those that `moved` maps to `be` from expiring, and creates none (a redirect
    /// that is gone stays gone: its connection was closed, or went elsewhere). Each
    /// element is replaced (destroy + add in one batch), which resets its timeout on
    /// any kernel. How many were refreshed.
    pub fn refresh_moved(&self, flows: &[Flow], be: Ipv4Addr) -> io::Result<usize> {
        self.change_moved_of(flows, be, |flow| {
            vec![
                Op::Remove { set: MOVED, flow },
                Op::Add {
                    set: MOVED,
                    flow,
                    data: Some(be),
                    ttl: self.flow_ttl,
                },
            ]
        })
    }

    /// Applies `ops` to each of `flows` that `moved` maps to `be`, looking up and
    /// changing a chunk at a time under the lock. How many flows matched.
    fn change_moved_of(
        &self,
        flows: &[Flow],
        be: Ipv4Addr,
        ops: impl Fn(Flow) -> Vec<Op>,
    ) -> io::Result<usize> {
        let mut changed = 0;
        for chunk in flows.chunks(QUERY_CHUNK) {
            let _moved = self.lock_moved();
            let mapped = self.moved_to(chunk)?;
            let theirs: Vec<Flow> = chunk
                .iter()
                .zip(mapped)
                .filter(|(_, to)| *to == Some(be))
                .map(|(&flow, _)| flow)
                .collect();
            if theirs.is_empty() {
                continue;
            }
            let batch: Vec<Op> = theirs.iter().flat_map(|&flow| ops(flow)).collect();
            self.apply(&batch)?;
            changed += theirs.len();
        }
        Ok(changed)
    }

    fn lock_moved(&self) -> MutexGuard<'_, ()> {
        self.moved.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where `moved` sends each of `flows` (`None`: no entry).
    pub fn moved_to(&self, flows: &[Flow]) -> io::Result<Vec<Option<Ipv4Addr>>> {
        let mut out = Vec::with_capacity(flows.len());
        for chunk in flows.chunks(QUERY_CHUNK) {
            let request = self.lookups(MOVED, chunk);
            let answers = with_socket(|s| s.query(&request, chunk.len()))?;
            for (flow, answer) in chunk.iter().zip(answers) {
                out.push(match answer {
                    Answer::Found(payload) => match element(&payload) {
                        Some((key, data)) if key == key_bytes(*flow) => data,
                        _ => {
                            return Err(io::Error::other(
                                "nftables answered a lookup with another element",
                            ))
                        }
                    },
                    Answer::Error(code) if code == libc::ENOENT => None,
                    Answer::Error(code) => return Err(io::Error::from_raw_os_error(code)),
                });
            }
        }
        Ok(out)
    }

    /// BE: keep the local delivery of `flows` from expiring.
    pub fn refresh_restored(&self, flows: &[Flow]) -> io::Result<()> {
        self.replace(RESTORED, flows, None)
    }

    /// Replaces the elements of `flows` in `set` (with `data`, for a map), in batches;
    /// a batch that fails does not stop the others (the first error is returned).
    fn replace(&self, set: &'static str, flows: &[Flow], data: Option<Ipv4Addr>) -> io::Result<()> {
        let mut first_error = None;
        for chunk in flows.chunks(REFRESH_CHUNK) {
            let ops: Vec<Op> = chunk
                .iter()
                .flat_map(|&flow| {
                    [
                        Op::Remove { set, flow },
                        Op::Add {
                            set,
                            flow,
                            data,
                            ttl: self.flow_ttl,
                        },
                    ]
                })
                .collect();
            if let Err(e) = self.apply(&ops) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// How long moved and restored entries live without a refresh.
    pub fn flow_ttl(&self) -> Duration {
        self.flow_ttl
    }

    /// BE: deliver the flow's packets to the local (restored) socket.
    pub fn deliver(&self, flow: Flow) -> io::Result<()> {
        self.apply(&[Op::Add {
            set: RESTORED,
            flow,
            data: None,
            ttl: self.flow_ttl,
        }])
    }

    /// BE: the restored connection is gone.
    pub fn forget_restored(&self, flow: Flow) -> io::Result<()> {
        self.apply(&[Op::Remove {
            set: RESTORED,
            flow,
        }])
    }

    fn apply(&self, ops: &[Op]) -> io::Result<()> {
        let batch = self.batch(ops);
        with_socket(|s| s.transact(&batch, ops.len()))
    }

    /// GETSETELEM requests for `flows` in `set`, sequence numbers 1, 2, ...
    fn lookups(&self, set: &str, flows: &[Flow]) -> Vec<u8> {
        let mut b = Msg::default();
        for (seq, flow) in (1..).zip(flows) {
            let start = b.message(
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM,
                NLM_F_REQUEST | NLM_F_ACK,
                seq,
                NFPROTO_NETDEV,
                0,
            );
            b.attr_str(NFTA_SET_ELEM_LIST_TABLE, &self.table);
            b.attr_str(NFTA_SET_ELEM_LIST_SET, set);
            let elements = b.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
            let elem = b.nest(NFTA_LIST_ELEM);
            let key = b.nest(NFTA_SET_ELEM_KEY);
            b.attr(NFTA_DATA_VALUE, &key_bytes(*flow));
            b.end(key);
            b.end(elem);
            b.end(elements);
            b.finish(start);
        }
        b.0
    }

    fn batch(&self, ops: &[Op]) -> Vec<u8> {
        let mut b = Msg::default();
        let res_id = NFNL_SUBSYS_NFTABLES;
        b.message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, 0, res_id);
        for (i, op) in ops.iter().enumerate() {
            let seq = i as u32 + 1;
            let (kind, flags, set, flow) = match op {
                Op::Add { set, flow, .. } => (
                    NFT_MSG_NEWSETELEM,
                    NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
                    *set,
                    *flow,
                ),
                Op::Remove { set, flow } => (
                    NFT_MSG_DESTROYSETELEM,
                    NLM_F_REQUEST | NLM_F_ACK,
                    *set,
                    *flow,
                ),
            };
            let start = b.message(
                (NFNL_SUBSYS_NFTABLES << 8) | kind,
                flags,
                seq,
                NFPROTO_NETDEV,
                0,
            );
            b.attr_str(NFTA_SET_ELEM_LIST_TABLE, &self.table);
            b.attr_str(NFTA_SET_ELEM_LIST_SET, set);
            let elements = b.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
            let elem = b.nest(NFTA_LIST_ELEM);
            let key = b.nest(NFTA_SET_ELEM_KEY);
            b.attr(NFTA_DATA_VALUE, &key_bytes(flow));
            b.end(key);
            if let Op::Add { data, ttl, .. } = op {
                if let Some(ip) = data {
                    let d = b.nest(NFTA_SET_ELEM_DATA);
                    b.attr(NFTA_DATA_VALUE, &ip.octets());
                    b.end(d);
                }
                let ms = ttl.as_millis().max(1) as u64;
                b.attr(NFTA_SET_ELEM_TIMEOUT, &ms.to_be_bytes());
            }
            b.end(elem);
            b.end(elements);
            b.finish(start);
        }
        b.message(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            ops.len() as u32 + 1,
            0,
            res_id,
        );
        b.0
    }
}

/// Runs `f` on this thread's netfilter socket (opened on first use, and again after
/// a failure: a failed socket may hold stale replies).
fn with_socket<T>(f: impl FnOnce(&mut NfSocket) -> io::Result<T>) -> io::Result<T> {
    thread_local! {
        static SOCKET: RefCell<Option<NfSocket>> = const { RefCell::new(None) };
    }
    SOCKET.with(|cell| {
        let mut cell = cell.borrow_mut();
        let sock = match cell.as_mut() {
            Some(s) => s,
            None => cell.insert(NfSocket::open()?),
        };
        let result = f(sock);
        if result.is_err() {
            *cell = None;
        }
        result
    })
}

/// The netlink attributes in `buf`: (type without flags, payload).
fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let h = buf.get(at..at + 4)?;
        let len = usize::from(u16::from_ne_bytes([h[0], h[1]]));
        let kind = u16::from_ne_bytes([h[2], h[3]]) & NLA_TYPE_MASK;
        if len < 4 {
            return None;
        }
        let value = buf.get(at + 4..at + len)?;
        at += (len + 3) & !3;
        Some((kind, value))
    })
}

fn attr(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).find(|(k, _)| *k == kind).map(|(_, v)| v)
}

/// The key and (for a map) the IPv4 data of the element in a NEWSETELEM message's
/// payload (nfgenmsg, then the element list).
fn element(payload: &[u8]) -> Option<([u8; 16], Option<Ipv4Addr>)> {
    let list = attr(payload.get(4..)?, NFTA_SET_ELEM_LIST_ELEMENTS)?;
    let elem = attr(list, NFTA_LIST_ELEM)?;
    let key = attr(attr(elem, NFTA_SET_ELEM_KEY)?, NFTA_DATA_VALUE)?;
    let key: [u8; 16] = key.try_into().ok()?;
    let data = match attr(elem, NFTA_SET_ELEM_DATA) {
        None => None,
        Some(d) => {
            let ip: [u8; 4] = attr(d, NFTA_DATA_VALUE)?.try_into().ok()?;
            Some(Ipv4Addr::from(ip))
        }
    };
    Some((key, data))
}

/// The set key `ip saddr . tcp sport . ip daddr . tcp dport` of the client's packets:
/// each field in network order, padded to 32-bit registers.
fn key_bytes(flow: Flow) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[0..4].copy_from_slice(&flow.client.ip().octets());
    k[4..6].copy_from_slice(&flow.client.port().to_be_bytes());
    k[8..12].copy_from_slice(&flow.local.ip().octets());
    k[12..14].copy_from_slice(&flow.local.port().to_be_bytes());
    k
}

/// A netlink message builder.
#[derive(Default)]
struct Msg(Vec<u8>);

impl Msg {
    /// Starts a message (nlmsghdr + nfgenmsg); returns its offset for [`Msg::finish`].
    fn message(&mut self, kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
        let start = self.0.len();
        self.0.extend_from_slice(&20u32.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(&flags.to_ne_bytes());
        self.0.extend_from_slice(&seq.to_ne_bytes());
        self.0.extend_from_slice(&0u32.to_ne_bytes());
        self.0.push(family);
        self.0.push(0); // NFNETLINK_V0
        self.0.extend_from_slice(&res_id.to_be_bytes());
        start
    }

    fn finish(&mut self, start: usize) {
        let len = (self.0.len() - start) as u32;
        self.0[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn attr(&mut self, kind: u16, value: &[u8]) {
        let len = 4 + value.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.pad();
    }

    fn attr_str(&mut self, kind: u16, value: &str) {
        let mut v = Vec::with_capacity(value.len() + 1);
        v.extend_from_slice(value.as_bytes());
        v.push(0);
        self.attr(kind, &v);
    }

    fn nest(&mut self, kind: u16) -> usize {
        let start = self.0.len();
        self.0.extend_from_slice(&0u16.to_ne_bytes());
        self.0
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        start
    }

    fn end(&mut self, start: usize) {
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        while self.0.len() % 4 != 0 {
            self.0.push(0);
        }
    }
}

/// A netfilter netlink socket.
struct NfSocket(Socket);

impl NfSocket {
    fn open() -> io::Result<Self> {
        let mut s = Socket::new(NETLINK_NETFILTER)?;
        s.bind_auto()?;
        Ok(Self(s))
    }

    /// Sends `batch` and reads the acknowledgement of each of its `expect` messages.
    /// nfnetlink handles a batch inside `sendmsg`, so the replies are already queued
    /// when it returns; a missing one is an error, never a wait.
    fn transact(&mut self, batch: &[u8], expect: usize) -> io::Result<()> {
        self.0.send(batch, 0)?;
        let mut acked = 0;
        let mut first_error = None;
        let mut buf = vec![0u8; 8192];
        while acked < expect {
            let n = match self.0.recv(&mut &mut buf[..], libc::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::other("nftables batch not acknowledged"))
                }
                Err(e) => return Err(e),
            };
            for m in messages(&buf[..n]) {
                if let Some(code) = m.error_code() {
                    acked += 1;
                    if code != 0 && first_error.is_none() {
                        first_error = Some(io::Error::from_raw_os_error(-code));
                    }
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Sends the `expect` requests in `msgs` (sequence numbers 1..=expect, each with
    /// NLM_F_ACK) and collects each one's answer: its data message, or its error.
    /// Like batches, these are answered inside `sendmsg`.
    fn query(&mut self, msgs: &[u8], expect: usize) -> io::Result<Vec<Answer>> {
        self.0.send(msgs, 0)?;
        let mut data: Vec<Option<Vec<u8>>> = vec![None; expect];
        let mut answers: Vec<Option<Answer>> = (0..expect).map(|_| None).collect();
        let mut acked = 0;
        let mut buf = vec![0u8; 8192];
        while acked < expect {
            let n = match self.0.recv(&mut &mut buf[..], libc::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::other("nftables lookup not answered"))
                }
                Err(e) => return Err(e),
            };
            for m in messages(&buf[..n]) {
                let slot = (m.seq as usize).checked_sub(1).filter(|&i| i < expect);
                if let Some(i) = slot {
                    if let Some(code) = m.error_code() {
                        if answers[i].is_none() {
                            acked += 1;
                        }
                        answers[i] = Some(match (code, data[i].take()) {
                            (0, Some(payload)) => Answer::Found(payload),
                            // Acknowledged without the element: not an answer.
                            (0, None) => Answer::Error(libc::EIO),
                            (code, _) => Answer::Error(-code),
                        });
                    } else if m.kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM {
                        data[i] = Some(m.payload.to_vec());
                    }
                }
            }
        }
        Ok(answers
            .into_iter()
            .map(|a| a.unwrap_or(Answer::Error(libc::EIO)))
            .collect())
    }
}

/// One netlink message of a datagram the kernel sent.
struct NlMsg<'a> {
    kind: u16,
    seq: u32,
    /// What follows the 16-byte header.
    payload: &'a [u8],
}

impl NlMsg<'_> {
    /// An `NLMSG_ERROR`'s code (0: an acknowledgement).
    fn error_code(&self) -> Option<i32> {
        if self.kind != NLMSG_ERROR {
            return None;
        }
        let code = self.payload.get(..4)?;
        Some(i32::from_ne_bytes([code[0], code[1], code[2], code[3]]))
    }
}

/// The netlink messages in `buf`, up to the first malformed header.
fn messages(buf: &[u8]) -> impl Iterator<Item = NlMsg<'_>> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let h = buf.get(at..at.checked_add(16)?)?;
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let kind = u16::from_ne_bytes([h[4], h[5]]);
        let seq = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
        let payload = buf
            .get(at + 16..at.checked_add(len)?)
            .filter(|_| len >= 16)?;
        at += (len + 3) & !3;
        Some(NlMsg { kind, seq, payload })
    })
}

/// The kernel's answer to one lookup.
enum Answer {
    /// The element (a NEWSETELEM message's payload).
    Found(Vec<u8>),
    /// The request failed with this errno (`ENOENT`: no such element).
    Error(i32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_matches_the_kernel_register_layout() {
        // What `nft --debug=netlink` prints for 10.0.0.1 . 1235 . 10.0.0.2 . 80.
        let flow = Flow {
            client: "10.0.0.1:1235".parse().unwrap(),
            local: "10.0.0.2:80".parse().unwrap(),
        };
        assert_eq!(
            key_bytes(flow),
            [10, 0, 0, 1, 0x04, 0xd3, 0, 0, 10, 0, 0, 2, 0, 80, 0, 0]
        );
    }

    /// A NEWSETELEM message as the kernel answers a lookup of `flow` in `moved`.
    fn answer(flow: Flow, be: Option<Ipv4Addr>) -> Vec<u8> {
        let mut b = Msg::default();
        let start = b.message(
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM,
            0,
            1,
            NFPROTO_NETDEV,
            0,
        );
        b.attr_str(NFTA_SET_ELEM_LIST_TABLE, "baton");
        b.attr_str(NFTA_SET_ELEM_LIST_SET, MOVED);
        let elements = b.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
        let elem = b.nest(NFTA_LIST_ELEM);
        let key = b.nest(NFTA_SET_ELEM_KEY);
        b.attr(NFTA_DATA_VALUE, &key_bytes(flow));
        b.end(key);
        if let Some(ip) = be {
            let d = b.nest(NFTA_SET_ELEM_DATA);
            b.attr(NFTA_DATA_VALUE, &ip.octets());
            b.end(d);
        }
        b.attr(NFTA_SET_ELEM_TIMEOUT, &60_000u64.to_be_bytes());
        b.end(elem);
        b.end(elements);
        b.finish(start);
        b.0[16..].to_vec()
    }

    #[test]
    fn a_lookup_answer_gives_the_element_and_where_it_goes() {
        let flow = Flow {
            client: "10.0.0.1:1".parse().unwrap(),
            local: "10.0.0.2:2".parse().unwrap(),
        };
        let be: Ipv4Addr = "10.0.0.3".parse().unwrap();
        assert_eq!(
            element(&answer(flow, Some(be))),
            Some((key_bytes(flow), Some(be)))
        );
        assert_eq!(element(&answer(flow, None)), Some((key_bytes(flow), None)));
        let whole = answer(flow, Some(be));
        for cut in 0..whole.len() - 8 {
            // Truncated answers are refused (or lack the data), never misread.
            assert_ne!(element(&whole[..cut]), Some((key_bytes(flow), Some(be))));
        }
    }

    #[test]
    fn lookups_are_numbered_from_one_and_carry_each_key() {
        let t = Tables::new("baton", Duration::from_secs(5), Duration::from_secs(60));
        let flows = [
            Flow {
                client: "10.0.0.1:1".parse().unwrap(),
                local: "10.0.0.2:2".parse().unwrap(),
            },
            Flow {
                client: "10.0.0.1:3".parse().unwrap(),
                local: "10.0.0.2:2".parse().unwrap(),
            },
        ];
        let b = t.lookups(MOVED, &flows);
        let mut at = 0;
        let mut seqs = vec![];
        while at < b.len() {
            let len = u32::from_ne_bytes(b[at..at + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(b[at + 4..at + 6].try_into().unwrap());
            let flags = u16::from_ne_bytes(b[at + 6..at + 8].try_into().unwrap());
            assert_eq!(kind, (10 << 8) | NFT_MSG_GETSETELEM);
            assert_eq!(flags, NLM_F_REQUEST | NLM_F_ACK);
            seqs.push(u32::from_ne_bytes(b[at + 8..at + 12].try_into().unwrap()));
            let (key, data) = element(&b[at + 16..at + len]).unwrap();
            assert_eq!(key, key_bytes(flows[seqs.len() - 1]));
            assert_eq!(data, None);
            at += len;
        }
        assert_eq!(seqs, [1, 2]);
    }

    #[test]
    fn a_batch_frames_every_message_and_nests_the_element() {
        let t = Tables::new("baton", Duration::from_secs(5), Duration::from_secs(60));
        let flow = Flow {
            client: "10.0.0.1:1".parse().unwrap(),
            local: "10.0.0.2:2".parse().unwrap(),
        };
        let b = t.batch(&[
            Op::Add {
                set: MOVED,
                flow,
                data: Some("10.0.0.3".parse().unwrap()),
                ttl: Duration::from_secs(60),
            },
            Op::Remove { set: HELD, flow },
        ]);
        // Walk the messages: begin, two element messages, end, lengths consistent.
        let mut at = 0;
        let mut kinds = vec![];
        while at < b.len() {
            let len = u32::from_ne_bytes(b[at..at + 4].try_into().unwrap()) as usize;
            kinds.push(u16::from_ne_bytes(b[at + 4..at + 6].try_into().unwrap()));
            assert_eq!(len % 4, 0);
            at += len;
        }
        assert_eq!(at, b.len());
        assert_eq!(
            kinds,
            [
                NFNL_MSG_BATCH_BEGIN,
                (10 << 8) | NFT_MSG_NEWSETELEM,
                (10 << 8) | NFT_MSG_DESTROYSETELEM,
                NFNL_MSG_BATCH_END
            ]
        );
        // The timeout (60000 ms, big-endian) is in the add.
        let ms = 60_000u64.to_be_bytes();
        assert!(b.windows(8).any(|w| w == ms));
    }
}
