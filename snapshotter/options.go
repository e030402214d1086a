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

// ConfigOptions translates the [snapshotter] section of the configuration.
func ConfigOptions(c config.Snapshotter) []Option {
	var opts []Option
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
