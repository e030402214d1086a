//go:build linux

package main

import (
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/errdefs"
)

func TestResolveContainer(t *testing.T) {
	ctr := func(id, name string) containers.Container {
		c := containers.Container{ID: id, SnapshotKey: id, Snapshotter: "seamless"}
		if name != "" {
			c.Labels = map[string]string{nameLabel: name}
		}
		return c
	}
	all := []containers.Container{
		ctr("3f2a9c01", "web"),
		ctr("3f2a9c02", ""),
		ctr("cafe0001", ""),
		ctr("b0b0", "cafe"), // a name that is also a prefix of another ID
		ctr("dead0001", "dup"),
		ctr("dead0002", "dup"),
		ctr("web", "other"), // an ID equal to another container's name
	}
	for _, tc := range []struct {
		query, want string
		errHas      []string // the error must mention each
		notFound    bool
	}{
		{query: "3f2a9c01", want: "3f2a9c01"},
		{query: "3f2a9c0", errHas: []string{"ambiguous", "3f2a9c01 (web)", "3f2a9c02"}},
		{query: "3f2a9c02", want: "3f2a9c02"},
		{query: "caf", want: "cafe0001"},
		{query: "cafe", want: "b0b0"}, // name before prefix
		{query: "web", want: "web"},   // exact ID before name
		{query: "other", want: "web"}, // by name
		{query: "dup", errHas: []string{"ambiguous", "dead0001", "dead0002"}},
		{query: "dead", errHas: []string{"ambiguous", "dead0001 (dup)", "dead0002 (dup)"}},
		{query: "nope", errHas: []string{`no container "nope" in namespace "ns"`}, notFound: true},
		{query: "3f2a9c011", errHas: []string{"no container"}, notFound: true},
		{query: "", errHas: []string{"empty"}},
	} {
		t.Run(tc.query, func(t *testing.T) {
			got, err := resolveContainer(tc.query, "ns", all)
			if tc.errHas == nil {
				if err != nil || got.ID != tc.want {
					t.Fatalf("got %q, %v; want %q", got.ID, err, tc.want)
				}
				return
			}
			if err == nil {
				t.Fatalf("got %q, want an error", got.ID)
			}
			for _, s := range tc.errHas {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not mention %q", err, s)
				}
			}
			if errdefs.IsNotFound(err) != tc.notFound {
				t.Errorf("error %q: not found is %v, want %v", err, errdefs.IsNotFound(err), tc.notFound)
			}
		})
	}
	if _, err := resolveContainer("x", "ns", nil); exitCode(err) != exitNotFound {
		t.Errorf("empty namespace: %v exits %d", err, exitCode(err))
	}
}

func TestCheckCommittable(t *testing.T) {
	for _, tc := range []struct {
		name   string
		c      containers.Container
		errHas string
	}{
		{"seamless", containers.Container{ID: "a", Snapshotter: "seamless", SnapshotKey: "a"}, ""},
		{"overlayfs", containers.Container{ID: "a", Snapshotter: "overlayfs", SnapshotKey: "a"}, `container a uses the "overlayfs" snapshotter, not "seamless"`},
		{"no snapshotter", containers.Container{ID: "a"}, `uses the "none" snapshotter`},
		{"no snapshot", containers.Container{ID: "a", Snapshotter: "seamless"}, "no writable snapshot"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkCommittable(tc.c, "seamless")
			if tc.errHas == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.errHas) {
				t.Fatalf("got %v, want an error with %q", err, tc.errHas)
			}
			if exitCode(err) != exitError {
				t.Errorf("exit code %d, want %d", exitCode(err), exitError)
			}
		})
	}
}
