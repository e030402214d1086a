//go:build linux

package testutil

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil/workload"
)

// writerRoot makes a root with the image's part of the writer's
// directory: workload.Dir holding the base files.
func writerRoot(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	dir := filepath.Join(root, workload.Dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, b := range workload.Base() {
		if err := os.WriteFile(filepath.Join(dir, b.Name), b.Data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

// overlayRoot mounts an overlay whose lower dir is a writerRoot, and
// returns the merged root and the upper dir, both a writer root.
func overlayRoot(t *testing.T) (merged, upper string) {
	t.Helper()
	RequireRoot(t)
	lower := writerRoot(t)
	dir := t.TempDir()
	upper, work, merged := filepath.Join(dir, "upper"), filepath.Join(dir, "work"), filepath.Join(dir, "merged")
	for _, d := range []string{upper, work, merged} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	data := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", lower, upper, work)
	if err := unix.Mount("overlay", merged, "overlay", 0, data); err != nil {
		t.Fatalf("mount overlay %s: %v", data, err)
	}
	t.Cleanup(func() { unix.Unmount(merged, unix.MNT_DETACH) })
	return merged, upper
}

// runWriter runs the writer for steps steps in root's workload.Dir and
// fails the test if it reports anything.
func runWriter(t *testing.T, bin, root string, steps int) {
	t.Helper()
	out, err := exec.Command(bin, "-dir", filepath.Join(root, workload.Dir), "-steps", strconv.Itoa(steps)).CombinedOutput()
	if err != nil || len(out) > 0 {
		t.Fatalf("writer -steps %d: %v: %s", steps, err, out)
	}
}

// stderrFile is where a writer on the host reports its error.
type stderrFile struct{ f *os.File }

func writerStderr(t *testing.T) stderrFile {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "writer.stderr"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return stderrFile{f}
}

func (s stderrFile) String() string {
	data, _ := os.ReadFile(s.f.Name())
	return string(data)
}

// stopped waits until every thread of pid is stopped: a thread in a
// system call stops only when the call returns.
func stopped(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
		all := len(tasks) > 0
		for _, task := range tasks {
			data, err := os.ReadFile(task)
			// The state follows the parenthesised command name.
			if i := bytes.LastIndexByte(data, ')'); err != nil || i < 0 || i+2 >= len(data) || data[i+2] != 'T' && data[i+2] != 't' {
				all = false
			}
		}
		if all {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("writer %d did not stop", pid)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestCheckWriterStateWhileWriting runs the writer on the host, stops it
// with SIGSTOP at arbitrary instants (often in the middle of a step) and
// checks each state: on a plain directory, a copy of it; on an overlay,
// the upper dir in place (what a capture copies) and the merged root.
func TestCheckWriterStateWhileWriting(t *testing.T) {
	bin := BuildStatic(t, WriterPackage)
	for _, tc := range []struct {
		name    string
		overlay bool
	}{
		{"directory", false},
		{"overlay", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var root, upper string
			if tc.overlay {
				root, upper = overlayRoot(t)
			} else {
				root = writerRoot(t)
			}
			// A file the writer writes directly: reading a buffer that
			// exec's goroutine fills would race with it.
			stderr := writerStderr(t)
			cmd := exec.Command(bin, "-dir", filepath.Join(root, workload.Dir))
			cmd.Stderr = stderr.f
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			t.Cleanup(func() {
				cmd.Process.Signal(syscall.SIGCONT)
				cmd.Process.Kill()
				<-exited
			})
			// Start once the writer has set up: before, there is no log.
			logPath := filepath.Join(root, workload.Dir, workload.LogName)
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
				if fi, err := os.Stat(logPath); err == nil && fi.Size() > 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("the writer did not start: %s", stderr.String())
				}
			}
			var merged, upperCheck workload.Checker
			last := -1
			var logSize int64
			for round := range 12 {
				// Let it run a while, and at least until it has taken a
				// step since the last stop: on a busy machine it may not
				// have been scheduled.
				time.Sleep(time.Duration(10+round*7) * time.Millisecond)
				for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
					if fi, err := os.Stat(logPath); err == nil && fi.Size() > logSize {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("round %d: the writer makes no progress: %s", round, stderr.String())
					}
				}
				select {
				case err := <-exited:
					t.Fatalf("the writer exited: %v: %s", err, stderr.String())
				default:
				}
				if err := cmd.Process.Signal(syscall.SIGSTOP); err != nil {
					t.Fatal(err)
				}
				stopped(t, cmd.Process.Pid)
				fi, serr := os.Stat(logPath)
				if serr != nil {
					t.Fatal(serr)
				}
				logSize = fi.Size()
				var n int
				var err error
				snap := t.TempDir()
				if tc.overlay {
					// In place, while stopped: the upper dir is what a
					// capture copies; the merged root what the writer sees.
					var nu int
					if nu, err = upperCheck.Verify(upper, workload.Upper); err == nil {
						n, err = merged.Verify(root, workload.Merged)
						if err == nil && n != nu {
							err = fmt.Errorf("the upper dir is at step %d, the merged root at %d", nu, n)
						}
					}
				} else if out, err := exec.Command("cp", "-a", filepath.Join(root, workload.Dir), snap).CombinedOutput(); err != nil {
					t.Fatalf("cp: %v: %s", err, out)
				}
				if err := cmd.Process.Signal(syscall.SIGCONT); err != nil {
					t.Fatal(err)
				}
				if !tc.overlay {
					n, err = merged.Verify(snap, workload.Merged)
				}
				if err != nil {
					t.Fatalf("round %d: %v", round, err)
				}
				if n <= last {
					t.Errorf("round %d: step %d, not after %d", round, n, last)
				}
				last = n
			}
			t.Logf("%d steps in %d rounds", last, 12)
			if msg := stderr.String(); msg != "" {
				t.Errorf("the writer reported: %s", msg)
			}
		})
	}
}

// writerFixture is a writer's directory after a run of steps steps.
type writerFixture struct {
	steps  int
	layout workload.Layout
	root   string
	model  *workload.Model // the state after steps steps
	next   map[string]bool // names step steps+1 touches
}

// writerFixtures runs the writer in overlays for 500 steps (base files
// appended to, copy-ups, or deleted once; nothing re-created, no
// numbered file out of the window) and for 2500 (base files re-created
// and deleted again, the window deleting), and returns each run's merged
// root and upper dir.
func writerFixtures(t *testing.T) []writerFixture {
	t.Helper()
	bin := BuildStatic(t, WriterPackage)
	var fixtures []writerFixture
	for _, steps := range []int{500, 2500} {
		merged, upper := overlayRoot(t)
		runWriter(t, bin, merged, steps)
		m := workload.NewModel()
		for m.Step() < steps {
			m.Next()
		}
		next := map[string]bool{}
		for _, op := range m.Clone().Next() {
			next[op.Name] = true
		}
		// A plain copy of the merged root: copyRoot hard-links, and
		// links cannot cross from the overlay.
		plain := t.TempDir()
		if out, err := exec.Command("cp", "-a", filepath.Join(merged, workload.Dir), plain).CombinedOutput(); err != nil {
			t.Fatalf("cp: %v: %s", err, out)
		}
		fixtures = append(fixtures,
			writerFixture{steps, workload.Merged, plain, m, next},
			writerFixture{steps, workload.Upper, upper, m, next})
	}
	return fixtures
}

// copyRoot copies a fixture's writer directory (whiteouts and overlay
// xattrs included) into a new root, hard-linking the files: every change
// a test makes replaces a file (replaceFile) instead of writing into it.
func copyRoot(t *testing.T, root string) string {
	t.Helper()
	dst := t.TempDir()
	if out, err := exec.Command("cp", "-a", "--link", filepath.Join(root, workload.Dir), dst).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v: %s", err, out)
	}
	return dst
}

// find returns the first name (numbered files from the newest, then base
// files) whose entry satisfies ok and that step steps+1 does not touch.
func (f writerFixture) find(ok func(name string, e workload.Entry) bool) (string, bool) {
	var names []string
	for j := f.steps; j > 0; j-- {
		names = append(names, workload.NumberedName(j))
	}
	for k := range workload.BaseFiles {
		names = append(names, workload.BaseName(k))
	}
	for _, name := range names {
		if !f.next[name] && ok(name, f.model.Entry(name)) {
			return name, true
		}
	}
	return "", false
}

func (f writerFixture) String() string { return fmt.Sprintf("%s after %d steps", f.layout, f.steps) }

// replaceFile replaces p (a hard link to a fixture's file, or a whiteout)
// with a new file holding data.
func replaceFile(t *testing.T, p string, data []byte) {
	t.Helper()
	if err := os.Remove(p); err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

func mknodWhiteout(t *testing.T, p string) {
	t.Helper()
	os.Remove(p)
	if err := unix.Mknod(p, unix.S_IFCHR|0o600, 0); err != nil {
		t.Fatal(err)
	}
}

// TestCheckWriterStateByHand checks the checker on real end states of the
// writer, and on states made from them by hand: those the writer passes
// through (step N+1 in flight) pass, torn ones do not.
func TestCheckWriterStateByHand(t *testing.T) {
	fixtures := writerFixtures(t)
	t.Run("step in flight", func(t *testing.T) { testStepInFlight(t, fixtures) })
	t.Run("torn", func(t *testing.T) { testTornStates(t, fixtures) })
}

// testTornStates: states the writer never passed through are rejected
// with a message that names what is wrong; the real ones pass.
func testTornStates(t *testing.T, fixtures []writerFixture) {
	for _, f := range fixtures {
		if n := CheckWriterState(t, copyRoot(t, f.root), f.layout); n != f.steps {
			t.Fatalf("%s: untouched copy at step %d", f, n)
		}
	}
	isLive := func(_ string, e workload.Entry) bool { return e.State == workload.Present }
	for _, tc := range []struct {
		name string
		// mutate changes dir (the copy's workload.Dir) and returns what
		// the error must name, or "" if the fixture has nothing to break.
		mutate func(t *testing.T, f writerFixture, dir string) string
	}{
		{"log with a torn last line", func(t *testing.T, f writerFixture, dir string) string {
			appendLog(t, dir, strconv.Itoa(f.steps+1))
			return "torn last line"
		}},
		{"log missing a line", func(t *testing.T, f writerFixture, dir string) string {
			var b strings.Builder
			for i := 1; i <= f.steps; i++ {
				if i != f.steps/2 {
					fmt.Fprintln(&b, i)
				}
			}
			replaceFile(t, filepath.Join(dir, workload.LogName), []byte(b.String()))
			return "torn or out of order"
		}},
		{"log behind the files", func(t *testing.T, f writerFixture, dir string) string {
			var b strings.Builder
			for i := 1; i <= f.steps-5; i++ {
				fmt.Fprintln(&b, i)
			}
			replaceFile(t, filepath.Join(dir, workload.LogName), []byte(b.String()))
			return workload.NumberedName(f.steps) + ":"
		}},
		{"earlier file missing", func(t *testing.T, f writerFixture, dir string) string {
			name, _ := f.find(isLive)
			os.Remove(filepath.Join(dir, name))
			return name + ": got missing"
		}},
		{"newest file empty", func(t *testing.T, f writerFixture, dir string) string {
			name, _ := f.find(isLive)
			replaceFile(t, filepath.Join(dir, name), nil)
			return name + ": got an empty file"
		}},
		{"file torn in half", func(t *testing.T, f writerFixture, dir string) string {
			name, _ := f.find(isLive)
			e := f.model.Entry(name)
			replaceFile(t, filepath.Join(dir, name), e.Content.Bytes()[:len(e.Content.Bytes())/2])
			return name + ":"
		}},
		{"overwrite lost", func(t *testing.T, f writerFixture, dir string) string {
			name, ok := f.find(func(name string, e workload.Entry) bool {
				return e.State == workload.Present && strings.HasPrefix(name, "f.") && name != workload.NumberedName(e.Content.Gen)
			})
			if !ok {
				return ""
			}
			replaceFile(t, filepath.Join(dir, name), workload.Content{Name: name, Gen: mustAtoi(t, strings.TrimPrefix(name, "f."))}.Bytes())
			return name + ":"
		}},
		{"file of a later step", func(t *testing.T, f writerFixture, dir string) string {
			name := workload.NumberedName(f.steps + 2)
			replaceFile(t, filepath.Join(dir, name), workload.Content{Name: name, Gen: f.steps + 2}.Bytes())
			return name + ": got a file"
		}},
		{"deleted file back", func(t *testing.T, f writerFixture, dir string) string {
			name, ok := f.find(func(name string, e workload.Entry) bool {
				return e.State == workload.Missing && strings.HasPrefix(name, "f.")
			})
			if !ok {
				return ""
			}
			replaceFile(t, filepath.Join(dir, name), workload.Content{Name: name, Gen: mustAtoi(t, strings.TrimPrefix(name, "f."))}.Bytes())
			return name + ": got a file"
		}},
		{"mmap store lost", func(t *testing.T, f writerFixture, dir string) string {
			p := filepath.Join(dir, workload.MmapName)
			data, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			slot := f.steps % workload.MmapSlots
			binary.NativeEndian.PutUint64(data[slot*workload.SlotSize:], uint64(f.steps-workload.MmapSlots))
			replaceFile(t, p, data)
			return fmt.Sprintf("mmap: slot %d holds step %d, want %d", slot, f.steps-workload.MmapSlots, f.steps)
		}},
		{"mmap missing", func(t *testing.T, f writerFixture, dir string) string {
			os.Remove(filepath.Join(dir, workload.MmapName))
			return "mmap: missing"
		}},
		{"whiteout lost", func(t *testing.T, f writerFixture, dir string) string {
			name, ok := f.find(func(_ string, e workload.Entry) bool { return e.State == workload.Deleted })
			if !ok || f.layout != workload.Upper {
				return ""
			}
			os.Remove(filepath.Join(dir, name))
			return name + ": got missing, want a whiteout"
		}},
		{"deleted base file back", func(t *testing.T, f writerFixture, dir string) string {
			name, ok := f.find(func(_ string, e workload.Entry) bool { return e.State == workload.Deleted })
			if !ok {
				return ""
			}
			replaceFile(t, filepath.Join(dir, name), workload.Content{Name: name}.Bytes())
			return name + ": got a file"
		}},
		{"append to a base file lost", func(t *testing.T, f writerFixture, dir string) string {
			name, ok := f.find(func(_ string, e workload.Entry) bool { return e.State == workload.Present && e.Content.Tail > 0 })
			if !ok {
				return ""
			}
			replaceFile(t, filepath.Join(dir, name), workload.Content{Name: name}.Bytes())
			return name + ":"
		}},
		{"re-created base file lost", func(t *testing.T, f writerFixture, dir string) string {
			name, ok := f.find(func(name string, e workload.Entry) bool {
				return e.State == workload.Present && strings.HasPrefix(name, "base.") && e.Content.Gen > 0
			})
			if !ok {
				return ""
			}
			if f.layout == workload.Upper {
				mknodWhiteout(t, filepath.Join(dir, name))
				return name + ": got a whiteout"
			}
			os.Remove(filepath.Join(dir, name))
			return name + ": got missing"
		}},
		{"numbered file as a whiteout", func(t *testing.T, f writerFixture, dir string) string {
			if f.layout != workload.Upper {
				return ""
			}
			name, _ := f.find(isLive)
			mknodWhiteout(t, filepath.Join(dir, name))
			return name + ": got a whiteout"
		}},
		{"opaque directory", func(t *testing.T, f writerFixture, dir string) string {
			if f.layout != workload.Upper {
				return ""
			}
			if err := unix.Setxattr(dir, "trusted.overlay.opaque", []byte("y"), 0); err != nil {
				t.Fatal(err)
			}
			return "is opaque"
		}},
		{"stray file", func(t *testing.T, f writerFixture, dir string) string {
			replaceFile(t, filepath.Join(dir, "stray"), []byte("x"))
			return "stray: got a file"
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			applied := 0
			for _, f := range fixtures {
				root := copyRoot(t, f.root)
				want := tc.mutate(t, f, filepath.Join(root, workload.Dir))
				if want == "" {
					continue
				}
				applied++
				_, err := workload.Verify(root, f.layout)
				if err == nil {
					t.Errorf("%s: accepted", f)
				} else if !strings.Contains(err.Error(), want) {
					t.Errorf("%s: the error does not say %q:\n%v", f, want, err)
				}
			}
			if applied == 0 {
				t.Fatal("no fixture has anything for this case to break")
			}
		})
	}
}

// testStepInFlight: every state between two steps (each op of step N+1
// done in turn, and those that can be half done, half done) passes as
// step N; the state after step N+1 passes as N+1.
func testStepInFlight(t *testing.T, fixtures []writerFixture) {
	for _, f := range fixtures {
		if f.layout != workload.Merged {
			continue // an op is the writer's own on a merged root
		}
		t.Run(fmt.Sprint(f.steps), func(t *testing.T) {
			root := copyRoot(t, f.root)
			dir := filepath.Join(root, workload.Dir)
			ops := f.model.Clone().Next()
			check := func(what string, want int) {
				t.Helper()
				n, err := workload.Verify(root, workload.Merged)
				if err != nil || n != want {
					t.Fatalf("%s: step %d, %v; want %d", what, n, err, want)
				}
			}
			check("before", f.steps)
			for _, op := range ops {
				p := filepath.Join(dir, op.Name)
				want := f.steps
				switch op.Kind {
				case workload.Create, workload.Overwrite:
					replaceFile(t, p, nil)
					check("half done: "+op.String(), f.steps)
					replaceFile(t, p, op.Content.Bytes())
				case workload.Append:
					replaceFile(t, p, op.Content.Bytes())
				case workload.Remove:
					if err := os.Remove(p); err != nil {
						t.Fatal(err)
					}
				case workload.Store:
					mp := filepath.Join(dir, workload.MmapName)
					data, err := os.ReadFile(mp)
					if err != nil {
						t.Fatal(err)
					}
					binary.NativeEndian.PutUint64(data[op.Slot*workload.SlotSize:], uint64(op.Step))
					replaceFile(t, mp, data)
				case workload.Log:
					appendLog(t, dir, fmt.Sprintln(op.Step))
					want = f.steps + 1
				}
				check("done: "+op.String(), want)
			}
		})
	}
}

// appendLog appends s to the log in dir, by replacing it.
func appendLog(t *testing.T, dir, s string) {
	t.Helper()
	p := filepath.Join(dir, workload.LogName)
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	replaceFile(t, p, append(data, s...))
}

func mustAtoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}
