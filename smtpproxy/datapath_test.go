package smtpproxy

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

// The DATA path end to end, through go-smtp's DATA reader (ours, the
// patched one in third_party/go-smtp) and its client's dot writer: the
// message is sent raw, dot-stuffed by hand, and must reach the upstream
// unstuffed, normalised to CRLF, unchanged otherwise, and verify.
func TestDataPathEdgeCases(t *testing.T) {
	const head = "From: News <news@mail.example.com>\r\n" +
		"To: someone@example.net\r\n" +
		"Subject: edge\r\n" +
		"\r\n"
	dotLines := func(n int) (wire, want string) {
		var w, g strings.Builder
		for i := range n {
			// Dots at the start of lines that straddle the reader's
			// 4 KiB buffer at every offset, and dots elsewhere.
			line := strings.Repeat(".", 1+i%3) + strings.Repeat("x", i%101) + ". .\r\n"
			w.WriteString("." + line)
			g.WriteString(line)
		}
		return w.String(), g.String()
	}
	bigWire, bigWant := dotLines(3000)
	cases := []struct {
		name string
		wire string // the body as sent after DATA, before the final ".\r\n"
		want string // the body the upstream must get
	}{
		{"plain", "hello\r\n", "hello\r\n"},
		{"dot-stuffed lines", "..\r\n...\r\n..x\r\n. not stuffed? it is.\r\n", ".\r\n..\r\n.x\r\n not stuffed? it is.\r\n"},
		{"dot-CRLF inside a line is no end", "a.\r\n.\r\nb\r\n", "a.\r\n"}, // ".\r\n" alone ends it: b is the next command
		{"bare LF lines", "one\ntwo\n.\nthree\r\n", "one\r\ntwo\r\n.\r\nthree\r\n"},
		{"lone CR", "one\rtwo\r\n", "one\r\ntwo\r\n"},
		{"CR CR LF", "one\r\r\ntwo\r\n", "one\r\n\r\ntwo\r\n"},
		{"empty lines at the end", "x\r\n\r\n\r\n", "x\r\n\r\n\r\n"},
		{"200 KB of dot lines", bigWire, bigWant},
	}
	h := newHarness(t, strings.Replace(baseConfig, "max_message_bytes: 65536", "max_message_bytes: 1048576", 1))
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := dialRaw(t, h.addr)
			c.cmd("EHLO client.test", "250")
			c.cmd("MAIL FROM:<bounce@mail.example.com>", "250")
			c.cmd("RCPT TO:<someone@example.net>", "250")
			c.cmd("DATA", "354")
			wire := head + tc.wire + ".\r\n"
			if tc.name == "dot-CRLF inside a line is no end" {
				// What follows the end of data is read as commands.
				c.send(head+tc.wire, "250")
				if r := c.reply(); !strings.HasPrefix(r, "5") {
					t.Errorf("reply to the line after the end of data: %q, want 5xx (it is no command)", r)
				}
				c.cmd("QUIT", "221")
			} else {
				c.send(wire, "250")
			}
			msgs := h.sink.WaitMessages(t, i+1, 10*time.Second)
			got := msgs[i].Data
			want := head + tc.want
			if !bytes.HasSuffix(got, []byte(want)) {
				t.Fatalf("upstream got %.300q...\nwant it to end with %.300q...", got, want)
			}
			prefix := got[:len(got)-len(want)]
			if n := bytes.Count(prefix, []byte("DKIM-Signature:")); n != 2 || !bytes.HasPrefix(prefix, []byte("DKIM-Signature:")) {
				t.Errorf("before the message: %q, want two DKIM-Signature fields", prefix)
			}
			if ids := verify(t, got); len(ids) != 2 {
				t.Errorf("verified %v, want two signatures", ids)
			}
		})
	}
}

// The limits go-smtp's DATA reader and line-length limit enforce reach
// the client as their replies, and nothing is relayed.
func TestDataPathLimits(t *testing.T) {
	h := newHarness(t, strings.Replace(baseConfig, "max_message_bytes: 65536", "max_message_bytes: 65536\n  max_line_length: 1000", 1))
	head := "From: News <news@mail.example.com>\r\nSubject: limits\r\n\r\n"
	cases := []struct {
		name, body, want string
	}{
		// 1,000 bytes with the CRLF is the longest line: 998 + CRLF passes.
		{"line of 1,000 bytes", strings.Repeat("y", 998) + "\r\n", "250"},
		{"line over max_line_length", strings.Repeat("x", 1500) + "\r\n", "500 5.5.2"},
		{"message over max_message_bytes", strings.Repeat(strings.Repeat("z", 70)+"\r\n", 1000), "552 5.3.4"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := len(h.sink.Messages())
			c := dialRaw(t, h.addr)
			c.cmd("EHLO client.test", "250")
			c.cmd("MAIL FROM:<bounce@mail.example.com>", "250")
			c.cmd("RCPT TO:<someone@example.net>", "250")
			c.cmd("DATA", "354")
			c.send(head+tc.body+".\r\n", tc.want)
			if tc.want == "250" {
				h.sink.WaitMessages(t, before+1, 10*time.Second)
				return
			}
			time.Sleep(100 * time.Millisecond) // a relayed message would have reached the sink by now
			if n := len(h.sink.Messages()); n != before {
				t.Errorf("the sink got %d messages, want %d: a refused message was relayed", n, before)
			}
		})
	}
}
