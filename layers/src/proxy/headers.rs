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

/// Removes hop-by-hop headers, including any named in any `Connection` line. `TE`
/// survives only as `te: trailers` (gRPC needs it end to end, HTTP/2 allows nothing
/// else); any other `TE` is dropped.
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
    let listed: Vec<HeaderName> = tokens(headers, header::CONNECTION)
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if headers.contains_key(header::TE) {
        let trailers_only = tokens(headers, header::TE).all(|t| t.eq_ignore_ascii_case("trailers"));
        headers.remove(header::TE);
        if trailers_only {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// The comma-separated tokens of every `name` line, trimmed (a line that is not
/// visible ASCII counts as one empty token).
fn tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(str::trim)
}

/// Whether an HTTP/1 request leaves its connection open for another request:
/// HTTP/1.1 unless `Connection: close`, HTTP/1.0 only with `Connection: keep-alive`.
pub fn keeps_alive(version: http::Version, headers: &HeaderMap) -> bool {
    let has =
        |want: &str| tokens(headers, header::CONNECTION).any(|t| t.eq_ignore_ascii_case(want));
    match version {
        http::Version::HTTP_11 => !has("close"),
        http::Version::HTTP_10 => has("keep-alive"),
        _ => false,
    }
}

/// The protocol an HTTP/1 message asks to switch to (`Upgrade`, with `upgrade` listed
/// in `Connection`), e.g. `websocket`.
pub fn upgrade_of(headers: &HeaderMap) -> Option<HeaderValue> {
    let asked = tokens(headers, header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade"));
    asked
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// Marks a message as an upgrade to `protocol` (after hop-by-hop removal took the
/// original headers away).
pub fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
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

/// Joins every existing value of `name` and `value` into one comma-separated line, as
/// proxies conventionally do (RFC 9110 §5.3 makes the forms equivalent).
fn append(headers: &mut HeaderMap, name: HeaderName, value: &HeaderValue) {
    match headers.entry(name) {
        header::Entry::Vacant(e) => {
            e.insert(value.clone());
        }
        header::Entry::Occupied(mut e) => {
            let mut joined = Vec::new();
            for v in e.iter() {
                joined.extend_from_slice(v.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(value.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                e.insert(v);
            }
        }
    }
}

/// Joins `cookie` lines into one, as HTTP/2 requests may split them but HTTP/1
/// requires a single line (RFC 9113 §8.2.3).
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (cookies.next(), cookies.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for v in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
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
        grpc.insert("te", "Trailers".parse().unwrap());
        remove_hop_by_hop(&mut grpc);
        assert_eq!(grpc["te"], "trailers", "kept, lower-cased for HTTP/2");
    }

    #[test]
    fn every_connection_line_counts() {
        let mut h = HeaderMap::new();
        h.append("connection", "keep-alive".parse().unwrap());
        h.append("connection", "x-hop".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.append("te", "trailers".parse().unwrap());
        h.append("te", "gzip".parse().unwrap());
        remove_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn cookies_are_joined_for_http1() {
        let mut h = HeaderMap::new();
        h.append("cookie", "a=1".parse().unwrap());
        h.append("cookie", "b=2".parse().unwrap());
        join_cookies(&mut h);
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["cookie"], "a=1; b=2");
        let mut one = HeaderMap::new();
        one.insert("cookie", "a=1".parse().unwrap());
        join_cookies(&mut one);
        assert_eq!(one["cookie"], "a=1");
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
        h.append("x-forwarded-for", "192.0.2.1".parse().unwrap());
        h.append("x-forwarded-for", "192.0.2.2".parse().unwrap());
        add_forwarded(&mut h, &client);
        assert_eq!(h["x-forwarded-for"], "192.0.2.1, 192.0.2.2, 10.0.0.9");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    }
}
