//go:build linux

package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/archive"
	"golang.org/x/sys/unix"
)

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// writeFile creates p or rewrites it in place, with data and the mode
// bits mode (setuid, setgid and sticky included; umask does not apply).
func writeFile(t testing.TB, p string, data []byte, mode uint32) {
	t.Helper()
	must(t, os.WriteFile(p, data, 0o600))
	must(t, unix.Chmod(p, mode))
}

// setMtime sets atime and mtime of p without following a symlink.
func setMtime(t testing.TB, p string, mtime time.Time) {
	t.Helper()
	ts := unix.NsecToTimespec(mtime.UnixNano())
	must(t, unix.UtimesNanoAt(unix.AT_FDCWD, p, []unix.Timespec{ts, ts}, unix.AT_SYMLINK_NOFOLLOW))
}

func setxattr(t testing.TB, p, name, value string) {
	t.Helper()
	must(t, unix.Lsetxattr(p, name, []byte(value), 0))
}

// capV2 is a security.capability value (VFS_CAP_REVISION_2, effective)
// granting cap_net_bind_service.
func capV2() string {
	b := make([]byte, 20)
	binary.LittleEndian.PutUint32(b[0:], 0x02000000|1)
	binary.LittleEndian.PutUint32(b[4:], 1<<unix.CAP_NET_BIND_SERVICE)
	return string(b)
}

// copyTree copies src to the new directory dst with cp -a: owners, modes,
// times to the nanosecond, xattrs (trusted.* too, as root), hard links,
// devices and sparse files.
func copyTree(t testing.TB, src, dst string) {
	t.Helper()
	out, err := exec.Command("cp", "-a", "--sparse=always", src, dst).CombinedOutput()
	if err != nil {
		t.Fatalf("cp -a %s %s: %v: %s", src, dst, err, out)
	}
}

// write runs Write into memory.
func write(t testing.TB, upper string, opts Options) ([]byte, Stats) {
	t.Helper()
	var buf bytes.Buffer
	st, err := Write(context.Background(), &buf, upper, opts)
	if err != nil {
		t.Fatalf("Write(%s, %+v): %v", upper, opts, err)
	}
	return buf.Bytes(), st
}

// tarEntry is a tar header and the content that followed it.
type tarEntry struct {
	hdr  *tar.Header
	data []byte
}

func readTar(t testing.TB, data []byte) []tarEntry {
	t.Helper()
	tr := tar.NewReader(bytes.NewReader(data))
	var entries []tarEntry
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return entries
		}
		must(t, err)
		content, err := io.ReadAll(tr)
		must(t, err)
		entries = append(entries, tarEntry{hdr: hdr, data: content})
	}
}

func names(entries []tarEntry) []string {
	var n []string
	for _, e := range entries {
		n = append(n, e.hdr.Name)
	}
	return n
}

func find(entries []tarEntry, name string) *tarEntry {
	for i := range entries {
		if entries[i].hdr.Name == name {
			return &entries[i]
		}
	}
	return nil
}

// apply applies the layer tar to dir with containerd's applier.
func apply(t testing.TB, dir string, layer []byte) {
	t.Helper()
	if _, err := archive.Apply(context.Background(), dir, bytes.NewReader(layer)); err != nil {
		t.Fatalf("apply layer to %s: %v", dir, err)
	}
}

// mountOverlay mounts an overlay of lower and upper (with work) on
// merged and returns a function that unmounts it (also run at cleanup).
// Options that an environment could default differently are set.
func mountOverlay(t testing.TB, lower, upper, work, merged string) func() {
	t.Helper()
	for _, d := range []string{upper, work, merged} {
		must(t, os.MkdirAll(d, 0o755))
	}
	data := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s,index=off,redirect_dir=off,metacopy=off", lower, upper, work)
	if err := unix.Mount("overlay", merged, "overlay", 0, data); err != nil {
		t.Fatalf("mount overlay on %s (%s): %v", merged, data, err)
	}
	mounted := true
	umount := func() {
		t.Helper()
		if mounted {
			mounted = false
			must(t, unix.Unmount(merged, 0))
		}
	}
	t.Cleanup(umount)
	return umount
}

// node is what the comparison looks at in one entry of a tree.
type node struct {
	typ    fs.FileMode // type bits
	mode   uint32      // permission bits, setuid, setgid, sticky
	uid    uint32
	gid    uint32
	size   int64  // regular files
	sum    string // sha256 of a regular file's content
	target string // symlink
	rdev   uint64 // devices
	mtime  int64  // ns
	xattrs string // sorted name=value list, without security.selinux
	links  string // the other names of a multi-link non-directory
	dev    uint64
	ino    uint64
}

func (n node) String() string {
	return fmt.Sprintf("%v mode=%#o %d:%d size=%d sum=%.12s target=%q rdev=%d mtime=%s xattrs=[%s] links=[%s]",
		n.typ, n.mode, n.uid, n.gid, n.size, n.sum, n.target, n.rdev, time.Unix(0, n.mtime).UTC().Format(time.RFC3339Nano), n.xattrs, n.links)
}

// snapshot describes every entry below root (not root itself, whose
// metadata no layer carries). Sockets are left out: no layer holds them.
func snapshot(t testing.TB, root string) map[string]node {
	t.Helper()
	tree := make(map[string]node)
	groups := make(map[[2]uint64][]string)
	must(t, filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == root {
			return nil
		}
		rel, _ := filepath.Rel(root, p)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		n := node{
			typ:   fs.FileMode(0),
			mode:  st.Mode & 0o7777,
			uid:   st.Uid,
			gid:   st.Gid,
			mtime: st.Mtim.Nano(),
			dev:   st.Dev,
			ino:   st.Ino,
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFSOCK:
			return nil
		case unix.S_IFDIR:
			n.typ = fs.ModeDir
		case unix.S_IFREG:
			n.size = st.Size
			f, err := os.OpenFile(p, os.O_RDONLY|unix.O_NOFOLLOW, 0)
			if err != nil {
				return err
			}
			h := sha256.New()
			_, err = io.Copy(h, f)
			f.Close()
			if err != nil {
				return err
			}
			n.sum = hex.EncodeToString(h.Sum(nil))
		case unix.S_IFLNK:
			n.typ = fs.ModeSymlink
			if n.target, err = os.Readlink(p); err != nil {
				return err
			}
		case unix.S_IFCHR:
			n.typ, n.rdev = fs.ModeCharDevice|fs.ModeDevice, st.Rdev
		case unix.S_IFBLK:
			n.typ, n.rdev = fs.ModeDevice, st.Rdev
		case unix.S_IFIFO:
			n.typ = fs.ModeNamedPipe
		}
		n.xattrs = xattrList(t, p)
		if n.typ != fs.ModeDir && st.Nlink > 1 {
			k := [2]uint64{st.Dev, st.Ino}
			groups[k] = append(groups[k], rel)
		}
		tree[rel] = n
		return nil
	}))
	for _, g := range groups {
		if len(g) < 2 {
			continue
		}
		sort.Strings(g)
		for _, p := range g {
			n := tree[p]
			n.links = strings.Join(slices.DeleteFunc(slices.Clone(g), func(s string) bool { return s == p }), ",")
			tree[p] = n
		}
	}
	return tree
}

func xattrList(t testing.TB, p string) string {
	t.Helper()
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err == unix.ENOTSUP {
		return ""
	}
	must(t, err)
	var pairs []string
	for _, name := range strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00") {
		if name == "" || name == "security.selinux" {
			continue
		}
		val := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, name, val)
		must(t, err)
		pairs = append(pairs, fmt.Sprintf("%s=%q", name, val[:m]))
	}
	sort.Strings(pairs)
	return strings.Join(pairs, " ")
}

// compareTrees fails the test if got differs from want in any entry.
func compareTrees(t testing.TB, want, got map[string]node) {
	t.Helper()
	var diffs []string
	for p, w := range want {
		g, ok := got[p]
		if !ok {
			diffs = append(diffs, fmt.Sprintf("missing %s (%v)", p, w))
			continue
		}
		w.dev, w.ino, g.dev, g.ino = 0, 0, 0, 0
		if w != g {
			diffs = append(diffs, fmt.Sprintf("%s:\n\twant %v\n\tgot  %v", p, w, g))
		}
	}
	for p, g := range got {
		if _, ok := want[p]; !ok {
			diffs = append(diffs, fmt.Sprintf("unexpected %s (%v)", p, g))
		}
	}
	if len(diffs) > 0 {
		sort.Strings(diffs)
		t.Fatalf("%d differences:\n%s", len(diffs), strings.Join(diffs, "\n"))
	}
}
