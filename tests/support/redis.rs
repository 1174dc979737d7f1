//! A real redis-server on a free loopback port, no persistence; killed when dropped. `kill` and
//! `start` again on the same port simulate an outage. `start_tls` serves TLS only (with the test
//! CA); `RedisCluster` is three masters made into a cluster with `redis-cli --cluster create`.
//! `SlowPath` is a TCP path to one whose requests can be held back (a congested link, or a
//! client too busy to send in time).

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
    /// TLS files (and the temp dir holding them) when serving TLS.
    tls: Option<(super::TlsFiles, tempfile::TempDir)>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(Vec::new(), None)
    }

    fn start_with(extra: Vec<String>, tls: Option<(super::TlsFiles, tempfile::TempDir)>) -> Self {
        let mut r = RedisServer {
            port: super::free_port(),
            child: None,
            extra,
            tls,
        };
        r.restart();
        r
    }

    /// TLS on the port (no plain port); clients need the CA (`ca_path`).
    pub fn start_tls() -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = super::make_tls_files(dir.path());
        Self::start_with(Vec::new(), Some((files, dir)))
    }

    /// A cluster-enabled node (config file in `dir`).
    fn start_cluster_node(dir: &std::path::Path) -> RedisServer {
        // A cluster node also listens on its port + 10000 (the cluster bus): that one must be
        // free too, and outside the range `free_port` hands to other tests (20000-31999), or
        // another test's server may take it first and the node does not start.
        // (`free_port` goes round its range in 12,000 calls.)
        let port = (0..12_000)
            .map(|_| super::free_port())
            .find(|&p| {
                p >= 22_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok()
            })
            .expect("a free port with a free cluster bus port");
        let conf = dir.join(format!("nodes-{port}.conf"));
        let mut r = RedisServer {
            port,
            child: None,
            extra: vec![
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                conf.display().to_string(),
            ],
            tls: None,
        };
        r.restart();
        r
    }

    pub fn ca_path(&self) -> Option<std::path::PathBuf> {
        self.tls.as_ref().map(|(f, _)| f.ca.clone())
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        // The test certificate names localhost and 127.0.0.1.
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Start it (again) on its port and wait until it accepts connections.
    pub fn restart(&mut self) {
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            Some((f, _)) => {
                cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(&f.cert)
                    .arg("--tls-key-file")
                    .arg(&f.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&f.ca)
                    .args(["--tls-auth-clients", "no"]);
            }
            None => {
                cmd.args(["--port", &self.port.to_string()]);
            }
        }
        let child = cmd
            .args(["--bind", "127.0.0.1"])
            .args(&self.extra)
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Block the server for `seconds` (a slow Redis), in the background (a thread reaps
    /// redis-cli when the sleep ends).
    pub fn stall(&self, seconds: f64) {
        let mut child = Command::new("redis-cli")
            .args([
                "-p",
                &self.port.to_string(),
                "DEBUG",
                "SLEEP",
                &seconds.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli");
        std::thread::spawn(move || child.wait());
    }

    /// SIGKILL: no goodbye to connected clients.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three cluster masters holding every slot.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start_cluster_node(dir.path()))
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in &nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &n.port.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli cluster info");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster never became ok");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        RedisCluster { nodes, _dir: dir }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }
}

/// A TCP path to a Redis whose client-to-server direction can be slowed at will: every chunk
/// a client sends is forwarded, in order, `delay` after it was read (replies pass at once).
pub struct SlowPath {
    pub port: u16,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl SlowPath {
    /// Listen on a free loopback port (in the calling runtime) and relay to `upstream`.
    pub async fn start(upstream: u16) -> SlowPath {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("path listens");
        let port = listener.local_addr().expect("path address").port();
        let delay_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let delay = delay_ms.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                tokio::spawn(
                    async move { tokio::io::copy(&mut from_server, &mut to_client).await },
                );
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let delay = delay.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n @ 1..) = from_client.read(&mut buf).await {
                        let due = tokio::time::Instant::now()
                            + Duration::from_millis(delay.load(Ordering::Relaxed));
                        if tx.send((due, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    while let Some((due, chunk)) = rx.recv().await {
                        tokio::time::sleep_until(due).await;
                        if to_server.write_all(&chunk).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        SlowPath { port, delay_ms }
    }

    /// Hold back what clients send from now on by `d`.
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms
            .store(d.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}
