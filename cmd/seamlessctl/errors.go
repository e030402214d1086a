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
	exitOK          = 0
	exitError       = 1
	exitUsage       = 2
	exitNotFound    = 3
	exitPermission  = 4
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

// exitCode maps an error to seamlessctl's exit code.
func exitCode(err error) int {
	var (
		usage *usageError
		conn  *connError
		api   *apiError
	)
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &usage):
		return exitUsage
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
