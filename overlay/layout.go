//go:build linux

package overlay

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

const (
	snapshotsDirName  = "snapshots"
	capturesDirName   = "captures"
	captureTempPrefix = ".tmp-"
	upperDirName      = "fs"
	workDirName       = "work"
	// tempPrefix marks a snapshot directory that is still being prepared. A
	// crash can leave one behind; since its name is never a snapshot ID,
	// Cleanup reclaims it like any other orphan.
	tempPrefix = "new-"
)

// Layout maps snapshot IDs to directories under a snapshotter root:
//
//	<root>/snapshots/<id>/fs    upperdir (the snapshot's own changes)
//	<root>/snapshots/<id>/work  overlay workdir (active snapshots only)
//
// IDs come from the metadata store, never from user-supplied keys, so no
// key can name a path outside the root.
type Layout struct {
	root string
	// subvolumes makes each active snapshot's directory a btrfs
	// subvolume, so that it can be captured by a snapshot.
	subvolumes bool
}

// NewLayout returns the layout of the snapshotter rooted at root.
func NewLayout(root string) Layout {
	return Layout{root: root}
}

// WithSubvolumes returns the layout that creates each active snapshot's
// directory as a btrfs subvolume (the root must be on btrfs).
func (l Layout) WithSubvolumes() Layout {
	l.subvolumes = true
	return l
}

// Root is the snapshotter root directory.
func (l Layout) Root() string { return l.root }

// SnapshotsDir holds one directory per snapshot ID.
func (l Layout) SnapshotsDir() string { return filepath.Join(l.root, snapshotsDirName) }

// SnapshotDir is the directory of the snapshot with the given ID.
func (l Layout) SnapshotDir(id string) string { return filepath.Join(l.SnapshotsDir(), id) }

// UpperDir is the upperdir of the snapshot with the given ID.
func (l Layout) UpperDir(id string) string {
	return filepath.Join(l.SnapshotsDir(), id, upperDirName)
}

// WorkDir is the overlay workdir of the active snapshot with the given ID.
func (l Layout) WorkDir(id string) string {
	return filepath.Join(l.SnapshotsDir(), id, workDirName)
}

// CapturesDir holds the point-in-time captures of seamless commits. It is
// not under SnapshotsDir: captures are not snapshots, and containerd's
// garbage collector (through Cleanup) must never see or remove them.
func (l Layout) CapturesDir() string { return filepath.Join(l.root, capturesDirName) }

// CaptureDir is the capture of the commit with the given ID.
func (l Layout) CaptureDir(commitID string) string {
	return filepath.Join(l.CapturesDir(), commitID)
}

// CaptureUpper is where a capture holds the copy of the upperdir.
func (l Layout) CaptureUpper(commitID string) string {
	return filepath.Join(l.CaptureDir(commitID), upperDirName)
}

// CaptureTemp is where a capture is built before it is recorded.
func (l Layout) CaptureTemp(commitID string) string {
	return filepath.Join(l.CapturesDir(), captureTempPrefix+commitID)
}

// IsCaptureTemp reports whether a name in CapturesDir is a capture being
// built (or left half-built by a crash).
func IsCaptureTemp(name string) bool { return strings.HasPrefix(name, captureTempPrefix) }

// Init creates the root and the snapshots directory, both root-only.
func (l Layout) Init() error {
	for _, dir := range []string{l.root, l.SnapshotsDir(), l.CapturesDir()} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("create %s: %w", dir, err)
		}
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("restrict %s to root: %w", dir, err)
		}
	}
	return nil
}

// PrepareTemp creates a temporary snapshot directory with an upperdir and,
// for active snapshots, a workdir. The caller renames it to SnapshotDir(id)
// once the snapshot is recorded, or removes it on failure.
func (l Layout) PrepareTemp(active bool) (string, error) {
	td, err := l.makeTemp(active)
	if err != nil {
		return "", fmt.Errorf("create temporary snapshot directory: %w", err)
	}
	if err := os.Mkdir(filepath.Join(td, upperDirName), 0o755); err != nil {
		return td, fmt.Errorf("create upperdir: %w", err)
	}
	if active {
		if err := os.Mkdir(filepath.Join(td, workDirName), 0o711); err != nil {
			return td, fmt.Errorf("create workdir: %w", err)
		}
	}
	return td, nil
}

func (l Layout) makeTemp(active bool) (string, error) {
	if !l.subvolumes || !active {
		return os.MkdirTemp(l.SnapshotsDir(), tempPrefix)
	}
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	td := filepath.Join(l.SnapshotsDir(), tempPrefix+hex.EncodeToString(b))
	if err := CreateSubvolume(td); err != nil {
		return "", err
	}
	return td, os.Chmod(td, 0o700)
}

// Orphans lists the snapshot directories whose name is not a known snapshot
// ID: directories of removed snapshots and temporary directories left by a
// crash.
func (l Layout) Orphans(known map[string]string) ([]string, error) {
	entries, err := os.ReadDir(l.SnapshotsDir())
	if err != nil {
		return nil, fmt.Errorf("read snapshots directory: %w", err)
	}
	var orphans []string
	for _, e := range entries {
		if _, ok := known[e.Name()]; ok {
			continue
		}
		orphans = append(orphans, filepath.Join(l.SnapshotsDir(), e.Name()))
	}
	return orphans, nil
}
