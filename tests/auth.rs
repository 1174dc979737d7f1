//! Client authentication per user from `proxy.toml` (scram-sha-256, md5, trust, reject, with
//! cleartext passwords or `pg_authid`-style secrets) and upstream authentication with the
//! credentials the proxy holds (SCRAM, md5, `server_password`, `server_user`). Errors are the ones
//! a PostgreSQL user expects: 28P01, 28000, 3D000.

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use support::{connect, free_port, pg, proxy_config, try_connect, Proxy};

/// A proxy in front of the shared PostgreSQL with `extra` merged over the base config.
fn start(extra: &str) -> Proxy {
    Proxy::start(&proxy_config(pg(), free_port(), extra))
}

/// SQLSTATE of a server (or proxy) error; panics with the error when it is not one.
fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {e:?}"))
        .code()
        .code()
        .to_string()
}

/// The error of a connection attempt that must fail.
async fn connect_err(url: &str) -> tokio_postgres::Error {
    match try_connect(url).await {
        Ok(_) => panic!("connecting to {url} should have failed"),
        Err(e) => e,
    }
}

async fn current_user(url: &str) -> String {
    connect(url)
        .await
        .query_one("select current_user::text", &[])
        .await
        .expect("select current_user")
        .get(0)
}

/// `psql -X -A -t -w -c sql conninfo` with extra environment, under a 60 s hang guard.
fn psql(conninfo: &str, sql: &str, env: &[(&str, &str)]) -> Output {
    support::output_within(
        Command::new("psql")
            .args(["-X", "-A", "-t", "-w", "-c", sql])
            .arg(conninfo)
            .env_remove("PGPASSWORD")
            .envs(env.iter().copied()),
        Duration::from_secs(60),
    )
}

#[tokio::test]
async fn scram_with_cleartext_password_authenticates_client() {
    let proxy = start("");
    assert_eq!(current_user(&proxy.url("app", "app", "app")).await, "app");
}

#[tokio::test]
async fn scram_with_stored_secret_authenticates_client() {
    let secret = postgres_protocol::password::scram_sha_256(b"app");
    assert!(secret.starts_with("SCRAM-SHA-256$"), "{secret}");
    // A secret cannot log in upstream, so the upstream password is given separately.
    let proxy = start(&format!(
        "[users.app]\npassword = \"{secret}\"\nmethod = \"scram-sha-256\"\nserver_password = \"app\"\n"
    ));
    assert_eq!(current_user(&proxy.url("app", "app", "app")).await, "app");
    let e = connect_err(&proxy.url("app", "nope", "app")).await;
    assert_eq!(sqlstate(&e), "28P01", "{e:?}");
}

#[tokio::test]
async fn md5_with_cleartext_password_authenticates_client() {
    let proxy = start("[users.app]\npassword = \"app\"\nmethod = \"md5\"\n");
    assert_eq!(current_user(&proxy.url("app", "app", "app")).await, "app");
    let e = connect_err(&proxy.url("app", "nope", "app")).await;
    assert_eq!(sqlstate(&e), "28P01", "{e:?}");
}

#[tokio::test]
async fn md5_with_stored_secret_authenticates_client() {
    let secret = postgres_protocol::password::md5(b"md5pass", "md5user");
    assert!(secret.starts_with("md5") && secret.len() == 35, "{secret}");
    let proxy = start(&format!(
        "[users.md5user]\npassword = \"{secret}\"\nmethod = \"md5\"\nserver_password = \"md5pass\"\n"
    ));
    assert_eq!(
        current_user(&proxy.url("md5user", "md5pass", "app")).await,
        "md5user"
    );
    let e = connect_err(&proxy.url("md5user", "md5wrong", "app")).await;
    assert_eq!(sqlstate(&e), "28P01", "{e:?}");
}

#[tokio::test]
async fn trust_user_connects_without_password() {
    // trustuser is trusted by the upstream too; app is trusted by the proxy, which still logs in
    // upstream with app's configured password.
    let proxy = start(
        "[users.trustuser]\nmethod = \"trust\"\n\
         [users.app]\npassword = \"app\"\nmethod = \"trust\"\n",
    );
    assert_eq!(
        current_user(&proxy.url("trustuser", "", "app")).await,
        "trustuser"
    );
    assert_eq!(current_user(&proxy.url("app", "", "app")).await, "app");
}

#[tokio::test]
async fn reject_user_gets_fatal_28000() {
    let proxy = start("[users.other]\npassword = \"other\"\nmethod = \"reject\"\n");
    let e = connect_err(&proxy.url("other", "other", "app")).await;
    assert_eq!(sqlstate(&e), "28000", "{e:?}");
    let db = e.as_db_error().expect("db error");
    assert_eq!(db.severity(), "FATAL");
    // Other users are unaffected.
    assert_eq!(current_user(&proxy.url("app", "app", "app")).await, "app");
}

#[tokio::test]
async fn wrong_password_gets_fatal_28p01() {
    let proxy = start("");
    let e = connect_err(&proxy.url("app", "wrong", "app")).await;
    assert_eq!(sqlstate(&e), "28P01", "{e:?}");
    let db = e.as_db_error().expect("db error");
    assert_eq!(db.severity(), "FATAL");
    assert!(db.message().contains("app"), "{}", db.message());
    // The proxy keeps serving the right password.
    assert_eq!(current_user(&proxy.url("app", "app", "app")).await, "app");
}

#[tokio::test]
async fn unknown_user_with_scram_default_gets_28p01() {
    let proxy = start("[auth]\nmethod = \"scram-sha-256\"\n");
    let e = connect_err(&proxy.url("nobody", "whatever", "app")).await;
    assert_eq!(sqlstate(&e), "28P01", "{e:?}");
    // Same answer as a wrong password for a known user: no user enumeration.
    let known = connect_err(&proxy.url("app", "whatever", "app")).await;
    assert_eq!(
        e.as_db_error()
            .expect("db error")
            .message()
            .replace("nobody", "X"),
        known
            .as_db_error()
            .expect("db error")
            .message()
            .replace("app", "X")
    );
}

#[tokio::test]
async fn upstream_scram_login_uses_configured_password() {
    // The harness stores app's secret as SCRAM and pg_hba asks for scram-sha-256.
    assert_eq!(
        pg().psql(
            "postgres",
            "select rolpassword like 'SCRAM-SHA-256$%' from pg_authid where rolname = 'app'"
        ),
        "t"
    );
    let proxy = start("");
    let client = connect(&proxy.url("app", "app", "app")).await;
    let row = client
        .query_one("select current_user::text, current_database()::text", &[])
        .await
        .expect("identity query");
    assert_eq!(row.get::<_, String>(0), "app");
    assert_eq!(row.get::<_, String>(1), "app");
}

#[tokio::test]
async fn upstream_cleartext_password_login() {
    // pg_hba asks pwuser for a cleartext password; the client itself uses SCRAM with the proxy.
    let proxy = start("[users.pwuser]\npassword = \"pwpass\"\nmethod = \"scram-sha-256\"\n");
    assert_eq!(
        current_user(&proxy.url("pwuser", "pwpass", "app")).await,
        "pwuser"
    );
    let proxy = start("[users.pwuser]\nmethod = \"trust\"\nserver_password = \"nope\"\n");
    let e = connect_err(&proxy.url("pwuser", "", "app")).await;
    assert_eq!(sqlstate(&e), "28P01");
}

#[tokio::test]
async fn upstream_md5_login_for_md5_user() {
    // md5user's server secret is md5 and pg_hba asks it for md5; the client uses SCRAM.
    assert_eq!(
        pg().psql(
            "postgres",
            "select rolpassword like 'md5%' from pg_authid where rolname = 'md5user'"
        ),
        "t"
    );
    let proxy = start("[users.md5user]\npassword = \"md5pass\"\nmethod = \"scram-sha-256\"\n");
    assert_eq!(
        current_user(&proxy.url("md5user", "md5pass", "app")).await,
        "md5user"
    );
}

#[tokio::test]
async fn server_password_differs_from_client_password() {
    let proxy = start(
        "[users.other]\npassword = \"client-side-secret\"\nmethod = \"scram-sha-256\"\n\
         server_password = \"other\"\n",
    );
    assert_eq!(
        current_user(&proxy.url("other", "client-side-secret", "app")).await,
        "other"
    );
    // The upstream password is not the client's password.
    let e = connect_err(&proxy.url("other", "other", "app")).await;
    assert_eq!(sqlstate(&e), "28P01", "{e:?}");
}

#[tokio::test]
async fn server_user_maps_client_name_to_upstream_role() {
    let proxy = start(
        "[users.alias]\npassword = \"aliaspw\"\nmethod = \"scram-sha-256\"\n\
         server_user = \"app\"\nserver_password = \"app\"\n",
    );
    assert_eq!(
        current_user(&proxy.url("alias", "aliaspw", "app")).await,
        "app"
    );
}

#[tokio::test]
async fn missing_upstream_password_gets_28p01() {
    // The proxy trusts `other` but has no upstream password for it; the upstream wants SCRAM.
    let proxy = start("[users.other]\nmethod = \"trust\"\n");
    let e = connect_err(&proxy.url("other", "", "app")).await;
    assert_eq!(sqlstate(&e), "28P01", "{e:?}");
    let db = e.as_db_error().expect("db error");
    assert!(db.message().contains("other"), "{}", db.message());
    assert!(db.message().contains("password"), "{}", db.message());
}

#[tokio::test]
async fn unknown_database_gets_3d000_from_upstream() {
    let proxy = start("");
    let e = connect_err(&proxy.url("app", "app", "no_such_db")).await;
    assert_eq!(sqlstate(&e), "3D000", "{e:?}");
    let db = e.as_db_error().expect("db error");
    assert!(db.message().contains("no_such_db"), "{}", db.message());
}

#[test]
fn psql_with_pgpassword_connects_through_proxy() {
    let proxy = start("");
    let conninfo = format!(
        "host=127.0.0.1 port={} user=app dbname=app sslmode=disable connect_timeout=30",
        proxy.port()
    );
    let out = psql(&conninfo, "select current_user", &[("PGPASSWORD", "app")]);
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "app");

    let out = psql(&conninfo, "select 1", &[("PGPASSWORD", "wrong")]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );
}

/// Over plain TCP there is no channel to bind to: the proxy offers SCRAM-SHA-256 alone, and a
/// client that picks SCRAM-SHA-256-PLUS anyway is refused with a protocol violation.
#[tokio::test]
async fn plain_tcp_offers_no_channel_binding_and_refuses_plus() {
    use support::raw::{message, startup_packet, RawConn};
    let proxy = start("");
    let mut conn = RawConn::connect(proxy.port()).await;
    conn.send(&startup_packet(&[("user", "app"), ("database", "app")]))
        .await;
    let (tag, body) = conn.read().await;
    assert_eq!(tag, b'R');
    // AuthenticationSASL (10) and its mechanisms, each NUL-terminated, then an empty one.
    assert_eq!(&body[..4], &10i32.to_be_bytes());
    assert_eq!(&body[4..], b"SCRAM-SHA-256\0\0");
    let mut initial = b"SCRAM-SHA-256-PLUS\0".to_vec();
    let first = b"p=tls-server-end-point,,n=,r=abcdefgh";
    initial.extend_from_slice(&(first.len() as i32).to_be_bytes());
    initial.extend_from_slice(first);
    conn.send(&message(b'p', &initial)).await;
    let (tag, body) = conn.read().await;
    assert_eq!(tag, b'E');
    let fields = support::raw::fields(&body);
    assert!(fields.contains(&(b'C', "08P01".to_string())), "{fields:?}");
}

/// The users whose upstream logins use each way the test cluster has (`pg_hba`): a cleartext
/// password, md5, nothing (`trust`). Clients log in to the proxy with SCRAM and these passwords.
const OTHER_WAYS: &str = "\
[users.pwuser]\npassword = \"pwpass\"\nmethod = \"scram-sha-256\"\n\
[users.md5user]\npassword = \"md5pass\"\nmethod = \"scram-sha-256\"\n\
[users.trustuser]\npassword = \"trusted\"\nmethod = \"scram-sha-256\"\n";

/// `upstream.require_auth`: a server that asks the proxy to log in another way than the list
/// allows (a cleartext password, md5, or nothing at all) is refused before the proxy answers,
/// and the client hears `08006` saying which way; listed ways log in as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_require_auth_refuses_the_ways_it_does_not_list() {
    let strict = start(&format!(
        "[upstream]\nrequire_auth = [\"scram-sha-256\"]\n{OTHER_WAYS}"
    ));
    assert_eq!(current_user(&strict.url("app", "app", "app")).await, "app");
    for (user, password, way) in [
        ("pwuser", "pwpass", "password"),
        ("md5user", "md5pass", "md5"),
        ("trustuser", "trusted", "none"),
    ] {
        let e = connect_err(&strict.url(user, password, "app")).await;
        assert_eq!(sqlstate(&e), "08006", "{user}: {e:?}");
        let message = e.as_db_error().map(|d| d.message().to_string());
        let message = message.unwrap_or_default();
        assert!(
            message.contains(&format!("asks for {way} authentication"))
                && message.contains("upstream.require_auth"),
            "{user}: {message}"
        );
    }
    let open = start(&format!(
        "[upstream]\nrequire_auth = [\"scram-sha-256\", \"md5\", \"password\", \"none\"]\n\
         {OTHER_WAYS}"
    ));
    for (user, password) in [
        ("pwuser", "pwpass"),
        ("md5user", "md5pass"),
        ("trustuser", "trusted"),
    ] {
        assert_eq!(current_user(&open.url(user, password, "app")).await, user);
    }
}
