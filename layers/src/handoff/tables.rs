//! The static kernel plumbing, installed once at startup: the `baton` netdev table
//! (sets, map, ingress chain) and, for the BE role, the policy route that delivers
//! marked packets locally.
//!
//! Installing is idempotent and keeps existing elements: a restarted baton finds the
//! flows it moved before still redirected (their connections live on at the BEs), and
//! only the chain's rules are rewritten, in the same atomic transaction. This runs the
//! `nft` and `ip` tools once; per-flow changes never do (see [`super::nft`]).

use ipnet::Ipv4Net;
use std::{
    io::Write,
    process::{Command, Stdio},
};

/// The table's name (family `netdev`).
pub const TABLE: &str = "baton";
/// The mark of packets for restored flows (distinct from the TPROXY capture's).
pub const MARK: u32 = 0x0001_0000;
/// The policy routing table (and rule priority) delivering marked packets locally.
pub const ROUTE_TABLE: u32 = 15010;

/// The ruleset for `interface`, as an `nft -f` script. `fresh_ttl` bounds how long a
/// new connection that reused a moved flow's 4-tuple is kept off the redirect (see
/// below); it must be at least the moved entries' lifetime.
///
/// A SYN whose 4-tuple is in `moved` starts a new connection: the client is done with
/// the moved one, whatever the map says (a backend that crashed never said "closed",
/// and a busy client reuses its ports long before `BATON_HANDOFF_FLOW_TTL`). Its flow
/// goes into the dynamic set `fresh`, and flows in `fresh` skip the redirect, so the
/// new connection reaches this host's stack instead of a backend that has nothing for
/// it. (The kernel cannot delete map elements from the packet path, hence a set.)
pub fn ruleset(interface: &str, fresh_ttl: std::time::Duration) -> String {
    let key = "ipv4_addr . inet_service . ipv4_addr . inet_service";
    let flow = "ip saddr . tcp sport . ip daddr . tcp dport";
    let dev = interface.replace('"', "");
    let fresh = fresh_ttl.as_secs().max(1);
    format!(
        "add table netdev {TABLE}
add set netdev {TABLE} held {{ type {key} ; flags timeout ; }}
add map netdev {TABLE} moved {{ type {key} : ipv4_addr ; flags timeout ; }}
add set netdev {TABLE} restored {{ type {key} ; flags timeout ; }}
add set netdev {TABLE} fresh {{ type {key} ; flags dynamic, timeout ; timeout {fresh}s ; }}
add chain netdev {TABLE} ingress {{ type filter hook ingress device \"{dev}\" priority -150 ; policy accept ; }}
flush chain netdev {TABLE} ingress
add rule netdev {TABLE} ingress ip protocol tcp {flow} @held drop
add rule netdev {TABLE} ingress ip protocol tcp tcp flags & (syn | ack) == syn {flow} @moved add @fresh {{ {flow} }}
add rule netdev {TABLE} ingress ip protocol tcp {flow} @fresh accept
add rule netdev {TABLE} ingress ip protocol tcp fwd ip to {flow} map @moved device \"{dev}\"
add rule netdev {TABLE} ingress ip protocol tcp {flow} @restored meta mark set meta mark | {MARK:#x}
"
    )
}

/// Runs `cmd args` (with `stdin` fed to it), returning its output, or an error naming
/// the command and what it printed. For one-time setup only, never per request.
pub fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| format!("{cmd}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Installs (or re-installs, keeping elements) the table on `interface` and the local
/// delivery route; `flow_ttl` is the moved entries' lifetime. Returns whether the
/// table existed already.
pub fn install(interface: &str, flow_ttl: std::time::Duration) -> Result<bool, String> {
    let existed = run("nft", &["list", "table", "netdev", TABLE], None).is_ok();
    run("nft", &["-f", "-"], Some(&ruleset(interface, flow_ttl)))?;
    let mark = format!("{MARK:#x}/{MARK:#x}");
    let table = ROUTE_TABLE.to_string();
    let rules = run("ip", &["-4", "rule", "show", "pref", &table], None)?;
    if !rules.contains(&format!("lookup {table}")) {
        run(
            "ip",
            &[
                "-4", "rule", "add", "pref", &table, "fwmark", &mark, "lookup", &table,
            ],
            None,
        )?;
    }
    run(
        "ip",
        &[
            "-4",
            "route",
            "replace",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            &table,
        ],
        None,
    )?;
    Ok(existed)
}

/// The flows in this host's `restored` set: the moved connections a backend baton
/// that ran here before took (read once, at startup, with `nft -j`).
pub fn restored_flows() -> Result<Vec<super::wire::Flow>, String> {
    let out = run(
        "nft",
        &["-j", "list", "set", "netdev", TABLE, "restored"],
        None,
    )?;
    parse_restored(&out)
}

/// The flows of `nft -j list set` output (elements with or without their timeouts;
/// unreadable ones skipped).
fn parse_restored(json: &str) -> Result<Vec<super::wire::Flow>, String> {
    use serde_json::Value;
    let v: Value = serde_json::from_str(json).map_err(|e| format!("nft -j output: {e}"))?;
    let elems = v["nftables"]
        .as_array()
        .and_then(|items| items.iter().find_map(|i| i["set"]["elem"].as_array()))
        .cloned()
        .unwrap_or_default();
    let addr = |key: &[Value], i: usize| -> Option<std::net::SocketAddrV4> {
        let ip = key.get(i)?.as_str()?.parse().ok()?;
        let port = u16::try_from(key.get(i + 1)?.as_u64()?).ok()?;
        Some(std::net::SocketAddrV4::new(ip, port))
    };
    // An element this cannot read is left to its timeout rather than losing the rest.
    Ok(elems
        .iter()
        .filter_map(|e| {
            // An element with a timeout is {"elem": {"val": {"concat": ...}, ...}}.
            let key = e["elem"]["val"]["concat"]
                .as_array()
                .or_else(|| e["concat"].as_array())?;
            Some(super::wire::Flow {
                client: addr(key, 0)?,
                local: addr(key, 2)?,
            })
        })
        .collect())
}

/// The interface of the IPv4 default route.
pub fn default_interface() -> Result<String, String> {
    let routes = std::fs::read_to_string("/proc/net/route")
        .map_err(|e| format!("cannot read /proc/net/route: {e}"))?;
    routes
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[1] == "00000000")
        .map(|f| f[0].to_string())
        .ok_or_else(|| "no IPv4 default route".to_string())
}

/// The IPv4 addresses of `interface`, with their prefix lengths, in `ip`'s order.
pub fn interface_addrs(interface: &str) -> Result<Vec<Ipv4Net>, String> {
    let out = run("ip", &["-o", "-4", "addr", "show", "dev", interface], None)?;
    let addrs: Vec<Ipv4Net> = out
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.parse::<Ipv4Net>().ok()
        })
        .collect();
    if addrs.is_empty() {
        return Err(format!("{interface} has no IPv4 address"));
    }
    Ok(addrs)
}

/// The IPv4 networks of `interface`.
pub fn interface_nets(interface: &str) -> Result<Vec<Ipv4Net>, String> {
    Ok(interface_addrs(interface)?
        .into_iter()
        .map(|n| n.trunc())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restored_flows_are_read_from_nft_json_with_and_without_timeouts() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"set": {"family": "netdev", "name": "restored", "table": "baton",
             "type": ["ipv4_addr", "inet_service", "ipv4_addr", "inet_service"],
             "handle": 3, "flags": ["timeout"], "elem": [
               {"elem": {"val": {"concat": ["10.0.0.1", 40000, "10.0.0.2", 15006]}, "timeout": 3600, "expires": 3590}},
               {"concat": ["10.0.0.3", 1, "10.0.0.2", 8080]}]}}]}"#;
        let flows = parse_restored(json).unwrap();
        assert_eq!(
            flows,
            [
                super::super::wire::Flow {
                    client: "10.0.0.1:40000".parse().unwrap(),
                    local: "10.0.0.2:15006".parse().unwrap(),
                },
                super::super::wire::Flow {
                    client: "10.0.0.3:1".parse().unwrap(),
                    local: "10.0.0.2:8080".parse().unwrap(),
                },
            ]
        );
        let empty = r#"{"nftables": [{"set": {"family": "netdev", "name": "restored", "table": "baton"}}]}"#;
        assert!(parse_restored(empty).unwrap().is_empty());
        let bad = r#"{"nftables": [{"set": {"elem": [{"concat": ["x", 1]}, {"concat": ["10.0.0.3", 1, "10.0.0.2", 8080]}]}}]}"#;
        assert_eq!(
            parse_restored(bad).unwrap().len(),
            1,
            "the readable element is kept"
        );
        assert!(parse_restored("not json").is_err());
    }

    #[test]
    fn the_ruleset_keys_every_set_by_the_full_four_tuple() {
        let r = ruleset("eth0", std::time::Duration::from_secs(3600));
        assert!(r.contains("device \"eth0\""));
        assert_eq!(
            r.matches("ipv4_addr . inet_service . ipv4_addr . inet_service")
                .count(),
            4
        );
        // A SYN reusing a moved flow's tuple keeps its connection off the redirect,
        // for as long as a moved entry can live.
        let syn = r.find("== syn").unwrap();
        let fresh = r.find("@fresh accept").unwrap();
        let fwd = r.find("fwd ip to").unwrap();
        assert!(syn < fresh && fresh < fwd, "{r}");
        assert!(r.contains("timeout 3600s"), "{r}");
        assert!(
            r.contains("flush chain netdev baton ingress"),
            "rules are rewritten, elements kept"
        );
        assert!(
            !r.contains("flush table"),
            "elements must survive a restart"
        );
    }
}
