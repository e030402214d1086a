// Command probe measures, from inside a container, how long the container
// stalls: it spins reading the monotonic clock and remembers the longest
// gap between two consecutive iterations. On SIGUSR1 it writes
// "<seq> <longest gap> <second longest gap> <sum of gaps over 1 ms>
// <end of the longest gap>\n" (ns; the end is CLOCK_MONOTONIC, which the
// host shares, so that the host can tell what its gap overlapped) to -out (through a temporary file and a rename, so that a reader
// never sees half of it) and starts a new window.
// The file write is not part of any window.
//
// With -fill N it instead creates N files of 4-24 KiB under -dir and exits,
// to give a container's writable layer a known size quickly. The hostile
// content test uses three more modes, each doing in a few syscalls a loop
// that would take a busybox shell minutes:
//
//   - -fill-names N creates N empty files e000000.. directly in -dir (one
//     huge directory) and exits.
//   - -deep N creates N nested directories with 255-byte names under -dir,
//     then a file "leaf" holding "deep leaf\n" at the bottom, and exits: a
//     path longer than PATH_MAX, made with *at calls from each level.
//   - -swap DIR:TARGET (repeatable) makes DIR.lnk a symlink to TARGET and
//     then, until killed, exchanges DIR and DIR.lnk (renameat2
//     RENAME_EXCHANGE), so that the name DIR keeps flipping between a
//     directory and a symlink: the race a capture that followed symlinks
//     or trusted a stat would lose.
//
// It is built statically (CGO_ENABLED=0) and added to the integration test
// image by BenchmarkPause.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	out := flag.String("out", "/probe.out", "file the longest gap is written to on SIGUSR1")
	fill := flag.Int("fill", 0, "create this many files under -dir and exit")
	fillSize := flag.Int("fill-size", 0, "size of each -fill file in bytes (0: 4-24 KiB, cycling)")
	fillNames := flag.Int("fill-names", 0, "create this many empty files directly in -dir and exit")
	deep := flag.Int("deep", 0, "create this many nested directories with 255-byte names under -dir and exit")
	dir := flag.String("dir", "/data", "directory for -fill, -fill-names and -deep")
	var swaps []swapPair
	flag.Func("swap", "DIR:TARGET: exchange DIR with a symlink to TARGET until killed (repeatable)", func(v string) error {
		d, target, ok := strings.Cut(v, ":")
		if !ok || d == "" || target == "" {
			return fmt.Errorf("want DIR:TARGET, got %q", v)
		}
		swaps = append(swaps, swapPair{dir: d, target: target})
		return nil
	})
	flag.Parse()
	var err error
	switch {
	case *fill > 0:
		err = fillDir(*dir, *fill, *fillSize)
	case *fillNames > 0:
		err = fillNamesDir(*dir, *fillNames)
	case *deep > 0:
		err = deepDirs(*dir, *deep)
	case len(swaps) > 0:
		err = swap(swaps)
	default:
		err = spin(*out)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "probe:", err)
		os.Exit(1)
	}
}

// fillNamesDir creates n empty files in dir itself.
func fillNamesDir(dir string, n int) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	dfd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: dir, Err: err}
	}
	defer unix.Close(dfd)
	for i := range n {
		name := fmt.Sprintf("e%06d", i)
		fd, err := unix.Openat(dfd, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o644)
		if err != nil {
			return &os.PathError{Op: "create", Path: filepath.Join(dir, name), Err: err}
		}
		unix.Close(fd)
	}
	return nil
}

// deepDirs creates depth nested directories under dir, each named with
// 255 "d"s (the longest a name can be), and a file "leaf" in the last.
// Each level is made relative to the previous one's descriptor: the full
// path would be too long for any path call.
func deepDirs(dir string, depth int) error {
	deepName := strings.Repeat("d", 255)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: dir, Err: err}
	}
	for i := range depth {
		if err := unix.Mkdirat(fd, deepName, 0o755); err != nil {
			unix.Close(fd)
			return fmt.Errorf("mkdir at level %d: %w", i+1, err)
		}
		next, err := unix.Openat(fd, deepName, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("open level %d: %w", i+1, err)
		}
		fd = next
	}
	defer unix.Close(fd)
	leaf, err := unix.Openat(fd, "leaf", unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return fmt.Errorf("create leaf: %w", err)
	}
	defer unix.Close(leaf)
	_, err = unix.Write(leaf, []byte("deep leaf\n"))
	return err
}

type swapPair struct{ dir, target string }

// swap flips each pair's directory with a symlink to its target, as fast
// as one CPU allows, until the process is killed. The exchange is atomic:
// at every instant the name is either the directory or the symlink.
func swap(pairs []swapPair) error {
	runtime.GOMAXPROCS(1) // one core for the race; the capture needs the other
	for _, p := range pairs {
		if err := os.Symlink(p.target, p.dir+".lnk"); err != nil {
			return err
		}
	}
	for {
		for _, p := range pairs {
			if err := unix.Renameat2(unix.AT_FDCWD, p.dir, unix.AT_FDCWD, p.dir+".lnk", unix.RENAME_EXCHANGE); err != nil {
				return fmt.Errorf("exchange %s and %s.lnk: %w", p.dir, p.dir, err)
			}
		}
	}
}

// fillDir writes n files of size bytes, or whose sizes cycle through 4-24
// KiB when size is 0, with deterministic content, 100 files per
// sub-directory.
func fillDir(dir string, n, size int) error {
	buf := make([]byte, max(size, 24<<10))
	for i := range buf {
		buf[i] = byte(i*7 + i>>8)
	}
	for i := range n {
		sub := filepath.Join(dir, fmt.Sprintf("d%03d", i/100))
		if i%100 == 0 {
			if err := os.MkdirAll(sub, 0o755); err != nil {
				return err
			}
		}
		n := size
		if n == 0 {
			n = (4 + (i*7)%21) << 10 // 4..24 KiB
		}
		buf[0] = byte(i)
		if err := os.WriteFile(filepath.Join(sub, fmt.Sprintf("f%05d", i)), buf[:n], 0o644); err != nil {
			return err
		}
	}
	return nil
}

// spin is the measuring loop. The signal goroutine only raises a flag; the
// loop itself publishes the window and restarts the clock after the write.
//
// The loop's goroutine is not locked to its thread. The runtime preempts
// a goroutine that has run for 10 ms (and the signal goroutine needs the
// one P); a locked goroutine then hands its P to another thread and
// sleeps until that thread hands it back, two wake-ups that waited for a
// CPU on a busy host and showed up as stalls that no freeze caused. An
// unlocked one is picked up again by the same thread.
func spin(out string) error {
	runtime.GOMAXPROCS(1)
	var requested atomic.Bool
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGUSR1)
	go func() {
		for range sigs {
			requested.Store(true)
		}
	}()
	var longest, second, lost time.Duration
	var longestEnd int64
	seq := 0
	last := time.Now()
	for {
		now := time.Now()
		gap := now.Sub(last)
		switch {
		case gap > longest:
			longest, second = gap, longest
			longestEnd = monotonic()
		case gap > second:
			second = gap
		}
		if gap > time.Millisecond {
			lost += gap
		}
		last = now
		if requested.Load() {
			requested.Store(false)
			seq++
			if err := publish(out, seq, longest, second, lost, longestEnd); err != nil {
				return err
			}
			longest, second, lost = 0, 0, 0
			last = time.Now()
		}
	}
}

func publish(out string, seq int, longest, second, lost time.Duration, longestEnd int64) error {
	tmp := out + ".tmp"
	if err := os.WriteFile(tmp, fmt.Appendf(nil, "%d %d %d %d %d\n", seq, longest, second, lost, longestEnd), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, out)
}

// monotonic reads CLOCK_MONOTONIC in ns (Go's monotonic readings are
// relative to the process's start, not to the host's clock).
func monotonic() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0
	}
	return ts.Nano()
}
