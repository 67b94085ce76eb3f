package faults

// The load generator: N tagged messages over S concurrent SMTP sessions,
// each retried like an MTA retries a deferred message, every reply
// recorded.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"
)

// stage is how far a failed attempt got.
type stage int

const (
	stageDial  stage = iota // no connection, or no greeting: nothing was sent
	stageMail               // on MAIL FROM: no transaction was in flight
	stageLater              // RCPT, DATA or the reply to the final dot
)

func (s stage) String() string {
	return [...]string{"dial", "mail", "data"}[s]
}

// attempt is one try of one message.
type attempt struct {
	code  int    // the reply's code; 0 for a connection error
	stage stage  // where it failed (code != 250)
	text  string // the reply or the error, for failure messages
	at    time.Time
}

// msgRecord is everything the client saw for one message.
type msgRecord struct {
	id       string
	attempts []attempt
}

func (m *msgRecord) accepted() bool {
	for _, a := range m.attempts {
		if a.code == 250 {
			return true
		}
	}
	return false
}

// sent: some attempt started a transaction (MAIL FROM got a reply). An
// attempt that found no gateway, or a session that broke before MAIL
// was answered, sent nothing.
func (m *msgRecord) sent() bool {
	for _, a := range m.attempts {
		if a.code != 0 || a.stage == stageLater {
			return true
		}
	}
	return false
}

// loadSpec is one run of the generator.
type loadSpec struct {
	scenario string
	addr     string
	n        int // messages
	sessions int // concurrent SMTP sessions
	// attempts per message: a 4xx or a broken connection is retried
	// after a pause, as an MTA retries a deferred message; a 5xx is not.
	attempts int
	// deadline bounds the whole run; messages not started by then are
	// not sent.
	deadline time.Duration
	// rate, when not 0, paces the run: a message starts at most every
	// 1/rate seconds over all sessions (a steady load, not a flood).
	rate float64
}

// load runs the generator: finished counts the messages done (accepted,
// refused for good, or out of attempts), for the fault drivers' pacing.
type load struct {
	spec     loadSpec
	recs     []msgRecord
	finished atomic.Int64
	// acceptedAt records when each 250 came, to tell that mail flowed
	// again after a fault.
	mu         sync.Mutex
	acceptedAt []time.Time
}

func newLoad(spec loadSpec) *load {
	if spec.attempts == 0 {
		spec.attempts = 3
	}
	l := &load{spec: spec, recs: make([]msgRecord, spec.n)}
	for i := range l.recs {
		l.recs[i].id = fmt.Sprintf("%s-%06d@faults.test", spec.scenario, i)
	}
	return l
}

// progress is the fraction of messages done.
func (l *load) progress() float64 { return float64(l.finished.Load()) / float64(l.spec.n) }

// acceptedSince counts the 250s after t.
func (l *load) acceptedSince(t time.Time) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, a := range l.acceptedAt {
		if a.After(t) {
			n++
		}
	}
	return n
}

// attemptsSince counts the attempts that ended after t.
func (l *load) attemptsSince(t time.Time) int {
	n := 0
	for i := range l.recs {
		for _, a := range l.recs[i].attempts {
			if a.at.After(t) {
				n++
			}
		}
	}
	return n
}

// lastFailureAfter is how long after t the last failed attempt ended
// (0 when none did).
func (l *load) lastFailureAfter(t time.Time) time.Duration {
	var last time.Duration
	for i := range l.recs {
		for _, a := range l.recs[i].attempts {
			if a.code != 250 && a.at.After(t) {
				last = max(last, a.at.Sub(t))
			}
		}
	}
	return last
}

// run sends every message, returning when all are done, ctx ends or the
// deadline passes.
func (l *load) run(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, l.spec.deadline)
	defer cancel()
	var next atomic.Int64
	var wg sync.WaitGroup
	// A ticker drops the ticks nobody takes: sessions slower than the
	// rate send slower, they never catch up in a burst.
	var pace <-chan time.Time
	if l.spec.rate > 0 {
		tk := time.NewTicker(time.Duration(float64(time.Second) / l.spec.rate))
		defer tk.Stop()
		pace = tk.C
	}
	for range l.spec.sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w := &worker{l: l}
			defer w.close()
			for ctx.Err() == nil {
				if pace != nil {
					select {
					case <-pace:
					case <-ctx.Done():
						return
					}
				}
				i := int(next.Add(1)) - 1
				if i >= l.spec.n {
					return
				}
				w.send(ctx, &l.recs[i], i)
				l.finished.Add(1)
			}
		}()
	}
	wg.Wait()
}

type worker struct {
	l *load
	c *smtp.Client
}

func (w *worker) close() {
	if w.c != nil {
		_ = w.c.Close()
		w.c = nil
	}
}

func (w *worker) send(ctx context.Context, rec *msgRecord, i int) {
	msg := testMessage(rec.id, i)
	for n := 1; n <= w.l.spec.attempts && ctx.Err() == nil; n++ {
		a := w.try(rec.id, msg)
		a.at = time.Now()
		rec.attempts = append(rec.attempts, a)
		if a.code == 250 {
			w.l.mu.Lock()
			w.l.acceptedAt = append(w.l.acceptedAt, a.at)
			w.l.mu.Unlock()
			return
		}
		// After any failure the session starts afresh: the gateway may
		// have closed it (421), and a retry is a new transaction.
		w.close()
		if a.code >= 500 {
			return
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Duration(n) * 200 * time.Millisecond):
		}
	}
}

// try runs one transaction, reusing the worker's session when it has one.
func (w *worker) try(id, msg string) attempt {
	if w.c == nil {
		conn, err := net.DialTimeout("tcp", w.l.spec.addr, 10*time.Second)
		if err != nil {
			return attempt{stage: stageDial, text: err.Error()}
		}
		c := smtp.NewClient(conn)
		// Generous: a stalled upstream or a hung token call make the
		// gateway wait its own timeouts before it answers.
		c.CommandTimeout = 2 * time.Minute
		c.SubmissionTimeout = 2 * time.Minute
		if err := c.Hello("load.test"); err != nil {
			_ = c.Close()
			return failed(stageDial, err)
		}
		w.c = c
	}
	c := w.c
	if err := c.Mail("news@example.com", nil); err != nil {
		return failed(stageMail, err)
	}
	if err := c.Rcpt("rcpt-"+id, nil); err != nil {
		return failed(stageLater, err)
	}
	wc, err := c.Data()
	if err != nil {
		return failed(stageLater, err)
	}
	if _, err := io.WriteString(wc, msg); err != nil {
		return failed(stageLater, err)
	}
	resp, err := wc.CloseWithResponse()
	if err != nil {
		return failed(stageLater, err)
	}
	return attempt{code: 250, text: resp.StatusText}
}

func failed(st stage, err error) attempt {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return attempt{code: se.Code, stage: st, text: fmt.Sprintf("%d %v %s", se.Code, se.EnhancedCode, se.Message)}
	}
	return attempt{stage: st, text: err.Error()}
}

// testMessage is message i, tagged with its id in the Message-ID and the
// body. Sizes vary from about 1 to 9 KiB.
func testMessage(id string, i int) string {
	var b strings.Builder
	b.WriteString("From: News <news@example.com>\r\n")
	b.WriteString("To: <rcpt-" + id + ">\r\n")
	b.WriteString("Subject: fault suite message " + id + "\r\n")
	b.WriteString("Date: Tue, 01 Dec 2026 16:00:00 +0000\r\n")
	b.WriteString("Message-ID: <" + id + ">\r\n")
	b.WriteString("MIME-Version: 1.0\r\n")
	b.WriteString("Content-Type: text/plain; charset=utf-8\r\n\r\n")
	b.WriteString("tag: " + id + "\r\n")
	for j := range 16 + i%128 {
		fmt.Fprintf(&b, "line %03d of a message sent through dkimgw under fault injection.\r\n", j)
	}
	return b.String()
}
