package testenv

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// InCI reports whether the tests run in CI (CI=true), where a missing
// component fails a test instead of skipping it.
func InCI() bool { return os.Getenv("CI") == "true" }

// Require checks that each component is there: a path (containing "/")
// must exist, a bare name must be on PATH. A missing one skips the test,
// or fails it when CI=true. It returns the paths found.
func Require(t testing.TB, components ...string) []string {
	t.Helper()
	found := make([]string, 0, len(components))
	for _, c := range components {
		if strings.Contains(c, "/") {
			if _, err := os.Stat(c); err != nil {
				missing(t, c, err)
			}
			found = append(found, c)
			continue
		}
		p, err := exec.LookPath(c)
		if err != nil {
			missing(t, c, err)
		}
		found = append(found, p)
	}
	return found
}

func missing(t testing.TB, component string, err error) {
	t.Helper()
	if InCI() {
		t.Fatalf("%s is missing (%v) and CI=true: `make test` installs it (see Makefile deps)", component, err)
	}
	t.Skipf("%s is missing (%v); run `make deps` to install it", component, err)
}
