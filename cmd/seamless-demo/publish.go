//go:build linux

package main

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/harness"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

const (
	// publishTimeout bounds the wait for a commit's image.
	publishTimeout = 3 * time.Minute
	// freshNamespace is where the demo pulls the committed image: a
	// containerd namespace that never saw the container.
	freshNamespace = "demo-fresh"
)

// waitPublished follows a commit's background job, printing its states
// and progress, until the image is in the registry.
func (d *demo) waitPublished(c *commitRun) {
	var lines []string
	d.step("image built and pushed", func() (string, error) {
		ctx, cancel := context.WithTimeout(d.ctx, publishTimeout)
		defer cancel()
		start := time.Now()
		last := ""
		var rec api.Commit
		err := harness.WaitFor(ctx, 50*time.Millisecond, func(ctx context.Context) (bool, error) {
			if _, err := d.api.do(ctx, "GET", "/api/v1/commits/"+c.rec.ID, nil, &rec); err != nil {
				return false, nil // the daemon may be restarting
			}
			line := string(rec.State)
			if rec.State == snapshotter.StatePushing && rec.Progress.Total > 0 {
				line = fmt.Sprintf("pushing %s", fmtBytes(rec.Progress.Total))
			}
			if rec.Error != "" && !rec.State.Terminal() {
				line = fmt.Sprintf("retrying after: %s", rec.Error)
			}
			if line != last {
				lines = append(lines, fmt.Sprintf("%6s  %s", fmtDuration(time.Since(start)), line))
				last = line
			}
			return rec.State.Terminal(), nil
		})
		if err != nil {
			return "", fmt.Errorf("commit %s still %s: %w", c.rec.ID, rec.State, err)
		}
		c.rec = rec
		if rec.State == snapshotter.StateFailed {
			return "", fmt.Errorf("commit %s failed: %s: %s", rec.ID, rec.ErrorCode, rec.Error)
		}
		kind := "all changes since the base image"
		if top := rec.Layers[len(rec.Layers)-1]; !top.Squashed {
			kind = "only the changes since the previous commit"
		}
		return fmt.Sprintf("%s@%s, %d layer(s) on the base; the new one holds %s (%s), %s uploaded",
			rec.Target, shortDigest(rec.ImageDigest.String()), len(rec.Layers), kind,
			fmtBytes(rec.Layers[len(rec.Layers)-1].Size), fmtBytes(rec.UploadedBytes)), nil
	})
	d.show(strings.Join(lines, "\n"))
}

// runCommitted pulls the last commit's image into a fresh namespace with
// containerd's own overlayfs snapshotter and runs it: the data the
// container had written at the capture instant is there.
func (d *demo) runCommitted() {
	c := d.lastCommit()
	ctx := namespaces.WithNamespace(d.shielded(), freshNamespace)
	d.step("pull into a fresh namespace", func() (string, error) {
		if err := d.env.PullImage(ctx, c.rec.Target, "overlayfs"); err != nil {
			return "", err
		}
		return fmt.Sprintf("ctr -n %s images pull --snapshotter overlayfs %s", freshNamespace, c.rec.Target), nil
	})
	var out string
	d.step("run the committed image", func() (string, error) {
		var err error
		out, err = d.env.Run(ctx, harness.UniqueID("demo-committed-"), c.rec.Target, "overlayfs", "tail", "-n", "2", logFile)
		if err != nil {
			return "", err
		}
		lines := strings.Split(strings.TrimSpace(out), "\n")
		want := fmt.Sprintf("write %d at", c.last)
		if !strings.HasPrefix(lines[len(lines)-1], want) {
			return "", fmt.Errorf("the committed image's %s ends with %q, the capture with write %d", logFile, lines[len(lines)-1], c.last)
		}
		return fmt.Sprintf("its %s ends at write %d, as the capture did", logFile, c.last), nil
	})
	d.show(out)
}
