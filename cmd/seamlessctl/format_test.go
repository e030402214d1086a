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
	for _, tc := range []struct {
		name string
		hint bool
		want string
	}{
		{"with hint", true, `commit    m5x0k1a-0123456789abcdef
target    localhost:5000/app:v1
pause     1.23 ms
strategy  reflink
captured  1234 entries, 5.6 MiB
state     pending
follow    seamlessctl wait m5x0k1a-0123456789abcdef
`},
		{"for --wait", false, `commit    m5x0k1a-0123456789abcdef
target    localhost:5000/app:v1
pause     1.23 ms
strategy  reflink
captured  1234 entries, 5.6 MiB
state     pending
`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b bytes.Buffer
			if err := writeCommit(&b, sample(), tc.hint); err != nil {
				t.Fatal(err)
			}
			if b.String() != tc.want {
				t.Fatalf("got\n%s\nwant\n%s", b.String(), tc.want)
			}
		})
	}
}

func TestWriteTable(t *testing.T) {
	now := time.Date(2025, 1, 2, 3, 5, 0, 0, time.UTC)
	failed := sample()
	failed.ID, failed.State, failed.Frozen, failed.CapturedAt = "m5x0k2b-fedcba9876543210", snapshotter.StateFailed, false, time.Time{}
	failed.ErrorCode, failed.Error = snapshotter.CodePauseBudgetExceeded, "freeze did not finish within 1ns"
	pushing := sample()
	pushing.ID, pushing.State, pushing.Progress = "m5x0k3c-00000000aaaaaaaa", snapshotter.StatePushing, snapshotter.Progress{Done: 3 << 20, Total: 10 << 20}
	retry := sample()
	retry.ID, retry.Attempts, retry.NextAttempt = "m5x0k4d-00000000bbbbbbbb", 1, now.Add(3500*time.Millisecond)
	retry.ErrorCode, retry.Error = "REGISTRY_UNREACHABLE", "dial tcp 127.0.0.1:5000: connection refused"
	for _, tc := range []struct {
		name    string
		commits []api.Commit
		want    string
	}{
		{"empty", nil, "ID  STATE  PROGRESS  TARGET  DIGEST  PAUSE  STRATEGY  CAPTURED\n"},
		{"all states", []api.Commit{sample(), failed, pushing, retry, done()}, `ID                        STATE    PROGRESS       TARGET                 DIGEST               PAUSE    STRATEGY  CAPTURED
m5x0k1a-0123456789abcdef  pending  -              localhost:5000/app:v1  -                    1.23 ms  reflink   1234 entries, 5.6 MiB
m5x0k2b-fedcba9876543210  failed   -              localhost:5000/app:v1  -                    -        reflink   -
m5x0k3c-00000000aaaaaaaa  pushing  30%            localhost:5000/app:v1  -                    1.23 ms  reflink   1234 entries, 5.6 MiB
m5x0k4d-00000000bbbbbbbb  pending  retry 2 in 4s  localhost:5000/app:v1  -                    1.23 ms  reflink   1234 entries, 5.6 MiB
m5x0k1a-0123456789abcdef  done     100%           localhost:5000/app:v1  sha256:0123456789ab  1.23 ms  reflink   1234 entries, 5.6 MiB
m5x0k2b-fedcba9876543210: [PAUSE_BUDGET_EXCEEDED] freeze did not finish within 1ns
m5x0k4d-00000000bbbbbbbb: [REGISTRY_UNREACHABLE] dial tcp 127.0.0.1:5000: connection refused (will be retried)
`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b bytes.Buffer
			if err := writeTable(&b, tc.commits, now); err != nil {
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

const (
	testDigest     = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	testBaseDigest = "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"
	testLayer      = "sha256:aaaaaaaaaaaaaaaabbbbbbbbbbbbbbbbccccccccccccccccdddddddddddddddd"
)

// done is sample once its job has pushed the image.
func done() api.Commit {
	c := sample()
	c.State, c.ImageDigest, c.Attempts = snapshotter.StateDone, testDigest, 1
	c.Progress = snapshotter.Progress{Done: 2 << 20, Total: 2 << 20}
	c.Base = &snapshotter.BaseImage{Name: "docker.io/library/alpine:3.20", Digest: testBaseDigest}
	c.Layers = []snapshotter.Layer{
		{Digest: "sha256:1111", Size: 100},
		{Digest: testLayer, Size: 1536},
	}
	c.Compression, c.CaptureRemoved, c.CaptureDiskBytes = "zstd", true, 6<<20
	c.FinishedAt = c.CreatedAt.Add(12 * time.Second)
	return c
}

func TestWriteDetail(t *testing.T) {
	now := time.Date(2025, 1, 2, 3, 5, 0, 0, time.UTC)
	pushing := sample()
	pushing.State, pushing.Local, pushing.CaptureDiskBytes = snapshotter.StatePushing, true, 6<<20
	pushing.Progress = snapshotter.Progress{Done: 3 << 20, Total: 10 << 20}
	retry := sample()
	retry.Attempts, retry.NextAttempt = 2, now.Add(4*time.Second)
	retry.ErrorCode, retry.Error = "REGISTRY_ERROR", "503 Service Unavailable"
	failed := sample()
	failed.State, failed.Attempts, failed.CaptureRemoved = snapshotter.StateFailed, 1, true
	leveled := sample()
	leveled.Compression, leveled.CompressionLevel = "zstd", 19
	fastest := sample()
	fastest.CompressionLevel = 1
	failed.ErrorCode, failed.Error = "REGISTRY_AUTH", "401 Unauthorized"
	for _, tc := range []struct {
		name string
		c    api.Commit
		want string
	}{
		{"pending", sample(), `commit    m5x0k1a-0123456789abcdef
snapshot  default/7/web
target    localhost:5000/app:v1
publish   push to the registry
state     pending
pause     1.23 ms
strategy  reflink
captured  1234 entries, 5.6 MiB
created   2025-01-02T03:04:05Z
`},
		{"importing", pushing, `commit    m5x0k1a-0123456789abcdef
snapshot  default/7/web
target    localhost:5000/app:v1
publish   import into containerd's image store on this node (--local)
state     pushing
progress  3.0 MiB / 10.0 MiB  30%
pause     1.23 ms
strategy  reflink
captured  1234 entries, 5.6 MiB
capture   6.0 MiB on disk
created   2025-01-02T03:04:05Z
`},
		{"retrying", retry, `commit    m5x0k1a-0123456789abcdef
snapshot  default/7/web
target    localhost:5000/app:v1
publish   push to the registry
state     pending
pause     1.23 ms
strategy  reflink
captured  1234 entries, 5.6 MiB
attempts  2, next in 4s (2025-01-02T03:05:04Z)
error     [REGISTRY_ERROR] 503 Service Unavailable (will be retried)
created   2025-01-02T03:04:05Z
`},
		{"failed", failed, `commit    m5x0k1a-0123456789abcdef
snapshot  default/7/web
target    localhost:5000/app:v1
publish   push to the registry
state     failed
pause     1.23 ms
strategy  reflink
captured  1234 entries, 5.6 MiB
capture   removed
attempts  1
error     [REGISTRY_AUTH] 401 Unauthorized
created   2025-01-02T03:04:05Z
`},
		{"compression and level", leveled, `commit       m5x0k1a-0123456789abcdef
snapshot     default/7/web
target       localhost:5000/app:v1
publish      push to the registry
state        pending
pause        1.23 ms
strategy     reflink
captured     1234 entries, 5.6 MiB
compression  zstd, level 19
created      2025-01-02T03:04:05Z
`},
		{"level of the configured compression", fastest, `commit       m5x0k1a-0123456789abcdef
snapshot     default/7/web
target       localhost:5000/app:v1
publish      push to the registry
state        pending
pause        1.23 ms
strategy     reflink
captured     1234 entries, 5.6 MiB
compression  level 1
created      2025-01-02T03:04:05Z
`},
		{"done", done(), `commit       m5x0k1a-0123456789abcdef
snapshot     default/7/web
target       localhost:5000/app:v1
publish      push to the registry
state        done
pause        1.23 ms
strategy     reflink
captured     1234 entries, 5.6 MiB
capture      removed (it used 6.0 MiB on disk)
compression  zstd
base         docker.io/library/alpine:3.20@` + testBaseDigest + `
layers       2, last ` + testLayer + ` (1.5 KiB)
digest       ` + testDigest + `
attempts     1
created      2025-01-02T03:04:05Z
finished     2025-01-02T03:04:17Z
`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b bytes.Buffer
			if err := writeDetail(&b, tc.c, now); err != nil {
				t.Fatal(err)
			}
			if b.String() != tc.want {
				t.Fatalf("got\n%s\nwant\n%s", b.String(), tc.want)
			}
		})
	}
}

func TestFormatProgress(t *testing.T) {
	for _, tc := range []struct {
		p       snapshotter.Progress
		percent int
		want    string
	}{
		{snapshotter.Progress{}, -1, ""},
		{snapshotter.Progress{Done: 5 << 20}, -1, "5.0 MiB"},
		{snapshotter.Progress{Total: 10 << 20}, 0, "0 B / 10.0 MiB  0%"},
		{snapshotter.Progress{Done: 3 << 20, Total: 10 << 20}, 30, "3.0 MiB / 10.0 MiB  30%"},
		{snapshotter.Progress{Done: 999, Total: 1000}, 99, "999 B / 1000 B  99%"},
		{snapshotter.Progress{Done: 12 << 20, Total: 10 << 20}, 100, "12.0 MiB / 10.0 MiB  100%"},
		{snapshotter.Progress{Done: -1, Total: 10}, 0, "0 B / 10 B  0%"},
	} {
		if got := percent(tc.p); got != tc.percent {
			t.Errorf("percent(%+v) = %d, want %d", tc.p, got, tc.percent)
		}
		if got := formatProgress(tc.p); got != tc.want {
			t.Errorf("formatProgress(%+v) = %q, want %q", tc.p, got, tc.want)
		}
	}
}

func TestShortDigest(t *testing.T) {
	for in, want := range map[string]string{
		"":            "-",
		testDigest:    "sha256:0123456789ab",
		"sha256:abcd": "sha256:abcd",
		"nonsense":    "nonsense",
	} {
		if got := shortDigest(in); got != want {
			t.Errorf("shortDigest(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestFormatDurations(t *testing.T) {
	for _, tc := range []struct {
		d           time.Duration
		in, elapsed string
	}{
		{0, "0s", "0.0s"},
		{-time.Second, "0s", "-1.0s"},
		{400 * time.Millisecond, "1s", "0.4s"},
		{3500 * time.Millisecond, "4s", "3.5s"},
		{65 * time.Second, "1m5s", "1m05s"},
		{2*time.Hour + 3*time.Minute, "2h3m0s", "2h03m"},
	} {
		if got := formatIn(tc.d); got != tc.in {
			t.Errorf("formatIn(%v) = %q, want %q", tc.d, got, tc.in)
		}
		if got := formatElapsed(tc.d); got != tc.elapsed {
			t.Errorf("formatElapsed(%v) = %q, want %q", tc.d, got, tc.elapsed)
		}
	}
}
