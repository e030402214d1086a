//go:build linux

package convert

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/seamless-snapshotter/seamless-snapshotter/config"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/sched"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// Error codes of failed jobs, stable for API clients (beside the capture's
// codes in package snapshotter).
const (
	CodeConvertFailed       = "CONVERT_FAILED"
	CodeBaseImageNotFound   = "BASE_IMAGE_NOT_FOUND"
	CodeRegistryAuth        = "REGISTRY_AUTH"
	CodeRegistryError       = "REGISTRY_ERROR"
	CodeRegistryUnreachable = "REGISTRY_UNREACHABLE"
	CodeContainerdError     = "CONTAINERD_UNREACHABLE"
)

// idleRescan is how often the queue is looked at when nothing wakes it:
// a safety net, since every capture and every job end wakes it.
const idleRescan = 30 * time.Second

// Converter runs the conversion jobs.
type Converter struct {
	store Store
	cfg   config.Convert
	// observers are told of every job that ends (done or failed).
	observers []func(snapshotter.Commit)

	// builders, if set, are the layer builder processes, of the
	// background class (see buildLayerProcess).
	builders *builderPool

	wake chan struct{}

	clientMu sync.Mutex
	client   *containerd.Client

	mu      sync.Mutex
	running map[string]bool // commit IDs of running jobs
}

// Option configures a Converter.
type Option func(*Converter)

// WithJobObserver calls fn with the record of every job that ends.
func WithJobObserver(fn func(snapshotter.Commit)) Option {
	return func(cv *Converter) { cv.observers = append(cv.observers, fn) }
}

// WithBackgroundClass builds layers in class c, so that the containers'
// threads run first: in a process of c's, the program re-executed (it
// must call MaybeRunLayerBuilder first in main). The zero class changes
// nothing: layers are built in the daemon, at its priority.
func WithBackgroundClass(c sched.Class) Option {
	return func(cv *Converter) {
		if c != (sched.Class{}) {
			cv.builders = newBuilderPool(c, builderIdleAfter)
		}
	}
}

// New returns a converter of the jobs in store; Run runs it.
func New(store Store, cfg config.Convert, opts ...Option) (*Converter, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cv := &Converter{
		store:   store,
		cfg:     cfg,
		wake:    make(chan struct{}, 1),
		running: map[string]bool{},
	}
	for _, o := range opts {
		o(cv)
	}
	return cv, nil
}

// Wake makes the converter look at the queue now; call it when a capture
// is recorded. It never blocks.
func (cv *Converter) Wake() {
	select {
	case cv.wake <- struct{}{}:
	default:
	}
}

// Run takes up jobs until ctx is cancelled, then waits for the running
// ones to stop: they are cut where they are and resume at the next start.
func (cv *Converter) Run(ctx context.Context) error {
	var jobs, collector sync.WaitGroup
	defer func() {
		jobs.Wait()
		collector.Wait()
		if cv.builders != nil {
			cv.builders.Close()
		}
		cv.clientMu.Lock()
		if cv.client != nil {
			cv.client.Close()
		}
		cv.clientMu.Unlock()
	}()
	// Releasing a capture deletes a tree as large as the container's
	// layer (seconds for a GiB): on a goroutine of its own, so that a new
	// job never waits for it. The snapshotter deletes it in its
	// background class (snapshotter.RemoveCapture), so that the
	// containers never wait for it either.
	collect := make(chan struct{}, 1)
	collector.Add(1)
	go func() {
		defer collector.Done()
		cv.collectLoop(ctx, collect)
	}()
	sem := make(chan struct{}, cv.cfg.Workers)
	for {
		next, err := cv.schedule(ctx, sem, &jobs)
		if err != nil && ctx.Err() == nil {
			log.G(ctx).WithError(err).Warn("cannot read the job queue")
		}
		select {
		case collect <- struct{}{}:
		default: // a collection is due already
		}
		timer := time.NewTimer(next)
		select {
		case <-ctx.Done():
			timer.Stop()
			return nil
		case <-cv.wake:
		case <-timer.C:
		}
		timer.Stop()
	}
}

// collectLoop releases the captures no job needs each time it is woken,
// until ctx is done.
func (cv *Converter) collectLoop(ctx context.Context, wake <-chan struct{}) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-wake:
		}
		if err := cv.collect(ctx); err != nil && ctx.Err() == nil {
			log.G(ctx).WithError(err).Warn("cannot release captures no job needs")
		}
	}
}

// schedule starts every job that may run now and returns how long to wait
// before the next one is due.
func (cv *Converter) schedule(ctx context.Context, sem chan struct{}, jobs *sync.WaitGroup) (time.Duration, error) {
	all, err := cv.store.ListCommits(ctx)
	if err != nil {
		return time.Second, err
	}
	now := time.Now()
	next := idleRescan
	for _, c := range runnable(all) {
		if wait := c.NextAttempt.Sub(now); wait > 0 {
			next = min(next, wait)
			continue
		}
		cv.mu.Lock()
		busy := cv.running[c.ID]
		cv.mu.Unlock()
		if busy {
			continue
		}
		select {
		case sem <- struct{}{}:
		default:
			return next, nil // all workers busy; a job's end wakes us
		}
		cv.mu.Lock()
		cv.running[c.ID] = true
		cv.mu.Unlock()
		jobs.Add(1)
		go func(c snapshotter.Commit) {
			defer func() {
				cv.mu.Lock()
				delete(cv.running, c.ID)
				cv.mu.Unlock()
				<-sem
				jobs.Done()
				cv.Wake()
			}()
			cv.runJob(ctx, c)
		}(c)
	}
	return next, nil
}

// runnable returns the jobs that may run, oldest first: for each snapshot,
// its oldest unfinished commit, because a commit's layer is built on the
// previous commit's.
func runnable(all []snapshotter.Commit) []snapshotter.Commit {
	first := map[string]snapshotter.Commit{}
	for _, c := range all {
		if c.State == snapshotter.StateCapturing || c.State.Terminal() {
			continue
		}
		if f, ok := first[c.SnapshotID]; !ok || c.Generation < f.Generation {
			first[c.SnapshotID] = c
		}
	}
	out := make([]snapshotter.Commit, 0, len(first))
	for _, c := range first {
		out = append(out, c)
	}
	slices.SortFunc(out, func(a, b snapshotter.Commit) int {
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out
}

// runJob runs one try of a job and records its outcome.
func (cv *Converter) runJob(ctx context.Context, c snapshotter.Commit) {
	ctx = log.WithLogger(ctx, log.G(ctx).WithFields(log.Fields{"commit": c.ID, "target": c.Target}))
	started := time.Now()
	rec, err := cv.convert(ctx, c)
	if err == nil {
		log.G(ctx).WithFields(log.Fields{"digest": rec.ImageDigest, "layers": len(rec.Layers), "took": time.Since(started)}).Info("commit published")
		cv.observe(rec)
		return
	}
	if ctx.Err() != nil {
		// Shutting down: the job resumes at the next start.
		log.G(ctx).WithError(err).Info("job interrupted by shutdown; it resumes at the next start")
		return
	}
	code, permanent := classify(err)
	rec, uerr := cv.store.UpdateCommit(context.WithoutCancel(ctx), c.ID, func(r *snapshotter.Commit) error {
		r.Error, r.ErrorCode = err.Error(), code
		if permanent || r.Attempts >= cv.cfg.MaxAttempts {
			r.State = snapshotter.StateFailed
			r.FinishedAt = time.Now().UTC()
			r.NextAttempt = time.Time{}
			return nil
		}
		r.NextAttempt = time.Now().Add(cv.backoff(r.Attempts)).UTC()
		return nil
	})
	if uerr != nil {
		log.G(ctx).WithError(uerr).Error("cannot record the outcome of a job")
		return
	}
	if rec.State == snapshotter.StateFailed {
		log.G(ctx).WithError(err).WithField("code", code).Warn("commit failed")
		cv.observe(rec)
		return
	}
	log.G(ctx).WithError(err).WithFields(log.Fields{"attempt": rec.Attempts, "next": rec.NextAttempt}).Warn("commit job failed; retrying")
}

func (cv *Converter) observe(c snapshotter.Commit) {
	for _, fn := range cv.observers {
		fn(c)
	}
}

// backoff is the wait after the n-th failed attempt: RetryInitial doubled
// each time, at most RetryMax.
func (cv *Converter) backoff(attempts int) time.Duration {
	d := time.Duration(cv.cfg.RetryInitial)
	for i := 1; i < attempts && d < time.Duration(cv.cfg.RetryMax); i++ {
		d *= 2
	}
	return min(d, time.Duration(cv.cfg.RetryMax))
}

// jobError is a job failure with its stable code; permanent ones are not
// retried.
type jobError struct {
	code      string
	permanent bool
	err       error
}

func (e *jobError) Error() string { return e.err.Error() }
func (e *jobError) Unwrap() error { return e.err }

func permanentErr(code string, err error) error {
	return &jobError{code: code, permanent: true, err: err}
}

func transientErr(code string, err error) error {
	return &jobError{code: code, err: err}
}

// classify gives an error's code and whether retrying cannot help.
func classify(err error) (code string, permanent bool) {
	var je *jobError
	if errors.As(err, &je) {
		return je.code, je.permanent
	}
	if code, permanent, ok := classifyRegistry(err); ok {
		return code, permanent
	}
	switch {
	case errdefs.IsInvalidArgument(err), errdefs.IsFailedPrecondition(err), errdefs.IsNotImplemented(err):
		return CodeConvertFailed, true
	case errdefs.IsNotFound(err):
		return CodeConvertFailed, true
	}
	return CodeConvertFailed, false
}

// containerd returns the client of containerd, connecting on first use
// (containerd may start after the daemon).
func (cv *Converter) containerd(ctx context.Context) (*containerd.Client, error) {
	cv.clientMu.Lock()
	defer cv.clientMu.Unlock()
	if cv.client != nil {
		return cv.client, nil
	}
	client, err := containerd.New(cv.cfg.ContainerdAddress, containerd.WithTimeout(10*time.Second))
	if err != nil {
		return nil, transientErr(CodeContainerdError, fmt.Errorf("connect to containerd at %s: %w", cv.cfg.ContainerdAddress, err))
	}
	cv.client = client
	return client, nil
}
