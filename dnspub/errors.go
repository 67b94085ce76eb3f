package dnspub

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/miekg/dns"
)

// Sentinels that an *Error matches with errors.Is, one per thing the
// operator has to fix.
var (
	// ErrRefused: the server does not let this key make this change
	// (REFUSED, or NOTAUTH without a TSIG error).
	ErrRefused = errors.New("update refused")
	// ErrTSIG: the TSIG key was not accepted (BADKEY, BADSIG, BADTIME) or
	// the server's answer did not verify.
	ErrTSIG = errors.New("TSIG authentication failed")
	// ErrConflict: a prerequisite failed or the record holds another
	// value than the one expected: someone else changed it, and dkimgw
	// left it as it is.
	ErrConflict = errors.New("the record is not what dkimgw expects")
	// ErrTimeout: the server did not answer in time.
	ErrTimeout = errors.New("no answer in time")
	// ErrServer: the server failed (SERVFAIL and other codes) or could
	// not be reached.
	ErrServer = errors.New("server failed")
)

// Error is a failed exchange with a DNS server. Its message names the
// zone, the server and what to do; errors.Is matches one of the ErrXxx
// sentinels.
type Error struct {
	Op     string // "update", "query", "transfer"
	Zone   string
	Server string
	Name   string // the record's owner, when the exchange was about one
	Key    string // the TSIG key's name, when signed
	// Rcode is the server's response code (with the TSIG error, when
	// there was one, in TSIGError); -1 when there was no answer.
	Rcode     int
	TSIGError uint16
	// Served is what the server holds at Name, for ErrConflict.
	Served []string
	Kind   error // one of the ErrXxx sentinels
	Hint   string
	Err    error // the underlying error, if any
}

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "dnspub: %s", e.Op)
	if e.Name != "" {
		fmt.Fprintf(&b, " of %s", e.Name)
	}
	fmt.Fprintf(&b, " in zone %s at %s: %s", e.Zone, e.Server, e.Kind)
	switch {
	case e.TSIGError != 0:
		fmt.Fprintf(&b, " (%s, %s)", rcodeString(e.Rcode), rcodeString(int(e.TSIGError)))
	case e.Rcode >= 0:
		fmt.Fprintf(&b, " (%s)", rcodeString(e.Rcode))
	}
	if e.Err != nil {
		fmt.Fprintf(&b, ": %v", e.Err)
	}
	if len(e.Served) > 0 {
		fmt.Fprintf(&b, "; the server holds %q", e.Served)
	}
	if e.Hint != "" {
		b.WriteString(": " + e.Hint)
	}
	return b.String()
}

func (e *Error) Unwrap() []error {
	if e.Err != nil {
		return []error{e.Kind, e.Err}
	}
	return []error{e.Kind}
}

// Temporary reports whether trying again later may succeed without
// anyone changing a configuration: timeouts and server failures.
func (e *Error) Temporary() bool {
	return e.Kind == ErrTimeout || e.Kind == ErrServer
}

func rcodeString(rc int) string {
	if s, ok := dns.RcodeToString[rc]; ok {
		return s
	}
	return fmt.Sprintf("RCODE%d", rc)
}

// classify turns the outcome of an exchange into nil or an *Error. e
// carries Op, Zone, Server, Name and Key; resp and err are what the
// client returned (miekg/dns returns the response together with a TSIG
// verification error).
func classify(e *Error, resp *dns.Msg, err error) error {
	e.Rcode = -1
	if resp == nil {
		e.Err = err
		var ne net.Error
		switch {
		case errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout():
			e.Kind = ErrTimeout
			e.Hint = "check that the server runs and that TCP and UDP to it are not filtered"
		case errors.Is(err, context.Canceled):
			return err
		default:
			e.Kind = ErrServer
			e.Hint = "check the server address and that the server runs"
		}
		return e
	}
	e.Rcode = resp.Rcode
	if t := resp.IsTsig(); t != nil && t.Error != 0 {
		e.TSIGError = t.Error
		e.Kind = ErrTSIG
		switch t.Error {
		case dns.RcodeBadKey:
			e.Hint = fmt.Sprintf("the server does not know key %s with this algorithm: the key's name and algorithm must be those of the server's key statement", e.Key)
		case dns.RcodeBadSig:
			e.Hint = fmt.Sprintf("the server rejected the signature of key %s: the secret file does not hold the secret the server has for it", e.Key)
		case dns.RcodeBadTime:
			e.Hint = "the server's clock and this host's differ by more than the 300 s TSIG allows: check NTP on both"
		default:
			e.Hint = fmt.Sprintf("check key %s on the server", e.Key)
		}
		return e
	}
	switch resp.Rcode {
	case dns.RcodeSuccess:
		if err != nil {
			e.Kind, e.Err = ErrTSIG, err
			e.Hint = "the server's answer did not verify with the key: check the secret"
			return e
		}
		return nil
	case dns.RcodeRefused, dns.RcodeNotAuth:
		e.Kind = ErrRefused
		e.Hint = fmt.Sprintf("check that the server is the primary of %s and that its update-policy (BIND) or acl (Knot) grants key %s updates of TXT records below _domainkey.%s", e.Zone, keyOrNone(e.Key), e.Zone)
		switch e.Op {
		case "transfer":
			e.Hint = fmt.Sprintf("check that the server is authoritative for %s and allows key %s to transfer the zone", e.Zone, keyOrNone(e.Key))
		case "query":
			e.Hint = fmt.Sprintf("check that the server is authoritative for %s and answers this host's queries", e.Zone)
		}
	case dns.RcodeYXRrset, dns.RcodeNXRrset, dns.RcodeYXDomain, dns.RcodeNameError:
		e.Kind = ErrConflict
		e.Hint = "the record changed between dkimgw's read and its update; nothing was changed: see who else edits it"
	case dns.RcodeNotZone:
		e.Kind = ErrRefused
		e.Hint = fmt.Sprintf("the name is not in zone %s as the server has it: check the zone setting", e.Zone)
	default:
		e.Kind = ErrServer
		e.Hint = "see the server's log"
	}
	return e
}

func keyOrNone(k string) string {
	if k == "" {
		return "(none)"
	}
	return k
}
