package main

import (
	"errors"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/dnspub"
	"github.com/dkimgw/dkimgw/hsm"
	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/rotation"
	"github.com/dkimgw/dkimgw/testenv"
)

// TestTokenKeysStayInTheirDomains: the token as rotation's key store
// lists, hands out and destroys only keys of the rotating domains; a key
// of a fixed-selector domain is invisible to rotation and cannot be
// destroyed through it.
func TestTokenKeysStayInTheirDomains(t *testing.T) {
	st := testenv.SoftHSM(t)
	tok, err := hsm.Open(t.Context(), st.URI(), hsm.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	if _, err := tok.GenerateKey(t.Context(), "fixed.example", "s1", hsm.Ed25519); err != nil {
		t.Fatal(err)
	}
	ks := &tokenKeys{tok: tok, domains: map[string]bool{"rot.example": true}}
	if _, err := ks.GenerateKey(t.Context(), "rot.example", "ed1", rotation.Ed25519); err != nil {
		t.Fatal(err)
	}
	infos, err := ks.Keys(t.Context())
	if err != nil || len(infos) != 1 || infos[0].Domain != "rot.example" || infos[0].Algorithm != rotation.Ed25519 {
		t.Fatalf("Keys = %+v, %v; want only rot.example's key", infos, err)
	}
	if err := ks.DestroyKey(t.Context(), "fixed.example", "s1"); err == nil {
		t.Error("DestroyKey of a fixed-selector domain's key succeeded")
	}
	if _, err := ks.GenerateKey(t.Context(), "fixed.example", "s2", rotation.Ed25519); err == nil {
		t.Error("GenerateKey for a domain without rotation succeeded")
	}
	if _, err := tok.Key(t.Context(), "fixed.example", "s1"); err != nil {
		t.Errorf("the fixed key is gone: %v", err)
	}
	if err := ks.DestroyKey(t.Context(), "rot.example", "ed1"); err != nil {
		t.Fatal(err)
	}
	if _, err := tok.Key(t.Context(), "rot.example", "ed1"); !errors.Is(err, hsm.ErrKeyNotFound) {
		t.Errorf("after DestroyKey: %v", err)
	}
}

// TestZoneCheckers: dnspub's checker as rotation's, against BIND: one
// Served per server and transport, and the zone's negative TTL.
func TestZoneCheckers(t *testing.T) {
	server := testenv.StartBIND(t, testenv.DNSOptions{SOAMinimum: 7})
	cfg := &policy.Config{DNS: policy.DNS{CheckServers: []string{server.Addr}}}
	z := &zoneCheckers{byZone: map[string]*dnspub.Checker{}, timeout: 5 * time.Second}
	if err := z.add(cfg, server.Zone, "p"); err != nil {
		t.Fatal(err)
	}
	obs, err := z.Check(t.Context(), server.Zone, "testenv-nonce."+server.Zone[:len(server.Zone)-1])
	if err != nil {
		t.Fatal(err)
	}
	if obs.NegativeTTL != 7*time.Second {
		t.Errorf("NegativeTTL = %v, want 7s", obs.NegativeTTL)
	}
	if len(obs.Servers) != 2 || obs.Servers[0].Server != server.Addr+"/udp" || obs.Servers[1].Server != server.Addr+"/tcp" {
		t.Fatalf("servers %+v, want %s/udp and %s/tcp", obs.Servers, server.Addr, server.Addr)
	}
	for _, s := range obs.Servers {
		if s.Err != nil || len(s.Values) != 1 {
			t.Errorf("%s: %+v", s.Server, s)
		}
	}
	// A name that does not exist: no values, no error.
	obs, err = z.Check(t.Context(), server.Zone, "nothing._domainkey."+server.Zone[:len(server.Zone)-1])
	if err != nil || len(obs.Servers) != 2 || len(obs.Servers[0].Values) != 0 || obs.Servers[0].Err != nil {
		t.Errorf("absent name: %+v, %v", obs, err)
	}
}
