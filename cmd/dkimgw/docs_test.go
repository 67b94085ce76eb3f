package main

import (
	"bytes"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/dkimgw/dkimgw/testenv"
)

const (
	repoRoot      = "../.."
	minimalConfig = "../../deploy/minimal.yaml"
)

// fencedBlocks returns the fenced code blocks of a Markdown text whose
// info string is lang ("" for any), in order.
func fencedBlocks(md, lang string) []string {
	var blocks []string
	var cur *strings.Builder
	for _, line := range strings.SplitAfter(md, "\n") {
		trimmed := strings.TrimSpace(line)
		if cur == nil {
			if strings.HasPrefix(trimmed, "```") && (lang == "" || strings.TrimPrefix(trimmed, "```") == lang) {
				cur = &strings.Builder{}
			}
			continue
		}
		if trimmed == "```" {
			blocks = append(blocks, cur.String())
			cur = nil
			continue
		}
		cur.WriteString(line)
	}
	return blocks
}

// TestREADMEMinimalConfig: the README's minimal configuration is
// deploy/minimal.yaml byte for byte, and `config check` accepts that file
// as printed, with the token, key and PIN variable of the quick start.
func TestREADMEMinimalConfig(t *testing.T) {
	readme, err := os.ReadFile(readmePath)
	if err != nil {
		t.Fatal(err)
	}
	file, err := os.ReadFile(minimalConfig)
	if err != nil {
		t.Fatal(err)
	}
	yamls := fencedBlocks(string(readme), "yaml")
	if len(yamls) == 0 || yamls[0] != string(file) {
		t.Fatalf("the README's first yaml block is not deploy/minimal.yaml:\n--- README\n%s--- file\n%s", strings.Join(yamls[:min(1, len(yamls))], ""), file)
	}
	if lines := bytes.Count(file, []byte("\n")); lines > 20 {
		t.Errorf("the minimal configuration has %d lines; keep it about a dozen", lines)
	}

	st := testenv.SoftHSMLabeled(t, "try")
	if r := runCLI(t, map[string]string{hsmEnv: st.URI()}, "", "keys", "generate", "--domain", "example.com", "--selector", "try1"); r.code != 0 {
		t.Fatalf("keys generate: exit %d\n%s", r.code, r.stderr)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "dkimgw.yaml")
	if err := os.WriteFile(path, file, 0o600); err != nil {
		t.Fatal(err)
	}
	r := runCLI(t, map[string]string{"DKIMGW_PIN": st.PIN}, "", "config", "check", "--config", path)
	if r.code != 0 || !strings.Contains(r.stdout, "OK (1 clients, 1 domains, 1 keys") {
		t.Fatalf("config check of deploy/minimal.yaml: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	if r.stderr != "" {
		t.Errorf("config check of deploy/minimal.yaml warns:\n%s", r.stderr)
	}
	// Without the quick start's PIN variable it must say what is missing.
	if r := runCLI(t, nil, "", "config", "check", "--config", path); r.code == 0 || !strings.Contains(r.stderr, "DKIMGW_PIN") {
		t.Errorf("config check without DKIMGW_PIN: exit %d, stderr %q; want a failure naming DKIMGW_PIN", r.code, r.stderr)
	}
}

var (
	mdLink      = regexp.MustCompile(`\[[^\]]*\]\(([^)\s]+)\)`)
	htmlComment = regexp.MustCompile(`(?s)<!--.*?-->`)
	codeSpan    = regexp.MustCompile("`[^`\n]*`")
	heading     = regexp.MustCompile(`(?m)^#{1,6} +(.+)$`)
	// The only places outside the repository a document may send readers:
	// the RFCs.
	externalOK = regexp.MustCompile(`^https://(www\.rfc-editor\.org/rfc/rfc\d+|datatracker\.ietf\.org/doc/html/rfc\d+)`)
)

// anchors are the GitHub-style anchors of a Markdown file's headings.
func anchors(md string) map[string]bool {
	md = strings.Join(removeFenced(md), "")
	out := map[string]bool{}
	for _, m := range heading.FindAllStringSubmatch(md, -1) {
		var b strings.Builder
		for _, r := range strings.ToLower(strings.TrimSpace(m[1])) {
			switch {
			case r == ' ':
				b.WriteRune('-')
			case r == '-' || r == '_' || r >= 'a' && r <= 'z' || r >= '0' && r <= '9':
				b.WriteRune(r)
			}
		}
		out[b.String()] = true
	}
	return out
}

// removeFenced returns the lines of md outside fenced code blocks.
func removeFenced(md string) []string {
	var out []string
	in := false
	for _, line := range strings.SplitAfter(md, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			in = !in
			continue
		}
		if !in {
			out = append(out, line)
		}
	}
	return out
}

// TestDocLinks walks README.md and docs/*.md: every relative link names a
// file (and heading) that exists inside the repository, no link leaves
// the repository but to an RFC, and nothing points at files beside it.
func TestDocLinks(t *testing.T) {
	docs, err := filepath.Glob(filepath.Join(repoRoot, "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	docs = append(docs, filepath.Join(repoRoot, "README.md"))
	root, err := filepath.Abs(repoRoot)
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, doc := range docs {
		data, err := os.ReadFile(doc)
		if err != nil {
			t.Fatal(err)
		}
		name, _ := filepath.Rel(root, mustAbs(t, doc))
		if strings.Contains(string(data), "../shared") || strings.Contains(string(data), "/work/") {
			t.Errorf("%s refers to files outside the repository (../shared or /work/)", name)
		}
		text := htmlComment.ReplaceAllString(strings.Join(removeFenced(string(data)), ""), "")
		text = codeSpan.ReplaceAllStringFunc(text, func(s string) string {
			if strings.Contains(s, "](") {
				return s
			}
			return ""
		})
		for _, m := range mdLink.FindAllStringSubmatch(text, -1) {
			target := m[1]
			checked++
			if u, err := url.Parse(target); err == nil && u.Scheme != "" {
				if !externalOK.MatchString(target) {
					t.Errorf("%s: link %s leaves the repository", name, target)
				}
				continue
			}
			file, frag, _ := strings.Cut(target, "#")
			path := mustAbs(t, doc)
			if file != "" {
				path = filepath.Join(filepath.Dir(path), filepath.FromSlash(file))
				if rel, err := filepath.Rel(root, path); err != nil || strings.HasPrefix(rel, "..") {
					t.Errorf("%s: link %s leaves the repository", name, target)
					continue
				}
				if _, err := os.Stat(path); err != nil {
					t.Errorf("%s: link %s: no such file in the repository", name, target)
					continue
				}
			}
			if frag != "" {
				if !strings.HasSuffix(path, ".md") {
					continue
				}
				md, err := os.ReadFile(path)
				if err != nil {
					t.Fatal(err)
				}
				if !anchors(string(md))[frag] {
					t.Errorf("%s: link %s: no heading #%s there", name, target, frag)
				}
			}
		}
	}
	if checked < 30 {
		t.Errorf("only %d links found in %d documents: is the parser broken?", checked, len(docs))
	}
}

func mustAbs(t *testing.T, p string) string {
	t.Helper()
	a, err := filepath.Abs(p)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestREADMEPostfixLines: the README's Postfix lines are the ones the
// tests' Postfix runs with (deploy/postfix/main.cf), for a dkimgw on
// 127.0.0.1:10025.
func TestREADMEPostfixLines(t *testing.T) {
	readme, err := os.ReadFile(readmePath)
	if err != nil {
		t.Fatal(err)
	}
	relay, err := testenv.PostfixRelaySettings()
	if err != nil {
		t.Fatal(err)
	}
	relay["relayhost"] = "[127.0.0.1]:10025"
	for k, v := range relay {
		if line := k + " = " + v + "\n"; !strings.Contains(string(readme), line) {
			t.Errorf("README lacks the Postfix line %q", line)
		}
	}
}

// TestREADMEEximSnippet: the README's Exim router and transport are
// deploy/exim/dkimgw.conf, the file scripts/check-exim.sh runs Exim with.
func TestREADMEEximSnippet(t *testing.T) {
	readme, err := os.ReadFile(readmePath)
	if err != nil {
		t.Fatal(err)
	}
	file, err := os.ReadFile(filepath.Join(repoRoot, "deploy", "exim", "dkimgw.conf"))
	if err != nil {
		t.Fatal(err)
	}
	blocks := fencedBlocks(string(readme), "exim")
	if len(blocks) != 1 || blocks[0] != string(file) {
		t.Errorf("the README's exim block is not deploy/exim/dkimgw.conf:\n%q", blocks)
	}
}

// TestREADMETroubleshootingMessages runs the mistakes the README's
// troubleshooting section describes and checks that it quotes what
// dkimgw prints, word for word (the token is labelled try and the
// configuration named dkimgw.yaml, as in the quick start).
func TestREADMETroubleshootingMessages(t *testing.T) {
	readme, err := os.ReadFile(readmePath)
	if err != nil {
		t.Fatal(err)
	}
	st := testenv.SoftHSMLabeled(t, "try")
	uri := func(pin string) string {
		return "pkcs11:token=try?module-path=" + st.Module + "&pin-source=" + pin
	}
	env := map[string]string{hsmEnv: uri("env:DKIMGW_PIN"), "DKIMGW_PIN": st.PIN}
	if r := runCLI(t, env, "", "keys", "generate", "--domain", "example.com", "--selector", "try1"); r.code != 0 {
		t.Fatalf("keys generate: exit %d\n%s", r.code, r.stderr)
	}
	dir := t.TempDir()
	config := filepath.Join(dir, "dkimgw.yaml")
	minimal, err := os.ReadFile(minimalConfig)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(config, minimal, 0o600); err != nil {
		t.Fatal(err)
	}
	typo := filepath.Join(dir, "typo", "dkimgw.yaml")
	if err := os.MkdirAll(filepath.Dir(typo), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(typo, bytes.Replace(minimal, []byte("  listen: \"127.0.0.1:2525\""), []byte("  lisen: \"127.0.0.1:2525\""), 1), 0o600); err != nil {
		t.Fatal(err)
	}
	msg := "From: Me <me@example.com>\r\nSubject: hello\r\n\r\nHello.\r\n"

	for _, c := range []struct {
		name  string
		env   map[string]string
		args  []string
		quote string // as the README has it
	}{
		{"wrong PIN", map[string]string{hsmEnv: uri("env:DKIMGW_PIN"), "DKIMGW_PIN": "0000"}, []string{"keys", "list"},
			`dkimgw: hsm: log in to token "try": PIN incorrect: check the pin-source; dkimgw does not retry, as tokens lock after a few wrong PINs`},
		{"PIN variable unset", nil, []string{"config", "check", "--config", config},
			`dkimgw: dkimgw.yaml: hsm.uri: hsm: pin-source env:DKIMGW_PIN: the environment variable is unset or empty`},
		{"relative PIN file", map[string]string{hsmEnv: uri("file:pin")}, []string{"keys", "list"},
			`hsm: pin-source "file:pin": want file:/absolute/path or env:NAME`},
		{"wrong label", map[string]string{hsmEnv: "pkcs11:token=nosuch?module-path=" + st.Module + "&pin-source=env:DKIMGW_PIN", "DKIMGW_PIN": st.PIN}, []string{"keys", "list"},
			`dkimgw: hsm: no such token matching pkcs11:token=`},
		{"module not found", map[string]string{hsmEnv: "pkcs11:token=try?module-path=/usr/lib/softhsm/libsofthsm.so&pin-source=env:DKIMGW_PIN", "DKIMGW_PIN": st.PIN}, []string{"keys", "list"},
			`dkimgw: hsm: PKCS#11 module not found: /usr/lib/softhsm/libsofthsm.so does not exist; install the vendor's PKCS#11 library (SoftHSM: apt-get install softhsm2) or fix module-path`},
		{"no such key", env, []string{"sign", "--domain", "example.com", "--selector", "try2"},
			`dkimgw: hsm: key not found: no private key labelled try2._domainkey.example.com in token "try"; generate one with 'dkimgw keys generate'`},
		{"unknown key", env, []string{"config", "check", "--config", typo},
			`dkimgw.yaml:6: unknown key "lisen"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := runCLI(t, c.env, msg, c.args...)
			got := strings.ReplaceAll(r.stderr, filepath.Dir(typo)+"/", "")
			got = strings.ReplaceAll(got, dir+"/", "")
			if r.code == 0 || !strings.Contains(got, c.quote) {
				t.Errorf("dkimgw %s: exit %d, stderr:\n%s\nwant it to contain %q", strings.Join(c.args, " "), r.code, got, c.quote)
			}
			if !strings.Contains(string(readme), c.quote) {
				t.Errorf("the README does not quote %q", c.quote)
			}
		})
	}
}
