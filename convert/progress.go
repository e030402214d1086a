//go:build linux

package convert

import (
	"context"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"

	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// progressInterval is how often a job's byte counts reach its record:
// often enough for a progress bar, rarely enough not to load the database.
const progressInterval = 500 * time.Millisecond

// progress counts the bytes of a job's current phase.
type progress struct {
	done  atomic.Int64
	total atomic.Int64
	// uploaded counts the bytes of blobs sent, not skipped or mounted.
	uploaded atomic.Int64
	// wait blocks while a capture holds a container frozen: the bytes
	// counted here are work that steps aside for it.
	wait waitFunc
}

func newProgress(total int64, wait waitFunc) *progress {
	p := &progress{wait: wait}
	p.total.Store(total)
	return p
}

func (p *progress) add(n int64) { p.done.Add(n) }

func (p *progress) snapshot() snapshotter.Progress {
	done, total := p.done.Load(), p.total.Load()
	if total > 0 && done > total {
		done = total // a retried upload reads a blob twice
	}
	return snapshotter.Progress{Done: done, Total: total}
}

// reader counts what r reads, waiting before each read while a capture
// holds a container frozen.
func (p *progress) reader(ctx context.Context, r io.Reader) io.Reader {
	return &countingReader{ctx: ctx, r: r, p: p}
}

// writer counts what w writes, waiting before each write while a capture
// holds a container frozen.
func (p *progress) writer(ctx context.Context, w io.Writer) io.Writer {
	return &countingWriter{ctx: ctx, w: w, p: p}
}

// waitFunc blocks while a container is frozen (Store.WaitUnfrozen).
type waitFunc func(context.Context) error

type countingReader struct {
	ctx context.Context
	r   io.Reader
	p   *progress
}

func (c *countingReader) Read(b []byte) (int, error) {
	if err := c.p.wait(c.ctx); err != nil {
		return 0, err
	}
	n, err := c.r.Read(b)
	c.p.add(int64(n))
	return n, err
}

type countingWriter struct {
	ctx context.Context
	w   io.Writer
	p   *progress
}

func (c *countingWriter) Write(b []byte) (int, error) {
	if err := c.p.wait(c.ctx); err != nil {
		return 0, err
	}
	n, err := c.w.Write(b)
	c.p.add(int64(n))
	return n, err
}

// track writes p into the commit's record every progressInterval until
// the returned stop is called (which writes it a last time).
func (cv *Converter) track(ctx context.Context, id string, p *progress) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	save := func(ctx context.Context) {
		_, err := cv.store.UpdateCommit(ctx, id, func(c *snapshotter.Commit) error {
			c.Progress = p.snapshot()
			return nil
		})
		if err != nil && ctx.Err() == nil {
			log.G(ctx).WithError(err).Debug("cannot record progress")
		}
	}
	go func() {
		defer wg.Done()
		t := time.NewTicker(progressInterval)
		defer t.Stop()
		last := snapshotter.Progress{Done: -1}
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if now := p.snapshot(); now != last {
					save(ctx)
					last = now
				}
			}
		}
	}()
	return func() {
		cancel()
		wg.Wait()
		save(context.WithoutCancel(ctx))
	}
}
