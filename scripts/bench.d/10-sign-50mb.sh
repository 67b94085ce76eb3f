#!/usr/bin/env bash
# dkimgw sign of a 50 MB message, dual-signed with token keys: wall time,
# MB/s and peak RSS (/usr/bin/time -v). RSS must stay far below 50 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh
lib_workdir dkimgw-bench-sign
softhsm_token bench 1234
bench_keys rsa:rsa-2048 ed:ed25519
export DKIMGW_HSM=$URI
"$PY" - "$work/big.eml" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    f.write("From: news@example.com\nTo: a@example.net\nSubject: big\n\n")
    line = "x" * 80 + "\n"
    f.write(line * (50_000_000 // len(line)))
PY
size=$(stat -c %s "$work/big.eml")
echo "command: /usr/bin/time -v bin/dkimgw sign --domain example.com --selector rsa --selector ed < big.eml > out.eml   (big.eml: $size bytes, LF line ends)"
for run in 1 2 3; do
  /usr/bin/time -v "$BIN" sign --domain example.com --selector rsa --selector ed < "$work/big.eml" > "$work/out.eml" 2> "$work/time.txt"
  wall=$(grep 'Elapsed (wall clock)' "$work/time.txt" | awk '{print $NF}')
  rss=$(grep 'Maximum resident set size' "$work/time.txt" | awk '{print $NF}')
  secs=$(echo "$wall" | awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }')
  awk -v run=$run -v s="$secs" -v size="$size" -v rss="$rss" 'BEGIN { printf "run %d: %.2f s wall, %.0f MB/s, peak RSS %.1f MB\n", run, s, size/1e6/s, rss/1024 }'
done
