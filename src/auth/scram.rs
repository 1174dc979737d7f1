//! Server side of SCRAM-SHA-256 (RFC 5802/7677 as PostgreSQL uses it), so clients authenticate to
//! the proxy exactly as they would to PostgreSQL. Secrets are the `pg_authid` form
//! `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`; a cleartext password from the config
//! is turned into one once, at load.

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
    #[error("channel binding is not supported by the proxy")]
    ChannelBinding,
    #[error("wrong password")]
    WrongPassword,
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
    gs2_header: String,
    nonce: String,
}

fn attr(msg: &str, name: char) -> Option<&str> {
    msg.split(',')
        .find_map(|p| p.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
}

impl<'a> ScramServer<'a> {
    /// Take the client-first-message, return the server-first-message.
    pub fn start(
        secret: &'a ScramSecret,
        client_first: &[u8],
    ) -> Result<(Self, String), ScramError> {
        let msg = std::str::from_utf8(client_first)
            .map_err(|_| ScramError::BadMessage("client-first is not UTF-8"))?;
        let (cb_flag, rest) = msg
            .split_once(',')
            .ok_or(ScramError::BadMessage("missing gs2 header"))?;
        match cb_flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::BadMessage("bad channel binding flag")),
        }
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
                gs2_header: format!("{cb_flag},{authzid},"),
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
        if binding != B64.encode(self.gs2_header.as_bytes()) {
            return Err(ScramError::BadMessage(
                "channel binding data does not match",
            ));
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
        let client_key: Vec<u8> = proof
            .iter()
            .zip(client_signature.iter())
            .map(|(a, b)| a ^ b)
            .collect();
        let stored: [u8; 32] = Sha256::digest(&client_key).into();
        // Constant-time comparison: fold every byte difference before deciding.
        let diff = stored
            .iter()
            .zip(self.secret.stored_key.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(ScramError::WrongPassword);
        }
        let server_signature = hmac(&self.secret.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(data);
    m.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn run(secret: &ScramSecret, password: &str) -> Result<(), ScramError> {
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let (server, first) = ScramServer::start(secret, client.message())?;
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
    fn channel_binding_request_is_refused() {
        let secret = ScramSecret::from_password("x");
        let r = ScramServer::start(&secret, b"p=tls-server-end-point,,n=,r=abc");
        assert!(matches!(r, Err(ScramError::ChannelBinding)));
    }
}
