//! `cargo bench --bench compare`: runs `benches/compare.sh` (the side-by-side benchmark of
//! PostgreSQL direct, PgBouncer and pgcache), passing the environment (DURATION, ROUNDS, SMOKE,
//! IDLE_CLIENTS, ...) through. The script is the benchmark; this only gives it a cargo entry point.

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/compare.sh");
    // `cargo bench` appends `--bench`; anything else is for the script (there is nothing yet).
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match Command::new("bash").arg(script).args(&args).status() {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("compare: {script} exited with {s}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("compare: cannot run {script}: {e}");
            ExitCode::FAILURE
        }
    }
}
