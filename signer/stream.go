package signer

import (
	"crypto/sha256"
	"errors"
)

// Stream reads a message pushed to it piece by piece and keeps only what
// Sign needs: the header section and the body hash. It is for a caller
// that does not relay the message itself, such as a milter, whose MTA
// keeps the message: memory stays at the header section (bounded by
// SpoolOptions.MaxHeaderBytes) plus a few kilobytes of hashing state,
// whatever the size of the body, and nothing goes to disk.
//
// The message is normalised and checked exactly as [Spool] does, with
// the same errors; SpoolOptions.Dir and MemoryLimit are not used. A
// Stream is not safe for concurrent use.
type Stream struct {
	s    *spooler
	err  error
	done bool
}

// NewStream returns a Stream with opts' limits.
func NewStream(opts SpoolOptions) *Stream {
	if opts.MaxHeaderBytes <= 0 {
		opts.MaxHeaderBytes = DefaultMaxHeaderBytes
	}
	s := newSpooler(opts, true, sha256.New())
	return &Stream{s: s}
}

// Write takes the next bytes of the message. After an error (a
// *RefusedError, ErrTooLarge) every later Write and Finish return it
// again.
func (st *Stream) Write(p []byte) (int, error) {
	if st.done {
		return 0, errors.New("signer: write to a finished stream")
	}
	if st.err != nil {
		return 0, st.err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if err := st.s.ends.write(p, st.s.emitFn); err != nil {
		st.err = err
		return 0, err
	}
	return len(p), nil
}

// Finish ends the message and returns it, ready for [Sign]. Its Open
// fails: the bytes were not kept. [WriteSigned] cannot be used with it.
func (st *Stream) Finish() (*Message, error) {
	if st.err != nil {
		return nil, st.err
	}
	if st.done {
		return nil, errors.New("signer: stream already finished")
	}
	st.done = true
	m, err := st.s.finish()
	if err != nil {
		st.err = err
		return nil, err
	}
	return m, nil
}
