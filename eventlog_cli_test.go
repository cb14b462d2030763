// eventlog_cli_test.go tests the events command and the queries behind it: filter parsing,
// queryEvents, the golden table and JSON output (go test -update rewrites testdata), one line per
// row, --follow, and its errors.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

func TestParseEventFilter(t *testing.T) {
	for _, tc := range []struct {
		name    string
		q       map[string]string
		want    eventFilter
		wantErr string // the error must name this
	}{
		{name: "defaults", want: eventFilter{limit: 50}},
		{name: "limit", q: map[string]string{"limit": "10"}, want: eventFilter{limit: 10}},
		{name: "limit 1", q: map[string]string{"limit": "1"}, want: eventFilter{limit: 1}},
		{name: "limit at the cap", q: map[string]string{"limit": "500"}, want: eventFilter{limit: 500}},
		{name: "limit over the cap", q: map[string]string{"limit": "501"}, want: eventFilter{limit: 500}},
		{name: "limit far over the cap", q: map[string]string{"limit": "1000000"}, want: eventFilter{limit: 500}},
		{name: "limit 0", q: map[string]string{"limit": "0"}, wantErr: "limit"},
		{name: "limit -1", q: map[string]string{"limit": "-1"}, wantErr: "limit"},
		{name: "limit abc", q: map[string]string{"limit": "abc"}, wantErr: "limit"},
		{name: "limit fraction", q: map[string]string{"limit": "1.5"}, wantErr: "limit"},
		{name: "limit overflows", q: map[string]string{"limit": "99999999999999999999"}, wantErr: "limit"},
		{name: "action", q: map[string]string{"action": "github-task"}, want: eventFilter{limit: 50, action: "github-task"}},
		{name: "delivery", q: map[string]string{"delivery": "d-1"}, want: eventFilter{limit: 50, delivery: "d-1"}},
		{name: "unit short", q: map[string]string{"unit": "foo"}, want: eventFilter{limit: 50, unit: "foo.service"}},
		{name: "unit full", q: map[string]string{"unit": "foo.service"}, want: eventFilter{limit: 50, unit: "foo.service"}},
		{name: "unit webhook spelling", q: map[string]string{"unit": "github-package-update/foo"}, want: eventFilter{limit: 50, unit: "foo.service"}},
		{name: "unit instance", q: map[string]string{"unit": "app@blue"}, want: eventFilter{limit: 50, unit: "app@blue.service"}},
		{name: "unit with a space", q: map[string]string{"unit": "a b"}, wantErr: "unit"},
		{name: "unit traversal", q: map[string]string{"unit": "../etc/passwd"}, wantErr: "unit"},
		{name: "unit template", q: map[string]string{"unit": "app@"}, wantErr: "unit"},
		{name: "since hours", q: map[string]string{"since": "2h"}, want: eventFilter{limit: 50, since: fixtureNow.Add(-2 * time.Hour)}},
		{name: "since minutes", q: map[string]string{"since": "90m"}, want: eventFilter{limit: 50, since: fixtureNow.Add(-90 * time.Minute)}},
		{name: "since RFC 3339", q: map[string]string{"since": "2024-02-28T10:00:00Z"},
			want: eventFilter{limit: 50, since: time.Date(2024, 2, 28, 10, 0, 0, 0, time.UTC)}},
		{name: "since RFC 3339 with offset", q: map[string]string{"since": "2024-03-01T12:00:00+02:00"},
			want: eventFilter{limit: 50, since: time.Date(2024, 3, 1, 10, 0, 0, 0, time.UTC)}},
		{name: "since a word", q: map[string]string{"since": "yesterday"}, wantErr: "since"},
		{name: "since a date only", q: map[string]string{"since": "2024-03-01"}, wantErr: "since"},
		{name: "since zero", q: map[string]string{"since": "0s"}, wantErr: "since"},
		{name: "since negative", q: map[string]string{"since": "-1h"}, wantErr: "since"},
		{name: "since a bare number", q: map[string]string{"since": "90"}, wantErr: "since"},
		{name: "status 202", q: map[string]string{"status": "202"}, want: eventFilter{limit: 50, status: 202}},
		{name: "status 100", q: map[string]string{"status": "100"}, want: eventFilter{limit: 50, status: 100}},
		{name: "status 599", q: map[string]string{"status": "599"}, want: eventFilter{limit: 50, status: 599}},
		{name: "status 42", q: map[string]string{"status": "42"}, wantErr: "status"},
		{name: "status 600", q: map[string]string{"status": "600"}, wantErr: "status"},
		{name: "status abc", q: map[string]string{"status": "abc"}, wantErr: "status"},
		{name: "before_id", q: map[string]string{"before_id": "17"}, want: eventFilter{limit: 50, beforeID: 17}},
		{name: "before_id 0", q: map[string]string{"before_id": "0"}, wantErr: "before_id"},
		{name: "before_id -5", q: map[string]string{"before_id": "-5"}, wantErr: "before_id"},
		{name: "before_id abc", q: map[string]string{"before_id": "abc"}, wantErr: "before_id"},
		{name: "everything", q: map[string]string{"limit": "7", "action": "github-task", "unit": "demo", "delivery": "d-1",
			"since": "30m", "status": "200", "before_id": "12"},
			want: eventFilter{limit: 7, action: "github-task", unit: "demo.service", delivery: "d-1",
				since: fixtureNow.Add(-30 * time.Minute), status: 200, beforeID: 12}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseEventFilter(func(k string) string { return tc.q[k] }, fixtureNow)
			if tc.wantErr != "" {
				if err == nil {
					t.Fatalf("parseEventFilter(%v) = %+v, want an error", tc.q, got)
				}
				if !strings.Contains(err.Error(), tc.wantErr) {
					t.Errorf("error %q does not name %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseEventFilter(%v): %v", tc.q, err)
			}
			if !got.since.Equal(tc.want.since) {
				t.Errorf("since = %v, want %v", got.since, tc.want.since)
			}
			got.since, tc.want.since = time.Time{}, time.Time{}
			if got != tc.want {
				t.Errorf("parseEventFilter(%v) = %+v, want %+v", tc.q, got, tc.want)
			}
		})
	}
}

func TestQueryEvents(t *testing.T) {
	path := fixtureDB(t, filepath.Join(t.TempDir(), "events.db"))
	// A row as an older version or the original tool stored it: secrets in the clear.
	db := rawDB(t, path)
	if _, err := db.Exec(`INSERT INTO event_log (request_id, ts, method, path, status, action, duration_ms, meta)
		VALUES ('legacy', 1709305200, 'GET', '/auto-update', 202, 'legacy', 5,
		'{"query":"token=abc&x=1","token":"s3cret","Access_Token":"s3cret2","secret":"s3cret3","unit":"legacy.service"}')`); err != nil {
		t.Fatal(err)
	}
	const legacyID = 16
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		f    eventFilter
		want []int64
	}{
		{name: "everything, newest first", f: eventFilter{}, want: idRange(legacyID, 1)},
		{name: "limit", f: eventFilter{limit: 3}, want: []int64{16, 15, 14}},
		{name: "action", f: eventFilter{action: "github-task"}, want: []int64{12, 11, 10, 9, 8, 4, 3}},
		{name: "action without rows", f: eventFilter{action: "nothing"}, want: []int64{}},
		{name: "unit demo", f: eventFilter{unit: "demo.service"}, want: []int64{13, 12, 11, 10, 9, 8, 7}},
		{name: "unit web", f: eventFilter{unit: "web.service"}, want: []int64{4, 3, 2}},
		{name: "unit is not a prefix match", f: eventFilter{unit: "demo"}, want: []int64{}},
		{name: "delivery", f: eventFilter{delivery: "d-1"}, want: []int64{12, 11, 10, 9, 8, 7}},
		{name: "delivery is exact", f: eventFilter{delivery: "d"}, want: []int64{}},
		{name: "since two hours", f: eventFilter{since: fixtureNow.Add(-2 * time.Hour)}, want: idRange(legacyID, 5)},
		{name: "since is inclusive", f: eventFilter{since: time.Date(2024, 3, 1, 14, 2, 3, 0, time.UTC)}, want: idRange(legacyID, 7)},
		{name: "status", f: eventFilter{status: 202}, want: []int64{16, 14, 13, 8, 7, 5, 3, 2}},
		{name: "before_id", f: eventFilter{beforeID: 8}, want: idRange(7, 1)},
		{name: "before_id and limit", f: eventFilter{beforeID: 8, limit: 2}, want: []int64{7, 6}},
		{name: "filters combine", f: eventFilter{action: "github-webhook", unit: "demo.service", status: 202}, want: []int64{13, 7}},
		{name: "afterID ascending", f: eventFilter{afterID: 10}, want: idRange(11, legacyID)},
		{name: "afterID and limit", f: eventFilter{afterID: 10, limit: 2}, want: []int64{11, 12}},
		{name: "afterID -1 is every row ascending", f: eventFilter{afterID: -1, delivery: "d-1"}, want: idRange(7, 12)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			evs, err := queryEvents(ctx, db, tc.f)
			if err != nil {
				t.Fatal(err)
			}
			if evs == nil {
				t.Error("no rows came back as nil; the events API would answer null instead of []")
			}
			if got := eventIDs(evs); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("ids %v, want %v", got, tc.want)
			}
		})
	}

	t.Run("fields", func(t *testing.T) {
		evs, err := queryEvents(ctx, db, eventFilter{beforeID: 8, limit: 3})
		if err != nil || len(evs) != 3 {
			t.Fatalf("%d rows, %v", len(evs), err)
		}
		want := storedEvent{ID: 7, RequestID: "req-push", TS: 1709301723, Time: "2024-03-01T14:02:03Z", Method: "POST",
			Path: "/github-package-update/demo", Status: 202, Action: "github-webhook", DurationMS: 38,
			Meta: map[string]any{"delivery": "d-1", "unit": "demo.service", "image": "ghcr.io/acme/demo:latest",
				"reason": "queued", "event": "package", "query": "token=REDACTED&x=1"}}
		if !reflect.DeepEqual(evs[0], want) {
			t.Errorf("row 7\n got %+v\nwant %+v", evs[0], want)
		}
		// Row 5 was written with no path: NULL reads back as "".
		if evs[2].ID != 5 || evs[2].Path != "" || evs[2].Method != "SCHEDULER" || evs[2].Meta["iteration"] != 7.0 {
			t.Errorf("row 5 = %+v", evs[2])
		}
	})

	t.Run("redaction on the way out", func(t *testing.T) {
		evs, err := queryEvents(ctx, db, eventFilter{action: "legacy"})
		if err != nil || len(evs) != 1 {
			t.Fatalf("%d rows, %v", len(evs), err)
		}
		want := map[string]any{"query": "token=REDACTED&x=1", "token": "REDACTED", "Access_Token": "REDACTED",
			"secret": "REDACTED", "unit": "legacy.service"}
		if !reflect.DeepEqual(evs[0].Meta, want) {
			t.Errorf("meta %v, want %v", evs[0].Meta, want)
		}
		b, _ := json.Marshal(evs[0])
		if s := string(b); strings.Contains(s, "abc") || strings.Contains(s, "s3cret") {
			t.Errorf("a secret came back: %s", s)
		}
		all, err := queryEvents(ctx, db, eventFilter{})
		if err != nil {
			t.Fatal(err)
		}
		if b, _ := json.Marshal(all); strings.Contains(string(b), fixtureToken) {
			t.Errorf("the fixture's stored token came back out of queryEvents")
		}
	})
}

// runEvents runs `events args…` in-process with local time set to UTC, so the table's times do
// not depend on the machine.
func runEvents(t *testing.T, env map[string]string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	old := time.Local
	time.Local = time.UTC
	defer func() { time.Local = old }()
	var out, errb bytes.Buffer
	func() {
		// A panic fails this case instead of killing the whole test binary.
		defer func() {
			if p := recover(); p != nil {
				t.Errorf("events %q panicked: %v", args, p)
				code = -1
			}
		}()
		// A HOME, as every shell has: without one and without WEBHOOK_STATE_DIR there is no
		// state directory at all, even when --db names the database.
		full := map[string]string{"HOME": t.TempDir()}
		for k, v := range env {
			full[k] = v
		}
		code = run(append([]string{"events"}, args...), mapEnv(full), &out, &errb)
	}()
	return code, out.String(), errb.String()
}

// checkGolden compares got with testdata/events/name, or rewrites it under -update.
func checkGolden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", "events", name)
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -run %s -update to create it)", err, t.Name())
	}
	if got != string(want) {
		t.Errorf("output differs from %s (go test -run '%s' -update rewrites it)\n--- got\n%s\n--- want\n%s", path, t.Name(), got, want)
	}
}

func TestEventsCommandGolden(t *testing.T) {
	state := t.TempDir()
	dbPath := fixtureDB(t, filepath.Join(state, "data", "pod-upgrade-trigger.db"))
	other := t.TempDir()
	for _, tc := range []struct {
		name   string
		env    map[string]string
		args   []string
		golden string
	}{
		{name: "table", args: []string{"--db", dbPath}, golden: "all.table.golden"},
		{name: "json", args: []string{"--db", dbPath, "--json"}, golden: "all.jsonl.golden"},
		{name: "delivery", args: []string{"--db", dbPath, "--delivery", "d-1"}, golden: "delivery-d-1.table.golden"},
		{name: "delivery json", args: []string{"--delivery", "d-1", "--json", "--db", dbPath}, golden: "delivery-d-1.jsonl.golden"},
		{name: "filters", args: []string{"--db", dbPath, "--since", "2024-03-01T14:00:00Z", "--status", "202", "--unit", "demo", "--limit", "2"},
			golden: "filtered.table.golden"},
		{name: "no rows", args: []string{"--db", dbPath, "--action", "nothing"}, golden: "empty.table.golden"},
		// The same table, found through the state directory and through WEBHOOK_DB_URL.
		{name: "state dir", args: []string{"--state-dir", state}, golden: "all.table.golden"},
		{name: "state dir from the environment", env: map[string]string{"WEBHOOK_STATE_DIR": state}, golden: "all.table.golden"},
		{name: "database url", env: map[string]string{"WEBHOOK_STATE_DIR": other, "WEBHOOK_DB_URL": "sqlite://" + dbPath + "?mode=rwc"},
			golden: "all.table.golden"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, stdout, stderr := runEvents(t, tc.env, tc.args...)
			if code != 0 || stderr != "" {
				t.Fatalf("exit %d, stderr %q", code, stderr)
			}
			if *update && (tc.name == "state dir" || tc.name == "state dir from the environment" || tc.name == "database url") {
				return // these compare with a golden file another case writes
			}
			checkGolden(t, tc.golden, stdout)
		})
	}
	// The JSON lines are the API's rows: each parses back to exactly what queryEvents returns.
	_, stdout, _ := runEvents(t, nil, "--db", dbPath, "--json")
	want, err := queryEvents(context.Background(), rawDB(t, dbPath), eventFilter{limit: 50})
	if err != nil {
		t.Fatal(err)
	}
	var got []storedEvent
	for _, line := range strings.Split(strings.TrimSuffix(stdout, "\n"), "\n") {
		var e storedEvent
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		got = append(got, e)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("--json rows differ from queryEvents:\n got %+v\nwant %+v", got, want)
	}
}

// TestEventsTableOneLinePerRow checks that whatever a row holds, the table prints it on one line
// of valid UTF-8: the DETAILS column shows error texts that carry a command's stderr and callers
// typed by people.
func TestEventsTableOneLinePerRow(t *testing.T) {
	base := storedEvent{ID: 1, RequestID: "r", TS: 1709301723, Method: "TASK", Path: "/github-package-update/demo", Status: 500,
		Action: "github-task"}
	for _, tc := range []struct {
		name string
		meta map[string]any
	}{
		{name: "plain", meta: map[string]any{"step": "restart-failed", "unit": "demo.service"}},
		{name: "newline in an error", meta: map[string]any{"step": "restart-failed",
			"error": "systemctl failed (exit 1): Job failed.\nSee journalctl"}},
		{name: "tab in an error", meta: map[string]any{"step": "pull-failed", "error": "podman pull failed:\tmanifest unknown"}},
		{name: "carriage return", meta: map[string]any{"error": "progress\roverwritten"}},
		{name: "multibyte at the cut", meta: map[string]any{"caller": strings.Repeat("ö", 40)}},
		{name: "ellipsis at the cut", meta: map[string]any{"error": strings.Repeat("x", 56) + "…" + strings.Repeat("y", 10)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := base
			e.Meta = tc.meta
			var b bytes.Buffer
			printEvents(&b, []storedEvent{e, base}, false, true)
			out := b.String()
			if lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n"); len(lines) != 3 {
				t.Errorf("2 rows printed as %d lines:\n%s", len(lines)-1, out)
			}
			if !utf8.ValidString(out) {
				t.Errorf("the table is not valid UTF-8: %q", out)
			}
			if strings.ContainsAny(out, "\t\r") {
				t.Errorf("the table holds a tab or carriage return: %q", out)
			}
		})
	}
}

// TestEventsFollow runs the built binary's `events --follow`: it prints the newest rows, then
// only new rows that match its filters, oldest first, and exits 0 on SIGINT.
func TestEventsFollow(t *testing.T) {
	bin := buildServerBinary(t)
	dbPath := fixtureDB(t, filepath.Join(t.TempDir(), "events.db"))
	cmd := exec.Command(bin, "events", "--follow", "--db", dbPath, "--unit", "demo", "--limit", "2")
	cmd.Env = []string{"TZ=UTC", "PATH=" + os.Getenv("PATH"), "WEBHOOK_STATE_DIR=" + t.TempDir()}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	lines := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		exited <- cmd.Wait()
	}()
	defer cmd.Process.Kill()
	next := func(what string) string {
		t.Helper()
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("events --follow ended while waiting for %s; stderr %s", what, stderr.String())
			}
			return l
		case <-time.After(hangGuard):
			t.Fatalf("no line for %s; stderr %s", what, stderr.String())
		}
		return ""
	}
	for _, want := range []string{"TIME", "reason=not-container delivery=d-2", "step=completed delivery=d-1"} {
		if l := next(want); !strings.Contains(l, want) {
			t.Fatalf("line %q, want %s", l, want)
		}
	}
	l := openTestLog(t, filepath.Join(filepath.Dir(dbPath), "events.db"), &syncBuffer{})
	row := func(unit, delivery string) event {
		return event{RequestID: delivery, TS: fixtureNow, Method: "TASK", Status: 200, Action: "github-task",
			Meta: map[string]any{"unit": unit, "delivery": delivery, "step": "started"}}
	}
	if err := l.Write(context.Background(), row("web.service", "f-web"), row("demo.service", "f-1"), row("demo.service", "f-2")); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"delivery=f-1", "delivery=f-2"} {
		if l := next(want); !strings.Contains(l, want) || !strings.HasPrefix(l, "2024-03-01 15:00:00") {
			t.Fatalf("followed line %q, want %s at 2024-03-01 15:00:00 (UTC)", l, want)
		}
	}
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	for l := range lines {
		t.Errorf("unexpected line after the matching rows: %q", l)
	}
	if err := <-exited; err != nil {
		t.Errorf("events --follow after SIGINT: %v; stderr %s", err, stderr.String())
	}
	if stderr.Len() > 0 {
		t.Errorf("stderr: %s", stderr.String())
	}
}

func TestEventsCommandErrors(t *testing.T) {
	dir := t.TempDir()
	dbPath := fixtureDB(t, filepath.Join(dir, "events.db"))
	missing := filepath.Join(dir, "nowhere", "missing.db")
	for _, tc := range []struct {
		name   string
		args   []string
		code   int
		stderr string // substring
	}{
		{name: "missing database", args: []string{"--db", missing}, code: 1, stderr: missing},
		{name: "missing database in a state dir", args: []string{"--state-dir", filepath.Join(dir, "empty")}, code: 1,
			stderr: filepath.Join(dir, "empty", "data", "pod-upgrade-trigger.db")},
		{name: "limit abc", args: []string{"--db", dbPath, "--limit", "abc"}, code: 2, stderr: "limit"},
		{name: "limit 0", args: []string{"--db", dbPath, "--limit", "0"}, code: 2, stderr: "limit"},
		{name: "since a word", args: []string{"--db", dbPath, "--since", "yesterday"}, code: 2, stderr: "since"},
		{name: "status 42", args: []string{"--db", dbPath, "--status", "42"}, code: 2, stderr: "status"},
		{name: "invalid unit", args: []string{"--db", dbPath, "--unit", "a b"}, code: 2, stderr: "unit"},
		{name: "flag without its value", args: []string{"--db", dbPath, "--limit"}, code: 2, stderr: "limit"},
		{name: "unknown flag", args: []string{"--db", dbPath, "--bogus"}, code: 2, stderr: "usage: webhook-auto-update events"},
		{name: "extra argument", args: []string{"--db", dbPath, "extra"}, code: 2, stderr: `"extra"`},
		{name: "bad value wins over a missing database", args: []string{"--db", missing, "--limit", "abc"}, code: 2, stderr: "limit"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, stdout, stderr := runEvents(t, map[string]string{"WEBHOOK_STATE_DIR": dir}, tc.args...)
			if code != tc.code {
				t.Errorf("exit %d, want %d; stderr %q", code, tc.code, stderr)
			}
			if !strings.Contains(stderr, tc.stderr) {
				t.Errorf("stderr %q does not contain %q", stderr, tc.stderr)
			}
			if stdout != "" {
				t.Errorf("a failing command wrote to stdout: %q", stdout)
			}
		})
	}
	if _, err := os.Stat(missing); !os.IsNotExist(err) {
		t.Errorf("events created the missing database %s (%v); it must only read", missing, err)
	}
}
