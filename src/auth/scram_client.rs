//! Client side of SCRAM-SHA-256 (RFC 5802/7677 as PostgreSQL speaks it): the proxy logging in
//! to the upstream. It keeps the salted password of each (password, salt, iterations) it has
//! derived: PBKDF2 over PostgreSQL's 4,096 rounds costs 0.8 ms of CPU here (postgres-protocol's
//! client, which this replaced, paid it on every login), and a user's salt only changes with
//! its password, so a pool opening 20 server connections pays it once, not 20 times — on one
//! worker thread (`proxy.worker_threads = 1`) every client waited for that sum.

use super::scram::{attr, hmac, same_bytes, xor, ScramError};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

/// More rounds than this are refused (a server could make every login burn CPU for seconds).
const MAX_ITERATIONS: u32 = 100_000;

/// Bound on the salted passwords kept; past it the map starts over.
const MAX_SALTED: usize = 256;

type SaltedKey = ([u8; 32], Vec<u8>, u32);

/// Salted passwords by (SHA-256 of the password, salt, iterations).
static SALTED: LazyLock<Mutex<HashMap<SaltedKey, [u8; 32]>>> = LazyLock::new(Default::default);

/// How the exchange is bound to the TLS channel (RFC 5802 §6, the GS2 header).
pub enum Binding {
    /// No TLS, or the client will not bind: `n`.
    Unsupported,
    /// The client could bind but the server did not offer SCRAM-SHA-256-PLUS: `y`.
    Unrequested,
    /// Bound to the server certificate's hash (`tls-server-end-point`): `p`.
    EndPoint(Vec<u8>),
}

impl Binding {
    fn gs2_header(&self) -> &'static str {
        match self {
            Binding::Unsupported => "n,,",
            Binding::Unrequested => "y,,",
            Binding::EndPoint(_) => "p=tls-server-end-point,,",
        }
    }
}

enum State {
    First {
        nonce: String,
        password: Vec<u8>,
        binding: Binding,
    },
    Final {
        server_key: [u8; 32],
        auth_message: String,
    },
    Done,
}

pub struct ScramClient {
    message: String,
    /// The client-first-message without its GS2 header.
    first_bare: String,
    state: State,
}

impl ScramClient {
    /// Start an exchange: `message` is then the client-first-message.
    pub fn new(password: &str, binding: Binding) -> ScramClient {
        let mut raw = [0u8; 18];
        rand::rng().fill_bytes(&mut raw);
        // PostgreSQL takes the user from the startup packet and ignores SCRAM's.
        Self::with_nonce("", password, binding, B64.encode(raw))
    }

    fn with_nonce(user: &str, password: &str, binding: Binding, nonce: String) -> ScramClient {
        let first_bare = format!("n={user},r={nonce}");
        ScramClient {
            message: format!("{}{first_bare}", binding.gs2_header()),
            first_bare,
            state: State::First {
                nonce,
                password: normalize(password),
                binding,
            },
        }
    }

    /// What to send next: the client-first-message, then the client-final-message.
    pub fn message(&self) -> &[u8] {
        self.message.as_bytes()
    }

    /// Take the server-first-message; `message` becomes the client-final-message.
    pub fn update(&mut self, server_first: &[u8]) -> Result<(), ScramError> {
        let State::First {
            nonce,
            password,
            binding,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::BadMessage("server-first-message out of turn"));
        };
        let server_first = std::str::from_utf8(server_first)
            .map_err(|_| ScramError::BadMessage("server-first-message is not UTF-8"))?;
        let combined = attr(server_first, 'r')
            .filter(|r| r.len() > nonce.len() && r.starts_with(nonce.as_str()))
            .ok_or(ScramError::BadMessage("server nonce does not extend ours"))?;
        let salt = attr(server_first, 's')
            .and_then(|s| B64.decode(s).ok())
            .ok_or(ScramError::BadMessage("missing or malformed salt"))?;
        let iterations: u32 = attr(server_first, 'i')
            .and_then(|i| i.parse().ok())
            .filter(|i| (1..=MAX_ITERATIONS).contains(i))
            .ok_or(ScramError::BadMessage(
                "iteration count missing or out of range",
            ))?;
        let salted = salted_password(&password, &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let mut cbind = binding.gs2_header().as_bytes().to_vec();
        if let Binding::EndPoint(data) = &binding {
            cbind.extend_from_slice(data);
        }
        let without_proof = format!("c={},r={combined}", B64.encode(cbind));
        let auth_message = format!("{},{server_first},{without_proof}", self.first_bare);
        let proof = xor(&client_key, &hmac(&stored_key, auth_message.as_bytes()));
        self.message = format!("{without_proof},p={}", B64.encode(proof));
        self.state = State::Final {
            server_key: hmac(&salted, b"Server Key"),
            auth_message,
        };
        Ok(())
    }

    /// Check the server-final-message: the server proves it knows the password too.
    pub fn finish(&mut self, server_final: &[u8]) -> Result<(), ScramError> {
        let State::Final {
            server_key,
            auth_message,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::BadMessage("server-final-message out of turn"));
        };
        let server_final = std::str::from_utf8(server_final)
            .map_err(|_| ScramError::BadMessage("server-final-message is not UTF-8"))?;
        if let Some(e) = attr(server_final, 'e') {
            return Err(ScramError::ServerRefused(e.to_string()));
        }
        let verifier = attr(server_final, 'v')
            .and_then(|v| B64.decode(v).ok())
            .ok_or(ScramError::BadMessage(
                "missing or malformed server signature",
            ))?;
        if !same_bytes(&verifier, &hmac(&server_key, auth_message.as_bytes())) {
            return Err(ScramError::ServerSignature);
        }
        Ok(())
    }
}

/// SASLprep, as PostgreSQL applies it; a password it rejects is used as it is (as PostgreSQL
/// does when it stores one).
fn normalize(password: &str) -> Vec<u8> {
    match stringprep::saslprep(password) {
        Ok(p) => p.into_owned().into_bytes(),
        Err(_) => password.as_bytes().to_vec(),
    }
}

/// Hi(password, salt, iterations) of RFC 5802, kept for the next login with the same three.
fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let key: SaltedKey = (Sha256::digest(password).into(), salt.to_vec(), iterations);
    let lock = || SALTED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = lock().get(&key) {
        return *s;
    }
    // Outside the lock: other logins need not wait for this one's rounds.
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut salted);
    let mut map = lock();
    if map.len() >= MAX_SALTED {
        map.clear();
    }
    map.insert(key, salted);
    salted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scram::{ScramSecret, ScramServer};

    /// RFC 7677 §3's example exchange (user "user", password "pencil").
    #[test]
    fn follows_the_rfc_7677_example() {
        let mut c = ScramClient::with_nonce(
            "user",
            "pencil",
            Binding::Unsupported,
            "rOprNGfwEbeRWgbNEkqO".into(),
        );
        assert_eq!(c.message(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        c.update(
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
              s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        )
        .unwrap();
        assert_eq!(
            std::str::from_utf8(c.message()).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        c.finish(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
    }

    /// With the proxy's own server side: the right password passes both ways, a wrong one is
    /// refused by the server, and a server that does not know the password is caught.
    fn exchange(secret: &ScramSecret, password: &str) -> Result<(), ScramError> {
        let mut c = ScramClient::new(password, Binding::Unsupported);
        let (server, first) = ScramServer::start(secret, c.message(), false, None)?;
        c.update(first.as_bytes())?;
        let last = server.finish(c.message())?;
        c.finish(last.as_bytes())
    }

    #[test]
    fn logs_in_to_a_scram_server_and_checks_it() {
        let secret = ScramSecret::from_password("s3cret");
        assert_eq!(exchange(&secret, "s3cret"), Ok(()));
        // Again: the salted password now comes from the map, with the same result.
        assert_eq!(exchange(&secret, "s3cret"), Ok(()));
        assert_eq!(exchange(&secret, "wrong"), Err(ScramError::WrongPassword));

        let mut c = ScramClient::new("s3cret", Binding::Unsupported);
        let (_, first) = ScramServer::start(&secret, c.message(), false, None).unwrap();
        c.update(first.as_bytes()).unwrap();
        let forged = format!("v={}", B64.encode([7u8; 32]));
        assert_eq!(
            c.finish(forged.as_bytes()),
            Err(ScramError::ServerSignature)
        );
    }

    /// Bound to the server's certificate hash: the server sees the same channel, or (another
    /// certificate in the middle) refuses.
    #[test]
    fn binds_to_the_servers_end_point() {
        let secret = ScramSecret::from_password("bound");
        let end_point = [5u8; 32];
        let run = |ours: &[u8]| {
            let mut c = ScramClient::new("bound", Binding::EndPoint(ours.to_vec()));
            let (server, first) = ScramServer::start(&secret, c.message(), true, Some(&end_point))?;
            c.update(first.as_bytes())?;
            let last = server.finish(c.message())?;
            c.finish(last.as_bytes())
        };
        assert_eq!(run(&end_point), Ok(()));
        assert_eq!(run(&[6u8; 32]), Err(ScramError::BindingMismatch));
    }

    #[test]
    fn keeps_one_salted_password_per_password_salt_and_rounds() {
        let salt = b"a salt of its own";
        let key = |p: &[u8], i| (Sha256::digest(p).into(), salt.to_vec(), i);
        let first = salted_password(b"kept", salt, 4096);
        let mut direct = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(b"kept", salt, 4096, &mut direct);
        assert_eq!(first, direct);
        let held = SALTED.lock().unwrap().get(&key(b"kept", 4096)).copied();
        assert_eq!(held, Some(direct));
        assert_ne!(salted_password(b"kept", salt, 4097), first);
        assert_ne!(salted_password(b"other", salt, 4096), first);
    }

    #[test]
    fn refuses_a_nonce_it_did_not_start_and_absurd_rounds() {
        let mut c = ScramClient::with_nonce("", "pw", Binding::Unsupported, "abc".into());
        assert!(c.update(b"r=xyzdef,s=c2FsdA==,i=4096").is_err());
        let mut c = ScramClient::with_nonce("", "pw", Binding::Unsupported, "abc".into());
        assert!(c.update(b"r=abcdef,s=c2FsdA==,i=1000000000").is_err());
        let mut c = ScramClient::with_nonce("", "pw", Binding::Unsupported, "abc".into());
        assert!(
            c.update(b"r=abc,s=c2FsdA==,i=4096").is_err(),
            "nothing added"
        );
    }
}
