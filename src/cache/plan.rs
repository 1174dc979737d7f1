//! A statement's plan: its facts (`sql`) read against the catalog and the rules. Made once per
//! statement text and database, again whenever the catalog or the rules change.

use super::catalog::Catalog;
use super::glob_match;
use super::sql::{Rel, SqlFacts, TxControl};
use crate::config::CacheConfig;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Plan {
    pub generation: u64,
    /// A read the cache may answer and fill.
    pub cacheable: bool,
    /// Relations whose versions the result depends on.
    pub deps: Box<[Arc<str>]>,
    pub ttl: Duration,
    /// Results are the same for every role.
    pub shared: bool,
    /// May be served inside a read-only read-committed transaction.
    pub in_transaction: bool,
    /// Relations the statement may write, with everything those writes reach.
    pub writes: Box<[Arc<str>]>,
    pub writes_all: bool,
    /// Changes the catalog: read it again after.
    pub ddl: bool,
    /// May change session settings the proxy cannot see (`set_config`, functions that `SET`).
    pub sets: bool,
    pub tx: Option<TxControl>,
    pub fingerprint: Arc<str>,
    /// The text it was made for, and where its numbers are: a session whose next statement
    /// differs from it only in numbers has the same plan (`sqltext::same_plan_key`).
    pub text: Box<str>,
    pub numbers: Box<[(usize, usize)]>,
    /// Query insight's fingerprint of the statement, made when insight first needs it (every
    /// text a plan serves differs only in numbers, which insight's fingerprint ignores too).
    pub insight: OnceLock<Arc<crate::insight::fingerprint::Fingerprint>>,
}

impl Plan {
    pub fn writes(&self) -> bool {
        self.writes_all || self.ddl || !self.writes.is_empty()
    }

    pub fn new(
        f: &SqlFacts,
        catalog: Option<&Catalog>,
        config: &CacheConfig,
        generation: u64,
    ) -> Plan {
        let mut p = Plan {
            generation,
            tx: f.tx,
            ddl: f.writes.ddl,
            writes_all: f.writes.all,
            sets: f.sets || f.functions.iter().any(|n| n == "set_config"),
            fingerprint: f.fingerprint.as_str().into(),
            ..Plan::default()
        };
        let Some(cat) = catalog else {
            // Without the catalog nothing is known: a write may reach anything, a function
            // may change settings, and nothing is cacheable.
            p.writes_all |= f.writes.any();
            p.sets |= !f.functions.is_empty();
            return p;
        };
        let mut writes: Vec<Arc<str>> = Vec::new();
        for r in &f.writes.rels {
            match cat.rels.get(&r.name) {
                Some(info) => {
                    p.writes_all |= info.writes_all;
                    writes.extend(info.writes.iter().cloned());
                }
                // Created after the catalog was read: itself only (DDL made the catalog stale).
                None => writes.push(Arc::from(r.name.as_str())),
            }
        }
        let mut functions_immutable = true;
        for name in &f.functions {
            match cat.funcs.get(name) {
                Some(fi) => {
                    functions_immutable &= fi.immutable;
                    p.writes_all |= fi.writes_all;
                    p.sets |= fi.sets;
                    writes.extend(fi.writes.iter().flat_map(|w| {
                        cat.rels
                            .get(w.as_ref())
                            .map_or_else(|| vec![w.clone()], |i| i.writes.clone())
                    }));
                }
                None => {
                    functions_immutable = false;
                    p.writes_all = true;
                    p.sets = true;
                }
            }
        }
        writes.sort();
        writes.dedup();
        p.writes = writes.into();
        let ops_ok = !f.operators.iter().any(|o| cat.volatile_ops.contains(o));
        if !(f.cacheable_shape && functions_immutable && ops_ok) || f.hint.nocache || p.writes() {
            return p;
        }
        // Every relation read must be known and cacheable, and matched by a rule.
        let mut deps: Vec<Arc<str>> = Vec::new();
        let (mut ttl, mut shared, mut in_tx) = (None::<Duration>, true, true);
        let mut any = false;
        for r in &f.reads {
            let cte = f.ctes.contains(&r.name) && r.schema.is_none();
            let Some(info) = cat.rels.get(&r.name) else {
                if cte {
                    continue;
                }
                return p;
            };
            if !info.cacheable {
                return p;
            }
            let Some(rule) = config
                .rules
                .iter()
                .find(|rule| matches_rule(&rule.tables, r))
            else {
                return p;
            };
            any = true;
            let t = rule.ttl.unwrap_or(config.default_ttl);
            ttl = Some(ttl.map_or(t, |x| x.min(t)));
            shared &= rule.shared && !info.rls;
            in_tx &= rule.in_transaction;
            deps.extend(info.reads.iter().cloned());
        }
        if !any {
            return p; // no relation: no rule covers it
        }
        deps.sort();
        deps.dedup();
        p.deps = deps.into();
        p.ttl = f.hint.ttl.or(ttl).unwrap_or(config.default_ttl);
        p.shared = shared;
        p.in_transaction = in_tx;
        p.cacheable = true;
        p
    }
}

/// A rule glob without a dot matches the bare name; one with a dot matches `schema.name`, an
/// unqualified name being taken as `public.name`.
fn matches_rule(globs: &[String], r: &Rel) -> bool {
    globs.iter().any(|g| {
        if g.contains('.') {
            let q = format!("{}.{}", r.schema.as_deref().unwrap_or("public"), r.name);
            glob_match(g, &q)
        } else {
            glob_match(g, &r.name)
        }
    })
}
