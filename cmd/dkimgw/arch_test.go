package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestDependenciesPointDown enforces the package graph of docs/architecture.md: only the
// command wires the token and DNS in; the signer, the relay, the policy
// and the rotation logic know crypto.Signer and their own small
// interfaces, never PKCS#11 or DNS libraries.
func TestDependenciesPointDown(t *testing.T) {
	forbidden := []string{
		"github.com/dkimgw/dkimgw/hsm",
		"github.com/dkimgw/dkimgw/dnspub",
		"github.com/dkimgw/dkimgw/cmd/dkimgw",
		"github.com/miekg/pkcs11",
		"github.com/miekg/dns",
		"github.com/ThalesGroup/crypto11",
	}
	for _, pkg := range []string{"signer", "policy", "smtpproxy", "rotation", "rotation/etcdstore", "audit", "milter"} {
		if _, err := os.Stat(filepath.Join("..", "..", pkg)); err != nil {
			continue // not written yet
		}
		path := "github.com/dkimgw/dkimgw/" + pkg
		out, err := exec.Command("go", "list", "-deps", path).CombinedOutput()
		if err != nil {
			t.Fatalf("go list -deps %s: %v\n%s", path, err, out)
		}
		for dep := range strings.FieldsSeq(string(out)) {
			for _, f := range forbidden {
				if dep == f {
					t.Errorf("%s depends on %s", path, f)
				}
			}
		}
	}
}

// TestDNSNameIsALeaf: dnsname is the one definition of names that policy,
// signer and hsm share, so it must import none of them.
func TestDNSNameIsALeaf(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/dkimgw/dkimgw/dnsname").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	for dep := range strings.FieldsSeq(string(out)) {
		if strings.HasPrefix(dep, "github.com/dkimgw/dkimgw/") && dep != "github.com/dkimgw/dkimgw/dnsname" {
			t.Errorf("dnsname depends on %s", dep)
		}
	}
}
