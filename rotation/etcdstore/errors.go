package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// UnavailableError is a call that etcd did not answer in time: no member
// reachable, no quorum, no leader, or a request lost in a leader change.
// It is temporary: the rotation lifecycle pauses and the next pass tries
// again. A write that failed so may or may not have been applied; the
// next pass reads the state again before it decides (compare-and-set).
type UnavailableError struct {
	Op        string // what was being done: "read keys", "update", "lock", ...
	Endpoints []string
	Err       error
}

func (e *UnavailableError) Error() string {
	return fmt.Sprintf("etcdstore: %s: etcd at %s did not answer (%v); check that a majority of its members run and that the endpoints are right; the key lifecycle pauses until it answers",
		e.Op, strings.Join(e.Endpoints, ","), errText(e.Err))
}

func (e *UnavailableError) Unwrap() error { return e.Err }

// Temporary reports true: trying again later may work.
func (e *UnavailableError) Temporary() bool { return true }

// ErrLockLost is returned (wrapped) by Update when this store held the
// lock and its lease has ended (etcd unreachable for longer than the
// lease TTL): another reconciler may hold the lock now, so nothing was
// written.
var ErrLockLost = errors.New("the state store lock was lost (its etcd lease ended)")

// ErrNoLeader is returned by Election.Leader when nobody leads.
var ErrNoLeader = errors.New("no gateway leads")

// wrap classifies an etcd client error once, where it happens, and says
// what to fix. parent is the caller's context: when it ended, the error
// is the caller's doing and is wrapped as it is.
func (s *Store) wrap(parent context.Context, op string, err error) error {
	if err == nil {
		return nil
	}
	if parent != nil && parent.Err() != nil {
		return fmt.Errorf("etcdstore: %s: %w", op, err)
	}
	msg := errText(err)
	switch {
	case errors.Is(err, rpctypes.ErrAuthFailed), errors.Is(err, rpctypes.ErrUserEmpty),
		errors.Is(err, rpctypes.ErrInvalidAuthToken), errors.Is(err, rpctypes.ErrAuthOldRevision):
		return fmt.Errorf("etcdstore: %s: etcd refused the credentials of user %q: check the username and the password file: %w", op, s.opts.Username, err)
	case errors.Is(err, rpctypes.ErrPermissionDenied):
		who := "an unauthenticated client"
		if s.opts.Username != "" {
			who = fmt.Sprintf("user %q", s.opts.Username)
		}
		return fmt.Errorf("etcdstore: %s: %s may not read and write the keys under %q: grant it a role with readwrite permission on that prefix (etcdctl role grant-permission ROLE readwrite --prefix=true %s): %w",
			op, who, s.prefix, s.prefix, err)
	case isTLSFailure(msg):
		return fmt.Errorf("etcdstore: %s: TLS with etcd at %s failed: check that tls.ca is the CA that signed the members' certificates, that tls.cert and tls.key are a client certificate they accept, and that the endpoints use https://: %w",
			op, strings.Join(s.opts.Endpoints, ","), err)
	case isUnavailable(err):
		return &UnavailableError{Op: op, Endpoints: s.opts.Endpoints, Err: err}
	}
	return fmt.Errorf("etcdstore: %s: %w", op, err)
}

func isUnavailable(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	for _, e := range []error{rpctypes.ErrNoLeader, rpctypes.ErrTimeout, rpctypes.ErrTimeoutDueToLeaderFail,
		rpctypes.ErrTimeoutDueToConnectionLost, rpctypes.ErrLeaderChanged, rpctypes.ErrTooManyRequests,
		rpctypes.ErrNotCapable, rpctypes.ErrUnhealthy} {
		if errors.Is(err, e) {
			return true
		}
	}
	var ee rpctypes.EtcdError
	if errors.As(err, &ee) {
		return ee.Code() == codes.Unavailable || ee.Code() == codes.DeadlineExceeded
	}
	if st, ok := status.FromError(err); ok {
		switch st.Code() {
		case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled:
			return true
		}
	}
	return false
}

// isTLSFailure recognises a failed TLS handshake: gRPC reports it as a
// status whose text carries the handshake's error, not as a typed error.
func isTLSFailure(msg string) bool {
	for _, s := range []string{"handshake failed", "x509:", "tls:", "first record does not look like a TLS handshake", "server preface"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// errText is an error's message without gRPC's "rpc error: code = X
// desc =" wrapping.
func errText(err error) string {
	if st, ok := status.FromError(err); ok {
		return st.Message()
	}
	return err.Error()
}
