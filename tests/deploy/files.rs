//! Reading deploy/ for tests/deploy.rs: YAML (every document, as JSON values), the Kubernetes
//! objects, the compose services, the Dockerfile's instructions, and every proxy.toml deploy/
//! ships with the `PGCACHE_*` environment it is deployed with.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::output_within;

pub const CONFIG_PATH: &str = "/etc/pgcache/proxy.toml";

pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every file under `dir`, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("list {}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

pub fn has_ext(path: &Path, exts: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.contains(&e))
}

/// One YAML node as JSON (deploy/ uses no anchors, aliases or non-string keys).
pub fn yaml_to_json(y: &yaml_rust2::Yaml, file: &Path) -> Value {
    use yaml_rust2::Yaml;
    match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Real(r) => Value::from(r.parse::<f64>().unwrap_or(f64::NAN)),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(a) => Value::Array(a.iter().map(|v| yaml_to_json(v, file)).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        other => panic!("{}: unexpected YAML key {other:?}", file.display()),
                    };
                    (key, yaml_to_json(v, file))
                })
                .collect(),
        ),
        Yaml::Alias(_) | Yaml::BadValue => {
            panic!("{}: aliases are not used in deploy/", file.display())
        }
    }
}

/// Every document of a YAML file (a file may hold several, `---`-separated).
pub fn yaml_docs(path: &Path) -> Vec<Value> {
    let docs = yaml_rust2::YamlLoader::load_from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
    docs.iter().map(|d| yaml_to_json(d, path)).collect()
}

/// The one document of `deploy/<rel>`.
pub fn yaml(rel: &str) -> Value {
    let mut docs = yaml_docs(&deploy_dir().join(rel));
    assert_eq!(docs.len(), 1, "deploy/{rel}: expected one YAML document");
    docs.remove(0)
}

pub fn str_at<'a>(v: &'a Value, pointer: &str, what: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{what}: no string at {pointer} in {v}"))
}

pub fn array_at<'a>(v: &'a Value, pointer: &str, what: &str) -> &'a Vec<Value> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{what}: no list at {pointer} in {v}"))
}

/// Every Kubernetes object in deploy/kubernetes/*.yaml except the kustomization.
pub fn k8s_objects() -> Vec<Value> {
    files_under(&deploy_dir().join("kubernetes"))
        .iter()
        .filter(|p| has_ext(p, &["yaml", "yml"]) && !p.ends_with("kustomization.yaml"))
        .flat_map(|p| yaml_docs(p))
        .collect()
}

pub fn k8s_object(kind: &str) -> Value {
    let mut found: Vec<Value> = k8s_objects()
        .into_iter()
        .filter(|o| o["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} in deploy/kubernetes");
    found.remove(0)
}

pub fn toml_table(text: &str, origin: &str) -> toml::Table {
    text.parse()
        .unwrap_or_else(|e| panic!("{origin}: proxy.toml is not TOML: {e}"))
}

/// Port of an address like `0.0.0.0:9930`.
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} has no port"))
}

/// The ports a proxy.toml serves: clients (`proxy.listen`) and HTTP (`metrics.listen`).
pub struct Ports {
    pub clients: BTreeSet<u16>,
    pub metrics: u16,
}

pub fn ports(config: &toml::Table, origin: &str) -> Ports {
    let listen = config["proxy"]["listen"]
        .as_array()
        .unwrap_or_else(|| panic!("{origin}: no proxy.listen"));
    let metrics = config
        .get("metrics")
        .and_then(|m| m.get("listen"))
        .and_then(|l| l.as_str())
        .unwrap_or_else(|| panic!("{origin}: no metrics.listen (probes and scrapes need it)"));
    Ports {
        clients: listen
            .iter()
            .map(|a| port_of(a.as_str().expect("listen address")))
            .collect(),
        metrics: port_of(metrics),
    }
}

pub fn shutdown_timeout(config: &toml::Table, origin: &str) -> Duration {
    let raw = config["proxy"]
        .get("shutdown_timeout")
        .and_then(|v| v.as_str())
        .unwrap_or("30s");
    humantime::parse_duration(raw).unwrap_or_else(|e| panic!("{origin}: shutdown_timeout: {e}"))
}

/// A proxy.toml that deploy/ ships, with the `PGCACHE_*` environment it is deployed with and the
/// password its example clients log in with.
#[derive(Clone)]
pub struct Deployed {
    pub origin: String,
    pub toml: String,
    pub env: Vec<(String, String)>,
    pub client_password: &'static str,
}

/// The compose services that run pgcache: those mounting a proxy.toml.
pub fn compose_proxies(compose: &Value) -> Vec<(String, Value)> {
    let services = compose["services"]
        .as_object()
        .expect("compose.yml has services");
    services
        .iter()
        .filter(|(_, s)| host_path(s, CONFIG_PATH).is_some())
        .map(|(n, s)| (n.clone(), s.clone()))
        .collect()
}

/// The file under deploy/ that a compose service mounts at `container_path` (bind mounts
/// `./src:/dst[:ro]`, relative to deploy/).
pub fn host_path(service: &Value, container_path: &str) -> Option<PathBuf> {
    service["volumes"].as_array()?.iter().find_map(|v| {
        let v = v.as_str()?;
        let mut parts = v.split(':');
        let (src, dst) = (parts.next()?, parts.next()?);
        if !src.starts_with('.') {
            return None; // a named volume
        }
        let rest = container_path.strip_prefix(dst)?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        let base = deploy_dir().join(src);
        Some(match rest.trim_start_matches('/') {
            "" => base,
            rest => base.join(rest),
        })
    })
}

pub fn deployed_configs() -> Vec<Deployed> {
    let mut out = Vec::new();
    let compose = yaml("compose.yml");
    for (name, service) in compose_proxies(&compose) {
        let path = host_path(&service, CONFIG_PATH).expect("mounted proxy.toml");
        let env = service["environment"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        out.push(Deployed {
            origin: format!("compose service {name} ({})", path.display()),
            toml: read(&path),
            env,
            // deploy/compose/*.toml: SCRAM secrets of the demo password `app`.
            client_password: "app",
        });
    }
    let secret = k8s_object("Secret");
    let container = k8s_container();
    for map in k8s_objects().iter().filter(|o| o["kind"] == "ConfigMap") {
        let Some(text) = map.pointer("/data/proxy.toml").and_then(Value::as_str) else {
            continue;
        };
        let mut env = Vec::new();
        for e in container["env"].as_array().into_iter().flatten() {
            let name = str_at(e, "/name", "env entry").to_string();
            let value = match e.get("value").and_then(Value::as_str) {
                Some(v) => v.to_string(),
                None => {
                    let key = str_at(e, "/valueFrom/secretKeyRef/key", &name);
                    assert_eq!(
                        str_at(e, "/valueFrom/secretKeyRef/name", &name),
                        str_at(&secret, "/metadata/name", "Secret"),
                        "{name} names a Secret that deploy/kubernetes does not define"
                    );
                    str_at(&secret, &format!("/stringData/{key}"), &name).to_string()
                }
            };
            env.push((name, value));
        }
        out.push(Deployed {
            origin: format!(
                "Kubernetes ConfigMap {}",
                str_at(map, "/metadata/name", "ConfigMap")
            ),
            toml: text.to_string(),
            env,
            // deploy/kubernetes/configmap.yaml: SCRAM secrets of the example password `change-me`.
            client_password: "change-me",
        });
    }
    assert!(
        out.len() >= 3,
        "expected two compose proxies and the ConfigMap"
    );
    out
}

/// The pgcache container of the Deployment.
pub fn k8s_container() -> Value {
    let deployment = k8s_object("Deployment");
    let containers = array_at(&deployment, "/spec/template/spec/containers", "Deployment");
    assert_eq!(containers.len(), 1, "one container in the pod");
    containers[0].clone()
}

/// `pgcache check --offline --config` on `toml` with only `env` as `PGCACHE_*` environment
/// (offline: the deployed upstream host does not exist here; the live test runs the configs).
pub fn check(toml: &str, env: &[(String, String)]) -> std::process::Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, toml).expect("write proxy.toml");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgcache"));
    cmd.arg("check").arg("--offline").arg("--config").arg(&path);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("PGCACHE_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    output_within(&mut cmd, Duration::from_secs(30))
}

/// Dockerfile instructions, continuation lines joined: (instruction, arguments).
pub fn dockerfile() -> Vec<(String, String)> {
    let text = read(&deploy_dir().join("Dockerfile"));
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                let (op, args) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((op.to_ascii_uppercase(), args.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

/// The runtime stage's `HEALTHCHECK CMD [...]` as arguments.
pub fn image_health_command(steps: &[(String, String)]) -> Vec<String> {
    let (_, args) = steps
        .iter()
        .rfind(|(op, _)| op == "HEALTHCHECK")
        .expect("HEALTHCHECK in the Dockerfile");
    exec_form(&args[args.find("CMD ").expect("HEALTHCHECK CMD") + 4..])
}

/// An exec-form argument list (`["a", "b"]`) as strings.
pub fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("not exec form: {args}: {e}"))
}

/// `http://host:port/path` as (host, port, path).
pub fn split_url(url: &str) -> (String, u16, String) {
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("{url} is not http://"));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = authority.rsplit_once(':').expect("port in URL");
    (
        host.to_string(),
        port.parse().expect("numeric port"),
        format!("/{path}"),
    )
}

/// The URL that a `pgcache health --url URL` command checks.
pub fn health_url(cmd: &[String]) -> String {
    assert!(
        cmd.iter().any(|a| a == "health"),
        "not `pgcache health`: {cmd:?}"
    );
    let i = cmd
        .iter()
        .position(|a| a == "--url")
        .unwrap_or_else(|| panic!("no --url: {cmd:?}"));
    cmd[i + 1].clone()
}

/// `"127.0.0.1:6433:6432"` → (host address, host port, container port).
pub fn published(port: &str) -> (String, u16, u16) {
    let parts: Vec<&str> = port.split(':').collect();
    assert_eq!(
        parts.len(),
        3,
        "publish as ADDRESS:HOST_PORT:CONTAINER_PORT: {port}"
    );
    (
        parts[0].to_string(),
        parts[1].parse().expect("host port"),
        parts[2].parse().expect("container port"),
    )
}

/// A probe's port (a name or a number) as a number, through the container's ports.
pub fn probe_port(container: &Value, port: &Value) -> u16 {
    if let Some(n) = port.as_u64() {
        return n as u16;
    }
    let name = port.as_str().expect("port name or number");
    array_at(container, "/ports", "container")
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {name}")) as u16
}
