//go:build linux

// Command containerd-seamless-grpc serves the seamless snapshotter to
// containerd as a proxy plugin over a unix socket.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/containerd/log"

	"github.com/seamless-snapshotter/seamless-snapshotter/config"
	"github.com/seamless-snapshotter/seamless-snapshotter/convert"
)

// version is set at link time (-ldflags "-X main.version=...").
var version = "dev"

func main() {
	// Started by the converter as a layer builder: build and exit.
	convert.MaybeRunLayerBuilder()
	if err := run(os.Args[1:], os.Stderr); err != nil {
		fmt.Fprintf(os.Stderr, "containerd-seamless-grpc: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string, stderr io.Writer) error {
	cfg, showVersion, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	if showVersion {
		fmt.Fprintf(stderr, "containerd-seamless-grpc %s\n", version)
		return nil
	}
	if err := log.SetLevel(cfg.LogLevel); err != nil {
		return fmt.Errorf("log_level: %w", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return serve(ctx, cfg)
}

// parseFlags loads the configuration: defaults, then the file, then the
// flags that were given on the command line.
func parseFlags(args []string, stderr io.Writer) (config.Config, bool, error) {
	fs := flag.NewFlagSet("containerd-seamless-grpc", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		configPath  = fs.String("config", config.DefaultPath, "configuration file (TOML)")
		root        = fs.String("root", "", "snapshotter root directory (default "+config.DefaultRoot+")")
		address     = fs.String("address", "", "gRPC unix socket for containerd (default "+config.DefaultAddress+")")
		apiAddress  = fs.String("api-address", "", "HTTP API unix socket (default api.sock beside --address)")
		logLevel    = fs.String("log-level", "", "trace, debug, info, warn, error (default "+config.DefaultLogLevel+")")
		containerd  = fs.String("containerd-address", "", "containerd's socket, for building and pushing images (default "+config.DefaultConvert().ContainerdAddress+")")
		hostsDir    = fs.String("hosts-dir", "", "registry hosts.toml directory (default "+config.DefaultConvert().HostsDir+")")
		showVersion = fs.Bool("version", false, "print the version and exit")
	)
	if err := fs.Parse(args); err != nil {
		return config.Config{}, false, err
	}
	if fs.NArg() > 0 {
		return config.Config{}, false, fmt.Errorf("unexpected arguments %q (all options are flags)", fs.Args())
	}
	if *showVersion {
		return config.Config{}, true, nil
	}

	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	// The default file may be absent; a file named on the command line must
	// exist.
	cfg, err := config.Load(*configPath, !set["config"])
	if err != nil {
		return cfg, false, err
	}
	if set["root"] {
		cfg.Root = *root
	}
	if set["address"] {
		cfg.Address = *address
	}
	if set["api-address"] {
		cfg.APIAddress = *apiAddress
	}
	if set["log-level"] {
		cfg.LogLevel = *logLevel
	}
	if set["containerd-address"] {
		cfg.Convert.ContainerdAddress = *containerd
	}
	if set["hosts-dir"] {
		cfg.Convert.HostsDir = *hostsDir
	}
	return cfg, false, cfg.Validate()
}
