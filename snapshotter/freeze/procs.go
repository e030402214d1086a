//go:build linux

package freeze

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// ProcessesUsing returns, sorted, the PIDs of the processes whose root
// directory is in the snapshot whose upperdir is upperdir. It looks at the
// mounts and at /proc only, so it finds a container whatever started it
// (ctr, nerdctl, Kubernetes), and processes that exit during the scan are
// ignored. No mount of the snapshot means no process (unless one chrooted
// into the upperdir itself, which writes to it all the same): the result is
// empty and the error nil.
//
// A snapshot is mounted in one of two ways (see overlay.Layout.Mounts):
//   - an overlay whose upperdir option is upperdir. Every file of an overlay
//     mount has the overlay's own (anonymous) device number, so a process
//     whose root has that device has its root in the snapshot, also when it
//     chrooted into a subdirectory of the container's root.
//   - a bind mount of upperdir itself, for a snapshot without parents. A bind
//     mount shares the device of the filesystem that holds upperdir (the
//     host's), so the device says nothing; the root must be upperdir itself,
//     i.e. the same device and inode. (A process that chrooted into a
//     subdirectory of such a container is not found; its cgroup is frozen
//     anyway through the container's other processes.)
//
// Only mounts visible in this process's mount namespace are seen; the
// container runtime mounts a container's rootfs there (containerd's shim
// runs in the host's namespace).
func ProcessesUsing(ctx context.Context, upperdir string) ([]int, error) {
	if !filepath.IsAbs(upperdir) {
		return nil, fmt.Errorf("upperdir %q is not absolute: %w", upperdir, errdefs.ErrInvalidArgument)
	}
	upperdir = filepath.Clean(upperdir)
	var up unix.Stat_t
	if err := unix.Stat(upperdir, &up); err != nil {
		return nil, fmt.Errorf("stat upperdir %s: %w", upperdir, notFound(err))
	}

	overlayDevs, err := overlayDevices(upperdir)
	if err != nil {
		return nil, err
	}
	if len(overlayDevs) > 0 {
		log.G(ctx).WithField("upperdir", upperdir).WithField("devices", overlayDevs).Trace("overlay mounts of the snapshot")
	}

	return scanRoots(ctx, func(dev, ino uint64) bool {
		return slices.Contains(overlayDevs, dev) || (dev == up.Dev && ino == up.Ino)
	})
}

// overlayDevices returns the device numbers of the overlay mounts whose
// upperdir is upperdir (a cleaned absolute path).
func overlayDevices(upperdir string) ([]uint64, error) {
	mounts, err := mountinfo.GetMounts(func(m *mountinfo.Info) (skip, stop bool) {
		return m.FSType != "overlay" || !hasUpperdir(m.VFSOptions, upperdir), false
	})
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	var devs []uint64
	for _, m := range mounts {
		// The same overlay appears once per bind mount of it (runc bind-
		// mounts the rootfs onto itself); they all share the device.
		dev := unix.Mkdev(uint32(m.Major), uint32(m.Minor))
		if !slices.Contains(devs, dev) {
			devs = append(devs, dev)
		}
	}
	return devs, nil
}

// hasUpperdir reports whether the super options of an overlay mount, as
// mountinfo shows them, have upperdir=upperdir.
//
// The kernel escapes ' ', '\t', '\n', '\\', ',' and '=' in option values
// as octal (\040 ...), so splitting on ',' is safe and a value must be
// unescaped before comparing. Comparing whole values, not prefixes, keeps
// upperdir "/x/up" from matching a mount of "/x/up2". moby/sys/mountinfo
// unescapes the mount point and root fields but hands the super options
// over raw, hence unescapeOctal here.
//
// Recent kernels show the option as it was given, including overlayfs's own
// backslash escapes (a ',' or ':' in a path is given as "\,", "\:"), while
// older ones show the unescaped path; both forms are accepted.
func hasUpperdir(superOptions, upperdir string) bool {
	for opt := range strings.SplitSeq(superOptions, ",") {
		raw, ok := strings.CutPrefix(opt, "upperdir=")
		if !ok {
			continue
		}
		v := unescapeOctal(raw)
		if v == upperdir || filepath.Clean(v) == upperdir {
			return true
		}
		if u := unescapeOverlay(v); filepath.Clean(u) == upperdir {
			return true
		}
	}
	return false
}

// unescapeOctal undoes the kernel's mangle escaping of mountinfo and maps
// fields: a backslash and three octal digits stand for one byte.
func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }

// unescapeOverlay undoes overlayfs's escaping of layer paths in its mount
// options: a backslash makes the next byte literal.
func unescapeOverlay(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			i++
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// scanRoots returns the PIDs of the processes whose root directory's device
// and inode satisfy match.
//
// It uses statx with AT_STATX_DONT_SYNC: a process chrooted into a network
// filesystem whose server is gone must not hang the scan, and the device and
// inode number never need a round trip.
//
// Only thread-group leaders are looked at; a thread that unshared its
// filesystem information and chrooted elsewhere is not seen, but it is in
// the same cgroup as its process and is frozen with it.
func scanRoots(ctx context.Context, match func(dev, ino uint64) bool) ([]int, error) {
	d, err := os.Open("/proc")
	if err != nil {
		return nil, err
	}
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		return nil, fmt.Errorf("read /proc: %w", err)
	}
	var pids, denied []int
	for _, name := range names {
		pid, err := strconv.Atoi(name)
		if err != nil {
			continue // not a process
		}
		var stx unix.Statx_t
		err = unix.Statx(unix.AT_FDCWD, "/proc/"+name+"/root", unix.AT_STATX_DONT_SYNC, unix.STATX_INO, &stx)
		switch {
		case err == nil:
		case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ESRCH):
			// Exited, or a zombie (whose root is already released).
			continue
		case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM):
			// The kernel's ptrace access check denies it: a process with
			// capabilities we lack, or an LSM's denial. Failing would make
			// one such process (a supervisor, say) block every commit on
			// the host; skipping it is safe as long as some process of each
			// container is visible, because the freeze works on the
			// container's whole cgroup. Say so loudly, though.
			denied = append(denied, pid)
			continue
		default:
			return nil, fmt.Errorf("read the root of pid %d: %w", pid, err)
		}
		if match(unix.Mkdev(stx.Dev_major, stx.Dev_minor), stx.Ino) {
			pids = append(pids, pid)
		}
	}
	if len(denied) > 0 {
		log.G(ctx).WithField("pids", denied).Warn("not allowed to read the root directory of these processes; they are not considered (is CAP_SYS_PTRACE missing, or an LSM denying it?)")
	}
	slices.Sort(pids)
	log.G(ctx).WithField("pids", pids).Trace("processes with their root in the snapshot")
	return pids, nil
}
