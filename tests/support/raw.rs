//! A tiny raw wire-protocol client for byte-level checks: what exactly the proxy sends, compared
//! with what PostgreSQL itself sends, and what the proxy does with bytes no driver would send.
//!
//! Messages are `(tag, body)` with the length stripped; builders return whole frames as bytes so a
//! test can truncate or corrupt them. Every read has a generous timeout that only guards against
//! hangs (a hang is reported as a panic naming what was awaited).

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Hang guard for one read.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// One backend message: tag and body (without the length).
pub type Msg = (u8, Vec<u8>);

pub struct RawConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    /// A TCP connection to 127.0.0.1:`port`, nothing sent yet.
    pub async fn connect(port: u16) -> RawConn {
        let stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(("127.0.0.1", port)))
            .await
            .unwrap_or_else(|_| panic!("connect to 127.0.0.1:{port} timed out"))
            .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
        let _ = stream.set_nodelay(true);
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and logs in with `params` (e.g. `[("user", "trustuser"), ("database", "app")]`);
    /// only trust authentication is supported. Returns the connection and every message up to
    /// and including the first `ReadyForQuery`. Panics on an `ErrorResponse`.
    pub async fn login(port: u16, params: &[(&str, &str)]) -> (RawConn, Vec<Msg>) {
        let mut conn = RawConn::connect(port).await;
        conn.send(&startup_packet(params)).await;
        let msgs = conn.until_ready().await;
        for (tag, body) in &msgs {
            match tag {
                b'E' => panic!("login on port {port} failed: {:?}", fields(body)),
                b'R' => assert_eq!(
                    body.as_slice(),
                    &[0, 0, 0, 0],
                    "login on port {port}: only trust (AuthenticationOk) is supported"
                ),
                _ => {}
            }
        }
        (conn, msgs)
    }

    /// Log in as `trustuser` to database `app`.
    pub async fn login_trust(port: u16) -> RawConn {
        RawConn::login(port, &[("user", "trustuser"), ("database", "app")])
            .await
            .0
    }

    /// Log in as `trustuser` to database `app` with `client_encoding` LATIN1: text it sends with
    /// bytes outside ASCII is not UTF-8.
    pub async fn login_trust_latin1(port: u16) -> RawConn {
        let params = [
            ("user", "trustuser"),
            ("database", "app"),
            ("client_encoding", "LATIN1"),
        ];
        RawConn::login(port, &params).await.0
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(IO_TIMEOUT, self.stream.write_all(bytes))
            .await
            .expect("write timed out")
            .expect("write to server");
    }

    /// Like `send`, but a write error (the peer already closed) is returned, not a panic.
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match tokio::time::timeout(IO_TIMEOUT, self.stream.write_all(bytes)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// The next message; `Ok(None)` on a clean EOF between messages.
    pub async fn try_read(&mut self, timeout: Duration) -> std::io::Result<Option<Msg>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                if len < 4 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("backend message length {len}"),
                    ));
                }
                let total = len as usize + 1;
                if self.buf.len() >= total {
                    let frame: Vec<u8> = self.buf.drain(..total).collect();
                    return Ok(Some((frame[0], frame[5..].to_vec())));
                }
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(r) => r?,
                Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
            };
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next message; panics on EOF, an I/O error or a hang.
    pub async fn read(&mut self) -> Msg {
        match self.try_read(IO_TIMEOUT).await {
            Ok(Some(m)) => m,
            Ok(None) => panic!("connection closed while a message was expected"),
            Err(e) => panic!("reading a message: {e}"),
        }
    }

    /// Messages up to and including the next `ReadyForQuery`.
    pub async fn until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = match self.try_read(IO_TIMEOUT).await {
                Ok(Some(m)) => m,
                Ok(None) => panic!("connection closed before ReadyForQuery; got {}", tags(&out)),
                Err(e) => panic!("waiting for ReadyForQuery (got {}): {e}", tags(&out)),
            };
            let done = m.0 == b'Z';
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Run `sql` with the simple protocol; every message up to and including `ReadyForQuery`.
    pub async fn simple(&mut self, sql: &str) -> Vec<Msg> {
        self.send(&query(sql)).await;
        self.until_ready().await
    }

    /// Messages until the peer closes; panics if it does not close within `IO_TIMEOUT`.
    pub async fn until_closed(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            match self.try_read(IO_TIMEOUT).await {
                Ok(Some(m)) => out.push(m),
                Ok(None) => return out,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    panic!(
                        "connection not closed after {IO_TIMEOUT:?}; got {}",
                        tags(&out)
                    )
                }
                // Reset or a truncated last message: closed all the same.
                Err(_) => return out,
            }
        }
    }
}

/// `tag, len, body` as bytes.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 5);
    v.push(tag);
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// A protocol 3.0 startup packet with `params`.
pub fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196608i32.to_be_bytes().to_vec();
    for (k, v) in params {
        cstr(&mut body, k);
        cstr(&mut body, v);
    }
    body.push(0);
    let mut v = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    v.extend_from_slice(&body);
    v
}

/// Simple-protocol `Query`.
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, sql);
    message(b'Q', &body)
}

/// `Parse` of statement `name` with the given parameter type OIDs (0 = unspecified).
pub fn parse(name: &str, sql: &str, param_types: &[u32]) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, name);
    cstr(&mut body, sql);
    body.extend_from_slice(&(param_types.len() as i16).to_be_bytes());
    for t in param_types {
        body.extend_from_slice(&t.to_be_bytes());
    }
    message(b'P', &body)
}

/// `Bind` of `statement` to `portal`; `None` parameters are NULL. Formats: 0 text, 1 binary.
pub fn bind(
    portal: &str,
    statement: &str,
    param_formats: &[i16],
    params: &[Option<&[u8]>],
    result_formats: &[i16],
) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, portal);
    cstr(&mut body, statement);
    body.extend_from_slice(&(param_formats.len() as i16).to_be_bytes());
    for f in param_formats {
        body.extend_from_slice(&f.to_be_bytes());
    }
    body.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        match p {
            Some(p) => {
                body.extend_from_slice(&(p.len() as i32).to_be_bytes());
                body.extend_from_slice(p);
            }
            None => body.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    body.extend_from_slice(&(result_formats.len() as i16).to_be_bytes());
    for f in result_formats {
        body.extend_from_slice(&f.to_be_bytes());
    }
    message(b'B', &body)
}

/// `Describe` of a statement (`b'S'`) or portal (`b'P'`).
pub fn describe(kind: u8, name: &str) -> Vec<u8> {
    let mut body = vec![kind];
    cstr(&mut body, name);
    message(b'D', &body)
}

/// `Execute` of `portal`, at most `max_rows` rows (0 = all).
pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    let mut body = Vec::new();
    cstr(&mut body, portal);
    body.extend_from_slice(&max_rows.to_be_bytes());
    message(b'E', &body)
}

/// `Close` of a statement (`b'S'`) or portal (`b'P'`).
pub fn close(kind: u8, name: &str) -> Vec<u8> {
    let mut body = vec![kind];
    cstr(&mut body, name);
    message(b'C', &body)
}

pub fn sync() -> Vec<u8> {
    message(b'S', &[])
}

pub fn flush() -> Vec<u8> {
    message(b'H', &[])
}

pub fn terminate() -> Vec<u8> {
    message(b'X', &[])
}

/// Fields of an `ErrorResponse`/`NoticeResponse` body as (code, value).
pub fn fields(body: &[u8]) -> Vec<(u8, String)> {
    body.split(|&b| b == 0)
        .take_while(|f| !f.is_empty())
        .map(|f| (f[0], String::from_utf8_lossy(&f[1..]).into_owned()))
        .collect()
}

/// One field of an `ErrorResponse`/`NoticeResponse` body.
pub fn field(body: &[u8], code: u8) -> Option<String> {
    fields(body)
        .into_iter()
        .find(|(c, _)| *c == code)
        .map(|(_, v)| v)
}

/// The tags of `msgs` as a string, e.g. `"TDCZ"`, for assertions and messages.
pub fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|(t, _)| *t as char).collect()
}
