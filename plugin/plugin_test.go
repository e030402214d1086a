//go:build linux

package plugin

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"

	"github.com/seamless-snapshotter/seamless-snapshotter/config"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
)

func TestRegisteredWithContainerd(t *testing.T) {
	for _, r := range registry.Graph(func(*plugin.Registration) bool { return false }) {
		if r.Type == plugins.SnapshotPlugin && r.ID == ID {
			return
		}
	}
	t.Fatalf("%s.%s is not in containerd's plugin registry", plugins.SnapshotPlugin, ID)
}

// TestInitGivesAWorkingSnapshotter initialises the plugin as containerd
// would and uses the snapshotter for real: an overlay on a committed layer.
func TestInitGivesAWorkingSnapshotter(t *testing.T) {
	testutil.RequireRoot(t)
	ctx := context.Background()
	tmp := t.TempDir()
	root := filepath.Join(tmp, "custom-root")

	ic := plugin.NewContext(ctx, plugin.NewPluginSet(), map[string]string{
		plugins.PropertyRootDir: filepath.Join(tmp, "assigned-root"),
	})
	ic.Config = &Config{RootPath: root, SyncRemove: true, MountOptions: []string{"index=off"}, Commit: config.DefaultCommit()}
	p := Registration().Init(ic)
	inst, err := p.Instance()
	if err != nil {
		t.Fatal(err)
	}
	sn, ok := inst.(snapshots.Snapshotter)
	if !ok {
		t.Fatalf("instance is %T, not a snapshots.Snapshotter", inst)
	}
	defer sn.Close()
	if got := p.Meta.Exports[plugins.SnapshotterRootDir]; got != root {
		t.Errorf("exported root %q, want %q", got, root)
	}

	// Base layer with one file, then an overlay that sees it and writes.
	mounts, err := sn.Prepare(ctx, "base-active", "")
	if err != nil {
		t.Fatal(err)
	}
	writeThrough(t, mounts, "hello", "base")
	if err := sn.Commit(ctx, "base", "base-active"); err != nil {
		t.Fatal(err)
	}
	mounts, err = sn.Prepare(ctx, "container", "base")
	if err != nil {
		t.Fatal(err)
	}
	if mounts[0].Type != "overlay" {
		t.Fatalf("mount type %q, want overlay", mounts[0].Type)
	}
	dir := t.TempDir()
	if err := mount.All(mounts, dir); err != nil {
		t.Fatal(err)
	}
	defer mount.UnmountAll(dir, 0)
	if b, err := os.ReadFile(filepath.Join(dir, "hello")); err != nil || string(b) != "base" {
		t.Fatalf("lower file through overlay: %q, %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "new"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "metadata.db")); err != nil {
		t.Errorf("configured root_path not used: %v", err)
	}
}

func writeThrough(t *testing.T, mounts []mount.Mount, name, content string) {
	t.Helper()
	dir := t.TempDir()
	if err := mount.All(mounts, dir); err != nil {
		t.Fatal(err)
	}
	defer mount.UnmountAll(dir, 0)
	if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}
