// Package freeze finds the processes that use a snapshot and freezes them
// through the cgroup freezer for the few milliseconds a seamless commit needs
// to capture the snapshot's upperdir.
//
// The processes are found from the mounts and /proc alone (ProcessesUsing),
// never from a runtime's bookkeeping, so containers started by ctr, nerdctl
// or Kubernetes are found alike. Freezing is done per cgroup, not per
// process: a process forked or exec'ed into the container after the scan is
// still frozen, because it joins the same cgroup.
//
// On a host that still mounts the cgroup v1 freezer (legacy or hybrid),
// runc pauses containers through freezer.state, so this package freezes
// through it too: a pause made by the user is then visible to us, and ours
// to the user. On a pure cgroup v2 host it uses cgroup.freeze and waits for
// cgroup.events to report "frozen 1".
//
// The rule that governs every function here: never thaw what this package did
// not freeze. A container the user paused stays paused.
package freeze
