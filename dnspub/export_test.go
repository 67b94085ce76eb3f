package dnspub

import "time"

// SetClock sets the clock TSIG signatures are timed with.
func SetClock(p *RFC2136, now func() time.Time) { p.now = now }

// SetAfterLookup makes f run between reading a record and sending the
// update that depends on it.
func SetAfterLookup(p *RFC2136, f func()) { p.afterLookup = f }
