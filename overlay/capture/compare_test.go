//go:build linux

package capture

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"slices"
	"sort"
	"strconv"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// compareTrees checks that dst is an exact copy of src, independently of
// the Copier's code: it walks both trees with os.Root (the standard
// library's openat-based resolution, so deep paths work), lstats every
// entry, and compares type, permission bits, owner, size, mtime, atime
// (except for symlinks, whose atime readlink updates), device numbers,
// every xattr, file content, symlink targets and hard-link groups. A file
// larger than bigFile is compared through its data segments, and must be
// no less sparse in dst than in src.
func compareTrees(t testing.TB, src, dst string) {
	t.Helper()
	cmp := &comparer{t: t, srcIno: map[string]uint64{}, dstIno: map[string]uint64{}}
	sr, err := os.OpenRoot(src)
	if err != nil {
		t.Fatal(err)
	}
	defer sr.Close()
	dr, err := os.OpenRoot(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer dr.Close()
	cmp.dir(sr, dr, ".")
	cmp.links()
	if cmp.errors > 0 {
		t.Fatalf("%s differs from %s in %d ways (first %d shown)", dst, src, cmp.errors, min(cmp.errors, maxReported))
	}
}

const (
	maxReported = 30
	bigFile     = 64 << 20
)

type comparer struct {
	t              testing.TB
	errors         int
	entries        int
	srcIno, dstIno map[string]uint64 // non-directories, for hard-link groups
	buf, val       [64 << 10]byte
}

func (c *comparer) errorf(format string, args ...any) {
	c.t.Helper()
	c.errors++
	if c.errors <= maxReported {
		c.t.Errorf(format, args...)
	}
}

// dir compares the directory rel, open as sr and dr (their own metadata
// included), and everything below it.
func (c *comparer) dir(sr, dr *os.Root, rel string) {
	sd, dd := c.open(sr, dr, rel)
	if sd == nil {
		return
	}
	defer sd.Close()
	defer dd.Close()
	if c.entry(sr, dr, sd, dd, ".", rel) {
		c.dirChildren(sr, dr, sd, dd, rel)
	}
}

// open opens both directories without updating their atime on reading,
// so that comparing does not change what a later round copies.
func (c *comparer) open(sr, dr *os.Root, rel string) (*os.File, *os.File) {
	sd, err := sr.OpenFile(".", os.O_RDONLY|syscall.O_NOATIME, 0)
	if err != nil {
		c.errorf("%s: %v", rel, err)
		return nil, nil
	}
	dd, err := dr.OpenFile(".", os.O_RDONLY|syscall.O_NOATIME, 0)
	if err != nil {
		sd.Close()
		c.errorf("%s: %v", rel, err)
		return nil, nil
	}
	return sd, dd
}

// dirChildren compares the entries of the directories sr and dr (open as
// sd and dd), and everything below them.
func (c *comparer) dirChildren(sr, dr *os.Root, sd, dd *os.File, rel string) {
	snames, err := sd.Readdirnames(-1)
	if err != nil {
		c.errorf("%s: %v", rel, err)
	}
	dnames, err := dd.Readdirnames(-1)
	if err != nil {
		c.errorf("%s: %v", rel, err)
	}
	sort.Strings(snames)
	sort.Strings(dnames)
	if !slices.Equal(snames, dnames) {
		c.errorf("%s: entries differ: only in src %q, only in dst %q", rel, minus(snames, dnames, 5), minus(dnames, snames, 5))
	}
	for _, name := range snames {
		if !sortedHas(dnames, name) {
			continue
		}
		p := path.Join(rel, name)
		if !c.entry(sr, dr, sd, dd, name, p) {
			continue
		}
		fi, err := sr.Lstat(name)
		if err != nil || !fi.IsDir() {
			continue
		}
		ssub, err := sr.OpenRoot(name)
		if err != nil {
			c.errorf("%s: %v", p, err)
			continue
		}
		dsub, err := dr.OpenRoot(name)
		if err != nil {
			ssub.Close()
			c.errorf("%s: %v", p, err)
			continue
		}
		if ssd, sdd := c.open(ssub, dsub, p); ssd != nil {
			c.dirChildren(ssub, dsub, ssd, sdd, p)
			ssd.Close()
			sdd.Close()
		}
		ssub.Close()
		dsub.Close()
	}
}

func sortedHas(sorted []string, s string) bool {
	_, ok := slices.BinarySearch(sorted, s)
	return ok
}

func minus(a, b []string, limit int) []string {
	var out []string
	for _, s := range a {
		if !sortedHas(b, s) {
			out = append(out, s)
			if len(out) == limit {
				break
			}
		}
	}
	return out
}

// entry compares the entry name of the directories sr and dr (open as sd
// and dd), reported as rel; it returns false when the types differ.
func (c *comparer) entry(sr, dr *os.Root, sd, dd *os.File, name, rel string) bool {
	c.entries++
	sfi, err := sr.Lstat(name)
	if err != nil {
		c.errorf("%s: %v", rel, err)
		return false
	}
	dfi, err := dr.Lstat(name)
	if err != nil {
		c.errorf("%s: %v", rel, err)
		return false
	}
	s, d := sfi.Sys().(*syscall.Stat_t), dfi.Sys().(*syscall.Stat_t)
	if s.Mode != d.Mode {
		c.errorf("%s: mode %#o, want %#o", rel, d.Mode, s.Mode)
		if s.Mode&syscall.S_IFMT != d.Mode&syscall.S_IFMT {
			return false
		}
	}
	typ := s.Mode & syscall.S_IFMT
	if s.Uid != d.Uid || s.Gid != d.Gid {
		c.errorf("%s: owner %d:%d, want %d:%d", rel, d.Uid, d.Gid, s.Uid, s.Gid)
	}
	if typ != syscall.S_IFDIR && s.Size != d.Size {
		c.errorf("%s: size %d, want %d", rel, d.Size, s.Size)
	}
	if s.Mtim != d.Mtim {
		c.errorf("%s: mtime %v, want %v", rel, d.Mtim, s.Mtim)
	}
	if typ != syscall.S_IFLNK && s.Atim != d.Atim {
		c.errorf("%s: atime %v, want %v", rel, d.Atim, s.Atim)
	}
	if s.Rdev != d.Rdev {
		c.errorf("%s: rdev %#x, want %#x", rel, d.Rdev, s.Rdev)
	}
	sx, dx := c.xattrs(sd, name, rel), c.xattrs(dd, name, rel)
	if sx != dx {
		c.errorf("%s: xattrs %q, want %q", rel, dx, sx)
	}
	switch typ {
	case syscall.S_IFREG:
		c.srcIno[rel], c.dstIno[rel] = s.Ino, d.Ino
		if s.Size > 0 && s.Size == d.Size {
			c.content(sr, dr, name, rel, s, d)
		}
	case syscall.S_IFLNK:
		c.srcIno[rel], c.dstIno[rel] = s.Ino, d.Ino
		st, err1 := sr.Readlink(name)
		dt, err2 := dr.Readlink(name)
		if err1 != nil || err2 != nil || st != dt {
			c.errorf("%s: link target %q (%v), want %q (%v)", rel, dt, err2, st, err1)
		}
	case syscall.S_IFDIR:
	case syscall.S_IFCHR:
		// Which of overlay's whiteouts share an inode (it links them to
		// save inodes) means nothing, to overlay or to a layer: a tracked
		// round copies a new one on its own (see Options.TrackChanges).
		if s.Rdev != 0 {
			c.srcIno[rel], c.dstIno[rel] = s.Ino, d.Ino
		}
	default:
		c.srcIno[rel], c.dstIno[rel] = s.Ino, d.Ino
	}
	return true
}

// xattrs returns every xattr of the entry name of dir as one sorted string.
func (c *comparer) xattrs(dir *os.File, name, rel string) string {
	p := "/proc/self/fd/" + strconv.Itoa(int(dir.Fd())) + "/" + name
	if name == "." {
		p = "/proc/self/fd/" + strconv.Itoa(int(dir.Fd()))
	}
	buf := c.buf[:]
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		c.errorf("%s: listxattr: %v", rel, err)
		return ""
	}
	var kv []string
	for _, a := range bytes.Split(buf[:n], []byte{0}) {
		if len(a) == 0 {
			continue
		}
		v := c.val[:]
		m, err := unix.Lgetxattr(p, string(a), v)
		if err != nil {
			c.errorf("%s: getxattr %s: %v", rel, a, err)
			continue
		}
		kv = append(kv, fmt.Sprintf("%s=%q", a, v[:m]))
	}
	sort.Strings(kv)
	return fmt.Sprint(kv)
}

// content compares file data.
func (c *comparer) content(sr, dr *os.Root, name, rel string, s, d *syscall.Stat_t) {
	sf, err := sr.OpenFile(name, os.O_RDONLY|syscall.O_NOATIME|syscall.O_NOFOLLOW, 0)
	if err != nil {
		c.errorf("%s: %v", rel, err)
		return
	}
	defer sf.Close()
	df, err := dr.OpenFile(name, os.O_RDONLY|syscall.O_NOATIME|syscall.O_NOFOLLOW, 0)
	if err != nil {
		c.errorf("%s: %v", rel, err)
		return
	}
	defer df.Close()
	if s.Size <= bigFile {
		if hashOf(sf) != hashOf(df) {
			c.errorf("%s: content differs", rel)
		}
		return
	}
	// Big (sparse) file: every dst data segment must lie within a src
	// data segment, and src's data segments must read the same in dst.
	ss, ds := segments(c, sf, s.Size, rel), segments(c, df, d.Size, rel)
	for _, dseg := range ds {
		if !slices.ContainsFunc(ss, func(sseg [2]int64) bool { return sseg[0] <= dseg[0] && dseg[1] <= sseg[1] }) {
			c.errorf("%s: dst has data at [%d,%d) where src has a hole", rel, dseg[0], dseg[1])
		}
	}
	for _, seg := range ss {
		a := io.NewSectionReader(sf, seg[0], seg[1]-seg[0])
		b := io.NewSectionReader(df, seg[0], seg[1]-seg[0])
		if hashOf(a) != hashOf(b) {
			c.errorf("%s: data at [%d,%d) differs", rel, seg[0], seg[1])
		}
	}
	if d.Blocks > s.Blocks+64 {
		c.errorf("%s: %d blocks allocated, src has %d: not sparse", rel, d.Blocks, s.Blocks)
	}
}

func segments(c *comparer, f *os.File, size int64, rel string) [][2]int64 {
	var segs [][2]int64
	fd := int(f.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			c.errorf("%s: SEEK_DATA: %v", rel, err)
			return nil
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			c.errorf("%s: SEEK_HOLE: %v", rel, err)
			return nil
		}
		segs = append(segs, [2]int64{data, min(hole, size)})
		off = hole
	}
	return segs
}

func hashOf(r io.Reader) [32]byte {
	h := sha256.New()
	io.Copy(h, r)
	return [32]byte(h.Sum(nil))
}

// links checks that the hard-link groups (names sharing an inode) are the
// same in both trees.
func (c *comparer) links() {
	groups := func(inos map[string]uint64) map[string]string { // path -> first path of its group
		first := map[uint64]string{}
		paths := make([]string, 0, len(inos))
		for p := range inos {
			paths = append(paths, p)
		}
		sort.Strings(paths)
		rep := make(map[string]string, len(paths))
		for _, p := range paths {
			if _, ok := first[inos[p]]; !ok {
				first[inos[p]] = p
			}
			rep[p] = first[inos[p]]
		}
		return rep
	}
	sg, dg := groups(c.srcIno), groups(c.dstIno)
	for p, r := range sg {
		if dg[p] != r {
			c.errorf("%s: hard-linked with %q in dst, want %q", p, dg[p], r)
		}
	}
}
