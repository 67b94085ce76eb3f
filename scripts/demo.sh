#!/usr/bin/env bash
# make demo: dkimgw end to end on this machine, nothing outside loopback.
#
#   1. a SoftHSM token; `dkimgw init` checks it, generates an RSA-2048 and
#      an Ed25519 key in it and writes the configuration and PIN file
#   2. their records published in a real BIND serving demo.example
#   3. `dkimgw sign` of a campaign message, verified through that DNS
#   4. `dkimgw serve` with a capture upstream: an SMTP client relays a
#      message through it, and the signed message, stored where a real
#      upstream MTA would have received it, verifies through DNS; then a
#      graceful SIGTERM
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
DOMAIN=demo.example

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
lib_workdir dkimgw-demo

say "1. A SoftHSM token; dkimgw init generates the keys inside it and writes the configuration"
softhsm_token dkimgw-demo 4321
export DKIMGW_HSM=$URI
echo "DKIMGW_HSM=$DKIMGW_HSM"
smtp_port=$(free_port)
mkdir -m 700 "$work/capture"
month=$(date -u +%Y%m)
RSA=rsa$month ED=ed$month
set -x
"$BIN" init --yes --domain $DOMAIN --upstream "capture:$work/capture" --listen "127.0.0.1:$smtp_port" \
  --dir "$work/etc" --data-dir "$work/data" > "$work/init.out"
{ set +x; } 2>/dev/null
sed 's/^/  /' "$work/init.out"
grep ' IN TXT ' "$work/init.out" > "$work/records.zone"
set -x
"$BIN" keys list
{ set +x; } 2>/dev/null
echo "pkcs11-tool's own view of the private keys:"
pkcs11-tool --module /usr/lib/softhsm/libsofthsm2.so --token-label dkimgw-demo --login --pin 4321 --list-objects --type privkey 2>/dev/null | sed 's/^/  /'

say "2. The records, published by a real BIND on loopback"
dns_port=$(free_port)
mkdir "$work/named"
cat > "$work/named/$DOMAIN.zone" <<ZONE
\$ORIGIN $DOMAIN.
\$TTL 300
@  IN SOA ns.$DOMAIN. hostmaster.$DOMAIN. 1 3600 600 86400 300
@  IN NS  ns.$DOMAIN.
ns IN A   127.0.0.1
$(cat "$work/records.zone")
ZONE
cat > "$work/named/named.conf" <<CONF
options {
  directory "$work/named";
  pid-file "$work/named/named.pid";
  session-keyfile "$work/named/session.key";
  managed-keys-directory "$work/named";
  listen-on port $dns_port { 127.0.0.1; };
  listen-on-v6 { none; };
  recursion no;
};
controls { };
zone "$DOMAIN" { type primary; file "$work/named/$DOMAIN.zone"; };
CONF
named-checkzone $DOMAIN "$work/named/$DOMAIN.zone" | sed 's/^/  /'
named -g -c "$work/named/named.conf" > "$work/named/named.log" 2>&1 &
pids+=($!)
wait_port "$dns_port" named $! || { cat "$work/named/named.log"; exit 1; }
for _ in $(seq 50); do dig +short -p "$dns_port" @127.0.0.1 $ED._domainkey.$DOMAIN TXT | grep -q DKIM1 && break; sleep 0.1; done
dig +short -p "$dns_port" @127.0.0.1 $RSA._domainkey.$DOMAIN TXT | sed 's/^/  /'
dig +short -p "$dns_port" @127.0.0.1 $ED._domainkey.$DOMAIN TXT | sed 's/^/  /'

say "3. dkimgw sign, dual-signed, verified through that DNS"
cat > "$work/campaign.eml" <<'MSG'
From: "Demo News" <news@demo.example>
To: reader@example.net
Subject: =?UTF-8?Q?November_offers_=E2=9C=93?=
Date: Mon, 30 Nov 2026 10:00:00 +0000
Message-ID: <demo-1@demo.example>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
List-Unsubscribe: <https://demo.example/u/1>, <mailto:unsub@demo.example?subject=1>
List-Unsubscribe-Post: List-Unsubscribe=One-Click

Hello reader,

this message was signed inside a PKCS#11 token.
.a line that starts with a dot
MSG
set -x
"$BIN" sign --domain $DOMAIN --selector $RSA --selector $ED --expire 7d < "$work/campaign.eml" > "$work/campaign.signed.eml"
{ set +x; } 2>/dev/null
sed -n '/^DKIM-Signature/,/^From:/p' "$work/campaign.signed.eml" | sed '$d' | sed 's/^/  /'
"$PY" scripts/demo-verify.py 127.0.0.1 "$dns_port" "$work/campaign.signed.eml"
perl scripts/demo-verify.pl 127.0.0.1 "$dns_port" "$work/campaign.signed.eml"
echo "From a domain it may not sign:"
sed 's/news@demo.example/news@other.example/' "$work/campaign.eml" | "$BIN" sign --domain $DOMAIN --selector $RSA >/dev/null || echo "  refused, exit status $?"

say "4. dkimgw serve, with a capture upstream: signed messages are stored, not delivered"
# init's configuration, with the admin listener on a free port.
echo 'admin: {listen: "127.0.0.1:0"}   # /metrics, /healthz, /readyz (the log says where)' >> "$work/etc/dkimgw.yaml"
sed 's/^/  /' "$work/etc/dkimgw.yaml"
set -x
"$BIN" config check --config "$work/etc/dkimgw.yaml"
{ set +x; } 2>/dev/null
"$BIN" serve --config "$work/etc/dkimgw.yaml" 2> "$work/serve.log" &
serve_pid=$!
pids+=($serve_pid)
wait_port "$smtp_port" "dkimgw serve" $serve_pid || { cat "$work/serve.log"; exit 1; }
echo "swaks sends the campaign message through dkimgw:"
swaks --server 127.0.0.1 --port "$smtp_port" --from news@$DOMAIN --to reader@example.net \
  --data "@$work/campaign.eml" 2>&1 | grep -E '^(<-|<\*\*| ->) +(MAIL|RCPT|DATA|[0-9]{3} [0-9])' | sed 's/^/  /' || true
dump=$(ls "$work"/capture/*.eml | head -1)
echo "the message as it would have gone upstream ($(basename "$dump"), stored before the 250), verified through DNS:"
"$PY" scripts/demo-verify.py 127.0.0.1 "$dns_port" "$dump"
perl scripts/demo-verify.pl 127.0.0.1 "$dns_port" "$dump"
echo "a From domain this client may not use is refused, nothing relayed:"
swaks --server 127.0.0.1 --port "$smtp_port" --from x@other.example --to reader@example.net \
  --header "From: x@other.example" 2>&1 | grep -E '^(<-|<\*\*| ->) +(MAIL|RCPT|DATA|[0-9]{3} [0-9])' | sed 's/^/  /' || true
echo "  messages in the capture directory: $(ls "$work"/capture | wc -l) (the refused one is not among them)"
echo "dkimgw's transaction log:"
grep 'msg=transaction' "$work/serve.log" | sed 's/^/  /'
echo "SIGTERM: dkimgw finishes what is in flight and exits"
kill -TERM $serve_pid
wait $serve_pid && echo "  dkimgw serve exited with status 0"
tail -2 "$work/serve.log" | sed 's/^/  /'
say "done: keys stayed in the token, every signature verified through DNS"
