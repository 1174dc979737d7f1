//! `relay`: the floor of a tokio proxy. A byte relay on loopback that gives each client a
//! connection of its own to the server and copies bytes both ways (`copy_bidirectional`), with
//! no protocol, pooling, cache or insight: what forwarding costs on this runtime and this
//! machine. Measured beside PgBouncer in session mode (also one server connection per client,
//! also forwarding) it separates what the runtime costs per transaction from what pgcache's own
//! work costs (benches/README.md, *Profiling*). compare.sh does not run it.
//!
//! `--loop` relays the same way without tokio: one thread around one `epoll` set (mio), taking
//! every ready event of a turn before it waits again, as PgBouncer's event loop does — to tell
//! what the runtime's way of waiting costs from what an event loop of any kind costs.
//!
//! `--per-core N` relays with tokio but no work-stealing scheduler: N threads, each with a
//! current-thread runtime and a listener of its own on the same port (`SO_REUSEPORT`: the kernel
//! spreads the clients), each client's server connection made and driven on its thread — what a
//! runtime per core would cost, against the multi-thread runtime pgcache uses.
//!
//! Usage: `relay --port PORT --upstream HOST:PORT [--threads N | --per-core N | --loop]`; runs
//! until killed. `--threads` sets the tokio worker threads (default: one per core, as pgcache).

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use tokio::net::{TcpListener, TcpStream};

fn arg(args: &[String], name: &str) -> Option<String> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

fn usage() -> ! {
    eprintln!(
        "usage: relay --port PORT --upstream HOST:PORT [--threads N | --per-core N | --loop]"
    );
    std::process::exit(2)
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let port = arg(&args, "--port")
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or_else(|| usage());
    let upstream = arg(&args, "--upstream").unwrap_or_else(|| usage());
    if args.iter().any(|a| a == "--loop") {
        return event_loop(port, &upstream);
    }
    if let Some(n) = arg(&args, "--per-core") {
        match n.parse::<usize>() {
            Ok(n) if n > 0 => return per_core(n, port, &upstream),
            _ => usage(),
        }
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = arg(&args, "--threads") {
        match t.parse::<usize>() {
            Ok(n) if n > 0 => builder.worker_threads(n),
            _ => usage(),
        };
    }
    builder.enable_all().build()?.block_on(async move {
        serve(TcpListener::bind(("127.0.0.1", port)).await?, upstream).await
    })
}

/// Accept clients on `listener` and relay each on a task of its own, until accepting fails.
async fn serve(listener: TcpListener, upstream: String) -> std::io::Result<()> {
    loop {
        let (client, _) = listener.accept().await?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            if let Err(e) = relay(client, &upstream).await {
                eprintln!("relay: {e}");
            }
        });
    }
}

/// `--per-core`: `n` threads, each a current-thread runtime accepting on its own listener.
fn per_core(n: usize, port: u16, upstream: &str) -> std::io::Result<()> {
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let upstream = upstream.to_string();
            std::thread::spawn(move || -> std::io::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let socket = tokio::net::TcpSocket::new_v4()?;
                    socket.set_reuseport(true)?;
                    socket.set_reuseaddr(true)?;
                    socket.bind(([127, 0, 0, 1], port).into())?;
                    serve(socket.listen(1024)?, upstream).await
                })
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| std::io::Error::other("relay thread panicked"))??;
    }
    Ok(())
}

async fn relay(mut client: TcpStream, upstream: &str) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut server = TcpStream::connect(upstream).await?;
    server.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}

/// One direction's bytes read but not yet written (the other side's send buffer was full).
struct Side {
    sock: std::net::TcpStream,
    pending: Vec<u8>,
}

const LISTENER: Token = Token(usize::MAX);

/// `--loop`: client `i` is token `2i`, its server `2i + 1`; a readable side is read until it
/// comes up short and what it read is written to its peer at once (kept, and the peer watched
/// for writability, when the peer's buffer is full). A pair ends when either side closes.
fn event_loop(port: u16, upstream: &str) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
    listener.set_nonblocking(true)?;
    let mut poll = Poll::new()?;
    let fd = listener.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&fd), LISTENER, Interest::READABLE)?;
    let mut sides: HashMap<usize, Side> = HashMap::new();
    let mut next = 0usize;
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in events.iter() {
            let t = ev.token();
            if t == LISTENER {
                while let Ok((client, _)) = listener.accept() {
                    let server = match std::net::TcpStream::connect(upstream) {
                        Ok(s) => s,
                        Err(e) => {
                            eprintln!("relay: {e}");
                            continue;
                        }
                    };
                    for (i, s) in [(next, client), (next + 1, server)] {
                        s.set_nonblocking(true)?;
                        s.set_nodelay(true)?;
                        let fd = s.as_raw_fd();
                        poll.registry().register(
                            &mut SourceFd(&fd),
                            Token(i),
                            Interest::READABLE | Interest::WRITABLE,
                        )?;
                        sides.insert(
                            i,
                            Side {
                                sock: s,
                                pending: Vec::new(),
                            },
                        );
                    }
                    next += 2;
                }
                continue;
            }
            let me = t.0;
            let peer = me ^ 1;
            let mut closed = false;
            if ev.is_writable() {
                // The peer's bytes that waited for this side's buffer.
                closed |= flush(&mut sides, me).is_err();
            }
            if ev.is_readable() || ev.is_read_closed() {
                while let Some(side) = sides.get_mut(&me) {
                    match side.sock.read(&mut buf) {
                        Ok(0) => {
                            closed = true;
                            break;
                        }
                        Ok(n) => {
                            if let Some(p) = sides.get_mut(&peer) {
                                p.pending.extend_from_slice(&buf[..n]);
                            }
                            closed |= flush(&mut sides, peer).is_err();
                            if n < buf.len() {
                                break;
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => {
                            closed = true;
                            break;
                        }
                    }
                }
            }
            if closed {
                for i in [me, peer] {
                    if let Some(side) = sides.remove(&i) {
                        let fd = side.sock.as_raw_fd();
                        let _ = poll.registry().deregister(&mut SourceFd(&fd));
                    }
                }
            }
        }
    }
}

/// Write side `i`'s pending bytes as far as its socket takes them.
fn flush(sides: &mut HashMap<usize, Side>, i: usize) -> std::io::Result<()> {
    let Some(Side { sock, pending }) = sides.get_mut(&i) else {
        return Ok(());
    };
    let mut done = 0;
    while done < pending.len() {
        match sock.write(&pending[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    pending.drain(..done);
    Ok(())
}
