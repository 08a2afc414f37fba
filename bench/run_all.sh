#!/usr/bin/env bash
# Every benchmark with its machine-limit baseline, in one sitting, then one Markdown
# table of the figures and ratios:
#   bench/run_intake.sh     intake vs the broker alone (same confirm discipline)
#   bench/run_e2e.sh        end to end vs pgbench (one event per transaction); lag; RSS
#   bench/run_drain.sh      the worker alone on a queued backlog; CPU per event by process
#   bench/run_api.sh        read API vs axum + one indexed query
#   bench/run_reconcile.sh  reconcile backfill vs `cargo bench --bench provision_batch`
#   cargo bench --bench signature   signature check vs a bare HMAC
# Each script stays callable alone; this one only runs them in turn, keeps their
# output (OUT/*.log) and reads the figures they print.
#
# Usage: bench/run_all.sh [--quick] [--update-readme] [--summary-only]
#   --quick          shorter phases (intake 8s, e2e 8, api 5 s x 3 rounds): the same
#                    ratios, wider spread (reconcile keeps 10,000 organizations: with
#                    fewer, its fixed phases weigh on the ratio)
#   --update-readme  also put the table in README.md's Benchmarks section
#   --summary-only   run nothing: rebuild the table from the logs of the last run
# Env: OUT (default ${CARGO_TARGET_DIR:-target}/bench), INTAKE_DURATION, E2E_SECS,
#      DRAIN_EVENTS, API_DURATION, RECONCILE_ORGS, RECONCILE_MEMBERS to set each length.
# Writes OUT/summary.md. Exit status non-zero if any benchmark failed (the table
# still shows the others).
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=0
UPDATE_README=0
SUMMARY_ONLY=0
ARGS_TEXT="${*:-}"
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --update-readme) UPDATE_README=1 ;;
    --summary-only) SUMMARY_ONLY=1 ;;
    -h | --help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
if [[ "$QUICK" == 1 ]]; then
  : "${INTAKE_DURATION:=8s}" "${E2E_SECS:=8}" "${API_DURATION:=5}"
fi
INTAKE_DURATION="${INTAKE_DURATION:-15s}"
E2E_SECS="${E2E_SECS:-15}"
API_DURATION="${API_DURATION:-10}"
DRAIN_EVENTS="${DRAIN_EVENTS:-20000}"
RECONCILE_ORGS="${RECONCILE_ORGS:-10000}"
RECONCILE_MEMBERS="${RECONCILE_MEMBERS:-5}"
OUT="${OUT:-${CARGO_TARGET_DIR:-target}/bench}"
mkdir -p "$OUT"
STARTED="$(date -u +%Y-%m-%dT%H:%MZ)"
FAILED=()

if [[ "$SUMMARY_ONLY" == 1 ]]; then
  STARTED="$(cat "$OUT/started" 2>/dev/null || echo '?')"
  FAILED=($(cat "$OUT/failed" 2>/dev/null))
  ARGS_TEXT="$(cat "$OUT/args" 2>/dev/null)"
  # shellcheck disable=SC1091
  source "$OUT/lengths" 2>/dev/null || true
else
  echo "$STARTED" >"$OUT/started"
  # Other work on the machine skews every figure (less so the ratios): say how busy it was.
  cut -d' ' -f1-3 /proc/loadavg >"$OUT/load"
  echo "$ARGS_TEXT" | sed 's/ *--update-readme//' >"$OUT/args"
  ARGS_TEXT="$(cat "$OUT/args")"
  declare -p INTAKE_DURATION E2E_SECS DRAIN_EVENTS API_DURATION RECONCILE_ORGS RECONCILE_MEMBERS >"$OUT/lengths"
  echo "== building (release) once for every script"
  cargo build --release --quiet --bin provisioner --bin provisioner-load || exit 1
fi

# run NAME COMMAND...: runs one benchmark, its output shown and kept in OUT/NAME.log.
run() {
  local name="$1"
  shift
  echo
  echo "==== $name: $*"
  if ! "$@" 2>&1 | tee "$OUT/$name.log"; then
    echo "==== $name FAILED (see $OUT/$name.log)" >&2
    FAILED+=("$name")
  fi
}

if [[ "$SUMMARY_ONLY" != 1 ]]; then
  run intake env SKIP_BUILD=1 bench/run_intake.sh "$INTAKE_DURATION"
  run e2e env SKIP_BUILD=1 bench/run_e2e.sh "$E2E_SECS"
  run drain env SKIP_BUILD=1 bench/run_drain.sh "$DRAIN_EVENTS"
  run api env SKIP_BUILD=1 bench/run_api.sh --duration "$API_DURATION" --rounds 3
  run reconcile env SKIP_BUILD=1 bench/run_reconcile.sh "$RECONCILE_ORGS" "$RECONCILE_MEMBERS"
  run signature cargo bench --quiet --bench signature
  echo "${FAILED[*]:-}" >"$OUT/failed"
fi

# --- reading the figures the scripts printed -------------------------------------
log() { cat "$OUT/$1.log" 2>/dev/null; }
# first match of a sed expression in a log, or "?"
pick() { local v; v="$(log "$1" | sed -nE "$2" | head -1)"; echo "${v:-?}"; }
# the N-th field after a fixed-width name column of a table row starting with PREFIX
column() { local v; v="$(log "$1" | grep -F -- "$2" | head -1 | cut -c"$3"- | awk -v n="$4" '{print $n}')"; echo "${v:-?}"; }

broker_rate="$(column intake 'broker only (c=' 35 1)"
intake_rate="$(column intake 'intake (c=' 35 1)"
intake_ratio="$(pick intake 's/^intake \/ broker-only rate: ([0-9.]+) %.*/\1/p')"
half_p99="$(pick intake 's/^p99 at half rate: ([0-9.]+) ms.*/\1/p')"
intake_cpu="$(pick intake 's/^receiver CPU per confirmed webhook: ([0-9]+) us.*/\1/p')"

pg_tps="$(pick e2e 's/^pgbench: ([0-9]+)(\.[0-9]*)? tps.*/\1/p')"
e2e_rate="$(column e2e 'end to end, 64 senders' 39 1)"
e2e_ratio="$(pick e2e 's/^end to end \/ pgbench rate: ([0-9.]+) x.*/\1/p')"
lag_p99="$(pick e2e 's/^lag p99 at 500\/s: ([0-9]+) ms.*/\1/p')"
lag_p50="$(column e2e 'end to end, 500/s' 39 2)"
rss="$(pick e2e 's/^worker RSS: peak ([0-9.]+) MB.*/\1/p')"

drain_rate="$(pick drain 's/^drained [0-9]+ events in [0-9.]+ s: ([0-9]+) events\/s.*/\1/p')"
drain_cpu="$(pick drain 's/^CPU per event: (.*)$/\1/p')"

api_line="$(log api | grep -m1 '^median of ')"
api_rate="$(sed -nE 's/.*read API ([0-9]+)\/s p99 ([0-9.]+) ms;.*/\1/p' <<<"$api_line")"
api_p99="$(sed -nE 's/.*read API ([0-9]+)\/s p99 ([0-9.]+) ms;.*/\2/p' <<<"$api_line")"
api_base="$(sed -nE 's/.*query limit ([0-9]+)\/s.*/\1/p' <<<"$api_line")"
api_ratio="$(sed -nE 's/.*ratio ([0-9.]+) %.*/\1/p' <<<"$api_line")"

rec_ratio="$(pick reconcile 's/^reconcile \/ provision_batch\(32\) = ([0-9]+) %.*/\1/p')"
rec_rate="$(pick reconcile 's/^reconcile \/ provision_batch\(32\) = [0-9]+ %  \(([0-9]+) vs.*/\1/p')"
rec_limit="$(pick reconcile 's/^reconcile \/ provision_batch\(32\) = [0-9]+ %  \([0-9]+ vs ([0-9]+) .*/\1/p')"
rec_rss="$(pick reconcile 's/.*peak RSS ([0-9]+) MB.*/\1/p')"

# criterion: "NAME\n  time:   [low mid high]" (or on one line when the name is short)
criterion_mid() {
  local v
  v="$(log signature | tr '\n' ' ' | sed -nE "s/.*$1[^[]*time: +\[[^ ]+ [^ ]+ ([0-9]+(\.[0-9]{1,2})?)[0-9]* ([µun]s) .*/\1 \3/p")"
  echo "${v:-?}"
}
sig_one="$(criterion_mid 'verify 1\.5 KB event, one secret')"
sig_floor="$(criterion_mid 'floor: bare HMAC-SHA256 of the same 1\.5 KB')"
# criterion picks the unit per figure (µs, ns): compare both in ns.
in_ns() { awk -v v="${1% *}" -v u="${1#* }" 'BEGIN { m = (u == "µs" || u == "us") ? 1000 : (u == "ms" ? 1e6 : 1); print v * m }'; }
sig_ratio="$(awk -v a="$(in_ns "$sig_one")" -v b="$(in_ns "$sig_floor")" 'BEGIN { if (a+0 > 0 && b+0 > 0) printf "%.2f×", a / b; else print "?" }')"

fmt() { [[ "$1" == "?" || -z "$1" ]] && echo "?" || printf "%s" "$1"; }

SUMMARY="$OUT/summary.md"
{
  echo "Measured $STARTED at $(git rev-parse --short HEAD 2>/dev/null || echo '?'), one sitting on $(nproc) cores (load average before: $(cat "$OUT/load" 2>/dev/null || echo '?')): \`bench/run_all.sh${ARGS_TEXT:+ $ARGS_TEXT}\`."
  echo
  echo "| benchmark | measured | machine limit, same sitting | ratio | target |"
  echo "|---|---|---|---|---|"
  echo "| intake, 64 concurrent (\`run_intake.sh $INTAKE_DURATION\`) | $(fmt "$intake_rate")/s | broker alone $(fmt "$broker_rate")/s | $(fmt "$intake_ratio") % | median ≥ 80 %, no run < 70 % (issue 12) |"
  echo "| intake p99 at half that rate | $(fmt "$half_p99") ms | – | – | ≤ 25 ms (issue 12) |"
  echo "| receiver CPU per confirmed webhook | $(fmt "$intake_cpu") µs | – | – | ≤ 45 µs (issue 12) |"
  echo "| end to end, 64 senders (\`run_e2e.sh $E2E_SECS\`) | $(fmt "$e2e_rate") events/s | pgbench $(fmt "$pg_tps") tps | $(fmt "$e2e_ratio")× | ≥ 2.5× (issue 12) |"
  echo "| provisioning lag at 500 events/s, p50 / p99 | $(fmt "$lag_p50") / $(fmt "$lag_p99") ms | – | – | p99 ≤ 100 ms, p50 ≤ 20 ms (issue 12) |"
  echo "| worker peak RSS | $(fmt "$rss") MB | – | – | ≤ 64 MB (issue 12) |"
  echo "| worker alone on a $DRAIN_EVENTS-event backlog (\`run_drain.sh\`) | $(fmt "$drain_rate") events/s; CPU per event: $(fmt "$drain_cpu") | – | – | where the end-to-end CPU goes (issue 12) |"
  echo "| read API \`GET /v1/workspaces/{id}\`, 64 connections (\`run_api.sh\`) | $(fmt "$api_rate")/s, p99 $(fmt "$api_p99") ms | axum + 1 indexed query $(fmt "$api_base")/s | $(fmt "$api_ratio") % | ≥ 75 % (issue 12) |"
  echo "| reconcile backfill, $RECONCILE_ORGS orgs × $RECONCILE_MEMBERS members (\`run_reconcile.sh\`) | $(fmt "$rec_rate") events/s, peak RSS $(fmt "$rec_rss") MB | provision_batch (32) $(fmt "$rec_limit") events/s | $(fmt "$rec_ratio") % | ≥ 80 %, RSS ≤ 100 MB (issue 10) |"
  echo "| signature check, 1.5 KB, one secret (\`cargo bench --bench signature\`) | $(fmt "$sig_one") | bare HMAC-SHA256 $(fmt "$sig_floor") | $sig_ratio | ≤ 2 µs |"
  if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo
    echo "Failed in this sitting: ${FAILED[*]} (their logs are in \`$OUT\`)."
  fi
} >"$SUMMARY"

echo
echo "==== summary ($SUMMARY)"
cat "$SUMMARY"

if [[ "$UPDATE_README" == 1 ]]; then
  python3 - "$SUMMARY" <<'PY'
import pathlib, sys
summary = pathlib.Path(sys.argv[1]).read_text().strip()
readme = pathlib.Path("README.md")
text = readme.read_text()
begin, end = "<!-- bench/run_all.sh: begin -->", "<!-- bench/run_all.sh: end -->"
if begin not in text or end not in text:
    sys.exit("README.md has no bench/run_all.sh markers")
head, rest = text.split(begin, 1)
_, tail = rest.split(end, 1)
readme.write_text(f"{head}{begin}\n{summary}\n{end}{tail}")
print("README.md updated")
PY
fi

[[ ${#FAILED[@]} -eq 0 ]]
