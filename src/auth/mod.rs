//! Client-facing authentication: which method a user gets, their secrets, and the exchanges
//! (trust, reject, md5, SCRAM-SHA-256) over the client's socket. Upstream authentication lives with
//! the upstream connection (`pool::upstream`).

mod scram;
pub mod scram_client;

pub use scram::{ScramError, ScramSecret, ScramServer};

use crate::config::{AuthMethod, Config};
use crate::error::{sqlstate, PgError};
use crate::wire;
use bytes::{Bytes, BytesMut};
use pgwire::messages::startup::Authentication;
use pgwire::messages::PgWireBackendMessage;
use rand::RngCore;
use std::collections::HashMap;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// True for a `pg_authid`-style md5 secret: `md5` and 32 hex digits.
pub fn is_md5_secret(s: &str) -> bool {
    s.len() == 35 && s.starts_with("md5") && s[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// md5 secret as PostgreSQL stores it: `md5` + hex(md5(password || user)).
fn md5_secret(password: &str, user: &str) -> String {
    postgres_protocol::password::md5(password.as_bytes(), user)
}

#[derive(Debug, Clone)]
struct UserAuth {
    method: AuthMethod,
    md5: Option<String>,
    scram: Option<ScramSecret>,
}

/// Everything needed to authenticate clients, derived once from the config (SCRAM secrets from
/// cleartext passwords cost thousands of hash rounds: never per connection).
#[derive(Debug, Clone)]
pub struct Users {
    users: HashMap<String, UserAuth>,
    default_method: AuthMethod,
}

impl Users {
    pub fn from_config(c: &Config) -> Self {
        let users = c
            .users
            .iter()
            .map(|(name, u)| {
                let (md5, scram) = match u.password.as_deref() {
                    None => (None, None),
                    Some(p) if is_md5_secret(p) => (Some(p.to_string()), None),
                    Some(p) if p.starts_with("SCRAM-SHA-256$") => {
                        (None, ScramSecret::parse(p).ok())
                    }
                    Some(p) => (
                        Some(md5_secret(p, name)),
                        Some(ScramSecret::from_password(p)),
                    ),
                };
                let auth = UserAuth {
                    method: u.method.unwrap_or(c.auth.method),
                    md5,
                    scram,
                };
                (name.clone(), auth)
            })
            .collect();
        Users {
            users,
            default_method: c.auth.method,
        }
    }

    pub fn method_for(&self, user: &str) -> AuthMethod {
        self.users
            .get(user)
            .map(|u| u.method)
            .unwrap_or(self.default_method)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Tell the client and close.
    #[error(transparent)]
    Refused(#[from] PgError),
    /// The client went away or broke the protocol mid-exchange.
    #[error("client connection: {0}")]
    Io(#[from] std::io::Error),
}

fn password_failed(user: &str) -> PgError {
    PgError::fatal(
        sqlstate::INVALID_PASSWORD,
        format!("password authentication failed for user \"{user}\""),
    )
}

fn protocol_error(what: impl std::fmt::Display) -> PgError {
    PgError::fatal(
        sqlstate::PROTOCOL_VIOLATION,
        format!("invalid authentication message: {what}"),
    )
}

/// Run the configured exchange for `user`. On success nothing has been sent yet of
/// `AuthenticationOk`; the caller sends it with the rest of the startup reply. `end_point`: the
/// connection's `tls-server-end-point` channel binding (TLS with a certificate that has one):
/// SCRAM then offers SCRAM-SHA-256-PLUS too.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    users: &Users,
    user: &str,
    max_message: usize,
    end_point: Option<&[u8]>,
) -> Result<(), AuthError> {
    let entry = users.users.get(user);
    match users.method_for(user) {
        AuthMethod::Trust => Ok(()),
        AuthMethod::Reject => Err(PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            format!("pgcache configuration rejects connections for user \"{user}\""),
        )
        .into()),
        AuthMethod::Md5 => match entry.and_then(|u| u.md5.as_deref()) {
            Some(secret) => md5_exchange(stream, buf, secret, user, max_message).await,
            // PostgreSQL also falls back to SCRAM when only a SCRAM secret is stored.
            None => {
                let scram = entry.and_then(|u| u.scram.clone());
                scram_exchange(stream, buf, scram, user, max_message, end_point).await
            }
        },
        AuthMethod::ScramSha256 => {
            let scram = entry.and_then(|u| u.scram.clone());
            scram_exchange(stream, buf, scram, user, max_message, end_point).await
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, auth: Authentication) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    wire::encode(PgWireBackendMessage::Authentication(auth), &mut out);
    stream.write_all(&out).await?;
    stream.flush().await
}

/// Read one password-family ('p') message body.
async fn read_password_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_message: usize,
) -> Result<Bytes, AuthError> {
    let (tag, body) = wire::read_message(stream, buf, max_message)
        .await?
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
    if tag != b'p' {
        return Err(protocol_error(format!(
            "expected a password message, got {:?}",
            tag as char
        ))
        .into());
    }
    Ok(body)
}

async fn md5_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    secret: &str,
    user: &str,
    max_message: usize,
) -> Result<(), AuthError> {
    let mut salt = [0u8; 4];
    rand::rng().fill_bytes(&mut salt);
    send(stream, Authentication::MD5Password(salt.to_vec())).await?;
    let body = read_password_message(stream, buf, max_message).await?;
    let got = body.strip_suffix(&[0]).unwrap_or(&body);
    // The client sends md5(hex(md5(password || user)) || salt); the stored secret is the inner hash.
    let expected = {
        use md5::{Digest, Md5};
        let mut h = Md5::new();
        h.update(&secret.as_bytes()[3..]);
        h.update(salt);
        format!("md5{:x}", h.finalize())
    };
    if got == expected.as_bytes() {
        Ok(())
    } else {
        Err(password_failed(user).into())
    }
}

async fn scram_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    secret: Option<ScramSecret>,
    user: &str,
    max_message: usize,
    end_point: Option<&[u8]>,
) -> Result<(), AuthError> {
    const SCRAM: &str = "SCRAM-SHA-256";
    const SCRAM_PLUS: &str = "SCRAM-SHA-256-PLUS";
    let known = secret.is_some();
    let secret = secret.unwrap_or_else(ScramSecret::mock);
    // PostgreSQL's order: the bound mechanism first, where there is one.
    let offer = match end_point {
        Some(_) => vec![SCRAM_PLUS.into(), SCRAM.into()],
        None => vec![SCRAM.into()],
    };
    send(stream, Authentication::SASL(offer)).await?;
    let body = read_password_message(stream, buf, max_message).await?;
    let mut pos = 0;
    let mechanism =
        wire::read_cstr(&body, &mut pos).ok_or_else(|| protocol_error("no mechanism"))?;
    let plus = match mechanism {
        SCRAM => false,
        SCRAM_PLUS if end_point.is_some() => true,
        _ => {
            return Err(protocol_error(format!("unsupported SASL mechanism {mechanism:?}")).into())
        }
    };
    let len_bytes = body
        .get(pos..pos + 4)
        .ok_or_else(|| protocol_error("truncated"))?;
    let len = i32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
    let data = usize::try_from(len)
        .ok()
        .and_then(|l| body.get(pos + 4..pos + 4 + l))
        .ok_or_else(|| protocol_error("bad SASL data length"))?;
    let (server, first) =
        ScramServer::start(&secret, data, plus, end_point).map_err(|e| match e {
            ScramError::Downgrade => PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string())
                .with_detail(
                    "The client supports SCRAM channel binding but thinks the server does not.  \
                     However, this server does support channel binding.",
                ),
            e => protocol_error(e),
        })?;
    send(stream, Authentication::SASLContinue(Bytes::from(first))).await?;
    let body = read_password_message(stream, buf, max_message).await?;
    match server.finish(&body) {
        Ok(last) if known => {
            send(stream, Authentication::SASLFinal(Bytes::from(last))).await?;
            Ok(())
        }
        Ok(_) | Err(ScramError::WrongPassword) => Err(password_failed(user).into()),
        // PostgreSQL's words and code for it.
        Err(e @ ScramError::BindingMismatch) => {
            Err(PgError::fatal(sqlstate::INVALID_AUTHORIZATION, e.to_string()).into())
        }
        Err(e) => Err(protocol_error(e).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_md5_secrets() {
        assert!(is_md5_secret(&md5_secret("pw", "u")));
        assert!(!is_md5_secret("md5short"));
        assert!(!is_md5_secret("cleartext-password-of-35-characters"));
    }

    #[test]
    fn users_take_default_method() {
        let c = crate::config::load_str(
            "[auth]\nmethod = \"md5\"\n[users.a]\npassword = \"x\"\n[users.b]\npassword = \"y\"\nmethod = \"reject\"\n",
            "t",
            std::iter::empty(),
        )
        .unwrap();
        let u = Users::from_config(&c);
        assert_eq!(u.method_for("a"), AuthMethod::Md5);
        assert_eq!(u.method_for("b"), AuthMethod::Reject);
        assert_eq!(u.method_for("nobody"), AuthMethod::Md5);
    }
}
