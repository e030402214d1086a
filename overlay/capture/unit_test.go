//go:build linux

package capture

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/containerd/errdefs"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/sched"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
	"golang.org/x/sys/unix"
)

func TestEntryIsCompact(t *testing.T) {
	if got := unsafe.Sizeof(entry{}); got != 64 {
		t.Errorf("an entry takes %d bytes, want 64 (plus its name)", got)
	}
}

// TestIsDirty checks the change rule on crafted stat data, including the
// racy-timestamp rule at its boundary.
func TestIsDirty(t *testing.T) {
	const sec = int64(time.Second)
	roundStart := 1_700_000_000*sec + 500_000_000 // x.5 s
	margin := 10 * int64(time.Millisecond)
	c := &Copier{margin: margin, rounds: []int64{roundStart}}
	base := unix.Stat_t{Ino: 7, Mode: unix.S_IFREG | 0o644, Nlink: 1, Size: 10}
	at := func(ns int64) unix.Timespec { return unix.NsecToTimespec(ns) }
	stat := func(ctime int64, edit func(*unix.Stat_t)) unix.Stat_t {
		st := base
		st.Ctim, st.Mtim = at(ctime), at(ctime-sec)
		if edit != nil {
			edit(&st)
		}
		return st
	}
	old := roundStart - sec/2 + 1 // clearly older than the round, sub-second part set
	for _, tc := range []struct {
		name        string
		recorded    int64 // ctime when copied
		now         unix.Stat_t
		dirty, racy bool
	}{
		{"unchanged and old", old, stat(old, nil), false, false},
		{"ctime changed", old, stat(old+1, nil), true, false},
		{"size changed", old, stat(old, func(s *unix.Stat_t) { s.Size++ }), true, false},
		{"mtime changed", old, stat(old, func(s *unix.Stat_t) { s.Mtim.Nsec++ }), true, false},
		{"mode changed", old, stat(old, func(s *unix.Stat_t) { s.Mode = unix.S_IFREG | 0o600 }), true, false},
		{"type changed", old, stat(old, func(s *unix.Stat_t) { s.Mode = unix.S_IFLNK | 0o777 }), true, false},
		{"inode changed", old, stat(old, func(s *unix.Stat_t) { s.Ino++ }), true, false},
		{"link count changed", old, stat(old, func(s *unix.Stat_t) { s.Nlink++ }), true, false},
		{"device number changed", old, stat(old, func(s *unix.Stat_t) { s.Mode = unix.S_IFCHR; s.Rdev = 1 }), true, false},
		{"racy: ctime after the round start", roundStart + 1, stat(roundStart+1, nil), true, true},
		{"racy: ctime within the margin", roundStart - margin + 1, stat(roundStart-margin+1, nil), true, true},
		{"racy: ctime exactly at start-margin", roundStart - margin, stat(roundStart-margin, nil), true, true},
		{"clean: ctime just before start-margin", roundStart - margin - 1, stat(roundStart-margin-1, nil), false, false},
		// One-second timestamps: x.0 s is within a second of the round's start.
		{"racy: whole-second ctime", roundStart - sec/2, stat(roundStart-sec/2, nil), true, true},
		{"clean: whole-second ctime long before", roundStart - 2*sec - sec/2, stat(roundStart-2*sec-sec/2, nil), false, false},
		{"invalidated entry", invalidTime, stat(old, nil), true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			now := tc.now
			if tc.name == "device number changed" {
				// recorded as a 0/0 device
				e := newEntry("x", &now, 0)
				e.size, e.ctime = 0, tc.recorded
				dirty, racy := c.isDirty(&e, &now)
				if dirty != tc.dirty || racy != tc.racy {
					t.Fatalf("isDirty = %v, %v; want %v, %v", dirty, racy, tc.dirty, tc.racy)
				}
				return
			}
			rec := stat(tc.recorded, nil)
			if tc.recorded == invalidTime {
				rec = stat(old, nil)
			}
			e := newEntry("x", &rec, 0)
			if tc.recorded == invalidTime {
				e.ctime = invalidTime
			}
			dirty, racy := c.isDirty(&e, &now)
			if dirty != tc.dirty || racy != tc.racy {
				t.Fatalf("isDirty = %v, %v; want %v, %v", dirty, racy, tc.dirty, tc.racy)
			}
		})
	}
}

func TestNewRoundWraps(t *testing.T) {
	c := &Copier{root: entry{dir: &dirNode{entries: []entry{{name: "a", round: 5, dir: &dirNode{entries: []entry{{name: "b", round: 7}}}}}}}}
	for i := 0; i < maxRounds; i++ {
		c.rounds = append(c.rounds, int64(i))
	}
	if idx := c.newRound(1 << 40); idx != 1 {
		t.Fatalf("round index after wrapping: %d", idx)
	}
	a := &c.root.dir.entries[0]
	if a.round != 0 || a.dir.entries[0].round != 0 || c.rounds[0] != 0 {
		t.Fatalf("entries not moved to the oldest round: %d %d", a.round, a.dir.entries[0].round)
	}
}

func TestBuildForce(t *testing.T) {
	f := buildForce([]string{"/var/lib/db", "var/log/x", "../../etc/passwd", "/", "a//b/./c/../d"})
	has := func(p string) bool {
		n := f
		for _, comp := range strings.Split(p, "/") {
			n = n.child(comp)
		}
		return n != nil && n.self
	}
	for _, p := range []string{"var/lib/db", "var/log/x", "etc/passwd", "a/b/d"} {
		if !has(p) {
			t.Errorf("%s not forced", p)
		}
	}
	for _, p := range []string{"var", "var/lib", "a/b/c", "a/b"} {
		if has(p) {
			t.Errorf("%s forced", p)
		}
	}
	if buildForce(nil).child("x") != nil {
		t.Error("nil trie has children")
	}
}

func TestNewCopierChecks(t *testing.T) {
	base := t.TempDir()
	src := filepath.Join(base, "src")
	must(t, os.Mkdir(src, 0o755))
	writeFile(t, filepath.Join(base, "file"), nil, 0o644)
	must(t, os.Mkdir(filepath.Join(base, "full"), 0o755))
	writeFile(t, filepath.Join(base, "full", "x"), nil, 0o644)
	must(t, os.Symlink("src", filepath.Join(base, "srclink")))

	for _, tc := range []struct {
		name     string
		src, dst string
		opts     Options
	}{
		{"dst inside src", src, filepath.Join(src, "dst"), Options{}},
		{"src inside dst", src, base, Options{}},
		{"same", src, src, Options{}},
		{"dst not empty", src, filepath.Join(base, "full"), Options{}},
		{"dst a file", src, filepath.Join(base, "file"), Options{}},
		{"src missing", filepath.Join(base, "nope"), filepath.Join(base, "d1"), Options{}},
		{"src a file", filepath.Join(base, "file"), filepath.Join(base, "d2"), Options{}},
		{"src a symlink", filepath.Join(base, "srclink"), filepath.Join(base, "d3"), Options{}},
		{"negative margin", src, filepath.Join(base, "d4"), Options{RacyMargin: -1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := NewCopier(tc.src, tc.dst, tc.opts); err == nil {
				t.Fatal("no error")
			}
		})
	}
	// An existing empty directory is accepted and made private.
	empty := filepath.Join(base, "empty")
	must(t, os.Mkdir(empty, 0o755))
	if _, err := NewCopier(src, empty, Options{}); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(empty); fi.Mode().Perm() != 0o700 {
		t.Errorf("dst mode %v, want 0700", fi.Mode())
	}
	if m := DefaultRacyMargin(); m < 10*time.Millisecond || m > time.Second {
		t.Errorf("DefaultRacyMargin() = %v", m)
	}
}

// recorder stands in for a testing.TB to see whether compareTrees fails.
type recorder struct {
	testing.TB
	failures []string
}

func (r *recorder) Helper() {}
func (r *recorder) Errorf(format string, a ...any) {
	r.failures = append(r.failures, fmt.Sprintf(format, a...))
}
func (r *recorder) Fatalf(format string, a ...any) {
	r.failures = append(r.failures, fmt.Sprintf(format, a...))
}
func (r *recorder) Fatal(a ...any) { r.failures = append(r.failures, fmt.Sprint(a...)) }

// TestComparerDetects makes sure the comparer the other tests rely on
// notices each kind of difference.
func TestComparerDetects(t *testing.T) {
	testutil.RequireRoot(t)
	base := t.TempDir()
	src := filepath.Join(base, "src")
	build := func() {
		must(t, os.MkdirAll(filepath.Join(src, "d"), 0o755))
		writeFile(t, filepath.Join(src, "f"), []byte("content"), 0o644)
		must(t, os.Link(filepath.Join(src, "f"), filepath.Join(src, "d", "f2")))
		writeFile(t, filepath.Join(src, "g"), []byte("other"), 0o644)
		must(t, unix.Setxattr(filepath.Join(src, "g"), "user.k", []byte("v"), 0))
		must(t, os.Symlink("f", filepath.Join(src, "l")))
		must(t, unix.Mknod(filepath.Join(src, "c"), unix.S_IFCHR, 0))
		old := time.Unix(1e9, 5)
		setTime(t, filepath.Join(src, "d"), old, old)
	}
	build()
	for _, tc := range []struct {
		name   string
		mutate func(dst string)
	}{
		{"content", func(d string) { writeFile(t, filepath.Join(d, "g"), []byte("OTHER"), 0o644) }},
		{"mode", func(d string) { must(t, os.Chmod(filepath.Join(d, "g"), 0o600)) }},
		{"owner", func(d string) { must(t, os.Lchown(filepath.Join(d, "l"), 1, 1)) }},
		{"mtime", func(d string) { setTime(t, filepath.Join(d, "d"), time.Unix(1e9, 5), time.Unix(1e9, 6)) }},
		{"xattr value", func(d string) { must(t, unix.Setxattr(filepath.Join(d, "g"), "user.k", []byte("w"), 0)) }},
		{"xattr missing", func(d string) { must(t, unix.Removexattr(filepath.Join(d, "g"), "user.k")) }},
		{"link target", func(d string) {
			must(t, os.Remove(filepath.Join(d, "l")))
			must(t, os.Symlink("g", filepath.Join(d, "l")))
		}},
		{"device", func(d string) {
			must(t, os.Remove(filepath.Join(d, "c")))
			must(t, unix.Mknod(filepath.Join(d, "c"), unix.S_IFCHR, int(unix.Mkdev(1, 3))))
		}},
		{"hard link broken", func(d string) {
			data, _ := os.ReadFile(filepath.Join(d, "f"))
			must(t, os.Remove(filepath.Join(d, "d", "f2")))
			writeFile(t, filepath.Join(d, "d", "f2"), data, 0o644)
		}},
		{"extra entry", func(d string) { writeFile(t, filepath.Join(d, "d", "extra"), nil, 0o644) }},
		{"missing entry", func(d string) { must(t, os.Remove(filepath.Join(d, "c"))) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := filepath.Join(base, "dst-"+strings.ReplaceAll(tc.name, " ", "-"))
			c, err := NewCopier(src, dst, Options{})
			must(t, err)
			_, err = c.Final(context.Background(), nil)
			must(t, err)
			compareTrees(t, src, dst) // identical first
			tc.mutate(dst)
			rec := &recorder{TB: t}
			compareTrees(rec, src, dst)
			if len(rec.failures) == 0 {
				t.Fatal("the comparer did not notice")
			}
		})
	}
}

func TestDeadline(t *testing.T) {
	testutil.RequireRoot(t)
	base := t.TempDir()
	src, dst := filepath.Join(base, "src"), filepath.Join(base, "dst")
	must(t, os.Mkdir(src, 0o755))
	for i := 0; i < 32; i++ {
		writeFile(t, filepath.Join(src, fmt.Sprintf("f%02d", i)), randBytes(4<<20), 0o644)
	}
	c, err := NewCopier(src, dst, Options{})
	must(t, err)

	// Already expired: no work at all.
	ctx, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	start := time.Now()
	st, err := c.Final(ctx, nil)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Final with an expired deadline: %v", err)
	}
	if d := time.Since(start); d > 20*time.Millisecond || st.Entries != 0 {
		t.Errorf("Final with an expired deadline took %v and examined %d entries", d, st.Entries)
	}

	// Expiring in the middle of copying 128 MB: prompt return, and the
	// Copier stays consistent, so the next round completes the copy.
	const budget = 5 * time.Millisecond
	ctx, cancel = context.WithTimeout(context.Background(), budget)
	defer cancel()
	start = time.Now()
	st, err = c.Final(ctx, nil)
	elapsed := time.Since(start)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Final with a %v budget: %v (%+v)", budget, err, st)
	}
	t.Logf("aborted after %v: %v", elapsed, err)
	if elapsed > budget+50*time.Millisecond {
		t.Errorf("Final returned %v after a %v deadline", elapsed-budget, budget)
	}
	if st.CopiedFiles >= 32 {
		t.Errorf("Final copied everything (%+v) despite its deadline", st)
	}
	_, err = c.Final(context.Background(), nil)
	must(t, err)
	compareTrees(t, src, dst)
}

// threadNice is the nice value of the calling thread.
func threadNice(t testing.TB) int {
	data, err := os.ReadFile("/proc/thread-self/stat")
	must(t, err)
	// Fields after the command name, which is in parentheses: nice is
	// the 19th field of the line, the 17th after ")".
	fields := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+1:]))
	n, err := strconv.Atoi(fields[16])
	must(t, err)
	return n
}

// TestPreCopyNice: pre-copy rounds run on threads at the nice value asked
// for, Final at the caller's, and the caller's thread keeps its own.
// threadCPUCgroup is the calling thread's cgroup in the v1 cpu hierarchy
// ("" on cgroup v2).
func threadCPUCgroup(t *testing.T) string {
	data, err := os.ReadFile("/proc/thread-self/cgroup")
	must(t, err)
	for _, line := range strings.Split(string(data), "\n") {
		if parts := strings.SplitN(line, ":", 3); len(parts) == 3 && slices.Contains(strings.Split(parts[1], ","), "cpu") {
			return parts[2]
		}
	}
	return ""
}

func TestPreCopyNice(t *testing.T) {
	testutil.RequireRoot(t)
	base := t.TempDir()
	src, dst := filepath.Join(base, "src"), filepath.Join(base, "dst")
	for d := range 8 {
		must(t, os.MkdirAll(filepath.Join(src, fmt.Sprintf("d%d", d)), 0o755))
		writeFile(t, filepath.Join(src, fmt.Sprintf("d%d", d), "f"), []byte("x"), 0o644)
	}
	// On cgroup v1 the pre-copy threads also join a background cgroup.
	cgroup, err := sched.BackgroundCgroup("seamless-capture-test")
	if err != nil && !errdefs.IsNotImplemented(err) {
		t.Fatal(err)
	}
	if cgroup != "" {
		t.Cleanup(func() {
			// The round's threads end with their goroutines, a moment
			// after the round.
			for i := 0; os.Remove(cgroup) != nil && i < 100; i++ {
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
	c := newCopier(t, src, dst, Options{PreCopyNice: 13, PreCopyCgroup: cgroup, Workers: 4})
	var mu sync.Mutex
	seen := map[int]int{}
	cgroups := map[string]int{}
	c.raceHook = func(int, string) {
		n, cg := threadNice(t), threadCPUCgroup(t)
		mu.Lock()
		seen[n]++
		cgroups[cg]++
		mu.Unlock()
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	own, ownCgroup := threadNice(t), threadCPUCgroup(t)

	_, err = c.PreCopy(context.Background())
	must(t, err)
	if len(seen) != 1 || seen[13] == 0 {
		t.Errorf("PreCopy ran at nice values %v, want only 13", seen)
	}
	if want := "/seamless-capture-test"; cgroup != "" && (len(cgroups) != 1 || cgroups[want] == 0) {
		t.Errorf("PreCopy ran in cpu cgroups %v, want only %s", cgroups, want)
	}
	clear(seen)
	clear(cgroups)
	writeFile(t, filepath.Join(src, "d3", "f"), []byte("changed"), 0o644)
	_, err = c.Final(context.Background(), nil)
	must(t, err)
	if len(seen) != 1 || seen[own] == 0 {
		t.Errorf("Final ran at nice values %v, want only the caller's, %d", seen, own)
	}
	if len(cgroups) != 1 || cgroups[ownCgroup] == 0 {
		t.Errorf("Final ran in cpu cgroups %v, want only the caller's, %s", cgroups, ownCgroup)
	}
	if n := threadNice(t); n != own {
		t.Errorf("the caller's thread is at nice %d after the rounds, was %d", n, own)
	}
	if _, err := NewCopier(src, filepath.Join(base, "dst2"), Options{PreCopyNice: 20}); err == nil {
		t.Error("NewCopier accepted PreCopyNice 20")
	}
}
