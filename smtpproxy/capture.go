package smtpproxy

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/dkimgw/dkimgw/internal/fsync"
	"github.com/dkimgw/dkimgw/policy"
	"github.com/dkimgw/dkimgw/signer"
)

// errCaptureFailed answers a message the capture directory could not
// store: the sender keeps it, as for an upstream that is down.
var errCaptureFailed = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0},
	Message: "Cannot store the message, try again later"}

// captureDir returns the directory of an upstream.address capture:DIR
// (made absolute by policy), or "".
func captureDir(u UpstreamSettings) string {
	dir, ok := strings.CutPrefix(u.Address, policy.CapturePrefix)
	if !ok {
		return ""
	}
	return dir
}

// captureSeq orders the files of messages captured in the same
// nanosecond by this process.
var captureSeq atomic.Uint64

// captureName is a file name that sorts by capture time (UTC, fixed
// width) and never collides: a per-process sequence number for messages
// of the same nanosecond, and random bits for other processes writing to
// the same directory.
func captureName(now time.Time) string {
	var r [6]byte
	_, _ = rand.Read(r[:])
	return fmt.Sprintf("%s-%010d-%s.eml", now.UTC().Format("20060102T150405.000000000Z"), captureSeq.Add(1)%1e10, hex.EncodeToString(r[:]))
}

// capture stores the signed message in the capture directory, exactly as
// it would have been relayed, and returns the 250 naming the file. The
// file is written under a temporary name, fsynced, renamed into place and
// the directory fsynced before the 250, so that a message accepted is on
// disk and a file that exists is whole. Any failure is a 451 and leaves
// no file behind.
func (tx *transaction) capture(dir string, fields []string, msg *signer.Message) error {
	name := captureName(time.Now())
	tmp := filepath.Join(dir, "."+name+".tmp")
	err := writeCapture(tmp, fields, msg)
	if err == nil {
		err = os.Rename(tmp, filepath.Join(dir, name))
	}
	if err == nil {
		err = fsync.Dir(dir)
	}
	if err != nil {
		os.Remove(tmp)
		os.Remove(filepath.Join(dir, name))
		tx.internal = fmt.Errorf("smtpproxy: capture to %s: %w", dir, err)
		return errCaptureFailed
	}
	tx.done = true
	tx.upstream = "captured as " + name
	return &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 0, 0}, Message: "OK: captured as " + name + ", not delivered"}
}

func writeCapture(path string, fields []string, msg *signer.Message) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	_, err = signer.WriteSigned(f, fields, msg)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
