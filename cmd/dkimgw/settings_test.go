package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io/fs"
	"math/big"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/dkimgw/dkimgw/policy"
)

// everySetting sets every key that relaySettings reads, none to its
// default, so that a setting the relay takes but serve does not fill
// shows as a zero field.
const everySetting = `
hsm: {uri: "pkcs11:token=test"}
smtp:
  listen: "127.0.0.1:2526"
  hostname: relay.test
  max_message_bytes: 12345678
  max_recipients: 77
  max_line_length: 2000
  max_connections: 50
  max_connections_per_ip: 7
  read_timeout: 61s
  write_timeout: 62s
  data_timeout: 63s
  max_session_duration: 2h
  max_auth_failures: 5
  tls: {cert_file: cert.pem, key_file: key.pem}
upstream:
  address: "127.0.0.1:2527"
  tls: required
  tls_server_name: mx.test
  tls_ca_file: ca.pem
  timeout: 64s
  connect_timeout: 65s
  idle_timeout: 66s
  keepalive: 30s
  max_connections: 40
  max_idle: 3
spool:
  dir: spool
  memory_limit: 4096
  max_header_bytes: 2048
clients:
  - name: campaigns
    networks: ["127.0.0.0/8"]
    domains: [example.com]
domains:
  example.com: {selectors: [s1]}
`

// TestRelaySettingsFilled: serve gives the relay every setting of the
// configuration, each from its own key.
func TestRelaySettingsFilled(t *testing.T) {
	certPEM, keyPEM := testCert(t)
	files := map[string][]byte{"cert.pem": certPEM, "key.pem": keyPEM, "ca.pem": certPEM}
	dir := t.TempDir()
	cfg, err := policy.Parse(filepath.Join(dir, "dkimgw.yaml"), []byte(everySetting), func(name string) ([]byte, error) {
		if b, ok := files[filepath.Base(name)]; ok {
			return b, nil
		}
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	})
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	set := relaySettings(cfg)

	var zero func(v reflect.Value, path string)
	zero = func(v reflect.Value, path string) {
		if v.Kind() == reflect.Struct {
			for i := range v.NumField() {
				zero(v.Field(i), path+"."+v.Type().Field(i).Name)
			}
			return
		}
		if v.IsZero() {
			t.Errorf("relaySettings leaves %s unset", path)
		}
	}
	zero(reflect.ValueOf(set), "Settings")

	s, u := cfg.SMTP, cfg.Upstream
	if set.Listen != s.Listen || set.Hostname != s.Hostname || set.MaxConnectionsPerIP != s.MaxConnectionsPerIP ||
		set.DataTimeout != s.DataTimeout || set.MaxAuthFailures != s.MaxAuthFailures {
		t.Errorf("smtp settings %+v do not match the configuration's %+v", set, s)
	}
	if set.Certificate != s.TLS.Certificate() {
		t.Error("the STARTTLS certificate is not the configuration's")
	}
	if set.Upstream.Address != u.Address || set.Upstream.TLS != u.TLS || set.Upstream.TLSServerName != u.TLSServerName ||
		set.Upstream.RootCAs != u.RootCAs() || set.Upstream.Keepalive != u.Keepalive || set.Upstream.MaxIdle != u.MaxIdle {
		t.Errorf("upstream settings %+v do not match the configuration's %+v", set.Upstream, u)
	}
	if set.Spool.Dir != cfg.Spool.Dir || set.Spool.MemoryLimit != cfg.Spool.MemoryLimit || set.Spool.MaxHeaderBytes != cfg.Spool.MaxHeaderBytes {
		t.Errorf("spool settings %+v do not match the configuration's %+v", set.Spool, cfg.Spool)
	}
}

func testCert(t *testing.T) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "relay.test"},
		DNSNames:              []string{"relay.test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}
