package smtpproxy

import (
	"net"
	"net/netip"
	"sync"
	"time"
)

// Who gets in: the per-source connection count and the AUTH failure
// throttle. Both count by source (see sourceOf), across connections, so
// that one host cannot take every connection slot, nor guess passwords
// at the speed of many connections.

// The AUTH throttle's settings. The first failure from a source waits
// authDelayBase before its reply, each further one twice as long up to
// authDelayMax; a source quiet for authQuiet starts over. A real MTA with
// a wrong password fails a few times a minute and hardly notices;
// guessing at the rate of 100 connections gets one try per
// authDelayMax per connection, on top of bcrypt.
const (
	authDelayBase = 250 * time.Millisecond
	authDelayMax  = 5 * time.Second
	authQuiet     = 15 * time.Minute
	// authMaxSources bounds the memory of the throttle: about 100 bytes a
	// source, so 1 MB at most. When full, quiet sources are forgotten
	// first, then arbitrary ones (an attacker with that many addresses
	// is not slowed by per-address counting anyway).
	authMaxSources = 10000
)

// sourceOf is the unit connections and AUTH failures are counted by: an
// IPv4 address, or the /64 of an IPv6 address (one host, or one site,
// commonly has a whole /64 to pick addresses from).
func sourceOf(a net.Addr) netip.Prefix {
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.Prefix{}
	}
	ip := ap.Addr().Unmap().WithZone("")
	if ip.Is6() {
		p, _ := ip.Prefix(64)
		return p
	}
	return netip.PrefixFrom(ip, 32)
}

// authThrottle counts AUTH failures per source and says how long to wait
// before answering the next one.
type authThrottle struct {
	mu      sync.Mutex
	sources map[netip.Prefix]*authRecord
	base    time.Duration
	max     time.Duration
	now     func() time.Time
}

type authRecord struct {
	failures int
	last     time.Time
}

func newAuthThrottle() *authThrottle {
	return &authThrottle{sources: make(map[netip.Prefix]*authRecord), base: authDelayBase, max: authDelayMax, now: time.Now}
}

// setDelays changes the delays (tests make them short).
func (a *authThrottle) setDelays(base, max time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.base, a.max = base, max
}

// failed records a failure from src and returns how long to wait before
// replying to it, and how many failures src has had lately.
func (a *authThrottle) failed(src netip.Prefix) (time.Duration, int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.now()
	r := a.sources[src]
	if r != nil && now.Sub(r.last) > authQuiet {
		r = nil
	}
	if r == nil {
		if len(a.sources) >= authMaxSources {
			a.evict(now)
		}
		r = &authRecord{}
		a.sources[src] = r
	}
	r.failures++
	r.last = now
	d := a.base << min(r.failures-1, 16)
	return min(d, a.max), r.failures
}

// evict makes room for one source.
func (a *authThrottle) evict(now time.Time) {
	for k, r := range a.sources {
		if now.Sub(r.last) > authQuiet {
			delete(a.sources, k)
		}
	}
	for k := range a.sources {
		if len(a.sources) < authMaxSources {
			break
		}
		delete(a.sources, k)
	}
}
