#!/usr/bin/env bash
# Campaign-sized mail: messages/s, MB/s, client-side latency per message,
# CPU per message of each signer and machine busy %, for 4 KB, 100 KB and
# 1 MB messages with 20 and 100 sessions, through
#
#   (a) direct:   smtpload -> smtp-sink
#   (b) rsa:      smtpload -> dkimgw serve (SoftHSM RSA-2048)           -> smtp-sink
#   (c) dual:     smtpload -> dkimgw serve (SoftHSM RSA-2048 + Ed25519) -> smtp-sink
#   (d) opendkim: smtpload -> Postfix + OpenDKIM milter (RSA-2048 file key) -> smtp-sink
#   (e) p11kit:   smtpload -> dkimgw serve (RSA-2048, the token in a p11-kit server
#                 process in front of SoftHSM, reached through p11-kit-client.so) -> smtp-sink
#
# interleaved: each round runs every size × sessions × path once; the
# median of CAMPAIGN_ROUNDS rounds is reported. smtpload (bench/smtpload)
# sends for CAMPAIGN_SECONDS, each message on a new connection, and
# times every message from connect to the reply to its final dot. Every
# (b)/(c)/(e) message is checked in dkimgw's JSON log (250, signed); every (d)
# message is checked at the sink for exactly one DKIM-Signature; a sample
# of dkimgw-signed messages of each size is verified with dkimpy. CPU
# (pprof) and allocation profiles of (b) at each size, 20 sessions, are
# written to BENCH_PROFILES (default bench-results/profiles) with their
# top functions. Loopback only, every run bounded by `timeout`, and every
# process started here stopped on exit. (d) is skipped, with the reason,
# where Postfix or OpenDKIM cannot run; (e) where p11-kit is missing.
# For (e) the CPU of the token's process (the p11-kit-remote the server
# forked for dkimgw's connection: the "HSM") is measured too, apart from
# dkimgw's.
#
# Knobs: CAMPAIGN_SIZES ("4096 102400 1048576"), CAMPAIGN_SESSIONS
# ("20 100"), CAMPAIGN_ROUNDS (3), CAMPAIGN_SECONDS (4), CAMPAIGN_P11KIT:
# the SIZE:SESSIONS where (e) runs ("4096:20 102400:20"; "" for none).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh
source scripts/bench-lib.sh
SIZES=${CAMPAIGN_SIZES:-4096 102400 1048576}
SESSIONS=${CAMPAIGN_SESSIONS:-20 100}
ROUNDS=${CAMPAIGN_ROUNDS:-3}
SECS=${CAMPAIGN_SECONDS:-4}
PROFILES=${BENCH_PROFILES:-bench-results/profiles}
P11KIT_AT=${CAMPAIGN_P11KIT-4096:20 102400:20}
P11KIT_CLIENT=/usr/lib/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)/pkcs11/p11-kit-client.so
RUN_TIMEOUT=$(( SECS + 120 )) # seconds, per run (sending and, for Postfix, delivering)

for tool in smtp-sink softhsm2-util go curl; do
  command -v "$tool" >/dev/null || { echo "SKIP: $tool not installed (make deps)"; exit 0; }
done
[ -x "$BIN" ] || { echo "SKIP: $BIN missing (make build)"; exit 0; }
no_pf=$(bench_need_postfix)

lib_workdir dkimgw-bench-campaign
mkdir -p "$PROFILES"
smtpload_build
softhsm_token bench 1234
bench_keys rsa:rsa-2048 ed:ed25519
for sel in rsa ed; do DKIMGW_HSM=$URI "$BIN" keys dns --domain example.com --selector "$sel" >> "$work/zone"; done

start_sink upstream; up_port=$sink_port; up_pid=$sink_pid

declare -A PORT PID PPROF LOG
start_gw() { # start_gw NAME SELECTORS UPSTREAM_PORT
  local name=$1
  PORT[$name]=$(free_port); PPROF[$name]=$(free_port); LOG[$name]=$work/$name.log
  bench_config "$work/$name.yaml" "${PORT[$name]}" "$3" "$2"
  # 100 sessions from one address, each message on a new connection.
  sed -i 's/^smtp:$/smtp:\n  max_connections_per_ip: 1000/' "$work/$name.yaml"
  DKIMGW_PPROF=127.0.0.1:${PPROF[$name]} "$BIN" serve --config "$work/$name.yaml" 2> "${LOG[$name]}" &
  PID[$name]=$!; pids+=("${PID[$name]}")
  wait_port "${PORT[$name]}" "dkimgw serve ($name)" "${PID[$name]}" || { cat "${LOG[$name]}"; exit 1; }
}
start_gw rsa "rsa" "$up_port"
start_gw dual "rsa, ed" "$up_port"

# (e): the same token served by a p11-kit server (its own session, so
# that its process group holds the server and the p11-kit-remote it
# forks per connection); the gateway loads p11-kit-client.so and learns
# the socket from P11_KIT_SERVER_ADDRESS. RSA only: p11-kit's RPC
# carries no EdDSA.
p11kit_pgid=
if [ -n "$P11KIT_AT" ]; then
  if ! command -v p11-kit >/dev/null || [ ! -f "$P11KIT_CLIENT" ]; then
    echo "SKIP (e) p11kit: p11-kit or $P11KIT_CLIENT missing (make deps)"; P11KIT_AT=
  fi
fi
if [ -n "$P11KIT_AT" ]; then
  setsid p11-kit server -f -n "$work/p11kit.sock" --provider "$SOFTHSM_MODULE" "pkcs11:token=bench" > "$work/p11kit.log" 2>&1 &
  p11kit_pgid=$!; pids+=("$p11kit_pgid")
  for _ in $(seq 100); do [ -S "$work/p11kit.sock" ] && break; sleep 0.1; done
  [ -S "$work/p11kit.sock" ] || { cat "$work/p11kit.log"; echo "p11-kit server did not start" >&2; exit 1; }
  export P11_KIT_SERVER_ADDRESS=unix:path=$work/p11kit.sock
  URI_SOFTHSM=$URI; URI="pkcs11:token=bench?module-path=$P11KIT_CLIENT&pin-source=file:$work/pin"
  start_gw p11kit "rsa" "$up_port"
  URI=$URI_SOFTHSM
fi
# hsm_ticks: CPU ticks of every process of the p11-kit server's group
# (the server, which only accepts, and the p11-kit-remote processes,
# which sign).
hsm_ticks() {
  local t=0 p
  for p in $(pgrep -g "$p11kit_pgid"); do t=$(( t + $(cpu_ticks "$p" 2>/dev/null || echo 0) )); done
  echo "$t"
}
PORT[direct]=$up_port; PID[direct]=$up_pid

load() { # load PORT SESSIONS SIZE ARGS...: one smtpload run; prints its result line
  local port=$1 s=$2 size=$3; shift 3
  timeout "$RUN_TIMEOUT" "$SMTPLOAD" -addr 127.0.0.1:"$port" -sessions "$s" -size "$size" "$@"
}

# A sample of each size, signed by dkimgw (both keys), verified by dkimpy.
start_sink verify dump; start_gw verify "rsa, ed" "$sink_port"
for size in $SIZES; do load "${PORT[verify]}" 1 "$size" -count 2 > /dev/null; done
if [ -n "$P11KIT_AT" ]; then
  URI="pkcs11:token=bench?module-path=$P11KIT_CLIENT&pin-source=file:$work/pin"
  start_gw verify-p11kit "rsa" "$sink_port"
  URI=$URI_SOFTHSM
  for size in $SIZES; do load "${PORT[verify-p11kit]}" 1 "$size" -count 2 > /dev/null; done
  kill -TERM "${PID[verify-p11kit]}"; wait "${PID[verify-p11kit]}" || true
fi
sleep 0.5
"$PY" scripts/bench-verify.py "$work/zone" "$work"/dump-verify/* || { echo "dkimgw's signatures do not verify" >&2; exit 1; }
kill -TERM "${PID[verify]}"; wait "${PID[verify]}" || true

paths="direct rsa dual"
if [ -z "$no_pf" ]; then
  start_opendkim || { echo "SKIP (d): opendkim did not start"; no_pf="opendkim did not start"; }
fi
if [ -z "$no_pf" ]; then
  start_sink opendkim dump; odk_sink=$sink_port; odk_dump=$work/dump-opendkim
  PORT[opendkim]=$(free_port); PID[opendkim]=$odk_pid
  make_postfix opendkim "${PORT[opendkim]}" "[127.0.0.1]:$odk_sink" "inet:127.0.0.1:$milter_port"
  start_postfix opendkim "${PORT[opendkim]}" || { echo "SKIP (d): the throwaway Postfix did not start"; no_pf="Postfix did not start"; }
fi
[ -z "$no_pf" ] && paths="$paths opendkim" || echo "SKIP (d) Postfix + OpenDKIM: $no_pf"
[ -z "$P11KIT_AT" ] || paths="$paths p11kit"

cat <<EOF
machine:  $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo); load average before: $(cut -d' ' -f1-3 /proc/loadavg)
client:   smtpload -addr 127.0.0.1:PORT -sessions S -size SIZE -duration ${SECS}s   (bench/smtpload; a new
          connection per message; latency per message: connect to the reply to the final dot)
(a)       -> smtp-sink -u postfix 127.0.0.1:$up_port 256
(b) (c)   -> bin/dkimgw serve --config rsa.yaml | dual.yaml (SoftHSM token; selectors [rsa] | [rsa, ed];
             log: {format: json}; max_connections_per_ip: 1000) -> the same smtp-sink
(d)       -> Postfix (throwaway instance, smtpd_milters = inet:127.0.0.1:MILTER: opendkim -f, Mode s,
             RSA-2048 file key, relaxed/relaxed) -> relayhost smtp-sink -d; timed until the sink has them all
(e)       -> bin/dkimgw serve --config p11kit.yaml (selectors [rsa]; hsm.uri module-path=$P11KIT_CLIENT,
             P11_KIT_SERVER_ADDRESS=unix:path=.../p11kit.sock) -> the same smtp-sink; the token: p11-kit server -f
             -n .../p11kit.sock --provider $SOFTHSM_MODULE pkcs11:token=bench; only at ${P11KIT_AT:-(none)}
cpu:      utime+stime per message (/proc/PID/stat) of dkimgw, or of opendkim for (d); for (e) also of the p11-kit
          server's processes (HSM ms/msg); busy: all cores (/proc/stat)
rounds:   $ROUNDS; sizes: $SIZES; sessions: $SESSIONS; paths: $paths

EOF

results=$work/results.txt # path size sessions round sent secs p50 p99 cpu_ticks busy hsm_ticks
: > "$results"
field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<< "$2"; }

run() { # run PATH SIZE SESSIONS ROUND
  local path=$1 size=$2 s=$3 round=$4 port=${PORT[$1]} spid=${PID[$1]} out skip=0 t0 t1 b0 b1 c0 c1 h0=0 h1=0 sent secs
  if [ "$path" = p11kit ] && [[ " $P11KIT_AT " != *" $size:$s "* ]]; then return 0; fi
  load "$port" "$(( s < 20 ? s : 20 ))" "$size" -count 20 > /dev/null || { echo "warm-up of $path failed" >&2; exit 1; }
  if [ "$path" = opendkim ]; then
    for _ in $(seq 600); do [ "$(find "$odk_dump" -type f | wc -l)" -ge 20 ] && break; sleep 0.1; done
    find "$odk_dump" -type f -delete
  fi
  if [ "$path" = rsa ] || [ "$path" = dual ] || [ "$path" = p11kit ]; then skip=$(grep -c '"msg":"transaction"' "${LOG[$path]}" || true); fi
  [ "$path" != p11kit ] || h0=$(hsm_ticks)
  c0=$(cpu_ticks "$spid"); b0=$(busy_ticks); t0=$(date +%s.%N)
  out=$(load "$port" "$s" "$size" -duration "${SECS}s") || { echo "$path $size B x $s: smtpload failed: $out" >&2; exit 1; }
  sent=$(field sent "$out"); secs=$(field secs "$out")
  if [ "$path" = opendkim ]; then
    local deadline=$(( $(date +%s) + RUN_TIMEOUT )) have
    while have=$(find "$odk_dump" -type f | wc -l); [ "$have" -lt "$sent" ]; do
      [ "$(date +%s)" -lt "$deadline" ] || { echo "opendkim: only $have of $sent delivered in time" >&2; exit 1; }
      sleep 0.05
    done
    t1=$(date +%s.%N); secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')
  fi
  b1=$(busy_ticks); c1=$(cpu_ticks "$spid")
  [ "$path" != p11kit ] || h1=$(hsm_ticks)
  case $path in
    rsa|dual|p11kit)
      "$PY" - "${LOG[$path]}" "$skip" "$sent" "$path" <<'PY' || exit 1
import json, sys
log, skip, n, name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tx = [json.loads(l) for l in open(log) if '"msg":"transaction"' in l][skip:]
bad = [t for t in tx if t.get("reply", "").split(" ")[0] != "250" or not t.get("signed")]
if len(tx) != n or bad:
    sys.exit(f"{name}: {len(tx)} transactions logged for {n} messages, {len(bad)} not 250/signed: {bad[:1]}")
PY
      ;;
    opendkim)
      sleep 0.2
      local bad
      bad=$(grep -c '^DKIM-Signature:' "$odk_dump"/* | awk -F: '$NF != 1' | wc -l)
      [ "$bad" -eq 0 ] || { echo "opendkim: $bad of $sent messages without exactly one DKIM-Signature" >&2; exit 1; }
      find "$odk_dump" -type f -delete
      ;;
  esac
  echo "$path $size $s $round $sent $secs $(field p50_ms "$out") $(field p99_ms "$out") $(( c1 - c0 )) $(busy "$b0" "$b1") $(( h1 - h0 ))" >> "$results"
  printf '%-8s %8s B %4s sessions, round %s: %s\n' "$path" "$size" "$s" "$round" "$out"
}

for round in $(seq "$ROUNDS"); do
  for size in $SIZES; do
    for s in $SESSIONS; do
      for path in $paths; do run "$path" "$size" "$s" "$round"; done
    done
  done
done

# Latency at half the peak rate: (b) rsa, 4 KB, 20 sessions, paced at
# half its median rate above; (a) direct at the same rate right after, so
# that the machine's own tail (client, sink and scheduler on the same
# cores) is measured beside dkimgw's. CAMPAIGN_ROUNDS rounds, medians.
if [[ " $SIZES " == *" 4096 "* ]] && [[ " $SESSIONS " == *" 20 "* ]]; then
  half=$("$PY" -c 'import sys, statistics
rates = [int(l.split()[4]) / float(l.split()[5]) for l in open(sys.argv[1]) if l.split()[:3] == ["rsa", "4096", "20"]]
print("%.0f" % (statistics.median(rates) / 2))' "$results")
  echo
  for path in rsa direct; do
    echo "command: smtpload -addr 127.0.0.1:${PORT[$path]} -sessions 20 -size 4096 -duration ${SECS}s -rate $half   ($path; half the median peak rate of (b) rsa 4 KB x 20)"
  done
  : > "$work/half"
  for round in $(seq "$ROUNDS"); do
    for path in rsa direct; do
      out=$(load "${PORT[$path]}" 20 4096 -duration "${SECS}s" -rate "$half")
      echo "half rate, round $round, $path: $out"
      echo "$path $out" >> "$work/half"
    done
  done
  "$PY" - "$work/half" <<'PY'
import sys, statistics
r = {}
for l in open(sys.argv[1]):
    path, *kv = l.split()
    v = dict(x.split("=") for x in kv)
    r.setdefault(path, []).append(float(v["p99_ms"]) / float(v["p50_ms"]))
for path in ("rsa", "direct"):
    print("half rate: %s p99 / p50 = %.2f (median; rounds %s)%s" % (path, statistics.median(r[path]), " / ".join("%.2f" % x for x in r[path]),
          " (target <= 3)" if path == "rsa" else " (the machine without dkimgw, same rate)"))
PY
fi

# Profiles of (b), 20 sessions, each size: CPU over the middle of a run;
# then allocations since dkimgw started (pprof's allocs is cumulative).
echo
for size in $SIZES; do
  pf=$PROFILES/rsa-$size-20
  load "${PORT[rsa]}" 20 "$size" -duration "$(( SECS + 2 ))s" > "$pf.load.txt" &
  lp=$!
  sleep 1
  curl -sf -o "$pf.cpu.pprof" "http://127.0.0.1:${PPROF[rsa]}/debug/pprof/profile?seconds=$SECS" || echo "CPU profile failed" >&2
  wait "$lp" || true
  go tool pprof -top -nodecount=30 "$BIN" "$pf.cpu.pprof" > "$pf.cpu.top.txt" 2>/dev/null || true
  echo "profile (b) rsa $size B x 20 sessions: $pf.cpu.pprof (top: $pf.cpu.top.txt); load: $(cat "$pf.load.txt")"
done
curl -sf -o "$PROFILES/rsa.allocs.pprof" "http://127.0.0.1:${PPROF[rsa]}/debug/pprof/allocs" || echo "allocation profile failed" >&2
go tool pprof -sample_index=alloc_space -top -nodecount=30 "$BIN" "$PROFILES/rsa.allocs.pprof" > "$PROFILES/rsa.allocs.top.txt" 2>/dev/null || true
echo "allocations of (b) over the whole benchmark: $PROFILES/rsa.allocs.pprof (top: $PROFILES/rsa.allocs.top.txt)"
echo

"$PY" - "$results" "$HZ" <<'PY'
import sys, statistics
hz = int(sys.argv[2])
rows = {}
for l in open(sys.argv[1]):
    path, size, s, rnd, sent, secs, p50, p99, ticks, busy, hticks = l.split()
    size, s, sent, secs = int(size), int(s), int(sent), float(secs)
    rows.setdefault((path, size, s), []).append(dict(
        rate=sent / secs, mbps=sent * size / secs / 1e6, p50=float(p50), p99=float(p99),
        cpu=int(ticks) / hz * 1000 / max(sent, 1), busy=int(busy), hsm=int(hticks) / hz * 1000 / max(sent, 1)))
order = ["direct", "rsa", "dual", "opendkim", "p11kit"]
M = {}
print("median of the rounds (msgs/s of each round at the end); CPU: dkimgw's for rsa/dual/p11kit, opendkim's for opendkim;")
print("HSM: the p11-kit server's processes for p11kit (the token's CPU, outside dkimgw)")
print("%-9s %8s %5s %8s %7s %8s %8s %11s %11s %6s  %s" % ("path", "size", "sess", "msgs/s", "MB/s", "p50 ms", "p99 ms", "CPU ms/msg", "HSM ms/msg", "busy", "rounds"))
for (path, size, s), v in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][2], order.index(kv[0][0]))):
    m = {k: statistics.median([r[k] for r in v]) for k in v[0]}
    M[(path, size, s)] = m
    cpu = "-" if path == "direct" else "%.2f" % m["cpu"]
    hsm = "%.2f" % m["hsm"] if path == "p11kit" else "-"
    print("%-9s %8d %5d %8.0f %7.1f %8.1f %8.1f %11s %11s %5.0f%%  %s" % (path, size, s, m["rate"], m["mbps"], m["p50"], m["p99"], cpu, hsm, m["busy"], " / ".join("%.0f" % r["rate"] for r in v)))
print()
get = lambda p, size, s, k: M.get((p, size, s), {}).get(k)
for s in sorted({k[2] for k in M}):
    c4, c100, o100 = get("rsa", 4096, s, "cpu"), get("rsa", 102400, s, "cpu"), get("opendkim", 102400, s, "cpu")
    if c4 and c100:
        print("%3d sessions: dkimgw CPU per 100 KB message / per 4 KB message = %.2f (target <= 1.3)" % (s, c100 / c4))
    if c100 and o100:
        print("%3d sessions: dkimgw CPU per 100 KB message / OpenDKIM milter's = %.2f (target <= 0.4)" % (s, c100 / o100))
    r, o = get("rsa", 4096, s, "rate"), get("opendkim", 4096, s, "rate")
    if r and o:
        print("%3d sessions: 4 KB msgs/s, dkimgw rsa / Postfix + OpenDKIM = %.2f (target >= 5)" % (s, r / o))
    for size in (4096, 102400):
        p, o, r = get("p11kit", size, s, "cpu"), get("opendkim", size, s, "cpu"), get("rsa", size, s, "cpu")
        if p and o:
            print("%3d sessions: %6d B: dkimgw CPU per message, token in the p11-kit server / OpenDKIM milter's = %.2f (target <= 0.4); in-process token (rsa): %s" % (s, size, p / o, "%.2f" % (r / o) if r else "-"))
        pr, orate = get("p11kit", size, s, "rate"), get("opendkim", size, s, "rate")
        if pr and orate:
            print("%3d sessions: %6d B: msgs/s, dkimgw p11kit / Postfix + OpenDKIM = %.2f" % (s, size, pr / orate))
    for size in sorted({k[1] for k in M}):
        c = get("rsa", size, s, "cpu")
        if c:
            print("%3d sessions: dkimgw rsa, %7d B messages: %.0f MB per CPU-second" % (s, size, size / 1e6 / (c / 1000)))
PY
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
