//go:build linux

package integration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
	"github.com/seamless-snapshotter/seamless-snapshotter/convert"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/harness"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/testimage"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil/workload"
	"github.com/seamless-snapshotter/seamless-snapshotter/overlay/capture"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

const (
	// faultsConfig retries fast, so that an outage of seconds costs
	// seconds, and often enough to outlast it; one worker, so that a
	// commit can be held in the queue behind a running one; layers built
	// in builder processes (the default, said here because these are
	// its faults too).
	faultsConfig = `[convert]
workers = 1
retry_initial = "200ms"
retry_max = "1s"
max_attempts = 30
background_build = true
`
	// bigLayer is the random (incompressible) data written into a
	// container whose push a test interrupts: at slowRate it takes
	// seconds to upload, so the test has time to act in the middle.
	bigLayer = 32 << 20
	// slowRate throttles uploads through the slowProxy while a test
	// waits for a push in progress; holdRate then keeps the push in
	// progress, however long the test takes to act, without stalling it
	// into a timeout.
	slowRate = 4 << 20
	holdRate = 64 << 10
	// midPush is what must have reached the registry through the proxy
	// before a push counts as under way: more than the base image's
	// blobs, so part of the new layer is on the wire.
	midPush = 8 << 20
)

// TestConvertFaults runs commits into faults of the background
// conversion, against real containerd, runc and registry, on one
// environment: the registry stopped in the middle of a push (with a
// commit queued behind it whose container is removed before its job
// ran), and the daemon killed while it builds a layer (its builder
// process must die with it) and in the middle of a push. Every job ends
// done and its image, pulled fresh, is exactly the capture.
func TestConvertFaults(t *testing.T) {
	harness.Require(t)
	ctx := testContext(t)
	env := harness.Start(t, harness.Options{Daemon: harness.DaemonOptions{ConfigFile: daemonConfig(t, faultsConfig)}})
	c := client(ctx, t, env)
	// Targets on the proxy's address reach the registry through it, so
	// that a push can be slowed down until the test caught it.
	proxy := newSlowProxy(t, env.Registry.Addr())
	if err := env.Containerd.AddRegistryHost(proxy.Addr()); err != nil {
		t.Fatal(err)
	}
	big, baseRef := startWriterFrom(ctx, t, env, "seamless-test/faults-base:1")

	// No comma in the name: it reaches t.TempDir, whose paths go into
	// overlay mount options.
	t.Run("registry stopped mid-push and queued container removed", func(t *testing.T) {
		apic := newAPIClient(env)
		writeRandom(ctx, t, env, big, bigLayer)
		proxy.SetRate(slowRate)
		defer proxy.SetRate(0)
		sent := proxy.Sent()
		pushed := postCommit(ctx, t, apic, big, proxy.Ref("seamless-test/faults-outage:1"))
		pollCommit(ctx, t, apic, pushed.ID, "pushing its layer", true, func(r api.Commit) bool {
			return r.State == snapshotter.StatePushing && proxy.Sent()-sent >= midPush
		})
		proxy.SetRate(holdRate)

		// The only worker is busy with the push: this commit waits in
		// the queue while its container goes away. Its job must find the
		// base image from the snapshot's parent chain alone.
		gone := runWriter(ctx, t, env, baseRef)
		queued := postCommit(ctx, t, apic, gone, env.Registry.Ref("seamless-test/faults-orphan:1"))
		// Once done, with its container gone, the capture is released:
		// keep a copy to compare the image with.
		saved := copyCapture(ctx, t, env, queued.ID)
		if err := env.DeleteContainer(ctx, gone); err != nil {
			t.Fatal(err)
		}
		if r := getCommit(ctx, t, apic, queued.ID); r.State != snapshotter.StatePending || r.Attempts != 0 {
			t.Fatalf("the queued commit ran before its container was removed: %s, %d attempts", r.State, r.Attempts)
		}

		if err := env.Registry.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		retrying := func(r api.Commit) bool {
			return !r.State.Terminal() && r.ErrorCode == convert.CodeRegistryUnreachable && r.Attempts >= 1 && !r.NextAttempt.IsZero()
		}
		for _, id := range []string{pushed.ID, queued.ID} {
			r := pollCommit(ctx, t, apic, id, "retrying", true, retrying)
			t.Logf("commit %s, registry down: %s, attempt %d, next in %v, %s: %s", id, r.State, r.Attempts, time.Until(r.NextAttempt).Round(time.Millisecond), r.ErrorCode, r.Error)
		}
		proxy.SetRate(0)
		if err := env.Registry.Start(ctx); err != nil {
			t.Fatal(err)
		}

		for _, tc := range []struct {
			rec     api.Commit
			capture string
		}{
			{pushed, captureDir(env, pushed.ID)},
			{queued, saved},
		} {
			rec := waitEnd(ctx, t, apic, tc.rec.ID)
			requireDone(t, rec)
			t.Logf("commit %s done after %d attempts", rec.ID, rec.Attempts)
			if rec.Attempts < 2 || rec.Error != "" || rec.ErrorCode != "" {
				t.Fatalf("commit %s: done after %d attempts with error %s %q, want a retry and the error cleared", rec.ID, rec.Attempts, rec.ErrorCode, rec.Error)
			}
			if rec.Base == nil || rec.Base.Name != baseRef {
				t.Fatalf("commit %s: base %+v, want %s", rec.ID, rec.Base, baseRef)
			}
			if tc.rec.ID == queued.ID {
				// Done and its container gone: nothing can need the
				// capture any more.
				waitCaptureReleased(ctx, t, env, apic, rec.ID)
			}
			checkPublishedFrom(ctx, t, env, c, baseRef, rec, tc.capture)
		}
		assertWriterRuns(ctx, t, env, c, big)
	})

	t.Run("daemon killed mid-conversion", func(t *testing.T) {
		apic := newAPIClient(env)
		id := runWriter(ctx, t, env, baseRef)
		writeRandom(ctx, t, env, id, bigLayer)
		proxy.SetRate(slowRate)
		defer proxy.SetRate(0)
		const repo, tag = "seamless-test/faults-killed-converting", "1"
		rec := postCommit(ctx, t, apic, id, proxy.Ref(repo+":"+tag))
		// The layer streams to the registry while it is built: held by
		// the proxy, the builder process is under way.
		var procs []testutil.ProcClass
		// Progress comes from the builder, which joins its class before
		// it reads anything.
		pollCommit(ctx, t, apic, rec.ID, "building its layer in a builder process", true, func(r api.Commit) bool {
			procs = testutil.Children(t, env.Daemon.Pid(), "seamless-layer-builder")
			return r.State == snapshotter.StateConverting && r.Progress.Done > 0 && len(procs) > 0
		})
		proxy.SetRate(holdRate)
		// The daemon's default class: nice 19 and, with cgroup v1, the
		// idle cgroup at the top of the cpu hierarchy.
		for _, p := range procs {
			if p.Nice != 19 || (p.Cgroup != "" && p.Cgroup != "/seamless-background") {
				t.Errorf("layer builder %d: nice %d, cpu cgroup %q; want 19, /seamless-background (cgroup v1) or none (v2)", p.Pid, p.Nice, p.Cgroup)
			}
		}
		if err := env.Daemon.Kill(); err != nil {
			t.Fatal(err)
		}
		// The kernel kills the builder with its parent.
		if err := harness.WaitFor(ctx, 20*time.Millisecond, func(context.Context) (bool, error) {
			for _, p := range procs {
				if err := unix.Kill(p.Pid, 0); err == nil {
					return false, nil
				}
			}
			return true, nil
		}); err != nil {
			t.Fatalf("layer builders %+v outlived the daemon: %v", procs, err)
		}
		t.Logf("daemon killed with commit %s converting; its layer builders %+v died with it", rec.ID, procs)

		proxy.SetRate(0)
		if err := env.Daemon.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if err := env.WaitForSnapshotter(ctx); err != nil {
			t.Fatal(err)
		}
		apic = newAPIClient(env)
		rec = waitEnd(ctx, t, apic, rec.ID)
		requireDone(t, rec)
		if rec.CaptureDiskBytes == 0 {
			t.Errorf("commit %s records no disk usage of its capture; the layer builder measures it", rec.ID)
		}
		checkPublished(ctx, t, env, c, baseRef, rec)
		checkRegistryImage(ctx, t, env.Registry, repo, tag, rec.ImageDigest)
		assertWriterRuns(ctx, t, env, c, id)
	})

	t.Run("daemon killed mid-push", func(t *testing.T) {
		apic := newAPIClient(env)
		id := runWriter(ctx, t, env, baseRef)
		writeRandom(ctx, t, env, id, bigLayer)
		proxy.SetRate(slowRate)
		defer proxy.SetRate(0)
		sent := proxy.Sent()
		const repo, tag = "seamless-test/faults-killed", "1"
		rec := postCommit(ctx, t, apic, id, proxy.Ref(repo+":"+tag))
		pollCommit(ctx, t, apic, rec.ID, "pushing its layer", true, func(r api.Commit) bool {
			return r.State == snapshotter.StatePushing && proxy.Sent()-sent >= midPush
		})
		// Held, the push has minutes left: it is still pushing when the
		// kill lands just after this read.
		proxy.SetRate(holdRate)
		if rec = getCommit(ctx, t, apic, rec.ID); rec.State != snapshotter.StatePushing {
			t.Fatalf("commit %s is %s at the kill, want pushing", rec.ID, rec.State)
		}
		if err := env.Daemon.Kill(); err != nil {
			t.Fatal(err)
		}
		t.Logf("daemon killed with commit %s pushing: %d of %d bytes read, %d through the proxy", rec.ID, rec.Progress.Done, rec.Progress.Total, proxy.Sent()-sent)
		// The manifest goes last: the registry names no partial image.
		if status := registryStatus(ctx, t, env.Registry, http.MethodGet, "/v2/"+repo+"/manifests/"+tag); status != http.StatusNotFound {
			t.Fatalf("after the kill mid-push GET manifest %s:%s answers %d, want 404", repo, tag, status)
		}

		proxy.SetRate(0)
		if err := env.Daemon.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if err := env.WaitForSnapshotter(ctx); err != nil {
			t.Fatal(err)
		}
		apic = newAPIClient(env) // the old one's connections died with the daemon
		rec = waitEnd(ctx, t, apic, rec.ID)
		requireDone(t, rec)
		t.Logf("commit %s done after the restart, %d attempts, %d bytes uploaded", rec.ID, rec.Attempts, rec.UploadedBytes)
		if rec.Attempts < 2 {
			t.Fatalf("commit %s: %d attempts, want the interrupted one and a resumed one", rec.ID, rec.Attempts)
		}
		checkPublished(ctx, t, env, c, baseRef, rec)
		checkRegistryImage(ctx, t, env.Registry, repo, tag, rec.ImageDigest)
		assertWriterRuns(ctx, t, env, c, id)
	})
}

// TestConvertFaultsDiskFull commits a container whose new layer does not
// fit in containerd's content store (its root on a small filesystem;
// keep_pushed_layers, since a pushed layer is otherwise not stored): the
// job fails, saying so, without retrying a layer that cannot fit, and
// leaves no partial blob; the capture is released; the container keeps
// running; and once the data is gone a commit succeeds.
func TestConvertFaultsDiskFull(t *testing.T) {
	harness.Require(t)
	ctx := testContext(t)
	// The base image's blobs fit (a few MiB); twice the filesystem's
	// size of random data cannot, whatever the compression.
	const fsSize = 64 << 20
	mnt := testutil.LoopFS(t, "ext4", fsSize)
	env := harness.Start(t, harness.Options{
		Daemon:     harness.DaemonOptions{ConfigFile: daemonConfig(t, faultsConfig+"keep_pushed_layers = true\n")},
		Containerd: harness.ContainerdOptions{Root: filepath.Join(mnt, "containerd")},
	})
	c := client(ctx, t, env)
	apic := newAPIClient(env)
	id, baseRef := startWriterFrom(ctx, t, env, "seamless-test/faults-diskfull-base:1")
	writeRandom(ctx, t, env, id, 2*fsSize)
	free := freeBytes(t, mnt)

	rec := postCommit(ctx, t, apic, id, env.Registry.Ref("seamless-test/faults-diskfull:1"))
	rec = waitEnd(ctx, t, apic, rec.ID)
	t.Logf("commit %s: %s after %d attempts, %s: %s", rec.ID, rec.State, rec.Attempts, rec.ErrorCode, rec.Error)
	if rec.State != snapshotter.StateFailed || rec.ErrorCode == "" || !strings.Contains(rec.Error, "no space left on device") {
		t.Fatalf("commit %s: %s (%s: %q), want failed naming \"no space left on device\"", rec.ID, rec.State, rec.ErrorCode, rec.Error)
	}
	// Retrying cannot make the layer fit, and each try would fill the
	// disk again for every other user of containerd.
	if rec.Attempts != 1 {
		t.Fatalf("commit %s failed after %d attempts, want 1: a full disk is not retried", rec.ID, rec.Attempts)
	}

	// Nothing partial is left in the content store: no ingest, and the
	// space is free again.
	statuses, err := c.ContentStore().ListStatuses(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(statuses) != 0 {
		t.Fatalf("ingests left in containerd's content store: %+v", statuses)
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := harness.WaitFor(wctx, 100*time.Millisecond, func(context.Context) (bool, error) {
		return freeBytes(t, mnt) >= free-(1<<20), nil
	}); err != nil {
		t.Fatalf("containerd's filesystem has %d bytes free, %d before the commit: the partial layer still takes space", freeBytes(t, mnt), free)
	}
	waitCaptureReleased(ctx, t, env, apic, rec.ID)
	assertWriterRuns(ctx, t, env, c, id)

	// containerd is healthy: without the data, the next commit fits.
	if _, err := env.Exec(ctx, id, "rm", "/big"); err != nil {
		t.Fatal(err)
	}
	rec = postCommit(ctx, t, apic, id, env.Registry.Ref("seamless-test/faults-diskfull:2"))
	rec = waitEnd(ctx, t, apic, rec.ID)
	requireDone(t, rec)
	checkPublished(ctx, t, env, c, baseRef, rec)
}

// runWriter runs one more point-in-time writer container from a writer
// image startWriterFrom pulled, and returns its ID.
func runWriter(ctx context.Context, t *testing.T, env *harness.Env, ref string) string {
	t.Helper()
	id := harness.UniqueID("convert-")
	if err := env.RunDetached(ctx, id, ref, seamless, testimage.WriterPath, "-dir", workload.Dir); err != nil {
		t.Fatal(err)
	}
	waitForFile(ctx, t, env, id, writerLog)
	return id
}

// writeRandom writes n bytes of incompressible data to /big in container
// id.
func writeRandom(ctx context.Context, t *testing.T, env *harness.Env, id string, n int) {
	t.Helper()
	if _, err := env.Exec(ctx, id, "sh", "-c", fmt.Sprintf("head -c %d /dev/urandom > /big", n)); err != nil {
		t.Fatal(err)
	}
}

// postCommit commits a container through the API without waiting.
func postCommit(ctx context.Context, t *testing.T, apic apiClient, id, target string) api.Commit {
	t.Helper()
	var rec api.Commit
	// The pause is not what these tests measure, and a loaded machine
	// can take more than the default budget to copy a fresh big file.
	req := api.CommitRequest{Namespace: harness.DefaultNamespace, Container: id, Target: target, PauseBudget: "30s"}
	if status, apiErr := apic.do(ctx, t, "POST", "/api/v1/commits", req, &rec); status != http.StatusCreated {
		t.Fatalf("commit %s: %d %+v", id, status, apiErr)
	}
	return rec
}

func getCommit(ctx context.Context, t *testing.T, apic apiClient, id string) api.Commit {
	t.Helper()
	var rec api.Commit
	if status, apiErr := apic.do(ctx, t, "GET", "/api/v1/commits/"+id, nil, &rec); status != http.StatusOK {
		t.Fatalf("get commit %s: %d %+v", id, status, apiErr)
	}
	return rec
}

// pollCommit polls a commit (every 20 ms, to catch short states) until
// cond holds, and fails the test after a minute, or at once if the job
// ended when running says cond needs it to run.
func pollCommit(ctx context.Context, t *testing.T, apic apiClient, id, what string, running bool, cond func(api.Commit) bool) api.Commit {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		rec := getCommit(ctx, t, apic, id)
		if cond(rec) {
			return rec
		}
		if (running && rec.State.Terminal()) || time.Now().After(deadline) {
			t.Fatalf("commit %s never %s: %s, attempt %d, progress %+v, %s: %q", id, what, rec.State, rec.Attempts, rec.Progress, rec.ErrorCode, rec.Error)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("commit %s never %s: %v", id, what, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// waitEnd waits until a commit's job ends, done or failed. (waitCommit
// decodes every poll into one record, so a field a later answer omits,
// such as the error a retry cleared, keeps its earlier value.)
func waitEnd(ctx context.Context, t *testing.T, apic apiClient, id string) api.Commit {
	t.Helper()
	return pollCommit(ctx, t, apic, id, "ended", false, func(r api.Commit) bool { return r.State.Terminal() })
}

// waitCaptureReleased waits until a commit's record says its capture is
// released and the directory is gone (the record says so first).
func waitCaptureReleased(ctx context.Context, t *testing.T, env *harness.Env, apic apiClient, id string) {
	t.Helper()
	pollCommit(ctx, t, apic, id, "released its capture", false, func(r api.Commit) bool {
		_, err := os.Stat(filepath.Dir(captureDir(env, id)))
		return r.CaptureRemoved && errors.Is(err, fs.ErrNotExist)
	})
}

func captureDir(env *harness.Env, commitID string) string {
	return filepath.Join(env.Daemon.Root(), "captures", commitID, "fs")
}

// copyCapture copies a commit's capture, exactly (whiteouts, overlay
// xattrs, hard links), with the copier that made it, for a test that
// compares the image after the daemon released the capture.
func copyCapture(ctx context.Context, t *testing.T, env *harness.Env, commitID string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "fs")
	cp, err := capture.NewCopier(captureDir(env, commitID), dst, capture.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cp.Final(ctx, nil); err != nil {
		t.Fatalf("copy capture of commit %s: %v", commitID, err)
	}
	return dst
}

// checkPublishedFrom is checkPublished with the capture taken from dir.
func checkPublishedFrom(ctx context.Context, t *testing.T, env *harness.Env, c *containerd.Client, baseRef string, rec api.Commit, dir string) int {
	t.Helper()
	got := mountImage(ctx, t, env, c, strings.TrimPrefix(rec.Target, "docker.io/library/"))
	want := mountExpected(ctx, t, env, c, baseRef, dir)
	testutil.CompareTrees(t, want, got)
	return testutil.CheckWriterState(t, got, workload.Merged)
}

func freeBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Bavail) * st.Bsize
}

// registryRequest sends a request straight to the registry (not through
// the proxy), accepting any manifest type.
func registryRequest(ctx context.Context, t *testing.T, r *harness.Registry, method, path string) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, method, "http://"+r.Addr()+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", strings.Join([]string{ocispec.MediaTypeImageManifest, images.MediaTypeDockerSchema2Manifest, ocispec.MediaTypeImageIndex, images.MediaTypeDockerSchema2ManifestList}, ", "))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func registryStatus(ctx context.Context, t *testing.T, r *harness.Registry, method, path string) int {
	t.Helper()
	resp := registryRequest(ctx, t, r, method, path)
	resp.Body.Close()
	return resp.StatusCode
}

// checkRegistryImage asserts that repo holds exactly one image, tagged
// tag, with digest want, and that every blob its manifest names is there
// whole: a push resumed after a crash published neither a duplicate nor
// a partial image.
func checkRegistryImage(ctx context.Context, t *testing.T, r *harness.Registry, repo, tag string, want digest.Digest) {
	t.Helper()
	resp := registryRequest(ctx, t, r, http.MethodGet, "/v2/"+repo+"/tags/list")
	var tags struct{ Tags []string }
	err := json.NewDecoder(resp.Body).Decode(&tags)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || !slices.Equal(tags.Tags, []string{tag}) {
		t.Fatalf("tags of %s: %d %v %v, want [%s]", repo, resp.StatusCode, tags.Tags, err, tag)
	}
	// Every manifest ever put into the repository has a revision link.
	revisions, err := os.ReadDir(filepath.Join(r.StorageDir(), "docker/registry/v2/repositories", repo, "_manifests/revisions", want.Algorithm().String()))
	if err != nil {
		t.Fatal(err)
	}
	if len(revisions) != 1 || revisions[0].Name() != want.Encoded() {
		t.Fatalf("manifests in %s: %v, want only %s", repo, revisions, want)
	}

	resp = registryRequest(ctx, t, r, http.MethodGet, "/v2/"+repo+"/manifests/"+tag)
	data, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || digest.FromBytes(data) != want {
		t.Fatalf("manifest %s:%s: %d %v, digest %s, want %s", repo, tag, resp.StatusCode, err, digest.FromBytes(data), want)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatal(err)
	}
	for _, d := range append([]ocispec.Descriptor{m.Config}, m.Layers...) {
		resp := registryRequest(ctx, t, r, http.MethodHead, "/v2/"+repo+"/blobs/"+d.Digest.String())
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || resp.ContentLength != d.Size {
			t.Fatalf("blob %s of %s:%s: %d, %d bytes, want 200, %d bytes", d.Digest, repo, tag, resp.StatusCode, resp.ContentLength, d.Size)
		}
	}
}

// slowProxy is a TCP proxy to a registry that can throttle what clients
// send (blob uploads), per connection, so that a test finds a push in
// progress and acts in its middle. Answers are not throttled. When the
// registry is down, a connection is reset at once: the closest an
// accepted connection gets to a refused one.
type slowProxy struct {
	ln       net.Listener
	upstream string
	rate     atomic.Int64 // bytes per second per connection; 0: unlimited
	sent     atomic.Int64 // bytes forwarded to the registry

	mu    sync.Mutex
	conns map[net.Conn]bool
	wg    sync.WaitGroup
}

func newSlowProxy(t *testing.T, upstream string) *slowProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &slowProxy{ln: ln, upstream: upstream, conns: map[net.Conn]bool{}}
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(p.close)
	return p
}

// Addr is the proxy's host:port.
func (p *slowProxy) Addr() string { return p.ln.Addr().String() }

// Ref returns a reference to repo in the registry, through the proxy.
func (p *slowProxy) Ref(repo string) string { return p.Addr() + "/" + repo }

// SetRate throttles uploads to bytesPerSecond per connection; 0 lifts
// the limit, at once for uploads in progress too.
func (p *slowProxy) SetRate(bytesPerSecond int64) { p.rate.Store(bytesPerSecond) }

// Sent is the number of bytes forwarded to the registry so far.
func (p *slowProxy) Sent() int64 { return p.sent.Load() }

func (p *slowProxy) serve() {
	defer p.wg.Done()
	for {
		conn, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.handle(conn)
		}()
	}
}

func (p *slowProxy) handle(client net.Conn) {
	up, err := net.Dial("tcp", p.upstream)
	if err != nil {
		if tc, ok := client.(*net.TCPConn); ok {
			tc.SetLinger(0) // close with a reset
		}
		client.Close()
		return
	}
	if !p.track(client, up) {
		return
	}
	defer p.untrack(client, up)
	done := make(chan struct{})
	go func() {
		io.Copy(client, up)
		// Either side ending ends both: HTTP needs no half-close.
		client.Close()
		up.Close()
		close(done)
	}()
	p.upload(up, client)
	client.Close()
	up.Close()
	<-done
}

// upload copies client to registry, sleeping after each read for as long
// as the rate allows it to take.
func (p *slowProxy) upload(dst io.Writer, src io.Reader) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if rate := p.rate.Load(); rate > 0 {
				time.Sleep(time.Duration(int64(n) * int64(time.Second) / rate))
			}
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
			p.sent.Add(int64(n))
		}
		if err != nil {
			return
		}
	}
}

func (p *slowProxy) track(conns ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conns == nil { // closed
		for _, c := range conns {
			c.Close()
		}
		return false
	}
	for _, c := range conns {
		p.conns[c] = true
	}
	return true
}

func (p *slowProxy) untrack(conns ...net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range conns {
		delete(p.conns, c)
	}
}

func (p *slowProxy) close() {
	p.ln.Close()
	p.mu.Lock()
	for c := range p.conns {
		c.Close()
	}
	p.conns = nil
	p.mu.Unlock()
	p.wg.Wait()
}
