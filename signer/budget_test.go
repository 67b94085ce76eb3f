package signer

import (
	"bytes"
	"io"
	"runtime"
	"strings"
	"sync"
	"testing"
)

// spool.memory_total: messages held at once never hold more memory than
// the budget; those that do not fit go to their temporary files at once,
// intact; everything is given back when they are closed or refused.
func TestSpoolMemoryBudget(t *testing.T) {
	const limit = 256 << 10
	b := NewMemoryBudget(limit)
	body := strings.Repeat(strings.Repeat("b", 70)+"\r\n", 700) // ~50 KB
	msg := hdr + body
	opts := SpoolOptions{Dir: t.TempDir(), MemoryLimit: 1 << 20, Budget: b}

	var mu sync.Mutex
	var msgs []*Message
	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() {
			m, err := Spool(t.Context(), strings.NewReader(msg), opts)
			if err != nil {
				t.Errorf("Spool: %v", err)
				return
			}
			if used := b.Used(); used > limit {
				t.Errorf("budget holds %d bytes, more than its limit %d", used, limit)
			}
			mu.Lock()
			msgs = append(msgs, m)
			mu.Unlock()
		})
	}
	wg.Wait()
	inMemory := 0
	for _, m := range msgs {
		if !m.OnDisk() {
			inMemory++
		}
		if got := readAll(t, m); got != msg {
			t.Errorf("a message came back different (%d bytes, want %d)", len(got), len(msg))
		}
	}
	// Each ~50 KB message holds 8+16+32 KiB of pieces.
	if inMemory == 0 || inMemory > limit/(56<<10) || inMemory == len(msgs) {
		t.Errorf("%d of %d messages in memory, want some but at most %d", inMemory, len(msgs), limit/(56<<10))
	}
	if used := b.Used(); used > limit || used != int64(inMemory)*(56<<10) {
		t.Errorf("budget holds %d bytes with %d messages in memory, want %d", used, inMemory, inMemory*(56<<10))
	}
	for _, m := range msgs {
		m.Close()
		m.Close() // idempotent: gives back once
	}
	if used := b.Used(); used != 0 {
		t.Errorf("budget holds %d bytes after every message was closed", used)
	}

	// A refused message gives back what it took.
	if _, err := Spool(t.Context(), strings.NewReader("Subject: no From\r\n\r\n"+body), opts); err == nil {
		t.Fatal("a message without From was spooled")
	}
	if used := b.Used(); used != 0 {
		t.Errorf("budget holds %d bytes after a refused message", used)
	}

	// Without a budget, or with no limit, nothing changes.
	m := spoolString(t, msg, SpoolOptions{MemoryLimit: 1 << 20})
	if m.OnDisk() {
		t.Error("a 50 KB message without a budget went to disk")
	}
	unbounded := NewMemoryBudget(0)
	m = spoolString(t, msg, SpoolOptions{MemoryLimit: 1 << 20, Budget: unbounded})
	if m.OnDisk() || unbounded.Used() != 56<<10 {
		t.Errorf("unbounded budget: on disk %v, counted %d", m.OnDisk(), unbounded.Used())
	}
}

// SizeHint: a message declared larger than MemoryLimit is spooled on disk
// from its first byte and takes nothing from the budget; one declared
// within the limit, or not declared, stays in memory; either way the
// message comes back intact, whatever the hint says.
func TestSpoolSizeHint(t *testing.T) {
	body := strings.Repeat(strings.Repeat("h", 70)+"\r\n", 100) // ~7 KB
	msg := hdr + body
	tests := []struct {
		name   string
		hint   int64
		onDisk bool
	}{
		{"no hint", 0, false},
		{"declared within the limit", 64 << 10, false},
		{"declared at the limit", 1 << 20, false},
		{"declared over the limit", 1<<20 + 1, true},
		{"declared far over its real size", 20_000_000, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := NewMemoryBudget(0)
			m := spoolString(t, msg, SpoolOptions{Dir: t.TempDir(), MemoryLimit: 1 << 20, Budget: b, SizeHint: tt.hint})
			if m.OnDisk() != tt.onDisk {
				t.Errorf("on disk %v, want %v", m.OnDisk(), tt.onDisk)
			}
			if tt.onDisk && b.Used() != 0 {
				t.Errorf("a message spooled on disk holds %d bytes of the budget", b.Used())
			}
			if got := readAll(t, m); got != msg {
				t.Errorf("message came back different (%d bytes, want %d)", len(got), len(msg))
			}
		})
	}
}

// plainWriter hides the ReaderFrom of what it wraps, as the SMTP client's
// data writer has none.
type plainWriter struct{ w io.Writer }

func (p plainWriter) Write(b []byte) (int, error) { return p.w.Write(b) }

// A message larger than MemoryLimit leaves little garbage behind: the
// pieces it held in memory until it moved to its file, the file's write
// buffer and the buffer it is copied out through are recycled for the
// next message. Many large messages at once made each of these garbage
// at about the same moment (about MemoryLimit per message), and the
// collector let the heap grow by as much before reclaiming it.
func TestSpoolToDiskRecyclesBuffers(t *testing.T) {
	const (
		limit = 256 << 10
		runs  = 20
	)
	body := strings.Repeat(strings.Repeat("r", 76)+"\r\n", (3*limit)/78)
	msg := []byte(hdr + body)
	opts := SpoolOptions{Dir: t.TempDir(), MemoryLimit: limit}
	once := func() {
		m, err := Spool(t.Context(), bytes.NewReader(msg), opts)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		if !m.OnDisk() {
			t.Fatal("a message over the memory limit stayed in memory")
		}
		var out countingWriter
		if _, err := WriteSigned(plainWriter{&out}, nil, m); err != nil || out.n != int64(len(msg)) {
			t.Fatalf("WriteSigned: %d bytes, %v; want %d", out.n, err, len(msg))
		}
	}
	once() // fill the pools
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range runs {
		once()
	}
	runtime.ReadMemStats(&after)
	perMessage := (after.TotalAlloc - before.TotalAlloc) / runs
	// What is left is the header fields, the Message, the file and a few
	// small things; under the race detector sync.Pool drops a share of
	// what it is given, so some buffers are allocated again.
	bound := uint64(32 << 10)
	if raceEnabled {
		bound = limit
	}
	t.Logf("%d bytes allocated per message of %d bytes spooled to disk and copied out (memory limit %d)", perMessage, len(msg), limit)
	if perMessage > bound {
		t.Errorf("%d bytes allocated per message spooled to disk and copied out, want at most %d", perMessage, bound)
	}
}

type countingWriter struct{ n int64 }

func (c *countingWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }
