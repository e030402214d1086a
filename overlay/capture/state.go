//go:build linux

package capture

import (
	"math"
	"path"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// entry is what a Copier remembers of one source entry as last copied: 64
// bytes plus the name, so a million entries cost about 90 MB. Owner,
// permission and xattr changes are caught through ctime, which the kernel
// sets on every change and nobody can set back.
type entry struct {
	name  string
	dir   *dirNode // children, for a directory
	ino   uint64
	size  int64  // st_size, or st_rdev for a device
	mtime int64  // unix ns
	ctime int64  // unix ns; invalidTime forces a re-copy
	nlink uint32 // st_nlink (at most maxNlink), and seededBit
	mode  uint16 // st_mode: type and permission bits
	round uint16 // index into Copier.rounds of the round that last copied it
}

// seededBit, in entry.nlink, marks a destination that is a hard link into
// a previous copy (see Copier.Seed): it must be replaced, never changed in
// place. (In nlink, so that an entry stays 64 bytes.)
const (
	seededBit = 1 << 31
	maxNlink  = seededBit - 1
)

func (e *entry) seeded() bool { return e.nlink&seededBit != 0 }

// dirNode holds a directory's children in the order the last readdir
// returned them, so an unchanged directory is matched without sorting.
type dirNode struct {
	parent  *dirNode // nil for the root
	name    string   // name in parent
	entries []entry
	wd      int32 // inotify watch on the source directory (Options.TrackChanges); 0: none
}

// invalidTime is a ctime no stat returns: the entry is treated as changed.
const invalidTime = math.MinInt64

const maxRounds = math.MaxUint16 + 1

func nsec(ts unix.Timespec) int64 { return ts.Sec*1e9 + ts.Nsec }

func sizeOf(st *unix.Stat_t) int64 {
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFCHR, unix.S_IFBLK:
		return int64(st.Rdev)
	}
	return st.Size
}

func newEntry(name string, st *unix.Stat_t, round uint16) entry {
	return entry{
		name:  name,
		ino:   st.Ino,
		size:  sizeOf(st),
		mtime: nsec(st.Mtim),
		ctime: nsec(st.Ctim),
		nlink: uint32(min(st.Nlink, maxNlink)),
		mode:  uint16(st.Mode),
		round: round,
	}
}

func (e *entry) typ() uint32 { return uint32(e.mode) & unix.S_IFMT }

// count is the number of entries in e's subtree, e included.
func (e *entry) count() int64 {
	n := int64(1)
	if e.dir != nil {
		for i := range e.dir.entries {
			n += e.dir.entries[i].count()
		}
	}
	return n
}

// isDirty tells whether the entry must be copied again: its stat data
// differs from what was copied, or it is racy, i.e. its ctime is not
// strictly older than the start of the round that copied it minus the
// margin (a second change within the same timestamp tick would leave the
// stat data unchanged). A ctime without a sub-second part suggests a
// filesystem with one-second timestamps, so it gets one more second.
func (c *Copier) isDirty(e *entry, st *unix.Stat_t) (dirty, racy bool) {
	if e.ino != st.Ino || uint32(e.mode) != st.Mode&0xffff || e.size != sizeOf(st) ||
		e.mtime != nsec(st.Mtim) || e.ctime != nsec(st.Ctim) ||
		e.nlink&maxNlink != uint32(min(st.Nlink, maxNlink)) {
		return true, false
	}
	margin := c.margin
	if st.Ctim.Nsec == 0 {
		margin += int64(time.Second)
	}
	if e.ctime >= c.rounds[e.round]-margin {
		return true, true
	}
	return false, false
}

// newRound records the start of a round and returns its index. When the
// indices run out, every entry is moved to the oldest round: that makes
// entries look racier than they are, which is safe.
func (c *Copier) newRound(start int64) uint16 {
	if len(c.rounds) == maxRounds {
		var reset func(n *dirNode)
		reset = func(n *dirNode) {
			for i := range n.entries {
				n.entries[i].round = 0
				if n.entries[i].dir != nil {
					reset(n.entries[i].dir)
				}
			}
		}
		c.root.round = 0
		reset(c.root.dir)
		c.rounds = c.rounds[:1]
	}
	c.rounds = append(c.rounds, start)
	return uint16(len(c.rounds) - 1)
}

// forceNode is a trie of the paths Final must re-copy regardless of their
// stat data, walked along with the tree.
type forceNode struct {
	self bool
	kids map[string]*forceNode
}

// buildForce turns paths relative to the source root (a leading "/" is
// allowed; ".." cannot climb above the root) into a trie.
func buildForce(paths []string) *forceNode {
	if len(paths) == 0 {
		return nil
	}
	root := &forceNode{}
	for _, p := range paths {
		p = path.Clean("/" + p)
		if p == "/" {
			continue
		}
		n := root
		for _, comp := range strings.Split(p[1:], "/") {
			if n.kids == nil {
				n.kids = make(map[string]*forceNode)
			}
			k := n.kids[comp]
			if k == nil {
				k = &forceNode{}
				n.kids[comp] = k
			}
			n = k
		}
		n.self = true
	}
	return root
}

func (f *forceNode) child(name string) *forceNode {
	if f == nil || f.kids == nil {
		return nil
	}
	return f.kids[name]
}
