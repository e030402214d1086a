//go:build linux

package convert

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/errdefs"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/sched"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
	"github.com/seamless-snapshotter/seamless-snapshotter/overlay/layer"
)

// spinHelperEnv makes the test binary a process that keeps every CPU
// busy until its standard input closes: the containers of a busy host.
const spinHelperEnv = "SEAMLESS_CONVERT_TEST_SPIN"

func TestMain(m *testing.M) {
	// The background class's layer builder is this test binary,
	// re-executed.
	MaybeRunLayerBuilder()
	if os.Getenv(spinHelperEnv) == "1" {
		for range runtime.NumCPU() {
			go func() {
				for {
				}
			}()
		}
		os.Stdout.WriteString("ready\n")
		_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// backgroundClass is the daemon's background class for a test: nice 19
// and, with cgroup v1, an idle cpu cgroup of this name, removed at the
// end.
func backgroundClass(t *testing.T, cgroup string) sched.Class {
	class := sched.Class{Nice: 19}
	if cgroups.Mode() == cgroups.Unified {
		t.Log("cgroup v2: the class is nice 19 only")
		return class
	}
	dir, err := sched.BackgroundCgroup(cgroup)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(dir) })
	class.Cgroup = dir
	return class
}

// testUpper makes an upper directory of n files holding about size bytes
// in all, half of them incompressible, so that a builder's output fills
// its pipe and it is still running when its first bytes arrive.
func testUpper(t *testing.T, n, size int) string {
	t.Helper()
	upper := t.TempDir()
	for i := range n {
		data := layerData(uint64(i), size/n)
		if i%2 == 0 {
			for j := range data {
				data[j] = byte(uint64(j*2654435761+i) >> 7)
			}
		}
		if err := os.WriteFile(filepath.Join(upper, fmt.Sprintf("f%03d", i)), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return upper
}

// inspectingWriter runs inspect once, at the first write, then passes
// writes on to w.
type inspectingWriter struct {
	w       io.Writer
	inspect func()
	done    bool
}

func (iw *inspectingWriter) Write(b []byte) (int, error) {
	if !iw.done {
		iw.done = true
		iw.inspect()
	}
	return iw.w.Write(b)
}

func noWait(context.Context) error { return nil }

// TestBuildLayerProcess: a layer built by a builder process of the
// background class is the same blob, byte for byte, as one built in the
// daemon, for each compression, with mtimes clamped and as the changes
// from a previous capture; one builder process serves every job; every
// thread of it runs at the class's nice value and, with cgroup v1, in its
// cgroup; the progress ends at the tar's size; and no process is left
// once the pool is closed.
func TestBuildLayerProcess(t *testing.T) {
	testutil.RequireRoot(t) // layer.Write reads trusted.* xattrs
	class := backgroundClass(t, "seamless-convert-test")
	upper := testUpper(t, 24, 12<<20)
	previous := t.TempDir()
	if err := os.WriteFile(filepath.Join(previous, "f000"), []byte("older"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(previous, "gone"), []byte("deleted since"), 0o644); err != nil {
		t.Fatal(err)
	}
	clamp := time.Unix(1_700_000_000, 0)
	pool := testPool(t, class, time.Minute)
	var pids []int
	for _, tc := range []struct {
		name string
		c    Compression
		opts layer.Options
	}{
		{"gzip", CompressionGzip, layer.Options{}},
		{"zstd", CompressionZstd, layer.Options{ModTime: &clamp}},
		{"none/changes", CompressionNone, layer.Options{Previous: previous}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantBlob, want := daemonLayer(t, upper, tc.c, tc.opts)
			var got bytes.Buffer
			var threads []testutil.ProcClass
			dst := &inspectingWriter{w: &got, inspect: func() {
				for _, p := range builders(t) {
					threads = append(threads, testutil.Threads(t, p.Pid)...)
				}
			}}
			prog := newProgress(0, noWait)
			gotBlob, diskBytes, err := buildLayerProcess(context.Background(), dst, upper, tc.opts, tc.c, 0, pool, prog, builderStarvedAfter)
			if err != nil {
				t.Fatal(err)
			}
			if gotBlob != wantBlob || !bytes.Equal(got.Bytes(), want) {
				t.Errorf("blob from the builder = %+v (%d bytes); in the daemon %+v (%d bytes)", gotBlob, got.Len(), wantBlob, len(want))
			}
			if wantDisk := diskUsage(context.Background(), upper); diskBytes != wantDisk || diskBytes == 0 {
				t.Errorf("disk usage from the builder = %d; a walk in the daemon finds %d", diskBytes, wantDisk)
			}
			if done := prog.done.Load(); done > wantBlob.UncompressedSize || done < wantBlob.UncompressedSize-builderProgressStep {
				t.Errorf("progress %d at the end; want within %d of the tar's %d", done, builderProgressStep, wantBlob.UncompressedSize)
			}
			if len(threads) < 2 {
				t.Fatalf("threads of the builder at its first bytes: %+v; want its runtime's", threads)
			}
			for _, pc := range threads {
				if pc.Nice != class.Nice {
					t.Errorf("builder thread %d: nice %d; want %d", pc.Pid, pc.Nice, class.Nice)
				}
				if want := "/" + filepath.Base(class.Cgroup); class.Cgroup != "" && pc.Cgroup != want {
					t.Errorf("builder thread %d: cpu cgroup %q; want %q", pc.Pid, pc.Cgroup, want)
				}
			}
			pids = append(pids, onlyBuilder(t))
		})
	}
	if len(slices.Compact(slices.Clone(pids))) != 1 {
		t.Errorf("builder processes of the jobs in turn: %v; want one for all", pids)
	}
}

// TestBuildLayerProcessStarved: a builder that gets no CPU (here a
// process spins on every CPU at the daemon's priority, as the containers
// of a busy host do) reports nothing for the starvation period, is taken
// out of its class, and its layer comes out whole and in time; one that
// is stopped instead (as one held up by its pipe is not running either)
// is not starved, and stays in its class.
func TestBuildLayerProcessStarved(t *testing.T) {
	testutil.RequireRoot(t)
	class := backgroundClass(t, "seamless-convert-starved-test")
	own := testutil.Threads(t, os.Getpid())[0]
	upper := testUpper(t, 8, 4<<20)
	wantBlob, want := daemonLayer(t, upper, CompressionGzip, layer.Options{})
	const starvedAfter = 300 * time.Millisecond
	// inClass reports whether every thread of pid is in class (true) or
	// in the test's own (false); ok is false for a mix or no threads.
	inClass := func(pid int) (in, ok bool, threads []testutil.ProcClass) {
		threads = testutil.Threads(t, pid)
		var nIn, nOwn int
		for _, th := range threads {
			switch {
			case th.Nice == class.Nice && (class.Cgroup == "" || th.Cgroup == "/"+filepath.Base(class.Cgroup)):
				nIn++
			case th.Nice == own.Nice && th.Cgroup == own.Cgroup:
				nOwn++
			}
		}
		return nIn == len(threads), len(threads) > 0 && (nIn == len(threads) || nOwn == len(threads)), threads
	}
	build := func(pool *builderPool) (pid int, done <-chan error, got *bytes.Buffer) {
		ch := make(chan error, 1)
		got = new(bytes.Buffer)
		go func() {
			blob, _, err := buildLayerProcess(context.Background(), got, upper, layer.Options{}, CompressionGzip, 0, pool, newProgress(0, noWait), starvedAfter)
			if err == nil && blob != wantBlob {
				err = fmt.Errorf("blob %+v, want %+v", blob, wantBlob)
			}
			ch <- err
		}()
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
			if procs := builders(t); len(procs) > 0 {
				return procs[0].Pid, ch, got
			}
			if time.Now().After(deadline) {
				t.Fatal("no layer builder started")
			}
		}
	}

	t.Run("starved", func(t *testing.T) {
		pool := testPool(t, class, time.Minute)
		testutil.StartHelper(t, spinHelperEnv+"=1")
		start := time.Now()
		pid, done, got := build(pool)
		promoted := false
		giveUp := time.After(30 * time.Second)
		for waiting := true; waiting; {
			select {
			case <-giveUp:
				t.Fatalf("starved builder not done after 30s (seen out of its class: %t)", promoted)
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
				waiting = false
			case <-time.After(5 * time.Millisecond):
				if in, ok, _ := inClass(pid); ok && !in {
					promoted = true
				}
			}
		}
		took := time.Since(start)
		t.Logf("starved builder: done in %s, seen out of its class: %t", took.Round(time.Millisecond), promoted)
		// In the idle class beside the spinners, it would get about a
		// thousandth of the CPU: minutes.
		if took > 20*time.Second || !promoted {
			t.Errorf("starved builder took %s, seen out of its class: %t; want it moved out and done within 20s", took, promoted)
		}
		if !bytes.Equal(got.Bytes(), want) {
			t.Errorf("blob of the starved builder: %d bytes differ from the daemon's %d", got.Len(), len(want))
		}
		// Out of its class, it must not serve another job: retired.
		requireNoBuilder(t)
	})

	t.Run("stopped", func(t *testing.T) {
		pool := testPool(t, class, time.Minute)
		pid, done, got := build(pool)
		if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * starvedAfter)
		in, _, threads := inClass(pid)
		if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		if !in {
			t.Errorf("stopped builder's threads %+v; want them still in the class (nice %d, cgroup %q)", threads, class.Nice, class.Cgroup)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got.Bytes(), want) {
			t.Errorf("blob of the stopped builder: %d bytes differ from the daemon's %d", got.Len(), len(want))
		}
		// Still in its class, it waits for the next job.
		if got := onlyBuilder(t); got != pid {
			t.Errorf("builder after the job: %d; want %d, kept for the next", got, pid)
		}
	})
}

// TestBuildLayerProcessFails: what the user sees when a builder cannot
// build, dies, or its blob cannot be delivered; the error class decides
// whether the job is tried again. No builder is left behind.
func TestBuildLayerProcessFails(t *testing.T) {
	testutil.RequireRoot(t)
	class := sched.Class{Nice: 19}
	upper := testUpper(t, 8, 8<<20)
	wh := t.TempDir()
	if err := os.WriteFile(filepath.Join(wh, ".wh.name"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	small := testUpper(t, 2, 64<<10)
	_, smallWant := daemonLayer(t, small, CompressionGzip, layer.Options{})
	errBoom := errors.New("boom")
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name  string
		ctx   context.Context
		upper string
		c     Compression
		dst   func() io.Writer
		check func(error) bool
		want  string
	}{{
		name: "layer that no image can hold", ctx: context.Background(), upper: wh, c: CompressionGzip,
		dst:   func() io.Writer { return io.Discard },
		check: errdefs.IsNotImplemented, want: ".wh.",
	}, {
		name: "upper gone", ctx: context.Background(), upper: filepath.Join(upper, "missing"), c: CompressionGzip,
		dst:   func() io.Writer { return io.Discard },
		check: func(err error) bool { return err != nil && !errdefs.IsUnavailable(err) }, want: "missing",
	}, {
		name: "builder killed", ctx: context.Background(), upper: upper, c: CompressionZstd,
		dst: func() io.Writer {
			return &inspectingWriter{w: io.Discard, inspect: func() {
				for _, p := range builders(t) {
					syscall.Kill(p.Pid, syscall.SIGKILL)
				}
			}}
		},
		check: errdefs.IsUnavailable, want: "signal: killed",
	}, {
		name: "destination fails", ctx: context.Background(), upper: upper, c: CompressionGzip,
		dst:   func() io.Writer { return failWriter{errBoom} },
		check: func(err error) bool { return errors.Is(err, errBoom) }, want: "boom",
	}, {
		name: "canceled", ctx: canceled, upper: upper, c: CompressionGzip,
		dst:   func() io.Writer { return io.Discard },
		check: func(err error) bool { return errors.Is(err, context.Canceled) }, want: "canceled",
	}, {
		name: "unknown compression", ctx: context.Background(), upper: upper, c: "lz4",
		dst:   func() io.Writer { return io.Discard },
		check: errdefs.IsInvalidArgument, want: "lz4",
	}} {
		t.Run(tc.name, func(t *testing.T) {
			pool := testPool(t, class, time.Minute)
			blob, _, err := buildLayerProcess(tc.ctx, tc.dst(), tc.upper, layer.Options{}, tc.c, 0, pool, newProgress(0, noWait), builderStarvedAfter)
			if !tc.check(err) || !strings.Contains(fmt.Sprint(err), tc.want) || blob != (Blob{}) {
				t.Fatalf("buildLayerProcess = %+v, %v; want an error of the right class that says %q", blob, err, tc.want)
			}
			t.Logf("error: %v", err)
			// Whatever failed, the next job is built whole: by the same
			// builder if the failure was the layer's, by a new one if
			// the builder was killed.
			var got bytes.Buffer
			if _, _, err := buildLayerProcess(context.Background(), &got, small, layer.Options{}, CompressionGzip, 0, pool, newProgress(0, noWait), builderStarvedAfter); err != nil || !bytes.Equal(got.Bytes(), smallWant) {
				t.Fatalf("the next job: %v, %d bytes; want the %d bytes of the layer", err, got.Len(), len(smallWant))
			}
		})
	}
}

// daemonLayer is upper's layer with compression c, built in this process
// as the daemon builds it without a builder: what a builder's blob must
// be, byte for byte.
func daemonLayer(t *testing.T, upper string, c Compression, opts layer.Options) (Blob, []byte) {
	t.Helper()
	var buf bytes.Buffer
	blob, err := CompressLayer(context.Background(), &buf, c, 0, func(w io.Writer) error {
		_, err := layer.Write(context.Background(), w, upper, opts)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return blob, buf.Bytes()
}

// builders returns this process's layer builder children.
func builders(t *testing.T) []testutil.ProcClass {
	t.Helper()
	return testutil.Children(t, os.Getpid(), builderArg0)
}

// requireNoBuilder fails the test if a builder child is left once
// retired builders have had the time to exit.
func requireNoBuilder(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(builderExitWait + time.Second)
	for {
		procs := builders(t)
		if len(procs) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("layer builder processes left: %+v", procs)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// testPool is a builder pool of class for one test: closed at its end,
// when no builder may be left.
func testPool(t *testing.T, class sched.Class, idleAfter time.Duration) *builderPool {
	pool := newBuilderPool(class, idleAfter)
	t.Cleanup(func() {
		pool.Close()
		requireNoBuilder(t)
	})
	return pool
}

// onlyBuilder returns the pid of this process's one layer builder.
func onlyBuilder(t *testing.T) int {
	t.Helper()
	procs := builders(t)
	if len(procs) != 1 {
		t.Fatalf("layer builder processes %+v; want one", procs)
	}
	return procs[0].Pid
}

// TestBuilderPool: a builder process serves job after job, and is retired
// when it has been idle too long or the pool closes; one that dies while
// idle is replaced, and the job it would have served is built whole.
func TestBuilderPool(t *testing.T) {
	testutil.RequireRoot(t)
	class := backgroundClass(t, "seamless-convert-pool-test")
	upper := testUpper(t, 4, 256<<10)
	_, want := daemonLayer(t, upper, CompressionZstd, layer.Options{})
	job := func(t *testing.T, pool *builderPool) int {
		t.Helper()
		var got bytes.Buffer
		if _, _, err := buildLayerProcess(context.Background(), &got, upper, layer.Options{}, CompressionZstd, 0, pool, newProgress(0, noWait), builderStarvedAfter); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got.Bytes(), want) {
			t.Fatalf("blob: %d bytes, differing from the daemon's %d", got.Len(), len(want))
		}
		return onlyBuilder(t)
	}

	t.Run("reused", func(t *testing.T) {
		pool := testPool(t, class, time.Minute)
		first := job(t, pool)
		for range 3 {
			if pid := job(t, pool); pid != first {
				t.Fatalf("builder of a later job: %d; want %d, the first's", pid, first)
			}
		}
	})
	t.Run("retired when idle", func(t *testing.T) {
		const idleAfter = 200 * time.Millisecond
		pool := testPool(t, class, idleAfter)
		job(t, pool)
		start := time.Now()
		requireNoBuilder(t)
		if took := time.Since(start); took > idleAfter+2*time.Second {
			t.Errorf("idle builder gone after %s; want about %s", took, idleAfter)
		}
		job(t, pool) // a new one
	})
	t.Run("dies while idle", func(t *testing.T) {
		pool := testPool(t, class, time.Minute)
		first := job(t, pool)
		if err := syscall.Kill(first, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		// Until the pool has seen the death: one that comes while a job
		// is sent fails that job, which the job's next try redoes.
		seen := func() bool {
			pool.mu.Lock()
			defer pool.mu.Unlock()
			return len(pool.idle) == 1 && !pool.idle[0].alive()
		}
		for deadline := time.Now().Add(5 * time.Second); !seen(); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("the pool did not see its idle builder die")
			}
		}
		if pid := job(t, pool); pid == first {
			t.Fatalf("builder after the first was killed: %d, the same", pid)
		}
	})
	t.Run("closed", func(t *testing.T) {
		pool := newBuilderPool(class, time.Minute)
		job(t, pool)
		pool.Close()
		requireNoBuilder(t)
		// A job after Close still runs, on a builder retired at its end.
		job(t, pool)
		requireNoBuilder(t)
	})
}
