package testenv

import (
	"bufio"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
)

// NameCase is one line of dnsname/testdata/names.txt: a domain (checked
// with selector "s1") or a selector (checked with domain "example.com"),
// and its normal form, or "" when it must be refused.
type NameCase struct {
	Kind string // "domain" or "selector"
	Name string
	Want string // "" when invalid
}

// Valid reports whether the name must be accepted.
func (c NameCase) Valid() bool { return c.Want != "" }

// Key returns the (domain, selector) pair the case stands for.
func (c NameCase) Key() (domain, selector string) {
	if c.Kind == "domain" {
		return c.Name, "s1"
	}
	return "example.com", c.Name
}

// WantKey returns the normal form of Key, for a valid case.
func (c NameCase) WantKey() (domain, selector string) {
	if c.Kind == "domain" {
		return c.Want, "s1"
	}
	return "example.com", c.Want
}

// NameCases reads the one table of good and bad DKIM names that dnsname,
// policy, signer and hsm are all tested against.
func NameCases(t testing.TB) []NameCase {
	t.Helper()
	_, self, _, _ := runtime.Caller(0)
	path := filepath.Join(filepath.Dir(self), "..", "dnsname", "testdata", "names.txt")
	f, err := os.Open(path)
	if err != nil {
		t.Fatalf("name table: %v", err)
	}
	defer f.Close()
	var cases []NameCase
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		kind, rest, _ := strings.Cut(line, " ")
		rest = strings.TrimSpace(rest)
		name, err := strconv.QuotedPrefix(rest)
		if err != nil {
			t.Fatalf("%s:%d: %v", path, n, err)
		}
		c := NameCase{Kind: kind}
		c.Name, _ = strconv.Unquote(name)
		if want := strings.TrimSpace(rest[len(name):]); want != "-" {
			if c.Want, err = strconv.Unquote(want); err != nil || c.Want == "" {
				t.Fatalf("%s:%d: normal form %s: want a quoted name or -", path, n, want)
			}
		}
		if kind != "domain" && kind != "selector" {
			t.Fatalf("%s:%d: kind %q: want domain or selector", path, n, kind)
		}
		cases = append(cases, c)
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("name table: %v", err)
	}
	if len(cases) < 20 {
		t.Fatalf("name table %s has only %d cases", path, len(cases))
	}
	return cases
}
