//! TLS on both sides of the proxy. Client-facing: `SSLRequest` answered per `tls.mode` (disable,
//! allow, require) with a certificate from files, checked with psql's sslmode. Upstream: a private
//! PostgreSQL with `ssl = on` reached with `upstream.tls.mode` require/prefer/verify-full, checked
//! with `pg_stat_ssl` on the server side. `GSSENCRequest` is refused with 'N' so clients fall back.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use support::{connect, free_port, make_tls_files, pg, proxy_config, Proxy};
use support::{tls_relay, PgOptions, PgServer, TlsFiles};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One private PostgreSQL with `ssl = on` for the upstream tests of this binary (never stopped
/// here; its watchdog removes it when the test process ends).
fn ssl_pg() -> &'static PgServer {
    static SSL_PG: OnceLock<PgServer> = OnceLock::new();
    SSL_PG.get_or_init(|| PgServer::start_new(PgOptions { ssl: true }))
}

/// Certificate, key and CA for the proxy's client-facing side, in a temp dir kept by the caller.
fn client_tls_files() -> (tempfile::TempDir, TlsFiles) {
    let dir = tempfile::tempdir().expect("temp dir for TLS files");
    let files = make_tls_files(dir.path());
    (dir, files)
}

fn client_tls_config(mode: &str, files: &TlsFiles) -> String {
    format!(
        "[tls]\nmode = \"{mode}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        files.cert.display(),
        files.key.display()
    )
}

/// `psql -X -A -t -w` with each of `commands` as a `-c`, under a 60 s hang guard.
fn psql(conninfo: &str, commands: &[&str]) -> Output {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-A", "-t", "-w"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(conninfo)
        .env("PGPASSWORD", "app")
        .env("PGCONNECT_TIMEOUT", "30");
    support::output_within(&mut cmd, Duration::from_secs(60))
}

fn conninfo(proxy: &Proxy, extra: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user=app dbname=app {extra}",
        proxy.port()
    )
}

/// Connection string that checks the proxy's certificate against `ca` and its name. host=localhost
/// is the name checked; hostaddr keeps libpq off ::1, where nothing listens.
fn verify_full(proxy: &Proxy, ca: &Path) -> String {
    format!(
        "host=localhost hostaddr=127.0.0.1 port={} user=app dbname=app sslmode=verify-full \
         sslrootcert={}",
        proxy.port(),
        ca.display()
    )
}

/// Runs `\conninfo` and a query; returns (stdout, stderr) and whether psql succeeded.
fn psql_conninfo(conninfo: &str) -> (bool, String, String) {
    let out = psql(conninfo, &["\\conninfo", "select current_user"]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn client_tls_require_serves_sslmode_require() {
    let (_dir, files) = client_tls_files();
    let proxy = Proxy::start(&proxy_config(
        pg(),
        free_port(),
        &client_tls_config("require", &files),
    ));
    let (ok, stdout, stderr) = psql_conninfo(&conninfo(&proxy, "sslmode=require"));
    assert!(ok, "psql sslmode=require failed: {stderr}");
    assert!(stdout.contains("SSL connection"), "{stdout}");
    assert!(stdout.trim_end().ends_with("app"), "{stdout}");
}

#[test]
fn client_tls_require_refuses_plain_clients_naming_tls() {
    let (_dir, files) = client_tls_files();
    let proxy = Proxy::start(&proxy_config(
        pg(),
        free_port(),
        &client_tls_config("require", &files),
    ));
    let (ok, stdout, stderr) = psql_conninfo(&conninfo(&proxy, "sslmode=disable"));
    assert!(!ok, "plain connection should be refused: {stdout}");
    assert!(stderr.contains("TLS"), "{stderr}");
}

#[test]
fn client_tls_allow_serves_tls_and_plain() {
    let (_dir, files) = client_tls_files();
    let proxy = Proxy::start(&proxy_config(
        pg(),
        free_port(),
        &client_tls_config("allow", &files),
    ));
    let (ok, stdout, stderr) = psql_conninfo(&conninfo(&proxy, "sslmode=require"));
    assert!(ok, "psql sslmode=require failed: {stderr}");
    assert!(stdout.contains("SSL connection"), "{stdout}");

    let (ok, stdout, stderr) = psql_conninfo(&conninfo(&proxy, "sslmode=disable"));
    assert!(ok, "psql sslmode=disable failed: {stderr}");
    assert!(!stdout.contains("SSL connection"), "{stdout}");
    assert!(stdout.trim_end().ends_with("app"), "{stdout}");
}

/// SCRAM bound to the TLS channel (SCRAM-SHA-256-PLUS with `tls-server-end-point`, as
/// PostgreSQL offers it): a client that requires channel binding logs in over TLS, with the right
/// password only, and after a reload binds to the renewed certificate.
#[test]
fn scram_binds_to_the_tls_certificate_for_clients_that_require_it() {
    let (_dir, files) = client_tls_files();
    let proxy = Proxy::start(&proxy_config(
        pg(),
        free_port(),
        &client_tls_config("allow", &files),
    ));
    let bound = |extra: &str| {
        psql_conninfo(&conninfo(
            &proxy,
            &format!("sslmode=require channel_binding=require {extra}"),
        ))
    };
    let (ok, stdout, stderr) = bound("");
    assert!(ok, "channel_binding=require failed: {stderr}");
    assert!(stdout.contains("SSL connection"), "{stdout}");
    assert!(stdout.trim_end().ends_with("app"), "{stdout}");

    let (ok, _, stderr) = bound("password=wrong");
    assert!(!ok, "a wrong password logged in");
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );

    // A renewed certificate: the binding follows it (the old one's hash would not match).
    let renewed_dir = tempfile::tempdir().expect("temp dir");
    let renewed = make_tls_files(renewed_dir.path());
    std::fs::copy(&renewed.cert, &files.cert).expect("copy certificate");
    std::fs::copy(&renewed.key, &files.key).expect("copy key");
    let out = psql(
        &format!(
            "host=127.0.0.1 port={} user=pgcache dbname=pgcache sslmode=disable",
            proxy.port()
        ),
        &["RELOAD"],
    );
    assert!(out.status.success(), "RELOAD failed: {out:?}");
    // The renewed certificate is the one served (its CA verifies it), and bound to.
    let (ok, _, stderr) = bound(&format!(
        "sslmode=verify-ca sslrootcert={}",
        renewed.ca.display()
    ));
    assert!(
        ok,
        "channel_binding=require after a renewal failed: {stderr}"
    );
}

/// `SHOW CLIENTS` says which clients came over TLS, with which version and cipher suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_clients_names_each_clients_tls() {
    let (_dir, files) = client_tls_files();
    let proxy = Proxy::start(&proxy_config(
        pg(),
        free_port(),
        &client_tls_config("allow", &files),
    ));
    let port = proxy.port();
    // A TLS client that stays until killed (psql), and a plain one (tokio-postgres).
    let mut tls_client = Command::new("psql")
        .args(["-X", "-w", "-c", "select pg_sleep(120)"])
        .arg(format!(
            "host=127.0.0.1 port={port} user=app dbname=app sslmode=require"
        ))
        .env("PGPASSWORD", "app")
        .spawn()
        .expect("start psql");
    let _plain = connect(&proxy.url("app", "app", "app")).await;
    let admin = connect(&proxy.url("pgcache", "", "pgcache")).await;
    let mut seen = Vec::new();
    for _ in 0..600 {
        seen = admin
            .simple_query("SHOW CLIENTS")
            .await
            .expect("SHOW CLIENTS")
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) if r.get("user") == Some("app") => {
                    Some(r.get("tls").map(str::to_owned))
                }
                _ => None,
            })
            .collect();
        if seen.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen.sort();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0], None, "the plain client: {seen:?}");
    let tls = seen[1].as_deref().unwrap_or_default();
    assert!(tls.starts_with("TLSv1.3/TLS13_"), "{seen:?}");
    let _ = tls_client.kill();
    let _ = tls_client.wait();
}

#[test]
fn client_tls_disable_refuses_sslmode_require_and_serves_prefer_plain() {
    let proxy = Proxy::start(&proxy_config(
        pg(),
        free_port(),
        "[tls]\nmode = \"disable\"\n",
    ));
    let (ok, stdout, stderr) = psql_conninfo(&conninfo(&proxy, "sslmode=require"));
    assert!(!ok, "sslmode=require should fail without TLS: {stdout}");
    assert!(stderr.contains("SSL"), "{stderr}");

    let (ok, stdout, stderr) = psql_conninfo(&conninfo(&proxy, "sslmode=prefer"));
    assert!(ok, "psql sslmode=prefer failed: {stderr}");
    assert!(!stdout.contains("SSL connection"), "{stdout}");
    assert!(stdout.trim_end().ends_with("app"), "{stdout}");
}

#[test]
fn client_tls_certificate_verifies_full_against_ca() {
    let (_dir, files) = client_tls_files();
    let proxy = Proxy::start(&proxy_config(
        pg(),
        free_port(),
        &client_tls_config("require", &files),
    ));
    let (ok, stdout, stderr) = psql_conninfo(&verify_full(&proxy, &files.ca));
    assert!(ok, "psql verify-full failed: {stderr}");
    assert!(stdout.contains("SSL connection"), "{stdout}");

    // A different CA does not verify the proxy's certificate.
    let other = tempfile::tempdir().expect("temp dir");
    let other_ca = make_tls_files(other.path()).ca;
    let (ok, _, stderr) = psql_conninfo(&verify_full(&proxy, &other_ca));
    // (The CAs share a name, so OpenSSL reports a bad signature rather than an unknown issuer.)
    assert!(!ok, "verify-full against the wrong CA should fail");
    assert!(stderr.contains("SSL"), "{stderr}");
}

/// Proxy in front of the private TLS PostgreSQL with `upstream_tls` as `[upstream.tls]` body.
fn upstream_tls_proxy(upstream_tls: &str) -> Proxy {
    let server = ssl_pg();
    let extra = format!(
        "[upstream]\nport = {}\n\n[upstream.tls]\n{upstream_tls}",
        server.port
    );
    Proxy::start(&proxy_config(server, free_port(), &extra))
}

/// Whether the proxy's own server connection is TLS, as the upstream sees it.
async fn upstream_ssl(proxy: &Proxy) -> bool {
    connect(&proxy.url("app", "app", "app"))
        .await
        .query_one(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("query pg_stat_ssl")
        .get(0)
}

fn toml_path(p: &Path) -> String {
    p.display().to_string().replace('\\', "\\\\")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_verify_full_encrypts_server_connection() {
    let ca = toml_path(&ssl_pg().ca_pem_path());
    // The certificate names both localhost and 127.0.0.1: verify the IP (default: upstream.host)
    // and an explicit server_name.
    let by_ip = upstream_tls_proxy(&format!("mode = \"verify-full\"\nca_file = \"{ca}\"\n"));
    assert!(upstream_ssl(&by_ip).await);
    let by_name = upstream_tls_proxy(&format!(
        "mode = \"verify-full\"\nca_file = \"{ca}\"\nserver_name = \"localhost\"\n"
    ));
    assert!(upstream_ssl(&by_name).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_require_and_prefer_encrypt_disable_does_not() {
    let require = upstream_tls_proxy("mode = \"require\"\n");
    assert!(upstream_ssl(&require).await);
    let prefer = upstream_tls_proxy("mode = \"prefer\"\n");
    assert!(upstream_ssl(&prefer).await);
    let disable = upstream_tls_proxy("mode = \"disable\"\n");
    assert!(!upstream_ssl(&disable).await);
}

/// psql (`sslmode=require`, `channel_binding=binding`) to `port`, off the runtime's threads:
/// whether it logged in, and its stderr.
async fn psql_bound(port: u16, binding: &'static str) -> (bool, String) {
    let out = tokio::task::spawn_blocking(move || {
        let conninfo = format!(
            "host=127.0.0.1 port={port} user=app dbname=app sslmode=require \
             channel_binding={binding}"
        );
        psql(&conninfo, &["select 1"])
    })
    .await
    .expect("psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A client bound to the certificate it was shown — a relay's — is refused by the proxy with
/// PostgreSQL's error; the same relay passes a client that does not bind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_binds_is_refused_through_a_tls_man_in_the_middle() {
    let (_dir, files) = client_tls_files();
    let proxy = Proxy::start(&proxy_config(
        pg(),
        free_port(),
        &client_tls_config("require", &files),
    ));
    let relay_dir = tempfile::tempdir().expect("temp dir");
    let relay = tls_relay(proxy.port(), &files.ca, &make_tls_files(relay_dir.path())).await;
    let (ok, stderr) = psql_bound(relay, "disable").await;
    assert!(ok, "through the relay without binding: {stderr}");
    let (ok, stderr) = psql_bound(relay, "require").await;
    assert!(!ok, "a bound client logged in through a relay");
    assert!(
        stderr.contains("SCRAM channel binding check failed"),
        "{stderr}"
    );
}

/// `upstream.tls.mode = "require"` checks no certificate, so a relay with its own certificate
/// gets through the TLS handshake; SCRAM bound to the certificate the proxy was shown does not
/// (PostgreSQL binds to its own), so the proxy does not log in through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_scram_binding_catches_a_tls_man_in_the_middle() {
    let server = ssl_pg();
    let dir = tempfile::tempdir().expect("temp dir");
    let relay = tls_relay(
        server.port,
        &server.ca_pem_path(),
        &make_tls_files(dir.path()),
    )
    .await;
    // The relay works: a client that does not bind logs in through it; one that binds does not.
    assert!(psql_bound(relay, "disable").await.0);
    let (ok, stderr) = psql_bound(relay, "require").await;
    assert!(!ok, "a bound client logged in through the relay");
    assert!(
        stderr.contains("SCRAM channel binding check failed"),
        "{stderr}"
    );

    let proxy = Proxy::start(&proxy_config(
        server,
        free_port(),
        &format!("[upstream]\nport = {relay}\n\n[upstream.tls]\nmode = \"require\"\n"),
    ));
    let db = support::refused(
        &proxy.url("app", "app", "app"),
        "the proxy logged in through a man in the middle",
    )
    .await;
    // PostgreSQL's own error, as it sent it.
    assert_eq!(db.code().code(), "28000", "{db:?}");
    assert_eq!(db.message(), "SCRAM channel binding check failed");

    // A TLS-terminating hop put there on purpose: `channel_binding = "disable"` lets it be.
    let through = Proxy::start(&proxy_config(
        server,
        free_port(),
        &format!(
            "[upstream]\nport = {relay}\n\n[upstream.tls]\nmode = \"require\"\n\
             channel_binding = \"disable\"\n"
        ),
    ));
    assert!(upstream_ssl(&through).await);
}

/// `upstream.tls.channel_binding = "require"`: a bound login to a TLS server that offers it;
/// no login at all where the server offers no binding (plain TCP here), with the key named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_channel_binding_require_logs_in_bound_or_not_at_all() {
    let bound = upstream_tls_proxy("mode = \"require\"\nchannel_binding = \"require\"\n");
    assert!(upstream_ssl(&bound).await);
    // `prefer` on a server without TLS: plain TCP, nothing to bind to.
    let plain = Proxy::start(&proxy_config(
        pg(),
        free_port(),
        "[upstream.tls]\nmode = \"prefer\"\nchannel_binding = \"require\"\n",
    ));
    let db = support::refused(
        &plain.url("app", "app", "app"),
        "logged in upstream without channel binding",
    )
    .await;
    assert!(
        db.message().contains("upstream.tls.channel_binding"),
        "{db:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_verify_full_with_wrong_ca_fails_08006() {
    let other = tempfile::tempdir().expect("temp dir");
    let wrong_ca = toml_path(&make_tls_files(other.path()).ca);
    let proxy = upstream_tls_proxy(&format!(
        "mode = \"verify-full\"\nca_file = \"{wrong_ca}\"\n"
    ));
    let db = support::refused(
        &proxy.url("app", "app", "app"),
        "an unverifiable upstream certificate must not be accepted",
    )
    .await;
    assert_eq!(db.code().code(), "08006", "{db:?}");
    assert!(db.message().contains("TLS"), "{}", db.message());
    assert!(
        db.message()
            .contains(&format!("127.0.0.1:{}", ssl_pg().port)),
        "{}",
        db.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssenc_request_is_refused_with_n_and_client_falls_back() {
    let proxy = Proxy::start(&proxy_config(pg(), free_port(), ""));
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .expect("connect to proxy");
    // GSSENCRequest: length 8, code 80877104.
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30])
        .await
        .expect("send GSSENCRequest");
    let mut answer = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(20), tcp.read_exact(&mut answer))
        .await
        .expect("answer to GSSENCRequest (hang guard)")
        .expect("read answer to GSSENCRequest");
    assert_eq!(answer[0], b'N');

    // The same socket carries on with an ordinary startup, as libpq does after 'N'.
    let mut config: tokio_postgres::Config =
        proxy.url("app", "app", "app").parse().expect("parse URL");
    config.ssl_mode(tokio_postgres::config::SslMode::Disable);
    let (client, connection) = config
        .connect_raw(tcp, tokio_postgres::NoTls)
        .await
        .expect("startup after GSSENCRequest refused");
    tokio::spawn(connection);
    let one: i32 = client
        .query_one("select 1", &[])
        .await
        .expect("select 1")
        .get(0);
    assert_eq!(one, 1);
}

#[test]
fn psql_gssencmode_prefer_connects() {
    let proxy = Proxy::start(&proxy_config(pg(), free_port(), ""));
    let out = psql(
        &conninfo(&proxy, "gssencmode=prefer sslmode=prefer"),
        &["select current_user"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "app");
}

/// `RELOAD` reads the certificate and key again (a renewed certificate is usually written over
/// the old files): the next handshake presents the new one. A certificate that cannot be read
/// fails the reload with the key named, and the one in force stays.
#[test]
fn reload_serves_a_renewed_certificate_and_keeps_it_when_the_next_is_broken() {
    let (_dir, files) = client_tls_files();
    let proxy = Proxy::start(&proxy_config(
        pg(),
        free_port(),
        &client_tls_config("require", &files),
    ));
    let verified_by = |ca: &Path| psql_conninfo(&verify_full(&proxy, ca)).0;
    let reload = || {
        let out = psql(
            &format!(
                "host=127.0.0.1 port={} user=pgcache dbname=pgcache sslmode=require",
                proxy.port()
            ),
            &["RELOAD"],
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(verified_by(&files.ca));

    // Renewed: a certificate from another CA, written over the same files.
    let renewed_dir = tempfile::tempdir().expect("temp dir");
    let renewed = make_tls_files(renewed_dir.path());
    std::fs::copy(&renewed.cert, &files.cert).expect("copy certificate");
    std::fs::copy(&renewed.key, &files.key).expect("copy key");
    assert!(
        verified_by(&files.ca),
        "before RELOAD the old one is in force"
    );
    let (ok, stderr) = reload();
    assert!(ok, "RELOAD failed: {stderr}");
    assert!(
        verified_by(&renewed.ca),
        "RELOAD did not bring the renewed certificate"
    );
    assert!(!verified_by(&files.ca));

    // Broken: the reload fails naming the key, and the renewed certificate stays in force.
    std::fs::write(&files.cert, "not a certificate\n").expect("break certificate");
    let (ok, stderr) = reload();
    assert!(!ok, "RELOAD took a broken certificate");
    assert!(stderr.contains("tls.cert_file"), "{stderr}");
    assert!(verified_by(&renewed.ca));
}
