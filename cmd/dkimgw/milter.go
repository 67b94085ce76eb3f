package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"

	gomilter "github.com/d--j/go-milter"
	"golang.org/x/net/netutil"

	"github.com/dkimgw/dkimgw/milter"
	"github.com/dkimgw/dkimgw/policy"
)

const (
	milterUsage = "milter [--config FILE] | milter import-opendkim --keytable FILE --signingtable FILE [--out FILE]"
	milterLong  = `
milter runs dkimgw as a milter for Postfix (smtpd_milters,
non_smtpd_milters) and Sendmail (INPUT_MAIL_FILTER) on milter.listen
(inet:HOST:PORT or unix:/path; see docs/milter.md). It signs a message
when its From domain has keys and the MTA's client ({client_addr}, or
{auth_authen} after SMTP AUTH) is allowed that domain by the clients
table; mail From domains without keys passes untouched, mail of an
unallowed client as milter.on_unauthorized says (accept, reject,
tempfail). The DKIM-Signature fields go first in the header; the body is
never changed. A token that cannot sign gives 451 4.7.0 through the MTA
(milter.on_token_error: tempfail) or lets the message pass unsigned
(accept).

It shares everything else with serve: the key check at start, rotation,
the drift watch, the admin listener, the audit log, SIGHUP and SIGTERM
behave as 'dkimgw serve --help' tells; upstream is not needed. serve
with milter.listen set runs both the relay and the milter.

  dkimgw milter import-opendkim --keytable FILE --signingtable FILE [--out FILE]
        read OpenDKIM's KeyTable and SigningTable (refile: patterns too)
        and write the equivalent domains and clients configuration, with
        the command that generates each replacement key in the token. File
        keys are never imported ('dkimgw milter import-opendkim --help').

Exit status of milter: 0 stopped by SIGTERM or SIGINT; 64 bad arguments;
69 a configured key is missing or unusable; 71 milter.listen or the admin
address cannot be bound (in use, no permission, a path that is not a
socket or a socket another process serves); 73 the audit log cannot be
written; 75 token unavailable; 77 wrong or locked PIN; 78 invalid
configuration, no milter.listen, bad pin-source, or no such token.`
)

var milterCommand = &command{
	name:  "milter",
	usage: milterUsage,
	short: "run the signing milter for Postfix and Sendmail",
	long:  milterLong,
	run:   runMilter,
}

func runMilter(ctx context.Context, c *cli, args []string) int {
	if len(args) > 0 && args[0] == "import-opendkim" {
		return runImportOpenDKIM(c, args[1:])
	}
	fs := newFlagSet(c, "milter")
	path := fs.String("config", defaultConfig, "configuration `file`")
	if code, ok := parseFlags(c, fs, milterUsage, milterLong, args); !ok {
		return code
	}
	return runGateway(ctx, c, *path, false)
}

// milterListener is the milter of a gateway; nil when milter.listen is
// empty (its methods then do nothing).
type milterListener struct {
	srv *milter.Server
	l   net.Listener
}

var milterLogOnce sync.Once

// startMilter listens on cfg.Milter.Listen, or returns nil when it is
// empty.
func startMilter(cfg *policy.Config, ring *keyring, obs milter.Observer, refused milter.Refusals, logger *slog.Logger) (*milterListener, error) {
	if cfg.Milter.Listen == "" {
		return nil, nil
	}
	// The library logs through a package variable; the process has one
	// logger, so it is set once.
	milterLogOnce.Do(func() {
		ml := logger.With("component", "milter")
		gomilter.LogWarning = func(format string, v ...any) { ml.Warn(fmt.Sprintf(format, v...)) }
	})
	srv, err := milter.New(milter.Options{Config: cfg, Keys: ring, Observer: obs, Refusals: refused, Logger: logger})
	if err != nil {
		return nil, err
	}
	l, err := listenMilter(cfg.Milter)
	if err != nil {
		return nil, err
	}
	// Past max_connections, connections wait in the listen queue: the
	// milter's memory stays bounded however many the MTA opens.
	return &milterListener{srv: srv, l: netutil.LimitListener(l, cfg.Milter.MaxConnections)}, nil
}

func (m *milterListener) serve(errs chan<- error) {
	if m == nil {
		return
	}
	go func() {
		if err := m.srv.Serve(m.l); err != nil {
			errs <- fmt.Errorf("milter.listen: %w", err)
		}
	}()
}

func (m *milterListener) addr() string {
	if m == nil {
		return ""
	}
	return m.l.Addr().String()
}

func (m *milterListener) reload(cfg *policy.Config) {
	if m != nil {
		m.srv.Reload(cfg)
	}
}

func (m *milterListener) shutdown(ctx context.Context) error {
	if m == nil {
		return nil
	}
	return m.srv.Shutdown(ctx)
}

func (m *milterListener) close() {
	if m == nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // no grace: the gateway is failing
	_ = m.srv.Shutdown(ctx)
	m.l.Close()
}

// sameMilterListener reports whether a reload keeps the milter listener
// as it is: the socket and the timeouts are fixed when it starts.
func sameMilterListener(a, b *policy.Config) bool {
	x, y := a.Milter, b.Milter
	return x.Listen == y.Listen && x.Mode() == y.Mode() && x.SocketGroup == y.SocketGroup &&
		x.ReadTimeout == y.ReadTimeout && x.WriteTimeout == y.WriteTimeout && x.MaxConnections == y.MaxConnections
}

// listenMilter opens the milter socket. A unix socket left by a previous
// run is removed (only a socket: any other file there is an error), and
// the new one gets socket_mode and socket_group, so that the MTA's user
// can connect.
func listenMilter(m policy.Milter) (net.Listener, error) {
	network, addr := m.Network()
	if network == "tcp" {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("milter.listen: %w", err)
		}
		return l, nil
	}
	if fi, err := os.Lstat(addr); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("milter.listen: %s exists and is not a socket; remove it or choose another path", addr)
		}
		// A live milter on it would answer; a stale socket refuses.
		if conn, err := net.Dial("unix", addr); err == nil {
			conn.Close()
			return nil, fmt.Errorf("milter.listen: another process serves %s", addr)
		}
		if err := os.Remove(addr); err != nil {
			return nil, fmt.Errorf("milter.listen: remove stale socket: %w", err)
		}
	}
	if err := os.MkdirAll(filepath.Dir(addr), 0o755); err != nil {
		return nil, fmt.Errorf("milter.listen: %w", err)
	}
	l, err := net.Listen("unix", addr)
	if err != nil {
		return nil, fmt.Errorf("milter.listen: %w", err)
	}
	// Closing the listener removes the socket file.
	l.(*net.UnixListener).SetUnlinkOnClose(true)
	if err := setSocketAccess(addr, m); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

func setSocketAccess(path string, m policy.Milter) error {
	if m.SocketGroup != "" {
		gid, err := strconv.Atoi(m.SocketGroup)
		if err != nil {
			g, lerr := user.LookupGroup(m.SocketGroup)
			if lerr != nil {
				return fmt.Errorf("milter.socket_group: %w", lerr)
			}
			if gid, err = strconv.Atoi(g.Gid); err != nil {
				return fmt.Errorf("milter.socket_group %q: gid %q is not a number", m.SocketGroup, g.Gid)
			}
		}
		if err := os.Chown(path, -1, gid); err != nil {
			return fmt.Errorf("milter.socket_group: %w", err)
		}
	}
	if err := os.Chmod(path, os.FileMode(m.Mode())); err != nil {
		return fmt.Errorf("milter.socket_mode: %w", err)
	}
	return nil
}
