// eventlog_notify_test.go tests notifications: each scheme's request rendered from one outcome
// (golden files under testdata/notify, go test -update rewrites them), the URL parser (table and
// fuzz), the settings' errors, the sender's retries, restarts and floods, and real receivers
// (adnanh/webhook verifying the signature, aiosmtpd receiving the mail).
package main

import (
	"bytes"
	"cmp"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"html"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const testNotifySecret = "notify-secret-xyz"

// notifyURLs are one URL per scheme, each secret part spelled SECRET… so a test can look for it.
var notifyURLs = map[string]string{
	"ntfy":          "ntfy://ops:SECRETpass@ntfy.example.com/deploys?priority=high&tags=warning",
	"gotify":        "gotify://gotify.example.com/ASECRETtoken123?priority=8",
	"slack":         "slack://hook:T0000000A-B0000000B-SECRETxxxxxxxxxxxxxxxxxxxx@webhook",
	"slack-path":    "slack://T0000000A/B0000000B/SECRETxxxxxxxxxxxxxxxxxxxx",
	"discord":       "discord://SECRETdiscordtoken@123456789012345678",
	"smtp":          "smtp://mailer:SECRETpw@mail.example.com:587/?from=wau@example.com&to=ops@example.com,dev@example.com",
	"generic-https": "generic+https://hooks.example.com/in/SECRETpath?team=ops",
}

func testNotice() notice {
	n := notice{ID: "0123456789abcdef0123456789abcdef", Kind: "rolled-back", Time: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC),
		Delivery: "d-42", Unit: "app.service", Image: "ghcr.io/acme/app:latest", Before: "sha256:aaaa", After: "sha256:aaaa",
		Failed: "sha256:bbbb", Digest: "sha256:cccc", Reason: "unit failed: exit-code", SincePushMS: 42_000}
	n.render("https://deploy.example.com/")
	return n
}

// renderRequest is what a target sends for n, as text: the request line, sorted headers and body;
// for mail the envelope and the message.
func renderRequest(t *testing.T, target notifyTarget, n notice) string {
	t.Helper()
	if target.mail != nil {
		m := target.mail
		return fmt.Sprintf("SMTP %s tls=%s auth=%v\nMAIL FROM:<%s>\nRCPT TO:<%s>\n\n%s", m.addr, m.tls, m.user != "", m.from,
			strings.Join(m.to, ">,<"), strings.ReplaceAll(string(m.message(n)), "\r\n", "\n"))
	}
	req, err := target.request(n, testNotifySecret)
	if err != nil {
		t.Fatal(err)
	}
	if u := req.URL.User; u != nil { // net/http's client sends a URL's user as Basic authorization
		pass, _ := u.Password()
		req.SetBasicAuth(u.Username(), pass)
		req.URL.User = nil
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s\n", req.Method, req.URL)
	for _, k := range slices.Sorted(func(yield func(string) bool) {
		for k := range req.Header {
			if !yield(k) {
				return
			}
		}
	}) {
		fmt.Fprintf(&b, "%s: %s\n", k, strings.Join(req.Header[k], ", "))
	}
	body, _ := io.ReadAll(req.Body)
	var pretty bytes.Buffer
	if json.Indent(&pretty, body, "", "  ") == nil {
		body = pretty.Bytes()
	}
	return b.String() + "\n" + string(body) + "\n"
}

// TestNotifyRequests renders one outcome as each scheme's request against its golden file; the
// generic one's signature is what adnanh/webhook checks, the others carry the scheme's fields.
func TestNotifyRequests(t *testing.T) {
	for name, raw := range notifyURLs {
		t.Run(name, func(t *testing.T) {
			target, err := parseNotifyURL(raw)
			if err != nil {
				t.Fatalf("parseNotifyURL: %v", err)
			}
			if strings.Contains(target.name, "SECRET") {
				t.Errorf("name %q holds a secret", target.name)
			}
			got := renderRequest(t, target, testNotice())
			path := filepath.Join("testdata", "notify", name+".txt")
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (go test -run TestNotifyRequests -update writes it)", err)
			}
			if got != string(want) {
				t.Errorf("%s request differs from %s:\n%s", name, path, got)
			}
		})
	}
	target, _ := parseNotifyURL(notifyURLs["generic-https"])
	req, _ := target.request(testNotice(), testNotifySecret)
	body, _ := io.ReadAll(req.Body)
	if err := verifySignature(testNotifySecret, body, req.Header.Get("X-Signature-256")); err != nil {
		t.Errorf("the generic body's signature does not verify: %v", err)
	}
}

func TestParseNotifyURL(t *testing.T) {
	for _, tc := range []struct{ raw, name, err string }{
		{raw: "ntfy://ntfy.sh/alerts?scheme=http", name: "ntfy://ntfy.sh/alerts"},
		{raw: "gotify://g.example/AbcdefghijklmNo?disabletls=yes", name: "gotify://g.example/…"},
		{raw: "generic://h.example/x?disabletls=yes", name: "generic+http://h.example/…"},
		{raw: "smtp://m.example:465/?from=a@b.c&to=d@e.f", name: "smtp://m.example:465/?to=d@e.f"},
		{raw: "ntfy://ntfy.sh/", err: "ntfy://…: want ntfy://"},
		{raw: "ntfy://:8080/topic", err: "ntfy://…: want ntfy://"}, // a port but no host
		{raw: "generic+https://:443/hook", err: "want generic+https://host"},
		{raw: "gotify://:80/Aaaaaaaaaaaaaaa", err: "want gotify://"},
		{raw: "ntfy://u:SECRET@ntfy.sh/t?priority=9", err: "ntfy://ntfy.sh/t: priority"},
		{raw: "ntfy://ntfy.sh/t?colour=red", err: "unsupported option colour"},
		{raw: "gotify://g.example/SECRETtooshort", err: "application token"},
		{raw: "gotify://g.example/sub/AbcdefghijklmNo", err: "application token"},
		{raw: "slack://xoxb:SECRET-123456789-123456789@channel", err: "incoming webhook"},
		{raw: "discord://SECRET@123/raw", err: "want discord://"},
		{raw: "smtp://u:SECRET@m.example/?to=x@y.z", err: "from=ADDRESS"},
		{raw: "smtp://m.example/?from=a@b.c&to=x@y.z&usestarttls=maybe", err: "usestarttls must be yes or no"},
		{raw: "smtp://m.example/?from=a@b.c&to=x@y.z&encryption=None", err: "unsupported option encryption"},
		{raw: "smtp://m.example/?from=a@b.c&to=x@y.z&auth=None", err: "unsupported option auth"},
		{raw: "ntfy://ntfy.sh/t?click=https://x.example&icon=https://x.example/i.png", err: "unsupported option click"},
		{raw: "slack://hook:T0000000A-B0000000B-SECRETxxxxxxxxxxxxxxxxxxxx@webhook?color=danger", err: "unsupported option color"},
		{raw: "slack://deploybot@T0000000A/B0000000B/SECRETxxxxxxxxxxxxxxxxxxxx", err: "botname are not supported"},
		{raw: "discord://SECRET@123?username=deploys", err: "unsupported option username"},
		{raw: "generic+https://h.example/p?method=PUT", err: "unsupported option method"},
		{raw: "generic+https://h.example/p?@Authorization=SECRET", err: "unsupported option @authorization"},
		{raw: "generic+https://u:SECRET@h.example/p?template=json", err: "unsupported option template"},
		{raw: "telegram://SECRET@telegram", err: "telegram://…: unknown scheme"},
		{raw: "not a url SECRET", err: "not a URL"},
		{raw: "ntfy:/u:SECRET@ntfy.sh/t://x", err: "?://…: not a URL"},
		{raw: "ntfy://%zzSECRET@ntfy.sh/t", err: "not a URL"},
	} {
		target, err := parseNotifyURL(tc.raw)
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%s: %v", tc.raw, err)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%s: error %v, want one with %q", tc.raw, err, tc.err)
		case err != nil && strings.Contains(strings.ToLower(err.Error()), "secret"):
			t.Errorf("%s: error %q holds the secret", tc.raw, err)
		case tc.name != "" && target.name != tc.name:
			t.Errorf("%s: name %q, want %q", tc.raw, target.name, tc.name)
		}
	}
	if got := splitNotifyURLs("ntfy://a/b, smtp://m/?from=a@b.c&to=x@y.z,w@v.u\ngeneric://h/p"); len(got) != 3 || !strings.HasSuffix(got[1], ",w@v.u") {
		t.Errorf("splitNotifyURLs: %q", got)
	}
}

// TestNtfyBasicAuth: an ntfy URL's user and password reach the server as Basic authorization
// (net/http sends a URL's user so), and the request line carries neither.
func TestNtfyBasicAuth(t *testing.T) {
	got := make(chan string, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user, pass, _ := r.BasicAuth()
		got <- user + ":" + pass + " " + r.RequestURI + " " + r.Header.Get("Title")
	}))
	defer srv.Close()
	target, err := parseNotifyURL("ntfy://ops:SECRETpass@" + srv.Listener.Addr().String() + "/deploys?scheme=http")
	if err != nil {
		t.Fatal(err)
	}
	if err := target.send(context.Background(), testNotice(), "", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if g := <-got; g != "ops:SECRETpass /deploys app.service: rolled back" {
		t.Errorf("ntfy received %q", g)
	}
}

// FuzzParseNotifyURL: the parser never panics, and neither a name nor an error carries the
// URL's password.
func FuzzParseNotifyURL(f *testing.F) {
	for _, raw := range notifyURLs {
		f.Add(raw)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		target, err := parseNotifyURL(raw)
		// The password is in the authority, which ends at the first "/", "?" or "#" (as url.Parse
		// reads it); an "@" after that is part of the path, and what precedes it no password.
		pass := ""
		if _, rest, ok := strings.Cut(raw, "://"); ok {
			auth := rest[:cmp.Or(strings.IndexAny(rest, "/?#")+1, len(rest)+1)-1]
			if j := strings.LastIndex(auth, "@"); j >= 0 {
				if _, p, ok := strings.Cut(auth[:j], ":"); ok && len(p) >= 6 {
					pass = p
				}
			}
		}
		if pass == "" {
			return
		}
		if err != nil && strings.Contains(err.Error(), pass) {
			t.Fatalf("error %q holds the password %q", err, pass)
		}
		if err == nil && strings.Contains(target.name, pass) {
			t.Fatalf("name %q holds the password %q", target.name, pass)
		}
	})
}

// TestNotifySettings: an unparseable URL, an unknown scheme or kind stops every command with exit 2,
// naming the entry without its secret.
func TestNotifySettings(t *testing.T) {
	for _, tc := range []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{"WEBHOOK_NOTIFY_URLS": "ntfy://ntfy.sh/ok,matrix://u:SECRET@m.example/room"}, "WEBHOOK_NOTIFY_URLS entry 2, matrix://…: unknown scheme"},
		{map[string]string{"WEBHOOK_NOTIFY_URLS": "generic+https://h.example/hunter2hunter"}, "entry 1, generic+https://h.example/…: a generic target needs WEBHOOK_NOTIFY_SECRET"},
		{map[string]string{"WEBHOOK_NOTIFY_ON": "rolled-back,sometimes"}, `"sometimes" is not healthy`},
		{map[string]string{"WEBHOOK_PUBLIC_URL": "deploy.example.com"}, "invalid WEBHOOK_PUBLIC_URL"},
	} {
		env := map[string]string{"WEBHOOK_STATE_DIR": t.TempDir()}
		for k, v := range tc.env {
			env[k] = v
		}
		var out, errb bytes.Buffer
		code := run([]string{"events"}, mapEnv(env), &out, &errb)
		if code != 2 || !strings.Contains(errb.String(), tc.want) || strings.Contains(errb.String(), "hunter2") {
			t.Errorf("%v: exit %d, stderr %q; want 2 and %q without the secret", tc.env, code, errb.String(), tc.want)
		}
	}
	if isSecretEnv("WEBHOOK_NOTIFY_URLS") == false || isSecretEnv("WEBHOOK_NOTIFY_SECRET") == false {
		t.Error("the notification URLs and secret would be passed to run-task's environment")
	}
}

// receiver is an HTTP target that answers down (503) while down is set and records each body.
type receiver struct {
	*httptest.Server
	down  atomic.Bool
	mu    sync.Mutex
	ids   []string
	calls atomic.Int64
}

func newReceiver(t *testing.T) *receiver {
	r := &receiver{}
	r.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.calls.Add(1)
		if r.down.Load() {
			http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
			return
		}
		var n notice
		body, _ := io.ReadAll(req.Body)
		if err := verifySignature(testNotifySecret, body, req.Header.Get("X-Signature-256")); err != nil || json.Unmarshal(body, &n) != nil {
			http.Error(w, "bad signature", http.StatusUnauthorized)
			return
		}
		r.mu.Lock()
		r.ids = append(r.ids, n.ID)
		r.mu.Unlock()
	}))
	t.Cleanup(r.Close)
	return r
}

// got is how many messages the receiver took, and whether one came twice.
func (r *receiver) got() (int, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	ids := slices.Clone(r.ids)
	sort.Strings(ids)
	return len(ids), len(slices.Compact(ids)) != len(ids)
}

func testNotifySettings(t *testing.T, urls ...string) *notifySettings {
	t.Helper()
	ns := &notifySettings{secret: testNotifySecret, on: map[string]bool{"rolled-back": true, "failed": true},
		timeout: 2 * time.Second, backoff: 5 * time.Millisecond, maxBackoff: 40 * time.Millisecond, horizon: time.Hour, poll: 5 * time.Millisecond}
	for _, raw := range urls {
		target, err := parseNotifyURL(raw)
		if err != nil {
			t.Fatal(err)
		}
		ns.targets = append(ns.targets, target)
	}
	return ns
}

// startNotifier runs the sender until the returned stop is called (or the test ends).
func startNotifier(t *testing.T, l *eventLog, ns *notifySettings) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); l.runNotifier(ctx, ns) }()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	return stop
}

// taskOutcome records a task's last step as run-task does, with its claim, so it queues one message.
func taskOutcome(t *testing.T, l *eventLog, delivery, step string) {
	t.Helper()
	ctx := context.Background()
	spec := taskSpec{unit: "app.service", image: "ghcr.io/acme/app:latest", event: "package", delivery: delivery, path: "/p", digest: "sha256:cccc"}
	if err := l.claimDispatching(ctx, spec); err != nil {
		t.Fatal(err)
	}
	ev := event{RequestID: "task-" + delivery, TS: time.Now(), Method: "TASK", Status: 500, Action: "github-task",
		Meta: map[string]any{"delivery": delivery, "unit": spec.unit, "image": spec.image, "step": step, "error": "unit failed",
			"image_id": "sha256:aaaa", "previous_image_id": "sha256:aaaa", "failed_image_id": "sha256:bbbb"}}
	if err := l.taskStep(ctx, taskUnitName(delivery), step, "unit failed", ev); err != nil {
		t.Fatal(err)
	}
	if err := l.settleTask(ctx, taskUnitName(delivery), claimDone, "", time.Time{}, nil); err != nil {
		t.Fatal(err)
	}
}

func outboxStates(t *testing.T, db *sql.DB) map[string]int {
	t.Helper()
	out := map[string]int{}
	rows, err := db.Query(`SELECT state, count(*) FROM notify_outbox GROUP BY 1`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		var s string
		var n int
		rows.Scan(&s, &n)
		out[s] = n
	}
	return out
}

// TestNotifierRetriesAndResends: a target that is down is retried with backoff until it takes the
// message; a restart of the sender resends only to the target that has not answered 2xx, so the
// one that did gets it once; the story lists the message per target and /metrics counts attempts.
func TestNotifierRetriesAndResends(t *testing.T) {
	logs := &syncBuffer{}
	l, db := openTestLogDB(t, logs)
	up, flaky := newReceiver(t), newReceiver(t)
	flaky.down.Store(true)
	ns := testNotifySettings(t, "generic+http://"+up.Listener.Addr().String()+"/a", "generic+http://"+flaky.Listener.Addr().String()+"/b")
	taskOutcome(t, l, "d-1", "rolled-back")
	taskOutcome(t, l, "d-ok", "up-to-date") // no message: not an outcome to tell
	stop := startNotifier(t, l, ns)
	waitFor(t, "the up target's message and retries of the down one", func() bool { n, _ := up.got(); return n == 1 && flaky.calls.Load() >= 3 })
	stop()
	if n, _ := flaky.got(); n != 0 {
		t.Fatalf("the down target took %d messages", n)
	}
	flaky.down.Store(false)
	startNotifier(t, l, ns)
	waitFor(t, "the outbox to be sent", func() bool { return outboxStates(t, db)["sent"] == 1 })
	if n, twice := up.got(); n != 1 || twice {
		t.Errorf("the target that answered 2xx got %d messages (twice: %v), want 1", n, twice)
	}
	if n, twice := flaky.got(); n != 1 || twice {
		t.Errorf("the recovered target got %d messages (twice: %v), want 1", n, twice)
	}
	notices, err := storyNotices(context.Background(), db, "d-1", time.UTC)
	if err != nil || len(notices) != 1 || notices[0].State != "sent" || len(notices[0].Targets) != 2 {
		t.Fatalf("story notices %+v, %v; want one sent message to two targets", notices, err)
	}
	for name, tg := range notices[0].Targets {
		if first := tg.Attempts == 1; first != strings.Contains(name, up.Listener.Addr().String()) || tg.State != "sent" {
			t.Errorf("story: target %s %+v; want the up one sent after 1 attempt, the other after several", name, tg)
		}
	}
	counts, err := notifyCounts(context.Background(), db)
	if err != nil || counts[[2]string{"generic+http", "sent"}] != 2 || counts[[2]string{"generic+http", "failed"}] < 2 {
		t.Errorf("notify counts %v, %v", counts, err)
	}
	var p strings.Builder
	(&promWriter{w: &p}).counters("webhook_notifications_total", "x", []string{"scheme", "result"}, counts)
	if !strings.Contains(p.String(), `webhook_notifications_total{scheme="generic+http",result="sent"} 2`) {
		t.Errorf("metrics:\n%s", p.String())
	}
}

// TestNotifyFlood: with every target down, a flood of outcomes is recorded without waiting for
// them; once the targets are back, every message reaches each target exactly once. Past the
// horizon, what could not be sent is given up and visible in the rows and the outbox.
func TestNotifyFlood(t *testing.T) {
	const flood = 300
	l, db := openTestLogDB(t, &syncBuffer{})
	a, b := newReceiver(t), newReceiver(t)
	a.down.Store(true)
	b.down.Store(true)
	ns := testNotifySettings(t, "generic+http://"+a.Listener.Addr().String()+"/", "generic+http://"+b.Listener.Addr().String()+"/")
	startNotifier(t, l, ns)
	start := time.Now()
	for i := range flood {
		taskOutcome(t, l, fmt.Sprintf("flood-%03d", i), "pull-failed")
	}
	t.Logf("%d outcomes recorded in %s with every target down (%d refused attempts meanwhile)", flood, time.Since(start), a.calls.Load()+b.calls.Load())
	a.down.Store(false)
	b.down.Store(false)
	waitFor(t, "every message sent", func() bool { return outboxStates(t, db)["sent"] == flood })
	for name, r := range map[string]*receiver{"a": a, "b": b} {
		if n, twice := r.got(); n != flood || twice {
			t.Errorf("target %s got %d messages (a duplicate: %v), want %d once each", name, n, twice, flood)
		}
	}

	dead := newReceiver(t)
	dead.down.Store(true)
	ns2 := testNotifySettings(t, "generic+http://"+dead.Listener.Addr().String()+"/")
	ns2.horizon = 100 * time.Millisecond
	l2, db2 := openTestLogDB(t, &syncBuffer{})
	startNotifier(t, l2, ns2)
	taskOutcome(t, l2, "late-1", "rolled-back")
	waitFor(t, "the message to be given up", func() bool { return outboxStates(t, db2)["failed"] == 1 })
	var result, errText string
	db2.QueryRow(`SELECT json_extract(meta, '$.result'), json_extract(meta, '$.error') FROM event_log WHERE action = 'notify' ORDER BY id DESC LIMIT 1`).Scan(&result, &errText)
	if result != "given-up" || !strings.Contains(errText, "503") {
		t.Errorf("last notify row: result %q error %q, want given-up with the 503", result, errText)
	}
}

// TestNotifyReceivers sends one outcome through real receivers nobody here wrote: adnanh/webhook
// runs its command only when X-Signature-256 verifies, and aiosmtpd receives the mail.
func TestNotifyReceivers(t *testing.T) {
	hookURL, hookOut := startHookReceiver(t)
	smtpAddr, mails := startSMTPReceiver(t)
	l, db := openTestLogDB(t, &syncBuffer{})
	ns := testNotifySettings(t, hookURL, "smtp://"+smtpAddr+"/?from=wau@example.com&to=ops@example.com&usestarttls=no")
	startNotifier(t, l, ns)
	taskOutcome(t, l, "real-1", "rolled-back")
	waitFor(t, "the message sent to both", func() bool { return outboxStates(t, db)["sent"] == 1 })
	waitFor(t, "the hook's command and the mail", func() bool {
		body, _ := os.ReadFile(hookOut)
		return strings.Contains(string(body), `"delivery":"real-1"`) && strings.Contains(mails.String(), "real-1")
	})
	if !strings.Contains(mails.String(), "Subject: app.service: rolled back") {
		t.Errorf("mail:\n%s", mails.String())
	}
	bad := testNotifySettings(t, hookURL)
	bad.secret = "another secret"
	err := bad.targets[0].send(context.Background(), testNotice(), bad.secret, time.Second)
	if err == nil || !strings.Contains(err.Error(), "500") {
		t.Errorf("a wrongly signed message: %v, want adnanh/webhook's 500", err)
	}
}

// startHookReceiver runs /usr/bin/webhook with a hook whose trigger rule checks our signature and
// whose command appends the body to a file; it returns the hook's generic URL and that file.
func startHookReceiver(t *testing.T) (string, string) {
	t.Helper()
	bin := needProgram(t, "/usr/bin/webhook")
	dir := t.TempDir()
	out, script := filepath.Join(dir, "bodies"), filepath.Join(dir, "record.sh")
	os.WriteFile(script, []byte("#!/bin/sh\nprintf '%s\\n' \"$1\" >>"+out+"\n"), 0o755)
	hooks := []map[string]any{{"id": "wau", "execute-command": script, "pass-arguments-to-command": []any{map[string]string{"source": "entire-payload"}},
		"trigger-rule": map[string]any{"match": map[string]any{"type": "payload-hmac-sha256", "secret": testNotifySecret,
			"parameter": map[string]string{"source": "header", "name": "X-Signature-256"}}}}}
	hooksFile := filepath.Join(dir, "hooks.json")
	data, _ := json.Marshal(hooks)
	os.WriteFile(hooksFile, data, 0o644)
	port := freePort(t)
	cmd := exec.Command(bin, "-hooks", hooksFile, "-ip", "127.0.0.1", "-port", port)
	startReceiverProcess(t, cmd, "127.0.0.1:"+port)
	return "generic+http://127.0.0.1:" + port + "/hooks/wau", out
}

// startSMTPReceiver runs Debian's aiosmtpd, which prints every message it receives.
func startSMTPReceiver(t *testing.T) (string, *syncBuffer) {
	t.Helper()
	py := needProgram(t, "/usr/bin/python3")
	if exec.Command(py, "-c", "import aiosmtpd").Run() != nil {
		rigSkipOrFail(t, "needs python3-aiosmtpd")
	}
	addr := "127.0.0.1:" + freePort(t)
	cmd := exec.Command(py, "-m", "aiosmtpd", "-n", "-l", addr)
	out := &syncBuffer{}
	cmd.Stdout = out
	startReceiverProcess(t, cmd, addr)
	return addr, out
}

func needProgram(t *testing.T, path string) string {
	t.Helper()
	if _, err := os.Stat(path); err != nil {
		rigSkipOrFail(t, "needs %s (.ci/run installs it)", path)
	}
	return path
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, port, _ := net.SplitHostPort(l.Addr().String())
	return port
}

// startReceiverProcess starts cmd, waits until addr accepts connections and stops it at cleanup.
func startReceiverProcess(t *testing.T, cmd *exec.Cmd, addr string) {
	t.Helper()
	var stderr syncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not listen on %s: %s", cmd.Path, addr, stderr.String())
		}
	}
}

// TestE2ENotifyRollback: on the rig, a delivery of a broken image is rolled back and the server
// sends exactly one message to each real receiver, adnanh/webhook (signature verified) and aiosmtpd.
func TestE2ENotifyRollback(t *testing.T) {
	r := needRig(t)
	hookURL, hookOut := startHookReceiver(t)
	smtpAddr, mails := startSMTPReceiver(t)
	s := startE2EServer(t, "WEBHOOK_NOTIFY_URLS="+hookURL+",smtp://"+smtpAddr+"/?from=wau@example.com&to=ops@example.com&usestarttls=no",
		"WEBHOOK_NOTIFY_SECRET="+testNotifySecret, "WEBHOOK_PUBLIC_URL=https://deploy.example.com")
	name := rigUniqueName(t, "notify")
	ref, good := r.PushImage(t, "e2e/"+name, "latest", "v1")
	unit, _ := e2eContainerUnit(t, r, ref, good)
	r.PushBrokenImage(t, "e2e/"+name, "latest")
	r.TagLocal(t, good, ref)
	if code, text := s.deliver(t, unit, "package", "notify-broken-1", githubPackagePayload(r.Registry(), "e2e", name, "latest", ""), s.secret); code != http.StatusAccepted {
		t.Fatalf("delivery: %d %q", code, text)
	}
	if rows := s.waitTask(t, r, "notify-broken-1"); rows[len(rows)-1].step != "rolled-back" {
		t.Fatalf("steps %s, want to end rolled-back; server log:\n%s", stepDetails(rows), s.log)
	}
	r.WaitFor(t, 60*time.Second, func() bool {
		var state string
		s.db.QueryRow(`SELECT state FROM notify_outbox WHERE delivery_id = 'notify-broken-1'`).Scan(&state)
		return state == "sent"
	}, "the rollback's message to be sent to both targets")
	bodies, _ := os.ReadFile(hookOut)
	if n := strings.Count(string(bodies), `"delivery":"notify-broken-1"`); n != 1 || !strings.Contains(string(bodies), `"kind":"rolled-back"`) {
		t.Errorf("adnanh/webhook ran its command for %d messages, want 1: %s", n, bodies)
	}
	if n := strings.Count(mails.String(), "Message-ID:"); n != 1 || !strings.Contains(mails.String(), "status/deliveries/notify-broken-1") {
		t.Errorf("aiosmtpd received %d mails, want 1:\n%s", n, mails.String())
	}
	t.Logf("webhook body: %s", bodies)
}

// TestStoryListsNotifications: a story's page lists its message and each target's state.
func TestStoryListsNotifications(t *testing.T) {
	l, db := openTestLogDB(t, &syncBuffer{})
	down := newReceiver(t)
	down.down.Store(true)
	taskOutcome(t, l, "story-1", "rolled-back")
	startNotifier(t, l, testNotifySettings(t, "generic+http://"+down.Listener.Addr().String()+"/"))
	waitFor(t, "a failed attempt", func() bool { return down.calls.Load() > 0 && len(outboxTargets(t, db)) > 0 })
	v, ok, err := deliveryStory(context.Background(), db, "story-1", time.Now(), time.UTC)
	if err != nil || !ok {
		t.Fatal(ok, err)
	}
	var b strings.Builder
	if err := statusTemplate.Execute(&b, statusView{Page: "story", Story: v}); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"<h2>Notifications</h2>", "rolled-back", "<code>generic+http://" + down.Listener.Addr().String() + "/…</code> failed after ", "answered 503"} {
		if !strings.Contains(html.UnescapeString(b.String()), want) {
			t.Errorf("story page lacks %q:\n%s", want, b.String())
		}
	}
}

func outboxTargets(t *testing.T, db *sql.DB) string {
	var s string
	db.QueryRow(`SELECT targets FROM notify_outbox`).Scan(&s)
	return strings.Trim(s, "{}")
}
