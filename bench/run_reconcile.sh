#!/usr/bin/env bash
# Benchmark of the reconcile backfill (issue 10): `provisioner reconcile` from an empty
# database against a fake Backend API of ORGS organizations with MEMBERS memberships each
# (no rate limit), and in the same sitting `cargo bench --bench provision_batch`, whose
# batch-32 line is the limit the backfill is compared with (the backfill applies its
# repairs in batches of 32, 8 at once, as that benchmark's appliers do). Prints events/s,
# the ratio and the reconcile process's peak RSS.
#
# Usage: bench/run_reconcile.sh [ORGS=10000] [MEMBERS=5]
# Env:   PG_BASE (default postgres://postgres@127.0.0.1:5432), SKIP_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."
ORGS=${1:-10000}
MEMBERS=${2:-5}
PG_BASE=${PG_BASE:-postgres://postgres@127.0.0.1:5432}
DB="prov_bench_reconcile_$$"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
KEY="sk_test_load_fake_clerk"
TARGET="${CARGO_TARGET_DIR:-target}"
WORK=$(mktemp -d)
FAKE_PID=""
cleanup() {
    [[ -n "$FAKE_PID" ]] && kill "$FAKE_PID" 2>/dev/null && wait "$FAKE_PID" 2>/dev/null || true
    psql -q "$PG_BASE/postgres" -c "drop database if exists \"$DB\" with (force)" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

if [[ "${SKIP_BUILD:-}" != 1 ]]; then
    cargo build --release --quiet --bin provisioner --bin provisioner-load
fi
cat >"$WORK/bench.toml" <<TOML
[reconcile]
requests_per_second = 0
max_removals = 0
TOML
export PROVISIONER_CONFIG="$WORK/bench.toml" RUST_LOG=warn
"$TARGET"/release/provisioner-load fake-clerk --orgs "$ORGS" --members "$MEMBERS" \
    --listen "127.0.0.1:$PORT" --key "$KEY" 2>"$WORK/fake.log" &
FAKE_PID=$!
for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.2
done
DATABASE_URL="$PG_BASE/$DB" "$TARGET"/release/provisioner migrate >/dev/null 2>&1 || \
    DATABASE_URL="$PG_BASE/$DB" AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f "$TARGET"/release/provisioner migrate >/dev/null

echo "== reconcile backfill: $ORGS organizations x $MEMBERS memberships"
start=$(date +%s.%N)
DATABASE_URL="$PG_BASE/$DB" CLERK_API_URL="http://127.0.0.1:$PORT" CLERK_SECRET_KEY="$KEY" \
    /usr/bin/time -f "%M %U %S %e" -o "$WORK/rss" "$TARGET"/release/provisioner reconcile --json >"$WORK/report.json"
end=$(date +%s.%N)
applied=$(python3 -c "import json,sys; print(json.load(open('$WORK/report.json'))['applied'])")
secs=$(python3 -c "print($end - $start)")
rate=$(python3 -c "print(round($applied / ($end - $start)))")
read -r rss_kb user_s sys_s _ <"$WORK/rss"
fake_s=$(awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$FAKE_PID/stat")
echo "reconcile: $applied events applied in ${secs%.*}.$(echo "$secs" | cut -d. -f2 | cut -c1-2) s = $rate events/s; peak RSS $((rss_kb / 1024)) MB; CPU: reconcile ${user_s} s user + ${sys_s} s sys, fake Clerk ${fake_s} s"

echo "== cargo bench --bench provision_batch (same sitting)"
bench=$(cargo bench --quiet --bench provision_batch 2>/dev/null | tee /dev/stderr | grep "batch size 32")
limit=$(echo "$bench" | sed -E 's/.*= ([0-9]+) events\/s/\1/')
python3 -c "print(f'reconcile / provision_batch(32) = {$rate / $limit * 100:.0f} %  ({$rate} vs {$limit} events/s)')"
