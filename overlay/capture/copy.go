//go:build linux

package capture

import (
	"bytes"
	"fmt"

	"golang.org/x/sys/unix"
)

// copyEntry creates or updates the destination entry name (not a
// directory) from the source entry with stat st; st is refreshed when the
// entry is opened. existed: the destination already has name, of the same
// type and copied from the same source inode, so it is updated in place
// (which keeps the destination's hard links).
func (r *round) copyEntry(sfd, dfd int, name string, st *unix.Stat_t, existed bool) error {
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		return r.copyFile(sfd, dfd, name, st, existed)
	case unix.S_IFLNK:
		return r.copySymlink(sfd, dfd, name, st, existed)
	case unix.S_IFCHR, unix.S_IFBLK, unix.S_IFIFO, unix.S_IFSOCK:
		return r.copySpecial(sfd, dfd, name, st, existed)
	}
	return fmt.Errorf("unsupported file type %#o", st.Mode&unix.S_IFMT)
}

func (r *round) copyFile(sfd, dfd int, name string, st *unix.Stat_t, existed bool) error {
	// An empty file has no data to read: do not open it at all (xattrs
	// are read through its name, which is not followed).
	src, rfd := nameRef(sfd, name), -1
	if st.Size > 0 {
		var err error
		if rfd, err = r.openSrcFile(sfd, name, st); err != nil {
			return err
		}
		defer unix.Close(rfd)
		src = fdRef(rfd)
	}
	const flags = unix.O_WRONLY | unix.O_NOFOLLOW | unix.O_CLOEXEC
	var wfd int
	var err error
	// A copy over an existing file writes over its data rather than
	// truncating it first: after a truncation to zero, ext4
	// (auto_da_alloc) and xfs start writing the file back when it is
	// closed, which, under the freeze, costs more than the copy itself.
	// Clones replace the whole file anyway.
	overwrite := existed && (!r.c.reflink || st.Size <= plainCopyMax)
	if overwrite {
		wfd, err = unix.Openat(dfd, name, flags, 0)
	} else if existed {
		wfd, err = unix.Openat(dfd, name, flags|unix.O_TRUNC, 0)
	} else {
		err = r.create(dfd, name, func() (err error) {
			wfd, err = unix.Openat(dfd, name, flags|unix.O_CREAT|unix.O_EXCL, 0o600)
			return err
		})
	}
	if err != nil {
		return fmt.Errorf("open destination: %w", err)
	}
	defer unix.Close(wfd)
	if rfd >= 0 {
		n, err := r.copyData(rfd, wfd, st.Size, overwrite)
		r.stats.CopiedBytes += n
		if err != nil {
			return err
		}
	}
	if overwrite {
		if err := unix.Ftruncate(wfd, st.Size); err != nil {
			return fmt.Errorf("ftruncate: %w", err)
		}
	}
	r.stats.CopiedFiles++
	return r.setMeta(wfd, dfd, name, st, src, existed)
}

// openSrcFile opens the source regular file name for reading. It first
// opens it with O_PATH|O_NOFOLLOW, which has no side effects whatever the
// name is now, checks that it is still the regular file that was stat'ed,
// and only then reopens that very inode through /proc/self/fd. A name
// swapped for a symlink, a fifo or a device node is never opened for I/O.
// On success st holds the fresh stat of the opened file, taken before any
// byte is read.
func (r *round) openSrcFile(sfd int, name string, st *unix.Stat_t) (int, error) {
	if r.c.raceHook != nil {
		r.c.raceHook(sfd, name)
	}
	pfd, err := unix.Openat(sfd, name, pathFlags, 0)
	if err != nil {
		return -1, raceErr(err)
	}
	defer unix.Close(pfd)
	var cur unix.Stat_t
	if err := unix.Fstat(pfd, &cur); err != nil {
		return -1, err
	}
	if cur.Mode&unix.S_IFMT != unix.S_IFREG || cur.Ino != st.Ino {
		return -1, fmt.Errorf("%w: replaced", errRaced)
	}
	const flags = unix.O_RDONLY | unix.O_CLOEXEC | unix.O_NOCTTY
	p := procPath(pfd)
	fd, err := unix.Open(p, flags|unix.O_NOATIME, 0) // the container's atimes are not ours to change
	if err == unix.EPERM {
		fd, err = unix.Open(p, flags, 0)
	}
	if err != nil {
		return -1, fmt.Errorf("reopen source: %w", err)
	}
	*st = cur
	return fd, nil
}

// copyChunk bounds one copy_file_range call, so that a deadline is noticed
// within a few milliseconds even in a large file.
const copyChunk = 8 << 20

// plainCopyMax is the size up to which a file's data is copied with
// read/write from the page cache, never cloned: FICLONE, and
// copy_file_range on filesystems that clone by themselves (xfs), first
// write the source's dirty pages to disk. For a file just written that
// costs a disk write per file, which under a freeze is pause; a small
// copy costs microseconds.
const plainCopyMax = 256 << 10

// copyData copies size bytes of file data from rfd to the empty (or just
// truncated) wfd: with FICLONE when reflinking a file larger than
// plainCopyMax, else only the data segments (SEEK_DATA/SEEK_HOLE), then
// sets the size, so holes stay holes. It returns the bytes copied or
// cloned.
func (r *round) copyData(rfd, wfd int, size int64, overwrite bool) (int64, error) {
	plain := size <= plainCopyMax
	if r.c.reflink && !plain {
		if err := unix.IoctlFileClone(wfd, rfd); err != nil {
			switch err {
			case unix.EOPNOTSUPP, unix.EXDEV, unix.EINVAL, unix.ENOTTY:
				return 0, fmt.Errorf("%w: %v", ErrReflinkUnsupported, err)
			}
			return 0, fmt.Errorf("FICLONE: %w", err)
		}
		return size, nil
	}
	var copied, end int64 // end: where the data written so far ends
	for off := int64(0); off < size; {
		if err := r.aborted(); err != nil {
			return copied, err
		}
		data, err := unix.Seek(rfd, off, unix.SEEK_DATA)
		if err == unix.ENXIO {
			break // nothing but a hole from off on
		}
		hole := size
		if err != nil {
			if err != unix.EINVAL && err != unix.EOPNOTSUPP {
				return copied, fmt.Errorf("SEEK_DATA: %w", err)
			}
			data = off // no SEEK_DATA here: copy everything
		} else if h, err := unix.Seek(rfd, data, unix.SEEK_HOLE); err == nil && h < size {
			hole = h
		}
		if data >= size {
			break
		}
		if overwrite && data > off {
			if err := punchHole(wfd, off, data-off); err != nil {
				return copied, err
			}
		}
		n, err := r.copyRange(rfd, wfd, data, hole-data, plain)
		copied += n
		end = data + n
		if err != nil {
			return copied, err
		}
		if n < hole-data {
			break // the source shrank under us; a later round sees it
		}
		off = hole
	}
	if end != size { // a trailing hole
		if overwrite && end < size {
			if err := punchHole(wfd, end, size-end); err != nil {
				return copied, err
			}
		}
		if err := unix.Ftruncate(wfd, size); err != nil {
			return copied, fmt.Errorf("ftruncate: %w", err)
		}
	}
	return copied, nil
}

// punchHole deallocates n bytes at off of a file being written over, where
// the source has a hole (and the file may hold older data).
func punchHole(fd int, off, n int64) error {
	if err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
		return fmt.Errorf("punch a hole: %w", err)
	}
	return nil
}

// copyRange copies n bytes at off from rfd to the same offset of wfd, with
// copy_file_range (in-kernel, and a reflink where the filesystem does that
// by itself), or read/write when plain is set or copy_file_range cannot be
// used between the two filesystems. It stops early at the source's end of
// file.
func (r *round) copyRange(rfd, wfd int, off, n int64, plain bool) (int64, error) {
	var done int64
	for done < n {
		if done > 0 {
			if err := r.aborted(); err != nil {
				return done, err
			}
		}
		want := min(n-done, copyChunk)
		if !plain && !r.c.noRange.Load() {
			roff, woff := off+done, off+done
			m, err := unix.CopyFileRange(rfd, &roff, wfd, &woff, int(want), 0)
			switch {
			case err == nil && m == 0:
				return done, nil
			case err == nil:
				done += int64(m)
				continue
			case err == unix.EINTR:
				continue
			case err == unix.EXDEV || err == unix.ENOSYS || err == unix.EOPNOTSUPP || err == unix.EINVAL:
				r.c.noRange.Store(true)
			default:
				return done, fmt.Errorf("copy_file_range: %w", err)
			}
		}
		if r.data == nil {
			r.data = make([]byte, 1<<20)
		}
		buf := r.data[:min(want, int64(len(r.data)))]
		m, err := unix.Pread(rfd, buf, off+done)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return done, fmt.Errorf("read: %w", err)
		}
		if m == 0 {
			return done, nil
		}
		for w := 0; w < m; {
			k, err := unix.Pwrite(wfd, buf[w:m], off+done+int64(w))
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return done, fmt.Errorf("write: %w", err)
			}
			w += k
		}
		done += int64(m)
	}
	return done, nil
}

// copySymlink copies a symlink as a link: its target is read, never
// followed. A symlink cannot be retargeted, so an existing one only gets
// its metadata again.
func (r *round) copySymlink(sfd, dfd int, name string, st *unix.Stat_t, existed bool) error {
	if !existed {
		if r.target == nil {
			r.target = make([]byte, unix.PathMax+1)
		}
		n, err := unix.Readlinkat(sfd, name, r.target)
		if err != nil {
			if err == unix.EINVAL { // no longer a symlink
				err = unix.ENOENT
			}
			return raceErr(err)
		}
		if int64(n) != st.Size {
			return fmt.Errorf("%w: symlink replaced", errRaced)
		}
		target := string(r.target[:n])
		if err := r.create(dfd, name, func() error { return unix.Symlinkat(target, dfd, name) }); err != nil {
			return fmt.Errorf("symlink: %w", err)
		}
	}
	return r.setMeta(-1, dfd, name, st, nameRef(sfd, name), existed)
}

// copySpecial recreates a device (a 0/0 character device is an overlay
// whiteout), a fifo or a socket with mknod.
func (r *round) copySpecial(sfd, dfd int, name string, st *unix.Stat_t, existed bool) error {
	if !existed {
		typ := st.Mode & unix.S_IFMT
		dev := 0
		if typ == unix.S_IFCHR || typ == unix.S_IFBLK {
			dev = int(st.Rdev)
		}
		if err := r.create(dfd, name, func() error { return unix.Mknodat(dfd, name, typ, dev) }); err != nil {
			return fmt.Errorf("mknod: %w", err)
		}
	}
	return r.setMeta(-1, dfd, name, st, nameRef(sfd, name), existed)
}

// setMeta gives the destination entry name in dirfd (open as fd, or -1)
// the owner, mode, xattrs and times of the source entry (stat st, xattrs
// read through src). The order matters: chown clears setuid bits and file
// capabilities, so mode and xattrs come after it, and times come last.
// existed: drop destination xattrs the source no longer has.
func (r *round) setMeta(fd, dirfd int, name string, st *unix.Stat_t, src xref, existed bool) error {
	var err error
	if fd >= 0 {
		err = unix.Fchown(fd, int(st.Uid), int(st.Gid))
	} else {
		err = unix.Fchownat(dirfd, name, int(st.Uid), int(st.Gid), unix.AT_SYMLINK_NOFOLLOW)
	}
	if err != nil {
		return fmt.Errorf("chown: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFLNK {
		if fd >= 0 {
			err = unix.Fchmod(fd, st.Mode&0o7777)
		} else {
			err = unix.Fchmodat(dirfd, name, st.Mode&0o7777, 0) // a node we created, not a symlink
		}
		if err != nil {
			return fmt.Errorf("chmod: %w", err)
		}
	}
	dst := fdRef(fd)
	if fd < 0 {
		dst = nameRef(dirfd, name)
	}
	if err := r.copyXattrs(src, dst, existed); err != nil {
		return err
	}
	if err := setTimes(dirfd, name, st); err != nil {
		return fmt.Errorf("utimes: %w", err)
	}
	return nil
}

// setTimes sets atime and mtime (ctime cannot be set).
func setTimes(dirfd int, name string, st *unix.Stat_t) error {
	return unix.UtimesNanoAt(dirfd, name, []unix.Timespec{st.Atim, st.Mtim}, unix.AT_SYMLINK_NOFOLLOW)
}

// xref names an entry for the xattr calls: an open file descriptor, or
// (fd < 0) a name in an open directory, which is never followed.
type xref struct {
	fd   int
	dir  int
	name string
}

func fdRef(fd int) xref                 { return xref{fd: fd} }
func nameRef(dir int, name string) xref { return xref{fd: -1, dir: dir, name: name} }

const xattrMax = 64 << 10 // XATTR_LIST_MAX and XATTR_SIZE_MAX

func (x xref) list(buf []byte) ([]byte, error) {
	var n int
	var err error
	if x.fd >= 0 {
		n, err = unix.Flistxattr(x.fd, buf)
	} else {
		n, err = unix.Llistxattr(entryPath(x.dir, x.name), buf)
	}
	if err == unix.ENOTSUP {
		return nil, nil // no xattrs on this filesystem
	}
	if err != nil {
		return nil, err
	}
	return buf[:n], nil
}

func (x xref) get(attr string, buf []byte) ([]byte, error) {
	var n int
	var err error
	if x.fd >= 0 {
		n, err = unix.Fgetxattr(x.fd, attr, buf)
	} else {
		n, err = unix.Lgetxattr(entryPath(x.dir, x.name), attr, buf)
	}
	if err != nil {
		return nil, err
	}
	return buf[:n], nil
}

func (x xref) set(attr string, value []byte) error {
	if x.fd >= 0 {
		return unix.Fsetxattr(x.fd, attr, value, 0)
	}
	return unix.Lsetxattr(entryPath(x.dir, x.name), attr, value, 0)
}

func (x xref) remove(attr string) error {
	if x.fd >= 0 {
		return unix.Fremovexattr(x.fd, attr)
	}
	return unix.Lremovexattr(entryPath(x.dir, x.name), attr)
}

// copyXattrs copies every xattr (trusted.* including overlay's, security.*,
// user.*, system.* ACLs) from src to dst; with existed, it first removes
// those dst has and src has not.
func (r *round) copyXattrs(src, dst xref, existed bool) error {
	if r.xnames == nil {
		r.xnames = make([]byte, xattrMax)
		r.dnames = make([]byte, xattrMax)
		r.xvalue = make([]byte, xattrMax)
	}
	names, err := src.list(r.xnames)
	if err != nil {
		return fmt.Errorf("listxattr: %w", raceErr(err))
	}
	if existed {
		have, err := dst.list(r.dnames)
		if err != nil {
			return fmt.Errorf("listxattr destination: %w", err)
		}
		for rest := have; len(rest) > 0; {
			attr, tail, _ := bytes.Cut(rest, []byte{0})
			rest = tail
			if len(attr) == 0 || hasName(names, attr) {
				continue
			}
			if err := dst.remove(string(attr)); err != nil && err != unix.ENODATA {
				return fmt.Errorf("removexattr %s: %w", attr, err)
			}
		}
	}
	for rest := names; len(rest) > 0; {
		a, tail, _ := bytes.Cut(rest, []byte{0})
		rest = tail
		if len(a) == 0 {
			continue
		}
		attr := string(a)
		value, err := src.get(attr, r.xvalue)
		if err == unix.ENODATA {
			continue // removed since the listing: its ctime tells the next round
		}
		if err != nil {
			return fmt.Errorf("getxattr %s: %w", attr, raceErr(err))
		}
		if err := dst.set(attr, value); err != nil {
			return fmt.Errorf("setxattr %s: %w", attr, err)
		}
	}
	return nil
}

// hasName reports whether the NUL-separated list holds name.
func hasName(list, name []byte) bool {
	for len(list) > 0 {
		a, tail, _ := bytes.Cut(list, []byte{0})
		if bytes.Equal(a, name) {
			return true
		}
		list = tail
	}
	return false
}
