#!/usr/bin/env bash
# The nemesis's long run (issue 21): seeded Clerk histories sent like Svix through
# the real binary while faults drawn from the seed hit it, checked after every
# round (tests/it/nemesis.rs, tests/it/nemesis/). Prints the run's row of the table in
# docs/reliability.md: seed, minutes, rounds, events, webhooks sent, retried,
# duplicates, faults by kind, reads sampled (judged), violations, peak RSS.
#
# Usage: bench/nemesis.sh --seed N --minutes M [--workers W] [--intakes I]
#                         [--ops OPS] [--interval-ms MS] [--no-faults]
# Exit status: non-zero when the run found a violation (its seed, schedule and
# every violation are printed). Needs PostgreSQL's server binaries (initdb,
# pg_ctl; PG_BIN) and RabbitMQ on 127.0.0.1:5672 (TEST_AMQP_URL to point elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."

SEED=1 MINUTES=1 WORKERS=2 INTAKES=1 OPS=200 INTERVAL_MS=60 FAULTS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --seed) SEED="$2"; shift 2 ;;
    --minutes) MINUTES="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --intakes) INTAKES="$2"; shift 2 ;;
    --ops) OPS="$2"; shift 2 ;;
    --interval-ms) INTERVAL_MS="$2"; shift 2 ;;
    --no-faults) FAULTS=0; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

LOG="$(mktemp -t nemesis-XXXXXX.log)"
echo "nemesis: seed $SEED for $MINUTES min ($WORKERS workers, $INTAKES intakes, faults $FAULTS); log $LOG"
# One test thread: the test harness's 15-minute watchdog is for CI tests, not
# for a run of an hour.
set +e
NEMESIS_SEED="$SEED" NEMESIS_MINUTES="$MINUTES" NEMESIS_WORKERS="$WORKERS" \
NEMESIS_INTAKES="$INTAKES" NEMESIS_OPS="$OPS" NEMESIS_INTERVAL_MS="$INTERVAL_MS" \
NEMESIS_FAULTS="$FAULTS" \
  nice cargo test --test it nemesis::nemesis_seed -- --ignored --exact --nocapture \
  --test-threads 1 >"$LOG" 2>&1
STATUS=$?
set -e
grep -E '^nemesis seed' "$LOG" | tail -n 3 || true
grep -E '^\|' "$LOG" || true
if [ "$STATUS" -ne 0 ]; then
  grep -E -A 60 'panicked|the nemesis found' "$LOG" | head -n 80
  echo "nemesis: seed $SEED FAILED (log $LOG)" >&2
fi
exit "$STATUS"
