package main

import (
	"bytes"
	"context"
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
