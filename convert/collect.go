//go:build linux

package convert

import (
	"context"
	"errors"

	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// collect releases the captures (and the leases on their blobs) that no
// job can need any more. A container's newest published commit keeps its
// capture and blobs while the container exists or has commits to convert:
// the next commit's layer is the difference from it. Everything else ends
// with its job.
func (cv *Converter) collect(ctx context.Context) error {
	all, err := cv.store.ListCommits(ctx)
	if err != nil {
		return err
	}
	var release []snapshotter.Commit
	for _, c := range all {
		if !c.CaptureRemoved && c.State.Terminal() {
			release = append(release, c)
		}
	}
	if len(release) == 0 {
		return nil
	}
	live, err := cv.store.SnapshotIDs(ctx)
	if err != nil {
		return err
	}
	keep := keptCommits(all, live)
	var errs []error
	for _, c := range release {
		if keep[c.ID] {
			continue
		}
		if err := cv.dropLease(ctx, c); err != nil {
			errs = append(errs, err)
			continue // keep the capture, so that the lease is retried
		}
		if err := cv.store.RemoveCapture(ctx, c.ID); err != nil {
			errs = append(errs, err)
			continue
		}
		log.G(ctx).WithFields(log.Fields{"commit": c.ID, "state": c.State}).Debug("capture released")
	}
	return errors.Join(errs...)
}

// keptCommits returns the commits whose capture a future job may need:
// per container, the newest done commit, while the container exists or
// has unfinished commits.
func keptCommits(all []snapshotter.Commit, liveSnapshots map[string]bool) map[string]bool {
	newest := map[string]snapshotter.Commit{}
	unfinished := map[string]bool{}
	for _, c := range all {
		if !c.State.Terminal() {
			unfinished[c.SnapshotID] = true
			continue
		}
		if c.State != snapshotter.StateDone || c.CaptureRemoved {
			continue
		}
		if n, ok := newest[c.SnapshotID]; !ok || c.Generation > n.Generation {
			newest[c.SnapshotID] = c
		}
	}
	keep := map[string]bool{}
	for snap, c := range newest {
		if liveSnapshots[snap] || unfinished[snap] {
			keep[c.ID] = true
		}
	}
	return keep
}

// dropLease deletes a commit's lease; its blobs stay as long as an image
// (a local import) or a later commit's lease refers to them.
func (cv *Converter) dropLease(ctx context.Context, c snapshotter.Commit) error {
	ns, _, err := splitKey(c.SnapshotKey)
	if err != nil {
		return nil // never converted: no lease
	}
	if c.Attempts == 0 {
		return nil // no job ever ran: no lease
	}
	client, err := cv.containerd(ctx)
	if err != nil {
		return err
	}
	ctx = namespaces.WithNamespace(ctx, ns)
	err = client.LeasesService().Delete(ctx, leases.Lease{ID: leasePrefix + c.ID})
	if err != nil && !errdefs.IsNotFound(err) {
		return err
	}
	return nil
}

// diskUsage is the space a capture's files take, each inode counted once
// (extents shared with reflinks or snapshots are counted too), as
// containerd's snapshotters compute Usage; 0 if it cannot be read.
func diskUsage(ctx context.Context, dir string) int64 {
	u, err := fs.DiskUsage(ctx, dir)
	if err != nil {
		return 0
	}
	return u.Size
}
