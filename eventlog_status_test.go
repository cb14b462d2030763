// eventlog_status_test.go tests the built-in status page (eventlog.go's last section): its session
// cookie and next parameter, access control, content, a real Chromium rendering it through the
// DevTools protocol (no script runs, the CSP holds), its benchmark, and that its queries use
// indexes.
package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"database/sql"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"image/png"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Tests of the status page: its session, who may see it, what it shows and how it escapes it,
// a real browser driving it, and the time to render the overview over a large log.

// statusToken is the manual token of the status page tests.
const statusToken = "status-page-token-9c1e"

// scriptText is attacker-influenced text stored in the log: if a page ran it, the title changed.
const scriptText = `<script>document.title='pwned'</script>`

// seedStatusRows writes a log with the kinds of story the page tells, relative to now: a unit
// whose last redeploy failed (its error text holds scriptText), one rolled back, one restarted
// healthy after a covered delivery, one whose task is running, one whose dispatch failed, one
// only ever refused (its unit name holds scriptText), redeploys on earlier days for the chart,
// and two pending claims.
func seedStatusRows(t testing.TB, l *eventLog, now time.Time) {
	t.Helper()
	req := func(ts time.Time, delivery, unit, image, reason string, status int, extra map[string]any) event {
		meta := map[string]any{"delivery": delivery, "unit": unit, "image": image, "reason": reason, "event": "package"}
		for k, v := range extra {
			meta[k] = v
		}
		return event{RequestID: "req-" + delivery, TS: ts, Method: "POST", Path: "/github-package-update/" + strings.TrimSuffix(unit, ".service"),
			Status: status, Action: "github-webhook", Duration: 30 * time.Millisecond, Meta: meta}
	}
	task := func(ts time.Time, delivery, unit, image, step string, status int, extra map[string]any) event {
		meta := map[string]any{"delivery": delivery, "unit": unit, "image": image, "event": "package", "step": step}
		for k, v := range extra {
			meta[k] = v
		}
		return event{RequestID: "task-" + delivery, TS: ts, Method: "TASK", Path: "/github-package-update/" + strings.TrimSuffix(unit, ".service"),
			Status: status, Action: "github-task", Duration: 2 * time.Second, Meta: meta}
	}
	dispatch := func(ts time.Time, delivery, unit, image, reason string, status int, extra map[string]any) event {
		meta := map[string]any{"delivery": delivery, "unit": unit, "image": image, "event": "package", "reason": reason,
			"attempt": 1, "task_unit": "webhook-task-" + delivery + ".service"}
		for k, v := range extra {
			meta[k] = v
		}
		return event{RequestID: "dispatch-" + delivery, TS: ts, Method: "QUEUE", Path: "/github-package-update/" + strings.TrimSuffix(unit, ".service"),
			Status: status, Action: "github-dispatch", Meta: meta}
	}
	redeploy := func(ts time.Time, delivery, unit, image string, last ...event) []event {
		evs := []event{req(ts, delivery, unit, image, "queued", 202, nil), dispatch(ts, delivery, unit, image, "dispatching", 202, nil),
			task(ts.Add(time.Second), delivery, unit, image, "started", 202, nil)}
		return append(evs, last...)
	}
	const web, api, demo, cache, batch = "ghcr.io/acme/web:stable", "ghcr.io/acme/api:v2", "ghcr.io/acme/demo:latest",
		"ghcr.io/acme/cache:7", "ghcr.io/acme/batch:1"
	var evs []event
	// Earlier days, for the chart: one healthy redeploy of demo every day for 20 days, a rollback
	// every fifth day and a failure every seventh.
	for d := 20; d >= 1; d-- {
		at := now.AddDate(0, 0, -d)
		id := fmt.Sprintf("hist-%02d", d)
		evs = append(evs, redeploy(at, id, "demo.service", demo, task(at.Add(20*time.Second), id, "demo.service", demo, "completed", 200, nil))...)
		if d%5 == 0 {
			evs = append(evs, redeploy(at.Add(time.Hour), id+"-r", "api.service", api,
				task(at.Add(time.Hour+time.Minute), id+"-r", "api.service", api, "rolled-back", 500, map[string]any{"error": "health gate: unit failed"}))...)
		}
		if d%7 == 0 {
			evs = append(evs, redeploy(at.Add(2*time.Hour), id+"-f", "web.service", web,
				task(at.Add(2*time.Hour+time.Minute), id+"-f", "web.service", web, "pull-failed", 502, map[string]any{"error": "pull failed"}))...)
		}
	}
	evs = append(evs, redeploy(now.Add(-3*time.Hour), "d-api", "api.service", api,
		task(now.Add(-3*time.Hour+5*time.Second), "d-api", "api.service", api, "restarted", 200, map[string]any{"restart_ms": 700}),
		task(now.Add(-3*time.Hour+30*time.Second), "d-api", "api.service", api, "rolled-back", 500,
			map[string]any{"error": "health gate: the unit restarted 3 times", "image_id": "aaaa"}))...)
	evs = append(evs, redeploy(now.Add(-2*time.Hour), "d-demo-1", "demo.service", demo)...)
	evs = append(evs, req(now.Add(-2*time.Hour+time.Second), "d-demo-2", "demo.service", demo, "queued", 202, nil),
		dispatch(now.Add(-2*time.Hour+time.Second), "d-demo-2", "demo.service", demo, "dispatching", 202,
			map[string]any{"covered_by": "d-demo-1", "task_unit": "webhook-task-d-demo-1.service"}))
	evs = append(evs,
		task(now.Add(-2*time.Hour+4*time.Second), "d-demo-1", "demo.service", demo, "pulled", 200, map[string]any{"pull_ms": 1500, "image_id": "bbbb"}),
		task(now.Add(-2*time.Hour+6*time.Second), "d-demo-1", "demo.service", demo, "restarted", 200, map[string]any{"restart_ms": 800}),
		task(now.Add(-2*time.Hour+26*time.Second), "d-demo-1", "demo.service", demo, "healthy", 200, map[string]any{"pulled_digest": "sha256:d1g35t"}),
		task(now.Add(-2*time.Hour+26*time.Second), "d-demo-1", "demo.service", demo, "completed", 200, map[string]any{"image_id": "bbbb"}))
	evs = append(evs, redeploy(now.Add(-time.Hour), "d-web", "web.service", web,
		task(now.Add(-time.Hour+9*time.Second), "d-web", "web.service", web, "pull-failed", 502, map[string]any{
			"attempts": 3, "exit_code": 125, "error": "podman pull failed: manifest unknown " + scriptText, "stderr": "Error: " + scriptText}))...)
	evs = append(evs, redeploy(now.Add(-time.Minute), "d-cache", "cache.service", cache)...)
	// A delivery whose systemd-run kept failing: its redeploy never ran.
	evs = append(evs, req(now.Add(-40*time.Minute), "d-lost", "batch.service", batch, "queued", 202, nil),
		dispatch(now.Add(-40*time.Minute), "d-lost", "batch.service", batch, "dispatch-retry", 503, map[string]any{"error": "systemd-run: exit 1"}),
		dispatch(now.Add(-35*time.Minute), "d-lost", "batch.service", batch, "dispatch-failed", 500, map[string]any{"error": "systemd-run: exit 1, gave up"}))
	evs = append(evs, req(now.Add(-30*time.Minute), "d-evil", "x"+scriptText+".service", "ghcr.io/acme/"+scriptText, "tag-mismatch", 202, nil))
	evs = append(evs, event{RequestID: "req-health", TS: now, Method: "GET", Path: "/health", Status: 200, Action: "health", Meta: map[string]any{}})
	if err := l.Write(context.Background(), evs...); err != nil {
		t.Fatalf("seed the event log: %v", err)
	}
	// The claims of those stories, oldest first as the queue writes them.
	type seed struct {
		id, unit, image  string
		status, step     string
		coveredBy, error string
		at, end          time.Time
	}
	var claims []seed
	for d := 20; d >= 1; d-- {
		at := now.AddDate(0, 0, -d)
		id := fmt.Sprintf("hist-%02d", d)
		claims = append(claims, seed{id, "demo.service", demo, "done", "completed", id, "", at, at.Add(20 * time.Second)})
		if d%5 == 0 {
			claims = append(claims, seed{id + "-r", "api.service", api, "done", "rolled-back", id + "-r", "health gate: unit failed", at.Add(time.Hour), at.Add(time.Hour + time.Minute)})
		}
		if d%7 == 0 {
			claims = append(claims, seed{id + "-f", "web.service", web, "done", "pull-failed", id + "-f", "pull failed", at.Add(2 * time.Hour), at.Add(2*time.Hour + time.Minute)})
		}
	}
	claims = append(claims,
		seed{"d-api", "api.service", api, "done", "rolled-back", "d-api", "health gate: the unit restarted 3 times", now.Add(-3 * time.Hour), now.Add(-3*time.Hour + 30*time.Second)},
		seed{"d-demo-1", "demo.service", demo, "done", "completed", "d-demo-1", "", now.Add(-2 * time.Hour), now.Add(-2*time.Hour + 26*time.Second)},
		seed{"d-demo-2", "demo.service", demo, "done", "completed", "d-demo-1", "", now.Add(-2*time.Hour + time.Second), now.Add(-2*time.Hour + 26*time.Second)},
		seed{"d-web", "web.service", web, "done", "pull-failed", "d-web", "podman pull failed: manifest unknown " + scriptText, now.Add(-time.Hour), now.Add(-time.Hour + 9*time.Second)},
		seed{"d-lost", "batch.service", batch, "failed", "", "d-lost", "systemd-run: exit 1, gave up", now.Add(-40 * time.Minute), now.Add(-35 * time.Minute)},
		seed{"p-1", "cache.service", cache, "pending", "", "", "", now.Add(-90 * time.Second), now.Add(-90 * time.Second)},
		seed{"p-2", "cache.service", cache, "pending", "", "", "", now.Add(-89 * time.Second), now.Add(-89 * time.Second)},
		seed{"d-cache", "cache.service", cache, "dispatched", "started", "d-cache", "", now.Add(-time.Minute), now.Add(-time.Minute + time.Second)})
	for _, c := range claims {
		var taskUnit, coveredBy, errText any
		if c.coveredBy != "" {
			taskUnit, coveredBy = taskUnitName(c.coveredBy), c.coveredBy
		}
		if c.error != "" {
			errText = c.error
		}
		if _, err := l.db.Exec(`INSERT INTO github_deliveries (delivery_id, unit, image, event, request_id, status, received_at,
			updated_at, claimed_at, step, covered_by, task_unit, error) VALUES (?, ?, ?, 'package', ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
			c.id, c.unit, c.image, "req-"+c.id, c.status, c.at.Unix(), c.end.Unix(), c.at.UnixMilli(), c.step, coveredBy, taskUnit, errText); err != nil {
			t.Fatalf("seed github_deliveries: %v", err)
		}
	}
}

func TestStatusSession(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	valid := statusSession(statusToken, now.Add(time.Hour))
	exp, sig, _ := strings.Cut(valid, ".")
	for _, tc := range []struct {
		name, token, value string
		want               bool
	}{
		{"valid", statusToken, valid, true},
		{"expired", statusToken, statusSession(statusToken, now.Add(-time.Second)), false},
		{"expires now", statusToken, statusSession(statusToken, now), false},
		{"lasts longer than a login gives", statusToken, statusSession(statusToken, now.Add(statusSessionTTL+time.Minute)), false},
		{"the token was rotated", "another token", valid, false},
		{"no token configured", "", valid, false},
		{"expiry moved", statusToken, exp + "1." + sig, false},
		{"signature changed", statusToken, exp + "." + strings.Repeat("A", len(sig)), false},
		{"no signature", statusToken, exp, false},
		{"empty", statusToken, "", false},
		{"the token itself", statusToken, statusToken, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := validStatusSession(tc.token, tc.value, now); got != tc.want {
				t.Errorf("validStatusSession(%q) = %v, want %v", tc.value, got, tc.want)
			}
		})
	}
}

func TestStatusNext(t *testing.T) {
	for in, want := range map[string]string{
		"/status/deliveries?unit=web": "/status/deliveries?unit=web",
		"/":                           "/",
		"":                            "/status/",
		"//evil.example/":             "/status/",
		"/\\evil.example":             "/status/",
		"https://evil.example/":       "/status/",
		"status/":                     "/status/",
		"/x\r\nSet-Cookie: a=b":       "/status/",
	} {
		if got := statusNext(in); got != want {
			t.Errorf("statusNext(%q) = %q, want %q", in, got, want)
		}
	}
}

// statusClient sends requests to a test server without following redirects, sending cookie
// (if set) as the browser would.
func statusGet(t *testing.T, ts *testServer, target, cookie string, hdr ...string) (*http.Response, string) {
	t.Helper()
	return statusDo(t, ts, "GET", target, cookie, nil, hdr...)
}

func statusDo(t *testing.T, ts *testServer, method, target, cookie string, form url.Values, hdr ...string) (*http.Response, string) {
	t.Helper()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, err := http.NewRequest(method, ts.URL+target, body)
	if err != nil {
		t.Fatal(err)
	}
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	if cookie != "" {
		req.AddCookie(&http.Cookie{Name: statusCookie, Value: cookie})
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	c := *ts.Client()
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, target, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(b)
}

// statusLogin logs in through the form and returns the session cookie's value.
func statusLogin(t *testing.T, ts *testServer) string {
	t.Helper()
	resp, body := statusDo(t, ts, "POST", "/status/login", "", url.Values{"token": {statusToken}, "next": {"/status/"}})
	for _, c := range resp.Cookies() {
		if c.Name == statusCookie && c.Value != "" {
			return c.Value
		}
	}
	t.Fatalf("login answered %d without a session cookie:\n%s", resp.StatusCode, body)
	return ""
}

// TestStatusPageAccess checks who sees what: nothing but how to set a token without one, the
// login form without a session, the page with one; the cookie's attributes; and that the token
// never comes back in an answer, a log line or a row.
func TestStatusPageAccess(t *testing.T) {
	now := time.Now()
	t.Run("no token configured", func(t *testing.T) {
		ts := newTestServer(t, nil, nil)
		seedStatusRows(t, ts.events, now)
		for _, target := range []string{"/", "/status/", "/status/deliveries", "/status/deliveries/d-web"} {
			resp, body := statusGet(t, ts, target, "")
			if resp.StatusCode != 403 || !strings.Contains(body, "WEBHOOK_MANUAL_TOKEN") || strings.Contains(body, "web.service") ||
				strings.Contains(body, "<form") {
				t.Errorf("GET %s = %d, want 403 saying how to set WEBHOOK_MANUAL_TOKEN and nothing else:\n%s", target, resp.StatusCode, body)
			}
		}
		resp, body := statusDo(t, ts, "POST", "/status/login", "", url.Values{"token": {""}})
		if resp.StatusCode != 403 || len(resp.Cookies()) != 0 {
			t.Errorf("login without a configured token = %d %v, want 403 and no cookie:\n%s", resp.StatusCode, resp.Cookies(), body)
		}
	})

	// The subtests below share one server; every answer they get goes into bodies, which the last
	// one searches for the token.
	ts := newTestServer(t, map[string]string{"WEBHOOK_MANUAL_TOKEN": statusToken}, nil)
	seedStatusRows(t, ts.events, now)
	var bodies []string
	t.Run("without a session", func(t *testing.T) {
		for _, target := range []string{"/", "/status/", "/status/deliveries?unit=web", "/status/deliveries/d-web"} {
			resp, body := statusGet(t, ts, target, "")
			bodies = append(bodies, body)
			if resp.StatusCode != 200 || !strings.Contains(body, `action="/status/login"`) || strings.Contains(body, "web.service") {
				t.Errorf("GET %s without a session = %d, want the login form and no data:\n%s", target, resp.StatusCode, body)
			}
			if want := `name="next" value="` + target + `"`; !strings.Contains(body, want) {
				t.Errorf("GET %s: the login form does not return there (want %s)", target, want)
			}
		}
	})
	for _, tc := range []struct {
		name   string
		target string
		form   url.Values
		hdr    []string
	}{
		{"wrong token", "/status/login", url.Values{"token": {statusToken + "x"}}, nil},
		{"empty token", "/status/login", url.Values{"token": {""}}, nil},
		{"token in the URL only", "/status/login?token=" + statusToken, url.Values{}, nil},
		{"cookie forged under another token", "/status/", nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			method, cookie := "POST", ""
			if tc.form == nil {
				method, cookie = "GET", statusSession("old token", now.Add(time.Hour))
			}
			resp, body := statusDo(t, ts, method, tc.target, cookie, tc.form, tc.hdr...)
			bodies = append(bodies, body)
			if len(resp.Cookies()) != 0 || strings.Contains(body, "web.service") || !strings.Contains(body, `action="/status/login"`) {
				t.Errorf("%s %s = %d with cookies %v, want the login form again and no session:\n%s", method, tc.target, resp.StatusCode, resp.Cookies(), body)
			}
		})
	}

	for _, tc := range []struct {
		name   string
		hdr    []string
		secure bool
	}{
		{"plain http", nil, false},
		{"behind a TLS proxy", []string{"X-Forwarded-Proto", "https"}, true},
	} {
		t.Run("login over "+tc.name, func(t *testing.T) {
			resp, body := statusDo(t, ts, "POST", "/status/login", "", url.Values{"token": {statusToken}, "next": {"/status/deliveries"}}, tc.hdr...)
			bodies = append(bodies, body)
			if resp.StatusCode != 303 || resp.Header.Get("Location") != "/status/deliveries" {
				t.Errorf("login = %d to %q, want 303 to /status/deliveries", resp.StatusCode, resp.Header.Get("Location"))
			}
			set := resp.Header.Get("Set-Cookie")
			for _, attr := range []string{statusCookie + "=", "HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"} {
				if !strings.Contains(set, attr) {
					t.Errorf("Set-Cookie: %s lacks %s", set, attr)
				}
			}
			if strings.Contains(set, "Secure") != tc.secure {
				t.Errorf("Set-Cookie: %s, want Secure %v", set, tc.secure)
			}
		})
	}

	t.Run("with a session, then logout", func(t *testing.T) {
		cookie := statusLogin(t, ts)
		for _, target := range []string{"/", "/status/", "/status/deliveries", "/status/deliveries/d-web"} {
			resp, body := statusGet(t, ts, target, cookie)
			bodies = append(bodies, body)
			if resp.StatusCode != 200 || !strings.Contains(body, "web.service") {
				t.Errorf("GET %s with a session = %d, want the page:\n%s", target, resp.StatusCode, body)
			}
		}
		resp, _ := statusDo(t, ts, "POST", "/status/logout", cookie, url.Values{})
		if set := resp.Header.Get("Set-Cookie"); resp.StatusCode != 303 || !strings.Contains(set, statusCookie+"=;") || !strings.Contains(set, "Max-Age=0") {
			t.Errorf("logout = %d, Set-Cookie: %q, want 303 clearing the cookie", resp.StatusCode, set)
		}
	})

	t.Run("the token never comes back", func(t *testing.T) {
		ts.shutdown()
		var rows []string
		scanRows(t, rawDB(t, ts.cfg.dbPath), false, `SELECT action || ' ' || coalesce(path, '') || ' ' || meta FROM event_log`, nil,
			func(r *sql.Rows) error {
				var s string
				r.Scan(&s) // a row it cannot read is searched as ""
				rows = append(rows, s)
				return nil
			})
		for name, text := range map[string]string{"an answer": strings.Join(bodies, "\n"), "the log": ts.logs.String(), "a row": strings.Join(rows, "\n")} {
			if strings.Contains(text, statusToken) {
				t.Errorf("the token appears in %s", name)
			}
		}
		if !slices.ContainsFunc(rows, func(s string) bool {
			return strings.HasPrefix(s, "status-login ") && strings.Contains(s, `"reason":"wrong-token"`)
		}) {
			t.Errorf("no status-login row says wrong-token:\n%s", strings.Join(rows, "\n"))
		}
	})
}

// TestStatusPageContent reads each page of a seeded log as a logged-in operator: what each
// shows, that every stored value is escaped, and that the CSP allows exactly the page's style.
func TestStatusPageContent(t *testing.T) {
	now := time.Now()
	ts := newTestServer(t, map[string]string{"WEBHOOK_MANUAL_TOKEN": statusToken}, nil)
	ts.srv.now = func() time.Time { return now }
	seedStatusRows(t, ts.events, now)
	cookie := statusLogin(t, ts)
	escaped := template.HTMLEscapeString(scriptText)
	row := func(cells ...string) string { return strings.Join(cells, `\s*(?:<[^>]*>\s*)*`) }
	for _, tc := range []struct {
		target string
		status int
		want   []string // regular expressions, in page order
		not    []string // plain text
	}{
		{"/status/", 200, []string{
			`<meta http-equiv="refresh" content="30">`,
			`Units in the log: 5; <strong class="alert">failed on their last redeploy: 2</strong>`,
			`Queue: <strong>2 pending</strong>, the oldest waiting 1m30s`,
			row(`<tr class="rolled-back">`, `api.service`, `ghcr.io/acme/api:v2`, `<span class="badge rolled-back">rolled-back</span> rolled back`,
				`<pre class="err">health gate: the unit restarted 3 times</pre>`),
			row(`<tr class="failed">`, `batch.service`, `ghcr.io/acme/batch:1`, `<span class="badge failed">failed</span> dispatch failed`,
				`<pre class="err">systemd-run: exit 1, gave up</pre>`),
			row(`<tr class="">`, `cache.service`, `ghcr.io/acme/cache:7`, `none yet<br><span class="badge running">running</span> started at`),
			row(`<tr class="ok">`, `demo.service`, `ghcr.io/acme/demo:latest`, `<span class="badge ok">ok</span> restarted, healthy`),
			row(`<tr class="failed">`, `web.service`, `ghcr.io/acme/web:stable`, `<span class="badge failed">failed</span> pull failed`,
				`<pre class="err">podman pull failed: manifest unknown `+regexp.QuoteMeta(escaped)),
			`restarted healthy: 21</span><span><i class="rolled-back"></i>rolled back: 5</span><span><i class="failed"></i>failed: 3`,
		}, nil},
		{"/status/deliveries", 200, []string{
			row(`cache.service`, `ghcr.io/acme/cache:7`, `<span class="badge running">running</span> started`, `d-cache`),
			row(`web.service`, `ghcr.io/acme/web:stable`, `<span class="badge failed">failed</span> pull failed`, `d-web`),
			row(`demo.service`, `ghcr.io/acme/demo:latest`, `<span class="badge ok">ok</span> restarted, healthy`, `d-demo-2`),
			`<a href="/status/deliveries\?unit=&amp;outcome=&amp;before=\d+">Older</a>`,
		}, []string{">Newest<"}},
		{"/status/deliveries?unit=web", 200, []string{`d-web`, `hist-07-f`, `hist-14-f`}, []string{"demo.service", "Older"}},
		{"/status/deliveries?outcome=failed", 200, []string{`<span class="badge failed">failed</span> dispatch failed`, `d-lost`, `d-web`, `hist-07-f`, `hist-14-f`},
			[]string{"d-api", "d-evil", "demo.service"}},
		{"/status/deliveries?outcome=rolled-back&unit=api.service", 200, []string{`d-api`, `hist-05-r`}, []string{"web.service"}},
		{"/status/deliveries?outcome=ignored", 200, []string{`<span class="badge ignored">ignored</span> tag mismatch`, `d-evil`}, []string{"d-web"}},
		{"/status/deliveries?outcome=running", 200, []string{`d-cache`}, []string{"d-web", "d-demo"}},
		{"/status/deliveries?before=1000000", 200, []string{`d-cache`}, nil},
		{"/status/deliveries?outcome=ignored&unit=web", 200, []string{`No delivery matches`}, []string{"d-evil"}},
		{"/status/deliveries?outcome=nope", 400, []string{`unknown outcome: choose one of ok, rolled-back, failed, running, skipped, ignored`}, nil},
		{"/status/deliveries?unit=../x", 400, []string{`invalid`}, nil},
		{"/status/deliveries?before=x", 400, []string{`invalid before`}, nil},
		{"/status/deliveries/d-demo-2", 200, []string{
			`<span class="badge ok">ok</span> restarted, healthy`, `<dt>Image</dt><dd><code>ghcr.io/acme/demo:latest`,
			`<dt>Digest</dt><dd><code>sha256:d1g35t`, `<dt>Pull</dt><dd>1.5s`, `<dt>Restart</dt><dd>800ms`,
			`the task of delivery <a href="/status/deliveries/d-demo-1">d-demo-1</a>`, `<code>webhook-task-d-demo-1.service</code>`,
			row(`github-webhook`, `queued`, `202`), row(`github-task`, `pulled`, `200`), row(`github-task`, `completed`, `200`),
		}, nil},
		{"/status/deliveries/d-web", 200, []string{
			`<span class="badge failed">failed</span> pull failed`,
			`<dt>Error</dt><dd><pre class="err">podman pull failed: manifest unknown ` + regexp.QuoteMeta(escaped),
			`<tr class="failed">\s*<td>[^<]*</td><td>github-task</td><td>pull-failed</td><td>502</td>`, `<code>attempts=3</code>`,
			`<pre>Error: ` + regexp.QuoteMeta(escaped) + `</pre>`,
		}, nil},
		{"/status/deliveries/d-lost", 200, []string{
			`<span class="badge failed">failed</span> dispatch failed`, `<dt>Error</dt><dd><pre class="err">systemd-run: exit 1, gave up`,
			`<td>github-dispatch</td><td>dispatch-retry</td><td>503</td>`, `<td>github-dispatch</td><td>dispatch-failed</td><td>500</td>`,
		}, nil},
		{"/status/deliveries/d-cache", 200, []string{`<span class="badge running">running</span> started`}, nil},
		{"/status/deliveries/nope", 404, []string{`no row of delivery nope`}, nil},
		{"/status/deliveries/-bad", 400, []string{`invalid delivery id`}, nil},
	} {
		t.Run(tc.target, func(t *testing.T) {
			resp, body := statusGet(t, ts, tc.target, cookie)
			if resp.StatusCode != tc.status {
				t.Errorf("status %d, want %d", resp.StatusCode, tc.status)
			}
			rest := body
			for _, w := range tc.want {
				loc := regexp.MustCompile(w).FindStringIndex(rest)
				if loc == nil {
					t.Errorf("no match for %s (in this order) in:\n%s", w, body)
					break
				}
				rest = rest[loc[1]:]
			}
			for _, n := range append(tc.not, "<script", "pwned'") {
				if strings.Contains(body, n) {
					t.Errorf("the page contains %q:\n%s", n, body)
				}
			}
			if csp := resp.Header.Get("Content-Security-Policy"); csp != statusCSP {
				t.Errorf("Content-Security-Policy: %q, want %q", csp, statusCSP)
			}
			if resp.Header.Get("Cache-Control") != "no-store" || resp.Header.Get("X-Content-Type-Options") != "nosniff" {
				t.Errorf("headers %v, want Cache-Control no-store and nosniff", resp.Header)
			}
		})
	}
	// The policy names the hash of the stylesheet as the browser reads it from the page.
	t.Run("the policy allows the page's own stylesheet", func(t *testing.T) {
		_, body := statusGet(t, ts, "/status/", cookie)
		m := regexp.MustCompile(`(?s)<style>(.*?)</style>`).FindStringSubmatch(body)
		if m == nil {
			t.Fatal("no <style> in the page")
		}
		sum := sha256.Sum256([]byte(m[1]))
		if want := "style-src 'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"; !strings.Contains(statusCSP, want) {
			t.Errorf("CSP %q does not allow the page's style (%s)", statusCSP, want)
		}
		for _, want := range []string{"default-src 'none'", "form-action 'self'", "frame-ancestors 'none'", "base-uri 'none'"} {
			if !strings.Contains(statusCSP, want) {
				t.Errorf("CSP %q lacks %s", statusCSP, want)
			}
		}
	})
}

// TestStatusPageAndMetricsAgreeOnTheQueue: the page's queue and /metrics' queue depth are one
// query, so for the same database they say the same, whatever else the claims are doing.
func TestStatusPageAndMetricsAgreeOnTheQueue(t *testing.T) {
	now := time.Now()
	ts := newTestServer(t, map[string]string{"WEBHOOK_MANUAL_TOKEN": statusToken}, nil)
	ts.srv.now = func() time.Time { return now }
	seedStatusRows(t, ts.events, now)
	cookie := statusLogin(t, ts)
	for round := 0; round < 2; round++ {
		_, page := statusGet(t, ts, "/status/", cookie)
		_, metrics := statusGet(t, ts, "/metrics", "")
		onPage := regexp.MustCompile(`Queue: (?:<strong>(\d+) pending</strong>|empty)`).FindStringSubmatch(page)
		inMetrics := regexp.MustCompile(`(?m)^webhook_delivery_queue_pending (\d+)$`).FindStringSubmatch(metrics)
		if onPage == nil || inMetrics == nil || cmp.Or(onPage[1], "0") != inMetrics[1] {
			t.Fatalf("round %d: the page says %q, /metrics %q", round, onPage, inMetrics)
		}
		// A claim taken by a task leaves the queue for both.
		if _, err := ts.events.db.Exec(`UPDATE github_deliveries SET status = 'dispatching' WHERE delivery_id = 'p-1'`); err != nil {
			t.Fatal(err)
		}
	}
}

// cdp is a minimal Chrome DevTools Protocol client over one WebSocket, enough to drive a
// headless chromium from a test with the standard library: the RFC 6455 opening handshake,
// masked text frames out, unmasked (possibly fragmented) frames in.
type cdp struct {
	conn net.Conn
	r    *bufio.Reader
	next int
}

func dialCDP(wsURL string) (*cdp, error) {
	u, err := url.Parse(wsURL)
	if err != nil {
		return nil, err
	}
	conn, err := net.DialTimeout("tcp", u.Host, hangGuard)
	if err != nil {
		return nil, err
	}
	conn.SetDeadline(time.Now().Add(hangGuard))
	var nonce [16]byte
	rand.Read(nonce[:])
	key := base64.StdEncoding.EncodeToString(nonce[:])
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n", u.RequestURI(), u.Host, key)
	r := bufio.NewReader(conn)
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("websocket handshake with %s: %w", wsURL, err)
	}
	sum := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Sec-WebSocket-Accept") != base64.StdEncoding.EncodeToString(sum[:]) {
		conn.Close()
		return nil, fmt.Errorf("websocket handshake with %s: %s, accept %q", wsURL, resp.Status, resp.Header.Get("Sec-WebSocket-Accept"))
	}
	return &cdp{conn: conn, r: r}, nil
}

// send writes one masked text frame, as RFC 6455 requires of a client.
func (c *cdp) send(payload []byte) error {
	hdr := []byte{0x81} // FIN, text
	switch n := len(payload); {
	case n < 126:
		hdr = append(hdr, 0x80|byte(n))
	case n < 1<<16:
		hdr = append(hdr, 0x80|126, byte(n>>8), byte(n))
	default:
		hdr = append(hdr, 0x80|127)
		for i := 7; i >= 0; i-- {
			hdr = append(hdr, byte(uint64(n)>>(8*i)))
		}
	}
	var mask [4]byte
	rand.Read(mask[:])
	frame := append(hdr, mask[:]...)
	for i, b := range payload {
		frame = append(frame, b^mask[i%4])
	}
	_, err := c.conn.Write(frame)
	return err
}

// receive reads one message, joining continuation frames and skipping pings and pongs.
func (c *cdp) receive() ([]byte, error) {
	var msg []byte
	for {
		var h [2]byte
		if _, err := io.ReadFull(c.r, h[:]); err != nil {
			return nil, err
		}
		n := uint64(h[1] & 0x7f)
		if n >= 126 {
			ext := make([]byte, 2)
			if n == 127 {
				ext = make([]byte, 8)
			}
			if _, err := io.ReadFull(c.r, ext); err != nil {
				return nil, err
			}
			n = 0
			for _, b := range ext {
				n = n<<8 | uint64(b)
			}
		}
		var mask [4]byte
		if h[1]&0x80 != 0 {
			if _, err := io.ReadFull(c.r, mask[:]); err != nil {
				return nil, err
			}
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(c.r, payload); err != nil {
			return nil, err
		}
		for i := range payload {
			payload[i] ^= mask[i%4]
		}
		switch h[0] & 0x0f {
		case 0x8:
			return nil, errors.New("the browser closed the websocket")
		case 0x9, 0xa:
			continue
		}
		msg = append(msg, payload...)
		if h[0]&0x80 != 0 {
			return msg, nil
		}
	}
}

// call sends a command, to a page's session when session is set, and decodes its result into
// result (if not nil), skipping the events that arrive meanwhile.
func (c *cdp) call(session, method string, params map[string]any, result any) error {
	c.next++
	if params == nil {
		params = map[string]any{}
	}
	msg := map[string]any{"id": c.next, "method": method, "params": params}
	if session != "" {
		msg["sessionId"] = session
	}
	b, err := json.Marshal(msg)
	if err != nil {
		return err
	}
	c.conn.SetDeadline(time.Now().Add(hangGuard))
	if err := c.send(b); err != nil {
		return fmt.Errorf("%s: %w", method, err)
	}
	for {
		raw, err := c.receive()
		if err != nil {
			return fmt.Errorf("%s: %w", method, err)
		}
		var resp struct {
			ID     int             `json:"id"`
			Result json.RawMessage `json:"result"`
			Error  *struct {
				Message string `json:"message"`
			} `json:"error"`
		}
		if err := json.Unmarshal(raw, &resp); err != nil || resp.ID != c.next {
			continue
		}
		if resp.Error != nil {
			return fmt.Errorf("%s: %s", method, resp.Error.Message)
		}
		if result == nil {
			return nil
		}
		return json.Unmarshal(resp.Result, result)
	}
}

// browserPage is one tab of a headless chromium started for a test.
type browserPage struct {
	t       *testing.T
	c       *cdp
	session string
}

// startBrowser starts chromium headless in its own process group with a throwaway profile,
// opens a tab, and stops the whole group when the test ends.
func startBrowser(t *testing.T, bin string) *browserPage {
	t.Helper()
	cmd := exec.Command(bin, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
		"--user-data-dir="+t.TempDir(), "--disable-background-networking", "--disable-component-update",
		"--disable-sync", "--no-first-run", "--disable-quic", "--hide-scrollbars", "about:blank")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
	})
	// Chromium prints where its DevTools endpoint listens; the rest of its stderr is kept for a
	// failure message, and read to the end so chromium never blocks on a full pipe.
	found := make(chan string, 1)
	logs := &syncBuffer{}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64*1024), 1024*1024)
		for sc.Scan() {
			line := sc.Text()
			if ws, ok := strings.CutPrefix(line, "DevTools listening on "); ok {
				found <- strings.TrimSpace(ws)
			}
			fmt.Fprintln(logs, line)
		}
	}()
	var ws string
	select {
	case ws = <-found:
	case <-time.After(hangGuard):
		t.Fatalf("%s printed no DevTools endpoint within %s:\n%s", bin, hangGuard, logs)
	}
	c, err := dialCDP(ws)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.conn.Close() })
	var target struct{ TargetID string }
	if err := c.call("", "Target.createTarget", map[string]any{"url": "about:blank"}, &target); err != nil {
		t.Fatal(err)
	}
	var attached struct{ SessionID string }
	if err := c.call("", "Target.attachToTarget", map[string]any{"targetId": target.TargetID, "flatten": true}, &attached); err != nil {
		t.Fatal(err)
	}
	return &browserPage{t: t, c: c, session: attached.SessionID}
}

func (p *browserPage) call(method string, params map[string]any, result any) {
	p.t.Helper()
	if err := p.c.call(p.session, method, params, result); err != nil {
		p.t.Fatal(err)
	}
}

// eval runs a JavaScript expression in the page (from DevTools, which the page's CSP does not
// govern) and decodes its JSON value into v.
func (p *browserPage) eval(expr string, v any) {
	p.t.Helper()
	if err := p.tryEval(expr, v); err != nil {
		p.t.Fatal(err)
	}
}

// tryEval is eval that returns its failure: while a page navigates, an evaluation can be cut
// short ("Inspected target navigated or closed"), which to a poll only means "not yet".
func (p *browserPage) tryEval(expr string, v any) error {
	var res struct {
		Result struct {
			Value json.RawMessage `json:"value"`
		} `json:"result"`
		ExceptionDetails *struct {
			Text string `json:"text"`
		} `json:"exceptionDetails"`
	}
	if err := p.c.call(p.session, "Runtime.evaluate", map[string]any{"expression": expr, "returnByValue": true}, &res); err != nil {
		return fmt.Errorf("evaluate %s: %w", expr, err)
	}
	if res.ExceptionDetails != nil {
		return fmt.Errorf("evaluate %s: %s", expr, res.ExceptionDetails.Text)
	}
	if v != nil {
		if err := json.Unmarshal(res.Result.Value, v); err != nil {
			return fmt.Errorf("evaluate %s: %v (value %s)", expr, err, res.Result.Value)
		}
	}
	return nil
}

// click clicks the element selector names once the evaluation that finds it has returned, so
// the navigation the click starts cannot cut that evaluation's answer short.
func (p *browserPage) click(selector string) {
	p.t.Helper()
	var found bool
	p.eval(`(() => { const el = document.querySelector(`+strconv.Quote(selector)+`); if (!el) return false;
		setTimeout(() => el.click(), 0); return true })()`, &found)
	if !found {
		p.t.Fatalf("no element %s to click", selector)
	}
}

// waitFor polls a JavaScript condition until it holds; hangGuard bounds a page that never gets
// there.
func (p *browserPage) waitFor(cond string) {
	p.t.Helper()
	deadline := time.Now().Add(hangGuard)
	for {
		var ok bool
		err := p.tryEval("!!("+cond+")", &ok) // an error while the page navigates: look again
		if ok {
			return
		}
		if time.Now().After(deadline) {
			var html string
			p.tryEval("document.documentElement.outerHTML", &html)
			p.t.Fatalf("waited %s for %s (last evaluation: %v); the page is:\n%s", hangGuard, cond, err, html)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// pageFacts is what the browser test reads from the page after each step.
type pageFacts struct {
	Title, Path, Cookie, H1, Text string
	Scripts                       int
	BadgeColour                   string
}

func (p *browserPage) facts() pageFacts {
	p.t.Helper()
	var f pageFacts
	p.eval(`({Title: document.title, Path: location.pathname, Cookie: document.cookie, Scripts: document.scripts.length,
		H1: (document.querySelector('h1') || {}).textContent || '', Text: document.body.innerText,
		BadgeColour: (() => { const b = document.querySelector('.badge.failed'); return b ? getComputedStyle(b).backgroundColor : '' })()})`, &f)
	return f
}

// chromiumPath finds the browser the status page test drives: Debian's chromium.
func chromiumPath() (string, error) {
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p, nil
		}
	}
	return "", errors.New("chromium not found on PATH (apt-get install chromium)")
}

// TestStatusPageInBrowser drives a real headless chromium through the status page of a seeded
// log: log in through the form, read the overview and a failed delivery's story, and check that
// the <script> stored in a unit name and an error text is shown as text and never runs (it
// would retitle the page), that the session cookie is out of the page's reach (HttpOnly), and
// that the CSP lets the page's own stylesheet apply. It saves a screenshot of the overview to
// testdata/status-page.png under -update, for the README.
func TestStatusPageInBrowser(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: this test starts chromium")
	}
	bin, err := chromiumPath()
	if err != nil {
		rigSkipOrFail(t, "%v", err)
	}
	now := time.Now()
	ts := newTestServer(t, map[string]string{"WEBHOOK_MANUAL_TOKEN": statusToken}, nil)
	seedStatusRows(t, ts.events, now)
	p := startBrowser(t, bin)
	p.call("Emulation.setDeviceMetricsOverride", map[string]any{"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": false}, nil)

	p.call("Page.navigate", map[string]any{"url": ts.URL + "/"}, nil)
	p.waitFor(`document.readyState === 'complete' && document.getElementById('token')`)
	if f := p.facts(); f.H1 != "Log in" || strings.Contains(f.Text, "web.service") {
		t.Fatalf("before logging in the page shows %q:\n%s", f.H1, f.Text)
	}
	p.eval(`document.getElementById('token').focus()`, nil)
	p.call("Input.insertText", map[string]any{"text": statusToken}, nil)
	for _, typ := range []string{"keyDown", "keyUp"} {
		p.call("Input.dispatchKeyEvent", map[string]any{"type": typ, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "text": "\r"}, nil)
	}
	p.waitFor(`document.readyState === 'complete' && document.querySelector('h1') && document.querySelector('h1').textContent === 'Overview'`)
	f := p.facts()
	for _, c := range []struct {
		what string
		ok   bool
	}{
		{"the login returned to /", f.Path == "/"},
		{"the title is the page's own (no stored script ran)", f.Title == "Overview · webhook-auto-update"},
		{"the page has no script element", f.Scripts == 0},
		{"the error's <script> shows as text", strings.Contains(f.Text, "manifest unknown "+scriptText)},
		{"the session cookie is HttpOnly (invisible to the page)", f.Cookie == ""},
		{"the stylesheet applies under the CSP (the failed badge is red)", f.BadgeColour == "rgb(179, 38, 30)"},
		{"the failure stands out in words too", strings.Contains(f.Text, "FAILED") && strings.Contains(f.Text, "pull failed")},
		{"the queue shows", strings.Contains(f.Text, "Queue: 2 pending")},
	} {
		if !c.ok {
			t.Errorf("overview: want %s; got %+v", c.what, f)
		}
	}

	var height int
	p.eval(`document.documentElement.scrollHeight`, &height)
	p.call("Emulation.setDeviceMetricsOverride", map[string]any{"width": 1200, "height": height, "deviceScaleFactor": 1, "mobile": false}, nil)
	var shot struct{ Data []byte }
	p.call("Page.captureScreenshot", map[string]any{"format": "png"}, &shot)
	img, err := png.Decode(bytes.NewReader(shot.Data))
	if err != nil || img.Bounds().Dx() != 1200 || img.Bounds().Dy() != height {
		t.Errorf("screenshot: %v, bounds %v, want a 1200x%d PNG", err, img.Bounds(), height)
	} else if *update {
		if err := os.WriteFile(filepath.Join("testdata", "status-page.png"), shot.Data, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	p.click(`a[href="/status/deliveries/d-web"]`)
	p.waitFor(`document.readyState === 'complete' && location.pathname === '/status/deliveries/d-web'`)
	f = p.facts()
	if f.H1 != "Delivery d-web" || f.Title != "Delivery d-web · webhook-auto-update" || f.Scripts != 0 ||
		!strings.Contains(f.Text, "pull-failed") || !strings.Contains(f.Text, "Error: "+scriptText) {
		t.Errorf("story of d-web: %+v", f)
	}

	p.click(`form[action="/status/logout"] button`)
	p.waitFor(`document.readyState === 'complete' && location.pathname === '/status/' && document.getElementById('token')`)
	p.call("Page.navigate", map[string]any{"url": ts.URL + "/status/deliveries"}, nil)
	p.waitFor(`document.readyState === 'complete' && location.pathname === '/status/deliveries'`)
	if f := p.facts(); f.H1 != "Log in" || strings.Contains(f.Text, "web.service") {
		t.Errorf("after logging out the deliveries page shows %q:\n%s", f.H1, f.Text)
	}
}

// BenchmarkStatusPage renders the status pages over an event log of 100,000 rows, all of them
// deliveries, their dispatch and their task steps, with their claims: 14,286 deliveries of 50
// units over 50 days, one in eight failed or rolled back. The handler is called directly, so the
// figure is the queries and the template.
func BenchmarkStatusPage(b *testing.B) {
	const rows = 100_000
	now := time.Now()
	ts := newTestServer(b, map[string]string{"WEBHOOK_MANUAL_TOKEN": statusToken}, nil)
	ts.srv.now = func() time.Time { return now }
	var batch []event
	var claims [][]any
	flush := func() {
		if err := ts.events.Write(context.Background(), batch...); err != nil {
			b.Fatal(err)
		}
		batch = batch[:0]
	}
	for i := 0; i*7 < rows; i++ {
		at := now.Add(-time.Duration(rows/7-i) * 5 * time.Minute)
		id, unit := fmt.Sprintf("bench-%06d", i), fmt.Sprintf("app-%02d.service", i%50)
		image := "ghcr.io/acme/" + strings.TrimSuffix(unit, ".service") + ":latest"
		meta := func(step string) map[string]any {
			return map[string]any{"delivery": id, "unit": unit, "image": image, "event": "package", "step": step}
		}
		last := "completed"
		switch i % 8 {
		case 3:
			last = "rolled-back"
		case 5:
			last = "pull-failed"
		}
		batch = append(batch, event{RequestID: "r" + id, TS: at, Method: "POST", Path: "/github-package-update/x", Status: 202,
			Action: "github-webhook", Meta: map[string]any{"delivery": id, "unit": unit, "image": image, "reason": "queued"}},
			event{RequestID: "d" + id, TS: at, Method: "QUEUE", Path: "/github-package-update/x", Status: 202, Action: "github-dispatch",
				Meta: map[string]any{"delivery": id, "unit": unit, "image": image, "reason": "dispatching", "task_unit": "webhook-task-" + id}})
		for j, step := range []string{"started", "pulled", "restarted", "healthy", last} {
			batch = append(batch, event{RequestID: "t" + id, TS: at.Add(time.Duration(j) * time.Second), Method: "TASK", Status: 200,
				Action: "github-task", Meta: meta(step)})
		}
		claims = append(claims, []any{id, unit, image, "r" + id, at.Unix(), at.Add(4 * time.Second).Unix(), at.UnixMilli(), last, id, taskUnitName(id)})
		if len(batch) >= 6000 {
			flush()
		}
	}
	if len(batch) > 0 {
		flush()
	}
	tx, err := ts.events.db.Begin()
	for _, c := range claims {
		if err == nil {
			_, err = tx.Exec(`INSERT INTO github_deliveries (delivery_id, unit, image, event, request_id, status, received_at,
				updated_at, claimed_at, step, covered_by, task_unit) VALUES (?, ?, ?, 'package', ?, 'done', ?, ?, ?, ?, ?, ?)`, c...)
		}
	}
	if err == nil {
		err = tx.Commit()
	}
	if err != nil {
		b.Fatal(err)
	}
	cookie := &http.Cookie{Name: statusCookie, Value: statusSession(statusToken, now.Add(time.Hour))}
	for _, tc := range []struct {
		name, target string
		handler      http.HandlerFunc
	}{
		{"overview", "/status/", ts.srv.handleStatusOverview},
		{"deliveries", "/status/deliveries", ts.srv.handleStatusDeliveries},
		{"deliveries-failed", "/status/deliveries?outcome=failed", ts.srv.handleStatusDeliveries},
		{"deliveries-ignored", "/status/deliveries?outcome=ignored", ts.srv.handleStatusDeliveries},
		{"deliveries-failed-of-one-unit", "/status/deliveries?outcome=failed&unit=app-05", ts.srv.handleStatusDeliveries},
		{"story", "/status/deliveries/bench-000005", nil},
	} {
		b.Run(tc.name, func(b *testing.B) {
			for b.Loop() {
				req := httptest.NewRequest("GET", tc.target, nil)
				req.AddCookie(cookie)
				w := httptest.NewRecorder()
				if tc.handler != nil {
					tc.handler(w, req)
				} else {
					req.SetPathValue("id", "bench-000005")
					ts.srv.handleStatusStory(w, req)
				}
				if w.Code != 200 {
					b.Fatalf("GET %s = %d:\n%s", tc.target, w.Code, w.Body)
				}
			}
		})
	}
}

// TestStatusQueriesUseIndexes checks SQLite's plan for each query of the status page: none reads
// all of event_log or of the claims (a SCAN), so the page's cost follows what it shows, not the
// size of the log (BenchmarkStatusPage measures it). The deliveries list reads claims by rowid
// and the ignored list event_log rows by id, newest first, both bounded by pageScanLimit.
func TestStatusQueriesUseIndexes(t *testing.T) {
	l := openTestLog(t, filepath.Join(t.TempDir(), "events.db"), &syncBuffer{})
	type query struct {
		name, sql string
		args      []any
		indexes   []string
	}
	queries := []query{
		{"units", unitsSQL, nil, []string{"idx_github_deliveries_unit"}},
		{"a unit's newest claim", unitNewestSQL, []any{"a.service"}, []string{"idx_github_deliveries_unit"}},
		{"a unit's last finished claim", unitLastSQL, []any{"a.service"}, []string{"idx_github_deliveries_unit"}},
		{"chart", chartSQL([]string{"(?, ?, ?)", "(?, ?, ?)"}), []any{0, 0, 1, 1, 1, 2}, []string{"idx_github_deliveries_claimed"}},
		{"story", storySQL, []any{0, 1, "d-1", "d-1"}, []string{"idx_event_log_ts"}},
		{"did the task run", taskRanSQL, []any{0, "d-1"}, []string{"idx_event_log_ts"}},
		{"deliveries page", claimColumnsSQL + ` WHERE rowid < ? ORDER BY rowid DESC LIMIT 10`, []any{5}, []string{"INTEGER PRIMARY KEY"}},
		{"deliveries page of a unit", claimColumnsSQL + ` WHERE rowid < ? AND unit = ? ORDER BY rowid DESC LIMIT 10`, []any{5, "a.service"}, []string{"idx_github_deliveries_unit"}},
	}
	scan := regexp.MustCompile(`^SCAN (event_log|github_deliveries|c)\b`)
	for _, q := range queries {
		t.Run(q.name, func(t *testing.T) {
			rows, err := l.db.Query("EXPLAIN QUERY PLAN "+q.sql, q.args...)
			if err != nil {
				t.Fatal(err)
			}
			defer rows.Close()
			var plan []string
			for rows.Next() {
				var id, parent, unused int
				var detail string
				if err := rows.Scan(&id, &parent, &unused, &detail); err != nil {
					t.Fatal(err)
				}
				plan = append(plan, detail)
			}
			text := strings.Join(plan, "\n")
			for _, line := range plan {
				if scan.MatchString(line) {
					t.Errorf("the plan reads a whole table (%s):\n%s", line, text)
				}
			}
			for _, ix := range q.indexes {
				if !strings.Contains(text, ix) {
					t.Errorf("the plan does not use %s:\n%s", ix, text)
				}
			}
		})
	}
}

// TestStoryInMilliseconds: a story's task rows carry their times to the millisecond, with the
// totals from the push to serving and to healthy, or a rollback's, and the registry's note.
func TestStoryInMilliseconds(t *testing.T) {
	l, err := openEventLog(filepath.Join(t.TempDir(), "db.sqlite"), newLogger(io.Discard))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx := context.Background()
	pushed := time.UnixMilli(1700000000123)
	write := func(delivery string, steps ...any) {
		t.Helper()
		if _, err := l.db.Exec(`INSERT INTO github_deliveries (delivery_id, unit, image, event, request_id, status,
			received_at, updated_at, claimed_at, step, covered_by, task_unit) VALUES (?, 'web.service', 'ghcr.io/a/web:1', 'package', 'r', 'done', ?, ?, ?, ?, ?, ?)`,
			delivery, pushed.Unix(), pushed.Unix()+30, pushed.UnixMilli(), steps[len(steps)-2], delivery, "webhook-task-"+delivery); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < len(steps); i += 2 {
			at := pushed.Add(steps[i+1].(map[string]any)["after"].(time.Duration))
			meta := map[string]any{"delivery": delivery, "step": steps[i], "at_ms": at.UnixMilli()}
			for k, v := range steps[i+1].(map[string]any) {
				if k != "after" {
					meta[k] = v
				}
			}
			if err := l.Write(ctx, event{RequestID: "t", TS: at, Method: "TASK", Status: 200, Action: "github-task", Meta: meta}); err != nil {
				t.Fatal(err)
			}
		}
	}
	ms := func(n int) time.Duration { return time.Duration(n) * time.Millisecond }
	write("ok-1", "started", map[string]any{"after": ms(41)}, "restarted", map[string]any{"after": ms(300)},
		"healthy", map[string]any{"after": ms(20_345), "serving_at_ms": pushed.Add(ms(612)).UnixMilli()}, "completed", map[string]any{"after": ms(20_390)})
	write("bad-1", "started", map[string]any{"after": ms(40)}, "health-failed", map[string]any{"after": ms(2_500)},
		"rolled-back", map[string]any{"after": ms(23_000), "registry_note": "the registry's ghcr.io/a/web:1 still names the rejected sha256:x"})

	v, ok, err := deliveryStory(ctx, l.db, "ok-1", time.Now(), time.UTC)
	if err != nil || !ok {
		t.Fatalf("story: %v %v", ok, err)
	}
	if got := fmt.Sprint(v.Totals); got != "[{Push → serving 612ms} {Push → healthy 20.345s}]" {
		t.Errorf("totals %s", got)
	}
	if v.Rows[0].When != "2023-11-14 22:13:20.164 UTC" {
		t.Errorf("started row at %q, want the millisecond", v.Rows[0].When)
	}
	v, _, _ = deliveryStory(ctx, l.db, "bad-1", time.Now(), time.UTC)
	if got := fmt.Sprint(v.Totals); got != "[{Registry the registry's ghcr.io/a/web:1 still names the rejected sha256:x} {Rollback (from the failure) 20.5s} {Push → rolled back 23s}]" {
		t.Errorf("totals %s", got)
	}
	var b strings.Builder
	if err := statusTemplate.Execute(&b, statusView{Page: "story", Story: v}); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"<dt>Push → rolled back</dt><dd>23s</dd>", "still names the rejected sha256:x", "22:13:22.623 UTC"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("the story page lacks %q", want)
		}
	}
}
