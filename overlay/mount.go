//go:build linux

package overlay

import (
	"fmt"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
)

// MountSpec describes the snapshot whose mounts are wanted.
type MountSpec struct {
	ID string
	// ParentIDs lists the committed parents, nearest first.
	ParentIDs []string
	// Active is true for a writable snapshot, false for a view.
	Active bool
	// Options are appended to the overlay mount (never to bind mounts):
	// the configured and detected options such as userxattr or index=off.
	Options []string
	// IDMapOptions (uidmap=, gidmap=) apply to every mount kind.
	IDMapOptions []string
}

// Mounts returns the mounts that make up a snapshot, like containerd's
// overlay snapshotter: a bind mount when there is a single layer (overlay
// needs at least one lower), an overlay otherwise.
func (l Layout) Mounts(s MountSpec) []mount.Mount {
	options := append([]string(nil), s.IDMapOptions...)

	if len(s.ParentIDs) == 0 {
		mode := "ro"
		if s.Active {
			mode = "rw"
		}
		return []mount.Mount{{
			Type:    "bind",
			Source:  l.UpperDir(s.ID),
			Options: append(options, mode, "rbind"),
		}}
	}

	if !s.Active && len(s.ParentIDs) == 1 {
		// A view of a single committed layer needs no overlay.
		return []mount.Mount{{
			Type:    "bind",
			Source:  l.UpperDir(s.ParentIDs[0]),
			Options: append(options, "ro", "rbind"),
		}}
	}

	if s.Active {
		options = append(options,
			"workdir="+l.WorkDir(s.ID),
			"upperdir="+l.UpperDir(s.ID),
		)
	}
	lowers := make([]string, len(s.ParentIDs))
	for i, id := range s.ParentIDs {
		lowers[i] = l.UpperDir(id)
	}
	options = append(options, "lowerdir="+strings.Join(lowers, ":"))
	options = append(options, s.Options...)
	return []mount.Mount{{
		Type:    "overlay",
		Source:  "overlay",
		Options: options,
	}}
}

// reservedOptions are set by the snapshotter per snapshot; a configured
// option with one of these keys would break every mount.
var reservedOptions = []string{"lowerdir", "upperdir", "workdir"}

// ValidateOptions rejects configured overlay options that the snapshotter
// owns.
func ValidateOptions(options []string) error {
	for _, o := range options {
		key, _, _ := strings.Cut(o, "=")
		for _, r := range reservedOptions {
			if key == r {
				return fmt.Errorf("mount option %q is set by the snapshotter and cannot be configured", o)
			}
		}
		if strings.Contains(o, ",") {
			return fmt.Errorf("mount option %q: give one option per list entry", o)
		}
	}
	return nil
}

// HasOption reports whether key is present in options, bare or as key=value.
func HasOption(options []string, key string) bool {
	for _, o := range options {
		if k, _, _ := strings.Cut(o, "="); k == key {
			return true
		}
	}
	return false
}
