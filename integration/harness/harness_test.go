//go:build linux

package harness

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"
	"google.golang.org/grpc"

	"github.com/seamless-snapshotter/seamless-snapshotter/integration/testimage"
)

// containerdBinaries are what a containerd without our daemon needs.
var containerdBinaries = []string{BinContainerd, BinCtr, BinShim, BinRunc}

// testContext bounds one test; the harness's cleanups use their own.
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// TestContainerdWithProxyPlugin checks that containerd starts with the
// generated config and lists the seamless proxy snapshotter, with the
// whole Env when our daemon and the registry are built, else without them.
func TestContainerdWithProxyPlugin(t *testing.T) {
	RequireBinaries(t, containerdBinaries...)
	ctx := testContext(t)
	opts := Options{
		NoDaemon:   !HasBinary(BinDaemon),
		NoRegistry: !HasBinary(BinRegistry),
	}
	start := time.Now()
	env := Start(t, opts)
	t.Logf("env up in %v (daemon: %v, registry: %v)", time.Since(start), !opts.NoDaemon, !opts.NoRegistry)

	out, err := env.Ctr(ctx, "version")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "Server:") {
		t.Errorf("ctr version shows no server:\n%s", out)
	}

	out, err = env.Ctr(ctx, "plugins", "ls")
	if err != nil {
		t.Fatal(err)
	}
	if !hasPluginLine(out, "io.containerd.snapshotter.v1", SnapshotterName) {
		t.Errorf("ctr plugins ls does not list the %s snapshotter:\n%s", SnapshotterName, out)
	}
}

// hasPluginLine reports whether `ctr plugins ls` lists a plugin of type typ
// with id.
func hasPluginLine(out, typ, id string) bool {
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == typ && f[1] == id {
			return true
		}
	}
	return false
}

// TestRunOnOverlayfs imports the busybox test image and runs containers
// on containerd's built-in overlayfs snapshotter: in the foreground, and
// detached with an exec.
func TestRunOnOverlayfs(t *testing.T) {
	RequireBinaries(t, containerdBinaries...)
	ctx := testContext(t)
	env := Start(t, Options{NoDaemon: true, NoRegistry: true})

	ref := importBusybox(ctx, t, env, "overlayfs")

	out, err := env.Run(ctx, UniqueID("hello-"), ref, "overlayfs", "echo", "hello")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(out); got != "hello" {
		t.Errorf("echo hello printed %q", got)
	}

	id := UniqueID("sleeper-")
	if err := env.RunDetached(ctx, id, ref, "overlayfs", "sh", "-c", "echo started; exec sleep 600"); err != nil {
		t.Fatal(err)
	}
	out, err = env.Exec(ctx, id, "echo", "hello")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(out); got != "hello" {
		t.Errorf("exec echo hello printed %q", got)
	}
	waitForLog(ctx, t, env, id, "started")
}

func waitForLog(ctx context.Context, t *testing.T, env *Env, id, want string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var last string
	err := WaitFor(ctx, 50*time.Millisecond, func(context.Context) (bool, error) {
		last, _ = env.ContainerLog(id)
		return strings.Contains(last, want), nil
	})
	if err != nil {
		t.Fatalf("log of %s never showed %q: %v; log:\n%s", id, want, err, last)
	}
}

// TestPullIntoProxySnapshotter exercises the proxy path end to end before
// our daemon exists: containerd's own overlay snapshotter, served
// in-process over the snapshots API, stands in for it. The image is pushed
// to the registry, pulled through the transfer service into the proxy
// (relying on the unpack_config entry, no --local), and run. The registry
// is then stopped and started to check its storage survives.
func TestPullIntoProxySnapshotter(t *testing.T) {
	RequireBinaries(t, append(containerdBinaries, BinRegistry)...)
	ctx := testContext(t)
	socket := serveOverlaySnapshotter(t)
	env := Start(t, Options{NoDaemon: true, Containerd: ContainerdOptions{SnapshotterAddress: socket}})

	img, err := testimage.Build()
	if err != nil {
		t.Fatal(err)
	}
	ref := env.Registry.Ref("seamless-test/busybox:v1")
	if _, err := testimage.Push(ctx, img, ref); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	if err := env.PullImage(ctx, ref, SnapshotterName); err != nil {
		t.Fatal(err)
	}
	t.Logf("pull into %s took %v", SnapshotterName, time.Since(start))
	out, err := env.Ctr(ctx, "snapshots", "--snapshotter", SnapshotterName, "ls")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "Committed") {
		t.Errorf("no committed snapshot in %s after pull:\n%s", SnapshotterName, out)
	}

	out, err = env.Run(ctx, UniqueID("proxy-"), ref, SnapshotterName, "echo", "hello")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(out); got != "hello" {
		t.Errorf("echo hello printed %q", got)
	}

	if err := env.Registry.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := env.Ctr(ctx, "images", "rm", "--sync", ref); err != nil {
		t.Fatal(err)
	}
	if err := env.PullImage(ctx, ref, "overlayfs"); err != nil {
		t.Fatalf("pull after registry restart: %v", err)
	}
}

// serveOverlaySnapshotter serves containerd's overlay snapshotter on a
// unix socket in this process, until the test ends. It is registered
// before Start, so it outlives containerd.
func serveOverlaySnapshotter(t *testing.T) string {
	t.Helper()
	sn, err := overlay.NewSnapshotter(t.TempDir())
	if err != nil {
		t.Fatalf("creating overlay snapshotter: %v", err)
	}
	socket := filepath.Join(socketDir(t), "overlay.sock")
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	go srv.Serve(l)
	t.Cleanup(func() {
		srv.Stop()
		sn.Close()
		os.Remove(socket)
	})
	return socket
}

// TestContainerdRestartAndSweep checks the two promises around containerd
// restarts: a container survives containerd stopping (its shim is not
// containerd's child), and a container left running when the test ends
// with containerd stopped is still removed by the cleanup.
func TestContainerdRestartAndSweep(t *testing.T) {
	RequireBinaries(t, containerdBinaries...)
	ctx := testContext(t)
	var pid int
	t.Run("restart", func(t *testing.T) {
		env := Start(t, Options{NoDaemon: true, NoRegistry: true})
		ref := importBusybox(ctx, t, env, "overlayfs")
		id := UniqueID("survivor-")
		if err := env.RunDetached(ctx, id, ref, "overlayfs", "sleep", "600"); err != nil {
			t.Fatal(err)
		}
		pid = taskPid(ctx, t, env, id)
		if err := env.Containerd.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		if err := processAlive(pid); err != nil {
			t.Fatalf("task died with containerd: %v", err)
		}
		if _, err := env.Exec(ctx, id, "true"); err != nil {
			t.Fatalf("exec after containerd restart: %v", err)
		}
		// Leave the container running and containerd stopped.
		if err := env.Containerd.Stop(ctx); err != nil {
			t.Fatal(err)
		}
	})
	if pid == 0 {
		t.Fatal("subtest did not start the container")
	}
	if err := processAlive(pid); err == nil {
		t.Errorf("task pid %d still alive after cleanup", pid)
	}
}

// importBusybox imports the busybox test image into env and returns its
// name.
func importBusybox(ctx context.Context, t *testing.T, env *Env, snapshotter string) string {
	t.Helper()
	const ref = "docker.io/seamless-test/busybox:harness"
	archive := filepath.Join(t.TempDir(), "busybox.tar")
	img, err := testimage.Build()
	if err != nil {
		t.Fatal(err)
	}
	if err := testimage.WriteOCIArchive(img, ref, archive); err != nil {
		t.Fatal(err)
	}
	if err := env.ImportImage(ctx, archive, snapshotter); err != nil {
		t.Fatal(err)
	}
	return ref
}

// taskPid returns the host pid of container id's init process.
func taskPid(ctx context.Context, t *testing.T, env *Env, id string) int {
	t.Helper()
	client, err := env.Containerd.Client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	c, err := client.LoadContainer(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	task, err := c.Task(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	return int(task.Pid())
}

// processAlive returns nil if pid exists and is not a zombie.
func processAlive(pid int) error {
	stat, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return err
	}
	// The state follows the parenthesised command name.
	if i := strings.LastIndexByte(string(stat), ')'); i >= 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
		return fmt.Errorf("pid %d is a zombie", pid)
	}
	return nil
}

// TestEnvWithDaemon runs the whole Env: an image pushed to the registry is
// pulled into our daemon through containerd's transfer service and run,
// and the daemon comes back after a crash (SIGKILL).
func TestEnvWithDaemon(t *testing.T) {
	Require(t)
	ctx := testContext(t)
	env := Start(t, Options{})

	img, err := testimage.Build()
	if err != nil {
		t.Fatal(err)
	}
	ref := env.Registry.Ref("seamless-test/busybox:v1")
	if _, err := testimage.Push(ctx, img, ref); err != nil {
		t.Fatal(err)
	}
	if err := env.PullImage(ctx, ref, SnapshotterName); err != nil {
		t.Fatal(err)
	}
	assertEcho(ctx, t, env, ref)

	if err := env.Daemon.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := env.Daemon.Start(ctx); err != nil {
		t.Fatalf("daemon restart after SIGKILL: %v", err)
	}
	start := time.Now()
	if err := env.WaitForSnapshotter(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("containerd reached the restarted daemon after %v", time.Since(start))
	assertEcho(ctx, t, env, ref)
}

// assertEcho runs `echo hello` in a container of ref on our snapshotter.
func assertEcho(ctx context.Context, t *testing.T, env *Env, ref string) {
	t.Helper()
	out, err := env.Run(ctx, UniqueID("echo-"), ref, SnapshotterName, "echo", "hello")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(out); got != "hello" {
		t.Errorf("echo hello printed %q", got)
	}
}
