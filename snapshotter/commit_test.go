//go:build linux

package snapshotter

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"

	"github.com/seamless-snapshotter/seamless-snapshotter/config"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil/workload"
	"github.com/seamless-snapshotter/seamless-snapshotter/overlay"
	"github.com/seamless-snapshotter/seamless-snapshotter/overlay/capture"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter/freeze"
)

func TestCommitRequestFromLabels(t *testing.T) {
	for _, tc := range []struct {
		name          string
		before, after map[string]string
		fieldpaths    []string
		want          CommitRequest
		ok            bool
		code          string
	}{
		{name: "no label", after: map[string]string{"a": "b"}, fieldpaths: []string{"labels.a"}},
		{name: "label set by name", after: map[string]string{LabelCommit: "reg/app:v1"}, fieldpaths: []string{"labels." + LabelCommit},
			want: CommitRequest{Key: "k", Target: "reg/app:v1"}, ok: true},
		{name: "same label again, named", before: map[string]string{LabelCommit: "reg/app:v1"}, after: map[string]string{LabelCommit: "reg/app:v1"},
			fieldpaths: []string{"labels." + LabelCommit}, want: CommitRequest{Key: "k", Target: "reg/app:v1"}, ok: true},
		{name: "other label updated, commit label untouched", before: map[string]string{LabelCommit: "reg/app:v1"},
			after: map[string]string{LabelCommit: "reg/app:v1", "x": "y"}, fieldpaths: []string{"labels.x"}},
		{name: "all labels replaced", after: map[string]string{LabelCommit: "reg/app:v2"},
			want: CommitRequest{Key: "k", Target: "reg/app:v2"}, ok: true},
		{name: "cleared", before: map[string]string{LabelCommit: "reg/app:v1"}, after: map[string]string{}, fieldpaths: []string{"labels." + LabelCommit}},
		{name: "with pause budget", after: map[string]string{LabelCommit: "reg/app", LabelPauseBudget: "80ms"}, fieldpaths: []string{"labels." + LabelCommit},
			want: CommitRequest{Key: "k", Target: "reg/app", PauseBudget: 80 * time.Millisecond}, ok: true},
		{name: "bad pause budget", after: map[string]string{LabelCommit: "reg/app", LabelPauseBudget: "soon"}, fieldpaths: []string{"labels." + LabelCommit}, code: CodeInvalidOption},
		{name: "unknown option label", after: map[string]string{LabelCommit: "reg/app", labelPrefix + "sqush": "1"}, fieldpaths: []string{"labels." + LabelCommit}, code: CodeInvalidOption},
		{name: "conversion options", after: map[string]string{LabelCommit: "reg/app", LabelCompression: "zstd", LabelLocal: "true", LabelSquash: "1"},
			fieldpaths: []string{"labels." + LabelCommit},
			want:       CommitRequest{Key: "k", Target: "reg/app", Compression: "zstd", Local: true, Squash: true}, ok: true},
		{name: "bad local", after: map[string]string{LabelCommit: "reg/app", LabelLocal: "yes please"}, fieldpaths: []string{"labels." + LabelCommit}, code: CodeInvalidOption},
		{name: "compression level", after: map[string]string{LabelCommit: "reg/app", LabelCompression: "zstd", LabelCompressionLevel: "19"},
			fieldpaths: []string{"labels." + LabelCommit},
			want:       CommitRequest{Key: "k", Target: "reg/app", Compression: "zstd", CompressionLevel: 19}, ok: true},
		{name: "bad compression level", after: map[string]string{LabelCommit: "reg/app", LabelCompressionLevel: "max"}, fieldpaths: []string{"labels." + LabelCommit}, code: CodeInvalidOption},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok, err := commitRequestFromLabels("k", tc.before, tc.after, tc.fieldpaths)
			if tc.code != "" {
				if ErrorCode(err) != tc.code || !errdefs.IsInvalidArgument(err) {
					t.Fatalf("got %v (code %q), want code %s", err, ErrorCode(err), tc.code)
				}
				return
			}
			if err != nil || ok != tc.ok || got != tc.want {
				t.Fatalf("got %+v %v %v, want %+v %v", got, ok, err, tc.want, tc.ok)
			}
		})
	}
}

// newCommitFixture opens a snapshotter with a committed base layer holding
// static busybox, the point-in-time writer (integration/writer) and the
// base files it works on (workload.Base), and an active snapshot on it,
// mounted.
func newCommitFixture(t *testing.T, opts ...Option) (*Snapshotter, string, string) {
	t.Helper()
	testutil.RequireRoot(t)
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		testutil.SkipOrFail(t, "static busybox (Debian busybox-static) is needed: %v", err)
	}
	ctx := context.Background()
	sn, root := openTest(t, opts...)
	mounts, err := sn.Prepare(ctx, "base-active", "")
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(mounts[0].Source, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(busybox)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bin, "busybox"), data, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("busybox", filepath.Join(bin, "sh")); err != nil {
		t.Fatal(err)
	}
	// The writer's base files are in the base layer so that deleting
	// them makes whiteouts in the container's upper dir.
	writer, err := os.ReadFile(testutil.BuildStatic(t, testutil.WriterPackage))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bin, "writer"), writer, 0o755); err != nil {
		t.Fatal(err)
	}
	wdir := filepath.Join(mounts[0].Source, workload.Dir)
	if err := os.Mkdir(wdir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, b := range workload.Base() {
		if err := os.WriteFile(filepath.Join(wdir, b.Name), b.Data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := sn.Commit(ctx, "base", "base-active"); err != nil {
		t.Fatal(err)
	}
	const key = "default/7/container"
	mounts, err = sn.Prepare(ctx, key, "base")
	if err != nil {
		t.Fatal(err)
	}
	mnt := t.TempDir()
	if err := mount.All(mounts, mnt); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mount.UnmountAll(mnt, syscall.MNT_DETACH) })
	_ = root
	return sn, key, mnt
}

// hostWriter is the point-in-time writer running on the host, chrooted
// into a snapshot's mount.
type hostWriter struct {
	pid    int
	cgroup string
	stderr string // file the writer reports an error to
}

// startWriter runs the point-in-time writer, chrooted into the snapshot's
// mount and in a cgroup of its own (as a container would be), and waits
// until it has taken its first steps.
func startWriter(t *testing.T, mnt string) hostWriter {
	t.Helper()
	freezerRoot := "/sys/fs/cgroup/freezer"
	if _, err := os.Stat(filepath.Join(freezerRoot, "freezer.state")); err != nil {
		if _, err := os.Stat(freezerRoot); err != nil {
			testutil.SkipOrFail(t, "this test needs the cgroup v1 freezer: %v", err)
		}
	}
	b := make([]byte, 6)
	rand.Read(b)
	w := hostWriter{
		cgroup: filepath.Join(freezerRoot, "seamless-commit-test-"+hex.EncodeToString(b)),
		stderr: filepath.Join(t.TempDir(), "writer.stderr"),
	}
	if err := os.Mkdir(w.cgroup, 0o755); err != nil {
		t.Fatal(err)
	}
	stderr, err := os.Create(w.stderr)
	if err != nil {
		t.Fatal(err)
	}
	defer stderr.Close()
	cmd := exec.Command("/bin/writer", "-dir", workload.Dir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: mnt}
	cmd.Dir = "/"
	// A file, not a buffer: the writer writes it directly, and a test can
	// read it at any time without racing a copying goroutine.
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.pid = cmd.Process.Pid
	t.Cleanup(func() {
		os.WriteFile(filepath.Join(w.cgroup, "freezer.state"), []byte("THAWED"), 0)
		cmd.Process.Kill()
		cmd.Wait()
		for i := 0; i < 50; i++ {
			if err := os.Remove(w.cgroup); err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Errorf("cgroup %s left behind", w.cgroup)
	})
	if err := os.WriteFile(filepath.Join(w.cgroup, "cgroup.procs"), []byte(strconv.Itoa(w.pid)), 0); err != nil {
		t.Fatal(err)
	}
	log := filepath.Join(mnt, workload.Dir, workload.LogName)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if fi, err := os.Stat(log); err == nil && fi.Size() > 0 {
			break
		}
		if time.Now().After(deadline) {
			msg, _ := os.ReadFile(w.stderr)
			t.Fatalf("the writer did not start: %s", msg)
		}
	}
	return w
}

// assertRuns asserts that the writer never saw an error: it has not
// exited (it does on its first) and has reported nothing.
func (w hostWriter) assertRuns(t *testing.T) {
	t.Helper()
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", w.pid))
	// The state follows the parenthesised command name; Z: exited.
	if i := bytes.LastIndexByte(stat, ')'); err != nil || i < 0 || i+2 >= len(stat) || stat[i+2] == 'Z' {
		msg, _ := os.ReadFile(w.stderr)
		t.Fatalf("the writer exited (%v): %s", err, msg)
	}
	if msg, err := os.ReadFile(w.stderr); err != nil || len(msg) > 0 {
		t.Fatalf("the writer reported: %s %v", msg, err)
	}
}

func TestCaptureWhileWriting(t *testing.T) {
	ctx := context.Background()
	sn, key, mnt := newCommitFixture(t)
	// A file the writer leaves alone, beside the ones it keeps changing.
	if err := os.WriteFile(filepath.Join(mnt, "untouched"), []byte("same in every capture"), 0o644); err != nil {
		t.Fatal(err)
	}
	w := startWriter(t, mnt)

	last := 0
	var captures []string
	var steps []int
	for i := 1; i <= 5; i++ {
		rec, err := sn.Capture(ctx, CommitRequest{Key: key, Target: "registry.test/app:v" + strconv.Itoa(i)})
		if err != nil {
			t.Fatalf("commit %d: %v", i, err)
		}
		if rec.State != StatePending || rec.Generation != uint64(i) || !rec.Frozen || rec.Pause <= 0 {
			t.Fatalf("commit %d recorded %+v", i, rec)
		}
		if rec.Target != "registry.test/app:v"+strconv.Itoa(i) {
			t.Errorf("target %q", rec.Target)
		}
		n := testutil.CheckWriterState(t, sn.layout.CaptureUpper(rec.ID), workload.Upper)
		if n <= last {
			t.Errorf("commit %d captured step %d, not after the previous capture's %d", i, n, last)
		}
		last = n
		t.Logf("commit %d: step %d, pause %v, %d pre-copy rounds, strategy %s", i, n, rec.Pause, rec.PreCopyRounds, rec.Strategy)
		captures, steps = append(captures, sn.layout.CaptureUpper(rec.ID)), append(steps, n)
		// Seeded from the previous capture: what the writer left alone
		// since is the same file in both.
		if i > 1 && sharedInodes(t, captures[i-2], captures[i-1]) == 0 {
			t.Errorf("commit %d shares no file with the previous capture", i)
		}
		got, err := sn.GetCommit(ctx, rec.ID)
		if err != nil || got.State != StatePending {
			t.Fatalf("GetCommit: %+v %v", got, err)
		}
	}
	// Later captures, which started from the earlier ones, changed none
	// of them.
	for i, dir := range captures {
		if n := testutil.CheckWriterState(t, dir, workload.Upper); n != steps[i] {
			t.Errorf("capture %d now holds step %d, it captured %d", i+1, n, steps[i])
		}
	}
	// The writer runs on, thawed, and never saw an error.
	st, err := (freeze.Cgroup{Path: w.cgroup, Version: freeze.V1}).State()
	if err != nil || st != freeze.StateThawed {
		t.Fatalf("cgroup state %v %v after the commits", st, err)
	}
	w.assertRuns(t)
	all, err := sn.ListCommits(ctx)
	if err != nil || len(all) != 5 {
		t.Fatalf("ListCommits: %d records, %v", len(all), err)
	}
}

// sharedInodes counts the regular files of b that are hard links to files
// of a.
func sharedInodes(t *testing.T, a, b string) int {
	t.Helper()
	inos := map[uint64]bool{}
	walk := func(dir string, fn func(ino uint64)) {
		err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() {
				return err
			}
			fi, err := d.Info()
			if err != nil {
				return err
			}
			fn(fi.Sys().(*syscall.Stat_t).Ino)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	walk(a, func(ino uint64) { inos[ino] = true })
	n := 0
	walk(b, func(ino uint64) {
		if inos[ino] {
			n++
		}
	})
	return n
}

func TestCaptureLeavesAUserPausedContainerPaused(t *testing.T) {
	ctx := context.Background()
	sn, key, mnt := newCommitFixture(t)
	w := startWriter(t, mnt)
	cg := freeze.Cgroup{Path: w.cgroup, Version: freeze.V1}
	if err := os.WriteFile(filepath.Join(w.cgroup, "freezer.state"), []byte("FROZEN"), 0); err != nil {
		t.Fatal(err)
	}
	for st, _ := cg.State(); st != freeze.StateFrozen; st, _ = cg.State() {
		time.Sleep(time.Millisecond)
	}
	rec, err := sn.Capture(ctx, CommitRequest{Key: key, Target: "registry.test/app:paused"})
	if err != nil {
		t.Fatal(err)
	}
	testutil.CheckWriterState(t, sn.layout.CaptureUpper(rec.ID), workload.Upper)
	if st, err := cg.State(); err != nil || st != freeze.StateFrozen {
		t.Fatalf("a container the user paused was thawed: %v %v", st, err)
	}
}

func TestCaptureWithoutProcesses(t *testing.T) {
	ctx := context.Background()
	sn, key, mnt := newCommitFixture(t)
	if err := os.WriteFile(filepath.Join(mnt, "hello"), []byte("world"), 0o600); err != nil {
		t.Fatal(err)
	}
	rec, err := sn.Capture(ctx, CommitRequest{Key: key, Target: "app"})
	if err != nil {
		t.Fatal(err)
	}
	if rec.Frozen || rec.Pause != 0 || rec.Target != "docker.io/library/app:latest" {
		t.Fatalf("recorded %+v", rec)
	}
	if data, err := os.ReadFile(filepath.Join(sn.layout.CaptureUpper(rec.ID), "hello")); err != nil || string(data) != "world" {
		t.Fatalf("capture holds %q, %v", data, err)
	}
	// Removing the snapshot (the container) keeps the commit.
	if err := sn.Remove(ctx, key); err != nil {
		t.Fatal(err)
	}
	if err := sn.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(sn.layout.CaptureUpper(rec.ID), "hello")); err != nil {
		t.Fatalf("capture lost with its snapshot: %v", err)
	}
	if _, err := sn.GetCommit(ctx, rec.ID); err != nil {
		t.Fatal(err)
	}
}

// TestSeedKeepsWatches: between two commits of a container, its latest
// capture keeps watching the layer, so that the next capture starts from
// what changed since; the watches kept stay within the host-wide budget,
// and go with the container.
func TestSeedKeepsWatches(t *testing.T) {
	ctx := context.Background()
	sn, key, mnt := newCommitFixture(t)
	write := func(name, data string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(filepath.Join(mnt, name)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(mnt, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	latest := func() *capture.Copier {
		t.Helper()
		sn.capturingMu.Lock()
		defer sn.capturingMu.Unlock()
		if len(sn.seeds) != 1 {
			t.Fatalf("%d seeds, want the container's", len(sn.seeds))
		}
		for _, s := range sn.seeds {
			return s.copier
		}
		return nil
	}
	commit := func(name, want string) *capture.Copier {
		t.Helper()
		rec, err := sn.Capture(ctx, CommitRequest{Key: key, Target: "app"})
		if err != nil {
			t.Fatal(err)
		}
		if data, err := os.ReadFile(filepath.Join(sn.layout.CaptureUpper(rec.ID), name)); err != nil || string(data) != want {
			t.Fatalf("capture holds %s = %q, %v; want %q", name, data, err, want)
		}
		return latest()
	}

	write("a/one", "1")
	write("b/two", "2")
	first := commit("a/one", "1")
	if first.Watching() == 0 {
		t.Fatal("the latest capture watches nothing between commits")
	}
	write("a/one", "changed")
	second := commit("a/one", "changed")
	if second == first || second.Watching() == 0 || first.Watching() != 0 {
		t.Fatalf("watches after the second commit: %d (latest), %d (previous); want all with the latest", second.Watching(), first.Watching())
	}

	// Over the budget: no watch is kept, and the next capture still
	// holds every change (it examines every entry).
	sn.seedWatches = 1
	write("b/two", "changed")
	if c := commit("b/two", "changed"); c.Watching() != 0 {
		t.Fatalf("%d watches kept over a budget of 1", c.Watching())
	}
	write("a/one", "again")
	commit("a/one", "again")

	sn.seedWatches = capture.WatchLimit()
	write("b/two", "again")
	kept := commit("b/two", "again")
	if kept.Watching() == 0 {
		t.Fatal("no watch kept within the budget")
	}
	if err := sn.Remove(ctx, key); err != nil {
		t.Fatal(err)
	}
	if n := kept.Watching(); n != 0 {
		t.Fatalf("%d watches kept after the container's snapshot was removed", n)
	}
}

func TestCaptureBadRequests(t *testing.T) {
	ctx := context.Background()
	sn, key, _ := newCommitFixture(t)
	if _, err := sn.View(ctx, "a-view", "base"); err != nil {
		t.Fatal(err)
	}
	res, err := sn.reserve(mustID(t, sn, key), "other-commit")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		req   CommitRequest
		code  string
		class func(error) bool
	}{
		{"unknown snapshot", CommitRequest{Key: "nope", Target: "app"}, CodeSnapshotNotFound, errdefs.IsNotFound},
		{"view", CommitRequest{Key: "a-view", Target: "app"}, CodeNotActive, errdefs.IsFailedPrecondition},
		{"committed", CommitRequest{Key: "base", Target: "app"}, CodeNotActive, errdefs.IsFailedPrecondition},
		{"invalid reference", CommitRequest{Key: key, Target: "UPPER/Case:tag"}, CodeInvalidReference, errdefs.IsInvalidArgument},
		{"empty reference", CommitRequest{Key: key}, CodeInvalidReference, errdefs.IsInvalidArgument},
		{"negative budget", CommitRequest{Key: key, Target: "app", PauseBudget: -time.Second}, CodeInvalidOption, errdefs.IsInvalidArgument},
		{"gzip level out of range", CommitRequest{Key: key, Target: "app", Compression: "gzip", CompressionLevel: 12}, CodeInvalidOption, errdefs.IsInvalidArgument},
		{"commit in progress", CommitRequest{Key: key, Target: "app"}, CodeCommitInProgress, errdefs.IsConflict},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := sn.Capture(ctx, tc.req)
			if ErrorCode(err) != tc.code || !tc.class(err) {
				t.Fatalf("got %v (code %q), want %s", err, ErrorCode(err), tc.code)
			}
			entries, _ := os.ReadDir(sn.layout.CapturesDir())
			if len(entries) != 0 {
				t.Errorf("a refused request left %v in the captures", entries)
			}
		})
	}
	res.release()
	if all, _ := sn.ListCommits(ctx); len(all) != 0 {
		t.Errorf("refused requests recorded commits: %+v", all)
	}
}

func mustID(t *testing.T, sn *Snapshotter, key string) string {
	t.Helper()
	var id string
	if err := withTransaction(context.Background(), sn.ms, false, func(ctx context.Context, _ *bolt.Tx) (err error) {
		id, _, err = checkCommittable(ctx, key)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return id
}

func TestCaptureOverPauseBudget(t *testing.T) {
	ctx := context.Background()
	sn, key, mnt := newCommitFixture(t)
	cgroup := startWriter(t, mnt).cgroup
	// A budget no freeze can meet.
	rec, err := sn.Capture(ctx, CommitRequest{Key: key, Target: "app", PauseBudget: time.Nanosecond})
	if ErrorCode(err) != CodePauseBudgetExceeded {
		t.Fatalf("got %v, want %s", err, CodePauseBudgetExceeded)
	}
	if rec.State != StateFailed {
		t.Errorf("record %+v", rec)
	}
	got, err := sn.GetCommit(ctx, rec.ID)
	if err != nil || got.State != StateFailed || got.ErrorCode != CodePauseBudgetExceeded {
		t.Fatalf("stored %+v %v", got, err)
	}
	if st, _ := (freeze.Cgroup{Path: cgroup, Version: freeze.V1}).State(); st != freeze.StateThawed {
		t.Fatalf("container left %v", st)
	}
	if entries, _ := os.ReadDir(sn.layout.CapturesDir()); len(entries) != 0 {
		t.Errorf("failed capture left %v", entries)
	}
}

// TestUpdateLabelTriggersCommit: the label path validates in Update and
// captures in the background.
func TestUpdateLabelTriggersCommit(t *testing.T) {
	ctx := context.Background()
	sn, key, mnt := newCommitFixture(t)
	if err := os.WriteFile(filepath.Join(mnt, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	// Invalid requests fail the Update, and the label is not stored.
	_, err := sn.Update(ctx, snapshots.Info{Name: key, Labels: map[string]string{LabelCommit: "Bad Ref"}}, "labels."+LabelCommit)
	if !errdefs.IsInvalidArgument(err) {
		t.Fatalf("got %v", err)
	}
	if info, _ := sn.Stat(ctx, key); info.Labels[LabelCommit] != "" {
		t.Fatalf("invalid label stored: %v", info.Labels)
	}
	if _, err := sn.Update(ctx, snapshots.Info{Name: "base", Labels: map[string]string{LabelCommit: "app"}}, "labels."+LabelCommit); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("label on a committed snapshot: got %v", err)
	}

	if _, err := sn.Update(ctx, snapshots.Info{Name: key, Labels: map[string]string{LabelCommit: "registry.test/app:label"}}, "labels."+LabelCommit); err != nil {
		t.Fatal(err)
	}
	var rec Commit
	deadline := time.Now().Add(10 * time.Second)
	for {
		all, err := sn.ListCommits(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(all) == 1 && all[0].State != StateCapturing {
			rec = all[0]
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no commit recorded: %+v", all)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if rec.State != StatePending || rec.Target != "registry.test/app:label" || rec.SnapshotKey != key {
		t.Fatalf("recorded %+v", rec)
	}
}

// TestRecoveryThawsAndCleans simulates a daemon killed while a container
// was frozen for a capture: the next start thaws it, marks the commit
// failed and removes the half-made capture.
func TestRecoveryThawsAndCleans(t *testing.T) {
	ctx := context.Background()
	sn, key, mnt := newCommitFixture(t)
	cgroup := startWriter(t, mnt).cgroup
	cg := freeze.Cgroup{Path: cgroup, Version: freeze.V1}
	root := sn.layout.Root()

	// What a crash in the middle of freezeAndCapture leaves behind.
	rec := Commit{ID: newCommitID(), SnapshotKey: key, SnapshotID: mustID(t, sn, key), Target: "app", State: StateCapturing}
	if err := withTransaction(ctx, sn.ms, true, func(_ context.Context, tx *bolt.Tx) error {
		if err := putCommit(tx, rec); err != nil {
			return err
		}
		return putFreezeIntent(tx, rec.ID, []string{cgroup})
	}); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(sn.layout.CaptureTemp(rec.ID), "half"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(cgroup, "freezer.state"), []byte("FROZEN"), 0); err != nil {
		t.Fatal(err)
	}
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}

	sn2, err := New(ctx, root, WithCommitConfig(config.DefaultCommit()))
	if err != nil {
		t.Fatal(err)
	}
	defer sn2.Close()
	if st, err := cg.State(); err != nil || st != freeze.StateThawed {
		t.Fatalf("container still %v after restart (%v)", st, err)
	}
	got, err := sn2.GetCommit(ctx, rec.ID)
	if err != nil || got.State != StateFailed || got.ErrorCode != CodeInterrupted {
		t.Fatalf("interrupted commit recorded as %+v (%v)", got, err)
	}
	if entries, _ := os.ReadDir(sn2.layout.CapturesDir()); len(entries) != 0 {
		t.Fatalf("half-made capture left: %v", entries)
	}
	// And a new commit works.
	if _, err := sn2.Capture(ctx, CommitRequest{Key: key, Target: "app"}); err != nil {
		t.Fatal(err)
	}
}

// TestRecoveryAfterReboot: a capture is flushed to disk in the background
// after the commit answers. After a host restart (another boot ID), the
// captures that were not flushed are not trusted: a pending job fails
// with CAPTURE_LOST, a published commit's capture is released (it is no
// longer a base for the next incremental layer); flushed captures, and
// records from before boot IDs were kept, are left alone.
func TestRecoveryAfterReboot(t *testing.T) {
	ctx := context.Background()
	sn, key, mnt := newCommitFixture(t)
	if err := os.WriteFile(filepath.Join(mnt, "hello"), []byte("world"), 0o600); err != nil {
		t.Fatal(err)
	}
	first, err := sn.Capture(ctx, CommitRequest{Key: key, Target: "app:1"})
	if err != nil {
		t.Fatal(err)
	}
	if first.BootID == "" || first.BootID != sn.bootID {
		t.Fatalf("capture recorded boot %q, the snapshotter runs in %q", first.BootID, sn.bootID)
	}
	// The background flush records itself.
	deadline := time.Now().Add(30 * time.Second)
	for {
		got, err := sn.GetCommit(ctx, first.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got.CaptureSynced {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the capture was never recorded as flushed to disk")
		}
		time.Sleep(10 * time.Millisecond)
	}

	// Records as a host crash leaves them: unflushed captures, one of
	// them already published.
	tests := []struct {
		name        string
		state       CommitState
		boot        string
		synced      bool
		wantState   CommitState
		wantCode    string
		wantCapture bool
	}{
		{"pending, not flushed", StatePending, sn.bootID, false, StateFailed, CodeCaptureLost, false},
		{"converting, not flushed", StateConverting, sn.bootID, false, StateFailed, CodeCaptureLost, false},
		{"published, not flushed", StateDone, sn.bootID, false, StateDone, "", false},
		{"pending, flushed", StatePending, sn.bootID, true, StatePending, "", true},
		{"pending, from before boot IDs", StatePending, "", false, StatePending, "", true},
	}
	ids := make([]string, len(tests))
	for i, tc := range tests {
		rec := Commit{ID: newCommitID(), SnapshotKey: key, SnapshotID: mustID(t, sn, key), Target: "app", State: tc.state, BootID: tc.boot, CaptureSynced: tc.synced}
		ids[i] = rec.ID
		if err := withTransaction(ctx, sn.ms, true, func(_ context.Context, tx *bolt.Tx) error { return putCommit(tx, rec) }); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(sn.layout.CaptureUpper(rec.ID), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	root := sn.layout.Root()
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}

	sn2, err := New(ctx, root, WithCommitConfig(config.DefaultCommit()), WithBootID("the next boot"))
	if err != nil {
		t.Fatal(err)
	}
	defer sn2.Close()
	for i, tc := range tests {
		got, err := sn2.GetCommit(ctx, ids[i])
		if err != nil {
			t.Fatal(err)
		}
		if got.State != tc.wantState || got.ErrorCode != tc.wantCode || got.CaptureRemoved == tc.wantCapture {
			t.Errorf("%s: recovered as %s (%s: %s), capture removed %v", tc.name, got.State, got.ErrorCode, got.Error, got.CaptureRemoved)
		}
		if _, err := os.Stat(sn2.layout.CaptureDir(ids[i])); (err == nil) != tc.wantCapture {
			t.Errorf("%s: capture on disk: %v, want %v", tc.name, err == nil, tc.wantCapture)
		}
	}
	// The flushed capture survives, with its data.
	if data, err := os.ReadFile(filepath.Join(sn2.layout.CaptureUpper(first.ID), "hello")); err != nil || string(data) != "world" {
		t.Fatalf("flushed capture holds %q, %v", data, err)
	}
}

// openOnLoop opens a snapshotter on a new loop-mounted filesystem of the
// given type and size, prepares the active snapshot key on it, and returns
// the snapshotter (closed when the test ends) and the snapshot's upper
// directory.
func openOnLoop(t *testing.T, fstype string, size int64, key string) (*Snapshotter, string) {
	t.Helper()
	testutil.RequireRoot(t)
	ctx := context.Background()
	sn, err := New(ctx, filepath.Join(testutil.LoopFS(t, fstype, size), "seamless"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sn.Close() })
	mounts, err := sn.Prepare(ctx, key, "")
	if err != nil {
		t.Fatal(err)
	}
	return sn, mounts[0].Source
}

// TestCaptureDiskFull: a capture that runs out of space fails with a
// clear error, leaves nothing behind, and the container's layer is
// untouched.
func TestCaptureDiskFull(t *testing.T) {
	ctx := context.Background()
	sn, upper := openOnLoop(t, "ext4", 64<<20, "default/1/full")
	// 40 MiB of data fits once on a 64 MiB filesystem, not twice.
	data := make([]byte, 40<<20)
	for i := range data {
		data[i] = byte(i)
	}
	if err := os.WriteFile(filepath.Join(upper, "big"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	rec, err := sn.Capture(ctx, CommitRequest{Key: "default/1/full", Target: "app"})
	if err == nil || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("got %v, want an error wrapping ENOSPC", err)
	}
	t.Logf("the user sees: %v", err)
	got, gerr := sn.GetCommit(ctx, rec.ID)
	if gerr != nil || got.State != StateFailed || got.ErrorCode != CodeCaptureFailed || !strings.Contains(got.Error, "no space left") {
		t.Fatalf("recorded %+v (%v)", got, gerr)
	}
	if entries, _ := os.ReadDir(sn.layout.CapturesDir()); len(entries) != 0 {
		t.Fatalf("a failed capture left %v", entries)
	}
	back, err := os.ReadFile(filepath.Join(upper, "big"))
	if err != nil || len(back) != len(data) || back[12345] != data[12345] {
		t.Fatalf("the container's layer changed: %d bytes, %v", len(back), err)
	}
}

// TestBtrfsRelease: a released btrfs capture is gone, its blocks dropped
// by the kernel, when RemoveCapture returns; and a btrfs capture waits
// for a release in progress before it freezes, so that the kernel's
// clean-up is not written out under the freeze.
func TestBtrfsRelease(t *testing.T) {
	ctx := context.Background()
	sn, upper := openOnLoop(t, "btrfs", 256<<20, "default/1/c")
	for i := range 5000 {
		if err := os.WriteFile(filepath.Join(upper, fmt.Sprintf("f%05d", i)), []byte("data"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	first, err := sn.Capture(ctx, CommitRequest{Key: "default/1/c", Target: "app"})
	if err != nil {
		t.Fatal(err)
	}

	// A release in progress holds the capture back.
	if err := sn.cleanups.enter(ctx, true); err != nil {
		t.Fatal(err)
	}
	type result struct {
		rec Commit
		err error
	}
	second := make(chan result, 1)
	go func() {
		rec, err := sn.Capture(ctx, CommitRequest{Key: "default/1/c", Target: "app"})
		second <- result{rec, err}
	}()
	select {
	case r := <-second:
		t.Fatalf("a capture ran during a release: %+v, %v", r.rec, r.err)
	case <-time.After(100 * time.Millisecond):
	}
	sn.cleanups.leave(true)
	select {
	case r := <-second:
		if r.err != nil {
			t.Fatal(r.err)
		}
	case <-time.After(subvolumeCleanupWait + 5*time.Second):
		t.Fatal("the capture did not go on after the release")
	}

	dir := sn.layout.CaptureDir(first.ID)
	id, err := overlay.SubvolumeID(dir)
	if err != nil {
		t.Fatal(err)
	}
	// A capture in progress (of another container) holds the release
	// back.
	if err := sn.cleanups.enter(ctx, false); err != nil {
		t.Fatal(err)
	}
	released := make(chan error, 1)
	go func() { released <- sn.RemoveCapture(ctx, first.ID) }()
	select {
	case err := <-released:
		t.Fatalf("a capture was released during a capture: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	sn.cleanups.leave(false)
	if err := <-released; err != nil {
		t.Fatal(err)
	}
	if exists, err := overlay.SubvolumeExists(filepath.Dir(dir), id); err != nil || exists {
		t.Fatalf("released capture: subvolume %d exists = %v, %v; want it dropped", id, exists, err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("released capture still there: %v", err)
	}
}

// TestBtrfsSnapshotRemoval: removing a container's snapshot deletes its
// subvolume at once, and keeps btrfs captures waiting, in the background,
// until the kernel has dropped it, as a released capture does.
func TestBtrfsSnapshotRemoval(t *testing.T) {
	ctx := context.Background()
	sn, upper := openOnLoop(t, "btrfs", 512<<20, "default/1/gone")
	for i := range 20000 {
		if err := os.WriteFile(filepath.Join(upper, fmt.Sprintf("f%05d", i)), []byte("data"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := sn.Prepare(ctx, "default/2/stays", ""); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Dir(upper)
	id, err := overlay.SubvolumeID(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := overlay.SyncFS(dir); err != nil { // a drop with blocks to free
		t.Fatal(err)
	}
	if err := sn.Remove(ctx, "default/1/gone"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := sn.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("the removed snapshot's subvolume is still there: %v", err)
	}
	// As long as the kernel has not dropped it, captures wait.
	for {
		exists, err := overlay.SubvolumeExists(filepath.Dir(dir), id)
		if err != nil {
			t.Fatal(err)
		}
		if !exists {
			break
		}
		if err := sn.cleanups.enter(expiredContext(), false); err == nil {
			t.Fatal("a capture could start while the removed snapshot was being dropped")
		}
		if time.Since(start) > 30*time.Second {
			t.Fatal("the removed snapshot was not dropped in 30 s")
		}
		time.Sleep(time.Millisecond)
	}
	t.Logf("dropped %v after Cleanup returned", time.Since(start))
	// Then the gate is let go, and a capture goes on at once.
	ctx5, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := sn.cleanups.enter(ctx5, false); err != nil {
		t.Fatalf("the gate was not let go after the drop: %v", err)
	}
	sn.cleanups.leave(false)
	if _, err := sn.Capture(ctx, CommitRequest{Key: "default/2/stays", Target: "app"}); err != nil {
		t.Fatal(err)
	}
}

func expiredContext() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

// TestBtrfsStrategy: on btrfs, active snapshots are subvolumes, a capture
// is a read-only snapshot of one, and both are removed cleanly (Cleanup;
// recovery of an abandoned capture).
func TestBtrfsStrategy(t *testing.T) {
	ctx := context.Background()
	testutil.RequireRoot(t)
	root := filepath.Join(testutil.LoopFS(t, "btrfs", 256<<20), "seamless")
	sn, err := New(ctx, root)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { sn.Close() }()
	if sn.Strategy() != config.StrategyBtrfs {
		t.Fatalf("strategy %q on btrfs", sn.Strategy())
	}
	mounts, err := sn.Prepare(ctx, "default/1/c", "")
	if err != nil {
		t.Fatal(err)
	}
	snapDir := filepath.Dir(mounts[0].Source)
	if !overlay.IsSubvolume(snapDir) {
		t.Fatalf("%s is not a subvolume", snapDir)
	}
	if err := os.WriteFile(filepath.Join(mounts[0].Source, "f"), []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}
	rec, err := sn.Capture(ctx, CommitRequest{Key: "default/1/c", Target: "app"})
	if err != nil {
		t.Fatal(err)
	}
	if rec.Strategy != config.StrategyBtrfs || rec.PreCopyRounds != 1 {
		t.Fatalf("recorded %+v", rec)
	}
	if data, err := os.ReadFile(filepath.Join(sn.layout.CaptureUpper(rec.ID), "f")); err != nil || string(data) != "data" {
		t.Fatalf("capture holds %q, %v", data, err)
	}
	if !overlay.IsSubvolume(sn.layout.CaptureDir(rec.ID)) {
		t.Fatal("the capture is not a snapshot")
	}
	if err := os.WriteFile(filepath.Join(sn.layout.CaptureUpper(rec.ID), "g"), nil, 0o644); err == nil {
		t.Fatal("the capture is writable")
	}

	// Remove + Cleanup deletes the snapshot's subvolume.
	if err := sn.Remove(ctx, "default/1/c"); err != nil {
		t.Fatal(err)
	}
	if err := sn.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(snapDir); !os.IsNotExist(err) {
		t.Fatalf("subvolume %s survived Cleanup: %v", snapDir, err)
	}

	// An abandoned (read-only) capture is deleted by recovery.
	if err := overlay.SnapshotReadonly(sn.layout.CaptureDir(rec.ID), sn.layout.CaptureTemp("crashed")); err != nil {
		t.Fatal(err)
	}
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}
	if sn, err = New(ctx, root); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(sn.layout.CaptureTemp("crashed")); !os.IsNotExist(err) {
		t.Fatalf("abandoned capture survived recovery: %v", err)
	}
	if _, err := os.Stat(sn.layout.CaptureUpper(rec.ID)); err != nil {
		t.Fatalf("the pending capture was removed: %v", err)
	}
}
