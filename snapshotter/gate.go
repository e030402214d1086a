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

// cleanupGate keeps the kernel's clean-up of released btrfs captures and
// btrfs freezes apart. Dropping a deleted subvolume makes the cleaner
// queue reference updates for every block it shared with the live
// subvolume; the snapshot taken under the next freeze commits the
// transaction that must write them, which made the pause of a
// 100,000-file container 6-264 ms instead of 5-10 ms. So a release holds
// the gate alone until its subvolume is gone, and btrfs captures hold it
// together, from before their pre-copy (whose flush commits what a drop
// left) until they have thawed.
type cleanupGate struct {
	mu       sync.Mutex
	captures int           // captures holding the gate
	cleaning bool          // a release holds the gate
	changed  chan struct{} // closed, and replaced, when the gate is let go
}

func newCleanupGate() *cleanupGate { return &cleanupGate{changed: make(chan struct{})} }

// enter waits until the gate can be held, alone (a release) or shared
// with other captures, or until ctx ends.
func (g *cleanupGate) enter(ctx context.Context, alone bool) error {
	for {
		g.mu.Lock()
		if !g.cleaning && (!alone || g.captures == 0) {
			if alone {
				g.cleaning = true
			} else {
				g.captures++
			}
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

func (g *cleanupGate) leave(alone bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if alone {
		g.cleaning = false
	} else {
		g.captures--
	}
	close(g.changed)
	g.changed = make(chan struct{})
}

// removeSubvolume deletes a released btrfs capture and waits, holding
// the cleanup gate, until the kernel has dropped it.
func (o *Snapshotter) removeSubvolume(ctx context.Context, dir string) error {
	if err := o.cleanups.enter(ctx, true); err != nil {
		return err
	}
	defer o.cleanups.leave(true)
	id, idErr := overlay.SubvolumeID(dir)
	if err := overlay.RemoveTree(dir); err != nil {
		return err
	}
	if idErr != nil {
		log.G(ctx).WithError(idErr).Warn("cannot wait for the released capture to be cleaned up")
		return nil
	}
	start := time.Now()
	waitCtx, cancel := context.WithTimeout(ctx, subvolumeCleanupMax)
	defer cancel()
	if err := overlay.WaitSubvolumeGone(waitCtx, filepath.Dir(dir), id, subvolumeCleanupPoll); err != nil {
		log.G(ctx).WithError(err).Warn("btrfs is slow to clean up a released capture; captures no longer wait for it")
		return nil
	}
	log.G(ctx).WithField("took", time.Since(start)).Debug("released capture cleaned up by btrfs")
	return nil
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
