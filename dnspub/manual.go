package dnspub

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/miekg/dns"

	"github.com/dkimgw/dkimgw/internal/fsync"
)

// Files of one zone under a Manual's directory, each a list of zone-file
// lines with fully qualified owner names.
const (
	addFile       = "add.zone"       // to be published by the DNS admin
	removeFile    = "remove.zone"    // to be withdrawn by the DNS admin
	publishedFile = "published.zone" // published, as the checker saw
)

// Manual is a publisher for DNS admins who publish by hand. It keeps the
// records to add and to remove as zone-file lines under a directory, one
// subdirectory per zone, written atomically; Pending renders them as a
// zone-file fragment and as an nsupdate script, and Settle marks a change
// done once every authoritative server shows it.
//
// Like RFC2136, it keeps one TXT record per name: AppendRecords refuses a
// name that already has another value, and SetRecords turns the old value
// into a removal. Its methods are safe for concurrent use within one
// process; two processes must not write the same directory at once.
type Manual struct {
	dir string
	log *slog.Logger
	mu  sync.Mutex
}

// NewManual returns a Manual keeping its files under dir, which it
// creates if needed.
func NewManual(dir string, logger *slog.Logger) (*Manual, error) {
	if dir == "" {
		return nil, errors.New("dnspub: manual: no directory given")
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("dnspub: manual: %w", err)
	}
	if logger == nil {
		logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return &Manual{dir: dir, log: logger.With("component", "dnspub", "publisher", "manual")}, nil
}

// Changes are what a DNS admin has to do in one zone.
type Changes struct {
	Zone   string   // fully qualified
	Add    []Record // names relative to Zone
	Remove []Record
}

// Empty reports whether there is nothing to do.
func (c *Changes) Empty() bool { return len(c.Add) == 0 && len(c.Remove) == 0 }

// zoneState is what a Manual knows about one zone; names are fully
// qualified.
type zoneState struct {
	add, remove, published []Record
}

func (m *Manual) zoneDir(zone string) string {
	return filepath.Join(m.dir, strings.TrimSuffix(zone, "."))
}

func (m *Manual) load(zone string) (*zoneState, error) {
	st := &zoneState{}
	for _, f := range []struct {
		name string
		dst  *[]Record
	}{{addFile, &st.add}, {removeFile, &st.remove}, {publishedFile, &st.published}} {
		recs, err := readZoneLines(filepath.Join(m.zoneDir(zone), f.name), zone)
		if err != nil {
			return nil, err
		}
		*f.dst = recs
	}
	return st, nil
}

func (m *Manual) save(zone string, st *zoneState) error {
	dir := m.zoneDir(zone)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return fmt.Errorf("dnspub: manual: %w", err)
	}
	for _, f := range []struct {
		name string
		recs []Record
	}{{addFile, st.add}, {removeFile, st.remove}, {publishedFile, st.published}} {
		var b strings.Builder
		for _, r := range f.recs {
			b.WriteString(zoneLine(r.Name, r) + "\n")
		}
		if err := writeAtomic(filepath.Join(dir, f.name), []byte(b.String())); err != nil {
			return err
		}
	}
	return nil
}

// readZoneLines parses a file of zone-file lines; a missing file is empty.
func readZoneLines(path, zone string) ([]Record, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("dnspub: manual: %w", err)
	}
	defer f.Close()
	zp := dns.NewZoneParser(f, zone, path)
	var recs []Record
	for rr, ok := zp.Next(); ok; rr, ok = zp.Next() {
		v, isTXT := value(rr)
		if !isTXT {
			continue
		}
		recs = append(recs, Record{Name: strings.ToLower(rr.Header().Name), TTL: ttl(rr), Value: v})
	}
	if err := zp.Err(); err != nil {
		return nil, fmt.Errorf("dnspub: manual: %s is damaged (%v): fix or remove the line", path, err)
	}
	return recs, nil
}

// writeAtomic replaces path with data so that a reader sees the old or
// the new content, never a part, and a crash leaves one of them.
func writeAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("dnspub: manual: %w", err)
	}
	defer os.Remove(tmp.Name()) // after a successful rename, a no-op
	if _, err := tmp.Write(data); err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp.Name(), 0o640)
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("dnspub: manual: write %s: %w", path, err)
	}
	// The rename is durable once the directory is synced; the new
	// content is in place either way, so a failure here is not the
	// write's.
	_ = fsync.Dir(dir)
	return nil
}

// update loads a zone's state, applies f, and saves it.
func (m *Manual) update(zone string, f func(st *zoneState) error) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	st, err := m.load(zone)
	if err != nil {
		return err
	}
	if err := f(st); err != nil {
		return err
	}
	return m.save(zone, st)
}

func at(recs []Record, name string) []Record {
	var out []Record
	for _, r := range recs {
		if r.Name == name {
			out = append(out, r)
		}
	}
	return out
}

func without(recs []Record, drop func(Record) bool) []Record {
	return slices.DeleteFunc(slices.Clone(recs), drop)
}

func sameRecord(a, b Record) bool {
	return a.Name == b.Name && a.Value == b.Value && a.ttlSeconds() == b.ttlSeconds()
}

func absRecords(zone string, recs []Record) ([]Record, error) {
	out := make([]Record, len(recs))
	for i, r := range recs {
		n, err := r.fqdn(zone)
		if err != nil {
			return nil, err
		}
		r.Name, r.TTL = n, ttlOf(r)
		out[i] = r
	}
	return out, nil
}

func relRecords(zone string, recs []Record) []Record {
	out := make([]Record, len(recs))
	for i, r := range recs {
		r.Name = relName(r.Name, zone)
		out[i] = r
	}
	return out
}

// GetRecords returns the records dkimgw wants in the zone: those
// published and those waiting for the DNS admin.
func (m *Manual) GetRecords(ctx context.Context, zone string) ([]Record, error) {
	zone, err := normZone(zone)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	st, err := m.load(zone)
	if err != nil {
		return nil, err
	}
	return relRecords(zone, append(slices.Clone(st.published), st.add...)), nil
}

// AppendRecords asks for each record to be published where its name has
// no other value. Asking again for a record already asked for is a
// no-op; a name with another value is an ErrConflict.
func (m *Manual) AppendRecords(ctx context.Context, zone string, recs []Record) ([]Record, error) {
	zone, err := normZone(zone)
	if err != nil {
		return nil, err
	}
	abs, err := absRecords(zone, recs)
	if err != nil {
		return nil, err
	}
	err = m.update(zone, func(st *zoneState) error {
		for _, r := range abs {
			have := append(at(st.published, r.Name), at(st.add, r.Name)...)
			if len(have) > 0 {
				if len(have) == 1 && have[0].Value == r.Value {
					continue // asked for already (SetRecords changes a TTL)
				}
				return fmt.Errorf("dnspub: manual: %s in zone %s already has another record: %w", r.Name, zone, ErrConflict)
			}
			st.add = append(st.add, r)
			st.remove = without(st.remove, func(x Record) bool { return x.Name == r.Name && x.Value == r.Value })
			m.log.Info("record to publish by hand", "zone", zone, "name", r.Name)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return recs, nil
}

// SetRecords asks for each record to be the only one at its name: values
// dkimgw asked for before at the name become removals.
func (m *Manual) SetRecords(ctx context.Context, zone string, recs []Record) ([]Record, error) {
	zone, err := normZone(zone)
	if err != nil {
		return nil, err
	}
	abs, err := absRecords(zone, recs)
	if err != nil {
		return nil, err
	}
	err = m.update(zone, func(st *zoneState) error {
		for _, r := range abs {
			have := append(at(st.published, r.Name), at(st.add, r.Name)...)
			if len(have) == 1 && sameRecord(have[0], r) {
				continue
			}
			other := func(x Record) bool { return x.Name == r.Name }
			for _, old := range have {
				if old.Value != r.Value && !slices.ContainsFunc(st.remove, func(x Record) bool { return sameRecord(x, old) }) {
					st.remove = append(st.remove, old)
				}
			}
			st.published = without(st.published, other)
			st.add = append(without(st.add, other), r)
			st.remove = without(st.remove, func(x Record) bool { return x.Name == r.Name && x.Value == r.Value })
			m.log.Info("record to set by hand", "zone", zone, "name", r.Name, "replaces", len(have))
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return recs, nil
}

// DeleteRecords asks for each record to be withdrawn: the record with its
// value, or, when Value is "", every record dkimgw asked for at the name.
func (m *Manual) DeleteRecords(ctx context.Context, zone string, recs []Record) ([]Record, error) {
	zone, err := normZone(zone)
	if err != nil {
		return nil, err
	}
	abs, err := absRecords(zone, recs)
	if err != nil {
		return nil, err
	}
	var done []Record
	err = m.update(zone, func(st *zoneState) error {
		for _, r := range abs {
			match := func(x Record) bool { return x.Name == r.Name && (r.Value == "" || x.Value == r.Value) }
			var gone []Record
			for _, x := range append(slices.Clone(st.published), st.add...) {
				if match(x) {
					gone = append(gone, x)
				}
			}
			if len(gone) == 0 && r.Value != "" {
				gone = []Record{r} // not asked for by dkimgw, but to go all the same
			}
			st.published = without(st.published, match)
			st.add = without(st.add, match)
			for _, g := range gone {
				if !slices.ContainsFunc(st.remove, func(x Record) bool { return x.Name == g.Name && x.Value == g.Value }) {
					st.remove = append(st.remove, g)
				}
			}
			done = append(done, relRecords(zone, gone)...)
			m.log.Info("record to withdraw by hand", "zone", zone, "name", r.Name)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return done, nil
}

// Zones lists the zones the Manual has files for.
func (m *Manual) Zones() ([]string, error) {
	entries, err := os.ReadDir(m.dir)
	if err != nil {
		return nil, fmt.Errorf("dnspub: manual: %w", err)
	}
	var zones []string
	for _, e := range entries {
		if e.IsDir() {
			zones = append(zones, e.Name()+".")
		}
	}
	return zones, nil
}

// Pending returns the changes still to be made in zone.
func (m *Manual) Pending(zone string) (*Changes, error) {
	zone, err := normZone(zone)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	st, err := m.load(zone)
	if err != nil {
		return nil, err
	}
	return &Changes{Zone: zone, Add: relRecords(zone, st.add), Remove: relRecords(zone, st.remove)}, nil
}

// Settle asks c whether the zone's servers show each pending change:
// an addition is done when every server serves exactly the record over
// UDP and TCP, a removal when no server serves the value any more. Done
// changes leave the pending lists; Settle returns what remains.
func (m *Manual) Settle(ctx context.Context, zone string, c *Checker) (*Changes, error) {
	zone, err := normZone(zone)
	if err != nil {
		return nil, err
	}
	pending, err := m.Pending(zone)
	if err != nil {
		return nil, err
	}
	added := map[string]bool{}
	for _, r := range pending.Add {
		rep, err := c.Check(ctx, zone, r)
		if err != nil {
			return nil, err
		}
		added[r.Name+"\x00"+r.Value] = rep.Visible()
	}
	removed := map[string]bool{}
	for _, r := range pending.Remove {
		rep, err := c.Check(ctx, zone, r)
		if err != nil {
			return nil, err
		}
		removed[r.Name+"\x00"+r.Value] = withdrawn(rep, r.Value)
	}
	err = m.update(zone, func(st *zoneState) error {
		var still []Record
		for _, r := range st.add {
			if added[relName(r.Name, zone)+"\x00"+r.Value] {
				st.published = append(st.published, r)
				m.log.Info("record published by hand", "zone", zone, "name", r.Name)
			} else {
				still = append(still, r)
			}
		}
		st.add = still
		st.remove = without(st.remove, func(r Record) bool {
			done := removed[relName(r.Name, zone)+"\x00"+r.Value]
			if done {
				m.log.Info("record withdrawn by hand", "zone", zone, "name", r.Name)
			}
			return done
		})
		return nil
	})
	if err != nil {
		return nil, err
	}
	return m.Pending(zone)
}

// withdrawn reports whether every server answered and none serves value.
func withdrawn(rep *Report, value string) bool {
	if len(rep.Observations) == 0 {
		return false
	}
	for _, o := range rep.Observations {
		if o.State == Failed || slices.Contains(o.Served, value) {
			return false
		}
	}
	return true
}

// ZoneFragment renders the changes for a zone file: the lines to add,
// with fully qualified owner names so that they mean the same wherever
// the fragment is pasted or $INCLUDEd, and, as comments, the lines to
// delete.
func (c *Changes) ZoneFragment() string {
	var b strings.Builder
	fmt.Fprintf(&b, "; dkimgw: DKIM key records for zone %s\n", c.Zone)
	if len(c.Add) > 0 {
		b.WriteString("; add these records (and increase the SOA serial):\n")
		for _, r := range c.Add {
			fqdn, _ := absName(r.Name, c.Zone)
			b.WriteString(zoneLine(fqdn, r) + "\n")
		}
	}
	if len(c.Remove) > 0 {
		b.WriteString("; delete these records from the zone:\n")
		for _, r := range c.Remove {
			fqdn, _ := absName(r.Name, c.Zone)
			b.WriteString("; " + zoneLine(fqdn, r) + "\n")
		}
	}
	return b.String()
}

// NsupdateScript renders the changes as input for nsupdate(1): deletions
// of exactly the values to remove, then additions, sent as one update to
// server (host:port; "" lets nsupdate find the primary from the SOA).
// Running it twice does no harm. The key is nsupdate's to add (-k or -y).
func (c *Changes) NsupdateScript(server string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "; dkimgw: DKIM key records for zone %s\n", c.Zone)
	if server != "" {
		host, port, err := net.SplitHostPort(server)
		if err != nil {
			host, port = server, "53"
		}
		fmt.Fprintf(&b, "server %s %s\n", host, port)
	}
	fmt.Fprintf(&b, "zone %s\n", c.Zone)
	for _, r := range c.Remove {
		fqdn, _ := absName(r.Name, c.Zone)
		fmt.Fprintf(&b, "update delete %s TXT %s\n", fqdn, rdata(txtRR(fqdn, r)))
	}
	for _, r := range c.Add {
		fqdn, _ := absName(r.Name, c.Zone)
		fmt.Fprintf(&b, "update add %s %d TXT %s\n", fqdn, r.ttlSeconds(), rdata(txtRR(fqdn, r)))
	}
	b.WriteString("send\n")
	return b.String()
}

// rdata is the presentation form of rr's data, without its header.
func rdata(rr dns.RR) string {
	return strings.TrimPrefix(rr.String(), rr.Header().String())
}
