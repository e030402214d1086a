//go:build linux

// Package plugin registers the seamless snapshotter with containerd's
// plugin system, so that the same snapshotter can be linked into a
// containerd build (import _ ".../plugin") or served by our daemon.
package plugin

import (
	"errors"

	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/platforms"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"

	"github.com/seamless-snapshotter/seamless-snapshotter/config"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// ID is the snapshotter's name in containerd's configuration.
const ID = "seamless"

// Config is the plugin's section of containerd's configuration,
// [plugins."io.containerd.snapshotter.v1.seamless"].
type Config struct {
	// RootPath overrides the plugin root containerd assigns
	// (<containerd root>/io.containerd.snapshotter.v1.seamless).
	RootPath      string   `toml:"root_path"`
	SyncRemove    bool     `toml:"sync_remove"`
	UpperdirLabel bool     `toml:"upperdir_label"`
	MountOptions  []string `toml:"mount_options"`
	// Commit configures seamless commits, as [commit] in the daemon's file.
	Commit config.Commit `toml:"commit"`
}

func init() {
	registry.Register(Registration())
}

// Registration describes the snapshotter plugin.
func Registration() *plugin.Registration {
	return &plugin.Registration{
		Type:   plugins.SnapshotPlugin,
		ID:     ID,
		Config: &Config{Commit: config.DefaultCommit()},
		InitFn: initSnapshotter,
	}
}

func initSnapshotter(ic *plugin.InitContext) (any, error) {
	cfg, ok := ic.Config.(*Config)
	if !ok {
		return nil, errors.New("seamless snapshotter: invalid plugin configuration")
	}
	ic.Meta.Platforms = append(ic.Meta.Platforms, platforms.DefaultSpec())

	root := ic.Properties[plugins.PropertyRootDir]
	if cfg.RootPath != "" {
		root = cfg.RootPath
	}
	opts := snapshotter.ConfigOptions(config.Snapshotter{
		SyncRemove:    cfg.SyncRemove,
		UpperdirLabel: cfg.UpperdirLabel,
		MountOptions:  cfg.MountOptions,
	}, cfg.Commit)
	sn, err := snapshotter.New(ic.Context, root, opts...)
	if err != nil {
		return nil, err
	}
	ic.Meta.Exports[plugins.SnapshotterRootDir] = root
	return sn, nil
}
