//go:build linux

package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
	"golang.org/x/sys/unix"
)

// These tests build uppers by hand, with the forms of overlay state a
// mount on this kernel does not make (xattr whiteouts, user.overlay.*),
// and check the tar itself.

func TestMarkers(t *testing.T) {
	testutil.RequireRoot(t)
	for _, tc := range []struct {
		name  string
		build func(t *testing.T, u string)
		want  []string // entry names, in order
	}{{
		name:  "char 0/0 whiteout",
		build: func(t *testing.T, u string) { must(t, unix.Mknod(filepath.Join(u, "gone"), unix.S_IFCHR, 0)) },
		want:  []string{".wh.gone"},
	}, {
		name: "xattr whiteouts in a merge dir marked x",
		build: func(t *testing.T, u string) {
			must(t, os.Mkdir(filepath.Join(u, "d"), 0o755))
			setxattr(t, filepath.Join(u, "d"), "trusted.overlay.opaque", "x")
			writeFile(t, filepath.Join(u, "d/gone"), nil, 0)
			setxattr(t, filepath.Join(u, "d/gone"), "trusted.overlay.whiteout", "")
			writeFile(t, filepath.Join(u, "d/gone-too"), nil, 0)
			setxattr(t, filepath.Join(u, "d/gone-too"), "user.overlay.whiteout", "y")
			writeFile(t, filepath.Join(u, "d/kept"), []byte("k"), 0o644)
		},
		want: []string{"d/", "d/.wh.gone", "d/.wh.gone-too", "d/kept"},
	}, {
		name: "whiteout xattr on a non-empty file is no whiteout",
		build: func(t *testing.T, u string) {
			writeFile(t, filepath.Join(u, "f"), []byte("data"), 0o644)
			setxattr(t, filepath.Join(u, "f"), "trusted.overlay.whiteout", "")
		},
		want: []string{"f"},
	}, {
		name: "opaque y, trusted and user",
		build: func(t *testing.T, u string) {
			for _, d := range []string{"a", "b"} {
				must(t, os.Mkdir(filepath.Join(u, d), 0o755))
				writeFile(t, filepath.Join(u, d, "f"), []byte(d), 0o644)
			}
			setxattr(t, filepath.Join(u, "a"), "trusted.overlay.opaque", "y")
			setxattr(t, filepath.Join(u, "b"), "user.overlay.opaque", "y")
		},
		want: []string{"a/", "a/.wh..wh..opq", "a/f", "b/", "b/.wh..wh..opq", "b/f"},
	}, {
		name: "opaque root",
		build: func(t *testing.T, u string) {
			setxattr(t, u, "trusted.overlay.opaque", "y")
			writeFile(t, filepath.Join(u, "f"), []byte("f"), 0o644)
		},
		want: []string{".wh..wh..opq", "f"},
	}, {
		name: "socket hides the lower's entry",
		build: func(t *testing.T, u string) {
			must(t, unix.Mknod(filepath.Join(u, "s.sock"), unix.S_IFSOCK|0o755, 0))
		},
		want: []string{".wh.s.sock"},
	}, {
		name: "byte order, a directory before its contents",
		build: func(t *testing.T, u string) {
			for _, d := range []string{"b", "a", "a/z", "a/B", "A", "a-"} {
				must(t, os.Mkdir(filepath.Join(u, d), 0o755))
			}
			writeFile(t, filepath.Join(u, "a/z/1"), nil, 0o644)
			writeFile(t, filepath.Join(u, "a.txt"), nil, 0o644)
			must(t, unix.Mknod(filepath.Join(u, "a/Z"), unix.S_IFCHR, 0))
		},
		want: []string{"A/", "a/", "a/B/", "a/.wh.Z", "a/z/", "a/z/1", "a-/", "a.txt", "b/"},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			u := t.TempDir()
			tc.build(t, u)
			layer, st := write(t, u, Options{})
			entries := readTar(t, layer)
			if got := names(entries); !slices.Equal(got, tc.want) {
				t.Fatalf("entries %q, want %q", got, tc.want)
			}
			var whiteouts int64
			for _, e := range entries {
				for k := range e.hdr.PAXRecords {
					if strings.Contains(k, "overlay.") {
						t.Errorf("%s has overlay's xattr %s", e.hdr.Name, k)
					}
				}
				if strings.HasPrefix(filepath.Base(e.hdr.Name), ".wh.") {
					whiteouts++
					if e.hdr.Typeflag != tar.TypeReg || e.hdr.Size != 0 || e.hdr.Mode != 0 || e.hdr.ModTime.Unix() != 0 {
						t.Errorf("whiteout %s: %+v", e.hdr.Name, e.hdr)
					}
				}
			}
			if st.Entries != int64(len(entries)) || st.Whiteouts != whiteouts {
				t.Errorf("stats %+v for %d entries, %d whiteouts", st, len(entries), whiteouts)
			}
		})
	}
}

// TestHeaders checks every field of the headers of each kind of entry.
func TestHeaders(t *testing.T) {
	testutil.RequireRoot(t)
	u := t.TempDir()
	p := func(rel string) string { return filepath.Join(u, rel) }
	mt := time.Date(2020, 1, 2, 3, 4, 5, 678901234, time.UTC)

	writeFile(t, p("file"), []byte("content"), 0o644)
	must(t, os.Lchown(p("file"), 100000, 4000000))
	must(t, unix.Chmod(p("file"), 0o4751)) // after chown, which clears setuid
	setxattr(t, p("file"), "user.foo", "bar")
	setxattr(t, p("file"), "trusted.foo", "t")
	setxattr(t, p("file"), "security.capability", capV2())
	setxattr(t, p("file"), "trusted.overlay.origin", "private")
	setxattr(t, p("file"), "user.overlay.impure", "private")
	must(t, os.Mkdir(p("dir"), 0o755))
	must(t, unix.Chmod(p("dir"), 0o1777))
	setxattr(t, p("dir"), "user.d", "dir")
	must(t, os.Symlink("/etc/shadow", p("link")))
	must(t, os.Lchown(p("link"), 12, 34))
	must(t, unix.Mknod(p("null"), unix.S_IFCHR, int(unix.Mkdev(1, 3))))
	must(t, unix.Mknod(p("blk"), unix.S_IFBLK, int(unix.Mkdev(259, 70000))))
	must(t, unix.Mkfifo(p("fifo"), 0))
	for n, mode := range map[string]uint32{"null": 0o666, "blk": 0o640, "fifo": 0o600} {
		must(t, unix.Chmod(p(n), mode)) // mknod applies the umask
	}
	writeFile(t, p("zero"), []byte("mode 000 is read: we are root"), 0)
	writeFile(t, p(strings.Repeat("x", 255)), []byte("long name"), 0o644)
	must(t, os.Link(p("file"), p("zz-hard")))
	for _, n := range []string{"file", "dir", "link", "null", "blk", "fifo", "zero", strings.Repeat("x", 255)} {
		setMtime(t, p(n), mt)
	}

	layer, st := write(t, u, Options{})
	entries := readTar(t, layer)
	got := make(map[string]*tar.Header)
	for _, e := range entries {
		if e.hdr.Uname != "" || e.hdr.Gname != "" || !e.hdr.AccessTime.IsZero() || !e.hdr.ChangeTime.IsZero() {
			t.Errorf("%s: names or times a layer must not carry: %+v", e.hdr.Name, e.hdr)
		}
		got[e.hdr.Name] = e.hdr
	}
	xattrs := func(kv ...string) map[string]string {
		m := make(map[string]string)
		for i := 0; i < len(kv); i += 2 {
			m[paxXattr+kv[i]] = kv[i+1]
		}
		return m
	}
	for _, tc := range []struct {
		name   string
		typ    byte
		mode   int64
		uid    int
		gid    int
		size   int64
		link   string
		major  int64
		minor  int64
		xattrs map[string]string
	}{
		{name: "file", typ: tar.TypeReg, mode: 0o4751, uid: 100000, gid: 4000000, size: 7, xattrs: xattrs("user.foo", "bar", "trusted.foo", "t", "security.capability", capV2())},
		{name: "dir/", typ: tar.TypeDir, mode: 0o1777, xattrs: xattrs("user.d", "dir")},
		{name: "zz-hard", typ: tar.TypeLink, mode: 0o4751, uid: 100000, gid: 4000000, link: "file", xattrs: xattrs("user.foo", "bar", "trusted.foo", "t", "security.capability", capV2())},
		{name: "link", typ: tar.TypeSymlink, mode: 0o777, uid: 12, gid: 34, link: "/etc/shadow"},
		{name: "null", typ: tar.TypeChar, mode: 0o666, major: 1, minor: 3},
		{name: "blk", typ: tar.TypeBlock, mode: 0o640, major: 259, minor: 70000},
		{name: "fifo", typ: tar.TypeFifo, mode: 0o600},
		{name: "zero", typ: tar.TypeReg, mode: 0, size: 29},
		{name: strings.Repeat("x", 255), typ: tar.TypeReg, mode: 0o644, size: 9},
	} {
		h := got[tc.name]
		if h == nil {
			t.Errorf("no %s in %q", tc.name, names(entries))
			continue
		}
		if h.Typeflag != tc.typ || h.Mode != tc.mode || h.Uid != tc.uid || h.Gid != tc.gid || h.Size != tc.size ||
			h.Linkname != tc.link || h.Devmajor != tc.major || h.Devminor != tc.minor {
			t.Errorf("%s: %+v", tc.name, h)
		}
		if !h.ModTime.Equal(mt) {
			t.Errorf("%s: mtime %v, want %v", tc.name, h.ModTime, mt)
		}
		var xa map[string]string
		for k, v := range h.PAXRecords {
			if strings.HasPrefix(k, paxXattr) {
				if xa == nil {
					xa = make(map[string]string)
				}
				xa[k] = v
			}
		}
		if len(xa) != len(tc.xattrs) || (len(xa) > 0 && fmt.Sprint(xa) != fmt.Sprint(tc.xattrs)) {
			t.Errorf("%s: xattrs %q, want %q", tc.name, xa, tc.xattrs)
		}
	}
	if e := find(entries, "zero"); e == nil || string(e.data) != "mode 000 is read: we are root" {
		t.Errorf("zero: %+v", e)
	}
	if st.Files != 3 || st.ContentBytes != 7+29+9 {
		t.Errorf("stats %+v", st)
	}
}

func TestModTimeClamp(t *testing.T) {
	testutil.RequireRoot(t)
	u := t.TempDir()
	early := time.Date(2000, 1, 1, 0, 0, 0, 123, time.UTC)
	late := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	epoch := time.Date(2020, 6, 1, 0, 0, 0, 0, time.UTC)
	writeFile(t, filepath.Join(u, "early"), nil, 0o644)
	setMtime(t, filepath.Join(u, "early"), early)
	must(t, os.Mkdir(filepath.Join(u, "late"), 0o755))
	must(t, unix.Mknod(filepath.Join(u, "late/gone"), unix.S_IFCHR, 0))
	setMtime(t, filepath.Join(u, "late"), late)

	entries := readTar(t, must2(write(t, u, Options{ModTime: &epoch})))
	for name, want := range map[string]time.Time{"early": early, "late/": epoch, "late/.wh.gone": time.Unix(0, 0)} {
		if e := find(entries, name); e == nil || !e.hdr.ModTime.Equal(want) {
			t.Errorf("%s: %+v, want mtime %v", name, e, want)
		}
	}
}

func must2(b []byte, _ Stats) []byte { return b }

func TestDeterministic(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	prev, u := filepath.Join(dir, "prev"), filepath.Join(dir, "upper")
	must(t, os.Mkdir(prev, 0o755))
	for i := range 200 {
		d := filepath.Join(prev, fmt.Sprintf("d%02d", i%17))
		must(t, os.MkdirAll(d, 0o755))
		writeFile(t, filepath.Join(d, fmt.Sprintf("f%03d", i)), bytes.Repeat([]byte{byte(i)}, i*37), 0o644)
		setxattr(t, filepath.Join(d, fmt.Sprintf("f%03d", i)), fmt.Sprintf("user.k%d", i%5), "v")
	}
	must(t, os.Link(filepath.Join(prev, "d01/f001"), filepath.Join(prev, "d02/link")))
	copyTree(t, prev, u)
	writeFile(t, filepath.Join(u, "d03/f003"), []byte("changed"), 0o644)
	must(t, os.RemoveAll(filepath.Join(u, "d04")))
	must(t, os.Link(filepath.Join(u, "d05/f005"), filepath.Join(u, "d06/new-link")))

	for _, opts := range []Options{{}, {Previous: prev}} {
		a, _ := write(t, u, opts)
		b, _ := write(t, u, opts)
		if !bytes.Equal(a, b) {
			t.Errorf("%+v: two writes of the same tree differ", opts)
		}
	}
}

// TestSymlinkNotFollowed: a symlink to a host file or directory is written
// as a symlink; the target is never opened.
func TestSymlinkNotFollowed(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	u, outside := filepath.Join(dir, "upper"), filepath.Join(dir, "outside")
	must(t, os.Mkdir(u, 0o755))
	must(t, os.MkdirAll(filepath.Join(outside, "sub"), 0o755))
	secret := "HOST-SECRET-" + strings.Repeat("s", 64)
	writeFile(t, filepath.Join(outside, "secret"), []byte(secret), 0o600)
	writeFile(t, filepath.Join(outside, "sub/inner"), []byte(secret), 0o600)
	must(t, os.Symlink(filepath.Join(outside, "secret"), filepath.Join(u, "file-link")))
	must(t, os.Symlink(filepath.Join(outside, "sub"), filepath.Join(u, "dir-link")))
	must(t, os.Symlink("/", filepath.Join(u, "root-link")))

	check := watch(t, outside)
	layer, _ := write(t, u, Options{})
	check()
	if bytes.Contains(layer, []byte(secret)) {
		t.Fatal("the layer holds the content of a host file behind a symlink")
	}
	entries := readTar(t, layer)
	if got, want := names(entries), []string{"dir-link", "file-link", "root-link"}; !slices.Equal(got, want) {
		t.Fatalf("entries %q, want %q", got, want)
	}
	for _, e := range entries {
		if e.hdr.Typeflag != tar.TypeSymlink || e.hdr.Size != 0 {
			t.Errorf("%s: %+v", e.hdr.Name, e.hdr)
		}
	}
}

// watch reports any open or read of an entry of dir through inotify; the
// returned function fails the test if there was one.
func watch(t *testing.T, dir string) func() {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	must(t, err)
	var dirs []string // all first: listing a directory opens it
	must(t, filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.IsDir() {
			dirs = append(dirs, p)
		}
		return err
	}))
	for _, d := range dirs {
		_, err := unix.InotifyAddWatch(fd, d, unix.IN_OPEN|unix.IN_ACCESS)
		must(t, err)
	}
	return func() {
		t.Helper()
		defer unix.Close(fd)
		buf := make([]byte, 4096)
		if n, err := unix.Read(fd, buf); err != unix.EAGAIN {
			t.Errorf("%s was accessed (%d bytes of events, %v)", dir, n, err)
		}
	}
}

func TestSparse(t *testing.T) {
	testutil.RequireRoot(t)
	u := t.TempDir()
	const size = 10 << 30
	f, err := os.Create(filepath.Join(u, "sparse"))
	must(t, err)
	must(t, f.Truncate(size))
	data := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	for _, off := range []int64{0, 3<<30 + 12345, size - int64(len(data))} {
		_, err := f.WriteAt(data[:len(data)/3], off)
		must(t, err)
	}
	must(t, f.Close())

	start, read := time.Now(), readBytes(t)
	st, err := Write(context.Background(), io.Discard, u, Options{})
	elapsed, read := time.Since(start), readBytes(t)-read
	must(t, err)
	t.Logf("10 GiB sparse file with 1 MiB of data to io.Discard: %v, %d bytes read", elapsed, read)
	if st.ContentBytes != size {
		t.Errorf("stats %+v", st)
	}
	if read > 16<<20 {
		t.Errorf("%d bytes read for 1 MiB of data: holes were read", read)
	}
	if elapsed > 3*time.Second {
		t.Errorf("writing a sparse file took %v: are holes read from disk?", elapsed)
	}

	// The bytes: a smaller sparse file, data and holes at odd offsets.
	small := filepath.Join(u, "small")
	f, err = os.Create(small)
	must(t, err)
	must(t, f.Truncate(9<<20+7))
	want := make([]byte, 9<<20+7)
	for _, off := range []int64{5, 2<<20 + 1, 9 << 20} {
		_, err := f.WriteAt([]byte("DATA"), off)
		must(t, err)
		copy(want[off:], "DATA")
	}
	must(t, f.Close())
	must(t, os.Remove(filepath.Join(u, "sparse")))
	layer, _ := write(t, u, Options{})
	if e := find(readTar(t, layer), "small"); e == nil || !bytes.Equal(e.data, want) {
		t.Fatal("the content of a sparse file differs")
	}
}

// readBytes is what this process read so far, with read(2) and its
// kin, holes included ("rchar" in /proc/self/io).
func readBytes(t *testing.T) int64 {
	data, err := os.ReadFile("/proc/self/io")
	must(t, err)
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "rchar: "); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			must(t, err)
			return n
		}
	}
	t.Fatalf("no rchar in /proc/self/io: %s", data)
	return 0
}

// TestDeep: paths longer than PATH_MAX.
func TestDeep(t *testing.T) {
	testutil.RequireRoot(t)
	u := t.TempDir()
	fd, err := unix.Open(u, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	must(t, err)
	var parts []string
	for i := range 40 {
		name := fmt.Sprintf("%03d", i) + strings.Repeat("d", 200)
		parts = append(parts, name)
		must(t, unix.Mkdirat(fd, name, 0o755))
		nfd, err := unix.Openat(fd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		unix.Close(fd)
		must(t, err)
		fd = nfd
	}
	ffd, err := unix.Openat(fd, "bottom", unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o640)
	must(t, err)
	_, err = unix.Write(ffd, []byte("at the bottom"))
	must(t, err)
	unix.Close(ffd)
	must(t, unix.Mknodat(fd, "wh", unix.S_IFCHR, 0))
	unix.Close(fd)

	entries := readTar(t, must2(write(t, u, Options{})))
	deep := strings.Join(parts, "/")
	if len(deep) <= unix.PathMax {
		t.Fatalf("the tree is only %d bytes deep", len(deep))
	}
	if e := find(entries, deep+"/bottom"); e == nil || string(e.data) != "at the bottom" {
		t.Fatalf("no %d-byte path in the layer", len(deep)+7)
	}
	if find(entries, deep+"/.wh.wh") == nil {
		t.Fatal("no deep whiteout")
	}
	if len(entries) != 42 {
		t.Fatalf("%d entries", len(entries))
	}
}

func TestManyEntries(t *testing.T) {
	testutil.RequireRoot(t)
	if testing.Short() {
		testutil.SkipOrFail(t, "-short: 100,000 files")
	}
	u := t.TempDir()
	d := filepath.Join(u, "big")
	must(t, os.Mkdir(d, 0o755))
	fd, err := unix.Open(d, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	must(t, err)
	const n = 100_000
	for i := range n {
		f, err := unix.Openat(fd, fmt.Sprintf("f%06d", (i*7919)%n), unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o644)
		must(t, err)
		unix.Close(f)
	}
	unix.Close(fd)

	// Checked as it streams: the layer is 150 MB of headers.
	pr, pw := io.Pipe()
	type result struct {
		n      int
		sorted bool
		err    error
	}
	done := make(chan result)
	go func() {
		r := result{sorted: true}
		tr := tar.NewReader(pr)
		prev := ""
		for {
			hdr, err := tr.Next()
			if err != nil {
				if err != io.EOF {
					r.err = err
				}
				pr.CloseWithError(err)
				done <- r
				return
			}
			r.n++
			r.sorted = r.sorted && prev < hdr.Name
			prev = hdr.Name
		}
	}()
	start := time.Now()
	st, err := Write(context.Background(), pw, u, Options{})
	pw.CloseWithError(err)
	must(t, err)
	r := <-done
	t.Logf("%d entries in one directory: %v", st.Entries, time.Since(start))
	must(t, r.err)
	if r.n != n+1 || !r.sorted {
		t.Fatalf("%d entries, sorted: %v", r.n, r.sorted)
	}
}

func TestErrors(t *testing.T) {
	testutil.RequireRoot(t)
	for _, tc := range []struct {
		name  string
		build func(t *testing.T, u string)
		prev  func(t *testing.T, p string) // non-nil: incremental
		ctx   func() context.Context
		is    error
		path  string // in the message
	}{{
		name: "redirect_dir",
		build: func(t *testing.T, u string) {
			must(t, os.MkdirAll(filepath.Join(u, "a/moved"), 0o755))
			setxattr(t, filepath.Join(u, "a/moved"), "trusted.overlay.redirect", "/orig")
		},
		is:   errdefs.ErrNotImplemented,
		path: "a/moved",
	}, {
		name: "metacopy",
		build: func(t *testing.T, u string) {
			writeFile(t, filepath.Join(u, "meta"), []byte("x"), 0o644)
			setxattr(t, filepath.Join(u, "meta"), "trusted.overlay.metacopy", "")
		},
		is:   errdefs.ErrNotImplemented,
		path: "meta",
	}, {
		name:  "whiteout prefix",
		build: func(t *testing.T, u string) { writeFile(t, filepath.Join(u, ".wh.sneaky"), []byte("x"), 0o644) },
		is:    errdefs.ErrNotImplemented,
		path:  ".wh.sneaky",
	}, {
		name:  "whiteout vanished",
		build: func(t *testing.T, u string) {},
		prev:  func(t *testing.T, p string) { must(t, unix.Mknod(filepath.Join(p, "gone"), unix.S_IFCHR, 0)) },
		is:    errdefs.ErrFailedPrecondition,
		path:  "gone",
	}, {
		name:  "missing upper",
		build: func(t *testing.T, u string) { must(t, os.Remove(u)) },
		is:    os.ErrNotExist,
	}, {
		name:  "missing previous",
		build: func(t *testing.T, u string) {},
		prev:  func(t *testing.T, p string) { must(t, os.Remove(p)) },
		is:    os.ErrNotExist,
	}, {
		name:  "canceled",
		build: func(t *testing.T, u string) { writeFile(t, filepath.Join(u, "f"), nil, 0o644) },
		ctx: func() context.Context {
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			return ctx
		},
		is: context.Canceled,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			u := filepath.Join(dir, "upper")
			must(t, os.Mkdir(u, 0o755))
			tc.build(t, u)
			var opts Options
			if tc.prev != nil {
				opts.Previous = filepath.Join(dir, "prev")
				must(t, os.Mkdir(opts.Previous, 0o755))
				tc.prev(t, opts.Previous)
			}
			ctx := context.Background()
			if tc.ctx != nil {
				ctx = tc.ctx()
			}
			_, err := Write(ctx, io.Discard, u, opts)
			if !errors.Is(err, tc.is) {
				t.Fatalf("error %v, want %v", err, tc.is)
			}
			if !strings.Contains(fmt.Sprint(err), tc.path) {
				t.Fatalf("error %q does not name %s", err, tc.path)
			}
		})
	}
}

// TestIncremental covers the diff rules one by one, on trees made by
// hand: Previous is built, copied as the upper, and changed.
func TestIncremental(t *testing.T) {
	testutil.RequireRoot(t)
	coarse := time.Date(2019, 1, 2, 3, 4, 5, 0, time.UTC)
	fine := time.Date(2019, 1, 2, 3, 4, 5, 6, time.UTC)
	for _, tc := range []struct {
		name   string
		prev   func(t *testing.T, p func(string) string)
		change func(t *testing.T, p func(string) string)
		want   []string
	}{{
		name:   "nothing changed",
		prev:   func(t *testing.T, p func(string) string) { writeFile(t, p("f"), []byte("f"), 0o644) },
		change: func(t *testing.T, p func(string) string) {},
		want:   nil,
	}, {
		name: "same stat, coarse mtime: content compared",
		prev: func(t *testing.T, p func(string) string) {
			writeFile(t, p("coarse"), []byte("aaaa"), 0o644)
			setMtime(t, p("coarse"), coarse)
			writeFile(t, p("coarse-same"), []byte("aaaa"), 0o644)
			setMtime(t, p("coarse-same"), coarse)
		},
		change: func(t *testing.T, p func(string) string) {
			writeFile(t, p("coarse"), []byte("bbbb"), 0o644)
			setMtime(t, p("coarse"), coarse)
			writeFile(t, p("coarse-same"), []byte("aaaa"), 0o644)
			setMtime(t, p("coarse-same"), coarse)
		},
		want: []string{"coarse"},
	}, {
		name: "metadata",
		prev: func(t *testing.T, p func(string) string) {
			for _, n := range []string{"mode", "owner", "xattr", "xattr-gone", "mtime"} {
				writeFile(t, p(n), []byte(n), 0o644)
				setMtime(t, p(n), fine)
			}
			setxattr(t, p("xattr-gone"), "user.a", "1")
		},
		change: func(t *testing.T, p func(string) string) {
			must(t, os.Chmod(p("mode"), 0o600))
			must(t, os.Lchown(p("owner"), 1, 1))
			setxattr(t, p("xattr"), "user.a", "1")
			must(t, unix.Lremovexattr(p("xattr-gone"), "user.a"))
			setMtime(t, p("mtime"), coarse)
		},
		want: []string{"mode", "mtime", "owner", "xattr", "xattr-gone"},
	}, {
		name: "private xattrs are not compared",
		prev: func(t *testing.T, p func(string) string) {
			writeFile(t, p("f"), []byte("f"), 0o644)
			setMtime(t, p("f"), fine)
		},
		change: func(t *testing.T, p func(string) string) {
			setxattr(t, p("f"), "trusted.overlay.origin", "x")
			setxattr(t, p("f"), "security.selinux", "system_u:object_r:container_file_t:s0")
		},
		want: nil,
	}, {
		name: "whiteouts and removals",
		prev: func(t *testing.T, p func(string) string) {
			must(t, unix.Mknod(p("both"), unix.S_IFCHR, 0))
			writeFile(t, p("removed"), []byte("r"), 0o644)
			must(t, os.MkdirAll(p("removed-dir/sub"), 0o755))
			writeFile(t, p("whited-out"), []byte("w"), 0o644)
			must(t, unix.Mknod(p("sock"), unix.S_IFSOCK, 0))
			must(t, unix.Mknod(p("sock-gone"), unix.S_IFSOCK, 0))
			must(t, unix.Mknod(p("wh-then-sock"), unix.S_IFCHR, 0))
		},
		change: func(t *testing.T, p func(string) string) {
			must(t, os.Remove(p("removed")))
			must(t, os.RemoveAll(p("removed-dir")))
			must(t, os.Remove(p("whited-out")))
			must(t, unix.Mknod(p("whited-out"), unix.S_IFCHR, 0))
			must(t, unix.Mknod(p("new-whiteout"), unix.S_IFCHR, 0))
			writeFile(t, p("new-xwhiteout"), nil, 0)
			setxattr(t, p("new-xwhiteout"), "trusted.overlay.whiteout", "")
			must(t, os.Remove(p("sock-gone")))
			must(t, os.Remove(p("wh-then-sock")))
			must(t, unix.Mknod(p("wh-then-sock"), unix.S_IFSOCK, 0))
		},
		want: []string{".wh.new-whiteout", ".wh.new-xwhiteout", ".wh.removed", ".wh.removed-dir", ".wh.whited-out"},
	}, {
		name: "directories",
		prev: func(t *testing.T, p func(string) string) {
			for _, d := range []string{"meta", "opaque", "same/sub", "touched", "to-file", "stays-opaque"} {
				must(t, os.MkdirAll(p(d), 0o755))
			}
			writeFile(t, p("opaque/old"), []byte("o"), 0o644)
			writeFile(t, p("opaque/kept"), []byte("k"), 0o644)
			writeFile(t, p("same/sub/f"), []byte("f"), 0o644)
			writeFile(t, p("touched/f"), []byte("f"), 0o644)
			writeFile(t, p("to-dir"), []byte("file"), 0o644)
			setxattr(t, p("stays-opaque"), "trusted.overlay.opaque", "y")
			writeFile(t, p("stays-opaque/f"), []byte("f"), 0o644)
			writeFile(t, p("stays-opaque/g"), []byte("g"), 0o644)
			for _, d := range []string{"meta", "opaque", "same/sub", "same", "touched", "stays-opaque"} {
				setMtime(t, p(d), fine)
			}
		},
		change: func(t *testing.T, p func(string) string) {
			must(t, os.Chmod(p("meta"), 0o700))
			setxattr(t, p("opaque"), "trusted.overlay.opaque", "y")
			must(t, os.Remove(p("opaque/old")))
			writeFile(t, p("touched/f"), []byte("g"), 0o644) // in place: the directory's mtime stays
			must(t, os.Remove(p("to-dir")))
			must(t, os.Mkdir(p("to-dir"), 0o755))
			writeFile(t, p("to-dir/f"), nil, 0o644)
			must(t, os.Remove(p("to-file")))
			writeFile(t, p("to-file"), nil, 0o644)
			must(t, os.Remove(p("stays-opaque/g")))
			for _, d := range []string{"meta", "opaque", "touched", "stays-opaque"} {
				setMtime(t, p(d), fine)
			}
		},
		want: []string{"meta/", "opaque/", "opaque/.wh..wh..opq", "opaque/kept", "stays-opaque/", "stays-opaque/.wh.g", "to-dir/", "to-dir/f", "to-file", "touched/", "touched/f"},
	}, {
		name: "hard links",
		prev: func(t *testing.T, p func(string) string) {
			must(t, os.Mkdir(p("d"), 0o755))
			writeFile(t, p("a"), []byte("a"), 0o644)
			writeFile(t, p("b"), []byte("b"), 0o644)
			must(t, os.Link(p("b"), p("d/b2")))
			must(t, os.Link(p("b"), p("d/b3")))
			writeFile(t, p("c"), []byte("c"), 0o644)
			must(t, os.Link(p("c"), p("d/c2")))
			writeFile(t, p("e"), []byte("e"), 0o644)
			must(t, os.Link(p("e"), p("d/e2")))
			setMtime(t, p("d"), fine)
		},
		change: func(t *testing.T, p func(string) string) {
			must(t, os.Link(p("a"), p("d/a2"))) // a gets a name: both written
			must(t, os.Rename(p("d/b3"), p("d/b4")))
			must(t, os.Rename(p("d/b2"), p("d/b3"))) // same count, other names: all written
			must(t, os.Remove(p("d/c2")))            // c leaves its group: written alone
			setMtime(t, p("d"), fine)
		},
		want: []string{"a", "b", "c", "d/", "d/a2", "d/.wh.b2", "d/b3", "d/b4", "d/.wh.c2"},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			prev, u := filepath.Join(dir, "prev"), filepath.Join(dir, "upper")
			must(t, os.Mkdir(prev, 0o755))
			tc.prev(t, func(rel string) string { return filepath.Join(prev, rel) })
			copyTree(t, prev, u)
			tc.change(t, func(rel string) string { return filepath.Join(u, rel) })

			layer, _ := write(t, u, Options{Previous: prev})
			entries := readTar(t, layer)
			if got := names(entries); !slices.Equal(got, tc.want) {
				t.Fatalf("entries %q, want %q", got, tc.want)
			}
			// Applied on Previous, the layer gives the upper (whiteouts
			// are no-ops on a directory that never had the lower's).
			applied := filepath.Join(dir, "applied")
			base, _ := write(t, prev, Options{})
			must(t, os.Mkdir(applied, 0o755))
			apply(t, applied, base)
			apply(t, applied, layer)
			want := filepath.Join(dir, "want")
			must(t, os.Mkdir(want, 0o755))
			apply(t, want, must2(write(t, u, Options{})))
			compareTrees(t, snapshot(t, want), snapshot(t, applied))
		})
	}
}
