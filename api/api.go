//go:build linux

// Package api serves the daemon's HTTP/JSON API on a root-only unix
// socket: seamless commits (create, get, list) and Prometheus metrics.
//
//	POST /api/v1/commits        {"namespace","container"} or {"snapshot_key"}, "target", "pause_budget", "compression", "local", "squash"
//	GET  /api/v1/commits/{id}
//	GET  /api/v1/commits?state=&container=&namespace=
//	GET  /metrics
//
// Errors are {"error":{"code":"…","message":"…"}} with a stable code and
// the HTTP status of its class.
package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// Committer is what the API needs of the snapshotter.
type Committer interface {
	Capture(ctx context.Context, req snapshotter.CommitRequest) (snapshotter.Commit, error)
	GetCommit(ctx context.Context, id string) (snapshotter.Commit, error)
	ListCommits(ctx context.Context) ([]snapshotter.Commit, error)
	FindActiveKey(ctx context.Context, namespace, name string) (string, error)
}

// CommitRequest is the body of POST /api/v1/commits.
type CommitRequest struct {
	// Namespace and Container name a container's active snapshot (the
	// snapshot key containerd clients use, the container ID for ctr,
	// nerdctl and CRI). Or SnapshotKey gives the backend key directly.
	Namespace   string `json:"namespace,omitempty"`
	Container   string `json:"container,omitempty"`
	SnapshotKey string `json:"snapshot_key,omitempty"`
	Target      string `json:"target"`
	// PauseBudget is a Go duration ("250ms"); empty means the configured.
	PauseBudget string `json:"pause_budget,omitempty"`
	// Compression of the new layer: gzip or zstd; empty means the
	// configured.
	Compression string `json:"compression,omitempty"`
	// CompressionLevel of the new layer: gzip 1-9, zstd 1-22; 0 means
	// the configured level.
	CompressionLevel int `json:"compression_level,omitempty"`
	// Local imports the image into containerd's image store (in the
	// container's namespace) instead of pushing it.
	Local bool `json:"local,omitempty"`
	// Squash makes the new layer hold every change since the base image
	// rather than those since the container's previous commit.
	Squash bool `json:"squash,omitempty"`
}

// Commit is a commit as the API shows it.
type Commit struct {
	snapshotter.Commit
	// PauseMillis repeats Pause for people and shell scripts.
	PauseMillis float64 `json:"pause_ms"`
}

// Error is the body of every error answer.
type Error struct {
	Error ErrorDetail `json:"error"`
}

// ErrorDetail is an error's code and message.
type ErrorDetail struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Metrics are the daemon's Prometheus metrics about commits.
type Metrics struct {
	registry *prometheus.Registry
	pause    *prometheus.HistogramVec
	captures *prometheus.CounterVec
	jobs     *prometheus.CounterVec
	duration prometheus.Histogram
}

// NewMetrics creates the metrics in a registry of their own.
func NewMetrics() *Metrics {
	m := &Metrics{
		registry: prometheus.NewRegistry(),
		pause: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "seamless",
			Name:      "commit_pause_seconds",
			Help:      "Time a container's processes were frozen for a seamless commit.",
			Buckets:   []float64{.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1},
		}, []string{"strategy"}),
		captures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "seamless",
			Name:      "captures_total",
			Help:      "Seamless commit captures by strategy and outcome (captured, or the error code).",
		}, []string{"strategy", "outcome"}),
	}
	m.jobs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "seamless",
		Name:      "jobs_total",
		Help:      "Conversion jobs that ended, by outcome (done, or the error code).",
	}, []string{"outcome"})
	m.duration = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: "seamless",
		Name:      "commit_publish_seconds",
		Help:      "Time from a commit's capture to its image published.",
		Buckets:   prometheus.ExponentialBuckets(0.25, 2, 12),
	})
	m.registry.MustRegister(m.pause, m.captures, m.jobs, m.duration)
	return m
}

// ObserveJob records a conversion job that ended; pass it to
// convert.WithJobObserver.
func (m *Metrics) ObserveJob(c snapshotter.Commit) {
	outcome := "done"
	if c.State == snapshotter.StateFailed {
		outcome = c.ErrorCode
	}
	m.jobs.WithLabelValues(outcome).Inc()
	if c.State == snapshotter.StateDone && !c.CapturedAt.IsZero() {
		m.duration.Observe(c.FinishedAt.Sub(c.CapturedAt).Seconds())
	}
}

// WatchCaptures adds gauges read from the commit records at each scrape:
// the disk space the kept captures use, and the commits by state.
func (m *Metrics) WatchCaptures(c Committer) {
	collect := func() []snapshotter.Commit {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		all, err := c.ListCommits(ctx)
		if err != nil {
			log.L.WithError(err).Debug("metrics: cannot list commits")
		}
		return all
	}
	m.registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "seamless",
		Name:      "capture_disk_bytes",
		Help:      "Disk space used by the captures kept for conversion or for the next incremental commit (files two captures of a container share are counted in each).",
	}, func() float64 {
		var total int64
		for _, rec := range collect() {
			if !rec.CaptureRemoved && rec.State != snapshotter.StateFailed {
				total += rec.CaptureDiskBytes
			}
		}
		return float64(total)
	}))
	m.registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: "seamless",
		Name:      "jobs_unfinished",
		Help:      "Commits captured and not yet published or failed.",
	}, func() float64 {
		n := 0
		for _, rec := range collect() {
			if !rec.State.Terminal() && rec.State != snapshotter.StateCapturing {
				n++
			}
		}
		return float64(n)
	}))
}

// Observe records a finished capture; pass it to
// snapshotter.WithCommitObserver.
func (m *Metrics) Observe(c snapshotter.Commit) {
	outcome := "captured"
	if c.State == snapshotter.StateFailed {
		outcome = c.ErrorCode
	}
	m.captures.WithLabelValues(c.Strategy, outcome).Inc()
	if c.Frozen {
		m.pause.WithLabelValues(c.Strategy).Observe(c.Pause.Seconds())
	}
}

// Handler returns the API's HTTP handler.
func Handler(c Committer, m *Metrics) http.Handler {
	s := server{c: c}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /api/v1/commits", s.createCommit)
	mux.HandleFunc("GET /api/v1/commits/{id}", s.getCommit)
	mux.HandleFunc("GET /api/v1/commits", s.listCommits)
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{}))
	return mux
}

type server struct {
	c Committer
}

// maxBody bounds request bodies; a commit request is a few hundred bytes.
const maxBody = 64 << 10

func (s server) createCommit(w http.ResponseWriter, r *http.Request) {
	var req CommitRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, "INVALID_REQUEST", fmt.Errorf("request body: %v: %w", err, errdefs.ErrInvalidArgument))
		return
	}
	key := req.SnapshotKey
	switch {
	case key != "" && req.Container != "":
		writeError(w, "INVALID_REQUEST", fmt.Errorf("give either snapshot_key or namespace and container, not both: %w", errdefs.ErrInvalidArgument))
		return
	case key == "":
		if req.Container == "" {
			writeError(w, "INVALID_REQUEST", fmt.Errorf("container (with namespace) or snapshot_key is required: %w", errdefs.ErrInvalidArgument))
			return
		}
		var err error
		if key, err = s.c.FindActiveKey(r.Context(), req.Namespace, req.Container); err != nil {
			code := snapshotter.ErrorCode(err)
			if errdefs.IsNotFound(err) {
				code = "CONTAINER_NOT_FOUND"
			}
			writeError(w, code, err)
			return
		}
	}
	var budget time.Duration
	if req.PauseBudget != "" {
		var err error
		if budget, err = time.ParseDuration(req.PauseBudget); err != nil {
			writeError(w, snapshotter.CodeInvalidOption, fmt.Errorf("pause_budget %q: %v: %w", req.PauseBudget, err, errdefs.ErrInvalidArgument))
			return
		}
	}
	rec, err := s.c.Capture(r.Context(), snapshotter.CommitRequest{
		Key: key, Target: req.Target, PauseBudget: budget, Compression: req.Compression, CompressionLevel: req.CompressionLevel, Local: req.Local, Squash: req.Squash,
	})
	if err != nil {
		writeError(w, snapshotter.ErrorCode(err), err)
		return
	}
	writeJSON(w, http.StatusCreated, view(rec))
}

func (s server) getCommit(w http.ResponseWriter, r *http.Request) {
	rec, err := s.c.GetCommit(r.Context(), r.PathValue("id"))
	if err != nil {
		code := ""
		if errdefs.IsNotFound(err) {
			code = "COMMIT_NOT_FOUND"
		}
		writeError(w, code, err)
		return
	}
	writeJSON(w, http.StatusOK, view(rec))
}

func (s server) listCommits(w http.ResponseWriter, r *http.Request) {
	all, err := s.c.ListCommits(r.Context())
	if err != nil {
		writeError(w, "", err)
		return
	}
	q := r.URL.Query()
	state, container, namespace := q.Get("state"), q.Get("container"), q.Get("namespace")
	out := []Commit{}
	for _, c := range all {
		if state != "" && string(c.State) != state {
			continue
		}
		if container != "" && !strings.HasSuffix(c.SnapshotKey, "/"+container) {
			continue
		}
		if namespace != "" && !strings.HasPrefix(c.SnapshotKey, namespace+"/") {
			continue
		}
		out = append(out, view(c))
	}
	writeJSON(w, http.StatusOK, map[string][]Commit{"commits": out})
}

func view(c snapshotter.Commit) Commit {
	return Commit{Commit: c, PauseMillis: float64(c.Pause.Microseconds()) / 1000}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	if err := json.NewEncoder(w).Encode(v); err != nil {
		log.L.WithError(err).Debug("failed to write API answer")
	}
}

func writeError(w http.ResponseWriter, code string, err error) {
	status := statusOf(err)
	if code == "" {
		code = "INTERNAL"
		if status != http.StatusInternalServerError {
			code = strings.ToUpper(strings.ReplaceAll(http.StatusText(status), " ", "_"))
		}
	}
	if code == snapshotter.CodePauseBudgetExceeded {
		status = http.StatusServiceUnavailable
	}
	writeJSON(w, status, Error{Error: ErrorDetail{Code: code, Message: err.Error()}})
}

func statusOf(err error) int {
	switch {
	case errdefs.IsInvalidArgument(err):
		return http.StatusBadRequest
	case errdefs.IsNotFound(err):
		return http.StatusNotFound
	case errdefs.IsConflict(err), errdefs.IsAlreadyExists(err):
		return http.StatusConflict
	case errdefs.IsFailedPrecondition(err):
		return http.StatusPreconditionFailed
	case errdefs.IsPermissionDenied(err):
		return http.StatusForbidden
	case errors.Is(err, context.DeadlineExceeded):
		return http.StatusServiceUnavailable
	default:
		return http.StatusInternalServerError
	}
}
