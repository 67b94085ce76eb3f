#!/usr/bin/env bash
# dkimgw sign of a 50 MB message, dual-signed with token keys: wall time,
# CPU and peak RSS of each run (getrusage of the child, wait4), median and
# spread of SIGN_RUNS runs (default 5), next to `openssl speed sha256`
# (one core, 8 KiB blocks) in the same run: relaxed canonicalisation and
# SHA-256 should be the only work per byte, so the ratio says how much
# else there is. RSS must stay far below 50 MB. The last run's output is
# verified with dkimpy.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh
lib_workdir dkimgw-bench-sign
softhsm_token bench 1234
bench_keys rsa:rsa-2048 ed:ed25519
export DKIMGW_HSM=$URI
for sel in rsa ed; do "$BIN" keys dns --domain example.com --selector "$sel" >> "$work/zone"; done
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
uptime
echo "command: openssl speed -seconds 3 -bytes 8192 sha256"
sha=$(openssl speed -seconds 3 -bytes 8192 sha256 2>/dev/null | awk '/^sha256 / {v=$NF} END {sub(/k$/, "", v); printf "%.0f", v * 1000 / 1e6}')
echo "openssl sha256, 1 core, 8 KiB blocks: $sha MB/s"
echo "command: bin/dkimgw sign --domain example.com --selector rsa --selector ed < big.eml > out.eml   (big.eml: $size bytes of text, LF line ends; wall, CPU and peak RSS: wait4 of the child)"
"$PY" - "$BIN" "$work/big.eml" "$work/out.eml" "$sha" "${SIGN_RUNS:-5}" <<'PY'
import os, statistics, subprocess, sys, time
bin, src, dst, sha, runs = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
size = os.path.getsize(src)
cmd = [bin, "sign", "--domain", "example.com", "--selector", "rsa", "--selector", "ed"]
walls, cpus = [], []
for run in range(1, runs + 1):
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdin=fin, stdout=fout)
        _, status, ru = os.wait4(p.pid, 0)
        t1 = time.perf_counter()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"dkimgw sign exited {p.returncode}")
    wall, cpu = t1 - t0, ru.ru_utime + ru.ru_stime
    walls.append(wall); cpus.append(cpu)
    print("run %d: %.3f s wall, %.3f s CPU (%.3f user, %.3f system), %.0f MB/s wall (%.2f x openssl sha256), %.0f MB per CPU-second, peak RSS %.1f MB"
          % (run, wall, cpu, ru.ru_utime, ru.ru_stime, size / 1e6 / wall, size / 1e6 / wall / sha, size / 1e6 / cpu, ru.ru_maxrss / 1024))
w, c = statistics.median(walls), statistics.median(cpus)
print("median of %d: %.3f s wall (spread %.3f-%.3f), %.3f s CPU (spread %.3f-%.3f): %.0f MB/s wall, %.2f x openssl sha256 (spread %.2f-%.2f)"
      % (runs, w, min(walls), max(walls), c, min(cpus), max(cpus), size / 1e6 / w, size / 1e6 / w / sha,
         size / 1e6 / max(walls) / sha, size / 1e6 / min(walls) / sha))
PY
"$PY" scripts/bench-verify.py "$work/zone" "$work/out.eml"
