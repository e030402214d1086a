//go:build linux

package testutil

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// LoopFS makes a filesystem of type fstype ("ext4", "xfs", "btrfs", ...) in
// a sparse image file of size bytes, mounts it through a loop device and
// returns the mount point. The test's cleanup unmounts it, detaches the
// loop device and deletes the image. Extra mkfs arguments go before the
// image path. xfs needs at least 300 MiB, btrfs about 120 MiB.
//
// It needs root, mkfs.<fstype>, losetup and loop devices: without them it
// skips the test, or fails it in CI (SkipOrFail). The image lives under
// /var/tmp, not on a tmpfs /tmp that would hold it in memory.
func LoopFS(t testing.TB, fstype string, size int64, mkfsArgs ...string) string {
	t.Helper()
	RequireRoot(t)
	mkfs, err := exec.LookPath("mkfs." + fstype)
	if err != nil {
		SkipOrFail(t, "mkfs.%s is not installed: %v", fstype, err)
	}
	losetup, err := exec.LookPath("losetup")
	if err != nil {
		SkipOrFail(t, "losetup is not installed: %v", err)
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		SkipOrFail(t, "no loop devices: %v", err)
	}

	dir, err := os.MkdirTemp(imageDir(), "loopfs-"+fstype+"-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	image := filepath.Join(dir, "image")
	f, err := os.Create(image)
	if err == nil {
		err = f.Truncate(size)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err != nil {
		t.Fatalf("LoopFS: image: %v", err)
	}

	args := append(defaultMkfsArgs(fstype), mkfsArgs...)
	if out, err := exec.Command(mkfs, append(args, image)...).CombinedOutput(); err != nil {
		t.Fatalf("LoopFS: mkfs.%s %s: %v\n%s", fstype, strings.Join(args, " "), err, out)
	}

	out, err := exec.Command(losetup, "--find", "--show", image).CombinedOutput()
	if err != nil {
		SkipOrFail(t, "LoopFS: no loop device for %s: losetup: %v: %s", image, err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command(losetup, "--detach", dev).CombinedOutput(); err != nil {
			t.Errorf("LoopFS: losetup --detach %s: %v: %s", dev, err, out)
		}
	})

	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(dev, mnt, fstype, 0, defaultMountData(fstype)); err != nil {
		if errors.Is(err, unix.ENODEV) {
			SkipOrFail(t, "LoopFS: the kernel has no %s: %v", fstype, err)
		}
		t.Fatalf("LoopFS: mount %s on %s: %v", dev, mnt, err)
	}
	t.Cleanup(func() {
		var err error
		for i := 0; i < 50; i++ { // a file closed just now can keep it busy for a moment
			if err = unix.Unmount(mnt, 0); err != unix.EBUSY {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err == unix.EBUSY {
			// containerd's mount code mounts overlays with long lowerdir
			// options from a thread that unshared its cwd into the common
			// prefix directory, and that thread can outlive the test in
			// the pool, pinning the filesystem. Detach it lazily.
			t.Logf("LoopFS: %s still busy (a thread's cwd?); detaching it lazily", mnt)
			err = unix.Unmount(mnt, unix.MNT_DETACH)
		}
		if err != nil {
			t.Errorf("LoopFS: unmount %s: %v", mnt, err)
		}
	})
	return mnt
}

func imageDir() string {
	if fi, err := os.Stat("/var/tmp"); err == nil && fi.IsDir() {
		return "/var/tmp"
	}
	return os.TempDir()
}

func defaultMkfsArgs(fstype string) []string {
	switch fstype {
	case "xfs":
		return []string{"-q", "-f", "-m", "reflink=1"}
	case "btrfs":
		return []string{"-q", "-f"}
	case "ext2", "ext3", "ext4":
		return []string{"-q", "-F"}
	}
	return nil
}

func defaultMountData(fstype string) string {
	if fstype == "ext4" {
		// No background inode-table zeroing: it would only slow tests down.
		return "noinit_itable"
	}
	return ""
}
