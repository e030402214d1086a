//go:build linux

package capture

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
	"golang.org/x/sys/unix"
)

// TestSeed: a copy seeded from the previous one links what did not
// change, copies what did, is exact, and leaves the previous copy as it
// was, whatever changed since.
func TestSeed(t *testing.T) {
	testutil.RequireRoot(t)
	for _, track := range []bool{false, true} {
		t.Run(map[bool]string{false: "untracked", true: "tracked"}[track], func(t *testing.T) { testSeed(t, track) })
	}
}

func testSeed(t *testing.T, track bool) {
	base := t.TempDir()
	src, first, prev, next := filepath.Join(base, "src"), filepath.Join(base, "first"), filepath.Join(base, "captures", "1"), filepath.Join(base, "next")
	p := func(rel string) string { return filepath.Join(src, rel) }
	trackedTree(t, src, 5, 20)
	for _, rel := range []string{"rewrite", "chmod", "chown", "xattr", "delete", "mapped", "untouched", "appended"} {
		writeFile(t, p(rel), []byte("original "+rel), 0o644)
	}
	must(t, os.Symlink("/etc/passwd", p("symlink")))
	must(t, unix.Mkfifo(p("fifo"), 0o600))
	must(t, unix.Mknod(p("whiteout"), unix.S_IFCHR, 0))
	must(t, os.Link(p("whiteout"), p("d01/whiteout2"))) // overlay shares whiteouts
	must(t, os.Mkdir(p("opaque"), 0o750))
	must(t, unix.Setxattr(p("opaque"), "trusted.overlay.opaque", []byte("y"), 0))
	must(t, unix.Setxattr(p("xattr"), "user.before", []byte("1"), 0))

	// Older than the racy margin: nothing is copied again for being
	// too recent, tracked or not.
	time.Sleep(2 * DefaultRacyMargin())
	a := newCopier(t, src, first, Options{TrackChanges: track})
	_, err := a.PreCopy(context.Background())
	must(t, err)
	_, err = a.Final(context.Background(), nil)
	must(t, err)
	compareTrees(t, src, first)
	// The snapshotter moves a capture out of its temporary directory.
	must(t, os.MkdirAll(filepath.Dir(prev), 0o700))
	must(t, os.Rename(first, prev))
	// A copy of it to compare with later, made without changing an atime.
	keep := filepath.Join(base, "prev-as-it-was")
	kc := newCopier(t, prev, keep, Options{})
	_, err = kc.Final(context.Background(), nil)
	must(t, err)

	// What the container does after the first commit.
	writeFile(t, p("rewrite"), []byte("rewritten, longer than before"), 0o644)
	must(t, os.Chmod(p("chmod"), 0o600))
	must(t, os.Lchown(p("chown"), 1234, 5678))
	must(t, unix.Setxattr(p("xattr"), "user.after", []byte("2"), 0))
	must(t, os.Remove(p("delete")))
	writeFile(t, p("new"), []byte("new"), 0o644)
	must(t, os.Rename(p("d02"), p("d02-renamed")))
	must(t, unix.Mknod(p("d03/whiteout3"), unix.S_IFCHR, 0))
	f, err := os.OpenFile(p("appended"), os.O_APPEND|os.O_WRONLY, 0)
	must(t, err)
	_, err = f.Write([]byte(" and more"))
	must(t, err)
	must(t, f.Close())

	watching := a.Watching()
	b, err := a.Seed(prev, next, Options{TrackChanges: track})
	must(t, err)
	t.Cleanup(func() { b.Close() })
	if n := b.Seeded(); n < 100 {
		t.Errorf("Seeded() = %d, want every file of the previous copy linked", n)
	}
	// The new copy takes the watches over: they saw the changes above.
	if track && (watching == 0 || b.Watching() != watching || a.Watching() != 0) {
		t.Errorf("watches: %d before Seed, then %d (new copy), %d (previous); want all moved to the new copy", watching, b.Watching(), a.Watching())
	}
	pre, err := b.PreCopy(context.Background())
	must(t, err)
	t.Logf("PreCopy: %+v", pre)
	if pre.CopiedFiles != 26 { // 20 under the renamed directory, 6 changed or new
		t.Errorf("the first round after seeding copied %d files, want the 26 new or changed", pre.CopiedFiles)
	}
	if track && (!pre.Tracked || pre.Entries > 60) {
		t.Errorf("the first round after seeding examined %d entries (tracked %v), want only what changed since the previous copy", pre.Entries, pre.Tracked)
	}
	// Changes between the rounds, one through a shared mapping.
	writeFile(t, p("d00/f00"), []byte("changed between the rounds"), 0o644)
	m, err := os.OpenFile(p("mapped"), os.O_RDWR, 0)
	must(t, err)
	defer m.Close()
	mem, err := unix.Mmap(int(m.Fd()), 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	must(t, err)
	defer unix.Munmap(mem)
	copy(mem, "ORIGINAL")
	fin, err := b.Final(context.Background(), []string{"mapped"})
	must(t, err)
	t.Logf("Final: %+v", fin)
	compareTrees(t, src, next)
	compareTrees(t, keep, prev) // the previous copy is untouched

	// Unchanged files are shared with the previous copy.
	var ps, ns unix.Stat_t
	must(t, unix.Lstat(filepath.Join(prev, "untouched"), &ps))
	must(t, unix.Lstat(filepath.Join(next, "untouched"), &ns))
	if ps.Ino != ns.Ino {
		t.Error("an unchanged file was copied, not linked")
	}
	must(t, unix.Lstat(filepath.Join(prev, "rewrite"), &ps))
	must(t, unix.Lstat(filepath.Join(next, "rewrite"), &ns))
	if ps.Ino == ns.Ino {
		t.Error("a changed file still shares its inode with the previous copy")
	}
}

// TestSeedMissingEntries: entries missing from the previous copy (being
// released) are copied again by the first round, which then examines
// every entry even though the watches say nothing changed.
func TestSeedMissingEntries(t *testing.T) {
	testutil.RequireRoot(t)
	for _, track := range []bool{false, true} {
		t.Run(map[bool]string{false: "untracked", true: "tracked"}[track], func(t *testing.T) {
			base := t.TempDir()
			src, prev, next := filepath.Join(base, "src"), filepath.Join(base, "a"), filepath.Join(base, "b")
			trackedTree(t, src, 3, 5)
			a := newCopier(t, src, prev, Options{TrackChanges: track})
			_, err := a.Final(context.Background(), nil)
			must(t, err)
			must(t, os.RemoveAll(filepath.Join(prev, "d01")))
			must(t, os.Remove(filepath.Join(prev, "d02", "f03")))
			b, err := a.Seed(prev, next, Options{TrackChanges: track})
			must(t, err)
			t.Cleanup(func() { b.Close() })
			stats, err := b.Final(context.Background(), nil)
			must(t, err)
			if stats.Tracked {
				t.Error("the first round after a seed that missed entries visited only changes")
			}
			compareTrees(t, src, next)
		})
	}
}

// TestSeedRefused: no seed from a Copier whose source holds hard links, or
// whose last round failed; a previous copy missing files still seeds an
// exact copy.
func TestSeedRefused(t *testing.T) {
	testutil.RequireRoot(t)
	base := t.TempDir()
	src := filepath.Join(base, "src")
	trackedTree(t, src, 3, 5)
	a := newCopier(t, src, filepath.Join(base, "a"), Options{})
	_, err := a.Final(context.Background(), nil)
	must(t, err)

	// Part of the previous copy is gone (being released): what is
	// missing is copied again.
	must(t, os.RemoveAll(filepath.Join(base, "a", "d01")))
	must(t, os.Remove(filepath.Join(base, "a", "d02", "f03")))
	b, err := a.Seed(filepath.Join(base, "a"), filepath.Join(base, "b"), Options{})
	must(t, err)
	t.Cleanup(func() { b.Close() })
	_, err = b.Final(context.Background(), nil)
	must(t, err)
	compareTrees(t, src, filepath.Join(base, "b"))

	must(t, os.Link(filepath.Join(src, "d00", "f00"), filepath.Join(src, "link")))
	h := newCopier(t, src, filepath.Join(base, "h"), Options{})
	_, err = h.Final(context.Background(), nil)
	must(t, err)
	if _, err := h.Seed(filepath.Join(base, "h"), filepath.Join(base, "c"), Options{}); !errors.Is(err, ErrCannotSeed) {
		t.Errorf("Seed from a source with hard links: %v, want ErrCannotSeed", err)
	}
	if _, err := os.Stat(filepath.Join(base, "c")); !os.IsNotExist(err) {
		t.Errorf("a refused Seed left its destination: %v", err)
	}
	must(t, os.Remove(filepath.Join(src, "link")))
	ctx, cancel := context.WithCancel(context.Background())
	b.raceHook = func(int, string) { cancel() } // the pause budget runs out mid-round
	if _, err := b.Final(ctx, nil); err == nil {
		t.Fatal("Final cut short succeeded")
	}
	if _, err := b.Seed(filepath.Join(base, "b"), filepath.Join(base, "c"), Options{}); !errors.Is(err, ErrCannotSeed) {
		t.Errorf("Seed after a failed round: %v, want ErrCannotSeed", err)
	}
}
