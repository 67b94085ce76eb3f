package etcdstore

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/dkimgw/dkimgw/rotation"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
)

// Defaults of Options.
const (
	// DefaultPrefix is where the store's keys live in etcd.
	DefaultPrefix = "/dkimgw/"
	// DefaultDialTimeout bounds connecting (and authenticating) to etcd.
	DefaultDialTimeout = 5 * time.Second
	// DefaultCallTimeout bounds each read and write: a healthy cluster
	// answers in milliseconds, and a leader election takes about a
	// second, so a call that has not answered in five is not going to.
	DefaultCallTimeout = 5 * time.Second
	// DefaultTTL is the lease of the lock and of a leader: how long after
	// its holder died (or lost etcd) another gateway may take over.
	DefaultTTL = 10 * time.Second
)

// Options configure Open. Endpoints is required.
type Options struct {
	// Endpoints are the members' client URLs (http:// or https://).
	Endpoints []string
	// Prefix is prepended to every key the store uses. "" means
	// DefaultPrefix; a missing trailing "/" is added.
	Prefix string
	// CAFile, CertFile and KeyFile configure TLS: CAFile verifies the
	// members' certificates (empty: the system's roots), CertFile and
	// KeyFile are the client certificate (both or neither). TLS is on
	// when any is set or an endpoint is https://.
	CAFile, CertFile, KeyFile string
	// Username and Password authenticate to etcd (the caller reads the
	// password from its file). Empty: no authentication.
	Username, Password string
	// DialTimeout bounds connecting; zero means DefaultDialTimeout.
	DialTimeout time.Duration
	// CallTimeout bounds each call; zero means DefaultCallTimeout.
	CallTimeout time.Duration
	// TTL is the lease of the lock and of an election's leader, rounded
	// up to whole seconds (etcd's unit); zero means DefaultTTL.
	TTL time.Duration
	// Name identifies this gateway as a lock holder or leader; "" means
	// the host name.
	Name string
	// Logger receives the etcd client's warnings and the store's own
	// messages. Nil: discard.
	Logger *slog.Logger
}

// Store is a rotation.Store on etcd, shared by every gateway that opens
// it with the same endpoints and prefix. See the package documentation
// for the key layout and the transaction.
type Store struct {
	opts   Options
	prefix string
	ttl    int // seconds
	cli    *clientv3.Client
	tls    *tls.Config
	log    *slog.Logger
	id     Participant

	// ctx lives as long as the store: sessions keep their leases alive
	// under it, and Close ends them.
	ctx    context.Context
	cancel context.CancelFunc

	mu sync.Mutex
	// sessions are the leases of this store's locks and candidacies,
	// revoked by Close.
	sessions map[*concurrency.Session]bool
	// held is the lock's election while this store holds the lock:
	// Update then writes only while it still does (fencing).
	held *concurrency.Election
}

var _ rotation.Store = (*Store)(nil)

// Participant identifies a gateway holding the lock or leading.
type Participant struct {
	Name  string    `json:"name"`
	PID   int       `json:"pid"`
	Host  string    `json:"host"`
	Since time.Time `json:"since"`
}

// Open validates opts and returns a store. It connects lazily, except
// that etcd's authentication (when a username is set) happens here,
// within the dial timeout; use Check to test the connection.
func Open(opts Options) (*Store, error) {
	if len(opts.Endpoints) == 0 {
		return nil, errors.New("etcdstore: no endpoints: list the client URLs of the etcd members (http://host:2379)")
	}
	for _, ep := range opts.Endpoints {
		if !strings.HasPrefix(ep, "http://") && !strings.HasPrefix(ep, "https://") {
			return nil, fmt.Errorf("etcdstore: endpoint %q: want a URL starting with http:// or https://", ep)
		}
	}
	if (opts.CertFile == "") != (opts.KeyFile == "") {
		return nil, errors.New("etcdstore: tls.cert and tls.key go together: set both or neither")
	}
	if (opts.Username == "") != (opts.Password == "") {
		return nil, errors.New("etcdstore: a username needs a password and a password a username")
	}
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = DefaultDialTimeout
	}
	if opts.CallTimeout <= 0 {
		opts.CallTimeout = DefaultCallTimeout
	}
	if opts.TTL <= 0 {
		opts.TTL = DefaultTTL
	}
	if opts.TTL < 2*time.Second {
		return nil, fmt.Errorf("etcdstore: lease TTL %v is too short: at least 2s, or a leader would lose its lease to one slow keep-alive", opts.TTL)
	}
	prefix := opts.Prefix
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	host, _ := os.Hostname()
	if opts.Name == "" {
		opts.Name = host
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "etcdstore")
	tlsConf, err := tlsConfig(opts)
	if err != nil {
		return nil, err
	}
	s := &Store{
		opts:   opts,
		prefix: prefix,
		tls:    tlsConf,
		ttl:    int(math.Ceil(opts.TTL.Seconds())),
		log:    log,
		id:     Participant{Name: opts.Name, PID: os.Getpid(), Host: host},

		sessions: map[*concurrency.Session]bool{},
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   opts.Endpoints,
		DialTimeout: opts.DialTimeout,
		TLS:         tlsConf,
		Username:    opts.Username,
		Password:    opts.Password,
		Logger:      zap.New(&slogCore{log: log}),
		// A gateway keeps working through a member's loss: a call that
		// found a member gone is tried on another.
		DialKeepAliveTime:    5 * time.Second,
		DialKeepAliveTimeout: 3 * time.Second,
	})
	if err != nil {
		s.cancel()
		return nil, s.wrap(nil, "connect", err)
	}
	s.cli = cli
	return s, nil
}

func tlsConfig(opts Options) (*tls.Config, error) {
	https := false
	for _, ep := range opts.Endpoints {
		https = https || strings.HasPrefix(ep, "https://")
	}
	if !https && opts.CAFile == "" && opts.CertFile == "" {
		return nil, nil
	}
	if !https {
		return nil, fmt.Errorf("etcdstore: TLS files are set but the endpoints are http://: use https:// endpoints (%s)", strings.Join(opts.Endpoints, ","))
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	if opts.CAFile != "" {
		pem, err := os.ReadFile(opts.CAFile)
		if err != nil {
			return nil, fmt.Errorf("etcdstore: read tls.ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("etcdstore: tls.ca %s holds no PEM certificate", opts.CAFile)
		}
		c.RootCAs = pool
	}
	if opts.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(opts.CertFile, opts.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("etcdstore: load tls.cert %s and tls.key %s: %w", opts.CertFile, opts.KeyFile, err)
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}

// Close revokes the store's leases (a held lock or leadership goes at
// once; if etcd cannot be reached, when the lease expires) and closes
// its connections.
func (s *Store) Close() error {
	s.mu.Lock()
	var live []*concurrency.Session
	for sess := range s.sessions {
		live = append(live, sess)
	}
	s.mu.Unlock()
	for _, sess := range live {
		_ = s.closeSession(sess)
	}
	s.cancel()
	return s.cli.Close()
}

// String names the store in messages: its endpoints and prefix.
func (s *Store) String() string {
	return fmt.Sprintf("etcd %s prefix %s", strings.Join(s.opts.Endpoints, ","), s.prefix)
}

// call bounds one call by the call timeout (and ctx).
func (s *Store) call(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.opts.CallTimeout)
}

func (s *Store) keysPrefix() string { return s.prefix + "keys/" }

func (s *Store) domainPrefix(domain string) string { return s.keysPrefix() + domain + "/" }

func (s *Store) keyPath(domain, selector string) string { return s.domainPrefix(domain) + selector }

// checkName refuses a domain or selector that would not be one path
// segment of the key layout.
func checkName(what, v string) error {
	if v == "" || strings.ContainsAny(v, "/\x00") {
		return fmt.Errorf("etcdstore: invalid %s %q: want a non-empty name without '/'", what, v)
	}
	return nil
}

// Check connects and verifies that this client may read and write under
// the prefix, without writing anything: for `config check` and a
// readiness probe. Its error says what to fix (unreachable, TLS, auth,
// permission).
func (s *Store) Check(ctx context.Context) error {
	cctx, cancel := s.call(ctx)
	defer cancel()
	probe := s.prefix + "check"
	// etcd checks the permissions of every operation of a transaction,
	// taken or not; a version is never -1, so the put never runs.
	_, err := s.cli.Txn(cctx).
		If(clientv3.Compare(clientv3.Version(probe), "=", -1)).
		Then(clientv3.OpPut(probe, "")).
		Else(clientv3.OpGet(s.keysPrefix(), clientv3.WithPrefix(), clientv3.WithCountOnly())).
		Commit()
	if err != nil && ctx.Err() == nil && isUnavailable(err) {
		// gRPC waits for a connection until the deadline and then says
		// only that: a failed TLS handshake or a refused connection is
		// found by trying one.
		if d := s.diagnose(ctx); d != nil {
			if isTLSFailure(d.Error()) {
				return s.wrap(ctx, "check", d)
			}
			return &UnavailableError{Op: "check", Endpoints: s.opts.Endpoints, Err: d}
		}
	}
	return s.wrap(ctx, "check", err)
}

// Keys returns the domain's records, read linearizably (from the
// cluster's majority), with Rev set to each record's etcd version.
func (s *Store) Keys(ctx context.Context, domain string) ([]rotation.Key, error) {
	if err := checkName("domain", domain); err != nil {
		return nil, err
	}
	cctx, cancel := s.call(ctx)
	defer cancel()
	resp, err := s.cli.Get(cctx, s.domainPrefix(domain), clientv3.WithPrefix())
	if err != nil {
		return nil, s.wrap(ctx, "read keys of "+domain, err)
	}
	keys := make([]rotation.Key, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		k, err := s.decode(kv.Key, kv.Value, kv.Version)
		if err != nil {
			return nil, err
		}
		keys = append(keys, k)
	}
	sortKeys(keys)
	return keys, nil
}

// decode reads one record; its path must agree with what it says.
// Domains lists the domains the store has records of, sorted: for
// moving a whole state to another store.
func (s *Store) Domains(ctx context.Context) ([]string, error) {
	cctx, cancel := s.call(ctx)
	defer cancel()
	resp, err := s.cli.Get(cctx, s.keysPrefix(), clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, s.wrap(ctx, "list domains", err)
	}
	seen := map[string]bool{}
	var out []string
	for _, kv := range resp.Kvs {
		d, _, ok := strings.Cut(strings.TrimPrefix(string(kv.Key), s.keysPrefix()), "/")
		if ok && !seen[d] {
			seen[d] = true
			out = append(out, d)
		}
	}
	sort.Strings(out)
	return out, nil
}

func (s *Store) decode(path, value []byte, version int64) (rotation.Key, error) {
	var k rotation.Key
	if err := json.Unmarshal(value, &k); err != nil {
		return k, fmt.Errorf("etcdstore: record %s is corrupt: %w", path, err)
	}
	if string(path) != s.keyPath(k.Domain, k.Selector) {
		return k, fmt.Errorf("etcdstore: record %s is corrupt: it names %s/%s", path, k.Domain, k.Selector)
	}
	k.Rev = uint64(version)
	return k, nil
}

// sortKeys orders as rotation.Store.Keys requires: by CreatedAt, then
// selector.
func sortKeys(keys []rotation.Key) {
	sort.SliceStable(keys, func(i, j int) bool {
		if !keys[i].CreatedAt.Equal(keys[j].CreatedAt) {
			return keys[i].CreatedAt.Before(keys[j].CreatedAt)
		}
		return keys[i].Selector < keys[j].Selector
	})
}

// Update writes all changes in one etcd transaction, or none. See the
// package documentation for what the transaction compares.
func (s *Store) Update(ctx context.Context, changes ...rotation.Change) error {
	if len(changes) == 0 {
		return nil
	}
	seen := map[string]bool{}
	activating := map[string]bool{} // domains where a key becomes active
	for _, c := range changes {
		if err := checkName("domain", c.Key.Domain); err != nil {
			return err
		}
		if err := checkName("selector", c.Key.Selector); err != nil {
			return err
		}
		p := s.keyPath(c.Key.Domain, c.Key.Selector)
		if seen[p] {
			// As in one bbolt transaction: the second write of a record
			// names the revision the first one replaced.
			return fmt.Errorf("etcdstore: %w: %s/%s is written twice in one update", rotation.ErrConflict, c.Key.Domain, c.Key.Selector)
		}
		seen[p] = true
		if c.Key.State == rotation.StateActive {
			activating[c.Key.Domain] = true
		}
	}
	cctx, cancel := s.call(ctx)
	defer cancel()

	var cmps []clientv3.Cmp
	// Only a write that makes a key active can break "one active key per
	// algorithm": read those domains, check the result, and make the
	// transaction depend on nothing in them having changed since.
	for d := range activating {
		resp, err := s.cli.Get(cctx, s.domainPrefix(d), clientv3.WithPrefix())
		if err != nil {
			return s.wrap(ctx, "update: read keys of "+d, err)
		}
		if err := s.checkActive(d, resp.Kvs, changes); err != nil {
			return err
		}
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(s.domainPrefix(d)), "<", resp.Header.Revision+1).WithPrefix())
	}
	puts := make([]clientv3.Op, 0, len(changes))
	gets := make([]clientv3.Op, 0, len(changes)+1)
	for _, c := range changes {
		p := s.keyPath(c.Key.Domain, c.Key.Selector)
		if c.Prev > math.MaxInt64-1 {
			return fmt.Errorf("etcdstore: %w: %s/%s: revision %d out of range", rotation.ErrConflict, c.Key.Domain, c.Key.Selector, c.Prev)
		}
		cmps = append(cmps, clientv3.Compare(clientv3.Version(p), "=", int64(c.Prev)))
		k := c.Key
		k.Rev = c.Prev + 1
		v, err := json.Marshal(k)
		if err != nil {
			return fmt.Errorf("etcdstore: encode %s/%s: %w", k.Domain, k.Selector, err)
		}
		puts = append(puts, clientv3.OpPut(p, string(v)))
		gets = append(gets, clientv3.OpGet(p, clientv3.WithKeysOnly()))
	}
	s.mu.Lock()
	held := s.held
	s.mu.Unlock()
	if held != nil {
		// Fencing: a holder whose lease ended (a long pause, etcd out of
		// reach) must not write under a lock another may hold now.
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(held.Key()), "=", held.Rev()))
		gets = append(gets, clientv3.OpGet(held.Key(), clientv3.WithKeysOnly()))
	}
	resp, err := s.cli.Txn(cctx).If(cmps...).Then(puts...).Else(gets...).Commit()
	if err != nil {
		return s.wrap(ctx, "update", err)
	}
	if resp.Succeeded {
		return nil
	}
	// Say why: a record's revision, the lock, or another write in a
	// domain where this update activates a key.
	for i, c := range changes {
		var ver int64
		if kvs := resp.Responses[i].GetResponseRange().Kvs; len(kvs) == 1 {
			ver = kvs[0].Version
		}
		if uint64(ver) != c.Prev {
			return fmt.Errorf("etcdstore: %w: %s/%s is at revision %d, not %d", rotation.ErrConflict, c.Key.Domain, c.Key.Selector, ver, c.Prev)
		}
	}
	if held != nil && len(resp.Responses[len(changes)].GetResponseRange().Kvs) == 0 {
		return fmt.Errorf("etcdstore: update: %w; nothing was written", ErrLockLost)
	}
	return fmt.Errorf("etcdstore: %w: another write changed the keys of %s while this update activated one", rotation.ErrConflict, strings.Join(sortedKeys(activating), ", "))
}

type mvccKV = mvccpb.KeyValue

// checkActive refuses changes that would leave two active keys of one
// algorithm in domain d, given its records as read.
func (s *Store) checkActive(d string, kvs []*mvccKV, changes []rotation.Change) error {
	state := map[string]rotation.Key{}
	for _, kv := range kvs {
		k, err := s.decode(kv.Key, kv.Value, kv.Version)
		if err != nil {
			return err
		}
		state[k.Selector] = k
	}
	for _, c := range changes {
		if c.Key.Domain == d {
			state[c.Key.Selector] = c.Key
		}
	}
	active := map[rotation.Algorithm]string{}
	for _, sel := range sortedKeys(state) {
		k := state[sel]
		if k.State != rotation.StateActive {
			continue
		}
		if other, ok := active[k.Algorithm]; ok {
			return fmt.Errorf("etcdstore: %w: %s would have two active %s keys (%s and %s)", rotation.ErrConflict, d, k.Algorithm, other, sel)
		}
		active[k.Algorithm] = sel
	}
	return nil
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
