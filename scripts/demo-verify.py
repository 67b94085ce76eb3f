#!/usr/bin/python3
"""Verifies every DKIM-Signature of a message with dkimpy, looking the keys
up in DNS at a given server (the demo's BIND), and says what it found.

usage: demo-verify.py SERVER PORT MESSAGE
"""
import sys

import dkim
import dns.resolver


def main():
    server, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server]
    resolver.port = port

    def dnsfunc(name, timeout=5):
        answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        return b"".join(b"".join(rr.strings) for rr in answer)

    with open(path, "rb") as f:
        msg = f.read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    d = dkim.DKIM(msg)
    sigs = [v for (k, v) in d.headers if k.lower() == b"dkim-signature"]
    if not sigs:
        print("  dkimpy: no DKIM-Signature")
        return 1
    failed = 0
    for i, sig in enumerate(sigs):
        tags = dict(t.strip().split(b"=", 1) for t in sig.replace(b"\r\n", b"").split(b";") if b"=" in t)
        ok = d.verify(idx=i, dnsfunc=dnsfunc)
        print("  dkimpy: signature %d (a=%s, d=%s, s=%s): %s" % (
            i + 1, tags[b"a"].strip().decode(), tags[b"d"].strip().decode(), tags[b"s"].strip().decode(),
            "pass" if ok else "FAIL"))
        failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
