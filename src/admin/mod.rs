//! Operating the proxy from outside: the HTTP endpoint (metrics, health, readiness).

pub mod http;
