//! Query insight end to end: exact counts on `/metrics` after a known workload (parsed with a
//! Prometheus text parser), per-fingerprint statistics in the console and `GET /queries`, the
//! slow query log with its EXPLAIN finding (simple and extended protocol), the repeated-statement
//! detector, and `/health` turning degraded on a busy pool.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};
use support::cache::{admin, app_url, cache_proxy, proxy_metrics, table};
use support::http::http_get;
use support::{connect, Proxy};
use tokio_postgres::SimpleQueryMessage;

async fn get(addr: &str, path: &str) -> (u16, String) {
    let (addr, path) = (addr.to_string(), path.to_string());
    tokio::task::spawn_blocking(move || http_get(&addr, &path))
        .await
        .expect("HTTP GET task")
}

/// The value of `name` with every label in `labels`, from a parsed scrape.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("the Prometheus text format parses");
    let found = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)));
    match found.map(|s| &s.value) {
        Some(prometheus_parse::Value::Counter(v))
        | Some(prometheus_parse::Value::Gauge(v))
        | Some(prometheus_parse::Value::Untyped(v)) => *v,
        other => panic!("{name}{labels:?}: {other:?} in\n{text}"),
    }
}

/// `SHOW QUERIES ...` rows as maps of column → value.
async fn show(proxy: &Proxy, command: &str) -> Vec<HashMap<String, String>> {
    let a = admin(proxy).await;
    a.simple_query(command)
        .await
        .unwrap_or_else(|e| panic!("{command}: {e:?}"))
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_string(), r.get(i).unwrap_or("").to_string()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The row of `SHOW QUERIES` whose normalized text contains `needle`.
async fn query_row(proxy: &Proxy, needle: &str) -> HashMap<String, String> {
    let rows = show(proxy, "SHOW QUERIES LIMIT 1000").await;
    rows.iter()
        .find(|r| r["query"].contains(needle))
        .cloned()
        .unwrap_or_else(|| panic!("no {needle:?} in SHOW QUERIES: {rows:#?}"))
}

/// `SHOW QUERIES`'s call count for the statement whose normalized text contains `needle`.
async fn calls(proxy: &Proxy, needle: &str) -> String {
    query_row(proxy, needle).await["calls"].clone()
}

/// A fresh table `name (id int primary key, v text)` holding ids 1..=`rows`, `v` = 'v' || id.
fn numbered_table(name: &str, rows: u32) -> String {
    let t = table(name, "id int primary key, v text");
    support::cache::direct(&format!(
        "insert into {t} select g, 'v' || g from generate_series(1, {rows}) g"
    ));
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_workload_exactly() {
    let t = numbered_table("insight_counted", 5);
    let proxy = cache_proxy("transaction", "");
    let addr = proxy_metrics(&proxy);
    let c = connect(&app_url(&proxy)).await;
    for _ in 0..10 {
        c.simple_query(&format!("select v from {t} where id = 3"))
            .await
            .expect("read");
    }
    let stmt = c
        .prepare(&format!("select v from {t} where id = $1"))
        .await
        .expect("prepare");
    for _ in 0..4 {
        c.query(&stmt, &[&2i32]).await.expect("extended read");
    }
    for _ in 0..3 {
        let e = c
            .simple_query("select 1/0")
            .await
            .expect_err("division by zero");
        assert_eq!(e.code().map(|c| c.code()), Some("22012"));
    }
    let e = c
        .simple_query(&format!("insert into {t} values (1, 'dup')"))
        .await
        .expect_err("duplicate key");
    assert_eq!(e.code().map(|c| c.code()), Some("23505"));

    // A client hears of a failed simple query at its ErrorResponse; the proxy counts it at the
    // ReadyForQuery right behind. Scrape once the last one is counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (status, text) = get(&addr, "/metrics").await;
        assert_eq!(status, 200);
        let errors = metric(
            &text,
            "pgcache_queries_total",
            &[("protocol", "simple"), ("outcome", "error")],
        );
        if errors >= 4.0 || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let m = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels);
    // 10 identical simple reads: one miss fills, nine hits; 4 extended reads: one miss, 3 hits.
    assert_eq!(m("pgcache_cache_misses_total", &[]), 2.0);
    assert_eq!(m("pgcache_cache_hits_total", &[]), 12.0);
    let q = |p: &str, o: &str| m("pgcache_queries_total", &[("protocol", p), ("outcome", o)]);
    assert_eq!(q("simple", "cached"), 9.0);
    assert_eq!(q("extended", "cached"), 3.0);
    assert_eq!(q("extended", "ok"), 1.0);
    assert_eq!(q("extended", "error"), 0.0);
    assert_eq!(q("simple", "error"), 4.0);
    assert_eq!(m("pgcache_query_errors_total", &[("class", "22")]), 3.0);
    assert_eq!(m("pgcache_query_errors_total", &[("class", "23")]), 1.0);
    assert_eq!(
        m(
            "pgcache_query_duration_seconds_count",
            &[("source", "cache")]
        ),
        12.0
    );
    assert!(m("pgcache_client_bytes_received_total", &[]) > 0.0);
    assert!(m("pgcache_client_bytes_sent_total", &[]) > 0.0);
    assert!(m("pgcache_pool_acquire_wait_seconds_count", &[]) >= 1.0);
    assert_eq!(
        m("pgcache_pool_max_connections", &[("pool", "app/app")]),
        4.0
    );

    // The same counts per fingerprint, in the console and as JSON.
    let r = query_row(&proxy, &format!("from {t} where id = $1")).await;
    assert_eq!(r["calls"], "14", "{r:?}");
    assert_eq!(r["cache_hits"], "12", "{r:?}");
    assert_eq!(r["rows"], "2", "{r:?}"); // rows counted from upstream replies only
    let r = query_row(&proxy, "select $1/$2").await;
    assert_eq!((r["calls"].as_str(), r["errors"].as_str()), ("3", "3"));
    let (status, body) = get(&addr, "/queries?sort=calls&limit=3").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let rows = json.as_array().expect("array");
    assert!(rows.len() <= 3);
    assert_eq!(rows[0]["calls"], 14, "{body}");
    let (status, _) = get(&addr, "/queries?sort=nonsense").await;
    assert_eq!(status, 400);
    assert!(admin(&proxy)
        .await
        .simple_query("SHOW QUERIES ORDER BY nonsense")
        .await
        .is_err());
}

/// With the cache on, a simple query's fingerprint comes from the cache's plan of it (one plan
/// serves texts that differ only in numbers): texts that differ in constants still count under
/// one fingerprint, and a text on another table never under theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cache_on_texts_differing_in_constants_share_a_fingerprint() {
    let t = numbered_table("insight_planned", 5);
    let u = numbered_table("insight_planned_other", 5);
    let proxy = cache_proxy("transaction", "");
    let c = connect(&app_url(&proxy)).await;
    for sql in [
        format!("update {t} set v = 'a' where id = 1"),
        format!("update {t} set v = 'bb' where id = 2"),
        format!("update {t}  set v = 'a'  where id = 3"),
        format!("update {u} set v = 'a' where id = 1"),
        format!("select v from {t} where id = 4"),
        format!("select v from {t} where id = 5"),
        format!("select v from {u} where id = 4"),
    ] {
        c.simple_query(&sql).await.expect(&sql);
    }
    let update = |name: &str| format!("update {name} set v = $1 where id = $2");
    assert_eq!(calls(&proxy, &update(&t)).await, "3");
    assert_eq!(calls(&proxy, &update(&u)).await, "1");
    let select = |name: &str| format!("select v from {name} where id = $1");
    assert_eq!(calls(&proxy, &select(&t)).await, "2");
    assert_eq!(calls(&proxy, &select(&u)).await, "1");
}

/// With the cache off, a simple-protocol statement that differs from the session's last only in
/// numbers takes that one's fingerprint (and, if that one could not touch the session, its
/// pooling analysis) without scanning its text. Counts stay per fingerprint through repeats,
/// changes of statement and texts that differ in more than numbers; a `SET` repeated with a new
/// number is analysed again, so the value a client gets back on a shared connection is its last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_repeated_with_new_numbers_keep_their_own_fingerprint_and_effects() {
    let t = numbered_table("insight_repeat", 9);
    let u = numbered_table("insight_repeat_other", 9);
    let proxy = cache_proxy(
        "transaction",
        "[pool]\nmax_size = 1\n[cache]\nenabled = false\n",
    );
    let c = connect(&app_url(&proxy)).await;
    for (sql, want) in [
        (format!("select v from {t} where id = 1"), "v1"),
        (format!("select v from {t} where id = 22"), ""),
        (format!("select v from {u} where id = 3"), "v3"),
        (format!("select v from {u} where id = 4"), "v4"),
        (format!("select v from {t} where id = 5 -- five"), "v5"),
        (format!("select v from {t} where id = 6"), "v6"),
        (format!("select v || 7 from {t} where id = 7"), "v77"),
        (format!("select v || 8 from {t} where id = 8"), "v88"),
    ] {
        let rows = c.simple_query(&sql).await.expect(&sql);
        let got = support::cache::first_value(&rows).unwrap_or_default();
        assert_eq!(got, want, "{sql}");
    }
    let select = |name: &str| format!("select v from {name} where id = $1");
    assert_eq!(calls(&proxy, &select(&t)).await, "4");
    assert_eq!(calls(&proxy, &select(&u)).await, "2");
    let concat = format!("select v || $1 from {t} where id = $2");
    assert_eq!(calls(&proxy, &concat).await, "2");

    // One server connection, two clients: the other client's statement resets the setting on
    // it, and this client's next one gets back what it set last.
    c.simple_query("set statement_timeout = 1000")
        .await
        .expect("set");
    c.simple_query("set statement_timeout = 2000")
        .await
        .expect("set again");
    let other = connect(&app_url(&proxy)).await;
    let theirs = support::cache::value(&other, "show statement_timeout").await;
    assert_eq!(theirs, "0");
    let ours = support::cache::value(&c, "show statement_timeout").await;
    assert_eq!(ours, "2s");
}

/// A batch answered from the cache can bring a new unnamed statement: a later run of it that
/// goes upstream (a `Bind` with no `Parse`) counts under its own fingerprint, not under that of
/// the unnamed statement parsed before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unnamed_statement_from_a_cached_batch_counts_under_its_own_fingerprint() {
    use support::raw::{bind, execute, parse, sync, RawConn};
    let t = numbered_table("insight_unnamed", 5);
    support::cache::direct(&format!("grant select on {t} to trustuser"));
    let proxy = cache_proxy("transaction", "");
    let mut raw = RawConn::login_trust(proxy.port()).await;
    let (a, b) = (
        format!("select v from {t} where id = 1"),
        format!("select count(*) from {t}"),
    );
    let run = |sql: Option<&str>| {
        let mut m = sql.map(|s| parse("", s, &[])).unwrap_or_default();
        m.extend(bind("", "", &[], &[], &[]));
        m.extend(execute("", 0));
        m.extend(sync());
        m
    };
    let mut rows = Vec::new();
    // b upstream, a upstream, b from the cache (a new unnamed statement, served).
    for batch in [run(Some(&b)), run(Some(&a)), run(Some(&b)), run(None)] {
        if batch[0] == b'B' {
            // A write through the proxy: b's entry is stale, its next run goes upstream.
            let c = connect(&app_url(&proxy)).await;
            c.simple_query(&format!("insert into {t} values (6, 'v6')"))
                .await
                .expect("insert");
        }
        raw.send(&batch).await;
        let msgs = raw.until_ready().await;
        assert!(msgs.iter().all(|(tag, _)| *tag != b'E'), "{msgs:?}");
        rows.extend(msgs.into_iter().filter(|(tag, _)| *tag == b'D'));
    }
    assert!(
        rows.last().is_some_and(|(_, d)| d.ends_with(b"6")),
        "{rows:?}"
    );
    assert_eq!(calls(&proxy, &format!("count(*) from {t}")).await, "3");
    assert_eq!(calls(&proxy, &format!("from {t} where id = $1")).await, "1");
}

/// A transaction-mode proxy, cache off, logging every statement slower than 1 ms to `log` (as
/// JSON lines, at up to 1,000 a second); with `explain`, EXPLAINing them and reporting
/// sequential scans over 100,000+ rows.
fn slow_log_proxy(log: &std::path::Path, explain: bool) -> Proxy {
    let explain = if explain {
        "explain = true\nexplain_min_rows = 100000\n"
    } else {
        ""
    };
    let extra = format!(
        "[cache]\nenabled = false\n[slow_query]\nthreshold = \"1ms\"\nlog = \"{}\"\n\
         max_per_second = 1000\n{explain}",
        log.display()
    );
    cache_proxy("transaction", &extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_statements_are_logged_and_explained() {
    let t = table("insight_big", "id int, val int, name text");
    support::cache::direct(&format!(
        "insert into {t} select g, g % 1000, 'n' || g from generate_series(1, 200000) g; analyze {t}"
    ));
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("slow.jsonl");
    let proxy = slow_log_proxy(&log, true);
    let addr = proxy_metrics(&proxy);
    let c = connect(&app_url(&proxy)).await;
    c.simple_query("select pg_sleep(0.05)")
        .await
        .expect("sleep");
    c.simple_query(&format!("select count(*) from {t} where val = 7"))
        .await
        .expect("seq scan, simple protocol");
    let n: i64 = c
        .query_one(
            &format!("select count(*) from {t} where id > $1 and val = $2"),
            &[&10i32, &7i32],
        )
        .await
        .expect("seq scan, extended protocol")
        .get(0);
    assert_eq!(n, 199);

    // Lines are written by a background task, after EXPLAIN: wait for them.
    let deadline = Instant::now() + Duration::from_secs(20);
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect();
        let explained = lines
            .iter()
            .filter(|l| {
                l["explain"]
                    .as_str()
                    .is_some_and(|e| e.contains("CREATE INDEX"))
            })
            .count();
        if explained >= 2 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let find = |needle: &str| {
        lines
            .iter()
            .find(|l| l["query"].as_str().is_some_and(|q| q.contains(needle)))
            .unwrap_or_else(|| panic!("no {needle:?} in the slow log: {lines:#?}"))
    };
    let sleep = find("pg_sleep");
    assert!(
        sleep["duration_ms"].as_f64().unwrap_or(0.0) >= 50.0,
        "{sleep}"
    );
    assert_eq!(sleep["query"], "select pg_sleep($1)");
    assert_eq!(sleep["database"], "app");
    assert_eq!(sleep["user"], "app");
    assert_eq!(sleep["cached"], false);
    assert!(sleep["client"]
        .as_str()
        .is_some_and(|c| c.starts_with("127.0.0.1:")));
    assert_eq!(sleep["fingerprint"].as_str().map(str::len), Some(16));
    let simple = find(&format!("from {t} where val = $1"));
    assert_eq!(simple["rows"], 1);
    let e = simple["explain"].as_str().unwrap_or("");
    assert!(e.contains(&format!("Seq Scan on public.{t}")), "{simple}");
    assert!(
        e.contains(&format!("CREATE INDEX ON public.{t} (val)")),
        "{simple}"
    );
    let extended = find(&format!("from {t} where id > $1 and val = $2"));
    let e = extended["explain"].as_str().unwrap_or("");
    assert!(
        e.contains(&format!("CREATE INDEX ON public.{t} (val, id)")),
        "{extended}"
    );

    // The same in the console, on the fingerprint, and on /metrics.
    let slow = show(&proxy, "SHOW SLOW LIMIT 50").await;
    assert!(
        slow.iter().any(|r| r["query"] == "select pg_sleep($1)"),
        "{slow:?}"
    );
    let r = query_row(&proxy, &format!("from {t} where val = $1")).await;
    assert!(r["advice"].contains("CREATE INDEX"), "{r:?}");
    let (_, text) = get(&addr, "/metrics").await;
    assert!(metric(&text, "pgcache_slow_queries_total", &[]) >= 3.0);
    assert!(metric(&text, "pgcache_explains_total", &[("outcome", "ok")]) >= 2.0);
    let (status, body) = get(&addr, "/slow?limit=2").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(json.as_array().map(Vec::len), Some(2), "{body}");
}

/// Lines read from a JSON-lines file once `what` shows up in it (hang guard: 20 s).
async fn wait_for_line(path: &std::path::Path, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(what) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {what:?} in {}: {text}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `logrotate` moves the slow log away (no signal, no `copytruncate`): the next line goes to a
/// new file at the configured path, not after the last one in the moved file.
#[tokio::test]
async fn the_slow_log_follows_its_path_when_the_file_is_rotated() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("slow.jsonl");
    let proxy = slow_log_proxy(&log, false);
    let c = connect(&app_url(&proxy)).await;
    c.simple_query("select pg_sleep(0.01) as before_rotation")
        .await
        .unwrap();
    wait_for_line(&log, "before_rotation").await;
    let rotated = dir.path().join("slow.jsonl.1");
    std::fs::rename(&log, &rotated).expect("rotate");
    c.simple_query("select pg_sleep(0.01) as after_rotation")
        .await
        .unwrap();
    let text = wait_for_line(&log, "after_rotation").await;
    assert!(!text.contains("before_rotation"), "{text}");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(!old.contains("after_rotation"), "{old}");
}

/// The EXPLAIN of a slow statement runs with the client's settings: a table found through the
/// client's `search_path` (set in transaction mode, where the proxy carries it) is explained,
/// not reported missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_statements_are_explained_with_the_clients_search_path() {
    support::cache::direct(
        "create schema if not exists insight_sp authorization app; \
         drop table if exists insight_sp.wide; \
         create table insight_sp.wide (id int, val int); \
         alter table insight_sp.wide owner to app; \
         insert into insight_sp.wide select g, g % 1000 from generate_series(1, 150000) g; \
         analyze insight_sp.wide",
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("slow.jsonl");
    let proxy = slow_log_proxy(&log, true);
    let c = connect(&app_url(&proxy)).await;
    c.batch_execute("set search_path = insight_sp, public")
        .await
        .expect("set search_path");
    c.simple_query("select count(*) from wide where val = 7")
        .await
        .expect("seq scan through the search_path");
    let deadline = Instant::now() + Duration::from_secs(20);
    let explain = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let found = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
            .find(|l| l["query"].as_str().is_some_and(|q| q.contains("from wide")))
            .and_then(|l| l["explain"].as_str().map(str::to_string));
        if let Some(e) = found {
            break e;
        }
        assert!(Instant::now() < deadline, "no explained line in {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        explain.contains("Seq Scan on insight_sp.wide")
            && explain.contains("CREATE INDEX ON insight_sp.wide (val)"),
        "{explain}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_statements_are_reported_with_advice() {
    let t = table("insight_items", "id int primary key, name text");
    support::cache::direct(&format!(
        "insert into {t} select g, 'n' || g from generate_series(1, 50) g"
    ));
    let proxy = cache_proxy(
        "transaction",
        "[cache]\nenabled = false\n[insight]\nrepeat_threshold = 10\n",
    );
    let addr = proxy_metrics(&proxy);
    let c = connect(&app_url(&proxy)).await;
    // N+1: one read per id.
    let stmt = c
        .prepare(&format!("select name from {t} where id = $1"))
        .await
        .expect("prepare");
    for id in 1..=25i32 {
        c.query(&stmt, &[&id]).await.expect("read");
    }
    // Row-at-a-time inserts in one transaction: BEGIN and COMMIT do not break the run.
    c.simple_query("begin").await.expect("begin");
    for id in 100..115 {
        c.simple_query(&format!("insert into {t} values ({id}, 'x')"))
            .await
            .expect("insert");
    }
    c.simple_query("commit").await.expect("commit");
    // A short run (under the threshold) is not reported.
    for id in 1..5i32 {
        c.query(
            &format!("select id from {t} where name = $1"),
            &[&format!("n{id}")],
        )
        .await
        .expect("short run");
    }

    let r = query_row(&proxy, &format!("select name from {t} where id = $1")).await;
    assert_eq!(
        (r["repeated_runs"].as_str(), r["longest_run"].as_str()),
        ("1", "25"),
        "{r:?}"
    );
    assert!(r["advice"].contains("N+1"), "{r:?}");
    let r = query_row(&proxy, &format!("insert into {t} values")).await;
    assert_eq!(
        (r["repeated_runs"].as_str(), r["longest_run"].as_str()),
        ("1", "15"),
        "{r:?}"
    );
    assert!(r["advice"].contains("multi-row INSERT"), "{r:?}");
    let r = query_row(&proxy, &format!("select id from {t} where name = $1")).await;
    assert_eq!(r["repeated_runs"], "0", "{r:?}");
    let (_, text) = get(&addr, "/metrics").await;
    assert_eq!(
        metric(&text, "pgcache_repeated_statement_runs_total", &[]),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_degraded_while_a_pool_is_nearly_full() {
    let proxy = cache_proxy(
        "session",
        "[cache]\nenabled = false\n[pool]\nmax_size = 2\n[metrics]\nhealth_pool_utilisation = 0.5\n",
    );
    let addr = proxy_metrics(&proxy);
    let one = connect(&app_url(&proxy)).await;
    one.simple_query("select 1").await.expect("first client");
    let (status, body) = get(&addr, "/health").await;
    assert_eq!(status, 200, "{body}");
    let two = connect(&app_url(&proxy)).await;
    two.simple_query("select 1").await.expect("second client");
    let (status, body) = get(&addr, "/health").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("pool app/app: 2 of 2 server connections busy"),
        "{body}"
    );
    drop(two);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(&addr, "/health").await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still degraded: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
