#!/usr/bin/env bash
# Benchmark of the read API (issue 4): GET /v1/workspaces/{id} at 64 concurrent
# connections against a release `serve --no-worker`, and in the same run this
# machine's "axum + one indexed query" limit (`provisioner-load api` starts that
# server itself) and, on the same server, "axum + the API's statement" (the read
# API's own query and body with nothing around them: what the answer itself costs).
# Seeds a scratch database, prints the figures and the ratios, then stops the
# server and drops the database.
#
# Usage: bench/run_api.sh [extra `provisioner-load api` flags, e.g. --duration 20 --json]
# Env:   PG_BASE (default postgres://postgres@127.0.0.1:5432), PORT (default 18480),
#        SKIP_BUILD=1 to reuse the built binaries; BIN and LOAD_BIN to run another build.
set -euo pipefail

cd "$(dirname "$0")/.."
PG_BASE=${PG_BASE:-postgres://postgres@127.0.0.1:5432}
PORT=${PORT:-18480}
DB="prov_bench_api_$$"
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/provisioner}
LOAD_BIN=${LOAD_BIN:-${CARGO_TARGET_DIR:-target}/release/provisioner-load}
WORKDIR=$(mktemp -d)
SERVER_PID=""

cleanup() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    psql -q "$PG_BASE/postgres" -c "drop database if exists \"$DB\" with (force)" >/dev/null 2>&1 || true
    rm -rf "$WORKDIR"
}
trap cleanup EXIT

if [[ "${SKIP_BUILD:-}" != 1 ]]; then
    cargo build --release --bin provisioner --bin provisioner-load
fi

# Broker names of our own (queues expire by themselves), so `serve` declares
# nothing under the production names on the machine's shared broker.
cat >"$WORKDIR/bench.toml" <<TOML
[broker]
exchange = "bench-api.clerk.webhooks"
queue = "bench-api.provisioner.events"
dead_letter_exchange = "bench-api.provisioner.dlx"
dead_letter_queue = "bench-api.provisioner.dead"
retry_queue_prefix = "bench-api.provisioner.retry"
queue_expires_ms = 120000
TOML

export PROVISIONER_CONFIG="$WORKDIR/bench.toml"
export DATABASE_URL="$PG_BASE/$DB"
export PROVISIONER_LISTEN="127.0.0.1:$PORT"
export PROVISIONER_ENV=development
export RUST_LOG=${RUST_LOG:-warn}

"$BIN" migrate >/dev/null

# 2 000 workspaces with 10 members each (2 admins), quotas, onboarding and audit
# rows, so the lookups run against real-sized indexes; org_bench is the one read.
psql -q -v ON_ERROR_STOP=1 "$DATABASE_URL" <<'SQL'
insert into workspaces (id, name, slug, status, plan, source_version, clerk_created_at)
select case when i = 1 then 'org_bench' else 'org_bench_' || i end,
       'Bench workspace ' || i, 'bench-' || i, 'active', 'free', 1, now()
from generate_series(1, 2000) i;
insert into workspace_quotas (workspace_id, name, limit_value)
select w.id, q.name, q.v from workspaces w
cross join (values ('seats', 5), ('analyses_per_month', 20), ('reports', 10),
                   ('schedules', 2), ('retention_days', 30), ('gong_credentials', 1)) q(name, v);
insert into onboarding_steps (workspace_id, name, position, required, status)
select w.id, s.name, s.pos, s.req, case when s.pos = 0 then 'completed' else 'pending' end
from workspaces w
cross join (values ('gong', 0, true), ('hubspot', 1, false), ('slack', 2, false),
                   ('starter_analysis', 3, true)) s(name, pos, req);
insert into members (membership_id, workspace_id, user_id, role, clerk_role, email,
                     first_name, last_name, source_version, profile_version, joined_at)
select 'orgmem_' || w.id || '_' || u, w.id, 'user_' || w.id || '_' || u,
       case when u <= 2 then 'admin' else 'member' end,
       case when u <= 2 then 'org:admin' else 'org:member' end,
       'u' || u || '@example.com', 'First', 'Last', 1, 1, now()
from workspaces w cross join generate_series(1, 10) u;
insert into audit_log (workspace_id, action, actor, subject, details, event_id)
select w.id, 'member.added', 'clerk', 'user_' || u, '{}', 'msg_' || w.id || '_' || u
from workspaces w cross join generate_series(1, 10) u;
analyze;
SQL

"$BIN" serve --no-worker &
SERVER_PID=$!
for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; then break; fi
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "serve exited" >&2; exit 1; }
    sleep 0.2
done
curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null

echo "# provisioner-load api --url http://127.0.0.1:$PORT --workspace org_bench --concurrency 64 --server-pid $SERVER_PID $*"
"$LOAD_BIN" api --url "http://127.0.0.1:$PORT" --workspace org_bench --concurrency 64 \
    --server-pid "$SERVER_PID" "$@"
