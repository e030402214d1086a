//go:build linux

package snapshotter

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/seamless-snapshotter/seamless-snapshotter/config"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/sched"
	"github.com/seamless-snapshotter/seamless-snapshotter/overlay"
	"github.com/seamless-snapshotter/seamless-snapshotter/overlay/capture"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter/freeze"
)

// UpperdirLabel is set on Info when WithUpperdirLabel is given; it names the
// directory holding the snapshot's own changes (as containerd's overlay
// snapshotter does).
const UpperdirLabel = "containerd.io/snapshot/overlay.upperdir"

const (
	metadataFile       = "metadata.db"
	defaultLockTimeout = 5 * time.Second
)

// Snapshotter is an overlayfs snapshotter with seamless commits.
type Snapshotter struct {
	layout        overlay.Layout
	ms            *storage.MetaStore
	syncRemove    bool
	upperdirLabel bool
	mountOptions  []string

	commitCfg config.Commit
	// strategy is the capture strategy resolved from the configuration
	// and the root's filesystem: copy or reflink.
	strategy string
	hold     *freeze.ActiveHold

	observers []func(Commit)
	// bootID identifies the kernel boot, to tell which unflushed captures
	// a host crash may have torn.
	bootID string

	capturingMu sync.Mutex
	capturing   map[string]string // snapshot ID -> commit ID being captured
	// seeds holds, per snapshot ID, the copier of its latest capture, so
	// that the next capture starts from it (capture.Copier.Seed) instead
	// of copying the whole layer again. Memory only: after a restart, a
	// snapshot's next capture is a full copy.
	seeds map[string]seed
	// seedWatches bounds the inotify watches the seeds keep between
	// commits, all snapshots together (see keepSeed).
	seedWatches int
	gate        freezeGate
	// bgClass is how the work done while containers run (pre-copy,
	// seeding, releasing captures; building layers, in package convert)
	// runs: niced, and in a background cgroup where there can be one.
	bgClass sched.Class
	// cleanups keeps btrfs freezes and the clean-up of released btrfs
	// captures apart (see cleanupGate).
	cleanups *cleanupGate

	// Captures started by the label trigger run in the background, under
	// backgroundCtx; Close cancels it and waits for them.
	backgroundCtx    context.Context
	cancelBackground context.CancelFunc
	background       sync.WaitGroup
}

var (
	_ snapshots.Snapshotter = (*Snapshotter)(nil)
	_ snapshots.Cleaner     = (*Snapshotter)(nil)
)

// New opens (or creates) the snapshotter rooted at root. It fails when
// overlayfs cannot work on root or when another process holds root's
// metadata database.
func New(ctx context.Context, root string, opts ...Option) (*Snapshotter, error) {
	set := settings{lockTimeout: defaultLockTimeout, commit: config.DefaultCommit()}
	for _, o := range opts {
		if err := o(&set); err != nil {
			return nil, err
		}
	}
	if !filepath.IsAbs(root) {
		return nil, fmt.Errorf("snapshotter root %q must be an absolute path", root)
	}
	layout := overlay.NewLayout(root)
	if err := layout.Init(); err != nil {
		return nil, err
	}
	if err := overlay.CheckSupported(root); err != nil {
		return nil, err
	}

	dbPath := filepath.Join(root, metadataFile)
	ms, err := storage.NewMetaStore(dbPath, func(o *bolt.Options) error {
		o.Timeout = set.lockTimeout
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("open metadata %s: %w", dbPath, err)
	}
	// The store opens the database lazily; open it now so that a root in use
	// by another daemon is reported at start, not at the first request.
	if err := withTransaction(ctx, ms, true, func(_ context.Context, tx *bolt.Tx) error {
		return initBuckets(tx)
	}); err != nil {
		ms.Close()
		if errors.Is(err, berrors.ErrTimeout) {
			return nil, fmt.Errorf("metadata %s is locked: another process uses snapshotter root %s", dbPath, root)
		}
		return nil, fmt.Errorf("initialise metadata %s: %w", dbPath, err)
	}

	strategy, err := resolveStrategy(set.commit.Strategy, layout)
	if err != nil {
		ms.Close()
		return nil, err
	}
	if strategy == config.StrategyBtrfs {
		layout = layout.WithSubvolumes()
	}
	if set.bootID == "" {
		if set.bootID, err = currentBootID(); err != nil {
			ms.Close()
			return nil, err
		}
	}
	bgCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	o := &Snapshotter{
		layout:           layout,
		ms:               ms,
		syncRemove:       set.syncRemove,
		upperdirLabel:    set.upperdirLabel,
		mountOptions:     overlay.DetectOptions(root, set.mountOptions),
		commitCfg:        set.commit,
		observers:        set.observers,
		bootID:           set.bootID,
		strategy:         strategy,
		capturing:        map[string]string{},
		seeds:            map[string]seed{},
		cleanups:         newCleanupGate(),
		seedWatches:      capture.WatchLimit(),
		backgroundCtx:    bgCtx,
		cancelBackground: cancel,
	}
	if err := o.recover(ctx); err != nil {
		cancel()
		ms.Close()
		return nil, fmt.Errorf("recover from the previous run: %w", err)
	}
	// On the v1 freezer, the first frozen cgroup flips a kernel static key
	// that costs milliseconds per freeze and thaw; an empty cgroup kept
	// frozen keeps it flipped (see freeze.HoldActive). Without it commits
	// still work, with longer pauses.
	if o.hold, err = freeze.HoldActive(ctx, holdName(root)); err != nil {
		log.G(ctx).WithError(err).Warn("cannot keep the cgroup v1 freezer active; pauses will be several milliseconds longer")
	}
	o.bgClass = sched.Class{Nice: o.commitCfg.PreCopyNice}
	if name := o.commitCfg.BackgroundCgroup; name != "" {
		o.bgClass.Cgroup, err = sched.BackgroundCgroup(name)
		switch {
		case errdefs.IsNotImplemented(err):
			log.G(ctx).Debug("cgroup v2: work done while containers run is only niced; the daemon's cgroup weight decides its CPU share")
		case err != nil:
			log.G(ctx).WithError(err).Warn("cannot make the background cgroup: work done while containers run takes CPU from them")
		}
	}
	return o, nil
}

// currentBootID reads the kernel's random boot ID, new at every boot.
func currentBootID() (string, error) {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", fmt.Errorf("read boot ID: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// holdName is unique per root, so that two snapshotters (tests, or two
// daemons with different roots) never release each other's hold.
func holdName(root string) string {
	sum := sha256.Sum256([]byte(root))
	return "containerd-seamless-hold-" + hex.EncodeToString(sum[:6])
}

// resolveStrategy picks the capture strategy: reflink where the root's
// filesystem can clone files, else copy, unless the configuration insists.
func resolveStrategy(configured string, layout overlay.Layout) (string, error) {
	canClone := capture.SupportsReflink(layout.CapturesDir())
	onBtrfs := overlay.IsBtrfs(layout.Root())
	switch configured {
	case config.StrategyBtrfs:
		if !onBtrfs {
			return "", fmt.Errorf("commit.strategy is btrfs, but %s is not on btrfs; use auto", layout.Root())
		}
		return config.StrategyBtrfs, nil
	case config.StrategyReflink:
		if !canClone {
			return "", fmt.Errorf("commit.strategy is reflink, but the filesystem of %s cannot clone files (FICLONE); use copy or auto", layout.Root())
		}
		return config.StrategyReflink, nil
	case config.StrategyCopy:
		return config.StrategyCopy, nil
	default:
		if onBtrfs {
			return config.StrategyBtrfs, nil
		}
		if canClone {
			return config.StrategyReflink, nil
		}
		return config.StrategyCopy, nil
	}
}

// Strategy is the capture strategy in use.
func (o *Snapshotter) Strategy() string { return o.strategy }

// Root is the directory the snapshotter keeps its data in.
func (o *Snapshotter) Root() string { return o.layout.Root() }

// MountOptions are the options added to every overlay mount.
func (o *Snapshotter) MountOptions() []string { return append([]string(nil), o.mountOptions...) }

// Stat returns the info of an active or committed snapshot by key or name.
func (o *Snapshotter) Stat(ctx context.Context, key string) (snapshots.Info, error) {
	var info snapshots.Info
	err := withTransaction(ctx, o.ms, false, func(ctx context.Context, _ *bolt.Tx) error {
		id, i, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		info = o.withUpperdirLabel(i, id)
		return nil
	})
	return info, err
}

// Update changes the labels of a snapshot (the only mutable field). Setting
// LabelCommit on an active snapshot starts a seamless commit: Update
// validates the request and returns at once (containerd holds its metadata
// lock meanwhile); the capture runs in the background.
func (o *Snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (snapshots.Info, error) {
	var (
		updated  snapshots.Info
		req      CommitRequest
		commit   bool
		res      *reservation
		commitID string
		snapID   string
	)
	err := withTransaction(ctx, o.ms, true, func(ctx context.Context, _ *bolt.Tx) error {
		_, before, _, err := storage.GetInfo(ctx, info.Name)
		if err != nil {
			return err
		}
		i, err := storage.UpdateInfo(ctx, info, fieldpaths...)
		if err != nil {
			return err
		}
		if req, commit, err = commitRequestFromLabels(info.Name, before.Labels, i.Labels, fieldpaths); err != nil {
			return err
		}
		if commit {
			if err := req.normalise(o.commitCfg); err != nil {
				return err
			}
			if snapID, _, err = checkCommittable(ctx, info.Name); err != nil {
				return err
			}
			commitID = newCommitID()
			if res, err = o.reserve(snapID, commitID); err != nil {
				return err
			}
		}
		if o.upperdirLabel {
			id, _, _, err := storage.GetInfo(ctx, i.Name)
			if err != nil {
				return err
			}
			i = o.withUpperdirLabel(i, id)
		}
		updated = i
		return nil
	})
	if res != nil {
		if err != nil {
			res.release()
		} else {
			o.startCapture(req, snapID, commitID, res)
		}
	}
	return updated, err
}

// Usage returns the disk space and inodes a snapshot uses. Committed
// snapshots answer from the metadata; active ones walk their upperdir.
func (o *Snapshotter) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	var (
		id    string
		info  snapshots.Info
		usage snapshots.Usage
	)
	if err := withTransaction(ctx, o.ms, false, func(ctx context.Context, _ *bolt.Tx) (err error) {
		id, info, usage, err = storage.GetInfo(ctx, key)
		return err
	}); err != nil {
		return snapshots.Usage{}, err
	}
	if info.Kind == snapshots.KindActive {
		du, err := fs.DiskUsage(ctx, o.layout.UpperDir(id))
		if err != nil {
			return snapshots.Usage{}, fmt.Errorf("usage of active snapshot %q: %w", key, err)
		}
		usage = snapshots.Usage(du)
	}
	return usage, nil
}

// Prepare creates an active (writable) snapshot on top of parent.
func (o *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return o.createSnapshot(ctx, snapshots.KindActive, key, parent, opts)
}

// View creates a read-only snapshot of parent.
func (o *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return o.createSnapshot(ctx, snapshots.KindView, key, parent, opts)
}

// Mounts returns the mounts of an active snapshot or a view.
func (o *Snapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	var s storage.Snapshot
	if err := withTransaction(ctx, o.ms, false, func(ctx context.Context, _ *bolt.Tx) (err error) {
		if s, err = storage.GetSnapshot(ctx, key); err != nil {
			return fmt.Errorf("mounts of %q: %w", key, err)
		}
		return nil
	}); err != nil {
		return nil, err
	}
	return o.mounts(s), nil
}

// Commit turns the active snapshot key into the committed snapshot name.
func (o *Snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	if err := validateKey("snapshot name", name); err != nil {
		return err
	}
	return withTransaction(ctx, o.ms, true, func(ctx context.Context, _ *bolt.Tx) error {
		id, info, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return fmt.Errorf("commit %q: %w", key, err)
		}
		// Checked before the disk walk so that committing a view or a
		// committed snapshot fails fast.
		if info.Kind != snapshots.KindActive {
			return fmt.Errorf("commit %q: snapshot is %v, only active snapshots can be committed: %w", key, info.Kind, errdefs.ErrFailedPrecondition)
		}
		usage, err := fs.DiskUsage(ctx, o.layout.UpperDir(id))
		if err != nil {
			return fmt.Errorf("commit %q: measure upperdir: %w", key, err)
		}
		if _, err := storage.CommitActive(ctx, key, name, snapshots.Usage(usage), opts...); err != nil {
			return fmt.Errorf("commit %q as %q: %w", key, name, err)
		}
		return nil
	})
}

// Remove drops a snapshot. Its directories are removed before returning
// with WithSyncRemove, else by the next Cleanup.
func (o *Snapshotter) Remove(ctx context.Context, key string) error {
	var removals []string
	var id string
	err := withTransaction(ctx, o.ms, true, func(ctx context.Context, _ *bolt.Tx) (err error) {
		if id, _, err = storage.Remove(ctx, key); err != nil {
			return fmt.Errorf("remove snapshot %q: %w", key, err)
		}
		if o.syncRemove {
			var err error
			if removals, err = o.orphans(ctx); err != nil {
				return fmt.Errorf("remove snapshot %q: %w", key, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	o.dropSeed(id)
	// After the commit: the key is gone whatever happens to the directories,
	// and a directory that survives is an orphan the next Cleanup retries.
	o.removeDirs(ctx, removals)
	return nil
}

// Walk calls fn for every snapshot matching all filters.
func (o *Snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return withTransaction(ctx, o.ms, false, func(ctx context.Context, _ *bolt.Tx) error {
		if !o.upperdirLabel {
			return storage.WalkInfo(ctx, fn, filters...)
		}
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			id, _, _, err := storage.GetInfo(ctx, info.Name)
			if err != nil {
				return err
			}
			return fn(ctx, o.withUpperdirLabel(info, id))
		}, filters...)
	})
}

// Cleanup removes the directories of removed snapshots and those left
// half-prepared by a crash.
func (o *Snapshotter) Cleanup(ctx context.Context) error {
	var removals []string
	// A write transaction keeps new snapshots from being created while the
	// directory listing is compared with the metadata.
	if err := withTransaction(ctx, o.ms, true, func(ctx context.Context, _ *bolt.Tx) (err error) {
		removals, err = o.orphans(ctx)
		return err
	}); err != nil {
		return fmt.Errorf("cleanup: %w", err)
	}
	o.removeDirs(ctx, removals)
	return nil
}

// Close stops background captures (their containers are thawed) and
// releases the metadata database.
func (o *Snapshotter) Close() error {
	o.cancelBackground()
	o.background.Wait()
	o.dropSeeds()
	if o.hold != nil {
		if err := o.hold.Release(context.Background()); err != nil {
			log.L.WithError(err).Warn("failed to release the freezer hold cgroup")
		}
	}
	return o.ms.Close()
}

func (o *Snapshotter) orphans(ctx context.Context) ([]string, error) {
	ids, err := storage.IDMap(ctx)
	if err != nil {
		return nil, err
	}
	return o.layout.Orphans(ids)
}

func (o *Snapshotter) createSnapshot(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) (_ []mount.Mount, err error) {
	if err := validateKey("snapshot key", key); err != nil {
		return nil, err
	}
	var (
		s         storage.Snapshot
		info      snapshots.Info
		td, final string
	)
	defer func() {
		// On failure nothing may remain on disk: neither the temporary
		// directory nor, if the rename happened but the commit did not, the
		// final one.
		if err == nil {
			return
		}
		for _, dir := range []string{td, final} {
			if dir == "" {
				continue
			}
			if rerr := overlay.RemoveTree(dir); rerr != nil {
				log.G(ctx).WithError(rerr).WithField("path", dir).Error("failed to remove directory of failed snapshot; Cleanup will retry")
			}
		}
	}()

	err = withTransaction(ctx, o.ms, true, func(ctx context.Context, _ *bolt.Tx) (err error) {
		if td, err = o.layout.PrepareTemp(kind == snapshots.KindActive); err != nil {
			return err
		}
		if s, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...); err != nil {
			return fmt.Errorf("create snapshot %q: %w", key, err)
		}
		if _, info, _, err = storage.GetInfo(ctx, key); err != nil {
			return fmt.Errorf("create snapshot %q: %w", key, err)
		}
		if err := o.chownUpper(ctx, td, s, info); err != nil {
			return fmt.Errorf("create snapshot %q: %w", key, err)
		}
		final = o.layout.SnapshotDir(s.ID)
		if err := os.Rename(td, final); err != nil {
			final = ""
			return fmt.Errorf("create snapshot %q: %w", key, err)
		}
		td = ""
		return nil
	})
	if err != nil {
		return nil, err
	}
	return o.mounts(s), nil
}

// chownUpper gives a new upperdir the owner its root directory must have:
// the remapped root with user-namespace labels, else the owner of the
// parent's root, so that the container sees the root it expects.
func (o *Snapshotter) chownUpper(ctx context.Context, td string, s storage.Snapshot, info snapshots.Info) error {
	upper := filepath.Join(td, "fs")
	uid, gid, ok, err := remappedRoot(info.Labels)
	if err != nil {
		return err
	}
	if !ok {
		if len(s.ParentIDs) == 0 {
			return nil
		}
		uid, gid, err = owner(o.layout.UpperDir(s.ParentIDs[0]))
		if err != nil {
			return fmt.Errorf("stat parent: %w", err)
		}
	}
	if err := os.Lchown(upper, uid, gid); err != nil {
		return fmt.Errorf("chown upperdir: %w", err)
	}
	return nil
}

func (o *Snapshotter) mounts(s storage.Snapshot) []mount.Mount {
	return o.layout.Mounts(overlay.MountSpec{
		ID:        s.ID,
		ParentIDs: s.ParentIDs,
		Active:    s.Kind == snapshots.KindActive,
		Options:   o.mountOptions,
	})
}

func (o *Snapshotter) withUpperdirLabel(info snapshots.Info, id string) snapshots.Info {
	if !o.upperdirLabel {
		return info
	}
	labels := make(map[string]string, len(info.Labels)+1)
	for k, v := range info.Labels {
		labels[k] = v
	}
	labels[UpperdirLabel] = o.layout.UpperDir(id)
	info.Labels = labels
	return info
}

// BackgroundClass is how work done while containers run should run
// ([commit] precopy_nice and background_cgroup): the converter builds
// layers in it.
func (o *Snapshotter) BackgroundClass() sched.Class { return o.bgClass }
