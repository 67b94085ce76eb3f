package signer_test

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"strings"
	"time"

	"github.com/dkimgw/dkimgw/signer"
)

func Example() {
	ctx := context.Background()
	key := ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize)) // a token key in production

	msg := "From: News <news@mail.example.com>\nTo: alice@example.net\nSubject: Hello\n\nHi!\n"
	m, err := signer.Spool(ctx, strings.NewReader(msg), signer.SpoolOptions{})
	if err != nil {
		fmt.Println(err) // a *signer.RefusedError says why; SMTP answers 550 5.6.0
		return
	}
	defer m.Close()
	if !signer.Aligned(m.FromDomain(), "example.com") {
		fmt.Println("not our domain")
		return
	}
	fields, err := signer.Sign(ctx, m, []signer.Identity{{Domain: "example.com", Selector: "ed2024", Key: key}},
		signer.Options{Now: func() time.Time { return time.Unix(1710234900, 0) }})
	if err != nil {
		fmt.Println(err)
		return
	}
	var out strings.Builder
	if _, err := signer.WriteSigned(&out, fields, m); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Print(strings.ReplaceAll(out.String(), "\r\n", "\n")) // CRLF shown as LF
	// Output:
	// DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed; d=example.com;
	//  s=ed2024; t=1710234900; h=from:from:reply-to:sender:to:to:cc:subject:subject:
	//  date:mime-version:content-type:list-unsubscribe:list-unsubscribe-post;
	//  bh=EUhq6Ym/ZvOhfP7xrHEZSldIr+wbDhLWoXPQt0bX6KE=;
	//  b=nZvOhjPLAjeokq3G82ZiAMBurc3YxgCT8UGT94kI8UasktYe/c0/WPhUZ5yqFSvqswN+3DlEsqv
	//  SyXExsaH2Aw==
	// From: News <news@mail.example.com>
	// To: alice@example.net
	// Subject: Hello
	//
	// Hi!
}
