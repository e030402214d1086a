//go:build linux

package main

import (
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"

	"github.com/seamless-snapshotter/seamless-snapshotter/config"
	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
)

func TestFlagsOverrideFileOverridesDefaults(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(file, []byte("root = \"/from/file\"\nlog_level = \"warn\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		args    []string
		want    config.Config
		wantErr string
	}{
		{
			name: "defaults when the default file is absent",
			args: []string{"--config", filepath.Join(dir, "absent.toml"), "--root", config.DefaultRoot},
			// --config names a missing file: that is an error.
			wantErr: "absent.toml",
		},
		{
			name: "file over defaults",
			args: []string{"--config", file},
			want: config.Config{Root: "/from/file", Address: config.DefaultAddress, LogLevel: "warn"},
		},
		{
			name: "flags over file",
			args: []string{"--config", file, "--root", "/from/flag", "--address", "/run/x.sock", "--log-level", "debug"},
			want: config.Config{Root: "/from/flag", Address: "/run/x.sock", LogLevel: "debug"},
		},
		{name: "invalid flag value names the key", args: []string{"--config", file, "--log-level", "chatty"}, wantErr: "log_level"},
		{name: "relative root", args: []string{"--config", file, "--root", "rel"}, wantErr: "root:"},
		{name: "stray argument", args: []string{"--config", file, "serve"}, wantErr: "unexpected arguments"},
		{name: "unknown flag", args: []string{"--rooot", "/x"}, wantErr: "rooot"},
		{name: "relative containerd address", args: []string{"--config", file, "--containerd-address", "c.sock"}, wantErr: "convert.containerd_address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, _, err := parseFlags(tc.args, io.Discard)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, want error containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Root != tc.want.Root || got.Address != tc.want.Address || got.LogLevel != tc.want.LogLevel {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// startServe runs the daemon in-process and waits until it accepts
// connections.
func startServe(t *testing.T, cfg config.Config) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- serve(ctx, cfg) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if conn, err := net.Dial("unix", cfg.Address); err == nil {
			conn.Close()
			break
		}
		select {
		case err := <-done:
			cancel()
			t.Fatalf("daemon exited at start: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			cancel()
			t.Fatal("daemon did not listen in time")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return func() error {
		cancel()
		return <-done
	}
}

func testConfig(t *testing.T) config.Config {
	dir, err := os.MkdirTemp("", "sg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return config.Config{
		Root:     filepath.Join(dir, "root"),
		Address:  filepath.Join(dir, "run", "s.sock"),
		LogLevel: "info",
		Commit:   config.DefaultCommit(),
		Convert:  config.DefaultConvert(),
	}
}

func TestSocketIsRootOnlyAndRemovedOnStop(t *testing.T) {
	testutil.RequireRoot(t)
	cfg := testConfig(t)
	stop := startServe(t, cfg)
	for path, want := range map[string]os.FileMode{cfg.Address: 0o600, cfg.APISocket(): 0o600, filepath.Dir(cfg.Address): 0o700, cfg.Root: 0o700} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode().Perm(); got != want {
			t.Errorf("%s has mode %o, want %o", path, got, want)
		}
	}
	if err := stop(); err != nil {
		t.Fatalf("clean stop returned %v", err)
	}
	for _, sock := range []string{cfg.Address, cfg.APISocket()} {
		if _, err := os.Lstat(sock); !os.IsNotExist(err) {
			t.Errorf("socket %s left behind after stop: %v", sock, err)
		}
	}
}

func TestRefusesToStart(t *testing.T) {
	testutil.RequireRoot(t)

	t.Run("socket in use by a live server", func(t *testing.T) {
		cfg := testConfig(t)
		stop := startServe(t, cfg)
		defer stop()
		other := testConfig(t)
		other.Address = cfg.Address
		err := serve(context.Background(), other)
		if err == nil || !strings.Contains(err.Error(), "in use by a running server") {
			t.Fatalf("got %v", err)
		}
		// The live server still answers.
		conn, err := net.Dial("unix", cfg.Address)
		if err != nil {
			t.Fatalf("the first server lost its socket: %v", err)
		}
		conn.Close()
	})

	t.Run("root in use by another daemon", func(t *testing.T) {
		cfg := testConfig(t)
		stop := startServe(t, cfg)
		defer stop()
		other := testConfig(t)
		other.Root = cfg.Root
		err := serve(context.Background(), other)
		if err == nil || !strings.Contains(err.Error(), "another process uses snapshotter root") {
			t.Fatalf("got %v", err)
		}
	})

	t.Run("root not writable", func(t *testing.T) {
		cfg := testConfig(t)
		if err := os.MkdirAll(cfg.Root, 0o700); err != nil {
			t.Fatal(err)
		}
		// Root bypasses permissions; a read-only bind mount does not.
		if err := mount.All([]mount.Mount{{Type: "bind", Source: cfg.Root, Options: []string{"bind", "ro"}}}, cfg.Root); err != nil {
			t.Fatal(err)
		}
		defer mount.UnmountAll(cfg.Root, 0)
		err := serve(context.Background(), cfg)
		if err == nil || !strings.Contains(err.Error(), "is not writable") {
			t.Fatalf("got %v", err)
		}
	})

	t.Run("overlayfs unusable on root", func(t *testing.T) {
		cfg := testConfig(t)
		// An overlay mount cannot be the upper layer of another overlay.
		base := filepath.Dir(cfg.Root)
		for _, d := range []string{"l", "u", "w", "root"} {
			if err := os.MkdirAll(filepath.Join(base, d), 0o700); err != nil {
				t.Fatal(err)
			}
		}
		if err := mount.All([]mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{
			"lowerdir=" + filepath.Join(base, "l"), "upperdir=" + filepath.Join(base, "u"), "workdir=" + filepath.Join(base, "w"),
		}}}, cfg.Root); err != nil {
			t.Fatal(err)
		}
		defer mount.UnmountAll(cfg.Root, 0)
		err := serve(context.Background(), cfg)
		if err == nil || !strings.Contains(err.Error(), "overlayfs is not usable") {
			t.Fatalf("got %v", err)
		}
	})

	t.Run("stale socket is replaced", func(t *testing.T) {
		cfg := testConfig(t)
		if err := os.MkdirAll(filepath.Dir(cfg.Address), 0o700); err != nil {
			t.Fatal(err)
		}
		l, err := net.Listen("unix", cfg.Address)
		if err != nil {
			t.Fatal(err)
		}
		// Closing without unlinking leaves the file, as a crash would.
		l.(*net.UnixListener).SetUnlinkOnClose(false)
		l.Close()
		stop := startServe(t, cfg)
		if err := stop(); err != nil {
			t.Fatal(err)
		}
	})
}
