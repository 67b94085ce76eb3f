package smtpproxy

import (
	"slices"
	"sync"
	"testing"

	"github.com/emersion/go-smtp"
)

// recordingObserver keeps what the server reports.
type recordingObserver struct {
	mu      sync.Mutex
	txs     []TransactionReport
	refused []string
}

func (o *recordingObserver) Transaction(r TransactionReport) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.txs = append(o.txs, r)
}

func (o *recordingObserver) ConnectionRefused(reason string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.refused = append(o.refused, reason)
}

func (o *recordingObserver) reports() []TransactionReport {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.txs)
}

// TestObserverSeesOutcomes sends a signed message, one From a domain the
// client may not use and one the upstream defers, and checks what the
// Observer was told: outcomes, configured names only, signatures.
func TestObserverSeesOutcomes(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "")
	c := h.dial()
	if _, err := send(c, "news@mail.example.com", []string{"a@example.net"}, testMsg); err != nil {
		t.Fatalf("signed message: %v", err)
	}
	other := "From: x@unknown.example\r\nSubject: x\r\n\r\nbody\r\n"
	_, err := send(c, "x@unknown.example", []string{"a@example.net"}, other)
	wantCode(t, err, 550, smtp.EnhancedCode{5, 7, 1})
	h.sink.FailData(&smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 3, 1}, Message: "full"})
	_, err = send(c, "news@mail.example.com", []string{"a@example.net"}, testMsg)
	wantCode(t, err, 452, smtp.EnhancedCode{4, 3, 1})
	if err := c.Quit(); err != nil {
		t.Fatal(err)
	}

	got := h.obs.reports()
	if len(got) != 3 {
		t.Fatalf("reports = %+v, want 3", got)
	}
	want := []TransactionReport{
		{Client: "campaigns", Domain: "example.com", Outcome: OutcomeSigned, UpstreamClass: "2xx", Signatures: []SignatureReport{
			{Domain: "example.com", Selector: "rsa1", Algorithm: "rsa-sha256"},
			{Domain: "example.com", Selector: "ed1", Algorithm: "ed25519-sha256"},
		}},
		{Client: "campaigns", Domain: "", Outcome: OutcomeRefused},
		{Client: "campaigns", Domain: "example.com", Outcome: OutcomeTempfailed, UpstreamClass: "4xx"},
	}
	for i := range want {
		g, w := got[i], want[i]
		if g.Client != w.Client || g.Domain != w.Domain || g.Outcome != w.Outcome || g.UpstreamClass != w.UpstreamClass || !slices.Equal(g.Signatures, w.Signatures) {
			t.Errorf("report %d = %+v, want %+v", i, g, w)
		}
	}
	if mem, disk := h.srv.SpoolBytes(); mem != 0 || disk != 0 {
		t.Errorf("spool bytes after the transactions = %d in memory, %d on disk, want 0", mem, disk)
	}
}

// TestObserverSeesMailFailure: a transaction the upstream refuses at MAIL
// FROM is a tempfailed message with no domain (the header is not read).
func TestObserverSeesMailFailure(t *testing.T) {
	t.Parallel()
	h := newHarness(t, "")
	h.sink.FailMail(&smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "busy"})
	c := h.dial()
	_, err := send(c, "news@mail.example.com", []string{"a@example.net"}, testMsg)
	wantCode(t, err, 451, smtp.EnhancedCode{4, 3, 0})
	got := h.obs.reports()
	if len(got) != 1 || got[0].Outcome != OutcomeTempfailed || got[0].Domain != "" || got[0].Client != "campaigns" || got[0].UpstreamClass != "" {
		t.Fatalf("reports = %+v, want one tempfailed for client campaigns without domain", got)
	}
}
