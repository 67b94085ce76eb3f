// Package faults is dkimgw's fault suite: it runs the real `dkimgw serve`
// binary under load (many concurrent SMTP sessions, each message tagged)
// while it injects one fault per scenario — an upstream that dies,
// refuses, answers 421, stalls or hangs up; a token that loses its
// sessions, fails with device errors or hangs (through a PKCS#11 shim in
// front of SoftHSM, testenv.PKCS11Fault); a token directory taken away;
// the gateway killed with SIGKILL, reloaded every 100 ms, stopped with
// transactions in flight; its domain's keys rotated every few seconds
// against BIND — and then checks dkimgw's promises: every
// message the client saw accepted arrived upstream signed and verifying,
// nothing arrived unsigned, and every message not accepted got a reply
// the client can act on.
//
// The package holds tests only. `go test ./faults` runs the short form
// of every scenario (a few hundred messages each); DKIMGW_FAULTS=long
// runs the long form (`make test-faults`), and DKIMGW_FAULTS_REPORT=FILE
// writes the table of results to FILE (docs/reliability.md).
package faults
