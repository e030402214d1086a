//go:build linux

package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/harness"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/testimage"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil/workload"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// freshNamespace is where committed images are pulled, with containerd's
// own overlayfs snapshotter: nothing of the committed container is there.
const freshNamespace = "fresh"

// waitCommit polls a commit until it is done or failed.
func waitCommit(ctx context.Context, t *testing.T, c apiClient, id string, timeout time.Duration) api.Commit {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		// A fresh record each time: fields left out when empty must not
		// keep an earlier answer's values.
		var rec api.Commit
		if status, apiErr := c.do(ctx, t, "GET", "/api/v1/commits/"+id, nil, &rec); status != 200 {
			t.Fatalf("get commit %s: %d %+v", id, status, apiErr)
		}
		if rec.State.Terminal() {
			return rec
		}
		select {
		case <-ctx.Done():
			t.Fatalf("commit %s still %s after %v (progress %+v, attempts %d, error %q)", id, rec.State, timeout, rec.Progress, rec.Attempts, rec.Error)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// requireDone fails the test unless the commit was published.
func requireDone(t *testing.T, rec api.Commit) {
	t.Helper()
	if rec.State != snapshotter.StateDone || rec.ImageDigest == "" {
		t.Fatalf("commit %s is %s (%s: %s), want done", rec.ID, rec.State, rec.ErrorCode, rec.Error)
	}
}

// commitAndWait commits container id to target through the API and waits
// for the image to be published.
func commitAndWait(ctx context.Context, t *testing.T, env *harness.Env, id string, req api.CommitRequest) api.Commit {
	t.Helper()
	c := newAPIClient(env)
	req.Namespace, req.Container = harness.DefaultNamespace, id
	if req.PauseBudget == "" {
		// These tests are about the image; the pause has its own tests
		// and benchmark. The writer dirties ~1,000 files between two
		// rounds, which the copy strategy's frozen round copies.
		req.PauseBudget = "5s"
	}
	var rec api.Commit
	if status, apiErr := c.do(ctx, t, "POST", "/api/v1/commits", req, &rec); status != 201 {
		t.Fatalf("commit: %d %+v", status, apiErr)
	}
	done := waitCommit(ctx, t, c, rec.ID, 3*time.Minute)
	requireDone(t, done)
	return done
}

// viewImage pulls ref into the fresh namespace with overlayfs and returns
// the mounts of a read-only view of its root filesystem; the view goes
// when the test ends.
func viewImage(ctx context.Context, t *testing.T, env *harness.Env, c *containerd.Client, ref string) []mount.Mount {
	t.Helper()
	ctx = namespaces.WithNamespace(ctx, freshNamespace)
	if err := env.PullImage(ctx, ref, "overlayfs"); err != nil {
		t.Fatalf("pull %s into a fresh namespace: %v", ref, err)
	}
	img, err := c.GetImage(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sn := c.SnapshotService("overlayfs")
	key := harness.UniqueID("view-")
	mounts, err := sn.View(ctx, key, identity.ChainID(diffIDs).String(), gcRoot())
	if err != nil {
		t.Fatalf("view of %s: %v", ref, err)
	}
	t.Cleanup(func() {
		if err := sn.Remove(context.WithoutCancel(ctx), key); err != nil {
			t.Errorf("remove view %s: %v", key, err)
		}
	})
	return mounts
}

// mountImage mounts the root filesystem of ref, pulled into the fresh
// namespace, read-only; the mount goes when the test ends.
func mountImage(ctx context.Context, t *testing.T, env *harness.Env, c *containerd.Client, ref string) string {
	t.Helper()
	mounts := viewImage(ctx, t, env, c, ref)
	dir := t.TempDir()
	if err := mount.All(mounts, dir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := mount.UnmountAll(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

// gcRoot keeps containerd's collector off a snapshot no lease holds.
func gcRoot() snapshots.Opt {
	return snapshots.WithLabels(map[string]string{"containerd.io/gc.root": time.Now().Format(time.RFC3339)})
}

// lowerDirs returns the directories of a read-only view's mounts, top
// first.
func lowerDirs(t *testing.T, mounts []mount.Mount) []string {
	t.Helper()
	if len(mounts) != 1 {
		t.Fatalf("mounts %+v", mounts)
	}
	m := mounts[0]
	if m.Type == "bind" {
		return []string{m.Source}
	}
	for _, o := range m.Options {
		if v, ok := strings.CutPrefix(o, "lowerdir="); ok {
			return strings.Split(v, ":")
		}
	}
	t.Fatalf("no lowerdir in %+v", m)
	return nil
}

// mountExpected mounts what the committed image must hold: the capture
// as an overlay layer over the base image's layers (pulled into the fresh
// namespace with overlayfs).
func mountExpected(ctx context.Context, t *testing.T, env *harness.Env, c *containerd.Client, baseRef, capture string) string {
	t.Helper()
	lowers := append([]string{capture}, lowerDirs(t, viewImage(ctx, t, env, c, baseRef))...)
	dir := t.TempDir()
	if err := unix.Mount("overlay", dir, "overlay", unix.MS_RDONLY, "lowerdir="+strings.Join(lowers, ":")); err != nil {
		t.Fatalf("mount the expected tree: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	return dir
}

// checkPublished pulls a commit's image into the fresh namespace and
// asserts that its root filesystem is exactly the base image with the
// capture on top, and a state the writer passed through.
func checkPublished(ctx context.Context, t *testing.T, env *harness.Env, c *containerd.Client, baseRef string, rec api.Commit) int {
	t.Helper()
	ref := rec.Target
	if !rec.Local {
		ref = strings.TrimPrefix(rec.Target, "docker.io/library/")
	}
	got := mountImage(ctx, t, env, c, ref)
	want := mountExpected(ctx, t, env, c, baseRef, filepath.Join(env.Daemon.Root(), "captures", rec.ID, "fs"))
	testutil.CompareTrees(t, want, got)
	return testutil.CheckWriterState(t, got, workload.Merged)
}

// startWriterFrom runs the point-in-time writer in a container from a
// writer image built with opts and pushed as repo; it returns the
// container's ID and the image's reference.
func startWriterFrom(ctx context.Context, t *testing.T, env *harness.Env, repo string, opts ...testimage.Option) (string, string) {
	t.Helper()
	bin, err := os.ReadFile(testutil.BuildStatic(t, testutil.WriterPackage))
	if err != nil {
		t.Fatal(err)
	}
	img, err := testimage.Build(append(opts, testimage.WithWriter(bin))...)
	if err != nil {
		t.Fatal(err)
	}
	ref := env.Registry.Ref(repo)
	if _, err := testimage.Push(ctx, img, ref); err != nil {
		t.Fatal(err)
	}
	if err := env.PullImage(ctx, ref, seamless); err != nil {
		t.Fatal(err)
	}
	id := harness.UniqueID("convert-")
	if err := env.RunDetached(ctx, id, ref, seamless, testimage.WriterPath, "-dir", workload.Dir); err != nil {
		t.Fatal(err)
	}
	waitForFile(ctx, t, env, id, writerLog)
	return id, ref
}

// daemonConfig writes a daemon configuration file for a test.
func daemonConfig(t testing.TB, toml string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(p, []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestIncrementalCommits commits one container four times under write
// load, with a chain limit of three layers: commits 2 and 3 each add a
// layer of only their changes (so they upload little), commit 4 squashes
// the chain. Every image, pulled fresh, is exactly its capture instant.
// Layers alternate gzip and zstd; the base is a Docker v2 image, so the
// zstd commits' manifests become OCI. No layer is kept in containerd's
// content store: commit 3 goes to another repository, and the registry
// mounts the earlier layers there from the first one. The layers are
// built in the daemon (background_build = false), the path every other
// integration test leaves aside.
func TestIncrementalCommits(t *testing.T) {
	harness.Require(t)
	ctx := testContext(t)
	env := harness.Start(t, harness.Options{Daemon: harness.DaemonOptions{
		ConfigFile: daemonConfig(t, "[convert]\nmax_layers = 3\nbackground_build = false\n"),
	}})
	c := client(ctx, t, env)
	id, baseRef := startWriterFrom(ctx, t, env, "seamless-test/docker-base:1", testimage.WithMediaType(false))
	// Incompressible data that commit 1 uploads and later commits must not.
	const big = 32 << 20
	if _, err := env.Exec(ctx, id, "sh", "-c", fmt.Sprintf("head -c %d /dev/urandom > /big", big)); err != nil {
		t.Fatal(err)
	}
	for i, tc := range []struct {
		repo        string
		compression string
		layers      int
		squashed    bool
		manifest    string
	}{
		{"seamless-test/incremental", "gzip", 1, true, images.MediaTypeDockerSchema2Manifest},
		{"seamless-test/incremental", "zstd", 2, false, ocispec.MediaTypeImageManifest},
		{"seamless-test/incremental-moved", "gzip", 3, false, images.MediaTypeDockerSchema2Manifest},
		{"seamless-test/incremental", "zstd", 1, true, ocispec.MediaTypeImageManifest},
	} {
		n := i + 1
		target := fmt.Sprintf("%s:%d", env.Registry.Ref(tc.repo), n)
		rec := commitAndWait(ctx, t, env, id, api.CommitRequest{Target: target, Compression: tc.compression})
		last := rec.Layers[len(rec.Layers)-1]
		t.Logf("commit %d (%s): pause %.2f ms, %d layers, new layer %d bytes, uploaded %d bytes", n, tc.compression, rec.PauseMillis, len(rec.Layers), last.Size, rec.UploadedBytes)
		if len(rec.Layers) != tc.layers || last.Squashed != tc.squashed || last.Commit != rec.ID {
			t.Fatalf("commit %d: layers %+v", n, rec.Layers)
		}
		if tc.squashed != (rec.UploadedBytes > big) {
			t.Fatalf("commit %d uploaded %d bytes: a squashed layer carries the %d random bytes, an incremental one must not", n, rec.UploadedBytes, big)
		}
		for _, l := range rec.Layers {
			if l.Source == "" {
				t.Fatalf("commit %d: layer %s has no registry source: %+v", n, l.Digest, rec.Layers)
			}
			checkNotStored(ctx, t, c, l)
		}
		step := checkPublished(ctx, t, env, c, baseRef, rec)
		checkManifestType(ctx, t, c, rec, tc.manifest)
		if captured := checkCapture(t, env, rec.ID); step != captured {
			t.Fatalf("commit %d: the image holds step %d, the capture step %d", n, step, captured)
		}
	}
	assertWriterRuns(ctx, t, env, c, id)
}

// checkNotStored asserts that a layer streamed to a registry has no copy
// in containerd's content store.
func checkNotStored(ctx context.Context, t *testing.T, c *containerd.Client, l snapshotter.Layer) {
	t.Helper()
	ctx = namespaces.WithNamespace(ctx, harness.DefaultNamespace)
	if _, err := c.ContentStore().Info(ctx, l.Digest); !errdefs.IsNotFound(err) {
		t.Fatalf("layer %s of commit %s is in containerd's content store (%v): a pushed layer is kept in the registry only", l.Digest, l.Commit, err)
	}
}

// checkManifestType asserts the media type of a published manifest, as
// pulled into the fresh namespace (by checkPublished).
func checkManifestType(ctx context.Context, t *testing.T, c *containerd.Client, rec api.Commit, want string) {
	t.Helper()
	ctx = namespaces.WithNamespace(ctx, freshNamespace)
	data, err := content.ReadBlob(ctx, c.ContentStore(), ocispec.Descriptor{Digest: rec.ImageDigest})
	if err != nil {
		t.Fatalf("manifest of commit %s: %v", rec.ID, err)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatal(err)
	}
	if m.MediaType != want {
		t.Fatalf("commit %s: manifest %s, want %s", rec.ID, m.MediaType, want)
	}
}

// TestCommitPublishesImage is the whole story: commit a container while it
// writes, wait for the image, pull it into a fresh namespace with the
// built-in overlayfs snapshotter, find exactly the captured instant, and
// run it.
func TestCommitPublishesImage(t *testing.T) {
	ctx, env, _ := setup(t)
	c := client(ctx, t, env)
	id := startWriterContainer(ctx, t, env)
	baseRef := env.Registry.Ref("seamless-test/busybox-writer:latest")
	// Content a layer must carry beyond the writer's files: xattrs, a
	// hard link, a symlink, a fifo, an opaque dir, a deleted base file.
	if _, err := env.Exec(ctx, id, "sh", "-c", `set -e
		mkdir -p /extra/dir && echo data > /extra/file && ln /extra/file /extra/hardlink
		ln -s ../etc/passwd /extra/symlink && mkfifo /extra/fifo && chmod 0751 /extra/dir
		chown 1000:1000 /extra/file && rm -rf /etc && mkdir /etc && echo new > /etc/hostname`); err != nil {
		t.Fatal(err)
	}
	target := env.Registry.Ref("seamless-test/committed:1")
	rec := commitAndWait(ctx, t, env, id, api.CommitRequest{Target: target})
	t.Logf("commit %s: pause %.2f ms, layers %d, image %s, pushed %d bytes", rec.ID, rec.PauseMillis, len(rec.Layers), rec.ImageDigest, rec.Progress.Total)
	if len(rec.Layers) != 1 || !rec.Layers[0].Squashed || rec.Base == nil || rec.Base.Name != baseRef {
		t.Fatalf("layers %+v base %+v", rec.Layers, rec.Base)
	}
	step := checkPublished(ctx, t, env, c, baseRef, rec)
	captured := checkCapture(t, env, rec.ID)
	if step != captured {
		t.Fatalf("the image holds step %d, the capture step %d", step, captured)
	}
	// The layer went to the registry only: containerd's content store
	// does not hold a second copy.
	if l := rec.Layers[0]; l.Source != target {
		t.Fatalf("layer source %q, want %q", l.Source, target)
	}
	checkNotStored(ctx, t, c, rec.Layers[0])

	// The image runs, elsewhere, and holds the data.
	fresh := namespaces.WithNamespace(ctx, freshNamespace)
	out, err := env.Run(fresh, harness.UniqueID("run-committed-"), target, "overlayfs", "sh", "-c", "cat /extra/file /etc/hostname; tail -n 1 "+writerLog)
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("data\nnew\n%d\n", step); out != want {
		t.Fatalf("the committed image's container printed %q, want %q", out, want)
	}
	assertWriterRuns(ctx, t, env, c, id)
}
