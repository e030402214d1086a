//go:build linux

package main

import (
	"fmt"
	"sort"
	"strings"

	"github.com/containerd/containerd/v2/core/containers"
)

// nameLabel is the label nerdctl keeps a container's name in.
const nameLabel = "nerdctl/name"

// resolveContainer finds the container query names among all (the
// containers of one namespace), in the order docker uses: an exact ID,
// then an exact nerdctl name, then a unique ID prefix. The name comes
// before the prefix so that a container named "cafe" is never mistaken
// for another whose ID happens to start with cafe.
func resolveContainer(query, namespace string, all []containers.Container) (containers.Container, error) {
	if query == "" {
		return containers.Container{}, usageErrorf("empty container")
	}
	var named, prefixed []containers.Container
	for _, c := range all {
		switch {
		case c.ID == query:
			return c, nil
		case c.Labels[nameLabel] == query:
			named = append(named, c)
		case strings.HasPrefix(c.ID, query):
			prefixed = append(prefixed, c)
		}
	}
	for _, matches := range [][]containers.Container{named, prefixed} {
		switch len(matches) {
		case 0:
			continue
		case 1:
			return matches[0], nil
		}
		return containers.Container{}, fmt.Errorf("%q is ambiguous in namespace %q: it matches containers %s; give more of the ID",
			query, namespace, describe(matches))
	}
	return containers.Container{}, &notFoundError{fmt.Sprintf("no container %q in namespace %q (looked for an ID, a nerdctl name and an ID prefix)", query, namespace)}
}

// describe lists containers as "id (name)", sorted by ID.
func describe(cs []containers.Container) string {
	var s []string
	for _, c := range cs {
		d := c.ID
		if name := c.Labels[nameLabel]; name != "" {
			d += " (" + name + ")"
		}
		s = append(s, d)
	}
	sort.Strings(s)
	return strings.Join(s, ", ")
}

// checkCommittable checks that a container's writable layer is a snapshot
// of our snapshotter.
func checkCommittable(c containers.Container, snapshotter string) error {
	if c.Snapshotter != snapshotter {
		used := c.Snapshotter
		if used == "" {
			used = "none"
		}
		return fmt.Errorf("container %s uses the %q snapshotter, not %q: only containers created with --snapshotter %s can be committed seamlessly",
			c.ID, used, snapshotter, snapshotter)
	}
	if c.SnapshotKey == "" {
		return fmt.Errorf("container %s has no writable snapshot (no snapshot key)", c.ID)
	}
	return nil
}
