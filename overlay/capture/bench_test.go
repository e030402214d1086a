//go:build linux

package capture

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
	"golang.org/x/sys/unix"
)

const (
	benchDirs  = 100
	benchFiles = 100 // per directory: 10,000 files
	benchMean  = 24_000
	benchDirty = 100
)

// benchFS is where a benchmark's upper lives: the host's /var/tmp (ext4
// here, and never a tmpfs) for copying, a loop xfs for reflinks.
type benchFS struct {
	name    string
	reflink bool
	root    func(b *testing.B) string
}

var benchFSes = []benchFS{
	{"copy", false, func(b *testing.B) string {
		dir, err := os.MkdirTemp("/var/tmp", "capture-bench-")
		must(b, err)
		b.Cleanup(func() { os.RemoveAll(dir) })
		return dir
	}},
	{"reflink", true, func(b *testing.B) string { return testutil.LoopFS(b, "xfs", 2<<30) }},
}

// benchTree writes 10,000 files of 0-48 kB (about 240 MB) in 100
// directories and returns their paths.
func benchTree(b *testing.B, src string) []string {
	b.Helper()
	r := rand.New(rand.NewPCG(7, 7))
	data := randBytes(1 << 20)
	var paths []string
	var total int64
	for d := 0; d < benchDirs; d++ {
		dir := filepath.Join(src, fmt.Sprintf("d%03d", d))
		must(b, os.MkdirAll(dir, 0o755))
		for f := 0; f < benchFiles; f++ {
			p := filepath.Join(dir, fmt.Sprintf("f%03d", f))
			n := r.IntN(2 * benchMean)
			off := r.IntN(len(data) - n)
			must(b, os.WriteFile(p, data[off:off+n], 0o644))
			paths = append(paths, p)
			total += int64(n)
		}
	}
	b.Logf("tree: %d files, %d MB", len(paths), total>>20)
	return paths
}

func fsType(b *testing.B, dir string) string {
	var st unix.Statfs_t
	must(b, unix.Statfs(dir, &st))
	switch st.Type {
	case unix.EXT4_SUPER_MAGIC:
		return "ext4"
	case unix.XFS_SUPER_MAGIC:
		return "xfs"
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs"
	case unix.TMPFS_MAGIC:
		return "tmpfs"
	}
	return fmt.Sprintf("%#x", st.Type)
}

// BenchmarkFinal times Final on the 10,000-file upper after a converged
// pre-copy, with 100 files rewritten just before it, as under a freeze.
func BenchmarkFinal(b *testing.B) {
	testutil.RequireRoot(b)
	for _, fs := range benchFSes {
		root := fs.root(b)
		src, dst := filepath.Join(root, "src"), filepath.Join(root, "dst")
		paths := benchTree(b, src)
		for _, track := range []bool{false, true} {
			dst := fmt.Sprintf("%s-track=%v", dst, track)
			c := newCopier(b, src, dst, Options{Reflink: fs.reflink, Workers: benchWorkers(), TrackChanges: track})
			_, err := c.PreCopy(context.Background())
			must(b, err)
			converge(b, c)
			next := 0
			b.Run(fmt.Sprintf("%s/track=%v", benchName(b, fs, root), track), func(b *testing.B) {
				var dirty, entries int64
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					// Settle the previous iteration's changes, as the pre-copy
					// rounds before a freeze would.
					time.Sleep(2 * time.Duration(c.margin))
					_, err := c.PreCopy(context.Background())
					must(b, err)
					for j := 0; j < benchDirty; j++ {
						p := paths[next%len(paths)]
						next += 97 // spread over the directories
						fi, err := os.Stat(p)
						must(b, err)
						must(b, os.WriteFile(p, randBytes(int(fi.Size())), 0o644))
					}
					b.StartTimer()
					st, err := c.Final(context.Background(), nil)
					b.StopTimer()
					must(b, err)
					dirty += st.Dirty
					entries += st.Entries
					if st.CopiedFiles != benchDirty || st.Tracked != track {
						b.Fatalf("Final copied %d files, want %d; tracked %v, want %v: %+v", st.CopiedFiles, benchDirty, st.Tracked, track, st)
					}
				}
				b.ReportMetric(float64(dirty)/float64(b.N), "dirty/op")
				b.ReportMetric(float64(entries)/float64(b.N), "entries/op")
			})
		}
	}
}

// BenchmarkPreCopy times the first, full copy of the 10,000-file upper.
func BenchmarkPreCopy(b *testing.B) {
	testutil.RequireRoot(b)
	for _, fs := range benchFSes {
		root := fs.root(b)
		src := filepath.Join(root, "src")
		benchTree(b, src)
		n := 0
		b.Run(benchName(b, fs, root), func(b *testing.B) {
			var bytes int64
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				n++
				dst := filepath.Join(root, fmt.Sprint("dst", n))
				c, err := NewCopier(src, dst, Options{Reflink: fs.reflink})
				must(b, err)
				b.StartTimer()
				st, err := c.PreCopy(context.Background())
				b.StopTimer()
				must(b, err)
				bytes += st.CopiedBytes
				must(b, os.RemoveAll(dst))
			}
			b.SetBytes(bytes / int64(b.N))
		})
	}
}

func benchName(b *testing.B, fs benchFS, root string) string {
	if fs.reflink {
		return "reflink-" + fsType(b, root)
	}
	return "copy-" + fsType(b, root)
}

// benchWorkers reads CAPTURE_WORKERS (Options.Workers; unset or 0: the
// default), to compare the sequential and the parallel walk.
func benchWorkers() int {
	n, _ := strconv.Atoi(os.Getenv("CAPTURE_WORKERS"))
	return n
}
