#!/usr/bin/env bash
# The worker alone on a backlog (issue 12): intake queues N events with no worker
# running, then one `provisioner worker` drains them. Reports the drain rate
# (events/s from the first processing-log row to the last) and the CPU
# each process spent per event while draining: the worker, PostgreSQL's backends
# and RabbitMQ's node. Intake and the load generator are idle by then, so these
# figures are the apply path's own (set-based batches, acks), free of the
# end-to-end benchmark's competition for the same two cores.
#
# Usage: bench/run_drain.sh [EVENTS]   (default 20000; one organization.created
#        then 4 organizationMembership.created per organization)
# Env: SKIP_BUILD=1 to reuse the release build; CARGO_TARGET_DIR for another build.
set -euo pipefail
cd "$(dirname "$0")/.."

EVENTS="${1:-20000}"
# shellcheck source=bench/lib.sh
source bench/lib.sh
bench_setup

bench_start serve serve --no-worker
bench_wait_ready
URL="http://$PROVISIONER_LISTEN"
QUEUE="load.$TAG.provisioner.events"

# CPU ticks (utime + stime) of every process whose command line matches $1.
ticks() {
  local total=0 d c t
  for d in /proc/[0-9]*; do
    c="$(tr '\0' ' ' <"$d/cmdline" 2>/dev/null)" || continue
    [[ "$c" =~ $1 ]] || continue
    t="$(awk '{print $14 + $15}' "$d/stat" 2>/dev/null)" || continue
    total=$((total + t))
  done
  echo "$total"
}
queued() {
  rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q="$QUEUE" '$1 == q {print $2}'
}

echo "== queueing $EVENTS events (no worker running)"
LOAD_OUT="$WORK/load.json"
bench_load e2e "$URL" --events "$EVENTS" --concurrency 64 --timeout-secs 600 --json >"$LOAD_OUT" &
LOAD_PID=$!
for _ in $(seq 1 600); do
  [[ "$(queued)" == "$EVENTS" ]] && break
  sleep 1
done
[[ "$(queued)" == "$EVENTS" ]] || { echo "the queue never held $EVENTS events" >&2; exit 1; }

PG_RE="^postgres: .*${DB}"
BEAM_RE="beam\\.smp"
PG0="$(ticks "$PG_RE")"
BEAM0="$(ticks "$BEAM_RE")"
echo "== draining with one worker"
bench_start worker worker
WORKER_PID="${BENCH_PIDS[1]}"
for _ in $(seq 1 6000); do
  [[ "$(queued)" == 0 ]] && break
  sleep 0.1
done
wait "$LOAD_PID"
PG1="$(ticks "$PG_RE")"
BEAM1="$(ticks "$BEAM_RE")"
WORKER_TICKS="$(awk '{print $14 + $15}' "/proc/$WORKER_PID/stat")"
RSS_KB="$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$WORKER_PID/status")"
# The drain runs from the first processing-log row to the last.
SPAN="$(psql -At "$DATABASE_URL" -c "select extract(epoch from max(processed_at) - min(processed_at)) from events")"
HZ="$(getconf CLK_TCK)"
jq -rn --argjson n "$EVENTS" --argjson secs "$SPAN" \
  --argjson pg "$((PG1 - PG0))" --argjson beam "$((BEAM1 - BEAM0))" \
  --argjson worker "$WORKER_TICKS" --argjson hz "$HZ" --argjson rss "$RSS_KB" \
  --slurpfile load "$LOAD_OUT" '
  def us(t): (t / $hz / $n * 1e6 | round);
  "drained \($n) events in \(($secs * 100 | round) / 100) s: \($n / $secs | floor) events/s",
  "CPU per event: worker \(us($worker)) us, PostgreSQL \(us($pg)) us, RabbitMQ \(us($beam)) us, sum \(us($worker + $pg + $beam)) us",
  "worker peak RSS: \(($rss / 1024 * 10 | round) / 10) MB; not processed: \($load[0].not_processed)"'
