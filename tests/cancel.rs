//! `CancelRequest` through the proxy: clients hold the proxy's own `BackendKeyData`, and a cancel
//! carrying it is forwarded to the upstream backend running that client's query. Checked with
//! tokio-postgres's cancel token, with Ctrl-C (SIGINT) in psql, and with raw packets.
//! Each test waits until its query is visibly running in `pg_stat_activity` before cancelling,
//! so a cancel never arrives before the query it targets.

mod support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{connect, free_port, pg, proxy_config, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Hang guard: a cancel that does not work leaves `pg_sleep(30)` running past it.
const CANCEL_GUARD: Duration = Duration::from_secs(10);
const HANG: Duration = Duration::from_secs(30);

fn start() -> Proxy {
    Proxy::start(&proxy_config(pg(), free_port(), ""))
}

/// Waits until a backend runs a statement containing `marker` (superuser view of pg_stat_activity).
fn wait_running(marker: &str) {
    let sql = format!(
        "select count(*) from pg_stat_activity where state = 'active' \
         and query like '%{marker}%' and pid <> pg_backend_pid()"
    );
    let deadline = Instant::now() + HANG;
    while pg().psql("postgres", &sql) != "1" {
        assert!(
            Instant::now() < deadline,
            "query {marker} never started running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `pg_sleep(30)` (tagged `marker`) on `client`, cancels it with the client's cancel token
/// once it runs, and checks that it failed with PostgreSQL's 57014.
async fn cancel_a_sleep(client: &Arc<tokio_postgres::Client>, marker: &'static str) {
    let running = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .simple_query(&format!("select pg_sleep(30) /* {marker} */"))
                .await
        })
    };
    tokio::task::spawn_blocking(move || wait_running(marker))
        .await
        .expect("wait for query");
    client
        .cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send cancel request to the proxy");
    let result = tokio::time::timeout(CANCEL_GUARD, running)
        .await
        .expect("query still running: the cancel did not reach the upstream backend")
        .expect("query task");
    let e = result.expect_err("the cancelled query must fail");
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {e:?}"));
    assert_eq!(db.code().code(), "57014", "{db:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_token_cancels_running_query_with_57014() {
    let proxy = start();
    let client = Arc::new(connect(&proxy.url("app", "app", "app")).await);
    cancel_a_sleep(&client, "cancel_token_marker").await;

    // The session carries on.
    let one: i32 = client
        .query_one("select 1", &[])
        .await
        .expect("query after cancel")
        .get(0);
    assert_eq!(one, 1);
}

#[test]
fn psql_ctrl_c_cancels_running_query() {
    let proxy = start();
    let conninfo = format!(
        "host=127.0.0.1 port={} user=app password=app dbname=app",
        proxy.port()
    );
    let mut psql = Command::new("psql")
        .args([
            "-X",
            "-c",
            "select pg_sleep(30) /* psql_ctrl_c_marker */",
            &conninfo,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn psql");
    wait_running("psql_ctrl_c_marker");
    let status = Command::new("kill")
        .args(["-s", "INT", &psql.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let deadline = Instant::now() + CANCEL_GUARD;
    while psql.try_wait().expect("poll psql").is_none() {
        if Instant::now() > deadline {
            let _ = psql.kill();
            panic!("psql still running after Ctrl-C: the cancel did not reach the upstream");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = psql.wait_with_output().expect("psql output");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
}

/// A minimal wire-protocol client: enough to see the `BackendKeyData` the proxy hands out.
struct Raw {
    tcp: TcpStream,
}

impl Raw {
    /// Logs in as `trustuser` (trusted by proxy and upstream); returns the client and its key.
    async fn login(port: u16) -> (Raw, (i32, [u8; 4])) {
        let mut tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to proxy");
        let mut body = Vec::new();
        body.extend_from_slice(&196608i32.to_be_bytes());
        for s in ["user", "trustuser", "database", "app", ""] {
            body.extend_from_slice(s.as_bytes());
            body.push(0);
        }
        let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        tcp.write_all(&packet).await.expect("send startup packet");
        let mut raw = Raw { tcp };
        let mut key = None;
        loop {
            let (tag, body) = raw.read().await;
            match tag {
                b'K' => {
                    assert_eq!(body.len(), 8, "protocol 3.0 key is pid + 4-byte secret");
                    let pid = i32::from_be_bytes(body[..4].try_into().expect("4 bytes"));
                    key = Some((pid, body[4..8].try_into().expect("4 bytes")));
                }
                b'E' => panic!("login failed: {}", String::from_utf8_lossy(&body)),
                b'Z' => break,
                _ => {}
            }
        }
        (raw, key.expect("the proxy sends BackendKeyData"))
    }

    async fn read(&mut self) -> (u8, Vec<u8>) {
        let mut head = [0u8; 5];
        tokio::time::timeout(HANG, self.tcp.read_exact(&mut head))
            .await
            .expect("read from proxy (hang guard)")
            .expect("read message header");
        let len = i32::from_be_bytes(head[1..].try_into().expect("4 bytes")) as usize;
        let mut body = vec![0u8; len - 4];
        self.tcp
            .read_exact(&mut body)
            .await
            .expect("read message body");
        (head[0], body)
    }

    async fn send_query(&mut self, sql: &str) {
        let mut msg = vec![b'Q'];
        msg.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
        msg.extend_from_slice(sql.as_bytes());
        msg.push(0);
        self.tcp.write_all(&msg).await.expect("send query");
    }

    /// Reads to `ReadyForQuery`: the first column of the first row, and the SQLSTATE of an error.
    async fn results(&mut self) -> (Option<String>, Option<String>) {
        let (mut value, mut code) = (None, None);
        loop {
            let (tag, body) = self.read().await;
            match tag {
                b'D' if value.is_none() => {
                    let len = i32::from_be_bytes(body[2..6].try_into().expect("4 bytes"));
                    value = Some(String::from_utf8_lossy(&body[6..6 + len as usize]).into());
                }
                b'E' => {
                    let mut fields = body.split(|b| *b == 0);
                    code = fields
                        .find(|f| f.first() == Some(&b'C'))
                        .map(|f| String::from_utf8_lossy(&f[1..]).into());
                }
                b'Z' => return (value, code),
                _ => {}
            }
        }
    }
}

/// Sends a CancelRequest for (pid, secret) to the proxy and waits until the proxy closes the
/// connection, which it does once it has dealt with the request.
async fn send_cancel(port: u16, pid: i32, secret: [u8; 4]) {
    let mut tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to proxy");
    let mut packet = Vec::new();
    packet.extend_from_slice(&16i32.to_be_bytes());
    packet.extend_from_slice(&80877102i32.to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(&secret);
    tcp.write_all(&packet).await.expect("send CancelRequest");
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(HANG, tcp.read_to_end(&mut sink))
        .await
        .expect("proxy closes the cancel connection (hang guard)");
}

/// PostgreSQL cancels whatever a backend runs when the request arrives, and a forwarded cancel
/// can arrive after the statement it was meant for: a server connection a cancel was sent for is
/// not given to another client (the pool's only connection, so the next client gets a new one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_a_cancel_was_sent_for_serves_no_other_client() {
    let extra = "[pool]\nmode = \"transaction\"\nmax_size = 1\n";
    let proxy = Proxy::start(&proxy_config(pg(), free_port(), extra));
    let url = proxy.url("app", "app", "app");
    let client = Arc::new(connect(&url).await);
    let pid = |c: Arc<tokio_postgres::Client>| async move {
        let row = c.query_one("select pg_backend_pid()", &[]).await.unwrap();
        row.get::<_, i32>(0)
    };
    let before = pid(client.clone()).await;
    cancel_a_sleep(&client, "pooled_cancel_marker").await;
    let other = Arc::new(connect(&url).await);
    assert_ne!(pid(other).await, before, "a fresh server connection");
    assert_ne!(pid(client).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_hands_out_its_own_keys_and_maps_cancels() {
    let proxy = start();
    let (mut raw, (key_pid, key_secret)) = Raw::login(proxy.port()).await;
    raw.send_query("select pg_backend_pid()").await;
    let upstream_pid: i32 = raw.results().await.0.expect("a row").parse().expect("pid");
    assert_ne!(
        key_pid, upstream_pid,
        "the client's key is the proxy's, not the upstream backend's"
    );

    raw.send_query("select pg_sleep(30) /* raw_cancel_marker */")
        .await;
    tokio::task::spawn_blocking(|| wait_running("raw_cancel_marker"))
        .await
        .expect("wait for query");

    // The upstream's pid with the client's secret is not a key the proxy gave anyone.
    send_cancel(proxy.port(), upstream_pid, key_secret).await;
    let still_running = tokio::task::spawn_blocking(move || {
        pg().psql(
            "postgres",
            &format!("select state from pg_stat_activity where pid = {upstream_pid}"),
        )
    })
    .await
    .expect("query pg_stat_activity");
    assert_eq!(
        still_running, "active",
        "an unknown key must cancel nothing"
    );

    // The proxy's key cancels the query on the upstream backend serving this client.
    send_cancel(proxy.port(), key_pid, key_secret).await;
    let (_, code) = tokio::time::timeout(CANCEL_GUARD, raw.results())
        .await
        .expect("query still running: the cancel was not forwarded");
    assert_eq!(code.as_deref(), Some("57014"));

    raw.send_query("select 2").await;
    assert_eq!(raw.results().await, (Some("2".into()), None));
}
