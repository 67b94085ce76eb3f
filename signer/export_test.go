package signer

// BenchMessage lets the external test package's token benchmarks sign the
// same message as the in-memory ones.
var BenchMessage = benchMessage
