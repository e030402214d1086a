package testutil

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// ProcClass is how a process or thread is scheduled: its nice value and
// its cpu cgroup (cgroup v1; "" on v2).
type ProcClass struct {
	Pid    int // the thread's id, for a thread
	Nice   int
	Cgroup string
}

// Children returns the processes whose parent is ppid and whose argv[0]
// is argv0, with their class.
func Children(tb testing.TB, ppid int, argv0 string) []ProcClass {
	tb.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		tb.Fatal(err)
	}
	var out []ProcClass
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		dir := filepath.Join("/proc", e.Name())
		cmdline, err := os.ReadFile(filepath.Join(dir, "cmdline"))
		if err != nil || !bytes.HasPrefix(cmdline, []byte(argv0+"\x00")) {
			continue
		}
		pc, parent, ok := readProc(dir)
		if !ok || parent != ppid {
			continue
		}
		pc.Pid = pid
		out = append(out, pc)
	}
	return out
}

// Threads returns the class of every thread of process pid.
func Threads(tb testing.TB, pid int) []ProcClass {
	tb.Helper()
	tasks, err := filepath.Glob(filepath.Join("/proc", strconv.Itoa(pid), "task", "*"))
	if err != nil {
		tb.Fatal(err)
	}
	var out []ProcClass
	for _, task := range tasks {
		if pc, _, ok := readProc(task); ok {
			pc.Pid, _ = strconv.Atoi(filepath.Base(task))
			out = append(out, pc)
		}
	}
	return out
}

// readProc reads the class and the parent of /proc/PID or
// /proc/PID/task/TID; ok is false once it is gone.
func readProc(dir string) (pc ProcClass, ppid int, ok bool) {
	stat, err := os.ReadFile(filepath.Join(dir, "stat"))
	if err != nil {
		return pc, 0, false
	}
	// After the command name, which may hold spaces: state, ppid, …,
	// nice (field 19 of the line).
	_, rest, _ := bytes.Cut(stat, []byte(") "))
	f := strings.Fields(string(rest))
	if len(f) < 17 {
		return pc, 0, false
	}
	ppid, _ = strconv.Atoi(f[1])
	pc.Nice, _ = strconv.Atoi(f[16])
	cg, err := os.ReadFile(filepath.Join(dir, "cgroup"))
	if err != nil {
		return pc, 0, false
	}
	for _, line := range strings.Split(string(cg), "\n") {
		if parts := strings.SplitN(line, ":", 3); len(parts) == 3 && strings.Contains(","+parts[1]+",", ",cpu,") {
			pc.Cgroup = parts[2]
		}
	}
	return pc, ppid, true
}

// StartHelper runs the test binary again, with env added to its
// environment and no test selected, so that its TestMain acts as a helper
// process; it returns once the helper has written "ready\n" on its
// standard output. The helper's standard input closes, and the helper is
// killed and waited for, when the test ends.
func StartHelper(tb testing.TB, env ...string) int {
	tb.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		stdin.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "ready\n" {
		tb.Fatalf("helper %v did not get ready: %q, %v", env, line, err)
	}
	return cmd.Process.Pid
}
