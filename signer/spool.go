package signer

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
)

// Defaults for SpoolOptions.
const (
	// DefaultMemoryLimit keeps typical campaign mail (tens of kilobytes)
	// and most messages with attachments off the disk, while a gateway
	// with a few hundred transactions in flight stays within a few
	// hundred megabytes.
	DefaultMemoryLimit = 1 << 20

	// DefaultMaxHeaderBytes bounds the header section. Real header
	// sections are a few kilobytes; a megabyte is far beyond any
	// legitimate one and still cheap to hold in memory.
	DefaultMaxHeaderBytes = 1 << 20

	// MaxHeaderFields bounds the number of fields in a header section.
	// MaxHeaderBytes alone would let a header of a million bytes carry
	// hundreds of thousands of tiny fields, each costing a record here
	// and a scan in every verifier; real messages have tens, long
	// relay traces a few hundred.
	MaxHeaderFields = 1000

	// maxLineOctets is RFC 5322 §2.1.1's limit on a line, without CRLF.
	maxLineOctets = 998

	// readChunk is the size of each read from the input.
	readChunk = 32 << 10

	// memChunk is the size of the pieces a message in memory is kept in.
	memChunk = 64 << 10

	// firstPiece is the size of a message's first piece in memory; each
	// next one is twice the last, up to memChunk.
	firstPiece = 8 << 10

	// fileBuffer is the size of a spool file's write buffer: several of
	// the reads a network connection gives per write to the file.
	fileBuffer = 64 << 10
)

// ErrTooLarge is returned (wrapped) by Spool when the normalised message
// exceeds SpoolOptions.MaxMessageBytes. SMTP answers it with 552 5.3.4.
var ErrTooLarge = errors.New("signer: message too large")

// RefusedError reports a message that must not be signed: it is
// malformed in a way that makes a signature meaningless or unverifiable.
// Retrying cannot help; SMTP answers it with 550 5.6.0.
type RefusedError struct {
	// Reason says what is wrong, for a person: it goes into the SMTP
	// reply and onto stderr. It names lines and field names, and may
	// quote the From domain, but never the message's other content.
	Reason string
}

func (e *RefusedError) Error() string { return "signer: message refused: " + e.Reason }

func refusef(format string, args ...any) error {
	return &RefusedError{Reason: fmt.Sprintf(format, args...)}
}

// SpoolOptions configures Spool. The zero value is ready to use.
type SpoolOptions struct {
	// Dir is where a message over MemoryLimit is spooled. Empty means
	// os.TempDir().
	Dir string
	// MemoryLimit is the largest normalised message kept in memory;
	// larger ones go to a temporary file. Zero or less means
	// DefaultMemoryLimit.
	MemoryLimit int64
	// MaxHeaderBytes bounds the header section (with its line endings).
	// Zero or less means DefaultMaxHeaderBytes.
	MaxHeaderBytes int
	// MaxMessageBytes bounds the normalised message. Zero or less means no
	// limit.
	MaxMessageBytes int64
	// Budget, if not nil, bounds the memory all messages spooled with it
	// hold together: a message whose next piece would take the budget
	// past its limit goes to its temporary file at once (and gives back
	// what it held in memory).
	Budget *MemoryBudget
	// SizeHint is the size the sender declared for the message (SMTP
	// SIZE=, RFC 1870); zero or less means none. A message declared
	// larger than MemoryLimit goes to its temporary file from its first
	// byte: it would end up there anyway, and holding its first
	// MemoryLimit bytes in memory until then is what made many large
	// messages received at once cost MemoryLimit each. A wrong hint
	// costs only that choice: a message declared smaller than it is
	// still moves to its file at MemoryLimit, one declared larger is
	// spooled on disk.
	SizeHint int64
}

// MemoryBudget is a bound on the spool memory many messages hold at
// once (the spool.memory_total setting): without one, 1,000 connections
// could each hold spool.memory_limit. It counts the capacity of the
// pieces a message is kept in, which is what they cost. Safe for
// concurrent use.
type MemoryBudget struct {
	limit atomic.Int64
	used  atomic.Int64
}

// NewMemoryBudget returns a budget of limit bytes; zero or less means no
// bound (the bytes are still counted).
func NewMemoryBudget(limit int64) *MemoryBudget {
	b := &MemoryBudget{}
	b.limit.Store(limit)
	return b
}

// SetLimit changes the bound; memory held beyond a lowered one is given
// back as its messages end.
func (b *MemoryBudget) SetLimit(limit int64) { b.limit.Store(limit) }

// Used returns the bytes of spool memory held now, messages still being
// received included.
func (b *MemoryBudget) Used() int64 { return b.used.Load() }

// take reserves n bytes, or reports false if that would pass the limit.
func (b *MemoryBudget) take(n int64) bool {
	if b == nil {
		return true
	}
	if b.used.Add(n) > b.limit.Load() && b.limit.Load() > 0 {
		b.used.Add(-n)
		return false
	}
	return true
}

// give returns n bytes taken before.
func (b *MemoryBudget) give(n int64) {
	if b != nil && n != 0 {
		b.used.Add(-n)
	}
}

// Message is a spooled, normalised message ready to be signed. Its bytes
// are the input's with every line ending CRLF; Sign and WriteSigned read
// them. Close it when done. A Message is safe for concurrent use.
type Message struct {
	fields     []headerField
	fromDomain string
	bodyHash   []byte // SHA-256 of the relaxed-canonical body (RFC 6376 §3.4.4)
	size       int64
	hashOnly   bool // made by a Stream: the message itself was not kept

	mu     sync.Mutex
	closed bool
	budget *MemoryBudget
	held   int64    // bytes of budget the pieces in mem hold
	mem    [][]byte // the whole message in memChunk pieces, when it fits in memory
	file   *os.File // the whole message, when it does not
	path   string   // the file's name, if it could not be unlinked at once

	// A message from SpoolAt is read from its source again: its first
	// srcSize bytes, normalised, plus the empty line that ends the header
	// section if headerEnd.
	src       io.ReaderAt
	srcSize   int64
	headerEnd bool
}

// headerField is one field of the header section as it was received
// (normalised to CRLF), continuation lines included.
type headerField struct {
	name string // as written, e.g. "Subject"; matched case-insensitively
	raw  string // "Subject: hello\r\n world\r\n"
}

// FromDomain returns the domain of the From field's address: lower-case,
// without a trailing dot, in IDNA A-label form.
func (m *Message) FromDomain() string { return m.fromDomain }

// Size returns the size of the normalised message in bytes (without any
// DKIM-Signature fields Sign makes).
func (m *Message) Size() int64 { return m.size }

// OnDisk reports whether the message is spooled in a file rather than
// held in memory (it was larger than SpoolOptions.MemoryLimit).
func (m *Message) OnDisk() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.file != nil
}

// Open returns a new reader over the normalised message. It may be called
// any number of times, also concurrently; each reader is independent.
func (m *Message) Open() (io.ReadCloser, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case m.closed:
		return nil, errors.New("signer: message already closed")
	case m.hashOnly:
		return nil, errors.New("signer: message was streamed, not kept: only Sign can use it")
	case m.src != nil:
		return newSourceReader(m.src, m.srcSize, m.headerEnd), nil
	case m.file != nil:
		// ReadAt does not move the file offset, so readers do not
		// interfere with one another.
		return io.NopCloser(fileReader{io.NewSectionReader(m.file, 0, m.size)}), nil
	default:
		return &memReader{chunks: slices.Clone(m.mem)}, nil
	}
}

// memReader reads the pieces of a message in memory. Its WriteTo writes
// them as they are: io.Copy through io.MultiReader would allocate a
// 32 KiB buffer per message and copy every byte once more.
type memReader struct{ chunks [][]byte }

func (r *memReader) Read(p []byte) (int, error) {
	for len(r.chunks) > 0 && len(r.chunks[0]) == 0 {
		r.chunks = r.chunks[1:]
	}
	if len(r.chunks) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.chunks[0])
	r.chunks[0] = r.chunks[0][n:]
	return n, nil
}

func (r *memReader) WriteTo(w io.Writer) (int64, error) {
	var n int64
	for len(r.chunks) > 0 {
		k, err := w.Write(r.chunks[0])
		n += int64(k)
		r.chunks[0] = r.chunks[0][k:]
		if err != nil {
			return n, err
		}
		r.chunks = r.chunks[1:]
	}
	return n, nil
}

func (r *memReader) Close() error { return nil }

// fileReader reads a message from its spool file. Its WriteTo copies
// through a pooled buffer: io.Copy would allocate 32 KiB for every
// message relayed from disk, garbage that many large messages relayed at
// once pile up until the next collection.
type fileReader struct{ r *io.SectionReader }

func (f fileReader) Read(p []byte) (int, error) { return f.r.Read(p) }

func (f fileReader) WriteTo(w io.Writer) (int64, error) {
	bp := readBuffers.Get().(*[]byte)
	defer readBuffers.Put(bp)
	return io.CopyBuffer(w, f.r, *bp)
}

// Close releases the message's memory and its temporary file. It is
// idempotent. Readers from Open fail after Close.
func (m *Message) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	m.closed = true
	m.mem = nil
	m.src = nil
	m.budget.give(m.held)
	m.held = 0
	var errs []error
	if m.file != nil {
		if err := m.file.Close(); err != nil {
			errs = append(errs, fmt.Errorf("signer: close spool file: %w", err))
		}
		m.file = nil
	}
	if m.path != "" {
		if err := os.Remove(m.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("signer: remove spool file: %w", err))
		}
		m.path = ""
	}
	return errors.Join(errs...)
}

// Spool reads a whole message from r, as a stream, and returns it
// normalised and checked, ready for Sign.
//
// Normalisation: a bare LF or a lone CR becomes CRLF, as SMTP requires; a
// last line without a line ending gets a CRLF, and a message that ends
// inside its header section gets the empty line that ends it, so that
// every verifier sees the same message. Nothing else changes.
//
// The message stays in memory up to opts.MemoryLimit and goes to a
// temporary file (mode 0600) in opts.Dir beyond that. The file is unlinked
// as soon as it is created where the system allows it, so that nothing is
// left behind even by a crash; otherwise Close removes it. An error
// removes it too.
//
// Spool returns a *RefusedError if the message must not be signed: no
// From field or more than one, a From without a parseable domain, NUL or
// other control characters in the header section, a header section over
// opts.MaxHeaderBytes or with more than MaxHeaderFields fields, a header
// line over 998 octets, or a header line that is not a field. It stops reading at the first such problem. A
// message over opts.MaxMessageBytes gives an error matching ErrTooLarge,
// also as soon as the limit is passed. Any other error (reading r, the
// temporary file, ctx) is not the message's fault: retrying may succeed.
func Spool(ctx context.Context, r io.Reader, opts SpoolOptions) (*Message, error) {
	if opts.Dir == "" {
		opts.Dir = os.TempDir()
	}
	if opts.MemoryLimit <= 0 {
		opts.MemoryLimit = DefaultMemoryLimit
	}
	if opts.MaxHeaderBytes <= 0 {
		opts.MaxHeaderBytes = DefaultMaxHeaderBytes
	}
	s := newSpooler(opts, false, sha256.New())
	s.toDisk = opts.SizeHint > opts.MemoryLimit
	m, err := s.run(ctx, r)
	if err != nil {
		s.discard()
		return nil, err
	}
	return m, nil
}

// spooler carries the state of one Spool call: the line-ending
// normaliser, the header parser, the body hasher and the store.
type spooler struct {
	opts SpoolOptions

	ends   lineEnds
	emitFn func([]byte) error // s.emit, made once
	size   int64              // normalised bytes so far

	// Header section state.
	inBody      bool
	headerEnd   bool // finish added the empty line that ends the header section
	headerBytes int
	lineNo      int
	line        []byte // the current header line, without its CRLF
	fields      []headerField
	field       []byte // the current field's raw text, until the next field starts

	body *relaxedBody
	// pipe is body's hash when it is a hashPipe (SpoolAt): plain lines
	// of the source then go to it without passing through body.
	pipe *hashPipe
	slow int // writeSource's span for the usual way

	// hashOnly keeps the header section and the body hash, not the
	// message (a Stream).
	hashOnly bool
	// toDisk sends the message to its file from the first byte
	// (SpoolOptions.SizeHint).
	toDisk bool

	// Store.
	mem     [][]byte
	memSize int64
	held    int64 // bytes of opts.Budget the pieces in mem hold
	file    *os.File
	path    string
	w       *bufio.Writer
}

// newSpooler returns a spooler for a message that hashes its body with
// h; hashOnly keeps only the header section and the body hash.
func newSpooler(opts SpoolOptions, hashOnly bool, h bodyHash) *spooler {
	s := &spooler{opts: opts, body: newRelaxedBody(h), hashOnly: hashOnly}
	s.pipe, _ = h.(*hashPipe)
	s.ends.lastLF = true
	s.emitFn = s.emit
	return s
}

var crlf = []byte("\r\n")

// readBuffers recycles Spool's read buffers: a gateway spools many small
// messages, and a fresh 32 KiB buffer for each is most of the garbage.
var readBuffers = sync.Pool{New: func() any { b := make([]byte, readChunk); return &b }}

// fileWriters recycles the spool files' write buffers. A buffer is needed
// only while its message is received; given back as soon as the message
// is in its file, the next message takes it instead of a new one.
var fileWriters = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, fileBuffer) }}

// memPieces recycles the pieces of messages that moved to their files,
// one pool per piece size (8, 16, 32 and 64 KiB): with many large
// messages at once, each one's memory_limit of pieces otherwise became
// garbage at the moment it moved, and the heap grew by as much before the
// next collection.
var memPieces [4]sync.Pool

// newPiece returns an empty piece of size bytes.
func newPiece(size int) []byte {
	if i := pieceClass(size); i >= 0 {
		if p, ok := memPieces[i].Get().(*[]byte); ok {
			return (*p)[:0]
		}
	}
	return make([]byte, 0, size)
}

// pieceClass is the memPieces index of a piece of size bytes, or -1.
func pieceClass(size int) int {
	for i := range memPieces {
		if size == firstPiece<<i {
			return i
		}
	}
	return -1
}

// releaseWriter gives the file writer back; it must be flushed (or the
// message abandoned).
func (s *spooler) releaseWriter() {
	if s.w != nil {
		s.w.Reset(nil)
		fileWriters.Put(s.w)
		s.w = nil
	}
}

// releasePieces gives the pieces in memory back, for a message that
// moved to its file or was abandoned: nothing else refers to them.
func (s *spooler) releasePieces() {
	for _, c := range s.mem {
		if i := pieceClass(cap(c)); i >= 0 {
			memPieces[i].Put(&c)
		}
	}
	s.mem = nil
	s.opts.Budget.give(s.held)
	s.held = 0
}

func (s *spooler) run(ctx context.Context, r io.Reader) (*Message, error) {
	bp := readBuffers.Get().(*[]byte)
	defer readBuffers.Put(bp)
	buf := *bp
	for {
		// A blocked Read cannot be interrupted, but a cancelled
		// transaction should not keep spooling a long message.
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("signer: spool message: %w", err)
		}
		n, rerr := r.Read(buf)
		if n > 0 {
			if err := s.ends.write(buf[:n], s.emitFn); err != nil {
				return nil, err
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return nil, fmt.Errorf("signer: read message: %w", rerr)
		}
	}
	return s.finish()
}

// lineEnds normalises line endings to CRLF, piece by piece: a bare LF
// or a lone CR becomes CRLF, nothing else changes. A message read from
// its source again (SpoolAt) goes through a lineEnds of its own, so it
// comes out exactly as it was normalised when spooled.
type lineEnds struct {
	pendingCR bool   // the last input byte was a CR whose fate the next byte decides
	lastLF    bool   // the last byte passed on was LF, or none was yet (set it true to start)
	norm      []byte // write's buffer for input it must normalise
}

// write normalises p's line endings and passes the result on to emit:
// input that already uses CRLF passes through in one piece, other input
// is normalised into one buffer and passed on in one piece too, so that
// the body hash sees whole lines.
func (l *lineEnds) write(p []byte, emit func([]byte) error) error {
	if l.pendingCR {
		// CRLF, or a lone CR: either way one CRLF.
		l.pendingCR = false
		if len(p) > 0 && p[0] == '\n' {
			p = p[1:]
		}
		l.lastLF = true
		if err := emit(crlf); err != nil {
			return err
		}
	}
	i := cleanPrefix(p)
	if i == len(p) {
		if i == 0 {
			return nil
		}
		l.lastLF = p[len(p)-1] == '\n'
		return emit(p)
	}
	out := append(l.norm[:0], p[:i]...)
	if bytes.IndexByte(p[i:], '\r') < 0 {
		// No CR at all, as in a file written on Unix: one search per
		// line, for its LF, which becomes CRLF.
		out = appendCRLF(out, p[i:])
		l.norm = out
		if len(out) == 0 {
			return nil
		}
		l.lastLF = out[len(out)-1] == '\n'
		return emit(out)
	}
	for rest := p[i:]; len(rest) > 0; {
		j := bytes.IndexByte(rest, '\n')
		var seg []byte
		if j >= 0 {
			seg, rest = rest[:j], rest[j+1:]
		} else {
			seg, rest = rest, nil
		}
		endCR := len(seg) > 0 && seg[len(seg)-1] == '\r'
		if endCR {
			seg = seg[:len(seg)-1] // the CR of a CRLF, or one the next write decides
		}
		for { // the CRs left are lone ones
			k := bytes.IndexByte(seg, '\r')
			if k < 0 {
				break
			}
			out = append(append(out, seg[:k]...), '\r', '\n')
			seg = seg[k+1:]
		}
		out = append(out, seg...)
		if j >= 0 {
			out = append(out, '\r', '\n')
		} else if endCR {
			l.pendingCR = true
		}
	}
	l.norm = out
	if len(out) == 0 {
		return nil
	}
	l.lastLF = out[len(out)-1] == '\n'
	return emit(out)
}

// appendCRLF appends p, which holds no CR, to dst with each LF made CRLF.
// A search and a copy per line, both vectorised, beat a loop over words
// that copies and tests them (measured: twice as fast on 76-byte lines).
func appendCRLF(dst, p []byte) []byte {
	for {
		j := bytes.IndexByte(p, '\n')
		if j < 0 {
			return append(dst, p...)
		}
		dst = append(append(dst, p[:j]...), '\r', '\n')
		p = p[j+1:]
	}
}

// end completes normalisation at the end of the input: a CR left
// pending, or a last line without a line ending, gets its CRLF.
func (l *lineEnds) end(emit func([]byte) error) error {
	if l.pendingCR || !l.lastLF {
		l.pendingCR, l.lastLF = false, true
		return emit(crlf)
	}
	return nil
}

// cleanPrefix returns how many bytes at the start of p need no
// normalisation: lines that end in CRLF and hold no other CR, and a last
// line without a line ending or CR.
func cleanPrefix(p []byte) int {
	i := 0
	for {
		j := bytes.IndexByte(p[i:], '\n')
		if j < 0 {
			if bytes.IndexByte(p[i:], '\r') < 0 {
				return len(p)
			}
			return i
		}
		if j == 0 || p[i+j-1] != '\r' || bytes.IndexByte(p[i:i+j-1], '\r') >= 0 {
			return i
		}
		i += j + 1
	}
}

// emit takes normalised bytes: every CR in p is followed by LF in p.
func (s *spooler) emit(p []byte) error {
	if err := s.count(len(p)); err != nil {
		return err
	}
	if err := s.store(p); err != nil {
		return err
	}
	if !s.inBody {
		var err error
		if p, err = s.header(p); err != nil {
			return err
		}
	}
	if len(p) > 0 {
		s.body.Write(p)
	}
	return nil
}

// count adds n normalised bytes to the message's size.
func (s *spooler) count(n int) error {
	s.size += int64(n)
	if s.opts.MaxMessageBytes > 0 && s.size > s.opts.MaxMessageBytes {
		// ErrTooLarge carries the package prefix.
		return fmt.Errorf("%w: more than %d bytes", ErrTooLarge, s.opts.MaxMessageBytes)
	}
	return nil
}

// header parses p as part of the header section and returns what follows
// the section's end, if p contains it.
func (s *spooler) header(p []byte) ([]byte, error) {
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		chunk := p
		if i >= 0 {
			chunk = p[:i+1]
		}
		s.headerBytes += len(chunk)
		if s.headerBytes > s.opts.MaxHeaderBytes {
			return nil, refusef("header section exceeds %d bytes", s.opts.MaxHeaderBytes)
		}
		if i < 0 {
			if len(s.line)+len(p) > maxLineOctets {
				return nil, refusef("line %d of the header section exceeds %d octets", s.lineNo+1, maxLineOctets)
			}
			s.line = append(s.line, p...)
			return nil, nil
		}
		// chunk ends in CRLF; the CR is the byte before the LF.
		content := chunk[:len(chunk)-2]
		if len(s.line)+len(content) > maxLineOctets {
			return nil, refusef("line %d of the header section exceeds %d octets", s.lineNo+1, maxLineOctets)
		}
		s.line = append(s.line, content...)
		p = p[i+1:]
		if err := s.headerLine(); err != nil {
			return nil, err
		}
		if s.inBody {
			return p, nil
		}
	}
	return nil, nil
}

// headerLine handles the complete header line in s.line.
func (s *spooler) headerLine() error {
	s.lineNo++
	line := s.line
	s.line = s.line[:0]
	if len(line) == 0 {
		s.endField()
		s.inBody = true
		return nil
	}
	for _, c := range line {
		// Bytes of 0x80 and above are UTF-8 (RFC 6532) or legacy 8-bit
		// text: both are signed as they are. Controls have no business
		// in a header and make verifiers disagree.
		if c == 0 {
			return refusef("line %d of the header section contains a NUL byte", s.lineNo)
		}
		if (c < 0x20 && c != '\t') || c == 0x7f {
			return refusef("line %d of the header section contains control character 0x%02x", s.lineNo, c)
		}
	}
	if line[0] == ' ' || line[0] == '\t' {
		if len(s.field) == 0 {
			return refusef("the header section starts with a continuation line")
		}
		s.field = append(append(s.field, line...), '\r', '\n')
		return nil
	}
	colon := bytes.IndexByte(line, ':')
	if colon < 0 {
		return refusef("line %d of the header section is not a header field (no colon)", s.lineNo)
	}
	name := line[:colon]
	if len(name) == 0 {
		return refusef("line %d of the header section has an empty field name", s.lineNo)
	}
	if n := bytes.TrimRight(name, " \t"); len(n) != len(name) {
		// Obsolete syntax (RFC 5322 §4.5) that dkimpy, for one, rejects
		// outright: a signature over it would fail at some receivers.
		return refusef("header field %q has whitespace before its colon", n)
	}
	for _, c := range name {
		if c < 33 || c > 126 { // RFC 5322 §2.2 ftext
			return refusef("line %d of the header section is not a header field (invalid character in its name)", s.lineNo)
		}
	}
	s.endField()
	if len(s.fields) >= MaxHeaderFields {
		return refusef("the header section has more than %d fields", MaxHeaderFields)
	}
	s.field = append(append(s.field, line...), '\r', '\n')
	return nil
}

// endField appends the field being read, if any, to s.fields. Fields
// are collected in a buffer rather than by string concatenation, which
// would make a field of many continuation lines cost quadratic time.
func (s *spooler) endField() {
	if len(s.field) == 0 {
		return
	}
	raw := string(s.field)
	name, _, _ := strings.Cut(raw, ":")
	s.fields = append(s.fields, headerField{name: name, raw: raw})
	s.field = s.field[:0]
}

// store keeps p in memory or, past the memory limit or the budget, in
// the spool file.
func (s *spooler) store(p []byte) error {
	if s.hashOnly {
		return nil
	}
	if s.w == nil {
		if !s.toDisk && s.memSize+int64(len(p)) <= s.opts.MemoryLimit && s.memStore(p) {
			return nil
		}
		if err := s.createFile(); err != nil {
			return err
		}
		for _, c := range s.mem {
			if _, err := s.w.Write(c); err != nil {
				return fmt.Errorf("signer: write spool file: %w", err)
			}
		}
		s.releasePieces() // the writer copied them or wrote them out
	}
	if _, err := s.w.Write(p); err != nil {
		return fmt.Errorf("signer: write spool file: %w", err)
	}
	return nil
}

// memStore appends p to the pieces in memory, or reports false, having
// stored nothing, when the budget cannot take the pieces it needs.
func (s *spooler) memStore(p []byte) bool {
	// Fixed-size pieces: growing one slice would copy the message again
	// and again and overshoot the limit. Small first, as most messages
	// are.
	free := 0
	if n := len(s.mem); n > 0 {
		free = cap(s.mem[n-1]) - len(s.mem[n-1])
	}
	var sizes [8]int // the new pieces p needs: a few 64 KiB ones at most per read
	need, k, last := int64(0), 0, 0
	if n := len(s.mem); n > 0 {
		last = cap(s.mem[n-1])
	}
	for rest := len(p) - free; rest > 0; k++ {
		size := firstPiece
		if last > 0 {
			size = min(memChunk, 2*last)
		}
		if k == len(sizes) {
			return false // cannot happen with reads of readChunk; be safe
		}
		sizes[k], last = size, size
		need += int64(size)
		rest -= size
	}
	if !s.opts.Budget.take(need) {
		return false
	}
	s.held += need
	s.memSize += int64(len(p))
	next := 0
	for len(p) > 0 {
		if n := len(s.mem); n == 0 || len(s.mem[n-1]) == cap(s.mem[n-1]) {
			s.mem = append(s.mem, newPiece(sizes[next]))
			next++
		}
		last := &s.mem[len(s.mem)-1]
		c := min(len(p), cap(*last)-len(*last))
		*last = append(*last, p[:c]...)
		p = p[c:]
	}
	return true
}

// spoolPrefix starts the name of every spool file: os.CreateTemp puts a
// decimal number after it.
const spoolPrefix = "dkimgw-spool-"

func (s *spooler) createFile() error {
	f, err := os.CreateTemp(s.opts.Dir, spoolPrefix+"*") // mode 0600
	if err != nil {
		return fmt.Errorf("signer: create spool file: %w", err)
	}
	s.file = f
	// An unlinked file cannot be left behind. Where unlinking an open
	// file is not allowed (Windows), Close removes it by name.
	if err := os.Remove(f.Name()); err != nil {
		s.path = f.Name()
	}
	s.w = fileWriters.Get().(*bufio.Writer)
	s.w.Reset(f)
	return nil
}

// CleanSpoolDir removes the spool files a crash left in dir (empty: the
// default, os.TempDir()) and returns their names. Spool unlinks its file
// right after creating it, so a leftover is rare (a crash in between, or
// a system that cannot unlink open files), but it holds a message and is
// removed at start. Only regular files named as Spool names them are
// touched: not directories, not symbolic links, nothing else in dir.
func CleanSpoolDir(dir string) ([]string, error) {
	if dir == "" {
		dir = os.TempDir()
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("signer: read spool dir: %w", err)
	}
	var removed []string
	var errs []error
	for _, e := range ents {
		if !e.Type().IsRegular() || !isSpoolName(e.Name()) {
			continue
		}
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("signer: remove spool leftover: %w", err))
			continue
		}
		removed = append(removed, e.Name())
	}
	return removed, errors.Join(errs...)
}

// isSpoolName reports whether name is one os.CreateTemp makes from the
// spool's pattern: the prefix and a decimal number.
func isSpoolName(name string) bool {
	n, ok := strings.CutPrefix(name, spoolPrefix)
	if !ok || n == "" {
		return false
	}
	for _, c := range n {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// discard releases the store after a failed Spool.
func (s *spooler) discard() {
	s.releasePieces()
	s.releaseWriter() // what it holds is abandoned with the message
	if s.file != nil {
		_ = s.file.Close() // the message is abandoned; its bytes do not matter
	}
	if s.path != "" {
		_ = os.Remove(s.path) // best effort: the Spool error is what the caller needs
	}
}

// finish completes normalisation at EOF and checks the header section.
func (s *spooler) finish() (*Message, error) {
	if err := s.ends.end(s.emitFn); err != nil {
		return nil, err
	}
	if !s.inBody && s.size > 0 {
		s.headerEnd = true
		if err := s.emit(crlf); err != nil {
			return nil, err
		}
	}
	domain, err := fromDomain(s.fields)
	if err != nil {
		return nil, err
	}
	if s.w != nil {
		if err := s.w.Flush(); err != nil {
			return nil, fmt.Errorf("signer: write spool file: %w", err)
		}
		s.releaseWriter()
	}
	return &Message{
		fields:     s.fields,
		fromDomain: domain,
		bodyHash:   s.body.Sum(),
		size:       s.size,
		budget:     s.opts.Budget,
		held:       s.held,
		hashOnly:   s.hashOnly,
		headerEnd:  s.headerEnd,
		mem:        s.mem,
		file:       s.file,
		path:       s.path,
	}, nil
}

// relaxedBody hashes a CRLF-normalised body in the "relaxed" body
// canonicalization (RFC 6376 §3.4.4): whitespace at the end of a line is
// dropped, runs of whitespace become one SP, and empty lines at the end
// are dropped. Unlike go-msgauth's, it counts pending empty lines instead
// of buffering them, so its memory does not grow with the input.
type relaxedBody struct {
	h          bodyHash
	out        []byte // canonical bytes waiting to be hashed
	blankLines int    // empty lines seen but not yet known not to be trailing
	wsp        bool   // whitespace seen that needs an SP if the line goes on
	content    bool   // the current line has content
}

// bodyHash is what relaxedBody hashes the canonical body with: a
// hash.Hash, or a hashPipe, which runs one beside the canonicalisation.
type bodyHash interface {
	Write(p []byte) (int, error) // never fails
	Sum(b []byte) []byte
}

func newRelaxedBody(h bodyHash) *relaxedBody {
	return &relaxedBody{h: h, out: make([]byte, 0, 4<<10)}
}

// Write takes normalised bytes (CR occurs only before LF) and never fails.
func (b *relaxedBody) Write(p []byte) {
	// Plain lines end at a tab. Where the next one is is looked up once
	// per tab, not once per line: text rarely has any.
	tab := bytes.IndexByte(p, '\t')
	for len(p) > 0 {
		if !b.content && !b.wsp {
			// At the start of a line: the lines canonicalisation leaves
			// as they are go to the hash straight from p.
			lim := len(p)
			if tab >= 0 {
				lim = tab
			}
			if n := b.plainLines(p[:lim]); n > 0 {
				p = p[n:]
				if tab >= 0 {
					tab -= n
				}
				continue
			}
		}
		// Up to the end of this line, byte by byte.
		n := bytes.IndexByte(p, '\n') + 1
		if n == 0 {
			n = len(p)
		}
		b.write(p[:n])
		p = p[n:]
		if tab >= 0 {
			if tab -= n; tab < 0 {
				tab = bytes.IndexByte(p, '\t')
			}
		}
	}
}

// atLineStart reports whether the canonicaliser is between lines with
// nothing of the next one seen yet.
func (b *relaxedBody) atLineStart() bool { return !b.content && !b.wsp }

// flush hashes the empty lines pending before a line with content, and
// what waits in b.out, so that what is hashed next comes after them.
func (b *relaxedBody) flush() {
	for ; b.blankLines > 0; b.blankLines-- {
		b.out = append(b.out, '\r', '\n')
		b.flushIfFull()
	}
	if len(b.out) > 0 {
		b.h.Write(b.out) // hash.Hash.Write never fails
		b.out = b.out[:0]
	}
}

// plainLines hashes the whole lines at the start of p that relaxed
// canonicalisation leaves unchanged (not empty, no run of spaces, no
// space at the end; the caller cuts p before any tab), after the empty
// lines pending before them, and returns their length.
func (b *relaxedBody) plainLines(p []byte) int {
	n := plainRun(p)
	if n == 0 {
		return 0
	}
	b.flush()
	b.h.Write(p[:n])
	return n
}

// plainRun returns the length of the whole lines at the start of p,
// which holds no tab and starts a line, that have content, no two spaces
// in a row and no space at the end: the lines relaxed canonicalisation
// leaves as they are. p is normalised: a CR is always followed by LF.
//
// It looks at 8 bytes at a time over the whole run rather than line by
// line, since most lines of most messages are plain: it finds the first
// byte that makes a line not plain and cuts before that line.
func plainRun(p []byte) int {
	if len(p) == 0 || p[0] == '\r' || p[0] == '\n' {
		return 0 // an empty line first
	}
	const (
		ones   = 0x0101010101010101
		highs  = 0x8080808080808080
		spaces = ' ' * ones
		crs    = '\r' * ones
	)
	// For each word, sp and cr have the high bit of each byte that is a
	// space, or a CR, by the usual (x-1) &^ x test on w xor the byte. It
	// also marks a 0x01 byte right above a marked one, which here can
	// only be a '!' after a space (after a CR always comes LF): such a
	// line is taken for not plain, and only costs the slower path. bad
	// then marks a space followed by a space or by the CR that ends its
	// line, and a CR two bytes after another (the CR of an empty line),
	// also across words (prevSp, prevCR).
	var sp, cr, bad uint64
	q := p
	// Two words at a time when none is bad: they are independent, so
	// the processor works on both at once.
	for len(q) >= 16 {
		w0, w1 := binary.LittleEndian.Uint64(q), binary.LittleEndian.Uint64(q[8:])
		s0, c0, s1, c1 := w0^spaces, w0^crs, w1^spaces, w1^crs
		sp0, cr0 := (s0-ones)&^s0&highs, (c0-ones)&^c0&highs
		sp1, cr1 := (s1-ones)&^s1&highs, (c1-ones)&^c1&highs
		b0 := sp0&((sp0|cr0)>>8) | sp>>56&(sp0|cr0) | cr0&(cr0<<16|cr>>48)
		b1 := sp1&((sp1|cr1)>>8) | sp0>>56&(sp1|cr1) | cr1&(cr1<<16|cr0>>48)
		if b0|b1 != 0 {
			break // the word loop below finds which
		}
		sp, cr = sp1, cr1
		q = q[16:]
	}
	for len(q) >= 8 {
		w := binary.LittleEndian.Uint64(q)
		prevSp, prevCR := sp, cr
		s, c := w^spaces, w^crs
		sp = (s - ones) &^ s & highs
		cr = (c - ones) &^ c & highs
		bad = sp&((sp|cr)>>8) | prevSp>>56&(sp|cr) | cr&(cr<<16|prevCR>>48)
		if bad != 0 {
			break
		}
		q = q[8:]
	}
	if bad == 0 && len(q) > 0 {
		var tail [8]byte // zero bytes are neither space nor CR
		copy(tail[:], q)
		w := binary.LittleEndian.Uint64(tail[:])
		prevSp, prevCR := sp, cr
		s, c := w^spaces, w^crs
		sp = (s - ones) &^ s & highs
		cr = (c - ones) &^ c & highs
		bad = sp&((sp|cr)>>8) | prevSp>>56&(sp|cr) | cr&(cr<<16|prevCR>>48)
	}
	end := len(p)
	if bad != 0 {
		end = len(p) - len(q) + bits.TrailingZeros64(bad)/8
	}
	// The lines before the one that holds the first mark.
	return bytes.LastIndexByte(p[:end], '\n') + 1
}

// plainLFRun is plainRun for text not normalised yet whose lines end in
// LF alone: it returns the length of the whole lines at the start of p,
// which holds no CR and no tab and starts a line, that have content, no
// two spaces in a row and no space at the end. Once their LFs are made
// CRLF, relaxed canonicalisation leaves them as they are.
//
// With no CR to tell apart, one test finds what ends them: a byte up to
// 0x20 (a space, an LF, a control) right after another. It also stops
// at a line that starts with a space or has a control character next to
// a space or an LF, plain or not, and, by the test's borrow, at a '!'
// right after such a byte (as plainRun): the slower path takes those
// lines.
func plainLFRun(p []byte) int {
	const (
		ones  = 0x0101010101010101
		highs = 0x8080808080808080
		lows  = 0x21 * ones // one more than a space, in each byte
	)
	// low has the high bit of each byte below 0x21 (and of some '!'
	// right above one). The byte before p ended a line: it counts as low.
	prev := uint64(highs)
	var bad uint64
	q := p
	// Two words at a time while neither is bad: they are independent,
	// so the processor works on both at once.
	for len(q) >= 16 {
		w0, w1 := binary.LittleEndian.Uint64(q), binary.LittleEndian.Uint64(q[8:])
		l0 := (w0 - lows) &^ w0 & highs
		l1 := (w1 - lows) &^ w1 & highs
		if l0&(l0<<8)|prev>>56&l0|l1&(l1<<8)|l0>>56&l1 != 0 {
			break // the word loop below finds where
		}
		prev = l1
		q = q[16:]
	}
	for len(q) > 0 {
		var w uint64
		if len(q) >= 8 {
			w = binary.LittleEndian.Uint64(q)
		} else {
			tail := [8]byte{'x', 'x', 'x', 'x', 'x', 'x', 'x', 'x'} // not low
			copy(tail[:], q)
			w = binary.LittleEndian.Uint64(tail[:])
		}
		low := (w - lows) &^ w & highs
		if bad = low&(low<<8) | prev>>56&low; bad != 0 {
			break
		}
		prev = low
		q = q[min(8, len(q)):]
	}
	end := len(p)
	if bad != 0 {
		end = len(p) - len(q) + bits.TrailingZeros64(bad)/8
	}
	// A mark is on the second byte of a pair: the lines up to the first
	// byte, which may be the LF that ends the last plain line.
	return bytes.LastIndexByte(p[:end], '\n') + 1
}

// write canonicalises p byte by byte.
func (b *relaxedBody) write(p []byte) {
	for i := 0; i < len(p); {
		switch p[i] {
		case ' ', '\t':
			b.wsp = true
			i++
			continue
		case '\r':
			// Always followed by LF, which ends the line.
			i++
			continue
		case '\n':
			b.wsp = false
			if b.content {
				b.out = append(b.out, '\r', '\n')
				b.content = false
			} else {
				b.blankLines++
			}
			b.flushIfFull()
			i++
			continue
		}
		// A run of ordinary bytes: everything up to the next whitespace
		// or line ending is hashed as it is.
		j := i + 1
		for j < len(p) && !bodySpecial[p[j]] {
			j++
		}
		for ; b.blankLines > 0; b.blankLines-- {
			b.out = append(b.out, '\r', '\n')
			b.flushIfFull()
		}
		if b.wsp {
			b.out = append(b.out, ' ')
			b.wsp = false
		}
		if len(b.out)+(j-i) > cap(b.out) {
			b.h.Write(b.out) // hash.Hash.Write never fails
			b.out = b.out[:0]
		}
		if j-i > cap(b.out) {
			b.h.Write(p[i:j])
		} else {
			b.out = append(b.out, p[i:j]...)
		}
		b.content = true
		i = j
	}
}

// bodySpecial marks the bytes relaxed body canonicalization treats
// specially.
var bodySpecial = [256]bool{' ': true, '\t': true, '\r': true, '\n': true}

func (b *relaxedBody) flushIfFull() {
	if len(b.out) >= cap(b.out)-2 {
		b.h.Write(b.out) // hash.Hash.Write never fails
		b.out = b.out[:0]
	}
}

// Sum returns the body hash. A last line without CRLF is completed as
// RFC 6376 §3.4.4 asks; trailing empty lines are not hashed.
func (b *relaxedBody) Sum() []byte {
	if b.content {
		b.out = append(b.out, '\r', '\n')
	}
	b.h.Write(b.out)
	b.out = b.out[:0]
	return b.h.Sum(nil)
}
