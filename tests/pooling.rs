//! Session pooling: a server connection outlives its client and is reset before the next one;
//! a full pool turns clients away with 53300 naming the pool; a client that vanishes inside a
//! transaction leaves nothing behind; `min_idle` connections are opened ahead of time; a dead idle
//! connection is caught by the health check. Each test runs its own proxy (so its own pools); the
//! one that counts backends in `pg_stat_activity` uses its own database.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{connect, free_port, pg, proxy_config, try_connect, Proxy};

/// Hang guard for anything that waits on the proxy or PostgreSQL.
const HANG: Duration = Duration::from_secs(30);

fn start(extra: &str) -> Proxy {
    Proxy::start(&proxy_config(pg(), free_port(), extra))
}

/// One server connection per pool (plus `pool_keys` in `[pool]`); clients wait for it as long
/// as a hang guard allows.
fn start_single(pool_keys: &str) -> Proxy {
    start(&format!(
        "[pool]\nmax_size = 1\nacquire_timeout = \"30s\"\n{pool_keys}"
    ))
}

async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("select pg_backend_pid()")
        .get(0)
}

/// First column of the first row of a simple query, as text.
async fn simple_value(client: &tokio_postgres::Client, sql: &str) -> String {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").into()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

/// Polls `check` every 50 ms until it holds; panics with `what` after the hang guard.
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + HANG;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The session state a fresh client must see: no transaction open, nothing written in it.
async fn assert_clean_session(client: &tokio_postgres::Client, table: &str) {
    // Outside an explicit transaction every statement gets its own snapshot and no xid yet.
    assert_eq!(
        simple_value(
            client,
            "select (txid_current_if_assigned() is null and now() = statement_timestamp())::text"
        )
        .await,
        "true",
        "the next client must not inherit an open transaction"
    );
    assert_eq!(
        simple_value(client, &format!("select count(*) from {table}")).await,
        "0",
        "the vanished client's uncommitted insert must not be visible"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_connection_is_reused_by_next_client() {
    let proxy = start_single("");
    let url = proxy.url("app", "app", "app");
    let first = connect(&url).await;
    let pid = backend_pid(&first).await;
    drop(first);
    for _ in 0..3 {
        let next = connect(&url).await;
        assert_eq!(backend_pid(&next).await, pid, "same upstream backend");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returned_server_connection_is_reset() {
    let proxy = start_single("");
    let url = proxy.url("app", "app", "app");
    let default_work_mem = pg().psql("app", "show work_mem");
    assert_ne!(default_work_mem, "7MB");

    let first = connect(&url).await;
    let pid = backend_pid(&first).await;
    first
        .batch_execute(
            "set work_mem = '7MB';
             create temp table pooling_reset_tmp (x int);
             prepare pooling_reset_stmt as select 1;
             select pg_advisory_lock(74201);",
        )
        .await
        .expect("dirty the session");
    assert_eq!(simple_value(&first, "show work_mem").await, "7MB");
    drop(first);

    let second = connect(&url).await;
    assert_eq!(backend_pid(&second).await, pid, "same upstream backend");
    assert_eq!(
        simple_value(&second, "show work_mem").await,
        default_work_mem
    );
    assert_eq!(
        simple_value(
            &second,
            "select (to_regclass('pg_temp.pooling_reset_tmp') is null)::text"
        )
        .await,
        "true",
        "temp table must be gone"
    );
    assert_eq!(
        simple_value(
            &second,
            "select count(*) from pg_prepared_statements where name = 'pooling_reset_stmt'"
        )
        .await,
        "0",
        "prepared statement must be gone"
    );
    assert_eq!(
        simple_value(
            &second,
            "select count(*) from pg_locks where locktype = 'advisory' and objid = 74201"
        )
        .await,
        "0",
        "advisory lock must be released"
    );
}

/// Connects, retrying while the proxy answers 53300 (pool busy), up to the hang guard.
async fn connect_retrying_53300(url: &str) -> tokio_postgres::Client {
    let deadline = Instant::now() + HANG;
    loop {
        match try_connect(url).await {
            Ok(c) => return c,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS) => {
                assert!(
                    Instant::now() < deadline,
                    "pool never had a connection: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("connect to {url}: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_refuses_with_53300_naming_pool() {
    let proxy = start("[pool]\nmax_size = 1\nacquire_timeout = \"300ms\"\n");
    let url = proxy.url("app", "app", "app");
    // Opening the first server connection may itself take longer than 300 ms on a busy machine.
    let holder = connect_retrying_53300(&url).await;
    backend_pid(&holder).await;

    let db = support::refused(&url, "second client should not get a server connection").await;
    assert_eq!(db.code().code(), "53300", "{db:?}");
    assert_eq!(db.severity(), "FATAL");
    assert!(db.message().contains("app/app"), "{}", db.message());

    // Once the holder leaves, the connection is lent again. It goes back after its reset, which
    // may take longer than acquire_timeout.
    drop(holder);
    let next = connect_retrying_53300(&url).await;
    assert_eq!(simple_value(&next, "select 1").await, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_dropped_mid_transaction_leaves_clean_connection() {
    let proxy = start_single("");
    let url = proxy.url("app", "app", "app");
    let setup = connect(&url).await;
    setup
        .batch_execute("drop table if exists pooling_dropped; create table pooling_dropped (x int)")
        .await
        .expect("create table");
    drop(setup);

    let client = connect(&url).await;
    client
        .batch_execute("begin; insert into pooling_dropped values (1)")
        .await
        .expect("begin and insert");
    // Gone without COMMIT or ROLLBACK.
    drop(client);

    let next = connect(&url).await;
    assert_clean_session(&next, "pooling_dropped").await;
    next.batch_execute("begin; insert into pooling_dropped values (2); commit")
        .await
        .expect("the next client can write");
    assert_eq!(
        pg().psql(
            "app",
            "select string_agg(x::text, ',') from pooling_dropped"
        ),
        "2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_psql_mid_transaction_leaves_clean_connection() {
    let proxy = start_single("");
    let url = proxy.url("app", "app", "app");
    let setup = connect(&url).await;
    setup
        .batch_execute("drop table if exists pooling_killed; create table pooling_killed (x int)")
        .await
        .expect("create table");
    drop(setup);

    let conninfo = format!(
        "host=127.0.0.1 port={} user=app password=app dbname=app",
        proxy.port()
    );
    let mut psql = Command::new("psql")
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .arg(&conninfo)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn psql");
    let mut stdin = psql.stdin.take().expect("psql stdin");
    stdin
        .write_all(b"begin;\ninsert into pooling_killed values (1);\nselect 'inside';\n")
        .expect("write to psql");
    stdin.flush().expect("flush psql stdin");
    let stdout = psql.stdout.take().expect("psql stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        let line = rx
            .recv_timeout(HANG)
            .expect("psql reached the inside of its transaction (hang guard)");
        if line.trim() == "inside" {
            break;
        }
    }
    // SIGKILL: no Terminate, no ROLLBACK, just a closed socket.
    psql.kill().expect("kill psql");
    psql.wait().expect("reap psql");
    drop(stdin);

    let next = connect(&url).await;
    assert_clean_session(&next, "pooling_killed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_idle_opens_connections_ahead_of_time() {
    // Its own database, so only this proxy's pool shows up in pg_stat_activity.
    let db = "pooling_min_idle";
    pg().psql(
        "postgres",
        &format!("drop database if exists {db} with (force);\ncreate database {db} owner app;"),
    );
    let proxy = start("[pool]\nmin_idle = 3\nmax_size = 5\nacquire_timeout = \"30s\"\n");
    let count_sql =
        format!("select count(*) from pg_stat_activity where datname = '{db}' and usename = 'app'");
    // The pool for (database, user) is created by its first client.
    let first = connect(&proxy.url("app", "app", db)).await;
    backend_pid(&first).await;
    drop(first);
    wait_until("3 idle server connections", || {
        pg().psql("postgres", &count_sql)
            .parse::<u32>()
            .expect("count")
            >= 3
    });
    let opened: BTreeSet<i32> = pg()
        .psql(
            "postgres",
            &format!("select pid from pg_stat_activity where datname = '{db}' and usename = 'app'"),
        )
        .lines()
        .map(|l| l.parse().expect("pid"))
        .collect();
    // Clients get the connections opened in advance.
    let a = connect(&proxy.url("app", "app", db)).await;
    let b = connect(&proxy.url("app", "app", db)).await;
    for client in [&a, &b] {
        let pid = backend_pid(client).await;
        assert!(opened.contains(&pid), "{pid} not in {opened:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_idle_server_connection_is_replaced_by_health_check() {
    // Check every connection before lending it, however recently it was used.
    let proxy = start_single("health_check = true\nhealth_check_delay = \"0\"\n");
    let url = proxy.url("app", "app", "app");
    let first = connect(&url).await;
    let pid = backend_pid(&first).await;
    drop(first);
    // Wait until the connection is back in the pool (idle, after its reset), then kill it.
    wait_until("the server connection to go idle", || {
        pg().psql(
            "postgres",
            &format!("select state from pg_stat_activity where pid = {pid}"),
        ) == "idle"
    });
    assert_eq!(
        pg().psql("postgres", &format!("select pg_terminate_backend({pid})")),
        "t"
    );
    wait_until("the backend to exit", || {
        pg().psql(
            "postgres",
            &format!("select count(*) from pg_stat_activity where pid = {pid}"),
        ) == "0"
    });
    let next = connect(&url).await;
    let new_pid = backend_pid(&next).await;
    assert_ne!(new_pid, pid);
    assert_eq!(simple_value(&next, "select 1").await, "1");
}

/// `proxy.max_clients`: a client over the limit hears `53300` and the clients already in are
/// untouched; the slot of a client that leaves is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_over_max_clients_are_turned_away_until_one_leaves() {
    let proxy = start("[proxy]\nmax_clients = 2\n[pool]\nmode = \"transaction\"\n");
    let url = proxy.url("app", "app", "app");
    let first = connect(&url).await;
    let second = connect(&url).await;
    let err = try_connect(&url)
        .await
        .expect_err("a third client is over max_clients");
    let db = err.as_db_error().unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(db.code().code(), "53300", "{db:?}");
    assert_eq!(db.message(), "sorry, too many clients already");
    assert_eq!(simple_value(&first, "select 1").await, "1");
    assert_eq!(simple_value(&second, "select 2").await, "2");

    drop(second);
    let deadline = Instant::now() + HANG;
    let third = loop {
        match try_connect(&url).await {
            Ok(c) => break c,
            Err(e) => {
                // The proxy may not have seen the second client go yet.
                assert!(Instant::now() < deadline, "slot never came back: {e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(simple_value(&third, "select 3").await, "3");
    assert_eq!(simple_value(&first, "select 1").await, "1");
}
