// webhook_test.go tests the HTTP surface through a real client against httptest servers (routes,
// static files, traversal attempts written as raw request lines, the body cap, one event row per
// request, the GitHub and registry push routes against adversarial requests), the configuration and command line through run, and the built binary's graceful
// shutdown on SIGTERM.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha1"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
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

// testConfig loads the configuration from env and finishes it as cmdServer does, with the state
// directory in a temp dir unless env names one.
func testConfig(t testing.TB, env map[string]string) *config {
	t.Helper()
	full := map[string]string{"WEBHOOK_STATE_DIR": t.TempDir()}
	for k, v := range env {
		full[k] = v
	}
	cfg, err := loadConfig(mapEnv(full))
	if err != nil {
		t.Fatalf("loadConfig: %v", err)
	}
	if err := cfg.finish(); err != nil {
		t.Fatalf("finish: %v", err)
	}
	return cfg
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
func newTestServer(t testing.TB, env map[string]string, edit func(cfg *config)) *testServer {
	t.Helper()
	cfg := testConfig(t, env)
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
	hs := httptest.NewUnstartedServer(srv)
	hs.Config = newHTTPServer(cfg, srv, lg) // cmdServer's settings, header bound included
	hs.Listener = framedListener{hs.Listener}
	hs.Start()
	ts := &testServer{Server: hs, srv: srv, cfg: cfg, events: events, logs: logs}
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
	if ev := ts.srv.probes.take(time.Now(), true); ev != nil {
		ts.events.Record(*ev)
	}
	ts.events.Close()
}

// probeCount adds up the probes counted by the probe-summary rows.
func probeCount(t *testing.T, rows map[string]eventRow) int {
	t.Helper()
	n := 0
	for _, r := range rows {
		if r.action != "probe-summary" {
			continue
		}
		var meta struct{ Count int }
		if err := json.Unmarshal([]byte(r.meta), &meta); err != nil {
			t.Fatal(err)
		}
		n += meta.Count
	}
	return n
}

// drain runs the dispatcher until nothing is due, as its goroutine does after a wake-up, so a
// test sees every queued task started (or retried) when drain returns.
func (ts *testServer) drain(t testing.TB) {
	t.Helper()
	for i := 0; ts.srv.dispatchNext(context.Background()) == 0; i++ {
		if i == 10000 {
			t.Fatal("the dispatcher never ran out of work")
		}
	}
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
	return ts.rowsSoFar(t)
}

// rowsSoFar returns the event_log rows by request id with the server still running: the rows of
// the requests answered so far (a delivery is answered after its row is committed).
func (ts *testServer) rowsSoFar(t *testing.T) map[string]eventRow {
	t.Helper()
	out := map[string]eventRow{}
	for _, r := range readRows(t, rawDB(t, ts.cfg.dbPath), "") {
		if _, dup := out[r.requestID]; dup && r.method != "QUEUE" { // the rows of one dispatch share an id
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
	if resp, body := ts.do(t, "GET", "/index.html", nil); resp.StatusCode != 404 || strings.TrimSpace(body) != "web ui not built" {
		t.Errorf("GET /index.html without a bundle = %d %q, want 404 \"web ui not built\"", resp.StatusCode, body)
	}
	// / is the built-in status page, which without a manual token says how to set one.
	if resp, body := ts.do(t, "GET", "/", nil); resp.StatusCode != 403 || !strings.Contains(body, "<h1>Status page</h1>") {
		t.Errorf("GET / without a bundle = %d, want the status page:\n%s", resp.StatusCode, body)
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
// row with its status and action, or is counted in the probe summary when it is a successful
// /health or /metrics probe, and that query secrets never reach the row or the log.
func TestRequestRows(t *testing.T) {
	dist, _ := distFixture(t)
	ts := newTestServer(t, map[string]string{"WEBHOOK_WEB_DIST": dist, "WEBHOOK_MAX_BODY_BYTES": "16"}, nil)
	type want struct {
		method, target string
		raw            bool
		body           string
		status         int
		action         string
		probe          bool // a successful probe: counted in the minute's probe-summary row
	}
	cases := []want{
		{method: "GET", target: "/health", status: 200, action: "health", probe: true},
		{method: "GET", target: "/health?token=s3cret&x=1", status: 200, action: "health", probe: true},
		{method: "GET", target: "/sse/hello?token=s3cret&x=1", status: 200, action: "sse-hello"},
		{method: "GET", target: "/sse/hello?access_token=s3cret", status: 200, action: "sse-hello"},
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
	probes := 0
	for _, c := range cases {
		if c.probe {
			probes++
		}
	}
	if len(rows) != len(cases)-probes+1 {
		t.Errorf("%d rows for %d requests, %d of them probes summarised in one row", len(rows), len(cases), probes)
	}
	if got := probeCount(t, rows); got != probes {
		t.Errorf("the probe summaries count %d probes, want %d", got, probes)
	}
	for i, c := range cases {
		r, ok := rows[ids[i]]
		if c.probe {
			if ok {
				t.Errorf("%s %s: a successful probe has a row of its own", c.method, c.target)
			}
			continue
		}
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
		{"WEBHOOK_BODY_BUDGET_BYTES", "0"},
		{"WEBHOOK_REGISTRY_HOSTS", "ghcr.io,docker-archive:"},
		{"WEBHOOK_REGISTRY_HOSTS", "https://ghcr.io"},
		{"WEBHOOK_DB_URL", "postgres://x"},
		{"WEBHOOK_DB_URL", "sqlite://events.db?mode=ro"},
		{"WEBHOOK_ALLOW_ANY_IMAGE", "maybe"},
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
	if _, err := os.Stat(legacyStateDir); err == nil {
		t.Fatalf("%s exists on this host: the default state directory would be it, not the home one this test checks", legacyStateDir)
	}
	home := t.TempDir()
	cfg, err := loadConfig(mapEnv(map[string]string{"HOME": home}))
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.finish(); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(home, ".local", "state", "webhook-auto-update")
	for _, tc := range []struct {
		name      string
		got, want any
	}{
		{"stateDir", cfg.stateDir, state},
		{"dbPath", cfg.dbPath, state + "/data/pod-upgrade-trigger.db"},
		{"listen", cfg.listen, "127.0.0.1:8088"},
		{"autoUpdateUnit", cfg.autoUpdateUnit, "podman-auto-update.service"},
		{"webDist", cfg.webDist, state + "/web/dist"},
		{"debugPayloadPath", cfg.debugPayloadPath, state + "/last_payload.bin"},
		{"allowAnyImage", cfg.allowAnyImage, false},
		{"envFile", cfg.envFile, ""},
		{"maxBodyBytes", cfg.maxBodyBytes, int64(5 << 20)},
		{"interval", cfg.interval, 900 * time.Second},
		{"maxTicks", cfg.maxTicks, 0},
		{"limit1", cfg.autoUpdateLimits[0], window{2, 600 * time.Second}},
		{"limit2", cfg.autoUpdateLimits[1], window{10, 18000 * time.Second}},
		{"imageLimit", cfg.imageLimit, window{60, time.Hour}},
		{"pullAttempts", cfg.pullAttempts, 3},
		{"pullRetryDelay", cfg.pullRetryDelay, 5 * time.Second},
		{"bodyBudget", cfg.bodyBudget, int64(32 << 20)},
		{"registryHosts", cfg.registryHosts, []string{"ghcr.io"}},
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
		"WEBHOOK_MANUAL_UNITS": "a.service,\nb\r\n, c ", "WEBHOOK_REGISTRY_HOSTS": "ghcr.io, Containers.GHE.example.com,127.0.0.1:5000",
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
	if !reflect.DeepEqual(cfg.registryHosts, []string{"ghcr.io", "containers.ghe.example.com", "127.0.0.1:5000"}) {
		t.Errorf("registryHosts %q", cfg.registryHosts)
	}
}

// TestDefaultStateDir: one rule for every subcommand and the units, which set none. The original
// tool's directory wins when it exists, so a host that switches binaries keeps its state; else
// the XDG state directory, else the one under HOME; neither is "" (finish reports it).
func TestDefaultStateDir(t *testing.T) {
	for _, tc := range []struct {
		name   string
		env    map[string]string
		legacy bool
		want   string
	}{
		{"legacy directory exists", map[string]string{"HOME": "/home/me", "XDG_STATE_HOME": "/x"}, true, "/srv/pod-upgrade-trigger"},
		{"XDG_STATE_HOME", map[string]string{"HOME": "/home/me", "XDG_STATE_HOME": "/x/state"}, false, "/x/state/webhook-auto-update"},
		{"HOME only", map[string]string{"HOME": "/home/me"}, false, "/home/me/.local/state/webhook-auto-update"},
		{"relative XDG_STATE_HOME is ignored, as the XDG spec says", map[string]string{"HOME": "/home/me", "XDG_STATE_HOME": "state"}, false, "/home/me/.local/state/webhook-auto-update"},
		{"relative HOME", map[string]string{"HOME": "me"}, false, ""},
		{"nothing", nil, false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := defaultStateDir(mapEnv(tc.env), tc.legacy); got != tc.want {
				t.Errorf("defaultStateDir(%v, legacy %v) = %q, want %q", tc.env, tc.legacy, got, tc.want)
			}
		})
	}
}

// TestStateDirAndEnvFile runs the command line as a deployed user runs it: no flags, HOME set,
// and maybe the units' environment file. The environment wins over the file, a flag over both,
// and a broken file or no state directory at all is a configuration error (exit 2) that says
// what to set.
func TestStateDirAndEnvFile(t *testing.T) {
	if _, err := os.Stat(legacyStateDir); err == nil {
		t.Fatalf("%s exists on this host: the default state directory would be it", legacyStateDir)
	}
	for _, tc := range []struct {
		name     string
		file     string // the environment file's content; "-" none
		env      map[string]string
		args     []string
		code     int
		state    string // relative to HOME
		stderr   string
		dbInFile bool
	}{
		{name: "no file: the home default", file: "-", code: 0, state: ".local/state/webhook-auto-update"},
		{name: "XDG_STATE_HOME", file: "-", env: map[string]string{"XDG_STATE_HOME": "{home}/xdg"}, code: 0, state: "xdg/webhook-auto-update"},
		{name: "state dir from the file", file: "# comment\n; other\n\nWEBHOOK_STATE_DIR={home}/from-file\n", code: 0, state: "from-file"},
		{name: "quoted value", file: "WEBHOOK_STATE_DIR=\"{home}/quoted\"\n", code: 0, state: "quoted"},
		{name: "environment wins", file: "WEBHOOK_STATE_DIR={home}/from-file\n", env: map[string]string{"WEBHOOK_STATE_DIR": "{home}/from-env"}, code: 0, state: "from-env"},
		{name: "flag wins", file: "WEBHOOK_STATE_DIR={home}/from-file\n", env: map[string]string{"WEBHOOK_STATE_DIR": "{home}/from-env"},
			args: []string{"--state-dir", "{home}/from-flag"}, code: 0, state: "from-flag"},
		{name: "a bad value in the file is exit 2", file: "WEBHOOK_PULL_ATTEMPTS=three\n", code: 2, stderr: "WEBHOOK_PULL_ATTEMPTS"},
		{name: "a bad database URL in the file is exit 2", file: "WEBHOOK_DB_URL=postgres://db/x\n", code: 2, stderr: "WEBHOOK_DB_URL"},
		{name: "a line that is not NAME=value", file: "export WEBHOOK_STATE_DIR\n", code: 2, stderr: "webhook-auto-update.env: line 1"},
		{name: "a continuation line", file: "WEBHOOK_MANUAL_UNITS=a,\\\n b\n", code: 2, stderr: "continuations"},
		{name: "no HOME and nothing set", file: "-", env: map[string]string{"HOME": ""}, code: 2, stderr: "--state-dir"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			home := t.TempDir()
			fill := func(s string) string { return strings.ReplaceAll(s, "{home}", home) }
			if tc.file != "-" {
				dir := filepath.Join(home, ".config", "webhook-auto-update")
				if err := os.MkdirAll(dir, 0o700); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(dir, "webhook-auto-update.env"), []byte(fill(tc.file)), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			env := map[string]string{"HOME": home}
			for k, v := range tc.env {
				env[k] = fill(v)
			}
			var args []string
			for _, a := range tc.args {
				args = append(args, fill(a))
			}
			// A dry run runs no systemctl but writes its row, so the event log shows which state
			// directory the command used.
			code, stdout, stderr := runCLI(t, env, append([]string{"trigger-units", "app", "--dry-run"}, args...)...)
			if code != tc.code || !strings.Contains(stderr, tc.stderr) {
				t.Fatalf("exit %d, want %d with stderr containing %q\nstdout: %s\nstderr: %s", code, tc.code, tc.stderr, stdout, stderr)
			}
			if tc.code != 0 {
				return
			}
			db := filepath.Join(home, tc.state, "data", "pod-upgrade-trigger.db")
			if _, err := os.Stat(db); err != nil {
				t.Errorf("no event log at %s: %v (the command used another state directory)", db, err)
			}
		})
	}
}

// TestServerStartLog: the server says which state directory, event log and environment file it
// uses, and warns about each missing secret, before it listens. The busy address stops it right
// after, so the test needs no signal.
func TestServerStartLog(t *testing.T) {
	home := t.TempDir()
	dir := filepath.Join(home, ".config", "webhook-auto-update")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	envFile := filepath.Join(dir, "webhook-auto-update.env")
	if err := os.WriteFile(envFile, []byte("WEBHOOK_STATE_DIR="+home+"/state\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name      string
		env       map[string]string
		want, not []string
	}{
		{"nothing set", nil,
			[]string{"state directory " + home + "/state, event log " + home + "/state/data/pod-upgrade-trigger.db (settings also from " + envFile + ")",
				"GITHUB_WEBHOOK_SECRET is not set", "WEBHOOK_TOKEN is not set: /auto-update refuses every request with 401, and so do the manual API"}, nil},
		{"manual token only", map[string]string{"GITHUB_WEBHOOK_SECRET": "s", "WEBHOOK_MANUAL_TOKEN": "m"},
			[]string{"WEBHOOK_TOKEN is not set: /auto-update refuses every request with 401"}, []string{"GITHUB_WEBHOOK_SECRET", "manual API"}},
		{"both set", map[string]string{"GITHUB_WEBHOOK_SECRET": "s", "WEBHOOK_TOKEN": "t"}, nil, []string{"is not set"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := map[string]string{"HOME": home}
			for k, v := range tc.env {
				env[k] = v
			}
			code, _, stderr := runCLI(t, env, "server", "--listen", busyAddr(t))
			if code != 1 {
				t.Fatalf("exit %d, want 1 (address in use)\nstderr: %s", code, stderr)
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr does not say %q:\n%s", w, stderr)
				}
			}
			for _, n := range tc.not {
				if strings.Contains(stderr, n) {
					t.Errorf("stderr mentions %q:\n%s", n, stderr)
				}
			}
		})
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
			// The successful probes are counted in one probe-summary row, written at shutdown.
			if n := queryInt(t, db, `SELECT coalesce(sum(json_extract(meta, '$.count')), 0) FROM event_log
				WHERE action = 'probe-summary' AND status = 200 AND meta NOT LIKE '%s3cret%'`); n != ok {
				t.Errorf("%d health probes counted after shutdown, want %d", n, ok)
			}
			if n := queryInt(t, db, `SELECT count(*) FROM event_log WHERE path = '/assets/big.js' AND status = 200`); n != 1 {
				t.Errorf("%d rows for the request in flight, want 1", n)
			}
			if n := queryInt(t, db, `SELECT count(*) FROM event_log`); n != 2 {
				t.Errorf("%d rows in all, want 2 (the probe summary and the request in flight)", n)
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
	log    *logBuffer // written by the server process as it runs
	db     *sql.DB
}

// startE2EServer starts `webhook-auto-update server` with the given extra environment and stops
// it (SIGTERM, expecting exit 0) when the test ends.
// e2eHealthSettle is the health gate's settle window in the E2E servers. A broken image's
// container fails only once rootless podman has started it, which on a loaded machine (two runs,
// -race) took longer than 2 s: the gate then saw an active unit and passed it.
const e2eHealthSettle = "WEBHOOK_HEALTH_SETTLE_SECS=10"

func startE2EServer(t *testing.T, extraEnv ...string) *e2eServer {
	t.Helper()
	r := needRig(t)
	bin := buildBinary(t)
	port, err := rigFreePort()
	if err != nil {
		t.Fatal(err)
	}
	s := &e2eServer{url: fmt.Sprintf("http://127.0.0.1:%d", port), state: r.TempDir(t),
		secret: "e2e secret " + rigUniqueName(t, "s"), log: &logBuffer{}}
	cmd := r.Command(bin, "server", "--listen", fmt.Sprintf("127.0.0.1:%d", port), "--state-dir", s.state)
	cmd.Env = append(cmd.Env, "GITHUB_WEBHOOK_SECRET="+s.secret, e2eHealthSettle,
		"WEBHOOK_PULL_RETRY_SECS=1")
	rigMu.Lock()
	if theRig != nil { // deliveries name the rig's registry
		cmd.Env = append(cmd.Env, "WEBHOOK_REGISTRY_HOSTS=ghcr.io,"+theRig.registry)
	}
	rigMu.Unlock()
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

// withAction returns a package payload with its action replaced ("" drops it).
func withAction(body []byte, action string) []byte {
	var p map[string]any
	json.Unmarshal(body, &p)
	if action == "" {
		delete(p, "action")
	} else {
		p["action"] = action
	}
	b, _ := json.Marshal(p)
	return b
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
	"rollback-impossible": true, "pull-failed": true, "image-mismatch": true, "image-unknown": true, "rate-limited": true, "lock-failed": true, "limit-failed": true, "invalid": true}

// waitTask waits until the task that covers a delivery wrote its final row and returns its rows;
// if it never does, the failure shows the rows so far, with their errors, and the server's log.
func (s *e2eServer) waitTask(t *testing.T, r *rig, delivery string) []taskRow {
	t.Helper()
	leader := s.leader(t, r, delivery)
	const limit = 3 * time.Minute
	for deadline := time.Now().Add(limit); ; time.Sleep(100 * time.Millisecond) {
		rows := s.taskRows(t, leader)
		if len(rows) > 0 && finalSteps[rows[len(rows)-1].step] {
			return rows
		}
		if time.Now().After(deadline) {
			t.Fatalf("the task of delivery %s (covering %s) did not finish within %s; its rows: %s; server log:\n%s",
				leader, delivery, limit, stepDetails(rows), s.log)
		}
	}
}

// stepDetails lists rows' steps with the error each carries (a pull's stderr, say), for failures.
func stepDetails(rows []taskRow) string {
	var b strings.Builder
	for i, r := range rows {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(r.step)
		if e, ok := r.meta["error"]; ok {
			fmt.Fprintf(&b, " (error: %v)", e)
		}
	}
	if b.Len() == 0 {
		return "none"
	}
	return b.String()
}

// leader waits until the claim of delivery is dispatched and returns the delivery whose task
// covers it (itself, unless it queued behind an earlier claim of the same unit and image, or
// when run-task was started by hand).
func (s *e2eServer) leader(t *testing.T, r *rig, delivery string) string {
	t.Helper()
	var leader string
	r.WaitFor(t, 120*time.Second, func() bool {
		var status string
		err := s.db.QueryRow(`SELECT status, coalesce(covered_by, '') FROM github_deliveries WHERE delivery_id = ?`, delivery).
			Scan(&status, &leader)
		if errors.Is(err, sql.ErrNoRows) && len(s.taskRows(t, delivery)) > 0 {
			leader = delivery // a run-task started by hand: no claim
			return true
		}
		return err == nil && (status == "dispatched" || status == "done")
	}, "the claim of "+delivery+" to be dispatched")
	return leader
}

// e2eContainerUnit installs a unit running ref from a Quadlet-style .container file as its
// SourcePath, starts it and waits until its container runs wantID.
func e2eContainerUnit(t *testing.T, r *rig, ref, wantID string) (unit, ctr string) {
	t.Helper()
	return e2eNamedContainerUnit(t, r, rigUniqueName(t, "app"), ref, wantID)
}

// e2eNamedContainerUnit is e2eContainerUnit for the unit base.service, whose container is base.
func e2eNamedContainerUnit(t *testing.T, r *rig, base, ref, wantID string) (unit, ctr string) {
	t.Helper()
	unit, ctr = base+".service", base
	quadlet := filepath.Join(r.TempDir(t), base+".container")
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
	r.WaitFor(t, 3*time.Minute, func() bool {
		if rows := s.taskRows(t, "delivery-v2"); len(rows) > 0 && finalSteps[rows[len(rows)-1].step] && rows[len(rows)-1].step != "completed" {
			t.Fatalf("the task ended without running v2: %s; server log:\n%s", stepDetails(rows), s.log)
		}
		return r.ContainerImage(t, ctr) == id2
	}, ctr+" to run v2")
	running := time.Since(start)
	rows := s.waitTask(t, r, "delivery-v2")
	got := strings.Join(steps(rows), ",")
	if got != "started,pulled,restarted,healthy,completed" {
		t.Fatalf("task steps %s; server log:\n%s", stepDetails(rows), s.log)
	}
	var pullMS, restartMS any
	for _, row := range rows {
		switch row.step {
		case "pulled":
			pullMS = row.meta["pull_ms"]
		case "restarted":
			restartMS = row.meta["restart_ms"]
		}
	}
	t.Logf("delivery answered in %s; container on v2 after %s (podman pull %v ms, systemctl restart %v ms); task rows %s",
		answered, running, pullMS, restartMS, got)
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
			t.Fatalf("steps %s, want to end up-to-date", stepDetails(rows))
		}
		if now := r.Show(t, unit, "MainPID")["MainPID"]; now != pid {
			t.Fatalf("MainPID changed %s → %s: the unit was restarted", pid, now)
		}
	})

	// Images are pushed with the parent test's t: a subtest's cleanup would remove an image that
	// the unit still runs.
	tt := t
	t.Run("three deliveries for one push restart once, one task at a time", func(t *testing.T) {
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
		tasks := map[string]bool{} // the three are covered by one or two tasks
		for _, d := range ids {
			if l := s.leader(t, r, d); tasks[l] {
				continue
			} else {
				tasks[l] = true
			}
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
			t.Fatalf("steps %s, want to end rolled-back; server log:\n%s", stepDetails(rows), s.log)
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
		cmd := r.Command(bin, "run-task", "--force", "--state-dir", s.state, "--", unit, ref, "manual", "force-1", "/manual")
		cmd.Env = append(cmd.Env, e2eHealthSettle)
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
			t.Fatalf("steps %s, want a restart", stepDetails(rows))
		}
		if now := r.Show(t, unit, "MainPID")["MainPID"]; now == pid {
			t.Fatalf("MainPID unchanged (%s): not restarted", pid)
		}
	})
}

// TestE2EUnitWithoutImage: a unit with no Quadlet file is not redeployed by a push of another
// package to its route — nothing is pulled, it is not restarted — and is still redeployed by a
// push of the image its container runs.
func TestE2EUnitWithoutImage(t *testing.T) {
	r := needRig(t)
	// The rig user's HOME has no .container file for this unit: it has no Image= anywhere.
	s := startE2EServer(t)
	name := rigUniqueName(t, "plain")
	ref, id1 := r.PushImage(t, "e2e/"+name, "latest", "v1")
	base := rigUniqueName(t, "plain")
	unit, ctr := base+".service", base
	r.InstallUnit(t, unit, r.ContainerUnit(ctr, ref))
	if _, err := r.Systemctl(t, "start", unit); err != nil {
		t.Fatal(err)
	}
	r.WaitFor(t, 60*time.Second, func() bool { return r.ContainerImage(t, ctr) == id1 }, unit+" to run v1")
	pid := r.Show(t, unit, "MainPID")["MainPID"]

	other := name + "-other"
	otherRef, otherID := r.PushImage(t, "e2e/"+other, "latest", "other")
	if _, err := r.Podman(t, "rmi", "--force", otherRef); err != nil {
		t.Fatal(err) // not in the local store, so a pull would show
	}
	code, text := s.deliver(t, unit, "package", "unrelated-1", githubPackagePayload(r.Registry(), "e2e", other, "latest", ""), s.secret)
	if code != http.StatusAccepted {
		t.Fatalf("delivery of an unrelated package: %d %q", code, text)
	}
	rows := s.waitTask(t, r, "unrelated-1")
	if got := strings.Join(steps(rows), ","); got != "started,image-mismatch" {
		t.Fatalf("steps %s, want started,image-mismatch; server log:\n%s", got, s.log)
	}
	t.Logf("refused: %v", rows[len(rows)-1].meta["reason"])
	if now := r.Show(t, unit, "MainPID")["MainPID"]; now != pid {
		t.Errorf("MainPID %s → %s: the unit was restarted by an unrelated package", pid, now)
	}
	if got := r.ContainerImage(t, ctr); got != id1 {
		t.Errorf("container runs %s, want still v1 %s", got, id1)
	}
	if out, err := r.Podman(t, "image", "exists", otherID); err == nil {
		t.Errorf("the unrelated image %s was pulled: %s", otherID, out)
	}

	// Its own image still redeploys it.
	_, id2 := r.PushImage(t, "e2e/"+name, "latest", "v2")
	r.TagLocal(t, id1, ref)
	code, text = s.deliver(t, unit, "package", "own-1", githubPackagePayload(r.Registry(), "e2e", name, "latest", ""), s.secret)
	if code != http.StatusAccepted {
		t.Fatalf("delivery of the unit's image: %d %q", code, text)
	}
	rows = s.waitTask(t, r, "own-1")
	if got := strings.Join(steps(rows), ","); got != "started,pulled,restarted,healthy,completed" {
		t.Fatalf("steps %s; server log:\n%s", got, s.log)
	}
	r.WaitFor(t, 30*time.Second, func() bool { return r.ContainerImage(t, ctr) == id2 }, ctr+" to run v2")
}

// TestE2ERollbackToWhatRan: the local tag is moved after the unit started (as another unit's
// redeploy of the same tag does); a broken push is rolled back to the image the container ran,
// not to the one the tag named before the pull.
func TestE2ERollbackToWhatRan(t *testing.T) {
	r := needRig(t)
	s := startE2EServer(t)
	name := rigUniqueName(t, "rb")
	ref, id1 := r.PushImage(t, "e2e/"+name, "latest", "v1")
	unit, ctr := e2eContainerUnit(t, r, ref, id1)
	_, id2 := r.PushImage(t, "e2e/"+name, "latest", "v2")
	_, broken := r.PushBrokenImage(t, "e2e/"+name, "latest")
	r.TagLocal(t, id2, ref) // another unit's redeploy moved the local tag to v2; this unit still runs v1
	if id1 == id2 || id2 == broken {
		t.Fatal("v1, v2 and the broken image are not three images")
	}
	code, text := s.deliver(t, unit, "package", "broken-1", githubPackagePayload(r.Registry(), "e2e", name, "latest", ""), s.secret)
	if code != http.StatusAccepted {
		t.Fatalf("delivery: %d %q", code, text)
	}
	rows := s.waitTask(t, r, "broken-1")
	last := rows[len(rows)-1]
	if last.step != "rolled-back" {
		t.Fatalf("steps %v, want to end rolled-back; server log:\n%s", steps(rows), s.log)
	}
	if last.meta["image_id"] != id1 {
		t.Errorf("rolled back to %v (%v), want the image the container ran, v1 %s (not the tag's v2 %s)", last.meta["image_id"], last.meta["rollback_source"], id1, id2)
	}
	r.WaitFor(t, 30*time.Second, func() bool { return r.ContainerImage(t, ctr) == id1 }, ctr+" back on v1 "+id1)
	if st := r.Show(t, unit, "ActiveState")["ActiveState"]; st != "active" {
		t.Errorf("%s is %s after the rollback", unit, st)
	}
}

// TestE2EDeployedUserCLI: the server runs as a user unit with no --state-dir, as the shipped units
// run it; the same user's events and trigger-units, with no flags, see and use its state — with
// the default directory, and with WEBHOOK_STATE_DIR set only in the units' environment file.
func TestE2EDeployedUserCLI(t *testing.T) {
	r := needRig(t)
	bin := buildBinary(t)
	for _, tc := range []struct {
		name, envFile, state string // state relative to HOME
	}{
		{"default state directory", "", ".local/state/webhook-auto-update"},
		{"state directory from the environment file", "WEBHOOK_STATE_DIR={home}/elsewhere\n", "elsewhere"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			home := r.TempDir(t) // the deployed user's
			envFile := filepath.Join(home, ".config", "webhook-auto-update", "webhook-auto-update.env")
			if tc.envFile != "" {
				if err := os.MkdirAll(filepath.Dir(envFile), 0o700); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(envFile, []byte(strings.ReplaceAll(tc.envFile, "{home}", home)), 0o600); err != nil {
					t.Fatal(err)
				}
				r.Chown(t, filepath.Join(home, ".config"), filepath.Dir(envFile), envFile)
			}
			port, err := rigFreePort()
			if err != nil {
				t.Fatal(err)
			}
			// As the shipped webhook-auto-update.service, with this test's HOME for the user's.
			server := rigUniqueName(t, "webhook") + ".service"
			r.InstallUnit(t, server, fmt.Sprintf(`[Service]
Type=notify
NotifyAccess=main
Environment=HOME=%s
EnvironmentFile=-%s
ExecStart=%s server --listen 127.0.0.1:%d
`, home, envFile, bin, port))
			app := rigUniqueName(t, "app") + ".service"
			r.InstallUnit(t, app, "[Service]\nExecStart=/bin/sleep 1000\n")
			if _, err := r.Systemctl(t, "start", server, app); err != nil {
				t.Fatal(err)
			}
			// A 404 is written at once (successful probes are summarised a minute later).
			var resp *http.Response
			r.WaitFor(t, 30*time.Second, func() bool {
				resp, err = http.Get(fmt.Sprintf("http://127.0.0.1:%d/e2e-cli-check", port))
				return err == nil
			}, server+" to answer")
			resp.Body.Close()

			// The deployed user's shell: HOME and the user manager's runtime directory, nothing else.
			cli := func(args ...string) string {
				t.Helper()
				cmd := r.Command(bin, args...)
				cmd.Env = []string{"HOME=" + home, "PATH=" + rigSystemPath, "XDG_RUNTIME_DIR=" + r.runtimeDir}
				out, err := cmd.CombinedOutput()
				if err != nil {
					t.Fatalf("webhook-auto-update %s: %v\n%s", strings.Join(args, " "), err, out)
				}
				return string(out)
			}
			pid := r.Show(t, app, "MainPID")["MainPID"]
			if out := cli("trigger-units", app, "--caller", "e2e"); !strings.Contains(out, app+" -> triggered") {
				t.Fatalf("trigger-units: %s", out)
			}
			if now := r.Show(t, app, "MainPID")["MainPID"]; now == pid {
				t.Errorf("%s not restarted (MainPID %s)", app, pid)
			}
			out := cli("events", "--json")
			for _, want := range []string{`"path":"/e2e-cli-check"`, `"action":"cli-trigger"`} {
				if !strings.Contains(out, want) {
					t.Errorf("events does not show %s: the CLI and the server use different state\n%s", want, out)
				}
			}
			if _, err := os.Stat(filepath.Join(home, tc.state, "data", "pod-upgrade-trigger.db")); err != nil {
				t.Errorf("no event log under %s: %v", tc.state, err)
			}
		})
	}
}

// TestE2ERegistryPush drives a registry push end to end with no hand-made payload: a real
// docker-registry whose notifications point at the server, and podman push. A push of v2 ends
// with the unit's container on v2; the same image pushed again is up to date; a push to another
// repository restarts nothing. A second endpoint with a wrong token is refused 401 on every
// retry of the same events, which never become claims of their own: each pushed manifest is
// claimed once, under its Distribution event id.
func TestE2ERegistryPush(t *testing.T) {
	r := needRig(t)
	token := rigUniqueName(t, "token")
	registries := filepath.Join(r.TempDir(t), "registries.conf") // read by the server's tasks, as the rig's user
	s := startE2EServer(t, registryTokenEnv("distribution")+"="+token, "CONTAINERS_REGISTRIES_CONF="+registries)
	base := rigUniqueName(t, "app")
	hook := s.url + "/registry/distribution/" + base
	// The README's notifications section, plus a second endpoint whose token is wrong.
	reg := r.StartRegistry(t, fmt.Sprintf(`notifications:
  endpoints:
    - name: webhook-auto-update
      url: %[1]s
      headers:
        Authorization: [Bearer %[2]s]
      timeout: 5s
      threshold: 3
      backoff: 1s
      ignoredmediatypes:
        - application/octet-stream
    - name: wrong-token
      url: %[1]s
      headers:
        Authorization: [Bearer wrong-%[2]s]
      timeout: 5s
      threshold: 1
      backoff: 1s
`, hook, token))
	// The redeploy's podman pull reads the server's registries.conf: the rig user's, and this
	// registry.
	rigConf, err := os.ReadFile(filepath.Join(r.home, ".config", "containers", "registries.conf"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	if err := os.WriteFile(registries, fmt.Appendf(rigConf, "\n[[registry]]\nlocation = %q\ninsecure = true\n", reg), 0o644); err != nil {
		t.Fatal(err)
	}

	name := rigUniqueName(t, "demo")
	ref := reg + "/e2e/" + name + ":latest"
	_, id1 := r.PushImage(t, "e2e/"+name, "latest", "v1") // built through the rig's registry
	_, id2 := r.PushImage(t, "e2e/"+name, "latest", "v2")
	if id1 == id2 {
		t.Fatal("v1 and v2 have the same image ID")
	}
	r.TagLocal(t, id1, ref)
	unit, ctr := e2eNamedContainerUnit(t, r, base, ref, id1)
	// pushTo pushes a local image to the notifying registry without retagging it here, so the
	// host keeps running and holding what it had.
	pushTo := func(t *testing.T, id, dest string) time.Time {
		t.Helper()
		if out, err := r.Podman(t, "push", "--quiet", "--tls-verify=false", id, "docker://"+dest); err != nil {
			t.Fatalf("push %s: %v %s", dest, err, out)
		}
		return time.Now()
	}
	claims := func() []string {
		rows, err := s.db.Query(`SELECT delivery_id FROM github_deliveries WHERE unit = ? ORDER BY rowid`, unit)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		var ids []string
		for rows.Next() {
			var id string
			rows.Scan(&id)
			ids = append(ids, id)
		}
		return ids
	}
	// nextClaim waits for the claim after the n claims so far, notes when it was seen, and waits
	// for its task to end.
	var claimed time.Time
	nextClaim := func(t *testing.T, n int) (string, []taskRow) {
		t.Helper()
		var ids []string
		r.WaitFor(t, 60*time.Second, func() bool { ids = claims(); return len(ids) > n }, "the registry's push to be claimed")
		claimed = time.Now()
		if len(ids) != n+1 {
			t.Fatalf("claims %v after %d: one push was claimed more than once", ids, n)
		}
		return ids[n], s.waitTask(t, r, ids[n])
	}
	rowCount := func(where string) int {
		var n int
		if err := s.db.QueryRow(`SELECT count(*) FROM event_log WHERE action = 'registry-webhook' AND ` + where).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}

	pushTo(t, id1, ref)
	id, rows := nextClaim(t, 0)
	if last := rows[len(rows)-1].step; last != "up-to-date" || !strings.HasPrefix(id, "dist-") {
		t.Fatalf("push of the running image: claim %s, steps %v; want a dist- claim ending up-to-date; server log:\n%s", id, steps(rows), s.log)
	}

	pushed := pushTo(t, id2, ref)
	id, rows = nextClaim(t, 1)
	r.WaitFor(t, 60*time.Second, func() bool { return r.ContainerImage(t, ctr) == id2 }, ctr+" to run v2")
	running := time.Since(pushed)
	if got := strings.Join(steps(rows), ","); got != "started,pulled,restarted,healthy,completed" {
		t.Fatalf("push of v2: claim %s, steps %s; server log:\n%s", id, got, s.log)
	}
	t.Logf("podman push of v2 → claimed within %s → container on v2 after %s (claim %s)",
		claimed.Sub(pushed).Round(time.Millisecond), running.Round(time.Millisecond), id)

	t.Run("same image pushed again is up to date", func(t *testing.T) {
		pid := r.Show(t, unit, "MainPID")["MainPID"]
		pushTo(t, id2, ref)
		_, rows := nextClaim(t, 2)
		if last := rows[len(rows)-1].step; last != "up-to-date" {
			t.Fatalf("steps %v, want to end up-to-date", steps(rows))
		}
		if now := r.Show(t, unit, "MainPID")["MainPID"]; now != pid {
			t.Fatalf("MainPID changed %s → %s: the unit was restarted", pid, now)
		}
	})

	t.Run("a push to another repository restarts nothing", func(t *testing.T) {
		pid := r.Show(t, unit, "MainPID")["MainPID"]
		before := rowCount(`json_extract(meta, '$.reason') = 'repository-mismatch'`)
		pushTo(t, id2, reg+"/e2e/"+name+"-other:latest") // v1 is gone: the redeploy pruned it
		r.WaitFor(t, 60*time.Second, func() bool { return rowCount(`json_extract(meta, '$.reason') = 'repository-mismatch'`) > before },
			"the push to another repository to be answered")
		if ids := claims(); len(ids) != 3 {
			t.Fatalf("claims %v: the push to another repository was claimed", ids)
		}
		if now := r.Show(t, unit, "MainPID")["MainPID"]; now != pid || r.ContainerImage(t, ctr) != id2 {
			t.Fatalf("MainPID %s → %s, image %s: the unit was touched", pid, now, r.ContainerImage(t, ctr))
		}
	})

	t.Run("a wrong token is refused on every retry and never claimed", func(t *testing.T) {
		r.WaitFor(t, 60*time.Second, func() bool { return rowCount(`status = 401`) >= 3 }, "the wrong-token endpoint to retry a refused event")
		refused, claimed := rowCount(`status = 401`), claims()
		if len(claimed) != 3 {
			t.Fatalf("claims %v after %d refused retries: want the 3 pushes claimed once each", claimed, refused)
		}
		t.Logf("%d refused requests from the wrong-token endpoint; claims %v", refused, claimed)
	})
}

// Proof suites (issue 7): fuzzing of the request path's parsers, an adversarial table against
// the running server, faults, load and benchmarks. Fake podman, systemctl and systemd-run are
// podman_test.go's (newFakeHostWithRun): every program the server runs is recorded, and PATH
// holds nothing real.

// hubSignature is GitHub's X-Hub-Signature-256 value for body under secret.
func hubSignature(secret string, body []byte) string {
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write(body)
	return "sha256=" + hex.EncodeToString(mac.Sum(nil))
}

// TestVerifySignatureGitHubVector checks the example GitHub documents for validating webhook
// deliveries, and the header shapes around it. Hex digits are accepted in either case: they
// encode the same 32 bytes, which are compared in constant time, so accepting "ABCD" as well as
// "abcd" gives an attacker nothing. The "sha256=" prefix itself must be lowercase, as GitHub
// sends it.
func TestVerifySignatureGitHubVector(t *testing.T) {
	const (
		secret = "It's a Secret to Everybody"
		body   = "Hello, World!"
		sig    = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
	)
	if got := hubSignature(secret, []byte(body)); got != sig {
		t.Fatalf("hubSignature = %s, want GitHub's %s", got, sig)
	}
	for _, tc := range []struct {
		name, secret, body, header string
		ok                         bool
	}{
		{"GitHub's example", secret, body, sig, true},
		{"surrounding spaces", secret, body, "  " + sig + "\t", true},
		{"uppercase hex digits", secret, body, "sha256=" + strings.ToUpper(strings.TrimPrefix(sig, "sha256=")), true},
		{"uppercase prefix", secret, body, "SHA256=" + strings.TrimPrefix(sig, "sha256="), false},
		{"another body", secret, body + "\n", sig, false},
		{"another secret", secret + " ", body, sig, false},
		{"one digit changed", secret, body, sig[:len(sig)-1] + "f", false},
		{"truncated", secret, body, sig[:len(sig)-2], false},
		{"odd length", secret, body, sig[:len(sig)-1], false},
		{"doubled", secret, body, sig + strings.TrimPrefix(sig, "sha256="), false},
		{"sha1 form", secret, body, "sha1=" + strings.TrimPrefix(sig, "sha256=")[:40], false},
		{"no prefix", secret, body, strings.TrimPrefix(sig, "sha256="), false},
		{"empty", secret, body, "", false},
		{"prefix only", secret, body, "sha256=", false},
		{"two signatures", secret, body, sig + "," + sig, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := verifySignature(tc.secret, []byte(tc.body), tc.header)
			if (err == nil) != tc.ok {
				t.Fatalf("verifySignature(%q) = %v, want ok %v", tc.header, err, tc.ok)
			}
			if err != nil && strings.Contains(err.Error(), hubSignature(tc.secret, []byte(tc.body))[7:]) {
				t.Errorf("the error %q tells the expected signature", err)
			}
		})
	}
}

// FuzzVerifySignature: a header is accepted only when it is "sha256=" and the hex of the body's
// HMAC (in either case, with surrounding space); the right signature is always accepted; an
// error never tells the expected signature.
func FuzzVerifySignature(f *testing.F) {
	f.Add("It's a Secret to Everybody", []byte("Hello, World!"), "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17")
	f.Add("s", []byte("{}"), "sha1=0123456789abcdef0123456789abcdef01234567")
	f.Add("s", []byte(""), "sha256=0")
	f.Add("", []byte("x"), "sha256="+strings.Repeat("zz", 32))
	f.Add("k", []byte("body"), " SHA256= ")
	f.Fuzz(func(t *testing.T, secret string, body []byte, header string) {
		want := hubSignature(secret, body)
		err := verifySignature(secret, body, header)
		if err == nil {
			h := strings.TrimSpace(header)
			hexSig, ok := strings.CutPrefix(h, "sha256=")
			if !ok || !strings.EqualFold(hexSig, want[len("sha256="):]) {
				t.Fatalf("header %q accepted for a body whose signature is %s", header, want)
			}
		} else if strings.Contains(err.Error(), want[len("sha256="):]) {
			t.Errorf("error %q tells the expected signature", err)
		}
		if err := verifySignature(secret, body, want); err != nil {
			t.Errorf("the right signature %s was refused: %v", want, err)
		}
	})
}

// FuzzDecodeManual decodes manual API bodies the way the handlers do (decodeStrict into the
// request structs) and follows the values to where they would reach a command: what decodes
// strictly also decodes with encoding/json to the same value (one object, no trailing data;
// duplicate keys take the last value, as encoding/json does), every unit planTrigger would run
// passes validUnitName and cannot start with "-", and an image parseImageRef accepts keeps its
// invariants.
func FuzzDecodeManual(f *testing.F) {
	for _, s := range []string{
		`{"token":"t","units":["a","b.service"],"all":true,"dry_run":true,"caller":"ci","reason":"r"}`,
		`{"token":"t","image":"ghcr.io/o/n:1","force":true}`,
		`{"token":"wrong","token":"t"}`,
		`{"token":123}`,
		`{"TOKEN":"t","Units":["-q"]}`,
		`{"units":["--authfile=x","-.slice","foo@*.service","../x","%2e%2e","a\u0000","a\nb"]}`,
		`{"image":"docker-archive:/tmp/x.tar"}`,
		`{"image":" containers-storage:ghcr.io/o/n:1 "}`,
		`{"token":"t"} {"units":["x"]}`,
		`{"token":"t"}garbage`,
		`null`, `[]`, ``, `  `, `{`,
	} {
		f.Add([]byte(s))
	}
	cfg := &config{autoUpdateUnit: "podman-auto-update.service", manualUnits: []string{"extra", "-bad"}}
	f.Fuzz(func(t *testing.T, body []byte) {
		var tr manualTriggerRequest
		if decodeStrict(bytes.NewReader(body), &tr) == nil {
			sameAsUnmarshal(t, body, &tr, &manualTriggerRequest{})
			for _, p := range planTrigger(cfg, tr.Units, tr.All) {
				if p.Status != triggerInvalid {
					checkUnitInvariants(t, p.Unit, p.Unit)
				}
			}
			for _, s := range []string{cleanText(tr.Caller, manualTextMax), cleanText(tr.Reason, manualTextMax)} {
				if strings.ContainsAny(s, "\n\r\x00\x1b") || len([]rune(s)) > manualTextMax {
					t.Errorf("cleanText left %q", s)
				}
			}
		}
		var sr manualServiceRequest
		if decodeStrict(bytes.NewReader(body), &sr) == nil {
			sameAsUnmarshal(t, body, &sr, &manualServiceRequest{})
			if ref, err := parseImageRef(strings.TrimSpace(sr.Image)); err == nil {
				checkRefInvariants(t, ref)
			}
		}
	})
}

// sameAsUnmarshal checks that encoding/json reads a body decodeStrict accepted the same way;
// decodeStrict also accepts an empty body, which encoding/json refuses.
func sameAsUnmarshal(t *testing.T, body []byte, strict, plain any) {
	t.Helper()
	if len(bytes.TrimSpace(body)) == 0 {
		return
	}
	if err := json.Unmarshal(body, plain); err != nil {
		t.Fatalf("decodeStrict accepted %q, encoding/json refuses it: %v", body, err)
	}
	if !reflect.DeepEqual(strict, plain) {
		t.Errorf("%q decodes as %+v strictly, %+v plainly", body, strict, plain)
	}
}

// Adversarial requests against the running server.

const (
	advSecret      = "adv webhook secret"
	advToken       = "adv-TOKEN-5f1e2d3c"
	advManualToken = "adv-MANUAL-9a8b7c6d"
	advWrongToken  = "adv-WRONG-0c0c0c0c"
	advMaxBody     = 64 << 10
	sigRight       = "<sign>" // advCase.sig: the right signature of the case's body
	advUnitPath    = "/github-package-update/web"
)

// rawExchange writes one request by hand, so target and headers reach the server exactly as
// written; the body goes with a Content-Length or, when chunked, as chunks without one. The body
// is written while the answer is read, so a server that answers early (413) cannot deadlock it.
func rawExchange(addr, method, target string, header [][2]string, body []byte, chunked bool) (*http.Response, string, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(hangGuard))
	var head strings.Builder
	fmt.Fprintf(&head, "%s %s HTTP/1.1\r\nHost: test\r\nConnection: close\r\n", method, target)
	for _, h := range header {
		fmt.Fprintf(&head, "%s: %s\r\n", h[0], h[1])
	}
	switch {
	case chunked:
		head.WriteString("Transfer-Encoding: chunked\r\n")
	case body != nil:
		fmt.Fprintf(&head, "Content-Length: %d\r\n", len(body))
	}
	head.WriteString("\r\n")
	go func() {
		w := bufio.NewWriter(c)
		w.WriteString(head.String())
		if !chunked {
			w.Write(body)
		} else {
			for i := 0; i < len(body); i += 4096 {
				chunk := body[i:min(i+4096, len(body))]
				fmt.Fprintf(w, "%x\r\n%s\r\n", len(chunk), chunk)
			}
			w.WriteString("0\r\n\r\n")
		}
		w.Flush() // an error means the server answered and closed early
	}()
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: method})
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp, string(b), err
}

// advCase is one adversarial request and what must come of it.
type advCase struct {
	name     string
	method   string // default POST
	target   string // default advUnitPath
	event    string // X-GitHub-Event on GitHub routes: default "package", "-" none
	delivery string // X-GitHub-Delivery on GitHub routes: default a fresh id
	sig      string // X-Hub-Signature-256 on GitHub routes: sigRight, a literal value, or "" none
	header   [][2]string
	body     []byte
	chunked  bool

	status   int
	text     string   // part of the answer
	action   string   // the row's action
	reason   string   // the row's meta reason (or error code, on the manual API)
	calls    []string // programs run, as runFake keys, in order
	readOnly bool     // instead of calls: only commands that read (a dry run's plan) may run
	argvHas  string   // part of the last systemd-run command line
}

// readOnlyCommands are the runFake keys of commands that change nothing.
var readOnlyCommands = map[string]bool{"podman-image-inspect": true, "podman-image-exists": true, "podman-ps": true, "systemctl-show": true}

// advServer is the server under attack with recording fakes for everything it may run.
type advServer struct {
	*testServer
	h *fakeHost
}

func newAdvServer(t *testing.T, env map[string]string) *advServer {
	t.Helper()
	h, _ := newFakeHostWithRun(t)
	full := map[string]string{
		"GITHUB_WEBHOOK_SECRET":  advSecret,
		"WEBHOOK_TOKEN":          advToken,
		"WEBHOOK_MANUAL_TOKEN":   advManualToken,
		"GITHUB_ALLOWED_EVENTS":  "package,registry_package,ping",
		"WEBHOOK_MAX_BODY_BYTES": strconv.Itoa(advMaxBody),
	}
	for k, v := range env {
		full[k] = v
	}
	ts := newTestServer(t, full, nil)
	// No Quadlet file of the operator's may steer the match, and every lookup is counted.
	ts.srv.getenv = mapEnv(map[string]string{"HOME": t.TempDir()})
	ts.srv.units.ttl = 0
	return &advServer{testServer: ts, h: h}
}

// settleQueue runs the dispatcher until nothing is due and then ends every task it started, as
// run-task does, so the next request finds no task running.
func (s *advServer) settleQueue(t *testing.T) {
	t.Helper()
	s.drain(t)
	for _, c := range s.h.callsOf(keySystemdRun) {
		if err := s.events.settleTask(context.Background(), taskUnitName(c[len(c)-2]), "done", "", time.Time{}, nil); err != nil {
			t.Fatal(err)
		}
	}
}

// runAdvCases sends every case, checks its answer and what ran, then closes the server and
// checks that each request left its row. It returns the number of cases.
func runAdvCases(t *testing.T, s *advServer, cases []advCase) int {
	t.Helper()
	ids := make([]string, len(cases))
	for i := range cases {
		c := &cases[i]
		if c.method == "" {
			c.method = "POST"
		}
		if c.target == "" {
			c.target = advUnitPath
		}
		header := slices.Clone(c.header)
		if strings.HasPrefix(c.target, "/github-package-update/") {
			if c.event == "" {
				c.event = "package"
			}
			if c.event != "-" {
				header = append(header, [2]string{"X-GitHub-Event", c.event})
			}
			if c.delivery == "" {
				c.delivery = fmt.Sprintf("adv-%d", i)
			}
			header = append(header, [2]string{"X-GitHub-Delivery", c.delivery})
			switch c.sig {
			case "":
			case sigRight:
				header = append(header, [2]string{"X-Hub-Signature-256", hubSignature(advSecret, c.body)})
			default:
				header = append(header, [2]string{"X-Hub-Signature-256", c.sig})
			}
		}
		before := len(s.h.calls())
		resp, body, err := rawExchange(s.Listener.Addr().String(), c.method, c.target, header, c.body, c.chunked)
		if err != nil {
			t.Errorf("%s: %s %s: %v", c.name, c.method, c.target, err)
			continue
		}
		s.settleQueue(t)
		ids[i] = resp.Header.Get("X-Request-Id")
		if resp.StatusCode != c.status || !strings.Contains(body, c.text) {
			t.Errorf("%s: %s %s = %d %q, want %d containing %q", c.name, c.method, c.target, resp.StatusCode, body, c.status, c.text)
		}
		if c.status == http.StatusMethodNotAllowed && resp.Header.Get("Allow") == "" {
			t.Errorf("%s: 405 without an Allow header", c.name)
		}
		calls := s.h.calls()[before:]
		var keys []string
		for _, call := range calls {
			keys = append(keys, call[0]+"-"+fakeVerb(call[0], call[1:]))
		}
		switch {
		case c.readOnly:
			for _, k := range keys {
				if !readOnlyCommands[k] {
					t.Errorf("%s: ran %s, which is not read-only:\n%s", c.name, k, fakeCallLines(calls))
				}
			}
		case !slices.Equal(keys, c.calls):
			t.Errorf("%s: ran %q, want %q:\n%s", c.name, keys, c.calls, fakeCallLines(calls))
		}
		if c.argvHas != "" {
			run := s.h.callsOf(keySystemdRun)
			if len(run) == 0 || !strings.Contains(strings.Join(run[len(run)-1], " "), c.argvHas) {
				t.Errorf("%s: the last systemd-run call lacks %q:\n%s", c.name, c.argvHas, fakeCallLines(run))
			}
		}
	}
	rows := s.rows(t)
	for i, c := range cases {
		if ids[i] == "" {
			continue
		}
		r, ok := rows[ids[i]]
		if !ok {
			t.Errorf("%s: no event row for request %s", c.name, ids[i])
			continue
		}
		var meta map[string]any
		json.Unmarshal([]byte(r.meta), &meta)
		if r.status != c.status || (c.action != "" && r.action != c.action) {
			t.Errorf("%s: row status %d action %s, want %d %s", c.name, r.status, r.action, c.status, c.action)
		}
		if c.reason != "" && meta["reason"] != c.reason && meta["error"] != c.reason {
			t.Errorf("%s: row reason %v error %v, want %s", c.name, meta["reason"], meta["error"], c.reason)
		}
	}
	return len(cases)
}

// TestAdversarialRequests sends every request shape the issue lists, and more, to the running
// server. Each case names its status, the programs it may run (nothing, for every refusal) and
// its event row. Decisions this table documents:
//   - hex digits of the signature are accepted in either case (the same 32 bytes); the
//     "sha256=" prefix must be lowercase; when the header comes twice, the first one counts;
//   - a correctly signed body that is not JSON is 400 (GitHub's delivery log must not show a
//     success for a body the server could not read); JSON that is not a package event, or a
//     package event whose action is not published or updated, is 202 "ignored";
//   - a payload may name only a registry host in WEBHOOK_REGISTRY_HOSTS (default ghcr.io), else
//     403;
//   - the manual API reads JSON with encoding/json: a duplicated key takes the last value, keys
//     match case-insensitively ("TOKEN" is "token"), a value of the wrong type is 400 before the
//     token is checked, and anything after the object is 400;
//   - a token is taken from "Authorization: Bearer" or the JSON body on the manual API, never
//     from its query string; /auto-update and the GET routes also take ?token=;
//   - owner and name in a payload are lowercased (GitHub's names are case-insensitive, OCI
//     paths are lowercase), but an image given to the manual API must already be a valid
//     reference: nothing there is rewritten.
func TestAdversarialRequests(t *testing.T) {
	s := newAdvServer(t, nil)
	pkg := func(owner, name, tag string) []byte { return githubPackagePayload("ghcr.io", owner, name, tag, "") }
	pkgHost := func(host string) []byte { return githubPackagePayload(host, "octo-org", "web", "v1", "") }
	ok := pkg("octo-org", "web", "v1")
	hexOK := hubSignature(advSecret, ok)[len("sha256="):]
	sha1Sig := func(body []byte) string {
		mac := hmac.New(sha1.New, []byte(advSecret))
		mac.Write(body)
		return "sha1=" + hex.EncodeToString(mac.Sum(nil))
	}
	queued := []string{"systemctl-show", keySystemdRun}
	bearer := func(tok string) [][2]string { return [][2]string{{"Authorization", "Bearer " + tok}} }
	trigger := func(body string) []byte { return []byte(body) }
	service := func(image string) []byte {
		b, _ := json.Marshal(map[string]any{"image": image})
		return b
	}
	long := strings.Repeat("a", 256)

	cases := []advCase{
		// The delivery that works, as the control.
		{name: "valid delivery", body: ok, sig: sigRight, status: 202, text: "auto-update queued", action: "github-webhook",
			reason: "queued", calls: queued, argvHas: " -- web.service ghcr.io/octo-org/web:v1 package adv-0 " + advUnitPath},

		// Every shape of a bad signature: 401, nothing run, the refusal recorded.
		{name: "no signature header", body: ok, status: 401, reason: "bad-signature"},
		{name: "empty signature header", body: ok, sig: " ", status: 401, reason: "bad-signature"},
		{name: "sha1 signature only", body: ok, header: [][2]string{{"X-Hub-Signature", sha1Sig(ok)}}, status: 401, reason: "bad-signature"},
		{name: "sha1 value in the sha256 header", body: ok, sig: sha1Sig(ok), status: 401, reason: "bad-signature"},
		{name: "prefix only", body: ok, sig: "sha256=", status: 401, reason: "bad-signature"},
		{name: "odd-length hex", body: ok, sig: "sha256=" + hexOK[:63], status: 401, reason: "bad-signature"},
		{name: "non-hex digits", body: ok, sig: "sha256=" + strings.Repeat("zz", 32), status: 401, reason: "bad-signature"},
		{name: "wrong signature", body: ok, sig: "sha256=" + strings.Repeat("0", 64), status: 401, reason: "bad-signature"},
		{name: "right signature of another body", body: ok, sig: hubSignature(advSecret, pkg("octo-org", "web", "v2")), status: 401, reason: "bad-signature"},
		{name: "signature under another secret", body: ok, sig: hubSignature(advSecret+"x", ok), status: 401, reason: "bad-signature"},
		{name: "right signature, one more byte of body", body: append(slices.Clone(ok), ' '), sig: hubSignature(advSecret, ok), status: 401, reason: "bad-signature"},
		{name: "uppercase prefix", body: ok, sig: "SHA256=" + hexOK, status: 401, reason: "bad-signature"},
		{name: "no prefix", body: ok, sig: hexOK, status: 401, reason: "bad-signature"},
		{name: "signature twice in one header", body: ok, sig: "sha256=" + hexOK + ",sha256=" + hexOK, status: 401, reason: "bad-signature"},
		{name: "twice as long", body: ok, sig: "sha256=" + hexOK + hexOK, status: 401, reason: "bad-signature"},
		{name: "two headers, the wrong one first", body: ok, header: [][2]string{{"X-Hub-Signature-256", "sha256=" + strings.Repeat("0", 64)},
			{"X-Hub-Signature-256", "sha256=" + hexOK}}, status: 401, reason: "bad-signature"},
		{name: "two headers, the right one first", body: ok, header: [][2]string{{"X-Hub-Signature-256", "sha256=" + hexOK},
			{"X-Hub-Signature-256", "sha256=" + strings.Repeat("0", 64)}}, status: 202, reason: "queued", calls: queued},
		{name: "uppercase hex digits are the same signature", body: ok, sig: "sha256=" + strings.ToUpper(hexOK), status: 202, reason: "queued", calls: queued},
		{name: "bad signature with a ping", event: "ping", body: []byte(`{"zen":"x"}`), sig: "sha256=" + hexOK, status: 401, reason: "bad-signature"},

		// Bodies over the cap, announced or not.
		{name: "oversize body with Content-Length", body: bytes.Repeat([]byte("x"), advMaxBody+1), sig: sigRight, status: 413, action: "body-too-large"},
		{name: "oversize chunked body", body: bytes.Repeat([]byte("x"), 4*advMaxBody), sig: sigRight, chunked: true, status: 413,
			action: "github-webhook", reason: "body-too-large"},
		{name: "chunked body under the cap", body: ok, sig: sigRight, chunked: true, status: 202, reason: "queued", calls: queued},
		{name: "oversize chunked body to the manual API", target: "/api/manual/trigger", header: bearer(advManualToken),
			body: bytes.Repeat([]byte(" "), 4*advMaxBody), chunked: true, status: 413, action: "manual-trigger", reason: "body-too-large"},

		// Events and delivery ids.
		{name: "ping", event: "ping", body: []byte(`{"zen":"Design for failure.","hook_id":1}`), sig: sigRight, status: 200, text: "pong", action: "github-ping"},
		{name: "event not allowed", event: "push", body: ok, sig: sigRight, status: 202, text: "event ignored", reason: "event-not-allowed"},
		{name: "no event header", event: "-", body: ok, sig: sigRight, status: 400, reason: "bad-event-header"},
		{name: "event header in capitals", event: "Package", body: ok, sig: sigRight, status: 400, reason: "bad-event-header"},
		{name: "push payload as a package event", body: []byte(`{"ref":"refs/heads/main","repository":{"owner":{"login":"o"}}}`), sig: sigRight,
			status: 202, reason: "not-a-package"},
		{name: "signed body that is not JSON", body: []byte("payload=%7B%7D"), sig: sigRight, status: 400, reason: "invalid-json"},
		{name: "signed body cut short", body: ok[:len(ok)-1], sig: hubSignature(advSecret, ok[:len(ok)-1]), status: 400, reason: "invalid-json"},
		{name: "signed JSON that is not an object", body: []byte(`[1,2]`), sig: sigRight, status: 400, reason: "invalid-json"},
		{name: "package deleted", body: withAction(ok, "deleted"), sig: sigRight, status: 202, text: `action "deleted" does not redeploy`, reason: "action-ignored"},
		{name: "package without an action", body: withAction(ok, ""), sig: sigRight, status: 202, reason: "action-ignored"},
		{name: "package updated", body: withAction(ok, "updated"), sig: sigRight, status: 202, reason: "queued", calls: queued},
		{name: "registry host not allowed", body: pkgHost("registry.example.com"), sig: sigRight, status: 403,
			text: "WEBHOOK_REGISTRY_HOSTS", reason: "registry-not-allowed"},
		{name: "GitHub Enterprise host not allowed by default", body: pkgHost("containers.ghe.example.com"), sig: sigRight, status: 403,
			reason: "registry-not-allowed"},
		{name: "npm package", body: loadPayload(t, "package-published-npm.json"), sig: sigRight, status: 202, reason: "not-container"},
		{name: "untagged manifest", body: loadPayload(t, "package-published-untagged.json"), sig: sigRight, status: 202, reason: "missing-tag"},
		{name: "empty tag", body: pkg("octo-org", "web", ""), sig: sigRight, status: 202, reason: "missing-tag"},
		{name: "registry_package event", event: "registry_package", body: loadPayload(t, "registry-package-published-container.json"), sig: sigRight,
			status: 202, reason: "queued", calls: queued, argvHas: " ghcr.io/octo-org/hello-world:v1.2.3 registry_package "},
		{name: "uppercase owner and name are lowercased", body: pkg("Octo-ORG", "Web", "v1"), sig: sigRight, status: 202, reason: "queued",
			calls: queued, argvHas: " -- web.service ghcr.io/octo-org/web:v1 package "},
		{name: "delivery id with a path", delivery: "../../x", body: ok, sig: sigRight, status: 400, reason: "bad-delivery-header"},
		{name: "delivery id that reads as a flag", delivery: "-rf", body: ok, sig: sigRight, status: 400, reason: "bad-delivery-header"},
		{name: "delivery id of 200 characters", delivery: strings.Repeat("d", 200), body: ok, sig: sigRight, status: 400, reason: "bad-delivery-header"},
		{name: "first copy of a delivery", delivery: "adv-dup", body: ok, sig: sigRight, status: 202, reason: "queued", calls: queued},
		{name: "second copy of a delivery", delivery: "adv-dup", body: ok, sig: sigRight, status: 202, text: "duplicate delivery",
			reason: "duplicate", calls: []string{"systemctl-show"}},

		// Unit values in the path: refused before anything runs.
		{name: "unit --authfile=x", target: "/github-package-update/--authfile=x", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit -q", target: "/github-package-update/-q", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit -.slice", target: "/github-package-update/-.slice", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit foo@*.service", target: "/github-package-update/foo@*.service", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit template without instance", target: "/github-package-update/foo@.service", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit ../x", target: "/github-package-update/../x", body: ok, sig: sigRight, status: 404, action: "not-found"},
		{name: "unit %2e%2e", target: "/github-package-update/%2e%2e", body: ok, sig: sigRight, status: 404, action: "not-found"},
		{name: "unit %2e%2e%2fx", target: "/github-package-update/%2e%2e%2fx", body: ok, sig: sigRight, status: 404, action: "not-found"},
		{name: "unit with NUL", target: "/github-package-update/foo%00", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit with newline", target: "/github-package-update/foo%0a-q", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit with CRLF", target: "/github-package-update/foo%0d%0aX-Evil:%201", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit with an encoded slash", target: "/github-package-update/foo%2f-q", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit prefix then a flag", target: "/github-package-update/github-package-update%2f-q", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit leading slash then a flag", target: "/github-package-update/%2f-x", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit with a backslash", target: "/github-package-update/foo%5cx", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit with a space", target: "/github-package-update/foo%20bar", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit of 256 bytes", target: "/github-package-update/" + strings.Repeat("a", 248), body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit of 255 bytes is fine", target: "/github-package-update/" + strings.Repeat("a", 247), body: ok, sig: sigRight, status: 202,
			reason: "queued", calls: queued},
		{name: "unit through /redeploy", target: "/github-package-update/-q/redeploy", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},

		// Image values in the payload: refused whole before anything runs.
		{name: "name -q", body: pkg("octo-org", "-q", "v1"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "name --authfile=x", body: pkg("octo-org", "--authfile=x", "v1"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "owner -q", body: pkg("-q", "web", "v1"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "tag --authfile=x", body: pkg("octo-org", "web", "--authfile=x"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "tag -q", body: pkg("octo-org", "web", "-q"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "name ../x", body: pkg("octo-org", "../x", "v1"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "name %2e%2e", body: pkg("octo-org", "%2e%2e", "v1"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "name with NUL", body: pkg("octo-org", "a\x00b", "v1"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "tag with a newline", body: pkg("octo-org", "web", "v1\n--tls-verify=false"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "name of 256 characters", body: pkg("octo-org", long, "v1"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "tag of 129 characters", body: pkg("octo-org", "web", strings.Repeat("t", 129)), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "name is a transport", body: pkg("octo-org", "docker-archive:/tmp/x.tar", "v1"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "registry docker-archive:", body: pkgHost("docker-archive:"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "registry dir:", body: pkgHost("dir:"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "registry containers-storage:", body: pkgHost("containers-storage:"), sig: sigRight, status: 400, reason: "invalid-image"},

		// Manual API: tokens and JSON.
		{name: "trigger without a token", target: "/api/manual/trigger", body: trigger(`{"units":["a"]}`), status: 401, action: "manual-trigger", reason: "unauthorized"},
		{name: "trigger with an empty body", target: "/api/manual/trigger", status: 401, reason: "unauthorized"},
		{name: "trigger token too short", target: "/api/manual/trigger", body: trigger(`{"token":"` + advManualToken[:8] + `"}`), status: 401, reason: "unauthorized"},
		{name: "trigger token too long", target: "/api/manual/trigger", body: trigger(`{"token":"` + advManualToken + `x"}`), status: 401, reason: "unauthorized"},
		{name: "trigger with the webhook token", target: "/api/manual/trigger", body: trigger(`{"token":"` + advToken + `"}`), status: 401, reason: "unauthorized"},
		{name: "token of the wrong JSON type", target: "/api/manual/trigger", body: trigger(`{"token":12345}`), status: 400, reason: "bad-json"},
		{name: "token as a list", target: "/api/manual/trigger", body: trigger(`{"token":["` + advManualToken + `"]}`), status: 400, reason: "bad-json"},
		{name: "token null", target: "/api/manual/trigger", body: trigger(`{"token":null,"units":["a"]}`), status: 401, reason: "unauthorized"},
		{name: "duplicated token key, the right one last", target: "/api/manual/trigger",
			body: trigger(`{"token":"` + advWrongToken + `","token":"` + advManualToken + `","units":["a"],"dry_run":true}`), status: 202},
		{name: "duplicated token key, the right one first", target: "/api/manual/trigger",
			body: trigger(`{"token":"` + advManualToken + `","token":"` + advWrongToken + `","units":["a"],"dry_run":true}`), status: 401, reason: "unauthorized"},
		{name: "token key in capitals", target: "/api/manual/trigger", body: trigger(`{"TOKEN":"` + advManualToken + `","units":["a"],"dry_run":true}`), status: 202},
		{name: "trailing object", target: "/api/manual/trigger", body: trigger(`{"token":"` + advManualToken + `","units":["a"]} {"units":["b"]}`), status: 400, reason: "bad-json"},
		{name: "trailing garbage", target: "/api/manual/trigger", body: trigger(`{"token":"` + advManualToken + `","units":["a"]}x`), status: 400, reason: "bad-json"},
		{name: "unknown field", target: "/api/manual/trigger", body: trigger(`{"token":"` + advManualToken + `","unit":"a"}`), status: 400, reason: "bad-json"},
		{name: "wrong bearer, right body token", target: "/api/manual/trigger", header: bearer(advWrongToken),
			body: trigger(`{"token":"` + advManualToken + `","units":["a"]}`), status: 401, reason: "unauthorized"},
		{name: "token in the query of the manual API", target: "/api/manual/trigger?token=" + advManualToken, body: trigger(`{"units":["a"]}`), status: 401, reason: "unauthorized"},
		{name: "only hostile units", target: "/api/manual/trigger", header: bearer(advManualToken),
			body: trigger(`{"units":["--authfile=x","-q","-.slice","foo@*.service","../x","%2e%2e","a\u0000","a\nb","` + long + `"]}`), status: 400},
		{name: "a hostile unit beside a good one", target: "/api/manual/trigger", header: bearer(advManualToken),
			body: trigger(`{"units":["-q","good"]}`), status: 207, calls: []string{"systemctl-restart"}},

		// Manual services API: unit names and images.
		{name: "service -q", target: "/api/manual/services/-q", header: bearer(advManualToken), body: []byte(`{}`), status: 400, reason: "invalid-unit"},
		{name: "service foo@*", target: "/api/manual/services/foo@*", header: bearer(advManualToken), body: []byte(`{}`), status: 400, reason: "invalid-unit"},
		{name: "service with NUL", target: "/api/manual/services/a%00", header: bearer(advManualToken), body: []byte(`{}`), status: 400, reason: "invalid-unit"},
		{name: "service %2e%2e", target: "/api/manual/services/%2e%2e", header: bearer(advManualToken), body: []byte(`{}`), status: 404, action: "not-found"},
		{name: "service without a token", target: "/api/manual/services/web", body: service("ghcr.io/o/n:1"), status: 401, reason: "unauthorized"},
		{name: "service image, valid", target: "/api/manual/services/web", header: bearer(advManualToken), body: service("ghcr.io/o/n:1"), status: 202,
			calls: []string{keySystemdRun}, argvHas: " -- web.service ghcr.io/o/n:1 manual "},
		{name: "service image, dry run", target: "/api/manual/services/web", header: bearer(advManualToken),
			body: []byte(`{"image":"ghcr.io/o/n:1","dry_run":true}`), status: 202, readOnly: true},
	}
	for _, img := range []string{"--authfile=x", "-q", "docker-archive:/tmp/x.tar", "docker-archive:ghcr.io/o/n:1", "dir:/tmp/x",
		"containers-storage:ghcr.io/o/n:1", "oci-archive:/tmp/x.tar", "docker://ghcr.io/o/n:1", "docker-daemon:ghcr.io/o/n:1",
		"ghcr.io/o/n:1\n--tls-verify=false", "ghcr.io/o/n:1\x00", "../x:1", "ghcr.io/%2e%2e/n:1", "ghcr.io/O/N:1", "ghcr.io/o/" + long + ":1", "nginx:latest"} {
		cases = append(cases, advCase{name: "service image " + strconv.Quote(img), target: "/api/manual/services/web",
			header: bearer(advManualToken), body: service(img), status: 400, reason: "invalid-image"})
	}
	cases = append(cases, []advCase{
		// Tokens in query strings, and the GET routes that take them.
		{name: "auto-update with the query token", method: "GET", target: "/auto-update?token=" + advToken, status: 202, action: "auto-update",
			calls: []string{"systemctl-start"}},
		{name: "auto-update with a wrong query token", method: "GET", target: "/auto-update?token=" + advWrongToken, status: 401, reason: "unauthorized"},
		{name: "auto-update with the manual token", method: "POST", target: "/auto-update?token=" + advManualToken, status: 401, reason: "unauthorized"},
		{name: "auto-update token hidden in a second parameter", method: "GET", target: "/auto-update?x=1&token=" + advWrongToken + "&token=" + advToken, status: 401},
		{name: "events with the query token", method: "GET", target: "/api/events?limit=1&token=" + advManualToken, status: 200, action: "events-api"},
		{name: "events with a wrong query token", method: "GET", target: "/api/events?token=" + advWrongToken, status: 401},
		{name: "hello with a token in the query", method: "GET", target: "/sse/hello?token=" + advToken, status: 200, action: "sse-hello"},

		// GET and other methods on POST routes.
		{name: "GET a delivery route", method: "GET", target: advUnitPath, status: 405, action: "method-not-allowed"},
		{name: "GET a redeploy route", method: "GET", target: advUnitPath + "/redeploy", status: 405, action: "method-not-allowed"},
		{name: "GET the manual trigger", method: "GET", target: "/api/manual/trigger?token=" + advManualToken, status: 405, action: "method-not-allowed"},
		{name: "GET a manual service", method: "GET", target: "/api/manual/services/web", status: 405, action: "method-not-allowed"},
		{name: "PUT a delivery route", method: "PUT", target: advUnitPath, body: ok, status: 405, action: "method-not-allowed"},
		{name: "DELETE the manual trigger", method: "DELETE", target: "/api/manual/trigger", status: 405, action: "method-not-allowed"},
		{name: "PUT auto-update", method: "PUT", target: "/auto-update?token=" + advToken, status: 405, action: "method-not-allowed"},
		{name: "HEAD auto-update", method: "HEAD", target: "/auto-update?token=" + advToken, status: 405, action: "auto-update"},
		{name: "POST the events API", method: "POST", target: "/api/events", status: 405, action: "method-not-allowed"},
	}...)
	n := runAdvCases(t, s, cases)

	// No token, secret or wrong token reaches a log line or a row, whatever the route.
	var stored strings.Builder
	for _, r := range readRows(t, rawDB(t, s.cfg.dbPath), "") {
		fmt.Fprintf(&stored, "%s %s %s\n", r.path.String, r.action, r.meta)
	}
	for _, secret := range []string{advToken, advManualToken, advWrongToken, advManualToken[:8], advSecret} {
		if strings.Contains(stored.String(), secret) {
			t.Errorf("%q reached an event row", secret)
		}
		if strings.Contains(s.logs.String(), secret) {
			t.Errorf("%q reached the log:\n%s", secret, s.logs)
		}
	}
	if !strings.Contains(stored.String(), "token=REDACTED") {
		t.Errorf("no row shows a redacted query token; rows:\n%s", stored.String())
	}
	t.Logf("%d adversarial requests", n)
}

// TestAdversarialSecretUnset: with no GITHUB_WEBHOOK_SECRET every delivery, signed or not, is
// refused with 500 and nothing runs.
func TestAdversarialSecretUnset(t *testing.T) {
	s := newAdvServer(t, map[string]string{"GITHUB_WEBHOOK_SECRET": ""})
	ok := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
	runAdvCases(t, s, []advCase{
		{name: "signed with the empty secret", body: ok, sig: hubSignature("", ok), status: 500, text: "server misconfigured", reason: "secret-unset"},
		{name: "unsigned", body: ok, status: 500, reason: "secret-unset"},
		{name: "ping", event: "ping", body: []byte(`{}`), sig: hubSignature("", []byte(`{}`)), status: 500, reason: "secret-unset"},
	})
}

// Registry push routes: one secret per source, units that name their image in a Quadlet file.
const (
	advRegistryToken = "adv-REGISTRY-3e4f5a6b"
	advGiteaSecret   = "adv gitea secret"
)

// newAdvRegistryServer is newAdvServer with every registry source's secret set and a Quadlet
// file per unit in images (unit name → Image=) under the server's HOME.
func newAdvRegistryServer(t *testing.T, env map[string]string, images map[string]string) *advServer {
	t.Helper()
	full := map[string]string{}
	for name := range registrySources {
		full[registryTokenEnv(name)] = advRegistryToken
	}
	full[registryTokenEnv("gitea")] = advGiteaSecret
	for k, v := range env {
		full[k] = v
	}
	s := newAdvServer(t, full)
	home := t.TempDir()
	dir := filepath.Join(home, ".config", "containers", "systemd")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for unit, image := range images {
		if err := os.WriteFile(filepath.Join(dir, unit+".container"), []byte("[Container]\nImage="+image+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	s.srv.getenv = mapEnv(map[string]string{"HOME": home})
	return s
}

// giteaHeaders are the headers Gitea sends with a package event, signed under secret.
func giteaHeaders(secret string, body []byte, delivery string) [][2]string {
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write(body)
	return [][2]string{{"X-Gitea-Event", "package"}, {"X-Gitea-Delivery", delivery}, {"X-Gitea-Signature", hex.EncodeToString(mac.Sum(nil))}}
}

// TestAdversarialRegistry sends each registry source the push it documents and every way of
// getting it wrong: missing and wrong credentials, other events, untagged pushes, hostile
// references, oversized bodies, units that name no image or another one. Each case names its
// status, what ran (nothing but the unit lookup, for every refusal) and its row; no secret
// reaches a row or the log, whether it came in a header, the query or the path.
func TestAdversarialRegistry(t *testing.T) {
	s := newAdvRegistryServer(t, nil, map[string]string{
		"dist":   "reg.example:5000/e2e/app",
		"harbor": "hub.harbor.com/test-webhook/debian:latest",
		"gitea":  "gitea.example.com/octo/web:v1.4.0",
		"hub":    "docker.io/svendowideit/testhook:latest",
		"quay":   "quay.io/mynamespace/repository:latest",
	})
	queued := []string{"systemctl-show", keySystemdRun}
	looked := []string{"systemctl-show"}
	bearer := func(tok string) [][2]string { return [][2]string{{"Authorization", "Bearer " + tok}} }
	okAuth := bearer(advRegistryToken)
	dist := func(events ...map[string]any) []byte { return distEnvelope(events...) }
	push := func(id, repo, tag string) map[string]any {
		return distEvent(id, "push", manifestV2, repo, tag, "reg.example:5000")
	}
	harbor := loadPayload(t, "harbor-push-artifact.json")
	gitea := loadPayload(t, "gitea-package-created.json")
	giteaID := "6b1e1a6c-3ef4-4c2e-9c41-0f8e2c3d4a5b"
	hub := loadPayload(t, "dockerhub-push.json")
	quay := loadPayload(t, "quay-push.json")
	huge := bytes.Repeat([]byte(" "), advMaxBody+1)
	cases := []advCase{
		// Distribution.
		{name: "distribution push", target: "/registry/distribution/dist", header: okAuth, body: dist(push("d-1", "e2e/app", "latest")),
			status: 202, text: "auto-update queued", action: "registry-webhook", reason: "queued", calls: queued,
			argvHas: " -- dist.service reg.example:5000/e2e/app:latest distribution dist-d-1 /registry/distribution/dist"},
		{name: "distribution retry of the same event", target: "/registry/distribution/dist", header: okAuth, body: dist(push("d-1", "e2e/app", "latest")),
			status: 202, text: "duplicate delivery", reason: "duplicate", calls: looked},
		{name: "distribution blobs and a manifest in one envelope", target: "/registry/distribution/dist", header: okAuth,
			body:   dist(distEvent("b-1", "push", "application/octet-stream", "e2e/app", "", "reg.example:5000"), push("d-2", "e2e/app", "latest")),
			status: 202, reason: "queued", calls: queued, argvHas: " distribution dist-d-2 "},
		{name: "distribution two tags, the unit's second", target: "/registry/distribution/dist", header: okAuth,
			body: dist(push("d-3", "e2e/app", "v9"), push("d-4", "e2e/app", "latest")), status: 202, reason: "queued", calls: queued, argvHas: " distribution dist-d-4 "},
		{name: "distribution without a token", target: "/registry/distribution/dist", body: dist(push("d-5", "e2e/app", "latest")), status: 401, reason: "unauthorized"},
		{name: "distribution wrong token", target: "/registry/distribution/dist", header: bearer(advWrongToken), body: dist(push("d-6", "e2e/app", "latest")), status: 401, reason: "unauthorized"},
		{name: "distribution token as Basic", target: "/registry/distribution/dist", header: [][2]string{{"Authorization", "Basic " + advRegistryToken}},
			body: dist(push("d-7", "e2e/app", "latest")), status: 401, reason: "unauthorized"},
		{name: "distribution token in the query instead of the header", target: "/registry/distribution/dist?token=" + advRegistryToken,
			body: dist(push("d-8", "e2e/app", "latest")), status: 401, reason: "unauthorized"},
		{name: "distribution another source's secret", target: "/registry/distribution/dist", header: bearer(advGiteaSecret), body: dist(push("d-9", "e2e/app", "latest")), status: 401},
		{name: "distribution blob only", target: "/registry/distribution/dist", header: okAuth,
			body: dist(distEvent("b-2", "push", "application/octet-stream", "e2e/app", "", "reg.example:5000")), status: 202, reason: "not-a-manifest"},
		{name: "distribution pull", target: "/registry/distribution/dist", header: okAuth,
			body: dist(distEvent("p-1", "pull", manifestV2, "e2e/app", "latest", "reg.example:5000")), status: 202, reason: "not-a-push"},
		{name: "distribution untagged", target: "/registry/distribution/dist", header: okAuth, body: dist(push("u-1", "e2e/app", "")), status: 202, reason: "missing-tag"},
		{name: "distribution repository -q", target: "/registry/distribution/dist", header: okAuth, body: dist(push("i-1", "-q", "latest")), status: 400, reason: "invalid-image"},
		{name: "distribution tag --authfile=x", target: "/registry/distribution/dist", header: okAuth, body: dist(push("i-2", "e2e/app", "--authfile=x")), status: 400, reason: "invalid-image"},
		{name: "distribution host dir:", target: "/registry/distribution/dist", header: okAuth,
			body: dist(distEvent("i-3", "push", manifestV2, "e2e/app", "latest", "dir:")), status: 400, reason: "invalid-image"},
		{name: "distribution another repository", target: "/registry/distribution/dist", header: okAuth, body: dist(push("m-1", "e2e/other", "latest")),
			status: 202, text: "repository mismatch", reason: "repository-mismatch", calls: looked},
		{name: "distribution another tag", target: "/registry/distribution/dist", header: okAuth, body: dist(push("m-2", "e2e/app", "v2")), status: 202, reason: "tag-mismatch", calls: looked},
		{name: "distribution unit that names no image", target: "/registry/distribution/noimage", header: okAuth, body: dist(push("n-1", "e2e/app", "latest")),
			status: 202, reason: "unit-image-unknown", calls: looked},
		{name: "distribution unit -q", target: "/registry/distribution/-q", header: okAuth, body: dist(push("n-2", "e2e/app", "latest")), status: 400, reason: "invalid-unit"},
		{name: "distribution oversized body", target: "/registry/distribution/dist", header: okAuth, body: huge, status: 413, action: "body-too-large"},
		{name: "distribution oversized chunked body", target: "/registry/distribution/dist", header: okAuth, body: huge, chunked: true, status: 413,
			action: "registry-webhook", reason: "body-too-large"},

		// Harbor.
		{name: "harbor push", target: "/registry/harbor/harbor", header: okAuth, body: harbor, status: 202, reason: "queued", calls: queued,
			argvHas: " -- harbor.service hub.harbor.com/test-webhook/debian:latest harbor harbor-"},
		{name: "harbor retry", target: "/registry/harbor/harbor", header: okAuth, body: harbor, status: 202, reason: "duplicate", calls: looked},
		{name: "harbor auth header without Bearer", target: "/registry/harbor/harbor", header: [][2]string{{"Authorization", advRegistryToken}}, body: harbor, status: 401},
		{name: "harbor no auth", target: "/registry/harbor/harbor", body: harbor, status: 401, reason: "unauthorized"},
		{name: "harbor pull event", target: "/registry/harbor/harbor", header: okAuth, body: loadPayload(t, "harbor-pull-artifact.json"), status: 202, reason: "not-a-push"},
		{name: "harbor untagged", target: "/registry/harbor/harbor", header: okAuth,
			body:   loadPayload(t, "harbor-push-artifact.json", setField("event_data.resources", []any{map[string]any{"digest": digestV1, "tag": "", "resource_url": "hub.harbor.com/test-webhook/debian@" + digestV1}})),
			status: 202, reason: "missing-tag"},
		{name: "harbor repository ../x", target: "/registry/harbor/harbor", header: okAuth,
			body: loadPayload(t, "harbor-push-artifact.json", setField("event_data.repository.repo_full_name", "../x")), status: 400, reason: "invalid-image"},
		{name: "harbor oversized", target: "/registry/harbor/harbor", header: okAuth, body: huge, status: 413},

		// Gitea and Forgejo.
		{name: "gitea package created", target: "/registry/gitea/gitea", header: giteaHeaders(advGiteaSecret, gitea, giteaID), body: gitea,
			status: 202, reason: "queued", calls: queued, argvHas: " -- gitea.service gitea.example.com/octo/web:v1.4.0 gitea gitea-" + giteaID + " "},
		{name: "gitea redelivery", target: "/registry/gitea/gitea", header: giteaHeaders(advGiteaSecret, gitea, giteaID), body: gitea, status: 202, reason: "duplicate", calls: looked},
		{name: "forgejo signature header", target: "/registry/gitea/gitea", body: gitea, header: [][2]string{{"X-Forgejo-Event", "package"},
			{"X-Forgejo-Delivery", "f-1"}, {"X-Forgejo-Signature", giteaHeaders(advGiteaSecret, gitea, "")[2][1]}}, status: 202, reason: "queued", calls: queued, argvHas: " gitea-f-1 "},
		{name: "gitea unsigned", target: "/registry/gitea/gitea", header: giteaHeaders(advGiteaSecret, gitea, "g-2")[:2], body: gitea, status: 401, reason: "unauthorized"},
		{name: "gitea signed under another secret", target: "/registry/gitea/gitea", header: giteaHeaders(advRegistryToken, gitea, "g-3"), body: gitea, status: 401},
		{name: "gitea signature of another body", target: "/registry/gitea/gitea", header: giteaHeaders(advGiteaSecret, hub, "g-4"), body: gitea, status: 401},
		{name: "gitea signature with GitHub's prefix", target: "/registry/gitea/gitea", header: [][2]string{{"X-Gitea-Event", "package"},
			{"X-Gitea-Signature", "sha256=" + giteaHeaders(advGiteaSecret, gitea, "")[2][1]}}, body: gitea, status: 401},
		{name: "gitea bearer token instead of a signature", target: "/registry/gitea/gitea", header: bearer(advGiteaSecret), body: gitea, status: 401},
		{name: "gitea push event", target: "/registry/gitea/gitea", body: gitea,
			header: append(giteaHeaders(advGiteaSecret, gitea, "g-5")[1:], [2]string{"X-Gitea-Event", "push"}), status: 202, reason: "not-a-package"},
		{name: "gitea package deleted", target: "/registry/gitea/gitea", body: loadPayload(t, "gitea-package-created.json", setField("action", "deleted")),
			header: giteaHeaders(advGiteaSecret, loadPayload(t, "gitea-package-created.json", setField("action", "deleted")), "g-6"), status: 202, reason: "not-created"},
		{name: "gitea untagged", target: "/registry/gitea/gitea", body: loadPayload(t, "gitea-package-created.json", setField("package.version", digestV1)),
			header: giteaHeaders(advGiteaSecret, loadPayload(t, "gitea-package-created.json", setField("package.version", digestV1)), "g-7"), status: 202, reason: "missing-tag"},
		{name: "gitea name --authfile=x", target: "/registry/gitea/gitea", body: loadPayload(t, "gitea-package-created.json", setField("package.name", "--authfile=x")),
			header: giteaHeaders(advGiteaSecret, loadPayload(t, "gitea-package-created.json", setField("package.name", "--authfile=x")), "g-8"), status: 400, reason: "invalid-image"},
		{name: "gitea oversized", target: "/registry/gitea/gitea", header: giteaHeaders(advGiteaSecret, huge, "g-9"), body: huge, status: 413},

		// Docker Hub: the token in the path or the query.
		{name: "dockerhub push, token in the path", target: "/registry/dockerhub/hub/" + advRegistryToken, body: hub, status: 202, reason: "queued", calls: queued,
			argvHas: " -- hub.service docker.io/svendowideit/testhook:latest dockerhub hub-"},
		{name: "dockerhub same push, token in the query", target: "/registry/dockerhub/hub?token=" + advRegistryToken, body: hub, status: 202, reason: "duplicate", calls: looked},
		{name: "dockerhub without a token", target: "/registry/dockerhub/hub", body: hub, status: 401, reason: "unauthorized"},
		{name: "dockerhub wrong path token", target: "/registry/dockerhub/hub/" + advWrongToken, body: hub, status: 401, reason: "unauthorized"},
		{name: "dockerhub wrong path token, right query token", target: "/registry/dockerhub/hub/" + advWrongToken + "?token=" + advRegistryToken, body: hub, status: 401},
		{name: "dockerhub bearer header instead", target: "/registry/dockerhub/hub", header: okAuth, body: hub, status: 401},
		{name: "dockerhub token and more path", target: "/registry/dockerhub/hub/" + advRegistryToken + "/x", body: hub, status: 404},
		{name: "dockerhub no tag", target: "/registry/dockerhub/hub/" + advRegistryToken, body: loadPayload(t, "dockerhub-push.json", setField("push_data.tag", "")),
			status: 202, reason: "missing-tag"},
		{name: "dockerhub not a push", target: "/registry/dockerhub/hub/" + advRegistryToken, body: []byte(`{"repository":{"repo_name":"a/b"}}`), status: 202, reason: "not-a-push"},
		{name: "dockerhub tag -q", target: "/registry/dockerhub/hub/" + advRegistryToken, body: loadPayload(t, "dockerhub-push.json", setField("push_data.tag", "-q")),
			status: 400, reason: "invalid-image"},
		{name: "dockerhub oversized", target: "/registry/dockerhub/hub/" + advRegistryToken, body: huge, status: 413},

		// Quay: no id, so each request stands alone.
		{name: "quay push, token in the query", target: "/registry/quay/quay?token=" + advRegistryToken, body: quay, status: 202, reason: "queued", calls: queued,
			argvHas: " -- quay.service quay.io/mynamespace/repository:latest quay quay-"},
		{name: "quay same push again is its own delivery", target: "/registry/quay/quay/" + advRegistryToken, body: quay, status: 202, reason: "queued", calls: queued},
		{name: "quay without a token", target: "/registry/quay/quay", body: quay, status: 401, reason: "unauthorized"},
		{name: "quay wrong token", target: "/registry/quay/quay?token=" + advWrongToken, body: quay, status: 401},
		{name: "quay build notification", target: "/registry/quay/quay?token=" + advRegistryToken, body: loadPayload(t, "quay-build-queued.json"), status: 202, reason: "not-a-push"},
		{name: "quay docker_url docker-archive:", target: "/registry/quay/quay?token=" + advRegistryToken,
			body: loadPayload(t, "quay-push.json", setField("docker_url", "docker-archive:/tmp/x.tar")), status: 400, reason: "invalid-image"},
		{name: "quay oversized", target: "/registry/quay/quay?token=" + advRegistryToken, body: huge, status: 413},

		// Routes.
		{name: "unknown source", target: "/registry/nexus/dist", header: okAuth, body: dist(push("x-1", "e2e/app", "latest")), status: 404, reason: "unknown-source"},
		{name: "GET a registry route", method: "GET", target: "/registry/dockerhub/hub/" + advRegistryToken, status: 405, action: "method-not-allowed"},
		{name: "no unit", target: "/registry/distribution/", header: okAuth, body: dist(push("x-2", "e2e/app", "latest")), status: 404},
	}
	n := runAdvCases(t, s, cases)

	var stored strings.Builder
	for _, r := range readRows(t, rawDB(t, s.cfg.dbPath), "") {
		fmt.Fprintf(&stored, "%s %s %s\n", r.path.String, r.action, r.meta)
	}
	for _, secret := range []string{advRegistryToken, advGiteaSecret, advWrongToken} {
		if strings.Contains(stored.String(), secret) {
			t.Errorf("%q reached an event row:\n%s", secret, stored.String())
		}
		if strings.Contains(s.logs.String(), secret) {
			t.Errorf("%q reached the log:\n%s", secret, s.logs)
		}
		for _, c := range s.h.callsOf(keySystemdRun) {
			if strings.Contains(strings.Join(c, " "), secret) {
				t.Errorf("%q reached a systemd-run command line: %q", secret, c)
			}
		}
	}
	for _, want := range []string{"/registry/dockerhub/hub/REDACTED", "token=REDACTED"} {
		if !strings.Contains(stored.String(), want) {
			t.Errorf("no row shows %s; rows:\n%s", want, stored.String())
		}
	}
	t.Logf("%d adversarial registry requests", n)
}

// TestAdversarialRegistrySecretUnset: a source whose secret is unset refuses every push with 500,
// whatever it carries, and runs nothing; the other sources are not affected.
func TestAdversarialRegistrySecretUnset(t *testing.T) {
	s := newAdvRegistryServer(t, map[string]string{registryTokenEnv("distribution"): "", registryTokenEnv("dockerhub"): " "},
		map[string]string{"dist": "reg.example:5000/e2e/app"})
	body := distEnvelope(distEvent("s-1", "push", manifestV2, "e2e/app", "latest", "reg.example:5000"))
	runAdvCases(t, s, []advCase{
		{name: "distribution with a bearer token", target: "/registry/distribution/dist", header: [][2]string{{"Authorization", "Bearer " + advRegistryToken}},
			body: body, status: 500, text: "server misconfigured", action: "registry-webhook", reason: "secret-unset"},
		{name: "distribution with an empty bearer token", target: "/registry/distribution/dist", header: [][2]string{{"Authorization", "Bearer "}}, body: body, status: 500, reason: "secret-unset"},
		{name: "dockerhub with a blank secret", target: "/registry/dockerhub/dist/%20", body: loadPayload(t, "dockerhub-push.json"), status: 500, reason: "secret-unset"},
		{name: "harbor still works", target: "/registry/harbor/dist", header: [][2]string{{"Authorization", "Bearer " + advRegistryToken}},
			body: loadPayload(t, "harbor-push-artifact.json"), status: 202, reason: "host-mismatch", calls: []string{"systemctl-show"}},
	})
}

// slowServer serves s's handler with cmdServer's http.Server settings but 1 s read timeouts.
func slowServer(t *testing.T, s *advServer) (addr string, stop func()) {
	t.Helper()
	cfg := *s.cfg
	cfg.readHeaderTimeout, cfg.readTimeout = time.Second, time.Second
	hs := newHTTPServer(&cfg, s.srv, s.srv.log)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go hs.Serve(framedListener{l})
	t.Cleanup(func() { hs.Close() })
	return l.Addr().String(), func() { hs.Close() }
}

// trickle writes head, then one byte of more every 100 ms until the connection fails or stop is
// closed. It reports how many bytes of more it wrote.
func trickle(c net.Conn, head, more string, stop <-chan struct{}) <-chan int {
	wrote := make(chan int, 1)
	go func() {
		n := 0
		defer func() { wrote <- n }()
		if _, err := io.WriteString(c, head); err != nil {
			return
		}
		for i := 0; i < len(more); i++ {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			if _, err := c.Write([]byte{more[i]}); err != nil {
				return
			}
			n++
		}
	}()
	return wrote
}

// waitClosed reads from c until the server closes it, failing the test after hangGuard: a
// server without read timeouts keeps a trickling client forever. It returns what was read.
func waitClosed(t *testing.T, c net.Conn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(hangGuard))
	got, err := io.ReadAll(c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the slow connection was still open after %s", hangGuard)
	}
	return string(got)
}

// TestSlowClients: a client that trickles its headers (slowloris) or its body is cut off at the
// server's read timeouts while another client is served meanwhile. A trickled body reaches the
// handler, which answers 400 and leaves a row; trickled headers never become a request, so
// net/http closes the connection without an answer and there is no row to write.
func TestSlowClients(t *testing.T) {
	s := newAdvServer(t, nil)
	addr, stop := slowServer(t, s)
	body := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
	cases := []struct {
		name, head, more string
		status           int // 0: no answer at all
	}{
		{"slowloris headers", "POST " + advUnitPath + " HTTP/1.1\r\nHost: test\r\n", strings.Repeat("X-Slow: 1\r\n", 100), 0},
		{"trickled body", fmt.Sprintf("POST %s HTTP/1.1\r\nHost: test\r\nX-GitHub-Event: package\r\nX-GitHub-Delivery: slow-1\r\n"+
			"X-Hub-Signature-256: %s\r\nContent-Length: %d\r\n\r\n", advUnitPath, hubSignature(advSecret, body), len(body)), string(body), 400},
	}
	var ids []string
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			done := make(chan struct{})
			wrote := trickle(c, tc.head, tc.more, done)
			// Another client is served while the slow one holds its connection.
			resp, text, err := rawExchange(addr, "GET", "/health", nil, nil, false)
			if err != nil || resp.StatusCode != 200 || text != "ok" {
				t.Fatalf("another client during the slow one: %v %v %q", resp, err, text)
			}
			got := waitClosed(t, c)
			close(done)
			if n := <-wrote; n >= len(tc.more) {
				t.Fatalf("the whole request was sent (%d bytes): the close proves nothing", n)
			}
			if tc.status == 0 {
				if got != "" {
					t.Errorf("slow headers got an answer: %q", got)
				}
				return
			}
			resp, err = http.ReadResponse(bufio.NewReader(strings.NewReader(got)), nil)
			if err != nil || resp.StatusCode != tc.status {
				t.Fatalf("answer to the slow client %q (%v), want status %d", got, err, tc.status)
			}
			ids = append(ids, resp.Header.Get("X-Request-Id"))
		})
	}
	stop()
	rows := s.rows(t)
	for _, id := range ids {
		if r, ok := rows[id]; !ok || r.status != 400 || !strings.Contains(r.meta, "body-unreadable") {
			t.Errorf("row of the trickled body: %+v (found %v), want status 400 body-unreadable", r, ok)
		}
	}
	if calls := s.h.calls(); len(calls) != 0 {
		t.Errorf("slow clients ran commands:\n%s", fakeCallLines(calls))
	}
	if n := len(rows); n != 1+len(ids) || probeCount(t, rows) != 2 {
		t.Errorf("%d rows counting %d probes, want %d (the summary of two /health probes and the trickled body)", n, probeCount(t, rows), 1+len(ids))
	}
}

// TestSlowlorisBinary checks that cmdServer itself sets the header timeout: the built server
// closes a connection whose headers never end (after its 10 s ReadHeaderTimeout) while it keeps
// answering others.
func TestSlowlorisBinary(t *testing.T) {
	bin := buildServerBinary(t)
	addr := freeLoopbackAddr(t)
	p := startServerProc(t, bin, []string{"--listen", addr, "--state-dir", t.TempDir()}, nil, nil)
	p.waitLog(t, "listening on")
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	done := make(chan struct{})
	defer close(done)
	wrote := trickle(c, "GET /health HTTP/1.1\r\nHost: test\r\n", strings.Repeat("X-Slow: 1\r\n", 1000), done)
	if resp, _, err := rawExchange(addr, "GET", "/health", nil, nil, false); err != nil || resp.StatusCode != 200 {
		t.Fatalf("another client during the slowloris: %v %v", resp, err)
	}
	if got := waitClosed(t, c); got != "" {
		t.Errorf("slow headers got an answer: %q", got)
	}
	if n := <-wrote; n >= 11000 {
		t.Fatal("the headers were all sent")
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := p.wait(); err != nil {
		t.Fatalf("server exit: %v\n%s", err, p.stderr())
	}
}

// Faults of the event log under a running server.

// signedDelivery sends a signed package delivery through the test server's client and returns
// the response and its text.
func (s *advServer) signedDelivery(t *testing.T, unit, delivery string, body []byte) (*http.Response, string) {
	t.Helper()
	resp, text, err := s.postDelivery(unit, delivery, body)
	if err != nil {
		t.Fatalf("delivery %s: %v", delivery, err)
	}
	return resp, text
}

// postDelivery sends a signed package delivery and returns the response (its body read and
// closed) and its text. It may run outside the test's goroutine.
func (s *advServer) postDelivery(unit, delivery string, body []byte) (*http.Response, string, error) {
	return s.postDeliveryCtx(context.Background(), unit, delivery, body)
}

// postDeliveryCtx is postDelivery with a context that can hang up on the server.
func (s *advServer) postDeliveryCtx(ctx context.Context, unit, delivery string, body []byte) (*http.Response, string, error) {
	req, _ := http.NewRequestWithContext(ctx, "POST", s.URL+"/github-package-update/"+unit, bytes.NewReader(body))
	req.Header.Set("X-Hub-Signature-256", hubSignature(advSecret, body))
	req.Header.Set("X-GitHub-Event", "package")
	req.Header.Set("X-GitHub-Delivery", delivery)
	resp, err := s.Client().Do(req)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, strings.TrimSpace(string(b)), nil
}

// TestFaultDatabaseLocked: another process holds the database's write lock for 3 s. A delivery
// that arrives meanwhile waits for it (the busy timeout is 10 s), is then recorded and answered
// 202; no row is lost or spilled.
func TestFaultDatabaseLocked(t *testing.T) {
	s := newAdvServer(t, nil)
	body := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
	ctx := context.Background()
	conn, err := rawDB(t, s.cfg.dbPath).Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
		t.Fatal(err)
	}
	var released atomic.Bool
	go func() {
		time.Sleep(3 * time.Second)
		released.Store(true) // before the lock goes: a write that finishes has waited for it
		conn.ExecContext(ctx, "ROLLBACK")
	}()
	health, _ := s.getHello(t)
	resp, text := s.signedDelivery(t, "web", "locked-1", body)
	if resp.StatusCode != 202 || text != "auto-update queued" {
		t.Fatalf("delivery while the database is locked: %d %q, want 202 auto-update queued\nlog:\n%s", resp.StatusCode, text, s.logs)
	}
	if !released.Load() {
		t.Fatal("the delivery was answered while another writer held the lock: its record cannot be committed")
	}
	id := resp.Header.Get("X-Request-Id")
	s.drain(t)
	rows := s.rows(t)
	if r, ok := rows[id]; !ok || r.status != 202 {
		t.Errorf("row of the delivery: %+v %v", r, ok)
	}
	if _, ok := rows[health]; !ok {
		t.Errorf("no row for the /sse/hello answered during the lock")
	}
	db := rawDB(t, s.cfg.dbPath)
	if n := queryInt(t, db, `SELECT count(*) FROM github_deliveries WHERE delivery_id = 'locked-1' AND status = 'dispatched'`); n != 1 {
		t.Errorf("github_deliveries has %d dispatched rows for locked-1, want 1", n)
	}
	if strings.Contains(s.logs.String(), "unwritten event") {
		t.Errorf("rows were spilled:\n%s", s.logs)
	}
	if n := len(s.h.callsOf(keySystemdRun)); n != 1 {
		t.Errorf("%d dispatches, want 1", n)
	}
}

// getHello asks for /sse/hello, a request that has a row of its own, and returns its request
// id and status.
func (s *advServer) getHello(t *testing.T) (string, int) {
	t.Helper()
	resp, err := s.Client().Get(s.URL + "/sse/hello")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("/sse/hello = %d", resp.StatusCode)
	}
	return resp.Header.Get("X-Request-Id"), resp.StatusCode
}

// TestFaultDatabaseUnwritable puts the database on a small tmpfs and fills it after the server
// started: every request is still answered (a delivery that cannot be recorded is 500, so GitHub
// shows it failed and it can be redelivered), every row that cannot be written is on stderr as
// a JSON line, /health fails naming the database, and once space is back rows are written and
// /health is fine again. (A read-only directory cannot
// stand in: root ignores file modes, and SQLite keeps writing through its open files.)
func TestFaultDatabaseUnwritable(t *testing.T) {
	if os.Geteuid() != 0 {
		rigSkipOrFail(t, "mounting a tmpfs needs root")
	}
	state := t.TempDir()
	mnt := filepath.Join(state, "data")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", mnt, "tmpfs", 0, "size=2m,mode=0700"); err != nil {
		rigSkipOrFail(t, "cannot mount a tmpfs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })
	s := newAdvServer(t, map[string]string{"WEBHOOK_STATE_DIR": state})
	s.cfg.stateDir = state
	if _, code := s.getHello(t); code != 200 {
		t.Fatal("no /health before the fault")
	}
	waitPending(t, s.events)

	filler, err := os.Create(filepath.Join(mnt, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 64<<10)
	for {
		if _, err := filler.Write(chunk); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	filler.Close()

	body := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
	var ids []string
	for _, c := range []struct {
		name   string
		do     func() *http.Response
		status int
	}{
		{"hello", func() *http.Response { r, _ := s.Client().Get(s.URL + "/sse/hello"); return r }, 200},
		{"not found", func() *http.Response { r, _ := s.Client().Get(s.URL + "/nope?token=" + advToken); return r }, 404},
		{"bad signature", func() *http.Response {
			r, _ := s.Client().Post(s.URL+advUnitPath, "application/json", bytes.NewReader(body))
			return r
		}, 401},
		{"delivery", func() *http.Response { r, _ := s.signedDelivery(t, "web", "full-1", body); return r }, 500},
	} {
		resp := c.do()
		if resp == nil {
			t.Fatalf("%s: no answer while the database is unwritable", c.name)
		}
		resp.Body.Close()
		if resp.StatusCode != c.status {
			t.Errorf("%s: %d, want %d", c.name, resp.StatusCode, c.status)
		}
		ids = append(ids, resp.Header.Get("X-Request-Id"))
	}
	waitPending(t, s.events)
	spilt := map[string]bool{}
	for _, e := range spilled(t, s.logs.String()) {
		spilt[fmt.Sprint(e["request_id"])] = true
	}
	for _, id := range ids {
		if !spilt[id] {
			t.Errorf("request %s was neither written nor spilled to stderr; log:\n%s", id, s.logs)
		}
	}
	if n := len(s.h.callsOf(keySystemdRun)); n != 0 {
		t.Errorf("a delivery that could not be recorded was dispatched %d times", n)
	}
	if strings.Contains(s.logs.String(), advToken) {
		t.Errorf("a spilled row carries the token:\n%s", s.logs)
	}

	// /health says so (within the second its answer is kept), naming the database. Polled
	// slowly: every request writes a row, and the tmpfs has room for few.
	waitHealth := func(what string, ok func(code int, body string) bool) {
		t.Helper()
		for deadline := time.Now().Add(hangGuard); ; time.Sleep(200 * time.Millisecond) {
			resp, err := s.Client().Get(s.URL + "/health")
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if ok(resp.StatusCode, string(b)) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting until %s: /health = %d %q", what, resp.StatusCode, b)
			}
		}
	}
	waitHealth("plain /health fails naming the database while rows cannot be written", func(code int, body string) bool {
		return code == 503 && body == "fail: database\n"
	})

	// Space again: the next request is written, and /health is fine again.
	if err := os.Remove(filepath.Join(mnt, "filler")); err != nil {
		t.Fatal(err)
	}
	waitHealth("plain /health answers 200 once rows are written again", func(code int, _ string) bool { return code == 200 })
	after, _ := s.getHello(t)
	rows := s.rows(t)
	if _, ok := rows[after]; !ok {
		t.Errorf("the event log did not recover once space was back; log:\n%s", s.logs)
	}
}

// waitPending waits until the event log's writer has handled everything queued.
func waitPending(t *testing.T, l *eventLog) {
	t.Helper()
	deadline := time.Now().Add(hangGuard)
	for l.pending.Load() > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d events still queued after %s", l.pending.Load(), hangGuard)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Load.

// burstReq is one delivery of a burst; burstResult what came of it.
type burstReq struct {
	unit, delivery string
	body           []byte
}

type burstResult struct {
	burstReq
	status int
	text   string
	took   time.Duration
	err    error
}

// burst sends every delivery at once, each on its own connection, and waits for every answer.
func (s *advServer) burst(client *http.Client, reqs []burstReq) []burstResult {
	out := make([]burstResult, len(reqs))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, r := range reqs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequest("POST", s.URL+"/github-package-update/"+r.unit, bytes.NewReader(r.body))
			req.Header.Set("X-Hub-Signature-256", hubSignature(advSecret, r.body))
			req.Header.Set("X-GitHub-Event", "package")
			req.Header.Set("X-GitHub-Delivery", r.delivery)
			<-start
			t0 := time.Now()
			res := burstResult{burstReq: r}
			resp, err := client.Do(req)
			if err == nil {
				b, rerr := io.ReadAll(resp.Body)
				resp.Body.Close()
				res.status, res.text, err = resp.StatusCode, strings.TrimSpace(string(b)), rerr
			}
			res.took, res.err = time.Since(t0), err
			out[i] = res
		}()
	}
	close(start)
	wg.Wait()
	return out
}

// summarize fails the test for a request that got no answer, or an answer other than 2xx or
// 429; it returns the answers counted by text, and the median and maximum answer times.
func summarize(t *testing.T, name string, res []burstResult) (map[string]int, time.Duration, time.Duration) {
	t.Helper()
	texts := map[string]int{}
	var took []time.Duration
	for _, r := range res {
		switch {
		case r.err != nil:
			t.Errorf("%s: delivery %s got no answer: %v", name, r.delivery, r.err)
		case r.status/100 != 2 && r.status != 429:
			t.Errorf("%s: delivery %s: %d %q, want 2xx or 429", name, r.delivery, r.status, r.text)
		}
		texts[r.text]++
		took = append(took, r.took)
	}
	slices.Sort(took)
	return texts, took[len(took)/2], took[len(took)-1]
}

func openFDs(t *testing.T) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(fds)
}

// settle waits until the process has at most maxG goroutines and maxFD descriptors, and returns
// what it has then; it fails the test when that does not happen within hangGuard.
func settle(t *testing.T, what string, maxG, maxFD int) (int, int) {
	t.Helper()
	deadline := time.Now().Add(hangGuard)
	for {
		runtime.GC()
		g, fd := runtime.NumGoroutine(), openFDs(t)
		if g <= maxG && fd <= maxFD {
			return g, fd
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s, after %s idle: %d goroutines (at most %d expected), %d descriptors (at most %d)", what, hangGuard, g, maxG, fd, maxFD)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// deliveryStatuses counts github_deliveries rows by status for delivery ids with prefix.
func deliveryStatuses(t *testing.T, db *sql.DB, prefix string) map[string]int {
	t.Helper()
	rows, err := db.Query(`SELECT status, count(*) FROM github_deliveries WHERE delivery_id LIKE ? GROUP BY 1`, prefix+"%")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]int{}
	for rows.Next() {
		var st string
		var n int
		if err := rows.Scan(&st, &n); err != nil {
			t.Fatal(err)
		}
		out[st] = n
	}
	return out
}

// checkCoverage checks the queue after a burst: every claim with prefix is dispatched (or
// done) by exactly one task, that of the claim its covered_by names, which covers itself, is
// for the same unit and image, and was started by exactly one systemd-run (dispatches counts
// them by delivery id); every claim has one "dispatching" row. It returns the number of
// claims and of tasks per unit.
func checkCoverage(t *testing.T, db *sql.DB, prefix string, dispatches map[string]int) (claims int, tasksPerUnit map[string]int) {
	t.Helper()
	rows, err := db.Query(`SELECT delivery_id, status, coalesce(covered_by, ''), coalesce(task_unit, ''), unit || ' ' || image,
		(SELECT count(*) FROM event_log WHERE action = 'github-dispatch' AND json_extract(meta, '$.reason') = 'dispatching'
			AND json_extract(meta, '$.delivery') = delivery_id)
		FROM github_deliveries WHERE delivery_id LIKE ?`, prefix+"%")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	leaderOf, target := map[string]string{}, map[string]string{}
	for rows.Next() {
		var id, status, leader, taskUnit, unitImage string
		var dispatchRows int
		if err := rows.Scan(&id, &status, &leader, &taskUnit, &unitImage, &dispatchRows); err != nil {
			t.Fatal(err)
		}
		if (status != "dispatched" && status != "done") || leader == "" || taskUnit != taskUnitName(leader) || dispatchRows != 1 {
			t.Errorf("%s: claim %s is %s, covered by %q with task unit %q and %d dispatching rows; want dispatched by one task",
				prefix, id, status, leader, taskUnit, dispatchRows)
		}
		leaderOf[id], target[id] = leader, unitImage
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	tasksPerUnit = map[string]int{}
	for id, leader := range leaderOf {
		if leaderOf[leader] != leader || dispatches[leader] != 1 || target[id] != target[leader] {
			t.Errorf("%s: claim %s for %s is covered by %s's task (for %s, itself covered by %q), started %d times",
				prefix, id, target[id], leader, target[leader], leaderOf[leader], dispatches[leader])
		}
		if leader == id {
			tasksPerUnit[strings.Fields(target[id])[0]]++
		}
	}
	for id, n := range dispatches {
		if leaderOf[id] != id || n != 1 {
			t.Errorf("%s: task of %s started %d times; its claim is covered by %q", prefix, id, n, leaderOf[id])
		}
	}
	return len(leaderOf), tasksPerUnit
}

// TestLoadBursts sends 200 concurrent signed deliveries for one image (different delivery ids),
// then a mixed burst over 20 images with duplicate copies, against the server with its
// dispatcher running and recording fakes (fake systemctl answers its show and reports a started
// task unit active until the test ends it as run-task would; fake systemd-run records the
// dispatch). Every delivery is answered 202 ("auto-update queued", or "duplicate delivery" for
// a copy); the answer times are logged, not judged. The queue's accounting must be exact (see
// checkCoverage), with at most two tasks per unit for a burst: the one running when it started
// and one covering everything that queued behind it. The request path only checks the
// per-image limit; run-task takes it. So the recorded tasks of the one-image burst, and copies
// of them under other delivery ids up to 200, then run as real run-task processes of the built
// binary, all at once, with a pull that takes a while and records when it ran: the pulls never
// overlap (one redeploy per image at a time), exactly WEBHOOK_IMAGE_LIMIT_COUNT of them pull and
// the rest stop rate-limited, the per-image log holds exactly that many timestamps, and the next
// delivery is refused with 429. Between and after the bursts the server goes back to its
// goroutines and descriptors; the slack covers SQLite's pool, which may keep up to 3 more
// connections of 2 descriptors each.
func TestLoadBursts(t *testing.T) {
	if testing.Short() {
		t.Skip("load test")
	}
	const n, limit, images = 200, 20, 20
	bin := buildServerBinary(t) // before the fakes replace PATH
	s := newAdvServer(t, map[string]string{"WEBHOOK_IMAGE_LIMIT_COUNT": strconv.Itoa(limit)})
	s.srv.exe = bin
	s.h.set("image.id", oldImageID)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 2 * n}, Timeout: 2 * hangGuard}
	defer client.CloseIdleConnections()
	image := "ghcr.io/octo-org/web:v1"
	body := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
	db := rawDB(t, s.cfg.dbPath)

	dctx, stopDispatcher := context.WithCancel(context.Background())
	dispatcherDone := make(chan struct{})
	go func() { defer close(dispatcherDone); s.srv.runDispatcher(dctx) }()
	defer func() { stopDispatcher(); <-dispatcherDone }()
	// endTasks does what run-task does as it ends, for every task started so far.
	endTasks := func() {
		for _, c := range s.h.callsOf(keySystemdRun) {
			if err := s.events.settleTask(context.Background(), taskUnitName(c[len(c)-2]), "done", "", time.Time{}, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	tasksOf := func(prefix string) (map[string]int, [][]string) {
		dispatches := map[string]int{}
		var argvs [][]string
		for _, c := range s.h.callsOf(keySystemdRun) {
			if id := c[len(c)-2]; strings.HasPrefix(id, prefix) {
				dispatches[id]++
				argvs = append(argvs, c)
			}
		}
		return dispatches, argvs
	}
	idle := func(prefix string) {
		waitFor(t, prefix+" claims dispatched", func() bool {
			st := deliveryStatuses(t, db, prefix)
			return len(st) > 0 && st["pending"] == 0 && st["dispatching"] == 0
		})
	}

	// Warm up, then take the baseline.
	s.burst(client, []burstReq{{"web", "warm", githubPackagePayload("ghcr.io", "octo-org", "warm", "v1", "")}})
	waitFor(t, "the warm-up task", func() bool { d, _ := tasksOf("warm"); return len(d) == 1 })
	endTasks()
	client.CloseIdleConnections()
	waitPending(t, s.events)
	g0, fd0 := settle(t, "before the bursts", math.MaxInt, math.MaxInt)

	var same []burstReq
	for i := 0; i < n; i++ {
		same = append(same, burstReq{"web", fmt.Sprintf("load-%03d", i), body})
	}
	start := time.Now()
	texts, median, slowest := summarize(t, "one image", s.burst(client, same))
	t.Logf("one image: %d concurrent deliveries answered in %s: %v; answer time median %s, max %s",
		n, time.Since(start).Round(time.Millisecond), texts, median.Round(time.Millisecond), slowest.Round(time.Millisecond))
	if texts["auto-update queued"] != n {
		t.Errorf("one image: answers %v, want every delivery queued", texts)
	}
	// The first task runs on (the fake systemd keeps it active) while the burst queues behind
	// it; once it ends, one task covers everything that waited.
	waitFor(t, "the first task", func() bool { d, _ := tasksOf("load-"); return len(d) == 1 })
	endTasks()
	idle("load-")
	dispatches, dispatched := tasksOf("load-")
	claims, perUnit := checkCoverage(t, db, "load-", dispatches)
	if claims != n || perUnit["web.service"] > 2 {
		t.Errorf("one image: %d claims, %d tasks: want %d claims covered by at most 2 tasks", claims, perUnit["web.service"], n)
	}
	t.Logf("one image: %d tasks for %d deliveries", len(dispatched), claims)
	endTasks()
	client.CloseIdleConnections()
	g1, fd1 := settle(t, "after the first burst", g0+5, fd0+8)

	var mixed []burstReq
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("app-%02d", i%images)
		r := burstReq{name, fmt.Sprintf("mixed-%03d", i), githubPackagePayload("ghcr.io", "octo-org", name, "v1", "")}
		mixed = append(mixed, r)
		if i%10 == 0 {
			mixed = append(mixed, r) // a second copy of the same delivery, at the same moment
		}
	}
	start = time.Now()
	texts, median, slowest = summarize(t, "mixed", s.burst(client, mixed))
	t.Logf("%d images: %d concurrent deliveries (%d of them twice) answered in %s: %v; answer time median %s, max %s",
		images, len(mixed), len(mixed)-n, time.Since(start).Round(time.Millisecond), texts, median.Round(time.Millisecond), slowest.Round(time.Millisecond))
	if texts["auto-update queued"] != n || texts["duplicate delivery"] != len(mixed)-n {
		t.Errorf("mixed: answers %v, want %d queued and %d duplicates", texts, n, len(mixed)-n)
	}
	waitFor(t, "a task for every unit", func() bool { d, _ := tasksOf("mixed-"); return len(d) >= images })
	endTasks()
	idle("mixed-")
	dispatches, _ = tasksOf("mixed-")
	claims, perUnit = checkCoverage(t, db, "mixed-", dispatches)
	if claims != n || len(perUnit) != images {
		t.Errorf("mixed: %d claims for %d units, want %d for %d", claims, len(perUnit), n, images)
	}
	for unit, c := range perUnit {
		if c > 2 {
			t.Errorf("mixed: %d tasks for %s, want at most 2", c, unit)
		}
	}
	t.Logf("mixed: %d tasks for %d deliveries", len(dispatches), claims)
	endTasks()
	client.CloseIdleConnections()
	g2, fd2 := settle(t, "after the second burst", g0+5, fd0+8)
	t.Logf("goroutines %d → %d → %d, descriptors %d → %d → %d", g0, g1, g2, fd0, fd1, fd2)

	// The tasks of the one-image burst, as systemd would run them.
	intervals := filepath.Join(t.TempDir(), "pulls")
	s.h.set("podman-pull.sleep", "100ms")
	var cmds []*exec.Cmd
	var outs []*syncBuffer
	for i := len(dispatched); i < n; i++ {
		argv := slices.Clone(dispatched[0])
		argv[len(argv)-2] = fmt.Sprintf("load-run-%03d", i)
		dispatched = append(dispatched, argv)
	}
	for _, argv := range dispatched {
		first := slices.Index(argv, "--")
		cmd := exec.Command(argv[first+1], argv[first+2:]...)
		// The fake podman shows no container for the unit, which names no image: opt in, so the
		// tasks go on to the pull and the per-image limit this test counts.
		cmd.Env = append(os.Environ(), fakePullIntervalsEnv+"="+intervals, "WEBHOOK_IMAGE_LIMIT_COUNT="+strconv.Itoa(limit),
			"WEBHOOK_ALLOW_ANY_IMAGE=true")
		out := &syncBuffer{}
		cmd.Stdout, cmd.Stderr = out, out
		cmds, outs = append(cmds, cmd), append(outs, out)
	}
	start = time.Now()
	for _, cmd := range cmds {
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
	}
	for i, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Errorf("run-task %d: %v\n%s", i, err, outs[i])
		}
	}
	t.Logf("%d run-task processes started at once finished in %s", len(cmds), time.Since(start).Round(time.Millisecond))
	steps := map[string]int{}
	rows, err := db.Query(`SELECT json_extract(meta, '$.step'), count(*) FROM event_log WHERE action = 'github-task'
		AND json_extract(meta, '$.delivery') LIKE 'load-%' GROUP BY 1`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var step string
		var c int
		rows.Scan(&step, &c)
		steps[step] = c
	}
	rows.Close()
	tasks := len(cmds)
	took := min(limit, tasks)
	want := map[string]int{"started": tasks, "pulled": took, "up-to-date": took}
	if tasks > limit {
		want["rate-limited"] = tasks - limit
	}
	if !reflect.DeepEqual(steps, want) {
		t.Errorf("task steps %v, want %v", steps, want)
	}
	pulls := readPullIntervals(t, intervals)
	if len(pulls) != took {
		t.Errorf("%d pulls, want exactly %d", len(pulls), took)
	}
	if o := overlapping(pulls); o != nil {
		t.Errorf("two redeploys of one image pulled at once: %v", o)
	}
	if ts, bad, err := readTimestamps(imageLimitPath(s.cfg.stateDir, image)); err != nil || len(ts) != took || bad != 0 {
		t.Errorf("per-image log: %d timestamps, %d bad, %v; want exactly %d", len(ts), bad, err, took)
	}
	if strings.Contains(s.logs.String(), "unwritten event") {
		t.Errorf("rows were spilled:\n%s", s.logs)
	}

	// The limit is used up: the next delivery is refused on the request path.
	before := len(s.h.callsOf(keySystemdRun))
	resp, text := s.signedDelivery(t, "web", "load-after", body)
	if ra := resp.Header.Get("Retry-After"); resp.StatusCode != 429 || ra == "" || ra == "0" {
		t.Errorf("delivery after %d redeploys: %d %q Retry-After %q, want 429 with a Retry-After", took, resp.StatusCode, text, ra)
	}
	if len(s.h.callsOf(keySystemdRun)) != before {
		t.Error("a rate-limited delivery was dispatched")
	}
}

// waitFor polls cond until it holds, failing the test after hangGuard.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(hangGuard)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestQueueSurvivesRestart: a server killed between its 202s and their dispatch leaves claims
// pending, and one killed during systemd-run leaves them dispatching. The restarted server (the
// real binary, with fakes) runs each of them exactly once: a pending claim and a dispatching
// one whose task never started are dispatched, one whose task unit exists is not started again.
// A redelivery of a claim that is queued is a duplicate: its redeploy runs.
func TestQueueSurvivesRestart(t *testing.T) {
	bin := buildServerBinary(t) // before the fakes replace PATH
	h, path := newFakeHostWithRun(t)
	state := t.TempDir()
	dbPath := filepath.Join(state, "data", "pod-upgrade-trigger.db")
	body := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")

	// The server that died: three claims committed and answered 202.
	dead, err := openEventLog(dbPath, newLogger(io.Discard))
	if err != nil {
		t.Fatal(err)
	}
	for i, unit := range []string{"web.service", "db.service", "cache.service"} {
		id := fmt.Sprintf("crash-%d", i+1)
		spec := taskSpec{unit: unit, image: "ghcr.io/octo-org/web:v1", event: "package", delivery: id, path: advUnitPath}
		ok, err := dead.claimDelivery(context.Background(), spec, event{RequestID: "dead-" + id, TS: time.Now(),
			Method: "POST", Path: advUnitPath, Status: 202, Action: "github-webhook", Meta: map[string]any{"delivery": id, "reason": "queued"}})
		if err != nil || !ok {
			t.Fatalf("claim %s: %v %v", id, ok, err)
		}
	}
	// crash-2 and crash-3 were being dispatched (systemd-run under way); only crash-3's task
	// unit started.
	db := rawDB(t, dbPath)
	if _, err := db.Exec(`UPDATE github_deliveries SET status = CASE delivery_id WHEN 'crash-1' THEN 'pending' ELSE 'dispatching' END,
		covered_by = CASE delivery_id WHEN 'crash-1' THEN NULL ELSE delivery_id END,
		task_unit = CASE delivery_id WHEN 'crash-1' THEN NULL ELSE 'webhook-task-' || delivery_id END`); err != nil {
		t.Fatal(err)
	}
	dead.Close()
	h.set("started.webhook-task-crash-3", "")

	addr := freeLoopbackAddr(t)
	p := startServerProc(t, bin, []string{"--listen", addr, "--state-dir", state}, []string{"PATH=" + path,
		"GITHUB_WEBHOOK_SECRET=" + advSecret, fakePodmanDirEnv + "=" + h.dir, fakeSystemctlDirEnv + "=" + h.dir,
		fakeSystemdRunDirEnv + "=" + h.dir}, nil)
	p.waitLog(t, "listening on")
	dispatches := func() map[string]int {
		out := map[string]int{}
		for _, c := range h.callsOf(keySystemdRun) {
			out[c[len(c)-2]]++
		}
		return out
	}
	waitFor(t, "the claims left behind dispatched", func() bool {
		return reflect.DeepEqual(deliveryStatuses(t, db, "crash-"), map[string]int{"dispatched": 3})
	})
	if d := dispatches(); !reflect.DeepEqual(d, map[string]int{"crash-1": 1, "crash-2": 1}) {
		t.Errorf("systemd-run calls by delivery %v, want crash-1 and crash-2 once, crash-3 (already started) never\n%s", d, p.stderr())
	}
	resp, text, err := rawExchange(addr, "POST", advUnitPath, [][2]string{{"X-GitHub-Event", "package"},
		{"X-GitHub-Delivery", "crash-1"}, {"X-Hub-Signature-256", hubSignature(advSecret, body)}}, body, false)
	if err != nil || resp.StatusCode != 202 || strings.TrimSpace(text) != "duplicate delivery" {
		t.Errorf("redelivery of a queued claim: %v %q %v, want 202 duplicate delivery", resp, text, err)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	if err := p.wait(); err != nil {
		t.Errorf("server exit: %v\n%s", err, p.stderr())
	}
}

// watchTimestampFiles checks every timestamp log under state every few milliseconds until stop
// is closed, and reports the paths it ever saw empty (a torn write).
func watchTimestampFiles(state string, stop <-chan struct{}) <-chan []string {
	out := make(chan []string, 1)
	go func() {
		var empty []string
		for {
			select {
			case <-stop:
				out <- empty
				return
			case <-time.After(2 * time.Millisecond):
			}
			files, _ := filepath.Glob(filepath.Join(state, "github-image-limits", "*.db"))
			files = append(files, filepath.Join(state, "ratelimit.db"))
			for _, f := range files {
				if fi, err := os.Stat(f); err == nil && fi.Size() == 0 && !slices.Contains(empty, f) {
					empty = append(empty, f)
				}
			}
		}
	}()
	return out
}

// TestE2EKillServerMidBurst runs the built server under a real socket unit (Restart=on-failure,
// as deployed) and kills it with SIGKILL while a burst of deliveries is in flight. The socket
// keeps accepting; systemd starts the server again. Every delivery answered 202 must be in
// github_deliveries with its request row, and its task (a real run-task in a transient unit,
// pulling from the rig's registry) must finish. Deliveries that lost their connection in the
// kill are redelivered, as an operator would from GitHub's UI, and the same holds for them. No
// timestamp log is ever seen empty.
func TestE2EKillServerMidBurst(t *testing.T) {
	r := needRig(t)
	bin := buildBinary(t)
	state := r.TempDir(t)
	logPath := filepath.Join(r.TempDir(t), "server.log")
	port, err := rigFreePort()
	if err != nil {
		t.Fatal(err)
	}
	secret := "kill-e2e-" + randomName(t)
	repo := rigUniqueName(t, "kill")
	ref, _ := r.PushImage(t, "e2e/"+repo, "latest", "v1")
	app := repo + ".service"
	r.InstallUnit(t, app, "[Service]\nExecStart=/bin/sleep 1000\n")
	if _, err := r.Systemctl(t, "start", app); err != nil {
		t.Fatal(err)
	}
	// The app runs no container, so it names no image: WEBHOOK_ALLOW_ANY_IMAGE lets its tasks
	// redeploy it, which is what this test counts.
	service, socket := r.installSocketServer(t, bin, state, logPath, port, "Environment=GITHUB_WEBHOOK_SECRET="+secret,
		"Environment=WEBHOOK_HEALTH_SETTLE_SECS=1", "Environment=WEBHOOK_REGISTRY_HOSTS="+r.Registry(),
		"Environment=WEBHOOK_ALLOW_ANY_IMAGE=true", "Restart=on-failure", "RestartSec=1")
	if _, err := r.Systemctl(t, "start", socket); err != nil {
		t.Fatal(err)
	}
	serverLog := func() string { b, _ := os.ReadFile(logPath); return string(b) }
	url := fmt.Sprintf("http://127.0.0.1:%d/github-package-update/%s", port, repo)
	body := githubPackagePayload(r.Registry(), "e2e", repo, "latest", "")
	client := &http.Client{Timeout: 2 * time.Minute}
	send := func(delivery string) (int, string, string, error) {
		req, _ := http.NewRequest("POST", url, bytes.NewReader(body))
		req.Header.Set("X-Hub-Signature-256", hubSignature(secret, body))
		req.Header.Set("X-GitHub-Event", "package")
		req.Header.Set("X-GitHub-Delivery", delivery)
		resp, err := client.Do(req)
		if err != nil {
			return 0, "", "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp.StatusCode, strings.TrimSpace(string(b)), resp.Header.Get("X-Request-Id"), err
	}
	if code, text, _, err := send("kill-first"); err != nil || code != 202 {
		t.Fatalf("first delivery: %d %q %v; server log:\n%s", code, text, err, serverLog())
	}
	oldPID := r.Show(t, service, "MainPID")["MainPID"]

	stopWatch := make(chan struct{})
	emptySeen := watchTimestampFiles(state, stopWatch)
	type answer struct {
		code      int
		text, rid string
		err       error
	}
	const workers, each = 4, 8
	var mu sync.Mutex
	answers := map[string]answer{}
	var answered atomic.Int32
	killed := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				id := fmt.Sprintf("kill-%d-%d", w, i)
				code, text, rid, err := send(id)
				mu.Lock()
				answers[id] = answer{code, text, rid, err}
				mu.Unlock()
				if answered.Add(1) == workers*each/3 {
					close(killed)
				}
			}
		}()
	}
	<-killed
	pid, _ := strconv.Atoi(oldPID)
	if pid <= 1 {
		t.Fatalf("MainPID of %s is %q", service, oldPID)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	wg.Wait()

	// What lost its connection is redelivered, once the server is back.
	var lost []string
	for id, a := range answers {
		if a.err != nil {
			lost = append(lost, id)
		}
	}
	sort.Strings(lost)
	redelivered := map[string]answer{}
	for _, id := range lost {
		code, text, rid, err := send(id)
		if err != nil {
			t.Fatalf("redelivery of %s: %v; server log:\n%s", id, err, serverLog())
		}
		redelivered[id] = answer{code, text, rid, err}
	}
	newPID := r.Show(t, service, "MainPID")["MainPID"]
	if newPID == oldPID || newPID == "0" {
		t.Fatalf("%s: MainPID %s after the kill of %s: not restarted", service, newPID, oldPID)
	}

	e2e := &e2eServer{url: url, state: state, secret: secret, log: &logBuffer{}, db: rawDB(t, filepath.Join(state, "data", "pod-upgrade-trigger.db"))}
	accepted := map[string]string{"kill-first": ""}
	counts := map[string]int{}
	check := func(id string, a answer, how string) {
		counts[how+" "+strconv.Itoa(a.code)+" "+a.text]++
		if a.err != nil {
			return
		}
		// A redelivery may be refused with 500 (GitHub then shows it failed): its claim's task
		// unit may still exist. What must never happen is a 2xx without a task.
		if a.code != 202 && !(how == "redelivered" && a.code == 500) {
			t.Errorf("%s %s: %d %q", how, id, a.code, a.text)
		}
		if a.code/100 == 2 {
			accepted[id] = a.rid
		}
	}
	for id, a := range answers {
		check(id, a, "first")
	}
	for id, a := range redelivered {
		check(id, a, "redelivered")
	}
	t.Logf("kill -9 of pid %s after %d answers; restarted as %s; answers: %v", oldPID, workers*each/3, newPID, counts)
	// Every delivery answered 202 runs, once the restarted server has its queue: its claim ends
	// done, covered by a task that finished. A task started before the kill is not started
	// again (the restart finds its unit), one never started is.
	for id, rid := range accepted {
		if rid != "" && queryInt(t, e2e.db, `SELECT count(*) FROM event_log WHERE request_id = ? AND status = 202`, rid) != 1 {
			t.Errorf("accepted delivery %s: no 202 row for its request %s", id, rid)
		}
		var status, leader string
		r.WaitFor(t, 120*time.Second, func() bool {
			err := e2e.db.QueryRow(`SELECT status, coalesce(covered_by, '') FROM github_deliveries WHERE delivery_id = ?`, id).
				Scan(&status, &leader)
			return err == nil && status == "done"
		}, "the claim of "+id+" to be done")
		rows := e2e.waitTask(t, r, leader)
		if last := rows[len(rows)-1].step; last != "up-to-date" && last != "completed" {
			t.Errorf("task of %s (run by %s): steps %s", id, leader, stepDetails(rows))
		}
	}
	if n := queryInt(t, e2e.db, `SELECT count(*) FROM (SELECT json_extract(meta, '$.delivery') d FROM event_log
		WHERE action = 'github-task' AND json_extract(meta, '$.step') = 'started' GROUP BY d HAVING count(*) > 1)`); n != 0 {
		t.Errorf("%d tasks started twice", n)
	}
	var pulled int
	for _, row := range e2e.taskRows(t, "") {
		if row.step == "pulled" {
			pulled++
		}
	}
	close(stopWatch)
	if empty := <-emptySeen; len(empty) > 0 {
		t.Errorf("timestamp logs seen empty: %q", empty)
	}
	ts, bad, err := readTimestamps(imageLimitPath(state, ref))
	if err != nil || bad != 0 || len(ts) != pulled {
		t.Errorf("per-image log: %d timestamps, %d bad, %v; want one per task that pulled (%d)", len(ts), bad, err, pulled)
	}
	if t.Failed() {
		t.Logf("server log:\n%s", serverLog())
	}
}

// TestE2EKillRunTask kills a real run-task (its transient unit, with systemctl --user kill -s
// KILL) while it holds the image's lock, stuck in the restart of a unit whose start never ends.
// The kernel drops the flock with the process: the next delivery of the same image gets the lock
// and redeploys.
func TestE2EKillRunTask(t *testing.T) {
	r := needRig(t)
	// The app runs no container, so it names no image: WEBHOOK_ALLOW_ANY_IMAGE lets the tasks
	// this test is about pull and restart it.
	s := startE2EServer(t, "WEBHOOK_TASK_LOCK_TIMEOUT_SECS=60", "WEBHOOK_ALLOW_ANY_IMAGE=true")
	repo := rigUniqueName(t, "stuck")
	ref, _ := r.PushImage(t, "e2e/"+repo, "latest", "v1")
	app := repo + ".service"
	unitPath := r.InstallUnit(t, app, "[Service]\nExecStartPre=/bin/sleep 1000\nExecStart=/bin/sleep 1000\n")
	body := githubPackagePayload(r.Registry(), "e2e", repo, "latest", "")
	lock := imageLockPath(s.state, ref)

	if code, text := s.deliver(t, repo, "package", "stuck-1", body, s.secret); code != 202 {
		t.Fatalf("first delivery: %d %q; log:\n%s", code, text, s.log)
	}
	r.WaitFor(t, 2*time.Minute, func() bool {
		return slices.Contains(steps(s.taskRows(t, "stuck-1")), "pulled") && r.Show(t, app, "ActiveState")["ActiveState"] == "activating"
	}, "the first task to hang in the restart of "+app)
	if lk, free, err := tryLockFile(lock); err != nil || free {
		lk.Unlock()
		t.Fatalf("the hanging task does not hold %s (free %v, %v)", lock, free, err)
	}
	task := taskUnitName("stuck-1") + ".service"
	if _, err := r.Systemctl(t, "kill", "-s", "KILL", "--", task); err != nil {
		t.Fatal(err)
	}
	r.WaitFor(t, time.Minute, func() bool {
		st := r.Show(t, task, "ActiveState")["ActiveState"]
		return st != "active" && st != "deactivating"
	}, task+" to die")
	r.WaitFor(t, 30*time.Second, func() bool {
		lk, free, err := tryLockFile(lock)
		lk.Unlock()
		return err == nil && free
	}, "the killed task's lock to be released")

	// The unit is fixed and its stuck start cancelled; the next delivery goes through the lock.
	if _, err := r.Systemctl(t, "stop", "--", app); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(unitPath, []byte("[Service]\nExecStart=/bin/sleep 1000\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Systemctl(t, "daemon-reload"); err != nil {
		t.Fatal(err)
	}
	if code, text := s.deliver(t, repo, "package", "stuck-2", body, s.secret); code != 202 {
		t.Fatalf("second delivery: %d %q", code, text)
	}
	rows := s.waitTask(t, r, "stuck-2")
	if got := strings.Join(steps(rows), ","); got != "started,pulled,restarted,healthy,completed" {
		t.Fatalf("second task: %s; log:\n%s", stepDetails(rows), s.log)
	}
	if got := steps(s.taskRows(t, "stuck-1")); !slices.Equal(got, []string{"started", "pulled"}) {
		t.Errorf("the killed task wrote %v, want [started pulled]", got)
	}
	if ts, bad, err := readTimestamps(imageLimitPath(s.state, ref)); err != nil || bad != 0 || len(ts) != 2 {
		t.Errorf("per-image log: %d timestamps, %d bad, %v; want 2", len(ts), bad, err)
	}
}

// Benchmarks of the request path. Run them with
//
//	go test -run '^$' -bench . -benchtime 200ms .
//
// systemctl is /bin/true here: configuredImage runs "systemctl --user show" through runCommand,
// which a test cannot swap (only dispatch goes through s.exec), so a delivery that reaches the
// Quadlet match always costs one process start. /bin/true prints nothing, which reads as a unit
// with no Quadlet file, so the first pushed tag is used.

// benchServer is the server of newTestServer with dispatch stubbed and /bin/true as systemctl.
func benchServer(b *testing.B, quadletImage string) *testServer {
	b.Helper()
	bin := b.TempDir()
	if err := os.Symlink("/bin/true", filepath.Join(bin, "systemctl")); err != nil {
		b.Fatal(err)
	}
	b.Setenv("PATH", bin)
	ts := newTestServer(b, map[string]string{"GITHUB_WEBHOOK_SECRET": advSecret}, nil)
	home := b.TempDir()
	if quadletImage != "" {
		dir := filepath.Join(home, ".config", "containers", "systemd")
		os.MkdirAll(dir, 0o700)
		if err := os.WriteFile(filepath.Join(dir, "web.container"), []byte("[Container]\nImage="+quadletImage+"\n"), 0o600); err != nil {
			b.Fatal(err)
		}
	}
	ts.srv.getenv = mapEnv(map[string]string{"HOME": home})
	ts.srv.exec = func(ctx context.Context, timeout time.Duration, argv ...string) cmdResult {
		return cmdResult{argv: argv}
	}
	return ts
}

func benchDeliveries(b *testing.B, quadletImage string, body []byte, want int, wantText string) {
	ts := benchServer(b, quadletImage)
	sig := hubSignature(advSecret, body)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		req := httptest.NewRequest("POST", advUnitPath, bytes.NewReader(body))
		req.Header.Set("X-Hub-Signature-256", sig)
		req.Header.Set("X-GitHub-Event", "package")
		req.Header.Set("X-GitHub-Delivery", "bench-"+strconv.Itoa(i))
		rec := httptest.NewRecorder()
		ts.srv.ServeHTTP(rec, req)
		if rec.Code != want || !strings.Contains(rec.Body.String(), wantText) {
			b.Fatalf("%d %q, want %d %q", rec.Code, rec.Body, want, wantText)
		}
	}
}

// BenchmarkGitHubDelivery: a signed delivery through the whole handler (signature, payload,
// the unit lookup, reused for 2 s, per-image limit check, the claim committed in SQLite) up to
// its 202; the dispatcher is not running.
func BenchmarkGitHubDelivery(b *testing.B) {
	benchDeliveries(b, "", githubPackagePayload("ghcr.io", "octo-org", "web", "v1", ""), 202, "auto-update queued")
}

// BenchmarkRegistryPush: a Distribution envelope (a blob push and a tagged manifest push, as
// podman push sends them) through the whole handler, up to its 202, for the unit whose Quadlet
// file names the pushed image: beside BenchmarkGitHubDelivery, what the bearer check and the
// envelope cost instead of the HMAC and GitHub's payload.
func BenchmarkRegistryPush(b *testing.B) {
	ts := benchServer(b, "reg.example:5000/e2e/app:latest")
	ts.cfg.registryTokens["distribution"] = advRegistryToken
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		id := "bench-" + strconv.Itoa(i)
		body := distEnvelope(distEvent(id+"-blob", "push", "application/octet-stream", "e2e/app", "", "reg.example:5000"),
			distEvent(id, "push", manifestV2, "e2e/app", "latest", "reg.example:5000"))
		req := httptest.NewRequest("POST", "/registry/distribution/web", bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+advRegistryToken)
		rec := httptest.NewRecorder()
		ts.srv.ServeHTTP(rec, req)
		if rec.Code != 202 || !strings.Contains(rec.Body.String(), "auto-update queued") {
			b.Fatalf("%d %q, want 202 auto-update queued", rec.Code, rec.Body)
		}
	}
}

// BenchmarkGitHubIgnored: a signed delivery of an npm package, acknowledged and ignored.
func BenchmarkGitHubIgnored(b *testing.B) {
	body, err := os.ReadFile(filepath.Join("testdata", "payloads", "package-published-npm.json"))
	if err != nil {
		b.Fatal(err)
	}
	benchDeliveries(b, "", body, 202, "not-container")
}

// BenchmarkGitHubTagMismatch: a signed delivery that passes every check but the last and is
// answered 202 "tag mismatch" (the unit's Quadlet file names another tag): the request path's
// whole cost short of the claim, the load run's "ignored after every check".
func BenchmarkGitHubTagMismatch(b *testing.B) {
	benchDeliveries(b, "ghcr.io/octo-org/web:latest", githubPackagePayload("ghcr.io", "octo-org", "web", "v9", ""), 202, "tag mismatch")
}

// BenchmarkDeliveryBurst: 32 clients send signed deliveries with unique ids for one image over
// loopback HTTP, with the dispatcher running (systemd-run stubbed; the task it starts keeps the
// unit busy, as a real one would for seconds). It reports the answer time's median and 99th
// percentile, and the tasks started (the queue starts one per unit at a time).
func BenchmarkDeliveryBurst(b *testing.B) {
	ts := benchServer(b, "")
	var started atomic.Int64
	ts.srv.exec = func(ctx context.Context, timeout time.Duration, argv ...string) cmdResult {
		started.Add(1)
		return cmdResult{argv: argv}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); ts.srv.runDispatcher(ctx) }()
	defer func() { cancel(); <-done }()
	body := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
	sig := hubSignature(advSecret, body)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	defer client.CloseIdleConnections()
	var (
		id   atomic.Int64
		mu   sync.Mutex
		took []time.Duration
	)
	b.SetParallelism(max(1, 32/runtime.GOMAXPROCS(0)))
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		var mine []time.Duration
		for pb.Next() {
			req, _ := http.NewRequest("POST", ts.URL+advUnitPath, bytes.NewReader(body))
			req.Header.Set("X-Hub-Signature-256", sig)
			req.Header.Set("X-GitHub-Event", "package")
			req.Header.Set("X-GitHub-Delivery", fmt.Sprintf("burst-%d", id.Add(1)))
			t0 := time.Now()
			resp, err := client.Do(req)
			if err != nil {
				b.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			mine = append(mine, time.Since(t0))
			if resp.StatusCode != 202 {
				b.Errorf("delivery answered %d, want 202", resp.StatusCode)
				return
			}
		}
		mu.Lock()
		took = append(took, mine...)
		mu.Unlock()
	})
	b.StopTimer()
	slices.Sort(took)
	if len(took) > 0 {
		b.ReportMetric(float64(took[len(took)/2].Microseconds())/1000, "p50-ms")
		b.ReportMetric(float64(took[len(took)*99/100].Microseconds())/1000, "p99-ms")
	}
	b.ReportMetric(float64(started.Load()), "tasks")
}

// BenchmarkHealth compares GET /health of the server (request id, body cap, routing, metrics
// and the probe summary) with a bare net/http handler answering "ok", both called directly and
// over loopback HTTP with keep-alive.
func BenchmarkHealth(b *testing.B) {
	ts := newTestServer(b, nil, nil)
	bare := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok")) })
	for _, h := range []struct {
		name string
		h    http.Handler
	}{{"server", ts.srv}, {"bare", bare}} {
		b.Run("handler/"+h.name, func(b *testing.B) {
			req := httptest.NewRequest("GET", "/health", nil)
			b.ReportAllocs()
			for b.Loop() {
				rec := httptest.NewRecorder()
				h.h.ServeHTTP(rec, req)
				if rec.Code != 200 {
					b.Fatal(rec.Code)
				}
			}
		})
		b.Run("loopback/"+h.name, func(b *testing.B) {
			srv := httptest.NewServer(h.h)
			defer srv.Close()
			client := srv.Client()
			b.ReportAllocs()
			for b.Loop() {
				resp, err := client.Get(srv.URL + "/health")
				if err != nil {
					b.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					b.Fatal(resp.StatusCode)
				}
			}
		})
	}
}

// dispatchRig is a server whose dispatcher a test drives by hand (drain), with fake systemctl,
// a scripted systemd-run and a clock the test moves.
type dispatchRig struct {
	*testServer
	h       *fakeHost
	now     time.Time
	fail    int      // systemd-runs that fail from now on
	started bool     // a failing systemd-run started its task anyway
	runs    []string // the delivery of every systemd-run, in order
	seq     int
}

func newDispatchRig(t *testing.T) *dispatchRig {
	h := newFakeHost(t)
	d := &dispatchRig{h: h, now: time.Now()}
	d.testServer = newTestServer(t, nil, nil)
	d.srv.now = func() time.Time { return d.now }
	d.srv.exec = func(ctx context.Context, timeout time.Duration, argv ...string) cmdResult {
		delivery := argv[len(argv)-2]
		d.runs = append(d.runs, delivery)
		if d.fail > 0 {
			d.fail--
			if d.started {
				h.set("started."+taskUnitName(delivery), "")
			}
			return cmdResult{argv: argv, exitCode: 1, stderr: "Failed to start transient service unit", err: errors.New("systemd-run failed (exit 1)")}
		}
		h.set("started."+taskUnitName(delivery), "") // fake systemctl show: the task unit is active
		return cmdResult{argv: argv}
	}
	return d
}

// claim queues a delivery as the request path does, a millisecond after the previous one.
func (d *dispatchRig) claim(t *testing.T, id, unit, image string) {
	t.Helper()
	d.seq++
	ok, err := d.events.claimDelivery(context.Background(), taskSpec{unit: unit, image: image, event: "package", delivery: id, path: "/p"},
		event{RequestID: "req-" + id, TS: d.now.Add(time.Duration(d.seq) * time.Millisecond), Method: "POST", Status: 202,
			Action: "github-webhook", Meta: map[string]any{"delivery": id, "reason": "queued"}})
	if err != nil || !ok {
		t.Fatalf("claim %s: %v %v", id, ok, err)
	}
}

// end ends the task of leader as run-task does, or (vanish) as a killed one does: its unit gone,
// its claims not marked done.
func (d *dispatchRig) end(t *testing.T, leader string, vanish bool) {
	t.Helper()
	os.Remove(filepath.Join(d.h.dir, "started."+taskUnitName(leader)))
	if !vanish {
		if err := d.events.settleTask(context.Background(), taskUnitName(leader), "done", "", time.Time{}, nil); err != nil {
			t.Fatal(err)
		}
	}
}

// state is each claim's status and covering delivery, as "status/covered_by".
func (d *dispatchRig) state(t *testing.T) map[string]string {
	t.Helper()
	rows, err := rawDB(t, d.cfg.dbPath).Query(`SELECT delivery_id, status || '/' || coalesce(covered_by, '') FROM github_deliveries`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var id, st string
		rows.Scan(&id, &st)
		out[id] = st
	}
	return out
}

// TestDispatcherRules drives the dispatcher step by step: claims are taken in arrival order; a
// task covers every pending claim of its unit and image; while a unit's task runs, its later
// claims (any image) wait, and another unit's do not; a task that ends lets the next one start,
// also when it was killed without marking its claims done; a failed systemd-run is retried with
// backoff, not before its time, and after dispatchAttempts the claims fail with the error in
// their rows; a failed claim is taken over by its redelivery; a systemd-run that failed although
// its task started counts as dispatched; a claim left dispatching by a stopped server is queued
// again when its task never started.
func TestDispatcherRules(t *testing.T) {
	const imgA, imgB = "ghcr.io/o/a:v1", "ghcr.io/o/a:v2"
	d := newDispatchRig(t)

	d.claim(t, "a-1", "a.service", imgA)
	d.claim(t, "b-1", "b.service", imgA)
	d.claim(t, "a-2", "a.service", imgA)
	d.drain(t)
	if !slices.Equal(d.runs, []string{"a-1", "b-1"}) {
		t.Fatalf("tasks started for %q, want a-1 (covering a-2) then b-1, in arrival order", d.runs)
	}
	if st := d.state(t); st["a-2"] != "dispatched/a-1" || st["a-1"] != "dispatched/a-1" || st["b-1"] != "dispatched/b-1" {
		t.Errorf("claims %v, want a-2 covered by a-1's task", st)
	}

	d.claim(t, "a-3", "a.service", imgA)
	d.claim(t, "a-4", "a.service", imgB)
	d.claim(t, "c-1", "c.service", imgA)
	d.drain(t)
	if !slices.Equal(d.runs[2:], []string{"c-1"}) {
		t.Fatalf("while a's task runs: tasks %q, want only c-1's", d.runs[2:])
	}
	d.end(t, "a-1", false)
	d.drain(t)
	if !slices.Equal(d.runs[3:], []string{"a-3"}) || d.state(t)["a-4"] != "pending/" {
		t.Fatalf("after a's task ended: tasks %q, claims %v; want a-3's task, a-4 (another image) waiting for it", d.runs[3:], d.state(t))
	}
	d.end(t, "a-3", true) // killed: its claims stay dispatched until the dispatcher looks
	d.drain(t)
	if len(d.runs) != 4 {
		t.Fatalf("a task started before the killed one was noticed: %q", d.runs)
	}
	d.now = d.now.Add(taskCheckAfter + 2*time.Second)
	d.drain(t)
	if !slices.Equal(d.runs[4:], []string{"a-4"}) || d.state(t)["a-3"] != "done/a-3" {
		t.Fatalf("after the killed task was noticed: tasks %q, claims %v", d.runs[4:], d.state(t))
	}

	// Retries with backoff, then failure; the redelivery takes the failed claim over.
	d.fail = dispatchAttempts
	d.claim(t, "e-1", "e.service", imgA)
	for attempt := 1; attempt <= dispatchAttempts; attempt++ {
		d.drain(t)
		d.drain(t) // not due again before its backoff
		if n := slices.Index(d.runs, "e-1"); n < 0 || len(d.runs)-n != attempt {
			t.Fatalf("attempt %d: systemd-runs %q", attempt, d.runs)
		}
		d.now = d.now.Add(retryDelay(attempt - 1))
	}
	if st := d.state(t)["e-1"]; st != "failed/e-1" {
		t.Fatalf("e-1 after %d failed systemd-runs: %s, want failed", dispatchAttempts, st)
	}
	var reasons []string
	for _, e := range d.deliveryRows(t, "e-1") {
		reasons = append(reasons, fmt.Sprint(e.Meta["reason"]))
		if r := e.Meta["reason"]; (r == "dispatch-retry" || r == "dispatch-failed") && !strings.Contains(fmt.Sprint(e.Meta["stderr"]), "Failed to start") {
			t.Errorf("row %v lacks systemd-run's stderr", e.Meta)
		}
	}
	want := []string{"queued"}
	for i := 1; i < dispatchAttempts; i++ {
		want = append(want, "dispatching", "dispatch-retry")
	}
	want = append(want, "dispatching", "dispatch-failed")
	if !slices.Equal(reasons, want) {
		t.Errorf("rows of e-1: %q, want %q", reasons, want)
	}
	if !strings.Contains(d.logs.String(), "giving up on delivery e-1") {
		t.Errorf("the give-up is not in the log:\n%s", d.logs)
	}
	d.seq++
	if ok, err := d.events.claimDelivery(context.Background(), taskSpec{unit: "e.service", image: imgA, event: "package", delivery: "e-1"},
		event{RequestID: "req-e-1-again", TS: d.now, Method: "POST", Status: 202, Action: "github-webhook"}); !ok || err != nil {
		t.Fatalf("redelivery of a failed claim: %v %v, want it taken over", ok, err)
	}
	if ok, _ := d.events.claimDelivery(context.Background(), taskSpec{unit: "e.service", image: imgA, event: "package", delivery: "e-1"},
		event{RequestID: "req-e-1-copy", TS: d.now, Method: "POST", Status: 202, Action: "github-webhook"}); ok {
		t.Error("a copy of a pending claim was claimed again")
	}
	d.drain(t)
	if st := d.state(t)["e-1"]; st != "dispatched/e-1" {
		t.Errorf("redelivered e-1: %s, want dispatched", st)
	}

	// systemd-run failed, but the task had started: dispatched, not retried.
	d.fail, d.started = 1, true
	d.claim(t, "f-1", "f.service", imgA)
	d.drain(t)
	if st := d.state(t)["f-1"]; st != "dispatched/f-1" {
		t.Errorf("f-1, whose systemd-run failed after the task started: %s, want dispatched", st)
	}
	d.started = false

	// A server stopped during systemd-run: the task never started, so the claim is queued again.
	d.claim(t, "g-1", "g.service", imgA)
	if _, ok, _, err := d.events.nextTask(context.Background(), d.now, func(queuedTask) []event { return nil }); !ok || err != nil {
		t.Fatal(ok, err)
	}
	d.srv.reconcile(context.Background(), "dispatching", d.now.Add(time.Minute))
	if st := d.state(t)["g-1"]; st != "pending/" {
		t.Errorf("g-1 left dispatching with no task: %s, want pending", st)
	}
	d.drain(t)
	if st := d.state(t)["g-1"]; st != "dispatched/g-1" {
		t.Errorf("g-1 after the restart: %s, want dispatched", st)
	}
	pending, oldest, err := d.events.queueStats(context.Background())
	if err != nil || pending != 0 || !oldest.IsZero() {
		t.Errorf("queueStats with nothing pending: %d %v %v", pending, oldest, err)
	}
}

// deliveryRows are the rows of a delivery, oldest first.
func (ts *testServer) deliveryRows(t *testing.T, delivery string) []storedEvent {
	t.Helper()
	waitPending(t, ts.events)
	evs, err := queryEvents(context.Background(), ts.events.db, eventFilter{delivery: delivery, afterID: -1})
	if err != nil {
		t.Fatal(err)
	}
	return evs
}

// TestUntaggedQuadletImage: a unit whose Image= has no tag runs :latest, so a push of :latest
// redeploys it; an Image= that is no reference at all is a visible failure (500), not a 202.
func TestUntaggedQuadletImage(t *testing.T) {
	h := newFakeHost(t)
	quadlet := filepath.Join(t.TempDir(), "web.container")
	h.set("unit.state", "ActiveState=active\nLoadState=loaded\nSourcePath="+quadlet+"\n")
	ts := newTestServer(t, map[string]string{"GITHUB_WEBHOOK_SECRET": advSecret}, nil)
	ts.srv.units.ttl = 0 // the file changes between requests
	ts.srv.exec = func(ctx context.Context, timeout time.Duration, argv ...string) cmdResult {
		return cmdResult{argv: argv}
	}
	for i, tc := range []struct {
		image, tag string
		want       int
		wantText   string
	}{
		{"ghcr.io/octo-org/web", "latest", 202, "auto-update queued"},
		{"ghcr.io/octo-org/web", "v1", 202, "tag mismatch: the unit runs ghcr.io/octo-org/web:latest, and ghcr.io/octo-org/web was pushed as v1"},
		{"quay.io/octo-org/web", "latest", 202, "host mismatch: the unit runs quay.io/octo-org/web:latest, from registry quay.io, not ghcr.io"},
		{"ghcr.io/octo-org/api:latest", "latest", 202, "repository mismatch: the unit runs ghcr.io/octo-org/api:latest, not ghcr.io/octo-org/web"},
		{"web.image", "latest", 500, "the unit's Image= is not a full image reference (registry/owner/name[:tag])"},
	} {
		if err := os.WriteFile(quadlet, []byte("[Container]\nImage="+tc.image+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		body := githubPackagePayload("ghcr.io", "octo-org", "web", tc.tag, "")
		req, _ := http.NewRequest("POST", ts.URL+"/github-package-update/web", bytes.NewReader(body))
		req.Header.Set("X-GitHub-Event", "package")
		req.Header.Set("X-GitHub-Delivery", fmt.Sprintf("untagged-%d", i))
		req.Header.Set("X-Hub-Signature-256", hubSignature(advSecret, body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.want || strings.TrimSpace(string(b)) != tc.wantText {
			t.Errorf("Image=%s, pushed :%s: %d %q, want %d %q", tc.image, tc.tag, resp.StatusCode, b, tc.want, tc.wantText)
		}
	}
}

// TestPanickingHandlerKeepsItsRow: a handler that panics is answered 500 and still leaves its
// event row; the server keeps serving.
func TestPanickingHandlerKeepsItsRow(t *testing.T) {
	ts := newTestServer(t, nil, nil)
	ts.srv.mux.HandleFunc("GET /test-panic", func(w http.ResponseWriter, r *http.Request) { panic("boom") })
	resp, err := http.Get(ts.URL + "/test-panic")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusInternalServerError {
		t.Fatalf("status %d, want 500", resp.StatusCode)
	}
	if resp, err := http.Get(ts.URL + "/health"); err != nil || resp.StatusCode != 200 {
		t.Fatalf("server stopped serving after a panic: %v", err)
	}
	ts.shutdown()
	var status int
	var meta string
	if err := rawDB(t, ts.cfg.dbPath).QueryRow(`SELECT status, meta FROM event_log WHERE path = '/test-panic'`).Scan(&status, &meta); err != nil {
		t.Fatalf("no row for the panicking request: %v", err)
	}
	if status != 500 || !strings.Contains(meta, `"panic":"boom"`) {
		t.Fatalf("row status %d meta %s", status, meta)
	}
	if !strings.Contains(ts.logs.String(), "panic serving GET /test-panic: boom") {
		t.Errorf("the panic is not in the log:\n%s", ts.logs.String())
	}
}

// Hardening (issue 11): what an unauthenticated client can cost, and what /health reports.

// TestRequestFieldsBounded: whatever a client puts in the path, the query or the headers, its
// row stores at most maxFieldBytes of each value, marked with the original length; a request
// line beyond maxHeaderBytes is refused by net/http (431) before any handler or row. Nothing runs.
func TestRequestFieldsBounded(t *testing.T) {
	s := newAdvServer(t, nil)
	long := strings.Repeat("a", 12<<10)
	cases := []struct {
		name, method, target string
		header               [][2]string
		status               int
		marker               string // the truncation marker the row must carry
	}{
		{"long unit, unsigned delivery", "POST", "/github-package-update/" + long, nil, 401,
			"[truncated: " + strconv.Itoa(len("/github-package-update/"+long)) + " bytes]"},
		{"long query on /sse/hello", "GET", "/sse/hello?x=" + long, nil, 200, "[truncated: " + strconv.Itoa(len("x="+long)) + " bytes]"},
		{"long path, not found", "GET", "/" + long, nil, 404, "[truncated: " + strconv.Itoa(1+len(long)) + " bytes]"},
		{"long event header, unsigned", "POST", advUnitPath, [][2]string{{"X-GitHub-Event", long}}, 401, ""},
		// Past the bound net/http stops reading and answers 431; a larger line would be cut off by
		// a reset while it is still being sent, which refuses it as well.
		{"request line of 64 KiB", "GET", "/health?x=" + strings.Repeat("b", 64<<10), nil, 431, ""},
		{"header block of 64 KiB", "GET", "/health", [][2]string{{"X-Pad", strings.Repeat("c", 64<<10)}}, 431, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := len(s.h.calls())
			waitPending(t, s.events)
			rowsBefore := queryInt(t, rawDB(t, s.cfg.dbPath), `SELECT count(*) FROM event_log`)
			resp, _, err := rawExchange(s.Listener.Addr().String(), c.method, c.target, c.header, []byte(`{}`), false)
			if c.status == 431 && errors.Is(err, syscall.ECONNRESET) {
				// net/http answered 431 and closed with the rest unread: the answer was lost in
				// the reset, the refusal was not.
				resp, err = &http.Response{StatusCode: 431, Header: http.Header{}}, nil
			}
			if err != nil {
				t.Fatalf("%s: %v", c.name, err)
			}
			if resp.StatusCode != c.status {
				t.Fatalf("%s: %d, want %d", c.name, resp.StatusCode, c.status)
			}
			if calls := s.h.calls()[before:]; len(calls) > 0 {
				t.Errorf("%s ran commands:\n%s", c.name, fakeCallLines(calls))
			}
			id := resp.Header.Get("X-Request-Id")
			if c.status == 431 {
				waitPending(t, s.events)
				if n := queryInt(t, rawDB(t, s.cfg.dbPath), `SELECT count(*) FROM event_log`); id != "" || n != rowsBefore {
					t.Errorf("a 431 reached the handler (request id %q, %d rows, %d before)", id, n, rowsBefore)
				}
				return
			}
			waitPending(t, s.events)
			rows := readRows(t, rawDB(t, s.cfg.dbPath), "WHERE request_id = ?", id)
			if len(rows) != 1 {
				t.Fatalf("%d rows for request %s, want 1", len(rows), id)
			}
			r := rows[0]
			if size := len(r.path.String) + len(r.meta) + len(r.method); size > 4<<10 {
				t.Errorf("the row stores %d bytes of path, method and meta, want at most 4 KiB: %.300s…", size, r.meta)
			}
			if c.marker != "" && !strings.Contains(r.meta, c.marker) {
				t.Errorf("the row's meta lacks the marker %q: %.300s…", c.marker, r.meta)
			}
		})
	}
}

// rawRequest writes a request exactly as given on one connection and returns the connection's
// whole output until the server closes it (or hangGuard passes).
func rawRequest(t *testing.T, addr, request string) string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(hangGuard))
	if _, err := io.WriteString(c, request); err != nil {
		t.Fatal(err)
	}
	out, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("the server did not close the connection within %s: %v; got so far:\n%s", hangGuard, err, out)
	}
	return string(out)
}

// TestAmbiguousFraming: a request with both Content-Length and Transfer-Encoding is answered 400
// and its connection closed, so a request smuggled in its body is never served; the same request
// pipelined after an honest one on the same connection is caught too. Nothing runs; the row says
// bad-framing. A request with only a Transfer-Encoding is served, and its connection closed.
func TestAmbiguousFraming(t *testing.T) {
	s := newAdvServer(t, nil)
	ok := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
	smuggled := "GET /health HTTP/1.1\r\nHost: test\r\n\r\n"
	chunk := fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(ok), ok)
	delivery := func(id string, header string) string {
		return "POST " + advUnitPath + " HTTP/1.1\r\nHost: test\r\nX-GitHub-Event: package\r\nX-GitHub-Delivery: " + id +
			"\r\nX-Hub-Signature-256: " + hubSignature(advSecret, ok) + "\r\n" + header + "\r\n"
	}
	cases := []struct {
		name    string
		request string
		answers []int // status of each answer on the connection, in order
		action  string
		calls   []string
	}{
		{"both, Content-Length first", delivery("frame-1", "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n") + chunk + smuggled,
			[]int{400}, "bad-framing", nil},
		{"both, Transfer-Encoding first", delivery("frame-2", "Transfer-Encoding: chunked\r\nContent-Length: "+strconv.Itoa(len(chunk))+"\r\n") + chunk + smuggled,
			[]int{400}, "bad-framing", nil},
		{"both, in other cases", delivery("frame-3", "content-length: 5\r\nTRANSFER-ENCODING: chunked\r\n") + chunk + smuggled,
			[]int{400}, "bad-framing", nil},
		{"both, after an honest request on the connection", "GET /health HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\n{}" +
			delivery("frame-4", "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n") + chunk + smuggled,
			[]int{200, 400}, "bad-framing", nil},
		{"chunked only: served, then closed", delivery("frame-5", "Transfer-Encoding: chunked\r\n") + chunk + smuggled,
			[]int{202}, "github-webhook", []string{"systemctl-show", keySystemdRun}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := len(s.h.calls())
			out := rawRequest(t, s.Listener.Addr().String(), c.request)
			s.settleQueue(t)
			br := bufio.NewReader(strings.NewReader(out))
			var got []int
			var last string
			for {
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					break
				}
				io.Copy(io.Discard, resp.Body)
				got = append(got, resp.StatusCode)
				last = resp.Header.Get("X-Request-Id")
			}
			if !slices.Equal(got, c.answers) {
				t.Fatalf("answers %v, want %v (a further answer is a smuggled request served):\n%s", got, c.answers, out)
			}
			var keys []string
			for _, call := range s.h.calls()[before:] {
				keys = append(keys, call[0]+"-"+fakeVerb(call[0], call[1:]))
			}
			if !slices.Equal(keys, c.calls) {
				t.Errorf("ran %q, want %q", keys, c.calls)
			}
			waitPending(t, s.events)
			rows := readRows(t, rawDB(t, s.cfg.dbPath), "WHERE request_id = ?", last)
			if len(rows) != 1 || rows[0].action != c.action || rows[0].status != c.answers[len(c.answers)-1] {
				t.Errorf("row of the last request: %+v, want action %s status %d", rows, c.action, c.answers[len(c.answers)-1])
			}
		})
	}
}

// TestRefusedPayloadDump: bodies whose signature failed are saved at most once a second, and
// the answer never waits for the write: here the write blocks until the test has all answers.
func TestRefusedPayloadDump(t *testing.T) {
	s := newAdvServer(t, nil)
	var mu sync.Mutex
	clock := time.Unix(1_800_000_000, 0)
	s.srv.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	advance := func(d time.Duration) { mu.Lock(); clock = clock.Add(d); mu.Unlock() }
	release := make(chan struct{})
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	t.Cleanup(unblock) // before the server's shutdown, which waits for its handlers
	saved := make(chan string, 10)
	s.srv.saveFile = func(path string, data []byte, perm os.FileMode) error {
		<-release
		saved <- string(data)
		return nil
	}
	cases := []struct {
		body  string
		after time.Duration // clock advance before the request
		saved bool
	}{
		{`{"n":1}`, 0, true},
		{`{"n":2}`, 0, false},
		{`{"n":3}`, 999 * time.Millisecond, false},
		{`{"n":4}`, time.Millisecond, true}, // a second after the first save
		{`{"n":5}`, 0, false},
	}
	var ids []string
	for _, c := range cases {
		advance(c.after)
		before := len(s.h.calls())
		resp, _, err := rawExchange(s.Listener.Addr().String(), "POST", advUnitPath,
			[][2]string{{"X-GitHub-Event", "package"}, {"X-Hub-Signature-256", "sha256=" + strings.Repeat("0", 64)}}, []byte(c.body), false)
		if err != nil {
			t.Fatalf("%s: %v (the answer waited for the blocked write?)", c.body, err)
		}
		if resp.StatusCode != 401 {
			t.Errorf("%s: %d, want 401", c.body, resp.StatusCode)
		}
		if calls := s.h.calls()[before:]; len(calls) > 0 {
			t.Errorf("%s ran commands:\n%s", c.body, fakeCallLines(calls))
		}
		ids = append(ids, resp.Header.Get("X-Request-Id"))
	}
	unblock()
	var got []string
	for range 2 {
		select {
		case b := <-saved:
			got = append(got, b)
		case <-time.After(hangGuard):
			t.Fatalf("saved %q, want 2 writes", got)
		}
	}
	if slices.Sort(got); !slices.Equal(got, []string{`{"n":1}`, `{"n":4}`}) {
		t.Errorf("saved %q, want the bodies of requests 1 and 4", got)
	}
	rows := s.rows(t)
	for i, c := range cases {
		var meta map[string]any
		json.Unmarshal([]byte(rows[ids[i]].meta), &meta)
		if rows[ids[i]].status != 401 || meta["reason"] != "bad-signature" || meta["payload_saved"] != c.saved {
			t.Errorf("%s: row status %d meta %v, want 401 bad-signature payload_saved %t", c.body, rows[ids[i]].status, meta, c.saved)
		}
	}
	select {
	case b := <-saved:
		t.Errorf("a third write: %q", b)
	default:
	}
}

// TestBodyBudget: while the bodies in flight hold the whole budget, a request with a body waits
// briefly and is then refused 503 with Retry-After (nothing runs, the row says body-budget); a
// request without a body is served.
func TestBodyBudget(t *testing.T) {
	s := newAdvServer(t, map[string]string{"WEBHOOK_BODY_BUDGET_BYTES": strconv.Itoa(advMaxBody)})
	// A client that announces a body of the whole budget and sends none of it holds the budget.
	c, err := net.Dial("tcp", s.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: test\r\nX-GitHub-Event: package\r\nContent-Length: %d\r\n\r\n", advUnitPath, advMaxBody)
	waitFor(t, "the slow body to hold the budget", func() bool {
		s.srv.bodies.mu.Lock()
		defer s.srv.bodies.mu.Unlock()
		return s.srv.bodies.free == 0
	})

	ok := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
	sig := [2]string{"X-Hub-Signature-256", hubSignature(advSecret, ok)}
	cases := []struct {
		name, method, target string
		header               [][2]string
		body                 []byte
		status               int
		action               string
	}{
		{"signed delivery", "POST", advUnitPath, [][2]string{{"X-GitHub-Event", "package"}, {"X-GitHub-Delivery", "budget-0"}, sig}, ok, 503, "body-budget"},
		{"unsigned body", "POST", advUnitPath, [][2]string{{"X-GitHub-Event", "package"}}, ok, 503, "body-budget"},
		{"manual API body", "POST", "/api/manual/trigger", [][2]string{{"Authorization", "Bearer " + advManualToken}}, []byte(`{"units":["a"]}`), 503, "body-budget"},
		{"hello without a body", "GET", "/sse/hello", nil, nil, 200, "sse-hello"},
	}
	ids := map[string]string{}
	for _, tc := range cases {
		before := len(s.h.calls())
		resp, _, err := rawExchange(s.Listener.Addr().String(), tc.method, tc.target, tc.header, tc.body, false)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if resp.StatusCode != tc.status || (tc.status == 503 && resp.Header.Get("Retry-After") == "") {
			t.Errorf("%s: %d Retry-After %q, want %d with Retry-After on a 503", tc.name, resp.StatusCode, resp.Header.Get("Retry-After"), tc.status)
		}
		if calls := s.h.calls()[before:]; len(calls) > 0 {
			t.Errorf("%s ran commands:\n%s", tc.name, fakeCallLines(calls))
		}
		ids[tc.name] = resp.Header.Get("X-Request-Id")
	}
	c.Close() // the slow client's request ends, so the server can shut down
	rows := s.rows(t)
	for _, tc := range cases {
		if r := rows[ids[tc.name]]; r.status != tc.status || r.action != tc.action {
			t.Errorf("%s: row status %d action %q, want %d %s", tc.name, r.status, r.action, tc.status, tc.action)
		}
	}
}

// TestBodyBudgetFreed: a body that was answered frees its bytes, and one refused for want of
// them gets Retry-After.
func TestBodyBudgetFreed(t *testing.T) {
	s := newAdvServer(t, map[string]string{"WEBHOOK_BODY_BUDGET_BYTES": strconv.Itoa(advMaxBody)})
	ok := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
	release, _ := s.srv.bodies.reserve(context.Background(), advMaxBody)
	resp, _, err := rawExchange(s.Listener.Addr().String(), "POST", advUnitPath,
		[][2]string{{"X-GitHub-Event", "package"}, {"X-GitHub-Delivery", "budget-1"}, {"X-Hub-Signature-256", hubSignature(advSecret, ok)}}, ok, false)
	if err != nil || resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("with the budget taken: %v %v, want 503 with Retry-After", resp, err)
	}
	release()
	resp, _, err = rawExchange(s.Listener.Addr().String(), "POST", advUnitPath,
		[][2]string{{"X-GitHub-Event", "package"}, {"X-GitHub-Delivery", "budget-1"}, {"X-Hub-Signature-256", hubSignature(advSecret, ok)}}, ok, false)
	if err != nil || resp.StatusCode != 202 {
		t.Fatalf("with the budget free again: %v %v, want 202", resp, err)
	}
	for range 3 { // every answered request gives its bytes back
		s.do(t, "POST", advUnitPath, strings.NewReader("{}"))
	}
	s.srv.bodies.mu.Lock()
	free := s.srv.bodies.free
	s.srv.bodies.mu.Unlock()
	if free != int64(advMaxBody) {
		t.Errorf("%d bytes free after every request was answered, want %d", free, advMaxBody)
	}
}

// TestHealthTellsTheTruth: /health, plain and verbose, fails naming the database when its file
// was deleted or replaced under the running server, or when the log's newest write failed; a
// delivery is then refused 503 (nothing but read-only lookups run) rather than claimed in a file
// nobody reads. A write that commits again makes it healthy again.
func TestHealthTellsTheTruth(t *testing.T) {
	ok := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
	for _, tc := range []struct {
		name     string
		fault    func(t *testing.T, s *advServer)
		delivery int    // status of a signed delivery during the fault
		error    string // part of the verbose database error
	}{
		{"database deleted", func(t *testing.T, s *advServer) {
			if err := os.Remove(s.cfg.dbPath); err != nil {
				t.Fatal(err)
			}
		}, 503, "(deleted)"},
		{"database replaced", func(t *testing.T, s *advServer) {
			other := filepath.Join(t.TempDir(), "other.db")
			l, err := openEventLog(other, newLogger(io.Discard))
			if err != nil {
				t.Fatal(err)
			}
			l.Close()
			if err := os.Rename(other, s.cfg.dbPath); err != nil {
				t.Fatal(err)
			}
		}, 503, "replaced by another file"},
		{"newest write failed", func(t *testing.T, s *advServer) {
			s.events.write(context.Background(), func(*sql.Tx) error { return errors.New("disk I/O error (injected)") })
		}, 202, "disk I/O error (injected)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newAdvServer(t, nil)
			var mu sync.Mutex
			clock := time.Now()
			s.srv.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
			later := func() { mu.Lock(); clock = clock.Add(2 * healthCacheFor); mu.Unlock() }
			if resp, body := s.do(t, "GET", "/health", nil); resp.StatusCode != 200 {
				t.Fatalf("/health before the fault: %d %q", resp.StatusCode, body)
			}
			waitPending(t, s.events)
			tc.fault(t, s)
			later()

			resp, body := s.do(t, "GET", "/health", nil)
			if resp.StatusCode != 503 || body != "fail: database\n" {
				t.Errorf("plain /health: %d %q, want 503 \"fail: database\"", resp.StatusCode, body)
			}
			plainID := resp.Header.Get("X-Request-Id")
			code, h, raw := getHealth(t, s.testServer, "/health?verbose=1", "")
			if code != 503 || !slices.Contains(h.Failing, "database") || h.Database.Writable || !strings.Contains(h.Database.Error, tc.error) {
				t.Errorf("verbose /health: %d %s, want 503 failing database with %q", code, raw, tc.error)
			}
			before := len(s.h.calls())
			dresp, text := s.signedDelivery(t, "web", "truth-1", ok)
			if dresp.StatusCode != tc.delivery {
				t.Errorf("delivery: %d %q, want %d", dresp.StatusCode, text, tc.delivery)
			}
			if tc.delivery == 503 {
				for _, call := range s.h.calls()[before:] {
					if k := call[0] + "-" + fakeVerb(call[0], call[1:]); !readOnlyCommands[k] {
						t.Errorf("a refused delivery ran %s:\n%s", k, fakeCallLines(s.h.calls()[before:]))
					}
				}
				if !strings.Contains(s.logs.String(), "is not the one this server opened") {
					t.Errorf("the log does not say why the delivery was refused:\n%s", s.logs)
				}
				return
			}
			// The delivery's claim committed: the newest write no longer failed.
			later()
			if resp, body := s.do(t, "GET", "/health", nil); resp.StatusCode != 200 {
				t.Errorf("plain /health after a write committed: %d %q, want 200", resp.StatusCode, body)
			}
			rows := s.rows(t)
			var meta map[string]any
			json.Unmarshal([]byte(rows[plainID].meta), &meta)
			if rows[plainID].status != 503 || fmt.Sprint(meta["failing"]) != "[database]" {
				t.Errorf("row of the failing /health: %d %s, want 503 failing [database]", rows[plainID].status, rows[plainID].meta)
			}
		})
	}
}

// TestHealthDoesNotQueueForTheWriteLock: verbose /health probes the write lock at most once per
// healthCacheFor; within it, calls are answered from the last check even while this process's
// write lock is taken (before, each call waited for it).
func TestHealthDoesNotQueueForTheWriteLock(t *testing.T) {
	ts := newTestServer(t, nil, nil)
	clock := time.Now()
	ts.srv.now = func() time.Time { return clock }
	if code, _, body := getHealth(t, ts, "/health?verbose=1", ""); code != 200 {
		t.Fatalf("verbose /health: %d %s", code, body)
	}
	ts.events.writing <- struct{}{} // the lock, as a long write of this process would hold it
	defer func() { <-ts.events.writing }()
	for i := range 3 {
		if code, _, body := getHealth(t, ts, "/health?verbose=1", ""); code != 200 {
			t.Errorf("verbose /health #%d with the write lock taken: %d %s, want the last check's 200", i+2, code, body)
		}
	}
}

// TestStaticNonRegularFiles: a FIFO in the web bundle (directly, or through a symlink) is 404
// at once instead of a request that hangs until a writer comes; the row says so, nothing runs.
func TestStaticNonRegularFiles(t *testing.T) {
	dist, _ := distFixture(t)
	for _, p := range []string{"assets/fifo.js", "favicon.ico"} {
		os.Remove(filepath.Join(dist, p))
		if err := syscall.Mkfifo(filepath.Join(dist, p), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("fifo.js", filepath.Join(dist, "assets", "link.js")); err != nil {
		t.Fatal(err)
	}
	s := newAdvServer(t, map[string]string{"WEBHOOK_WEB_DIST": dist})
	t.Cleanup(func() { // before the server's shutdown: frees a handler blocked opening a FIFO
		for _, p := range []string{"assets/fifo.js", "favicon.ico"} {
			if f, err := os.OpenFile(filepath.Join(dist, p), os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
				f.Close()
			}
		}
	})
	client := &http.Client{Timeout: 10 * time.Second} // a hang is a failure, not a stuck test
	var ids []string
	for _, p := range []string{"/assets/fifo.js", "/favicon.ico", "/assets/link.js", "/assets/app.js"} {
		resp, err := client.Get(s.URL + p)
		if err != nil {
			t.Fatalf("GET %s: %v (opening the FIFO blocked?)", p, err)
		}
		resp.Body.Close()
		want := 404
		if p == "/assets/app.js" {
			want = 200 // the regular file beside them
		}
		if resp.StatusCode != want {
			t.Errorf("GET %s: %d, want %d", p, resp.StatusCode, want)
		}
		ids = append(ids, resp.Header.Get("X-Request-Id"))
	}
	if calls := s.h.calls(); len(calls) > 0 {
		t.Errorf("static requests ran commands:\n%s", fakeCallLines(calls))
	}
	rows := s.rows(t)
	for _, id := range ids[:3] {
		if r := rows[id]; r.status != 404 || r.action != "static" {
			t.Errorf("row %s: %d %s, want 404 static", id, r.status, r.action)
		}
	}
}

// TestRegistryHostsAllowMore: WEBHOOK_REGISTRY_HOSTS lets deliveries pull from the hosts it
// names (GitHub Enterprise Server's containers.HOST, say), and from no others.
func TestRegistryHostsAllowMore(t *testing.T) {
	s := newAdvServer(t, map[string]string{"WEBHOOK_REGISTRY_HOSTS": "ghcr.io,containers.ghe.example.com"})
	pkgHost := func(host string) []byte { return githubPackagePayload(host, "octo-org", "web", "v1", "") }
	queued := []string{"systemctl-show", keySystemdRun}
	runAdvCases(t, s, []advCase{
		{name: "an allowed GitHub Enterprise host", body: pkgHost("containers.ghe.example.com"), sig: sigRight, status: 202, reason: "queued",
			calls: queued, argvHas: " containers.ghe.example.com/octo-org/web:v1 "},
		{name: "ghcr.io, still allowed", body: pkgHost("ghcr.io"), sig: sigRight, status: 202, reason: "queued", calls: queued},
		{name: "another host", body: pkgHost("registry.example.com"), sig: sigRight, status: 403, reason: "registry-not-allowed"},
	})
}
