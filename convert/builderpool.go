//go:build linux

package convert

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/seamless-snapshotter/seamless-snapshotter/internal/sched"
)

const (
	// builderIdleAfter is how long a builder process waits for its next
	// job before it is retired: commits a few minutes apart reuse it;
	// an idle daemon holds no builder.
	builderIdleAfter = 5 * time.Minute
	// builderExitWait is how long a builder that was asked to end (its
	// control socket closed, or its job ended without an outcome) has to
	// exit before it is killed.
	builderExitWait = 5 * time.Second
)

// builderPool keeps the layer builder processes of one class between
// jobs. A builder is started once, moved into the class once, and then
// serves jobs one at a time (serveLayerBuilder) until it has been idle
// for idleAfter. Starting one per job cost each commit a process start
// (a Go runtime's start-up, tens of ms of CPU) and a move into the
// class; and on cgroup v1 that move takes the kernel's global cgroup
// threadgroup lock, which holds up every fork and exit on the host,
// the containers' included, for an RCU grace period.
type builderPool struct {
	class     sched.Class
	idleAfter time.Duration

	mu     sync.Mutex
	idle   []*builderProc
	closed bool
}

func newBuilderPool(class sched.Class, idleAfter time.Duration) *builderPool {
	return &builderPool{class: class, idleAfter: idleAfter}
}

// builderProc is one builder process.
type builderProc struct {
	pid    int
	cmd    *exec.Cmd
	ctl    *os.File // the daemon's end of the control socket
	stderr *tailBuffer

	exited  chan struct{} // closed when the process has exited
	exitErr error         // its exit status, once exited is closed

	// spent is set when the process must not take another job: it was
	// killed, or taken out of its class; killed, when it was killed.
	spent, killed atomic.Bool
	// idleTimer retires the process when it has been idle too long.
	idleTimer *time.Timer
}

// dispatch gives a job (see builderProc.send) to an idle builder, or to
// a new one, and returns the builder; put takes it back after the job.
// An idle builder that died since its last job, which may be seen only
// now, is replaced.
func (p *builderPool) dispatch(ctx context.Context, args []string, out, status *os.File) (*builderProc, error) {
	for {
		b, fresh, err := p.get(ctx)
		if err != nil {
			return nil, err
		}
		err = b.send(args, out, status)
		if err == nil {
			return b, nil
		}
		p.put(b) // spent: retired
		if fresh {
			return nil, err
		}
	}
}

// get returns an idle builder, or starts one (fresh).
func (p *builderPool) get(ctx context.Context) (_ *builderProc, fresh bool, _ error) {
	p.mu.Lock()
	for len(p.idle) > 0 {
		b := p.idle[len(p.idle)-1]
		p.idle = p.idle[:len(p.idle)-1]
		b.idleTimer.Stop()
		if b.alive() {
			p.mu.Unlock()
			return b, false, nil
		}
		go b.stop()
	}
	p.mu.Unlock()
	b, err := startBuilder(ctx, p.class)
	return b, true, err
}

// put takes b back after a job: idle, for the next one, or retired.
func (p *builderPool) put(b *builderProc) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || !b.alive() {
		go b.stop()
		return
	}
	p.idle = append(p.idle, b)
	b.idleTimer = time.AfterFunc(p.idleAfter, func() {
		p.mu.Lock()
		i := slices.Index(p.idle, b)
		if i >= 0 {
			p.idle = slices.Delete(p.idle, i, i+1)
		}
		p.mu.Unlock()
		if i >= 0 {
			b.stop()
		}
	})
}

// Close retires the idle builders and waits for them to exit; builders
// still in a job are retired when it ends.
func (p *builderPool) Close() {
	p.mu.Lock()
	p.closed = true
	idle := p.idle
	p.idle = nil
	for _, b := range idle {
		b.idleTimer.Stop()
	}
	p.mu.Unlock()
	for _, b := range idle {
		b.stop()
	}
}

// startBuilder starts a builder process (this program, re-executed as
// builderArg0) of class and moves it into the class at once: the
// runtime's start-up there, before its main enters the class itself (for
// threads made in between), would run at the daemon's priority.
//
// The thread that starts it waits for it, because the kernel sends a
// child's parent-death signal when the thread that forked it ends, and
// that signal is what ends the builder if the daemon dies.
func startBuilder(ctx context.Context, class sched.Class) (*builderProc, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("builder control socket: %w", err)
	}
	ctl, theirs := os.NewFile(uintptr(fds[0]), "builder-control"), os.NewFile(uintptr(fds[1]), "control")
	defer theirs.Close() // the process has its own copy, or none
	b := &builderProc{
		ctl:    ctl,
		stderr: &tailBuffer{limit: stderrLimit},
		exited: make(chan struct{}),
	}
	cmd := exec.Command("/proc/self/exe", "-nice", strconv.Itoa(class.Nice), "-cgroup", class.Cgroup)
	cmd.Args[0] = builderArg0
	cmd.Stderr, cmd.ExtraFiles = b.stderr, []*os.File{theirs}
	// Nothing of the daemon's environment (a registry credential, say)
	// reaches a process that reads the containers' files.
	cmd.Env = []string{}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	b.cmd = cmd
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		if class != (sched.Class{}) {
			if err := class.MoveProcess(cmd.Process.Pid); err != nil {
				log.G(ctx).WithError(err).Warn("the layer builder runs at a higher priority than its background class")
			}
		}
		started <- nil
		b.exitErr = cmd.Wait()
		close(b.exited)
	}()
	if err := <-started; err != nil {
		ctl.Close()
		return nil, fmt.Errorf("start the layer builder: %w: %w", errdefs.ErrUnavailable, err)
	}
	b.pid = cmd.Process.Pid
	log.G(ctx).WithField("pid", b.pid).Debug("layer builder started")
	return b, nil
}

// send gives b a job: its flags and upper directory, and the write ends
// of its blob and status pipes.
func (b *builderProc) send(args []string, out, status *os.File) error {
	msg, err := json.Marshal(args)
	if err != nil {
		return err
	}
	if len(msg) > builderJobMax {
		return fmt.Errorf("layer builder job of %d bytes: %w", len(msg), errdefs.ErrInvalidArgument)
	}
	rights := unix.UnixRights(int(out.Fd()), int(status.Fd()))
	if err := unix.Sendmsg(int(b.ctl.Fd()), msg, rights, nil, 0); err != nil {
		b.kill()
		return fmt.Errorf("send a job to the layer builder: %w: %w", errdefs.ErrUnavailable, err)
	}
	return nil
}

// alive reports whether b can take a job.
func (b *builderProc) alive() bool {
	select {
	case <-b.exited:
		return false
	default:
		return !b.spent.Load()
	}
}

// leftClass marks b as taken out of its class (by watchStarved): it ends
// its job there and is retired, so that it never serves the next one at
// the daemon's priority.
func (b *builderProc) leftClass() { b.spent.Store(true) }

// kill ends b at once; its job fails.
func (b *builderProc) kill() {
	b.spent.Store(true)
	b.killed.Store(true)
	_ = b.cmd.Process.Kill()
}

// wait waits up to d for b to exit, kills it if it has not, and returns
// its exit status.
func (b *builderProc) wait(d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-b.exited:
	case <-t.C:
		b.kill()
		<-b.exited
	}
	return b.exitErr
}

// stop retires b: the end of its control socket ends its loop.
func (b *builderProc) stop() {
	b.spent.Store(true)
	b.ctl.Close()
	if err := b.wait(builderExitWait); err != nil && !b.killed.Load() {
		log.L.WithError(err).WithFields(log.Fields{"pid": b.pid, "stderr": b.stderr.String()}).Warn("layer builder ended badly")
	}
}
