#!/usr/bin/env bash
# dkimgw serve: messages/s and per-transaction latency for ~4 KB messages,
# 20 concurrent sessions, Postfix's smtp-source as the client and smtp-sink
# as the upstream, next to smtp-source -> smtp-sink directly, in one run:
#
#   direct:  smtp-source -> smtp-sink
#   rsa:     smtp-source -> dkimgw serve (SoftHSM RSA-2048)           -> smtp-sink
#   dual:    smtp-source -> dkimgw serve (SoftHSM RSA-2048 + Ed25519) -> smtp-sink
#
# The three are interleaved for SERVE_ROUNDS rounds (machines are noisy);
# the median round is reported. Everything is on 127.0.0.1, every run is
# bounded by `timeout`, and every process started here is stopped on exit.
#
# Knobs: SERVE_MESSAGES (default 4000), SERVE_DIRECT_MESSAGES (16000: the
# direct path is ~5x faster, and a run should last seconds), SERVE_SESSIONS
# (20), SERVE_BODY_BYTES (4096), SERVE_ROUNDS (3).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh
N=${SERVE_MESSAGES:-4000}
ND=${SERVE_DIRECT_MESSAGES:-16000}
S=${SERVE_SESSIONS:-20}
L=${SERVE_BODY_BYTES:-4096}
ROUNDS=${SERVE_ROUNDS:-3}
RUN_TIMEOUT=300 # seconds, per smtp-source run

for tool in smtp-source smtp-sink softhsm2-util; do
  command -v "$tool" >/dev/null || { echo "SKIP: $tool not installed (make deps)"; exit 0; }
done
[ -x "$BIN" ] || { echo "SKIP: $BIN missing (make build)"; exit 0; }

lib_workdir dkimgw-bench-serve
now() { date +%s.%N; }

# A throwaway SoftHSM token with an RSA-2048 and an Ed25519 key.
softhsm_token bench 1234
bench_keys rsa:rsa-2048 ed:ed25519

start_sink upstream

# source PORT COUNT: the client; its exit status says whether every
# message got 250.
source_run() {
  /usr/bin/time -f '%U %S' -o "$work/source.time" timeout "$RUN_TIMEOUT" smtp-source -s "$S" -m "$2" -l "$L" -f news@example.com -t reader@example.net -S bench 127.0.0.1:"$1"
}

source_ms() { awk '{printf "%.0f", ($1 + $2) * 1000}' "$work/source.time"; } # of the last smtp-source run
results=$work/results.txt # name round msgs secs rate p50 p90 p99 max cpu_ms
: > "$results"

run_direct() { # run_direct ROUND
  source_run "$sink_port" 100 # warm-up
  local t0 t1 b0 b1 s0 s1
  s0=$(cpu_ticks "$sink_pid"); b0=$(busy_ticks); t0=$(now)
  source_run "$sink_port" "$ND" || { echo "direct run $1 failed" >&2; exit 1; }
  t1=$(now); b1=$(busy_ticks); s1=$(cpu_ticks "$sink_pid")
  echo "direct $1 $ND $t0 $t1 - - - - - $(busy "$b0" "$b1") $(( s1 - s0 )) $(source_ms)" >> "$results"
}

run_serve() { # run_serve NAME ROUND
  local name=$1 round=$2 port pid log t0 t1 c0 c1 s0 s1 b0 b1 skip
  port=$(free_port)
  bench_config "$work/$name.yaml" "$port" "$sink_port" "$3"
  log=$work/$name.$round.log
  "$BIN" serve --config "$work/$name.yaml" 2> "$log" &
  pid=$!; pids+=("$pid")
  wait_port "$port" "dkimgw serve" "$pid" || { cat "$log"; exit 1; }
  source_run "$port" 100 || { echo "warm-up through dkimgw failed:" >&2; tail -5 "$log" >&2; exit 1; }
  skip=$(grep -c '"msg":"transaction"' "$log" || true)
  c0=$(cpu_ticks "$pid"); s0=$(cpu_ticks "$sink_pid"); b0=$(busy_ticks)
  t0=$(now)
  if ! source_run "$port" "$N"; then
    echo "$name run $round failed; dkimgw's last log lines:" >&2; tail -5 "$log" >&2; exit 1
  fi
  t1=$(now)
  c1=$(cpu_ticks "$pid"); s1=$(cpu_ticks "$sink_pid"); b1=$(busy_ticks)
  kill -TERM "$pid"; wait "$pid" || echo "dkimgw serve exited with status $? on SIGTERM" >&2
  unset 'pids[-1]'
  "$PY" - "$log" "$skip" "$name" "$round" "$N" "$t0" "$t1" "$(( c1 - c0 ))" "$HZ" "$(busy "$b0" "$b1") $(( s1 - s0 )) $(source_ms)" >> "$results" <<'PY'
import json, sys
log, skip, name, rnd, n, t0, t1, ticks, hz, extra = sys.argv[1:]
tx = [json.loads(l) for l in open(log) if '"msg":"transaction"' in l][int(skip):]
bad = [t for t in tx if t.get("reply", "").split(" ")[0] != "250" or not t.get("signed")]
if len(tx) != int(n) or bad:
    sys.exit(f"{name}: {len(tx)} transactions logged for {n} messages, {len(bad)} not 250/signed: {bad[:1]}")
d = sorted(t["duration_s"] for t in tx)
q = lambda p: d[min(len(d) - 1, int(p * len(d)))] * 1000
cpu_ms = int(ticks) / int(hz) * 1000 / int(n)
print(name, rnd, n, t0, t1, f"{q(.5):.1f} {q(.9):.1f} {q(.99):.1f} {d[-1]*1000:.1f} {cpu_ms:.2f}", extra)
PY
}

cat <<EOF
machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo); load average before: $(cut -d' ' -f1-3 /proc/loadavg)
client:   smtp-source -s $S -m $N -l $L -f news@example.com -t reader@example.net -S bench 127.0.0.1:PORT
          (direct: -m $ND; a new connection per message, as smtp-source does without -d;
          5 header fields + $L body bytes, ~$((L + 130)) bytes per message)
upstream: smtp-sink -u postfix 127.0.0.1:$sink_port 256
dkimgw:   bin/dkimgw serve --config rsa.yaml | dual.yaml   (SoftHSM token; selectors [rsa] | [rsa, ed];
          log: {format: json}; spool.dir on $work)
timing:   date +%s.%N around the smtp-source run (after a 100-message warm-up; a fresh dkimgw per run);
          latency: duration_s of dkimgw's JSON transaction log: from dkimgw receiving MAIL FROM to
          the upstream's reply to the final dot (MAIL/RCPT relayed in lockstep, the client's DATA,
          spooling, signing, relaying); it excludes connect, greeting, EHLO, the 250 to the client
          and QUIT. smtp-source itself reports no latency; cpu: dkimgw's and smtp-sink's utime+stime (/proc/PID/stat)
          per message; busy: share of all $(nproc) cores busy during the run (/proc/stat).
rounds:   $ROUNDS, each direct, rsa, dual in turn; every dkimgw transaction checked: 250 and signed.

EOF

for round in $(seq "$ROUNDS"); do
  run_direct "$round"
  run_serve rsa "$round" "rsa"
  run_serve dual "$round" "rsa, ed"
done

"$PY" - "$results" "$HZ" <<'PY'
import sys, statistics
hz = int(sys.argv[2])
rows = [l.split() for l in open(sys.argv[1])]
by = {}
for name, rnd, n, t0, t1, *rest in rows:
    secs = float(t1) - float(t0)
    by.setdefault(name, []).append(dict(round=int(rnd), n=int(n), secs=secs, rate=int(n) / secs, rest=rest))
print("CPU time per message (ms), each process's utime+stime; busy = all cores\n")
print("%-6s %5s %6s %6s %7s %7s %7s %7s %7s %7s %7s %7s %5s" % ("run", "round", "msgs", "secs", "msgs/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "dkimgw", "source", "sink", "busy"))
for name in ("direct", "rsa", "dual"):
    for r in by.get(name, []):
        p50, p90, p99, mx, cpu, busy, sink, src = r["rest"]
        sink = "%.2f" % (int(sink) / hz * 1000 / r["n"])
        src = "%.2f" % (int(src) / r["n"])
        print("%-6s %5d %6d %6.2f %7.0f %7s %7s %7s %7s %7s %7s %7s %4s%%" % (name, r["round"], r["n"], r["secs"], r["rate"], p50, p90, p99, mx, cpu, src, sink, busy))
med = {k: statistics.median(x["rate"] for x in v) for k, v in by.items()}
print()
print("median msgs/s: direct %.0f, dkimgw rsa %.0f, dkimgw rsa+ed25519 %.0f" % (med["direct"], med["rsa"], med["dual"]))
print("ratio (b)/(a), median: rsa %.3f, dual %.3f" % (med["rsa"] / med["direct"], med["dual"] / med["direct"]))
print("ratio per round (rsa/direct, dual/direct): " + ", ".join(
    "%.3f/%.3f" % (by["rsa"][i]["rate"] / by["direct"][i]["rate"], by["dual"][i]["rate"] / by["direct"][i]["rate"])
    for i in range(len(by["direct"]))))
PY
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
