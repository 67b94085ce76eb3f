#!/usr/bin/env bash
# Installs the Debian packages dkimgw's tests, benchmarks and demo run
# against, when any is missing. Idempotent: with everything present it
# only checks and exits.
set -euo pipefail

packages=(
  softhsm2            # the PKCS#11 token of tests and the demo
  opensc              # pkcs11-tool: an independent look at token objects
  p11-kit             # p11-kit server: the token in a process of its own, behind a Unix socket
  p11-kit-modules     # p11-kit-client.so: the module dkimgw loads to reach that server
  python3-dkim        # dkimpy, independent verifier
  python3-nacl        # dkimpy's Ed25519
  libmail-dkim-perl   # Perl Mail::DKIM, independent verifier
  opendkim            # OpenDKIM, independent verifier (opendkim -t)
  opendkim-tools
  postfix             # a real MTA relaying through dkimgw; smtp-source/smtp-sink
  swaks               # SMTP client for the demo
  bind9               # a real authoritative server for DNS updates
  bind9-dnsutils      # dig, nsupdate
  bind9-utils         # named-checkzone
  knot                # Knot DNS, the second authoritative server for DNS updates
  knot-dnsutils       # kdig, knsupdate: an independent look at a Knot zone
  etcd-server         # etcd: the shared rotation state of several gateways (three members in tests)
  etcd-client         # etcdctl: endpoint health, an independent look at the store
  time                # /usr/bin/time -v for peak RSS in benchmarks
  openssl             # openssl speed, the raw-crypto baseline in benchmarks
  prometheus          # promtool: checks and unit-tests deploy/prometheus/dkimgw-alerts.yml
  gcc                 # builds the fault suite's PKCS#11 fault-injection shim
  libc6-dev           # its C headers
  docker-compose      # validates docker-compose.yml (docker-compose config -q; no engine needed)
  systemd             # systemd-analyze verify checks deploy/dkimgw.service
)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$status" = installed ] || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing Debian packages: ${missing[*]}" >&2
  echo "install-deps: run as root, or: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
