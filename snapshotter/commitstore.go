package snapshotter

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"time"

	"github.com/containerd/errdefs"
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
	// StateFailed: the commit ended with an error (see Commit.Error).
	StateFailed CommitState = "failed"
)

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
	CaptureEntries int64     `json:"capture_entries"`
	PreCopyRounds  int       `json:"precopy_rounds"`
	Error          string    `json:"error,omitempty"`
	ErrorCode      string    `json:"error_code,omitempty"`
	CreatedAt      time.Time `json:"created_at"`
	UpdatedAt      time.Time `json:"updated_at"`
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
