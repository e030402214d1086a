//go:build linux

package layer

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

type kind uint8

const (
	kindOther    kind = iota // a regular file, symlink, device or fifo
	kindDir                  // a directory
	kindWhiteout             // an overlay whiteout, in either form
	kindSocket               // a socket, which no tar can hold: written as a whiteout
)

// entry is one entry of a tree being walked (the upper, or Previous).
type entry struct {
	root   string // the tree's root, for messages
	dir    string // the path of its directory below root, "" at the top
	name   string // "" for the root itself
	dirfd  int    // the open directory it is in; for the root, the root itself
	st     unix.Stat_t
	kind   kind
	opaque bool // a directory with overlay.opaque = "y"

	xattrs map[string]string // the xattrs a layer carries, once loaded
	loaded bool
	xwhite bool // has overlay.whiteout (a whiteout if a zero-size regular file)
}

// hides: e is a whiteout, or a socket (written as one).
func (e *entry) hides() bool { return e.kind == kindWhiteout || e.kind == kindSocket }

func (e *entry) rel() string { return join(e.dir, e.name) }

func (e *entry) key() devIno { return devIno{e.st.Dev, e.st.Ino} }

func (e *entry) isRoot() bool { return e.name == "" }

// err wraps err with the path of e.
func (e *entry) err(op string, err error) error {
	return &os.PathError{Op: op, Path: filepath.Join(e.root, e.rel()), Err: err}
}

func join(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}

const (
	dirFlags  = unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC
	pathFlags = unix.O_PATH | unix.O_NOFOLLOW | unix.O_CLOEXEC
)

func procPath(fd int) string { return "/proc/self/fd/" + strconv.Itoa(fd) }

// rootEntry describes the root directory of a tree, open as fd.
func (w *writer) rootEntry(fd int, root string) (*entry, error) {
	e := &entry{root: root, dirfd: fd, kind: kindDir}
	if err := unix.Fstat(fd, &e.st); err != nil {
		return nil, e.err("fstat", err)
	}
	if err := w.loadXattrs(e); err != nil {
		return nil, err
	}
	return e, nil
}

// lstat describes the entry name of the directory dir, open as dirfd.
// Classifying it needs its xattrs only if it is a directory (opaque?) or
// an empty regular file (an xattr whiteout?); the others' are loaded when
// needed.
func (w *writer) lstat(dirfd int, dir *entry, name string) (*entry, error) {
	e := &entry{root: dir.root, dir: dir.rel(), name: name, dirfd: dirfd}
	if err := unix.Fstatat(dirfd, name, &e.st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return nil, e.err("lstat", err)
	}
	switch e.st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		e.kind = kindDir
		if err := w.loadXattrs(e); err != nil {
			return nil, err
		}
	case unix.S_IFCHR:
		if e.st.Rdev == 0 { // overlay's classic whiteout
			e.kind = kindWhiteout
		}
	case unix.S_IFREG:
		if e.st.Size == 0 {
			if err := w.loadXattrs(e); err != nil {
				return nil, err
			}
			if e.xwhite {
				e.kind = kindWhiteout
			}
		}
	case unix.S_IFSOCK:
		e.kind = kindSocket
	}
	return e, nil
}

// Overlay's own xattrs: trusted.overlay.*, or user.overlay.* on mounts
// with userxattr. They are overlay's private state, never layer content.
// Escaped ones (overlay.overlay.*, which a nested overlay shows as
// overlay.*) are not written either: applied to a snapshot they would be
// read as this overlay's own.
func overlayXattr(name string) (suffix string, ok bool) {
	for _, p := range [...]string{"trusted.overlay.", "user.overlay."} {
		if s, ok := strings.CutPrefix(name, p); ok {
			return s, true
		}
	}
	return "", false
}

// loadXattrs reads the xattrs of e once: overlay's markers into e.opaque
// and e.xwhite, the others into e.xattrs.
//
// security.selinux is not carried: it is the host's label for the
// container's files (with per-container MCS categories), which the
// runtime relabels on every mount; copied into an image it would mislabel
// every container run from it (containers/storage skips it for the same
// reason).
func (w *writer) loadXattrs(e *entry) error {
	if e.loaded {
		return nil
	}
	if w.xnames == nil {
		w.xnames = make([]byte, xattrMax)
		w.xvalue = make([]byte, xattrMax)
	}
	names, err := listXattrs(e, w.xnames)
	if err != nil {
		return e.err("listxattr", err)
	}
	for rest := names; len(rest) > 0; {
		a, tail, _ := bytes.Cut(rest, []byte{0})
		rest = tail
		if len(a) == 0 {
			continue
		}
		name := string(a)
		suffix, private := overlayXattr(name)
		if private {
			switch suffix {
			case "opaque", "whiteout", "redirect", "metacopy":
			default:
				continue // origin, impure, nlink, upper, protattr, ...: nothing a layer needs
			}
		} else if name == "security.selinux" {
			continue
		}
		value, err := getXattr(e, name, w.xvalue)
		if err == unix.ENODATA {
			continue
		}
		if err != nil {
			return e.err("getxattr "+name, err)
		}
		if !private {
			if e.xattrs == nil {
				e.xattrs = make(map[string]string)
			}
			e.xattrs[name] = string(value)
			continue
		}
		switch suffix {
		case "opaque":
			// "y": opaque; "x": a merge directory holding xattr whiteouts.
			e.opaque = e.kind == kindDir && string(value) == "y"
		case "whiteout":
			e.xwhite = true
		case "redirect":
			return fmt.Errorf("%w: %s has %s (an upper made with redirect_dir=on): its content is partly in a lower layer",
				errdefs.ErrNotImplemented, filepath.Join(e.root, e.rel()), name)
		case "metacopy":
			return fmt.Errorf("%w: %s has %s (an upper made with metacopy=on): its data is in a lower layer",
				errdefs.ErrNotImplemented, filepath.Join(e.root, e.rel()), name)
		}
	}
	e.loaded = true
	return nil
}

const xattrMax = 64 << 10 // XATTR_LIST_MAX and XATTR_SIZE_MAX

// entryPath names the entry name in the directory open as dirfd for the
// l*xattr calls, which have no *at variant: the magic link resolves to
// that very directory, and the last component is not followed.
func entryPath(dirfd int, name string) string { return procPath(dirfd) + "/" + name }

func listXattrs(e *entry, buf []byte) ([]byte, error) {
	var n int
	var err error
	if e.isRoot() {
		n, err = unix.Flistxattr(e.dirfd, buf)
	} else {
		n, err = unix.Llistxattr(entryPath(e.dirfd, e.name), buf)
	}
	if err == unix.ENOTSUP {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return buf[:n], nil
}

func getXattr(e *entry, name string, buf []byte) ([]byte, error) {
	var n int
	var err error
	if e.isRoot() {
		n, err = unix.Fgetxattr(e.dirfd, name, buf)
	} else {
		n, err = unix.Lgetxattr(entryPath(e.dirfd, e.name), name, buf)
	}
	if err != nil {
		return nil, err
	}
	return buf[:n], nil
}

// openDir opens the directory e for reading, without following a symlink
// and, where permitted, without updating its atime.
func (w *writer) openDir(e *entry) (int, error) {
	fd, err := unix.Openat(e.dirfd, e.name, dirFlags|unix.O_NOATIME, 0)
	if err == unix.EPERM {
		fd, err = unix.Openat(e.dirfd, e.name, dirFlags, 0)
	}
	if err != nil {
		return -1, e.err("open", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, e.err("fstat", err)
	}
	if st.Ino != e.st.Ino || st.Dev != e.st.Dev {
		unix.Close(fd)
		return -1, e.err("open", errChanged)
	}
	return fd, nil
}

// errChanged: the tree changed while it was read. Captures are not
// written to; this is a caller's bug or someone else's doing.
var errChanged = fmt.Errorf("%w: entry changed while being read", errdefs.ErrConflict)

// openFile opens the regular file e for reading. It first opens the name
// with O_PATH|O_NOFOLLOW, which has no side effects whatever the name is
// now, checks that it is still the regular file that was stat'ed, and
// only then reopens that very inode through /proc/self/fd, so a name
// swapped for a symlink, a fifo or a device node is never opened for I/O.
func openFile(e *entry) (int, error) {
	pfd, err := unix.Openat(e.dirfd, e.name, pathFlags, 0)
	if err != nil {
		return -1, e.err("open", err)
	}
	defer unix.Close(pfd)
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil {
		return -1, e.err("fstat", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Ino != e.st.Ino || st.Dev != e.st.Dev || st.Size != e.st.Size {
		return -1, e.err("open", errChanged)
	}
	const flags = unix.O_RDONLY | unix.O_CLOEXEC | unix.O_NOCTTY
	fd, err := unix.Open(procPath(pfd), flags|unix.O_NOATIME, 0)
	if err == unix.EPERM {
		fd, err = unix.Open(procPath(pfd), flags, 0)
	}
	if err != nil {
		return -1, e.err("open", err)
	}
	return fd, nil
}

// readlink reads the target of the symlink e; nothing is followed.
func readlink(e *entry) (string, error) {
	buf := make([]byte, max(unix.PathMax, int(e.st.Size)+1))
	n, err := unix.Readlinkat(e.dirfd, e.name, buf)
	if err != nil {
		return "", e.err("readlink", err)
	}
	if int64(n) != e.st.Size {
		return "", e.err("readlink", errChanged)
	}
	return string(buf[:n]), nil
}

// sameContent compares the data of the regular files u and p, which have
// the same size.
func (w *writer) sameContent(u, p *entry) (bool, error) {
	ufd, err := openFile(u)
	if err != nil {
		return false, err
	}
	defer unix.Close(ufd)
	pfd, err := openFile(p)
	if err != nil {
		return false, err
	}
	defer unix.Close(pfd)
	a, b := w.buffers()
	for off := int64(0); off < u.st.Size; {
		if err := w.ctx.Err(); err != nil {
			return false, err
		}
		n := int(min(int64(len(a)), u.st.Size-off))
		if err := preadFull(ufd, a[:n], off); err != nil {
			return false, u.err("read", err)
		}
		if err := preadFull(pfd, b[:n], off); err != nil {
			return false, p.err("read", err)
		}
		if !bytes.Equal(a[:n], b[:n]) {
			return false, nil
		}
		off += int64(n)
	}
	return true, nil
}

func (w *writer) buffers() ([]byte, []byte) {
	if w.data == nil {
		w.data = make([]byte, 1<<20)
	}
	if w.data2 == nil {
		w.data2 = make([]byte, 1<<20)
	}
	return w.data, w.data2
}

// preadFull reads len(buf) bytes at off; a file that ends before is an
// error, since its size was checked when it was opened.
func preadFull(fd int, buf []byte, off int64) error {
	for len(buf) > 0 {
		n, err := unix.Pread(fd, buf, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return errChanged // shrank
		}
		buf = buf[n:]
		off += int64(n)
	}
	return nil
}
