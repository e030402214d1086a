//go:build linux

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/containerd/errdefs"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// scriptedCommitter walks one commit through a script of records: each
// GET answers the next one, and the last one forever after.
type scriptedCommitter struct {
	fakeCommitter
	mu     sync.Mutex
	script []snapshotter.Commit
	calls  int
}

func (s *scriptedCommitter) GetCommit(_ context.Context, id string) (snapshotter.Commit, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if id != s.script[0].ID {
		return snapshotter.Commit{}, fmt.Errorf("commit %q: %w", id, errdefs.ErrNotFound)
	}
	c := s.script[min(s.calls, len(s.script)-1)]
	s.calls++
	return c, nil
}

func (s *scriptedCommitter) called() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls
}

// serveUnix serves h on a unix socket at sock with httptest.
func serveUnix(t *testing.T, sock string, h http.Handler) *httptest.Server {
	t.Helper()
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.Listener.Close()
	srv.Listener = l
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}

// serveScript serves the API of a commit walking through script, and
// returns the environment that points seamlessctl at it.
func serveScript(t *testing.T, script ...snapshotter.Commit) (map[string]string, *scriptedCommitter) {
	t.Helper()
	sc := &scriptedCommitter{script: script}
	sock := filepath.Join(t.TempDir(), "api.sock")
	serveUnix(t, sock, api.Handler(sc, api.NewMetrics()))
	return map[string]string{envAPIAddress: sock}, sc
}

// fastWait polls often and restores the timings after the test.
func fastWait(t *testing.T) {
	saved := []time.Duration{pollInterval, plainProgressEvery, daemonRestartGrace}
	t.Cleanup(func() { pollInterval, plainProgressEvery, daemonRestartGrace = saved[0], saved[1], saved[2] })
	pollInterval = time.Millisecond
}

// step is the sample commit in a state with some progress.
func step(state snapshotter.CommitState, done, total int64) snapshotter.Commit {
	c := sample().Commit
	c.State, c.Progress = state, snapshotter.Progress{Done: done, Total: total}
	return c
}

func finished() snapshotter.Commit {
	c := step(snapshotter.StateDone, 12<<20, 12<<20)
	c.ImageDigest, c.Attempts = testDigest, 1
	return c
}

func failedWith(code, msg string) snapshotter.Commit {
	c := step(snapshotter.StateFailed, 0, 0)
	c.ErrorCode, c.Error, c.Attempts = code, msg, 3
	return c
}

// retryingStep is a job that failed transiently and runs again in an hour.
func retryingStep(attempts int) snapshotter.Commit {
	c := step(snapshotter.StatePending, 0, 0)
	c.Attempts, c.NextAttempt = attempts, time.Now().Add(time.Hour)
	c.ErrorCode, c.Error = "REGISTRY_UNREACHABLE", "dial tcp 127.0.0.1:5000: connect: connection refused"
	return c
}

// walk is a commit that converts and pushes its image.
func walk() []snapshotter.Commit {
	return []snapshotter.Commit{
		step(snapshotter.StatePending, 0, 0),
		step(snapshotter.StateConverting, 0, 10<<20),
		step(snapshotter.StateConverting, 5<<20, 10<<20),
		step(snapshotter.StateConverting, 10<<20, 10<<20),
		step(snapshotter.StatePushing, 0, 12<<20),
		step(snapshotter.StatePushing, 6<<20, 12<<20),
		finished(),
	}
}

// elapsed is the time at the start of plain lines.
var elapsed = regexp.MustCompile(`(?m)^ *[0-9.hms]+s  `)

func TestWait(t *testing.T) {
	fastWait(t)
	id := sample().ID
	doneLine := "done: localhost:5000/app:v1@" + testDigest + "\n"
	retryLine := "retrying (attempt 2 in "
	for _, tc := range []struct {
		name   string
		script []snapshotter.Commit
		args   []string // after "wait"
		every  time.Duration
		code   int
		stdout string // exactly, without the elapsed times; "" to skip
		has    []string
		stderr string // must appear; "" means stderr must be empty
	}{
		{name: "done, plain lines", script: walk(), every: time.Hour,
			stdout: "pending\nconverting  0 B / 10.0 MiB  0%\npushing  0 B / 12.0 MiB  0%\n" + doneLine},
		{name: "done, every progress", script: walk(), every: 0,
			stdout: "pending\nconverting  0 B / 10.0 MiB  0%\nconverting  5.0 MiB / 10.0 MiB  50%\nconverting  10.0 MiB / 10.0 MiB  100%\n" +
				"pushing  0 B / 12.0 MiB  0%\npushing  6.0 MiB / 12.0 MiB  50%\n" + doneLine},
		{name: "already done", script: []snapshotter.Commit{finished()}, stdout: doneLine},
		{name: "done, json", script: walk(), args: []string{"-o", "json"},
			has: []string{`"id": "` + id + `"`, `"state": "done"`, `"image_digest": "` + testDigest + `"`}},
		{name: "retried, then done", script: []snapshotter.Commit{step(snapshotter.StatePushing, 0, 1), retryingStep(1), retryingStep(1), step(snapshotter.StatePushing, 1, 1), finished()},
			every: time.Hour, has: []string{"pushing  0 B / 1 B  0%\n", retryLine, "[REGISTRY_UNREACHABLE] dial tcp 127.0.0.1:5000: connect: connection refused\n", "pushing  1 B / 1 B  100%\n", doneLine}},
		{name: "failed at the registry", script: append(walk()[:5], retryingStep(1), failedWith("REGISTRY_UNREACHABLE", "dial tcp: connection refused")),
			code: exitUnreachable, has: []string{"pushing  0 B / 12.0 MiB  0%\n", retryLine},
			stderr: "seamlessctl: commit " + id + " failed: [REGISTRY_UNREACHABLE] dial tcp: connection refused"},
		{name: "registry credentials", script: append(walk()[:5], failedWith("REGISTRY_AUTH", "401 Unauthorized")),
			code: exitUnreachable, stderr: "failed: [REGISTRY_AUTH] 401 Unauthorized"},
		{name: "registry error", script: []snapshotter.Commit{failedWith("REGISTRY_ERROR", "500")}, code: exitUnreachable, stderr: "[REGISTRY_ERROR] 500"},
		{name: "push failed", script: []snapshotter.Commit{failedWith("PUSH_FAILED", "x")}, code: exitUnreachable, stderr: "[PUSH_FAILED] x"},
		{name: "failed, json", script: []snapshotter.Commit{failedWith("REGISTRY_AUTH", "401 Unauthorized")}, args: []string{"-o", "json"},
			code: exitUnreachable, has: []string{`"state": "failed"`, `"error_code": "REGISTRY_AUTH"`}, stderr: "[REGISTRY_AUTH] 401 Unauthorized"},
		{name: "failed otherwise", script: append(walk()[:2], failedWith("BASE_IMAGE_NOT_FOUND", "image alpine is gone")),
			code: exitError, stderr: "seamlessctl: commit " + id + " failed: [BASE_IMAGE_NOT_FOUND] image alpine is gone"},
		{name: "failed capture", script: []snapshotter.Commit{failedWith(snapshotter.CodeInterrupted, "daemon restarted")}, code: exitError, stdout: "", stderr: "[INTERRUPTED] daemon restarted"},
		{name: "failed without a code", script: []snapshotter.Commit{failedWith("", "boom")}, code: exitError, stderr: "seamlessctl: commit " + id + " failed: boom"},
		{name: "timeout", script: walk()[:6], args: []string{"--timeout", "50ms"}, code: exitError,
			has:    []string{"pushing  0 B / 12.0 MiB  0%\n"},
			stderr: "seamlessctl: timed out after 50ms waiting for commit " + id + " (state pushing, 50% of 12.0 MiB); the job keeps running: follow it with 'seamlessctl wait " + id + "'"},
		{name: "timeout, flag after the ID", script: walk()[:1], args: []string{"--timeout=20ms"}, code: exitError, stderr: "(state pending)"},
		{name: "not found", script: walk(), args: []string{"--", "nope"}, code: exitNotFound, stderr: `[COMMIT_NOT_FOUND] commit "nope": not found`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			plainProgressEvery = tc.every
			env, _ := serveScript(t, tc.script...)
			args := append([]string{"wait"}, tc.args...)
			if len(tc.args) == 0 || tc.args[len(tc.args)-1] != "nope" {
				args = append(args, id)
			}
			code, stdout, stderr := runCLI(env, args...)
			if code != tc.code {
				t.Errorf("exit code %d, want %d (stderr %q)", code, tc.code, stderr)
			}
			plain := elapsed.ReplaceAllString(stdout, "")
			if tc.stdout != "" && plain != tc.stdout {
				t.Errorf("stdout\n%s\nwant\n%s", plain, tc.stdout)
			}
			for _, s := range tc.has {
				if !strings.Contains(plain, s) {
					t.Errorf("stdout lacks %q:\n%s", s, stdout)
				}
			}
			if len(tc.args) > 0 && tc.args[0] == "-o" {
				var rec api.Commit
				if err := json.Unmarshal([]byte(stdout), &rec); err != nil || rec.ID != id || !rec.State.Terminal() {
					t.Errorf("stdout is not the final record: %v\n%s", err, stdout)
				}
			}
			switch {
			case tc.stderr == "" && stderr != "":
				t.Errorf("unexpected stderr %q", stderr)
			case !strings.Contains(stderr, tc.stderr):
				t.Errorf("stderr %q lacks %q", stderr, tc.stderr)
			case stderr != "" && strings.Count(stderr, "\n") != 1:
				t.Errorf("stderr is not one line: %q", stderr)
			}
		})
	}
}

func TestWaitUsage(t *testing.T) {
	for _, tc := range []struct {
		args   []string
		stderr string
	}{
		{[]string{"wait"}, "wait: expected one commit ID, got 0 arguments (see 'seamlessctl wait --help')"},
		{[]string{"wait", "a", "b"}, "expected one commit ID, got 2"},
		{[]string{"wait", "--timeout", "soon", "a"}, `invalid value "soon" for flag -timeout`},
		{[]string{"wait", "--timeout", "-1s", "a"}, "--timeout -1s must be positive"},
		{[]string{"wait", "-o", "yaml", "a"}, "--output must be text or json"},
		{[]string{"commit", "--container", "web", "--target", "r/app:v1", "--timeout", "1m"}, "commit: --timeout is only for --wait"},
		{[]string{"commit", "--container", "web", "--target", "r/app:v1", "--wait", "--timeout", "-1m"}, "--timeout -1m0s must be positive"},
		{[]string{"commit", "--container", "web", "--target", "r/app:v1", "--compression", "lz4"}, `commit: --compression "lz4" is not one of gzip, zstd`},
		{[]string{"commit", "--container", "web", "--target", "r/app:v1", "--compression", "gzip", "--compression-level", "12"}, "commit: --compression-level level 12 is out of range for gzip (1-9, or 0 for the default)"},
		{[]string{"commit", "--container", "web", "--target", "r/app:v1", "--compression-level", "fast"}, `invalid value "fast" for flag -compression-level`},
		{[]string{"commit", "--container", "web", "--target", "r/app:v1", "--local=maybe"}, `invalid boolean value "maybe" for -local`},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			code, stdout, stderr := runCLI(nil, tc.args...)
			if code != exitUsage || stdout != "" || !strings.Contains(stderr, tc.stderr) {
				t.Fatalf("exit %d, stdout %q, stderr %q; want exit 2 and %q", code, stdout, stderr, tc.stderr)
			}
		})
	}
}

// TestWaitProgressBar pretends stdout is a terminal.
func TestWaitProgressBar(t *testing.T) {
	fastWait(t)
	const width = 80
	saved := terminalWidth
	t.Cleanup(func() { terminalWidth = saved })
	terminalWidth = func(io.Writer) (int, bool) { return width, true }

	script := append(walk()[:5], retryingStep(1), step(snapshotter.StatePushing, 6<<20, 12<<20), finished())
	env, _ := serveScript(t, script...)
	code, stdout, stderr := runCLI(env, "wait", sample().ID)
	if code != exitOK || stderr != "" {
		t.Fatalf("exit %d, stderr %q", code, stderr)
	}
	body, result, ok := strings.Cut(stdout, "\n")
	if !ok || result != "" {
		t.Fatalf("more than one line after the bar: %q", stdout)
	}
	frames := strings.Split(body, "\r")
	if frames[0] != "" {
		t.Fatalf("output does not start with a carriage return: %q", stdout)
	}
	frames = frames[1:]
	if last := frames[len(frames)-1]; last != "done: localhost:5000/app:v1@"+testDigest {
		t.Fatalf("last line %q", last)
	}
	for _, want := range []string{
		"pending",
		"converting [>                        ]  0 B / 10.0 MiB  0%",
		"converting [============>            ]  5.0 MiB / 10.0 MiB  50%",
		"converting [=========================]  10.0 MiB / 10.0 MiB  100%",
		"pushing    [>                        ]  0 B / 12.0 MiB  0%",
		"retrying (attempt 2 in 1h0m0s): [REGISTRY_UNREACHABLE] dial tcp 127.0.0.1:5000…",
		"pushing    [============>            ]  6.0 MiB / 12.0 MiB  50%",
	} {
		found := false
		for _, f := range frames {
			found = found || strings.TrimRight(f, " ") == want
		}
		if !found {
			t.Errorf("no frame %q in %q", want, frames)
		}
	}
	for _, f := range frames[:len(frames)-1] {
		if n := utf8.RuneCountInString(f); n >= width {
			t.Errorf("frame of %d columns on a terminal of %d: %q", n, width, f)
		}
	}
	// Blanks before the result clear the last frame.
	if clear, bar := frames[len(frames)-2], frames[len(frames)-3]; strings.TrimSpace(clear) != "" || len(clear) < len(strings.TrimRight(bar, " ")) {
		t.Errorf("the bar %q is not cleared before the result: %q", bar, clear)
	}
}

// TestWaitDaemonRestart: wait rides out a daemon that goes away for a
// moment, and gives up once it stays away.
func TestWaitDaemonRestart(t *testing.T) {
	fastWait(t)
	plainProgressEvery = time.Hour
	for _, tc := range []struct {
		name  string
		back  bool
		code  int
		lines []string
	}{
		{"back", true, exitOK, []string{"pending\n", "the daemon cannot be reached; trying again for 10s: cannot reach the seamless daemon API at ", "done: "}},
		{"gone", false, exitUnreachable, []string{"pending\n", "the daemon cannot be reached; trying again for 100ms"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			daemonRestartGrace = 10 * time.Second
			if !tc.back {
				daemonRestartGrace = 100 * time.Millisecond
			}
			sc := &scriptedCommitter{script: []snapshotter.Commit{step(snapshotter.StatePending, 0, 0)}}
			sock := filepath.Join(t.TempDir(), "api.sock")
			srv := serveUnix(t, sock, api.Handler(sc, api.NewMetrics()))
			restarted := make(chan struct{})
			go func() {
				defer close(restarted)
				for sc.called() < 2 {
					time.Sleep(time.Millisecond)
				}
				srv.Close() // removes the socket
				if tc.back {
					time.Sleep(50 * time.Millisecond)
					sc.mu.Lock()
					sc.script = []snapshotter.Commit{finished()}
					sc.mu.Unlock()
					serveUnix(t, sock, api.Handler(sc, api.NewMetrics()))
				}
			}()
			defer func() { <-restarted }()
			code, stdout, stderr := runCLI(map[string]string{envAPIAddress: sock}, "wait", sample().ID)
			if code != tc.code {
				t.Errorf("exit %d, want %d (stderr %q)", code, tc.code, stderr)
			}
			for _, s := range tc.lines {
				if !strings.Contains(stdout, s) {
					t.Errorf("stdout lacks %q:\n%s", s, stdout)
				}
			}
			if !tc.back && !strings.Contains(stderr, "seamlessctl: cannot reach the seamless daemon API") {
				t.Errorf("stderr %q", stderr)
			}
		})
	}
}

func TestProgressLine(t *testing.T) {
	const mib = 1 << 20
	for _, tc := range []struct {
		name  string
		label string
		p     snapshotter.Progress
		rate  float64
		width int
		want  string
	}{
		{"80 columns", "pushing", snapshotter.Progress{Done: 12 * mib, Total: 40 * mib}, 2.25 * mib, 80,
			"pushing    [=======>                  ]  12.0 MiB / 40.0 MiB  30%  2.2 MiB/s"},
		{"80 columns, no rate yet: the same bar", "pushing", snapshotter.Progress{Done: 12 * mib, Total: 40 * mib}, 0, 80,
			"pushing    [=======>                  ]  12.0 MiB / 40.0 MiB  30%"},
		{"wide: the bar stops growing", "pushing", snapshotter.Progress{Done: 12 * mib, Total: 40 * mib}, 0, 200,
			"pushing    [============>                           ]  12.0 MiB / 40.0 MiB  30%"},
		{"narrow: the shortest bar", "converting", snapshotter.Progress{Done: 1, Total: 2}, 0, 54,
			"converting [=====>    ]  1 B / 2 B  50%"},
		{"too narrow for a bar", "converting", snapshotter.Progress{Done: 1, Total: 2}, 0, 53,
			"converting  1 B / 2 B  50%"},
		{"too narrow for the stats", "converting", snapshotter.Progress{Done: 1, Total: 2}, 0, 20,
			"converting  1 B / 2…"},
		{"one column", "pushing", snapshotter.Progress{Done: 1, Total: 2}, 0, 1, "…"},
		{"no columns", "pushing", snapshotter.Progress{Done: 1, Total: 2}, 0, 0, ""},
		{"zero total: no bar, no percent", "converting", snapshotter.Progress{Done: 3 * mib}, 1024, 80,
			"converting  3.0 MiB  1.0 KiB/s"},
		{"nothing yet", "pushing", snapshotter.Progress{}, 0, 80, "pushing"},
		{"nothing done of a total", "pushing", snapshotter.Progress{Total: 100}, 0, 60,
			"pushing    [>           ]  0 B / 100 B  0%"},
		{"done", "pushing", snapshotter.Progress{Done: 100, Total: 100}, 0, 60,
			"pushing    [============]  100 B / 100 B  100%"},
		{"done beyond the total", "pushing", snapshotter.Progress{Done: 150, Total: 100}, 0, 60,
			"pushing    [============]  150 B / 100 B  100%"},
		{"negative done", "pushing", snapshotter.Progress{Done: -5, Total: 100}, 0, 60,
			"pushing    [>           ]  0 B / 100 B  0%"},
		{"long label", "importing (attempt 3)", snapshotter.Progress{Done: 1, Total: 4}, 0, 70,
			"importing (attempt 3) [===>           ]  1 B / 4 B  25%"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := progressLine(tc.label, tc.p, tc.rate, tc.width)
			if got != tc.want {
				t.Errorf("progressLine(%q, %+v, %v, %d) =\n%q, want\n%q", tc.label, tc.p, tc.rate, tc.width, got, tc.want)
			}
			if n := utf8.RuneCountInString(got); n > max(tc.width, 0) {
				t.Errorf("%d columns, more than %d", n, tc.width)
			}
		})
	}
}

func TestRateMeter(t *testing.T) {
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	var m rateMeter
	for _, tc := range []struct {
		state   string
		attempt int
		at      time.Duration
		done    int64
		want    float64
	}{
		{"converting", 1, 0, 0, 0},
		{"converting", 1, 200 * time.Millisecond, 100, 0}, // too soon to tell
		{"converting", 1, time.Second, 1000, 1000},
		{"converting", 1, 2 * time.Second, 3000, 1500},
		{"converting", 1, 2500 * time.Millisecond, 3000, 1200}, // stalled
		{"converting", 1, 7 * time.Second, 8000, 1000},         // 3000 at 2s .. 8000 at 7s
		{"converting", 1, 8 * time.Second, 14000, 2000},        // the window moved on: from 3000 at 2.5s
		{"pushing", 1, 9 * time.Second, 0, 0},                  // a new phase
		{"pushing", 1, 10 * time.Second, 4000, 4000},
		{"pushing", 2, 11 * time.Second, 500, 0}, // a new attempt
		{"pushing", 2, 12 * time.Second, 100, 0}, // went back: start over
		{"pushing", 2, 13 * time.Second, 2100, 2000},
	} {
		if got := m.add(tc.state, tc.attempt, tc.done, t0.Add(tc.at)); got != tc.want {
			t.Errorf("at %v, %d bytes: rate %v, want %v", tc.at, tc.done, got, tc.want)
		}
	}
}
