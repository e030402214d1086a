//go:build linux

package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/log"
	bolt "go.etcd.io/bbolt"

	"github.com/seamless-snapshotter/seamless-snapshotter/overlay"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter/freeze"
)

// recover repairs what a crash (or kill -9) in the middle of a commit left:
//   - cgroups recorded as frozen by us are thawed, so that no container
//     stays frozen because its snapshotter died;
//   - commits still "capturing" become failed;
//   - captures the host went down before flushing (made in another boot,
//     not recorded as synced) are not trusted: their jobs fail, and a
//     published commit's capture is no longer a base for the next one;
//   - temporary captures, and captures no commit record owns (failed
//     commits, and those whose removal was cut short), are removed.
//
// It runs at start, before the snapshotter serves anything.
func (o *Snapshotter) recover(ctx context.Context) error {
	var (
		intents     map[string][]string
		interrupted []Commit
		lost        []Commit
		owned       = map[string]bool{}
	)
	if err := withTransaction(ctx, o.ms, false, func(_ context.Context, tx *bolt.Tx) (err error) {
		if intents, err = freezeIntents(tx); err != nil {
			return err
		}
		return forEachCommit(tx, func(c Commit) error {
			switch {
			case c.State == StateCapturing:
				interrupted = append(interrupted, c)
			case c.State == StateFailed, c.CaptureRemoved:
			case c.BootID != "" && c.BootID != o.bootID && !c.CaptureSynced:
				lost = append(lost, c)
			default:
				owned[c.ID] = true
			}
			return nil
		})
	}); err != nil {
		return err
	}

	for commitID, paths := range intents {
		if err := freeze.ThawPaths(ctx, paths); err != nil {
			// Leave the intent for the next start; say loudly that a
			// container may still be frozen.
			log.G(ctx).WithError(err).WithField("cgroups", paths).Error("failed to thaw cgroups frozen before a crash")
			continue
		}
		log.G(ctx).WithFields(log.Fields{"commit": commitID, "cgroups": paths}).Warn("thawed cgroups left frozen by an interrupted commit")
		if err := withTransaction(ctx, o.ms, true, func(_ context.Context, tx *bolt.Tx) error {
			return deleteFreezeIntent(tx, commitID)
		}); err != nil {
			return err
		}
	}

	for _, c := range interrupted {
		c.State = StateFailed
		c.ErrorCode = CodeInterrupted
		c.Error = "the snapshotter stopped during the capture; the container was thawed and nothing was committed"
		c.UpdatedAt = time.Now().UTC()
		if err := withTransaction(ctx, o.ms, true, func(_ context.Context, tx *bolt.Tx) error {
			return putCommit(tx, c)
		}); err != nil {
			return err
		}
		log.G(ctx).WithField("commit", c.ID).Warn("commit interrupted by a restart marked failed")
	}

	for _, c := range lost {
		c.UpdatedAt = time.Now().UTC()
		c.CaptureRemoved = true // below
		if c.State != StateDone {
			c.State = StateFailed
			c.ErrorCode = CodeCaptureLost
			c.Error = "the host restarted before the capture was written to disk; it may be incomplete, so it was not converted: commit again"
			c.FinishedAt = c.UpdatedAt
		}
		if err := withTransaction(ctx, o.ms, true, func(_ context.Context, tx *bolt.Tx) error {
			return putCommit(tx, c)
		}); err != nil {
			return err
		}
		log.G(ctx).WithFields(log.Fields{"commit": c.ID, "state": c.State}).Warn("capture not flushed before the host restarted; not trusted")
	}

	entries, err := os.ReadDir(o.layout.CapturesDir())
	if err != nil {
		return fmt.Errorf("read captures: %w", err)
	}
	for _, e := range entries {
		if !overlay.IsCaptureTemp(e.Name()) && owned[e.Name()] {
			continue
		}
		dir := filepath.Join(o.layout.CapturesDir(), e.Name())
		if err := overlay.RemoveTree(dir); err != nil {
			return fmt.Errorf("remove abandoned capture: %w", err)
		}
		log.G(ctx).WithField("path", dir).Info("removed abandoned capture")
	}
	return nil
}
