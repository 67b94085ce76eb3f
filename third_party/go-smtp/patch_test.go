package smtp

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"net/textproto"
	"strings"
	"testing"
	"time"
)

// The tests of this file hold the block-wise DATA reader, line-length
// limit and dot writer to the byte-at-a-time code of v0.25.1 they replace
// (kept below as origDataReader and origLineLimitReader; net/textproto's
// DotWriter for the writer).

// origDataReader is v0.25.1's dataReader.Read, unchanged.
type origDataReader struct {
	r       *bufio.Reader
	state   int
	limited bool
	n       int64
}

func (r *origDataReader) Read(b []byte) (n int, err error) {
	if r.limited {
		if r.n <= 0 {
			return 0, ErrDataTooLarge
		}
		if int64(len(b)) > r.n {
			b = b[0:r.n]
		}
	}
	for n < len(b) && r.state != stateEOF {
		var c byte
		c, err = r.r.ReadByte()
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			break
		}
		switch r.state {
		case stateBeginLine:
			if c == '.' {
				r.state = stateDot
				continue
			}
			if c == '\r' {
				r.state = stateCR
				break
			}
			r.state = stateData
		case stateDot:
			if c == '\r' {
				r.state = stateDotCR
				continue
			}
			r.state = stateData
		case stateDotCR:
			if c == '\n' {
				r.state = stateEOF
				continue
			}
			r.state = stateData
		case stateCR:
			if c == '\n' {
				r.state = stateBeginLine
				break
			}
			r.state = stateData
		case stateData:
			if c == '\r' {
				r.state = stateCR
			}
		}
		b[n] = c
		n++
	}
	if err == nil && r.state == stateEOF {
		err = io.EOF
	}
	if r.limited {
		r.n -= int64(n)
	}
	return
}

// origLineLimitReader is v0.25.1's lineLimitReader.Read, unchanged.
type origLineLimitReader struct {
	R             io.Reader
	LineLimit     int
	curLineLength int
}

func (r *origLineLimitReader) Read(b []byte) (int, error) {
	if r.curLineLength > r.LineLimit && r.LineLimit > 0 {
		return 0, ErrTooLongLine
	}
	n, err := r.R.Read(b)
	if err != nil {
		return n, err
	}
	if r.LineLimit == 0 {
		return n, nil
	}
	for _, chr := range b[:n] {
		if chr == '\n' {
			r.curLineLength = 0
		}
		r.curLineLength++
		if r.curLineLength > r.LineLimit {
			return 0, ErrTooLongLine
		}
	}
	return n, nil
}

// dataResult is what a DATA reader gives: the message, the first error,
// and what it left unread in the connection.
type dataResult struct {
	msg  string
	err  error
	rest string
}

// readData reads stream through r (new or original) with reads of chunk
// bytes, from a connection that delivers at most feed bytes per read,
// as the server does: until an error, then what remains.
func readData(stream string, limit int64, chunk, feed int, orig bool) dataResult {
	br := bufio.NewReaderSize(&trickle{s: stream, n: feed}, 16)
	var r io.Reader
	if orig {
		r = &origDataReader{r: br, limited: limit > 0, n: limit}
	} else {
		r = &dataReader{r: br, limited: limit > 0, n: limit}
	}
	var msg bytes.Buffer
	buf := make([]byte, chunk)
	var err error
	for i := 0; i < len(stream)+2; i++ {
		var n int
		n, err = r.Read(buf)
		msg.Write(buf[:n])
		if err != nil {
			break
		}
	}
	rest, _ := io.ReadAll(br)
	return dataResult{msg: msg.String(), err: err, rest: string(rest)}
}

// trickle gives at most n bytes per Read.
type trickle struct {
	s string
	n int
}

func (t *trickle) Read(p []byte) (int, error) {
	if len(t.s) == 0 {
		return 0, io.EOF
	}
	k := len(p)
	if t.n < k {
		k = t.n
	}
	if len(t.s) < k {
		k = len(t.s)
	}
	copy(p, t.s[:k])
	t.s = t.s[k:]
	return k, nil
}

func sameData(t *testing.T, stream string, limit int64, chunk, feed int) {
	t.Helper()
	want := readData(stream, limit, chunk, feed, true)
	got := readData(stream, limit, chunk, feed, false)
	if got.msg != want.msg || !errors.Is(got.err, want.err) || got.rest != want.rest {
		t.Errorf("stream %q (limit %d, reads of %d, network reads of %d):\n got %q, %v, rest %q\nwant %q, %v, rest %q",
			stream, limit, chunk, feed, got.msg, got.err, got.rest, want.msg, want.err, want.rest)
	}
}

var dataStreams = []string{
	"",
	".\r\n",
	"\r\n.\r\n",
	"Subject: x\r\n\r\nbody\r\n.\r\n",
	"Subject: x\r\n\r\nbody\r\n.\r\nNEXT COMMAND\r\n",
	"..leading dot\r\n.\r\n",
	"a\r\n..\r\n...\r\n.x\r\n.\r\n",
	"bare\nlf\n.\n.\r\n",  // a bare LF does not end a line here
	"lone\rcr\r\r\n.\r\n", // CR not followed by LF
	"a\r\n.\rb\r\n.\r\n",  // ".\r" then no LF: data
	"a\r\n.\r\r\n.\r\n",   // ".\r\r\n"
	"no end",              // connection closed mid-message
	"no end\r\n.",         // ... at the dot
	"no end\r\n.\r",       // ... before the LF
	"x\r\n.\r\n.\r\n",     // only the first end counts
	strings.Repeat("0123456789", 50) + "\r\n.\r\n",
	strings.Repeat("line\r\n", 40) + ".\r\n",
	"\r\r\n\r\n.\r\n",
	"\n.\r\n",
	".\n.\r\n",
}

func TestDataReaderMatchesOriginal(t *testing.T) {
	for _, s := range dataStreams {
		for _, limit := range []int64{0, 1, 5, 17, 1000} {
			for _, chunk := range []int{1, 3, 7, 64, 4096} {
				for _, feed := range []int{1, 2, 5, 1000} {
					sameData(t, s, limit, chunk, feed)
				}
			}
		}
	}
}

func FuzzDataReaderMatchesOriginal(f *testing.F) {
	for _, s := range dataStreams {
		f.Add(s, int64(0), uint16(4096), uint16(1000))
	}
	f.Fuzz(func(t *testing.T, stream string, limit int64, chunk, feed uint16) {
		if limit < 0 {
			limit = -limit
		}
		sameData(t, stream, limit, int(chunk%5000)+1, int(feed%5000)+1)
	})
}

// lineLimitResult is what a line-length limiter gives.
type lineLimitResult struct {
	got string
	err error
}

func readLineLimited(stream string, limit, feed int, orig bool) lineLimitResult {
	var r io.Reader
	src := &trickle{s: stream, n: feed}
	if orig {
		r = &origLineLimitReader{R: src, LineLimit: limit}
	} else {
		r = &lineLimitReader{R: src, LineLimit: limit}
	}
	var out bytes.Buffer
	buf := make([]byte, 4096)
	var err error
	for i := 0; i < len(stream)+2; i++ {
		var n int
		n, err = r.Read(buf)
		out.Write(buf[:n])
		if err != nil {
			// And once more: a limit exceeded stays exceeded.
			if n2, err2 := r.Read(buf); n2 != 0 || err2 != err && !(err == io.EOF && err2 == io.EOF) {
				return lineLimitResult{got: out.String() + "|again", err: err2}
			}
			break
		}
	}
	return lineLimitResult{got: out.String(), err: err}
}

func sameLineLimit(t *testing.T, stream string, limit, feed int) {
	t.Helper()
	want := readLineLimited(stream, limit, feed, true)
	got := readLineLimited(stream, limit, feed, false)
	if got != want {
		t.Errorf("stream %q (limit %d, reads of %d): got %q, %v; want %q, %v", stream, limit, feed, got.got, got.err, want.got, want.err)
	}
}

var lineStreams = []string{
	"", "\n", "abc", "abc\n", "abcd\nab\n", "\n\n\n", "abcdefgh", "ab\ncdefgh\n", "abc\r\ndef\r\n",
	strings.Repeat("x", 100) + "\n", strings.Repeat("0123\n", 30),
}

func TestLineLimitReaderMatchesOriginal(t *testing.T) {
	for _, s := range lineStreams {
		for _, limit := range []int{0, 1, 2, 3, 4, 5, 6, 1000} {
			for _, feed := range []int{1, 2, 3, 7, 4096} {
				sameLineLimit(t, s, limit, feed)
			}
		}
	}
}

func FuzzLineLimitReaderMatchesOriginal(f *testing.F) {
	for _, s := range lineStreams {
		f.Add(s, uint8(4), uint16(7))
	}
	f.Fuzz(func(t *testing.T, stream string, limit uint8, feed uint16) {
		sameLineLimit(t, stream, int(limit), int(feed%5000)+1)
	})
}

// dotWrite writes parts through the new or textproto's dot writer.
func dotWrite(parts []string, orig bool) string {
	var out bytes.Buffer
	bw := bufio.NewWriterSize(&out, 16)
	var w io.WriteCloser
	if orig {
		w = textproto.NewWriter(bw).DotWriter()
	} else {
		w = &dotWriter{w: bw}
	}
	for _, p := range parts {
		n, err := w.Write([]byte(p))
		if n != len(p) || err != nil {
			return "short write"
		}
	}
	if err := w.Close(); err != nil {
		return err.Error()
	}
	return out.String()
}

func sameDotWrite(t *testing.T, parts []string) {
	t.Helper()
	if got, want := dotWrite(parts, false), dotWrite(parts, true); got != want {
		t.Errorf("writes %q: got %q, want %q", parts, got, want)
	}
}

func TestDotWriterMatchesTextproto(t *testing.T) {
	for _, s := range append(dataStreams, "a\r", "a\r\n", ".", "..", "\r", "\n", "a\n.b\r\n.", "x\r\r\n.\n") {
		sameDotWrite(t, []string{s})
		// The same bytes in every split of two, and byte by byte.
		for i := 0; i <= len(s); i++ {
			sameDotWrite(t, []string{s[:i], s[i:]})
		}
		sameDotWrite(t, strings.Split(s, ""))
	}
}

func FuzzDotWriterMatchesTextproto(f *testing.F) {
	for _, s := range dataStreams {
		f.Add(s, uint16(3))
	}
	f.Fuzz(func(t *testing.T, s string, cut uint16) {
		i := int(cut) % (len(s) + 1)
		sameDotWrite(t, []string{s[:i], s[i:]})
	})
}

// The gain: a 100 KB message with 78-byte lines, as HTML newsletters are.
var benchMessage = func() string {
	var b strings.Builder
	for b.Len() < 100<<10 {
		b.WriteString(strings.Repeat("x", 76) + "\r\n")
	}
	return b.String()
}()

func benchRead(b *testing.B, orig bool) {
	stream := benchMessage + ".\r\n"
	buf := make([]byte, 32<<10)
	b.SetBytes(int64(len(stream)))
	for i := 0; i < b.N; i++ {
		br := bufio.NewReader(strings.NewReader(stream))
		var r io.Reader = &dataReader{r: br}
		if orig {
			r = &origDataReader{r: br}
		}
		if _, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{r}, buf); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDataReader(b *testing.B)         { benchRead(b, false) }
func BenchmarkDataReaderOriginal(b *testing.B) { benchRead(b, true) }

func benchLineLimit(b *testing.B, orig bool) {
	buf := make([]byte, 4096)
	b.SetBytes(int64(len(benchMessage)))
	for i := 0; i < b.N; i++ {
		var r io.Reader = &lineLimitReader{R: strings.NewReader(benchMessage), LineLimit: 2000}
		if orig {
			r = &origLineLimitReader{R: strings.NewReader(benchMessage), LineLimit: 2000}
		}
		if _, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{r}, buf); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkLineLimitReader(b *testing.B)         { benchLineLimit(b, false) }
func BenchmarkLineLimitReaderOriginal(b *testing.B) { benchLineLimit(b, true) }

func benchDotWrite(b *testing.B, orig bool) {
	msg := []byte(benchMessage)
	bw := bufio.NewWriter(io.Discard)
	b.SetBytes(int64(len(msg)))
	for i := 0; i < b.N; i++ {
		var w io.WriteCloser = &dotWriter{w: bw}
		if orig {
			w = textproto.NewWriter(bw).DotWriter()
		}
		for i := 0; i < len(msg); i += 32 << 10 {
			if _, err := w.Write(msg[i : i+chunkEnd(i, len(msg))]); err != nil {
				b.Fatal(err)
			}
		}
		w.Close()
	}
}

func BenchmarkDotWriter(b *testing.B)          { benchDotWrite(b, false) }
func BenchmarkDotWriterTextproto(b *testing.B) { benchDotWrite(b, true) }

func chunkEnd(i, n int) int {
	if n-i < 32<<10 {
		return n - i
	}
	return 32 << 10
}

// A read of DATA returns what has arrived instead of waiting for the
// client to fill the caller's whole buffer: the original kept reading
// byte by byte, so one Read of 32 KB could wait for many network reads
// (and a per-Read idle deadline did not measure idleness).
func TestDataReaderReturnsWhatArrived(t *testing.T) {
	pr, pw := io.Pipe()
	defer pw.Close()
	r := &dataReader{r: bufio.NewReader(pr)}
	go pw.Write([]byte("Subject: x\r\n\r\nfirst part"))

	got := make(chan string, 1)
	go func() {
		buf := make([]byte, 32<<10)
		n, _ := r.Read(buf)
		got <- string(buf[:n])
	}()
	select {
	case s := <-got:
		if s != "Subject: x\r\n\r\nfirst part" {
			t.Errorf("Read = %q", s)
		}
	case <-time.After(10 * time.Second):
		pw.CloseWithError(errors.New("test over"))
		t.Fatal("Read still waiting for more than what arrived after 10 s")
	}
}

// Large messages cross the server's read buffer and the client's write
// buffer: each fill or flush is a system call, so both are larger than
// bufio's 4 KiB default. The client holds its large buffer only while it
// writes a message: between messages, bufio's default.
func TestDataBufferSizes(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	sc := newConn(a, NewServer(nil))
	if got := sc.text.R.Size(); got != serverReadBuffer || got < 16<<10 {
		t.Errorf("server read buffer %d bytes, want %d", got, serverReadBuffer)
	}
	cl := NewClient(b)
	if got := cl.text.W.Size(); got > 4<<10 {
		t.Errorf("client write buffer between messages %d bytes, want bufio's 4 KiB", got)
	}
	dw := cl.dataWriter()
	if got := dw.w.Size(); got != clientWriteBuffer || got < 64<<10 {
		t.Errorf("client write buffer for a message %d bytes, want %d", got, clientWriteBuffer)
	}

	// The message goes out whole through both buffers; once closed, the
	// writer refuses more (its buffer may serve another connection).
	msg := strings.Repeat(".dot-stuffed line\r\n", 10_000) // ~190 KB: several fills of both buffers
	got := make(chan string, 1)
	go func() { all, _ := io.ReadAll(a); got <- string(all) }()
	if _, err := dw.Write([]byte(msg)); err != nil {
		t.Fatalf("Write: %v", err)
	}
	if err := dw.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if _, err := dw.Write([]byte("late\r\n")); !errors.Is(err, errDataWriterClosed) {
		t.Errorf("Write after Close: %v, want %v", err, errDataWriterClosed)
	}
	if err := dw.Close(); !errors.Is(err, errDataWriterClosed) {
		t.Errorf("second Close: %v, want %v", err, errDataWriterClosed)
	}
	b.Close()
	want := strings.ReplaceAll("\r\n"+msg, "\r\n.", "\r\n..")[2:] + ".\r\n"
	if s := <-got; s != want {
		t.Errorf("the connection got %d bytes, want %d dot-stuffed ones", len(s), len(want))
	}
}
