package smtpproxy

import (
	"errors"
	"fmt"

	"github.com/emersion/go-smtp"
)

// Observer is told what the relay does, for metrics. smtpproxy declares
// what it reports and knows nothing of Prometheus; serve implements it.
// Methods are called on the connection's goroutine and must not block.
// Every label-like string comes from the configuration (client names,
// signing domains, selectors) or from a fixed set, never from the
// message: an unknown From domain is reported with Domain "".
type Observer interface {
	// Transaction reports a transaction that got its final reply: the
	// reply to DATA (or BDAT LAST), or a failure at MAIL FROM (the
	// upstream refused or could not be reached), before the client
	// hears it. Transactions the client abandons (RSET, QUIT) are not
	// reported.
	Transaction(TransactionReport)
	// ConnectionRefused reports a connection refused at accept time, with
	// reason RefusedMaxConnections or RefusedMaxConnectionsPerIP.
	ConnectionRefused(reason string)
}

// Reasons of Observer.ConnectionRefused.
const (
	RefusedMaxConnections      = "max_connections"
	RefusedMaxConnectionsPerIP = "max_connections_per_ip"
)

// Outcome is what became of a message.
type Outcome string

// The outcomes of a transaction, from the reply the client got.
const (
	OutcomeSigned          Outcome = "signed"           // 250, signed
	OutcomeRelayedUnsigned Outcome = "relayed-unsigned" // 250, not signed
	OutcomeTempfailed      Outcome = "tempfailed"       // 4xx
	OutcomeRefused         Outcome = "refused"          // 5xx
)

// TransactionReport is one message's outcome.
type TransactionReport struct {
	// Client is the configured name of the client that sent it.
	Client string
	// Domain is the signing domain the policy picked for the From domain;
	// "" when there is none (unknown or unauthorised From domain, or a
	// message refused before its header was read).
	Domain  string
	Outcome Outcome
	// Signatures are the signatures the message got (none unless Signed).
	Signatures []SignatureReport
	// UpstreamClass is the class of the upstream's reply to the message
	// ("2xx", "4xx", "5xx"); "" when the message was not sent upstream or
	// the connection broke before a reply.
	UpstreamClass string
}

// SignatureReport is one DKIM signature made.
type SignatureReport struct {
	Domain, Selector string
	// Algorithm is the a= tag: "rsa-sha256" or "ed25519-sha256".
	Algorithm string
}

// outcomeOf classifies the reply a client got at the end of DATA.
func outcomeOf(reply error, signed bool) (Outcome, bool) {
	var se *smtp.SMTPError
	if !errors.As(reply, &se) {
		return "", false
	}
	switch {
	case se.Code/100 == 2 && signed:
		return OutcomeSigned, true
	case se.Code/100 == 2:
		return OutcomeRelayedUnsigned, true
	case se.Code/100 == 4:
		return OutcomeTempfailed, true
	}
	return OutcomeRefused, true
}

// replyClass is "2xx", "4xx" or "5xx" for an SMTP reply code.
func replyClass(code int) string { return fmt.Sprintf("%dxx", code/100) }

// noObserver is the Observer of a server given none.
type noObserver struct{}

func (noObserver) Transaction(TransactionReport) {}
func (noObserver) ConnectionRefused(string)      {}

// Connections returns the number of client connections open now.
func (s *Server) Connections() int { return s.connCount() }

// SpoolBytes returns the bytes of the messages spooled now, in memory
// and in spool files: messages between the end of DATA and the
// upstream's reply (a message still being received is not counted).
func (s *Server) SpoolBytes() (memory, disk int64) {
	return s.spoolMem.Load(), s.spoolDisk.Load()
}

// SpoolMemory returns the bytes of memory the spool holds now for all
// messages, those still being received included; spool.memory_total
// bounds it.
func (s *Server) SpoolMemory() int64 { return s.spoolBudget.Used() }
