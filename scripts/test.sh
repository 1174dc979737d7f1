#!/usr/bin/env bash
# scripts/test.sh — the one test command (local and CI): installs missing system packages on Debian
# (PostgreSQL, Redis, PgBouncer, libclang for pg_query's bindgen), then runs
# `cargo fmt --check`, `cargo clippy --all-targets -D warnings` and `cargo test`.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test harness_smoke`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '==> %s\n' "$*" >&2; }

is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'; }

install_system_packages() {
    local wanted=(postgresql postgresql-contrib redis-server pgbouncer libclang-dev) missing=() p
    command -v dpkg-query >/dev/null || { log "not Debian: install ${wanted[*]} yourself"; return; }
    for p in "${wanted[@]}"; do is_installed "$p" || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" -ne 0 ]; then
        log "missing packages (not root, not installing): ${missing[*]}"
        return
    fi
    log "installing ${missing[*]}"
    # Packages must not start their services (the Debian cluster, redis): deny via policy-rc.d.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local rc=0
    apt-get update -qq && apt-get install -y -qq -o Dpkg::Options::=--force-confold \
        --no-install-recommends "${missing[@]}" </dev/null || rc=$?
    [ "$created_policy" = 1 ] && rm -f "$policy"
    return "$rc"
}

ensure_postgres_user() {
    # PostgreSQL refuses to run as root; the test harness runs it as `postgres` when we are root.
    if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
        log "creating system user postgres"
        useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
}

ensure_rust_components() {
    local missing=()
    cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
    if [ ${#missing[@]} -gt 0 ]; then
        log "rustup component add ${missing[*]}"
        rustup component add "${missing[@]}"
    fi
}

ensure_python_drivers() {
    # tests/drivers.rs runs real Python drivers through the proxy.
    python3 -c 'import psycopg, asyncpg' 2>/dev/null && return
    log "pip install psycopg asyncpg (driver tests)"
    python3 -m pip install --quiet --disable-pip-version-check \
        "psycopg[binary]==3.3.9" "asyncpg==0.32.0"
}

install_system_packages
ensure_postgres_user
ensure_rust_components
ensure_python_drivers

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
log "cargo test $*"
cargo test "$@"
if [ "$#" -eq 0 ]; then
    # The protocol suites again with the result cache in the data path of every proxy.
    log "PGCACHE_TEST_WITH_CACHE=1 cargo test (protocol suites, cache on)"
    PGCACHE_TEST_WITH_CACHE=1 cargo test --test protocol --test transparency \
        --test transaction_pooling --test pooling --test cancel --test drivers --test failures \
        --test shutdown --test parking
    # The suites where threads matter again with every proxy on one thread
    # (proxy.worker_threads = 1, tokio's current-thread runtime).
    log "PGCACHE_PROXY_WORKER_THREADS=1 cargo test (protocol, pooling, cancel, Redis suites)"
    PGCACHE_PROXY_WORKER_THREADS=1 cargo test --test protocol --test transaction_pooling \
        --test cancel --test failures --test shutdown --test tls --test cache_redis \
        --test cache_consistency
    # The benchmark harness, a few seconds per target, so that it never rots (timings are not
    # checked; only that every target answers). BENCH_SMOKE=0 skips it.
    if [ "${BENCH_SMOKE:-1}" != 0 ]; then
        log "benches/compare.sh smoke run (SMOKE=1)"
        smoke_dir="$(mktemp -d)"
        SMOKE=1 RESULTS_DIR="$smoke_dir" bash benches/compare.sh
        rm -rf "$smoke_dir"
    fi
fi
log "all checks passed"
