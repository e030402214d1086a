package snapshotter

import (
	"context"
	"testing"
	"time"
)

func TestFreezeGate(t *testing.T) {
	var g freezeGate
	ctx := context.Background()
	if err := g.wait(ctx); err != nil {
		t.Fatalf("wait with nothing frozen: %v", err)
	}
	g.enter()
	g.enter() // two captures at once
	released := make(chan struct{})
	go func() {
		g.wait(ctx)
		close(released)
	}()
	g.leave()
	select {
	case <-released:
		t.Fatal("wait returned while a freeze was still in progress")
	case <-time.After(20 * time.Millisecond):
	}
	g.leave()
	select {
	case <-released:
	case <-time.After(5 * time.Second):
		t.Fatal("wait did not return after the last thaw")
	}
	g.enter()
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := g.wait(cctx); err == nil {
		t.Fatal("wait ignored a cancelled context")
	}
	g.leave()
}
