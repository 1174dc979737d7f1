//! A tiny HTTP/1.1 GET for the proxy's metrics endpoint: one request per connection, read to close.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Status code and body of `GET path` on `addr` (e.g. `"127.0.0.1:9930"`); panics on I/O errors.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_request(addr, "GET", path)
}

/// Status code and body of `method path` (no request body) on `addr`.
pub fn http_request(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    // Hang guards only: the endpoint answers and closes at once.
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("set read timeout");
    write!(
        tcp,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("send HTTP request");
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("read HTTP response from {addr}{path}: {e}"));
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in HTTP response: {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status code in HTTP response: {head:?}"));
    (status, body.to_string())
}

/// Waits until `addr` accepts TCP (the metrics endpoint is bound after the client listener that
/// `Proxy::start` waits for); panics after 20 s.
pub fn wait_http(addr: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listening on {addr} after 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
