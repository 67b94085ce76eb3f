package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dkimgw/dkimgw/audit"
	"github.com/dkimgw/dkimgw/dnspub"
	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/rotation"
)

// Severities of findings; only errors change the exit status.
const (
	sevError   = "error"
	sevWarning = "warning"
	sevNote    = "note"
)

// defaultMaxKeyAge is the age past which a key with no rotation policy
// is flagged: twice a year is the usual advice for DKIM keys (M3AAWG).
const defaultMaxKeyAge = 180 * 24 * time.Hour

type finding struct {
	Severity string `json:"severity"`
	Domain   string `json:"domain,omitempty"`
	Selector string `json:"selector,omitempty"`
	Message  string `json:"message"`
}

// reviewKey is one key of the review: in the token, in the
// configuration, in the rotation state, or seen in DNS.
type reviewKey struct {
	Domain    string `json:"domain,omitempty"`
	Selector  string `json:"selector,omitempty"`
	Label     string `json:"label"`
	InToken   bool   `json:"in_token"`
	ID        string `json:"id,omitempty"`
	Algorithm string `json:"algorithm,omitempty"`
	Bits      int    `json:"bits,omitempty"`
	// Created is when the key was made, from AgeSource: token
	// (CKA_START_DATE), rotation state, audit log, or unknown.
	Created     time.Time `json:"created,omitzero"`
	AgeSource   string    `json:"age_source"`
	AgeDays     *float64  `json:"age_days,omitempty"`
	State       string    `json:"state"`
	Extractable bool      `json:"extractable"`
	Sensitive   bool      `json:"sensitive"`
	Local       bool      `json:"local"`
	// DNS is what the authoritative servers serve at the key's name:
	// "matches" (every server, UDP and TCP), "absent", "revoked",
	// "different", "mixed", "unchecked" or "failed".
	DNS        string   `json:"dns"`
	DNSDetails []string `json:"dns_details,omitempty"`

	info     *hsm.KeyInfo
	status   *rotation.Status
	active   bool
	policy   *policy.Rotation
	want     string // the record the token key makes
	servesPK bool   // some server serves a non-revoked DKIM key
}

type reviewReport struct {
	Token    string       `json:"token"`
	Ed25519  bool         `json:"ed25519"`
	Keys     []*reviewKey `json:"keys"`
	Findings []finding    `json:"findings"`
}

func auditReview(ctx context.Context, c *cli, args []string) int {
	fs := newFlagSet(c, "audit")
	path := fs.String("config", defaultConfig, "configuration `file`")
	asJSON := fs.Bool("json", false, "print JSON")
	var tf tokenFlags
	fs.DurationVar(&tf.timeout, "timeout", 5*time.Minute, "give up after this long")
	if code, ok := parseFlags(c, fs, auditUsage, auditLong, args); !ok {
		return code
	}
	cfg, err := loadConfig(c.getenv, *path)
	if err != nil {
		return failf(c, exitConfig, "invalid configuration:\n%v", err)
	}
	ctx, cancel := tf.withTimeout(ctx)
	defer cancel()
	tok, err := hsm.Open(ctx, cfg.HSM.URI, hsm.Options{Logger: errorLogger(c), Getenv: c.getenv})
	if err != nil {
		return failToken(c, err, "%s: hsm.uri: %v", *path, err)
	}
	defer tok.Close()
	rep, err := review(ctx, cfg, tok, time.Now())
	if err != nil {
		return failToken(c, err, "audit: %v", err)
	}
	code := exitOK
	for _, f := range rep.Findings {
		if f.Severity == sevError {
			code = exitFailure
		}
	}
	if *asJSON {
		enc := json.NewEncoder(c.stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return failf(c, exitFailure, "audit: %v", err)
		}
		return code
	}
	fmt.Fprintf(c.stdout, "token %q: Ed25519 %s\n\n", rep.Token, yesNo(rep.Ed25519))
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tALGORITHM\tAGE\tSTATE\tEXTRACTABLE\tSENSITIVE\tLOCAL\tDNS")
	for _, k := range rep.Keys {
		age := "unknown"
		if k.AgeDays != nil {
			age = fmt.Sprintf("%.0fd (%s)", *k.AgeDays, k.AgeSource)
		}
		alg := k.Algorithm
		if !k.InToken {
			alg = "(not in token)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", k.Label, alg, age, k.State, yesNo(k.Extractable), yesNo(k.Sensitive), yesNo(k.Local), k.DNS)
	}
	tw.Flush()
	fmt.Fprintln(c.stdout)
	if len(rep.Findings) == 0 {
		fmt.Fprintln(c.stdout, "no findings")
	}
	for _, f := range rep.Findings {
		subject := f.Domain
		if f.Selector != "" {
			subject = hsm.RecordName(f.Domain, f.Selector)
		}
		if subject == "" {
			subject = "token"
		}
		fmt.Fprintf(c.stdout, "%s: %s: %s\n", strings.ToUpper(f.Severity), subject, f.Message)
	}
	return code
}

// review gathers the keys of the token, the configuration and the
// rotation state, asks DNS about each, and lists the findings.
func review(ctx context.Context, cfg *policy.Config, tok *hsm.Token, now time.Time) (*reviewReport, error) {
	rep := &reviewReport{Token: tok.Info().Label, Ed25519: tok.SupportsEd25519(), Keys: []*reviewKey{}, Findings: []finding{}}
	add := func(sev, domain, selector, format string, args ...any) {
		rep.Findings = append(rep.Findings, finding{sev, domain, selector, fmt.Sprintf(format, args...)})
	}
	byName := map[string]*reviewKey{}
	get := func(domain, selector string) *reviewKey {
		label := hsm.RecordName(domain, selector)
		k := byName[label]
		if k == nil {
			k = &reviewKey{Domain: domain, Selector: selector, Label: label, AgeSource: "unknown", State: "unknown", DNS: "unchecked"}
			byName[label] = k
			rep.Keys = append(rep.Keys, k)
		}
		return k
	}

	infos, err := tok.Keys(ctx)
	if err != nil {
		return nil, err
	}
	for i := range infos {
		k := get(infos[i].Domain, infos[i].Selector)
		k.info, k.InToken = &infos[i], true
		k.State = "unused (not configured)"
	}
	if ak, err := tok.AuditKey(ctx); err == nil {
		info := ak.Info()
		info.Label = hsm.AuditKeyLabel
		rep.Keys = append(rep.Keys, &reviewKey{Label: hsm.AuditKeyLabel, InToken: true, info: &info, AgeSource: "unknown", State: "audit key", DNS: "n/a"})
	} else if !errors.Is(err, hsm.ErrKeyNotFound) {
		return nil, err
	}
	for _, ref := range cfg.Selectors() {
		k := get(ref.Domain, ref.Selector)
		k.State, k.active = "configured (signs)", true
	}
	var statuses []rotation.Status
	var checkers *zoneCheckers
	var setup *rotationSetup
	if len(cfg.Rotating()) > 0 {
		setup, err = newRotation(cfg, nil, slog.New(slog.DiscardHandler), nil, defaultLockWait)
		if err != nil {
			return nil, err
		}
		defer setup.Close()
		checkers = setup.checkers
		if statuses, err = setup.rec.Status(ctx); err != nil {
			return nil, err
		}
	}
	// Selectors the rotating domains' publishers hold, which neither the
	// configuration nor the state may know (a record left behind, one
	// published by hand).
	if setup != nil {
		for _, d := range cfg.Rotating() {
			r := cfg.Domains[d].Rotation
			lctx, cancel := context.WithTimeout(ctx, time.Minute)
			recs, err := setup.pubs[r.Publisher].GetRecords(lctx, r.Zone+".")
			cancel()
			if err != nil {
				add(sevWarning, d, "", "could not list the records of zone %s: %v", r.Zone, err)
				continue
			}
			for _, rec := range recs {
				name := strings.ToLower(strings.TrimSuffix(rec.Name, "."))
				if name != r.Zone && !strings.HasSuffix(name, "."+r.Zone) {
					name += "." + r.Zone
				}
				if sel, dom, ok := strings.Cut(name, "._domainkey."); ok && dom == d && !strings.Contains(sel, ".") {
					if k := get(d, sel); k.State == "unknown" {
						k.State = "in DNS only"
					}
				}
			}
		}
	}
	for i := range statuses {
		s := &statuses[i]
		k := get(s.Domain, s.Selector)
		k.status, k.State = s, string(s.State)
		if s.Compromised {
			k.State += " (compromised)"
		}
		k.active = s.State == rotation.StateActive
		r := cfg.Domains[s.Domain].Rotation
		k.policy = r
	}

	created := auditLogCreation(cfg.Audit.Path)
	for _, k := range rep.Keys {
		if i := k.info; i != nil {
			k.ID, k.Algorithm, k.Bits = i.IDHex(), string(i.Algorithm), i.Bits
			k.Extractable, k.Sensitive, k.Local = i.Extractable, i.Sensitive, i.Local
			if i.Public != nil {
				k.want, _ = hsm.TXTRecord(i.Public)
			}
		}
		switch {
		case k.info != nil && !k.info.Start.IsZero():
			k.Created, k.AgeSource = k.info.Start, "token"
		case k.status != nil && !k.status.CreatedAt.IsZero():
			k.Created, k.AgeSource = k.status.CreatedAt, "rotation state"
		case !created[k.Label+"/"+k.ID].IsZero():
			k.Created, k.AgeSource = created[k.Label+"/"+k.ID], "audit log"
		}
		if !k.Created.IsZero() {
			days := now.Sub(k.Created).Hours() / 24
			k.AgeDays = &days
		}
	}

	// DNS, for every DKIM name.
	fixed := fixedChecker(cfg)
	for _, k := range rep.Keys {
		if k.Domain == "" {
			continue
		}
		var ch *dnspub.Checker
		zone := k.Domain
		if r := cfg.Domains[k.Domain].Rotation; r != nil && checkers != nil {
			zone = r.Zone
			ch, _ = checkers.forZone(zone)
		} else {
			ch = fixed
		}
		if ch == nil {
			k.DNS = "unchecked"
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, time.Minute)
		r, err := ch.Check(cctx, zone+".", dnspub.Record{Name: k.Label + ".", Value: k.want})
		cancel()
		if err != nil {
			k.DNS, k.DNSDetails = "failed", []string{err.Error()}
			continue
		}
		k.DNS, k.DNSDetails, k.servesPK = dnsVerdict(r, k.want)
	}

	findings(cfg, tok, rep, now, add)
	return rep, nil
}

// dnsVerdict sums up what the servers serve at a key's name.
func dnsVerdict(r *dnspub.Report, want string) (verdict string, details []string, servesKey bool) {
	kinds := map[string]bool{}
	for _, o := range r.Observations {
		kind := ""
		switch {
		case o.State == dnspub.Failed:
			kind = "failed"
		case o.State == dnspub.Absent:
			kind = "absent"
		case want != "" && o.State == dnspub.Present:
			kind = "matches"
		case len(o.Served) == 1 && isRevoked(o.Served[0]):
			kind = "revoked"
		default:
			kind = "different"
		}
		for _, v := range o.Served {
			if strings.Contains(v, "p=") && !isRevoked(v) {
				servesKey = true
			}
		}
		kinds[kind] = true
		d := fmt.Sprintf("%s/%s: %s", o.Server, o.Net, kind)
		if o.Err != nil {
			d += ": " + o.Err.Error()
		}
		details = append(details, d)
	}
	switch len(kinds) {
	case 0:
		return "failed", details, servesKey
	case 1:
		for k := range kinds {
			return k, details, servesKey
		}
	}
	return "mixed", details, servesKey
}

// isRevoked reports whether a DKIM record has an empty p= (RFC 6376
// §3.6.1).
func isRevoked(v string) bool {
	for _, tag := range strings.Split(v, ";") {
		name, val, _ := strings.Cut(tag, "=")
		if strings.TrimSpace(name) == "p" {
			return strings.TrimSpace(val) == ""
		}
	}
	return false
}

// fixedChecker asks dns.check_servers (or the zone's NS records through
// dns.resolver) about domains with fixed selectors; nil when neither is
// set.
func fixedChecker(cfg *policy.Config) *dnspub.Checker {
	if len(cfg.DNS.CheckServers) == 0 && cfg.DNS.Resolver == "" {
		return nil
	}
	c, err := dnspub.NewChecker(dnspub.CheckerOptions{Servers: cfg.DNS.CheckServers, Resolver: cfg.DNS.Resolver, Timeout: cfg.DNS.Timeout.D()})
	if err != nil {
		return nil
	}
	return c
}

// auditLogCreation reads when each key was generated from the audit
// log's "key generated" records, by label and key id.
func auditLogCreation(path string) map[string]time.Time {
	out := map[string]time.Time{}
	f, err := os.Open(path)
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var r audit.Record
		if json.Unmarshal(sc.Bytes(), &r) != nil || r.Event != audit.EventKeyGenerated || r.Details["result"] == "failed" {
			continue
		}
		label := hsm.AuditKeyLabel
		if r.Domain != "" {
			label = hsm.RecordName(r.Domain, r.Selector)
		}
		if r.KeyID != "" {
			out[label+"/"+r.KeyID] = r.Time
		}
	}
	return out
}

func findings(cfg *policy.Config, tok *hsm.Token, rep *reviewReport, now time.Time, add func(sev, domain, selector, format string, args ...any)) {
	for _, k := range rep.Keys {
		d, s := k.Domain, k.Selector
		if k.Label == hsm.AuditKeyLabel {
			d, s = "", ""
		}
		if i := k.info; i != nil {
			if i.Algorithm.IsRSA() && i.Bits < 2048 {
				add(sevError, d, s, "RSA-%d is below 2048 bits (RFC 8301): replace the key", i.Bits)
			}
			if i.Extractable || !i.NeverExtractable {
				add(sevError, d, s, "%s key is or was extractable: it may exist outside the token; replace it", k.Label)
			}
			if !i.Local {
				add(sevError, d, s, "%s key was not generated in the token (CKA_LOCAL=false): a copy may exist outside it; replace it", k.Label)
			}
			if !i.Sensitive {
				add(sevError, d, s, "%s key is not sensitive: its private half can be read from the token", k.Label)
			}
		}
		if k.AgeDays != nil && k.Domain != "" {
			limit, why := defaultMaxKeyAge, "180 days (no rotation policy)"
			if k.policy != nil {
				limit, why = k.policy.Interval.D(), "its rotation interval "+k.policy.Interval.D().String()
			}
			age := time.Duration(*k.AgeDays * 24 * float64(time.Hour))
			if (k.active || k.status == nil) && age > limit {
				add(sevWarning, d, s, "key is %.0f days old, older than %s: rotate it", *k.AgeDays, why)
			}
		}
		if k.Domain == "" {
			continue
		}
		switch {
		case k.active && k.DNS == "unchecked":
			add(sevNote, d, s, "DNS not checked: set dns.check_servers (or dns.resolver) to check the records of fixed selectors")
		case k.active && !k.InToken:
			add(sevError, d, s, "configured to sign, but the token has no such key")
		case k.active && k.DNS == "failed":
			add(sevWarning, d, s, "DNS could not be checked: %s", strings.Join(k.DNSDetails, "; "))
		case k.active && k.DNS != "matches":
			add(sevError, d, s, "signs, but DNS does not serve its record everywhere (%s): mail fails DKIM; %s", k.DNS, strings.Join(k.DNSDetails, "; "))
		}
		if k.servesPK && !k.InToken {
			add(sevError, d, s, "DNS publishes a key for this selector, but the token has no key for it: whoever holds that key can sign as the domain; withdraw the record")
		}
		if st := k.status; st != nil && k.servesPK && k.policy != nil {
			pastGrace := st.State == rotation.StateRetired && !st.RetiredAt.IsZero() && now.Sub(st.RetiredAt) > k.policy.Grace.D()
			if pastGrace || st.State == rotation.StateRevoked || st.State == rotation.StateDestroyed {
				add(sevWarning, d, s, "retired key past its grace period is still published (state %s): revoke its record", st.State)
			}
		}
	}
	// Dual signing, per domain.
	for _, d := range slices.Sorted(maps.Keys(cfg.Domains)) {
		dom := cfg.Domains[d]
		hasEd := false
		if dom.Rotation != nil {
			hasEd = slices.Contains(dom.Rotation.Algorithms, "ed25519")
		} else {
			for _, k := range rep.Keys {
				if k.Domain == d && k.active && k.info != nil && k.info.Algorithm == hsm.Ed25519 {
					hasEd = true
				}
			}
		}
		if !hasEd && rep.Ed25519 {
			add(sevWarning, d, "", "no Ed25519 signature next to RSA (dual signing, RFC 8463), though the token supports Ed25519")
		}
	}
	if !rep.Ed25519 {
		add(sevNote, "", "", "the token cannot make Ed25519 keys: no dual signing until it can")
	}
	if p := pinFile(cfg.HSM.URI); p != "" {
		if fi, err := os.Stat(p); err == nil && fi.Mode().Perm()&0o077 != 0 {
			add(sevError, "", "", "PIN file %s is readable by group or others (mode %s): chmod 600 it", p, fi.Mode().Perm())
		}
	}
}

// pinFile is the file of the URI's pin-source, or "".
func pinFile(uri string) string {
	u, err := hsm.ParseURI(uri)
	if err != nil || u.PINSource == "" || strings.HasPrefix(u.PINSource, "env:") {
		return ""
	}
	return strings.TrimPrefix(u.PINSource, "file:")
}
