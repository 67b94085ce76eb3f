package fsync

import (
	"errors"
	"io/fs"
	"path/filepath"
	"testing"
)

func TestDir(t *testing.T) {
	if err := Dir(t.TempDir()); err != nil {
		t.Errorf("Dir of a directory: %v", err)
	}
	if err := Dir(filepath.Join(t.TempDir(), "gone")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Dir of a missing directory: %v, want fs.ErrNotExist", err)
	}
}
