// Package workload defines, step by step, what the point-in-time writer
// (integration/writer) does to its directory, so that the writer that
// performs the steps and the checker that verifies a capture of them
// (Verify, testutil.CheckWriterState) derive every state from one
// definition instead of two that could drift apart.
//
// The writer's directory (Dir inside a container's root) starts with
// BaseFiles files base.<k> that the image ships (so that deleting them
// makes overlay whiteouts). The writer then creates mmap and log, and runs
// steps 1, 2, 3, … Step i performs, in this order, each op with one
// system call that changes the file (open with O_CREAT or O_TRUNC, one
// write(2), unlink, one aligned 8-byte store):
//
//  1. create f.<i> (O_CREAT|O_EXCL) holding Content{f.<i>, gen i};
//  2. every OverwriteEvery steps, if f.<j> is live, for a j picked from
//     the window (i-Window, i): rewrite it (O_TRUNC) to Content{f.<j>, gen i};
//  3. every DeleteEvery steps, if f.<j> is live, for another j picked from
//     the window: delete it;
//  4. once i > Window: delete f.<i-Window> if it is live, so that at most
//     Window numbered files are live;
//  5. every BaseEvery steps, visit base.<k>, k = (i/BaseEvery) mod
//     BaseFiles: the first visit appends to it (an overlay copy-up), even
//     visits delete it (a whiteout), odd visits from the third create it
//     again (O_CREAT|O_EXCL);
//  6. store i, as a native 64-bit word, at the start of mmap slot
//     i mod MmapSlots (a MAP_SHARED, PROT_WRITE mapping of mmap; no msync);
//  7. append "i\n" to log (O_APPEND, one write).
//
// Nothing is ever fsynced. The log is written last, so a state whose log
// ends at step N holds every op of steps ≤ N and a prefix of step N+1's
// ops, of which the last may be half done in the only way an op can be:
// a file created or truncated but not written yet (empty).
package workload

import (
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"maps"
	"strconv"
)

const (
	// Dir is where the writer works in a container, and in the image.
	Dir = "/w"
	// BaseFiles is how many base.<k> files the image ships in Dir.
	BaseFiles = 64
	// Window bounds the live numbered files, and so the writer's disk use.
	Window = 1000
	// OverwriteEvery, DeleteEvery and BaseEvery space out ops 2, 3 and 5.
	OverwriteEvery = 3
	DeleteEvery    = 7
	BaseEvery      = 5
	// MmapSlots is the number of page-sized slots of the mmap file.
	MmapSlots = 4
	// SlotSize is the distance between two slots (one page on amd64 and
	// arm64 with 4 KiB pages; slots only need to be 8-byte aligned).
	SlotSize = 4096
	// MmapSize is the size of the mmap file.
	MmapSize = MmapSlots * SlotSize

	// LogName and MmapName are the writer's two fixed files.
	LogName  = "log"
	MmapName = "mmap"
)

// Content is the data of a file, named by how the workload made it rather
// than held, so that a model of thousands of steps stays small.
type Content struct {
	Name string // the file's name: part of its data, so that files differ
	Gen  int    // step that wrote the whole file; 0 is the image's data
	Tail int    // step that appended to the file, 0 if none did
}

// Bytes is the data of the file.
func (c Content) Bytes() []byte {
	b := fill(nil, c.Name, c.Gen)
	if c.Tail > 0 {
		b = c.appendTail(b)
	}
	return b
}

// TailBytes is what the append at step Tail added.
func (c Content) TailBytes() []byte { return c.appendTail(nil) }

func (c Content) appendTail(b []byte) []byte { return fill(b, c.Name+"+", c.Tail) }

func (c Content) String() string {
	s := fmt.Sprintf("%s as of step %d", c.Name, c.Gen)
	if c.Gen == 0 {
		s = c.Name + " as the image ships it"
	}
	if c.Tail > 0 {
		s += fmt.Sprintf(", appended at step %d", c.Tail)
	}
	return fmt.Sprintf("%s (%d bytes)", s, len(c.Bytes()))
}

// fill appends to b the data a whole write of name at step gen has:
// "<name>@<gen>;" repeated to a length between 256 bytes and 4 KiB that
// depends on both, so that a rewrite usually changes the size too.
func fill(b []byte, name string, gen int) []byte {
	h := fnv.New32a()
	h.Write([]byte(name))
	h.Write(binary.LittleEndian.AppendUint64(nil, uint64(gen)))
	n := 256 + int(h.Sum32()%(4096-256))
	unit := name + "@" + strconv.Itoa(gen) + ";"
	for len(unit) < n {
		unit += unit
	}
	return append(b, unit[:n]...)
}

// State is what a name in the writer's directory is.
type State uint8

const (
	// Missing: never created, or a numbered file deleted again.
	Missing State = iota
	// Lower: a base file the writer has not touched, as the image has it.
	// An overlay upper dir does not hold it, or holds a copy-up of it.
	Lower
	// Present: a file holding Content.
	Present
	// Empty: a file created or truncated by an op that has not written
	// yet; only the op in flight leaves one.
	Empty
	// Deleted: a base file deleted; an upper dir holds a whiteout.
	Deleted
)

func (s State) String() string {
	switch s {
	case Missing:
		return "missing"
	case Lower:
		return "the image's file"
	case Present:
		return "present"
	case Empty:
		return "empty"
	case Deleted:
		return "deleted (a whiteout)"
	}
	return "state " + strconv.Itoa(int(s))
}

// Entry is the expected state of one name.
type Entry struct {
	State   State
	Content Content // for Present and Lower
}

func (e Entry) String() string {
	switch e.State {
	case Present, Lower:
		return e.Content.String()
	}
	return e.State.String()
}

// OpKind is what an op does; see the package comment for the system calls.
type OpKind uint8

const (
	Create    OpKind = iota // open(O_CREAT|O_EXCL|O_WRONLY), write the Content, close
	Overwrite               // open(O_WRONLY|O_TRUNC), write the Content, close
	Append                  // open(O_WRONLY|O_APPEND), write the Content's tail, close
	Remove                  // unlink
	Store                   // store Step in mmap slot Slot
	Log                     // append "<Step>\n" to the log
)

func (k OpKind) String() string {
	return [...]string{"create", "overwrite", "append to", "remove", "store in mmap", "log"}[k]
}

// Op is one op of a step.
type Op struct {
	Kind    OpKind
	Step    int
	Name    string  // Create, Overwrite, Append, Remove: the file
	Content Content // Create, Overwrite, Append: the file's data after the op
	Slot    int     // Store
}

func (op Op) String() string {
	switch op.Kind {
	case Create, Overwrite, Append:
		return fmt.Sprintf("step %d: %s %s", op.Step, op.Kind, op.Content)
	case Remove:
		return fmt.Sprintf("step %d: remove %s", op.Step, op.Name)
	case Store:
		return fmt.Sprintf("step %d: store %d in mmap slot %d", op.Step, op.Step, op.Slot)
	}
	return fmt.Sprintf("step %d: log %d", op.Step, op.Step)
}

// result is the entry an op leaves for op.Name, and the one it leaves
// while half done (ok false if it cannot be half done).
func (op Op) result() (done, half Entry, ok bool) {
	switch op.Kind {
	case Create, Overwrite:
		return Entry{State: Present, Content: op.Content}, Entry{State: Empty}, true
	case Append:
		return Entry{State: Present, Content: op.Content}, Entry{}, false
	case Remove:
		if isBase(op.Name) {
			return Entry{State: Deleted}, Entry{}, false
		}
		return Entry{State: Missing}, Entry{}, false
	}
	return Entry{}, Entry{}, false
}

// Model is the state of the writer's directory after Step() steps.
type Model struct {
	step       int
	files      map[string]Entry // every name that is not Missing, but log and mmap
	baseVisits [BaseFiles]int
	slots      [MmapSlots]int // step stored in each mmap slot
}

// NewModel returns the state before step 1: the image's base files, an
// empty log and a zeroed mmap.
func NewModel() *Model {
	m := &Model{files: make(map[string]Entry, Window+BaseFiles)}
	for k := range BaseFiles {
		name := BaseName(k)
		m.files[name] = Entry{State: Lower, Content: Content{Name: name}}
	}
	return m
}

// Step is the last step the model has taken.
func (m *Model) Step() int { return m.step }

// Entry is the expected state of name (not log or mmap).
func (m *Model) Entry(name string) Entry { return m.files[name] }

// Mmap is the expected content of the mmap file.
func (m *Model) Mmap() []byte { return mmapBytes(m.slots) }

// Clone returns an independent copy.
func (m *Model) Clone() *Model {
	c := *m
	c.files = maps.Clone(m.files)
	return &c
}

// Next takes the next step and returns its ops, in the order the writer
// must perform them.
func (m *Model) Next() []Op {
	m.step++
	i := m.step
	ops := make([]Op, 0, 7)
	do := func(op Op) {
		op.Step = i
		ops = append(ops, op)
		m.apply(op)
	}
	name := NumberedName(i)
	do(Op{Kind: Create, Name: name, Content: Content{Name: name, Gen: i}})
	if i%OverwriteEvery == 0 {
		if j, ok := m.pick(i, 1); ok {
			name := NumberedName(j)
			do(Op{Kind: Overwrite, Name: name, Content: Content{Name: name, Gen: i}})
		}
	}
	if i%DeleteEvery == 0 {
		if j, ok := m.pick(i, 2); ok {
			do(Op{Kind: Remove, Name: NumberedName(j)})
		}
	}
	if j := i - Window; j > 0 && m.files[NumberedName(j)].State == Present {
		do(Op{Kind: Remove, Name: NumberedName(j)})
	}
	if i%BaseEvery == 0 {
		k := (i / BaseEvery) % BaseFiles
		name := BaseName(k)
		switch v := m.baseVisits[k] + 1; {
		case v == 1:
			do(Op{Kind: Append, Name: name, Content: Content{Name: name, Tail: i}})
		case v%2 == 0:
			do(Op{Kind: Remove, Name: name})
		default:
			do(Op{Kind: Create, Name: name, Content: Content{Name: name, Gen: i}})
		}
		m.baseVisits[k]++
	}
	do(Op{Kind: Store, Slot: i % MmapSlots})
	do(Op{Kind: Log})
	return ops
}

// pick returns a live numbered file of the window (i-Window, i), chosen
// by a hash of i and salt, or false if the chosen one is not live.
func (m *Model) pick(i, salt int) (int, bool) {
	lo, hi := max(1, i-Window+1), i-1
	if hi < lo {
		return 0, false
	}
	h := uint64(i)*0x9e3779b97f4a7c15 + uint64(salt)*0xbf58476d1ce4e5b9
	h ^= h >> 31
	j := lo + int(h%uint64(hi-lo+1))
	return j, m.files[NumberedName(j)].State == Present
}

func (m *Model) apply(op Op) {
	switch op.Kind {
	case Store:
		m.slots[op.Slot] = op.Step
		return
	case Log:
		return
	}
	done, _, _ := op.result()
	if done.State == Missing {
		delete(m.files, op.Name)
		return
	}
	m.files[op.Name] = done
}

func mmapBytes(slots [MmapSlots]int) []byte {
	b := make([]byte, MmapSize)
	for s, v := range slots {
		binary.NativeEndian.PutUint64(b[s*SlotSize:], uint64(v))
	}
	return b
}

// NumberedName is the name of the file step i creates.
func NumberedName(i int) string { return "f." + strconv.Itoa(i) }

// BaseName is the name of the k-th file the image ships.
func BaseName(k int) string { return "base." + strconv.Itoa(k) }

func isBase(name string) bool { return len(name) > 5 && name[:5] == "base." }

// BaseFile is a file the image must ship in Dir for the writer.
type BaseFile struct {
	Name string
	Data []byte
}

// Base returns the files the image ships in Dir.
func Base() []BaseFile {
	files := make([]BaseFile, BaseFiles)
	for k := range files {
		name := BaseName(k)
		files[k] = BaseFile{Name: name, Data: Content{Name: name}.Bytes()}
	}
	return files
}
