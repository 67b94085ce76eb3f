package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"strings"

	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/signer"
)

const signUsage = "sign --domain D --selector S [--selector S2 ...] [--expire DURATION] [--hsm URI]"

var signCommand = &command{
	name:  "sign",
	usage: signUsage,
	short: "DKIM-sign one message from stdin to stdout",
	long:  signLong,
	run:   runSign,
}

const signLong = `Reads one message on stdin and writes it on stdout with one
DKIM-Signature field per selector prepended (d=D, c=relaxed/relaxed), signed
in the token. Give two selectors, e.g. an RSA and an Ed25519 key, to
dual-sign. Line endings are normalised to CRLF; nothing else changes.

The message is refused unless its From domain is D or a subdomain of D, and
if it has no From or several, a From without a parseable domain, control
characters in its header, or a header line over 998 octets. Nothing is
written on stdout unless the message was signed.

Each selector may be given once. The token comes from --hsm or
$DKIMGW_HSM. Exit status: 0 signed; 64 bad arguments (a repeated
--selector, a bad --expire); 65 message refused (the reason is on
stderr); 69 no such key, or a key dkimgw refuses to sign with (RSA below
2048 bits, extractable, imported: the same status as from 'keys dns' and
'config check'); 75 token unavailable, try again; 77 wrong or locked PIN;
78 bad token URI, module path or pin-source (missing file or variable,
relative path, a PIN file others may read), or no such token.`

// stringsFlag collects the values of a repeatable flag.
type stringsFlag []string

func (s *stringsFlag) String() string { return strings.Join(*s, ",") }

func (s *stringsFlag) Set(v string) error {
	*s = append(*s, v)
	return nil
}

var _ flag.Value = (*stringsFlag)(nil)

func runSign(ctx context.Context, c *cli, args []string) int {
	fs := newFlagSet(c, "sign")
	var (
		domain    string
		selectors stringsFlag
		expireArg string
		tf        tokenFlags
	)
	fs.StringVar(&domain, "domain", "", "signing domain (d=); the From domain must be it or below it")
	fs.Var(&selectors, "selector", "selector (s=) of a key of --domain in the token; repeat to sign once per key")
	fs.StringVar(&expireArg, "expire", "0", "signature lifetime (x=), e.g. 7d or 168h; 0 means no expiry")
	tf.register(fs)
	if code, ok := parseFlags(c, fs, signUsage, signLong, args); !ok {
		return code
	}
	if domain == "" || len(selectors) == 0 {
		return failf(c, exitUsage, "sign: --domain and at least one --selector are required")
	}
	seen := make(map[string]bool, len(selectors))
	for _, sel := range selectors {
		// Selectors are DNS labels: S and s name the same key.
		k := strings.ToLower(sel)
		if seen[k] {
			return failf(c, exitUsage, "sign: --selector %s is given twice; give each selector once (one signature per key)", sel)
		}
		seen[k] = true
	}
	expire, err := policy.ParseDuration(expireArg)
	if err != nil {
		return failf(c, exitUsage, "sign: --expire %q is not a duration; write it like --expire 7d, --expire 168h or --expire 90m (0: no x= tag)", expireArg)
	}

	// The token and keys come first: a configuration problem is reported
	// before stdin is read.
	tokCtx, cancel := tf.withTimeout(ctx)
	defer cancel()
	tok, code := tf.open(tokCtx, c, errorLogger(c))
	if tok == nil {
		return code
	}
	defer tok.Close()
	ids := make([]signer.Identity, 0, len(selectors))
	for _, sel := range selectors {
		key, err := tok.Key(tokCtx, domain, sel)
		if err != nil {
			return failToken(c, err, "%v", err)
		}
		ids = append(ids, signer.Identity{Domain: domain, Selector: sel, Key: key})
	}

	msg, err := signer.Spool(ctx, c.stdin, signer.SpoolOptions{})
	if err != nil {
		var refused *signer.RefusedError
		if errors.As(err, &refused) {
			return failf(c, exitDataErr, "%s", refused.Reason)
		}
		return failf(c, exitTempFail, "%v", err)
	}
	defer msg.Close()
	if !signer.Aligned(msg.FromDomain(), domain) {
		return failf(c, exitDataErr, "the From domain %s is neither %s nor a subdomain of it", msg.FromDomain(), domain)
	}
	// A fresh timeout: reading stdin does not use up the token's.
	signCtx, cancelSign := tf.withTimeout(ctx)
	defer cancelSign()
	fields, err := signer.Sign(signCtx, msg, ids, signer.Options{Expire: expire})
	if err != nil {
		return failToken(c, err, "%v", err)
	}
	w := bufio.NewWriterSize(c.stdout, 64<<10)
	if _, err := signer.WriteSigned(w, fields, msg); err != nil {
		return failf(c, exitFailure, "%v", err)
	}
	if err := w.Flush(); err != nil {
		return failf(c, exitFailure, "write signed message: %v", err)
	}
	return exitOK
}
