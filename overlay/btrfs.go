//go:build linux

package overlay

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The btrfs ioctls the btrfs capture strategy needs, from
// include/uapi/linux/btrfs.h. Written here because containerd/btrfs needs
// cgo and the btrfs headers for three calls.
const (
	btrfsIocSubvolCreate   = 0x5000940e // _IOW(0x94, 14, struct btrfs_ioctl_vol_args)
	btrfsIocSnapDestroy    = 0x5000940f // _IOW(0x94, 15, struct btrfs_ioctl_vol_args)
	btrfsIocSnapCreateV2   = 0x50009417 // _IOW(0x94, 23, struct btrfs_ioctl_vol_args_v2)
	btrfsIocSync           = 0x9408     // _IO(0x94, 8)
	btrfsIocSubvolSyncWait = 0x40109441 // _IOW(0x94, 65, struct btrfs_ioctl_subvol_wait), Linux 6.13
	btrfsSubvolSyncCount   = 2          // BTRFS_SUBVOL_SYNC_COUNT: how many deleted subvolumes wait for cleaning
	btrfsSubvolRdonly      = 1 << 1
	btrfsFirstFreeObjectid = 256 // inode number of a subvolume's root
)

type btrfsSubvolWait struct {
	subvolid uint64
	mode     uint32
	count    uint32
}

type btrfsVolArgs struct {
	fd   int64
	name [4088]byte
}

type btrfsVolArgsV2 struct {
	fd      int64
	transid uint64
	flags   uint64
	unused  [4]uint64
	name    [4040]byte
}

// IsBtrfs reports whether path is on btrfs.
func IsBtrfs(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == unix.BTRFS_SUPER_MAGIC
}

// IsSubvolume reports whether path is the root of a btrfs subvolume.
func IsSubvolume(path string) bool {
	var st unix.Stat_t
	if unix.Lstat(path, &st) != nil || st.Ino != btrfsFirstFreeObjectid || st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return false
	}
	return IsBtrfs(path)
}

func withParent(path string, fn func(parentFD int, name string) error) error {
	parent, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer parent.Close()
	name := filepath.Base(path)
	if len(name) >= 4040 {
		return fmt.Errorf("btrfs: name %q too long", name)
	}
	return fn(int(parent.Fd()), name)
}

// CreateSubvolume creates path as a new, empty btrfs subvolume.
func CreateSubvolume(path string) error {
	return withParent(path, func(parentFD int, name string) error {
		var args btrfsVolArgs
		copy(args.name[:], name)
		if err := ioctl(parentFD, btrfsIocSubvolCreate, unsafe.Pointer(&args)); err != nil {
			return fmt.Errorf("create btrfs subvolume %s: %w", path, err)
		}
		return nil
	})
}

// SyncFS flushes the filesystem holding path (syncfs(2)). On btrfs it
// commits the running transaction, so that the next one, which a
// snapshot commits, only holds what changed since.
func SyncFS(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		return fmt.Errorf("syncfs %s: %w", path, err)
	}
	return nil
}

// WaitSubvolumesCleaned waits, at most max, until the kernel has cleaned
// up the subvolumes deleted on the btrfs filesystem holding path. A
// snapshot commits a transaction, and the cleaning of a large deleted
// subvolume (a released 100,000-file capture) in the same transactions
// held it up for up to a quarter of a second, under a freeze: better
// waited for before. The kernel starts that cleaning only at a
// transaction commit (every 30 s by default), so it is started first.
// Kernels that cannot count deleted subvolumes (before 6.13) do not wait.
func WaitSubvolumesCleaned(ctx context.Context, path string, max time.Duration) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	defer unix.Close(fd)
	deadline := time.Now().Add(max)
	for kicked := false; ; kicked = true {
		if n, err := deletedSubvolumes(fd); err != nil || n == 0 {
			return nil
		}
		if !kicked {
			if err := ioctl(fd, btrfsIocSync, nil); err != nil {
				return fmt.Errorf("sync btrfs %s: %w", path, err)
			}
		}
		if time.Now().After(deadline) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// deletedSubvolumes counts the deleted subvolumes not cleaned up yet on
// the btrfs filesystem of fd.
func deletedSubvolumes(fd int) (uint32, error) {
	args := btrfsSubvolWait{mode: btrfsSubvolSyncCount}
	err := ioctl(fd, btrfsIocSubvolSyncWait, unsafe.Pointer(&args))
	return args.count, err
}

// SnapshotReadonly creates dst as a read-only snapshot of the subvolume
// src: a point-in-time copy in constant time, whatever src holds.
func SnapshotReadonly(src, dst string) error {
	sfd, err := unix.Open(src, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open subvolume %s: %w", src, err)
	}
	defer unix.Close(sfd)
	return withParent(dst, func(parentFD int, name string) error {
		args := btrfsVolArgsV2{fd: int64(sfd), flags: btrfsSubvolRdonly}
		copy(args.name[:], name)
		if err := ioctl(parentFD, btrfsIocSnapCreateV2, unsafe.Pointer(&args)); err != nil {
			return fmt.Errorf("snapshot btrfs subvolume %s to %s: %w", src, dst, err)
		}
		return nil
	})
}

// RemoveTree removes path, deleting it as a subvolume when it is one (a
// read-only snapshot cannot be emptied file by file). A missing path is
// not an error.
func RemoveTree(path string) error {
	if !IsSubvolume(path) {
		return os.RemoveAll(path)
	}
	return withParent(path, func(parentFD int, name string) error {
		var args btrfsVolArgs
		copy(args.name[:], name)
		err := ioctl(parentFD, btrfsIocSnapDestroy, unsafe.Pointer(&args))
		if err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("delete btrfs subvolume %s: %w", path, err)
		}
		// The kernel cleans a deleted subvolume up in the background, but
		// only from the next transaction commit on, up to 30 s later, when
		// it may be a snapshot's under a freeze: start it now.
		_ = ioctl(parentFD, btrfsIocSync, nil)
		return nil
	})
}

func ioctl(fd int, req uintptr, arg unsafe.Pointer) error {
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg)); errno != 0 {
		return errno
	}
	return nil
}
