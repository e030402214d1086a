//go:build linux

package harness

import (
	"context"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/crypto/bcrypt"
)

// Registry is a private distribution (v3) registry on 127.0.0.1, plain
// HTTP, with filesystem storage. Its port and storage survive Stop/Start,
// so tests can take the registry away and bring it back.
type Registry struct {
	dir    string
	addr   string
	config string
	opts   RegistryOptions
	proc   *process
}

// RegistryOptions configure a Registry.
type RegistryOptions struct {
	// Users, if set, turns on the registry's htpasswd authentication with
	// these username → password pairs: every request, pulls included,
	// then needs HTTP basic auth.
	Users map[string]string
}

// NewRegistry prepares a registry on a free port, open to all; call Start
// to run it. It is stopped when the test ends. Setup errors fail the test.
func NewRegistry(t T) *Registry {
	t.Helper()
	return NewRegistryWithOptions(t, RegistryOptions{})
}

// NewRegistryWithOptions is NewRegistry configured by opts.
func NewRegistryWithOptions(t T, opts RegistryOptions) *Registry {
	t.Helper()
	bin, err := FindBinary(BinRegistry)
	if err != nil {
		t.Fatal(err)
	}
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	r := &Registry{
		dir:    dir,
		addr:   "127.0.0.1:" + strconv.Itoa(port),
		config: filepath.Join(dir, "config.yml"),
		opts:   opts,
	}
	if err := os.MkdirAll(r.StorageDir(), 0o755); err != nil {
		t.Fatalf("creating registry storage: %v", err)
	}
	if len(opts.Users) > 0 {
		data, err := htpasswd(opts.Users)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(r.htpasswdPath(), data, 0o600); err != nil {
			t.Fatalf("writing registry htpasswd: %v", err)
		}
	}
	if err := os.WriteFile(r.config, []byte(r.configYAML()), 0o644); err != nil {
		t.Fatalf("writing registry config: %v", err)
	}
	r.proc = newProcess(t, "registry", bin, filepath.Join(dir, "registry.log"))
	return r
}

// htpasswd returns an htpasswd file for users. The registry accepts only
// bcrypt hashes; the minimum cost keeps each authenticated request cheap,
// which is all a test registry on 127.0.0.1 needs.
func htpasswd(users map[string]string) ([]byte, error) {
	var b strings.Builder
	for _, name := range slices.Sorted(maps.Keys(users)) {
		hash, err := bcrypt.GenerateFromPassword([]byte(users[name]), bcrypt.MinCost)
		if err != nil {
			return nil, fmt.Errorf("hashing the password of %s: %w", name, err)
		}
		fmt.Fprintf(&b, "%s:%s\n", name, hash)
	}
	return []byte(b.String()), nil
}

func (r *Registry) htpasswdPath() string { return filepath.Join(r.dir, "htpasswd") }

// configYAML is the registry's configuration. Deletes are enabled so tests
// can remove manifests; upload purging is off because it only adds log
// noise to a registry that lives for one test.
func (r *Registry) configYAML() string {
	auth := ""
	if len(r.opts.Users) > 0 {
		auth = fmt.Sprintf(`auth:
  htpasswd:
    realm: seamless-test
    path: %s
`, r.htpasswdPath())
	}
	return fmt.Sprintf(`version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: %s
%s`, r.StorageDir(), r.addr, auth)
}

// Start runs the registry and waits until GET /v2/ answers 200 (with a
// user's credentials if it has users).
func (r *Registry) Start(ctx context.Context) error {
	// The registry's OpenTelemetry exporter defaults to OTLP on localhost;
	// with nothing listening it only logs export failures.
	env := append(childEnv(nil), "OTEL_TRACES_EXPORTER=none", "OTEL_METRICS_EXPORTER=none", "OTEL_LOGS_EXPORTER=none")
	if err := r.proc.start([]string{"serve", r.config}, env); err != nil {
		return err
	}
	return r.proc.waitReady(ctx, "registry "+r.addr, r.ping)
}

func (r *Registry) ping(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+r.addr+"/v2/", nil)
	if err != nil {
		return err
	}
	// A 200 with credentials also proves that the htpasswd file works.
	for _, name := range slices.Sorted(maps.Keys(r.opts.Users)) {
		req.SetBasicAuth(name, r.opts.Users[name])
		break
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET /v2/: %s", resp.Status)
	}
	return nil
}

// Stop stops the registry gracefully; storage is kept.
func (r *Registry) Stop(ctx context.Context) error { return r.proc.stop(ctx) }

// Restart stops and starts the registry on the same port and storage.
func (r *Registry) Restart(ctx context.Context) error {
	if err := r.Stop(ctx); err != nil {
		return err
	}
	return r.Start(ctx)
}

// Running reports whether the registry process is up.
func (r *Registry) Running() bool { return r.proc.running() }

// Pid is the registry's process id, 0 when it is not running.
func (r *Registry) Pid() int { return r.proc.pid() }

// Addr is the registry's host:port, e.g. "127.0.0.1:40123".
func (r *Registry) Addr() string { return r.addr }

// Ref returns a reference to repo (e.g. "busybox:latest") in this registry.
func (r *Registry) Ref(repo string) string { return r.addr + "/" + repo }

// StorageDir is the registry's filesystem storage root.
func (r *Registry) StorageDir() string { return filepath.Join(r.dir, "storage") }

// LogPath is the registry's log file.
func (r *Registry) LogPath() string { return r.proc.logPath }
