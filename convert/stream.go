//go:build linux

package convert

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	dockerhosts "github.com/containerd/containerd/v2/core/remotes/docker/config"
	remoteerrors "github.com/containerd/containerd/v2/core/remotes/errors"
	"github.com/containerd/containerd/v2/pkg/reference"
	"github.com/opencontainers/go-digest"
)

// streamUpload sends a layer to the registry while it is being built,
// with the distribution API's chunked upload in one streamed chunk: POST
// opens an upload, one PATCH carries the bytes as the compressor makes
// them, and a PUT with the digest, known only at the end, commits it. The
// push that follows finds the blob there and skips it; if the stream
// fails, that push uploads the blob from the content store instead.
//
// containerd's pusher cannot do this: it wants the digest before the
// first byte.
type streamUpload struct {
	host     docker.RegistryHost
	ctx      context.Context // with the repository's push scope
	location *url.URL
	pw       *io.PipeWriter
	patched  chan error
}

// startStreamUpload opens an upload of a new blob in target's repository.
func (cv *Converter) startStreamUpload(ctx context.Context, target string) (*streamUpload, error) {
	refspec, err := reference.Parse(target)
	if err != nil {
		return nil, err
	}
	hosts, err := dockerhosts.ConfigureHosts(ctx, dockerhosts.HostOptions{
		HostDir:     dockerhosts.HostDirFromRoot(cv.cfg.HostsDir),
		Credentials: cv.credentials,
	})(refspec.Hostname())
	if err != nil {
		return nil, err
	}
	var host *docker.RegistryHost
	for i := range hosts {
		if hosts[i].Capabilities.Has(docker.HostCapabilityPush) {
			host = &hosts[i]
			break
		}
	}
	if host == nil {
		return nil, errors.New("no registry host accepts pushes")
	}
	if ctx, err = docker.ContextWithRepositoryScope(ctx, refspec, true); err != nil {
		return nil, err
	}
	repo := strings.TrimPrefix(refspec.Locator, refspec.Hostname()+"/")
	start := &url.URL{Scheme: host.Scheme, Host: host.Host, Path: host.Path + "/" + repo + "/blobs/uploads/"}
	resp, err := doAuthorized(ctx, *host, func() (*http.Request, error) {
		return http.NewRequestWithContext(ctx, http.MethodPost, start.String(), nil)
	})
	if err != nil {
		return nil, err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		return nil, unexpectedStatus(resp)
	}
	location, err := resp.Request.URL.Parse(resp.Header.Get("Location"))
	if err != nil {
		return nil, fmt.Errorf("upload location: %w", err)
	}
	s := &streamUpload{host: *host, ctx: ctx, location: location, patched: make(chan error, 1)}
	pr, pw := io.Pipe()
	s.pw = pw
	go s.patch(pr)
	return s, nil
}

// patch streams the upload's bytes. The request cannot be replayed: its
// authorization is the one the POST obtained.
func (s *streamUpload) patch(body *io.PipeReader) {
	req, err := http.NewRequestWithContext(s.ctx, http.MethodPatch, s.location.String(), body)
	if err == nil {
		req.Header.Set("Content-Type", "application/octet-stream")
		if s.host.Authorizer != nil {
			err = s.host.Authorizer.Authorize(s.ctx, req)
		}
	}
	var resp *http.Response
	if err == nil {
		resp, err = s.host.Client.Do(req)
	}
	if err == nil {
		resp.Body.Close()
		if resp.StatusCode != http.StatusAccepted && resp.StatusCode != http.StatusNoContent {
			err = unexpectedStatus(resp)
		} else if loc := resp.Header.Get("Location"); loc != "" {
			s.location, err = resp.Request.URL.Parse(loc)
		}
	}
	// Unblock the writer if the request ended before the body did.
	body.CloseWithError(errors.Join(err, errors.New("upload ended")))
	s.patched <- err
}

// Write sends bytes of the blob.
func (s *streamUpload) Write(p []byte) (int, error) { return s.pw.Write(p) }

// finish ends the stream and commits the blob under its digest.
func (s *streamUpload) finish(dgst digest.Digest) error {
	s.pw.Close()
	if err := <-s.patched; err != nil {
		return err
	}
	q := s.location.Query()
	q.Set("digest", dgst.String())
	put := *s.location
	put.RawQuery = q.Encode()
	resp, err := doAuthorized(s.ctx, s.host, func() (*http.Request, error) {
		return http.NewRequestWithContext(s.ctx, http.MethodPut, put.String(), nil)
	})
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		return unexpectedStatus(resp)
	}
	return nil
}

// abort ends the stream with err; the registry drops the upload when it
// expires.
func (s *streamUpload) abort(err error) {
	s.pw.CloseWithError(err)
	<-s.patched
}

// doAuthorized sends a request with the host's authorization, answering
// one challenge (401) with the credentials or token it asks for.
func doAuthorized(ctx context.Context, host docker.RegistryHost, newReq func() (*http.Request, error)) (*http.Response, error) {
	for attempt := 0; ; attempt++ {
		req, err := newReq()
		if err != nil {
			return nil, err
		}
		for k, v := range host.Header {
			req.Header[k] = v
		}
		if host.Authorizer != nil {
			if err := host.Authorizer.Authorize(ctx, req); err != nil {
				return nil, err
			}
		}
		resp, err := host.Client.Do(req)
		if err != nil {
			return nil, err
		}
		if resp.StatusCode != http.StatusUnauthorized || host.Authorizer == nil || attempt > 0 {
			return resp, nil
		}
		resp.Body.Close()
		if err := host.Authorizer.AddResponses(ctx, []*http.Response{resp}); err != nil {
			return nil, err
		}
	}
}

func unexpectedStatus(resp *http.Response) error {
	u := *resp.Request.URL
	u.RawQuery = "" // the upload state is a capability
	return remoteerrors.ErrUnexpectedStatus{
		Status: resp.Status, StatusCode: resp.StatusCode,
		RequestURL: u.Redacted(), RequestMethod: resp.Request.Method,
	}
}

// asyncWriter hands what is written to w on a goroutine of its own, with
// up to depth writes in flight, so that a slow consumer (containerd's
// content store, the registry) overlaps with the producer and with the
// other consumers instead of adding up.
type asyncWriter struct {
	w      io.Writer
	ch     chan []byte
	done   chan struct{}
	failed atomic.Bool
	err    error // set before failed, read after it
}

func newAsyncWriter(w io.Writer, depth int) *asyncWriter {
	a := &asyncWriter{w: w, ch: make(chan []byte, depth), done: make(chan struct{})}
	go func() {
		defer close(a.done)
		for b := range a.ch {
			if a.failed.Load() {
				continue
			}
			if _, err := a.w.Write(b); err != nil {
				a.err = err
				a.failed.Store(true)
			}
		}
	}()
	return a
}

// Write queues a copy of p; it fails once the consumer has failed.
func (a *asyncWriter) Write(p []byte) (int, error) {
	if a.failed.Load() {
		return 0, a.err
	}
	a.ch <- bytes.Clone(p)
	return len(p), nil
}

// Close waits until everything queued is written and returns the
// consumer's error.
func (a *asyncWriter) Close() error {
	close(a.ch)
	<-a.done
	return a.err
}

// bestEffort is a writer whose failure must not stop the producer: the
// stream to the registry, which the push redoes if it fails.
type bestEffort struct{ a *asyncWriter }

func (b bestEffort) Write(p []byte) (int, error) {
	b.a.Write(p) // after a failure, drops the bytes
	return len(p), nil
}
