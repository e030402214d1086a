//go:build linux

package overlay

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
)

// TestRemovedSubvolumeCleanedAtOnce: the kernel starts cleaning up a
// released btrfs capture right away (its space comes back at once), not
// at the next periodic commit, up to 30 s later.
func TestRemovedSubvolumeCleanedAtOnce(t *testing.T) {
	testutil.RequireRoot(t)
	mnt := testutil.LoopFS(t, "btrfs", 512<<20)
	fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	pending := func() int {
		if n, err := deletedSubvolumes(fd); err == nil {
			return int(n)
		}
		// Before Linux 6.13: ask btrfs-progs.
		out, err := exec.Command("btrfs", "subvolume", "list", "-d", mnt).Output()
		if err != nil {
			t.Fatalf("btrfs subvolume list -d: %v", err)
		}
		return len(strings.Fields(string(out)))
	}
	sub := filledSubvolume(t, filepath.Join(mnt, "released"), 5000)
	start := time.Now()
	if err := RemoveTree(sub); err != nil {
		t.Fatal(err)
	}
	for {
		n := pending()
		if n == 0 {
			break
		}
		if time.Since(start) > 10*time.Second {
			t.Fatalf("%d deleted subvolumes still not cleaned up after %v", n, time.Since(start))
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("cleaned up %v after the removal", time.Since(start))
}

// filledSubvolume creates dir as a subvolume holding n one-byte files,
// committed to disk.
func filledSubvolume(t *testing.T, dir string, n int) string {
	t.Helper()
	if err := CreateSubvolume(dir); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%05d", i)), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := SyncFS(dir); err != nil {
		t.Fatal(err)
	}
	return dir
}

// BTRFS_IOC_SUBVOL_SYNC_WAIT (Linux 6.13) in its BTRFS_SUBVOL_SYNC_COUNT
// mode: how many deleted subvolumes are queued for cleaning.
const (
	btrfsIocSubvolSyncWait = 0x40109441 // _IOW(0x94, 65, struct btrfs_ioctl_subvol_wait)
	btrfsSubvolSyncCount   = 2
)

type btrfsSubvolWait struct {
	subvolid uint64
	mode     uint32
	count    uint32
}

// deletedSubvolumes counts the deleted subvolumes not cleaned up yet on
// the btrfs filesystem of fd.
func deletedSubvolumes(fd int) (uint32, error) {
	args := btrfsSubvolWait{mode: btrfsSubvolSyncCount}
	err := ioctl(fd, btrfsIocSubvolSyncWait, unsafe.Pointer(&args))
	return args.count, err
}

// TestWaitSubvolumeGone: a deleted subvolume is reported as existing
// until the kernel has dropped it, and WaitSubvolumeGone returns once it
// has; a live subvolume is never reported gone.
func TestWaitSubvolumeGone(t *testing.T) {
	testutil.RequireRoot(t)
	mnt := testutil.LoopFS(t, "btrfs", 512<<20)
	live := filledSubvolume(t, filepath.Join(mnt, "live"), 0)
	released := filledSubvolume(t, filepath.Join(mnt, "released"), 5000)
	liveID, err := SubvolumeID(live)
	if err != nil {
		t.Fatal(err)
	}
	id, err := SubvolumeID(released)
	if err != nil {
		t.Fatal(err)
	}
	if id < btrfsFirstFreeObjectid || id == liveID {
		t.Fatalf("subvolume IDs: live %d, released %d", liveID, id)
	}
	if exists, err := SubvolumeExists(mnt, id); err != nil || !exists {
		t.Fatalf("SubvolumeExists before removal = %v, %v; want true", exists, err)
	}
	start := time.Now()
	if err := RemoveTree(released); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := WaitSubvolumeGone(ctx, mnt, id, 5*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	t.Logf("dropped %v after the removal", time.Since(start))
	if exists, err := SubvolumeExists(mnt, id); err != nil || exists {
		t.Fatalf("SubvolumeExists after the drop = %v, %v; want false", exists, err)
	}
	if exists, err := SubvolumeExists(mnt, liveID); err != nil || !exists {
		t.Fatalf("SubvolumeExists of the live subvolume = %v, %v; want true", exists, err)
	}
	// A subvolume still being dropped: the wait ends with ctx, saying so.
	expired, cancel := context.WithCancel(context.Background())
	cancel()
	if exists, _ := SubvolumeExists(mnt, liveID); exists {
		if err := WaitSubvolumeGone(expired, mnt, liveID, time.Millisecond); err == nil || !strings.Contains(err.Error(), "still being cleaned up") {
			t.Fatalf("WaitSubvolumeGone of a live subvolume with an ended context = %v", err)
		}
	}
}

// TestStartSnapshotReadonly: a snapshot holds exactly what the source held
// when it was settled, although the source keeps changing (written,
// appended, renamed, deleted) from then on, while the ioctl is still
// writing the transaction out. It also settles early at all (or the test
// would prove nothing), finds its reference among more subvolumes than one
// search returns, and reports a failed snapshot.
func TestStartSnapshotReadonly(t *testing.T) {
	testutil.RequireRoot(t)
	mnt := testutil.LoopFS(t, "btrfs", 1<<30)
	src := filledSubvolume(t, filepath.Join(mnt, "src"), 0)
	// Neighbours with long names: the parent's references take several
	// searches to read.
	for i := range 40 {
		filledSubvolume(t, filepath.Join(mnt, fmt.Sprintf("%0200d", i)), 0)
	}
	captures := filepath.Join(mnt, "captures")
	if err := os.Mkdir(captures, 0o700); err != nil {
		t.Fatal(err)
	}

	w := &treeWriter{t: t, dir: src, want: map[string]string{}}
	const rounds = 30
	var early int
	for i := range rounds {
		for range 20 {
			w.step()
		}
		dst := filepath.Join(captures, fmt.Sprintf("c%02d", i))
		want := maps.Clone(w.want)
		p, err := StartSnapshotReadonly(src, dst)
		if err != nil {
			t.Fatal(err)
		}
		<-p.Settled()
		select {
		case <-p.finished:
		default:
			early++
		}
		for range 20 { // the writers, thawed
			w.step()
		}
		if err := p.Wait(); err != nil {
			t.Fatal(err)
		}
		if got := readTree(t, dst); !maps.Equal(got, want) {
			t.Fatalf("snapshot %d: %d entries differ from the source when it settled:\n%s", i, len(diffTrees(got, want)), strings.Join(diffTrees(got, want), "\n"))
		}
	}
	t.Logf("%d of %d snapshots settled before the ioctl returned", early, rounds)
	if early == 0 {
		t.Errorf("no snapshot settled before its ioctl returned")
	}

	// A failed snapshot: settled and finished, with the error.
	p, err := StartSnapshotReadonly(src, filepath.Join(captures, "c00"))
	if err != nil {
		t.Fatal(err)
	}
	<-p.Settled()
	if err := p.Wait(); !errors.Is(err, unix.EEXIST) {
		t.Errorf("snapshot onto an existing name: %v, want EEXIST", err)
	}
}

// treeWriter changes a directory step by step, the way a workload does,
// and keeps the contents it should hold.
type treeWriter struct {
	t    *testing.T
	dir  string
	n    int
	log  []byte
	want map[string]string
}

func (w *treeWriter) step() {
	w.n++
	k := w.n
	must := func(err error) {
		if err != nil {
			w.t.Fatal(err)
		}
	}
	// A new file, large enough to be written out as an extent.
	data := strings.Repeat(fmt.Sprintf("%08d", k), 8<<10)
	name := fmt.Sprintf("f%05d", k)
	must(os.WriteFile(filepath.Join(w.dir, name), []byte(data), 0o644))
	w.want[name] = data
	// An append.
	line := fmt.Sprintf("step %d\n", k)
	f, err := os.OpenFile(filepath.Join(w.dir, "log"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	must(err)
	_, err = f.WriteString(line)
	must(errors.Join(err, f.Close()))
	w.log = append(w.log, line...)
	w.want["log"] = string(w.log)
	// A rename and a deletion.
	if k > 1 {
		prev := fmt.Sprintf("f%05d", k-1)
		moved := fmt.Sprintf("m%05d", k-1)
		must(os.Rename(filepath.Join(w.dir, prev), filepath.Join(w.dir, moved)))
		w.want[moved] = w.want[prev]
		delete(w.want, prev)
	}
	if k > 10 {
		gone := fmt.Sprintf("m%05d", k-10)
		must(os.Remove(filepath.Join(w.dir, gone)))
		delete(w.want, gone)
	}
}

// readTree reads the regular files of a flat directory.
func readTree(t *testing.T, dir string) map[string]string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		got[e.Name()] = string(data)
	}
	return got
}

func diffTrees(got, want map[string]string) []string {
	var diff []string
	for name, data := range want {
		if g, ok := got[name]; !ok {
			diff = append(diff, "missing "+name)
		} else if g != data {
			diff = append(diff, fmt.Sprintf("%s: %d bytes, want %d", name, len(g), len(data)))
		}
	}
	for name := range got {
		if _, ok := want[name]; !ok {
			diff = append(diff, "extra "+name)
		}
	}
	sort.Strings(diff)
	return diff
}
