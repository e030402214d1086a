//go:build linux

package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
)

const (
	// SnapshotterName is our snapshotter's name in containerd's config.
	SnapshotterName = "seamless"
	// DefaultNamespace is the namespace Ctr and Client use unless the
	// context or the options name another.
	DefaultNamespace = "default"

	// cleanupTimeout bounds each cleanup step (removing containers,
	// stopping a component).
	cleanupTimeout = 60 * time.Second
)

// ContainerdOptions configure a Containerd.
type ContainerdOptions struct {
	// SnapshotterAddress is the socket of the proxy snapshotter registered
	// as SnapshotterName; empty leaves the proxy plugin out. containerd
	// starts even if nothing listens there yet: the plugin connects lazily.
	SnapshotterAddress string
	// RegistryHosts are host:port registries reached over plain HTTP; a
	// hosts.toml is written for each in HostsDir.
	RegistryHosts []string
	// Namespace is the default namespace of Ctr and Client; default
	// DefaultNamespace.
	Namespace string
	// ExtraConfig is TOML appended to the generated config (see Config);
	// it must not repeat a table the generated part defines.
	ExtraConfig string
	// Root is containerd's root directory (content store, metadata);
	// default a directory in the test's temp dir. Tests of a full disk
	// point it at a small filesystem; the caller owns that filesystem and
	// must remove it after the test's cleanups stopped containerd.
	Root string
}

// Containerd is a private containerd with its own root, state, sockets and
// config. It shares /run/containerd/{runc,fifo,s} with every other
// containerd on the machine, hence UniqueID for container IDs.
type Containerd struct {
	opts ContainerdOptions

	dir        string
	root       string
	state      string
	address    string
	configPath string
	hostsDir   string
	ctrPath    string
	// env is the environment of containerd and ctr: PATH led by the
	// directories of the binaries we resolved, because containerd looks
	// up the shim and the shim looks up runc in PATH.
	env []string

	proc *process
}

// NewContainerd prepares a containerd and writes its config; call Start to
// run it. When the test ends, remaining containers are removed (their
// shims would otherwise outlive the test) and containerd is stopped. Setup
// errors fail the test.
func NewContainerd(t T, opts ContainerdOptions) *Containerd {
	t.Helper()
	if opts.Namespace == "" {
		opts.Namespace = DefaultNamespace
	}
	bins, err := findBinaries(BinContainerd, BinCtr, BinShim, BinRunc)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	sockets := socketDir(t)
	c := &Containerd{
		opts:       opts,
		dir:        dir,
		root:       filepath.Join(dir, "root"),
		state:      filepath.Join(dir, "state"),
		address:    filepath.Join(sockets, "containerd.sock"),
		configPath: filepath.Join(dir, "config.toml"),
		hostsDir:   filepath.Join(dir, "certs.d"),
		ctrPath:    bins[BinCtr],
		env: childEnv([]string{
			filepath.Dir(bins[BinRunc]),
			filepath.Dir(bins[BinShim]),
			filepath.Dir(bins[BinContainerd]),
		}, "CONTAINERD_"),
	}
	if opts.Root != "" {
		c.root = opts.Root
	}
	if err := c.writeConfig(); err != nil {
		t.Fatal(err)
	}
	for _, host := range opts.RegistryHosts {
		if err := c.AddRegistryHost(host); err != nil {
			t.Fatal(err)
		}
	}
	c.proc = newProcess(t, "containerd", bins[BinContainerd], filepath.Join(dir, "containerd.log"))
	// Registered after newProcess's stop, so it runs before it.
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
		defer cancel()
		if err := c.removeLeftovers(ctx); err != nil {
			t.Errorf("removing containers left in containerd: %v", err)
		}
	})
	return c
}

func findBinaries(names ...string) (map[string]string, error) {
	paths := make(map[string]string, len(names))
	var errs []error
	for _, name := range names {
		p, err := FindBinary(name)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		paths[name] = p
	}
	return paths, errors.Join(errs...)
}

// Config returns the generated containerd config.
func (c *Containerd) Config() string {
	q := strconv.Quote
	var b strings.Builder
	fmt.Fprintf(&b, `version = 3
root = %s
state = %s

# CRI would want CNI and a pause image and adds seconds to every start; NRI
# listens on a fixed host-wide socket that concurrent instances would fight
# over.
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.cri.v1.runtime",
  "io.containerd.cri.v1.images",
  "io.containerd.podsandbox.controller.v1.podsandbox",
  "io.containerd.nri.v1.nri",
]

[grpc]
  address = %s

[ttrpc]
  address = %s

[debug]
  address = ""
  level = "debug"

[metrics]
  address = ""

# The default /opt/containerd is host-wide and prepended to PATH.
[plugins."io.containerd.internal.v1.opt"]
  path = %s
`, q(c.root), q(c.state), q(c.address), q(c.address+".ttrpc"), q(filepath.Join(c.root, "opt")))

	// Pulls through the transfer service unpack only into snapshotters
	// with an unpack_config entry (else ctr fails with "no unpack
	// platforms defined" unless run with --local). Defining the list
	// replaces containerd's default one, so overlayfs is listed too.
	platform := "linux/" + runtime.GOARCH
	unpack := []string{"overlayfs"}
	if c.opts.SnapshotterAddress != "" {
		fmt.Fprintf(&b, `
[proxy_plugins.%s]
  type = "snapshot"
  address = %s
`, SnapshotterName, q(c.opts.SnapshotterAddress))
		unpack = append(unpack, SnapshotterName)
	}
	for _, sn := range unpack {
		fmt.Fprintf(&b, `
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = %s
  snapshotter = %s
  differ = "walking"
`, q(platform), q(sn))
	}
	if c.opts.ExtraConfig != "" {
		b.WriteString("\n" + c.opts.ExtraConfig + "\n")
	}
	return b.String()
}

func (c *Containerd) writeConfig() error {
	if err := os.WriteFile(c.configPath, []byte(c.Config()), 0o644); err != nil {
		return fmt.Errorf("writing containerd config: %w", err)
	}
	return nil
}

// AddRegistryHost writes a hosts.toml so that host (host:port) is reached
// over plain HTTP, for ctr --hosts-dir. No TLS setting: with one, clients
// try HTTPS first on every request. containerd reads the directory on
// every resolve, so hosts can be added while it runs.
func (c *Containerd) AddRegistryHost(host string) error {
	dir := filepath.Join(c.hostsDir, host)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating hosts dir for %s: %w", host, err)
	}
	content := fmt.Sprintf(`server = "http://%[1]s"

[host."http://%[1]s"]
  capabilities = ["pull", "resolve", "push"]
`, host)
	if err := os.WriteFile(filepath.Join(dir, "hosts.toml"), []byte(content), 0o644); err != nil {
		return fmt.Errorf("writing hosts.toml for %s: %w", host, err)
	}
	return nil
}

// Start runs containerd and waits until `ctr version` succeeds.
func (c *Containerd) Start(ctx context.Context) error {
	if err := c.proc.start([]string{"--config", c.configPath}, c.env); err != nil {
		return err
	}
	return c.proc.waitReady(ctx, "containerd "+c.address, func(ctx context.Context) error {
		_, err := c.Ctr(ctx, "version")
		return err
	})
}

// Stop sends SIGTERM and waits for containerd to exit. Running containers
// keep running: their shims are not containerd's children.
func (c *Containerd) Stop(ctx context.Context) error { return c.proc.stop(ctx) }

// Kill sends SIGKILL to containerd, simulating a crash. Shims survive.
func (c *Containerd) Kill() error { return c.proc.kill() }

// Restart stops containerd and starts it again with the same config.
func (c *Containerd) Restart(ctx context.Context) error {
	if err := c.Stop(ctx); err != nil {
		return err
	}
	return c.Start(ctx)
}

// Running reports whether the containerd process is up.
func (c *Containerd) Running() bool { return c.proc.running() }

// Pid is containerd's process id, 0 when it is not running.
func (c *Containerd) Pid() int { return c.proc.pid() }

// Address is containerd's gRPC socket.
func (c *Containerd) Address() string { return c.address }

// Namespace is the default namespace of Ctr and Client.
func (c *Containerd) Namespace() string { return c.opts.Namespace }

// Root is containerd's root directory.
func (c *Containerd) Root() string { return c.root }

// State is containerd's state directory.
func (c *Containerd) State() string { return c.state }

// ConfigPath is the generated config file.
func (c *Containerd) ConfigPath() string { return c.configPath }

// HostsDir is the registry hosts directory, for ctr --hosts-dir.
func (c *Containerd) HostsDir() string { return c.hostsDir }

// LogPath is containerd's log file.
func (c *Containerd) LogPath() string { return c.proc.logPath }

// Client connects to containerd, with Namespace as the default namespace
// unless opts set another. It checks that containerd is serving. The
// caller closes the client.
func (c *Containerd) Client(ctx context.Context, opts ...containerd.Opt) (*containerd.Client, error) {
	opts = append([]containerd.Opt{containerd.WithDefaultNamespace(c.opts.Namespace)}, opts...)
	client, err := containerd.New(c.address, opts...)
	if err != nil {
		return nil, fmt.Errorf("connecting to containerd at %s: %w", c.address, err)
	}
	if _, err := client.IsServing(ctx); err != nil {
		client.Close()
		return nil, fmt.Errorf("containerd at %s is not serving: %w", c.address, err)
	}
	return client, nil
}

// Ctr runs ctr against this containerd and returns its stdout. The
// namespace is the one in ctx (namespaces.WithNamespace), else Namespace.
// stderr is left out of the result because ctr logs there (on cgroup v1 a
// deprecation warning on every call); errors include the command line,
// stdout and stderr.
func (c *Containerd) Ctr(ctx context.Context, args ...string) (string, error) {
	ns, ok := namespaces.Namespace(ctx)
	if !ok {
		ns = c.opts.Namespace
	}
	full := append([]string{"--address", c.address, "--namespace", ns}, args...)
	cmd := exec.CommandContext(ctx, c.ctrPath, full...)
	cmd.Env = c.env
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	// When ctx ends, interrupt ctr rather than kill it: ctr forwards the
	// signal to the process it runs (tasks exec, run) and exits with it.
	// Killed between creating an exec's stdio FIFOs and opening them, ctr
	// leaves the shim blocked for 30 s opening them (the timeout in
	// containerd-shim-runc-v2's exec Start, v2.4.2), and deleting the
	// task waits as long. Past WaitDelay ctr is killed anyway; the delay
	// also stops a container that inherited ctr's output pipes from
	// holding us past the context.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGINT) }
	cmd.WaitDelay = 5 * time.Second
	// Its own process group, so that a Ctrl-C on the terminal reaches the
	// caller only, which cancels ctx, and not ctr directly.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("ctr %s: %w\nstdout:\n%s\nstderr:\n%s",
			strings.Join(full, " "), err, stdout.Bytes(), stderr.Bytes())
	}
	return stdout.String(), nil
}

// removeLeftovers deletes every task and container in every namespace, so
// that no shim, runc container or rootfs mount outlives the test. If
// containerd is down but task bundles remain, it is started for the job.
func (c *Containerd) removeLeftovers(ctx context.Context) error {
	if !c.proc.started() {
		return nil
	}
	if !c.Running() {
		if !c.hasTaskBundles() {
			return nil
		}
		if err := c.Start(ctx); err != nil {
			return fmt.Errorf("restarting containerd to remove leftover tasks: %w", err)
		}
	}
	client, err := c.Client(ctx)
	if err != nil {
		return err
	}
	defer client.Close()
	nss, err := client.NamespaceService().List(ctx)
	if err != nil {
		return fmt.Errorf("listing namespaces: %w", err)
	}
	var errs []error
	for _, ns := range nss {
		errs = append(errs, removeContainers(namespaces.WithNamespace(ctx, ns), client))
	}
	return errors.Join(errs...)
}

// hasTaskBundles reports whether the runtime's state dir still holds task
// bundles, i.e. whether tasks may be running.
func (c *Containerd) hasTaskBundles() bool {
	nss, err := os.ReadDir(filepath.Join(c.state, "io.containerd.runtime.v2.task"))
	if err != nil {
		return false
	}
	for _, ns := range nss {
		ids, _ := os.ReadDir(filepath.Join(c.state, "io.containerd.runtime.v2.task", ns.Name()))
		if len(ids) > 0 {
			return true
		}
	}
	return false
}

func removeContainers(ctx context.Context, client *containerd.Client) error {
	containers, err := client.Containers(ctx)
	if err != nil {
		return fmt.Errorf("listing containers: %w", err)
	}
	var errs []error
	for _, ctr := range containers {
		if err := removeContainer(ctx, ctr); err != nil {
			errs = append(errs, fmt.Errorf("container %s: %w", ctr.ID(), err))
		}
	}
	return errors.Join(errs...)
}

func removeContainer(ctx context.Context, ctr containerd.Container) error {
	task, err := ctr.Task(ctx, nil)
	switch {
	case err == nil:
		if _, err := task.Delete(ctx, containerd.WithProcessKill); err != nil && !errdefs.IsNotFound(err) {
			return fmt.Errorf("deleting task: %w", err)
		}
	case !errdefs.IsNotFound(err):
		return fmt.Errorf("loading task: %w", err)
	}
	if err := ctr.Delete(ctx, containerd.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
		return fmt.Errorf("deleting: %w", err)
	}
	return nil
}
