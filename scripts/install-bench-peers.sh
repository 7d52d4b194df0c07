#!/usr/bin/env bash
# Installs the peers the side-by-side benchmark (`loadtest compare`) runs against:
# nginx, HAProxy, Caddy, wrk and h2load from Debian, oha from crates.io.
# Idempotent: installs only what is missing. The Debian services are stopped and disabled
# after install: the harness starts each peer itself, with its own configuration and ports.
set -euo pipefail

declare -A apt_for=([nginx]=nginx [haproxy]=haproxy [caddy]=caddy [wrk]=wrk [h2load]=nghttp2-client)
need_apt=()
for cmd in nginx haproxy caddy wrk h2load; do
  command -v "$cmd" >/dev/null 2>&1 || need_apt+=("${apt_for[$cmd]}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if sudo -n true 2>/dev/null; then sudo=(sudo -n); else
      echo "missing: ${need_apt[*]} (install them with apt-get, or run this as root)" >&2
      exit 1
    fi
  fi
  "${sudo[@]}" apt-get update -qq
  # Keep the packaged services from starting on install: they would hold ports 80/443.
  printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null
  "${sudo[@]}" chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
  "${sudo[@]}" rm -f /usr/sbin/policy-rc.d
fi

if ! command -v oha >/dev/null 2>&1; then
  cargo install oha --locked
fi
