//go:build linux

package convert

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/remotes"
	remoteerrors "github.com/containerd/containerd/v2/core/remotes/errors"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/seamless-snapshotter/seamless-snapshotter/config"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// emptyStore is a content store without any blob.
type emptyStore struct{ content.Store }

func (emptyStore) ReaderAt(context.Context, ocispec.Descriptor) (content.ReaderAt, error) {
	return nil, errdefs.ErrNotFound
}

// discardPusher accepts every blob and throws it away.
type discardPusher struct{}

func (discardPusher) Push(context.Context, ocispec.Descriptor) (content.Writer, error) {
	return &discardWriter{}, nil
}

type discardWriter struct{ n int64 }

func (w *discardWriter) Write(p []byte) (int, error) { w.n += int64(len(p)); return len(p), nil }
func (w *discardWriter) Close() error                { return nil }
func (w *discardWriter) Digest() digest.Digest       { return "" }
func (w *discardWriter) Truncate(int64) error        { return nil }
func (w *discardWriter) Status() (content.Status, error) {
	return content.Status{Offset: w.n}, nil
}
func (w *discardWriter) Commit(context.Context, int64, digest.Digest, ...content.Opt) error {
	return nil
}

// lazyFetcher is like the docker fetcher: Fetch succeeds, and the
// connection, here refused, is made at the first read.
type lazyFetcher struct{ remotes.Resolver }

func (lazyFetcher) Fetcher(context.Context, string) (remotes.Fetcher, error) {
	return lazyFetcher{}, nil
}
func (lazyFetcher) Fetch(context.Context, ocispec.Descriptor) (io.ReadCloser, error) {
	return io.NopCloser(failingReader{}), nil
}

type failingReader struct{}

func (failingReader) Read([]byte) (int, error) {
	return 0, fmt.Errorf("httpReadSeeker: failed open: dial tcp: %w", syscall.ECONNREFUSED)
}

// TestPushBlobSourceUnreachable: a blob missing from the content store
// (a base layer, or a layer an earlier commit streamed to a registry)
// whose registry cannot be reached fails the push with an error that
// names the blob and where it was looked for, and that is retried.
func TestPushBlobSourceUnreachable(t *testing.T) {
	blob := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromString("layer"), Size: 5}
	for _, tc := range []struct {
		name    string
		base    *baseImage
		layers  []snapshotter.Layer
		message string
	}{
		{
			name:    "base layer",
			base:    &baseImage{name: "base.example/team/base:1", manifest: ocispec.Manifest{Layers: []ocispec.Descriptor{blob}}},
			message: "base layer %s is not in the content store, and fetching it from base.example/team/base:1 failed: ",
		},
		{
			name:    "streamed commit layer",
			layers:  []snapshotter.Layer{{Digest: blob.Digest, Source: "target.example/team/app:0"}},
			message: "layer %s is not in the content store, and fetching it from target.example/team/app:0 failed: ",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sources := newBlobSources(lazyFetcher{}, tc.base, tc.layers, "other.example/team/app:1")
			err := pushBlob(context.Background(), discardPusher{}, emptyStore{}, blob, sources, newProgress(0, func(context.Context) error { return nil }))
			if err == nil {
				t.Fatal("push succeeded")
			}
			if want := fmt.Sprintf(tc.message, blob.Digest); !strings.HasPrefix(err.Error(), want) {
				t.Fatalf("error %q, want it to start with %q", err, want)
			}
			if code, permanent := classify(registryErr(err)); code != CodeRegistryUnreachable || permanent {
				t.Fatalf("classified %s (permanent %v)", code, permanent)
			}
		})
	}
}

// TestBlobSourcesAnnotate: a blob is mounted from its source repository
// only when the target is on the same registry, keyed as containerd's
// pusher looks it up (the host without its port).
func TestBlobSourcesAnnotate(t *testing.T) {
	blob := ocispec.Descriptor{Digest: digest.FromString("layer"), Size: 5}
	layers := []snapshotter.Layer{{Digest: blob.Digest, Source: "reg.example:5000/team/app:3"}}
	for _, tc := range []struct {
		target string
		want   map[string]string
	}{
		{"reg.example:5000/team/other:1", map[string]string{labelDistributionSource + "reg.example": "team/app"}},
		{"elsewhere.example/team/app:4", nil},
	} {
		s := newBlobSources(lazyFetcher{}, nil, layers, tc.target)
		src := s.of(blob)
		if src == nil {
			t.Fatalf("%s: no source for the layer", tc.target)
		}
		if got := s.annotate(blob, src).Annotations; !maps.Equal(got, tc.want) {
			t.Errorf("%s: annotations %v, want %v", tc.target, got, tc.want)
		}
	}
	if s := newBlobSources(lazyFetcher{}, nil, layers, "reg.example:5000/team/app:4"); s.of(ocispec.Descriptor{Digest: digest.FromString("other")}) != nil {
		t.Error("a blob without a source has one")
	}
}

// TestAvailable: a pushed image can be made of layers that are local or
// in a registry; a local import needs every blob here.
func TestAvailable(t *testing.T) {
	local := snapshotter.Layer{Digest: digest.FromString("local")}
	remote := snapshotter.Layer{Digest: digest.FromString("remote"), Source: "reg.example/app:1"}
	lost := snapshotter.Layer{Digest: digest.FromString("lost")}
	cs := oneBlobStore{dgst: local.Digest}
	for _, tc := range []struct {
		name   string
		layers []snapshotter.Layer
		local  bool
		want   bool
	}{
		{"local blobs, push", []snapshotter.Layer{local}, false, true},
		{"local blobs, import", []snapshotter.Layer{local}, true, true},
		{"streamed blob, push", []snapshotter.Layer{local, remote}, false, true},
		{"streamed blob, import", []snapshotter.Layer{local, remote}, true, false},
		{"blob nowhere", []snapshotter.Layer{local, lost}, false, false},
	} {
		if got := available(context.Background(), cs, tc.layers, tc.local); got != tc.want {
			t.Errorf("%s: available %v, want %v", tc.name, got, tc.want)
		}
	}

	// A commit built on a pushed one finds its missing layers where that
	// one was pushed; a local one's layers are here or where they were.
	prev := snapshotter.Commit{Target: "reg.example/app:2", Layers: []snapshotter.Layer{local, remote, lost}}
	got := inherit(context.Background(), cs, prev)
	if got[0].Source != "" || got[1].Source != prev.Target || got[2].Source != prev.Target {
		t.Errorf("inherited from a push: %+v", got)
	}
	prev.Local = true
	got = inherit(context.Background(), cs, prev)
	if got[0].Source != "" || got[1].Source != remote.Source || got[2].Source != "" {
		t.Errorf("inherited from a local import: %+v", got)
	}
	if prev.Layers[1].Source != remote.Source {
		t.Error("inherit changed the previous commit's layers")
	}
}

// oneBlobStore is a content store holding one blob.
type oneBlobStore struct {
	content.Store
	dgst digest.Digest
}

func (s oneBlobStore) Info(_ context.Context, dgst digest.Digest) (content.Info, error) {
	if dgst != s.dgst {
		return content.Info{}, errdefs.ErrNotFound
	}
	return content.Info{Digest: dgst}, nil
}

// TestPushErrRefusal: a refusal names the registry and where its
// credentials come from, never the credentials.
func TestPushErrRefusal(t *testing.T) {
	dir := t.TempDir()
	const user, password = "alice", "s3cret"
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{"auths":{"reg.example:5000":{"auth":"`+auth+`"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	cv := &Converter{cfg: config.Convert{DockerConfig: dir}}
	refused := func(host string) error {
		return fmt.Errorf("push to %s/app:1: blob sha256:x: %w", host, remoteerrors.ErrUnexpectedStatus{
			Status: "401 Unauthorized", StatusCode: http.StatusUnauthorized, RequestMethod: http.MethodHead,
			RequestURL: "http://" + host + "/v2/app/blobs/sha256:x",
		})
	}
	file := filepath.Join(dir, "config.json")
	for _, tc := range []struct {
		host, want string
	}{
		{"reg.example:5000", `reg.example:5000 refused the credentials of user "alice" in ` + file + ": push to reg.example:5000/app:1: "},
		{"other.example", "other.example denied access, and " + file + " has no credentials for it: push to other.example/app:1: "},
	} {
		err := cv.pushErr(refused(tc.host))
		if code, permanent := classify(err); code != CodeRegistryAuth || !permanent {
			t.Errorf("%s: classified %s (permanent %v)", tc.host, code, permanent)
		}
		if !strings.HasPrefix(err.Error(), tc.want) {
			t.Errorf("error %q, want it to start with %q", err, tc.want)
		}
		if strings.Contains(err.Error(), password) || strings.Contains(err.Error(), auth) {
			t.Errorf("error %q holds the credentials", err)
		}
	}
	// Other failures are left as registryErr has them.
	err := cv.pushErr(fmt.Errorf("push: %w", syscall.ECONNREFUSED))
	if code, _ := classify(err); code != CodeRegistryUnreachable || errors.Unwrap(err) == nil || strings.Contains(err.Error(), "credentials") {
		t.Errorf("unreachable: %q classified %s", err, code)
	}
}
