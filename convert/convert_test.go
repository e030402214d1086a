//go:build linux

package convert

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	remoteerrors "github.com/containerd/containerd/v2/core/remotes/errors"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/seamless-snapshotter/seamless-snapshotter/config"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

func commit(id, snap string, gen uint64, state snapshotter.CommitState, layers int) snapshotter.Commit {
	c := snapshotter.Commit{ID: id, SnapshotID: snap, Generation: gen, State: state, Parent: "default/1/sha256:base",
		CreatedAt: time.Unix(int64(gen), 0), Base: &snapshotter.BaseImage{Name: "base", Digest: "sha256:b"}}
	for i := 0; i < layers; i++ {
		c.Layers = append(c.Layers, snapshotter.Layer{Digest: digest.FromString(fmt.Sprint(id, i))})
	}
	return c
}

func ids(cs []snapshotter.Commit) []string {
	var out []string
	for _, c := range cs {
		out = append(out, c.ID)
	}
	return out
}

func TestRunnable(t *testing.T) {
	all := []snapshotter.Commit{
		commit("a1", "a", 1, snapshotter.StateDone, 1),
		commit("a3", "a", 3, snapshotter.StatePending, 0),
		commit("a2", "a", 2, snapshotter.StatePushing, 0),
		commit("b1", "b", 1, snapshotter.StateFailed, 0),
		commit("b2", "b", 2, snapshotter.StatePending, 0),
		commit("c0", "c", 0, snapshotter.StateCapturing, 0),
	}
	got := ids(runnable(all))
	want := []string{"a2", "b2"} // one per container, oldest generation first
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("runnable = %v, want %v", got, want)
	}
}

func TestPreviousCommit(t *testing.T) {
	base := &baseImage{name: "base", target: ocispec.Descriptor{Digest: "sha256:b"}}
	cur := commit("a4", "a", 4, snapshotter.StateConverting, 0)
	for _, tc := range []struct {
		name string
		all  []snapshotter.Commit
		max  int
		want string
	}{
		{"first commit", nil, 10, ""},
		{"newest done", []snapshotter.Commit{commit("a1", "a", 1, snapshotter.StateDone, 1), commit("a2", "a", 2, snapshotter.StateDone, 2), commit("a3", "a", 3, snapshotter.StateFailed, 0)}, 10, "a2"},
		{"other container", []snapshotter.Commit{commit("b1", "b", 1, snapshotter.StateDone, 1)}, 10, ""},
		{"chain full: squash", []snapshotter.Commit{commit("a3", "a", 3, snapshotter.StateDone, 3)}, 3, ""},
		{"capture gone", []snapshotter.Commit{func() snapshotter.Commit {
			c := commit("a3", "a", 3, snapshotter.StateDone, 1)
			c.CaptureRemoved = true
			return c
		}()}, 10, ""},
		{"other base", []snapshotter.Commit{func() snapshotter.Commit {
			c := commit("a3", "a", 3, snapshotter.StateDone, 1)
			c.Base.Digest = "sha256:other"
			return c
		}()}, 10, ""},
		{"later generation is not a parent", []snapshotter.Commit{commit("a5", "a", 5, snapshotter.StateDone, 1)}, 10, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := previousCommit(tc.all, cur, base, tc.max)
			gotID := ""
			if got != nil {
				gotID = got.ID
			}
			if gotID != tc.want {
				t.Fatalf("previous = %q, want %q", gotID, tc.want)
			}
		})
	}
}

func TestKeptCommits(t *testing.T) {
	all := []snapshotter.Commit{
		commit("a1", "a", 1, snapshotter.StateDone, 1),
		commit("a2", "a", 2, snapshotter.StateDone, 2),
		commit("b1", "b", 1, snapshotter.StateDone, 1), // container b is gone
		commit("c1", "c", 1, snapshotter.StateDone, 1), // c is gone but has a job left
		commit("c2", "c", 2, snapshotter.StatePending, 0),
		commit("d1", "d", 1, snapshotter.StateFailed, 0),
	}
	keep := keptCommits(all, map[string]bool{"a": true, "d": true})
	for id, want := range map[string]bool{"a1": false, "a2": true, "b1": false, "c1": true, "d1": false} {
		if keep[id] != want {
			t.Errorf("keep[%s] = %v, want %v", id, keep[id], want)
		}
	}
}

func TestBackoff(t *testing.T) {
	cv := &Converter{cfg: config.Convert{RetryInitial: config.Duration(time.Second), RetryMax: config.Duration(10 * time.Second)}}
	for attempts, want := range map[int]time.Duration{1: time.Second, 2: 2 * time.Second, 3: 4 * time.Second, 4: 8 * time.Second, 5: 10 * time.Second, 50: 10 * time.Second} {
		if got := cv.backoff(attempts); got != want {
			t.Errorf("backoff(%d) = %v, want %v", attempts, got, want)
		}
	}
}

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		name      string
		err       error
		code      string
		permanent bool
	}{
		{"auth", fmt.Errorf("push: %w", docker.ErrInvalidAuthorization), CodeRegistryAuth, true},
		{"403", remoteerrors.ErrUnexpectedStatus{StatusCode: http.StatusForbidden}, CodeRegistryAuth, true},
		{"503", fmt.Errorf("x: %w", remoteerrors.ErrUnexpectedStatus{StatusCode: http.StatusServiceUnavailable}), CodeRegistryError, false},
		{"429", remoteerrors.ErrUnexpectedStatus{StatusCode: http.StatusTooManyRequests}, CodeRegistryError, false},
		{"400", remoteerrors.ErrUnexpectedStatus{StatusCode: http.StatusBadRequest}, CodeRegistryError, true},
		{"refused", fmt.Errorf("dial: %w", syscall.ECONNREFUSED), CodeRegistryUnreachable, false},
		{"tagged", permanentErr(CodeBaseImageNotFound, errors.New("gone")), CodeBaseImageNotFound, true},
		{"invalid", fmt.Errorf("bad: %w", errdefs.ErrInvalidArgument), CodeConvertFailed, true},
		{"unknown", errors.New("something"), CodeConvertFailed, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, permanent := classify(tc.err)
			if code != tc.code || permanent != tc.permanent {
				t.Fatalf("classify = %s/%v, want %s/%v", code, permanent, tc.code, tc.permanent)
			}
		})
	}
}

func TestBuildImage(t *testing.T) {
	baseCfg := `{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":["sh"],"WorkingDir":"/w","User":"1000","Labels":{"a":"b"}},` +
		`"rootfs":{"type":"layers","diff_ids":["sha256:d1"]},"history":[{"created_by":"base"}],"unknown_field":{"kept":true}}`
	baseLayer := ocispec.Descriptor{MediaType: images.MediaTypeDockerSchema2LayerGzip, Digest: "sha256:l1", Size: 10}
	captured := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
	layers := []snapshotter.Layer{
		{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: "sha256:n1", Size: 5, DiffID: "sha256:nd1", Commit: "c1", Created: captured.Add(-time.Hour), Squashed: true},
		{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: "sha256:n2", Size: 6, DiffID: "sha256:nd2", Commit: "c2", Created: captured},
	}
	for _, tc := range []struct {
		name       string
		docker     bool
		manifest   string
		config     string
		baseLayer  string
		annotation bool
	}{
		{"docker", true, images.MediaTypeDockerSchema2Manifest, images.MediaTypeDockerSchema2Config, images.MediaTypeDockerSchema2LayerGzip, false},
		{"oci from docker base", false, ocispec.MediaTypeImageManifest, ocispec.MediaTypeImageConfig, ocispec.MediaTypeImageLayerGzip, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := &baseImage{
				name: "registry.example/base:1", target: ocispec.Descriptor{Digest: "sha256:idx"},
				manifest: ocispec.Manifest{Layers: []ocispec.Descriptor{baseLayer}},
				config:   []byte(baseCfg), diffIDs: []string{"sha256:d1"}, docker: true,
			}
			img, err := buildImage(base, snapshotter.Commit{ID: "c2", CapturedAt: captured}, layers, tc.docker)
			if err != nil {
				t.Fatal(err)
			}
			var m ocispec.Manifest
			if err := json.Unmarshal(img.manifest, &m); err != nil {
				t.Fatal(err)
			}
			if m.MediaType != tc.manifest || m.Config.MediaType != tc.config || img.manifestDesc.Digest != digest.FromBytes(img.manifest) {
				t.Fatalf("manifest %s config %s", m.MediaType, m.Config.MediaType)
			}
			if len(m.Layers) != 3 || m.Layers[0].MediaType != tc.baseLayer || m.Layers[0].Digest != "sha256:l1" || m.Layers[2].Digest != "sha256:n2" {
				t.Fatalf("layers %+v", m.Layers)
			}
			if got := m.Annotations[ocispec.AnnotationBaseImageName] != ""; got != tc.annotation {
				t.Fatalf("annotations %v", m.Annotations)
			}
			var cfg struct {
				ocispec.Image
				Unknown map[string]bool `json:"unknown_field"`
			}
			if err := json.Unmarshal(img.config, &cfg); err != nil {
				t.Fatal(err)
			}
			if got := fmt.Sprint(cfg.RootFS.DiffIDs); got != "[sha256:d1 sha256:nd1 sha256:nd2]" {
				t.Fatalf("diff ids %s", got)
			}
			if len(cfg.History) != 3 || cfg.History[2].CreatedBy != "seamless commit c2" || !cfg.History[2].Created.Equal(captured) {
				t.Fatalf("history %+v", cfg.History)
			}
			if cfg.Config.WorkingDir != "/w" || cfg.Config.User != "1000" || cfg.Config.Cmd[0] != "sh" || cfg.Config.Labels["a"] != "b" || !cfg.Unknown["kept"] {
				t.Fatalf("base config not kept: %+v %v", cfg.Config, cfg.Unknown)
			}
			if !cfg.Created.Equal(captured) {
				t.Fatalf("created %v", cfg.Created)
			}
		})
	}
}

func TestLayerErr(t *testing.T) {
	for _, tc := range []struct {
		name      string
		err       error
		code      string
		permanent bool
	}{
		{"containerd restarting", status.Error(codes.Unavailable, "connection refused"), CodeContainerdError, false},
		{"disk full", status.Error(codes.Unknown, "write ingest/data: no space left on device"), CodeConvertFailed, true},
		{"capture unreadable", fmt.Errorf("open x: %w", syscall.EIO), CodeConvertFailed, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, permanent := classify(layerErr(tc.err))
			if code != tc.code || permanent != tc.permanent {
				t.Fatalf("classify(layerErr) = %s/%v, want %s/%v", code, permanent, tc.code, tc.permanent)
			}
		})
	}
}
