#!/usr/bin/env bash
# Runs one fuzz target for a while: scripts/fuzz.sh TARGET [SECONDS] (default 600).
# Targets: framing identify config snapshot change_stream audit_verify origin_response
# (proxy/fuzz). Needs the nightly toolchain; installs cargo-fuzz when it is missing. New inputs
# go to proxy/fuzz/corpus/TARGET (not committed); a crash is written to
# proxy/fuzz/artifacts/TARGET: fix it, then keep it as a regression case in
# proxy/fuzz/seeds/TARGET, which tests/fuzz_corpus.rs runs on every CI run.
set -euo pipefail
cd "$(dirname "$0")/../proxy/fuzz"
target=${1:?usage: scripts/fuzz.sh TARGET [SECONDS]}
seconds=${2:-600}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
mkdir -p "corpus/$target"
exec cargo +nightly fuzz run "$target" "corpus/$target" "seeds/$target" -- \
  -max_total_time="$seconds" -max_len=65536 -print_final_stats=1
