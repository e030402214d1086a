package snapshotter

import (
	"time"

	"github.com/seamless-snapshotter/seamless-snapshotter/config"
	"github.com/seamless-snapshotter/seamless-snapshotter/overlay"
)

type settings struct {
	syncRemove    bool
	upperdirLabel bool
	mountOptions  []string
	lockTimeout   time.Duration
	commit        config.Commit
	observers     []func(Commit)
	bootID        string
}

// Option configures a Snapshotter.
type Option func(*settings) error

// WithSyncRemove makes Remove delete a snapshot's directories before it
// returns. By default, as in containerd's overlay plugin, Remove only drops
// the metadata and the next Cleanup (run by containerd's garbage collector)
// reclaims the disk space, keeping Remove fast under containerd's lock.
func WithSyncRemove(s *settings) error {
	s.syncRemove = true
	return nil
}

// WithUpperdirLabel adds the label containerd.io/snapshot/overlay.upperdir,
// the path of the snapshot's upperdir, to every Info returned.
func WithUpperdirLabel(s *settings) error {
	s.upperdirLabel = true
	return nil
}

// WithMountOptions adds options to every overlay mount (not to bind mounts).
func WithMountOptions(options []string) Option {
	return func(s *settings) error {
		if err := overlay.ValidateOptions(options); err != nil {
			return err
		}
		s.mountOptions = append(s.mountOptions, options...)
		return nil
	}
}

// WithLockTimeout bounds the wait for the metadata database's file lock,
// which another process using the same root holds.
func WithLockTimeout(d time.Duration) Option {
	return func(s *settings) error {
		s.lockTimeout = d
		return nil
	}
}

// WithCommitConfig configures seamless commits (strategy, pause budget,
// pre-copy); config.DefaultCommit() otherwise.
func WithCommitConfig(c config.Commit) Option {
	return func(s *settings) error {
		if err := c.Validate(); err != nil {
			return err
		}
		s.commit = c
		return nil
	}
}

// WithCommitObserver calls fn with the record of every capture that ends,
// in success or failure (for metrics). fn must be quick and must not call
// back into the snapshotter.
func WithCommitObserver(fn func(Commit)) Option {
	return func(s *settings) error {
		s.observers = append(s.observers, fn)
		return nil
	}
}

// WithBootID sets the identity of the kernel boot the snapshotter runs in,
// read from /proc/sys/kernel/random/boot_id otherwise (tests simulate a
// reboot with it). A capture not yet flushed when the host went down is
// not trusted after it.
func WithBootID(id string) Option {
	return func(s *settings) error {
		s.bootID = id
		return nil
	}
}

// ConfigOptions translates the [snapshotter] and [commit] sections of the
// configuration.
func ConfigOptions(c config.Snapshotter, commit config.Commit) []Option {
	opts := []Option{WithCommitConfig(commit)}
	if c.SyncRemove {
		opts = append(opts, WithSyncRemove)
	}
	if c.UpperdirLabel {
		opts = append(opts, WithUpperdirLabel)
	}
	if len(c.MountOptions) > 0 {
		opts = append(opts, WithMountOptions(c.MountOptions))
	}
	return opts
}
