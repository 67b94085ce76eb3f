package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

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

When stdin is a regular file (sign < FILE), the file is read twice, to
hash it and then to write it out, and nothing is copied to a temporary
file; it must not change meanwhile. A pipe is read once, and a message
over 1 MiB is kept in a temporary file in $TMPDIR (default /tmp) until
it is written out.

The message is refused unless its From domain is D or a subdomain of D, and
if it has no From or several, a From without a parseable domain, control
characters in its header, or a header line over 998 octets. Nothing is
written on stdout unless the message was signed.

Each selector may be given once. The token comes from --hsm or
$DKIMGW_HSM. Exit status: 0 signed; 64 bad arguments (a repeated
--selector, a bad --expire); 65 message refused (the reason is on
stderr); 69 no such key, or a key dkimgw refuses to sign with (RSA below
2048 bits, extractable, imported: the same status as from 'keys dns' and
'config check'); 75 token unavailable, or the file on stdin changed while
it was being signed (discard stdout): try again; 77 wrong or locked PIN;
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

	// A file on stdin is checked and hashed while the token opens: with
	// a large message, both take tens of milliseconds. A pipe is read
	// only once the token and keys are there. Either way a token problem
	// is what is reported, whatever the message.
	in := storedStdin(c.stdin)
	var early *pendingSpool
	if in != nil {
		early = startSpoolAt(ctx, in)
		defer early.abandon()
	}
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

	var msg *signer.Message
	if early != nil {
		msg, err = early.wait()
	} else {
		msg, err = signer.Spool(ctx, c.stdin, signer.SpoolOptions{})
	}
	if err != nil {
		var refused *signer.RefusedError
		switch {
		case errors.As(err, &refused):
			return failf(c, exitDataErr, "%s", refused.Reason)
		case errors.Is(err, signer.ErrChanged):
			return failf(c, exitTempFail, "%v; nothing was written: sign it again once the file on stdin no longer changes", err)
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
	// A file read twice must be the same both times: a change seen now
	// leaves stdout empty.
	if err := in.unchanged(); err != nil {
		return failf(c, exitTempFail, "%v; nothing was written: sign it again once the file no longer changes", err)
	}
	w := bufio.NewWriterSize(c.stdout, 64<<10)
	if _, err := signer.WriteSigned(w, fields, msg); err != nil {
		if errors.Is(err, signer.ErrChanged) {
			return failf(c, exitTempFail, "%v; discard what was written on stdout and sign it again once the file on stdin no longer changes", err)
		}
		return failf(c, exitFailure, "%v", err)
	}
	if err := w.Flush(); err != nil {
		return failf(c, exitFailure, "write signed message: %v", err)
	}
	if err := in.unchanged(); err != nil {
		return failf(c, exitTempFail, "%v; discard what was written on stdout and sign it again once the file no longer changes", err)
	}
	in.consume()
	return exitOK
}

// storedInput is stdin when it is a regular file. sign reads such a file
// twice, once to check and hash the message and once to write it out,
// rather than copying it into a spool file first (which, for a message
// over the spool's memory limit, would move every byte through the
// kernel twice more). The file must not change in between: its size and
// modification time are checked before and after it is written out.
type storedInput struct {
	f         *os.File
	off, size int64 // the message: from stdin's offset to the end
	mod       time.Time
}

// storedStdin returns stdin as a storedInput, or nil when it is not a
// regular file (a pipe, a socket, a terminal) or nothing is left to read
// in it (it then goes the pipe's way; a file of the kernel's that shows
// size 0 but has content does too).
func storedStdin(r io.Reader) *storedInput {
	f, ok := r.(*os.File)
	if !ok {
		return nil
	}
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		return nil
	}
	// The message starts where stdin is, as it would when read:
	// `{ head -n 1; dkimgw sign ...; } < file` signs the rest.
	off, err := f.Seek(0, io.SeekCurrent)
	if err != nil || fi.Size() <= off {
		return nil
	}
	return &storedInput{f: f, off: off, size: fi.Size() - off, mod: fi.ModTime()}
}

// unchanged returns an error if the file's size or modification time is
// not what it was when sign started. It cannot see a change that keeps
// both, such as a rewrite within the file system's clock tick; growth and
// truncation always show. A nil *storedInput is always unchanged.
func (in *storedInput) unchanged() error {
	if in == nil {
		return nil
	}
	fi, err := in.f.Stat()
	switch {
	case err != nil:
		return fmt.Errorf("stdin: cannot check that it did not change while it was being signed: %w", err)
	case fi.Size() != in.off+in.size:
		return fmt.Errorf("stdin changed while it was being signed: it was %d bytes, now %d", in.off+in.size, fi.Size())
	case !fi.ModTime().Equal(in.mod):
		return fmt.Errorf("stdin changed while it was being signed: its modification time went from %s to %s",
			in.mod.UTC().Format(time.RFC3339Nano), fi.ModTime().UTC().Format(time.RFC3339Nano))
	}
	return nil
}

// pendingSpool is a SpoolAt running on its own goroutine.
type pendingSpool struct {
	cancel context.CancelFunc
	done   chan struct{}
	msg    *signer.Message
	err    error
	taken  bool
}

func startSpoolAt(ctx context.Context, in *storedInput) *pendingSpool {
	ctx, cancel := context.WithCancel(ctx)
	p := &pendingSpool{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		p.msg, p.err = signer.SpoolAt(ctx, io.NewSectionReader(in.f, in.off, in.size), in.size, signer.SpoolOptions{})
	}()
	return p
}

// wait returns SpoolAt's result; the caller closes the message.
func (p *pendingSpool) wait() (*signer.Message, error) {
	<-p.done
	p.taken = true
	return p.msg, p.err
}

// abandon stops the SpoolAt if it still runs and closes a message no one
// took (the token failed first).
func (p *pendingSpool) abandon() {
	p.cancel()
	<-p.done
	if !p.taken && p.msg != nil {
		p.msg.Close() // held nothing but the file, which stdin's owner closes
	}
}

// consume leaves stdin's offset at the end of the message, as reading it
// would have, for a shell that runs more commands on the same stdin.
func (in *storedInput) consume() {
	if in != nil {
		// The message is written: a failure here is not sign's to report.
		_, _ = in.f.Seek(in.off+in.size, io.SeekStart)
	}
}
