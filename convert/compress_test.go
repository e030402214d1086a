//go:build linux

package convert

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/errdefs"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/seamless-snapshotter/seamless-snapshotter/overlay/layer"
	"golang.org/x/sys/unix"
)

func TestParseCompression(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Compression
		err  bool
	}{
		{"", CompressionGzip, false},
		{"gzip", CompressionGzip, false},
		{" GZIP ", CompressionGzip, false},
		{"zstd", CompressionZstd, false},
		{"Zstd", CompressionZstd, false},
		{"none", CompressionNone, false},
		{"uncompressed", CompressionNone, false},
		{"bzip2", "", true},
		{"gz", "", true},
	} {
		got, err := ParseCompression(tc.in)
		if got != tc.want || (err != nil) != tc.err || (err != nil && !errdefs.IsInvalidArgument(err)) {
			t.Errorf("ParseCompression(%q) = %q, %v; want %q, error %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

func TestMediaType(t *testing.T) {
	for _, tc := range []struct {
		c      Compression
		docker bool
		want   string
		err    error
	}{
		{CompressionGzip, false, ocispec.MediaTypeImageLayerGzip, nil},
		{CompressionGzip, true, images.MediaTypeDockerSchema2LayerGzip, nil},
		{CompressionZstd, false, ocispec.MediaTypeImageLayerZstd, nil},
		{CompressionZstd, true, "", ErrNoDockerMediaType},
		{CompressionNone, false, ocispec.MediaTypeImageLayer, nil},
		{CompressionNone, true, images.MediaTypeDockerSchema2Layer, nil},
		{"lz4", false, "", errdefs.ErrInvalidArgument},
	} {
		got, err := tc.c.MediaType(tc.docker)
		if got != tc.want || !errors.Is(err, tc.err) || (tc.err == nil) != (err == nil) {
			t.Errorf("%q.MediaType(docker=%v) = %q, %v; want %q, %v", tc.c, tc.docker, got, err, tc.want, tc.err)
		}
	}
	if !errdefs.IsInvalidArgument(ErrNoDockerMediaType) {
		t.Error("ErrNoDockerMediaType is not an invalid argument")
	}
}

// layerData is size bytes that compress like a real layer: text-like runs
// and incompressible stretches.
func layerData(seed uint64, size int) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	words := strings.Fields("the quick brown fox jumps over lazy dog lorem ipsum dolor sit amet usr lib bin etc var config json yaml")
	var b bytes.Buffer
	for b.Len() < size {
		if r.IntN(10) == 0 {
			chunk := make([]byte, 1+r.IntN(1024))
			for i := range chunk {
				chunk[i] = byte(r.Uint32())
			}
			b.Write(chunk)
			continue
		}
		for range 1 + r.IntN(200) {
			b.WriteString(words[r.IntN(len(words))])
			b.WriteByte(" \n"[r.IntN(2)])
		}
	}
	return b.Bytes()[:size]
}

func decompress(t testing.TB, c Compression, blob []byte) []byte {
	t.Helper()
	var r io.Reader
	switch c {
	case CompressionGzip:
		zr, err := gzip.NewReader(bytes.NewReader(blob)) // the standard library, not pgzip: any reader must do
		if err != nil {
			t.Fatal(err)
		}
		r = zr
	case CompressionZstd:
		zr, err := zstd.NewReader(bytes.NewReader(blob))
		if err != nil {
			t.Fatal(err)
		}
		defer zr.Close()
		r = zr
	default:
		r = bytes.NewReader(blob)
	}
	data, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("decompress %s: %v", c, err)
	}
	return data
}

// writeChunks writes data in uneven pieces, as a tar writer does.
func writeChunks(data []byte) func(io.Writer) error {
	return func(w io.Writer) error {
		for off, i := 0, 0; off < len(data); i++ {
			n := min(len(data)-off, 512+(i*7919)%(300<<10))
			if _, err := w.Write(data[off : off+n]); err != nil {
				return err
			}
			off += n
		}
		return nil
	}
}

func TestCompressLayer(t *testing.T) {
	for _, c := range []Compression{CompressionGzip, CompressionZstd, CompressionNone} {
		for _, size := range []int{0, 1, 100 << 10, 9<<20 + 13} {
			t.Run(fmt.Sprintf("%s/%d", c, size), func(t *testing.T) {
				data := layerData(uint64(size), size)
				var dst bytes.Buffer
				blob, err := CompressLayer(context.Background(), &dst, c, 0, writeChunks(data))
				if err != nil {
					t.Fatal(err)
				}
				if blob.Digest != digest.FromBytes(dst.Bytes()) || blob.Size != int64(dst.Len()) {
					t.Errorf("blob %s/%d, dst %s/%d", blob.Digest, blob.Size, digest.FromBytes(dst.Bytes()), dst.Len())
				}
				if blob.DiffID != digest.FromBytes(data) || blob.UncompressedSize != int64(size) || blob.Compression != c {
					t.Errorf("blob %+v, data %s/%d", blob, digest.FromBytes(data), size)
				}
				got := decompress(t, c, dst.Bytes())
				if digest.FromBytes(got) != blob.DiffID {
					t.Fatalf("decompressed %d bytes, digest %s, want %s", len(got), digest.FromBytes(got), blob.DiffID)
				}
				if c == CompressionNone && blob.Digest != blob.DiffID {
					t.Errorf("uncompressed blob %s, diffID %s", blob.Digest, blob.DiffID)
				}
				if c != CompressionNone && size > 1<<20 && blob.Size > int64(size)/2 {
					t.Errorf("%d bytes compressed to %d", size, blob.Size)
				}

				// Same input, same blob: a retried job pushes the same digest.
				again, err := CompressLayer(context.Background(), io.Discard, c, 0, writeChunks(data))
				if err != nil || again != blob {
					t.Errorf("second run %+v, %v; first %+v", again, err, blob)
				}
			})
		}
	}
}

// TestCompressLayerLevels: every level gives a valid blob; a faster level
// a larger one; the default gzip level is the fastest; a level out of
// range is refused before any output.
func TestCompressLayerLevels(t *testing.T) {
	data := layerData(7, 4<<20)
	for _, tc := range []struct {
		c           Compression
		fast, small int
		invalid     []int
	}{
		{CompressionGzip, 1, 9, []int{-1, 10}},
		{CompressionZstd, 1, 19, []int{-1, 23}},
	} {
		sizes := map[int]int64{}
		for _, level := range []int{tc.fast, 0, tc.small} {
			var dst bytes.Buffer
			blob, err := CompressLayer(context.Background(), &dst, tc.c, level, writeChunks(data))
			if err != nil {
				t.Fatalf("%s level %d: %v", tc.c, level, err)
			}
			if got := decompress(t, tc.c, dst.Bytes()); digest.FromBytes(got) != blob.DiffID || blob.DiffID != digest.FromBytes(data) {
				t.Fatalf("%s level %d: the blob does not decompress to the layer", tc.c, level)
			}
			sizes[level] = blob.Size
		}
		if tc.c == CompressionGzip && sizes[0] != sizes[tc.fast] {
			t.Errorf("gzip: default level made %d bytes, level 1 %d", sizes[0], sizes[tc.fast])
		}
		if sizes[tc.fast] < sizes[tc.small] {
			t.Errorf("%s: level %d made %d bytes, level %d %d", tc.c, tc.fast, sizes[tc.fast], tc.small, sizes[tc.small])
		}
		for _, level := range tc.invalid {
			var dst bytes.Buffer
			if _, err := CompressLayer(context.Background(), &dst, tc.c, level, writeChunks(data)); !errdefs.IsInvalidArgument(err) || dst.Len() != 0 {
				t.Errorf("%s level %d: %v, %d bytes written", tc.c, level, err, dst.Len())
			}
		}
	}
}

func TestCompressLayerErrors(t *testing.T) {
	errBoom := errors.New("boom")
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, c := range []Compression{CompressionGzip, CompressionZstd, CompressionNone} {
		for _, tc := range []struct {
			name  string
			ctx   context.Context
			dst   io.Writer
			write func(io.Writer) error
			want  error
		}{{
			name: "write fails after some output",
			ctx:  context.Background(),
			dst:  io.Discard,
			write: func(w io.Writer) error {
				if err := writeChunks(layerData(1, 5<<20))(w); err != nil {
					return err
				}
				return errBoom
			},
			want: errBoom,
		}, {
			name:  "destination fails",
			ctx:   context.Background(),
			dst:   failWriter{errBoom},
			write: writeChunks(layerData(2, 5<<20)),
			want:  errBoom,
		}, {
			name:  "canceled",
			ctx:   canceled,
			dst:   io.Discard,
			write: writeChunks(layerData(3, 1<<20)),
			want:  context.Canceled,
		}} {
			t.Run(string(c)+"/"+tc.name, func(t *testing.T) {
				blob, err := CompressLayer(tc.ctx, tc.dst, c, 0, tc.write)
				if !errors.Is(err, tc.want) || blob != (Blob{}) {
					t.Fatalf("CompressLayer = %+v, %v; want error %v", blob, err, tc.want)
				}
			})
		}
	}
	if _, err := CompressLayer(context.Background(), io.Discard, "lz4", 0, writeChunks(nil)); !errdefs.IsInvalidArgument(err) {
		t.Errorf("unknown compression: %v", err)
	}
}

type failWriter struct{ err error }

func (f failWriter) Write([]byte) (int, error) { return 0, f.err }

// TestCompressLayerParallel: a large layer is compressed by several
// goroutines. The compressors' goroutines are counted in stack dumps
// taken while the layer is written.
func TestCompressLayerParallel(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(4)) // whatever this machine has
	for _, tc := range []struct {
		c    Compression
		size int
		pkg  string
	}{
		{CompressionGzip, 32 << 20, "github.com/klauspost/pgzip."},
		{CompressionZstd, 160 << 20, "github.com/klauspost/compress/zstd."}, // jobs of 32 MiB
	} {
		t.Run(string(tc.c), func(t *testing.T) {
			data := layerData(4, 1<<20)
			most := 0
			stacks := make([]byte, 1<<20)
			_, err := CompressLayer(context.Background(), io.Discard, tc.c, 0, func(w io.Writer) error {
				for range tc.size >> 20 {
					if _, err := w.Write(data); err != nil {
						return err
					}
					n := runtime.Stack(stacks, true)
					gs := strings.Split(string(stacks[:n]), "\n\n")
					busy := 0
					for _, g := range gs[1:] { // the first is this one
						if strings.Contains(g, tc.pkg) {
							busy++
						}
					}
					most = max(most, busy)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("at most %d %s goroutines besides the writer", most, tc.pkg)
			if most < 2 {
				t.Errorf("at most %d compressor goroutines ran beside the writer", most)
			}
		})
	}
}

// BenchmarkLayer writes a full layer of a 10,000-file, 240 MB upper (in
// the page cache) to io.Discard: the tar alone, and through each
// compressor.
func BenchmarkLayer(b *testing.B) {
	upper := b.TempDir()
	const files, total = 10_000, 240 << 20
	var n int64
	for i := range files {
		d := filepath.Join(upper, fmt.Sprintf("d%02d", i/100))
		if i%100 == 0 {
			if err := os.Mkdir(d, 0o755); err != nil {
				b.Fatal(err)
			}
		}
		size := (i*7919)%(2*total/files) + 1 // 1 B to 48 KiB, 24 KiB on average
		if err := os.WriteFile(filepath.Join(d, fmt.Sprintf("f%04d", i)), layerData(uint64(i), size), 0o644); err != nil {
			b.Fatal(err)
		}
		n += int64(size)
	}
	b.Logf("upper: %d files, %d MB", files, n>>20)

	for _, c := range []Compression{CompressionNone, CompressionGzip, CompressionZstd} {
		b.Run(string(c), func(b *testing.B) {
			b.SetBytes(n)
			var blob Blob
			cpu0 := cpuTime(b)
			for b.Loop() {
				var err error
				blob, err = CompressLayer(context.Background(), io.Discard, c, 0, func(w io.Writer) error {
					_, err := layer.Write(context.Background(), w, upper, layer.Options{})
					return err
				})
				if err != nil {
					b.Fatal(err)
				}
			}
			// On a shared machine wall time says little: CPU time (all
			// goroutines, user and system) says what a layer costs.
			b.ReportMetric((cpuTime(b)-cpu0).Seconds()/float64(b.N), "cpu-s/op")
			b.ReportMetric(float64(blob.Size)/float64(blob.UncompressedSize), "ratio")
		})
	}
}

// cpuTime is the user and system CPU time of the process so far.
func cpuTime(b *testing.B) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
