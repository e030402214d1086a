package snapshotter

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
)

// remappedRoot returns the host uid and gid that container root maps to,
// from the snapshot's user-namespace labels ("ctrID:hostID:size[,...]", as
// containerd writes them). ok is false when the labels are absent.
func remappedRoot(labels map[string]string) (uid, gid int, ok bool, err error) {
	uidMap, hasUID := labels[snapshots.LabelSnapshotUIDMapping]
	gidMap, hasGID := labels[snapshots.LabelSnapshotGIDMapping]
	if !hasUID && !hasGID {
		return 0, 0, false, nil
	}
	if uid, err = hostIDOfRoot(uidMap); err != nil {
		return 0, 0, false, fmt.Errorf("label %s: %w", snapshots.LabelSnapshotUIDMapping, err)
	}
	if gid, err = hostIDOfRoot(gidMap); err != nil {
		return 0, 0, false, fmt.Errorf("label %s: %w", snapshots.LabelSnapshotGIDMapping, err)
	}
	return uid, gid, true, nil
}

func hostIDOfRoot(mapping string) (int, error) {
	if mapping == "" {
		return 0, fmt.Errorf("empty mapping: %w", errdefs.ErrInvalidArgument)
	}
	for _, m := range strings.Split(mapping, ",") {
		parts := strings.Split(m, ":")
		if len(parts) != 3 {
			return 0, fmt.Errorf("mapping %q is not ctrID:hostID:size: %w", m, errdefs.ErrInvalidArgument)
		}
		var n [3]uint32
		for i, p := range parts {
			v, err := strconv.ParseUint(p, 10, 32)
			if err != nil {
				return 0, fmt.Errorf("mapping %q: %w", m, errdefs.ErrInvalidArgument)
			}
			n[i] = uint32(v)
		}
		ctrID, hostID, size := n[0], n[1], n[2]
		if ctrID == 0 && size > 0 {
			return int(hostID), nil
		}
	}
	return 0, fmt.Errorf("mapping %q does not map container root: %w", mapping, errdefs.ErrInvalidArgument)
}

func owner(path string) (uid, gid int, err error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return 0, 0, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, 0, fmt.Errorf("stat %s: no owner information", path)
	}
	return int(st.Uid), int(st.Gid), nil
}
