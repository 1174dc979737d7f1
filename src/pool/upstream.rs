//! One server connection: TCP (+ TLS), startup, authentication (SCRAM-SHA-256, md5, cleartext),
//! the server's parameters and backend key, and the simple queries the proxy runs itself
//! (health check, reset, applying a client's startup parameters).

use crate::admin::registry::ServerTicket;
use crate::auth::scram_client::{Binding, ScramClient};
use crate::config::{ChannelBinding, UpstreamAuth, UpstreamTlsMode};
use crate::error::{sqlstate, PgError, Severity};
use crate::metrics::METRICS;
use crate::stream::Stream;
use crate::wire;
use bytes::{Bytes, BytesMut};
use lru::LruCache;
use postgres_protocol::message::frontend;
use rustls::pki_types::ServerName;
use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where and how to reach the upstream.
#[derive(Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub tls_mode: UpstreamTlsMode,
    pub tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    pub channel_binding: ChannelBinding,
    pub connect_timeout: Duration,
    pub max_message: usize,
    /// Capacity of each connection's prepared-statement LRU.
    pub max_prepared: usize,
}

impl Target {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Who to log in as.
#[derive(Clone, Debug)]
pub struct Login {
    pub user: String,
    pub database: String,
    pub password: Option<String>,
    /// A logical replication connection (`replication=database`): the change stream.
    pub replication: bool,
    /// The proxy's own connection (catalog, change stream, `EXPLAIN`): `client_encoding=UTF8`
    /// at startup, so that names arrive in UTF-8 whatever the database's encoding (by default
    /// a connection's client encoding is the database's, and a LATIN1 database's `café` would
    /// not match the `café` a UTF-8 client writes).
    pub utf8: bool,
    /// `upstream.require_auth`: the ways the server may ask for (`None`: any).
    pub require_auth: Option<Vec<UpstreamAuth>>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to upstream server at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to upstream server at {addr}")]
    Timeout { addr: String },
    #[error("TLS with upstream server at {addr}: {message}")]
    Tls { addr: String, message: String },
    /// The server refused us with an `ErrorResponse` (bad password, no such database...).
    #[error("upstream server error {code}: {message}")]
    Server {
        code: String,
        message: String,
        /// The whole `ErrorResponse` frame, forwarded to the client unchanged.
        frame: Bytes,
    },
    #[error("upstream server at {addr}: {message}")]
    Protocol { addr: String, message: String },
    #[error("upstream connection lost: {0}")]
    Io(#[from] std::io::Error),
}

impl UpstreamError {
    /// Worth trying again later (the server may come back); not for refusals.
    pub fn retryable(&self) -> bool {
        match self {
            UpstreamError::Connect { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::Io(_) => true,
            // "the database system is starting up / shutting down" and "too many clients".
            UpstreamError::Server { code, .. } => code.starts_with("57P") || code == "53300",
            _ => false,
        }
    }

    /// What the client is told, as bytes of an `ErrorResponse`: the server's own error as it
    /// was sent, or the proxy's with `severity`.
    pub fn to_client(&self, severity: Severity, out: &mut BytesMut) {
        match self {
            UpstreamError::Server { frame, .. } => out.extend_from_slice(frame),
            other => PgError::fatal(sqlstate::CONNECTION_FAILURE, other.to_string())
                .with_severity(severity)
                .encode(out),
        }
    }

    /// The server refused the login itself with a FATAL error (bad password, no such database):
    /// the client's session cannot go on.
    pub fn is_fatal_refusal(&self) -> bool {
        match self {
            UpstreamError::Server { frame, .. } => frame.len() > 5 && wire::is_fatal(&frame[5..]),
            _ => false,
        }
    }
}

/// An authenticated server connection.
pub struct ServerConn {
    pub stream: Stream,
    /// Parameters the server reported (`ParameterStatus`), kept current by the session.
    pub params: BTreeMap<String, String>,
    pub pid: i32,
    pub secret: pgwire::messages::startup::SecretKey,
    /// Where a cancel request for this connection goes (none if the server sent no key).
    pub cancel: Option<Arc<CancelKey>>,
    /// Set when the connection must not be reused (mid-query, protocol out of sync).
    pub broken: bool,
    /// Read buffer; empty whenever the connection is idle.
    pub buf: BytesMut,
    /// Statements prepared on this connection by the proxy (transaction mode), by server name.
    pub prepared: LruCache<String, ()>,
    /// Settings the proxy applied on top of the connection's defaults, by name.
    pub applied: BTreeMap<String, String>,
    /// When the connection was last given back; the health check skips recently used ones.
    pub last_used: Instant,
    /// Its entry in the admin registry (set by the pool).
    pub ticket: Option<ServerTicket>,
    max_message: usize,
}

impl ServerConn {
    pub async fn connect(target: &Target, login: &Login) -> Result<ServerConn, UpstreamError> {
        let addr = target.addr();
        let fut = Self::connect_inner(target, login);
        match tokio::time::timeout(target.connect_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Timeout { addr }),
        }
    }

    async fn connect_inner(target: &Target, login: &Login) -> Result<ServerConn, UpstreamError> {
        let addr = target.addr();
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|source| UpstreamError::Connect {
                addr: addr.clone(),
                source,
            })?;
        tcp.set_nodelay(true)?;
        let stream = negotiate_tls(tcp, target).await?;
        let mut conn = ServerConn {
            stream,
            params: BTreeMap::new(),
            pid: 0,
            secret: Default::default(),
            cancel: None,
            broken: false,
            buf: BytesMut::with_capacity(8192),
            prepared: LruCache::new(
                NonZeroUsize::new(target.max_prepared).unwrap_or(NonZeroUsize::MIN),
            ),
            applied: BTreeMap::new(),
            last_used: Instant::now(),
            ticket: None,
            max_message: target.max_message,
        };
        conn.startup(login, &addr, target.channel_binding).await?;
        if conn.pid != 0 {
            conn.cancel = Some(Arc::new(CancelKey::new(
                target.host.clone(),
                target.port,
                conn.pid,
                conn.secret.clone(),
            )));
        }
        Ok(conn)
    }

    /// Say goodbye (`Terminate`) and close: the server logs no lost connection.
    pub async fn terminate(mut self) {
        let _ = self.send(b"X\0\0\0\x04").await;
        let _ = self.stream.shutdown().await;
    }

    /// Write `out` and flush (the change stream talks to the server directly).
    pub async fn send(&mut self, out: &[u8]) -> Result<(), UpstreamError> {
        self.stream.write_all(out).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// The next whole message from the server.
    pub async fn read(&mut self) -> Result<(u8, Bytes), UpstreamError> {
        match wire::read_message(&mut self.stream, &mut self.buf, self.max_message).await? {
            Some(m) => Ok(m),
            None => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
        }
    }

    async fn startup(
        &mut self,
        login: &Login,
        addr: &str,
        binding: ChannelBinding,
    ) -> Result<(), UpstreamError> {
        let protocol = |message: String| UpstreamError::Protocol {
            addr: addr.to_string(),
            message,
        };
        let mut out = BytesMut::new();
        let mut params = vec![
            ("user", login.user.as_str()),
            ("database", login.database.as_str()),
        ];
        if login.replication {
            params.push(("replication", "database"));
        }
        if login.utf8 {
            params.push(("client_encoding", "UTF8"));
        }
        frontend::startup_message(params.iter().copied(), &mut out)?;
        self.send(&out).await?;
        let mut scram: Option<ScramClient> = None;
        // `channel_binding = "require"`: the login must be a bound SCRAM exchange, as libpq's.
        let require = binding == ChannelBinding::Require;
        // A bound exchange started; and the server's SCRAM signature checked (a server that
        // says Ok before proving it knows the password is not one to trust).
        let mut bound = false;
        let mut verified = false;
        // `upstream.require_auth`: a server asking for another way (a downgrade to a cleartext
        // password, say) is refused before the proxy answers it.
        let allowed = |asked: UpstreamAuth| match &login.require_auth {
            Some(list) if !list.contains(&asked) => Err(protocol(format!(
                "the server asks for {} authentication, which upstream.require_auth ({}) \
                 does not allow",
                asked.name(),
                list.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")
            ))),
            _ => Ok(()),
        };
        // Whether the server asked for a password at all (not: `none`).
        let mut asked = false;
        let unbound = |how: &str| {
            protocol(format!(
                "upstream.tls.channel_binding = \"require\", but the server {how}"
            ))
        };
        loop {
            let (tag, body) = self.read().await?;
            match tag {
                b'R' => {
                    let code = body
                        .get(..4)
                        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    let data = body.slice(4.min(body.len())..);
                    let password = || {
                        login
                            .password
                            .as_deref()
                            .ok_or_else(|| UpstreamError::Server {
                                code: sqlstate::INVALID_PASSWORD.into(),
                                message: format!(
                                    "no upstream password configured for user {}",
                                    login.user
                                ),
                                frame: {
                                    let mut f = BytesMut::new();
                                    PgError::fatal(
                                        sqlstate::INVALID_PASSWORD,
                                        format!(
                                            "pgcache has no password for upstream user \"{}\"",
                                            login.user
                                        ),
                                    )
                                    .with_hint(
                                        "set users.<name>.server_password or upstream.password",
                                    )
                                    .encode(&mut f);
                                    f.freeze()
                                },
                            })
                    };
                    let mut out = BytesMut::new();
                    match code {
                        Some(0) if scram.is_some() && !verified => {
                            return Err(protocol(
                                "server ended SCRAM authentication without its signature".into(),
                            ))
                        }
                        Some(0) if require && !bound => {
                            return Err(unbound("let the proxy in without channel binding"))
                        }
                        Some(0) => {
                            if !asked {
                                allowed(UpstreamAuth::None)?;
                            }
                            continue;
                        }
                        Some(3 | 5) if require => {
                            return Err(unbound("asks for a password without SCRAM"))
                        }
                        Some(3) => {
                            allowed(UpstreamAuth::Password)?;
                            asked = true;
                            frontend::password_message(password()?.as_bytes(), &mut out)?
                        }
                        Some(5) => {
                            allowed(UpstreamAuth::Md5)?;
                            asked = true;
                            let salt: [u8; 4] = data
                                .get(..4)
                                .and_then(|s| s.try_into().ok())
                                .ok_or_else(|| protocol("short md5 salt".into()))?;
                            let hash = postgres_protocol::authentication::md5_hash(
                                login.user.as_bytes(),
                                password()?.as_bytes(),
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut out)?;
                        }
                        Some(10) => {
                            allowed(UpstreamAuth::ScramSha256)?;
                            asked = true;
                            // Over TLS, bound to the server's certificate where the server
                            // offers it (as libpq's default `channel_binding=prefer`): a man in
                            // the middle with another certificate fails the exchange even when
                            // `upstream.tls.mode` does not check certificates.
                            let offers = |name: &[u8]| data.split(|&b| b == 0).any(|m| m == name);
                            let end_point = match binding {
                                ChannelBinding::Disable => None,
                                _ => self.stream.server_end_point(),
                            };
                            let (mechanism, binding) = match end_point {
                                Some(e) if offers(b"SCRAM-SHA-256-PLUS") => {
                                    bound = true;
                                    ("SCRAM-SHA-256-PLUS", Binding::EndPoint(e))
                                }
                                _ if require => {
                                    return Err(unbound(
                                        "offers no channel binding the proxy can use (needs \
                                         TLS and a certificate signed with a hash)",
                                    ))
                                }
                                _ if !offers(b"SCRAM-SHA-256") => {
                                    return Err(protocol(
                                        "server offers no SASL mechanism pgcache supports".into(),
                                    ))
                                }
                                // We could bind; the server did not offer to.
                                Some(_) => ("SCRAM-SHA-256", Binding::Unrequested),
                                None => ("SCRAM-SHA-256", Binding::Unsupported),
                            };
                            let s = ScramClient::new(password()?, binding);
                            frontend::sasl_initial_response(mechanism, s.message(), &mut out)?;
                            scram = Some(s);
                        }
                        Some(11) => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| protocol("SASL continue without start".into()))?;
                            s.update(&data).map_err(|e| protocol(e.to_string()))?;
                            frontend::sasl_response(s.message(), &mut out)?;
                        }
                        Some(12) => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| protocol("SASL final without start".into()))?;
                            s.finish(&data)
                                .map_err(|e| protocol(format!("server signature: {e}")))?;
                            verified = true;
                            continue;
                        }
                        other => {
                            return Err(protocol(format!(
                                "unsupported authentication request {other:?}"
                            )))
                        }
                    }
                    self.send(&out).await?;
                }
                b'E' => return Err(server_error(&body)),
                b'S' => self.note_parameter(&body),
                b'K' if body.len() >= 8 => {
                    self.pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    self.secret = pgwire::messages::startup::SecretKey::Bytes(body.slice(4..));
                }
                b'Z' => return Ok(()),
                // NoticeResponse, NegotiateProtocolVersion: nothing to act on.
                _ => {}
            }
        }
    }

    /// Keep a `ParameterStatus` the server sent.
    pub fn note_parameter(&mut self, body: &[u8]) {
        if let Some((k, v)) = wire::parameter_status(body) {
            self.params.insert(k.to_string(), v.to_string());
        }
    }

    /// Run `sql` (simple protocol) and read to `ReadyForQuery`. Returns the messages other than
    /// `ReadyForQuery`, or the server's error. `ParameterStatus` updates `params`.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<(u8, Bytes)>, UpstreamError> {
        let mut out = BytesMut::new();
        wire::query(sql, &mut out);
        self.exchange(&out).await
    }

    /// The first column of the first row `sql` returns (`None`: no row, or NULL).
    pub async fn scalar(&mut self, sql: &str) -> Result<Option<String>, UpstreamError> {
        let replies = self.simple_query(sql).await?;
        Ok(replies
            .iter()
            .find(|(tag, _)| *tag == b'D')
            .and_then(|(_, row)| wire::data_row_texts(row)?.into_iter().next().flatten()))
    }

    /// Send `out` (messages ending in one `Query` or `Sync`) and read to `ReadyForQuery`, as
    /// `simple_query` does.
    pub async fn exchange(&mut self, out: &[u8]) -> Result<Vec<(u8, Bytes)>, UpstreamError> {
        self.send(out).await?;
        let mut replies = Vec::new();
        let mut error = None;
        loop {
            let (tag, body) = self.read().await?;
            match tag {
                b'Z' => break,
                b'E' => error = error.or(Some(server_error(&body))),
                b'S' => {
                    self.note_parameter(&body);
                    replies.push((tag, body));
                }
                _ => replies.push((tag, body)),
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(replies),
        }
    }

    /// True when an idle connection has something to read (EOF, an error, or bytes nobody asked
    /// for), checked without waiting.
    pub fn readable_while_idle(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut byte = [0u8; 1];
        let mut rb = tokio::io::ReadBuf::new(&mut byte);
        let poll =
            tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut self.stream), &mut cx, &mut rb);
        !poll.is_pending()
    }
}

/// Enough to cancel a query running on one server connection: a CancelRequest sent on a new
/// plain TCP connection (PostgreSQL reads cancel packets before TLS and authentication).
#[derive(Debug)]
pub struct CancelKey {
    pub host: String,
    pub port: u16,
    pub pid: i32,
    pub secret: pgwire::messages::startup::SecretKey,
    sent: std::sync::atomic::AtomicBool,
}

impl CancelKey {
    pub fn new(
        host: String,
        port: u16,
        pid: i32,
        secret: pgwire::messages::startup::SecretKey,
    ) -> Self {
        CancelKey {
            host,
            port,
            pid,
            secret,
            sent: Default::default(),
        }
    }

    /// A cancel was sent for this connection. PostgreSQL cancels whatever the backend runs when
    /// it arrives, which may be after the statement it was meant for: the connection is closed
    /// rather than given to another client (`Pools::has_broken`).
    pub fn sent(&self) -> bool {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Send the request. The connection counts as `sent` from this call on, before the returned
    /// future first runs: a send spawned elsewhere leaves no moment in which the connection
    /// could go back to the pool unmarked.
    pub fn send(
        self: Arc<Self>,
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send + 'static {
        self.sent.store(true, std::sync::atomic::Ordering::Relaxed);
        async move {
            let mut tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
            let secret = self.secret.to_bytes();
            let mut out = BytesMut::new();
            out.extend_from_slice(&((12 + secret.len()) as i32).to_be_bytes());
            out.extend_from_slice(&80877102i32.to_be_bytes());
            out.extend_from_slice(&self.pid.to_be_bytes());
            out.extend_from_slice(&secret);
            tcp.write_all(&out).await?;
            // The server closes the connection once it has read the request.
            let mut sink = [0u8; 1];
            let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut sink)).await;
            Ok(())
        }
    }
}

fn server_error(body: &Bytes) -> UpstreamError {
    let fields = wire::fields(body);
    let get = |c: u8| {
        fields
            .iter()
            .find(|(k, _)| *k == c)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let mut frame = BytesMut::with_capacity(body.len() + 5);
    wire::frame(b'E', &[body], &mut frame);
    UpstreamError::Server {
        code: get(b'C'),
        message: get(b'M'),
        frame: frame.freeze(),
    }
}

async fn negotiate_tls(mut tcp: TcpStream, target: &Target) -> Result<Stream, UpstreamError> {
    let Some((connector, name)) = &target.tls else {
        return Ok(Stream::Plain(tcp));
    };
    let addr = target.addr();
    // SSLRequest: length 8, code 80877103.
    tcp.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {
            let tls = connector.connect(name.clone(), tcp).await.map_err(|e| {
                METRICS
                    .tls_handshakes
                    .with_label_values(&["upstream", "error"])
                    .inc();
                UpstreamError::Tls {
                    addr,
                    message: e.to_string(),
                }
            })?;
            METRICS
                .tls_handshakes
                .with_label_values(&["upstream", "ok"])
                .inc();
            Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(tls))))
        }
        b'N' if target.tls_mode == UpstreamTlsMode::Prefer => Ok(Stream::Plain(tcp)),
        b'N' => Err(UpstreamError::Tls {
            addr,
            message: "server does not support TLS but upstream.tls.mode requires it".into(),
        }),
        other => Err(UpstreamError::Protocol {
            addr,
            message: format!("unexpected answer {other:?} to SSLRequest"),
        }),
    }
}
