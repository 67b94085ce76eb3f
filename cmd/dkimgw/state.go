package main

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/rotation"
	"github.com/dkimgw/dkimgw/rotation/etcdstore"
)

// stateStore is the configured rotation state store: bbolt in data_dir
// (one gateway) or etcd (several). Exactly one of bolt and etcd is set.
type stateStore struct {
	rotation.Store
	bolt *rotation.Bolt
	etcd *etcdstore.Store
	// settings identify an etcd store's configuration, the content of
	// its password and TLS files included: a reload with the same
	// settings keeps the store, and the gateway's candidacy with it.
	settings [sha256.Size]byte
}

// openState opens cfg's state store. name identifies this gateway as a
// lock holder or leader in etcd ("" : the host name).
func openState(cfg *policy.Config, name string, logger *slog.Logger) (*stateStore, error) {
	if cfg.State.Type != policy.StateEtcd {
		b, err := rotation.OpenBolt(cfg.DataDir)
		if err != nil {
			return nil, fmt.Errorf("data_dir: %w", err)
		}
		return &stateStore{Store: b, bolt: b}, nil
	}
	return openEtcd(cfg.State, name, logger)
}

func openEtcd(sc policy.State, name string, logger *slog.Logger) (*stateStore, error) {
	opts, sum, err := etcdSettings(sc, name)
	if err != nil {
		return nil, err
	}
	opts.Logger = logger
	s, err := etcdstore.Open(opts)
	if err != nil {
		return nil, fmt.Errorf("state: %w", err)
	}
	return &stateStore{Store: s, etcd: s, settings: sum}, nil
}

// etcdSettings are the store options of sc (without a logger) and their
// digest, which also covers the content of the TLS files: a reload after
// a certificate was renewed in place opens the store again.
func etcdSettings(sc policy.State, name string) (etcdstore.Options, [sha256.Size]byte, error) {
	var password string
	if sc.PasswordFile != "" {
		p, err := readPasswordFile(sc.PasswordFile)
		if err != nil {
			return etcdstore.Options{}, [sha256.Size]byte{}, fmt.Errorf("state.password_file: %w", err)
		}
		password = p
	}
	opts := etcdstore.Options{
		Endpoints: sc.Endpoints, Prefix: sc.Prefix,
		CAFile: sc.TLS.CA, CertFile: sc.TLS.Cert, KeyFile: sc.TLS.Key,
		Username: sc.Username, Password: password,
		DialTimeout: sc.DialTimeout.D(), TTL: sc.LeaseTTL.D(),
		Name: name,
	}
	h := sha256.New()
	// Options holds nothing json cannot write but the nil Logger.
	b, _ := json.Marshal(opts)
	h.Write(b)
	for _, f := range []string{sc.TLS.CA, sc.TLS.Cert, sc.TLS.Key} {
		if f == "" {
			continue
		}
		// An unreadable file is reported by etcdstore.Open; here it only
		// makes the settings differ.
		data, err := os.ReadFile(f)
		fmt.Fprintf(h, "\x00%d:%v\x00", len(data), err != nil)
		h.Write(data)
	}
	var sum [sha256.Size]byte
	h.Sum(sum[:0])
	return opts, sum, nil
}

// readPasswordFile reads the etcd password from the first line of path,
// which must not be readable by group or others: the same rule as the
// PIN file, since either gives control over signing.
func readPasswordFile(path string) (string, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return "", err
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return "", fmt.Errorf("%s is readable by group or others (mode %s): chmod 600 it", path, fi.Mode().Perm())
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	pw, _, _ := strings.Cut(string(data), "\n")
	pw = strings.TrimRight(pw, "\r")
	if pw == "" {
		return "", fmt.Errorf("%s: the first line is empty", path)
	}
	return pw, nil
}

// String names the store in messages.
func (s *stateStore) String() string {
	if s.etcd != nil {
		return s.etcd.String()
	}
	return s.bolt.Path()
}

// Close releases the store: etcd's leases (a held lock or leadership
// goes at once) and connections. A bbolt store holds nothing open.
func (s *stateStore) Close() error {
	if s == nil || s.etcd == nil {
		return nil
	}
	return s.etcd.Close()
}

// Check tells whether the store can be read and written, and what to fix
// if not. The bbolt store needs nothing beyond its directory.
func (s *stateStore) Check(ctx context.Context) error {
	if s.etcd == nil {
		return nil
	}
	return s.etcd.Check(ctx)
}

// storeUnavailable reports whether err says the state store (etcd) could
// not be reached: try again later.
func storeUnavailable(err error) bool {
	var ue *etcdstore.UnavailableError
	return errors.As(err, &ue)
}
