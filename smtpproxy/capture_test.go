package smtpproxy

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/emersion/go-smtp"
)

// captureConfig is baseConfig with a capture upstream; %s is the directory.
const captureConfig = `
hsm: {uri: "pkcs11:token=test"}
smtp:
  hostname: dkimgw.test
upstream:
  address: "capture:%s"
clients:
  - name: campaigns
    networks: ["127.0.0.0/8"]
    domains: [example.com]
domains:
  example.com:
    selectors: [rsa1, ed1]
`

var captureFileRe = regexp.MustCompile(`^\d{8}T\d{6}\.\d{9}Z-\d{10}-[0-9a-f]{12}\.eml$`)

// TestCaptureStoresSignedMessages checks that a capture: upstream accepts
// every recipient, stores each message signed (verifiable) as a 0600
// file whose name sorts by time, answers 250 naming it, and delivers
// nothing.
func TestCaptureStoresSignedMessages(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "capture")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, strings.ReplaceAll(captureConfig, "%s", dir))
	c := h.dial()
	var names []string
	for i := range 3 {
		resp, err := send(c, "bounce@mail.example.com", []string{"a@example.net", "b@nowhere.invalid"}, testMsg)
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		name, ok := strings.CutPrefix(resp.StatusText, "2.0.0 OK: captured as ")
		name, _, _ = strings.Cut(name, ",")
		if !ok || !captureFileRe.MatchString(name) {
			t.Fatalf("DATA reply %q does not name a capture file", resp.StatusText)
		}
		names = append(names, name)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != len(names) {
		t.Fatalf("capture directory holds %d entries, want %d: %v", len(entries), len(names), entries)
	}
	for i, e := range entries { // ReadDir sorts by name: that is capture order
		if e.Name() != names[i] {
			t.Errorf("file %d is %s, want %s (names must sort by time)", i, e.Name(), names[i])
		}
		fi, _ := e.Info()
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %04o, want 0600", e.Name(), fi.Mode().Perm())
		}
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.HasSuffix(data, []byte(testMsg)) {
			t.Errorf("%s does not end with the original message", e.Name())
		}
		if ids := verify(t, data); len(ids) != 2 {
			t.Errorf("%s carries %d signatures, want 2", e.Name(), len(ids))
		}
	}
	if got := len(h.sink.Messages()); got != 0 {
		t.Errorf("the sink received %d messages; capture must deliver nothing", got)
	}
}

// TestCaptureUnwritableIs451 checks that a message the capture directory
// cannot take gets 451 (the sender keeps it) and leaves no file, and that
// the next one is stored once the directory is back.
func TestCaptureUnwritableIs451(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "capture")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, strings.ReplaceAll(captureConfig, "%s", dir))
	// A file where the directory was: nothing can be created there, even
	// by root (tests may run as root, which file modes do not stop).
	moved := filepath.Join(base, "moved")
	if err := os.Rename(dir, moved); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	c := h.dial()
	_, err := send(c, "bounce@mail.example.com", []string{"a@example.net"}, testMsg)
	wantCode(t, err, 451, smtp.EnhancedCode{4, 3, 0})
	if entries, _ := os.ReadDir(moved); len(entries) != 0 {
		t.Errorf("the capture directory holds %v after a failed capture", entries)
	}
	if data, _ := os.ReadFile(dir); len(data) != 0 {
		t.Errorf("something was written over the capture path")
	}
	if !strings.Contains(h.logs.String(), "capture to "+dir) {
		t.Errorf("the log does not say the capture failed:\n%s", h.logs.String())
	}

	os.Remove(dir)
	if err := os.Rename(moved, dir); err != nil {
		t.Fatal(err)
	}
	c.Reset()
	if _, err := send(c, "bounce@mail.example.com", []string{"a@example.net"}, testMsg); err != nil {
		t.Fatalf("after the directory came back: %v", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("capture directory holds %v, want one message", entries)
	}
}

// TestDataReplyIsTheUpstreamsOwn checks that the 250 to DATA is the
// upstream's reply, enhanced code and text (its queue ID) unchanged: a
// backend's Data returning a *smtp.SMTPError with code 250 is written as
// the reply by go-smtp.
func TestDataReplyIsTheUpstreamsOwn(t *testing.T) {
	h := newHarness(t, "")
	resp, err := send(h.dial(), "bounce@mail.example.com", []string{"a@example.net"}, testMsg)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusText != "2.0.0 Ok: queued as SINK1" {
		t.Errorf("reply to DATA = 250 %q, want the sink's 250 2.0.0 Ok: queued as SINK1", resp.StatusText)
	}
}
