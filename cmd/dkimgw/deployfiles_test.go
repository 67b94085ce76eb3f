package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/testenv"
)

// TestDockerCompose validates docker-compose.yml with docker-compose
// (no engine needed), with and without the multi profile, and checks
// that every file it mounts or builds from is in the repository.
func TestDockerCompose(t *testing.T) {
	compose := testenv.Require(t, "docker-compose")[0]
	for _, args := range [][]string{{"config", "-q"}, {"--profile", "multi", "config", "-q"}} {
		cmd := exec.CommandContext(t.Context(), compose, append([]string{"-f", "docker-compose.yml"}, args...)...)
		cmd.Dir = repoRoot
		if out, err := cmd.CombinedOutput(); err != nil || len(out) > 0 {
			t.Errorf("docker-compose %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	data, err := os.ReadFile(filepath.Join(repoRoot, "docker-compose.yml"))
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Services map[string]struct {
			Build   any      `yaml:"build"`
			Volumes []string `yaml:"volumes"`
		} `yaml:"services"`
	}
	if err := yaml.Unmarshal(data, &f); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"init", "dkimgw", "postfix", "bind", "mailpit", "prometheus", "grafana", "etcd", "dkimgw-a", "dkimgw-b"} {
		if _, ok := f.Services[want]; !ok {
			t.Errorf("docker-compose.yml has no service %s", want)
		}
	}
	mounts := 0
	for name, s := range f.Services {
		if b, ok := s.Build.(string); ok {
			if _, err := os.Stat(filepath.Join(repoRoot, b, "Dockerfile")); err != nil {
				t.Errorf("service %s builds from %s, which has no Dockerfile", name, b)
			}
		}
		for _, v := range s.Volumes {
			src, _, _ := strings.Cut(v, ":")
			if !strings.HasPrefix(src, ".") {
				continue // a named volume
			}
			mounts++
			if !strings.HasPrefix(src, "./deploy/") {
				t.Errorf("service %s mounts %s: keep what the compose mounts in deploy/", name, src)
			}
			if _, err := os.Stat(filepath.Join(repoRoot, src)); err != nil {
				t.Errorf("service %s mounts %s: %v", name, src, err)
			}
		}
	}
	if mounts < 8 {
		t.Errorf("found only %d mounts of repository files", mounts)
	}
}

// TestComposeGatewayConfig: the configuration the compose's gateway runs
// with is valid and draws no warning but the admin listener's.
func TestComposeGatewayConfig(t *testing.T) {
	cfg, err := policy.Load(filepath.Join(repoRoot, "deploy", "compose", "dkimgw.yaml"))
	if err != nil {
		t.Fatalf("deploy/compose/dkimgw.yaml: %v", err)
	}
	for _, w := range cfg.Warnings {
		if !strings.Contains(w, "admin.listen") {
			t.Errorf("deploy/compose/dkimgw.yaml: warning %s", w)
		}
	}
	if err := checkRotation(cfg); err != nil {
		t.Errorf("deploy/compose/dkimgw.yaml: rotation: %v", err)
	}
}

// TestPrometheusConfig checks the compose's Prometheus configuration,
// with the alert rules it loads.
func TestPrometheusConfig(t *testing.T) {
	promtool := testenv.Require(t, "promtool")[0]
	cmd := exec.CommandContext(t.Context(), promtool, "check", "config", "prometheus.yml")
	cmd.Dir = alertsDir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("promtool check config deploy/prometheus/prometheus.yml: %v\n%s", err, out)
	}
}

// TestSystemdUnit checks deploy/dkimgw.service with systemd-analyze
// verify, which needs no running systemd. verify insists that ExecStart's
// binary exists, so a copy names an existing executable instead of
// /usr/local/bin/dkimgw; any complaint (even an ignored unknown key)
// fails the test.
func TestSystemdUnit(t *testing.T) {
	analyze := testenv.Require(t, "systemd-analyze")[0]
	unit, err := os.ReadFile(filepath.Join(repoRoot, "deploy", "dkimgw.service"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/var/lib/dkimgw", "PrivateTmp=yes",
		"User=dkimgw", "#Environment=SOFTHSM2_CONF=", "ExecReload=/bin/kill -HUP $MAINPID",
		"ExecStart=/usr/local/bin/dkimgw serve --config /etc/dkimgw/dkimgw.yaml",
	} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("deploy/dkimgw.service lacks %q", want)
		}
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "dkimgw.service")
	if err := os.WriteFile(path, []byte(strings.ReplaceAll(string(unit), "/usr/local/bin/dkimgw", self)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(t.Context(), analyze, "verify", "--man=no", path).CombinedOutput()
	if err != nil || len(out) > 0 {
		t.Errorf("systemd-analyze verify deploy/dkimgw.service: %v\n%s", err, out)
	}
}

// TestTokenSystemdUnit checks deploy/dkimgw-token.service (p11-kit server
// in front of SoftHSM, docs/operations.md) with systemd-analyze verify,
// and that it keeps the socket, user and environment the documentation
// and dkimgw.service name.
func TestTokenSystemdUnit(t *testing.T) {
	found := testenv.Require(t, "systemd-analyze", "/usr/bin/p11-kit")
	unit, err := os.ReadFile(filepath.Join(repoRoot, "deploy", "dkimgw-token.service"))
	if err != nil {
		t.Fatal(err)
	}
	gw, err := os.ReadFile(filepath.Join(repoRoot, "deploy", "dkimgw.service"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"ExecStart=/usr/bin/p11-kit server -f -u dkimgw -g dkimgw -n /run/dkimgw-token/pkcs11.sock --provider /usr/lib/softhsm/libsofthsm2.so pkcs11:token=dkim",
		"Environment=SOFTHSM2_CONF=/etc/dkimgw-token/softhsm2.conf", "RuntimeDirectory=dkimgw-token",
		"CapabilityBoundingSet=CAP_CHOWN", "Before=dkimgw.service",
	} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("deploy/dkimgw-token.service lacks %q", want)
		}
	}
	if want := "#Environment=P11_KIT_SERVER_ADDRESS=unix:path=/run/dkimgw-token/pkcs11.sock"; !strings.Contains(string(gw), want) {
		t.Errorf("deploy/dkimgw.service lacks %q", want)
	}
	path := filepath.Join(t.TempDir(), "dkimgw-token.service")
	if err := os.WriteFile(path, unit, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(t.Context(), found[0], "verify", "--man=no", path).CombinedOutput()
	if err != nil || len(out) > 0 {
		t.Errorf("systemd-analyze verify deploy/dkimgw-token.service: %v\n%s", err, out)
	}
}

// TestDockerfile: the image is built with the Go version go.mod asks for,
// and keeps the shape the documentation describes.
func TestDockerfile(t *testing.T) {
	df, err := os.ReadFile(filepath.Join(repoRoot, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	mod, err := os.ReadFile(filepath.Join(repoRoot, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindSubmatch(mod)
	if m == nil {
		t.Fatal("go.mod has no go line")
	}
	for _, want := range []string{
		"FROM golang:" + string(m[1]) + "-bookworm AS build", "FROM debian:12-slim", "softhsm2",
		"USER dkimgw", `VOLUME ["/var/lib/dkimgw", "/var/lib/softhsm/tokens"]`, `ENTRYPOINT ["dkimgw", "serve"]`,
	} {
		if !strings.Contains(string(df), want) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
}

// TestDockerfileModDownload: the build stage runs `go mod download` before
// it copies the whole source (so that the module layer is cached), with
// only what the COPY lines above it bring; go.mod's replace lines name
// directories (third_party), which must be among them. Replayed here:
// those COPY lines into an empty directory, then go mod download.
func TestDockerfileModDownload(t *testing.T) {
	goBin := testenv.Require(t, "go")[0]
	df, err := os.ReadFile(filepath.Join(repoRoot, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	found := false
	for line := range strings.Lines(string(df)) {
		f := strings.Fields(line)
		if len(f) == 4 && strings.Join(f, " ") == "RUN go mod download" {
			found = true
			break
		}
		if len(f) < 3 || f[0] != "COPY" || strings.HasPrefix(f[1], "--") {
			continue
		}
		srcs, dst := f[1:len(f)-1], filepath.Join(dir, f[len(f)-1])
		for _, src := range srcs {
			from := filepath.Join(repoRoot, src)
			st, err := os.Stat(from)
			if err != nil {
				t.Fatalf("Dockerfile copies %s: %v", src, err)
			}
			if st.IsDir() { // COPY DIR DST copies DIR's contents into DST
				err = os.CopyFS(dst, os.DirFS(from))
			} else {
				var data []byte
				if data, err = os.ReadFile(from); err == nil {
					err = os.WriteFile(filepath.Join(dst, filepath.Base(src)), data, 0o644)
				}
			}
			if err != nil {
				t.Fatalf("copy %s as the Dockerfile does: %v", src, err)
			}
		}
	}
	if !found {
		t.Fatal("Dockerfile has no `RUN go mod download` line")
	}
	cmd := exec.CommandContext(t.Context(), goBin, "mod", "download")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go mod download with what the Dockerfile copies before it: %v\n%s", err, out)
	}
}

// TestComposePostfixConfig: postconf reads the compose's main.cf without a
// warning (a misspelt parameter is "unused", and Postfix would ignore it).
func TestComposePostfixConfig(t *testing.T) {
	postconf := testenv.Require(t, "/usr/sbin/postconf")[0]
	dir := t.TempDir()
	for src, dst := range map[string]string{filepath.Join(repoRoot, "deploy", "postfix", "main.cf"): "main.cf", "/etc/postfix/master.cf": "master.cf"} {
		data, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, dst), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.CommandContext(t.Context(), postconf, "-c", dir, "-n")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil || stderr.Len() > 0 {
		t.Fatalf("postconf -n deploy/postfix/main.cf: %v\n%s", err, stderr.String())
	}
	if !strings.Contains(string(out), "relayhost = [dkimgw]:10025") {
		t.Errorf("postconf -n shows no relayhost:\n%s", out)
	}
}

// TestMakeInstall: `make install` builds, then installs bin/dkimgw as
// $(DESTDIR)$(PREFIX)/bin/dkimgw (checked with make -n: nothing is built
// or installed by the test).
func TestMakeInstall(t *testing.T) {
	mk := testenv.Require(t, "make")[0]
	cmd := exec.CommandContext(t.Context(), mk, "-n", "-C", repoRoot, "install", "DESTDIR=/pkgroot", "PREFIX=/opt/dkimgw")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make -n install: %v\n%s", err, out)
	}
	build := strings.Index(string(out), "build")
	inst := strings.Index(string(out), "install -m 0755 bin/dkimgw /pkgroot/opt/dkimgw/bin/dkimgw")
	if build < 0 || inst < 0 || build > inst {
		t.Errorf("make -n install does not build and then install to $(DESTDIR)$(PREFIX)/bin:\n%s", out)
	}
}

// TestLicense: the full Apache-2.0 text, not a pointer to it.
func TestLicense(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(repoRoot, "LICENSE"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Apache License", "Version 2.0, January 2004", "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION", "END OF TERMS AND CONDITIONS", "APPENDIX: How to apply the Apache License to your work."} {
		if !strings.Contains(string(data), want) {
			t.Errorf("LICENSE lacks %q", want)
		}
	}
}
