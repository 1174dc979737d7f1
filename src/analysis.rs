//! What a statement means for the proxy, from the real PostgreSQL parser (pg_query), memoized per
//! statement text in a bounded LRU: parsing costs tens of microseconds, a memo hit a hash.
//!
//! Today this answers the pooling questions: which session settings a statement changes
//! (`SET`/`RESET`/`DISCARD`) and whether it creates state that only lives on one server connection
//! (`LISTEN`, session advisory locks, SQL `PREPARE`, `WITH HOLD` cursors, temp tables, `LOAD`).
//! Anything the parser rejects is reported as unparsed: the server will say why.

use lru::LruCache;
use pg_query::protobuf::{DiscardMode, VariableSetKind};

mod do_block;
use pg_query::NodeRef;
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

/// A change to session-level settings that outlives the statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEffect {
    /// `SET name ...` (not `SET LOCAL`).
    Set(String),
    /// `RESET name`.
    Reset(String),
    /// `RESET ALL`, `DISCARD ALL`.
    ResetAll,
    /// `DEALLOCATE ALL`, `DISCARD ALL`: server-side prepared statements are gone.
    DeallocateAll,
}

/// State that ties a client to one server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinReason {
    Listen,
    AdvisoryLock,
    SqlPrepare,
    HoldCursor,
    TempTable,
    Load,
    /// `set_config(name, value, is_local)` whose name or `is_local` is not a constant.
    SetConfig,
    /// A backslash in a text while `standard_conforming_strings` is off: the server may read
    /// its strings differently from the parser (which assumes on), so what it does is unknown.
    EscapedStrings,
    /// A `DO` block whose effect on the session cannot be read: another language than
    /// PL/pgSQL, dynamic SQL (`EXECUTE`), or a body the PL/pgSQL parser rejects.
    DoBlock,
    /// A statement whose text is not UTF-8 (a client with another `client_encoding`): the
    /// proxy cannot read what it does to the session.
    NotUtf8,
}

impl fmt::Display for PinReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PinReason::Listen => "LISTEN",
            PinReason::AdvisoryLock => "session-level advisory locks",
            PinReason::SqlPrepare => "SQL-level PREPARE/EXECUTE/DEALLOCATE",
            PinReason::HoldCursor => "cursors WITH HOLD",
            PinReason::TempTable => "temporary tables",
            PinReason::Load => "LOAD",
            PinReason::SetConfig => "set_config() with a computed name or is_local",
            PinReason::EscapedStrings => {
                "backslashes in statements with standard_conforming_strings off"
            }
            PinReason::DoBlock => "DO blocks with dynamic SQL or in another language than PL/pgSQL",
            PinReason::NotUtf8 => "statements whose text is not UTF-8",
        })
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Analysis {
    /// False when pg_query rejected the text.
    pub parsed: bool,
    pub statements: usize,
    pub effects: Vec<SessionEffect>,
    pub pin: Option<PinReason>,
    /// `DEALLOCATE name`: drivers (psycopg) drop protocol-level statements this way.
    pub deallocate: Option<String>,
}

/// Session-level (not transaction-level) advisory lock functions.
const SESSION_LOCK_FUNCTIONS: [&str; 4] = [
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

/// Parse `sql` and work out its effects (no memo; see `Analyzer`).
pub fn analyze(sql: &str) -> Analysis {
    let Ok(parsed) = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT) else {
        return Analysis::default();
    };
    let mut a = Analysis {
        parsed: true,
        statements: parsed.protobuf.stmts.len(),
        ..Analysis::default()
    };
    let mut pin = |r: PinReason| {
        a.pin.get_or_insert(r);
    };
    let mut effects = Vec::new();
    let mut deallocate = None;
    for (node, _depth, _ctx, _) in parsed.protobuf.nodes() {
        match node {
            NodeRef::VariableSetStmt(s) if !s.is_local => {
                match VariableSetKind::try_from(s.kind).unwrap_or(VariableSetKind::Undefined) {
                    VariableSetKind::VarResetAll => effects.push(SessionEffect::ResetAll),
                    VariableSetKind::VarReset => effects.push(SessionEffect::Reset(s.name.clone())),
                    // `SET TRANSACTION ...` / `SET SESSION CHARACTERISTICS` come as "multi":
                    // transaction-scoped or not tracked.
                    VariableSetKind::VarSetMulti if s.name.starts_with("TRANSACTION") => {}
                    _ => effects.push(SessionEffect::Set(s.name.clone())),
                }
            }
            NodeRef::DiscardStmt(d) if d.target == DiscardMode::DiscardAll as i32 => {
                effects.push(SessionEffect::ResetAll);
                effects.push(SessionEffect::DeallocateAll);
            }
            NodeRef::DeallocateStmt(d) if d.isall => effects.push(SessionEffect::DeallocateAll),
            NodeRef::DeallocateStmt(d) => {
                deallocate = Some(d.name.clone());
                pin(PinReason::SqlPrepare)
            }
            NodeRef::PrepareStmt(_) | NodeRef::ExecuteStmt(_) => pin(PinReason::SqlPrepare),
            NodeRef::ListenStmt(_) => pin(PinReason::Listen),
            NodeRef::LoadStmt(_) => pin(PinReason::Load),
            // CURSOR_OPT_HOLD = 0x0020
            NodeRef::DeclareCursorStmt(d) if d.options & 0x20 != 0 => pin(PinReason::HoldCursor),
            NodeRef::CreateStmt(c) if is_temp(c.relation.as_ref()) => pin(PinReason::TempTable),
            NodeRef::CreateTableAsStmt(c)
                if is_temp(c.into.as_ref().and_then(|i| i.rel.as_ref())) =>
            {
                pin(PinReason::TempTable)
            }
            NodeRef::ViewStmt(v) if is_temp(v.view.as_ref()) => pin(PinReason::TempTable),
            NodeRef::CreateSeqStmt(s) if is_temp(s.sequence.as_ref()) => pin(PinReason::TempTable),
            NodeRef::SelectStmt(s)
                if is_temp(s.into_clause.as_ref().and_then(|i| i.rel.as_ref())) =>
            {
                pin(PinReason::TempTable)
            }
            NodeRef::DoStmt(d) => match do_block::effects(d) {
                Ok(inner) => effects.extend(inner),
                Err(reason) => pin(reason),
            },
            NodeRef::FuncCall(f) => {
                let name = f.funcname.last().and_then(|n| match &n.node {
                    Some(pg_query::NodeEnum::String(s)) => Some(s.sval.as_str()),
                    _ => None,
                });
                if name.is_some_and(|n| SESSION_LOCK_FUNCTIONS.contains(&n)) {
                    pin(PinReason::AdvisoryLock);
                }
                // A SET by another name (and the way to set a custom variable for row security).
                if name == Some("set_config") {
                    match set_config_target(f) {
                        Some(Some(guc)) => effects.push(SessionEffect::Set(guc)),
                        Some(None) => {}
                        None => pin(PinReason::SetConfig),
                    }
                }
            }
            _ => {}
        }
    }
    a.effects = effects;
    a.deallocate = deallocate;
    a
}

/// What a `set_config(name, value, is_local)` call sets for the session: `Some(Some(name))`, or
/// `Some(None)` with `is_local` true (it ends with the transaction, like `SET LOCAL`); `None` when
/// the name or `is_local` is not a constant (what it sets cannot be known).
fn set_config_target(f: &pg_query::protobuf::FuncCall) -> Option<Option<String>> {
    use pg_query::protobuf::a_const::Val;
    let constant = |i: usize| match f.args.get(i)?.node.as_ref()? {
        pg_query::NodeEnum::AConst(c) => c.val.as_ref(),
        _ => None,
    };
    match constant(2)? {
        Val::Boolval(b) if b.boolval => Some(None),
        Val::Boolval(_) => match constant(0)? {
            Val::Sval(s) => Some(Some(s.sval.to_ascii_lowercase())),
            _ => None,
        },
        _ => None,
    }
}

fn is_temp(rel: Option<&pg_query::protobuf::RangeVar>) -> bool {
    rel.is_some_and(|r| r.relpersistence == "t" || r.schemaname.starts_with("pg_temp"))
}

/// Keywords that start a statement with a session effect or pin (`SET`, `LISTEN`...), and words
/// that matter anywhere (`TEMP` tables, advisory lock functions). A statement with none of them
/// skips the parser: the scan allocates nothing, and `UPDATE ... SET` (all of pgbench) passes it.
const LEADING_WORDS: [&str; 10] = [
    "set",
    "reset",
    "discard",
    "deallocate",
    "listen",
    "prepare",
    "execute",
    "declare",
    "load",
    "do",
];
const ANYWHERE_WORDS: [&str; 2] = ["temp", "temporary"];
/// Prefixes that matter anywhere: temporary schemas, advisory lock functions, `set_config`.
const ANYWHERE_PREFIXES: [&str; 4] = ["pg_temp", "pg_advisory_", "pg_try_advisory_", "set_config"];

/// The first letters of every word and prefix above (all lowercase): most words of a statement
/// stop at this table. Made from the lists, so a word added there is never filtered out here.
const FIRST_LETTERS: [bool; 256] = first_letters(
    first_letters(first_letters([false; 256], &LEADING_WORDS), &ANYWHERE_WORDS),
    &ANYWHERE_PREFIXES,
);

const fn first_letters(mut table: [bool; 256], words: &[&str]) -> [bool; 256] {
    let mut i = 0;
    while i < words.len() {
        table[words[i].as_bytes()[0] as usize] = true;
        i += 1;
    }
    table
}

fn word_matters(w: &[u8], leading: bool) -> bool {
    let first = w.first().map(u8::to_ascii_lowercase);
    if !first.is_some_and(|c| FIRST_LETTERS[c as usize]) {
        return false;
    }
    let is = |k: &str| w.eq_ignore_ascii_case(k.as_bytes());
    let starts = |p: &str| w.len() >= p.len() && w[..p.len()].eq_ignore_ascii_case(p.as_bytes());
    (leading && LEADING_WORDS.iter().any(|k| is(k)))
        || ANYWHERE_WORDS.iter().any(|k| is(k))
        || ANYWHERE_PREFIXES.iter().any(|p| starts(p))
}

/// Whether `sql` may have a session effect or pin. Skips comments and quoted text; when in doubt
/// (an unterminated quote or comment) says yes.
fn may_touch_session(sql: &str) -> bool {
    use crate::sqltext::{is, ALNUM, SPACE, WORD};
    let b = sql.as_bytes();
    let mut i = 0;
    let mut leading = true;
    let find = |from: usize, pat: &[u8]| {
        b.get(from..)?
            .windows(pat.len())
            .position(|w| w == pat)
            .map(|p| from + p + pat.len())
    };
    while i < b.len() {
        let c = b[i];
        match c {
            b';' => {
                leading = true;
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                // To the end of the line, which a carriage return ends too.
                i = match memchr::memchr2(b'\n', b'\r', &b[i..]) {
                    Some(e) => i + e + 1,
                    None => return false,
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                // Block comments nest: ending one at its first `*/` would read the rest of it
                // as words, and one of them would hide a `SET` right behind it from `leading`.
                let mut depth = 0;
                loop {
                    if i + 1 >= b.len() {
                        return true;
                    }
                    match (b[i], b[i + 1]) {
                        (b'/', b'*') => {
                            depth += 1;
                            i += 2;
                        }
                        (b'*', b'/') => {
                            depth -= 1;
                            i += 2;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => i += 1,
                    }
                }
            }
            b'\'' | b'"' => {
                // Closing quote; a doubled quote inside reads as close-and-reopen, same result.
                // A backslash in a string may escape a quote (`E'\''`, or any string with
                // standard_conforming_strings off): where it ends is the parser's to say.
                match b[i + 1..].iter().position(|&x| x == c) {
                    Some(p) if c == b'\'' && b[i + 1..i + 1 + p].contains(&b'\\') => return true,
                    Some(p) => i += p + 2,
                    None => return true,
                }
                leading = false;
            }
            b'$' => {
                // Dollar quoting: $tag$ ... $tag$ (a parameter like $1 is not a tag).
                let tag_end = b[i + 1..]
                    .iter()
                    .position(|&x| !(x.is_ascii_alphanumeric() || x == b'_'))
                    .map(|p| i + 1 + p);
                match tag_end {
                    Some(e)
                        if b[e] == b'$' && !b[i + 1..e].first().is_some_and(u8::is_ascii_digit) =>
                    {
                        match find(e + 1, &b[i..=e]) {
                            Some(end) => i = end,
                            None => return true,
                        }
                        leading = false;
                    }
                    _ => i += 1,
                }
            }
            c if is(c, ALNUM) || c >= 0x80 => {
                // An identifier or key word goes on over `$` and non-ASCII letters, as in
                // PostgreSQL (`a$b$` is one name, not a name and a dollar quote); a number
                // stops before a `$` (`1$q$...$q$` is a number and a dollar quote).
                let class = if c.is_ascii_digit() { ALNUM } else { WORD };
                let start = i;
                while i < b.len() && is(b[i], class) {
                    i += 1;
                }
                if word_matters(&b[start..i], leading) {
                    return true;
                }
                leading = false;
            }
            c if is(c, SPACE) || c == b'(' => i += 1,
            _ => {
                leading = false;
                i += 1;
            }
        }
    }
    false
}

/// Whether a text that differs from `sql` only in its numbers (`sqltext::same_plan_key`;
/// `numbers` is `sqltext::number_spans(sql)`) gets the pre-scan's answer `sql` gets: yes when
/// each number is a digit run standing alone, neither in a word nor followed by a point. A
/// number `same_plan_key` puts in its place is digits, points and `_`: read here as words that
/// start with a digit or `_` and points, none of which the pre-scan looks for, and each leaves
/// it where a digit run would; inside a quote or comment (where the pre-scan may disagree with
/// `sqltext` on where one ends) digits do not move its end, and a dollar quote's closing tag,
/// the one place they could, would put a word character before the number.
pub fn numbers_stand_alone(sql: &str, numbers: &[(usize, usize)]) -> bool {
    use crate::sqltext::{is, WORD};
    let b = sql.as_bytes();
    numbers.iter().all(|&(start, end)| {
        b[start..end].iter().all(u8::is_ascii_digit)
            && (start == 0 || !is(b[start - 1], WORD))
            && b.get(end).is_none_or(|&c| !is(c, WORD) && c != b'.')
    })
}

/// The memo: one parse per distinct statement text, bounded.
pub struct Analyzer {
    memo: Mutex<LruCache<Box<str>, Arc<Analysis>>>,
}

/// The answer for statements the word scan clears: one statement, no effect, no pin.
static PLAIN: Analysis = Analysis {
    parsed: true,
    statements: 1,
    effects: Vec::new(),
    pin: None,
    deallocate: None,
};

/// What `Analyzer::analyze` found: most statements are plain, and say so without touching a
/// reference count every session shares.
pub enum Analyzed {
    Plain,
    Parsed(Arc<Analysis>),
}

impl std::ops::Deref for Analyzed {
    type Target = Analysis;
    fn deref(&self) -> &Analysis {
        match self {
            Analyzed::Plain => &PLAIN,
            Analyzed::Parsed(a) => a,
        }
    }
}

impl Analyzer {
    pub fn new(capacity: usize) -> Self {
        let cap = NonZeroUsize::new(capacity.max(1)).unwrap_or(NonZeroUsize::MIN);
        Analyzer {
            memo: Mutex::new(LruCache::new(cap)),
        }
    }

    /// Session effects and pins of `sql`.
    pub fn analyze(&self, sql: &str) -> Analyzed {
        if !may_touch_session(sql) {
            return Analyzed::Plain;
        }
        if let Some(a) = self.lock().get(sql) {
            return Analyzed::Parsed(a.clone());
        }
        // Parse outside the lock: other sessions keep hitting the memo meanwhile.
        let a = Arc::new(analyze(sql));
        self.lock().put(sql.into(), a.clone());
        Analyzed::Parsed(a)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<Box<str>, Arc<Analysis>>> {
        self.memo.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests;
