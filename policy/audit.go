package policy

import (
	"path/filepath"
	"time"
)

// DefaultCheckpointEvery is how often serve seals the audit log: a
// minute bounds what an attacker who can write the file could change
// unseen.
const DefaultCheckpointEvery = time.Minute

// Audit configures the audit log (see docs/operations.md, "The audit log").
type Audit struct {
	// Path is the JSON-lines audit file. Default data_dir/audit.log;
	// relative to the configuration file's directory.
	Path string `yaml:"path"`
	// CheckpointEvery is how often serve appends a checkpoint signed by
	// the token's audit key (and at shutdown). Default 1m.
	CheckpointEvery Duration `yaml:"checkpoint_every"`
}

func (v *validator) validateAudit(c *Config) {
	if c.Audit.Path == "" {
		c.Audit.Path = filepath.Join(c.DataDir, "audit.log")
	}
	c.Audit.Path = v.path(c.Audit.Path)
	setDefault(&c.Audit.CheckpointEvery, Duration(DefaultCheckpointEvery))
	if c.Audit.CheckpointEvery < Duration(time.Second) {
		v.errorf(at("audit", "checkpoint_every"), "audit.checkpoint_every must be at least 1s")
	}
}
