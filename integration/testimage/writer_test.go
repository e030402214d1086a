//go:build linux

package testimage

import (
	"bytes"
	"path"
	"strings"
	"testing"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil/workload"
)

// TestWithWriter: one layer over busybox holds the writer, executable,
// and the base files it checks for at start, as workload.Base has them.
func TestWithWriter(t *testing.T) {
	bin := []byte("\x7fELF not really")
	img, err := Build(WithWriter(bin))
	if err != nil {
		t.Fatal(err)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 2 {
		t.Fatalf("%d layers, %v; want busybox and the writer's", len(layers), err)
	}
	hdrs, data := readLayer(t, img, 1)
	modes := map[string]int64{}
	for _, h := range hdrs {
		modes[strings.TrimSuffix(h.Name, "/")] = h.Mode
	}
	writer := strings.TrimPrefix(WriterPath, "/")
	if !bytes.Equal(data[writer], bin) || modes[writer] != 0o755 {
		t.Errorf("%s: mode %o, %d bytes", writer, modes[writer], len(data[writer]))
	}
	if modes[strings.TrimPrefix(workload.Dir, "/")] != 0o755 {
		t.Errorf("%s: mode %o", workload.Dir, modes[strings.TrimPrefix(workload.Dir, "/")])
	}
	for _, b := range workload.Base() {
		p := strings.TrimPrefix(path.Join(workload.Dir, b.Name), "/")
		if !bytes.Equal(data[p], b.Data) || modes[p] != 0o644 {
			t.Errorf("%s: mode %o, %d bytes, want %d", p, modes[p], len(data[p]), len(b.Data))
		}
	}
}
