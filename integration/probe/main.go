// Command probe measures, from inside a container, how long the container
// stalls: it spins reading the monotonic clock and remembers the longest
// gap between two consecutive iterations. On SIGUSR1 it writes
// "<seq> <longest gap> <second longest gap> <sum of gaps over 1 ms>\n"
// (ns) to -out (through a temporary file and a rename, so that a reader
// never sees half of it) and starts a new window.
// The file write is not part of any window.
//
// With -fill N it instead creates N files of 4-24 KiB under -dir and exits,
// to give a container's writable layer a known size quickly.
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
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	out := flag.String("out", "/probe.out", "file the longest gap is written to on SIGUSR1")
	fill := flag.Int("fill", 0, "create this many files under -dir and exit")
	dir := flag.String("dir", "/data", "directory for -fill")
	flag.Parse()
	if *fill > 0 {
		if err := fillDir(*dir, *fill); err != nil {
			fmt.Fprintln(os.Stderr, "probe:", err)
			os.Exit(1)
		}
		return
	}
	if err := spin(*out); err != nil {
		fmt.Fprintln(os.Stderr, "probe:", err)
		os.Exit(1)
	}
}

// fillDir writes n files whose sizes cycle through 4-24 KiB, deterministic
// content, 100 files per sub-directory.
func fillDir(dir string, n int) error {
	buf := make([]byte, 24<<10)
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
		size := (4 + (i*7)%21) << 10 // 4..24 KiB
		buf[0] = byte(i)
		if err := os.WriteFile(filepath.Join(sub, fmt.Sprintf("f%05d", i)), buf[:size], 0o644); err != nil {
			return err
		}
	}
	return nil
}

// spin is the measuring loop. The signal goroutine only raises a flag; the
// loop itself publishes the window and restarts the clock after the write.
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
	runtime.LockOSThread()
	var longest, second, lost time.Duration
	seq := 0
	last := time.Now()
	for {
		now := time.Now()
		gap := now.Sub(last)
		switch {
		case gap > longest:
			longest, second = gap, longest
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
			if err := publish(out, seq, longest, second, lost); err != nil {
				return err
			}
			longest, second, lost = 0, 0, 0
			last = time.Now()
		}
	}
}

func publish(out string, seq int, longest, second, lost time.Duration) error {
	tmp := out + ".tmp"
	if err := os.WriteFile(tmp, fmt.Appendf(nil, "%d %d %d %d\n", seq, longest, second, lost), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, out)
}
