package dnspub_test

import (
	"context"
	"fmt"
	"time"

	"github.com/dkimgw/dkimgw/dnspub"
)

// publisher is the libdns-shaped method set both publishers share; a
// consumer declares the part of it that it needs.
type publisher interface {
	GetRecords(ctx context.Context, zone string) ([]dnspub.Record, error)
	AppendRecords(ctx context.Context, zone string, recs []dnspub.Record) ([]dnspub.Record, error)
	SetRecords(ctx context.Context, zone string, recs []dnspub.Record) ([]dnspub.Record, error)
	DeleteRecords(ctx context.Context, zone string, recs []dnspub.Record) ([]dnspub.Record, error)
}

var (
	_ publisher = (*dnspub.RFC2136)(nil)
	_ publisher = (*dnspub.Manual)(nil)
)

var pending = &dnspub.Changes{
	Zone:   "example.com.",
	Add:    []dnspub.Record{{Name: "ed20261201._domainkey", TTL: time.Hour, Value: "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="}},
	Remove: []dnspub.Record{{Name: "ed20260901._domainkey", TTL: time.Hour, Value: "v=DKIM1; p="}},
}

func ExampleChanges_ZoneFragment() {
	fmt.Print(pending.ZoneFragment())
	// Output:
	// ; dkimgw: DKIM key records for zone example.com.
	// ; add these records (and increase the SOA serial):
	// ed20261201._domainkey.example.com.	3600	IN	TXT	"v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
	// ; delete these records from the zone:
	// ; ed20260901._domainkey.example.com.	3600	IN	TXT	"v=DKIM1; p="
}

func ExampleChanges_NsupdateScript() {
	fmt.Print(pending.NsupdateScript("192.0.2.53:53"))
	// Output:
	// ; dkimgw: DKIM key records for zone example.com.
	// server 192.0.2.53 53
	// zone example.com.
	// update delete ed20260901._domainkey.example.com. TXT "v=DKIM1; p="
	// update add ed20261201._domainkey.example.com. 3600 TXT "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
	// send
}
