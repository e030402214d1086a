// Package overlay knows everything about overlayfs that the snapshotter needs:
// where a snapshot's upper and work directories live under the root, which
// mounts a snapshot is made of, and which mount options this kernel and this
// backing filesystem need.
package overlay
