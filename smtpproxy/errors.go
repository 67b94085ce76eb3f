package smtpproxy

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/emersion/go-smtp"
)

// Every reply dkimgw makes up itself. Replies that come from the upstream
// are passed through by upstreamReply.
var (
	errAuthRequired = &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0},
		Message: "Authentication required: this client may not relay through dkimgw"}
	errShuttingDown = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2},
		Message: "Service shutting down, try again later"}
	errNoTransaction = &smtp.SMTPError{Code: 503, EnhancedCode: smtp.EnhancedCode{5, 5, 1},
		Message: "Bad sequence of commands: MAIL first"}
	errUpstreamUnavailable = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 1},
		Message: "Upstream server unavailable, try again later"}
	errUpstreamBroken = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 2},
		Message: "Connection to the upstream server lost, try again later"}
	errUpstreamBusy = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 5},
		Message: "Too many upstream connections, try again later"}
	errUpstreamNoTLS = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 10},
		Message: "Upstream server does not offer TLS, which is required; try again later"}
	errUpstreamNoUTF8 = &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 6, 7},
		Message: "Upstream server does not support SMTPUTF8"}
	errTokenUnavailable = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 0},
		Message: "DKIM signing temporarily unavailable, try again later"}
	errTooLarge = &smtp.SMTPError{Code: 552, EnhancedCode: smtp.EnhancedCode{5, 3, 4},
		Message: "Message size exceeds the fixed maximum message size"}
	errLineTooLong = &smtp.SMTPError{Code: 500, EnhancedCode: smtp.EnhancedCode{5, 5, 2},
		Message: "Line too long"}
	errDataTimeout = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 2},
		Message: "Timeout while receiving the message, try again"}
	errDataIncomplete = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 2},
		Message: "Connection lost while receiving the message, try again"}
	errLocal = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0},
		Message: "Temporary local problem, try again later"}
	errTooManyAuthFailures = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 7, 0},
		Message: "Too many authentication failures, closing connection"}
)

// Replies to an envelope with a control character (CR, LF, NUL, ...) in
// an address or a parameter: relayed, a CR or LF would end the command
// early at the upstream and start one of the sender's choosing, and a NUL
// cuts a string short in MTAs written in C.
var (
	errControlInSender = &smtp.SMTPError{Code: 501, EnhancedCode: smtp.EnhancedCode{5, 1, 7},
		Message: "Control character in the sender address"}
	errControlInRecipient = &smtp.SMTPError{Code: 501, EnhancedCode: smtp.EnhancedCode{5, 1, 3},
		Message: "Control character in the recipient address"}
	errControlInParameter = &smtp.SMTPError{Code: 501, EnhancedCode: smtp.EnhancedCode{5, 5, 4},
		Message: "Control character in a parameter"}
)

// hasControl reports whether any of ss has an ASCII control character
// (UTF-8 in SMTPUTF8 addresses is fine).
func hasControl(ss ...string) bool {
	for _, s := range ss {
		for i := 0; i < len(s); i++ {
			if s[i] < 0x20 || s[i] == 0x7f {
				return true
			}
		}
	}
	return false
}

// mailControl returns the refusal of a MAIL whose address or parameters
// (as go-smtp decoded them, xtext included) hold a control character.
func mailControl(from string, o *smtp.MailOptions) *smtp.SMTPError {
	if hasControl(from) {
		return errControlInSender
	}
	if o == nil {
		return nil
	}
	auth := ""
	if o.Auth != nil {
		auth = *o.Auth
	}
	if hasControl(string(o.Body), string(o.Return), o.EnvelopeID, auth) {
		return errControlInParameter
	}
	return nil
}

// rcptControl is mailControl for RCPT.
func rcptControl(to string, o *smtp.RcptOptions) *smtp.SMTPError {
	if hasControl(to) {
		return errControlInRecipient
	}
	if o == nil {
		return nil
	}
	if hasControl(string(o.OriginalRecipientType), o.OriginalRecipient) {
		return errControlInParameter
	}
	for _, n := range o.Notify {
		if hasControl(string(n)) {
			return errControlInParameter
		}
	}
	return nil
}

// replyNotAClient closes the connection of an unrecognised client after
// its 530 (written raw by clientConn, hence the full line).
const replyNotAClient = "421 4.7.0 Not a client of this relay, closing connection\r\n"

func unauthorizedDomain(domain string) *smtp.SMTPError {
	return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1},
		Message: fmt.Sprintf("Not allowed to send mail From domain %q through dkimgw", domain)}
}

func refused(reason string) *smtp.SMTPError {
	return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 6, 0},
		Message: "Message refused: " + oneLine(reason)}
}

// upstreamReply turns what the upstream client returned into the reply
// for our client: the upstream's own reply when it gave one, a 451
// otherwise (the connection failed or timed out: the sender retries).
func upstreamReply(err error) *smtp.SMTPError {
	var se *smtp.SMTPError
	if !errors.As(err, &se) {
		if strings.Contains(err.Error(), "does not support SMTPUTF8") {
			return errUpstreamNoUTF8
		}
		return errUpstreamBroken
	}
	r := &smtp.SMTPError{Code: se.Code, EnhancedCode: se.EnhancedCode, Message: oneLine(se.Message)}
	switch {
	case se.Code == 421:
		// 421 tells the client that *we* are closing the connection; we
		// are not, only the upstream is. 451 keeps the meaning (try later).
		r.Code = 451
	case se.Code < 400 || se.Code > 599:
		// A reply that is not an error where one was expected (e.g. 354
		// to MAIL): the upstream speaks broken SMTP.
		return errUpstreamBroken
	}
	if r.EnhancedCode == (smtp.EnhancedCode{}) || r.EnhancedCode[0] != r.Code/100 {
		r.EnhancedCode = smtp.EnhancedCode{r.Code / 100, 0, 0}
	}
	return r
}

// okReply is the 250 to DATA carrying the upstream's text (its queue ID
// above all, which lets an operator follow a message from MTA to MTA).
// go-smtp writes any *SMTPError returned from Data as the reply, 250 too.
func okReply(text string) *smtp.SMTPError {
	code := smtp.EnhancedCode{2, 0, 0}
	// The upstream's text starts with its enhanced code, which go-smtp's
	// client does not parse on success.
	if first, rest, ok := strings.Cut(text, " "); ok {
		if ec, ok := parseEnhanced(first); ok && ec[0] == 2 {
			code, text = ec, rest
		}
	}
	if text == "" {
		text = "OK"
	}
	return &smtp.SMTPError{Code: 250, EnhancedCode: code, Message: oneLine(text)}
}

func parseEnhanced(s string) (smtp.EnhancedCode, bool) {
	parts := strings.Split(s, ".")
	if len(parts) != 3 {
		return smtp.EnhancedCode{}, false
	}
	var ec smtp.EnhancedCode
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 || n > 999 {
			return smtp.EnhancedCode{}, false
		}
		ec[i] = n
	}
	return ec, true
}

// oneLine keeps a reply on one line: go-smtp turns "\n" into continuation
// lines, and a reason must not inject reply lines.
func oneLine(s string) string {
	s = strings.Map(func(r rune) rune {
		if r == '\r' || r == '\n' || r < 0x20 && r != '\t' {
			return ' '
		}
		return r
	}, s)
	if len(s) > 400 {
		s = s[:400]
	}
	return strings.TrimSpace(s)
}

// replyCode renders a reply for the transaction log.
func replyCode(e *smtp.SMTPError) string {
	if e == nil {
		return ""
	}
	return fmt.Sprintf("%d %d.%d.%d %s", e.Code, e.EnhancedCode[0], e.EnhancedCode[1], e.EnhancedCode[2], e.Message)
}
