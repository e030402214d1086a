//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/seamless-snapshotter/seamless-snapshotter/integration/harness"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/testimage"
)

const (
	sn = harness.SnapshotterName
	// logFile is where the writer container appends, in its rootfs.
	logFile = "/data/log"
	// shieldTimeout bounds the commands Ctrl-C does not interrupt.
	shieldTimeout = 30 * time.Second
	// writerScript appends "write N at U s" (U: the kernel's uptime, 10 ms
	// resolution) to logFile every 100 ms: N shows the process never
	// restarted, U shows how long any write waited.
	writerScript = `mkdir -p /data; i=0; while :; do i=$((i+1)); read up rest < /proc/uptime; echo "write $i at ${up}s" >> ` + logFile + `; sleep 0.1; done`
)

// demo holds the state of one run; its methods run on the Runner's
// goroutine except onSignal.
type demo struct {
	out    io.Writer
	keep   bool
	runner *harness.Runner

	t      harness.T
	ctx    context.Context
	env    *harness.Env
	client *containerd.Client
	api    *apiClient
	begin  time.Time

	mu       sync.Mutex // guards out and signal*: onSignal runs concurrently
	signal   os.Signal
	signalAt time.Time
	// resignalled is closed when a second signal arrives.
	resignalled chan struct{}

	// Filled in as the demo goes, for the summary and the final check.
	ref            string
	writer         string
	upper          string
	pids           map[string]int
	commits        []commitRun
	cleanupBegin   time.Time
	failuresBefore int  // failures when the cleanups began
	failPrinted    bool // a ✗ line was printed
}

func (d *demo) printf(format string, args ...any) {
	d.mu.Lock()
	defer d.mu.Unlock()
	fmt.Fprintf(d.out, format, args...)
}

// ok prints a step's line: ✓, the duration, the title and the detail.
func (d *demo) ok(title, detail string, took time.Duration) {
	d.printf("  ✓ %6s  %-26s %s\n", fmtDuration(took), title, detail)
}

// show prints interesting output under a step, indented.
func (d *demo) show(text string) {
	if text = strings.TrimRight(text, "\n"); text != "" {
		d.printf("%s\n", indent(text, "      │ "))
	}
}

// step runs f and prints its line with the detail f returns; on error it
// prints ✗ and ends the run (the Runner then cleans up).
func (d *demo) step(title string, f func() (string, error)) {
	if d.ctx.Err() != nil {
		// Interrupted during the previous step, which was shielded.
		d.t.Fatal(context.Cause(d.ctx))
	}
	start := time.Now()
	detail, err := f()
	if err != nil {
		d.failAfter(title, err, time.Since(start))
	}
	d.ok(title, detail, time.Since(start))
}

func (d *demo) fail(title string, err error) { d.failAfter(title, err, 0) }

func (d *demo) failAfter(title string, err error, took time.Duration) {
	d.failPrinted = true
	if cause := context.Cause(d.ctx); errors.Is(cause, harness.ErrInterrupted) {
		d.printf("  ✗ %6s  %-26s %v\n", fmtDuration(took), title, cause)
		d.t.Fatal(cause)
	}
	d.printf("  ✗ %6s  %-26s %s\n", fmtDuration(took), title, firstLine(err.Error()))
	d.t.Fatalf("%s: %v", title, err)
}

func (d *demo) onSignal(sig os.Signal, n int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if n == 1 {
		d.signal, d.signalAt = sig, time.Now()
		fmt.Fprintf(d.out, "\n  %s received: stopping, then removing everything the demo started\n", sigName(sig))
		return
	}
	// `timeout -s INT` and `kill -INT -PGID` deliver one signal twice:
	// to the process and to its group.
	if n == 2 {
		close(d.resignalled)
	}
	if time.Since(d.signalAt) > time.Second {
		fmt.Fprintf(d.out, "  %s received: still cleaning up, please wait\n", sigName(sig))
	}
}

func (d *demo) run(t harness.T) {
	d.t, d.ctx, d.begin = t, t.Context(), time.Now()
	d.pids = map[string]int{}
	defer func() {
		// Runs before the Runner's cleanups, also after a Fatal.
		d.cleanupBegin = time.Now()
		if errors.Is(context.Cause(d.ctx), harness.ErrInterrupted) {
			// A signal sent to our process group too (`timeout -s INT`,
			// `kill -INT -PGID`) reaches a ctr the cleanups fork before it
			// moves to a process group of its own, and kills it: a step
			// that stops on the first copy starts the cleanups within
			// microseconds. Let the second copy arrive first.
			select {
			case <-d.resignalled:
			case <-time.After(200 * time.Millisecond):
			}
		}
		failures := d.runner.Failures()
		d.failuresBefore = len(failures)
		if len(failures) > 0 && !d.failPrinted {
			// A harness call failed on its own (Env.Start).
			msg := firstLine(failures[0])
			if cause := context.Cause(d.ctx); errors.Is(cause, harness.ErrInterrupted) {
				msg = cause.Error()
			}
			d.printf("  ✗ %6s  %-26s %s\n", "", "start", msg)
		}
	}()

	d.startEnv()
	d.image()
	d.runWriter()
	d.inspect()
	d.commitByAPI()
	d.waitPublished(d.lastCommit())
	d.commitByLabel()
	d.restartDaemon()
	d.waitPublished(d.lastCommit())
	d.runCommitted()
	d.summary()
	if d.keep {
		d.waitForCtrlC()
	}
}

// startEnv starts registry, daemon and containerd, one line each.
func (d *demo) startEnv() {
	ready := func(e *harness.Env, step harness.Step, took time.Duration) {
		switch step {
		case harness.StepRegistry:
			d.pids["registry"] = e.Registry.Pid()
			d.ok("registry", "http://"+e.Registry.Addr(), took)
		case harness.StepDaemon:
			d.pids["daemon"] = e.Daemon.Pid()
			d.api = newAPIClient(filepath.Join(filepath.Dir(e.Daemon.Socket()), "api.sock"))
			d.ok("seamless daemon", fmt.Sprintf("pid %d, %s", e.Daemon.Pid(), e.Daemon.Socket()), took)
			d.show("root " + e.Daemon.Root() + "\nAPI  " + d.api.sock)
		case harness.StepContainerd:
			d.pids["containerd"] = e.Containerd.Pid()
			d.ok("containerd", fmt.Sprintf("pid %d, %s", e.Containerd.Pid(), e.Containerd.Address()), took)
			d.show(fmt.Sprintf("config %s ([proxy_plugins.%s] → the daemon's socket)", e.Containerd.ConfigPath(), sn))
		case harness.StepSnapshotter:
			d.ok("containerd ↔ seamless", "containerd reaches the proxy snapshotter", took)
		}
	}
	d.env = harness.Start(d.t, harness.Options{Ready: ready})
	c, err := d.env.Containerd.Client(d.ctx)
	if err != nil {
		d.fail("containerd client", err)
	}
	d.t.Cleanup(func() { c.Close() })
	d.client = c
}

// image builds the busybox test image, pushes it to the private registry
// and pulls it into seamless through containerd.
func (d *demo) image() {
	d.ref = d.env.Registry.Ref("demo/busybox:v1")
	var img v1.Image
	d.step("build image", func() (string, error) {
		var err error
		if img, err = testimage.Build(); err != nil {
			return "", err
		}
		layers, err := img.Layers()
		if err != nil {
			return "", err
		}
		var size int64
		for _, l := range layers {
			s, err := l.Size()
			if err != nil {
				return "", err
			}
			size += s
		}
		return fmt.Sprintf("busybox from the host, %s, %s compressed", plural(len(layers), "layer"), fmtBytes(size)), nil
	})
	d.step("push", func() (string, error) {
		digest, err := testimage.Push(d.ctx, img, d.ref)
		return d.ref + "@" + shortDigest(digest), err
	})
	d.step("pull into seamless", func() (string, error) {
		return "ctr images pull --snapshotter " + sn, d.env.PullImage(d.ctx, d.ref, sn)
	})
}

// runWriter starts the container that keeps writing into its rootfs and
// shows what it wrote.
func (d *demo) runWriter() {
	d.writer = harness.UniqueID("demo-writer-")
	d.step("run container", func() (string, error) {
		if err := d.env.RunDetached(d.ctx, d.writer, d.ref, sn, "sh", "-c", writerScript); err != nil {
			return "", err
		}
		task, err := d.task()
		if err != nil {
			return "", err
		}
		d.pids["container"] = int(task.Pid())
		return fmt.Sprintf("%s, pid %d, on %s", d.writer, task.Pid(), sn), nil
	})
	d.show(fmt.Sprintf("appends \"write N at <uptime>s\" to %s every 100 ms", logFile))
	d.sleep(time.Second)
	var out string
	d.step("exec: tail -n 3 "+logFile, func() (string, error) {
		var err error
		out, err = d.env.Exec(d.shielded(), d.writer, "tail", "-n", "3", logFile)
		return "after 1 s, inside the container", err
	})
	d.show(out)
}

// inspect shows the snapshots and where the container's writes live.
func (d *demo) inspect() {
	var out string
	d.step("ctr snapshots ls", func() (string, error) {
		var err error
		out, err = d.env.Ctr(d.ctx, "snapshots", "--snapshotter", sn, "ls")
		return "the image's layer (committed), the container's (active)", err
	})
	d.show(retabulate(out))

	var key string
	d.step("ctr snapshots usage", func() (string, error) {
		container, err := d.client.LoadContainer(d.ctx, d.writer)
		if err != nil {
			return "", err
		}
		info, err := container.Info(d.ctx)
		if err != nil {
			return "", err
		}
		key = info.SnapshotKey
		out, err = d.env.Ctr(d.ctx, "snapshots", "--snapshotter", sn, "usage", key)
		return "the container's snapshot, " + key, err
	})
	d.show(retabulate(out))

	var lines []write
	d.step("upperdir on the host", func() (string, error) {
		mounts, err := d.client.SnapshotService(sn).Mounts(d.ctx, key)
		if err != nil {
			return "", err
		}
		for _, m := range mounts {
			for _, o := range m.Options {
				if v, ok := strings.CutPrefix(o, "upperdir="); ok {
					d.upper = v
				}
			}
		}
		if d.upper == "" {
			return "", fmt.Errorf("no upperdir= in the mounts of %s: %+v", key, mounts)
		}
		rel, err := filepath.Rel(d.env.Daemon.Root(), d.upper)
		if err != nil || strings.HasPrefix(rel, "..") {
			return "", fmt.Errorf("upperdir %s is not under the daemon's root %s", d.upper, d.env.Daemon.Root())
		}
		if lines, err = d.readWrites(); err != nil {
			return "", err
		}
		return "<daemon root>/" + rel + " (from the snapshot's mounts)", nil
	})
	d.show(fmt.Sprintf("%s\n%s, the last: %s",
		filepath.Join(d.upper, logFile), plural(len(lines), "line"), lines[len(lines)-1].text))
}

// restartDaemon restarts our daemon under the running container and shows
// that the container did not notice and that containers still start.
func (d *demo) restartDaemon() {
	task, err := d.task()
	if err != nil {
		d.fail("load the container's task", err)
	}
	before := hostUptime()
	d.step("restart seamless daemon", func() (string, error) {
		old := d.env.Daemon.Pid()
		if err := d.env.Daemon.Restart(d.ctx); err != nil {
			return "", err
		}
		d.pids["daemon (restarted)"] = d.env.Daemon.Pid()
		return fmt.Sprintf("SIGTERM pid %d, started pid %d, same root", old, d.env.Daemon.Pid()), nil
	})
	d.step("containerd ↔ seamless", func() (string, error) {
		return "reconnected (containerd retries with a backoff up to 3 s)", d.env.WaitForSnapshotter(d.ctx)
	})
	after := hostUptime()

	var restartStats string
	d.step("container kept running", func() (string, error) {
		// A few more writes after the restart.
		var writes []write
		ctx, cancel := context.WithTimeout(d.ctx, 10*time.Second)
		defer cancel()
		err := harness.WaitFor(ctx, 50*time.Millisecond, func(context.Context) (bool, error) {
			var err error
			writes, err = d.readWrites()
			return err == nil && len(writes) > 0 && writes[len(writes)-1].uptime > after+0.3, err
		})
		if err != nil {
			return "", fmt.Errorf("no new writes after the restart: %w", err)
		}
		status, err := task.Status(d.ctx)
		if err != nil {
			return "", err
		}
		if status.Status != containerd.Running {
			return "", fmt.Errorf("task %s is %s", d.writer, status.Status)
		}
		now, err := d.task()
		if err != nil {
			return "", err
		}
		if now.Pid() != task.Pid() {
			return "", fmt.Errorf("task pid changed from %d to %d", task.Pid(), now.Pid())
		}
		for i, w := range writes {
			if w.n != i+1 {
				return "", fmt.Errorf("line %d of %s is write %d: the writer restarted or lost writes", i+1, logFile, w.n)
			}
		}
		during, gap := 0, 0.0
		for i, w := range writes {
			if w.uptime >= before && w.uptime <= after {
				during++
			}
			if i > 0 && w.uptime >= before && writes[i-1].uptime <= after {
				gap = max(gap, w.uptime-writes[i-1].uptime)
			}
		}
		restartStats = fmt.Sprintf("%s during the %.2f s restart; longest wait between two writes %.2f s",
			plural(during, "write"), after-before, gap)
		return fmt.Sprintf("%s, same pid %d, writes 1..%d without a gap", status.Status, task.Pid(), len(writes)), nil
	})
	d.show(restartStats)

	d.commitsSurvived()

	var out string
	d.step("new container on seamless", func() (string, error) {
		var err error
		out, err = d.env.Run(d.shielded(), harness.UniqueID("demo-hello-"), d.ref, sn, "echo", "hello from a new container")
		return "ctr run --rm --snapshotter " + sn, err
	})
	d.show(out)
}

func (d *demo) summary() {
	writes, _ := d.readWrites()
	var pauses, gaps, strategies []string
	for _, c := range d.commits {
		pauses = append(pauses, fmt.Sprintf("%s (%s)", fmtPause(c.rec), c.how))
		gaps = append(gaps, fmt.Sprintf("%.2f s (%s)", c.gap, c.how))
		if !slices.Contains(strategies, c.rec.Strategy) {
			strategies = append(strategies, c.rec.Strategy)
		}
	}
	registryNote := ""
	switch tags, err := d.pushed("demo/committed"); {
	case err == nil && len(tags) == 0:
		registryNote = "; the registry has no demo/committed"
	case err == nil:
		registryNote = "; the registry has demo/committed:" + strings.Join(tags, ", :")
	}
	d.printf("\n  summary (%s)\n", fmtDuration(time.Since(d.begin)))
	for _, s := range []string{
		fmt.Sprintf("an image from the private registry was unpacked by %s, containerd's proxy snapshotter", sn),
		fmt.Sprintf("a container on %s has written %d lines into its rootfs, kept in the daemon's root", sn, len(writes)),
		fmt.Sprintf("seamless commit, the capture: %s of the running container froze it for %s;",
			plural(len(d.commits), "commit"), strings.Join(pauses, " and ")) +
			fmt.Sprintf("\n      each capture is a whole, point-in-time copy of its layer; the longest wait between two writes: %s",
				strings.Join(gaps, " and ")),
		"in the background, each capture became an image (the base image's layers + the container's changes)" +
			"\n      pushed to the registry, manifest last" + registryNote + "; the second commit added one small layer",
		"the daemon restarted under it: the container never stopped, the commits and their jobs are still recorded",
		fmt.Sprintf("the committed image, pulled into namespace %s with containerd's overlayfs, runs and holds the captured data", freshNamespace),
		fmt.Sprintf("capture strategy %s (the root's filesystem decides: btrfs snapshots, xfs reflinks, else copies)", strings.Join(strategies, ", ")),
	} {
		d.printf("    • %s\n", s)
	}
	d.printf("\n")
}

func (d *demo) waitForCtrlC() {
	ctr, _ := harness.FindBinary(harness.BinCtr)
	c := fmt.Sprintf("%s --address %s", ctr, d.env.Containerd.Address())
	d.printf("  -keep: everything stays up until Ctrl-C; try\n")
	for _, l := range []string{
		c + " snapshots --snapshotter " + sn + " ls",
		c + " tasks ls",
		c + " tasks exec --exec-id sh -t " + d.writer + " sh",
		"tail -f " + filepath.Join(d.upper, logFile),
		"curl --unix-socket " + d.api.sock + " http://seamless/api/v1/commits",
		"ls " + filepath.Join(d.env.Daemon.Root(), "captures"),
	} {
		d.printf("      %s\n", l)
	}
	<-d.ctx.Done()
}

// finish reports the cleanup, after Run, and checks that nothing is left;
// it returns whether the cleanup was complete.
func (d *demo) finish(err error) bool {
	if d.cleanupBegin.IsZero() {
		return true
	}
	took := time.Since(d.cleanupBegin)
	var problems []string
	for _, f := range d.runner.Failures()[d.failuresBefore:] {
		problems = append(problems, firstLine(f))
	}
	problems = append(problems, d.leftovers()...)
	if len(problems) == 0 {
		d.ok("cleaned up", "containers, containerd, daemon, registry, mounts, temp dirs", took)
	} else {
		d.printf("  ✗ %6s  %-26s %s\n", fmtDuration(took), "clean up", strings.Join(problems, "; "))
	}
	if err == nil {
		d.printf("\ndone in %s\n", fmtDuration(time.Since(d.begin)))
	}
	return len(problems) == 0
}

// leftovers lists processes the demo started that still run and mounts
// still using the daemon's or containerd's directories.
func (d *demo) leftovers() []string {
	var left []string
	for what, pid := range d.pids {
		if pid > 0 && alive(pid) {
			left = append(left, fmt.Sprintf("%s pid %d still runs", what, pid))
		}
	}
	if d.env == nil {
		return left
	}
	var dirs []string
	if d.env.Daemon != nil {
		dirs = append(dirs, d.env.Daemon.Root())
	}
	if d.env.Containerd != nil {
		dirs = append(dirs, d.env.Containerd.Root(), d.env.Containerd.State())
	}
	mountinfo, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(mountinfo), "\n") {
		for _, dir := range dirs {
			if strings.Contains(l, dir) {
				left = append(left, "mount left: "+l)
				break
			}
		}
	}
	return left
}

func alive(pid int) bool {
	stat, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(stat, ')')
	return i < 0 || i+2 >= len(stat) || stat[i+2] != 'Z'
}

func (d *demo) task() (containerd.Task, error) {
	container, err := d.client.LoadContainer(d.ctx, d.writer)
	if err != nil {
		return nil, err
	}
	return container.Task(d.ctx, nil)
}

// shielded returns a context that Ctrl-C does not cancel, bounded by
// shieldTimeout, for the ctr commands that start a process with stdio
// FIFOs (tasks exec, run without -d): ctr killed while it starts the
// process leaves containerd's shim waiting 30 s for the FIFOs to be
// opened (containerd v2.4.2), and removing the container at cleanup then
// waits as long. The interrupt takes effect at the next step instead.
func (d *demo) shielded() context.Context {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(d.ctx), shieldTimeout)
	d.t.Cleanup(cancel)
	return ctx
}

func (d *demo) sleep(dur time.Duration) {
	select {
	case <-d.ctx.Done():
		d.fail(fmt.Sprintf("wait %v", dur), d.ctx.Err())
	case <-time.After(dur):
	}
}

// write is one complete line of the writer's log.
type write struct {
	n      int
	uptime float64
	text   string
}

// readWrites reads the writer's log from the host, through its upperdir,
// ignoring a last line still being written.
func (d *demo) readWrites() ([]write, error) {
	data, err := os.ReadFile(filepath.Join(d.upper, logFile))
	if err != nil {
		return nil, err
	}
	return parseWrites(data[:bytes.LastIndexByte(data, '\n')+1])
}

// parseWrites parses the writer's lines.
func parseWrites(data []byte) ([]write, error) {
	var writes []write
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		// "write N at Us"
		f := strings.Fields(sc.Text())
		if len(f) != 4 || f[0] != "write" || f[2] != "at" {
			return nil, fmt.Errorf("unexpected line %q in %s", sc.Text(), logFile)
		}
		n, err1 := strconv.Atoi(f[1])
		up, err2 := strconv.ParseFloat(strings.TrimSuffix(f[3], "s"), 64)
		if err := errors.Join(err1, err2); err != nil {
			return nil, fmt.Errorf("line %q in %s: %w", sc.Text(), logFile, err)
		}
		writes = append(writes, write{n: n, uptime: up, text: sc.Text()})
	}
	if len(writes) == 0 {
		return nil, fmt.Errorf("%s is empty", logFile)
	}
	return writes, nil
}

// hostUptime is /proc/uptime's first field: the clock the writer stamps
// its lines with (uptime is not namespaced here).
func hostUptime() float64 {
	var up float64
	if b, err := os.ReadFile("/proc/uptime"); err == nil {
		up, _ = strconv.ParseFloat(strings.Fields(string(b))[0], 64)
	}
	return up
}

func sigName(sig os.Signal) string {
	switch sig {
	case syscall.SIGINT:
		return "SIGINT (Ctrl-C)"
	case syscall.SIGTERM:
		return "SIGTERM"
	case syscall.SIGHUP:
		return "SIGHUP"
	}
	return fmt.Sprint(sig)
}
