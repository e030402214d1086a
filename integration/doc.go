// Package integration holds the end-to-end tests and benchmarks: they run
// the real containerd-seamless-grpc daemon under a real containerd, real
// runc and a real registry, with real overlay mounts, all private to each
// test (see the harness package). Run them as root; with CI=true a missing
// prerequisite fails them instead of skipping.
package integration
