//! What a statement text means for the cache, from the real PostgreSQL parser and nothing else:
//! relations it reads and writes, functions and operators it calls, and whether its shape can be
//! cached at all. The catalog (`catalog`) later decides what those names are (a view, a sequence,
//! a volatile function); this part never guesses them. Anything the parser rejects, and every
//! statement kind not known here, is a write to everything and not cacheable.

use pg_query::protobuf::{a_const, CopyStmt, TransactionStmtKind};
use pg_query::{NodeEnum, NodeRef};
use std::time::Duration;

/// A relation as written in the statement: optional schema, name (as the parser folded it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rel {
    pub schema: Option<String>,
    pub name: String,
}

impl Rel {
    fn of(v: &pg_query::protobuf::RangeVar) -> Rel {
        Rel {
            schema: (!v.schemaname.is_empty()).then(|| v.schemaname.clone()),
            name: v.relname.clone(),
        }
    }
}

/// What a transaction-control statement does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxControl {
    /// `BEGIN`/`START TRANSACTION` with no options: read committed, read write by default.
    BeginPlain,
    /// `BEGIN` with an isolation level or access mode, or `SET TRANSACTION`.
    BeginOther,
    /// `SET LOCAL`: changes this transaction only (a role, a search path), so its reads are not
    /// served from the cache.
    LocalSet,
    End,
}

/// Writes of a statement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Writes {
    pub rels: Vec<Rel>,
    /// Unknowable (`DO`, SQL `EXECUTE`, an unparsable statement): every relation.
    pub all: bool,
    /// Changes the schema, privileges or policies: the catalog must be read again.
    pub ddl: bool,
}

impl Writes {
    pub fn any(&self) -> bool {
        self.all || self.ddl || !self.rels.is_empty()
    }
}

/// Per-statement overrides from a `/* pgcache: ... */` comment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hint {
    pub nocache: bool,
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, Default)]
pub struct SqlFacts {
    pub parsed: bool,
    /// One plain read (`SELECT`, `VALUES`, `TABLE`, `WITH` of reads) with nothing that makes its
    /// result depend on more than its relations, its text and the session: no locking clause, no
    /// `INTO`, no `CURRENT_TIMESTAMP`-style values, no `'now'` literals, no `TABLESAMPLE`.
    pub cacheable_shape: bool,
    pub reads: Vec<Rel>,
    /// Names of common table expressions: a read of one of these is not a relation.
    pub ctes: Vec<String>,
    /// Functions called (last name part, lower case as parsed).
    pub functions: Vec<String>,
    /// Operators used (symbol).
    pub operators: Vec<String>,
    pub writes: Writes,
    pub tx: Option<TxControl>,
    /// Changes session settings (`SET` without `LOCAL`), as a function body might.
    pub sets: bool,
    /// `pg_query` fingerprint, hex (only for a cacheable shape).
    pub fingerprint: String,
    pub hint: Hint,
}

/// Words that, as string constants, mean a moment, not a value (`'now'::timestamptz`).
const TIME_WORDS: [&str; 4] = ["now", "today", "tomorrow", "yesterday"];

pub fn is_time_word(s: &[u8]) -> bool {
    let t = s.trim_ascii();
    TIME_WORDS
        .iter()
        .any(|w| t.eq_ignore_ascii_case(w.as_bytes()))
}

/// Analyse one statement text (which may hold several statements).
pub fn facts(sql: &str) -> SqlFacts {
    if starts_with_dml(sql) {
        if let Some(f) = dml_facts(sql) {
            return f;
        }
    }
    full_facts(sql)
}

/// The first word (past spaces and comments) is `INSERT`, `UPDATE` or `DELETE`.
fn starts_with_dml(sql: &str) -> bool {
    let mut rest = sql.trim_start();
    loop {
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.split_once('\n').map_or("", |(_, r)| r).trim_start();
        } else if let Some(r) = rest.strip_prefix("/*") {
            let Some((_, r)) = r.split_once("*/") else {
                return false;
            };
            rest = r.trim_start();
        } else {
            break;
        }
    }
    let word: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect();
    ["insert", "update", "delete"]
        .iter()
        .any(|k| word.eq_ignore_ascii_case(k))
}

/// Plain single-statement DML from libpg_query's summary (computed in C, several times cheaper
/// than decoding the whole tree, and all a write needs): the relations written and the
/// functions called. `None` for anything else (the full analysis decides).
fn dml_facts(sql: &str) -> Option<SqlFacts> {
    // One statement: no `;` but at the end (one inside a literal just takes the full path).
    if sql.trim_end().trim_end_matches(';').contains(';') {
        return None;
    }
    let s = pg_query::summary(sql, pg_query::ParserOptions::DEFAULT, -1).ok()?;
    // Statement types list nested statements too: the first is the top level.
    let dml = |t: &String| matches!(t.as_str(), "InsertStmt" | "UpdateStmt" | "DeleteStmt");
    let plain = s.statement_types.first().is_some_and(dml)
        && s.statement_types
            .iter()
            .all(|t| dml(t) || t == "SelectStmt");
    if !plain {
        return None;
    }
    let mut f = SqlFacts {
        parsed: true,
        hint: hint(sql),
        ..SqlFacts::default()
    };
    for t in &s.tables {
        let rel = Rel {
            schema: (!t.schema_name.is_empty()).then(|| t.schema_name.clone()),
            name: t.table_name.clone(),
        };
        if t.context == pg_query::protobuf::summary_result::Context::Dml {
            f.writes.rels.push(rel.clone());
        }
        f.reads.push(rel);
    }
    f.functions = s
        .functions
        .iter()
        .map(|x| x.function_name.clone())
        .collect();
    for v in [&mut f.reads, &mut f.writes.rels] {
        v.sort();
        v.dedup();
    }
    f.functions.sort();
    f.functions.dedup();
    f.writes.all = f.writes.rels.is_empty();
    Some(f)
}

/// The whole analysis, from the decoded parse tree.
fn full_facts(sql: &str) -> SqlFacts {
    let hint = hint(sql);
    let Ok(parsed) = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) else {
        return SqlFacts {
            writes: Writes {
                all: true,
                ..Writes::default()
            },
            hint,
            ..SqlFacts::default()
        };
    };
    let mut f = SqlFacts {
        parsed: true,
        hint,
        ..SqlFacts::default()
    };
    let stmts = &parsed.protobuf.stmts;
    let mut shape = stmts.len() == 1;
    for raw in stmts {
        let Some(stmt) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
            continue;
        };
        match stmt {
            NodeEnum::VariableSetStmt(s) if s.is_local => f.tx = Some(TxControl::LocalSet),
            // `DO` may change anything about the session (settings, temporary tables).
            NodeEnum::VariableSetStmt(_) | NodeEnum::DoStmt(_) => f.sets = true,
            _ => {}
        }
        match classify(stmt, &mut f.writes) {
            Class::Read => {}
            Class::Tx(t) => {
                f.tx.get_or_insert(t);
                shape = false;
            }
            Class::Other => shape = false,
        }
    }
    for (node, _depth, _ctx, _) in parsed.protobuf.nodes() {
        match node {
            NodeRef::RangeVar(v) => f.reads.push(Rel::of(v)),
            NodeRef::CommonTableExpr(c) => f.ctes.push(c.ctename.clone()),
            NodeRef::FuncCall(c) => {
                if let Some(name) = last_name(&c.funcname) {
                    f.functions.push(name);
                }
            }
            NodeRef::AExpr(e) => {
                if let Some(name) = last_name(&e.name) {
                    f.operators.push(name);
                }
            }
            NodeRef::SelectStmt(s) if s.into_clause.is_some() || !s.locking_clause.is_empty() => {
                shape = false
            }
            NodeRef::LockingClause(_)
            | NodeRef::SqlvalueFunction(_)
            | NodeRef::RangeTableSample(_)
            | NodeRef::InsertStmt(_)
            | NodeRef::UpdateStmt(_)
            | NodeRef::DeleteStmt(_)
            | NodeRef::MergeStmt(_) => shape = false,
            NodeRef::AConst(c) => {
                if let Some(a_const::Val::Sval(s)) = &c.val {
                    if is_time_word(s.sval.as_bytes()) {
                        shape = false;
                    }
                }
            }
            _ => {}
        }
    }
    f.cacheable_shape = shape && !f.writes.any();
    if f.cacheable_shape {
        // Only entries need it (their names); it parses the text again.
        f.fingerprint = pg_query::fingerprint(
            sql,
            pg_query::ParserOptions::DEFAULT,
            pg_query::FingerprintOptions::default(),
        )
        .map(|f| f.hex)
        .unwrap_or_default();
    }
    for v in [&mut f.reads, &mut f.writes.rels] {
        v.sort();
        v.dedup();
    }
    for v in [&mut f.functions, &mut f.operators, &mut f.ctes] {
        v.sort();
        v.dedup();
    }
    f
}

enum Class {
    Read,
    Tx(TxControl),
    Other,
}

fn last_name(parts: &[pg_query::Node]) -> Option<String> {
    parts.last().and_then(|n| match &n.node {
        Some(NodeEnum::String(s)) => Some(s.sval.clone()),
        _ => None,
    })
}

fn write_rel(w: &mut Writes, v: Option<&pg_query::protobuf::RangeVar>) {
    match v {
        Some(v) => w.rels.push(Rel::of(v)),
        None => w.all = true,
    }
}

/// Writes nested anywhere in `stmt` (data-modifying CTEs, `EXPLAIN ANALYZE` of a write).
fn nested_writes(stmt: &NodeEnum, w: &mut Writes) {
    for (node, ..) in stmt.nodes() {
        match node {
            NodeRef::InsertStmt(s) => write_rel(w, s.relation.as_ref()),
            NodeRef::UpdateStmt(s) => write_rel(w, s.relation.as_ref()),
            NodeRef::DeleteStmt(s) => write_rel(w, s.relation.as_ref()),
            NodeRef::MergeStmt(s) => write_rel(w, s.relation.as_ref()),
            _ => {}
        }
    }
}

/// Sort one top-level statement: a read, transaction control, or something else, recording what
/// it writes.
fn classify(stmt: &NodeEnum, w: &mut Writes) -> Class {
    use NodeEnum as N;
    match stmt {
        N::SelectStmt(s) => {
            nested_writes(stmt, w);
            if let Some(rel) = s.into_clause.as_ref().and_then(|i| i.rel.as_ref()) {
                w.rels.push(Rel::of(rel));
                w.ddl = true;
            }
            Class::Read
        }
        N::InsertStmt(_) | N::UpdateStmt(_) | N::DeleteStmt(_) | N::MergeStmt(_) => {
            nested_writes(stmt, w);
            Class::Other
        }
        N::TruncateStmt(t) => {
            for r in &t.relations {
                if let Some(NodeEnum::RangeVar(v)) = &r.node {
                    w.rels.push(Rel::of(v));
                }
            }
            Class::Other
        }
        N::CopyStmt(c) => {
            copy_writes(c, w);
            Class::Other
        }
        N::ExplainStmt(e) => {
            let analyze = e
                .options
                .iter()
                .any(|o| matches!(&o.node, Some(NodeEnum::DefElem(d)) if d.defname == "analyze"));
            if analyze {
                if let Some(q) = e.query.as_ref().and_then(|q| q.node.as_ref()) {
                    classify(q, w);
                }
            }
            Class::Other
        }
        N::TransactionStmt(t) => {
            let kind = TransactionStmtKind::try_from(t.kind).unwrap_or_default();
            Class::Tx(match kind {
                TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart
                    if t.options.is_empty() =>
                {
                    TxControl::BeginPlain
                }
                TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart => {
                    TxControl::BeginOther
                }
                TransactionStmtKind::TransStmtSavepoint
                | TransactionStmtKind::TransStmtRelease
                | TransactionStmtKind::TransStmtRollbackTo => return Class::Other,
                _ => TxControl::End,
            })
        }
        N::VariableSetStmt(s)
            if s.name.starts_with("TRANSACTION") || s.name == "SESSION CHARACTERISTICS" =>
        {
            Class::Tx(TxControl::BeginOther)
        }
        // No data changes.
        N::VariableSetStmt(_)
        | N::VariableShowStmt(_)
        | N::ListenStmt(_)
        | N::UnlistenStmt(_)
        | N::NotifyStmt(_)
        | N::DeallocateStmt(_)
        | N::DiscardStmt(_)
        | N::CheckPointStmt(_)
        | N::VacuumStmt(_)
        | N::LockStmt(_)
        | N::FetchStmt(_)
        | N::ClosePortalStmt(_) => Class::Other,
        N::DeclareCursorStmt(d) => {
            if let Some(q) = d.query.as_ref().and_then(|q| q.node.as_ref()) {
                nested_writes(q, w);
            }
            Class::Other
        }
        N::PrepareStmt(p) => {
            // The write happens at EXECUTE, which writes everything (below).
            if let Some(q) = p.query.as_ref().and_then(|q| q.node.as_ref()) {
                nested_writes(q, w);
            }
            Class::Other
        }
        N::CallStmt(_) => Class::Other, // the procedure's effects come from the catalog
        N::RefreshMatViewStmt(r) => {
            write_rel(w, r.relation.as_ref());
            Class::Other
        }
        // DO, EXECUTE, and every DDL, GRANT, policy or role change: anything may have changed.
        _ => {
            w.all = true;
            w.ddl = true;
            Class::Other
        }
    }
}

/// `COPY t FROM` writes `t`; `COPY (INSERT ... RETURNING) TO` writes what its query writes.
fn copy_writes(c: &CopyStmt, w: &mut Writes) {
    if c.is_from {
        write_rel(w, c.relation.as_ref());
    } else if let Some(q) = c.query.as_ref().and_then(|q| q.node.as_ref()) {
        nested_writes(q, w);
    }
}

/// `/* pgcache: nocache */`, `/* pgcache: ttl=30s */` anywhere in the text (several options may be
/// separated by commas or spaces).
pub fn hint(sql: &str) -> Hint {
    if !sql.contains("/*") {
        return Hint::default();
    }
    let mut h = Hint::default();
    let mut rest = sql;
    while let Some(start) = rest.find("/*") {
        let body_start = start + 2;
        let Some(len) = rest[body_start..].find("*/") else {
            break;
        };
        let body = rest[body_start..body_start + len].trim();
        if let Some(opts) = body.strip_prefix("pgcache:") {
            for opt in opts
                .split([',', ' '])
                .map(str::trim)
                .filter(|o| !o.is_empty())
            {
                if opt.eq_ignore_ascii_case("nocache") {
                    h.nocache = true;
                } else if let Some(v) = opt.strip_prefix("ttl=") {
                    match crate::config::parse_duration(v) {
                        Ok(d) => h.ttl = Some(d),
                        // A hint we cannot read must not make things more cacheable.
                        Err(_) => h.nocache = true,
                    }
                }
            }
        }
        rest = &rest[body_start + len + 2..];
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dml_fast_path_agrees_with_the_full_analysis() {
        for sql in [
            "UPDATE pgbench_accounts SET abalance = abalance + -4 WHERE aid = 12;",
            "insert into s.h (a, b) select x, now() from t join u using (id)",
            "/* c */ delete from only t where id in (select id from u)",
            "-- x\nupdate t set a = f(b) from u where u.id = t.id returning *",
            "with d as (delete from a returning id) insert into b select id from d",
            "insert into t values (1) on conflict (id) do update set v = excluded.v",
            "update t set a = (select max(b) from u)",
        ] {
            let fast = dml_facts(sql).expect(sql);
            let full = full_facts(sql);
            let names = |f: &SqlFacts| {
                f.writes
                    .rels
                    .iter()
                    .map(|r| r.name.clone())
                    .collect::<Vec<_>>()
            };
            assert_eq!(names(&fast), names(&full), "{sql}");
            assert_eq!(fast.writes.all, full.writes.all, "{sql}");
            for func in &full.functions {
                assert!(fast.functions.contains(func), "{sql}: {func}");
            }
            assert!(!fast.cacheable_shape && !full.cacheable_shape, "{sql}");
        }
        assert!(starts_with_dml("  /* a */ -- b\n UPDATE x set a=1"));
        assert!(!starts_with_dml("select 1"));
        assert!(
            dml_facts("update t set a = 1; select 1").is_none(),
            "two statements"
        );
    }
}
