#!/usr/bin/env bash
# benches/compare.sh — pgcache side by side with PgBouncer and PostgreSQL direct, on loopback only.
#
# From a fresh clone it:
#   1. builds pgcache (`cargo build --release`) and the idle-clients bench (`cargo bench --no-run`);
#   2. starts a throwaway PostgreSQL in a temp dir (initdb as `postgres`, free port, fsync=off,
#      max_connections=300), creates role app/app (SCRAM) and database bench, `pgbench -i -s 10`;
#   3. starts PgBouncer (transaction mode, pool 20) and pgcache (transaction mode, pool 20) on free
#      ports, both authenticating clients with SCRAM against app's secret copied from pg_authid;
#   4. runs the same pgbench workloads against each target, interleaved A B C A B C over ROUNDS rounds
#      so that machine drift shows: select-only (-S) with -M simple/extended/prepared at 32 clients,
#      TPC-B-like (default script) at 16 clients, and a connection storm (-C -S) at 16 clients;
#   5. measures idle client connections (benches/idle_clients.rs) through fresh instances of each
#      proxy: RSS per client and the server connection count;
#   6. per run records TPS, mean/p99 latency, proxy CPU and peak RSS, and the CPU used by anything
#      else on the machine (so a disturbed run shows);
#   7. prints a table and the ratios pgcache/PgBouncer and pgcache/direct, and writes
#      benches/results/<date>-<hostname>.csv and .md (`-smoke` added under SMOKE=1).
# Everything it started is stopped and its temp dir removed on exit.
#
# Settings (environment):
#   DURATION=10        seconds per pgbench run            ROUNDS=3        interleaved rounds
#   POOL_SIZE=20       server connections per proxy       SCALE=10        pgbench scale factor
#   IDLE_CLIENTS=5000  idle clients per proxy (0 = skip)  IDLE_CLIENTS_MAX=10000  a second, larger
#                      idle run per proxy if the fd limit allows (0 = skip)
#   SMOKE=1            CI smoke: DURATION=2 ROUNDS=1 IDLE_CLIENTS=200 IDLE_CLIENTS_MAX=0, short warm-up
#   PG_BIN             PostgreSQL bin dir (default: newest /usr/lib/postgresql/*/bin)
#   PGBOUNCER          pgbouncer binary (default: /usr/sbin/pgbouncer or on PATH)
#   RESULTS_DIR        where result files go (default: benches/results)
#   WARMUP=3           seconds of unrecorded -S per target before the rounds
#   KEEP_TMP=1         keep the temp dir (logs) after the run
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
    IDLE_CLIENTS_MAX="${IDLE_CLIENTS_MAX:-0}"; WARMUP="${WARMUP:-1}"
fi
DURATION="${DURATION:-10}"
ROUNDS="${ROUNDS:-3}"
POOL_SIZE="${POOL_SIZE:-20}"
SCALE="${SCALE:-10}"
IDLE_CLIENTS="${IDLE_CLIENTS:-5000}"
IDLE_CLIENTS_MAX="${IDLE_CLIENTS_MAX:-10000}"
WARMUP="${WARMUP:-3}"
THREADS=2
RESULTS_DIR="${RESULTS_DIR:-$ROOT/benches/results}"
PG_BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"
PGBOUNCER="${PGBOUNCER:-$(command -v pgbouncer || echo /usr/sbin/pgbouncer)}"

# Workloads: name | clients | pgbench arguments. Same list, same order, for every target.
WORKLOADS=(
    "select-simple|32|-S -M simple"
    "select-extended|32|-S -M extended"
    "select-prepared|32|-S -M prepared"
    "tpcb|16|-M simple"
    "connect-storm|16|-C -S -M simple"
)
TARGETS=(direct pgbouncer pgcache)

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
PGCACHE_PID=""
BOUNCER_PIDFILE=""
PG_STARTED=0

stop_pgcache() {
    [ -n "$PGCACHE_PID" ] || return 0
    kill -TERM "$PGCACHE_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$PGCACHE_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$PGCACHE_PID" 2>/dev/null || true
    wait "$PGCACHE_PID" 2>/dev/null || true
    PGCACHE_PID=""
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
IDLE_BIN=""
if [ "$IDLE_CLIENTS" -gt 0 ] || [ "$IDLE_CLIENTS_MAX" -gt 0 ]; then
    log "cargo bench --no-run --bench idle_clients"
    IDLE_BIN="$(cargo bench --no-run --bench idle_clients --message-format=json \
        | grep '"name":"idle_clients"' | grep -o '"executable":"[^"]*"' | tail -n 1 | sed 's/"executable":"//; s/"$//' || true)"
    [ -x "$IDLE_BIN" ] || die "cannot find the idle_clients executable after the build"
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

# start_pgbouncer MAX_CLIENTS: PgBouncer in transaction mode, pool POOL_SIZE, SCRAM.
start_pgbouncer() {
    local max_clients=$1 dir="$TMP/pgbouncer.$RANDOM"
    BOUNCER_PORT="$(free_port)"
    mkdir -p "$dir"
    # The SCRAM secret as stored in pg_authid (PgBouncer's recommended form: no PBKDF2 per login,
    # server login by SCRAM pass-through). pgcache gets the same secret.
    printf '"app" "%s"\n' "$APP_SECRET" >"$dir/userlist.txt"
    cat >"$dir/pgbouncer.ini" <<EOF
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_db_connections = $POOL_SIZE
max_client_conn = $max_clients
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
log_connections = 0
log_disconnections = 0
EOF
    chown -R postgres: "$dir" 2>/dev/null || true
    BOUNCER_PIDFILE="$dir/pgbouncer.pid"
    # runuser's PAM session resets the fd limit: raise it again inside.
    as_pg sh -c 'ulimit -n "$(ulimit -Hn)"; exec "$0" -d -q "$1"' "$PGBOUNCER" "$dir/pgbouncer.ini" \
        || { cat "$dir/pgbouncer.log" 2>/dev/null >&2 || true; die "PgBouncer did not start"; }
    wait_until 30 "PgBouncer $BOUNCER_VERSION (127.0.0.1:$BOUNCER_PORT)" psql_app "$BOUNCER_PORT" \
        || { show "$dir/pgbouncer.log"; die "PgBouncer does not answer on port $BOUNCER_PORT"; }
    BOUNCER_PID="$(cat "$BOUNCER_PIDFILE")"
}

# start_pgcache MAX_CLIENTS: pgcache in transaction mode, pool POOL_SIZE, SCRAM.
start_pgcache() {
    local max_clients=$1 dir="$TMP/pgcache.$RANDOM"
    PGCACHE_PORT="$(free_port)"
    mkdir -p "$dir"
    cat >"$dir/proxy.toml" <<EOF
[proxy]
listen = ["127.0.0.1:$PGCACHE_PORT"]
max_clients = $max_clients
shutdown_timeout = "2s"
[upstream]
host = "127.0.0.1"
port = $PG_PORT
user = "app"
password = "app"
[pool]
mode = "transaction"
max_size = $POOL_SIZE
[auth]
method = "scram-sha-256"
[users.app]
password = "$APP_SECRET"
method = "scram-sha-256"
EOF
    "$PGCACHE_BIN" --config "$dir/proxy.toml" >"$dir/pgcache.log" 2>&1 &
    PGCACHE_PID=$!
    PGCACHE_LOG="$dir/pgcache.log"
    wait_until 30 "pgcache (127.0.0.1:$PGCACHE_PORT)" psql_app "$PGCACHE_PORT" \
        || { show "$dir/pgcache.log"; die "pgcache does not answer on port $PGCACHE_PORT"; }
}

port_of() { case $1 in direct) echo "$PG_PORT";; pgbouncer) echo "$BOUNCER_PORT";; pgcache) echo "$PGCACHE_PORT";; esac; }
pid_of() { case $1 in direct) echo "";; pgbouncer) echo "$BOUNCER_PID";; pgcache) echo "$PGCACHE_PID";; esac; }

start_pgbouncer 1000
start_pgcache 1000

# ---------------------------------------------------------------------------------------------
# 4. pgbench, interleaved. One line per run in $RUNS (tab-separated):
#    round workload target status tps transactions lat_mean_ms lat_p99_ms cpu_s rss_peak_kb conn_ms
#    other_cpu_pct note
RUNS="$TMP/runs.tsv"
: >"$RUNS"
BROKEN=()

# Latency: every transaction is logged (pgbench -l, one file per thread; third field = latency in
# µs); mean and p99 (nearest rank) come from those logs, so both cover exactly the measured run.
latency_stats() {
    cat "$1".* | awk '$3 ~ /^[0-9]+$/ { print $3 }' | sort -n -S 25% | awk '
        { v[NR] = $1; s += $1 }
        END {
            if (NR == 0) { print "NA NA"; exit }
            r = int(NR * 0.99); if (r < NR * 0.99) r++; if (r < 1) r = 1
            printf "%.3f %.3f\n", s / NR / 1000, v[r] / 1000
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
        for p in "${kids[@]}" "$PGCACHE_PID" "${BOUNCER_PID:-}"; do
            [ -r "/proc/$p/stat" ] || continue
            sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12 + $13 }' || true
        done
    } | awk '{ s += $1 } END { print s + 0 }'
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
    [ "$1" = pgbouncer ] && show "$(dirname "$BOUNCER_PIDFILE")/pgbouncer.log"
    die "$1 (pid $2) exited $3"
}

# run_pgbench ROUND WORKLOAD TARGET CLIENTS ARGS
run_pgbench() {
    local round=$1 name=$2 target=$3 clients=$4 args=$5
    local port pid dir out rc=0 cpu0=0 cpu1=0 rss="" tps tx conn stats note="" status=ok
    port="$(port_of "$target")"; pid="$(pid_of "$target")"
    dir="$TMP/run/$round-$name-$target"; mkdir -p "$dir"; out="$dir/pgbench.out"
    if [ -n "$pid" ]; then
        alive "$target" "$pid" "before $name"; reset_hwm "$pid"; cpu0="$(cpu_ticks "$pid")"
    fi
    local own0 own1 mach0 mach1 other
    own0="$(own_ticks)"; times >"$dir/times0"; mach0="$(machine_ticks)"
    # shellcheck disable=SC2086  # $args is a list of pgbench flags
    PGPASSWORD=app "$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$port" -U app -c "$clients" -j "$THREADS" \
        -T "$DURATION" $args -l --log-prefix="$dir/tx" bench >"$out" 2>&1 || rc=$?
    mach1="$(machine_ticks)"; times >"$dir/times1"; own1="$(own_ticks)"
    other="$(awk -v m0="$mach0" -v m1="$mach1" -v o0="$own0" -v o1="$own1" \
        -v p0="$(times_ticks "$dir/times0")" -v p1="$(times_ticks "$dir/times1")" 'BEGIN {
            split(m0, a, " "); split(m1, b, " ")
            total = b[2] - a[2]; if (total <= 0) { print "NA"; exit }
            printf "%.1f", 100 * ((b[1] - a[1]) - (o1 - o0) - (p1 - p0)) / total }')"
    if [ -n "$pid" ]; then
        alive "$target" "$pid" "during $name (round $round)"
        cpu1="$(cpu_ticks "$pid")"; rss="$(status_kb "$pid" VmHWM)"
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
        stats="NA NA"
    fi
    local cpu_s="NA"
    [ -n "$pid" ] && cpu_s="$(awk -v a="$cpu0" -v b="$cpu1" -v t="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / t }')"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$target" "$status" \
        "${tps:-NA}" "${tx:-NA}" ${stats} "$cpu_s" "${rss:-NA}" "${conn:-NA}" "$other" "$note" >>"$RUNS"
    rm -f "$dir"/tx.*
    printf '    %-16s %-10s %s\n' "$name" "$target" \
        "$( [ "$status" = ok ] && printf 'tps %-10s mean %s ms  p99 %s ms' "$tps" ${stats} || printf 'FAILED: %s' "$note")  (other CPU $other%)" >&2
}

# PgBouncer < 1.21 has no prepared statements in transaction mode: its -M prepared failure is known.
expected_failure() {
    [ "$1" = pgbouncer ] && [ "$2" = select-prepared ] \
        && [ "$(printf '%s\n1.21\n' "$BOUNCER_VERSION" | sort -V | head -n 1)" != 1.21 ]
}

log "warm-up: ${WARMUP}s of -S per target (fills the pools; not recorded)"
for target in "${TARGETS[@]}"; do
    PGPASSWORD=app "$PG_BIN/pgbench" -n -S -h 127.0.0.1 -p "$(port_of "$target")" -U app -c 32 \
        -j "$THREADS" -T "$WARMUP" bench >"$TMP/warmup-$target.out" 2>&1 \
        || { show "$TMP/warmup-$target.out"; die "warm-up against $target failed"; }
done

START_TIME=$SECONDS
for round in $(seq "$ROUNDS"); do
    log "round $round/$ROUNDS (${DURATION}s per run)"
    for w in "${WORKLOADS[@]}"; do
        IFS='|' read -r name clients args <<<"$w"
        for target in "${TARGETS[@]}"; do
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
# 6. Summary: medians over rounds; table, ratios, CSV and Markdown.
for w in "${WORKLOADS[@]}"; do
    IFS='|' read -r name _ _ <<<"$w"
    for target in "${TARGETS[@]}"; do
        if awk -F'\t' -v w="$name" -v t="$target" '$2 == w && $3 == t && $4 != "ok" { f = 1 } END { exit !f }' "$RUNS"; then
            if expected_failure "$target" "$name"; then
                sed -i "s/\t$name\t$target\tfailed\t/\t$name\t$target\tfailed (expected)\t/" "$RUNS"
            elif [ "$target" != pgbouncer ]; then
                BROKEN+=("pgbench $name against $target failed: $(awk -F'\t' -v w="$name" -v t="$target" '$2 == w && $3 == t && $4 != "ok" { print $13; exit }' "$RUNS")")
            fi
        fi
    done
done

HOST="$(hostname -s 2>/dev/null || hostname)"
DATE="$(date +%Y-%m-%d)"
SUFFIX=""; [ "$SMOKE" = 1 ] && SUFFIX="-smoke"
mkdir -p "$RESULTS_DIR"
CSV="$RESULTS_DIR/$DATE-$HOST$SUFFIX.csv"
MD="$RESULTS_DIR/$DATE-$HOST$SUFFIX.md"
GIT_REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD 2>/dev/null || GIT_REV="$GIT_REV+dirty"
CPU_MODEL="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
MEM_GIB="$(awk '/^MemTotal/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)"
PG_VERSION="$("$PG_BIN/postgres" --version | awk '{ print $3 }')"

SUMMARY="$TMP/summary.tsv"
# One row per (workload, target): status, rounds ok, median tps, median mean latency, median p99,
# median CPU s per 10k transactions, max peak RSS, all tps values, median connect ms (-C), max other
# CPU %, first failure note.
awk -F'\t' -v OFS='\t' '
    function median(list,   a, n, i, j, t) {
        n = split(list, a, " ")
        for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
        if (n == 0) return "NA"
        return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    {
        k = $2 SUBSEP $3
        if ($12 != "NA" && (!(k in oth) || $12 + 0 > oth[k])) oth[k] = $12 + 0
        if (!(k in seen)) { seen[k] = 1; order[++nk] = k }
        runs[k]++
        if ($4 == "ok") {
            ok[k]++; tps[k] = tps[k] " " $5; mean[k] = mean[k] " " $7; p99[k] = p99[k] " " $8
            alltps[k] = alltps[k] (alltps[k] == "" ? "" : ";") sprintf("%.0f", $5)
            if ($9 != "NA" && $6 > 0) cpu[k] = cpu[k] " " ($9 / $6 * 10000)
            if ($10 != "NA" && $10 > rss[k]) rss[k] = $10
            if ($11 != "NA") conn[k] = conn[k] " " $11
        } else {
            status[k] = $4; alltps[k] = alltps[k] (alltps[k] == "" ? "" : ";") "failed"
            if (note[k] == "") note[k] = $13
        }
    }
    END {
        for (i = 1; i <= nk; i++) {
            k = order[i]; split(k, p, SUBSEP)
            st = (ok[k] == runs[k]) ? "ok" : status[k]
            c = (cpu[k] == "") ? "NA" : sprintf("%.3f", median(cpu[k]))
            t = (ok[k] > 0) ? sprintf("%.0f", median(tps[k])) : "NA"
            m = (ok[k] > 0) ? sprintf("%.3f", median(mean[k])) : "NA"
            q = (ok[k] > 0) ? sprintf("%.3f", median(p99[k])) : "NA"
            r = (rss[k] == "") ? "NA" : rss[k]
            cm = (conn[k] == "") ? "NA" : sprintf("%.3f", median(conn[k]))
            o = (k in oth) ? sprintf("%.1f", oth[k]) : "NA"
            print p[1], p[2], st, ok[k] + 0 "/" runs[k], t, m, q, c, r, alltps[k], cm, o, note[k]
        }
    }' "$RUNS" >"$SUMMARY"

# field WORKLOAD TARGET COLUMN -> value from the summary
field() { awk -F'\t' -v w="$1" -v t="$2" -v c="$3" '$1 == w && $2 == t { print $c }' "$SUMMARY"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "NA" || b == "NA" || a == "" || b == "" || b + 0 == 0) print "—"; else printf "%.2f", a / b }'; }
mib() { awk -v k="$1" 'BEGIN { if (k == "NA" || k == "") print "—"; else printf "%.1f", k / 1024 }'; }
dash() { [ "$1" = NA ] || [ -z "$1" ] && echo "—" || echo "$1"; }

{
    echo "# pgcache vs PgBouncer vs PostgreSQL direct — $DATE on $HOST$([ "$SMOKE" = 1 ] && echo ' (smoke run: timings meaningless)')"
    echo
    echo "- Machine: $(nproc) cores ($CPU_MODEL), $MEM_GIB GiB RAM, $(uname -sr)"
    echo "- pgcache $GIT_REV (release build), PgBouncer $BOUNCER_VERSION, PostgreSQL $PG_VERSION"
    echo "- PostgreSQL: throwaway cluster, **fsync=off, synchronous_commit=off, full_page_writes=off**, shared_buffers=256MB, max_connections=300; pgbench scale $SCALE"
    echo "- Proxies: transaction pooling, $POOL_SIZE server connections each, SCRAM-SHA-256 for clients (both given the SCRAM secret from pg_authid) and to the server; all on 127.0.0.1 (pgbench, proxies and PostgreSQL share the cores)"
    echo "- pgbench $THREADS threads, ${DURATION}s per run, $ROUNDS round(s) interleaved direct → PgBouncer → pgcache per workload; ${WARMUP}s warm-up per target first; pgbench phase ${PGBENCH_SECS}s. 1-minute load average before the script started: $LOAD_START (other work on the machine; ideally ~0)"
    echo "- TPS: median over rounds of pgbench's \`tps\` (with \`-C\`: including reconnection times). Latency: every transaction logged (\`pgbench -l\`); mean and p99 (nearest rank) per run, median over rounds. pgbench logs a transaction's latency without connection set-up; for \`-C\` its mean connection time is the *connect ms* column."
    echo "- Other CPU: CPU time used during a run by anything but pgbench, PostgreSQL and the proxies (from /proc/stat, plus hypervisor steal), as % of the machine; max over rounds. Within ±5% is accounting noise; more means other work disturbed the run."
    echo "- Proxy CPU: utime+stime of the proxy process (/proc/<pid>/stat) over the run, per 10k transactions, median over rounds. Peak RSS: VmHWM, reset before each run (clear_refs), max over rounds."
    echo
    echo "## Throughput and latency"
    echo
    echo "| workload | target | TPS (median) | mean latency ms | p99 latency ms | connect ms | proxy CPU s / 10k tx | proxy peak RSS MiB | TPS per round | other CPU % (max) | status |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|"
    while IFS=$'\t' read -r w t st okr tps mean p99 cpu rss all conn oth note; do
        s="$st"; [ "$st" = ok ] || s="**$st** ($okr ok): ${note//|/\\|}"
        echo "| $w | $t | $(dash "$tps") | $(dash "$mean") | $(dash "$p99") | $(dash "$conn") | $(dash "$cpu") | $(mib "$rss") | $all | $(dash "$oth") | $s |"
    done <"$SUMMARY"
    disturbed="$(awk -F'\t' '$12 != "NA" && $12 + 0 > 5 { n++ } END { print n + 0 }' "$RUNS")"
    if [ "$disturbed" -gt 0 ]; then
        echo
        echo "**Warning:** $disturbed of $(wc -l <"$RUNS") runs had more than 5% of the machine's CPU used by other work; compare rounds before trusting a figure."
    fi
    echo
    echo "## Ratios"
    echo
    echo "A TPS ratio above 1, and latency and CPU ratios below 1, favour pgcache."
    echo
    echo "| workload | TPS pgcache/PgBouncer | p99 pgcache/PgBouncer | CPU per tx pgcache/PgBouncer | TPS pgcache/direct | p99 pgcache/direct |"
    echo "|---|---:|---:|---:|---:|---:|"
    for w in "${WORKLOADS[@]}"; do
        IFS='|' read -r name _ _ <<<"$w"
        echo "| $name | $(ratio "$(field "$name" pgcache 5)" "$(field "$name" pgbouncer 5)") | $(ratio "$(field "$name" pgcache 7)" "$(field "$name" pgbouncer 7)") | $(ratio "$(field "$name" pgcache 8)" "$(field "$name" pgbouncer 8)") | $(ratio "$(field "$name" pgcache 5)" "$(field "$name" direct 5)") | $(ratio "$(field "$name" pgcache 7)" "$(field "$name" direct 7)") |"
    done
    if [ -s "$IDLE" ]; then
        echo
        echo "## Idle clients"
        echo
        echo "Each proxy started fresh; one warm-up client, then N clients log in (SCRAM), run \`select 1\` and stay idle. RSS per client = (VmRSS after − VmRSS before) / N. Server connections: max seen in pg_stat_activity (polled every 100 ms) while clients connected and idled; must be ≤ $POOL_SIZE."
        echo
        echo "| proxy | idle clients | connected | RSS before MiB | RSS after MiB | RSS per client KiB | peak RSS MiB | max server conns | RSS after close MiB | connect time s | status |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        while IFS=$'\t' read -r t n kv; do
            if [ "$kv" = failed ]; then echo "| $t | $n | | | | | | | | | **failed** |"; continue; fi
            get() { tr ' ' '\n' <<<"$kv" | awk -F= -v k="$1" '$1 == k { print $2 }'; }
            echo "| $t | $n | $(get connected) | $(mib "$(get rss_before_kb)") | $(mib "$(get rss_after_kb)") | $(awk -v b="$(get per_client_bytes)" 'BEGIN { printf "%.1f", b / 1024 }') | $(mib "$(get hwm_kb)") | $(get max_server_conns) | $(mib "$(get rss_closed_kb)") | $(get connect_secs) | $( [ "$(get ok)" = true ] && echo ok || echo '**failed**') |"
        done <"$IDLE"
        p5="$(awk -F'\t' -v n="$IDLE_CLIENTS" '$1 == "pgcache" && $2 == n' "$IDLE" | grep -o 'per_client_bytes=[0-9]*' | cut -d= -f2 || true)"
        b5="$(awk -F'\t' -v n="$IDLE_CLIENTS" '$1 == "pgbouncer" && $2 == n' "$IDLE" | grep -o 'per_client_bytes=[0-9]*' | cut -d= -f2 || true)"
        echo
        echo "RSS per idle client, pgcache/PgBouncer at $IDLE_CLIENTS clients: $(ratio "${p5:-NA}" "${b5:-NA}")"
    fi
    if [ ${#BROKEN[@]} -gt 0 ]; then
        echo
        echo "## Broken"
        echo
        for b in "${BROKEN[@]}"; do echo "- $b"; done
    fi
} >"$MD"

{
    echo "section,round,workload,target,status,runs_ok,tps,transactions,lat_mean_ms,lat_p99_ms,proxy_cpu_s,proxy_cpu_s_per_10k_tx,proxy_peak_rss_kb,connect_ms,other_cpu_pct,tps_per_round,idle_clients,rss_before_kb,rss_after_kb,rss_per_client_bytes,max_server_conns,rss_closed_kb,note"
    while IFS=$'\t' read -r w t st okr tps mean p99 cpu rss all conn oth note; do
        echo "summary,,$w,$t,$st,$okr,$tps,,$mean,$p99,,$cpu,$rss,$conn,$oth,$all,,,,,,,\"${note//\"/\'}\""
    done <"$SUMMARY"
    while IFS=$'\t' read -r round w t st tps tx mean p99 cpu rss conn oth note; do
        per10k="$(awk -v c="$cpu" -v n="$tx" 'BEGIN { if (c == "NA" || n == "NA" || n + 0 == 0) print "NA"; else printf "%.3f", c / n * 10000 }')"
        echo "run,$round,$w,$t,$st,,$tps,$tx,$mean,$p99,$cpu,$per10k,$rss,$conn,$oth,,,,,,,,\"${note//\"/\'}\""
    done <"$RUNS"
    while IFS=$'\t' read -r t n kv; do
        get() { tr ' ' '\n' <<<"$kv" | awk -F= -v k="$1" '$1 == k { print $2 }'; }
        echo "idle,,,$t,$( [ "$(get ok)" = true ] && echo ok || echo failed),,,,,,,,$(get hwm_kb),,,,$n,$(get rss_before_kb),$(get rss_after_kb),$(get per_client_bytes),$(get max_server_conns),$(get rss_closed_kb),"
    done <"$IDLE"
} >"$CSV"

echo
cat "$MD"
echo
log "wrote $CSV and $MD"
if [ ${#BROKEN[@]} -gt 0 ]; then
    log "BROKEN:"; printf '  %s\n' "${BROKEN[@]}" >&2
    exit 1
fi
