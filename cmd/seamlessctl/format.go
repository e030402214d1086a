//go:build linux

package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"

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

// writeCommit prints a new commit for people.
func writeCommit(w io.Writer, c api.Commit) error {
	pause := formatPause(c)
	if !c.Frozen {
		pause = "0.00 ms (no process used the container's rootfs: nothing to freeze)"
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, row := range [][2]string{
		{"commit", c.ID},
		{"target", c.Target},
		{"pause", pause},
		{"strategy", c.Strategy},
		{"captured", formatCaptured(c)},
		{"state", string(c.State)},
	} {
		fmt.Fprintf(tw, "%s\t%s\n", row[0], row[1])
	}
	return tw.Flush()
}

// writeTable prints commits as a table, and the errors of failed ones
// below it.
func writeTable(w io.Writer, commits []api.Commit) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSTATE\tTARGET\tPAUSE\tSTRATEGY\tCAPTURED")
	for _, c := range commits {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", c.ID, c.State, c.Target, formatPause(c), c.Strategy, formatCaptured(c))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, c := range commits {
		switch {
		case c.Error != "" && c.ErrorCode != "":
			fmt.Fprintf(w, "%s: [%s] %s\n", c.ID, c.ErrorCode, c.Error)
		case c.Error != "":
			fmt.Fprintf(w, "%s: %s\n", c.ID, c.Error)
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
