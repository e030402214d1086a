//go:build linux

package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	dockerhosts "github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/containerd/v2/pkg/rootfs"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/harness"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/testimage"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// waitJobsIdle waits until the daemon has no commit left to convert, so
// that a background push does not run into the next measurement.
func waitJobsIdle(ctx context.Context, tb testing.TB, hc *http.Client) {
	tb.Helper()
	err := harness.WaitFor(ctx, 50*time.Millisecond, func(ctx context.Context) (bool, error) {
		req, err := http.NewRequestWithContext(ctx, "GET", "http://seamless/api/v1/commits", nil)
		if err != nil {
			return false, err
		}
		resp, err := hc.Do(req)
		if err != nil {
			return false, err
		}
		defer resp.Body.Close()
		var list struct{ Commits []api.Commit }
		if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
			return false, err
		}
		for _, c := range list.Commits {
			if !c.State.Terminal() {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		tb.Fatalf("the daemon's jobs did not finish: %v", err)
	}
}

// publishBench is the state of one BenchmarkCommitToRegistry run.
type publishBench struct {
	ctx    context.Context
	env    *harness.Env
	client *containerd.Client
	api    apiClient
	ref    string
	id     string
	// first is the container's first commit (squash), made at set-up.
	first struct {
		publishResult
		e2e time.Duration
	}
}

// BenchmarkCommitToRegistry measures a commit from request to image in
// the registry, for a container whose upper holds about 1 GiB in 10,000
// files (half random, half compressible) while a writer keeps ~100 files
// dirty:
//
//   - seamless-full: a seamless commit with squash (the new layer holds
//     the whole upper, as the first commit of a container does), waited
//     for until pushed; its capture starts from the previous one
//     (first-e2e-ms and first-answer-ms: the container's first commit,
//     which cannot, one per run);
//   - seamless-full-gzip6: the same at gzip level 6 (compression_level),
//     the level containerd's differ uses, instead of our default 1;
//   - seamless-incremental: a seamless commit after a previous one: the
//     layer holds the changes since;
//   - nerdctl-style: what nerdctl commit + nerdctl push do: pause, the
//     layer through containerd's diff service (walking differ, Go's gzip
//     at its default level 6, one core) into
//     the content store, resume, config and manifest, push with
//     containerd's pusher.
//
// Metrics: e2e-ms/op (request to manifest pushed), answer-ms/op (median
// time until the commit itself returned: the capture, or nerdctl commit
// before its push), pause-ms/op (the
// container's freeze: the API's pause_ms, or Pause to Resume), upload-MB/op
// and layer-MB/op.
func BenchmarkCommitToRegistry(b *testing.B) {
	testutil.RequireRoot(b)
	harness.Require(b)
	pb := startPublishBench(b)
	for _, impl := range []struct {
		name string
		run  func(b *testing.B, i int) publishResult
	}{
		{"seamless-full", func(b *testing.B, i int) publishResult {
			return pb.seamless(b, i, api.CommitRequest{Squash: true})
		}},
		{"seamless-full-gzip6", func(b *testing.B, i int) publishResult {
			return pb.seamless(b, i, api.CommitRequest{Squash: true, CompressionLevel: 6})
		}},
		{"seamless-incremental", func(b *testing.B, i int) publishResult {
			return pb.seamless(b, i, api.CommitRequest{})
		}},
		{"nerdctl-style", pb.nerdctlStyle},
	} {
		b.Run("impl="+impl.name, func(b *testing.B) {
			var e2e, answered []float64
			var pauses, uploads, layers float64
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				waitJobsIdle(pb.ctx, b, pb.api.http)
				b.StartTimer()
				start := time.Now()
				r := impl.run(b, i)
				e2e = append(e2e, ms(time.Since(start)))
				answered = append(answered, ms(r.answered))
				pauses += ms(r.pause)
				uploads += float64(r.uploaded) / 1e6
				layers += float64(r.layer) / 1e6
			}
			b.StopTimer()
			n := float64(b.N)
			var sum float64
			for _, v := range e2e {
				sum += v
			}
			b.ReportMetric(sum/n, "e2e-ms/op")
			b.ReportMetric(pauses/n, "pause-ms/op")
			b.ReportMetric(median(answered), "answer-ms/op")
			b.ReportMetric(uploads/n, "upload-MB/op")
			b.ReportMetric(layers/n, "layer-MB/op")
			if impl.name == "seamless-full" {
				// The container's first commit, which has no previous
				// capture to start from: one per run.
				b.ReportMetric(ms(pb.first.e2e), "first-e2e-ms")
				b.ReportMetric(ms(pb.first.answered), "first-answer-ms")
			}
			slices.Sort(e2e)
			b.Logf("impl=%s N=%d e2e ms: median %.0f min %.0f max %.0f; commit answered (ms, median) %.0f; pause ms mean %.1f; upload MB mean %.1f",
				impl.name, b.N, median(e2e), e2e[0], e2e[len(e2e)-1], median(answered), pauses/n, uploads/n)
		})
	}
}

func startPublishBench(b *testing.B) *publishBench {
	ctx, cancel := context.WithTimeout(b.Context(), 60*time.Minute)
	b.Cleanup(cancel)
	// SEAMLESS_BENCH_FS=xfs|btrfs puts the daemon's root on a loop-mounted
	// filesystem of that type (strategy reflink or btrfs), as for
	// BenchmarkPause.
	var opts harness.Options
	if fstype := os.Getenv("SEAMLESS_BENCH_FS"); fstype != "" {
		opts.Daemon.Root = filepath.Join(testutil.LoopFS(b, fstype, 16<<30), "seamless")
	}
	opts.Daemon.ConfigFile = benchDaemonConfig(b)
	env := harness.Start(b, opts)
	pb := &publishBench{ctx: ctx, env: env, api: newAPIClient(env)}
	var err error
	if pb.client, err = env.Containerd.Client(ctx); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { pb.client.Close() })
	pb.ref = env.Registry.Ref("seamless-test/busybox:latest")
	img, err := testimage.Build()
	if err != nil {
		b.Fatal(err)
	}
	if _, err := testimage.Push(ctx, img, pb.ref); err != nil {
		b.Fatal(err)
	}
	if err := env.PullImage(ctx, pb.ref, seamless); err != nil {
		b.Fatal(err)
	}
	pb.id = harness.UniqueID("publish-")
	// 100 dirs of 100 files of 100 KiB: even files random, odd ones a
	// slice of busybox (compressible about 2:1); then ~100 files kept
	// dirty, as in BenchmarkPause.
	script := `set -e; for d in $(seq 0 99); do mkdir -p /data/d$d; for f in $(seq 0 99); do
		if [ $((f % 2)) = 0 ]; then head -c 102400 /dev/urandom > /data/d$d/f$f; else dd if=/bin/busybox of=/data/d$d/f$f bs=1024 count=100 skip=$f 2>/dev/null; fi
		done; done; touch /data/ready
		while :; do for i in $(seq 1 100); do echo $i > /dirty.$i; done; sleep 0.05; done`
	if err := env.RunDetached(ctx, pb.id, pb.ref, seamless, "sh", "-c", script); err != nil {
		b.Fatal(err)
	}
	if err := harness.WaitFor(ctx, time.Second, func(ctx context.Context) (bool, error) {
		_, err := env.Exec(ctx, pb.id, "test", "-e", "/data/ready")
		return err == nil, nil
	}); err != nil {
		b.Fatalf("the container did not fill its upper: %v", err)
	}
	// A first commit, so that incremental ones have a parent. It is the
	// only one that copies the whole upper: the next ones start from the
	// previous capture. Measured once per run, so logged, not reported.
	start := time.Now()
	pb.first.publishResult = pb.seamless(b, -1, api.CommitRequest{Squash: true})
	pb.first.e2e = time.Since(start)
	return pb
}

// publishResult is one commit of BenchmarkCommitToRegistry: the
// container's pause, the time until the commit answered (the capture, or
// nerdctl's commit before its push), and the bytes uploaded and of the new
// layer.
type publishResult struct {
	pause, answered time.Duration
	uploaded, layer int64
}

// seamless commits through the API, with opts's conversion options, and
// waits until the image is pushed.
func (pb *publishBench) seamless(b *testing.B, i int, opts api.CommitRequest) publishResult {
	start := time.Now()
	opts.Namespace, opts.Container = harness.DefaultNamespace, pb.id
	opts.Target = fmt.Sprintf("%s:seamless-%v-%d-%d", pb.env.Registry.Ref("bench/published"), opts.Squash, opts.CompressionLevel, i)
	body, _ := json.Marshal(opts)
	req, err := http.NewRequestWithContext(pb.ctx, "POST", "http://seamless/api/v1/commits", bytes.NewReader(body))
	if err != nil {
		b.Fatal(err)
	}
	resp, err := pb.api.http.Do(req)
	if err != nil {
		b.Fatal(err)
	}
	data, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	answered := time.Since(start)
	var rec api.Commit
	if resp.StatusCode != http.StatusCreated || json.Unmarshal(data, &rec) != nil {
		b.Fatalf("commit: %d %s", resp.StatusCode, data)
	}
	for !rec.State.Terminal() {
		time.Sleep(20 * time.Millisecond)
		req, _ := http.NewRequestWithContext(pb.ctx, "GET", "http://seamless/api/v1/commits/"+rec.ID, nil)
		resp, err := pb.api.http.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		err = json.NewDecoder(resp.Body).Decode(&rec)
		resp.Body.Close()
		if err != nil {
			b.Fatal(err)
		}
	}
	if rec.State != snapshotter.StateDone {
		b.Fatalf("commit %s failed: %s: %s", rec.ID, rec.ErrorCode, rec.Error)
	}
	return publishResult{pause: rec.Pause, answered: answered, uploaded: rec.UploadedBytes, layer: rec.Layers[len(rec.Layers)-1].Size}
}

// nerdctlStyle commits as nerdctl commit does, then pushes as nerdctl push
// (containerd's pusher) does.
func (pb *publishBench) nerdctlStyle(b *testing.B, i int) publishResult {
	ctx, done, err := pb.client.WithLease(pb.ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer done(context.WithoutCancel(ctx))
	ctr, err := pb.client.LoadContainer(ctx, pb.id)
	if err != nil {
		b.Fatal(err)
	}
	info, err := ctr.Info(ctx)
	if err != nil {
		b.Fatal(err)
	}
	task, err := ctr.Task(ctx, nil)
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	if err := task.Pause(ctx); err != nil {
		b.Fatal(err)
	}
	layer, diffErr := rootfs.CreateDiff(ctx, info.SnapshotKey, pb.client.SnapshotService(info.Snapshotter), pb.client.DiffService(),
		diff.WithMediaType(ocispec.MediaTypeImageLayerGzip))
	resumeErr := task.Resume(ctx)
	pause := time.Since(start)
	if diffErr != nil || resumeErr != nil {
		b.Fatal(diffErr, resumeErr)
	}

	cs := pb.client.ContentStore()
	base, err := pb.client.ImageService().Get(ctx, info.Image)
	if err != nil {
		b.Fatal(err)
	}
	manifest, err := images.Manifest(ctx, cs, base.Target, platforms.Default())
	if err != nil {
		b.Fatal(err)
	}
	cfgData, err := content.ReadBlob(ctx, cs, manifest.Config)
	if err != nil {
		b.Fatal(err)
	}
	var cfg ocispec.Image
	if err := json.Unmarshal(cfgData, &cfg); err != nil {
		b.Fatal(err)
	}
	diffID, err := digest.Parse(layer.Annotations["containerd.io/uncompressed"])
	if err != nil {
		// CreateDiff returns the diff ID in the content's labels.
		ci, err := cs.Info(ctx, layer.Digest)
		if err != nil {
			b.Fatal(err)
		}
		diffID = digest.Digest(ci.Labels["containerd.io/uncompressed"])
	}
	cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, diffID)
	now := time.Now().UTC()
	cfg.Created = &now
	newCfg, _ := json.Marshal(cfg)
	cfgDesc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(newCfg), Size: int64(len(newCfg))}
	m := ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest, Config: cfgDesc,
		Layers: append(slices.Clip(manifest.Layers), layer)}
	mData, _ := json.Marshal(m)
	mDesc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(mData), Size: int64(len(mData))}
	if err := content.WriteBlob(ctx, cs, "bench-config", bytes.NewReader(newCfg), cfgDesc); err != nil {
		b.Fatal(err)
	}
	labels := map[string]string{"containerd.io/gc.ref.content.config": cfgDesc.Digest.String()}
	for j, l := range m.Layers {
		labels[fmt.Sprintf("containerd.io/gc.ref.content.l.%d", j)] = l.Digest.String()
	}
	if err := content.WriteBlob(ctx, cs, "bench-manifest", bytes.NewReader(mData), mDesc, content.WithLabels(labels)); err != nil {
		b.Fatal(err)
	}
	answered := time.Since(start) // nerdctl commit ends here; push follows
	target := fmt.Sprintf("%s:nerdctl-%d", pb.env.Registry.Ref("bench/published"), i)
	resolver := docker.NewResolver(docker.ResolverOptions{Hosts: dockerhosts.ConfigureHosts(ctx, dockerhosts.HostOptions{
		HostDir: dockerhosts.HostDirFromRoot(pb.env.Containerd.HostsDir()),
	})})
	if err := pb.client.Push(ctx, target, mDesc, containerd.WithResolver(resolver)); err != nil {
		b.Fatal(err)
	}
	return publishResult{pause: pause, answered: answered, uploaded: layer.Size + cfgDesc.Size + mDesc.Size, layer: layer.Size}
}
