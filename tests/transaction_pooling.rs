//! Transaction pooling against a real PostgreSQL: clients share a few server connections without
//! noticing — prepared statements, settings and session state follow each client; timeouts fire.

mod support;

use std::time::Duration;
use support::{free_port, pg, proxy_config, Proxy};
use tokio_postgres::SimpleQueryMessage;

/// A proxy in transaction mode; `pool` holds extra `[pool]` keys (max_size defaults to 1).
fn tx_proxy(pool: &str) -> Proxy {
    let size = if pool.contains("max_size") {
        ""
    } else {
        "max_size = 1\n"
    };
    let extra = format!("[pool]\nmode = \"transaction\"\n{size}{pool}");
    Proxy::start(&proxy_config(pg(), free_port(), &extra))
}

/// A table the app user owns.
fn table(name: &str, columns: &str) {
    pg().psql(
        "app",
        &format!("create table if not exists {name} ({columns}); alter table {name} owner to app"),
    );
}

fn first_value(rows: &[SimpleQueryMessage]) -> Option<String> {
    rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

async fn show(c: &tokio_postgres::Client, q: &str) -> String {
    first_value(&c.simple_query(q).await.unwrap()).expect("a row")
}

fn code(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_string())
        .unwrap_or_else(|| format!("no db error: {e}"))
}

/// Two clients of `proxy`'s `app` database.
async fn two_clients(proxy: &Proxy) -> (tokio_postgres::Client, tokio_postgres::Client) {
    let url = proxy.url("app", "app", "app");
    (support::connect(&url).await, support::connect(&url).await)
}

async fn backend_pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn clients_share_one_server_connection_between_transactions() {
    let proxy = tx_proxy("");
    let (a, b) = two_clients(&proxy).await;
    // Two clients, one server connection: both are served, by the same backend.
    assert_eq!(backend_pid(&a).await, backend_pid(&b).await);
}

#[tokio::test]
async fn same_statement_names_with_different_text_do_not_collide() {
    let proxy = tx_proxy("");
    let (a, b) = two_clients(&proxy).await;
    // tokio-postgres names each client's first statement "s0": different SQL, same name, one
    // server connection.
    let sa = a.prepare("select $1::int + 1").await.unwrap();
    let sb = b.prepare("select $1::text || '!'").await.unwrap();
    for i in 0..20 {
        let ra: i32 = a.query_one(&sa, &[&i]).await.unwrap().get(0);
        let rb: String = b.query_one(&sb, &[&i.to_string()]).await.unwrap().get(0);
        assert_eq!(ra, i + 1);
        assert_eq!(rb, format!("{i}!"));
    }
}

#[tokio::test]
async fn interleaved_transactions_with_prepared_statements() {
    let proxy = tx_proxy("max_size = 2\n");
    let url = proxy.url("app", "app", "app");
    table("tp_interleave", "id int, who text");
    let mut a = support::connect(&url).await;
    let mut b = support::connect(&url).await;
    let ins_a = a
        .prepare("insert into tp_interleave values ($1, 'a')")
        .await
        .unwrap();
    let ins_b = b
        .prepare("insert into tp_interleave values ($1, 'b')")
        .await
        .unwrap();
    let ta = a.transaction().await.unwrap();
    let tb = b.transaction().await.unwrap();
    for i in 0..5 {
        ta.execute(&ins_a, &[&i]).await.unwrap();
        tb.execute(&ins_b, &[&i]).await.unwrap();
    }
    tb.rollback().await.unwrap();
    ta.commit().await.unwrap();
    let n = pg().psql("app", "select count(*) from tp_interleave where who = 'a'");
    assert!(n.parse::<i32>().unwrap() >= 5);
    assert_eq!(
        pg().psql("app", "select count(*) from tp_interleave where who = 'b'"),
        "0"
    );
}

#[tokio::test]
async fn statement_reprepared_on_a_new_server_connection() {
    let proxy = tx_proxy("max_size = 2\nmax_prepared_statements = 2\n");
    let url = proxy.url("app", "app", "app");
    let a = support::connect(&url).await;
    let stmts = [
        a.prepare("select 1::int").await.unwrap(),
        a.prepare("select 2::int").await.unwrap(),
        a.prepare("select 3::int").await.unwrap(),
        a.prepare("select 4::int").await.unwrap(),
    ];
    // More statements than each connection keeps: evicted ones are parsed again when used.
    for round in 0..3 {
        for (i, s) in stmts.iter().enumerate() {
            let v: i32 = a.query_one(s, &[]).await.unwrap().get(0);
            assert_eq!(v, i as i32 + 1, "round {round}");
        }
    }
}

#[tokio::test]
async fn bind_to_unknown_statement_fails_like_postgres() {
    let proxy = tx_proxy("");
    let url = proxy.url("app", "app", "app");
    let a = support::connect(&url).await;
    let s = a.prepare("select 42").await.unwrap();
    drop(s); // tokio-postgres closes the statement
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The client is still usable and its next statements work.
    let v: i32 = a.query_one("select 7::int", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);
    // A simple-protocol error inside a transaction aborts it, as on PostgreSQL.
    a.batch_execute("begin").await.unwrap();
    let e = a
        .batch_execute("select * from no_such_table_tp")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42P01");
    let e = a.batch_execute("select 1").await.unwrap_err();
    assert_eq!(code(&e), "25P02");
    a.batch_execute("rollback").await.unwrap();
}

#[tokio::test]
async fn session_settings_follow_the_client() {
    let proxy = tx_proxy("");
    let url = proxy.url("app", "app", "app");
    let a = support::connect(&format!("{url}?application_name=client_a")).await;
    let b = support::connect(&url).await;
    a.batch_execute("set search_path to pg_catalog, public; set work_mem = '7MB'")
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(show(&a, "show work_mem").await, "7MB");
        assert_eq!(show(&a, "show search_path").await, "pg_catalog, public");
        assert_eq!(show(&a, "show application_name").await, "client_a");
        // The other client on the same server connection sees none of it.
        assert_eq!(show(&b, "show work_mem").await, "4MB");
        assert_eq!(show(&b, "show search_path").await, "\"$user\", public");
        assert_ne!(show(&b, "show application_name").await, "client_a");
    }
    // SET LOCAL stays in its transaction; RESET goes back to the default.
    a.batch_execute("begin; set local work_mem = '9MB'; commit; reset work_mem")
        .await
        .unwrap();
    assert_eq!(show(&a, "show work_mem").await, "4MB");
    // A SET rolled back with its transaction does not stick.
    a.batch_execute("begin; set work_mem = '11MB'; rollback")
        .await
        .unwrap();
    assert_eq!(show(&a, "show work_mem").await, "4MB");
    // A SET prepared in one round trip and run in the next (tokio-postgres' `execute`) is
    // read back after it has run, not after the prepare: the client keeps it, the next client
    // on the connection does not get it.
    a.execute("set statement_timeout = '77s'", &[])
        .await
        .unwrap();
    // set_config(..., false) is a SET by another name; with true it is a SET LOCAL.
    a.batch_execute("select set_config('work_mem', '6MB', false)")
        .await
        .unwrap();
    a.query_one(
        "select pg_catalog.set_config('search_path', 'pg_catalog', false)",
        &[],
    )
    .await
    .unwrap();
    a.batch_execute("begin; select set_config('work_mem', '9MB', true); commit")
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(show(&a, "show statement_timeout").await, "77s");
        assert_eq!(show(&b, "show statement_timeout").await, "0");
        assert_eq!(show(&a, "show work_mem").await, "6MB");
        assert_eq!(show(&a, "show search_path").await, "pg_catalog");
        assert_eq!(show(&b, "show work_mem").await, "4MB");
        assert_eq!(show(&b, "show search_path").await, "\"$user\", public");
    }
}

#[tokio::test]
async fn set_is_refused_when_not_tracked() {
    let proxy = tx_proxy("track_set = false\n");
    let a = support::connect(&proxy.url("app", "app", "app")).await;
    let e = a.batch_execute("set work_mem = '5MB'").await.unwrap_err();
    assert_eq!(code(&e), "0A000");
    a.batch_execute("begin; set local work_mem = '5MB'; commit")
        .await
        .unwrap();
    // Hidden behind a backslash-escaped quote from a scan that ignored escapes, this SET went
    // to a shared server connection unseen (and stayed there for the next client).
    // The same behind a `$` inside a name, read as the start of a dollar quote, behind a
    // nested comment, read as ending at its first `*/`, and after a line comment, read as
    // running past a carriage return.
    for hidden in [
        "select E'\\''; set work_mem = '5MB'; select E'\\''",
        "select 1 as a$q$; set work_mem = '5MB'; select 1 as b$q$",
        "select 1; /* a /* nested */ comment */ set work_mem = '5MB'",
        "select 1; -- a line comment ends at a carriage return\rset work_mem = '5MB'",
        // Inside a DO block, as a statement or through set_config.
        "do $$ begin set work_mem = '5MB'; end $$",
        "do $$ begin perform set_config('work_mem', '5MB', false); end $$",
    ] {
        let e = a.batch_execute(hidden).await.unwrap_err();
        assert_eq!(code(&e), "0A000", "{hidden}");
    }
    // A DO block that changes no session setting runs.
    a.batch_execute("do $$ begin set local work_mem = '5MB'; perform 1; end $$")
        .await
        .unwrap();
}

/// A `SET` inside a `DO` block follows its client like one at top level; a block whose effect
/// cannot be read (dynamic SQL) pins the client, or is refused under `session_state = refuse`.
#[tokio::test]
async fn do_blocks_are_read_for_session_settings() {
    let proxy = tx_proxy("");
    let (a, b) = two_clients(&proxy).await;
    let default = show(&b, "show work_mem").await;
    a.batch_execute("do $$ begin set work_mem = '7MB'; end $$")
        .await
        .unwrap();
    // The one server connection, lent to each in turn.
    assert_eq!(show(&b, "show work_mem").await, default);
    assert_eq!(show(&a, "show work_mem").await, "7MB");
    assert_eq!(show(&b, "show work_mem").await, default);

    let strict = tx_proxy("session_state = \"refuse\"\n");
    let c = support::connect(&strict.url("app", "app", "app")).await;
    let e = c
        .batch_execute("do $$ begin execute 'set work_mem = ''6MB'''; end $$")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000");
    let e = c
        .batch_execute("do language sql $$ select 1 $$")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000");
}

#[tokio::test]
async fn listen_pins_the_client_and_notifications_arrive() {
    let proxy = tx_proxy("max_size = 2\n");
    let url = proxy.url("app", "app", "app");
    let (listener, mut conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        use futures::StreamExt;
        while let Some(Ok(m)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    listener.batch_execute("listen tp_chan").await.unwrap();
    let other = support::connect(&url).await;
    for i in 0..3 {
        other
            .batch_execute(&format!("notify tp_chan, 'hello {i}'"))
            .await
            .unwrap();
    }
    for i in 0..3 {
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("notification in time");
        assert_eq!(got.as_deref(), Some(format!("hello {i}").as_str()));
    }
}

#[tokio::test]
async fn session_state_refused_when_configured() {
    let proxy = tx_proxy("session_state = \"refuse\"\n");
    let a = support::connect(&proxy.url("app", "app", "app")).await;
    let e = a.batch_execute("listen tp_refused").await.unwrap_err();
    assert_eq!(code(&e), "0A000");
    let e = a
        .batch_execute("select pg_advisory_lock(1)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000");
    // In a transaction block the refusal aborts it, as any error would.
    a.batch_execute("begin").await.unwrap();
    assert!(a.batch_execute("prepare p as select 1").await.is_err());
    let e = a.batch_execute("select 1").await.unwrap_err();
    assert_eq!(code(&e), "25P02");
    a.batch_execute("rollback").await.unwrap();
    a.batch_execute("select 1").await.unwrap();
}

#[tokio::test]
async fn sql_prepare_and_execute_work_pinned() {
    let proxy = tx_proxy("max_size = 2\n");
    let (a, b) = two_clients(&proxy).await;
    a.batch_execute("prepare tp_p(int) as select $1 * 2")
        .await
        .unwrap();
    b.batch_execute("select 1").await.unwrap();
    assert_eq!(show(&a, "execute tp_p(21)").await, "42");
}

/// Runs `sql`, which `query_timeout` must cancel (57014) before `guard` passes (`why` says
/// what that guards against); the session carries on.
async fn times_out(a: &tokio_postgres::Client, sql: &str, guard: Duration, why: &str) {
    let e = tokio::time::timeout(guard, a.batch_execute(sql))
        .await
        .expect(why)
        .unwrap_err();
    assert_eq!(code(&e), "57014");
    a.batch_execute("select 1").await.unwrap();
}

/// `times_out` for `pg_sleep(10)` under a timeout of well under a second.
async fn sleep_times_out(a: &tokio_postgres::Client) {
    let (guard, why) = (Duration::from_secs(20), "cancelled well before 10 s");
    times_out(a, "select pg_sleep(10)", guard, why).await;
}

#[tokio::test]
async fn query_timeout_cancels_a_long_statement() {
    let proxy = tx_proxy("query_timeout = \"300ms\"\n");
    let a = support::connect(&proxy.url("app", "app", "app")).await;
    sleep_times_out(&a).await;
}

/// A timeout's cancel may reach the server late: the connection it was sent for is not given to
/// anyone after it (the pool's only connection, so the next statement runs on a new one).
#[tokio::test]
async fn a_connection_cancelled_for_a_timeout_serves_no_one_after() {
    let proxy = tx_proxy("query_timeout = \"300ms\"\n");
    let url = proxy.url("app", "app", "app");
    let a = support::connect(&url).await;
    let before = show(&a, "select pg_backend_pid()").await;
    sleep_times_out(&a).await;
    let b = support::connect(&url).await;
    assert_ne!(show(&b, "select pg_backend_pid()").await, before);
}

/// A statement that survives the first cancel (here it catches it) is cancelled again.
#[tokio::test]
async fn query_timeout_cancels_again_while_the_statement_runs() {
    let proxy = tx_proxy("query_timeout = \"300ms\"\n");
    let a = support::connect(&proxy.url("app", "app", "app")).await;
    let stubborn = "do $$ begin perform pg_sleep(10); \
                    exception when query_canceled then perform pg_sleep(10); end $$";
    let why = "cancelled before the second sleep ends";
    times_out(&a, stubborn, Duration::from_secs(30), why).await;
}

/// `query_timeout` is about running: a statement that waited for the pool's only connection
/// longer than the timeout, then ran for less, is not cancelled.
#[tokio::test]
async fn query_timeout_does_not_count_the_wait_for_a_connection() {
    let proxy = tx_proxy("query_timeout = \"500ms\"\n");
    let (a, b) = two_clients(&proxy).await;
    a.batch_execute("begin; select 1").await.unwrap();
    let holder = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        a.batch_execute("commit").await.unwrap();
    });
    let started = std::time::Instant::now();
    b.batch_execute("select pg_sleep(0.2)").await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "it waited for the connection"
    );
    holder.await.unwrap();
}

#[tokio::test]
async fn idle_transaction_timeout_closes_the_client_and_rolls_back() {
    table("tp_idle", "a int");
    let proxy = tx_proxy("idle_transaction_timeout = \"300ms\"\n");
    let url = proxy.url("app", "app", "app");
    let a = support::connect(&url).await;
    a.batch_execute("begin; insert into tp_idle values (1)")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let e = a.batch_execute("commit").await.unwrap_err();
    let closed = e.is_closed() || code(&e) == "25P03";
    assert!(closed, "{e:?}");
    assert_eq!(pg().psql("app", "select count(*) from tp_idle"), "0");
    // The server connection was cleaned up and serves the next client.
    let b = support::connect(&url).await;
    assert_eq!(show(&b, "select 1").await, "1");
}

#[tokio::test]
async fn client_idle_timeout_closes_idle_clients() {
    let proxy = tx_proxy("client_idle_timeout = \"300ms\"\n");
    let a = support::connect(&proxy.url("app", "app", "app")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(a.batch_execute("select 1").await.is_err());
}

#[tokio::test]
async fn client_killed_mid_transaction_leaves_a_clean_connection() {
    table("tp_killed", "a int");
    let proxy = tx_proxy("");
    let url = proxy.url("app", "app", "app");
    {
        let a = support::connect(&url).await;
        a.batch_execute("begin; insert into tp_killed values (1)")
            .await
            .unwrap();
        // Dropped without commit: the socket closes mid-transaction.
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = support::connect(&url).await;
    assert_eq!(show(&b, "select count(*) from tp_killed").await, "0");
    // Not inside the dead client's transaction: a BEGIN here is a fresh one.
    b.batch_execute("begin; commit").await.unwrap();
}

#[test]
fn pgbench_prepared_with_many_clients_over_a_small_pool() {
    pgbench_every_mode("tp_bench", "max_size = 5\n");
}

#[test]
fn one_worker_thread_serves_pgbench_in_every_mode() {
    let proxy = pgbench_every_mode(
        "tp_bench_one",
        "max_size = 5\n[proxy]\nworker_threads = 1\n",
    );
    assert!(proxy.log().contains("threads=1"), "{}", proxy.log());
}

/// pgbench `-S` in every `-M` mode with 50 clients, then TPC-B-like with 20, over `pool` in
/// database `db`; all must succeed.
fn pgbench_every_mode(db: &str, pool: &str) -> Proxy {
    let pg = pg();
    pg.psql("postgres", &format!("create database {db} owner app"));
    let proxy = tx_proxy(pool);
    let url = proxy.url("app", "app", db);
    let run = |args: &[&str]| support::pgbench(&url, args);
    run(&["-i", "-s", "1", "-q"]);
    for mode in ["prepared", "extended", "simple"] {
        let text = run(&["-S", "-M", mode, "-c", "50", "-j", "2", "-t", "40"]);
        assert!(
            text.contains("number of failed transactions: 0"),
            "{mode}: {text}"
        );
    }
    let text = run(&["-M", "prepared", "-c", "20", "-j", "2", "-t", "20"]);
    assert!(text.contains("number of failed transactions: 0"), "{text}");
    proxy
}

#[tokio::test]
async fn sql_deallocate_of_a_protocol_statement_is_honoured() {
    use support::raw::{self, RawConn};
    let proxy = tx_proxy("max_size = 2\n");
    let mut c = RawConn::login_trust(proxy.port()).await;
    let mut batch = raw::parse("mystmt", "select 11::int", &[]);
    batch.extend(raw::sync());
    c.send(&batch).await;
    assert_eq!(raw::tags(&c.until_ready().await), "1Z");
    // Drivers such as psycopg drop protocol-level statements with SQL DEALLOCATE; the server
    // knows the statement under another name, the proxy answers.
    assert_eq!(raw::tags(&c.simple("DEALLOCATE mystmt").await), "CZ");
    // Afterwards the statement is gone for this client, as on PostgreSQL.
    let mut batch = raw::bind("", "mystmt", &[], &[], &[]);
    batch.extend(raw::execute("", 0));
    batch.extend(raw::sync());
    c.send(&batch).await;
    let msgs = c.until_ready().await;
    assert_eq!(raw::tags(&msgs), "EZ");
    assert_eq!(raw::field(&msgs[0].1, b'C').as_deref(), Some("26000"));
    let msgs = c.simple("DEALLOCATE no_such_statement").await;
    assert_eq!(raw::field(&msgs[0].1, b'C').as_deref(), Some("26000"));
}

#[tokio::test]
async fn connection_storms_leave_no_server_connections_behind() {
    pg().psql("postgres", "create database tp_storm owner app");
    let proxy = tx_proxy("max_size = 4\n");
    let url = proxy.url("app", "app", "tp_storm");
    let mut tasks = Vec::new();
    for i in 0..200 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(c) = support::try_connect(&url).await else {
                return;
            };
            match i % 4 {
                0 => drop(c),
                1 => {
                    let _ = c.batch_execute("select 1").await;
                }
                // Dropped inside a transaction or mid-statement: the server side must be cleaned.
                2 => {
                    let _ = c.batch_execute("begin; select 1").await;
                }
                _ => {
                    let _ = tokio::time::timeout(
                        Duration::from_millis(5),
                        c.batch_execute("select pg_sleep(0.05)"),
                    )
                    .await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let count = |q: &str| pg().psql("postgres", q).parse::<i32>().unwrap();
    let total = count("select count(*) from pg_stat_activity where datname = 'tp_storm'");
    assert!(total <= 4, "{total} server connections for a pool of 4");
    let busy = count(
        "select count(*) from pg_stat_activity where datname = 'tp_storm' and state <> 'idle'",
    );
    assert_eq!(busy, 0, "a server connection was left mid-transaction");
    let c = support::connect(&url).await;
    assert_eq!(show(&c, "select 1").await, "1");
}

#[tokio::test]
async fn copy_in_over_the_extended_protocol_keeps_replies_in_step() {
    // tokio-postgres sends Bind, Execute, Sync before the data: the server ignores that Sync in
    // copy mode, so the proxy must not wait for its ReadyForQuery.
    let proxy = tx_proxy("max_size = 2\n");
    let client = support::connect(&proxy.url("app", "app", "app")).await;
    table("tx_copy_in", "id int, v text");
    client.batch_execute("truncate tx_copy_in").await.unwrap();
    for round in 0..3 {
        let sink = client
            .copy_in("copy tx_copy_in (id, v) from stdin")
            .await
            .expect("copy in");
        futures::pin_mut!(sink);
        use futures::SinkExt;
        sink.send(bytes::Bytes::from(format!("{round}\tr{round}\n")))
            .await
            .unwrap();
        assert_eq!(sink.finish().await.expect("copy finish"), 1);
        let n: i64 = client
            .query_one("select count(*) from tx_copy_in", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, round + 1);
    }
    // A failing copy reports its error and the client goes on.
    let sink = client
        .copy_in("copy tx_copy_in (id, v) from stdin")
        .await
        .unwrap();
    futures::pin_mut!(sink);
    use futures::SinkExt;
    sink.send(bytes::Bytes::from_static(b"not a number\tx\n"))
        .await
        .unwrap();
    let e = sink.finish().await.unwrap_err();
    assert_eq!(code(&e), "22P02");
    assert_eq!(show(&client, "select 'after'").await, "after");
}

/// A database whose strings take backslash escapes (`standard_conforming_strings = off`).
fn escaping_database(name: &str) {
    let pg = pg();
    pg.psql("postgres", &format!("drop database if exists {name}"));
    pg.psql("postgres", &format!("create database {name} owner app"));
    pg.psql(
        "postgres",
        &format!("alter database {name} set standard_conforming_strings = off"),
    );
}

#[tokio::test]
async fn a_set_hidden_by_backslash_escapes_is_refused_where_strings_escape() {
    escaping_database("tp_escapes");
    let proxy = tx_proxy("session_state = \"refuse\"\n");
    let url = proxy.url("app", "app", "tp_escapes");
    let a = support::connect(&url).await;
    // The server reads a string, a SET and a comment; a parser that assumes standard strings
    // (pg_query, the proxy's word scan) reads a select of two strings.
    let hidden = r"select 'x\', '; set search_path = evil; -- '";
    let e = a.simple_query(hidden).await.expect_err("refused");
    assert_eq!(code(&e), "0A000");
    // Through the extended protocol too.
    let e = a.query(hidden, &[]).await.expect_err("refused");
    assert_eq!(code(&e), "0A000");
    // Statements without a backslash run as usual.
    assert_eq!(show(&a, "select 'plain'").await, "plain");
    // The one server connection never ran the SET.
    let b = support::connect(&url).await;
    assert_eq!(show(&b, "show search_path").await, "\"$user\", public");
    // Where strings are standard, a backslash is just a character.
    let c = support::connect(&proxy.url("app", "app", "app")).await;
    assert_eq!(show(&c, r"select 'a\b'").await, r"a\b");
}
