//go:build linux

// Package harness starts real, private components for end-to-end tests, in
// the style of containerd's own integration tests: a distribution
// registry, our snapshotter daemon (containerd-seamless-grpc) and a
// containerd that uses the daemon as its "seamless" proxy snapshotter.
//
// Every component has its own directories, sockets and log file, is
// stopped (process group killed) when the test ends, and shows the last
// lines of its log if the test failed. Binaries are found by FindBinary;
// Require skips a test (fails it with CI=true) when they are missing or the
// test does not run as root.
//
// Everything takes a T, the part of testing.TB the harness uses, so that
// programs can use the harness too: Runner implements T outside `go test`
// and cleans up on return, on Fatal and on Ctrl-C (cmd/seamless-demo).
//
//	func TestSomething(t *testing.T) {
//		harness.Require(t)
//		env := harness.Start(t, harness.Options{})
//		ctx := t.Context()
//		if err := env.PullImage(ctx, env.Registry.Ref("busybox:v1"), harness.SnapshotterName); err != nil {
//			t.Fatal(err)
//		}
//		id := harness.UniqueID("test-")
//		if err := env.RunDetached(ctx, id, env.Registry.Ref("busybox:v1"), harness.SnapshotterName, "sleep", "600"); err != nil {
//			t.Fatal(err)
//		}
//	}
package harness
