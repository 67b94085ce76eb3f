package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
)

// Exit statuses follow sysexits(3), which MTAs and scripts already know:
// EX_TEMPFAIL in particular tells a caller to try again later.
const (
	exitOK          = 0
	exitFailure     = 1  // anything not covered below
	exitUsage       = 64 // EX_USAGE: bad command line
	exitDataErr     = 65 // EX_DATAERR: the input (a message) was refused
	exitUnavailable = 69 // EX_UNAVAILABLE: a needed service or object is missing
	exitSoftware    = 70 // EX_SOFTWARE: internal error
	exitOSErr       = 71 // EX_OSERR: the system refused a resource (serve cannot bind its address)
	exitTempFail    = 75 // EX_TEMPFAIL: try again later (token unavailable, ...)
	exitConfig      = 78 // EX_CONFIG: the configuration is invalid
	// exitKeyUnusable is for a key that exists but that dkimgw refuses to
	// sign with (too weak, extractable, imported): like a missing key, the
	// object the command needs is not available.
	exitKeyUnusable = exitUnavailable
)

// cli is the process environment a command runs in. Tests build one with
// buffers and a map-backed getenv, so commands never touch os.* directly.
type cli struct {
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	getenv func(string) string
}

// command is one `dkimgw` subcommand. Run receives the arguments after the
// command's name and returns the process exit status; it prints its own
// errors to stderr.
type command struct {
	name  string
	usage string // the synopsis after "dkimgw "
	short string // one line for `dkimgw help`
	long  string // shown by --help, after the synopsis
	run   func(ctx context.Context, c *cli, args []string) int
}

// commands is the command table; `dkimgw help` lists it in this order.
func commands() []*command {
	return []*command{
		initCommand,
		keysCommand,
		signCommand,
		serveCommand, milterCommand, configCommand,
		rotateCommand, dnsCommand, stateCommand,
		auditCommand,
	}
}

func run(ctx context.Context, args []string, c *cli) int {
	if len(args) == 0 {
		printHelp(c.stderr)
		return exitUsage
	}
	switch args[0] {
	case "help", "-h", "-help", "--help":
		if len(args) > 1 {
			if cmd := findCommand(args[1]); cmd != nil {
				fmt.Fprintf(c.stdout, "usage: dkimgw %s\n\n%s\n", cmd.usage, strings.TrimSpace(cmd.long))
				return exitOK
			}
		}
		printHelp(c.stdout)
		return exitOK
	case "version", "--version", "-version":
		if len(args) > 1 {
			return failf(c, exitUsage, "version: unexpected argument %q", args[1])
		}
		printVersion(c.stdout)
		return exitOK
	}
	cmd := findCommand(args[0])
	if cmd == nil {
		fmt.Fprintf(c.stderr, "dkimgw: unknown command %q; run 'dkimgw help' for the list\n", args[0])
		return exitUsage
	}
	return cmd.run(ctx, c, args[1:])
}

func findCommand(name string) *command {
	for _, cmd := range commands() {
		if cmd.name == name {
			return cmd
		}
	}
	return nil
}

func printHelp(w io.Writer) {
	fmt.Fprint(w, "dkimgw — a DKIM signing gateway with keys in a PKCS#11 token\n\nusage: dkimgw <command> [flags]\n\ncommands:\n")
	for _, cmd := range commands() {
		fmt.Fprintf(w, "  %-10s %s\n", cmd.name, cmd.short)
	}
	fmt.Fprintf(w, "  %-10s %s\n", "version", "print the version, VCS commit and date, and Go version (also --version)")
	fmt.Fprintf(w, "  %-10s %s\n", "help", "this list; 'dkimgw help <command>' for one command")
	fmt.Fprint(w, "\nRun 'dkimgw <command> --help' for a command's flags and exit statuses.\n")
}

// newFlagSet returns a flag set for one command. A bad flag prints the
// parse error and a pointer to --help on c.stderr; --help itself is handled
// by parseFlags.
func newFlagSet(c *cli, name string) *flag.FlagSet {
	fs := flag.NewFlagSet("dkimgw "+name, flag.ContinueOnError)
	fs.SetOutput(c.stderr)
	// The flag package calls Usage both for -help and after a parse error;
	// parseFlags prints what each case needs instead.
	fs.Usage = func() {}
	return fs
}

// parseFlags parses args and maps the outcome to an exit status: ok is
// false when the command must return code at once (--help gives 0 and
// prints usage, long help and flags to stdout, as the user asked for it; a
// bad flag or a stray argument gives 64).
func parseFlags(c *cli, fs *flag.FlagSet, usage, long string, args []string) (code int, ok bool) {
	err := fs.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprintf(c.stdout, "usage: dkimgw %s\n\n", usage)
		if long = strings.TrimSpace(long); long != "" {
			fmt.Fprintf(c.stdout, "%s\n\n", long)
		}
		fmt.Fprintln(c.stdout, "flags:")
		printFlags(c.stdout, fs)
		return exitOK, false
	}
	if err != nil {
		fmt.Fprintf(c.stderr, "run '%s --help' for usage\n", fs.Name())
		return exitUsage, false
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(c.stderr, "%s: unexpected argument %q\n", fs.Name(), fs.Arg(0))
		return exitUsage, false
	}
	return exitOK, true
}

// printFlags lists fs's flags as flag.PrintDefaults does, but spelt
// --name, as the usage lines and the documentation spell them.
func printFlags(w io.Writer, fs *flag.FlagSet) {
	fs.VisitAll(func(f *flag.Flag) {
		name, usage := flag.UnquoteUsage(f)
		line := "  --" + f.Name
		if name != "" {
			line += " " + name
		}
		usage = strings.ReplaceAll(usage, "\n", "\n    \t")
		fmt.Fprintf(w, "%s\n    \t%s", line, usage)
		if d := f.DefValue; d != "" && d != "false" && d != "0" && d != "[]" {
			if g, ok := f.Value.(flag.Getter); ok {
				switch g.Get().(type) {
				case string:
					d = fmt.Sprintf("%q", d) // strings, paths and addresses
				}
			}
			fmt.Fprintf(w, " (default %s)", d)
		}
		fmt.Fprintln(w)
	})
}

// failf prints a one-line error to stderr and returns code.
func failf(c *cli, code int, format string, args ...any) int {
	fmt.Fprintf(c.stderr, "dkimgw: "+format+"\n", args...)
	return code
}
