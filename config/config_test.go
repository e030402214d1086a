package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// TestExampleIsTheDefaults keeps the shipped example file honest: it parses
// and says exactly what the defaults are.
func TestExampleIsTheDefaults(t *testing.T) {
	cfg, err := Load("config.example.toml", false)
	if err != nil {
		t.Fatal(err)
	}
	want := Default()
	want.Snapshotter.MountOptions = []string{}
	if !reflect.DeepEqual(cfg, want) {
		t.Fatalf("example file %+v differs from defaults %+v", cfg, want)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestDecodeAndValidate(t *testing.T) {
	for _, tc := range []struct {
		name    string
		toml    string
		wantErr string // substring; empty means valid
		check   func(*testing.T, Config)
	}{
		{name: "empty file keeps defaults", check: func(t *testing.T, c Config) {
			if !reflect.DeepEqual(c, Default()) {
				t.Errorf("got %+v", c)
			}
		}},
		{name: "every option", toml: `
root = "/data/seamless"
address = "/run/s.sock"
log_level = "debug"
[snapshotter]
sync_remove = true
upperdir_label = true
mount_options = ["volatile"]
`, check: func(t *testing.T, c Config) {
			if c.Root != "/data/seamless" || c.Address != "/run/s.sock" || c.LogLevel != "debug" ||
				!c.Snapshotter.SyncRemove || !c.Snapshotter.UpperdirLabel || !reflect.DeepEqual(c.Snapshotter.MountOptions, []string{"volatile"}) {
				t.Errorf("got %+v", c)
			}
		}},
		{name: "unknown top-level key", toml: `roots = "/x"`, wantErr: "unknown key roots"},
		{name: "unknown nested key", toml: "[snapshotter]\nasync = true", wantErr: "unknown key snapshotter.async"},
		{name: "wrong type", toml: `root = 3`, wantErr: "root"},
		{name: "relative root", toml: `root = "var/lib"`, wantErr: "root:"},
		{name: "empty address", toml: `address = ""`, wantErr: "address:"},
		{name: "socket path too long", toml: `address = "/` + strings.Repeat("s", 120) + `"`, wantErr: "address:"},
		{name: "bad log level", toml: `log_level = "loud"`, wantErr: "log_level:"},
		{name: "reserved mount option", toml: "[snapshotter]\nmount_options = [\"upperdir=/x\"]", wantErr: "snapshotter.mount_options:"},
		{name: "syntax error", toml: `root = `, wantErr: "line 1"},
		{name: "commit section", toml: "[commit]\nstrategy = \"copy\"\npause_budget = \"50ms\"\nprecopy_rounds = 2\nprecopy_converged = 10", check: func(t *testing.T, c Config) {
			if c.Commit != (Commit{Strategy: "copy", PauseBudget: Duration(50 * time.Millisecond), PreCopyRounds: 2, PreCopyConverged: 10, TrackChanges: true, PreCopyNice: 19, BackgroundCgroup: "seamless-background"}) {
				t.Errorf("got %+v", c.Commit)
			}
		}},
		{name: "change tracking off", toml: "[commit]\ntrack_changes = false", check: func(t *testing.T, c Config) {
			if c.Commit.TrackChanges || c.Commit.PreCopyRounds != 5 {
				t.Errorf("got %+v", c.Commit)
			}
		}},
		{name: "bad strategy", toml: "[commit]\nstrategy = \"magic\"", wantErr: "commit.strategy:"},
		{name: "bad pause budget", toml: "[commit]\npause_budget = \"soon\"", wantErr: "pause_budget"},
		{name: "zero pause budget", toml: "[commit]\npause_budget = \"0s\"", wantErr: "commit.pause_budget:"},
		{name: "bad rounds", toml: "[commit]\nprecopy_rounds = 0", wantErr: "commit.precopy_rounds:"},
		{name: "bad nice", toml: "[commit]\nprecopy_nice = 20", wantErr: "commit.precopy_nice:"},
		{name: "bad background cgroup", toml: "[commit]\nbackground_cgroup = \"a/b\"", wantErr: "commit.background_cgroup:"},
		{name: "fast gzip", toml: "[convert]\ncompression_level = 1", check: func(t *testing.T, c Config) {
			if c.Convert.Compression != CompressionGzip || c.Convert.CompressionLevel != 1 {
				t.Errorf("got %+v", c.Convert)
			}
		}},
		{name: "zstd level", toml: "[convert]\ncompression = \"zstd\"\ncompression_level = 19", check: func(t *testing.T, c Config) {
			if c.Convert.Compression != CompressionZstd || c.Convert.CompressionLevel != 19 {
				t.Errorf("got %+v", c.Convert)
			}
		}},
		{name: "gzip level out of range", toml: "[convert]\ncompression_level = 19", wantErr: "convert.compression_level: level 19 is out of range for gzip"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Default()
			err := Decode([]byte(tc.toml), &cfg)
			if err == nil {
				err = cfg.Validate()
			}
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				tc.check(t, cfg)
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("got error %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
}

func TestLoadMissingFile(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "none.toml")
	if _, err := Load(missing, true); err != nil {
		t.Errorf("missing default file: %v", err)
	}
	if _, err := Load(missing, false); err == nil || !os.IsNotExist(unwrapAll(err)) {
		t.Errorf("missing explicit file: got %v", err)
	}
}

func unwrapAll(err error) error {
	for {
		u, ok := err.(interface{ Unwrap() error })
		if !ok {
			return err
		}
		err = u.Unwrap()
	}
}
