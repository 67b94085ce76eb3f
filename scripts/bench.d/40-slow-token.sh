#!/usr/bin/env bash
# A slow token, as a network HSM is: every signature answers 5 ms late.
# The PKCS#11 fault shim of the tests (testenv/p11fault, a module that
# forwards to SoftHSM; control file: hang_ms=5 hang_ops=...) sleeps before
# the call without holding any lock, so N sessions can wait at once.
# hang_ops=C_Sign delays every C_Sign: one per signature since dkimgw's
# copy of miekg/pkcs11 offers the token a buffer at once instead of
# asking for the length first (third_party/pkcs11/PATCHES.md; SLOW_MODES
# can add C_Sign/result, which leaves such a length query undelayed).
# Through dkimgw serve with max-sessions 4, 16 and 64, with twice
# as many client sessions as token sessions, the relay should reach
# 0.8 x max-sessions / 5 ms messages/s, unless the CPU runs out first
# (busy % says which). 4 KB messages, RSA-2048, each message on a new
# connection, SLOW_SECONDS per run, every transaction checked 250 and
# signed in dkimgw's log.
#
# On two cores the relay's CPU caps it near its plain 4 KB rate, far below
# 64 / 5 ms = 12,800 signatures/s, so the 5 ms rows cannot show the pool's
# scaling. A third set of rows delays the signature by SLOW_CURVE_MS
# (200 ms, a far HSM) instead: then 64 sessions ask only 320 signatures/s,
# within the CPU, and the curve over 4, 16 and 64 sessions shows whether
# the pool is used in parallel (a lock held across a token call would
# flatten it at 1 / delay).
#
# Knobs: SLOW_SESSIONS ("4 16 64"), SLOW_MS (5), SLOW_CURVE_MS (200; 0
# leaves those rows out), SLOW_SECONDS (5).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh
source scripts/bench-lib.sh
POOLS=${SLOW_SESSIONS:-4 16 64}
DELAY=${SLOW_MS:-5}
SECS=${SLOW_SECONDS:-5}

for tool in smtp-sink softhsm2-util go cc; do
  command -v "$tool" >/dev/null || { echo "SKIP: $tool not installed (make deps)"; exit 0; }
done
[ -x "$BIN" ] || { echo "SKIP: $BIN missing (make build)"; exit 0; }

lib_workdir dkimgw-bench-slow
smtpload_build
inc=$(go list -m -f '{{.Dir}}' github.com/miekg/pkcs11)
cc -Wall -Werror -O2 -shared -fPIC -I "$inc" -o "$work/libp11fault.so" testenv/p11fault/p11fault.c -ldl -lpthread
softhsm_token bench 1234
bench_keys rsa:rsa-2048
MODES=${SLOW_MODES:-C_Sign}
RUNS=""
for mode in $MODES; do RUNS+=" $DELAY:$mode"; done
CURVE=${SLOW_CURVE_MS:-200}
[ "$CURVE" = 0 ] || RUNS+=" $CURVE:C_Sign"
export P11FAULT_MODULE=$SOFTHSM_MODULE P11FAULT_CONTROL=$work/p11fault.ctl
start_sink upstream

cat <<EOF
machine:  $(nproc) cores; load average before: $(cut -d' ' -f1-3 /proc/loadavg)
token:    SoftHSM behind the fault shim: pkcs11:token=bench?module-path=libp11fault.so&max-sessions=N
          (P11FAULT_MODULE=$SOFTHSM_MODULE, control: hang_ms=MS hang_ops=MODE, MS:MODE in:$RUNS)
client:   smtpload -sessions 2N -size 4096 -duration ${SECS}s -> dkimgw serve (RSA-2048) -> smtp-sink
ideal:    N / MS signatures per second

EOF
printf '%-8s %-14s %-13s %8s %9s %7s %8s %8s %11s %6s\n' hang_ms hang_ops max-sessions msgs/s "ideal/s" ratio "p50 ms" "p99 ms" "CPU ms/msg" busy
for run in $RUNS; do
delay=${run%%:*} mode=${run#*:}
printf 'hang_ms=%s\nhang_ops=%s\n' "$delay" "$mode" > "$work/p11fault.ctl"
for n in $POOLS; do
  URI="pkcs11:token=bench?module-path=$work/libp11fault.so&max-sessions=$n&pin-source=file:$work/pin"
  port=$(free_port)
  bench_config "$work/slow-$n.yaml" "$port" "$sink_port" rsa
  sed -i 's/^smtp:$/smtp:\n  max_connections_per_ip: 1000/' "$work/slow-$n.yaml"
  "$BIN" serve --config "$work/slow-$n.yaml" 2> "$work/slow-$n.log" &
  pid=$!; pids+=("$pid")
  wait_port "$port" "dkimgw serve" "$pid" || { cat "$work/slow-$n.log"; exit 1; }
  "$SMTPLOAD" -addr 127.0.0.1:"$port" -sessions "$(( 2 * n ))" -size 4096 -count 100 > /dev/null # warm-up
  skip=$(grep -c '"msg":"transaction"' "$work/slow-$n.log" || true)
  c0=$(cpu_ticks "$pid"); b0=$(busy_ticks)
  echo "command: smtpload -addr 127.0.0.1:$port -sessions $(( 2 * n )) -size 4096 -duration ${SECS}s" >> "$work/commands"
  out=$(timeout $(( SECS + 60 )) "$SMTPLOAD" -addr 127.0.0.1:"$port" -sessions "$(( 2 * n ))" -size 4096 -duration "${SECS}s")
  c1=$(cpu_ticks "$pid"); b1=$(busy_ticks)
  kill -TERM "$pid"; wait "$pid" || true; unset 'pids[-1]'
  sent=$(sed -n 's/.*sent=\([0-9]*\).*/\1/p' <<< "$out")
  "$PY" - "$work/slow-$n.log" "$skip" "$sent" <<'PY' || exit 1
import json, sys
log, skip, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tx = [json.loads(l) for l in open(log) if '"msg":"transaction"' in l][skip:]
bad = [t for t in tx if t.get("reply", "").split(" ")[0] != "250" or not t.get("signed")]
if len(tx) != n or bad:
    sys.exit(f"{len(tx)} transactions logged for {n} messages, {len(bad)} not 250/signed: {bad[:1]}")
PY
  awk -v mode="$mode" -v n="$n" -v d="$delay" -v out="$out" -v ticks=$(( c1 - c0 )) -v hz="$HZ" -v busy="$(busy "$b0" "$b1")" 'BEGIN {
    split(out, kv, " "); for (i in kv) { split(kv[i], p, "="); v[p[1]] = p[2] }
    ideal = n * 1000 / d
    printf "%-8d %-14s %-13d %8.0f %9.0f %7.2f %8s %8s %11.2f %5s%%\n", d, mode, n, v["msgs_per_s"], ideal, v["msgs_per_s"] / ideal, v["p50_ms"], v["p99_ms"], ticks / hz * 1000 / v["sent"], busy }'
done
done
echo
cat "$work/commands"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
