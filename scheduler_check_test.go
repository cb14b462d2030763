// scheduler_check_test.go tests the image check: with the fake skopeo and podman (the test binary
// on PATH) up to date, an update seen, a failing registry retried with backoff, a deploy queued
// once, the check command; on the rig, real skopeo against the test registry.
package main

import (
	"context"
	"database/sql"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var (
	runningDigest = "sha256:" + strings.Repeat("d", 64) // what the fake podman's image inspect prints
	newerDigest   = "sha256:" + strings.Repeat("e", 64)
)

// checkRig is a test server, a fake host with skopeo, and a Quadlet file for app.service in HOME.
type checkRig struct {
	ts   *testServer
	h    *fakeHost
	home string
	now  time.Time
}

func newCheckRig(t *testing.T, quadlet string) *checkRig {
	t.Helper()
	h, _ := newFakeHostWithRun(t)
	t.Setenv("PATH", installFakes(t, "skopeo")+string(os.PathListSeparator)+os.Getenv("PATH"))
	home := t.TempDir()
	writeQuadlet(t, home, "app", quadlet)
	ts := newTestServer(t, map[string]string{"WEBHOOK_MANUAL_TOKEN": statusToken, "WEBHOOK_CHECK_INTERVAL_SECS": "3600"}, nil)
	ts.srv.getenv = mapEnv(map[string]string{"HOME": home})
	r := &checkRig{ts: ts, h: h, home: home, now: time.Unix(1_800_000_000, 0)}
	ts.srv.now = func() time.Time { return r.now }
	return r
}

func writeQuadlet(t *testing.T, home, name, content string) {
	t.Helper()
	dir := filepath.Join(home, ".config", "containers", "systemd")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name+".container"), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

const appQuadlet = "[Container]\nImage=registry.example/acme/app:1\n"

// check runs the server's check of app.service at r.now, as its loop does (not forced).
func (r *checkRig) check(t *testing.T) registryCheck {
	t.Helper()
	c, ok := r.ts.srv.checkRegistry(context.Background(), "app.service", false)
	if !ok {
		t.Fatal("app.service was not checked")
	}
	return c
}

// page is the status overview, logged in.
func (r *checkRig) page(t *testing.T) string {
	t.Helper()
	_, body := statusGet(t, r.ts, "/status/", statusLogin(t, r.ts))
	return body
}

func (r *checkRig) metrics(t *testing.T) string {
	t.Helper()
	_, body := r.ts.do(t, "GET", "/metrics", nil)
	return body
}

// checkRows counts the image-check rows committed so far.
func (r *checkRig) checkRows(t *testing.T) int {
	t.Helper()
	var n int
	if err := r.ts.events.db.QueryRow(`SELECT count(*) FROM event_log WHERE action = 'image-check'`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func TestRegistryCheckUpToDate(t *testing.T) {
	r := newCheckRig(t, appQuadlet)
	r.h.set("skopeo-inspect.stdout", runningDigest+"\n")
	c := r.check(t)
	if c.State().Class != "ok" || c.Remote != runningDigest || c.Running != runningDigest || c.Error != "" {
		t.Fatalf("check = %+v, want up to date with %s", c, runningDigest)
	}
	wantCalls(t, r.h, "skopeo-inspect", []string{"skopeo", "inspect", "--no-tags", "--format", "{{.Digest}}", "--", "docker://registry.example/acme/app:1"})
	if page := r.page(t); !strings.Contains(page, `<span class="badge ok">up to date</span>`) {
		t.Errorf("the overview does not show app.service up to date:\n%s", page)
	}
	m := r.metrics(t)
	for _, want := range []string{`webhook_image_update_available{unit="app.service"} 0`, `webhook_image_check_timestamp_seconds{unit="app.service"} 1.8e+09`} {
		if !strings.Contains(m, want) {
			t.Errorf("/metrics lacks %q:\n%s", want, m)
		}
	}
	// Not due before the interval: the registry is not asked again.
	r.now = r.now.Add(59 * time.Minute)
	r.check(t)
	if n := len(r.h.callsOf("skopeo-inspect")); n != 1 {
		t.Errorf("skopeo ran %d times within one interval, want 1", n)
	}
}

func TestRegistryCheckUpdateSeen(t *testing.T) {
	r := newCheckRig(t, appQuadlet)
	r.h.set("skopeo-inspect.stdout", newerDigest+"\n")
	first := r.now
	c := r.check(t)
	if c.State().Class != "update" || c.FirstSeen != first.Unix() || c.Remote != newerDigest || c.Running != runningDigest {
		t.Fatalf("check = %+v, want an update first seen now", c)
	}
	r.now = r.now.Add(2 * time.Hour)
	if c = r.check(t); c.FirstSeen != first.Unix() {
		t.Errorf("a later check moved first_seen_at to %d, want %d", c.FirstSeen, first.Unix())
	}
	if n := r.checkRows(t); n != 1 {
		t.Errorf("%d image-check rows, want 1: only a change writes one", n)
	}
	var notices int
	var fields string
	r.ts.events.db.QueryRow(`SELECT count(*), max(fields) FROM notify_outbox WHERE kind = 'update'`).Scan(&notices, &fields)
	if notices != 1 || !strings.Contains(fields, newerDigest) || !strings.Contains(fields, `"unit":"app.service"`) {
		t.Errorf("%d update notifications (%s), want 1 naming the unit and the digest", notices, fields)
	}
	want := "update available since " + statusTime(first.Unix(), time.Local)
	if page := r.page(t); !strings.Contains(page, want) {
		t.Errorf("the overview does not say %q:\n%s", want, page)
	}
	if m := r.metrics(t); !strings.Contains(m, `webhook_image_update_available{unit="app.service"} 1`) {
		t.Errorf("/metrics does not report the update:\n%s", m)
	}
	// No redeploy without on-update=deploy.
	if n := len(r.h.callsOf(keySystemdRun)); n != 0 {
		t.Errorf("a check without on-update=deploy started %d tasks", n)
	}
}

func TestRegistryCheckRegistryError(t *testing.T) {
	r := newCheckRig(t, appQuadlet)
	r.h.set("skopeo-inspect.stdout", newerDigest+"\n")
	r.check(t) // an update seen: a failure later must not hide it
	start := r.now.Add(time.Hour)
	r.now = start
	r.h.set("skopeo-inspect.fails", "100")
	for i, wantWait := range []time.Duration{time.Minute, 2 * time.Minute, 4 * time.Minute, 8 * time.Minute} {
		c := r.check(t)
		if c.State().Class != "failed" || !strings.Contains(c.Error, "scripted failure of skopeo-inspect") {
			t.Fatalf("check %d = %+v, want failed with skopeo's error", i, c)
		}
		if got := time.Duration(c.NextTry-r.now.Unix()) * time.Second; got != wantWait {
			t.Errorf("failure %d: retry in %s, want %s", i+1, got, wantWait)
		}
		calls := len(r.h.callsOf("skopeo-inspect"))
		r.now = r.now.Add(wantWait - time.Second)
		r.check(t)
		if n := len(r.h.callsOf("skopeo-inspect")); n != calls {
			t.Errorf("failure %d: retried before its backoff ended", i+1)
		}
		r.now = r.now.Add(time.Second)
	}
	page := r.page(t)
	for _, want := range []string{`<span class="badge failed">check failed</span>`, "scripted failure of skopeo-inspect"} {
		if !strings.Contains(page, want) {
			t.Errorf("the overview lacks %q:\n%s", want, page)
		}
	}
	if m := r.metrics(t); !strings.Contains(m, `webhook_image_update_available{unit="app.service"} 1`) {
		t.Errorf("a failed check hid the update seen before:\n%s", m)
	}
	r.h.set("skopeo-inspect.fails", "0")
	r.h.set("skopeo-inspect.stdout", runningDigest+"\n")
	if c := r.check(t); c.State().Class != "ok" || time.Duration(c.NextTry-r.now.Unix())*time.Second != time.Hour {
		t.Errorf("after the registry recovered: %+v, want up to date, next check in an hour", c)
	}
}

func TestRegistryCheckDeployOnce(t *testing.T) {
	r := newCheckRig(t, appQuadlet+"Label=webhook-auto-update.on-update=deploy\n")
	r.h.set("skopeo-inspect.stdout", newerDigest+"\n")
	for i := 0; i < 3; i++ {
		r.check(t)
		r.ts.drain(t)
		r.now = r.now.Add(2 * time.Hour)
	}
	runs := r.h.callsOf(keySystemdRun)
	if len(runs) != 1 {
		t.Fatalf("%d tasks started for one new digest, want 1:\n%s", len(runs), fakeCallLines(runs))
	}
	id := hashID("check", "app.service", newerDigest)
	tail := strings.Join(runs[0][len(runs[0])-8:], " ")
	if want := "--digest " + newerDigest + " -- app.service registry.example/acme/app:1 check " + id + " check"; tail != want {
		t.Errorf("run-task argv ends %q, want %q", tail, want)
	}
	var status, event string
	if err := r.ts.events.db.QueryRow(`SELECT status, event FROM github_deliveries WHERE delivery_id = ?`, id).Scan(&status, &event); err != nil || status != "dispatched" || event != "check" {
		t.Errorf("the claim of %s: status %q event %q (%v), want dispatched, check", id, status, event, err)
	}
	// A digest whose redeploy was rolled back, here by a push's task, is not queued by a check.
	rejected := "sha256:" + strings.Repeat("f", 64)
	if _, err := r.ts.events.db.Exec(`INSERT INTO github_deliveries (delivery_id, unit, image, event, request_id, status,
		received_at, updated_at, digest, step) VALUES ('push-1', 'app.service', 'registry.example/acme/app:1', 'package', 'r', 'done', 1, 1, ?, 'rolled-back')`, rejected); err != nil {
		t.Fatal(err)
	}
	r.h.set("skopeo-inspect.stdout", rejected+"\n")
	if c := r.check(t); c.State().Class != "update" {
		t.Errorf("check = %+v, want the rejected digest shown as an update", c)
	}
	r.ts.drain(t)
	if n := len(r.h.callsOf(keySystemdRun)); n != 1 {
		t.Errorf("a digest rolled back before was redeployed by a check (%d tasks)", n)
	}
	var reason string
	r.ts.events.db.QueryRow(`SELECT json_extract(meta, '$.reason') FROM event_log WHERE action = 'image-check' ORDER BY id DESC LIMIT 1`).Scan(&reason)
	if reason != "rejected-before" {
		t.Errorf("the check's row gives the reason %q, want rejected-before", reason)
	}
}

func TestRegistryCheckBadPolicy(t *testing.T) {
	for label, want := range map[string]string{
		"webhook-auto-update.check=soon":       `webhook-auto-update.check="soon": want off`,
		"webhook-auto-update.check=10s":        `webhook-auto-update.check="10s": want off`,
		"webhook-auto-update.on-update=deplyo": `webhook-auto-update.on-update="deplyo": want notify or deploy`,
	} {
		t.Run(label, func(t *testing.T) {
			r := newCheckRig(t, appQuadlet+"Label="+label+"\n")
			r.h.set("skopeo-inspect.stdout", newerDigest+"\n")
			if c := r.check(t); !strings.Contains(c.Error, want) || len(r.h.callsOf("skopeo-inspect")) != 0 {
				t.Errorf("check = %+v, want failed with %q and no registry asked", c, want)
			}
		})
	}
	r := newCheckRig(t, appQuadlet+"Label=webhook-auto-update.check=off\n")
	if _, ok := r.ts.srv.checkRegistry(context.Background(), "app.service", true); ok {
		t.Error("a unit with check=off was checked")
	}
}

func TestCheckCommand(t *testing.T) {
	h := newFakeHost(t)
	home, state := t.TempDir(), t.TempDir()
	writeQuadlet(t, home, "app", appQuadlet)
	writeQuadlet(t, home, "db", "[Container]\nImage=docker.io/library/postgres:16\n")
	writeQuadlet(t, home, "local", "[Container]\nExec=sleep 1\n")
	env := mapEnv(map[string]string{"HOME": home, "WEBHOOK_STATE_DIR": state})
	var out, errOut strings.Builder
	if code := run([]string{"check"}, env, &out, &errOut); code != 2 || !strings.Contains(errOut.String(), "install the Debian package skopeo") {
		t.Fatalf("check without skopeo: exit %d, stderr %q; want 2 naming the package", code, errOut.String())
	}
	t.Setenv("PATH", installFakes(t, "skopeo")+string(os.PathListSeparator)+os.Getenv("PATH"))
	h.set("skopeo-inspect.stdout", runningDigest+"\n")
	out.Reset()
	if code := run([]string{"check"}, env, &out, &errOut); code != 0 {
		t.Fatalf("check: exit %d, want 0; stdout:\n%s\nstderr:\n%s", code, out.String(), errOut.String())
	}
	want := "app.service -> up to date\ndb.service -> up to date\nlocal.service -> not checked (no Image=, or check=off)\n"
	if out.String() != want {
		t.Errorf("check printed:\n%s\nwant:\n%s", out.String(), want)
	}
	h.set("skopeo-inspect.stdout", newerDigest+"\n")
	out.Reset()
	if code := run([]string{"check", "db"}, env, &out, &errOut); code != 0 || !strings.HasPrefix(out.String(), "db.service -> update available since ") {
		t.Errorf("check db with a newer digest: exit %d, stdout %q; want 0 and the update", code, out.String())
	}
	h.set("skopeo-inspect.fails", "1")
	out.Reset()
	if code := run([]string{"check", "app"}, env, &out, &errOut); code != 1 || !strings.HasPrefix(out.String(), "app.service -> check failed: skopeo inspect") {
		t.Errorf("check app with a failing registry: exit %d, stdout %q; want 1 and the error", code, out.String())
	}
	if code := run([]string{"check", "-bad-"}, env, &out, &errOut); code != 2 {
		t.Errorf("check of an invalid unit name: exit %d, want 2", code)
	}
}

// TestE2EImageCheck: on the rig, v2 pushed without any webhook is seen by the server's check with
// the real skopeo and shown on the page; with on-update=deploy (added as a drop-in) the check
// queues it and the unit's container runs v2 once the gate passed.
func TestE2EImageCheck(t *testing.T) {
	r := needRig(t)
	base := rigUniqueName(t, "chk")
	ref, id1 := r.PushImage(t, "e2e/"+base, "latest", "v1")
	// The unit must run the registry's v1 as a pull gives it, not the local import pushed.
	r.mustPodman(t, "rmi", "--force", ref)
	r.mustPodman(t, "pull", "--quiet", ref)
	dir := filepath.Join(r.home, ".config", "containers", "systemd")
	for _, d := range []string{dir, dir + "/" + base + ".container.d"} {
		if err := r.mkdirOwned(d); err != nil && !os.IsExist(err) {
			t.Fatal(err)
		}
	}
	quadlet := filepath.Join(dir, base+".container")
	if err := os.WriteFile(quadlet, []byte("[Container]\nImage="+ref+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(quadlet); os.RemoveAll(quadlet + ".d") })
	unit := base + ".service"
	r.InstallUnit(t, unit, r.ContainerUnit(base, ref, "SourcePath="+quadlet))
	if _, err := r.Systemctl(t, "start", unit); err != nil {
		t.Fatal(err)
	}
	r.WaitFor(t, 60*time.Second, func() bool { return r.ContainerImage(t, base) == id1 }, unit+" to run v1")
	const interval = 5 * time.Second
	s := startE2EServer(t, "WEBHOOK_CHECK_INTERVAL_SECS=5", "WEBHOOK_MANUAL_TOKEN="+statusToken)
	state := func() (st, remote, errText string) {
		var running string
		if err := s.db.QueryRow(`SELECT remote_digest, running_digest, error FROM image_checks WHERE unit = ?`, unit).Scan(&remote, &running, &errText); err != nil {
			return "unchecked", "", err.Error()
		}
		c := registryCheck{Remote: remote, Running: running, Error: errText}
		return c.State().Class, remote, errText
	}
	r.WaitFor(t, checkFirstAfter+3*interval, func() bool { st, _, _ := state(); return st == "ok" }, unit+" checked up to date")
	_, id2 := r.PushImage(t, "e2e/"+base, "latest", "v2")
	pushed := time.Now()
	r.WaitFor(t, 3*interval, func() bool { st, _, _ := state(); return st == "update" }, "the check to see v2")
	t.Logf("v2 seen %s after the push (check interval %s)", time.Since(pushed).Round(time.Millisecond), interval)
	if page := e2eStatusPage(t, s); !strings.Contains(page, "update available since") {
		t.Fatalf("the page does not show the update:\n%s", page)
	}
	if st, _, errText := state(); errText != "" || st != "update" {
		t.Fatalf("check state %s, error %q", st, errText)
	}
	if err := os.WriteFile(quadlet+".d/deploy.conf", []byte("[Container]\nLabel=webhook-auto-update.on-update=deploy\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, remote, _ := state()
	delivery := hashID("check", unit, remote)
	rows := s.waitTask(t, r, delivery)
	if last := rows[len(rows)-1].step; last != "completed" {
		t.Fatalf("the check's redeploy ended %s: %s; log:\n%s", last, stepDetails(rows), s.log)
	}
	if got := r.ContainerImage(t, base); got != id2 {
		t.Errorf("%s runs %s after the check's redeploy, want v2 %s", unit, got, id2)
	}
	r.WaitFor(t, 3*interval, func() bool { st, _, _ := state(); return st == "ok" }, "the check to find v2 running")
	var claims int
	s.db.QueryRow(`SELECT count(*) FROM github_deliveries WHERE unit = ?`, unit).Scan(&claims)
	var durations []string
	scanRows(t, s.db, false, `SELECT duration_ms FROM event_log WHERE action = 'image-check'`, nil, func(rows *sql.Rows) error {
		var ms int64
		err := rows.Scan(&ms)
		durations = append(durations, fmt.Sprintf("%d ms", ms))
		return err
	})
	t.Logf("checks that changed the state took %s", strings.Join(durations, ", "))
	if claims != 1 {
		t.Errorf("%d claims for %s, want the check's one", claims, unit)
	}
}

// e2eStatusPage logs in to the e2e server's status page and returns the overview.
func e2eStatusPage(t *testing.T, s *e2eServer) string {
	t.Helper()
	c := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := c.PostForm(s.url+"/status/login", url.Values{"token": {statusToken}, "next": {"/status/"}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	req, _ := http.NewRequest("GET", s.url+"/status/", nil)
	for _, ck := range resp.Cookies() {
		req.AddCookie(ck)
	}
	if resp, err = c.Do(req); err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b strings.Builder
	_, err = io.Copy(&b, resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}
