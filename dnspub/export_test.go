package dnspub

import (
	"time"

	"github.com/miekg/dns"
)

// SetClock sets the clock TSIG signatures are timed with.
func SetClock(p *RFC2136, now func() time.Time) { p.now = now }

// SetAfterLookup makes f run between reading a record and sending the
// update that depends on it.
func SetAfterLookup(p *RFC2136, f func()) { p.afterLookup = f }

func packRR(rr dns.RR, buf []byte) (int, error) { return dns.PackRR(rr, buf, 0, nil, false) }

func unpackRR(buf []byte) (dns.RR, error) {
	rr, _, err := dns.UnpackRR(buf, 0)
	return rr, err
}
