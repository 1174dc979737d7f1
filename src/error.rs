//! Errors the proxy itself reports to clients, as PostgreSQL `ErrorResponse` messages.
//!
//! Errors produced by the upstream are forwarded as bytes and never pass through here; this type is
//! for what the proxy decides on its own (pool exhausted, upstream unreachable, bad message...).

use bytes::BytesMut;
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::PgWireBackendMessage;

/// SQLSTATE codes the proxy uses.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    pub const CHARACTER_NOT_IN_REPERTOIRE: &str = "22021";
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
    pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An error the proxy sends to a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{severity:?} {code}: {message}")]
pub struct PgError {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl PgError {
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        PgError {
            severity: Severity::Fatal,
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        PgError {
            severity: Severity::Error,
            ..Self::fatal(code, message)
        }
    }

    pub fn with_severity(mut self, severity: Severity) -> Self {
        self.severity = severity;
        self
    }

    /// The whole `ErrorResponse` frame.
    pub fn frame(&self) -> bytes::Bytes {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out.freeze()
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Append the `ErrorResponse` to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let sev = self.severity.as_str().to_string();
        let mut fields = vec![
            (b'S', sev.clone()),
            (b'V', sev),
            (b'C', self.code.to_string()),
            (b'M', self.message.clone()),
        ];
        if let Some(d) = &self.detail {
            fields.push((b'D', d.clone()));
        }
        if let Some(h) = &self.hint {
            fields.push((b'H', h.clone()));
        }
        crate::wire::encode(
            PgWireBackendMessage::ErrorResponse(ErrorResponse::new(fields)),
            out,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_all_fields() {
        let mut out = BytesMut::new();
        PgError::fatal(sqlstate::TOO_MANY_CONNECTIONS, "pool full")
            .with_detail("d")
            .with_hint("h")
            .encode(&mut out);
        assert_eq!(out[0], b'E');
        let fields = crate::wire::fields(&out[5..]);
        assert!(fields.contains(&(b'C', "53300".into())));
        assert!(fields.contains(&(b'S', "FATAL".into())));
        assert!(fields.contains(&(b'H', "h".into())));
    }
}
