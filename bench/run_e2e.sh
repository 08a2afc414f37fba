#!/usr/bin/env bash
# End-to-end benchmark (issue 3 "Metrics and performance"), in one run on this machine:
#   1. PostgreSQL alone: pgbench, one Clerk event per transaction
#      (bench/pgbench_event.sql), 8 clients, on the real schema;
#   2. end to end at a fixed 500 events/s: `serve --no-worker` (intake) + a
#      separate `provisioner worker` process + RabbitMQ + PostgreSQL; provisioning
#      lag p50/p99 (processing-log time - time the request was sent);
#   3. end to end as fast as 64 concurrent senders go: sustained events/s
#      provisioned (10th..90th percentile of processing times);
#   and the worker process's peak RSS (VmHWM) over 2 and 3.
# Targets: 3 >= 1.5 x 1; lag p99 <= 100 ms in 2; worker RSS <= 100 MB.
# Runs on scratch names (`load.<tag>.*` queues, `provisioner_load_<tag>` database)
# and deletes them at the end, whatever happens.
#
# Usage: bench/run_e2e.sh [SECONDS]   (length of each phase, default 15)
# Needs PostgreSQL and RabbitMQ on their default ports (BENCH_DATABASE_BASE /
# AMQP_URL to point elsewhere), pgbench, jq and curl.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${1:-15}"
# shellcheck source=bench/lib.sh
source bench/lib.sh
bench_setup

echo "== 1/3 PostgreSQL alone: pgbench, one event per transaction, 8 clients, ${SECS}s"
# On a database of its own with the same schema, so its rows do not weigh on (or
# autovacuum under) the end-to-end phases.
PGB_DB="${DB}_pgbench"
psql -q "$PG_BASE/postgres" -c "create database \"$PGB_DB\"" >/dev/null
pgbench_cleanup() {
  psql -q "$PG_BASE/postgres" -c "drop database if exists \"$PGB_DB\" with (force)" >/dev/null 2>&1 || true
}
DATABASE_URL="$PG_BASE/$PGB_DB" "$BIN" migrate >/dev/null
psql -q "$PG_BASE/$PGB_DB" -c "insert into workspaces (id, name, plan, source_version)
  select 'bench_ws_' || i, 'Bench ' || i, 'free', 1 from generate_series(1, 1000) i" >/dev/null
psql -q "$PG_BASE/$PGB_DB" -c "vacuum analyze" >/dev/null
PGBENCH_OUT="$(pgbench -n -c 8 -j 2 -T "$SECS" -f bench/pgbench_event.sql "$PG_BASE/$PGB_DB" 2>&1)" \
  || { echo "$PGBENCH_OUT" >&2; pgbench_cleanup; exit 1; }
pgbench_cleanup
PG_TPS="$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$PGBENCH_OUT" | head -1)"
PG_FAILED="$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$PGBENCH_OUT")"
echo "pgbench: $PG_TPS tps (${PG_FAILED:-0} failed)"

echo "== starting serve --no-worker on $PROVISIONER_LISTEN and a worker process"
bench_start serve serve --no-worker
bench_start worker worker
WORKER_PID="${BENCH_PIDS[1]}"
bench_wait_ready
URL="http://$PROVISIONER_LISTEN"

# The fixed-rate phase first, so the overload phase's backlog and the autovacuum
# it triggers do not weigh on the lag figures.
RATE_EVENTS=$((500 * SECS))
echo "== 2/3 end to end at 500 events/s: $RATE_EVENTS events"
FIXED="$(bench_load e2e "$URL" --events "$RATE_EVENTS" --rate 500 --concurrency 128 --json)"
# As many events as ~1.5 x the pgbench rate would provision in SECS (at least 5000).
MAX_EVENTS="$(jq -n --argjson t "$PG_TPS" --argjson s "$SECS" '[($t * 1.5 * $s) | floor, 5000] | max')"
echo "== 3/3 end to end, as fast as 64 senders go: $MAX_EVENTS events"
MAX="$(bench_load e2e "$URL" --events "$MAX_EVENTS" --concurrency 64 --json)"
RSS_KB="$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$WORKER_PID/status")"
RSS_NOW_KB="$(sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$WORKER_PID/status")"

echo
printf '%-38s %10s %10s %10s %10s\n' "run" "events/s" "lag p50" "lag p99" "lag max"
printf '%-38s %10.0f %10s %10s %10s\n' "pgbench, 1 event/tx, 8 clients" "$PG_TPS" "-" "-" "-"
for row in "end to end, 500/s:$FIXED" "end to end, 64 senders:$MAX"; do
  name="${row%%:\{*}"; json="{${row#*:\{}"
  jq -r --arg n "$name" '[$n, (.sustained_per_second|floor), (.lag.p50|round), (.lag.p99|round), (.lag.max|round)] | @tsv' <<<"$json" \
    | awk -F'\t' '{ printf "%-38s %10s %8s ms %7s ms %7s ms\n", $1, $2, $3, $4, $5 }'
done
echo
jq -rn --argjson pg "$PG_TPS" --argjson m "$MAX" --argjson f "$FIXED" \
  --argjson rss "$RSS_KB" --argjson rssnow "$RSS_NOW_KB" '
  ($m.sustained_per_second / $pg) as $ratio
  | "end to end / pgbench rate: \(($ratio * 100 | round) / 100) x  (target >= 1.5 x: \(if $ratio >= 1.5 then "met" else "NOT met" end))",
    "lag p99 at 500/s: \($f.lag.p99 | round) ms  (target <= 100 ms: \(if $f.lag.p99 <= 100 then "met" else "NOT met" end)); achieved \($f.sustained_per_second | floor)/s",
    "worker RSS: peak \(($rss / 1024 * 10 | round) / 10) MB, now \(($rssnow / 1024 * 10 | round) / 10) MB  (target <= 100 MB: \(if $rss <= 102400 then "met" else "NOT met" end))",
    "not processed: \($m.not_processed + $f.not_processed), refused: \($m.refused + $f.refused), intake errors: \($m.intake.errors + $f.intake.errors)"'
