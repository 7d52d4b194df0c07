#!/usr/bin/env bash
# Installs what building and testing Domicile needs on a fresh Debian machine with rustup.
# Idempotent: installs only what is missing (C compiler, curl, cargo-nextest, rustfmt, clippy).
# Benchmark peers (nginx, HAProxy, Caddy, wrk, h2load, oha) are installed by
# scripts/install-bench-peers.sh, which `loadtest compare` runs itself.
set -euo pipefail

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
# The TLS tests talk to the edge with curl (HTTP/1.1 and HTTP/2 over ALPN) as well.
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  else
    echo "missing: ${need_apt[*]} (install them with apt-get)" >&2
    exit 1
  fi
fi

# The test runner (one process per test, a summary line at the end).
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install cargo-nextest --locked
fi

if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi
