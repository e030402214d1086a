//go:build linux

package freeze

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
)

// helperEnv switches the test binary into a helper process (see TestMain).
const helperEnv = "SEAMLESS_FREEZE_TEST_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
		os.Exit(m.Run())
	case "mmap":
		if err := mmapHelper(); err != nil {
			fmt.Fprintln(os.Stderr, "mmap helper:", err)
			os.Exit(1)
		}
		os.Exit(0)
	default:
		fmt.Fprintln(os.Stderr, "unknown helper", os.Getenv(helperEnv))
		os.Exit(2)
	}
}

// init keeps the main goroutine on the process's main thread, whose root
// directory is what /proc/PID/root shows: the mmap helper changes it.
func init() { runtime.LockOSThread() }

// mmapHelper enters a root directory the way the environment says, maps
// files named by the environment (paths inside that root), prints "ready"
// and waits for its stdin to close.
//
//	OUTSIDE_RW: mapped shared and writable before entering the root
//	CHROOT: chroot into this directory
//	PIVOT_ROOT: like runc: new mount namespace, pivot_root into this
//	  directory, detach the old root
//	SHARED_RW, PRIVATE_RW, SHARED_RO: files mapped that way (":"-separated)
//	SHARED_RW_UNLINK: mapped shared and writable, then unlinked
//
// It also maps shared anonymous memory and a memfd, which must not be
// reported.
func mmapHelper() error {
	mapFile := func(env string, flags, prot int) error {
		for p := range strings.SplitSeq(os.Getenv(env), ":") {
			if p == "" {
				continue
			}
			mode := os.O_RDWR
			if prot&unix.PROT_WRITE == 0 {
				mode = os.O_RDONLY
			}
			f, err := os.OpenFile(p, mode, 0)
			if err != nil {
				return err
			}
			if _, err := unix.Mmap(int(f.Fd()), 0, 4096, prot, flags); err != nil {
				return fmt.Errorf("mmap %s: %w", p, err)
			}
			f.Close()
		}
		return nil
	}
	rw := unix.PROT_READ | unix.PROT_WRITE
	if err := mapFile("OUTSIDE_RW", unix.MAP_SHARED, rw); err != nil {
		return err
	}
	if dir := os.Getenv("CHROOT"); dir != "" {
		if err := unix.Chroot(dir); err != nil {
			return err
		}
		if err := unix.Chdir("/"); err != nil {
			return err
		}
	}
	if dir := os.Getenv("PIVOT_ROOT"); dir != "" {
		if err := pivotRoot(dir); err != nil {
			return err
		}
	}
	if err := mapFile("SHARED_RW", unix.MAP_SHARED, rw); err != nil {
		return err
	}
	if err := mapFile("PRIVATE_RW", unix.MAP_PRIVATE, rw); err != nil {
		return err
	}
	if err := mapFile("SHARED_RO", unix.MAP_SHARED, unix.PROT_READ); err != nil {
		return err
	}
	if err := mapFile("SHARED_RW_UNLINK", unix.MAP_SHARED, rw); err != nil {
		return err
	}
	for p := range strings.SplitSeq(os.Getenv("SHARED_RW_UNLINK"), ":") {
		if p == "" {
			continue
		}
		if err := os.Remove(p); err != nil {
			return err
		}
	}
	if _, err := unix.Mmap(-1, 0, 4096, rw, unix.MAP_SHARED|unix.MAP_ANONYMOUS); err != nil {
		return err
	}
	fd, err := unix.MemfdCreate("seamless-test", 0)
	if err != nil {
		return err
	}
	if err := unix.Ftruncate(fd, 4096); err != nil {
		return err
	}
	if _, err := unix.Mmap(fd, 0, 4096, rw, unix.MAP_SHARED); err != nil {
		return err
	}
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
	return nil
}

// pivotRoot moves this thread (the main one, see init) into a new mount
// namespace whose root is dir, as runc does for a container.
func pivotRoot(dir string) error {
	if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("unshare: %w", err)
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make / private: %w", err)
	}
	if err := unix.Mount(dir, dir, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind %s: %w", dir, err)
	}
	if err := unix.Chdir(dir); err != nil {
		return err
	}
	// runc's way: stack the old root on the new one, then detach it.
	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach the old root: %w", err)
	}
	return unix.Chdir("/")
}

// startMmapHelper runs the mmap helper with env and waits until it is ready.
func startMmapHelper(t *testing.T, env ...string) int {
	t.Helper()
	return testutil.StartHelper(t, append([]string{helperEnv + "=mmap"}, env...)...)
}

func randomName(prefix string) string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// newTestCgroup creates a cgroup of version v for the test, removed at the
// end of the test after its processes are thawed and killed.
func newTestCgroup(t testing.TB, v Version) Cgroup {
	t.Helper()
	testutil.RequireRoot(t)
	h, err := mountedHierarchy(v)
	if err != nil {
		testutil.SkipOrFail(t, "cgroup %v: %v", v, err)
	}
	dir := filepath.Join(h.mountpoint, randomName("seamless-test-"))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	cg := Cgroup{Path: dir, Version: v}
	t.Cleanup(func() { removeTestCgroup(t, cg) })
	return cg
}

// subCgroup creates a child cgroup of parent, removed by parent's cleanup.
func subCgroup(t testing.TB, parent Cgroup, name string) Cgroup {
	t.Helper()
	dir := filepath.Join(parent.Path, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return Cgroup{Path: dir, Version: parent.Version}
}

// removeTestCgroup thaws cg and its children, kills what is left in them and
// removes them, deepest first.
func removeTestCgroup(t testing.TB, cg Cgroup) {
	t.Helper()
	entries, _ := os.ReadDir(cg.Path)
	for _, e := range entries {
		if e.IsDir() {
			removeTestCgroup(t, Cgroup{Path: filepath.Join(cg.Path, e.Name()), Version: cg.Version})
		}
	}
	// A frozen process does not act on SIGKILL before it is thawed.
	_ = cg.thaw()
	for attempt := 0; ; attempt++ {
		for _, pid := range cgroupProcs(t, cg) {
			if pid == os.Getpid() {
				t.Errorf("the test process is still in %s; not removing it", cg.Path)
				return
			}
			_ = unix.Kill(pid, unix.SIGKILL)
		}
		err := os.Remove(cg.Path)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return
		}
		if attempt == 200 {
			t.Errorf("remove test cgroup %s: %v", cg.Path, err)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func cgroupProcs(t testing.TB, cg Cgroup) []int {
	b, err := os.ReadFile(filepath.Join(cg.Path, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var pids []int
	for f := range strings.FieldsSeq(string(b)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			t.Fatalf("cgroup.procs of %s: %v", cg.Path, err)
		}
		pids = append(pids, pid)
	}
	return pids
}

// moveTo moves process pid into cg.
func moveTo(t testing.TB, pid int, cg Cgroup) {
	t.Helper()
	if err := writeFile(cg.Path, "cgroup.procs", strconv.Itoa(pid)); err != nil {
		t.Fatal(err)
	}
}

// startProcess starts a process that is killed (after thawing cg, if any)
// and reaped at the end of the test; if cg is not empty the process is moved
// into it.
func startProcess(t testing.TB, cg *Cgroup, attr *syscall.SysProcAttr, name string, args ...string) int {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.SysProcAttr = attr
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cg != nil {
			_ = cg.thaw()
		}
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	if cg != nil {
		moveTo(t, cmd.Process.Pid, *cg)
	}
	return cmd.Process.Pid
}

// startSpinner starts a busy loop in cg.
func startSpinner(t testing.TB, cg Cgroup) int {
	t.Helper()
	return startProcess(t, &cg, nil, "/bin/sh", "-c", "while :; do :; done")
}

// cpuTime is the CPU time that pid has used, in nanoseconds (first field
// of /proc/PID/schedstat), a direct measure of whether it runs.
func cpuTime(t testing.TB, pid int) uint64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/schedstat", pid))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b))
	n, err := strconv.ParseUint(f[0], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// runs reports whether pid used CPU time during the next d.
func runs(t testing.TB, pid int, d time.Duration) bool {
	t.Helper()
	before := cpuTime(t, pid)
	time.Sleep(d)
	return cpuTime(t, pid) != before
}

// assertState fails the test unless cg is in state want.
func assertState(t testing.TB, cg Cgroup, want State) {
	t.Helper()
	got, err := cg.State()
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Fatalf("cgroup %s: state %s, want %s", cg.Path, got, want)
	}
}

// processState is the one-letter state of pid in /proc/PID/stat.
func processState(t testing.TB, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return strings.Fields(s[i+1:])[0]
}
