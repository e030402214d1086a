//go:build linux

package workload

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Layout says how a directory tree holds the writer's files.
type Layout int

const (
	// Merged is a root filesystem as the container sees it (or the
	// writer's directory on the host): a deleted file is absent.
	Merged Layout = iota
	// Upper is an overlay upper dir, such as a commit's capture: a base
	// file the writer has not touched is absent (or a copy-up of the
	// image's file), a deleted one is a whiteout, and the writer's
	// directory must not be opaque.
	Upper
)

func (l Layout) String() string {
	if l == Upper {
		return "upper dir"
	}
	return "merged root"
}

// Checker verifies states of one writer's directory. It keeps the model
// of the last state it verified, so that verifying a series of captures
// of one run replays each step once; a state before that restarts it.
type Checker struct {
	model *Model
}

// Verify is Checker.Verify with a fresh Checker.
func Verify(root string, layout Layout) (int, error) {
	var c Checker
	return c.Verify(root, layout)
}

// Verify checks that the writer's directory under root (root+Dir) is a
// state the writer passed through at one instant, and returns the last
// step the log holds. That is: the log holds "1\n" … "N\n", whole; and
// every file of the directory (numbered files, base files, the mmap) is
// as step N left it, or as a prefix of step N+1's ops left it; nothing
// else is there.
func (c *Checker) Verify(root string, layout Layout) (int, error) {
	dir := filepath.Join(root, Dir)
	n, err := readLog(filepath.Join(dir, LogName))
	if err != nil {
		return 0, err
	}
	if c.model == nil || c.model.Step() > n {
		c.model = NewModel()
	}
	for c.model.Step() < n {
		c.model.Next()
	}
	got, err := readDir(dir, layout)
	if err != nil {
		return n, err
	}
	cands := candidates(c.model)
	for _, cand := range cands {
		if len(cand.diff(c.model, got, layout, 1)) == 0 {
			return n, nil
		}
	}
	// Explain against the state after step N, and say how close the
	// nearest in-flight state of step N+1 comes.
	var msg strings.Builder
	fmt.Fprintf(&msg, "%s %s is not a state the writer passed through: its log ends at step %d, and against the state after step %d:",
		layout, dir, n, n)
	diffs := cands[0].diff(c.model, got, layout, 20)
	for _, d := range diffs {
		msg.WriteString("\n\t" + d)
	}
	best, bestDiffs := cands[0], len(cands[0].diff(c.model, got, layout, -1))
	for _, cand := range cands[1:] {
		if d := len(cand.diff(c.model, got, layout, -1)); d < bestDiffs {
			best, bestDiffs = cand, d
		}
	}
	if best != cands[0] {
		fmt.Fprintf(&msg, "\nnearest in-flight state (%s) still differs in %d entries:", best.desc, bestDiffs)
		for _, d := range best.diff(c.model, got, layout, 5) {
			msg.WriteString("\n\t" + d)
		}
	} else {
		ops := make([]string, len(cands[0].next))
		for i, op := range cands[0].next {
			ops[i] = op.String()
		}
		fmt.Fprintf(&msg, "\nno prefix of step %d's ops (%s) explains it either", n+1, strings.Join(ops, "; "))
	}
	return n, errors.New(msg.String())
}

// readLog returns N if the log is exactly "1\n2\n…N\n".
func readLog(path string) (int, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("the writer's log: %w", err)
	}
	n := 0
	for len(data) > 0 {
		line, rest, ok := bytes.Cut(data, []byte{'\n'})
		if !ok {
			return n, fmt.Errorf("log %s: torn last line %q after step %d", path, line, n)
		}
		n++
		if string(line) != strconv.Itoa(n) {
			return n, fmt.Errorf("log %s: line %d is %q: torn or out of order", path, n, line)
		}
		data = rest
	}
	return n, nil
}

// file is what the directory holds under one name.
type file struct {
	whiteout bool // a 0/0 char device or an overlay whiteout file
	data     []byte
	other    string // neither a regular file nor a whiteout: its type
}

func (f *file) String() string {
	switch {
	case f == nil:
		return "missing"
	case f.whiteout:
		return "a whiteout"
	case f.other != "":
		return "a " + f.other
	}
	if len(f.data) == 0 {
		return "an empty file"
	}
	head := f.data
	if len(head) > 24 {
		head = head[:24]
	}
	return fmt.Sprintf("a file of %d bytes starting %q", len(f.data), head)
}

// readDir reads every entry of the writer's directory.
func readDir(dir string, layout Layout) (map[string]*file, error) {
	if layout == Upper {
		for _, x := range []string{"trusted.overlay.opaque", "user.overlay.opaque"} {
			if v, err := getxattr(dir, x); err == nil {
				return nil, fmt.Errorf("%s is opaque (%s=%q): it hides the image's files", dir, x, v)
			}
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	files := make(map[string]*file, len(entries))
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return nil, fmt.Errorf("lstat %s: %w", p, err)
		}
		f := &file{}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			if layout == Upper && st.Size == 0 && isWhiteoutFile(p) {
				f.whiteout = true
				break
			}
			if f.data, err = os.ReadFile(p); err != nil {
				return nil, err
			}
		case unix.S_IFCHR:
			if layout == Upper && st.Rdev == 0 {
				f.whiteout = true
			} else {
				f.other = fmt.Sprintf("char device %d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
			}
		default:
			f.other = os.FileMode(st.Mode & 0o170000).Type().String()
			if e.IsDir() {
				f.other = "directory"
			}
		}
		files[e.Name()] = f
	}
	return files, nil
}

// isWhiteoutFile: newer kernels can make whiteouts as empty files with an
// overlay whiteout xattr instead of 0/0 char devices.
func isWhiteoutFile(p string) bool {
	for _, x := range []string{"trusted.overlay.whiteout", "user.overlay.whiteout"} {
		if _, err := getxattr(p, x); err == nil {
			return true
		}
	}
	return false
}

func getxattr(p, name string) (string, error) {
	buf := make([]byte, 256)
	n, err := unix.Lgetxattr(p, name, buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

// candidate is one state the writer passed through with its log at step
// N: the state after step N, changed by a prefix of step N+1's ops.
type candidate struct {
	desc  string
	over  map[string]Entry // entries that differ from the model's
	slots [MmapSlots]int
	next  []Op // step N+1's ops (on the first candidate, for messages)
}

func candidates(m *Model) []*candidate {
	ops := m.Clone().Next()
	ops = ops[:len(ops)-1] // with its log line, it would be step N+1's state
	cur := &candidate{desc: fmt.Sprintf("after step %d", m.Step()), over: map[string]Entry{}, slots: m.slots, next: ops}
	cands := []*candidate{cur}
	for _, op := range ops {
		done, half, ok := op.result()
		if ok {
			c := cur.with(op, half)
			c.desc = fmt.Sprintf("in step %d, half done: %s", op.Step, op)
			cands = append(cands, c)
		}
		cur = cur.with(op, done)
		cur.desc = fmt.Sprintf("in step %d, done: %s", op.Step, op)
		cands = append(cands, cur)
	}
	return cands
}

// with returns c changed by op, which leaves e for op.Name.
func (c *candidate) with(op Op, e Entry) *candidate {
	n := &candidate{over: make(map[string]Entry, len(c.over)+1), slots: c.slots}
	for k, v := range c.over {
		n.over[k] = v
	}
	if op.Kind == Store {
		n.slots[op.Slot] = op.Step
	} else {
		n.over[op.Name] = e
	}
	return n
}

// diff lists, sorted, up to limit (all if negative) differences between
// the candidate state and got.
func (c *candidate) diff(m *Model, got map[string]*file, layout Layout, limit int) []string {
	var diffs []string
	add := func(format string, args ...any) bool {
		diffs = append(diffs, fmt.Sprintf(format, args...))
		return limit >= 0 && len(diffs) >= limit
	}
	want := func(name string) Entry {
		if e, ok := c.over[name]; ok {
			return e
		}
		return m.Entry(name)
	}
	// The names to look at: every name either side knows.
	names := make([]string, 0, len(got)+len(c.over)+len(m.files))
	for name := range got {
		names = append(names, name)
	}
	for name := range c.over {
		if _, ok := got[name]; !ok {
			names = append(names, name)
		}
	}
	for name := range m.files {
		_, inGot := got[name]
		_, inOver := c.over[name]
		if !inGot && !inOver {
			names = append(names, name)
		}
	}
	slices.SortFunc(names, compareNames)
	for _, name := range names {
		f := got[name]
		if name == LogName {
			continue // readLog checked it
		}
		if name == MmapName {
			if d := diffMmap(c.slots, f); d != "" && add("%s", d) {
				break
			}
			continue
		}
		if e := want(name); !matches(e, f, layout) && add("%s: got %s, want %s", name, f, wantString(e, layout)) {
			break
		}
	}
	if _, ok := got[MmapName]; !ok && (limit < 0 || len(diffs) < limit) {
		add("%s", diffMmap(c.slots, nil))
	}
	return diffs
}

func matches(e Entry, f *file, layout Layout) bool {
	isData := func(want []byte) bool { return f != nil && !f.whiteout && f.other == "" && bytes.Equal(f.data, want) }
	switch e.State {
	case Missing:
		return f == nil
	case Lower:
		return (layout == Upper && f == nil) || isData(e.Content.Bytes())
	case Present:
		return isData(e.Content.Bytes())
	case Empty:
		return isData(nil)
	case Deleted:
		if layout == Upper {
			return f != nil && f.whiteout
		}
		return f == nil
	}
	return false
}

func wantString(e Entry, layout Layout) string {
	switch {
	case e.State == Lower && layout == Upper:
		return "missing or a copy-up of " + e.String()
	case e.State == Deleted && layout == Merged:
		return "missing (deleted)"
	case e.State == Deleted:
		return "a whiteout (deleted)"
	}
	return e.String()
}

func diffMmap(slots [MmapSlots]int, f *file) string {
	if f == nil {
		return MmapName + ": missing"
	}
	if f.whiteout || f.other != "" {
		return fmt.Sprintf("%s: got %s", MmapName, f)
	}
	want := mmapBytes(slots)
	if len(f.data) != len(want) {
		return fmt.Sprintf("%s: %d bytes, want %d", MmapName, len(f.data), len(want))
	}
	for s := range MmapSlots {
		g, w := f.data[s*SlotSize:(s+1)*SlotSize], want[s*SlotSize:(s+1)*SlotSize]
		if bytes.Equal(g, w) {
			continue
		}
		if !bytes.Equal(g[8:], w[8:]) {
			return fmt.Sprintf("%s: slot %d holds stray bytes past its 8-byte step", MmapName, s)
		}
		return fmt.Sprintf("%s: slot %d holds step %d, want %d", MmapName, s, int64(binary.NativeEndian.Uint64(g)), slots[s])
	}
	return ""
}

// compareNames sorts numbered files by number, after the other names.
func compareNames(a, b string) int {
	na, erra := strconv.Atoi(strings.TrimPrefix(a, "f."))
	nb, errb := strconv.Atoi(strings.TrimPrefix(b, "f."))
	switch {
	case erra == nil && errb == nil:
		return na - nb
	case erra == nil:
		return 1
	case errb == nil:
		return -1
	}
	return strings.Compare(a, b)
}
