//go:build linux

package convert

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
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

// TestPushBlobBaseUnreachable: a base layer missing from the content
// store whose registry cannot be reached fails the push with an error
// that names the layer and the base image, and that is retried.
func TestPushBlobBaseUnreachable(t *testing.T) {
	layer := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromString("layer"), Size: 5}
	base := &baseImage{name: "base.example/team/base:1", manifest: ocispec.Manifest{Layers: []ocispec.Descriptor{layer}}}
	source := newBaseSource(lazyFetcher{}, base, "target.example/team/app:1")
	err := pushBlob(context.Background(), discardPusher{}, emptyStore{}, layer, source, newProgress(0, func(context.Context) error { return nil }))
	if err == nil {
		t.Fatal("push succeeded")
	}
	want := fmt.Sprintf("base layer %s is not in the content store, and fetching it from %s failed: ", layer.Digest, base.name)
	if !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("error %q, want it to start with %q", err, want)
	}
	if code, permanent := classify(registryErr(err)); code != CodeRegistryUnreachable || permanent {
		t.Fatalf("classified %s (permanent %v)", code, permanent)
	}
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
