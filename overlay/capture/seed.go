//go:build linux

package capture

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// ErrCannotSeed: Seed cannot start from this Copier (see Seed).
var ErrCannotSeed = errors.New("capture: cannot seed a copy from this one")

// Seed starts a new copy of c's source in dst from the copy c made, now
// at prevDir (c's destination, moved there after c's last round), instead
// of from nothing: directories are made anew with prevDir's metadata and
// every other entry is a hard link to prevDir's. The new Copier knows what
// c knew, so its first round copies only what changed since c's last one.
// With opts.TrackChanges, if c tracks changes (it was not closed), the new
// Copier takes c's inotify watches over, and its first round visits only
// what they reported since c's last round; otherwise that round examines
// every entry. An entry it must change is replaced, never written in
// place, so prevDir is never modified, and entries that cannot be linked
// (gone from prevDir, or too many links) are simply copied by the first
// round.
//
// Seed fails with ErrCannotSeed if c's last round failed, or if c's
// source holds hard-linked files (overlay's whiteouts aside). c itself is
// left as it is, but for its watches; it must not run a round meanwhile.
func (c *Copier) Seed(prevDir, dst string, opts Options) (*Copier, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case len(c.rounds) == 0 || c.broken:
		return nil, fmt.Errorf("%w: its last round did not succeed", ErrCannotSeed)
	case c.linked:
		return nil, fmt.Errorf("%w: the source holds hard-linked files", ErrCannotSeed)
	}
	// c's tracker has watched the source since c's last round: it knows
	// what changed since, so n takes it over, and n's first round visits
	// only that instead of every entry.
	adopt := opts.TrackChanges && c.tracker != nil
	nopts := opts
	nopts.TrackChanges = opts.TrackChanges && !adopt
	n, err := NewCopier(c.src, dst, nopts)
	if err != nil {
		return nil, err
	}
	n.rounds = append([]int64(nil), c.rounds...)
	var nodes map[*dirNode]*dirNode
	if adopt {
		nodes = make(map[*dirNode]*dirNode)
	}
	n.root = cloneEntry(c.root, nil, nodes)
	s := &seeder{r: &round{c: n}}
	// Linking every entry takes a while (10 µs each on xfs), and the
	// container runs meanwhile: at the pre-copy's priority.
	n.bg.run(func() { err = s.seed(prevDir, n.dst, &n.root) })
	if err != nil {
		n.Close()
		os.RemoveAll(n.dst)
		return nil, fmt.Errorf("capture: seed %s from %s: %w", dst, prevDir, err)
	}
	n.seeded = s.linked
	if adopt {
		n.tracker, c.tracker = c.tracker, nil
		n.tracker.rebind(nodes)
		// Entries that could not be linked are missing from n's tree and
		// from its destination: only a walk of everything finds them.
		n.walkAll = s.dropped > 0
		c.walkAll = true
	}
	return n, nil
}

// Seeded is the number of entries Seed linked from the previous copy.
func (c *Copier) Seeded() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.seeded
}

// cloneEntry copies e and its subtree, for a new Copier.
func cloneEntry(e entry, parent *dirNode, nodes map[*dirNode]*dirNode) entry {
	if e.dir == nil {
		return e
	}
	node := &dirNode{parent: parent, name: e.name, entries: make([]entry, len(e.dir.entries))}
	if nodes != nil {
		// The clone takes the original's place, watch included.
		nodes[e.dir] = node
		node.wd = e.dir.wd
	}
	for i := range e.dir.entries {
		node.entries[i] = cloneEntry(e.dir.entries[i], node, nodes)
	}
	e.dir = node
	return e
}

type seeder struct {
	r       *round
	linked  int64
	dropped int64 // entries that could not be linked
}

// seed fills the destination directory dst from prev, the directory of
// the previous copy that root describes, and gives dst prev's metadata.
func (s *seeder) seed(prev, dst string, root *entry) error {
	pfd, err := unix.Open(prev, dirFlags, 0)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	dfd, err := unix.Open(dst, dirFlags, 0)
	if err != nil {
		return err
	}
	defer unix.Close(dfd)
	if err := s.dir(root.dir, pfd, dfd); err != nil {
		return err
	}
	return s.meta(pfd, dfd, unix.AT_FDCWD, dst)
}

// dir links the entries of node from pfd into dfd, making subdirectories
// anew. Entries that cannot be linked are dropped from node: the first
// round sees them as new.
func (s *seeder) dir(node *dirNode, pfd, dfd int) error {
	keep := node.entries[:0]
	for _, e := range node.entries {
		if e.dir == nil {
			err := unix.Linkat(pfd, e.name, dfd, e.name, 0)
			switch err {
			case nil:
				e.nlink |= seededBit
				s.linked++
				keep = append(keep, e)
			case unix.ENOENT, unix.EMLINK:
				s.dropped++
			default:
				return fmt.Errorf("link %s: %w", relPath(node, e.name), err)
			}
			continue
		}
		if err := unix.Mkdirat(dfd, e.name, 0o700); err != nil {
			return fmt.Errorf("mkdir %s: %w", relPath(node, e.name), err)
		}
		cpfd, err := unix.Openat(pfd, e.name, dirFlags, 0)
		if err == unix.ENOENT { // the previous copy is being removed
			unix.Unlinkat(dfd, e.name, unix.AT_REMOVEDIR)
			s.dropped++
			continue
		}
		if err != nil {
			return fmt.Errorf("open %s: %w", relPath(node, e.name), err)
		}
		err = s.subdir(e.dir, cpfd, dfd, e.name)
		unix.Close(cpfd)
		if err != nil {
			return err
		}
		keep = append(keep, e)
	}
	clear(node.entries[len(keep):])
	node.entries = keep
	return nil
}

func (s *seeder) subdir(node *dirNode, pfd, parent int, name string) error {
	dfd, err := unix.Openat(parent, name, dirFlags, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", relPath(node.parent, name), err)
	}
	defer unix.Close(dfd)
	if err := s.dir(node, pfd, dfd); err != nil {
		return err
	}
	return s.meta(pfd, dfd, parent, name)
}

// meta gives the new directory dfd (name in dirfd) the owner, mode, xattrs
// and times of the previous copy's pfd, after its entries are made.
func (s *seeder) meta(pfd, dfd, dirfd int, name string) error {
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil {
		return err
	}
	if err := s.r.setMeta(dfd, dirfd, name, &st, fdRef(pfd), false); err != nil {
		return fmt.Errorf("set metadata of %s: %w", filepath.Base(name), err)
	}
	return nil
}
