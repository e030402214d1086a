//go:build linux

package freeze

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
)

// progressWindow is how long a process is watched to decide whether it runs.
// A busy loop gets CPU time within a few milliseconds; a frozen one gets none.
const progressWindow = 100 * time.Millisecond

func TestFreezeThaw(t *testing.T) {
	for _, v := range []Version{V1, V2} {
		t.Run(v.String(), func(t *testing.T) {
			cg := newTestCgroup(t, v)
			pid := startSpinner(t, cg)
			if !runs(t, pid, progressWindow) {
				t.Fatal("the busy process does not run before the freeze")
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()

			f, err := Freeze(ctx, []Cgroup{cg})
			if err != nil {
				t.Fatal(err)
			}
			assertState(t, cg, StateFrozen)
			if runs(t, pid, progressWindow) {
				t.Fatal("the process used CPU time while its cgroup was frozen")
			}
			if got := f.WeFroze(); !slices.Equal(got, []string{cg.Path}) {
				t.Fatalf("WeFroze() = %v, want [%s]", got, cg.Path)
			}
			if got := f.AlreadyFrozen(); len(got) != 0 {
				t.Fatalf("AlreadyFrozen() = %v, want none", got)
			}

			if err := f.Thaw(ctx); err != nil {
				t.Fatal(err)
			}
			assertState(t, cg, StateThawed)
			if !runs(t, pid, progressWindow) {
				t.Fatal("the process does not run after Thaw")
			}

			// Thaw is idempotent, and a second Thaw must not undo a pause
			// that the user made after the first.
			if err := cg.requestFreeze(); err != nil {
				t.Fatal(err)
			}
			waitState(t, cg, StateFrozen)
			if err := f.Thaw(ctx); err != nil {
				t.Fatal(err)
			}
			assertState(t, cg, StateFrozen)
		})
	}
}

// waitState waits up to a second for cg to reach want.
func waitState(t testing.TB, cg Cgroup, want State) {
	t.Helper()
	deadline := time.Now().Add(time.Second)
	for {
		st, err := cg.State()
		if err != nil {
			t.Fatal(err)
		}
		if st == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("cgroup %s: state %s, want %s", cg.Path, st, want)
		}
		time.Sleep(time.Millisecond)
	}
}

// A container the user paused stays paused: Freeze waits for it but does not
// claim it, and Thaw leaves it frozen while thawing what Freeze froze.
func TestFreezeLeavesUserPausedFrozen(t *testing.T) {
	for _, v := range []Version{V1, V2} {
		t.Run(v.String(), func(t *testing.T) {
			paused := newTestCgroup(t, v)
			running := newTestCgroup(t, v)
			pausedPID := startSpinner(t, paused)
			runningPID := startSpinner(t, running)
			if err := paused.requestFreeze(); err != nil {
				t.Fatal(err)
			}
			waitState(t, paused, StateFrozen)

			var intent []string
			ctx := context.Background()
			f, err := Freeze(ctx, []Cgroup{paused, running}, WithIntent(func(_ context.Context, paths []string) error {
				intent = paths
				return nil
			}))
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(intent, []string{running.Path}) {
				t.Fatalf("intent = %v, want only the running cgroup %s", intent, running.Path)
			}
			if got := f.WeFroze(); !slices.Equal(got, []string{running.Path}) {
				t.Fatalf("WeFroze() = %v, want [%s]", got, running.Path)
			}
			if got := f.AlreadyFrozen(); !slices.Equal(got, []string{paused.Path}) {
				t.Fatalf("AlreadyFrozen() = %v, want [%s]", got, paused.Path)
			}
			if len(f.Cgroups()) != 2 {
				t.Fatalf("Cgroups() = %v, want both", f.Cgroups())
			}
			assertState(t, running, StateFrozen)

			if err := f.Thaw(ctx); err != nil {
				t.Fatal(err)
			}
			assertState(t, paused, StateFrozen)
			assertState(t, running, StateThawed)
			if runs(t, pausedPID, progressWindow) {
				t.Fatal("the paused process runs after Freeze+Thaw")
			}
			if !runs(t, runningPID, progressWindow) {
				t.Fatal("the other process does not run after Thaw")
			}
		})
	}
}

func TestFreezeExpiredContext(t *testing.T) {
	for _, v := range []Version{V1, V2} {
		t.Run(v.String(), func(t *testing.T) {
			cg := newTestCgroup(t, v)
			pid := startSpinner(t, cg)
			ctx, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
			defer cancel()

			f, err := Freeze(ctx, []Cgroup{cg})
			if err == nil {
				f.Thaw(ctx)
				t.Fatal("Freeze with an expired context succeeded")
			}
			if !errors.Is(err, context.DeadlineExceeded) || !errdefs.IsDeadlineExceeded(err) {
				t.Fatalf("error %v does not wrap context.DeadlineExceeded", err)
			}
			assertState(t, cg, StateThawed)
			if !runs(t, pid, progressWindow) {
				t.Fatal("the process does not run after a failed Freeze")
			}
		})
	}
}

// A cgroup with a task in uninterruptible, non-freezable sleep never
// finishes freezing. Freeze must give up at the deadline and thaw everything
// it froze, including the cgroups that did freeze.
//
// The task is a direct write to a loop device whose backing file lies on a
// filesystem frozen with fsfreeze: it waits for its bio (submit_bio_wait) in
// D state. (Blocking a writer on the frozen filesystem itself is not enough
// on recent kernels: that wait became freezable for suspend, and the v1
// freezer counts such a task as frozen.)
func TestFreezeDeadlineWhileFreezing(t *testing.T) {
	for _, v := range []Version{V1, V2} {
		t.Run(v.String(), func(t *testing.T) {
			fine := newTestCgroup(t, v)
			stuck := newTestCgroup(t, v)
			finePID := startSpinner(t, fine)

			dev, unfreeze := stuckBlockDevice(t)
			stuckPID := startProcess(t, &stuck, nil, "dd", "if=/dev/zero", "of="+dev, "bs=4096", "count=1", "oflag=direct")
			// Registered after the process, so it runs before the process
			// is reaped: a task waiting for its I/O cannot die.
			t.Cleanup(unfreeze)
			waitProcessState(t, stuckPID, "D")

			// The task must still be blocked when the freeze starts: D can
			// also be a short wait on the way to the block.
			time.Sleep(50 * time.Millisecond)
			if st := processState(t, stuckPID); st != "D" {
				t.Fatalf("the writer to the stuck device is %s, not blocked: the device let the write through", st)
			}

			const budget = 200 * time.Millisecond
			ctx, cancel := context.WithTimeout(context.Background(), budget)
			defer cancel()
			start := time.Now()
			f, err := Freeze(ctx, []Cgroup{fine, stuck})
			elapsed := time.Since(start)
			if err == nil {
				st := processState(t, stuckPID)
				f.Thaw(context.Background())
				t.Fatalf("Freeze of a cgroup with a task in D state succeeded (the task is now %s)", st)
			}
			if !errdefs.IsDeadlineExceeded(err) {
				t.Fatalf("error %v does not wrap context.DeadlineExceeded", err)
			}
			if elapsed < budget || elapsed > budget+200*time.Millisecond {
				t.Fatalf("Freeze gave up after %v, want about %v", elapsed, budget)
			}
			t.Logf("Freeze gave up after %v: %v", elapsed, err)
			assertState(t, fine, StateThawed)
			assertState(t, stuck, StateThawed)
			if !runs(t, finePID, progressWindow) {
				t.Fatal("the process of the cgroup that did freeze was not thawed")
			}
		})
	}
}

// stuckBlockDevice returns a loop device whose writes hang: its backing file
// is on an ext4 image frozen with fsfreeze. unfreeze lets them through;
// everything is removed at the end of the test.
func stuckBlockDevice(t *testing.T) (dev string, unfreeze func()) {
	t.Helper()
	for _, tool := range []string{"mkfs.ext4", "fsfreeze", "mount", "losetup", "dd"} {
		if _, err := exec.LookPath(tool); err != nil {
			testutil.SkipOrFail(t, "%s is not installed (e2fsprogs, util-linux, coreutils)", tool)
		}
	}
	dir := t.TempDir()
	img, mnt := filepath.Join(dir, "fs.img"), filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	run := func(name string, args ...string) string {
		t.Helper()
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	sparseFile := func(path string, size int64) {
		t.Helper()
		if err := os.WriteFile(path, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(path, size); err != nil {
			t.Fatal(err)
		}
	}
	sparseFile(img, 32<<20)
	run("mkfs.ext4", "-q", "-F", img)
	run("mount", "-o", "loop", img, mnt)
	t.Cleanup(func() { unmount(t, mnt) })
	sparseFile(filepath.Join(mnt, "backing.img"), 1<<20)
	dev = run("losetup", "--show", "-f", filepath.Join(mnt, "backing.img"))
	unfreeze = func() { _ = exec.Command("fsfreeze", "-u", mnt).Run() }
	t.Cleanup(func() {
		unfreeze()
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	run("fsfreeze", "-f", mnt)
	return dev, unfreeze
}

func waitProcessState(t testing.TB, pid int, want string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for processState(t, pid) != want {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d: state %s, want %s", pid, processState(t, pid), want)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestFreezeIntentErrorFreezesNothing(t *testing.T) {
	cg := newTestCgroup(t, V1)
	startSpinner(t, cg)
	boom := errors.New("database is closed")
	_, err := Freeze(context.Background(), []Cgroup{cg}, WithIntent(func(context.Context, []string) error { return boom }))
	if !errors.Is(err, boom) {
		t.Fatalf("Freeze error = %v, want the intent's error", err)
	}
	assertState(t, cg, StateThawed)
}

func TestThawPathsAndCgroupAt(t *testing.T) {
	for _, v := range []Version{V1, V2} {
		t.Run(v.String(), func(t *testing.T) {
			cg := newTestCgroup(t, v)
			pid := startSpinner(t, cg)
			got, err := CgroupAt(cg.Path)
			if err != nil {
				t.Fatal(err)
			}
			if got.Path != cg.Path || got.Version != v {
				t.Fatalf("CgroupAt(%s) = %+v, want version %v", cg.Path, got, v)
			}
			if _, err := Freeze(context.Background(), []Cgroup{cg}); err != nil {
				t.Fatal(err)
			}
			// As after a crash: only the recorded path is left, and some
			// recorded cgroups are gone with their containers.
			gone := filepath.Join(filepath.Dir(cg.Path), randomName("seamless-test-gone-"))
			if err := ThawPaths(context.Background(), []string{gone, cg.Path}); err != nil {
				t.Fatal(err)
			}
			assertState(t, cg, StateThawed)
			if !runs(t, pid, progressWindow) {
				t.Fatal("the process does not run after ThawPaths")
			}

			if _, err := CgroupAt(gone); !errdefs.IsNotFound(err) {
				t.Fatalf("CgroupAt(missing) error = %v, want not found", err)
			}
			h, err := mountedHierarchy(v)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := CgroupAt(h.mountpoint); !errdefs.IsInvalidArgument(err) {
				t.Fatalf("CgroupAt(root cgroup) error = %v, want invalid argument", err)
			}
			if err := ThawPaths(context.Background(), []string{h.mountpoint}); err == nil {
				t.Fatal("ThawPaths accepted the root cgroup")
			}
			// A recorded path that is no cgroup is never written to.
			fake := t.TempDir()
			for _, name := range []string{v1StateFile, v2FreezeFile} {
				if err := os.WriteFile(filepath.Join(fake, name), []byte("FROZEN\n"), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := CgroupAt(fake); !errdefs.IsInvalidArgument(err) {
				t.Fatalf("CgroupAt(ordinary directory) error = %v, want invalid argument", err)
			}
			if err := ThawPaths(context.Background(), []string{fake}); err == nil {
				t.Fatal("ThawPaths accepted an ordinary directory")
			}
			if b, _ := os.ReadFile(filepath.Join(fake, v1StateFile)); string(b) != "FROZEN\n" {
				t.Fatalf("ThawPaths wrote %q into an ordinary file", b)
			}
		})
	}
}

// TestCgroupsOf runs on the hierarchy that this host's runtime freezes
// through: v1 on a legacy or hybrid host, v2 on a unified one.
func TestCgroupsOf(t *testing.T) {
	testutil.RequireRoot(t)
	h, err := findHierarchy()
	if err != nil {
		testutil.SkipOrFail(t, "no freezer: %v", err)
	}
	t.Logf("freezing through cgroup %v at %s", h.version, h.mountpoint)
	cg := newTestCgroup(t, h.version)
	sub := subCgroup(t, cg, "sub")
	a, b := startSpinner(t, cg), startSpinner(t, cg)
	c := startSpinner(t, sub)
	exited := exec.Command("/bin/true")
	if err := exited.Run(); err != nil {
		t.Fatal(err)
	}

	got, err := CgroupsOf(context.Background(), []int{c, a, exited.Process.Pid, b, a})
	if err != nil {
		t.Fatal(err)
	}
	pa := []int{a, b}
	sort.Ints(pa)
	want := []Cgroup{
		{Path: cg.Path, Version: h.version, PIDs: pa},
		{Path: sub.Path, Version: h.version, PIDs: []int{c}},
	}
	if !slices.EqualFunc(got, want, func(x, y Cgroup) bool {
		return x.Path == y.Path && x.Version == y.Version && slices.Equal(x.PIDs, y.PIDs)
	}) {
		t.Fatalf("CgroupsOf = %+v, want %+v", got, want)
	}

	if got, err := CgroupsOf(context.Background(), nil); err != nil || got != nil {
		t.Fatalf("CgroupsOf(nil) = %v, %v", got, err)
	}
}

// CgroupsOf refuses a root cgroup, our own cgroup and its ancestors.
func TestCgroupsOfRefuses(t *testing.T) {
	testutil.RequireRoot(t)
	h, err := findHierarchy()
	if err != nil {
		testutil.SkipOrFail(t, "no freezer: %v", err)
	}
	ctx := context.Background()

	own, err := h.cgroupOf("self")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := CgroupsOf(ctx, []int{os.Getpid()}); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("CgroupsOf(own pid) error = %v, want failed precondition", err)
	}

	// A process in the root cgroup (started from the test process, whose
	// cgroup is the root here; otherwise move it there).
	root := Cgroup{Path: h.mountpoint, Version: h.version}
	inRoot := startProcess(t, nil, nil, "/bin/sleep", "1000")
	moveTo(t, inRoot, root)
	if _, err := CgroupsOf(ctx, []int{inRoot}); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("CgroupsOf(process in the root cgroup) error = %v, want failed precondition", err)
	}

	// Move this test process into parent/child: then child (ours) and parent
	// (an ancestor) are refused, and parent/childx (a sibling whose name has
	// ours as a prefix) is not.
	parent := newTestCgroup(t, h.version)
	child := subCgroup(t, parent, "child")
	sibling := subCgroup(t, parent, "childx")
	ownDir, err := h.dir(own)
	if err != nil {
		t.Fatal(err)
	}
	moveTo(t, os.Getpid(), child)
	t.Cleanup(func() {
		// Before the cgroups' removal (cleanups run last-in first-out):
		// it kills what is left in them.
		moveTo(t, os.Getpid(), Cgroup{Path: ownDir, Version: h.version})
	})
	inParent := startProcess(t, &parent, nil, "/bin/sleep", "1000")
	inSibling := startProcess(t, &sibling, nil, "/bin/sleep", "1000")

	for _, tc := range []struct {
		name    string
		pid     int
		refused bool
	}{
		{"own cgroup", os.Getpid(), true},
		{"ancestor of own cgroup", inParent, true},
		{"sibling with own name as prefix", inSibling, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := CgroupsOf(ctx, []int{tc.pid})
			if tc.refused && !errdefs.IsFailedPrecondition(err) {
				t.Fatalf("error = %v, want failed precondition", err)
			}
			if !tc.refused && err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestCheckFreezable(t *testing.T) {
	for _, tc := range []struct {
		cgroup, own string
		refused     bool
	}{
		{"/", "/system.slice/containerd.service", true},
		{"/", "/", true},
		{"/default/redis", "/default/redis", true},
		{"/default", "/default/redis", true},
		{"/default/redis", "/", false},
		{"/default/redis", "/default", false},
		{"/default/redis2", "/default/redis", false},
		{"/default/redis", "/default/redis2", false},
	} {
		err := checkFreezable(tc.cgroup, tc.own)
		if tc.refused != (err != nil) {
			t.Errorf("checkFreezable(%q, own %q) = %v, refused want %v", tc.cgroup, tc.own, err, tc.refused)
		}
		if err != nil && !errdefs.IsFailedPrecondition(err) {
			t.Errorf("checkFreezable(%q, own %q) = %v, want failed precondition", tc.cgroup, tc.own, err)
		}
	}
}

// BenchmarkFreezeThaw measures the round trip Freeze+Thaw of one cgroup
// with one busy process. freeze-ns/op is the time Freeze takes (from the
// first write to all tasks frozen); thaw-ns/op is the time Thaw takes, all
// of which the workload sees as stall. "v1-held" runs with an ActiveHold.
func BenchmarkFreezeThaw(b *testing.B) {
	for _, tc := range []struct {
		name string
		v    Version
		hold bool
	}{
		{"v1", V1, false},
		{"v1-held", V1, true},
		{"v2", V2, false},
	} {
		b.Run(tc.name, func(b *testing.B) {
			ctx := context.Background()
			if tc.hold {
				hold, err := HoldActive(ctx, randomName("seamless-test-hold-"))
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() {
					if err := hold.Release(ctx); err != nil {
						b.Error(err)
					}
				})
			}
			cg := newTestCgroup(b, tc.v)
			startSpinner(b, cg)
			cgs := []Cgroup{cg}
			var freezeTotal, thawTotal time.Duration
			var rounds []time.Duration
			for b.Loop() {
				start := time.Now()
				f, err := Freeze(ctx, cgs)
				if err != nil {
					b.Fatal(err)
				}
				frozen := time.Now()
				if err := f.Thaw(ctx); err != nil {
					b.Fatal(err)
				}
				freezeTotal += frozen.Sub(start)
				thawTotal += time.Since(frozen)
				rounds = append(rounds, time.Since(start))
			}
			b.ReportMetric(float64(freezeTotal.Nanoseconds())/float64(b.N), "freeze-ns/op")
			b.ReportMetric(float64(thawTotal.Nanoseconds())/float64(b.N), "thaw-ns/op")
			// The mean hides how the round trip is distributed on a busy
			// host; a stall budget cares about the tail.
			slices.Sort(rounds)
			b.ReportMetric(float64(rounds[len(rounds)/2].Nanoseconds()), "p50-ns")
			b.ReportMetric(float64(rounds[len(rounds)*99/100].Nanoseconds()), "p99-ns")
		})
	}
}

func TestHoldActive(t *testing.T) {
	testutil.RequireRoot(t)
	h, err := findHierarchy()
	if err != nil {
		testutil.SkipOrFail(t, "no freezer: %v", err)
	}
	ctx := context.Background()
	if _, err := HoldActive(ctx, "a/b"); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("HoldActive(a/b) error = %v, want invalid argument", err)
	}
	name := randomName("seamless-test-hold-")
	held := Cgroup{Path: filepath.Join(h.mountpoint, name), Version: h.version}
	t.Cleanup(func() { removeTestCgroup(t, held) })

	hold, err := HoldActive(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if h.version != V1 {
		if _, err := os.Stat(held.Path); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("HoldActive created %s on a cgroup %v host", held.Path, h.version)
		}
		return
	}
	assertState(t, held, StateFrozen)

	// Freezing works as usual while held (BenchmarkFreezeThaw shows the
	// difference in time).
	cg := newTestCgroup(t, V1)
	pid := startSpinner(t, cg)
	start := time.Now()
	f, err := Freeze(ctx, []Cgroup{cg})
	if err != nil {
		t.Fatal(err)
	}
	frozenAfter := time.Since(start)
	if runs(t, pid, progressWindow) {
		t.Fatal("the process runs while frozen")
	}
	thawStart := time.Now()
	if err := f.Thaw(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("while held: freeze %v, thaw %v", frozenAfter, time.Since(thawStart))
	if !runs(t, pid, progressWindow) {
		t.Fatal("the process does not run after Thaw")
	}
	assertState(t, held, StateFrozen)

	if err := hold.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(held.Path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Release left %s: %v", held.Path, err)
	}
	if err := hold.Release(ctx); err != nil {
		t.Fatalf("second Release: %v", err)
	}
	// A hold cgroup that something runs in is refused: it would stay
	// frozen for as long as the daemon runs.
	if err := os.Mkdir(held.Path, 0o755); err != nil {
		t.Fatal(err)
	}
	startSpinner(t, held)
	if _, err := HoldActive(ctx, name); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("HoldActive on a cgroup with a process: error = %v, want failed precondition", err)
	}
	assertState(t, held, StateThawed)
}

// unmount unmounts mnt, lazily if it is still busy.
func unmount(t testing.TB, mnt string) {
	t.Helper()
	if err := unix.Unmount(mnt, 0); err != nil {
		if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			t.Errorf("unmount %s: %v", mnt, err)
		}
	}
}
