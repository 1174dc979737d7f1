//! `DO` blocks: their PL/pgSQL body, read with pg_query's PL/pgSQL parser, for the session
//! effects the pooling analysis tracks (`SET`, `set_config`, pins); what cannot be read pins.

use super::{analyze, PinReason, SessionEffect};

/// The session effects of a `DO` block: those of every statement and expression in its
/// PL/pgSQL body (a `SET` there is a session `SET`, as at top level). `Err` when they cannot be
/// read. Functions it calls are not looked into (as for any statement).
pub(super) fn effects(d: &pg_query::protobuf::DoStmt) -> Result<Vec<SessionEffect>, PinReason> {
    let mut body = None;
    for arg in &d.args {
        let Some(pg_query::NodeEnum::DefElem(e)) = arg.node.as_ref() else {
            continue;
        };
        let value = match e.arg.as_deref().and_then(|a| a.node.as_ref()) {
            Some(pg_query::NodeEnum::String(s)) => s.sval.as_str(),
            _ => return Err(PinReason::DoBlock),
        };
        match e.defname.as_str() {
            "as" => body = Some(value),
            "language" if !value.eq_ignore_ascii_case("plpgsql") => return Err(PinReason::DoBlock),
            _ => {}
        }
    }
    let body = body.ok_or(PinReason::DoBlock)?;
    const QUOTE: &str = "$pgcache_do$";
    if body.contains(QUOTE) {
        return Err(PinReason::DoBlock);
    }
    let function = format!(
        "CREATE FUNCTION pgcache_do() RETURNS void LANGUAGE plpgsql AS {QUOTE}{body}{QUOTE}"
    );
    let tree = pg_query::parse_plpgsql(&function).map_err(|_| PinReason::DoBlock)?;
    let mut effects = Vec::new();
    plpgsql_effects(&tree, &mut effects)?;
    Ok(effects)
}

/// Walk a PL/pgSQL parse tree (pg_query's JSON): analyze each statement and expression.
fn plpgsql_effects(v: &serde_json::Value, out: &mut Vec<SessionEffect>) -> Result<(), PinReason> {
    match v {
        serde_json::Value::Array(items) => {
            for i in items {
                plpgsql_effects(i, out)?;
            }
        }
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match key.as_str() {
                    // SQL built at run time: what it does cannot be read.
                    "PLpgSQL_stmt_dynexecute" | "PLpgSQL_stmt_dynfors" | "dynquery" => {
                        return Err(PinReason::DoBlock)
                    }
                    "PLpgSQL_expr" => {
                        let query = value.get("query").and_then(|q| q.as_str()).unwrap_or("");
                        // Mode 0 is a whole statement; the others are expressions, which
                        // PL/pgSQL runs as `SELECT expr`.
                        let whole = value.get("parseMode").and_then(|m| m.as_i64()) == Some(0);
                        let a = if whole {
                            analyze(query)
                        } else {
                            analyze(&format!("SELECT {query}"))
                        };
                        if let Some(reason) = a.pin {
                            return Err(reason);
                        }
                        // An assignment (`x := expr`) does not parse as a SELECT: it must not
                        // hide a set_config.
                        if !a.parsed && query.to_ascii_lowercase().contains("set_config") {
                            return Err(PinReason::DoBlock);
                        }
                        out.extend(a.effects);
                    }
                    _ => plpgsql_effects(value, out)?,
                }
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{analyze, may_touch_session, PinReason, SessionEffect};

    #[test]
    fn do_blocks_are_read_for_their_effects() {
        let set = |n: &str| vec![SessionEffect::Set(n.into())];
        let effects = |sql: &str| analyze(sql).effects;
        assert_eq!(
            effects("do $$ begin set work_mem = '5MB'; end $$"),
            set("work_mem")
        );
        assert_eq!(
            effects("DO $$ BEGIN PERFORM set_config('search_path', 'x', false); END $$"),
            set("search_path")
        );
        assert_eq!(
            effects("do $$ begin if set_config('a.b', '1', false) is not null then null; end if; end $$"),
            set("a.b")
        );
        for quiet in [
            "do $$ begin update t set a = 1; end $$",
            "do $$ begin set local work_mem = '5MB'; end $$",
            "do language plpgsql $$ begin perform set_config('a.b', '1', true); end $$",
        ] {
            let a = analyze(quiet);
            assert!(a.effects.is_empty() && a.pin.is_none(), "{quiet}: {a:?}");
        }
        for unreadable in [
            "do $$ begin execute 'set work_mem = 1'; end $$",
            "do $$ declare r record; begin for r in execute 'select 1' loop end loop; end $$",
            "do $$ declare x text; begin x := set_config('a.b', '1', false); end $$",
            "do language plperl $$ 1 $$",
            "do $$ begin this is not plpgsql; end $$",
        ] {
            assert_eq!(
                analyze(unreadable).pin,
                Some(PinReason::DoBlock),
                "{unreadable}"
            );
        }
        // What pins at top level pins inside a block too.
        assert_eq!(
            analyze("do $$ begin create temp table t (a int); end $$").pin,
            Some(PinReason::TempTable)
        );
        // The word scan sends DO blocks to the parser.
        assert!(may_touch_session(
            "do $$ begin set work_mem = '5MB'; end $$"
        ));
    }
}
