package hsm

import (
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"strconv"
	"strings"
)

// URI is a parsed RFC 7512 PKCS#11 URI that addresses a token and says how
// to reach it, e.g.
//
//	pkcs11:token=dkim?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/dkimgw/pin
//
// Path attributes select the token: token (its label), serial, slot-id,
// manufacturer, model; every one given must match. Query attributes:
// module-path (required: the PKCS#11 library), pin-source (file:PATH, a
// plain absolute PATH, or env:NAME), pin-value (the PIN itself: for tests
// only, as it ends up in process listings and shell history), and
// max-sessions (the size of the session pool).
type URI struct {
	Token        string
	Serial       string
	SlotID       *uint
	Manufacturer string
	Model        string
	ModulePath   string
	PINSource    string
	PINValue     string
	MaxSessions  int
}

// ErrInvalidURI is wrapped by every error of ParseURI.
var ErrInvalidURI = errors.New("invalid PKCS#11 URI")

// ParseURI parses an RFC 7512 PKCS#11 URI. Attributes dkimgw does not use
// to find a token are refused rather than ignored, so that a URI copied
// from another tool (with object= or id=, say) does not silently address
// something other than what its author meant. Vendor attributes (x-...)
// are ignored, as RFC 7512 §2.3 allows.
func ParseURI(s string) (*URI, error) {
	rest, ok := cutPrefixFold(s, "pkcs11:")
	if !ok {
		return nil, errorf("%w: %q does not start with \"pkcs11:\"", ErrInvalidURI, redactURIText(s))
	}
	path, query, _ := strings.Cut(rest, "?")
	u := &URI{}
	seen := map[string]bool{}
	for attr := range strings.SplitSeq(path, ";") {
		if attr == "" {
			continue
		}
		name, value, err := splitAttr(attr, seen)
		if err != nil {
			return nil, err
		}
		switch name {
		case "token":
			u.Token = value
		case "serial":
			u.Serial = value
		case "manufacturer":
			u.Manufacturer = value
		case "model":
			u.Model = value
		case "slot-id":
			id, err := strconv.ParseUint(value, 10, 0)
			if err != nil {
				return nil, errorf("%w: slot-id %q is not a decimal number", ErrInvalidURI, value)
			}
			slot := uint(id)
			u.SlotID = &slot
		case "object", "id", "type":
			return nil, errorf("%w: path attribute %q selects a key; dkimgw selects keys by domain and selector, so the URI names only the token", ErrInvalidURI, name)
		default:
			if !strings.HasPrefix(name, "x-") {
				return nil, errorf("%w: unsupported path attribute %q (use token, serial, slot-id, manufacturer or model)", ErrInvalidURI, name)
			}
		}
	}
	for attr := range strings.SplitSeq(query, "&") {
		if attr == "" {
			continue
		}
		name, value, err := splitAttr(attr, seen)
		if err != nil {
			return nil, err
		}
		switch name {
		case "module-path":
			u.ModulePath = value
		case "pin-source":
			u.PINSource = value
		case "pin-value":
			u.PINValue = value
		case "max-sessions":
			n, err := strconv.Atoi(value)
			if err != nil || n < 1 || n > 1024 {
				return nil, errorf("%w: max-sessions %q must be a number from 1 to 1024", ErrInvalidURI, value)
			}
			u.MaxSessions = n
		case "module-name":
			return nil, errorf("%w: module-name is not supported; give the library's full path as module-path", ErrInvalidURI)
		default:
			if !strings.HasPrefix(name, "x-") {
				return nil, errorf("%w: unsupported query attribute %q (use module-path, pin-source, pin-value or max-sessions)", ErrInvalidURI, name)
			}
		}
	}
	if u.ModulePath == "" {
		return nil, errorf("%w: module-path is missing; add ?module-path=/path/to/pkcs11-module.so (SoftHSM: /usr/lib/softhsm/libsofthsm2.so)", ErrInvalidURI)
	}
	if u.PINSource != "" && u.PINValue != "" {
		return nil, errorf("%w: pin-source and pin-value are mutually exclusive", ErrInvalidURI)
	}
	return u, nil
}

func splitAttr(attr string, seen map[string]bool) (name, value string, err error) {
	rawName, rawValue, ok := strings.Cut(attr, "=")
	if !ok || rawName == "" {
		return "", "", errorf("%w: attribute %q is not name=value", ErrInvalidURI, redactAttr(attr))
	}
	name = strings.ToLower(rawName)
	if seen[name] {
		return "", "", errorf("%w: attribute %q given twice", ErrInvalidURI, name)
	}
	seen[name] = true
	// PathUnescape, not QueryUnescape: RFC 7512 values are percent-encoded
	// and a literal '+' is a plus, not a space.
	value, err = url.PathUnescape(rawValue)
	if err != nil {
		if name == "pin-value" {
			return "", "", errorf("%w: pin-value has a bad percent-encoding", ErrInvalidURI)
		}
		return "", "", errorf("%w: attribute %q: bad percent-encoding in %q", ErrInvalidURI, name, rawValue)
	}
	return name, value, nil
}

// PIN returns the user PIN the URI points to: pin-value, or the first line
// of the pin-source file, or the pin-source environment variable. A missing
// or empty source is an error, never an empty PIN, so that a typo in a path
// does not turn into a failed login that counts towards locking the token.
// A pin-source file that its group or others may access is refused, as ssh
// refuses such a private key file: the PIN is the key's only guard. Every
// error wraps ErrPINSource.
func (u *URI) PIN(getenv func(string) string) (string, error) {
	switch {
	case u.PINValue != "":
		return u.PINValue, nil
	case u.PINSource == "":
		return "", pinSourceError(errorf("no PIN: add pin-source=file:/path/to/pin or pin-source=env:NAME to the PKCS#11 URI"))
	}
	src := u.PINSource
	if name, ok := strings.CutPrefix(src, "env:"); ok {
		if getenv == nil {
			getenv = os.Getenv
		}
		pin := getenv(name)
		if pin == "" {
			return "", pinSourceError(errorf("pin-source env:%s: the environment variable is unset or empty", name))
		}
		return pin, nil
	}
	path := src
	if p, ok := strings.CutPrefix(src, "file://"); ok {
		path = p
	} else if p, ok := strings.CutPrefix(src, "file:"); ok {
		path = p
	}
	if !strings.HasPrefix(path, "/") {
		return "", pinSourceError(errorf("pin-source %q: want file:/absolute/path or env:NAME", src))
	}
	f, err := os.Open(path)
	if err != nil {
		return "", pinSourceError(errorf("read PIN from pin-source: %w", err))
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", pinSourceError(errorf("read PIN from pin-source: %w", err))
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return "", pinSourceError(errorf("pin-source %s is accessible by group or others (mode %04o); run chmod 600 %s", path, perm, path))
	}
	data, err := io.ReadAll(io.LimitReader(f, maxPINFileBytes))
	if err != nil {
		return "", pinSourceError(errorf("read PIN from pin-source: %w", err))
	}
	pin, _, _ := strings.Cut(string(data), "\n")
	pin = strings.TrimRight(pin, "\r")
	if pin == "" {
		return "", pinSourceError(errorf("pin-source %s: the file's first line is empty", path))
	}
	return pin, nil
}

// pinSourceError marks err as a pin-source problem (errors.Is
// ErrPINSource) without changing its text.
func pinSourceError(err error) error { return pinSourceErr{err} }

type pinSourceErr struct{ err error }

func (e pinSourceErr) Error() string        { return e.err.Error() }
func (e pinSourceErr) Unwrap() error        { return e.err }
func (e pinSourceErr) Is(target error) bool { return target == ErrPINSource }

// maxPINFileBytes bounds what is read of a pin-source: a PIN is short, and
// a pin-source pointing at a huge file is a mistake.
const maxPINFileBytes = 64 << 10

// String renders the URI with any pin-value replaced by "***", so it is
// safe to log and to put into error messages.
func (u *URI) String() string {
	var path []string
	add := func(list *[]string, name, value string) {
		if value != "" {
			*list = append(*list, name+"="+escapeAttr(value))
		}
	}
	add(&path, "token", u.Token)
	add(&path, "serial", u.Serial)
	if u.SlotID != nil {
		add(&path, "slot-id", strconv.FormatUint(uint64(*u.SlotID), 10))
	}
	add(&path, "manufacturer", u.Manufacturer)
	add(&path, "model", u.Model)
	var query []string
	add(&query, "module-path", u.ModulePath)
	add(&query, "pin-source", u.PINSource)
	if u.PINValue != "" {
		query = append(query, "pin-value=***")
	}
	if u.MaxSessions > 0 {
		add(&query, "max-sessions", strconv.Itoa(u.MaxSessions))
	}
	s := "pkcs11:" + strings.Join(path, ";")
	if len(query) > 0 {
		s += "?" + strings.Join(query, "&")
	}
	return s
}

// escapeAttr percent-encodes what RFC 7512 does not allow unescaped in an
// attribute value; '/' and ':' stay readable, as in module paths.
func escapeAttr(v string) string {
	var b strings.Builder
	for i := 0; i < len(v); i++ {
		c := v[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9',
			c == '-', c == '.', c == '_', c == '~', c == '/', c == ':', c == '@', c == '!', c == '$', c == '\'', c == '(', c == ')', c == '*', c == '+', c == ',':
			b.WriteByte(c)
		default:
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

func cutPrefixFold(s, prefix string) (string, bool) {
	if len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix) {
		return s[len(prefix):], true
	}
	return s, false
}

// redactURIText hides a pin-value in a URI that did not parse, so that
// the error that quotes it can be logged. It matches ASCII case-insensitively
// byte by byte: strings.ToLower would change the length of invalid UTF-8 and
// misplace the cut (a fuzzer found that).
func redactURIText(s string) string {
	const key = "pin-value="
	for i := 0; i+len(key) <= len(s); i++ {
		if !asciiEqualFold(s[i:i+len(key)], key) {
			continue
		}
		rest := s[i+len(key):]
		if end := strings.IndexAny(rest, "&;"); end >= 0 {
			return s[:i] + key + "***" + redactURIText(rest[end:])
		}
		return s[:i] + key + "***"
	}
	return s
}

func asciiEqualFold(a, b string) bool {
	for i := 0; i < len(a); i++ {
		x, y := a[i], b[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

func redactAttr(attr string) string {
	if len(attr) >= len("pin-value") && asciiEqualFold(attr[:len("pin-value")], "pin-value") {
		return "pin-value=***"
	}
	return attr
}
