package policy

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// ErrBadCredentials is returned by [Config.Authenticate] for an unknown
// user or a wrong password (which of the two is not told, on purpose).
var ErrBadCredentials = errors.New("policy: bad user name or password")

// UnauthorizedError says that a client may not have mail of a From domain
// signed.
type UnauthorizedError struct {
	Client     string // the client's name
	FromDomain string // normalised From domain
}

func (e *UnauthorizedError) Error() string {
	return fmt.Sprintf("policy: client %q may not send mail From domain %q", e.Client, e.FromDomain)
}

// Signing is the identity that signs one message.
type Signing struct {
	// Domain is d=: the From domain or its nearest parent listed under
	// domains.
	Domain string
	// Selectors sign the message, one signature each, in order. Empty
	// when Rotating: the domain's active keys sign it.
	Selectors []string
	// Rotating is set for a domain with a rotation policy: its selectors
	// are those of its active keys, which the key source knows; with none
	// active yet the message cannot be signed (451 4.7.0, or unsigned with
	// on_token_error: relay-unsigned).
	Rotating bool
	// Expire is the x= offset; zero for none.
	Expire time.Duration
}

// ClientByAddr returns the client whose networks contain ip, or nil.
// IPv4-mapped IPv6 addresses count as IPv4. A client with RequireAuth is
// never recognised by its address.
func (c *Config) ClientByAddr(ip netip.Addr) *Client {
	ip = ip.Unmap().WithZone("")
	for _, p := range c.prefixes {
		if p.prefix.Contains(ip) {
			return p.client
		}
	}
	return nil
}

// dummyHashOf returns the maker of the hash that Authenticate compares
// against when a user is unknown, so that the time it takes does not tell
// which user names exist. Its cost is the highest of the configured
// hashes' (bcrypt's time doubles with each step of cost, so a cheaper
// dummy would tell). It is made on first use: every dkimgw command and
// test binary would otherwise pay for a bcrypt hash at start.
func dummyHashOf(cost int) func() []byte {
	if cost < bcrypt.MinCost {
		cost = bcrypt.DefaultCost
	}
	return sync.OnceValue(func() []byte {
		h, _ := bcrypt.GenerateFromPassword([]byte("dkimgw timing equaliser"), cost)
		return h
	})
}

// defaultDummyHash serves a Config not made by Parse.
var defaultDummyHash = dummyHashOf(bcrypt.DefaultCost)

// Authenticate checks a user name and password against the users'
// bcrypt hashes and returns the user's client, or ErrBadCredentials. It
// is deliberately slow (bcrypt), as slow for an unknown user as for a
// known one. It does not look at where the user logs in from: see
// [Client.AuthFrom].
func (c *Config) Authenticate(user, password string) (*Client, error) {
	u := c.users[user]
	dummy := c.dummyHash
	if dummy == nil {
		dummy = defaultDummyHash
	}
	var hash []byte
	if u != nil && u.hash != nil {
		hash = u.hash
	} else {
		hash = dummy()
	}
	if err := bcrypt.CompareHashAndPassword(hash, []byte(password)); err != nil || u == nil {
		return nil, ErrBadCredentials
	}
	return u.client, nil
}

// HasUsers reports whether any client authenticates with SMTP AUTH, that
// is whether AUTH should be offered at all.
func (c *Config) HasUsers() bool { return len(c.users) > 0 }

// Allows reports whether the client may have mail From fromDomain
// signed: the domain is one of its domains or a subdomain of one.
func (cl *Client) Allows(fromDomain string) bool {
	d := normalizeDomain(fromDomain)
	for _, allowed := range cl.Domains {
		if isSubdomain(d, allowed) {
			return true
		}
	}
	return false
}

// SigningDomain returns d= for mail From fromDomain: the domain itself or
// its nearest parent listed under domains (DMARC relaxed alignment), or
// false when there is none.
func (c *Config) SigningDomain(fromDomain string) (string, bool) {
	return c.signingDomain(normalizeDomain(fromDomain))
}

func (c *Config) signingDomain(d string) (string, bool) {
	for d != "" {
		if _, ok := c.Domains[d]; ok {
			return d, true
		}
		_, parent, found := strings.Cut(d, ".")
		if !found {
			break
		}
		d = parent
	}
	return "", false
}

// Sign decides who signs a message that client relays with a From
// address in fromDomain. It returns an *[UnauthorizedError] when the
// client may not use that domain (or the domain has no signing entry);
// what happens then is c.OnUnauthorized.
func (c *Config) Sign(client *Client, fromDomain string) (Signing, error) {
	from := normalizeDomain(fromDomain)
	name := ""
	if client != nil {
		name = client.Name
	}
	if client == nil || !client.Allows(from) {
		return Signing{}, &UnauthorizedError{Client: name, FromDomain: from}
	}
	d, ok := c.signingDomain(from)
	if !ok {
		// Validation makes every client domain covered, so this means a
		// configuration built by hand; refuse rather than sign nothing.
		return Signing{}, &UnauthorizedError{Client: name, FromDomain: from}
	}
	dom := c.Domains[d]
	return Signing{Domain: d, Selectors: slices.Clone(dom.Selectors), Expire: dom.Expire, Rotating: dom.Rotation != nil}, nil
}

// Selectors lists every (domain, selector) pair the configuration signs
// with, for a start-up or `config check` test that each key exists.
func (c *Config) Selectors() []KeyRef {
	var refs []KeyRef
	for d, dom := range c.Domains {
		for _, s := range dom.Selectors {
			refs = append(refs, KeyRef{Domain: d, Selector: s})
		}
	}
	slices.SortFunc(refs, func(a, b KeyRef) int {
		return cmp.Or(strings.Compare(a.Domain, b.Domain), strings.Compare(a.Selector, b.Selector))
	})
	return refs
}

// KeyRef names one token key.
type KeyRef struct{ Domain, Selector string }

// isSubdomain reports whether d is parent or a subdomain of it.
func isSubdomain(d, parent string) bool {
	return d == parent || strings.HasSuffix(d, "."+parent)
}

// ClientByUser returns the client of an SMTP AUTH user (already
// authenticated) logged in from ip, or nil when the user is unknown (a
// reload may have removed it) or its client does not take logins from ip.
func (c *Config) ClientByUser(user string, ip netip.Addr) *Client {
	if u := c.users[user]; u != nil && u.client.AuthFrom(ip) {
		return u.client
	}
	return nil
}

// AuthFrom reports whether the client's users may log in from ip: from
// anywhere, unless the client has RequireAuth, which limits logins to its
// networks.
func (cl *Client) AuthFrom(ip netip.Addr) bool {
	if !cl.RequireAuth {
		return true
	}
	ip = ip.Unmap().WithZone("")
	for _, p := range cl.prefixes {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// ActionOnTokenError returns what happens to a message whose key cannot be
// used: c.OnTokenError, as a method so that the relay can ask it through
// an interface.
func (c *Config) ActionOnTokenError() TokenErrorAction { return c.OnTokenError }

// ActionOnUnauthorized returns what happens to a message whose From
// domain its client may not have signed: c.OnUnauthorized, as a method
// so that the relay can ask it through an interface.
func (c *Config) ActionOnUnauthorized() UnauthorizedAction { return c.OnUnauthorized }
