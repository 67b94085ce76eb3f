package smtpproxy

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// TestDeadPooledConnectionsAreReplaced restarts the upstream on the same
// address while the pool holds idle connections to it: the next
// transactions, however many at once, must get fresh connections instead
// of a 451, and every message must arrive.
func TestDeadPooledConnectionsAreReplaced(t *testing.T) {
	const n = 5
	h := newHarness(t, "")
	sent := 0
	// sendAll sends n messages, concurrently or one after the other, and
	// fails the test for any reply but 250.
	sendAll := func(round string, concurrent bool) {
		t.Helper()
		var wg sync.WaitGroup
		errs := make(chan error, n)
		one := func(i int) {
			c, err := smtp.Dial(h.addr)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			if _, err := send(c, "b@example.com", []string{fmt.Sprintf("%s-%d@example.net", round, i)}, testMsg); err != nil {
				errs <- fmt.Errorf("%s, message %d: %w", round, i, err)
			}
		}
		for i := range n {
			if concurrent {
				wg.Go(func() { one(i) })
			} else {
				one(i)
			}
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		sent += n
		h.sink.WaitMessages(t, sent, 10*time.Second)
	}

	// n transactions open at once: n upstream connections, then idle in
	// the pool.
	var ready, release sync.WaitGroup
	ready.Add(n)
	release.Add(1)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			c := h.dial()
			err := c.Mail("b@example.com", nil)
			ready.Done()
			if err != nil {
				t.Errorf("MAIL %d: %v", i, err)
				return
			}
			release.Wait()
			if err := c.Rcpt(fmt.Sprintf("first-%d@example.net", i), nil); err != nil {
				t.Errorf("RCPT %d: %v", i, err)
				return
			}
			w, err := c.Data()
			if err != nil {
				t.Errorf("DATA %d: %v", i, err)
				return
			}
			w.Write([]byte(testMsg))
			if err := w.Close(); err != nil {
				t.Errorf("end of DATA %d: %v", i, err)
			}
		})
	}
	ready.Wait()
	release.Done()
	wg.Wait()
	sent = n
	h.sink.WaitMessages(t, sent, 10*time.Second)
	if got := h.sink.Sessions(); got != n {
		t.Fatalf("upstream saw %d sessions, want %d (one per concurrent transaction)", got, n)
	}
	waitFor(t, func() bool { return h.srv.state.Load().pool.idleCount() == n })

	h.sink.Stop()
	h.sink.Start()
	sendAll("at-once", true)

	h.sink.Stop()
	h.sink.Start()
	sendAll("in-turn", false)
}
