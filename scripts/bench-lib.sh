# Shared by the benchmarks in scripts/bench.d/ that compare dkimgw with
# Postfix + OpenDKIM. Source it after scripts/lib.sh and lib_workdir; it
# registers what it starts in pids[] and postfixes[], which lib_cleanup
# (through lib_before_cleanup, defined here) stops.

postfixes=()
lib_before_cleanup() {
  local d
  for d in "${postfixes[@]}"; do postfix -c "$d" stop >/dev/null 2>&1 || postfix -c "$d" abort >/dev/null 2>&1 || true; done
}

# bench_need_postfix prints why Postfix + OpenDKIM cannot run here, or
# nothing when they can.
bench_need_postfix() {
  local tool
  for tool in postfix postconf opendkim openssl smtp-sink; do
    command -v "$tool" >/dev/null || { echo "$tool not installed (make deps)"; return; }
  done
  [ "$(id -u)" = 0 ] || { echo "a throwaway Postfix instance needs root"; return; }
  id postfix >/dev/null 2>&1 && getent group postdrop >/dev/null || echo "no postfix user or postdrop group"
}

# start_opendkim starts OpenDKIM in sign mode with an RSA-2048 file key on
# a loopback inet socket; it sets milter_port and odk_pid.
start_opendkim() {
  mkdir -p "$work/opendkim"
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/opendkim/odk.private" 2>/dev/null
  chmod 600 "$work/opendkim/odk.private"
  milter_port=$(free_port)
  cat > "$work/opendkim/opendkim.conf" <<CONF
Mode                    s
Domain                  example.com
Selector                odk
KeyFile                 $work/opendkim/odk.private
Canonicalization        relaxed/relaxed
SignatureAlgorithm      rsa-sha256
Socket                  inet:$milter_port@127.0.0.1
PidFile                 $work/opendkim/opendkim.pid
InternalHosts           127.0.0.1
Syslog                  no
RequireSafeKeys         false
Background              no
CONF
  opendkim -f -x "$work/opendkim/opendkim.conf" > "$work/opendkim/log" 2>&1 &
  odk_pid=$!; pids+=("$odk_pid")
  wait_port "$milter_port" opendkim "$odk_pid" || { cat "$work/opendkim/log"; return 1; }
}

# make_postfix NAME PORT RELAYHOST [MILTER] writes a throwaway Postfix:
# its own config, queue and data directories, pure relay to RELAYHOST,
# listening on 127.0.0.1:PORT only, queue files fsynced as in production.
make_postfix() {
  local d=$work/postfix-$1
  mkdir -p "$d/etc" "$d/queue" "$d/data"
  chown postfix "$d/data"
  cat > "$d/etc/main.cf" <<CF
compatibility_level = 3.6
config_directory = $d/etc
queue_directory = $d/queue
data_directory = $d/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = $d/maillog
maillog_file_prefixes = $d
myhostname = postfix-$1.bench.test
inet_interfaces = loopback-only
inet_protocols = ipv4
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
relayhost = $3
smtp_dns_support_level = disabled
smtp_tls_security_level = none
smtpd_tls_security_level = none
message_size_limit = 52428800
default_process_limit = 200
biff = no
${4:+smtpd_milters = $4
milter_default_action = tempfail
milter_protocol = 6}
CF
  { echo "127.0.0.1:$2 inet n - n - - smtpd"; cat testenv/postfix-master.cf; } > "$d/etc/master.cf"
}

# start_postfix NAME PORT starts the instance make_postfix wrote.
start_postfix() {
  local d=$work/postfix-$1
  postfixes+=("$d/etc")
  if ! postfix -c "$d/etc" start > "$d/start.log" 2>&1 || ! wait_port "$2" "postfix $1"; then
    # Postfix reports a bad main.cf only to syslog or a terminal.
    cat "$d/start.log"; [ -f "$d/maillog" ] && tail -20 "$d/maillog"
    command -v script >/dev/null && script -qc "postfix -c $d/etc check" /dev/null
    return 1
  fi
}
stop_postfix() { postfix -c "$work/postfix-$1/etc" stop >/dev/null 2>&1 || true; sleep 0.5; }

# smtpload_build builds the load client into $work/smtpload.
smtpload_build() {
  go build -o "$work/smtpload" ./bench/smtpload
  SMTPLOAD=$work/smtpload
}
