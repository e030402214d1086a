//go:build linux

package harness

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

var (
	_ T = (*Runner)(nil)
	_ T = testing.TB(nil)
)

func TestRunnerCleanupOrderAndFatal(t *testing.T) {
	var log bytes.Buffer
	r := NewRunner(&log)
	var order []string
	var dir string
	var ctx context.Context
	err := r.Run(func(rt T) {
		ctx = rt.Context()
		dir = rt.TempDir()
		if dir2 := rt.TempDir(); dir2 == dir || filepath.Dir(dir2) != filepath.Dir(dir) {
			t.Errorf("second TempDir %s, first %s: want siblings", dir2, dir)
		}
		rt.Cleanup(func() { order = append(order, "first") })
		rt.Cleanup(func() {
			order = append(order, "second")
			if ctx.Err() == nil {
				t.Error("Context not cancelled before cleanups")
			}
			// Registered during cleanup: still runs.
			rt.Cleanup(func() { order = append(order, "nested") })
		})
		rt.Logf("hello %d", 1)
		rt.Errorf("soft %s", "failure")
		rt.Fatalf("hard %s", "failure")
		order = append(order, "after Fatal")
	})
	if err == nil || !strings.Contains(err.Error(), "soft failure") || !strings.Contains(err.Error(), "hard failure") {
		t.Errorf("Run error = %v, want both failures", err)
	}
	if errors.Is(err, ErrInterrupted) {
		t.Errorf("Run error %v wraps ErrInterrupted without a signal", err)
	}
	if got, want := strings.Join(order, ","), "second,nested,first"; got != want {
		t.Errorf("cleanup order %s, want %s", got, want)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("TempDir %s not removed: %v", dir, err)
	}
	if _, err := os.Stat(filepath.Dir(dir)); !os.IsNotExist(err) {
		t.Errorf("TempDir's parent %s not removed: %v", filepath.Dir(dir), err)
	}
	if !strings.Contains(log.String(), "hello 1\n") {
		t.Errorf("log %q lacks Logf output", log.String())
	}
	if !r.Failed() {
		t.Error("Failed() = false after Fatal")
	}

	if err := r.Run(func(T) {}); err != nil {
		t.Errorf("second Run, nothing failing: %v", err)
	}
}

func TestRunnerPanicRunsCleanups(t *testing.T) {
	r := NewRunner(nil)
	cleaned := false
	func() {
		defer func() {
			if p := recover(); p != "boom" {
				t.Errorf("recovered %v, want the original panic", p)
			}
		}()
		_ = r.Run(func(rt T) {
			rt.Cleanup(func() { cleaned = true })
			panic("boom")
		})
	}()
	if !cleaned {
		t.Error("cleanup did not run after a panic")
	}
}

func TestRunnerSignal(t *testing.T) {
	r := NewRunner(nil)
	signals := make(chan int, 4)
	r.OnSignal = func(_ os.Signal, n int) { signals <- n }
	err := r.Run(func(rt T) {
		if err := syscall.Kill(os.Getpid(), syscall.SIGINT); err != nil {
			rt.Fatal(err)
		}
		select {
		case <-rt.Context().Done():
		case <-time.After(10 * time.Second):
			rt.Fatal("Context not cancelled by SIGINT")
		}
		if !errors.Is(context.Cause(rt.Context()), ErrInterrupted) {
			rt.Errorf("cause %v, want ErrInterrupted", context.Cause(rt.Context()))
		}
		rt.Fatal(rt.Context().Err())
	})
	if !errors.Is(err, ErrInterrupted) {
		t.Errorf("Run error %v does not wrap ErrInterrupted", err)
	}
	if n := <-signals; n != 1 {
		t.Errorf("OnSignal n = %d, want 1", n)
	}
}

func TestUnescapeMountinfo(t *testing.T) {
	for in, want := range map[string]string{
		`/tmp/a`:          "/tmp/a",
		`/tmp/a\040b`:     "/tmp/a b",
		`/tmp/x\134y\011`: "/tmp/x\\y\t",
		`/tmp/trail\04`:   `/tmp/trail\04`,
	} {
		if got := unescapeMountinfo(in); got != want {
			t.Errorf("unescapeMountinfo(%q) = %q, want %q", in, got, want)
		}
	}
}
