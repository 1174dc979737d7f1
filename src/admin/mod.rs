//! Operating the proxy from outside: the admin console, the HTTP endpoint (metrics, health,
//! readiness, query insight), the controls both use, and the registry of who is connected.

pub mod cache;
pub mod console;
pub mod control;
pub mod http;
pub mod insight;
pub mod registry;
