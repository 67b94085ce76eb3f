package smtpproxy

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// spoolFileSizes returns the sizes of the spool files this process has
// open in dir: they are unlinked as soon as they are made, so only their
// descriptors (Linux's /proc/self/fd) tell how much each holds.
func spoolFileSizes(t *testing.T, dir string) []int64 {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd to find the spool files by: %v", err)
	}
	var sizes []int64
	for _, e := range ents {
		fd := filepath.Join("/proc/self/fd", e.Name())
		target, err := os.Readlink(fd)
		if err != nil || !strings.HasPrefix(target, dir+string(filepath.Separator)) {
			continue
		}
		if fi, err := os.Stat(fd); err == nil {
			sizes = append(sizes, fi.Size())
		}
	}
	return sizes
}

// Memory of many large messages received at once (issue 11's 50 x 20 MB
// measurement): a message declared larger than spool.memory_limit by
// MAIL's SIZE= (Postfix sends it) goes to its temp file from its first
// byte, instead of holding memory_limit in memory until it passes it. n
// clients hold 1.5 MiB each in DATA: the spool holds no memory, the heap
// grows by the transfers' buffers only, and every message is relayed
// signed once the clients finish. Measured before the hint: the spool
// held 1 MiB per message, and the heap grew by as much.
func TestDeclaredLargeMessagesSpoolToDisk(t *testing.T) {
	const (
		n    = 20
		sent = 3 << 19 // bytes of each message sent before the client pauses
		// perTransfer bounds the heap a message in DATA costs beyond its
		// spool memory: read buffers, the temp file's writer, the
		// upstream connection's buffers, goroutines.
		perTransfer = 384 << 10
	)
	spool := t.TempDir()
	// 20 relays of 1.5 MB at once through the race detector's sink can
	// take longer than baseConfig's 5 s upstream timeout on a busy machine.
	conf := strings.NewReplacer("max_message_bytes: 65536", "max_message_bytes: 8388608", "timeout: 5s", "timeout: 60s").Replace(baseConfig) +
		"spool:\n  dir: " + spool + "\n"
	h := newHarness(t, conf)

	line := strings.Repeat("d", 76) + "\r\n"
	// Sent raw: no line may start with a dot.
	head := strings.Replace(testMsg, "\r\n.", "\r\n", 1) + strings.Repeat(line, sent/len(line))
	headBytes := []byte(head) // one copy for every client: the heap is measured
	tail := strings.Repeat(line, 100) + ".\r\n"
	size := len(head) + len(tail)

	clients := make([]*rawClient, n)
	for i := range clients {
		c := dialRaw(t, h.addr)
		c.cmd("EHLO client.test", "250")
		c.cmd(fmt.Sprintf("MAIL FROM:<bounce@mail.example.com> SIZE=%d", size), "250")
		c.cmd("RCPT TO:<someone@example.net>", "250")
		c.cmd("DATA", "354")
		clients[i] = c
	}

	hs := startHeapSampler()
	var maxHeld atomic.Int64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			if held := h.srv.SpoolMemory(); held > maxHeld.Load() {
				maxHeld.Store(held)
			}
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	var wg sync.WaitGroup
	for _, c := range clients {
		wg.Go(func() {
			_ = c.conn.SetWriteDeadline(time.Now().Add(30 * time.Second))
			if _, err := c.conn.Write(headBytes); err != nil {
				t.Errorf("sending the first %d bytes: %v", len(head), err)
			}
		})
	}
	wg.Wait()
	// The writes are done when the kernel has the bytes; wait until the
	// server has spooled them (all but what its writer buffers).
	var sizes []int64
	received := func() bool {
		sizes = spoolFileSizes(t, spool)
		if len(sizes) < n {
			return false
		}
		for _, s := range sizes {
			if s < sent-(128<<10) {
				return false
			}
		}
		return true
	}
	for deadline := time.Now().Add(30 * time.Second); !received(); {
		if time.Now().After(deadline) {
			close(stop)
			hs.growth()
			t.Fatalf("the server did not spool the first %d bytes of %d messages within 30 s: spool files %v", sent, n, sizes)
		}
		time.Sleep(10 * time.Millisecond)
	}
	growth := hs.growth()
	close(stop)
	<-sampled
	t.Logf("%d messages of %d bytes so far in DATA: heap grew %d KiB (%d KiB each), spool memory at most %d bytes",
		n, sent, growth>>10, growth>>10/n, maxHeld.Load())
	if held := maxHeld.Load(); held != 0 {
		t.Errorf("the spool held %d bytes in memory for messages declared larger than memory_limit, want 0", held)
	}
	if growth > n*perTransfer {
		t.Errorf("the heap grew %d KiB with %d messages in DATA, more than %d KiB each", growth>>10, n, perTransfer>>10)
	}

	for _, c := range clients {
		wg.Go(func() {
			if err := c.write(tail); err != nil {
				t.Errorf("sending the end of the message: %v", err)
				return
			}
			if r := c.reply(); !strings.HasPrefix(r, "250") {
				t.Errorf("end of DATA: %q, want 250", r)
			}
		})
	}
	wg.Wait()
	msgs := h.sink.WaitMessages(t, n, 30*time.Second)
	want := strings.TrimSuffix(head+tail, ".\r\n")
	for _, m := range msgs {
		if !bytes.HasSuffix(m.Data, []byte(want)) {
			t.Fatal("a relayed message differs from the one sent")
		}
		if ids := verify(t, m.Data); len(ids) != 2 {
			t.Errorf("verified %v, want two signatures", ids)
		}
	}
}
