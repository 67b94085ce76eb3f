#!/usr/bin/env bash
# dkimgw serve: peak RSS while 50 concurrent clients each send one 20 MB
# message (dual-signed, RSA-2048 + Ed25519 in SoftHSM), smtp-source as the
# client and smtp-sink as the upstream. The spool keeps 1 MiB of a message
# in memory and the rest in an unlinked temp file, so RSS must stay far
# below 50 x 20 MB. A message MAIL declares larger than the limit (SIZE=)
# goes to its temp file from the first byte. At the end, `dkimgw sign` of
# the same message, for the relay's MB per CPU-second. Everything is on
# 127.0.0.1, bounded by `timeout`, and
# every process started here is stopped on exit.
#
# Knobs: RSS_SESSIONS (default 50), RSS_BODY_BYTES (20000000),
# RSS_MEMORY_TOTAL (16777216: spool.memory_total of the third run).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh
S=${RSS_SESSIONS:-50}
L=${RSS_BODY_BYTES:-20000000}
RUN_TIMEOUT=300

for tool in smtp-source smtp-sink softhsm2-util; do
  command -v "$tool" >/dev/null || { echo "SKIP: $tool not installed (make deps)"; exit 0; }
done
[ -x "$BIN" ] || { echo "SKIP: $BIN missing (make build)"; exit 0; }

lib_workdir dkimgw-bench-rss
kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; } # kb PID VmRSS|VmHWM
mb() { awk -v k="$1" 'BEGIN { printf "%.1f MB", k / 1024 }'; }

softhsm_token bench 1234
bench_keys rsa:rsa-2048 ed:ed25519

start_sink upstream


echo "dkimgw:   bin/dkimgw serve --config dkimgw.yaml   (selectors [rsa, ed], spool.memory_limit 1 MiB (default), spool.dir $work/spool)"
echo "upstream: smtp-sink -u postfix 127.0.0.1:$sink_port 256"
echo "peak RSS: VmHWM of /proc/PID/status (reset between runs by restarting dkimgw);"
echo "          'in DATA at once': dkimgw's open spool files (unlinked temp files in /proc/PID/fd), sampled every 50 ms"
echo

# A client that really has all its messages in DATA at once: smtp-source
# writes a message body with blocking writes, one session at a time, so
# with 20 MB bodies its 50 sessions overlap only a few at a time.
cat > "$work/client.py" <<'PY'
import socket, sys, threading
host, port, n, body_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
declare = sys.argv[5:] != ["nosize"]  # MAIL FROM ... SIZE=, as Postfix and Exim send it
line = b"x" * 78 + b"\r\n"
body = line * (body_bytes // len(line))
barrier = threading.Barrier(n, timeout=120)
replies, errors = [], []
def reply(f):
    while True:
        l = f.readline()
        if not l: raise EOFError("connection closed")
        if l[3:4] != b"-": return l.decode().strip()
def client(i):
    try:
        s = socket.create_connection((host, port), timeout=240)
        f = s.makefile("rb")
        reply(f)
        for cmd, want in ((b"EHLO client.bench.test", "250"), (b"MAIL FROM:<news@example.com>" + (b" SIZE=%d" % (len(body) + 200) if declare else b""), "250"),
                          (b"RCPT TO:<reader@example.net>", "250"), (b"DATA", "354")):
            s.sendall(cmd + b"\r\n")
            r = reply(f)
            if not r.startswith(want): raise RuntimeError(f"{cmd.decode()}: {r}")
        barrier.wait()  # every client is in DATA before any sends its body
        s.sendall(b"From: <news@example.com>\r\nTo: <reader@example.net>\r\nSubject: big %d\r\n\r\n" % i)
        for off in range(0, len(body), 1 << 16):
            s.sendall(body[off:off + (1 << 16)])
        s.sendall(b".\r\n")
        replies.append(reply(f))
        s.sendall(b"QUIT\r\n"); s.close()
    except Exception as e:
        errors.append(f"client {i}: {e!r}")
        barrier.abort()
ts = [threading.Thread(target=client, args=(i,)) for i in range(n)]
for t in ts: t.start()
for t in ts: t.join()
bad = [r for r in replies if not r.startswith("250")]
print(f"client: {n} messages of {len(body):,} body bytes sent at once; {len(replies) - len(bad)} answered 250")
if errors or bad: sys.exit("\n".join(errors + bad[:3]))
PY

# run NAME COMMAND...: a fresh dkimgw (so VmHWM is this run's), the
# client, the log checked (every message 250 and signed), RSS reported.
run() {
  local name=$1; shift
  local port pid log rss0 rss1 hwm1 hwm rss2 sampler t0 t1 c0 c1 max_files max_rss
  port=$(free_port)
  bench_config "$work/dkimgw.yaml" "$port" "$sink_port" "rsa, ed"
  if [ -n "${SPOOL_TOTAL:-}" ]; then
    sed -i "s/^spool:\$/spool:\n  memory_total: $SPOOL_TOTAL/" "$work/dkimgw.yaml"
    echo "(this run: spool.memory_total $SPOOL_TOTAL bytes)"
  fi
  log=$work/$name.log
  "$BIN" serve --config "$work/dkimgw.yaml" 2> "$log" &
  pid=$!; pids+=("$pid")
  wait_port "$port" "dkimgw serve" "$pid" || { cat "$log"; exit 1; }
  echo "### $name: ${*//PORT/$port}"
  rss0=$(kb "$pid" VmRSS)
  timeout "$RUN_TIMEOUT" smtp-source -s 1 -m 1 -l 4096 -f news@example.com -t reader@example.net -S warm 127.0.0.1:"$port"
  rss1=$(kb "$pid" VmRSS); hwm1=$(kb "$pid" VmHWM)
  rm -f "$work/stop" "$work/samples"
  (
    max_files=0 max_rss=0
    while kill -0 "$pid" 2>/dev/null && [ ! -e "$work/stop" ]; do
      f=$(find "/proc/$pid/fd" -lname "$work/spool/*" 2>/dev/null | wc -l)
      r=$(kb "$pid" VmRSS 2>/dev/null || echo 0)
      [ "$f" -gt "$max_files" ] && max_files=$f
      [ "${r:-0}" -gt "$max_rss" ] && max_rss=$r
      echo "$max_files $max_rss" > "$work/samples"
      sleep 0.05
    done
  ) &
  sampler=$!; pids+=("$sampler")
  c0=$(awk '{print $14+$15}' "/proc/$pid/stat")
  t0=$(date +%s.%N)
  if ! timeout "$RUN_TIMEOUT" "${@//PORT/$port}"; then
    echo "$name failed; dkimgw's last log lines:" >&2; tail -5 "$log" >&2; exit 1
  fi
  t1=$(date +%s.%N)
  touch "$work/stop"; wait "$sampler" || true; unset 'pids[-1]'
  hwm=$(kb "$pid" VmHWM); rss2=$(kb "$pid" VmRSS)
  c1=$(awk '{print $14+$15}' "/proc/$pid/stat")
  read -r max_files max_rss < "$work/samples"
  kill -TERM "$pid"; wait "$pid" || echo "dkimgw serve exited with status $? on SIGTERM" >&2
  unset 'pids[-1]'
  "$PY" - "$log" "$S" <<'PY' || exit 1
import json, sys
tx = [json.loads(l) for l in open(sys.argv[1]) if '"msg":"transaction"' in l][1:]  # [0] is the warm-up
n = int(sys.argv[2])
ok = [t for t in tx if t.get("reply", "").startswith("250") and t.get("signed")]
if len(tx) != n or len(ok) != n:
    sys.exit(f"{len(tx)} transactions logged, {len(ok)} 250 and signed, for {n} messages: {tx[:1]}")
sizes = sorted(t["size"] for t in tx)
d = sorted(t["duration_s"] for t in tx)
print(f"dkimgw log: {n} transactions, all 250 and signed (rsa, ed); message size {sizes[0]:,} bytes as spooled; "
      f"transaction time (MAIL to upstream's reply) {d[0]:.2f}-{d[-1]:.2f} s")
PY
  awk -v t0="$t0" -v t1="$t1" -v n="$S" -v l="$L" -v c="$(( c1 - c0 ))" -v hz="$(getconf CLK_TCK)" 'BEGIN { s = t1 - t0
    printf "wall: %.2f s for %d messages of %d body bytes (%.0f MB/s end to end); dkimgw CPU %.1f s (%.0f MB per CPU second)\n", s, n, l, n * l / 1e6 / s, c / hz, n * l / 1e6 / (c / hz) }'
  awk -v n="$S" -v l="$L" -v c="$(( c1 - c0 ))" -v hz="$(getconf CLK_TCK)" -v name="$name" 'BEGIN { printf "%.0f %s\n", n * l / 1e6 / (c / hz), name }' >> "$work/relay-rates"
  echo "messages in DATA at once in dkimgw (max sampled): $max_files of $S"
  echo "RSS: after start $(mb "$rss0"); after a 4 KB warm-up $(mb "$rss1") (peak so far $(mb "$hwm1")); max sampled during the run $(mb "$max_rss"); after $(mb "$rss2")"
  echo "PEAK RSS (VmHWM): $(mb "$hwm"), next to $S x $(awk -v l="$L" 'BEGIN { printf "%.0f MB", l / 1e6 }') = $(awk -v l="$L" -v n="$S" 'BEGIN { printf "%.0f MB", n * l / 1e6 }') of messages:" \
    "$(awk -v h="$hwm" -v l="$L" -v n="$S" 'BEGIN { printf "%.1f%%", 100 * h * 1024 / (n * l) }')"
  echo
}

run smtp-source smtp-source -s "$S" -m "$S" -l "$L" -f news@example.com -t reader@example.net -S big 127.0.0.1:PORT
run "all-in-DATA client" "$PY" "$work/client.py" 127.0.0.1 PORT "$S" "$L"
# The same with spool.memory_total bounding the spool's memory (the
# default, 256 MiB, does not bind with 50 messages of at most 1 MiB each in
# memory): past it, messages go to their temp files at once.
SPOOL_TOTAL=${RSS_MEMORY_TOTAL:-16777216} run "all-in-DATA client, spool.memory_total" "$PY" "$work/client.py" 127.0.0.1 PORT "$S" "$L"
# A client that declares no SIZE= (a message is spooled in memory until it
# passes spool.memory_limit): the worst case, with the default
# memory_total and with the bound above.
run "all-in-DATA client without SIZE=" "$PY" "$work/client.py" 127.0.0.1 PORT "$S" "$L" nosize
SPOOL_TOTAL=${RSS_MEMORY_TOTAL:-16777216} run "all-in-DATA client without SIZE=, spool.memory_total" "$PY" "$work/client.py" 127.0.0.1 PORT "$S" "$L" nosize

# dkimgw sign of the message the all-in-DATA client sends, for the relay's
# MB per CPU-second above: from the file (read twice, no spool file) and
# from a pipe (spooled to a temp file past memory_limit, as the relay does).
"$PY" - "$work/one.eml" "$L" <<'PY'
import sys
line = b"x" * 78 + b"\r\n"
with open(sys.argv[1], "wb") as f:
    f.write(b"From: <news@example.com>\r\nTo: <reader@example.net>\r\nSubject: big 0\r\n\r\n")
    f.write(line * (int(sys.argv[2]) // len(line)))
PY
size=$(stat -c %s "$work/one.eml")
echo "### dkimgw sign of the same message ($size bytes), dual-signed like the relay, 5 runs each"
echo "command: bin/dkimgw sign --domain example.com --selector rsa --selector ed < one.eml > out.eml        (wall and CPU: getrusage of the child)"
echo "command: cat one.eml | bin/dkimgw sign --domain example.com --selector rsa --selector ed > out.eml"
DKIMGW_HSM=$URI "$PY" - "$BIN" "$work/one.eml" "$work/out.eml" <<'PY' | tee "$work/sign-rates"
import os, resource, subprocess, sys, time
bin, src, dst = sys.argv[1:4]
size = os.path.getsize(src)
cmd = [bin, "sign", "--domain", "example.com", "--selector", "rsa", "--selector", "ed"]
for how in ("file", "pipe"):
    for i in range(5):
        r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            if how == "file":
                p = subprocess.run(cmd, stdin=fin, stdout=fout)
            else:
                cat = subprocess.Popen(["cat"], stdin=fin, stdout=subprocess.PIPE)
                p = subprocess.run(cmd, stdin=cat.stdout, stdout=fout)
                cat.stdout.close(); cat.wait()
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode != 0:
            sys.exit(f"dkimgw sign exited {p.returncode}")
        # cat's CPU is the pipe's writer, not dkimgw's: small, and counted alike for every run
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        print("sign from a %s: %.3f s wall, %.3f s CPU: %d MB/s wall, %d MB per CPU-second" % (how, t1 - t0, cpu, size / 1e6 / (t1 - t0), size / 1e6 / cpu))
PY
"$PY" - "$work/relay-rates" "$work/sign-rates" <<'PY'
import re, statistics, sys
relay = {l.split(" ", 1)[1].strip(): float(l.split()[0]) for l in open(sys.argv[1])}
sign = {}
for l in open(sys.argv[2]):
    m = re.match(r"sign from a (\w+): .*: (\d+) MB/s wall, (\d+) MB per CPU-second", l)
    sign.setdefault(m[1], []).append((float(m[2]), float(m[3])))
r = relay["all-in-DATA client"]
for how, v in sign.items():
    wall, cpu = statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)
    print("relay (all-in-DATA client) %.0f MB per CPU-second / sign from a %s: %.2f x its MB/s (wall, median %.0f), %.2f x its MB per CPU-second (median %.0f)" % (r, how, r / wall, wall, r / cpu, cpu))
PY
