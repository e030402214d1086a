//go:build linux

package convert

import (
	"context"

	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// Store is what the converter needs of the snapshotter: the commit records
// (the job queue) and the captures.
type Store interface {
	ListCommits(ctx context.Context) ([]snapshotter.Commit, error)
	GetCommit(ctx context.Context, id string) (snapshotter.Commit, error)
	UpdateCommit(ctx context.Context, id string, fn func(*snapshotter.Commit) error) (snapshotter.Commit, error)
	CaptureUpper(commitID string) string
	RemoveCapture(ctx context.Context, commitID string) error
	SnapshotIDs(ctx context.Context) (map[string]bool, error)
	// WaitUnfrozen blocks while a capture holds a container frozen: the
	// converter steps aside for it.
	WaitUnfrozen(ctx context.Context) error
}

var _ Store = (*snapshotter.Snapshotter)(nil)
