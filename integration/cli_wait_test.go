//go:build linux

package integration

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
	"github.com/seamless-snapshotter/seamless-snapshotter/integration/harness"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// doneRef reads the "done: <target>@<digest>" line that ends the output of
// wait and commit --wait.
func doneRef(t *testing.T, out string) (target, digest string) {
	t.Helper()
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	last, ok := strings.CutPrefix(lines[len(lines)-1], "done: ")
	if !ok {
		t.Fatalf("output does not end with done: <ref>\n%s", out)
	}
	target, digest, ok = strings.Cut(last, "@")
	if !ok || !strings.HasPrefix(digest, "sha256:") {
		t.Fatalf("done line %q is not <target>@<digest>", last)
	}
	return target, digest
}

// TestCLIWait follows commits to their image with seamlessctl: commit
// --wait pushes to the registry or imports locally and ends with the
// digest; wait -o json gives the final record; status and list show it;
// a wait that times out leaves the job running; a registry nobody serves
// fails the job with exit code 5.
func TestCLIWait(t *testing.T) {
	// Few quick retries, so that the unreachable registry fails soon.
	config := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(config, []byte("[convert]\nmax_attempts = 2\nretry_initial = \"100ms\"\nretry_max = \"200ms\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, env, ref := setupWith(t, harness.Options{Daemon: harness.DaemonOptions{ConfigFile: config}}, seamless)
	c := client(ctx, t, env)
	cli := newCLIRunner(ctx, t, env)
	id := harness.UniqueID("cliwait-")
	runAndWaitFor(ctx, t, env, id, ref, "echo seamless > /marker; exec sleep 100000", "/marker")
	target := env.Registry.Ref("cliwait/app")

	var pushed string
	t.Run("commit --wait", func(t *testing.T) {
		out := cli.ok(ctx, t, "commit", "--container", id, "--target", target+":v1", "--wait", "--timeout", "2m")
		// The commit's rows first, as without --wait, then the progress.
		f := textFields(t, strings.SplitN(out, "\nstate", 2)[0])
		if f["commit"] == "" || f["target"] != target+":v1" {
			t.Fatalf("commit --wait printed\n%s", out)
		}
		got, digest := doneRef(t, out)
		if got != target+":v1" {
			t.Errorf("done with target %q, want %q", got, target+":v1")
		}
		var rec api.Commit
		if err := json.Unmarshal([]byte(cli.ok(ctx, t, "status", "-o", "json", f["commit"])), &rec); err != nil {
			t.Fatal(err)
		}
		if rec.State != snapshotter.StateDone || string(rec.ImageDigest) != digest || len(rec.Layers) == 0 {
			t.Fatalf("status after commit --wait: %+v", rec)
		}
		pushed = rec.ID
	})

	t.Run("status and list", func(t *testing.T) {
		if pushed == "" {
			t.Fatal("the commit --wait subtest published nothing")
		}
		f := textFields(t, cli.ok(ctx, t, "status", pushed))
		if f["state"] != "done" || !strings.HasPrefix(f["digest"], "sha256:") || !strings.Contains(f["layers"], ", last sha256:") {
			t.Errorf("status printed %q", f)
		}
		out := cli.ok(ctx, t, "list", "--state", "done")
		if !strings.Contains(out, "PROGRESS") || !strings.Contains(out, pushed) || !strings.Contains(out, f["digest"][:len("sha256:")+12]) {
			t.Errorf("list --state done:\n%s", out)
		}
	})

	t.Run("wait -o json", func(t *testing.T) {
		var rec api.Commit
		if err := json.Unmarshal([]byte(cli.ok(ctx, t, "commit", "--container", id, "--target", target+":v2", "--compression", "zstd", "-o", "json")), &rec); err != nil {
			t.Fatal(err)
		}
		var final api.Commit
		out := cli.ok(ctx, t, "wait", "-o", "json", rec.ID)
		if err := json.Unmarshal([]byte(out), &final); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		if final.ID != rec.ID || final.State != snapshotter.StateDone || final.ImageDigest == "" || final.Compression != "zstd" {
			t.Fatalf("wait -o json: %+v", final)
		}
		// Waiting for a finished commit answers at once.
		if _, digest := doneRef(t, cli.ok(ctx, t, "wait", rec.ID)); digest != string(final.ImageDigest) {
			t.Errorf("wait again: digest %s, want %s", digest, final.ImageDigest)
		}
	})

	t.Run("local", func(t *testing.T) {
		out := cli.ok(ctx, t, "commit", "--container", id, "--target", "cliwait/local:v1", "--local", "--wait")
		name, digest := doneRef(t, out)
		img, err := c.ImageService().Get(namespaces.WithNamespace(ctx, env.Containerd.Namespace()), name)
		if err != nil {
			t.Fatalf("image %s in containerd: %v", name, err)
		}
		if string(img.Target.Digest) != digest {
			t.Fatalf("image %s is %s, commit says %s", name, img.Target.Digest, digest)
		}
	})

	t.Run("timeout", func(t *testing.T) {
		res := cli.run(ctx, t, "commit", "--container", id, "--target", target+":late", "--wait", "--timeout", "1ms")
		if res.code != 1 || !strings.Contains(res.stderr, "timed out after 1ms waiting for commit ") || !strings.Contains(res.stderr, "the job keeps running") {
			t.Fatalf("exit %d, stderr %q", res.code, res.stderr)
		}
		f := textFields(t, strings.SplitN(res.stdout, "\nstate", 2)[0])
		// The job went on without us.
		if _, digest := doneRef(t, cli.ok(ctx, t, "wait", "--timeout", "2m", f["commit"])); digest == "" {
			t.Fatal("no digest")
		}
	})

	t.Run("registry unreachable", func(t *testing.T) {
		res := cli.run(ctx, t, "commit", "--container", id, "--target", "127.0.0.1:1/cliwait/app:nowhere", "--wait", "--timeout", "2m")
		if res.code != 5 || !strings.HasPrefix(res.stderr, "seamlessctl: commit ") || !strings.Contains(res.stderr, " failed: [REGISTRY_") ||
			strings.Count(res.stderr, "\n") != 1 {
			t.Fatalf("exit %d, stderr %q; want exit 5 and one line with the job's registry error", res.code, res.stderr)
		}
	})

	if st := taskStatus(ctx, t, c, id); st != containerd.Running {
		t.Fatalf("container is %s", st)
	}
}
