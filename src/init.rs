//! `baton init`: the kernel rules that capture a pod's inbound TCP for baton (TPROXY).
//!
//! Run once per pod, by an init container with CAP_NET_ADMIN, before the app and baton
//! start. It installs, idempotently:
//!
//! - the nftables table `inet baton_capture`, one prerouting chain (mangle priority):
//!   traffic arriving on `lo` is never captured (baton's own connections to the app go
//!   over loopback, so nothing loops); packets of flows baton already accepted (its
//!   transparent sockets) are marked for local delivery and skip everything else; then
//!   TCP to the pod's own addresses (`fib daddr type local`) on the captured ports,
//!   minus the excluded ones and baton's own (inbound, admin, handoff), goes to baton's
//!   inbound listener with `tproxy` and the mark; with `BATON_CAPTURE_FAIL=closed`
//!   (the default) a new connection that finds no baton listening (a restart, a
//!   crash) has its SYN dropped, so nothing reaches the app around baton and the
//!   client's retransmitted SYN lands once baton is back; `open` lets it through;
//! - policy routing for the mark: `ip rule fwmark MARK lookup TABLE` and a `local`
//!   default route in that table, which delivers the marked packets to the local
//!   socket.
//!
//! Mark, table and rule priority are distinct from the handoff's (`netdev baton`, mark
//! 0x10000, table/priority 15010), so both coexist. Re-running replaces the table in
//! one nft transaction and leaves an existing rule alone; `--cleanup` removes exactly
//! the table, the rule and the route (tagged with baton's routing protocol number, so an
//! identical rule or route of someone else's survives); `--dry-run` prints all of it.
//! IPv4 only.

use crate::config::{CaptureConfig, CaptureFail, ConfigError, Strings};
use baton_layers::handoff::tables::run;
use std::{fmt::Write, process::ExitCode};

/// The nftables table (family `inet`).
pub const TABLE: &str = "baton_capture";
/// The packet mark of captured flows (a bit of its own).
pub const MARK: u32 = 0x20000;
/// The routing table delivering marked packets locally, and the rule's priority.
pub const ROUTE_TABLE: u32 = 15006;

/// What `baton init` was asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Install (or re-install) the rules.
    Install,
    /// Print them.
    DryRun,
    /// Remove them.
    Cleanup,
}

/// The nftables script: atomically replaces the table (creating it first so the delete
/// cannot fail).
pub fn ruleset(c: &CaptureConfig) -> String {
    let ports = |p: &[u16]| p.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
    let target = if c.inbound.ip().is_unspecified() {
        std::net::Ipv4Addr::LOCALHOST.into()
    } else {
        c.inbound.ip()
    };
    let mut only = String::new();
    if let Some(p) = &c.ports {
        let _ = writeln!(only, "\t\ttcp dport != {{ {} }} return", ports(p));
    }
    format!(
        "table inet {TABLE} {{}}
delete table inet {TABLE}
table inet {TABLE} {{
\tchain prerouting {{
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\t# baton's own connections to the app (and all local traffic) arrive on lo
\t\tiifname \"lo\" return
\t\tmeta nfproto != ipv4 return
\t\tmeta l4proto != tcp return
\t\t# flows baton already accepted: deliver to its socket (not SYNs: a SYN matching a
\t\t# TIME_WAIT socket of baton's must meet tproxy, which handles TIME_WAIT itself)
\t\ttcp flags & (syn | ack) != syn socket transparent 1 meta mark set meta mark | {MARK:#x} accept
\t\ttcp dport {{ {exclude} }} return
{only}\t\tfib daddr type != local return
\t\tmeta l4proto tcp tproxy ip to {target}:{port} meta mark set meta mark | {MARK:#x} accept
{fail}\t}}
}}
",
        exclude = ports(&c.exclude),
        port = c.inbound.port(),
        fail = match c.fail {
            // tproxy found no listener (baton is restarting or gone), so the rule above
            // stopped: a new connection's SYN ends here and the client retransmits it.
            // Other packets (replies to the pod's own connections) go on untouched.
            CaptureFail::Closed => "\t\t# no baton listening: drop new connections (their clients retry)\n\t\ttcp flags & (syn | ack) == syn drop\n",
            CaptureFail::Open => "\t\t# no baton listening: new connections reach the app directly\n",
        },
    )
}

/// The routing protocol number baton tags its policy rule and route with (not a
/// registered `RTPROT_*` value), so `--cleanup` removes exactly what `install` added,
/// never an identical rule or route someone else made.
pub const RT_PROTO: u8 = 151;

/// `ip -4 rule VERB` of baton's rule: its selector, table, priority and protocol.
fn rule_args(verb: &str) -> Vec<String> {
    [
        "-4",
        "rule",
        verb,
        "fwmark",
        &format!("{MARK:#x}/{MARK:#x}"),
        "lookup",
        &ROUTE_TABLE.to_string(),
        "pref",
        &ROUTE_TABLE.to_string(),
        "protocol",
        &RT_PROTO.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// `ip -4 route VERB` of the one route init adds.
fn route_args(verb: &str) -> Vec<String> {
    [
        "-4",
        "route",
        verb,
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        &ROUTE_TABLE.to_string(),
        "proto",
        &RT_PROTO.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

fn ip(args: &[String]) -> Result<String, String> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("ip", &args, None)
}

/// Whether baton's rule (with its protocol tag) is installed. `ip rule show` cannot
/// filter by protocol, so the lines are read.
fn rule_present() -> Result<bool, String> {
    let ours = format!("from all fwmark {MARK:#x}/{MARK:#x} lookup {ROUTE_TABLE} proto {RT_PROTO}");
    let rules = ip(&["-4", "rule", "show"].map(String::from))?;
    Ok(rules.lines().any(|l| {
        l.split_once(':')
            .is_some_and(|(pref, rule)| pref == ROUTE_TABLE.to_string() && rule.trim() == ours)
    }))
}

/// Whether table [`ROUTE_TABLE`] has a local default route; `proto`: only baton's.
fn route_present(proto: Option<u8>) -> bool {
    let table = ROUTE_TABLE.to_string();
    let mut args: Vec<String> = [
        "-4", "route", "show", "table", &table, "type", "local", "dev", "lo",
    ]
    .map(String::from)
    .to_vec();
    if let Some(proto) = proto {
        args.extend(["proto".to_string(), proto.to_string()]);
    }
    ip(&args).is_ok_and(|out| out.lines().any(|l| l.starts_with("local default")))
}

/// Installs the capture rules (idempotent).
pub fn install(c: &CaptureConfig) -> Result<(), String> {
    run("nft", &["-f", "-"], Some(&ruleset(c)))?;
    if !rule_present()? {
        ip(&rule_args("add"))?;
    }
    // One local default route per table: an existing one (anyone's) already delivers.
    if !route_present(None) {
        ip(&route_args("add"))?;
    }
    Ok(())
}

/// Removes exactly what [`install`] adds (whatever of it is there), nothing else: not
/// another rule at the same priority, not another route in the table, not an identical
/// rule or route that was there before (only those with baton's protocol tag).
pub fn cleanup() -> Result<(), String> {
    if run("nft", &["list", "table", "inet", TABLE], None).is_ok() {
        run("nft", &["delete", "table", "inet", TABLE], None)?;
    }
    while rule_present()? {
        ip(&rule_args("del"))?;
    }
    if route_present(Some(RT_PROTO)) {
        ip(&route_args("del"))?;
    }
    Ok(())
}

/// The capture is IPv4 only: TCP to a global IPv6 address of the pod reaches the
/// application without baton. Say so loudly where that can happen.
fn warn_ipv6() {
    let global =
        run("ip", &["-6", "-o", "addr", "show", "scope", "global"], None).unwrap_or_default();
    let addrs: Vec<&str> = global
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.find(|w| *w == "inet6")?;
            w.next()
        })
        .collect();
    if !addrs.is_empty() {
        eprintln!(
            "baton init: WARNING: this pod has IPv6 addresses ({}); baton captures IPv4 only, so TCP to them reaches the application without baton",
            addrs.join(", ")
        );
    }
}

/// Everything `install` does, as text.
pub fn describe(c: &CaptureConfig) -> String {
    format!(
        "# nft -f - <<'EOF'\n{}# EOF\nip {}   # unless this rule exists\nip {}   # unless the table has a local default route\n",
        ruleset(c),
        rule_args("add").join(" "),
        route_args("add").join(" ")
    )
}

/// `baton init [--dry-run | --cleanup]`: exit 0 when done, 2 for bad configuration,
/// 1 when the kernel refused.
pub fn main(strings: &impl Strings, action: Action) -> ExitCode {
    let config = match CaptureConfig::from_strings(strings) {
        Ok(c) => c,
        Err(ConfigError(errors)) => {
            eprintln!("baton init: invalid configuration:");
            for e in &errors {
                eprintln!("  {}={:?}: {}", e.name, e.value, e.expected);
            }
            return ExitCode::from(2);
        }
    };
    let result = match action {
        Action::DryRun => {
            print!("{}", describe(&config));
            return ExitCode::SUCCESS;
        }
        Action::Install => install(&config).map(|()| {
            warn_ipv6();
            format!(
                "baton init: capturing TCP to this host's addresses on {} (excluding {:?}) to {}",
                config
                    .ports
                    .as_ref()
                    .map_or("all ports".to_string(), |p| format!("ports {p:?}")),
                config.exclude,
                config.inbound
            )
        }),
        Action::Cleanup => cleanup().map(|()| "baton init: capture rules removed".to_string()),
    };
    match result {
        Ok(done) => {
            eprintln!("{done}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "baton init: {e}\n(it needs CAP_NET_ADMIN, the nft and ip tools, and the node's kernel modules nft_tproxy, nft_socket and nft_fib_inet, which a pod cannot load)"
            );
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> CaptureConfig {
        let map: HashMap<&str, &str> = vars.iter().copied().collect();
        CaptureConfig::from_strings(&map).unwrap()
    }

    #[test]
    fn the_ruleset_excludes_batons_ports_and_captures_local_tcp() {
        let c = config(&[("BATON_CAPTURE_EXCLUDE_PORTS", "22,9090")]);
        assert_eq!(c.exclude, [22, 9090, 15006, 15010, 15021]);
        let r = ruleset(&c);
        assert!(
            r.contains("tcp dport { 22, 9090, 15006, 15010, 15021 } return"),
            "{r}"
        );
        assert!(r.contains("tproxy ip to 127.0.0.1:15006"), "{r}");
        assert!(r.contains("iifname \"lo\" return"));
        assert!(r.contains("fib daddr type != local return"));
        assert!(!r.contains("tcp dport != {"), "all ports by default");
        // The transparent-socket rule comes before any port decision.
        assert!(r.find("socket transparent").unwrap() < r.find("tcp dport {").unwrap());

        let c = config(&[
            ("BATON_CAPTURE_PORTS", "8080,8443"),
            ("BATON_INBOUND_ADDR", "10.1.2.3:16000"),
        ]);
        let r = ruleset(&c);
        assert!(r.contains("tcp dport != { 8080, 8443 } return"), "{r}");
        assert!(r.contains("tproxy ip to 10.1.2.3:16000"), "{r}");
        assert!(
            describe(&c).contains("fwmark 0x20000/0x20000 lookup 15006 pref 15006 protocol 151")
        );
    }

    #[test]
    fn a_closed_capture_drops_new_connections_only_when_tproxy_found_no_listener() {
        let r = ruleset(&config(&[]));
        let drop = r.find("tcp flags & (syn | ack) == syn drop").expect(&r);
        // After the tproxy rule, which accepts whatever it delivers to baton.
        assert!(r.find("tproxy ip to").unwrap() < drop, "{r}");
        assert_eq!(r.lines().filter(|l| l.ends_with(" drop")).count(), 1, "{r}");

        let r = ruleset(&config(&[("BATON_CAPTURE_FAIL", "open")]));
        assert!(!r.lines().any(|l| l.ends_with(" drop")), "{r}");

        let map: HashMap<&str, &str> = [("BATON_CAPTURE_FAIL", "shut")].into();
        let err = CaptureConfig::from_strings(&map).unwrap_err();
        assert_eq!(err.0[0].name, "BATON_CAPTURE_FAIL");
        assert!(err.0[0].expected.contains("closed or open"));
    }

    #[test]
    fn bad_ports_are_configuration_errors() {
        let map: HashMap<&str, &str> = [("BATON_CAPTURE_PORTS", "80,http")].into();
        let err = CaptureConfig::from_strings(&map).unwrap_err();
        assert_eq!(err.0[0].name, "BATON_CAPTURE_PORTS");
    }
}
