// webhook_bounds_test.go tests what strangers cost in total: refused and unknown requests beyond
// a minute's budget summarised, the free-space reserve, bodies counted as they arrive, scrapes
// that never hold a claim, the connection cap, login throttling, delivery id namespaces and
// redaction wherever a secret appears.
package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fileSizes adds up the sizes of the database and its WAL.
func fileSizes(paths ...string) int64 {
	var n int64
	for _, p := range paths {
		if fi, err := os.Stat(p); err == nil {
			n += fi.Size()
		}
	}
	return n
}

// TestStrangersCostBounded: 10 s of 32 connections sending 404s with 14 KB paths and queries
// grow the database by at most 5 MB, and every request is counted, in its own row or in a
// request-summary row.
func TestStrangersCostBounded(t *testing.T) {
	s := newAdvServer(t, map[string]string{"WEBHOOK_REFUSED_ROWS_PER_MINUTE": "60"})
	db := s.cfg.dbPath
	before := fileSizes(db, db+"-wal")
	long := "/" + strings.Repeat("a/", 7<<10/2) + "x"
	query := "q=" + strings.Repeat("b", 7<<10)
	var sent, answered atomic.Int64
	stop := time.Now().Add(10 * time.Second)
	var wg sync.WaitGroup
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
			for time.Now().Before(stop) {
				sent.Add(1)
				resp, err := client.Get(s.URL + long + "?" + query)
				if err != nil {
					t.Errorf("request: %v", err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode == 404 {
					answered.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	s.shutdown()
	grown := fileSizes(db, db+"-wal") - before
	raw := rawDB(t, db)
	rows := queryInt(t, raw, `SELECT count(*) FROM event_log WHERE status = 404 AND action = 'not-found'`)
	summarised := queryInt(t, raw, `SELECT coalesce(sum(json_extract(meta, '$.count')), 0) FROM event_log WHERE action = 'request-summary'`)
	t.Logf("%d requests in 10 s: %d rows, %d summarised; the database grew by %d bytes", sent.Load(), rows, summarised, grown)
	if answered.Load() != sent.Load() {
		t.Errorf("%d of %d requests answered 404", answered.Load(), sent.Load())
	}
	if grown > 5<<20 {
		t.Errorf("the database grew by %d bytes, want at most 5 MB", grown)
	}
	if int64(rows+summarised) != sent.Load() {
		t.Errorf("%d rows and %d summarised, want every one of %d requests counted", rows, summarised, sent.Load())
	}
	if n := queryInt(t, raw, `SELECT count(*) FROM event_log WHERE action = 'request-summary'
		AND json_extract(meta, '$.statuses."404"') > 0 AND json_extract(meta, '$.routes.unmatched') > 0
		AND json_array_length(meta, '$.samples') BETWEEN 1 AND 3`); n == 0 {
		t.Errorf("no request-summary row with statuses, routes and samples")
	}
}

// TestDiskReserve: below the free-space reserve, request rows stop (they are summarised) and
// /health says so, while a signed delivery is still claimed and answered 202 with its row.
func TestDiskReserve(t *testing.T) {
	s := newAdvServer(t, map[string]string{"WEBHOOK_DISK_RESERVE_MB": "1000000000"}) // more than any disk has
	for range 5 {
		if resp, _ := s.do(t, "GET", "/nope", nil); resp.StatusCode != 404 {
			t.Fatalf("/nope: %d", resp.StatusCode)
		}
	}
	resp, text := s.do(t, "GET", "/health", nil)
	if resp.StatusCode != 503 || !strings.Contains(text, "disk") {
		t.Errorf("/health below the reserve: %d %q, want 503 naming the disk", resp.StatusCode, text)
	}
	body := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
	if resp, text := s.signedDelivery(t, "web", "reserve-1", body); resp.StatusCode != 202 {
		t.Fatalf("signed delivery below the reserve: %d %q", resp.StatusCode, text)
	}
	s.drain(t)
	s.shutdown()
	raw := rawDB(t, s.cfg.dbPath)
	if n := queryInt(t, raw, `SELECT count(*) FROM event_log WHERE action = 'not-found'`); n != 0 {
		t.Errorf("%d rows of 404s below the reserve, want none", n)
	}
	if n := queryInt(t, raw, `SELECT coalesce(sum(json_extract(meta, '$.statuses."404"')), 0) FROM event_log WHERE action = 'request-summary'`); n != 5 {
		t.Errorf("summaries count %d 404s, want 5", n)
	}
	if n := queryInt(t, raw, `SELECT count(*) FROM event_log WHERE status = 202 AND action = 'github-webhook' AND json_extract(meta, '$.delivery') = 'reserve-1'`); n != 1 {
		t.Errorf("%d rows of the claimed delivery, want 1", n)
	}
}

// TestRequestRowsCap: prune-state keeps the newest WEBHOOK_REQUEST_ROWS_MAX request rows, and
// every row of what ran on the operator's behalf.
func TestRequestRowsCap(t *testing.T) {
	env := map[string]string{"WEBHOOK_STATE_DIR": t.TempDir(), "WEBHOOK_REQUEST_ROWS_MAX": "10"}
	cfg := testConfig(t, env)
	seedRetention(t, cfg.dbPath) // 1500 old and 3 new request rows, 3 kept rows
	if code, _, stderr := runCLI(t, env, "prune-state"); code != 0 {
		t.Fatalf("prune-state: %d\n%s", code, stderr)
	}
	raw := rawDB(t, cfg.dbPath)
	if n := queryInt(t, raw, `SELECT count(*) FROM event_log WHERE method = 'GET'`); n != 3 {
		t.Errorf("%d new request rows, want 3", n)
	}
	events, err := openEventLog(cfg.dbPath, newLogger(io.Discard))
	if err != nil {
		t.Fatal(err)
	}
	var evs []event
	for i := range 50 {
		evs = append(evs, event{RequestID: fmt.Sprint("cap-", i), TS: time.Now(), Method: "GET", Status: 404, Action: "not-found"})
	}
	if err := events.Write(context.Background(), evs...); err != nil {
		t.Fatal(err)
	}
	events.Close()
	if code, _, stderr := runCLI(t, env, "prune-state"); code != 0 || !strings.Contains(stderr, "WEBHOOK_REQUEST_ROWS_MAX") {
		t.Fatalf("prune-state: %d\n%s", code, stderr)
	}
	if n := queryInt(t, raw, `SELECT count(*) FROM event_log WHERE method NOT IN ('CLI', 'SCHEDULER', 'TASK')`); n != 10 {
		t.Errorf("%d request rows after pruning, want 10", n)
	}
	if n := queryInt(t, raw, `SELECT count(*) FROM event_log WHERE request_id IN ('cap-49', 'cap-40')`); n != 2 {
		t.Errorf("the newest request rows were pruned")
	}
	if n := queryInt(t, raw, `SELECT count(*) FROM event_log WHERE action = 'kept'`); n != 3 {
		t.Errorf("%d rows of tasks, triggers and ticks, want the 3 seeded", n)
	}
}

// holdBodies opens n connections that each announce a body of size and send only the first
// kilobyte of it; they are closed when the test ends.
func holdBodies(t *testing.T, addr, target string, n, size int) {
	for range n {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: test\r\nX-GitHub-Event: package\r\nContent-Length: %d\r\n\r\n%s", target, size, strings.Repeat("x", 1024))
	}
}

// TestBodyBudgetNotHeldByAnnouncements: with 50 unauthenticated clients holding open declared
// 5 MiB bodies, 20 signed deliveries all answer 202: the budget counts bytes that arrived.
func TestBodyBudgetNotHeldByAnnouncements(t *testing.T) {
	s := newAdvServer(t, map[string]string{"WEBHOOK_MAX_BODY_BYTES": strconv.Itoa(5 << 20)})
	holdBodies(t, s.Listener.Addr().String(), advUnitPath, 50, 5<<20)
	waitFor(t, "the 50 bodies' first kilobytes to be read", func() bool {
		s.srv.bodies.mu.Lock()
		defer s.srv.bodies.mu.Unlock()
		return s.srv.bodies.free == s.srv.bodies.total-50*1024
	})
	body := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, text, err := s.postDelivery("web", fmt.Sprint("held-", i), body)
			if err != nil || resp.StatusCode != 202 {
				t.Errorf("delivery %d while 50 bodies are held: %v %v %q", i, resp, err, text)
			}
		}()
	}
	wg.Wait()
}

// TestScrapesNeverFailAClaim: 64 connections scraping /metrics over 30,000 task rows, and 25
// signed deliveries all answer 202, none of them waiting for a connection a scrape holds.
func TestScrapesNeverFailAClaim(t *testing.T) {
	s := newAdvServer(t, nil)
	var evs []event
	for i := range 30000 {
		step := []string{"pulled", "restarted", "completed"}[i%3]
		evs = append(evs, event{RequestID: fmt.Sprint("seed-", i), TS: time.Now(), Method: "TASK", Status: 200, Action: "github-task",
			Meta: map[string]any{"step": step, "delivery": fmt.Sprint("seed-", i/3), "pull_ms": i % 5000, "restart_ms": i % 700}})
	}
	if err := s.events.Write(context.Background(), evs...); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var scrapes atomic.Int64
	var wg sync.WaitGroup
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
			for {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := client.Get(s.URL + "/metrics")
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					scrapes.Add(1)
				}
			}
		}()
	}
	waitFor(t, "the scrapes to begin", func() bool { return scrapes.Load() >= 64 })
	waited := s.events.db.Stats().WaitCount
	body := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
	for i := range 25 {
		resp, text, err := s.postDelivery("web", fmt.Sprint("scraped-", i), body)
		if err != nil || resp.StatusCode != 202 {
			t.Errorf("delivery %d during the scrapes: %v %v %q", i, resp, err, text)
		}
	}
	// A claim waits for nobody's reading: the writer's connections were never all taken.
	if n := s.events.db.Stats().WaitCount - waited; n > 0 {
		t.Errorf("%d waits for one of the writer's connections during the scrapes, want none", n)
	}
	close(stop)
	wg.Wait()
	t.Logf("%d scrapes", scrapes.Load())
}

// TestConnectionCap: past WEBHOOK_MAX_CONNECTIONS idle connections, the server holds no more
// than the cap, and /health on a new connection is still answered.
func TestConnectionCap(t *testing.T) {
	s := newAdvServer(t, map[string]string{"WEBHOOK_MAX_CONNECTIONS": "32"})
	hs := newHTTPServer(s.cfg, s.srv, s.srv.log)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go hs.Serve(&capListener{Listener: l, c: s.srv.conns})
	t.Cleanup(func() { hs.Close() })
	base := openFDs(t)
	var idle []net.Conn
	for range 200 {
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		idle = append(idle, c)
	}
	// Each client connection is one descriptor here; the server's are the rest.
	waitFor(t, "the server to hold at most 32 connections", func() bool { return openFDs(t)-base-len(idle) <= 32 })
	time.Sleep(1100 * time.Millisecond) // the idle connections are now old enough to give way
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(hangGuard))
	fmt.Fprint(c, "GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("/health on a new connection past the cap: %v %v", resp, err)
	}
	if n := s.srv.conns.count(); n > 32 {
		t.Errorf("%d connections tracked, want at most 32", n)
	}
}

// TestLoginThrottled: after five wrong tokens a client is answered 429 with a Retry-After that
// grows, even with the right token, until it has waited; the rows say login-throttled.
func TestLoginThrottled(t *testing.T) {
	s := newAdvServer(t, nil)
	now := time.Now()
	s.srv.now = func() time.Time { return now }
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	login := func(token string) *http.Response {
		t.Helper()
		resp, err := noRedirect.PostForm(s.URL+"/status/login", url.Values{"token": {token}})
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}
	for i := range 5 {
		if resp := login("guess"); resp.StatusCode != 403 {
			t.Fatalf("wrong token %d: %d, want 403", i, resp.StatusCode)
		}
	}
	var waits []int
	for range 3 {
		resp := login(advManualToken)
		wait, _ := strconv.Atoi(resp.Header.Get("Retry-After"))
		if resp.StatusCode != 429 || wait <= 0 {
			t.Fatalf("after 5 failures: %d Retry-After %q, want 429 with Retry-After", resp.StatusCode, resp.Header.Get("Retry-After"))
		}
		now = now.Add(time.Duration(wait) * time.Second)
		if resp := login("guess"); resp.StatusCode != 403 {
			t.Fatalf("a guess after waiting %d s: %d, want 403", wait, resp.StatusCode)
		}
		waits = append(waits, wait)
	}
	if !(waits[0] < waits[1] && waits[1] < waits[2]) {
		t.Errorf("Retry-After %v, want it growing", waits)
	}
	now = now.Add(time.Duration(waits[2]*2) * time.Second)
	if resp := login(advManualToken); resp.StatusCode != 303 {
		t.Errorf("the right token after waiting: %d, want 303", resp.StatusCode)
	}
	s.shutdown()
	if n := queryInt(t, rawDB(t, s.cfg.dbPath), `SELECT count(*) FROM event_log WHERE status = 429 AND json_extract(meta, '$.reason') = 'login-throttled'`); n != 3 {
		t.Errorf("%d login-throttled rows, want 3", n)
	}
}

// TestDeliveryIDNamespaces: a signed GitHub delivery cannot claim an id in a registry source's
// namespace, so the registry's push with that id still runs.
func TestDeliveryIDNamespaces(t *testing.T) {
	s := newAdvServer(t, nil)
	body := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
	for _, id := range []string{"dist-next", "gitea-7", "harbor-0123", "hub-x", "quay-y", "dockerhub-z"} {
		if resp, text := s.signedDelivery(t, "web", id, body); resp.StatusCode != 400 {
			t.Errorf("GitHub delivery with id %s: %d %q, want 400", id, resp.StatusCode, text)
		}
	}
	if resp, text := s.signedDelivery(t, "web", "72d3162e-cc78-11e3-81ab-4c9367dc0958", body); resp.StatusCode != 202 {
		t.Errorf("GitHub delivery with a GUID: %d %q, want 202", resp.StatusCode, text)
	}
	if n := queryInt(t, rawDB(t, s.cfg.dbPath), `SELECT count(*) FROM github_deliveries`); n != 1 {
		t.Errorf("%d claims, want only the GUID's", n)
	}
}

// FuzzRedaction: a configured secret never reaches a stored row, wherever it is put in the path
// (any case or prefix of a route), the query (as it is, query- or path-escaped) or a header's
// value; a token after /registry/<source>/<unit>/ never does, whatever the case or prefix.
func FuzzRedaction(f *testing.F) {
	for _, seed := range []struct{ prefix, route, query string }{
		{"", "/registry/quay/web/", "token="}, {"/x", "/REGISTRY/quay/web/", "a="}, {"", "/Registry//dockerhub/web/", "Token="},
		{"/api", "/registry/harbor/web/x/", "q=1&"}, {"", "/registryx/a/b/", ""}, {"", "/github-package-update/", "%74oken="},
	} {
		f.Add(seed.prefix, seed.route, seed.query, uint8(0))
		f.Add(seed.prefix, seed.route, seed.query, uint8(3))
	}
	const secret = "Zq9+s/ec&ret=v%41"
	cfg := testConfig(f, map[string]string{"WEBHOOK_REGISTRY_TOKEN_QUAY": secret, "WEBHOOK_MANUAL_TOKEN": "manual-tok-123"})
	s := newServer(cfg, newLogger(io.Discard), nil)
	f.Fuzz(func(t *testing.T, prefix, route, query string, how uint8) {
		for _, sec := range []string{secret, "manual-tok-123"} {
			inQuery := sec
			switch how % 3 {
			case 1:
				inQuery = url.QueryEscape(sec)
			case 2:
				inQuery = url.PathEscape(sec)
			}
			r := &http.Request{Method: "GET", URL: &url.URL{Path: prefix + route + sec, RawQuery: query + inQuery}, Header: http.Header{}}
			ri := &requestInfo{id: "x", meta: map[string]any{"event": "e" + sec, "tags": []string{sec}}}
			ev := s.requestEvent(r, ri, 404, 0)
			if stored := ev.Path + ev.metaJSON(); strings.Contains(stored, sec) {
				t.Fatalf("secret %q stored: %s", sec, stored)
			}
		}
		unconfigured := "tok" + strconv.Itoa(int(how))
		p := prefix + route + unconfigured
		if segs := strings.FieldsFunc(route, func(c rune) bool { return c == '/' }); len(segs) == 3 && strings.HasSuffix(route, "/") && strings.Contains(strings.ToLower(segs[0]), "registry") &&
			!strings.Contains(prefix+route, unconfigured) && strings.Contains(redactPath(p), unconfigured) {
			t.Fatalf("redactPath(%q) = %q keeps the token", p, redactPath(p))
		}
	})
}
