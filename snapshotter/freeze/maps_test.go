//go:build linux

package freeze

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
)

func TestSharedWritableMappings(t *testing.T) {
	// Reading another process's map_files needs CAP_SYS_ADMIN.
	testutil.RequireRoot(t)
	for _, tc := range []struct {
		name  string
		enter string // how the helper enters its root: "", CHROOT, PIVOT_ROOT
	}{
		{"process in the host root", ""},
		{"chrooted process", "CHROOT"},
		{"process in its own mount namespace after pivot_root, like runc's", "PIVOT_ROOT"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			data := filepath.Join(root, "data")
			if err := os.Mkdir(data, 0o755); err != nil {
				t.Fatal(err)
			}
			// file creates data/name and returns its path as the helper
			// sees it.
			file := func(name string) string {
				p := filepath.Join(data, name)
				if err := os.WriteFile(p, make([]byte, 4096), 0o600); err != nil {
					t.Fatal(err)
				}
				if tc.enter == "" {
					return p
				}
				return "/data/" + name
			}
			shared := file("shared.db")
			spaced := file("with space\nand newline")
			literal := file("named (deleted)")
			private := file("private")
			readOnly := file("read-only")
			unlinked := file("unlinked")
			unlinkedLinked := file("unlinked-linked")
			if err := os.Link(filepath.Join(data, "unlinked-linked"), filepath.Join(data, "other-link")); err != nil {
				t.Fatal(err)
			}
			outside := filepath.Join(t.TempDir(), "outside")
			if err := os.WriteFile(outside, make([]byte, 4096), 0o600); err != nil {
				t.Fatal(err)
			}
			env := []string{
				"SHARED_RW=" + shared + ":" + spaced + ":" + literal + ":" + shared,
				"PRIVATE_RW=" + private,
				"SHARED_RO=" + readOnly,
				"SHARED_RW_UNLINK=" + unlinked + ":" + unlinkedLinked,
			}
			want := []string{shared, spaced, literal}
			if tc.enter != "" {
				env = append(env, tc.enter+"="+root)
			}
			if tc.enter == "CHROOT" {
				// Mapped before the chroot: outside the root, not reported.
				// (After pivot_root such a file cannot be told from one in
				// the root; see SharedWritableMappings.)
				env = append(env, "OUTSIDE_RW="+outside)
			}
			pid := startMmapHelper(t, env...)

			exited := exec.Command("/bin/true")
			if err := exited.Run(); err != nil {
				t.Fatal(err)
			}
			got, err := SharedWritableMappings(context.Background(), []int{pid, exited.Process.Pid, pid})
			if err != nil {
				t.Fatal(err)
			}
			slices.Sort(want)
			if !slices.Equal(got, want) {
				t.Fatalf("SharedWritableMappings = %q, want %q", got, want)
			}
		})
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func TestParseMapsLine(t *testing.T) {
	for _, tc := range []struct {
		line string
		want mapping
		ok   bool
	}{
		{
			line: "7f2c1a000000-7f2c1a001000 rw-s 00000000 fe:00 1234                       /var/lib/db/data.mdb",
			want: mapping{addr: "7f2c1a000000-7f2c1a001000", perms: "rw-s", dev: unix.Mkdev(0xfe, 0), ino: 1234, path: "/var/lib/db/data.mdb"},
			ok:   true,
		},
		{
			line: "7f2c1a000000-7f2c1a001000 rw-s 00000000 00:26 99 /a dir/with  spaces (deleted)",
			want: mapping{addr: "7f2c1a000000-7f2c1a001000", perms: "rw-s", dev: unix.Mkdev(0, 0x26), ino: 99, path: "/a dir/with  spaces (deleted)"},
			ok:   true,
		},
		{
			line: `7f2c1a000000-7f2c1a001000 rw-s 00000000 00:26 99 /new\012line`,
			want: mapping{addr: "7f2c1a000000-7f2c1a001000", perms: "rw-s", dev: unix.Mkdev(0, 0x26), ino: 99, path: "/new\nline"},
			ok:   true,
		},
		{
			line: "7ffd5a3c0000-7ffd5a3e1000 rw-p 00000000 00:00 0                          [stack]",
			want: mapping{addr: "7ffd5a3c0000-7ffd5a3e1000", perms: "rw-p", path: "[stack]"},
			ok:   true,
		},
		{
			line: "7f2c1a000000-7f2c1a001000 rw-s 00000000 00:00 0",
			want: mapping{addr: "7f2c1a000000-7f2c1a001000", perms: "rw-s"},
			ok:   true,
		},
		{line: "garbage", ok: false},
		{line: "7f2c1a000000-7f2c1a001000 rw-s 00000000 zz 0", ok: false},
	} {
		got, ok := parseMapsLine(tc.line)
		if ok != tc.ok || (ok && got != tc.want) {
			t.Errorf("parseMapsLine(%q) = %+v, %v; want %+v, %v", tc.line, got, ok, tc.want, tc.ok)
		}
	}
}
