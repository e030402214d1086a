//go:build linux

package snapshotter

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	bolt "go.etcd.io/bbolt"

	"github.com/seamless-snapshotter/seamless-snapshotter/overlay"
)

// What the converter (package convert) needs of the snapshotter: the job
// records live in the snapshotter's database beside the snapshots, so that
// a capture and its job are recorded in one transaction.

// UpdateCommit changes a commit record in one transaction: fn sees the
// current record and edits it; an error from fn leaves the record as it
// was. UpdatedAt is set on success.
func (o *Snapshotter) UpdateCommit(ctx context.Context, id string, fn func(*Commit) error) (Commit, error) {
	var c Commit
	err := withTransaction(ctx, o.ms, true, func(_ context.Context, tx *bolt.Tx) (err error) {
		if c, err = getCommit(tx, id); err != nil {
			return err
		}
		if err := fn(&c); err != nil {
			return err
		}
		if c.ID != id {
			return fmt.Errorf("commit %s: the ID cannot change: %w", id, errdefs.ErrInvalidArgument)
		}
		c.UpdatedAt = time.Now().UTC()
		return putCommit(tx, c)
	})
	return c, err
}

// CaptureUpper is the directory holding a commit's captured upper layer:
// whiteouts, opaque dirs and overlay xattrs exactly as the container's
// upperdir had them at the capture instant.
func (o *Snapshotter) CaptureUpper(commitID string) string { return o.layout.CaptureUpper(commitID) }

// RemoveCapture deletes a commit's capture once no job needs it. The
// record says so first: if the removal is cut short, recovery at the next
// start deletes what is left, as it does for any capture no record owns.
func (o *Snapshotter) RemoveCapture(ctx context.Context, commitID string) error {
	if _, err := o.UpdateCommit(ctx, commitID, func(c *Commit) error {
		if c.State == StateCapturing {
			return fmt.Errorf("commit %s is still capturing: %w", commitID, errdefs.ErrFailedPrecondition)
		}
		c.CaptureRemoved = true
		return nil
	}); err != nil {
		return err
	}
	dir := o.layout.CaptureDir(commitID)
	remove := overlay.RemoveTree
	if overlay.IsSubvolume(dir) {
		remove = func(dir string) error { return o.removeSubvolume(ctx, dir, true) }
	}
	// Deleting a tree as large as the container's layer takes seconds
	// of CPU, while the containers run: on a background thread.
	var err error
	o.bgClass.Run(func() { err = remove(dir) })
	if err != nil {
		return fmt.Errorf("remove capture of commit %s: %w", commitID, err)
	}
	log.G(ctx).WithField("commit", commitID).Debug("capture removed")
	return nil
}

// SnapshotIDs returns the IDs of every snapshot that exists, so that the
// converter can tell which containers are gone.
func (o *Snapshotter) SnapshotIDs(ctx context.Context) (map[string]bool, error) {
	ids := map[string]bool{}
	err := withTransaction(ctx, o.ms, false, func(ctx context.Context, _ *bolt.Tx) error {
		m, err := storage.IDMap(ctx)
		for id := range m {
			ids[id] = true
		}
		return err
	})
	return ids, err
}
