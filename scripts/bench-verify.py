#!/usr/bin/python3
"""Verifies every DKIM-Signature of the given messages with dkimpy, the
keys' records taken from a file of zone-file lines (as `dkimgw keys dns`
prints them) instead of DNS. For the benchmarks' sampled check.

usage: bench-verify.py ZONE_LINES MESSAGE...
"""
import re
import sys

import dkim


def main():
    records = {}
    for line in open(sys.argv[1]):
        m = re.match(r'\s*(\S+)\s+.*?\bTXT\b(.*)', line)
        if m:
            records[m.group(1).rstrip(".").lower()] = "".join(re.findall(r'"([^"]*)"', m.group(2))).encode()

    def dnsfunc(name, timeout=5):
        return records.get(name.decode().rstrip(".").lower(), b"")

    sigs = 0
    for path in sys.argv[2:]:
        with open(path, "rb") as f:
            msg = f.read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        d = dkim.DKIM(msg)
        n = sum(1 for (k, _) in d.headers if k.lower() == b"dkim-signature")
        if n == 0:
            sys.exit(f"{path}: no DKIM-Signature")
        for i in range(n):
            if not d.verify(idx=i, dnsfunc=dnsfunc):
                sys.exit(f"{path}: signature {i + 1} of {n} does not verify (dkimpy)")
        sigs += n
    print(f"dkimpy: {sigs} signatures in {len(sys.argv) - 2} messages verify")


if __name__ == "__main__":
    main()
