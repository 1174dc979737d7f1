//! The cacheability and write decisions, pinned statement by statement against a catalog built
//! from rows like the upstream's (tables, a view, a partitioned table, a cascade, a trigger, a
//! sequence, a foreign table, row-level security, immutable, stable and volatile functions).

use super::catalog::{from_rows, Catalog};
use super::plan::Plan;
use super::sql::{self, TxControl};
use crate::config::{CacheConfig, CacheRule};
use std::time::Duration;

/// Bodies as `pg_proc.prosrc` holds them.
const AUDIT_TRIGGER: &str =
    "\nBEGIN\n  INSERT INTO public.audit(order_id) VALUES (NEW.id);\n  RETURN NEW;\nEND\n";
const BUMP: &str = "DECLARE n int; BEGIN UPDATE ONLY counters SET n = n + 1; n := 1; RETURN n; END";
const DYNAMIC: &str = "BEGIN EXECUTE q; END";

fn catalog() -> Catalog {
    from_rows(
        &[
            ["orders", "r", "false", "false", ""],
            ["customers", "r", "false", "false", ""],
            ["order_lines", "r", "false", "false", ""],
            ["audit", "r", "false", "false", ""],
            ["counters", "r", "false", "false", ""],
            ["items", "p", "false", "false", ""],
            ["items_2024", "r", "false", "false", ""],
            ["mv", "m", "false", "false", ""],
            ["secrets", "r", "true", "false", ""],
            ["ruled", "r", "false", "false", ""],
            ["order_seq", "S", "false", "false", ""],
            ["ft", "f", "false", "false", ""],
            ["pg_class", "r", "false", "true", ""],
            ["tables", "v", "false", "true", "SELECT 1"],
            [
                "order_totals",
                "v",
                "false",
                "false",
                " SELECT o.id, c.name FROM orders o JOIN customers c ON c.id = o.customer_id;",
            ],
            ["v_now", "v", "false", "false", " SELECT now() AS now;"],
            [
                "v_ts",
                "v",
                "false",
                "false",
                " SELECT CURRENT_TIMESTAMP AS ts;",
            ],
        ],
        [
            &[["items", "items_2024"]],
            &[["orders", "order_lines"]],
            &[["orders", "audit_orders"]],
        ],
        &["ruled"],
        &[["secrets", "owner = CURRENT_USER", "true"]],
        &[
            ["lower", "i", "true", "internal", ""],
            ["count", "i", "true", "internal", ""],
            ["generate_series", "i", "true", "internal", ""],
            ["now", "s", "true", "internal", ""],
            ["current_setting", "s", "true", "internal", ""],
            ["random", "v", "true", "internal", ""],
            ["nextval", "v", "true", "internal", ""],
            ["currval", "v", "true", "internal", ""],
            ["pg_sleep", "v", "true", "internal", ""],
            ["set_config", "v", "true", "internal", ""],
            ["add1", "i", "false", "sql", "SELECT $1 + 1"],
            ["audit_orders", "v", "false", "plpgsql", AUDIT_TRIGGER],
            ["bump_counter", "v", "false", "plpgsql", BUMP],
            ["run_sql", "v", "false", "plpgsql", DYNAMIC],
            ["fetch_orders", "s", "false", "sql", "SELECT * FROM orders"],
            ["c_func", "v", "false", "c", ""],
        ],
    )
}

fn config(rules: &[(&[&str], bool)]) -> CacheConfig {
    CacheConfig {
        enabled: true,
        rules: rules
            .iter()
            .map(|(t, shared)| CacheRule {
                tables: t.iter().map(|s| s.to_string()).collect(),
                shared: *shared,
                ..CacheRule::default()
            })
            .collect(),
        ..CacheConfig::default()
    }
}

fn plan_with(sql: &str, c: &Catalog, cfg: &CacheConfig) -> Plan {
    Plan::new(&sql::facts(sql), Some(c), cfg, 1)
}

fn plan(sql: &str) -> Plan {
    plan_with(sql, &catalog(), &config(&[(&["*"], false)]))
}

fn names(v: &[std::sync::Arc<str>]) -> Vec<&str> {
    let mut n: Vec<&str> = v.iter().map(|s| s.as_ref()).collect();
    n.sort();
    n
}

#[test]
fn cacheable_reads() {
    for s in [
        "select * from orders",
        "SELECT id FROM orders WHERE id = $1",
        "select o.id, c.name from orders o join customers c on c.id = o.customer_id",
        "with x as (select * from orders) select * from x",
        "table orders",
        "select count(*) from orders",
        "select lower(name) from customers",
        "select * from order_totals",
        "select * from orders where id in (select order_id from order_lines)",
        "select * from items",
        "select * from items_2024",
        "select * from public.orders",
        "select id from orders union all select id from customers",
        "select * from generate_series(1, 3) g join orders o on o.id = g",
        "select add1(id) from orders",
        "select * from orders order by id limit 10 offset 5",
        "select exists (select 1 from orders)",
        "select * from \"orders\"",
        "select * from orders where created_at > '2020-01-01'",
        "select * from mv",
        "select * from secrets",
        "select * from orders where note = 'nowhere'",
        "/* pgcache: ttl=5s */ select * from orders",
    ] {
        assert!(plan(s).cacheable, "should be cacheable: {s}");
    }
}

#[test]
fn not_cacheable() {
    for s in [
        "select * from orders for update",
        "select * from orders for share",
        "select * from orders for no key update skip locked",
        "select * from orders where id = 1 for key share",
        "select nextval('order_seq')",
        "select currval('order_seq')",
        "select * from order_seq",
        "select now()",
        "select * from orders where created_at > now()",
        "select current_timestamp",
        "select * from orders where d > current_date",
        "select current_user, * from orders",
        "select random() from orders",
        "select * from orders where created_at > 'now'::timestamptz",
        "select * from orders where d = 'today'",
        "select * from v_now",
        "select * from v_ts",
        "select * from ft",
        "select * from pg_class",
        "select * from information_schema.tables",
        "select * from orders tablesample system (10)",
        "select * into new_t from orders",
        "create table t2 as select * from orders",
        "with d as (delete from orders returning *) select * from d",
        "with i as (insert into audit values (1) returning *) select * from i",
        "explain select * from orders",
        "explain analyze select * from orders",
        "show search_path",
        "copy (select * from orders) to stdout",
        "do $$ begin perform 1; end $$",
        "select bump_counter()",
        "select * from unknown_table",
        "select 1",
        "values (1), (2)",
        "values (now())",
        "select 1; select * from orders",
        "/* pgcache: nocache */ select * from orders",
        "/* pgcache: ttl=soon */ select * from orders",
        "select pg_sleep(1) from orders",
        "select set_config('search_path', 'x', false)",
        "select current_setting('search_path') from orders",
        "select fetch_orders()",
        "select c_func() from orders",
        "select * from orders where a =%= b",
        "prepare p as select * from orders",
        "execute p",
        "declare c cursor for select * from orders",
        "fetch next from c",
        "lock table orders",
        "selec * from orders",
        "begin",
        "select * from orders; commit",
    ] {
        assert!(!plan(s).cacheable, "must not be cacheable: {s}");
    }
}

#[test]
fn writes_reach_cascades_triggers_partitions_and_views() {
    let w = |s: &str| {
        let p = plan(s);
        assert!(!p.cacheable, "{s}");
        (names(&p.writes).join(","), p.writes_all, p.ddl)
    };
    assert_eq!(
        w("insert into orders (id) values (1)"),
        ("audit,order_lines,orders".into(), false, false)
    );
    assert_eq!(
        w("delete from orders"),
        ("audit,order_lines,orders".into(), false, false)
    );
    assert_eq!(
        w("update items_2024 set x = 1"),
        ("items,items_2024".into(), false, false)
    );
    assert_eq!(
        w("update items set x = 1"),
        ("items,items_2024".into(), false, false)
    );
    assert_eq!(w("truncate customers"), ("customers".into(), false, false));
    assert_eq!(
        w("copy customers from stdin"),
        ("customers".into(), false, false)
    );
    assert_eq!(
        w("merge into customers c using orders o on o.customer_id = c.id when matched then delete"),
        ("customers".into(), false, false)
    );
    assert_eq!(
        w("refresh materialized view mv"),
        ("mv".into(), false, false)
    );
    assert_eq!(
        w("select bump_counter()"),
        ("counters".into(), false, false)
    );
    assert_eq!(w("call bump_counter()"), ("counters".into(), false, false));
    assert_eq!(
        w("insert into order_totals (id) values (1)").0,
        "audit,customers,order_lines,order_totals,orders"
    );
    assert_eq!(
        w("with d as (delete from customers returning id) select * from d"),
        ("customers".into(), false, false)
    );
    assert_eq!(
        w("explain analyze delete from customers"),
        ("customers".into(), false, false)
    );
    assert!(
        w("explain delete from customers").0.is_empty(),
        "plain EXPLAIN runs nothing"
    );
    assert!(
        w("insert into ruled values (1)").1,
        "a rule may write anything"
    );
    assert!(
        w("select run_sql('delete from orders')").1,
        "dynamic SQL writes anything"
    );
    assert!(w("select c_func()").1, "a C function writes anything");
    assert!(w("do $$ begin delete from orders; end $$").1);
    assert!(w("execute p").1);
    assert!(w("selec broken").1, "unparsable");
    let (_, all, ddl) = w("alter table orders add column x int");
    assert!(all && ddl);
    assert!(
        w("grant select on orders to other").2,
        "privileges change what roles read"
    );
    assert!(w("create policy p on orders using (true)").2);
    assert!(w("insert into brand_new values (1)").0 == "brand_new");
    assert!(plan("select * from orders").writes.is_empty());
}

#[test]
fn dependencies_rules_and_sharing() {
    let p = plan("select * from order_totals");
    assert_eq!(names(&p.deps), ["customers", "order_totals", "orders"]);
    let c = catalog();
    let only_orders = config(&[(&["orders"], true)]);
    assert!(plan_with("select * from orders", &c, &only_orders).cacheable);
    assert!(plan_with("select * from orders", &c, &only_orders).shared);
    assert!(
        !plan_with(
            "select * from orders join customers using (id)",
            &c,
            &only_orders
        )
        .cacheable,
        "every relation read must match a rule"
    );
    let schema_rule = config(&[(&["public.*"], false)]);
    assert!(plan_with("select * from orders", &c, &schema_rule).cacheable);
    assert!(!plan_with("select * from other.orders", &c, &schema_rule).cacheable);
    let all_shared = config(&[(&["*"], true)]);
    assert!(
        !plan_with("select * from secrets", &c, &all_shared).shared,
        "row-level security is never shared"
    );
    let p = plan("/* pgcache: ttl=5s */ select * from orders");
    assert_eq!(p.ttl, Duration::from_secs(5));
    assert_eq!(
        plan("select * from orders").ttl,
        CacheConfig::default().default_ttl
    );
}

#[test]
fn transactions_and_settings() {
    assert_eq!(plan("begin").tx, Some(TxControl::BeginPlain));
    assert_eq!(plan("start transaction").tx, Some(TxControl::BeginPlain));
    assert_eq!(
        plan("begin isolation level serializable").tx,
        Some(TxControl::BeginOther)
    );
    assert_eq!(plan("begin read only").tx, Some(TxControl::BeginOther));
    assert_eq!(
        plan("set transaction isolation level repeatable read").tx,
        Some(TxControl::BeginOther)
    );
    assert_eq!(plan("commit").tx, Some(TxControl::End));
    assert_eq!(plan("rollback").tx, Some(TxControl::End));
    assert!(plan("select set_config('a.b', '1', false)").sets);
    assert_eq!(plan("set local role other").tx, Some(TxControl::LocalSet));
    assert_eq!(
        plan("set local search_path = x").tx,
        Some(TxControl::LocalSet)
    );
    assert!(plan("set role other").sets);
    assert!(plan("do $$ begin create temp table t (a int); end $$").sets);
    assert!(!plan("select * from orders").sets);
    // Without a catalog nothing is cacheable and any write may reach anything.
    let f = sql::facts("delete from orders");
    let p = Plan::new(&f, None, &config(&[(&["*"], false)]), 1);
    assert!(p.writes_all && !p.cacheable);
    let f = sql::facts("select * from orders");
    assert!(!Plan::new(&f, None, &config(&[(&["*"], false)]), 1).cacheable);
}

#[test]
fn hints_parse() {
    assert!(sql::hint("/* pgcache: nocache */ select 1").nocache);
    assert_eq!(
        sql::hint("select 1 /* pgcache: ttl=30s */").ttl,
        Some(Duration::from_secs(30))
    );
    assert!(sql::hint("/* pgcache: ttl=x */ select 1").nocache);
    assert_eq!(sql::hint("/* other */ select 1"), sql::Hint::default());
}

#[test]
fn procedural_bodies_are_read_for_writes_and_settings() {
    let body = |src: &str| {
        let c = from_rows(
            &[["t", "r", "false", "false", ""]],
            [&[], &[], &[["t", "f"]]],
            &[],
            &[],
            &[["f", "v", "false", "plpgsql", src]],
        );
        let f = &c.funcs["f"];
        let mut w: Vec<String> = f.writes.iter().map(|x| x.to_string()).collect();
        w.sort();
        (w.join(","), f.writes_all, f.sets)
    };
    assert_eq!(
        body("BEGIN DELETE FROM ONLY s.a WHERE x; TRUNCATE TABLE b, ONLY c; END"),
        ("a,b,c".into(), false, false)
    );
    assert_eq!(
        body("BEGIN MERGE INTO \"Mixed\" m USING x ON true WHEN MATCHED THEN DELETE; END"),
        ("Mixed".into(), false, false)
    );
    assert_eq!(
        body("BEGIN SET search_path = x; END"),
        ("".into(), false, true)
    );
    assert_eq!(
        body("BEGIN UPDATE t SET a = 1; END"),
        ("t".into(), false, false),
        "UPDATE ... SET is no setting"
    );
    assert!(body("BEGIN PERFORM set_config('a.b', '1', false); END").2);
    assert!(body("BEGIN EXECUTE 'delete from t'; END").1);
    assert!(body("BEGIN CREATE TEMP TABLE x (a int); END").1);
    assert!(
        body("BEGIN CREATE TEMP TABLE x (a int); END").2,
        "temp tables shadow names"
    );
    assert!(body("BEGIN RAISE NOTICE 'it''s fine'; END").0.is_empty());
}
