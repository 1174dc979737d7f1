//! `idle_clients`: opens N client connections through a proxy, has each log in and run one
//! `select 1`, then keeps them all open and idle, and reports what that costs the proxy.
//!
//! Run by `benches/compare.sh` (stage "idle clients") against a freshly started pgcache or PgBouncer;
//! it is a `harness = false` bench so that `cargo bench --no-run` builds it in release mode with
//! the dev-dependencies. It measures:
//! - the proxy's resident memory (`VmRSS` from `/proc/<pid>/status`) after one warm-up client
//!   (*before*) and with all N clients connected and idle (*after*); per client = (after - before) / N;
//! - the number of server connections the proxy holds (`pg_stat_activity`, polled every 100 ms on
//!   a direct superuser connection), whose maximum must stay at or under the pool size;
//! - that every idle client still answers (a second `select 1` each), and what is left after all
//!   clients close (RSS, server connections).
//!
//! The last line of output is `RESULT key=value ...`, which compare.sh parses. The exit status is
//! non-zero when a client cannot connect or query, or the server connection count exceeds the pool.

use futures::{stream, StreamExt};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

const USAGE: &str = "usage: idle_clients --url URL --admin-url URL --pid PID [--clients N] \
[--concurrency C] [--pool-size P] [--database DB] [--user U]
  --url        connection string through the proxy, e.g. postgres://app:app@127.0.0.1:6432/bench
  --admin-url  direct superuser connection to PostgreSQL (for pg_stat_activity)
  --pid        process id of the proxy (its /proc/<pid>/status is read)
(normally run by benches/compare.sh)";

struct Args {
    url: String,
    admin_url: String,
    pid: u32,
    clients: usize,
    concurrency: usize,
    pool_size: i64,
    database: String,
    user: String,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut url = None;
    let mut admin_url = None;
    let mut pid = None;
    let mut clients = 5000usize;
    let mut concurrency = 64usize;
    let mut pool_size = 20i64;
    let mut database = "bench".to_string();
    let mut user = "app".to_string();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` appends `--bench`; it means nothing here.
        if flag == "--bench" {
            continue;
        }
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v:?}: {e}"));
        match flag.as_str() {
            "--url" => url = Some(value),
            "--admin-url" => admin_url = Some(value),
            "--pid" => pid = Some(number(&value)? as u32),
            "--clients" => clients = number(&value)?,
            "--concurrency" => concurrency = number(&value)?.max(1),
            "--pool-size" => pool_size = number(&value)? as i64,
            "--database" => database = value,
            "--user" => user = value,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    match (url, admin_url, pid) {
        (Some(url), Some(admin_url), Some(pid)) => Ok(Some(Args {
            url,
            admin_url,
            pid,
            clients,
            concurrency,
            pool_size,
            database,
            user,
        })),
        // Run bare (e.g. by a plain `cargo bench`): nothing to measure.
        (None, None, None) => Ok(None),
        _ => Err("--url, --admin-url and --pid go together".into()),
    }
}

/// One field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kb(pid: u32, field: &str) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no {field} in {path}"))
}

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Log in and run `select 1`; the client is returned to be kept open.
async fn open_one(url: &str) -> Result<Client, tokio_postgres::Error> {
    let client = connect(url).await?;
    client.simple_query("select 1").await?;
    Ok(client)
}

/// Server connections of (database, user): the proxy's pool, as PostgreSQL sees it.
async fn server_connections(admin: &Client, database: &str, user: &str) -> Result<i64, String> {
    let row = admin
        .query_one(
            "select count(*) from pg_stat_activity \
             where datname = $1 and usename = $2 and backend_type = 'client backend'",
            &[&database, &user],
        )
        .await
        .map_err(|e| format!("pg_stat_activity: {e}"))?;
    Ok(row.get(0))
}

async fn run(a: Args) -> Result<bool, String> {
    let mut ok = true;
    // Warm-up: the first client creates the pool and whatever the proxy allocates once.
    let warm = open_one(&a.url)
        .await
        .map_err(|e| format!("warm-up client through {}: {e}", a.url))?;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = status_kb(a.pid, "VmRSS")?;

    let admin = connect(&a.admin_url)
        .await
        .map_err(|e| format!("admin connection {}: {e}", a.admin_url))?;
    let admin = Arc::new(admin);
    let max_servers = Arc::new(AtomicI64::new(0));
    let poller = {
        let (admin, max_servers) = (admin.clone(), max_servers.clone());
        let (db, user) = (a.database.clone(), a.user.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(n) = server_connections(&admin, &db, &user).await {
                    max_servers.fetch_max(n, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let started = Instant::now();
    let results: Vec<_> = stream::iter(0..a.clients)
        .map(|_| open_one(&a.url))
        .buffer_unordered(a.concurrency)
        .collect()
        .await;
    let connect_secs = started.elapsed().as_secs_f64();
    let mut clients = Vec::with_capacity(a.clients);
    let mut failures = 0usize;
    let mut first_error = None;
    for r in results {
        match r {
            Ok(c) => clients.push(c),
            Err(e) => {
                failures += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    if let Some(e) = &first_error {
        eprintln!(
            "idle_clients: {failures} of {} clients failed: {e}",
            a.clients
        );
        ok = false;
    }

    // Let the proxy settle (buffers released after login), then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = status_kb(a.pid, "VmRSS")?;
    let hwm = status_kb(a.pid, "VmHWM")?;
    let servers_idle = server_connections(&admin, &a.database, &a.user).await?;
    let held = clients.len();
    let per_client = if held > 0 {
        (rss_after.saturating_sub(rss_before) * 1024) as f64 / held as f64
    } else {
        0.0
    };

    // Every idle client must still work.
    let alive = stream::iter(clients.iter())
        .map(|c| async move { c.simple_query("select 1").await.is_ok() })
        .buffer_unordered(a.concurrency)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await;
    if alive != held {
        eprintln!("idle_clients: only {alive} of {held} idle clients answered a second select 1");
        ok = false;
    }
    poller.abort();
    let max_servers = max_servers
        .load(Ordering::Relaxed)
        .max(server_connections(&admin, &a.database, &a.user).await?);
    if max_servers > a.pool_size {
        eprintln!(
            "idle_clients: {max_servers} server connections seen, more than the pool size {}",
            a.pool_size
        );
        ok = false;
    }

    drop(clients);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_closed = status_kb(a.pid, "VmRSS")?;
    let servers_closed = server_connections(&admin, &a.database, &a.user).await?;

    println!(
        "RESULT clients={} connected={held} failed={failures} alive={alive} \
         connect_secs={connect_secs:.2} rss_before_kb={rss_before} rss_after_kb={rss_after} \
         hwm_kb={hwm} per_client_bytes={per_client:.0} max_server_conns={max_servers} \
         server_conns_idle={servers_idle} rss_closed_kb={rss_closed} \
         server_conns_closed={servers_closed} ok={ok}",
        a.clients
    );
    Ok(ok)
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return std::process::ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("idle_clients: {e}\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("idle_clients: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("idle_clients: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
