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
	btrfsIocTreeSearch     = 0xd0009411 // _IOWR(0x94, 17, struct btrfs_ioctl_search_args)
	btrfsIocInoLookup      = 0xd0009412 // _IOWR(0x94, 18, struct btrfs_ioctl_ino_lookup_args)
	btrfsRootTreeObjectid  = 1
	btrfsRootItemKey       = 132
	btrfsSubvolRdonly      = 1 << 1
	btrfsFirstFreeObjectid = 256 // inode number of a subvolume's root
)

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

// btrfsInoLookupArgs is struct btrfs_ioctl_ino_lookup_args; with treeid 0
// and objectid 256 it answers the ID of the subvolume holding the fd.
type btrfsInoLookupArgs struct {
	treeid   uint64
	objectid uint64
	name     [4080]byte
}

// btrfsSearchArgs is struct btrfs_ioctl_search_args: a key range, then the
// items found.
type btrfsSearchArgs struct {
	treeID                   uint64
	minObjectid, maxObjectid uint64
	minOffset, maxOffset     uint64
	minTransid, maxTransid   uint64
	minType, maxType         uint32
	nrItems                  uint32
	_                        uint32
	_                        [4]uint64
	buf                      [4096 - 104]byte
}

// SubvolumeID returns the ID (root tree objectid) of the subvolume whose
// root is path.
func SubvolumeID(path string) (uint64, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("open subvolume %s: %w", path, err)
	}
	defer unix.Close(fd)
	args := btrfsInoLookupArgs{objectid: btrfsFirstFreeObjectid}
	if err := ioctl(fd, btrfsIocInoLookup, unsafe.Pointer(&args)); err != nil {
		return 0, fmt.Errorf("btrfs subvolume ID of %s: %w", path, err)
	}
	return args.treeid, nil
}

// SubvolumeExists reports whether the btrfs filesystem holding dir still
// has the subvolume id: a deleted subvolume exists until the kernel's
// cleaner has dropped every block it held. It reads the root tree as it
// is now, not as last committed (BTRFS_IOC_TREE_SEARCH, any kernel;
// BTRFS_IOC_SUBVOL_SYNC_WAIT, 6.13, only polls once a second).
func SubvolumeExists(dir string, id uint64) (bool, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, fmt.Errorf("open %s: %w", dir, err)
	}
	defer unix.Close(fd)
	args := btrfsSearchArgs{
		treeID:      btrfsRootTreeObjectid,
		minObjectid: id, maxObjectid: id,
		maxOffset:  ^uint64(0),
		maxTransid: ^uint64(0),
		minType:    btrfsRootItemKey, maxType: btrfsRootItemKey,
		nrItems: 1,
	}
	if err := ioctl(fd, btrfsIocTreeSearch, unsafe.Pointer(&args)); err != nil {
		return false, fmt.Errorf("search the btrfs root tree of %s: %w", dir, err)
	}
	return args.nrItems > 0, nil
}

// WaitSubvolumeGone waits until the deleted subvolume id is cleaned up
// (see SubvolumeExists), checking every poll, or until ctx ends.
func WaitSubvolumeGone(ctx context.Context, dir string, id uint64, poll time.Duration) error {
	for {
		exists, err := SubvolumeExists(dir, id)
		if err != nil || !exists {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("deleted btrfs subvolume %d still being cleaned up: %w", id, context.Cause(ctx))
		case <-time.After(poll):
		}
	}
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
		// only from the next transaction commit on, up to 30 s later:
		// start it now, so that the space is back at once.
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
