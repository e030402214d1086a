//go:build linux

package capture

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
	"golang.org/x/sys/unix"
)

const (
	sparseSize = 10 << 30
	bigDirSize = 100_000
)

// fidelityTree builds, in src, one of every kind of entry an overlay
// upperdir can hold, with exact owners, modes, xattrs and times. outside
// is a directory on the same filesystem, outside src, holding a canary.
func fidelityTree(t testing.TB, src, outside string) {
	t.Helper()
	p := func(rel string) string { return filepath.Join(src, rel) }
	old := time.Date(2001, 2, 3, 4, 5, 6, 789, time.UTC)
	older := time.Date(1999, 12, 31, 23, 59, 59, 123456789, time.UTC)

	must(t, os.MkdirAll(src, 0o755))
	must(t, os.MkdirAll(filepath.Join(outside, "canary"), 0o755))
	writeFile(t, filepath.Join(outside, "canary", "secret"), []byte("CANARY-"+strings.Repeat("s", 100)), 0o644)
	writeFile(t, filepath.Join(outside, "shared"), []byte("linked from the upper"), 0o644)

	writeFile(t, p("regular"), randBytes(100_000), 0o644)
	must(t, unix.Setxattr(p("regular"), "user.comment", []byte("hello"), 0))
	writeFile(t, p("empty"), nil, 0o600)

	// 10 GiB, two data blocks.
	f, err := os.Create(p("sparse"))
	must(t, err)
	must(t, f.Truncate(sparseSize))
	_, err = f.WriteAt(bytes.Repeat([]byte("A"), 4096), 0)
	must(t, err)
	_, err = f.WriteAt(bytes.Repeat([]byte("B"), 4096), 5<<30)
	must(t, err)
	must(t, f.Close())

	// Three names of one inode, in two directories; a link to a file
	// outside the upper.
	must(t, os.Mkdir(p("hl"), 0o755))
	must(t, os.Mkdir(p("hl2"), 0o755))
	writeFile(t, p("hl/a"), []byte("three names"), 0o644)
	must(t, os.Link(p("hl/a"), p("hl/b")))
	must(t, os.Link(p("hl/a"), p("hl2/c")))
	must(t, os.Link(filepath.Join(outside, "shared"), p("outside-link")))

	// Symlinks: never to be followed.
	must(t, os.Symlink("/etc/shadow", p("shadow")))
	must(t, os.Symlink("does/not/exist", p("dangling")))
	must(t, os.Mkdir(p("dir"), 0o750))
	writeFile(t, p("dir/inner"), []byte("inner"), 0o644)
	must(t, unix.Setxattr(p("dir"), "user.dir", []byte("d"), 0))
	must(t, os.Symlink("dir", p("dirlink")))
	must(t, os.Symlink("/", p("rootlink")))
	must(t, os.Symlink(filepath.Join(outside, "canary"), p("canarydir")))
	must(t, os.Symlink(filepath.Join(outside, "canary", "secret"), p("canaryfile")))
	must(t, os.Symlink("dir/inner", p("ownedlink")))
	must(t, os.Lchown(p("ownedlink"), 1234, 5678))
	must(t, unix.Lsetxattr(p("ownedlink"), "trusted.link", []byte("on a symlink"), 0))

	// Special files.
	must(t, unix.Mkfifo(p("fifo"), 0o640))
	must(t, unix.Mknod(p("sock"), unix.S_IFSOCK|0o755, 0))
	must(t, unix.Mknod(p("whiteout"), unix.S_IFCHR, 0)) // overlay whiteout
	must(t, unix.Mknod(p("null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(t, unix.Mknod(p("blk"), unix.S_IFBLK|0o660, int(unix.Mkdev(7, 200))))
	must(t, unix.Lsetxattr(p("whiteout"), "trusted.overlay.origin", []byte{0, 1, 2}, 0))

	// xattr whiteout (newer kernels) in a directory marked as holding them,
	// and an opaque directory.
	must(t, os.Mkdir(p("xwh"), 0o755))
	writeFile(t, p("xwh/gone"), nil, 0o000)
	must(t, unix.Setxattr(p("xwh/gone"), "trusted.overlay.whiteout", []byte{}, 0))
	must(t, unix.Setxattr(p("xwh"), "trusted.overlay.opaque", []byte("x"), 0))
	must(t, os.Mkdir(p("opaque"), 0o755))
	writeFile(t, p("opaque/kept"), []byte("kept"), 0o644)
	must(t, unix.Setxattr(p("opaque"), "trusted.overlay.opaque", []byte("y"), 0))

	// Modes, owners, capabilities.
	writeFile(t, p("mode000"), []byte("nobody may read"), 0o000)
	writeFile(t, p("setuid"), []byte("#!/bin/true"), 0o755)
	must(t, unix.Chmod(p("setuid"), 0o4755))
	writeFile(t, p("owned"), []byte("owned"), 0o640)
	must(t, os.Lchown(p("owned"), 1234, 5678))
	must(t, os.Mkdir(p("owneddir"), 0o700))
	must(t, os.Lchown(p("owneddir"), 1234, 5678))
	must(t, os.Mkdir(p("sgid"), 0o755))
	must(t, unix.Chmod(p("sgid"), 0o2775))
	must(t, os.Mkdir(p("sticky"), 0o755))
	must(t, unix.Chmod(p("sticky"), 0o1777))
	writeFile(t, p("capfile"), []byte("\x7fELF"), 0o755)
	must(t, unix.Setxattr(p("capfile"), "security.capability", capV2(), 0))
	must(t, unix.Setxattr(p("capfile"), "trusted.overlay.metacopy", []byte{}, 0))

	// Names and paths at the limits.
	writeFile(t, p(strings.Repeat("n", 255)), []byte("long name"), 0o644)
	must(t, os.Mkdir(p("deep"), 0o755))
	mkdeep(t, p("deep"), 20, 250, []byte("at the bottom")) // ~5 KB path
	manyFiles(t, p("big"), bigDirSize)

	// Times with nanoseconds, directories last (children change them).
	for _, rel := range []string{"regular", "empty", "sparse", "hl/a", "outside-link", "fifo", "sock",
		"whiteout", "null", "blk", "xwh/gone", "opaque/kept", "mode000", "setuid", "owned", "capfile",
		"dir/inner", strings.Repeat("n", 255)} {
		setTime(t, p(rel), older, old)
	}
	for _, rel := range []string{"shadow", "dangling", "dirlink", "rootlink", "ownedlink"} {
		setTime(t, p(rel), older, old)
	}
	for _, rel := range []string{"hl", "hl2", "dir", "xwh", "opaque", "owneddir", "sgid", "sticky", "deep", "big", "."} {
		setTime(t, p(rel), older, old.Add(time.Duration(len(rel))*time.Hour))
	}
}

func TestFidelity(t *testing.T) {
	testutil.RequireRoot(t)
	for _, tc := range []struct {
		name    string
		fstype  string
		size    int64
		mkfs    []string
		reflink bool
		workers int
	}{
		{name: "ext4-copy", fstype: "ext4", size: 4 << 30, mkfs: []string{"-N", "400000"}, workers: 4},
		{name: "xfs-reflink", fstype: "xfs", size: 2 << 30, reflink: true, workers: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mnt := testutil.LoopFS(t, tc.fstype, tc.size, tc.mkfs...)
			src, dst, outside := filepath.Join(mnt, "src"), filepath.Join(mnt, "dst"), filepath.Join(mnt, "outside")
			fidelityTree(t, src, outside)
			if got := SupportsReflink(mnt); got != tc.reflink {
				t.Fatalf("SupportsReflink(%s) = %v on %s", mnt, got, tc.fstype)
			}
			outsideBefore := listing(t, outside)
			mntBefore, _ := filepath.Glob(filepath.Join(mnt, "*"))
			checkCanary := watchCanary(t, filepath.Join(outside, "canary"))

			c, err := NewCopier(src, dst, Options{Reflink: tc.reflink, Workers: tc.workers})
			must(t, err)
			pre, err := c.PreCopy(context.Background())
			must(t, err)
			t.Logf("PreCopy: %+v", pre)
			fin, err := c.Final(context.Background(), nil)
			must(t, err)
			t.Logf("Final: %+v", fin)
			if fin.Dirty != fin.Racy {
				t.Errorf("Final acted on %d entries of an unchanged tree, only %d of them racy", fin.Dirty, fin.Racy)
			}

			checkCanary()
			compareTrees(t, src, dst)

			// Nothing outside dst was created or changed.
			if after := listing(t, outside); after != outsideBefore {
				t.Errorf("the tree outside the source changed:\n%s\nwas\n%s", after, outsideBefore)
			}
			mntAfter, _ := filepath.Glob(filepath.Join(mnt, "*"))
			if want := append(mntBefore, dst); !sameSet(mntAfter, want) {
				t.Errorf("entries next to dst: %v, want %v", mntAfter, want)
			}
			// Not a byte of the symlinks' targets was copied.
			secrets := [][]byte{[]byte("CANARY-")}
			if shadow, err := os.ReadFile("/etc/shadow"); err == nil && len(shadow) > 0 {
				secrets = append(secrets, shadow)
			}
			forEachFile(t, dst, func(rel string, data []byte) {
				for _, s := range secrets {
					if bytes.Contains(data, s) {
						t.Errorf("%s holds content from outside the source", rel)
					}
				}
			})
			// The sparse file stayed sparse.
			var st unix.Stat_t
			must(t, unix.Stat(filepath.Join(dst, "sparse"), &st))
			if st.Size != sparseSize || st.Blocks*512 > 1<<20 {
				t.Errorf("sparse copy: size %d, %d bytes allocated", st.Size, st.Blocks*512)
			}
		})
	}
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}
