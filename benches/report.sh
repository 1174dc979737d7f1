# benches/report.sh — sourced by compare.sh after the runs: medians over rounds, the Markdown and
# CSV result files, the printed table. Reads compare.sh's variables ($RUNS, $IDLE, $HITS, $TMP,
# WORKLOADS, TARGETS, BROKEN...); not meant to run on its own.
# shellcheck shell=bash disable=SC2154

for w in "${WORKLOADS[@]}"; do
    IFS='|' read -r name _ _ <<<"$w"
    for target in "${TARGETS[@]}"; do
        runs_on "$target" "$name" || continue
        if awk -F'\t' -v w="$name" -v t="$target" '$2 == w && $3 == t && $4 != "ok" { f = 1 } END { exit !f }' "$RUNS"; then
            if expected_failure "$target" "$name"; then
                sed -i "s/\t$name\t$target\tfailed\t/\t$name\t$target\tfailed (expected)\t/" "$RUNS"
            elif [ "$target" != pgbouncer ]; then
                BROKEN+=("pgbench $name against $target failed: $(awk -F'\t' -v w="$name" -v t="$target" '$2 == w && $3 == t && $4 != "ok" { print $15; exit }' "$RUNS")")
            fi
        fi
    done
done

HOST="$(hostname -s 2>/dev/null || hostname)"
DATE="$(date +%Y-%m-%d)"
SUFFIX=""; [ "$SMOKE" = 1 ] && SUFFIX="-smoke"
# Neither a run of some workloads or targets nor an A/B run is the day's full run: their files
# are named so as not to replace it.
[ -n "${ONLY:-}${ONLY_TARGETS:-}" ] && SUFFIX="$SUFFIX-partial"
[ -n "${BASELINE_REV:-}" ] && SUFFIX="$SUFFIX-vs-$BASELINE_REV"
mkdir -p "$RESULTS_DIR"
CSV="$RESULTS_DIR/$DATE-$HOST$SUFFIX.csv"
MD="$RESULTS_DIR/$DATE-$HOST$SUFFIX.md"
GIT_REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD 2>/dev/null || GIT_REV="$GIT_REV+dirty"
CPU_MODEL="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
MEM_GIB="$(awk '/^MemTotal/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)"
PG_VERSION="$("$PG_BIN/postgres" --version | awk '{ print $3 }')"

# An awk function for the programs below: the median of a[1..n] (n > 0), sorting a in place.
AWK_MEDIAN='
    function median_of(a, n,   i, j, t) {
        for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
        return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }'

SUMMARY="$TMP/summary.tsv"
# One row per (workload, target): status, rounds ok, median tps, median mean latency, median p99,
# median CPU s per 10k transactions, max peak RSS, all tps values, median connect ms (-C), max other
# CPU %, slowest transaction (max over rounds), median proxy wake-ups per transaction, first
# failure note (last: it may be empty).
awk -F'\t' -v OFS='\t' "$AWK_MEDIAN"'
    function median(list,   a, n) {
        n = split(list, a, " ")
        return (n == 0) ? "NA" : median_of(a, n)
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
            if ($13 != "NA" && (!(k in slow) || $13 + 0 > slow[k])) slow[k] = $13 + 0
            if ($14 != "NA") wake[k] = wake[k] " " $14
        } else {
            status[k] = $4; alltps[k] = alltps[k] (alltps[k] == "" ? "" : ";") "failed"
            if (note[k] == "") note[k] = $15
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
            sl = (k in slow) ? sprintf("%.1f", slow[k]) : "NA"
            wk = (wake[k] == "") ? "NA" : sprintf("%.3f", median(wake[k]))
            print p[1], p[2], st, ok[k] + 0 "/" runs[k], t, m, q, c, r, alltps[k], cm, o, sl, wk, note[k]
        }
    }' "$RUNS" >"$SUMMARY"

# field WORKLOAD TARGET COLUMN -> value from the summary
field() { awk -F'\t' -v w="$1" -v t="$2" -v c="$3" '$1 == w && $2 == t { print $c }' "$SUMMARY"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "NA" || b == "NA" || a == "" || b == "" || b + 0 == 0) print "—"; else printf "%.2f", a / b }'; }
# micros CPU-SECONDS-PER-10K-TX -> µs per transaction, or —
micros() { awk -v c="$1" 'BEGIN { if (c == "NA" || c == "") print "—"; else printf "%.1f", c * 100 }'; }
mib() { awk -v k="$1" 'BEGIN { if (k == "NA" || k == "") print "—"; else printf "%.1f", k / 1024 }'; }
# hit_ratio WORKLOAD -> median over rounds of hits / (hits + misses) during the cache-on runs; a run
# with fewer than 100 lookups (TPC-B: its SELECT follows an UPDATE in the same transaction, so only
# pgbench's start-up query is looked up) has no ratio worth printing
hit_ratio() {
    awk -F'\t' -v w="$1" -v t="${2:-cached}" "$AWK_MEDIAN"'
        $2 == w && $5 == t {
            split($3, a, " "); split($4, b, " ")
            if (a[1] == "NA" || b[1] == "NA") next
            h = b[1] - a[1]; m = b[2] - a[2]
            if (h + m >= 100) r[++n] = h / (h + m)
        }
        END {
            if (n == 0) { print "—"; exit }
            printf "%.2f", median_of(r, n)
        }' "$HITS"
}
# The kernel's autogroup scheduling, as the report states it: (on), (off) or (not in this kernel).
autogroup_state() {
    case "$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null || echo none)" in
        1) echo "(on here)" ;;
        0) echo "(off here)" ;;
        *) echo "(not in this kernel)" ;;
    esac
}
# target_names: what the targets other than direct, PgBouncer and pgcache are, for the header.
target_names() {
    local names=()
    has_target cached && names+=("*cached*: pgcache with the cache on")
    has_target plain && names+=("*plain*: pgcache with query insight off, select workloads only")
    has_target onethread && names+=("*onethread*: pgcache's settings with \`proxy.worker_threads = 1\`, PgBouncer's workloads")
    has_target baseline && names+=("*baseline*: pgcache's settings run by the build of $BASELINE_REV")
    has_target baseline-cached && names+=("*baseline-cached*: cached's settings run by the build of $BASELINE_REV")
    has_target limit && names+=("*limit*: the canned-row server, hot-set workloads only")
    [ ${#names[@]} -eq 0 ] || printf ' (%s)' "$(IFS=';'; sed 's/;/; /g' <<<"${names[*]}")"
}
dash() { [ "$1" = NA ] || [ -z "$1" ] && echo "—" || echo "$1"; }
# versus WORKLOAD A B COLUMN [range] -> target A's figure over target B's, or —: the ratio is taken
# per round (A and B ran back to back in it) and the median over the rounds where both ran is
# printed, which follows the machine's drift better than a ratio of medians taken from different
# rounds; with `range`, the lowest and highest of the rounds' ratios instead ("lo–hi"). COLUMN
# names the figure as in the summary: 5 TPS, 6 mean latency, 7 p99, 8 CPU per transaction.
versus() {
    awk -F'\t' -v w="$1" -v a="$2" -v b="$3" -v c="$4" -v range="${5:-}" "$AWK_MEDIAN"'
        function fig() {
            if (c == 5) return $5
            if (c == 6) return $7
            if (c == 7) return $8
            if ($9 == "NA" || $6 + 0 == 0) return "NA"
            return $9 / $6
        }
        $2 == w && $4 == "ok" && ($3 == a || $3 == b) { v = fig(); if (v != "NA") got[$3, $1] = v; rounds[$1] = 1 }
        END {
            for (r in rounds)
                if (((a, r) in got) && ((b, r) in got) && got[b, r] + 0 != 0) q[++n] = got[a, r] / got[b, r]
            if (n == 0) { print "—"; exit }
            m = median_of(q, n)
            if (range == "") printf "%.2f", m
            else printf "%.2f–%.2f", q[1], q[n]
        }' "$RUNS"
}
# verdict VALUE OP LIMIT: "met"/"**missed**" (OP is >= or <=), "—" without a value
verdict() {
    awk -v v="$1" -v op="$2" -v l="$3" 'BEGIN {
        if (v == "—" || v == "" || v == "NA") { print "—"; exit }
        ok = (op == ">=") ? (v + 0 >= l + 0) : (v + 0 <= l + 0)
        print ok ? "met" : "**missed**" }'
}
idle_per_client() { awk -F'\t' -v t="$1" -v n="$IDLE_CLIENTS" '$1 == t && $2 == n' "$IDLE" | grep -o 'per_client_bytes=[0-9]*' | cut -d= -f2 || true; }

# target_row WHAT WORKLOAD FIGURE GOAL OP LIMIT [RANGE]: one row, its verdict from FIGURE OP
# LIMIT; RANGE, the rounds' lowest and highest figure, says how firm the verdict is.
target_row() { echo "| $1 | $2 | $3 | ${7:-—} | $4 | $(verdict "$3" "$5" "$6") |"; }
# versus_rows TARGET A:B:COLUMN...: a table row per workload TARGET runs, one `versus` cell per
# A:B:COLUMN.
versus_rows() {
    local target=$1 name row a b col spec w
    shift
    for w in "${WORKLOADS[@]}"; do
        IFS='|' read -r name _ _ <<<"$w"
        runs_on "$target" "$name" || continue
        row="| $name |"
        for spec in "$@"; do
            IFS=: read -r a b col <<<"$spec"
            row+=" $(versus "$name" "$a" "$b" "$col") |"
        done
        echo "$row"
    done
}
# target_versus WHAT WORKLOAD A B COLUMN GOAL OP LIMIT: target_row for A's figure over B's.
target_versus() {
    target_row "$1" "$2" "$(versus "$2" "$3" "$4" "$5")" "$6" "$7" "$8" "$(versus "$2" "$3" "$4" "$5" range)"
}

# The issue-8 targets, each with this run's figure (ratios as in the tables above).
targets_section() {
    local m
    echo
    echo "## Targets"
    echo
    echo "The figure is the median over rounds of the per-round ratio; *rounds* gives the lowest and highest of those ratios: a verdict whose range straddles the goal could go either way in another run."
    echo
    echo "| target | workload | figure | rounds | goal | verdict |"
    echo "|---|---|---:|---:|---:|---|"
    for m in simple extended prepared; do
        target_versus "pass-through TPS pgcache/PgBouncer" "select-$m" pgcache pgbouncer 5 "≥ 1" '>=' 1
        target_versus "pass-through p99 pgcache/PgBouncer" "select-$m" pgcache pgbouncer 7 "≤ 1" '<=' 1
        target_versus "pass-through CPU per tx pgcache/PgBouncer" "select-$m" pgcache pgbouncer 8 "≤ 1" '<=' 1
    done
    for m in simple extended prepared; do
        target_versus "cache warm TPS cached/machine limit" "hot-$m" cached limit 5 "≥ 0.8" '>=' 0.8
        target_versus "cache warm p99 cached/direct" "hot-$m" cached direct 7 "< 0.5" '<=' 0.4999
    done
    target_versus "TPC-B-like TPS cache on/cache off" tpcb cached pgcache 5 "≥ 0.95" '>=' 0.95
    if [ -s "$IDLE" ]; then
        target_row "RSS per idle client pgcache/PgBouncer" "$IDLE_CLIENTS idle clients" \
            "$(ratio "$(idle_per_client pgcache)" "$(idle_per_client pgbouncer)")" "≤ 2" '<=' 2
    fi
}

# Worker threads of pgcache's runtime, as its startup log names them.
pgcache_threads() {
    local log="${PGCACHE_LOG:-${CACHED_LOG:-}}"
    { [ -n "$log" ] && grep -ho 'threads=[0-9]*' "$log" 2>/dev/null | head -n 1 | cut -d= -f2; } || echo "?"
}

{
    echo "# pgcache vs PgBouncer vs PostgreSQL direct — $DATE on $HOST$([ "$SMOKE" = 1 ] && echo ' (smoke run: timings meaningless)')$([ -n "${ONLY:-}${ONLY_TARGETS:-}" ] && echo " (${ONLY:+workloads ${ONLY//,/, }}${ONLY:+${ONLY_TARGETS:+; }}${ONLY_TARGETS:+targets ${ONLY_TARGETS//,/, }})")"
    echo
    echo "- Machine: $(nproc) cores ($CPU_MODEL), $MEM_GIB GiB RAM, $(uname -sr)"
    echo "- pgcache $GIT_REV$([ -n "${BASELINE_REV:-}" ] && echo " against the baseline $BASELINE_REV") (release builds), PgBouncer $BOUNCER_VERSION, PostgreSQL $PG_VERSION"
    echo "- PostgreSQL: throwaway cluster, **fsync=off, synchronous_commit=off, full_page_writes=off**, shared_buffers=256MB, max_connections=300; pgbench scale $SCALE"
    echo "- Proxies: transaction pooling, $POOL_SIZE server connections each, SCRAM-SHA-256 for clients (both given the SCRAM secret from pg_authid) and to the server; all on 127.0.0.1 (pgbench, proxies and PostgreSQL share the cores; each server and proxy runs as a session of its own, and so, with the kernel's autogroup scheduling $(autogroup_state), in a scheduling group of its own, as PostgreSQL and PgBouncer put themselves); pgcache's runtime: $(pgcache_threads) worker thread(s) (\`proxy.worker_threads\`, from its startup log)"
    echo "- pgbench $THREADS threads, ${DURATION}s per run, $ROUNDS round(s) interleaved $(sed 's/ / → /g' <<<"${TARGETS[*]}") per workload$(target_names); ${WARMUP}s warm-up per target first; pgbench phase ${PGBENCH_SECS}s. 1-minute load average before the script started: $LOAD_START (other work on the machine; ideally ~0)"
    echo "- TPS: median over rounds of pgbench's \`tps\` (with \`-C\`: including reconnection times). Latency: every transaction logged (\`pgbench -l\`); mean and p99 (nearest rank) per run, median over rounds. pgbench logs a transaction's latency without connection set-up; for \`-C\` its mean connection time is the *connect ms* column."
    echo "- Other CPU: CPU time used during a run by anything but pgbench, PostgreSQL and the proxies (from /proc/stat, plus hypervisor steal), as % of the machine; max over rounds. Within ±5% is accounting noise; more means other work disturbed the run."
    has_target cached && echo "- *cached*: a second pgcache, same settings plus \`[cache] enabled\` with one rule for \`pgbench_*\` (TTL 1 h: only the proxy writes these tables; room for every key); warmed with ${CACHE_WARMUP}s of \`-S\` and ${HOT_WARMUP}s of the hot set per protocol mode before the rounds. Hit ratio: hits / (hits + misses) over the run, from its \`/metrics\`, median over rounds. \`pgbench -S\` (*select-\**) draws from $((SCALE * 100000)) accounts, so there the ratio says how much of that key space the cache holds; *hot-\** sends the same statement with the account drawn from 1..$HOT_KEYS, a working set the warm cache holds (what a cache is for); *wide-extended* reads $WIDE_ROWS rows from one of the first $WIDE_KEYS accounts (warmed with ${HOT_WARMUP}s of it; each round's TPC-B-like run empties it again). PgBouncer does not run *hot-\** (its figures would repeat *select-\**)."
    echo "- Proxy CPU: utime+stime of the proxy process (/proc/<pid>/stat) over the run, per 10k transactions, median over rounds. Peak RSS: VmHWM, reset before each run (clear_refs), max over rounds."
    echo "- Slowest tx: the slowest transaction pgbench logged, max over rounds (a round with an outlier shows here, not in the median p99). Wake-ups per tx: voluntary context switches of the proxy's threads (each one blocked and was woken again) per transaction, median over rounds; a run where this is several times the usual is one where the proxy's threads slept and woke for nearly every event (\`benches/README.md\`, *Profiling*)."
    echo
    echo "## Throughput and latency"
    echo
    echo "| workload | target | TPS (median) | mean latency ms | p99 latency ms | slowest tx ms (max) | connect ms | proxy CPU s / 10k tx | proxy wake-ups per tx | proxy peak RSS MiB | TPS per round | other CPU % (max) | status |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"
    while IFS=$'\t' read -r w t st okr tps mean p99 cpu rss all conn oth slow wake note; do
        s="$st"; [ "$st" = ok ] || s="**$st** ($okr ok): ${note//|/\\|}"
        echo "| $w | $t | $(dash "$tps") | $(dash "$mean") | $(dash "$p99") | $(dash "$slow") | $(dash "$conn") | $(dash "$cpu") | $(dash "$wake") | $(mib "$rss") | $all | $(dash "$oth") | $s |"
    done <"$SUMMARY"
    disturbed="$(awk -F'\t' '$12 != "NA" && $12 + 0 > 5 { n++ } END { print n + 0 }' "$RUNS")"
    if [ "$disturbed" -gt 0 ]; then
        echo
        echo "**Warning:** $disturbed of $(wc -l <"$RUNS") runs had more than 5% of the machine's CPU used by other work; compare rounds before trusting a figure."
    fi
    echo
    echo "## Ratios"
    echo
    echo "Each ratio is taken per round (the two targets ran back to back) and the median over rounds is shown. A TPS ratio above 1, and latency and CPU ratios below 1, favour pgcache."
    echo
    echo "| workload | TPS pgcache/PgBouncer | p99 pgcache/PgBouncer | CPU per tx pgcache/PgBouncer | TPS pgcache/direct | p99 pgcache/direct |"
    echo "|---|---:|---:|---:|---:|---:|"
    for w in "${WORKLOADS[@]}"; do
        IFS='|' read -r name _ _ <<<"$w"
        echo "| $name | $(versus "$name" pgcache pgbouncer 5) | $(versus "$name" pgcache pgbouncer 7) | $(versus "$name" pgcache pgbouncer 8) | $(versus "$name" pgcache direct 5) | $(versus "$name" pgcache direct 7) |"
    done
    if [ -n "${BASELINE_REV:-}" ]; then
        echo
        echo "## Against the baseline"
        echo
        echo "The build of $BASELINE_REV with the settings of *pgcache* (*baseline*, cache off) and of *cached* (*baseline-cached*), each run right after its counterpart in every round: what the change from $BASELINE_REV to $GIT_REV costs or gains. Ratios per round, median over rounds (a TPS ratio above 1, and p99 and CPU ratios below 1, favour $GIT_REV); CPU per transaction in µs (proxy utime+stime / transactions, median over rounds)."
        echo
        echo "| workload | cache | TPS new/baseline | p99 new/baseline | CPU per tx new/baseline | CPU µs/tx new | CPU µs/tx baseline | CPU µs/tx PgBouncer |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|"
        ab_pairs=("off pgcache baseline" "on cached baseline-cached")
        for w in "${WORKLOADS[@]}"; do
            IFS='|' read -r name _ _ <<<"$w"
            for pair in "${ab_pairs[@]}"; do
                read -r cache new old <<<"$pair"
                has_target "$new" && has_target "$old" && runs_on "$old" "$name" || continue
                echo "| $name | $cache | $(versus "$name" "$new" "$old" 5) | $(versus "$name" "$new" "$old" 7) | $(versus "$name" "$new" "$old" 8) | $(micros "$(field "$name" "$new" 8)") | $(micros "$(field "$name" "$old" 8)") | $( [ "$cache" = off ] && micros "$(field "$name" pgbouncer 8)" || echo —) |"
            done
        done
    fi
    if [ -s "$HITS" ]; then
        echo
        echo "## Cache on"
        echo
        echo "| workload | TPS cached | hit ratio | TPS cached/direct | mean latency cached/direct | p99 cached/direct | TPS cached/pgcache (cache off) | CPU per tx cached/pgcache |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|"
        for w in "${WORKLOADS[@]}"; do
            IFS='|' read -r name _ _ <<<"$w"
            hr="$(hit_ratio "$name" cached)"
            echo "| $name | $(dash "$(field "$name" cached 5)") | $hr | $(versus "$name" cached direct 5) | $(versus "$name" cached direct 6) | $(versus "$name" cached direct 7) | $(versus "$name" cached pgcache 5) | $(versus "$name" cached pgcache 8) |"
        done
    fi
    if [[ " ${TARGETS[*]} " == *" plain "* ]]; then
        echo
        echo "## Query insight overhead"
        echo
        echo "*plain*: a third pgcache with \`[insight] enabled = false\` (no per-statement fingerprint, timing or statistics), select workloads only."
        echo
        echo "| workload | TPS pgcache/plain | p99 pgcache/plain | CPU per tx pgcache/plain |"
        echo "|---|---:|---:|---:|"
        versus_rows plain pgcache:plain:5 pgcache:plain:7 pgcache:plain:8
    fi
    if has_target onethread; then
        echo
        echo "## One thread"
        echo
        echo "*onethread*: a third pgcache with pgcache's settings and \`proxy.worker_threads = 1\` (tokio's current-thread runtime: every task on one thread), in the same rounds."
        echo
        echo "| workload | TPS onethread/PgBouncer | p99 onethread/PgBouncer | CPU per tx onethread/PgBouncer | TPS onethread/pgcache | p99 onethread/pgcache | CPU per tx onethread/pgcache |"
        echo "|---|---:|---:|---:|---:|---:|---:|"
        versus_rows onethread onethread:pgbouncer:5 onethread:pgbouncer:7 onethread:pgbouncer:8 \
            onethread:pgcache:5 onethread:pgcache:7 onethread:pgcache:8
    fi
    if has_target limit; then
        echo
        echo "## Machine limit"
        echo
        echo "*limit*: \`benches/canned.rs\`, a server that answers every statement with a canned row (no parsing, no storage): the most pgbench can drive on this machine, measured on the hot-set workloads. The cache-warm target is *cached* (its hit ratio is in *Cache on*)."
        echo
        echo "| workload | TPS limit | direct/limit | pgcache/limit | cached/limit | redis/limit |"
        echo "|---|---:|---:|---:|---:|---:|"
        for w in "${WORKLOADS[@]}"; do
            IFS='|' read -r name _ _ <<<"$w"
            runs_on limit "$name" || continue
            echo "| $name | $(dash "$(field "$name" limit 5)") | $(versus "$name" direct limit 5) | $(versus "$name" pgcache limit 5) | $(versus "$name" cached limit 5) | $(versus "$name" redis limit 5) |"
        done
    fi
    if has_target redis || has_target l2; then
        echo
        echo "## Shared tier (Redis)"
        echo
        echo "*redis*: the *cached* settings plus \`[cache.redis]\` (a redis-server on loopback, eventual consistency): every miss asks Redis, every fill is stored there too. *l2*: the same with \`max_entries = 1\`, so nearly every hit is an L2 hit (a Redis round trip). Both warmed like *cached*."
        echo
        echo "| workload | TPS redis | hit ratio | TPS redis/cached (L1 only) | p99 redis/cached | TPS l2 | l2 hit ratio | mean latency l2/cached | mean latency l2 ms | TPS l2/pgcache (cache off) |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for w in "${WORKLOADS[@]}"; do
            IFS='|' read -r name _ _ <<<"$w"
            runs_on redis "$name" || continue
            echo "| $name | $(dash "$(field "$name" redis 5)") | $(hit_ratio "$name" redis) | $(versus "$name" redis cached 5) | $(versus "$name" redis cached 7) | $(dash "$(field "$name" l2 5)") | $(hit_ratio "$name" l2) | $(versus "$name" l2 cached 6) | $(dash "$(field "$name" l2 6)") | $(versus "$name" l2 pgcache 5) |"
        done
    fi
    targets_section
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
        echo
        echo "RSS per idle client, pgcache/PgBouncer at $IDLE_CLIENTS clients: $(ratio "$(idle_per_client pgcache)" "$(idle_per_client pgbouncer)")"
    fi
    if [ ${#BROKEN[@]} -gt 0 ]; then
        echo
        echo "## Broken"
        echo
        for b in "${BROKEN[@]}"; do echo "- $b"; done
    fi
} >"$MD"

{
    echo "section,round,workload,target,status,runs_ok,tps,transactions,lat_mean_ms,lat_p99_ms,lat_max_ms,proxy_cpu_s,proxy_cpu_s_per_10k_tx,proxy_wakeups_per_tx,proxy_peak_rss_kb,connect_ms,other_cpu_pct,tps_per_round,idle_clients,rss_before_kb,rss_after_kb,rss_per_client_bytes,max_server_conns,rss_closed_kb,note"
    while IFS=$'\t' read -r w t st okr tps mean p99 cpu rss all conn oth slow wake note; do
        echo "summary,,$w,$t,$st,$okr,$tps,,$mean,$p99,$slow,,$cpu,$wake,$rss,$conn,$oth,$all,,,,,,,\"${note//\"/\'}\""
    done <"$SUMMARY"
    while IFS=$'\t' read -r round w t st tps tx mean p99 cpu rss conn oth slow wake note; do
        per10k="$(awk -v c="$cpu" -v n="$tx" 'BEGIN { if (c == "NA" || n == "NA" || n + 0 == 0) print "NA"; else printf "%.3f", c / n * 10000 }')"
        echo "run,$round,$w,$t,$st,,$tps,$tx,$mean,$p99,$slow,$cpu,$per10k,$wake,$rss,$conn,$oth,,,,,,,,\"${note//\"/\'}\""
    done <"$RUNS"
    while IFS=$'\t' read -r t n kv; do
        get() { tr ' ' '\n' <<<"$kv" | awk -F= -v k="$1" '$1 == k { print $2 }'; }
        echo "idle,,,$t,$( [ "$(get ok)" = true ] && echo ok || echo failed),,,,,,,,,,$(get hwm_kb),,,,$n,$(get rss_before_kb),$(get rss_after_kb),$(get per_client_bytes),$(get max_server_conns),$(get rss_closed_kb),"
    done <"$IDLE"
} >"$CSV"

# The chart: median TPS per workload and target, each workload's bars scaled to its own best.
SVG="$RESULTS_DIR/$DATE-$HOST$SUFFIX.svg"
awk -F'\t' -v title="pgcache vs PgBouncer vs PostgreSQL direct — $DATE, $HOST$([ "$SMOKE" = 1 ] && echo ' (smoke: timings meaningless)')" '
    function esc(s) { gsub(/&/, "\\&amp;", s); gsub(/</, "\\&lt;", s); return s }
    $5 != "NA" && $5 + 0 > 0 {
        if (!($1 in seen)) { seen[$1] = 1; order[++nw] = $1 }
        n[$1]++; tgt[$1, n[$1]] = $2; tps[$1, n[$1]] = $5
        if ($5 + 0 > top[$1]) top[$1] = $5 + 0
    }
    END {
        colour["direct"] = "#4c78a8"; colour["pgbouncer"] = "#9d755d"; colour["pgcache"] = "#f58518"
        colour["cached"] = "#54a24b"; colour["plain"] = "#bab0ac"; colour["onethread"] = "#eeca3b"; colour["redis"] = "#b279a2"
        colour["l2"] = "#ff9da6"; colour["limit"] = "#e45756"
        y = 40; body = ""
        for (i = 1; i <= nw; i++) {
            w = order[i]
            body = body sprintf("<text x=\"10\" y=\"%d\" font-weight=\"bold\">%s</text>\n", y, esc(w))
            y += 8
            for (j = 1; j <= n[w]; j++) {
                t = tgt[w, j]; v = tps[w, j]; len = 560 * v / top[w]
                c = (t in colour) ? colour[t] : "#888888"
                body = body sprintf("<text x=\"110\" y=\"%d\" text-anchor=\"end\">%s</text>", y + 12, esc(t))
                body = body sprintf("<rect x=\"120\" y=\"%d\" width=\"%.1f\" height=\"15\" fill=\"%s\"/>", y, len, c)
                body = body sprintf("<text x=\"%.1f\" y=\"%d\">%d TPS</text>\n", 126 + len, y + 12, v)
                y += 19
            }
            y += 18
        }
        printf "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"800\" height=\"%d\" font-family=\"sans-serif\" font-size=\"12\">\n", y
        printf "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
        printf "<text x=\"10\" y=\"20\" font-size=\"14\">%s (median TPS; bars scaled per workload)</text>\n", esc(title)
        printf "%s</svg>\n", body
    }' "$SUMMARY" >"$SVG"

echo
cat "$MD"
echo
log "wrote $CSV, $MD and $SVG"
if [ ${#BROKEN[@]} -gt 0 ]; then
    log "BROKEN:"; printf '  %s\n' "${BROKEN[@]}" >&2
    exit 1
fi
