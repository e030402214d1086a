//go:build linux

package capture

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
	"golang.org/x/sys/unix"
)

// TestConcurrentWriters runs pre-copy rounds while a writer creates,
// rewrites, renames and deletes files and directories, and an attacker
// keeps swapping a directory for a symlink to / or to a canary outside
// the tree, a file for a symlink to the canary, and a file for a fifo.
// No round may fail, nothing outside the source may be opened, and once
// the writers stop, Final must produce an exact copy.
func TestConcurrentWriters(t *testing.T) {
	testutil.RequireRoot(t)
	for _, track := range []bool{false, true} {
		for _, workers := range []int{1, 4} {
			t.Run(fmt.Sprintf("track=%v/workers=%d", track, workers), func(t *testing.T) { testConcurrentWriters(t, workers, track) })
		}
	}
}

func testConcurrentWriters(t *testing.T, workers int, track bool) {
	base := t.TempDir()
	src, dst, outside := filepath.Join(base, "src"), filepath.Join(base, "dst"), filepath.Join(base, "outside")
	canary := filepath.Join(outside, "canary")
	must(t, os.MkdirAll(canary, 0o755))
	writeFile(t, filepath.Join(canary, "secret"), []byte("CANARY-"+string(randBytes(32))), 0o644)
	p := func(rel string) string { return filepath.Join(src, rel) }
	const dirs, files = 4, 50
	for d := 0; d < dirs; d++ {
		must(t, os.MkdirAll(p(fmt.Sprintf("d%d", d)), 0o755))
		for f := 0; f < files; f++ {
			writeFile(t, p(fmt.Sprintf("d%d/f%02d", d, f)), randBytes(rand.IntN(32<<10)), 0o644)
		}
	}
	must(t, os.Mkdir(p("swap"), 0o755))
	writeFile(t, p("swap/inside"), []byte("inside swap"), 0o644)
	writeFile(t, p("victim"), []byte("victim"), 0o644)
	writeFile(t, p("victim2"), []byte("victim2"), 0o644)
	outsideBefore := listing(t, outside)
	checkCanary := watchCanary(t, canary) // from here on, nothing may touch it

	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var writerErr error
	var mu sync.Mutex
	fail := func(err error) {
		if err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, os.ErrExist) && !errors.Is(err, unix.ENOTEMPTY) {
			mu.Lock()
			writerErr = errors.Join(writerErr, err)
			mu.Unlock()
		}
	}
	var ops [2]int // written by one goroutine each, read after wg.Wait
	wg.Add(2)
	go func() { // the workload
		defer wg.Done()
		r := rand.New(rand.NewPCG(1, 2))
		for ctx.Err() == nil {
			ops[0]++
			d, f := r.IntN(dirs), r.IntN(files)
			name := p(fmt.Sprintf("d%d/f%02d", d, f))
			switch r.IntN(6) {
			case 0, 1:
				fail(os.WriteFile(name, randBytes(r.IntN(64<<10)), 0o644))
			case 2:
				fail(os.Rename(name, p(fmt.Sprintf("d%d/f%02d", r.IntN(dirs), r.IntN(files)))))
			case 3:
				fail(os.Remove(name))
			case 4:
				sub := p(fmt.Sprintf("d%d/sub%d", d, f%3))
				if err := os.Mkdir(sub, 0o755); err == nil {
					fail(os.WriteFile(filepath.Join(sub, "x"), randBytes(100), 0o600))
				} else {
					fail(os.RemoveAll(sub))
				}
			case 5:
				if fd, err := unix.Open(name, unix.O_WRONLY|unix.O_CREAT, 0o644); err == nil {
					unix.Pwrite(fd, []byte("hole after this"), int64(r.IntN(1<<30)))
					unix.Close(fd)
				}
			}
		}
	}()
	go func() { // the attacker
		defer wg.Done()
		targets := []string{"/", canary}
		for i := 0; ctx.Err() == nil; i++ {
			ops[1]++
			fail(os.Rename(p("swap"), p("swap.away")))
			fail(os.Symlink(targets[i%2], p("swap")))
			fail(os.Rename(p("victim"), p("victim.away")))
			fail(os.Symlink(filepath.Join(canary, "secret"), p("victim")))
			fail(os.Rename(p("victim2"), p("victim2.away")))
			fail(unix.Mkfifo(p("victim2"), 0o644))
			time.Sleep(50 * time.Microsecond)
			fail(os.Remove(p("swap")))
			fail(os.Rename(p("swap.away"), p("swap")))
			fail(os.Remove(p("victim")))
			fail(os.Rename(p("victim.away"), p("victim")))
			fail(os.Remove(p("victim2")))
			fail(os.Rename(p("victim2.away"), p("victim2")))
		}
	}()

	c := newCopier(t, src, dst, Options{Workers: workers, TrackChanges: track})
	for i := 0; i < 8; i++ {
		st, err := c.PreCopy(context.Background())
		if err != nil {
			stop()
			wg.Wait()
			t.Fatalf("PreCopy %d: %v", i, err)
		}
		t.Logf("PreCopy %d: %+v", i, st)
		if st.Entries > 1000 {
			t.Errorf("PreCopy %d examined %d entries: it left the tree", i, st.Entries)
		}
		forEachFile(t, dst, func(rel string, data []byte) {
			if bytes.Contains(data, []byte("CANARY-")) {
				t.Errorf("after PreCopy %d, %s holds the canary", i, rel)
			}
		})
	}
	stop()
	wg.Wait()
	must(t, writerErr)
	t.Logf("writer: %d operations, attacker: %d swaps", ops[0], ops[1])

	fin, err := c.Final(context.Background(), nil)
	must(t, err)
	t.Logf("Final: %+v", fin)
	compareTrees(t, src, dst)
	checkCanary()
	if after := listing(t, outside); after != outsideBefore {
		t.Errorf("the canary changed")
	}

	// Rounds after a clean one visit only what changed since.
	converge(t, c)
	writeFile(t, p("d1/f07"), []byte("after the storm"), 0o644)
	must(t, os.Rename(p("d2"), p("d2.moved")))
	must(t, os.Remove(p("victim")))
	fin, err = c.Final(context.Background(), nil)
	must(t, err)
	t.Logf("Final: %+v", fin)
	compareTrees(t, src, dst)
	if fin.Tracked != track {
		t.Errorf("Final after quiet rounds: Tracked = %v, want %v", fin.Tracked, track)
	}
}

// TestFinalDetectsChanges: a source that changes during Final means the
// writers were not frozen; Final says so instead of returning a capture
// that is not point in time. (A change between rounds is, of course, fine.)
func TestFinalDetectsChanges(t *testing.T) {
	testutil.RequireRoot(t)
	for _, track := range []bool{false, true} {
		t.Run(fmt.Sprintf("track=%v", track), func(t *testing.T) { testFinalDetectsChanges(t, track) })
	}
}

func testFinalDetectsChanges(t *testing.T, track bool) {
	base := t.TempDir()
	src, dst := filepath.Join(base, "src"), filepath.Join(base, "dst")
	must(t, os.Mkdir(src, 0o755))
	for i := 0; i < 2000; i++ {
		writeFile(t, filepath.Join(src, fmt.Sprintf("f%04d", i)), []byte("x"), 0o644)
	}
	c := newCopier(t, src, dst, Options{TrackChanges: track})
	_, err := c.PreCopy(context.Background())
	must(t, err)
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { // not frozen: keeps deleting and recreating
		defer close(done)
		for i := 0; ctx.Err() == nil; i = (i + 1) % 2000 {
			f := filepath.Join(src, fmt.Sprintf("f%04d", i))
			os.Remove(f)
			os.WriteFile(f, []byte("y"), 0o644)
		}
	}()
	stopWriter := func() { stop(); <-done }
	defer stopWriter() // also on t.Fatal, before TempDir's cleanup runs
	// The writer may not get a CPU while a short round runs (a loaded
	// machine): each round also changes a file itself, after the round
	// has started, as a writer that was not frozen would.
	c.raceHook = func(int, string) { os.WriteFile(filepath.Join(src, "during"), []byte("z"), 0o644) }
	var sawIt bool
	for i := 0; i < 50 && !sawIt; i++ {
		// Something for the round to visit, in a file the writer leaves alone.
		writeFile(t, filepath.Join(src, "visit"), []byte(fmt.Sprint(i)), 0o644)
		_, err = c.Final(context.Background(), nil)
		sawIt = errors.Is(err, ErrSourceChanged)
		if err != nil && !sawIt {
			t.Fatalf("Final: %v", err)
		}
	}
	stopWriter()
	c.raceHook = nil
	if !sawIt {
		t.Fatal("Final never noticed the source changing under it")
	}
	// Once quiet, the Copier recovers.
	_, err = c.Final(context.Background(), nil)
	must(t, err)
	compareTrees(t, src, dst)
}
