package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/dkimgw/dkimgw/audit"
	"github.com/dkimgw/dkimgw/hsm"
)

const keysUsage = "keys <generate|list|dns|destroy> [flags]"

var keysCommand = &command{
	name:  "keys",
	usage: keysUsage,
	short: "generate, list, publish and destroy keys in the token",
	long:  keysLong,
	run:   runKeys,
}

const keysLong = `Keys are generated inside the PKCS#11 token and never leave it: the
private key is sensitive, non-extractable and may only sign. A key is
identified by its domain and selector; its token objects are labelled
"<selector>._domainkey.<domain>", the DNS name of its record.

  dkimgw keys generate --domain D --selector S [--algorithm rsa-2048|rsa-3072|rsa-4096|ed25519]
        generate a key pair in the token and print the zone-file line to publish
  dkimgw keys list [--json]
        list every dkimgw key in the token with its protection attributes
  dkimgw keys dns --domain D --selector S [--ttl N]
        print the zone-file line of a key's DNS record
  dkimgw keys destroy --domain D --selector S --yes
        destroy both objects of a key (withdraw its DNS record first)

The token comes from --hsm or $DKIMGW_HSM. generate and destroy record
what they did, with the Unix user, in the audit log (--audit-log, else
$DKIMGW_AUDIT_LOG, else audit.path of /etc/dkimgw/dkimgw.yaml), fsynced
before they report success, and seal it when the token has the audit key.
Exit status: 0 done; 64 bad arguments; 69 no such key, a key dkimgw
refuses to sign with (RSA below 2048 bits, extractable, imported: the
same status as from 'sign' and 'config check'), or the token lacks a
needed mechanism; 73 the key exists already, or the audit log cannot be
written; 75 token unavailable, try again; 77 wrong or locked PIN; 78 bad
token URI, module path or pin-source, or no such token.`

func runKeys(ctx context.Context, c *cli, args []string) int {
	if len(args) == 0 {
		return failf(c, exitUsage, "keys: missing subcommand; run 'dkimgw keys --help'")
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		fmt.Fprintf(c.stdout, "usage: dkimgw %s\n\n%s\n", keysUsage, keysLong)
		return exitOK
	case "generate":
		return keysGenerate(ctx, c, args[1:])
	case "list":
		return keysList(ctx, c, args[1:])
	case "dns":
		return keysDNS(ctx, c, args[1:])
	case "destroy":
		return keysDestroy(ctx, c, args[1:])
	}
	return failf(c, exitUsage, "keys: unknown subcommand %q; run 'dkimgw keys --help'", args[0])
}

// keyFlags are --domain and --selector, both required.
type keyFlags struct{ domain, selector string }

func (k *keyFlags) check(c *cli, name string) bool {
	if k.domain == "" || k.selector == "" {
		failf(c, exitUsage, "keys %s: --domain and --selector are required", name)
		return false
	}
	return true
}

func keysGenerate(ctx context.Context, c *cli, args []string) int {
	const usage = "keys generate --domain D --selector S [--algorithm A] [--ttl N] [--hsm URI]"
	const long = `Generates a key pair inside the token and prints the zone-file line of
its DNS record on stdout, ready for a BIND zone file. Publish it before
signing with the key.`
	fs := newFlagSet(c, "keys generate")
	var (
		kf  keyFlags
		tf  tokenFlags
		alg string
		ttl int
	)
	fs.StringVar(&kf.domain, "domain", "", "signing domain (d=), e.g. example.com")
	fs.StringVar(&kf.selector, "selector", "", "selector (s=), e.g. s2026a")
	fs.StringVar(&alg, "algorithm", string(hsm.DefaultAlgorithm), "rsa-2048, rsa-3072, rsa-4096 or ed25519")
	fs.IntVar(&ttl, "ttl", hsm.DefaultRecordTTL, "TTL of the printed record")
	auditPath := fs.String("audit-log", "", "audit log `file` (default $"+auditEnv+", else audit.path of "+defaultConfig+")")
	tf.register(fs)
	if code, ok := parseFlags(c, fs, usage, long, args); !ok {
		return code
	}
	if !kf.check(c, "generate") {
		return exitUsage
	}
	algorithm, err := hsm.ParseAlgorithm(alg)
	if err != nil {
		return failf(c, exitUsage, "%v", err)
	}
	al, code, ok := openCLIAudit(c, *auditPath)
	if !ok {
		return code
	}
	ctx, tok, release, code := tf.openFor(ctx, c)
	if tok == nil {
		return code
	}
	defer release()
	key, err := tok.GenerateKey(ctx, kf.domain, kf.selector, algorithm)
	ev := audit.Event{Event: audit.EventKeyGenerated, Domain: kf.domain, Selector: kf.selector,
		Details: map[string]any{"command": "keys generate", "algorithm": string(algorithm), "token": tok.Info().Label}}
	if err == nil {
		ev.Domain, ev.Selector, ev.KeyID = key.Info().Domain, key.Info().Selector, key.Info().IDHex()
	}
	ev.Details = outcome(err, ev.Details)
	if aerr := al.record(ctx, c, ev); aerr != nil && err == nil {
		return failf(c, exitCantCreate, "the key %s was generated but the audit log could not record it", key.Info().Label)
	}
	al.seal(ctx, c, tok)
	if err != nil {
		return failToken(c, err, "%v", err)
	}
	info := key.Info()
	line, err := hsm.ZoneLine(info.Domain, info.Selector, ttl, key.Public())
	if err != nil {
		return failf(c, exitSoftware, "%v", err)
	}
	fmt.Fprintf(c.stderr, "generated %s key %s (id %s) in token %q; publish this record:\n", info.Algorithm, info.Label, info.IDHex(), tok.Info().Label)
	fmt.Fprintln(c.stdout, line)
	return exitOK
}

// keyJSON is one entry of `keys list --json`.
type keyJSON struct {
	Domain           string `json:"domain"`
	Selector         string `json:"selector"`
	Algorithm        string `json:"algorithm"`
	Bits             int    `json:"bits"`
	Label            string `json:"label"`
	ID               string `json:"id"`
	Extractable      bool   `json:"extractable"`
	Sensitive        bool   `json:"sensitive"`
	NeverExtractable bool   `json:"never_extractable"`
	AlwaysSensitive  bool   `json:"always_sensitive"`
	Local            bool   `json:"local"`
	Decrypt          bool   `json:"decrypt"`
	Unwrap           bool   `json:"unwrap"`
	Derive           bool   `json:"derive"`
	SignRecover      bool   `json:"sign_recover"`
	Usable           bool   `json:"usable"`
	Problem          string `json:"problem,omitempty"`
}

func keysList(ctx context.Context, c *cli, args []string) int {
	const usage = "keys list [--json] [--hsm URI]"
	const long = `Lists every dkimgw key in the token with the private key's protection
attributes as the token reports them. A key that is or was extractable,
was imported rather than generated in the token, or may do more than sign
(decrypt, unwrap, derive, sign with recovery) is listed as not usable,
with the reason: dkimgw refuses to sign with it. So is a key whose
signing mechanism the token does not offer (an Ed25519 key reached
through p11-kit's client, which carries no EdDSA).`
	fs := newFlagSet(c, "keys list")
	var (
		tf     tokenFlags
		asJSON bool
	)
	fs.BoolVar(&asJSON, "json", false, "print a JSON array instead of a table")
	tf.register(fs)
	if code, ok := parseFlags(c, fs, usage, long, args); !ok {
		return code
	}
	ctx, tok, release, code := tf.openFor(ctx, c)
	if tok == nil {
		return code
	}
	defer release()
	infos, err := tok.Keys(ctx)
	if err != nil {
		return failToken(c, err, "%v", err)
	}
	list := make([]keyJSON, 0, len(infos))
	for _, i := range infos {
		problem := hsm.UnsafeReason(i)
		if mech := tok.MissingSignMechanism(i.Algorithm); problem == "" && mech != "" {
			problem = "the token does not offer " + mech + ", the mechanism that signs with it"
		}
		list = append(list, keyJSON{
			Domain: i.Domain, Selector: i.Selector, Algorithm: string(i.Algorithm), Bits: i.Bits,
			Label: i.Label, ID: i.IDHex(),
			Extractable: i.Extractable, Sensitive: i.Sensitive, NeverExtractable: i.NeverExtractable,
			AlwaysSensitive: i.AlwaysSensitive, Local: i.Local,
			Decrypt: i.CanDecrypt, Unwrap: i.CanUnwrap, Derive: i.CanDerive, SignRecover: i.CanSignRecover,
			Usable: problem == "", Problem: problem,
		})
	}
	if asJSON {
		enc := json.NewEncoder(c.stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(list); err != nil {
			return failf(c, exitFailure, "write JSON: %v", err)
		}
		return exitOK
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DOMAIN\tSELECTOR\tALGORITHM\tID\tEXTRACTABLE\tSENSITIVE\tNEVER_EXTRACTABLE\tLOCAL\tUSABLE")
	for _, k := range list {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", k.Domain, k.Selector, k.Algorithm, k.ID,
			yesNo(k.Extractable), yesNo(k.Sensitive), yesNo(k.NeverExtractable), yesNo(k.Local), yesNo(k.Usable))
	}
	tw.Flush()
	for _, k := range list {
		if k.Problem != "" {
			fmt.Fprintf(c.stderr, "warning: %s is not usable: %s\n", k.Label, k.Problem)
		}
	}
	return exitOK
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func keysDNS(ctx context.Context, c *cli, args []string) int {
	const usage = "keys dns --domain D --selector S [--ttl N] [--hsm URI]"
	const long = `Prints the zone-file line of the key's DNS record, e.g.

  s1._domainkey.example.com. 3600 IN TXT "v=DKIM1; k=rsa; p=MIIB..." "..."

with the value split into character-strings of at most 255 bytes, as a
BIND zone file accepts it.`
	fs := newFlagSet(c, "keys dns")
	var (
		kf  keyFlags
		tf  tokenFlags
		ttl int
	)
	fs.StringVar(&kf.domain, "domain", "", "signing domain (d=)")
	fs.StringVar(&kf.selector, "selector", "", "selector (s=)")
	fs.IntVar(&ttl, "ttl", hsm.DefaultRecordTTL, "TTL of the printed record")
	tf.register(fs)
	if code, ok := parseFlags(c, fs, usage, long, args); !ok {
		return code
	}
	if !kf.check(c, "dns") {
		return exitUsage
	}
	ctx, tok, release, code := tf.openFor(ctx, c)
	if tok == nil {
		return code
	}
	defer release()
	key, err := tok.Key(ctx, kf.domain, kf.selector)
	if err != nil {
		return failToken(c, err, "%v", err)
	}
	line, err := hsm.ZoneLine(key.Info().Domain, key.Info().Selector, ttl, key.Public())
	if err != nil {
		return failf(c, exitSoftware, "%v", err)
	}
	fmt.Fprintln(c.stdout, line)
	return exitOK
}

func keysDestroy(ctx context.Context, c *cli, args []string) int {
	const usage = "keys destroy --domain D --selector S --yes [--hsm URI]"
	const long = `Destroys the key's private and public objects in the token. This cannot
be undone: mail signed with the key stops verifying once its DNS record is
gone, and a new key cannot have the same private half. Withdraw the
selector from signing and wait out the grace period first.`
	fs := newFlagSet(c, "keys destroy")
	var (
		kf  keyFlags
		tf  tokenFlags
		yes bool
	)
	fs.StringVar(&kf.domain, "domain", "", "signing domain (d=)")
	fs.StringVar(&kf.selector, "selector", "", "selector (s=)")
	fs.BoolVar(&yes, "yes", false, "confirm the destruction")
	auditPath := fs.String("audit-log", "", "audit log `file` (default $"+auditEnv+", else audit.path of "+defaultConfig+")")
	tf.register(fs)
	if code, ok := parseFlags(c, fs, usage, long, args); !ok {
		return code
	}
	if !kf.check(c, "destroy") {
		return exitUsage
	}
	if !yes {
		return failf(c, exitUsage, "keys destroy: destroying %s cannot be undone; add --yes to confirm", hsm.RecordName(kf.domain, strings.ToLower(kf.selector)))
	}
	al, code, ok := openCLIAudit(c, *auditPath)
	if !ok {
		return code
	}
	ctx, tok, release, code := tf.openFor(ctx, c)
	if tok == nil {
		return code
	}
	defer release()
	// The id of the key destroyed, unsafe keys included (Key refuses them).
	var keyID string
	label := hsm.RecordName(strings.TrimSuffix(strings.ToLower(kf.domain), "."), strings.ToLower(kf.selector))
	if infos, err := tok.Keys(ctx); err == nil {
		for _, i := range infos {
			if i.Label == label {
				keyID = i.IDHex()
			}
		}
	}
	err := tok.DestroyKey(ctx, kf.domain, kf.selector)
	ev := audit.Event{Event: audit.EventKeyDestroyed, Domain: strings.TrimSuffix(strings.ToLower(kf.domain), "."), Selector: strings.ToLower(kf.selector), KeyID: keyID,
		Details: outcome(err, map[string]any{"command": "keys destroy", "token": tok.Info().Label})}
	if aerr := al.record(ctx, c, ev); aerr != nil && err == nil {
		return failf(c, exitCantCreate, "the key was destroyed but the audit log could not record it")
	}
	al.seal(ctx, c, tok)
	if err != nil {
		return failToken(c, err, "%v", err)
	}
	fmt.Fprintf(c.stderr, "destroyed %s in token %q\n", hsm.RecordName(kf.domain, strings.ToLower(kf.selector)), tok.Info().Label)
	return exitOK
}
