package main

import (
	"bytes"
	"context"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/dkimgw/dkimgw/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// result is what one in-process `dkimgw` run printed and returned.
type result struct {
	code           int
	stdout, stderr string
}

// runCLI runs dkimgw in-process with args, stdin and an environment of
// its own (nothing leaks in from the test process's environment).
func runCLI(t *testing.T, env map[string]string, stdin string, args ...string) result {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), args, &cli{
		stdin:  strings.NewReader(stdin),
		stdout: &stdout,
		stderr: &stderr,
		getenv: func(k string) string { return env[k] },
	})
	return result{code, stdout.String(), stderr.String()}
}

// TestVersion checks that `dkimgw version` and `--version` print the
// version, the commit lines and the Go version, and that the top-level
// help lists --version.
func TestVersion(t *testing.T) {
	for _, arg := range []string{"version", "--version"} {
		r := runCLI(t, nil, "", arg)
		if r.code != exitOK {
			t.Fatalf("%s: exit %d: %s", arg, r.code, r.stderr)
		}
		for _, want := range []string{"dkimgw ", "\ncommit: ", "\ncommit date: ", "\ngo: " + runtime.Version() + "\n"} {
			if !strings.Contains(r.stdout, want) {
				t.Errorf("%s: output %q lacks %q", arg, r.stdout, want)
			}
		}
	}
	if r := runCLI(t, nil, "", "help"); !strings.Contains(r.stdout, "--version") {
		t.Errorf("help does not list --version:\n%s", r.stdout)
	}
}

// TestHelpSpellsFlagsOneWay checks that every flag list in --help spells
// flags --name, as the usage lines and docs/cli.md do.
func TestHelpSpellsFlagsOneWay(t *testing.T) {
	for _, args := range [][]string{
		{"init"}, {"keys", "generate"}, {"keys", "list"}, {"keys", "dns"}, {"keys", "destroy"}, {"sign"},
		{"serve"}, {"config", "check"}, {"rotate"}, {"dns", "pending"}, {"dns", "check"},
		{"audit"}, {"audit", "verify-log"}, {"audit", "export-key"},
	} {
		r := runCLI(t, nil, "", append(args, "--help")...)
		_, flags, ok := strings.Cut(r.stdout, "\nflags:\n")
		if r.code != exitOK || !ok {
			t.Errorf("%v --help: exit %d, no flag list:\n%s", args, r.code, r.stdout)
			continue
		}
		for line := range strings.SplitSeq(flags, "\n") {
			if strings.HasPrefix(line, "  -") && !strings.HasPrefix(line, "  --") {
				t.Errorf("%v --help lists a flag as %q", args, line)
			}
		}
	}
}

// TestDefaultConfigMissing: a command run without --config on a machine
// that has no /etc/dkimgw/dkimgw.yaml says that it read the default and
// how to name another file, instead of only "no such file".
func TestDefaultConfigMissing(t *testing.T) {
	if _, err := os.Stat(defaultConfig); err == nil {
		t.Skipf("this machine has %s", defaultConfig)
	}
	for _, args := range [][]string{{"config", "check"}, {"serve"}, {"rotate", "status"}} {
		r := runCLI(t, nil, "", args...)
		if r.code != exitConfig || !strings.Contains(r.stderr, "give --config FILE") {
			t.Errorf("dkimgw %s: exit %d, stderr %q; want %d and a hint to give --config", strings.Join(args, " "), r.code, r.stderr, exitConfig)
		}
	}
}
