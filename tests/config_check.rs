//! `pgcache check --config`: exit 0 for a valid file, exit 2 with every problem (key and line)
//! otherwise, environment overrides included. Quick mode (`--listen`/`--upstream` without a file)
//! runs a working proxy on loopback and refuses trust authentication anywhere else.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{connect, free_port, pg, run_check, Proxy};

/// Everything the command printed, stdout then stderr.
fn printed(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_valid(out: &Output) {
    assert_eq!(out.status.code(), Some(0), "{}", printed(out));
}

/// Asserts exit code 2 and returns what was printed.
fn assert_invalid(out: &Output) -> String {
    let text = printed(out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    text
}

/// Runs the binary with `args` and `env` (and without inherited `PGCACHE_*` variables), with a
/// hang guard: a proxy that should refuse to start must not keep running.
fn run_pgcache(args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgcache"));
    cmd.args(args).current_dir(dir.path());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("PGCACHE_")) {
        cmd.env_remove(k);
    }
    let mut child = cmd
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pgcache");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("poll pgcache").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("pgcache output");
            panic!("pgcache {args:?} kept running:\n{}", printed(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("pgcache output")
}

/// `pgcache check --config <file>` with extra environment variables.
fn check_with_env(config_toml: &str, env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config_toml).expect("write proxy.toml");
    let path = path.to_str().expect("utf-8 path").to_string();
    run_pgcache(&["check", "--config", &path], env)
}

#[test]
fn repo_proxy_toml_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    if !path.exists() {
        eprintln!("no proxy.toml at the repo root; skipping");
        return;
    }
    let out = run_pgcache(
        &["check", "--config", path.to_str().expect("utf-8 path")],
        &[],
    );
    assert_valid(&out);
}

#[test]
fn minimal_config_is_valid() {
    assert_valid(&run_check(""));
    assert_valid(&run_check(
        "[proxy]\nlisten = [\"127.0.0.1:6432\"]\n\n[upstream]\nhost = \"127.0.0.1\"\nport = 5432\n",
    ));
}

#[test]
fn type_error_is_reported_with_its_line() {
    let text = assert_invalid(&run_check("[pool]\n\nmax_size = \"many\"\n"));
    assert!(text.contains("line 3"), "{text}");
    assert!(text.contains("max_size"), "{text}");
}

#[test]
fn unknown_key_is_reported_with_its_line() {
    let text = assert_invalid(&run_check("[pool]\nmax_size = 5\nmax_sise = 3\n"));
    assert!(text.contains("line 3"), "{text}");
    assert!(text.contains("max_sise"), "{text}");
}

#[test]
fn every_semantic_problem_is_reported_with_key_and_line() {
    let config = "\
[proxy]
listen = [\"0.0.0.0:6432\"]
worker_threads = 5000

[pool]
max_size = 0
min_idle = 4

[auth]
method = \"trust\"

[cache]
enabled = true
[cache.redis]
url = \"redis://127.0.0.1:6379\"
timeout = \"0\"
bump_timeout = \"0\"
failures_to_open = 0
";
    let text = assert_invalid(&run_check(config));
    assert!(text.contains("line 3: proxy.worker_threads"), "{text}");
    assert!(text.contains("line 6: pool.max_size"), "{text}");
    assert!(text.contains("line 7: pool.min_idle"), "{text}");
    assert!(text.contains("line 10: auth.method"), "{text}");
    assert!(text.contains("loopback"), "{text}");
    assert!(text.contains("line 16: cache.redis.timeout"), "{text}");
    assert!(text.contains("line 17: cache.redis.bump_timeout"), "{text}");
    assert!(
        text.contains("line 18: cache.redis.failures_to_open"),
        "{text}"
    );
}

#[test]
fn type_error_unknown_key_and_bad_values_are_all_reported_at_once() {
    let config = "\
[proxy]
listen = [\"127.0.0.1:6432\"]
max_clients = \"many\"

[pool]
max_sise = 3
max_size = 0
";
    let text = assert_invalid(&run_check(config));
    assert!(
        text.contains("line 3") && text.contains("max_clients"),
        "type error missing: {text}"
    );
    assert!(
        text.contains("line 6") && text.contains("max_sise"),
        "unknown key missing: {text}"
    );
    assert!(
        text.contains("line 7: pool.max_size"),
        "bad value missing: {text}"
    );
}

/// `upstream.require_auth`: an empty list (the proxy could never log in) and a method that
/// does not exist are named with their line.
#[test]
fn upstream_require_auth_is_checked() {
    let text = assert_invalid(&run_check("[upstream]\nport = 5432\nrequire_auth = []\n"));
    assert!(text.contains("line 3: upstream.require_auth"), "{text}");
    let text = assert_invalid(&run_check(
        "[upstream]\nrequire_auth = [\"scram-sha-256\", \"kerberos\"]\n",
    ));
    assert!(
        text.contains("line 2") && text.contains("kerberos"),
        "{text}"
    );
    // Channel binding required, SCRAM not allowed: no login could ever succeed.
    let text = assert_invalid(&run_check(
        "[upstream]\nrequire_auth = [\"md5\"]\n[upstream.tls]\nmode = \"require\"\n\
         channel_binding = \"require\"\n",
    ));
    assert!(
        text.contains("line 2: upstream.require_auth") && text.contains("scram-sha-256"),
        "{text}"
    );
}

#[test]
fn trust_on_non_loopback_listen_is_refused() {
    let text = assert_invalid(&run_check(
        "[proxy]\nlisten = [\"127.0.0.1:6432\", \"0.0.0.0:6433\"]\n",
    ));
    assert!(text.contains("auth.method"), "{text}");
    assert!(text.contains("trust"), "{text}");
    assert!(text.contains("loopback"), "{text}");
    // With client authentication configured, the same listen addresses are fine.
    assert_valid(&run_check(
        "[proxy]\nlisten = [\"127.0.0.1:6432\", \"0.0.0.0:6433\"]\n\
         [auth]\nmethod = \"scram-sha-256\"\n[users.app]\npassword = \"app\"\n",
    ));
}

#[test]
fn env_override_problem_names_its_key() {
    let config = "[pool]\nmin_idle = 0\n";
    assert_valid(&check_with_env(config, &[]));
    let text = assert_invalid(&check_with_env(config, &[("PGCACHE_POOL_MAX_SIZE", "0")]));
    assert!(text.contains("pool.max_size"), "{text}");
    let text = assert_invalid(&check_with_env(
        config,
        &[("PGCACHE_POOL_MAX_SIZE", "lots")],
    ));
    assert!(text.contains("PGCACHE_POOL_MAX_SIZE"), "{text}");
    // A valid override passes.
    assert_valid(&check_with_env(config, &[("PGCACHE_POOL_MAX_SIZE", "7")]));
}

#[test]
fn env_override_problem_is_not_blamed_on_the_file_line() {
    // The file's value is fine; the bad one comes from the environment.
    let config = "[pool]\nmax_size = 20\n";
    let text = assert_invalid(&check_with_env(config, &[("PGCACHE_POOL_MAX_SIZE", "0")]));
    assert!(text.contains("pool.max_size"), "{text}");
    assert!(text.contains("PGCACHE_POOL_MAX_SIZE"), "{text}");
    assert!(!text.contains("line 2"), "{text}");
}

#[test]
fn invalid_config_refuses_to_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("proxy.toml");
    let port = free_port();
    std::fs::write(
        &path,
        format!("[proxy]\nlisten = [\"127.0.0.1:{port}\"]\n[pool]\nmax_size = 0\n"),
    )
    .expect("write proxy.toml");
    let out = run_pgcache(&["--config", path.to_str().expect("utf-8 path")], &[]);
    let text = assert_invalid(&out);
    assert!(text.contains("pool.max_size"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_mode_flags_run_a_working_proxy() {
    let listen = format!("127.0.0.1:{}", free_port());
    let upstream = format!("postgres://app:app@127.0.0.1:{}/app", pg().port);
    let proxy = Proxy::start_args(&["--listen", &listen, "--upstream", &upstream]);
    // Trust on loopback: the client needs no password; the proxy logs in with the URL's.
    let client = connect(&proxy.url("app", "", "app")).await;
    let row = client
        .query_one("select current_user::text, current_database()::text", &[])
        .await
        .expect("query through quick-mode proxy");
    assert_eq!(row.get::<_, String>(0), "app");
    assert_eq!(row.get::<_, String>(1), "app");
}

#[test]
fn quick_mode_on_non_loopback_refuses_trust() {
    // Refused before any connection is made: the upstream need not exist.
    let listen = format!("0.0.0.0:{}", free_port());
    let upstream = "postgres://app:app@127.0.0.1:5432/app";
    let out = run_pgcache(&["--listen", &listen, "--upstream", upstream], &[]);
    let text = assert_invalid(&out);
    assert!(text.contains("trust"), "{text}");
    assert!(text.contains("loopback"), "{text}");
}
