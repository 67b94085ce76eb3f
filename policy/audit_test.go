package policy

import (
	"strings"
	"testing"
	"time"
)

func TestAuditConfig(t *testing.T) {
	for _, tt := range []struct {
		name, yaml string
		path       string
		every      time.Duration
	}{
		{"defaults", minimal, "/var/lib/dkimgw/audit.log", time.Minute},
		{"under data_dir", minimal + "data_dir: /srv/dkimgw\n", "/srv/dkimgw/audit.log", time.Minute},
		{"relative path", minimal + "audit: {path: log/audit.jsonl, checkpoint_every: 30s}\n", "/etc/dkimgw/log/audit.jsonl", 30 * time.Second},
		// check_servers alone, for fixed selectors (dkimgw audit asks them).
		{"check_servers without rotation", minimal + "dns: {check_servers: [192.0.2.1, \"192.0.2.2:5353\"]}\n", "/var/lib/dkimgw/audit.log", time.Minute},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := Parse("/etc/dkimgw/dkimgw.yaml", []byte(tt.yaml), testFiles(t))
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Audit.Path != tt.path || cfg.Audit.CheckpointEvery.D() != tt.every {
				t.Errorf("audit = %+v, want path %s every %s", cfg.Audit, tt.path, tt.every)
			}
		})
	}
	for _, tt := range []struct{ name, yaml, want string }{
		{"checkpoint_every too short", minimal + "audit: {checkpoint_every: 500ms}\n", "audit.checkpoint_every must be at least 1s"},
		{"unknown audit key", minimal + "audit: {file: x}\n", `unknown key "file"`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse("/etc/dkimgw/dkimgw.yaml", []byte(tt.yaml), testFiles(t))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err = %v, want %q", err, tt.want)
			}
		})
	}
}
