//go:build linux

package sched

import (
	"bufio"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/errdefs"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
)

// TestBackgroundClass: a thread that enters the background class runs at
// its nice value in the background cgroup, and ends with its goroutine
// (the cgroup is empty afterwards), so no pooled thread is left there.
func TestBackgroundClass(t *testing.T) {
	testutil.RequireRoot(t)
	dir, err := BackgroundCgroup("seamless-sched-test")
	if cgroups.Mode() == cgroups.Unified {
		if !errdefs.IsNotImplemented(err) {
			t.Fatalf("BackgroundCgroup on cgroup v2 = %q, %v; want ErrNotImplemented", dir, err)
		}
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(dir) })
	if shares, err := os.ReadFile(filepath.Join(dir, "cpu.shares")); err != nil || !slices.Contains([]string{"2", "3"}, strings.TrimSpace(string(shares))) {
		t.Errorf("cpu.shares = %q, %v; want the least", shares, err)
	}
	type seen struct {
		nice   int
		cgroup string
		err    error
	}
	done := make(chan seen)
	enter := func() {
		var s seen
		s.err = Class{Nice: 19, Cgroup: dir}.Enter()
		if errors.Is(s.err, errMainThread) {
			done <- s
			return
		}
		stat, _ := os.ReadFile("/proc/thread-self/stat")
		// Field 19 is nice; the command name (field 2) has no spaces here.
		if f := strings.Fields(string(stat)); len(f) > 18 {
			s.nice, _ = strconv.Atoi(f[18])
		}
		cg, _ := os.ReadFile("/proc/thread-self/cgroup")
		for _, line := range strings.Split(string(cg), "\n") {
			if parts := strings.SplitN(line, ":", 3); len(parts) == 3 && strings.Contains(","+parts[1]+",", ",cpu,") {
				s.cgroup = parts[2]
			}
		}
		done <- s
	}
	go enter()
	s := <-done
	for i := 0; errors.Is(s.err, errMainThread) && i < 10; i++ {
		go enter() // landed on the main thread, which keeps its class
		s = <-done
	}
	if s.err != nil || s.nice != 19 || s.cgroup != "/seamless-sched-test" {
		t.Fatalf("background thread: nice %d, cpu cgroup %q, %v; want 19, /seamless-sched-test", s.nice, s.cgroup, s.err)
	}
	// The thread exits with its goroutine; the cgroup empties.
	deadline := time.Now().Add(5 * time.Second)
	for os.Remove(dir) != nil {
		if time.Now().After(deadline) {
			tasks, _ := os.ReadFile(filepath.Join(dir, "tasks"))
			t.Fatalf("the background cgroup still holds threads %q after their goroutine ended", tasks)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// threadsHelperEnv makes the test binary a helper process until its
// standard input closes: "1", several threads that wait (what
// TestMoveProcess moves); "spin", a thread spinning per CPU.
const threadsHelperEnv = "SEAMLESS_SCHED_TEST_THREADS"

func TestMain(m *testing.M) {
	switch os.Getenv(threadsHelperEnv) {
	case "1":
		for range 3 {
			go func() {
				runtime.LockOSThread()
				select {}
			}()
		}
	case "spin":
		for range runtime.GOMAXPROCS(0) {
			go func() {
				for {
				}
			}()
		}
	}
	if os.Getenv(threadsHelperEnv) != "" {
		os.Stdout.WriteString("ready\n")
		_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestMoveProcess moves a process of several threads into a class and
// out of it again.
func TestMoveProcess(t *testing.T) {
	testutil.RequireRoot(t)
	class, want := Class{Nice: 19}, ""
	if cgroups.Mode() != cgroups.Unified {
		dir, err := BackgroundCgroup("seamless-sched-move-test")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { removeCgroup(t, dir) })
		class.Cgroup, want = dir, "/seamless-sched-move-test"
	}
	pid := testutil.StartHelper(t, threadsHelperEnv+"=1")
	own := testutil.Threads(t, os.Getpid())[0]
	if own.Nice == 19 {
		t.Fatal("the test runs at nice 19: a move to nice 19 would not show")
	}
	before := testutil.Threads(t, pid)
	if len(before) < 4 || before[0].Nice != own.Nice {
		t.Fatalf("helper threads before the move: %+v; want at least 4 at nice %d", before, own.Nice)
	}

	if err := class.MoveProcess(pid); err != nil {
		t.Fatal(err)
	}
	for _, th := range testutil.Threads(t, pid) {
		if th.Nice != 19 || (want != "" && th.Cgroup != want) {
			t.Errorf("thread %d after the move: nice %d, cpu cgroup %q; want 19, %q", th.Pid, th.Nice, th.Cgroup, want)
		}
	}
	// The mover itself keeps its class.
	for _, th := range testutil.Threads(t, os.Getpid()) {
		if th.Nice != own.Nice || th.Cgroup != own.Cgroup {
			t.Errorf("test thread %d: nice %d, cpu cgroup %q; want its own class", th.Pid, th.Nice, th.Cgroup)
		}
	}

	// And out again, to the mover's class.
	if err := class.LeaveProcess(pid); err != nil {
		t.Fatal(err)
	}
	for _, th := range testutil.Threads(t, pid) {
		if th.Nice != own.Nice || th.Cgroup != own.Cgroup {
			t.Errorf("thread %d after leaving: nice %d, cpu cgroup %q; want the test's %d, %q", th.Pid, th.Nice, th.Cgroup, own.Nice, own.Cgroup)
		}
	}

	if err := class.MoveProcess(1 << 30); err == nil {
		t.Error("MoveProcess of a process that does not exist succeeded")
	}
	if err := class.LeaveProcess(1 << 30); err == nil {
		t.Error("LeaveProcess of a process that does not exist succeeded")
	}
}

// TestRunDelay: a process whose threads share the CPUs with as many
// spinning threads of another process accumulates run delay; a missing
// process is an error.
func TestRunDelay(t *testing.T) {
	testutil.StartHelper(t, threadsHelperEnv+"=spin")
	before, err := RunDelay(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	// Sampled while the threads still exist: an ended thread's delay
	// leaves the sum.
	after, err := RunDelay(os.Getpid())
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	// Each spinning thread waits about half of the 300 ms.
	if waited := after - before; waited < 100*time.Millisecond {
		t.Errorf("run delay grew by %s in 300ms of sharing every CPU with a spinner; want at least 100ms", waited)
	}
	if _, err := RunDelay(1 << 30); err == nil {
		t.Error("RunDelay of a process that does not exist succeeded")
	}
}

// removeCgroup removes cgroup dir once the processes in it have ended.
func removeCgroup(t *testing.T, dir string) {
	deadline := time.Now().Add(5 * time.Second)
	for os.Remove(dir) != nil {
		if time.Now().After(deadline) {
			procs, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
			t.Errorf("cgroup %s still holds processes %q", dir, procs)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestBackgroundCgroupName(t *testing.T) {
	for _, name := range []string{"", "a/b", "..", "."} {
		if _, err := BackgroundCgroup(name); !errdefs.IsInvalidArgument(err) {
			t.Errorf("BackgroundCgroup(%q) = %v, want InvalidArgument", name, err)
		}
	}
}

// BenchmarkEnter: the cost of running one piece of work on a thread of
// its own in a class (thread creation, nice, cgroup migration).
func BenchmarkEnter(b *testing.B) {
	testutil.RequireRoot(b)
	classes := []struct {
		name  string
		class Class
	}{{"nice", Class{Nice: 19}}}
	// cgroup v2 has no background cgroup: nice is all there is to measure.
	dir, err := BackgroundCgroup("seamless-sched-bench")
	switch {
	case err == nil:
		b.Cleanup(func() { os.Remove(dir) })
		classes = append(classes, struct {
			name  string
			class Class
		}{"nice+cgroup", Class{Nice: 19, Cgroup: dir}})
	case !errdefs.IsNotImplemented(err):
		b.Fatal(err)
	}
	for _, c := range classes {
		b.Run(c.name, func(b *testing.B) {
			for range b.N {
				done := make(chan struct{})
				go func() {
					defer close(done)
					_ = c.class.Enter()
				}()
				<-done
			}
		})
	}
}
