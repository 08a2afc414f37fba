#!/bin/bash
# Health probe of the container image (installed as /usr/local/bin/provisioner-healthcheck).
# The runtime image has no curl or wget, so it speaks HTTP through bash's /dev/tcp.
#
#   provisioner-healthcheck http     `serve`: GET /healthz on PROVISIONER_LISTEN answers 200
#   provisioner-healthcheck worker   `worker` (no HTTP listener): the process holds an
#                                    established TCP connection to a broker address of
#                                    AMQP_URL (its consumer is connected)
#   provisioner-healthcheck          either, by the container's command (PID 1):
#                                    `provisioner worker` → worker, anything else → http
#
# Exit 0 = healthy, 1 = not (Docker's HEALTHCHECK convention).
set -u

http() {
  local listen="${PROVISIONER_LISTEN:-127.0.0.1:8080}"
  local host="${listen%:*}" port="${listen##*:}"
  host="${host#[}"; host="${host%]}"
  # A wildcard listener is reached on the loopback.
  case "$host" in 0.0.0.0 | "" | ::) host=127.0.0.1 ;; esac
  exec 3<>"/dev/tcp/$host/$port" || return 1
  printf 'GET /healthz HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$host" >&3
  local status
  # The status line only; `read -t` bounds a server that accepts but never answers.
  IFS= read -r -t 2 status <&3 || return 1
  exec 3<&-
  [[ "$status" == "HTTP/1."[01]" 200"* ]]
}

worker() {
  # The ports of every address in AMQP_URL (several, comma-separated, for a cluster).
  local url ports=() rest hostport port
  IFS=',' read -r -a urls <<<"${AMQP_URL:-amqp://127.0.0.1:5672/%2f}"
  for url in "${urls[@]}"; do
    url="${url//[[:space:]]/}"
    [[ -n "$url" ]] || continue
    rest="${url#*://}"; rest="${rest%%/*}"; rest="${rest%%\?*}"; hostport="${rest##*@}"
    if [[ "$hostport" =~ :([0-9]+)$ ]]; then
      port="${BASH_REMATCH[1]}"
    elif [[ "$url" == amqps://* ]]; then
      port=5671
    else
      port=5672
    fi
    ports+=("$(printf '%04X' "$port")")
  done
  # /proc/net/tcp{,6}: "sl local rem st …", addresses as HEXIP:HEXPORT, st 01 = ESTABLISHED.
  local p
  for p in "${ports[@]}"; do
    if awk -v port="$p" 'FNR > 1 { split($3, a, ":"); if (a[2] == port && $4 == "01") found = 1 } END { exit !found }' \
      /proc/net/tcp /proc/net/tcp6 2>/dev/null; then
      return 0
    fi
  done
  return 1
}

# The container's command: PID 1 is `provisioner SUBCOMMAND …` (exec-form ENTRYPOINT).
role_of_container() {
  local args=()
  mapfile -d '' -t args </proc/1/cmdline 2>/dev/null || true
  if [[ "${args[1]:-}" == worker ]]; then echo worker; else echo http; fi
}

case "${1:-$(role_of_container)}" in
  http) http ;;
  worker) worker ;;
  *) echo "usage: provisioner-healthcheck [http|worker]" >&2; exit 2 ;;
esac
