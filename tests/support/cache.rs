//! Helpers for result-cache tests: a proxy with caching on (in either pool mode), throwaway
//! tables, writes that bypass the proxy, and the cache's figures from the admin console.

use super::{free_port, pg, proxy_config, Proxy};
use std::collections::HashMap;
use tokio_postgres::SimpleQueryMessage;

pub const MODES: [&str; 2] = ["transaction", "session"];

/// A proxy caching every table (`--cache-all` equivalent) in `mode`, with its HTTP endpoint on;
/// `extra` is TOML merged over that (a `[[cache.rules]]` there replaces the catch-all rule).
pub fn cache_proxy(mode: &str, extra: &str) -> Proxy {
    let defaults = format!(
        "[pool]\nmode = \"{mode}\"\nmax_size = 4\n[cache]\nenabled = true\n\
         [[cache.rules]]\ntables = [\"*\"]\n[metrics]\nlisten = \"127.0.0.1:{}\"\n",
        free_port()
    );
    let mut table: toml::Table = defaults.parse().expect("cache proxy defaults");
    super::merge(&mut table, extra.parse().expect("extra TOML"));
    let toml = toml::to_string(&table).expect("render");
    Proxy::start_env(
        &proxy_config(pg(), free_port(), &toml),
        &[(
            "RUST_LOG",
            std::env::var("PGCACHE_TEST_LOG")
                .as_deref()
                .unwrap_or("info,pgcache=debug"),
        )],
    )
}

pub fn app_url(proxy: &Proxy) -> String {
    proxy.url("app", "app", "app")
}

/// A fresh table owned by `app` (dropped first if an earlier run left it); returns its name.
pub fn table(name: &str, columns: &str) -> String {
    pg().psql(
        "app",
        &format!("drop table if exists {name} cascade; create table {name} ({columns}); alter table {name} owner to app"),
    );
    name.to_string()
}

/// Run SQL on PostgreSQL directly, as superuser: the proxy does not see it.
pub fn direct(sql: &str) -> String {
    pg().psql("app", sql)
}

pub fn first_value(rows: &[SimpleQueryMessage]) -> Option<String> {
    rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

/// The first column of the first row of a simple query.
pub async fn value(c: &tokio_postgres::Client, sql: &str) -> String {
    let rows = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    first_value(&rows).unwrap_or_else(|| panic!("{sql}: no row"))
}

/// Every row's first column, in order.
pub async fn column(c: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .collect()
}

/// The admin console, as the default admin user.
pub async fn admin(proxy: &Proxy) -> tokio_postgres::Client {
    super::connect(&proxy.url("pgcache", "", "pgcache")).await
}

/// `SHOW CACHE` as a map.
pub async fn cache_figures(proxy: &Proxy) -> HashMap<String, String> {
    let a = admin(proxy).await;
    a.simple_query("SHOW CACHE")
        .await
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some((r.get(0)?.to_string(), r.get(1)?.to_string())),
            _ => None,
        })
        .collect()
}

/// The address of the proxy's HTTP endpoint (`cache_proxy` always sets one).
pub fn proxy_metrics(proxy: &Proxy) -> String {
    let text = std::fs::read_to_string(proxy.config_path()).expect("read proxy config");
    let table: toml::Table = text.parse().expect("proxy config");
    let addr = table["metrics"]["listen"]
        .as_str()
        .expect("metrics.listen")
        .to_string();
    super::http::wait_http(&addr);
    addr
}
