//! pgcache: a transparent caching proxy for PostgreSQL.
//!
//! The crate is a library so that the microbenchmarks (`benches/hotpath.rs`) can reach the hot
//! path without a database; the binary (`src/main.rs`) runs [`cli::main`]. The modules stay
//! private: [`cli`] is the program, [`hot`] the few pieces the benchmarks measure.

mod admin;
mod analysis;
mod auth;
mod cache;
mod config;
mod error;
mod insight;
mod listener;
mod metrics;
mod pool;
mod probe;
mod session;
mod shutdown;
mod sqltext;
mod stream;
mod tls;
mod wire;

pub mod cli;
pub mod hot;
