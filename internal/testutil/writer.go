//go:build linux

package testutil

import (
	"testing"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil/workload"
)

// WriterPackage is the point-in-time writer's main package, for BuildStatic.
const WriterPackage = "./integration/writer"

// CheckWriterState asserts that root (a commit's capture, an upper dir, or
// a root filesystem) holds, in workload.Dir, a state the writer passed
// through at one instant, and returns the last step its log holds: the
// log holds steps 1..N, whole; every numbered file, base file and the
// mmap are as step N left them, or as a prefix of step N+1's ops did;
// nothing of a later step is there. See workload.Checker.Verify.
func CheckWriterState(t testing.TB, root string, layout workload.Layout) int {
	t.Helper()
	n, err := workload.Verify(root, layout)
	if err != nil {
		t.Fatal(err)
	}
	return n
}
