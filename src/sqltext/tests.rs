use super::*;

fn shape_of(s: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    shape(s, &mut h, Blind::All);
    h.finish()
}

#[test]
fn hashing_in_blocks_gives_the_same_value() {
    let long = format!(
        "SELECT {} FROM t WHERE x = 'a''b' -- c",
        "col, ".repeat(200)
    );
    for sql in ["", "select 1", long.as_str()] {
        for blind in [Blind::All, Blind::Numbers] {
            let mut direct = std::collections::hash_map::DefaultHasher::new();
            shape(sql, &mut direct, blind);
            let blocks = shape_hash(sql, std::collections::hash_map::DefaultHasher::new(), blind);
            assert_eq!(blocks, direct.finish(), "{sql}");
        }
    }
}

#[test]
fn a_shapes_hash_depends_on_its_bytes_only() {
    // foldhash's `write` is not split-blind: the blocks make it so. Texts of one shape
    // whose pieces come in different runs (spacing, tokens over a block long) hash alike.
    use std::hash::BuildHasher;
    let seed = foldhash::fast::FixedState::with_seed(7);
    let long = "x".repeat(300);
    let texts = [
        (
            format!("SELECT {long}  FROM t"),
            format!("SELECT {long} FROM  t"),
        ),
        (format!("SELECT a,{long} -- c"), format!("SELECT  a,{long}")),
        (
            "SELECT 'a''b', 1".to_string(),
            "SELECT\n'zz',  22".to_string(),
        ),
    ];
    for (a, b) in &texts {
        let shape_bytes = |s: &str| {
            let mut c = Collect(Vec::new());
            shape(s, &mut c, Blind::All);
            c.0
        };
        assert_eq!(shape_bytes(a), shape_bytes(b), "{a} / {b}");
        let ha = shape_hash(a, seed.build_hasher(), Blind::All);
        let hb = shape_hash(b, seed.build_hasher(), Blind::All);
        assert_eq!(ha, hb, "{a} / {b}");
    }
}

#[test]
fn shapes_keep_the_text_but_spacing_and_blanked_parts() {
    let bytes = |s: &str, blind| {
        let mut c = Collect(Vec::new());
        shape(s, &mut c, blind);
        c.0
    };
    for (sql, all, numbers) in [
        ("a -- c\nb", "a b", "a -- c b"),
        ("a--c", "a", "a --c"),
        ("  x\n=  1;", " x = #;", " x = \0;"),
        (
            "f('s', $$d$$, /* k */ 2.5)",
            "f(?, ?, #)",
            "f('s', $$d$$, /* k */ \0)",
        ),
        ("t1 \"Q 1\" $1", "t1 \"Q 1\" $1", "t1 \"Q 1\" $1"),
    ] {
        assert_eq!(bytes(sql, Blind::All), all.as_bytes(), "{sql:?}");
        assert_eq!(bytes(sql, Blind::Numbers), numbers.as_bytes(), "{sql:?}");
    }
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
fn plan_keys_blank_numbers_only() {
    let k = plan_key("SELECT abalance FROM pgbench_accounts WHERE aid = 12;");
    assert_eq!(k, b"SELECT abalance FROM pgbench_accounts WHERE aid = \0;");
    assert_eq!(
        k,
        plan_key("SELECT abalance  FROM pgbench_accounts\nWHERE aid = 99817;")
    );
    // Strings, comments (hints), parameters and identifiers with digits stay.
    for (a, b) in [
        (
            "SELECT * FROM t WHERE d = 'now'",
            "SELECT * FROM t WHERE d = '2024-01-01'",
        ),
        (
            "SELECT /* pgcache: ttl=30s */ 1",
            "SELECT /* pgcache: ttl=60s */ 1",
        ),
        ("SELECT 1 -- pgcache: nocache", "SELECT 1"),
        ("SELECT $1", "SELECT $2"),
        ("SELECT * FROM t1", "SELECT * FROM t2"),
        ("SELECT $q$ 1 $q$", "SELECT $q$ 2 $q$"),
        ("SELECT E'\\' 1'", "SELECT E'\\' 2'"),
        ("SELECT a # b", "SELECT a 5 b"),
    ] {
        assert_ne!(plan_key(a), plan_key(b), "{a} / {b}");
    }
    assert_eq!(plan_key("SELECT 1.5, 1_000"), plan_key("SELECT 2, 7"));
    assert_ne!(plan_key("SELECT 1FROM t"), plan_key("SELECT 1 t"));
    assert_eq!(
        plan_key("SELECT 'é', \"ü\" FROM t"),
        "SELECT 'é', \"ü\" FROM t".as_bytes()
    );
}

#[test]
fn same_plan_key_finds_new_numbers_in_the_same_text() {
    let t = "SELECT abalance FROM pgbench_accounts WHERE aid = 12;";
    let spans = number_spans(t);
    assert_eq!(spans, [(50, 52)]);
    for n in ["1", "12", "99817", "1.5", "3_000"] {
        let sql = t.replace("12", n);
        assert!(same_plan_key(t, &spans, sql.as_bytes()), "{sql}");
    }
    // Not another text, nor the same one spaced differently (the memo finds that).
    for sql in [
        "SELECT abalance FROM pgbench_accounts WHERE aid = 12",
        "SELECT abalance FROM pgbench_accounts WHERE aid = x;",
        "SELECT abalance FROM pgbench_accounts WHERE aid = ;",
        "SELECT abalance FROM pgbench_accounts WHERE aid = 1e5;",
        "SELECT abalance FROM pgbench_accounts WHERE aid = 12; DROP TABLE t",
        "SELECT abalance  FROM pgbench_accounts WHERE aid = 12;",
    ] {
        assert!(!same_plan_key(t, &spans, sql.as_bytes()), "{sql}");
    }
}

/// The claim `same_plan_key` rests on, over random texts made of the bytes that steer the
/// scan: whenever it says yes, the two keys are equal, and so are the two shapes.
#[test]
fn same_plan_key_never_says_yes_for_another_key() {
    use rand::{Rng, SeedableRng};
    const PIECES: &[&str] = &[
        "1", "23", "4.5", "_", ".", "a", "E", "e", "x1", " ", "\n", "\r", "--", "/*", "*/", "'",
        "''", "\"", "$", "$$", "$q$", "\\", ",", ";", "-", "*", "/", "é",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut yes, mut checked) = (0, 0);
    for _ in 0..100_000 {
        let text: String = (0..rng.random_range(1..10))
            .map(|_| PIECES[rng.random_range(0..PIECES.len())])
            .collect();
        let spans = number_spans(&text);
        // Another text: some numbers changed, or a piece put in somewhere.
        let other = with_new_numbers(&mut rng, &text, &spans, 0.5, 0.3, PIECES);
        checked += 1;
        // The shape scan finds the numbers where `number_spans` does, whatever it blanks.
        let mut noted = vec![(0, 0)];
        for blind in [Blind::All, Blind::Numbers] {
            let h = std::collections::hash_map::DefaultHasher::new();
            shape_hash_and_numbers(&text, h, blind, &mut noted);
            assert_eq!(noted, spans, "{text:?}");
        }
        if same_plan_key(&text, &spans, other.as_bytes()) {
            yes += 1;
            assert_eq!(plan_key(&text), plan_key(&other), "{text:?} / {other:?}");
            // Insight's fingerprint memo key too (`session::insight::LastQuery`).
            assert_eq!(shape_of(&text), shape_of(&other), "{text:?} / {other:?}");
        }
    }
    assert!(yes > checked / 2, "{yes} of {checked}");
}

/// `text` (whose numbers are at `spans`) with each number kept with probability `keep` and
/// otherwise replaced by another number, then with probability `insert` one of `pieces` put in
/// somewhere: a text `same_plan_key` should mostly, but not always, match (property tests here
/// and in `analysis`).
pub(crate) fn with_new_numbers(
    rng: &mut rand::rngs::StdRng,
    text: &str,
    spans: &[(usize, usize)],
    keep: f64,
    insert: f64,
    pieces: &[&str],
) -> String {
    use rand::Rng;
    let mut other = String::new();
    let mut at = 0;
    for &(s, e) in spans {
        other.push_str(&text[at..s]);
        if rng.random_bool(keep) {
            other.push_str(&text[s..e]);
        } else {
            other.push_str(["7", "88", "9.9", "0_1", "5"][rng.random_range(0..5)]);
        }
        at = e;
    }
    other.push_str(&text[at..]);
    if rng.random_bool(insert) {
        let mut cut = rng.random_range(0..=other.len());
        while !other.is_char_boundary(cut) {
            cut -= 1;
        }
        other.insert_str(cut, pieces[rng.random_range(0..pieces.len())]);
    }
    other
}
