//go:build linux

// Command seamless-demo shows the seamless snapshotter at work: it starts
// a private registry, our daemon (containerd-seamless-grpc) and a private
// containerd that uses it as its "seamless" snapshotter, runs a container
// on it that keeps writing into its rootfs, commits it twice while it runs
// (through the daemon's API and through a snapshot label) and checks each
// capture against what the container wrote, restarts the daemon under the
// running container, and removes everything when it ends or on Ctrl-C.
//
// A commit in this release is only its first half, the capture: nothing
// turns a capture into an image or pushes it, and the demo says so.
//
// Run it as root with `make demo`. Flags: -v streams the harness's log,
// -keep leaves everything running until Ctrl-C.
package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/seamless-snapshotter/seamless-snapshotter/integration/harness"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/testimage"
)

func main() {
	verbose := flag.Bool("v", false, "also stream the harness's log (components started and stopped, failures)")
	keep := flag.Bool("keep", false, "leave everything running until Ctrl-C")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: seamless-demo [-v] [-keep]   (as root; `make demo` builds what it needs)\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() > 0 {
		flag.Usage()
		os.Exit(2)
	}
	if err := prerequisites(); err != nil {
		fmt.Fprintf(os.Stderr, "seamless-demo: %v\n", err)
		os.Exit(2)
	}

	out := os.Stdout
	var logBuf bytes.Buffer
	var log io.Writer = &logBuf
	if *verbose {
		log = &prefixWriter{w: out, prefix: "      · "}
	}
	r := harness.NewRunner(log)
	r.Name = "seamless-demo"
	d := &demo{out: out, keep: *keep, runner: r, resignalled: make(chan struct{})}
	r.OnSignal = d.onSignal

	fmt.Fprintf(out, "seamless demo: a container on the %q proxy snapshotter under a private containerd\n", harness.SnapshotterName)
	fmt.Fprintf(out, "(everything lives in private dirs under %s and is removed at the end or on Ctrl-C)\n\n", os.TempDir())
	err := r.Run(d.run)
	clean := d.finish(err)
	if err == nil {
		return
	}
	if errors.Is(err, harness.ErrInterrupted) && clean {
		fmt.Fprintf(os.Stderr, "seamless-demo: interrupted by %s; everything it started is gone\n", sigName(d.signal))
		os.Exit(130)
	}
	if !*verbose && logBuf.Len() > 0 {
		fmt.Fprintf(os.Stderr, "\nharness log:\n%s\n", indent(logBuf.String(), "  "))
	}
	fmt.Fprintf(os.Stderr, "seamless-demo: failed: %v\n", firstLine(err.Error()))
	os.Exit(1)
}

// prerequisites returns one line saying what to do if the demo cannot run.
func prerequisites() error {
	if os.Geteuid() != 0 {
		return errors.New("must run as root (containerd, runc and overlay mounts need it): sudo make demo")
	}
	var missing []string
	for _, name := range harness.RequiredBinaries {
		if !harness.HasBinary(name) {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%s not found in %s, %s or PATH: run `make demo` (or `make deps build` first)",
			strings.Join(missing, ", "), harness.BinDir(), harness.ToolsDir())
	}
	if _, err := testimage.FindBusybox(); err != nil {
		return fmt.Errorf("%v: run `make demo` (or `make deps` first)", err)
	}
	return nil
}

// prefixWriter prefixes every line written to w; the Runner writes whole
// messages, so lines are not split between writers.
type prefixWriter struct {
	w      io.Writer
	prefix string
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	_, err := io.WriteString(p.w, indent(strings.TrimRight(string(b), "\n"), p.prefix)+"\n")
	return len(b), err
}

func indent(s, prefix string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	for i, l := range lines {
		lines[i] = prefix + l
	}
	return strings.Join(lines, "\n")
}

func firstLine(s string) string {
	first, _, _ := strings.Cut(s, "\n")
	return first
}
