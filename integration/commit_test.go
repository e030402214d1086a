//go:build linux

package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/harness"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil/workload"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// apiClient talks HTTP to the daemon's API socket.
type apiClient struct {
	http *http.Client
}

func newAPIClient(env *harness.Env) apiClient {
	sock := filepath.Join(filepath.Dir(env.Daemon.Socket()), "api.sock")
	return apiClient{http: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
	}}}
}

// do sends a request and decodes the answer into out (or an api.Error).
func (c apiClient) do(ctx context.Context, t *testing.T, method, path string, body any, out any) (int, api.Error) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://seamless"+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	var apiErr api.Error
	if resp.StatusCode >= 400 {
		if err := json.Unmarshal(data, &apiErr); err != nil {
			t.Fatalf("%s %s: %d with a body that is not an API error: %s", method, path, resp.StatusCode, data)
		}
		return resp.StatusCode, apiErr
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			t.Fatalf("%s %s: %v: %s", method, path, err, data)
		}
	}
	return resp.StatusCode, apiErr
}

// startWriterContainer runs the point-in-time writer (integration/writer)
// in a container on seamless, from the test image with the writer added,
// and waits until it has taken its first steps.
func startWriterContainer(ctx context.Context, t *testing.T, env *harness.Env) string {
	t.Helper()
	id, _ := startWriterFrom(ctx, t, env, "seamless-test/busybox-writer:latest")
	return id
}

// writerPauseBudget is the pause budget of commits of the writer: it
// creates and deletes about a thousand files between two rounds, all of
// which the copy strategy's frozen round copies (≈ 0.1–0.5 ms each here),
// so the default 500 ms is too tight on a loaded CI machine. Pauses are
// measured by BenchmarkPause; these tests are about consistency.
const writerPauseBudget = "3s"

// writerLog is the writer's log inside its container.
const writerLog = workload.Dir + "/" + workload.LogName

// checkCapture asserts that the capture of a commit is a state the writer
// passed through at one instant, and returns its step.
func checkCapture(t *testing.T, env *harness.Env, commitID string) int {
	t.Helper()
	return testutil.CheckWriterState(t, filepath.Join(env.Daemon.Root(), "captures", commitID, "fs"), workload.Upper)
}

// assertWriterRuns asserts that the writer of container id never saw an
// error: it runs (it exits on its first), has printed nothing (it prints
// only its error), and still takes steps.
func assertWriterRuns(ctx context.Context, t *testing.T, env *harness.Env, c *containerd.Client, id string) {
	t.Helper()
	out, err := env.ContainerLog(id)
	if err != nil {
		t.Fatal(err)
	}
	if st := taskStatus(ctx, t, c, id); st != containerd.Running || out != "" {
		t.Fatalf("the writer is %s and printed %q", st, out)
	}
	assertLogGrows(ctx, t, env, id)
}

// runAndWaitFor starts a container running script and waits until the
// script has created path (its signal that the set-up is done).
func runAndWaitFor(ctx context.Context, t *testing.T, env *harness.Env, id, ref, script, path string) {
	t.Helper()
	if err := env.RunDetached(ctx, id, ref, seamless, "sh", "-c", script); err != nil {
		t.Fatal(err)
	}
	waitForFile(ctx, t, env, id, path)
}

// waitForFile waits until a non-empty file exists in a container.
func waitForFile(ctx context.Context, t *testing.T, env *harness.Env, id, path string) {
	t.Helper()
	if err := harness.WaitFor(ctx, 20*time.Millisecond, func(ctx context.Context) (bool, error) {
		_, err := env.Exec(ctx, id, "test", "-s", path)
		return err == nil, nil
	}); err != nil {
		t.Fatalf("%s never appeared in container %s: %v", path, id, err)
	}
}

func taskStatus(ctx context.Context, t *testing.T, c *containerd.Client, id string) containerd.ProcessStatus {
	t.Helper()
	ctr, err := c.LoadContainer(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	task, err := ctr.Task(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	st, err := task.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return st.Status
}

// TestSeamlessCommit commits a container while it writes, through the
// label (ctr snapshots label) and through the API, and checks that every
// capture is a state the writer passed through, that the container keeps
// running, and that bad requests get clear errors.
func TestSeamlessCommit(t *testing.T) {
	ctx, env, _ := setup(t, seamless)
	c := client(ctx, t, env)
	apic := newAPIClient(env)
	id := startWriterContainer(ctx, t, env)
	target := env.Registry.Ref("committed/app")

	t.Run("label", func(t *testing.T) {
		if _, err := env.Ctr(ctx, "snapshots", "--snapshotter", seamless, "label", id,
			snapshotter.LabelCommit+"="+target+":label", snapshotter.LabelPauseBudget+"="+writerPauseBudget); err != nil {
			t.Fatal(err)
		}
		var list struct{ Commits []api.Commit }
		if err := harness.WaitFor(ctx, 20*time.Millisecond, func(ctx context.Context) (bool, error) {
			apic.do(ctx, t, "GET", "/api/v1/commits?container="+id, nil, &list)
			return len(list.Commits) == 1 && list.Commits[0].State != snapshotter.StateCapturing, nil
		}); err != nil {
			t.Fatalf("no commit after the label: %+v", list)
		}
		rec := list.Commits[0]
		// Captured; its image may already be on the way.
		if rec.State == snapshotter.StateFailed || !rec.Frozen || rec.Target != target+":label" {
			t.Fatalf("label commit recorded %+v", rec)
		}
		n := checkCapture(t, env, rec.ID)
		t.Logf("label commit: step %d, pause %.2f ms, strategy %s", n, rec.PauseMillis, rec.Strategy)
	})

	t.Run("api", func(t *testing.T) {
		last := 0
		for i := range 5 {
			var rec api.Commit
			status, apiErr := apic.do(ctx, t, "POST", "/api/v1/commits", api.CommitRequest{Namespace: "default", Container: id, Target: fmt.Sprintf("%s:v%d", target, i), PauseBudget: writerPauseBudget}, &rec)
			if status != http.StatusCreated {
				t.Fatalf("commit %d: %d %+v", i, status, apiErr)
			}
			if rec.State != snapshotter.StatePending || !rec.Frozen || rec.PauseMillis <= 0 || rec.CapturedAt.IsZero() {
				t.Fatalf("commit %d recorded %+v", i, rec)
			}
			n := checkCapture(t, env, rec.ID)
			if n <= last {
				t.Errorf("commit %d at step %d, not after %d", i, n, last)
			}
			last = n
			t.Logf("api commit %d: step %d, pause %.2f ms, %d pre-copy rounds", i, n, rec.PauseMillis, rec.PreCopyRounds)
			var got api.Commit
			if status, _ := apic.do(ctx, t, "GET", "/api/v1/commits/"+rec.ID, nil, &got); status != 200 || got.ID != rec.ID {
				t.Fatalf("GET commit: %d %+v", status, got)
			}
		}
		assertWriterRuns(ctx, t, env, c, id)
	})

	t.Run("paused by the user stays paused", func(t *testing.T) {
		if _, err := env.Ctr(ctx, "tasks", "pause", id); err != nil {
			t.Fatal(err)
		}
		var rec api.Commit
		if status, apiErr := apic.do(ctx, t, "POST", "/api/v1/commits", api.CommitRequest{Namespace: "default", Container: id, Target: target + ":paused", PauseBudget: writerPauseBudget}, &rec); status != http.StatusCreated {
			t.Fatalf("%d %+v", status, apiErr)
		}
		checkCapture(t, env, rec.ID)
		if st := taskStatus(ctx, t, c, id); st != containerd.Paused {
			t.Fatalf("a container the user paused is %s after a commit", st)
		}
		if _, err := env.Ctr(ctx, "tasks", "resume", id); err != nil {
			t.Fatal(err)
		}
		assertWriterRuns(ctx, t, env, c, id)
	})

	t.Run("bad requests", func(t *testing.T) {
		for _, tc := range []struct {
			name   string
			req    api.CommitRequest
			status int
			code   string
		}{
			{"unknown container", api.CommitRequest{Namespace: "default", Container: "nope", Target: target}, 404, "CONTAINER_NOT_FOUND"},
			{"wrong namespace", api.CommitRequest{Namespace: "k8s.io", Container: id, Target: target}, 404, "CONTAINER_NOT_FOUND"},
			{"invalid reference", api.CommitRequest{Namespace: "default", Container: id, Target: "Not A Ref"}, 400, snapshotter.CodeInvalidReference},
			{"compression level out of range", api.CommitRequest{Namespace: "default", Container: id, Target: target, Compression: "gzip", CompressionLevel: 12}, 400, snapshotter.CodeInvalidOption},
			{"committed layer", api.CommitRequest{SnapshotKey: "nope/1/x", Target: target}, 404, snapshotter.CodeSnapshotNotFound},
			{"pause budget exceeded", api.CommitRequest{Namespace: "default", Container: id, Target: target, PauseBudget: "1ns"}, 503, snapshotter.CodePauseBudgetExceeded},
		} {
			t.Run(tc.name, func(t *testing.T) {
				status, apiErr := apic.do(ctx, t, "POST", "/api/v1/commits", tc.req, nil)
				if status != tc.status || apiErr.Error.Code != tc.code {
					t.Fatalf("got %d %+v, want %d %s", status, apiErr, tc.status, tc.code)
				}
				if st := taskStatus(ctx, t, c, id); st != containerd.Running {
					t.Fatalf("container is %s after a refused commit", st)
				}
			})
		}
		// A bad label fails the label command, and is not stored.
		out, err := env.Ctr(ctx, "snapshots", "--snapshotter", seamless, "label", id, snapshotter.LabelCommit+"=Not A Ref")
		if err == nil || !strings.Contains(err.Error(), "not a valid image reference") {
			t.Fatalf("bad label accepted: %s %v", out, err)
		}
	})

	t.Run("metrics", func(t *testing.T) {
		resp, err := apic.http.Get("http://seamless/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		for _, want := range []string{"seamless_commit_pause_seconds_bucket", `outcome="captured"`, `outcome="PAUSE_BUDGET_EXCEEDED"`} {
			if !bytes.Contains(body, []byte(want)) {
				t.Errorf("metrics lack %s", want)
			}
		}
	})
}

func assertLogGrows(ctx context.Context, t *testing.T, env *harness.Env, id string) {
	t.Helper()
	size := func() string {
		out, err := env.Exec(ctx, id, "wc", "-l", writerLog)
		if err != nil {
			t.Fatal(err)
		}
		return strings.Fields(out)[0]
	}
	first := size()
	if err := harness.WaitFor(ctx, 20*time.Millisecond, func(context.Context) (bool, error) {
		return size() != first, nil
	}); err != nil {
		t.Fatalf("the container stopped writing: %v", err)
	}
}

// TestCommitStrategies: the daemon's root on ext4, xfs with reflink and
// btrfs picks its capture strategy from the filesystem; on each, 20
// commits in a row of a container running the point-in-time writer
// (numbered files created, overwritten and deleted, base files of the
// image appended to, deleted and re-created, a shared writable mmap, a
// log; no fsync, no pause) are each a state the writer passed through at
// one instant, and the writer never sees an error.
func TestCommitStrategies(t *testing.T) {
	for _, tc := range []struct {
		fstype   string
		size     int64
		mkfsArgs []string
		strategy string
	}{
		// Twenty captures of about a thousand files each, on top of the
		// container's own: more inodes than mkfs.ext4 gives 512 MiB.
		{"ext4", 512 << 20, []string{"-N", "131072"}, "copy"},
		{"xfs", 512 << 20, nil, "reflink"},
		{"btrfs", 512 << 20, nil, "btrfs"},
	} {
		t.Run(tc.fstype, func(t *testing.T) {
			harness.Require(t)
			root := testutil.LoopFS(t, tc.fstype, tc.size, tc.mkfsArgs...)
			ctx, env, _ := setupWith(t, harness.Options{Daemon: harness.DaemonOptions{Root: filepath.Join(root, "seamless")}}, seamless)
			c := client(ctx, t, env)
			apic := newAPIClient(env)
			id := startWriterContainer(ctx, t, env)
			target := env.Registry.Ref("strategy/" + tc.fstype)
			var checker workload.Checker
			last := 0
			var pauses []float64
			var steps []int
			for i := range 20 {
				var rec api.Commit
				status, apiErr := apic.do(ctx, t, "POST", "/api/v1/commits", api.CommitRequest{Namespace: "default", Container: id, Target: fmt.Sprintf("%s:%d", target, i), PauseBudget: writerPauseBudget}, &rec)
				if status != http.StatusCreated {
					t.Fatalf("commit %d: %d %+v", i, status, apiErr)
				}
				if rec.Strategy != tc.strategy || !rec.Frozen {
					t.Fatalf("commit %d: strategy %q frozen %v, want %s", i, rec.Strategy, rec.Frozen, tc.strategy)
				}
				capture := filepath.Join(env.Daemon.Root(), "captures", rec.ID, "fs")
				n, err := checker.Verify(capture, workload.Upper)
				if err != nil {
					t.Fatalf("commit %d (%s, pause %.2f ms): %v", i, rec.ID, rec.PauseMillis, err)
				}
				if n <= last {
					t.Fatalf("commit %d at step %d, not after %d", i, n, last)
				}
				last = n
				pauses = append(pauses, rec.PauseMillis)
				steps = append(steps, n)
			}
			t.Logf("%s/%s: 20 commits at steps %v, pauses (ms) %v", tc.fstype, tc.strategy, steps, pauses)
			assertWriterRuns(ctx, t, env, c, id)
		})
	}
}

// TestConcurrentCommits: while one commit of a container is capturing, a
// second is refused with COMMIT_IN_PROGRESS; the first completes.
func TestConcurrentCommits(t *testing.T) {
	ctx, env, ref := setup(t, seamless)
	apic := newAPIClient(env)
	id := harness.UniqueID("twice-")
	// A large file keeps the first capture busy long enough to overlap.
	runAndWaitFor(ctx, t, env, id, ref, "dd if=/dev/zero of=/big bs=1M count=512 2>/dev/null; echo ok > /ready; sleep 100000", "/ready")
	type result struct {
		status int
		rec    api.Commit
		err    api.Error
	}
	first := make(chan result, 1)
	go func() {
		var r result
		r.status, r.err = apic.do(ctx, t, "POST", "/api/v1/commits", api.CommitRequest{Namespace: "default", Container: id, Target: "twice/app:1"}, &r.rec)
		first <- r
	}()
	captures := filepath.Join(env.Daemon.Root(), "captures")
	if err := harness.WaitFor(ctx, time.Millisecond, func(context.Context) (bool, error) {
		entries, _ := os.ReadDir(captures)
		return len(entries) > 0, nil
	}); err != nil {
		t.Fatal(err)
	}
	status, apiErr := apic.do(ctx, t, "POST", "/api/v1/commits", api.CommitRequest{Namespace: "default", Container: id, Target: "twice/app:2"}, nil)
	if status != http.StatusConflict || apiErr.Error.Code != snapshotter.CodeCommitInProgress {
		t.Fatalf("second commit: %d %+v, want 409 %s", status, apiErr, snapshotter.CodeCommitInProgress)
	}
	r := <-first
	if r.status != http.StatusCreated || r.rec.State != snapshotter.StatePending {
		t.Fatalf("first commit: %d %+v %+v", r.status, r.rec, r.err)
	}
	if _, err := env.Exec(ctx, id, "true"); err != nil {
		t.Fatalf("container not running: %v", err)
	}
}
