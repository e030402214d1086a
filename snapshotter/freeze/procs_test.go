//go:build linux

package freeze

import (
	"context"
	"debug/elf"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/testutil"
)

// staticBusybox is Debian's busybox-static: a binary that runs in a chroot
// holding nothing else.
const staticBusybox = "/bin/busybox"

func requireStaticBusybox(t *testing.T) {
	t.Helper()
	f, err := elf.Open(staticBusybox)
	if err != nil {
		testutil.SkipOrFail(t, "%s: %v (install Debian's busybox-static)", staticBusybox, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			testutil.SkipOrFail(t, "%s is dynamically linked (install Debian's busybox-static)", staticBusybox)
		}
	}
}

// installBusybox copies the static busybox to dir/bin/busybox.
func installBusybox(t *testing.T, dir string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(dir, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	src, err := os.Open(staticBusybox)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(filepath.Join(dir, "bin", "busybox"), os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}

// mountOverlay mounts an overlay of lower with upperdir upper (created,
// with upper+".work" beside it) at upper+".merged", unmounted at the end of
// the test. The paths may contain spaces and commas; commas are escaped for
// overlayfs's option parser.
func mountOverlay(t *testing.T, lower, upper string) (merged string) {
	t.Helper()
	work, merged := upper+".work", upper+".merged"
	for _, d := range []string{upper, work, merged} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	esc := strings.NewReplacer(`\`, `\\`, `,`, `\,`, `:`, `\:`).Replace
	data := "lowerdir=" + esc(lower) + ",upperdir=" + esc(upper) + ",workdir=" + esc(work)
	if err := unix.Mount("overlay", merged, "overlay", 0, data); err != nil {
		t.Fatalf("mount overlay %s: %v", data, err)
	}
	t.Cleanup(func() { unmount(t, merged) })
	return merged
}

func chrooted(dir string) *syscall.SysProcAttr { return &syscall.SysProcAttr{Chroot: dir} }

func TestProcessesUsing(t *testing.T) {
	testutil.RequireRoot(t)
	requireStaticBusybox(t)
	ctx := context.Background()
	base := t.TempDir()

	// One lower shared by three overlays: one upperdir is a string prefix
	// of another (".../up" and ".../up2"), the paths have a space, and one
	// has a comma (escaped twice: by overlayfs, then by mountinfo).
	lower := filepath.Join(base, "lower")
	installBusybox(t, lower)
	installBusybox(t, filepath.Join(lower, "sub"))
	upper1 := filepath.Join(base, "a b", "up")
	upper2 := filepath.Join(base, "a b", "up2")
	upper3 := filepath.Join(base, "c,d", "up")
	merged1 := mountOverlay(t, lower, upper1)
	merged2 := mountOverlay(t, lower, upper2)
	merged3 := mountOverlay(t, lower, upper3)

	// A snapshot without parents: its upperdir bind-mounted, as
	// overlay.Layout.Mounts returns it.
	single := filepath.Join(base, "single", "fs")
	installBusybox(t, single)
	singleMnt := filepath.Join(base, "single", "rootfs")
	if err := os.Mkdir(singleMnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(single, singleMnt, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unmount(t, singleMnt) })

	unmounted := filepath.Join(base, "unmounted", "up")
	if err := os.MkdirAll(unmounted, 0o755); err != nil {
		t.Fatal(err)
	}

	sleep := []string{"sleep", "1000"}
	in1 := startProcess(t, nil, chrooted(merged1), "/bin/busybox", sleep...)
	in1Sub := startProcess(t, nil, chrooted(filepath.Join(merged1, "sub")), "/bin/busybox", sleep...)
	// Like a runc container: own mount namespace, pivot_root'ed into the
	// overlay.
	in1Pivot := startMmapHelper(t, "PIVOT_ROOT="+merged1)
	in2 := startProcess(t, nil, chrooted(merged2), "/bin/busybox", sleep...)
	in3 := startProcess(t, nil, chrooted(merged3), "/bin/busybox", sleep...)
	inSingle := startProcess(t, nil, chrooted(singleMnt), "/bin/busybox", sleep...)
	startProcess(t, nil, nil, "/bin/busybox", sleep...) // on the host

	for _, tc := range []struct {
		name     string
		upperdir string
		want     []int
	}{
		{"overlay, with a process chrooted below its root and one pivot_root'ed", upper1, sorted(in1, in1Sub, in1Pivot)},
		{"overlay whose upperdir has the other's as a prefix", upper2, []int{in2}},
		{"overlay with an escaped comma in upperdir", upper3, []int{in3}},
		{"unclean path", filepath.Join(base, "a b") + "//up/", sorted(in1, in1Sub, in1Pivot)},
		{"bind-mounted upperdir of a single-layer snapshot", single, []int{inSingle}},
		{"upperdir that is not mounted", unmounted, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ProcessesUsing(ctx, tc.upperdir)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("ProcessesUsing(%q) = %v, want %v", tc.upperdir, got, tc.want)
			}
		})
	}

	if _, err := ProcessesUsing(ctx, "relative/up"); !errdefs.IsInvalidArgument(err) {
		t.Errorf("relative upperdir: error %v, want invalid argument", err)
	}
	if _, err := ProcessesUsing(ctx, filepath.Join(base, "missing")); !errdefs.IsNotFound(err) {
		t.Errorf("missing upperdir: error %v, want not found", err)
	}
}

func sorted(pids ...int) []int {
	slices.Sort(pids)
	return pids
}

func TestHasUpperdir(t *testing.T) {
	for _, tc := range []struct {
		name, options, upperdir string
		want                    bool
	}{
		{"plain", "rw,lowerdir=/l,upperdir=/s/1/fs,workdir=/s/1/work", "/s/1/fs", true},
		{"other snapshot", "rw,lowerdir=/l,upperdir=/s/1/fs,workdir=/s/1/work", "/s/2/fs", false},
		{"prefix of the mounted one", "rw,lowerdir=/l,upperdir=/s/10/fs,workdir=/s/10/work", "/s/1", false},
		{"mounted one is a prefix", "rw,lowerdir=/l,upperdir=/s/1,workdir=/s/1w", "/s/10", false},
		{"lowerdir is not upperdir", "rw,lowerdir=/s/1/fs,upperdir=/s/2/fs,workdir=/s/2/work", "/s/1/fs", false},
		{"workdir is not upperdir", "rw,lowerdir=/l,upperdir=/s/2/fs,workdir=/s/1/fs", "/s/1/fs", false},
		{"space escaped by mountinfo", `rw,lowerdir=/l,upperdir=/a\040b/fs,workdir=/w`, "/a b/fs", true},
		{"comma escaped by overlayfs and mountinfo", `rw,lowerdir=/l,upperdir=/c\134\054d/fs,workdir=/w`, "/c,d/fs", true},
		{"comma escaped by mountinfo only (older kernels)", `rw,lowerdir=/l,upperdir=/c\054d/fs,workdir=/w`, "/c,d/fs", true},
		{"backslash in the path", `rw,upperdir=/e\134\134f,workdir=/w`, `/e\f`, true},
		{"trailing slash in the option", "rw,upperdir=/s/1/fs/,workdir=/w", "/s/1/fs", true},
		{"no upperdir (read-only overlay)", "rw,lowerdir=/s/1/fs:/l", "/s/1/fs", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := hasUpperdir(tc.options, tc.upperdir); got != tc.want {
				t.Fatalf("hasUpperdir(%q, %q) = %v, want %v", tc.options, tc.upperdir, got, tc.want)
			}
		})
	}
}

func TestCutPathPrefix(t *testing.T) {
	for _, tc := range []struct {
		p, prefix, rest string
		ok              bool
	}{
		{"/a/b", "/", "/a/b", true},
		{"/a/b", "/a", "/b", true},
		{"/a", "/a", "/", true},
		{"/ab", "/a", "", false},
		{"/a", "/a/b", "", false},
		{"relative", "/", "", false},
	} {
		rest, ok := cutPathPrefix(tc.p, tc.prefix)
		if rest != tc.rest || ok != tc.ok {
			t.Errorf("cutPathPrefix(%q, %q) = %q, %v; want %q, %v", tc.p, tc.prefix, rest, ok, tc.rest, tc.ok)
		}
	}
}
