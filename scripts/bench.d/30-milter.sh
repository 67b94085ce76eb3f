#!/usr/bin/env bash
# Milter against milter: the same ~4 KB messages, 20 concurrent
# smtp-source sessions, submitted to a throwaway Postfix whose
# smtpd_milters is either
#
#   opendkim: the OpenDKIM milter (RSA-2048 file key, inet socket), or
#   dkimgw:   `dkimgw milter` (RSA-2048 in SoftHSM, inet socket),
#
# and which relays to smtp-sink. Rounds are interleaved (opendkim, then
# dkimgw, PF_ROUNDS times); the medians are reported. A run is timed from
# the start of smtp-source until the sink holds every message; every
# message is then checked to carry exactly one DKIM-Signature. CPU per
# message is the milter process's utime+stime (/proc/PID/stat) over the
# run. Loopback only, bounded by timeouts; every process started here is
# stopped on exit. Skipped, with the reason, when a tool is missing.
#
# Knobs: PF_MESSAGES (default 2000), PF_SESSIONS (20), PF_BODY_BYTES (4096),
# PF_ROUNDS (3).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh
N=${PF_MESSAGES:-2000}
S=${PF_SESSIONS:-20}
L=${PF_BODY_BYTES:-4096}
ROUNDS=${PF_ROUNDS:-3}
RUN_TIMEOUT=240 # seconds, per run (submission and delivery)

skip() { echo "SKIP: $*"; exit 0; }
for tool in smtp-source smtp-sink softhsm2-util postfix postconf opendkim openssl; do
  command -v "$tool" >/dev/null || skip "$tool not installed (make deps)"
done
[ -x "$BIN" ] || skip "$BIN missing (make build)"
[ "$(id -u)" = 0 ] || skip "a throwaway Postfix instance needs root"
id postfix >/dev/null 2>&1 && getent group postdrop >/dev/null || skip "no postfix user or postdrop group"

lib_workdir dkimgw-bench-milter
source scripts/bench-lib.sh # make_postfix, start_postfix, start_opendkim; stops them on exit

# dkimgw milter: its token, an RSA-2048 key, a loopback inet socket.
softhsm_token bench 1234
bench_keys rsa:rsa-2048
gw_port=$(free_port)
cat > "$work/dkimgw.yaml" <<YAML
hsm:
  uri: "$URI"
milter:
  listen: "inet:127.0.0.1:$gw_port"
clients:
  - name: bench
    networks: ["127.0.0.0/8"]
    domains: ["example.com"]
domains:
  example.com:
    selectors: [rsa]
log: {format: json}
admin: {listen: "127.0.0.1:0"}
audit: {path: "$work/audit.log"}
data_dir: "$work/data"
YAML
"$BIN" milter --config "$work/dkimgw.yaml" 2> "$work/dkimgw.log" &
gw_pid=$!; pids+=("$gw_pid")
wait_port "$gw_port" "dkimgw milter" "$gw_pid" || { cat "$work/dkimgw.log"; exit 1; }

# OpenDKIM: sign mode, an RSA-2048 file key, a loopback inet socket.
start_opendkim || skip "opendkim did not start"
odk_port=$milter_port


# One smtp-sink per configuration, dumping every message (as user postfix)
# so that the signatures can be counted; the dump costs both the same.
start_sink dkimgw dump; dkimgw_sink=$sink_port
start_sink opendkim dump; odk_sink=$sink_port
pf_dkimgw_port=$(free_port); pf_odk_port=$(free_port)
make_postfix dkimgw "$pf_dkimgw_port" "[127.0.0.1]:$dkimgw_sink" "inet:127.0.0.1:$gw_port"
make_postfix opendkim "$pf_odk_port" "[127.0.0.1]:$odk_sink" "inet:127.0.0.1:$odk_port"

cat <<EOF
machine:  $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo); $(postconf -d mail_version | tr -d ' '), $(opendkim -V | head -1 | sed 's/.*Filter //')
client:   smtp-source -s $S -m $N -l $L -f news@example.com -t reader@example.net -S bench 127.0.0.1:POSTFIX_PORT
opendkim: Postfix (smtpd_milters = inet: opendkim, Mode s, RSA-2048 file key, relaxed/relaxed) -> smtp-sink -d
dkimgw:   Postfix (smtpd_milters = inet: dkimgw milter, RSA-2048 in SoftHSM, relaxed/relaxed, JSON log line
          per message) -> smtp-sink -d
postfix:  a throwaway instance each, same main.cf apart from relayhost/milter; milter_protocol = 6
timing:   from the start of smtp-source until the sink has dumped all $N messages; then every dumped
          message is checked for exactly one DKIM-Signature header.
cpu:      utime+stime per message of the milter process (/proc/PID/stat); busy: all cores (/proc/stat)
rounds:   $ROUNDS, each opendkim then dkimgw; medians reported

EOF

results=$work/results.txt
: > "$results"
run() { # run NAME ROUND PORT MILTER_PID
  local name=$1 round=$2 port=$3 mpid=$4 dump=$work/dump-$1 t0 t1 b0 b1 c0 c1 have=0
  start_postfix "$name" "$port" || skip "the throwaway Postfix ($name) did not start"
  # Warm-up (also proves the path signs): 20 messages, then clear the dump.
  timeout 60 smtp-source -s 5 -m 20 -l "$L" -f news@example.com -t reader@example.net -S warm 127.0.0.1:"$port" ||
    { tail -20 "$work/postfix-$name/maillog"; exit 1; }
  for _ in $(seq 600); do [ "$(find "$dump" -type f | wc -l)" -ge 20 ] && break; sleep 0.1; done
  sleep 0.3
  if [ "$(grep -l '^DKIM-Signature:' "$dump"/* 2>/dev/null | wc -l)" -lt 20 ]; then
    echo "warm-up messages did not arrive signed ($name); maillog:" >&2; tail -20 "$work/postfix-$name/maillog" >&2
    [ "$name" = dkimgw ] && tail -5 "$work/dkimgw.log" >&2
    exit 1
  fi
  find "$dump" -type f -delete
  c0=$(cpu_ticks "$mpid"); b0=$(busy_ticks); t0=$(date +%s.%N)
  if ! timeout "$RUN_TIMEOUT" smtp-source -s "$S" -m "$N" -l "$L" -f news@example.com -t reader@example.net -S bench 127.0.0.1:"$port"; then
    echo "smtp-source into Postfix ($name) failed; maillog:" >&2; tail -20 "$work/postfix-$name/maillog" >&2; exit 1
  fi
  local deadline=$(( $(date +%s) + RUN_TIMEOUT ))
  while have=$(find "$dump" -type f | wc -l); [ "$have" -lt "$N" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "$name: only $have of $N messages delivered in time" >&2; tail -20 "$work/postfix-$name/maillog" >&2; exit 1; }
    sleep 0.05
  done
  t1=$(date +%s.%N); b1=$(busy_ticks); c1=$(cpu_ticks "$mpid")
  stop_postfix "$name"
  sleep 0.3
  local signed one
  signed=$(grep -l '^DKIM-Signature:' "$dump"/* | wc -l)
  one=$(grep -c '^DKIM-Signature:' "$dump"/* | awk -F: '$NF != 1' | wc -l)
  [ "$signed" -eq "$N" ] && [ "$one" -eq 0 ] || { echo "$name: $signed of $N messages signed, $one without exactly one signature" >&2; exit 1; }
  find "$dump" -type f -delete
  echo "$name $round $N $t0 $t1 $(( c1 - c0 )) $(busy "$b0" "$b1")" >> "$results"
}

for round in $(seq "$ROUNDS"); do
  run opendkim "$round" "$pf_odk_port" "$odk_pid"
  run dkimgw "$round" "$pf_dkimgw_port" "$gw_pid"
done

"$PY" - "$results" "$HZ" <<'PY'
import sys, statistics
hz = int(sys.argv[2])
rate, cpu = {}, {}
print("%-9s %5s %6s %7s %7s %12s %5s" % ("milter", "round", "msgs", "secs", "msgs/s", "milter cpu", "busy"))
for l in open(sys.argv[1]):
    name, rnd, n, t0, t1, ticks, busy = l.split()
    secs = float(t1) - float(t0); r = int(n) / secs; c = int(ticks) / hz * 1000 / int(n)
    rate.setdefault(name, []).append(r); cpu.setdefault(name, []).append(c)
    print("%-9s %5s %6s %7.2f %7.0f %9.2f ms %4s%%" % (name, rnd, n, secs, r, c, busy))
m = {k: statistics.median(v) for k, v in rate.items()}
c = {k: statistics.median(v) for k, v in cpu.items()}
print()
print("median msgs/s: Postfix + OpenDKIM milter %.0f, Postfix + dkimgw milter %.0f; ratio dkimgw / OpenDKIM %.2f" % (m["opendkim"], m["dkimgw"], m["dkimgw"] / m["opendkim"]))
print("median milter CPU per message: OpenDKIM %.2f ms, dkimgw %.2f ms; ratio dkimgw / OpenDKIM %.2f" % (c["opendkim"], c["dkimgw"], c["dkimgw"] / c["opendkim"]))
print("every message of every run arrived with exactly one DKIM-Signature")
PY
