package testutil

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// BuildStatic builds the main package pkg of this module (a path relative
// to the module root, such as "./integration/writer") into a temporary
// directory of the test, statically (CGO_ENABLED=0) so that it also runs
// in the busybox test image, which has no libc, and returns its path.
func BuildStatic(t testing.TB, pkg string) string {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	// go test runs in the package's directory; go env finds the module.
	gomod, err := exec.Command(goBin, "env", "GOMOD").Output()
	if err != nil || strings.TrimSpace(string(gomod)) == "" || strings.TrimSpace(string(gomod)) == os.DevNull {
		t.Fatalf("BuildStatic %s: no go.mod above the working directory: %v", pkg, err)
	}
	out := filepath.Join(t.TempDir(), filepath.Base(pkg))
	cmd := exec.Command(goBin, "build", "-o", out, pkg)
	cmd.Dir = filepath.Dir(strings.TrimSpace(string(gomod)))
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if msg, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("BuildStatic: go build %s: %v\n%s", pkg, err, msg)
	}
	return out
}
