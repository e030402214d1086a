// Package convert turns captured layers into images, in the background.
//
// Each seamless commit the snapshotter captures is recorded with a job
// (snapshotter.Commit in state "pending") in the snapshotter's database;
// that record is the durable queue. A Converter takes jobs up with a
// bounded number of workers, one job at a time per container, in capture
// order:
//
//	pending → converting → pushing → done | failed
//
// converting: the base image is found through containerd (container →
// image → manifest for the platform, or, when the container is gone, the
// image whose layers match the snapshot's parent); the capture is written
// as one OCI layer (the changes since the container's previous commit, or
// all changes since the base once the chain is long) straight into
// containerd's content store, compressed while it is walked; config and
// manifest follow. pushing: blobs are pushed concurrently with containerd's
// docker resolver (credentials from the docker config, hosts.toml), those
// the registry has are skipped, and the manifest goes last, so that a
// failed job never publishes a partial image; or, for local commits, the
// image is created in containerd's image store and unpacked.
//
// Transient registry errors are retried with exponential backoff; a
// restarted daemon resumes every unfinished job. Blobs a job writes are
// held by a containerd lease per commit; captures and leases are dropped
// once no job can need them.
package convert
