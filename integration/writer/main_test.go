//go:build linux

package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil/workload"
)

func baseDir(t *testing.T) (root, dir string) {
	t.Helper()
	root = t.TempDir()
	dir = filepath.Join(root, workload.Dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, b := range workload.Base() {
		if err := os.WriteFile(filepath.Join(dir, b.Name), b.Data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root, dir
}

// TestRun: a run of a few thousand steps (past the window and several
// visits of every base file) ends in the state the workload defines.
func TestRun(t *testing.T) {
	root, dir := baseDir(t)
	const steps = 3 * workload.Window
	if err := run(dir, steps, 0); err != nil {
		t.Fatal(err)
	}
	n, err := workload.Verify(root, workload.Merged)
	if err != nil {
		t.Fatal(err)
	}
	if n != steps {
		t.Fatalf("log ends at step %d, want %d", n, steps)
	}
}

// TestRunRefuses: the writer fails, instead of writing a state the
// workload does not define, where the image's files are not there or
// another run has been.
func TestRunRefuses(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, dir string)
		want  string
	}{
		{"base file missing", func(t *testing.T, dir string) {
			os.Remove(filepath.Join(dir, workload.BaseName(3)))
		}, "base files"},
		{"base file changed", func(t *testing.T, dir string) {
			os.WriteFile(filepath.Join(dir, workload.BaseName(3)), []byte("x"), 0o644)
		}, "other data"},
		{"second run", func(t *testing.T, dir string) {
			// Fewer steps than BaseEvery: the base files are unchanged.
			if err := run(dir, workload.BaseEvery-1, 0); err != nil {
				t.Fatal(err)
			}
		}, "exists"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, dir := baseDir(t)
			tc.setup(t, dir)
			err := run(dir, 10, 0)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error saying %q", err, tc.want)
			}
		})
	}
}
