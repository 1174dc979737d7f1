//! The randomized consistency test: concurrent clients mix reads and writes through a caching
//! proxy on a small schema (autocommit and transactions, commits and rollbacks, an `ON UPDATE
//! CASCADE` foreign key, a trigger, a view; simple and extended protocol). Every value read is
//! monotonic, and every write reports (with `RETURNING`) a lower bound of the value it committed;
//! once that write's commit is acknowledged through the proxy, no read that begins later may see
//! less. The test counts reads, cache hits and stale reads, and fails on any stale read.
//!
//! (A floor taken from a direct read of PostgreSQL would be wrong: it can see a commit whose
//! acknowledgement is still on its way through the proxy, which no proxy can know of yet.)
//!
//! The same across two proxies sharing Redis in strict mode, with a writer that goes straight
//! to PostgreSQL: its commits reach the proxies through the change stream, so a read must see
//! them once `DIRECT_LAG` has passed since they were acknowledged.

mod support;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::cache::*;
use support::connect;

const ACCOUNTS: usize = 4;
const CLIENTS: usize = 6;
const RUN_FOR: Duration = Duration::from_secs(8);
/// A write straight to PostgreSQL must be seen by reads that begin this long after it.
const DIRECT_LAG: Duration = Duration::from_secs(2);

/// Highest committed values known to any writer, per account.
struct Floors {
    ver: Vec<AtomicI64>,
    counter: Vec<AtomicI64>,
    reads: AtomicU64,
    stale: AtomicU64,
    writes: AtomicU64,
    /// Writes straight to PostgreSQL: (acknowledged at, value) per account.
    direct: Vec<Mutex<Vec<(Instant, i64)>>>,
}

impl Floors {
    fn new() -> Floors {
        Floors {
            ver: (0..ACCOUNTS).map(|_| AtomicI64::new(0)).collect(),
            counter: (0..ACCOUNTS).map(|_| AtomicI64::new(0)).collect(),
            reads: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            direct: (0..ACCOUNTS).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    /// What a read of row `k` of the table only the direct writer writes, beginning now, must
    /// see at least.
    fn direct_floor(&self, k: usize) -> i64 {
        let direct = self.direct[k].lock().unwrap();
        direct
            .iter()
            .filter(|(at, _)| at.elapsed() >= DIRECT_LAG)
            .map(|(_, v)| *v)
            .max()
            .unwrap_or(0)
    }
}

/// A tiny deterministic generator (xorshift), one per client.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn schema(p: &str) {
    direct(&format!(
        "drop table if exists {p}_children, {p}_events, {p}_counters, {p}_direct cascade;
         drop table if exists {p}_accounts cascade;
         create table {p}_accounts (id int primary key, ver int not null default 0, unique (id, ver));
         create table {p}_children (id serial primary key, acc int, acc_ver int,
           foreign key (acc, acc_ver) references {p}_accounts (id, ver) on update cascade);
         create table {p}_counters (id int primary key, n int not null default 0);
         create table {p}_events (id serial primary key, acc int);
         create or replace function {p}_count() returns trigger language plpgsql as $$
           begin update {p}_counters set n = n + 1 where id = new.acc; return new; end $$;
         create trigger {p}_t after insert on {p}_events for each row execute function {p}_count();
         create or replace view {p}_view as select id, ver from {p}_accounts;
         insert into {p}_accounts select g from generate_series(0, {last}) g;
         insert into {p}_children (acc, acc_ver) select g, 0 from generate_series(0, {last}) g;
         insert into {p}_counters select g from generate_series(0, {last}) g;
         create table {p}_direct (id int primary key, ver int not null default 0);
         insert into {p}_direct select g from generate_series(0, {last}) g;
         alter table {p}_direct owner to app;
         alter table {p}_accounts owner to app; alter table {p}_children owner to app;
         alter table {p}_counters owner to app; alter table {p}_events owner to app;
         alter view {p}_view owner to app; alter function {p}_count() owner to app;
         grant usage on sequence {p}_children_id_seq, {p}_events_id_seq to app;",
        last = ACCOUNTS - 1
    ));
}

async fn int(c: &tokio_postgres::Client, sql: &str) -> i64 {
    value(c, sql)
        .await
        .parse()
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// A write of `value` to `floor` was acknowledged.
fn acked(floor: &AtomicI64, value: i64, f: &Floors) {
    floor.fetch_max(value, Ordering::SeqCst);
    f.writes.fetch_add(1, Ordering::Relaxed);
}

/// Writes straight to PostgreSQL, bypassing every proxy.
async fn direct_writer(p: String, seed: u64, f: Arc<Floors>) {
    let c = connect(&support::pg().url("app", "app", "app")).await;
    let mut rng = Rng(seed);
    let end = Instant::now() + RUN_FOR;
    while Instant::now() < end {
        let k = rng.below(ACCOUNTS);
        let sql = format!("update {p}_direct set ver = ver + 1 where id = {k} returning ver");
        let v = int(&c, &sql).await;
        f.direct[k].lock().unwrap().push((Instant::now(), v));
        f.writes.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn client(proxy_url: String, p: String, seed: u64, f: Arc<Floors>) {
    let c = connect(&proxy_url).await;
    let by_view = c
        .prepare(&format!("select ver from {p}_view where id = $1"))
        .await
        .unwrap();
    let bump = c
        .prepare(&format!(
            "update {p}_accounts set ver = ver + 1 where id = $1 returning ver"
        ))
        .await
        .unwrap();
    let mut rng = Rng(seed);
    let end = Instant::now() + RUN_FOR;
    while Instant::now() < end {
        let k = rng.below(ACCOUNTS);
        let (floor_of, sql): (&[AtomicI64], String) = match rng.below(16) {
            // Writes.
            0 => {
                let sql =
                    format!("update {p}_accounts set ver = ver + 1 where id = {k} returning ver");
                acked(&f.ver[k], int(&c, &sql).await, &f);
                continue;
            }
            1 => {
                let v: i32 = c.query_one(&bump, &[&(k as i32)]).await.unwrap().get(0);
                acked(&f.ver[k], v as i64, &f);
                continue;
            }
            2 => {
                let commit = rng.below(3) > 0;
                c.batch_execute("begin").await.unwrap();
                let v: i32 = c.query_one(&bump, &[&(k as i32)]).await.unwrap().get(0);
                // Own write inside the transaction, through the view and the cascade.
                let own = int(&c, &format!("select ver from {p}_view where id = {k}")).await;
                let child = format!("select max(acc_ver) from {p}_children where acc = {k}");
                assert_eq!(own, v as i64, "own write not seen");
                assert_eq!(int(&c, &child).await, v as i64, "own cascade not seen");
                c.batch_execute(if commit { "commit" } else { "rollback" })
                    .await
                    .unwrap();
                if commit {
                    acked(&f.ver[k], v as i64, &f);
                }
                continue;
            }
            3 => {
                // RETURNING sees the counter before the AFTER trigger adds one to the latest.
                let sql = format!(
                    "insert into {p}_events (acc) values ({k}) \
                     returning (select n from {p}_counters where id = {k})"
                );
                acked(&f.counter[k], int(&c, &sql).await + 1, &f);
                continue;
            }
            // Reads: simple, the view (extended), the cascade target, the trigger target.
            4..=6 => (
                &f.ver,
                format!("select ver from {p}_accounts where id = {k}"),
            ),
            7..=9 => {
                let floor = f.ver[k].load(Ordering::SeqCst);
                let got: i32 = c.query_one(&by_view, &[&(k as i32)]).await.unwrap().get(0);
                check(&f, floor, got as i64, "view");
                continue;
            }
            10..=12 => (
                &f.ver,
                format!("select max(acc_ver) from {p}_children where acc = {k}"),
            ),
            _ => (
                &f.counter,
                format!("select n from {p}_counters where id = {k}"),
            ),
        };
        let floor = floor_of[k].load(Ordering::SeqCst);
        let got = int(&c, &sql).await;
        check(&f, floor, got, &sql);
    }
}

/// Reads of the table only the direct writer writes (never written through a proxy).
async fn direct_reader(url: String, p: String, seed: u64, f: Arc<Floors>) {
    let c = connect(&url).await;
    let mut rng = Rng(seed);
    let end = Instant::now() + RUN_FOR;
    while Instant::now() < end {
        let k = rng.below(ACCOUNTS);
        let floor = f.direct_floor(k);
        let got = int(&c, &format!("select ver from {p}_direct where id = {k}")).await;
        check(&f, floor, got, "direct table");
    }
}

fn check(f: &Floors, floor: i64, got: i64, what: &str) {
    f.reads.fetch_add(1, Ordering::Relaxed);
    if got < floor {
        f.stale.fetch_add(1, Ordering::Relaxed);
        eprintln!(
            "STALE at {:?}: {what}: read {got}, but {floor} was committed before the read",
            std::time::SystemTime::now()
        );
    }
}

async fn run(mode: &str) {
    let p = format!("cons_{mode}");
    schema(&p);
    // Transaction mode: fewer server connections than clients; session mode needs one each.
    let size = if mode == "session" { CLIENTS + 1 } else { 3 };
    let proxy = cache_proxy(mode, &format!("[pool]\nmax_size = {size}\n"));
    check_run(mode, &p, &[proxy], false).await;
}

/// Clients spread over `proxies` (and, with `direct`, one writer straight to PostgreSQL); fails
/// on any stale read.
async fn check_run(mode: &str, p: &str, proxies: &[support::Proxy], direct: bool) {
    let floors = Arc::new(Floors::new());
    let mut tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(client(
                app_url(&proxies[i % proxies.len()]),
                p.to_string(),
                0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1),
                floors.clone(),
            ))
        })
        .collect();
    if direct {
        tasks.push(tokio::spawn(direct_writer(
            p.to_string(),
            77,
            floors.clone(),
        )));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    if direct {
        // Reads of the directly written table alone (proxied writes bump whole databases
        // often enough above to hide a change stream that misses something).
        let mut readers: Vec<_> = (0..4)
            .map(|i| {
                tokio::spawn(direct_reader(
                    app_url(&proxies[i % proxies.len()]),
                    p.to_string(),
                    i as u64 + 11,
                    floors.clone(),
                ))
            })
            .collect();
        readers.push(tokio::spawn(direct_writer(
            p.to_string(),
            78,
            floors.clone(),
        )));
        for t in readers {
            t.await.expect("reader task");
        }
    }
    let mut figures = cache_figures(&proxies[0]).await;
    for proxy in &proxies[1..] {
        for (k, v) in cache_figures(proxy).await {
            if let (Some(a), Ok(b)) = (
                figures.get(&k).and_then(|a| a.parse::<u64>().ok()),
                v.parse::<u64>(),
            ) {
                figures.insert(k, (a + b).to_string());
            }
        }
    }
    let (reads, stale) = (
        floors.reads.load(Ordering::SeqCst),
        floors.stale.load(Ordering::SeqCst),
    );
    eprintln!(
        "{mode}: {reads} reads checked, {} writes, {stale} stale; cache hits {} misses {}",
        floors.writes.load(Ordering::SeqCst),
        figures["hits"],
        figures["misses"]
    );
    assert!(reads > 100, "{mode}: too few reads to mean anything");
    assert!(
        figures["hits"].parse::<u64>().unwrap() > 0,
        "{mode}: the cache was never used"
    );
    assert_eq!(stale, 0, "{mode}: stale reads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_reads_under_concurrent_writes_transaction_mode() {
    run("transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_reads_under_concurrent_writes_session_mode() {
    run("session").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_reads_across_two_proxies_and_direct_writes() {
    let p = "cons_shared";
    schema(p);
    direct(
        "do $$ begin if not exists (select from pg_roles where rolname = 'streamer') then \
           create role streamer login replication password 'streamer'; end if; end $$; \
         do $$ begin if not exists (select from pg_publication where pubname = 'cons_pub') then \
           create publication cons_pub for all tables; end if; end $$;",
    );
    let redis = support::redis::RedisServer::start();
    let slot = format!("cons_{}", std::process::id());
    let shared = format!(
        "[pool]\nmax_size = 3\n[cache.redis]\nurl = \"{}\"\nconsistency = \"strict\"\n",
        redis.url()
    );
    // A follows the change stream; its bumps reach B through Redis.
    let a = cache_proxy(
        "transaction",
        &format!(
            "{shared}[invalidation.replication]\nenabled = true\ndatabase = \"app\"\n\
             user = \"streamer\"\nslot = \"{slot}\"\npublication = \"cons_pub\"\n\
             [users.streamer]\npassword = \"streamer\"\n"
        ),
    );
    let b = cache_proxy("transaction", &shared);
    let addr = proxy_metrics(&a);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, text) = support::http::http_get(&addr, "/metrics");
        if text.lines().any(|l| l == "pgcache_replication_up 1") {
            break;
        }
        assert!(Instant::now() < deadline, "change stream not up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let proxies = [a, b];
    check_run("two proxies + direct writes", p, &proxies, true).await;
    drop(proxies);
    for _ in 0..100 {
        let left = direct(&format!(
            "select count(*) from (select pg_drop_replication_slot(slot_name) from pg_replication_slots \
             where slot_name = '{slot}' and not active) d; select count(*) from pg_replication_slots where slot_name = '{slot}'"
        ));
        if left.trim().ends_with('0') {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
