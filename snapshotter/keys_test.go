package snapshotter

import (
	"errors"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

func TestValidateKey(t *testing.T) {
	for _, tc := range []struct {
		key string
		ok  bool
	}{
		{"default/12/my-container", true},
		{"k8s.io/3/sha256:abc", true},
		{"extract-123 sha256:abc", true},
		{"a..b", true},
		{"", false},
		{"..", false},
		{"default/1/../../etc", false},
		{"a/..", false},
		{"nul\x00", false},
		{strings.Repeat("k", maxKeyLength+1), false},
	} {
		err := validateKey("key", tc.key)
		if tc.ok && err != nil {
			t.Errorf("%q: unexpected error %v", tc.key, err)
		}
		if !tc.ok && !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%q: got %v, want InvalidArgument", tc.key, err)
		}
	}
}

func TestRemappedRoot(t *testing.T) {
	const uidLabel, gidLabel = "containerd.io/snapshot/uidmapping", "containerd.io/snapshot/gidmapping"
	for _, tc := range []struct {
		name     string
		labels   map[string]string
		uid, gid int
		ok       bool
		wantErr  bool
	}{
		{name: "no labels"},
		{name: "simple", labels: map[string]string{uidLabel: "0:1000:65536", gidLabel: "0:2000:65536"}, uid: 1000, gid: 2000, ok: true},
		{name: "root in second range", labels: map[string]string{uidLabel: "1:5000:10,0:7000:1", gidLabel: "0:7000:1"}, uid: 7000, gid: 7000, ok: true},
		{name: "root unmapped", labels: map[string]string{uidLabel: "1:5000:10", gidLabel: "0:1:1"}, wantErr: true},
		{name: "garbage", labels: map[string]string{uidLabel: "x:y", gidLabel: "0:1:1"}, wantErr: true},
		{name: "gid missing", labels: map[string]string{uidLabel: "0:1:1"}, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			uid, gid, ok, err := remappedRoot(tc.labels)
			if tc.wantErr {
				if !errors.Is(err, errdefs.ErrInvalidArgument) {
					t.Fatalf("got %v, want InvalidArgument", err)
				}
				return
			}
			if err != nil || ok != tc.ok || uid != tc.uid || gid != tc.gid {
				t.Fatalf("got %d %d %v %v, want %d %d %v", uid, gid, ok, err, tc.uid, tc.gid, tc.ok)
			}
		})
	}
}
