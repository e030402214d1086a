//go:build linux

package convert

import (
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// builtImage is a commit's image: config and manifest bytes, and the
// blobs a registry needs before the manifest.
type builtImage struct {
	config       []byte
	configDesc   ocispec.Descriptor
	manifest     []byte
	manifestDesc ocispec.Descriptor
	// layers are the manifest's layers, base first.
	layers []ocispec.Descriptor
}

// blobs are what must be pushed before the manifest.
func (b *builtImage) blobs() []ocispec.Descriptor {
	return append([]ocispec.Descriptor{b.configDesc}, b.layers...)
}

// gcLabels make containerd's garbage collector keep a manifest's config
// and layers as long as the manifest is kept.
func (b *builtImage) gcLabels() map[string]string {
	labels := map[string]string{"containerd.io/gc.ref.content.config": b.configDesc.Digest.String()}
	for i, l := range b.layers {
		labels["containerd.io/gc.ref.content.l."+strconv.Itoa(i)] = l.Digest.String()
	}
	return labels
}

// dockerToOCI maps Docker layer media types to their OCI equals, for a
// Docker base image whose commit needs an OCI manifest (zstd layers have
// no Docker media type). The blobs are the same bytes.
var dockerToOCI = map[string]string{
	images.MediaTypeDockerSchema2Layer:        ocispec.MediaTypeImageLayerGzip,
	images.MediaTypeDockerSchema2LayerForeign: ocispec.MediaTypeImageLayerNonDistributableGzip, //nolint:staticcheck // kept as the base had it
	images.MediaTypeDockerSchema2LayerGzip:    ocispec.MediaTypeImageLayerGzip,
	images.MediaTypeDockerSchema2Config:       ocispec.MediaTypeImageConfig,
}

// buildImage writes the config and manifest of a commit: the base image's
// layers followed by the commit layers, the base's config with the new
// diff IDs and a history entry per commit layer, and the base's manifest
// media type family unless the new layers need OCI.
func buildImage(base *baseImage, c snapshotter.Commit, layers []snapshotter.Layer, docker bool) (*builtImage, error) {
	var cfg map[string]json.RawMessage
	if err := json.Unmarshal(base.config, &cfg); err != nil {
		return nil, fmt.Errorf("base config: %w", err)
	}
	diffIDs := append([]string(nil), base.diffIDs...)
	for _, l := range layers {
		diffIDs = append(diffIDs, l.DiffID.String())
	}
	rootfs, err := json.Marshal(map[string]any{"type": "layers", "diff_ids": diffIDs})
	if err != nil {
		return nil, err
	}
	cfg["rootfs"] = rootfs

	var history []json.RawMessage
	if h, ok := cfg["history"]; ok {
		if err := json.Unmarshal(h, &history); err != nil {
			return nil, fmt.Errorf("base config history: %w", err)
		}
	}
	for _, l := range layers {
		created := l.Created.UTC()
		comment := "changes since the previous commit"
		if l.Squashed {
			comment = "all changes since the base image"
		}
		entry, err := json.Marshal(ocispec.History{
			Created:   &created,
			CreatedBy: "seamless commit " + l.Commit,
			Comment:   comment,
		})
		if err != nil {
			return nil, err
		}
		history = append(history, entry)
	}
	if cfg["history"], err = json.Marshal(history); err != nil {
		return nil, err
	}
	created := c.CapturedAt.UTC()
	if created.IsZero() {
		created = time.Now().UTC()
	}
	if cfg["created"], err = json.Marshal(created); err != nil {
		return nil, err
	}
	configBytes, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}

	manifestType, configType := ocispec.MediaTypeImageManifest, ocispec.MediaTypeImageConfig
	if docker {
		manifestType, configType = images.MediaTypeDockerSchema2Manifest, images.MediaTypeDockerSchema2Config
	}
	b := &builtImage{
		config:     configBytes,
		configDesc: ocispec.Descriptor{MediaType: configType, Digest: digest.FromBytes(configBytes), Size: int64(len(configBytes))},
	}
	for _, l := range base.manifest.Layers {
		if !docker {
			if t, ok := dockerToOCI[l.MediaType]; ok {
				l.MediaType = t
			}
		}
		b.layers = append(b.layers, l)
	}
	for _, l := range layers {
		b.layers = append(b.layers, ocispec.Descriptor{MediaType: l.MediaType, Digest: l.Digest, Size: l.Size})
	}
	m := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: manifestType,
		Config:    b.configDesc,
		Layers:    b.layers,
	}
	// Docker's schema has no annotations.
	if !docker && base.name != "" {
		m.Annotations = map[string]string{
			ocispec.AnnotationBaseImageName:   base.name,
			ocispec.AnnotationBaseImageDigest: base.target.Digest.String(),
		}
	}
	if b.manifest, err = json.Marshal(m); err != nil {
		return nil, err
	}
	b.manifestDesc = ocispec.Descriptor{MediaType: manifestType, Digest: digest.FromBytes(b.manifest), Size: int64(len(b.manifest))}
	return b, nil
}
