package policy_test

import (
	"fmt"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/dkimgw/dkimgw/policy"
)

// configDoc is the configuration reference: one table row per key.
const configDoc = "../docs/configuration.md"

// docRow is a row of the reference: `key` | default | meaning.
var docRow = regexp.MustCompile("(?m)^\\| `([a-z_.A-Z]+)` \\|([^|]*)\\|")

// configKeys walks the configuration structs by their yaml tags: every key
// the decoder accepts, with the field that holds it ("NAME" for map keys;
// list elements share their list's name).
func configKeys(t reflect.Type, prefix string, keys map[string][]int, index []int) {
	for t.Kind() == reflect.Pointer || t.Kind() == reflect.Slice {
		t = t.Elem()
	}
	if t.Kind() == reflect.Map {
		configKeys(t.Elem(), prefix+".NAME", keys, nil)
		return
	}
	if t.Kind() != reflect.Struct || t.PkgPath() != reflect.TypeOf(policy.Config{}).PkgPath() {
		return
	}
	for i := range t.NumField() {
		f := t.Field(i)
		tag, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if tag == "" || tag == "-" {
			continue
		}
		key := tag
		if prefix != "" {
			key = prefix + "." + tag
		}
		var idx []int
		if index != nil {
			idx = append(slices.Clone(index), i)
		}
		keys[key] = idx
		configKeys(f.Type, key, keys, idx)
	}
}

// TestConfigReference keeps docs/configuration.md true to the code: it
// lists every key the decoder knows and no other, and each default given
// there as a `literal` is what Load applies to a file that leaves the key
// out.
func TestConfigReference(t *testing.T) {
	doc, err := os.ReadFile(configDoc)
	if err != nil {
		t.Fatal(err)
	}
	documented := map[string]string{}
	for _, m := range docRow.FindAllStringSubmatch(string(doc), -1) {
		if _, dup := documented[m[1]]; dup {
			t.Errorf("%s: key %s has two rows", configDoc, m[1])
		}
		documented[m[1]] = strings.TrimSpace(m[2])
	}
	keys := map[string][]int{}
	configKeys(reflect.TypeOf(policy.Config{}), "", keys, []int{})
	if len(keys) < 80 {
		t.Fatalf("found only %d configuration keys in the structs", len(keys))
	}
	for k := range keys {
		if _, ok := documented[k]; !ok {
			t.Errorf("%s does not document the key %s", configDoc, k)
		}
	}
	for k := range documented {
		if _, ok := keys[k]; !ok {
			t.Errorf("%s documents %s, which the configuration does not have", configDoc, k)
		}
	}

	// The file sets only what has no default; a rotating domain and a
	// publisher carry the rotation defaults.
	dir := t.TempDir()
	path := dir + "/dkimgw.yaml"
	if err := os.WriteFile(path, []byte(`hsm: {uri: "pkcs11:token=t?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=1"}
upstream: {address: "127.0.0.1:2526"}
clients: [{name: c, networks: ["127.0.0.0/8"], domains: [example.com]}]
domains:
  example.com: {rotation: {publisher: p}}
dns: {publishers: {p: {type: manual, zone: example.com.}}, check_servers: ["127.0.0.1"]}
`), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := policy.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	values := map[string]reflect.Value{}
	collect(reflect.ValueOf(*cfg), "", values)
	literal := regexp.MustCompile("^`([^`]*)`")
	checked := 0
	for k, def := range documented {
		m := literal.FindStringSubmatch(def)
		if m == nil {
			continue
		}
		v, ok := values[k]
		if !ok {
			t.Errorf("%s: %s has the default `%s`, but a file without it has no value there", configDoc, k, m[1])
			continue
		}
		if v.Kind() == reflect.String {
			if v.String() != m[1] {
				t.Errorf("%s: %s: documented default `%s`, the code applies %q", configDoc, k, m[1], v.String())
			}
			checked++
			continue
		}
		want := reflect.New(v.Type())
		if err := yaml.Unmarshal([]byte(m[1]), want.Interface()); err != nil {
			t.Errorf("%s: %s: default `%s` does not decode as %s: %v", configDoc, k, m[1], v.Type(), err)
			continue
		}
		if got := v.Interface(); !reflect.DeepEqual(deref(want.Elem()), deref(v)) {
			t.Errorf("%s: %s: documented default `%s`, the code applies %v", configDoc, k, m[1], fmtValue(got))
		}
		checked++
	}
	if checked < 30 {
		t.Errorf("only %d defaults checked; the reference should give most as literals", checked)
	}
}

// collect records the value at every key of a loaded configuration; map
// entries become NAME, a list's first element stands for the list.
func collect(v reflect.Value, prefix string, out map[string]reflect.Value) {
	switch v.Kind() {
	case reflect.Pointer:
		if !v.IsNil() {
			collect(v.Elem(), prefix, out)
		}
		return
	case reflect.Map:
		if v.Type().Elem().Kind() == reflect.Struct || v.Type().Elem().Kind() == reflect.Pointer {
			for _, k := range v.MapKeys() {
				collect(v.MapIndex(k), prefix+".NAME", out)
			}
		}
		return
	case reflect.Slice:
		if v.Type().Elem().Kind() == reflect.Struct && v.Len() > 0 {
			collect(v.Index(0), prefix, out)
		}
		return
	case reflect.Struct:
	default:
		return
	}
	t := v.Type()
	for i := range t.NumField() {
		f := t.Field(i)
		tag, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if tag == "" || tag == "-" || !f.IsExported() {
			continue
		}
		key := tag
		if prefix != "" {
			key = prefix + "." + tag
		}
		fv := v.Field(i)
		if fv.Kind() != reflect.Struct && !(fv.Kind() == reflect.Pointer && !fv.IsNil() && fv.Elem().Kind() == reflect.Struct) {
			out[key] = fv
		}
		collect(fv, key, out)
	}
}

func deref(v reflect.Value) any {
	for v.Kind() == reflect.Pointer {
		if v.IsNil() {
			return nil
		}
		v = v.Elem()
	}
	return v.Interface()
}

func fmtValue(v any) string {
	if p, ok := v.(*string); ok && p != nil {
		return fmt.Sprintf("%q", *p)
	}
	return fmt.Sprintf("%v", v)
}
