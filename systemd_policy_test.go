package main

import (
	"context"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParsePolicy(t *testing.T) {
	l := func(kv ...string) map[string]string {
		m := map[string]string{}
		for i := 0; i+1 < len(kv); i += 2 {
			m["webhook-auto-update."+kv[i]] = kv[i+1]
		}
		return m
	}
	for _, tc := range []struct {
		name             string
		labels, defaults map[string]string
		want             policy
		err              string
	}{
		{"nothing", nil, nil, policy{}, ""},
		{"all three", l("cooldown", "15m", "window", "Sat,Sun *-*-* 02:00", "window-length", "3h", "approve", "true"), nil,
			policy{cooldown: 15 * time.Minute, window: "Sat,Sun *-*-* 02:00", length: 3 * time.Hour, approve: true}, ""},
		{"defaults for what the unit does not say", l("approve", "false"), map[string]string{"cooldown": "1m", "approve": "true"},
			policy{cooldown: time.Minute}, ""},
		{"the image check's", l("check", "6h", "on-update", "deploy"), nil, policy{check: 6 * time.Hour, deploy: true}, ""},
		{"no image check", l("check", "off", "on-update", "notify"), nil, policy{check: -1}, ""},
		{"check too often", l("check", "30s"), nil, policy{}, "at least 1m"},
		{"bad on-update", l("on-update", "yes"), nil, policy{}, "want notify or deploy"},
		{"bad cooldown", l("cooldown", "15 minutes"), nil, policy{}, "webhook-auto-update.cooldown"},
		{"negative cooldown", l("cooldown", "-1m"), nil, policy{}, "positive duration"},
		{"bad approve", l("approve", "sure"), nil, policy{}, "webhook-auto-update.approve"},
		{"window without length", l("window", "daily"), nil, policy{}, "window-length set"},
		{"length without window", l("window-length", "1h"), nil, policy{}, "without webhook-auto-update.window"},
		{"control character", l("window", "daily\n", "window-length", "1h"), nil, policy{}, "calendar event"},
		{"bad default", nil, map[string]string{"cooldown": "x"}, policy{}, "cooldown"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parsePolicy(tc.labels, tc.defaults)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one saying %q", err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

// FuzzParsePolicy: any labels give a policy whose window and length come together, or an error.
func FuzzParsePolicy(f *testing.F) {
	f.Add("15m", "Sat,Sun *-*-* 02:00", "3h", "true")
	f.Add("", "", "", "")
	f.Fuzz(func(t *testing.T, cooldown, window, length, approve string) {
		p, err := parsePolicy(map[string]string{"webhook-auto-update.cooldown": cooldown, "webhook-auto-update.window": window,
			"webhook-auto-update.window-length": length, "webhook-auto-update.approve": approve}, nil)
		if err != nil {
			return
		}
		if p.cooldown < 0 || (p.window == "") != (p.length == 0) || p.length < 0 || len(p.window) > 256 {
			t.Fatalf("accepted %+v", p)
		}
	})
}

// needAnalyze puts the real systemd-analyze on PATH behind the fakes, and returns its directory.
func needAnalyze(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("systemd-analyze")
	if err != nil {
		if rigRequired() {
			t.Fatal("systemd-analyze is not installed")
		}
		t.Skip("systemd-analyze is not installed")
	}
	t.Setenv("PATH", os.Getenv("PATH")+string(os.PathListSeparator)+filepath.Dir(bin))
	return filepath.Dir(bin)
}

func TestWindowOpens(t *testing.T) {
	needAnalyze(t)
	p := policy{window: "Sat *-*-* 02:00:00 UTC", length: 3 * time.Hour}
	sat := time.Date(2030, 1, 5, 0, 0, 0, 0, time.UTC) // a Saturday
	for _, tc := range []struct {
		now, want time.Time
	}{
		{sat.Add(time.Hour), sat.Add(2 * time.Hour)},                    // before it opens
		{sat.Add(2 * time.Hour), sat.Add(2 * time.Hour)},                // as it opens
		{sat.Add(4 * time.Hour), sat.Add(4 * time.Hour)},                // open: now
		{sat.Add(5 * time.Hour), sat.Add(7*24*time.Hour + 2*time.Hour)}, // closed: next week
	} {
		got, err := p.windowOpens(context.Background(), tc.now)
		if err != nil || !got.Equal(tc.want) {
			t.Errorf("at %s: opens %s, %v; want %s", tc.now, got, err, tc.want)
		}
	}
	for _, w := range []string{"bogus", "2020-01-01"} {
		if _, err := (policy{window: w, length: time.Hour}).windowOpens(context.Background(), sat); err == nil {
			t.Errorf("window %q accepted", w)
		}
	}
}

// policyRig is a dispatch rig whose units' Quadlet files are in a directory the test writes.
func policyRig(t *testing.T) (*dispatchRig, func(unit, labels string)) {
	bin := needAnalyze(t)
	d := newDispatchRig(t)
	t.Setenv("PATH", os.Getenv("PATH")+string(os.PathListSeparator)+bin)
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "containers", "systemd"), 0o700)
	d.srv.getenv = func(k string) string { return map[string]string{"XDG_CONFIG_HOME": dir}[k] }
	d.srv.units.ttl = 0
	return d, func(unit, labels string) {
		body := "[Container]\nImage=ghcr.io/o/a:v1\n" + labels + "\n"
		if err := os.WriteFile(filepath.Join(dir, "containers", "systemd", unit+".container"), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// claimStep is a claim's status/step and wait end.
func (d *dispatchRig) claimStep(t *testing.T, id string) (string, time.Time) {
	t.Helper()
	var st string
	var until int64
	if err := rawDB(t, d.cfg.dbPath).QueryRow(`SELECT status || '/' || step, next_attempt_at FROM github_deliveries
		WHERE delivery_id = ?`, id).Scan(&st, &until); err != nil {
		t.Fatal(err)
	}
	return st, time.UnixMilli(until)
}

func (d *dispatchRig) wantStep(t *testing.T, id, want string, until time.Time) {
	t.Helper()
	if st, u := d.claimStep(t, id); st != want || !until.IsZero() && !u.Equal(until) {
		t.Fatalf("%s is %s until %s, want %s until %s", id, st, u, want, until)
	}
}

// restart replaces the server by a new one over the same database, as a restart does: waits,
// approvals and their ends live only in the claims.
func (d *dispatchRig) restart() {
	old := d.srv
	d.srv = newServer(d.cfg, old.log, d.events)
	d.srv.now, d.srv.exec, d.srv.getenv, d.srv.units.ttl = old.now, old.exec, old.getenv, 0
	d.testServer.srv = d.srv
}

func (d *dispatchRig) decide(t *testing.T, id, decision string) int {
	t.Helper()
	n, err := d.events.decideClaim(context.Background(), id, decision, event{RequestID: newRequestID(), TS: d.now,
		Method: "CLI", Status: 200, Action: "decision", Meta: map[string]any{"decision": decision, "caller": "test"}})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestDispatcherPolicies drives the dispatcher's waits with a fake clock: a cooldown restarts on
// each push of the tag and one task covers them all; a window holds claims until it opens and a
// claim after it closed waits for the next; approval, rejection and expiry; a policy that became
// malformed fails the claim; each survives a restart of the server in the middle.
func TestDispatcherPolicies(t *testing.T) {
	const img = "ghcr.io/o/a:v1"
	d, unitFile := policyRig(t)
	d.now = time.Date(2030, 1, 5, 0, 0, 0, 0, time.UTC)
	t.Run("cooldown", func(t *testing.T) {
		unitFile("c", "Label=webhook-auto-update.cooldown=10m")
		d.claim(t, "c-1", "c.service", img)
		d.drain(t)
		c1, _ := d.claimStep(t, "c-1")
		d.now = d.now.Add(5 * time.Minute)
		d.claim(t, "c-2", "c.service", img)
		d.drain(t)
		quiet := d.now.Add(10*time.Minute + time.Duration(d.seq)*time.Millisecond)
		d.wantStep(t, "c-1", "pending/cooldown", quiet)
		d.wantStep(t, "c-2", "pending/cooldown", quiet)
		d.now = d.now.Add(6 * time.Minute) // 11 min after c-1, which alone would have run
		d.restart()
		d.drain(t)
		d.claim(t, "c-3", "c.service", img)
		d.drain(t)
		if len(d.runs) != 0 || c1 != "pending/cooldown" {
			t.Fatalf("ran %q during the cooldown (c-1 was %s)", d.runs, c1)
		}
		d.now = d.now.Add(10*time.Minute + time.Second) // quiet since c-3
		d.drain(t)
		if st := d.state(t); !slices.Equal(d.runs, []string{"c-1"}) || st["c-2"] != "dispatched/c-1" || st["c-3"] != "dispatched/c-1" {
			t.Fatalf("after the quiet time: runs %q, claims %v; want one task of c-1 covering c-2 and c-3", d.runs, st)
		}
		d.end(t, "c-1", false)
	})
	t.Run("window", func(t *testing.T) {
		unitFile("w", "Label=\"webhook-auto-update.window=Sat *-*-* 02:00:00 UTC\" webhook-auto-update.window-length=1h")
		d.now = time.Date(2030, 1, 5, 1, 0, 0, 0, time.UTC)
		d.claim(t, "w-1", "w.service", img)
		d.drain(t)
		d.wantStep(t, "w-1", "pending/window", time.Date(2030, 1, 5, 2, 0, 0, 0, time.UTC))
		d.restart()
		d.now = d.now.Add(90 * time.Minute)
		d.drain(t)
		d.wantStep(t, "w-1", "dispatched/", time.Time{})
		d.end(t, "w-1", false)
		d.now = d.now.Add(time.Hour) // closed at 03:00
		d.claim(t, "w-2", "w.service", img)
		d.drain(t)
		d.wantStep(t, "w-2", "pending/window", time.Date(2030, 1, 12, 2, 0, 0, 0, time.UTC))
		if n := slices.Index(d.runs, "w-2"); n >= 0 {
			t.Fatalf("w-2 ran with its window closed: %q", d.runs)
		}
	})
	t.Run("approval, rejection, expiry", func(t *testing.T) {
		unitFile("p", "Label=webhook-auto-update.approve=true")
		runs := len(d.runs)
		d.claim(t, "p-1", "p.service", img)
		d.claim(t, "r-1", "p.service", "ghcr.io/o/a:v2")
		d.drain(t)
		expires := d.now.Add(d.cfg.approvalTTL)
		d.wantStep(t, "p-1", "pending/awaiting-approval", time.Time{})
		d.claim(t, "p-2", "p.service", img)
		d.drain(t)
		d.restart()
		d.drain(t)
		if len(d.runs) != runs {
			t.Fatalf("ran %q before any approval", d.runs[runs:])
		}
		// One approval request is queued as a notification for each claim that entered the wait
		// (p-1 with r-1's other image is its own group, p-2 joined later), none for a restart.
		var asked []string
		rows, err := d.events.db.Query(`SELECT delivery_id FROM notify_outbox WHERE kind = 'approval' ORDER BY delivery_id`)
		for err == nil && rows.Next() {
			var id string
			rows.Scan(&id)
			asked = append(asked, id)
		}
		if err != nil || !slices.Equal(asked, []string{"p-1", "p-2", "r-1"}) {
			t.Errorf("approval notifications for %q (%v), want p-1, p-2 and r-1 once each", asked, err)
		}
		if n := d.decide(t, "r-1", "reject"); n != 1 {
			t.Fatalf("rejecting r-1 changed %d claims", n)
		}
		if n := d.decide(t, "p-2", "approve"); n != 2 {
			t.Fatalf("approving p-2 changed %d claims, want p-1 and p-2", n)
		}
		if n := d.decide(t, "p-2", "approve"); n != 0 {
			t.Fatalf("a second approval changed %d claims", n)
		}
		d.drain(t)
		if st := d.state(t); !slices.Equal(d.runs[runs:], []string{"p-1"}) || st["p-2"] != "dispatched/p-1" {
			t.Fatalf("after the approval: runs %q, claims %v", d.runs[runs:], st)
		}
		d.wantStep(t, "r-1", "done/rejected", time.Time{})
		d.end(t, "p-1", false)
		d.claim(t, "x-1", "p.service", img)
		d.drain(t)
		_, expires = d.claimStep(t, "x-1")
		d.now = expires.Add(-time.Second)
		d.drain(t)
		d.wantStep(t, "x-1", "pending/awaiting-approval", expires)
		d.now = expires
		d.drain(t)
		d.wantStep(t, "x-1", "done/expired", time.Time{})
		if len(d.runs) != runs+1 {
			t.Fatalf("rejected or expired claims ran: %q", d.runs[runs:])
		}
		var reasons []string
		for _, e := range d.deliveryRows(t, "p-2") {
			reasons = append(reasons, cmpOr(e.Meta["decision"], e.Meta["reason"]))
		}
		if want := []string{"queued", "awaiting-approval", "approve", "dispatching"}; !slices.Equal(reasons, want) {
			t.Errorf("rows of p-2: %q, want %q", reasons, want)
		}
	})
	t.Run("a policy that became malformed fails the claim; retry queues it again", func(t *testing.T) {
		unitFile("m", "")
		d.claim(t, "m-1", "m.service", img)
		unitFile("m", "Label=webhook-auto-update.cooldown=soon")
		d.drain(t)
		d.wantStep(t, "m-1", "failed/policy-invalid", time.Time{})
		unitFile("m", "")
		if n := d.decide(t, "m-1", "retry"); n != 1 {
			t.Fatalf("retry changed %d claims", n)
		}
		d.drain(t)
		d.wantStep(t, "m-1", "dispatched/", time.Time{})
	})
}

func cmpOr(v ...any) string {
	for _, x := range v {
		if s, _ := x.(string); s != "" {
			return s
		}
	}
	return ""
}

// TestPolicyOverHTTP: a malformed policy refuses the push with the reason; a held delivery is
// approved by the API (its wait shown there first) and by the page's form, never by a cross-site
// POST or a GET; with forward auth, the proxy's user from its address only.
func TestPolicyOverHTTP(t *testing.T) {
	bin := needAnalyze(t)
	s := newAdvServer(t, map[string]string{"WEBHOOK_MANUAL_TOKEN": statusToken})
	t.Setenv("PATH", os.Getenv("PATH")+string(os.PathListSeparator)+bin)
	home := t.TempDir()
	s.srv.getenv = mapEnv(map[string]string{"HOME": home})
	quadlet := func(labels string) {
		os.MkdirAll(filepath.Join(home, ".config", "containers", "systemd"), 0o700)
		os.WriteFile(filepath.Join(home, ".config", "containers", "systemd", "web.container"),
			[]byte("[Container]\nImage=ghcr.io/octo-org/web:v1\n"+labels+"\n"), 0o600)
	}
	push := func(id string) string {
		resp, body, err := s.postDelivery("web", id, githubPackagePayload("ghcr.io", "octo-org", "web", "v1", ""))
		if err != nil || resp.StatusCode != http.StatusAccepted {
			t.Fatalf("push %s: %v %v %s", id, resp, err, body)
		}
		s.drain(t)
		return body
	}
	api := func(method, path, body string, hdr ...string) (int, string) {
		req, _ := http.NewRequest(method, s.URL+path, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+statusToken)
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := s.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}

	quadlet(`Label="webhook-auto-update.window=not a calendar" webhook-auto-update.window-length=1h`)
	if body := push("bad-1"); !strings.Contains(body, "policy is malformed") || !strings.Contains(body, "not a calendar") {
		t.Errorf("a push to a unit with a malformed window: %q, want the refusal with the reason", body)
	}
	if st := deliveryStatuses(t, rawDB(t, s.cfg.dbPath), "bad-"); len(st) != 0 {
		t.Errorf("the refused push was claimed: %v", st)
	}
	cookie := statusLogin(t, s.testServer)

	quadlet("Label=webhook-auto-update.approve=true")
	push("ok-1")
	if code, body := api("GET", "/api/deliveries/ok-1", ""); code != 200 || !strings.Contains(body, `"wait":"awaiting-approval"`) {
		t.Fatalf("the held delivery's story: %d %s", code, body)
	}
	if n := len(s.h.callsOf(keySystemdRun)); n != 0 {
		t.Fatalf("%d tasks started before the approval", n)
	}
	if code, _ := api("POST", "/api/deliveries/ok-1/approve", `{"caller":"ci"}`, "Sec-Fetch-Site", "cross-site"); code != http.StatusForbidden {
		t.Errorf("a cross-site POST to the API answered %d, want 403", code)
	}
	resp, _ := statusDo(t, s.testServer, "POST", "/status/deliveries/ok-1/approve", cookie, url.Values{}, "Sec-Fetch-Site", "cross-site")
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("a cross-site POST of the page's form answered %d, want 403", resp.StatusCode)
	}
	if resp, _ = statusGet(t, s.testServer, "/status/deliveries/ok-1/approve", cookie); resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("a GET of the approval answered %d, want 405", resp.StatusCode)
	}
	if code, body := api("POST", "/api/deliveries/ok-1/approve", `{"caller":"ci","reason":"green"}`); code != 200 {
		t.Fatalf("approve by the API: %d %s", code, body)
	}
	s.drain(t)
	if n := len(s.h.callsOf(keySystemdRun)); n != 1 {
		t.Fatalf("%d tasks started after the approval, want 1", n)
	}
	s.settleQueue(t)

	push("ok-2")
	s.cfg.forwardAuthHeader, s.cfg.forwardAuthFrom = "Remote-User", []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	if resp, _ := statusGet(t, s.testServer, "/status/", cookie, "Remote-User", "mallory"); resp.StatusCode != http.StatusForbidden {
		t.Errorf("forward auth from an untrusted peer: page answered %d, want 403", resp.StatusCode)
	}
	if code, _ := api("POST", "/api/deliveries/ok-2/approve", `{}`); code != http.StatusForbidden {
		t.Errorf("forward auth from an untrusted peer, token or not: API answered %d, want 403", code)
	}
	s.cfg.forwardAuthFrom = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	resp, body := statusDo(t, s.testServer, "POST", "/status/deliveries/ok-2/reject", "", url.Values{"reason": {"not today"}},
		"Remote-User", "alice", "Sec-Fetch-Site", "same-origin")
	if resp.StatusCode != 200 || !strings.Contains(body, "reject: 1 deliveries") {
		t.Fatalf("reject on the page through the proxy: %d %s", resp.StatusCode, body)
	}
	var rows []string
	for _, e := range s.deliveryRows(t, "ok-2") {
		if e.Action == "decision" {
			rows = append(rows, e.Meta["caller"].(string)+": "+e.Meta["reason"].(string))
		}
	}
	if !slices.Equal(rows, []string{"alice: not today"}) {
		t.Errorf("decision rows of ok-2: %q, want alice's with her reason", rows)
	}
}
