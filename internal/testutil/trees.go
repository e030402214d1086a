package testutil

import (
	"crypto/sha256"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TreeEntry is what CompareTrees compares of one path.
type TreeEntry struct {
	Mode    fs.FileMode
	UID     uint32
	GID     uint32
	Size    int64
	Content [32]byte // sha256 of a regular file
	Link    string   // symlink target
	Rdev    uint64
	MtimeNs int64 // regular files and symlinks only
	Xattrs  string
	// LinkGroup is the first path (in walk order) sharing the inode, for
	// hard links.
	LinkGroup string
}

// ReadTree describes every entry under root by its path relative to
// root, never following symlinks.
func ReadTree(root string) (map[string]TreeEntry, error) {
	out := map[string]TreeEntry{}
	firstName := map[uint64]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		e := TreeEntry{Mode: info.Mode(), UID: st.Uid, GID: st.Gid, Rdev: st.Rdev}
		switch {
		case info.Mode().IsRegular():
			e.Size = st.Size
			e.MtimeNs = st.Mtim.Nano()
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			h := sha256.New()
			_, err = io.Copy(h, f)
			f.Close()
			if err != nil {
				return err
			}
			copy(e.Content[:], h.Sum(nil))
			if st.Nlink > 1 {
				if first, ok := firstName[st.Ino]; ok {
					e.LinkGroup = first
				} else {
					firstName[st.Ino] = rel
					e.LinkGroup = rel
				}
			}
		case info.Mode()&fs.ModeSymlink != 0:
			if e.Link, err = os.Readlink(p); err != nil {
				return err
			}
			e.MtimeNs = st.Mtim.Nano()
		}
		e.Xattrs = userXattrs(p)
		out[rel] = e
		return nil
	})
	return out, err
}

// userXattrs lists the xattrs an image carries for applications (user.*
// and security.capability), sorted, as one string.
func userXattrs(p string) string {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil || n <= 0 {
		return ""
	}
	var parts []string
	for _, name := range strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00") {
		if !strings.HasPrefix(name, "user.") && name != "security.capability" {
			continue
		}
		if strings.HasPrefix(name, "user.overlay.") {
			continue
		}
		val := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, name, val)
		if err != nil {
			continue
		}
		parts = append(parts, name+"="+string(val[:m]))
	}
	sort.Strings(parts)
	return strings.Join(parts, ",")
}

// CompareTrees fails the test unless the trees under want and got hold
// the same paths with the same types, modes, owners, contents, symlink
// targets, device numbers, file mtimes, application xattrs and hard-link
// groups. Directory mtimes are not compared: applying a layer sets them
// as it goes.
func CompareTrees(t testing.TB, want, got string) {
	t.Helper()
	w, err := ReadTree(want)
	if err != nil {
		t.Fatalf("reading %s: %v", want, err)
	}
	g, err := ReadTree(got)
	if err != nil {
		t.Fatalf("reading %s: %v", got, err)
	}
	var diffs []string
	for p, we := range w {
		ge, ok := g[p]
		if !ok {
			diffs = append(diffs, fmt.Sprintf("%s: missing", p))
			continue
		}
		if p == "." {
			continue // the mount point's own metadata is not the image's
		}
		if we != ge {
			diffs = append(diffs, fmt.Sprintf("%s: want %+v, got %+v", p, we, ge))
		}
	}
	for p := range g {
		if _, ok := w[p]; !ok {
			diffs = append(diffs, fmt.Sprintf("%s: unexpected", p))
		}
	}
	if len(diffs) > 0 {
		sort.Strings(diffs)
		if len(diffs) > 20 {
			diffs = append(diffs[:20], fmt.Sprintf("... and %d more", len(diffs)-20))
		}
		t.Fatalf("trees %s and %s differ:\n%s", want, got, strings.Join(diffs, "\n"))
	}
}
