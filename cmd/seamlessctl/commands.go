//go:build linux

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/url"
	"time"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
	"github.com/seamless-snapshotter/seamless-snapshotter/config"
)

const commitUsage = `Usage: seamlessctl commit --container <id|prefix|name> --target <ref> [options]

Freeze a running container for milliseconds, capture its writable layer as
it was at that instant, and thaw it. The capture is then pending: the daemon
builds an image from it (the container's image layers + the captured layer)
and pushes it to <ref> in the background, or with --local imports it into
containerd on this node. Follow the job with 'seamlessctl wait <commit-id>'
or 'seamlessctl status <commit-id>', or give --wait.

The container is looked up in the containerd namespace (-n) by exact ID,
then nerdctl name, then unique ID prefix, and must run on the seamless
snapshotter.

Options:
  --container ID        container ID, nerdctl name or unique ID prefix (required)
  --target REF          image reference to publish to (required); with --local
                        the name of the image in containerd
  --local               import the image into containerd's content and image
                        stores on this node (namespace -n) instead of pushing
                        it to a registry
  --compression ALGO    compression of the new layer: gzip or zstd (default:
                        the daemon's configured compression)
  --compression-level N compression level: gzip 1 (fastest) to 9, zstd 1 to
                        22 (default: the daemon's configured level)
  --pause-budget DUR    longest the container may stay frozen, e.g. 250ms; past
                        it the container is thawed and the commit fails
                        (default: the daemon's configured budget)
  --wait                after the capture, wait for the image like
                        'seamlessctl wait': show the progress, end with
                        "done: <target>@<digest>", and exit with the job's
                        outcome (see 'seamlessctl wait --help')
  --timeout DUR         with --wait, stop waiting after DUR, e.g. 10m, with exit
                        code 1; the job keeps running (default: no timeout)
  --snapshotter NAME    name of the seamless snapshotter in containerd (default seamless)
  -o, --output FORMAT   text, or json for the daemon's commit record (with
                        --wait, the final record)
  -a, -n, --api-address the global options, here or before the command

Examples:
  seamlessctl commit --container web --target registry.example.com/app:snap1
  seamlessctl commit --container web --target registry.example.com/app:snap1 --wait --timeout 10m
  seamlessctl commit --container web --target app:snap1 --local --wait
  seamlessctl -n k8s.io commit --container 3f2a9c --target registry.example.com/app:snap1 --pause-budget 100ms --compression zstd
  seamlessctl commit --container web --target registry.example.com/app:snap1 -o json | jq -r .id
`

func runCommit(ctx context.Context, c *cli, args []string) error {
	fs := newFlagSet("commit")
	c.register(fs)
	var (
		container   = fs.String("container", "", "")
		target      = fs.String("target", "", "")
		budget      = fs.String("pause-budget", "", "")
		compression = fs.String("compression", "", "")
		level       = fs.Int("compression-level", 0, "")
		local       = fs.Bool("local", false, "")
		wait        = fs.Bool("wait", false, "")
		timeout     = fs.Duration("timeout", 0, "")
		snapshotter = fs.String("snapshotter", "seamless", "")
		output      = outputFlag(fs)
	)
	args, err := parseCommand(fs, args, 0, "")
	if err != nil {
		return err
	}
	timeoutSet := false
	fs.Visit(func(f *flag.Flag) { timeoutSet = timeoutSet || f.Name == "timeout" })
	switch {
	case *container == "":
		return usageErrorf("commit: --container is required")
	case *target == "":
		return usageErrorf("commit: --target is required")
	case timeoutSet && !*wait:
		return usageErrorf("commit: --timeout is only for --wait")
	case *timeout < 0:
		return usageErrorf("commit: --timeout %v must be positive", *timeout)
	}
	if *budget != "" {
		if d, err := time.ParseDuration(*budget); err != nil || d <= 0 {
			return usageErrorf("commit: --pause-budget %q is not a positive duration such as 250ms", *budget)
		}
	}
	if *compression != "" {
		if err := config.ValidateCompression(*compression); err != nil {
			return usageErrorf("commit: --compression %v", err)
		}
	}
	if err := config.ValidateCompressionLevel(*compression, *level); err != nil {
		return usageErrorf("commit: --compression-level %v", err)
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
	client := newAPIClient(c.apiAddress)
	rec, raw, err := client.createCommit(ctx, api.CommitRequest{
		Namespace:        c.namespace,
		Container:        ctr.SnapshotKey,
		Target:           *target,
		PauseBudget:      *budget,
		Compression:      *compression,
		CompressionLevel: *level,
		Local:            *local,
	})
	if err != nil {
		return err
	}
	if !*wait {
		if *output == "json" {
			return writeJSON(c.stdout, raw)
		}
		return writeCommit(c.stdout, rec, true)
	}
	if *output == "text" {
		if err := writeCommit(c.stdout, rec, false); err != nil {
			return err
		}
	}
	return c.follow(ctx, client, rec.ID, *timeout, *output)
}

const statusUsage = `Usage: seamlessctl status [options] <commit-id>

Show a commit: its state (capturing, pending, converting, pushing, done or
failed) and the progress of the current phase, its target and whether it is
pushed or imported locally, how long the container was frozen, the capture
strategy, the size of the capture and whether it was removed, the base image,
the layers added to it (their count, and the last one's digest and size),
the image digest, the job's attempts, and its error. One "key  value" row
each; rows that do not apply are left out.

Options:
  -o, --output FORMAT   text (a table), or json for the daemon's commit record
  --api-address PATH    the global option, here or before the command

Examples:
  seamlessctl status lz9k2x1a-4f0c2b7a9e3d1c55
  seamlessctl status -o json lz9k2x1a-4f0c2b7a9e3d1c55 | jq -r .state
  seamlessctl status lz9k2x1a-4f0c2b7a9e3d1c55 | awk '$1 == "digest" {print $2}'
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
	return writeDetail(c.stdout, rec, time.Now())
}

const listUsage = `Usage: seamlessctl list [options]

List the commits of the containers in the containerd namespace (-n): their
state, the progress of a running job (percent, or when a failed attempt will
be retried), target, image digest (short), pause, strategy and capture size.
The errors of failed and retrying jobs follow the table.

Options:
  --state STATE         only commits in this state: capturing, pending,
                        converting, pushing, done or failed
  --container ID        only commits of this container: ID, nerdctl name or unique
                        ID prefix of an existing container, or the ID of a
                        removed one
  -o, --output FORMAT   text (a table), or json for the daemon's answer
  -a, -n, --api-address the global options, here or before the command

Examples:
  seamlessctl list
  seamlessctl list --container web --state failed
  seamlessctl list --state done -o json | jq -r '.commits[] | .target + "@" + .image_digest'
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
	return writeTable(c.stdout, commits, time.Now())
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
