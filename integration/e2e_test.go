//go:build linux

package integration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/errdefs"

	"github.com/seamless-snapshotter/seamless-snapshotter/integration/harness"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/testimage"
)

const seamless = harness.SnapshotterName

// testContext bounds one test; the harness's cleanups use their own.
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// setup starts registry + daemon + containerd, builds the busybox test
// image locally, pushes it to the registry and pulls it into the given
// snapshotters through containerd's transfer service.
func setup(t *testing.T, snapshotters ...string) (context.Context, *harness.Env, string) {
	t.Helper()
	return setupWith(t, harness.Options{}, snapshotters...)
}

// setupWith is setup with harness options (e.g. the daemon's root on a
// given filesystem).
func setupWith(t *testing.T, opts harness.Options, snapshotters ...string) (context.Context, *harness.Env, string) {
	t.Helper()
	return setupWithImage(t, opts, "seamless-test/busybox:latest", nil, snapshotters...)
}

// setupWithImage is setupWith for a test image built with imgOpts (e.g. a
// helper binary added), pushed as repo (a repository:tag in the registry).
func setupWithImage(t *testing.T, opts harness.Options, repo string, imgOpts []testimage.Option, snapshotters ...string) (context.Context, *harness.Env, string) {
	t.Helper()
	harness.Require(t)
	ctx := testContext(t)
	env := harness.Start(t, opts)
	img, err := testimage.Build(imgOpts...)
	if err != nil {
		t.Fatal(err)
	}
	ref := env.Registry.Ref(repo)
	if _, err := testimage.Push(ctx, img, ref); err != nil {
		t.Fatal(err)
	}
	for _, sn := range snapshotters {
		if err := env.PullImage(ctx, ref, sn); err != nil {
			t.Fatalf("pull into %s: %v", sn, err)
		}
	}
	return ctx, env, ref
}

func client(ctx context.Context, t *testing.T, env *harness.Env) *containerd.Client {
	t.Helper()
	c, err := env.Containerd.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// counterScript makes a container that keeps proving it can write: it
// increments /counter ten times a second (write, then rename, so that a
// reader never sees the file truncated).
var counterScript = []string{"sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /counter.new; mv /counter.new /counter; sleep 0.1; done"}

func readCounter(ctx context.Context, t *testing.T, env *harness.Env, id string) int {
	t.Helper()
	out, err := env.Exec(ctx, id, "cat", "/counter")
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		t.Fatalf("counter of %s is %q", id, out)
	}
	return n
}

// assertStillWriting shows that a container's rootfs mount works: its
// counter keeps increasing.
func assertStillWriting(ctx context.Context, t *testing.T, env *harness.Env, id string) {
	t.Helper()
	first := readCounter(ctx, t, env, id)
	if err := harness.WaitFor(ctx, 100*time.Millisecond, func(ctx context.Context) (bool, error) {
		return readCounter(ctx, t, env, id) > first, nil
	}); err != nil {
		t.Fatalf("container %s stopped writing (counter stuck at %d): %v", id, first, err)
	}
}

func TestPullAndRunOnSeamless(t *testing.T) {
	ctx, env, ref := setup(t, seamless)
	out, err := env.Ctr(ctx, "snapshots", "--snapshotter", seamless, "ls")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "Committed") {
		t.Fatalf("no committed layer in %s after the pull:\n%s", seamless, out)
	}
	out, err = env.Run(ctx, harness.UniqueID("run-"), ref, seamless, "sh", "-c", "echo hello > /f && cat /f && cat /etc/passwd | head -1")
	if err != nil {
		t.Fatal(err)
	}
	if want := "hello\nroot:x:0:0:root:/root:/bin/sh"; strings.TrimSpace(out) != want {
		t.Fatalf("container printed %q, want %q", out, want)
	}
}

// TestTaskRestartKeepsFiles: files a container writes live in its
// snapshot, not in its task: a new task on the same container sees them.
func TestTaskRestartKeepsFiles(t *testing.T) {
	ctx, env, ref := setup(t, seamless)
	id := harness.UniqueID("restart-")
	if err := env.RunDetached(ctx, id, ref, seamless, "sleep", "100000"); err != nil {
		t.Fatal(err)
	}
	if _, err := env.Exec(ctx, id, "sh", "-c", "mkdir -p /data && echo kept > /data/file && rm /etc/group"); err != nil {
		t.Fatal(err)
	}

	c := client(ctx, t, env)
	container, err := c.LoadContainer(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	task, err := container.Task(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	exited, err := task.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Kill(ctx, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-exited
	if _, err := task.Delete(ctx); err != nil {
		t.Fatal(err)
	}

	task, err = container.NewTask(ctx, cio.NullIO)
	if err != nil {
		t.Fatal(err)
	}
	if err := task.Start(ctx); err != nil {
		t.Fatal(err)
	}
	out, err := env.Exec(ctx, id, "sh", "-c", "cat /data/file; test -e /etc/group && echo group-back || echo group-gone")
	if err != nil {
		t.Fatal(err)
	}
	if want := "kept\ngroup-gone"; strings.TrimSpace(out) != want {
		t.Fatalf("after the task restart the container sees %q, want %q", out, want)
	}
}

// TestRestarts: containers keep running and writing while containerd, then
// our daemon (gracefully, then killed), restart; afterwards the metadata is
// intact and new containers start.
func TestRestarts(t *testing.T) {
	ctx, env, ref := setup(t, seamless)
	id := harness.UniqueID("survivor-")
	if err := env.RunDetached(ctx, id, ref, seamless, counterScript...); err != nil {
		t.Fatal(err)
	}
	if err := harness.WaitFor(ctx, 50*time.Millisecond, func(ctx context.Context) (bool, error) {
		_, err := env.Exec(ctx, id, "test", "-s", "/counter")
		return err == nil, nil
	}); err != nil {
		t.Fatal(err)
	}
	before := snapshotList(ctx, t, env, seamless)

	for _, restart := range []struct {
		name string
		do   func(context.Context) error
	}{
		{"containerd", env.Containerd.Restart},
		{"daemon", env.Daemon.Restart},
		{"daemon killed", func(ctx context.Context) error {
			if err := env.Daemon.Kill(); err != nil {
				return err
			}
			return env.Daemon.Start(ctx)
		}},
	} {
		t.Run(restart.name, func(t *testing.T) {
			if err := restart.do(ctx); err != nil {
				t.Fatal(err)
			}
			// The running container never needed the daemon: check it
			// first, before containerd has even reconnected.
			assertStillWriting(ctx, t, env, id)
			if err := env.WaitForSnapshotter(ctx); err != nil {
				t.Fatal(err)
			}
			if after := snapshotList(ctx, t, env, seamless); !equalStrings(before, after) {
				t.Fatalf("snapshots changed across the restart:\nbefore %v\nafter  %v", before, after)
			}
			if _, err := env.Ctr(ctx, "snapshots", "--snapshotter", seamless, "info", id); err != nil {
				t.Fatal(err)
			}
			out, err := env.Run(ctx, harness.UniqueID("fresh-"), ref, seamless, "echo", "fresh")
			if err != nil {
				t.Fatal(err)
			}
			if strings.TrimSpace(out) != "fresh" {
				t.Fatalf("new container printed %q", out)
			}
		})
	}
}

// snapshotList is `ctr snapshots ls` as sorted "key parent kind" lines.
func snapshotList(ctx context.Context, t *testing.T, env *harness.Env, sn string) []string {
	t.Helper()
	out, err := env.Ctr(ctx, "snapshots", "--snapshotter", sn, "ls")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")[1:] // header
	for i, l := range lines {
		lines[i] = strings.Join(strings.Fields(l), " ")
	}
	sort.Strings(lines)
	return lines
}

func equalStrings(a, b []string) bool {
	return strings.Join(a, "\n") == strings.Join(b, "\n")
}

// snapshotInfo is the part of `ctr snapshots info` that must not depend on
// the snapshotter.
type snapshotInfo struct {
	Name   string
	Parent string
	Kind   string
	Labels map[string]string
}

func infoOf(ctx context.Context, t *testing.T, env *harness.Env, sn, key string) snapshotInfo {
	t.Helper()
	out, err := env.Ctr(ctx, "snapshots", "--snapshotter", sn, "info", key)
	if err != nil {
		t.Fatal(err)
	}
	var raw struct {
		Name, Parent string
		Kind         json.RawMessage
		Labels       map[string]string
		Created      time.Time
		Updated      time.Time
	}
	if err := json.Unmarshal([]byte(out), &raw); err != nil {
		t.Fatalf("ctr snapshots info: %v\n%s", err, out)
	}
	if raw.Created.IsZero() || raw.Updated.IsZero() {
		t.Errorf("%s: info without times: %s", sn, out)
	}
	delete(raw.Labels, "containerd.io/gc.root")
	return snapshotInfo{Name: raw.Name, Parent: raw.Parent, Kind: string(raw.Kind), Labels: raw.Labels}
}

// TestCtrSnapshotsLikeOverlayfs drives `ctr snapshots` against our
// snapshotter and containerd's built-in overlayfs side by side: the same
// image, the same operations, the same answers.
func TestCtrSnapshotsLikeOverlayfs(t *testing.T) {
	ctx, env, _ := setup(t, seamless, "overlayfs")
	c := client(ctx, t, env)
	sns := []string{seamless, "overlayfs"}

	// The same image gives the same committed chain in both.
	if a, b := snapshotList(ctx, t, env, seamless), snapshotList(ctx, t, env, "overlayfs"); !equalStrings(a, b) {
		t.Fatalf("ls after the pull differs:\nseamless  %v\noverlayfs %v", a, b)
	}
	layers := snapshotList(ctx, t, env, seamless)
	top := topLayer(t, layers)

	type answers struct {
		ls          []string
		info        snapshotInfo
		usage       string
		labelled    snapshotInfo
		cleared     snapshotInfo
		rmParentErr bool
		lsAfterRm   []string
	}
	got := map[string]answers{}
	for _, sn := range sns {
		var a answers
		key := "work-" + sn
		if _, err := env.Ctr(ctx, "snapshots", "--snapshotter", sn, "prepare", key, top); err != nil {
			t.Fatal(err)
		}
		// Write the same 3 files through a real mount.
		mounts, err := c.SnapshotService(sn).Mounts(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		mnt := t.TempDir()
		if err := mount.All(mounts, mnt); err != nil {
			t.Fatal(err)
		}
		for i := range 3 {
			if err := os.WriteFile(filepath.Join(mnt, fmt.Sprintf("f%d", i)), make([]byte, 8192), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if err := mount.UnmountAll(mnt, 0); err != nil {
			t.Fatal(err)
		}
		a.ls = snapshotList(ctx, t, env, sn)
		a.info = infoOf(ctx, t, env, sn, key)
		out, err := env.Ctr(ctx, "snapshots", "--snapshotter", sn, "usage", key)
		if err != nil {
			t.Fatal(err)
		}
		a.usage = strings.Join(strings.Fields(strings.Split(strings.TrimSpace(out), "\n")[1]), " ")
		if _, err := env.Ctr(ctx, "snapshots", "--snapshotter", sn, "label", key, "team=storage", "containerd.io/snapshot/x=y"); err != nil {
			t.Fatal(err)
		}
		a.labelled = infoOf(ctx, t, env, sn, key)
		if _, err := env.Ctr(ctx, "snapshots", "--snapshotter", sn, "label", key, "team="); err != nil {
			t.Fatal(err)
		}
		a.cleared = infoOf(ctx, t, env, sn, key)
		_, err = env.Ctr(ctx, "snapshots", "--snapshotter", sn, "rm", top)
		a.rmParentErr = err != nil
		if _, err := env.Ctr(ctx, "snapshots", "--snapshotter", sn, "rm", key); err != nil {
			t.Fatal(err)
		}
		a.lsAfterRm = snapshotList(ctx, t, env, sn)
		got[sn] = a
	}

	s, o := got[seamless], got["overlayfs"]
	for _, c := range []struct {
		what string
		a, b any
	}{
		{"ls with the prepared snapshot", strings.ReplaceAll(strings.Join(s.ls, "|"), "work-"+seamless, "work"), strings.ReplaceAll(strings.Join(o.ls, "|"), "work-overlayfs", "work")},
		{"info kind and parent", s.info.Kind + " " + s.info.Parent, o.info.Kind + " " + o.info.Parent},
		{"usage", s.usage[strings.Index(s.usage, " "):], o.usage[strings.Index(o.usage, " "):]},
		{"labels after label", fmt.Sprint(s.labelled.Labels), fmt.Sprint(o.labelled.Labels)},
		{"labels after clearing one", fmt.Sprint(s.cleared.Labels), fmt.Sprint(o.cleared.Labels)},
		{"rm of a parent fails", s.rmParentErr, o.rmParentErr},
		{"ls after rm", s.lsAfterRm, o.lsAfterRm},
	} {
		if fmt.Sprint(c.a) != fmt.Sprint(c.b) {
			t.Errorf("%s: seamless %v, overlayfs %v", c.what, c.a, c.b)
		}
	}
	if !s.rmParentErr {
		t.Error("removing a snapshot with children succeeded")
	}
	if s.labelled.Labels["team"] != "storage" {
		t.Errorf("label not set: %v", s.labelled.Labels)
	}
	if !equalStrings(s.lsAfterRm, layers) {
		t.Errorf("ls after rm %v, want the image layers %v", s.lsAfterRm, layers)
	}
}

// TestGarbageCollection: containerd's collector removes the snapshots
// nothing references, through our Remove and Cleanup, and nothing else:
// not a running container's snapshot, not the image's layers, not our own
// state in the root.
func TestGarbageCollection(t *testing.T) {
	ctx, env, ref := setup(t, seamless)
	c := client(ctx, t, env)
	id := harness.UniqueID("gc-keep-")
	if err := env.RunDetached(ctx, id, ref, seamless, counterScript...); err != nil {
		t.Fatal(err)
	}
	sn := c.SnapshotService(seamless)
	layers := snapshotList(ctx, t, env, seamless)
	top := topLayer(t, layers)

	// Our own state (captures, jobs: later) lives beside "snapshots" in
	// the root; GC must never touch it.
	ownState := filepath.Join(env.Daemon.Root(), "captures", "marker")
	if err := os.MkdirAll(ownState, 0o700); err != nil {
		t.Fatal(err)
	}

	// An unreferenced snapshot, made under a lease; deleting the lease
	// synchronously runs the collector.
	ls := c.LeasesService()
	lease, err := ls.Create(ctx, leases.WithRandomID())
	if err != nil {
		t.Fatal(err)
	}
	lctx := leases.WithLease(ctx, lease.ID)
	mounts, err := sn.Prepare(lctx, "garbage", top)
	if err != nil {
		t.Fatal(err)
	}
	garbageDir := upperOf(t, mounts)
	if _, err := os.Stat(garbageDir); err != nil {
		t.Fatal(err)
	}
	if err := ls.Delete(ctx, lease, leases.SynchronousDelete); err != nil {
		t.Fatal(err)
	}

	if _, err := sn.Stat(ctx, "garbage"); !errdefs.IsNotFound(err) {
		t.Fatalf("unreferenced snapshot survived GC: %v", err)
	}
	if _, err := os.Stat(filepath.Dir(garbageDir)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("its directory survived GC's Cleanup: %v", err)
	}
	if after := snapshotList(ctx, t, env, seamless); len(after) != len(layers) {
		t.Fatalf("GC changed the referenced snapshots:\nbefore %v\nafter  %v", layers, after)
	}
	assertStillWriting(ctx, t, env, id)
	if _, err := os.Stat(ownState); err != nil {
		t.Fatalf("GC removed our own state: %v", err)
	}

	// Remove the container and the image: everything becomes garbage.
	if err := env.DeleteContainer(ctx, id); err != nil {
		t.Fatal(err)
	}
	if err := c.ImageService().Delete(ctx, ref, images.SynchronousDelete()); err != nil {
		t.Fatal(err)
	}
	var left []string
	if err := sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
		left = append(left, i.Name)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(left) != 0 {
		t.Fatalf("snapshots left after removing everything: %v", left)
	}
	entries, err := os.ReadDir(filepath.Join(env.Daemon.Root(), "snapshots"))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		t.Fatalf("snapshot directories left after GC: %v", entries)
	}
	if _, err := os.Stat(ownState); err != nil {
		t.Fatalf("GC removed our own state: %v", err)
	}
}

// topLayer finds, in snapshotList lines ("key [parent] kind"), the
// committed snapshot that is nobody's parent: the image's top layer.
func topLayer(t *testing.T, lines []string) string {
	t.Helper()
	parents := map[string]bool{}
	var committed []string
	for _, l := range lines {
		f := strings.Fields(l)
		if f[len(f)-1] != "Committed" {
			continue
		}
		committed = append(committed, f[0])
		if len(f) == 3 {
			parents[f[1]] = true
		}
	}
	for _, k := range committed {
		if !parents[k] {
			return k
		}
	}
	t.Fatalf("no top layer in %v", lines)
	return ""
}

func upperOf(t *testing.T, mounts []mount.Mount) string {
	t.Helper()
	for _, o := range mounts[0].Options {
		if v, ok := strings.CutPrefix(o, "upperdir="); ok {
			return v
		}
	}
	return mounts[0].Source
}

// TestBadRequestsThroughContainerd: a user of containerd sees the error
// class containerd's own snapshotters give (through containerd, the proxy
// and the daemon), and nothing changes on disk or in the metadata.
func TestBadRequestsThroughContainerd(t *testing.T) {
	ctx, env, _ := setup(t, seamless)
	c := client(ctx, t, env)
	sn := c.SnapshotService(seamless)
	layers := snapshotList(ctx, t, env, seamless)
	top := topLayer(t, layers)
	// A gc.root label keeps containerd's collector off these two.
	root := snapshots.WithLabels(map[string]string{"containerd.io/gc.root": time.Now().Format(time.RFC3339)})
	if _, err := sn.Prepare(ctx, "active", top, root); err != nil {
		t.Fatal(err)
	}
	if _, err := sn.View(ctx, "view", top, root); err != nil {
		t.Fatal(err)
	}
	snapshotsDir := filepath.Join(env.Daemon.Root(), "snapshots")

	for _, tc := range []struct {
		name  string
		call  func() error
		class func(error) bool
	}{
		{"remove a snapshot with children", func() error { return sn.Remove(ctx, top) }, errdefs.IsFailedPrecondition},
		{"commit a view", func() error { return sn.Commit(ctx, "from-view", "view") }, errdefs.IsFailedPrecondition},
		{"prepare an existing key", func() error { _, err := sn.Prepare(ctx, "active", top); return err }, errdefs.IsAlreadyExists},
		{"prepare on an unknown parent", func() error { _, err := sn.Prepare(ctx, "x", "sha256:nope"); return err }, errdefs.IsNotFound},
		{"key escaping the root", func() error { _, err := sn.Prepare(ctx, "../../../../etc/x", top); return err }, errdefs.IsInvalidArgument},
		{"mounts of an unknown key", func() error { _, err := sn.Mounts(ctx, "nope"); return err }, errdefs.IsNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dirsBefore := dirNames(t, snapshotsDir)
			err := tc.call()
			if !tc.class(err) {
				t.Fatalf("got %v", err)
			}
			if after := snapshotList(ctx, t, env, seamless); len(after) != len(layers)+2 {
				t.Errorf("metadata changed: %v", after)
			}
			if after := dirNames(t, snapshotsDir); !equalStrings(dirsBefore, after) {
				t.Errorf("snapshot directories changed:\nbefore %v\nafter  %v", dirsBefore, after)
			}
		})
	}
}

func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	names := make([]string, len(entries))
	for i, e := range entries {
		names[i] = e.Name()
	}
	return names
}
