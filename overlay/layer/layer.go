//go:build linux

// Package layer writes the changes an overlay upper directory holds as an
// uncompressed OCI image layer: a tar stream with whiteouts, either of the
// whole upper or of what changed since an earlier capture of it.
//
// The trees are walked through directory file descriptors (getdents,
// fstatat, openat), so paths longer than PATH_MAX work and nothing is ever
// followed: symlinks are written as symlinks, directories are opened with
// O_NOFOLLOW|O_DIRECTORY, and regular files are opened with
// O_PATH|O_NOFOLLOW, checked with fstat and only then reopened for
// reading, so a name that is not the regular file that was stat'ed (a
// device node, a fifo, a symlink to a host file) is never opened for I/O.
//
// Overlay's private state becomes OCI layer semantics:
//   - whiteouts, a 0/0 character device or a zero-size regular file with
//     the xattr overlay.whiteout (honoured since Linux 6.7, made by tools
//     that build overlay layers without mknod), become ".wh.<name>";
//   - a directory with overlay.opaque = "y" is written followed by
//     "<dir>/.wh..wh..opq". The value "x" marks a merge directory that
//     holds xattr whiteouts; it is not opaque
//     (Documentation/filesystems/overlayfs.rst, "whiteouts and opaque
//     directories");
//   - overlay's xattrs (trusted.overlay.* and, with userxattr,
//     user.overlay.*) are never written;
//   - a socket, which no tar can hold, is written as a whiteout: like any
//     upper entry it hides the lower's entry of its name.
//
// Hard links within the upper are tar hard links to the first name
// written. Owners are numeric, mtimes have nanoseconds (PAX), and every
// other xattr is carried (PAX SCHILY.xattr), except security.selinux.
//
// What no OCI layer can express is not attempted: appliers merge a
// directory that exists in both, so an xattr removed from such a
// directory stays. Uppers made with redirect_dir=on or metacopy=on hold
// directories and files whose content is partly in the lower layers; for
// them Write fails with an error wrapping errdefs.ErrNotImplemented, as
// it does for a name starting with ".wh." (appliers would take it for a
// whiteout).
//
// Write must run as root: trusted.* xattrs, where overlay keeps its
// opaque and whiteout markers, are invisible to other users, and files of
// any mode must be readable.
package layer

import (
	"archive/tar"
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"slices"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// Options tune Write.
type Options struct {
	// Previous is an earlier capture of the same container's upper
	// directory, over the same lower layers. With it, Write writes only
	// the changes from Previous to upper, so that applying the layer on
	// top of (lower layers + Previous's layer) gives exactly
	// (lower layers + upper). "" writes a full layer.
	Previous string
	// ModTime, when set, clamps every entry's mtime to at most this time,
	// for reproducible layers (like SOURCE_DATE_EPOCH).
	ModTime *time.Time
}

// Stats describe a written layer.
type Stats struct {
	Entries      int64 // tar entries, whiteouts and hard links included
	Whiteouts    int64 // of Entries: whiteouts and opaque-directory markers
	Files        int64 // of Entries: regular files written with their content
	ContentBytes int64 // file content written, holes of sparse files included
}

// Write writes an uncompressed OCI layer tar of the changes the overlay
// upper directory upper holds to w.
//
// With opts.Previous set (an earlier capture of the same container's
// upper, over the same lower layers), it writes only the changes from
// Previous to upper, so that applying the layer on top of (base +
// Previous's layer) gives exactly base + upper.
//
// Entries come in a fixed order, a directory before its contents and the
// entries of a directory in byte order of their names, and carry no atime
// or ctime, so the same trees give the same bytes. The stats are valid
// even with an error: they count what was written before it.
func Write(ctx context.Context, w io.Writer, upper string, opts Options) (Stats, error) {
	// tar writes every header as its own 512-byte write.
	bw := bufio.NewWriterSize(w, 256<<10)
	lw := &writer{
		ctx:   ctx,
		tw:    tar.NewWriter(bw),
		opts:  opts,
		links: make(map[devIno]string),
	}
	err := lw.write(upper)
	if err == nil {
		err = lw.tw.Close()
	}
	if err == nil {
		err = bw.Flush()
	}
	return lw.stats, err
}

// writer is the state of one Write.
type writer struct {
	ctx  context.Context
	tw   *tar.Writer
	opts Options
	// plan is set during the first of the two walks of an incremental
	// layer, which writes nothing and only finds the hard-linked inodes
	// of which at least one name has to be written.
	plan  bool
	dirty map[devIno]bool   // from the planning walk: those inodes
	links map[devIno]string // tar name of the first written name of each multi-link inode
	stats Stats

	// Buffers, allocated on first use.
	dirents []byte
	xnames  []byte
	xvalue  []byte
	data    []byte
	data2   []byte
	zeros   []byte
}

type devIno struct{ dev, ino uint64 }

func (w *writer) write(upper string) error {
	ufd, err := openRoot(upper)
	if err != nil {
		return err
	}
	defer unix.Close(ufd)
	u, err := w.rootEntry(ufd, upper)
	if err != nil {
		return err
	}
	if w.opts.Previous == "" {
		if u.opaque {
			if err := w.opaqueMarker(""); err != nil {
				return err
			}
		}
		return w.fullDir(u, ufd)
	}

	pfd, err := openRoot(w.opts.Previous)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	p, err := w.rootEntry(pfd, w.opts.Previous)
	if err != nil {
		return err
	}
	// A multi-link inode must be written under all its names if it is
	// written under any (a tar hard link can only point to a name in the
	// same layer), and which names change is only known after the walk:
	// walk twice, the first time deciding only.
	w.plan, w.dirty = true, make(map[devIno]bool)
	if err := w.diffRoot(u, ufd, p, pfd); err != nil {
		return err
	}
	w.plan = false
	return w.diffRoot(u, ufd, p, pfd)
}

func (w *writer) diffRoot(u *entry, ufd int, p *entry, pfd int) error {
	// The root itself is never an entry of a layer (appliers ignore it),
	// but it can become opaque.
	if u.opaque && !p.opaque {
		if err := w.opaqueMarker(""); err != nil {
			return err
		}
		return w.fullDir(u, ufd)
	}
	return w.diffDir(&dirState{e: u, written: true}, ufd, p, pfd)
}

// dirState is a directory of the upper being diffed.
type dirState struct {
	e *entry
	// written: its header is in the layer (or it is the root, which
	// never is). An applier that creates, replaces or removes an entry
	// in a directory changes the directory's mtime, and restores it only
	// if the directory is in the layer; so a directory whose metadata did
	// not change is written before the first change within it.
	written bool
}

func (w *writer) touch(d *dirState) error {
	if d.written || w.plan {
		return nil
	}
	d.written = true
	return w.put(d.e)
}

// fullDir writes every entry below the directory dir, open as fd.
func (w *writer) fullDir(dir *entry, fd int) error {
	names, err := w.readNames(fd)
	if err != nil {
		return dir.err("readdir", err)
	}
	for _, name := range names {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		e, err := w.lstat(fd, dir, name)
		if err != nil {
			return err
		}
		if err := w.full(e); err != nil {
			return err
		}
	}
	return nil
}

// full writes e and, for a directory, everything below it.
func (w *writer) full(e *entry) error {
	switch e.kind {
	case kindWhiteout, kindSocket:
		// A tar cannot hold a socket (containerd's archive skips them
		// too), and a socket only means something to the process that
		// listens on it. But it hides the lower's entry of its name, as
		// any upper entry does: a whiteout keeps that hidden (and is a
		// no-op where the lower has no such entry).
		return w.whiteout(e)
	case kindDir:
		if err := w.put(e); err != nil {
			return err
		}
		if e.opaque {
			if err := w.opaqueMarker(e.rel()); err != nil {
				return err
			}
		}
		fd, err := w.openDir(e)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return w.fullDir(e, fd)
	}
	return w.put(e)
}

// diffDir writes what changed from the directory pdir of Previous (open
// as pfd) to the directory udir of the upper (open as ufd). Both are
// listed in byte order and merged by name.
func (w *writer) diffDir(udir *dirState, ufd int, pdir *entry, pfd int) error {
	unames, err := w.readNames(ufd)
	if err != nil {
		return udir.e.err("readdir", err)
	}
	pnames, err := w.readNames(pfd)
	if err != nil {
		return pdir.err("readdir", err)
	}
	for i, j := 0, 0; i < len(unames) || j < len(pnames); {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		var uname, pname string
		switch {
		case j == len(pnames) || i < len(unames) && unames[i] < pnames[j]:
			uname = unames[i]
			i++
		case i == len(unames) || pnames[j] < unames[i]:
			pname = pnames[j]
			j++
		default:
			uname, pname = unames[i], pnames[j]
			i++
			j++
		}
		var u, p *entry
		if uname != "" {
			if u, err = w.lstat(ufd, udir.e, uname); err != nil {
				return err
			}
		}
		if pname != "" {
			if p, err = w.lstat(pfd, pdir, pname); err != nil {
				return err
			}
		}
		if err := w.diffEntry(udir, u, p); err != nil {
			return err
		}
	}
	return nil
}

// diffEntry writes what changed from p, an entry of Previous, to u, the
// entry of the same name in the upper directory parent; either may be nil
// (absent).
func (w *writer) diffEntry(parent *dirState, u, p *entry) error {
	// A socket is written as a whiteout (see full).
	switch {
	case u == nil && p == nil:
		return nil
	case u == nil:
		switch p.kind {
		case kindSocket:
			// Removed, and nothing took its place: the lower has no
			// entry of that name (overlay would have left a whiteout),
			// so Previous's layer whited out nothing.
			return nil
		case kindWhiteout:
			// Overlay removes a whiteout only by putting something in
			// its place, or with its whole directory (which shows up
			// as a change of that directory). A layer could not bring
			// the lower's entry back anyway.
			return fmt.Errorf("%w: %s is a whiteout in %s but absent from the upper: the upper is not a later state of it",
				errdefs.ErrFailedPrecondition, p.rel(), p.root)
		}
		// Overlay removes an upper-only entry without a whiteout, but
		// Previous's layer holds it. (A whiteout of a name the lower
		// lacks is harmless.)
		return w.changed(parent, p, w.whiteout)
	case p == nil:
		return w.changed(parent, u, w.full)
	case u.hides():
		if p.hides() {
			return nil
		}
		return w.changed(parent, u, w.whiteout)
	case u.kind == kindDir:
		if p.kind != kindDir || u.opaque && !p.opaque {
			// New, replaced (rm -rf then mkdir makes an opaque
			// directory) or in place of a non-directory: all of it.
			return w.changed(parent, u, w.full)
		}
		d := &dirState{e: u}
		same, err := w.sameDir(u, p)
		if err != nil {
			return err
		}
		if !same {
			if err := w.touch(d); err != nil {
				return err
			}
		}
		ufd, err := w.openDir(u)
		if err != nil {
			return err
		}
		defer unix.Close(ufd)
		pfd, err := w.openDir(p)
		if err != nil {
			return err
		}
		defer unix.Close(pfd)
		return w.diffDir(d, ufd, p, pfd)
	}

	// A non-directory. The names of a multi-link inode are written
	// together or not at all, as decided by the planning walk; a name
	// put in that walk only marks its inode.
	if u.st.Nlink > 1 {
		if !w.plan {
			if w.dirty[u.key()] {
				return w.changed(parent, u, w.put)
			}
			return nil
		}
	} else if w.plan {
		return nil
	}
	changed := p.kind != kindOther // a type change, or in place of a whiteout or socket
	if !changed {
		same, err := w.same(u, p)
		if err != nil {
			return err
		}
		changed = !same
	}
	if changed {
		// Appliers remove whatever Previous's layer had there first.
		return w.changed(parent, u, w.put)
	}
	return nil
}

// changed writes the entry e of the directory parent with write, after
// parent's header if that is not written yet.
func (w *writer) changed(parent *dirState, e *entry, write func(*entry) error) error {
	if err := w.touch(parent); err != nil {
		return err
	}
	return write(e)
}

// sameDir reports whether the metadata of directory u equals that of p.
// Opacity is compared by the caller.
func (w *writer) sameDir(u, p *entry) (bool, error) {
	if u.st.Mode != p.st.Mode || u.st.Uid != p.st.Uid || u.st.Gid != p.st.Gid || u.st.Mtim != p.st.Mtim {
		return false, nil
	}
	return w.sameXattrs(u, p)
}

// same reports whether the non-directories u and p (neither a whiteout)
// are equal: same type, permission bits, owner, size, device number, link
// count, symlink target, xattrs and mtime to the nanosecond. Like
// continuity's sameFile, a regular file whose mtime has no sub-second part
// (a filesystem with coarse timestamps, or a file whose times were set
// from a tar without them) could have been rewritten within the same
// second, so its content is compared too.
//
// The link count makes a name that joins or leaves a hard-link group
// count as changed, so the applied layer has the upper's link groups.
func (w *writer) same(u, p *entry) (bool, error) {
	if u.st.Mode != p.st.Mode || u.st.Uid != p.st.Uid || u.st.Gid != p.st.Gid ||
		u.st.Size != p.st.Size || u.st.Rdev != p.st.Rdev || u.st.Nlink != p.st.Nlink ||
		u.st.Mtim != p.st.Mtim {
		return false, nil
	}
	switch u.st.Mode & unix.S_IFMT {
	case unix.S_IFLNK:
		ut, err := readlink(u)
		if err != nil {
			return false, err
		}
		pt, err := readlink(p)
		if err != nil {
			return false, err
		}
		if ut != pt {
			return false, nil
		}
	}
	same, err := w.sameXattrs(u, p)
	if err != nil || !same {
		return false, err
	}
	if u.st.Mode&unix.S_IFMT == unix.S_IFREG && u.st.Mtim.Nsec == 0 && u.st.Size > 0 {
		return w.sameContent(u, p)
	}
	return true, nil
}

func (w *writer) sameXattrs(u, p *entry) (bool, error) {
	if err := w.loadXattrs(u); err != nil {
		return false, err
	}
	if err := w.loadXattrs(p); err != nil {
		return false, err
	}
	if len(u.xattrs) != len(p.xattrs) {
		return false, nil
	}
	for k, v := range u.xattrs {
		if pv, ok := p.xattrs[k]; !ok || pv != v {
			return false, nil
		}
	}
	return true, nil
}

// readNames lists the directory open as fd with getdents, without "."
// and "..", in byte order.
func (w *writer) readNames(fd int) ([]string, error) {
	if w.dirents == nil {
		w.dirents = make([]byte, 64<<10)
	}
	// From the start: the roots are read once per walk.
	if _, err := unix.Seek(fd, 0, io.SeekStart); err != nil {
		return nil, err
	}
	var names []string
	for {
		n, err := unix.ReadDirent(fd, w.dirents)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, err
		}
		if n <= 0 {
			break
		}
		_, _, names = unix.ParseDirent(w.dirents[:n], -1, names)
	}
	slices.Sort(names)
	return names, nil
}

// openRoot opens the root of a tree to walk; its last component is not
// followed.
func openRoot(path string) (int, error) {
	fd, err := unix.Open(path, dirFlags|unix.O_NOATIME, 0)
	if err == unix.EPERM {
		fd, err = unix.Open(path, dirFlags, 0)
	}
	if err != nil {
		return -1, &os.PathError{Op: "open", Path: path, Err: err}
	}
	return fd, nil
}
