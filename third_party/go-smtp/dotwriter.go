package smtp

import (
	"bufio"
	"bytes"
	"errors"
)

// dotWriter dot-stuffs a message for DATA as net/textproto's DotWriter
// does (a leading '.' is doubled, a bare '\n' becomes "\r\n", and Close
// ends the data with ".\r\n" after a line ending if there is none), but
// writes each line to the buffered writer in one piece instead of one
// WriteByte per byte.
type dotWriter struct {
	w     *bufio.Writer
	state int
	// out, if not nil, is the connection's own writer under w: Close
	// flushes it too and gives w back to dataWriters.
	out *bufio.Writer
}

// errDataWriterClosed is a write to a message writer after its Close.
var errDataWriterClosed = errors.New("smtp: data writer closed")

// States of dotWriter, as in net/textproto.
const (
	wstateBegin     = iota // initial state; must be zero
	wstateBeginLine        // beginning of line
	wstateCR               // wrote \r (possibly at end of line)
	wstateData             // writing data in middle of line
)

func (d *dotWriter) Write(b []byte) (n int, err error) {
	if d.w == nil {
		return 0, errDataWriterClosed
	}
	for n < len(b) {
		if d.state == wstateBegin || d.state == wstateBeginLine {
			if b[n] == '.' {
				if err = d.w.WriteByte('.'); err != nil {
					return n, err
				}
			}
			d.state = wstateData
		}
		rest := b[n:]
		i := bytes.IndexByte(rest, '\n')
		if i < 0 {
			if _, err = d.w.Write(rest); err != nil {
				return n, err
			}
			n += len(rest)
			d.state = d.after(rest)
			break
		}
		cr := d.after(rest[:i]) == wstateCR
		if _, err = d.w.Write(rest[:i]); err != nil {
			return n, err
		}
		if !cr {
			if err = d.w.WriteByte('\r'); err != nil {
				return n + i, err
			}
		}
		if err = d.w.WriteByte('\n'); err != nil {
			return n + i, err
		}
		n += i + 1
		d.state = wstateBeginLine
	}
	return n, nil
}

// after returns the state after b, which holds no '\n', is written in
// state d.state. As in net/textproto, a '\r' right after a '\r' that set
// wstateCR leaves it (so "\r\r\n" gets a '\r' added, "\r\r\r\n" not):
// the state depends on whether the trailing run of '\r's is odd or even.
func (d *dotWriter) after(b []byte) int {
	run := 0
	for run < len(b) && b[len(b)-1-run] == '\r' {
		run++
	}
	if run == len(b) && d.state == wstateCR {
		run++
	}
	if run%2 == 1 {
		return wstateCR
	}
	if len(b) == 0 {
		return d.state
	}
	return wstateData
}

func (d *dotWriter) Close() error {
	if d.w == nil {
		return errDataWriterClosed
	}
	switch d.state {
	default:
		d.w.WriteByte('\r')
		fallthrough
	case wstateCR:
		d.w.WriteByte('\n')
		fallthrough
	case wstateBeginLine:
		d.w.Write([]byte(".\r\n"))
	}
	err := d.w.Flush()
	if d.out != nil {
		if err == nil {
			err = d.out.Flush()
		}
		d.w.Reset(nil)
		dataWriters.Put(d.w)
		d.w = nil
	}
	return err
}
