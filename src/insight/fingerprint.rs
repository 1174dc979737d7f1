//! Statement text → fingerprint (pg_query's, the same for every text that differs only in
//! constants) and normalized text (`$n` in place of constants), memoized.
//!
//! pg_query costs ~10 µs per text, and simple-protocol clients send a new text for every new
//! constant. So the memo is keyed by the text's *shape*: a quick scan that blanks out literals
//! and comments. Texts of one shape are fingerprinted once, from the first of them.

use lru::LruCache;
use std::hash::{BuildHasher, Hasher};
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
    hasher: std::collections::hash_map::RandomState,
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
        let mut h = self.hasher.build_hasher();
        shape(sql, &mut h);
        let key = h.finish();
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

/// Feed `sql` to `h` with literals and comments blanked out and whitespace runs collapsed.
/// Identifiers (quoted or not) and keywords stay: `t1` and `t2` are different shapes.
fn shape(sql: &str, h: &mut impl Hasher) {
    let b = sql.as_bytes();
    let mut i = 0;
    let mut space = false;
    while i < b.len() {
        let c = b[i];
        let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
        let next = b.get(i + 1).copied();
        if c.is_ascii_whitespace() {
            space = true;
            i += 1;
            continue;
        }
        // Comments count as whitespace.
        if c == b'-' && next == Some(b'-') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            space = true;
            continue;
        }
        if space && !(c == b'/' && next == Some(b'*')) {
            h.write_u8(b' ');
            space = false;
        }
        match c {
            b'/' if next == Some(b'*') => {
                // Comments nest in PostgreSQL; hints live in comments and change nothing here.
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                space = true;
            }
            b'\'' => {
                let escapes = i > 0 && matches!(b[i - 1], b'e' | b'E');
                i = skip_quoted(b, i, b'\'', escapes);
                h.write_u8(b'?');
            }
            b'"' => {
                let end = skip_quoted(b, i, b'"', false);
                h.write(&b[i..end]);
                i = end;
            }
            b'$' if next.is_some_and(|n| n == b'$' || n.is_ascii_alphabetic() || n == b'_') => {
                // Dollar quoting: $tag$ ... $tag$.
                let tag_end = b[i + 1..].iter().position(|&x| x == b'$');
                match tag_end {
                    Some(t) if b[i + 1..i + 1 + t].iter().all(|&x| ident(x) && x != b'$') => {
                        let tag = &b[i..i + t + 2];
                        let body = i + t + 2;
                        let close = b[body..].windows(tag.len()).position(|w| w == tag);
                        i = close.map_or(b.len(), |p| body + p + tag.len());
                        h.write_u8(b'?');
                    }
                    _ => {
                        h.write_u8(c);
                        i += 1;
                    }
                }
            }
            b'0'..=b'9' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_')
                {
                    i += 1;
                }
                h.write_u8(b'#');
            }
            c if ident(c) => {
                let start = i;
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
                h.write(&b[start..i]);
            }
            _ => {
                h.write_u8(c);
                i += 1;
            }
        }
    }
}

/// Index just past a quoted run starting at `start` (doubled quotes stay inside; with
/// `escapes`, so do backslash-escaped ones).
fn skip_quoted(b: &[u8], start: usize, q: u8, escapes: bool) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        if escapes && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == q {
            if b.get(i + 1) == Some(&q) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape_of(s: &str) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        shape(s, &mut h);
        h.finish()
    }

    #[test]
    fn shapes_ignore_constants_comments_and_spacing() {
        let a = shape_of("SELECT abalance FROM pgbench_accounts WHERE aid = 12;");
        assert_eq!(
            a,
            shape_of("SELECT abalance  FROM pgbench_accounts\nWHERE aid = 99817;")
        );
        assert_eq!(
            a,
            shape_of("SELECT abalance FROM /* x */ pgbench_accounts WHERE aid = 1; -- c")
        );
        assert_ne!(
            a,
            shape_of("SELECT abalance FROM pgbench_accounts WHERE bid = 12;")
        );
        assert_ne!(
            a,
            shape_of("SELECT abalance FROM pgbench_accounts2 WHERE aid = 12;")
        );
        let s = shape_of("SELECT * FROM t WHERE name = 'it''s' AND x = E'a\\'b'");
        assert_eq!(
            s,
            shape_of("SELECT * FROM t WHERE name = 'other' AND x = E'c'")
        );
        assert_eq!(shape_of("SELECT $q$ a ' b $q$"), shape_of("SELECT $$ z $$"));
        assert_ne!(
            shape_of("SELECT \"a\" FROM t"),
            shape_of("SELECT \"b\" FROM t")
        );
        assert_ne!(shape_of("SELECT $1"), shape_of("SELECT $2"));
    }

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
