package main

import "context"

func auditReview(ctx context.Context, c *cli, args []string) int {
	return failf(c, exitSoftware, "audit: not built yet")
}
