//go:build linux

package freeze

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// DefaultTimeout bounds Freeze when its context has no deadline. A cgroup
// can stay FREEZING for as long as one of its tasks sleeps uninterruptibly
// outside the freezer's reach (a hung NFS server, I/O to a stuck device);
// an unbounded wait would leave the container half-frozen indefinitely.
const DefaultTimeout = time.Second

// Polling of the freezer state: the interval starts short, because a
// freeze usually completes within a few hundred microseconds, and doubles
// up to maxPollInterval so that a slow freeze does not burn a CPU. The
// waits must give the CPU away (the tasks being frozen may need this very
// CPU to reach the freezer), so there is no busy polling.
const (
	minPollInterval = 20 * time.Microsecond
	maxPollInterval = time.Millisecond
)

// Opt configures Freeze.
type Opt func(*options)

type options struct {
	intent func(ctx context.Context, paths []string) error
}

// WithIntent calls record, after Freeze has found which cgroups are thawed
// and before it freezes any of them, with the paths of exactly the cgroups
// this call is about to freeze (cgroups the user already paused are not
// among them). A caller records them durably there, so that recovery after
// a crash (ThawPaths) thaws only what was ours. If record fails, nothing is
// frozen and Freeze returns its error.
func WithIntent(record func(ctx context.Context, paths []string) error) Opt {
	return func(o *options) { o.intent = record }
}

// Frozen is the result of a successful Freeze: every given cgroup is frozen.
// Thaw it when the capture is done.
type Frozen struct {
	all  []Cgroup
	ours []Cgroup // frozen by this Freeze

	mu      sync.Mutex
	pending []Cgroup // ours, not yet thawed
}

// Cgroups returns every cgroup that Freeze was given (all are frozen until
// Thaw, and those in AlreadyFrozen stay frozen after it).
func (f *Frozen) Cgroups() []Cgroup { return slices.Clone(f.all) }

// WeFroze returns the paths of the cgroups that this Freeze froze, which are
// the only ones Thaw thaws.
func (f *Frozen) WeFroze() []string { return paths(f.ours) }

// AlreadyFrozen returns the paths of the cgroups that were frozen (or being
// frozen) by someone else when Freeze was called, typically a container the
// user paused. Thaw leaves them frozen.
func (f *Frozen) AlreadyFrozen() []string {
	var out []string
	for _, cg := range f.all {
		if !slices.ContainsFunc(f.ours, func(o Cgroup) bool { return o.Path == cg.Path }) {
			out = append(out, cg.Path)
		}
	}
	return out
}

// Thaw thaws the cgroups this Freeze froze, and only those. It is
// idempotent, and safe to call concurrently: a cgroup thawed once is not
// thawed again (by then it may have been paused by the user), and a cgroup
// whose thaw failed is retried by the next call. A cgroup that no longer
// exists (the container exited) counts as thawed.
//
// ctx is used for logging only: a cancelled context must not leave a
// container frozen.
func (f *Frozen) Thaw(ctx context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	var errs []error
	left := f.pending[:0]
	for _, cg := range f.pending {
		if err := cg.thaw(); err != nil {
			if errdefs.IsNotFound(err) {
				log.G(ctx).WithField("cgroup", cg.Path).Debug("cgroup is gone; nothing to thaw")
				continue
			}
			errs = append(errs, err)
			left = append(left, cg)
		}
	}
	f.pending = left
	if len(errs) > 0 {
		return fmt.Errorf("thaw: %w", errors.Join(errs...))
	}
	return nil
}

// Freeze freezes every given cgroup and returns once the kernel reports all
// of them frozen: freezer.state reads FROZEN (v1), or cgroup.events says
// "frozen 1" (v2). Writing the freeze request is not enough; the kernel
// freezes tasks asynchronously, and a capture taken before they stop is not
// point-in-time.
//
// Cgroups that are already frozen or freezing (a container the user paused)
// are not written to, are waited for like the others, and are never thawed
// by Frozen.Thaw.
//
// Freeze waits at most until ctx's deadline (if ctx has none, DefaultTimeout
// from when it starts freezing). On any failure, including the deadline, it thaws what it froze and
// returns an error; a deadline gives an error that wraps
// context.DeadlineExceeded.
//
// The cgroups should come from CgroupsOf, which refuses the root cgroup and
// our own: Freeze itself does not check, to keep its stall short.
func Freeze(ctx context.Context, cgs []Cgroup, opts ...Opt) (_ *Frozen, retErr error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("freeze: %w", err)
	}
	f := &Frozen{}
	var toFreeze []Cgroup
	for _, cg := range cgs {
		if slices.ContainsFunc(f.all, func(c Cgroup) bool { return c.Path == cg.Path }) {
			continue
		}
		st, err := cg.State()
		if err != nil {
			return nil, fmt.Errorf("freeze: %w", err)
		}
		f.all = append(f.all, cg)
		if st != StateThawed {
			log.G(ctx).WithField("cgroup", cg.Path).WithField("state", st).
				Info("cgroup is already frozen by someone else; it will be left frozen")
			continue
		}
		toFreeze = append(toFreeze, cg)
	}

	if o.intent != nil {
		if err := o.intent(ctx, paths(toFreeze)); err != nil {
			return nil, fmt.Errorf("freeze: record intent: %w", err)
		}
	}

	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultTimeout)
		defer cancel()
	}
	defer func() {
		if retErr == nil {
			return
		}
		// The caller's context may be what failed; the thaw must happen
		// anyway.
		if err := f.Thaw(context.WithoutCancel(ctx)); err != nil {
			log.G(ctx).WithError(err).Error("thaw after a failed freeze failed: the container may stay frozen")
		}
	}()

	for _, cg := range toFreeze {
		// Recorded before the write: if the write fails half-way the
		// rollback thaw covers it, and thawing a thawed cgroup is a no-op.
		f.ours = append(f.ours, cg)
		f.pending = append(f.pending, cg)
		if err := cg.requestFreeze(); err != nil {
			return nil, fmt.Errorf("freeze: %w", err)
		}
	}

	if err := waitFrozen(ctx, f.all, f.ours); err != nil {
		return nil, err
	}
	return f, nil
}

// waitFrozen polls until every cgroup in cgs is frozen. ours are the
// cgroups this call asked to freeze; only those are written to again.
func waitFrozen(ctx context.Context, cgs, ours []Cgroup) error {
	waiting := slices.Clone(cgs)
	interval := minPollInterval
	for {
		left := waiting[:0]
		for _, cg := range waiting {
			frozen, err := pollFrozen(cg, slices.ContainsFunc(ours, func(o Cgroup) bool { return o.Path == cg.Path }))
			if err != nil {
				return fmt.Errorf("freeze: %w", err)
			}
			if !frozen {
				left = append(left, cg)
			}
		}
		waiting = left
		if len(waiting) == 0 {
			return nil
		}
		if err := sleepCtx(ctx, interval); err != nil {
			return fmt.Errorf("freeze: cgroups %v not frozen in time: %w", paths(waiting), err)
		}
		interval = min(2*interval, maxPollInterval)
	}
}

// sleepCtx sleeps for d, or until ctx's deadline if that is sooner, and
// returns ctx's error if it is done by then.
//
// It calls nanosleep directly instead of using a Go timer: the runtime
// wakes timers through its network poller with about a millisecond of
// granularity (measured: time.Sleep(20µs) takes ~1.1 ms here, nanosleep
// ~0.1 ms under load), which would make every freeze last at least 1 ms.
// Blocking this goroutine's thread for at most maxPollInterval is cheap,
// and a cancellation (rather than a deadline) is seen at the next poll.
func sleepCtx(ctx context.Context, d time.Duration) error {
	if deadline, ok := ctx.Deadline(); ok {
		d = min(d, time.Until(deadline))
	}
	if d > 0 {
		ts := unix.NsecToTimespec(d.Nanoseconds())
		_ = unix.Nanosleep(&ts, nil) // EINTR only shortens a poll interval
	}
	return ctx.Err()
}

// pollFrozen reports whether cg is frozen. For a v1 cgroup that we are
// freezing and that is still FREEZING, it writes FROZEN again: the v1
// freezer does not reliably catch tasks that appeared (fork, cgroup.procs)
// after the first write, and re-writing re-walks the tasks. runc's v1
// freezer does the same, for the same reason. v2 has no such bug.
func pollFrozen(cg Cgroup, ours bool) (bool, error) {
	switch cg.Version {
	case V1:
		st, err := cg.State()
		if err != nil {
			return false, err
		}
		if st == StateFrozen {
			return true, nil
		}
		if st == StateThawed && !ours {
			// Whoever froze it thawed it while we waited: its freeze is not
			// ours to complete, and the capture must not go on.
			return false, fmt.Errorf("cgroup %s was thawed by someone else while we waited for it to freeze: %w",
				cg.Path, errdefs.ErrAborted)
		}
		if ours {
			if err := cg.requestFreeze(); err != nil {
				return false, err
			}
		}
		return false, nil
	case V2:
		frozen, err := v2Frozen(cg.Path)
		if err != nil || frozen || ours {
			return frozen, err
		}
		st, err := cg.State()
		if err != nil {
			return false, err
		}
		if st == StateThawed {
			return false, fmt.Errorf("cgroup %s was thawed by someone else while we waited for it to freeze: %w",
				cg.Path, errdefs.ErrAborted)
		}
		return false, nil
	}
	return false, fmt.Errorf("cgroup %s: unknown cgroup version %d: %w", cg.Path, int(cg.Version), errdefs.ErrInvalidArgument)
}

// ThawPaths thaws the cgroups at paths, for recovery after a crash: paths
// are what a caller recorded through WithIntent (or WeFroze) before the
// crash. Cgroups that no longer exist are skipped. It cannot tell whether a
// user paused one of these cgroups after the crash, so it must be called
// before containers are handed back to users, i.e. at start-up.
func ThawPaths(ctx context.Context, paths []string) error {
	var errs []error
	for _, p := range paths {
		cg, err := CgroupAt(p)
		if err == nil {
			err = cg.thaw()
		}
		if err != nil {
			if errdefs.IsNotFound(err) {
				log.G(ctx).WithField("cgroup", p).Debug("cgroup is gone; nothing to thaw")
				continue
			}
			errs = append(errs, err)
			continue
		}
		log.G(ctx).WithField("cgroup", p).Info("thawed cgroup left frozen by an interrupted commit")
	}
	if len(errs) > 0 {
		return fmt.Errorf("thaw: %w", errors.Join(errs...))
	}
	return nil
}

func paths(cgs []Cgroup) []string {
	out := make([]string, len(cgs))
	for i, cg := range cgs {
		out[i] = cg.Path
	}
	return out
}
