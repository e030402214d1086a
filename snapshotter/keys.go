package snapshotter

import (
	"fmt"
	"strings"

	"github.com/containerd/errdefs"
)

// maxKeyLength bounds keys and names; containerd's own keys
// ("<namespace>/<seq>/<key>") are far shorter.
const maxKeyLength = 4096

// validateKey rejects keys that can only be mistakes or attacks. Keys are
// never used as paths (directories are named by numeric IDs), but a key
// with a ".." element or a NUL byte is refused anyway so that no future
// use of a key as a path component can escape the root, and so that tools
// printing keys are not confused.
func validateKey(kind, key string) error {
	switch {
	case key == "":
		return fmt.Errorf("%s must not be empty: %w", kind, errdefs.ErrInvalidArgument)
	case len(key) > maxKeyLength:
		return fmt.Errorf("%s is %d bytes long, the limit is %d: %w", kind, len(key), maxKeyLength, errdefs.ErrInvalidArgument)
	case strings.ContainsRune(key, 0):
		return fmt.Errorf("%s %q contains a NUL byte: %w", kind, key, errdefs.ErrInvalidArgument)
	}
	for _, elem := range strings.Split(key, "/") {
		if elem == ".." {
			return fmt.Errorf("%s %q contains a \"..\" path element: %w", kind, key, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}
