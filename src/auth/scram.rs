//! Server side of SCRAM-SHA-256 (RFC 5802/7677 as PostgreSQL uses it), so clients authenticate to
//! the proxy exactly as they would to PostgreSQL. Secrets are the `pg_authid` form
//! `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`; a cleartext password from the config
//! is turned into one once, at load. Over TLS the exchange can be bound to the channel
//! (SCRAM-SHA-256-PLUS with `tls-server-end-point`, as PostgreSQL offers it), so a client that
//! requires channel binding knows no one in the middle holds another certificate.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScramSecret {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM secret: {0}")]
    BadSecret(&'static str),
    #[error("malformed SCRAM message: {0}")]
    BadMessage(&'static str),
    /// The client can bind but was led to believe the server cannot (RFC 5802 §6: the offer of
    /// SCRAM-SHA-256-PLUS may have been stripped on the way).
    #[error("SCRAM channel binding negotiation error")]
    Downgrade,
    /// The client bound to another channel than this one: it was shown another certificate.
    #[error("SCRAM channel binding check failed")]
    BindingMismatch,
    #[error("wrong password")]
    WrongPassword,
    /// Client side: the server ended the exchange with an error (`e=`).
    #[error("the server refused: {0}")]
    ServerRefused(String),
    /// Client side: the server's signature is wrong (it does not know the password).
    #[error("the server's signature does not match")]
    ServerSignature,
}

fn key32(b64: &str) -> Result<[u8; 32], ScramError> {
    let v = B64
        .decode(b64)
        .map_err(|_| ScramError::BadSecret("key is not base64"))?;
    v.try_into()
        .map_err(|_| ScramError::BadSecret("key is not 32 bytes"))
}

impl ScramSecret {
    pub fn parse(s: &str) -> Result<Self, ScramError> {
        let rest = s
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(ScramError::BadSecret("does not start with SCRAM-SHA-256$"))?;
        let (iter_salt, keys) = rest
            .split_once('$')
            .ok_or(ScramError::BadSecret("missing '$' before the keys"))?;
        let (iter, salt) = iter_salt.split_once(':').ok_or(ScramError::BadSecret(
            "missing ':' between iterations and salt",
        ))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or(ScramError::BadSecret("missing ':' between the keys"))?;
        Ok(ScramSecret {
            iterations: iter
                .parse()
                .map_err(|_| ScramError::BadSecret("iterations is not a number"))?,
            salt: B64
                .decode(salt)
                .map_err(|_| ScramError::BadSecret("salt is not base64"))?,
            stored_key: key32(stored)?,
            server_key: key32(server)?,
        })
    }

    /// Derive a secret from a cleartext password (SASLprep, random salt, 4096 iterations).
    pub fn from_password(password: &str) -> Self {
        let s = postgres_protocol::password::scram_sha_256(password.as_bytes());
        Self::parse(&s).expect("postgres-protocol produces well-formed secrets")
    }

    /// A random secret that no password matches: unknown users go through the same exchange as
    /// known ones and fail at the end, so the proxy does not reveal which users exist.
    pub fn mock() -> Self {
        let mut rng = rand::rng();
        let mut s = ScramSecret {
            iterations: 4096,
            salt: vec![0; 16],
            stored_key: [0; 32],
            server_key: [0; 32],
        };
        rng.fill_bytes(&mut s.salt);
        rng.fill_bytes(&mut s.stored_key);
        rng.fill_bytes(&mut s.server_key);
        s
    }
}

/// One exchange, driven by the caller's message loop.
pub struct ScramServer<'a> {
    secret: &'a ScramSecret,
    client_first_bare: String,
    server_first: String,
    /// The `c=` attribute the client-final message must carry: the GS2 header and, bound, the
    /// channel-binding data, in base64.
    binding: String,
    /// SCRAM-SHA-256-PLUS: a wrong `c=` is another channel, not a malformed message.
    plus: bool,
    nonce: String,
}

pub(super) fn attr(msg: &str, name: char) -> Option<&str> {
    msg.split(',')
        .find_map(|p| p.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
}

impl<'a> ScramServer<'a> {
    /// Take the client-first-message, return the server-first-message. `plus`: the client chose
    /// SCRAM-SHA-256-PLUS; `end_point`: this connection's `tls-server-end-point` data when the
    /// server offered SCRAM-SHA-256-PLUS (TLS, a certificate it can bind to).
    pub fn start(
        secret: &'a ScramSecret,
        client_first: &[u8],
        plus: bool,
        end_point: Option<&[u8]>,
    ) -> Result<(Self, String), ScramError> {
        let msg = std::str::from_utf8(client_first)
            .map_err(|_| ScramError::BadMessage("client-first is not UTF-8"))?;
        let (cb_flag, rest) = msg
            .split_once(',')
            .ok_or(ScramError::BadMessage("missing gs2 header"))?;
        let data: &[u8] = match (cb_flag, plus) {
            ("n", false) => &[],
            ("y", false) if end_point.is_none() => &[],
            ("y", false) => return Err(ScramError::Downgrade),
            ("p=tls-server-end-point", true) => {
                end_point.ok_or(ScramError::BadMessage("SCRAM-SHA-256-PLUS was not offered"))?
            }
            (f, true) if f.starts_with("p=") => {
                return Err(ScramError::BadMessage("unsupported channel binding type"))
            }
            (f, false) if f.starts_with("p=") => {
                return Err(ScramError::BadMessage(
                    "channel binding requested without SCRAM-SHA-256-PLUS",
                ))
            }
            ("n" | "y", true) => {
                return Err(ScramError::BadMessage(
                    "SCRAM-SHA-256-PLUS without channel binding",
                ))
            }
            _ => return Err(ScramError::BadMessage("bad channel binding flag")),
        };
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::BadMessage("missing gs2 header"))?;
        let client_nonce = attr(bare, 'r').ok_or(ScramError::BadMessage("missing client nonce"))?;
        if client_nonce.is_empty() {
            return Err(ScramError::BadMessage("empty client nonce"));
        }
        let mut raw = [0u8; 18];
        rand::rng().fill_bytes(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&secret.salt),
            secret.iterations
        );
        Ok((
            ScramServer {
                secret,
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                binding: {
                    let mut input = format!("{cb_flag},{authzid},").into_bytes();
                    input.extend_from_slice(data);
                    B64.encode(input)
                },
                plus,
                nonce,
            },
            server_first,
        ))
    }

    /// Take the client-final-message; on success return the server-final-message.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let msg = std::str::from_utf8(client_final)
            .map_err(|_| ScramError::BadMessage("client-final is not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::BadMessage("missing proof"))?;
        let binding = attr(without_proof, 'c').ok_or(ScramError::BadMessage("missing c="))?;
        if binding != self.binding {
            return Err(if self.plus {
                ScramError::BindingMismatch
            } else {
                ScramError::BadMessage("unexpected channel binding attribute")
            });
        }
        if attr(without_proof, 'r') != Some(self.nonce.as_str()) {
            return Err(ScramError::BadMessage("nonce does not match"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::BadMessage("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::WrongPassword);
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.secret.stored_key, auth_message.as_bytes());
        let client_key = xor(&proof, &client_signature);
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !same_bytes(&stored, &self.secret.stored_key) {
            return Err(ScramError::WrongPassword);
        }
        let server_signature = hmac(&self.secret.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// `a` (32 bytes, as the caller checked) XOR `b`: a proof from a key and a signature, or back.
pub(super) fn xor(a: &[u8], b: &[u8; 32]) -> [u8; 32] {
    let mut out = *b;
    for (o, x) in out.iter_mut().zip(a) {
        *o ^= x;
    }
    out
}

/// Whether `a` and `b` are equal, in a time that depends on their length only: a timing
/// difference would tell an attacker how much of a key or signature matched.
pub(super) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

pub(super) fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(data);
    m.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn run(secret: &ScramSecret, password: &str) -> Result<(), ScramError> {
        exchange(secret, password, ChannelBinding::unsupported(), false, None)
    }

    /// A whole exchange with postgres-protocol's client (the one tokio-postgres uses).
    fn exchange(
        secret: &ScramSecret,
        password: &str,
        client_binding: ChannelBinding,
        plus: bool,
        end_point: Option<&[u8]>,
    ) -> Result<(), ScramError> {
        let mut client = ScramSha256::new(password.as_bytes(), client_binding);
        let (server, first) = ScramServer::start(secret, client.message(), plus, end_point)?;
        client.update(first.as_bytes()).unwrap();
        let last = server.finish(client.message())?;
        client
            .finish(last.as_bytes())
            .map_err(|_| ScramError::BadMessage("client rejected server signature"))
    }

    #[test]
    fn real_client_authenticates_with_right_password() {
        let secret = ScramSecret::from_password("s3cret");
        run(&secret, "s3cret").unwrap();
    }

    #[test]
    fn wrong_password_and_mock_secret_fail() {
        let secret = ScramSecret::from_password("s3cret");
        assert_eq!(run(&secret, "nope"), Err(ScramError::WrongPassword));
        assert_eq!(
            run(&ScramSecret::mock(), "s3cret"),
            Err(ScramError::WrongPassword)
        );
    }

    #[test]
    fn parses_pg_authid_form() {
        let s = postgres_protocol::password::scram_sha_256(b"x");
        let parsed = ScramSecret::parse(&s).unwrap();
        assert_eq!(parsed.iterations, 4096);
        assert!(ScramSecret::parse("SCRAM-SHA-256$4096:abc").is_err());
    }

    #[test]
    fn binds_to_the_servers_certificate() {
        let secret = ScramSecret::from_password("x");
        let ours = [7u8; 32];
        let bound = |theirs: &[u8]| {
            exchange(
                &secret,
                "x",
                ChannelBinding::tls_server_end_point(theirs.to_vec()),
                true,
                Some(&ours),
            )
        };
        bound(&ours).unwrap();
        // The client saw another certificate: someone in the middle.
        assert_eq!(bound(&[8u8; 32]), Err(ScramError::BindingMismatch));
        // Over a channel the server can bind, a client that could have bound and thinks the
        // server cannot was downgraded.
        let y = ChannelBinding::unrequested();
        assert_eq!(
            exchange(&secret, "x", y, false, Some(&ours)),
            Err(ScramError::Downgrade)
        );
        exchange(&secret, "x", ChannelBinding::unrequested(), false, None).unwrap();
        // A bound client-final in a plain exchange: a malformed message, not another channel.
        let (server, _) = ScramServer::start(&secret, b"n,,n=,r=abc", false, None).unwrap();
        assert_eq!(
            server.finish(b"c=cD10bHMtc2VydmVyLWVuZC1wb2ludCwsAQID,r=abc,p=AAAA"),
            Err(ScramError::BadMessage(
                "unexpected channel binding attribute"
            ))
        );
        exchange(
            &secret,
            "x",
            ChannelBinding::unsupported(),
            false,
            Some(&ours),
        )
        .unwrap();
    }

    #[test]
    fn binding_flags_must_match_the_mechanism() {
        let secret = ScramSecret::from_password("x");
        let ep: &[u8] = &[1, 2, 3];
        let start = |first: &[u8], plus, end_point| {
            ScramServer::start(&secret, first, plus, end_point).map(|_| ())
        };
        let bad = |m: &'static str| Err(ScramError::BadMessage(m));
        let p = b"p=tls-server-end-point,,n=,r=abc";
        assert_eq!(
            start(p, false, Some(ep)),
            bad("channel binding requested without SCRAM-SHA-256-PLUS")
        );
        assert_eq!(
            start(p, true, None),
            bad("SCRAM-SHA-256-PLUS was not offered")
        );
        assert_eq!(
            start(b"p=tls-unique,,n=,r=abc", true, Some(ep)),
            bad("unsupported channel binding type")
        );
        for flag in [&b"n,,n=,r=abc"[..], b"y,,n=,r=abc"] {
            assert_eq!(
                start(flag, true, Some(ep)),
                bad("SCRAM-SHA-256-PLUS without channel binding")
            );
        }
        assert_eq!(
            start(b"y,,n=,r=abc", false, Some(ep)),
            Err(ScramError::Downgrade)
        );
        assert!(start(b"p=tls-server-end-point,,n=,r=abc", true, Some(ep)).is_ok());
    }
}
