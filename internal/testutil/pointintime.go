package testutil

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// WriterScript is a shell workload for point-in-time checks: it appends
// step numbers to /log and writes each step into one of 50 files
// /n.<step%50>, as fast as it can, without fsync.
const WriterScript = `i=0; while :; do i=$((i+1)); echo $i > /n.$((i%50)); echo $i >> /log; done`

// CheckPointInTime asserts that a capture is a state the writer passed
// through: /log holds the steps 1..N, each complete, and every /n.k holds
// the last step ≤ N that wrote it.
func CheckPointInTime(t *testing.T, dir string) int {
	t.Helper()
	f, err := os.Open(filepath.Join(dir, "log"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		n++
		if sc.Text() != strconv.Itoa(n) {
			t.Fatalf("log line %d is %q: torn or out of order", n, sc.Text())
		}
	}
	// The writer echoes to /n.k before appending to /log: step N+1 may
	// already be in its n file, so the newest n file is N or N+1.
	for k := 0; k < 50; k++ {
		data, err := os.ReadFile(filepath.Join(dir, fmt.Sprintf("n.%d", k)))
		want := n - ((n-k)%50+50)%50 // last step ≤ n with step%50 == k
		if want <= 0 {
			if got := strings.TrimSpace(string(data)); err == nil && got != "" && got != strconv.Itoa(n+1) {
				t.Fatalf("n.%d exists (%q) before any step wrote it (log ends at %d)", k, data, n)
			}
			continue
		}
		if err != nil {
			t.Fatalf("n.%d missing, log ends at %d: %v", k, n, err)
		}
		got := strings.TrimSpace(string(data))
		// The step in flight may have truncated its file and not written it.
		inFlight := (n+1)%50 == k && (got == "" || got == strconv.Itoa(n+1))
		if got != strconv.Itoa(want) && !inFlight {
			t.Fatalf("n.%d holds %q, want %d (log ends at %d)", k, got, want, n)
		}
	}
	return n
}
