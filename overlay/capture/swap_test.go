//go:build linux

package capture

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
	"golang.org/x/sys/unix"
)

// TestSwapAttack swaps a source entry at the worst moment, between the
// Copier's stat and its open (through Copier.raceHook), for a symlink to a canary
// outside the source, a symlink to /, a fifo (opening it for reading would
// block) or a device node (opening it could have side effects). The
// Copier must not open the swapped-in entry for I/O nor follow it; a
// pre-copy round goes on, a final round reports ErrSourceChanged; and the
// next round copies the new entry as what it is.
func TestSwapAttack(t *testing.T) {
	testutil.RequireRoot(t)
	type swap struct {
		name   string
		target string // swapped entry, relative to src
		isDir  bool
		to     func(t *testing.T, path, canary string)
	}
	swaps := []swap{
		{"file to symlink to a file outside", "victim", false, func(t *testing.T, p, canary string) {
			must(t, os.Symlink(filepath.Join(canary, "secret"), p))
		}},
		{"file to symlink to a directory outside", "victim", false, func(t *testing.T, p, canary string) {
			must(t, os.Symlink(canary, p))
		}},
		{"file to fifo", "victim", false, func(t *testing.T, p, _ string) { must(t, unix.Mkfifo(p, 0o644)) }},
		{"file to device node", "victim", false, func(t *testing.T, p, _ string) {
			must(t, unix.Mknod(p, unix.S_IFCHR|0o644, int(unix.Mkdev(1, 3))))
		}},
		{"directory to symlink to a directory outside", "dir", true, func(t *testing.T, p, canary string) {
			must(t, os.Symlink(canary, p))
		}},
		{"directory to symlink to /", "dir", true, func(t *testing.T, p, _ string) { must(t, os.Symlink("/", p)) }},
		{"directory to another directory", "dir", true, func(t *testing.T, p, _ string) {
			must(t, os.Mkdir(p, 0o700))
			writeFile(t, filepath.Join(p, "replacement"), []byte("new"), 0o644)
		}},
	}
	for _, final := range []bool{false, true} {
		for _, sw := range swaps {
			name := "PreCopy/" + sw.name
			if final {
				name = "Final/" + sw.name
			}
			t.Run(name, func(t *testing.T) {
				base := t.TempDir()
				src, dst, canary := filepath.Join(base, "src"), filepath.Join(base, "dst"), filepath.Join(base, "outside")
				must(t, os.MkdirAll(filepath.Join(src, "dir"), 0o755))
				writeFile(t, filepath.Join(src, "dir", "inside"), []byte("inside"), 0o644)
				writeFile(t, filepath.Join(src, "victim"), []byte("victim"), 0o644)
				writeFile(t, filepath.Join(src, "other"), []byte("other"), 0o644)
				must(t, os.Mkdir(canary, 0o755))
				writeFile(t, filepath.Join(canary, "secret"), []byte("CANARY-secret"), 0o644)
				checkCanary := watchCanary(t, canary)

				c, err := NewCopier(src, dst, Options{Workers: 1}) // the hook is not synchronised
				must(t, err)
				victim := filepath.Join(src, sw.target)
				var swapped bool
				var checkNode func()
				c.raceHook = func(dirfd int, n string) {
					if n != sw.target || swapped {
						return
					}
					swapped = true
					// Keep the old inode until the new entry exists, or
					// the new one may get its number (a swap by rename).
					must(t, os.Rename(victim, victim+".old"))
					sw.to(t, victim, canary)
					must(t, os.RemoveAll(victim+".old"))
					var st unix.Stat_t
					must(t, unix.Lstat(victim, &st))
					if m := st.Mode & unix.S_IFMT; m == unix.S_IFIFO || m == unix.S_IFCHR {
						checkNode = watchCanary(t, victim) // an inotify watch on the node itself
					}
				}

				done := make(chan error, 1)
				go func() {
					var err error
					if final {
						_, err = c.Final(context.Background(), nil)
					} else {
						_, err = c.PreCopy(context.Background())
					}
					done <- err
				}()
				select {
				case err = <-done:
				case <-time.After(10 * time.Second):
					t.Fatal("the round hangs: it opened the fifo")
				}
				c.raceHook = nil
				if !swapped {
					t.Fatal("the hook never ran")
				}
				if final {
					if !errors.Is(err, ErrSourceChanged) {
						t.Fatalf("Final: %v, want ErrSourceChanged", err)
					}
				} else {
					must(t, err)
				}
				checkCanary()
				if checkNode != nil {
					checkNode()
				}
				forEachFile(t, dst, func(rel string, data []byte) {
					if string(data) == "CANARY-secret" {
						t.Errorf("%s holds the canary", rel)
					}
				})

				// The next round copies the swapped-in entry as it is.
				checkCanary = watchCanary(t, canary)
				_, err = c.Final(context.Background(), nil)
				must(t, err)
				compareTrees(t, src, dst)
				checkCanary()
			})
		}
	}
}
