//go:build linux

package convert

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/sched"
	"github.com/seamless-snapshotter/seamless-snapshotter/overlay/layer"
)

// builderArg0 is the argv[0] of a layer builder process: the program
// re-executed (/proc/self/exe, as containerd and moby do for their
// helpers), which MaybeRunLayerBuilder turns into a builder.
const builderArg0 = "seamless-layer-builder"

// Limits of what a builder reports.
const (
	// builderProgressStep is how many tar bytes pass between two
	// progress reports.
	builderProgressStep = 1 << 20
	// stderrLimit bounds what is kept of a builder's standard error: its
	// last words, for the error of a failed job.
	stderrLimit = 4 << 10
	// builderStarvedAfter is how long a builder may go without a report,
	// waiting for a CPU, before the daemon takes it out of the background
	// class. On a host whose containers keep every CPU busy, that class
	// gets next to nothing, and the image must still be published; a
	// builder that runs reads and compresses a MiB well within it.
	builderStarvedAfter = 10 * time.Second
)

// builderStatus is a line a builder writes on its status pipe (fd 3):
// progress while it writes the tar, then, last, the outcome.
type builderStatus struct {
	// Progress is how many bytes of the tar are written so far.
	Progress int64 `json:"progress,omitempty"`
	Done     bool  `json:"done,omitempty"`
	Blob     Blob  `json:"blob"`
	// DiskBytes is the disk space the upper's files use (the commit's
	// CaptureDiskBytes), measured here rather than by a walk in the
	// daemon; 0 when unknown.
	DiskBytes int64 `json:"disk_bytes,omitempty"`
	// Error and Class (the errdefs class, for the job's retry decision)
	// say why the layer could not be built.
	Error string `json:"error,omitempty"`
	Class string `json:"class,omitempty"`
}

// MaybeRunLayerBuilder returns at once, unless this process was started
// by a Converter as a layer builder: then it serves the jobs it is sent
// (serveLayerBuilder) and exits when the daemon closes its end. Every
// program that runs a Converter with a background class
// (WithBackgroundClass) calls it first in main, and so does TestMain of
// tests that do.
func MaybeRunLayerBuilder() {
	if len(os.Args) == 0 || os.Args[0] != builderArg0 {
		return
	}
	if err := serveLayerBuilder(os.Args[1:], os.NewFile(3, "control")); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", builderArg0, err)
		os.Exit(1)
	}
	os.Exit(0)
}

// builderJobMax bounds a job message: a builder's flags and two paths.
const builderJobMax = 64 << 10

// serveLayerBuilder is a builder process's life: it enters the class its
// flags name, then takes jobs from ctl, a SOCK_SEQPACKET socket, one
// message each: the job's flags and upper directory (runLayerBuilder's
// args) as JSON, with the two pipes the blob and the status go to. It
// closes both when the job is done, and returns when ctl reaches its end.
// The error it returns is about the process or the protocol; a layer that
// cannot be built is a job's outcome, on its status pipe.
func serveLayerBuilder(args []string, ctl *os.File) error {
	fs := flag.NewFlagSet(builderArg0, flag.ContinueOnError)
	var class sched.Class
	fs.IntVar(&class.Nice, "nice", 0, "nice value of the process")
	fs.StringVar(&class.Cgroup, "cgroup", "", "cgroup v1 cpu cgroup the process joins")
	if err := fs.Parse(args); err != nil {
		return err
	}
	// Best effort, as for the daemon's background threads: a builder at
	// a higher priority than asked is slower for the containers, not
	// wrong.
	_ = class.EnterProcess()
	defer ctl.Close()
	buf := make([]byte, builderJobMax)
	oob := make([]byte, unix.CmsgSpace(2*4))
	for {
		n, oobn, _, _, err := unix.Recvmsg(int(ctl.Fd()), buf, oob, unix.MSG_CMSG_CLOEXEC)
		if err != nil {
			return fmt.Errorf("receive a job: %w", err)
		}
		if n == 0 && oobn == 0 {
			return nil // the daemon closed its end
		}
		out, status, err := jobPipes(oob[:oobn])
		if err != nil {
			return err
		}
		var jobArgs []string
		if err := json.Unmarshal(buf[:n], &jobArgs); err != nil {
			out.Close()
			status.Close()
			return fmt.Errorf("job message: %w", err)
		}
		err = runLayerBuilder(jobArgs, out, status)
		out.Close()
		status.Close()
		if err != nil {
			return err
		}
		// What the job's compressor and walk held, back to the host
		// while the process waits for the next.
		debug.FreeOSMemory()
	}
}

// jobPipes returns the two descriptors a job message carries: where the
// blob and the status go.
func jobPipes(oob []byte) (out, status *os.File, _ error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, nil, fmt.Errorf("job message: %w", err)
	}
	var fds []int
	for _, m := range msgs {
		rights, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		fds = append(fds, rights...)
	}
	if len(fds) != 2 {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return nil, nil, fmt.Errorf("job message: %d descriptors, want 2", len(fds))
	}
	return os.NewFile(uintptr(fds[0]), "blob"), os.NewFile(uintptr(fds[1]), "status"), nil
}

// runLayerBuilder is one job of a builder process: args are its flags and
// the upper directory. A layer that cannot be built is reported on status,
// not returned: the error returned is about the job's set-up.
func runLayerBuilder(args []string, out, status io.Writer) error {
	fs := flag.NewFlagSet(builderArg0, flag.ContinueOnError)
	comp := fs.String("compression", string(CompressionGzip), "compression of the blob")
	level := fs.Int("level", 0, "compression level (0: the compression's default)")
	previous := fs.String("previous", "", "earlier capture the layer is the changes from")
	modTime := fs.Int64("modtime", 0, "clamp mtimes to this Unix time in ns (0: none)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return fmt.Errorf("want one upper directory, got %q", fs.Args())
	}
	opts := layer.Options{Previous: *previous}
	if *modTime != 0 {
		t := time.Unix(0, *modTime)
		opts.ModTime = &t
	}
	enc := json.NewEncoder(status)
	bw := bufio.NewWriterSize(out, 1<<20)
	blob, err := CompressLayer(context.Background(), bw, Compression(*comp), *level, func(tw io.Writer) error {
		_, err := layer.Write(context.Background(), &progressReporter{w: tw, enc: enc}, fs.Arg(0), opts)
		return err
	})
	if err == nil {
		err = bw.Flush()
	}
	res := builderStatus{Done: true, Blob: blob}
	if err == nil {
		// After the layer, which has just read the same metadata.
		res.DiskBytes = diskUsage(context.Background(), fs.Arg(0))
	}
	if err != nil {
		res = builderStatus{Done: true, Error: err.Error(), Class: errClass(err)}
	}
	return enc.Encode(res)
}

// progressReporter passes writes on to w and reports their total on enc
// every builderProgressStep bytes.
type progressReporter struct {
	w        io.Writer
	enc      *json.Encoder
	n, since int64
}

func (p *progressReporter) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	p.n += int64(n)
	if p.since += int64(n); p.since >= builderProgressStep {
		p.since = 0
		if eerr := p.enc.Encode(builderStatus{Progress: p.n}); eerr != nil && err == nil {
			err = fmt.Errorf("report progress: %w", eerr)
		}
	}
	return n, err
}

// errClasses are the errdefs classes a builder's failure keeps across the
// process boundary.
var errClasses = []struct {
	name string
	err  error
}{
	{"not-implemented", errdefs.ErrNotImplemented},
	{"invalid-argument", errdefs.ErrInvalidArgument},
	{"not-found", errdefs.ErrNotFound},
	{"unavailable", errdefs.ErrUnavailable},
}

func errClass(err error) string {
	for _, c := range errClasses {
		if errors.Is(err, c.err) {
			return c.name
		}
	}
	return ""
}

// builderError is a builder's failure, with its errdefs class.
type builderError struct {
	msg   string
	class error
}

func (e *builderError) Error() string { return e.msg }
func (e *builderError) Unwrap() error { return e.class }

// buildLayerProcess writes the layer of upper (see layer.Write), compressed
// with c at level, to dst, and returns its digests and size, as
// CompressLayer does; but a builder process of the pool's class builds it
// (see builderPool). The walk of the files, the tar, its digest and the
// compression, most of a conversion's CPU time, run there, and so does
// the walk that measures the disk space upper's files use (diskBytes; 0
// when unknown). A daemon thread of the background class could not do it
// (see sched.Class.EnterProcess), and the compressor's goroutines cannot
// be placed one by one. The daemon only passes the blob on to dst
// (hashing it again: the digest it records is its own), steps aside
// while a container is frozen, and counts the tar's progress in prog.
//
// A builder that reports nothing for starvedAfter (builderStarvedAfter)
// while it waits for a CPU is starved: the daemon moves it to its own
// priority for the rest of the job (watchStarved) and retires it after.
// A job cut short (ctx, dst failing) kills its builder.
func buildLayerProcess(ctx context.Context, dst io.Writer, upper string, opts layer.Options, c Compression, level int, pool *builderPool, prog *progress, starvedAfter time.Duration) (_ Blob, diskBytes int64, _ error) {
	if err := validateCompression(c, level); err != nil {
		return Blob{}, 0, err
	}
	if err := ctx.Err(); err != nil {
		return Blob{}, 0, err
	}
	args := []string{"-compression", string(c), "-level", strconv.Itoa(level), "-previous", opts.Previous}
	if opts.ModTime != nil {
		args = append(args, "-modtime", strconv.FormatInt(opts.ModTime.UnixNano(), 10))
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		return Blob{}, 0, fmt.Errorf("builder pipe: %w", err)
	}
	defer outR.Close()
	statR, statW, err := os.Pipe()
	if err != nil {
		outW.Close()
		return Blob{}, 0, fmt.Errorf("builder pipe: %w", err)
	}
	// A larger pipe than the default 64 KiB: fewer switches between the
	// builder and the daemon. Best effort (the limit is
	// fs.pipe-max-size).
	_, _ = unix.FcntlInt(outW.Fd(), unix.F_SETPIPE_SZ, 1<<20)
	b, err := pool.dispatch(ctx, append(args, "--", upper), outW, statW)
	// The builder has its own copies (or none, if the job was not sent):
	// they close when it ends the job, or dies, and so end the reads
	// below.
	outW.Close()
	statW.Close()
	if err != nil {
		statR.Close()
		return Blob{}, 0, err
	}
	defer pool.put(b)
	stopKill := context.AfterFunc(ctx, b.kill)
	defer stopKill()

	var reported atomic.Int64 // when the builder last reported, in Unix ns
	reported.Store(time.Now().UnixNano())
	stopWatch := make(chan struct{})
	defer close(stopWatch)
	if pool.class != (sched.Class{}) {
		go watchStarved(ctx, b.pid, pool.class, starvedAfter, &reported, b.leftClass, stopWatch)
	}

	statusCh := make(chan builderStatus, 1)
	go func() {
		defer statR.Close()
		var last builderStatus
		dec := json.NewDecoder(statR)
		for {
			var st builderStatus
			if err := dec.Decode(&st); err != nil {
				break // the job's end: the last status is its outcome
			}
			reported.Store(time.Now().UnixNano())
			if st.Done {
				last = st
				continue
			}
			prog.done.Store(st.Progress)
		}
		statusCh <- last
	}()
	blob := &hashWriter{w: &unfrozenWriter{ctx: ctx, w: dst, wait: prog.wait}, h: digest.SHA256.Digester()}
	_, copyErr := io.CopyBuffer(blob, outR, make([]byte, 1<<20))
	if copyErr != nil {
		// Its output is no longer wanted.
		b.kill()
	}
	outR.Close() // a builder still writing gets EPIPE and fails the job
	st := <-statusCh

	switch {
	case ctx.Err() != nil:
		return Blob{}, 0, ctx.Err()
	case copyErr != nil:
		return Blob{}, 0, copyErr
	case st.Done && st.Error != "":
		var class error
		for _, c := range errClasses {
			if c.name == st.Class {
				class = c.err
			}
		}
		return Blob{}, 0, &builderError{msg: st.Error, class: class}
	case !st.Done:
		// A builder that ends a job without its outcome is dying, or was
		// killed: its exit status and last words tell why.
		exitErr := b.wait(builderExitWait)
		msg := b.stderr.String()
		if msg == "" {
			msg = "(no message)"
		}
		return Blob{}, 0, fmt.Errorf("layer builder process: %w: %v: %s", errdefs.ErrUnavailable, exitErr, msg)
	case st.Blob.Digest != blob.h.Digest() || st.Blob.Size != blob.n:
		b.kill()
		return Blob{}, 0, fmt.Errorf("layer builder: blob %s of %d bytes reported, %s of %d received", st.Blob.Digest, st.Blob.Size, blob.h.Digest(), blob.n)
	}
	return st.Blob, st.DiskBytes, nil
}

// watchStarved takes builder pid out of class bg when it is starved: it
// has not reported for starvedAfter, and its threads spent at least half
// of that waiting for a CPU (a builder held up by a slow registry, or
// stopped, waits on its pipe, not for a CPU, and stays). It watches until
// stop closes: once is enough, unless the builder was starved before it
// entered bg itself. Without the kernel's schedstat, silence is enough.
func watchStarved(ctx context.Context, pid int, bg sched.Class, starvedAfter time.Duration, reported *atomic.Int64, left func(), stop <-chan struct{}) {
	tick := time.NewTicker(starvedAfter / 4)
	defer tick.Stop()
	seen := reported.Load()
	baseDelay, _ := sched.RunDelay(pid)
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		if r := reported.Load(); r != seen {
			seen = r
			baseDelay, _ = sched.RunDelay(pid)
			continue
		}
		if time.Since(time.Unix(0, seen)) < starvedAfter {
			continue
		}
		delay, err := sched.RunDelay(pid)
		seen = time.Now().UnixNano()
		reported.Store(seen)
		waited := delay - baseDelay
		baseDelay = delay
		if err == nil && waited < starvedAfter/2 {
			continue
		}
		if err := bg.LeaveProcess(pid); err != nil {
			if !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.ESRCH) {
				log.G(ctx).WithError(err).Warn("cannot take a starved layer builder out of the background class")
			}
			continue
		}
		left()
		log.G(ctx).WithFields(log.Fields{"pid": pid, "waited": waited}).Infof("the layer builder reported nothing for %s, waiting for a CPU: it goes on at the daemon's priority", starvedAfter)
	}
}

// unfrozenWriter passes writes on to w, waiting before each one while a
// capture holds a container frozen.
type unfrozenWriter struct {
	ctx  context.Context
	w    io.Writer
	wait waitFunc
}

func (u *unfrozenWriter) Write(b []byte) (int, error) {
	if err := u.wait(u.ctx); err != nil {
		return 0, err
	}
	return u.w.Write(b)
}

// tailBuffer keeps the last limit bytes written to it.
type tailBuffer struct {
	mu    sync.Mutex
	limit int
	buf   []byte
}

func (t *tailBuffer) Write(b []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, b...)
	if over := len(t.buf) - t.limit; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
	}
	return len(b), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(bytes.TrimSpace(t.buf))
}
