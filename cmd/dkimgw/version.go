package main

import (
	"fmt"
	"io"
	"runtime/debug"
)

// version reports the module version stamped by the Go toolchain, or
// "devel" in a plain `go build` from a checkout.
func version() string {
	if info, ok := debug.ReadBuildInfo(); ok && info.Main.Version != "" && info.Main.Version != "(devel)" {
		return info.Main.Version
	}
	return "devel"
}

// printVersion writes what `dkimgw version` shows: the version, the VCS
// commit and its date as the Go toolchain recorded them at build time
// (absent when built outside a checkout, e.g. with -buildvcs=false), and
// the Go version, so that a bug report names exactly what ran.
func printVersion(w io.Writer) {
	fmt.Fprintf(w, "dkimgw %s\n", version())
	info, ok := debug.ReadBuildInfo()
	if !ok {
		fmt.Fprintln(w, "build information: not available")
		return
	}
	var rev, at, modified string
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.time":
			at = s.Value
		case "vcs.modified":
			modified = s.Value
		}
	}
	if rev == "" {
		rev, at = "unknown (built without VCS information)", "unknown"
	} else if modified == "true" {
		rev += " (with uncommitted changes)"
	}
	fmt.Fprintf(w, "commit: %s\ncommit date: %s\ngo: %s\n", rev, at, info.GoVersion)
}
