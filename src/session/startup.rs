//! The end of a client's startup: carry its startup parameters (`application_name`,
//! `client_encoding`, `options=-c ...`) onto the server connection it was lent, and send the
//! client `AuthenticationOk`, the resulting `ParameterStatus` set, the proxy's `BackendKeyData`
//! and `ReadyForQuery`.

use crate::error::{sqlstate, PgError};
use crate::session::cancel::ClientKey;
use crate::wire;
use bytes::BytesMut;
use std::collections::BTreeMap;

/// Startup keys that are not run-time settings.
const NOT_SETTINGS: [&str; 4] = ["user", "database", "options", "replication"];

/// Settings requested in the startup packet, including `options=-c name=value`.
pub fn requested_settings(
    params: &BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, PgError> {
    let mut out: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| !NOT_SETTINGS.contains(&k.as_str()) && !k.starts_with("_pq_."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(options) = params.get("options") {
        out.extend(parse_options(options)?);
    }
    for (name, _) in &out {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            return Err(PgError::fatal(
                sqlstate::INVALID_PARAMETER_VALUE,
                format!("invalid startup parameter name \"{name}\""),
            ));
        }
    }
    Ok(out)
}

/// `-c a=b -c x=y`, `--a=b`, with `\ ` escaping a space, as the server's own parser reads them.
fn parse_options(options: &str) -> Result<Vec<(String, String)>, PgError> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let bad = |w: &str| {
        PgError::fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!("unsupported startup option \"{w}\""),
        )
        .with_hint("pgcache supports -c name=value and --name=value in options")
    };
    let mut out = Vec::new();
    let mut it = words.iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next().ok_or_else(|| bad(w))?.as_str()
        } else if let Some(s) = w.strip_prefix("-c") {
            s
        } else if let Some(s) = w.strip_prefix("--") {
            s
        } else {
            return Err(bad(w));
        };
        let (k, v) = setting.split_once('=').ok_or_else(|| bad(w))?;
        out.push((k.replace('-', "_"), v.to_string()));
    }
    Ok(out)
}

/// Everything the client receives after authentication succeeds. Written out directly: with
/// pgwire's messages every `ParameterStatus` cost two `String` copies, a fifth of what a
/// connection storm's login costs the proxy in instructions.
pub fn reply(params: &BTreeMap<String, String>, key: ClientKey, out: &mut BytesMut) {
    // One allocation for all of it: AuthenticationOk 9 bytes, each ParameterStatus 7 plus its
    // name and value, BackendKeyData 13, ReadyForQuery 6.
    let room: usize = params.iter().map(|(k, v)| 7 + k.len() + v.len()).sum();
    out.reserve(9 + room + 13 + 6);
    // AuthenticationOk.
    wire::frame(b'R', &[&0i32.to_be_bytes()], out);
    for (k, v) in params {
        wire::frame(b'S', &[k.as_bytes(), b"\0", v.as_bytes(), b"\0"], out);
    }
    wire::frame(
        b'K',
        &[&key.pid.to_be_bytes(), &key.secret.to_be_bytes()],
        out,
    );
    wire::ready_for_query(b'I', out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_login_reply_is_what_pgwire_would_encode() {
        use pgwire::messages::startup::{
            Authentication, BackendKeyData, ParameterStatus, SecretKey,
        };
        use pgwire::messages::PgWireBackendMessage as M;
        let mut p = BTreeMap::new();
        p.insert("server_version".to_string(), "15.18".to_string());
        p.insert("client_encoding".to_string(), "UTF8".to_string());
        p.insert("application_name".to_string(), "".to_string());
        let key = ClientKey {
            pid: 0x1234_5678,
            secret: -2,
        };
        let mut got = BytesMut::new();
        reply(&p, key, &mut got);
        let mut want = BytesMut::new();
        wire::encode(M::Authentication(Authentication::Ok), &mut want);
        for (k, v) in &p {
            wire::encode(
                M::ParameterStatus(ParameterStatus::new(k.clone(), v.clone())),
                &mut want,
            );
        }
        wire::encode(
            M::BackendKeyData(BackendKeyData::new(key.pid, SecretKey::I32(key.secret))),
            &mut want,
        );
        wire::ready_for_query(b'I', &mut want);
        assert_eq!(got, want);
    }

    #[test]
    fn reads_settings_and_options() {
        let mut p = BTreeMap::new();
        p.insert("user".into(), "u".into());
        p.insert("application_name".into(), "psql".into());
        p.insert(
            "options".into(),
            "-c search_path=a,b --statement-timeout=5s -cwork_mem=1MB".into(),
        );
        let s = requested_settings(&p).unwrap();
        assert!(s.contains(&("application_name".into(), "psql".into())));
        assert!(s.contains(&("search_path".into(), "a,b".into())));
        assert!(s.contains(&("statement_timeout".into(), "5s".into())));
        assert!(s.contains(&("work_mem".into(), "1MB".into())));
        assert!(!s.iter().any(|(k, _)| k == "user"));
    }

    #[test]
    fn refuses_unknown_options_and_bad_names() {
        let mut p = BTreeMap::new();
        p.insert("options".into(), "-d 5".into());
        assert!(requested_settings(&p).is_err());
        let mut p = BTreeMap::new();
        p.insert("x; drop table t".into(), "1".into());
        assert!(requested_settings(&p).is_err());
    }
}
