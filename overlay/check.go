//go:build linux

package overlay

import (
	"fmt"
	"os"

	"github.com/containerd/containerd/v2/plugins/snapshots/overlay/overlayutils"
	"github.com/containerd/log"
)

// CheckSupported returns an actionable error when overlayfs cannot work with
// root as its backing directory: no d_type support, or no overlay (with
// multiple lowers) in this kernel. It mounts for real in a temporary
// directory under root.
func CheckSupported(root string) error {
	if err := overlayutils.Supported(root); err != nil {
		return fmt.Errorf("overlayfs is not usable on %s (is the overlay module loaded? `modprobe overlay`): %w", root, err)
	}
	return nil
}

// DetectOptions completes the configured overlay options with those this
// kernel and backing filesystem need, unless the configuration already
// decides them:
//   - userxattr, when running in a user namespace on kernels that need it;
//   - index=off, where the kernel has the index feature, because a
//     snapshot's lowers are shared between many mounts and the inode index
//     would tie a layer to the first upper that copied it up.
func DetectOptions(root string, configured []string) []string {
	options := append([]string(nil), configured...)
	if !HasOption(options, "userxattr") {
		need, err := overlayutils.NeedsUserXAttr(root)
		if err != nil {
			log.L.WithError(err).Warnf("cannot detect whether overlay needs \"userxattr\", assuming %v", need)
		}
		if need {
			options = append(options, "userxattr")
		}
	}
	if !HasOption(options, "index") && kernelHasIndex() {
		options = append(options, "index=off")
	}
	return options
}

func kernelHasIndex() bool {
	_, err := os.Stat("/sys/module/overlay/parameters/index")
	return err == nil
}
