//! The proxy is transparent (issue 2, point 3): COPY both ways, notices, notifications, parameter
//! status, errors and rows byte for byte against direct PostgreSQL, large results, and pgbench —
//! through a `pgcache` in session mode in front of a real PostgreSQL.

mod support;

use bytes::Bytes;
use futures::{SinkExt, TryStreamExt};
use support::protocol::*;
use support::raw::{self, RawConn};
use support::{connect, pg};
use tokio_postgres::AsyncMessage;

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
