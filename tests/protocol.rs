//! The proxy speaks the PostgreSQL protocol (issue 2, point 3): the simple and extended query
//! protocols through a `pgcache` in session mode (and pipelined batches in transaction mode, where
//! every reply is matched against what was sent) in front of a real PostgreSQL, driven by
//! tokio-postgres and a raw wire client (`support::raw`). COPY, asynchronous messages, byte-for-byte
//! errors and rows, large results and pgbench are in `transparency.rs`.

mod support;

use support::protocol::*;
use support::raw::{self, RawConn};
use support::{connect, pg};
use tokio_postgres::types::Type;
use tokio_postgres::SimpleQueryMessage;

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
// Transaction mode: replies matched against what was sent, forwarded as they lie

/// Pipelined batches through a transaction-mode proxy reach the client byte for byte as
/// PostgreSQL sends them: rows, a notice in the middle of a batch, an error that skips the rest
/// of its batch, and a result large enough to arrive over many reads.
#[tokio::test]
async fn transaction_mode_batches_match_direct_bytes() {
    let extra = "[pool]\nmode = \"transaction\"\nmax_size = 1\n";
    let proxy = support::Proxy::start(&support::proxy_config(pg(), support::free_port(), extra));
    let mut batch = Vec::new();
    for sql in [
        "select g, repeat('x', g) from generate_series(1, 50) g",
        "do $$ begin raise notice 'between two results'; end $$",
        "select 'after the notice'::text",
    ] {
        batch.extend(raw::parse("", sql, &[]));
        batch.extend(raw::bind("", "", &[], &[], &[]));
        batch.extend(raw::describe(b'P', ""));
        batch.extend(raw::execute("", 0));
    }
    batch.extend(raw::sync());
    for sql in ["select 1/0", "select 'skipped'::text"] {
        batch.extend(raw::parse("", sql, &[]));
        batch.extend(raw::bind("", "", &[], &[], &[]));
        batch.extend(raw::execute("", 0));
    }
    batch.extend(raw::sync());
    batch.extend(raw::query(
        "select g, repeat(md5(g::text), 20) from generate_series(1, 5000) g",
    ));
    let (direct, proxied) = direct_and_proxied(&proxy, &batch, 3).await;
    assert!(
        raw::tags(&proxied).starts_with("12TDDD"),
        "{}",
        raw::tags(&proxied)
    );
    assert_eq!(proxied.len(), direct.len());
    assert_same_messages(&direct, &proxied, "transaction-mode batches");
}

/// A client whose `client_encoding` is not UTF8 sends text the proxy cannot read: a `SET` in it
/// must not slip past transaction pooling unseen (refused here, pinned by default).
#[tokio::test]
async fn text_that_is_not_utf8_is_not_pooled_unread() {
    let extra = "[pool]\nmode = \"transaction\"\nmax_size = 1\nsession_state = \"refuse\"\n";
    let proxy = support::Proxy::start(&support::proxy_config(pg(), support::free_port(), extra));
    let mut a = RawConn::login_trust_latin1(proxy.port()).await;
    // 'café' in LATIN1: é is the single byte 0xE9.
    let set = b"set application_name = 'caf\xe9'\0";
    a.send(&raw::message(b'Q', set)).await;
    let reply = a.until_ready().await;
    assert_eq!(raw::tags(&reply), "EZ", "simple query refused");
    let e = reply.iter().find(|m| m.0 == b'E').expect("error");
    assert_eq!(raw::field(&e.1, b'C').as_deref(), Some("0A000"));
    // The extended protocol too: a Parse of it.
    let mut parse = b"\0".to_vec();
    parse.extend_from_slice(set);
    parse.extend_from_slice(&0i16.to_be_bytes());
    let mut batch = raw::message(b'P', &parse);
    batch.extend(raw::bind("", "", &[], &[], &[]));
    batch.extend(raw::execute("", 0));
    batch.extend(raw::sync());
    a.send(&batch).await;
    let reply = a.until_ready().await;
    let e = reply.iter().find(|m| m.0 == b'E').expect("error");
    assert_eq!(raw::field(&e.1, b'C').as_deref(), Some("0A000"));
    // Text that is plain ASCII runs as usual, and the one server connection never ran the SET.
    let rows = a.simple("select 'plain'").await;
    assert!(raw::tags(&rows).contains('D'), "{}", raw::tags(&rows));
    let b = connect(&app_url(&proxy)).await;
    let name: String = b
        .query_one("show application_name", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!name.starts_with("caf"), "{name}");
}
