//go:build linux

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	containerd "github.com/containerd/containerd/v2/client"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/harness"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

const (
	// apiTimeout bounds one API request; a capture answers within the
	// pause budget plus the pre-copy.
	apiTimeout = 10 * time.Second
	// writerPeriod is the writer's sleep between two writes, and maxGap
	// the longest wait between two writes that still counts as "kept
	// running": the period plus a margin for a loaded machine and the
	// 10 ms resolution of the timestamps.
	writerPeriod = 100 * time.Millisecond
	maxGap       = writerPeriod + 150*time.Millisecond
)

// apiClient talks HTTP to the daemon's API socket.
type apiClient struct {
	sock string
	http *http.Client
}

func newAPIClient(sock string) *apiClient {
	return &apiClient{sock: sock, http: &http.Client{Transport: &http.Transport{
		// One connection per request: the daemon restarts under us.
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
	}}}
}

// do sends a request and decodes a successful answer into out; an API
// error becomes an error with its code.
func (c *apiClient) do(ctx context.Context, method, path string, body, out any) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return 0, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://seamless"+path, rd)
	if err != nil {
		return 0, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, fmt.Errorf("%s %s on %s: %w", method, path, c.sock, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, fmt.Errorf("%s %s: %w", method, path, err)
	}
	if resp.StatusCode >= 300 {
		var apiErr api.Error
		if json.Unmarshal(data, &apiErr) == nil && apiErr.Error.Code != "" {
			return resp.StatusCode, fmt.Errorf("%s %s: %d %s: %s", method, path, resp.StatusCode, apiErr.Error.Code, apiErr.Error.Message)
		}
		return resp.StatusCode, fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, bytes.TrimSpace(data))
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return resp.StatusCode, fmt.Errorf("%s %s: %v: %s", method, path, err, data)
		}
	}
	return resp.StatusCode, nil
}

// commitByAPI asks the daemon's API for a commit of the writer and shows
// what it captured.
func (d *demo) commitByAPI() {
	req := api.CommitRequest{
		Namespace: d.env.Containerd.Namespace(),
		Container: d.writer,
		Target:    d.env.Registry.Ref("demo/committed:v1"),
	}
	var rec api.Commit
	var before, after float64
	var status int
	d.step("seamless commit (API)", func() (string, error) {
		before = hostUptime()
		var err error
		status, err = d.api.do(d.ctx, "POST", "/api/v1/commits", req, &rec)
		after = hostUptime()
		if err != nil {
			return "", err
		}
		if err := checkCaptured(rec); err != nil {
			return "", err
		}
		return fmt.Sprintf("commit %s, paused %s", rec.ID, fmtPause(rec)), nil
	})
	body, _ := json.Marshal(req)
	d.show(fmt.Sprintf("POST /api/v1/commits %s\n→ %d %s", body, status, http.StatusText(status)))
	d.showCommit(rec)
	d.checkCapture("API", rec, before, after)
}

// commitByLabel asks for a commit with a label on the writer's snapshot,
// as ctr (or any containerd client) can, and follows it in the API.
func (d *demo) commitByLabel() {
	target := d.env.Registry.Ref("demo/committed:v2")
	label := snapshotter.LabelCommit + "=" + target
	var rec api.Commit
	var before, after float64
	var labelled time.Duration
	d.step("seamless commit (label)", func() (string, error) {
		start := time.Now()
		before = hostUptime()
		if _, err := d.env.Ctr(d.ctx, "snapshots", "--snapshotter", sn, "label", d.writer, label); err != nil {
			return "", err
		}
		labelled = time.Since(start)
		// The label only starts the capture: poll the API for the commit
		// that is not one of ours yet.
		ctx, cancel := context.WithTimeout(d.ctx, apiTimeout)
		defer cancel()
		var found bool
		err := harness.WaitFor(ctx, 10*time.Millisecond, func(ctx context.Context) (bool, error) {
			var list struct{ Commits []api.Commit }
			if _, err := d.api.do(ctx, "GET", "/api/v1/commits?container="+url.QueryEscape(d.writer), nil, &list); err != nil {
				return false, err
			}
			for _, c := range list.Commits {
				if !d.known(c.ID) {
					rec, found = c, true
				}
			}
			return found && rec.State != snapshotter.StateCapturing, nil
		})
		after = hostUptime()
		if err != nil {
			if !found {
				return "", fmt.Errorf("no commit appeared after the label: %w", err)
			}
			return "", fmt.Errorf("commit %s still %s: %w", rec.ID, rec.State, err)
		}
		if err := checkCaptured(rec); err != nil {
			return "", err
		}
		return fmt.Sprintf("commit %s, paused %s", rec.ID, fmtPause(rec)), nil
	})
	d.show(fmt.Sprintf("ctr snapshots --snapshotter %s label %s %s\n"+
		"→ ctr returned in %s, the daemon captured in the background; GET /api/v1/commits?container=%s",
		sn, d.writer, label, fmtDuration(labelled), d.writer))
	d.showCommit(rec)
	d.checkCapture("label", rec, before, after)
}

func (d *demo) known(id string) bool {
	for _, c := range d.commits {
		if c.rec.ID == id {
			return true
		}
	}
	return false
}

// checkCaptured fails a commit that did not capture a frozen container.
func checkCaptured(rec api.Commit) error {
	switch {
	case rec.State == snapshotter.StateFailed:
		return fmt.Errorf("commit %s failed: %s: %s", rec.ID, rec.ErrorCode, rec.Error)
	case rec.State == snapshotter.StateCapturing:
		return fmt.Errorf("commit %s is still %q", rec.ID, rec.State)
	case !rec.Frozen:
		return fmt.Errorf("commit %s froze nothing: the daemon found no process using the container's snapshot", rec.ID)
	case rec.CapturedAt.IsZero():
		return fmt.Errorf("commit %s has no capture instant", rec.ID)
	}
	return nil
}

func (d *demo) showCommit(rec api.Commit) {
	d.show(fmt.Sprintf("strategy %s: %s while it ran, then frozen %s for the final round\n"+
		"captured %s at %s, %s copied in all rounds\n"+
		"state %s: captured; the image is built and pushed in the background",
		rec.Strategy, plural(rec.PreCopyRounds, "pre-copy round"), fmtPause(rec),
		plural(int(rec.CaptureEntries), "entry"), rec.CapturedAt.Local().Format("15:04:05.000"), fmtBytes(rec.CaptureBytes),
		rec.State))
}

// checkCapture checks the capture of rec against the live log and the
// writer's timestamps: the capture is a consistent prefix of the log
// ending before the capture instant, the log went on growing, and no wait
// between two writes around the commit (uptimes before to after) was
// longer than maxGap.
func (d *demo) checkCapture(how string, rec api.Commit, before, after float64) {
	path := filepath.Join(d.env.Daemon.Root(), "captures", rec.ID, "fs", logFile)
	var captured, live []write
	var capturedUp float64
	var detail string
	d.step("capture is point-in-time", func() (string, error) {
		data, err := os.ReadFile(path)
		if err != nil {
			return "", err
		}
		if len(data) == 0 || data[len(data)-1] != '\n' {
			return "", fmt.Errorf("%s ends with a partial line: %q", path, data[bytes.LastIndexByte(data, '\n')+1:])
		}
		if captured, err = parseWrites(data); err != nil {
			return "", fmt.Errorf("%s: %w", path, err)
		}
		if err := consecutive(captured); err != nil {
			return "", fmt.Errorf("%s: %w", path, err)
		}
		last := captured[len(captured)-1]
		// The capture instant on the writer's clock: uptime now minus the
		// time since then.
		capturedUp = hostUptime() - time.Since(rec.CapturedAt).Seconds()
		// /proc/uptime has a 10 ms resolution.
		if last.uptime > capturedUp+0.03 {
			return "", fmt.Errorf("the capture's last line %q is later than the capture (%.2fs)", last.text, capturedUp)
		}
		if prev := d.lastCommit(); prev != nil && last.n <= prev.last {
			return "", fmt.Errorf("capture ends at write %d, not after the previous commit's %d", last.n, prev.last)
		}
		// The live log, once it has a write after the commit answered.
		if live, err = d.waitForWritesAfter(after); err != nil {
			return "", err
		}
		if len(live) <= len(captured) {
			return "", fmt.Errorf("the live log has %d lines, the capture %d", len(live), len(captured))
		}
		for i, w := range captured {
			if live[i].text != w.text {
				return "", fmt.Errorf("line %d: capture %q, live log %q", i+1, w.text, live[i].text)
			}
		}
		rel, _ := filepath.Rel(d.env.Daemon.Root(), path)
		detail = fmt.Sprintf("<daemon root>/%s: writes 1..%d, every line whole", rel, last.n)
		return detail, nil
	})
	last := captured[len(captured)-1]
	d.show(fmt.Sprintf("its last line %q was written before the capture instant (≈%.2fs, same clock)\n"+
		"the live %s: the same %s, then on to write %d (it keeps growing)",
		last.text, capturedUp, logFile, plural(len(captured), "line"), live[len(live)-1].n))

	var gapInfo string
	var gap float64
	d.step("container kept running", func() (string, error) {
		if err := d.stillRunning(); err != nil {
			return "", err
		}
		if err := consecutive(live); err != nil {
			return "", err
		}
		var during int
		gap, during = longestGap(live, before, after)
		gapInfo = fmt.Sprintf("%s while the commit was served (%.2f s); longest wait between two writes around it %.2f s (period %.2f s)",
			plural(during, "write"), after-before, gap, writerPeriod.Seconds())
		if gap > maxGap.Seconds() {
			return "", fmt.Errorf("the writer waited %.2f s between two writes around the commit (more than %v)", gap, maxGap)
		}
		return fmt.Sprintf("same pid %d, no wait between two writes over %.2f s", d.pids["container"], maxGap.Seconds()), nil
	})
	d.show(gapInfo)
	d.commits = append(d.commits, commitRun{how: how, rec: rec, last: last.n, gap: gap})
}

// longestGap returns the longest interval between two consecutive writes
// that overlaps [before, after], and the number of writes within it.
func longestGap(writes []write, before, after float64) (float64, int) {
	longest, during := 0.0, 0
	for i, w := range writes {
		if w.uptime >= before && w.uptime <= after {
			during++
		}
		if i > 0 && w.uptime >= before && writes[i-1].uptime <= after {
			longest = max(longest, w.uptime-writes[i-1].uptime)
		}
	}
	return longest, during
}

// consecutive checks that writes are numbered 1, 2, 3...
func consecutive(writes []write) error {
	for i, w := range writes {
		if w.n != i+1 {
			return fmt.Errorf("line %d is write %d: the writer restarted or lines were lost", i+1, w.n)
		}
	}
	return nil
}

// waitForWritesAfter waits until the live log has a write stamped after
// uptime up, and returns it.
func (d *demo) waitForWritesAfter(up float64) ([]write, error) {
	ctx, cancel := context.WithTimeout(d.ctx, 10*time.Second)
	defer cancel()
	var writes []write
	err := harness.WaitFor(ctx, 20*time.Millisecond, func(context.Context) (bool, error) {
		var err error
		writes, err = d.readWrites()
		return err == nil && writes[len(writes)-1].uptime > up, err
	})
	if err != nil {
		return nil, fmt.Errorf("no write after %.2fs in the live log: %w", up, err)
	}
	return writes, nil
}

// stillRunning checks that the writer's task runs with the pid it started
// with.
func (d *demo) stillRunning() error {
	task, err := d.task()
	if err != nil {
		return err
	}
	status, err := task.Status(d.ctx)
	if err != nil {
		return err
	}
	if status.Status != containerd.Running {
		return fmt.Errorf("task %s is %s", d.writer, status.Status)
	}
	if int(task.Pid()) != d.pids["container"] {
		return fmt.Errorf("task pid changed from %d to %d", d.pids["container"], task.Pid())
	}
	return nil
}

func (d *demo) lastCommit() *commitRun {
	if len(d.commits) == 0 {
		return nil
	}
	return &d.commits[len(d.commits)-1]
}

// commitsSurvived shows that the daemon, restarted, still lists the
// commits and keeps their captures.
func (d *demo) commitsSurvived() {
	var list struct{ Commits []api.Commit }
	d.step("commits after the restart", func() (string, error) {
		// The API socket is ready with the gRPC socket the restart waited
		// for; retry a refused connection anyway.
		ctx, cancel := context.WithTimeout(d.ctx, apiTimeout)
		defer cancel()
		var lastErr error
		err := harness.WaitFor(ctx, 50*time.Millisecond, func(ctx context.Context) (bool, error) {
			_, lastErr = d.api.do(ctx, "GET", "/api/v1/commits", nil, &list)
			if lastErr != nil && (errors.Is(lastErr, syscall.ECONNREFUSED) || errors.Is(lastErr, syscall.ENOENT)) {
				return false, nil
			}
			return true, lastErr
		})
		if err != nil {
			return "", errors.Join(err, lastErr)
		}
		byID := map[string]api.Commit{}
		for _, c := range list.Commits {
			byID[c.ID] = c
		}
		for _, want := range d.commits {
			got, ok := byID[want.rec.ID]
			if !ok {
				return "", fmt.Errorf("commit %s is missing from GET /api/v1/commits", want.rec.ID)
			}
			if got.State == snapshotter.StateFailed || !got.CapturedAt.Equal(want.rec.CapturedAt) {
				return "", fmt.Errorf("commit %s was captured at %v, is now %s (%s) captured at %v",
					got.ID, want.rec.CapturedAt, got.State, got.Error, got.CapturedAt)
			}
		}
		return fmt.Sprintf("GET /api/v1/commits lists %s, none lost", plural(len(d.commits), "commit")), nil
	})
	var b strings.Builder
	w := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tSTATE\tPAUSE\tENTRIES\tTARGET\tIMAGE")
	for _, c := range list.Commits {
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\t%s\n", c.ID, c.State, fmtPause(c), c.CaptureEntries, c.Target, shortDigest(c.ImageDigest.String()))
	}
	w.Flush()
	d.show(b.String())
}

// commitRun is a commit the demo made, for the summary.
type commitRun struct {
	how  string // "API" or "label"
	rec  api.Commit
	last int     // the last write in its capture
	gap  float64 // longest wait between two writes around it, seconds
}

// pushed returns the tags the private registry holds of repo, from its
// API (GET /v2/<repo>/tags/list); none if the repository does not exist.
// The registry runs until the cleanups, so a Ctrl-C does not cancel this
// one quick request.
func (d *demo) pushed(repo string) ([]string, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(d.ctx), 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+d.env.Registry.Addr()+"/v2/"+repo+"/tags/list", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var tags struct{ Tags []string }
	switch resp.StatusCode {
	case http.StatusNotFound:
		return nil, nil
	case http.StatusOK:
		err := json.NewDecoder(resp.Body).Decode(&tags)
		return tags.Tags, err
	}
	return nil, errors.New(resp.Status)
}

func fmtPause(rec api.Commit) string {
	return fmt.Sprintf("%.2f ms", rec.PauseMillis)
}
