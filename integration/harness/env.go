//go:build linux

package harness

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Options configure an Env.
type Options struct {
	// NoRegistry leaves the registry out.
	NoRegistry bool
	// NoDaemon leaves our daemon out. containerd is still configured with
	// the seamless proxy plugin: at Containerd.SnapshotterAddress if set
	// (e.g. an in-process snapshotter), else at a socket nobody serves.
	NoDaemon bool
	// Daemon configures our daemon.
	Daemon DaemonOptions
	// Containerd configures containerd. SnapshotterAddress defaults to the
	// daemon's socket; the registry is added to RegistryHosts.
	Containerd ContainerdOptions
	// Ready, if set, is called by Start as each step completes, with the
	// Env built so far and how long the step took; programs use it to
	// report progress.
	Ready func(e *Env, step Step, took time.Duration)
}

// Step is one step of Start, in order.
type Step string

// Steps of Start, reported to Options.Ready.
const (
	StepRegistry    Step = "registry"    // Env.Registry serves
	StepDaemon      Step = "daemon"      // Env.Daemon accepts connections
	StepContainerd  Step = "containerd"  // Env.Containerd serves
	StepSnapshotter Step = "snapshotter" // containerd reaches the daemon
)

// Env is a registry, our daemon and a containerd that uses the daemon as
// its "seamless" snapshotter, all private to one test.
type Env struct {
	t          T
	Registry   *Registry // nil with Options.NoRegistry
	Daemon     *Daemon   // nil with Options.NoDaemon
	Containerd *Containerd
	logDir     string
}

// Start brings up an Env and registers its teardown: containers first,
// then containerd, the daemon and the registry. Failures end the test.
func Start(t T, opts Options) *Env {
	t.Helper()
	ctx := t.Context()
	e := &Env{t: t, logDir: t.TempDir()}
	begin := time.Now()
	ready := func(step Step) {
		if opts.Ready != nil {
			opts.Ready(e, step, time.Since(begin))
		}
		begin = time.Now()
	}
	if !opts.NoRegistry {
		e.Registry = NewRegistry(t)
		if err := e.Registry.Start(ctx); err != nil {
			t.Fatal(err)
		}
		// Clip: do not write into the caller's backing array.
		opts.Containerd.RegistryHosts = append(slices.Clip(opts.Containerd.RegistryHosts), e.Registry.Addr())
		ready(StepRegistry)
	}
	if !opts.NoDaemon {
		e.Daemon = NewDaemon(t, opts.Daemon)
	}
	if opts.Containerd.SnapshotterAddress == "" {
		opts.Containerd.SnapshotterAddress = e.snapshotterAddress(t)
	}
	e.Containerd = NewContainerd(t, opts.Containerd)
	if e.Daemon != nil {
		// The daemon builds images through this containerd and pushes
		// them with its registry configuration.
		e.Daemon.UseContainerd(e.Containerd.Address(), e.Containerd.HostsDir())
		if err := e.Daemon.Start(ctx); err != nil {
			t.Fatal(err)
		}
		ready(StepDaemon)
	}
	if err := e.Containerd.Start(ctx); err != nil {
		t.Fatal(err)
	}
	ready(StepContainerd)
	if e.Daemon != nil {
		if err := e.WaitForSnapshotter(ctx); err != nil {
			t.Fatal(err)
		}
		ready(StepSnapshotter)
	}
	return e
}

// WaitForSnapshotter waits until containerd reaches the seamless
// snapshotter. containerd's gRPC connection to a proxy retries with a
// backoff of up to 3 s after the proxy went away, and calls fail at once
// ("connection refused") meanwhile: after Daemon.Start or Restart, call
// this before using the snapshotter.
func (e *Env) WaitForSnapshotter(ctx context.Context) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, startTimeout)
		defer cancel()
	}
	var lastErr error
	err := WaitFor(ctx, 100*time.Millisecond, func(ctx context.Context) (bool, error) {
		_, lastErr = e.Ctr(ctx, "snapshots", "--snapshotter", SnapshotterName, "ls")
		return lastErr == nil, nil
	})
	if err != nil {
		return fmt.Errorf("containerd cannot reach the %s snapshotter: %w (last error: %v)", SnapshotterName, err, lastErr)
	}
	return nil
}

// snapshotterAddress is the daemon's socket, or without a daemon a path
// where nothing listens: containerd connects to proxies lazily, so it
// starts anyway and tests can see how it behaves with the proxy down.
func (e *Env) snapshotterAddress(t T) string {
	if e.Daemon != nil {
		return e.Daemon.Socket()
	}
	return filepath.Join(socketDir(t), "absent.sock")
}

// Ctr runs ctr against the Env's containerd; see Containerd.Ctr.
func (e *Env) Ctr(ctx context.Context, args ...string) (string, error) {
	return e.Containerd.Ctr(ctx, args...)
}

// PullImage pulls ref through containerd's transfer service and unpacks it
// into snapshotter. Registries are reached over plain HTTP, with the
// hosts.toml files of Containerd.HostsDir.
func (e *Env) PullImage(ctx context.Context, ref, snapshotter string) error {
	_, err := e.Ctr(ctx, "images", "pull", "--plain-http",
		"--hosts-dir", e.Containerd.HostsDir(), "--snapshotter", snapshotter, ref)
	return err
}

// PushImage pushes ref, which must be in containerd's image store, to its
// registry over plain HTTP.
func (e *Env) PushImage(ctx context.Context, ref string) error {
	_, err := e.Ctr(ctx, "images", "push", "--plain-http",
		"--hosts-dir", e.Containerd.HostsDir(), ref)
	return err
}

// ImportImage imports an OCI or Docker archive and unpacks it into
// snapshotter.
func (e *Env) ImportImage(ctx context.Context, archive, snapshotter string) error {
	_, err := e.Ctr(ctx, "images", "import", "--snapshotter", snapshotter, archive)
	return err
}

// Run runs a container in the foreground (`ctr run --rm`) and returns its
// output; the container is removed when it exits.
func (e *Env) Run(ctx context.Context, id, image, snapshotter string, args ...string) (string, error) {
	e.cleanupContainer(id)
	full := append([]string{"run", "--rm", "--snapshotter", snapshotter, image, id}, args...)
	return e.Ctr(ctx, full...)
}

// RunDetached starts a container in the background (`ctr run -d`) and
// registers its removal when the test ends. Its stdout and stderr go to
// ContainerLogPath(id): with plain `ctr run -d` they would go to a FIFO
// nobody reads once ctr exits, and the container would block after 64 KiB.
func (e *Env) RunDetached(ctx context.Context, id, image, snapshotter string, args ...string) error {
	e.cleanupContainer(id)
	full := append([]string{"run", "-d", "--snapshotter", snapshotter,
		"--log-uri", "file://" + e.ContainerLogPath(id), image, id}, args...)
	_, err := e.Ctr(ctx, full...)
	return err
}

// ContainerLogPath is where RunDetached sends a container's output.
func (e *Env) ContainerLogPath(id string) string {
	return filepath.Join(e.logDir, id+".log")
}

// ContainerLog returns the output of a container started by RunDetached.
func (e *Env) ContainerLog(id string) (string, error) {
	b, err := os.ReadFile(e.ContainerLogPath(id))
	if err != nil {
		return "", fmt.Errorf("reading log of container %s: %w", id, err)
	}
	return string(b), nil
}

// Exec runs a process in the running container id and returns its output.
func (e *Env) Exec(ctx context.Context, id string, args ...string) (string, error) {
	full := append([]string{"tasks", "exec", "--exec-id", UniqueID("exec-"), id}, args...)
	return e.Ctr(ctx, full...)
}

// KillTask sends SIGKILL to the task of container id. It does not wait for
// the task to exit; DeleteContainer does.
func (e *Env) KillTask(ctx context.Context, id string) error {
	_, err := e.Ctr(ctx, "tasks", "kill", "--signal", "SIGKILL", id)
	return err
}

// DeleteContainer force-deletes the task of container id (killing it if it
// runs) and then the container with its snapshot. Absent tasks and
// containers are not errors.
func (e *Env) DeleteContainer(ctx context.Context, id string) error {
	if _, err := e.Ctr(ctx, "tasks", "rm", "--force", id); err != nil && !isNotFound(err) {
		return err
	}
	if _, err := e.Ctr(ctx, "containers", "rm", id); err != nil && !isNotFound(err) {
		return err
	}
	return nil
}

// isNotFound recognises ctr's message for a missing object: ctr only
// exits 1, and its message (in the error, from stderr) is the only signal.
func isNotFound(err error) bool {
	return strings.Contains(err.Error(), "not found")
}

// cleanupContainer removes container id when the test ends. Cleanups run
// in reverse, so this runs before containerd stops. If the test stopped
// containerd, Containerd's own sweep handles the container instead.
func (e *Env) cleanupContainer(id string) {
	e.t.Cleanup(func() {
		if !e.Containerd.Running() {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
		defer cancel()
		begin := time.Now()
		if err := e.DeleteContainer(ctx, id); err != nil {
			e.t.Errorf("removing container %s: %v", id, err)
			return
		}
		e.t.Logf("container %s: removed (if it existed) in %v", id, time.Since(begin).Round(time.Millisecond))
	})
}

// WaitFor polls cond until it returns true or ctx expires; tests use it for
// conditions that settle asynchronously (a task exiting, a commit done).
func WaitFor(ctx context.Context, interval time.Duration, cond func(context.Context) (bool, error)) error {
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		ok, err := cond(ctx)
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("condition not met: %w", ctx.Err())
		case <-ticker.C:
		}
	}
}
