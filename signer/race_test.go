//go:build race

package signer

// raceEnabled: the race detector makes sync.Pool drop a share of what it
// is given, on purpose, so pooled buffers are allocated again sometimes.
const raceEnabled = true
