#!/usr/bin/env bash
# Checks the Exim snippet of the README (deploy/exim/dkimgw.conf) with a
# real Exim, on a machine where Postfix is the MTA: Debian's
# exim4-daemon-light is downloaded and unpacked, not installed, and run in
# a private mount namespace (as root) where it finds itself, its library
# and its user. It validates the configuration (exim -bV), then, when
# dkimgw listens on DKIMGW_ADDR (host:port, e.g. the README's quick start
# on 127.0.0.1:2525), delivers one message through it (exim -odi).
#   scripts/check-exim.sh [DKIMGW_ADDR]
set -euo pipefail
cd "$(dirname "$0")/.."
snippet=$PWD/deploy/exim/dkimgw.conf
work=$(mktemp -d /tmp/dkimgw-exim.XXXXXX)
trap 'rm -rf "$work"' EXIT
[ "$(id -u)" -eq 0 ] || { echo "check-exim: run as root (unshare -m)" >&2; exit 1; }
chmod 755 "$work"
cd "$work"
apt-get download -q exim4-daemon-light libidn12 >/dev/null 2>&1
for f in *.deb; do dpkg -x "$f" root; done
addr=${1:-127.0.0.1:10025}
mkdir -p spool log && chmod 777 spool log
{
  echo "keep_environment ="
  echo "domainlist local_domains = @"
  echo "primary_hostname = exim.example.net"
  echo "spool_directory = $work/spool"
  echo "log_file_path = $work/log/%slog"
  echo "exim_user = nobody"
  echo "exim_group = nogroup"
  echo "never_users = root"
  echo "begin routers"
  sed -n '/^# routers/,/^# transports/p' "$snippet" | sed '$d' | sed "s/127.0.0.1::10025/${addr/:/::}/"
  echo "begin transports"
  sed -n '/^# transports/,$p' "$snippet"
} > exim.conf
cp /etc/passwd passwd && echo 'Debian-exim:x:65534:65534::/nonexistent:/usr/sbin/nologin' >> passwd
cp /etc/group group && echo 'Debian-exim:x:65534:' >> group
printf 'From: Me <me@example.com>\nTo: you@example.net\nSubject: via exim\n\nHello from Exim.\n' > msg.eml
run() {
  unshare -m sh -c "mount --bind $work/passwd /etc/passwd && mount --bind $work/group /etc/group &&
    mount -t overlay overlay -o lowerdir=$work/root/usr/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu &&
    mount --bind $work/root/usr/sbin /usr/sbin && $*"
}
run /usr/sbin/exim4 -C "$work/exim.conf" -bV | grep -E '^Exim version|^Configuration file'
run /usr/sbin/exim4 -C "$work/exim.conf" -bt you@example.net
if [ $# -gt 0 ]; then
  run /usr/sbin/exim4 -C "$work/exim.conf" -odi -f me@example.com you@example.net < msg.eml
  grep -h '=>\|==\|\*\*' log/mainlog
  grep -q ' => you@example.net R=dkimgw T=dkimgw_smtp' log/mainlog
fi
