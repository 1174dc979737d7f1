//! The byte stream under a connection: plain TCP or TLS over TCP, on either side of the proxy.
//! One type for both, so the session loop and the auth code are written once. A parked client's
//! socket (`session::park`) is out of the runtime's reactor while it waits.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
    /// A parked client's socket, out of the reactor; `None` only while it moves. Reads and
    /// writes fail with `NotConnected` (a parked session does none).
    Parked(Option<std::net::TcpStream>),
}

/// `TLSv1.3/TLS13_AES_256_GCM_SHA384` for what `Stream::tls_negotiated` returned.
pub fn tls_name((version, suite): (u16, u16)) -> String {
    let version = format!("{:?}", rustls::ProtocolVersion::from(version)).replace('_', ".");
    format!("{version}/{:?}", rustls::CipherSuite::from(suite))
}

fn parked() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the socket is parked")
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// On a TLS connection from a client: the protocol version and cipher suite it negotiated
    /// (IANA numbers; `tls_name` spells them).
    pub fn tls_negotiated(&self) -> Option<(u16, u16)> {
        let Stream::Tls(s) = self else {
            return None;
        };
        let tokio_rustls::TlsStream::Server(c) = s.as_ref() else {
            return None;
        };
        let c = c.get_ref().1;
        let version = c.protocol_version()?;
        let suite = c.negotiated_cipher_suite()?.suite();
        Some((u16::from(version), u16::from(suite)))
    }

    /// On a TLS connection to a server: the `tls-server-end-point` channel binding of the
    /// certificate it presented (`tls::server_end_point`), for SCRAM-SHA-256-PLUS.
    pub fn server_end_point(&self) -> Option<Vec<u8>> {
        let Stream::Tls(s) = self else {
            return None;
        };
        let tokio_rustls::TlsStream::Client(c) = s.as_ref() else {
            return None;
        };
        let cert = c.get_ref().1.peer_certificates()?.first()?;
        crate::tls::server_end_point(cert)
    }

    /// Take a plain socket out of the runtime's reactor (its registration is freed); its
    /// descriptor, for another poller to watch. Fails for TLS (left as it was), and when the
    /// reactor cannot let the socket go (then it is closed).
    pub fn park(&mut self) -> io::Result<RawFd> {
        match std::mem::replace(self, Stream::Parked(None)) {
            Stream::Plain(tcp) => {
                let std = tcp.into_std()?;
                let fd = std.as_raw_fd();
                *self = Stream::Parked(Some(std));
                Ok(fd)
            }
            other => {
                *self = other;
                Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "only plain TCP parks",
                ))
            }
        }
    }

    /// Put a parked socket back in the reactor (within the runtime). Nothing to do when the
    /// stream is not parked.
    pub fn unpark(&mut self) -> io::Result<()> {
        match std::mem::replace(self, Stream::Parked(None)) {
            Stream::Parked(Some(std)) => {
                *self = Stream::Plain(TcpStream::from_std(std)?);
                Ok(())
            }
            other => {
                *self = other;
                Ok(())
            }
        }
    }

    /// Ready when a read would make progress. Lets an idle plain connection wait without a read
    /// buffer; TLS may hold decrypted bytes already, so it always says ready.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(s) => s.poll_read_ready(cx),
            Stream::Tls(_) => Poll::Ready(Ok(())),
            Stream::Parked(_) => Poll::Ready(Err(parked())),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Parked(_) => Poll::Ready(Err(parked())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Parked(_) => Poll::Ready(Err(parked())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Parked(_) => Poll::Ready(Err(parked())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            Stream::Parked(_) => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Parked(_) => Poll::Ready(Err(parked())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Parked(_) => Poll::Ready(Err(parked())),
        }
    }
}
