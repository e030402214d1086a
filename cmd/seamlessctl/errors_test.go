//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"testing"

	"github.com/containerd/errdefs"
)

func TestExitCode(t *testing.T) {
	dial := func(errno syscall.Errno) error {
		return &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", errno)}
	}
	for _, tc := range []struct {
		name string
		err  error
		want int
	}{
		{"nil", nil, exitOK},
		{"plain", errors.New("boom"), exitError},
		{"usage", usageErrorf("commit: --target is required"), exitUsage},
		{"wrapped usage", fmt.Errorf("x: %w", usageErrorf("y")), exitUsage},
		{"container not found", &notFoundError{"no container"}, exitNotFound},
		{"containerd not found", fmt.Errorf("get: %w", errdefs.ErrNotFound), exitNotFound},
		{"API CONTAINER_NOT_FOUND", &apiError{status: 404, code: "CONTAINER_NOT_FOUND"}, exitNotFound},
		{"API ambiguous CONTAINER_NOT_FOUND", &apiError{status: 409, code: "CONTAINER_NOT_FOUND"}, exitNotFound},
		{"API SNAPSHOT_NOT_FOUND", &apiError{status: 404, code: "SNAPSHOT_NOT_FOUND"}, exitNotFound},
		{"API COMMIT_NOT_FOUND", &apiError{status: 404, code: "COMMIT_NOT_FOUND"}, exitNotFound},
		{"API 404 without code", &apiError{status: 404}, exitError},
		{"API 403", &apiError{status: 403, code: "FORBIDDEN"}, exitPermission},
		{"API 403 with a not-found code", &apiError{status: 403, code: "COMMIT_NOT_FOUND"}, exitPermission},
		{"API invalid reference", &apiError{status: 400, code: "INVALID_REFERENCE"}, exitError},
		{"API pause budget", &apiError{status: 503, code: "PAUSE_BUDGET_EXCEEDED"}, exitError},
		{"socket missing", &connError{err: dial(syscall.ENOENT)}, exitUnreachable},
		{"connection refused", &connError{err: dial(syscall.ECONNREFUSED)}, exitUnreachable},
		{"dial timeout", &connError{err: context.DeadlineExceeded}, exitUnreachable},
		{"socket EACCES", &connError{err: dial(syscall.EACCES)}, exitPermission},
		{"socket EPERM", fmt.Errorf("resolving: %w", &connError{err: dial(syscall.EPERM)}), exitPermission},
		{"containerd permission", fmt.Errorf("list: %w", errdefs.ErrPermissionDenied), exitPermission},
		{"containerd unavailable", fmt.Errorf("list: %w", errdefs.ErrUnavailable), exitUnreachable},
		{"ENOENT that is not a dial", &os.PathError{Op: "open", Path: "/x", Err: syscall.ENOENT}, exitError},
		{"job REGISTRY_AUTH", &jobFailedError{code: "REGISTRY_AUTH"}, exitUnreachable},
		{"job REGISTRY_UNREACHABLE", &jobFailedError{code: "REGISTRY_UNREACHABLE"}, exitUnreachable},
		{"job REGISTRY_ERROR", &jobFailedError{code: "REGISTRY_ERROR"}, exitUnreachable},
		{"job PUSH_FAILED", fmt.Errorf("x: %w", &jobFailedError{code: "PUSH_FAILED"}), exitUnreachable},
		{"job CONTAINERD_UNREACHABLE", &jobFailedError{code: "CONTAINERD_UNREACHABLE"}, exitUnreachable},
		{"job CONVERT_FAILED", &jobFailedError{code: "CONVERT_FAILED"}, exitError},
		{"job BASE_IMAGE_NOT_FOUND", &jobFailedError{code: "BASE_IMAGE_NOT_FOUND"}, exitError},
		{"job INVALID_REFERENCE", &jobFailedError{code: "INVALID_REFERENCE"}, exitError},
		{"job INTERRUPTED", &jobFailedError{code: "INTERRUPTED"}, exitError},
		{"job CAPTURE_FAILED", &jobFailedError{code: "CAPTURE_FAILED"}, exitError},
		{"job PAUSE_BUDGET_EXCEEDED", &jobFailedError{code: "PAUSE_BUDGET_EXCEEDED"}, exitError},
		{"job without a code", &jobFailedError{}, exitError},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := exitCode(tc.err); got != tc.want {
				t.Fatalf("exitCode(%v) = %d, want %d", tc.err, got, tc.want)
			}
		})
	}
}

func TestErrorLine(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{errors.New("boom"), "boom"},
		{&jobFailedError{id: "c1", code: "REGISTRY_AUTH", message: "401 Unauthorized"}, "commit c1 failed: [REGISTRY_AUTH] 401 Unauthorized"},
		{&jobFailedError{id: "c1", message: "boom"}, "commit c1 failed: boom"},
		{&apiError{status: 503, code: "PAUSE_BUDGET_EXCEEDED", message: "freeze did not finish within 1ns"}, "[PAUSE_BUDGET_EXCEEDED] freeze did not finish within 1ns"},
		{&apiError{status: 502, message: "daemon API answered 502 Bad Gateway: oops"}, "daemon API answered 502 Bad Gateway: oops"},
		{&connError{what: "containerd", address: "/x.sock", hint: "see --address", err: errors.New("dial unix /x.sock: connect: connection refused")},
			"cannot reach containerd at /x.sock: dial unix /x.sock: connect: connection refused (see --address)"},
		{&connError{what: "containerd", address: "/x.sock", hint: "see --address", err: &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", syscall.EACCES)}},
			"cannot reach containerd at /x.sock: dial unix: connect: permission denied (the socket is root-only: run seamlessctl as root)"},
	} {
		if got := errorLine(tc.err); got != tc.want {
			t.Errorf("errorLine(%#v) = %q, want %q", tc.err, got, tc.want)
		}
	}
}
