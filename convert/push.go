//go:build linux

package convert

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"syscall"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	dockerhosts "github.com/containerd/containerd/v2/core/remotes/docker/config"
	remoteerrors "github.com/containerd/containerd/v2/core/remotes/errors"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/distribution/reference"
	dockerconfig "github.com/docker/cli/cli/config"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/errgroup"

	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// pushConcurrency bounds the blobs uploaded at once.
const pushConcurrency = 4

// labelDistributionSource is containerd's content label (and descriptor
// annotation) naming the repository a blob came from, per registry host;
// the pusher asks the registry to mount a blob from there instead of
// uploading it.
const labelDistributionSource = "containerd.io/distribution.source."

// resolver returns a docker resolver configured as containerd is: hosts.toml
// under HostsDir, credentials from the docker config file.
func (cv *Converter) resolver(ctx context.Context) remotes.Resolver {
	return docker.NewResolver(docker.ResolverOptions{
		Hosts: dockerhosts.ConfigureHosts(ctx, dockerhosts.HostOptions{
			HostDir:     dockerhosts.HostDirFromRoot(cv.cfg.HostsDir),
			Credentials: cv.credentials,
		}),
	})
}

// credentials reads the docker config file (and its credential helpers)
// for each authentication, so that a login after the daemon started is
// seen. Credentials are never logged.
func (cv *Converter) credentials(host string) (string, string, error) {
	cfg, err := dockerconfig.Load(cv.cfg.DockerConfig)
	if err != nil {
		return "", "", err
	}
	key := host
	if host == "registry-1.docker.io" || host == "docker.io" {
		key = "https://index.docker.io/v1/"
	}
	auth, err := cfg.GetAuthConfig(key)
	if err != nil {
		return "", "", fmt.Errorf("credentials for %s: %w", host, err)
	}
	if auth.IdentityToken != "" {
		return "", auth.IdentityToken, nil
	}
	return auth.Username, auth.Password, nil
}

// push uploads the image's blobs, concurrently, skipping those the
// registry has, then the manifest, last, so that the target never names a
// partial image.
func (cv *Converter) push(ctx context.Context, cs content.Store, target string, base *baseImage, layers []snapshotter.Layer, img *builtImage, prog *progress) error {
	resolver := cv.resolver(ctx)
	pusher, err := resolver.Pusher(ctx, target)
	if err != nil {
		return registryErr(fmt.Errorf("push to %s: %w", target, err))
	}
	sources := newBlobSources(resolver, base, layers, target)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(pushConcurrency)
	for _, desc := range img.blobs() {
		g.Go(func() error { return pushBlob(gctx, pusher, cs, desc, sources, prog) })
	}
	if err := g.Wait(); err != nil {
		return cv.pushErr(fmt.Errorf("push to %s: %w", target, err))
	}
	if err := pushBlob(ctx, pusher, cs, img.manifestDesc, nil, prog); err != nil {
		return cv.pushErr(fmt.Errorf("push manifest to %s: %w", target, err))
	}
	return nil
}

// pushErr is registryErr with a refusal explained first: which registry,
// and whether it got credentials and from which file, since that is what
// the user has to fix (the HTTP exchange alone does not say). The
// credentials themselves never appear.
func (cv *Converter) pushErr(err error) error {
	err = registryErr(err)
	if code, _ := classify(err); code != CodeRegistryAuth {
		return err
	}
	return permanentErr(CodeRegistryAuth, fmt.Errorf("%s: %w", cv.refusal(err), err))
}

// refusal says who refused a request and with which credentials.
func (cv *Converter) refusal(err error) string {
	file := "the docker config file"
	if cfg, lerr := dockerconfig.Load(cv.cfg.DockerConfig); cfg != nil && lerr == nil {
		file = cfg.Filename
	}
	// The authorizer asks for credentials by the host it talks to, which
	// hosts.toml may have made a mirror's: take it from the request.
	var status remoteerrors.ErrUnexpectedStatus
	host := ""
	if errors.As(err, &status) {
		if u, perr := url.Parse(status.RequestURL); perr == nil {
			host = u.Host
		}
	}
	if host == "" {
		return "registry authentication failed (credentials from " + file + ")"
	}
	user, secret, cerr := cv.credentials(host)
	switch {
	case cerr != nil || (user == "" && secret == ""):
		return fmt.Sprintf("%s denied access, and %s has no credentials for it", host, file)
	case user == "":
		return fmt.Sprintf("%s refused the identity token for it in %s", host, file)
	default:
		return fmt.Sprintf("%s refused the credentials of user %q in %s", host, user, file)
	}
}

// pushBlob uploads one blob from the content store. A blob with a source
// (a base layer, or a layer an earlier commit streamed to a registry) is
// mounted from the source's repository when the target is on the same
// registry; one the store does not have that the registry cannot mount is
// streamed from the source's registry.
func pushBlob(ctx context.Context, pusher remotes.Pusher, cs content.Store, desc ocispec.Descriptor, sources *blobSources, prog *progress) error {
	src := sources.of(desc)
	if src != nil {
		desc = sources.annotate(desc, src)
	}
	ra, err := cs.ReaderAt(ctx, desc)
	switch {
	case err == nil:
		defer ra.Close()
	case errdefs.IsNotFound(err) && src != nil:
	default:
		return fmt.Errorf("blob %s: %w", desc.Digest, err)
	}
	w, err := pusher.Push(ctx, desc)
	if errdefs.IsAlreadyExists(err) {
		prog.add(desc.Size)
		return nil
	}
	if err != nil {
		return fmt.Errorf("blob %s: %w", desc.Digest, err)
	}
	defer w.Close()
	var r io.Reader
	if ra != nil {
		r = content.NewReader(ra)
	} else {
		rc, err := sources.fetch(ctx, desc, src)
		if err != nil {
			return err
		}
		defer rc.Close()
		r = rc
	}
	if err := content.Copy(ctx, w, prog.reader(ctx, r), desc.Size, desc.Digest); err != nil {
		// A blob its source registry did not give says so alone: the
		// copy's own wording would only repeat the digest.
		var fe *sourceFetchError
		if errors.As(err, &fe) {
			return fe
		}
		return fmt.Errorf("blob %s: %w", desc.Digest, err)
	}
	prog.uploaded.Add(desc.Size)
	return nil
}

// blobSources are where the blobs of an image that the content store may
// lack come from: the base image's repository for base layers, and the
// repository it was pushed to for a layer an earlier commit streamed.
type blobSources struct {
	resolver   remotes.Resolver
	targetHost string
	byDigest   map[digest.Digest]*blobSource
}

// blobSource is one repository that holds blobs.
type blobSource struct {
	ref  string // an image reference in the repository
	host string
	repo string
	what string // "base layer" or "layer", for messages
}

func newBlobSources(resolver remotes.Resolver, base *baseImage, layers []snapshotter.Layer, target string) *blobSources {
	s := &blobSources{resolver: resolver, byDigest: map[digest.Digest]*blobSource{}}
	if t, err := reference.ParseNormalizedNamed(target); err == nil {
		s.targetHost = reference.Domain(t)
	}
	if base != nil && base.name != "" {
		if src := newBlobSource(base.name, "base layer"); src != nil {
			for _, l := range base.manifest.Layers {
				s.byDigest[l.Digest] = src
			}
		}
	}
	sources := map[string]*blobSource{}
	for _, l := range layers {
		if l.Source == "" {
			continue
		}
		if sources[l.Source] == nil {
			sources[l.Source] = newBlobSource(l.Source, "layer")
		}
		if src := sources[l.Source]; src != nil {
			s.byDigest[l.Digest] = src
		}
	}
	return s
}

// newBlobSource returns nil for a local name: there is nowhere to fetch
// from.
func newBlobSource(ref, what string) *blobSource {
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		return nil
	}
	return &blobSource{ref: ref, host: reference.Domain(named), repo: reference.Path(named), what: what}
}

func (s *blobSources) of(desc ocispec.Descriptor) *blobSource {
	if s == nil {
		return nil
	}
	return s.byDigest[desc.Digest]
}

// annotate asks the pusher to mount the blob from its source's repository
// when the target is on the same registry.
func (s *blobSources) annotate(desc ocispec.Descriptor, src *blobSource) ocispec.Descriptor {
	if src.host != s.targetHost {
		return desc
	}
	annotations := map[string]string{}
	for k, v := range desc.Annotations {
		annotations[k] = v
	}
	// Keyed by the host name without its port, as containerd's pusher
	// looks it up.
	host := src.host
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	annotations[labelDistributionSource+host] = src.repo
	desc.Annotations = annotations
	return desc
}

// fetch opens a blob at its source's registry. The docker fetcher
// connects at the first read, not in Fetch, so read errors are wrapped
// too: however the fetch fails, the error names the blob and the image.
func (s *blobSources) fetch(ctx context.Context, desc ocispec.Descriptor, src *blobSource) (io.ReadCloser, error) {
	log.G(ctx).WithFields(log.Fields{"digest": desc.Digest, "from": src.ref}).Info(src.what + " missing from the content store; streaming it from its registry")
	fetcher, err := s.resolver.Fetcher(ctx, src.ref)
	if err != nil {
		return nil, src.fetchErr(desc, err)
	}
	rc, err := fetcher.Fetch(ctx, desc)
	if err != nil {
		return nil, src.fetchErr(desc, err)
	}
	return &sourceReader{ReadCloser: rc, source: src, desc: desc}, nil
}

func (s *blobSource) fetchErr(desc ocispec.Descriptor, err error) error {
	return &sourceFetchError{err: fmt.Errorf("%s %s is not in the content store, and fetching it from %s failed: %w", s.what, desc.Digest, s.ref, err)}
}

// sourceFetchError is a failure to read a blob from its source registry;
// it wraps the cause, which classifies it.
type sourceFetchError struct{ err error }

func (e *sourceFetchError) Error() string { return e.err.Error() }
func (e *sourceFetchError) Unwrap() error { return e.err }

// sourceReader is a blob streamed from its source registry.
type sourceReader struct {
	io.ReadCloser
	source *blobSource
	desc   ocispec.Descriptor
}

func (r *sourceReader) Read(p []byte) (int, error) {
	n, err := r.ReadCloser.Read(p)
	if err != nil && err != io.EOF {
		err = r.source.fetchErr(r.desc, err)
	}
	return n, err
}

// registryErr tags a push error with its code; unknown errors are
// transient registry errors.
func registryErr(err error) error {
	if code, permanent, ok := classifyRegistry(err); ok {
		return &jobError{code: code, permanent: permanent, err: err}
	}
	var je *jobError
	if errors.As(err, &je) || errdefs.IsNotFound(err) || errdefs.IsInvalidArgument(err) {
		return err
	}
	return transientErr(CodeRegistryError, err)
}

// classifyRegistry recognises registry and network failures: auth and
// other 4xx answers cannot be fixed by retrying; 5xx, 408, 429, refused
// or reset connections and timeouts can.
func classifyRegistry(err error) (code string, permanent, ok bool) {
	var status remoteerrors.ErrUnexpectedStatus
	switch {
	case errors.Is(err, docker.ErrInvalidAuthorization):
		return CodeRegistryAuth, true, true
	case errors.As(err, &status):
		switch s := status.StatusCode; {
		case s == http.StatusUnauthorized || s == http.StatusForbidden:
			return CodeRegistryAuth, true, true
		case s == http.StatusRequestTimeout || s == http.StatusTooManyRequests || s >= 500:
			return CodeRegistryError, false, true
		default:
			return CodeRegistryError, true, true
		}
	}
	var netErr net.Error
	if errors.As(err, &netErr) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.EPIPE) {
		return CodeRegistryUnreachable, false, true
	}
	return "", false, false
}
