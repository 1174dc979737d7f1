//! Deployed configs running for tests/deploy.rs: a PostgreSQL with TLS, the proxy on a deployed
//! proxy.toml and environment (moved to loopback ports and the test server), and a workload
//! that touches every part the dashboard shows.

use std::sync::{Arc, Mutex, OnceLock, Weak};

use super::files::{toml_table, Deployed};
use crate::support::http::{http_get, wait_http};
use crate::support::redis::RedisServer;
use crate::support::{connect, free_port, try_connect, PgOptions, PgServer, Proxy, ROLES};

/// One PostgreSQL (with TLS, so a `prefer` upstream really negotiates it) for this binary; `app`
/// may stream changes there and a publication for every table exists (a deployed config may
/// follow the change stream).
pub fn server() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let s = PgServer::start_new(PgOptions { ssl: true });
        s.psql(
            "app",
            "alter role app replication; create publication pgcache for all tables",
        );
        s
    })
}

/// The redis-server the running deployed configs share: started by the first that needs one,
/// killed when the last of them is done (in a static it would never be dropped, and would outlive
/// the test binary).
fn redis() -> Arc<RedisServer> {
    static SHARED: Mutex<Weak<RedisServer>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = shared.upgrade() {
        return r;
    }
    let r = Arc::new(RedisServer::start());
    *shared = Arc::downgrade(&r);
    r
}

/// A deployed proxy and the redis-server it may use, kept for as long as the proxy runs.
pub struct Running {
    pub proxy: Proxy,
    _redis: Arc<RedisServer>,
}

/// A proxy running `d` as deployed, except that it listens on free loopback ports and its
/// upstream is the test server (given as `PGCACHE_UPSTREAM_*` overrides, as an operator would).
/// Returns the proxy and its metrics address.
fn start_deployed(d: &Deployed) -> (Running, String) {
    let mut config = toml_table(&d.toml, &d.origin);
    let listen = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    config["proxy"]["listen"] = toml::Value::Array(vec![listen.into()]);
    config["metrics"]["listen"] = metrics.clone().into();
    let server = server();
    let upstream_password = ROLES.iter().find(|(r, _)| *r == "app").expect("app").1;
    let port = server.port.to_string();
    let mut env: Vec<(&str, &str)> = d
        .env
        .iter()
        .filter(|(k, _)| k != "PGCACHE_UPSTREAM_PASSWORD")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert!(
        d.env.iter().any(|(k, _)| k == "PGCACHE_UPSTREAM_PASSWORD"),
        "{}: the upstream password should come from PGCACHE_UPSTREAM_PASSWORD",
        d.origin
    );
    // The deployed value is a placeholder; the test server's password stands in for it.
    env.extend([
        ("PGCACHE_UPSTREAM_PASSWORD", upstream_password),
        ("PGCACHE_UPSTREAM_HOST", "127.0.0.1"),
        ("PGCACHE_UPSTREAM_PORT", port.as_str()),
    ]);
    // Redis and the slot as an operator would move them: environment overrides.
    let redis = redis();
    let redis_url = redis.url();
    let slot = format!("deploy_{}", free_port());
    if config.get("cache").and_then(|c| c.get("redis")).is_some() {
        env.push(("PGCACHE_CACHE_REDIS_URL", redis_url.as_str()));
    }
    let streams = config
        .get("invalidation")
        .and_then(|i| i.get("replication"))
        .and_then(|r| r.get("enabled"))
        .and_then(|e| e.as_bool())
        == Some(true);
    if streams {
        env.push(("PGCACHE_INVALIDATION_REPLICATION_SLOT", slot.as_str()));
    }
    let toml = toml::to_string(&config).expect("render proxy.toml");
    let proxy = Proxy::start_env(&toml, &env);
    wait_http(&metrics);
    // Redis and the change stream come up in the background: /health says when.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (status, body) = http_get(&metrics, "/health");
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}: /health stayed {status}: {body}",
            d.origin
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let running = Running {
        proxy,
        _redis: redis,
    };
    (running, metrics)
}

/// `start_deployed` (off the async threads), then `workload`: the proxy, its metrics address
/// and the workload's client, still connected.
pub async fn serving(d: &Deployed) -> (Running, String, tokio_postgres::Client) {
    let (running, metrics) = tokio::task::spawn_blocking({
        let d = d.clone();
        move || start_deployed(&d)
    })
    .await
    .expect("start proxy");
    let client = workload(&running.proxy, d).await;
    (running, metrics, client)
}

pub async fn get(addr: &str, path: &'static str) -> (u16, String) {
    let addr = addr.to_string();
    tokio::task::spawn_blocking(move || http_get(&addr, path))
        .await
        .expect("HTTP GET task")
}

/// Statements through the proxy that touch every part the dashboard shows: a table written and
/// read twice in both protocols (a cache fill and hit where the cache is on), an error, a wrong
/// password. Returns the client, still connected (so client gauges have a sample).
async fn workload(proxy: &Proxy, d: &Deployed) -> tokio_postgres::Client {
    let wrong = try_connect(&proxy.url("app", "not-the-password", "app")).await;
    assert!(wrong.is_err(), "{}: a wrong password got in", d.origin);
    let client = connect(&proxy.url("app", d.client_password, "app")).await;
    let table = format!("deploy_items_{}", proxy.port());
    client
        .batch_execute(&format!(
            "create table {table} (id int primary key, name text);\n\
             insert into {table} values (1, 'one'), (2, 'two');"
        ))
        .await
        .unwrap_or_else(|e| panic!("{}: create {table}: {e}", d.origin));
    let select = format!("select name from {table} where id = 1");
    for _ in 0..2 {
        let rows = client.simple_query(&select).await.expect("simple select");
        assert!(rows.len() >= 2, "{}: {rows:?}", d.origin);
        let rows = client
            .query(&format!("select name from {table} where id = $1"), &[&2i32])
            .await
            .expect("extended select");
        assert_eq!(rows[0].get::<_, String>(0), "two", "{}", d.origin);
    }
    let err = client
        .simple_query(&format!("select id / 0 from {table}"))
        .await
        .expect_err("division by zero");
    assert_eq!(err.code().map(|c| c.code()), Some("22012"), "{}", d.origin);
    client
}
