// webhook_test.go tests the HTTP surface through a real client against httptest servers (routes,
// static files, traversal attempts written as raw request lines, the body cap, one event row per
// request), the configuration and command line through run, and the built binary's graceful
// shutdown on SIGTERM.
package main

import (
	"bufio"
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// hangGuard bounds waits that only end early when the code is broken; it is never a measurement.
const hangGuard = 30 * time.Second

// mapEnv is a getenv over a fixed map.
func mapEnv(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

// testServer is a server on an httptest listener with its event log.
type testServer struct {
	*httptest.Server
	srv    *server
	cfg    *config
	events *eventLog
	logs   *syncBuffer
	closed bool
}

// newTestServer builds the server of cmdServer from env, with the state directory in a temp dir.
// edit may change the configuration before the server is built.
func newTestServer(t *testing.T, env map[string]string, edit func(cfg *config)) *testServer {
	t.Helper()
	cfg, err := loadConfig(mapEnv(env))
	if err != nil {
		t.Fatalf("loadConfig: %v", err)
	}
	if env["WEBHOOK_STATE_DIR"] == "" {
		cfg.stateDir = t.TempDir()
	}
	if err := cfg.finish(); err != nil {
		t.Fatalf("finish: %v", err)
	}
	if edit != nil {
		edit(cfg)
	}
	logs := &syncBuffer{}
	lg := newLogger(logs)
	events, err := openEventLog(cfg.dbPath, lg)
	if err != nil {
		t.Fatalf("openEventLog: %v", err)
	}
	srv := newServer(cfg, lg, events)
	ts := &testServer{Server: httptest.NewServer(srv), srv: srv, cfg: cfg, events: events, logs: logs}
	t.Cleanup(ts.shutdown)
	return ts
}

// shutdown stops the server after every request finished, then flushes the event log, as
// cmdServer does.
func (ts *testServer) shutdown() {
	if ts.closed {
		return
	}
	ts.closed = true
	ts.Server.Close()
	ts.events.Close()
}

// do sends one request through a real client and returns the response and its body.
func (ts *testServer) do(t *testing.T, method, path string, body io.Reader) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, ts.URL+path, body)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := ts.Client().Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading the body: %v", method, path, err)
	}
	return resp, string(b)
}

// raw writes a request line by hand, so the path reaches the server exactly as written (Go's
// client would clean it), and reads the response.
func (ts *testServer) raw(t *testing.T, method, target string) (*http.Response, string) {
	t.Helper()
	c, err := net.Dial("tcp", ts.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(hangGuard))
	if _, err := fmt.Fprintf(c, "%s %s HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n", method, target); err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(method, "http://test/", nil)
	resp, err := http.ReadResponse(bufio.NewReader(c), req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, target, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// rows closes the server and returns the event_log rows by request id.
func (ts *testServer) rows(t *testing.T) map[string]eventRow {
	t.Helper()
	ts.shutdown()
	out := map[string]eventRow{}
	for _, r := range readRows(t, rawDB(t, ts.cfg.dbPath), "") {
		if _, dup := out[r.requestID]; dup {
			t.Errorf("request id %s has two rows", r.requestID)
		}
		out[r.requestID] = r
	}
	return out
}

func TestRoutes(t *testing.T) {
	ts := newTestServer(t, nil, nil)
	fixed := time.Unix(1712345678, 0)
	ts.srv.now = func() time.Time { return fixed }

	t.Run("health", func(t *testing.T) {
		resp, body := ts.do(t, "GET", "/health", nil)
		if resp.StatusCode != 200 || body != "ok" {
			t.Errorf("GET /health = %d %q, want 200 \"ok\"", resp.StatusCode, body)
		}
		if resp.Header.Get("X-Request-Id") == "" {
			t.Error("no X-Request-Id header")
		}
	})
	t.Run("sse hello", func(t *testing.T) {
		resp, body := ts.do(t, "GET", "/sse/hello", nil)
		if resp.StatusCode != 200 {
			t.Fatalf("GET /sse/hello = %d", resp.StatusCode)
		}
		if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
			t.Errorf("Content-Type %q, want text/event-stream", ct)
		}
		if !strings.HasSuffix(body, "\n\n") {
			t.Errorf("event %q does not end with a blank line", body)
		}
		fields := map[string]string{}
		for _, line := range strings.Split(strings.TrimRight(body, "\n"), "\n") {
			k, v, ok := strings.Cut(line, ": ")
			if !ok {
				t.Fatalf("malformed event line %q in %q", line, body)
			}
			fields[k] = v
		}
		if fields["event"] != "hello" {
			t.Errorf("event %q, want hello", fields["event"])
		}
		var data struct {
			Message   *string `json:"message"`
			Timestamp *int64  `json:"timestamp"`
		}
		if err := json.Unmarshal([]byte(fields["data"]), &data); err != nil {
			t.Fatalf("data %q: %v", fields["data"], err)
		}
		if data.Message == nil || *data.Message == "" || data.Timestamp == nil || *data.Timestamp != fixed.Unix() {
			t.Errorf("data %s, want a message and timestamp %d", fields["data"], fixed.Unix())
		}
	})
	for _, tc := range []struct {
		method, path string
		status       int
		allow        string
	}{
		{"GET", "/nope", 404, ""},
		{"GET", "/healthz", 404, ""},
		{"GET", "/health/extra", 404, ""},
		{"POST", "/nope", 404, ""},
		{"POST", "/health", 405, "GET"},
		{"DELETE", "/health", 405, "GET"},
		{"PUT", "/sse/hello", 405, "GET"},
		{"POST", "/", 405, "GET"},
		{"POST", "/assets/app.js", 405, "GET"},
	} {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			resp, _ := ts.do(t, tc.method, tc.path, nil)
			if resp.StatusCode != tc.status {
				t.Errorf("%s %s = %d, want %d", tc.method, tc.path, resp.StatusCode, tc.status)
			}
			if allow := resp.Header.Get("Allow"); !strings.Contains(allow, tc.allow) || (tc.allow == "") != (allow == "") {
				t.Errorf("Allow: %q, want it to contain %q", allow, tc.allow)
			}
		})
	}
}

func TestStaticWithoutBundle(t *testing.T) {
	ts := newTestServer(t, nil, nil)
	for _, p := range []string{"/", "/index.html"} {
		resp, body := ts.do(t, "GET", p, nil)
		if resp.StatusCode != 404 || strings.TrimSpace(body) != "web ui not built" {
			t.Errorf("GET %s without a bundle = %d %q, want 404 \"web ui not built\"", p, resp.StatusCode, body)
		}
	}
	for _, p := range []string{"/assets/app.js", "/favicon.ico", "/vite.svg"} {
		if resp, _ := ts.do(t, "GET", p, nil); resp.StatusCode != 404 {
			t.Errorf("GET %s without a bundle = %d, want 404", p, resp.StatusCode)
		}
	}
}

// secretContent is in a file beside the dist directory; no request may ever return it.
const secretContent = "TOP-SECRET-CONTENT-7f3a"

// distFixture lays out dir/dist (the bundle) and dir/secret.txt, with symlinks inside the
// bundle that point out of it.
func distFixture(t *testing.T) (dist string, files map[string]string) {
	t.Helper()
	dir := t.TempDir()
	dist = filepath.Join(dir, "dist")
	files = map[string]string{
		"index.html":     "<!doctype html><title>ui</title>",
		"assets/app.js":  "console.log('app')",
		"assets/app.css": "body{color:red}",
		"favicon.ico":    "\x00\x00\x01\x00icon",
		"vite.svg":       `<svg xmlns="http://www.w3.org/2000/svg"></svg>`,
	}
	for name, body := range files {
		p := filepath.Join(dist, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	secret := filepath.Join(dir, "secret.txt")
	if err := os.WriteFile(secret, []byte(secretContent), 0o644); err != nil {
		t.Fatal(err)
	}
	for link, target := range map[string]string{
		"assets/leak.txt":     "../../secret.txt",
		"assets/leak-abs.txt": secret,
		"assets/up":           "../..",
		"leak.ico":            "../secret.txt",
	} {
		if err := os.Symlink(target, filepath.Join(dist, link)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(dist, "assets", "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	return dist, files
}

func TestStaticBundle(t *testing.T) {
	dist, files := distFixture(t)
	ts := newTestServer(t, map[string]string{"WEBHOOK_WEB_DIST": dist}, nil)
	for _, tc := range []struct {
		path, file, ctype string
	}{
		{"/", "index.html", "text/html; charset=utf-8"},
		{"/index.html", "index.html", "text/html; charset=utf-8"},
		{"/assets/app.js", "assets/app.js", "text/javascript; charset=utf-8"},
		{"/assets/app.css", "assets/app.css", "text/css; charset=utf-8"},
		{"/favicon.ico", "favicon.ico", "image/x-icon"},
		{"/vite.svg", "vite.svg", "image/svg+xml"},
	} {
		t.Run(tc.path, func(t *testing.T) {
			resp, body := ts.do(t, "GET", tc.path, nil)
			if resp.StatusCode != 200 || body != files[tc.file] {
				t.Errorf("GET %s = %d %q, want 200 %q", tc.path, resp.StatusCode, body, files[tc.file])
			}
			if ct := resp.Header.Get("Content-Type"); ct != tc.ctype {
				t.Errorf("GET %s Content-Type %q, want %q", tc.path, ct, tc.ctype)
			}
			if n := resp.Header.Get("X-Content-Type-Options"); n != "nosniff" {
				t.Errorf("GET %s X-Content-Type-Options %q, want nosniff", tc.path, n)
			}

			resp, body = ts.do(t, "HEAD", tc.path, nil)
			if resp.StatusCode != 200 || body != "" {
				t.Errorf("HEAD %s = %d with body %q, want 200 and no body", tc.path, resp.StatusCode, body)
			}
			if ct := resp.Header.Get("Content-Type"); ct != tc.ctype {
				t.Errorf("HEAD %s Content-Type %q, want %q", tc.path, ct, tc.ctype)
			}
			if cl := resp.Header.Get("Content-Length"); cl != strconv.Itoa(len(files[tc.file])) {
				t.Errorf("HEAD %s Content-Length %q, want %d", tc.path, cl, len(files[tc.file]))
			}
		})
	}
	// Only the UI's own paths are served, not every file in the dist directory.
	for _, p := range []string{"/assets/", "/assets/sub/", "/assets/sub", "/assets/missing.js", "/other.html", "/leak.ico"} {
		t.Run(p, func(t *testing.T) {
			resp, body := ts.do(t, "GET", p, nil)
			if resp.StatusCode != 404 {
				t.Errorf("GET %s = %d %q, want 404", p, resp.StatusCode, body)
			}
		})
	}
}

func TestStaticTraversal(t *testing.T) {
	dist, _ := distFixture(t)
	ts := newTestServer(t, map[string]string{"WEBHOOK_WEB_DIST": dist}, nil)
	for _, target := range []string{
		"/assets/../../etc/passwd",
		"/assets/../../secret.txt",
		"/assets/../assets/../../secret.txt",
		"/assets/%2e%2e/%2e%2e/secret.txt",
		"/assets/%2E%2E/%2E%2E/secret.txt",
		"/assets/..%2f..%2fsecret.txt",
		"/assets/%2e%2e%2f%2e%2e%2fsecret.txt",
		"/assets/..%5c..%5csecret.txt",
		"/assets/.%2e/.%2e/secret.txt",
		"/assets//../../secret.txt",
		"/assets/./../../secret.txt",
		"/../secret.txt",
		"/%2e%2e/secret.txt",
		"/index.html/../../secret.txt",
		"/assets/leak.txt",
		"/assets/leak-abs.txt",
		"/assets/up/secret.txt",
		"/assets/up/dist/index.html",
		"/assets/%00",
	} {
		t.Run(target, func(t *testing.T) {
			for _, method := range []string{"GET", "HEAD"} {
				resp, body := ts.raw(t, method, target)
				if resp.StatusCode != 404 {
					t.Errorf("%s %s = %d, want 404", method, target, resp.StatusCode)
				}
				if strings.Contains(body, secretContent) || strings.Contains(body, "root:") {
					t.Fatalf("%s %s served a file outside the dist directory: %q", method, target, body)
				}
			}
		})
	}
}

func TestBodyCap(t *testing.T) {
	ts := newTestServer(t, map[string]string{"WEBHOOK_MAX_BODY_BYTES": "16"}, nil)
	if ts.cfg.maxBodyBytes != 16 {
		t.Fatalf("maxBodyBytes = %d, want 16 from WEBHOOK_MAX_BODY_BYTES", ts.cfg.maxBodyBytes)
	}
	for _, path := range []string{"/health", "/github-package-update/demo", "/nope"} {
		resp, _ := ts.do(t, "POST", path, strings.NewReader(strings.Repeat("x", 17)))
		if resp.StatusCode != http.StatusRequestEntityTooLarge {
			t.Errorf("POST %s with 17 bytes = %d, want 413", path, resp.StatusCode)
		}
	}
	// At the cap the body is accepted and the route answers as usual.
	if resp, _ := ts.do(t, "POST", "/health", strings.NewReader(strings.Repeat("x", 16))); resp.StatusCode != 405 {
		t.Errorf("POST /health with 16 bytes = %d, want 405", resp.StatusCode)
	}
}

// TestRequestRows checks that every request, whatever its outcome, leaves exactly one event_log
// row with its status and action, and that query secrets never reach the row or the log.
func TestRequestRows(t *testing.T) {
	dist, _ := distFixture(t)
	ts := newTestServer(t, map[string]string{"WEBHOOK_WEB_DIST": dist, "WEBHOOK_MAX_BODY_BYTES": "16"}, nil)
	type want struct {
		method, target string
		raw            bool
		body           string
		status         int
		action         string
	}
	cases := []want{
		{method: "GET", target: "/health", status: 200, action: "health"},
		{method: "GET", target: "/health?token=s3cret&x=1", status: 200, action: "health"},
		{method: "GET", target: "/health?access_token=s3cret", status: 200, action: "health"},
		{method: "GET", target: "/sse/hello", status: 200, action: "sse-hello"},
		{method: "GET", target: "/", status: 200, action: "static"},
		{method: "HEAD", target: "/assets/app.js", status: 200, action: "static"},
		{method: "GET", target: "/assets/missing.js", status: 404, action: "static"},
		{method: "GET", target: "/nope?token=s3cret", status: 404, action: "not-found"},
		{method: "POST", target: "/health", status: 405, action: "method-not-allowed"},
		{method: "POST", target: "/health?token=s3cret", body: strings.Repeat("x", 100), status: 413, action: "body-too-large"},
		{method: "GET", target: "/assets/../../secret.txt?token=s3cret", raw: true, status: 404, action: "not-found"},
		{method: "GET", target: "/assets/%2e%2e/%2e%2e/secret.txt", raw: true, status: 404, action: "not-found"},
	}
	ids := make([]string, len(cases))
	for i, c := range cases {
		var resp *http.Response
		if c.raw {
			resp, _ = ts.raw(t, c.method, c.target)
		} else {
			var body io.Reader
			if c.body != "" {
				body = strings.NewReader(c.body)
			}
			resp, _ = ts.do(t, c.method, c.target, body)
		}
		if resp.StatusCode != c.status {
			t.Errorf("%s %s = %d, want %d", c.method, c.target, resp.StatusCode, c.status)
		}
		ids[i] = resp.Header.Get("X-Request-Id")
		if ids[i] == "" {
			t.Fatalf("%s %s: no X-Request-Id", c.method, c.target)
		}
	}
	rows := ts.rows(t)
	if len(rows) != len(cases) {
		t.Errorf("%d rows for %d requests", len(rows), len(cases))
	}
	for i, c := range cases {
		r, ok := rows[ids[i]]
		if !ok {
			t.Errorf("%s %s: no row for request id %s", c.method, c.target, ids[i])
			continue
		}
		path, _, _ := strings.Cut(c.target, "?")
		if r.method != c.method || r.status != c.status || r.action != c.action {
			t.Errorf("%s %s: row method=%s status=%d action=%s, want %s %d %s",
				c.method, c.target, r.method, r.status, r.action, c.method, c.status, c.action)
		}
		var meta map[string]any
		if err := json.Unmarshal([]byte(r.meta), &meta); err != nil {
			t.Errorf("%s %s: meta %q is not JSON: %v", c.method, c.target, r.meta, err)
			continue
		}
		if !c.raw && (!r.path.Valid || r.path.String != path || meta["path"] != path) {
			t.Errorf("%s %s: row path %v, meta path %v, want %s", c.method, c.target, r.path, meta["path"], path)
		}
		if strings.Contains(c.target, "token=") {
			if strings.Contains(r.meta, "s3cret") || !strings.Contains(r.meta, "REDACTED") {
				t.Errorf("%s %s: meta %s does not redact the token", c.method, c.target, r.meta)
			}
		}
		if r.durationMS < 0 || r.ts <= 0 {
			t.Errorf("%s %s: duration_ms %d, ts %d", c.method, c.target, r.durationMS, r.ts)
		}
	}
	if strings.Contains(ts.logs.String(), "s3cret") {
		t.Errorf("a log line contains the token:\n%s", ts.logs.String())
	}
}

// configuration and command line

// runCLI runs the whole program in-process. A server that fails to exit is a test failure,
// not a hang.
func runCLI(t *testing.T, env map[string]string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb syncBuffer
	done := make(chan int, 1)
	go func() { done <- run(args, mapEnv(env), &out, &errb) }()
	select {
	case code = <-done:
	case <-time.After(hangGuard):
		t.Fatalf("run(%q) did not return; stderr:\n%s", args, errb.String())
	}
	return code, out.String(), errb.String()
}

func TestCommandLine(t *testing.T) {
	for _, tc := range []struct {
		args       []string
		code       int
		stdout     string // substring
		stderr     string // substring
		wantStderr bool
	}{
		{args: []string{"help"}, code: 0, stdout: "usage: webhook-auto-update"},
		{args: []string{"-h"}, code: 0, stdout: "usage: webhook-auto-update"},
		{args: []string{"--help"}, code: 0, stdout: "usage: webhook-auto-update"},
		{args: []string{"version"}, code: 0, stdout: "webhook-auto-update "},
		{args: []string{"--version"}, code: 0, stdout: "webhook-auto-update "},
		{args: []string{}, code: 2, stderr: "usage: webhook-auto-update", wantStderr: true},
		{args: []string{"frobnicate"}, code: 2, stderr: "usage: webhook-auto-update", wantStderr: true},
		{args: []string{"--frobnicate"}, code: 2, stderr: `"--frobnicate"`, wantStderr: true},
		{args: []string{"server", "-h"}, code: 0, stdout: "usage: webhook-auto-update server"},
		{args: []string{"--server", "-h"}, code: 0, stdout: "usage: webhook-auto-update server"},
		{args: []string{"--server", "--help"}, code: 0, stdout: "usage: webhook-auto-update server"},
		{args: []string{"server", "--bogus"}, code: 2, stderr: "usage: webhook-auto-update server", wantStderr: true},
		{args: []string{"server", "--listen"}, code: 2, stderr: "listen", wantStderr: true},
		{args: []string{"server", "--listen", "127.0.0.1:0", "extra"}, code: 2, stderr: `"extra"`, wantStderr: true},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			code, stdout, stderr := runCLI(t, map[string]string{"WEBHOOK_STATE_DIR": t.TempDir()}, tc.args...)
			if code != tc.code {
				t.Errorf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, stdout, stderr)
			}
			if !strings.Contains(stdout, tc.stdout) || !strings.Contains(stderr, tc.stderr) {
				t.Errorf("stdout %q, stderr %q; want them to contain %q and %q", stdout, stderr, tc.stdout, tc.stderr)
			}
			if !tc.wantStderr && stderr != "" {
				t.Errorf("unexpected stderr %q", stderr)
			}
			if tc.code != 0 && stdout != "" {
				t.Errorf("a failing command wrote to stdout: %q", stdout)
			}
		})
	}
}

func TestInvalidVariables(t *testing.T) {
	for _, tc := range []struct{ name, value string }{
		{"WEBHOOK_LIMIT1_COUNT", "abc"},
		{"WEBHOOK_LIMIT1_WINDOW", "0"},
		{"WEBHOOK_LIMIT2_COUNT", "-1"},
		{"WEBHOOK_LIMIT2_WINDOW", "1h"},
		{"AUTO_UPDATE_INTERVAL_SECS", "x"},
		{"WEBHOOK_MAX_BODY_BYTES", "0"},
		{"WEBHOOK_MAX_BODY_BYTES", "5MiB"},
		{"WEBHOOK_SCHEDULER_MAX_TICKS", "-3"},
		{"WEBHOOK_IMAGE_LIMIT_COUNT", "1.5"},
		{"WEBHOOK_IMAGE_LIMIT_WINDOW", "0"},
		{"WEBHOOK_PULL_ATTEMPTS", "three"},
		{"WEBHOOK_PULL_RETRY_SECS", "-5"},
		{"WEBHOOK_PULL_TIMEOUT_SECS", "99999999999999999999"},
		{"WEBHOOK_COMMAND_TIMEOUT_SECS", "0"},
		{"WEBHOOK_DB_URL", ":memory:"},
	} {
		t.Run(tc.name+"="+tc.value, func(t *testing.T) {
			env := map[string]string{tc.name: tc.value}
			code, stdout, stderr := runCLI(t, env, "server", "--listen", "127.0.0.1:0", "--state-dir", t.TempDir())
			if code != 2 {
				t.Fatalf("exit %d, want 2\nstderr: %s", code, stderr)
			}
			if !strings.Contains(stderr, tc.name) || !strings.Contains(stderr, tc.value) {
				t.Errorf("stderr %q does not name %s and its value %q", stderr, tc.name, tc.value)
			}
			if lines := strings.Count(stderr, "\n"); lines != 1 || !strings.HasPrefix(stderr, "<3>") {
				t.Errorf("stderr %q, want one error line with the <3> priority", stderr)
			}
			if stdout != "" {
				t.Errorf("stdout %q, want nothing", stdout)
			}
		})
	}
}

// TestHugeSecondsDoNotWrap checks that a number of seconds too large for a time.Duration is
// refused rather than wrapped into a negative or tiny interval, which would turn a window that
// is meant to be very long into no limit at all.
func TestHugeSecondsDoNotWrap(t *testing.T) {
	for _, name := range []string{"WEBHOOK_LIMIT1_WINDOW", "WEBHOOK_LIMIT2_WINDOW", "WEBHOOK_IMAGE_LIMIT_WINDOW",
		"AUTO_UPDATE_INTERVAL_SECS", "WEBHOOK_PULL_TIMEOUT_SECS", "WEBHOOK_COMMAND_TIMEOUT_SECS"} {
		for _, value := range []string{"18446744074"} { // 2^64 ns in seconds: wraps to 290ms
			t.Run(name+"="+value, func(t *testing.T) {
				cfg, err := loadConfig(mapEnv(map[string]string{name: value}))
				if err != nil {
					if !strings.Contains(err.Error(), name) {
						t.Errorf("error %q does not name %s", err, name)
					}
					return
				}
				for _, d := range []time.Duration{cfg.autoUpdateLimits[0].span, cfg.autoUpdateLimits[1].span,
					cfg.imageLimit.span, cfg.interval, cfg.pullTimeout, cfg.commandTimeout} {
					if d < time.Second {
						t.Fatalf("%s=%s accepted as a duration of %v", name, value, d)
					}
				}
			})
		}
	}
}

func TestServerCannotStart(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	newer := filepath.Join(dir, "newer.db")
	db := rawDB(t, newer)
	if _, err := db.Exec(`CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL);
		INSERT INTO schema_migrations VALUES (999, 'future', 0)`); err != nil {
		t.Fatal(err)
	}
	db.Close()
	for _, tc := range []struct {
		name string
		env  map[string]string
		args []string
		code int
		want []string
	}{
		{"state dir under a file", map[string]string{"WEBHOOK_STATE_DIR": filepath.Join(file, "state")}, nil,
			1, []string{"WEBHOOK_STATE_DIR", filepath.Join(file, "state")}},
		{"state dir flag under a file", nil, []string{"--state-dir", filepath.Join(file, "state")},
			1, []string{"--state-dir", filepath.Join(file, "state")}},
		{"empty state dir", nil, []string{"--state-dir", ""}, 2, []string{"WEBHOOK_STATE_DIR"}},
		{"database under a file", map[string]string{"WEBHOOK_DB_URL": "sqlite://" + filepath.Join(file, "db", "events.db")},
			[]string{"--state-dir", filepath.Join(dir, "state1")}, 1, []string{filepath.Join(file, "db")}},
		{"database flag under a file", nil, []string{"--state-dir", filepath.Join(dir, "state2"), "--db", filepath.Join(file, "events.db")},
			1, []string{filepath.Join(file, "events.db")}},
		{"newer database", map[string]string{"WEBHOOK_DB_URL": newer},
			[]string{"--state-dir", filepath.Join(dir, "state3")}, 1, []string{"newer", newer}},
		{"address in use", nil, []string{"--state-dir", filepath.Join(dir, "state4"), "--listen", busyAddr(t)},
			1, []string{"--listen"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"server", "--listen", "127.0.0.1:0"}, tc.args...)
			code, _, stderr := runCLI(t, tc.env, args...)
			if code != tc.code {
				t.Fatalf("exit %d, want %d\nstderr: %s", code, tc.code, stderr)
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr %q does not mention %q", stderr, w)
				}
			}
		})
	}
}

// busyAddr returns an address another listener holds for the rest of the test.
func busyAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l.Addr().String()
}

func TestFlagsOverrideEnvironment(t *testing.T) {
	env := map[string]string{"WEBHOOK_STATE_DIR": "/from/env", "WEBHOOK_DB_URL": "sqlite://env.db"}
	c := &cli{getenv: mapEnv(env), stdout: io.Discard, stderr: io.Discard, log: newLogger(io.Discard)}
	var listen string
	cfg, rest, code := c.setup("test", "usage", []string{"pos", "--state-dir", "/from/flag", "--db", "flag.db", "--listen", "[::1]:9"},
		func(fs *flag.FlagSet, cfg *config) { fs.StringVar(&listen, "listen", cfg.listen, "") })
	if code >= 0 {
		t.Fatalf("setup exit %d", code)
	}
	if cfg.stateDir != "/from/flag" || cfg.dbPath != "/from/flag/flag.db" || listen != "[::1]:9" {
		t.Errorf("stateDir %q, dbPath %q, listen %q", cfg.stateDir, cfg.dbPath, listen)
	}
	if cfg.webDist != "/from/flag/web/dist" || cfg.debugPayloadPath != "/from/flag/last_payload.bin" {
		t.Errorf("webDist %q, debugPayloadPath %q: not derived from the flag's state dir", cfg.webDist, cfg.debugPayloadPath)
	}
	if !reflect.DeepEqual(rest, []string{"pos"}) {
		t.Errorf("rest %q, want [pos]", rest)
	}
}

func TestLoadConfigDefaults(t *testing.T) {
	cfg, err := loadConfig(mapEnv(nil))
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.finish(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name      string
		got, want any
	}{
		{"stateDir", cfg.stateDir, "/srv/pod-upgrade-trigger"},
		{"dbPath", cfg.dbPath, "/srv/pod-upgrade-trigger/data/pod-upgrade-trigger.db"},
		{"listen", cfg.listen, "127.0.0.1:8088"},
		{"autoUpdateUnit", cfg.autoUpdateUnit, "podman-auto-update.service"},
		{"webDist", cfg.webDist, "/srv/pod-upgrade-trigger/web/dist"},
		{"debugPayloadPath", cfg.debugPayloadPath, "/srv/pod-upgrade-trigger/last_payload.bin"},
		{"maxBodyBytes", cfg.maxBodyBytes, int64(5 << 20)},
		{"interval", cfg.interval, 900 * time.Second},
		{"maxTicks", cfg.maxTicks, 0},
		{"limit1", cfg.autoUpdateLimits[0], window{2, 600 * time.Second}},
		{"limit2", cfg.autoUpdateLimits[1], window{10, 18000 * time.Second}},
		{"imageLimit", cfg.imageLimit, window{60, time.Hour}},
		{"pullAttempts", cfg.pullAttempts, 3},
		{"pullRetryDelay", cfg.pullRetryDelay, 5 * time.Second},
	} {
		if !reflect.DeepEqual(tc.got, tc.want) {
			t.Errorf("default %s = %v, want %v", tc.name, tc.got, tc.want)
		}
	}
	for _, d := range []time.Duration{cfg.readHeaderTimeout, cfg.readTimeout, cfg.writeTimeout, cfg.idleTimeout} {
		if d <= 0 {
			t.Errorf("an http.Server timeout is unset: a slow client could hold a connection forever")
		}
	}

	cfg, err = loadConfig(mapEnv(map[string]string{
		"WEBHOOK_TOKEN": " tok ", "GITHUB_ALLOWED_EVENTS": "package, registry_package,,",
		"WEBHOOK_MANUAL_UNITS": "a.service,\nb\r\n, c ",
	}))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.token != "tok" || cfg.manualToken != "tok" {
		t.Errorf("token %q, manual token %q; want both \"tok\" (the manual token defaults to WEBHOOK_TOKEN)", cfg.token, cfg.manualToken)
	}
	if !reflect.DeepEqual(cfg.allowedEvents, []string{"package", "registry_package"}) {
		t.Errorf("allowedEvents %q", cfg.allowedEvents)
	}
	if !reflect.DeepEqual(cfg.manualUnits, []string{"a.service", "b", "c"}) {
		t.Errorf("manualUnits %q", cfg.manualUnits)
	}
}

func TestParseInterspersed(t *testing.T) {
	for _, tc := range []struct {
		name    string
		args    []string
		rest    []string
		x       string
		v       bool
		wantErr error // nil, flag.ErrHelp, or errAny
	}{
		{name: "empty", args: nil, rest: nil},
		{name: "positional only", args: []string{"a", "b"}, rest: []string{"a", "b"}},
		{name: "flags first", args: []string{"-x", "1", "-v", "a"}, rest: []string{"a"}, x: "1", v: true},
		{name: "flags after positionals", args: []string{"a", "-x", "1", "b", "--v"}, rest: []string{"a", "b"}, x: "1", v: true},
		{name: "x=value form", args: []string{"a", "--x=2"}, rest: []string{"a"}, x: "2"},
		{name: "terminator", args: []string{"a", "--", "-x", "b"}, rest: []string{"a", "-x", "b"}},
		{name: "terminator first", args: []string{"--", "-v"}, rest: []string{"-v"}},
		{name: "flag after terminator not parsed", args: []string{"-v", "--", "-x", "3"}, rest: []string{"-x", "3"}, v: true},
		{name: "single dash is positional", args: []string{"-", "-v"}, rest: []string{"-"}, v: true},
		{name: "unknown flag", args: []string{"a", "-y"}, wantErr: errAny},
		{name: "missing value", args: []string{"a", "-x"}, wantErr: errAny},
		{name: "help", args: []string{"a", "-h"}, wantErr: flag.ErrHelp},
		// "--" as the value of a flag is a value, not the end of the flags.
		{name: "terminator as a value", args: []string{"-x", "--", "a", "-v"}, rest: []string{"a"}, x: "--", v: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := flag.NewFlagSet("t", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			x := fs.String("x", "", "")
			v := fs.Bool("v", false, "")
			rest, err := parseInterspersed(fs, tc.args)
			switch {
			case tc.wantErr == errAny:
				if err == nil {
					t.Fatalf("no error, rest %q", rest)
				}
				return
			case tc.wantErr != nil:
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err %v, want %v", err, tc.wantErr)
				}
				return
			case err != nil:
				t.Fatalf("err %v", err)
			}
			if !reflect.DeepEqual(rest, tc.rest) || *x != tc.x || *v != tc.v {
				t.Errorf("rest %q x %q v %v; want %q %q %v", rest, *x, *v, tc.rest, tc.x, tc.v)
			}
		})
	}
}

var errAny = errors.New("any error")

// the built binary

// buildServerBinary is the binary built once per test run (buildBinary in main_test.go); -short
// skips the tests that need it.
func buildServerBinary(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds the binary")
	}
	return buildBinary(t)
}

// freeLoopbackAddr returns a loopback address that was free a moment ago.
func freeLoopbackAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// serverProc is a started server process whose stderr is collected line by line.
type serverProc struct {
	cmd   *exec.Cmd
	errb  syncBuffer
	lines chan string
	done  chan error
	err   error
	once  sync.Once
}

// startServerProc starts argv (the binary, or a wrapper running it) with a clean environment plus env.
func startServerProc(t *testing.T, bin string, args, env []string, files []*os.File) *serverProc {
	t.Helper()
	return startProc(t, exec.Command(bin, append([]string{"server"}, args...)...), env, files)
}

func startProc(t *testing.T, cmd *exec.Cmd, env []string, files []*os.File) *serverProc {
	t.Helper()
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir()}, env...)
	cmd.ExtraFiles = files
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &serverProc{cmd: cmd, lines: make(chan string, 1000), done: make(chan error, 1)}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			p.errb.Write([]byte(sc.Text() + "\n"))
			select {
			case p.lines <- sc.Text():
			default:
			}
		}
		p.done <- cmd.Wait()
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			cmd.Process.Kill()
			p.wait()
		}
	})
	return p
}

func (p *serverProc) stderr() string { return p.errb.String() }

// wait returns the exit error of the process, failing loudly only through the caller.
func (p *serverProc) wait() error {
	p.once.Do(func() {
		select {
		case p.err = <-p.done:
		case <-time.After(hangGuard):
			p.cmd.Process.Kill()
			p.err = fmt.Errorf("did not exit after %s: %w", hangGuard, <-p.done)
		}
	})
	return p.err
}

// waitLog waits for a stderr line containing s.
func (p *serverProc) waitLog(t *testing.T, s string) string {
	t.Helper()
	timeout := time.After(hangGuard)
	for {
		select {
		case line := <-p.lines:
			if strings.Contains(line, s) {
				return line
			}
		case <-timeout:
			t.Fatalf("no log line with %q; stderr:\n%s", s, p.stderr())
		}
	}
}

// TestGracefulShutdown runs the built binary, once on --listen and once socket-activated the way
// systemd does it (fd 3, LISTEN_PID of the server process), and checks that SIGTERM lets a
// response in flight finish, exits 0 and leaves every request's row in the database. The
// request in flight downloads a static file much larger than the socket buffers and stops
// reading, so its handler is still writing when the signal arrives.
func TestGracefulShutdown(t *testing.T) {
	bin := buildServerBinary(t)
	for _, mode := range []string{"listen", "socket-activated"} {
		t.Run(mode, func(t *testing.T) {
			state := t.TempDir()
			big := bytes.Repeat([]byte("0123456789abcdef"), 32<<20/16) // 32 MiB
			bigPath := filepath.Join(state, "web", "dist", "assets", "big.js")
			if err := os.MkdirAll(filepath.Dir(bigPath), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(bigPath, big, 0o600); err != nil {
				t.Fatal(err)
			}
			var p *serverProc
			var addr string
			switch mode {
			case "listen":
				addr = freeLoopbackAddr(t)
				p = startServerProc(t, bin, []string{"--listen", addr, "--state-dir", state}, nil, nil)
			case "socket-activated":
				l, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				addr = l.Addr().String()
				f, err := l.(*net.TCPListener).File()
				if err != nil {
					t.Fatal(err)
				}
				// The shell learns its own pid and execs the server, which keeps it. --listen
				// names a port nobody may use: it must be ignored.
				cmd := exec.Command("/bin/sh", "-c", `LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"`,
					bin, "server", "--listen", "192.0.2.1:1", "--state-dir", state)
				p = startProc(t, cmd, []string{"LISTEN_FDS=1", "LISTEN_FDNAMES=web"}, []*os.File{f})
				f.Close()
				l.Close()
			}
			line := p.waitLog(t, "listening on")
			if !strings.Contains(line, addr) {
				t.Fatalf("server says %q, want it to listen on %s", line, addr)
			}
			dial := func() net.Conn {
				t.Helper()
				c, err := net.Dial("tcp", addr)
				if err != nil {
					t.Fatal(err)
				}
				c.SetDeadline(time.Now().Add(hangGuard))
				return c
			}

			ok := 0
			for i := 0; i < 3; i++ {
				c := dial()
				fmt.Fprint(c, "GET /health?token=s3cret HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
				resp, err := http.ReadResponse(bufio.NewReader(c), nil)
				if err != nil {
					t.Fatalf("/health: %v\nstderr:\n%s", err, p.stderr())
				}
				body, _ := io.ReadAll(resp.Body)
				c.Close()
				if resp.StatusCode != 200 || string(body) != "ok" {
					t.Fatalf("/health = %d %q", resp.StatusCode, body)
				}
				ok++
			}

			inflight := dial()
			defer inflight.Close()
			fmt.Fprint(inflight, "GET /assets/big.js HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
			br := bufio.NewReader(inflight)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("big.js: %v", err)
			}
			if resp.StatusCode != 200 {
				t.Fatalf("big.js = %d", resp.StatusCode)
			}

			if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			p.waitLog(t, "shutting down")
			// Wait until the listener is closed: from then on the server is shutting down, and a
			// server that dropped its connections would have dropped this one.
			deadline := time.Now().Add(hangGuard)
			for {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					break
				}
				c.Close()
				if time.Now().After(deadline) {
					t.Fatal("the listener stayed open after SIGTERM")
				}
				time.Sleep(10 * time.Millisecond)
			}
			got, err := io.ReadAll(resp.Body)
			if err != nil || !bytes.Equal(got, big) {
				t.Fatalf("response in flight at SIGTERM: read %d of %d bytes, %v\nstderr:\n%s", len(got), len(big), err, p.stderr())
			}

			if err := p.wait(); err != nil {
				t.Fatalf("exit after SIGTERM: %v (want status 0)\nstderr:\n%s", err, p.stderr())
			}
			if strings.Contains(p.stderr(), "<3>") || strings.Contains(p.stderr(), "s3cret") {
				t.Errorf("errors or a secret logged:\n%s", p.stderr())
			}
			db := rawDB(t, filepath.Join(state, "data", "pod-upgrade-trigger.db"))
			if n := queryInt(t, db, `SELECT count(*) FROM event_log WHERE action = 'health' AND status = 200 AND meta NOT LIKE '%s3cret%'`); n != ok {
				t.Errorf("%d health rows after shutdown, want %d", n, ok)
			}
			if n := queryInt(t, db, `SELECT count(*) FROM event_log WHERE path = '/assets/big.js' AND status = 200`); n != 1 {
				t.Errorf("%d rows for the request in flight, want 1", n)
			}
			if n := queryInt(t, db, `SELECT count(*) FROM event_log`); n != ok+1 {
				t.Errorf("%d rows in all, want %d", n, ok+1)
			}
		})
	}
}

func TestServerOnInterrupt(t *testing.T) {
	bin := buildServerBinary(t)
	addr := freeLoopbackAddr(t)
	p := startServerProc(t, bin, []string{"--listen", addr, "--state-dir", t.TempDir()}, nil, nil)
	p.waitLog(t, "listening on")
	if err := p.cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	if err := p.wait(); err != nil {
		t.Fatalf("exit after SIGINT: %v\nstderr:\n%s", err, p.stderr())
	}
}

// GitHub deliveries end to end, on the real rig.

// e2eServer is the built binary serving on a free loopback port, as an operator runs it.
type e2eServer struct {
	url    string
	state  string
	secret string
	log    *bytes.Buffer
	db     *sql.DB
}

// startE2EServer starts `webhook-auto-update server` with the given extra environment and stops
// it (SIGTERM, expecting exit 0) when the test ends.
func startE2EServer(t *testing.T, extraEnv ...string) *e2eServer {
	t.Helper()
	bin := buildBinary(t)
	port, err := rigFreePort()
	if err != nil {
		t.Fatal(err)
	}
	s := &e2eServer{url: fmt.Sprintf("http://127.0.0.1:%d", port), state: t.TempDir(),
		secret: "e2e secret " + rigUniqueName(t, "s"), log: &bytes.Buffer{}}
	cmd := exec.Command(bin, "server", "--listen", fmt.Sprintf("127.0.0.1:%d", port), "--state-dir", s.state)
	cmd.Env = append(os.Environ(), "GITHUB_WEBHOOK_SECRET="+s.secret, "WEBHOOK_HEALTH_SETTLE_SECS=2",
		"WEBHOOK_PULL_RETRY_SECS=1")
	cmd.Env = append(cmd.Env, extraEnv...)
	cmd.Stdout, cmd.Stderr = s.log, s.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("server exit: %v; log:\n%s", err, s.log)
			}
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			t.Errorf("server did not exit after SIGTERM; log:\n%s", s.log)
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get(s.url + "/health")
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("server did not answer /health: %v; log:\n%s", err, s.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
	db, err := sql.Open("sqlite", filepath.Join(s.state, "data", "pod-upgrade-trigger.db")+"?_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	s.db = db
	return s
}

// packagePayload is a GitHub "package" event for host/owner/name:tag, laid out as GitHub sends it.
func githubPackagePayload(host, owner, name, tag, digest string) []byte {
	p := map[string]any{
		"action": "published",
		"package": map[string]any{
			"id": 1, "name": name, "namespace": owner, "ecosystem": "CONTAINER", "package_type": "CONTAINER",
			"owner": map[string]any{"login": owner, "type": "User"},
			"package_version": map[string]any{
				"id": 2, "version": digest, "name": digest,
				"container_metadata": map[string]any{
					"tag":      map[string]any{"name": tag, "digest": digest},
					"labels":   map[string]any{},
					"manifest": map[string]any{},
				},
				"package_url": host + "/" + owner + "/" + name + ":" + tag,
			},
			"registry": map[string]any{"about_url": "https://docs.github.com", "name": "GitHub CONTAINER registry",
				"type": "CONTAINER", "url": "http://" + host + "/" + owner, "vendor": "GitHub Inc"},
		},
		"repository": map[string]any{"name": name, "owner": map[string]any{"login": owner}},
		"sender":     map[string]any{"login": owner},
	}
	b, _ := json.Marshal(p)
	return b
}

// deliver sends a signed GitHub delivery and returns the status and body.
func (s *e2eServer) deliver(t *testing.T, unit, event, delivery string, body []byte, secret string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("POST", s.url+"/github-package-update/"+unit, bytes.NewReader(body))
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write(body)
	req.Header.Set("X-Hub-Signature-256", "sha256="+hex.EncodeToString(mac.Sum(nil)))
	req.Header.Set("X-GitHub-Event", event)
	req.Header.Set("X-GitHub-Delivery", delivery)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b))
}

// taskRow is one github-task row.
type taskRow struct {
	id        int64
	requestID string
	step      string
	delivery  string
	meta      map[string]any
}

func (s *e2eServer) taskRows(t *testing.T, delivery string) []taskRow {
	t.Helper()
	rows, err := s.db.Query(`SELECT id, request_id, meta FROM event_log WHERE action = 'github-task' ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []taskRow
	for rows.Next() {
		var r taskRow
		var meta string
		if err := rows.Scan(&r.id, &r.requestID, &meta); err != nil {
			t.Fatal(err)
		}
		json.Unmarshal([]byte(meta), &r.meta)
		r.step, _ = r.meta["step"].(string)
		r.delivery, _ = r.meta["delivery"].(string)
		if delivery == "" || r.delivery == delivery {
			out = append(out, r)
		}
	}
	return out
}

func steps(rows []taskRow) []string {
	var s []string
	for _, r := range rows {
		s = append(s, r.step)
	}
	return s
}

var finalSteps = map[string]bool{"completed": true, "up-to-date": true, "rolled-back": true, "rollback-failed": true,
	"rollback-impossible": true, "pull-failed": true, "rate-limited": true, "lock-failed": true, "limit-failed": true, "invalid": true}

// waitTask waits until the task of a delivery wrote its final row and returns its rows.
func (s *e2eServer) waitTask(t *testing.T, r *rig, delivery string) []taskRow {
	t.Helper()
	var rows []taskRow
	r.WaitFor(t, 120*time.Second, func() bool {
		rows = s.taskRows(t, delivery)
		return len(rows) > 0 && finalSteps[rows[len(rows)-1].step]
	}, "the task of delivery "+delivery+" to finish")
	return rows
}

// e2eContainerUnit installs a unit running ref from a Quadlet-style .container file as its
// SourcePath, starts it and waits until its container runs wantID.
func e2eContainerUnit(t *testing.T, r *rig, ref, wantID string) (unit, ctr string) {
	t.Helper()
	base := rigUniqueName(t, "app")
	unit, ctr = base+".service", base
	quadlet := filepath.Join(t.TempDir(), base+".container")
	if err := os.WriteFile(quadlet, []byte("[Unit]\nDescription=e2e\n\n[Container]\nImage="+ref+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r.InstallUnit(t, unit, r.ContainerUnit(ctr, ref, "SourcePath="+quadlet))
	if _, err := r.Systemctl(t, "start", unit); err != nil {
		t.Fatal(err)
	}
	r.WaitFor(t, 60*time.Second, func() bool { return r.ContainerImage(t, ctr) == wantID }, unit+" to run "+wantID)
	return unit, ctr
}

// TestE2EGitHubDelivery drives the product's main job on the real rig: a signed delivery for a
// new image ends with the unit's container running it, with a row for every step.
func TestE2EGitHubDelivery(t *testing.T) {
	r := needRig(t)
	s := startE2EServer(t)
	name := rigUniqueName(t, "demo")
	ref, id1 := r.PushImage(t, "e2e/"+name, "latest", "v1")
	unit, ctr := e2eContainerUnit(t, r, ref, id1)
	_, id2 := r.PushImage(t, "e2e/"+name, "latest", "v2")
	r.TagLocal(t, id1, ref) // the host still has v1 locally; the registry has v2
	if id1 == id2 {
		t.Fatal("v1 and v2 have the same image ID")
	}
	body := githubPackagePayload(r.Registry(), "e2e", name, "latest", "")

	t.Run("bad signature runs nothing", func(t *testing.T) {
		code, text := s.deliver(t, unit, "package", "bad-sig-1", body, "wrong secret")
		if code != http.StatusUnauthorized {
			t.Fatalf("status %d %q, want 401", code, text)
		}
	})
	t.Run("tag mismatch runs nothing", func(t *testing.T) {
		other := githubPackagePayload(r.Registry(), "e2e", name, "v9", "")
		code, text := s.deliver(t, unit, "package", "mismatch-1", other, s.secret)
		if code != http.StatusAccepted || !strings.Contains(text, "tag mismatch") {
			t.Fatalf("status %d %q, want 202 tag mismatch", code, text)
		}
	})

	start := time.Now()
	code, text := s.deliver(t, unit, "package", "delivery-v2", body, s.secret)
	answered := time.Since(start)
	if code != http.StatusAccepted || text != "auto-update queued" {
		t.Fatalf("delivery: %d %q, want 202 auto-update queued; server log:\n%s", code, text, s.log)
	}
	r.WaitFor(t, 120*time.Second, func() bool { return r.ContainerImage(t, ctr) == id2 }, ctr+" to run v2")
	running := time.Since(start)
	rows := s.waitTask(t, r, "delivery-v2")
	got := strings.Join(steps(rows), ",")
	if got != "started,pulled,restarted,healthy,completed" {
		t.Fatalf("task steps %s; server log:\n%s", got, s.log)
	}
	t.Logf("delivery answered in %s; container on v2 after %s; task rows %s", answered, running, got)
	if n := len(s.taskRows(t, "mismatch-1")); n != 0 {
		t.Errorf("tag mismatch ran a task: %d rows", n)
	}
	if st := r.Show(t, unit, "ActiveState")["ActiveState"]; st != "active" {
		t.Errorf("%s is %s after the redeploy", unit, st)
	}

	t.Run("same delivery again is a duplicate", func(t *testing.T) {
		code, text := s.deliver(t, unit, "package", "delivery-v2", body, s.secret)
		if code != http.StatusAccepted || text != "duplicate delivery" {
			t.Fatalf("redelivery: %d %q, want 202 duplicate delivery", code, text)
		}
	})

	t.Run("same image again does not restart", func(t *testing.T) {
		pid := r.Show(t, unit, "MainPID")["MainPID"]
		code, _ := s.deliver(t, unit, "package", "delivery-v2-again", body, s.secret)
		if code != http.StatusAccepted {
			t.Fatalf("status %d", code)
		}
		rows := s.waitTask(t, r, "delivery-v2-again")
		if last := rows[len(rows)-1].step; last != "up-to-date" {
			t.Fatalf("steps %v, want to end up-to-date", steps(rows))
		}
		if now := r.Show(t, unit, "MainPID")["MainPID"]; now != pid {
			t.Fatalf("MainPID changed %s → %s: the unit was restarted", pid, now)
		}
	})

	// Images are pushed with the parent test's t: a subtest's cleanup would remove an image that
	// the unit still runs.
	tt := t
	t.Run("three deliveries for one push restart once, one at a time", func(t *testing.T) {
		_, id3 := r.PushImage(tt, "e2e/"+name, "latest", "v3")
		r.TagLocal(t, id2, ref)
		ids := []string{"multi-1", "multi-2", "multi-3"}
		for _, d := range ids {
			if code, text := s.deliver(t, unit, "package", d, body, s.secret); code != http.StatusAccepted {
				t.Fatalf("%s: %d %q", d, code, text)
			}
		}
		var restarts int
		type span struct{ first, last int64 }
		var spans []span
		for _, d := range ids {
			rows := s.waitTask(t, r, d)
			var sp span
			for _, row := range rows {
				if row.step == "restarted" {
					restarts++
				}
				if row.step != "started" && sp.first == 0 {
					sp.first = row.id // the first row written under the image lock
				}
				sp.last = row.id
			}
			spans = append(spans, sp)
		}
		if restarts != 1 {
			for _, d := range ids {
				for _, row := range s.taskRows(t, d) {
					t.Logf("%s %d %s %v", d, row.id, row.step, row.meta["error"])
				}
			}
			t.Fatalf("%d restarts for one push, want 1", restarts)
		}
		sort.Slice(spans, func(i, j int) bool { return spans[i].first < spans[j].first })
		for i := 1; i < len(spans); i++ {
			if spans[i].first < spans[i-1].last {
				t.Fatalf("redeploys overlapped: %v", spans)
			}
		}
		if got := r.ContainerImage(t, ctr); got != id3 {
			t.Fatalf("container runs %s, want v3 %s", got, id3)
		}
	})

	t.Run("a broken image is rolled back", func(t *testing.T) {
		good := r.ContainerImage(t, ctr)
		_, broken := r.PushBrokenImage(tt, "e2e/"+name, "latest")
		r.TagLocal(t, good, ref)
		code, _ := s.deliver(t, unit, "package", "broken-1", body, s.secret)
		if code != http.StatusAccepted {
			t.Fatalf("status %d", code)
		}
		rows := s.waitTask(t, r, "broken-1")
		if last := rows[len(rows)-1].step; last != "rolled-back" {
			t.Fatalf("steps %v, want to end rolled-back; server log:\n%s", steps(rows), s.log)
		}
		r.WaitFor(t, 30*time.Second, func() bool { return r.ContainerImage(t, ctr) == good }, ctr+" back on the good image")
		if st := r.Show(t, unit, "ActiveState")["ActiveState"]; st != "active" {
			t.Fatalf("%s is %s after the rollback", unit, st)
		}
		if out, err := r.Podman(t, "image", "exists", broken); err != nil {
			t.Fatalf("the failed image %s was removed; it must be kept for inspection: %v %s", broken, err, out)
		}
	})

	t.Run("force restarts an unchanged image", func(t *testing.T) {
		pid := r.Show(t, unit, "MainPID")["MainPID"]
		bin := buildBinary(t)
		cmd := exec.Command(bin, "run-task", "--force", "--state-dir", s.state, "--", unit, ref, "manual", "force-1", "/manual")
		cmd.Env = append(os.Environ(), "WEBHOOK_HEALTH_SETTLE_SECS=2")
		// The registry holds the broken image under the tag: push the running one back, so the
		// pull brings nothing new.
		if out, err := r.Podman(t, "push", "--quiet", ref); err != nil {
			t.Fatalf("push %s: %v %s", ref, err, out)
		}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("run-task --force: %v\n%s", err, out)
		}
		rows := s.waitTask(t, r, "force-1")
		if !strings.Contains(strings.Join(steps(rows), ","), "restarted") {
			t.Fatalf("steps %v, want a restart", steps(rows))
		}
		if now := r.Show(t, unit, "MainPID")["MainPID"]; now == pid {
			t.Fatalf("MainPID unchanged (%s): not restarted", pid)
		}
	})
}
