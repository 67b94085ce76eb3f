#!/usr/bin/env bash
# dkimgw sign of a 50 MB message, dual-signed with token keys: wall time,
# MB/s and peak RSS (/usr/bin/time -v), next to `openssl speed sha256`
# (one core, 8 KiB blocks) in the same run: relaxed canonicalisation and
# SHA-256 should be the only work per byte, so the ratio says how much
# else there is. RSS must stay far below 50 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh
lib_workdir dkimgw-bench-sign
softhsm_token bench 1234
bench_keys rsa:rsa-2048 ed:ed25519
export DKIMGW_HSM=$URI
# Text as campaigns send it: words and single spaces, 76-byte lines with
# LF line ends (as in a file; SMTP would bring CRLF).
"$PY" - "$work/big.eml" <<'PY'
import sys
words = "the quick brown fox jumps over a lazy dog while campaign mail flows through".split()
with open(sys.argv[1], "w") as f:
    f.write("From: news@example.com\nTo: a@example.net\nSubject: big\n\n")
    lines, i = [], 0
    while len(lines) < 1000:
        line = []
        while sum(len(w) + 1 for w in line) + len(words[i % len(words)]) < 76:
            line.append(words[i % len(words)]); i += 1
        lines.append(" ".join(line) + "\n")
    block = "".join(lines)
    f.write(block * (50_000_000 // len(block)))
PY
size=$(stat -c %s "$work/big.eml")
echo "command: openssl speed -seconds 3 -bytes 8192 sha256"
sha=$(openssl speed -seconds 3 -bytes 8192 sha256 2>/dev/null | awk '/^sha256 / {v=$NF} END {sub(/k$/, "", v); printf "%.0f", v * 1000 / 1e6}')
echo "openssl sha256, 1 core, 8 KiB blocks: $sha MB/s"
echo "command: /usr/bin/time -v bin/dkimgw sign --domain example.com --selector rsa --selector ed < big.eml > out.eml   (big.eml: $size bytes of text, LF line ends)"
for run in ${SIGN_RUNS:-1 2 3}; do
  /usr/bin/time -v "$BIN" sign --domain example.com --selector rsa --selector ed < "$work/big.eml" > "$work/out.eml" 2> "$work/time.txt"
  wall=$(grep 'Elapsed (wall clock)' "$work/time.txt" | awk '{print $NF}')
  rss=$(grep 'Maximum resident set size' "$work/time.txt" | awk '{print $NF}')
  cpu=$(awk -F': ' '/User time|System time/ {s += $2} END {print s}' "$work/time.txt")
  secs=$(echo "$wall" | awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }')
  awk -v run=$run -v s="$secs" -v c="$cpu" -v size="$size" -v rss="$rss" -v sha="$sha" 'BEGIN {
    printf "run %d: %.2f s wall, %.2f s CPU, %.0f MB/s wall (%.2f x openssl sha256), %.0f MB per CPU-second, peak RSS %.1f MB\n",
      run, s, c, size/1e6/s, size/1e6/s/sha, size/1e6/c, rss/1024 }'
done
