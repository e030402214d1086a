//go:build linux

package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	// startTimeout bounds a component's start when the caller's context
	// has no deadline of its own.
	startTimeout = 60 * time.Second
	// stopTimeout is how long a component gets to exit after SIGTERM
	// before its process group is killed.
	stopTimeout = 30 * time.Second
	// logTailLines is how much of a component's log a failed test shows.
	logTailLines = 100
	// pollInterval is the readiness polling period.
	pollInterval = 50 * time.Millisecond
)

// process is one long-running child (containerd, registry, our daemon)
// whose stdout and stderr go to a log file that survives restarts.
type process struct {
	name    string
	path    string
	args    []string
	env     []string
	logPath string
	// logf is the test's Logf. It is only called from start, waitReady,
	// stop and kill, which run on the test's goroutines: testing panics
	// on a Logf after the test has ended.
	logf func(format string, args ...any)

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
	err  error         // cmd.Wait's result, valid once done is closed
}

// newProcess prepares a process and registers cleanups that stop it and,
// if the test failed, show the end of its log. The log dump is registered
// first so that it runs last (cleanups run in reverse) and includes the
// shutdown.
func newProcess(t T, name, path, logPath string) *process {
	p := &process{name: name, path: path, logPath: logPath, logf: t.Logf}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("%s log %s, last %d lines:\n%s", name, logPath, logTailLines, p.tail(logTailLines))
		}
		if dir := os.Getenv(EnvKeepLogs); dir != "" {
			p.keepLog(t, dir)
		}
	})
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), stopTimeout+5*time.Second)
		defer cancel()
		if err := p.stop(ctx); err != nil {
			t.Errorf("stopping %s: %v", name, err)
		}
	})
	return p
}

// start launches the process with the given arguments and environment.
func (p *process) start(args, env []string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.runningLocked() {
		return fmt.Errorf("%s is already running (pid %d)", p.name, p.cmd.Process.Pid)
	}
	logFile, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("opening %s log: %w", p.name, err)
	}
	// A marker separates the runs of a restarted component in its log.
	fmt.Fprintf(logFile, "=== harness %s: starting %s %s\n",
		time.Now().Format(time.RFC3339Nano), p.path, strings.Join(args, " "))

	cmd := exec.Command(p.path, args...)
	cmd.Env = env
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own process group, so cleanup can kill the component and
		// every child it left behind without touching the test binary.
		// containerd's shims create their own groups and survive this,
		// as they do in production.
		Setpgid: true,
		// No Pdeathsig: the kernel sends it when the *thread* that forked
		// exits, and Go ends threads whose goroutine locked them and
		// returned (containerd's mount code does, for long lowerdir
		// options), which killed daemons in the middle of tests.
	}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return fmt.Errorf("starting %s: %w", p.name, err)
	}
	p.args, p.env, p.cmd = args, env, cmd
	p.logf("%s: started pid %d: %s %s (log %s)", p.name, cmd.Process.Pid, p.path, strings.Join(args, " "), p.logPath)
	done := make(chan struct{})
	p.done = done
	go func() {
		err := cmd.Wait()
		fmt.Fprintf(logFile, "=== harness %s: %s exited: %v\n",
			time.Now().Format(time.RFC3339Nano), p.name, exitStatus(err))
		logFile.Close()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		close(done)
	}()
	return nil
}

func exitStatus(err error) string {
	if err == nil {
		return "status 0"
	}
	return err.Error()
}

// started reports whether start ever succeeded.
func (p *process) started() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.done != nil
}

// running reports whether the process has been started and not exited.
func (p *process) running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.runningLocked()
}

func (p *process) runningLocked() bool {
	if p.done == nil {
		return false
	}
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// exited returns a non-nil error describing the exit if the process has
// exited; readiness loops use it to fail fast instead of timing out.
func (p *process) exited() error {
	p.mu.Lock()
	done, err := p.done, p.err
	p.mu.Unlock()
	if done == nil {
		return fmt.Errorf("%s was never started", p.name)
	}
	select {
	case <-done:
		return fmt.Errorf("%s exited (%s); log %s:\n%s", p.name, exitStatus(err), p.logPath, p.tail(logTailLines))
	default:
		return nil
	}
}

// pid returns the process id, or 0 if it is not running.
func (p *process) pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.runningLocked() {
		return 0
	}
	return p.cmd.Process.Pid
}

// stop sends SIGTERM to the process itself (not its group: a graceful
// shutdown is the component's job) and waits for it to exit; past ctx or
// stopTimeout it kills the whole group. Stragglers in the group are always
// killed, so a stopped component leaves nothing running.
func (p *process) stop(ctx context.Context) error {
	p.mu.Lock()
	if !p.runningLocked() {
		p.mu.Unlock()
		return nil
	}
	pid, done := p.cmd.Process.Pid, p.done
	p.mu.Unlock()

	ctx, cancel := context.WithTimeout(ctx, stopTimeout)
	defer cancel()
	begin := time.Now()
	p.logf("%s: stopping pid %d (SIGTERM)", p.name, pid)
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("sending SIGTERM to %s (pid %d): %w", p.name, pid, err)
	}
	select {
	case <-done:
		killGroup(pid)
		p.logf("%s: pid %d exited after %v", p.name, pid, time.Since(begin).Round(time.Millisecond))
		return nil
	case <-ctx.Done():
	}
	killGroup(pid)
	<-done
	return fmt.Errorf("%s (pid %d) did not exit after SIGTERM: %w; killed", p.name, pid, ctx.Err())
}

// kill sends SIGKILL to the process group and waits for the process to
// exit: the crash case, with no chance to clean up.
func (p *process) kill() error {
	p.mu.Lock()
	if !p.runningLocked() {
		p.mu.Unlock()
		return fmt.Errorf("%s is not running", p.name)
	}
	pid, done := p.cmd.Process.Pid, p.done
	p.mu.Unlock()
	p.logf("%s: killing pid %d and its process group (SIGKILL)", p.name, pid)
	killGroup(pid)
	<-done
	return nil
}

// killGroup kills the process group led by pid; an already empty group is
// not an error.
func killGroup(pid int) {
	_ = syscall.Kill(-pid, syscall.SIGKILL)
}

// tail returns the last n lines of the log.
func (p *process) tail(n int) string {
	data, err := os.ReadFile(p.logPath)
	if err != nil {
		return fmt.Sprintf("(reading %s: %v)", p.logPath, err)
	}
	lines := bytes.Split(bytes.TrimRight(data, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

// waitReady polls check until it succeeds, the process exits, or ctx (or,
// without a deadline, startTimeout) expires.
func (p *process) waitReady(ctx context.Context, what string, check func(context.Context) error) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, startTimeout)
		defer cancel()
	}
	ticker := time.NewTicker(pollInterval)
	defer ticker.Stop()
	begin := time.Now()
	var lastErr error
	for {
		if lastErr = check(ctx); lastErr == nil {
			p.logf("%s: ready after %v (%s)", p.name, time.Since(begin).Round(time.Millisecond), what)
			return nil
		}
		if err := p.exited(); err != nil {
			return fmt.Errorf("waiting for %s: %w", what, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w (last error: %v); log %s:\n%s",
				what, ctx.Err(), lastErr, p.logPath, p.tail(20))
		case <-ticker.C:
		}
	}
}

// keepLog copies the log into dir before the test's temporary
// directories go, as <test>-<process>-<random>.log: a benchmark's daemon
// log holds each pause's phases.
func (p *process) keepLog(t T, dir string) {
	test := "run"
	if named, ok := t.(interface{ Name() string }); ok {
		test = strings.NewReplacer("/", "_", " ", "_").Replace(named.Name())
	}
	data, err := os.ReadFile(p.logPath)
	if err == nil {
		err = os.MkdirAll(dir, 0o755)
	}
	var f *os.File
	if err == nil {
		f, err = os.CreateTemp(dir, test+"-"+p.name+"-*.log")
	}
	if err == nil {
		_, err = f.Write(data)
		err = errors.Join(err, f.Close())
	}
	if err != nil {
		t.Logf("keeping the %s log: %v", p.name, err)
		return
	}
	t.Logf("%s log kept in %s", p.name, f.Name())
}
