//go:build linux

package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"

	"github.com/seamless-snapshotter/seamless-snapshotter/integration/harness"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// benchImpl opens one snapshotter under test on a fresh root.
type benchImpl struct {
	name string
	open func(ctx context.Context, b *testing.B, root string) snapshots.Snapshotter
}

// benchImpls are measured side by side in one run: containerd's built-in
// overlay snapshotter (the baseline, in-process, asynchronous remove as in
// containerd's default config), ours in-process, and ours through the gRPC
// proxy as containerd uses it (the daemon binary), whose difference to the
// in-process one is the proxy's overhead.
var benchImpls = []benchImpl{
	{"overlayfs", func(_ context.Context, b *testing.B, root string) snapshots.Snapshotter {
		sn, err := overlay.NewSnapshotter(root, overlay.AsynchronousRemove)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { sn.Close() })
		return sn
	}},
	{"seamless", func(ctx context.Context, b *testing.B, root string) snapshots.Snapshotter {
		sn, err := snapshotter.New(ctx, root)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { sn.Close() })
		return sn
	}},
	{"seamless-proxy", func(ctx context.Context, b *testing.B, root string) snapshots.Snapshotter {
		sn, stop, err := proxySnapshotter(ctx, b, root)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { stop() })
		return sn
	}},
}

// benchOps are the snapshotter calls containerd makes for every container:
// Prepare its rootfs on the image, Mounts, Commit (for builds and commits),
// Remove; "Lifecycle" is all four in a row.
var benchOps = []struct {
	name string
	run  func(ctx context.Context, b *testing.B, sn snapshots.Snapshotter)
}{
	{"Prepare", func(ctx context.Context, b *testing.B, sn snapshots.Snapshotter) {
		for i := 0; b.Loop(); i++ {
			if _, err := sn.Prepare(ctx, fmt.Sprintf("prepare-%d", i), "base"); err != nil {
				b.Fatal(err)
			}
		}
	}},
	{"Mounts", func(ctx context.Context, b *testing.B, sn snapshots.Snapshotter) {
		if _, err := sn.Prepare(ctx, "mounted", "base"); err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			if _, err := sn.Mounts(ctx, "mounted"); err != nil {
				b.Fatal(err)
			}
		}
	}},
	{"Commit", func(ctx context.Context, b *testing.B, sn snapshots.Snapshotter) {
		for i := 0; b.Loop(); i++ {
			b.StopTimer()
			key := fmt.Sprintf("active-%d", i)
			mounts, err := sn.Prepare(ctx, key, "base")
			if err != nil {
				b.Fatal(err)
			}
			writeUpper(b, mounts, 10)
			b.StartTimer()
			if err := sn.Commit(ctx, fmt.Sprintf("committed-%d", i), key); err != nil {
				b.Fatal(err)
			}
		}
	}},
	{"Remove", func(ctx context.Context, b *testing.B, sn snapshots.Snapshotter) {
		for i := 0; b.Loop(); i++ {
			b.StopTimer()
			key := fmt.Sprintf("remove-%d", i)
			if _, err := sn.Prepare(ctx, key, "base"); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			if err := sn.Remove(ctx, key); err != nil {
				b.Fatal(err)
			}
		}
	}},
	{"Lifecycle", func(ctx context.Context, b *testing.B, sn snapshots.Snapshotter) {
		for i := 0; b.Loop(); i++ {
			key, name := fmt.Sprintf("c-%d", i), fmt.Sprintf("n-%d", i)
			if _, err := sn.Prepare(ctx, key, "base"); err != nil {
				b.Fatal(err)
			}
			if _, err := sn.Mounts(ctx, key); err != nil {
				b.Fatal(err)
			}
			if err := sn.Commit(ctx, name, key); err != nil {
				b.Fatal(err)
			}
			if err := sn.Remove(ctx, name); err != nil {
				b.Fatal(err)
			}
		}
	}},
}

// BenchmarkSnapshotter names sub-benchmarks op=X/impl=Y so that
// `benchstat -col /impl` puts the snapshotters side by side.
func BenchmarkSnapshotter(b *testing.B) {
	testutil.RequireRoot(b)
	harness.RequireBinaries(b, harness.BinDaemon)
	for _, op := range benchOps {
		for _, impl := range benchImpls {
			b.Run(fmt.Sprintf("op=%s/impl=%s", op.name, impl.name), func(b *testing.B) {
				ctx := context.Background()
				// Under /var/tmp: /tmp may be a tmpfs, and the benchmark is
				// about the disk the snapshotters really use.
				root, err := os.MkdirTemp("/var/tmp", "seamless-bench-")
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { os.RemoveAll(root) })
				sn := impl.open(ctx, b, filepath.Join(root, "root"))
				base(ctx, b, sn)
				b.ReportAllocs()
				op.run(ctx, b, sn)
			})
		}
	}
}

// base commits a small image layer, the parent of every snapshot above.
func base(ctx context.Context, b *testing.B, sn snapshots.Snapshotter) {
	mounts, err := sn.Prepare(ctx, "base-active", "")
	if err != nil {
		b.Fatal(err)
	}
	writeUpper(b, mounts, 100)
	if err := sn.Commit(ctx, "base", "base-active"); err != nil {
		b.Fatal(err)
	}
}

// writeUpper writes n small files straight into a snapshot's writable
// directory (the bind source, or the overlay's upperdir), as a container
// would through the mount, without paying for a mount per iteration.
func writeUpper(b *testing.B, mounts []mount.Mount, n int) {
	dir := mounts[0].Source
	for _, o := range mounts[0].Options {
		if v, ok := strings.CutPrefix(o, "upperdir="); ok {
			dir = v
		}
	}
	for i := range n {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%d", i)), []byte("data"), 0o644); err != nil {
			b.Fatal(err)
		}
	}
}
