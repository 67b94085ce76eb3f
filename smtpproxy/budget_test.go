package smtpproxy

import (
	"bytes"
	"strings"
	"sync"
	"testing"
	"time"
)

// spool.memory_total bounds the memory of all messages in the spool
// together: with 20 messages of 400 KB held at once (the upstream is
// slow to answer) and memory_limit 1 MiB each, the server's counters show
// at most memory_total in memory, the others on disk, and every message
// relayed signed.
func TestSpoolMemoryTotalBound(t *testing.T) {
	const (
		total = 1 << 20
		n     = 20
	)
	conf := strings.Replace(baseConfig, "max_message_bytes: 65536", "max_message_bytes: 4194304", 1) +
		"spool:\n  memory_limit: 1048576\n  memory_total: 1048576\n"
	h := newHarness(t, conf)
	h.sink.DelayData(3 * time.Second)

	body := strings.Repeat(strings.Repeat("m", 70)+"\r\n", 400<<10/72)
	msg := testMsg + body
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Go(func() {
			c := h.dial()
			if _, err := send(c, "bounce@mail.example.com", []string{"someone@example.net"}, msg); err != nil {
				errs <- err
			}
		})
	}

	// Watch the counters until every message is spooled and waits for
	// the upstream's reply (or the sink has them all).
	var maxMem, maxHeld int64
	var sawAll bool
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) && len(h.sink.Messages()) < n {
		mem, disk := h.srv.SpoolBytes()
		maxMem = max(maxMem, mem)
		maxHeld = max(maxHeld, h.srv.SpoolMemory())
		if mem+disk == int64(n*len(msg)) && !sawAll {
			sawAll = true
			if disk == 0 {
				t.Errorf("all %d messages held in memory at once (%d bytes)", n, mem)
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("send: %v", err)
	}
	if !sawAll {
		t.Errorf("never saw the %d messages spooled at once (the sink delays its replies by 3 s)", n)
	}
	if maxHeld > total || maxMem > total {
		t.Errorf("spool memory reached %d bytes (messages in memory: %d bytes), more than memory_total %d", maxHeld, maxMem, total)
	}
	if maxHeld == 0 {
		t.Error("no spool memory was ever counted")
	}
	msgs := h.sink.WaitMessages(t, n, 30*time.Second)
	for _, m := range msgs {
		if !bytes.HasSuffix(m.Data, []byte(msg)) {
			t.Fatal("a relayed message differs from the one sent")
		}
		if ids := verify(t, m.Data); len(ids) != 2 {
			t.Errorf("verified %v, want two signatures", ids)
		}
	}
	if held := h.srv.SpoolMemory(); held != 0 {
		t.Errorf("spool memory %d bytes after every message was relayed, want 0", held)
	}
}
