#!/bin/sh
# Creates a placeholder source file for every target Cargo.toml declares ([lib],
# [[bin]], [[bench]], [[test]], [[example]], and a `build = "…"` script), so that
# cargo accepts the manifest and builds the dependencies alone, before the real
# sources are there. The Dockerfile's dependency-cache stage runs it, and
# .ci/dockerfile-cache-check.sh runs that stage's exact commands, so a target added
# to the manifest without a stub fails CI instead of silently disabling the cache.
#
# Usage: deploy/stub-targets.sh [DIR]   (DIR holds Cargo.toml; default: .)
# Files that already exist are left alone (e.g. a real build.rs copied beside it).
set -eu
cd "${1:-.}"
[ -f Cargo.toml ] || { echo "stub-targets: no Cargo.toml in $(pwd)" >&2; exit 1; }

# One line per target, "KIND PATH": the declared `path`, else cargo's default
# path for the target's kind and name.
targets=$(awk '
  function value(line) { sub(/^[^=]*=[ \t]*"/, "", line); sub(/".*$/, "", line); return line }
  function flush() {
    if (kind == "") return
    p = path
    if (p == "" && kind == "lib") p = "src/lib.rs"
    if (p == "" && kind == "bin") p = "src/bin/" name ".rs"
    if (p == "" && kind == "bench") p = "benches/" name ".rs"
    if (p == "" && kind == "test") p = "tests/" name ".rs"
    if (p == "" && kind == "example") p = "examples/" name ".rs"
    if (p == "") { printf "stub-targets: cannot tell the path of a [%s] target\n", kind > "/dev/stderr"; bad = 1 }
    else print kind, p
    kind = ""; name = ""; path = ""
  }
  /^[ \t]*\[/ {
    flush()
    section = $0; gsub(/[ \t]/, "", section); sub(/#.*/, "", section)
    if (section == "[lib]") kind = "lib"
    else if (section == "[[bin]]") kind = "bin"
    else if (section == "[[bench]]") kind = "bench"
    else if (section == "[[test]]") kind = "test"
    else if (section == "[[example]]") kind = "example"
    next
  }
  section == "[package]" && /^[ \t]*build[ \t]*=[ \t]*"/ { print "build", value($0) }
  kind != "" && /^[ \t]*name[ \t]*=/ { name = value($0) }
  kind != "" && /^[ \t]*path[ \t]*=/ { path = value($0) }
  END { flush(); exit bad }
' Cargo.toml)

echo "$targets" | while read -r kind path; do
  [ -n "$path" ] || continue
  if [ -e "$path" ]; then
    continue
  fi
  mkdir -p "$(dirname "$path")"
  case "$kind" in
    lib) : > "$path" ;;
    *) echo 'fn main() {}' > "$path" ;;
  esac
  echo "stub-targets: $kind $path"
done
