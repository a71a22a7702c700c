//! Static discovery: services listed in configuration, optionally in a file that is
//! re-read when it changes or when asked to (SIGHUP).
//!
//! The format, for `BATON_STATIC_SERVICES` and the file alike, is a `;`-separated list
//! (newlines also separate, `#` starts a comment in the file) of
//! `SERVICE=ENDPOINT,ENDPOINT,...` where an endpoint is `IP:PORT`, `[IPv6]:PORT`, or
//! either followed by `@HANDOFF_PORT`:
//!
//! ```text
//! web=127.0.0.1:8081,127.0.0.1:8082;objects=10.0.0.5:9000@15010
//! ```
//!
//! A service may be listed with no endpoints (`web=`): it is then known and resolved,
//! and requests to it fail with 503.

use crate::{Instance, Registry};
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};
use tokio::sync::Notify;

/// Service name -> instances, in the order written.
pub type ServiceMap = BTreeMap<String, Vec<Instance>>;

/// What was wrong with a static service list.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// An entry without `=`.
    #[error("entry {0:?} is not SERVICE=ENDPOINT[,ENDPOINT...]")]
    Entry(String),
    /// An empty service name.
    #[error("entry {0:?} has an empty service name")]
    EmptyName(String),
    /// A service listed twice.
    #[error("service {0:?} is listed twice")]
    Duplicate(String),
    /// An endpoint that is not `IP:PORT[@HANDOFF_PORT]`.
    #[error("endpoint {0:?} is not IP:PORT or IP:PORT@HANDOFF_PORT")]
    Endpoint(String),
}

/// Parses the static service list format (see the module docs).
pub fn parse(text: &str) -> Result<ServiceMap, ParseError> {
    let mut services = ServiceMap::new();
    let entries = text
        .lines()
        .map(|line| line.split_once('#').map_or(line, |(before, _)| before))
        .flat_map(|line| line.split(';'))
        .map(str::trim)
        .filter(|e| !e.is_empty());
    for entry in entries {
        let (name, endpoints) = entry
            .split_once('=')
            .ok_or_else(|| ParseError::Entry(entry.to_string()))?;
        let name = name.trim();
        if name.is_empty() {
            return Err(ParseError::EmptyName(entry.to_string()));
        }
        let instances = endpoints
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(parse_endpoint)
            .collect::<Result<Vec<_>, _>>()?;
        if services.insert(name.to_string(), instances).is_some() {
            return Err(ParseError::Duplicate(name.to_string()));
        }
    }
    Ok(services)
}

fn parse_endpoint(text: &str) -> Result<Instance, ParseError> {
    let bad = || ParseError::Endpoint(text.to_string());
    let (addr, handoff_port) = match text.rsplit_once('@') {
        Some((addr, port)) => (addr, Some(port.parse::<u16>().map_err(|_| bad())?)),
        None => (text, None),
    };
    let addr: SocketAddr = addr.parse().map_err(|_| bad())?;
    if addr.port() == 0 || handoff_port == Some(0) {
        return Err(bad());
    }
    Ok(Instance {
        handoff_port,
        ..Instance::new(addr)
    })
}

/// Publishes `services` into `registry`.
pub fn publish(registry: &Registry, services: &ServiceMap) {
    for (name, instances) in services {
        registry.publish(name, instances.iter().cloned());
    }
}

/// Watches a static service file: re-reads it when its modification time or size
/// changes (checked every `poll`) or when `reload` is notified, and publishes the
/// union of `base` (from the environment) and the file, the file winning per service.
///
/// A service that disappears from the file falls back to its `base` entry, or to no
/// endpoints. A file that cannot be read or parsed is logged and the last good content
/// kept: a typo in a ConfigMap must not take traffic down.
#[derive(Debug)]
pub struct FileWatch {
    path: PathBuf,
    base: ServiceMap,
    registry: Registry,
    reload: Arc<Notify>,
    poll: Duration,
}

impl FileWatch {
    /// A watch of `path` publishing into `registry`.
    pub fn new(path: PathBuf, base: ServiceMap, registry: Registry, reload: Arc<Notify>) -> Self {
        Self {
            path,
            base,
            registry,
            reload,
            poll: Duration::from_secs(1),
        }
    }

    /// How often the file's metadata is checked (default 1s).
    pub fn poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// Reads the file once, as startup does: an error here is a configuration error.
    pub fn load(&self) -> Result<ServiceMap, FileError> {
        read(&self.path)
    }

    /// Publishes `file` (merged with the base) and then runs until the process ends.
    pub async fn run(self, file: ServiceMap) {
        let mut published = self.merge(&file);
        publish(&self.registry, &published);
        let mut seen = stamp(&self.path);
        let mut ticker = tokio::time::interval(self.poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = ticker.tick() => false,
                _ = self.reload.notified() => true,
            };
            let now = stamp(&self.path);
            if !forced && now == seen {
                continue;
            }
            seen = now;
            match read(&self.path) {
                Ok(file) => {
                    let next = self.merge(&file);
                    for gone in published.keys().filter(|k| !next.contains_key(*k)) {
                        self.registry.publish(gone, []);
                    }
                    publish(&self.registry, &next);
                    tracing::info!(path = %self.path.display(), services = next.len(), "static services reloaded");
                    published = next;
                }
                Err(error) => {
                    tracing::error!(%error, "keeping the last good static services");
                }
            }
        }
    }

    fn merge(&self, file: &ServiceMap) -> ServiceMap {
        let mut merged = self.base.clone();
        merged.extend(file.iter().map(|(k, v)| (k.clone(), v.clone())));
        merged
    }
}

/// A static service file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file's content is not a valid service list.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: ParseError,
    },
}

fn read(path: &Path) -> Result<ServiceMap, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|source| FileError::Parse {
        path: path.to_owned(),
        source,
    })
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    // `metadata` follows symlinks, so a Kubernetes ConfigMap's atomic symlink swap is
    // seen as a change of the target.
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let s = parse("web=127.0.0.1:8081,127.0.0.1:8082;objects=10.0.0.5:9000@15010").unwrap();
        assert_eq!(s.len(), 2);
        let web = &s["web"];
        assert_eq!(web.len(), 2);
        assert_eq!(web[1].addr, "127.0.0.1:8082".parse().unwrap());
        assert_eq!(web[0].handoff_port, None);
        assert_eq!(web[0].id.as_ref(), "127.0.0.1:8081");
        assert_eq!(s["objects"][0].handoff_port, Some(15010));
    }

    #[test]
    fn accepts_file_layout_with_comments_and_ipv6() {
        let s = parse("# services\nweb = 127.0.0.1:1 , [::1]:2  # two\n\nempty=\n").unwrap();
        assert_eq!(s["web"][1].addr, "[::1]:2".parse().unwrap());
        assert!(s["empty"].is_empty());
    }

    #[test]
    fn rejects_bad_entries() {
        assert_eq!(parse("web"), Err(ParseError::Entry("web".into())));
        assert_eq!(
            parse("=1.2.3.4:5"),
            Err(ParseError::EmptyName("=1.2.3.4:5".into()))
        );
        assert_eq!(
            parse("web=localhost:80"),
            Err(ParseError::Endpoint("localhost:80".into()))
        );
        assert_eq!(
            parse("web=1.2.3.4:80@x"),
            Err(ParseError::Endpoint("1.2.3.4:80@x".into()))
        );
        assert_eq!(
            parse("web=1.2.3.4:0"),
            Err(ParseError::Endpoint("1.2.3.4:0".into()))
        );
        assert_eq!(
            parse("a=1.2.3.4:1;a=1.2.3.4:2"),
            Err(ParseError::Duplicate("a".into()))
        );
    }

    #[tokio::test]
    async fn file_changes_are_published_and_bad_content_is_ignored() {
        let dir = std::env::temp_dir().join(format!("baton-static-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("services");
        std::fs::write(&path, "web=127.0.0.1:1\nold=127.0.0.1:9").unwrap();
        let registry = Registry::new();
        let reload = Arc::new(Notify::new());
        let base = parse("env=127.0.0.1:7;web=127.0.0.1:8").unwrap();
        let watch = FileWatch::new(path.clone(), base, registry.clone(), reload.clone())
            .poll_interval(Duration::from_secs(3600));
        let first = watch.load().unwrap();
        let task = tokio::spawn(watch.run(first));
        let ports = |svc: &str| -> Vec<u16> {
            registry
                .instances(svc)
                .iter()
                .map(|i| i.addr.port())
                .collect()
        };
        let settle = || async {
            for _ in 0..50 {
                tokio::task::yield_now().await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        settle().await;
        assert_eq!(ports("web"), [1], "the file wins over the environment");
        assert_eq!(ports("env"), [7]);
        assert_eq!(ports("old"), [9]);

        std::fs::write(&path, "web=127.0.0.1:2").unwrap();
        reload.notify_one();
        settle().await;
        assert_eq!(ports("web"), [2]);
        assert!(
            ports("old").is_empty(),
            "a service removed from the file has no endpoints"
        );
        assert!(registry.is_resolved("old"));

        std::fs::write(&path, "web=nonsense").unwrap();
        reload.notify_one();
        settle().await;
        assert_eq!(ports("web"), [2], "bad content keeps the last good set");

        task.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
