//go:build linux

package overlay

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
)

// TestRemovedSubvolumeCleanedAtOnce: the kernel starts cleaning up a
// released btrfs capture right away (its space comes back at once), not
// at the next periodic commit, up to 30 s later.
func TestRemovedSubvolumeCleanedAtOnce(t *testing.T) {
	testutil.RequireRoot(t)
	mnt := testutil.LoopFS(t, "btrfs", 512<<20)
	fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	pending := func() int {
		if n, err := deletedSubvolumes(fd); err == nil {
			return int(n)
		}
		// Before Linux 6.13: ask btrfs-progs.
		out, err := exec.Command("btrfs", "subvolume", "list", "-d", mnt).Output()
		if err != nil {
			t.Fatalf("btrfs subvolume list -d: %v", err)
		}
		return len(strings.Fields(string(out)))
	}
	sub := filledSubvolume(t, filepath.Join(mnt, "released"), 5000)
	start := time.Now()
	if err := RemoveTree(sub); err != nil {
		t.Fatal(err)
	}
	for {
		n := pending()
		if n == 0 {
			break
		}
		if time.Since(start) > 10*time.Second {
			t.Fatalf("%d deleted subvolumes still not cleaned up after %v", n, time.Since(start))
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("cleaned up %v after the removal", time.Since(start))
}

// filledSubvolume creates dir as a subvolume holding n one-byte files,
// committed to disk.
func filledSubvolume(t *testing.T, dir string, n int) string {
	t.Helper()
	if err := CreateSubvolume(dir); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%05d", i)), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := SyncFS(dir); err != nil {
		t.Fatal(err)
	}
	return dir
}

// BTRFS_IOC_SUBVOL_SYNC_WAIT (Linux 6.13) in its BTRFS_SUBVOL_SYNC_COUNT
// mode: how many deleted subvolumes are queued for cleaning.
const (
	btrfsIocSubvolSyncWait = 0x40109441 // _IOW(0x94, 65, struct btrfs_ioctl_subvol_wait)
	btrfsSubvolSyncCount   = 2
)

type btrfsSubvolWait struct {
	subvolid uint64
	mode     uint32
	count    uint32
}

// deletedSubvolumes counts the deleted subvolumes not cleaned up yet on
// the btrfs filesystem of fd.
func deletedSubvolumes(fd int) (uint32, error) {
	args := btrfsSubvolWait{mode: btrfsSubvolSyncCount}
	err := ioctl(fd, btrfsIocSubvolSyncWait, unsafe.Pointer(&args))
	return args.count, err
}

// TestWaitSubvolumeGone: a deleted subvolume is reported as existing
// until the kernel has dropped it, and WaitSubvolumeGone returns once it
// has; a live subvolume is never reported gone.
func TestWaitSubvolumeGone(t *testing.T) {
	testutil.RequireRoot(t)
	mnt := testutil.LoopFS(t, "btrfs", 512<<20)
	live := filledSubvolume(t, filepath.Join(mnt, "live"), 0)
	released := filledSubvolume(t, filepath.Join(mnt, "released"), 5000)
	liveID, err := SubvolumeID(live)
	if err != nil {
		t.Fatal(err)
	}
	id, err := SubvolumeID(released)
	if err != nil {
		t.Fatal(err)
	}
	if id < btrfsFirstFreeObjectid || id == liveID {
		t.Fatalf("subvolume IDs: live %d, released %d", liveID, id)
	}
	if exists, err := SubvolumeExists(mnt, id); err != nil || !exists {
		t.Fatalf("SubvolumeExists before removal = %v, %v; want true", exists, err)
	}
	start := time.Now()
	if err := RemoveTree(released); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := WaitSubvolumeGone(ctx, mnt, id, 5*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	t.Logf("dropped %v after the removal", time.Since(start))
	if exists, err := SubvolumeExists(mnt, id); err != nil || exists {
		t.Fatalf("SubvolumeExists after the drop = %v, %v; want false", exists, err)
	}
	if exists, err := SubvolumeExists(mnt, liveID); err != nil || !exists {
		t.Fatalf("SubvolumeExists of the live subvolume = %v, %v; want true", exists, err)
	}
	// A subvolume still being dropped: the wait ends with ctx, saying so.
	expired, cancel := context.WithCancel(context.Background())
	cancel()
	if exists, _ := SubvolumeExists(mnt, liveID); exists {
		if err := WaitSubvolumeGone(expired, mnt, liveID, time.Millisecond); err == nil || !strings.Contains(err.Error(), "still being cleaned up") {
			t.Fatalf("WaitSubvolumeGone of a live subvolume with an ended context = %v", err)
		}
	}
}
