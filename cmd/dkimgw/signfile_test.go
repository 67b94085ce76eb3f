package main

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/testenv"
)

// runSignWith runs `dkimgw sign` in-process on stdin, with $DKIMGW_HSM
// set to uri.
func runSignWith(t *testing.T, uri string, stdin io.Reader, stdout io.Writer, args ...string) (int, string) {
	t.Helper()
	var stderr bytes.Buffer
	env := map[string]string{hsmEnv: uri}
	code := run(t.Context(), append([]string{"sign", "--domain", "example.com"}, args...), &cli{
		stdin:  stdin,
		stdout: stdout,
		stderr: &stderr,
		getenv: func(k string) string { return env[k] },
	})
	return code, stderr.String()
}

// signFile signs the file at path, given as stdin, and returns stdout.
func signFile(t *testing.T, uri, path string, args ...string) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out bytes.Buffer
	if code, stderr := runSignWith(t, uri, f, &out, args...); code != exitOK {
		t.Fatalf("sign < %s: exit %d: %s", filepath.Base(path), code, stderr)
	}
	return out.Bytes()
}

// signPipe signs msg given through a pipe, and returns stdout.
func signPipe(t *testing.T, uri string, msg []byte, args ...string) []byte {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	go func() {
		w.Write(msg) // an error shows as a short message, and a failed comparison
		w.Close()
	}()
	var out bytes.Buffer
	if code, stderr := runSignWith(t, uri, r, &out, args...); code != exitOK {
		t.Fatalf("sign from a pipe: exit %d: %s", code, stderr)
	}
	return out.Bytes()
}

// sigTime matches what differs between two signatures of one message
// made in different seconds: t=, and so b=.
var sigTime = regexp.MustCompile(`t=\d+;|b=[A-Za-z0-9+/=\r\n ]+`)

// splitSigned returns a signed message's DKIM-Signature fields, with t=
// and b= masked, and the message after them.
func splitSigned(t *testing.T, out []byte, n int) (string, []byte) {
	t.Helper()
	rest := out
	for range n {
		if !bytes.HasPrefix(rest, []byte("DKIM-Signature:")) {
			t.Fatalf("output does not start with %d DKIM-Signature fields: %.200q", n, out)
		}
		i := 0
		for { // the field ends at a CRLF not followed by WSP
			j := bytes.Index(rest[i:], []byte("\r\n"))
			if j < 0 {
				t.Fatalf("unterminated DKIM-Signature field: %.200q", rest)
			}
			i += j + 2
			if i == len(rest) || (rest[i] != ' ' && rest[i] != '\t') {
				break
			}
		}
		rest = rest[i:]
	}
	return sigTime.ReplaceAllString(string(out[:len(out)-len(rest)]), "<time>"), rest
}

// TestSignFileLikePipe: a message given as a regular file (read twice,
// no spool file) is signed byte for byte as the same message given
// through a pipe (spooled), whatever its line endings, and dkimpy
// verifies both signatures of every one.
func TestSignFileLikePipe(t *testing.T) {
	uri, records := signToken(t)
	const h = "From: News <news@mail.example.com>\nTo: a@example.net\nSubject: s\n"
	text := strings.Repeat("the quick brown fox jumps over  the lazy dog \t\n", 20000) // 1 MB
	cases := map[string]string{
		"LF":                     h + "\n" + text,
		"CRLF":                   strings.ReplaceAll(h+"\n"+text, "\n", "\r\n"),
		"mixed":                  h + "\r\n" + strings.ReplaceAll(text, "dog \t\n", "dog\r\n") + "a\rb\r\r\nc\n\r",
		"no final newline":       h + "\n" + text + "last line",
		"ends in CR":             h + "\nbody\r",
		"empty body":             h + "\n",
		"header only":            strings.TrimSuffix(h, "\n"),
		"trailing blank lines":   h + "\nbody\n\n\r\n\n",
		"long lines":             h + "\n" + strings.Repeat("y", 300000) + "\n" + strings.Repeat("z ", 100000) + "\r\n",
		"over the memory limit":  h + "\n" + text + text + text, // spooled to a file from the pipe
		"CR and LF across reads": h + "\n" + strings.Repeat("x", 128<<10-len(h)-2) + "\r\n" + strings.Repeat("w\r", 40000),
	}
	var names []string
	var signed [][]byte
	for name, msg := range cases {
		path := filepath.Join(t.TempDir(), "msg.eml")
		if err := os.WriteFile(path, []byte(msg), 0o600); err != nil {
			t.Fatal(err)
		}
		args := []string{"--selector", "rsa", "--selector", "ed"}
		fromFile := signFile(t, uri, path, args...)
		fromPipe := signPipe(t, uri, []byte(msg), args...)
		fileFields, fileMsg := splitSigned(t, fromFile, 2)
		pipeFields, pipeMsg := splitSigned(t, fromPipe, 2)
		if fileFields != pipeFields {
			t.Errorf("%s: the fields differ:\n%s\nfrom a pipe:\n%s", name, fileFields, pipeFields)
		}
		if !bytes.Equal(fileMsg, pipeMsg) {
			t.Errorf("%s: the message from a file (%d bytes) differs from the message from a pipe (%d bytes)", name, len(fileMsg), len(pipeMsg))
		}
		names = append(names, name)
		signed = append(signed, fromFile, fromPipe)
	}
	for i, res := range testenv.DKIMPy.Verify(t, records, signed...) {
		if len(res) != 2 || !res[0].Pass || !res[1].Pass {
			t.Errorf("%s (from a %s): dkimpy: %v", names[i/2], []string{"file", "pipe"}[i%2], res)
		}
	}
}

// TestSignFileAtOffset: sign reads its message from where stdin is, and
// leaves stdin at its end, as reading it would.
func TestSignFileAtOffset(t *testing.T) {
	uri, _ := signToken(t)
	path := filepath.Join(t.TempDir(), "msg.eml")
	if err := os.WriteFile(path, []byte("first line, read by another command\n"+signTestMessage), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Seek(int64(len("first line, read by another command\n")), io.SeekStart); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if code, stderr := runSignWith(t, uri, f, &out, "--selector", "rsa"); code != exitOK {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if _, msg := splitSigned(t, out.Bytes(), 1); string(msg) != strings.ReplaceAll(signTestMessage, "\n", "\r\n") {
		t.Errorf("signed %q, want the message after the first line", msg)
	}
	if off, err := f.Seek(0, io.SeekCurrent); err != nil || off != int64(len("first line, read by another command\n")+len(signTestMessage)) {
		t.Errorf("stdin left at %d (%v), want its end", off, err)
	}
}

// TestSignFileNeedsNoSpoolFile: a message over the spool's memory limit
// is signed from a file without a spool file: with a spool directory
// that does not exist, the file signs and the same message through a
// pipe cannot be spooled.
func TestSignFileNeedsNoSpoolFile(t *testing.T) {
	uri, _ := signToken(t)
	t.Setenv("TMPDIR", filepath.Join(t.TempDir(), "no-such-dir"))                        // where Spool puts its file
	msg := signTestMessage + strings.Repeat(strings.Repeat("0123456789", 7)+"\n", 30000) // 2 MB
	path := filepath.Join(t.TempDir(), "msg.eml")
	if err := os.WriteFile(path, []byte(msg), 0o600); err != nil {
		t.Fatal(err)
	}
	out := signFile(t, uri, path, "--selector", "rsa")
	if _, signed := splitSigned(t, out, 1); string(signed) != strings.ReplaceAll(msg, "\n", "\r\n") {
		t.Error("stdout does not end with the message")
	}

	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	go func() {
		w.Write([]byte(msg)) // returns when sign has read it all, or once r is closed
		w.Close()
	}()
	var pipeOut bytes.Buffer
	code, stderr := runSignWith(t, uri, r, &pipeOut, "--selector", "rsa")
	if code != exitTempFail || !strings.Contains(stderr, "spool file") || pipeOut.Len() != 0 {
		t.Errorf("through a pipe: exit %d, %d bytes out, stderr %q; want 75 and no spool file", code, pipeOut.Len(), stderr)
	}
}

// TestSignFileChanged: a file that changes while it is written out
// (truncated, grown, or rewritten in place) makes sign exit 75 and say
// that stdout must be discarded; it never exits 0 with a message that
// does not match its signature.
func TestSignFileChanged(t *testing.T) {
	uri, _ := signToken(t)
	msg := signTestMessage + strings.Repeat("body line\n", 300000) // 3 MB
	for name, change := range map[string]func(path string) error{
		"truncated": func(path string) error { return os.Truncate(path, int64(len(msg)/2)) },
		"grown": func(path string) error {
			f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = f.WriteString("more\n")
			return err
		},
		"rewritten": func(path string) error {
			f, err := os.OpenFile(path, os.O_WRONLY, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			if _, err := f.WriteAt([]byte("BODY LINE\n"), int64(len(msg)-10)); err != nil {
				return err
			}
			// On a coarse clock the write may not move the time.
			later := time.Now().Add(time.Hour)
			return os.Chtimes(path, later, later)
		},
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "msg.eml")
			if err := os.WriteFile(path, []byte(msg), 0o600); err != nil {
				t.Fatal(err)
			}
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			pr, pw := io.Pipe()
			type result struct {
				code   int
				stderr string
			}
			done := make(chan result, 1)
			go func() {
				code, stderr := runSignWith(t, uri, f, pw, "--selector", "rsa")
				pw.Close()
				done <- result{code, stderr}
			}()
			// The first byte out means the message was hashed and
			// signed and is being written; the pipe holds sign there.
			if _, err := io.ReadFull(pr, make([]byte, 1)); err != nil {
				t.Fatalf("no output: %v (%v)", err, <-done)
			}
			if err := change(path); err != nil {
				t.Fatal(err)
			}
			if _, err := io.Copy(io.Discard, pr); err != nil {
				t.Fatal(err)
			}
			var r result
			select {
			case r = <-done:
			case <-time.After(time.Minute):
				t.Fatal("sign did not finish")
			}
			if r.code != exitTempFail || !strings.Contains(r.stderr, "changed while it was being signed") || !strings.Contains(r.stderr, "discard") {
				t.Errorf("exit %d, stderr %q; want 75, the file changed, discard stdout", r.code, r.stderr)
			}
		})
	}
}

// TestStoredInputUnchanged: the check made before and after writing out
// sees growth, truncation and a new modification time, and nothing else.
func TestStoredInputUnchanged(t *testing.T) {
	path := filepath.Join(t.TempDir(), "msg.eml")
	if err := os.WriteFile(path, []byte(signTestMessage), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	in := storedStdin(f)
	if in == nil || in.size != int64(len(signTestMessage)) {
		t.Fatalf("storedStdin = %+v", in)
	}
	if err := in.unchanged(); err != nil {
		t.Fatalf("unchanged file: %v", err)
	}
	later := in.mod.Add(time.Second)
	for name, change := range map[string]func() error{
		"grown":     func() error { return os.WriteFile(path, []byte(signTestMessage+"x"), 0o600) },
		"truncated": func() error { return os.Truncate(path, 10) },
		"touched":   func() error { return os.Chtimes(path, later, later) },
	} {
		if err := os.WriteFile(path, []byte(signTestMessage), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(path, in.mod, in.mod); err != nil {
			t.Fatal(err)
		}
		if err := in.unchanged(); err != nil {
			t.Fatalf("%s: restored file: %v", name, err)
		}
		if err := change(); err != nil {
			t.Fatal(err)
		}
		if err := in.unchanged(); err == nil || !strings.Contains(err.Error(), "changed while it was being signed") {
			t.Errorf("%s: unchanged() = %v", name, err)
		}
	}

	// Not regular files: a pipe, and nothing left to read.
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if storedStdin(r) != nil {
		t.Error("a pipe is taken for a stored file")
	}
	if _, err := f.Seek(0, io.SeekEnd); err != nil {
		t.Fatal(err)
	}
	if storedStdin(f) != nil {
		t.Error("a file read to its end is taken for a stored message")
	}
	if storedStdin(strings.NewReader("x")) != nil {
		t.Error("a strings.Reader is taken for a stored file")
	}
}

// TestSignFileTokenErrorFirst: a file is read while the token opens, but
// a token problem is still what sign reports, as with a pipe, even when
// the message would be refused too.
func TestSignFileTokenErrorFirst(t *testing.T) {
	uri, _ := signToken(t)
	path := filepath.Join(t.TempDir(), "msg.eml")
	if err := os.WriteFile(path, []byte("Subject: no From\n\nbody\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out bytes.Buffer
	code, stderr := runSignWith(t, uri, f, &out, "--selector", "nokey")
	if code != exitUnavailable || !strings.Contains(stderr, "not found") || out.Len() != 0 {
		t.Errorf("exit %d, stderr %q, %d bytes out; want 69, key not found", code, stderr, out.Len())
	}
}
