//go:build linux

package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"golang.org/x/sys/unix"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
	"github.com/seamless-snapshotter/seamless-snapshotter/config"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/harness"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/testimage"
)

// Sizes of the hostile content.
const (
	hostileManyFiles = 100_000       // entries in one directory
	hostileSparse    = 10 << 30      // apparent size of the sparse file
	hostileDepth     = 20            // levels of 255-byte names: 5 KiB of path, over PATH_MAX
	hostileTailOff   = 7<<30 + 123   // an unaligned write in the sparse file
	hostileTail      = "tail-marker" // what is written there
	hostileChunk     = 1 << 20       // each aligned write: the first MiB of busybox
)

// hostileChunkOffsets are where the sparse file holds hostileChunk bytes of
// busybox: its start, its middle and its last MiB.
func hostileChunkOffsets() []int64 {
	return []int64{0, hostileSparse / 2, hostileSparse - hostileChunk}
}

// bait is content on the host, outside the daemon's root, that a container
// points symlinks at. A capture that followed one would contain it.
type bait struct {
	dir, file string // the canary file is dir/canary
	content   []byte
}

// TestHostileContent commits, with each capture strategy, a running
// container whose writable layer is built to trip a copier up: symlinks to
// host files (absolute, relative, through /proc), a directory swapped for
// a symlink to / while the capture runs, a hard link whose other name is
// outside the upper, 100,000 entries in one directory, a 10 GiB sparse
// file, 255-byte names, a path longer than PATH_MAX, mode 000 entries
// owned by other users, a fifo and hard links. The capture must be the
// upper, exactly: links copied as links and never followed, no host file
// read into it, nothing written outside the capture, the container
// running on, untouched.
func TestHostileContent(t *testing.T) {
	probe := buildProbe(t)
	for _, fs := range strategyFilesystems() {
		t.Run(fs.fstype, func(t *testing.T) {
			begin := time.Now()
			// The data is a few MiB (the sparse file stays sparse); the
			// inodes are what count: 100k in the upper and 100k in the
			// capture. mkfs.ext4 gives 1 GiB 64k inodes unless told.
			var mkfs []string
			if fs.fstype == "ext4" {
				mkfs = []string{"-N", "400000"}
			}
			opts := daemonRootOn(t, fs.fstype, 1<<30, mkfs...)
			testHostile(t, fs, opts, probe)
			t.Logf("%s/%s: whole subtest %v", fs.fstype, fs.strategy, time.Since(begin).Round(time.Millisecond))
		})
	}
}

func testHostile(t *testing.T, fs strategyFS, opts harness.Options, probe []byte) {
	ctx, env, ref := setupWithImage(t, opts, "seamless-test/busybox-probe:latest",
		[]testimage.Option{testimage.WithExtraFiles(map[string][]byte{"/bin/probe": probe})}, seamless)
	c := client(ctx, t, env)
	apic := newAPIClient(env)
	root := env.Daemon.Root()
	b := plantBait(t, filepath.Join(filepath.Dir(root), "hostile-bait"))

	id := harness.UniqueID("hostile-")
	setupStart := time.Now()
	runAndWaitFor(ctx, t, env, id, ref, hostileScript(b), "/ready")
	setupTook := time.Since(setupStart)
	mounts, err := c.SnapshotService(seamless).Mounts(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	upper := upperOf(t, mounts)
	upperRel, err := filepath.Rel(root, upper)
	if err != nil || strings.HasPrefix(upperRel, "..") {
		t.Fatalf("upper %s is not under the daemon root %s", upper, root)
	}

	// The bait is live: followed from the upper on the host, these links
	// reach it. A copier that followed them would copy it.
	for _, l := range []string{"sym/canary", "sym/rel-canary"} {
		if data, err := os.ReadFile(filepath.Join(upper, l)); err != nil || !bytes.Equal(data, b.content) {
			t.Fatalf("followed on the host, %s does not reach the bait (%v): the test proves nothing", l, err)
		}
	}
	checkImageLink(ctx, t, env, id, upper)
	outside := plantOutsideLink(t, upper, filepath.Dir(root))
	outsideBefore, outsideAtime := lstat(t, outside), atime(t, outside)

	// The swapper flips race/root and race/bait between a directory and a
	// symlink to / and to the bait, from now until after the commit.
	if _, err := env.Exec(ctx, id, "touch", "/go"); err != nil {
		t.Fatal(err)
	}
	waitSwapping(ctx, t, upper)

	// Everything under the daemon's root, but the swapped entries, which
	// change all the time.
	raceRel := filepath.Join(upperRel, "race")
	notRace := func(rel string) bool { return !within(rel, raceRel) }
	before := listTree(t, root, notRace)

	// The copy and reflink final rounds lstat every entry under the
	// freeze: 100k entries take 0.35-0.47 s on a 2-core VM (3-4 us an
	// lstat), too close to the default budget of 500 ms to pass reliably
	// on a busy machine. btrfs snapshots in constant time and keeps the
	// default.
	budget := time.Duration(config.DefaultCommit().PauseBudget)
	req := api.CommitRequest{Namespace: "default", Container: id, Target: env.Registry.Ref("hostile/" + fs.fstype + ":1")}
	if fs.strategy != config.StrategyBtrfs {
		budget = 3 * time.Second
		req.PauseBudget = budget.String()
	}
	commitStart := time.Now()
	var rec api.Commit
	status, apiErr := apic.do(ctx, t, "POST", "/api/v1/commits", req, &rec)
	commitTook := time.Since(commitStart)
	if status != http.StatusCreated {
		t.Fatalf("commit: %d %+v", status, apiErr)
	}
	if rec.Strategy != fs.strategy || !rec.Frozen || rec.PauseMillis <= 0 || rec.PauseMillis > float64(budget.Milliseconds()) {
		t.Fatalf("commit recorded strategy %q frozen %v pause %.2f ms; want %s, frozen, a pause within %v", rec.Strategy, rec.Frozen, rec.PauseMillis, fs.strategy, budget)
	}

	// The container runs on, and so does its swapper.
	if st := taskStatus(ctx, t, c, id); st != containerd.Running {
		t.Fatalf("container is %s after the commit", st)
	}
	waitSwapping(ctx, t, upper)
	stopSwapper(ctx, t, c, id)

	// The capture's upper is its fs; a btrfs capture also holds the
	// snapshot's workdir (and the file planted beside the upper).
	captureDir := filepath.Join(root, "captures", rec.ID)
	capture := filepath.Join(captureDir, "fs")
	checkStart := time.Now()
	whole := listTree(t, captureDir, nil)
	got := subtree(whole, "fs")
	upperBefore := subtree(before, upperRel)

	checkCaptureIsUpper(t, got, upperBefore)
	checkHostileEntries(t, capture, got, b)
	checkRace(t, got, b)
	checkHardLinks(t, got, upperBefore, outside)
	checkNoHostContent(t, captureDir, whole, b)

	// The file outside the upper: read (or cloned) at most, never written,
	// and not linked into the capture. Not even its atime changed: the
	// copier reads with O_NOATIME, and a first read would set it (relatime).
	if after := lstat(t, outside); after != outsideBefore {
		t.Errorf("the file outside the upper changed: %+v, was %+v", after, outsideBefore)
	}
	if a := atime(t, outside); a != outsideAtime {
		t.Errorf("the atime of the file outside the upper changed from %v to %v", time.Unix(0, outsideAtime), time.Unix(0, a))
	}
	if data, err := os.ReadFile(outside); err != nil || string(data) != outsideContent {
		t.Errorf("the file outside the upper holds %q (%v)", data, err)
	}

	// Nothing under the root changed but the capture and the database
	// (the swapper is stopped: its entries are left out, they changed).
	after := listTree(t, root, notRace)
	checkOnlyCaptureWritten(t, before, after, rec.ID)

	// The container still sees its files.
	for _, tc := range []struct{ cmd, want string }{
		{"cat /hl/b", "pair"},
		{"stat -c %s /sparse", fmt.Sprint(hostileSparse)},
		{"readlink /sym/proc1root", "/proc/1/root"},
		{"ls /many | wc -l", fmt.Sprint(hostileManyFiles)},
	} {
		if out, err := env.Exec(ctx, id, "sh", "-c", tc.cmd); err != nil || strings.TrimSpace(out) != tc.want {
			t.Errorf("in the container after the commit, %s: %q (%v), want %q", tc.cmd, out, err, tc.want)
		}
	}
	t.Logf("%s/%s: set-up in the container %v; commit %v (pause %.2f ms, %d pre-copy rounds, %d entries, %d bytes); checks %v",
		fs.fstype, rec.Strategy, setupTook.Round(time.Millisecond), commitTook.Round(time.Millisecond),
		rec.PauseMillis, rec.PreCopyRounds, rec.CaptureEntries, rec.CaptureBytes, time.Since(checkStart).Round(time.Millisecond))
}

// plantBait creates dir/canary with random content, on the host.
func plantBait(t *testing.T, dir string) bait {
	t.Helper()
	rnd := make([]byte, 16)
	rand.Read(rnd)
	b := bait{dir: dir, file: filepath.Join(dir, "canary"), content: []byte("HOSTILE CANARY " + hex.EncodeToString(rnd) + "\n")}
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(b.file, b.content, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return b
}

// hostileLinks are the symlinks the container makes and their targets.
// Relative ones are resolved from the symlink's directory; on the host,
// that is in the upper, <root>/snapshots/<id>/fs/sym.
func hostileLinks(b bait) map[string]string {
	return map[string]string{
		"sym/shadow":          "/etc/shadow",
		"sym/passwd":          "/etc/passwd",
		"sym/proc1root":       "/proc/1/root",
		"sym/proc-self-root":  "/proc/self/root",
		"sym/root":            "/",
		"sym/rel-passwd":      "../../../../etc/passwd",
		"sym/rel-host-passwd": strings.Repeat("../", 16) + "etc/passwd",
		"sym/canary":          b.file,
		"sym/canary-dir":      b.dir,
		// Up through sym, fs, <id>, snapshots and the root: the bait.
		"sym/rel-canary": "../../../../../" + filepath.Base(b.dir) + "/canary",
		"sym/dangling":   "/nonexistent/file",
		"sym/loop-a":     "loop-b",
		"sym/loop-b":     "loop-a",
		// Was a directory with a file in it.
		"sym/was-dir":            "/",
		"names/" + longName('s'): "/etc/shadow",
		"names/" + longName('S'): b.file,
	}
}

func longName(c byte) string { return strings.Repeat(string(c), 255) }

// hostileScript makes the content in the container, writes /ready, waits
// for /go and then runs the swapper until it is killed.
func hostileScript(b bait) string {
	var s strings.Builder
	s.WriteString(`set -e
mkdir -p /sym /hl /m000 /names /race/root /race/bait /sym/was-dir
echo in-root > /race/root/file
echo in-bait > /race/bait/file
echo doomed > /sym/was-dir/file
`)
	fmt.Fprintf(&s, "/bin/probe -fill-names %d -dir /many\n", hostileManyFiles)
	fmt.Fprintf(&s, "/bin/probe -deep %d -dir /deep\n", hostileDepth)
	fmt.Fprintf(&s, "truncate -s %d /sparse\n", hostileSparse)
	for _, off := range hostileChunkOffsets() {
		fmt.Fprintf(&s, "dd if=/bin/busybox of=/sparse bs=%d count=1 seek=%d conv=notrunc 2>/dev/null\n", hostileChunk, off/hostileChunk)
	}
	fmt.Fprintf(&s, "printf %s | dd of=/sparse bs=1 seek=%d conv=notrunc 2>/dev/null\n", hostileTail, hostileTailOff)
	s.WriteString("rm -r /sym/was-dir\n")
	links := hostileLinks(b)
	for _, name := range slices.Sorted(maps.Keys(links)) {
		fmt.Fprintf(&s, "ln -s '%s' '/%s'\n", links[name], name)
	}
	fmt.Fprintf(&s, `mkfifo /fifo
echo pair > /hl/a
ln /hl/a /hl/b
ln /etc/passwd /hl/image-passwd
touch /m000/empty
echo secret > /m000/data
mkdir /m000/dir
echo inner > /m000/dir/inner
chown 1234:2345 /m000/empty /m000/data
chown 3456:4567 /m000/dir
chmod 000 /m000/empty /m000/data /m000/dir
echo long > /names/%[1]s
mkdir /names/%[2]s
echo longer > /names/%[2]s/%[3]s
echo ok > /ready
while [ ! -e /go ]; do usleep 20000; done
/bin/probe -swap /race/root:/ -swap /race/bait:%[4]s &
wait || :
exec sleep 1000000
`, longName('f'), longName('D'), longName('g'), b.dir)
	return s.String()
}

// outsideContent is the file whose other name is in the upper.
const outsideContent = "outside the upper\n"

// plantOutsideLink makes, from the host, a hard link "planted" in the upper
// to a new file outside it, in dir, and returns the file's path. A
// container cannot do this; a host process, or an upper shared by mistake,
// can.
func plantOutsideLink(t *testing.T, upper, dir string) string {
	t.Helper()
	plant := func(outside string) error {
		if err := os.WriteFile(outside, []byte(outsideContent), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Remove(outside) })
		return os.Link(outside, filepath.Join(upper, "planted"))
	}
	outside := filepath.Join(dir, "hostile-outside")
	err := plant(outside)
	if errors.Is(err, syscall.EXDEV) {
		// btrfs: the upper lives in a subvolume of its own, and hard
		// links do not cross subvolumes. Its snapshot directory, beside
		// the upper and the workdir, is the nearest place outside it.
		outside = filepath.Join(filepath.Dir(upper), "hostile-outside")
		err = plant(outside)
	}
	if err != nil {
		t.Fatal(err)
	}
	return outside
}

// checkImageLink asserts what overlayfs makes of `ln /etc/passwd
// /hl/image-passwd`, a hard link to a file of the image (a lower layer):
// it copies /etc/passwd up and links the copy, so the upper holds one
// inode under both names, the image's content. The capture must keep the
// pair (checkHardLinks).
func checkImageLink(ctx context.Context, t *testing.T, env *harness.Env, id, upper string) {
	t.Helper()
	image, err := env.Exec(ctx, id, "cat", "/etc/passwd")
	if err != nil {
		t.Fatal(err)
	}
	a, b := lstat(t, filepath.Join(upper, "etc/passwd")), lstat(t, filepath.Join(upper, "hl/image-passwd"))
	if a.ino != b.ino || a.nlink != 2 || a.mode&unix.S_IFMT != unix.S_IFREG {
		t.Fatalf("after ln of a lower file, the upper has etc/passwd %+v and hl/image-passwd %+v; want one copied-up inode with 2 links", a, b)
	}
	if data, err := os.ReadFile(filepath.Join(upper, "hl/image-passwd")); err != nil || string(data) != image {
		t.Fatalf("the copied-up link holds %q (%v), want the image's %q", data, err, image)
	}
}

// waitSwapping waits until the swapper has been seen to flip race/root
// both ways: it runs, and is not frozen.
func waitSwapping(ctx context.Context, t *testing.T, upper string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	seen := map[uint32]bool{}
	if err := harness.WaitFor(ctx, time.Millisecond, func(context.Context) (bool, error) {
		var st unix.Stat_t
		if unix.Lstat(filepath.Join(upper, "race/root"), &st) == nil {
			seen[st.Mode&unix.S_IFMT] = true
		}
		return seen[unix.S_IFDIR] && seen[unix.S_IFLNK], nil
	}); err != nil {
		t.Fatalf("race/root does not flip between a directory and a symlink (seen %v): %v", seen, err)
	}
}

// stopSwapper kills the swapper (not the container: its shell goes on to
// sleep) and waits until it is gone, so that the upper holds still.
func stopSwapper(ctx context.Context, t *testing.T, c *containerd.Client, id string) {
	t.Helper()
	ctr, err := c.LoadContainer(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	task, err := ctr.Task(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	find := func() int {
		pids, err := task.Pids(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pids {
			cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p.Pid))
			if err == nil && bytes.HasPrefix(cmdline, []byte("/bin/probe\x00-swap")) {
				return int(p.Pid)
			}
		}
		return 0
	}
	pid := find()
	if pid == 0 {
		t.Fatal("the swapper is not running")
	}
	if err := unix.Kill(pid, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := harness.WaitFor(ctx, 10*time.Millisecond, func(context.Context) (bool, error) { return find() == 0, nil }); err != nil {
		t.Fatalf("the swapper (pid %d) does not go away: %v", pid, err)
	}
}

// fsEntry is what the test compares of a file: lstat data (no atime) and
// a symlink's target.
type fsEntry struct {
	mode         uint32 // type and permission bits
	uid, gid     uint32
	size         int64
	rdev         uint64
	dev, ino     uint64
	nlink        uint64
	blocks       int64
	mtime, ctime int64 // ns
	target       string
}

func entryOf(st *unix.Stat_t) fsEntry {
	return fsEntry{
		mode: st.Mode, uid: st.Uid, gid: st.Gid, size: st.Size, rdev: st.Rdev,
		dev: st.Dev, ino: st.Ino, nlink: st.Nlink, blocks: st.Blocks,
		mtime: st.Mtim.Nano(), ctime: st.Ctim.Nano(),
	}
}

func (e fsEntry) typ() uint32 { return e.mode & unix.S_IFMT }

func lstat(t *testing.T, p string) fsEntry {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatal(&os.PathError{Op: "lstat", Path: p, Err: err})
	}
	return entryOf(&st)
}

func atime(t *testing.T, p string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatal(&os.PathError{Op: "lstat", Path: p, Err: err})
	}
	return st.Atim.Nano()
}

// within reports whether the relative path rel is dir or lies below it.
func within(rel, dir string) bool {
	return rel == dir || strings.HasPrefix(rel, dir+"/")
}

// subtree returns the entries of m at or below the relative path dir,
// keyed relative to dir (dir itself is "").
func subtree(m map[string]fsEntry, dir string) map[string]fsEntry {
	out := make(map[string]fsEntry)
	for k, e := range m {
		if k == dir {
			out[""] = e
		} else if rest, ok := strings.CutPrefix(k, dir+"/"); ok {
			out[rest] = e
		}
	}
	return out
}

const (
	openDirFlags  = unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC
	openFileFlags = unix.O_RDONLY | unix.O_NOFOLLOW | unix.O_CLOEXEC
)

// walkTree calls visit for every entry below root (root itself as "") and
// descends into the directories it returns true for. It goes through
// directory descriptors, one name at a time: paths may be longer than
// PATH_MAX, and no symlink is ever followed.
func walkTree(t *testing.T, root string, visit func(dirfd int, name, rel string, st *unix.Stat_t) bool) {
	t.Helper()
	fd, err := unix.Open(root, openDirFlags, 0)
	if err != nil {
		t.Fatal(&os.PathError{Op: "open", Path: root, Err: err})
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	if !visit(unix.AT_FDCWD, root, "", &st) {
		unix.Close(fd)
		return
	}
	if err := walkDir(fd, "", visit); err != nil {
		t.Fatalf("walking %s: %v", root, err)
	}
}

// walkDir walks the directory open as fd, and closes it.
func walkDir(fd int, rel string, visit func(dirfd int, name, rel string, st *unix.Stat_t) bool) error {
	f := os.NewFile(uintptr(fd), rel)
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("readdir %q: %w", rel, err)
	}
	slices.Sort(names)
	for _, name := range names {
		crel := path.Join(rel, name)
		var st unix.Stat_t
		if err := unix.Fstatat(fd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("lstat %q: %w", crel, err)
		}
		if !visit(fd, name, crel, &st) || st.Mode&unix.S_IFMT != unix.S_IFDIR {
			continue
		}
		cfd, err := unix.Openat(fd, name, openDirFlags, 0)
		if err != nil {
			return fmt.Errorf("open %q: %w", crel, err)
		}
		if err := walkDir(cfd, crel, visit); err != nil {
			return err
		}
	}
	return nil
}

// listTree returns every entry below root, root itself as "", leaving out
// those (and what is below them) keep says no to.
func listTree(t *testing.T, root string, keep func(rel string) bool) map[string]fsEntry {
	t.Helper()
	out := make(map[string]fsEntry)
	walkTree(t, root, func(dirfd int, name, rel string, st *unix.Stat_t) bool {
		if keep != nil && !keep(rel) {
			return false
		}
		e := entryOf(st)
		if e.typ() == unix.S_IFLNK {
			buf := make([]byte, unix.PathMax)
			n, err := unix.Readlinkat(dirfd, name, buf)
			if err != nil {
				t.Fatalf("readlink %q: %v", rel, err)
			}
			e.target = string(buf[:n])
		}
		out[rel] = e
		return true
	})
	return out
}

// readFileAt reads the regular file at the relative path rel below root,
// one component at a time, following nothing.
func readFileAt(t *testing.T, root, rel string) []byte {
	t.Helper()
	fd, err := unix.Open(root, openDirFlags, 0)
	if err != nil {
		t.Fatal(err)
	}
	comps := strings.Split(rel, "/")
	for i, c := range comps {
		flags := openDirFlags
		if i == len(comps)-1 {
			flags = openFileFlags
		}
		next, err := unix.Openat(fd, c, flags, 0)
		unix.Close(fd)
		if err != nil {
			t.Fatalf("open %q at %q: %v", rel, c, err)
		}
		fd = next
	}
	f := os.NewFile(uintptr(fd), rel)
	defer f.Close()
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(f); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// isRace reports whether rel is the swapped directory race or below it.
func isRace(rel string) bool { return within(rel, "race") }

// checkCaptureIsUpper: the capture holds exactly the upper's entries, with
// their types, permissions, owners, sizes, times, devices and link
// targets. Nothing more: a followed symlink would add entries.
func checkCaptureIsUpper(t *testing.T, got, upper map[string]fsEntry) {
	t.Helper()
	var bad []string
	report := func(format string, args ...any) {
		if len(bad) < 20 {
			bad = append(bad, fmt.Sprintf(format, args...))
		}
	}
	for rel, u := range upper {
		if isRace(rel) {
			continue
		}
		g, ok := got[rel]
		switch {
		case !ok:
			report("%.80q: missing from the capture", rel)
		case g.mode != u.mode || g.uid != u.uid || g.gid != u.gid || g.rdev != u.rdev || g.target != u.target:
			report("%.80q: capture %o %d:%d rdev %d -> %q, upper %o %d:%d rdev %d -> %q", rel, g.mode, g.uid, g.gid, g.rdev, g.target, u.mode, u.uid, u.gid, u.rdev, u.target)
		case u.typ() != unix.S_IFDIR && g.size != u.size:
			report("%.80q: size %d in the capture, %d in the upper", rel, g.size, u.size)
		case g.mtime != u.mtime:
			report("%.80q: mtime %v in the capture, %v in the upper", rel, time.Unix(0, g.mtime), time.Unix(0, u.mtime))
		}
	}
	for rel := range got {
		if _, ok := upper[rel]; !ok && !isRace(rel) {
			report("%.80q: in the capture, not in the upper", rel)
		}
	}
	if len(bad) > 0 {
		t.Errorf("the capture is not the upper (first %d differences):\n%s", len(bad), strings.Join(bad, "\n"))
	}
}

// checkHostileEntries asserts each kind of hostile content one by one.
func checkHostileEntries(t *testing.T, capture string, got map[string]fsEntry, b bait) {
	t.Helper()
	for name, target := range hostileLinks(b) {
		if e := got[name]; e.typ() != unix.S_IFLNK || e.target != target {
			t.Errorf("%.40s: %o -> %q in the capture, want a symlink to %q", name, e.mode, e.target, target)
		}
	}

	many := 0
	for rel, e := range got {
		if strings.HasPrefix(rel, "many/") {
			many++
			if e.typ() != unix.S_IFREG || e.size != 0 {
				t.Errorf("%s: %o size %d, want an empty file", rel, e.mode, e.size)
			}
		}
	}
	if many != hostileManyFiles {
		t.Errorf("many/ has %d entries in the capture, want %d", many, hostileManyFiles)
	}

	checkSparse(t, filepath.Join(capture, "sparse"), got["sparse"])

	deep := "deep/" + strings.Repeat(longName('d')+"/", hostileDepth) + "leaf"
	if len(deep) <= unix.PathMax {
		t.Fatalf("the deep path is only %d bytes", len(deep))
	}
	if e, ok := got[deep]; !ok || e.typ() != unix.S_IFREG {
		t.Errorf("the %d-byte path is missing from the capture", len(deep))
	} else if data := readFileAt(t, capture, deep); string(data) != "deep leaf\n" {
		t.Errorf("the %d-byte path holds %q", len(deep), data)
	}

	for rel, want := range map[string]string{
		"names/" + longName('f'):                       "long\n",
		"names/" + longName('D') + "/" + longName('g'): "longer\n",
		"hl/a":           "pair\n",
		"m000/data":      "secret\n",
		"m000/dir/inner": "inner\n",
		"planted":        outsideContent,
	} {
		if e := got[rel]; e.typ() != unix.S_IFREG {
			t.Errorf("%.40s: %o in the capture, want a regular file", rel, e.mode)
		} else if data := readFileAt(t, capture, rel); string(data) != want {
			t.Errorf("%.40s holds %q in the capture, want %q", rel, data, want)
		}
	}

	for _, tc := range []struct {
		rel      string
		typ      uint32
		uid, gid uint32
	}{
		{"m000/empty", unix.S_IFREG, 1234, 2345},
		{"m000/data", unix.S_IFREG, 1234, 2345},
		{"m000/dir", unix.S_IFDIR, 3456, 4567},
	} {
		if e := got[tc.rel]; e.typ() != tc.typ || e.mode&0o7777 != 0 || e.uid != tc.uid || e.gid != tc.gid {
			t.Errorf("%s: %o %d:%d in the capture, want type %o mode 000 %d:%d", tc.rel, e.mode, e.uid, e.gid, tc.typ, tc.uid, tc.gid)
		}
	}
	if e := got["fifo"]; e.typ() != unix.S_IFIFO {
		t.Errorf("fifo: %o in the capture, want a fifo", e.mode)
	}
}

// checkSparse: the sparse file has its size, its data where it was
// written, zeros elsewhere, and few blocks.
func checkSparse(t *testing.T, p string, e fsEntry) {
	t.Helper()
	if e.typ() != unix.S_IFREG || e.size != hostileSparse {
		t.Errorf("sparse: %o size %d in the capture, want a regular file of %d", e.mode, e.size, hostileSparse)
		return
	}
	// Three chunks and a tail: a few MiB. Allow for preallocation.
	if alloc := e.blocks * 512; alloc > 64<<20 {
		t.Errorf("sparse: %d bytes allocated in the capture: not sparse any more", alloc)
	} else {
		t.Logf("sparse: %d MiB apparent, %d KiB allocated in the capture", e.size>>20, alloc>>10)
	}
	bin, err := testimage.FindBusybox()
	if err != nil {
		t.Fatal(err)
	}
	busybox, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(p, openFileFlags, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	readAt := func(off int64, n int) []byte {
		buf := make([]byte, n)
		if m, err := unix.Pread(fd, buf, off); err != nil || m != n {
			t.Fatalf("sparse: read %d bytes at %d: %d, %v", n, off, m, err)
		}
		return buf
	}
	for _, off := range hostileChunkOffsets() {
		if !bytes.Equal(readAt(off, hostileChunk), busybox[:hostileChunk]) {
			t.Errorf("sparse: the MiB at %d is not what was written", off)
		}
	}
	if got := readAt(hostileTailOff, len(hostileTail)); string(got) != hostileTail {
		t.Errorf("sparse: %q at %d, want %q", got, hostileTailOff, hostileTail)
	}
	zero := make([]byte, 4096)
	for _, off := range []int64{hostileChunk, 3 << 30, hostileTailOff + int64(len(hostileTail)), hostileSparse - hostileChunk - 4096} {
		if !bytes.Equal(readAt(off, len(zero)), zero) {
			t.Errorf("sparse: not zeros at %d", off)
		}
	}
}

// checkRace: each swapped pair is, in the capture, one directory holding
// just its file and one symlink to its target, whichever name holds
// which; nothing of what the symlinks point to.
func checkRace(t *testing.T, got map[string]fsEntry, b bait) {
	t.Helper()
	want := map[string]bool{"race": true}
	for _, pair := range []struct{ name, target, file string }{
		{"race/root", "/", "in-root\n"},
		{"race/bait", b.dir, "in-bait\n"},
	} {
		dirs := 0
		for _, name := range []string{pair.name, pair.name + ".lnk"} {
			want[name] = true
			switch e := got[name]; e.typ() {
			case unix.S_IFDIR:
				dirs++
				want[name+"/file"] = true
				if f := got[name+"/file"]; f.typ() != unix.S_IFREG || f.size != int64(len(pair.file)) {
					t.Errorf("%s/file: %o size %d in the capture", name, f.mode, f.size)
				}
			case unix.S_IFLNK:
				if e.target != pair.target {
					t.Errorf("%s: a symlink to %q in the capture, want %q", name, e.target, pair.target)
				}
			default:
				t.Errorf("%s: %o in the capture, want a directory or a symlink", name, e.mode)
			}
		}
		if dirs != 1 {
			t.Errorf("%s and %s.lnk: %d directories in the capture, want 1", pair.name, pair.name, dirs)
		}
	}
	for rel := range got {
		if isRace(rel) && !want[rel] {
			t.Errorf("%.80q: in the capture, below the swapped directories", rel)
		}
	}
}

// checkHardLinks: names of one inode in the upper are names of one inode
// in the capture, and names of different inodes are not; the name linked
// to a file outside the upper is a copy, not a link to it.
func checkHardLinks(t *testing.T, got, upper map[string]fsEntry, outside string) {
	t.Helper()
	toCapture, toUpper := map[uint64]uint64{}, map[uint64]uint64{}
	for rel, u := range upper {
		g, ok := got[rel]
		if isRace(rel) || !ok || u.typ() == unix.S_IFDIR {
			continue
		}
		if ci, seen := toCapture[u.ino]; seen && ci != g.ino {
			t.Errorf("%.80q: a hard link of upper inode %d, but not linked in the capture", rel, u.ino)
		}
		if ui, seen := toUpper[g.ino]; seen && ui != u.ino {
			t.Errorf("%.80q: capture inode %d links names of different upper inodes", rel, g.ino)
		}
		toCapture[u.ino], toUpper[g.ino] = g.ino, u.ino
	}
	for _, pair := range [][2]string{{"hl/a", "hl/b"}, {"etc/passwd", "hl/image-passwd"}} {
		if a, b := got[pair[0]], got[pair[1]]; a.ino != b.ino || a.nlink < 2 {
			t.Errorf("%s and %s: inodes %d and %d in the capture, want one", pair[0], pair[1], a.ino, b.ino)
		}
	}
	o := lstat(t, outside)
	if p := got["planted"]; p.dev == o.dev && p.ino == o.ino {
		t.Errorf("planted: the capture links the file outside the upper (%s)", outside)
	}
}

// checkNoHostContent: no file in the capture (listed as entries) holds
// what a followed symlink would have brought in.
func checkNoHostContent(t *testing.T, captureDir string, entries map[string]fsEntry, b bait) {
	t.Helper()
	forbidden := map[string][]byte{b.file: b.content}
	for _, p := range []string{"/etc/shadow", "/etc/passwd", "/etc/hostname"} {
		if data, err := os.ReadFile(p); err == nil && len(data) > 0 {
			forbidden[p] = data
		}
	}
	found := 0
	for rel, e := range entries {
		if e.typ() != unix.S_IFREG || e.size == 0 {
			continue
		}
		var data []byte // read once, if a size matches
		for host, bad := range forbidden {
			if e.size != int64(len(bad)) {
				continue
			}
			if data == nil {
				data = readFileAt(t, captureDir, rel)
			}
			if bytes.Equal(data, bad) {
				t.Errorf("%.80q in the capture holds the content of the host's %s", rel, host)
				found++
			}
		}
	}
	if found == 0 {
		t.Logf("no file of the capture holds any of %v", slices.Sorted(maps.Keys(forbidden)))
	}
}

// checkOnlyCaptureWritten: under the daemon's root, only the new capture
// and the metadata database changed.
func checkOnlyCaptureWritten(t *testing.T, before, after map[string]fsEntry, commitID string) {
	t.Helper()
	mayChange := func(rel string) bool {
		return strings.HasPrefix(rel, "metadata.db") || rel == "captures" || within(rel, "captures/"+commitID)
	}
	var bad []string
	for rel, a := range after {
		if mayChange(rel) {
			continue
		}
		if b, ok := before[rel]; !ok {
			bad = append(bad, fmt.Sprintf("%.100q: new", rel))
		} else if a != b {
			bad = append(bad, fmt.Sprintf("%.100q: changed from %+v to %+v", rel, b, a))
		}
	}
	for rel := range before {
		if _, ok := after[rel]; !ok && !mayChange(rel) {
			bad = append(bad, fmt.Sprintf("%.100q: removed", rel))
		}
	}
	if len(bad) > 0 {
		slices.Sort(bad)
		t.Errorf("the commit changed the daemon's root outside its capture (%d entries; first 20):\n%s", len(bad), strings.Join(bad[:min(len(bad), 20)], "\n"))
	}
	if _, ok := after["captures/"+commitID]; !ok {
		t.Errorf("no capture %s in the listing of the root", commitID)
	}
}
