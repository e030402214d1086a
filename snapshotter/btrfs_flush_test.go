//go:build linux

package snapshotter

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
	"github.com/seamless-snapshotter/seamless-snapshotter/overlay"
)

// TestBtrfsPreCopyFlushes: the btrfs strategy commits what the container
// wrote before the freeze. A snapshot commits a btrfs transaction, which
// writes out everything changed since the previous one: taken right after
// a container created 100k files, the snapshot took 0.3 s, under the
// freeze. Flushed first (PreCopy, while the container runs), the snapshot
// only writes what changed since, and took 20 ms.
func TestBtrfsPreCopyFlushes(t *testing.T) {
	ctx := context.Background()
	testutil.RequireRoot(t)
	mnt := testutil.LoopFS(t, "btrfs", 256<<20)
	dev := mountSource(t, mnt)
	// No periodic commit (every 30 s by default) during the test: it
	// would commit the writes in the flush's place.
	if err := unix.Mount("", mnt, "", unix.MS_REMOUNT, "commit=300"); err != nil {
		t.Fatal(err)
	}

	// A snapshot directory as a container leaves it after a burst of
	// writes: the subvolume committed, the files not.
	src := filepath.Join(mnt, "snapshot")
	if err := overlay.CreateSubvolume(src); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(src, "fs"), 0o755); err != nil {
		t.Fatal(err)
	}
	unix.Sync()
	const files = 20000
	for i := range files {
		if err := os.WriteFile(filepath.Join(src, "fs", fmt.Sprintf("f%05d", i)), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	last := filepath.Join(src, "fs", fmt.Sprintf("f%05d", files-1))
	written := inodeGeneration(t, last)
	if committed := committedGeneration(t, dev); committed >= written {
		t.Fatalf("set-up: the files (transaction %d) are committed already (%d): the test cannot tell a flush", written, committed)
	}

	s := &subvolumeSnapshot{src: src, dst: filepath.Join(mnt, "capture")}
	defer s.close()
	if !s.needsPreCopy() {
		t.Fatal("the btrfs strategy does not flush before the freeze")
	}
	stats, err := s.PreCopy(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if committed := committedGeneration(t, dev); committed < written {
		t.Fatalf("after the pre-copy the filesystem has committed transaction %d, the files are in %d: the snapshot under the freeze would write them out", committed, written)
	}
	start := time.Now()
	var thawed []time.Duration
	if _, err := s.final(ctx, nil, func() { thawed = append(thawed, time.Since(start)) }); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d new files: flushed in %v, then snapshotted in %v, settled after %v", files, stats.Duration, time.Since(start), thawed)
	if len(thawed) != 1 {
		t.Errorf("the capture thawed the writers %d times, want once", len(thawed))
	}
	if _, err := os.Stat(filepath.Join(s.dst, "fs", filepath.Base(last))); err != nil {
		t.Fatalf("the snapshot lacks the last file written: %v", err)
	}
}

// mountSource returns the device mounted at mnt.
func mountSource(t *testing.T, mnt string) string {
	t.Helper()
	mountinfo, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(mountinfo), "\n") {
		before, after, ok := strings.Cut(line, " - ")
		fields, rest := strings.Fields(before), strings.Fields(after)
		if ok && len(fields) >= 5 && fields[4] == mnt && len(rest) >= 2 {
			return rest[1] // fstype, source, options
		}
	}
	t.Fatalf("%s is not in /proc/self/mountinfo", mnt)
	return ""
}

// inodeGeneration is a btrfs file's generation: the transaction that
// created it (FS_IOC_GETVERSION).
func inodeGeneration(t *testing.T, p string) uint64 {
	t.Helper()
	const fsIocGetversion = 0x80087601 // _IOR('v', 1, long)
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var gen int64
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocGetversion, uintptr(unsafe.Pointer(&gen))); errno != 0 {
		t.Fatalf("FS_IOC_GETVERSION %s: %v", p, errno)
	}
	return uint64(gen)
}

// committedGeneration reads the generation of the btrfs superblock on dev:
// the last transaction committed to disk. O_DIRECT, so that no cached
// copy of the device's blocks answers.
func committedGeneration(t *testing.T, dev string) uint64 {
	t.Helper()
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	// O_DIRECT needs an aligned buffer: a page of its own.
	buf, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(buf)
	const superOffset = 64 << 10 // the primary superblock
	if n, err := unix.Pread(fd, buf, superOffset); err != nil || n != len(buf) {
		t.Fatalf("reading the superblock of %s: %d bytes, %v", dev, n, err)
	}
	// struct btrfs_super_block: csum[32], fsid[16], bytenr, flags, magic,
	// generation (little-endian u64s).
	if magic := string(buf[64:72]); magic != "_BHRfS_M" {
		t.Fatalf("%s has no btrfs superblock (magic %q)", dev, magic)
	}
	return binary.LittleEndian.Uint64(buf[72:80])
}
