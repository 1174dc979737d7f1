//! rustls configuration for both sides: the client-facing acceptor (certificate and key from
//! files) and the upstream connector (`prefer`/`require` without certificate checks, like libpq's
//! sslmode of the same names; `verify-full` against a CA file and the host name).

use crate::config::{ClientTlsConfig, ClientTlsMode, UpstreamTlsConfig, UpstreamTlsMode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::io::BufReader;
use std::sync::Arc;

mod binding;
pub use binding::server_end_point;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no {what} found in PEM file")]
    Empty { path: String, what: &'static str },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn open(path: &str) -> Result<BufReader<std::fs::File>, TlsSetupError> {
    std::fs::File::open(path)
        .map(BufReader::new)
        .map_err(|source| TlsSetupError::Read {
            path: path.into(),
            source,
        })
}

fn certs(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut open(path)?)
        .collect::<Result<_, _>>()
        .map_err(|source| TlsSetupError::Read {
            path: path.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::Empty {
            path: path.into(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn key(path: &str) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    rustls_pemfile::private_key(&mut open(path)?)
        .map_err(|source| TlsSetupError::Read {
            path: path.into(),
            source,
        })?
        .ok_or(TlsSetupError::Empty {
            path: path.into(),
            what: "private key",
        })
}

/// What the client-facing side serves: the acceptor, and the certificate's channel-binding data.
pub struct ClientTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// RFC 5929 `tls-server-end-point` data for SCRAM-SHA-256-PLUS (`server_end_point`), or
    /// `None` when the certificate's signature names no hash (Ed25519): then only
    /// SCRAM-SHA-256 is offered, as PostgreSQL cannot bind to such a certificate either.
    pub end_point: Option<Vec<u8>>,
}

/// The acceptor for clients, or `None` when client TLS is disabled.
pub fn acceptor(c: &ClientTlsConfig) -> Result<Option<ClientTls>, TlsSetupError> {
    if c.mode == ClientTlsMode::Disable {
        return Ok(None);
    }
    // Validation guarantees both files are set when TLS is on.
    let (Some(cert), Some(k)) = (&c.cert_file, &c.key_file) else {
        return Ok(None);
    };
    let chain = certs(cert)?;
    let end_point = server_end_point(&chain[0]);
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key(k)?)?;
    Ok(Some(ClientTls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        end_point,
    }))
}

/// The connector for the upstream, or `None` when upstream TLS is disabled.
pub fn connector(
    c: &UpstreamTlsConfig,
) -> Result<Option<tokio_rustls::TlsConnector>, TlsSetupError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let config = match c.mode {
        UpstreamTlsMode::Disable => return Ok(None),
        UpstreamTlsMode::Prefer | UpstreamTlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoCertificateCheck(provider())))
            .with_no_client_auth(),
        UpstreamTlsMode::VerifyFull => {
            let mut roots = rustls::RootCertStore::empty();
            let path = c.ca_file.as_deref().unwrap_or_default();
            for cert in certs(path)? {
                roots.add(cert)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Some(tokio_rustls::TlsConnector::from(Arc::new(config))))
}

/// The name to present and (in `verify-full`) verify.
pub fn server_name(
    c: &UpstreamTlsConfig,
    host: &str,
) -> Result<ServerName<'static>, TlsSetupError> {
    let name = c.server_name.as_deref().unwrap_or(host).to_string();
    ServerName::try_from(name)
        .map_err(|e| TlsSetupError::Rustls(rustls::Error::General(e.to_string())))
}

/// `sslmode=require` semantics: encrypt, but accept any certificate. Handshake signatures are
/// still verified, so the session keys belong to whoever holds the presented certificate.
#[derive(Debug)]
struct NoCertificateCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
