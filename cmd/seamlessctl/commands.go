//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
)

const commitUsage = `Usage: seamlessctl commit --container <id|prefix|name> --target <ref> [options]

Freeze a running container for milliseconds, capture its writable layer as
it was at that instant, and thaw it. The capture is then pending: the daemon
builds an image from it (the container's image layers + the captured layer)
and pushes it to <ref> in the background. Follow it with
'seamlessctl status <commit-id>'.

The container is looked up in the containerd namespace (-n) by exact ID,
then nerdctl name, then unique ID prefix, and must run on the seamless
snapshotter.

Options:
  --container ID        container ID, nerdctl name or unique ID prefix (required)
  --target REF          image reference to publish to (required)
  --pause-budget DUR    longest the container may stay frozen, e.g. 250ms; past
                        it the container is thawed and the commit fails
                        (default: the daemon's configured budget)
  --snapshotter NAME    name of the seamless snapshotter in containerd (default seamless)
  -o, --output FORMAT   text, or json for the daemon's commit record
  -a, -n, --api-address the global options, here or before the command

Examples:
  seamlessctl commit --container web --target registry.example.com/app:snap1
  seamlessctl -n k8s.io commit --container 3f2a9c --target registry.example.com/app:snap1 --pause-budget 100ms
  seamlessctl commit --container web --target registry.example.com/app:snap1 -o json | jq -r .id
`

func runCommit(ctx context.Context, c *cli, args []string) error {
	fs := newFlagSet("commit")
	c.register(fs)
	var (
		container   = fs.String("container", "", "")
		target      = fs.String("target", "", "")
		budget      = fs.String("pause-budget", "", "")
		snapshotter = fs.String("snapshotter", "seamless", "")
		output      = outputFlag(fs)
	)
	args, err := parseCommand(fs, args, 0, "")
	if err != nil {
		return err
	}
	switch {
	case *container == "":
		return usageErrorf("commit: --container is required")
	case *target == "":
		return usageErrorf("commit: --target is required")
	}
	if *budget != "" {
		if d, err := time.ParseDuration(*budget); err != nil || d <= 0 {
			return usageErrorf("commit: --pause-budget %q is not a positive duration such as 250ms", *budget)
		}
	}

	all, err := listContainers(ctx, c.address, c.namespace)
	if err != nil {
		return err
	}
	ctr, err := resolveContainer(*container, c.namespace, all)
	if err != nil {
		return err
	}
	if err := checkCommittable(ctr, *snapshotter); err != nil {
		return err
	}
	rec, raw, err := newAPIClient(c.apiAddress).createCommit(ctx, api.CommitRequest{
		Namespace:   c.namespace,
		Container:   ctr.SnapshotKey,
		Target:      *target,
		PauseBudget: *budget,
	})
	if err != nil {
		return err
	}
	if *output == "json" {
		return writeJSON(c.stdout, raw)
	}
	return writeCommit(c.stdout, rec)
}

const statusUsage = `Usage: seamlessctl status [options] <commit-id>

Show a commit: its state (capturing, pending, failed, ...), target, how long
the container was frozen, the capture strategy and the size of the capture.

Options:
  -o, --output FORMAT   text (a table), or json for the daemon's commit record
  --api-address PATH    the global option, here or before the command

Examples:
  seamlessctl status lz9k2x1a-4f0c2b7a9e3d1c55
  seamlessctl status -o json lz9k2x1a-4f0c2b7a9e3d1c55 | jq -r .state
`

func runStatus(ctx context.Context, c *cli, args []string) error {
	fs := newFlagSet("status")
	c.register(fs)
	output := outputFlag(fs)
	args, err := parseCommand(fs, args, 1, "one commit ID")
	if err != nil {
		return err
	}
	rec, raw, err := newAPIClient(c.apiAddress).getCommit(ctx, args[0])
	if err != nil {
		return err
	}
	if *output == "json" {
		return writeJSON(c.stdout, raw)
	}
	return writeTable(c.stdout, []api.Commit{rec})
}

const listUsage = `Usage: seamlessctl list [options]

List the commits of the containers in the containerd namespace (-n).

Options:
  --state STATE         only commits in this state (capturing, pending, failed, ...)
  --container ID        only commits of this container: ID, nerdctl name or unique
                        ID prefix of an existing container, or the ID of a
                        removed one
  -o, --output FORMAT   text (a table), or json for the daemon's answer
  -a, -n, --api-address the global options, here or before the command

Examples:
  seamlessctl list
  seamlessctl list --container web --state failed
  seamlessctl -n k8s.io list -o json | jq -r '.commits[].id'
`

func runList(ctx context.Context, c *cli, args []string) error {
	fs := newFlagSet("list")
	c.register(fs)
	var (
		state     = fs.String("state", "", "")
		container = fs.String("container", "", "")
		output    = outputFlag(fs)
	)
	args, err := parseCommand(fs, args, 0, "")
	if err != nil {
		return err
	}
	q := url.Values{"namespace": {c.namespace}}
	if *state != "" {
		q.Set("state", *state)
	}
	if *container != "" {
		key, err := snapshotKeyOf(ctx, c, *container)
		if err != nil {
			return err
		}
		q.Set("container", key)
	}
	commits, raw, err := newAPIClient(c.apiAddress).listCommits(ctx, q)
	if err != nil {
		return err
	}
	if *output == "json" {
		return writeJSON(c.stdout, raw)
	}
	return writeTable(c.stdout, commits)
}

// snapshotKeyOf resolves a container like commit does; a container that
// no longer exists is taken as the ID it had (for ctr, nerdctl and CRI the
// snapshot key is the container ID), so its commits can still be listed.
func snapshotKeyOf(ctx context.Context, c *cli, query string) (string, error) {
	all, err := listContainers(ctx, c.address, c.namespace)
	if err != nil {
		return "", fmt.Errorf("resolving --container: %w", err)
	}
	ctr, err := resolveContainer(query, c.namespace, all)
	var missing *notFoundError
	if errors.As(err, &missing) {
		return query, nil
	}
	if err != nil {
		return "", err
	}
	return ctr.SnapshotKey, nil
}
