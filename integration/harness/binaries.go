//go:build linux

package harness

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// Environment variables that locate the binaries under test.
const (
	// EnvBinDir is the directory of our own built binaries
	// (default <repo>/_output/bin).
	EnvBinDir = "SEAMLESS_BIN_DIR"
	// EnvToolsBin is the directory of the pinned third-party tools
	// (default <repo>/_output/tools).
	EnvToolsBin = "SEAMLESS_TOOLS_BIN"
	// EnvCI makes Require fail instead of skip when set to "true", so a CI
	// job cannot go green by silently skipping every end-to-end test.
	EnvCI = "CI"
	// EnvKeepLogs names a directory the components' logs are copied
	// into when a test or benchmark ends (they are otherwise deleted
	// with its temporary directories).
	EnvKeepLogs = "SEAMLESS_KEEP_LOGS"
)

// Names of the binaries the harness runs.
const (
	BinContainerd = "containerd"
	BinCtr        = "ctr"
	BinShim       = "containerd-shim-runc-v2"
	BinRunc       = "runc"
	BinRegistry   = "registry"
	BinDaemon     = "containerd-seamless-grpc"
)

// RequiredBinaries are the binaries a full Env needs.
var RequiredBinaries = []string{
	BinContainerd, BinCtr, BinShim, BinRunc, BinRegistry, BinDaemon,
}

var (
	repoRootOnce sync.Once
	repoRoot     string
	repoRootErr  error
)

// RepoRoot returns the directory holding go.mod, found by walking up from
// the working directory (go test runs in the package directory).
func RepoRoot() (string, error) {
	repoRootOnce.Do(func() {
		repoRoot, repoRootErr = findRepoRoot()
	})
	return repoRoot, repoRootErr
}

func findRepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("getting working directory: %w", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.mod not found above the working directory")
		}
		dir = parent
	}
}

// BinDir is where our own binaries are looked up first.
func BinDir() string { return dirFromEnv(EnvBinDir, "bin") }

// ToolsDir is where third-party tools (containerd, runc, registry, ...) are
// looked up after BinDir.
func ToolsDir() string { return dirFromEnv(EnvToolsBin, "tools") }

func dirFromEnv(env, sub string) string {
	if d := os.Getenv(env); d != "" {
		return d
	}
	root, err := RepoRoot()
	if err != nil {
		return ""
	}
	return filepath.Join(root, "_output", sub)
}

// FindBinary returns the absolute path of name, looked up in BinDir, then
// ToolsDir, then PATH. The fixed order makes tests use the pinned builds
// even when the host has distribution packages of the same tools.
func FindBinary(name string) (string, error) {
	for _, dir := range []string{BinDir(), ToolsDir()} {
		if dir == "" {
			continue
		}
		p := filepath.Join(dir, name)
		if isExecutable(p) {
			return p, nil
		}
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("binary %q not found in %s, %s or PATH", name, BinDir(), ToolsDir())
	}
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", fmt.Errorf("resolving %s: %w", p, err)
	}
	return abs, nil
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0
}

// Require skips the test (or, with CI=true, fails it) unless it runs as
// root and every binary of a full Env is available.
func Require(t testing.TB) {
	t.Helper()
	RequireBinaries(t, RequiredBinaries...)
}

// RequireBinaries is Require for a subset of the binaries, for tests that
// do not need every component.
func RequireBinaries(t testing.TB, names ...string) {
	t.Helper()
	problems := MissingPrerequisites(names...)
	if len(problems) == 0 {
		return
	}
	msg := "end-to-end test prerequisites missing: " + strings.Join(problems, "; ")
	if os.Getenv(EnvCI) == "true" {
		t.Fatalf("%s (CI=true, refusing to skip)", msg)
	}
	t.Skip(msg)
}

// MissingPrerequisites returns what prevents an Env with the named
// binaries from running here (not root, binaries not found), one problem
// per element, or nil. Programs use it where tests use Require.
func MissingPrerequisites(names ...string) []string {
	var problems []string
	if os.Geteuid() != 0 {
		problems = append(problems, "must run as root")
	}
	for _, name := range names {
		if _, err := FindBinary(name); err != nil {
			problems = append(problems, err.Error())
		}
	}
	return problems
}

// HasBinary reports whether FindBinary finds name.
func HasBinary(name string) bool {
	_, err := FindBinary(name)
	return err == nil
}
