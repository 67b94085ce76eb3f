package main

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"flag"
	"fmt"
	"os"

	"github.com/dkimgw/dkimgw/audit"
	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/policy"
)

const auditUsage = "audit [--config FILE] [--json] | audit verify-log [flags] | audit export-key [flags]"

var auditCommand = &command{
	name:  "audit",
	usage: auditUsage,
	short: "review the keys, token and DNS; verify the audit log; export the audit key",
	long:  auditLong,
	run:   runAudit,
}

const auditLong = `
audit answers who holds which keys, whether DNS agrees, and who did what:

  dkimgw audit [--config F] [--json]
        a key-management review for cron: every key in the token and
        every configured domain, their age, state, token attributes and
        DNS records at every authoritative server, with findings
  dkimgw audit verify-log [--path F] [--config F] [--pubkey FILE] [--hsm URI]
        check the audit log's hash chain and every checkpoint signature
  dkimgw audit export-key [--config F] [--hsm URI]
        print the audit key's public key (PEM), for an auditor who
        verifies the log without access to the token

The audit key (label dkimgw-audit) is generated in the token by serve on
its first start: Ed25519 when the token has it, else RSA-2048,
non-extractable and sign-only.

Exit status of audit: 0 no finding of severity error; 1 at least one;
64 bad arguments; 75 the token is unavailable; 77 wrong PIN; 78 invalid
configuration.
Exit status of verify-log: 0 the chain and every checkpoint verify
(records after the last checkpoint are reported as not sealed yet, a
warning); 65 a record is broken (the first one is named); 66 no log
file; 69 no audit key to verify with; 75 token unavailable; 77 wrong PIN.
Exit status of export-key: 0 printed; 69 the token has no audit key yet
(serve generates it); 75 token unavailable; 77 wrong PIN; 78 bad token URI.`

func runAudit(ctx context.Context, c *cli, args []string) int {
	if len(args) > 0 {
		switch args[0] {
		case "verify-log":
			return auditVerifyLog(ctx, c, args[1:])
		case "export-key":
			return auditExportKey(ctx, c, args[1:])
		case "help":
			fmt.Fprintf(c.stdout, "usage: dkimgw %s\n%s\n", auditUsage, auditLong)
			return exitOK
		}
	}
	return auditReview(ctx, c, args)
}

const exitNoInput = 66 // EX_NOINPUT

// auditKeySource finds the audit public key: a PEM file, or the token of
// --hsm, $DKIMGW_HSM or the configuration.
type auditKeySource struct {
	pubkey string
	tf     tokenFlags
	config string
}

// public returns the audit public key; code is the exit status on
// failure (the reason is printed).
func (s *auditKeySource) public(ctx context.Context, c *cli, cfg *policy.Config) (crypto.PublicKey, int) {
	if s.pubkey != "" {
		b, err := os.ReadFile(s.pubkey)
		if err != nil {
			return nil, failf(c, exitNoInput, "audit: %v", err)
		}
		blk, _ := pem.Decode(b)
		if blk == nil || blk.Type != "PUBLIC KEY" {
			return nil, failf(c, exitDataErr, "audit: %s holds no PEM \"PUBLIC KEY\" block (write one with 'dkimgw audit export-key')", s.pubkey)
		}
		pub, err := x509.ParsePKIXPublicKey(blk.Bytes)
		if err != nil {
			return nil, failf(c, exitDataErr, "audit: %s: %v", s.pubkey, err)
		}
		return pub, exitOK
	}
	uri := s.tf.uri
	if uri == "" {
		uri = c.getenv(hsmEnv)
	}
	if uri == "" && cfg != nil {
		uri = cfg.HSM.URI
	}
	if uri == "" {
		return nil, failf(c, exitUsage, "audit: no audit key: give --pubkey FILE, --hsm URI, $%s or a --config with hsm.uri", hsmEnv)
	}
	ctx, cancel := s.tf.withTimeout(ctx)
	defer cancel()
	tok, err := hsm.Open(ctx, uri, hsm.Options{Logger: errorLogger(c), Getenv: c.getenv})
	if err != nil {
		return nil, failToken(c, err, "%v", err)
	}
	defer tok.Close()
	key, err := tok.AuditKey(ctx)
	if err != nil {
		return nil, failToken(c, err, "%v", err)
	}
	return key.Public(), exitOK
}

// loadOptional loads the configuration when one was named, or the
// default one when it exists; nil otherwise.
func loadOptional(c *cli, path string, named bool) (*policy.Config, int, bool) {
	if !named {
		if _, err := os.Stat(path); err != nil {
			return nil, exitOK, true
		}
	}
	cfg, err := loadConfig(c.getenv, path)
	if err != nil {
		return nil, failf(c, exitConfig, "invalid configuration:\n%v", err), false
	}
	return cfg, exitOK, true
}

func auditVerifyLog(ctx context.Context, c *cli, args []string) int {
	const usage = "audit verify-log [--path F] [--config F] [--pubkey FILE] [--hsm URI]"
	const long = `Checks the audit log's hash chain and every checkpoint's signature,
with the public key of a PEM file (--pubkey, from 'dkimgw audit
export-key') or of the token's audit key (--hsm, $DKIMGW_HSM, or hsm.uri
of the configuration), and names the first broken record: a deleted,
changed, inserted or moved line breaks the chain; a log rewritten with
a valid chain fails at its first checkpoint, which only the token can
sign. Records after the last checkpoint are not sealed yet: a warning.
The log is --path, else audit.path of the configuration.`
	fs := newFlagSet(c, "audit verify-log")
	var src auditKeySource
	logPath := fs.String("path", "", "audit log `file` (default: audit.path of --config)")
	fs.StringVar(&src.config, "config", defaultConfig, "configuration `file`")
	fs.StringVar(&src.pubkey, "pubkey", "", "PEM `file` of the audit public key (default: the token's audit key)")
	src.tf.register(fs)
	if code, ok := parseFlags(c, fs, usage, long, args); !ok {
		return code
	}
	named := false
	fs.Visit(func(f *flag.Flag) { named = named || f.Name == "config" })
	var cfg *policy.Config
	if *logPath == "" || (src.pubkey == "" && src.tf.uri == "" && c.getenv(hsmEnv) == "") {
		var code int
		var ok bool
		if cfg, code, ok = loadOptional(c, src.config, named || *logPath == ""); !ok {
			return code
		}
	}
	path := *logPath
	if path == "" {
		path = cfg.Audit.Path
	}
	f, err := os.Open(path)
	if err != nil {
		return failf(c, exitNoInput, "audit: %v", err)
	}
	defer f.Close()
	pub, code := src.public(ctx, c, cfg)
	if pub == nil {
		return code
	}
	res, err := audit.Verify(f, pub)
	if err != nil {
		return failf(c, exitFailure, "%v", err)
	}
	keyID, _ := audit.KeyID(pub)
	if res.Broken != nil {
		fmt.Fprintf(c.stdout, "%s: BROKEN at line %d: %s\n", path, res.Broken.Line, res.Broken.Reason)
		if res.Sealed > 0 {
			fmt.Fprintf(c.stdout, "lines 1-%d were sealed by checkpoints of audit key %s\n", res.Sealed, keyID)
		}
		return exitDataErr
	}
	fmt.Fprintf(c.stdout, "%s: %d records, %d checkpoints (audit key %s): the chain and every checkpoint verify\n", path, res.Records, res.Checkpoints, keyID)
	if res.Unsealed > 0 {
		fmt.Fprintf(c.stdout, "warning: the last %d records (after line %d) are not sealed by a checkpoint yet\n", res.Unsealed, res.Sealed)
	}
	return exitOK
}

func auditExportKey(ctx context.Context, c *cli, args []string) int {
	const usage = "audit export-key [--config F] [--hsm URI]"
	const long = `Prints the public key of the token's audit key as PEM, for
'dkimgw audit verify-log --pubkey FILE' on a machine without the token.`
	fs := newFlagSet(c, "audit export-key")
	var src auditKeySource
	fs.StringVar(&src.config, "config", defaultConfig, "configuration `file` (for hsm.uri)")
	src.tf.register(fs)
	if code, ok := parseFlags(c, fs, usage, long, args); !ok {
		return code
	}
	var cfg *policy.Config
	if src.tf.uri == "" && c.getenv(hsmEnv) == "" {
		var code int
		var ok bool
		if cfg, code, ok = loadOptional(c, src.config, true); !ok {
			return code
		}
	}
	pub, code := src.public(ctx, c, cfg)
	if pub == nil {
		return code
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return failf(c, exitSoftware, "audit: %v", err)
	}
	keyID, _ := audit.KeyID(pub)
	fmt.Fprintf(c.stderr, "audit key %s (label %s)\n", keyID, hsm.AuditKeyLabel)
	if err := pem.Encode(c.stdout, &pem.Block{Type: "PUBLIC KEY", Bytes: der}); err != nil {
		return failf(c, exitFailure, "audit: %v", err)
	}
	return exitOK
}
