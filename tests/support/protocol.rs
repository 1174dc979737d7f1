//! Helpers for the protocol tests (`tests/protocol.rs`, `tests/transparency.rs`): a session-mode
//! proxy, clients that surface notices and notifications, and direct-vs-proxied byte comparison.

use super::raw::{self, Msg, RawConn};
use super::{free_port, pg, proxy_config, Proxy};
use futures::StreamExt;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, SimpleQueryMessage};

/// Hang guard for whole operations (never a performance expectation).
pub const GUARD: Duration = Duration::from_secs(120);

pub fn start_proxy() -> Proxy {
    Proxy::start(&proxy_config(pg(), free_port(), ""))
}

pub fn app_url(proxy: &Proxy) -> String {
    proxy.url("app", "app", "app")
}

/// A client whose connection task forwards notices and notifications to the returned channel.
pub async fn connect_with_messages(
    url: &str,
) -> (
    tokio_postgres::Client,
    mpsc::UnboundedReceiver<AsyncMessage>,
) {
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e:?}"));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            let _ = tx.send(m);
        }
    });
    (client, rx)
}

pub async fn next_message(rx: &mut mpsc::UnboundedReceiver<AsyncMessage>) -> AsyncMessage {
    tokio::time::timeout(GUARD, rx.recv())
        .await
        .expect("no async message arrived")
        .expect("connection task ended before an async message arrived")
}

pub fn rows_text(msgs: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
            }
            _ => None,
        })
        .collect()
}

/// Sends `bytes` on a fresh `trustuser` session directly to PostgreSQL and on another through the
/// proxy, and returns both replies: the messages up to the `readies`-th `ReadyForQuery`.
pub async fn direct_and_proxied(
    proxy: &Proxy,
    bytes: &[u8],
    readies: usize,
) -> (Vec<Msg>, Vec<Msg>) {
    let mut out = Vec::new();
    for port in [pg().port, proxy.port()] {
        let mut conn = RawConn::login_trust(port).await;
        conn.send(bytes).await;
        let mut msgs = Vec::new();
        for _ in 0..readies {
            msgs.extend(conn.until_ready().await);
        }
        conn.send(&raw::terminate()).await;
        out.push(msgs);
    }
    let proxied = out.pop().expect("proxied reply");
    let direct = out.pop().expect("direct reply");
    (direct, proxied)
}

/// Asserts two message lists are equal message by message, showing the first difference.
pub fn assert_same_messages(direct: &[Msg], proxied: &[Msg], what: &str) {
    for (i, (d, p)) in direct.iter().zip(proxied).enumerate() {
        assert_eq!(
            (d.0 as char, &d.1),
            (p.0 as char, &p.1),
            "{what}: message {i} differs (direct vs proxied)\ndirect:  {}\nproxied: {}",
            raw::tags(direct),
            raw::tags(proxied)
        );
    }
    assert_eq!(
        raw::tags(direct),
        raw::tags(proxied),
        "{what}: message sequences differ"
    );
}
