//go:build linux

package capture

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
	"golang.org/x/sys/unix"
)

func TestReflink(t *testing.T) {
	xfs := testutil.LoopFS(t, "xfs", 1<<30)
	ext4 := testutil.LoopFS(t, "ext4", 256<<20)

	if !SupportsReflink(xfs) {
		t.Error("SupportsReflink is false on xfs with reflink=1")
	}
	if SupportsReflink(ext4) {
		t.Error("SupportsReflink is true on ext4")
	}
	for _, dir := range []string{xfs, ext4} {
		if leftovers, _ := filepath.Glob(filepath.Join(dir, ".reflink-probe-*")); len(leftovers) > 0 {
			t.Errorf("SupportsReflink left %v", leftovers)
		}
	}

	// Reflink asked for where it cannot work: an error the caller can
	// recognise, and no destination left behind.
	for _, tc := range []struct{ name, src, dst string }{
		{"ext4", filepath.Join(ext4, "src"), filepath.Join(ext4, "dst")},
		{"xfs to ext4", filepath.Join(xfs, "src"), filepath.Join(ext4, "dst2")},
	} {
		must(t, os.MkdirAll(tc.src, 0o755))
		_, err := NewCopier(tc.src, tc.dst, Options{Reflink: true})
		if !errors.Is(err, ErrReflinkUnsupported) {
			t.Errorf("%s: NewCopier with Reflink: %v, want ErrReflinkUnsupported", tc.name, err)
		}
		if _, err := os.Lstat(tc.dst); !os.IsNotExist(err) {
			t.Errorf("%s: %s left behind", tc.name, tc.dst)
		}
	}

	// Cloning 100 MB barely changes the space used.
	src, dst := filepath.Join(xfs, "src"), filepath.Join(xfs, "dst")
	writeFile(t, filepath.Join(src, "big"), randBytes(100<<20), 0o644)
	writeFile(t, filepath.Join(src, "small"), []byte("small"), 0o644)
	used := func() int64 {
		fd, err := unix.Open(xfs, unix.O_RDONLY|unix.O_DIRECTORY, 0)
		must(t, err)
		defer unix.Close(fd)
		must(t, unix.Syncfs(fd))
		var st unix.Statfs_t
		must(t, unix.Fstatfs(fd, &st))
		return int64(st.Blocks-st.Bfree) * st.Bsize
	}
	before := used()
	c, err := NewCopier(src, dst, Options{Reflink: true})
	must(t, err)
	st, err := c.PreCopy(context.Background())
	must(t, err)
	must(t, c.Sync())
	grew := used() - before
	t.Logf("PreCopy %+v; space used grew by %d bytes", st, grew)
	if grew > 10<<20 {
		t.Errorf("cloning 100 MB used %d bytes", grew)
	}
	// Rewriting the source does not touch the clone.
	f, err := os.OpenFile(filepath.Join(src, "big"), os.O_WRONLY, 0)
	must(t, err)
	_, err = f.WriteAt([]byte("changed"), 50<<20)
	must(t, err)
	must(t, f.Close())
	_, err = c.Final(context.Background(), nil)
	must(t, err)
	compareTrees(t, src, dst)
}
