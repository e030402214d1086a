//go:build linux

package overlay

import (
	"slices"
	"testing"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
)

func TestDetectOptions(t *testing.T) {
	if !kernelHasIndex() {
		testutil.SkipOrFail(t, "this kernel's overlay has no index parameter")
	}
	root := t.TempDir()
	for _, tc := range []struct {
		name       string
		configured []string
		want       []string
	}{
		// On the host (not in a user namespace) userxattr is not needed.
		{name: "index=off added", want: []string{"index=off"}},
		{name: "configured index kept", configured: []string{"index=on"}, want: []string{"index=on"}},
		{name: "other options kept", configured: []string{"volatile"}, want: []string{"volatile", "index=off"}},
		{name: "configured userxattr kept", configured: []string{"userxattr"}, want: []string{"userxattr", "index=off"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := DetectOptions(root, tc.configured)
			if !slices.Equal(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}
