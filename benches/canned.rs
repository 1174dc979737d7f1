//! `canned`: the machine's limit. A tiny PostgreSQL-protocol server on loopback that answers
//! every statement with one canned row, without parsing, planning or storing anything — what
//! pgbench can drive on this machine when the server costs (almost) nothing. compare.sh runs
//! `pgbench -S` against it (*limit*) so the cache-warm figures can be read as a share of it.
//!
//! Speaks just enough of the protocol for pgbench (`-M simple`, `extended`, `prepared`): SSL
//! refused, no authentication, simple `Query`, and `Parse`/`Bind`/`Describe`/`Execute`/`Sync`/
//! `Close`/`Flush`. Every row is one `int4` column whose text is `10` (pgbench reads its scale
//! from `count(*)`). Usage: `canned --port PORT [--spin-ns N]`; runs until killed.
//!
//! `--spin-ns N` makes it busy for N ns (on the CPU, not asleep) before it answers each
//! statement (`Query`, `Execute`): a server a little dearer than nothing, to see how pgbench's
//! tail on this machine moves with the CPU a server spends per statement (benches/README.md,
//! *Profiling*). compare.sh does not use it.

use bytes::{Buf, BufMut, BytesMut};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const VALUE: &[u8] = b"10";

#[tokio::main(flavor = "multi_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let port = args
        .iter()
        .position(|a| a == "--port")
        .and_then(|i| args.get(i + 1))
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or_else(|| {
            eprintln!("usage: canned --port PORT [--spin-ns N]");
            std::process::exit(2)
        });
    let work = match args.iter().position(|a| a == "--spin-ns") {
        None => Duration::ZERO,
        Some(i) => match args.get(i + 1).and_then(|n| n.parse::<u64>().ok()) {
            Some(n) => Duration::from_nanos(n),
            None => {
                eprintln!("canned: --spin-ns needs a number of nanoseconds");
                std::process::exit(2)
            }
        },
    };
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (sock, _) = listener.accept().await?;
        sock.set_nodelay(true)?;
        tokio::spawn(async move {
            let _ = serve(sock, work).await;
        });
    }
}

fn frame(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_u32(body.len() as u32 + 4);
    out.put_slice(body);
}

fn row_description(out: &mut BytesMut) {
    let mut b = BytesMut::new();
    b.put_u16(1);
    b.put_slice(b"abalance\0");
    b.put_u32(0); // table
    b.put_u16(0); // column
    b.put_u32(23); // int4
    b.put_i16(4);
    b.put_i32(-1);
    b.put_u16(0); // text
    frame(out, b'T', &b);
}

fn data_row(out: &mut BytesMut) {
    let mut b = BytesMut::new();
    b.put_u16(1);
    b.put_u32(VALUE.len() as u32);
    b.put_slice(VALUE);
    frame(out, b'D', &b);
}

/// pgbench's start-up check of how `pgbench_accounts` is partitioned: found first on the search
/// path, not partitioned, no partitions.
fn partitions(out: &mut BytesMut) {
    let mut b = BytesMut::new();
    b.put_u16(3);
    for (name, oid) in [(&b"n\0"[..], 23u32), (b"partstrat\0", 18), (b"count\0", 20)] {
        b.put_slice(name);
        b.put_u32(0);
        b.put_u16(0);
        b.put_u32(oid);
        b.put_i16(-1);
        b.put_i32(-1);
        b.put_u16(0);
    }
    frame(out, b'T', &b);
    let mut r = BytesMut::new();
    r.put_u16(3);
    r.put_u32(1);
    r.put_slice(b"1");
    r.put_i32(-1); // NULL: not partitioned
    r.put_u32(1);
    r.put_slice(b"0");
    frame(out, b'D', &r);
    frame(out, b'C', b"SELECT 1\0");
}

/// Stay on the CPU for `d` (`--spin-ns`).
fn spin(d: Duration) {
    if d.is_zero() {
        return;
    }
    let start = Instant::now();
    while start.elapsed() < d {
        std::hint::spin_loop();
    }
}

fn ready(out: &mut BytesMut) {
    frame(out, b'Z', b"I");
}

/// The highest `$n` in a statement: its parameter count.
fn params(sql: &[u8]) -> u16 {
    let mut max = 0u16;
    let mut i = 0;
    while i < sql.len() {
        if sql[i] == b'$' {
            let mut n = 0u16;
            let mut j = i + 1;
            while j < sql.len() && sql[j].is_ascii_digit() {
                n = n
                    .saturating_mul(10)
                    .saturating_add(u16::from(sql[j] - b'0'));
                j += 1;
            }
            max = max.max(n);
            i = j;
        } else {
            i += 1;
        }
    }
    max
}

async fn serve(mut sock: TcpStream, work: Duration) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(8192);
    let mut out = BytesMut::with_capacity(8192);
    // Startup: SSLRequest / GSSENCRequest get 'N'; then the StartupMessage.
    loop {
        while buf.len() < 8 {
            if sock.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        while buf.len() < len {
            if sock.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
        let code = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        buf.advance(len);
        if code == 80877103 || code == 80877104 {
            sock.write_all(b"N").await?;
            continue;
        }
        break;
    }
    frame(&mut out, b'R', &[0, 0, 0, 0]);
    for (k, v) in [
        ("server_version", "15.0"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        let body = [k.as_bytes(), b"\0", v.as_bytes(), b"\0"].concat();
        frame(&mut out, b'S', &body);
    }
    frame(&mut out, b'K', &[0, 0, 0, 1, 0, 0, 0, 1]);
    ready(&mut out);
    sock.write_all(&out).await?;
    out.clear();
    // The parameter count of the statement last parsed (pgbench uses one statement per session).
    let mut nparams = 0u16;
    loop {
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < len + 1 {
                break;
            }
            let tag = buf[0];
            let body = buf.split_to(len + 1).split_off(5);
            match tag {
                b'Q' if body.windows(9).any(|w| w == b"partstrat") => {
                    partitions(&mut out);
                    ready(&mut out);
                }
                b'Q' => {
                    spin(work);
                    row_description(&mut out);
                    data_row(&mut out);
                    frame(&mut out, b'C', b"SELECT 1\0");
                    ready(&mut out);
                }
                b'P' => {
                    let name_end = body.iter().position(|&b| b == 0).unwrap_or(0);
                    nparams = params(&body[name_end + 1..]);
                    frame(&mut out, b'1', &[]);
                }
                b'B' => frame(&mut out, b'2', &[]),
                b'D' => {
                    if body.first() == Some(&b'S') {
                        let mut b = BytesMut::new();
                        b.put_u16(nparams);
                        for _ in 0..nparams {
                            b.put_u32(23);
                        }
                        frame(&mut out, b't', &b);
                    }
                    row_description(&mut out);
                }
                b'E' => {
                    spin(work);
                    data_row(&mut out);
                    frame(&mut out, b'C', b"SELECT 1\0");
                }
                b'S' => ready(&mut out),
                b'C' => frame(&mut out, b'3', &[]),
                b'X' => return Ok(()),
                _ => {} // Flush and the rest
            }
        }
        if !out.is_empty() {
            sock.write_all(&out).await?;
            out.clear();
        }
        if sock.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}
