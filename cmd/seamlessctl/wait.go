//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
	"unicode/utf8"

	"golang.org/x/term"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

const waitUsage = `Usage: seamlessctl wait [options] <commit-id>

Wait for a commit's image: follow the daemon's job through pending,
converting and pushing until the commit is done or failed.

On a terminal a progress bar is redrawn in place: the state, the bytes
done of the current phase and their total, the percentage and the rate.
Otherwise one line is printed per state change, and progress at most every
5 seconds. A job that failed transiently and will run again shows as
"retrying (attempt N in ...): <error>". When the commit is done, the last
line is

  done: <target>@<digest>

When it failed, its error code and message are printed on stderr, and the
exit code is 5 if the registry failed or could not be reached (REGISTRY_AUTH,
REGISTRY_UNREACHABLE, REGISTRY_ERROR, PUSH_FAILED; also
CONTAINERD_UNREACHABLE), else 1. Interrupting wait (Ctrl-C) or its timeout
does not stop the job.

Options:
  --timeout DUR         give up after DUR, e.g. 10m, with exit code 1 and a
                        message naming the commit and its state; the job
                        keeps running (default: no timeout)
  -o, --output FORMAT   text, or json for the commit's final record (progress
                        then goes to stderr, and only on a terminal)
  --api-address PATH    the global option, here or before the command

Examples:
  seamlessctl wait lz9k2x1a-4f0c2b7a9e3d1c55
  seamlessctl wait --timeout 10m lz9k2x1a-4f0c2b7a9e3d1c55 || echo "not published (exit $?)"
  seamlessctl wait -o json lz9k2x1a-4f0c2b7a9e3d1c55 | jq -r .image_digest
  seamlessctl wait lz9k2x1a-4f0c2b7a9e3d1c55 | sed -n 's/^done: //p'
`

func runWait(ctx context.Context, c *cli, args []string) error {
	fs := newFlagSet("wait")
	c.register(fs)
	timeout := fs.Duration("timeout", 0, "")
	output := outputFlag(fs)
	args, err := parseCommand(fs, args, 1, "one commit ID")
	if err != nil {
		return err
	}
	if *timeout < 0 {
		return usageErrorf("wait: --timeout %v must be positive", *timeout)
	}
	return c.follow(ctx, newAPIClient(c.apiAddress), args[0], *timeout, *output)
}

// Timings of wait; variables so that tests can shorten them.
var (
	// pollInterval is how often wait asks for the commit: the API has no
	// long poll.
	pollInterval = 200 * time.Millisecond
	// plainProgressEvery is how often plain output reports progress
	// within one state.
	plainProgressEvery = 5 * time.Second
	// daemonRestartGrace is how long wait keeps asking a daemon it cannot
	// reach any more: a restarted daemon resumes its jobs.
	daemonRestartGrace = 30 * time.Second
)

// terminalWidth reports whether w is a terminal, and its width; a
// variable so that tests can pretend.
var terminalWidth = func(w io.Writer) (int, bool) {
	f, ok := w.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return 0, false
	}
	width, _, err := term.GetSize(int(f.Fd()))
	if err != nil || width <= 0 {
		width = 80
	}
	return width, true
}

// follow waits for a commit's job to end, showing its progress, and
// prints the result: "done: <target>@<digest>", or with output json the
// final record. A failed job is a *jobFailedError.
func (c *cli) follow(ctx context.Context, client *apiClient, id string, timeout time.Duration, output string) error {
	var rep reporter = nopReporter{}
	switch {
	case output == "json":
		// stdout is the record alone; people watching get a bar on stderr.
		if _, ok := terminalWidth(c.stderr); ok {
			rep = newBarReporter(c.stderr)
		}
	default:
		if _, ok := terminalWidth(c.stdout); ok {
			rep = newBarReporter(c.stdout)
		} else {
			rep = newLineReporter(c.stdout, time.Now())
		}
	}
	rec, raw, err := waitCommit(ctx, client, id, timeout, rep)
	rep.finish()
	if err != nil {
		return err
	}
	if output == "json" {
		if err := writeJSON(c.stdout, raw); err != nil {
			return err
		}
	} else if rec.State == snapshotter.StateDone {
		fmt.Fprintf(c.stdout, "done: %s@%s\n", rec.Target, rec.ImageDigest)
	}
	if rec.State == snapshotter.StateFailed {
		return &jobFailedError{id: rec.ID, code: rec.ErrorCode, message: rec.Error}
	}
	return nil
}

// errWaitTimeout is the cause of a wait that reached its --timeout.
var errWaitTimeout = errors.New("wait timeout")

// waitCommit polls a commit until it is done or failed, and returns its
// last record, also raw. It gives up when ctx ends, or after timeout when
// it is not 0.
func waitCommit(ctx context.Context, client *apiClient, id string, timeout time.Duration, rep reporter) (api.Commit, []byte, error) {
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(ctx, timeout, errWaitTimeout)
		defer cancel()
	}
	var (
		last        api.Commit
		seen        bool
		unreachable time.Time // since when the daemon cannot be reached
	)
	for {
		rec, raw, err := client.getCommit(ctx, id)
		now := time.Now()
		switch {
		case err == nil:
			last, seen, unreachable = rec, true, time.Time{}
			rep.update(rec, now)
			if rec.State.Terminal() {
				return rec, raw, nil
			}
		case ctx.Err() != nil:
			return last, nil, stoppedWaiting(ctx, id, timeout, last, seen)
		case seen && daemonGone(err):
			if unreachable.IsZero() {
				unreachable = now
				rep.note(fmt.Sprintf("the daemon cannot be reached; trying again for %s: %s", daemonRestartGrace, errorLine(err)), now)
			}
			if now.Sub(unreachable) >= daemonRestartGrace {
				return last, nil, err
			}
		default:
			return last, nil, err
		}
		select {
		case <-ctx.Done():
			return last, nil, stoppedWaiting(ctx, id, timeout, last, seen)
		case <-time.After(pollInterval):
		}
	}
}

// daemonGone reports whether err is a daemon API socket that cannot be
// dialled for a reason other than permissions, as while it restarts.
func daemonGone(err error) bool {
	var conn *connError
	return errors.As(err, &conn) && !conn.permission()
}

// stoppedWaiting is the error of a wait that ended before the job: its
// timeout, or an interruption.
func stoppedWaiting(ctx context.Context, id string, timeout time.Duration, last api.Commit, seen bool) error {
	state := "unknown"
	if seen {
		state = string(last.State)
		switch p := last.Progress; {
		case !hasProgress(last):
		case p.Total > 0:
			state += fmt.Sprintf(", %d%% of %s", percent(p), formatBytes(p.Total))
		case p.Done > 0:
			state += ", " + formatBytes(p.Done)
		}
	}
	why := "interrupted while waiting"
	if context.Cause(ctx) == errWaitTimeout {
		why = fmt.Sprintf("timed out after %s waiting", timeout)
	}
	return fmt.Errorf("%s for commit %s (state %s); the job keeps running: follow it with 'seamlessctl wait %s'", why, id, state, id)
}

// reporter shows a job's progress while wait polls it.
type reporter interface {
	// update is given every record polled.
	update(c api.Commit, now time.Time)
	// note tells of something other than the record.
	note(msg string, now time.Time)
	// finish ends the display before the result is printed.
	finish()
}

type nopReporter struct{}

func (nopReporter) update(api.Commit, time.Time) {}
func (nopReporter) note(string, time.Time)       {}
func (nopReporter) finish()                      {}

// lineReporter prints plain lines, for logs and pipes: one per state
// change (a retry included), and progress at most every
// plainProgressEvery, each prefixed with the time since wait started.
type lineReporter struct {
	w      io.Writer
	start  time.Time
	rate   rateMeter
	phase  string    // what was last reported: state, attempt, error
	shown  string    // the progress last shown
	lastAt time.Time // when a line was last printed
}

func newLineReporter(w io.Writer, start time.Time) *lineReporter {
	return &lineReporter{w: w, start: start}
}

func (r *lineReporter) print(now time.Time, text string) {
	fmt.Fprintf(r.w, "%7s  %s\n", formatElapsed(now.Sub(r.start)), text)
	r.lastAt = now
}

func (r *lineReporter) update(c api.Commit, now time.Time) {
	rate := r.rate.add(string(c.State), c.Attempts, c.Progress.Done, now)
	if c.State.Terminal() {
		return // the result follows
	}
	phase := fmt.Sprintf("%s|%d|%s|%t", c.State, c.Attempts, c.Error, retrying(c, now))
	progress := ""
	if hasProgress(c) {
		progress = formatProgress(c.Progress)
	}
	switch {
	case phase != r.phase && retrying(c, now):
		r.print(now, retryText(c, now))
	case phase != r.phase:
		r.print(now, joinNonEmpty(stateLabel(c), progress, formatRate(rate)))
	case progress != r.shown && now.Sub(r.lastAt) >= plainProgressEvery && !retrying(c, now):
		r.print(now, joinNonEmpty(stateLabel(c), progress, formatRate(rate)))
	default:
		return
	}
	r.phase, r.shown = phase, progress
}

func (r *lineReporter) note(msg string, now time.Time) { r.print(now, msg) }
func (r *lineReporter) finish()                        {}

// barReporter redraws one line in place on a terminal.
type barReporter struct {
	w     io.Writer
	width func() int
	rate  rateMeter
	drawn int // length of the line on screen
}

func newBarReporter(w io.Writer) *barReporter {
	return &barReporter{w: w, width: func() int {
		width, _ := terminalWidth(w)
		return width
	}}
}

// draw replaces the line on screen, without escape sequences: a carriage
// return, and blanks over what is left of a longer line.
func (r *barReporter) draw(line string) {
	n := utf8.RuneCountInString(line)
	fmt.Fprint(r.w, "\r"+line+strings.Repeat(" ", max(r.drawn-n, 0)))
	r.drawn = n
}

func (r *barReporter) update(c api.Commit, now time.Time) {
	rate := r.rate.add(string(c.State), c.Attempts, c.Progress.Done, now)
	if c.State.Terminal() {
		return
	}
	// One column less than the width: some terminals wrap on the last.
	width := r.width() - 1
	switch {
	case retrying(c, now):
		r.draw(truncate(retryText(c, now), width))
	case hasProgress(c):
		r.draw(progressLine(stateLabel(c), c.Progress, rate, width))
	default:
		r.draw(truncate(stateLabel(c), width))
	}
}

func (r *barReporter) note(msg string, _ time.Time) { r.draw(truncate(msg, r.width()-1)) }

func (r *barReporter) finish() {
	if r.drawn > 0 {
		fmt.Fprint(r.w, "\r"+strings.Repeat(" ", r.drawn)+"\r")
		r.drawn = 0
	}
}

// Bar widths: narrower is left out, wider is no easier to read.
const (
	minBar    = 10
	maxBar    = 40
	labelPad  = 10 // "converting"
	statsJoin = "  "
)

// progressLine renders a job's progress in at most width columns: the
// label (the state), a bar of the bytes done of the total, the bytes, the
// percentage and the rate:
//
//	pushing     [=========>          ]  12.0 MiB / 40.0 MiB  30%  2.2 MiB/s
//
// Without a known total there is neither bar nor percentage; more done
// than the total shows a full bar at 100%. When the width is too small the
// bar goes first, then the end of the line is cut.
func progressLine(label string, p snapshotter.Progress, rate float64, width int) string {
	head := fmt.Sprintf("%-*s", labelPad, label)
	stats := joinNonEmpty(formatProgress(p), formatRate(rate))
	line := head
	if p.Total > 0 {
		// head + " [" + bar + "]" + statsJoin + stats, with room for the
		// longest stats of this total, so that the bar keeps its width
		// while the numbers change.
		room := len(formatProgress(snapshotter.Progress{Done: p.Total, Total: p.Total})) + len(statsJoin+"1023.9 MiB/s")
		n := min(width-utf8.RuneCountInString(head)-3-len(statsJoin)-room, maxBar)
		if n >= minBar {
			line += " [" + bar(p, n) + "]"
		}
	}
	if stats != "" {
		line += statsJoin + stats
	}
	return truncate(strings.TrimRight(line, " "), width)
}

// bar draws done of total in n columns: "=====>    ".
func bar(p snapshotter.Progress, n int) string {
	full := n
	if p.Done < p.Total {
		full = int(float64(max(p.Done, 0)) * float64(n) / float64(p.Total))
	}
	if full >= n {
		return strings.Repeat("=", n)
	}
	return strings.Repeat("=", full) + ">" + strings.Repeat(" ", n-full-1)
}

// truncate cuts s to width columns (runes), marking the cut with "…".
func truncate(s string, width int) string {
	if width <= 0 {
		return ""
	}
	if utf8.RuneCountInString(s) <= width {
		return s
	}
	r := []rune(s)
	return string(r[:width-1]) + "…"
}

// joinNonEmpty joins the non-empty parts with two blanks.
func joinNonEmpty(parts ...string) string {
	var out []string
	for _, p := range parts {
		if p != "" {
			out = append(out, p)
		}
	}
	return strings.Join(out, statsJoin)
}

// formatElapsed is a duration for the start of plain lines: "0.4s",
// "1m05s", "2h03m".
func formatElapsed(d time.Duration) string {
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%.1fs", d.Seconds())
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	}
	return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
}

// rateMeter measures the bytes per second of a phase over its last few
// seconds.
type rateMeter struct {
	phase   string
	samples []rateSample
}

type rateSample struct {
	at   time.Time
	done int64
}

// rateWindow is how far back the rate looks.
const rateWindow = 5 * time.Second

// add records the bytes done of a phase (a state and attempt) and returns
// the rate, 0 while unknown. A new phase starts over.
func (m *rateMeter) add(state string, attempt int, done int64, now time.Time) float64 {
	phase := fmt.Sprintf("%s|%d", state, attempt)
	if phase != m.phase || (len(m.samples) > 0 && done < m.samples[len(m.samples)-1].done) {
		m.phase, m.samples = phase, m.samples[:0]
	}
	m.samples = append(m.samples, rateSample{now, done})
	// Keep one sample older than the window, as its start.
	for len(m.samples) > 2 && now.Sub(m.samples[1].at) >= rateWindow {
		m.samples = m.samples[1:]
	}
	first := m.samples[0]
	dt := now.Sub(first.at)
	if dt < 500*time.Millisecond || done <= first.done {
		return 0
	}
	return float64(done-first.done) / dt.Seconds()
}
