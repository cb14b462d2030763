// webhook_test.go tests webhook.go's HTTP surface through a real client against httptest servers:
// routes, static files (traversal attempts written as raw request lines, non-regular files), the
// body cap and budget, ambiguous framing, one bounded event row per request, refused payloads, the
// push routes' image matching, signature verification and strict decoding (fuzzed), the server's
// start and its refusals, and the built binary's graceful shutdown on SIGTERM. Its other aspects
// are webhook_adversarial, webhook_queue, webhook_e2e, webhook_health and webhook_bench_test.go.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

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

func TestServerCannotStart(t *testing.T) {
	dir, file := dirWithFile(t)
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

// startServerMode starts the built server on a free loopback port, either listening itself
// ("listen") or handed the socket as systemd's socket activation does ("socket-activated").
func startServerMode(t *testing.T, bin, mode, state string) (p *serverProc, addr string) {
	t.Helper()
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
	return p, addr
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
			p, addr := startServerMode(t, bin, mode, state)
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

			// A keep-alive connection, idle when the signal comes, whose next request arrives
			// during the shutdown: it is answered, with Connection: close, not dropped.
			idle := dial()
			defer idle.Close()
			idleR := bufio.NewReader(idle)
			fmt.Fprint(idle, "GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
			if resp, err := http.ReadResponse(idleR, nil); err != nil || resp.StatusCode != 200 || resp.Close {
				t.Fatalf("/health on a keep-alive connection: %v %v", resp, err)
			} else {
				io.Copy(io.Discard, resp.Body)
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
			fmt.Fprint(idle, "GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
			if resp, err := http.ReadResponse(idleR, nil); err != nil || resp.StatusCode != 200 || !resp.Close {
				t.Fatalf("a request on a connection idle at SIGTERM: %v %v, want 200 with Connection: close\nstderr:\n%s", resp, err, p.stderr())
			} else {
				io.Copy(io.Discard, resp.Body)
				ok++
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

// Proof suites (issue 7): fuzzing of the request path's parsers, an adversarial table against
// the running server (webhook_adversarial_test.go), faults, load and benchmarks. Fake podman,
// systemctl and systemd-run are main_test.go's (newFakeHostWithRun): every program the server
// runs is recorded, and PATH holds nothing real.

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

// TestAmbiguousFraming: a request with both Content-Length and Transfer-Encoding is served by its
// Transfer-Encoding, as net/http reads it, and its connection closed (RFC 9112 §6.1's MUST), so a
// request smuggled after the body a Content-Length would frame is never served; the same holds
// for one pipelined after an honest request, and for a request with only a Transfer-Encoding.
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
			[]int{202}, "github-webhook", []string{"systemctl-show", "systemctl-show", keySystemdRun}},
		{"both, Transfer-Encoding first", delivery("frame-2", "Transfer-Encoding: chunked\r\nContent-Length: "+strconv.Itoa(len(chunk))+"\r\n") + chunk + smuggled,
			[]int{202}, "github-webhook", []string{"systemctl-show", "systemctl-show", keySystemdRun}},
		{"both, in other cases", delivery("frame-3", "content-length: 5\r\nTRANSFER-ENCODING: chunked\r\n") + chunk + smuggled,
			[]int{202}, "github-webhook", []string{"systemctl-show", "systemctl-show", keySystemdRun}},
		{"both, after an honest request on the connection", "GET /health HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\n{}" +
			delivery("frame-4", "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n") + chunk + smuggled,
			[]int{200, 202}, "github-webhook", []string{"systemctl-show", "systemctl-show", keySystemdRun}},
		{"chunked only: served, then closed", delivery("frame-5", "Transfer-Encoding: chunked\r\n") + chunk + smuggled,
			[]int{202}, "github-webhook", []string{"systemctl-show", "systemctl-show", keySystemdRun}},
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
	s := newAdvServer(t, map[string]string{"WEBHOOK_BODY_BUDGET_BYTES": strconv.Itoa(advMaxBody - 1)})
	// A client that sent a body of the whole budget, and not its last byte, holds the budget.
	c, err := net.Dial("tcp", s.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: test\r\nX-GitHub-Event: package\r\nContent-Length: %d\r\n\r\n%s", advUnitPath, advMaxBody,
		strings.Repeat("x", advMaxBody-1))
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
		{"signed delivery", "POST", advUnitPath, [][2]string{{"X-GitHub-Event", "package"}, {"X-GitHub-Delivery", "budget-0"}, sig}, ok, 503, "github-webhook"},
		{"unsigned body", "POST", advUnitPath, [][2]string{{"X-GitHub-Event", "package"}}, ok, 503, "github-webhook"},
		{"manual API body", "POST", "/api/manual/trigger", [][2]string{{"Authorization", "Bearer " + advManualToken}}, []byte(`{"units":["a"]}`), 503, "manual-trigger"},
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
	s.srv.bodies.take(context.Background(), advMaxBody)
	resp, _, err := rawExchange(s.Listener.Addr().String(), "POST", advUnitPath,
		[][2]string{{"X-GitHub-Event", "package"}, {"X-GitHub-Delivery", "budget-1"}, {"X-Hub-Signature-256", hubSignature(advSecret, ok)}}, ok, false)
	if err != nil || resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("with the budget taken: %v %v, want 503 with Retry-After", resp, err)
	}
	s.srv.bodies.give(advMaxBody)
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
	queued := []string{"systemctl-show", "systemctl-show", keySystemdRun} // the request's unit lookup, the dispatcher's policy
	runAdvCases(t, s, []advCase{
		{name: "an allowed GitHub Enterprise host", body: pkgHost("containers.ghe.example.com"), sig: sigRight, status: 202, reason: "queued",
			calls: queued, argvHas: " containers.ghe.example.com/octo-org/web:v1 "},
		{name: "ghcr.io, still allowed", body: pkgHost("ghcr.io"), sig: sigRight, status: 202, reason: "queued", calls: queued},
		{name: "another host", body: pkgHost("registry.example.com"), sig: sigRight, status: 403, reason: "registry-not-allowed"},
	})
}
