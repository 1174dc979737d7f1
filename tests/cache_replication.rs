//! Invalidation from PostgreSQL's change stream: writes that bypass the proxy (psql straight to
//! the server) stop being served from the cache once the stream delivers them; the stream
//! confirms its position, survives an upstream restart, and `pgcache check` explains what the
//! upstream lacks.

mod support;

use std::time::{Duration, Instant};
use support::cache::{app_url, cache_proxy, direct, proxy_metrics, table, value};
use support::http::http_get;
use support::{connect, pg, proxy_config, run_check, PgOptions, PgServer, Proxy};

/// A replication role and a publication for every table (the publication needs a superuser,
/// so the test makes it; the proxy creates its own slot).
fn prepare_upstream(server: &PgServer, publication: &str) {
    // Tests run at once; catalog rows are not created concurrently.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    server.psql(
        "app",
        &format!(
            "do $$ begin if not exists (select from pg_roles where rolname = 'streamer') then \
               create role streamer login replication password 'streamer'; end if; end $$; \
             do $$ begin if not exists (select from pg_publication where pubname = '{publication}') then \
               create publication {publication} for all tables; end if; end $$;"
        ),
    );
}

fn stream_toml(slot: &str, publication: &str) -> String {
    format!(
        "[invalidation.replication]\nenabled = true\ndatabase = \"app\"\nuser = \"streamer\"\n\
         slot = \"{slot}\"\npublication = \"{publication}\"\nstatus_interval = \"1s\"\n\
         [users.streamer]\npassword = \"streamer\"\n"
    )
}

async fn metric(addr: &str, name: &str) -> f64 {
    let (addr, name) = (addr.to_string(), name.to_string());
    tokio::task::spawn_blocking(move || {
        let (_, text) = http_get(&addr, "/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
            .unwrap_or(f64::NAN)
    })
    .await
    .expect("scrape")
}

async fn wait_stream_up(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(addr, "pgcache_replication_up").await != 1.0 {
        assert!(Instant::now() < deadline, "change stream did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Poll `sql` through `c` until it returns `want`; the time it took.
async fn until(c: &tokio_postgres::Client, sql: &str, want: &str) -> Duration {
    let started = Instant::now();
    loop {
        let got = c
            .simple_query(sql)
            .await
            .map(|m| support::cache::first_value(&m).unwrap_or_else(|| "(none)".into()))
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        if got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{sql}: still {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn drop_slot(server: &PgServer, slot: &str) {
    // The slot is released when the proxy's connection closes.
    for _ in 0..100 {
        let out = server.psql(
            "app",
            &format!("select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = '{slot}' and not active"),
        );
        let left = server.psql(
            "app",
            &format!("select count(*) from pg_replication_slots where slot_name = '{slot}'"),
        );
        if left.trim() == "0" {
            return;
        }
        let _ = out;
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("replication slot {slot} still active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_are_invalidated_by_the_change_stream() {
    prepare_upstream(pg(), "pgc_test_pub");
    let t = table("repl_items", "id int primary key, v int");
    direct(&format!("insert into {t} values (1, 0), (2, 0)"));
    let slot = format!("pgc_test_{}", std::process::id());
    let proxy = cache_proxy(
        "transaction",
        &format!(
            "[cache]\ndefault_ttl = \"1h\"\n{}",
            stream_toml(&slot, "pgc_test_pub")
        ),
    );
    let addr = proxy_metrics(&proxy);
    wait_stream_up(&addr).await;
    // A proxy without the stream, to show what the stream prevents.
    let blind = cache_proxy("transaction", "[cache]\ndefault_ttl = \"1h\"\n");
    let c = connect(&app_url(&proxy)).await;
    let b = connect(&app_url(&blind)).await;
    let read = format!("select v from {t} where id = 1");
    for client in [&c, &b] {
        assert_eq!(value(client, &read).await, "0");
        assert_eq!(value(client, &read).await, "0");
    }
    let hits = metric(&addr, "pgcache_cache_hits_total").await;
    assert!(hits >= 1.0, "the second read is a hit: {hits}");

    // UPDATE behind the proxy's back.
    direct(&format!("update {t} set v = 1 where id = 1"));
    let delay = until(&c, &read, "1").await;
    eprintln!("direct UPDATE seen through the change stream after {delay:?}");
    assert_eq!(
        value(&b, &read).await,
        "0",
        "without the stream the stale row stays cached"
    );

    // DELETE, INSERT and TRUNCATE too.
    let count = format!("select count(*) from {t}");
    assert_eq!(value(&c, &count).await, "2");
    direct(&format!("insert into {t} values (3, 0)"));
    until(&c, &count, "3").await;
    direct(&format!("delete from {t} where id = 2"));
    until(&c, &count, "2").await;
    direct(&format!("truncate {t}"));
    let delay = until(&c, &count, "0").await;
    eprintln!("direct TRUNCATE seen after {delay:?}");
    assert!(metric(&addr, "pgcache_replication_transactions_total").await >= 4.0);

    // The position is confirmed: the slot does not hold WAL back.
    let lsn = direct("select pg_current_wal_lsn()");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let behind = direct(&format!(
            "select confirmed_flush_lsn < '{}'::pg_lsn from pg_replication_slots where slot_name = '{slot}'",
            lsn.trim()
        ));
        if behind.trim() == "f" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slot {slot} never confirmed {lsn}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop((c, b));
    drop(proxy);
    drop_slot(pg(), &slot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_resumes_after_an_upstream_restart() {
    let server = PgServer::start_new(PgOptions::default());
    prepare_upstream(&server, "pgc_pub");
    server.psql(
        "app",
        "create table restart_items (id int primary key, v int); alter table restart_items owner to app; insert into restart_items values (1, 0)",
    );
    let metrics = format!("127.0.0.1:{}", support::free_port());
    let extra = format!(
        "[pool]\nmode = \"transaction\"\n[cache]\nenabled = true\n[[cache.rules]]\ntables = [\"*\"]\n\
         [metrics]\nlisten = \"{metrics}\"\n{}",
        stream_toml("pgc_restart", "pgc_pub")
    );
    let proxy = Proxy::start(&proxy_config(&server, support::free_port(), &extra));
    support::http::wait_http(&metrics);
    wait_stream_up(&metrics).await;
    let read = "select v from restart_items where id = 1";
    {
        let c = connect(&proxy.url("app", "app", "app")).await;
        assert_eq!(value(&c, read).await, "0");
    }
    server.stop();
    // Written while the proxy cannot see anything: the slot keeps it for the stream.
    server.start();
    server.psql("app", "update restart_items set v = 2 where id = 1");
    let c = connect(&proxy.url("app", "app", "app")).await;
    let delay = until(&c, read, "2").await;
    eprintln!("write made during the outage seen {delay:?} after reconnecting");
    wait_stream_up(&metrics).await;
    server.psql("app", "update restart_items set v = 3 where id = 1");
    until(&c, read, "3").await;
}

#[test]
fn check_explains_what_the_upstream_lacks() {
    prepare_upstream(pg(), "pgc_test_pub");
    let base = |user: &str, password: &str| {
        proxy_config(
            pg(),
            support::free_port(),
            &format!(
                "[cache]\nenabled = true\n[[cache.rules]]\ntables = [\"*\"]\n\
                 [invalidation.replication]\nenabled = true\ndatabase = \"app\"\nuser = \"{user}\"\n\
                 publication = \"pgc_test_pub\"\nslot = \"pgc_check\"\n\
                 [users.{user}]\npassword = \"{password}\"\n"
            ),
        )
    };
    let out = run_check(&base("other", "other"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("REPLICATION"), "{text}");
    let out = run_check(&base("streamer", "streamer"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// In a LATIN1 database, the stream's relation names arrive in UTF-8 (the proxy asks for
/// `client_encoding=UTF8`), so a write behind the proxy's back to a table named outside ASCII
/// invalidates the reads of that table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_names_tables_outside_ascii_in_a_latin1_database() {
    let db = "latin1_stream";
    pg().psql(
        "postgres",
        &format!(
            "drop database if exists {db}; create database {db} owner app template template0 \
             encoding 'LATIN1' lc_collate 'C' lc_ctype 'C'"
        ),
    );
    let owner = connect(&pg().url("app", "app", db)).await;
    owner
        .batch_execute(
            "create table \"café\" (id int primary key); insert into \"café\" values (1)",
        )
        .await
        .unwrap();
    prepare_upstream(pg(), "pgc_test_pub");
    pg().psql(db, "create publication pgc_latin1_pub for all tables");
    let slot = format!("pgc_latin1_{}", std::process::id());
    let stream = stream_toml(&slot, "pgc_latin1_pub")
        .replace("database = \"app\"", &format!("database = \"{db}\""));
    let proxy = cache_proxy(
        "transaction",
        &format!("[cache]\ndefault_ttl = \"1h\"\n{stream}"),
    );
    let addr = proxy_metrics(&proxy);
    wait_stream_up(&addr).await;
    let c = connect(&proxy.url("app", "app", db)).await;
    let read = "select count(*) from \"café\"";
    assert_eq!(value(&c, read).await, "1");
    assert_eq!(value(&c, read).await, "1");
    // Cached (the catalog knows the table by its UTF-8 name).
    assert!(metric(&addr, "pgcache_cache_hits_total").await >= 1.0);
    // Behind the proxy's back.
    owner
        .batch_execute("insert into \"café\" values (2)")
        .await
        .unwrap();
    until(&c, read, "2").await;
    drop(proxy);
    let drop_it = format!(
        "select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = '{slot}' and not active"
    );
    for _ in 0..100 {
        pg().psql(db, &drop_it);
        let left = pg().psql(
            db,
            &format!("select count(*) from pg_replication_slots where slot_name = '{slot}'"),
        );
        if left.trim() == "0" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
