//go:build linux

package overlay

import (
	"context"
	"encoding/binary"
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
		return snapshotReadonly(sfd, parentFD, name, src, dst)
	})
}

func snapshotReadonly(srcFD, parentFD int, name, src, dst string) error {
	args := btrfsVolArgsV2{fd: int64(srcFD), flags: btrfsSubvolRdonly}
	copy(args.name[:], name)
	if err := ioctl(parentFD, btrfsIocSnapCreateV2, unsafe.Pointer(&args)); err != nil {
		return fmt.Errorf("snapshot btrfs subvolume %s to %s: %w", src, dst, err)
	}
	return nil
}

// PendingSnapshot is a read-only snapshot being made by
// StartSnapshotReadonly.
type PendingSnapshot struct {
	settled  chan struct{}
	finished chan struct{}
	err      error
}

// Settled is closed once the snapshot's content no longer depends on
// what happens to the source, while the ioctl may still be writing the
// transaction out; at the latest, when the ioctl returns, whether it
// succeeded or not.
func (p *PendingSnapshot) Settled() <-chan struct{} { return p.settled }

// Wait waits for the snapshot ioctl to return, and returns its error.
func (p *PendingSnapshot) Wait() error {
	<-p.finished
	return p.err
}

// StartSnapshotReadonly starts SnapshotReadonly(src, dst) and watches for
// the moment its content is settled, which comes well before the ioctl
// returns.
//
// A snapshot is created inside a transaction commit, while no handle on
// the transaction is held and none can be taken: the kernel copies the
// source's root node, forces every later change to the source to copy
// the blocks it touches (BTRFS_ROOT_FORCE_COW), and only then records the
// new root and its reference from the parent directory in the root tree.
// From then on the snapshot is what the source was; the rest of the
// ioctl writes the transaction's blocks and the superblocks out and waits
// for the device's flushes (on a loop device or a busy disk, most of its
// time). Those writes make the snapshot durable, not more consistent. The
// watcher polls the root tree as it is in memory (BTRFS_IOC_TREE_SEARCH,
// not the committed tree) for the new reference. If it cannot, the
// snapshot is settled when the ioctl returns.
func StartSnapshotReadonly(src, dst string) (*PendingSnapshot, error) {
	prepared, err := PrepareSnapshotReadonly(src, dst)
	if err != nil {
		return nil, err
	}
	return prepared.Start(), nil
}

// PreparedSnapshot is StartSnapshotReadonly's set-up, done ahead: its
// descriptors are open and the watch knows where to look, so that Start,
// under a freeze, only starts the ioctl. Start or Close it, once.
type PreparedSnapshot struct {
	srcFD, parentFD int
	name, src, dst  string
	watch           *rootRefWatch // nil if the root tree cannot be searched
}

// PrepareSnapshotReadonly opens what a snapshot of src at dst needs and
// reads where the root tree will record it: on a host with many
// subvolumes, several searches, better done before a freeze than in it.
// A subvolume created in between (another capture) changes nothing: the
// watch matches the new one by directory and name.
func PrepareSnapshotReadonly(src, dst string) (*PreparedSnapshot, error) {
	srcFD, err := unix.Open(src, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open subvolume %s: %w", src, err)
	}
	parentFD, err := unix.Open(filepath.Dir(dst), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Close(srcFD)
		return nil, fmt.Errorf("open %s: %w", filepath.Dir(dst), err)
	}
	name := filepath.Base(dst)
	if len(name) >= 4040 {
		unix.Close(srcFD)
		unix.Close(parentFD)
		return nil, fmt.Errorf("btrfs: name %q too long", name)
	}
	// The watch has a descriptor of its own: the ioctl's is closed when
	// the ioctl returns, which may be while the watch is polling. Without
	// a watch, the snapshot is settled when the ioctl returns.
	watch, _ := newRootRefWatch(parentFD, name)
	return &PreparedSnapshot{srcFD: srcFD, parentFD: parentFD, name: name, src: src, dst: dst, watch: watch}, nil
}

// Close releases a snapshot that was prepared and not started.
func (ps *PreparedSnapshot) Close() {
	unix.Close(ps.srcFD)
	unix.Close(ps.parentFD)
	if ps.watch != nil {
		ps.watch.close()
	}
}

// Start starts the snapshot ioctl and the watch for its settling.
func (ps *PreparedSnapshot) Start() *PendingSnapshot {
	p := &PendingSnapshot{settled: make(chan struct{}), finished: make(chan struct{})}
	go func() {
		p.err = snapshotReadonly(ps.srcFD, ps.parentFD, ps.name, ps.src, ps.dst)
		unix.Close(ps.srcFD)
		unix.Close(ps.parentFD)
		close(p.finished)
	}()
	go func() {
		defer close(p.settled)
		watch := ps.watch
		if watch == nil {
			<-p.finished
			return
		}
		defer watch.close()
		for {
			select {
			case <-p.finished:
				return
			default:
			}
			found, err := watch.found()
			if err != nil {
				<-p.finished
				return
			}
			if found {
				return
			}
			// Not a busy loop: the commit needs the CPU, and the tree
			// locks the search takes.
			time.Sleep(settlePoll)
		}
	}()
	return p
}

// settlePoll is how often StartSnapshotReadonly looks for the settled
// snapshot. Spinning instead made the commit itself slower on a 2-CPU
// machine (median 6.1 ms instead of 5.3).
const settlePoll = 50 * time.Microsecond

const (
	// BTRFS_ROOT_REF_KEY: in the root tree, (parent subvolume, ROOT_REF,
	// child subvolume) holds the child's directory and name in its
	// parent.
	btrfsRootRefKey      = 156
	btrfsSearchHeaderLen = 32 // struct btrfs_ioctl_search_header
	btrfsRootRefLen      = 18 // struct btrfs_root_ref, before the name
)

// rootRefWatch looks for a new subvolume named name in the directory
// parentFD, by its ROOT_REF item.
type rootRefWatch struct {
	parentFD   int
	parentID   uint64 // the subvolume holding the directory
	dirIno     uint64
	name       string
	minChildID uint64 // subvolume IDs only grow: the new one is above all
}

func newRootRefWatch(dirFD int, name string) (_ *rootRefWatch, retErr error) {
	fd, err := unix.Dup(dirFD)
	if err != nil {
		return nil, err
	}
	unix.CloseOnExec(fd)
	w := &rootRefWatch{parentFD: fd, name: name}
	defer func() {
		if retErr != nil {
			w.close()
		}
	}()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, err
	}
	w.dirIno = st.Ino
	args := btrfsInoLookupArgs{objectid: btrfsFirstFreeObjectid}
	if err := ioctl(fd, btrfsIocInoLookup, unsafe.Pointer(&args)); err != nil {
		return nil, err
	}
	w.parentID = args.treeid
	// Start above the children the parent has now.
	var above uint64
	if err := w.scan(func(child uint64, _ uint64, _ string) bool {
		above = max(above, child+1)
		return false
	}); err != nil {
		return nil, err
	}
	w.minChildID = above
	return w, nil
}

func (w *rootRefWatch) close() { unix.Close(w.parentFD) }

func (w *rootRefWatch) found() (bool, error) {
	var found bool
	err := w.scan(func(_ uint64, dirIno uint64, name string) bool {
		found = dirIno == w.dirIno && name == w.name
		return found
	})
	return found, err
}

// scan calls fn for each ROOT_REF of the parent subvolume from
// minChildID on, until fn returns true.
func (w *rootRefWatch) scan(fn func(child, dirIno uint64, name string) bool) error {
	from := w.minChildID
	for {
		args := btrfsSearchArgs{
			treeID:      btrfsRootTreeObjectid,
			minObjectid: w.parentID, maxObjectid: w.parentID,
			minOffset: from, maxOffset: ^uint64(0),
			maxTransid: ^uint64(0),
			minType:    btrfsRootRefKey, maxType: btrfsRootRefKey,
			nrItems: ^uint32(0),
		}
		if err := ioctl(w.parentFD, btrfsIocTreeSearch, unsafe.Pointer(&args)); err != nil {
			return fmt.Errorf("search the btrfs root tree: %w", err)
		}
		if args.nrItems == 0 {
			return nil
		}
		buf := args.buf[:]
		for i := uint32(0); i < args.nrItems; i++ {
			// struct btrfs_ioctl_search_header, then the item: struct
			// btrfs_root_ref (dirid, sequence, name_len) and the name.
			if len(buf) < btrfsSearchHeaderLen {
				return fmt.Errorf("search the btrfs root tree: short result")
			}
			// The header is the kernel's, in the CPU's byte order; items
			// are as on disk, little-endian.
			child := binary.NativeEndian.Uint64(buf[16:])
			itemType := binary.NativeEndian.Uint32(buf[24:])
			itemLen := int(binary.NativeEndian.Uint32(buf[28:]))
			item := buf[btrfsSearchHeaderLen:]
			if len(item) < itemLen {
				return fmt.Errorf("search the btrfs root tree: short item")
			}
			item, buf = item[:itemLen], item[itemLen:]
			from = child + 1
			if itemType != btrfsRootRefKey || len(item) < btrfsRootRefLen {
				continue
			}
			nameLen := int(binary.LittleEndian.Uint16(item[16:]))
			if len(item) < btrfsRootRefLen+nameLen {
				continue
			}
			if fn(child, binary.LittleEndian.Uint64(item), string(item[btrfsRootRefLen:btrfsRootRefLen+nameLen])) {
				return nil
			}
		}
		// The kernel stops at the end of the range or when the next item
		// does not fit: room for the largest item left means the end.
		if from == 0 || len(buf) >= btrfsSearchHeaderLen+btrfsRootRefLen+255 {
			return nil
		}
	}
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
