//go:build linux

// Package sched runs background work at a lower CPU priority than the
// containers it must not disturb.
package sched

import (
	"runtime"

	"golang.org/x/sys/unix"
)

// LowerPriority gives the calling goroutine an OS thread of its own for
// the rest of its life and sets that thread's nice value (0-19). The
// thread is never unlocked, so it ends with the goroutine instead of
// going back to the runtime's pool to serve others at that priority.
func LowerPriority(nice int) error {
	runtime.LockOSThread()
	return unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), nice)
}
