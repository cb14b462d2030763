// scheduler_test.go tests scheduler.go's triggers: the scheduler's fixed schedule (a fake clock),
// its command and SIGTERM, the manual API (/api/manual/*: auth, bad bodies, triggers, caller and
// reason, cleanText, the service view), /auto-update, trigger-units / trigger-all on the command
// line, request-row retention after each tick, and, on the rig, the same triggers against real
// units.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fakeSystemd is a fake systemctl alone on PATH.
type fakeSystemd struct{ log string }

// useFakeSystemctl puts the fake systemctl alone on PATH; failing units make it exit 1.
func useFakeSystemctl(t *testing.T, failing ...string) *fakeSystemd {
	t.Helper()
	t.Setenv("PATH", installFakes(t, "systemctl"))
	f := &fakeSystemd{log: filepath.Join(t.TempDir(), "systemctl.log")}
	t.Setenv(fakeSystemctlLogEnv, f.log)
	t.Setenv(fakeSystemctlFailEnv, strings.Join(failing, ","))
	return f
}

// calls returns the argv of every systemctl call so far, one string each.
func (f *fakeSystemd) calls(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(f.log)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

// The scheduler

// schedClock is a fake clock: ticks and sleeps advance it instead of waiting.
type schedClock struct{ now time.Time }

func TestSchedulerSchedule(t *testing.T) {
	const interval = 60 * time.Second
	s := func(n int) time.Duration { return time.Duration(n) * time.Second }
	ok := cmdResult{exitCode: 0}
	failed := cmdResult{exitCode: 1, stderr: "Job for x.service failed", err: errors.New("systemctl failed (exit 1)")}
	missing := cmdResult{exitCode: -1, err: errors.New("systemctl is not installed or not on PATH")}
	for _, tc := range []struct {
		name       string
		maxTicks   int
		durations  []time.Duration // how long each tick takes; the last repeats
		results    []cmdResult     // what each tick returns; the last repeats
		late       time.Duration   // every wait overshoots by this much (a busy machine)
		stopAt     int             // the stopAt-th wait is interrupted by a signal (0: never)
		stopInTick int             // the signal arrives during this tick (0: never)

		wantTicks  []time.Duration // when each tick began, from the start
		wantWaits  []time.Duration
		wantStatus []string
		wantSlots  []int64
		wantExit   int
	}{
		{name: "on schedule", maxTicks: 3, durations: []time.Duration{s(5)}, results: []cmdResult{ok},
			wantTicks: []time.Duration{0, s(60), s(120)}, wantWaits: []time.Duration{s(55), s(55)},
			wantStatus: []string{"ok", "ok", "ok"}, wantSlots: []int64{0, 1, 2}},
		{name: "late wake-ups do not accumulate", maxTicks: 4, durations: []time.Duration{s(5)}, results: []cmdResult{ok}, late: s(2),
			wantTicks: []time.Duration{0, s(62), s(122), s(182)}, wantWaits: []time.Duration{s(55), s(53), s(53)},
			wantStatus: []string{"ok", "ok", "ok", "ok"}, wantSlots: []int64{0, 1, 2, 3}},
		{name: "varying tick lengths do not drift", maxTicks: 4, durations: []time.Duration{s(1), s(17), s(59), s(3)}, results: []cmdResult{ok},
			wantTicks: []time.Duration{0, s(60), s(120), s(180)}, wantWaits: []time.Duration{s(59), s(43), s(1)},
			wantStatus: []string{"ok", "ok", "ok", "ok"}, wantSlots: []int64{0, 1, 2, 3}},
		{name: "an overrun skips the missed slots instead of bursting", maxTicks: 3, durations: []time.Duration{s(150), s(5)}, results: []cmdResult{ok},
			wantTicks: []time.Duration{0, s(180), s(240)}, wantWaits: []time.Duration{s(30), s(55)},
			wantStatus: []string{"ok", "ok", "ok"}, wantSlots: []int64{0, 3, 4}},
		{name: "a tick ending on the next slot does not skip it", maxTicks: 2, durations: []time.Duration{s(60), s(1)}, results: []cmdResult{ok},
			wantTicks: []time.Duration{0, s(60)}, wantWaits: []time.Duration{0},
			wantStatus: []string{"ok", "ok"}, wantSlots: []int64{0, 1}},
		{name: "a failed tick fails a bounded run", maxTicks: 3, durations: []time.Duration{s(1)}, results: []cmdResult{ok, failed, ok},
			wantTicks: []time.Duration{0, s(60), s(120)}, wantWaits: []time.Duration{s(59), s(59)},
			wantStatus: []string{"ok", "failed", "ok"}, wantSlots: []int64{0, 1, 2}, wantExit: 1},
		{name: "systemctl missing is an error", maxTicks: 1, durations: []time.Duration{0}, results: []cmdResult{missing},
			wantTicks: []time.Duration{0}, wantStatus: []string{"error"}, wantSlots: []int64{0}, wantExit: 1},
		{name: "a signal during a wait stops an unbounded run with 0", durations: []time.Duration{s(1)}, results: []cmdResult{failed, ok}, stopAt: 3,
			wantTicks: []time.Duration{0, s(60), s(120)}, wantWaits: []time.Duration{s(59), s(59), s(59)},
			wantStatus: []string{"failed", "ok", "ok"}, wantSlots: []int64{0, 1, 2}},
		{name: "a signal during a tick stops it with 0", maxTicks: 5, durations: []time.Duration{s(1)}, results: []cmdResult{ok}, stopInTick: 2,
			wantTicks: []time.Duration{0, s(60)}, wantWaits: []time.Duration{s(59)},
			wantStatus: []string{"ok", "interrupted"}, wantSlots: []int64{0, 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			start := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
			clock := &schedClock{now: start}
			var ticks, waits []time.Duration
			var rows []event
			pick := func(i int) (time.Duration, cmdResult) {
				d, r := tc.durations[min(i, len(tc.durations)-1)], tc.results[min(i, len(tc.results)-1)]
				return d, r
			}
			var logs syncBuffer
			sc := &scheduler{unit: "podman-auto-update.service", interval: interval, maxTicks: tc.maxTicks,
				log: newLogger(&logs), now: func() time.Time { return clock.now },
				tick: func(ctx context.Context) cmdResult {
					d, r := pick(len(ticks))
					ticks = append(ticks, clock.now.Sub(start))
					clock.now = clock.now.Add(d)
					if len(ticks) == tc.stopInTick {
						cancel()
						return cmdResult{exitCode: -1, err: context.Canceled}
					}
					return r
				},
				sleep: func(ctx context.Context, d time.Duration) error {
					waits = append(waits, d)
					if len(waits) == tc.stopAt {
						cancel()
						return ctx.Err()
					}
					clock.now = clock.now.Add(d + tc.late)
					return nil
				},
				record: func(ev event) { rows = append(rows, ev) },
			}
			if len(tc.wantTicks) > 20 || (tc.maxTicks == 0 && tc.stopAt == 0) {
				t.Fatal("an unbounded case needs stopAt")
			}
			exit := sc.run(ctx)
			if exit != tc.wantExit {
				t.Errorf("exit status %d, want %d", exit, tc.wantExit)
			}
			if !reflect.DeepEqual(ticks, tc.wantTicks) {
				t.Errorf("ticks at %v, want %v", ticks, tc.wantTicks)
			}
			if !reflect.DeepEqual(waits, tc.wantWaits) {
				t.Errorf("waits %v, want %v", waits, tc.wantWaits)
			}
			var statuses []string
			var slots []int64
			for i, ev := range rows {
				if ev.Action != "scheduler" || ev.Method != "SCHEDULER" || ev.Meta["iteration"] != i+1 || ev.Meta["unit"] != "podman-auto-update.service" {
					t.Errorf("row %d = %+v", i, ev)
				}
				statuses = append(statuses, ev.Meta["status"].(string))
				slots = append(slots, ev.Meta["slot"].(int64))
				if st := ev.Meta["status"]; st == "failed" && ev.Meta["stderr"] != "Job for x.service failed" {
					t.Errorf("row %d of a failed tick has no stderr: %v", i, ev.Meta)
				}
			}
			if !reflect.DeepEqual(statuses, tc.wantStatus) || !reflect.DeepEqual(slots, tc.wantSlots) {
				t.Errorf("rows: statuses %v slots %v, want %v %v", statuses, slots, tc.wantStatus, tc.wantSlots)
			}
		})
	}
}

// TestSchedulerCommand runs the scheduler subcommand in-process against the fake systemctl.
func TestSchedulerCommand(t *testing.T) {
	old := minSchedulerInterval
	minSchedulerInterval = time.Second
	t.Cleanup(func() { minSchedulerInterval = old })
	for _, tc := range []struct {
		name      string
		args      []string
		env       map[string]string
		failing   string
		wantExit  int
		wantCalls int
		wantRows  []string // row statuses
		wantLog   string
	}{
		{name: "two ticks", args: []string{"--interval", "1", "--max-iterations", "2"}, wantCalls: 2, wantRows: []string{"ok", "ok"}},
		{name: "env defaults", env: map[string]string{"AUTO_UPDATE_INTERVAL_SECS": "1", "WEBHOOK_SCHEDULER_MAX_TICKS": "2"},
			wantCalls: 2, wantRows: []string{"ok", "ok"}},
		{name: "flags override env", args: []string{"--max-iterations=1"}, env: map[string]string{"WEBHOOK_SCHEDULER_MAX_TICKS": "5"},
			wantCalls: 1, wantRows: []string{"ok"}},
		{name: "a failing unit fails a bounded run", args: []string{"--max-iterations", "1"}, failing: "podman-auto-update.service",
			wantExit: 1, wantCalls: 1, wantRows: []string{"failed"}, wantLog: "Job for podman-auto-update.service failed"},
		{name: "a short interval is raised", args: []string{"--interval", "1", "--max-iterations", "1"},
			env: map[string]string{"__min": "2"}, wantCalls: 1, wantRows: []string{"ok"}, wantLog: "interval 1s is below the minimum: using 2s"},
		{name: "custom unit", args: []string{"--max-iterations", "1"}, env: map[string]string{"MANUAL_AUTO_UPDATE_UNIT": "updater"},
			wantCalls: 1, wantRows: []string{"ok"}},
		{name: "zero interval", args: []string{"--interval", "0"}, wantExit: 2},
		{name: "negative iterations", args: []string{"--max-iterations", "-1"}, wantExit: 2},
		{name: "non-numeric interval", args: []string{"--interval", "soon"}, wantExit: 2},
		{name: "invalid env interval", env: map[string]string{"AUTO_UPDATE_INTERVAL_SECS": "0"}, wantExit: 2},
		{name: "invalid unit", env: map[string]string{"MANUAL_AUTO_UPDATE_UNIT": "-x"}, wantExit: 2},
		{name: "stray argument", args: []string{"now"}, wantExit: 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake := useFakeSystemctl(t, tc.failing)
			if m := tc.env["__min"]; m != "" {
				n, _ := strconv.Atoi(m)
				minSchedulerInterval = time.Duration(n) * time.Second
				defer func() { minSchedulerInterval = time.Second }()
			}
			state := t.TempDir()
			env := map[string]string{"WEBHOOK_STATE_DIR": state}
			for k, v := range tc.env {
				env[k] = v
			}
			var out, errb syncBuffer
			exit := run(append([]string{"scheduler"}, tc.args...), mapEnv(env), &out, &errb)
			if exit != tc.wantExit {
				t.Fatalf("exit %d, want %d; stderr:\n%s", exit, tc.wantExit, errb.String())
			}
			calls := fake.calls(t)
			if len(calls) != tc.wantCalls {
				t.Fatalf("systemctl calls %q, want %d", calls, tc.wantCalls)
			}
			unit := "podman-auto-update.service"
			if u := tc.env["MANUAL_AUTO_UPDATE_UNIT"]; u != "" && tc.wantExit == 0 {
				unit = u + ".service"
			}
			for _, c := range calls {
				if c != "--user start -- "+unit {
					t.Errorf("systemctl %s, want --user start -- %s", c, unit)
				}
			}
			if !strings.Contains(errb.String(), tc.wantLog) {
				t.Errorf("stderr lacks %q:\n%s", tc.wantLog, errb.String())
			}
			if tc.wantExit == 2 {
				return
			}
			rows := actionRows(t, filepath.Join(state, "data", "pod-upgrade-trigger.db"), "scheduler")
			var got []string
			for i, r := range rows {
				got = append(got, r.Meta["status"].(string))
				if r.Meta["iteration"] != float64(i+1) || r.Meta["unit"] != unit {
					t.Errorf("row %d meta %v", i, r.Meta)
				}
				if r.Meta["status"] == "failed" && !strings.Contains(r.Meta["stderr"].(string), "Job for") {
					t.Errorf("failed row without systemctl's stderr: %v", r.Meta)
				}
			}
			if !reflect.DeepEqual(got, tc.wantRows) {
				t.Errorf("rows %v, want %v", got, tc.wantRows)
			}
		})
	}
}

// TestSchedulerStopsOnSIGTERM runs the built binary with a 60 s interval and sends SIGTERM while
// it waits for the second tick: it must exit 0 at once (well before the interval), with its
// first tick recorded.
func TestSchedulerStopsOnSIGTERM(t *testing.T) {
	bin := buildBinary(t)
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			fake := useFakeSystemctl(t)
			state := t.TempDir()
			cmd := exec.Command(bin, "scheduler", "--interval", "60", "--state-dir", state)
			var stderr syncBuffer
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			t.Cleanup(func() { cmd.Process.Kill() })
			deadline := time.Now().Add(30 * time.Second)
			for !strings.Contains(stderr.String(), "iteration 1: started") {
				if time.Now().After(deadline) {
					t.Fatalf("no first tick within 30s; stderr:\n%s", stderr.String())
				}
				time.Sleep(20 * time.Millisecond)
			}
			if err := cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("scheduler after %s: %v; stderr:\n%s", sig, err, stderr.String())
				}
			case <-time.After(30 * time.Second):
				t.Fatalf("scheduler still running 30s after %s (interval 60s): it does not stop during a wait", sig)
			}
			if !strings.Contains(stderr.String(), "stopped after 1 iterations") {
				t.Errorf("stderr lacks the stop line:\n%s", stderr.String())
			}
			if calls := fake.calls(t); len(calls) != 1 {
				t.Errorf("systemctl calls %q, want one start", calls)
			}
			if rows := actionRows(t, filepath.Join(state, "data", "pod-upgrade-trigger.db"), "scheduler"); len(rows) != 1 || rows[0].Status != http.StatusAccepted {
				t.Errorf("scheduler rows %+v, want one with status 202", rows)
			}
		})
	}
}

// Manual triggers (HTTP and CLI) share the scheduler's start-the-unit path.

// manualHarness is an in-process server with the fake systemctl on PATH and a fake systemd-run
// (the server's exec) for the redeploy dispatch.
type manualHarness struct {
	srv        *server
	cfg        *config
	logs       *syncBuffer
	fake       *fakeSystemd
	dispatched [][]string
	dispatch   cmdResult
}

func newManualHarness(t *testing.T, env map[string]string, failing ...string) *manualHarness {
	t.Helper()
	h := &manualHarness{logs: &syncBuffer{}, fake: useFakeSystemctl(t, failing...)}
	cfg := testConfig(t, env)
	lg := newLogger(h.logs)
	events, err := openEventLog(cfg.dbPath, lg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { events.Close() })
	h.cfg, h.srv = cfg, newServer(cfg, lg, events)
	h.srv.exe = "/opt/bin/webhook-auto-update"
	h.srv.environ = func() []string { return []string{"PATH=/usr/bin", "WEBHOOK_TOKEN=x"} }
	h.srv.exec = func(ctx context.Context, timeout time.Duration, argv ...string) cmdResult {
		h.dispatched = append(h.dispatched, argv)
		return h.dispatch
	}
	return h
}

func (h *manualHarness) do(method, target, bearer, body string) *httptest.ResponseRecorder {
	req := httptest.NewRequest(method, target, strings.NewReader(body))
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	rec := httptest.NewRecorder()
	h.srv.ServeHTTP(rec, req)
	return rec
}

// rows flushes the event log and reads its rows.
func (h *manualHarness) rows(t *testing.T, action string) []actionRow {
	t.Helper()
	h.srv.events.Close()
	return actionRows(t, h.cfg.dbPath, action)
}

// everything returns all text the harness stored or logged, to look for leaked secrets.
func (h *manualHarness) everything(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, r := range h.rows(t, "") {
		m, _ := json.Marshal(r)
		b.Write(m)
	}
	b.WriteString(h.logs.String())
	return b.String()
}

const (
	testToken       = "s3cret-token-value"
	testManualToken = "m4nual-token-value"
)

// TestManualAuth: every manual route refuses a wrong or missing token with 401 before anything
// runs, accepts the right one as a Bearer header or where the original took it, and never
// stores or logs a token.
func TestManualAuth(t *testing.T) {
	both := map[string]string{"WEBHOOK_TOKEN": testToken, "WEBHOOK_MANUAL_TOKEN": testManualToken}
	shared := map[string]string{"WEBHOOK_TOKEN": testToken}
	for _, tc := range []struct {
		name   string
		env    map[string]string
		method string
		target string
		bearer string
		body   string
		want   int
	}{
		{"auto-update without token", both, "GET", "/auto-update", "", "", 401},
		{"auto-update wrong query token", both, "GET", "/auto-update?token=nope", "", "", 401},
		{"auto-update token prefix", both, "GET", "/auto-update?token=" + testToken[:5], "", "", 401},
		{"auto-update manual token is not its token", both, "POST", "/auto-update?token=" + testManualToken, "", "", 401},
		{"auto-update wrong bearer beats right query", both, "GET", "/auto-update?token=" + testToken, "nope", "", 401},
		{"auto-update query token", both, "GET", "/auto-update?token=" + testToken, "", "", 202},
		{"auto-update POST query token", both, "POST", "/auto-update?token=" + testToken, "", "", 202},
		{"auto-update bearer", both, "POST", "/auto-update", testToken, "", 202},
		{"auto-update unset token refuses everything", map[string]string{}, "GET", "/auto-update?token=", "", "", 401},
		{"auto-update unset token refuses a guess", map[string]string{}, "GET", "/auto-update?token=x", "", "", 401},
		{"trigger without token", both, "POST", "/api/manual/trigger", "", `{}`, 401},
		{"trigger wrong body token", both, "POST", "/api/manual/trigger", "", `{"token":"nope"}`, 401},
		{"trigger webhook token is not the manual token", both, "POST", "/api/manual/trigger", "", `{"token":"` + testToken + `"}`, 401},
		{"trigger body token", both, "POST", "/api/manual/trigger", "", `{"token":"` + testManualToken + `"}`, 202},
		{"trigger bearer", both, "POST", "/api/manual/trigger", testManualToken, `{"units":["a"]}`, 202},
		{"trigger bearer with empty body", both, "POST", "/api/manual/trigger", testManualToken, ``, 202},
		{"trigger wrong bearer beats right body", both, "POST", "/api/manual/trigger", "nope", `{"token":"` + testManualToken + `"}`, 401},
		{"trigger falls back to WEBHOOK_TOKEN", shared, "POST", "/api/manual/trigger", "", `{"token":"` + testToken + `"}`, 202},
		{"trigger unset tokens refuse everything", map[string]string{}, "POST", "/api/manual/trigger", "", `{"token":""}`, 401},
		{"service without token", both, "POST", "/api/manual/services/web", "", `{}`, 401},
		{"service wrong bearer", both, "POST", "/api/manual/services/web", "nope", `{}`, 401},
		{"service body token", both, "POST", "/api/manual/services/web", "", `{"token":"` + testManualToken + `"}`, 202},
		{"service bearer", both, "POST", "/api/manual/services/web", testManualToken, `{}`, 202},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newManualHarness(t, tc.env)
			rec := h.do(tc.method, tc.target, tc.bearer, tc.body)
			if rec.Code != tc.want {
				t.Fatalf("%s %s: %d %s, want %d", tc.method, tc.target, rec.Code, rec.Body, tc.want)
			}
			calls := h.fake.calls(t)
			if tc.want == 401 && (len(calls) > 0 || len(h.dispatched) > 0) {
				t.Errorf("refused request ran %q %q", calls, h.dispatched)
			}
			if tc.want == 202 && len(calls) == 0 {
				t.Errorf("accepted request ran nothing")
			}
			all := h.everything(t)
			for _, secret := range []string{testToken, testManualToken, testToken[:5] + "&", "nope"} {
				if strings.Contains(all, secret) {
					t.Errorf("%q reached an event row or a log line:\n%s", secret, all)
				}
			}
		})
	}
}

// TestManualTriggerBadBodies: bodies that are not exactly one JSON object of the documented
// fields are refused with 400 and run nothing.
func TestManualTriggerBadBodies(t *testing.T) {
	for _, tc := range []struct{ name, body, wantErr string }{
		{"malformed", `{"units": [`, "unexpected EOF"},
		{"not json", `units=a`, "invalid character"},
		{"units not a list", `{"units": "a"}`, "cannot unmarshal"},
		{"all not a bool", `{"all": "yes"}`, "cannot unmarshal"},
		{"dry_run a number", `{"dry_run": 1}`, "cannot unmarshal"},
		{"unit not a string", `{"units": [1]}`, "cannot unmarshal"},
		{"unknown field", `{"units": ["a"], "unit": "b"}`, `unknown field "unit"`},
		{"trailing garbage", `{"units": ["a"]} x`, "unexpected data after the JSON object"},
		{"two objects", `{"units": ["a"]}{"units": ["b"]}`, "unexpected data after the JSON object"},
		{"an array", `[{"units": ["a"]}]`, "cannot unmarshal array"},
		{"too many units", `{"units": [` + strings.Repeat(`"a",`, manualUnitsMax) + `"a"]}`, "at most"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newManualHarness(t, map[string]string{"WEBHOOK_TOKEN": testToken})
			rec := h.do("POST", "/api/manual/trigger", testToken, tc.body)
			var resp map[string]string
			json.Unmarshal(rec.Body.Bytes(), &resp)
			if rec.Code != 400 || !strings.Contains(resp["error"], tc.wantErr) {
				t.Errorf("%s: %d %s, want 400 with %q", tc.body, rec.Code, rec.Body, tc.wantErr)
			}
			if calls := h.fake.calls(t); len(calls) > 0 {
				t.Errorf("a refused body ran systemctl %q", calls)
			}
			if rows := h.rows(t, "manual-trigger"); len(rows) != 1 || rows[0].Status != 400 {
				t.Errorf("rows %+v, want one 400 row", rows)
			}
		})
		// The services route decodes the same way.
		t.Run("services/"+tc.name, func(t *testing.T) {
			if strings.Contains(tc.body, "units") && !strings.Contains(tc.body, "unit\"") && tc.wantErr != "at most" {
				return // a valid body there names different fields
			}
			h := newManualHarness(t, map[string]string{"WEBHOOK_TOKEN": testToken})
			if rec := h.do("POST", "/api/manual/services/web", testToken, tc.body); rec.Code != 400 {
				t.Errorf("%s: %d %s, want 400", tc.body, rec.Code, rec.Body)
			}
			if calls := h.fake.calls(t); len(calls) > 0 || len(h.dispatched) > 0 {
				t.Errorf("a refused body ran %q %q", calls, h.dispatched)
			}
		})
	}
}

// TestManualTrigger checks unit resolution, de-duplication, start versus restart, failure
// reporting and the status codes of POST /api/manual/trigger.
func TestManualTrigger(t *testing.T) {
	type unitStatus struct{ Unit, Status string }
	for _, tc := range []struct {
		name      string
		env       map[string]string
		noPath    bool // systemctl is not on PATH
		failing   []string
		body      string
		want      int
		wantUnits []unitStatus
		wantCalls []string
		wantMsg   map[string]string // unit → part of its message
	}{
		{name: "spellings resolve and collapse", body: `{"units":["a","b.service","a/redeploy","github-package-update/b","/a"]}`, want: 202,
			wantUnits: []unitStatus{{"a.service", "triggered"}, {"b.service", "triggered"}},
			wantCalls: []string{"--user restart -- a.service", "--user restart -- b.service"}},
		{name: "no units means all", env: map[string]string{"WEBHOOK_MANUAL_UNITS": "x, y.service\nx"}, body: `{}`, want: 202,
			wantUnits: []unitStatus{{"podman-auto-update.service", "triggered"}, {"x.service", "triggered"}, {"y.service", "triggered"}},
			wantCalls: []string{"--user start -- podman-auto-update.service", "--user restart -- x.service", "--user restart -- y.service"}},
		{name: "all adds the configured units to the named ones", env: map[string]string{"WEBHOOK_MANUAL_UNITS": "x", "MANUAL_AUTO_UPDATE_UNIT": "upd"},
			body: `{"all":true,"units":["z","x"]}`, want: 202,
			wantUnits: []unitStatus{{"upd.service", "triggered"}, {"x.service", "triggered"}, {"z.service", "triggered"}},
			wantCalls: []string{"--user start -- upd.service", "--user restart -- x.service", "--user restart -- z.service"}},
		{name: "the auto-update unit named explicitly is started", body: `{"units":["podman-auto-update"]}`, want: 202,
			wantUnits: []unitStatus{{"podman-auto-update.service", "triggered"}},
			wantCalls: []string{"--user start -- podman-auto-update.service"}},
		{name: "invalid units are reported and never run", body: `{"units":["ok","../etc/passwd","-rf","a b","","x@.service","*"]}`, want: 207,
			wantUnits: []unitStatus{{"ok.service", "triggered"}, {"../etc/passwd", "invalid"}, {"-rf", "invalid"}, {"a b", "invalid"},
				{"", "invalid"}, {"x@.service", "invalid"}, {"*", "invalid"}},
			wantCalls: []string{"--user restart -- ok.service"}},
		{name: "no valid unit is 400", body: `{"units":["-x","a/b"]}`, want: 400,
			wantUnits: []unitStatus{{"-x", "invalid"}, {"a/b", "invalid"}}},
		{name: "a failing unit does not stop the others", failing: []string{"bad.service"}, body: `{"units":["good","bad","after"]}`, want: 207,
			wantUnits: []unitStatus{{"good.service", "triggered"}, {"bad.service", "failed"}, {"after.service", "triggered"}},
			wantCalls: []string{"--user restart -- good.service", "--user restart -- bad.service", "--user restart -- after.service"},
			wantMsg:   map[string]string{"bad.service": "(exit 1): Job for bad.service failed because the control process exited"}},
		{name: "dry run runs nothing", body: `{"units":["a"],"all":true,"dry_run":true}`, want: 202,
			wantUnits: []unitStatus{{"podman-auto-update.service", "dry-run"}, {"a.service", "dry-run"}},
			wantMsg:   map[string]string{"podman-auto-update.service": "would start", "a.service": "would restart"}},
		{name: "systemctl missing is an error", noPath: true, body: `{"units":["a"]}`, want: 207,
			wantUnits: []unitStatus{{"a.service", "error"}},
			wantMsg:   map[string]string{"a.service": "systemctl is not installed or not on PATH"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := map[string]string{"WEBHOOK_TOKEN": testToken}
			for k, v := range tc.env {
				env[k] = v
			}
			h := newManualHarness(t, env, tc.failing...)
			if tc.noPath {
				t.Setenv("PATH", t.TempDir())
			}
			rec := h.do("POST", "/api/manual/trigger", testToken, tc.body)
			if rec.Code != tc.want {
				t.Fatalf("%d %s, want %d", rec.Code, rec.Body, tc.want)
			}
			if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q", ct)
			}
			var resp manualTriggerResponse
			if err := json.Unmarshal(rec.Body.Bytes(), &resp); err != nil {
				t.Fatal(err)
			}
			var got []unitStatus
			for _, r := range resp.Triggered {
				got = append(got, unitStatus{r.Unit, r.Status})
				if want, ok := tc.wantMsg[r.Unit]; ok && !strings.Contains(r.Message, want) {
					t.Errorf("%s message %q lacks %q", r.Unit, r.Message, want)
				}
			}
			if !reflect.DeepEqual(got, tc.wantUnits) {
				t.Errorf("units %v, want %v", got, tc.wantUnits)
			}
			if calls := h.fake.calls(t); !reflect.DeepEqual(calls, tc.wantCalls) {
				t.Errorf("systemctl calls %q, want %q", calls, tc.wantCalls)
			}
			rows := h.rows(t, "manual-trigger")
			if len(rows) != 1 || rows[0].Status != tc.want || rows[0].Method != "POST" || rows[0].Path != "/api/manual/trigger" {
				t.Fatalf("rows %+v", rows)
			}
			if units, _ := rows[0].Meta["units"].([]any); len(units) != len(tc.wantUnits) {
				t.Errorf("row units %v, want %d entries", rows[0].Meta["units"], len(tc.wantUnits))
			}
		})
	}
}

// TestManualTriggerCallerAndReason: caller and reason are echoed and stored without control
// characters and capped in length.
func TestManualTriggerCallerAndReason(t *testing.T) {
	h := newManualHarness(t, map[string]string{"WEBHOOK_TOKEN": testToken})
	long := strings.Repeat("é", 500)
	body, _ := json.Marshal(map[string]any{"units": []string{"a"}, "caller": "ci\n\x1b[31mbot\u2028", "reason": long, "dry_run": true})
	rec := h.do("POST", "/api/manual/trigger", testToken, string(body))
	var resp manualTriggerResponse
	if err := json.Unmarshal(rec.Body.Bytes(), &resp); err != nil || rec.Code != 202 {
		t.Fatalf("%d %s %v", rec.Code, rec.Body, err)
	}
	if resp.Caller != "ci[31mbot" || resp.Reason != strings.Repeat("é", manualTextMax) || !resp.DryRun {
		t.Errorf("response caller %q reason of %d runes dry_run %v", resp.Caller, len([]rune(resp.Reason)), resp.DryRun)
	}
	rows := h.rows(t, "manual-trigger")
	if len(rows) != 1 || rows[0].Meta["caller"] != "ci[31mbot" || rows[0].Meta["reason"] != resp.Reason || rows[0].Meta["dry_run"] != true {
		t.Errorf("row meta %v", rows[0].Meta)
	}
}

func TestCleanText(t *testing.T) {
	for _, tc := range []struct {
		in   string
		max  int
		want string
	}{
		{"plain", 10, "plain"},
		{"  spaced  ", 10, "spaced"},
		{"a\nb\rc\td\x00e\x7ff\u0085g", 20, "abcdefg"},
		{"abcdef", 3, "abc"},
		{"ééé", 2, "éé"},
		{"bad\xffutf8", 20, "bad\uFFFDutf8"},
		{"", 5, ""},
	} {
		if got := cleanText(tc.in, tc.max); got != tc.want {
			t.Errorf("cleanText(%q, %d) = %q, want %q", tc.in, tc.max, got, tc.want)
		}
	}
}

// TestManualService checks POST /api/manual/services/<name>: a restart without an image, the
// run-task dispatch with one, dry runs and validation.
func TestManualService(t *testing.T) {
	const image = "ghcr.io/owner/app:1.2"
	for _, tc := range []struct {
		name         string
		target       string
		body         string
		failing      []string
		dispatchFail bool
		lockHeld     bool // a redeploy of web.service holds its unit lock
		want         int
		wantStatus   string
		wantCalls    []string
		wantDispatch bool
		wantForce    bool
		wantPlan     string // a substring of the dry run's plan
	}{
		{name: "restart", target: "/api/manual/services/web", body: `{"caller":"ops"}`, want: 202, wantStatus: "triggered",
			wantCalls: []string{"--user restart -- web.service"}},
		{name: "restart by full name", target: "/api/manual/services/web.service", body: `{}`, want: 202, wantStatus: "triggered",
			wantCalls: []string{"--user restart -- web.service"}},
		{name: "failing restart", target: "/api/manual/services/web", body: `{}`, failing: []string{"web.service"}, want: 500,
			wantStatus: "failed", wantCalls: []string{"--user restart -- web.service"}},
		{name: "dry run", target: "/api/manual/services/web", body: `{"dry_run":true}`, want: 202, wantStatus: "dry-run"},
		// A restart in the middle of a redeploy could fail its health gate and roll it back.
		{name: "restart while a redeploy runs", target: "/api/manual/services/web", body: `{}`, lockHeld: true, want: 409,
			wantStatus: "error"},
		{name: "image dispatches run-task", target: "/api/manual/services/web", body: `{"image":"` + image + `"}`, want: 202,
			wantStatus: "queued", wantDispatch: true},
		{name: "force reaches run-task", target: "/api/manual/services/web", body: `{"image":"` + image + `","force":true}`, want: 202,
			wantStatus: "queued", wantDispatch: true, wantForce: true},
		// A dry run only reads, for its plan: here the unit names no Image= and runs no container,
		// so the plan is the task's refusal.
		{name: "image dry run dispatches nothing", target: "/api/manual/services/web", body: `{"image":"` + image + `","dry_run":true}`,
			want: 202, wantStatus: "dry-run", wantCalls: []string{"--user show -p LoadState -p SourcePath -p ActiveState -p SubState -p Result -p NRestarts -p ExecMainStatus -p ExecMainCode -- web.service"},
			wantPlan: "refuse (image-unknown), pulling and restarting nothing"},
		{name: "dispatch failure", target: "/api/manual/services/web", body: `{"image":"` + image + `"}`, dispatchFail: true,
			want: 500, wantStatus: "error", wantDispatch: true},
		{name: "invalid image", target: "/api/manual/services/web", body: `{"image":"app:latest"}`, want: 400},
		{name: "image with a flag", target: "/api/manual/services/web", body: `{"image":"--privileged"}`, want: 400},
		{name: "invalid name", target: "/api/manual/services/a%20b", body: `{}`, want: 400},
		{name: "leading dash name", target: "/api/manual/services/-h", body: `{}`, want: 400},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newManualHarness(t, map[string]string{"WEBHOOK_TOKEN": testToken}, tc.failing...)
			if tc.dispatchFail {
				h.dispatch = cmdResult{exitCode: 1, stderr: "Unit webhook-task-x already exists", err: errors.New("systemd-run failed (exit 1)")}
			}
			if tc.lockHeld {
				lock, err := lockFile(context.Background(), unitLockPath(h.cfg.stateDir, "web.service"), time.Second)
				if err != nil {
					t.Fatal(err)
				}
				defer lock.Unlock()
			}
			rec := h.do("POST", tc.target, testToken, tc.body)
			if rec.Code != tc.want {
				t.Fatalf("%d %s, want %d", rec.Code, rec.Body, tc.want)
			}
			var resp manualServiceResponse
			json.Unmarshal(rec.Body.Bytes(), &resp)
			if tc.want != 400 && resp.Status != tc.wantStatus {
				t.Errorf("status %q, want %q (%s)", resp.Status, tc.wantStatus, rec.Body)
			}
			if tc.lockHeld && !strings.Contains(resp.Message, "web.service is busy (a redeploy or another restart holds its lock)") {
				t.Errorf("message %q does not say the unit is busy", resp.Message)
			}
			if wantPlan := resp.DryRun && resp.Image != ""; wantPlan != (len(resp.Plan) > 0) {
				t.Errorf("plan %q for dry_run=%v image=%q", resp.Plan, resp.DryRun, resp.Image)
			}
			if !strings.Contains(strings.Join(resp.Plan, "\n"), tc.wantPlan) {
				t.Errorf("plan %q does not say %q", resp.Plan, tc.wantPlan)
			}
			calls := h.fake.calls(t)
			if tc.dispatchFail {
				// After a failed systemd-run the handler checks (read-only) whether the task unit
				// started anyway.
				if len(calls) != 1 || !strings.HasPrefix(calls[0], "--user show -p LoadState -p ActiveState -- webhook-task-manual-") {
					t.Errorf("systemctl calls %q, want one read of the task unit's state", calls)
				}
				calls = nil
			}
			if !reflect.DeepEqual(calls, tc.wantCalls) {
				t.Errorf("systemctl calls %q, want %q", calls, tc.wantCalls)
			}
			if got := len(h.dispatched) > 0; got != tc.wantDispatch {
				t.Fatalf("dispatched %q, want dispatch %v", h.dispatched, tc.wantDispatch)
			}
			rows := h.rows(t, "manual-service")
			if len(rows) != 1 || rows[0].Status != tc.want {
				t.Fatalf("rows %+v", rows)
			}
			if !tc.wantDispatch {
				return
			}
			argv := strings.Join(h.dispatched[0], " ")
			delivery := strings.TrimPrefix(resp.TaskUnit, "webhook-task-")
			if !strings.HasPrefix(delivery, "manual-") {
				t.Errorf("task unit %q is not webhook-task-manual-…", resp.TaskUnit)
			}
			wantTail := " -- web.service " + image + " manual " + delivery + " /api/manual/services/web"
			if !strings.HasPrefix(argv, "systemd-run --user ") || !strings.Contains(argv, "--unit="+resp.TaskUnit) ||
				!strings.Contains(argv, "/opt/bin/webhook-auto-update run-task ") || !strings.HasSuffix(argv, wantTail) {
				t.Errorf("dispatch argv %q, want systemd-run … run-task …%s", argv, wantTail)
			}
			if strings.Contains(argv, "--force") != tc.wantForce {
				t.Errorf("dispatch argv %q: --force present %v, want %v", argv, !tc.wantForce, tc.wantForce)
			}
			if strings.Contains(argv, "WEBHOOK_TOKEN") {
				t.Errorf("dispatch passes the token along: %q", argv)
			}
			if rows[0].Meta["task_unit"] != resp.TaskUnit || rows[0].Meta["image"] != image {
				t.Errorf("row meta %v", rows[0].Meta)
			}
		})
	}
}

// TestAutoUpdate checks /auto-update after the token: the two-window limit with Retry-After,
// a held limiter lock, a failing unit, the methods, and that the query token is redacted.
func TestAutoUpdate(t *testing.T) {
	t.Run("limit", func(t *testing.T) {
		h := newManualHarness(t, map[string]string{"WEBHOOK_TOKEN": testToken, "WEBHOOK_LIMIT1_COUNT": "2", "WEBHOOK_LIMIT2_COUNT": "3"})
		var codes []int
		var retry []string
		for i := 0; i < 4; i++ {
			rec := h.do("GET", "/auto-update?token="+testToken, "", "")
			codes, retry = append(codes, rec.Code), append(retry, rec.Header().Get("Retry-After"))
		}
		if !reflect.DeepEqual(codes, []int{202, 202, 429, 429}) {
			t.Fatalf("codes %v, want 202 202 429 429", codes)
		}
		for _, r := range retry[2:] {
			if n, err := strconv.Atoi(r); err != nil || n < 590 || n > 600 {
				t.Errorf("Retry-After %q, want about 600 (the short window)", r)
			}
		}
		if calls := h.fake.calls(t); !reflect.DeepEqual(calls, []string{"--user start -- podman-auto-update.service", "--user start -- podman-auto-update.service"}) {
			t.Errorf("systemctl calls %q", calls)
		}
		if ts, _, _ := readTimestamps(filepath.Join(h.cfg.stateDir, "ratelimit.db")); len(ts) != 2 {
			t.Errorf("ratelimit.db holds %d timestamps, want 2", len(ts))
		}
		rows := h.rows(t, "auto-update")
		if len(rows) != 4 || rows[2].Meta["reason"] != "rate-limited" {
			t.Fatalf("rows %+v", rows)
		}
		for _, r := range rows {
			if r.Meta["query"] != "token=REDACTED" {
				t.Errorf("row query %v, want token=REDACTED", r.Meta["query"])
			}
		}
	})
	t.Run("lock held", func(t *testing.T) {
		h := newManualHarness(t, map[string]string{"WEBHOOK_TOKEN": testToken})
		holdFlock(t, filepath.Join(h.cfg.stateDir, "ratelimit.lock"))
		rec := h.do("POST", "/auto-update", testToken, "")
		if rec.Code != 429 || rec.Header().Get("Retry-After") == "" {
			t.Errorf("%d Retry-After %q, want 429 with Retry-After", rec.Code, rec.Header().Get("Retry-After"))
		}
		if calls := h.fake.calls(t); len(calls) > 0 {
			t.Errorf("ran %q without the limiter lock", calls)
		}
	})
	t.Run("unit fails", func(t *testing.T) {
		h := newManualHarness(t, map[string]string{"WEBHOOK_TOKEN": testToken, "MANUAL_AUTO_UPDATE_UNIT": "upd.service"}, "upd.service")
		rec := h.do("GET", "/auto-update?token="+testToken, "", "")
		if rec.Code != 500 || !strings.Contains(rec.Body.String(), "Job for upd.service failed") {
			t.Errorf("%d %s, want 500 with systemctl's error", rec.Code, rec.Body)
		}
		rows := h.rows(t, "auto-update")
		if len(rows) != 1 || !strings.Contains(fmt.Sprint(rows[0].Meta["stderr"]), "Job for upd.service failed") || rows[0].Meta["exit_code"] != float64(1) {
			t.Errorf("row %+v", rows)
		}
	})
	t.Run("methods", func(t *testing.T) {
		h := newManualHarness(t, map[string]string{"WEBHOOK_TOKEN": testToken})
		for _, m := range []string{"HEAD", "PUT", "DELETE"} {
			rec := h.do(m, "/auto-update?token="+testToken, "", "")
			if rec.Code != 405 || rec.Header().Get("Allow") == "" {
				t.Errorf("%s: %d Allow %q, want 405 with Allow", m, rec.Code, rec.Header().Get("Allow"))
			}
		}
		for _, target := range []string{"/api/manual/trigger", "/api/manual/services/web"} {
			if rec := h.do("GET", target, testToken, ""); rec.Code != 405 {
				t.Errorf("GET %s: %d, want 405", target, rec.Code)
			}
		}
		if calls := h.fake.calls(t); len(calls) > 0 {
			t.Errorf("ran %q", calls)
		}
	})
}

// TestTriggerCommands runs trigger-units and trigger-all in-process against the fake systemctl.
func TestTriggerCommands(t *testing.T) {
	for _, tc := range []struct {
		name      string
		args      []string
		env       map[string]string
		failing   []string
		noPath    bool
		badDB     bool
		locked    string // a unit whose redeploy holds its unit lock
		want      int
		wantOut   string
		wantCalls []string
		wantErr   string
	}{
		{name: "units", args: []string{"trigger-units", "a", "b.service", "--caller", "ci", "--reason", "deploy"}, want: 0,
			wantOut:   "a.service -> triggered\nb.service -> triggered\n",
			wantCalls: []string{"--user restart -- a.service", "--user restart -- b.service"}},
		{name: "--units and positionals collapse", args: []string{"trigger-units", "--units", "a,b", "c", "--units=a/redeploy"}, want: 0,
			wantOut:   "c.service -> triggered\na.service -> triggered\nb.service -> triggered\n",
			wantCalls: []string{"--user restart -- c.service", "--user restart -- a.service", "--user restart -- b.service"}},
		{name: "--all", args: []string{"trigger-units", "--all", "c"}, env: map[string]string{"WEBHOOK_MANUAL_UNITS": "m"}, want: 0,
			wantOut:   "podman-auto-update.service -> triggered\nm.service -> triggered\nc.service -> triggered\n",
			wantCalls: []string{"--user start -- podman-auto-update.service", "--user restart -- m.service", "--user restart -- c.service"}},
		{name: "a failing unit", args: []string{"trigger-units", "a", "bad", "c"}, failing: []string{"bad.service"}, want: 1,
			wantOut: "a.service -> triggered\nbad.service -> failed\n    systemctl --user restart -- bad.service failed (exit 1): Job for bad.service failed because the control process exited with error code.\n" +
				"    See \"systemctl --user status bad.service\" for details.\nc.service -> triggered\n",
			wantCalls: []string{"--user restart -- a.service", "--user restart -- bad.service", "--user restart -- c.service"}},
		{name: "an invalid unit among valid ones", args: []string{"trigger-units", "a", "x y"}, want: 1,
			wantOut:   "a.service -> triggered\nx y -> invalid\n    invalid unit name \"x y.service\": want letters, digits and :_.@- ending in .service\n",
			wantCalls: []string{"--user restart -- a.service"}},
		{name: "only invalid units", args: []string{"trigger-units", "--", "-x"}, want: 2,
			wantOut: "-x -> invalid\n    invalid unit name \"-x.service\": want letters, digits and :_.@- ending in .service\n", wantErr: "nothing valid to trigger"},
		{name: "no units", args: []string{"trigger-units", "--caller", "x"}, want: 2, wantErr: "nothing to trigger"},
		{name: "dry run", args: []string{"trigger-units", "a", "--dry-run"}, want: 0, wantOut: "a.service -> dry-run\n    would restart a.service\n"},
		{name: "a unit being redeployed is left alone", args: []string{"trigger-units", "a", "b"}, locked: "b.service", want: 1,
			wantOut:   "a.service -> triggered\nb.service -> error\n    b.service is busy (a redeploy or another restart holds its lock): not restarted; try again once it is done\n",
			wantCalls: []string{"--user restart -- a.service"}},
		{name: "systemctl missing", args: []string{"trigger-units", "a"}, noPath: true, want: 1,
			wantOut: "a.service -> error\n    systemctl is not installed or not on PATH\n"},
		{name: "trigger-all", args: []string{"--trigger-all", "--reason", "nightly"}, env: map[string]string{"WEBHOOK_MANUAL_UNITS": "m,n"}, want: 0,
			wantOut:   "podman-auto-update.service -> triggered\nm.service -> triggered\nn.service -> triggered\n",
			wantCalls: []string{"--user start -- podman-auto-update.service", "--user restart -- m.service", "--user restart -- n.service"}},
		{name: "trigger-all dry run", args: []string{"trigger-all", "--dry-run"}, want: 0,
			wantOut: "podman-auto-update.service -> dry-run\n    would start podman-auto-update.service\n"},
		{name: "trigger-all takes no units", args: []string{"trigger-all", "a"}, want: 2, wantErr: "use trigger-units"},
		{name: "unknown flag", args: []string{"trigger-units", "a", "--force"}, want: 2, wantErr: "flag provided but not defined"},
		{name: "no event log still triggers", args: []string{"trigger-units", "a", "--db", "sqlite:///dev/null/x.db"}, badDB: true, want: 0,
			wantOut: "a.service -> triggered\n", wantCalls: []string{"--user restart -- a.service"}, wantErr: "unwritten event"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake := useFakeSystemctl(t, tc.failing...)
			if tc.noPath {
				t.Setenv("PATH", t.TempDir())
			}
			state := t.TempDir()
			env := map[string]string{"WEBHOOK_STATE_DIR": state}
			for k, v := range tc.env {
				env[k] = v
			}
			if tc.locked != "" {
				lock, err := lockFile(context.Background(), unitLockPath(state, tc.locked), time.Second)
				if err != nil {
					t.Fatal(err)
				}
				defer lock.Unlock()
			}
			var out, errb syncBuffer
			got := run(tc.args, mapEnv(env), &out, &errb)
			if got != tc.want || out.String() != tc.wantOut || !strings.Contains(errb.String(), tc.wantErr) {
				t.Fatalf("exit %d, stdout:\n%s\nwant exit %d, stdout:\n%s\nstderr (want %q):\n%s", got, out.String(), tc.want, tc.wantOut, tc.wantErr, errb.String())
			}
			if calls := fake.calls(t); !reflect.DeepEqual(calls, tc.wantCalls) {
				t.Errorf("systemctl calls %q, want %q", calls, tc.wantCalls)
			}
			if tc.want == 2 && tc.wantOut == "" || tc.badDB {
				return
			}
			rows := actionRows(t, filepath.Join(state, "data", "pod-upgrade-trigger.db"), "cli-trigger")
			if len(rows) != 1 || rows[0].Method != "CLI" {
				t.Fatalf("rows %+v, want one CLI row", rows)
			}
			wantStatus := map[int]int{0: 202, 1: 207, 2: 400}[tc.want]
			if rows[0].Status != wantStatus {
				t.Errorf("row status %d, want %d", rows[0].Status, wantStatus)
			}
			units, _ := rows[0].Meta["units"].([]any)
			if len(units) != strings.Count(tc.wantOut, " -> ") {
				t.Errorf("row units %v, want one per output line", rows[0].Meta["units"])
			}
			if tc.name == "units" && (rows[0].Meta["caller"] != "ci" || rows[0].Meta["reason"] != "deploy") {
				t.Errorf("row meta %v, want caller ci and reason deploy", rows[0].Meta)
			}
		})
	}
}

// System tests on the rig (main_test.go): the built binary against a real user manager.

// triggerE2EPost sends a JSON body with a Bearer token and returns the status and body.
func triggerE2EPost(t *testing.T, url, token, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest("POST", url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Timeout: 3 * time.Minute}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return resp.StatusCode, b.String()
}

// triggerE2EUnits installs two long-running units and one whose start fails, starts the two, and
// returns their names.
func triggerE2EUnits(t *testing.T, r *rig) (a, b, failing string) {
	t.Helper()
	a, b, failing = rigUniqueName(t, "trig")+".service", rigUniqueName(t, "trig")+".service", rigUniqueName(t, "fail")+".service"
	for _, u := range []string{a, b} {
		r.InstallUnit(t, u, "[Unit]\nDescription=trigger test unit\n\n[Service]\nExecStart=/bin/sleep 1000\n")
		if _, err := r.Systemctl(t, "start", u); err != nil {
			t.Fatal(err)
		}
	}
	r.InstallUnit(t, failing, "[Unit]\nDescription=failing test unit\n\n[Service]\nType=oneshot\nExecStart=/bin/false\n")
	return a, b, failing
}

// triggerMainPID is a unit's MainPID once it is active.
func triggerMainPID(t *testing.T, r *rig, unit string) string {
	t.Helper()
	var props map[string]string
	r.WaitFor(t, 30*time.Second, func() bool {
		props = r.Show(t, unit, "ActiveState", "MainPID")
		return props["ActiveState"] == "active" && props["MainPID"] != "0"
	}, unit+" to be active")
	return props["MainPID"]
}

// TestE2ETriggerUnits restarts real units with trigger-units: new MainPIDs, exit 0; with a unit
// that fails to start among them, that unit is reported failed, the other still restarted, exit 1.
func TestE2ETriggerUnits(t *testing.T) {
	r := needRig(t)
	bin := buildBinary(t)
	a, b, failing := triggerE2EUnits(t, r)
	state := r.TempDir(t)
	trigger := func(args ...string) (int, string) {
		cmd := r.Command(bin, append([]string{"trigger-units", "--caller", "e2e"}, args...)...)
		cmd.Env = append(cmd.Env, "WEBHOOK_STATE_DIR="+state)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		var exit *exec.ExitError
		if err != nil && !errors.As(err, &exit) {
			t.Fatal(err)
		}
		t.Logf("trigger-units %v: exit %d\n%s%s", args, cmd.ProcessState.ExitCode(), out, stderr.String())
		return cmd.ProcessState.ExitCode(), string(out)
	}

	pa, pb := triggerMainPID(t, r, a), triggerMainPID(t, r, b)
	code, out := trigger(a, strings.TrimSuffix(b, ".service"), a+"/redeploy")
	if code != 0 || out != a+" -> triggered\n"+b+" -> triggered\n" {
		t.Fatalf("exit %d output %q", code, out)
	}
	if na, nb := triggerMainPID(t, r, a), triggerMainPID(t, r, b); na == pa || nb == pb {
		t.Errorf("MainPIDs %s→%s and %s→%s: a unit was not restarted", pa, na, pb, nb)
	}

	pa = triggerMainPID(t, r, a)
	code, out = trigger(failing, a)
	if code != 1 || !strings.HasPrefix(out, failing+" -> failed\n    systemctl --user restart -- "+failing+" failed (exit 1): ") ||
		!strings.HasSuffix(out, a+" -> triggered\n") {
		t.Errorf("exit %d output %q, want exit 1, %s failed with systemctl's exit code and message, %s triggered", code, out, failing, a)
	}
	if na := triggerMainPID(t, r, a); na == pa {
		t.Errorf("%s was not restarted after the failing unit", a)
	}
	rows := actionRows(t, filepath.Join(state, "data", "pod-upgrade-trigger.db"), "cli-trigger")
	if len(rows) != 2 || rows[0].Status != 202 || rows[1].Status != 207 || rows[0].Meta["caller"] != "e2e" {
		t.Errorf("cli-trigger rows %+v", rows)
	}
}

// TestE2EManualAPI drives the running server's /api/manual routes against real units.
func TestE2EManualAPI(t *testing.T) {
	r := needRig(t)
	a, b, failing := triggerE2EUnits(t, r)
	base := startE2EServer(t, "WEBHOOK_MANUAL_TOKEN="+testManualToken).url

	pa, pb := triggerMainPID(t, r, a), triggerMainPID(t, r, b)
	code, body := triggerE2EPost(t, base+"/api/manual/trigger", testManualToken, `{"units":["`+a+`","`+b+`"],"caller":"e2e"}`)
	if code != 202 {
		t.Fatalf("trigger: %d %s", code, body)
	}
	if na, nb := triggerMainPID(t, r, a), triggerMainPID(t, r, b); na == pa || nb == pb {
		t.Errorf("MainPIDs %s→%s and %s→%s: a unit was not restarted", pa, na, pb, nb)
	}

	code, body = triggerE2EPost(t, base+"/api/manual/trigger", testManualToken, `{"units":["`+failing+`","`+a+`"]}`)
	var resp manualTriggerResponse
	if err := json.Unmarshal([]byte(body), &resp); err != nil || code != 207 || len(resp.Triggered) != 2 ||
		resp.Triggered[0].Status != "failed" || !strings.Contains(resp.Triggered[0].Message, "(exit 1)") || resp.Triggered[1].Status != "triggered" {
		t.Errorf("trigger with a failing unit: %d %s, want 207 with it failed (exit 1) and %s triggered", code, body, a)
	}

	pb = triggerMainPID(t, r, b)
	code, body = triggerE2EPost(t, base+"/api/manual/services/"+strings.TrimSuffix(b, ".service"), testManualToken, `{"reason":"e2e"}`)
	if code != 202 || !strings.Contains(body, `"status":"triggered"`) {
		t.Errorf("service restart: %d %s", code, body)
	}
	if nb := triggerMainPID(t, r, b); nb == pb {
		t.Errorf("%s was not restarted by /api/manual/services", b)
	}

	if code, body = triggerE2EPost(t, base+"/api/manual/trigger", "wrong", `{"units":["`+a+`"]}`); code != 401 {
		t.Errorf("wrong token: %d %s", code, body)
	}
}

// TestE2EAutoUpdate: /auto-update starts a real oneshot running podman auto-update, which moves
// a labelled container to the image newly pushed to the rig's registry; the limit then refuses
// the next request.
func TestE2EAutoUpdate(t *testing.T) {
	r := needRig(t)
	repo := rigUniqueName(t, "au")
	ref, v1 := r.PushImage(t, repo, "latest", "v1")
	_, v2 := r.PushImage(t, repo, "latest", "v2")
	r.TagLocal(t, v1, ref) // the host still runs v1; the registry has v2
	name := rigUniqueName(t, "au")
	r.InstallUnit(t, name+".service", r.ContainerUnit(name, ref))
	t.Cleanup(func() {
		if t.Failed() { // before InstallUnit's cleanup stops the unit
			out, _ := r.Systemctl(t, "status", "--no-pager", "--lines=30", name+".service")
			t.Logf("systemctl --user status %s.service:\n%s", name, out)
		}
	})
	if _, err := r.Systemctl(t, "start", name+".service"); err != nil {
		t.Fatal(err)
	}
	r.WaitFor(t, time.Minute, func() bool { return r.ContainerImage(t, name) == v1 }, name+" to run v1")

	updater := rigUniqueName(t, "au-updater") + ".service"
	r.InstallUnit(t, updater, "[Unit]\nDescription=podman auto-update for the e2e test\n\n[Service]\nType=oneshot\nExecStart="+r.podman+" auto-update\n")
	base := startE2EServer(t, "WEBHOOK_TOKEN="+testToken,
		"MANUAL_AUTO_UPDATE_UNIT="+updater, "WEBHOOK_LIMIT1_COUNT=1").url

	client := &http.Client{Timeout: 5 * time.Minute}
	resp, err := client.Get(base + "/auto-update?token=" + testToken)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 202 {
		t.Fatalf("/auto-update: %d %s", resp.StatusCode, b.String())
	}
	if got := r.Show(t, updater, "Result", "ExecMainStatus"); got["Result"] != "success" {
		t.Errorf("%s after /auto-update: %v", updater, got)
	}
	r.WaitFor(t, 2*time.Minute, func() bool { return r.ContainerImage(t, name) == v2 }, name+" to run v2 "+v2+" after /auto-update")

	resp, err = client.Post(base+"/auto-update?token="+testToken, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 429 || resp.Header.Get("Retry-After") == "" {
		t.Errorf("second /auto-update: %d Retry-After %q, want 429 with Retry-After", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
}

// TestE2ESchedulerOnce: scheduler --interval 60 --max-iterations 1 starts the real unit once,
// at once, and exits 0 without waiting for another interval.
func TestE2ESchedulerOnce(t *testing.T) {
	r := needRig(t)
	bin := buildBinary(t)
	unit := rigUniqueName(t, "sched") + ".service"
	marker := filepath.Join(r.TempDir(t), "ticks")
	r.InstallUnit(t, unit, fmt.Sprintf("[Unit]\nDescription=scheduler test unit\n\n[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo tick >> %s'\n", marker))
	state := r.TempDir(t)
	cmd := r.Command(bin, "scheduler", "--interval", "60", "--max-iterations", "1")
	cmd.Env = append(cmd.Env, "WEBHOOK_STATE_DIR="+state, "MANUAL_AUTO_UPDATE_UNIT="+unit)
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("scheduler: %v; output:\n%s", err, out.String())
		}
	case <-time.After(50 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("scheduler --max-iterations 1 still running after 50s (interval 60s); output:\n%s", out.String())
	}
	if b, err := os.ReadFile(marker); err != nil || string(b) != "tick\n" {
		t.Errorf("%s ran %q (%v), want exactly once", unit, b, err)
	}
	rows := actionRows(t, filepath.Join(state, "data", "pod-upgrade-trigger.db"), "scheduler")
	if len(rows) != 1 || rows[0].Status != 202 || rows[0].Meta["unit"] != unit {
		t.Errorf("scheduler rows %+v", rows)
	}
}

// TestE2ESchedulerUnit runs the shipped systemd/webhook-auto-update-scheduler.service (with the
// built binary in ExecStart) under the user manager: it ticks at once, and systemctl stop ends it
// cleanly (Result=success, exit 0).
func TestE2ESchedulerUnit(t *testing.T) {
	r := needRig(t)
	bin := buildBinary(t)
	shipped, err := os.ReadFile(filepath.Join("systemd", "webhook-auto-update-scheduler.service"))
	if err != nil {
		t.Fatal(err)
	}
	target := rigUniqueName(t, "sched-target") + ".service"
	marker := filepath.Join(r.TempDir(t), "ticks")
	r.InstallUnit(t, target, fmt.Sprintf("[Unit]\nDescription=scheduler target\n\n[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo tick >> %s'\n", marker))
	state := r.TempDir(t)
	const execStart = "ExecStart=%h/.local/bin/webhook-auto-update scheduler"
	if !strings.Contains(string(shipped), execStart+"\n") {
		t.Fatalf("the shipped unit has no %q line", execStart)
	}
	unit := strings.Replace(string(shipped), execStart+"\n", fmt.Sprintf("ExecStart=%s scheduler --state-dir %s\nEnvironment=MANUAL_AUTO_UPDATE_UNIT=%s\n", bin, state, target), 1)
	name := rigUniqueName(t, "scheduler") + ".service"
	r.InstallUnit(t, name, unit)
	if _, err := r.Systemctl(t, "start", name); err != nil {
		t.Fatal(err)
	}
	r.WaitFor(t, time.Minute, func() bool { b, _ := os.ReadFile(marker); return string(b) == "tick\n" }, "the first tick of "+name)
	if _, err := r.Systemctl(t, "stop", name); err != nil {
		t.Fatal(err)
	}
	if got := r.Show(t, name, "Result", "ExecMainStatus", "ActiveState"); got["Result"] != "success" || got["ExecMainStatus"] != "0" || got["ActiveState"] != "inactive" {
		t.Errorf("%s after stop: %v, want Result=success ExecMainStatus=0 inactive", name, got)
	}
	if rows := actionRows(t, filepath.Join(state, "data", "pod-upgrade-trigger.db"), "scheduler"); len(rows) != 1 || rows[0].Status != 202 {
		t.Errorf("scheduler rows %+v, want one tick", rows)
	}
}

// TestSchedulerEnforcesRequestRetention: each tick also deletes request rows older than
// WEBHOOK_REQUEST_RETENTION_DAYS, and keeps the rows of redeploys, triggers and ticks.
func TestSchedulerEnforcesRequestRetention(t *testing.T) {
	fake := useFakeSystemctl(t, "")
	state := t.TempDir()
	dbPath := filepath.Join(state, "data", "pod-upgrade-trigger.db")
	seedRetention(t, dbPath)
	var out, errb syncBuffer
	if code := run([]string{"scheduler", "--max-iterations", "1"}, mapEnv(map[string]string{"WEBHOOK_STATE_DIR": state}), &out, &errb); code != 0 {
		t.Fatalf("exit %d\n%s", code, errb.String())
	}
	if calls := fake.calls(t); len(calls) != 1 {
		t.Errorf("systemctl calls %q, want 1", calls)
	}
	db := rawDB(t, dbPath)
	if n := queryInt(t, db, `SELECT count(*) FROM event_log WHERE request_id LIKE 'old-%'`); n != 3 {
		t.Errorf("%d old rows left, want the 3 of the task, the CLI and the scheduler", n)
	}
	if n := queryInt(t, db, `SELECT count(*) FROM event_log WHERE request_id LIKE 'new-%' OR action = 'scheduler'`); n != 4 {
		t.Errorf("%d recent request rows and tick rows, want 3 and 1", n)
	}
}
