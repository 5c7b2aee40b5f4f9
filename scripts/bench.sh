#!/usr/bin/env bash
# Run rig's benchmarks (see bench/README.md): installs the tools they compare against, builds in
# release mode, waits for the machine to be quiet, then runs every measurement and prints the
# tables. Extra arguments go to `rig-bench all` (e.g. --quick, --out FILE).
#
# Environment:
#   RIG_BENCH_QUIET_WAIT  seconds to wait at most for no rustc and a 1-minute load below 1.0
#                         before measuring (default 900; 0 skips the wait)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing ${need[*]}" >&2
    apt-get update -qq
    # The benchmark starts its own nginx and HAProxy instances on free ports; it does not use the
    # system-wide services these packages may enable.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "missing ${need[*]}: install them (Debian: apt-get install ${need[*]})" >&2
    exit 1
  fi
fi

cargo build --release -p rig-bench -p rig-control -p rig-demo

wait_max=${RIG_BENCH_QUIET_WAIT:-900}
waited=0
while [ "$waited" -lt "$wait_max" ]; do
  rustc=$(pgrep -c rustc || true)
  load=$(cut -d' ' -f1 /proc/loadavg)
  if [ "$rustc" = 0 ] && awk -v l="$load" 'BEGIN { exit !(l < 1.0) }'; then
    break
  fi
  echo "waiting for a quiet machine: $rustc rustc running, load $load (${waited}s of ${wait_max}s)" >&2
  sleep 30
  waited=$((waited + 30))
done
if [ "$wait_max" -gt 0 ] && [ "$waited" -ge "$wait_max" ]; then
  echo "warning: the machine never got quiet; measuring anyway (figures may be noisy)" >&2
fi

echo "rig-bench on $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
exec target/release/rig-bench all --bin-dir target/release "$@"
