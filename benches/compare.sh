#!/usr/bin/env bash
# benches/compare.sh — pgcache side by side with PgBouncer and PostgreSQL direct, on loopback only.
#
# From a fresh clone it:
#   1. builds pgcache (`cargo build --release`) and the idle-clients bench (`cargo bench --no-run`);
#   2. starts a throwaway PostgreSQL in a temp dir (initdb as `postgres`, free port, fsync=off,
#      max_connections=300), creates role app/app (SCRAM) and database bench, `pgbench -i -s 10`;
#   3. starts PgBouncer (transaction mode, pool 20), pgcache (transaction mode, pool 20) and a
#      second pgcache with the result cache on for the pgbench tables ("cached", warmed with -S in
#      each protocol mode) on free ports, all authenticating clients with SCRAM against app's
#      secret copied from pg_authid;
#   4. runs the same pgbench workloads against each target, interleaved A B C D over ROUNDS rounds
#      so that machine drift shows: select-only (-S) with -M simple/extended/prepared at 32 clients,
#      the same statement over a hot set of HOT_KEYS accounts (hot-*: direct, pgcache, cached and
#      the machine's limit), a wide read (WIDE_ROWS rows per statement, extended protocol, 16
#      clients: what forwarding and storing many rows costs), TPC-B-like (default script) at 16
#      clients, and a connection storm (-C -S) at 16 clients;
#   5. measures idle client connections (benches/idle_clients.rs) through fresh instances of each
#      proxy: RSS per client and the server connection count;
#   6. per run records TPS, mean/p99/slowest latency, proxy CPU, peak RSS and wake-ups, and the CPU
#      used by anything else on the machine (so a disturbed run shows);
#   7. prints a table, the ratios pgcache/PgBouncer and pgcache/direct, the cache-on figures (hit
#      ratio, cached/direct, cached/cache-off), and writes
#      benches/results/<date>-<hostname>.csv and .md (`-smoke` added under SMOKE=1).
# Everything it started is stopped and its temp dir removed on exit.
#
# Settings (environment):
#   DURATION=5         seconds per pgbench run            ROUNDS=2        interleaved rounds
#   POOL_SIZE=20       server connections per proxy       SCALE=10        pgbench scale factor
#   WORKER_THREADS=0   pgcache's proxy.worker_threads (0: one per core, the default; 1: one thread)
#   IDLE_CLIENTS=5000  idle clients per proxy (0 = skip)  IDLE_CLIENTS_MAX=0  a second, larger
#                      idle run per proxy if the fd limit allows (e.g. 10000; 0 = skip)
#   HOT_KEYS=10000     accounts the hot-* workloads draw from (the -S statement, same text)
#   WIDE_ROWS=500      rows per statement of the wide-* workload (about 60 KB of rows)
#   WIDE_KEYS=1000     first accounts the wide-* workload draws from (a warm cache holds them all)
#   SMOKE=1            CI smoke: DURATION=2 ROUNDS=1 IDLE_CLIENTS=200 IDLE_CLIENTS_MAX=0, short warm-up
#   PG_BIN             PostgreSQL bin dir (default: newest /usr/lib/postgresql/*/bin)
#   PGBOUNCER          pgbouncer binary (default: /usr/sbin/pgbouncer or on PATH)
#   RESULTS_DIR        where result files go (default: benches/results)
#   WARMUP=3           seconds of unrecorded -S per target before the rounds
#   CACHE_WARMUP=10    seconds of unrecorded -S per protocol mode through the cache-on pgcache
#   HOT_WARMUP=4       then seconds of unrecorded hot-* per protocol mode
#   KEEP_TMP=1         keep the temp dir (logs, and pgbench's per-transaction logs) after the run
#   ONLY=a,b           run only these workloads (names as in the table: select-simple, tpcb...)
#   BASELINE=REV       A/B mode: also build git revision REV (its own target dir, target/baseline)
#                      and run it as *baseline* (settings of *pgcache*) and *baseline-cached*
#                      (settings of *cached*), each right after its counterpart in every round; the
#                      report adds the ratios between them, and its files are named
#                      <date>-<host>-vs-<rev> (a change's cost or gain beside PgBouncer, in one run)
#   ONLY_TARGETS=a,b   run only these targets (direct pgbouncer pgcache baseline cached
#                      baseline-cached plain onethread redis l2 limit); e.g. a quick A/B of the pass-through
#                      path: BASELINE=HEAD~1 ONLY_TARGETS=pgbouncer,pgcache,baseline
# Exit status: non-zero only when something is broken (a server does not start, pgbench fails against
# PostgreSQL or pgcache, a proxy dies, an idle client fails, a proxy exceeds its pool) — never
# because of a timing. PgBouncer failures are recorded, not fatal; before 1.21 it cannot run
# `-M prepared` in transaction mode, which is marked as an expected failure.
set -Eeuo pipefail
# No silent deaths: any unhandled failure names its line and command.
trap 'printf "compare.sh: line %s: \"%s\" failed (exit %s)\n" "$LINENO" "$BASH_COMMAND" "$?" >&2' ERR

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SMOKE="${SMOKE:-0}"
if [ "$SMOKE" = 1 ]; then
    DURATION="${DURATION:-2}"; ROUNDS="${ROUNDS:-1}"; IDLE_CLIENTS="${IDLE_CLIENTS:-200}"
    IDLE_CLIENTS_MAX="${IDLE_CLIENTS_MAX:-0}"; WARMUP="${WARMUP:-1}"; CACHE_WARMUP="${CACHE_WARMUP:-1}"
    HOT_WARMUP="${HOT_WARMUP:-1}"
fi
DURATION="${DURATION:-5}"
ROUNDS="${ROUNDS:-2}"
POOL_SIZE="${POOL_SIZE:-20}"
WORKER_THREADS="${WORKER_THREADS:-0}"
SCALE="${SCALE:-10}"
IDLE_CLIENTS="${IDLE_CLIENTS:-5000}"
IDLE_CLIENTS_MAX="${IDLE_CLIENTS_MAX:-0}"
WARMUP="${WARMUP:-3}"
CACHE_WARMUP="${CACHE_WARMUP:-10}"
HOT_WARMUP="${HOT_WARMUP:-4}"
HOT_KEYS="${HOT_KEYS:-10000}"
WIDE_ROWS="${WIDE_ROWS:-500}"
WIDE_KEYS="${WIDE_KEYS:-1000}"
THREADS=2
RESULTS_DIR="${RESULTS_DIR:-$ROOT/benches/results}"
PG_BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"
PGBOUNCER="${PGBOUNCER:-$(command -v pgbouncer || echo /usr/sbin/pgbouncer)}"

# Workloads: name | clients | pgbench arguments. Same list, same order, for every target (runs_on
# says which run where). @HOT@ is the hot-set script: pgbench's -S statement, aid drawn from
# 1..HOT_KEYS, so a warm cache holds every key. @WIDE@ reads WIDE_ROWS whole accounts rows from
# one drawn from 1..WIDE_KEYS.
WORKLOADS=(
    "select-simple|32|-S -M simple"
    "select-extended|32|-S -M extended"
    "select-prepared|32|-S -M prepared"
    "hot-simple|32|-f @HOT@ -M simple"
    "hot-extended|32|-f @HOT@ -M extended"
    "hot-prepared|32|-f @HOT@ -M prepared"
    "wide-extended|16|-f @WIDE@ -M extended"
    "tpcb|16|-M simple"
    "connect-storm|16|-C -S -M simple"
)
# ONLY=tpcb,select-prepared runs just those (a quick re-check after a change).
if [ -n "${ONLY:-}" ]; then
    kept=()
    for w in "${WORKLOADS[@]}"; do [[ ",$ONLY," == *",${w%%|*},"* ]] && kept+=("$w"); done
    WORKLOADS=("${kept[@]}")
fi
TARGETS=(direct pgbouncer pgcache)
# *baseline*: the cache-off settings run by another build (BASELINE=REV), next to pgcache.
BASELINE="${BASELINE:-}"
[ -n "$BASELINE" ] && TARGETS+=(baseline)
TARGETS+=(cached)
[ -n "$BASELINE" ] && TARGETS+=(baseline-cached)
# *plain*: pgcache with query insight off, for the select workloads: what per-statement stats cost.
# INSIGHT_OVERHEAD=1 adds it.
[ "${INSIGHT_OVERHEAD:-0}" = 1 ] && TARGETS+=(plain)
# *onethread*: pgcache's settings with proxy.worker_threads = 1 (tokio's current-thread runtime),
# the workloads PgBouncer runs. ONE_THREAD=1 adds it.
[ "${ONE_THREAD:-0}" = 1 ] && TARGETS+=(onethread)
# *redis*: the cache-on pgcache plus the shared tier ([cache.redis], a local redis-server);
# *l2*: the same with an L1 of one entry, so its hits come from Redis. Select workloads only.
# REDIS_TIER=1 adds them.
REDIS_SERVER="${REDIS_SERVER:-$(command -v redis-server || echo /usr/bin/redis-server)}"
[ "${REDIS_TIER:-0}" = 1 ] && TARGETS+=(redis l2)
# *limit*: benches/canned.rs, a server that answers every statement with a canned row: the most
# pgbench can drive here (hot-* workloads). MACHINE_LIMIT=0 leaves it out.
[ "${MACHINE_LIMIT:-1}" = 1 ] && TARGETS+=(limit)
if [ -n "${ONLY_TARGETS:-}" ]; then
    kept=()
    for t in "${TARGETS[@]}"; do [[ ",$ONLY_TARGETS," == *",$t,"* ]] && kept+=("$t"); done
    TARGETS=("${kept[@]}")
fi
has_target() { [[ " ${TARGETS[*]} " == *" $1 "* ]]; }

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'compare.sh: %s\n' "$*" >&2; exit 1; }
# show FILE: the end of a log, for a failure message (quietly nothing if it does not exist).
show() { tail -n 30 "$1" >&2 2>/dev/null || true; }

# ---------------------------------------------------------------------------------------------
# Prerequisites
[ -x "$PG_BIN/initdb" ] || die "PostgreSQL binaries not found (PG_BIN=$PG_BIN); apt-get install postgresql"
[ -x "$PG_BIN/pgbench" ] || die "pgbench not found in $PG_BIN"
[ -x "$PGBOUNCER" ] || die "pgbouncer not found ($PGBOUNCER); apt-get install pgbouncer"
command -v cargo >/dev/null || die "cargo not found"
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root needs an OS user 'postgres' to run PostgreSQL"
    as_pg() { runuser -u postgres -- "$@"; }
else
    as_pg() { "$@"; }
fi
# Many idle clients need many descriptors: raise the soft limit to the hard one (inherited by the
# proxies, pgbench and idle_clients; PgBouncer re-raises it after runuser's PAM session resets it).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_LIMIT="$(ulimit -n)"
CLK_TCK="$(getconf CLK_TCK)"

# ---------------------------------------------------------------------------------------------
# Temp dir and cleanup: everything started is recorded here and stopped on exit.
TMP="$(mktemp -d /tmp/pgcache-bench.XXXXXX)"
chmod 755 "$TMP"
PG_DATA="$TMP/pg/data"
HOT_SQL="$TMP/hot.sql"
printf '\\set aid random(1, %s)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n' "$HOT_KEYS" >"$HOT_SQL"
WIDE_SQL="$TMP/wide.sql"
printf '\\set aid random(1, %s)\nSELECT * FROM pgbench_accounts WHERE aid BETWEEN :aid AND :aid + %s;\n' \
    "$WIDE_KEYS" "$((WIDE_ROWS - 1))" >"$WIDE_SQL"
PGCACHE_PID=""
CACHED_PID=""
BOUNCER_PIDFILE=""
PG_STARTED=0

stop_pid() {
    [ -n "$1" ] || return 0
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
stop_pgcache() {
    stop_pid "$PGCACHE_PID"; PGCACHE_PID=""; stop_pid "$CACHED_PID"; CACHED_PID=""
    stop_pid "${PLAIN_PID:-}"; PLAIN_PID=""; stop_pid "${ONETHREAD_PID:-}"; ONETHREAD_PID=""
    stop_pid "${BASELINE_PID:-}"; BASELINE_PID=""; stop_pid "${BCACHED_PID:-}"; BCACHED_PID=""
    stop_pid "${REDIS_T_PID:-}"; REDIS_T_PID=""; stop_pid "${L2_PID:-}"; L2_PID=""
    stop_pid "${CANNED_PID:-}"; CANNED_PID=""
}
stop_pgbouncer() {
    [ -n "$BOUNCER_PIDFILE" ] || return 0
    local pid
    pid="$(cat "$BOUNCER_PIDFILE" 2>/dev/null || true)"
    if [ -n "$pid" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    BOUNCER_PIDFILE=""
}
cleanup() {
    local rc=$?
    set +e
    stop_pgcache
    stop_pgbouncer
    stop_pid "${REDIS_PID:-}"
    if [ "$PG_STARTED" = 1 ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m immediate -w -t 20 stop >/dev/null 2>&1
    fi
    if [ "${KEEP_TMP:-0}" = 1 ]; then
        log "kept $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A free loopback port below the ephemeral range (so outgoing connections cannot take it meanwhile).
free_port() {
    local p
    for _ in $(seq 200); do
        p=$((20000 + RANDOM % 10000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"; return 0
        fi
    done
    die "no free port found"
}

# own_session COMMAND...: run COMMAND as a session of its own (and so, with the kernel's
# autogroup scheduling on, a scheduling group of its own), in place: started with `&` from this
# script it is no process group leader, so setsid execs it under the same pid. Every server and
# proxy under test runs this way, as PostgreSQL (pg_ctl) and PgBouncer (-d) do by themselves:
# otherwise a proxy started here would share pgbench's group, and its CPU share, while PgBouncer
# has a group to itself (benches/README.md, *Profiling*, ninth session).
own_session() {
    local pgrp
    pgrp="$(awk '{ print $5 }' "/proc/$BASHPID/stat")"
    # A group leader would make setsid fork, and the pid the caller keeps would be gone.
    [ "$pgrp" != "$BASHPID" ] || { log "warning: $1 shares pgbench's session (job control on?)"; exec "$@"; }
    exec setsid "$@"
}

# wait_until SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s; fail after SECONDS.
wait_until() {
    local secs=$1 what=$2; shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
    log "$what is up"
}

# Process figures from /proc: CPU seconds (utime+stime, all threads), RSS / peak RSS in KiB.
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
status_kb() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }
# Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0): the peak per run.
reset_hwm() { echo 5 >"/proc/$1/clear_refs" 2>/dev/null || true; }
# How often the process's threads have blocked (each block ends in a wake-up): voluntary context
# switches summed over its threads. Per transaction, the proxy's wake-up rate (benches/README.md).
sleeps() { cat "/proc/$1"/task/*/status 2>/dev/null | awk '$1 == "voluntary_ctxt_switches:" { n += $2 } END { print n + 0 }'; }

psql_admin() { "$PG_BIN/psql" -X -q -At -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres "$@"; }
# A query through a target as the app user (SCRAM).
psql_app() { PGPASSWORD=app "$PG_BIN/psql" -X -q -At -h 127.0.0.1 -p "$1" -U app -d bench -c "${2:-select 1}"; }

# Anything else running on the machine skews every figure: record the 1-minute load average
# before we add any (and warn).
LOAD_START="$(cut -d ' ' -f 1 /proc/loadavg)"
if awk -v l="$LOAD_START" 'BEGIN { exit !(l > 0.5) }'; then
    log "warning: load average $LOAD_START before starting: other work on this machine will skew the figures"
fi

# ---------------------------------------------------------------------------------------------
# 1. Build
log "cargo build --release"
cargo build --release
[ -x "$ROOT/target/release/pgcache" ] || die "no target/release/pgcache after the build"
# A private copy: a rebuild during the run (another cargo command) cannot change what is measured.
mkdir -p "$TMP/bin"
cp "$ROOT/target/release/pgcache" "$TMP/bin/pgcache"
PGCACHE_BIN="$TMP/bin/pgcache"
BASELINE_BIN=""
if has_target baseline || has_target baseline-cached; then
    BASELINE_REV="$(git -C "$ROOT" rev-parse --short --verify "$BASELINE^{commit}" 2>/dev/null)" \
        || die "BASELINE=$BASELINE is not a commit of this repository"
    # The revision's tree, extracted with fresh file times (-m: an older revision's times would
    # let cargo take the last build for up to date), built in a target dir of its own so that
    # target/release stays this tree's; its dependencies stay built between runs.
    base_dir="$ROOT/target/baseline"
    rm -rf "$base_dir/src"; mkdir -p "$base_dir/src"
    git -C "$ROOT" archive "$BASELINE_REV" | tar -x -m -C "$base_dir/src"
    log "cargo build --release of the baseline $BASELINE_REV"
    (cd "$base_dir/src" && CARGO_TARGET_DIR="$base_dir/target" cargo build --release --bin pgcache)
    cp "$base_dir/target/release/pgcache" "$TMP/bin/pgcache-baseline"
    BASELINE_BIN="$TMP/bin/pgcache-baseline"
fi
IDLE_BIN=""
if [ "$IDLE_CLIENTS" -gt 0 ] || [ "$IDLE_CLIENTS_MAX" -gt 0 ]; then
    log "cargo bench --no-run --bench idle_clients"
    IDLE_BIN="$(cargo bench --no-run --bench idle_clients --message-format=json \
        | grep '"name":"idle_clients"' | grep -o '"executable":"[^"]*"' | tail -n 1 | sed 's/"executable":"//; s/"$//' || true)"
    [ -x "$IDLE_BIN" ] || die "cannot find the idle_clients executable after the build"
fi
CANNED_BIN=""
if has_target limit; then
    log "cargo bench --no-run --bench canned"
    CANNED_BIN="$(cargo bench --no-run --bench canned --message-format=json \
        | grep '"name":"canned"' | grep -o '"executable":"[^"]*"' | tail -n 1 | sed 's/"executable":"//; s/"$//' || true)"
    [ -x "$CANNED_BIN" ] || die "cannot find the canned executable after the build"
fi

# ---------------------------------------------------------------------------------------------
# 2. PostgreSQL
PG_PORT="$(free_port)"
mkdir -p "$TMP/pg"
chown -R postgres: "$TMP/pg" 2>/dev/null || true
log "initdb ($PG_BIN) on port $PG_PORT"
as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 --no-locale \
    >"$TMP/pg/initdb.log" 2>&1 || { show "$TMP/pg/initdb.log"; die "initdb failed"; }
cat >>"$PG_DATA/postgresql.conf" <<EOF
# pgcache bench: throwaway server, durability off (fsync=off) so that disk speed does not dominate.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$TMP/pg'
max_connections = 300
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
password_encryption = 'scram-sha-256'
EOF
cat >"$PG_DATA/pg_hba.conf" <<EOF
local all postgres trust
host  all postgres 127.0.0.1/32 trust
host  all all      127.0.0.1/32 scram-sha-256
EOF
as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$TMP/pg/server.log" -w -t 30 start >/dev/null \
    || { show "$TMP/pg/server.log"; die "PostgreSQL did not start"; }
PG_STARTED=1
wait_until 30 "PostgreSQL (127.0.0.1:$PG_PORT)" psql_admin -c 'select 1' \
    || { show "$TMP/pg/server.log"; die "PostgreSQL does not answer on port $PG_PORT"; }
psql_admin -c "create role app login password 'app'" -c "create database bench owner app"
log "pgbench -i -s $SCALE"
PGPASSWORD=app "$PG_BIN/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U app bench \
    >"$TMP/pgbench-init.log" 2>&1 || { show "$TMP/pgbench-init.log"; die "pgbench -i failed"; }
APP_SECRET="$(psql_admin -c "select rolpassword from pg_authid where rolname = 'app'")"
case "$APP_SECRET" in SCRAM-SHA-256*) ;; *) die "app's password is not stored as SCRAM";; esac

# ---------------------------------------------------------------------------------------------
# 3. The proxies. Each start_* sets its port and pid and checks it answers within 30 s.
BOUNCER_VERSION="$("$PGBOUNCER" --version 2>/dev/null | head -n 1 | awk '{ print $2 }' || true)"
[ -n "$BOUNCER_VERSION" ] || die "$PGBOUNCER --version does not answer"
# shellcheck source=benches/targets.sh
. "$ROOT/benches/targets.sh"

has_target pgbouncer && start_pgbouncer 1000
has_target pgcache && start_pgcache 1000
has_target baseline && start_pgcache 1000 baseline
has_target cached && start_pgcache 1000 cached
has_target baseline-cached && start_pgcache 1000 baseline-cached
has_target plain && start_pgcache 1000 plain
has_target onethread && start_pgcache 1000 onethread
if has_target redis || has_target l2; then
    [ -x "$REDIS_SERVER" ] || die "redis-server not found ($REDIS_SERVER); apt-get install redis-server, or REDIS_TIER=0"
    REDIS_PORT="$(free_port)"
    own_session "$REDIS_SERVER" --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$TMP/redis.log" 2>&1 &
    REDIS_PID=$!
    wait_until 10 "redis-server (127.0.0.1:$REDIS_PORT)" bash -c "exec 3<>/dev/tcp/127.0.0.1/$REDIS_PORT" \
        || { show "$TMP/redis.log"; die "redis-server did not start"; }
    has_target redis && start_pgcache 1000 redis
    has_target l2 && start_pgcache 1000 l2
fi
if has_target limit; then
    CANNED_PORT="$(free_port)"
    own_session "$CANNED_BIN" --port "$CANNED_PORT" >"$TMP/canned.log" 2>&1 &
    CANNED_PID=$!
    wait_until 10 "canned-row server (127.0.0.1:$CANNED_PORT)" psql_app "$CANNED_PORT" \
        || { show "$TMP/canned.log"; die "the canned-row server did not start"; }
fi

# ---------------------------------------------------------------------------------------------
# 4. pgbench, interleaved. One line per run in $RUNS (tab-separated):
#    round workload target status tps transactions lat_mean_ms lat_p99_ms cpu_s rss_peak_kb conn_ms
#    other_cpu_pct lat_max_ms wakeups_per_tx note
# (no field is empty but the note, which comes last: `read` with IFS=tab merges empty fields)
RUNS="$TMP/runs.tsv"
: >"$RUNS"
# Cache-on runs: round, workload, "hits misses" before, "hits misses" after.
HITS="$TMP/hits.tsv"
: >"$HITS"
BROKEN=()

# Latency: every transaction is logged (pgbench -l, one file per thread; third field = latency in
# µs); mean, p99 (nearest rank) and the slowest come from those logs, so all cover exactly the
# measured run.
latency_stats() {
    cat "$1".* | awk '$3 ~ /^[0-9]+$/ { print $3 }' | sort -n -S 25% | awk '
        { v[NR] = $1; s += $1 }
        END {
            if (NR == 0) { print "NA NA NA"; exit }
            r = int(NR * 0.99); if (r < NR * 0.99) r++; if (r < 1) r = 1
            printf "%.3f %.3f %.3f\n", s / NR / 1000, v[r] / 1000, v[NR] / 1000
        }'
}

# Interference: the machine's busy CPU time (/proc/stat: user nice system irq softirq, plus steal)
# minus what the benchmark's own processes used — pgbench (the shell's reaped children, from
# `times`), PostgreSQL (postmaster with its reaped children, plus live backends) and both proxies —
# as a share of the machine over the run. Near 0 on a quiet machine; ±5% is accounting noise.
machine_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9; exit }' /proc/stat; }
own_ticks() {
    local pm kids=()
    pm="$(head -n 1 "$PG_DATA/postmaster.pid")"
    mapfile -t kids < <(pgrep -P "$pm" || true)
    {
        sed 's/.*) //' "/proc/$pm/stat" | awk '{ print $12 + $13 + $14 + $15 }'
        for p in "${kids[@]}" "$PGCACHE_PID" "${CACHED_PID:-}" "${PLAIN_PID:-}" "${ONETHREAD_PID:-}" \
            "${REDIS_T_PID:-}" "${BASELINE_PID:-}" "${BCACHED_PID:-}" "${L2_PID:-}" "${REDIS_PID:-}" "${CANNED_PID:-}" "${BOUNCER_PID:-}"; do
            # An unset pid must not make this /proc//stat, the machine's own counters.
            [ -n "$p" ] && [ -r "/proc/$p/stat" ] || continue
            sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12 + $13 }' || true
        done
    } | awk '{ s += $1 } END { print s + 0 }'
}
# postgres_kids: how many processes the postmaster has (backends included).
postgres_kids() { pgrep -P "$(head -n 1 "$PG_DATA/postmaster.pid")" | wc -l; }
# settle_backends N: after a run, wait (at most 1 s) until the backends of pgbench's connections
# have exited and been reaped: back to N processes, or a count that stays put for 200 ms (a
# proxy's pool may have grown). A backend still exiting is counted neither among the live ones
# nor in the postmaster's reaped-children time, and would be charged to the next run instead.
settle_backends() {
    local n last="" same=0
    for _ in $(seq 20); do
        n="$(postgres_kids)"
        [ "$n" -le "$1" ] && return 0
        if [ "$n" = "$last" ]; then same=$((same + 1)); [ "$same" -ge 4 ] && return 0; else same=0; fi
        last=$n
        sleep 0.05
    done
}
# times_ticks FILE: CPU of the shell's reaped children, from the output of the `times` builtin.
times_ticks() {
    awk -v t="$CLK_TCK" 'NR == 2 {
        split($1, u, /[ms]/); split($2, s, /[ms]/)
        printf "%.0f\n", (u[1] * 60 + u[2] + s[1] * 60 + s[2]) * t }' "$1"
}

# alive TARGET PID WHEN: a proxy that died is broken, whatever pgbench said.
alive() {
    kill -0 "$2" 2>/dev/null && [ -r "/proc/$2/stat" ] && return 0
    [ "$1" = pgcache ] && show "$PGCACHE_LOG"
    [ "$1" = cached ] && show "$CACHED_LOG"
    [ "$1" = baseline ] && show "$BASELINE_LOG"
    [ "$1" = baseline-cached ] && show "$BCACHED_LOG"
    [ "$1" = pgbouncer ] && show "$(dirname "$BOUNCER_PIDFILE")/pgbouncer.log"
    die "$1 (pid $2) exited $3"
}

# run_pgbench ROUND WORKLOAD TARGET CLIENTS ARGS
run_pgbench() {
    local round=$1 name=$2 target=$3 clients=$4 args=${5//@HOT@/$HOT_SQL}
    args=${args//@WIDE@/$WIDE_SQL}
    local port pid dir out rc=0 cpu0=0 cpu1=0 sl0=0 sl1=0 rss="" tps tx conn stats note="" status=ok
    port="$(port_of "$target")"; pid="$(pid_of "$target")"
    dir="$TMP/run/$round-$name-$target"; mkdir -p "$dir"; out="$dir/pgbench.out"
    if [ -n "$pid" ]; then
        alive "$target" "$pid" "before $name"; reset_hwm "$pid"; cpu0="$(cpu_ticks "$pid")"
        sl0="$(sleeps "$pid")"
    fi
    local own0 own1 mach0 mach1 other hm0=""
    is_cache_target "$target" && hm0="$(cache_counters "$target")"
    local kids0
    kids0="$(postgres_kids)"
    own0="$(own_ticks)"; times >"$dir/times0"; mach0="$(machine_ticks)"
    # shellcheck disable=SC2086  # $args is a list of pgbench flags
    PGPASSWORD=app "$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$port" -U app -c "$clients" -j "$THREADS" \
        -T "$DURATION" $args -l --log-prefix="$dir/tx" bench >"$out" 2>&1 || rc=$?
    settle_backends "$kids0"
    mach1="$(machine_ticks)"; times >"$dir/times1"; own1="$(own_ticks)"
    if is_cache_target "$target"; then
        printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$hm0" "$(cache_counters "$target")" "$target" >>"$HITS"
    fi
    # The raw counters, for a look with KEEP_TMP=1 when the figure seems off.
    printf 'machine %s / %s; own %s / %s; pgbench %s / %s\n' "$mach0" "$mach1" "$own0" "$own1" \
        "$(times_ticks "$dir/times0")" "$(times_ticks "$dir/times1")" >"$dir/accounting"
    other="$(awk -v m0="$mach0" -v m1="$mach1" -v o0="$own0" -v o1="$own1" \
        -v p0="$(times_ticks "$dir/times0")" -v p1="$(times_ticks "$dir/times1")" 'BEGIN {
            split(m0, a, " "); split(m1, b, " ")
            total = b[2] - a[2]; if (total <= 0) { print "NA"; exit }
            printf "%.1f", 100 * ((b[1] - a[1]) - (o1 - o0) - (p1 - p0)) / total }')"
    if [ -n "$pid" ]; then
        alive "$target" "$pid" "during $name (round $round)"
        cpu1="$(cpu_ticks "$pid")"; rss="$(status_kb "$pid" VmHWM)"; sl1="$(sleeps "$pid")"
    fi
    tps="$(awk '/^tps = / { print $3; exit }' "$out")"
    tx="$(awk '/^number of transactions actually processed:/ { print $6; exit }' "$out")"
    # Only with -C: pgbench's mean time to open a connection (not part of the logged latencies).
    conn="$(awk '/^average connection time = / { print $5; exit }' "$out")"
    if [ "$rc" -ne 0 ] || [ -z "$tps" ] || grep -q 'aborted' "$out"; then
        status=failed
        note="$(grep -m 1 -iE 'error|fatal|abort' "$out" | sed 's/^pgbench: error: //' | tr '\t' ' ' | cut -c 1-160 || true)"
        [ -n "$note" ] || note="pgbench exit $rc"
        cp "$out" "$TMP/failed-$round-$name-$target.out"
    fi
    if [ "$status" = ok ]; then
        stats="$(latency_stats "$dir/tx")"
    else
        stats="NA NA NA"
    fi
    local cpu_s="NA" wakes="NA" mean p99 slowest
    read -r mean p99 slowest <<<"$stats"
    [ -n "$pid" ] && cpu_s="$(awk -v a="$cpu0" -v b="$cpu1" -v t="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / t }')"
    [ -n "$pid" ] && [ "${tx:-0}" -gt 0 ] 2>/dev/null \
        && wakes="$(awk -v a="$sl0" -v b="$sl1" -v n="$tx" 'BEGIN { printf "%.3f", (b - a) / n }')"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$target" \
        "$status" "${tps:-NA}" "${tx:-NA}" "$mean" "$p99" "$cpu_s" "${rss:-NA}" "${conn:-NA}" "$other" \
        "$slowest" "$wakes" "$note" >>"$RUNS"
    # Per-transaction logs are large; kept only with the temp dir (a p99 worth a closer look).
    [ "${KEEP_TMP:-0}" = 1 ] || rm -f "$dir"/tx.*
    printf '    %-16s %-10s %s\n' "$name" "$target" \
        "$( [ "$status" = ok ] && printf 'tps %-10s mean %s ms  p99 %s ms  slowest %s ms' "$tps" "$mean" "$p99" "$slowest" || printf 'FAILED: %s' "$note")  (other CPU $other%)" >&2
}

# PgBouncer < 1.21 has no prepared statements in transaction mode: its -M prepared failure is known.
expected_failure() {
    [ "$1" = pgbouncer ] && [ "$2" = select-prepared ] \
        && [ "$(printf '%s\n1.21\n' "$BOUNCER_VERSION" | sort -V | head -n 1)" != 1.21 ]
}

# warm NAME TARGET SECONDS PGBENCH-ARGS...: unrecorded pgbench, 32 clients; a failure is fatal.
warm() {
    local name=$1 target=$2 secs=$3 out="$TMP/$1-$2.out"
    shift 3
    PGPASSWORD=app "$PG_BIN/pgbench" -n "$@" -h 127.0.0.1 -p "$(port_of "$target")" -U app -c 32 \
        -j "$THREADS" -T "$secs" bench >"$out" 2>&1 || { show "$out"; die "$name against $target failed"; }
}

log "warm-up: ${WARMUP}s of -S per target (fills the pools; not recorded)"
for target in "${TARGETS[@]}"; do
    warm warm-up "$target" "$WARMUP" -S
done

# The cache-on instance starts warm: every -S mode has its own keys (simple and extended batches
# differ), so each runs for CACHE_WARMUP seconds first, then the hot set for HOT_WARMUP.
log "cache warm-up: ${CACHE_WARMUP}s of -S, then ${HOT_WARMUP}s of the hot set, per protocol mode, then ${HOT_WARMUP}s of the wide read through each cache-on pgcache (not recorded)"
for target in "${TARGETS[@]}"; do
    is_cache_target "$target" || continue
    for mode in simple extended prepared; do
        warm "cache-warm-up-$mode" "$target" "$CACHE_WARMUP" -S -M "$mode"
    done
    for mode in simple extended prepared; do
        warm "hot-set-warm-up-$mode" "$target" "$HOT_WARMUP" -f "$HOT_SQL" -M "$mode"
    done
    warm wide-warm-up "$target" "$HOT_WARMUP" -f "$WIDE_SQL" -M extended
    log "$target after warm-up (hits misses): $(cache_counters "$target")"
done

START_TIME=$SECONDS
for round in $(seq "$ROUNDS"); do
    log "round $round/$ROUNDS (${DURATION}s per run)"
    for w in "${WORKLOADS[@]}"; do
        IFS='|' read -r name clients args <<<"$w"
        for target in "${TARGETS[@]}"; do
            runs_on "$target" "$name" || continue
            run_pgbench "$round" "$name" "$target" "$clients" "$args"
        done
    done
done
log "pgbench runs took $((SECONDS - START_TIME))s"
PGBENCH_SECS=$((SECONDS - START_TIME))
stop_pgcache
stop_pgbouncer

# ---------------------------------------------------------------------------------------------
# 5. Idle clients, each proxy started fresh (clean RSS baseline, no other pool's server
#    connections in pg_stat_activity). One line per run in $IDLE (tab-separated key=value output).
IDLE="$TMP/idle.tsv"
: >"$IDLE"
idle_sizes=()
[ "$IDLE_CLIENTS" -gt 0 ] && idle_sizes+=("$IDLE_CLIENTS")
if [ "$IDLE_CLIENTS_MAX" -gt 0 ] && [ "$IDLE_CLIENTS_MAX" != "$IDLE_CLIENTS" ]; then
    if [ "$FD_LIMIT" -ge $((IDLE_CLIENTS_MAX + 500)) ]; then
        idle_sizes+=("$IDLE_CLIENTS_MAX")
    else
        log "skipping $IDLE_CLIENTS_MAX idle clients: fd limit $FD_LIMIT is too low"
    fi
fi
for n in "${idle_sizes[@]}"; do
    [ "$FD_LIMIT" -ge $((n + 100)) ] || die "IDLE_CLIENTS=$n needs an fd limit above $((n + 100)) (ulimit -Hn is $FD_LIMIT)"
    for target in pgbouncer pgcache; do
        log "idle clients: $n through $target"
        if [ "$target" = pgbouncer ]; then start_pgbouncer $((n + 100)); else start_pgcache $((n + 100)); fi
        out="$TMP/idle-$n-$target.out"
        rc=0
        "$IDLE_BIN" --url "postgres://app:app@127.0.0.1:$(port_of "$target")/bench" \
            --admin-url "postgres://postgres@127.0.0.1:$PG_PORT/postgres" --pid "$(pid_of "$target")" \
            --clients "$n" --pool-size "$POOL_SIZE" >"$out" 2>&1 || rc=$?
        result="$(grep "^RESULT " "$out" | tail -n 1 | sed "s/^RESULT //" || true)"
        if [ "$rc" -ne 0 ] || [ -z "$result" ]; then
            cat "$out" >&2
            BROKEN+=("idle clients ($n) through $target: $(grep -v '^RESULT' "$out" | head -n 1 || true)")
        fi
        printf '%s\t%s\t%s\n' "$target" "$n" "${result:-failed}" >>"$IDLE"
        printf '    %s\n' "${result:-failed}" >&2
        if [ "$target" = pgbouncer ]; then stop_pgbouncer; else stop_pgcache; fi
    done
done

# ---------------------------------------------------------------------------------------------
# 6. Summary, Markdown and CSV (benches/report.sh, sourced: it reads this script's variables).
# shellcheck source=benches/report.sh
. "$ROOT/benches/report.sh"
