//go:build linux

package main

import (
	"errors"
	"fmt"
	"net/http"
	"syscall"

	"github.com/containerd/errdefs"
)

// Exit codes.
const (
	exitOK         = 0
	exitError      = 1
	exitUsage      = 2
	exitNotFound   = 3
	exitPermission = 4
	// exitUnreachable is a network failure: containerd, the daemon or the
	// registry could not be reached, or the registry refused a push.
	exitUnreachable = 5
)

// usageError is a bad command line.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usageErrorf(format string, args ...any) error {
	return &usageError{fmt.Sprintf(format, args...)}
}

// notFoundError is a container or commit that does not exist; errdefs
// recognises it by its NotFound method.
type notFoundError struct{ msg string }

func (e *notFoundError) Error() string { return e.msg }
func (e *notFoundError) NotFound()     {}

// connError is a socket that could not be dialled.
type connError struct {
	what, address string
	hint          string
	err           error
}

func (e *connError) Error() string {
	msg := fmt.Sprintf("cannot reach %s at %s: %v", e.what, e.address, e.err)
	switch {
	case e.permission():
		msg += " (the socket is root-only: run seamlessctl as root)"
	case e.hint != "":
		msg += " (" + e.hint + ")"
	}
	return msg
}

func (e *connError) permission() bool {
	return errors.Is(e.err, syscall.EACCES) || errors.Is(e.err, syscall.EPERM)
}

func (e *connError) Unwrap() error { return e.err }

// apiError is an error answer of the daemon's API.
type apiError struct {
	status        int
	code, message string
}

func (e *apiError) Error() string { return e.message }

// API error codes that mean "does not exist".
var notFoundCodes = map[string]bool{
	"CONTAINER_NOT_FOUND": true,
	"SNAPSHOT_NOT_FOUND":  true,
	"COMMIT_NOT_FOUND":    true,
}

// jobExitCodes maps the error code of a failed commit job to the exit
// code of wait and commit --wait: this table is the one place that decides.
// Codes not listed (CONVERT_FAILED, BASE_IMAGE_NOT_FOUND,
// INVALID_REFERENCE, INTERRUPTED, CAPTURE_FAILED, PAUSE_BUDGET_EXCEEDED,
// ...) exit 1.
var jobExitCodes = map[string]int{
	// The registry or the network failed: exit 5. Rejected credentials
	// are a registry failure too: 4 is for this node's permissions (the
	// API socket).
	"REGISTRY_AUTH":        exitUnreachable,
	"REGISTRY_UNREACHABLE": exitUnreachable,
	"REGISTRY_ERROR":       exitUnreachable,
	"PUSH_FAILED":          exitUnreachable,
	// The daemon lost containerd: the same exit code as when seamlessctl
	// cannot reach containerd itself.
	"CONTAINERD_UNREACHABLE": exitUnreachable,
}

// jobFailedError is a commit whose job ended in state failed.
type jobFailedError struct {
	id, code, message string
}

func (e *jobFailedError) Error() string {
	if e.code == "" {
		return fmt.Sprintf("commit %s failed: %s", e.id, e.message)
	}
	return fmt.Sprintf("commit %s failed: [%s] %s", e.id, e.code, e.message)
}

// exitCode maps an error to seamlessctl's exit code.
func exitCode(err error) int {
	var (
		usage  *usageError
		conn   *connError
		api    *apiError
		failed *jobFailedError
	)
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &usage):
		return exitUsage
	case errors.As(err, &failed):
		if code, ok := jobExitCodes[failed.code]; ok {
			return code
		}
		return exitError
	case errors.As(err, &conn):
		if conn.permission() {
			return exitPermission
		}
		return exitUnreachable
	case errors.As(err, &api):
		switch {
		case api.status == http.StatusForbidden:
			return exitPermission
		case notFoundCodes[api.code]:
			return exitNotFound
		}
		return exitError
	case errdefs.IsNotFound(err):
		return exitNotFound
	case errdefs.IsPermissionDenied(err), errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return exitPermission
	case errdefs.IsUnavailable(err):
		return exitUnreachable
	}
	return exitError
}

// errorLine is the message seamlessctl prints for err, with the API's
// error code in brackets when there is one.
func errorLine(err error) string {
	var api *apiError
	if errors.As(err, &api) && api.code != "" {
		return fmt.Sprintf("[%s] %v", api.code, err)
	}
	return err.Error()
}
