//go:build linux

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/seamless-snapshotter/seamless-snapshotter/api"
)

// dialTimeout bounds connecting to a socket; the requests themselves run
// as long as the daemon needs (a commit pre-copies the layer first) or
// until Ctrl-C.
const dialTimeout = 5 * time.Second

// apiClient talks HTTP to the daemon's API on its unix socket.
type apiClient struct {
	address string
	http    *http.Client
}

func newAPIClient(address string) *apiClient {
	c := &apiClient{address: address}
	c.http = &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			conn, err := (&net.Dialer{Timeout: dialTimeout}).DialContext(ctx, "unix", address)
			if err != nil {
				return nil, &connError{what: "the seamless daemon API", address: address,
					hint: "is containerd-seamless-grpc running? see --api-address", err: err}
			}
			return conn, nil
		},
	}}
	return c
}

// do sends a request and returns the body of a successful answer, or an
// *apiError.
func (c *apiClient) do(ctx context.Context, method, path string, body any) ([]byte, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://seamless"+path, rd)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		var conn *connError
		if errors.As(err, &conn) {
			return nil, conn
		}
		return nil, fmt.Errorf("daemon API at %s: %w", c.address, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("daemon API at %s: reading the answer: %w", c.address, err)
	}
	if resp.StatusCode >= 300 {
		var e api.Error
		if json.Unmarshal(data, &e) != nil || e.Error.Message == "" {
			return nil, &apiError{status: resp.StatusCode, message: fmt.Sprintf("daemon API answered %s: %s", resp.Status, strings.TrimSpace(string(data)))}
		}
		return nil, &apiError{status: resp.StatusCode, code: e.Error.Code, message: e.Error.Message}
	}
	return data, nil
}

func (c *apiClient) createCommit(ctx context.Context, req api.CommitRequest) (api.Commit, []byte, error) {
	return decode[api.Commit](c.do(ctx, http.MethodPost, "/api/v1/commits", req))
}

func (c *apiClient) getCommit(ctx context.Context, id string) (api.Commit, []byte, error) {
	return decode[api.Commit](c.do(ctx, http.MethodGet, "/api/v1/commits/"+url.PathEscape(id), nil))
}

type commitList struct {
	Commits []api.Commit `json:"commits"`
}

func (c *apiClient) listCommits(ctx context.Context, q url.Values) ([]api.Commit, []byte, error) {
	list, raw, err := decode[commitList](c.do(ctx, http.MethodGet, "/api/v1/commits?"+q.Encode(), nil))
	return list.Commits, raw, err
}

// decode decodes an answer and also returns it raw, for --output json.
func decode[T any](data []byte, err error) (T, []byte, error) {
	var v T
	if err != nil {
		return v, nil, err
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return v, nil, fmt.Errorf("daemon API answered with unexpected JSON: %v", err)
	}
	return v, data, nil
}

// listContainers returns the containers of a namespace. It dials the
// socket itself first: containerd's gRPC client connects lazily and turns
// every dial error into a bare "unavailable", losing ENOENT and EACCES.
func listContainers(ctx context.Context, address, namespace string) ([]containers.Container, error) {
	path := strings.TrimPrefix(address, "unix://")
	conn, err := (&net.Dialer{Timeout: dialTimeout}).DialContext(ctx, "unix", path)
	if err != nil {
		return nil, &connError{what: "containerd", address: address, hint: "see --address", err: err}
	}
	conn.Close()
	client, err := containerd.New(address, containerd.WithTimeout(dialTimeout))
	if err != nil {
		return nil, fmt.Errorf("containerd at %s: %w", address, err)
	}
	defer client.Close()
	list, err := client.ContainerService().List(namespaces.WithNamespace(ctx, namespace))
	if err != nil {
		return nil, fmt.Errorf("listing the containers of namespace %q: %w", namespace, err)
	}
	return list, nil
}
