//! `deploy/` checked against the proxy it deploys: every YAML and JSON file parses; every
//! proxy.toml it ships (the compose files, the Kubernetes ConfigMap) passes `pgcache check` and
//! serves clients against a real PostgreSQL with the environment it is deployed with; the image,
//! compose healthchecks, Prometheus targets, Grafana mounts and Kubernetes probes name the ports
//! and paths those configs really serve; and every metric that the Grafana dashboard and the
//! alert rules use is one a running proxy exports.
//!
//! Helpers live beside it in tests/deploy/: `files` reads deploy/, `promql` finds metric names,
//! `live` runs the deployed configs.

#[path = "deploy/files.rs"]
mod files;
#[path = "deploy/live.rs"]
mod live;
#[path = "deploy/promql.rs"]
mod promql;
mod support;

use files::*;
use live::{get, serving};
use promql::{metric_refs, referenced_metrics, scrape_samples, Named};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::{output_text, output_within};

#[test]
fn every_yaml_and_json_file_under_deploy_parses() {
    let mut yaml_files = 0;
    let mut json_files = 0;
    for path in files_under(&deploy_dir()) {
        if has_ext(&path, &["yml", "yaml"]) {
            let docs = yaml_docs(&path);
            assert!(
                docs.iter().any(|d| !d.is_null()),
                "{} is empty",
                path.display()
            );
            yaml_files += 1;
        } else if has_ext(&path, &["json"]) {
            serde_json::from_str::<Value>(&read(&path))
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
            json_files += 1;
        }
    }
    assert!(
        yaml_files >= 10 && json_files >= 1,
        "{yaml_files} YAML, {json_files} JSON"
    );
    for o in k8s_objects() {
        for field in ["/apiVersion", "/kind", "/metadata/name"] {
            str_at(&o, field, "Kubernetes object");
        }
    }
}

#[test]
fn every_deployed_proxy_toml_passes_check() {
    let deployed = deployed_configs();
    for d in &deployed {
        let out = check(&d.toml, &d.env);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{} with {:?}:\n{}",
            d.origin,
            d.env.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            output_text(&out)
        );
    }
    // No proxy.toml under deploy/ escapes the check: each one is mounted by a compose service.
    for path in files_under(&deploy_dir()) {
        if has_ext(&path, &["toml"]) {
            let text = read(&path);
            assert!(
                deployed.iter().any(|d| d.toml == text),
                "{} is not mounted by any compose service",
                path.display()
            );
        }
    }
}

#[test]
fn image_builds_from_what_it_copies_and_checks_health_where_configs_serve() {
    let steps = dockerfile();
    let froms: Vec<&String> = steps
        .iter()
        .filter(|(op, _)| op == "FROM")
        .map(|(_, a)| a)
        .collect();
    assert_eq!(froms.len(), 2, "a builder and a runtime stage: {froms:?}");
    assert!(
        froms[0].starts_with("rust:1-bookworm"),
        "builder: {}",
        froms[0]
    );
    let runs: String = steps
        .iter()
        .filter(|(op, _)| op == "RUN")
        .map(|(_, a)| a.as_str())
        .collect();
    assert!(
        runs.contains("libclang-dev"),
        "pg_query's bindgen needs libclang-dev"
    );
    assert!(runs.contains("cargo build --release --locked"), "{runs}");

    // The build context: what the builder copies must hold every target Cargo.toml declares,
    // and .dockerignore must not leave any of it out.
    let runtime_start = steps
        .iter()
        .rposition(|(op, _)| op == "FROM")
        .expect("runtime FROM");
    let copied: BTreeSet<String> = steps[..runtime_start]
        .iter()
        .filter(|(op, a)| op == "COPY" && !a.starts_with("--from"))
        .flat_map(|(_, a)| {
            let words: Vec<&str> = a.split_whitespace().collect();
            words[..words.len() - 1]
                .iter()
                .map(|w| w.trim_end_matches('/').to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let manifest = toml_table(
        &read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")),
        "Cargo.toml",
    );
    let mut needed: BTreeSet<String> = ["Cargo.toml", "Cargo.lock", "src"].map(String::from).into();
    for (kind, dir) in [
        ("bench", "benches"),
        ("test", "tests"),
        ("example", "examples"),
    ] {
        if manifest.get(kind).is_some() {
            needed.insert(dir.to_string());
        }
    }
    let missing: Vec<&String> = needed.difference(&copied).collect();
    assert!(
        missing.is_empty(),
        "the builder does not COPY {missing:?} (copies {copied:?})"
    );
    let ignore = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join(".dockerignore"));
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(
        patterns.contains(&"target/") || patterns.contains(&"target"),
        ".dockerignore must leave out target/"
    );
    for path in &copied {
        for p in &patterns {
            let p = p.trim_end_matches('/');
            let hit = match p.strip_prefix("*.") {
                Some(ext) => path.ends_with(&format!(".{ext}")),
                None => path == p || path.starts_with(&format!("{p}/")),
            };
            assert!(!hit, ".dockerignore pattern {p:?} leaves out {path}");
        }
    }

    // The runtime stage: non-root, health checked on every shipped config's metrics port.
    let runtime = &steps[runtime_start..];
    let user = runtime
        .iter()
        .rfind(|(op, _)| op == "USER")
        .map(|(_, a)| a.clone())
        .expect("USER in the runtime stage");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "runs as {user}"
    );
    let entrypoint = exec_form(
        &runtime
            .iter()
            .rfind(|(op, _)| op == "ENTRYPOINT")
            .expect("ENTRYPOINT")
            .1,
    );
    let cmd = exec_form(&runtime.iter().rfind(|(op, _)| op == "CMD").expect("CMD").1);
    assert_eq!(cmd, ["--config", CONFIG_PATH]);
    let health = image_health_command(&steps);
    assert_eq!(
        health[0], entrypoint[0],
        "the health check runs the proxy binary"
    );
    let (host, port, path) = split_url(&health_url(&health));
    assert_eq!((host.as_str(), path.as_str()), ("127.0.0.1", "/health"));
    let exposed: BTreeSet<u16> = runtime
        .iter()
        .filter(|(op, _)| op == "EXPOSE")
        .flat_map(|(_, a)| {
            a.split_whitespace()
                .map(|p| p.parse::<u16>().expect("port"))
        })
        .collect();
    for d in deployed_configs() {
        let p = ports(&toml_table(&d.toml, &d.origin), &d.origin);
        assert_eq!(
            p.metrics, port,
            "{}: HEALTHCHECK uses port {port}",
            d.origin
        );
        assert!(
            exposed.contains(&p.metrics) && p.clients.is_subset(&exposed),
            "{}: EXPOSE {exposed:?}",
            d.origin
        );
    }
}

#[test]
fn compose_wires_healthchecks_prometheus_and_grafana_to_the_configs() {
    let compose = yaml("compose.yml");
    let services = compose["services"].as_object().expect("services");
    let postgres = &services["postgres"];
    assert!(str_at(postgres, "/image", "postgres").starts_with("postgres:16"));
    let command: Vec<&str> = array_at(postgres, "/command", "postgres")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(command.contains(&"wal_level=logical"), "{command:?}");
    assert!(str_at(&services["redis"], "/image", "redis").starts_with("redis:7"));

    let proxies = compose_proxies(&compose);
    assert!(proxies.len() >= 2, "two pgcache services");
    let mut targets = BTreeSet::new();
    for (name, service) in &proxies {
        let path = host_path(service, CONFIG_PATH).expect("proxy.toml mount");
        let config = toml_table(&read(&path), name);
        let p = ports(&config, name);
        let dockerfile = deploy_dir()
            .join(str_at(service, "/build/context", name))
            .join(str_at(service, "/build/dockerfile", name));
        assert!(dockerfile.is_file(), "{name}: no {}", dockerfile.display());
        let health: Vec<String> = array_at(service, "/healthcheck/test", name)
            .iter()
            .skip(1) // "CMD"
            .map(|a| a.as_str().expect("string").to_string())
            .collect();
        let (_, port, path) = split_url(&health_url(&health));
        assert_eq!((port, path.as_str()), (p.metrics, "/health"), "{name}");
        let container_ports: BTreeSet<u16> = array_at(service, "/ports", name)
            .iter()
            .map(|v| {
                let (addr, _, container) = published(v.as_str().expect("port string"));
                assert_eq!(addr, "127.0.0.1", "{name}: publish on loopback only");
                container
            })
            .collect();
        assert!(
            container_ports.contains(&p.metrics) && p.clients.is_subset(&container_ports),
            "{name}: publishes {container_ports:?}"
        );
        let grace = humantime::parse_duration(str_at(service, "/stop_grace_period", name))
            .expect("stop_grace_period");
        assert!(
            grace > shutdown_timeout(&config, name),
            "{name}: stop_grace_period {grace:?} must exceed proxy.shutdown_timeout"
        );
        let upstream = config["upstream"]["host"].as_str().expect("upstream.host");
        assert!(
            services.contains_key(upstream),
            "{name}: upstream.host {upstream} is no compose service"
        );
        targets.insert(format!("{name}:{}", p.metrics));
    }

    // Prometheus: scrapes exactly the proxies' metrics ports and loads rule files that exist.
    let prometheus = &services["prometheus"];
    let config_arg = array_at(prometheus, "/command", "prometheus")
        .iter()
        .filter_map(Value::as_str)
        .find_map(|a| a.strip_prefix("--config.file="))
        .expect("--config.file");
    let prom_path = host_path(prometheus, config_arg).expect("prometheus.yml mounted");
    let prom = yaml_docs(&prom_path).remove(0);
    let mut scraped = BTreeSet::new();
    for job in array_at(&prom, "/scrape_configs", "prometheus.yml") {
        let path = job
            .get("metrics_path")
            .and_then(Value::as_str)
            .unwrap_or("/metrics");
        assert_eq!(path, "/metrics");
        for sc in array_at(job, "/static_configs", "scrape job") {
            for t in array_at(sc, "/targets", "static config") {
                scraped.insert(t.as_str().expect("target").to_string());
            }
        }
    }
    assert_eq!(scraped, targets, "Prometheus targets");
    let rule_files: Vec<PathBuf> = array_at(&prom, "/rule_files", "prometheus.yml")
        .iter()
        .map(|f| host_path(prometheus, f.as_str().expect("path")).expect("rule file mounted"))
        .collect();
    assert!(
        rule_files
            .iter()
            .any(|f| f.ends_with("prometheus/alerts.yml")),
        "alerts.yml is not loaded: {rule_files:?}"
    );
    for f in &rule_files {
        assert!(f.is_file(), "rule file {} missing", f.display());
    }

    // Grafana: provisioning mounted; the dashboard provider's path holds pgcache.json; the data
    // source is the compose Prometheus.
    let grafana = &services["grafana"];
    let provisioning =
        host_path(grafana, "/etc/grafana/provisioning").expect("provisioning mounted");
    let providers = yaml_docs(&provisioning.join("dashboards/pgcache.yml")).remove(0);
    for p in array_at(&providers, "/providers", "dashboard provider") {
        let dir = host_path(grafana, str_at(p, "/options/path", "provider")).expect("mounted");
        assert!(
            dir.join("pgcache.json").is_file(),
            "no pgcache.json in {}",
            dir.display()
        );
    }
    let sources = yaml_docs(&provisioning.join("datasources/prometheus.yml")).remove(0);
    let url = str_at(
        &array_at(&sources, "/datasources", "datasources")[0],
        "/url",
        "datasource",
    );
    let (host, _, _) = split_url(url);
    assert!(services.contains_key(&host), "datasource {url}");
}

#[test]
fn kubernetes_probes_ports_and_drain_match_the_configmap() {
    let deployment = k8s_object("Deployment");
    let pod = &deployment["spec"]["template"];
    let container = k8s_container();
    assert_eq!(deployment["spec"]["replicas"], 3);

    // The ConfigMap mounted where --config points.
    let args: Vec<&str> = array_at(&container, "/args", "container")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args, ["--config", CONFIG_PATH]);
    let mount = array_at(&container, "/volumeMounts", "container")
        .iter()
        .find(|m| CONFIG_PATH.starts_with(&format!("{}/", str_at(m, "/mountPath", "mount"))))
        .expect("a volume mounted over /etc/pgcache");
    let volume = array_at(pod, "/spec/volumes", "pod")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    let map_name = str_at(volume, "/configMap/name", "config volume");
    let map = k8s_objects()
        .into_iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == map_name)
        .expect("the mounted ConfigMap");
    let text = str_at(&map, "/data/proxy.toml", "ConfigMap");
    let config = toml_table(text, "ConfigMap");
    let p = ports(&config, "ConfigMap");

    let readiness = &container["readinessProbe"]["httpGet"];
    assert_eq!(readiness["path"], "/ready", "readiness is /ready");
    assert_eq!(probe_port(&container, &readiness["port"]), p.metrics);
    let liveness = &container["livenessProbe"];
    if let Some(get) = liveness.get("httpGet") {
        // /health is 503 while the upstream is down, /ready while draining: neither may kill.
        assert_eq!(
            get["path"], "/metrics",
            "liveness over HTTP must be /metrics"
        );
        assert_eq!(probe_port(&container, &get["port"]), p.metrics);
    } else {
        let port = probe_port(&container, &liveness["tcpSocket"]["port"]);
        assert_eq!(
            port, p.metrics,
            "liveness on the HTTP port (the client port closes while draining)"
        );
    }
    for (name, port) in array_at(&container, "/ports", "container")
        .iter()
        .map(|p| (p["name"].as_str(), p["containerPort"].as_u64()))
    {
        let port = port.expect("containerPort") as u16;
        assert!(
            port == p.metrics || p.clients.contains(&port),
            "container port {name:?} {port} is served by no listen address"
        );
    }

    // Drain: the grace period covers the preStop sleep and proxy.shutdown_timeout.
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .expect("preStop sleep");
    let drain = shutdown_timeout(&config, "ConfigMap").as_secs();
    assert!(
        grace > pre_stop + drain,
        "terminationGracePeriodSeconds {grace} <= preStop {pre_stop} + shutdown_timeout {drain}"
    );
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());

    // Service, PDB and ServiceMonitor select the pods and name ports that exist.
    let labels = pod["metadata"]["labels"]
        .as_object()
        .expect("pod labels")
        .clone();
    let selects = |selector: &Value| {
        selector
            .as_object()
            .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
    };
    let service = k8s_object("Service");
    assert!(selects(&service["spec"]["selector"]), "Service selector");
    let service_ports = array_at(&service, "/spec/ports", "Service");
    let mut target_ports = BTreeSet::new();
    for sp in service_ports {
        target_ports.insert(probe_port(&container, &sp["targetPort"]));
    }
    assert!(
        p.clients.is_subset(&target_ports) && target_ports.contains(&p.metrics),
        "{target_ports:?}"
    );
    let pdb = k8s_object("PodDisruptionBudget");
    assert!(
        selects(&pdb["spec"]["selector"]["matchLabels"]),
        "PDB selector"
    );
    let monitor = k8s_object("ServiceMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let service_labels = &service["metadata"]["labels"];
    let monitor_selects = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("ServiceMonitor selector")
        .iter()
        .all(|(k, v)| &service_labels[k] == v);
    assert!(monitor_selects, "the ServiceMonitor selects the Service");
    for e in array_at(&monitor, "/spec/endpoints", "ServiceMonitor") {
        let sp = service_ports
            .iter()
            .find(|sp| sp["name"] == e["port"])
            .expect("the ServiceMonitor names a Service port");
        assert_eq!(probe_port(&container, &sp["targetPort"]), p.metrics);
        assert_eq!(
            e.get("path").and_then(Value::as_str).unwrap_or("/metrics"),
            "/metrics"
        );
    }

    // The kustomization lists every manifest.
    let kustomization = yaml("kubernetes/kustomization.yaml");
    let listed: BTreeSet<&str> = array_at(&kustomization, "/resources", "kustomization")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for path in files_under(&deploy_dir().join("kubernetes")) {
        let name = path.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(
            name == "kustomization.yaml" || listed.contains(name),
            "{name} is not in kustomization.yaml"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployed_configs_serve_clients_with_their_environment() {
    for d in deployed_configs() {
        // The upstream password exists only in the environment (the file's [users] hold SCRAM
        // secrets), so the workload proves PGCACHE_UPSTREAM_* overrides reach the pools.
        let (_proxy, metrics, _client) = serving(&d).await;
        for path in ["/ready", "/health"] {
            let (status, body) = get(&metrics, path).await;
            assert_eq!(status, 200, "{} {path}: {body}", d.origin);
        }
        // The image's HEALTHCHECK, pointed at this proxy's metrics address.
        let health = image_health_command(&dockerfile());
        let (_, _, path) = split_url(&health_url(&health));
        let url = format!("http://{metrics}{path}");
        let args = health[1..]
            .iter()
            .map(|a| if a.starts_with("http://") { &url } else { a });
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgcache"));
        cmd.args(args);
        let out =
            tokio::task::spawn_blocking(move || output_within(&mut cmd, Duration::from_secs(30)))
                .await
                .expect("health check task");
        assert!(
            out.status.success(),
            "{}: {health:?}: {}",
            d.origin,
            output_text(&out)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_only_metrics_the_proxy_exports() {
    let refs = referenced_metrics();
    assert!(refs.len() > 20, "only {} metric names found", refs.len());
    // Scrape every deployed config after a workload (some series exist only once used).
    let mut samples: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    for d in deployed_configs() {
        let (_proxy, metrics, _client) = serving(&d).await;
        let (status, text) = get(&metrics, "/metrics").await;
        assert_eq!(status, 200, "{text}");
        for (name, sets) in scrape_samples(&text) {
            samples.entry(name).or_default().extend(sets);
        }
    }

    let mut missing = BTreeSet::new();
    let mut bad_labels = BTreeSet::new();
    for Named {
        origin,
        in_query,
        metric: r,
    } in &refs
    {
        // A histogram's own name has no series: queries name `_bucket`, `_sum` or `_count`;
        // prose may name the histogram.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| r.name.strip_suffix(s))
            .unwrap_or(&r.name);
        let sets = samples.get(&r.name).or_else(|| {
            (!in_query)
                .then(|| samples.get(&format!("{}_count", r.name)))
                .flatten()
        });
        let Some(sets) = sets else {
            missing.insert(family.to_string());
            continue;
        };
        for (label, op, value) in &r.matchers {
            // Target labels come from Prometheus, not from the proxy.
            if label == "instance" || label == "job" {
                continue;
            }
            let ok = if op == "=" {
                sets.iter().any(|s| s.get(label) == Some(value))
            } else {
                sets.iter().any(|s| s.contains_key(label))
            };
            if !ok {
                bad_labels.insert(format!("{origin}: {}{{{label}{op}\"{value}\"}}", r.name));
            }
        }
    }
    assert!(
        missing.is_empty() && bad_labels.is_empty(),
        "named in deploy/ but not exported by the proxy:\n  {}\nlabel matchers that match no \
         exported series:\n  {}",
        missing.into_iter().collect::<Vec<_>>().join("\n  "),
        bad_labels.into_iter().collect::<Vec<_>>().join("\n  ")
    );
}

#[test]
fn alert_rules_cover_the_agreed_conditions() {
    let alerts = yaml("prometheus/alerts.yml");
    let mut metrics = BTreeSet::new();
    for group in array_at(&alerts, "/groups", "alerts.yml") {
        for rule in array_at(group, "/rules", "group") {
            let name = str_at(rule, "/alert", "rule");
            let expr = str_at(rule, "/expr", name);
            str_at(rule, "/labels/severity", name);
            str_at(rule, "/annotations/summary", name);
            metrics.extend(metric_refs(expr).into_iter().map(|r| r.name));
        }
    }
    for m in [
        "pgcache_cache_hits_total",
        "pgcache_cache_misses_total",
        "pgcache_server_connections",
        "pgcache_pool_max_connections",
        "pgcache_slow_queries_total",
        "pgcache_queries_total",
        "pgcache_upstream_connect_errors_total",
    ] {
        assert!(metrics.contains(m), "no alert uses {m}: {metrics:?}");
    }
}
