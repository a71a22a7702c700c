//! The parts of Consul's API baton uses, as its documentation describes them.
//!
//! Decoding is lenient the way Consul's own clients are: unknown fields are ignored,
//! and fields Consul may send as `null` (`Tags`, `Meta`, `Weights`, `Checks`) default.

use crate::Instance;
use serde::{Deserialize, Deserializer, Serialize};
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

/// The service metadata key carrying a baton's handoff receiver port.
pub const META_HANDOFF_PORT: &str = "baton-handoff-port";
/// The service metadata key carrying the registering baton's version.
pub const META_VERSION: &str = "baton-version";

fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// One entry of `GET /v1/health/service/:service`: an instance, its node, its checks.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceEntry {
    /// The node the instance runs on.
    pub node: Node,
    /// The instance.
    pub service: AgentService,
    /// The node's and the instance's checks.
    #[serde(default, deserialize_with = "null_default")]
    pub checks: Vec<HealthCheck>,
}

/// A catalog node.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct Node {
    /// The node's name.
    pub node: String,
    /// The node's address: the instance's address when it gives none.
    #[serde(default)]
    pub address: String,
    /// The node's datacenter.
    #[serde(default)]
    pub datacenter: String,
}

/// A service instance, as the health and agent endpoints describe it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct AgentService {
    /// The instance's ID (unique on its node).
    #[serde(rename = "ID")]
    pub id: String,
    /// The service name.
    pub service: String,
    /// Tags.
    #[serde(default, deserialize_with = "null_default")]
    pub tags: Vec<String>,
    /// The instance's address; empty means the node's.
    #[serde(default)]
    pub address: String,
    /// Its port.
    #[serde(default)]
    pub port: u32,
    /// Metadata.
    #[serde(default, deserialize_with = "null_default")]
    pub meta: HashMap<String, String>,
    /// Balancing weights.
    #[serde(default, deserialize_with = "null_default")]
    pub weights: Weights,
}

/// Balancing weights of an instance by health.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Weights {
    /// Weight while every check passes.
    #[serde(default = "one")]
    pub passing: u32,
    /// Weight while some check warns.
    #[serde(default = "one")]
    pub warning: u32,
}

fn one() -> u32 {
    1
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            passing: 1,
            warning: 1,
        }
    }
}

/// A health check's state.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct HealthCheck {
    /// The check's ID.
    #[serde(rename = "CheckID")]
    pub check_id: String,
    /// `passing`, `warning` or `critical`.
    pub status: String,
    /// The instance it belongs to (empty for node checks).
    #[serde(rename = "ServiceID", default)]
    pub service_id: String,
}

impl ServiceEntry {
    /// The key the instance is known by: service IDs are unique per node only.
    pub fn key(&self) -> String {
        format!("{}/{}", self.node.node, self.service.id)
    }

    /// The handoff port in the metadata, if any; an error saying why when the value is
    /// not a port (the instance is then used without one: a bad value must not take it
    /// out of plain proxying).
    pub fn handoff_port(&self) -> Result<Option<u16>, String> {
        match self.service.meta.get(META_HANDOFF_PORT) {
            None => Ok(None),
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .map(Some)
                .ok_or_else(|| format!("meta {META_HANDOFF_PORT}={p:?} is not a port")),
        }
    }

    /// Where the instance is and how balancers see it: `Service.Address`, else
    /// `Node.Address` (an IP address, or a DNS host name, which Consul allows); the
    /// port; the handoff port from the metadata; `Weights.Passing` (baton asks for
    /// passing instances only, so `Weights.Warning` never applies).
    ///
    /// An entry baton cannot send to (no address, an address that is neither, no
    /// port) is an error saying why; the caller skips it.
    pub fn to_target(&self) -> Result<Target, String> {
        let address = if self.service.address.is_empty() {
            &self.node.address
        } else {
            &self.service.address
        };
        let host = match address.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) if is_host_name(address) => Host::Name(address.clone()),
            Err(_) => {
                return Err(format!(
                    "address {address:?} is neither an IP address nor a host name"
                ))
            }
        };
        let port = u16::try_from(self.service.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {} is not a port", self.service.port))?;
        Ok(Target {
            id: Arc::from(self.key()),
            host,
            port,
            handoff_port: self.handoff_port().unwrap_or(None),
            weight: self.service.weights.passing.max(1),
        })
    }

    /// The instance, for an entry whose address is an IP address (see
    /// [`to_target`](Self::to_target)); a host name is an error: resolve it first.
    pub fn to_instance(&self) -> Result<Instance, String> {
        let target = self.to_target()?;
        match &target.host {
            Host::Ip(ip) => Ok(target.at(*ip)),
            Host::Name(name) => Err(format!("address {name:?} is a host name, not resolved yet")),
        }
    }
}

/// An entry's address before any name is resolved.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IP address.
    Ip(IpAddr),
    /// A DNS host name.
    Name(String),
}

/// An instance whose address may still be a host name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// As [`Instance::id`].
    pub id: Arc<str>,
    /// Where it is.
    pub host: Host,
    /// Its port.
    pub port: u16,
    /// As [`Instance::handoff_port`].
    pub handoff_port: Option<u16>,
    /// As [`Instance::weight`].
    pub weight: u32,
}

impl Target {
    /// The instance at `ip` (the host's address, or what its name resolved to).
    pub fn at(&self, ip: IpAddr) -> Instance {
        Instance {
            id: self.id.clone(),
            addr: SocketAddr::new(ip, self.port),
            handoff_port: self.handoff_port,
            weight: self.weight,
        }
    }
}

/// A DNS host name (RFC 1123: dot-separated labels of letters, digits and inner
/// hyphens, at most 63 bytes each, 253 in all; a trailing dot allowed).
fn is_host_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `PUT /v1/agent/service/register`: the local service, with baton's readiness check.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct Registration {
    /// The instance's ID.
    #[serde(rename = "ID")]
    pub id: String,
    /// The service name.
    pub name: String,
    /// Tags.
    pub tags: Vec<String>,
    /// The address peers reach the service at.
    pub address: String,
    /// The port peers reach the service at.
    pub port: u16,
    /// Metadata (including baton's own keys).
    pub meta: BTreeMap<String, String>,
    /// Balancing weights.
    pub weights: Weights,
    /// The readiness check the agent runs.
    pub check: HttpCheck,
}

/// An HTTP health check definition.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct HttpCheck {
    /// The check's name.
    pub name: String,
    /// The URL the agent GETs: 2xx passing, 429 warning, else critical.
    #[serde(rename = "HTTP")]
    pub http: String,
    /// How often.
    pub interval: String,
    /// How long each attempt may take.
    pub timeout: String,
    /// The agent removes the instance once the check has been critical this long.
    pub deregister_critical_service_after: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample response of "List Service Instances for Service"
    /// (`/v1/health/service/:service`) in Consul's HTTP API documentation.
    const HEALTH_SERVICE_SAMPLE: &str = r#"[
  {
    "Node": {
      "ID": "40e4a748-2192-161a-0510-9bf59fe950b5",
      "Node": "foobar",
      "Address": "10.1.10.12",
      "Datacenter": "dc1",
      "TaggedAddresses": {
        "lan": "10.1.10.12",
        "wan": "10.1.10.12"
      },
      "Meta": {
        "instance_type": "t2.medium"
      }
    },
    "Service": {
      "ID": "redis",
      "Service": "redis",
      "Tags": ["primary"],
      "Address": "10.1.10.12",
      "TaggedAddresses": {
        "lan": {
          "address": "10.1.10.12",
          "port": 8000
        },
        "wan": {
          "address": "198.18.1.2",
          "port": 80
        }
      },
      "Meta": {
        "redis_version": "4.0"
      },
      "Port": 8000,
      "Weights": {
        "Passing": 10,
        "Warning": 1
      },
      "Namespace": "default"
    },
    "Checks": [
      {
        "Node": "foobar",
        "CheckID": "service:redis",
        "Name": "Service 'redis' check",
        "Status": "passing",
        "Notes": "",
        "Output": "",
        "ServiceID": "redis",
        "ServiceName": "redis",
        "ServiceTags": ["primary"],
        "Namespace": "default"
      },
      {
        "Node": "foobar",
        "CheckID": "serfHealth",
        "Name": "Serf Health Status",
        "Status": "passing",
        "Notes": "",
        "Output": "",
        "ServiceID": "",
        "ServiceName": "",
        "ServiceTags": [],
        "Namespace": "default"
      }
    ]
  }
]"#;

    #[test]
    fn decodes_the_documented_health_service_response() {
        let entries: Vec<ServiceEntry> = serde_json::from_str(HEALTH_SERVICE_SAMPLE).unwrap();
        assert_eq!(entries.len(), 1);
        let e = &entries[0];
        assert_eq!(e.node.node, "foobar");
        assert_eq!(e.service.id, "redis");
        assert_eq!(e.service.port, 8000);
        assert_eq!(e.service.meta["redis_version"], "4.0");
        assert_eq!(e.service.weights.passing, 10);
        assert_eq!(e.checks.len(), 2);
        let i = e.to_instance().unwrap();
        assert_eq!(&*i.id, "foobar/redis");
        assert_eq!(i.addr, "10.1.10.12:8000".parse().unwrap());
        assert_eq!(i.weight, 10);
        assert_eq!(i.handoff_port, None);
    }

    fn entry(json: serde_json::Value) -> ServiceEntry {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn node_address_fallback_meta_port_and_nulls() {
        let e = entry(serde_json::json!({
            "Node": {"Node": "n1", "Address": "10.0.0.7"},
            "Service": {"ID": "web-1", "Service": "web", "Address": "", "Port": 8080,
                        "Tags": null, "Meta": {"baton-handoff-port": "15010"}, "Weights": null},
            "Checks": null
        }));
        let i = e.to_instance().unwrap();
        assert_eq!(i.addr, "10.0.0.7:8080".parse().unwrap());
        assert_eq!(i.handoff_port, Some(15010));
        assert_eq!(i.weight, 1);
        assert!(e.checks.is_empty() && e.service.tags.is_empty());
    }

    #[test]
    fn host_names_are_targets_to_resolve() {
        let e = entry(serde_json::json!({
            "Node": {"Node": "n", "Address": "10.0.0.1"},
            "Service": {"ID": "a", "Service": "s", "Address": "db-1.internal.", "Port": 5432,
                        "Meta": {"baton-handoff-port": "15010"}, "Weights": {"Passing": 4}}
        }));
        let t = e.to_target().unwrap();
        assert_eq!(t.host, Host::Name("db-1.internal.".into()));
        assert_eq!((t.port, t.handoff_port, t.weight), (5432, Some(15010), 4));
        assert_eq!(&*t.id, "n/a");
        let i = t.at("10.9.8.7".parse().unwrap());
        assert_eq!(i.addr, "10.9.8.7:5432".parse().unwrap());
        assert_eq!((i.handoff_port, i.weight, &*i.id), (Some(15010), 4, "n/a"));
        assert!(e.to_instance().unwrap_err().contains("host name"));
        // A host name as the node's address too.
        let e = entry(serde_json::json!({
            "Node": {"Node": "n", "Address": "node1.dc1"},
            "Service": {"ID": "a", "Service": "s", "Port": 1}
        }));
        assert_eq!(e.to_target().unwrap().host, Host::Name("node1.dc1".into()));
    }

    #[test]
    fn host_name_syntax() {
        for good in [
            "localhost",
            "a",
            "db-1.internal",
            "x.y.",
            "123.example",
            &"a".repeat(63),
        ] {
            assert!(is_host_name(good), "{good}");
        }
        let long = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(62)
        );
        assert!(long.len() > 253 && !is_host_name(&long));
        for bad in [
            "",
            ".",
            "a..b",
            "-a",
            "a-",
            "a_b",
            "a b",
            "a/b",
            "ä.example",
            &"a".repeat(64),
            "[::1]",
        ] {
            assert!(!is_host_name(bad), "{bad}");
        }
    }

    #[test]
    fn unusable_entries_say_why() {
        let bad = |service: serde_json::Value| {
            entry(serde_json::json!({"Node": {"Node": "n", "Address": "10.0.0.1"}, "Service": service}))
                .to_target()
                .unwrap_err()
        };
        assert!(bad(
            serde_json::json!({"ID": "a", "Service": "s", "Address": "db internal!", "Port": 1})
        )
        .contains("neither an IP address nor a host name"));
        let no_address = entry(serde_json::json!({"Node": {"Node": "n"},
                                                  "Service": {"ID": "a", "Service": "s", "Port": 1}}));
        assert!(no_address.to_target().unwrap_err().contains("neither"));
        assert!(bad(serde_json::json!({"ID": "a", "Service": "s", "Port": 0})).contains("port"));
        assert!(
            bad(serde_json::json!({"ID": "a", "Service": "s", "Port": 70000})).contains("port")
        );
        // A bad handoff port is not a reason to skip the instance: it has none.
        let bad_meta = entry(
            serde_json::json!({"Node": {"Node": "n", "Address": "10.0.0.1"},
            "Service": {"ID": "a", "Service": "s", "Port": 1, "Meta": {"baton-handoff-port": "x"}}}),
        );
        assert!(bad_meta
            .handoff_port()
            .unwrap_err()
            .contains(META_HANDOFF_PORT));
        let t = bad_meta.to_target().unwrap();
        assert_eq!((t.port, t.handoff_port), (1, None));
    }

    #[test]
    fn registration_encodes_as_the_agent_expects() {
        let r = Registration {
            id: "web-host1".into(),
            name: "web".into(),
            tags: vec!["v1".into()],
            address: "10.0.0.5".into(),
            port: 8080,
            meta: [(META_VERSION.to_string(), "0.1.0".to_string())].into(),
            weights: Weights {
                passing: 3,
                warning: 1,
            },
            check: HttpCheck {
                name: "baton ready".into(),
                http: "http://10.0.0.5:15021/ready".into(),
                interval: "10s".into(),
                timeout: "2s".into(),
                deregister_critical_service_after: "1m".into(),
            },
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["ID"], "web-host1");
        assert_eq!(v["Name"], "web");
        assert_eq!(v["Meta"]["baton-version"], "0.1.0");
        assert_eq!(v["Weights"]["Passing"], 3);
        assert_eq!(v["Check"]["HTTP"], "http://10.0.0.5:15021/ready");
        assert_eq!(v["Check"]["DeregisterCriticalServiceAfter"], "1m");
    }
}
