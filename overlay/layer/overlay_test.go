//go:build linux

package layer

import (
	"archive/tar"
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
	"golang.org/x/sys/unix"
)

// These tests make real uppers: they mount overlayfs, change the merged
// view the way a container does, unmount, write the upper as a layer,
// apply it with containerd's applier onto a copy of the lower, and check
// that the result is what the merged view showed.

var (
	tA = time.Date(2021, 3, 4, 5, 6, 7, 123456789, time.UTC)
	tB = time.Date(2022, 6, 7, 8, 9, 10, 987654321, time.UTC)
	tC = time.Date(2019, 1, 2, 3, 4, 5, 0, time.UTC) // whole seconds
)

// makeLower builds the image's layers, as one directory.
func makeLower(t *testing.T, lower string) {
	p := func(rel string) string { return filepath.Join(lower, rel) }
	for _, d := range []string{"etc", "rmrf/sub", "gone/deep", "bin", "var/lib", "typechange-dir"} {
		must(t, os.MkdirAll(p(d), 0o755))
	}
	writeFile(t, p("etc/keep"), []byte("untouched"), 0o644)
	writeFile(t, p("etc/overwrite"), []byte("old content"), 0o644)
	writeFile(t, p("etc/delete-me"), []byte("bye"), 0o644)
	writeFile(t, p("etc/chmod-me"), []byte("mode"), 0o644)
	writeFile(t, p("etc/xattr-me"), []byte("x"), 0o644)
	writeFile(t, p("etc/touch-me"), []byte("times"), 0o644)
	writeFile(t, p("etc/rename-src"), []byte("moving"), 0o644)
	writeFile(t, p("etc/link-src"), []byte("linked after copy-up"), 0o644)
	writeFile(t, p("rmrf/a"), []byte("a"), 0o644)
	writeFile(t, p("rmrf/sub/b"), []byte("b"), 0o644)
	writeFile(t, p("gone/deep/c"), []byte("c"), 0o644)
	writeFile(t, p("bin/tool"), []byte("#!/bin/sh\n"), 0o755)
	writeFile(t, p("typechange-file"), []byte("becomes a dir"), 0o644)
	writeFile(t, p("typechange-dir/inner"), []byte("dir becomes a file"), 0o644)
	writeFile(t, p("var/lib/later"), []byte("deleted in B"), 0o644)
	writeFile(t, p("var/lib/whiteout-then-back"), []byte("deleted in A, back in B"), 0o644)
	for _, f := range []string{"etc/keep", "etc/overwrite", "etc/chmod-me", "etc/xattr-me", "etc/touch-me", "bin/tool"} {
		setMtime(t, p(f), tC)
	}
}

// changesA is what a container does first.
func changesA(t *testing.T, m string) {
	p := func(rel string) string { return filepath.Join(m, rel) }
	// New files and directories, with exact metadata.
	must(t, os.MkdirAll(p("new/nested/deeper"), 0o755))
	writeFile(t, p("new/file.txt"), []byte("hello layer"), 0o640)
	must(t, os.Lchown(p("new/file.txt"), 1000, 1001))
	setMtime(t, p("new/file.txt"), tA)
	writeFile(t, p("new/nested/deeper/leaf"), bytes.Repeat([]byte("leaf"), 3000), 0o600)
	setxattr(t, p("new"), "user.dir", "on a directory")

	// Overwrite, delete, rm -rf and recreate, rm -rf for good.
	writeFile(t, p("etc/overwrite"), []byte("new content, longer than before"), 0o644)
	must(t, os.Remove(p("etc/delete-me")))
	must(t, os.RemoveAll(p("rmrf")))
	must(t, os.Mkdir(p("rmrf"), 0o711))
	writeFile(t, p("rmrf/fresh"), []byte("only this is left"), 0o644)
	must(t, os.RemoveAll(p("gone")))

	// Metadata only: copy-up without content change.
	must(t, os.Chmod(p("etc/chmod-me"), 0o600))
	must(t, os.Lchown(p("etc/chmod-me"), 1234, 5678))
	setxattr(t, p("etc/xattr-me"), "user.foo", "bar")
	setMtime(t, p("etc/touch-me"), tB)
	must(t, os.Rename(p("etc/rename-src"), p("etc/rename-dst")))

	// Hard links: between new files, and to a lower file (copied up).
	must(t, os.Mkdir(p("hl"), 0o755))
	writeFile(t, p("hl/a"), []byte("three names"), 0o644)
	must(t, os.Link(p("hl/a"), p("hl/b")))
	must(t, os.Link(p("hl/a"), p("new/c")))
	must(t, os.Link(p("etc/link-src"), p("hl/from-lower")))

	// Symlinks, never followed.
	must(t, os.Symlink("/etc/passwd", p("etc/passwd-link")))
	must(t, os.Symlink("../new", p("etc/dir-link")))

	// Special files.
	must(t, unix.Mkfifo(p("fifo"), 0o620))
	must(t, os.Mkdir(p("dev"), 0o755))
	must(t, unix.Mknod(p("dev/null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(t, unix.Mknod(p("dev/loop9"), unix.S_IFBLK|0o660, int(unix.Mkdev(7, 9))))
	must(t, unix.Mknod(p("app.sock"), unix.S_IFSOCK|0o755, 0))

	// Modes: setuid, sticky, 000; a capability; a 255-byte name.
	writeFile(t, p("bin/suid"), []byte("suid"), 0o4755)
	must(t, os.Mkdir(p("tmp"), 0o755))
	must(t, unix.Chmod(p("tmp"), 0o1777))
	writeFile(t, p("secret"), []byte("mode 000, still read"), 0)
	setxattr(t, p("bin/tool"), "security.capability", capV2())
	writeFile(t, p(strings.Repeat("n", 255)), []byte("long name"), 0o644)

	// A sparse file.
	f, err := os.Create(p("sparse"))
	must(t, err)
	must(t, f.Truncate(64<<20))
	_, err = f.WriteAt(bytes.Repeat([]byte("A"), 4096), 1<<20)
	must(t, err)
	_, err = f.WriteAt(bytes.Repeat([]byte("B"), 100), 64<<20-100)
	must(t, err)
	must(t, f.Close())

	// For B.
	must(t, os.Remove(p("var/lib/whiteout-then-back")))
	writeFile(t, p("coarse"), []byte("aaaa"), 0o644)
	setMtime(t, p("coarse"), tC)
	must(t, os.MkdirAll(p("adir/sub"), 0o750))
	writeFile(t, p("adir/sub/f"), []byte("in a directory removed in B"), 0o644)
	writeFile(t, p("unchanged-in-B"), []byte("A's file, untouched in B"), 0o644)
	writeFile(t, p("link-target"), []byte("gets a second name in B"), 0o644)
	must(t, os.Mkdir(p("inplace"), 0o755))
	writeFile(t, p("inplace/f"), []byte("written in A"), 0o644)
}

// changesB is what the container does after the first commit.
func changesB(t *testing.T, m string) {
	p := func(rel string) string { return filepath.Join(m, rel) }
	// Change files written in A: content, owner, mode; remove one.
	writeFile(t, p("new/file.txt"), []byte("hello again"), 0o640)
	must(t, os.Lchown(p("new/nested/deeper/leaf"), 7, 8))
	must(t, os.Chmod(p("new/nested"), 0o700))
	must(t, os.Remove(p("secret"))) // upper-only: overlay leaves no whiteout

	// Lower files: delete one untouched so far, recreate one A deleted.
	must(t, os.Remove(p("var/lib/later")))
	writeFile(t, p("var/lib/whiteout-then-back"), []byte("back again"), 0o600)

	// rm -rf: a directory A created; one A created, then recreated (no
	// lower: not opaque); a lower one A changed, then recreated (opaque).
	must(t, os.RemoveAll(p("adir")))
	must(t, os.RemoveAll(p("new/nested")))
	must(t, os.MkdirAll(p("new/nested/other"), 0o755))
	writeFile(t, p("new/nested/other/g"), []byte("g"), 0o644)
	must(t, os.RemoveAll(p("bin")))
	must(t, os.Mkdir(p("bin"), 0o755))
	writeFile(t, p("bin/only"), []byte("all bin has now"), 0o755)

	// Type changes.
	must(t, os.Remove(p("typechange-file")))
	must(t, os.Mkdir(p("typechange-file"), 0o755))
	writeFile(t, p("typechange-file/now"), []byte("a dir now"), 0o644)
	must(t, os.RemoveAll(p("typechange-dir")))
	writeFile(t, p("typechange-dir"), []byte("a file now"), 0o644)
	must(t, os.Remove(p("fifo")))
	must(t, os.Symlink("fifo-was-here", p("fifo")))

	// Hard links: a new name for a file of A, one name of A's group removed.
	must(t, os.Link(p("link-target"), p("hl/joined")))
	must(t, os.Remove(p("hl/b")))

	// Same size, same whole-second mtime, other content.
	writeFile(t, p("coarse"), []byte("bbbb"), 0o644)
	setMtime(t, p("coarse"), tC)

	// A socket in place of a file of A.
	must(t, os.Remove(p("etc/overwrite")))
	must(t, unix.Mknod(p("etc/overwrite"), unix.S_IFSOCK|0o755, 0))

	// A file rewritten in place: its directory's mtime does not change,
	// but the applier replaces the file, which changes it.
	writeFile(t, p("inplace/f"), []byte("rewritten in place"), 0o644)
	setxattr(t, p("rmrf/fresh"), "user.added", "in B")
}

func TestOverlayFull(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	lower, upper, work, merged := filepath.Join(dir, "lower"), filepath.Join(dir, "upper"), filepath.Join(dir, "work"), filepath.Join(dir, "merged")
	must(t, os.Mkdir(lower, 0o755))
	makeLower(t, lower)

	umount := mountOverlay(t, lower, upper, work, merged)
	changesA(t, merged)
	want := snapshot(t, merged)
	umount()

	layer, st := write(t, upper, Options{})
	entries := readTar(t, layer)
	t.Logf("full layer: %d bytes, %+v", len(layer), st)

	// The overlay's whiteouts and opaque directories; the socket.
	for _, n := range []string{"etc/.wh.delete-me", ".wh.gone", "rmrf/", "rmrf/.wh..wh..opq", "etc/.wh.rename-src", ".wh.app.sock"} {
		if find(entries, n) == nil {
			t.Errorf("no %s in %q", n, names(entries))
		}
	}
	if e := find(entries, "new/c"); e == nil || e.hdr.Typeflag != tar.TypeLink || e.hdr.Linkname != "hl/a" {
		t.Errorf("new/c is not a hard link to hl/a: %+v", e)
	}
	for _, e := range entries {
		for k := range e.hdr.PAXRecords {
			if strings.Contains(k, "overlay.") {
				t.Errorf("%s carries overlay's private xattr %s", e.hdr.Name, k)
			}
		}
		if e.hdr.Name == "app.sock" {
			t.Errorf("a socket was written: %+v", e.hdr)
		}
	}
	if e := find(entries, "etc/passwd-link"); e == nil || e.hdr.Linkname != "/etc/passwd" || len(e.data) != 0 {
		t.Errorf("etc/passwd-link: %+v", e)
	}

	applied := filepath.Join(dir, "applied")
	copyTree(t, lower, applied)
	apply(t, applied, layer)
	compareTrees(t, want, snapshot(t, applied))
}

func TestOverlayIncremental(t *testing.T) {
	testutil.RequireRoot(t)
	dir := t.TempDir()
	lower, upper, work, merged := filepath.Join(dir, "lower"), filepath.Join(dir, "upper"), filepath.Join(dir, "work"), filepath.Join(dir, "merged")
	must(t, os.Mkdir(lower, 0o755))
	makeLower(t, lower)

	umount := mountOverlay(t, lower, upper, work, merged)
	changesA(t, merged)
	wantA := snapshot(t, merged)
	umount()
	upperA := filepath.Join(dir, "upperA")
	copyTree(t, upper, upperA)

	umount = mountOverlay(t, lower, upper, work, merged)
	changesB(t, merged)
	wantB := snapshot(t, merged)
	umount()
	upperB := filepath.Join(dir, "upperB")
	copyTree(t, upper, upperB)

	full, _ := write(t, upperA, Options{})
	incr, st := write(t, upperB, Options{Previous: upperA})
	entries := readTar(t, incr)
	t.Logf("incremental layer: %d bytes, %+v: %q", len(incr), st, names(entries))

	// Only changes: nothing A wrote and B left alone.
	for _, n := range []string{"unchanged-in-B", "etc/passwd-link", "sparse", "dev/", "dev/null", "tmp/", strings.Repeat("n", 255), "app.sock", ".wh.app.sock", "hl/from-lower"} {
		if e := find(entries, n); e != nil {
			t.Errorf("%s did not change but is in the incremental layer", n)
		}
	}
	for _, n := range []string{
		"coarse", ".wh.secret", ".wh.adir", "var/lib/.wh.later", "etc/.wh.overwrite",
		"new/nested/", "new/nested/.wh.deeper", "new/nested/other/g",
		"bin/", "bin/.wh..wh..opq", "bin/only",
		"inplace/", "inplace/f", "rmrf/fresh",
		"typechange-file/", "typechange-file/now", "typechange-dir", "fifo",
		"hl/", "hl/.wh.b", "hl/a", "new/c",
	} {
		if find(entries, n) == nil {
			t.Errorf("no %s in the incremental layer", n)
		}
	}
	// A's file that got a second name: both written, as a link pair.
	if e := find(entries, "link-target"); e == nil || e.hdr.Typeflag != tar.TypeLink || e.hdr.Linkname != "hl/joined" {
		t.Errorf("link-target is not a hard link to hl/joined: %+v", e)
	}
	if e := find(entries, "hl/joined"); e == nil || e.hdr.Typeflag != tar.TypeReg || string(e.data) != "gets a second name in B" {
		t.Errorf("hl/joined: %+v", e)
	}
	// Left a three-name group: the two names left are written again.
	if e := find(entries, "new/c"); e == nil || e.hdr.Typeflag != tar.TypeLink || e.hdr.Linkname != "hl/a" {
		t.Errorf("new/c is not a hard link to hl/a: %+v", e)
	}

	applied := filepath.Join(dir, "applied")
	copyTree(t, lower, applied)
	apply(t, applied, full)
	compareTrees(t, wantA, snapshot(t, applied))
	apply(t, applied, incr)
	compareTrees(t, wantB, snapshot(t, applied))

	// And B in full gives the same.
	fullB, _ := write(t, upperB, Options{})
	appliedB := filepath.Join(dir, "appliedB")
	copyTree(t, lower, appliedB)
	apply(t, appliedB, fullB)
	compareTrees(t, wantB, snapshot(t, appliedB))
}
