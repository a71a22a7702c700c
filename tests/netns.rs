//! Listener modes in network namespaces (root only): TPROXY and REDIRECT capture
//! deliver the client's original destination to baton, which routes on its port.

mod support;

use support::netns::Testbed;

const BATON: &str = env!("CARGO_BIN_EXE_baton");

/// An application on the pod: python's HTTP server on :8080 serving one file.
fn start_app(bed: &Testbed, dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("hello"), "hello from the app\n").unwrap();
    let dir = dir.to_str().unwrap();
    bed.spawn(
        "pod",
        &[
            "python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            "0.0.0.0",
            "--directory",
            dir,
        ],
        &[],
    );
    bed.wait_200("pod", "http://127.0.0.1:8080/hello");
}

fn baton_env(mode: &str) -> Vec<(&'static str, String)> {
    vec![
        ("BATON_INBOUND_MODE", mode.to_string()),
        ("BATON_INBOUND_ADDR", "0.0.0.0:15006".into()),
        ("BATON_ADMIN_ADDR", "0.0.0.0:15021".into()),
        // Only the original destination port can select the app: in plain mode the
        // port would be 15006 and the request would get 404.
        ("BATON_ROUTES", "port:8080=app".into()),
        ("BATON_STATIC_SERVICES", "app=127.0.0.1:8080".into()),
        ("BATON_WORKERS", "1".into()),
    ]
}

fn start_baton(bed: &Testbed, mode: &str) {
    let env = baton_env(mode);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    bed.spawn("pod", &[BATON], &env);
    bed.wait_200("pod", "http://127.0.0.1:15021/ready");
}

fn requests_to_app(bed: &Testbed) -> String {
    let metrics = bed.must("pod", &["curl", "-s", "http://127.0.0.1:15021/metrics"]);
    metrics
        .lines()
        .find(|l| l.starts_with("baton_requests_total{service=\"app\",status=\"200\"}"))
        .unwrap_or("none")
        .to_string()
}

#[test]
fn tproxy_listener_sees_the_original_destination() {
    let Some(bed) = Testbed::new(&["client", "pod"]) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("baton-tproxy-{}", std::process::id()));
    start_app(&bed, &dir);
    // The capture recipe written by hand (`baton init` installs its own version, see
    // tests/capture.rs): packets of accepted transparent flows are marked and
    // delivered; new TCP flows except baton's own ports go to the transparent listener.
    bed.nft(
        "pod",
        "table inet capture {
            chain prerouting {
                type filter hook prerouting priority mangle; policy accept;
                iifname \"lo\" return
                meta l4proto tcp socket transparent 1 meta mark set 0x539 accept
                meta l4proto tcp tcp dport { 15006, 15021 } return
                meta l4proto tcp tproxy ip to 127.0.0.1:15006 meta mark set 0x539 accept
            }
        }",
    );
    bed.must(
        "pod",
        &["ip", "rule", "add", "fwmark", "0x539", "lookup", "133"],
    );
    bed.must(
        "pod",
        &[
            "ip",
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "133",
        ],
    );
    start_baton(&bed, "tproxy");

    let pod = bed.ip("pod");
    let (status, body) = bed.curl("client", &format!("http://{pod}:8080/hello"));
    assert_eq!((status, body.as_str()), (200, "hello from the app\n"));
    assert_eq!(
        requests_to_app(&bed),
        "baton_requests_total{service=\"app\",status=\"200\"} 1",
        "the request went through baton"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn redirect_listener_reads_so_original_dst() {
    let Some(bed) = Testbed::new(&["client", "pod"]) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("baton-redirect-{}", std::process::id()));
    start_app(&bed, &dir);
    bed.nft(
        "pod",
        "table ip capture {
            chain prerouting {
                type nat hook prerouting priority dstnat; policy accept;
                tcp dport 8080 redirect to :15006
            }
        }",
    );
    start_baton(&bed, "redirect");

    let pod = bed.ip("pod");
    let (status, body) = bed.curl("client", &format!("http://{pod}:8080/hello"));
    assert_eq!((status, body.as_str()), (200, "hello from the app\n"));
    assert_eq!(
        requests_to_app(&bed),
        "baton_requests_total{service=\"app\",status=\"200\"} 1"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_testbed_builds_its_namespaces_and_removes_them() {
    let Some(bed) = Testbed::new(&["solo"]) else {
        return;
    };
    let ns = bed.ns("solo");
    let list = || {
        let out = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.split_whitespace().next() == Some(ns.as_str()))
    };
    assert!(list(), "{ns} exists");
    assert_eq!(
        bed.must("solo", &["cat", "/sys/class/net/eth0/operstate"])
            .trim(),
        "up"
    );
    drop(bed);
    assert!(!list(), "{ns} removed");
}

/// Without root, a network-namespace test fails under CI and skips (passing, saying
/// so) otherwise: this test binary runs the testbed test again as an unprivileged
/// user (`nobody`, when running as root), once with `CI=1` and once without.
#[test]
fn without_root_netns_tests_fail_under_ci_and_skip_otherwise() {
    let exe = std::env::current_exe().unwrap();
    let root = support::netns::privileged();
    let run = |ci: bool| {
        let mut cmd = if root {
            let mut c = std::process::Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        cmd.args([
            "--exact",
            "the_testbed_builds_its_namespaces_and_removes_them",
            "--nocapture",
            "--test-threads=1",
        ]);
        if ci {
            cmd.env("CI", "1");
        } else {
            cmd.env_remove("CI");
        }
        let out = cmd.output().expect("run the test binary");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (passed, text) = run(true);
    assert!(!passed, "under CI the test must fail:\n{text}");
    assert!(text.contains("CI must run them"), "{text}");
    let (passed, text) = run(false);
    assert!(passed, "outside CI the test skips:\n{text}");
    assert!(text.contains("skipping"), "{text}");
    assert!(text.contains("1 passed"), "it ran: {text}");
}
