//go:build linux

package layer

import (
	"archive/tar"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// OCI layer whiteouts (image-spec layer.md, "Whiteouts").
const (
	whiteoutPrefix = ".wh."
	opaqueMarker   = whiteoutPrefix + whiteoutPrefix + ".opq"
	paxXattr       = "SCHILY.xattr."
)

// checkName rejects a name an OCI layer cannot hold: appliers take any
// entry whose name starts with ".wh." for a whiteout, so a file of that
// name would delete another instead of being created.
func checkName(e *entry) error {
	if strings.HasPrefix(e.name, whiteoutPrefix) {
		return fmt.Errorf("%w: %s: a name starting with %q cannot be written to an OCI layer (appliers read it as a whiteout)",
			errdefs.ErrNotImplemented, filepath.Join(e.root, e.rel()), whiteoutPrefix)
	}
	return nil
}

// whiteout writes the whiteout of e's name in e's directory.
func (w *writer) whiteout(e *entry) error {
	if w.plan {
		return nil
	}
	if err := checkName(e); err != nil {
		return err
	}
	return w.marker(join(e.dir, whiteoutPrefix+e.name))
}

// opaqueMarker writes the marker that makes the directory dir opaque.
func (w *writer) opaqueMarker(dir string) error {
	if w.plan {
		return nil
	}
	return w.marker(join(dir, opaqueMarker))
}

// marker writes an empty whiteout entry. Its header is the same whatever
// the tree: the epoch, root, mode 0, as containerd writes them.
func (w *writer) marker(name string) error {
	hdr := &tar.Header{
		Typeflag: tar.TypeReg,
		Name:     name,
		ModTime:  w.modTime(time.Unix(0, 0)),
		Format:   tar.FormatPAX,
	}
	if err := w.tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	w.stats.Entries++
	w.stats.Whiteouts++
	return nil
}

func (w *writer) modTime(t time.Time) time.Time {
	if w.opts.ModTime != nil && t.After(*w.opts.ModTime) {
		return *w.opts.ModTime
	}
	return t
}

// put writes the entry e (a directory without its contents). In the
// planning walk it only marks a multi-link inode as written.
func (w *writer) put(e *entry) error {
	typ := e.st.Mode & unix.S_IFMT
	if w.plan {
		if typ != unix.S_IFDIR && e.st.Nlink > 1 {
			w.dirty[e.key()] = true
		}
		return nil
	}
	if err := checkName(e); err != nil {
		return err
	}
	if err := w.loadXattrs(e); err != nil {
		return err
	}

	// Owners are numeric: names are the container's business, and would
	// be looked up in the host's passwd. No atime or ctime: they would
	// make every layer different. PAX keeps nanosecond mtimes, long
	// names, large ids and xattrs.
	hdr := &tar.Header{
		Name:    e.rel(),
		Mode:    int64(e.st.Mode & 0o7777),
		Uid:     int(e.st.Uid),
		Gid:     int(e.st.Gid),
		ModTime: w.modTime(time.Unix(e.st.Mtim.Unix())),
		Format:  tar.FormatPAX,
	}
	if len(e.xattrs) > 0 {
		hdr.PAXRecords = make(map[string]string, len(e.xattrs))
		for k, v := range e.xattrs {
			hdr.PAXRecords[paxXattr+k] = v
		}
	}

	if typ != unix.S_IFDIR && e.st.Nlink > 1 {
		if first, ok := w.links[e.key()]; ok {
			hdr.Typeflag = tar.TypeLink
			hdr.Linkname = first
			return w.writeHeader(e, hdr)
		}
		w.links[e.key()] = hdr.Name
	}

	switch typ {
	case unix.S_IFDIR:
		hdr.Typeflag = tar.TypeDir
		hdr.Name += "/"
	case unix.S_IFREG:
		hdr.Typeflag = tar.TypeReg
		hdr.Size = e.st.Size
		return w.putFile(e, hdr)
	case unix.S_IFLNK:
		hdr.Typeflag = tar.TypeSymlink
		target, err := readlink(e)
		if err != nil {
			return err
		}
		hdr.Linkname = target
	case unix.S_IFCHR, unix.S_IFBLK:
		hdr.Typeflag = tar.TypeChar
		if typ == unix.S_IFBLK {
			hdr.Typeflag = tar.TypeBlock
		}
		hdr.Devmajor = int64(unix.Major(e.st.Rdev))
		hdr.Devminor = int64(unix.Minor(e.st.Rdev))
	case unix.S_IFIFO:
		hdr.Typeflag = tar.TypeFifo
	default:
		return e.err("write", fmt.Errorf("%w: file type %#o", errdefs.ErrNotImplemented, typ))
	}
	return w.writeHeader(e, hdr)
}

func (w *writer) writeHeader(e *entry, hdr *tar.Header) error {
	if err := w.tw.WriteHeader(hdr); err != nil {
		return e.err("write header", err)
	}
	w.stats.Entries++
	return nil
}

// putFile writes a regular file: its header and its content. The file is
// opened before the header is written, so that a file that cannot be read
// does not leave a header without its content.
func (w *writer) putFile(e *entry, hdr *tar.Header) error {
	fd := -1
	if e.st.Size > 0 {
		var err error
		if fd, err = openFile(e); err != nil {
			return err
		}
		defer unix.Close(fd)
	}
	if err := w.writeHeader(e, hdr); err != nil {
		return err
	}
	w.stats.Files++
	if fd < 0 {
		return nil
	}
	return w.content(e, fd)
}

// content writes the size bytes of the file open as fd. A tar holds every
// byte of a sparse file (Go's archive/tar writes no sparse entries, and
// OCI appliers need not read them), but only the data segments are read
// (SEEK_DATA/SEEK_HOLE): holes are written as zeros from memory, without
// reading the disk, so a 10 GB file with 1 MB of data costs what writing
// 10 GB of zeros to w costs.
func (w *writer) content(e *entry, fd int) error {
	size := e.st.Size
	buf, _ := w.buffers()
	seek := true // SEEK_DATA works on this filesystem
	for off := int64(0); off < size; {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		data, hole := off, size
		if seek {
			d, err := unix.Seek(fd, off, unix.SEEK_DATA)
			switch err {
			case nil:
				data = min(d, size)
				if h, err := unix.Seek(fd, data, unix.SEEK_HOLE); err == nil {
					hole = min(h, size)
				}
			case unix.ENXIO: // nothing but a hole from off on
				data = size
			case unix.EINVAL, unix.EOPNOTSUPP:
				seek = false
			default:
				return e.err("lseek", err)
			}
		}
		if err := w.writeZeros(data - off); err != nil {
			return e.err("write", err)
		}
		for off = data; off < hole; {
			if err := w.ctx.Err(); err != nil {
				return err
			}
			n := int(min(int64(len(buf)), hole-off))
			if err := preadFull(fd, buf[:n], off); err != nil {
				return e.err("read", err)
			}
			if _, err := w.tw.Write(buf[:n]); err != nil {
				return e.err("write", err)
			}
			off += int64(n)
		}
	}
	w.stats.ContentBytes += size
	return nil
}

func (w *writer) writeZeros(n int64) error {
	if n > 0 && w.zeros == nil {
		w.zeros = make([]byte, 1<<20)
	}
	for n > 0 {
		if err := w.ctx.Err(); err != nil {
			return err
		}
		k := min(n, int64(len(w.zeros)))
		if _, err := w.tw.Write(w.zeros[:k]); err != nil {
			return err
		}
		n -= k
	}
	return nil
}
