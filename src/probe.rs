//! `pgcache health --url http://127.0.0.1:9930/health`: one HTTP GET for container health
//! checks (the runtime image has no curl). Exit 0 on HTTP 200, 1 otherwise, with the body or
//! the error on stderr.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

pub fn run(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs"))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let addr = host
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    let limit = Duration::from_secs(5);
    let mut tcp = TcpStream::connect_timeout(&addr, limit).map_err(|e| format!("{addr}: {e}"))?;
    tcp.set_read_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    tcp.read_to_string(&mut reply)
        .map_err(|e| format!("{addr}: {e}"))?;
    let status = reply.split_whitespace().nth(1).unwrap_or("");
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim();
    if status == "200" {
        Ok(())
    } else {
        Err(format!("HTTP {status}: {body}"))
    }
}
