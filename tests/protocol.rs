//! The proxy speaks the PostgreSQL protocol transparently (issue 2, point 3): simple and extended
//! query protocol, COPY both ways, notices, notifications, parameter status, errors byte for byte,
//! large results, and pgbench — all through a `pgcache` in session mode in front of a real
//! PostgreSQL, driven by tokio-postgres, a raw wire client (`support::raw`), and pgbench.

mod support;

use bytes::Bytes;
use futures::{SinkExt, StreamExt, TryStreamExt};
use std::time::Duration;
use support::raw::{self, Msg, RawConn};
use support::{connect, free_port, pg, proxy_config, Proxy};
use tokio::sync::mpsc;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, SimpleQueryMessage};

/// Hang guard for whole operations (never a performance expectation).
const GUARD: Duration = Duration::from_secs(120);

fn start_proxy() -> Proxy {
    Proxy::start(&proxy_config(pg(), free_port(), ""))
}

fn app_url(proxy: &Proxy) -> String {
    proxy.url("app", "app", "app")
}

/// A client whose connection task forwards notices and notifications to the returned channel.
async fn connect_with_messages(
    url: &str,
) -> (
    tokio_postgres::Client,
    mpsc::UnboundedReceiver<AsyncMessage>,
) {
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e:?}"));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            let _ = tx.send(m);
        }
    });
    (client, rx)
}

async fn next_message(rx: &mut mpsc::UnboundedReceiver<AsyncMessage>) -> AsyncMessage {
    tokio::time::timeout(GUARD, rx.recv())
        .await
        .expect("no async message arrived")
        .expect("connection task ended before an async message arrived")
}

fn rows_text(msgs: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

/// Sends `bytes` on a fresh `trustuser` session directly to PostgreSQL and on another through the
/// proxy, and returns both replies: the messages up to the `readies`-th `ReadyForQuery`.
async fn direct_and_proxied(proxy: &Proxy, bytes: &[u8], readies: usize) -> (Vec<Msg>, Vec<Msg>) {
    let mut out = Vec::new();
    for port in [pg().port, proxy.port()] {
        let mut conn = RawConn::login_trust(port).await;
        conn.send(bytes).await;
        let mut msgs = Vec::new();
        for _ in 0..readies {
            msgs.extend(conn.until_ready().await);
        }
        conn.send(&raw::terminate()).await;
        out.push(msgs);
    }
    let proxied = out.pop().expect("proxied reply");
    let direct = out.pop().expect("direct reply");
    (direct, proxied)
}

/// Asserts two message lists are equal message by message, showing the first difference.
fn assert_same_messages(direct: &[Msg], proxied: &[Msg], what: &str) {
    for (i, (d, p)) in direct.iter().zip(proxied).enumerate() {
        assert_eq!(
            (d.0 as char, &d.1),
            (p.0 as char, &p.1),
            "{what}: message {i} differs (direct vs proxied)\ndirect:  {}\nproxied: {}",
            raw::tags(direct),
            raw::tags(proxied)
        );
    }
    assert_eq!(
        raw::tags(direct),
        raw::tags(proxied),
        "{what}: message sequences differ"
    );
}

// ---------------------------------------------------------------------------------------------
// Simple query protocol

#[tokio::test]
async fn simple_query_runs_several_statements_in_one_message() {
    let proxy = start_proxy();
    let client = connect(&app_url(&proxy)).await;
    let msgs = client
        .simple_query("select 1; select 2 as two, 'b'; select 3 union all select 4")
        .await
        .expect("multi-statement query");
    assert_eq!(
        rows_text(&msgs),
        vec![
            vec![Some("1".to_string())],
            vec![Some("2".to_string()), Some("b".to_string())],
            vec![Some("3".to_string())],
            vec![Some("4".to_string())],
        ]
    );
    let completes: Vec<u64> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect();
    assert_eq!(completes, vec![1, 1, 2]);

    // Byte level: the same message sequence as PostgreSQL sends.
    let (direct, proxied) =
        direct_and_proxied(&proxy, &raw::query("select 1; select 2; select 3"), 1).await;
    assert_eq!(raw::tags(&proxied), "TDCTDCTDCZ");
    assert_same_messages(&direct, &proxied, "three selects");
}

#[tokio::test]
async fn empty_query_gets_empty_query_response() {
    let proxy = start_proxy();
    let client = connect(&app_url(&proxy)).await;
    for sql in ["", "   ", ";", "-- only a comment"] {
        let msgs = client
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("empty query {sql:?}: {e}"));
        assert!(
            rows_text(&msgs).is_empty(),
            "{sql:?} returned rows: {msgs:?}"
        );
    }
    // EmptyQueryResponse ('I') then ReadyForQuery, as PostgreSQL sends them.
    let (direct, proxied) = direct_and_proxied(&proxy, &raw::query(""), 1).await;
    assert_eq!(raw::tags(&proxied), "IZ");
    assert_same_messages(&direct, &proxied, "empty query");
    let one: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1, "session usable after empty queries");
}

#[tokio::test]
async fn error_mid_batch_stops_the_batch_and_session_stays_usable() {
    let proxy = start_proxy();
    let client = connect(&app_url(&proxy)).await;
    client
        .batch_execute("create table proto_batch (id int)")
        .await
        .expect("create table");

    // A multi-statement Query is one implicit transaction: what ran before the error is rolled
    // back, what follows never runs. An explicit COMMIT in the batch keeps the earlier part.
    let err = client
        .simple_query(
            "insert into proto_batch values (1); commit; \
             insert into proto_batch values (2); select 1/0; insert into proto_batch values (3)",
        )
        .await
        .expect_err("division by zero");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO)
    );
    let ids: Vec<i32> = client
        .query("select id from proto_batch order by id", &[])
        .await
        .expect("session usable after a failed batch")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![1], "before COMMIT ran; after the error did not");

    // Byte level: row of the first select, the error, then ReadyForQuery 'I'; nothing of the third.
    let (direct, proxied) =
        direct_and_proxied(&proxy, &raw::query("select 1; select 1/0; select 3"), 1).await;
    assert_eq!(raw::tags(&proxied), "TDCEZ");
    assert_eq!(proxied.last().unwrap().1, b"I");
    assert_same_messages(&direct, &proxied, "batch with an error");

    // The same session keeps working after the error, in the raw client too.
    let mut conn = RawConn::login_trust(proxy.port()).await;
    let first = conn.simple("select 1; select 1/0; select 3").await;
    assert_eq!(raw::tags(&first), "TDCEZ");
    let second = conn.simple("select 42").await;
    assert_eq!(raw::tags(&second), "TDCZ");
    assert_eq!(second[1].1, b"\x00\x01\x00\x00\x00\x0242");
}

#[tokio::test]
async fn query_sent_with_the_startup_packet_is_answered() {
    // With trust authentication a client may send its first query right behind the startup
    // packet, before any reply; PostgreSQL answers it after the first ReadyForQuery.
    let proxy = start_proxy();
    let mut bytes = raw::startup_packet(&[("user", "trustuser"), ("database", "app")]);
    bytes.extend(raw::query("select 'early'"));
    let mut replies = Vec::new();
    for port in [pg().port, proxy.port()] {
        let mut conn = RawConn::connect(port).await;
        conn.send(&bytes).await;
        conn.until_ready().await; // the startup reply
        replies.push(conn.until_ready().await);
    }
    assert_eq!(raw::tags(&replies[1]), "TDCZ");
    assert_same_messages(&replies[0], &replies[1], "query pipelined with startup");
}

#[tokio::test]
async fn pipelined_queries_on_one_connection_all_answer() {
    let proxy = start_proxy();
    let client = connect(&app_url(&proxy)).await;
    let stmt = client.prepare("select $1::int4 * 2").await.unwrap();
    // tokio-postgres writes all of these before reading any answer.
    let futs = (0..200i32).map(|i| {
        let client = &client;
        let stmt = &stmt;
        async move {
            let v: i32 = client.query_one(stmt, &[&i]).await.unwrap().get(0);
            (i, v)
        }
    });
    let results = tokio::time::timeout(GUARD, futures::future::join_all(futs))
        .await
        .expect("pipelined queries hung");
    for (i, v) in results {
        assert_eq!(v, i * 2);
    }
}

// ---------------------------------------------------------------------------------------------
// Extended query protocol

#[tokio::test]
async fn prepared_statement_binds_binary_parameters_and_results() {
    let proxy = start_proxy();
    let client = connect(&app_url(&proxy)).await;
    // tokio-postgres sends every parameter and asks for every result in binary.
    let row = client
        .query_one(
            "select $1::int4 + 1, $2::int8 * 2, $3::text || '!', $4::bytea, $5::float8, \
             $6::bool, $7::int4 is null",
            &[
                &41i32,
                &(1i64 << 40),
                &"héllo",
                &vec![0u8, 1, 2, 255, 0],
                &1.5f64,
                &true,
                &None::<i32>,
            ],
        )
        .await
        .expect("binary parameters");
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, i64>(1), 1i64 << 41);
    assert_eq!(row.get::<_, String>(2), "héllo!");
    assert_eq!(row.get::<_, Vec<u8>>(3), vec![0u8, 1, 2, 255, 0]);
    assert_eq!(row.get::<_, f64>(4), 1.5);
    assert!(row.get::<_, bool>(5));
    assert!(row.get::<_, bool>(6));
}

#[tokio::test]
async fn text_and_binary_parameters_match_direct_bytes() {
    let proxy = start_proxy();
    // Text parameters and text results, then binary parameters and binary results, on a named
    // statement, described, bound twice in one Sync batch.
    let mut batch = raw::parse("st", "select $1::int4 + 1 as n, $2::text as t", &[0, 0]);
    batch.extend(raw::describe(b'S', "st"));
    batch.extend(raw::bind(
        "",
        "st",
        &[0],
        &[Some(&b"41"[..]), Some(&b"text param"[..])],
        &[0],
    ));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::bind(
        "p1",
        "st",
        &[1, 0],
        &[Some(&7i32.to_be_bytes()), None],
        &[1],
    ));
    batch.extend(raw::describe(b'P', "p1"));
    batch.extend(raw::execute("p1", 0));
    batch.extend(raw::sync());
    let (direct, proxied) = direct_and_proxied(&proxy, &batch, 1).await;
    assert_eq!(raw::tags(&proxied), "1tT2DC2TDCZ");
    assert_same_messages(&direct, &proxied, "text and binary parameters");
    // DataRow in text: "42", "text param".
    assert_eq!(
        proxied[4].1,
        b"\x00\x02\x00\x00\x00\x0242\x00\x00\x00\x0atext param"
    );
    // DataRow in binary: int4 8, NULL.
    assert_eq!(
        proxied[8].1,
        b"\x00\x02\x00\x00\x00\x04\x00\x00\x00\x08\xff\xff\xff\xff"
    );
}

#[tokio::test]
async fn named_statement_is_reused_many_times() {
    let proxy = start_proxy();
    let client = connect(&app_url(&proxy)).await;
    let stmt = client
        .prepare("select $1::int4 + $2::int4")
        .await
        .expect("prepare");
    for i in 0..300i32 {
        let v: i32 = client
            .query_one(&stmt, &[&i, &1i32])
            .await
            .expect("execute prepared")
            .get(0);
        assert_eq!(v, i + 1);
    }
    // Still one server-side statement for it.
    let n: i64 = client
        .query_one(
            "select count(*) from pg_prepared_statements where statement = 'select $1::int4 + $2::int4'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn unnamed_statement_runs_and_is_replaced() {
    let proxy = start_proxy();
    let client = connect(&app_url(&proxy)).await;
    // query_typed uses the unnamed statement and portal.
    for i in 0..50i32 {
        let row = client
            .query_typed_one("select $1::int4 * 3", &[(&i, Type::INT4)])
            .await
            .expect("unnamed statement");
        assert_eq!(row.get::<_, i32>(0), i * 3);
    }
    let rows = client
        .query_typed(
            "select $1::text || g from generate_series(1, 3) g",
            &[(&"r", Type::TEXT)],
        )
        .await
        .expect("unnamed statement with rows");
    let got: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(got, vec!["r1", "r2", "r3"]);

    // Raw: Parse "" / Bind "" / Execute twice (the second Parse replaces the first).
    let mut batch = Vec::new();
    for sql in ["select 'first'", "select 'second'"] {
        batch.extend(raw::parse("", sql, &[]));
        batch.extend(raw::bind("", "", &[], &[], &[]));
        batch.extend(raw::execute("", 0));
    }
    batch.extend(raw::sync());
    let (direct, proxied) = direct_and_proxied(&proxy, &batch, 1).await;
    assert_eq!(raw::tags(&proxied), "12DC12DCZ");
    assert_same_messages(&direct, &proxied, "unnamed statements");
}

#[tokio::test]
async fn execute_with_row_limit_suspends_portal() {
    let proxy = start_proxy();
    let mut client = connect(&app_url(&proxy)).await;
    let tx = client.transaction().await.expect("begin");
    let portal = tx
        .bind("select g from generate_series(1, 7) g", &[])
        .await
        .expect("bind portal");
    let mut chunks = Vec::new();
    let mut values = Vec::new();
    loop {
        let rows = tx.query_portal(&portal, 2).await.expect("execute portal");
        chunks.push(rows.len());
        values.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
        if rows.len() < 2 {
            break;
        }
    }
    assert_eq!(chunks, vec![2, 2, 2, 1]);
    assert_eq!(values, (1..=7).collect::<Vec<_>>());
    tx.commit().await.expect("commit");

    // Byte level: PortalSuspended ('s') after each limited Execute.
    let mut batch = raw::parse("", "select g from generate_series(1, 7) g", &[]);
    batch.extend(raw::bind("", "", &[], &[], &[]));
    batch.extend(raw::execute("", 2));
    batch.extend(raw::execute("", 2));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::sync());
    let (direct, proxied) = direct_and_proxied(&proxy, &batch, 1).await;
    assert_eq!(raw::tags(&proxied), "12DDsDDsDDDCZ");
    assert_same_messages(&direct, &proxied, "portal suspension");
}

#[tokio::test]
async fn flush_delivers_replies_before_sync() {
    let proxy = start_proxy();
    let mut conn = RawConn::login_trust(proxy.port()).await;
    let mut batch = raw::parse("f", "select 7", &[]);
    batch.extend(raw::bind("", "f", &[], &[], &[]));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::flush());
    conn.send(&batch).await;
    // No Sync yet: the replies come because of Flush alone.
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(conn.read().await);
    }
    assert_eq!(raw::tags(&got), "12DC");
    conn.send(&raw::sync()).await;
    let rest = conn.until_ready().await;
    assert_eq!(raw::tags(&rest), "Z");
    // An error in an extended batch skips to Sync.
    let mut batch = raw::parse("", "select broken syntax here(", &[]);
    batch.extend(raw::bind("", "", &[], &[], &[]));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::sync());
    conn.send(&batch).await;
    let err = conn.until_ready().await;
    assert_eq!(raw::tags(&err), "EZ");
    assert_eq!(raw::field(&err[0].1, b'C').as_deref(), Some("42601"));
    assert_eq!(raw::tags(&conn.simple("select 1").await), "TDCZ");
}

#[tokio::test]
async fn closed_statement_is_gone_on_the_server() {
    let proxy = start_proxy();
    let client = connect(&app_url(&proxy)).await;
    let count = || async {
        let msgs = client
            .simple_query("select count(*) from pg_prepared_statements")
            .await
            .expect("count statements");
        rows_text(&msgs)[0][0].clone().unwrap()
    };
    let before = count().await;
    let stmt = client
        .prepare("select 'to be closed'")
        .await
        .expect("prepare");
    assert_ne!(count().await, before, "prepared statement exists");
    drop(stmt); // tokio-postgres sends Close for it
    assert_eq!(count().await, before, "Close reached the server");

    // Raw: Close of a statement and of a portal answer CloseComplete ('3').
    let mut batch = raw::parse("c1", "select 1", &[]);
    batch.extend(raw::bind("pc", "c1", &[], &[], &[]));
    batch.extend(raw::close(b'P', "pc"));
    batch.extend(raw::close(b'S', "c1"));
    batch.extend(raw::close(b'S', "never_existed"));
    batch.extend(raw::sync());
    batch.extend(raw::query("execute c1"));
    let (direct, proxied) = direct_and_proxied(&proxy, &batch, 2).await;
    assert_eq!(raw::tags(&proxied), "12333ZEZ");
    assert_eq!(raw::field(&proxied[6].1, b'C').as_deref(), Some("26000"));
    assert_same_messages(&direct, &proxied, "close");
}

#[tokio::test]
async fn describe_reports_parameter_and_column_types() {
    let proxy = start_proxy();
    let client = connect(&app_url(&proxy)).await;
    let stmt = client
        .prepare(
            "select $1::int8 as a, $2::text as b, now() as c, $3::bytea as d, 1.5::numeric as e",
        )
        .await
        .expect("prepare");
    assert_eq!(stmt.params(), &[Type::INT8, Type::TEXT, Type::BYTEA]);
    let cols: Vec<(&str, Type)> = stmt
        .columns()
        .iter()
        .map(|c| (c.name(), c.type_().clone()))
        .collect();
    assert_eq!(
        cols,
        vec![
            ("a", Type::INT8),
            ("b", Type::TEXT),
            ("c", Type::TIMESTAMPTZ),
            ("d", Type::BYTEA),
            ("e", Type::NUMERIC),
        ]
    );
    // A statement with no result columns describes as NoData ('n').
    let ddl = client
        .prepare("create temp table desc_t (x int)")
        .await
        .unwrap();
    assert!(ddl.columns().is_empty());
    let mut batch = raw::parse("d", "set work_mem = '4MB'", &[]);
    batch.extend(raw::describe(b'S', "d"));
    batch.extend(raw::sync());
    let (direct, proxied) = direct_and_proxied(&proxy, &batch, 1).await;
    assert_eq!(raw::tags(&proxied), "1tnZ");
    assert_same_messages(&direct, &proxied, "describe with no data");
}

// ---------------------------------------------------------------------------------------------
// COPY

#[tokio::test]
async fn copy_from_stdin_loads_many_rows() {
    let proxy = start_proxy();
    let client = connect(&app_url(&proxy)).await;
    client
        .batch_execute("create table proto_copy_in (id int primary key, v text)")
        .await
        .unwrap();
    const ROWS: i64 = 100_000;
    let sink = client
        .copy_in("copy proto_copy_in (id, v) from stdin")
        .await
        .expect("copy in");
    futures::pin_mut!(sink);
    let mut chunk = String::new();
    for i in 1..=ROWS {
        // `\t` is COPY's escape for a tab inside a value.
        chunk.push_str(&format!("{i}\trow {i} with\\ttab\n"));
        if i % 5000 == 0 {
            sink.send(Bytes::from(std::mem::take(&mut chunk)))
                .await
                .expect("send copy data");
        }
    }
    let n = tokio::time::timeout(GUARD, sink.finish())
        .await
        .expect("copy finish hung")
        .expect("copy finish");
    assert_eq!(n, ROWS as u64);
    let row = client
        .query_one("select count(*), sum(id)::int8 from proto_copy_in", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), ROWS);
    assert_eq!(row.get::<_, i64>(1), ROWS * (ROWS + 1) / 2);
    let v: String = client
        .query_one("select v from proto_copy_in where id = 54321", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "row 54321 with\ttab");
}

#[tokio::test]
async fn copy_from_stdin_error_is_reported_and_session_recovers() {
    let proxy = start_proxy();
    let client = connect(&app_url(&proxy)).await;
    client
        .batch_execute("create table proto_copy_bad (id int)")
        .await
        .unwrap();
    let sink = client
        .copy_in("copy proto_copy_bad from stdin")
        .await
        .expect("copy in");
    futures::pin_mut!(sink);
    let _ = sink
        .send(Bytes::from_static(b"1\n2\nnot a number\n3\n"))
        .await;
    let err = tokio::time::timeout(GUARD, sink.finish())
        .await
        .expect("copy finish hung")
        .expect_err("bad row fails the copy");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_TEXT_REPRESENTATION)
    );
    let n: i64 = client
        .query_one("select count(*) from proto_copy_bad", &[])
        .await
        .expect("session usable after a failed COPY")
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn copy_to_stdout_bytes_equal_direct() {
    let proxy = start_proxy();
    let proxied = connect(&app_url(&proxy)).await;
    let direct = connect(&pg().url("app", "app", "app")).await;
    for sql in [
        "copy (select g, md5(g::text), g * 1.5, null::text, E'tab\\there' from generate_series(1, 100000) g) to stdout",
        "copy (select g, md5(g::text)::bytea from generate_series(1, 20000) g) to stdout with (format binary)",
        "copy (select g, 'x' from generate_series(1, 1000) g) to stdout with (format csv, header)",
    ] {
        let mut got = Vec::new();
        for client in [&direct, &proxied] {
            let stream = client.copy_out(sql).await.expect("copy out");
            let chunks: Vec<Bytes> = tokio::time::timeout(GUARD, stream.try_collect())
                .await
                .expect("copy out hung")
                .expect("copy out data");
            got.push(chunks.concat());
        }
        assert!(!got[0].is_empty());
        assert!(got[0] == got[1], "COPY TO STDOUT bytes differ for {sql}");
    }
    // And on the wire: CopyOutResponse, CopyData..., CopyDone, CommandComplete.
    let (d, p) = direct_and_proxied(
        &proxy,
        &raw::query("copy (select g from generate_series(1, 3) g) to stdout"),
        1,
    )
    .await;
    assert_eq!(raw::tags(&p), "HdddcCZ");
    assert_same_messages(&d, &p, "copy out messages");
}

// ---------------------------------------------------------------------------------------------
// Asynchronous messages and parameter status

#[tokio::test]
async fn notice_from_do_block_reaches_client() {
    let proxy = start_proxy();
    let (client, mut rx) = connect_with_messages(&app_url(&proxy)).await;
    client
        .batch_execute("do $$ begin raise notice 'hello %', 42; raise warning 'careful'; end $$")
        .await
        .expect("do block");
    let notices: Vec<(String, String, String)> =
        [next_message(&mut rx).await, next_message(&mut rx).await]
            .into_iter()
            .map(|m| match m {
                AsyncMessage::Notice(n) => (
                    n.severity().to_string(),
                    n.code().code().to_string(),
                    n.message().to_string(),
                ),
                other => panic!("expected a notice, got {other:?}"),
            })
            .collect();
    assert_eq!(
        notices,
        vec![
            ("NOTICE".into(), "00000".into(), "hello 42".into()),
            ("WARNING".into(), "01000".into(), "careful".into()),
        ]
    );
    // The NoticeResponse bytes are PostgreSQL's own (where, file, line, routine included).
    let (d, p) = direct_and_proxied(
        &proxy,
        &raw::query(
            "do $$ begin raise notice 'n %', 1 using hint = 'a hint', detail = 'a detail'; end $$",
        ),
        1,
    )
    .await;
    assert_eq!(raw::tags(&p), "NCZ");
    assert_eq!(raw::field(&p[0].1, b'H').as_deref(), Some("a hint"));
    assert_same_messages(&d, &p, "notice");
}

#[tokio::test]
async fn notification_reaches_listening_client_with_payload() {
    let proxy = start_proxy();
    let (listener, mut rx) = connect_with_messages(&app_url(&proxy)).await;
    listener
        .batch_execute("listen proto_chan")
        .await
        .expect("listen");
    let notifier = connect(&app_url(&proxy)).await;
    let notifier_pid: i32 = notifier
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    notifier
        .batch_execute(
            "notify proto_chan, 'payload 1'; select pg_notify('proto_chan', 'payload ☃')",
        )
        .await
        .expect("notify");
    let mut got = Vec::new();
    for _ in 0..2 {
        match next_message(&mut rx).await {
            AsyncMessage::Notification(n) => {
                assert_eq!(n.channel(), "proto_chan");
                assert_eq!(n.process_id(), notifier_pid, "pid of the notifying backend");
                got.push(n.payload().to_string());
            }
            other => panic!("expected a notification, got {other:?}"),
        }
    }
    assert_eq!(got, vec!["payload 1", "payload ☃"]);
    // A notification from outside the proxy (direct to PostgreSQL) arrives too.
    let outside = connect(&pg().url("app", "app", "app")).await;
    outside
        .batch_execute("notify proto_chan, 'from outside'")
        .await
        .unwrap();
    match next_message(&mut rx).await {
        AsyncMessage::Notification(n) => assert_eq!(n.payload(), "from outside"),
        other => panic!("expected a notification, got {other:?}"),
    }
}

#[tokio::test]
async fn set_sends_parameter_status_to_client() {
    let proxy = start_proxy();
    let mut conn = RawConn::login_trust(proxy.port()).await;
    let msgs = conn.simple("set application_name = 'proto x'").await;
    let status: Vec<&Vec<u8>> = msgs
        .iter()
        .filter(|(t, _)| *t == b'S')
        .map(|(_, b)| b)
        .collect();
    assert_eq!(
        status,
        vec![&b"application_name\0proto x\0".to_vec()],
        "ParameterStatus for application_name; got {}",
        raw::tags(&msgs)
    );
    let msgs = conn.simple("set timezone = 'Asia/Tokyo'").await;
    assert!(
        msgs.iter()
            .any(|(t, b)| *t == b'S' && b == b"TimeZone\0Asia/Tokyo\0"),
        "ParameterStatus for TimeZone; got {}",
        raw::tags(&msgs)
    );
    // Same messages as PostgreSQL sends for it.
    let (d, p) = direct_and_proxied(
        &proxy,
        &raw::query("set application_name = 'y'; set datestyle = 'German'"),
        1,
    )
    .await;
    assert_same_messages(&d, &p, "parameter status");
    let show = conn.simple("show application_name").await;
    assert_eq!(show[1].1, b"\x00\x01\x00\x00\x00\x07proto x");
}

#[tokio::test]
async fn startup_parameters_reach_the_server() {
    let proxy = start_proxy();
    let url = format!(
        "{}?application_name=proto_startup_app&options=-c%20statement_timeout%3D4321",
        app_url(&proxy)
    );
    let client = connect(&url).await;
    let row = client
        .query_one(
            "select current_setting('application_name'), current_setting('statement_timeout'), \
             (select application_name from pg_stat_activity where pid = pg_backend_pid())",
            &[],
        )
        .await
        .expect("settings");
    assert_eq!(row.get::<_, String>(0), "proto_startup_app");
    assert_eq!(row.get::<_, String>(1), "4321ms");
    assert_eq!(row.get::<_, String>(2), "proto_startup_app");

    // The client is told the value at startup, in a ParameterStatus.
    let (_conn, startup) = RawConn::login(
        proxy.port(),
        &[
            ("user", "trustuser"),
            ("database", "app"),
            ("application_name", "raw app"),
        ],
    )
    .await;
    assert!(
        startup
            .iter()
            .any(|(t, b)| *t == b'S' && b == b"application_name\0raw app\0"),
        "startup ParameterStatus for application_name; got {:?}",
        startup
            .iter()
            .filter(|(t, _)| *t == b'S')
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------------
// Byte-for-byte errors and rows

#[tokio::test]
async fn error_response_bytes_equal_direct() {
    let proxy = start_proxy();
    pg().psql(
        "app",
        "create table proto_uv (id int primary key, note text not null);\n\
         insert into proto_uv values (1, 'one');\n\
         grant all on proto_uv to trustuser;",
    );
    for (sql, code, want) in [
        ("select * from no_such_table", "42P01", vec![b'P']),
        (
            "insert into proto_uv values (1, 'again')",
            "23505",
            vec![b'D', b's', b't', b'n'],
        ),
        (
            "insert into proto_uv values (2, null)",
            "23502",
            vec![b'D', b's', b't', b'c'],
        ),
        ("select relnamee from pg_class", "42703", vec![b'H', b'P']),
        (
            "do $$ begin raise exception 'custom' using errcode = 'P0001', hint = 'h', detail = 'd'; end $$",
            "P0001",
            vec![b'D', b'H', b'W'],
        ),
    ] {
        let (d, p) = direct_and_proxied(&proxy, &raw::query(sql), 1).await;
        assert_eq!(raw::tags(&p), "EZ", "{sql}");
        let body = &p[0].1;
        assert_eq!(raw::field(body, b'C').as_deref(), Some(code), "{sql}");
        for f in want {
            assert!(
                raw::field(body, f).is_some(),
                "{sql}: field {:?} missing in {:?}",
                f as char,
                raw::fields(body)
            );
        }
        assert_same_messages(&d, &p, sql);
    }
    // And in the extended protocol: the error for a bad Bind.
    let mut batch = raw::parse("", "select $1::int4", &[]);
    batch.extend(raw::bind("", "", &[0], &[Some(b"not an int")], &[]));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::sync());
    let (d, p) = direct_and_proxied(&proxy, &batch, 1).await;
    assert_eq!(raw::tags(&p), "1EZ");
    assert_same_messages(&d, &p, "bind error");
}

#[tokio::test]
async fn data_row_bytes_equal_direct_for_mixed_types() {
    let proxy = start_proxy();
    let sql = "select 1::int4 as i, 9007199254740993::int8 as big, 'text ☃'::text as t, \
               1.50::numeric(10,2) as n, null::int as nothing, true as b, '2024-01-02'::date as d, \
               '12:34:56.789'::time as tm, '\\x00ff10'::bytea as bin, array[1, null, 3] as arr, \
               '{\"a\": [1, 2]}'::jsonb as j, 3.25::float8 as f, \
               'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid as u, '(1,2)'::point as pt, \
               interval '1 day 2 hours' as iv, '' as empty";
    // Text format (simple protocol).
    let (d, p) = direct_and_proxied(&proxy, &raw::query(sql), 1).await;
    assert_eq!(raw::tags(&p), "TDCZ");
    assert_same_messages(&d, &p, "text rows");
    // Binary format (extended protocol, all results binary).
    let mut batch = raw::parse("", sql, &[]);
    batch.extend(raw::bind("", "", &[], &[], &[1]));
    batch.extend(raw::describe(b'P', ""));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::sync());
    let (d, p) = direct_and_proxied(&proxy, &batch, 1).await;
    assert_eq!(raw::tags(&p), "12TDCZ");
    assert_same_messages(&d, &p, "binary rows");
}

// ---------------------------------------------------------------------------------------------
// Large results

#[tokio::test]
async fn large_value_arrives_intact() {
    let proxy = start_proxy();
    let client = connect(&app_url(&proxy)).await;
    const LEN: usize = 20_000_000;
    let row = tokio::time::timeout(
        GUARD,
        client.query_one("select repeat('x', 20000000) || 'end'", &[]),
    )
    .await
    .expect("large value hung")
    .expect("large value");
    let v: String = row.get(0);
    assert_eq!(v.len(), LEN + 3);
    assert!(v.starts_with("xxxx") && v.ends_with("xend"));
    assert!(v.bytes().take(LEN).all(|b| b == b'x'));
    // A large binary value sent up as a parameter and echoed back.
    let blob: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let echo: Vec<u8> = client
        .query_one("select $1::bytea", &[&blob])
        .await
        .expect("large parameter")
        .get(0);
    assert!(echo == blob, "5 MB bytea round trip differs");
    let one: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1, "session usable after large values");
}

#[tokio::test]
async fn many_rows_arrive_intact() {
    let proxy = start_proxy();
    let proxied = connect(&app_url(&proxy)).await;
    let direct = connect(&pg().url("app", "app", "app")).await;
    let sql = "select g, md5(g::text) from generate_series(1, 200000) g";
    let mut results = Vec::new();
    for client in [&direct, &proxied] {
        let rows = tokio::time::timeout(GUARD, client.query(sql, &[]))
            .await
            .expect("many rows hung")
            .expect("many rows");
        let rows: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        results.push(rows);
    }
    assert_eq!(results[1].len(), 200_000);
    assert!(results[0] == results[1], "proxied rows differ from direct");
    // And in text through the simple protocol.
    let msgs = proxied.simple_query(sql).await.expect("simple many rows");
    let rows = rows_text(&msgs);
    assert_eq!(rows.len(), 200_000);
    assert_eq!(rows[199_999][0].as_deref(), Some("200000"));
}

// ---------------------------------------------------------------------------------------------
// pgbench

fn pgbench(port: u16, args: &[&str]) -> String {
    support::pgbench(&support::url(port, "app", "app", "bench"), args)
}

#[test]
fn pgbench_runs_clean_in_every_query_mode() {
    let pg = pg();
    pg.psql("postgres", "create database bench owner app");
    let proxy = start_proxy();
    pgbench(proxy.port(), &["-i", "-s", "1", "-q"]);
    let accounts = pg.psql("bench", "select count(*) from pgbench_accounts");
    assert_eq!(
        accounts, "100000",
        "pgbench -i through the proxy loaded the data"
    );
    for mode in ["prepared", "simple", "extended"] {
        let out = pgbench(
            proxy.port(),
            &["-S", "-M", mode, "-c", "4", "-j", "2", "-t", "200"],
        );
        assert!(
            out.contains("number of failed transactions: 0"),
            "-M {mode}:\n{out}"
        );
        assert!(
            out.contains("number of transactions actually processed: 800/800"),
            "-M {mode}:\n{out}"
        );
    }
    // The TPC-B-like read-write script too (transactions, updates, inserts).
    let out = pgbench(
        proxy.port(),
        &["-M", "prepared", "-c", "4", "-j", "2", "-t", "50"],
    );
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    assert!(
        out.contains("number of transactions actually processed: 200/200"),
        "{out}"
    );
}
