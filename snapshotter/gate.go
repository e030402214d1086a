package snapshotter

import (
	"context"
	"sync"
	"sync/atomic"
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
