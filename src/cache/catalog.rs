//! What the upstream catalog says about the names statements use, read once per database at
//! start, after DDL through the proxy, and on reload: which relations are plain tables (cacheable)
//! and which are views (resolved to their base tables), sequences, foreign or system relations
//! (not); which functions are immutable; which relations a write to one relation may also change
//! (partitions and inheritance, `ON DELETE/UPDATE CASCADE/SET NULL/SET DEFAULT` foreign keys,
//! triggers and rules, updatable views); which functions write or change settings, found by
//! parsing SQL and PL/pgSQL bodies. Relations are named by their bare name: a name in two schemas
//! is one entry with the union of both, which can only make the cache more cautious.

use super::sql::{self, SqlFacts};
use crate::pool::upstream::{ServerConn, UpstreamError};
use crate::wire;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Everything the cache needs to know about one relation name.
#[derive(Debug, Default, Clone)]
pub struct RelInfo {
    /// Reads may be cached: every relation of this name is a user table, partitioned table,
    /// materialized view, or a view over such relations calling only immutable functions.
    pub cacheable: bool,
    /// Relations whose versions a read of this name depends on (itself, a view's bases, tables
    /// that row-level security policies consult).
    pub reads: Vec<Arc<str>>,
    /// Relations a write to this name may change, itself included.
    pub writes: Vec<Arc<str>>,
    /// A write may change anything (a rule, a trigger we cannot read).
    pub writes_all: bool,
    /// Row-level security is on: results differ by role, never shared.
    pub rls: bool,
}

/// What calling a function may do.
#[derive(Debug, Default, Clone)]
pub struct FuncInfo {
    /// Every overload of this name is immutable.
    pub immutable: bool,
    pub writes: Vec<Arc<str>>,
    pub writes_all: bool,
    /// May change session settings (`set_config`, `SET` in the body).
    pub sets: bool,
}

#[derive(Debug, Default)]
pub struct Catalog {
    pub rels: HashMap<String, RelInfo>,
    pub funcs: HashMap<String, FuncInfo>,
    /// Operators implemented by volatile functions.
    pub volatile_ops: HashSet<String>,
    /// The server's `default_transaction_isolation` is read committed.
    pub read_committed: bool,
}

const RELATIONS: &str = "SELECT c.relname, c.relkind, c.relrowsecurity::text, \
 (n.nspname IN ('pg_catalog', 'information_schema') OR n.nspname LIKE 'pg\\_%')::text, \
 CASE WHEN c.relkind = 'v' THEN pg_get_viewdef(c.oid) END \
 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')";
/// (changed, also changed): partitions/children and their parents, both ways.
const INHERITS: &str = "SELECT p.relname, c.relname FROM pg_inherits i \
 JOIN pg_class p ON p.oid = i.inhparent JOIN pg_class c ON c.oid = i.inhrelid";
/// Writing the referenced table may write the referencing one.
const CASCADES: &str = "SELECT r.relname, c.relname FROM pg_constraint k \
 JOIN pg_class r ON r.oid = k.confrelid JOIN pg_class c ON c.oid = k.conrelid \
 WHERE k.contype = 'f' AND (k.confdeltype IN ('c', 'n', 'd') OR k.confupdtype IN ('c', 'n', 'd'))";
const TRIGGERS: &str = "SELECT c.relname, p.proname FROM pg_trigger t \
 JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_proc p ON p.oid = t.tgfoid \
 WHERE NOT t.tgisinternal AND t.tgenabled <> 'D'";
const RULES: &str = "SELECT c.relname FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class \
 WHERE r.rulename <> '_RETURN'";
const POLICIES: &str = "SELECT c.relname, coalesce(pg_get_expr(p.polqual, p.polrelid), 'true'), \
 coalesce(pg_get_expr(p.polwithcheck, p.polrelid), 'true') \
 FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid";
const FUNCTIONS: &str = "SELECT p.proname, p.provolatile, (n.nspname = 'pg_catalog')::text, l.lanname, \
 CASE WHEN n.nspname <> 'pg_catalog' AND l.lanname IN ('sql', 'plpgsql') THEN p.prosrc END \
 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang";
const VOLATILE_OPS: &str = "SELECT DISTINCT o.oprname FROM pg_operator o \
 JOIN pg_proc p ON p.oid = o.oprcode WHERE p.provolatile = 'v'";
const ISOLATION: &str = "SELECT current_setting('default_transaction_isolation')";

type Rows = Vec<Vec<Option<String>>>;

async fn rows(conn: &mut ServerConn, sql: &str) -> Result<Rows, UpstreamError> {
    let replies = conn.simple_query(sql).await?;
    Ok(replies
        .into_iter()
        .filter(|(tag, _)| *tag == b'D')
        .filter_map(|(_, body)| wire::data_row_texts(&body))
        .collect())
}

fn col(row: &[Option<String>], i: usize) -> &str {
    row.get(i).and_then(|c| c.as_deref()).unwrap_or("")
}

/// Read the catalog of the database `conn` is connected to.
pub async fn load(conn: &mut ServerConn) -> Result<Catalog, UpstreamError> {
    let raw = Raw {
        relations: rows(conn, RELATIONS).await?,
        inherits: rows(conn, INHERITS).await?,
        cascades: rows(conn, CASCADES).await?,
        triggers: rows(conn, TRIGGERS).await?,
        rules: rows(conn, RULES).await?,
        policies: rows(conn, POLICIES).await?,
        functions: rows(conn, FUNCTIONS).await?,
        volatile_ops: rows(conn, VOLATILE_OPS).await?,
        isolation: rows(conn, ISOLATION).await?,
    };
    Ok(raw.build())
}

/// The catalog's rows, before they are understood.
struct Raw {
    relations: Rows,
    inherits: Rows,
    cascades: Rows,
    triggers: Rows,
    rules: Rows,
    policies: Rows,
    functions: Rows,
    volatile_ops: Rows,
    isolation: Rows,
}

/// Per relation name, while building.
#[derive(Default)]
struct Node {
    plain: bool,
    view_defs: Vec<String>,
    rls: bool,
    /// Written along with this relation.
    also: HashSet<String>,
    triggers: Vec<String>,
    rule: bool,
    policies: Vec<String>,
}

impl Raw {
    fn build(self) -> Catalog {
        let mut nodes: HashMap<String, Node> = HashMap::new();
        for r in &self.relations {
            let n = nodes.entry(col(r, 0).to_string()).or_insert_with(|| Node {
                plain: true,
                ..Node::default()
            });
            // A name that is also a system relation, a sequence or a foreign table is never
            // cacheable.
            let system = col(r, 3) == "true";
            n.plain &= !system && matches!(col(r, 1), "r" | "p" | "m" | "v");
            n.rls |= col(r, 2) == "true";
            if col(r, 1) == "v" {
                n.view_defs.push(col(r, 4).to_string());
            }
        }
        for r in &self.inherits {
            let (parent, child) = (col(r, 0), col(r, 1));
            nodes
                .entry(parent.into())
                .or_default()
                .also
                .insert(child.into());
            nodes
                .entry(child.into())
                .or_default()
                .also
                .insert(parent.into());
        }
        for r in &self.cascades {
            nodes
                .entry(col(r, 0).into())
                .or_default()
                .also
                .insert(col(r, 1).into());
        }
        for r in &self.triggers {
            nodes
                .entry(col(r, 0).into())
                .or_default()
                .triggers
                .push(col(r, 1).into());
        }
        for r in &self.rules {
            nodes.entry(col(r, 0).into()).or_default().rule = true;
        }
        for r in &self.policies {
            let n = nodes.entry(col(r, 0).into()).or_default();
            n.policies.push(format!(
                "SELECT 1 WHERE ({}) AND ({})",
                col(r, 1),
                col(r, 2)
            ));
        }
        let funcs = functions(&self.functions);
        let mut cat = Catalog {
            funcs,
            volatile_ops: self
                .volatile_ops
                .iter()
                .map(|r| col(r, 0).to_string())
                .collect(),
            read_committed: self
                .isolation
                .first()
                .is_some_and(|r| col(r, 0) == "read committed"),
            ..Catalog::default()
        };
        // Updatable views write their base tables.
        let view_bases: Vec<(String, Vec<String>)> = nodes
            .iter()
            .filter(|(_, n)| !n.view_defs.is_empty())
            .map(|(name, n)| {
                let bases = n
                    .view_defs
                    .iter()
                    .flat_map(|d| sql::facts(d).reads)
                    .map(|r| r.name)
                    .collect();
                (name.clone(), bases)
            })
            .collect();
        for (view, bases) in view_bases {
            if let Some(n) = nodes.get_mut(&view) {
                n.also.extend(bases);
            }
        }
        let names: Vec<String> = nodes.keys().cloned().collect();
        for name in names {
            let info = resolve(&name, &nodes, &cat);
            cat.rels.insert(name, info);
        }
        cat
    }
}

/// The worst of every overload of each function name, and what its body does.
fn functions(rows: &Rows) -> HashMap<String, FuncInfo> {
    let mut out: HashMap<String, FuncInfo> = HashMap::new();
    let mut bodies: Vec<(String, SqlFacts)> = Vec::new();
    for r in rows {
        let name = col(r, 0).to_string();
        let immutable = col(r, 1) == "i";
        let builtin = col(r, 2) == "true";
        let e = out.entry(name.clone()).or_insert(FuncInfo {
            immutable: true,
            ..FuncInfo::default()
        });
        e.immutable &= immutable;
        if builtin {
            // Built-in functions write no user relation; `set_config` changes settings.
            e.sets |= name == "set_config";
            continue;
        }
        if immutable {
            continue;
        }
        match (col(r, 3), r.get(4).and_then(|c| c.as_deref())) {
            ("sql", Some(body)) if !body.trim().is_empty() => {
                let f = sql::facts(body);
                match (f.parsed, body_facts(body)) {
                    (true, _) => bodies.push((name, f)),
                    (false, Some(t)) => bodies.push((name, t)),
                    (false, None) => e.writes_all = true,
                }
            }
            ("plpgsql", Some(def)) => match body_facts(def) {
                Some(f) => bodies.push((name, f)),
                None => e.writes_all = true,
            },
            _ => {
                e.writes_all = true;
                e.sets = true;
            }
        }
    }
    for (name, f) in bodies {
        let e = out.entry(name).or_default();
        e.writes_all |= f.writes.all;
        e.sets |= f.sets || f.functions.iter().any(|c| c == "set_config");
        e.writes.extend(
            f.writes
                .rels
                .iter()
                .map(|r| Arc::<str>::from(r.name.as_str())),
        );
    }
    // Functions calling functions: a few rounds of propagation reach a fixed point in practice;
    // whatever is still changing after them writes everything.
    let calls: Vec<(String, Vec<String>)> = rows
        .iter()
        .filter(|r| col(r, 2) != "true" && col(r, 1) != "i")
        .filter_map(|r| {
            let body = r.get(4).and_then(|c| c.as_deref())?;
            let f = match col(r, 3) {
                "sql" => sql::facts(body),
                _ => body_facts(body)?,
            };
            Some((col(r, 0).to_string(), f.functions))
        })
        .collect();
    for _ in 0..4 {
        let mut changed = false;
        for (name, callees) in &calls {
            let mut add = FuncInfo::default();
            for c in callees {
                if let Some(ci) = out.get(c) {
                    add.writes_all |= ci.writes_all;
                    add.sets |= ci.sets;
                    add.writes.extend(ci.writes.iter().cloned());
                }
            }
            let e = out.entry(name.clone()).or_default();
            let before = (e.writes_all, e.sets, e.writes.len());
            e.writes_all |= add.writes_all;
            e.sets |= add.sets;
            for w in add.writes {
                if !e.writes.contains(&w) {
                    e.writes.push(w);
                }
            }
            changed |= before != (e.writes_all, e.sets, e.writes.len());
        }
        if !changed {
            return out;
        }
    }
    for (name, _) in &calls {
        if let Some(e) = out.get_mut(name) {
            e.writes_all = true;
        }
    }
    out
}

/// What a procedural (PL/pgSQL) body may do, read from its tokens: relations after `INSERT
/// INTO`, `UPDATE`, `DELETE FROM`, `MERGE INTO`, `TRUNCATE`, `COPY`, `REFRESH MATERIALIZED VIEW`;
/// functions called; `SET`/`RESET` statements. Dynamic SQL (`EXECUTE`) and DDL write anything.
/// `None` when the body cannot even be tokenized.
fn body_facts(body: &str) -> Option<SqlFacts> {
    let scanned = pg_query::scan(body).ok()?;
    let toks: Vec<String> = scanned
        .tokens
        .iter()
        .map(|t| {
            let text = body.get(t.start as usize..t.end as usize).unwrap_or("");
            match text.strip_prefix('"').and_then(|x| x.strip_suffix('"')) {
                Some(quoted) => quoted.replace("\"\"", "\""),
                None => text.to_ascii_lowercase(),
            }
        })
        .collect();
    let mut f = SqlFacts::default();
    let at = |i: usize| toks.get(i).map(String::as_str).unwrap_or("");
    // The relation name starting at `i` (schema-qualified names give their last part).
    let name_at = |mut i: usize| {
        while at(i) == "only" || at(i) == "table" {
            i += 1;
        }
        while at(i + 1) == "." {
            i += 2;
        }
        at(i).to_string()
    };
    let push = |f: &mut SqlFacts, name: String| {
        if !name.is_empty() {
            f.writes.rels.push(sql::Rel { schema: None, name });
        }
    };
    for i in 0..toks.len() {
        let starts_statement =
            i == 0 || matches!(at(i - 1), ";" | "begin" | "then" | "else" | "loop");
        match (at(i), at(i + 1)) {
            ("insert", "into") | ("merge", "into") | ("delete", "from") => {
                push(&mut f, name_at(i + 2))
            }
            ("update", _) | ("copy", _) => push(&mut f, name_at(i + 1)),
            ("truncate", _) => {
                let mut j = i + 1;
                loop {
                    while matches!(at(j), "only" | "table") {
                        j += 1;
                    }
                    push(&mut f, name_at(j));
                    while at(j + 1) == "." {
                        j += 2;
                    }
                    if at(j + 1) != "," {
                        break;
                    }
                    j += 2;
                }
            }
            ("refresh", "materialized") => push(&mut f, name_at(i + 3)),
            ("execute", _)
            | ("create", _)
            | ("alter", _)
            | ("drop", _)
            | ("grant", _)
            | ("revoke", _) => f.writes.all = true,
            ("set", _) | ("reset", _) if starts_statement => f.sets = true,
            // A temporary table made here would shadow a cached name for the session.
            ("temp", _) | ("temporary", _) => f.sets = true,
            (name, "(") if !name.is_empty() && name != "(" => f.functions.push(name.to_string()),
            _ => {}
        }
    }
    Some(f)
}

/// Read and write closures of one relation name.
fn resolve(name: &str, nodes: &HashMap<String, Node>, cat: &Catalog) -> RelInfo {
    let mut info = RelInfo {
        cacheable: true,
        ..RelInfo::default()
    };
    // Reads: the relation, a view's bases (recursively), tables policies consult.
    let mut seen = HashSet::new();
    let mut stack = vec![name.to_string()];
    while let Some(n) = stack.pop() {
        if !seen.insert(n.clone()) {
            continue;
        }
        info.reads.push(Arc::from(n.as_str()));
        let Some(node) = nodes.get(&n) else {
            info.cacheable = false; // a name the catalog does not know
            continue;
        };
        info.cacheable &= node.plain;
        info.rls |= node.rls;
        let texts = node.view_defs.iter().map(|t| (t, false));
        for (text, policy) in texts.chain(node.policies.iter().map(|t| (t, true))) {
            let f = sql::facts(text);
            let funcs_ok = f.functions.iter().all(|c| {
                cat.funcs.get(c).is_some_and(|fi| fi.immutable) || (policy && policy_function(c))
            });
            let ops_ok = !f.operators.iter().any(|o| cat.volatile_ops.contains(o));
            // A policy may use CURRENT_USER (the role is in every key); a view may not use
            // CURRENT_TIMESTAMP and the like.
            let shape_ok = policy || f.cacheable_shape;
            info.cacheable &= f.parsed && funcs_ok && ops_ok && shape_ok && !f.writes.any();
            for r in f.reads {
                if !f.ctes.contains(&r.name) || nodes.contains_key(&r.name) {
                    stack.push(r.name);
                }
            }
        }
    }
    // Writes: everything reachable through partitions, cascades, view bases, triggers.
    let mut seen = HashSet::new();
    let mut stack = vec![name.to_string()];
    while let Some(n) = stack.pop() {
        if !seen.insert(n.clone()) {
            continue;
        }
        info.writes.push(Arc::from(n.as_str()));
        let Some(node) = nodes.get(&n) else { continue };
        info.writes_all |= node.rule;
        stack.extend(node.also.iter().cloned());
        for t in &node.triggers {
            match cat.funcs.get(t) {
                Some(f) => {
                    info.writes_all |= f.writes_all;
                    stack.extend(f.writes.iter().map(|w| w.to_string()));
                }
                None => info.writes_all = true,
            }
        }
    }
    info
}

/// Functions a row-level security policy may use without making results unsafe to cache: they
/// depend on the role and settings, which are part of every key.
fn policy_function(name: &str) -> bool {
    matches!(name, "current_setting" | "current_user" | "session_user")
}

/// A catalog from rows shaped like the catalog queries' results (for tests).
#[cfg(test)]
pub fn from_rows(
    relations: &[[&str; 5]],
    links: [&[[&str; 2]]; 3],
    rules: &[&str],
    policies: &[[&str; 3]],
    functions: &[[&str; 5]],
) -> Catalog {
    let rows = |v: Vec<Vec<&str>>| -> Rows {
        v.into_iter()
            .map(|r| {
                r.into_iter()
                    .map(|c| (!c.is_empty()).then(|| c.to_string()))
                    .collect()
            })
            .collect()
    };
    let [inherits, cascades, triggers] = links;
    Raw {
        relations: rows(relations.iter().map(|r| r.to_vec()).collect()),
        inherits: rows(inherits.iter().map(|r| r.to_vec()).collect()),
        cascades: rows(cascades.iter().map(|r| r.to_vec()).collect()),
        triggers: rows(triggers.iter().map(|r| r.to_vec()).collect()),
        rules: rows(rules.iter().map(|r| vec![*r]).collect()),
        policies: rows(policies.iter().map(|r| r.to_vec()).collect()),
        functions: rows(functions.iter().map(|r| r.to_vec()).collect()),
        volatile_ops: rows(vec![vec!["=%="]]),
        isolation: rows(vec![vec!["read committed"]]),
    }
    .build()
}
