//go:build linux

package integration

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshotter/seamless-snapshotter/config"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/harness"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
)

// strategyFS is a filesystem for the daemon's root and the capture
// strategy the daemon picks on it automatically.
type strategyFS struct {
	fstype   string
	strategy string
}

// strategyFilesystems lists one filesystem per capture strategy.
func strategyFilesystems() []strategyFS {
	return []strategyFS{
		{"ext4", config.StrategyCopy},
		{"xfs", config.StrategyReflink},
		{"btrfs", config.StrategyBtrfs},
	}
}

// daemonRootOn returns harness options that put the daemon's root on a
// filesystem of type fstype. If the default root (a test temp dir) is on
// such a filesystem already, it is used as is: no loop device, and the
// machine's real disk. Otherwise the root goes on a loop-mounted
// filesystem of size bytes made with mkfsArgs (testutil.LoopFS), which the
// test's cleanup removes.
func daemonRootOn(t *testing.T, fstype string, size int64, mkfsArgs ...string) harness.Options {
	t.Helper()
	harness.Require(t)
	if isFSType(os.TempDir(), fstype) {
		return harness.Options{}
	}
	mnt := testutil.LoopFS(t, fstype, size, mkfsArgs...)
	return harness.Options{Daemon: harness.DaemonOptions{Root: filepath.Join(mnt, "seamless")}}
}

// isFSType reports whether dir is on a filesystem of type fstype (one of
// those strategyFilesystems lists).
func isFSType(dir, fstype string) bool {
	var st unix.Statfs_t
	if unix.Statfs(dir, &st) != nil {
		return false
	}
	switch fstype {
	case "ext4":
		return st.Type == unix.EXT4_SUPER_MAGIC
	case "xfs":
		return st.Type == unix.XFS_SUPER_MAGIC
	case "btrfs":
		return st.Type == unix.BTRFS_SUPER_MAGIC
	}
	return false
}
