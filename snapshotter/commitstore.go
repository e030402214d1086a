package snapshotter

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	bolt "go.etcd.io/bbolt"
)

// CommitState is where a commit is in its life.
type CommitState string

const (
	// StateCapturing: the writable layer is being captured. A commit found
	// in this state at start-up was interrupted by a crash; recovery marks
	// it failed.
	StateCapturing CommitState = "capturing"
	// StatePending: captured, waiting for conversion into an image.
	StatePending CommitState = "pending"
	// StateConverting: the layer, config and manifest are being built.
	StateConverting CommitState = "converting"
	// StatePushing: the image is being pushed (or imported, for --local).
	StatePushing CommitState = "pushing"
	// StateDone: the image is published; see Commit.ImageDigest.
	StateDone CommitState = "done"
	// StateFailed: the commit ended with an error (see Commit.Error).
	StateFailed CommitState = "failed"
)

// Terminal reports whether a commit in this state will not change again.
func (s CommitState) Terminal() bool { return s == StateDone || s == StateFailed }

// Layer is one layer a commit added on top of the base image.
type Layer struct {
	MediaType string        `json:"media_type"`
	Digest    digest.Digest `json:"digest"`
	Size      int64         `json:"size"`
	DiffID    digest.Digest `json:"diff_id"`
	// Commit is the commit whose capture the layer holds the changes of.
	Commit string `json:"commit"`
	// Created is that commit's capture instant, for the image history.
	Created time.Time `json:"created"`
	// Squashed is set when the layer holds every change since the base
	// image, replacing earlier commits' layers.
	Squashed bool `json:"squashed,omitempty"`
	// Source, when set, is an image reference whose repository holds the
	// blob, which containerd's content store does not keep: a layer
	// streamed to the registry and not copied locally.
	Source string `json:"source,omitempty"`
}

// BaseImage is the image a committed container was created from.
type BaseImage struct {
	Name      string        `json:"name"`
	Digest    digest.Digest `json:"digest"`
	MediaType string        `json:"media_type"`
}

// Progress counts the bytes of a job's current phase.
type Progress struct {
	Done  int64 `json:"done"`
	Total int64 `json:"total"`
}

// Commit is the durable record of one seamless commit.
type Commit struct {
	ID string `json:"id"`
	// SnapshotKey is the backend key of the active snapshot committed
	// ("<namespace>/<seq>/<key>" when it came through containerd).
	SnapshotKey string `json:"snapshot_key"`
	SnapshotID  string `json:"snapshot_id"`
	// Target is the normalised image reference to publish to.
	Target string      `json:"target"`
	State  CommitState `json:"state"`
	// Generation counts the commits captured from this snapshot, this one
	// included.
	Generation uint64 `json:"generation,omitempty"`
	Strategy   string `json:"strategy"`
	// Frozen is false when no process used the snapshot, so nothing had to
	// be frozen.
	Frozen bool `json:"frozen"`
	// Pause is the time the container's processes were frozen.
	Pause time.Duration `json:"pause_ns"`
	// CapturedAt is the instant the capture represents.
	CapturedAt time.Time `json:"captured_at"`
	// CaptureBytes is the data copied or cloned in all rounds.
	CaptureBytes int64 `json:"capture_bytes"`
	// CaptureEntries is the number of entries in the captured layer.
	CaptureEntries int64 `json:"capture_entries"`
	PreCopyRounds  int   `json:"precopy_rounds"`
	// BootID is the kernel boot the capture was made in, and
	// CaptureSynced says it has been flushed to disk since. The flush runs
	// in the background, beside the conversion, which reads the capture
	// from the page cache; only a host crash before it ends can lose
	// data, and recovery then refuses the capture.
	BootID        string `json:"boot_id,omitempty"`
	CaptureSynced bool   `json:"capture_synced,omitempty"`

	// Local imports the image into containerd's image store instead of
	// pushing it.
	Local bool `json:"local,omitempty"`
	// Squash asks for one layer of every change since the base image.
	Squash bool `json:"squash,omitempty"`
	// Compression of the new layer; empty means the configured default.
	Compression string `json:"compression,omitempty"`
	// CompressionLevel of the new layer; 0 means the configured one.
	CompressionLevel int `json:"compression_level,omitempty"`
	// Parent is the backend name of the committed snapshot under the
	// active one: the base image's top layer, whose last path element
	// containerd's unpacker sets to the layer chain's ID. Empty for a
	// container without an image.
	Parent string `json:"parent,omitempty"`

	// Conversion, filled in by the job.
	Base *BaseImage `json:"base,omitempty"`
	// Layers are the layers the image has on top of the base, oldest
	// first; the last one holds this commit's changes.
	Layers []Layer `json:"layers,omitempty"`
	// ImageDigest is the digest of the pushed (or imported) manifest.
	ImageDigest digest.Digest `json:"image_digest,omitempty"`
	// UploadedBytes counts the blob bytes the registry did not have:
	// with incremental layers, about the size of the changes since the
	// previous commit.
	UploadedBytes int64    `json:"uploaded_bytes,omitempty"`
	Progress      Progress `json:"progress"`
	// Attempts counts the conversion tries; NextAttempt is when a job that
	// failed transiently runs again.
	Attempts    int       `json:"attempts,omitempty"`
	NextAttempt time.Time `json:"next_attempt,omitzero"`
	// CaptureRemoved is set once no job needs the capture any more and
	// its directory is (being) deleted.
	CaptureRemoved bool `json:"capture_removed,omitempty"`
	// CaptureDiskBytes is the disk space the capture's files use,
	// including those it shares with the container's previous capture
	// (hard links to the files unchanged since).
	CaptureDiskBytes int64 `json:"capture_disk_bytes,omitempty"`

	Error      string    `json:"error,omitempty"`
	ErrorCode  string    `json:"error_code,omitempty"`
	CreatedAt  time.Time `json:"created_at"`
	UpdatedAt  time.Time `json:"updated_at"`
	FinishedAt time.Time `json:"finished_at,omitzero"`
}

// Buckets below seamless.v1:
//
//	commits/<commit id>      -> Commit (JSON)
//	freezes/<commit id>      -> []string (JSON): cgroups frozen for that
//	                            commit and not yet thawed, written before the
//	                            freeze, so that a restart after a crash thaws
//	                            them
//	generations/<snapshot id> -> uint64: commits captured from the snapshot
var (
	bucketCommits     = []byte("commits")
	bucketFreezes     = []byte("freezes")
	bucketGenerations = []byte("generations")
)

func ownBucket(tx *bolt.Tx, name []byte) (*bolt.Bucket, error) {
	root := tx.Bucket(bucketSeamless)
	if root == nil {
		return nil, fmt.Errorf("bucket %s missing: %w", bucketSeamless, errdefs.ErrNotFound)
	}
	if tx.Writable() {
		return root.CreateBucketIfNotExists(name)
	}
	if b := root.Bucket(name); b != nil {
		return b, nil
	}
	return nil, nil
}

func putCommit(tx *bolt.Tx, c Commit) error {
	b, err := ownBucket(tx, bucketCommits)
	if err != nil {
		return err
	}
	data, err := json.Marshal(c)
	if err != nil {
		return err
	}
	return b.Put([]byte(c.ID), data)
}

func getCommit(tx *bolt.Tx, id string) (Commit, error) {
	var c Commit
	b, err := ownBucket(tx, bucketCommits)
	if err != nil {
		return c, err
	}
	var data []byte
	if b != nil {
		data = b.Get([]byte(id))
	}
	if data == nil {
		return c, fmt.Errorf("commit %q: %w", id, errdefs.ErrNotFound)
	}
	if err := json.Unmarshal(data, &c); err != nil {
		return c, fmt.Errorf("commit %q: corrupt record: %w", id, err)
	}
	return c, nil
}

func forEachCommit(tx *bolt.Tx, fn func(Commit) error) error {
	b, err := ownBucket(tx, bucketCommits)
	if err != nil || b == nil {
		return err
	}
	return b.ForEach(func(k, v []byte) error {
		var c Commit
		if err := json.Unmarshal(v, &c); err != nil {
			return fmt.Errorf("commit %q: corrupt record: %w", k, err)
		}
		return fn(c)
	})
}

func putFreezeIntent(tx *bolt.Tx, commitID string, cgroups []string) error {
	b, err := ownBucket(tx, bucketFreezes)
	if err != nil {
		return err
	}
	data, err := json.Marshal(cgroups)
	if err != nil {
		return err
	}
	return b.Put([]byte(commitID), data)
}

func deleteFreezeIntent(tx *bolt.Tx, commitID string) error {
	b, err := ownBucket(tx, bucketFreezes)
	if err != nil {
		return err
	}
	return b.Delete([]byte(commitID))
}

func freezeIntents(tx *bolt.Tx) (map[string][]string, error) {
	intents := map[string][]string{}
	b, err := ownBucket(tx, bucketFreezes)
	if err != nil || b == nil {
		return intents, err
	}
	err = b.ForEach(func(k, v []byte) error {
		var paths []string
		if err := json.Unmarshal(v, &paths); err != nil {
			return fmt.Errorf("freeze intent %q: corrupt record: %w", k, err)
		}
		intents[string(k)] = paths
		return nil
	})
	return intents, err
}

func nextGeneration(tx *bolt.Tx, snapshotID string) (uint64, error) {
	b, err := ownBucket(tx, bucketGenerations)
	if err != nil {
		return 0, err
	}
	var gen uint64
	if v := b.Get([]byte(snapshotID)); len(v) == 8 {
		gen = binary.BigEndian.Uint64(v)
	}
	gen++
	return gen, b.Put([]byte(snapshotID), binary.BigEndian.AppendUint64(nil, gen))
}
