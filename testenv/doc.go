// Package testenv starts the real things dkimgw's tests run against: a
// SoftHSM token of each test's own, the independent DKIM verifiers, SMTP
// sinks, a throwaway Postfix, and authoritative DNS servers (BIND9 and
// Knot) that accept TSIG-signed updates of TXT records below _domainkey,
// a three-member etcd cluster whose members a test kills and restarts,
// and the fault injectors of the fault suite: an upstream that fails on
// demand (FaultSink) and a PKCS#11 module in front of SoftHSM that fails
// token calls on demand (PKCS11Fault). It is imported only by _test.go
// files.
//
// A helper whose component is missing skips the test, except when the
// environment has CI=true: there a missing component fails the test, so
// that CI can never pass by testing nothing.
package testenv
