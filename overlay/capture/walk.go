//go:build linux

package capture

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// round is one worker's state in a PreCopy or Final walk.
type round struct {
	c     *Copier
	ctx   context.Context
	done  <-chan struct{}
	final bool
	idx   uint16
	sh    *shared
	stats Stats // this worker's; a parent adds its spawned workers' at the join
	// tracked: visit only the entries in plan (and new directories),
	// not every entry.
	tracked bool
	plan    changes

	dirents []byte // getdents buffer
	xnames  []byte // source xattr names
	dnames  []byte // destination xattr names
	xvalue  []byte // one xattr value
	target  []byte // readlink buffer
	data    []byte // read/write buffer, when copy_file_range cannot be used
}

// shared is what the workers of one round share.
type shared struct {
	mu    sync.Mutex
	links map[devIno]*linkGroup // hard-link groups met so far in this round
	slots chan struct{}         // idle workers; nil when walking sequentially
	stop  chan struct{}         // closed on the first error
	once  sync.Once
	err   error // the first error
	// linked: an entry other than a directory or a whiteout has more
	// than one link, so the next round must walk everything.
	linked atomic.Bool
	bg     background // how workers run (Options.PreCopyNice, PreCopyCgroup)
}

type devIno struct{ dev, ino uint64 }

// linkGroup is the first destination name given to a source inode with
// more than one link in this round; later names of the inode are linked to
// it. The worker that claimed the group copies the first name, then
// closes ready; others wait for that.
type linkGroup struct {
	ready  chan struct{}
	failed bool // the first name could not be copied: the next one takes over
	dir    *dirNode
	name   string
	dstIno uint64
}

// pending is a subdirectory handed to another worker.
type pending struct {
	slot  int // its index in the parent's new entries
	done  chan struct{}
	e     entry
	keep  bool
	ch    bool
	err   error
	stats Stats
}

// errRaced marks a source entry that vanished or changed type or identity
// between being listed, stat'ed and opened.
var errRaced = errors.New("source entry changed while being copied")

// errDirGone: the directory was removed while it was being read.
var errDirGone = errors.New("directory removed while being read")

// errHalted: another worker failed, so this one stopped.
var errHalted = errors.New("stopped after an error elsewhere in the walk")

// raceErr tells the errors a concurrent rename, removal or swap for a
// symlink produces on the source side from real errors.
func raceErr(err error) error {
	switch err {
	case unix.ENOENT, unix.ELOOP, unix.ENOTDIR:
		return fmt.Errorf("%w (%v)", errRaced, err)
	}
	return err
}

const (
	dirFlags  = unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC
	pathFlags = unix.O_PATH | unix.O_NOFOLLOW | unix.O_CLOEXEC
)

// openSrcDir opens a source directory without following a symlink and,
// where permitted, without updating its atime.
func (r *round) openSrcDir(dirfd int, name string) (int, error) {
	if r.c.raceHook != nil {
		r.c.raceHook(dirfd, name)
	}
	fd, err := unix.Openat(dirfd, name, dirFlags|unix.O_NOATIME, 0)
	if err == unix.EPERM {
		fd, err = unix.Openat(dirfd, name, dirFlags, 0)
	}
	return fd, err
}

func procPath(fd int) string { return "/proc/self/fd/" + strconv.Itoa(fd) }

// entryPath names the entry name in the directory open as dirfd for the
// l*xattr calls, which have no *at variant: the magic link resolves to that
// very directory, and the last component is not followed.
func entryPath(dirfd int, name string) string { return procPath(dirfd) + "/" + name }

func (r *round) aborted() error {
	select {
	case <-r.done:
		return r.ctx.Err()
	case <-r.sh.stop:
		return errHalted
	default:
		return nil
	}
}

// halt records the round's first error and stops every worker.
func (r *round) halt(err error) {
	if err != nil {
		r.sh.once.Do(func() {
			r.sh.err = err
			close(r.sh.stop)
		})
	}
}

// fork makes the state of a new worker.
func (r *round) fork() *round {
	return &round{c: r.c, ctx: r.ctx, done: r.done, final: r.final, idx: r.idx, sh: r.sh, tracked: r.tracked, plan: r.plan}
}

// spawn runs job on another worker, if one is idle.
func (r *round) spawn(job func(w *round) (entry, bool, bool, error)) *pending {
	if r.sh.slots == nil {
		return nil
	}
	select {
	case r.sh.slots <- struct{}{}:
	default:
		return nil
	}
	p := &pending{done: make(chan struct{})}
	w := r.fork()
	go func() {
		defer func() { <-r.sh.slots }()
		r.sh.bg.run(func() { p.e, p.keep, p.ch, p.err = job(w) })
		p.stats = w.stats
		close(p.done)
	}()
	return p
}

// join waits for the subdirectories handed to other workers and puts their
// entries in their slots.
func (r *round) join(entries []entry, pends []*pending, changed bool, err error) ([]entry, bool, error) {
	gone := false
	for _, p := range pends {
		<-p.done
		r.stats.add(p.stats)
		changed = changed || p.ch
		if p.err != nil {
			r.halt(p.err)
			if err == nil {
				err = p.err
			}
		}
		if p.keep {
			entries[p.slot] = p.e
		} else {
			entries[p.slot] = entry{}
			gone = true
		}
	}
	if gone {
		entries = slices.DeleteFunc(entries, func(e entry) bool { return e.name == "" })
	}
	return entries, changed, err
}

func (r *round) count(racy bool) {
	r.stats.Dirty++
	if racy {
		r.stats.Racy++
	}
}

// relPath is the path of name below the source root, for messages.
func relPath(parent *dirNode, name string) string {
	parts := []string{name}
	for p := parent; p != nil && p.parent != nil; p = p.parent {
		parts = append(parts, p.name)
	}
	slices.Reverse(parts)
	return strings.Join(parts, "/")
}

func pathErr(op string, parent *dirNode, name string, err error) error {
	return &os.PathError{Op: op, Path: relPath(parent, name), Err: err}
}

// raced is what an entry that changed under the walk costs: nothing in a
// pre-copy round (the next round sees the new state), an error wrapping
// ErrSourceChanged in the final round.
func (r *round) raced(parent *dirNode, name string, cause error) error {
	if !r.final {
		return nil
	}
	return fmt.Errorf("%w: %s: %v", ErrSourceChanged, relPath(parent, name), cause)
}

func (r *round) walkRoot(force *forceNode) error {
	c := r.c
	sfd, err := r.openSrcDir(unix.AT_FDCWD, c.src)
	if err != nil {
		return &os.PathError{Op: "open", Path: c.src, Err: err}
	}
	defer unix.Close(sfd)
	var st unix.Stat_t
	if err := unix.Fstat(sfd, &st); err != nil {
		return &os.PathError{Op: "fstat", Path: c.src, Err: err}
	}
	dfd, err := unix.Open(c.dst, dirFlags, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: c.dst, Err: err}
	}
	defer unix.Close(dfd)

	r.stats.Entries++
	e := &c.root
	dirty, racy := c.isDirty(e, &st)
	changed, err := r.dirContents(sfd, dfd, e.dir, force)
	if err == errDirGone {
		err = fmt.Errorf("source root %s removed", c.src)
	}
	if err == nil {
		if dirty {
			r.count(racy)
			if err = r.setMeta(dfd, unix.AT_FDCWD, c.dst, &st, fdRef(sfd), true); err == nil {
				node := e.dir
				*e = newEntry("", &st, r.idx)
				e.dir = node
			}
		} else if changed {
			err = setTimes(unix.AT_FDCWD, c.dst, &st)
		}
	}
	if err != nil {
		e.ctime = invalidTime // re-apply the root's metadata next round
	}
	return err
}

// dirContents brings the destination directory dfd in line with the source
// directory sfd and updates node. It returns whether it created or removed
// destination entries (which changes the directory's mtime). Whatever
// happens, node afterwards describes the destination exactly.
func (r *round) dirContents(sfd, dfd int, node *dirNode, force *forceNode) (changed bool, err error) {
	if t := r.c.tracker; t != nil {
		if r.tracked && node.wd != 0 {
			return r.dirChanges(sfd, dfd, node, force, withForced(r.plan[node], force))
		}
		// Watch before listing: what changes after the listing is
		// reported. Without a watch, the next round walks everything.
		if node.wd == 0 {
			t.watch(sfd, node)
		}
	}
	names, err := r.readNames(sfd)
	if err != nil {
		if err == unix.ENOENT {
			return false, errDirGone
		}
		return false, fmt.Errorf("readdir %s: %w", relPath(node.parent, node.name), err)
	}
	old := node.entries

	var pends []*pending
	if sameNames(old, names) { // the usual case: update in place, no sort
		w := 0
		for i := range old {
			if err == nil {
				err = r.aborted()
			}
			if err != nil {
				old[w] = old[i]
				w++
				continue
			}
			ne, keep, ch, cerr, p := r.child(sfd, dfd, node, names[i], &old[i], force, true)
			changed = changed || ch
			err = cerr
			r.halt(err)
			switch {
			case p != nil: // placeholder, filled in by join
				old[w] = entry{name: names[i]}
				p.slot = w
				pends = append(pends, p)
				w++
			case keep:
				old[w] = ne
				w++
			}
		}
		entries, ch, jerr := r.join(old[:w], pends, changed, err)
		clear(old[len(entries):])
		node.entries = entries
		return ch, jerr
	}

	// Match the listing against the old entries by name.
	slices.SortFunc(old, func(a, b entry) int { return strings.Compare(a.name, b.name) })
	match := make([]int32, len(names)) // index into old, -1 new, -2 duplicate
	used := make([]bool, len(old))
	var fresh []string
	for i, n := range names {
		j, ok := slices.BinarySearchFunc(old, n, func(e entry, n string) int { return strings.Compare(e.name, n) })
		switch {
		case !ok:
			match[i] = -1
			fresh = append(fresh, n)
		case used[j]:
			match[i] = -2
		default:
			match[i] = int32(j)
			used[j] = true
		}
	}
	// A directory changing under getdents may list a name twice.
	var dup map[string]bool
	if len(fresh) > 1 {
		slices.Sort(fresh)
		for i := 1; i < len(fresh); i++ {
			if fresh[i] == fresh[i-1] {
				if dup == nil {
					dup = make(map[string]bool)
				}
				dup[fresh[i]] = false
			}
		}
	}

	next := make([]entry, 0, len(names))
	for j := range old { // removals first, so a name can be reused
		if used[j] {
			continue
		}
		if err == nil {
			err = r.aborted()
		}
		if err == nil {
			err = r.remove(dfd, &old[j])
			r.halt(err)
		}
		if err != nil {
			next = append(next, old[j])
			continue
		}
		changed = true
	}
	for i, n := range names {
		var o *entry
		switch m := match[i]; {
		case m == -2:
			continue
		case m >= 0:
			o = &old[m]
		case dup != nil:
			if seen, ok := dup[n]; ok {
				if seen {
					continue
				}
				dup[n] = true
			}
		}
		if err == nil {
			err = r.aborted()
		}
		if err != nil {
			if o != nil {
				next = append(next, *o)
			}
			continue
		}
		ne, keep, ch, cerr, p := r.child(sfd, dfd, node, n, o, force, true)
		changed = changed || ch
		err = cerr
		r.halt(err)
		switch {
		case p != nil:
			p.slot = len(next)
			pends = append(pends, p)
			next = append(next, entry{name: n})
		case keep:
			next = append(next, ne)
		}
	}
	next, changed, err = r.join(next, pends, changed, err)
	node.entries = next
	return changed, err
}

// dirChanges is dirContents for a tracked round: it looks again only at
// the entries named (sorted, without duplicates), whether or not they
// still exist, and keeps what it knows of the others.
func (r *round) dirChanges(sfd, dfd int, node *dirNode, force *forceNode, names []string) (changed bool, err error) {
	entries := node.entries
	var index map[string]int
	if len(names) > 8 {
		index = make(map[string]int, len(entries))
		for i := range entries {
			index[entries[i].name] = i
		}
	}
	find := func(name string) int {
		if index != nil {
			if i, ok := index[name]; ok {
				return i
			}
			return -1
		}
		return slices.IndexFunc(entries, func(e entry) bool { return e.name == name })
	}
	place := func(i int, e entry) int {
		if i >= 0 {
			entries[i] = e
			return i
		}
		entries = append(entries, e)
		if index != nil {
			index[e.name] = len(entries) - 1
		}
		return len(entries) - 1
	}

	var pends []*pending
	gone := false
	for _, n := range names {
		if err = r.aborted(); err != nil {
			break
		}
		i := find(n)
		var old *entry
		if i >= 0 {
			old = &entries[i]
		}
		ne, keep, ch, cerr, p := r.child(sfd, dfd, node, n, old, force, false)
		changed = changed || ch
		err = cerr
		r.halt(err)
		switch {
		case p != nil: // placeholder, filled in by join
			p.slot = place(i, entry{name: n})
			pends = append(pends, p)
		case keep:
			place(i, ne)
		case i >= 0:
			entries[i] = entry{}
			gone = true
		}
		if err != nil {
			break
		}
	}
	entries, changed, err = r.join(entries, pends, changed, err)
	if gone {
		entries = slices.DeleteFunc(entries, func(e entry) bool { return e.name == "" })
	}
	node.entries = entries
	return changed, err
}

// withForced adds to names (sorted) the children of force: files to
// re-copy, directories on the way to them.
func withForced(names []string, force *forceNode) []string {
	if force == nil || len(force.kids) == 0 {
		return names
	}
	out := slices.Clone(names)
	for k := range force.kids {
		if _, found := slices.BinarySearch(names, k); !found {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}

func sameNames(old []entry, names []string) bool {
	if len(old) != len(names) {
		return false
	}
	for i := range old {
		if old[i].name != names[i] {
			return false
		}
	}
	return true
}

// readNames lists a directory with getdents, without "." and "..".
func (r *round) readNames(fd int) ([]string, error) {
	if r.dirents == nil {
		r.dirents = make([]byte, 64<<10)
	}
	var names []string
	for {
		n, err := unix.ReadDirent(fd, r.dirents)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, err
		}
		if n <= 0 {
			return names, nil
		}
		_, _, names = unix.ParseDirent(r.dirents[:n], -1, names)
	}
}

// child brings the destination entry name in line with the source entry
// name, given what was copied of it before (old, nil if nothing). It
// returns the entry to remember and whether to remember it at all, and
// whether the destination directory's entries changed. Even with an error,
// the returned entry describes the destination. A subdirectory may be
// handed to another worker: then the result comes later, through p.
// listed: name comes from listing the directory, so its absence means it
// was removed under the walk (for a tracked round, it is only a name that
// changed, and may be gone).
func (r *round) child(sfd, dfd int, parent *dirNode, name string, old *entry, force *forceNode, listed bool) (ne entry, keep, changed bool, err error, p *pending) {
	var st unix.Stat_t
	if err := unix.Fstatat(sfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if err == unix.ENOENT {
			if old != nil {
				if rerr := r.remove(dfd, old); rerr != nil {
					return invalid(*old), true, false, pathErr("remove", parent, name, rerr), nil
				}
				changed = true
			}
			if !listed {
				return entry{}, false, changed, nil, nil
			}
			return entry{}, false, changed, r.raced(parent, name, err), nil
		}
		if old == nil {
			return entry{}, false, false, pathErr("lstat", parent, name, err), nil
		}
		return *old, true, false, pathErr("lstat", parent, name, err), nil
	}
	r.stats.Entries++
	typ := st.Mode & unix.S_IFMT
	fnode := force.child(name)
	// A new link to a file does not tell the directories of its other
	// names: with hard links in the tree, only a walk of everything is
	// sure to see them all. Overlay's whiteouts share one inode, but
	// their links carry no data.
	whiteout := typ == unix.S_IFCHR && st.Rdev == 0
	if st.Nlink > 1 && typ != unix.S_IFDIR && !whiteout {
		if r.tracked {
			if old == nil {
				return entry{}, false, false, errNeedFull, nil
			}
			return *old, true, false, errNeedFull, nil
		}
		r.sh.linked.Store(true)
	}

	// Another type or another inode: replace, not update.
	if old != nil && (old.typ() != typ || old.ino != st.Ino) {
		if err := r.remove(dfd, old); err != nil {
			return invalid(*old), true, false, pathErr("remove", parent, name, err), nil
		}
		old, changed = nil, true
	}
	if typ == unix.S_IFDIR {
		ne, keep, ch, err, p := r.subdir(sfd, dfd, parent, name, &st, old, fnode)
		return ne, keep, changed || ch, err, p
	}

	dirty, racy := true, false
	if old != nil {
		dirty, racy = r.c.isDirty(old, &st)
		// The names of a hard-linked file get an inode of their own
		// before anything writes to it.
		dirty = dirty || old.seeded() && st.Nlink > 1 && !whiteout
	}
	forced := fnode != nil && fnode.self && typ == unix.S_IFREG
	if st.Nlink > 1 && !(r.tracked && whiteout) {
		g, first := r.claim(devIno{st.Dev, st.Ino})
		if !first {
			ne, keep, ch, err := r.member(sfd, dfd, parent, name, &st, old, g, dirty, racy, forced)
			return ne, keep, changed || ch, err, nil
		}
		// This name is the group's first: copy it, then let the others link to it.
		defer func() { r.settle(g, dfd, parent, name, keep) }()
	}
	if !dirty && !forced {
		return *old, true, changed, nil, nil
	}
	r.count(racy)
	existed := old != nil
	if existed && old.seeded() {
		// A link into the previous copy: replaced, so that it is not
		// changed too.
		if err := unix.Unlinkat(dfd, name, 0); err != nil && err != unix.ENOENT {
			return *old, true, changed, pathErr("replace", parent, name, err), nil
		}
		existed, changed = false, true
	}
	if err := r.copyEntry(sfd, dfd, name, &st, existed); err != nil {
		ne, keep, ch, err := r.failed(dfd, parent, name, &st, existed, err)
		return ne, keep, changed || ch, err, nil
	}
	return newEntry(name, &st, r.idx), true, changed || !existed, nil, nil
}

// claim returns the hard-link group of a source inode in this round, and
// whether the caller is its first name (and must settle it). Other names
// wait until the first one is copied.
func (r *round) claim(key devIno) (g *linkGroup, first bool) {
	for {
		r.sh.mu.Lock()
		g = r.sh.links[key]
		if g == nil || g.failed {
			g = &linkGroup{ready: make(chan struct{})}
			r.sh.links[key] = g
			r.sh.mu.Unlock()
			return g, true
		}
		r.sh.mu.Unlock()
		<-g.ready
		if !g.failed {
			return g, false
		}
	}
}

// settle publishes where the first name of a hard-link group is in the
// destination (or that it is not there), and wakes the other names.
func (r *round) settle(g *linkGroup, dfd int, parent *dirNode, name string, ok bool) {
	var ds unix.Stat_t
	if ok && unix.Fstatat(dfd, name, &ds, unix.AT_SYMLINK_NOFOLLOW) == nil {
		g.dir, g.name, g.dstIno = parent, name, ds.Ino
	} else {
		r.sh.mu.Lock()
		g.failed = true
		r.sh.mu.Unlock()
	}
	close(g.ready)
}

// invalid marks an entry to be copied again in the next round. (Without
// an error, the entry changed under the round: a tracked round hears of it
// and visits it.)
func invalid(e entry) entry {
	e.ctime = invalidTime
	return e
}

// failed leaves destination and state consistent after copying name
// failed: a destination entry that existed before is kept but marked for
// re-copy, a new one is removed again.
func (r *round) failed(dfd int, parent *dirNode, name string, st *unix.Stat_t, existed bool, err error) (entry, bool, bool, error) {
	if errors.Is(err, errRaced) {
		err = r.raced(parent, name, err)
	} else {
		err = pathErr("copy", parent, name, err)
	}
	if existed {
		return invalid(newEntry(name, st, r.idx)), true, false, err
	}
	if rerr := unix.Unlinkat(dfd, name, 0); rerr != nil && rerr != unix.ENOENT && err == nil {
		err = pathErr("remove", parent, name, rerr)
	}
	return entry{}, false, true, err
}

// member makes name a hard link to the destination inode of the first name
// of its source inode met in this round.
func (r *round) member(sfd, dfd int, parent *dirNode, name string, st *unix.Stat_t, old *entry, g *linkGroup, dirty, racy, forced bool) (entry, bool, bool, error) {
	linked := false
	if old != nil {
		var ds unix.Stat_t
		linked = unix.Fstatat(dfd, name, &ds, unix.AT_SYMLINK_NOFOLLOW) == nil && ds.Ino == g.dstIno
	}
	if linked && !dirty && !forced {
		return *old, true, false, nil
	}
	r.count(racy)
	changed := false
	if !linked {
		if old != nil {
			if err := unix.Unlinkat(dfd, name, 0); err != nil && err != unix.ENOENT {
				return invalid(*old), true, false, pathErr("remove", parent, name, err)
			}
			changed = true
		}
		err := r.link(g, dfd, parent, name)
		if err == unix.EMLINK { // the destination allows fewer links: copy instead
			if err := r.copyEntry(sfd, dfd, name, st, false); err != nil {
				ne, keep, _, err := r.failed(dfd, parent, name, st, false, err)
				return ne, keep, true, err
			}
			return newEntry(name, st, r.idx), true, true, nil
		}
		if err != nil {
			ne, keep, _, err := r.failed(dfd, parent, name, st, false, err)
			return ne, keep, true, err
		}
		r.stats.Linked++
		changed = true
	}
	if forced {
		if err := r.copyFile(sfd, dfd, name, st, true); err != nil {
			ne, keep, _, err := r.failed(dfd, parent, name, st, true, err)
			return ne, keep, changed, err
		}
	}
	return newEntry(name, st, r.idx), true, changed, nil
}

// link creates name in dfd as a hard link to the group's destination.
func (r *round) link(g *linkGroup, dfd int, parent *dirNode, name string) error {
	odfd := dfd
	if g.dir != parent {
		fd, err := r.openDstDir(g.dir)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		odfd = fd
	}
	return r.create(dfd, name, func() error { return unix.Linkat(odfd, g.name, dfd, name, 0) })
}

// openDstDir opens (O_PATH) the destination directory of n by walking down
// from the destination root, one component at a time: paths may exceed
// PATH_MAX.
func (r *round) openDstDir(n *dirNode) (int, error) {
	var comps []string
	for p := n; p.parent != nil; p = p.parent {
		comps = append(comps, p.name)
	}
	fd, err := unix.Open(r.c.dst, pathFlags|unix.O_DIRECTORY, 0)
	if err != nil {
		return -1, err
	}
	for i := len(comps) - 1; i >= 0; i-- {
		nfd, err := unix.Openat(fd, comps[i], pathFlags|unix.O_DIRECTORY, 0)
		unix.Close(fd)
		if err != nil {
			return -1, err
		}
		fd = nfd
	}
	return fd, nil
}

// subdir brings a destination directory in line with a source directory.
// Its owner, mode, xattrs and times are set after its children, which
// change its mtime. Its contents may be handed to another worker (p).
func (r *round) subdir(sfd, dfd int, parent *dirNode, name string, st *unix.Stat_t, old *entry, force *forceNode) (_ entry, _, changed bool, _ error, _ *pending) {
	cfd, err := r.openSrcDir(sfd, name)
	if err == nil {
		var cst unix.Stat_t
		if err = unix.Fstat(cfd, &cst); err == nil && (cst.Ino != st.Ino || cst.Mode&unix.S_IFMT != unix.S_IFDIR) {
			err = errRaced
		}
		if err != nil {
			unix.Close(cfd)
		} else {
			*st = cst
		}
	}
	if err != nil {
		if err = raceErr(err); errors.Is(err, errRaced) {
			err = r.raced(parent, name, err)
		} else {
			err = pathErr("open", parent, name, err)
		}
		if old == nil {
			return entry{}, false, false, err, nil
		}
		return invalid(*old), true, false, err, nil
	}

	dirty, racy := true, false
	var node *dirNode
	var prev entry // what was copied before, if anything
	if old != nil {
		dirty, racy = r.c.isDirty(old, st)
		node, prev = old.dir, *old
	} else {
		if err := r.create(dfd, name, func() error { return unix.Mkdirat(dfd, name, 0o700) }); err != nil {
			unix.Close(cfd)
			return entry{}, false, false, pathErr("mkdir", parent, name, err), nil
		}
		node = &dirNode{parent: parent, name: name}
		changed = true
	}
	fresh := newEntry(name, st, r.idx)
	fresh.dir = node
	cdfd, err := unix.Openat(dfd, name, dirFlags, 0)
	if err != nil {
		unix.Close(cfd)
		return invalid(fresh), true, changed, pathErr("open destination", parent, name, err), nil
	}

	// The job may run on another worker: it uses only copies, not this
	// function's results.
	created, stat := changed, *st
	job := func(w *round) (entry, bool, bool, error) {
		defer unix.Close(cfd)
		defer unix.Close(cdfd)
		ch, err := w.dirContents(cfd, cdfd, node, force)
		if err == errDirGone {
			return invalid(fresh), true, created, w.raced(parent, name, err)
		}
		if err != nil {
			return invalid(fresh), true, created, err
		}
		if dirty {
			w.count(racy)
			if err := w.setMeta(cdfd, dfd, name, &stat, fdRef(cfd), !created); err != nil {
				return invalid(fresh), true, created, pathErr("set metadata", parent, name, err)
			}
			return fresh, true, created, nil
		}
		if ch {
			if err := setTimes(dfd, name, &stat); err != nil {
				return invalid(fresh), true, created, pathErr("utimes", parent, name, err)
			}
		}
		return prev, true, created, nil
	}
	// dfd stays open until the parent joins its spawned workers.
	if p := r.spawn(job); p != nil {
		return entry{}, false, false, nil, p
	}
	e, keep, ch, err := job(r)
	return e, keep, ch, err, nil
}

// create runs fn, which creates name in dfd; if name exists (the
// destination has an entry the state does not know of, left by an earlier
// failure), it removes it and runs fn again.
func (r *round) create(dfd int, name string, fn func() error) error {
	err := fn()
	if err == unix.EEXIST {
		if err = os.RemoveAll(entryPath(dfd, name)); err == nil {
			err = fn()
		}
	}
	return err
}

// remove deletes the destination entry e, a whole tree for a directory.
func (r *round) remove(dfd int, e *entry) error {
	var err error
	if e.typ() != unix.S_IFDIR {
		err = unix.Unlinkat(dfd, e.name, 0)
		if err == unix.ENOENT {
			err = nil
		}
	}
	if e.typ() == unix.S_IFDIR || err == unix.EISDIR {
		// os.RemoveAll works down from the parent with openat/unlinkat,
		// so depth is no problem; the destination is ours alone.
		err = os.RemoveAll(entryPath(dfd, e.name))
	}
	if err == nil {
		r.stats.Removed += e.count()
	}
	return err
}
