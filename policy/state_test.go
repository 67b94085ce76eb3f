package policy

import (
	"strings"
	"testing"
	"time"
)

func TestParseStateDefaultsToBbolt(t *testing.T) {
	cfg, err := Parse("/etc/dkimgw/dkimgw.yaml", []byte(minimal), testFiles(t))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.State.Type != StateBbolt {
		t.Errorf("state.type = %q, want %q", cfg.State.Type, StateBbolt)
	}
}

func TestParseStateEtcd(t *testing.T) {
	yml := minimal + `state:
  type: etcd
  endpoints: [https://10.0.0.1:2379, https://10.0.0.2:2379]
  prefix: /mail/dkimgw
  tls: {ca: etcd-ca.pem, cert: client.pem, key: client-key.pem}
  username: dkimgw
  password_file: etcd-password
  dial_timeout: 3s
  lease_ttl: 15s
`
	cfg, err := Parse("/etc/dkimgw/dkimgw.yaml", []byte(yml), testFiles(t))
	if err != nil {
		t.Fatal(err)
	}
	s := cfg.State
	want := State{
		Type: StateEtcd, Endpoints: []string{"https://10.0.0.1:2379", "https://10.0.0.2:2379"}, Prefix: "/mail/dkimgw/",
		TLS:      StateTLS{CA: "/etc/dkimgw/etcd-ca.pem", Cert: "/etc/dkimgw/client.pem", Key: "/etc/dkimgw/client-key.pem"},
		Username: "dkimgw", PasswordFile: "/etc/dkimgw/etcd-password",
		DialTimeout: Duration(3 * time.Second), LeaseTTL: Duration(15 * time.Second),
	}
	if s.Type != want.Type || strings.Join(s.Endpoints, ",") != strings.Join(want.Endpoints, ",") || s.Prefix != want.Prefix ||
		s.TLS != want.TLS || s.Username != want.Username || s.PasswordFile != want.PasswordFile || s.DialTimeout != want.DialTimeout || s.LeaseTTL != want.LeaseTTL {
		t.Errorf("state = %+v\nwant    %+v", s, want)
	}
}

func TestParseStateEtcdDefaults(t *testing.T) {
	cfg, err := Parse("/etc/dkimgw/dkimgw.yaml", []byte(minimal+"state: {type: etcd, endpoints: [http://127.0.0.1:2379]}\n"), testFiles(t))
	if err != nil {
		t.Fatal(err)
	}
	if s := cfg.State; s.Prefix != DefaultStatePrefix || s.DialTimeout.D() != DefaultStateDialTimeout || s.LeaseTTL.D() != DefaultStateLeaseTTL {
		t.Errorf("state = %+v, want the defaults", s)
	}
}

func TestParseStateErrors(t *testing.T) {
	for _, tt := range []struct{ name, state, want string }{
		{"unknown type", "{type: consul}", `state.type: unknown value "consul" (want bbolt or etcd)`},
		{"no endpoints", "{type: etcd}", "state.endpoints is required with type etcd"},
		{"not a URL", "{type: etcd, endpoints: [127.0.0.1:2379]}", `state.endpoints: "127.0.0.1:2379" is not an etcd client URL`},
		{"bad scheme", "{type: etcd, endpoints: [unix:///run/etcd]}", "is not an etcd client URL"},
		{"relative prefix", "{type: etcd, endpoints: [http://e:2379], prefix: dkimgw}", `state.prefix "dkimgw": want a key prefix starting with /`},
		{"cert without key", "{type: etcd, endpoints: [https://e:2379], tls: {cert: c.pem}}", "state.tls.cert and state.tls.key go together"},
		{"user without password", "{type: etcd, endpoints: [http://e:2379], username: u}", "state.username and state.password_file go together"},
		{"password without user", "{type: etcd, endpoints: [http://e:2379], password_file: p}", "state.username and state.password_file go together"},
		{"short ttl", "{type: etcd, endpoints: [http://e:2379], lease_ttl: 1s}", "state.lease_ttl must be a whole number of seconds, at least 2"},
		{"fractional ttl", "{type: etcd, endpoints: [http://e:2379], lease_ttl: 2500ms}", "state.lease_ttl must be a whole number of seconds"},
		{"etcd keys on bbolt", "{endpoints: [http://e:2379]}", "are for type etcd only"},
		{"unknown key", "{type: etcd, endpoints: [http://e:2379], pasword_file: p}", "pasword_file"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse("dkimgw.yaml", []byte(minimal+"state: "+tt.state+"\n"), testFiles(t))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error = %v, want it to contain %q", err, tt.want)
			}
			if !strings.Contains(err.Error(), "dkimgw.yaml:") {
				t.Errorf("error %q does not name the file and line", err)
			}
		})
	}
}
