//go:build linux

package overlay

import (
	"reflect"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
)

func TestMounts(t *testing.T) {
	l := NewLayout("/r")
	extra := []string{"index=off"}
	for _, tc := range []struct {
		name string
		spec MountSpec
		want []mount.Mount
	}{
		{
			name: "active without parent is a writable bind",
			spec: MountSpec{ID: "1", Active: true, Options: extra},
			want: []mount.Mount{{Type: "bind", Source: "/r/snapshots/1/fs", Options: []string{"rw", "rbind"}}},
		},
		{
			name: "view without parent is a read-only bind",
			spec: MountSpec{ID: "1", Options: extra},
			want: []mount.Mount{{Type: "bind", Source: "/r/snapshots/1/fs", Options: []string{"ro", "rbind"}}},
		},
		{
			name: "view of one layer binds the layer",
			spec: MountSpec{ID: "2", ParentIDs: []string{"1"}, Options: extra},
			want: []mount.Mount{{Type: "bind", Source: "/r/snapshots/1/fs", Options: []string{"ro", "rbind"}}},
		},
		{
			name: "active on layers is an overlay, nearest lower first",
			spec: MountSpec{ID: "3", ParentIDs: []string{"2", "1"}, Active: true, Options: extra},
			want: []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{
				"workdir=/r/snapshots/3/work", "upperdir=/r/snapshots/3/fs",
				"lowerdir=/r/snapshots/2/fs:/r/snapshots/1/fs", "index=off",
			}}},
		},
		{
			name: "view of two layers is a read-only overlay",
			spec: MountSpec{ID: "3", ParentIDs: []string{"2", "1"}, Options: extra},
			want: []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{
				"lowerdir=/r/snapshots/2/fs:/r/snapshots/1/fs", "index=off",
			}}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := l.Mounts(tc.spec); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got  %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestValidateOptions(t *testing.T) {
	for _, tc := range []struct {
		options []string
		ok      bool
	}{
		{nil, true},
		{[]string{"volatile", "index=on", "metacopy=off"}, true},
		{[]string{"upperdir=/x"}, false},
		{[]string{"lowerdir=/a:/b"}, false},
		{[]string{"workdir=/w"}, false},
		{[]string{"volatile,index=on"}, false},
	} {
		if err := ValidateOptions(tc.options); (err == nil) != tc.ok {
			t.Errorf("%v: got %v, want ok=%v", tc.options, err, tc.ok)
		}
	}
}

func TestHasOption(t *testing.T) {
	opts := []string{"userxattr", "index=on"}
	for key, want := range map[string]bool{"userxattr": true, "index": true, "metacopy": false, "index=on": false} {
		if got := HasOption(opts, key); got != want {
			t.Errorf("HasOption(%q) = %v, want %v", key, got, want)
		}
	}
}
