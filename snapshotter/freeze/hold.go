//go:build linux

package freeze

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// ActiveHold keeps the kernel's cgroup v1 freezer switched on between
// freezes, by keeping one empty cgroup of its own frozen.
//
// Why: the v1 freezer guards the kernel's freezing checks with a static key
// (freezer_active in kernel/cgroup/legacy_freezer.c) that it enables when
// the first cgroup starts freezing and disables when the last one thaws.
// Flipping a static key patches kernel text on every CPU: measured on a
// 2-vCPU VM with Linux 6.18, about 5 ms to freeze and 10 ms to thaw, where
// the same round trip takes about 0.3 ms while another cgroup is frozen.
// The thaw's share is pure stall: the tasks resume only after the key is
// flipped. An empty frozen cgroup keeps the key enabled; what that costs is
// a slower path in the kernel's freezing() checks, the state every host is
// in while any container is paused.
//
// The v2 freezer has no such key: on a unified host HoldActive does
// nothing.
type ActiveHold struct {
	mu sync.Mutex
	cg *Cgroup // nil: nothing held
}

// HoldActive creates (or reuses, after a crash) the empty cgroup name at the
// top of the v1 freezer hierarchy and freezes it, if this host freezes
// containers through v1 (see the package comment). Release it at shutdown.
// name must be a single path element, e.g. "containerd-seamless-hold".
func HoldActive(ctx context.Context, name string) (*ActiveHold, error) {
	if name == "" || name == "." || name == ".." || strings.Contains(name, "/") {
		return nil, fmt.Errorf("hold cgroup name %q must be one path element: %w", name, errdefs.ErrInvalidArgument)
	}
	h, err := findHierarchy()
	if err != nil {
		return nil, err
	}
	if h.version != V1 {
		return &ActiveHold{}, nil
	}
	cg := Cgroup{Path: filepath.Join(h.mountpoint, name), Version: V1}
	if err := os.Mkdir(cg.Path, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("create freezer hold cgroup: %w", err)
	}
	// Nothing must run in it: anything that did would be frozen for as
	// long as the daemon runs.
	if b, err := os.ReadFile(filepath.Join(cg.Path, "cgroup.procs")); err != nil {
		return nil, fmt.Errorf("freezer hold cgroup %s: %w", cg.Path, err)
	} else if len(strings.TrimSpace(string(b))) > 0 {
		return nil, fmt.Errorf("freezer hold cgroup %s is not empty: %w", cg.Path, errdefs.ErrFailedPrecondition)
	}
	if err := cg.requestFreeze(); err != nil {
		return nil, fmt.Errorf("freeze the freezer hold cgroup: %w", err)
	}
	log.G(ctx).WithField("cgroup", cg.Path).Debug("holding the cgroup v1 freezer active")
	return &ActiveHold{cg: &cg}, nil
}

// Release thaws and removes the hold's cgroup. It is idempotent.
func (a *ActiveHold) Release(ctx context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cg == nil {
		return nil
	}
	if err := a.cg.thaw(); err != nil && !errdefs.IsNotFound(err) {
		return fmt.Errorf("release freezer hold: %w", err)
	}
	if err := os.Remove(a.cg.Path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("release freezer hold: %w", err)
	}
	log.G(ctx).WithField("cgroup", a.cg.Path).Debug("released the cgroup v1 freezer hold")
	a.cg = nil
	return nil
}
