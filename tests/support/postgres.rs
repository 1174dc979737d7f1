//! PostgreSQL for tests: initdb into a temp dir, start under a watchdog, create the test roles.
//!
//! Statics are never dropped, so each server runs under a watchdog shell that polls this process's pid
//! and, once it is gone, stops PostgreSQL and removes the temp dir. PostgreSQL refuses to run as root:
//! as root, initdb/postgres/pg_ctl run as the `postgres` OS user through `runuser`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::{free_port, make_tls_files, run, url};

/// Roles created in every server: (name, password). `md5user`'s secret is stored as md5.
pub const ROLES: &[(&str, &str)] = &[
    ("app", "app"),
    ("md5user", "md5pass"),
    ("trustuser", ""),
    ("other", "other"),
    ("pwuser", "pwpass"),
];

/// The PostgreSQL shared by all tests of one binary. Do not `stop()` it: use `PgServer::start_new`.
pub fn pg() -> &'static PgServer {
    static PG: OnceLock<PgServer> = OnceLock::new();
    PG.get_or_init(|| PgServer::launch(PgOptions::default(), true))
}

#[derive(Clone, Debug, Default)]
pub struct PgOptions {
    /// Generate a CA + server certificate for localhost/127.0.0.1 and set `ssl = on`.
    pub ssl: bool,
}

/// One PostgreSQL server in a temp dir: data in `data_dir`, unix socket and log in its parent.
pub struct PgServer {
    pub port: u16,
    pub host: &'static str,
    pub data_dir: PathBuf,
    root: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    shared: bool,
    opts: PgOptions,
    watchdog: Mutex<Option<Child>>,
}

impl PgServer {
    /// A fresh, separate server (not shared); stopped and removed on drop.
    pub fn start_new(opts: PgOptions) -> PgServer {
        PgServer::launch(opts, false)
    }

    fn launch(opts: PgOptions, shared: bool) -> PgServer {
        let as_postgres = is_root();
        if as_postgres {
            ensure_postgres_user();
        }
        let root = tempfile::Builder::new()
            .prefix("pgcache-pg-")
            .tempdir()
            .expect("create temp dir for PostgreSQL")
            .keep();
        let data_dir = root.join("data");
        let server = PgServer {
            port: free_port(),
            host: "127.0.0.1",
            data_dir,
            root,
            bin: pg_bin_dir(),
            as_postgres,
            shared,
            opts,
            watchdog: Mutex::new(None),
        };
        server.init_cluster();
        server.start();
        server.create_roles();
        server
    }

    /// Connection URL over TCP to this server.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        url(self.port, user, password, db)
    }

    /// Run SQL (one or more statements) as superuser over the unix socket; returns unaligned,
    /// tuples-only stdout without the trailing newline. Panics with stderr on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let sock = self.root.to_str().expect("utf-8 temp dir path");
        let port = self.port.to_string();
        let mut child = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", "-"])
            .args(["-h", sock, "-p", &port, "-U", "postgres", "-d", db])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn psql");
        child
            .stdin
            .take()
            .expect("psql stdin")
            .write_all(sql.as_bytes())
            .expect("write SQL to psql");
        let out = child.wait_with_output().expect("wait for psql");
        if !out.status.success() {
            panic!(
                "psql -d {db} failed ({}):\n{sql}\n--- stderr ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .trim_end_matches('\n')
            .to_string()
    }

    /// Path of the CA certificate that signed the server certificate (`ssl: true` only).
    pub fn ca_pem_path(&self) -> PathBuf {
        assert!(self.opts.ssl, "ca_pem_path: server was started without ssl");
        self.root.join("ca.pem")
    }

    /// The server's log (stderr of postgres and the watchdog).
    pub fn log(&self) -> String {
        fs::read_to_string(self.root.join("postgres.log")).unwrap_or_default()
    }

    /// Start (or restart after `stop`) on the same port and data dir; waits until it accepts.
    pub fn start(&self) {
        let mut guard = self.watchdog.lock().expect("watchdog lock");
        if let Some(child) = guard.as_mut() {
            if child.try_wait().expect("poll watchdog").is_none() {
                return; // already running
            }
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("postgres.log"))
            .expect("open postgres.log");
        let mut postgres = self.pg_command("postgres");
        postgres
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-p", &self.port.to_string()]);
        let postgres_argv = std::iter::once(postgres.get_program())
            .chain(postgres.get_args())
            .map(|s| s.to_owned());
        // Argument order: test pid, temp root, data dir, then the postgres argv.
        let child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("pgcache-pg-watchdog")
            .arg(std::process::id().to_string())
            .arg(&self.root)
            .arg(&self.data_dir)
            .args(postgres_argv)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn PostgreSQL watchdog shell");
        *guard = Some(child);
        self.wait_ready(guard.as_mut().expect("watchdog just set"));
    }

    /// Stop the server (fast shutdown) and wait for it; the data dir is kept for `start`.
    pub fn stop(&self) {
        let mut guard = self.watchdog.lock().expect("watchdog lock");
        let Some(mut child) = guard.take() else {
            return;
        };
        if child.try_wait().expect("poll watchdog").is_none() {
            let out = self
                .pg_command("pg_ctl")
                .arg("stop")
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", "fast", "-w", "-t", "30"])
                .output()
                .expect("run pg_ctl stop");
            if !out.status.success() {
                let _ = child.kill();
                panic!(
                    "pg_ctl stop failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        // The watchdog notices the postmaster is gone within 0.5 s and exits.
        let _ = child.wait();
    }

    fn wait_ready(&self, child: &mut Child) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("poll watchdog") {
                panic!("PostgreSQL exited early ({status}); log:\n{}", self.log());
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args([
                    "-q",
                    "-h",
                    self.host,
                    "-p",
                    &self.port.to_string(),
                    "-t",
                    "1",
                ])
                .status()
                .expect("run pg_isready");
            if ready.success() {
                return;
            }
            if Instant::now() > deadline {
                panic!("PostgreSQL not ready after 30 s; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn init_cluster(&self) {
        if self.as_postgres {
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres:")
                .arg(&self.root));
        }
        run(self
            .pg_command("initdb")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8"])
            .args(["--locale=C", "--no-sync"]));
        let mut conf = format!(
            "\n# pgcache test harness\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\nmax_connections = 200\nshared_buffers = 32MB\n\
             wal_level = logical\npassword_encryption = 'scram-sha-256'\n",
            self.root.display()
        );
        if self.opts.ssl {
            self.write_tls_files();
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        append(&self.data_dir.join("postgresql.conf"), &conf);
        fs::write(self.data_dir.join("pg_hba.conf"), HBA).expect("write pg_hba.conf");
    }

    fn write_tls_files(&self) {
        let tls = make_tls_files(&self.root);
        let cert = self.data_dir.join("server.crt");
        let key = self.data_dir.join("server.key");
        fs::copy(&tls.cert, &cert).expect("copy server.crt into data dir");
        fs::copy(&tls.key, &key).expect("copy server.key into data dir");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod server.key");
        if self.as_postgres {
            run(Command::new("chown").arg("postgres:").arg(&cert).arg(&key));
        }
    }

    fn create_roles(&self) {
        self.psql(
            "postgres",
            "CREATE ROLE app LOGIN PASSWORD 'app';\n\
             CREATE ROLE trustuser LOGIN;\n\
             CREATE ROLE other LOGIN PASSWORD 'other';\n\
             CREATE ROLE pwuser LOGIN PASSWORD 'pwpass';\n\
             SET password_encryption = 'md5';\n\
             CREATE ROLE md5user LOGIN PASSWORD 'md5pass';\n\
             CREATE DATABASE app OWNER app;\n\
             GRANT ALL ON DATABASE app TO app, md5user, trustuser, other, pwuser;\n",
        );
        self.psql(
            "app",
            "GRANT ALL ON SCHEMA public TO app, md5user, trustuser, other;",
        );
    }

    /// A PostgreSQL program from the chosen bin dir, as the `postgres` user when we are root.
    fn pg_command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        cmd.current_dir(&self.root); // postgres may not be allowed into the test's cwd
        cmd
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.shared {
            return;
        }
        let mut guard = self.watchdog.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut child) = guard.take() {
            let _ = self
                .pg_command("pg_ctl")
                .arg("stop")
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", "immediate", "-w"])
                .output();
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Runs postgres ("$@" after 3 fixed args) and, once the test process is gone, stops it and removes
/// the temp dir. Exits on its own when postgres stops (`PgServer::stop`), keeping the data dir.
/// (`kill -0 $pg` fails after postgres exits because sh reaps it while waiting for `sleep`.)
const WATCHDOG: &str = r#"
testpid=$1; root=$2; data=$3; shift 3
"$@" &
pg=$!
while kill -0 "$testpid" 2>/dev/null; do
    kill -0 "$pg" 2>/dev/null || exit 0
    sleep 0.5
done
# SIGQUIT = immediate shutdown. Signal the postmaster itself, not runuser: runuser answers
# SIGTERM by waiting 2 s before killing its child.
if [ -f "$data/postmaster.pid" ]; then
    kill -QUIT "$(head -n 1 "$data/postmaster.pid")" 2>/dev/null
else
    kill "$pg" 2>/dev/null
fi
wait "$pg" 2>/dev/null
rm -rf "$root"
exit 0
"#;

const HBA: &str = "\
local all all trust
host all trustuser 127.0.0.1/32 trust
host all md5user 127.0.0.1/32 md5
host all pwuser 127.0.0.1/32 password
host all all 127.0.0.1/32 scram-sha-256
";

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("run id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

fn ensure_postgres_user() {
    let exists = Command::new("id")
        .arg("postgres")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run id postgres")
        .success();
    if !exists {
        let out = Command::new("useradd")
            .args(["--system", "--user-group", "postgres"])
            .output()
            .expect("run useradd");
        assert!(
            out.status.success(),
            "running as root, PostgreSQL needs a `postgres` OS user and `useradd --system postgres` \
             failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Path of a PostgreSQL program (`pgbench`, `psql`...) from the same installation as the server.
pub fn pg_bin(name: &str) -> PathBuf {
    pg_bin_dir().join(name)
}

/// `/usr/lib/postgresql/<highest>/bin` (Debian layout), else the dir of `initdb` on PATH.
fn pg_bin_dir() -> PathBuf {
    let highest = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version);
    if let Some((_, bin)) = highest {
        return bin;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .find(|dir| dir.join("initdb").exists())
        .expect("PostgreSQL not found: no /usr/lib/postgresql/*/bin/initdb nor initdb on PATH")
}

fn append(path: &Path, text: &str) {
    fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}
