//! The typed targets stacks are built for: an accepted connection ([`Accept`]), a
//! logical service ([`Logical`]) and one instance of it ([`Endpoint`]).

use crate::new_service::Param;
use http::HeaderValue;
use serde::Serialize;
use std::{fmt, net::SocketAddr, str::FromStr, sync::Arc};

/// An accepted client connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accept {
    /// The client's address.
    pub client: SocketAddr,
    /// Where the client meant to connect: the listener's address in `plain` mode, the
    /// captured destination in `tproxy` and `redirect` modes.
    pub orig_dst: SocketAddr,
}

/// Facts about a client connection, attached to every request on it so that layers
/// can read them. The forwarding header values are formatted once per connection.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    /// The connection.
    pub accept: Accept,
    /// The client's IP, as an `x-forwarded-for` element.
    pub x_forwarded_for: HeaderValue,
    /// `for=<client>;proto=http`, as a `forwarded` element (RFC 7239).
    pub forwarded: HeaderValue,
}

impl ClientInfo {
    /// Formats the forwarding values for `accept`.
    pub fn new(accept: Accept) -> Self {
        let ip = accept.client.ip();
        let node = match ip {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            // RFC 7239 §6: IPv6 nodes are quoted and bracketed.
            std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        let value = |s: String| {
            HeaderValue::from_maybe_shared(bytes::Bytes::from(s))
                .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
        };
        Self {
            accept,
            x_forwarded_for: value(ip.to_string()),
            forwarded: value(format!("for={node};proto=http")),
        }
    }
}

/// How traffic to a logical service is carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1 or HTTP/2 requests.
    Http,
    /// Opaque TCP byte streams.
    Opaque,
}

/// Load-balancing algorithm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lb {
    /// Power of two choices over PeakEWMA load.
    #[default]
    P2c,
    /// Round-robin over ready endpoints.
    Rr,
    /// Consistent hashing (Maglev) of a request key.
    Hash,
}

impl FromStr for Lb {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "p2c" => Ok(Self::P2c),
            "rr" => Ok(Self::Rr),
            "hash" => Ok(Self::Hash),
            _ => Err(()),
        }
    }
}

/// HTTP version spoken to upstream endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// The client's version: HTTP/1 in, HTTP/1 out; HTTP/2 in, HTTP/2 out.
    #[default]
    Auto,
    /// Always HTTP/1.1.
    Http1,
    /// Always HTTP/2 (prior knowledge).
    Http2,
}

impl FromStr for UpstreamProtocol {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "auto" => Ok(Self::Auto),
            "http1" => Ok(Self::Http1),
            "http2" => Ok(Self::Http2),
            _ => Err(()),
        }
    }
}

/// A logical service: what routing picks, and what one balancer serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Logical {
    /// The service name, as discovery knows it.
    pub service: Arc<str>,
    /// HTTP or opaque TCP.
    pub protocol: Protocol,
    /// The balancing algorithm for this service.
    pub lb: Lb,
    /// The HTTP version to speak upstream.
    pub upstream: UpstreamProtocol,
    /// For the reserved target [`LOCAL`]: the original destination, which is where the
    /// local application listens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<std::net::SocketAddr>,
}

/// The reserved route target "the local application at the original destination
/// port" (`BATON_ROUTES='*=local'`): an inbound sidecar needs no discovery at all.
pub const LOCAL: &str = "local";

impl Logical {
    /// Whether this is the reserved target [`LOCAL`].
    pub fn is_local(&self) -> bool {
        &*self.service == LOCAL
    }
}

impl crate::route::RouteTarget for Logical {
    /// `local` is bound to the original destination; every other target is unchanged.
    /// (One logical stack per destination, cached like any other service.)
    fn for_dst(&self, dst: std::net::SocketAddr) -> Self {
        let mut l = self.clone();
        if l.is_local() {
            l.dst = Some(dst);
        }
        l
    }
}

impl fmt::Display for Logical {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.service)
    }
}

/// One instance of a logical service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The service this endpoint belongs to.
    pub logical: Logical,
    /// The instance's identity within the service.
    pub id: Arc<str>,
    /// Where it accepts traffic.
    pub addr: SocketAddr,
    /// Its baton's handoff port, when it advertises one.
    pub handoff_port: Option<u16>,
    /// Relative weight (1 by default).
    pub weight: u32,
}

impl Param<SocketAddr> for Endpoint {
    fn param(&self) -> SocketAddr {
        self.addr
    }
}

impl Param<Logical> for Endpoint {
    fn param(&self) -> Logical {
        self.logical.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_info_formats_forwarding_values() {
        let v4 = ClientInfo::new(Accept {
            client: "10.1.2.3:5555".parse().unwrap(),
            orig_dst: "10.0.0.1:80".parse().unwrap(),
        });
        assert_eq!(v4.x_forwarded_for, "10.1.2.3");
        assert_eq!(v4.forwarded, "for=10.1.2.3;proto=http");
        let v6 = ClientInfo::new(Accept {
            client: "[fd00::1]:5555".parse().unwrap(),
            orig_dst: "[fd00::2]:80".parse().unwrap(),
        });
        assert_eq!(v6.x_forwarded_for, "fd00::1");
        assert_eq!(v6.forwarded, "for=\"[fd00::1]\";proto=http");
    }
}
