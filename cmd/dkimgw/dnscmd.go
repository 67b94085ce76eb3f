package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dkimgw/dkimgw/dnspub"
	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/rotation"
)

const (
	dnsUsage = "dns <pending|check> --config FILE [flags]"
	dnsLong  = `
dns shows DNS admins what dkimgw publishes, and checks what DNS serves.

  dkimgw dns pending --config F [--format zone|nsupdate] [--server HOST:PORT]
        the changes a manual publisher (dns.publishers.NAME.type: manual)
        waits for: the records to add, as zone-file lines with fully
        qualified names (append them to the zone, bump the serial;
        named-checkzone accepts the result), and those to delete, as
        comments; or, with --format nsupdate, a script for nsupdate(1)
        doing both (add -k KEYFILE). Changes DNS already shows are
        dropped from the list first. Rotation waits until every
        authoritative server serves the new records.
  dkimgw dns check --config F [--domain D] [--selector S] [--json]
        asks every authoritative server (dns.check_servers, or the zone's
        NS records), over UDP and TCP, for the record of every key of the
        rotating domains, and compares it with the key in the token and
        the key's state: an active, retired or visible key must be
        served exactly, a revoked one as "v=DKIM1; p=", a destroyed one
        not at all, and a key on its way in either exactly or not yet.

Exit status: 0 no mismatch (dns pending: printed); 1 a mismatch (dns
check), or a server could not be asked; 64 bad arguments; 75 the token
is unavailable, try again; 77 wrong PIN; 78 the configuration is invalid.`
)

var dnsCommand = &command{
	name:  "dns",
	usage: dnsUsage,
	short: "print pending DNS changes for the DNS admin, check what DNS serves",
	long:  dnsLong,
	run:   runDNS,
}

func runDNS(ctx context.Context, c *cli, args []string) int {
	if len(args) == 0 {
		return failf(c, exitUsage, "dns: missing subcommand; run 'dkimgw dns --help'")
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		fmt.Fprintf(c.stdout, "usage: dkimgw %s\n%s\n", dnsUsage, dnsLong)
		return exitOK
	case "pending":
		return dnsPending(ctx, c, args[1:])
	case "check":
		return dnsCheck(ctx, c, args[1:])
	}
	return failf(c, exitUsage, "dns: unknown subcommand %q; run 'dkimgw dns --help'", args[0])
}

func dnsPending(ctx context.Context, c *cli, args []string) int {
	const usage = "dns pending --config FILE [--format zone|nsupdate] [--server HOST:PORT]"
	fs := newFlagSet(c, "dns pending")
	path := fs.String("config", defaultConfig, "configuration `file`")
	format := fs.String("format", "zone", "zone (zone-file lines) or nsupdate (an nsupdate script)")
	server := fs.String("server", "", "the primary `host:port` for the nsupdate script's server line (default: nsupdate finds it from the SOA)")
	if code, ok := parseFlags(c, fs, usage, dnsLong, args); !ok {
		return code
	}
	if *format != "zone" && *format != "nsupdate" {
		return failf(c, exitUsage, "dns pending: --format must be zone or nsupdate")
	}
	cfg, code := loadRotating(c, *path)
	if cfg == nil {
		return code
	}
	setup, err := newRotation(cfg, nil, slog.New(slog.DiscardHandler), nil, defaultLockWait)
	if err != nil {
		return failf(c, setupExitCode(err), "%s: %v", *path, err)
	}
	defer setup.Close()
	if len(setup.manuals) == 0 {
		fmt.Fprintln(c.stdout, "; no rotating domain uses a manual publisher: nothing is published by hand")
		return exitOK
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	names := slices.Sorted(func(yield func(string) bool) {
		for n := range setup.manuals {
			if !yield(n) {
				return
			}
		}
	})
	nothing := true
	for _, name := range names {
		m := setup.manuals[name]
		zones, err := m.Zones()
		if err != nil {
			return failf(c, exitFailure, "dns pending: %v", err)
		}
		for _, zone := range zones {
			var ch *dnspub.Changes
			if chk, err := setup.checkers.forZone(zone); err == nil {
				ch, err = m.Settle(ctx, zone, chk)
				if err != nil {
					fmt.Fprintf(c.stderr, "dkimgw: warning: could not ask DNS which changes are done in %s: %v\n", zone, err)
				}
			}
			if ch == nil {
				if ch, err = m.Pending(zone); err != nil {
					return failf(c, exitFailure, "dns pending: %v", err)
				}
			}
			if ch.Empty() {
				continue
			}
			nothing = false
			if *format == "nsupdate" {
				fmt.Fprint(c.stdout, ch.NsupdateScript(*server))
			} else {
				fmt.Fprint(c.stdout, ch.ZoneFragment())
			}
		}
	}
	if nothing {
		fmt.Fprintln(c.stdout, "; nothing pending: DNS serves every record dkimgw asked for")
	}
	return exitOK
}

// checkResult is one key's record compared across the servers.
type checkResult struct {
	Domain   string         `json:"domain"`
	Selector string         `json:"selector"`
	State    rotation.State `json:"state"`
	Name     string         `json:"name"`
	Want     string         `json:"want,omitempty"` // "" for a name that should not exist
	Results  []serverResult `json:"servers"`
	OK       bool           `json:"ok"`
	Problems []string       `json:"problems,omitempty"`
}

type serverResult struct {
	Server string   `json:"server"`
	Net    string   `json:"net"`
	State  string   `json:"state"`
	Served []string `json:"served,omitempty"`
	TTL    int      `json:"ttl_s,omitempty"`
	Error  string   `json:"error,omitempty"`
}

func dnsCheck(ctx context.Context, c *cli, args []string) int {
	const usage = "dns check --config FILE [--domain D] [--selector S] [--json]"
	fs := newFlagSet(c, "dns check")
	path := fs.String("config", defaultConfig, "configuration `file`")
	domain := fs.String("domain", "", "only this `domain`")
	selector := fs.String("selector", "", "only this `selector`")
	asJSON := fs.Bool("json", false, "print JSON")
	var tf tokenFlags
	fs.DurationVar(&tf.timeout, "timeout", 2*time.Minute, "give up after this long")
	if code, ok := parseFlags(c, fs, usage, dnsLong, args); !ok {
		return code
	}
	cfg, code := loadRotating(c, *path)
	if cfg == nil {
		return code
	}
	ctx, cancel := tf.withTimeout(ctx)
	defer cancel()
	tok, err := hsm.Open(ctx, cfg.HSM.URI, hsm.Options{Logger: errorLogger(c), Getenv: c.getenv})
	if err != nil {
		return failToken(c, err, "%s: hsm.uri: %v", *path, err)
	}
	defer tok.Close()
	setup, err := newRotation(cfg, tok, slog.New(slog.DiscardHandler), nil, defaultLockWait)
	if err != nil {
		return failf(c, setupExitCode(err), "%s: %v", *path, err)
	}
	defer setup.Close()
	st, err := setup.rec.Status(ctx)
	if err != nil {
		return failf(c, rotateExitCode(err), "%v", err)
	}
	want := strings.TrimSuffix(strings.ToLower(*domain), ".")
	if want != "" && setup.policies[want].Domain == "" {
		return failf(c, exitUsage, "dns check: domain %q has no rotation policy", *domain)
	}
	var results []checkResult
	for _, s := range st {
		if (want != "" && s.Domain != want) || (*selector != "" && !strings.EqualFold(s.Selector, *selector)) {
			continue
		}
		if s.State == rotation.StatePlanned {
			continue
		}
		results = append(results, checkKey(ctx, setup, tok, s.Key))
	}
	if *selector != "" && len(results) == 0 {
		return failf(c, exitUsage, "dns check: no managed key with selector %q", *selector)
	}
	bad := 0
	for _, r := range results {
		if !r.OK {
			bad++
		}
	}
	if *asJSON {
		if results == nil {
			results = []checkResult{}
		}
		enc := json.NewEncoder(c.stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(results)
	} else {
		tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tSTATE\tSERVER\tSERVES")
		for _, r := range results {
			for _, s := range r.Results {
				what := s.State
				if s.Error != "" {
					what += ": " + s.Error
				}
				fmt.Fprintf(tw, "%s\t%s\t%s/%s\t%s\n", r.Name, r.State, s.Server, s.Net, what)
			}
		}
		tw.Flush()
		for _, r := range results {
			for _, p := range r.Problems {
				fmt.Fprintf(c.stdout, "MISMATCH %s (%s): %s\n", r.Name, r.State, p)
			}
		}
	}
	if bad > 0 {
		return failf(c, exitFailure, "dns check: %d of %d records do not match what dkimgw expects", bad, len(results))
	}
	if !*asJSON {
		fmt.Fprintf(c.stdout, "%d records checked: every server serves what dkimgw expects\n", len(results))
	}
	return exitOK
}

// checkKey compares what DNS serves for k with its lifecycle state, and
// the recorded value with the key in the token.
func checkKey(ctx context.Context, s *rotationSetup, tok *hsm.Token, k rotation.Key) checkResult {
	p := s.policies[k.Domain]
	r := checkResult{Domain: k.Domain, Selector: k.Selector, State: k.State, Name: hsm.RecordName(k.Domain, k.Selector)}
	var required, mayBeAbsent bool
	switch k.State {
	case rotation.StateGenerated, rotation.StatePublished:
		r.Want, mayBeAbsent = k.Record, true
	case rotation.StateVisible, rotation.StateActive, rotation.StateRetired:
		r.Want, required = k.Record, true
	case rotation.StateRevoked:
		r.Want, required = rotation.RevokedRecord, true
	case rotation.StateDestroyed:
		r.Want = ""
	}
	// The token's key must be the one recorded (and published), for
	// every state in which it signs or may sign.
	if k.State != rotation.StateDestroyed && k.State != rotation.StateRevoked {
		key, err := tok.Key(ctx, k.Domain, k.Selector)
		switch {
		case err != nil:
			r.Problems = append(r.Problems, fmt.Sprintf("the token: %v", err))
		default:
			if v, err := hsm.TXTRecord(key.Public()); err != nil || v != k.Record {
				r.Problems = append(r.Problems, "the token's public key is not the one recorded (and published) for this selector")
			}
		}
	}
	chk, err := s.checkers.forZone(p.Zone)
	if err != nil {
		r.Problems = append(r.Problems, err.Error())
		return r
	}
	rep, err := chk.Check(ctx, zoneOf(p), dnspub.Record{Name: r.Name + ".", Value: r.Want})
	if err != nil {
		r.Problems = append(r.Problems, err.Error())
		return r
	}
	for _, o := range rep.Observations {
		sr := serverResult{Server: o.Server, Net: o.Net, State: o.State.String(), Served: o.Served, TTL: int(o.TTL / time.Second)}
		if o.Err != nil {
			sr.Error = o.Err.Error()
		}
		r.Results = append(r.Results, sr)
		where := o.Server + "/" + o.Net
		switch {
		case o.State == dnspub.Failed:
			r.Problems = append(r.Problems, fmt.Sprintf("%s: no answer: %v", where, o.Err))
		case r.Want == "" && o.State != dnspub.Absent:
			r.Problems = append(r.Problems, fmt.Sprintf("%s still serves a record for a destroyed key: %.60q", where, o.Served))
		case r.Want == "":
		case o.State == dnspub.Different:
			r.Problems = append(r.Problems, fmt.Sprintf("%s serves %.60q, not the %s record", where, o.Served, k.State))
		case o.State == dnspub.Absent && required:
			r.Problems = append(r.Problems, fmt.Sprintf("%s does not serve the record of this %s key", where, k.State))
		case o.State == dnspub.Absent && !mayBeAbsent:
			r.Problems = append(r.Problems, fmt.Sprintf("%s does not serve the record", where))
		}
	}
	if len(rep.Observations) == 0 {
		r.Problems = append(r.Problems, "no authoritative server to ask")
	}
	r.OK = len(r.Problems) == 0
	return r
}

func zoneOf(p rotation.Policy) string {
	if p.Zone == "" {
		return p.Domain + "."
	}
	return p.Zone + "."
}
