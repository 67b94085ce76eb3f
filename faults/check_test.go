package faults

// The checker: what the client saw against what reached the upstream.

import (
	"bytes"
	"net"
	"strings"
	"testing"

	"github.com/emersion/go-msgauth/dkim"

	"github.com/dkimgw/dkimgw/testenv"
)

// result is one scenario's figures: a row of the table.
type result struct {
	scenario string
	sent     int // messages whose transaction started (MAIL FROM answered)
	unsent   int // never started: the gateway was down or gone
	accepted int // answered 250 (on some attempt)
	tempFail int // not accepted, last reply 4xx
	permFail int // not accepted, last reply 5xx
	connErr  int // not accepted, last attempt a broken connection
	retries  int // attempts beyond the first
	// delivered: accepted messages found upstream; duplicates: copies
	// upstream beyond the first of each message; unsigned: copies
	// upstream that do not carry both signatures, verifying; lost:
	// accepted messages not upstream.
	delivered, duplicates, unsigned, lost int
	// deliveredUnaccepted: messages upstream the client never saw a 250
	// for (the reply was lost, RFC 1047); its retry then duplicates it.
	deliveredUnaccepted int
	faultHits           int
	// lastFailAfter: how long after the fault was lifted the last attempt
	// failed (0: none failed after it): how long recovery took.
	lastFailAfter float64
	seconds       float64
	passed        bool
}

// checkOptions says which connection errors a scenario allows: when the
// gateway itself dies, a client sees its connection break.
type checkOptions struct {
	connErrAt map[stage]bool
}

// messageID extracts the tag of a message upstream.
func messageID(data []byte) string {
	_, rest, ok := bytes.Cut(data, []byte("\r\nMessage-ID: <"))
	if !ok {
		return ""
	}
	id, _, _ := bytes.Cut(rest, []byte(">"))
	return string(id)
}

// check compares the load's records with the messages upstream and
// fails t for every broken promise; records are the DKIM TXT records
// (owner → value).
func check(t *testing.T, l *load, upstream []testenv.SinkMessage, records map[string]string, opts checkOptions) result {
	t.Helper()
	res := result{scenario: l.spec.scenario}
	copies := map[string]int{}
	var sample [][]byte
	for i, m := range upstream {
		id := messageID(m.Data)
		copies[id]++
		if !signedAndVerifying(t, m.Data, records) {
			res.unsigned++
			if res.unsigned <= 3 {
				t.Errorf("upstream message %d (<%s>) is not signed and verifying:\n%.600s", i, id, m.Data)
			}
		}
		if len(sample) < 8 && i%max(1, len(upstream)/8) == 0 {
			sample = append(sample, m.Data)
		}
	}
	known := map[string]bool{}
	for i := range l.recs {
		r := &l.recs[i]
		known[r.id] = true
		n := copies[r.id]
		if !r.sent() {
			res.unsent++
			if n > 0 {
				t.Errorf("<%s> reached the upstream but its client never started a transaction for it", r.id)
			}
			continue
		}
		res.sent++
		res.retries += len(r.attempts) - 1
		if n > 1 {
			res.duplicates += n - 1
		}
		for _, a := range r.attempts {
			if a.code == 0 && !opts.connErrAt[a.stage] {
				t.Errorf("<%s>: the connection broke at %s with no reply (%s): a client must get a 4xx or 5xx", r.id, a.stage, a.text)
			}
		}
		// A message not accepted counts by the most telling reply it got:
		// a retry that then found the gateway gone (SIGTERM) does not undo
		// the 4xx its client already has.
		worst := 0
		for _, a := range r.attempts {
			worst = max(worst, a.code)
		}
		switch {
		case r.accepted():
			res.accepted++
			if n == 0 {
				res.lost++
				t.Errorf("LOST: <%s> was answered 250 but never reached the upstream (attempts %+v)", r.id, r.attempts)
			} else {
				res.delivered++
			}
		case worst >= 500:
			res.permFail++
			t.Errorf("<%s>: %+v: a fault of the upstream or the token is temporary, the reply must be 4xx", r.id, r.attempts)
		case worst >= 400:
			res.tempFail++
		default:
			res.connErr++
		}
		if !r.accepted() && n > 0 {
			res.deliveredUnaccepted++
		}
	}
	for id := range copies {
		if !known[id] {
			t.Errorf("the upstream got a message the client never sent: <%s>", id)
		}
	}
	if len(sample) > 0 {
		verifySample(t, records, sample)
	}
	return res
}

// signedAndVerifying: msg carries exactly the two signatures of
// example.com (rsa1, ed1) and go-msgauth verifies both against records.
func signedAndVerifying(t *testing.T, msg []byte, records map[string]string) bool {
	verifs, err := dkim.VerifyWithOptions(bytes.NewReader(msg), &dkim.VerifyOptions{
		LookupTXT: func(name string) ([]string, error) {
			if rec, ok := records[strings.TrimSuffix(strings.ToLower(name), ".")]; ok {
				return []string{rec}, nil
			}
			return nil, &net.DNSError{Err: "no such host", Name: name, IsNotFound: true}
		},
	})
	if err != nil || len(verifs) != 2 {
		return false
	}
	for _, v := range verifs {
		if v.Err != nil || v.Domain != "example.com" {
			return false
		}
	}
	return true
}

// verifySample runs the independent verifiers over a sample: dkimpy in
// the short form, and OpenDKIM and Mail::DKIM as well in the long one.
func verifySample(t *testing.T, records map[string]string, msgs [][]byte) {
	t.Helper()
	verifiers := []testenv.DKIMVerifier{testenv.DKIMPy}
	if longForm() {
		verifiers = testenv.DKIMVerifiers()
	}
	for _, v := range verifiers {
		for i, sigs := range v.Verify(t, records, msgs...) {
			rsaPass := false
			for _, r := range sigs {
				if strings.HasPrefix(r.Algorithm, "ed25519") && !v.Ed25519 {
					continue
				}
				if !r.Pass {
					t.Errorf("%s: sample message %d: %v", v.Name, i, r)
				} else if !strings.HasPrefix(r.Algorithm, "ed25519") {
					rsaPass = true
				}
			}
			if len(sigs) != 2 || !rsaPass {
				t.Errorf("%s: sample message %d: %v, want rsa1 and ed1 passing", v.Name, i, sigs)
			}
		}
	}
}
