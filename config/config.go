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
	"time"

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
	// APIAddress is the unix socket of the HTTP API (commits, metrics);
	// empty means api.sock beside Address.
	APIAddress string `toml:"api_address"`
	// LogLevel is one of trace, debug, info, warn, error, fatal, panic.
	LogLevel string `toml:"log_level"`
	// Snapshotter configures the overlay snapshotter.
	Snapshotter Snapshotter `toml:"snapshotter"`
	// Commit configures seamless commits.
	Commit Commit `toml:"commit"`
	// Convert configures the conversion of captures into images.
	Convert Convert `toml:"convert"`
}

// Capture strategies (see DESIGN §3).
const (
	StrategyAuto    = "auto"
	StrategyCopy    = "copy"
	StrategyReflink = "reflink"
	StrategyBtrfs   = "btrfs"
)

// Commit configures seamless commits.
type Commit struct {
	// Strategy is how the writable layer is captured: auto (btrfs on
	// btrfs, reflink where the root's filesystem can clone, else copy),
	// copy, reflink or btrfs.
	Strategy string `toml:"strategy"`
	// PauseBudget bounds the time a container stays frozen; past it the
	// capture is abandoned, the container thawed and the commit fails.
	PauseBudget Duration `toml:"pause_budget"`
	// PreCopyRounds bounds the copy rounds made while the container runs,
	// before the freeze.
	PreCopyRounds int `toml:"precopy_rounds"`
	// PreCopyConverged ends the pre-copy early once a round finds at most
	// this many changed entries.
	PreCopyConverged int `toml:"precopy_converged"`
	// TrackChanges (copy and reflink) watches the layer's directories
	// with inotify while a commit runs, so that each round after the
	// first, the frozen one included, visits only what changed instead
	// of every entry. Off, or where inotify is unavailable, every round
	// examines every entry.
	TrackChanges bool `toml:"track_changes"`
	// PreCopyNice is the nice value (0-19) of the threads that copy while
	// the container runs, and of the process that builds a commit's layer
	// ([convert] background_build), so that the container's threads run
	// first; 0 leaves them at the daemon's priority. The frozen round
	// always runs at the daemon's.
	PreCopyNice int `toml:"precopy_nice"`
	// BackgroundCgroup names the cgroup v1 cpu cgroup, made at the top of
	// the cpu hierarchy with the least CPU share, that the same threads
	// (and layer builder processes) join: the kernel shares CPU between cgroups before it looks at nice
	// values, so nice alone leaves the pre-copy half a CPU beside a
	// container in a cgroup of its own. "" leaves the threads in the
	// daemon's cgroup. cgroup v2 places whole processes only: there it
	// has no effect.
	BackgroundCgroup string `toml:"background_cgroup"`
}

// Layer compressions.
const (
	CompressionGzip = "gzip"
	CompressionZstd = "zstd"
)

// Convert configures the background jobs that turn captures into images
// and push them.
type Convert struct {
	// Workers is the number of jobs converted and pushed at once.
	Workers int `toml:"workers"`
	// Compression of new layers: gzip (readable everywhere) or zstd.
	Compression string `toml:"compression"`
	// CompressionLevel of new layers of that compression; 0 is the
	// default: gzip 1 (the fastest), zstd 3. gzip takes 1 (fastest) to 9
	// (smallest), zstd 1 to 22.
	CompressionLevel int `toml:"compression_level"`
	// MaxLayers bounds the layers commits add on top of the base image:
	// each commit of a container adds one layer of its changes since the
	// previous commit, and past this count the chain is squashed into one
	// layer of every change since the base.
	MaxLayers int `toml:"max_layers"`
	// MaxAttempts bounds the tries of a job that fails with a transient
	// registry error (5xx, reset, timeout).
	MaxAttempts int `toml:"max_attempts"`
	// RetryInitial and RetryMax bound the exponential backoff between tries.
	RetryInitial Duration `toml:"retry_initial"`
	RetryMax     Duration `toml:"retry_max"`
	// ContainerdAddress is containerd's socket: base images and blobs are
	// read from its content store, new blobs written there, and --local
	// images created in its image store.
	ContainerdAddress string `toml:"containerd_address"`
	// SnapshotterName is the name containerd knows this snapshotter by
	// (its proxy_plugins entry).
	SnapshotterName string `toml:"snapshotter_name"`
	// HostsDir holds containerd-style hosts.toml registry configuration
	// (mirrors, TLS, plain HTTP).
	HostsDir string `toml:"hosts_dir"`
	// SourceDateEpoch, when not zero, clamps the mtime of every entry of
	// a new layer to at most this Unix time, for layers that do not
	// depend on when files were written (SOURCE_DATE_EPOCH).
	SourceDateEpoch int64 `toml:"source_date_epoch"`
	// DockerConfig is the directory of the docker config.json holding
	// registry credentials (and credential helpers); empty means
	// $DOCKER_CONFIG, else ~/.docker.
	DockerConfig string `toml:"docker_config"`
	// KeepPushedLayers also writes each layer pushed to a registry into
	// containerd's content store. Off, a layer is streamed to the registry
	// only, and later commits of the container take it from there.
	KeepPushedLayers bool `toml:"keep_pushed_layers"`
	// BackgroundBuild (the default) builds each layer (reading the
	// capture, tar, digest, compression, and the walk that measures the
	// capture's disk usage) in a process of the background class
	// ([commit] precopy_nice and background_cgroup), which only gets the
	// CPU the containers leave: the containers barely see a conversion,
	// and images are published later (docs/benchmarks.md: about 20%
	// later for a 1 GiB layer on 2 vCPUs). A builder is kept for the
	// next layers, and retired after 5 minutes without one. A builder
	// the containers starve of CPU (no progress for 10 s, waiting for a
	// CPU) goes on at the daemon's priority, and is retired after that
	// layer. Off, layers are built in the daemon, at its priority.
	BackgroundBuild bool `toml:"background_build"`
}

// Duration is a time.Duration written as a string ("500ms") in TOML.
type Duration time.Duration

// UnmarshalText parses a Go duration string.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// MarshalText writes a Go duration string.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

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
		Commit:   DefaultCommit(),
		Convert:  DefaultConvert(),
	}
}

// DefaultConvert is the [convert] section when none is given.
func DefaultConvert() Convert {
	return Convert{
		Workers:           2,
		Compression:       CompressionGzip,
		MaxLayers:         10,
		MaxAttempts:       8,
		RetryInitial:      Duration(time.Second),
		RetryMax:          Duration(time.Minute),
		ContainerdAddress: "/run/containerd/containerd.sock",
		SnapshotterName:   "seamless",
		HostsDir:          "/etc/containerd/certs.d",
		BackgroundBuild:   true,
	}
}

// DefaultCommit is the [commit] section when none is given.
func DefaultCommit() Commit {
	return Commit{
		Strategy:         StrategyAuto,
		PauseBudget:      Duration(500 * time.Millisecond),
		PreCopyRounds:    5,
		PreCopyConverged: 100,
		TrackChanges:     true,
		PreCopyNice:      19,
		BackgroundCgroup: "seamless-background",
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

// APISocket is the API's socket: APIAddress, or api.sock beside Address.
func (c Config) APISocket() string {
	if c.APIAddress != "" {
		return c.APIAddress
	}
	return filepath.Join(filepath.Dir(c.Address), "api.sock")
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
	if c.APIAddress != "" {
		if err := absPath("api_address", c.APIAddress); err != nil {
			return err
		}
		if len(c.APIAddress) > maxSocketPath {
			return fmt.Errorf("api_address: %q is longer than a unix socket path may be (%d)", c.APIAddress, maxSocketPath)
		}
		if c.APIAddress == c.Address {
			return fmt.Errorf("api_address: must differ from address")
		}
	}
	if _, err := logrus.ParseLevel(c.LogLevel); err != nil {
		return fmt.Errorf("log_level: %q is not one of trace, debug, info, warn, error, fatal, panic", c.LogLevel)
	}
	if err := overlay.ValidateOptions(c.Snapshotter.MountOptions); err != nil {
		return fmt.Errorf("snapshotter.mount_options: %w", err)
	}
	if err := c.Commit.Validate(); err != nil {
		return err
	}
	return c.Convert.Validate()
}

// Validate checks the [convert] section.
func (c Convert) Validate() error {
	if c.Workers < 1 || c.Workers > 64 {
		return fmt.Errorf("convert.workers: %d must be between 1 and 64", c.Workers)
	}
	if err := ValidateCompression(c.Compression); err != nil {
		return fmt.Errorf("convert.compression: %w", err)
	}
	if err := ValidateCompressionLevel(c.Compression, c.CompressionLevel); err != nil {
		return fmt.Errorf("convert.compression_level: %w", err)
	}
	if c.MaxLayers < 1 || c.MaxLayers > 100 {
		return fmt.Errorf("convert.max_layers: %d must be between 1 and 100", c.MaxLayers)
	}
	if c.MaxAttempts < 1 {
		return fmt.Errorf("convert.max_attempts: %d must be at least 1", c.MaxAttempts)
	}
	if c.RetryInitial <= 0 || c.RetryMax < c.RetryInitial {
		return fmt.Errorf("convert.retry_initial (%v) must be positive and at most convert.retry_max (%v)", time.Duration(c.RetryInitial), time.Duration(c.RetryMax))
	}
	if err := absPath("convert.containerd_address", c.ContainerdAddress); err != nil {
		return err
	}
	if c.SnapshotterName == "" {
		return fmt.Errorf("convert.snapshotter_name: must not be empty")
	}
	if c.SourceDateEpoch < 0 {
		return fmt.Errorf("convert.source_date_epoch: %d must not be negative", c.SourceDateEpoch)
	}
	if c.DockerConfig != "" {
		return absPath("convert.docker_config", c.DockerConfig)
	}
	return nil
}

// ValidateCompression checks a layer compression name.
func ValidateCompression(s string) error {
	switch s {
	case CompressionGzip, CompressionZstd:
		return nil
	}
	return fmt.Errorf("%q is not one of gzip, zstd", s)
}

// ValidateCompressionLevel checks a level for a compression: 0 (the
// default), 1-9 for gzip, 1-22 for zstd. With no compression
// named (the configured one applies), any of those.
func ValidateCompressionLevel(compression string, level int) error {
	maxLevel := 22
	if compression == CompressionGzip {
		maxLevel = 9
	}
	if level < 0 || level > maxLevel {
		name := compression
		if name == "" {
			name = "any compression"
		}
		return fmt.Errorf("level %d is out of range for %s (1-%d, or 0 for the default)", level, name, maxLevel)
	}
	return nil
}

// Validate checks the [commit] section.
func (c Commit) Validate() error {
	switch c.Strategy {
	case StrategyAuto, StrategyCopy, StrategyReflink, StrategyBtrfs:
	default:
		return fmt.Errorf("commit.strategy: %q is not one of auto, copy, reflink, btrfs", c.Strategy)
	}
	if b := time.Duration(c.PauseBudget); b <= 0 || b > time.Minute {
		return fmt.Errorf("commit.pause_budget: %v must be positive and at most 1m", b)
	}
	if c.PreCopyRounds < 1 || c.PreCopyRounds > 100 {
		return fmt.Errorf("commit.precopy_rounds: %d must be between 1 and 100", c.PreCopyRounds)
	}
	if c.PreCopyNice < 0 || c.PreCopyNice > 19 {
		return fmt.Errorf("commit.precopy_nice: %d must be between 0 and 19", c.PreCopyNice)
	}
	if n := c.BackgroundCgroup; strings.ContainsRune(n, '/') || n == "." || n == ".." {
		return fmt.Errorf("commit.background_cgroup: %q must be a single cgroup name", n)
	}
	if c.PreCopyConverged < 0 {
		return fmt.Errorf("commit.precopy_converged: %d must not be negative", c.PreCopyConverged)
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
