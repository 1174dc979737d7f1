//! The `pgcache` binary under test: config rendering, `pgcache check`, and a running `Proxy`.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::{run, url, PgServer};

/// The base proxy.toml for tests in front of `pg`, listening on `listen_port`. `extra` is TOML
/// merged over it (tables merge, keys in `extra` win), so tests may override e.g. `[pool] mode`.
pub fn proxy_config(pg: &PgServer, listen_port: u16, extra: &str) -> String {
    let base = format!(
        r#"
[proxy]
listen = ["127.0.0.1:{listen_port}"]
shutdown_timeout = "30s"

[upstream]
host = "127.0.0.1"
port = {pg_port}
user = "app"
password = "app"

[pool]
mode = "session"
max_size = 20
acquire_timeout = "5s"

[auth]
method = "trust"

[users.app]
password = "app"
method = "scram-sha-256"
"#,
        pg_port = pg.port
    );
    let mut table: toml::Table = base.parse().expect("base proxy config parses");
    // PGCACHE_TEST_WITH_CACHE=1: every proxy caches every table (the whole suite can run with
    // the cache in the data path); a test's own [cache] still wins.
    if std::env::var("PGCACHE_TEST_WITH_CACHE").is_ok_and(|v| v == "1") {
        let cache: toml::Table = "[cache]\nenabled = true\n[[cache.rules]]\ntables = [\"*\"]\n"
            .parse()
            .expect("cache TOML");
        merge(&mut table, cache);
    }
    let extra: toml::Table = extra
        .parse()
        .unwrap_or_else(|e| panic!("extra proxy config is not TOML: {e}\n{extra}"));
    merge(&mut table, extra);
    toml::to_string(&table).expect("render proxy config")
}

pub fn merge(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// Runs `pgcache check --config <file with toml>` and returns its output.
pub fn run_check(config_toml: &str) -> Output {
    let dir = tempfile::tempdir().expect("temp dir for config");
    let path = dir.path().join("proxy.toml");
    fs::write(&path, config_toml).expect("write proxy.toml");
    Command::new(env!("CARGO_BIN_EXE_pgcache"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run pgcache check")
}

/// The `pgcache` binary under test, killed on drop (its log is printed if the test panicked).
pub struct Proxy {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Proxy {
    /// Writes `config_toml` to a temp file and runs `pgcache --config <file>` (RUST_LOG=info);
    /// waits until `proxy.listen[0]` accepts TCP.
    pub fn start(config_toml: &str) -> Proxy {
        Proxy::start_env(config_toml, &[])
    }

    /// `start` with extra environment variables (e.g. `PGCACHE_POOL_MAX_SIZE`).
    pub fn start_env(config_toml: &str, env: &[(&str, &str)]) -> Proxy {
        let table: toml::Table = config_toml.parse().expect("proxy config is TOML");
        let listen = table
            .get("proxy")
            .and_then(|p| p.get("listen"))
            .and_then(|l| l.as_array())
            .and_then(|l| l.first())
            .and_then(|a| a.as_str())
            .expect("proxy config has [proxy] listen = [\"127.0.0.1:PORT\", ...]");
        let dir = tempfile::tempdir().expect("temp dir for proxy");
        let path = dir.path().join("proxy.toml");
        fs::write(&path, config_toml).expect("write proxy.toml");
        let path = path.to_str().expect("utf-8 temp path").to_string();
        Proxy::spawn(dir, &["--config", &path], env, listen)
    }

    /// CLI-flag mode, e.g. `["--listen", "127.0.0.1:PORT", "--upstream", url]`; waits for `--listen`.
    pub fn start_args(args: &[&str]) -> Proxy {
        let listen = args
            .iter()
            .position(|a| *a == "--listen")
            .and_then(|i| args.get(i + 1))
            .expect("start_args needs --listen ADDR");
        let dir = tempfile::tempdir().expect("temp dir for proxy");
        Proxy::spawn(dir, args, &[], listen)
    }

    fn spawn(dir: tempfile::TempDir, args: &[&str], env: &[(&str, &str)], listen: &str) -> Proxy {
        let addr: SocketAddr = listen
            .parse()
            .unwrap_or_else(|e| panic!("listen address {listen:?}: {e}"));
        let log = fs::File::create(dir.path().join("proxy.log")).expect("create proxy.log");
        let child = Command::new(env!("CARGO_BIN_EXE_pgcache"))
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("PGCACHE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1") // plain log lines that tests can search
            .envs(env.iter().copied())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn pgcache");
        let mut proxy = Proxy { child, addr, dir };
        proxy.wait_listening();
        proxy
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("poll pgcache") {
                panic!("pgcache exited early ({status}); log:\n{}", self.log());
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "pgcache not listening on {} after 20 s; log:\n{}",
                    self.addr,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// URL of this proxy for `user`/`password`/`db`.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        url(self.port(), user, password, db)
    }

    /// The config file a `start`ed proxy reads (edit it, then RELOAD or SIGHUP).
    pub fn config_path(&self) -> std::path::PathBuf {
        self.dir.path().join("proxy.toml")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the proxy wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// Sends a signal by name (`"HUP"`, `"TERM"`, `"INT"`...) with `kill -s`.
    pub fn signal(&self, sig: &str) {
        run(Command::new("kill")
            .args(["-s", sig])
            .arg(self.pid().to_string()));
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll pgcache") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- pgcache log ({}) ---\n{}", self.addr, self.log());
        }
    }
}
