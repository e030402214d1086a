//go:build linux

package integration

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/harness"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// freezerStateOf returns the path of the v1 freezer.state (or v2
// cgroup.events) of a container's task, found from its pid.
func freezerStateOf(t *testing.T, pid int) (path string, frozen func() bool) {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var v1, v2 string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			if c == "freezer" {
				v1 = parts[2]
			}
		}
		if parts[0] == "0" {
			v2 = parts[2]
		}
	}
	if v1 != "" {
		path = filepath.Join("/sys/fs/cgroup/freezer", v1, "freezer.state")
		return path, func() bool {
			b, _ := os.ReadFile(path)
			return strings.TrimSpace(string(b)) == "FROZEN"
		}
	}
	path = filepath.Join("/sys/fs/cgroup", v2, "cgroup.events")
	return path, func() bool {
		b, _ := os.ReadFile(path)
		return strings.Contains(string(b), "frozen 1")
	}
}

func containerPid(ctx context.Context, t *testing.T, env *harness.Env, id string) int {
	t.Helper()
	c := client(ctx, t, env)
	ctr, err := c.LoadContainer(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	task, err := ctr.Task(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	return int(task.Pid())
}

// TestDaemonKilledDuringCommit kills the daemon (SIGKILL) in the middle of
// a commit, once while the container is frozen and once while the layer is
// being pre-copied, and shows that the next start thaws the container,
// marks the commit failed, and leaves no capture behind.
func TestDaemonKilledDuringCommit(t *testing.T) {
	ctx, env, ref := setup(t, seamless)
	apic := newAPIClient(env)

	for _, tc := range []struct {
		name string
		// script is the container's workload.
		script string
		// killWhen returns once the daemon should be killed.
		killWhen     func(t *testing.T, frozen func() bool)
		frozenAtKill bool
	}{
		{
			name: "while frozen",
			// A 256 MiB file rewritten without end: the final round, under
			// the freeze, always has it to copy, which takes long enough
			// to be caught frozen.
			script: "dd if=/dev/zero of=/big bs=1M count=256 2>/dev/null; echo ok > /ready; while :; do dd if=/dev/zero of=/big bs=1M count=256 conv=notrunc 2>/dev/null; done",
			killWhen: func(t *testing.T, frozen func() bool) {
				deadline := time.Now().Add(60 * time.Second)
				for !frozen() {
					if time.Now().After(deadline) {
						t.Fatal("the container was never frozen")
					}
					time.Sleep(200 * time.Microsecond)
				}
			},
			frozenAtKill: true,
		},
		{
			name:   "while pre-copying",
			script: "dd if=/dev/zero of=/big bs=1M count=1024 2>/dev/null; echo ok > /ready; while :; do date > /clock; sleep 0.1; done",
			killWhen: func(t *testing.T, frozen func() bool) {
				captures := filepath.Join(env.Daemon.Root(), "captures")
				deadline := time.Now().Add(60 * time.Second)
				for {
					entries, _ := os.ReadDir(captures)
					if len(entries) > 0 {
						return
					}
					if time.Now().After(deadline) {
						t.Fatal("no capture started")
					}
					time.Sleep(time.Millisecond)
				}
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := harness.UniqueID("crash-")
			runAndWaitFor(ctx, t, env, id, ref, tc.script, "/ready")
			_, frozen := freezerStateOf(t, containerPid(ctx, t, env, id))

			done := make(chan struct{})
			go func() {
				defer close(done)
				// Fails when the daemon dies under it; that is the point.
				apic.http.Post("http://seamless/api/v1/commits", "application/json", strings.NewReader(
					fmt.Sprintf(`{"namespace":"default","container":%q,"target":"crash/app","pause_budget":"50s"}`, id)))
			}()
			tc.killWhen(t, frozen)
			if err := env.Daemon.Kill(); err != nil {
				t.Fatal(err)
			}
			<-done
			if got := frozen(); got != tc.frozenAtKill {
				t.Fatalf("frozen at kill: %v, want %v", got, tc.frozenAtKill)
			}

			if err := env.Daemon.Start(ctx); err != nil {
				t.Fatal(err)
			}
			// Recovery runs before the daemon listens: no waiting here.
			if frozen() {
				t.Fatal("the container is still frozen after the daemon restarted")
			}
			var list struct{ Commits []api.Commit }
			apic.do(ctx, t, "GET", "/api/v1/commits?container="+id, nil, &list)
			if len(list.Commits) != 1 || list.Commits[0].State != snapshotter.StateFailed || list.Commits[0].ErrorCode != snapshotter.CodeInterrupted {
				t.Fatalf("after the restart the commit is %+v, want one failed %s", list.Commits, snapshotter.CodeInterrupted)
			}
			entries, err := os.ReadDir(filepath.Join(env.Daemon.Root(), "captures"))
			if err != nil || len(entries) != 0 {
				t.Fatalf("captures left after recovery: %v %v", entries, err)
			}
			if _, err := env.Exec(ctx, id, "true"); err != nil {
				t.Fatalf("the container does not run: %v", err)
			}
			if err := env.WaitForSnapshotter(ctx); err != nil {
				t.Fatal(err)
			}
			if err := env.DeleteContainer(ctx, id); err != nil {
				t.Fatal(err)
			}
		})
	}
}
