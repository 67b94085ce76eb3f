package audit

import (
	"bufio"
	"bytes"
	"crypto"
	"crypto/ed25519"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// Result is what Verify found.
type Result struct {
	// Records is the number of lines read.
	Records int
	// Checkpoints is the number of valid checkpoints.
	Checkpoints int
	// Sealed is the line of the last valid checkpoint (0: none).
	Sealed int
	// Unsealed counts the records after the last valid checkpoint.
	Unsealed int
	// Broken is the first broken record, nil when none is.
	Broken *Break
}

// Break is the first record that fails verification.
type Break struct {
	Line   int // 1-based line of the file
	Reason string
}

func (b *Break) Error() string { return fmt.Sprintf("line %d: %s", b.Line, b.Reason) }

// maxLine bounds one record: records are small; a huge line is damage.
const maxLine = 1 << 20

// Verify reads a whole log and checks the chain and every checkpoint
// against pub, the audit key's public key. It stops at the first broken
// record. The error is for reading failures only.
func Verify(r io.Reader, pub crypto.PublicKey) (Result, error) {
	var res Result
	wantKeyID, err := KeyID(pub)
	if err != nil {
		return res, err
	}
	if _, _, err := sigAlg(pub); err != nil {
		return res, err
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), maxLine)
	prev, seq := genesis, uint64(0)
	brk := func(line int, format string, args ...any) (Result, error) {
		res.Broken = &Break{Line: line, Reason: fmt.Sprintf(format, args...)}
		return res, nil
	}
	line := 0
	for sc.Scan() {
		line++
		res.Records = line
		b := sc.Bytes()
		var rec Record
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&rec); err != nil {
			return brk(line, "not a record (%v): a changed or torn line", err)
		}
		if rec.Prev != prev {
			return brk(line, "chain broken: prev %.16s… is not the hash of the line before (%.16s…): a line before it was deleted, changed, inserted or moved", rec.Prev, prev)
		}
		if rec.Seq != seq+1 {
			return brk(line, "sequence number %d after %d: a record was deleted, inserted or moved", rec.Seq, seq)
		}
		if rec.Event == EventCheckpoint {
			if rec.KeyID != wantKeyID {
				return brk(line, "checkpoint signed by key %s, not by the audit key %s: a forged checkpoint", rec.KeyID, wantKeyID)
			}
			sig, err := base64.StdEncoding.DecodeString(rec.Sig)
			if err != nil || !verifySig(pub, CheckpointDigest(rec.Seq, rec.Prev), sig) {
				return brk(line, "checkpoint signature does not verify with the audit key: a forged checkpoint, or records before it were rewritten")
			}
			res.Checkpoints++
			res.Sealed, res.Unsealed = line, 0
		} else {
			res.Unsealed++
		}
		prev, seq = LineHash(b), rec.Seq
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return brk(line+1, "a line longer than %d bytes: damage", maxLine)
		}
		return res, fmt.Errorf("audit: read the log: %w", err)
	}
	return res, nil
}

func verifySig(pub crypto.PublicKey, digest, sig []byte) bool {
	switch k := pub.(type) {
	case ed25519.PublicKey:
		return ed25519.Verify(k, digest, sig)
	case *rsa.PublicKey:
		return rsa.VerifyPKCS1v15(k, crypto.SHA256, digest, sig) == nil
	}
	return false
}
