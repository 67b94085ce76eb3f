#!/usr/bin/python3
"""Verifies every DKIM-Signature of a message with dkimpy (an independent
verifier, Debian package python3-dkim), taking the public keys from
zone-file lines such as `dkimgw keys generate` and `dkimgw keys dns` print,
instead of DNS: for trying dkimgw out before any record is published.

usage: verify-with-records.py MESSAGE RECORDS.zone

Exit status: 0 every signature verified; 1 a signature failed or there is
none; 2 bad usage or an unreadable file.
"""
import re
import sys

try:
    import dkim
except ImportError:
    sys.exit("verify-with-records: dkimpy is missing: apt-get install python3-dkim python3-nacl")

# name TTL IN TXT "string" "string"...
RECORD = re.compile(r'^(\S+)\s+(?:\d+\s+)?(?:IN\s+)?TXT\s+((?:"[^"]*"\s*)+)$', re.IGNORECASE)


def read_records(path):
    records = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = RECORD.match(line.strip())
            if m:
                name = m.group(1).lower().rstrip(".")
                records[name] = "".join(re.findall(r'"([^"]*)"', m.group(2))).encode()
    return records


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        records = read_records(sys.argv[2])
        with open(sys.argv[1], "rb") as f:
            msg = f.read()
    except OSError as e:
        print("verify-with-records: %s" % e, file=sys.stderr)
        return 2
    if not records:
        print("verify-with-records: %s holds no TXT record line" % sys.argv[2], file=sys.stderr)
        return 2
    msg = msg.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

    missing = []

    def dnsfunc(name, timeout=5):
        name = name.decode().lower().rstrip(".")
        if name not in records:
            missing.append(name)
        return records.get(name)

    d = dkim.DKIM(msg)
    sigs = [v for (k, v) in d.headers if k.lower() == b"dkim-signature"]
    if not sigs:
        print("dkimpy: no DKIM-Signature in %s" % sys.argv[1])
        return 1
    failed = 0
    for i, sig in enumerate(sigs):
        tags = dict(t.strip().split(b"=", 1) for t in sig.replace(b"\r\n", b"").split(b";") if b"=" in t)
        try:
            ok, why = d.verify(idx=i, dnsfunc=dnsfunc), ""
        except dkim.DKIMException as e:
            ok, why = False, ": %s" % e
        if not ok and missing:
            why = ": no record for %s in %s" % (missing[-1], sys.argv[2])
        missing.clear()
        print("dkimpy: signature %d (a=%s, d=%s, s=%s): %s%s" % (
            i + 1, tags[b"a"].strip().decode(), tags[b"d"].strip().decode(), tags[b"s"].strip().decode(),
            "pass" if ok else "FAIL", why))
        failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
