//go:build linux

package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"

	"github.com/seamless-snapshotter/seamless-snapshotter/config"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
)

func newTestSnapshotter(opts ...Option) testsuite.SnapshotterFunc {
	return func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		sn, err := New(ctx, root, opts...)
		if err != nil {
			return nil, nil, err
		}
		return sn, sn.Close, nil
	}
}

// TestConformance runs containerd's snapshotter suite in-process. The name
// must be "overlayfs": the suite expects overlay semantics (EXDEV on a
// directory rename without redirect_dir) only under that name.
func TestConformance(t *testing.T) {
	testutil.RequireRoot(t)
	for _, tc := range []struct {
		name string
		opts []Option
	}{
		{name: "AsyncRemove"},
		{name: "SyncRemove", opts: []Option{WithSyncRemove}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testsuite.SnapshotterSuite(t, "overlayfs", newTestSnapshotter(tc.opts...))
		})
	}
	// On btrfs, active snapshots are subvolumes (the btrfs capture
	// strategy); the suite's roots are moved onto a btrfs filesystem.
	t.Run("Btrfs", func(t *testing.T) {
		fs := testutil.LoopFS(t, "btrfs", 1<<30)
		testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
			sn, err := New(ctx, filepath.Join(fs, filepath.Base(filepath.Dir(root))))
			if err != nil {
				return nil, nil, err
			}
			if sn.Strategy() != config.StrategyBtrfs {
				return nil, nil, fmt.Errorf("strategy %s on btrfs", sn.Strategy())
			}
			return sn, sn.Close, nil
		})
	})
}

func openTest(t *testing.T, opts ...Option) (*Snapshotter, string) {
	t.Helper()
	testutil.RequireRoot(t)
	root := t.TempDir()
	sn, err := New(context.Background(), root, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sn.Close() })
	return sn, root
}

// treeOf lists every path under root, to show that a failed call left the
// disk as it was.
func treeOf(t *testing.T, root string) []string {
	t.Helper()
	var paths []string
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Name() == metadataFile {
			return nil
		}
		paths = append(paths, p)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(paths)
	return paths
}

func TestBadInputChangesNothing(t *testing.T) {
	ctx := context.Background()
	sn, root := openTest(t, WithSyncRemove)

	// A committed base, a child of it, an active snapshot and a view.
	if _, err := sn.Prepare(ctx, "base-active", ""); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "base", "base-active"); err != nil {
		t.Fatal(err)
	}
	if _, err := sn.Prepare(ctx, "child", "base"); err != nil {
		t.Fatal(err)
	}
	if _, err := sn.View(ctx, "view", "base"); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name string
		call func() error
		want error
	}{
		{"remove a snapshot with children", func() error { return sn.Remove(ctx, "base") }, errdefs.ErrFailedPrecondition},
		{"commit a view", func() error { return sn.Commit(ctx, "from-view", "view") }, errdefs.ErrFailedPrecondition},
		{"commit a committed snapshot", func() error { return sn.Commit(ctx, "again", "base") }, errdefs.ErrFailedPrecondition},
		{"commit an unknown key", func() error { return sn.Commit(ctx, "x", "nope") }, errdefs.ErrNotFound},
		{"commit to an existing name", func() error { return sn.Commit(ctx, "base", "child") }, errdefs.ErrAlreadyExists},
		{"prepare an existing key", func() error { _, err := sn.Prepare(ctx, "child", "base"); return err }, errdefs.ErrAlreadyExists},
		{"prepare with an unknown parent", func() error { _, err := sn.Prepare(ctx, "orphan", "nope"); return err }, errdefs.ErrNotFound},
		{"prepare on an active parent", func() error { _, err := sn.Prepare(ctx, "on-active", "child"); return err }, errdefs.ErrInvalidArgument},
		{"view with an unknown parent", func() error { _, err := sn.View(ctx, "v2", "nope"); return err }, errdefs.ErrNotFound},
		{"key escaping the root", func() error { _, err := sn.Prepare(ctx, "../../../etc/evil", ""); return err }, errdefs.ErrInvalidArgument},
		{"key with a .. element", func() error { _, err := sn.Prepare(ctx, "default/1/../../x", "base"); return err }, errdefs.ErrInvalidArgument},
		{"empty key", func() error { _, err := sn.Prepare(ctx, "", ""); return err }, errdefs.ErrInvalidArgument},
		{"key with NUL", func() error { _, err := sn.Prepare(ctx, "a\x00b", ""); return err }, errdefs.ErrInvalidArgument},
		{"commit name escaping the root", func() error { return sn.Commit(ctx, "../x", "child") }, errdefs.ErrInvalidArgument},
		{"stat unknown", func() error { _, err := sn.Stat(ctx, "nope"); return err }, errdefs.ErrNotFound},
		{"mounts unknown", func() error { _, err := sn.Mounts(ctx, "nope"); return err }, errdefs.ErrNotFound},
		{"mounts of a committed snapshot", func() error { _, err := sn.Mounts(ctx, "base"); return err }, errdefs.ErrFailedPrecondition},
		{"usage unknown", func() error { _, err := sn.Usage(ctx, "nope"); return err }, errdefs.ErrNotFound},
		{"remove unknown", func() error { return sn.Remove(ctx, "nope") }, errdefs.ErrNotFound},
		{"update unknown", func() error {
			_, err := sn.Update(ctx, snapshots.Info{Name: "nope", Labels: map[string]string{"a": "b"}}, "labels.a")
			return err
		}, errdefs.ErrNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := treeOf(t, root)
			infosBefore := walkAll(t, sn)
			err := tc.call()
			if !errors.Is(err, tc.want) {
				t.Fatalf("got error %v, want class %v", err, tc.want)
			}
			if after := treeOf(t, root); !equal(before, after) {
				t.Errorf("disk changed:\nbefore %v\nafter  %v", before, after)
			}
			if infosAfter := walkAll(t, sn); !equal(infosBefore, infosAfter) {
				t.Errorf("metadata changed:\nbefore %v\nafter  %v", infosBefore, infosAfter)
			}
			if _, err := os.Stat("/etc/evil"); err == nil {
				t.Errorf("a file was created outside the root")
			}
		})
	}
}

func walkAll(t *testing.T, sn *Snapshotter) []string {
	t.Helper()
	var keys []string
	if err := sn.Walk(context.Background(), func(_ context.Context, i snapshots.Info) error {
		keys = append(keys, i.Name+"|"+i.Parent+"|"+i.Kind.String())
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	sort.Strings(keys)
	return keys
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestCleanupRemovesOrphansOnly shows that Cleanup reclaims directories of
// removed snapshots and temporary directories left by a crash, and nothing
// else: live snapshots and the snapshotter's own state survive.
func TestCleanupRemovesOrphansOnly(t *testing.T) {
	ctx := context.Background()
	sn, root := openTest(t)

	if _, err := sn.Prepare(ctx, "keep", ""); err != nil {
		t.Fatal(err)
	}
	if _, err := sn.Prepare(ctx, "drop", ""); err != nil {
		t.Fatal(err)
	}
	keepMounts, err := sn.Mounts(ctx, "keep")
	if err != nil {
		t.Fatal(err)
	}
	dropMounts, err := sn.Mounts(ctx, "drop")
	if err != nil {
		t.Fatal(err)
	}
	if err := sn.Remove(ctx, "drop"); err != nil {
		t.Fatal(err)
	}
	// Asynchronous remove: the directory stays until Cleanup.
	dropDir := filepath.Dir(dropMounts[0].Source)
	if _, err := os.Stat(dropDir); err != nil {
		t.Fatalf("async remove deleted the directory early: %v", err)
	}
	// A crash between mkdir and rename leaves a temporary directory.
	crashed, err := sn.layout.PrepareTemp(true)
	if err != nil {
		t.Fatal(err)
	}
	ownState := filepath.Join(root, "captures", "some-commit")
	if err := os.Mkdir(ownState, 0o700); err != nil {
		t.Fatal(err)
	}

	if err := sn.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	for _, gone := range []string{dropDir, crashed} {
		if _, err := os.Stat(gone); !os.IsNotExist(err) {
			t.Errorf("%s survived Cleanup (err %v)", gone, err)
		}
	}
	for _, kept := range []string{keepMounts[0].Source, ownState, filepath.Join(root, metadataFile)} {
		if _, err := os.Stat(kept); err != nil {
			t.Errorf("Cleanup removed %s: %v", kept, err)
		}
	}
}

func TestSyncRemoveDeletesAtOnce(t *testing.T) {
	ctx := context.Background()
	sn, _ := openTest(t, WithSyncRemove)
	mounts, err := sn.Prepare(ctx, "a", "")
	if err != nil {
		t.Fatal(err)
	}
	if err := sn.Remove(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Dir(mounts[0].Source)); !os.IsNotExist(err) {
		t.Fatalf("snapshot directory still there after a synchronous remove: %v", err)
	}
	// The key can be used again at once.
	if _, err := sn.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
}

func TestOwnBucketsShareTheDatabase(t *testing.T) {
	ctx := context.Background()
	sn, root := openTest(t)
	if _, err := sn.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	if err := withTransaction(ctx, sn.ms, false, func(_ context.Context, tx *bolt.Tx) error {
		for _, name := range []string{"v1", string(bucketSeamless)} {
			if tx.Bucket([]byte(name)) == nil {
				t.Errorf("bucket %q missing", name)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}
	// Reopening keeps both the snapshots and our schema version.
	sn2, err := New(ctx, root)
	if err != nil {
		t.Fatal(err)
	}
	defer sn2.Close()
	if _, err := sn2.Stat(ctx, "a"); err != nil {
		t.Fatal(err)
	}
}

func TestSecondOpenOfARootFailsClearly(t *testing.T) {
	_, root := openTest(t)
	_, err := New(context.Background(), root, WithLockTimeout(100e6))
	if err == nil {
		t.Fatal("a second snapshotter opened a root in use")
	}
	if want := "another process uses snapshotter root"; !contains(err.Error(), want) {
		t.Fatalf("error %q does not say %q", err, want)
	}
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

// TestUpperdirLabel: the suite compares labels exactly, so the optional
// upperdir label is checked here instead.
func TestUpperdirLabel(t *testing.T) {
	ctx := context.Background()
	sn, _ := openTest(t, WithUpperdirLabel)
	mounts, err := sn.Prepare(ctx, "a", "", snapshots.WithLabels(map[string]string{"x": "1"}))
	if err != nil {
		t.Fatal(err)
	}
	want := mounts[0].Source
	info, err := sn.Stat(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if got := info.Labels[UpperdirLabel]; got != want || info.Labels["x"] != "1" {
		t.Errorf("Stat labels %v, want %s=%s and x=1", info.Labels, UpperdirLabel, want)
	}
	info, err = sn.Update(ctx, snapshots.Info{Name: "a", Labels: map[string]string{"y": "2"}}, "labels.y")
	if err != nil {
		t.Fatal(err)
	}
	if got := info.Labels[UpperdirLabel]; got != want || info.Labels["y"] != "2" {
		t.Errorf("Update labels %v", info.Labels)
	}
	if err := sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
		if i.Labels[UpperdirLabel] != want {
			t.Errorf("Walk labels %v", i.Labels)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}
