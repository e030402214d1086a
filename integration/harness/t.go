//go:build linux

package harness

import "context"

// T is what the harness needs from its caller: the subset of testing.TB
// it uses. *testing.T, *testing.B and *testing.F satisfy it, and so does
// Runner, which lets a program (cmd/seamless-demo) use the harness.
//
// As with testing.TB, Fatal and Fatalf end the calling goroutine's work
// (Runner: a panic that Runner.Run recovers), so they must be called from
// the goroutine running the test or Runner.Run's function; Cleanup
// functions run in reverse order of registration when it ends, after
// Context is cancelled.
type T interface {
	Helper()
	Logf(format string, args ...any)
	Errorf(format string, args ...any)
	Fatal(args ...any)
	Fatalf(format string, args ...any)
	Failed() bool
	Cleanup(func())
	TempDir() string
	Context() context.Context
}
