//go:build linux

package harness

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
)

// UniqueID returns prefix followed by random hex digits. Every containerd
// on the machine shares /run/containerd/{runc,fifo,s}, so container IDs
// must be unique across all instances, not just within one test.
func UniqueID(prefix string) string {
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		panic(fmt.Sprintf("reading random bytes: %v", err))
	}
	return prefix + hex.EncodeToString(b)
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("finding a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// socketDir returns a new directory for unix sockets, removed when the test
// ends. It lives directly under /tmp rather than in t.TempDir() because a
// socket path must fit in sun_path (108 bytes) and test temp dirs embed the
// test name.
func socketDir(t T) string {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "sst-")
	if err != nil {
		t.Fatalf("creating socket dir: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// childEnv returns the test's environment with PATH led by dirs (in order,
// deduplicated) and without the variables in drop, so that children find
// the pinned tools first and are not steered by the caller's settings.
func childEnv(dirs []string, drop ...string) []string {
	var env []string
	path := os.Getenv("PATH")
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if k == "PATH" || hasPrefixAny(k, drop) {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "PATH="+joinPath(dirs, path))
}

func hasPrefixAny(s string, prefixes []string) bool {
	for _, p := range prefixes {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

func joinPath(dirs []string, rest string) string {
	seen := map[string]bool{}
	var out []string
	for _, d := range append(dirs, filepath.SplitList(rest)...) {
		if d == "" || seen[d] {
			continue
		}
		seen[d] = true
		out = append(out, d)
	}
	return strings.Join(out, string(os.PathListSeparator))
}
