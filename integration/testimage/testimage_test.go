//go:build linux

package testimage

import (
	"archive/tar"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/seamless-snapshotter/seamless-snapshotter/integration/harness"
)

func TestBuild(t *testing.T) {
	bb, err := FindBusybox()
	if err != nil {
		t.Fatal(err)
	}
	hostBusybox, err := os.Stat(bb)
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name                          string
		opts                          []Option
		manifestMT, configMT, layerMT types.MediaType
	}{
		{"default is OCI", nil, types.OCIManifestSchema1, types.OCIConfigJSON, types.OCILayer},
		{"OCI", []Option{WithMediaType(true)}, types.OCIManifestSchema1, types.OCIConfigJSON, types.OCILayer},
		{"Docker", []Option{WithMediaType(false)}, types.DockerManifestSchema2, types.DockerConfigJSON, types.DockerLayer},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			img, err := Build(tc.opts...)
			if err != nil {
				t.Fatal(err)
			}
			m, err := img.Manifest()
			if err != nil {
				t.Fatal(err)
			}
			if m.MediaType != tc.manifestMT || m.Config.MediaType != tc.configMT {
				t.Errorf("media types: manifest %s config %s, want %s %s", m.MediaType, m.Config.MediaType, tc.manifestMT, tc.configMT)
			}
			if len(m.Layers) != 1 || m.Layers[0].MediaType != tc.layerMT {
				t.Fatalf("layers %+v, want one %s", m.Layers, tc.layerMT)
			}

			cf, err := img.ConfigFile()
			if err != nil {
				t.Fatal(err)
			}
			c := cf.Config
			if !slices.Equal(c.Cmd, []string{"/bin/sh"}) ||
				!slices.Equal(c.Env, []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}) ||
				c.WorkingDir != "/" ||
				c.Labels["org.opencontainers.image.title"] != Title {
				t.Errorf("config %+v", c)
			}
			if cf.OS != "linux" || cf.Architecture == "" || len(cf.RootFS.DiffIDs) != 1 {
				t.Errorf("config file: os %q arch %q diffIDs %v", cf.OS, cf.Architecture, cf.RootFS.DiffIDs)
			}

			hdrs, data := readLayer(t, img, 0)
			checkSorted(t, hdrs)
			byName := map[string]*tar.Header{}
			for _, h := range hdrs {
				byName[h.Name] = h
			}
			bbHdr := byName["bin/busybox"]
			if bbHdr == nil || bbHdr.Typeflag != tar.TypeReg || bbHdr.Mode != 0o755 || bbHdr.Size != hostBusybox.Size() {
				t.Errorf("bin/busybox: %+v, want regular 0755 of %d bytes", bbHdr, hostBusybox.Size())
			}
			for _, a := range Applets {
				h := byName["bin/"+a]
				if h == nil || h.Typeflag != tar.TypeSymlink || h.Linkname != "busybox" {
					t.Errorf("bin/%s: %+v, want symlink to busybox", a, h)
				}
			}
			for _, d := range []string{"bin/", "usr/bin/", "etc/", "root/", "var/", "proc/", "sys/", "dev/"} {
				if h := byName[d]; h == nil || h.Typeflag != tar.TypeDir {
					t.Errorf("%s: %+v, want directory", d, h)
				}
			}
			if h := byName["tmp/"]; h == nil || h.FileInfo().Mode() != os.ModeDir|os.ModeSticky|0o777 {
				t.Errorf("tmp/: %+v, want mode 1777", h)
			}
			for _, want := range []string{"root:x:0:0:", "nobody:x:65534:65534:"} {
				if !strings.Contains(string(data["etc/passwd"]), want) {
					t.Errorf("etc/passwd lacks %q:\n%s", want, data["etc/passwd"])
				}
			}
			if !strings.Contains(string(data["etc/group"]), "root:x:0:") {
				t.Errorf("etc/group lacks root:\n%s", data["etc/group"])
			}

			// Determinism: a second build must produce the same digest.
			again, err := Build(tc.opts...)
			if err != nil {
				t.Fatal(err)
			}
			if d1, d2 := digest(t, img), digest(t, again); d1 != d2 {
				t.Errorf("builds differ: %s vs %s", d1, d2)
			}
		})
	}
}

// TestAppletsExist guards against Debian dropping an applet: a dangling
// symlink would only show up as "not found" inside a container.
func TestAppletsExist(t *testing.T) {
	bb, err := FindBusybox()
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bb, "--list").Output()
	if err != nil {
		t.Fatalf("%s --list: %v", bb, err)
	}
	have := strings.Fields(string(out))
	for _, a := range Applets {
		if !slices.Contains(have, a) {
			t.Errorf("busybox has no applet %q", a)
		}
	}
}

func TestExtraLayers(t *testing.T) {
	img, err := Build(
		WithExtraFiles(map[string][]byte{"/opt/helper/run": []byte("#!/bin/sh\n"), "/tmp/seed": []byte("x")}),
		WithExtraLayer(File{Path: "etc/motd", Data: []byte("hi\n")}),
	)
	if err != nil {
		t.Fatal(err)
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != 3 {
		t.Fatalf("got %d layers, want 3", len(layers))
	}

	hdrs, data := readLayer(t, img, 1)
	checkSorted(t, hdrs)
	var names []string
	for _, h := range hdrs {
		names = append(names, h.Name)
	}
	// tmp/ must not be repeated: it would reset the base layer's mode.
	if want := []string{"opt/", "opt/helper/", "opt/helper/run", "tmp/seed"}; !slices.Equal(names, want) {
		t.Errorf("layer 1 entries %q, want %q", names, want)
	}
	if h := hdrs[len(hdrs)-1]; h.Mode != 0o755 {
		t.Errorf("%s mode %o, want 0755", h.Name, h.Mode)
	}
	if string(data["opt/helper/run"]) != "#!/bin/sh\n" {
		t.Errorf("opt/helper/run content %q", data["opt/helper/run"])
	}

	hdrs, _ = readLayer(t, img, 2)
	if len(hdrs) != 1 || hdrs[0].Name != "etc/motd" || hdrs[0].Mode != 0o644 {
		t.Errorf("layer 2: %+v, want etc/motd 0644 only", hdrs)
	}
}

func TestWriteOCIArchive(t *testing.T) {
	img, err := Build()
	if err != nil {
		t.Fatal(err)
	}
	const ref = "127.0.0.1:5000/seamless/busybox:latest"
	p := filepath.Join(t.TempDir(), "busybox.tar")
	if err := WriteOCIArchive(img, ref, p); err != nil {
		t.Fatal(err)
	}

	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	files := map[string][]byte{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name] = b
	}

	if _, ok := files["oci-layout"]; !ok {
		t.Error("archive has no oci-layout")
	}
	var idx v1.IndexManifest
	if err := json.Unmarshal(files["index.json"], &idx); err != nil {
		t.Fatalf("index.json: %v", err)
	}
	if len(idx.Manifests) != 1 {
		t.Fatalf("index.json has %d manifests, want 1", len(idx.Manifests))
	}
	desc := idx.Manifests[0]
	if desc.Digest.String() != digest(t, img) {
		t.Errorf("index.json points at %s, want %s", desc.Digest, digest(t, img))
	}
	if got := desc.Annotations["io.containerd.image.name"]; got != ref {
		t.Errorf("io.containerd.image.name %q, want %q", got, ref)
	}
	if got := desc.Annotations["org.opencontainers.image.ref.name"]; got != "latest" {
		t.Errorf("org.opencontainers.image.ref.name %q, want latest", got)
	}

	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range append([]v1.Descriptor{desc, m.Config}, m.Layers...) {
		blob := "blobs/" + d.Digest.Algorithm + "/" + d.Digest.Hex
		if b, ok := files[blob]; !ok || int64(len(b)) != d.Size {
			t.Errorf("blob %s missing or not %d bytes", blob, d.Size)
		}
	}
}

func TestPushToRegistry(t *testing.T) {
	harness.RequireBinaries(t, harness.BinRegistry)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	reg := harness.NewRegistry(t)
	if err := reg.Start(ctx); err != nil {
		t.Fatal(err)
	}
	addr := reg.Addr()

	for _, oci := range []bool{true, false} {
		t.Run(fmt.Sprintf("oci=%v", oci), func(t *testing.T) {
			img, err := Build(WithMediaType(oci))
			if err != nil {
				t.Fatal(err)
			}
			ref := fmt.Sprintf("%s/seamless/busybox:oci-%v", addr, oci)
			pushed, err := Push(ctx, img, ref)
			if err != nil {
				t.Fatal(err)
			}
			if pushed != digest(t, img) {
				t.Errorf("Push returned %s, image digest is %s", pushed, digest(t, img))
			}

			r, err := name.ParseReference(ref, name.Insecure)
			if err != nil {
				t.Fatal(err)
			}
			pulled, err := remote.Image(r, remote.WithContext(ctx))
			if err != nil {
				t.Fatalf("pulling %s: %v", ref, err)
			}
			if got := digest(t, pulled); got != pushed {
				t.Errorf("pulled %s, pushed %s", got, pushed)
			}
			// Reading a layer back checks the blobs, not only the manifest.
			if hdrs, _ := readLayer(t, pulled, 0); len(hdrs) == 0 {
				t.Error("pulled layer is empty")
			}
		})
	}
}

func readLayer(t *testing.T, img v1.Image, i int) ([]*tar.Header, map[string][]byte) {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	rc, err := layers[i].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	var hdrs []*tar.Header
	data := map[string][]byte{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return hdrs, data
		}
		if err != nil {
			t.Fatalf("layer %d: %v", i, err)
		}
		hdrs = append(hdrs, h)
		if h.Typeflag == tar.TypeReg {
			if data[h.Name], err = io.ReadAll(tr); err != nil {
				t.Fatalf("layer %d %s: %v", i, h.Name, err)
			}
		}
	}
}

func checkSorted(t *testing.T, hdrs []*tar.Header) {
	t.Helper()
	for i := 1; i < len(hdrs); i++ {
		a, b := strings.TrimSuffix(hdrs[i-1].Name, "/"), strings.TrimSuffix(hdrs[i].Name, "/")
		if a >= b {
			t.Errorf("tar entries not sorted: %q before %q", hdrs[i-1].Name, hdrs[i].Name)
		}
	}
}

func digest(t *testing.T, img v1.Image) string {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}
