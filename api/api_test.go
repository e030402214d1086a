//go:build linux

package api

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// fakeCommitter answers from a table; the real snapshotter is exercised
// through this API by the integration tests.
type fakeCommitter struct {
	captureErr error
	keys       map[string]string // "ns/container" -> key
	got        snapshotter.CommitRequest
}

func (f *fakeCommitter) Capture(_ context.Context, req snapshotter.CommitRequest) (snapshotter.Commit, error) {
	f.got = req
	if f.captureErr != nil {
		return snapshotter.Commit{}, f.captureErr
	}
	return snapshotter.Commit{ID: "c1", SnapshotKey: req.Key, Target: req.Target, State: snapshotter.StatePending, Frozen: true, Pause: 1500 * time.Microsecond, Strategy: "copy"}, nil
}

func (f *fakeCommitter) GetCommit(_ context.Context, id string) (snapshotter.Commit, error) {
	if id != "c1" {
		return snapshotter.Commit{}, fmt.Errorf("commit %q: %w", id, errdefs.ErrNotFound)
	}
	return snapshotter.Commit{ID: "c1", SnapshotKey: "default/3/web", State: snapshotter.StatePending}, nil
}

func (f *fakeCommitter) ListCommits(context.Context) ([]snapshotter.Commit, error) {
	return []snapshotter.Commit{
		{ID: "c1", SnapshotKey: "default/3/web", State: snapshotter.StatePending},
		{ID: "c2", SnapshotKey: "k8s.io/9/db", State: snapshotter.StateFailed},
	}, nil
}

func (f *fakeCommitter) FindActiveKey(_ context.Context, ns, name string) (string, error) {
	if k, ok := f.keys[ns+"/"+name]; ok {
		return k, nil
	}
	return "", fmt.Errorf("no container %s: %w", name, errdefs.ErrNotFound)
}

func TestAPI(t *testing.T) {
	budgetErr := &snapshotter.CommitError{Code: snapshotter.CodePauseBudgetExceeded, Err: fmt.Errorf("too slow: %w", context.DeadlineExceeded)}
	busyErr := &snapshotter.CommitError{Code: snapshotter.CodeCommitInProgress, Err: fmt.Errorf("busy: %w", errdefs.ErrConflict)}
	refErr := &snapshotter.CommitError{Code: snapshotter.CodeInvalidReference, Err: fmt.Errorf("bad: %w", errdefs.ErrInvalidArgument)}
	for _, tc := range []struct {
		name       string
		method     string
		path, body string
		captureErr error
		status     int
		code       string // error code, or "" for success
		check      func(t *testing.T, body string, f *fakeCommitter)
	}{
		{name: "commit by container", method: "POST", path: "/api/v1/commits", body: `{"namespace":"default","container":"web","target":"r/app:1","pause_budget":"200ms"}`, status: 201,
			check: func(t *testing.T, body string, f *fakeCommitter) {
				if f.got.Key != "default/3/web" || f.got.PauseBudget != 200*time.Millisecond {
					t.Errorf("capture asked with %+v", f.got)
				}
				var c Commit
				if err := json.Unmarshal([]byte(body), &c); err != nil || c.ID != "c1" || c.PauseMillis != 1.5 || c.State != "pending" {
					t.Errorf("answer %s (%v)", body, err)
				}
			}},
		{name: "commit by snapshot key", method: "POST", path: "/api/v1/commits", body: `{"snapshot_key":"default/3/web","target":"r/app"}`, status: 201},
		{name: "unknown container", method: "POST", path: "/api/v1/commits", body: `{"namespace":"default","container":"nope","target":"r/app"}`, status: 404, code: "CONTAINER_NOT_FOUND"},
		{name: "neither container nor key", method: "POST", path: "/api/v1/commits", body: `{"target":"r/app"}`, status: 400, code: "INVALID_REQUEST"},
		{name: "both container and key", method: "POST", path: "/api/v1/commits", body: `{"container":"web","snapshot_key":"k","target":"r"}`, status: 400, code: "INVALID_REQUEST"},
		{name: "unknown field", method: "POST", path: "/api/v1/commits", body: `{"snapshot_key":"k","target":"r","squish":true}`, status: 400, code: "INVALID_REQUEST"},
		{name: "not json", method: "POST", path: "/api/v1/commits", body: `target=r`, status: 400, code: "INVALID_REQUEST"},
		{name: "bad pause budget", method: "POST", path: "/api/v1/commits", body: `{"snapshot_key":"k","target":"r","pause_budget":"soon"}`, status: 400, code: snapshotter.CodeInvalidOption},
		{name: "invalid reference", method: "POST", path: "/api/v1/commits", body: `{"snapshot_key":"k","target":"R"}`, captureErr: refErr, status: 400, code: snapshotter.CodeInvalidReference},
		{name: "commit in progress", method: "POST", path: "/api/v1/commits", body: `{"snapshot_key":"k","target":"r"}`, captureErr: busyErr, status: 409, code: snapshotter.CodeCommitInProgress},
		{name: "pause budget exceeded", method: "POST", path: "/api/v1/commits", body: `{"snapshot_key":"k","target":"r"}`, captureErr: budgetErr, status: 503, code: snapshotter.CodePauseBudgetExceeded},
		{name: "get", method: "GET", path: "/api/v1/commits/c1", status: 200},
		{name: "get unknown", method: "GET", path: "/api/v1/commits/zz", status: 404, code: "COMMIT_NOT_FOUND"},
		{name: "list all", method: "GET", path: "/api/v1/commits", status: 200, check: func(t *testing.T, body string, _ *fakeCommitter) {
			if strings.Count(body, `"id"`) != 2 {
				t.Errorf("list %s", body)
			}
		}},
		{name: "list by state and container", method: "GET", path: "/api/v1/commits?state=failed&container=db&namespace=k8s.io", status: 200, check: func(t *testing.T, body string, _ *fakeCommitter) {
			if strings.Count(body, `"id"`) != 1 || !strings.Contains(body, `"c2"`) {
				t.Errorf("list %s", body)
			}
		}},
		{name: "metrics", method: "GET", path: "/metrics", status: 200, check: func(t *testing.T, body string, _ *fakeCommitter) {
			for _, want := range []string{`seamless_captures_total{outcome="captured",strategy="copy"} 1`, `seamless_commit_pause_seconds_count{strategy="copy"} 1`} {
				if !strings.Contains(body, want) {
					t.Errorf("metrics lack %q:\n%s", want, body)
				}
			}
		}},
		{name: "wrong method", method: "DELETE", path: "/api/v1/commits/c1", status: 405},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeCommitter{captureErr: tc.captureErr, keys: map[string]string{"default/web": "default/3/web"}}
			m := NewMetrics()
			m.Observe(snapshotter.Commit{Strategy: "copy", State: snapshotter.StatePending, Frozen: true, Pause: time.Millisecond})
			rr := httptest.NewRecorder()
			Handler(f, m).ServeHTTP(rr, httptest.NewRequest(tc.method, tc.path, strings.NewReader(tc.body)))
			if rr.Code != tc.status {
				t.Fatalf("status %d, want %d: %s", rr.Code, tc.status, rr.Body)
			}
			if tc.code != "" {
				var e Error
				if err := json.Unmarshal(rr.Body.Bytes(), &e); err != nil || e.Error.Code != tc.code || e.Error.Message == "" {
					t.Fatalf("error body %s, want code %s", rr.Body, tc.code)
				}
			}
			if tc.check != nil {
				tc.check(t, rr.Body.String(), f)
			}
		})
	}
}
