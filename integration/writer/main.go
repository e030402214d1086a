//go:build linux

// Command writer is the point-in-time workload of the commit tests: in a
// directory that holds the image's base files (workload.Base), it runs the
// steps internal/testutil/workload defines (create numbered files,
// overwrite and delete some, append to, delete and re-create base files,
// store the step in a shared writable mmap, append the step to a log), as
// fast as it can and without fsync or msync, so that a capture taken at
// any instant can be checked against the one state the writer was in.
//
// On any error it prints it to stderr and exits 1: a test that finds the
// writer still running knows that it never saw one. With -steps it stops
// after that many steps and exits 0.
//
// It is built statically (CGO_ENABLED=0) and added to the integration test
// image as /bin/writer (testimage.WithWriter).
package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil/workload"
)

func main() {
	dir := flag.String("dir", workload.Dir, "directory holding the base files, to write in")
	steps := flag.Int("steps", 0, "stop after this many steps (0: run until killed)")
	pause := flag.Duration("sleep", 0, "sleep this long after each step")
	flag.Parse()
	// One goroutine does all the work: keep the runtime to one CPU too,
	// leaving the others to whatever captures the writer's state.
	runtime.GOMAXPROCS(1)
	if err := run(*dir, *steps, *pause); err != nil {
		fmt.Fprintln(os.Stderr, "writer:", err)
		os.Exit(1)
	}
}

// writer performs ops in one directory.
type writer struct {
	dir     string
	log     int // descriptor, O_APPEND
	logPath string
	mmap    []byte
}

func run(dir string, steps int, pause time.Duration) error {
	w, err := start(dir)
	if err != nil {
		return err
	}
	m := workload.NewModel()
	for steps == 0 || m.Step() < steps {
		for _, op := range m.Next() {
			if err := w.do(op); err != nil {
				return fmt.Errorf("%s: %w", op, err)
			}
		}
		if pause > 0 {
			time.Sleep(pause)
		}
	}
	return nil
}

// start checks that dir holds the image's base files and nothing of an
// earlier run, then makes the mmap file, maps it, and makes the log: the
// log last, so that a state with a log has the mmap file too.
func start(dir string) (*writer, error) {
	for _, b := range workload.Base() {
		data, err := os.ReadFile(filepath.Join(dir, b.Name))
		if err != nil {
			return nil, fmt.Errorf("the image's base files: %w", err)
		}
		if !bytes.Equal(data, b.Data) {
			return nil, fmt.Errorf("base file %s has other data than workload.Base's", b.Name)
		}
	}
	// O_EXCL: a second writer, or a restarted one, would not match the
	// model; fail instead.
	f, err := os.OpenFile(filepath.Join(dir, workload.MmapName), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := f.Truncate(workload.MmapSize); err != nil {
		return nil, err
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, workload.MmapSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap %s: %w", f.Name(), err)
	}
	logPath := filepath.Join(dir, workload.LogName)
	log, err := unix.Open(logPath, unix.O_WRONLY|unix.O_APPEND|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return nil, pathError("open", logPath, err)
	}
	return &writer{dir: dir, log: log, logPath: logPath, mmap: mem}, nil
}

// do performs op with the system calls the workload defines, and no
// others: raw calls rather than os.File, whose bookkeeping (the poller,
// fcntl) would double the calls per step and slow the writer down.
func (w *writer) do(op workload.Op) error {
	p := filepath.Join(w.dir, op.Name)
	switch op.Kind {
	case workload.Create:
		return writeFile(p, unix.O_CREAT|unix.O_EXCL, op.Content.Bytes())
	case workload.Overwrite:
		return writeFile(p, unix.O_TRUNC, op.Content.Bytes())
	case workload.Append:
		return writeFile(p, unix.O_APPEND, op.Content.TailBytes())
	case workload.Remove:
		return pathError("unlink", p, unix.Unlink(p))
	case workload.Store:
		// One aligned 8-byte store: a freeze cannot stop the writer
		// between the bytes of a step number.
		atomic.StoreUint64((*uint64)(unsafe.Pointer(&w.mmap[op.Slot*workload.SlotSize])), uint64(op.Step))
		return nil
	case workload.Log:
		return writeOnce(w.log, w.logPath, []byte(strconv.Itoa(op.Step)+"\n"))
	}
	return fmt.Errorf("unknown op kind %d", op.Kind)
}

// writeFile opens p for writing with flag, writes data with one write(2)
// and closes it.
func writeFile(p string, flag int, data []byte) error {
	fd, err := unix.Open(p, unix.O_WRONLY|unix.O_CLOEXEC|flag, 0o644)
	if err != nil {
		return pathError("open", p, err)
	}
	err = writeOnce(fd, p, data)
	if cerr := unix.Close(fd); err == nil {
		err = pathError("close", p, cerr)
	}
	return err
}

// writeOnce writes data with one write(2): a short write would leave a
// state that the workload does not define, so it is an error.
func writeOnce(fd int, p string, data []byte) error {
	n, err := unix.Write(fd, data)
	for errors.Is(err, unix.EINTR) {
		n, err = unix.Write(fd, data)
	}
	if err != nil {
		return pathError("write", p, err)
	}
	if n != len(data) {
		return fmt.Errorf("write %s: short write of %d of %d bytes", p, n, len(data))
	}
	return nil
}

func pathError(op, p string, err error) error {
	if err == nil {
		return nil
	}
	return &os.PathError{Op: op, Path: p, Err: err}
}
