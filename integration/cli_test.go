//go:build linux

package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	containerd "github.com/containerd/containerd/v2/client"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/harness"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// buildCLI builds seamlessctl from this tree into a temporary directory.
func buildCLI(ctx context.Context, t *testing.T) string {
	t.Helper()
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin := filepath.Join(t.TempDir(), "seamlessctl")
	cmd := exec.CommandContext(ctx, goBin, "build", "-o", bin, "./cmd/seamlessctl")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building seamlessctl: %v\n%s", err, out)
	}
	return bin
}

// cliResult is what one seamlessctl run did.
type cliResult struct {
	code           int
	stdout, stderr string
}

// cliRunner runs seamlessctl against the Env's containerd and daemon.
type cliRunner struct {
	bin  string
	args []string // connection flags
}

func newCLIRunner(ctx context.Context, t *testing.T, env *harness.Env) cliRunner {
	return cliRunner{
		bin: buildCLI(ctx, t),
		args: []string{
			"-a", env.Containerd.Address(),
			"-n", env.Containerd.Namespace(),
			"--api-address", filepath.Join(filepath.Dir(env.Daemon.Socket()), "api.sock"),
		},
	}
}

func (r cliRunner) run(ctx context.Context, t *testing.T, args ...string) cliResult {
	t.Helper()
	cmd := exec.CommandContext(ctx, r.bin, append(append([]string{}, r.args...), args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	res := cliResult{stdout: stdout.String(), stderr: stderr.String()}
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		res.code = exit.ExitCode()
	case err != nil:
		t.Fatalf("running seamlessctl %v: %v", args, err)
	}
	t.Logf("seamlessctl %s: exit %d\n%s%s", strings.Join(args, " "), res.code, res.stdout, res.stderr)
	return res
}

// ok runs seamlessctl and fails the test unless it succeeds.
func (r cliRunner) ok(ctx context.Context, t *testing.T, args ...string) string {
	t.Helper()
	res := r.run(ctx, t, args...)
	if res.code != 0 || res.stderr != "" {
		t.Fatalf("seamlessctl %v: exit %d, stderr %q", args, res.code, res.stderr)
	}
	return res.stdout
}

// textFields reads the "key  value" lines that commit prints.
func textFields(t *testing.T, out string) map[string]string {
	t.Helper()
	fields := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		k, v, ok := strings.Cut(line, " ")
		if !ok {
			t.Fatalf("commit printed %q", out)
		}
		fields[k] = strings.TrimSpace(v)
	}
	return fields
}

// TestCLI runs the seamlessctl binary against a private containerd and
// daemon: it commits a running writer container by full ID, by ID prefix
// and with JSON output, each capture a point in time of the writer; status
// and list show the commits; refused commands exit with their code and one
// clear line. The container keeps running through all of it.
func TestCLI(t *testing.T) {
	ctx, env, ref := setup(t, seamless, "overlayfs")
	c := client(ctx, t, env)
	cli := newCLIRunner(ctx, t, env)
	id := startWriterContainer(ctx, t, env)
	target := env.Registry.Ref("cli/app")
	assertRunning := func(t *testing.T) {
		t.Helper()
		if st := taskStatus(ctx, t, c, id); st != containerd.Running {
			t.Fatalf("container is %s", st)
		}
	}
	var committed []string

	for _, tc := range []struct{ name, container string }{
		{"by ID", id},
		{"by prefix", id[:len(id)-5]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := cli.ok(ctx, t, "commit", "--container", tc.container, "--target", target+":text", "--pause-budget", writerPauseBudget)
			f := textFields(t, out)
			if f["state"] != string(snapshotter.StatePending) || f["commit"] == "" || f["strategy"] == "" ||
				!strings.HasSuffix(f["pause"], " ms") || !strings.Contains(f["captured"], " entries, ") {
				t.Fatalf("commit printed %q", out)
			}
			checkCapture(t, env, f["commit"])
			committed = append(committed, f["commit"])
			assertRunning(t)
		})
	}

	t.Run("by nerdctl name", func(t *testing.T) {
		named, name := harness.UniqueID("clinamed-"), harness.UniqueID("web-")
		t.Cleanup(func() {
			if err := env.DeleteContainer(context.WithoutCancel(ctx), named); err != nil {
				t.Errorf("removing %s: %v", named, err)
			}
		})
		if _, err := env.Ctr(ctx, "run", "-d", "--snapshotter", seamless, "--label", "nerdctl/name="+name, ref, named, "sleep", "100000"); err != nil {
			t.Fatal(err)
		}
		f := textFields(t, cli.ok(ctx, t, "commit", "--container", name, "--target", target+":named", "--pause-budget", writerPauseBudget))
		var got api.Commit
		if err := json.Unmarshal([]byte(cli.ok(ctx, t, "status", "-o", "json", f["commit"])), &got); err != nil {
			t.Fatal(err)
		}
		// Captured; the image may already be on its way.
		if got.State == snapshotter.StateFailed || got.State == snapshotter.StateCapturing || !strings.HasSuffix(got.SnapshotKey, "/"+named) {
			t.Fatalf("commit of %s recorded %+v", name, got)
		}
	})

	var rec api.Commit
	t.Run("json", func(t *testing.T) {
		// Flags after the subcommand, -o after the others.
		out := cli.ok(ctx, t, "commit", "--target", target+":json", "--container", id, "--pause-budget", "2s", "-o", "json")
		if err := json.Unmarshal([]byte(out), &rec); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		if rec.State != snapshotter.StatePending || !rec.Frozen || rec.PauseMillis <= 0 || rec.Target != target+":json" ||
			!strings.HasSuffix(rec.SnapshotKey, "/"+id) {
			t.Fatalf("commit recorded %+v", rec)
		}
		n := checkCapture(t, env, rec.ID)
		t.Logf("json commit: step %d, pause %.2f ms, strategy %s", n, rec.PauseMillis, rec.Strategy)
		committed = append(committed, rec.ID)
		assertRunning(t)
	})
	if rec.ID == "" {
		t.FailNow()
	}

	t.Run("status", func(t *testing.T) {
		out := cli.ok(ctx, t, "status", rec.ID)
		// One "key  value" row each; the job may have moved on.
		if f := textFields(t, out); f["commit"] != rec.ID || f["state"] == "" || f["state"] == "failed" || f["captured"] == "" {
			t.Fatalf("status printed\n%s", out)
		}
		var got api.Commit
		if err := json.Unmarshal([]byte(cli.ok(ctx, t, "status", "-o", "json", rec.ID)), &got); err != nil || got.ID != rec.ID || got.Pause != rec.Pause {
			t.Fatalf("status -o json: %+v, %v", got, err)
		}
	})

	// Two more containers whose IDs share a prefix, and one on overlayfs.
	dupPrefix := harness.UniqueID("clidup-") + "-"
	dups := []string{dupPrefix + "a", dupPrefix + "b"}
	for _, dup := range dups {
		if err := env.RunDetached(ctx, dup, ref, seamless, "sleep", "100000"); err != nil {
			t.Fatal(err)
		}
	}
	onOverlay := harness.UniqueID("cliovl-")
	if err := env.RunDetached(ctx, onOverlay, ref, "overlayfs", "sleep", "100000"); err != nil {
		t.Fatal(err)
	}

	t.Run("refused", func(t *testing.T) {
		for _, tc := range []struct {
			name   string
			args   []string
			code   int
			stderr []string
		}{
			{"unknown container", []string{"commit", "--container", "nope", "--target", target}, 3, []string{`no container "nope"`}},
			{"ambiguous prefix", []string{"commit", "--container", dupPrefix, "--target", target}, 1, append([]string{"ambiguous"}, dups...)},
			{"overlayfs container", []string{"commit", "--container", onOverlay, "--target", target}, 1, []string{onOverlay, `"overlayfs" snapshotter`}},
			{"missing --target", []string{"commit", "--container", id}, 2, []string{"--target is required"}},
			{"invalid target", []string{"commit", "--container", id, "--target", "Not A Ref"}, 1, []string{"[" + snapshotter.CodeInvalidReference + "]"}},
			{"pause budget exceeded", []string{"commit", "--container", id, "--target", target + ":late", "--pause-budget", "1ns"}, 1, []string{"[" + snapshotter.CodePauseBudgetExceeded + "]"}},
			{"unknown commit", []string{"status", "nope"}, 3, []string{"[COMMIT_NOT_FOUND]"}},
			{"no API socket", []string{"--api-address", "/nonexistent.sock", "commit", "--container", id, "--target", target}, 5, []string{"cannot reach the seamless daemon API at /nonexistent.sock", "no such file or directory"}},
			{"no containerd socket", []string{"-a", "/nonexistent.sock", "commit", "--container", id, "--target", target}, 5, []string{"cannot reach containerd at /nonexistent.sock"}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				res := cli.run(ctx, t, tc.args...)
				if res.code != tc.code {
					t.Errorf("exit %d, want %d", res.code, tc.code)
				}
				if !strings.HasPrefix(res.stderr, "seamlessctl: ") || strings.Count(res.stderr, "\n") != 1 {
					t.Errorf("stderr is not one seamlessctl line: %q", res.stderr)
				}
				for _, s := range tc.stderr {
					if !strings.Contains(res.stderr, s) {
						t.Errorf("stderr %q lacks %q", res.stderr, s)
					}
				}
				if res.stdout != "" {
					t.Errorf("stdout %q", res.stdout)
				}
				assertRunning(t)
				for _, other := range append(dups, onOverlay) {
					if st := taskStatus(ctx, t, c, other); st != containerd.Running {
						t.Errorf("container %s is %s", other, st)
					}
				}
			})
		}
	})

	t.Run("list", func(t *testing.T) {
		out := cli.ok(ctx, t, "list")
		for _, cid := range committed {
			if !strings.Contains(out, cid) {
				t.Errorf("list lacks commit %s:\n%s", cid, out)
			}
		}
		// The converter takes the commits up meanwhile: each is pending,
		// on its way, or done.
		var mine, failed struct{ Commits []api.Commit }
		if err := json.Unmarshal([]byte(cli.ok(ctx, t, "list", "--container", id[:len(id)-5], "-o", "json")), &mine); err != nil {
			t.Fatal(err)
		}
		// Those committed, and the one that failed its 1 ns budget.
		if len(mine.Commits) != len(committed)+1 {
			t.Errorf("list --container <prefix>: %d commits, want %d", len(mine.Commits), len(committed)+1)
		}
		for _, rec := range mine.Commits {
			if rec.State == snapshotter.StateCapturing || (rec.State == snapshotter.StateFailed && rec.ErrorCode != snapshotter.CodePauseBudgetExceeded) {
				t.Errorf("commit %s is %s (%s)", rec.ID, rec.State, rec.Error)
			}
		}
		if err := json.Unmarshal([]byte(cli.ok(ctx, t, "list", "--state", "failed", "-o", "json")), &failed); err != nil {
			t.Fatal(err)
		}
		if len(failed.Commits) != 1 || failed.Commits[0].ErrorCode != snapshotter.CodePauseBudgetExceeded {
			t.Errorf("list --state failed: %+v", failed.Commits)
		}
		if out := cli.ok(ctx, t, "list", "--container", dups[0]); strings.Count(out, "\n") != 1 {
			t.Errorf("list of a container without commits:\n%s", out)
		}
	})

	assertWriterRuns(ctx, t, env, c, id)
}
