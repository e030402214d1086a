//go:build linux

// Package sched runs background work at a lower CPU priority than the
// containers it must not disturb.
//
// A nice value alone does not do that: the kernel shares CPU time between
// cgroups (and autogroups) first and orders threads by nice only within
// one, so a daemon thread at nice 19 still takes half a CPU from a
// container in a cgroup of its own. On cgroup v1, where the cpu
// controller places single threads, background threads also join a cpu
// cgroup at the top of the hierarchy with the least share there is
// (BackgroundCgroup). cgroup v2 places whole processes only: there, nice
// is all this package does, and the daemon's own cgroup weight decides.
package sched

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// Class is how a background thread runs.
type Class struct {
	// Nice is the thread's nice value, 0 (unchanged) to 19.
	Nice int
	// Cgroup is a cgroup v1 cpu cgroup directory the thread joins
	// (BackgroundCgroup); "" for none.
	Cgroup string
}

// Enter gives the calling goroutine an OS thread of its own for the rest
// of its life and runs that thread in class c. The thread is never
// unlocked, so it ends with the goroutine instead of going back to the
// runtime's pool to serve others at that priority. Whatever fails, the
// thread still runs, at the priority it could get.
func (c Class) Enter() error {
	runtime.LockOSThread()
	if unix.Gettid() == unix.Getpid() {
		// The runtime never ends the main thread: it would stay in the
		// class, unused, forever. Leave it as it is.
		return errMainThread
	}
	var errs []error
	if c.Nice > 0 {
		if err := unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), c.Nice); err != nil {
			errs = append(errs, fmt.Errorf("set nice %d: %w", c.Nice, err))
		}
	}
	if c.Cgroup != "" {
		// In v1, a thread id written to "tasks" moves that thread alone.
		if err := os.WriteFile(filepath.Join(c.Cgroup, "tasks"), []byte(strconv.Itoa(unix.Gettid())), 0); err != nil {
			errs = append(errs, fmt.Errorf("join cgroup %s: %w", c.Cgroup, err))
		}
	}
	return errors.Join(errs...)
}

var errMainThread = errors.New("sched: the main thread keeps its priority")

// EnterProcess runs the whole calling process in class c (MoveProcess
// of itself): a helper process of the daemon's (the layer builder) calls
// it first thing, to cover threads its parent's MoveProcess missed.
//
// A daemon thread of the background class that the kernel starves while
// it runs Go code keeps its P from the rest of the daemon (and from a
// stop-the-world) until it runs again; a process of its own starves
// alone. Hence CPU-heavy background work goes into a helper process.
func (c Class) EnterProcess() error {
	return c.MoveProcess(os.Getpid())
}

// MoveProcess runs process pid, every thread it has, in class c. The
// threads it makes later inherit c's nice value from the one that makes
// them; with cgroup v1, the process joins c's cgroup (cgroup.procs moves
// every thread, and the threads made later follow). The daemon moves a
// helper it started as soon as it runs: the Go runtime's start-up of the
// daemon's own binary costs a helper tens of milliseconds of CPU before
// its main could move itself, and that, at the daemon's priority, is
// what a container beside it would feel. Whatever fails, the process
// still runs, at the priority it could get.
func (c Class) MoveProcess(pid int) error {
	var errs []error
	if c.Nice > 0 {
		// The nice values first: setting them is quicker than a cgroup
		// migration, which waits for an RCU grace period.
		errs = append(errs, niceThreads(pid, c.Nice))
	}
	if c.Cgroup != "" {
		if err := os.WriteFile(filepath.Join(c.Cgroup, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
			errs = append(errs, fmt.Errorf("move process %d to cgroup %s: %w", pid, c.Cgroup, err))
		}
	}
	if c.Nice > 0 {
		// Twice: a thread made by one not yet reniced was missed.
		errs = append(errs, niceThreads(pid, c.Nice))
	}
	return errors.Join(errs...)
}

// LeaveProcess moves process pid, which MoveProcess put in class c, back
// to the calling thread's class: its nice value and, when c has a cgroup,
// its cpu cgroup. The daemon does this for a helper the containers have
// starved of CPU for too long, so that its work still ends.
func (c Class) LeaveProcess(pid int) error {
	prio, err := unix.Getpriority(unix.PRIO_PROCESS, 0)
	if err != nil {
		return fmt.Errorf("read own nice value: %w", err)
	}
	// The system call answers 20 - nice, so that it is never negative.
	nice := 20 - prio
	var errs []error
	if c.Cgroup != "" {
		own, err := c.ownCgroup()
		if err == nil {
			err = os.WriteFile(filepath.Join(own, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("move process %d out of cgroup %s: %w", pid, c.Cgroup, err))
		}
	}
	// Twice, as in MoveProcess: a thread made meanwhile by one not yet
	// reniced would keep c's nice value.
	errs = append(errs, niceThreads(pid, nice), niceThreads(pid, nice))
	return errors.Join(errs...)
}

// ownCgroup is the calling thread's cpu cgroup directory in the hierarchy
// that holds c.Cgroup, which BackgroundCgroup makes at its top.
func (c Class) ownCgroup() (string, error) {
	legacy, _, err := cgroups.ParseCgroupFileUnified("/proc/thread-self/cgroup")
	if err != nil {
		return "", err
	}
	path, ok := legacy["cpu"]
	if !ok {
		return "", fmt.Errorf("no cpu cgroup in /proc/thread-self/cgroup: %w", errdefs.ErrNotFound)
	}
	return filepath.Join(filepath.Dir(c.Cgroup), path), nil
}

// RunDelay is how long the threads process pid has now have waited, in
// all, for a CPU while they could run (the kernel's schedstat). A process
// whose run delay grows as fast as the clock is starved; one blocked on
// a pipe or stopped is not.
func RunDelay(pid int) (time.Duration, error) {
	paths, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	if err != nil {
		return 0, err
	}
	if len(paths) == 0 {
		return 0, fmt.Errorf("no schedstat for process %d: %w", pid, errdefs.ErrNotFound)
	}
	var total time.Duration
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if errors.Is(err, os.ErrNotExist) {
			continue // a thread that has just ended
		}
		if err != nil {
			return 0, err
		}
		// "<on cpu ns> <waiting on a runqueue ns> <timeslices>"
		f := strings.Fields(string(data))
		if len(f) < 2 {
			return 0, fmt.Errorf("%s: %q", p, data)
		}
		ns, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", p, err)
		}
		total += time.Duration(ns)
	}
	return total, nil
}

// niceThreads sets nice on every thread process pid has now.
func niceThreads(pid, nice int) error {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return fmt.Errorf("list the threads of process %d: %w", pid, err)
	}
	var errs []error
	for _, t := range tasks {
		tid, err := strconv.Atoi(t.Name())
		if err != nil {
			continue
		}
		if err := unix.Setpriority(unix.PRIO_PROCESS, tid, nice); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("set nice %d of thread %d: %w", nice, tid, err))
		}
	}
	return errors.Join(errs...)
}

// Run runs fn on a thread of its own in class c (best effort, see Enter)
// and waits for it. The thread ends with fn.
func (c Class) Run(fn func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		if errors.Is(c.Enter(), errMainThread) {
			// This goroutine holds the main thread (the runtime parks it
			// for good when the goroutine ends), so fn gets another.
			c.Run(fn)
			return
		}
		fn()
	}()
	<-done
}

// BackgroundCgroup makes (or finds) the cgroup v1 cpu cgroup name at the
// top of the cpu hierarchy, idle (cpu.idle, Linux 5.15) or else with the
// smallest cpu.shares, and returns its directory. At the
// top, it competes with every container's cgroup as a sibling of their
// ancestors, and gets CPU time only when they leave some. It fails with
// errdefs.ErrNotImplemented where no v1 cpu hierarchy is mounted (cgroup
// v2).
func BackgroundCgroup(name string) (string, error) {
	if name == "" || strings.ContainsRune(name, '/') || name == "." || name == ".." {
		return "", fmt.Errorf("background cgroup name %q: %w", name, errdefs.ErrInvalidArgument)
	}
	mounts, err := mountinfo.GetMounts(func(m *mountinfo.Info) (skip, stop bool) {
		return m.FSType != "cgroup" || !slices.Contains(strings.Split(m.VFSOptions, ","), "cpu"), false
	})
	if err != nil {
		return "", fmt.Errorf("read mountinfo: %w", err)
	}
	if len(mounts) == 0 {
		return "", fmt.Errorf("no cgroup v1 cpu hierarchy is mounted: %w", errdefs.ErrNotImplemented)
	}
	top := mounts[0]
	for _, m := range mounts {
		if m.Root == "/" {
			top = m
			break
		}
	}
	dir := filepath.Join(top.Mountpoint, name)
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return "", fmt.Errorf("create cgroup %s: %w", dir, err)
	}
	// Idle (SCHED_IDLE for the whole group, the least weight): containers
	// waking up preempt it at once. Older kernels have no such file; the
	// least cpu.shares is next best (an idle group refuses them).
	err = os.WriteFile(filepath.Join(dir, "cpu.idle"), []byte("1"), 0)
	if errors.Is(err, os.ErrNotExist) {
		err = os.WriteFile(filepath.Join(dir, "cpu.shares"), []byte("2"), 0)
	}
	if err != nil {
		return "", fmt.Errorf("lower the cpu share of %s: %w", dir, err)
	}
	return dir, nil
}
