#!/usr/bin/env bash
# Intake benchmark (issue 2 "Performance"), in one run on this machine:
#   1. the broker alone: persistent, mandatory, one confirm awaited per message,
#      64 concurrent publishers, ~1.5 KB events, to a scratch quorum queue;
#   2. intake (`serve --no-worker`, release build) at 64 concurrent requests;
#   3. intake at a fixed rate of half the rate measured in 2, for its p99.
# Targets: intake >= 70 % of the broker-only rate; p99 <= 25 ms at half rate.
# Runs on scratch names (`load.<tag>.*` queues, `provisioner_load_<tag>` database)
# and deletes them at the end, whatever happens.
#
# Usage: bench/run_intake.sh [DURATION]   (per phase, default 15s)
# Needs PostgreSQL and RabbitMQ on their default ports (or DATABASE_URL / AMQP_URL
# pointing at a server, without a database name: the script picks one).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${1:-15s}"
CONCURRENCY=64
# shellcheck source=bench/lib.sh
source bench/lib.sh
bench_setup

echo "== starting serve --no-worker on $PROVISIONER_LISTEN (queues load.$TAG.*)"
bench_start serve serve --no-worker
bench_wait_ready

URL="http://$PROVISIONER_LISTEN/webhooks/clerk"

echo "== 1/3 broker only, concurrency $CONCURRENCY"
BROKER="$(bench_load broker --concurrency "$CONCURRENCY" --duration "$DURATION" --json)"
echo "== 2/3 intake, concurrency $CONCURRENCY"
# The receiver's CPU (user + system) over phase 2, per confirmed webhook.
serve_ticks() { awk '{print $14 + $15}' "/proc/${BENCH_PIDS[0]}/stat"; }
TICKS0="$(serve_ticks)"
INTAKE="$(bench_load intake --url "$URL" --concurrency "$CONCURRENCY" --duration "$DURATION" --json)"
TICKS1="$(serve_ticks)"
HALF_RATE="$(jq -n --argjson i "$INTAKE" '($i.per_second / 2) | floor')"
# Nothing consumes in this benchmark: empty the ~75k events of phase 2 first, or
# phase 3 measures the broker's pauses over a queue no worker would let grow.
if command -v rabbitmqctl >/dev/null; then
  rabbitmqctl -q purge_queue "load.$TAG.provisioner.events" >/dev/null 2>&1 || true
fi
echo "== 3/3 intake at half that rate: $HALF_RATE/s"
HALF="$(bench_load intake --url "$URL" --rate "$HALF_RATE" --concurrency 256 --duration "$DURATION" --json)"

echo
printf '%-34s %10s %8s %9s %9s %9s\n' "run" "req/s" "errors" "p50 ms" "p99 ms" "max ms"
for row in "broker only (c=$CONCURRENCY):$BROKER" "intake (c=$CONCURRENCY):$INTAKE" "intake at $HALF_RATE/s:$HALF"; do
  name="${row%%:\{*}"; json="{${row#*:\{}"
  jq -r --arg n "$name" '[$n, (.per_second|floor), .errors, (.p50*100|round/100), (.p99*100|round/100), (.max*100|round/100)] | @tsv' <<<"$json" \
    | awk -F'\t' '{ printf "%-34s %10s %8s %9s %9s %9s\n", $1, $2, $3, $4, $5, $6 }'
done
echo
jq -rn --argjson b "$BROKER" --argjson i "$INTAKE" --argjson h "$HALF" \
  --argjson cpu "$((TICKS1 - TICKS0))" --argjson hz "$(getconf CLK_TCK)" '
  ($i.per_second / $b.per_second) as $ratio
  | "intake / broker-only rate: \(($ratio * 1000 | round) / 10) %  (target >= 70 %: \(if $ratio >= 0.70 then "met" else "NOT met" end))",
    "p99 at half rate: \(($h.p99 * 100 | round) / 100) ms  (target <= 25 ms: \(if $h.p99 <= 25 then "met" else "NOT met" end))",
    "receiver CPU per confirmed webhook: \($cpu / $hz / $i.ok * 1e6 | round) us",
    "errors: broker \($b.errors), intake \($i.errors), half rate \($h.errors)"'
