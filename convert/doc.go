// Package convert will turn captured layers into images: a durable job
// queue in the snapshotter's bolt database, and workers that build the
// layer (one walk of the capture, whiteouts, gzip or zstd), resolve the
// base image through containerd, write config and manifest, and push to
// the target registry, manifest last. The snapshotter already records each
// capture with a job in state "pending" (see snapshotter.Commit); this
// package is where those jobs will be taken up.
package convert
