# Shared by the bench/run_*.sh scripts (source it; not run by itself).
#
# bench_setup: scratch names for one run (`load.<tag>.*` queues and exchanges,
#   database `provisioner_load_<tag>`), a config file naming them, a free port,
#   the release build in $BIN (SKIP_BUILD=1: the one already built), and a trap that stops what was started and deletes
#   the scratch queues and database, whatever happens.
# bench_start NAME ARGS...: starts `$BIN ARGS...` in the background, logging to
#   $WORK/NAME.log; its pid is appended to BENCH_PIDS.
# bench_wait_ready: waits until the service on $PROVISIONER_LISTEN answers /readyz.

bench_setup() {
  TAG="$(date +%s)$$"
  PG_BASE="${BENCH_DATABASE_BASE:-postgres://postgres@127.0.0.1:5432}"
  DB="provisioner_load_$TAG"
  export DATABASE_URL="$PG_BASE/$DB"
  export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
  PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  export PROVISIONER_LISTEN="127.0.0.1:$PORT"
  export PROVISIONER_ENV=development
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
  BENCH_PIDS=()
  trap bench_cleanup EXIT

  # Named before the build, so the cleanup trap never meets an unset name.
  BIN="${CARGO_TARGET_DIR:-target}/release/provisioner"
  LOAD_BIN="${CARGO_TARGET_DIR:-target}/release/provisioner-load"
  if [[ "${SKIP_BUILD:-}" != 1 ]]; then
    echo "== building (release)"
    cargo build --release --quiet --bin provisioner --bin provisioner-load
  fi

  psql -q "$PG_BASE/postgres" -c "create database \"$DB\"" >/dev/null
  "$BIN" migrate >/dev/null
}

bench_cleanup() {
  local pid
  for pid in "${BENCH_PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  "$LOAD_BIN" teardown --yes >/dev/null 2>&1 || echo "warning: teardown of load.$TAG.* failed" >&2
  psql -q "$PG_BASE/postgres" -c "drop database if exists \"$DB\" with (force)" >/dev/null 2>&1 \
    || echo "warning: could not drop $DB" >&2
  rm -rf "$WORK"
}

bench_start() {
  local name="$1"
  shift
  "$BIN" "$@" 2>"$WORK/$name.log" &
  BENCH_PIDS+=("$!")
}

bench_wait_ready() {
  local pid
  for _ in $(seq 1 120); do
    curl -fs "http://$PROVISIONER_LISTEN/readyz" >/dev/null 2>&1 && return 0
    for pid in "${BENCH_PIDS[@]}"; do
      kill -0 "$pid" 2>/dev/null || { cat "$WORK"/*.log >&2; exit 1; }
    done
    sleep 0.5
  done
  echo "the service on $PROVISIONER_LISTEN never became ready" >&2
  cat "$WORK"/*.log >&2
  exit 1
}

# `provisioner-load ARGS...`, echoing the command to stderr.
bench_load() {
  echo "\$ provisioner-load $*" >&2
  "$LOAD_BIN" "$@"
}
