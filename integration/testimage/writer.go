//go:build linux

package testimage

import (
	"path"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil/workload"
)

// WriterPath is where WithWriter puts the point-in-time writer.
const WriterPath = "/bin/writer"

// WithWriter adds a layer holding the point-in-time writer (the static
// binary of integration/writer, built by testutil.BuildStatic) as
// WriterPath, and the base files it expects in workload.Dir. The base
// files are in the image, not made by the writer, so that deleting them
// in a container makes whiteouts in its upper dir.
func WithWriter(writer []byte) Option {
	files := []File{{Path: WriterPath, Mode: 0o755, Data: writer}}
	for _, b := range workload.Base() {
		files = append(files, File{Path: path.Join(workload.Dir, b.Name), Mode: 0o644, Data: b.Data})
	}
	return WithExtraLayer(files...)
}
