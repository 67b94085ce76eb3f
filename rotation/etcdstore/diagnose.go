package etcdstore

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"sync"
	"time"
)

// diagnoseTimeout bounds each endpoint's connection and handshake.
const diagnoseTimeout = 2 * time.Second

// diagnose connects to each endpoint as gRPC would (TCP, then TLS with
// the store's configuration and ALPN h2) and returns why none works: a
// TLS failure if any endpoint had one, else the connection errors; nil
// when some endpoint accepts the connection.
func (s *Store) diagnose(ctx context.Context) error {
	errs := make([]error, len(s.opts.Endpoints))
	var wg sync.WaitGroup
	for i, ep := range s.opts.Endpoints {
		wg.Go(func() { errs[i] = s.try(ctx, ep) })
	}
	wg.Wait()
	var tlsErr error
	for _, err := range errs {
		if err == nil {
			return nil
		}
		if tlsErr == nil && isTLSFailure(err.Error()) {
			tlsErr = err
		}
	}
	if tlsErr != nil {
		return tlsErr
	}
	return errors.Join(errs...)
}

func (s *Store) try(ctx context.Context, endpoint string) error {
	u, err := url.Parse(endpoint)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, diagnoseTimeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", u.Host)
	if err != nil {
		return err
	}
	defer conn.Close()
	if u.Scheme != "https" {
		return nil
	}
	c := s.tls.Clone()
	if c == nil {
		c = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	if c.ServerName == "" {
		c.ServerName = u.Hostname()
	}
	c.NextProtos = []string{"h2"}
	tc := tls.Client(conn, c)
	if dl, ok := ctx.Deadline(); ok {
		_ = tc.SetDeadline(dl)
	}
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("%s: %w", endpoint, err)
	}
	// In TLS 1.3 a server refuses the client's certificate after the
	// client's side of the handshake is done: its alert comes with the
	// first read. A server that accepted sends its HTTP/2 settings.
	var b [1]byte
	if _, err := tc.Read(b[:]); err != nil {
		var alert tls.AlertError
		if errors.As(err, &alert) || isTLSFailure(err.Error()) {
			return fmt.Errorf("%s: %w", endpoint, err)
		}
	}
	return nil
}
