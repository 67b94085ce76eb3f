package policy

import (
	"reflect"
	"strings"
	"sync"
)

// keysByType maps the Go type name the YAML decoder quotes in an "unknown
// field" error ("policy.Upstream") to the keys that mapping accepts, so
// that a misspelt key can be answered with the nearest known one.
var keysByType = sync.OnceValue(func() map[string][]string {
	m := map[string][]string{}
	var walk func(t reflect.Type)
	walk = func(t reflect.Type) {
		for t.Kind() == reflect.Pointer || t.Kind() == reflect.Slice || t.Kind() == reflect.Map {
			t = t.Elem()
		}
		if t.Kind() != reflect.Struct || m[t.String()] != nil {
			return
		}
		var keys []string
		m[t.String()] = keys // marks the type seen (recursion)
		for f := range t.Fields() {
			name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
			if name == "" || name == "-" || !f.IsExported() {
				continue
			}
			keys = append(keys, name)
			walk(f.Type)
		}
		m[t.String()] = keys
	}
	walk(reflect.TypeFor[Config]())
	return m
})

// nearestKey returns the known key of the mapping of Go type typeName
// closest to key, or "" when none is close enough to be a likely typo.
func nearestKey(key, typeName string) string {
	best, bestDist := "", 0
	for _, k := range keysByType()[typeName] {
		d := editDistance(strings.ToLower(key), k)
		if best == "" || d < bestDist {
			best, bestDist = k, d
		}
	}
	// A third of the key's length, at least one and at most three edits:
	// "max_idl" suggests max_idle, "foo" suggests nothing.
	limit := min(max(len(key)/3, 1), 3)
	if best == "" || bestDist > limit {
		return ""
	}
	return best
}

// editDistance is the Levenshtein distance between a and b (bytes: keys
// are ASCII).
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
