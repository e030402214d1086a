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

// TestCleanupGate: btrfs captures share the gate, releases share it,
// and each side waits for the other (a capture only as long as its
// context allows).
func TestCleanupGate(t *testing.T) {
	g := newCleanupGate()
	ctx := context.Background()
	expired, cancel := context.WithCancel(ctx)
	cancel()
	entered := func(alone bool) <-chan error {
		ch := make(chan error, 1)
		go func() { ch <- g.enter(ctx, alone) }()
		return ch
	}
	waiting := func(ch <-chan error, who string) {
		t.Helper()
		select {
		case err := <-ch:
			t.Fatalf("%s entered (%v) while the gate was held", who, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	in := func(ch <-chan error, who string) {
		t.Helper()
		select {
		case err := <-ch:
			if err != nil {
				t.Fatalf("%s: %v", who, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s did not enter once the gate was let go", who)
		}
	}

	// Two captures at once, of two containers: neither waits.
	in(entered(false), "first capture")
	in(entered(false), "second capture")
	release := entered(true)
	waiting(release, "a release during two captures")
	g.leave(false)
	waiting(release, "a release during one capture")
	g.leave(false)
	in(release, "the release")
	// Releases do not wait for each other.
	in(entered(true), "a second release")

	// A capture during releases waits for them all, or gives up with its
	// context.
	if err := g.enter(expired, false); err == nil {
		t.Fatal("a capture entered during a release")
	}
	capture := entered(false)
	waiting(capture, "a capture during two releases")
	g.leave(true)
	waiting(capture, "a capture during a release")
	g.leave(true)
	in(capture, "the capture")
	if err := g.enter(expired, true); err == nil {
		t.Fatal("a release entered during a capture")
	}
	g.leave(false)
}
