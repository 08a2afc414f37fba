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
TAG="$(date +%s)$$"
PG_BASE="${BENCH_DATABASE_BASE:-postgres://postgres@127.0.0.1:5432}"
export DATABASE_URL="$PG_BASE/provisioner_load_$TAG"
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
export PROVISIONER_LISTEN="127.0.0.1:$PORT"
export RUST_LOG="${RUST_LOG:-warn}"
WORK="$(mktemp -d)"
export PROVISIONER_CONFIG="$WORK/bench.toml"
cat > "$PROVISIONER_CONFIG" <<TOML
[broker]
exchange = "load.$TAG.clerk.webhooks"
queue = "load.$TAG.provisioner.events"
dead_letter_exchange = "load.$TAG.provisioner.dlx"
dead_letter_queue = "load.$TAG.provisioner.dead"
retry_queue_prefix = "load.$TAG.provisioner.retry"
TOML

echo "== building (release)"
cargo build --release --quiet
BIN=target/release/provisioner

SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  "$BIN" load teardown --yes >/dev/null 2>&1 || echo "warning: teardown of load.$TAG.* failed" >&2
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== starting serve --no-worker on $PROVISIONER_LISTEN (queues load.$TAG.*)"
"$BIN" serve --no-worker 2>"$WORK/serve.log" &
SERVER_PID=$!
for _ in $(seq 1 120); do
  curl -fs "http://$PROVISIONER_LISTEN/healthz" >/dev/null 2>&1 && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/serve.log" >&2; exit 1; }
  sleep 0.5
done
curl -fs "http://$PROVISIONER_LISTEN/readyz" >/dev/null

URL="http://$PROVISIONER_LISTEN/webhooks/clerk"
run() { echo "\$ provisioner load $*" >&2; "$BIN" load "$@"; }

echo "== 1/3 broker only, concurrency $CONCURRENCY"
BROKER="$(run broker --concurrency "$CONCURRENCY" --duration "$DURATION" --json)"
echo "== 2/3 intake, concurrency $CONCURRENCY"
INTAKE="$(run intake --url "$URL" --concurrency "$CONCURRENCY" --duration "$DURATION" --json)"
HALF_RATE="$(jq -n --argjson i "$INTAKE" '($i.per_second / 2) | floor')"
echo "== 3/3 intake at half that rate: $HALF_RATE/s"
HALF="$(run intake --url "$URL" --rate "$HALF_RATE" --concurrency 256 --duration "$DURATION" --json)"

echo
printf '%-34s %10s %8s %9s %9s %9s\n' "run" "req/s" "errors" "p50 ms" "p99 ms" "max ms"
for row in "broker only (c=$CONCURRENCY):$BROKER" "intake (c=$CONCURRENCY):$INTAKE" "intake at $HALF_RATE/s:$HALF"; do
  name="${row%%:\{*}"; json="{${row#*:\{}"
  jq -r --arg n "$name" '[$n, (.per_second|floor), .errors, (.p50*100|round/100), (.p99*100|round/100), (.max*100|round/100)] | @tsv' <<<"$json" \
    | awk -F'\t' '{ printf "%-34s %10s %8s %9s %9s %9s\n", $1, $2, $3, $4, $5, $6 }'
done
echo
jq -rn --argjson b "$BROKER" --argjson i "$INTAKE" --argjson h "$HALF" '
  ($i.per_second / $b.per_second) as $ratio
  | "intake / broker-only rate: \(($ratio * 1000 | round) / 10) %  (target >= 70 %: \(if $ratio >= 0.70 then "met" else "NOT met" end))",
    "p99 at half rate: \(($h.p99 * 100 | round) / 100) ms  (target <= 25 ms: \(if $h.p99 <= 25 then "met" else "NOT met" end))",
    "errors: broker \($b.errors), intake \($i.errors), half rate \($h.errors)"'
