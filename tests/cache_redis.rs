//! The shared tier: two proxy processes and one real redis-server. Results filled through one
//! proxy are served by the other; a write through one is never followed by a stale read through
//! the other in strict mode, and reaches it within the measured delay in eventual mode; Redis
//! killed and started again under load costs no client an error and no stale read.

mod support;

use std::time::{Duration, Instant};
use support::cache::{app_url, cache_proxy, proxy_metrics, table, value};
use support::connect;
use support::http::http_get;
use support::redis::{RedisCluster, RedisServer, SlowPath};

fn redis_toml(redis: &RedisServer, consistency: &str, prefix: &str) -> String {
    let ca = redis
        .ca_path()
        .map(|p| format!("ca_file = \"{}\"\n", p.display()))
        .unwrap_or_default();
    format!(
        "[cache]\ndefault_ttl = \"1h\"\n[cache.redis]\nurl = \"{}\"\nconsistency = \"{consistency}\"\n\
         key_prefix = \"{prefix}\"\ntimeout = \"200ms\"\n{ca}",
        redis.url()
    )
}

fn cluster_toml(cluster: &RedisCluster, prefix: &str) -> String {
    let nodes: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "[cache]\ndefault_ttl = \"1h\"\n[cache.redis]\ncluster = [{}]\nconsistency = \"strict\"\n\
         key_prefix = \"{prefix}\"\ntimeout = \"500ms\"\n",
        nodes.join(", ")
    )
}

/// Two proxies over one Redis in front of a fresh table holding the row (1, 0), a client of
/// each, and their metrics addresses.
struct Pair {
    a: support::Proxy,
    _b: support::Proxy,
    ma: String,
    mb: String,
    ca: tokio_postgres::Client,
    cb: tokio_postgres::Client,
    t: String,
    /// Reads the row.
    read: String,
}

async fn pair(table_name: &str, extra: &str) -> Pair {
    pair_of(table_name, extra, extra).await
}

/// `pair`, with A and B configured apart.
async fn pair_of(table_name: &str, extra_a: &str, extra_b: &str) -> Pair {
    let t = table(table_name, "id int primary key, v int");
    support::cache::direct(&format!("insert into {t} values (1, 0)"));
    let a = cache_proxy("transaction", extra_a);
    let b = cache_proxy("transaction", extra_b);
    let (ma, mb) = (proxy_metrics(&a), proxy_metrics(&b));
    let ca = connect(&app_url(&a)).await;
    let cb = connect(&app_url(&b)).await;
    let read = format!("select v from {t} where id = 1");
    Pair {
        a,
        _b: b,
        ma,
        mb,
        ca,
        cb,
        t,
        read,
    }
}

impl Pair {
    async fn redis_up(&self) {
        wait_metric(&self.ma, "pgcache_redis_up", 1.0).await;
        wait_metric(&self.mb, "pgcache_redis_up", 1.0).await;
    }

    /// Set the row to `v` through A.
    async fn write(&self, v: i32) {
        self.ca
            .simple_query(&format!("update {} set v = {v} where id = 1", self.t))
            .await
            .unwrap_or_else(|e| panic!("write {v} through A: {e:?}"));
    }

    /// The row read through B.
    async fn read_b(&self) -> String {
        value(&self.cb, &self.read).await
    }

    /// A read filled through B (stored in Redis in the background) is served to A from Redis.
    async fn shared_through_redis(&self) {
        assert_eq!(self.read_b().await, "0");
        wait_metric(&self.mb, "pgcache_cache_l2_fills_total", 1.0).await;
        assert_eq!(value(&self.ca, &self.read).await, "0");
        assert_eq!(metric(&self.ma, "pgcache_cache_l2_hits_total").await, 1.0);
    }

    /// `n` writes through A, each followed by two reads through B (the second may be a hit) and
    /// one through A; returns the stale reads through B.
    async fn stale_after_writes(&self, n: i32) -> usize {
        let mut stale = 0;
        for i in 1..=n {
            self.write(i).await;
            for _ in 0..2 {
                if self.read_b().await != i.to_string() {
                    stale += 1;
                }
            }
            assert_eq!(value(&self.ca, &self.read).await, i.to_string());
        }
        stale
    }
}

/// Strict sharing over `extra`: a result filled through B is served to A from Redis, and 50
/// writes through A are each read fresh through B at once. Returns B's hits.
async fn shared_and_fresh(table_name: &str, extra: &str) -> f64 {
    let p = pair(table_name, extra).await;
    p.redis_up().await;
    p.shared_through_redis().await;
    assert_eq!(p.stale_after_writes(50).await, 0, "stale through B");
    metric(&p.mb, "pgcache_cache_hits_total").await
}

async fn scrape(addr: &str, path: &'static str) -> (u16, String) {
    let addr = addr.to_string();
    tokio::task::spawn_blocking(move || http_get(&addr, path))
        .await
        .expect("scrape")
}

async fn metric(addr: &str, name: &str) -> f64 {
    let (_, text) = scrape(addr, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

async fn wait_metric(addr: &str, name: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(addr, name).await != want {
        assert!(Instant::now() < deadline, "{name} never became {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_never_serves_a_peer_proxys_write_stale() {
    let redis = RedisServer::start();
    let p = pair("shared_items", &redis_toml(&redis, "strict", "strict:")).await;
    p.redis_up().await;
    p.shared_through_redis().await;
    let stale = p.stale_after_writes(100).await;
    assert_eq!(stale, 0, "stale reads through the other proxy");
    let hits = metric(&p.mb, "pgcache_cache_hits_total").await;
    assert!(
        hits >= 50.0,
        "B served its second reads from the cache: {hits}"
    );
    eprintln!("strict: 100 writes through A, 200 reads through B, 0 stale, {hits} hits on B");
}

/// Strict `[cache.redis]` at `url` with a 100-ms call timeout and `keys` besides.
fn strict_at(url: &str, prefix: &str, keys: &str) -> String {
    format!(
        "[cache]\ndefault_ttl = \"1h\"\n[cache.redis]\nurl = \"{url}\"\nconsistency = \"strict\"\n\
         key_prefix = \"{prefix}\"\ntimeout = \"100ms\"\n{keys}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bump_slower_than_a_lookup_still_comes_before_the_writers_answer() {
    // A reaches Redis through a path that holds its requests back for 400 ms: longer than a
    // call's timeout, shorter than a bump's (5 s here, so a loaded machine cannot make it
    // miss). B reaches Redis directly.
    let redis = RedisServer::start();
    let path = SlowPath::start(redis.port).await;
    let p = pair_of(
        "slow_bump_items",
        &strict_at(&path.url(), "slowbump:", "bump_timeout = \"5s\"\n"),
        &strict_at(&redis.url(), "slowbump:", ""),
    )
    .await;
    p.redis_up().await;
    p.shared_through_redis().await;
    path.set_delay(Duration::from_millis(400));
    for i in 1..=5 {
        assert_eq!(p.read_b().await, (i - 1).to_string());
        p.write(i).await;
        assert_eq!(p.read_b().await, i.to_string(), "B read write {i} stale");
    }
    let gave_up = metric(&p.ma, "pgcache_redis_fallbacks_total{reason=\"error\"}").await;
    assert_eq!(gave_up, 0.0, "A gave up on a bump");
    assert_eq!(metric(&p.ma, "pgcache_redis_bumps_missed_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bump_given_up_on_reaches_the_other_proxies_once_redis_answers() {
    // A's requests to Redis are held back 1.5 s; it gives up on a bump after 200 ms and leaves
    // Redis alone after one failure. Its write to `u` times out (the circuit opens), so its
    // write to the table B has cached is not even tried: only the missed-bump retry can tell
    // Redis (the bump subscription stays up throughout).
    let redis = RedisServer::start();
    let path = SlowPath::start(redis.port).await;
    let keys = "bump_timeout = \"200ms\"\nfailures_to_open = 1\n";
    let p = pair_of(
        "missed_bump_items",
        &strict_at(&path.url(), "missed:", keys),
        &strict_at(&redis.url(), "missed:", keys),
    )
    .await;
    let u = table("missed_bump_other", "id int");
    p.redis_up().await;
    p.shared_through_redis().await;
    assert_eq!(p.read_b().await, "0");
    path.set_delay(Duration::from_millis(1500));
    p.ca.simple_query(&format!("insert into {u} values (1)"))
        .await
        .expect("write u through A");
    p.write(1).await;
    path.set_delay(Duration::ZERO);
    let started = Instant::now();
    while p.read_b().await != "1" {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "B still serves the write A could not tell Redis of"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let missed = metric(&p.ma, "pgcache_redis_bumps_missed_total").await;
    assert_eq!(
        missed, 2.0,
        "the write to u timed out, the next was not tried"
    );
    // B may be fresh before A's retry has an answer (a held-back attempt can land after A gave
    // up on it); the retry goes on until one has.
    let retried = Instant::now();
    while !p
        .a
        .log()
        .contains("bumped the database's epoch for the writes it missed")
    {
        assert!(
            retried.elapsed() < Duration::from_secs(15),
            "A never told Redis: {}",
            p.a.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "missed bump: B fresh {:?} after A's path was fast again",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventual_mode_sees_a_peer_write_within_the_measured_delay() {
    let redis = RedisServer::start();
    let p = pair("eventual_items", &redis_toml(&redis, "eventual", "ev:")).await;
    p.redis_up().await;
    let mut worst = Duration::ZERO;
    for i in 1..=20 {
        assert_eq!(p.read_b().await, (i - 1).to_string());
        assert_eq!(p.read_b().await, (i - 1).to_string()); // cached in B
        p.write(i).await;
        let started = Instant::now();
        while p.read_b().await != i.to_string() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "B never saw write {i}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        worst = worst.max(started.elapsed());
    }
    let n = metric(&p.mb, "pgcache_redis_propagation_seconds_count").await;
    let sum = metric(&p.mb, "pgcache_redis_propagation_seconds_sum").await;
    assert!(n >= 20.0, "{n} bumps applied");
    eprintln!(
        "eventual: a write through A reached B's reads within {worst:?} (worst of 20); mean broadcast delay {:.3} ms",
        sum / n * 1000.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load_costs_no_errors_and_no_stale_reads() {
    let mut redis = RedisServer::start();
    let p = pair("outage_items", &redis_toml(&redis, "strict", "outage:")).await;
    p.redis_up().await;
    let (mb, ca, cb, read, t) = (&p.mb, &p.ca, &p.cb, &p.read, &p.t);
    let mut stale = 0;
    let mut i = 0;
    let mut round = |phase: &'static str| {
        i += 1;
        let v = i;
        async move {
            ca.simple_query(&format!("update {t} set v = {v} where id = 1"))
                .await
                .unwrap_or_else(|e| panic!("write {v} ({phase}): {e:?}"));
            let mut stale = 0;
            for _ in 0..2 {
                let got = cb
                    .simple_query(read)
                    .await
                    .unwrap_or_else(|e| panic!("read ({phase}): {e:?}"));
                if support::cache::first_value(&got) != Some(v.to_string()) {
                    eprintln!(
                        "stale ({phase}): {:?} for {v}",
                        support::cache::first_value(&got)
                    );
                    stale += 1;
                }
            }
            stale
        }
    };
    for _ in 0..20 {
        stale += round("redis up").await;
    }
    redis.kill();
    for _ in 0..30 {
        stale += round("redis down").await;
    }
    let (status, body) = scrape(mb, "/health").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("redis"), "{body}");
    assert_eq!(metric(mb, "pgcache_redis_up").await, 0.0);
    redis.restart();
    p.redis_up().await;
    for _ in 0..20 {
        stale += round("redis back").await;
    }
    assert_eq!(stale, 0);
    let fallbacks = metric(mb, "pgcache_redis_fallbacks_total{reason=\"error\"}").await
        + metric(mb, "pgcache_redis_fallbacks_total{reason=\"open\"}").await;
    assert!(fallbacks > 0.0, "{fallbacks}");
    let (status, body) = scrape(mb, "/health").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_absent_redis_never_reaches_clients() {
    // Absent at start: the proxy serves, says degraded, and picks Redis up when it appears.
    let mut redis = RedisServer::start();
    redis.kill();
    let p = pair("slow_items", &redis_toml(&redis, "strict", "slow:")).await;
    assert_eq!(value(&p.ca, &p.read).await, "0");
    assert_eq!(p.read_b().await, "0");
    let (status, body) = scrape(&p.ma, "/health").await;
    assert_eq!(status, 503, "{body}");
    redis.restart();
    p.redis_up().await;
    // Slow: Redis blocked for 1.5 s while clients write and read through both proxies.
    redis.stall(1.5);
    let started = Instant::now();
    let mut stale = 0;
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(3) {
        i += 1;
        p.write(i).await;
        if p.read_b().await != i.to_string() {
            stale += 1;
        }
    }
    assert_eq!(stale, 0, "{i} rounds");
    let timeouts = metric(&p.mb, "pgcache_redis_fallbacks_total{reason=\"error\"}").await;
    assert!(timeouts > 0.0, "the stall was noticed: {timeouts}");
    eprintln!("slow redis: {i} write/read rounds in 3 s, 0 stale, {timeouts} calls timed out on B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_tier_works_over_tls() {
    let redis = RedisServer::start_tls();
    let hits = shared_and_fresh("tls_items", &redis_toml(&redis, "strict", "tls:")).await;
    assert!(hits >= 25.0, "{hits}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_tier_works_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let hits = shared_and_fresh("cluster_items", &cluster_toml(&cluster, "cl:")).await;
    assert!(hits >= 25.0, "{hits}");
}
