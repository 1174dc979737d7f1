//! `EXPLAIN` of a slow statement on a connection of its own (outside every pool), with the
//! client's settings and the parameters it sent, and what the plan says: sequential scans over
//! large relations, the filter columns an index would serve, and the `CREATE INDEX` that would.
//!
//! `ANALYZE` (when enabled, for reads) runs inside `BEGIN READ ONLY ... ROLLBACK`: a statement
//! that turns out to write fails there instead of writing twice.

use super::slow::ExplainArgs;
use crate::listener::Shared;
use crate::wire;
use bytes::BytesMut;
use pg_query::protobuf::{node::Node as N, AExprKind, BoolExprType, Node};

/// Explain `a` and describe what the plan shows.
pub async fn run(
    shared: &Shared,
    a: &ExplainArgs,
    analyze: bool,
    min_rows: u64,
) -> Result<String, String> {
    let mut conn = shared
        .pools
        .connect_unpooled(&a.key)
        .await
        .map_err(|e| e.to_string())?;
    // The client's settings first: without its search_path the statement may name other
    // relations, or none.
    let applied = match a.settings.sync_sql(&Default::default(), &conn.params) {
        Some(sql) => conn.simple_query(&sql).await.map(drop),
        None => Ok(()),
    };
    let result = match applied {
        Ok(()) => explain_on(&mut conn, a, analyze, min_rows).await,
        Err(e) => Err(format!("applying the client's settings: {e}")),
    };
    conn.terminate().await;
    result
}

async fn explain_on(
    conn: &mut crate::pool::upstream::ServerConn,
    a: &ExplainArgs,
    analyze: bool,
    min_rows: u64,
) -> Result<String, String> {
    let options = if analyze {
        "ANALYZE, VERBOSE, FORMAT JSON"
    } else {
        "VERBOSE, FORMAT JSON"
    };
    let sql = format!("EXPLAIN ({options}) {}", a.sql);
    let mut out = BytesMut::new();
    if analyze {
        wire::query("BEGIN READ ONLY", &mut out);
    }
    match (&a.parse_types, &a.bind) {
        (Some(types), Some(bind)) => {
            let params = bind_params(bind).ok_or("malformed Bind")?;
            wire::frame(b'P', &[b"\0", sql.as_bytes(), b"\0", types], &mut out);
            // The parameters as the client bound them; one text result column.
            wire::frame(b'B', &[b"\0\0", params, &[0, 0]], &mut out);
            wire::frame(b'E', &[b"\0", &[0, 0, 0, 0]], &mut out);
            wire::frame(b'S', &[], &mut out);
        }
        _ => wire::query(&sql, &mut out),
    }
    let replies = if analyze {
        // Two replies to read: BEGIN's, then the EXPLAIN's.
        let _ = conn.exchange(&out).await;
        let r = conn.exchange(&[]).await.map_err(|e| e.to_string());
        let _ = conn.simple_query("ROLLBACK").await;
        r?
    } else {
        conn.exchange(&out).await.map_err(|e| e.to_string())?
    };
    let json = replies
        .iter()
        .find(|(t, _)| *t == b'D')
        .and_then(|(_, body)| wire::data_row_texts(body)?.into_iter().next().flatten())
        .ok_or("EXPLAIN returned no plan")?;
    let plan: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| format!("EXPLAIN output: {e}"))?;
    let mut scans = Vec::new();
    if let Some(p) = plan.get(0).and_then(|p| p.get("Plan")) {
        seq_scans(p, &mut scans);
    }
    let mut found = Vec::new();
    for s in scans {
        let rows = reltuples(conn, &s.schema, &s.relation).await.unwrap_or(0);
        if rows < min_rows {
            continue;
        }
        let rel = format!("{}.{}", ident(&s.schema), ident(&s.relation));
        let cols = s.filter.as_deref().map(index_columns).unwrap_or_default();
        let mut line = format!("Seq Scan on {rel} ({rows} rows)");
        if let Some(f) = &s.filter {
            line.push_str(&format!(" filtering {f}"));
        }
        if !cols.is_empty() {
            let cols: Vec<String> = cols.iter().map(|c| ident(c)).collect();
            line.push_str(&format!(": CREATE INDEX ON {rel} ({})", cols.join(", ")));
        }
        found.push(line);
    }
    if found.is_empty() {
        return Ok(format!(
            "no sequential scan over a relation of {min_rows}+ rows"
        ));
    }
    Ok(found.join("; "))
}

/// Parameter formats and values of a `Bind` body after its names, without the result formats.
fn bind_params(rest: &[u8]) -> Option<&[u8]> {
    let i16_at = |p: usize| -> Option<usize> {
        let b = rest.get(p..p + 2)?;
        usize::try_from(i16::from_be_bytes([b[0], b[1]])).ok()
    };
    let nformats = i16_at(0)?;
    let mut p = 2 + 2 * nformats;
    let nparams = i16_at(p)?;
    p += 2;
    for _ in 0..nparams {
        let b = rest.get(p..p + 4)?;
        let len = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        p += 4 + usize::try_from(len).unwrap_or(0);
    }
    rest.get(..p)
}

struct Scan {
    schema: String,
    relation: String,
    filter: Option<String>,
}

fn seq_scans(node: &serde_json::Value, out: &mut Vec<Scan>) {
    let s = |k: &str| node.get(k).and_then(|v| v.as_str()).map(str::to_string);
    if s("Node Type").as_deref() == Some("Seq Scan") {
        if let (Some(schema), Some(relation)) = (s("Schema"), s("Relation Name")) {
            out.push(Scan {
                schema,
                relation,
                filter: s("Filter"),
            });
        }
    }
    if let Some(children) = node.get("Plans").and_then(|p| p.as_array()) {
        for c in children {
            seq_scans(c, out);
        }
    }
}

async fn reltuples(
    conn: &mut crate::pool::upstream::ServerConn,
    schema: &str,
    rel: &str,
) -> Option<u64> {
    let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let sql = format!(
        "SELECT greatest(c.reltuples, 0)::bigint FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = {} AND c.relname = {}",
        lit(schema),
        lit(rel)
    );
    conn.scalar(&sql).await.ok()??.parse().ok()
}

/// Columns an index would serve for `filter` (an `EXPLAIN` filter expression): those compared
/// for equality first, then one compared by range, each directly against something that is not
/// a column. An `OR`, a function of a column, or a column compared with another column gives
/// none of its columns.
pub fn index_columns(filter: &str) -> Vec<String> {
    let Ok(parsed) = pg_query::parse(
        &format!("SELECT 1 WHERE {filter}"),
        pg_query::ParserOptions::DEFAULT,
    ) else {
        return Vec::new();
    };
    let Some(N::SelectStmt(s)) = parsed
        .protobuf
        .stmts
        .first()
        .and_then(|s| s.stmt.as_ref())
        .and_then(|s| s.node.as_ref())
    else {
        return Vec::new();
    };
    let (mut eq, mut range) = (Vec::new(), Vec::new());
    if let Some(w) = &s.where_clause {
        conditions(w, &mut eq, &mut range);
    }
    let mut cols: Vec<String> = Vec::new();
    for c in eq.into_iter().chain(range.into_iter().take(1)) {
        if !cols.contains(&c) {
            cols.push(c);
        }
    }
    cols
}

fn conditions(n: &Node, eq: &mut Vec<String>, range: &mut Vec<String>) {
    match n.node.as_ref() {
        Some(N::BoolExpr(b)) if b.boolop == BoolExprType::AndExpr as i32 => {
            for a in &b.args {
                conditions(a, eq, range);
            }
        }
        Some(N::AExpr(e)) => {
            let op = e.name.iter().find_map(|n| match n.node.as_ref() {
                Some(N::String(s)) => Some(s.sval.as_str()),
                _ => None,
            });
            let (l, r) = (e.lexpr.as_deref(), e.rexpr.as_deref());
            let side = match (l.and_then(column), r.and_then(column)) {
                (Some(c), None) | (None, Some(c)) => c,
                _ => return,
            };
            let kind = e.kind;
            if kind == AExprKind::AexprIn as i32
                || (kind == AExprKind::AexprOp as i32 && op == Some("="))
                || (kind == AExprKind::AexprOpAny as i32 && op == Some("="))
            {
                eq.push(side);
            } else if (kind == AExprKind::AexprOp as i32
                && matches!(op, Some("<" | "<=" | ">" | ">=")))
                || kind == AExprKind::AexprBetween as i32
            {
                range.push(side);
            }
        }
        _ => {}
    }
}

/// The column `n` names, looking through casts (`(t.name)::text`).
fn column(n: &Node) -> Option<String> {
    match n.node.as_ref()? {
        N::ColumnRef(c) => match c.fields.last()?.node.as_ref()? {
            N::String(s) => Some(s.sval.clone()),
            _ => None,
        },
        N::TypeCast(t) => column(t.arg.as_deref()?),
        _ => None,
    }
}

/// An identifier as SQL needs it written.
fn ident(s: &str) -> String {
    let plain = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_an_index_would_serve() {
        assert_eq!(index_columns("(big.val = 42)"), ["val"]);
        assert_eq!(
            index_columns("((big.created > '2024-01-01'::date) AND ((big.status)::text = 'x'::text) AND (big.kind = ANY ('{1,2}'::integer[])))"),
            ["status", "kind", "created"]
        );
        assert!(index_columns("((big.a = 1) OR (big.b = 2))").is_empty());
        assert!(index_columns("(lower(big.name) = 'x'::text)").is_empty());
        assert!(index_columns("(big.a = big.b)").is_empty());
        assert!(index_columns("(hashed SubPlan 1)").is_empty());
        assert_eq!(ident("Mixed"), "\"Mixed\"");
        assert_eq!(ident("plain_1"), "plain_1");
    }

    #[test]
    fn bind_parameters_without_result_formats() {
        // 1 format (text), 2 params ("7", NULL), 1 result format (binary).
        let rest = [
            0, 1, 0, 0, 0, 2, 0, 0, 0, 1, b'7', 255, 255, 255, 255, 0, 1, 0, 1,
        ];
        assert_eq!(bind_params(&rest), Some(&rest[..15]));
        assert_eq!(bind_params(&[0, 1]), None);
    }
}
