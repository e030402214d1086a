//go:build linux

package convert

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"slices"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"

	"github.com/seamless-snapshotter/seamless-snapshotter/config"
	"github.com/seamless-snapshotter/seamless-snapshotter/overlay/layer"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

const (
	// asyncDepth bounds the compressed chunks queued for each consumer of
	// a layer being built.
	asyncDepth = 8
	// leasePrefix names the containerd lease that holds a commit's blobs.
	leasePrefix = "seamless.commit."
	// labelUncompressed is containerd's content label for a layer's
	// diff ID.
	labelUncompressed = "containerd.io/uncompressed"
	// labelCommit marks images and leases with the commit they come from.
	labelCommit = "io.seamless.commit"
	// abortTimeout bounds the clean-up of a partial blob.
	abortTimeout = 10 * time.Second
)

// convert runs one try of a job, from wherever a previous try stopped.
func (cv *Converter) convert(ctx context.Context, c snapshotter.Commit) (snapshotter.Commit, error) {
	client, err := cv.containerd(ctx)
	if err != nil {
		return c, err
	}
	ns, _, err := splitKey(c.SnapshotKey)
	if err != nil {
		return c, err
	}
	ctx = namespaces.WithNamespace(ctx, ns)
	if ctx, err = cv.withLease(ctx, client, c.ID); err != nil {
		return c, err
	}
	// Walked outside the transaction, which holds the database's lock.
	// A layer builder walks it instead (buildLayer): a walk of a fresh
	// capture is tens of milliseconds of system time, which in the
	// daemon would run at the containers' priority right after the
	// capture.
	used := c.CaptureDiskBytes
	if used == 0 && cv.builders == nil {
		used = diskUsage(ctx, cv.store.CaptureUpper(c.ID))
	}
	if c, err = cv.store.UpdateCommit(ctx, c.ID, func(r *snapshotter.Commit) error {
		r.State = snapshotter.StateConverting
		r.Attempts++
		r.NextAttempt = time.Time{}
		r.Progress = snapshotter.Progress{}
		r.CaptureDiskBytes = used
		return nil
	}); err != nil {
		return c, err
	}

	base, err := cv.resolveBase(ctx, client, c)
	if err != nil {
		return c, err
	}
	name := c.Compression
	if name == "" {
		name = cv.cfg.Compression
	}
	comp, err := ParseCompression(name)
	if err != nil {
		return c, permanentErr(CodeConvertFailed, err)
	}
	// The configured level is for the configured compression.
	level := c.CompressionLevel
	if level == 0 && name == cv.cfg.Compression {
		level = cv.cfg.CompressionLevel
	}
	if err := config.ValidateCompressionLevel(name, level); err != nil {
		return c, permanentErr(CodeConvertFailed, fmt.Errorf("compression %w", err))
	}
	// zstd layers have no Docker media type: their image is OCI.
	docker := base.docker && comp == CompressionGzip
	cs := client.ContentStore()
	layers, streamed, err := cv.layers(ctx, client, c, base, comp, level, docker)
	if err != nil {
		return c, err
	}
	img, err := buildImage(base, c, layers, docker)
	if err != nil {
		return c, permanentErr(CodeConvertFailed, err)
	}
	if err := writeImage(ctx, cs, c.ID, img); err != nil {
		return c, err
	}

	var total int64
	for _, d := range append(img.blobs(), img.manifestDesc) {
		total += d.Size
	}
	if c, err = cv.store.UpdateCommit(ctx, c.ID, func(r *snapshotter.Commit) error {
		r.Base = base.record()
		r.Layers = layers
		r.State = snapshotter.StatePushing
		r.Progress = snapshotter.Progress{Total: total}
		return nil
	}); err != nil {
		return c, err
	}
	prog := newProgress(total, cv.store.WaitUnfrozen)
	stop := cv.track(ctx, c.ID, prog)
	if c.Local {
		err = cv.importLocal(ctx, client, c, img)
		prog.add(total)
	} else {
		err = cv.push(ctx, cs, c.Target, base, layers, img, prog)
	}
	stop()
	if err != nil {
		return c, err
	}
	return cv.store.UpdateCommit(ctx, c.ID, func(r *snapshotter.Commit) error {
		r.State = snapshotter.StateDone
		r.ImageDigest = img.manifestDesc.Digest
		r.UploadedBytes = streamed + prog.uploaded.Load()
		r.Progress = snapshotter.Progress{Done: total, Total: total}
		r.Error, r.ErrorCode = "", ""
		r.FinishedAt = time.Now().UTC()
		return nil
	})
}

// layers returns the commit layers of c's image, building c's own: the
// changes since the container's previous published commit, on top of that
// commit's layers, or every change since the base when there is no usable
// previous commit or the chain reached MaxLayers.
//
// streamed is the size of the layer when it reached the registry while it
// was built.
func (cv *Converter) layers(ctx context.Context, client *containerd.Client, c snapshotter.Commit, base *baseImage, comp Compression, level int, docker bool) (_ []snapshotter.Layer, streamed int64, _ error) {
	cs := client.ContentStore()
	// A try cut short after the layer was written reuses it.
	if n := len(c.Layers); n > 0 && c.Layers[n-1].Commit == c.ID && available(ctx, cs, c.Layers, c.Local) {
		return c.Layers, 0, nil
	}
	mediaType, err := comp.MediaType(docker)
	if err != nil {
		return nil, 0, permanentErr(CodeConvertFailed, err)
	}
	all, err := cv.store.ListCommits(ctx)
	if err != nil {
		return nil, 0, err
	}
	var chain []snapshotter.Layer
	opts := layer.Options{}
	if cv.cfg.SourceDateEpoch != 0 {
		clamp := time.Unix(cv.cfg.SourceDateEpoch, 0)
		opts.ModTime = &clamp
	}
	prev := previousCommit(all, c, base, cv.cfg.MaxLayers)
	if prev != nil && available(ctx, cs, prev.Layers, c.Local) {
		chain = inherit(ctx, cs, *prev)
		opts.Previous = cv.store.CaptureUpper(prev.ID)
		// The chain's local blobs were written under earlier commits'
		// leases, which go once this commit is done.
		if err := cv.hold(ctx, client, c.ID, chain); err != nil {
			return nil, 0, err
		}
	}
	l, streamed, err := cv.buildLayer(ctx, cs, c, comp, level, mediaType, opts)
	if err != nil {
		return nil, 0, err
	}
	l.Squashed = opts.Previous == ""
	return append(chain, l), streamed, nil
}

// previousCommit is the commit whose layers c's layer builds on: the
// newest published commit of the same container, over the same base, with
// its capture still on disk and room left in its chain.
func previousCommit(all []snapshotter.Commit, c snapshotter.Commit, base *baseImage, maxLayers int) *snapshotter.Commit {
	var prev *snapshotter.Commit
	for i, p := range all {
		if p.SnapshotID != c.SnapshotID || p.Generation >= c.Generation || p.State != snapshotter.StateDone || p.CaptureRemoved {
			continue
		}
		if prev == nil || p.Generation > prev.Generation {
			prev = &all[i]
		}
	}
	if c.Squash || prev == nil || prev.Parent != c.Parent || len(prev.Layers) == 0 || len(prev.Layers) >= maxLayers {
		return nil
	}
	if (prev.Base == nil) != (base.name == "") || (prev.Base != nil && prev.Base.Digest != base.target.Digest) {
		return nil
	}
	return prev
}

// available reports whether an image can be made of layers: each is in
// the content store or, for a push, in a registry it can be mounted or
// fetched from. A local import needs every blob here.
func available(ctx context.Context, cs content.Store, layers []snapshotter.Layer, local bool) bool {
	for _, l := range layers {
		if _, err := cs.Info(ctx, l.Digest); err != nil && (local || l.Source == "") {
			return false
		}
	}
	return true
}

// inherit returns prev's layers for a commit built on them. A layer not
// in the content store is in the registry repository prev was pushed to,
// with the rest of prev's image.
func inherit(ctx context.Context, cs content.Store, prev snapshotter.Commit) []snapshotter.Layer {
	layers := slices.Clone(prev.Layers)
	for i, l := range layers {
		if _, err := cs.Info(ctx, l.Digest); err == nil {
			layers[i].Source = ""
		} else if !prev.Local {
			layers[i].Source = prev.Target
		}
	}
	return layers
}

// buildLayer writes c's capture as a compressed layer in one walk,
// compressed and digested as it is written, with no uncompressed copy
// anywhere. The first try of a push streams it to the registry only; the
// layer goes into containerd's content store for a local import, when
// KeepPushedLayers asks for it, when the registry cannot take a stream,
// and on later tries, which must not depend on the stream again.
func (cv *Converter) buildLayer(ctx context.Context, cs content.Store, c snapshotter.Commit, comp Compression, level int, mediaType string, opts layer.Options) (_ snapshotter.Layer, streamed int64, _ error) {
	started := time.Now()
	prog := newProgress(0, cv.store.WaitUnfrozen)
	stop := cv.track(ctx, c.ID, prog)
	defer stop()
	var stream *streamUpload
	if !c.Local {
		var err error
		if stream, err = cv.startStreamUpload(ctx, c.Target); err != nil {
			log.G(ctx).WithError(err).Debug("cannot stream the layer while it is built; it is pushed afterwards")
			stream = nil
		}
	}
	keep := stream == nil || cv.cfg.KeepPushedLayers || c.Attempts > 1

	// Each destination takes the blob at its own pace.
	ref := "seamless-layer-" + c.ID
	var (
		dst              io.Writer
		w                content.Writer
		store, streamOut *asyncWriter
	)
	if keep {
		var err error
		if w, err = openLayerWriter(ctx, cs, ref); err != nil {
			if stream != nil {
				stream.abort(err)
			}
			return snapshotter.Layer{}, 0, err
		}
		defer w.Close()
		store = newAsyncWriter(w, asyncDepth)
		dst = store
	}
	if stream != nil {
		streamOut = newAsyncWriter(stream, asyncDepth)
		if keep {
			// The push uploads the local copy if the stream fails.
			dst = io.MultiWriter(store, bestEffort{streamOut})
		} else {
			dst = streamOut
		}
	}
	buf := bufio.NewWriterSize(dst, 1<<20)
	var (
		blob      Blob
		diskBytes int64
		err       error
	)
	if cv.builders != nil {
		blob, diskBytes, err = buildLayerProcess(ctx, buf, cv.store.CaptureUpper(c.ID), opts, comp, level, cv.builders, prog, builderStarvedAfter)
	} else {
		blob, err = CompressLayer(ctx, buf, comp, level, func(tw io.Writer) error {
			_, err := layer.Write(ctx, prog.writer(ctx, tw), cv.store.CaptureUpper(c.ID), opts)
			return err
		})
	}
	if err == nil {
		err = buf.Flush()
	}
	if store != nil {
		if cerr := store.Close(); err == nil {
			err = cerr
		}
	}
	if stream != nil {
		serr := streamOut.Close()
		switch {
		case err != nil:
			stream.abort(err)
		case serr != nil:
			stream.abort(serr)
		default:
			serr = stream.finish(blob.Digest)
		}
		switch {
		case serr == nil && err == nil:
			streamed = blob.Size
		case serr != nil && !keep:
			// The stream was the only copy: the next try keeps one.
			return snapshotter.Layer{}, 0, registryErr(fmt.Errorf("stream layer to %s: %w", c.Target, serr))
		case serr != nil && err == nil:
			log.G(ctx).WithError(serr).Info("streaming the layer to the registry failed; it is pushed afterwards")
		}
	}
	if keep && err == nil {
		err = w.Commit(ctx, blob.Size, blob.Digest, content.WithLabels(map[string]string{labelUncompressed: blob.DiffID.String()}))
		if errdefs.IsAlreadyExists(err) {
			err = nil
		}
	}
	if err != nil {
		// Shutting down: the next try truncates the ingest anyway, and
		// containerd may be gone, so do not wait for it.
		if keep && ctx.Err() == nil {
			actx, cancel := context.WithTimeout(ctx, abortTimeout)
			if aerr := cs.Abort(actx, ref); aerr != nil && !errdefs.IsNotFound(aerr) {
				log.G(ctx).WithError(aerr).Warn("cannot abort partial layer upload")
			}
			cancel()
		}
		return snapshotter.Layer{}, 0, layerErr(err)
	}
	if diskBytes > 0 && c.CaptureDiskBytes == 0 {
		if _, err := cv.store.UpdateCommit(ctx, c.ID, func(r *snapshotter.Commit) error {
			r.CaptureDiskBytes = diskBytes
			return nil
		}); err != nil {
			log.G(ctx).WithError(err).Warn("cannot record the capture's disk usage")
		}
	}
	log.G(ctx).WithFields(log.Fields{
		"digest": blob.Digest, "size": blob.Size, "uncompressed": blob.UncompressedSize,
		"compression": comp, "level": level, "streamed": streamed > 0, "kept": keep, "took": time.Since(started),
	}).Debug("layer built")
	l := snapshotter.Layer{
		MediaType: mediaType,
		Digest:    blob.Digest,
		Size:      blob.Size,
		DiffID:    blob.DiffID,
		Commit:    c.ID,
		Created:   c.CapturedAt,
	}
	if !keep {
		l.Source = c.Target
	}
	return l, streamed, nil
}

// openLayerWriter opens the content store ingest of a layer, emptied: a
// previous try may have left part of the blob.
func openLayerWriter(ctx context.Context, cs content.Store, ref string) (content.Writer, error) {
	w, err := content.OpenWriter(ctx, cs, content.WithRef(ref))
	if err != nil {
		return nil, transientErr(CodeContainerdError, fmt.Errorf("open content writer: %w", err))
	}
	if err := w.Truncate(0); err != nil {
		w.Close()
		return nil, layerErr(err)
	}
	return w, nil
}

// layerErr classifies a failure to build a layer: containerd going away
// is worth another try; a capture that cannot be read, or a content store
// that is full, is not.
func layerErr(err error) error {
	err = errgrpc.ToNative(err)
	if errdefs.IsUnavailable(err) || errdefs.IsCanceled(err) || errdefs.IsDeadlineExceeded(err) {
		return transientErr(CodeContainerdError, fmt.Errorf("build layer from capture: %w", err))
	}
	return permanentErr(CodeConvertFailed, fmt.Errorf("build layer from capture: %w", err))
}

// writeImage stores config and manifest in the content store; the
// manifest's labels keep its config and layers from containerd's GC.
func writeImage(ctx context.Context, cs content.Store, commitID string, img *builtImage) error {
	if err := content.WriteBlob(ctx, cs, "seamless-config-"+commitID, bytes.NewReader(img.config), img.configDesc); err != nil {
		return fmt.Errorf("write config: %w", err)
	}
	if err := content.WriteBlob(ctx, cs, "seamless-manifest-"+commitID, bytes.NewReader(img.manifest), img.manifestDesc, content.WithLabels(img.gcLabels())); err != nil {
		return fmt.Errorf("write manifest: %w", err)
	}
	// The manifest may exist from an earlier try, without labels.
	_, err := cs.Update(ctx, content.Info{Digest: img.manifestDesc.Digest, Labels: img.gcLabels()}, fieldPaths(img.gcLabels())...)
	return err
}

func fieldPaths(labels map[string]string) []string {
	paths := make([]string, 0, len(labels))
	for k := range labels {
		paths = append(paths, "labels."+k)
	}
	return paths
}

// importLocal makes the image available on this node: an image record in
// the commit's namespace, unpacked into this snapshotter so that it runs
// at once.
func (cv *Converter) importLocal(ctx context.Context, client *containerd.Client, c snapshotter.Commit, img *builtImage) error {
	is := client.ImageService()
	record := images.Image{Name: c.Target, Target: img.manifestDesc, Labels: map[string]string{labelCommit: c.ID}}
	if _, err := is.Create(ctx, record); err != nil {
		if !errdefs.IsAlreadyExists(err) {
			return fmt.Errorf("create image %s: %w", c.Target, err)
		}
		if _, err := is.Update(ctx, record, "target", "labels."+labelCommit); err != nil {
			return fmt.Errorf("update image %s: %w", c.Target, err)
		}
	}
	if err := containerd.NewImage(client, record).Unpack(ctx, cv.cfg.SnapshotterName); err != nil {
		// The image exists and a run unpacks it; say why it is not yet.
		log.G(ctx).WithError(err).Warn("image imported but not unpacked")
	}
	return nil
}

// withLease creates (or finds) the commit's lease and returns a context
// whose content writes it holds.
func (cv *Converter) withLease(ctx context.Context, client *containerd.Client, commitID string) (context.Context, error) {
	_, err := client.LeasesService().Create(ctx, leases.WithID(leasePrefix+commitID), leases.WithLabels(map[string]string{labelCommit: commitID}))
	if err != nil && !errdefs.IsAlreadyExists(err) {
		return ctx, transientErr(CodeContainerdError, fmt.Errorf("create lease: %w", err))
	}
	return leases.WithLease(ctx, leasePrefix+commitID), nil
}

// hold adds the local blobs of layers to the commit's lease.
func (cv *Converter) hold(ctx context.Context, client *containerd.Client, commitID string, layers []snapshotter.Layer) error {
	ls := client.LeasesService()
	for _, l := range layers {
		if l.Source != "" {
			continue
		}
		err := ls.AddResource(ctx, leases.Lease{ID: leasePrefix + commitID}, leases.Resource{ID: l.Digest.String(), Type: "content"})
		if err != nil && !errdefs.IsAlreadyExists(err) {
			return fmt.Errorf("hold layer %s: %w", l.Digest, err)
		}
	}
	return nil
}
