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

# deploy/stub-targets.sh on a manifest with every kind of target, in every way
# Cargo.toml may spell one: cargo must accept it afterwards (and refuse it before),
# so a target the real manifest adds later in one of these forms is stubbed too.
mkdir -p "$SCRATCH/self-test"
cat >"$SCRATCH/self-test/Cargo.toml" <<'TOML'
[package]
name = "stub-self-test"
version = "0.0.0"
edition = "2024"
build = "tools/build.rs"   # a build script elsewhere

[lib]
crate-type = ["rlib"]

[[bin]]
path = "src/bin/first/main.rs"
name = "first"

[[bin]]
name = "second"

[[bench]]
name = "speed"
harness = false

[[test]]
name = "it"

[[example]]
name = "demo"
TOML
if (cd "$SCRATCH/self-test" && cargo metadata --no-deps --offline --format-version 1 >/dev/null 2>&1); then
  echo "self-test: cargo accepted a manifest whose targets have no files" >&2
  exit 1
fi
deploy/stub-targets.sh "$SCRATCH/self-test" >/dev/null
(cd "$SCRATCH/self-test" && cargo metadata --no-deps --offline --format-version 1 >/dev/null) \
  || { echo "self-test: deploy/stub-targets.sh left a target without a file" >&2; exit 1; }

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
