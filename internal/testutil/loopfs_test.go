//go:build linux

package testutil

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestLoopFS(t *testing.T) {
	RequireRoot(t)
	for _, tc := range []struct {
		fstype string
		size   int64
		magic  int64
	}{
		{"ext4", 64 << 20, unix.EXT4_SUPER_MAGIC},
		{"xfs", 320 << 20, unix.XFS_SUPER_MAGIC},
		{"btrfs", 256 << 20, unix.BTRFS_SUPER_MAGIC},
	} {
		var mnt string
		t.Run(tc.fstype, func(t *testing.T) {
			mnt = LoopFS(t, tc.fstype, tc.size)
			var st unix.Statfs_t
			if err := unix.Statfs(mnt, &st); err != nil {
				t.Fatal(err)
			}
			if st.Type != tc.magic {
				t.Fatalf("%s is a filesystem of type %#x, want %#x", mnt, st.Type, tc.magic)
			}
			if err := os.WriteFile(filepath.Join(mnt, "f"), []byte("data"), 0o644); err != nil {
				t.Fatal(err)
			}
			if got := st.Blocks * uint64(st.Bsize); got > uint64(tc.size) {
				t.Fatalf("filesystem of %d bytes in an image of %d", got, tc.size)
			}
		})
		if mnt == "" {
			continue // skipped
		}
		// The subtest's cleanup has run: nothing may be left behind.
		mounts, err := os.ReadFile("/proc/self/mountinfo")
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(mounts), " "+mnt+" ") {
			t.Errorf("%s is still mounted", mnt)
		}
		if _, err := os.Stat(filepath.Dir(mnt)); !os.IsNotExist(err) {
			t.Errorf("image directory %s not removed: %v", filepath.Dir(mnt), err)
		}
		// A detached loop device has no backing file any more.
		backing, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
		for _, b := range backing {
			if data, err := os.ReadFile(b); err == nil && strings.HasPrefix(string(data), filepath.Dir(mnt)) {
				t.Errorf("%s still backs %s", strings.TrimSpace(string(data)), b)
			}
		}
	}
}
