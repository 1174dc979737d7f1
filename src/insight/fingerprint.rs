//! Statement text → fingerprint (pg_query's, the same for every text that differs only in
//! constants) and normalized text (`$n` in place of constants), memoized.
//!
//! pg_query costs ~10 µs per text, and simple-protocol clients send a new text for every new
//! constant. So the memo is keyed by the text's *shape*: a quick scan that blanks out literals
//! and comments. Texts of one shape are fingerprinted once, from the first of them.

use crate::sqltext::Blind;
use lru::LruCache;
use std::hash::BuildHasher;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

/// What kind of statement, for the repeated-statement detector's advice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Select,
    Insert,
    Update,
    Delete,
    /// BEGIN, COMMIT, SET...: neither counted nor breaking a run.
    Utility,
    Other,
}

#[derive(Debug)]
pub struct Fingerprint {
    pub id: u64,
    /// Normalized text: constants replaced by `$n`, never the values themselves.
    pub text: Arc<str>,
    pub kind: Kind,
    /// Statements in the text (simple protocol may send several).
    pub statements: usize,
}

impl Fingerprint {
    pub fn hex(&self) -> String {
        format!("{:016x}", self.id)
    }
}

const SHAPE_MEMO: usize = 8192;

pub struct Memo {
    shapes: Mutex<LruCache<u64, Arc<Fingerprint>>>,
    /// Seeded per process. Keys are only hashes: two shapes that collide share a fingerprint
    /// (insight's figures, never results), so a quality 64-bit hash is enough.
    hasher: foldhash::quality::RandomState,
}

impl Default for Memo {
    fn default() -> Self {
        Memo {
            shapes: Mutex::new(LruCache::new(
                NonZeroUsize::new(SHAPE_MEMO).unwrap_or(NonZeroUsize::MIN),
            )),
            hasher: Default::default(),
        }
    }
}

impl Memo {
    pub fn get(&self, sql: &str) -> Arc<Fingerprint> {
        let h = self.hasher.build_hasher();
        self.get_by_shape(sql, crate::sqltext::shape_hash(sql, h, Blind::All))
    }

    /// `get`, noting where `sql`'s numbers are in `numbers` (from the same scan): a text that
    /// differs from `sql` only in numbers (`sqltext::same_plan_key`) has its fingerprint.
    pub fn get_noting_numbers(
        &self,
        sql: &str,
        numbers: &mut Vec<(usize, usize)>,
    ) -> Arc<Fingerprint> {
        let h = self.hasher.build_hasher();
        let key = crate::sqltext::shape_hash_and_numbers(sql, h, Blind::All, numbers);
        self.get_by_shape(sql, key)
    }

    fn get_by_shape(&self, sql: &str, key: u64) -> Arc<Fingerprint> {
        if let Some(f) = self.lock().get(&key) {
            return f.clone();
        }
        let f = Arc::new(compute(sql));
        self.lock().put(key, f.clone());
        f
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<u64, Arc<Fingerprint>>> {
        self.shapes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn compute(sql: &str) -> Fingerprint {
    // The options the cache uses too: `INVALIDATE FINGERPRINT` takes what `SHOW QUERIES` shows.
    let fp = pg_query::fingerprint(
        sql,
        pg_query::ParserOptions::DEFAULT,
        pg_query::FingerprintOptions::default(),
    );
    let normalized = pg_query::normalize(sql);
    match (fp, normalized) {
        (Ok(fp), Ok(text)) => {
            let statements = pg_query::split_with_parser(sql)
                .map(|v| v.len())
                .unwrap_or(1);
            Fingerprint {
                id: fp.value,
                kind: kind_of(&text),
                text: Arc::from(text.trim()),
                statements,
            }
        }
        // The server will reject it too; one bucket for all of them (their text may hold
        // anything, so it is not kept).
        _ => Fingerprint {
            id: 0,
            text: Arc::from("(statement the parser rejects)"),
            kind: Kind::Other,
            statements: 1,
        },
    }
}

fn kind_of(normalized: &str) -> Kind {
    let word: String = normalized
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase();
    match word.as_str() {
        "SELECT" | "VALUES" | "TABLE" | "WITH" => Kind::Select,
        "INSERT" => Kind::Insert,
        "UPDATE" => Kind::Update,
        "DELETE" => Kind::Delete,
        "BEGIN" | "START" | "COMMIT" | "END" | "ROLLBACK" | "SAVEPOINT" | "RELEASE" | "SET"
        | "RESET" | "SHOW" | "DISCARD" | "DEALLOCATE" | "PREPARE" => Kind::Utility,
        _ => Kind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_fingerprint_for_texts_that_differ_in_constants() {
        let m = Memo::default();
        let a = m.get("SELECT * FROM t WHERE id = 1");
        let b = m.get("SELECT * FROM t WHERE id = 2");
        assert_eq!(a.id, b.id);
        assert_eq!(&*a.text, "SELECT * FROM t WHERE id = $1");
        assert_eq!(a.kind, Kind::Select);
        // Same fingerprint from a different shape: pg_query decides, the memo only saves work.
        let c = m.get("select *   from t where id=$1");
        assert_eq!(a.id, c.id);
        let bad = m.get("SELEC 1");
        assert_eq!(bad.id, 0);
        assert_eq!(m.get("INSERT INTO t VALUES (1)").kind, Kind::Insert);
        assert_eq!(m.get("BEGIN").kind, Kind::Utility);
        assert_eq!(m.get("SELECT 1; SELECT 2").statements, 2);
    }
}
