#!/usr/bin/env bash
# deploy/quickstart.sh — run pgcache in front of a local PostgreSQL.
#
#   deploy/quickstart.sh [proxy.toml]
#
# If the config (default ./proxy.toml) names an [upstream] that answers pg_isready, build and run
# `pgcache --config` with it. Otherwise start a throwaway PostgreSQL cluster (installing the Debian
# packages if missing) on a free loopback port with role/database `app` (password `app`), and run
# pgcache in quick mode on 127.0.0.1:6432. The throwaway cluster is stopped and deleted on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CONFIG=${1:-proxy.toml}
LISTEN=127.0.0.1:6432
log() { printf '==> %s\n' "$*" >&2; }

# Value of `key` in the [upstream] table of a simple TOML file (quotes stripped).
upstream_value() {
    awk -v key="$2" '
        /^[[:space:]]*\[/ { in_upstream = ($0 ~ /^[[:space:]]*\[upstream\][[:space:]]*$/) ; next }
        in_upstream && $0 ~ "^[[:space:]]*" key "[[:space:]]*=" {
            sub(/^[^=]*=[[:space:]]*/, ""); sub(/[[:space:]]*#.*$/, ""); gsub(/"/, ""); print; exit
        }' "$1"
}

pg_bin_dir() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then echo "$dir"; return; fi
    command -v initdb >/dev/null && dirname "$(command -v initdb)" && return
    return 1
}

install_postgres() {
    pg_bin_dir >/dev/null && return
    [ "$(id -u)" -eq 0 ] || { log "PostgreSQL is not installed; run as root or install it"; exit 1; }
    log "installing PostgreSQL (Debian packages)"
    local policy=/usr/sbin/policy-rc.d created=0
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; created=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-contrib </dev/null
    if [ "$created" = 1 ]; then rm -f "$policy"; fi
}

free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 20000))
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
    done
}

build() {
    log "cargo build --release"
    cargo build --release
}

if [ -f "$CONFIG" ]; then
    host=$(upstream_value "$CONFIG" host); port=$(upstream_value "$CONFIG" port)
    if command -v pg_isready >/dev/null \
        && pg_isready -q -h "${host:-127.0.0.1}" -p "${port:-5432}" -t 3; then
        log "upstream ${host:-127.0.0.1}:${port:-5432} is up; using $CONFIG"
        build
        exec target/release/pgcache --config "$CONFIG"
    fi
    log "upstream in $CONFIG is not reachable; starting a throwaway PostgreSQL instead"
fi

install_postgres
BIN=$(pg_bin_dir)
TMP=$(mktemp -d /tmp/pgcache-quickstart-XXXXXX)
PGPORT=$(free_port)
as_pg=()
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --user-group postgres
    chown postgres: "$TMP"
    as_pg=(runuser -u postgres --)
fi
cleanup() {
    trap '' PIPE # stderr may be a closed pipe by now
    log "stopping the throwaway PostgreSQL" || true
    (cd "$TMP" && "${as_pg[@]}" "$BIN/pg_ctl" stop -D "$TMP/data" -m fast -w >/dev/null 2>&1) || true
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP PIPE

log "initdb in $TMP (port $PGPORT)"
(cd "$TMP" && "${as_pg[@]}" "$BIN/initdb" -D "$TMP/data" -U postgres -A trust -E UTF8 --locale=C \
    --no-sync >"$TMP/initdb.log" 2>&1) || { cat "$TMP/initdb.log" >&2; exit 1; }
cat >"$TMP/data/pg_hba.conf" <<HBA
local all all trust
host all all 127.0.0.1/32 scram-sha-256
HBA
cat >>"$TMP/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$TMP'
password_encryption = 'scram-sha-256'
CONF
(cd "$TMP" && "${as_pg[@]}" "$BIN/pg_ctl" start -D "$TMP/data" -l "$TMP/postgres.log" -w >/dev/null) \
    || { cat "$TMP/postgres.log" >&2; exit 1; }
"$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$TMP" -p "$PGPORT" -U postgres -d postgres <<SQL
CREATE ROLE app LOGIN PASSWORD 'app';
CREATE DATABASE app OWNER app;
SQL
log "PostgreSQL is up: postgres://app:app@127.0.0.1:$PGPORT/app"
if [ "${QUICKSTART_NO_PROXY:-}" = 1 ]; then  # for testing this script without the proxy
    psql "postgres://app:app@127.0.0.1:$PGPORT/app" -X -A -t -c 'select current_user'
    exit 0
fi

build
log "connect with: psql postgres://app:app@$LISTEN/app"
target/release/pgcache --listen "$LISTEN" --upstream "postgres://app:app@127.0.0.1:$PGPORT/app"
