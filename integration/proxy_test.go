//go:build linux

package integration

import (
	"context"
	"testing"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/seamless-snapshotter/seamless-snapshotter/integration/harness"
)

// proxySnapshotter starts a containerd-seamless-grpc daemon on root and
// returns containerd's proxy client for it, as containerd's
// [proxy_plugins] would use it.
func proxySnapshotter(ctx context.Context, t testing.TB, root string) (snapshots.Snapshotter, func() error, error) {
	d := harness.NewDaemon(t, harness.DaemonOptions{Root: root})
	if err := d.Start(ctx); err != nil {
		return nil, nil, err
	}
	conn, err := grpc.NewClient("unix://"+d.Socket(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), harness.SnapshotterName)
	return sn, func() error {
		conn.Close()
		return d.Stop(context.Background())
	}, nil
}

// TestProxyConformance runs containerd's snapshotter suite through the
// gRPC proxy against the daemon binary. The name is "overlayfs" because the
// suite expects overlay rename semantics only under that name.
func TestProxyConformance(t *testing.T) {
	harness.RequireBinaries(t, harness.BinDaemon)
	testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return proxySnapshotter(ctx, t, root)
	})
}
