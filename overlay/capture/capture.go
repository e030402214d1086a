//go:build linux

// Package capture makes a point-in-time copy of an overlay upperdir: an
// incremental tree copier whose pre-copy rounds run while the container
// writes, and whose final round, run while the container is frozen, copies
// only what changed since the previous round.
//
// The source is untrusted: a container may rename, delete or swap any entry
// for a symlink while a round walks it. Every source entry is reached
// through the file descriptor of its parent directory, never through a path
// string, and nothing in the source is ever followed: symlinks are copied as
// links, directories are opened with O_NOFOLLOW|O_DIRECTORY, and regular
// files are opened with O_PATH|O_NOFOLLOW, checked with fstat, and only then
// reopened for reading through /proc/self/fd (so a name swapped for a device
// node or a fifo is never opened for I/O). Paths longer than PATH_MAX work.
//
// Preserved: file data (sparse files stay sparse; with Options.Reflink the
// data is cloned), hard links within the source (a link to a file outside
// it becomes a plain copy), symlinks, devices (overlay's 0/0 whiteouts
// included), fifos, sockets, owners, permission bits including setuid,
// setgid and sticky, every xattr (trusted.overlay.*, security.capability,
// user.*, ACLs), atime and mtime. Not preserved: ctime (it cannot be set),
// atime changes made after an entry was copied (reading does not change
// ctime, so they go unnoticed), inode flags (chattr). The destination is
// not fsync'ed: see Copier.Sync.
//
// With Options.TrackChanges, rounds after the first visit only what inotify
// reported changed (see tracker), so that the final round, run frozen,
// takes time in proportion to the changes rather than to the tree. A copy
// can also start from an earlier copy of the same source (Copier.Seed):
// what did not change since is hard-linked, not copied again.
//
// A Copier needs root (CAP_CHOWN, CAP_FOWNER, CAP_MKNOD, CAP_DAC_OVERRIDE,
// CAP_SYS_ADMIN for trusted.* xattrs). Each worker holds two file
// descriptors per directory level it is in.
package capture

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/sched"
)

// Options tune a Copier.
type Options struct {
	// Reflink clones file data with FICLONE (xfs with reflink, btrfs)
	// instead of copying it. NewCopier fails with an error wrapping
	// ErrReflinkUnsupported when the destination cannot clone, so a caller
	// can fall back to copying.
	Reflink bool
	// RacyMargin is the safety margin of the racy-timestamp rule: an entry
	// whose ctime is not strictly older than (start of the round that last
	// copied it - RacyMargin) is treated as changed, because it may have
	// changed again within the same timestamp tick. Zero means
	// DefaultRacyMargin(). Entries whose ctime has no sub-second part (a
	// filesystem with one-second timestamps) get one more second.
	RacyMargin time.Duration
	// Workers is the number of goroutines that walk and copy the tree:
	// subdirectories are handed to idle workers. 0 means GOMAXPROCS, at
	// most 8; 1 walks sequentially.
	Workers int
	// TrackChanges watches the source's directories with inotify, so
	// that a round after the first visits only the entries that changed
	// since the previous one, instead of stat'ing every entry: the final
	// round then takes time in proportion to the changes, not to the
	// tree. Rounds fall back to walking everything when an event may
	// have been lost, and while the source holds a hard-linked file.
	// NewCopier fails with an error wrapping ErrTrackingUnavailable when
	// inotify cannot be used (e.g. fs.inotify.max_user_instances is
	// reached), so a caller can go on without. Close releases the
	// watches.
	TrackChanges bool
	// PreCopyNice lowers the CPU priority of the threads that run
	// PreCopy rounds (and Seed's links) to this nice value (1-19; 0
	// leaves it), so that the container, whose own threads compete for
	// the same CPUs while it runs, is served first. Final runs at the
	// caller's priority: the container is frozen then, and waits for it.
	PreCopyNice int
	// PreCopyCgroup is a cgroup v1 cpu cgroup those threads also join
	// (sched.BackgroundCgroup): nice orders threads within a cgroup only,
	// and the container is in another. "" for none.
	PreCopyCgroup string
}

// Stats describe one round.
type Stats struct {
	Entries     int64         // source entries examined, the root included
	Dirty       int64         // entries new, changed, racy or forced: the ones acted on
	Racy        int64         // of Dirty: unchanged stat data, but too recent to trust
	CopiedFiles int64         // regular files whose data was copied or cloned
	CopiedBytes int64         // bytes copied (data segments only) or cloned (file size)
	Linked      int64         // hard links created in the destination
	Removed     int64         // destination entries removed (a directory's whole subtree counts)
	Duration    time.Duration // wall time of the round
	// Tracked: the round visited only what changed since the previous
	// one (Options.TrackChanges), rather than every entry.
	Tracked bool
}

func (s *Stats) add(o Stats) {
	s.Entries += o.Entries
	s.Dirty += o.Dirty
	s.Racy += o.Racy
	s.CopiedFiles += o.CopiedFiles
	s.CopiedBytes += o.CopiedBytes
	s.Linked += o.Linked
	s.Removed += o.Removed
}

var (
	// ErrReflinkUnsupported: Options.Reflink was asked for, but the
	// destination filesystem cannot clone from the source.
	ErrReflinkUnsupported = errors.New("capture: reflink (FICLONE) is not supported from the source to the destination")
	// ErrSourceChanged: the source changed while Final walked it, so the
	// writers were not (all) frozen and the copy is not point in time.
	ErrSourceChanged = errors.New("capture: source changed during the final round (are all writers frozen?)")
	// ErrTrackingUnavailable: Options.TrackChanges was asked for, but
	// inotify cannot be used.
	ErrTrackingUnavailable = errors.New("capture: change tracking (inotify) is not available")
)

// DefaultRacyMargin is two ticks of the coarse real-time clock that the
// kernel stamps ctime with (clock_getres(CLOCK_REALTIME_COARSE), i.e.
// 1/CONFIG_HZ), and at least 10 ms. The coarse clock lags the real time by
// up to one tick, so a change made just after a round started can carry a
// ctime up to one tick before the round's start; one more tick absorbs the
// granularity of that ctime itself.
func DefaultRacyMargin() time.Duration {
	tick := 10 * time.Millisecond // HZ=100, the coarsest common setting
	var ts unix.Timespec
	if err := unix.ClockGetres(unix.CLOCK_REALTIME_COARSE, &ts); err == nil && ts.Nano() > 0 {
		tick = time.Duration(ts.Nano())
	}
	return max(2*tick, 10*time.Millisecond)
}

// A Copier keeps a destination directory an exact copy of a source
// directory as of the start of its latest round. It remembers, for every
// entry, the stat data it copied, so a round only acts on what changed. A
// Copier is safe for use by one goroutine at a time; rounds are serialised.
// Between rounds it holds no file descriptors, except, with
// Options.TrackChanges, an inotify instance until Close.
type Copier struct {
	mu       sync.Mutex
	src, dst string
	reflink  bool
	margin   int64   // racy margin, ns
	rounds   []int64 // start time (unix ns) of each round; entry.round indexes it
	root     entry   // the source root; root.dir holds the tree
	workers  int
	noRange  atomic.Bool // copy_file_range does not work from src to dst: use read/write
	tracker  *tracker    // nil without Options.TrackChanges
	bg       background  // how PreCopy rounds run (Options.PreCopyNice, PreCopyCgroup)
	// walkAll: the next round must visit every entry (the first round,
	// after an error, while the source holds hard links).
	walkAll bool
	broken  bool  // the last round failed
	linked  bool  // the last walk of everything met a hard-linked file
	seeded  int64 // entries Seed linked from a previous copy
	// raceHook, set by tests only, runs between stat'ing a source entry
	// and opening it: the window in which a container can swap it.
	raceHook func(dirfd int, name string)
}

// NewCopier prepares to copy the directory src into dst. dst must not
// exist, or be an empty directory; it is created with mode 0700 and takes
// the source root's owner, mode, xattrs and times at the end of each round.
// src and dst must not contain one another. /proc must be mounted.
func NewCopier(src, dst string, opts Options) (*Copier, error) {
	if opts.RacyMargin < 0 {
		return nil, fmt.Errorf("capture: negative RacyMargin %v", opts.RacyMargin)
	}
	if opts.Workers < 0 {
		return nil, fmt.Errorf("capture: negative Workers %d", opts.Workers)
	}
	if opts.PreCopyNice < 0 || opts.PreCopyNice > 19 {
		return nil, fmt.Errorf("capture: PreCopyNice %d is not between 0 and 19", opts.PreCopyNice)
	}
	workers := opts.Workers
	if workers == 0 {
		workers = min(runtime.GOMAXPROCS(0), 8)
	}
	margin := opts.RacyMargin
	if margin == 0 {
		margin = DefaultRacyMargin()
	}
	var err error
	if src, err = filepath.Abs(src); err != nil {
		return nil, err
	}
	if dst, err = filepath.Abs(dst); err != nil {
		return nil, err
	}
	if within(dst, src) || within(src, dst) {
		return nil, fmt.Errorf("capture: source %s and destination %s overlap", src, dst)
	}
	if _, err := os.Stat("/proc/self/fd"); err != nil {
		return nil, fmt.Errorf("capture: /proc is needed to open source files safely: %w", err)
	}
	var sst unix.Stat_t
	if err := unix.Lstat(src, &sst); err != nil {
		return nil, fmt.Errorf("capture: source: %w", &os.PathError{Op: "lstat", Path: src, Err: err})
	}
	if sst.Mode&unix.S_IFMT != unix.S_IFDIR {
		return nil, fmt.Errorf("capture: source %s is not a directory", src)
	}
	created, err := makeDst(dst)
	if err != nil {
		return nil, err
	}
	if opts.Reflink {
		if err := checkReflink(src, dst, &sst); err != nil {
			if created {
				os.Remove(dst)
			}
			return nil, err
		}
	}
	c := &Copier{src: src, dst: dst, reflink: opts.Reflink, margin: int64(margin), workers: workers, walkAll: true, bg: background{Nice: opts.PreCopyNice, Cgroup: opts.PreCopyCgroup}}
	c.root = entry{ctime: invalidTime, dir: &dirNode{}}
	if opts.TrackChanges {
		if c.tracker, err = newTracker(); err != nil {
			if created {
				os.Remove(dst)
			}
			return nil, fmt.Errorf("%w: %w", ErrTrackingUnavailable, err)
		}
	}
	return c, nil
}

// Close releases what the Copier holds between rounds (the inotify
// instance of Options.TrackChanges). The destination is left as it is.
func (c *Copier) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.tracker == nil {
		return nil
	}
	err := c.tracker.close()
	c.tracker = nil
	c.walkAll = true
	return err
}

// Watching is the number of source directories the Copier watches with
// inotify (Options.TrackChanges), until Close.
func (c *Copier) Watching() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.tracker == nil {
		return 0
	}
	return c.tracker.watching()
}

// background is how the work done while the container runs (pre-copy
// rounds, seeding) runs: the zero value, at the caller's priority.
type background sched.Class

// run runs fn in the class, on a thread of its own that ends with it, so
// that the caller's thread keeps its priority; best effort: at worst fn
// runs at the usual priority.
func (b background) run(fn func()) {
	if b == (background{}) {
		fn()
		return
	}
	sched.Class(b).Run(fn)
}

// within reports whether p is dir or lies below it.
func within(p, dir string) bool {
	rel, err := filepath.Rel(dir, p)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

// makeDst creates dst with mode 0700, or accepts an empty directory.
func makeDst(dst string) (created bool, err error) {
	if err := os.Mkdir(dst, 0o700); err == nil {
		return true, nil
	} else if !errors.Is(err, os.ErrExist) {
		return false, fmt.Errorf("capture: destination: %w", err)
	}
	f, err := os.OpenFile(dst, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return false, fmt.Errorf("capture: destination: %w", err)
	}
	defer f.Close()
	if names, _ := f.Readdirnames(1); len(names) > 0 {
		return false, fmt.Errorf("capture: destination %s is not empty", dst)
	}
	if err := f.Chmod(0o700); err != nil {
		return false, fmt.Errorf("capture: destination: %w", err)
	}
	return false, nil
}

// checkReflink fails unless dst can clone and src and dst are on one
// filesystem (btrfs subvolumes have their own st_dev but clone between
// each other).
func checkReflink(src, dst string, sst *unix.Stat_t) error {
	if !SupportsReflink(dst) {
		return fmt.Errorf("%w: %s cannot clone files", ErrReflinkUnsupported, dst)
	}
	var dstSt unix.Stat_t
	if err := unix.Lstat(dst, &dstSt); err != nil {
		return err
	}
	if dstSt.Dev == sst.Dev {
		return nil
	}
	var a, b unix.Statfs_t
	if unix.Statfs(src, &a) == nil && unix.Statfs(dst, &b) == nil &&
		a.Type == unix.BTRFS_SUPER_MAGIC && b.Type == unix.BTRFS_SUPER_MAGIC {
		return nil // a clone across btrfs filesystems still fails, with EXDEV, at copy time
	}
	return fmt.Errorf("%w: %s and %s are on different filesystems", ErrReflinkUnsupported, src, dst)
}

// SupportsReflink reports whether files in dir can be cloned with FICLONE.
// It creates and removes two small files in dir.
func SupportsReflink(dir string) bool {
	a, err := os.CreateTemp(dir, ".reflink-probe-")
	if err != nil {
		return false
	}
	defer os.Remove(a.Name())
	defer a.Close()
	if _, err := a.Write(make([]byte, 4096)); err != nil {
		return false
	}
	b, err := os.CreateTemp(dir, ".reflink-probe-")
	if err != nil {
		return false
	}
	defer os.Remove(b.Name())
	defer b.Close()
	return unix.IoctlFileClone(int(b.Fd()), int(a.Fd())) == nil
}

// PreCopy runs one round while writers run: it copies new and changed
// entries and removes vanished ones. Entries that vanish or change type
// under it are skipped or dropped, not errors; data copied while it was
// being written may be torn, and the change is caught by a later round
// (its ctime changes, or it is racy). Call it until Stats.Dirty stops
// shrinking, then freeze and call Final.
func (c *Copier) PreCopy(ctx context.Context) (Stats, error) {
	return c.run(ctx, false, nil)
}

// Final runs the last round while writers are frozen: it copies exactly
// what changed since the previous round (racy entries included), re-copies
// the data of the regular files in alwaysRecopy (paths relative to the
// source root, e.g. files mapped shared and writable, whose stores need not
// update ctime), and removes what vanished. It returns promptly with an
// error wrapping ctx.Err() once ctx is done (the pause budget). A source
// that changes during Final is an error wrapping ErrSourceChanged.
//
// After an error the destination is not a consistent capture, but the
// Copier is: later rounds repair it.
func (c *Copier) Final(ctx context.Context, alwaysRecopy []string) (Stats, error) {
	return c.run(ctx, true, buildForce(alwaysRecopy))
}

// Sync flushes the destination's filesystem (syncfs). Call it after the
// writers are thawed, before recording the capture as durable.
func (c *Copier) Sync() error {
	fd, err := unix.Open(c.dst, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: c.dst, Err: err}
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		return &os.PathError{Op: "syncfs", Path: c.dst, Err: err}
	}
	return nil
}

func (c *Copier) run(ctx context.Context, final bool, force *forceNode) (Stats, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	kind := "pre-copy"
	if final {
		kind = "final"
	}
	start := time.Now()
	if err := ctx.Err(); err != nil {
		return Stats{}, fmt.Errorf("capture: %s round not started: %w", kind, err)
	}
	idx := c.newRound(start.UnixNano())
	var plan changes
	tracked := false
	if c.tracker != nil {
		// Everything that changed before this point is in the plan; what
		// changes from now on is for the next round.
		ch, complete := c.tracker.take()
		tracked = complete && !c.walkAll
		if tracked {
			plan = ch
		}
	}
	r, err := c.walk(ctx, final, idx, force, tracked, plan)
	if errors.Is(err, errNeedFull) {
		done := r.stats
		r, err = c.walk(ctx, final, idx, force, false, nil)
		r.stats.add(done)
	}
	if err == nil && final && c.tracker != nil && !c.tracker.quiet() {
		err = fmt.Errorf("%w: inotify reported a change", ErrSourceChanged)
	}
	c.broken = err != nil
	if err == nil && !r.tracked {
		c.linked = r.sh.linked.Load()
	}
	c.walkAll = c.broken || c.linked
	r.stats.Duration = time.Since(start)
	r.stats.Tracked = r.tracked
	if err != nil {
		if cerr := ctx.Err(); cerr != nil && errors.Is(err, cerr) {
			return r.stats, fmt.Errorf("capture: %s round aborted after %v (%d entries examined): %w",
				kind, r.stats.Duration.Round(time.Microsecond), r.stats.Entries, cerr)
		}
		return r.stats, fmt.Errorf("capture: %s round: %w", kind, err)
	}
	return r.stats, nil
}

// walk runs one walk of a round: of every entry, or, when tracked, of the
// entries in plan and the directories leading to them.
func (c *Copier) walk(ctx context.Context, final bool, idx uint16, force *forceNode, tracked bool, plan changes) (*round, error) {
	sh := &shared{links: make(map[devIno]*linkGroup), stop: make(chan struct{})}
	if c.workers > 1 {
		sh.slots = make(chan struct{}, c.workers-1)
	}
	r := &round{
		c:       c,
		ctx:     ctx,
		done:    ctx.Done(),
		final:   final,
		idx:     idx,
		sh:      sh,
		tracked: tracked,
		plan:    plan,
	}
	if !final {
		sh.bg = c.bg
	}
	var err error
	sh.bg.run(func() { err = r.walkRoot(force) })
	if sh.err != nil {
		err = sh.err // the first error, rather than a worker's "halted"
	}
	return r, err
}
