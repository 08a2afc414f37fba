#!/usr/bin/env bash
# The read API against its own OpenAPI document: start `provisioner serve` (debug
# build) on a spare port with its own database and queue names, seed a workspace,
# members and events through intake (`provisioner send`) and the worker, then run
# schemathesis (pinned, in .ci/.venv) with the seeded ids and cursors. Any status,
# header or body the document does not declare fails the run, so the document and
# the server cannot drift apart. The server and its database are removed on any exit.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
# Test cases per operation and phase; enough to hit every declared and undeclared
# answer, small enough to take a minute or two.
MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-40}"
SEED="${SCHEMATHESIS_SEED:-20261204}"
BIN="${PROVISIONER_BIN:-target/debug/provisioner}"

# --- schemathesis, installed once into .ci/.venv (gitignored) -----------------------
VENV=.ci/.venv
if [ "$("$VENV/bin/schemathesis" --version 2>/dev/null || true)" != "schemathesis, version $SCHEMATHESIS_VERSION" ]; then
  echo "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

LOAD_BIN="${PROVISIONER_LOAD_BIN:-target/debug/provisioner-load}"
if [ -z "${PROVISIONER_BIN:-}" ]; then
  cargo build --quiet --bin provisioner --bin provisioner-load
fi

# --- an isolated server ----------------------------------------------------------
run_id="st$(date +%s)$$"
work="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
base="http://127.0.0.1:$port"
database="prov_${run_id}"
token="schemathesis-token-$run_id"
server_pid=""
clerk_pid=""
clerk_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"

cleanup() {
  status=$?
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [ -n "$clerk_pid" ]; then kill "$clerk_pid" 2>/dev/null || true; wait "$clerk_pid" 2>/dev/null || true; fi
  psql -q -h 127.0.0.1 -U postgres -d postgres \
    -c "drop database if exists \"$database\" with (force)" >/dev/null 2>&1 || true
  if [ "$status" -ne 0 ] && [ -f "$work/serve.log" ]; then
    echo "--- provisioner serve log (last 40 lines) ---" >&2
    tail -n 40 "$work/serve.log" >&2 || true
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT INT TERM

cat >"$work/provisioner.toml" <<EOF
[broker]
exchange = "$run_id.clerk.webhooks"
queue = "$run_id.provisioner.events"
dead_letter_exchange = "$run_id.provisioner.dlx"
dead_letter_queue = "$run_id.provisioner.dead"
retry_queue_prefix = "$run_id.provisioner.retry"
# The queues go away by themselves a minute after this run.
queue_expires_ms = 60000
EOF
export PROVISIONER_CONFIG="$work/provisioner.toml"
export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$database"
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export PROVISIONER_LISTEN="127.0.0.1:$port"
export PROVISIONER_API_TOKENS="$token"
export PROVISIONER_ENV=development
export RUST_LOG=warn
# A fake of Clerk's Backend API, so POST /v1/workspaces/{id}/sync has a Clerk to ask.
"$LOAD_BIN" fake-clerk --orgs 3 --members 2 --listen "127.0.0.1:$clerk_port" \
  --key "sk_test_schemathesis_$run_id" 2>"$work/fake-clerk.log" &
clerk_pid=$!
export CLERK_API_URL="http://127.0.0.1:$clerk_port" CLERK_SECRET_KEY="sk_test_schemathesis_$run_id"

"$BIN" serve >"$work/serve.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 300); do
  curl -fsS "$base/healthz" >/dev/null 2>&1 && break
  kill -0 "$server_pid" 2>/dev/null || { echo "provisioner serve exited" >&2; exit 1; }
  sleep 0.1
done
curl -fsS "$base/healthz" >/dev/null

# --- seed: a workspace, members, events ----------------------------------------
org="org_${run_id}"
admin="user_${run_id}_admin"
send() { "$BIN" send "$@" --url "$base/webhooks/clerk" >/dev/null; }
send organization.created --org "$org" --name "Schemathesis $run_id" --user "$admin" --id "msg_${run_id}_org"
send organizationMembership.created --org "$org" --user "$admin" --role org:admin --id "msg_${run_id}_admin"
for i in 1 2 3; do
  send organizationMembership.created --org "$org" --user "user_${run_id}_$i" --id "msg_${run_id}_m$i"
done
api() { curl -fsS -H "Authorization: Bearer $token" "$base$1"; }
for _ in $(seq 1 300); do
  count="$(api "/v1/workspaces/$org" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["member_count"])' 2>/dev/null || echo 0)"
  [ "$count" = 4 ] && break
  sleep 0.1
done
[ "$count" = 4 ] || { echo "the seeded workspace did not reach 4 members" >&2; exit 1; }

next() { api "$1" | python3 -c 'import json,sys; n=json.load(sys.stdin)["next"]; assert n, "no next page"; print(n)'; }
members_after="$(next "/v1/workspaces/$org/members?limit=1")"
audit_before="$(next "/v1/workspaces/$org/audit?limit=1")"
# A second workspace of the admin, so their workspace list has a next page.
send organizationMembership.created --org "${org}_b" --name "Schemathesis $run_id b" --user "$admin" --role org:admin --id "msg_${run_id}_b"
for _ in $(seq 1 300); do
  api "/v1/workspaces/${org}_b" >/dev/null 2>&1 && break
  sleep 0.1
done
workspaces_after="$(next "/v1/users/$admin/workspaces?limit=1")"

# --- the run ---------------------------------------------------------------------
api /v1/openapi.json >"$work/openapi.json"
cat >"$work/schemathesis.toml" <<EOF
# Seeded values: the routes answer with data, not only 404s.
[parameters]
"path.id" = "$org"
"path.user_id" = "$admin"
"path.svix_id" = "msg_${run_id}_m1"
"path.step" = "slack"

# A cursor is opaque: a string of the right alphabet is still no cursor, so the
# positive cases carry real ones (each valid only for its own list).
[[operations]]
include-path = "/v1/workspaces/{id}/members"
parameters = { "query.after" = "$members_after" }

[[operations]]
include-path = "/v1/workspaces/{id}/audit"
parameters = { "query.before" = "$audit_before" }

[[operations]]
include-path = "/v1/users/{user_id}/workspaces"
parameters = { "query.after" = "$workspaces_after" }

# An organization of the fake Clerk: a sync of the seeded one would tombstone it.
[[operations]]
include-path = "/v1/workspaces/{id}/sync"
parameters = { "path.id" = "org_load0000001" }
EOF

echo "schemathesis $SCHEMATHESIS_VERSION: $MAX_EXAMPLES examples per operation, seed $SEED, against $base"
# From the scratch directory: schemathesis keeps a crash cache (.schemathesis/) in
# its working directory, and this run must not leave one in the checkout.
schemathesis="$(pwd)/$VENV/bin/schemathesis"
cd "$work"
"$schemathesis" --no-color --config-file "$work/schemathesis.toml" run "$work/openapi.json" \
  --url "$base" \
  --header "Authorization: Bearer $token" \
  --checks all \
  --max-examples "$MAX_EXAMPLES" \
  --seed "$SEED" \
  --workers 2 \
  --request-timeout 10 \
  --generation-database none
