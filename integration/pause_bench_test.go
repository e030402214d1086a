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
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/pkg/rootfs"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/harness"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/testimage"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
)

// pauseBench is the shared state of one BenchmarkPause run: one Env, one
// client, and one container per upper size, reused by every impl.
type pauseBench struct {
	ctx        context.Context
	env        *harness.Env
	client     *containerd.Client
	http       *http.Client
	ref        string
	target     string
	containers map[pauseUpper]*probeContainer
}

// pauseUpper is what a container's upper holds: files of fileSize bytes,
// or of 4-24 KiB when fileSize is 0.
type pauseUpper struct {
	files, fileSize int
}

func (u pauseUpper) String() string {
	if u.fileSize == 0 {
		return fmt.Sprintf("files=%d", u.files)
	}
	return fmt.Sprintf("files=%dx%dKiB", u.files, u.fileSize>>10)
}

// probeContainer runs the probe (integration/probe) as a child of its
// shell, beside a light writer that keeps ~100 files dirty.
type probeContainer struct {
	id  string
	pid int // host pid of the spinning probe
	seq int // last window number read
}

// pauseImpl is one way of stopping the container for a while; it returns
// how long it says the container was paused (host-side view), in ms.
type pauseImpl struct {
	name string
	run  func(pb *pauseBench, b *testing.B, c *probeContainer, i int) float64
}

var pauseImpls = []pauseImpl{
	// none: nothing stops the container; the probe's window is as long as
	// a commit takes. The noise floor of the measure.
	{"none", func(_ *pauseBench, _ *testing.B, _ *probeContainer, _ int) float64 {
		time.Sleep(200 * time.Millisecond)
		return 0
	}},
	{"seamless", func(pb *pauseBench, b *testing.B, c *probeContainer, i int) float64 {
		return pb.seamlessCommit(b, c, i)
	}},
	// task-pause: containerd's own Pause then Resume through the Go
	// client (shim → runc → freezer), nothing in between.
	{"task-pause", func(pb *pauseBench, b *testing.B, c *probeContainer, _ int) float64 {
		task := pb.task(b, c)
		start := time.Now()
		if err := task.Pause(pb.ctx); err != nil {
			b.Fatal(err)
		}
		if err := task.Resume(pb.ctx); err != nil {
			b.Fatal(err)
		}
		return ms(time.Since(start))
	}},
	// nerdctl-style: what nerdctl commit does while the container is
	// paused: Pause, the layer diff through containerd's diff service
	// (rootfs.CreateDiff: a View of the parent, the container's mounts,
	// Compare → gzip tar into the content store), Resume. nerdctl then
	// also writes config and manifest and (with --pause) stays paused for
	// that too; that part is not measured.
	{"nerdctl-style", func(pb *pauseBench, b *testing.B, c *probeContainer, _ int) float64 {
		task := pb.task(b, c)
		ctr, err := pb.client.LoadContainer(pb.ctx, c.id)
		if err != nil {
			b.Fatal(err)
		}
		info, err := ctr.Info(pb.ctx)
		if err != nil {
			b.Fatal(err)
		}
		lctx, done, err := pb.client.WithLease(pb.ctx)
		if err != nil {
			b.Fatal(err)
		}
		defer done(pb.ctx)
		start := time.Now()
		if err := task.Pause(pb.ctx); err != nil {
			b.Fatal(err)
		}
		_, diffErr := rootfs.CreateDiff(lctx, info.SnapshotKey, pb.client.SnapshotService(info.Snapshotter), pb.client.DiffService(),
			diff.WithMediaType(ocispec.MediaTypeImageLayerGzip))
		resumeErr := task.Resume(pb.ctx)
		took := time.Since(start)
		if diffErr != nil {
			b.Fatal(diffErr)
		}
		if resumeErr != nil {
			b.Fatal(resumeErr)
		}
		return ms(took)
	}},
}

// BenchmarkPause measures the stall a container sees during a commit from
// inside it: a probe spins on the monotonic clock and records its longest
// gap over a window that covers exactly one commit (or pause). Metrics:
// stall-ms/op (the probe's longest gap), stall2-ms/op (its second longest:
// one freeze or several hiccups?), lost-ms/op (the sum of its gaps over
// 1 ms: CPU the workload lost, also to a pre-copy running beside it), and
// pause-ms/op (what the pauser says:
// the API's pause_ms for seamless, Pause call to Resume return for the
// containerd arms). ns/op is the time of the commit (or pause) call alone.
// For seamless, a second window follows, until the commit's image is
// published: conv-stall-ms/op and conv-lost-ms/op are the probe's longest
// gap and lost time in it, conv-ms/op its length.
// Before each window the host's page cache is synced. Sub-benchmarks are
// files=N/impl=X for `benchstat -col /impl`.
//
// The uppers: 1,000 and 10,000 small files (4-24 KiB); with
// SEAMLESS_BENCH_LARGE=1 also 100,000 small files and 1,000 files of 1 MiB
// (1 GB), whose nerdctl-style commits take minutes each.
func BenchmarkPause(b *testing.B) {
	testutil.RequireRoot(b)
	harness.Require(b)
	pb := startPauseBench(b)
	uppers := []pauseUpper{{files: 1000}, {files: 10000}}
	if os.Getenv("SEAMLESS_BENCH_LARGE") == "1" {
		uppers = append(uppers, pauseUpper{files: 100000}, pauseUpper{files: 1000, fileSize: 1 << 20})
	}
	for _, upper := range uppers {
		for _, impl := range pauseImpls {
			b.Run(upper.String()+"/impl="+impl.name, func(b *testing.B) {
				c := pb.container(b, upper)
				stalls := make([]float64, 0, b.N)
				// Where each window's longest gap ended, in ms after the
				// commit (or pause) call returned: negative, during the
				// call (the freeze); positive, after it (work that
				// started with the commit, such as its conversion).
				ends := make([]float64, 0, b.N)
				var convMs, convStalls []float64
				var convLostSum float64
				var pauseSum, secondSum, lostSum float64
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					// The image of a seamless commit is built and pushed
					// in the background: let it finish first, so that it
					// does not share the CPUs with the next measure.
					waitJobsIdle(pb.ctx, b, pb.http)
					// Start every window with no dirty page cache left by
					// the previous iteration (or the fill) to write back.
					syscall.Sync()
					pb.probeWindow(b, c) // discard: starts a fresh window
					b.StartTimer()
					pauseSum += impl.run(pb, b, c, i)
					b.StopTimer()
					returned := monotonic(b)
					w := pb.probeWindow(b, c)
					stalls = append(stalls, w.longest)
					ends = append(ends, float64(w.end-returned)/1e6)
					if impl.name == "seamless" {
						// The conversion window: from there until the
						// commit's image is published, the layer is built
						// and pushed beside the container.
						start := time.Now()
						waitJobsIdle(pb.ctx, b, pb.http)
						cw := pb.probeWindow(b, c)
						convMs = append(convMs, ms(time.Since(start)))
						convStalls = append(convStalls, cw.longest)
						convLostSum += cw.lost
					}
					secondSum += w.second
					lostSum += w.lost
					b.StartTimer()
				}
				b.StopTimer()
				var sum float64
				for _, s := range stalls {
					sum += s
				}
				b.ReportMetric(sum/float64(b.N), "stall-ms/op")
				b.ReportMetric(pauseSum/float64(b.N), "pause-ms/op")
				b.ReportMetric(secondSum/float64(b.N), "stall2-ms/op")
				b.ReportMetric(lostSum/float64(b.N), "lost-ms/op")
				if len(convStalls) > 0 {
					b.ReportMetric(mean(convStalls), "conv-stall-ms/op")
					b.ReportMetric(convLostSum/float64(b.N), "conv-lost-ms/op")
					b.ReportMetric(mean(convMs), "conv-ms/op")
					b.Logf("%s impl=%s N=%d conversion windows: longest gaps ms %.1f; lost ms mean %.1f; window ms mean %.0f",
						upper, impl.name, b.N, convStalls, convLostSum/float64(b.N), mean(convMs))
				}
				inOrder := fmt.Sprintf("%.1f", stalls)
				slices.Sort(stalls)
				b.Logf("%s impl=%s N=%d stall ms: median %.2f min %.2f max %.2f (in order %s; their ends, ms after the call returned: %.1f); pause ms mean %.2f",
					upper, impl.name, b.N, median(stalls), stalls[0], stalls[len(stalls)-1], inOrder, ends, pauseSum/float64(b.N))
			})
		}
	}
}

func startPauseBench(b *testing.B) *pauseBench {
	ctx, cancel := context.WithTimeout(b.Context(), 90*time.Minute)
	b.Cleanup(cancel)
	probe := buildProbe(b)
	// SEAMLESS_BENCH_FS=xfs|btrfs puts the daemon's root on a loop-mounted
	// filesystem of that type, so that the capture strategy is reflink or
	// btrfs; by default it is wherever the temp dirs are (ext4 here: copy).
	var opts harness.Options
	if fstype := os.Getenv("SEAMLESS_BENCH_FS"); fstype != "" {
		opts.Daemon.Root = filepath.Join(testutil.LoopFS(b, fstype, 16<<30), "seamless")
	}
	opts.Daemon.ConfigFile = benchDaemonConfig(b)
	env := harness.Start(b, opts)
	img, err := testimage.Build(testimage.WithExtraFiles(map[string][]byte{"/bin/probe": probe}))
	if err != nil {
		b.Fatal(err)
	}
	ref := env.Registry.Ref("seamless-test/busybox-probe:latest")
	if _, err := testimage.Push(ctx, img, ref); err != nil {
		b.Fatal(err)
	}
	if err := env.PullImage(ctx, ref, seamless); err != nil {
		b.Fatal(err)
	}
	c, err := env.Containerd.Client(ctx)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return &pauseBench{
		ctx: ctx, env: env, client: c, http: newAPIClient(env).http, ref: ref,
		target:     env.Registry.Ref("pause-bench/app"),
		containers: map[pauseUpper]*probeContainer{},
	}
}

// buildProbe builds integration/probe statically and returns the binary.
func buildProbe(tb testing.TB) []byte {
	tb.Helper()
	data, err := os.ReadFile(testutil.BuildStatic(tb, "./integration/probe"))
	if err != nil {
		tb.Fatal(err)
	}
	return data
}

// container returns the container with that upper, starting it the first
// time (and removing the container of the other size): the probe fills
// /data, then the writer and the spinning probe start.
func (pb *pauseBench) container(b *testing.B, upper pauseUpper) *probeContainer {
	if c, ok := pb.containers[upper]; ok {
		return c
	}
	// One probe at a time: another spinning probe would take one of the
	// host's CPUs and show up as stalls.
	for n, c := range pb.containers {
		if err := pb.env.DeleteContainer(pb.ctx, c.id); err != nil {
			b.Fatal(err)
		}
		delete(pb.containers, n)
	}
	id := harness.UniqueID(fmt.Sprintf("pause-%d-", upper.files))
	script := fmt.Sprintf("/bin/probe -fill %d -fill-size %d -dir /data || exit 1; "+
		"while :; do for i in $(seq 1 100); do echo $i > /dirty.$i; done; sleep 0.05; done & "+
		"/bin/probe -out /probe.out & wait", upper.files, upper.fileSize)
	if err := pb.env.RunDetached(pb.ctx, id, pb.ref, seamless, "sh", "-c", script); err != nil {
		b.Fatal(err)
	}
	c := &probeContainer{id: id}
	if err := harness.WaitFor(pb.ctx, 50*time.Millisecond, func(ctx context.Context) (bool, error) {
		c.pid = pb.findProbe(b, id)
		return c.pid != 0, nil
	}); err != nil {
		log, _ := pb.env.ContainerLog(id)
		b.Fatalf("the probe of %s did not start: %v\n%s", id, err, log)
	}
	pb.containers[upper] = c
	return c
}

// findProbe returns the host pid of the spinning probe of container id, or 0.
func (pb *pauseBench) findProbe(b *testing.B, id string) int {
	pids, err := pb.task(b, &probeContainer{id: id}).Pids(pb.ctx)
	if err != nil {
		b.Fatal(err)
	}
	for _, p := range pids {
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p.Pid))
		if err == nil && bytes.HasPrefix(cmdline, []byte("/bin/probe\x00-out")) {
			return int(p.Pid)
		}
	}
	return 0
}

func (pb *pauseBench) task(b *testing.B, c *probeContainer) containerd.Task {
	ctr, err := pb.client.LoadContainer(pb.ctx, c.id)
	if err != nil {
		b.Fatal(err)
	}
	task, err := ctr.Task(pb.ctx, nil)
	if err != nil {
		b.Fatal(err)
	}
	return task
}

// probeResult is one window of the probe, in ms: the longest gap, the
// second longest, and the sum of all gaps over 1 ms; and when the longest
// ended (CLOCK_MONOTONIC, ns).
type probeResult struct {
	longest, second, lost float64
	end                   int64
}

// probeWindow ends the probe's current window (SIGUSR1 from the host, no
// exec in the container) and returns it, read through /proc/PID/root once
// the probe has published it.
func (pb *pauseBench) probeWindow(b *testing.B, c *probeContainer) probeResult {
	if err := syscall.Kill(c.pid, syscall.SIGUSR1); err != nil {
		b.Fatalf("signalling the probe: %v", err)
	}
	path := fmt.Sprintf("/proc/%d/root/probe.out", c.pid)
	var r probeResult
	if err := harness.WaitFor(pb.ctx, time.Millisecond, func(context.Context) (bool, error) {
		data, err := os.ReadFile(path)
		if err != nil {
			return false, nil
		}
		f := strings.Fields(string(data))
		if len(f) != 5 {
			return false, nil
		}
		seq, err := strconv.Atoi(f[0])
		if err != nil || seq <= c.seq {
			return false, nil
		}
		var ns [3]float64
		for i := range ns {
			v, err := strconv.ParseInt(f[i+1], 10, 64)
			if err != nil {
				return false, nil
			}
			ns[i] = float64(v) / 1e6
		}
		end, err := strconv.ParseInt(f[4], 10, 64)
		if err != nil {
			return false, nil
		}
		c.seq, r = seq, probeResult{ns[0], ns[1], ns[2], end}
		return true, nil
	}); err != nil {
		b.Fatalf("the probe did not answer: %v", err)
	}
	return r
}

// seamlessCommit asks the daemon for a commit and returns its pause_ms.
func (pb *pauseBench) seamlessCommit(b *testing.B, c *probeContainer, i int) float64 {
	// A budget far above the default (500ms), so that a capture slower
	// than that is measured rather than refused.
	body, _ := json.Marshal(api.CommitRequest{Namespace: "default", Container: c.id, Target: fmt.Sprintf("%s:%s-%d", pb.target, c.id, i), PauseBudget: "10s"})
	req, err := http.NewRequestWithContext(pb.ctx, "POST", "http://seamless/api/v1/commits", bytes.NewReader(body))
	if err != nil {
		b.Fatal(err)
	}
	resp, err := pb.http.Do(req)
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusCreated {
		b.Fatalf("commit: %d %s%s", resp.StatusCode, data, describePids(string(data)))
	}
	var rec api.Commit
	if err := json.Unmarshal(data, &rec); err != nil {
		b.Fatalf("commit answer %s: %v", data, err)
	}
	return rec.PauseMillis
}

// benchDaemonConfig is the daemon's configuration file for a benchmark:
// SEAMLESS_BENCH_BACKGROUND_BUILD=1 or 0 sets [convert] background_build
// (where layers are built); unset, the daemon's default ("": none).
func benchDaemonConfig(tb testing.TB) string {
	switch v := os.Getenv("SEAMLESS_BENCH_BACKGROUND_BUILD"); v {
	case "":
		return ""
	case "0", "1":
		return daemonConfig(tb, fmt.Sprintf("[convert]\nbackground_build = %t\n", v == "1"))
	default:
		tb.Fatalf("SEAMLESS_BENCH_BACKGROUND_BUILD=%q: want 0 or 1", v)
		return ""
	}
}

// monotonic reads CLOCK_MONOTONIC in ns, the clock of the probe's gaps.
func monotonic(tb testing.TB) int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		tb.Fatal(err)
	}
	return ts.Nano()
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func mean(xs []float64) float64 {
	var sum float64
	for _, x := range xs {
		sum += x
	}
	return sum / float64(len(xs))
}

func median(sorted []float64) float64 {
	n := len(sorted)
	if n%2 == 1 {
		return sorted[n/2]
	}
	return (sorted[n/2-1] + sorted[n/2]) / 2
}

// describePids shows what the host knows of the pids an error names
// ("pid N:"), to tell which process a refused freeze was about.
func describePids(msg string) string {
	var out strings.Builder
	for _, f := range strings.Fields(msg) {
		pid, err := strconv.Atoi(strings.TrimSuffix(f, ":"))
		if err != nil || !strings.HasSuffix(f, ":") {
			continue
		}
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		cgroup, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
		status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		fmt.Fprintf(&out, "\npid %d: cmdline %q\ncgroup:\n%s\nstatus:\n%s", pid, bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '}), cgroup, status)
	}
	return out.String()
}
