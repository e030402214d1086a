//go:build linux

package harness

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// ErrInterrupted is the cause of Runner's Context when a signal stopped
// the run, and is wrapped by Run's error if the run then failed.
var ErrInterrupted = errors.New("interrupted")

// Runner implements T for programs, so that they can use the harness as
// tests do:
//
//	r := harness.NewRunner(os.Stderr)
//	err := r.Run(func(t harness.T) {
//		env := harness.Start(t, harness.Options{})
//		...
//	})
//
// Logf writes to the Runner's writer; Errorf logs and marks the run
// failed; Fatal and Fatalf log, mark it failed and end the function (with
// a panic that Run recovers, so unlike testing they work without
// runtime.Goexit but, as with testing, only on Run's goroutine). Cleanup
// functions run in reverse order when the function returns or fails, after
// Context is cancelled. SIGINT, SIGTERM and SIGHUP received during Run
// cancel Context (cause ErrInterrupted) instead of killing the program,
// so that an interrupted program still runs its cleanups: every harness
// component is stopped and every container removed.
type Runner struct {
	// Name prefixes the directories TempDir creates; default "harness".
	Name string
	// OnSignal, if set, is called on Run's signal goroutine for each
	// signal received during Run, n counting from 1. The first cancels
	// Context; later ones are otherwise ignored while cleanups finish.
	OnSignal func(sig os.Signal, n int)

	log io.Writer

	mu       sync.Mutex
	ctx      context.Context
	failed   bool
	failures []string
	cleanups []func()
	signal   os.Signal // the first signal received, nil if none
	tempBase string    // TempDir's parent, "" until first used
	tempSeq  int
}

// fatal is the panic value of Fatal and Fatalf, recovered by Run.
type fatal struct{}

// NewRunner returns a Runner that writes its log (Logf, and the messages
// of Errorf and Fatal) to w; nil discards it.
func NewRunner(w io.Writer) *Runner {
	if w == nil {
		w = io.Discard
	}
	return &Runner{log: w}
}

// Run calls f with the Runner as its T, then runs the registered cleanups
// in reverse order (also when f called Fatal, panicked or was interrupted
// by a signal). It returns nil if nothing failed, else an error holding
// every failure message, wrapping Context's cause (ErrInterrupted) if a
// signal was received. A panic other than Fatal's is re-raised after the
// cleanups. Run calls must not overlap.
func (r *Runner) Run(f func(T)) error {
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	r.mu.Lock()
	r.ctx, r.failed, r.failures, r.cleanups, r.signal = ctx, false, nil, nil, nil
	r.tempBase, r.tempSeq = "", 0
	r.mu.Unlock()

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		n := 0
		for {
			select {
			case sig := <-sigs:
				n++
				if n == 1 {
					r.mu.Lock()
					r.signal = sig
					r.mu.Unlock()
					cancel(fmt.Errorf("%w by %s", ErrInterrupted, signalName(sig)))
				}
				if r.OnSignal != nil {
					r.OnSignal(sig, n)
				}
			case <-done:
				return
			}
		}
	})
	defer func() {
		signal.Stop(sigs)
		close(done)
		wg.Wait()
	}()

	p := r.call(func() { f(r) })
	// As with testing, Context is done before the cleanups run; the
	// harness's cleanups use contexts of their own.
	cancel(context.Canceled)
	if q := r.runCleanups(); p == nil {
		p = q
	}
	if p != nil {
		panic(p)
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.failed {
		return nil
	}
	if r.signal == nil {
		return errors.New(strings.Join(r.failures, "\n"))
	}
	// Failures that only repeat the cause (Fatal(ctx.Err()) and the
	// like) are left out.
	cause := context.Cause(ctx)
	var rest []string
	for _, f := range r.failures {
		if f != cause.Error() && f != context.Canceled.Error() {
			rest = append(rest, f)
		}
	}
	if len(rest) == 0 {
		return cause
	}
	return fmt.Errorf("%w: %s", cause, strings.Join(rest, "\n"))
}

// call runs fn and returns the value of a panic other than Fatal's.
func (r *Runner) call(fn func()) (p any) {
	defer func() {
		if v := recover(); v != nil {
			if _, ok := v.(fatal); !ok {
				r.fail(fmt.Sprintf("panic: %v", v))
				p = v
			}
		}
	}()
	fn()
	return nil
}

// runCleanups pops and runs cleanups until none is left (a cleanup may
// register more) and returns the first non-Fatal panic, after all ran.
func (r *Runner) runCleanups() (first any) {
	for {
		r.mu.Lock()
		if len(r.cleanups) == 0 {
			r.mu.Unlock()
			return first
		}
		fn := r.cleanups[len(r.cleanups)-1]
		r.cleanups = r.cleanups[:len(r.cleanups)-1]
		r.mu.Unlock()
		if p := r.call(fn); p != nil && first == nil {
			first = p
		}
	}
}

// Failures returns the messages of Errorf, Fatal and Fatalf so far in
// the current (or last) Run, in order.
func (r *Runner) Failures() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.failures)
}

// Helper is a no-op: Runner does not report caller positions.
func (r *Runner) Helper() {}

// Logf writes a line to the Runner's writer.
func (r *Runner) Logf(format string, args ...any) {
	r.write(fmt.Sprintf(format, args...))
}

// Errorf logs and marks the run failed.
func (r *Runner) Errorf(format string, args ...any) {
	r.fail(fmt.Sprintf(format, args...))
}

// Fatal logs, marks the run failed and ends Run's function; call it only
// on Run's goroutine (elsewhere the panic would crash the program).
func (r *Runner) Fatal(args ...any) {
	r.fail(strings.TrimSuffix(fmt.Sprintln(args...), "\n"))
	panic(fatal{})
}

// Fatalf is Fatal with a format.
func (r *Runner) Fatalf(format string, args ...any) {
	r.fail(fmt.Sprintf(format, args...))
	panic(fatal{})
}

// Failed reports whether Errorf, Fatal or Fatalf was called during Run.
func (r *Runner) Failed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failed
}

// Cleanup registers fn to run when Run's function has returned, in
// reverse order of registration.
func (r *Runner) Cleanup(fn func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cleanups = append(r.cleanups, fn)
}

// Context is cancelled when Run's function returns or fails, before the
// cleanups run, or when a signal arrives (cause ErrInterrupted). Outside
// Run it is context.Background().
func (r *Runner) Context() context.Context {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ctx == nil {
		return context.Background()
	}
	return r.ctx
}

// TempDir creates a new directory under the run's temp dir (created on
// first use, e.g. /tmp/harness-123/001), removed with it by a cleanup.
// Mounts left under it (a leaked container rootfs) are detached first and
// reported as a failure: removing files through a live mount would not
// free it.
func (r *Runner) TempDir() string {
	r.mu.Lock()
	base := r.tempBase
	if base == "" {
		name := r.Name
		if name == "" {
			name = "harness"
		}
		var err error
		if base, err = os.MkdirTemp("", name+"-"); err != nil {
			r.mu.Unlock()
			r.Fatalf("creating temp dir: %v", err)
		}
		r.tempBase = base
		r.cleanups = append(r.cleanups, func() {
			if mounts := detachMountsUnder(base); len(mounts) > 0 {
				r.Errorf("removing %s: detached %d mounts left under it: %s", base, len(mounts), strings.Join(mounts, ", "))
			}
			if err := os.RemoveAll(base); err != nil {
				r.Errorf("removing temp dir: %v", err)
			}
		})
	}
	r.tempSeq++
	dir := filepath.Join(base, fmt.Sprintf("%03d", r.tempSeq))
	r.mu.Unlock()
	if err := os.Mkdir(dir, 0o755); err != nil {
		r.Fatalf("creating temp dir: %v", err)
	}
	return dir
}

func (r *Runner) fail(msg string) {
	r.mu.Lock()
	r.failed = true
	r.failures = append(r.failures, msg)
	r.mu.Unlock()
	r.write(msg)
}

func (r *Runner) write(msg string) {
	if !strings.HasSuffix(msg, "\n") {
		msg += "\n"
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	_, _ = io.WriteString(r.log, msg)
}

func signalName(sig os.Signal) string {
	switch sig {
	case syscall.SIGINT:
		return "SIGINT"
	case syscall.SIGTERM:
		return "SIGTERM"
	case syscall.SIGHUP:
		return "SIGHUP"
	}
	return sig.String()
}

// detachMountsUnder lazily unmounts every mount at or below dir, deepest
// first, and returns their mount points.
func detachMountsUnder(dir string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var mounts []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for sc.Scan() {
		// Fields: id parent major:minor root mountpoint options ...
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMountinfo(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+string(filepath.Separator)) {
			mounts = append(mounts, mp)
		}
	}
	// Deepest (longest) first; the same path may be mounted several times.
	slices.SortFunc(mounts, func(a, b string) int {
		if len(a) != len(b) {
			return len(b) - len(a)
		}
		return strings.Compare(a, b)
	})
	for _, mp := range mounts {
		_ = syscall.Unmount(mp, syscall.MNT_DETACH)
	}
	return slices.Compact(mounts)
}

// unescapeMountinfo decodes the octal escapes (\040 for a space, ...) of
// a /proc/self/mountinfo path.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
