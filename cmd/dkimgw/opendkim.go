package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"

	"github.com/dkimgw/dkimgw/dnsname"
)

const (
	importUsage = "milter import-opendkim --keytable FILE --signingtable [refile:]FILE [--hsm URI] [--selector-suffix S] [--networks CIDR,...] [--listen inet:HOST:PORT] [--out FILE]"
	importLong  = `
import-opendkim reads OpenDKIM's KeyTable ("name domain:selector:keyfile"
lines) and SigningTable ("pattern name" lines; with refile:, or any
pattern holding a *, the patterns are wildcards such as *@example.com or
*@*.example.com) and writes a dkimgw configuration that signs the same
From domains with the same d=: the domains, a client of --networks (the
hosts OpenDKIM signed for; default 127.0.0.1/32 and ::1/128, as OpenDKIM's
InternalHosts) allowed those domains, and a milter on --listen (default
inet:127.0.0.1:8892, beside OpenDKIM's usual 8891, so that both can run
during the switch).

It never reads or imports a key file: a key that lived in a file is
considered exposed. Each key gets a new selector (the old one plus
--selector-suffix, default "hsm"); on stderr it lists every key file it
found and the 'dkimgw keys generate' command that makes the replacement in
the token, whose output is the DNS record to publish before the switch.
Entries dkimgw cannot express (a % domain, a * pattern for every domain,
a d= that is not the From domain or a parent of it) are listed on stderr
and left out. Per-address patterns (joe@example.com) become the whole
domain: dkimgw signs by From domain.

Exit status: 0 written; 64 bad arguments; 65 a table is malformed or
nothing could be converted; 66 a table cannot be read; 73 --out cannot be
written.`
)

// openDKIMKey is one KeyTable entry.
type openDKIMKey struct {
	name, domain, selector, file string
	line                         int
}

func runImportOpenDKIM(c *cli, args []string) int {
	fs := newFlagSet(c, "milter import-opendkim")
	keyTable := fs.String("keytable", "", "OpenDKIM KeyTable `file` (file: prefix allowed)")
	signingTable := fs.String("signingtable", "", "OpenDKIM SigningTable `file` (refile: or file: prefix allowed)")
	uri := fs.String("hsm", "pkcs11:token=dkim?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/dkimgw/pin", "PKCS#11 `URI` of the token, written to hsm.uri")
	suffix := fs.String("selector-suffix", "hsm", "appended (with a dash) to each old selector to name its replacement")
	networks := fs.String("networks", "127.0.0.1/32,::1/128", "comma-separated networks of the client allowed the imported domains")
	listen := fs.String("listen", "inet:127.0.0.1:8892", "milter.listen of the written configuration")
	out := fs.String("out", "", "write the configuration to `file` (default stdout)")
	if code, ok := parseFlags(c, fs, importUsage, importLong, args); !ok {
		return code
	}
	if *keyTable == "" || *signingTable == "" {
		return failf(c, exitUsage, "milter import-opendkim: --keytable and --signingtable are required")
	}
	keyPath, _ := strings.CutPrefix(*keyTable, "file:")
	sigPath, refile := strings.CutPrefix(*signingTable, "refile:")
	sigPath, _ = strings.CutPrefix(sigPath, "file:")

	kt, err := os.ReadFile(keyPath)
	if err != nil {
		return failf(c, exitNoInput, "milter import-opendkim: KeyTable: %v", err)
	}
	st, err := os.ReadFile(sigPath)
	if err != nil {
		return failf(c, exitNoInput, "milter import-opendkim: SigningTable: %v", err)
	}
	keys, err := parseKeyTable(keyPath, kt)
	if err != nil {
		return failf(c, exitDataErr, "milter import-opendkim: %v", err)
	}

	var skipped []string
	domains := map[string][]string{} // d= → new selectors
	var clientDomains []string
	var used []*openDKIMKey
	err = eachTableLine(sigPath, st, func(line int, fields []string) error {
		if len(fields) < 2 {
			return fmt.Errorf("%s:%d: want \"pattern keyname\"", sigPath, line)
		}
		pattern, name := fields[0], fields[1]
		k := keys[name]
		if k == nil {
			return fmt.Errorf("%s:%d: key name %q is not in the KeyTable %s", sigPath, line, name, keyPath)
		}
		from, why := patternDomain(pattern, refile || strings.Contains(pattern, "*"))
		if why != "" {
			skipped = append(skipped, fmt.Sprintf("%s:%d: %s: %s", sigPath, line, pattern, why))
			return nil
		}
		if k.domain == "%" {
			skipped = append(skipped, fmt.Sprintf("%s:%d: key %s signs with d=%% (the From domain): list each domain with its own key", keyPath, k.line, name))
			return nil
		}
		if from != k.domain && !strings.HasSuffix(from, "."+k.domain) {
			skipped = append(skipped, fmt.Sprintf("%s:%d: %s is signed with d=%s, which is not its domain or a parent: dkimgw signs with d= the From domain or its nearest parent with keys", sigPath, line, pattern, k.domain))
			return nil
		}
		if !slices.Contains(clientDomains, from) {
			clientDomains = append(clientDomains, from)
		}
		sel := k.selector + "-" + *suffix
		if !slices.Contains(domains[k.domain], sel) {
			domains[k.domain] = append(domains[k.domain], sel)
			used = append(used, k)
		}
		return nil
	})
	if err != nil {
		return failf(c, exitDataErr, "milter import-opendkim: %v", err)
	}
	for _, s := range skipped {
		fmt.Fprintf(c.stderr, "dkimgw: not imported: %s\n", s)
	}
	if len(domains) == 0 {
		return failf(c, exitDataErr, "milter import-opendkim: no SigningTable entry could be converted")
	}
	// A client domain that a listed one already covers (a subdomain) is
	// redundant.
	clientDomains = slices.DeleteFunc(slices.Clone(clientDomains), func(d string) bool {
		for _, p := range clientDomains {
			if d != p && strings.HasSuffix(d, "."+p) {
				return true
			}
		}
		return false
	})
	slices.Sort(clientDomains)

	var nets []string
	for n := range strings.SplitSeq(*networks, ",") {
		if n = strings.TrimSpace(n); n != "" {
			nets = append(nets, n)
		}
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "# Written by dkimgw milter import-opendkim from %s and %s.\n", keyPath, sigPath)
	b.WriteString("# The replacement keys are generated in the token, never imported (see docs/milter.md).\n")
	fmt.Fprintf(&b, "hsm:\n  uri: %q\n", *uri)
	fmt.Fprintf(&b, "milter:\n  listen: %q\n", *listen)
	b.WriteString("clients:\n  - name: opendkim-internal-hosts\n")
	fmt.Fprintf(&b, "    networks: [%s]\n", quoteList(nets))
	fmt.Fprintf(&b, "    domains: [%s]\n", strings.Join(clientDomains, ", "))
	b.WriteString("domains:\n")
	for _, d := range slices.Sorted(maps.Keys(domains)) {
		fmt.Fprintf(&b, "  %s:\n    selectors: [%s]\n", d, strings.Join(domains[d], ", "))
	}

	fmt.Fprintln(c.stderr, "dkimgw: key files found (not read, not imported; retire them after the switch):")
	for _, k := range used {
		state := "present"
		if _, err := os.Stat(k.file); err != nil {
			state = "missing"
		}
		fmt.Fprintf(c.stderr, "  %s  (d=%s s=%s, %s)\n", k.file, k.domain, k.selector, state)
	}
	fmt.Fprintln(c.stderr, "dkimgw: generate the replacement keys in the token, then publish the records they print:")
	for _, k := range used {
		fmt.Fprintf(c.stderr, "  dkimgw keys generate --hsm %s --domain %s --selector %s-%s --algorithm rsa-2048\n", shellQuote(*uri), k.domain, k.selector, *suffix)
	}

	if *out == "" {
		if _, err := c.stdout.Write(b.Bytes()); err != nil {
			return failf(c, exitFailure, "milter import-opendkim: %v", err)
		}
		return exitOK
	}
	if err := os.WriteFile(*out, b.Bytes(), 0o640); err != nil {
		return failf(c, exitCantCreate, "milter import-opendkim: %v", err)
	}
	fmt.Fprintf(c.stderr, "dkimgw: configuration written to %s; check it with: dkimgw config check --config %s\n", *out, *out)
	return exitOK
}

// parseKeyTable reads "name domain:selector:keyfile" lines.
func parseKeyTable(path string, data []byte) (map[string]*openDKIMKey, error) {
	keys := map[string]*openDKIMKey{}
	err := eachTableLine(path, data, func(line int, fields []string) error {
		if len(fields) != 2 {
			return fmt.Errorf("%s:%d: want \"keyname domain:selector:keyfile\"", path, line)
		}
		parts := strings.SplitN(fields[1], ":", 3)
		if len(parts) != 3 || parts[0] == "" || parts[1] == "" || parts[2] == "" {
			return fmt.Errorf("%s:%d: want domain:selector:keyfile after the key name", path, line)
		}
		if !strings.HasPrefix(parts[2], "/") && !strings.HasPrefix(parts[2], "./") && !strings.HasPrefix(parts[2], "../") {
			// The key itself is in the table. Say where, never what.
			return fmt.Errorf("%s:%d: key %s holds its private key inline; dkimgw needs none of it, but move it out of the table and treat it as exposed", path, line, fields[0])
		}
		d := strings.ToLower(strings.TrimSuffix(parts[0], "."))
		if d != "%" {
			ad, err := dnsname.Domain(d)
			if err != nil {
				return fmt.Errorf("%s:%d: domain %q: %w", path, line, parts[0], err)
			}
			d = ad
		}
		sel := strings.ToLower(parts[1])
		if _, err := dnsname.Selector(sel); err != nil {
			return fmt.Errorf("%s:%d: selector %q: %w", path, line, parts[1], err)
		}
		if keys[fields[0]] != nil {
			return fmt.Errorf("%s:%d: key name %s is listed twice", path, line, fields[0])
		}
		keys[fields[0]] = &openDKIMKey{name: fields[0], domain: d, selector: sel, file: parts[2], line: line}
		return nil
	})
	return keys, err
}

// patternDomain returns the From domain a SigningTable key stands for,
// or why it cannot be expressed.
func patternDomain(p string, wildcard bool) (string, string) {
	p = strings.ToLower(p)
	if p == "*" || p == "*@*" {
		return "", "a pattern for every From domain: list the domains to sign"
	}
	_, d, hasAt := strings.Cut(p, "@")
	if !hasAt {
		d = p
	}
	// *@*.example.com, .example.com (subdomains): dkimgw's client domains
	// always include their subdomains.
	d = strings.TrimPrefix(strings.TrimPrefix(d, "*."), ".")
	if strings.ContainsAny(d, "*?[]") || (!wildcard && strings.Contains(d, "*")) {
		return "", "a wildcard inside the domain cannot be expressed"
	}
	ad, err := dnsname.Domain(d)
	if err != nil {
		return "", fmt.Sprintf("not a domain (%v)", err)
	}
	return ad, ""
}

// eachTableLine calls fn with the whitespace-separated fields of each
// line of an OpenDKIM flat file, without comments and blank lines.
func eachTableLine(path string, data []byte, fn func(line int, fields []string) error) error {
	sc := bufio.NewScanner(bytes.NewReader(data))
	n := 0
	for sc.Scan() {
		n++
		text, _, _ := strings.Cut(sc.Text(), "#")
		fields := strings.Fields(text)
		if len(fields) == 0 {
			continue
		}
		if err := fn(n, fields); err != nil {
			return err
		}
	}
	if err := sc.Err(); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

func quoteList(ss []string) string {
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = fmt.Sprintf("%q", s)
	}
	return strings.Join(q, ", ")
}

// shellQuote quotes s for a POSIX shell.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
