//go:build linux

package capture

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// newCopier is NewCopier, closed at the end of the test.
func newCopier(t testing.TB, src, dst string, opts Options) *Copier {
	t.Helper()
	c, err := NewCopier(src, dst, opts)
	must(t, err)
	t.Cleanup(func() { must(t, c.Close()) })
	return c
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func writeFile(t testing.TB, p string, data []byte, mode os.FileMode) {
	t.Helper()
	must(t, os.WriteFile(p, data, mode))
	must(t, os.Chmod(p, mode))
}

// setTime sets atime and mtime of p without following a symlink.
func setTime(t testing.TB, p string, atime, mtime time.Time) {
	t.Helper()
	ts := []unix.Timespec{unix.NsecToTimespec(atime.UnixNano()), unix.NsecToTimespec(mtime.UnixNano())}
	must(t, unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW))
}

// capV2 is a security.capability value (VFS_CAP_REVISION_2, effective)
// granting cap_net_bind_service.
func capV2() []byte {
	b := make([]byte, 20)
	binary.LittleEndian.PutUint32(b[0:], 0x02000000|1)
	binary.LittleEndian.PutUint32(b[4:], 1<<unix.CAP_NET_BIND_SERVICE)
	return b
}

// mkdeep creates, below root, depth directories with names of nameLen
// bytes and a file "bottom" in the last one, through directory file
// descriptors (the path is longer than PATH_MAX). It returns the path of
// the file relative to root.
func mkdeep(t testing.TB, root string, depth, nameLen int, data []byte) string {
	t.Helper()
	fd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	must(t, err)
	var parts []string
	for i := 0; i < depth; i++ {
		name := fmt.Sprintf("%03d", i) + strings.Repeat("d", nameLen-3)
		parts = append(parts, name)
		must(t, unix.Mkdirat(fd, name, 0o755))
		nfd, err := unix.Openat(fd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		unix.Close(fd)
		must(t, err)
		fd = nfd
	}
	defer unix.Close(fd)
	ffd, err := unix.Openat(fd, "bottom", unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o640)
	must(t, err)
	_, err = unix.Write(ffd, data)
	unix.Close(ffd)
	must(t, err)
	return strings.Join(append(parts, "bottom"), "/")
}

// manyFiles creates n empty files in the new directory dir.
func manyFiles(t testing.TB, dir string, n int) {
	t.Helper()
	must(t, os.Mkdir(dir, 0o755))
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	must(t, err)
	defer unix.Close(fd)
	for i := 0; i < n; i++ {
		f, err := unix.Openat(fd, fmt.Sprintf("f%06d", i), unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o644)
		must(t, err)
		unix.Close(f)
	}
}

// watchCanary reports every access to the entries of dir (opening it
// included) through inotify, which sees opens and reads even with
// O_NOATIME. The returned function fails the test if there was any.
func watchCanary(t testing.TB, dir string) func() {
	t.Helper()
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	must(t, err)
	_, err = unix.InotifyAddWatch(fd, dir, unix.IN_OPEN|unix.IN_ACCESS|unix.IN_MODIFY|unix.IN_ATTRIB|
		unix.IN_CREATE|unix.IN_DELETE|unix.IN_MOVED_FROM|unix.IN_MOVED_TO|unix.IN_CLOSE_WRITE)
	must(t, err)
	return func() {
		t.Helper()
		defer unix.Close(fd)
		buf := make([]byte, 64<<10)
		n, err := unix.Read(fd, buf)
		if err == unix.EAGAIN {
			return
		}
		must(t, err)
		var events []string
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			name := strings.TrimRight(string(buf[off+unix.SizeofInotifyEvent:off+unix.SizeofInotifyEvent+int(ev.Len)]), "\x00")
			events = append(events, fmt.Sprintf("%#x %q", ev.Mask, name))
			off += unix.SizeofInotifyEvent + int(ev.Len)
		}
		t.Errorf("the canary %s outside the source was accessed: %v", dir, events)
	}
}

// listing is a recursive name/size/mtime listing, to check that a tree
// did not change.
func listing(t testing.TB, root string) string {
	t.Helper()
	var lines []string
	must(t, filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		lines = append(lines, fmt.Sprintf("%s %v %d %d", p, fi.Mode(), fi.Size(), fi.ModTime().UnixNano()))
		return nil
	}))
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// converge runs pre-copy rounds until one finds nothing dirty, waiting out
// the racy margin between rounds.
func converge(t testing.TB, c *Copier) {
	t.Helper()
	for i := 0; i < 10; i++ {
		time.Sleep(2 * time.Duration(c.margin))
		st, err := c.PreCopy(context.Background())
		must(t, err)
		if st.Dirty == 0 {
			return
		}
	}
	t.Fatal("pre-copy rounds do not converge on an idle tree")
}

// forEachFile calls fn with the content of every non-empty regular file of
// at most bigFile bytes below root, walking with os.Root (openat), so
// paths beyond PATH_MAX work and symlinks are not followed.
func forEachFile(t testing.TB, root string, fn func(rel string, data []byte)) {
	t.Helper()
	r, err := os.OpenRoot(root)
	must(t, err)
	defer r.Close()
	var walk func(r *os.Root, rel string)
	walk = func(r *os.Root, rel string) {
		d, err := r.OpenFile(".", os.O_RDONLY|unix.O_NOATIME, 0) // listing must not move atimes
		must(t, err)
		names, err := d.Readdirnames(-1)
		d.Close()
		must(t, err)
		for _, name := range names {
			fi, err := r.Lstat(name)
			must(t, err)
			p := filepath.Join(rel, name)
			switch {
			case fi.IsDir():
				sub, err := r.OpenRoot(name)
				must(t, err)
				walk(sub, p)
				sub.Close()
			case fi.Mode().IsRegular() && fi.Size() > 0 && fi.Size() <= bigFile:
				f, err := r.OpenFile(name, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NOATIME, 0)
				must(t, err)
				data, err := io.ReadAll(f)
				f.Close()
				must(t, err)
				fn(p, data)
			}
		}
	}
	walk(r, ".")
}

// readFile reads a file without updating its atime, which the comparer checks.
func readFile(t testing.TB, p string) []byte {
	t.Helper()
	f, err := os.OpenFile(p, os.O_RDONLY|unix.O_NOATIME, 0)
	must(t, err)
	defer f.Close()
	data, err := io.ReadAll(f)
	must(t, err)
	return data
}
