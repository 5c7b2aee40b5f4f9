#!/usr/bin/env bash
# Run every test of the project on a fresh machine: installs what the tests need, then checks
# formatting and lints, then runs the whole suite with cargo-nextest.
set -euo pipefail
cd "$(dirname "$0")/.."

# promtool (Debian's `prometheus` package) checks /metrics against Prometheus' own linter.
if ! command -v promtool >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
      || echo "warning: could not install promtool; the promtool test will fail" >&2
  fi
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
cargo nextest run --workspace --locked --no-fail-fast "$@"
