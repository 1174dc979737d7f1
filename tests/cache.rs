//! The result cache against a real PostgreSQL, in both pool modes. A cache hit is shown by a
//! write made directly on PostgreSQL (bypassing the proxy, which has no way to know of it) that
//! the proxy's answer does not show; every test then tries to get a stale or foreign answer
//! through the proxy and must fail to.

mod support;

use support::cache::*;
use support::{connect, pg};

#[tokio::test]
async fn simple_reads_hit_and_writes_through_the_proxy_invalidate() {
    for mode in MODES {
        let t = table(&format!("simple_{mode}"), "id int primary key, v text");
        pg().psql(
            "app",
            &format!("insert into {t} values (1, 'one'), (2, 'two')"),
        );
        let proxy = cache_proxy(mode, "");
        let c = connect(&app_url(&proxy)).await;
        let q = format!("select v from {t} where id = 1");
        assert_eq!(value(&c, &q).await, "one");
        direct(&format!("update {t} set v = 'direct' where id = 1"));
        assert_eq!(value(&c, &q).await, "one", "{mode}: second read is a hit");
        c.simple_query(&format!("update {t} set v = 'proxied' where id = 1"))
            .await
            .unwrap();
        assert_eq!(value(&c, &q).await, "proxied", "{mode}: own write seen");
        // Another client, another connection: the write is visible there too.
        let other = connect(&app_url(&proxy)).await;
        assert_eq!(value(&other, &q).await, "proxied", "{mode}");
        let figures = cache_figures(&proxy).await;
        // Reads: miss, hit, (write) miss, hit by the other client.
        assert_eq!(figures["hits"], "2", "{mode}: {figures:?}");
        assert_eq!(figures["misses"], "2", "{mode}: {figures:?}");
    }
}

#[tokio::test]
async fn prepared_reads_hit_per_parameter_and_see_writes() {
    for mode in MODES {
        let t = table(&format!("prep_{mode}"), "id int primary key, v text");
        pg().psql(
            "app",
            &format!("insert into {t} values (1, 'one'), (2, 'two')"),
        );
        let proxy = cache_proxy(mode, "");
        let c = connect(&app_url(&proxy)).await;
        let st = c
            .prepare(&format!("select v from {t} where id = $1"))
            .await
            .unwrap();
        let get = |id: i32| {
            let (c, st) = (&c, &st);
            async move { c.query_one(st, &[&id]).await.unwrap().get::<_, String>(0) }
        };
        assert_eq!(get(1).await, "one");
        assert_eq!(get(2).await, "two");
        direct(&format!("update {t} set v = v || '!'"));
        assert_eq!(get(1).await, "one", "{mode}: hit");
        assert_eq!(get(2).await, "two", "{mode}: hit, its own key");
        c.execute(&format!("update {t} set v = 'new' where id = $1"), &[&1i32])
            .await
            .unwrap();
        assert_eq!(get(1).await, "new", "{mode}");
        assert_eq!(get(2).await, "two!", "{mode}: the whole table was bumped");
        // Unnamed statements (query with parameters, no prepare) are cached too.
        let q = format!("select v from {t} where id = $1");
        let r: String = c.query_one(&q, &[&2i32]).await.unwrap().get(0);
        assert_eq!(r, "two!");
        direct(&format!("update {t} set v = 'direct2' where id = 2"));
        let r: String = c.query_one(&q, &[&2i32]).await.unwrap().get(0);
        assert_eq!(r, "two!", "{mode}: unnamed statement hit");
        let r: String = c.query_one(&st, &[&2i32]).await.unwrap().get(0);
        assert_eq!(r, "two!", "{mode}: prepared statement keyed the same text");
    }
}

#[tokio::test]
async fn row_level_security_and_roles_never_share_rows() {
    let t = table("rls_docs", "owner text, body text");
    direct(&format!(
        "insert into {t} values ('app', 'app secret'), ('other', 'other secret');
         alter table {t} enable row level security; alter table {t} force row level security;
         create policy own on {t} using (owner = current_user);
         grant select on {t} to other;"
    ));
    for mode in MODES {
        // Even a rule that asks to share results across roles does not share RLS tables.
        let extra = "[users.other]\npassword = \"other\"\n[[cache.rules]]\ntables = [\"*\"]\nshared = true\n";
        let proxy = cache_proxy(mode, extra);
        let app = connect(&app_url(&proxy)).await;
        let other = connect(&proxy.url("other", "other", "app")).await;
        let q = format!("select body from {t}");
        for _ in 0..3 {
            assert_eq!(column(&app, &q).await, ["app secret"], "{mode}");
            assert_eq!(column(&other, &q).await, ["other secret"], "{mode}");
        }
    }
}

#[tokio::test]
async fn search_path_and_settings_are_part_of_the_key() {
    direct(
        "drop schema if exists sa cascade; drop schema if exists sb cascade;
         create schema sa authorization app; create schema sb authorization app;
         create table sa.sp (v text); create table sb.sp (v text);
         alter table sa.sp owner to app; alter table sb.sp owner to app;
         insert into sa.sp values ('a'); insert into sb.sp values ('b');",
    );
    for mode in MODES {
        let proxy = cache_proxy(mode, "");
        let c = connect(&app_url(&proxy)).await;
        let d = connect(&app_url(&proxy)).await;
        for _ in 0..2 {
            c.simple_query("set search_path = sa").await.unwrap();
            d.simple_query("set search_path = sb").await.unwrap();
            assert_eq!(value(&c, "select v from sp").await, "a", "{mode}");
            assert_eq!(value(&d, "select v from sp").await, "b", "{mode}");
            c.simple_query("set search_path = sb").await.unwrap();
            assert_eq!(value(&c, "select v from sp").await, "b", "{mode}");
        }
        // Output formats follow settings too.
        let t = table(&format!("ts_{mode}"), "at timestamptz");
        direct(&format!("insert into {t} values ('2020-01-01 12:00+00')"));
        let q = format!("select at from public.{t}");
        c.simple_query("set timezone = 'UTC'").await.unwrap();
        assert_eq!(value(&c, &q).await, "2020-01-01 12:00:00+00");
        c.simple_query("set timezone = 'Asia/Tokyo'").await.unwrap();
        assert_eq!(value(&c, &q).await, "2020-01-01 21:00:00+09", "{mode}");
    }
}

#[tokio::test]
async fn errors_and_results_over_max_entry_bytes_are_not_stored() {
    for mode in MODES {
        let t = table(&format!("big_{mode}"), "id int, v int, pad text");
        direct(&format!(
            "insert into {t} select g, 1, repeat('x', 100) from generate_series(1, 100) g"
        ));
        let proxy = cache_proxy(mode, "[cache]\nmax_entry_bytes = 2000\n");
        let c = connect(&app_url(&proxy)).await;
        let bad = format!("select 1 / (v - v) from {t} where id = 1");
        for _ in 0..2 {
            let e = c.simple_query(&bad).await.unwrap_err();
            assert_eq!(e.as_db_error().unwrap().code().code(), "22012", "{mode}");
        }
        // A fresh client: tokio-postgres sends its next query before the failed one's
        // ReadyForQuery, and a query behind an unanswered one is not looked up.
        let c = connect(&app_url(&proxy)).await;
        let big = format!("select pad from {t}");
        assert_eq!(column(&c, &big).await.len(), 100);
        direct(&format!("delete from {t}"));
        assert_eq!(
            column(&c, &big).await.len(),
            0,
            "{mode}: not stored, read again"
        );
        // Only the (small) empty result after the delete was stored.
        let f = cache_figures(&proxy).await;
        assert_eq!(f["fills"], "1", "{mode}: {f:?}");
        assert_eq!(f["entries"], "1", "{mode}: {f:?}");
        let metrics = support::http::http_get(&proxy_metrics(&proxy), "/metrics").1;
        let metrics: String = metrics
            .lines()
            .filter(|l| l.starts_with("pgcache_cache"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(
            metrics.contains("pgcache_cache_fill_skips_total{reason=\"too_large\"} 1"),
            "{metrics}"
        );
        // One or two: tokio-postgres sends the next query as soon as it sees an error, and a
        // query behind an unanswered one is not looked up.
        assert!(
            metrics.contains("pgcache_cache_fill_skips_total{reason=\"error\"}"),
            "{metrics}"
        );
    }
}

#[tokio::test]
async fn hints_override_rules() {
    let t = table("hinted", "v text");
    direct(&format!("insert into {t} values ('one')"));
    let proxy = cache_proxy("transaction", "");
    let c = connect(&app_url(&proxy)).await;
    let nocache = format!("/* pgcache: nocache */ select v from {t}");
    let short = format!("/* pgcache: ttl=1s */ select v from {t}");
    assert_eq!(value(&c, &nocache).await, "one");
    assert_eq!(value(&c, &short).await, "one");
    direct(&format!("update {t} set v = 'two'"));
    assert_eq!(value(&c, &nocache).await, "two", "nocache goes upstream");
    assert_eq!(value(&c, &short).await, "one", "cached for a second");
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert_eq!(value(&c, &short).await, "two", "expired");
}

/// A session's statements that differ from its last one only in numbers reuse that one's plan
/// (no new plan key made): each still gets its own answer, its writes are still seen, and a
/// number in a comment or a string is not taken for one.
#[tokio::test]
async fn statements_differing_in_numbers_share_a_plan_not_an_answer() {
    let t = table("numbers", "id int primary key, v text");
    direct(&format!(
        "insert into {t} values (1, 'one'), (2, 'two'), (10, 'ten'), (3, 'three')"
    ));
    let proxy = cache_proxy("transaction", "");
    let c = connect(&app_url(&proxy)).await;
    let read = |id: &str| format!("select v from {t} where id = {id}");
    for (id, v) in [("1", "one"), ("2", "two"), ("10", "ten"), ("2", "two")] {
        assert_eq!(value(&c, &read(id)).await, v, "id = {id}");
    }
    direct(&format!("update {t} set v = 'direct' where id = 2"));
    assert_eq!(value(&c, &read("2")).await, "two", "a hit");
    assert_eq!(value(&c, &read("1")).await, "one", "its own entry");
    // Two writes in a row, the second planned from the first: both reach the cache.
    for (id, v) in [("1", "w1"), ("2", "w2")] {
        c.simple_query(&format!("update {t} set v = '{v}' where id = {id}"))
            .await
            .unwrap();
    }
    assert_eq!(value(&c, &read("2")).await, "w2", "own write seen");
    assert_eq!(value(&c, &read("1")).await, "w1", "own write seen");
    // A hint's number is in a comment: `ttl=1s` after `ttl=3600s` must not keep the hour.
    let hinted = |ttl: &str| format!("/* pgcache: ttl={ttl}s */ select v from {t} where id = 3");
    assert_eq!(value(&c, &hinted("3600")).await, "three");
    assert_eq!(value(&c, &hinted("1")).await, "three");
    direct(&format!("update {t} set v = 'changed' where id = 3"));
    assert_eq!(
        value(&c, &hinted("1")).await,
        "three",
        "cached for a second"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert_eq!(
        value(&c, &hinted("1")).await,
        "changed",
        "expired after its own second"
    );
    assert_eq!(value(&c, &hinted("3600")).await, "three", "an hour");
}

#[tokio::test]
async fn explicit_invalidation_from_the_console_and_http() {
    let t = table("explicit_t", "v text");
    direct(&format!("insert into {t} values ('one')"));
    let proxy = cache_proxy("transaction", "");
    let c = connect(&app_url(&proxy)).await;
    let admin = admin(&proxy).await;
    let q = format!("select v from {t}");
    let warm_then_change = |to: &'static str| {
        let (c, q, t) = (&c, q.clone(), t.clone());
        async move {
            value(c, &q).await;
            direct(&format!("update {t} set v = '{to}'"));
            assert_ne!(
                value(c, &q).await,
                to,
                "served from the cache before invalidation"
            );
        }
    };
    warm_then_change("two").await;
    admin
        .simple_query("INVALIDATE TABLE 'explicit_*'")
        .await
        .unwrap();
    assert_eq!(value(&c, &q).await, "two");
    warm_then_change("three").await;
    admin
        .simple_query("INVALIDATE PATTERN 'app/app/*'")
        .await
        .unwrap();
    assert_eq!(value(&c, &q).await, "three");
    warm_then_change("four").await;
    admin.simple_query("invalidate all").await.unwrap();
    assert_eq!(value(&c, &q).await, "four");
    warm_then_change("five").await;
    let (status, body) = support::http::http_request(
        &proxy_metrics(&proxy),
        "POST",
        "/cache/invalidate?table=explicit_t",
    );
    assert_eq!((status, body.trim()), (200, "{\"invalidated\":1}"));
    assert_eq!(value(&c, &q).await, "five");
    let (status, _) =
        support::http::http_request(&proxy_metrics(&proxy), "POST", "/cache/invalidate?rows=1");
    assert_eq!(status, 400);
    let e = admin.simple_query("INVALIDATE ROWS x").await.unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "42601");
    let entries = column(&admin, "SHOW CACHE ENTRIES").await;
    assert!(
        entries.iter().all(|n| n.starts_with("app/app/")),
        "{entries:?}"
    );
}

#[tokio::test]
async fn quick_mode_cache_all_flag() {
    let t = table("quick_t", "v text");
    direct(&format!("insert into {t} values ('one')"));
    let port = support::free_port();
    let listen = format!("127.0.0.1:{port}");
    let upstream = pg().url("app", "app", "app");
    let proxy =
        support::Proxy::start_args(&["--listen", &listen, "--upstream", &upstream, "--cache-all"]);
    let c = connect(&support::url(port, "app", "app", "app")).await;
    let q = format!("select v from {t}");
    assert_eq!(value(&c, &q).await, "one");
    direct(&format!("update {t} set v = 'two'"));
    assert_eq!(value(&c, &q).await, "one", "cached");
    drop(proxy);
}

#[tokio::test]
async fn reads_in_read_only_transactions_only_when_the_rule_allows() {
    let t = table("in_tx", "v text");
    direct(&format!("insert into {t} values ('one')"));
    // A role app may become, with no right to read the table.
    direct(
        "do $$ begin create role cache_reader nologin; exception when duplicate_object then null; end $$;
         grant cache_reader to app;",
    );
    let q = format!("select v from {t}");
    for (allowed, mode) in [(true, "transaction"), (false, "session")] {
        let extra = format!("[[cache.rules]]\ntables = [\"*\"]\nin_transaction = {allowed}\n");
        let proxy = cache_proxy(mode, &extra);
        let c = connect(&app_url(&proxy)).await;
        direct(&format!("update {t} set v = 'one'"));
        assert_eq!(value(&c, &q).await, "one");
        direct(&format!("update {t} set v = 'two'"));
        c.simple_query("begin").await.unwrap();
        let expect = if allowed { "one" } else { "two" };
        assert_eq!(
            value(&c, &q).await,
            expect,
            "plain BEGIN, rule in_transaction = {allowed}"
        );
        c.simple_query("commit").await.unwrap();
        // Never in repeatable read: the snapshot is the transaction's, not the cache's.
        c.simple_query("begin isolation level repeatable read")
            .await
            .unwrap();
        assert_eq!(value(&c, &q).await, "two");
        c.simple_query("commit").await.unwrap();
        // SET LOCAL ROLE changes who reads: never answered from the app role's entry.
        c.simple_query("begin").await.unwrap();
        c.simple_query("set local role cache_reader").await.unwrap();
        let e = c.simple_query(&q).await.unwrap_err();
        assert_eq!(e.as_db_error().unwrap().code().code(), "42501", "{mode}");
        c.simple_query("rollback").await.unwrap();
        // A transaction that wrote reads from PostgreSQL.
        c.simple_query("begin").await.unwrap();
        c.simple_query(&format!("update {t} set v = 'three'"))
            .await
            .unwrap();
        assert_eq!(value(&c, &q).await, "three");
        c.simple_query("rollback").await.unwrap();
    }
}

#[test]
fn pgbench_through_the_cache_hits_and_stays_consistent() {
    pg().psql("postgres", "drop database if exists cache_bench");
    pg().psql("postgres", "create database cache_bench owner app");
    for mode in MODES {
        let proxy = cache_proxy(mode, "");
        let url = proxy.url("app", "app", "cache_bench");
        if mode == MODES[0] {
            support::pgbench(&url, &["-i", "-s", "1", "-q"]);
        }
        // Ten hot accounts: read-only, most reads repeat and hit.
        let dir = tempfile::tempdir().unwrap();
        let hot = dir.path().join("hot.sql");
        let write = dir.path().join("write.sql");
        std::fs::write(
            &hot,
            "\\set aid random(1, 10)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n",
        )
        .unwrap();
        std::fs::write(
            &write,
            "\\set aid random(1, 10)\n\\set delta random(-5000, 5000)\nBEGIN;\n\
             UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;\n\
             SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\nEND;\n",
        )
        .unwrap();
        let (hot, write) = (hot.to_str().unwrap(), write.to_str().unwrap());
        for m in ["simple", "extended", "prepared"] {
            let args = ["-n", "-M", m, "-f", hot, "-c", "4", "-j", "2", "-t", "200"];
            let out = support::pgbench(&url, &args);
            assert!(
                out.contains("number of failed transactions: 0"),
                "{mode} -M {m}:\n{out}"
            );
        }
        let figures = |proxy: &support::Proxy| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(cache_figures(proxy))
        };
        let f = figures(&proxy);
        let hits: u64 = f["hits"].parse().unwrap();
        assert!(
            hits > 2000,
            "{mode}: 2,400 reads of 10 keys in 3 protocols: {f:?}"
        );
        // Reads and writes (in transactions) of the same accounts at once: writes keep
        // invalidating, and what is read must stay PostgreSQL's.
        for m in ["simple", "extended", "prepared"] {
            let args = [
                "-n",
                "-M",
                m,
                "-f",
                &format!("{hot}@4"),
                "-f",
                &format!("{write}@1"),
                "-c",
                "4",
                "-j",
                "2",
                "-t",
                "300",
            ];
            let out = support::pgbench(&url, &args);
            assert!(
                out.contains("number of failed transactions: 0"),
                "{mode} -M {m}:\n{out}"
            );
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let c = connect(&url).await;
            for aid in 1..=10 {
                let q = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid}");
                let via_proxy = value(&c, &q).await;
                let truth = pg().psql("cache_bench", &q);
                assert_eq!(via_proxy, truth, "{mode}: account {aid}");
            }
            let sum = "select sum(abalance) from pgbench_accounts";
            assert_eq!(
                value(&c, sum).await,
                pg().psql("cache_bench", sum),
                "{mode}"
            );
            let f = cache_figures(&proxy).await;
            let hits: u64 = f["hits"].parse().unwrap();
            assert!(hits > 1000, "{mode}: most hot reads hit: {f:?}");
        });
    }
}

fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[tokio::test]
async fn large_results_stream_with_bounded_memory_and_leaving_clients_store_nothing_partial() {
    let t = table("large_t", "id int, pad text");
    direct(&format!(
        "insert into {t} select g, repeat('x', 1000) from generate_series(1, 60000) g"
    ));
    let proxy = cache_proxy("transaction", "");
    let c = connect(&app_url(&proxy)).await;
    let all = format!("select pad from {t}");
    assert_eq!(column(&c, &all).await.len(), 60_000);
    let hwm = peak_rss_kb(proxy.pid());
    assert!(
        hwm < 45 * 1024,
        "a 60 MB result over cache.max_entry_bytes must stream: peak RSS {hwm} kB"
    );
    // A client asks for a cacheable 900 kB result and leaves at once. Whether or not the proxy
    // got the whole result before noticing, what it may have stored must be whole.
    direct(&format!("grant select on {t} to trustuser"));
    let some = format!("select pad from {t} where id <= 900");
    for _ in 0..5 {
        let mut raw = support::raw::RawConn::login_trust(proxy.port()).await;
        raw.send(&support::raw::query(&some)).await;
        drop(raw);
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut reader = support::raw::RawConn::login_trust(proxy.port()).await;
    for _ in 0..2 {
        let msgs = reader.simple(&some).await;
        let rows = msgs.iter().filter(|(tag, _)| *tag == b'D').count();
        assert_eq!(rows, 900, "{}", support::raw::tags(&msgs).len());
    }
}
