//! A network-namespace testbed: hosts on a bridge, each in its own namespace.
//!
//! Names are unique per run (process ID and a counter), addresses are in 10.x inside
//! the namespaces only, congestion control is `reno` (BBR over veth misbehaves here),
//! and everything — processes first, then namespaces — is removed on drop, so also
//! when a test panics. Needs root (CI runs as root); without it, [`Testbed::new`]
//! returns `None` and the test says it was skipped — except under CI (`CI` set and not
//! empty), where a test that cannot build its testbed fails instead of passing
//! silently.

use std::{
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Hosts on one bridge.
pub struct Testbed {
    prefix: String,
    subnet: u8,
    hosts: Vec<String>,
    children: Mutex<Vec<Child>>,
}

fn run(cmd: &[&str]) -> Output {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Whether this process may build namespaces.
pub fn privileged() -> bool {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    uid.unwrap_or(false) && Command::new("ip").arg("-V").output().is_ok()
}

/// Whether CI runs the tests (`CI` set and not empty, as in tests/deploy.rs): there
/// every test must really run.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty())
}

impl Testbed {
    /// Builds namespaces for `hosts` plus a bridge; `None` without root (the test
    /// then skips), except under CI, where that panics (the test fails). Lacking
    /// namespace support panics either way.
    pub fn new(hosts: &[&str]) -> Option<Testbed> {
        if !privileged() {
            let why = "network-namespace tests need root and the ip tool";
            if under_ci() {
                panic!("{why}, and CI must run them (CI is set): run the tests as root");
            }
            eprintln!("skipping: {why}; CI fails here");
            return None;
        }
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("bt{}-{n}", std::process::id());
        let subnet = ((std::process::id() as usize * 7 + n) % 200 + 20) as u8;
        let bed = Testbed {
            prefix,
            subnet,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            children: Mutex::new(Vec::new()),
        };
        let sw = bed.ns("sw");
        for ns in bed.hosts.iter().map(|h| bed.ns(h)).chain([sw.clone()]) {
            run(&["ip", "netns", "add", &ns]);
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            // Plain switching and loss-based congestion control inside the testbed.
            let _ = bed.exec_ns(
                &ns,
                &["sysctl", "-qw", "net.ipv4.tcp_congestion_control=reno"],
            );
        }
        for knob in ["iptables", "ip6tables", "arptables"] {
            let _ = bed.exec_ns(
                &sw,
                &[
                    "sysctl",
                    "-qw",
                    &format!("net.bridge.bridge-nf-call-{knob}=0"),
                ],
            );
        }
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"]);
        for (i, host) in bed.hosts.iter().enumerate() {
            let ns = bed.ns(host);
            let port = format!("v{i}");
            run(&[
                "ip", "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            run(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"]);
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", bed.ip(host)),
                "dev",
                "eth0",
            ]);
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        }
        Some(bed)
    }

    /// The namespace of `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// The address of `host` (10.x.y.i).
    pub fn ip(&self, host: &str) -> String {
        let i = self
            .hosts
            .iter()
            .position(|h| h == host)
            .expect("unknown host")
            + 1;
        format!("10.{}.{}.{i}", 100 + self.subnet / 100, self.subnet)
    }

    fn exec_ns(&self, ns: &str, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(cmd)
            .output()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
    }

    /// Runs `cmd` on `host` and returns its output (whatever its status).
    pub fn exec(&self, host: &str, cmd: &[&str]) -> Output {
        self.exec_ns(&self.ns(host), cmd)
    }

    /// Runs `cmd` on `host`, panicking if it fails.
    pub fn must(&self, host: &str, cmd: &[&str]) -> String {
        let out = self.exec(host, cmd);
        assert!(
            out.status.success(),
            "{cmd:?} on {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Feeds `script` to `nft -f -` on `host`.
    pub fn nft(&self, host: &str, script: &str) {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(host), "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft on {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts a long-running `cmd` with `env` on `host`; killed when the testbed drops.
    pub fn spawn(&self, host: &str, cmd: &[&str], env: &[(&str, &str)]) -> u32 {
        self.spawn_logged(host, cmd, env, None)
    }

    /// Like [`Testbed::spawn`], with stdout and stderr appended to `log` if given.
    pub fn spawn_logged(
        &self,
        host: &str,
        cmd: &[&str],
        env: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> u32 {
        let out = |log: Option<&std::path::Path>| match log {
            Some(path) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
            None => Stdio::null(),
        };
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(host)])
            .args(cmd)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out(log))
            .stderr(out(log))
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        pid
    }

    /// Stops the process `pid` started here (SIGKILL) and waits for it.
    pub fn kill(&self, pid: u32) {
        let mut children = self.children.lock().unwrap();
        if let Some(i) = children.iter().position(|c| c.id() == pid) {
            let mut child = children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (e.g. "TERM", "STOP", "CONT") to `pid`.
    pub fn signal(&self, pid: u32, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status();
    }

    /// Waits for `pid` started here to exit, up to `timeout`; its exit code.
    pub fn wait_exit(&self, pid: u32, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut children = self.children.lock().unwrap();
                if let Some(i) = children.iter().position(|c| c.id() == pid) {
                    if let Ok(Some(status)) = children[i].try_wait() {
                        let _ = children.remove(i).wait(); // already reaped: returns at once
                        return status.code();
                    }
                } else {
                    return None;
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Bytes `host`'s eth0 has received and sent so far.
    pub fn eth0_bytes(&self, host: &str) -> (u64, u64) {
        let out = self.must(
            host,
            &[
                "cat",
                "/sys/class/net/eth0/statistics/rx_bytes",
                "/sys/class/net/eth0/statistics/tx_bytes",
            ],
        );
        let mut n = out
            .split_whitespace()
            .map(|v| v.parse::<u64>().unwrap_or(0));
        (n.next().unwrap_or(0), n.next().unwrap_or(0))
    }

    /// GETs `url` with curl on `host`: (status code, body). Status 0 when it failed.
    pub fn curl(&self, host: &str, url: &str) -> (u16, String) {
        let out = self.exec(
            host,
            &["curl", "-s", "--max-time", "5", "-w", "\n%{http_code}", url],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// Waits until `url` answers 200 from `host` (panics after 15 s).
    pub fn wait_200(&self, host: &str, url: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.curl(host, url).0 != 200 {
            assert!(
                Instant::now() < deadline,
                "{url} never answered 200 on {host}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for mut child in self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.hosts.iter().map(|h| self.ns(h)).chain([self.ns("sw")]) {
            // Anything still running inside (e.g. started by a child) goes too.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}
