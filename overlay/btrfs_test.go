//go:build linux

package overlay

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
)

// TestRemovedSubvolumeCleanedAtOnce: a released btrfs capture is cleaned
// up by the kernel right away, not at the next periodic commit (30 s
// later), when it would hold up the snapshot of a later capture taken
// under a freeze. WaitSubvolumesCleaned then has nothing to wait for.
func TestRemovedSubvolumeCleanedAtOnce(t *testing.T) {
	testutil.RequireRoot(t)
	mnt := testutil.LoopFS(t, "btrfs", 512<<20)
	fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if _, err := deletedSubvolumes(fd); err != nil {
		testutil.SkipOrFail(t, "this kernel cannot count deleted btrfs subvolumes (6.13+): %v", err)
	}
	sub := filepath.Join(mnt, "released")
	if err := CreateSubvolume(sub); err != nil {
		t.Fatal(err)
	}
	for i := range 5000 {
		if err := os.WriteFile(filepath.Join(sub, fmt.Sprintf("f%05d", i)), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := SyncFS(mnt); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := RemoveTree(sub); err != nil {
		t.Fatal(err)
	}
	for {
		n, err := deletedSubvolumes(fd)
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			break
		}
		if time.Since(start) > 10*time.Second {
			t.Fatalf("%d deleted subvolumes still not cleaned up after %v", n, time.Since(start))
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("cleaned up %v after the removal", time.Since(start))
	start = time.Now()
	if err := WaitSubvolumesCleaned(context.Background(), mnt, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("WaitSubvolumesCleaned waited %v with nothing to clean", d)
	}

	// A subvolume deleted by someone else, without starting its clean-up:
	// WaitSubvolumesCleaned starts it, and waits for it.
	other := filepath.Join(mnt, "other")
	if err := CreateSubvolume(other); err != nil {
		t.Fatal(err)
	}
	for i := range 5000 {
		if err := os.WriteFile(filepath.Join(other, fmt.Sprintf("f%05d", i)), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := SyncFS(mnt); err != nil {
		t.Fatal(err)
	}
	var args btrfsVolArgs
	copy(args.name[:], "other")
	if err := ioctl(fd, btrfsIocSnapDestroy, unsafe.Pointer(&args)); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	if err := WaitSubvolumesCleaned(context.Background(), mnt, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if n, err := deletedSubvolumes(fd); err != nil || n != 0 {
		t.Fatalf("%d deleted subvolumes left after WaitSubvolumesCleaned (%v), which took %v", n, err, time.Since(start))
	}
	t.Logf("waited %v for a deleted subvolume's clean-up", time.Since(start))
}
