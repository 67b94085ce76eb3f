# Shared by scripts/demo.sh and scripts/bench.d/*.sh. Source it after
# `set -euo pipefail`; everything stays on 127.0.0.1.

PY=/usr/bin/python3 # Debian's: the one with python3-dkim
SOFTHSM_MODULE=/usr/lib/softhsm/libsofthsm2.so
BIN=${BIN:-$PWD/bin/dkimgw}

# lib_workdir PREFIX makes $work (0755: smtp-sink writes its dumps as user
# postfix) and an EXIT trap that calls lib_before_cleanup if the script
# defines it, stops every PID in pids[] (TERM, then KILL after 5 s) and
# removes $work.
lib_workdir() {
  work=$(mktemp -d "/tmp/$1.XXXXXX")
  chmod 755 "$work"
  pids=()
  trap lib_cleanup EXIT
  trap 'exit 130' INT TERM
}

lib_cleanup() {
  if declare -F lib_before_cleanup >/dev/null; then lib_before_cleanup || true; fi
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$work"
}

# free_port prints a free TCP port on 127.0.0.1.
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_port PORT NAME [PID] waits (10 s at most) until something listens on
# PORT, failing early if PID exits first.
wait_port() {
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    [ -z "${3:-}" ] || kill -0 "$3" 2>/dev/null || { echo "$2 exited before listening" >&2; return 1; }
    sleep 0.1
  done
  echo "$2 did not listen on port $1" >&2
  return 1
}

# softhsm_token LABEL PIN gives the script a SoftHSM configuration and a
# token of its own under $work, with the PIN in a 0600 file; it exports
# SOFTHSM2_CONF and sets URI to a pin-source URI of the token.
softhsm_token() {
  export SOFTHSM2_CONF=$work/softhsm2.conf
  mkdir -p "$work/tokens"
  printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$work" > "$SOFTHSM2_CONF"
  softhsm2-util --init-token --free --label "$1" --pin "$2" --so-pin "$2$2" >/dev/null
  printf '%s\n' "$2" > "$work/pin"
  chmod 600 "$work/pin"
  URI="pkcs11:token=$1?module-path=$SOFTHSM_MODULE&pin-source=file:$work/pin"
}

# bench_keys SELECTOR:ALGORITHM... generates example.com keys in the token.
bench_keys() {
  local k
  for k in "$@"; do
    DKIMGW_HSM=$URI "$BIN" keys generate --domain example.com --selector "${k%%:*}" --algorithm "${k#*:}" > "$work/keys.log" 2>&1 ||
      { cat "$work/keys.log"; return 1; }
  done
}

# bench_config FILE LISTEN_PORT UPSTREAM_PORT SELECTORS writes a dkimgw
# configuration for the benchmarks: the token of softhsm_token, example.com
# signed with SELECTORS (e.g. "rsa, ed"), clients on 127.0.0.0/8, JSON log
# (one line per transaction, with duration_s), spool in $work/spool.
bench_config() {
  mkdir -p "$work/spool"
  cat > "$1" <<YAML
hsm:
  uri: "$URI"
smtp:
  listen: "127.0.0.1:$2"
  hostname: dkimgw.bench.test
upstream:
  address: "127.0.0.1:$3"
spool:
  dir: "$work/spool"
clients:
  - name: bench
    networks: ["127.0.0.0/8"]
    domains: ["example.com"]
domains:
  example.com:
    selectors: [$4]
log: {format: json}
admin: {listen: "127.0.0.1:0"}   # a free port: never collides with another gateway's default
YAML
}

# start_sink NAME [DUMP] starts Postfix's smtp-sink as an upstream on a free
# port and sets sink_port and sink_pid; with DUMP set, each message is
# written under $work/dump-NAME.
start_sink() {
  local dump=()
  if [ -n "${2:-}" ]; then
    mkdir -m 777 "$work/dump-$1"
    dump=(-d "$work/dump-$1/%H%M%S.")
  fi
  sink_port=$(free_port)
  smtp-sink -u postfix "${dump[@]}" 127.0.0.1:"$sink_port" 256 > "$work/sink-$1.log" 2>&1 &
  sink_pid=$!
  pids+=("$sink_pid")
  wait_port "$sink_port" "smtp-sink $1" "$sink_pid" || { cat "$work/sink-$1.log"; return 1; }
}

# CPU accounting from /proc, for "CPU per message" and "machine busy".
HZ=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; } # utime+stime of PID, clock ticks
busy_ticks() { awk '/^cpu / {print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; } # "busy total", all cores
busy() { # busy "B0 T0" "B1 T1": share of all cores busy in between, percent
  awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.0f", 100 * (y[1] - x[1]) / (y[2] - x[2]) }'
}
