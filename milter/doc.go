// Package milter is dkimgw's milter: a server of the Sendmail milter
// protocol (version 6, as Postfix's smtpd_milters and non_smtpd_milters
// and Sendmail's INPUT_MAIL_FILTER speak it) that adds DKIM-Signature
// fields (RFC 6376) to the messages its MTA passes through it, with the
// same clients table, domains and token keys as the relay.
//
// It signs a message when its From domain has keys and the MTA's client
// ({client_addr}, or {auth_authen} for authenticated submission) is
// allowed that domain. The body is hashed as it streams in and never
// kept ([signer.Stream]): the MTA holds the message, so memory per
// connection is the header section and the hashing state. At the end of
// the message the signatures are inserted first in the header
// (SMFIR_INSHEADER at index 0); the body is never changed.
package milter
