//! Accepting clients: the accept loop (bounded by `max_clients`, stopped by shutdown), TLS and
//! GSS negotiation, the startup packet, cancel requests, authentication, and the hand-over of an
//! authenticated client with its server connection to a `Session`.

use crate::admin::console;
use crate::admin::registry::Registry;
use crate::analysis::Analyzer;
use crate::auth::{self, AuthError, Users};
use crate::config::Source;
use crate::config::{ClientTlsMode, Config};
use crate::error::{sqlstate, PgError};
use crate::metrics::{ClientGauge, METRICS};
use crate::pool::{PoolKey, Pools};
use crate::session::cancel::CancelRegistry;
use crate::session::settings::Settings;
use crate::session::{startup, Session};
use crate::shutdown::Trigger;
use crate::shutdown::{Phase, Shutdown};
use crate::stream::Stream;
use crate::wire;
use arc_swap::ArcSwap;
use bytes::{Buf, BytesMut};
use pgwire::messages::startup::NegotiateProtocolVersion;
use pgwire::messages::PgWireBackendMessage;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::sync::Semaphore;

const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;

/// What every client task shares.
pub struct Shared {
    /// The configuration in force; replaced whole on reload (`set_config`).
    pub config: ArcSwap<Config>,
    /// Bumped by each reload, after the new configuration is in force: sessions keep their own
    /// `Arc` of it and look at this number once per event, not at `config` per use.
    pub config_generation: AtomicU64,
    pub users: ArcSwap<Users>,
    pub analyzer: Analyzer,
    pub cache: crate::cache::Cache,
    /// Per-fingerprint statistics and the slow query log.
    pub insight: crate::insight::Insight,
    pub pools: Pools,
    /// The client-facing TLS acceptor (`None`: TLS off); replaced on reload, so a renewed
    /// certificate serves the next handshake.
    pub tls: arc_swap::ArcSwapOption<crate::tls::ClientTls>,
    pub cancels: Arc<CancelRegistry>,
    /// One permit per connected client (`proxy.max_clients`).
    pub clients: Arc<Semaphore>,
    /// Who is connected (admin console).
    pub registry: Arc<Registry>,
    /// Idle clients waiting without a task (`session::park`).
    pub parking: Arc<crate::session::park::Lot>,
    pub shutdown: Shutdown,
    pub trigger: Trigger,
    /// True while PAUSEd: new transactions wait.
    pub paused: watch::Sender<bool>,
    /// Where the configuration came from, for RELOAD.
    pub source: Source,
}

impl Shared {
    pub fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }

    /// Put `config` in force. Parked sessions are woken to take it (a new timeout applies to
    /// them too); running ones take it at their next event.
    pub fn set_config(&self, config: Arc<Config>) {
        self.config.store(config);
        // SeqCst: a session parking at this moment sees it, or is seen parked (`session::park`).
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.registry.wake_clients();
    }

    /// Move shutdown on to `phase` and wake every client session to look at it.
    pub fn shut_down(&self, phase: Phase) {
        self.trigger.set(phase);
        self.registry.wake_clients();
    }
}

/// Accept on every listener until shutdown begins.
pub async fn serve(shared: Arc<Shared>, listeners: Vec<TcpListener>) {
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        tasks.spawn(accept_loop(shared.clone(), l));
    }
    while tasks.join_next().await.is_some() {}
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.reached(Phase::Drain) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: wait a moment rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        METRICS.clients_accepted.inc();
        tokio::spawn(client(shared.clone(), tcp, peer));
    }
}

/// One client's task, from accept to goodbye. Its future is what every connected client costs
/// while idle (tokio rounds a task up to 128-byte lines), so it holds the session's loop and
/// little else: the permit, login and session start live in a boxed future freed before the loop
/// (and an `async fn` would keep its arguments for its whole life).
fn client(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
) -> impl std::future::Future<Output = ()> {
    let begin = Box::pin(begin(shared, tcp, peer));
    async move {
        if let Some(session) = begin.await {
            session.run().await;
        }
    }
}

async fn refuse(tcp: TcpStream) {
    let err = PgError::fatal(
        sqlstate::TOO_MANY_CONNECTIONS,
        "sorry, too many clients already",
    );
    send_error(&mut Stream::Plain(tcp), &err).await;
}

async fn send_error(stream: &mut Stream, err: &PgError) {
    let mut out = BytesMut::new();
    err.encode(&mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
}

/// An authenticated client, ready for a server connection.
struct Login {
    stream: Stream,
    buf: BytesMut,
    params: BTreeMap<String, String>,
    user: String,
    database: String,
}

/// A client slot (`max_clients`), login, then a session with its startup reply queued, holding
/// the slot and the client's gauge. `None` when the client is done here: refused, failed, or an
/// admin console session.
async fn begin(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) -> Option<Box<Session>> {
    let Ok(permit) = shared.clients.clone().try_acquire_owned() else {
        refuse(tcp).await;
        return None;
    };
    let timeout = shared.config().proxy.client_login_timeout;
    let logging_in = ClientGauge::enter("login");
    // Boxed: this future is freed before the session's loop, but its login state is large.
    let login = match tokio::time::timeout(timeout, Box::pin(login(&shared, tcp))).await {
        Ok(Some(l)) => l,
        Ok(None) => return None,
        Err(_) => {
            tracing::debug!(%peer, "client did not finish startup in time");
            return None;
        }
    };
    let Login {
        mut stream,
        buf,
        params,
        user,
        database,
    } = login;
    drop(logging_in);
    let gauge = ClientGauge::enter("active");
    if database == console::DATABASE {
        if shared.config().admin.users.contains(&user) {
            tracing::info!(%peer, user, "admin console session");
            Box::pin(console::serve(shared.clone(), stream, buf)).await;
            return None;
        }
        let e = PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            format!("user \"{user}\" is not allowed to use the pgcache admin console"),
        )
        .with_hint("list the user in admin.users");
        send_error(&mut stream, &e).await;
        return None;
    }
    let pool = shared.pools.pool_ref(&PoolKey { database, user });
    let key = pool.key().clone();
    let settings = match startup::requested_settings(&params) {
        Ok(s) => s,
        Err(e) => {
            send_error(&mut stream, &e).await;
            return None;
        }
    };
    let settings = Settings::new(pool.shared_settings(settings.into_iter().collect()));
    // Not needed any more: an idle client should not keep its startup packet around.
    drop(params);
    let Some(mut session) = Session::start(shared.clone(), stream, buf, pool, settings, peer).await
    else {
        tracing::info!(%peer, pool = %key, "client session could not start");
        return None;
    };
    tracing::debug!(%peer, pool = %key, "client session started");
    session.hold(permit, gauge);
    Some(session)
}

/// Startup: negotiate TLS/GSS, answer cancel requests, read the startup packet and authenticate.
/// `None` when the connection ended here (the client was told why, where it could be).
async fn login(shared: &Shared, tcp: TcpStream) -> Option<Login> {
    let mut stream = Stream::Plain(tcp);
    let mut buf = BytesMut::with_capacity(1024);
    let max = shared.config().proxy.max_message_bytes;
    // The certificate this client was shown, as SCRAM binds to it (TLS only).
    let mut end_point: Option<Vec<u8>> = None;
    let (params, minor) = loop {
        let packet = match wire::read_startup_packet(&mut stream, &mut buf).await {
            Ok(Some(p)) => p,
            Ok(None) => return None,
            Err(e) => {
                METRICS.protocol_errors.inc();
                send_error(
                    &mut stream,
                    &PgError::fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        format!("invalid startup packet: {e}"),
                    ),
                )
                .await;
                return None;
            }
        };
        let code = i32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
        match code {
            SSL_REQUEST if !stream.is_tls() && buf.is_empty() => {
                let Stream::Plain(mut tcp) = stream else {
                    return None;
                };
                match shared.tls.load_full() {
                    Some(client_tls) => {
                        tcp.write_all(b"S").await.ok()?;
                        match client_tls.acceptor.accept(tcp).await {
                            Ok(tls) => {
                                end_point = client_tls.end_point.clone();
                                METRICS
                                    .tls_handshakes
                                    .with_label_values(&["client", "ok"])
                                    .inc();
                                stream = Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls)))
                            }
                            Err(e) => {
                                METRICS
                                    .tls_handshakes
                                    .with_label_values(&["client", "error"])
                                    .inc();
                                tracing::info!(error = %e, "client TLS handshake failed");
                                return None;
                            }
                        }
                    }
                    None => {
                        tcp.write_all(b"N").await.ok()?;
                        stream = Stream::Plain(tcp);
                    }
                }
            }
            GSSENC_REQUEST if !stream.is_tls() => {
                // No GSSAPI encryption: 'N' makes clients fall back to TLS or plain.
                stream.write_all(b"N").await.ok()?;
            }
            CANCEL_REQUEST => {
                if packet.len() >= 16 {
                    let pid = i32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
                    if let Some(send) = shared.cancels.cancel(pid, &packet[12..]) {
                        tracing::debug!(pid, "forwarding cancel request");
                        METRICS.cancels_forwarded.inc();
                        if let Err(e) = send.await {
                            tracing::warn!(error = %e, "could not forward cancel request");
                        }
                    }
                }
                return None;
            }
            c if c >> 16 == 3 => match parse_startup(&packet[8..]) {
                Some(params) => break (params, c & 0xffff),
                None => {
                    let e = PgError::fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        "invalid startup packet layout",
                    );
                    send_error(&mut stream, &e).await;
                    return None;
                }
            },
            c => {
                send_error(
                    &mut stream,
                    &PgError::fatal(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        format!(
                            "unsupported frontend protocol {}.{}: server supports 3.0",
                            c >> 16,
                            c & 0xffff
                        ),
                    ),
                )
                .await;
                return None;
            }
        }
    };
    if shared.config().tls.mode == ClientTlsMode::Require && !stream.is_tls() {
        send_error(
            &mut stream,
            &PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                "pgcache requires TLS connections",
            )
            .with_hint("connect with sslmode=require"),
        )
        .await;
        return None;
    }
    // Protocol 3.x newer than 3.0, or `_pq_.` options: say what we speak, as PostgreSQL does.
    let unsupported: Vec<String> = params
        .keys()
        .filter(|k| k.starts_with("_pq_."))
        .cloned()
        .collect();
    if minor > 0 || !unsupported.is_empty() {
        let mut out = BytesMut::new();
        wire::encode(
            PgWireBackendMessage::NegotiateProtocolVersion(NegotiateProtocolVersion::new(
                0,
                unsupported,
            )),
            &mut out,
        );
        stream.write_all(&out).await.ok()?;
    }
    let Some(user) = params.get("user").filter(|u| !u.is_empty()).cloned() else {
        send_error(
            &mut stream,
            &PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                "no PostgreSQL user name specified in startup packet",
            ),
        )
        .await;
        return None;
    };
    if params
        .get("replication")
        .is_some_and(|r| r != "false" && r != "0" && r != "off" && r != "no")
    {
        send_error(
            &mut stream,
            &PgError::fatal(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "pgcache does not proxy replication connections",
            ),
        )
        .await;
        return None;
    }
    let database = params
        .get("database")
        .filter(|d| !d.is_empty())
        .cloned()
        .or_else(|| shared.config().upstream.database.clone())
        .unwrap_or_else(|| user.clone());
    match auth::authenticate(
        &mut stream,
        &mut buf,
        &shared.users.load(),
        &user,
        max.min(64 * 1024),
        end_point.as_deref(),
    )
    .await
    {
        Ok(()) => {}
        Err(AuthError::Refused(e)) => {
            tracing::info!(user, error = %e.message, "client authentication failed");
            let method = shared.users.load().method_for(&user);
            METRICS
                .auth_failures
                .with_label_values(&[method.name()])
                .inc();
            send_error(&mut stream, &e).await;
            return None;
        }
        Err(AuthError::Io(_)) => return None,
    }
    Some(Login {
        stream,
        buf,
        params,
        user,
        database,
    })
}

/// Startup parameters: pairs of NUL-terminated strings ending with an empty one.
fn parse_startup(mut body: &[u8]) -> Option<BTreeMap<String, String>> {
    let mut params = BTreeMap::new();
    loop {
        let mut pos = 0;
        let key = wire::read_cstr(body, &mut pos)?;
        if key.is_empty() {
            return Some(params);
        }
        let value = wire::read_cstr(body, &mut pos)?;
        params.insert(key.to_string(), value.to_string());
        body.advance(pos);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_startup_parameters() {
        let p = parse_startup(b"user\0app\0database\0db\0\0").unwrap();
        assert_eq!(p["user"], "app");
        assert_eq!(p["database"], "db");
        assert!(parse_startup(b"user\0app").is_none());
    }

    fn future_size<A, B, C, F>(_: impl Fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// What every idle client costs: its task's future (as large as its largest state) and the
    /// session on the heap. Login, session start and the console are boxed futures freed before
    /// the session's loop, and the session lives on the heap; the loop's largest state is the
    /// handling of a client's input, kept to one future per level (an async fn's arguments stay
    /// in its future, and each `.await` of a call has its own slot). Tokio adds about 104 bytes
    /// of task header and trailer and rounds the task up to 128-byte lines: a future of at most
    /// 272 bytes makes a 384-byte task. (240 bytes in debug and release builds now, 256 when
    /// written, 392 before; 464–472 for the session.)
    #[test]
    fn an_idle_client_task_stays_small() {
        let task = future_size(client);
        let session = std::mem::size_of::<Session>();
        assert!(task <= 272, "a client's task future is {task} bytes");
        assert!(session <= 480, "a session is {session} bytes");
    }
}
