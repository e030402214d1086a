//go:build linux

package freeze

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// deletedSuffix is what the kernel appends to the path of a file whose name
// was unlinked.
const deletedSuffix = " (deleted)"

// SharedWritableMappings returns, sorted and without duplicates, the paths
// of the regular files that the given processes have mapped shared and
// writable, as seen from each process's root directory (so "/var/lib/db/x"
// for a container, not a host path).
//
// Stores through such a mapping reach the file without a write(2), and the
// kernel does not update the file's ctime on every store, so a capture that
// selects changed files by time misses them: they must be recopied while the
// processes are frozen.
//
// Left out, because the capture of a snapshot cannot and need not copy them:
// anonymous and special mappings ("[...]", anon_inode:...), shared anonymous
// memory, memfd and SysV shared memory (all of which the kernel shows as
// deleted files with no link), devices, files deleted after they were mapped
// (no name in the snapshot holds their data), and files outside the
// process's root (opened before a chroot). Processes that exit meanwhile
// are ignored.
//
// The paths may lie on other mounts of the container (volumes, tmpfs);
// looking them up in the upperdir finds nothing there, which is harmless.
// The same holds for the one case where a path is not the container's: a
// file that a process in its own mount namespace mapped before it
// pivot_root'ed is shown with its host path (runc's init execs the
// container's program after pivot_root, which drops such mappings).
func SharedWritableMappings(ctx context.Context, pids []int) ([]string, error) {
	var out []string
	for _, pid := range slices.Compact(slices.Sorted(slices.Values(pids))) {
		got, err := sharedWritable(ctx, pid)
		if err != nil {
			if errdefs.IsNotFound(err) {
				log.G(ctx).WithField("pid", pid).Debug("process exited before its mappings were read; ignoring it")
				continue
			}
			return nil, err
		}
		out = append(out, got...)
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

func sharedWritable(ctx context.Context, pid int) ([]string, error) {
	proc := "/proc/" + strconv.Itoa(pid)
	// The kernel prints a mapped file's path relative to *our* root: for a
	// process that merely chrooted (in our mount namespace) that is a host
	// path under its root, which readlink of /proc/PID/root gives; for a
	// process in its own mount namespace after pivot_root (a runc
	// container) both are already relative to the container's root, and
	// the root reads as "/".
	root, err := os.Readlink(proc + "/root")
	if err != nil {
		return nil, fmt.Errorf("pid %d: %w", pid, notFound(err))
	}
	f, err := os.Open(proc + "/maps")
	if err != nil {
		return nil, fmt.Errorf("pid %d: %w", pid, notFound(err))
	}
	defer f.Close()

	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for sc.Scan() {
		m, ok := parseMapsLine(sc.Text())
		if !ok || !m.sharedWritable() || !strings.HasPrefix(m.path, "/") {
			continue
		}
		p, ok, err := m.resolve(ctx, proc, root)
		if err != nil {
			return nil, fmt.Errorf("pid %d: mapping %s of %q: %w", pid, m.addr, m.path, err)
		}
		if ok {
			out = append(out, p)
		}
	}
	if err := sc.Err(); err != nil {
		// Reading maps of a process that exits mid-read fails with ESRCH.
		return nil, fmt.Errorf("pid %d: read maps: %w", pid, notFound(err))
	}
	return out, nil
}

// mapping is a line of /proc/PID/maps.
type mapping struct {
	addr  string // "start-end", also the name under map_files
	perms string // "rw-s"
	dev   uint64
	ino   uint64
	path  string // unescaped; "" for anonymous memory
}

func (m mapping) sharedWritable() bool {
	return len(m.perms) == 4 && m.perms[1] == 'w' && m.perms[3] == 's'
}

// parseMapsLine parses "start-end perms offset major:minor inode   path".
// The path is everything after the inode and the padding, and may contain
// spaces; the kernel escapes only '\n' in it (as \012).
func parseMapsLine(line string) (mapping, bool) {
	var f [5]string
	rest := line
	for i := range f {
		rest = strings.TrimLeft(rest, " ")
		end := strings.IndexByte(rest, ' ')
		if end < 0 {
			if i < len(f)-1 {
				return mapping{}, false
			}
			end = len(rest)
		}
		f[i], rest = rest[:end], rest[end:]
	}
	majS, minS, ok := strings.Cut(f[3], ":")
	if !ok {
		return mapping{}, false
	}
	maj, err1 := strconv.ParseUint(majS, 16, 32)
	minor, err2 := strconv.ParseUint(minS, 16, 32)
	ino, err3 := strconv.ParseUint(f[4], 10, 64)
	if err1 != nil || err2 != nil || err3 != nil || f[0] == "" || f[1] == "" {
		return mapping{}, false
	}
	return mapping{
		addr:  f[0],
		perms: f[1],
		dev:   unix.Mkdev(uint32(maj), uint32(minor)),
		ino:   ino,
		path:  strings.ReplaceAll(strings.TrimLeft(rest, " "), `\012`, "\n"),
	}, true
}

// resolve returns the mapping's path relative to the process's root, and
// false if the mapping is to be left out (see SharedWritableMappings).
func (m mapping) resolve(ctx context.Context, proc, root string) (string, bool, error) {
	// map_files/<range> links to the mapped file itself, whatever its name
	// now: it tells the file's type and link count without resolving a
	// path that the container controls.
	var st unix.Stat_t
	if err := unix.Stat(proc+"/map_files/"+m.addr, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return "", false, nil // unmapped meanwhile
		}
		return "", false, notFound(err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return "", false, nil
	}
	if st.Nlink == 0 {
		// Unlinked (shared anonymous memory, memfd and SysV shm are
		// unlinked shmem files too): no name holds its data.
		log.G(ctx).WithField("path", m.path).Trace("skipping a shared writable mapping of a deleted file")
		return "", false, nil
	}

	p, ok := cutPathPrefix(m.path, root)
	if !ok {
		return "", false, nil
	}
	if !strings.HasSuffix(p, deletedSuffix) {
		return p, true, nil
	}
	// Either the file's name really ends in " (deleted)", or this name was
	// unlinked and another hard link keeps the file alive. Look the name up
	// inside the process's root (never following a symlink out of it) and
	// see whether it is still this file.
	same, err := sameFile(proc+"/root", p, m.dev, m.ino)
	if err != nil {
		return "", false, err
	}
	if same {
		return p, true, nil
	}
	trimmed := strings.TrimSuffix(p, deletedSuffix)
	log.G(ctx).WithField("path", trimmed).Warn("a shared writable mapping's name was unlinked but the file has other links; they are not recopied")
	return "", false, nil
}

// sameFile reports whether p, resolved inside root, is the file with device
// dev and inode ino.
func sameFile(root, p string, dev, ino uint64) (bool, error) {
	rfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, notFound(err)
	}
	defer unix.Close(rfd)
	fd, err := unix.Openat2(rfd, strings.TrimPrefix(p, "/"), &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_NOFOLLOW | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
	})
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) {
			return false, nil
		}
		return false, err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return false, err
	}
	return st.Dev == dev && st.Ino == ino, nil
}
