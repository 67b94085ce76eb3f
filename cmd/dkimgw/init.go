package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/dkimgw/dkimgw/audit"
	"github.com/dkimgw/dkimgw/dnsname"
	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/policy"
)

const (
	initUsage = "init [--hsm URI] [--domain D ...] [--upstream HOST:PORT|capture:DIR] [--listen ADDR] [--dir DIR] [--data-dir DIR] [--yes] [--force]"
	initLong  = `
init sets up a gateway: it checks the token (login, RSA and Ed25519
mechanisms), generates for every --domain an RSA-2048 key and, when the
token supports it, an Ed25519 key (selectors rsaYYYYMM and edYYYYMM;
keys already there under those names are reused), writes the PIN to
DIR/pin (mode 0600) and a commented configuration to DIR/dkimgw.yaml that
names the keys and reads the PIN from that file, then prints the DNS
records to publish and the next steps.

Without --yes it asks for what the flags leave out and for a
confirmation before it changes anything. The PIN comes from the --hsm URI
(pin-value, or pin-source) or, asked interactively, from stdin.

It writes fixed selectors rather than a rotation policy: keys with fixed
selectors sign as soon as their records are published, with no DNS
server for dkimgw to update or query, and 'config check' and 'serve'
work at once. The configuration has a commented rotation stanza to turn
on once dns.publishers is set up (see 'dkimgw rotate --help').

The configuration is checked as 'config check' would before it is put
in place. An existing DIR/dkimgw.yaml is kept unless --force is given.
Bad input (no domain, an upstream that is not host:port or capture:DIR,
a bad listen address) changes nothing.

Exit status: 0 done; 64 bad or missing input; 69 the token cannot
generate RSA keys; 73 DIR/dkimgw.yaml exists (give --force), or a file
cannot be written; 75 token unavailable, try again; 77 wrong or locked
PIN; 78 bad token URI, module path or pin-source, or no such token.`
)

var initCommand = &command{
	name:  "init",
	usage: initUsage,
	short: "set up a gateway: check the token, generate keys, write the config and PIN file",
	long:  initLong,
	run:   runInit,
}

// initInput is what init needs, from flags or questions.
type initInput struct {
	uri      string
	domains  []string
	upstream string
	listen   string
	dir      string
	dataDir  string
}

func runInit(ctx context.Context, c *cli, args []string) int {
	fs := newFlagSet(c, "init")
	var (
		in      initInput
		domains stringsFlag
		yes     bool
		force   bool
		tf      tokenFlags
	)
	tf.register(fs)
	fs.Var(&domains, "domain", "signing domain (d=); repeat for several")
	fs.StringVar(&in.upstream, "upstream", "", "the MTA that delivers signed mail, host:port; or capture:DIR to store messages instead")
	fs.StringVar(&in.listen, "listen", policy.DefaultListen, "address dkimgw listens on for the MTAs that relay through it")
	fs.StringVar(&in.dir, "dir", filepath.Dir(defaultConfig), "directory of the configuration and PIN file")
	fs.StringVar(&in.dataDir, "data-dir", "/var/lib/dkimgw", "data directory (audit log, rotation state)")
	fs.BoolVar(&yes, "yes", false, "ask nothing: take the flags as they are and go ahead")
	fs.BoolVar(&force, "force", false, "overwrite an existing configuration and PIN file")
	if code, ok := parseFlags(c, fs, initUsage, initLong, args); !ok {
		return code
	}
	in.uri, in.domains = tf.uri, domains
	if in.uri == "" {
		in.uri = c.getenv(hsmEnv)
	}

	ask := newAsker(c, !yes)
	if in.uri == "" {
		in.uri = ask.line("PKCS#11 URI of the token (e.g. pkcs11:token=dkim?module-path=/usr/lib/softhsm/libsofthsm2.so)")
	}
	if len(in.domains) == 0 {
		if s := ask.line("signing domains, separated by spaces"); s != "" {
			in.domains = strings.Fields(s)
		}
	}
	if in.upstream == "" {
		in.upstream = ask.line("upstream MTA that delivers the signed mail (host:port, or capture:DIR)")
	}
	if ask.err != nil {
		return failf(c, exitUsage, "init: %v", ask.err)
	}
	if code, ok := in.check(c); !ok {
		return code
	}
	uri, err := hsm.ParseURI(in.uri)
	if err != nil {
		return failToken(c, err, "init: --hsm: %v", err)
	}
	pin, err := uri.PIN(c.getenv)
	if err != nil && !yes && uri.PINSource == "" {
		pin = ask.line("user PIN of the token (shown as you type it)")
		err = ask.err
		if err == nil && pin == "" {
			err = errors.New("no PIN given")
		}
		if err == nil {
			uri.PINValue = pin
		}
	}
	if err != nil {
		return failToken(c, err, "init: %v", err)
	}

	confPath := filepath.Join(in.dir, "dkimgw.yaml")
	pinPath := filepath.Join(in.dir, "pin")
	// A pin-source that is DIR/pin already is kept as it is.
	keepPIN := pinSourcePath(uri) == pinPath
	if !force {
		for _, p := range []string{confPath, pinPath} {
			if p == pinPath && keepPIN {
				continue
			}
			if _, err := os.Lstat(p); err == nil {
				return failf(c, exitCantCreate, "init: %s exists; keep it, or give --force to replace it", p)
			}
		}
	}
	if !yes && !ask.confirm(fmt.Sprintf("generate keys for %s in the token and write %s and %s?", strings.Join(in.domains, ", "), confPath, pinPath)) {
		return failf(c, exitUsage, "init: nothing done")
	}

	// The token first: nothing is written for a token that cannot be used.
	ctx, cancel := tf.withTimeout(ctx)
	defer cancel()
	tok, err := openWithPIN(ctx, c, uri, pin)
	if err != nil {
		return failToken(c, err, "init: %v", err)
	}
	defer tok.Close()
	if err := tok.Check(ctx); err != nil {
		return failToken(c, err, "init: %v", err)
	}
	ed := tok.SupportsEd25519()
	fmt.Fprintf(c.stderr, "token %q: logged in; RSA: yes; Ed25519: %s\n", tok.Info().Label, yesNo(ed))

	if err := os.MkdirAll(in.dir, 0o755); err != nil {
		return failf(c, exitCantCreate, "init: %v", err)
	}
	if err := os.MkdirAll(in.dataDir, 0o700); err != nil {
		return failf(c, exitCantCreate, "init: --data-dir: %v", err)
	}
	if dir, ok := strings.CutPrefix(in.upstream, policy.CapturePrefix); ok {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return failf(c, exitCantCreate, "init: capture directory: %v", err)
		}
	}
	al, code, ok := openCLIAudit(c, filepath.Join(in.dataDir, "audit.log"))
	if !ok {
		return code
	}

	month := time.Now().UTC().Format("200601")
	algs := []hsm.Algorithm{hsm.RSA2048}
	if ed {
		algs = append(algs, hsm.Ed25519)
	}
	var (
		selectors = map[string][]string{}
		records   []string
	)
	for _, d := range in.domains {
		for _, alg := range algs {
			sel := "rsa" + month
			if alg == hsm.Ed25519 {
				sel = "ed" + month
			}
			key, err := tok.GenerateKey(ctx, d, sel, alg)
			reused := false
			if errors.Is(err, hsm.ErrKeyExists) {
				// A second run (--force): the key is there; use it if it may sign.
				key, err = tok.Key(ctx, d, sel)
				reused = err == nil
			}
			if !reused {
				ev := audit.Event{Event: audit.EventKeyGenerated, Domain: d, Selector: sel,
					Details: outcome(err, map[string]any{"command": "init", "algorithm": string(alg), "token": tok.Info().Label})}
				if err == nil {
					ev.KeyID = key.Info().IDHex()
				}
				if aerr := al.record(ctx, c, ev); aerr != nil && err == nil {
					return failf(c, exitCantCreate, "init: the key %s was generated but the audit log could not record it", key.Info().Label)
				}
			}
			if err != nil {
				al.seal(ctx, c, tok)
				return failToken(c, err, "init: %v", err)
			}
			line, err := hsm.ZoneLine(d, sel, hsm.DefaultRecordTTL, key.Public())
			if err != nil {
				return failf(c, exitSoftware, "init: %v", err)
			}
			verb := "generated"
			if reused {
				verb = "reusing"
			}
			fmt.Fprintf(c.stderr, "%s %s key %s\n", verb, alg, key.Info().Label)
			selectors[d] = append(selectors[d], sel)
			records = append(records, line)
		}
	}
	al.seal(ctx, c, tok)

	// The PIN file, then the configuration, each written whole or not at
	// all; the configuration is checked before it replaces anything.
	cfgURI := *uri
	cfgURI.PINValue, cfgURI.PINSource = "", "file:"+pinPath
	if !keepPIN {
		if err := writeFileAtomic(pinPath, []byte(pin+"\n"), 0o600); err != nil {
			return failf(c, exitCantCreate, "init: PIN file: %v", err)
		}
	}
	conf := initConfig(in, cfgURI.String(), selectors)
	tmp := confPath + ".new"
	if err := writeFileAtomic(tmp, []byte(conf), 0o640); err != nil {
		return failf(c, exitCantCreate, "init: %v", err)
	}
	if _, err := policy.Load(tmp); err != nil {
		os.Remove(tmp)
		return failf(c, exitSoftware, "init: the configuration written does not validate (a bug):\n%v", err)
	}
	if err := os.Rename(tmp, confPath); err != nil {
		os.Remove(tmp)
		return failf(c, exitCantCreate, "init: %v", err)
	}

	fmt.Fprintf(c.stdout, "wrote %s and %s (mode 0600)\n\n", confPath, pinPath)
	fmt.Fprintf(c.stdout, "Publish these DNS records (zone-file syntax) before mail is signed with them:\n\n")
	for _, r := range records {
		fmt.Fprintln(c.stdout, r)
	}
	host, port, _ := net.SplitHostPort(in.listen)
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	fmt.Fprintf(c.stdout, `
Next steps:
  1. dkimgw config check --config %[1]s
  2. dkimgw serve --config %[1]s        (or the systemd unit)
  3. point the MTA at it; for Postfix:
       postconf -e 'relayhost = [%[2]s]:%[3]s' && postfix reload
  clients: only 127.0.0.0/8 and ::1 may relay; edit clients: in %[1]s for other MTAs.
`, confPath, host, port)
	return exitOK
}

// openWithPIN opens the token of uri with pin, read already from the
// URI's own source or asked for: the URI is handed over with a pin-source
// that gives it, as String hides a pin-value.
func openWithPIN(ctx context.Context, c *cli, uri *hsm.URI, pin string) (*hsm.Token, error) {
	u := *uri
	u.PINSource, u.PINValue = "env:DKIMGW_INIT_PIN", ""
	return hsm.Open(ctx, u.String(), hsm.Options{Logger: errorLogger(c), Getenv: func(k string) string {
		if k == "DKIMGW_INIT_PIN" {
			return pin
		}
		return c.getenv(k)
	}})
}

// pinSourcePath is the file of a pin-source=file: URI, or "".
func pinSourcePath(u *hsm.URI) string {
	p, ok := strings.CutPrefix(u.PINSource, "file://")
	if !ok {
		p, _ = strings.CutPrefix(u.PINSource, "file:")
	}
	if !filepath.IsAbs(p) {
		return ""
	}
	return filepath.Clean(p)
}

// check validates the input before anything is touched.
func (in *initInput) check(c *cli) (int, bool) {
	if in.uri == "" {
		return failf(c, exitUsage, "init: no token: give --hsm URI or set %s", hsmEnv), false
	}
	if len(in.domains) == 0 {
		return failf(c, exitUsage, "init: give at least one --domain, e.g. --domain example.com"), false
	}
	seen := map[string]bool{}
	for i, d := range in.domains {
		n, err := dnsname.Domain(d)
		if err != nil {
			return failf(c, exitUsage, "init: --domain: %v", err), false
		}
		if seen[n] {
			return failf(c, exitUsage, "init: --domain %s is given twice", d), false
		}
		seen[n] = true
		in.domains[i] = n
	}
	if in.upstream == "" {
		return failf(c, exitUsage, "init: give --upstream host:port (the MTA that delivers signed mail) or --upstream capture:DIR"), false
	}
	if dir, ok := strings.CutPrefix(in.upstream, policy.CapturePrefix); ok {
		if !filepath.IsAbs(dir) {
			return failf(c, exitUsage, "init: --upstream capture:DIR needs an absolute directory, e.g. capture:/var/lib/dkimgw/capture"), false
		}
	} else if err := checkHostPort(in.upstream, false); err != nil {
		return failf(c, exitUsage, "init: --upstream %q: %v; e.g. --upstream 127.0.0.1:10026", in.upstream, err), false
	}
	if err := checkHostPort(in.listen, true); err != nil {
		return failf(c, exitUsage, "init: --listen %q: %v; e.g. --listen 127.0.0.1:10025", in.listen, err), false
	}
	for _, p := range []*string{&in.dir, &in.dataDir} {
		abs, err := filepath.Abs(*p)
		if err != nil {
			return failf(c, exitUsage, "init: %v", err), false
		}
		*p = abs
	}
	return exitOK, true
}

// checkHostPort checks host:port as the configuration will.
func checkHostPort(s string, emptyHost bool) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return errors.New("not host:port")
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
		return fmt.Errorf("%q is not a port number", port)
	}
	if host == "" && !emptyHost {
		return errors.New("no host")
	}
	if host != "" && net.ParseIP(host) == nil {
		if _, err := dnsname.Host(host); err != nil {
			return fmt.Errorf("%q is neither an IP address nor a host name", host)
		}
	}
	return nil
}

// writeFileAtomic writes data to path through a temporary file in the
// same directory, fsynced and renamed: the file is whole or absent.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(perm)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// asker asks questions on stderr and reads answers from stdin, or, when
// not interactive, answers nothing.
type asker struct {
	c           *cli
	interactive bool
	in          *bufio.Reader
	err         error
}

func newAsker(c *cli, interactive bool) *asker {
	return &asker{c: c, interactive: interactive, in: bufio.NewReader(c.stdin)}
}

func (a *asker) line(question string) string {
	if !a.interactive || a.err != nil {
		return ""
	}
	fmt.Fprintf(a.c.stderr, "%s: ", question)
	s, err := a.in.ReadString('\n')
	if err != nil && (err != io.EOF || s == "") {
		a.err = fmt.Errorf("no answer to %q (stdin closed); give the flags, with --yes", question)
		return ""
	}
	return strings.TrimSpace(s)
}

func (a *asker) confirm(question string) bool {
	s := strings.ToLower(a.line(question + " [y/N]"))
	return s == "y" || s == "yes"
}

// initConfig is the configuration init writes.
func initConfig(in initInput, uri string, selectors map[string][]string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `# dkimgw configuration written by 'dkimgw init' on %s.
# Check it with: dkimgw config check --config %s
# Every key and its default: dkimgw.example.yaml in the source tree.

hsm:
  # The token holding the keys; the PIN is read from the file named by
  # pin-source (mode 0600), again at every SIGHUP.
  uri: %q

smtp:
  listen: %q          # where the MTAs relay to

upstream:
  address: %q         # the MTA that delivers signed mail (capture:DIR: store, deliver nothing)

# Who may relay, and which From domains (and their subdomains) each may
# have signed. Add the networks of your MTAs here.
clients:
  - name: local
    networks: ["127.0.0.0/8", "::1"]
    domains: [%s]

# The keys init generated; publish their records (dkimgw keys dns
# --domain D --selector S prints one again) before serving.
domains:
`, time.Now().UTC().Format("2006-01-02"), filepath.Join(in.dir, "dkimgw.yaml"), uri, in.listen, in.upstream, strings.Join(in.domains, ", "))
	for _, d := range in.domains {
		fmt.Fprintf(&b, "  %s:\n    selectors: [%s]\n", d, strings.Join(selectors[d], ", "))
	}
	fmt.Fprintf(&b, `  # To have dkimgw rotate a domain's keys instead, replace its selectors
  # with a rotation policy and configure dns.publishers (dkimgw rotate --help):
  #   example.com:
  #     rotation: {algorithms: [rsa-2048, ed25519], interval: 90d, publisher: primary}

data_dir: %q   # audit log and rotation state
`, in.dataDir)
	return b.String()
}
