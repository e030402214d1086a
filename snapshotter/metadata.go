package snapshotter

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/log"
	bolt "go.etcd.io/bbolt"
)

// The snapshotter's own state lives in the same bolt database as
// containerd's snapshot metadata (bucket "v1" of core/snapshots/storage), in
// a top-level bucket of its own, so that one transaction can change both:
//
//	seamless.v1/
//	    version -> schema version of the buckets below
//
// Commit state (frozen layers, captures, jobs) is added here as buckets, not
// as snapshots: containerd's garbage collector removes every backend
// snapshot it does not know, and Walk must not show ours.
var (
	bucketSeamless = []byte("seamless.v1")
	keyVersion     = []byte("version")
)

const schemaVersion = 1

// initBuckets creates the snapshotter's buckets, or checks that existing
// ones have a schema this code understands.
func initBuckets(tx *bolt.Tx) error {
	bkt, err := tx.CreateBucketIfNotExists(bucketSeamless)
	if err != nil {
		return fmt.Errorf("create bucket %s: %w", bucketSeamless, err)
	}
	if v := bkt.Get(keyVersion); v != nil {
		if len(v) != 1 || int(v[0]) > schemaVersion {
			return fmt.Errorf("metadata schema version %v is newer than this snapshotter's (%d): refusing to downgrade", v, schemaVersion)
		}
		return nil
	}
	return bkt.Put(keyVersion, []byte{schemaVersion})
}

// transactionFn runs inside a metadata transaction. ctx carries the
// transaction for the storage package; tx is the same transaction, for the
// snapshotter's own buckets.
type transactionFn func(ctx context.Context, tx *bolt.Tx) error

// withTransaction runs fn in a transaction that is committed when fn
// succeeds (and writable is set) and rolled back otherwise.
func withTransaction(ctx context.Context, ms *storage.MetaStore, writable bool, fn transactionFn) (err error) {
	ctx, t, err := ms.TransactionContext(ctx, writable)
	if err != nil {
		return err
	}
	tx, ok := t.(*bolt.Tx)
	if !ok {
		_ = t.Rollback()
		return fmt.Errorf("metadata store returned a %T transaction, want *bolt.Tx", t)
	}
	if err := fn(ctx, tx); err != nil {
		if rerr := tx.Rollback(); rerr != nil {
			log.G(ctx).WithError(rerr).Error("failed to roll back metadata transaction")
			return errors.Join(err, fmt.Errorf("rollback: %w", rerr))
		}
		return err
	}
	if !writable {
		return tx.Rollback()
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit metadata transaction: %w", err)
	}
	return nil
}
