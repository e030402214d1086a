//go:build linux

package main

import (
	"bytes"
	"testing"
	"time"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

func TestFormatBytes(t *testing.T) {
	for _, tc := range []struct {
		n    int64
		want string
	}{
		{0, "0 B"},
		{1023, "1023 B"},
		{1024, "1.0 KiB"},
		{1536, "1.5 KiB"},
		{5<<20 + 600<<10, "5.6 MiB"},
		{3 << 30, "3.0 GiB"},
		{2 << 40, "2.0 TiB"},
		{1 << 62, "4.0 EiB"},
	} {
		if got := formatBytes(tc.n); got != tc.want {
			t.Errorf("formatBytes(%d) = %q, want %q", tc.n, got, tc.want)
		}
	}
}

// sample is a commit as the API shows it after a capture.
func sample() api.Commit {
	at := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	return api.Commit{
		Commit: snapshotter.Commit{
			ID: "m5x0k1a-0123456789abcdef", SnapshotKey: "default/7/web", Target: "localhost:5000/app:v1",
			State: snapshotter.StatePending, Strategy: "reflink", Frozen: true, Pause: 1234567 * time.Nanosecond,
			CapturedAt: at, CaptureBytes: 5<<20 + 600<<10, CaptureEntries: 1234, CreatedAt: at, UpdatedAt: at,
		},
		PauseMillis: 1.234,
	}
}

func TestFormatCells(t *testing.T) {
	notFrozen := sample()
	notFrozen.Frozen, notFrozen.Pause, notFrozen.PauseMillis = false, 0, 0
	capturing := sample()
	capturing.State, capturing.Frozen, capturing.CapturedAt = snapshotter.StateCapturing, false, time.Time{}
	one := sample()
	one.CaptureEntries, one.CaptureBytes = 1, 12
	for _, tc := range []struct {
		name            string
		c               api.Commit
		pause, captured string
	}{
		{"captured", sample(), "1.23 ms", "1234 entries, 5.6 MiB"},
		{"not frozen", notFrozen, "-", "1234 entries, 5.6 MiB"},
		{"capturing", capturing, "-", "-"},
		{"one entry", one, "1.23 ms", "1 entry, 12 B"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := formatPause(tc.c); got != tc.pause {
				t.Errorf("pause %q, want %q", got, tc.pause)
			}
			if got := formatCaptured(tc.c); got != tc.captured {
				t.Errorf("captured %q, want %q", got, tc.captured)
			}
		})
	}
}

func TestWriteCommit(t *testing.T) {
	var b bytes.Buffer
	if err := writeCommit(&b, sample()); err != nil {
		t.Fatal(err)
	}
	want := `commit    m5x0k1a-0123456789abcdef
target    localhost:5000/app:v1
pause     1.23 ms
strategy  reflink
captured  1234 entries, 5.6 MiB
state     pending
`
	if b.String() != want {
		t.Fatalf("got\n%s\nwant\n%s", b.String(), want)
	}
}

func TestWriteTable(t *testing.T) {
	failed := sample()
	failed.ID, failed.State, failed.Frozen, failed.CapturedAt = "m5x0k2b-fedcba9876543210", snapshotter.StateFailed, false, time.Time{}
	failed.ErrorCode, failed.Error = snapshotter.CodePauseBudgetExceeded, "freeze did not finish within 1ns"
	for _, tc := range []struct {
		name    string
		commits []api.Commit
		want    string
	}{
		{"empty", nil, "ID  STATE  TARGET  PAUSE  STRATEGY  CAPTURED\n"},
		{"two", []api.Commit{sample(), failed}, `ID                        STATE    TARGET                 PAUSE    STRATEGY  CAPTURED
m5x0k1a-0123456789abcdef  pending  localhost:5000/app:v1  1.23 ms  reflink   1234 entries, 5.6 MiB
m5x0k2b-fedcba9876543210  failed   localhost:5000/app:v1  -        reflink   -
m5x0k2b-fedcba9876543210: [PAUSE_BUDGET_EXCEEDED] freeze did not finish within 1ns
`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b bytes.Buffer
			if err := writeTable(&b, tc.commits); err != nil {
				t.Fatal(err)
			}
			if b.String() != tc.want {
				t.Fatalf("got\n%s\nwant\n%s", b.String(), tc.want)
			}
		})
	}
}

func TestWriteJSON(t *testing.T) {
	var b bytes.Buffer
	if err := writeJSON(&b, []byte(`{"id":"x","pause_ms":1.5}`+"\n")); err != nil {
		t.Fatal(err)
	}
	if want := "{\n  \"id\": \"x\",\n  \"pause_ms\": 1.5\n}\n"; b.String() != want {
		t.Fatalf("got %q, want %q", b.String(), want)
	}
	if err := writeJSON(&b, []byte("not json")); err == nil {
		t.Fatal("invalid JSON accepted")
	}
}
