//! Writes through the proxy invalidate what they can change, found in the catalog: foreign-key
//! cascades, triggers, views, functions that write, DDL (which also makes the proxy read the
//! catalog again). Each test warms the cache, writes through the proxy, and reads back.

mod support;

use support::cache::*;
use support::{connect, pg};

#[tokio::test]
async fn cascades_and_triggers_invalidate_their_targets() {
    for mode in MODES {
        let parent = table(&format!("parent_{mode}"), "id int primary key");
        let child = table(
            &format!("child_{mode}"),
            &format!("id int, parent_id int references {parent} on delete cascade"),
        );
        let audit = table(&format!("audit_{mode}"), "n int");
        direct(&format!(
            "insert into {parent} values (1), (2); insert into {child} values (1, 1), (2, 2);
             create function log_{mode}() returns trigger language plpgsql as $$
             begin insert into {audit} values (new.id); return new; end $$;
             alter function log_{mode}() owner to app;
             create trigger t_{mode} after insert on {parent} for each row execute function log_{mode}();"
        ));
        let proxy = cache_proxy(mode, "");
        let c = connect(&app_url(&proxy)).await;
        let count_child = format!("select count(*) from {child}");
        let count_audit = format!("select count(*) from {audit}");
        assert_eq!(value(&c, &count_child).await, "2");
        assert_eq!(value(&c, &count_audit).await, "0");
        assert_eq!(value(&c, &count_child).await, "2");
        assert_eq!(value(&c, &count_audit).await, "0");
        c.simple_query(&format!("delete from {parent} where id = 1"))
            .await
            .unwrap();
        assert_eq!(value(&c, &count_child).await, "1", "{mode}: cascade");
        c.simple_query(&format!("insert into {parent} values (3)"))
            .await
            .unwrap();
        assert_eq!(value(&c, &count_audit).await, "1", "{mode}: trigger");
        let f = cache_figures(&proxy).await;
        assert!(f["hits"].parse::<u32>().unwrap() >= 2, "{mode}: {f:?}");
    }
}

#[tokio::test]
async fn views_and_writing_functions() {
    for mode in MODES {
        let base = table(&format!("vbase_{mode}"), "id int, v text");
        let counter = table(&format!("counter_{mode}"), "n int");
        direct(&format!(
            "insert into {base} values (1, 'a'); insert into {counter} values (0);
             create view vv_{mode} as select id, upper(v) as v from {base};
             alter view vv_{mode} owner to app;
             create function bump_{mode}() returns int language sql as
               'update {counter} set n = n + 1 returning n';
             alter function bump_{mode}() owner to app;"
        ));
        let proxy = cache_proxy(mode, "");
        let c = connect(&app_url(&proxy)).await;
        let view_q = format!("select v from vv_{mode} where id = 1");
        let counter_q = format!("select n from {counter}");
        assert_eq!(value(&c, &view_q).await, "A");
        assert_eq!(value(&c, &counter_q).await, "0");
        direct(&format!("update {base} set v = 'direct'"));
        assert_eq!(value(&c, &view_q).await, "A", "{mode}: the view is cached");
        c.simple_query(&format!("update {base} set v = 'b'"))
            .await
            .unwrap();
        assert_eq!(
            value(&c, &view_q).await,
            "B",
            "{mode}: base write bumps the view"
        );
        assert_eq!(value(&c, &format!("select bump_{mode}()")).await, "1");
        assert_eq!(value(&c, &counter_q).await, "1", "{mode}: function write");
    }
}

#[tokio::test]
async fn a_commit_invalidates_what_other_clients_cached_during_the_transaction() {
    for mode in MODES {
        let t = table(&format!("txw_{mode}"), "id int, v text");
        direct(&format!("insert into {t} values (1, 'old')"));
        let proxy = cache_proxy(mode, "");
        let writer = connect(&app_url(&proxy)).await;
        let reader = connect(&app_url(&proxy)).await;
        let q = format!("select v from {t} where id = 1");
        assert_eq!(value(&reader, &q).await, "old");
        writer.simple_query("begin").await.unwrap();
        writer
            .simple_query(&format!("update {t} set v = 'new' where id = 1"))
            .await
            .unwrap();
        assert_eq!(
            value(&writer, &q).await,
            "new",
            "{mode}: own uncommitted write"
        );
        // The reader sees (and may cache) the committed value meanwhile.
        assert_eq!(value(&reader, &q).await, "old");
        assert_eq!(value(&reader, &q).await, "old");
        writer.simple_query("commit").await.unwrap();
        assert_eq!(value(&reader, &q).await, "new", "{mode}: after commit");
        // A rolled-back write leaves the committed value.
        writer.simple_query("begin").await.unwrap();
        writer
            .simple_query(&format!("update {t} set v = 'rolled back'"))
            .await
            .unwrap();
        writer.simple_query("rollback").await.unwrap();
        assert_eq!(value(&reader, &q).await, "new", "{mode}");
        assert_eq!(value(&writer, &q).await, "new", "{mode}");
    }
}

#[tokio::test]
async fn ddl_through_the_proxy_invalidates_and_rereads_the_catalog() {
    for mode in MODES {
        let t = table(&format!("ddl_{mode}"), "id int");
        let audit = table(&format!("ddl_audit_{mode}"), "id int");
        direct(&format!("insert into {t} values (1)"));
        let proxy = cache_proxy(mode, "");
        let c = connect(&app_url(&proxy)).await;
        let q = format!("select * from {t}");
        let audit_q = format!("select count(*) from {audit}");
        assert_eq!(column(&c, &q).await, ["1"]);
        assert_eq!(value(&c, &audit_q).await, "0");
        c.simple_query(&format!("alter table {t} add column z int default 5"))
            .await
            .unwrap();
        let rows = c.simple_query(&q).await.unwrap();
        let width = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.len()),
            _ => None,
        });
        assert_eq!(width, Some(2), "{mode}: the new column shows");
        // A trigger created through the proxy is known to the next write.
        c.batch_execute(&audit_trigger(&format!("ddl_{mode}"), &t, &audit))
            .await
            .unwrap();
        assert_eq!(value(&c, &audit_q).await, "0");
        assert_eq!(value(&c, &audit_q).await, "0");
        c.simple_query(&format!("insert into {t} values (2)"))
            .await
            .unwrap();
        assert_eq!(
            value(&c, &audit_q).await,
            "1",
            "{mode}: new trigger's target bumped"
        );
    }
}

/// A session re-uses the plan of a statement it repeats; DDL from another client in between
/// must make it plan the statement again: here a new trigger makes the same `INSERT` (simple
/// and extended protocol) write a second table, whose cached count must not outlive it.
#[tokio::test]
async fn a_statement_repeated_after_another_clients_ddl_is_planned_again() {
    for mode in MODES {
        let proxy = cache_proxy(mode, "");
        for extended in [false, true] {
            let n = format!("{mode}_{extended}");
            let t = table(&format!("rep_{n}"), "id int");
            let audit = table(&format!("rep_audit_{n}"), "id int");
            let (a, b) = (
                connect(&app_url(&proxy)).await,
                connect(&app_url(&proxy)).await,
            );
            let insert = || async {
                if extended {
                    let sql = format!("insert into {t} values ($1)");
                    a.execute(&sql, &[&1i32]).await.map(drop)
                } else {
                    let sql = format!("insert into {t} values (1)");
                    a.simple_query(&sql).await.map(drop)
                }
            };
            let audit_q = format!("select count(*) from {audit}");
            insert().await.unwrap();
            b.batch_execute(&audit_trigger(&format!("rep_{n}"), &t, &audit))
                .await
                .unwrap();
            assert_eq!(value(&b, &audit_q).await, "0");
            assert_eq!(value(&b, &audit_q).await, "0");
            insert().await.unwrap();
            assert_eq!(
                value(&b, &audit_q).await,
                "1",
                "{n}: the insert now writes {audit}"
            );
        }
    }
}

#[tokio::test]
async fn warm_queries_are_cached_at_start_and_after_invalidation() {
    let t = table("warm_t", "v text");
    direct(&format!("insert into {t} values ('one')"));
    let q = format!("select v from {t}");
    let extra = format!(
        "[[cache.warm]]\nsql = \"{q}\"\ndatabase = \"app\"\nuser = \"app\"\n\
         [[cache.warm]]\nsql = \"select now()\"\ndatabase = \"app\"\nuser = \"app\"\n"
    );
    let proxy = cache_proxy("transaction", &extra);
    let c = connect(&app_url(&proxy)).await;
    // Warmed before any client asked: a direct change is not seen.
    assert!(
        fills_reach(&proxy, "1").await,
        "the warm query was not stored:\n{}",
        proxy.log()
    );
    direct(&format!("update {t} set v = 'two'"));
    assert_eq!(value(&c, &q).await, "one", "served from the warmed entry");
    assert_eq!(cache_figures(&proxy).await["misses"], "0");
    // A write through the proxy invalidates it; within a second or two it is warm again.
    c.simple_query(&format!("update {t} set v = 'three'"))
        .await
        .unwrap();
    assert!(
        fills_reach(&proxy, "2").await,
        "not warmed again:\n{}",
        proxy.log()
    );
    direct(&format!("update {t} set v = 'four'"));
    assert_eq!(value(&c, &q).await, "three");
    assert!(
        proxy.log().contains("not cacheable"),
        "select now() is refused"
    );
}

/// Waits up to 10 s for the proxy's fill count to reach `n`.
async fn fills_reach(proxy: &support::Proxy, n: &str) -> bool {
    for _ in 0..100 {
        if cache_figures(proxy).await["fills"] == n {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}

/// SQL for a trigger (and its function, both named after `name`) that copies every row inserted
/// into `table` into `audit`.
fn audit_trigger(name: &str, table: &str, audit: &str) -> String {
    format!(
        "create function {name}_log() returns trigger language plpgsql as $$
         begin insert into {audit} values (new.id); return new; end $$;
         create trigger {name}_t after insert on {table} for each row execute function {name}_log();"
    )
}

/// With `standard_conforming_strings = off` the server reads `'x\', '` as one string; a parser
/// that assumes standard strings (pg_query) reads two, and the `UPDATE` between them as part of
/// the second. The cache must not trust that reading: the write invalidates what it may touch.
#[tokio::test]
async fn a_write_hidden_by_backslash_escapes_still_invalidates() {
    let db = "cache_escapes";
    direct(&format!("drop database if exists {db}"));
    direct(&format!("create database {db} owner app"));
    direct(&format!(
        "alter database {db} set standard_conforming_strings = off"
    ));
    let setup = format!("postgres://app:app@127.0.0.1:{}/{db}", support::pg().port);
    connect(&setup)
        .await
        .batch_execute(
            "create table esc (id int primary key, v int); insert into esc values (1, 1)",
        )
        .await
        .unwrap();
    for mode in MODES {
        let proxy = cache_proxy(mode, "");
        let c = connect(&proxy.url("app", "app", db)).await;
        let read = "select v from esc where id = 1";
        let before = value(&c, read).await;
        assert_eq!(value(&c, read).await, before);
        let next: i32 = before.parse::<i32>().unwrap() + 1;
        c.simple_query(&format!(
            r"select 'x\', '; update esc set v = {next} where id = 1; -- '"
        ))
        .await
        .unwrap();
        assert_eq!(value(&c, read).await, next.to_string(), "{mode}");
        // Another client of the same proxy, too.
        let d = connect(&proxy.url("app", "app", db)).await;
        assert_eq!(value(&d, read).await, next.to_string(), "{mode}");
    }
}

/// A client whose `client_encoding` is not UTF8 writes text the proxy cannot read: the write
/// still invalidates (as a write of anything), so no client reads the old row from the cache.
#[tokio::test]
async fn a_write_whose_text_is_not_utf8_still_invalidates() {
    use support::raw::{self, RawConn};
    for mode in MODES {
        let t = table(&format!("latin1_{mode}"), "id int primary key, v text");
        direct(&format!("insert into {t} values (1, 'plain')"));
        direct(&format!("grant all on {t} to trustuser"));
        let proxy = cache_proxy(mode, "");
        let c = connect(&app_url(&proxy)).await;
        let q = format!("select v from {t} where id = 1");
        assert_eq!(value(&c, &q).await, "plain");
        assert_eq!(value(&c, &q).await, "plain", "{mode}: cached");
        let mut w = RawConn::login_trust_latin1(proxy.port()).await;
        // 'café' in LATIN1: é is the single byte 0xE9.
        let mut update = format!("update {t} set v = 'caf").into_bytes();
        update.extend_from_slice(b"\xe9' where id = 1\0");
        w.send(&raw::message(b'Q', &update)).await;
        let reply = w.until_ready().await;
        assert_eq!(raw::tags(&reply), "CZ", "{mode}: update ran");
        assert_eq!(value(&c, &q).await, "café", "{mode}: not served stale");
        assert_eq!(value(&c, &q).await, "café", "{mode}: cached again");
        // A statement whose name is not UTF-8 (its text is): the Bind cannot be tied to a text
        // the proxy read, so it counts as a write of anything too.
        let mut parse = b"upd\xe9\0".to_vec();
        parse.extend_from_slice(format!("update {t} set v = 'named' where id = 1\0").as_bytes());
        parse.extend_from_slice(&0i16.to_be_bytes());
        let mut bind = b"\0upd\xe9\0".to_vec();
        bind.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let mut batch = raw::message(b'P', &parse);
        batch.extend(raw::message(b'B', &bind));
        batch.extend(raw::execute("", 0));
        batch.extend(raw::sync());
        w.send(&batch).await;
        let reply = w.until_ready().await;
        assert_eq!(raw::tags(&reply), "12CZ", "{mode}: named update ran");
        assert_eq!(value(&c, &q).await, "named", "{mode}: not served stale");
    }
}

/// A database whose encoding is not UTF-8, with a table whose name is not ASCII: the proxy reads
/// the catalog in UTF-8 (it used to read it in the database's encoding, so `café` was not found,
/// a write to it bumped only itself, and the table its cascade empties stayed cached).
#[tokio::test]
async fn a_cascade_from_a_table_named_outside_ascii_in_a_latin1_database() {
    for mode in MODES {
        let db = format!("latin1_{mode}");
        pg().psql(
            "postgres",
            &format!(
                "drop database if exists {db}; create database {db} owner app template template0 \
                 encoding 'LATIN1' lc_collate 'C' lc_ctype 'C'"
            ),
        );
        // As app, over TCP, in UTF-8 (psql's encoding would follow the test's locale).
        let setup = connect(&pg().url("app", "app", &db)).await;
        setup
            .batch_execute(
                "create table \"café\" (id int primary key);
                 create table kids (id int, parent int references \"café\" on delete cascade);
                 insert into \"café\" values (1); insert into kids values (1, 1);",
            )
            .await
            .unwrap();
        let proxy = cache_proxy(mode, "");
        let c = connect(&proxy.url("app", "app", &db)).await;
        let q = "select count(*) from kids";
        assert_eq!(value(&c, q).await, "1");
        assert_eq!(value(&c, q).await, "1", "{mode}: cached");
        c.batch_execute("delete from \"café\" where id = 1")
            .await
            .unwrap();
        assert_eq!(
            value(&c, q).await,
            "0",
            "{mode}: the cascade's table is not served stale"
        );
    }
}
