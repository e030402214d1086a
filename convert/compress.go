package convert

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"sync/atomic"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/errdefs"
	"github.com/klauspost/compress/zstd"
	"github.com/klauspost/pgzip"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/seamless-snapshotter/seamless-snapshotter/config"
)

// Compression is how a layer blob is compressed.
type Compression string

const (
	// CompressionGzip is the default: every registry and runtime reads it.
	CompressionGzip Compression = "gzip"
	// CompressionZstd compresses better and faster; it needs OCI media
	// types (containerd ≥ 1.5, Docker ≥ 23 with the containerd image store).
	CompressionZstd Compression = "zstd"
	// CompressionNone stores the tar as it is.
	CompressionNone Compression = "none"
)

// ErrNoDockerMediaType: the compression has no Docker (schema 2) media
// type; the image must use OCI media types.
var ErrNoDockerMediaType = fmt.Errorf("%w: zstd layers have no Docker media type, use OCI media types", errdefs.ErrInvalidArgument)

// ParseCompression parses a compression name as found in the config or a
// request: "gzip" (also the default for ""), "zstd", or "none"
// ("uncompressed"). Case and surrounding space do not matter.
func ParseCompression(s string) (Compression, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "gzip":
		return CompressionGzip, nil
	case "zstd":
		return CompressionZstd, nil
	case "none", "uncompressed":
		return CompressionNone, nil
	}
	return "", fmt.Errorf("%w: unknown compression %q (want gzip, zstd or none)", errdefs.ErrInvalidArgument, s)
}

// MediaType is the media type of a layer blob compressed with c, in an
// OCI image or, with docker, in a Docker schema 2 image. zstd has no
// Docker media type: the error wraps ErrNoDockerMediaType.
func (c Compression) MediaType(docker bool) (string, error) {
	switch c {
	case CompressionGzip:
		if docker {
			return images.MediaTypeDockerSchema2LayerGzip, nil
		}
		return ocispec.MediaTypeImageLayerGzip, nil
	case CompressionZstd:
		if docker {
			return "", ErrNoDockerMediaType
		}
		return ocispec.MediaTypeImageLayerZstd, nil
	case CompressionNone:
		if docker {
			return images.MediaTypeDockerSchema2Layer, nil
		}
		return ocispec.MediaTypeImageLayer, nil
	}
	return "", fmt.Errorf("%w: unknown compression %q", errdefs.ErrInvalidArgument, string(c))
}

// Blob describes a layer blob written by CompressLayer.
type Blob struct {
	Digest           digest.Digest // of the blob, as written to dst
	Size             int64         // of the blob
	DiffID           digest.Digest // of the uncompressed tar (the image config's rootfs.diff_ids)
	UncompressedSize int64
	Compression      Compression // its MediaType gives the descriptor's media type
}

// defaultGzipLevel is the fastest level: a layer is built at every commit,
// so speed comes first. It makes a layer about twice as fast as gzip's
// default level, and a few percent larger (BenchmarkCommitToRegistry:
// 4%); go-containerregistry (crane, ko) builds its layers at this level too.
const defaultGzipLevel = pgzip.BestSpeed

// CompressLayer runs write, which produces the uncompressed layer tar,
// and streams its output through the compressor c into dst. The digests
// and sizes of both streams are computed on the way, so there is no
// temporary file and no second read.
//
// Compression runs beside write, in parallel: gzip with pgzip (1 MiB
// blocks, GOMAXPROCS of them at a time; its output does not depend on the
// concurrency), zstd with klauspost's encoder (a single frame; see below
// for its concurrency). The same input on the same machine gives the same
// blob, so a retried job produces the same digest.
//
// level 0 is the default of c: gzip level 1 (see defaultGzipLevel), zstd
// level 3 (zstd's own default).
//
// When write fails (or ctx is done), CompressLayer returns its error and
// stops writing to dst; what dst got by then is not a valid blob.
func CompressLayer(ctx context.Context, dst io.Writer, c Compression, level int, write func(io.Writer) error) (Blob, error) {
	if err := validateCompression(c, level); err != nil {
		return Blob{}, err
	}
	blob := &hashWriter{w: dst, h: digest.SHA256.Digester()}
	var zw io.WriteCloser
	switch c {
	case CompressionGzip:
		if level == 0 {
			level = defaultGzipLevel
		}
		gz, err := pgzip.NewWriterLevel(blob, level)
		if err != nil {
			return Blob{}, err
		}
		if err := gz.SetConcurrency(1<<20, runtime.GOMAXPROCS(0)); err != nil {
			return Blob{}, err
		}
		zw = gz
	case CompressionZstd:
		n := runtime.GOMAXPROCS(0)
		// A zstd stream is compressed by at most two goroutines (one
		// encodes a block while the next is filled), whatever the
		// concurrency. Concurrent blocks split it into 32 MiB jobs
		// compressed side by side, which scales with the cores but
		// costs CPU of its own (each job indexes a 1 MiB overlap again,
		// and refaults its buffers after a GC): measured with two
		// cores, it took 30-90% more CPU than the stream encoder, and
		// longer. So only with more than two (the two modes make
		// different, equally valid, frames).
		opts := []zstd.EOption{zstd.WithEncoderConcurrency(n), zstd.WithConcurrentBlocks(n > 2)}
		if level != 0 {
			opts = append(opts, zstd.WithEncoderLevel(zstd.EncoderLevelFromZstd(level)))
		}
		zs, err := zstd.NewWriter(blob, opts...)
		if err != nil {
			return Blob{}, err
		}
		zw = zs
	case CompressionNone:
		blob.h = nil // the blob is the tar: hash it once
		zw = nopCloser{blob}
	default:
		return Blob{}, fmt.Errorf("%w: unknown compression %q", errdefs.ErrInvalidArgument, string(c))
	}

	tar := &hashWriter{ctx: ctx, w: zw, h: digest.SHA256.Digester()}
	if err := write(tar); err != nil {
		// The compressor's goroutines must end, but what they still
		// have must not reach dst.
		blob.stop.Store(true)
		zw.Close()
		return Blob{}, err
	}
	if err := zw.Close(); err != nil {
		return Blob{}, fmt.Errorf("compress layer (%s): %w", c, err)
	}
	b := Blob{
		Size:             blob.n,
		DiffID:           tar.h.Digest(),
		UncompressedSize: tar.n,
		Compression:      c,
	}
	b.Digest = b.DiffID
	if blob.h != nil {
		b.Digest = blob.h.Digest()
	}
	return b, nil
}

// validateCompression checks a compression and its level.
func validateCompression(c Compression, level int) error {
	switch c {
	case CompressionGzip, CompressionZstd, CompressionNone:
	default:
		return fmt.Errorf("%w: unknown compression %q", errdefs.ErrInvalidArgument, string(c))
	}
	if err := config.ValidateCompressionLevel(string(c), level); err != nil && c != CompressionNone {
		return fmt.Errorf("%w: %v", errdefs.ErrInvalidArgument, err)
	}
	return nil
}

// hashWriter passes writes on to w, hashing (unless h is nil) and
// counting them. With ctx, it fails once ctx is done. Writes come from
// one goroutine at a time (the compressors order their output), and the
// fields are read only after the last one.
type hashWriter struct {
	ctx  context.Context
	w    io.Writer
	h    digest.Digester
	n    int64
	stop atomic.Bool // drop writes: the blob is abandoned
}

func (hw *hashWriter) Write(p []byte) (int, error) {
	if hw.stop.Load() {
		return 0, errAbandoned
	}
	if hw.ctx != nil {
		if err := hw.ctx.Err(); err != nil {
			return 0, err
		}
	}
	n, err := hw.w.Write(p)
	if hw.h != nil {
		hw.h.Hash().Write(p[:n])
	}
	hw.n += int64(n)
	return n, err
}

var errAbandoned = errors.New("layer blob abandoned")

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }
