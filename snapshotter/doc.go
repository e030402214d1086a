// Package snapshotter is the seamless overlayfs snapshotter: a complete
// snapshots.Snapshotter (and snapshots.Cleaner) over containerd's
// storage.MetaStore, whose bolt database also holds the snapshotter's own
// buckets for the state of seamless commits.
package snapshotter
