//go:build linux

// Package testimage builds a small busybox image for the integration tests
// without network access, from the host's static busybox (Debian's
// busybox-static), and publishes it to a local registry or an OCI archive.
//
// Builds are deterministic (fixed timestamps and ownership, sorted tar
// entries), so the same host busybox always yields the same image digest.
package testimage

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Title is the org.opencontainers.image.title label of every built image.
const Title = "seamless-test-busybox"

// Applets are linked to /bin/busybox in the image's /bin.
var Applets = []string{
	"sh", "ls", "cat", "echo", "sleep", "mkdir", "rm", "cp", "mv", "touch",
	"dd", "sync", "head", "tail", "wc", "sha256sum", "md5sum", "find", "stat",
	"ln", "chmod", "chown", "true", "false", "env", "date", "seq", "yes",
	"grep", "sed", "awk", "test", "[", "id", "ps", "kill", "mount", "df", "du",
	"hostname", "uname", "xargs", "printf", "tr", "cut", "sort", "uniq", "od",
	"hexdump", "mkfifo", "mknod", "readlink", "realpath", "basename",
	"dirname", "truncate", "watch", "usleep", "nproc",
	// Handy in test scripts.
	"pwd", "rmdir", "tee", "timeout", "mktemp", "which", "umount",
}

// busyboxPaths are where Debian's busybox-static installs the binary
// (the same file on merged-/usr systems).
var busyboxPaths = []string{"/bin/busybox", "/usr/bin/busybox"}

// epoch stamps every file, the config and the history: a fixed value keeps
// digests stable across builds and hosts.
var epoch = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)

// File is a regular file to add to the image.
type File struct {
	Path string      // absolute path inside the image
	Mode fs.FileMode // permission bits; 0 means 0644
	Data []byte
}

type options struct {
	oci         bool
	extraLayers [][]File
}

// Option customises Build.
type Option func(*options)

// WithMediaType selects OCI (true, the default) or Docker schema2 (false)
// media types for the manifest, config and layers.
func WithMediaType(oci bool) Option {
	return func(o *options) { o.oci = oci }
}

// WithExtraLayer appends a layer holding files on top of the busybox layer.
// Each call adds one layer, so tests can also build multi-layer images.
func WithExtraLayer(files ...File) Option {
	return func(o *options) { o.extraLayers = append(o.extraLayers, files) }
}

// WithExtraFiles is WithExtraLayer for a path→content map. The files are
// made executable (0755), since the usual payload is a helper binary or
// script.
func WithExtraFiles(files map[string][]byte) Option {
	layer := make([]File, 0, len(files))
	for p, data := range files {
		layer = append(layer, File{Path: p, Mode: 0o755, Data: data})
	}
	return WithExtraLayer(layer...)
}

// Build returns the busybox test image.
func Build(opts ...Option) (v1.Image, error) {
	o := options{oci: true}
	for _, opt := range opts {
		opt(&o)
	}
	manifestMT, configMT, layerMT := types.DockerManifestSchema2, types.DockerConfigJSON, types.DockerLayer
	if o.oci {
		manifestMT, configMT, layerMT = types.OCIManifestSchema1, types.OCIConfigJSON, types.OCILayer
	}

	bin, err := FindBusybox()
	if err != nil {
		return nil, err
	}
	busybox, err := os.ReadFile(bin)
	if err != nil {
		return nil, fmt.Errorf("reading busybox: %w", err)
	}

	base := baseEntries(busybox)
	layers := [][]entry{base}
	have := make(map[string]bool, len(base))
	for _, e := range base {
		have[e.name] = true
	}
	for _, files := range o.extraLayers {
		l, err := extraEntries(files, have)
		if err != nil {
			return nil, err
		}
		layers = append(layers, l)
	}

	img, err := mutate.ConfigFile(empty.Image, &v1.ConfigFile{
		Architecture: runtime.GOARCH,
		OS:           runtime.GOOS,
		Created:      v1.Time{Time: epoch},
		Config: v1.Config{
			Cmd:        []string{"/bin/sh"},
			Env:        []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"},
			WorkingDir: "/",
			Labels:     map[string]string{"org.opencontainers.image.title": Title},
		},
	})
	if err != nil {
		return nil, fmt.Errorf("setting image config: %w", err)
	}
	for i, entries := range layers {
		raw, err := writeTar(entries)
		if err != nil {
			return nil, fmt.Errorf("writing layer %d: %w", i, err)
		}
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(raw)), nil
		}, tarball.WithMediaType(layerMT), tarball.WithCompressedCaching)
		if err != nil {
			return nil, fmt.Errorf("creating layer %d: %w", i, err)
		}
		img, err = mutate.Append(img, mutate.Addendum{
			Layer: layer,
			// Without an explicit history entry mutate records a zero
			// "created" time, which some tools print as year 1.
			History: v1.History{Created: v1.Time{Time: epoch}, CreatedBy: fmt.Sprintf("seamless testimage layer %d", i)},
		})
		if err != nil {
			return nil, fmt.Errorf("appending layer %d: %w", i, err)
		}
	}
	img = mutate.MediaType(img, manifestMT)
	img = mutate.ConfigMediaType(img, configMT)
	return img, nil
}

// FindBusybox returns the path of the host's busybox, which must be
// statically linked: the image has no libc or dynamic loader.
func FindBusybox() (string, error) {
	for _, p := range busyboxPaths {
		if _, err := os.Stat(p); err != nil {
			continue
		}
		if err := checkStatic(p); err != nil {
			return "", err
		}
		return p, nil
	}
	return "", fmt.Errorf("busybox not found in %v; install busybox-static (hack/install-deps.sh)", busyboxPaths)
}

func checkStatic(p string) error {
	f, err := elf.Open(p)
	if err != nil {
		return fmt.Errorf("busybox %s: not an ELF binary: %w", p, err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		// A program interpreter (ld.so) means dynamic linking.
		if prog.Type == elf.PT_INTERP {
			return fmt.Errorf("busybox %s is dynamically linked; install the static one (apt-get install busybox-static)", p)
		}
	}
	return nil
}

// Push uploads img to ref over plain HTTP (the test registries on 127.0.0.1
// have no TLS) and returns the manifest digest.
func Push(ctx context.Context, img v1.Image, ref string) (string, error) {
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		return "", fmt.Errorf("parsing reference %q: %w", ref, err)
	}
	if err := remote.Write(r, img, remote.WithContext(ctx)); err != nil {
		return "", fmt.Errorf("pushing %s: %w", ref, err)
	}
	d, err := img.Digest()
	if err != nil {
		return "", fmt.Errorf("computing digest of %s: %w", ref, err)
	}
	return d.String(), nil
}

// WriteOCIArchive writes img as an OCI image-layout tar that
// `ctr images import` accepts. containerd names the imported image after
// the io.containerd.image.name annotation, so ref should be fully qualified
// (registry/repository:tag).
func WriteOCIArchive(img v1.Image, ref, path string) error {
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		return fmt.Errorf("parsing reference %q: %w", ref, err)
	}
	full := r.Name()
	// go-containerregistry spells Docker Hub "index.docker.io"; containerd
	// stores names verbatim and expects "docker.io".
	if reg := r.Context().RegistryStr(); reg == name.DefaultRegistry {
		full = "docker.io" + strings.TrimPrefix(full, reg)
	}
	annotations := map[string]string{"io.containerd.image.name": full}
	if t, ok := r.(name.Tag); ok {
		// The OCI spec's ref.name is just the tag.
		annotations["org.opencontainers.image.ref.name"] = t.TagStr()
	}

	dir, err := os.MkdirTemp("", "testimage-oci-")
	if err != nil {
		return fmt.Errorf("creating layout dir: %w", err)
	}
	defer os.RemoveAll(dir)
	lp, err := layout.Write(dir, empty.Index)
	if err != nil {
		return fmt.Errorf("creating OCI layout: %w", err)
	}
	if err := lp.AppendImage(img, layout.WithAnnotations(annotations)); err != nil {
		return fmt.Errorf("writing %s to OCI layout: %w", ref, err)
	}

	entries, err := dirEntries(dir)
	if err != nil {
		return err
	}
	raw, err := writeTar(entries)
	if err != nil {
		return fmt.Errorf("archiving OCI layout: %w", err)
	}
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		return fmt.Errorf("writing OCI archive: %w", err)
	}
	return nil
}

// entry is one tar entry; name is relative ("bin/sh"), without a trailing
// slash.
type entry struct {
	name     string
	typ      byte
	mode     int64
	linkname string
	data     []byte
}

func dir(name string, mode int64) entry { return entry{name: name, typ: tar.TypeDir, mode: mode} }

func baseEntries(busybox []byte) []entry {
	es := []entry{
		dir("bin", 0o755), dir("dev", 0o755), dir("etc", 0o755),
		dir("proc", 0o555), dir("root", 0o700), dir("sbin", 0o755),
		dir("sys", 0o555), dir("tmp", 0o1777), dir("usr", 0o755),
		dir("usr/bin", 0o755), dir("usr/sbin", 0o755), dir("var", 0o755),
		{name: "bin/busybox", typ: tar.TypeReg, mode: 0o755, data: busybox},
		{name: "etc/passwd", typ: tar.TypeReg, mode: 0o644, data: []byte(
			"root:x:0:0:root:/root:/bin/sh\n" +
				"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")},
		{name: "etc/group", typ: tar.TypeReg, mode: 0o644, data: []byte(
			"root:x:0:\n" +
				"nobody:x:65534:\n")},
	}
	for _, a := range Applets {
		// Relative, so the links also resolve when the rootfs is inspected
		// from the host.
		es = append(es, entry{name: "bin/" + a, typ: tar.TypeSymlink, mode: 0o777, linkname: "busybox"})
	}
	return es
}

// extraEntries turns files into layer entries, adding the parent
// directories the image does not have yet. Existing directories are not
// repeated: an entry would override their mode (e.g. /tmp's 1777).
func extraEntries(files []File, have map[string]bool) ([]entry, error) {
	var es []entry
	for _, f := range files {
		p := strings.TrimPrefix(path.Clean("/"+f.Path), "/")
		if p == "" {
			return nil, fmt.Errorf("extra file %q: empty path", f.Path)
		}
		for d := path.Dir(p); d != "."; d = path.Dir(d) {
			if !have[d] {
				have[d] = true
				es = append(es, dir(d, 0o755))
			}
		}
		mode := int64(f.Mode.Perm())
		if mode == 0 {
			mode = 0o644
		}
		have[p] = true
		es = append(es, entry{name: p, typ: tar.TypeReg, mode: mode, data: f.Data})
	}
	return es, nil
}

// dirEntries reads a directory tree (the OCI layout) into entries.
func dirEntries(root string) ([]entry, error) {
	var es []entry
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == root {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		if d.IsDir() {
			es = append(es, dir(rel, 0o755))
			return nil
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		es = append(es, entry{name: rel, typ: tar.TypeReg, mode: 0o644, data: data})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("reading OCI layout: %w", err)
	}
	return es, nil
}

// writeTar serialises entries sorted by name (parents sort before their
// children) with fixed ownership and times.
func writeTar(entries []entry) ([]byte, error) {
	sorted := append([]entry(nil), entries...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].name < sorted[j].name })
	for i := 1; i < len(sorted); i++ {
		if sorted[i].name == sorted[i-1].name {
			return nil, fmt.Errorf("duplicate tar entry %q", sorted[i].name)
		}
	}

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range sorted {
		hdr := &tar.Header{
			Typeflag: e.typ,
			Name:     e.name,
			Linkname: e.linkname,
			Mode:     e.mode,
			Size:     int64(len(e.data)),
			ModTime:  epoch,
		}
		if e.typ == tar.TypeDir {
			hdr.Name += "/"
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, fmt.Errorf("tar header %s: %w", e.name, err)
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, fmt.Errorf("tar data %s: %w", e.name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("closing tar: %w", err)
	}
	return buf.Bytes(), nil
}
