package signer

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"sync/atomic"
)

// ErrChanged is returned (wrapped) when the source of a message from
// SpoolAt ends before the size it was given, when it is spooled or when
// it is read again: the source changed while the message was being
// signed. Whatever was written of the message must be discarded; sign it
// again once it no longer changes.
var ErrChanged = errors.New("signer: message changed while it was being signed")

// sourceChunk is the size of each read from a SpoolAt source. A file in
// the page cache is read at memory speed, so a system call per 32 KiB
// (readChunk) would be a noticeable share of the time; 128 KiB, and the
// normalised copy of it, still stay in a core's cache.
const sourceChunk = 128 << 10

// SpoolAt is Spool for a message already stored, complete, in the first
// size bytes of src, such as a file: it reads the message once to check
// it and hash its body, exactly as Spool does and with the same errors,
// but keeps no copy, neither in memory nor in a temporary file. The
// Message reads src again whenever it is opened or written, and
// normalises the line endings again on the way, so it writes the same
// bytes Spool would have kept.
//
// src must stay unchanged until the Message is closed. SpoolAt cannot
// see every change, but a source that ends before size bytes, now or
// when read again, gives an error matching ErrChanged rather than a
// message that does not match its signature. opts.Dir, MemoryLimit and
// Budget are not used.
func SpoolAt(ctx context.Context, src io.ReaderAt, size int64, opts SpoolOptions) (*Message, error) {
	return spoolAt(ctx, src, size, opts, sourceChunk)
}

// spoolAt is SpoolAt reading the source in blocks of chunk bytes.
func spoolAt(ctx context.Context, src io.ReaderAt, size int64, opts SpoolOptions, chunk int) (*Message, error) {
	if size < 0 {
		return nil, fmt.Errorf("signer: negative message size %d", size)
	}
	if opts.MaxHeaderBytes <= 0 {
		opts.MaxHeaderBytes = DefaultMaxHeaderBytes
	}
	hp := newHashPipe(sha256.New())
	defer hp.finish() // a no-op after the Sum of a message spooled in full
	s := newSpooler(opts, true, hp)
	buf := make([]byte, min(int64(chunk), size))
	for off := int64(0); off < size; {
		// As in Spool: a cancelled command should not read on.
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("signer: spool message: %w", err)
		}
		n, err := readSource(src, buf[:min(int64(len(buf)), size-off)], off, size)
		if n > 0 {
			if err := s.writeSource(buf[:n]); err != nil {
				return nil, err
			}
			off += int64(n)
		}
		if err != nil {
			return nil, err
		}
	}
	m, err := s.finish()
	if err != nil {
		return nil, err
	}
	m.hashOnly = false
	m.src, m.srcSize = src, size
	return m, nil
}

// writeSource takes the next block of a SpoolAt source. The body lines
// that need nothing but their LF made CRLF, most lines of most messages
// stored on Unix, go to the body hash straight from the block, converted
// into a buffer of the hash pipe (fastLines); the others, and any block
// with a CR, take the way of Spool: normalised into a buffer of their
// own, then canonicalised and copied into the pipe.
func (s *spooler) writeSource(p []byte) error {
	if s.pipe == nil || bytes.IndexByte(p, '\r') >= 0 {
		return s.ends.write(p, s.emitFn)
	}
	// A tab needs canonicalising: the fast path stops before it. Where
	// the next one is is looked up once per tab, as relaxedBody does.
	tab := bytes.IndexByte(p, '\t')
	for len(p) > 0 {
		lim := len(p)
		if tab >= 0 {
			lim = tab
		}
		n, err := s.fastLines(p[:lim])
		if err != nil {
			return err
		}
		if n == 0 {
			// A line the usual way, and the lines in the next s.slow
			// bytes: while the fast path keeps failing (indented HTML,
			// say), a call per line costs more than it saves.
			k := min(s.slow, len(p))
			if n = bytes.IndexByte(p[k:], '\n') + 1; n == 0 {
				n = len(p)
			} else {
				n += k
			}
			if err := s.ends.write(p[:n], s.emitFn); err != nil {
				return err
			}
			s.slow = min(max(2*s.slow, minSlowSpan), maxSlowSpan)
		} else {
			s.slow = 0
		}
		p = p[n:]
		if tab >= 0 {
			if tab -= n; tab < 0 {
				tab = bytes.IndexByte(p, '\t')
			}
		}
	}
	return nil
}

// The span writeSource sends the usual way after the fast path failed:
// it starts at a line and doubles, up to a source block, while the fast
// path fails again after it.
const (
	minSlowSpan = 256
	maxSlowSpan = sourceChunk
)

// fastLines hashes the plain lines at the start of p (plainLFRun), p
// being source bytes without CR or tab, if the body has begun and the
// last line ended: each line goes to the hash pipe with its LF made CRLF,
// which is then its canonical form. It returns how many bytes of p it
// took.
func (s *spooler) fastLines(p []byte) (int, error) {
	if !s.inBody || s.ends.pendingCR || !s.ends.lastLF || !s.body.atLineStart() {
		return 0, nil
	}
	n := plainLFRun(p[:min(len(p), hashPipeBufSize/2)])
	if n == 0 {
		return 0, nil
	}
	// Converted, the lines take at most twice their size: they fit
	// into the pipe's buffer as it is.
	buf := appendCRLF(s.pipe.grabAfter(s.body.flush), p[:n])
	if err := s.count(len(buf)); err != nil {
		s.pipe.put(buf[:0])
		return 0, err
	}
	s.pipe.put(buf)
	return n, nil
}

// readSource fills p from src at off, where size is the source's size,
// and says what went wrong if it cannot.
func readSource(src io.ReaderAt, p []byte, off, size int64) (int, error) {
	n, err := src.ReadAt(p, off)
	switch {
	case n == len(p):
		// ReadAt may report EOF with the last bytes; another error
		// with all of them would be odd, and they are still there.
		return n, nil
	case err == nil || errors.Is(err, io.EOF):
		return n, fmt.Errorf("%w: it ended after %d of its %d bytes", ErrChanged, off+int64(n), size)
	default:
		return n, fmt.Errorf("signer: read message: %w", err)
	}
}

// sourceReader reads a SpoolAt message from its source, normalised.
type sourceReader struct {
	src       io.ReaderAt
	size, off int64
	headerEnd bool // add the empty line that ends the header section
	ends      lineEnds
	in        []byte // one block of the source
	done      bool   // everything, the added line endings included, was passed on

	// Read's normalised bytes not yet returned, and its emit function.
	pending []byte
	pos     int
	keep    func([]byte) error
}

func newSourceReader(src io.ReaderAt, size int64, headerEnd bool) *sourceReader {
	r := &sourceReader{src: src, size: size, headerEnd: headerEnd}
	r.ends.lastLF = true
	r.keep = func(p []byte) error {
		r.pending = append(r.pending, p...)
		return nil
	}
	return r
}

// step passes the next normalised bytes on to emit: one block of the
// source, or, at its end, the line endings Spool added. It returns
// io.EOF when there is nothing left.
func (r *sourceReader) step(emit func([]byte) error) error {
	if r.off < r.size {
		if r.in == nil {
			r.in = make([]byte, min(sourceChunk, r.size))
		}
		n, err := readSource(r.src, r.in[:min(int64(len(r.in)), r.size-r.off)], r.off, r.size)
		r.off += int64(n)
		if err != nil {
			return err
		}
		return r.ends.write(r.in[:n], emit)
	}
	if r.done {
		return io.EOF
	}
	r.done = true
	if err := r.ends.end(emit); err != nil {
		return err
	}
	if r.headerEnd {
		return emit(crlf)
	}
	return nil
}

func (r *sourceReader) Read(p []byte) (int, error) {
	for r.pos == len(r.pending) {
		r.pending, r.pos = r.pending[:0], 0
		if err := r.step(r.keep); err != nil {
			return 0, err
		}
	}
	n := copy(p, r.pending[r.pos:])
	r.pos += n
	return n, nil
}

// writeBlocks is how many blocks of the source WriteTo has in hand: one
// being read and normalised while the others are written.
const writeBlocks = 3

// writeBlock is one block of the source on its way to the writer: the
// buffers it was read and normalised into, and the pieces to write,
// which lie in them (or are crlf).
type writeBlock struct {
	in, norm []byte
	out      [][]byte
}

// WriteTo writes the rest of the message to w, in blocks of the source's
// size, without a copy where the source needs no normalisation. Writing
// runs on a goroutine of its own, so that for a large message the system
// calls that write it take place beside the reading and normalising of
// the next blocks. Its errors say whether reading or writing failed.
func (r *sourceReader) WriteTo(w io.Writer) (int64, error) {
	var written int64
	if r.pos < len(r.pending) {
		n, err := w.Write(r.pending[r.pos:])
		written += int64(n)
		r.pos += n
		if err == nil && r.pos < len(r.pending) {
			err = io.ErrShortWrite
		}
		if err != nil {
			return written, fmt.Errorf("signer: write signed message: %w", err)
		}
	}

	full := make(chan *writeBlock, writeBlocks)
	free := make(chan *writeBlock, writeBlocks)
	for range writeBlocks {
		free <- &writeBlock{}
	}
	var (
		werr    error
		failed  atomic.Bool
		wdone   = make(chan struct{})
		wbytes  int64
		readErr error
	)
	go func() {
		defer close(wdone)
		for b := range full {
			for _, p := range b.out {
				if werr != nil {
					break
				}
				n, err := w.Write(p)
				wbytes += int64(n)
				if err == nil && n < len(p) {
					err = io.ErrShortWrite
				}
				if err != nil {
					werr = fmt.Errorf("signer: write signed message: %w", err)
					failed.Store(true)
				}
			}
			free <- b
		}
	}()
	for !failed.Load() {
		b := <-free
		r.in, r.ends.norm, b.out = b.in, b.norm, b.out[:0]
		err := r.step(func(p []byte) error {
			b.out = append(b.out, p)
			return nil
		})
		b.in, b.norm = r.in, r.ends.norm
		r.in, r.ends.norm = nil, nil // b's now, until it comes back
		if len(b.out) > 0 {
			full <- b
		} else {
			free <- b
		}
		if err != nil {
			if err != io.EOF {
				readErr = err
			}
			break
		}
	}
	close(full)
	<-wdone
	written += wbytes
	if werr != nil {
		return written, werr
	}
	return written, readErr
}

func (r *sourceReader) Close() error { return nil }

// hashPipe hashes what is written to it on a goroutine of its own, so
// that SHA-256, which alone takes about as long as everything else done
// to a byte, runs beside the reading, normalising and canonicalising of
// a large message on a second core. Write copies into one of a few
// buffers and hands each full one over; it blocks only when the hash
// falls behind by all of them.
type hashPipe struct {
	h    hash.Hash
	cur  []byte      // being filled
	full chan []byte // to the hashing goroutine; closed by finish
	free chan []byte // hashed, back for filling
	done chan struct{}
	sum  []byte // set by finish
}

// hashPipeBuffers and hashPipeBufSize bound what a hashPipe holds: 1 MiB,
// enough for the hash never to wait for the reader, or the reader for
// the hash, over a block or two of the source.
const (
	hashPipeBuffers = 4
	hashPipeBufSize = 256 << 10
)

func newHashPipe(h hash.Hash) *hashPipe {
	p := &hashPipe{h: h, full: make(chan []byte, hashPipeBuffers), free: make(chan []byte, hashPipeBuffers), done: make(chan struct{})}
	for range hashPipeBuffers - 1 {
		p.free <- make([]byte, 0, hashPipeBufSize)
	}
	p.cur = make([]byte, 0, hashPipeBufSize)
	go func() {
		defer close(p.done)
		for b := range p.full {
			h.Write(b) // hash.Hash.Write never fails
			p.free <- b[:0]
		}
	}()
	return p
}

// grabAfter runs flush, which may Write, hands over what was written
// and returns an empty buffer of the pipe's (capacity hashPipeBufSize),
// for the caller to fill and give back with put: what it holds is hashed
// after everything written before, and nothing may be written until then.
func (p *hashPipe) grabAfter(flush func()) []byte {
	flush()
	if len(p.cur) > 0 {
		p.full <- p.cur
		p.cur = <-p.free
	}
	b := p.cur
	p.cur = nil
	return b
}

// put hands over a buffer from grabAfter, or gives it back if it is empty.
func (p *hashPipe) put(b []byte) {
	if len(b) == 0 {
		p.cur = b
		return
	}
	p.full <- b
	p.cur = <-p.free
}

func (p *hashPipe) Write(b []byte) (int, error) {
	n := len(b)
	for len(b) > 0 {
		k := copy(p.cur[len(p.cur):cap(p.cur)], b)
		p.cur = p.cur[:len(p.cur)+k]
		b = b[k:]
		if len(p.cur) == cap(p.cur) {
			p.full <- p.cur
			p.cur = <-p.free
		}
	}
	return n, nil
}

// Sum waits for everything written to be hashed and returns the hash
// appended to b. Nothing may be written after it.
func (p *hashPipe) Sum(b []byte) []byte {
	p.finish()
	return append(b, p.sum...)
}

// finish hashes what is left and ends the goroutine. It is idempotent:
// a failed SpoolAt calls it to end the goroutine.
func (p *hashPipe) finish() {
	if p.sum != nil {
		return
	}
	if len(p.cur) > 0 {
		p.full <- p.cur
	}
	p.cur = nil
	close(p.full)
	<-p.done
	p.sum = p.h.Sum(nil)
}
