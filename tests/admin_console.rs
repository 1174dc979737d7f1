//! The admin console (`psql -d pgcache`) and live operation: SHOW commands return tables, RELOAD
//! and SIGHUP change pools without dropping clients, PAUSE holds transactions, SHUTDOWN drains.

mod support;

use std::time::Duration;
use support::raw::{field, message, tags, RawConn};
use support::{free_port, pg, proxy_config, Proxy};
use tokio_postgres::{Client, SimpleQueryMessage};

fn rows(msgs: &[SimpleQueryMessage]) -> Vec<Vec<String>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn columns(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some(r.columns().iter().map(|c| c.name().to_string()).collect())
            }
            _ => None,
        })
        .unwrap_or_default()
}

async fn admin(proxy: &Proxy) -> Client {
    support::connect(&proxy.url("pgcache", "", "pgcache")).await
}

fn proxy(extra: &str) -> (Proxy, std::path::PathBuf) {
    let proxy = Proxy::start(&proxy_config(pg(), free_port(), extra));
    let path = proxy.config_path();
    (proxy, path)
}

#[tokio::test]
async fn show_commands_return_tables() {
    let proxy = Proxy::start(&proxy_config(
        pg(),
        free_port(),
        "[pool]\nmode = \"transaction\"\nmax_size = 3\n",
    ));
    let app = support::connect(&proxy.url("app", "app", "app")).await;
    app.batch_execute("select 1").await.unwrap();
    let a = admin(&proxy).await;

    let pools = a.simple_query("SHOW POOLS").await.unwrap();
    assert_eq!(columns(&pools)[..3], ["database", "user", "pool_mode"]);
    let app_pool = rows(&pools)
        .into_iter()
        .find(|r| r[0] == "app" && r[1] == "app")
        .expect("a row for the app pool");
    assert_eq!(app_pool[2], "transaction");
    assert_eq!(app_pool[8], "3");

    let clients = rows(&a.simple_query("show clients;").await.unwrap());
    assert!(clients.iter().any(|r| r[1] == "app" && r[2] == "app"));
    let servers = rows(&a.simple_query("SHOW SERVERS").await.unwrap());
    assert!(!servers.is_empty());
    let stats = rows(&a.simple_query("SHOW STATS").await.unwrap());
    let s = stats.iter().find(|r| r[0] == "app").expect("stats row");
    assert!(s[3].parse::<u64>().unwrap() >= 1, "{s:?}");
    let config = rows(&a.simple_query("SHOW CONFIG").await.unwrap());
    let get = |k: &str| config.iter().find(|r| r[0] == k).map(|r| r[1].clone());
    assert_eq!(get("pool.max_size").as_deref(), Some("3"));
    assert_eq!(get("upstream.password").as_deref(), Some("********"));
    assert!(!rows(&a.simple_query("SHOW DATABASES").await.unwrap()).is_empty());

    let e = a.simple_query("SHOW NONSENSE").await.unwrap_err();
    assert_eq!(e.as_db_error().unwrap().code().code(), "42601");
    // Extended protocol is refused, and the console stays usable.
    assert!(a.query("SHOW POOLS", &[]).await.is_err());
    assert!(!rows(&a.simple_query("SHOW HELP").await.unwrap()).is_empty());
}

#[tokio::test]
async fn only_admin_users_reach_the_console() {
    let proxy = Proxy::start(&proxy_config(pg(), free_port(), ""));
    let Err(e) = support::try_connect(&proxy.url("app", "app", "pgcache")).await else {
        panic!("app is not an admin user");
    };
    assert_eq!(e.as_db_error().unwrap().code().code(), "28000");
}

#[tokio::test]
async fn reload_changes_pool_size_without_dropping_clients() {
    let (proxy, path) =
        proxy("[pool]\nmode = \"transaction\"\nmax_size = 1\nacquire_timeout = \"10s\"\n");
    let url = proxy.url("app", "app", "app");
    let holder = support::connect(&url).await;
    holder.batch_execute("begin").await.unwrap();
    // Connected before the reload, idle through it.
    let early = support::connect(&url).await;

    // The pool is full while `holder` is in its transaction: a second client waits.
    let waiter = support::connect(&url).await;
    let waiting =
        tokio::spawn(async move { waiter.simple_query("select 2").await.map(|m| rows(&m)) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());

    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("max_size = 1", "max_size = 4")).unwrap();
    let a = admin(&proxy).await;
    a.simple_query("RELOAD").await.unwrap();
    let pools = rows(&a.simple_query("SHOW CONFIG").await.unwrap());
    assert!(pools.iter().any(|r| r[0] == "pool.max_size" && r[1] == "4"));

    // New transactions use the new pool; the held client was not dropped.
    let third = support::connect(&url).await;
    let got = tokio::time::timeout(Duration::from_secs(5), third.simple_query("select 3"))
        .await
        .expect("new pool serves at once")
        .unwrap();
    assert_eq!(rows(&got), vec![vec!["3".to_string()]]);
    // So do clients that connected before it: their sessions move to the new pool.
    let got = tokio::time::timeout(Duration::from_secs(5), early.simple_query("select 4"))
        .await
        .expect("a client from before the reload is served by the new pool")
        .unwrap();
    assert_eq!(rows(&got), vec![vec!["4".to_string()]]);
    holder.batch_execute("commit").await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("waiter served")
        .unwrap()
        .unwrap();
    assert_eq!(r, vec![vec!["2".to_string()]]);
}

#[tokio::test]
async fn sighup_reloads_and_reports_what_needs_a_restart() {
    let (proxy, path) = proxy("[pool]\nmode = \"transaction\"\n");
    let text = std::fs::read_to_string(&path).unwrap();
    let moved = text.replace(
        &format!("127.0.0.1:{}", proxy.port()),
        &format!("127.0.0.1:{}", free_port()),
    );
    let moved = moved.replace("max_size = 20", "max_size = 6");
    std::fs::write(&path, format!("{moved}\n[cache.redis]\ntimeout = \"1s\"\n")).unwrap();
    proxy.signal("HUP");
    let a = admin(&proxy).await;
    let mut size = String::new();
    for _ in 0..50 {
        let config = rows(&a.simple_query("SHOW CONFIG").await.unwrap());
        size = config
            .iter()
            .find(|r| r[0] == "pool.max_size")
            .map(|r| r[1].clone())
            .unwrap_or_default();
        if size == "6" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(size, "6");
    assert!(
        proxy
            .log()
            .contains("proxy.listen changed; it takes effect after a restart"),
        "{}",
        proxy.log()
    );
    assert!(
        proxy
            .log()
            .contains("[cache.redis] changed; it takes effect after a restart"),
        "{}",
        proxy.log()
    );
    // Still listening where it was.
    let app = support::connect(&proxy.url("app", "app", "app")).await;
    app.batch_execute("select 1").await.unwrap();
}

#[tokio::test]
async fn reload_with_a_broken_file_keeps_the_old_configuration() {
    let (proxy, path) = proxy("");
    std::fs::write(&path, "[pool]\nmax_size = \"many\"\n").unwrap();
    let a = admin(&proxy).await;
    let e = a.simple_query("RELOAD").await.unwrap_err();
    let detail = e.as_db_error().unwrap().detail().unwrap_or("").to_string();
    assert!(detail.contains("line 2"), "{detail}");
    let app = support::connect(&proxy.url("app", "app", "app")).await;
    app.batch_execute("select 1").await.unwrap();
}

#[tokio::test]
async fn pause_holds_new_transactions_until_resume() {
    let proxy = Proxy::start(&proxy_config(
        pg(),
        free_port(),
        "[pool]\nmode = \"transaction\"\nacquire_timeout = \"20s\"\n",
    ));
    let app = support::connect(&proxy.url("app", "app", "app")).await;
    let a = admin(&proxy).await;
    a.simple_query("PAUSE").await.unwrap();
    let held = tokio::spawn(async move { app.simple_query("select 5").await.map(|m| rows(&m)) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!held.is_finished(), "paused proxy answered a query");
    a.simple_query("RESUME").await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("resumed")
        .unwrap()
        .unwrap();
    assert_eq!(r, vec![vec!["5".to_string()]]);
}

#[tokio::test]
async fn shutdown_command_drains_and_stops_the_proxy() {
    let mut proxy = Proxy::start(&proxy_config(pg(), free_port(), ""));
    let a = admin(&proxy).await;
    let _ = a.simple_query("SHUTDOWN").await;
    let status = proxy
        .wait_exit(Duration::from_secs(15))
        .expect("proxy exits after SHUTDOWN");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_command_that_is_not_utf8_is_refused_not_run_as_nothing() {
    let proxy = Proxy::start(&proxy_config(pg(), free_port(), ""));
    let (mut conn, _) = RawConn::login(
        proxy.port(),
        &[("user", "pgcache"), ("database", "pgcache")],
    )
    .await;
    // `SHOW POOLS` with a LATIN1 'é' in it: it was read as an empty command (no error).
    conn.send(&message(b'Q', b"SHOW POOLS \xe9\0")).await;
    let msgs = conn.until_ready().await;
    assert_eq!(tags(&msgs), "EZ");
    assert_eq!(field(&msgs[0].1, b'C').as_deref(), Some("22021"));
    // The console goes on.
    let msgs = conn.simple("SHOW HELP").await;
    assert!(tags(&msgs).contains('D'), "{}", tags(&msgs));
    // A query string with no end: refused as PostgreSQL refuses it (ERROR 08P01, not run, and
    // the session goes on).
    conn.send(&message(b'Q', b"SHOW HELP")).await;
    let msgs = conn.until_ready().await;
    assert_eq!(tags(&msgs), "EZ");
    assert_eq!(field(&msgs[0].1, b'C').as_deref(), Some("08P01"));
    assert_eq!(field(&msgs[0].1, b'S').as_deref(), Some("ERROR"));
    let msgs = conn.simple("SHOW HELP").await;
    assert!(tags(&msgs).contains('D'), "{}", tags(&msgs));
}
