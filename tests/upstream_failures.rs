//! Failures of the upstream are contained (issue 2, point 8): a dead or restarting PostgreSQL, a
//! terminated backend, a server connection closed while idle, a health check cut short, a server
//! that skips its SCRAM signature — each gets the client the right error (08006 naming the
//! address, 57P01, 3D000) and never a hang.

mod support;

use std::process::Command;
use std::time::Duration;
use support::failure::*;
use support::raw::{self, RawConn};
use support::{connect, free_port, pg, proxy_config, try_connect, PgOptions, PgServer, Proxy};
use tokio_postgres::error::SqlState;

// ---------------------------------------------------------------------------------------------
// Upstream failures

#[tokio::test]
async fn dead_upstream_gives_fatal_08006_naming_the_address() {
    let dead = free_port();
    let mut proxy = Proxy::start(&proxy_config(
        pg(),
        free_port(),
        &format!("[upstream]\nport = {dead}\n[pool]\nacquire_timeout = \"1s\"\n"),
    ));
    let Err(err) = guard("connect", try_connect(&proxy.url("app", "app", "app"))).await else {
        panic!("no upstream: the connection fails");
    };
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("a server error, not {err:?}"));
    assert_eq!(db.code(), &SqlState::CONNECTION_FAILURE, "{db:?}");
    assert_eq!(db.severity(), "FATAL");
    assert!(
        db.message().contains(&format!("127.0.0.1:{dead}")),
        "message names the upstream address: {}",
        db.message()
    );
    // The raw view: one FATAL, then the connection closes.
    let mut conn = RawConn::connect(proxy.port()).await;
    conn.send(&raw::startup_packet(&[
        ("user", "trustuser"),
        ("database", "app"),
    ]))
    .await;
    let f = fatal_then_close(&mut conn).await;
    assert_eq!(field(&f, b'C'), Some("08006"), "{f:?}");
    assert_proxy_healthy(&mut proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_restart_fails_fast_then_reconnects() {
    let server = PgServer::start_new(PgOptions::default());
    let mut proxy = Proxy::start(&proxy_config(
        &server,
        free_port(),
        // Check every connection lent (the default skips the check for one used <1 s ago).
        "[pool]\nacquire_timeout = \"2s\"\nhealth_check_delay = \"0s\"\n",
    ));
    let url = proxy.url("app", "app", "app");
    let old = connect(&url).await;
    let one: i32 = old.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    works(&url).await; // leaves an idle connection in the pool

    server.stop();

    // A new client: an error naming the upstream, not a hang.
    let Err(err) = guard("connect while upstream is down", try_connect(&url)).await else {
        panic!("upstream down: the connection fails");
    };
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("a server error, not {err:?}"));
    assert_eq!(db.code(), &SqlState::CONNECTION_FAILURE, "{db:?}");
    assert!(
        db.message().contains(&format!("127.0.0.1:{}", server.port)),
        "{}",
        db.message()
    );
    // The old client's server is gone: its next query fails, it does not hang.
    let r = guard(
        "query on a client whose server died",
        old.query_one("select 1", &[]),
    )
    .await;
    assert!(r.is_err(), "query on a dead server connection succeeded?");

    server.start();
    // New clients work again: the pool reconnects.
    works(&url).await;
    works(&url).await;
    assert_proxy_healthy(&mut proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_connection_closed_while_idle_is_not_lent() {
    // Without a health check on check-out (a long health_check_delay), a pooled connection the
    // upstream closed while it sat idle (restart) must still not be lent: its socket already says
    // EOF, no round trip is needed to see it.
    let server = PgServer::start_new(PgOptions::default());
    let mut proxy = Proxy::start(&proxy_config(
        &server,
        free_port(),
        "[pool]\nacquire_timeout = \"10s\"\nhealth_check_delay = \"1h\"\n",
    ));
    let url = proxy.url("app", "app", "app");
    works(&url).await; // leaves an idle connection in the pool
    server.stop();
    server.start();
    let client = guard("connect after restart", connect(&url)).await;
    let r = guard(
        "first query after restart",
        client.query_one("select 1", &[]),
    )
    .await;
    match r {
        Ok(row) => assert_eq!(row.get::<_, i32>(0), 1),
        Err(e) => panic!(
            "a new client after an upstream restart was lent the closed connection: {:?}",
            e.as_db_error()
                .map(|d| (d.code().code().to_string(), d.message().to_string()))
        ),
    }
    assert_proxy_healthy(&mut proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_waiting_while_upstream_restarts_gets_connected() {
    let server = std::sync::Arc::new(PgServer::start_new(PgOptions::default()));
    let mut proxy = Proxy::start(&proxy_config(
        &server,
        free_port(),
        "[pool]\nacquire_timeout = \"90s\"\nhealth_check_delay = \"0s\"\n[upstream]\nretry_backoff = \"50ms\"\nretry_backoff_max = \"500ms\"\n",
    ));
    let url = proxy.url("app", "app", "app");
    works(&url).await;
    server.stop();
    // The client connects while the upstream is down and waits (retries with backoff)...
    let waiting = tokio::spawn({
        let url = url.clone();
        async move { try_connect(&url).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the client should still be waiting");
    // ...and gets its connection once the server is back.
    let restart = server.clone();
    tokio::task::spawn_blocking(move || restart.start())
        .await
        .unwrap();
    let client = guard("waiting client", waiting)
        .await
        .unwrap()
        .expect("connected after the upstream came back");
    let one: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    assert_proxy_healthy(&mut proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_backend_fails_its_client_and_others_continue() {
    let mut proxy = Proxy::start(&proxy_config(pg(), free_port(), ""));
    let url = proxy.url("app", "app", "app");
    let victim = connect(&url).await;
    let other = connect(&url).await;
    let pid: i32 = victim
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let sleeping = tokio::spawn(async move {
        let r = victim.simple_query("select pg_sleep(600)").await;
        (r, victim)
    });
    // Terminate the victim's backend from outside the proxy once it runs the sleep.
    let admin = connect(&pg().url("app", "app", "app")).await;
    guard("victim starts sleeping", async {
        loop {
            let active: bool = admin
                .query_one(
                    "select exists (select 1 from pg_stat_activity where pid = $1 and query like '%pg_sleep%' and state = 'active')",
                    &[&pid],
                )
                .await
                .unwrap()
                .get(0);
            if active {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let _ = admin
        .query_one("select pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let (r, victim) = guard("victim's query", sleeping).await.unwrap();
    let err = r.expect_err("terminated backend: the query fails");
    assert_eq!(
        err.code(),
        Some(&SqlState::ADMIN_SHUTDOWN),
        "PostgreSQL's own FATAL reaches the client: {err:?}"
    );
    let r = guard(
        "next query of the victim",
        victim.query_one("select 1", &[]),
    )
    .await;
    assert!(r.is_err(), "the victim's connection is closed");

    let v: i32 = other.query_one("select 3", &[]).await.unwrap().get(0);
    assert_eq!(v, 3);
    works(&url).await;
    assert_proxy_healthy(&mut proxy);
}

#[tokio::test]
async fn client_gone_mid_result_frees_its_server_connection() {
    let mut proxy = Proxy::start(&proxy_config(
        pg(),
        free_port(),
        "[pool]\nmax_size = 1\nacquire_timeout = \"30s\"\n",
    ));
    for _ in 0..3 {
        let mut conn = RawConn::login_trust(proxy.port()).await;
        conn.send(&raw::query(
            "select repeat('r', 1000) from generate_series(1, 1000000)",
        ))
        .await;
        for _ in 0..10 {
            conn.read().await;
        }
        drop(conn); // mid-result
                    // The only server connection must come back (or be replaced) for the next client.
        let mut next = guard(
            "login after a client left mid-result",
            RawConn::login_trust(proxy.port()),
        )
        .await;
        assert_eq!(raw::tags(&next.simple("select 1").await), "TDCZ");
    }
    assert_proxy_healthy(&mut proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_cut_short_does_not_desync_the_next_client() {
    // A stopped (SIGSTOP) backend makes the check-out health check wait past acquire_timeout.
    // The connection must not go back to the pool with that check's reply still owed.
    let server = PgServer::start_new(PgOptions::default());
    let mut proxy = Proxy::start(&proxy_config(
        &server,
        free_port(),
        "[pool]\nmax_size = 1\nacquire_timeout = \"2s\"\nhealth_check_delay = \"0s\"\n",
    ));
    let url = proxy.url("app", "app", "app");
    works(&url).await;
    // The pooled connection, idle after its reset.
    let pid = guard("pooled connection idle", async {
        loop {
            let out = server.psql(
                "postgres",
                "select pid from pg_stat_activity where usename = 'app' and state = 'idle' \
                 and query = 'DISCARD ALL'",
            );
            if !out.is_empty() {
                break out;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args(["-s", sig, &pid])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -s {sig} {pid}");
    };
    signal("STOP");
    let r = guard("connect while the backend is stopped", try_connect(&url)).await;
    signal("CONT");
    assert!(
        r.is_err(),
        "no usable server connection within acquire_timeout"
    );
    // Whatever the pool lends now must answer this client's query, not the old health check.
    let client = guard("connect", connect(&url)).await;
    let rows = guard("select 42", client.simple_query("select 42"))
        .await
        .expect("select 42");
    let values: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(values, vec!["42"], "the reply belongs to this query");
    let v: i32 = guard("select 43", client.query_one("select 43", &[]))
        .await
        .expect("select 43")
        .get(0);
    assert_eq!(v, 43);
    assert_proxy_healthy(&mut proxy);
}

#[tokio::test]
async fn unknown_database_gets_3d000_from_upstream() {
    let mut proxy = Proxy::start(&proxy_config(pg(), free_port(), ""));
    let Err(err) = guard("connect", try_connect(&proxy.url("app", "app", "nope"))).await else {
        panic!("unknown database: the connection fails");
    };
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("a server error, not {err:?}"));
    assert_eq!(db.code(), &SqlState::INVALID_CATALOG_NAME, "{db:?}");
    assert_eq!(db.severity(), "FATAL");
    assert_eq!(db.message(), "database \"nope\" does not exist");

    // Byte for byte what PostgreSQL says to the same login.
    let mut replies = Vec::new();
    for port in [pg().port, proxy.port()] {
        let mut conn = RawConn::connect(port).await;
        conn.send(&raw::startup_packet(&[
            ("user", "trustuser"),
            ("database", "nope"),
        ]))
        .await;
        replies.push(conn.until_closed().await);
    }
    // PostgreSQL itself says AuthenticationOk first; the proxy, which authenticated the client
    // before asking the upstream, sends the error alone. The error is the same.
    for r in &replies {
        assert_eq!(r.last().map(|m| m.0), Some(b'E'), "got {}", raw::tags(r));
    }
    assert_eq!(
        replies[0].last(),
        replies[1].last(),
        "ErrorResponse differs from PostgreSQL's"
    );
    works(&proxy.url("app", "app", "app")).await;
    assert_proxy_healthy(&mut proxy);
}

/// A hostile upstream that takes the proxy's SCRAM proof and says Ok without ever proving it
/// knows the password (no SASLFinal): the proxy does not log in (SCRAM is mutual).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_skips_its_scram_signature_is_not_trusted() {
    use support::raw::message;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _startup = s.read(&mut buf).await?;
                let sasl = [&10i32.to_be_bytes()[..], b"SCRAM-SHA-256\0\0"].concat();
                s.write_all(&message(b'R', &sasl)).await?;
                let n = s.read(&mut buf).await?;
                // 'p', length, mechanism, data length, then "n,,n=,r=<nonce>".
                let first = String::from_utf8_lossy(&buf[..n]).into_owned();
                let nonce = first.rsplit("r=").next().unwrap_or("").to_string();
                let server_first = format!("r={nonce}SERVER,s=c2FsdHNhbHQ=,i=4096");
                let cont = [&11i32.to_be_bytes()[..], server_first.as_bytes()].concat();
                s.write_all(&message(b'R', &cont)).await?;
                let _final = s.read(&mut buf).await?;
                // No SASLFinal: straight to Ok and ReadyForQuery.
                s.write_all(&message(b'R', &0i32.to_be_bytes())).await?;
                s.write_all(&message(b'Z', b"I")).await?;
                let _ = s.read(&mut buf).await;
                Ok::<_, std::io::Error>(())
            });
        }
    });
    let proxy = Proxy::start(&proxy_config(
        pg(),
        free_port(),
        &format!("[upstream]\nport = {port}\nconnect_timeout = \"2s\"\n\n[pool]\nacquire_timeout = \"2s\"\n"),
    ));
    let db = support::refused(
        &proxy.url("app", "app", "app"),
        "logged in through an upstream that never proved it knows the password",
    )
    .await;
    assert!(db.message().contains("without its signature"), "{db:?}");
}
