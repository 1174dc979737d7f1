//! The `pgcache` binary. Everything lives in the library (`src/lib.rs`); this only runs its
//! command line.

fn main() -> std::process::ExitCode {
    pgcache::cli::main()
}
