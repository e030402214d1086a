//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/log"
	"google.golang.org/grpc"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
	"github.com/seamless-snapshotter/seamless-snapshotter/config"
	"github.com/seamless-snapshotter/seamless-snapshotter/convert"
	"github.com/seamless-snapshotter/seamless-snapshotter/snapshotter"
)

// gracefulStopTimeout bounds how long in-flight calls may finish on
// shutdown before they are cut.
const gracefulStopTimeout = 10 * time.Second

// serve runs the snapshotter until ctx is cancelled.
func serve(ctx context.Context, cfg config.Config) error {
	if err := checkRootWritable(cfg.Root); err != nil {
		return err
	}
	metrics := api.NewMetrics()
	// Every capture that ends wakes the converter, which is made after the
	// snapshotter it reads from.
	captured := make(chan struct{}, 1)
	opts := append(snapshotter.ConfigOptions(cfg.Snapshotter, cfg.Commit),
		snapshotter.WithCommitObserver(metrics.Observe),
		snapshotter.WithCommitObserver(func(snapshotter.Commit) {
			select {
			case captured <- struct{}{}:
			default:
			}
		}))
	sn, err := snapshotter.New(ctx, cfg.Root, opts...)
	if err != nil {
		return err
	}
	defer func() {
		if err := sn.Close(); err != nil {
			log.G(ctx).WithError(err).Error("failed to close snapshotter")
		}
	}()
	metrics.WatchCaptures(sn)

	convOpts := []convert.Option{convert.WithJobObserver(metrics.ObserveJob)}
	if cfg.Convert.BackgroundBuild {
		convOpts = append(convOpts, convert.WithBackgroundClass(sn.BackgroundClass()))
	}
	conv, err := convert.New(sn, cfg.Convert, convOpts...)
	if err != nil {
		return err
	}
	convCtx, stopConverter := context.WithCancel(ctx)
	convDone := make(chan struct{})
	go func() {
		defer close(convDone)
		conv.Run(convCtx)
	}()
	go func() {
		for {
			select {
			case <-convCtx.Done():
				return
			case <-captured:
				conv.Wake()
			}
		}
	}()
	// Stopped before the snapshotter closes its database (deferred
	// above, so it runs after this).
	defer func() {
		stopConverter()
		<-convDone
	}()

	l, err := listenUnix(cfg.Address)
	if err != nil {
		return err
	}
	defer os.Remove(cfg.Address)

	apiSocket := cfg.APISocket()
	al, err := listenUnix(apiSocket)
	if err != nil {
		l.Close()
		return err
	}
	defer os.Remove(apiSocket)

	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	httpSrv := &http.Server{
		Handler:           api.Handler(sn, metrics),
		ReadHeaderTimeout: 10 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}

	errCh := make(chan error, 2)
	go func() { errCh <- srv.Serve(l) }()
	go func() {
		if err := httpSrv.Serve(al); !errors.Is(err, http.ErrServerClosed) {
			errCh <- fmt.Errorf("API: %w", err)
		}
	}()
	log.G(ctx).WithFields(log.Fields{
		"address":       cfg.Address,
		"api_address":   apiSocket,
		"root":          cfg.Root,
		"version":       version,
		"mount_options": sn.MountOptions(),
		"strategy":      sn.Strategy(),
	}).Info("containerd-seamless-grpc ready")

	select {
	case err := <-errCh:
		return fmt.Errorf("serve %s: %w", cfg.Address, err)
	case <-ctx.Done():
	}
	log.G(ctx).Info("stopping")
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), gracefulStopTimeout)
	defer cancel()
	if err := httpSrv.Shutdown(shutdownCtx); err != nil {
		httpSrv.Close()
	}
	stopped := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(gracefulStopTimeout):
		log.G(ctx).Warn("in-flight requests did not finish in time; stopping now")
		srv.Stop()
	}
	return nil
}

// checkRootWritable creates the root (root-only) and proves it writable
// with a file, so that a read-only or foreign root is reported in one line
// at start.
func checkRootWritable(root string) error {
	if err := os.MkdirAll(root, 0o700); err != nil {
		return fmt.Errorf("root %s cannot be created: %w (choose a writable --root)", root, err)
	}
	f, err := os.CreateTemp(root, ".write-check-")
	if err != nil {
		return fmt.Errorf("root %s is not writable: %w (choose a writable --root)", root, err)
	}
	name := f.Name()
	f.Close()
	return os.Remove(name)
}

// listenUnix listens on a root-only unix socket. A socket file left by a
// crashed daemon is replaced; one that a live server answers on is not.
func listenUnix(address string) (net.Listener, error) {
	dir := filepath.Dir(address)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("create socket directory %s: %w", dir, err)
		}
	}
	if fi, err := os.Lstat(address); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket: remove it or choose another --address", address)
		}
		if conn, err := net.DialTimeout("unix", address, time.Second); err == nil {
			conn.Close()
			return nil, fmt.Errorf("socket %s is in use by a running server: stop it or choose another --address", address)
		}
		if err := os.Remove(address); err != nil {
			return nil, fmt.Errorf("remove stale socket %s: %w", address, err)
		}
	}
	// The umask makes the socket 0600 from its creation: a chmod afterwards
	// would leave a window in which anyone could connect.
	old := syscall.Umask(0o177)
	l, err := net.Listen("unix", address)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", address, err)
	}
	return l, nil
}
