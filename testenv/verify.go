package testenv

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// DKIMResult is one verifier's verdict on one DKIM-Signature field.
type DKIMResult struct {
	Domain    string // d=
	Selector  string // s=
	Algorithm string // a=, when the verifier reports it
	Pass      bool
	Reason    string // the verifier's own words, for failure messages
}

func (r DKIMResult) String() string {
	verdict := "fail"
	if r.Pass {
		verdict = "pass"
	}
	return fmt.Sprintf("s=%s d=%s a=%s: %s (%s)", r.Selector, r.Domain, r.Algorithm, verdict, r.Reason)
}

// DKIMVerifier is an independent DKIM implementation, run as a
// subprocess with DNS answered from a map, never from the network.
type DKIMVerifier struct {
	Name string
	// Ed25519 reports whether it implements ed25519-sha256 (RFC 8463).
	// Debian 12's Mail::DKIM (1.20230212) does not.
	Ed25519 bool
	run     func(t testing.TB, dir string, files []string, records map[string]string) ([][]DKIMResult, error)
}

// DKIMVerifiers returns dkimpy, OpenDKIM and Mail::DKIM.
func DKIMVerifiers() []DKIMVerifier {
	return []DKIMVerifier{DKIMPy, OpenDKIM, MailDKIM}
}

// The verifiers. Each skips the test when it is not installed, or fails
// it when CI=true (see Require).
var (
	// DKIMPy is dkimpy (Debian python3-dkim, python3-nacl for Ed25519),
	// calling dkim.DKIM(msg).verify(idx=i, dnsfunc=f) for each signature:
	// dkim.verify() alone checks only the first.
	DKIMPy = DKIMVerifier{Name: "dkimpy", Ed25519: true, run: runDKIMPy}
	// OpenDKIM is `opendkim -t` (Debian opendkim) with TestPublicKeys; its
	// per-signature verdicts come from the Authentication-Results field it
	// prints at -vvv.
	OpenDKIM = DKIMVerifier{Name: "opendkim", Ed25519: true, run: runOpenDKIM}
	// MailDKIM is Perl's Mail::DKIM::Verifier (Debian libmail-dkim-perl)
	// with Mail::DKIM::DNS::query replaced by a lookup in the map.
	MailDKIM = DKIMVerifier{Name: "Mail::DKIM", Ed25519: false, run: runMailDKIM}
)

// Verify runs v over each message, with DNS TXT lookups answered from
// records (owner name without trailing dot → record value; any other name
// does not exist). It returns one []DKIMResult per message, one entry per
// DKIM-Signature field in header order. A verifier that cannot run fails
// the test.
func (v DKIMVerifier) Verify(t testing.TB, records map[string]string, msgs ...[]byte) [][]DKIMResult {
	t.Helper()
	dir := t.TempDir()
	files := make([]string, len(msgs))
	for i, msg := range msgs {
		files[i] = filepath.Join(dir, fmt.Sprintf("msg%03d.eml", i))
		if err := os.WriteFile(files[i], msg, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	res, err := v.run(t, dir, files, records)
	if err != nil {
		t.Fatalf("%s: %v", v.Name, err)
	}
	if len(res) != len(msgs) {
		t.Fatalf("%s: %d results for %d messages", v.Name, len(res), len(msgs))
	}
	return res
}

// verifierCheck caches, per verifier, whether its runtime is installed:
// each check is a subprocess, and a test calls Verify many times.
var verifierCheck sync.Map // name → error

func requireVerifier(t testing.TB, name string, check func() error) {
	t.Helper()
	errAny, ok := verifierCheck.Load(name)
	if !ok {
		errAny, _ = verifierCheck.LoadOrStore(name, check())
	}
	if err, _ := errAny.(error); err != nil {
		missing(t, name, err)
	}
}

// combinedError turns a failed command into an error with its output.
func combinedError(err error, stderr []byte) error {
	if len(stderr) > 0 {
		return fmt.Errorf("%w: %s", err, bytes.TrimSpace(stderr))
	}
	return err
}

func writeRecordsJSON(dir string, records map[string]string) (string, error) {
	b, err := json.Marshal(records)
	if err != nil {
		return "", err
	}
	p := filepath.Join(dir, "records.json")
	return p, os.WriteFile(p, b, 0o600)
}

// runJSONVerifier runs a script that prints, as JSON, one list of results
// per message file given on its command line.
func runJSONVerifier(dir string, argv []string, files []string, records map[string]string) ([][]DKIMResult, error) {
	recs, err := writeRecordsJSON(dir, records)
	if err != nil {
		return nil, err
	}
	args := append([]string{}, argv[1:]...)
	args = append(args, recs)
	cmd := exec.Command(argv[0], append(args, files...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, combinedError(err, stderr.Bytes())
	}
	var out [][]DKIMResult
	if err := json.Unmarshal(stdout.Bytes(), &out); err != nil {
		return nil, fmt.Errorf("parse output %q: %w", stdout.String(), err)
	}
	return out, nil
}

// /usr/bin/python3, not the first python3 on PATH: that one may lack the
// Debian modules.
const systemPython = "/usr/bin/python3"

const dkimpyScript = `
import io, json, logging, sys
import dkim

records = json.load(open(sys.argv[1]))

def dnsfunc(name, timeout=5):
    value = records.get(name.decode().rstrip('.').lower())
    return value.encode() if value is not None else None

log = logging.getLogger('dkimpy')
log.setLevel(logging.DEBUG)
log.propagate = False
buf = io.StringIO()
log.addHandler(logging.StreamHandler(buf))

out = []
for path in sys.argv[2:]:
    msg = open(path, 'rb').read()
    d = dkim.DKIM(msg, logger=log)
    sigs = [v for (k, v) in d.headers if k.lower() == b'dkim-signature']
    results = []
    for i in range(len(sigs)):
        buf.truncate(0)
        buf.seek(0)
        try:
            ok = bool(d.verify(idx=i, dnsfunc=dnsfunc))
            reason = 'pass' if ok else ' | '.join(buf.getvalue().strip().splitlines()[-2:])
        except Exception as e:
            ok, reason = False, '%s: %s' % (type(e).__name__, e)
        tags = {}
        try:
            tags = dkim.util.parse_tag_value(sigs[i])
        except Exception:
            pass
        get = lambda k: tags.get(k, b'').decode('utf-8', 'replace').strip()
        results.append({'Domain': get(b'd'), 'Selector': get(b's'), 'Algorithm': get(b'a'), 'Pass': ok, 'Reason': reason})
    out.append(results)
print(json.dumps(out))
`

func runDKIMPy(t testing.TB, dir string, files []string, records map[string]string) ([][]DKIMResult, error) {
	requireVerifier(t, "dkimpy (python3-dkim, python3-nacl)", func() error {
		out, err := exec.Command(systemPython, "-c", "import dkim, nacl").CombinedOutput()
		return combinedError(err, out)
	})
	return runJSONVerifier(dir, []string{systemPython, "-c", dkimpyScript}, files, records)
}

const mailDKIMScript = `
use strict;
use warnings;
use JSON::PP;
use Mail::DKIM::Verifier;
use Mail::DKIM::DNS;
use Net::DNS::RR;

my $recfile = shift @ARGV;
my %rec = %{ decode_json(do { local $/; open my $f, '<', $recfile or die "$recfile: $!"; <$f> }) };
{
    no warnings 'redefine';
    # query_async() calls query() by name, so this replaces every lookup.
    *Mail::DKIM::DNS::query = sub {
        my ($name, $type) = @_;
        $name = lc $name;
        $name =~ s/\.$//;
        return () unless $type eq 'TXT' && exists $rec{$name};
        my @strings = unpack('(a255)*', $rec{$name});
        return (Net::DNS::RR->new(name => $name, type => 'TXT', txtdata => [@strings]));
    };
}
my @out;
for my $file (@ARGV) {
    my $dkim = Mail::DKIM::Verifier->new();
    open my $fh, '<:raw', $file or die "$file: $!";
    while (<$fh>) { $dkim->PRINT($_) }
    close $fh;
    $dkim->CLOSE;
    my @results;
    for my $sig ($dkim->signatures) {
        push @results, {
            Domain => $sig->domain // '', Selector => $sig->selector // '',
            Algorithm => $sig->algorithm // '',
            Pass => ($sig->result eq 'pass' ? JSON::PP::true : JSON::PP::false),
            Reason => $sig->result_detail // $sig->result,
        };
    }
    push @out, \@results;
}
print encode_json(\@out), "\n";
`

func runMailDKIM(t testing.TB, dir string, files []string, records map[string]string) ([][]DKIMResult, error) {
	requireVerifier(t, "Mail::DKIM (libmail-dkim-perl)", func() error {
		out, err := exec.Command("perl", "-MMail::DKIM::Verifier", "-MNet::DNS::RR", "-MJSON::PP", "-e", "1").CombinedOutput()
		return combinedError(err, out)
	})
	return runJSONVerifier(dir, []string{"perl", "-e", mailDKIMScript}, files, records)
}

// openDKIMPath is where Debian installs opendkim; /usr/sbin is often not
// on a non-root PATH.
const openDKIMPath = "/usr/sbin/opendkim"

// arEntry matches one dkim= result in OpenDKIM's Authentication-Results
// (RFC 8601), e.g.
//
//	dkim=fail reason="signature verification failed" (2048-bit key) header.d=example.com header.i=@example.com header.a=rsa-sha256 header.s=r header.b=BVUad/jb;
var arEntry = regexp.MustCompile(`dkim=(\w+)(?: reason="([^"]*)")?(?: \(([^)]*)\))?((?: header\.\w+=\S+?)*);?\s*$`)

// arProp matches one header.x=value property of an arEntry.
var arProp = regexp.MustCompile(`header\.(\w+)=(\S+)`)

func runOpenDKIM(t testing.TB, dir string, files []string, records map[string]string) ([][]DKIMResult, error) {
	requireVerifier(t, "opendkim", func() error {
		_, err := os.Stat(openDKIMPath)
		return err
	})
	keys := filepath.Join(dir, "opendkim.keys")
	names := make([]string, 0, len(records))
	for name := range records {
		names = append(names, name)
	}
	sort.Strings(names)
	var kb strings.Builder
	for _, name := range names {
		fmt.Fprintf(&kb, "%s %s\n", name, records[name])
	}
	conf := filepath.Join(dir, "opendkim.conf")
	confText := "Mode v\nSyslog no\nTestPublicKeys " + keys + "\n"
	if err := os.WriteFile(keys, []byte(kb.String()), 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(conf, []byte(confText), 0o600); err != nil {
		return nil, err
	}
	out := make([][]DKIMResult, 0, len(files))
	// One run per file: -t takes a list, but the output does not say
	// which Authentication-Results belongs to which file.
	for _, f := range files {
		cmd := exec.Command(openDKIMPath, "-x", conf, "-vvv", "-t", f)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			return nil, combinedError(err, stderr.Bytes())
		}
		res, err := parseOpenDKIM(stdout.String())
		if err != nil {
			return nil, fmt.Errorf("%s: %w (stderr: %s)", filepath.Base(f), err, bytes.TrimSpace(stderr.Bytes()))
		}
		out = append(out, res)
	}
	return out, nil
}

// parseOpenDKIM reads the dkim= entries of the Authentication-Results
// field OpenDKIM's test mode prints as
//
//	### INSHEADER: idx=0 hname='Authentication-Results' hvalue='...'
func parseOpenDKIM(stdout string) ([]DKIMResult, error) {
	_, ar, ok := strings.Cut(stdout, "hname='Authentication-Results' hvalue='")
	if !ok {
		return nil, fmt.Errorf("no Authentication-Results in output %q", stdout)
	}
	ar, _, _ = strings.Cut(ar, "'\n")
	var res []DKIMResult
	for _, line := range strings.Split(ar, "\n") {
		m := arEntry.FindStringSubmatch(strings.TrimSpace(line))
		if m == nil {
			continue
		}
		r := DKIMResult{Pass: m[1] == "pass", Reason: m[1]}
		if detail := strings.TrimSpace(m[2] + " " + m[3]); detail != "" {
			r.Reason += " " + strconv.Quote(detail)
		}
		for _, p := range arProp.FindAllStringSubmatch(m[4], -1) {
			v := strings.TrimSuffix(p[2], ";")
			switch p[1] {
			case "d":
				r.Domain = v
			case "s":
				r.Selector = v
			case "a":
				r.Algorithm = v
			}
		}
		res = append(res, r)
	}
	return res, nil
}
