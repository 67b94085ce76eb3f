#!/usr/bin/env bash
# make bench: Go benchmarks of every package, the raw-crypto baseline
# from the same run, and the end-to-end measurements in scripts/bench.d/.
# Prints everything and keeps a copy in bench-results/<date>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench-results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out="bench-results/$stamp.txt"
# pprof profiles of the relay go beside the results (scripts/bench.d/30-campaign.sh).
export BENCH_PROFILES=bench-results/$stamp-profiles
BENCHTIME=${BENCHTIME:-2s}
{
  echo "# dkimgw benchmarks, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "# machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  echo "# $(go version)"
  echo
  echo "## go test -run '^\$' -bench . -benchtime $BENCHTIME ./..."
  go test -run '^$' -bench . -benchtime "$BENCHTIME" ./... 2>&1 | grep -E '^(Benchmark|ok|FAIL|pkg:|---)' || true
  echo
  echo "## (cd third_party/go-smtp && go test -run '^\$' -bench . -benchtime $BENCHTIME .)   # the DATA path patch against v0.25.1's code"
  (cd third_party/go-smtp && go test -run '^$' -bench . -benchtime "$BENCHTIME" . 2>&1 | grep -E '^(Benchmark|ok|FAIL)') || true
  echo
  echo "## openssl speed -seconds 3 rsa2048 ed25519 (raw OpenSSL, no token; 1 process)"
  openssl speed -seconds 3 rsa2048 ed25519 2>/dev/null | grep -E 'sign/s|^rsa 2048|Ed25519' || true
  for script in scripts/bench.d/*.sh; do
    [ -e "$script" ] || continue
    echo
    echo "## $script"
    bash "$script"
  done
} 2>&1 | tee "$out"
echo "saved in $out" >&2
