//go:build linux

package integration

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
	"github.com/seamless-snapshotter/seamless-snapshotter/convert"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/harness"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil/workload"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// lenientPause is the pause budget of these tests' commits: they are
// about conversion, and on a loaded machine a capture's final round can
// outlast the default budget.
const lenientPause = "5s"

// startCommit asks for a commit of container id and returns its record
// as created, without waiting for the job: for commits meant to fail.
func startCommit(ctx context.Context, t *testing.T, env *harness.Env, id string, req api.CommitRequest) api.Commit {
	t.Helper()
	req.Namespace, req.Container = harness.DefaultNamespace, id
	var rec api.Commit
	if status, apiErr := newAPIClient(env).do(ctx, t, "POST", "/api/v1/commits", req, &rec); status != 201 {
		t.Fatalf("commit: %d %+v", status, apiErr)
	}
	return rec
}

// requireFailedWith fails the test unless the commit failed with code after
// the given number of tries.
func requireFailedWith(t *testing.T, rec api.Commit, code string, attempts int) {
	t.Helper()
	if rec.State != snapshotter.StateFailed || rec.ErrorCode != code || rec.Attempts != attempts {
		t.Fatalf("commit %s is %s after %d tries (%s: %s), want failed with %s after %d", rec.ID, rec.State, rec.Attempts, rec.ErrorCode, rec.Error, code, attempts)
	}
}

// accessEntry is one request in a registry's access log.
type accessEntry struct {
	method string
	uri    string
	status int
}

// accessLine matches the registry's access log (Apache combined format).
var accessLine = regexp.MustCompile(`"([A-Z]+) (\S+) HTTP/[0-9.]+" ([0-9]{3}) `)

// logEnd marks where a log ends, so that accessLog reads only
// what came after.
func logEnd(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// accessLog returns the requests a registry logged after offset.
func accessLog(t *testing.T, r *harness.Registry, offset int64) []accessEntry {
	t.Helper()
	f, err := os.Open(r.LogPath())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Seek(offset, 0); err != nil {
		t.Fatal(err)
	}
	var reqs []accessEntry
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		m := accessLine.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		status, _ := strconv.Atoi(m[3])
		reqs = append(reqs, accessEntry{method: m[1], uri: m[2], status: status})
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if len(reqs) == 0 {
		t.Fatalf("no request in the log of registry %s after byte %d: has its access log format changed?", r.Addr(), offset)
	}
	return reqs
}

// refRepo returns a reference's repository path ("seamless-test/base").
func refRepo(t *testing.T, ref string) string {
	t.Helper()
	_, rest, _ := strings.Cut(ref, "/")
	repo, _, _ := strings.Cut(rest, ":")
	if repo == "" {
		t.Fatalf("no repository in %q", ref)
	}
	return repo
}

// blobMounted reports whether the registry mounted blob dgst into repo from
// another repository (POST .../blobs/uploads/?mount=…&from=… answered
// 201 Created), and blobUploaded reports whether dgst was uploaded into repo
// (the PUT that completes an upload).
func blobMounted(reqs []accessEntry, repo, dgst string) (from string, ok bool) {
	for _, r := range reqs {
		u, err := url.Parse(r.uri)
		if err != nil || r.method != http.MethodPost || u.Path != "/v2/"+repo+"/blobs/uploads/" {
			continue
		}
		if q := u.Query(); q.Get("mount") == dgst && r.status == http.StatusCreated {
			return q.Get("from"), true
		}
	}
	return "", false
}

func blobUploaded(reqs []accessEntry, repo, dgst string) bool {
	for _, r := range reqs {
		u, err := url.Parse(r.uri)
		if err != nil || r.method != http.MethodPut || !strings.HasPrefix(u.Path, "/v2/"+repo+"/blobs/uploads/") {
			continue
		}
		if u.Query().Get("digest") == dgst && r.status == http.StatusCreated {
			return true
		}
	}
	return false
}

// blobFetched reports whether blob dgst was read from repo (GET 200).
func blobFetched(reqs []accessEntry, repo, dgst string) bool {
	for _, r := range reqs {
		if r.method == http.MethodGet && r.uri == "/v2/"+repo+"/blobs/"+dgst && r.status == http.StatusOK {
			return true
		}
	}
	return false
}

// discardLayers deletes the layer blobs of an image's manifest for this
// platform from containerd's content store, as CRI's
// discard_unpacked_layers does once the image is unpacked: the manifest,
// the config and the unpacked snapshots stay. It returns the layers.
func discardLayers(ctx context.Context, t *testing.T, c *containerd.Client, ref string) []ocispec.Descriptor {
	t.Helper()
	img, err := c.ImageService().Get(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	cs := c.ContentStore()
	m, err := images.Manifest(ctx, cs, img.Target, platforms.Default())
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range m.Layers {
		if err := cs.Delete(ctx, l.Digest); err != nil {
			t.Fatalf("delete layer %s of %s: %v", l.Digest, ref, err)
		}
	}
	requireDiscarded(ctx, t, c, m.Layers)
	return m.Layers
}

// requireDiscarded fails the test if containerd's content store (in the
// context's namespace) has any of the layers.
func requireDiscarded(ctx context.Context, t *testing.T, c *containerd.Client, layers []ocispec.Descriptor) {
	t.Helper()
	for _, l := range layers {
		if _, err := c.ContentStore().Info(ctx, l.Digest); !errdefs.IsNotFound(err) {
			t.Fatalf("layer %s is still in the content store (info error %v)", l.Digest, err)
		}
	}
}

// TestConvertBaseLayersDiscarded commits a container whose base image's
// layers are gone from containerd's content store, as CRI's
// discard_unpacked_layers leaves them: only the base's manifest, config
// and snapshots are local. On the base's registry, the push mounts the
// base layers from the base's repository; on another registry it streams
// them from the base's registry; with the base's registry down as well,
// the job fails naming the layer and the image.
func TestConvertBaseLayersDiscarded(t *testing.T) {
	harness.Require(t)
	ctx := testContext(t)
	// Two tries, soon after each other: (c) is meant to fail.
	env := harness.Start(t, harness.Options{Daemon: harness.DaemonOptions{
		ConfigFile: daemonConfig(t, "[convert]\nmax_attempts = 2\nretry_initial = \"100ms\"\n"),
	}})
	c := client(ctx, t, env)
	id, baseRef := startWriterFrom(ctx, t, env, "seamless-test/discarded-base:1")
	baseRepo := refRepo(t, baseRef)
	layers := discardLayers(ctx, t, c, baseRef)
	t.Logf("base %s: %d layers discarded from the content store", baseRef, len(layers))

	t.Run("same registry mounts", func(t *testing.T) {
		target := env.Registry.Ref("seamless-test/mounted:1")
		mark := logEnd(t, env.Registry.LogPath())
		begin := time.Now()
		rec := commitAndWait(ctx, t, env, id, api.CommitRequest{Target: target, PauseBudget: lenientPause})
		t.Logf("commit %s: done in %v, uploaded %d bytes", rec.ID, time.Since(begin).Round(time.Millisecond), rec.UploadedBytes)
		reqs := accessLog(t, env.Registry, mark)
		for _, l := range layers {
			from, ok := blobMounted(reqs, "seamless-test/mounted", l.Digest.String())
			if !ok || from != baseRepo {
				t.Errorf("base layer %s was not mounted from %s (mounted: %v, from %q)", l.Digest, baseRepo, ok, from)
			}
			if blobUploaded(reqs, "seamless-test/mounted", l.Digest.String()) {
				t.Errorf("base layer %s was uploaded, want mounted", l.Digest)
			}
		}
		// A mount moves no data through this node: the content store
		// still lacks the layers.
		requireDiscarded(ctx, t, c, layers)
		checkPublishedStep(ctx, t, env, c, baseRef, rec)
	})

	reg2 := harness.NewRegistry(t)
	if err := reg2.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := env.Containerd.AddRegistryHost(reg2.Addr()); err != nil {
		t.Fatal(err)
	}

	t.Run("other registry streams", func(t *testing.T) {
		target := reg2.Ref("seamless-test/streamed:1")
		mark1, mark2 := logEnd(t, env.Registry.LogPath()), logEnd(t, reg2.LogPath())
		begin := time.Now()
		rec := commitAndWait(ctx, t, env, id, api.CommitRequest{Target: target, PauseBudget: lenientPause})
		t.Logf("commit %s: done in %v, uploaded %d bytes", rec.ID, time.Since(begin).Round(time.Millisecond), rec.UploadedBytes)
		reqs1, reqs2 := accessLog(t, env.Registry, mark1), accessLog(t, reg2, mark2)
		var baseBytes int64
		for _, l := range layers {
			if !blobFetched(reqs1, baseRepo, l.Digest.String()) {
				t.Errorf("base layer %s was not read from %s", l.Digest, baseRef)
			}
			if !blobUploaded(reqs2, "seamless-test/streamed", l.Digest.String()) {
				t.Errorf("base layer %s was not uploaded to %s", l.Digest, reg2.Addr())
			}
			baseBytes += l.Size
		}
		if rec.UploadedBytes <= baseBytes {
			t.Errorf("uploaded %d bytes, less than the base layers' %d", rec.UploadedBytes, baseBytes)
		}
		// Streamed through, not stored.
		requireDiscarded(ctx, t, c, layers)
		checkPublishedStep(ctx, t, env, c, baseRef, rec)
	})

	t.Run("base registry down", func(t *testing.T) {
		if err := env.Registry.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		// A repository the base layers were never pushed to: the target
		// registry cannot already have them there.
		rec := startCommit(ctx, t, env, id, api.CommitRequest{Target: reg2.Ref("seamless-test/orphan:1"), PauseBudget: lenientPause})
		rec = waitCommit(ctx, t, newAPIClient(env), rec.ID, 2*time.Minute)
		t.Logf("commit %s: %s after %d tries in %v: %s: %s", rec.ID, rec.State, rec.Attempts, rec.FinishedAt.Sub(rec.CreatedAt).Round(time.Millisecond), rec.ErrorCode, rec.Error)
		requireFailedWith(t, rec, convert.CodeRegistryUnreachable, 2)
		// Either layer may be the one whose failure ends the push.
		named := false
		for _, l := range layers {
			want := fmt.Sprintf("push to %s: base layer %s is not in the content store, and fetching it from %s failed: ", rec.Target, l.Digest, baseRef)
			named = named || strings.HasPrefix(rec.Error, want)
		}
		if !named || !strings.Contains(rec.Error, "connection refused") {
			t.Fatalf("the error does not name a base layer, the base image %s and the refusal: %q", baseRef, rec.Error)
		}
		if resp := registryStatusAs(ctx, t, reg2, "/v2/seamless-test/orphan/manifests/1", "", ""); resp != http.StatusNotFound {
			t.Fatalf("the failed commit's tag answers %d, want 404", resp)
		}
	})
}

// checkPublishedStep is checkPublished, also asserting that the image
// holds the instant the capture holds.
func checkPublishedStep(ctx context.Context, t *testing.T, env *harness.Env, c *containerd.Client, baseRef string, rec api.Commit) {
	t.Helper()
	step := checkPublished(ctx, t, env, c, baseRef, rec)
	if captured := checkCapture(t, env, rec.ID); step != captured {
		t.Fatalf("the image holds step %d, the capture step %d", step, captured)
	}
}

// registryStatusAs sends GET path to a registry, with basic auth if user is
// set, and returns the status.
func registryStatusAs(ctx context.Context, t *testing.T, r *harness.Registry, path, user, password string) int {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+r.Addr()+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", strings.Join([]string{ocispec.MediaTypeImageManifest, images.MediaTypeDockerSchema2Manifest}, ", "))
	if user != "" {
		req.SetBasicAuth(user, password)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// writeDockerConfig writes a docker config.json in dir with credentials
// for host, as `docker login` does.
func writeDockerConfig(t *testing.T, dir, host, user, password string) {
	t.Helper()
	cfg := map[string]any{"auths": map[string]any{
		host: map[string]string{"auth": base64.StdEncoding.EncodeToString([]byte(user + ":" + password))},
	}}
	data, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestConvertAuthWrongCredentials pushes to a registry with htpasswd
// authentication. The base image comes from an open registry, so that
// containerd pulls it without credentials; the daemon's credentials come
// from the docker config file, which it reads at each push. With a wrong
// password the commit fails at once, with a clear message, and publishes
// nothing; with the right one it is published. The credentials never
// reach the daemon's log.
func TestConvertAuthWrongCredentials(t *testing.T) {
	harness.Require(t)
	ctx := testContext(t)
	dockerConfig := t.TempDir()
	env := harness.Start(t, harness.Options{Daemon: harness.DaemonOptions{
		Env: []string{"DOCKER_CONFIG=" + dockerConfig},
	}})
	const user, password, wrong = "seamless", "correct-horse-battery", "wrong-password"
	private := harness.NewRegistryWithOptions(t, harness.RegistryOptions{Users: map[string]string{user: password}})
	if err := private.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := env.Containerd.AddRegistryHost(private.Addr()); err != nil {
		t.Fatal(err)
	}
	if st := registryStatusAs(ctx, t, private, "/v2/", "", ""); st != http.StatusUnauthorized {
		t.Fatalf("the private registry answers %d without credentials, want 401", st)
	}
	c := client(ctx, t, env)
	id, baseRef := startWriterFrom(ctx, t, env, "seamless-test/auth-base:1")
	target := private.Ref("seamless-test/private:1")
	manifestPath := "/v2/seamless-test/private/manifests/1"

	t.Run("wrong password", func(t *testing.T) {
		writeDockerConfig(t, dockerConfig, private.Addr(), user, wrong)
		rec := startCommit(ctx, t, env, id, api.CommitRequest{Target: target, PauseBudget: lenientPause})
		rec = waitCommit(ctx, t, newAPIClient(env), rec.ID, time.Minute)
		took := rec.FinishedAt.Sub(rec.CreatedAt)
		t.Logf("commit %s: %s after %d tries in %v: %s: %s", rec.ID, rec.State, rec.Attempts, took.Round(time.Millisecond), rec.ErrorCode, rec.Error)
		// Retrying cannot fix a password: one try, no backoff.
		requireFailedWith(t, rec, convert.CodeRegistryAuth, 1)
		if took > 30*time.Second {
			t.Errorf("the job took %v to fail", took)
		}
		// Who refused, whose credentials from which file: what to fix.
		want := fmt.Sprintf("%s refused the credentials of user %q in %s: push to %s: ", private.Addr(), user, filepath.Join(dockerConfig, "config.json"), target)
		if !strings.HasPrefix(rec.Error, want) || !strings.Contains(rec.Error, "401 Unauthorized") {
			t.Errorf("error %q, want it to start with %q and end with the registry's answer", rec.Error, want)
		}
		if st := registryStatusAs(ctx, t, private, manifestPath, user, password); st != http.StatusNotFound {
			t.Fatalf("%s answers %d after a failed push, want 404", target, st)
		}
	})

	t.Run("right password", func(t *testing.T) {
		writeDockerConfig(t, dockerConfig, private.Addr(), user, password)
		begin := time.Now()
		rec := commitAndWait(ctx, t, env, id, api.CommitRequest{Target: target, PauseBudget: lenientPause})
		t.Logf("commit %s: done in %v", rec.ID, time.Since(begin).Round(time.Millisecond))
		if st := registryStatusAs(ctx, t, private, manifestPath, user, password); st != http.StatusOK {
			t.Fatalf("%s answers %d, want 200", target, st)
		}
		// containerd needs the credentials too; checkPublished's pull has
		// none.
		fresh := namespaces.WithNamespace(ctx, freshNamespace)
		if _, err := env.Ctr(fresh, "images", "pull", "--plain-http", "--hosts-dir", env.Containerd.HostsDir(),
			"--user", user+":"+password, "--snapshotter", "overlayfs", target); err != nil {
			t.Fatal(err)
		}
		got := mountUnpackedImage(ctx, t, c, freshNamespace, "overlayfs", target)
		want := mountExpected(ctx, t, env, c, baseRef, filepath.Join(env.Daemon.Root(), "captures", rec.ID, "fs"))
		testutil.CompareTrees(t, want, got)
		if step, captured := testutil.CheckWriterState(t, got, workload.Merged), checkCapture(t, env, rec.ID); step != captured {
			t.Fatalf("the image holds step %d, the capture step %d", step, captured)
		}
	})

	data, err := os.ReadFile(env.Daemon.LogPath())
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{
		password, wrong,
		base64.StdEncoding.EncodeToString([]byte(user + ":" + password)),
		base64.StdEncoding.EncodeToString([]byte(user + ":" + wrong)),
	} {
		if strings.Contains(string(data), secret) {
			t.Errorf("the daemon's log %s holds the credential %q", env.Daemon.LogPath(), secret)
		}
	}
}

// mountUnpackedImage mounts read-only the root filesystem of an image already
// unpacked into sn in namespace ns; the mount goes when the test ends.
func mountUnpackedImage(ctx context.Context, t *testing.T, c *containerd.Client, ns, sn, ref string) string {
	t.Helper()
	ctx = namespaces.WithNamespace(ctx, ns)
	img, err := c.GetImage(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		t.Fatal(err)
	}
	s := c.SnapshotService(sn)
	key := harness.UniqueID("view-")
	mounts, err := s.View(ctx, key, identity.ChainID(diffIDs).String(), gcRoot())
	if err != nil {
		t.Fatalf("view of %s in %s: %v", ref, sn, err)
	}
	dir := t.TempDir()
	if err := mount.All(mounts, dir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := mount.UnmountAll(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
		if err := s.Remove(context.WithoutCancel(ctx), key); err != nil {
			t.Errorf("remove view %s: %v", key, err)
		}
	})
	return dir
}

// TestConvertLocal commits a container into containerd's image store
// instead of a registry: the image is there, under the target name, in the
// container's namespace, unpacked into our snapshotter, exactly the base
// with the capture on top, and it runs at once; no registry hears of it.
func TestConvertLocal(t *testing.T) {
	harness.Require(t)
	ctx := testContext(t)
	env := harness.Start(t, harness.Options{})
	c := client(ctx, t, env)
	id, baseRef := startWriterFrom(ctx, t, env, "seamless-test/local-base:1")
	if _, err := env.Exec(ctx, id, "sh", "-c", "echo local > /marker"); err != nil {
		t.Fatal(err)
	}
	const target = "seamless.local/committed:1"
	mark := logEnd(t, env.Registry.LogPath())
	begin := time.Now()
	rec := commitAndWait(ctx, t, env, id, api.CommitRequest{Target: target, Local: true, PauseBudget: lenientPause})
	t.Logf("commit %s: done in %v, image %s", rec.ID, time.Since(begin).Round(time.Millisecond), rec.ImageDigest)
	if !rec.Local || rec.UploadedBytes != 0 {
		t.Errorf("local %v, uploaded %d bytes", rec.Local, rec.UploadedBytes)
	}

	img, err := c.ImageService().Get(ctx, target)
	if err != nil {
		t.Fatalf("the image store has no %s: %v", target, err)
	}
	if img.Target.Digest != rec.ImageDigest {
		t.Fatalf("%s is %s, the commit's image %s", target, img.Target.Digest, rec.ImageDigest)
	}
	unpacked, err := containerd.NewImage(c, img).IsUnpacked(ctx, seamless)
	if err != nil || !unpacked {
		t.Fatalf("%s unpacked into %s: %v (%v)", target, seamless, unpacked, err)
	}
	got := mountUnpackedImage(ctx, t, c, harness.DefaultNamespace, seamless, target)
	want := mountExpected(ctx, t, env, c, baseRef, filepath.Join(env.Daemon.Root(), "captures", rec.ID, "fs"))
	testutil.CompareTrees(t, want, got)
	step := testutil.CheckWriterState(t, got, workload.Merged)
	if captured := checkCapture(t, env, rec.ID); step != captured {
		t.Fatalf("the image holds step %d, the capture step %d", step, captured)
	}

	out, err := env.Run(ctx, harness.UniqueID("run-local-"), target, seamless, "sh", "-c", "cat /marker; tail -n 1 "+writerLog)
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("local\n%d\n", step); out != want {
		t.Fatalf("the committed image's container printed %q, want %q", out, want)
	}

	for _, r := range accessLog(t, env.Registry, mark) {
		if strings.Contains(r.uri, "committed") {
			t.Errorf("the registry was asked %s %s", r.method, r.uri)
		}
	}
	// Nor any other host: the daemon logs (at debug) each request its
	// resolver makes, with the commit's ID.
	data, err := os.ReadFile(env.Daemon.LogPath())
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.Contains(line, "commit="+rec.ID) && strings.Contains(line, `msg="do request"`) {
			t.Errorf("the local commit made a registry request: %s", line)
		}
	}
}
