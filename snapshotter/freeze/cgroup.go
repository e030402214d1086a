//go:build linux

package freeze

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// Version is the cgroup hierarchy a Cgroup is frozen through.
type Version int

const (
	// V1 is the cgroup v1 freezer controller (freezer.state).
	V1 Version = 1
	// V2 is the unified hierarchy (cgroup.freeze, cgroup.events).
	V2 Version = 2
)

func (v Version) String() string {
	switch v {
	case V1:
		return "v1"
	case V2:
		return "v2"
	}
	return "v" + strconv.Itoa(int(v))
}

// State is a cgroup's effective freezer state.
type State string

const (
	// StateThawed: the processes run.
	StateThawed State = "THAWED"
	// StateFreezing: a freeze was requested and some processes still run.
	StateFreezing State = "FREEZING"
	// StateFrozen: every process of the cgroup (and of its descendants) is frozen,
	// whether this cgroup or one of its ancestors was asked to freeze.
	StateFrozen State = "FROZEN"
)

// Files of the freezer interfaces.
const (
	v1StateFile  = "freezer.state"
	v2FreezeFile = "cgroup.freeze"
	v2EventsFile = "cgroup.events"
)

// Cgroup is a cgroup that can be frozen.
type Cgroup struct {
	// Path is the cgroup's directory, e.g.
	// /sys/fs/cgroup/freezer/default/redis (v1) or
	// /sys/fs/cgroup/system.slice/cri-containerd-abc.scope (v2).
	Path    string
	Version Version
	// PIDs are the processes given to CgroupsOf that belong to this cgroup.
	// Empty for a Cgroup made by CgroupAt.
	PIDs []int
}

// CgroupAt returns the freezable cgroup at path, telling its version from the
// interface files it has. It is meant for crash recovery, where only the
// recorded path is known. A path that does not exist (the container is gone)
// gives errdefs.ErrNotFound; a directory that is not a freezable cgroup (a
// root cgroup has no freezer files) gives errdefs.ErrInvalidArgument.
func CgroupAt(path string) (Cgroup, error) {
	if !filepath.IsAbs(path) {
		return Cgroup{}, fmt.Errorf("cgroup path %q is not absolute: %w", path, errdefs.ErrInvalidArgument)
	}
	path = filepath.Clean(path)
	// The filesystem type, not just the files' names, decides: a recorded
	// path must never make us write "THAWED" into an ordinary file.
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return Cgroup{}, fmt.Errorf("cgroup %s: %w", path, notFound(err))
	}
	var v Version
	var file string
	switch st.Type {
	case unix.CGROUP_SUPER_MAGIC:
		v, file = V1, v1StateFile
	case unix.CGROUP2_SUPER_MAGIC:
		v, file = V2, v2FreezeFile
	default:
		return Cgroup{}, fmt.Errorf("%s is not on a cgroup filesystem: %w", path, errdefs.ErrInvalidArgument)
	}
	if _, err := os.Stat(filepath.Join(path, file)); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return Cgroup{}, fmt.Errorf("%s is not a freezable cgroup (no %s; a root cgroup, or a hierarchy without the freezer): %w",
				path, file, errdefs.ErrInvalidArgument)
		}
		return Cgroup{}, fmt.Errorf("cgroup %s: %w", path, err)
	}
	return Cgroup{Path: path, Version: v}, nil
}

// State reads the cgroup's effective freezer state. It does not change
// anything and is cheap (one or two small reads of cgroupfs).
func (c Cgroup) State() (State, error) {
	switch c.Version {
	case V1:
		s, err := readFile(c.Path, v1StateFile)
		if err != nil {
			return "", err
		}
		switch st := State(s); st {
		case StateThawed, StateFreezing, StateFrozen:
			return st, nil
		}
		return "", fmt.Errorf("cgroup %s: unexpected %s %q", c.Path, v1StateFile, s)
	case V2:
		frozen, err := v2Frozen(c.Path)
		if err != nil {
			return "", err
		}
		if frozen {
			return StateFrozen, nil
		}
		// cgroup.events says "frozen 0" both while thawed and while a freeze
		// of this cgroup is in progress; cgroup.freeze tells them apart.
		s, err := readFile(c.Path, v2FreezeFile)
		if err != nil {
			return "", err
		}
		if s == "1" {
			return StateFreezing, nil
		}
		return StateThawed, nil
	}
	return "", fmt.Errorf("cgroup %s: unknown cgroup version %d: %w", c.Path, int(c.Version), errdefs.ErrInvalidArgument)
}

// requestFreeze asks the kernel to freeze the cgroup. It does not wait: the
// kernel freezes the tasks asynchronously.
func (c Cgroup) requestFreeze() error {
	switch c.Version {
	case V1:
		return writeFile(c.Path, v1StateFile, string(StateFrozen))
	case V2:
		return writeFile(c.Path, v2FreezeFile, "1")
	}
	return fmt.Errorf("cgroup %s: unknown cgroup version %d: %w", c.Path, int(c.Version), errdefs.ErrInvalidArgument)
}

// thaw asks the kernel to thaw the cgroup; thawing takes effect at once.
func (c Cgroup) thaw() error {
	switch c.Version {
	case V1:
		return writeFile(c.Path, v1StateFile, string(StateThawed))
	case V2:
		return writeFile(c.Path, v2FreezeFile, "0")
	}
	return fmt.Errorf("cgroup %s: unknown cgroup version %d: %w", c.Path, int(c.Version), errdefs.ErrInvalidArgument)
}

// v2Frozen reports whether cgroup.events says "frozen 1". That, not
// cgroup.freeze, is the kernel's statement that every task has stopped.
func v2Frozen(dir string) (bool, error) {
	s, err := readFile(dir, v2EventsFile)
	if err != nil {
		return false, err
	}
	for line := range strings.SplitSeq(s, "\n") {
		if k, v, ok := strings.Cut(line, " "); ok && k == "frozen" {
			return v == "1", nil
		}
	}
	return false, fmt.Errorf("cgroup %s: no \"frozen\" key in %s (kernel older than 5.2?): %w",
		dir, v2EventsFile, errdefs.ErrNotImplemented)
}

// hierarchy is a mounted cgroup hierarchy that freezes.
type hierarchy struct {
	version    Version
	mountpoint string
	// root is the cgroup shown at mountpoint (the mountinfo root field):
	// "/" unless the hierarchy is mounted from inside a cgroup namespace or
	// a sub-cgroup was bind-mounted.
	root string
}

// findHierarchy returns the hierarchy that the container runtime freezes
// through on this host. runc (and containerd's cgroups library) decide by
// whether /sys/fs/cgroup itself is cgroup2: if it is, the host is unified and
// v2 is the only choice; otherwise runc's v1 manager pauses a container
// through the v1 freezer controller, also on a hybrid host where the
// container's processes are in the v2 hierarchy too. Freezing through the
// same interface as the runtime is what makes a user's pause visible to us
// (and ours to the user). A hybrid host without a v1 freezer mount falls
// back to v2: the runtime cannot pause there at all, so there is nothing to
// stay consistent with.
func findHierarchy() (hierarchy, error) {
	var order []Version
	switch mode := cgroups.Mode(); mode {
	case cgroups.Unified:
		order = []Version{V2}
	case cgroups.Hybrid:
		order = []Version{V1, V2}
	case cgroups.Legacy:
		order = []Version{V1}
	default:
		return hierarchy{}, fmt.Errorf("no cgroup hierarchy is mounted at /sys/fs/cgroup: %w", errdefs.ErrNotImplemented)
	}
	for _, v := range order {
		h, err := mountedHierarchy(v)
		if err == nil {
			return h, nil
		}
		if !errdefs.IsNotFound(err) {
			return hierarchy{}, err
		}
	}
	return hierarchy{}, fmt.Errorf("no mounted cgroup hierarchy with a freezer (tried %v): %w", order, errdefs.ErrNotImplemented)
}

// mountedHierarchy finds where the hierarchy of version v is mounted, from
// mountinfo rather than by assuming /sys/fs/cgroup/{freezer,unified}.
func mountedHierarchy(v Version) (hierarchy, error) {
	mounts, err := mountinfo.GetMounts(func(m *mountinfo.Info) (skip, stop bool) {
		switch v {
		case V1:
			// A v1 hierarchy's super options name its controllers; freezer
			// may share a hierarchy with others ("rw,freezer,cpu").
			return m.FSType != "cgroup" || !slices.Contains(strings.Split(m.VFSOptions, ","), "freezer"), false
		case V2:
			return m.FSType != "cgroup2", false
		}
		return true, false
	})
	if err != nil {
		return hierarchy{}, fmt.Errorf("read mountinfo: %w", err)
	}
	if len(mounts) == 0 {
		return hierarchy{}, fmt.Errorf("cgroup %v hierarchy is not mounted: %w", v, errdefs.ErrNotFound)
	}
	// Prefer a mount of the whole hierarchy; several mounts of one hierarchy
	// are all equivalent otherwise, so take the first (the oldest).
	best := mounts[0]
	for _, m := range mounts {
		if m.Root == "/" {
			best = m
			break
		}
	}
	return hierarchy{version: v, mountpoint: best.Mountpoint, root: best.Root}, nil
}

// cgroupOf returns the cgroup path (as in /proc/PID/cgroup, relative to the
// hierarchy's root) of process pid ("self" for this process) in h.
func (h hierarchy) cgroupOf(pid string) (string, error) {
	file := filepath.Join("/proc", pid, "cgroup")
	legacy, unified, err := cgroups.ParseCgroupFileUnified(file)
	if err != nil {
		return "", fmt.Errorf("read %s: %w", file, notFound(err))
	}
	var p string
	switch h.version {
	case V1:
		p = legacy["freezer"]
	case V2:
		p = unified
	}
	if p == "" {
		return "", fmt.Errorf("%s names no cgroup %v freezer path", file, h.version)
	}
	return p, nil
}

// dir returns the directory of the cgroup at path p.
func (h hierarchy) dir(p string) (string, error) {
	rel, ok := cutPathPrefix(p, h.root)
	if !ok {
		return "", fmt.Errorf("cgroup %s is outside the mounted part %s of the cgroup %v hierarchy at %s",
			p, h.root, h.version, h.mountpoint)
	}
	return filepath.Join(h.mountpoint, rel), nil
}

// CgroupsOf returns the distinct cgroups, in the hierarchy that the runtime
// freezes through (see the package comment), that hold the given processes,
// sorted by path. Processes that have exited are ignored.
//
// It refuses, with errdefs.ErrFailedPrecondition, a root cgroup (a process
// not in any container cgroup: freezing "/" would freeze the host) and this
// process's own cgroup or any ancestor of it: freezing ourselves would
// deadlock the thaw.
//
// A cgroup may hold processes other than pids (typically processes of the
// same container that chrooted elsewhere); they are frozen too, which is
// what a consistent capture wants.
func CgroupsOf(ctx context.Context, pids []int) ([]Cgroup, error) {
	if len(pids) == 0 {
		return nil, nil
	}
	h, err := findHierarchy()
	if err != nil {
		return nil, err
	}
	own, err := h.cgroupOf("self")
	if err != nil {
		return nil, fmt.Errorf("find our own cgroup: %w", err)
	}
	byPath := map[string]*Cgroup{}
	for _, pid := range pids {
		p, err := h.cgroupOf(strconv.Itoa(pid))
		if err != nil {
			if errdefs.IsNotFound(err) {
				log.G(ctx).WithField("pid", pid).Debug("process exited before its cgroup was read; ignoring it")
				continue
			}
			return nil, err
		}
		if err := checkFreezable(p, own); err != nil {
			return nil, fmt.Errorf("pid %d: %w", pid, err)
		}
		dir, err := h.dir(p)
		if err != nil {
			return nil, fmt.Errorf("pid %d: %w", pid, err)
		}
		cg, ok := byPath[dir]
		if !ok {
			cg = &Cgroup{Path: dir, Version: h.version}
			byPath[dir] = cg
		}
		if !slices.Contains(cg.PIDs, pid) {
			cg.PIDs = append(cg.PIDs, pid)
		}
	}
	out := make([]Cgroup, 0, len(byPath))
	for _, cg := range byPath {
		slices.Sort(cg.PIDs)
		out = append(out, *cg)
	}
	slices.SortFunc(out, func(a, b Cgroup) int { return strings.Compare(a.Path, b.Path) })
	return out, nil
}

// checkFreezable refuses the cgroup at path p (relative to its hierarchy)
// when freezing it would freeze the host or this process (whose cgroup is
// own).
func checkFreezable(p, own string) error {
	p, own = filepath.Clean(p), filepath.Clean(own)
	if p == "/" {
		return fmt.Errorf("refusing to freeze the root cgroup (the process is in no container cgroup): %w",
			errdefs.ErrFailedPrecondition)
	}
	if _, under := cutPathPrefix(own, p); under {
		return fmt.Errorf("refusing to freeze cgroup %s: it holds this process (cgroup %s), which must stay running to thaw it: %w",
			p, own, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// cutPathPrefix returns p relative to prefix (as an absolute path, "/" for
// prefix itself) if p is prefix or lies under it. It compares whole path
// elements, so "/a/b" is not under "/a/bc".
func cutPathPrefix(p, prefix string) (string, bool) {
	if prefix == "/" {
		if !strings.HasPrefix(p, "/") {
			return "", false
		}
		return p, true
	}
	if p == prefix {
		return "/", true
	}
	if rest, ok := strings.CutPrefix(p, prefix); ok && strings.HasPrefix(rest, "/") {
		return rest, true
	}
	return "", false
}

func readFile(dir, name string) (string, error) {
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		return "", fmt.Errorf("cgroup %s: %w", dir, notFound(err))
	}
	return strings.TrimSpace(string(b)), nil
}

// writeFile writes without O_CREATE or O_TRUNC: cgroupfs files exist or the
// cgroup is gone, and a missing file must not be "created" by a write.
func writeFile(dir, name, value string) error {
	f, err := os.OpenFile(filepath.Join(dir, name), os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("cgroup %s: %w", dir, notFound(err))
	}
	_, err = f.WriteString(value)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("cgroup %s: write %q to %s: %w", dir, value, name, err)
	}
	return nil
}

// notFound adds errdefs.ErrNotFound to err when it says that a file or a
// process is gone (ENOENT, or ESRCH from /proc for an exiting process).
func notFound(err error) error {
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("%w: %w", err, errdefs.ErrNotFound)
	}
	return err
}
