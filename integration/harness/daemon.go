//go:build linux

package harness

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"time"
)

// DaemonOptions configure a Daemon.
type DaemonOptions struct {
	// Root is the daemon's --root; default a fresh test temp dir. Tests of
	// a capture strategy point it at a btrfs or xfs mount.
	Root string
	// ConfigFile is passed as --config. Default: an empty file, so the
	// daemon runs on its defaults and never reads the host's
	// /etc/containerd-seamless/config.toml.
	ConfigFile string
	// Args are appended to the command line.
	Args []string
	// Env is appended to the daemon's environment.
	Env []string
}

// Daemon is our snapshotter daemon, containerd-seamless-grpc, serving the
// snapshots API on a private unix socket.
type Daemon struct {
	opts   DaemonOptions
	root   string
	socket string
	config string
	proc   *process
}

// NewDaemon prepares a daemon; call Start to run it. It is stopped when
// the test ends. Setup errors fail the test.
func NewDaemon(t T, opts DaemonOptions) *Daemon {
	t.Helper()
	bin, err := FindBinary(BinDaemon)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	d := &Daemon{
		opts:   opts,
		root:   opts.Root,
		socket: filepath.Join(socketDir(t), "seamless.sock"),
		config: opts.ConfigFile,
	}
	if d.root == "" {
		d.root = filepath.Join(dir, "root")
	}
	if d.config == "" {
		d.config = filepath.Join(dir, "config.toml")
		if err := os.WriteFile(d.config, []byte("# harness: daemon defaults\n"), 0o644); err != nil {
			t.Fatalf("writing daemon config: %v", err)
		}
	}
	if err := os.MkdirAll(d.root, 0o700); err != nil {
		t.Fatalf("creating daemon root: %v", err)
	}
	d.proc = newProcess(t, "containerd-seamless-grpc", bin, filepath.Join(dir, "daemon.log"))
	return d
}

func (d *Daemon) args() []string {
	args := []string{"--root", d.root, "--address", d.socket, "--log-level", "debug", "--config", d.config}
	return append(args, d.opts.Args...)
}

// UseContainerd points the daemon's image conversion at a containerd
// socket and its hosts.toml directory; call it before Start.
func (d *Daemon) UseContainerd(address, hostsDir string) {
	d.opts.Args = append(d.opts.Args, "--containerd-address", address, "--hosts-dir", hostsDir)
}

// Start runs the daemon and waits until its socket accepts connections.
func (d *Daemon) Start(ctx context.Context) error {
	env := append(childEnv([]string{BinDir(), ToolsDir()}), d.opts.Env...)
	if err := d.proc.start(d.args(), env); err != nil {
		return err
	}
	return d.proc.waitReady(ctx, "daemon socket "+d.socket, func(ctx context.Context) error {
		return dialUnix(ctx, d.socket)
	})
}

// dialUnix succeeds once something accepts connections on the socket; a
// stale socket file left by a killed daemon refuses them.
func dialUnix(ctx context.Context, path string) error {
	dialer := net.Dialer{Timeout: time.Second}
	conn, err := dialer.DialContext(ctx, "unix", path)
	if err != nil {
		return err
	}
	return conn.Close()
}

// Stop sends SIGTERM and waits for the daemon to exit.
func (d *Daemon) Stop(ctx context.Context) error { return d.proc.stop(ctx) }

// Kill sends SIGKILL, simulating a crash: nothing is cleaned up, the socket
// file stays behind.
func (d *Daemon) Kill() error { return d.proc.kill() }

// Restart stops the daemon gracefully and starts it again with the same
// root, socket and options.
func (d *Daemon) Restart(ctx context.Context) error {
	if err := d.Stop(ctx); err != nil {
		return err
	}
	return d.Start(ctx)
}

// Running reports whether the daemon process is up.
func (d *Daemon) Running() bool { return d.proc.running() }

// Pid is the daemon's process id, 0 when it is not running.
func (d *Daemon) Pid() int { return d.proc.pid() }

// Socket is the snapshots API socket containerd's proxy plugin dials.
func (d *Daemon) Socket() string { return d.socket }

// Root is the daemon's --root.
func (d *Daemon) Root() string { return d.root }

// ConfigPath is the daemon's --config file.
func (d *Daemon) ConfigPath() string { return d.config }

// LogPath is the daemon's log file (stdout and stderr, all runs).
func (d *Daemon) LogPath() string { return d.proc.logPath }
