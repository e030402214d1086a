//go:build linux

package convert

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime"
	"strings"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// baseImage is the image a committed container runs on.
type baseImage struct {
	// name is the image's name in containerd, "" for a container without
	// an image.
	name string
	// target is what the name points at (an index or a manifest).
	target ocispec.Descriptor
	// manifestDesc and manifest are the platform's manifest.
	manifestDesc ocispec.Descriptor
	manifest     ocispec.Manifest
	// config is the image config as stored, so that fields this program
	// does not know survive the commit.
	config  []byte
	diffIDs []string
	chainID string
	// docker is set for a Docker v2 schema 2 manifest.
	docker bool
}

func (b *baseImage) record() *snapshotter.BaseImage {
	if b.name == "" {
		return nil
	}
	return &snapshotter.BaseImage{Name: b.name, Digest: b.target.Digest, MediaType: b.target.MediaType}
}

// splitKey splits a backend key, "<namespace>/<seq>/<name>", into the
// containerd namespace and the name its clients use (a container's
// snapshot key).
func splitKey(key string) (namespace, name string, err error) {
	ns, rest, ok := strings.Cut(key, "/")
	_, name, ok2 := strings.Cut(rest, "/")
	if !ok || !ok2 || ns == "" || name == "" {
		return "", "", permanentErr(CodeConvertFailed, fmt.Errorf("snapshot key %q did not come through containerd: no namespace to find its image in", key))
	}
	return ns, name, nil
}

// chainIDOf returns the chain ID a parent snapshot is named by:
// containerd's unpacker commits each layer as its chain ID.
func chainIDOf(parent string) string {
	return parent[strings.LastIndex(parent, "/")+1:]
}

// resolveBase finds the image the commit's container was created from:
// the container's own image if its layers are the snapshot's parent, else
// (the container was removed, or retagged) any image in the namespace
// with those layers.
func (cv *Converter) resolveBase(ctx context.Context, client *containerd.Client, c snapshotter.Commit) (*baseImage, error) {
	if c.Parent == "" {
		return scratchBase()
	}
	chainID := chainIDOf(c.Parent)
	ns, name, err := splitKey(c.SnapshotKey)
	if err != nil {
		return nil, err
	}
	var candidates []string
	if c.Base != nil {
		candidates = append(candidates, c.Base.Name)
	}
	containers, err := client.ContainerService().List(ctx)
	if err != nil {
		return nil, transientErr(CodeContainerdError, fmt.Errorf("list containers: %w", err))
	}
	for _, ctr := range containers {
		if ctr.SnapshotKey == name && ctr.Snapshotter == cv.cfg.SnapshotterName && ctr.Image != "" {
			candidates = append(candidates, ctr.Image)
		}
	}
	all, err := client.ImageService().List(ctx)
	if err != nil {
		return nil, transientErr(CodeContainerdError, fmt.Errorf("list images: %w", err))
	}
	byName := map[string]images.Image{}
	for _, img := range all {
		byName[img.Name] = img
		candidates = append(candidates, img.Name)
	}
	cs := client.ContentStore()
	seen := map[string]bool{}
	for _, n := range candidates {
		img, ok := byName[n]
		if !ok || seen[n] {
			continue
		}
		seen[n] = true
		b, err := loadBase(ctx, cs, img)
		if err != nil {
			continue // not for this platform, or its blobs are gone
		}
		if b.chainID == chainID {
			return b, nil
		}
	}
	return nil, permanentErr(CodeBaseImageNotFound, fmt.Errorf("no image in namespace %s has the layers the container ran on (chain %s): the base image was removed from containerd", ns, chainID))
}

// loadBase reads an image's manifest for this platform and its config.
func loadBase(ctx context.Context, cs content.Provider, img images.Image) (*baseImage, error) {
	desc, err := platformManifest(ctx, cs, img.Target, platforms.Default())
	if err != nil {
		return nil, err
	}
	b := &baseImage{name: img.Name, target: img.Target, manifestDesc: desc, docker: desc.MediaType == images.MediaTypeDockerSchema2Manifest}
	data, err := content.ReadBlob(ctx, cs, desc)
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(data, &b.manifest); err != nil {
		return nil, fmt.Errorf("manifest %s: %w", desc.Digest, err)
	}
	if b.config, err = content.ReadBlob(ctx, cs, b.manifest.Config); err != nil {
		return nil, err
	}
	var cfg ocispec.Image
	if err := json.Unmarshal(b.config, &cfg); err != nil {
		return nil, fmt.Errorf("config %s: %w", b.manifest.Config.Digest, err)
	}
	if len(cfg.RootFS.DiffIDs) != len(b.manifest.Layers) {
		return nil, fmt.Errorf("image %s: %d layers but %d diff IDs", img.Name, len(b.manifest.Layers), len(cfg.RootFS.DiffIDs))
	}
	for _, d := range cfg.RootFS.DiffIDs {
		b.diffIDs = append(b.diffIDs, d.String())
	}
	b.chainID = identity.ChainID(cfg.RootFS.DiffIDs).String()
	return b, nil
}

// platformManifest returns the manifest of desc for the platform: desc
// itself, or the best match in an index.
func platformManifest(ctx context.Context, cs content.Provider, desc ocispec.Descriptor, platform platforms.MatchComparer) (ocispec.Descriptor, error) {
	for depth := 0; depth < 4; depth++ {
		switch {
		case images.IsManifestType(desc.MediaType):
			return desc, nil
		case images.IsIndexType(desc.MediaType):
			data, err := content.ReadBlob(ctx, cs, desc)
			if err != nil {
				return desc, err
			}
			var idx ocispec.Index
			if err := json.Unmarshal(data, &idx); err != nil {
				return desc, fmt.Errorf("index %s: %w", desc.Digest, err)
			}
			var best *ocispec.Descriptor
			for i, m := range idx.Manifests {
				if m.Platform != nil && !platform.Match(*m.Platform) {
					continue
				}
				if best == nil || (m.Platform != nil && best.Platform != nil && platform.Less(*m.Platform, *best.Platform)) {
					best = &idx.Manifests[i]
				}
			}
			if best == nil {
				return desc, fmt.Errorf("index %s has no manifest for %s: %w", desc.Digest, platforms.DefaultString(), errdefs.ErrNotFound)
			}
			desc = *best
		default:
			return desc, fmt.Errorf("unknown image media type %q: %w", desc.MediaType, errdefs.ErrNotImplemented)
		}
	}
	return desc, fmt.Errorf("image index nested too deep: %w", errdefs.ErrInvalidArgument)
}

// scratchBase is the base of a container created without an image.
func scratchBase() (*baseImage, error) {
	cfg, err := json.Marshal(ocispec.Image{
		Platform: ocispec.Platform{Architecture: runtime.GOARCH, OS: "linux"},
		RootFS:   ocispec.RootFS{Type: "layers"},
	})
	if err != nil {
		return nil, err
	}
	return &baseImage{config: cfg}, nil
}
