//! Real drivers through transaction pooling: psycopg 3 (`prepare_threshold=0`) and asyncpg, both
//! of which prepare named statements on the server, from more clients than server connections.
//! The Python scripts live in `tests/drivers/`; `scripts/test.sh` installs the packages.

mod support;

use std::process::Command;
use support::{free_port, pg, proxy_config, Proxy};

fn run_script(script: &str, db: &str) {
    pg().psql("postgres", &format!("create database {db} owner app"));
    let proxy = Proxy::start(&proxy_config(
        pg(),
        free_port(),
        "[pool]\nmode = \"transaction\"\nmax_size = 3\n",
    ));
    let dsn = proxy.url("app", "app", db);
    let path = format!("{}/tests/drivers/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(&path)
        .arg(&dsn)
        .output()
        .expect("python3 runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("ModuleNotFoundError"),
        "the driver is not installed; scripts/test.sh installs it:\n{text}"
    );
    assert!(
        out.status.success(),
        "{script} failed:\n{text}\n{}",
        proxy.log()
    );
}

#[test]
fn psycopg_with_server_side_prepared_statements() {
    run_script("psycopg_check.py", "drv_psycopg");
}

#[test]
fn asyncpg_with_its_statement_cache() {
    run_script("asyncpg_check.py", "drv_asyncpg");
}
