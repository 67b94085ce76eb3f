package main

import "runtime/debug"

// version reports the module version stamped by the Go toolchain, or
// "devel" in a plain `go build` from a checkout.
func version() string {
	if info, ok := debug.ReadBuildInfo(); ok && info.Main.Version != "" && info.Main.Version != "(devel)" {
		return info.Main.Version
	}
	return "devel"
}
