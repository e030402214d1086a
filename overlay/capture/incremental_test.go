//go:build linux

package capture

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
	"golang.org/x/sys/unix"
)

// TestIncremental changes a pre-copied tree in every way a container can
// and checks that Final alone brings the copy up to date.
// With change tracking, the tree holds no hard links (they make rounds
// walk everything, see TestTrackedHardLinks), and Final must visit only
// what changed.
func TestIncremental(t *testing.T) {
	testutil.RequireRoot(t)
	for _, track := range []bool{false, true} {
		for _, workers := range []int{1, 4} {
			t.Run(fmt.Sprintf("track=%v/workers=%d", track, workers), func(t *testing.T) { testIncremental(t, workers, track) })
		}
	}
}

func testIncremental(t *testing.T, workers int, track bool) {
	base := t.TempDir()
	src, dst := filepath.Join(base, "src"), filepath.Join(base, "dst")
	p := func(rel string) string { return filepath.Join(src, rel) }
	old := time.Date(2010, 1, 1, 0, 0, 0, 42, time.UTC)

	must(t, os.MkdirAll(p("deltree/a/b"), 0o755))
	for _, rel := range []string{"append", "same-size", "delete", "deltree/a/b/c", "deltree/x", "file-to-dir",
		"rename-from", "chmod", "chown", "setxattr", "rmxattr", "linkme", "pair1", "sparse-later", "untouched"} {
		writeFile(t, p(rel), []byte("original "+rel), 0o644)
	}
	must(t, unix.Setxattr(p("rmxattr"), "user.gone", []byte("soon"), 0))
	if !track {
		must(t, os.Link(p("pair1"), p("pair2")))
	}
	must(t, os.MkdirAll(p("dir-to-symlink/sub"), 0o755))
	writeFile(t, p("dir-to-symlink/sub/f"), []byte("under a dir that becomes a symlink"), 0o644)
	must(t, os.Symlink("untouched", p("symlink-to-dir")))
	must(t, os.Mkdir(p("renamedir"), 0o755))
	writeFile(t, p("renamedir/inside"), []byte("moves along"), 0o644)
	must(t, unix.Mknod(p("whiteout-to-file"), unix.S_IFCHR, 0))
	must(t, os.Mkdir(p("becomes-opaque"), 0o755))
	must(t, os.Mkdir(p("hl-dir"), 0o755))
	setTime(t, p("same-size"), old, old)
	writeFile(t, p("punched"), randBytes(256<<10), 0o644)
	writeFile(t, p("shrinks"), randBytes(256<<10), 0o644)
	for i := range 50 { // untouched below: a tracked Final does not visit them
		must(t, os.MkdirAll(p(fmt.Sprintf("quiet/%02d", i)), 0o755))
		writeFile(t, p(fmt.Sprintf("quiet/%02d/file", i)), []byte("quiet"), 0o644)
	}

	c := newCopier(t, src, dst, Options{Workers: workers, TrackChanges: track})
	_, err := c.PreCopy(context.Background())
	must(t, err)
	converge(t, c) // so that Final sees only what follows
	compareTrees(t, src, dst)

	mods := []struct {
		name string
		fn   func()
	}{
		{"append", func() {
			f, err := os.OpenFile(p("append"), os.O_APPEND|os.O_WRONLY, 0)
			must(t, err)
			_, err = f.Write([]byte(" and more"))
			must(t, err)
			must(t, f.Close())
		}},
		{"overwrite with the same size and the old mtime", func() {
			var before unix.Stat_t
			must(t, unix.Lstat(p("same-size"), &before))
			data := bytes.ToUpper([]byte("original same-size"))
			must(t, os.WriteFile(p("same-size"), data, 0o644))
			setTime(t, p("same-size"), old, old) // size and mtime as before: only ctime tells
			var after unix.Stat_t
			must(t, unix.Lstat(p("same-size"), &after))
			if after.Size != before.Size || after.Mtim != before.Mtim {
				t.Fatalf("setup: size or mtime differ")
			}
		}},
		{"delete a file", func() { must(t, os.Remove(p("delete"))) }},
		{"delete a tree", func() { must(t, os.RemoveAll(p("deltree"))) }},
		{"file becomes a directory", func() {
			must(t, os.Remove(p("file-to-dir")))
			must(t, os.Mkdir(p("file-to-dir"), 0o711))
			writeFile(t, p("file-to-dir/child"), []byte("child"), 0o644)
		}},
		{"directory becomes a symlink", func() {
			must(t, os.RemoveAll(p("dir-to-symlink")))
			must(t, os.Symlink("/", p("dir-to-symlink")))
		}},
		{"symlink becomes a directory", func() {
			must(t, os.Remove(p("symlink-to-dir")))
			must(t, os.Mkdir(p("symlink-to-dir"), 0o755))
		}},
		{"whiteout becomes a file", func() {
			must(t, os.Remove(p("whiteout-to-file")))
			writeFile(t, p("whiteout-to-file"), []byte("back"), 0o644)
		}},
		{"new whiteout", func() { must(t, unix.Mknod(p("new-whiteout"), unix.S_IFCHR, 0)) }},
		{"rename a file", func() { must(t, os.Rename(p("rename-from"), p("rename-to"))) }},
		{"rename a directory", func() { must(t, os.Rename(p("renamedir"), p("renamed"))) }},
		{"chmod", func() { must(t, unix.Chmod(p("chmod"), 0o4711)) }},
		{"chown", func() { must(t, os.Lchown(p("chown"), 4321, 8765)) }},
		{"setxattr", func() { must(t, unix.Setxattr(p("setxattr"), "user.new", []byte("value"), 0)) }},
		{"removexattr", func() { must(t, unix.Removexattr(p("rmxattr"), "user.gone")) }},
		{"opaque directory", func() { must(t, unix.Setxattr(p("becomes-opaque"), "trusted.overlay.opaque", []byte("y"), 0)) }},
		{"add hard links", func() {
			if !track {
				must(t, os.Link(p("linkme"), p("linkme2")))
				must(t, os.Link(p("linkme"), p("hl-dir/linkme3")))
			}
		}},
		{"split a hard link", func() {
			if !track {
				must(t, os.Remove(p("pair2")))
				writeFile(t, p("pair2"), []byte("original pair1"), 0o644)
			}
		}},
		{"extend into a sparse file", func() { must(t, os.Truncate(p("sparse-later"), 1<<30)) }},
		{"punch a hole into a copied file", func() {
			// Written over in place, the copy must lose the data there.
			f, err := os.OpenFile(p("punched"), os.O_RDWR, 0)
			must(t, err)
			defer f.Close()
			must(t, unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 64<<10, 128<<10))
		}},
		{"shrink a copied file", func() { must(t, os.Truncate(p("shrinks"), 1000)) }},
		{"new file in a new directory", func() {
			must(t, os.MkdirAll(p("new/dir"), 0o755))
			writeFile(t, p("new/dir/file"), []byte("new"), 0o600)
		}},
	}
	for _, m := range mods {
		m.fn()
	}
	fin, err := c.Final(context.Background(), nil)
	must(t, err)
	t.Logf("Final: %+v", fin)
	compareTrees(t, src, dst)
	var st unix.Stat_t
	if fin.Removed == 0 || (!track && fin.Linked < 2) || fin.CopiedFiles < 8 {
		t.Errorf("Final stats %+v do not reflect the changes", fin)
	}
	if fin.Tracked != track {
		t.Errorf("Final: Tracked = %v, want %v", fin.Tracked, track)
	}
	if track && fin.Entries > 60 {
		t.Errorf("tracked Final examined %d entries; the changes touch fewer than 60 of %d", fin.Entries, 3*50+40)
	}
	must(t, unix.Stat(filepath.Join(dst, "punched"), &st))
	if st.Blocks*512 > 160<<10 {
		t.Errorf("punched: %d bytes allocated, want the hole punched", st.Blocks*512)
	}
	must(t, unix.Stat(filepath.Join(dst, "sparse-later"), &st))
	if st.Blocks*512 > 64<<10 {
		t.Errorf("sparse-later: %d bytes allocated", st.Blocks*512)
	}

	// Unchanged since: a round finds nothing to do (once the racy window
	// of the changes above has passed).
	converge(t, c)
	fin, err = c.Final(context.Background(), nil)
	must(t, err)
	if fin.Dirty != 0 || fin.CopiedFiles != 0 || fin.Removed != 0 {
		t.Errorf("Final on an unchanged tree: %+v", fin)
	}
	compareTrees(t, src, dst)
}

// TestRacySameSecond proves the racy-timestamp rule with a filesystem
// whose timestamps have one-second granularity (ext4 with 128-byte
// inodes): a file rewritten within the second in which it was copied has
// exactly the same stat data, and only the rule makes Final copy it again.
func TestRacySameSecond(t *testing.T) {
	mnt := testutil.LoopFS(t, "ext4", 64<<20, "-I", "128")
	for attempt := 0; ; attempt++ {
		if attempt == 5 {
			t.Fatal("could not do the test within one second five times")
		}
		// Start right after a second boundary.
		time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second + 20*time.Millisecond)))
		second := time.Now().Unix()
		src, dst := filepath.Join(mnt, fmt.Sprint("src", attempt)), filepath.Join(mnt, fmt.Sprint("dst", attempt))
		must(t, os.Mkdir(src, 0o755))
		f := filepath.Join(src, "f")
		writeFile(t, f, []byte("first"), 0o644)
		// A margin far below a second: the rule's extra second for
		// whole-second ctimes is what must catch this.
		c, err := NewCopier(src, dst, Options{RacyMargin: time.Millisecond})
		must(t, err)
		_, err = c.PreCopy(context.Background())
		must(t, err)
		var before, after unix.Stat_t
		must(t, unix.Lstat(f, &before))
		must(t, os.WriteFile(f, []byte("again"), 0o644))
		must(t, unix.Lstat(f, &after))
		if time.Now().Unix() != second || before != after {
			t.Logf("attempt %d crossed a second boundary, retrying", attempt)
			continue
		}
		if before.Ctim.Nsec != 0 {
			t.Fatalf("ctime %v has nanoseconds: not a one-second filesystem", before.Ctim)
		}
		fin, err := c.Final(context.Background(), nil)
		must(t, err)
		got := readFile(t, filepath.Join(dst, "f"))
		if string(got) != "again" || fin.Racy == 0 {
			t.Fatalf("after Final dst has %q (stats %+v), want %q", got, fin, "again")
		}
		compareTrees(t, src, dst)
		return
	}
}

// TestAlwaysRecopy: paths given to Final are copied even when their stat
// data says clean, e.g. files written through a shared writable mapping.
func TestAlwaysRecopy(t *testing.T) {
	testutil.RequireRoot(t)
	for _, track := range []bool{false, true} {
		for _, workers := range []int{1, 4} {
			t.Run(fmt.Sprintf("track=%v/workers=%d", track, workers), func(t *testing.T) { testAlwaysRecopy(t, workers, track) })
		}
	}
}

// Stores through a shared mapping change no time stamp and raise no
// inotify event: only alwaysRecopy catches them, tracked or not.
func testAlwaysRecopy(t *testing.T, workers int, track bool) {
	base := t.TempDir()
	src, dst := filepath.Join(base, "src"), filepath.Join(base, "dst")
	must(t, os.MkdirAll(filepath.Join(src, "sub"), 0o755))
	writeFile(t, filepath.Join(src, "mapped"), make([]byte, 4096), 0o644)
	writeFile(t, filepath.Join(src, "sub", "mapped2"), []byte("two"), 0o644)
	writeFile(t, filepath.Join(src, "other"), []byte("other"), 0o644)
	if !track {
		must(t, os.Link(filepath.Join(src, "sub", "mapped2"), filepath.Join(src, "alias")))
	}

	f, err := os.OpenFile(filepath.Join(src, "mapped"), os.O_RDWR, 0)
	must(t, err)
	defer f.Close()
	mem, err := unix.Mmap(int(f.Fd()), 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	must(t, err)
	defer unix.Munmap(mem)
	copy(mem, "version 1")

	c := newCopier(t, src, dst, Options{Workers: workers, TrackChanges: track})
	_, err = c.PreCopy(context.Background())
	must(t, err)
	converge(t, c)

	fin, err := c.Final(context.Background(), nil)
	must(t, err)
	if fin.CopiedFiles != 0 || fin.Dirty != 0 {
		t.Fatalf("Final of an unchanged tree: %+v", fin)
	}
	// A store to an already dirty, writable page: no fault, so no time
	// update is guaranteed.
	copy(mem, "version 2")
	force := []string{"/mapped", "sub/mapped2", "no/such/file", "../../etc/passwd", "sub", ""}
	for i := 0; i < 2; i++ {
		fin, err = c.Final(context.Background(), force)
		must(t, err)
		if fin.CopiedFiles != 2 || fin.Tracked != track {
			t.Errorf("Final %d with alwaysRecopy copied %d files, want 2; tracked %v, want %v (%+v)", i, fin.CopiedFiles, fin.Tracked, track, fin)
		}
	}
	got := readFile(t, filepath.Join(dst, "mapped"))
	if !bytes.HasPrefix(got, []byte("version 2")) {
		t.Errorf("dst/mapped starts with %q", got[:9])
	}
	compareTrees(t, src, dst) // the forced member kept its hard link
}
