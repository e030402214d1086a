//go:build linux

package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// fakeCommitter is the daemon behind the real API handler.
type fakeCommitter struct {
	commits []snapshotter.Commit
	listErr error
}

func (f *fakeCommitter) Capture(context.Context, snapshotter.CommitRequest) (snapshotter.Commit, error) {
	return snapshotter.Commit{}, errdefs.ErrNotImplemented
}

func (f *fakeCommitter) GetCommit(_ context.Context, id string) (snapshotter.Commit, error) {
	for _, c := range f.commits {
		if c.ID == id {
			return c, nil
		}
	}
	return snapshotter.Commit{}, fmt.Errorf("commit %q: %w", id, errdefs.ErrNotFound)
}

func (f *fakeCommitter) ListCommits(context.Context) ([]snapshotter.Commit, error) {
	return f.commits, f.listErr
}

func (f *fakeCommitter) FindActiveKey(context.Context, string, string) (string, error) {
	return "", errdefs.ErrNotImplemented
}

// serveAPI serves the API over a unix socket and returns the socket.
func serveAPI(t *testing.T, c api.Committer) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: api.Handler(c, api.NewMetrics())}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return sock
}

// runCLI runs seamlessctl with an environment of its own.
func runCLI(env map[string]string, args ...string) (code int, stdout, stderr string) {
	var out, errOut bytes.Buffer
	code = run(context.Background(), args, func(k string) string { return env[k] }, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestCommands(t *testing.T) {
	pending := sample().Commit
	failed := sample().Commit
	failed.ID, failed.State, failed.ErrorCode, failed.Error = "m5x0k2b-fedcba9876543210", snapshotter.StateFailed, snapshotter.CodeCaptureFailed, "disk full"
	other := sample().Commit
	other.ID, other.SnapshotKey = "m5x0k3c-00000000aaaaaaaa", "k8s.io/9/abc"
	sock := serveAPI(t, &fakeCommitter{commits: []snapshotter.Commit{pending, failed, other}})
	forbidden := serveAPI(t, &fakeCommitter{listErr: fmt.Errorf("not yours: %w", errdefs.ErrPermissionDenied)})
	// A socket nobody listens on any more: connection refused.
	refused := filepath.Join(t.TempDir(), "refused.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: refused, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()

	env := map[string]string{envAPIAddress: sock}
	for _, tc := range []struct {
		name   string
		env    map[string]string
		args   []string
		code   int
		stdout []string // each must appear
		absent []string // none may appear on stdout
		stderr string   // must appear; "" means stderr must be empty
	}{
		// Help and usage.
		{name: "help", args: []string{"--help"}, stdout: []string{"Usage:", "commit", "wait ", "Exit codes:", "5  registry or network", "/run/containerd/containerd.sock", "/run/containerd-seamless/api.sock"}},
		{name: "help shows env defaults", env: map[string]string{envNamespace: "k8s.io"}, args: []string{"help"}, stdout: []string{"default k8s.io)"}},
		{name: "help commit", args: []string{"help", "commit"}, stdout: []string{"--pause-budget", "Examples:"}},
		{name: "commit --help", args: []string{"commit", "--help"}, stdout: []string{"--container", "Examples:"}},
		{name: "list -h", args: []string{"list", "-h"}, stdout: []string{"--state", "Examples:"}},
		{name: "wait --help", args: []string{"wait", "--help"}, stdout: []string{"--timeout", "done: <target>@<digest>", "Examples:"}},
		{name: "help wait", args: []string{"help", "wait"}, stdout: []string{"Usage: seamlessctl wait"}},
		{name: "commit help shows the new options", args: []string{"commit", "--help"}, stdout: []string{"--wait", "--timeout", "--local", "--compression", "--compression-level"}},
		{name: "no command", code: exitUsage, stderr: "seamlessctl: no command given (see 'seamlessctl --help')"},
		{name: "unknown command", args: []string{"frobnicate"}, code: exitUsage, stderr: `unknown command "frobnicate"`},
		{name: "unknown global flag", args: []string{"--frob", "list"}, code: exitUsage, stderr: "flag provided but not defined: -frob"},
		{name: "unknown flag", args: []string{"commit", "--frob"}, code: exitUsage, stderr: "seamlessctl: commit: flag provided but not defined: -frob (see 'seamlessctl commit --help')"},
		{name: "missing --target", args: []string{"commit", "--container", "web"}, code: exitUsage, stderr: "--target is required"},
		{name: "missing --container", args: []string{"commit", "--target", "r/app:v1"}, code: exitUsage, stderr: "--container is required"},
		{name: "bad pause budget", args: []string{"commit", "--container", "web", "--target", "r/app:v1", "--pause-budget", "fast"}, code: exitUsage, stderr: `--pause-budget "fast"`},
		{name: "bad output", args: []string{"commit", "--container", "web", "--target", "r/app:v1", "-o", "yaml"}, code: exitUsage, stderr: "--output must be text or json"},
		{name: "commit arguments", args: []string{"commit", "web"}, code: exitUsage, stderr: "unexpected arguments web"},
		{name: "status without ID", args: []string{"status"}, code: exitUsage, stderr: "expected one commit ID"},
		{name: "version", args: []string{"version"}, stdout: []string{"seamlessctl dev"}},

		// The daemon's API.
		{name: "status", env: env, args: []string{"status", pending.ID}, stdout: []string{"commit    " + pending.ID + "\n", "state     pending\n", "1.23 ms", "1234 entries, 5.6 MiB"}},
		{name: "status json, flags after the ID", env: env, args: []string{"status", pending.ID, "--output", "json"}, stdout: []string{`"id": "` + pending.ID + `"`, `"pause_ms": 1.234`}},
		{name: "status of a failed commit", env: env, args: []string{"status", failed.ID}, stdout: []string{"state     failed\n", "error     [CAPTURE_FAILED] disk full\n"}},
		{name: "status not found", env: env, args: []string{"status", "nope"}, code: exitNotFound, stderr: `seamlessctl: [COMMIT_NOT_FOUND] commit "nope": not found`},
		{name: "list", env: env, args: []string{"list"}, stdout: []string{"STATE    PROGRESS", "DIGEST", pending.ID, failed.ID}},
		{name: "list by state", env: env, args: []string{"list", "--state", "failed", "-o", "json"}, stdout: []string{`"commits": [`, failed.ID}, absent: []string{pending.ID}},
		{name: "list only the namespace", env: env, args: []string{"list"}, stdout: []string{pending.ID}, absent: []string{other.ID}},
		{name: "list in a namespace", env: env, args: []string{"-n", "k8s.io", "list"}, stdout: []string{other.ID}, absent: []string{pending.ID}},
		{name: "global flag after the command", args: []string{"list", "--api-address", sock, "--namespace", "k8s.io"}, stdout: []string{other.ID}, absent: []string{pending.ID}},
		{name: "list forbidden", args: []string{"--api-address", forbidden, "list"}, code: exitPermission, stderr: "seamlessctl: [FORBIDDEN] not yours"},

		// Unreachable sockets.
		{name: "no API socket", args: []string{"--api-address", "/nonexistent.sock", "status", "x"}, code: exitUnreachable,
			stderr: "seamlessctl: cannot reach the seamless daemon API at /nonexistent.sock: dial unix /nonexistent.sock: connect: no such file or directory"},
		{name: "API refuses", args: []string{"--api-address", refused, "list"}, code: exitUnreachable, stderr: "connection refused"},
		{name: "no containerd socket", args: []string{"-a", "/nonexistent.sock", "commit", "--container", "web", "--target", "r/app:v1"}, code: exitUnreachable,
			stderr: "seamlessctl: cannot reach containerd at /nonexistent.sock"},
		{name: "containerd from the environment", env: map[string]string{envAddress: refused}, args: []string{"list", "--container", "web"}, code: exitUnreachable,
			stderr: "cannot reach containerd at " + refused},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, stdout, stderr := runCLI(tc.env, tc.args...)
			if code != tc.code {
				t.Errorf("exit code %d, want %d (stderr %q)", code, tc.code, stderr)
			}
			for _, s := range tc.stdout {
				if !strings.Contains(stdout, s) {
					t.Errorf("stdout lacks %q:\n%s", s, stdout)
				}
			}
			for _, s := range tc.absent {
				if strings.Contains(stdout, s) {
					t.Errorf("stdout has %q:\n%s", s, stdout)
				}
			}
			switch {
			case tc.stderr == "" && stderr != "":
				t.Errorf("unexpected stderr %q", stderr)
			case !strings.Contains(stderr, tc.stderr):
				t.Errorf("stderr %q lacks %q", stderr, tc.stderr)
			case stderr != "" && strings.Count(stderr, "\n") != 1:
				t.Errorf("stderr is not one line: %q", stderr)
			}
			if tc.code == exitOK && tc.stdout == nil {
				t.Error("test case checks nothing on stdout")
			}
		})
	}
}

func TestParseArgs(t *testing.T) {
	for _, tc := range []struct {
		args       []string
		positional []string
		output     string
		err        bool
	}{
		{args: nil, output: "text"},
		{args: []string{"id"}, positional: []string{"id"}, output: "text"},
		{args: []string{"-o", "json", "id"}, positional: []string{"id"}, output: "json"},
		{args: []string{"id", "--output", "json"}, positional: []string{"id"}, output: "json"},
		{args: []string{"a", "-o=json", "b"}, positional: []string{"a", "b"}, output: "json"},
		{args: []string{"--", "-o", "json"}, positional: []string{"-o", "json"}, output: "text"},
		{args: []string{"a", "--", "-b"}, positional: []string{"a", "-b"}, output: "text"},
		{args: []string{"a", "--bogus"}, err: true},
		{args: []string{"-o"}, err: true},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			fs := newFlagSet("test")
			output := outputFlag(fs)
			got, err := parseArgs(fs, tc.args)
			if tc.err {
				if exitCode(err) != exitUsage {
					t.Fatalf("got %q, %v; want a usage error", got, err)
				}
				return
			}
			if err != nil || strings.Join(got, "|") != strings.Join(tc.positional, "|") || *output != tc.output {
				t.Fatalf("got %q, -o %s, %v; want %q, -o %s", got, *output, err, tc.positional, tc.output)
			}
		})
	}
}
