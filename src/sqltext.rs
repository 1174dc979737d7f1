//! Literal-blind views of SQL text, from one quick scan (no parse): the *shape* insight keys its
//! fingerprint memo by (every constant and comment blanked out), and the *plan key* the cache
//! keys its plan memo by (only numbers blanked out). Simple-protocol clients send a new text for
//! every new constant; these keep such texts to one pg_query parse.

use std::hash::Hasher;

/// What a shape leaves out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blind {
    /// Every constant (numbers, strings, dollar-quoted) and comment: one shape per fingerprint.
    All,
    /// Only numeric constants. String constants stay (`'now'::timestamptz` is not cacheable, a
    /// date is) and so do comments (`/* pgcache: ttl=30s */`).
    Numbers,
}

/// The cache plan memo's key: `sql` with every numeric constant replaced by a NUL (which no
/// statement text can hold, so a key never equals another statement's text) and whitespace
/// runs collapsed. Texts with one key have the same plan: what a statement reads and writes,
/// whether it may be cached and for how long do not depend on the value of a number in it.
/// Bytes, not a `str`: the memo only compares keys, and checking UTF-8 again cost a tenth of
/// making one.
pub fn plan_key(sql: &str) -> Vec<u8> {
    let mut out = Collect(Vec::with_capacity(sql.len()));
    shape(sql, &mut out, Blind::Numbers);
    out.0
}

/// The hash of `sql`'s shape. The shape reaches `h` in `BLOCK`-byte blocks, so the hasher pays
/// its per-call cost once per block, and the value depends only on the shape's bytes, not on
/// how the scan happened to split them (which a hasher's `write` may not ignore).
pub fn shape_hash<H: Hasher>(sql: &str, h: H, blind: Blind) -> u64 {
    hash_noting(sql, h, blind, None)
}

/// `shape_hash`, and where `sql`'s numbers are (into `numbers`, cleared first; as
/// `number_spans` finds them, for either `blind`: what a byte is does not depend on it).
pub fn shape_hash_and_numbers<H: Hasher>(
    sql: &str,
    h: H,
    blind: Blind,
    numbers: &mut Vec<(usize, usize)>,
) -> u64 {
    numbers.clear();
    hash_noting(sql, h, blind, Some(numbers))
}

fn hash_noting<H: Hasher>(
    sql: &str,
    h: H,
    blind: Blind,
    numbers: Option<&mut Vec<(usize, usize)>>,
) -> u64 {
    let mut b = Blocks {
        h,
        buf: [0; BLOCK],
        len: 0,
    };
    scan(sql, &mut b, blind, numbers);
    b.flush();
    b.h.finish()
}

const BLOCK: usize = 128;

/// Gathers writes into `BLOCK`-byte blocks for `h`.
struct Blocks<H> {
    h: H,
    buf: [u8; BLOCK],
    len: usize,
}

impl<H: Hasher> Blocks<H> {
    fn flush(&mut self) {
        self.h.write(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl<H: Hasher> Hasher for Blocks<H> {
    /// Of what was flushed only: `shape_hash` flushes before it finishes.
    fn finish(&self) -> u64 {
        self.h.finish()
    }
    fn write(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.len == BLOCK {
                self.flush();
            }
            let n = (BLOCK - self.len).min(bytes.len());
            self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            bytes = &bytes[n..];
        }
    }
    fn write_u8(&mut self, b: u8) {
        if self.len == BLOCK {
            self.flush();
        }
        self.buf[self.len] = b;
        self.len += 1;
    }
}

/// Byte classes for the scans here and in `analysis`: one table lookup instead of a chain of
/// comparisons per byte.
pub const SPACE: u8 = 1;
/// Letters, digits and `_`.
pub const ALNUM: u8 = 2;
/// What continues an identifier in a shape: `ALNUM`, `$` and every non-ASCII byte.
pub const WORD: u8 = 4;

const CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        if c.is_ascii_whitespace() {
            t[i] |= SPACE;
        }
        if c.is_ascii_alphanumeric() || c == b'_' {
            t[i] |= ALNUM | WORD;
        }
        if c == b'$' || c >= 0x80 {
            t[i] |= WORD;
        }
        i += 1;
    }
    t
};

/// Whether byte `c` is in `class` (`SPACE`, `ALNUM`, `WORD`, or several of them or'ed).
pub fn is(c: u8, class: u8) -> bool {
    CLASS[c as usize] & class != 0
}

/// A `Hasher` that keeps what it is fed.
struct Collect(Vec<u8>);

impl Hasher for Collect {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
}

/// The shape on its way to a `Hasher`: most of a shape is the text itself, so what the scan
/// emits is kept as one pending run of the input while it is (each piece it adds is checked to
/// be the next input byte or range) and written in one go. The bytes reaching `h` are exactly
/// those emitted, in order; only the number of `write` calls drops (from one per token).
struct Out<'a, H: Hasher> {
    b: &'a [u8],
    h: &'a mut H,
    /// The pending run, `b[start..end]`.
    start: usize,
    end: usize,
}

impl<H: Hasher> Out<'_, H> {
    /// Emit `b[s..e]`.
    #[inline(always)]
    fn copy(&mut self, s: usize, e: usize) {
        if s != self.end {
            self.flush();
            self.start = s;
        }
        self.end = e;
    }

    /// Emit `x`, which stands at index `at` of the input when the shape keeps it as it is.
    #[inline(always)]
    fn byte(&mut self, x: u8, at: usize) {
        if self.b.get(at) == Some(&x) {
            self.copy(at, at + 1);
        } else {
            self.flush();
            self.h.write_u8(x);
        }
    }

    fn flush(&mut self) {
        if self.end > self.start {
            self.h.write(&self.b[self.start..self.end]);
        }
        self.start = self.end;
    }
}

/// Feed `sql` to `h` with whitespace runs collapsed and what `blind` says blanked out.
/// Identifiers (quoted or not) and keywords stay: `t1` and `t2` are different shapes.
pub fn shape(sql: &str, h: &mut impl Hasher, blind: Blind) {
    scan(sql, h, blind, None);
}

/// Where `sql`'s numeric constants are (start and end of each, in order): what
/// `same_plan_key` compares another text against.
pub fn number_spans(sql: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    scan(
        sql,
        &mut Collect(Vec::new()),
        Blind::Numbers,
        Some(&mut spans),
    );
    spans
}

/// Whether `sql` has the plan key of `text`, whose numbers are at `spans`
/// (`number_spans(text)`), without making either key: every byte between the numbers is the
/// same and a number stands where each of `text`'s does. A repeated statement with new numbers
/// (a simple-protocol client's) is recognised with a few comparisons where its key takes a
/// scan. It may say no for texts with one key (spaced differently): the memo finds those.
/// `sql` is bytes, unchecked: a yes means it is UTF-8 (`text`'s pieces cut at ASCII bytes, and
/// ASCII digits).
///
/// Why a yes is right: the scan decides what a byte is from the bytes before it, and from
/// bytes after it only within the token it is in; up to the first number both texts are the
/// same, so the scan is in the same state there; a digit in that state starts a number in
/// either text, which ends at the first byte that cannot continue one, and after it the scan
/// is in the same state again. (A token that looks ahead past a number — a dollar quote
/// looking for its end — holds no number in `text`, so what it looks at is the same bytes.)
pub fn same_plan_key(text: &str, spans: &[(usize, usize)], sql: &[u8]) -> bool {
    let (t, n) = (text.as_bytes(), sql);
    let (mut ti, mut ni) = (0, 0);
    for &(start, end) in spans {
        let between = &t[ti..start];
        if n.get(ni..ni + between.len()) != Some(between) {
            return false;
        }
        ni += between.len();
        if !n.get(ni).is_some_and(u8::is_ascii_digit) {
            return false;
        }
        while ni < n.len() && continues_number(n[ni]) {
            ni += 1;
        }
        ti = end;
    }
    t[ti..] == n[ni..]
}

/// What a numeric constant goes on with after its first digit: digits, points and
/// separators. Letters after them (an exponent, a hex prefix, `1FROM`) are kept as words, so
/// no two differently read texts meet.
fn continues_number(c: u8) -> bool {
    c.is_ascii_digit() || c == b'.' || c == b'_'
}

/// `shape`, noting where the numbers are in `numbers` when given.
fn scan(
    sql: &str,
    h: &mut impl Hasher,
    blind: Blind,
    mut numbers: Option<&mut Vec<(usize, usize)>>,
) {
    let all = blind == Blind::All;
    let b = sql.as_bytes();
    let mut out = Out {
        b,
        h,
        start: 0,
        end: 0,
    };
    // A string constant `b[s..e]`: its text, or `?` when every constant is blanked out.
    let constant = |out: &mut Out<_>, s: usize, e: usize| {
        if all {
            out.byte(b'?', s)
        } else {
            out.copy(s, e)
        }
    };
    let mut i = 0;
    let mut space = false;
    while i < b.len() {
        let c = b[i];
        let ident = |c: u8| is(c, WORD);
        let next = b.get(i + 1).copied();
        if is(c, SPACE) {
            space = true;
            i += 1;
            continue;
        }
        // Comments count as whitespace (unless kept: hints live in them).
        if c == b'-' && next == Some(b'-') {
            // To the end of the line, which a carriage return ends too.
            let start = i;
            while i < b.len() && b[i] != b'\n' && b[i] != b'\r' {
                i += 1;
            }
            if !all {
                out.byte(b' ', start.wrapping_sub(1));
                out.copy(start, i);
            }
            space = true;
            continue;
        }
        if space && !(all && c == b'/' && next == Some(b'*')) {
            // A single space in the text stays part of the pending run.
            out.byte(b' ', i - 1);
            space = false;
        }
        match c {
            b'/' if next == Some(b'*') => {
                // Comments nest in PostgreSQL.
                let start = i;
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
                if !all {
                    out.copy(start, i);
                }
                space = true;
            }
            b'\'' => {
                let escapes = i > 0 && matches!(b[i - 1], b'e' | b'E');
                let start = i;
                i = skip_quoted(b, i, b'\'', escapes);
                constant(&mut out, start, i);
            }
            b'"' => {
                let end = skip_quoted(b, i, b'"', false);
                out.copy(i, end);
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
                        let start = i;
                        i = close.map_or(b.len(), |p| body + p + tag.len());
                        constant(&mut out, start, i);
                    }
                    _ => {
                        out.byte(c, i);
                        i += 1;
                    }
                }
            }
            b'0'..=b'9' => {
                let start = i;
                while i < b.len() && continues_number(b[i]) {
                    i += 1;
                }
                if let Some(n) = numbers.as_deref_mut() {
                    n.push((start, i));
                }
                out.byte(if all { b'#' } else { 0 }, start);
            }
            c if ident(c) => {
                let start = i;
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
                out.copy(start, i);
            }
            _ => {
                out.byte(c, i);
                i += 1;
            }
        }
    }
    out.flush();
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
pub(crate) mod tests;
