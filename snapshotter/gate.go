package snapshotter

import (
	"context"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"

	"github.com/seamless-snapshotter/seamless-snapshotter/overlay"
)

// freezeGate tells background work (the image builds and pushes of
// package convert) when a container is frozen, so that it steps aside
// and leaves the CPUs and the disk to the capture: the pause is what the
// workload feels, the conversion is not.
type freezeGate struct {
	frozen atomic.Int32 // freezes in progress; read without the lock

	mu     sync.Mutex
	thawed chan struct{} // closed when the last freeze in progress ends
}

func (g *freezeGate) enter() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.frozen.Add(1) == 1 {
		g.thawed = make(chan struct{})
	}
}

func (g *freezeGate) leave() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.frozen.Add(-1) == 0 {
		close(g.thawed)
	}
}

// wait returns at once when no container is frozen, else when none is
// any more, or when ctx ends.
func (g *freezeGate) wait(ctx context.Context) error {
	if g.frozen.Load() == 0 {
		return nil
	}
	g.mu.Lock()
	ch := g.thawed
	n := g.frozen.Load()
	g.mu.Unlock()
	if n == 0 {
		return nil
	}
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// WaitUnfrozen blocks while one of the snapshotter's captures holds a
// container frozen (at most the pause budget). Background work calls it
// between small steps.
func (o *Snapshotter) WaitUnfrozen(ctx context.Context) error { return o.gate.wait(ctx) }

// How long a btrfs capture waits, before its freeze, for the kernel to
// finish dropping a released capture, and how often it looks. Past the
// wait it captures anyway: the pause is longer, not refused.
const (
	subvolumeCleanupWait = 5 * time.Second
	subvolumeCleanupPoll = 10 * time.Millisecond
	// subvolumeCleanupMax bounds how long a release keeps captures
	// waiting behind it, should the kernel never finish.
	subvolumeCleanupMax = 5 * time.Minute
)

// cleanupGate keeps the kernel's clean-up of deleted btrfs subvolumes
// (released captures, removed containers' snapshots) and btrfs freezes
// apart. Dropping a deleted subvolume makes the cleaner queue reference
// updates for every block it shared with a live one; the snapshot taken
// under the next freeze commits the transaction that must write them,
// which made the pause of a 100,000-file container 6-264 ms instead of
// 5-10 ms. So releases hold the gate, together, until their subvolumes
// are gone, and btrfs captures hold it, together, from before their
// pre-copy (whose flush commits what a drop left) until they have thawed;
// never a release and a capture at once.
type cleanupGate struct {
	mu       sync.Mutex
	captures int           // captures holding the gate
	releases int           // releases holding the gate
	changed  chan struct{} // closed, and replaced, when the gate is let go
}

func newCleanupGate() *cleanupGate { return &cleanupGate{changed: make(chan struct{})} }

// enter waits until the gate can be held by a release (release) or a
// capture, or until ctx ends.
func (g *cleanupGate) enter(ctx context.Context, release bool) error {
	for {
		g.mu.Lock()
		switch {
		case release && g.captures == 0:
			g.releases++
			g.mu.Unlock()
			return nil
		case !release && g.releases == 0:
			g.captures++
			g.mu.Unlock()
			return nil
		}
		changed := g.changed
		g.mu.Unlock()
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (g *cleanupGate) leave(release bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if release {
		g.releases--
	} else {
		g.captures--
	}
	close(g.changed)
	g.changed = make(chan struct{})
}

// removeSubvolume deletes a btrfs subvolume, holding the cleanup gate as
// a release until the kernel has dropped it. With wait it returns then;
// without, once the subvolume is deleted, and the gate is let go in the
// background: removing a container need not wait for btrfs's clean-up.
func (o *Snapshotter) removeSubvolume(ctx context.Context, dir string, wait bool) error {
	if err := o.cleanups.enter(ctx, true); err != nil {
		return err
	}
	id, idErr := overlay.SubvolumeID(dir)
	if err := overlay.RemoveTree(dir); err != nil {
		o.cleanups.leave(true)
		return err
	}
	if idErr != nil {
		o.cleanups.leave(true)
		log.G(ctx).WithError(idErr).Warn("cannot wait for the deleted subvolume to be cleaned up")
		return nil
	}
	waitGone := func(ctx context.Context) {
		defer o.cleanups.leave(true)
		start := time.Now()
		waitCtx, cancel := context.WithTimeout(ctx, subvolumeCleanupMax)
		defer cancel()
		if err := overlay.WaitSubvolumeGone(waitCtx, filepath.Dir(dir), id, subvolumeCleanupPoll); err != nil {
			if ctx.Err() == nil {
				log.G(ctx).WithError(err).Warn("btrfs is slow to clean up a deleted subvolume; captures no longer wait for it")
			}
			return
		}
		log.G(ctx).WithFields(log.Fields{"path": dir, "took": time.Since(start)}).Debug("deleted subvolume cleaned up by btrfs")
	}
	if wait {
		waitGone(ctx)
		return nil
	}
	o.background.Add(1)
	go func() {
		defer o.background.Done()
		waitGone(log.WithLogger(o.backgroundCtx, log.G(ctx)))
	}()
	return nil
}

// removeDirs removes the directories of removed snapshots. One that
// survives is an orphan, which the next Cleanup retries.
func (o *Snapshotter) removeDirs(ctx context.Context, dirs []string) {
	for _, dir := range dirs {
		var err error
		if overlay.IsSubvolume(dir) {
			err = o.removeSubvolume(ctx, dir, false)
		} else {
			err = overlay.RemoveTree(dir)
		}
		if err != nil {
			log.G(ctx).WithError(err).WithField("path", dir).Warn("failed to remove snapshot directory")
		}
	}
}

// awaitCleanups holds the cleanup gate for a btrfs capture, waiting at
// most subvolumeCleanupWait for a release in progress; the returned func
// lets go of it. Captures of other containers do not wait for each other.
func (o *Snapshotter) awaitCleanups(ctx context.Context) (release func(), err error) {
	start := time.Now()
	waitCtx, cancel := context.WithTimeout(ctx, subvolumeCleanupWait)
	defer cancel()
	if err := o.cleanups.enter(waitCtx, false); err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		log.G(ctx).Info("btrfs is still cleaning up a released capture; capturing anyway, the pause may be longer")
		return func() {}, nil
	}
	if waited := time.Since(start); waited > subvolumeCleanupPoll {
		log.G(ctx).WithField("waited", waited).Debug("waited for btrfs to clean up a released capture")
	}
	return func() { o.cleanups.leave(false) }, nil
}
