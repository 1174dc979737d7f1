//! Microbenchmarks of the hot path, without a database (criterion): walking frames, building a
//! cache key, the L1 lookup (hit, miss, stale), the statement memos (pooling analysis and cache
//! plan) and fingerprinting. `cargo bench --bench hotpath`; a regression here shows before the
//! end-to-end benchmark (`benches/compare.sh`) is run. The inputs are what `pgbench -S` sends
//! and receives.

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pgcache::hot::{
    entry_key, number_spans, same_plan_key, settings_sig, Analyzer, Fingerprints, Scanner, L1,
};
use std::collections::BTreeMap;
use std::hint::black_box;

const SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;";

fn frame(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_i32(body.len() as i32 + 4);
    out.put_slice(body);
}

/// The server's reply to a pgbench -S Execute: BindComplete, RowDescription, `rows` DataRows,
/// CommandComplete, ReadyForQuery.
fn reply(rows: usize) -> Bytes {
    let mut out = BytesMut::new();
    frame(&mut out, b'2', b"");
    let mut desc = Vec::new();
    desc.extend_from_slice(&1i16.to_be_bytes());
    desc.extend_from_slice(b"abalance\0");
    desc.extend_from_slice(&[
        0, 0, 64, 1, 0, 3, 0, 0, 0, 23, 0, 4, 255, 255, 255, 255, 0, 0,
    ]);
    frame(&mut out, b'T', &desc);
    for i in 0..rows {
        let v = format!("{}", i * 7919);
        let mut row = Vec::new();
        row.extend_from_slice(&1i16.to_be_bytes());
        row.extend_from_slice(&(v.len() as i32).to_be_bytes());
        row.extend_from_slice(v.as_bytes());
        frame(&mut out, b'D', &row);
    }
    frame(&mut out, b'C', format!("SELECT {rows}\0").as_bytes());
    frame(&mut out, b'Z', b"I");
    out.freeze()
}

/// Walk every frame of `buf`; `wants` as a session passes it. Returns the frames reported.
fn walk(buf: &[u8], wants: fn(u8) -> bool) -> usize {
    let mut scan = Scanner::new(1 << 30);
    let mut n = 0;
    while let Ok(Some(f)) = scan.next(buf, wants) {
        n += 1;
        black_box(f.start + f.len);
    }
    n
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frames");
    for rows in [1usize, 100] {
        let buf = reply(rows);
        g.throughput(Throughput::Bytes(buf.len() as u64));
        // Tracked: the session looks at every frame but DataRow/CopyData (insight counts rows
        // from CommandComplete); pass-through: only ReadyForQuery and ErrorResponse matter.
        g.bench_function(format!("walk_tracked_{rows}_rows"), |b| {
            b.iter(|| walk(black_box(&buf), |t| t != b'D' && t != b'd'))
        });
        g.bench_function(format!("walk_passthrough_{rows}_rows"), |b| {
            b.iter(|| walk(black_box(&buf), |t| t == b'Z' || t == b'E'))
        });
    }
    g.finish();
}

fn session_settings() -> BTreeMap<String, String> {
    [
        ("application_name", "pgbench"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("extra_float_digits", "3"),
        ("search_path", "\"$user\", public"),
        ("TimeZone", "UTC"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn keys(c: &mut Criterion) {
    let settings = session_settings();
    let sig = settings_sig(settings.iter());
    let param = 4242u32.to_string();
    c.bench_function("key/settings_sig", |b| {
        b.iter(|| settings_sig(black_box(&settings).iter()))
    });
    c.bench_function("key/entry_key", |b| {
        b.iter(|| {
            entry_key(
                "bench",
                "app",
                black_box(&sig),
                &[SELECT.as_bytes(), param.as_bytes(), b"\0\0", b"\0\0"],
            )
        })
    });
}

fn key_for(sig: &[u8], aid: u32) -> Box<[u8]> {
    entry_key(
        "bench",
        "app",
        sig,
        &[SELECT.as_bytes(), aid.to_string().as_bytes()],
    )
}

fn l1(c: &mut Criterion) {
    let sig = settings_sig(session_settings().iter());
    let l1 = L1::new(1_000_000, "pgbench_accounts");
    let row = reply(1);
    for aid in 0..100_000 {
        l1.fill(key_for(&sig, aid), row.clone());
    }
    let hit = key_for(&sig, 4242);
    let miss = key_for(&sig, 4_000_000);
    c.bench_function("l1/hit_of_100k", |b| {
        b.iter(|| assert!(l1.get(black_box(&hit)).is_some()))
    });
    c.bench_function("l1/miss_of_100k", |b| {
        b.iter(|| assert!(l1.get(black_box(&miss)).is_none()))
    });
    // A stale entry is found, checked against the versions and dropped: fill, bump, look up.
    c.bench_function("l1/stale_fill_bump_get", |b| {
        b.iter_batched(
            || key_for(&sig, 7),
            |k| {
                l1.fill(k.clone(), row.clone());
                l1.bump();
                assert!(l1.get(&k).is_none());
            },
            BatchSize::SmallInput,
        )
    });
}

fn memos(c: &mut Criterion) {
    let analyzer = Analyzer::new(10_000);
    // A read the word scan clears without the memo, and a SET that takes the memo's parse.
    c.bench_function("analysis/select_word_scan", |b| {
        b.iter(|| analyzer.analyze(black_box(SELECT)))
    });
    let set = "SET search_path = app, public";
    c.bench_function("analysis/set_memo_hit", |b| {
        b.iter(|| analyzer.analyze(black_box(set)))
    });
    c.bench_function("analysis/parse_uncached", |b| {
        b.iter_batched(
            || Analyzer::new(16),
            |a| a.analyze(black_box(set)),
            BatchSize::SmallInput,
        )
    });
    let l1 = L1::new(16, "pgbench_accounts");
    c.bench_function("plan/memo_hit", |b| b.iter(|| l1.plan(black_box(SELECT))));
    // A simple-protocol client's next statement, a new number in it: found in the memo by its
    // plan key, or (a session's usual case) recognised as its last statement's.
    let mut aid = 0u32;
    let mut next = || {
        aid = aid.wrapping_add(1);
        format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};")
    };
    c.bench_function("plan/new_literal_memo_hit", |b| {
        b.iter_batched(
            &mut next,
            |sql| l1.plan(black_box(&sql)),
            BatchSize::SmallInput,
        )
    });
    let last = "SELECT abalance FROM pgbench_accounts WHERE aid = 1;";
    let spans = number_spans(last);
    c.bench_function("plan/new_literal_same_as_last", |b| {
        b.iter_batched(
            &mut next,
            |sql| same_plan_key(last, &spans, black_box(sql.as_bytes())),
            BatchSize::SmallInput,
        )
    });
}

fn fingerprints(c: &mut Criterion) {
    let memo = Fingerprints::default();
    let mut aid = 0u32;
    // A simple-protocol client: a new literal every time, the same shape.
    c.bench_function("fingerprint/new_literal_memo_hit", |b| {
        b.iter(|| {
            aid = aid.wrapping_add(1);
            let sql = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};");
            memo.get(black_box(&sql))
        })
    });
    c.bench_function("fingerprint/first_sight_parse", |b| {
        b.iter_batched(
            Fingerprints::default,
            |m| m.get(black_box(SELECT)),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, frames, keys, l1, memos, fingerprints);
criterion_main!(benches);
