//go:build linux

package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// formatBytes formats a size in binary units: "512 B", "4.0 KiB".
func formatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// formatPause is the time the container was frozen, in milliseconds, or
// "-" when nothing was frozen (yet).
func formatPause(c api.Commit) string {
	if !c.Frozen {
		return "-"
	}
	return fmt.Sprintf("%.2f ms", c.PauseMillis)
}

// formatCaptured is the size of the captured layer, or "-" while there is
// none.
func formatCaptured(c api.Commit) string {
	if c.State == snapshotter.StateCapturing || c.CapturedAt.IsZero() {
		return "-"
	}
	entries := "entries"
	if c.CaptureEntries == 1 {
		entries = "entry"
	}
	return fmt.Sprintf("%d %s, %s", c.CaptureEntries, entries, formatBytes(c.CaptureBytes))
}

// percent is how much of p is done, in whole percent rounded down and at
// most 100, or -1 while the total is not known.
func percent(p snapshotter.Progress) int {
	switch {
	case p.Total <= 0:
		return -1
	case p.Done >= p.Total:
		return 100
	case p.Done <= 0:
		return 0
	}
	return int(float64(p.Done) * 100 / float64(p.Total))
}

// formatProgress is the bytes done of a phase, and of how many with the
// percentage when the total is known: "12.0 MiB / 40.0 MiB  30%". It is
// "" when there is nothing to show.
func formatProgress(p snapshotter.Progress) string {
	switch {
	case p.Total > 0:
		return fmt.Sprintf("%s / %s  %d%%", formatBytes(max(p.Done, 0)), formatBytes(p.Total), percent(p))
	case p.Done > 0:
		return formatBytes(p.Done)
	}
	return ""
}

// formatRate is a transfer rate: "2.2 MiB/s", or "" when unknown.
func formatRate(bytesPerSecond float64) string {
	if bytesPerSecond < 1 {
		return ""
	}
	return formatBytes(int64(bytesPerSecond)) + "/s"
}

// hasProgress reports whether a commit is in a state that counts bytes.
func hasProgress(c api.Commit) bool {
	return c.State == snapshotter.StateConverting || c.State == snapshotter.StatePushing
}

// retrying reports whether a commit's job failed transiently and waits to
// run again.
func retrying(c api.Commit, now time.Time) bool {
	return c.Error != "" && !c.State.Terminal() && c.NextAttempt.After(now)
}

// formatError is a commit's error with its code: "[REGISTRY_AUTH] ...".
func formatError(c api.Commit) string {
	if c.ErrorCode == "" {
		return c.Error
	}
	return "[" + c.ErrorCode + "] " + c.Error
}

// formatIn is a wait still to come, in whole seconds rounded up: "4s",
// "1m30s".
func formatIn(d time.Duration) string {
	if d <= 0 {
		return "0s"
	}
	return ((d + time.Second - 1) / time.Second * time.Second).String()
}

// retryText describes a job waiting to retry: "retrying (attempt 2 in
// 4s): [REGISTRY_UNREACHABLE] ...".
func retryText(c api.Commit, now time.Time) string {
	return fmt.Sprintf("retrying (attempt %d in %s): %s", c.Attempts+1, formatIn(c.NextAttempt.Sub(now)), formatError(c))
}

// stateLabel names a commit's state for progress displays: "importing"
// for the push of a --local commit, and the attempt once it is not the
// first.
func stateLabel(c api.Commit) string {
	label := string(c.State)
	if c.State == snapshotter.StatePushing && c.Local {
		label = "importing"
	}
	if c.Attempts > 1 && !c.State.Terminal() {
		label += fmt.Sprintf(" (attempt %d)", c.Attempts)
	}
	return label
}

// shortDigest is a digest cut to 12 hex digits, as docker shows image IDs:
// "sha256:0123456789ab"; "-" when there is none.
func shortDigest(d string) string {
	if d == "" {
		return "-"
	}
	algo, hex, ok := strings.Cut(d, ":")
	if !ok || len(hex) <= 12 {
		return d
	}
	return algo + ":" + hex[:12]
}

// formatTime is an instant as RFC 3339, in the zone it was recorded in.
func formatTime(t time.Time) string {
	return t.Format(time.RFC3339)
}

// writeCommit prints a new commit for people; with hint, a last row tells
// how to follow the job.
func writeCommit(w io.Writer, c api.Commit, hint bool) error {
	pause := formatPause(c)
	if !c.Frozen {
		pause = "0.00 ms (no process used the container's rootfs: nothing to freeze)"
	}
	rows := [][2]string{
		{"commit", c.ID},
		{"target", c.Target},
		{"pause", pause},
		{"strategy", c.Strategy},
		{"captured", formatCaptured(c)},
		{"state", string(c.State)},
	}
	if hint && !c.State.Terminal() {
		rows = append(rows, [2]string{"follow", "seamlessctl wait " + c.ID})
	}
	return writeRows(w, rows)
}

// writeRows prints "key  value" rows, aligned; an empty value shows as
// "-", so that every row has two fields.
func writeRows(w io.Writer, rows [][2]string) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, row := range rows {
		if row[1] == "" {
			row[1] = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\n", row[0], row[1])
	}
	return tw.Flush()
}

// writeDetail prints everything about one commit for people, one
// "key  value" row each; rows that do not apply are left out.
func writeDetail(w io.Writer, c api.Commit, now time.Time) error {
	publish := "push to the registry"
	if c.Local {
		publish = "import into containerd's image store on this node (--local)"
	}
	rows := [][2]string{
		{"commit", c.ID},
		{"snapshot", c.SnapshotKey},
		{"target", c.Target},
		{"publish", publish},
		{"state", string(c.State)},
	}
	add := func(k, v string) { rows = append(rows, [2]string{k, v}) }
	if hasProgress(c) {
		if p := formatProgress(c.Progress); p != "" {
			add("progress", p)
		}
	}
	add("pause", formatPause(c))
	add("strategy", c.Strategy)
	add("captured", formatCaptured(c))
	switch {
	case c.CaptureRemoved && c.CaptureDiskBytes > 0:
		add("capture", fmt.Sprintf("removed (it used %s on disk)", formatBytes(c.CaptureDiskBytes)))
	case c.CaptureRemoved:
		add("capture", "removed")
	case c.CaptureDiskBytes > 0:
		add("capture", formatBytes(c.CaptureDiskBytes)+" on disk")
	}
	switch {
	case c.Compression != "" && c.CompressionLevel != 0:
		add("compression", fmt.Sprintf("%s, level %d", c.Compression, c.CompressionLevel))
	case c.Compression != "":
		add("compression", c.Compression)
	case c.CompressionLevel != 0:
		add("compression", fmt.Sprintf("level %d", c.CompressionLevel))
	}
	if b := c.Base; b != nil {
		base := b.Name
		if b.Digest != "" {
			base += "@" + string(b.Digest)
		}
		add("base", base)
	}
	if n := len(c.Layers); n > 0 {
		last := c.Layers[n-1]
		layer := fmt.Sprintf("%d, last %s (%s", n, last.Digest, formatBytes(last.Size))
		if last.Squashed {
			layer += ", squashed"
		}
		add("layers", layer+")")
	}
	if c.ImageDigest != "" {
		add("digest", string(c.ImageDigest))
	}
	if c.Attempts > 0 {
		attempts := strconv.Itoa(c.Attempts)
		if !c.State.Terminal() && c.NextAttempt.After(now) {
			attempts += fmt.Sprintf(", next in %s (%s)", formatIn(c.NextAttempt.Sub(now)), formatTime(c.NextAttempt))
		}
		add("attempts", attempts)
	}
	if c.Error != "" {
		e := formatError(c)
		if !c.State.Terminal() {
			e += " (will be retried)"
		}
		add("error", e)
	}
	add("created", formatTime(c.CreatedAt))
	if !c.FinishedAt.IsZero() {
		add("finished", formatTime(c.FinishedAt))
	}
	return writeRows(w, rows)
}

// formatProgressCell is the PROGRESS cell of a commit in a table.
func formatProgressCell(c api.Commit, now time.Time) string {
	switch {
	case retrying(c, now):
		return fmt.Sprintf("retry %d in %s", c.Attempts+1, formatIn(c.NextAttempt.Sub(now)))
	case c.State == snapshotter.StateDone:
		return "100%"
	case !hasProgress(c):
		return "-"
	case c.Progress.Total > 0:
		return fmt.Sprintf("%d%%", percent(c.Progress))
	case c.Progress.Done > 0:
		return formatBytes(c.Progress.Done)
	}
	return "0%"
}

// writeTable prints commits as a table, and the errors of failed or
// retrying ones below it.
func writeTable(w io.Writer, commits []api.Commit, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSTATE\tPROGRESS\tTARGET\tDIGEST\tPAUSE\tSTRATEGY\tCAPTURED")
	for _, c := range commits {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", c.ID, c.State, formatProgressCell(c, now), c.Target,
			shortDigest(string(c.ImageDigest)), formatPause(c), c.Strategy, formatCaptured(c))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, c := range commits {
		switch {
		case c.Error == "":
		case c.State.Terminal():
			fmt.Fprintf(w, "%s: %s\n", c.ID, formatError(c))
		default:
			fmt.Fprintf(w, "%s: %s (will be retried)\n", c.ID, formatError(c))
		}
	}
	return nil
}

// writeJSON prints an answer of the API as it came, indented.
func writeJSON(w io.Writer, raw []byte) error {
	var b bytes.Buffer
	if err := json.Indent(&b, bytes.TrimSpace(raw), "", "  "); err != nil {
		return err
	}
	b.WriteByte('\n')
	_, err := w.Write(b.Bytes())
	return err
}
