//! Unit tests of the statement analysis (split from `analysis.rs` to keep it readable).
use super::*;

fn effects(sql: &str) -> Vec<SessionEffect> {
    analyze(sql).effects
}

#[test]
fn session_sets_are_tracked_local_ones_not() {
    assert_eq!(
        effects("SET search_path TO a, b"),
        vec![SessionEffect::Set("search_path".into())]
    );
    assert_eq!(
        effects("set time zone 'UTC'"),
        vec![SessionEffect::Set("timezone".into())]
    );
    assert_eq!(
        effects("SET SESSION work_mem = '4MB'"),
        vec![SessionEffect::Set("work_mem".into())]
    );
    assert!(effects("SET LOCAL work_mem = '4MB'").is_empty());
    assert!(effects("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").is_empty());
    assert_eq!(
        effects("RESET work_mem"),
        vec![SessionEffect::Reset("work_mem".into())]
    );
    assert_eq!(effects("RESET ALL"), vec![SessionEffect::ResetAll]);
    assert_eq!(
        effects("DISCARD ALL"),
        vec![SessionEffect::ResetAll, SessionEffect::DeallocateAll]
    );
    assert_eq!(
        effects("DEALLOCATE ALL"),
        vec![SessionEffect::DeallocateAll]
    );
    assert_eq!(
        effects("select 1; set role other"),
        vec![SessionEffect::Set("role".into())]
    );
    // set_config: a SET by another name, a SET LOCAL with is_local true.
    for sql in [
        "select set_config('Work_Mem', '6MB', false)",
        "SELECT pg_catalog.set_config('work_mem', $1, false) AS x",
    ] {
        assert!(may_touch_session(sql), "{sql}");
        assert_eq!(effects(sql), vec![SessionEffect::Set("work_mem".into())]);
    }
    assert!(effects("select set_config('app.user', '42', true)").is_empty());
    for sql in [
        "select set_config($1, '1', false)",
        "select set_config('a.b', '1', $1)",
        "select set_config('a.b', '1', 'f')",
    ] {
        assert_eq!(analyze(sql).pin, Some(PinReason::SetConfig), "{sql}");
    }
}

#[test]
fn session_state_pins() {
    let pin = |s: &str| analyze(s).pin;
    assert_eq!(pin("LISTEN chan"), Some(PinReason::Listen));
    assert_eq!(
        pin("select pg_advisory_lock(1)"),
        Some(PinReason::AdvisoryLock)
    );
    assert_eq!(pin("select pg_advisory_xact_lock(1)"), None);
    assert_eq!(pin("PREPARE p AS select 1"), Some(PinReason::SqlPrepare));
    assert_eq!(pin("EXECUTE p"), Some(PinReason::SqlPrepare));
    assert_eq!(
        pin("DECLARE c CURSOR WITH HOLD FOR select 1"),
        Some(PinReason::HoldCursor)
    );
    assert_eq!(pin("DECLARE c CURSOR FOR select 1"), None);
    assert_eq!(
        pin("create temp table t (a int)"),
        Some(PinReason::TempTable)
    );
    assert_eq!(pin("create table t (a int)"), None);
    assert_eq!(
        pin("create table pg_temp.t (a int)"),
        Some(PinReason::TempTable)
    );
    assert_eq!(pin("select 1 into temp t2"), Some(PinReason::TempTable));
    assert_eq!(
        pin("create temp table t3 as select 1"),
        Some(PinReason::TempTable)
    );
    assert_eq!(pin("select * from t where x = 1"), None);
}

#[test]
fn word_scan_lets_only_plain_statements_skip_the_parser() {
    assert!(!may_touch_session(
        "SELECT abalance FROM pgbench_accounts WHERE aid = 5"
    ));
    assert!(!may_touch_session("DELETE FROM t WHERE a = 1"));
    assert!(may_touch_session("LiStEn x"));
    assert!(may_touch_session("select PG_ADVISORY_LOCK(1)"));
    assert!(may_touch_session("select pg_try_advisory_lock_shared(1)"));
    assert!(may_touch_session("create TEMP table t(a int)"));
    assert!(may_touch_session("create table pg_temp.t(a int)"));
    // Everything the pin/effect tests use passes the scan.
    for s in [
        "DISCARD ALL",
        "DEALLOCATE ALL",
        "PREPARE p AS select 1",
        "EXECUTE p",
        "DECLARE c CURSOR WITH HOLD FOR select 1",
        "select 1 into temp t2",
        "LOAD 'x'",
    ] {
        assert!(may_touch_session(s), "{s}");
    }
    // A backslash-escaped quote ends no string: what follows it is still quoted.
    // Nor does a `$` inside a name start a dollar quote, nor a line comment run past a
    // carriage return.
    for hidden in [
        "SELECT 1; -- c\rSET search_path = evil",
        "SELECT E'\\''; SET search_path = evil; SELECT E'\\''",
        "SELECT 1 AS a$q$; SET search_path = evil; SELECT 1 AS b$q$",
        "SELECT 1 AS \u{e9}$q$; SET search_path = evil; SELECT 1 AS \u{e9}$q$",
    ] {
        assert!(may_touch_session(hidden), "{hidden}");
        assert_eq!(
            effects(hidden),
            vec![SessionEffect::Set("search_path".into())],
            "{hidden}"
        );
    }
    assert!(!may_touch_session("SELECT 1 AS a$q$, $q$ temp $q$, é"));
}

/// Random statement lists of quoted strings (escapes, dollar quotes), names with `$` and
/// non-ASCII letters, comments (nested too), and the statements that matter: whenever the
/// scan lets a text the parser accepts skip it, the parser finds nothing there either.
#[test]
fn the_word_scan_never_hides_what_the_parser_finds() {
    let literals = [
        "'x'",
        "'it''s'",
        "E'\\''",
        "E'\\\\'",
        "e'\\'' ; '",
        "$$ ' $$",
        "$q$ $$ ' $q$",
        "1",
        "1.5",
        "U&'d\\0061t'",
        "'--'",
        "'/*'",
        "$1",
        "$\u{e9}$ ; $\u{e9}$",
        "$_$ x $_$",
        "B'01'",
        "X'1F'",
        "N'x'",
        "'a' 'b'",
        "'a'\n'b'",
        "$a$$a$",
        "1e5",
        "0x1F",
    ];
    let names = [
        "a",
        "a$q$",
        "a$",
        "\u{e9}$q$",
        "\"n\"\"m\"",
        "\"$q$\"",
        "_x1",
        "U&\"d\\0061t\"",
        "\u{e9}",
        "x\u{e9}$",
    ];
    let gaps = [
        " ",
        " ",
        "\n",
        " /* c */ ",
        " /* a /* b */ c */ ",
        " -- c\n",
        " -- c\r",
        "/**/",
        "/*/ x */",
        "\t",
        "\r\n",
        "/* -- */",
        "-- /*\n",
        "/* ' */",
        "/* $q$ */",
    ];
    let effects_stmts = [
        "set work_mem = 1",
        "reset work_mem",
        "listen c",
        "create temp table t(a int)",
        "select pg_advisory_lock(1)",
        "select set_config('work_mem', '1MB', false)",
        "discard all",
        "prepare p as select 1",
        "deallocate p",
    ];
    let mut seed: u64 = 0x5eed;
    let mut next = |n: usize| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize % n
    };
    let mut checked = 0;
    for _ in 0..20_000 {
        let mut sql = String::new();
        for s in 0..1 + next(3) {
            if s > 0 {
                sql.push(';');
                sql.push_str(gaps[next(gaps.len())]);
            }
            if next(4) == 0 {
                sql.push_str(effects_stmts[next(effects_stmts.len())]);
                continue;
            }
            sql.push_str("select");
            for c in 0..1 + next(3) {
                sql.push_str(if c > 0 { ", " } else { " " });
                sql.push_str(literals[next(literals.len())]);
                sql.push_str(gaps[next(gaps.len())]);
                sql.push_str("as ");
                sql.push_str(names[next(names.len())]);
            }
        }
        let a = analyze(&sql);
        if !a.parsed || may_touch_session(&sql) {
            continue;
        }
        checked += 1;
        assert!(
            a.effects.is_empty() && a.pin.is_none() && a.deallocate.is_none(),
            "{sql:?}: {a:?}"
        );
    }
    assert!(checked > 1_000, "{checked}");
}

#[test]
fn unparsable_is_flagged_and_memo_returns_same() {
    assert!(!analyze("selec 1").parsed);
    let an = Analyzer::new(2);
    assert!(matches!(an.analyze("select 1"), Analyzed::Plain));
    let a = an.analyze("set work_mem = '1MB'");
    let b = an.analyze("set work_mem = '1MB'");
    match (a, b) {
        (Analyzed::Parsed(a), Analyzed::Parsed(b)) => assert!(Arc::ptr_eq(&a, &b)),
        _ => panic!("a SET is parsed"),
    }
}

/// What `session::insight::LastQuery` rests on: a text that differs from one the pre-scan
/// passed only in numbers (`sqltext::same_plan_key` says yes) is passed too, when those
/// numbers stand alone (`numbers_stand_alone`). Random texts made
/// of the words the pre-scan looks for, the bytes that steer it and `sqltext`'s scan, and
/// numbers; each against a copy with numbers changed and sometimes a piece put in.
#[test]
fn new_numbers_never_make_a_passed_text_touch_the_session() {
    use crate::sqltext::tests::with_new_numbers;
    use crate::sqltext::{number_spans, same_plan_key};
    use rand::{Rng, SeedableRng};
    const PIECES: &[&str] = &[
        "1",
        "23",
        "4.5",
        "1_0",
        "_",
        ".",
        "a",
        "E",
        "e",
        "x1",
        "é",
        " ",
        " ",
        "\n",
        "\r",
        "(",
        ",",
        ";",
        "--",
        "/*",
        "*/",
        "'",
        "\"",
        "$",
        "$$",
        "$q$",
        "$a1$",
        "\\",
        "set",
        "do",
        "temp",
        "pg_temp",
        "pg_advisory_",
        "set_config",
        "listen",
        "execute",
        "select",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (mut passed, mut checked) = (0, 0);
    for _ in 0..200_000 {
        // Numbers standing alone are what this is about: two pieces in five.
        const ALONE: &[&str] = &[" 1 ", "23", "(4)", ",5", "=6;", " 78"];
        let text: String = (0..rng.random_range(1..10))
            .map(|_| match rng.random_bool(0.4) {
                true => ALONE[rng.random_range(0..ALONE.len())],
                false => PIECES[rng.random_range(0..PIECES.len())],
            })
            .collect();
        let spans = number_spans(&text);
        if spans.is_empty() || may_touch_session(&text) || !numbers_stand_alone(&text, &spans) {
            continue;
        }
        let other = with_new_numbers(&mut rng, &text, &spans, 0.0, 0.2, PIECES);
        checked += 1;
        if same_plan_key(&text, &spans, other.as_bytes()) {
            passed += 1;
            assert!(!may_touch_session(&other), "{text:?} / {other:?}");
        }
    }
    assert!(
        passed > checked / 2 && passed > 10_000,
        "{passed} of {checked}"
    );
}
