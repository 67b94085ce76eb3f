// Package dnspub publishes dkimgw's DKIM key records in DNS and checks
// what the authoritative servers serve.
//
// A Record is one TXT record: an owner name, a TTL and the record's value
// as one string (RFC 6376 §3.6.2.2: verifiers concatenate a TXT record's
// character-strings). The publishers follow the shape of
// github.com/libdns/libdns — GetRecords, AppendRecords, SetRecords and
// DeleteRecords on a zone — so that providers with HTTP APIs can be added
// next to them without changing their consumers:
//
//   - RFC2136 sends dynamic updates (RFC 2136) signed with TSIG (RFC 8945,
//     hmac-sha256 or hmac-sha512) to the zone's primary server, with
//     prerequisites so that a record changed behind dkimgw's back is
//     reported, never overwritten. It lists records by zone transfer
//     (RFC 5936).
//   - Manual keeps the changes a DNS admin has to make by hand as zone-file
//     lines (RFC 1035 §5) under a directory, and renders them as a zone-file
//     fragment and as an nsupdate script.
//
// A Checker asks each authoritative server of a zone directly, over UDP
// and over TCP (RFC 7766), with recursion off and no cache, whether it
// serves a record, and reads the TTLs a resolver may cache it and its
// absence for (RFC 2308 §5): what a reconciler waits out before a new
// key may sign.
package dnspub
