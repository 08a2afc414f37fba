#!/usr/bin/env bash
# Runs the Dockerfile's dependency-cache stage (the lines between `# >>> dependency
# cache` and `# <<< dependency cache`) without Docker: in a scratch directory that
# holds only what that block COPYs, exactly its RUN commands, so a manifest target
# without a stub, a stale Cargo.lock (--locked) or a hidden failure breaks CI.
#
# By default `cargo build --release` in the block is run as `cargo check` with this
# repository's target directory: that proves the stubbed manifest resolves and the
# stub crate compiles against the locked dependencies in seconds once clippy has
# run (the dependencies' metadata is shared). DOCKERFILE_CHECK_FULL=1 runs the block
# unchanged (a full release build of the dependencies: minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"

block="$(awk '/^# >>> dependency cache/ { on = 1; next } /^# <<< dependency cache/ { on = 0 } on' Dockerfile)"
[[ -n "$block" ]] || { echo "Dockerfile: no '# >>> dependency cache' block" >&2; exit 1; }

SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT

# Instructions, with continuation lines joined; comments dropped.
instructions="$(grep -v '^[[:space:]]*#' <<<"$block" | sed -e ':a' -e '/\\$/N; s/\\\n//; ta')"
if grep -q '|| *true' <<<"$instructions"; then
  echo "Dockerfile: the dependency-cache stage hides failures with '|| true'" >&2
  exit 1
fi
ran=0
while IFS= read -r line; do
  [[ -n "${line// }" ]] || continue
  case "$line" in
    COPY\ *)
      read -r -a words <<<"${line#COPY }"
      dest="${words[-1]}"
      unset 'words[-1]'
      for src in "${words[@]}"; do
        [[ "$src" == --* ]] && { echo "COPY flags are not supported here: $line" >&2; exit 1; }
        if [[ "$dest" == */ ]]; then
          mkdir -p "$SCRATCH/$dest"
          cp -p "$REPO/$src" "$SCRATCH/$dest"
        else
          mkdir -p "$SCRATCH/$(dirname "$dest")"
          cp -p "$REPO/$src" "$SCRATCH/$dest"
        fi
      done
      ;;
    RUN\ *)
      cmd="${line#RUN }"
      if [[ "${DOCKERFILE_CHECK_FULL:-}" != 1 ]]; then
        [[ "$cmd" == *"cargo build --release"* ]] \
          || { echo "Dockerfile: expected 'cargo build --release' in: $cmd" >&2; exit 1; }
        cmd="${cmd//cargo build --release/cargo check}"
      fi
      echo "+ (in a scratch copy) $cmd"
      (cd "$SCRATCH" && CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}" sh -ec "$cmd")
      ran=$((ran + 1))
      ;;
    *)
      echo "Dockerfile: unexpected instruction in the dependency-cache block: $line" >&2
      exit 1
      ;;
  esac
done <<<"$instructions"

[[ "$ran" -gt 0 ]] || { echo "Dockerfile: the dependency-cache block runs nothing" >&2; exit 1; }
echo "Dockerfile dependency-cache stage: ok"
