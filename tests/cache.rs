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
