//go:build linux

package capture

import (
	"bytes"
	"errors"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A tracker learns from inotify which entries of the source changed since
// the previous round, so that a round can visit only those (and the
// directories leading to them) instead of stat'ing every entry.
//
// Why it is sound: every source directory is watched before the round that
// first lists it does, so any change made after that listing reaches the
// queue, synchronously, before the changing system call returns. Writes
// through the overlay are reported on the upper inodes, and so are
// overlay's own changes (copy-up, whiteouts, opaque directories). What
// inotify does not see is handled elsewhere or makes rounds walk
// everything:
//   - stores through a shared writable mapping: the caller passes such
//     files to Final, which always re-copies them;
//   - a lost event (queue overflow, a watch that could not be added, a
//     read error): the next round walks everything;
//   - a new hard link does not tell the directories of the inode's other
//     names: while the tree holds a hard-linked file (overlay's shared
//     whiteouts aside), rounds walk everything.
type tracker struct {
	fd     int
	wakeR  int // the reader's stop pipe
	wakeW  int
	closed chan struct{} // closed when the reader returned

	mu        sync.Mutex
	pending   map[int32]*wdChanges // by watch descriptor, since the last take
	names     int                  // names in pending
	lost      bool                 // an event may be missing from pending
	unwatched bool                 // a directory could not be watched
	buf       []byte

	// watches maps watch descriptors to directories. Workers of a round
	// add to it; take (between rounds) reads and prunes it.
	wmu     sync.Mutex
	watches map[int32]*dirNode
	// limit bounds the watches of one tracker, which count against the
	// host-wide fs.inotify.max_user_watches of the daemon's user: a huge
	// tree must not starve other users of inotify. Past it, rounds walk
	// everything.
	limit     int
	exhausted bool
}

// wdChanges is what happened in one watched directory.
type wdChanges struct {
	names   map[string]struct{}
	ignored bool // the watch is gone (the directory was removed)
}

// watchMask: every change of a directory entry, its data, its metadata or
// the directory itself. IN_EXCL_UNLINK: a file written after it was
// unlinked is not in the tree any more.
const watchMask = unix.IN_MODIFY | unix.IN_ATTRIB | unix.IN_CREATE | unix.IN_DELETE |
	unix.IN_MOVED_FROM | unix.IN_MOVED_TO | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF |
	unix.IN_ONLYDIR | unix.IN_EXCL_UNLINK

// errNeedFull stops a round that visits only changes when it meets what
// only a walk of everything handles (a hard-linked file).
var errNeedFull = errors.New("capture: a walk of every entry is needed")

func newTracker() (*tracker, error) {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil, err
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		unix.Close(fd)
		return nil, err
	}
	t := &tracker{
		fd: fd, wakeR: p[0], wakeW: p[1],
		closed:  make(chan struct{}),
		pending: make(map[int32]*wdChanges),
		buf:     make([]byte, 64<<10),
		watches: make(map[int32]*dirNode),
		limit:   WatchLimit(),
	}
	go t.read()
	return t, nil
}

// read moves events from the kernel's queue, which holds 16384 by default,
// to pending while rounds run, so that a busy writer does not overflow it.
func (t *tracker) read() {
	defer close(t.closed)
	fds := []unix.PollFd{{Fd: int32(t.fd), Events: unix.POLLIN}, {Fd: int32(t.wakeR), Events: unix.POLLIN}}
	for {
		if _, err := unix.Poll(fds, -1); err != nil && err != unix.EINTR {
			t.mu.Lock()
			t.lost = true
			t.mu.Unlock()
			return
		}
		if fds[1].Revents != 0 {
			return
		}
		t.mu.Lock()
		t.drain()
		t.mu.Unlock()
	}
}

// drain reads every queued event into pending. t.mu is held.
func (t *tracker) drain() {
	for {
		n, err := unix.Read(t.fd, t.buf)
		if err == unix.EINTR {
			continue
		}
		if err == unix.EAGAIN {
			return
		}
		if err != nil || n <= 0 {
			t.lost = true
			return
		}
		t.parse(t.buf[:n])
	}
}

func (t *tracker) parse(b []byte) {
	for len(b) >= unix.SizeofInotifyEvent {
		ev := (*unix.InotifyEvent)(unsafe.Pointer(&b[0]))
		end := unix.SizeofInotifyEvent + int(ev.Len)
		if end > len(b) {
			t.lost = true
			return
		}
		name := b[unix.SizeofInotifyEvent:end]
		if i := bytes.IndexByte(name, 0); i >= 0 {
			name = name[:i]
		}
		b = b[end:]
		if ev.Mask&unix.IN_Q_OVERFLOW != 0 {
			t.lost = true
			continue
		}
		ch := t.pending[ev.Wd]
		if ch == nil {
			ch = &wdChanges{}
			t.pending[ev.Wd] = ch
		}
		if ev.Mask&unix.IN_IGNORED != 0 {
			ch.ignored = true
		}
		// Events without a name are about the directory itself; its
		// parent's watch reports them too, with its name.
		if len(name) > 0 {
			if ch.names == nil {
				ch.names = make(map[string]struct{})
			}
			if _, ok := ch.names[string(name)]; !ok {
				ch.names[string(name)] = struct{}{}
				t.names++
			}
		}
		if t.names > maxPendingNames {
			// Visiting this many names costs as much as a walk of
			// everything: forget them and walk.
			t.pending, t.names, t.lost = make(map[int32]*wdChanges), 0, true
		}
	}
}

// maxPendingNames bounds the memory a tracker's pending changes take
// (about 100 bytes a name) while a container churns through files
// between two commits.
const maxPendingNames = 256 << 10

// watch starts watching the source directory open as fd, which node
// describes. A directory already watched (moved, or listed again) keeps its
// watch, now for node.
func (t *tracker) watch(fd int, node *dirNode) error {
	t.wmu.Lock()
	defer t.wmu.Unlock()
	if t.exhausted || len(t.watches) >= t.limit {
		t.exhausted = true
		t.setUnwatched()
		return unix.ENOSPC
	}
	// The magic link resolves to the directory that is open, whatever
	// its path has become: no name in the source is looked up.
	wd, err := unix.InotifyAddWatch(t.fd, procPath(fd), watchMask)
	if err != nil {
		t.exhausted = err == unix.ENOSPC
		t.setUnwatched()
		return err
	}
	t.watches[int32(wd)] = node
	node.wd = int32(wd)
	return nil
}

// rebind points the watches at the nodes that replace the ones they were
// added for (Copier.Seed); a watch whose node has no replacement is
// dropped.
func (t *tracker) rebind(nodes map[*dirNode]*dirNode) {
	t.wmu.Lock()
	defer t.wmu.Unlock()
	for wd, node := range t.watches {
		if n := nodes[node]; n != nil {
			t.watches[wd] = n
		} else {
			delete(t.watches, wd)
		}
	}
}

func (t *tracker) setUnwatched() {
	t.mu.Lock()
	t.unwatched = true
	t.mu.Unlock()
}

// watching is the number of directories watched.
func (t *tracker) watching() int {
	t.wmu.Lock()
	defer t.wmu.Unlock()
	return len(t.watches)
}

// WatchLimit is a quarter of fs.inotify.max_user_watches: a few commits at
// once leave the rest of the host its share.
func WatchLimit() int {
	const fallback = 8192 // the kernel's smallest default
	data, err := os.ReadFile("/proc/sys/fs/inotify/max_user_watches")
	if err != nil {
		return fallback
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil || n <= 0 {
		return fallback
	}
	return max(n/4, 1)
}

// changes is what a round visits: for each directory, the names of the
// entries to look at again (a subdirectory's name when something below it
// changed).
type changes map[*dirNode][]string

// take returns what changed since the previous take, and whether that is
// complete (no event can have been lost). It runs between rounds.
func (t *tracker) take() (changes, bool) {
	t.mu.Lock()
	t.drain()
	t.mu.Unlock()
	return t.takePending()
}

// takePending is take without reading the kernel's queue first.
func (t *tracker) takePending() (changes, bool) {
	t.mu.Lock()
	pending, complete := t.pending, !t.lost && !t.unwatched
	t.pending, t.names, t.lost, t.unwatched = make(map[int32]*wdChanges), 0, false, false
	t.mu.Unlock()
	t.wmu.Lock()
	defer t.wmu.Unlock()

	sets := make(map[*dirNode]map[string]struct{})
	add := func(n *dirNode, name string) bool {
		s := sets[n]
		if s == nil {
			s = make(map[string]struct{})
			sets[n] = s
		}
		_, had := s[name]
		s[name] = struct{}{}
		return !had
	}
	for wd, ch := range pending {
		node := t.watches[wd]
		if node == nil {
			continue // a directory no longer in the tree
		}
		if ch.ignored {
			delete(t.watches, wd)
			if node.wd == wd {
				node.wd = 0 // listed in full when next visited
			}
		}
		for name := range ch.names {
			add(node, name)
		}
		// Visit the directories on the way down to it; its parent's
		// entry for it also changes (mtime).
		for n := node; n.parent != nil && add(n.parent, n.name); n = n.parent {
		}
	}
	out := make(changes, len(sets))
	for n, s := range sets {
		names := make([]string, 0, len(s))
		for name := range s {
			names = append(names, name)
		}
		slices.Sort(names)
		out[n] = names
	}
	return out, complete
}

// quiet reports whether nothing changed in the watched directories since
// the last take.
func (t *tracker) quiet() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.drain()
	return !t.lost && len(t.pending) == 0
}

func (t *tracker) close() error {
	unix.Write(t.wakeW, []byte{0})
	<-t.closed
	unix.Close(t.wakeR)
	unix.Close(t.wakeW)
	return unix.Close(t.fd)
}
