//go:build linux

// Command seamlessctl commits running containers seamlessly: it resolves a
// container through containerd and asks the containerd-seamless-grpc
// daemon, over its HTTP API, to freeze the container for milliseconds,
// capture its writable layer and publish it as an image in the background.
// It also shows the status of commits.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/containerd/containerd/v2/defaults"

	"github.com/seamless-snapshotter/seamless-snapshotter/config"
)

// version is set at link time (-ldflags "-X main.version=...").
var version = "dev"

// Environment variables that set the connection defaults, as for ctr.
const (
	envAddress    = "CONTAINERD_ADDRESS"
	envNamespace  = "CONTAINERD_NAMESPACE"
	envAPIAddress = "SEAMLESS_API_ADDRESS"
)

var defaultAPIAddress = filepath.Join(filepath.Dir(config.DefaultAddress), "api.sock")

const globalUsage = `seamlessctl: commit running containers of the seamless snapshotter

Usage:
  seamlessctl [global options] <command> [options] [arguments]

Commands:
  commit    capture a running container's writable layer and publish it as an image
  wait      wait for a commit's image to be published, showing the progress
  status    show one commit
  list      list commits
  version   print the version
  help      show the help of a command

Global options (also accepted after the command):
  -a, --address PATH       containerd socket ($CONTAINERD_ADDRESS, default %s)
  -n, --namespace NAME     containerd namespace ($CONTAINERD_NAMESPACE, default %s)
      --api-address PATH   seamless daemon API socket ($SEAMLESS_API_ADDRESS, default %s)

Exit codes:
  0  ok
  1  error, including a failed commit job that is not a registry failure,
     and a wait that timed out (the job keeps running)
  2  usage: bad options or arguments
  3  container or commit not found
  4  permission denied (e.g. the API socket is root-only)
  5  registry or network: containerd, the daemon or the registry could not
     be reached, or the registry refused a commit's push (job error codes
     REGISTRY_AUTH, REGISTRY_UNREACHABLE, REGISTRY_ERROR, PUSH_FAILED,
     CONTAINERD_UNREACHABLE)

Examples:
  seamlessctl commit --container web --target registry.example.com/app:snap1 --wait
  seamlessctl list

Run 'seamlessctl <command> --help' for a command's options and examples.
`

// globals are the connection options every command shares.
type globals struct {
	address, namespace, apiAddress string
}

func defaultGlobals(getenv func(string) string) globals {
	or := func(env, def string) string {
		if v := getenv(env); v != "" {
			return v
		}
		return def
	}
	return globals{
		address:    or(envAddress, defaults.DefaultAddress),
		namespace:  or(envNamespace, "default"),
		apiAddress: or(envAPIAddress, defaultAPIAddress),
	}
}

func (g *globals) register(fs *flag.FlagSet) {
	for _, name := range []string{"address", "a"} {
		fs.StringVar(&g.address, name, g.address, "containerd socket")
	}
	for _, name := range []string{"namespace", "n"} {
		fs.StringVar(&g.namespace, name, g.namespace, "containerd namespace")
	}
	fs.StringVar(&g.apiAddress, "api-address", g.apiAddress, "seamless daemon API socket")
}

// cli is one invocation: its options and where it writes.
type cli struct {
	globals
	stdout, stderr io.Writer
}

// command is a subcommand: its usage text and what it does with its flags
// and arguments.
type command struct {
	usage string
	run   func(ctx context.Context, c *cli, args []string) error
}

func commands() map[string]command {
	return map[string]command{
		"commit":  {commitUsage, runCommit},
		"wait":    {waitUsage, runWait},
		"status":  {statusUsage, runStatus},
		"list":    {listUsage, runList},
		"version": {versionUsage, runVersion},
	}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run runs seamlessctl with args and returns the exit code.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	c := &cli{globals: defaultGlobals(getenv), stdout: stdout, stderr: stderr}
	usage := fmt.Sprintf(globalUsage, c.address, c.namespace, c.apiAddress)
	fs := newFlagSet("seamlessctl")
	c.register(fs)
	if err := fs.Parse(args); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			err = &usageError{err.Error()}
		}
		return c.fail(err, usage, "seamlessctl --help")
	}
	if fs.NArg() == 0 {
		return c.fail(usageErrorf("no command given"), usage, "seamlessctl --help")
	}
	name, rest := fs.Arg(0), fs.Args()[1:]
	if name == "help" {
		if len(rest) == 0 {
			fmt.Fprint(stdout, usage)
			return exitOK
		}
		name, rest = rest[0], []string{"--help"}
	}
	cmd, ok := commands()[name]
	if !ok {
		return c.fail(usageErrorf("unknown command %q; the commands are commit, wait, status, list and version", name), usage, "seamlessctl --help")
	}
	return c.fail(cmd.run(ctx, c, rest), cmd.usage, "seamlessctl "+name+" --help")
}

// fail prints the help for --help, or err as one line, and returns the
// exit code.
func (c *cli) fail(err error, usage, helpCmd string) int {
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, flag.ErrHelp):
		fmt.Fprint(c.stdout, usage)
		return exitOK
	}
	msg := errorLine(err)
	if exitCode(err) == exitUsage {
		msg += " (see '" + helpCmd + "')"
	}
	fmt.Fprintln(c.stderr, "seamlessctl: "+msg)
	return exitCode(err)
}

// newFlagSet returns a flag set that reports errors instead of printing
// them: run prints every error as one line.
func newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	return fs
}

// parseArgs parses a command's flags, which may come before, between or
// after its arguments, and returns the arguments.
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, &usageError{fmt.Sprintf("%s: %v", fs.Name(), err)}
		}
		rest := fs.Args()
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			return append(positional, rest...), nil
		}
		if len(rest) == 0 {
			return positional, nil
		}
		positional, args = append(positional, rest[0]), rest[1:]
	}
}

// outputFlag registers --output/-o.
func outputFlag(fs *flag.FlagSet) *string {
	out := new(string)
	for _, name := range []string{"output", "o"} {
		fs.StringVar(out, name, "text", "text or json")
	}
	return out
}

// parseCommand parses a subcommand's flags and checks its positional
// arguments (want of them, described by what) and its --output value.
func parseCommand(fs *flag.FlagSet, args []string, want int, what string) ([]string, error) {
	args, err := parseArgs(fs, args)
	if err != nil {
		return nil, err
	}
	if err := checkArgs(fs, args, want, what); err != nil {
		return nil, err
	}
	return args, checkOutput(fs, fs.Lookup("output").Value.String())
}

func checkOutput(fs *flag.FlagSet, output string) error {
	if output != "text" && output != "json" {
		return usageErrorf("%s: --output must be text or json, not %q", fs.Name(), output)
	}
	return nil
}

func checkArgs(fs *flag.FlagSet, args []string, want int, what string) error {
	if len(args) != want {
		if want == 0 {
			return usageErrorf("%s: unexpected arguments %s", fs.Name(), strings.Join(args, " "))
		}
		return usageErrorf("%s: expected %s, got %d arguments", fs.Name(), what, len(args))
	}
	return nil
}

const versionUsage = `Usage: seamlessctl version

Print the version of seamlessctl.
`

func runVersion(_ context.Context, c *cli, args []string) error {
	fs := newFlagSet("version")
	args, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if err := checkArgs(fs, args, 0, ""); err != nil {
		return err
	}
	fmt.Fprintf(c.stdout, "seamlessctl %s\n", version)
	return nil
}
