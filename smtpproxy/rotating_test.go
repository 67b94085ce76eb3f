package smtpproxy

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/dkimgw/dkimgw/signer"
)

// rotatingKeys is a SignerSource: memKeys plus the active selectors of
// rotating domains, switched by the test.
type rotatingKeys struct {
	*memKeys
	mu     sync.Mutex
	active map[string][]string // domain -> selectors
}

func (r *rotatingKeys) setActive(domain string, sels ...string) {
	r.mu.Lock()
	r.active[domain] = sels
	r.mu.Unlock()
}

func (r *rotatingKeys) Signers(ctx context.Context, domain string) ([]signer.Identity, error) {
	r.mu.Lock()
	sels := r.active[domain]
	r.mu.Unlock()
	var ids []signer.Identity
	for _, s := range sels {
		k, err := r.Key(ctx, domain, s)
		if err != nil {
			return nil, err
		}
		ids = append(ids, signer.Identity{Domain: domain, Selector: s, Key: k})
	}
	return ids, nil
}

var _ SignerSource = (*rotatingKeys)(nil)

const rotatingConfig = `
hsm: {uri: "pkcs11:token=test"}
smtp:
  hostname: dkimgw.test
upstream:
  address: "%s"
  timeout: 5s
  connect_timeout: 2s
clients:
  - name: campaigns
    networks: ["127.0.0.0/8"]
    domains: [example.com]
dns:
  publishers:
    p: {type: manual}
  check_servers: ["127.0.0.1:53"]
domains:
  example.com:
    rotation: {algorithms: [rsa-2048, ed25519], publisher: p}
`

// TestRotatingDomain: a rotating domain is signed with the keys its
// SignerSource says are active when the message is signed; with none
// active yet it gets 451 4.7.0 (never an unverifiable signature), or goes
// unsigned where on_token_error says so.
func TestRotatingDomain(t *testing.T) {
	for _, unsigned := range []bool{false, true} {
		t.Run(fmt.Sprint("relay-unsigned=", unsigned), func(t *testing.T) {
			conf := rotatingConfig + fmt.Sprintf("data_dir: %q\n", t.TempDir())
			if unsigned {
				conf += "on_token_error: relay-unsigned\n"
			}
			var rk *rotatingKeys
			h := newHarnessKeys(t, conf, func(m *memKeys) KeySource {
				rk = &rotatingKeys{memKeys: m, active: map[string][]string{}}
				return rk
			})
			c := h.dial()
			_, err := send(c, "bounce@example.com", []string{"a@example.net"}, testMsg)
			if unsigned {
				if err != nil {
					t.Fatalf("send with no active key and relay-unsigned: %v", err)
				}
				if m := h.sink.WaitMessages(t, 1, 5*time.Second)[0]; string(m.Data) != testMsg {
					t.Errorf("relayed %q, want the original unsigned", m.Data)
				}
				return
			}
			wantCode(t, err, 451, smtp.EnhancedCode{4, 7, 0})
			if !strings.Contains(h.logs.String(), "no active key yet") {
				t.Errorf("the log does not say why:\n%s", h.logs.String())
			}
			rk.setActive("example.com", "ed1")
			if _, err := send(c, "bounce@example.com", []string{"a@example.net"}, testMsg); err != nil {
				t.Fatalf("send with ed1 active: %v", err)
			}
			m := h.sink.WaitMessages(t, 1, 5*time.Second)[0]
			verify(t, m.Data)
			if n := strings.Count(string(m.Data), "DKIM-Signature:"); n != 1 || !strings.Contains(string(m.Data), "s=ed1") {
				t.Errorf("want one signature by ed1:\n%s", m.Data)
			}
			// The switch: the next message is signed with the new set.
			rk.setActive("example.com", "rsa1", "ed1")
			if _, err := send(c, "bounce@example.com", []string{"a@example.net"}, testMsg); err != nil {
				t.Fatalf("send after the switch: %v", err)
			}
			m = h.sink.WaitMessages(t, 2, 5*time.Second)[1]
			verify(t, m.Data)
			if !strings.Contains(string(m.Data), "s=rsa1") || !strings.Contains(string(m.Data), "s=ed1") {
				t.Errorf("want signatures by rsa1 and ed1:\n%s", m.Data)
			}
			if !strings.Contains(h.logs.String(), "selectors=\"[rsa1 ed1]\"") {
				t.Errorf("the transaction log does not name the active selectors:\n%s", grepLine(h.logs.String(), "selectors"))
			}
		})
	}
}

// TestRotatingDomainNeedsSignerSource: a plain KeySource cannot sign for
// a rotating domain: 451, not a message without the signature it needs.
func TestRotatingDomainNeedsSignerSource(t *testing.T) {
	h := newHarness(t, rotatingConfig+fmt.Sprintf("data_dir: %q\n", t.TempDir()))
	_, err := send(h.dial(), "bounce@example.com", []string{"a@example.net"}, testMsg)
	wantCode(t, err, 451, smtp.EnhancedCode{4, 7, 0})
}
