package hsm_test

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/dkimgw/dkimgw/hsm"
)

func TestParseURI(t *testing.T) {
	t.Parallel()
	slot := uint(7)
	tests := []struct {
		name    string
		uri     string
		want    *hsm.URI
		wantErr string
	}{
		{"token and pin file", "pkcs11:token=dkim?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/dkimgw/pin",
			&hsm.URI{Token: "dkim", ModulePath: "/usr/lib/softhsm/libsofthsm2.so", PINSource: "file:/etc/dkimgw/pin"}, ""},
		{"all path attributes", "pkcs11:token=My%20Token;serial=abc123;slot-id=7;manufacturer=SoftHSM%20project;model=SoftHSM%20v2?module-path=/m.so&pin-value=12%2B34&max-sessions=16",
			&hsm.URI{Token: "My Token", Serial: "abc123", SlotID: &slot, Manufacturer: "SoftHSM project", Model: "SoftHSM v2", ModulePath: "/m.so", PINValue: "12+34", MaxSessions: 16}, ""},
		{"scheme is case-insensitive, vendor attributes ignored", "PKCS11:token=a;x-vendor=1?module-path=/m.so&x-foo=bar",
			&hsm.URI{Token: "a", ModulePath: "/m.so"}, ""},
		{"env pin source", "pkcs11:token=a?module-path=/m.so&pin-source=env:DKIMGW_PIN",
			&hsm.URI{Token: "a", ModulePath: "/m.so", PINSource: "env:DKIMGW_PIN"}, ""},
		{"not pkcs11", "file:/etc/x", nil, `does not start with "pkcs11:"`},
		{"no module", "pkcs11:token=a", nil, "module-path is missing"},
		{"object selects a key", "pkcs11:token=a;object=k?module-path=/m.so", nil, "selects a key"},
		{"unknown path attribute", "pkcs11:tokn=a?module-path=/m.so", nil, `unsupported path attribute "tokn"`},
		{"unknown query attribute", "pkcs11:token=a?module-path=/m.so&pin=1", nil, `unsupported query attribute "pin"`},
		{"module-name", "pkcs11:token=a?module-name=softhsm2", nil, "module-name is not supported"},
		{"duplicate", "pkcs11:token=a;token=b?module-path=/m.so", nil, "given twice"},
		{"both pin kinds", "pkcs11:token=a?module-path=/m.so&pin-value=1&pin-source=file:/p", nil, "mutually exclusive"},
		{"bad slot", "pkcs11:slot-id=x?module-path=/m.so", nil, "slot-id"},
		{"bad max-sessions", "pkcs11:token=a?module-path=/m.so&max-sessions=0", nil, "max-sessions"},
		{"bad escape", "pkcs11:token=%zz?module-path=/m.so", nil, "percent-encoding"},
		{"no equals", "pkcs11:token?module-path=/m.so", nil, "not name=value"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := hsm.ParseURI(tt.uri)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !errors.Is(err, hsm.ErrInvalidURI) {
					t.Fatalf("ParseURI(%q) error = %v, want one containing %q", tt.uri, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseURI(%q): %v", tt.uri, err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("ParseURI(%q) = %+v, want %+v", tt.uri, got, tt.want)
			}
		})
	}
}

func TestURIStringHidesPIN(t *testing.T) {
	t.Parallel()
	u, err := hsm.ParseURI("pkcs11:token=a?module-path=/m.so&pin-value=s3cret")
	if err != nil {
		t.Fatal(err)
	}
	if s := u.String(); strings.Contains(s, "s3cret") || !strings.Contains(s, "pin-value=***") {
		t.Errorf("String() = %q: must hide the PIN", s)
	}
	_, err = hsm.ParseURI("pkcs11:token=a;pin-value=s3cret;bogus?module-path=/m.so")
	if err == nil || strings.Contains(err.Error(), "s3cret") {
		t.Errorf("error for a bad URI shows the PIN: %v", err)
	}
	_, err = hsm.ParseURI("http://x/?pin-value=s3cret&a=b")
	if err == nil || strings.Contains(err.Error(), "s3cret") {
		t.Errorf("error for a non-pkcs11 URI shows the PIN: %v", err)
	}
}

func TestPINSources(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	good := filepath.Join(dir, "pin")
	os.WriteFile(good, []byte("1234\nignored\n"), 0o600)
	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, []byte("\n"), 0o600)
	shared := filepath.Join(dir, "shared")
	os.WriteFile(shared, []byte("1234\n"), 0o600)
	os.Chmod(shared, 0o640) // past the umask
	env := map[string]string{"PIN": "5678"}
	getenv := func(k string) string { return env[k] }
	tests := []struct {
		source, want, wantErr string
	}{
		{"file:" + good, "1234", ""},
		{"file://" + good, "1234", ""},
		{good, "1234", ""},
		{"env:PIN", "5678", ""},
		{"env:NOPE", "", "unset or empty"},
		{"file:" + empty, "", "first line is empty"},
		{"file:" + filepath.Join(dir, "missing"), "", "no such file"},
		{"relative/pin", "", "absolute"},
		{"file:" + shared, "", "mode 0640); run chmod 600 " + shared},
	}
	for _, tt := range tests {
		u := &hsm.URI{ModulePath: "/m.so", PINSource: tt.source}
		got, err := u.PIN(getenv)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("PIN(%q) error = %v, want %q", tt.source, err, tt.wantErr)
			}
			if !errors.Is(err, hsm.ErrPINSource) {
				t.Errorf("PIN(%q) error = %v, not ErrPINSource", tt.source, err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("PIN(%q) = %q, %v; want %q", tt.source, got, err, tt.want)
		}
	}
	if _, err := (&hsm.URI{ModulePath: "/m.so"}).PIN(getenv); !errors.Is(err, hsm.ErrPINSource) {
		t.Errorf("a URI without a PIN source: %v, want ErrPINSource", err)
	}
}

func FuzzParseURI(f *testing.F) {
	for _, seed := range []string{
		"pkcs11:token=dkim?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/dkimgw/pin",
		"pkcs11:token=My%20Token;serial=abc;slot-id=3?module-path=/m.so&pin-value=1&max-sessions=4",
		"pkcs11:?module-path=/m.so",
		"pkcs11:token=%00;x-a=b?module-path=%2Fm.so",
		"pkcs11:",
		"PKCS11:slot-id=18446744073709551615?module-path=/m",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := hsm.ParseURI(s)
		if err != nil {
			if !errors.Is(err, hsm.ErrInvalidURI) {
				t.Fatalf("error not wrapping ErrInvalidURI: %v", err)
			}
			return
		}
		// String renders a URI that parses back to the same thing (with
		// the PIN value hidden).
		pin := u.PINValue
		u.PINValue = ""
		back, err := hsm.ParseURI(u.String())
		if err != nil {
			t.Fatalf("String() = %q does not parse: %v", u.String(), err)
		}
		if !reflect.DeepEqual(back, u) {
			t.Fatalf("round trip: %+v -> %q -> %+v", u, u.String(), back)
		}
		if pin != "" && strings.Contains(u.String(), pin) && len(pin) > 3 {
			t.Fatalf("String() shows the PIN")
		}
	})
}

func errorsIs(err, target error) bool { return errors.Is(err, target) }
