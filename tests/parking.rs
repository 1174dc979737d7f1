//! Parking (`src/session/park.rs`): a client quiet between transactions gives up its task
//! (`pgcache_clients_parked`) and comes back at its next message with everything it had —
//! prepared statements, settings, a half-sent message. A parked client that leaves is gone; one
//! that is parked when the proxy shuts down, when its `client_idle_timeout` comes or when a
//! reload brings one in is told like any idle client. Every test waits for the gauge to show the
//! park before it goes on, so none passes without parking having happened.

mod support;

use std::time::{Duration, Instant};
use support::http::{http_get, wait_http};
use support::raw::{self, RawConn};
use support::{closed_with, connect_watched, free_port, pg, proxy_config, Proxy};

/// Hang guard for anything that waits on the proxy.
const HANG: Duration = Duration::from_secs(30);

/// A transaction-mode proxy with one server connection and a metrics endpoint.
fn start(pool: &str) -> (Proxy, String) {
    let metrics = format!("127.0.0.1:{}", free_port());
    let extra = format!(
        "[metrics]\nlisten = \"{metrics}\"\n[pool]\nmode = \"transaction\"\nmax_size = 1\n{pool}"
    );
    let proxy = Proxy::start(&proxy_config(pg(), free_port(), &extra));
    wait_http(&metrics);
    (proxy, metrics)
}

/// The value of a gauge on the metrics endpoint.
async fn gauge(metrics: &str, series: &str) -> f64 {
    let addr = metrics.to_string();
    let (status, text) = tokio::task::spawn_blocking(move || http_get(&addr, "/metrics"))
        .await
        .expect("metrics request");
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Polls the gauge until it reads `want`.
async fn wait_gauge(metrics: &str, series: &str, want: f64) {
    let deadline = Instant::now() + HANG;
    loop {
        let got = gauge(metrics, series).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed {got}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn parked(metrics: &str, want: f64) {
    wait_gauge(metrics, "pgcache_clients_parked", want).await;
}

async fn show(client: &tokio_postgres::Client, setting: &str) -> String {
    client
        .query_one(&format!("show {setting}"), &[])
        .await
        .unwrap_or_else(|e| panic!("show {setting}: {e:?}"))
        .get(0)
}

#[tokio::test]
async fn a_quiet_client_parks_and_comes_back_with_its_statements_and_settings() {
    let (proxy, metrics) = start("");
    let url = proxy.url("app", "app", "app");
    let a = support::connect(&url).await;
    let b = support::connect(&url).await;
    a.batch_execute("drop table if exists park_rows; create table park_rows (x int)")
        .await
        .unwrap();
    let plus_one = a.prepare("select $1::int + 1").await.unwrap();
    let count = a.prepare("select count(*) from park_rows").await.unwrap();
    a.batch_execute("set work_mem = '3MB'").await.unwrap();
    b.batch_execute("set work_mem = '5MB'").await.unwrap();
    assert_eq!(a.query_one(&count, &[]).await.unwrap().get::<_, i64>(0), 0);
    parked(&metrics, 2.0).await;
    // The console shows them parked.
    let admin = support::connect(&proxy.url("pgcache", "", "pgcache")).await;
    let rows = admin.simple_query("SHOW CLIENTS").await.unwrap();
    let parked_rows = rows
        .iter()
        .filter(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get("parked") == Some("true"),
            _ => false,
        })
        .count();
    assert_eq!(parked_rows, 2, "{rows:?}");
    drop(admin);
    for round in 0..3 {
        // Back from the park, on the one server connection the other client also used.
        let row = a.query_one(&plus_one, &[&(41 + round)]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 42 + round);
        assert_eq!(show(&a, "work_mem").await, "3MB");
        assert_eq!(show(&b, "work_mem").await, "5MB");
        // A write by the other client while this one was parked is seen (with
        // PGCACHE_TEST_WITH_CACHE=1 the count is a cached read).
        b.batch_execute("insert into park_rows values (1)")
            .await
            .unwrap();
        parked(&metrics, 2.0).await;
        let n: i64 = a.query_one(&count, &[]).await.unwrap().get(0);
        assert_eq!(n, i64::from(round) + 1);
        // Both still counted as connected, and both park again.
        wait_gauge(
            &metrics,
            "pgcache_client_connections{state=\"active\"}",
            2.0,
        )
        .await;
        parked(&metrics, 2.0).await;
    }
}

#[tokio::test]
async fn a_message_split_across_a_quiet_spell_is_answered() {
    let (proxy, metrics) = start("");
    let mut conn = RawConn::login_trust(proxy.port()).await;
    parked(&metrics, 1.0).await;
    let query = raw::query("select 'split'");
    conn.send(&query[..3]).await;
    // Half a message waits in the session (not parked while it holds it).
    tokio::time::sleep(Duration::from_millis(700)).await;
    conn.send(&query[3..]).await;
    let reply = conn.until_ready().await;
    assert_eq!(raw::tags(&reply), "TDCZ", "{reply:?}");
    parked(&metrics, 1.0).await;
}

#[tokio::test]
async fn a_parked_client_that_leaves_is_gone() {
    let (proxy, metrics) = start("");
    let active = "pgcache_client_connections{state=\"active\"}";
    // One says goodbye (Terminate), one just closes its socket.
    let polite = support::connect(&proxy.url("app", "app", "app")).await;
    let mut abrupt = RawConn::login_trust(proxy.port()).await;
    abrupt.simple("select 1").await;
    parked(&metrics, 2.0).await;
    drop(polite);
    parked(&metrics, 1.0).await;
    wait_gauge(&metrics, active, 1.0).await;
    drop(abrupt);
    parked(&metrics, 0.0).await;
    wait_gauge(&metrics, active, 0.0).await;
    // The server connection was never theirs to keep: a new client gets it.
    let c = support::connect(&proxy.url("app", "app", "app")).await;
    assert_eq!(show(&c, "work_mem").await, pg_default_work_mem().await);
}

async fn pg_default_work_mem() -> String {
    let direct = support::connect(&pg().url("app", "app", "app")).await;
    show(&direct, "work_mem").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_client_hears_shutdown() {
    let (mut proxy, metrics) = start("");
    let (client, connection) = connect_watched(&proxy.url("app", "app", "app")).await;
    client.simple_query("select 1").await.unwrap();
    parked(&metrics, 1.0).await;
    proxy.signal("TERM");
    assert_eq!(closed_with(connection, HANG).await, "57P01");
    let status = tokio::task::spawn_blocking(move || proxy.wait_exit(HANG))
        .await
        .unwrap()
        .expect("the proxy exits once its parked client is told");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn client_idle_timeout_reaches_a_parked_client() {
    let (proxy, metrics) = start("client_idle_timeout = \"2s\"\n");
    let (client, connection) = connect_watched(&proxy.url("app", "app", "app")).await;
    let sent = Instant::now();
    client.simple_query("select 1").await.unwrap();
    parked(&metrics, 1.0).await;
    assert_eq!(closed_with(connection, HANG).await, "57P05");
    assert!(
        sent.elapsed() >= Duration::from_secs(2),
        "closed before its timeout"
    );
    parked(&metrics, 0.0).await;
}

#[tokio::test]
async fn a_reload_brings_a_new_timeout_to_parked_clients() {
    let (proxy, metrics) = start("");
    let (client, connection) = connect_watched(&proxy.url("app", "app", "app")).await;
    client.simple_query("select 1").await.unwrap();
    parked(&metrics, 1.0).await;
    let path = proxy.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace("[pool]\n", "[pool]\nclient_idle_timeout = \"1s\"\n");
    std::fs::write(&path, text).unwrap();
    proxy.signal("HUP");
    // Idle for longer than the new timeout already: told at once, not at its next message.
    assert_eq!(closed_with(connection, HANG).await, "57P05");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_parked_clients_come_back_at_once() {
    let (proxy, metrics) = start("");
    let url = proxy.url("app", "app", "app");
    let mut clients = Vec::new();
    for _ in 0..64 {
        clients.push(support::connect(&url).await);
    }
    parked(&metrics, 64.0).await;
    // All at once, through the one server connection; each gets its own answer.
    let answers = futures::future::join_all(clients.iter().enumerate().map(|(i, c)| async move {
        let row = c.query_one("select $1::int", &[&(i as i32)]).await.unwrap();
        row.get::<_, i32>(0)
    }))
    .await;
    assert_eq!(answers, (0..64).collect::<Vec<i32>>());
    parked(&metrics, 64.0).await;
    drop(clients);
    parked(&metrics, 0.0).await;
}

/// Clients that go quiet for about as long as it takes to park, and talk again while they are
/// parking, parked or coming back: every answer is their own, and nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_talking_across_the_park_boundary_get_their_own_answers() {
    let (proxy, metrics) = start("");
    let url = proxy.url("app", "app", "app");
    let mut tasks = Vec::new();
    for i in 0..32i32 {
        let client = support::connect(&url).await;
        tasks.push(tokio::spawn(async move {
            let statement = client
                .prepare("select $1::int * 1000 + $2::int")
                .await
                .unwrap();
            for round in 0..8i32 {
                // 150..=400 ms: around QUIET + TICK (250 + 100 ms), different for each client.
                let pause = 150 + ((i * 37 + round * 53) % 251) as u64;
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let n: i32 = if round % 2 == 0 {
                    client
                        .query_one(&statement, &[&i, &round])
                        .await
                        .unwrap()
                        .get(0)
                } else {
                    let rows = client
                        .simple_query(&format!("select {i} * 1000 + {round}"))
                        .await
                        .unwrap();
                    match &rows[1] {
                        tokio_postgres::SimpleQueryMessage::Row(r) => {
                            r.get(0).unwrap().parse().unwrap()
                        }
                        other => panic!("{other:?}"),
                    }
                };
                assert_eq!(n, i * 1000 + round, "client {i}, round {round}");
            }
            client
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.expect("client task"));
    }
    // They did park between statements, not only at the end.
    let parks = gauge(&metrics, "pgcache_client_parks_total").await;
    assert!(parks >= 32.0, "{parks} parks");
    parked(&metrics, 32.0).await;
    drop(clients);
    parked(&metrics, 0.0).await;
    wait_gauge(
        &metrics,
        "pgcache_client_connections{state=\"active\"}",
        0.0,
    )
    .await;
}

/// `pool.park_after = "0"` turns parking off; a reload can turn it on.
#[tokio::test]
async fn park_after_zero_keeps_clients_running_until_a_reload_turns_it_on() {
    let (proxy, metrics) = start("park_after = \"0\"\n");
    let c = support::connect(&proxy.url("app", "app", "app")).await;
    c.simple_query("select 1").await.unwrap();
    // Well past the default 250 ms and a few sweeps.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(gauge(&metrics, "pgcache_client_parks_total").await, 0.0);
    let path = proxy.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("park_after = \"0\"", "park_after = \"250ms\""),
    )
    .unwrap();
    proxy.signal("HUP");
    parked(&metrics, 1.0).await;
    c.simple_query("select 1").await.unwrap();
}
