//! Header rules of a proxy (RFC 9110 §7.6.1): hop-by-hop headers are removed in both
//! directions, forwarding headers are added to requests.

use crate::target::ClientInfo;
use http::{header, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including any named in `Connection`. `TE: trailers` is
/// kept (gRPC needs it end to end); other `TE` values are dropped.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names first: most messages carry no hop-by-hop header at all,
    // and a scan of standard names is much cheaper than nine hashed removals.
    if !headers
        .keys()
        .any(|name| HOP_BY_HOP.contains(name) || name == header::TE)
    {
        return;
    }
    // Headers listed in `Connection` are hop-by-hop too; usually there are none, so
    // only allocate when there are.
    if let Some(listed) = headers.get(header::CONNECTION) {
        let names: Vec<HeaderName> = listed
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for name in names {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if let Some(te) = headers.get(header::TE) {
        if te.as_bytes().eq_ignore_ascii_case(b"trailers") {
            return;
        }
        headers.remove(header::TE);
    }
}

/// Appends the client to `x-forwarded-for` and `forwarded`.
pub fn add_forwarded(headers: &mut HeaderMap, client: &ClientInfo) {
    append(
        headers,
        HeaderName::from_static("x-forwarded-for"),
        &client.x_forwarded_for,
    );
    append(headers, header::FORWARDED, &client.forwarded);
}

fn append(headers: &mut HeaderMap, name: HeaderName, value: &HeaderValue) {
    match headers.entry(name) {
        header::Entry::Vacant(e) => {
            e.insert(value.clone());
        }
        header::Entry::Occupied(mut e) => {
            // Join into one comma-separated line, as proxies conventionally do.
            let mut joined = Vec::with_capacity(e.get().len() + 2 + value.len());
            joined.extend_from_slice(e.get().as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(value.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                e.insert(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Accept;

    #[test]
    fn removes_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-private".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("te", "gzip".parse().unwrap());
        h.insert("x-kept", "yes".parse().unwrap());
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
        let mut grpc = HeaderMap::new();
        grpc.insert("te", "trailers".parse().unwrap());
        remove_hop_by_hop(&mut grpc);
        assert_eq!(grpc["te"], "trailers");
    }

    #[test]
    fn appends_forwarding_headers() {
        let client = ClientInfo::new(Accept {
            client: "10.0.0.9:1234".parse().unwrap(),
            orig_dst: "10.0.0.1:80".parse().unwrap(),
        });
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, &client);
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert_eq!(h["forwarded"], "for=10.0.0.9;proto=http");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "192.0.2.1".parse().unwrap());
        add_forwarded(&mut h, &client);
        assert_eq!(h["x-forwarded-for"], "192.0.2.1, 10.0.0.9");
    }
}
