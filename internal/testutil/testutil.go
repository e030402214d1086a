// Package testutil holds the few helpers the project's tests share.
package testutil

import (
	"os"
	"testing"
)

// InCI reports whether the tests run in CI, where nothing may be skipped.
func InCI() bool { return os.Getenv("CI") == "true" }

// SkipOrFail skips the test locally, but fails it in CI: a prerequisite
// missing there is a broken CI set-up, not a reason to pass.
func SkipOrFail(t testing.TB, format string, args ...any) {
	t.Helper()
	if InCI() {
		t.Fatalf("CI=true and a prerequisite is missing: "+format, args...)
	}
	t.Skipf(format, args...)
}

// RequireRoot stops a test that needs root (mounts, chown) when not root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		SkipOrFail(t, "this test needs root (mounts overlayfs)")
	}
}
