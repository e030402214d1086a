// Package config reads the daemon's TOML configuration file, fills in the
// defaults of the containerd family and validates every value.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/pelletier/go-toml/v2"
	"github.com/sirupsen/logrus"

	"github.com/seamless-snapshotter/seamless-snapshotter/overlay"
)

// Defaults, following containerd's own layout.
const (
	DefaultPath     = "/etc/containerd-seamless/config.toml"
	DefaultRoot     = "/var/lib/containerd-seamless"
	DefaultAddress  = "/run/containerd-seamless/containerd-seamless-grpc.sock"
	DefaultLogLevel = "info"
)

// maxSocketPath is the limit of sun_path on Linux, less the NUL byte.
const maxSocketPath = 107

// Config is the daemon configuration.
type Config struct {
	// Root holds the snapshots and the metadata database.
	Root string `toml:"root"`
	// Address is the unix socket containerd connects to.
	Address string `toml:"address"`
	// LogLevel is one of trace, debug, info, warn, error, fatal, panic.
	LogLevel string `toml:"log_level"`
	// Snapshotter configures the overlay snapshotter.
	Snapshotter Snapshotter `toml:"snapshotter"`
}

// Snapshotter configures the overlay snapshotter.
type Snapshotter struct {
	// SyncRemove deletes a snapshot's directories inside Remove instead of
	// leaving them to the next Cleanup.
	SyncRemove bool `toml:"sync_remove"`
	// UpperdirLabel adds containerd.io/snapshot/overlay.upperdir to Info.
	UpperdirLabel bool `toml:"upperdir_label"`
	// MountOptions are added to every overlay mount.
	MountOptions []string `toml:"mount_options"`
}

// Default returns the configuration used when no file is given.
func Default() Config {
	return Config{
		Root:     DefaultRoot,
		Address:  DefaultAddress,
		LogLevel: DefaultLogLevel,
	}
}

// Load reads the file at path over the defaults. A missing file is an error
// unless allowMissing is set (the default path may legitimately be absent).
func Load(path string, allowMissing bool) (Config, error) {
	cfg := Default()
	data, err := os.ReadFile(path)
	if err != nil {
		if allowMissing && errors.Is(err, os.ErrNotExist) {
			return cfg, nil
		}
		return cfg, fmt.Errorf("read config: %w", err)
	}
	if err := Decode(data, &cfg); err != nil {
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// Decode parses TOML over cfg. Unknown keys are errors that name the key:
// a misspelt option silently ignored is worse than a daemon that refuses to
// start.
func Decode(data []byte, cfg *Config) error {
	dec := toml.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(cfg); err != nil {
		var strict *toml.StrictMissingError
		if errors.As(err, &strict) {
			keys := make([]string, 0, len(strict.Errors))
			for _, e := range strict.Errors {
				keys = append(keys, strings.Join(e.Key(), "."))
			}
			return fmt.Errorf("unknown key %s", strings.Join(keys, ", "))
		}
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, col := de.Position()
			return fmt.Errorf("line %d, column %d: %s (key %s)", row, col, de.Error(), strings.Join(de.Key(), "."))
		}
		return err
	}
	return nil
}

// Validate checks every value and names the key of the first bad one.
func (c Config) Validate() error {
	if err := absPath("root", c.Root); err != nil {
		return err
	}
	if err := absPath("address", c.Address); err != nil {
		return err
	}
	if len(c.Address) > maxSocketPath {
		return fmt.Errorf("address: %q is %d bytes, longer than a unix socket path may be (%d)", c.Address, len(c.Address), maxSocketPath)
	}
	if _, err := logrus.ParseLevel(c.LogLevel); err != nil {
		return fmt.Errorf("log_level: %q is not one of trace, debug, info, warn, error, fatal, panic", c.LogLevel)
	}
	if err := overlay.ValidateOptions(c.Snapshotter.MountOptions); err != nil {
		return fmt.Errorf("snapshotter.mount_options: %w", err)
	}
	return nil
}

func absPath(key, p string) error {
	if p == "" {
		return fmt.Errorf("%s: must not be empty", key)
	}
	if !filepath.IsAbs(p) {
		return fmt.Errorf("%s: %q must be an absolute path", key, p)
	}
	return nil
}
