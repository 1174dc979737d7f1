# benches/targets.sh — sourced by compare.sh: how each target under test is started and found.
# start_pgbouncer and start_pgcache write a config into the run's temp dir, start the proxy as a
# session of its own and wait until it answers; port_of/pid_of name a target's port and process;
# runs_on says which workloads a target runs; cache_counters reads a cache-on instance's hits.
# Reads compare.sh's variables ($TMP, $PG_PORT, $APP_SECRET, $POOL_SIZE...); not meant to run on
# its own.
# shellcheck shell=bash disable=SC2154

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

# start_pgcache MAX_CLIENTS [VARIANT]: pgcache in transaction mode, pool POOL_SIZE, SCRAM. Variants:
# `cached`, the result cache on for the pgbench tables (CACHED_*); `redis`, the same plus the shared
# tier (REDIS_T_*); `l2`, that with a one-entry L1 (L2_*); `plain`, query insight off (PLAIN_*);
# `baseline` and `baseline-cached`, the settings of pgcache and of `cached` run by the build of
# BASELINE (BASELINE_*, BCACHED_*); `onethread`, pgcache's settings on one thread (ONETHREAD_*).
start_pgcache() {
    local max_clients=$1 cached=${2:-} dir="$TMP/pgcache.$RANDOM" port metrics="" cache_toml=""
    local bin="$PGCACHE_BIN" threads="$WORKER_THREADS"
    port="$(free_port)"
    mkdir -p "$dir"
    case $cached in
        plain)
            cache_toml="[insight]
enabled = false"
            ;;
        baseline) bin="$BASELINE_BIN" ;;
        onethread) threads=1 ;;
        cached | baseline-cached | redis | l2)
            [ "$cached" = baseline-cached ] && bin="$BASELINE_BIN"
            metrics="$(free_port)"
            local redis_toml=""
            [[ "$cached" == *cached ]] || redis_toml="[cache.redis]
url = \"redis://127.0.0.1:$REDIS_PORT\"
key_prefix = \"bench-$cached:\""
            cache_toml="[metrics]
listen = \"127.0.0.1:$metrics\"
[cache]
enabled = true
default_ttl = \"1h\"
max_entries = $([ "$cached" = l2 ] && echo 1 || echo 5000000)
max_bytes = 4294967296
$redis_toml
[[cache.rules]]
tables = [\"pgbench_*\"]"
            ;;
    esac
    cat >"$dir/proxy.toml" <<EOF
[proxy]
listen = ["127.0.0.1:$port"]
max_clients = $max_clients
shutdown_timeout = "2s"
$([ "$threads" = 0 ] || echo "worker_threads = $threads")
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
$cache_toml
EOF
    own_session "$bin" --config "$dir/proxy.toml" >"$dir/pgcache.log" 2>&1 &
    if [ "$cached" = plain ]; then
        PLAIN_PID=$!; PLAIN_PORT=$port
    elif [ "$cached" = onethread ]; then
        ONETHREAD_PID=$!; ONETHREAD_PORT=$port
    elif [ "$cached" = baseline ]; then
        BASELINE_PID=$!; BASELINE_PORT=$port; BASELINE_LOG="$dir/pgcache.log"
    elif [ "$cached" = baseline-cached ]; then
        BCACHED_PID=$!; BCACHED_PORT=$port; BCACHED_LOG="$dir/pgcache.log"; BCACHED_METRICS=$metrics
    elif [ "$cached" = redis ]; then
        REDIS_T_PID=$!; REDIS_T_PORT=$port; REDIS_T_METRICS=$metrics
    elif [ "$cached" = l2 ]; then
        L2_PID=$!; L2_PORT=$port; L2_METRICS=$metrics
    elif [ -n "$cached" ]; then
        CACHED_PID=$!; CACHED_PORT=$port; CACHED_LOG="$dir/pgcache.log"; CACHED_METRICS=$metrics
    else
        PGCACHE_PID=$!; PGCACHE_PORT=$port; PGCACHE_LOG="$dir/pgcache.log"
    fi
    wait_until 30 "pgcache ${cached:+($cached) }(127.0.0.1:$port)" psql_app "$port" \
        || { show "$dir/pgcache.log"; die "pgcache does not answer on port $port"; }
}

port_of() { case $1 in direct) echo "$PG_PORT";; pgbouncer) echo "$BOUNCER_PORT";; pgcache) echo "$PGCACHE_PORT";; cached) echo "$CACHED_PORT";; plain) echo "$PLAIN_PORT";; onethread) echo "$ONETHREAD_PORT";; baseline) echo "$BASELINE_PORT";; baseline-cached) echo "$BCACHED_PORT";; redis) echo "$REDIS_T_PORT";; l2) echo "$L2_PORT";; limit) echo "$CANNED_PORT";; esac; }
pid_of() { case $1 in direct) echo "";; pgbouncer) echo "$BOUNCER_PID";; pgcache) echo "$PGCACHE_PID";; cached) echo "$CACHED_PID";; plain) echo "$PLAIN_PID";; onethread) echo "$ONETHREAD_PID";; baseline) echo "$BASELINE_PID";; baseline-cached) echo "$BCACHED_PID";; redis) echo "$REDIS_T_PID";; l2) echo "$L2_PID";; limit) echo "";; esac; }
# Cache-on targets (hit ratios are recorded for them).
is_cache_target() { case $1 in cached | baseline-cached | redis | l2) return 0;; *) return 1;; esac; }
# plain, redis and l2 run the select workloads only; the hot set runs on direct, pgcache, cached and
# limit (the machine's limit is measured there; PgBouncer would repeat its select-* figures).
runs_on() {
    case $1 in
        plain | redis | l2) [[ "$2" == select-* ]] ;;
        limit) [[ "$2" == hot-* ]] ;;
        pgbouncer | onethread) [[ "$2" != hot-* ]] ;;
        *) return 0 ;;
    esac
}

# A cache-on instance's hit and miss counters, "hits misses", from its /metrics.
cache_counters() {
    local text port
    case ${1:-cached} in
        redis) port=$REDIS_T_METRICS ;;
        l2) port=$L2_METRICS ;;
        baseline-cached) port=$BCACHED_METRICS ;;
        *) port=$CACHED_METRICS ;;
    esac
    text="$(exec 3<>"/dev/tcp/127.0.0.1/$port" && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 && cat <&3)" \
        || { echo "NA NA"; return 0; }
    awk '$1 == "pgcache_cache_hits_total" { h = $2 } $1 == "pgcache_cache_misses_total" { m = $2 }
         END { print (h == "" ? "NA" : h), (m == "" ? "NA" : m) }' <<<"$text"
}
