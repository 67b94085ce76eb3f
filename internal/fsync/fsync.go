// Package fsync makes a directory's entries durable: after a file is
// created or renamed in a directory, the file's own fsync does not cover
// its name; the directory must be synced too (fsync(2): "Calling fsync()
// does not necessarily ensure that the entry in the directory containing
// the file has also reached disk"). The audit log, the capture upstream
// and the manual DNS publisher all need it.
package fsync

import "os"

// Dir fsyncs the directory dir. Its errors are the os package's, for the
// caller to wrap with what it was writing.
func Dir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}
