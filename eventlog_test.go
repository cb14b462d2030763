// eventlog_test.go tests the SQLite event log on real database files: creation and migration,
// compatibility with databases the original tool created, concurrent writers (goroutines and a
// second process), the spill to stderr when a write fails, the pure helpers databasePath,
// redactPath, redactQuery and newRequestID, and the write benchmarks. It also holds what the
// other eventlog_*_test.go files share: openTestLog, the -update flag and the event fixture
// (fixtureEvents, writeFixture, fixtureDB). The events command is eventlog_cli_test.go's,
// /api/events eventlog_api_test.go's, /metrics eventlog_metrics_test.go's and the status page
// eventlog_status_test.go's.
package main

import (
	"bytes"
	"context"
	"database/sql"
	"flag"
	"fmt"
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

// openTestLog opens an event log at path whose log lines go to buf.
func openTestLog(t *testing.T, path string, buf *syncBuffer) *eventLog {
	t.Helper()
	l, err := openEventLog(path, newLogger(buf))
	if err != nil {
		t.Fatalf("openEventLog(%s): %v", path, err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// openTestLogDB opens a fresh event log that logs to buf and, beside it, the same file as
// another process would (rawDB).
func openTestLogDB(t *testing.T, buf *syncBuffer) (*eventLog, *sql.DB) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "events.db")
	return openTestLog(t, path, buf), rawDB(t, path)
}

func TestOpenEventLogCreatesAndMigrates(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "a", "b", "events.db")
	var logs syncBuffer
	l := openTestLog(t, path, &logs)

	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := st.Mode().Perm(); perm != 0o600 {
		t.Errorf("database mode %v, want 0600", perm)
	}
	for _, d := range []string{filepath.Join(dir, "a"), filepath.Join(dir, "a", "b")} {
		st, err := os.Stat(d)
		if err != nil || !st.IsDir() {
			t.Fatalf("parent directory %s not created: %v", d, err)
		}
		if perm := st.Mode().Perm(); perm&0o077 != 0 {
			t.Errorf("parent directory %s mode %v is open to other users", d, perm)
		}
	}
	ms, err := loadMigrations()
	if err != nil {
		t.Fatal(err)
	}
	latest := ms[len(ms)-1].version
	if v, err := schemaVersion(context.Background(), l.db); err != nil || v != latest {
		t.Errorf("schemaVersion = %d, %v; want %d, the newest embedded migration", v, err, latest)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	db := rawDB(t, path)
	for _, m := range ms {
		if n := queryInt(t, db, `SELECT count(*) FROM schema_migrations WHERE version = ? AND name = ?`, m.version, m.name); n != 1 {
			t.Errorf("schema_migrations has %d rows for %s, want 1", n, m.name)
		}
	}
	var mode string
	if err := db.QueryRow(`PRAGMA journal_mode`).Scan(&mode); err != nil || mode != "wal" {
		t.Errorf("journal_mode = %q, %v; want wal (readers and writers of several processes at once)", mode, err)
	}
	for _, idx := range []string{"idx_event_log_ts", "idx_event_log_action"} {
		if n := queryInt(t, db, `SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = ?`, idx); n != 1 {
			t.Errorf("index %s missing", idx)
		}
	}
	// Mark the recorded migrations, so that recording one again shows.
	if _, err := db.Exec(`UPDATE schema_migrations SET applied_at = 1`); err != nil {
		t.Fatal(err)
	}

	// Reopening applies nothing a second time.
	for i := 0; i < 2; i++ {
		l2 := openTestLog(t, path, &logs)
		if err := l2.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if n := queryInt(t, db, `SELECT count(*) FROM schema_migrations`); n != len(ms) {
		t.Errorf("schema_migrations has %d rows after reopening, want %d", n, len(ms))
	}
	if n := queryInt(t, db, `SELECT count(*) FROM schema_migrations WHERE applied_at != 1`); n != 0 {
		t.Errorf("%d migrations recorded again on reopen", n)
	}
	if s := logs.String(); s != "" {
		t.Errorf("opening logged %q, want nothing", s)
	}
}

// TestEventLogFileModeIgnoresUmask checks that a new database is 0600 whatever the umask.
func TestEventLogFileModeIgnoresUmask(t *testing.T) {
	path := filepath.Join(t.TempDir(), "events.db")
	old := syscall.Umask(0)
	l, err := openEventLog(path, newLogger(&syncBuffer{}))
	syscall.Umask(old)
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := st.Mode().Perm(); perm != 0o600 {
		t.Errorf("database mode %v with umask 0, want 0600", perm)
	}
}

func TestRecordWritesEveryEvent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "events.db")
	var logs syncBuffer
	l := openTestLog(t, path, &logs)
	const n = 1000
	ts := time.Unix(1700000000, 0)
	for i := 0; i < n; i++ {
		ev := event{
			RequestID: fmt.Sprintf("req-%04d", i),
			TS:        ts.Add(time.Duration(i) * time.Second),
			Method:    "GET",
			Path:      fmt.Sprintf("/p/%d", i),
			Status:    200 + i%3,
			Action:    "test",
			Duration:  time.Duration(i) * time.Millisecond,
			Meta:      map[string]any{"i": i, "query": "a=1&b=2"},
		}
		if i%10 == 0 {
			ev.Path = "" // stored as NULL, as the original tool did for CLI events
			ev.Meta = nil
		}
		l.Record(ev)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if f := l.failures.Load(); f != 0 {
		t.Fatalf("%d events failed; log:\n%s", f, logs.String())
	}
	if p := l.pending.Load(); p != 0 {
		t.Errorf("pending = %d after Close, want 0", p)
	}
	rows := readRows(t, rawDB(t, path), "")
	if len(rows) != n {
		t.Fatalf("%d rows, want %d", len(rows), n)
	}
	seen := map[string]bool{}
	for _, r := range rows {
		i, err := strconv.Atoi(strings.TrimPrefix(r.requestID, "req-"))
		if err != nil || seen[r.requestID] {
			t.Fatalf("unexpected or repeated request_id %q", r.requestID)
		}
		seen[r.requestID] = true
		wantPath := sql.NullString{String: fmt.Sprintf("/p/%d", i), Valid: true}
		wantMeta := fmt.Sprintf(`{"i":%d,"query":"a=1&b=2"}`, i)
		if i%10 == 0 {
			wantPath, wantMeta = sql.NullString{}, "{}"
		}
		want := eventRow{id: r.id, requestID: r.requestID, ts: ts.Unix() + int64(i), method: "GET",
			path: wantPath, status: 200 + i%3, action: "test", durationMS: int64(i), meta: wantMeta,
			createdAt: r.createdAt}
		if r != want {
			t.Fatalf("row %d:\n got %+v\nwant %+v", i, r, want)
		}
		if r.createdAt < time.Now().Add(-time.Hour).Unix() {
			t.Errorf("row %d: created_at %d is not the insertion time", i, r.createdAt)
		}
	}
}

func TestWriteCommitsBeforeReturning(t *testing.T) {
	var logs syncBuffer
	l, db := openTestLogDB(t, &logs)
	evs := []event{
		{RequestID: "w1", TS: time.Now(), Method: "CLI", Status: 202, Action: "trigger-units"},
		{RequestID: "w2", TS: time.Now(), Method: "CLI", Status: 500, Action: "trigger-units"},
	}
	if err := l.Write(context.Background(), evs...); err != nil {
		t.Fatalf("Write: %v", err)
	}
	// Still open: the rows must be visible to another connection already.
	rows := readRows(t, db, `WHERE request_id IN ('w1', 'w2')`)
	if len(rows) != 2 || rows[0].status != 202 || rows[1].status != 500 {
		t.Fatalf("rows visible before Close: %+v", rows)
	}
}

// TestConcurrentHandles writes through two handles on one file at once, as the server and a
// CLI command or a redeploy task do.
func TestConcurrentHandles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "events.db")
	var logs syncBuffer
	const per = 500
	var wg sync.WaitGroup
	handles := make([]*eventLog, 2)
	for h := range handles {
		handles[h] = openTestLog(t, path, &logs)
	}
	for h, l := range handles {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < per; i++ {
				l.Record(event{RequestID: fmt.Sprintf("h%d-%d", h, i), TS: time.Now(), Method: "GET",
					Status: 200, Action: "concurrent"})
			}
			if err := l.Close(); err != nil {
				t.Errorf("Close handle %d: %v", h, err)
			}
		}()
	}
	wg.Wait()
	for h, l := range handles {
		if f := l.failures.Load(); f != 0 {
			t.Errorf("handle %d: %d events failed", h, f)
		}
	}
	db := rawDB(t, path)
	if n := queryInt(t, db, `SELECT count(DISTINCT request_id) FROM event_log WHERE action = 'concurrent'`); n != 2*per {
		t.Errorf("%d rows, want %d; log:\n%s", n, 2*per, logs.String())
	}
}

// helperWriterEnv names the database a re-executed test binary writes to in
// TestHelperEventWriter; unset, that test does nothing.
const helperWriterEnv = "WEBHOOK_TEST_EVENT_WRITER_DB"

// TestHelperEventWriter is not a test: TestTwoProcessesWriting runs the test binary again with
// only this test selected, as a second process writing to the same database.
func TestHelperEventWriter(t *testing.T) {
	path := os.Getenv(helperWriterEnv)
	if path == "" {
		t.Skip("helper process for TestTwoProcessesWriting")
	}
	name := os.Getenv(helperWriterEnv + "_NAME")
	n, _ := strconv.Atoi(os.Getenv(helperWriterEnv + "_COUNT"))
	var logs syncBuffer
	l, err := openEventLog(path, newLogger(&logs))
	if err != nil {
		t.Fatalf("openEventLog: %v", err)
	}
	for i := 0; i < n; i++ {
		l.Record(event{RequestID: fmt.Sprintf("%s-%d", name, i), TS: time.Now(), Method: "CLI",
			Status: 200, Action: "process"})
	}
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if f := l.failures.Load(); f != 0 {
		t.Fatalf("%d events failed:\n%s", f, logs.String())
	}
}

func TestTwoProcessesWriting(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	// A fresh file, so that all three writers also race to apply the migrations.
	path := filepath.Join(t.TempDir(), "shared", "events.db")
	const per = 500
	var cmds []*exec.Cmd
	var outs []*bytes.Buffer
	for _, name := range []string{"p1", "p2"} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperEventWriter$", "-test.count=1", "-test.v")
		cmd.Env = append(os.Environ(), helperWriterEnv+"="+path, helperWriterEnv+"_NAME="+name,
			helperWriterEnv+"_COUNT="+strconv.Itoa(per))
		out := new(bytes.Buffer)
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds, outs = append(cmds, cmd), append(outs, out)
	}
	// This process writes too, at the same time.
	var logs syncBuffer
	l, err := openEventLog(path, newLogger(&logs))
	if err != nil {
		t.Fatalf("openEventLog while other processes open it: %v", err)
	}
	for i := 0; i < per; i++ {
		l.Record(event{RequestID: fmt.Sprintf("p0-%d", i), TS: time.Now(), Method: "CLI", Status: 200, Action: "process"})
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	for i, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Fatalf("writer process %d: %v\n%s", i+1, err, outs[i])
		}
		if !strings.Contains(outs[i].String(), "--- PASS: TestHelperEventWriter") {
			t.Fatalf("writer process %d did not run the helper:\n%s", i+1, outs[i])
		}
	}
	if f := l.failures.Load(); f != 0 {
		t.Fatalf("%d events failed in this process:\n%s", f, logs.String())
	}
	db := rawDB(t, path)
	if n := queryInt(t, db, `SELECT count(DISTINCT request_id) FROM event_log WHERE action = 'process'`); n != 3*per {
		t.Errorf("%d rows, want %d", n, 3*per)
	}
	ms, err := loadMigrations()
	if err != nil {
		t.Fatal(err)
	}
	if n := queryInt(t, db, `SELECT count(*) FROM schema_migrations`); n != len(ms) {
		t.Errorf("%d schema_migrations rows after concurrent opens, want %d, one per migration", n, len(ms))
	}
}

// originalSchema is the event_log table as the original Rust tool created it.
const originalSchema = `
CREATE TABLE event_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    method TEXT NOT NULL,
    path TEXT,
    status INTEGER NOT NULL,
    action TEXT NOT NULL,
    duration_ms INTEGER NOT NULL,
    meta TEXT NOT NULL,
    created_at INTEGER NOT NULL DEFAULT (strftime('%s','now'))
);
CREATE INDEX idx_event_log_ts ON event_log (ts);
CREATE INDEX idx_event_log_action ON event_log (action);
`

func TestOriginalDatabaseKeepsItsRows(t *testing.T) {
	path := filepath.Join(t.TempDir(), "pod-upgrade-trigger.db")
	db := rawDB(t, path)
	if _, err := db.Exec(originalSchema); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 3; i++ {
		if _, err := db.Exec(`INSERT INTO event_log (request_id, ts, method, path, status, action, duration_ms, meta)
			VALUES (?, ?, 'POST', '/github-package-update/demo', 202, 'github-webhook', 12, '{"old":true}')`,
			fmt.Sprintf("old-%d", i), 1600000000+i); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()

	var logs syncBuffer
	l := openTestLog(t, path, &logs)
	l.Record(event{RequestID: "new-1", TS: time.Now(), Method: "GET", Path: "/health", Status: 200, Action: "health"})
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	db = rawDB(t, path)
	old := readRows(t, db, `WHERE request_id LIKE 'old-%'`)
	if len(old) != 3 {
		t.Fatalf("%d original rows left, want 3", len(old))
	}
	for i, r := range old {
		if r.requestID != fmt.Sprintf("old-%d", i+1) || r.ts != int64(1600000001+i) || r.meta != `{"old":true}` {
			t.Errorf("original row %d changed: %+v", i+1, r)
		}
	}
	if n := queryInt(t, db, `SELECT count(*) FROM event_log WHERE request_id = 'new-1'`); n != 1 {
		t.Errorf("new row missing from the original database")
	}
	if n := queryInt(t, db, `SELECT count(*) FROM schema_migrations WHERE version = 1`); n != 1 {
		t.Errorf("schema_migrations not recorded in the original database")
	}
}

func TestNewerDatabaseIsRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "events.db")
	db := rawDB(t, path)
	for _, q := range []string{
		originalSchema,
		`CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)`,
		`INSERT INTO schema_migrations VALUES (1, '0001_create_event_log.sql', 1700000000)`,
		`INSERT INTO schema_migrations VALUES (999, '0999_from_the_future.sql', 1800000000)`,
	} {
		if _, err := db.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()
	l, err := openEventLog(path, newLogger(&syncBuffer{}))
	if err == nil {
		l.Close()
		t.Fatal("a database with schema version 999 was opened")
	}
	for _, want := range []string{"newer", "999", path} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

func TestOpenEventLogFailures(t *testing.T) {
	dir, file := dirWithFile(t)
	notDB := filepath.Join(dir, "not-a-database.db")
	if err := os.WriteFile(notDB, bytes.Repeat([]byte("this is not sqlite "), 100), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, path string }{
		{"parent is a file", filepath.Join(file, "events.db")},
		{"path is a directory", dir},
		{"not a database", notDB},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, err := openEventLog(tc.path, newLogger(&syncBuffer{}))
			if err == nil {
				l.Close()
				t.Fatalf("openEventLog(%s) succeeded", tc.path)
			}
			if !strings.Contains(err.Error(), tc.path) {
				t.Errorf("error %q does not name the path %s", err, tc.path)
			}
		})
	}
}

func TestFailedWritesSpillToStderr(t *testing.T) {
	var logs syncBuffer
	l, db := openTestLogDB(t, &logs)
	// Another process breaks the database under the writer.
	if _, err := db.Exec(`DROP TABLE event_log`); err != nil {
		t.Fatal(err)
	}
	const n = 5
	for i := 0; i < n; i++ {
		l.Record(event{RequestID: fmt.Sprintf("lost-%d", i), TS: time.Unix(1700000000, 0), Method: "GET",
			Path: "/health", Status: 200, Action: "health", Duration: 3 * time.Millisecond,
			Meta: map[string]any{"query": "token=REDACTED"}})
	}
	err := l.Write(context.Background(), event{RequestID: "lost-sync", TS: time.Now(), Method: "CLI", Status: 1, Action: "trigger"})
	if err == nil {
		t.Error("Write into a dropped table reported success")
	}
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	// After Close, an event cannot be queued: it spills too.
	l.Record(event{RequestID: "after-close", TS: time.Now(), Method: "GET", Status: 200, Action: "health"})

	if f := l.failures.Load(); f != n+2 {
		t.Errorf("failures = %d, want %d", f, n+2)
	}
	evs := spilled(t, logs.String())
	got := map[string]map[string]any{}
	for _, e := range evs {
		id, _ := e["request_id"].(string)
		got[id] = e
	}
	if len(evs) != n+2 || len(got) != n+2 {
		t.Fatalf("%d spilled events (%d distinct), want %d; log:\n%s", len(evs), len(got), n+2, logs.String())
	}
	e := got["lost-3"]
	want := map[string]any{"request_id": "lost-3", "ts": 1700000000.0, "method": "GET", "path": "/health",
		"status": 200.0, "action": "health", "duration_ms": 3.0, "meta": map[string]any{"query": "token=REDACTED"}}
	if !reflect.DeepEqual(e, want) {
		t.Errorf("spilled event\n got %v\nwant %v", e, want)
	}
	for _, id := range []string{"lost-sync", "after-close"} {
		if got[id] == nil {
			t.Errorf("event %s was not spilled", id)
		}
	}
}

func TestDatabasePath(t *testing.T) {
	const state = "/var/lib/state"
	for _, tc := range []struct {
		url, want string
		wantErr   bool
	}{
		{url: "sqlite://data/pod-upgrade-trigger.db", want: "/var/lib/state/data/pod-upgrade-trigger.db"},
		{url: "sqlite:data/x.db", want: "/var/lib/state/data/x.db"},
		{url: "data/x.db", want: "/var/lib/state/data/x.db"},
		{url: "x.db", want: "/var/lib/state/x.db"},
		{url: "./data/../x.db", want: "/var/lib/state/x.db"},
		{url: "sqlite:///srv/db/x.db", want: "/srv/db/x.db"},
		{url: "sqlite:/srv/db/x.db", want: "/srv/db/x.db"},
		{url: "/srv/db/x.db", want: "/srv/db/x.db"},
		{url: "sqlite://data/x.db?mode=rwc", want: "/var/lib/state/data/x.db"},
		{url: "sqlite:///srv/x.db?mode=rwc", want: "/srv/x.db"},
		{url: "/srv/a:b/x.db", want: "/srv/a:b/x.db"},
		{url: "sqlite://a:b.db", want: "/var/lib/state/a:b.db"},
		{url: "  sqlite://data/x.db  ", want: "/var/lib/state/data/x.db"},
		{url: "", wantErr: true},
		{url: "sqlite://", wantErr: true},
		{url: "sqlite:", wantErr: true},
		{url: ":memory:", wantErr: true},
		{url: "sqlite::memory:", wantErr: true},
		{url: "sqlite://:memory:", wantErr: true},
		{url: "sqlite://?mode=rwc", wantErr: true},
		// Another scheme or an unknown parameter is refused, never read as a file name or dropped.
		{url: "postgres://x", wantErr: true},
		{url: "postgres://user@db.example/events", wantErr: true},
		{url: "mysql:x", wantErr: true},
		{url: "file:x.db", wantErr: true},
		{url: "a:b.db", wantErr: true},
		{url: "sqlite://data/x.db?mode=ro", wantErr: true},
		{url: "sqlite:///srv/x.db?mode=rwc&cache=shared", wantErr: true},
		{url: "data/x.db?journal_mode=off", wantErr: true},
	} {
		t.Run(tc.url, func(t *testing.T) {
			got, err := databasePath(tc.url, state)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("databasePath(%q) = %q, want an error", tc.url, got)
				}
				if !strings.Contains(err.Error(), "WEBHOOK_DB_URL") {
					t.Errorf("error %q does not name WEBHOOK_DB_URL", err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("databasePath(%q) = %q, %v; want %q", tc.url, got, err, tc.want)
			}
		})
	}
}

// TestRedactPath: the token segment of a registry route never reaches a row, however the path
// is spelled; every other path is stored as it came.
func TestRedactPath(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"/registry/dockerhub/app/s3cret", "/registry/dockerhub/app/REDACTED"},
		{"/registry/quay/app", "/registry/quay/app"},
		{"/registry/quay/app/", "/registry/quay/app/"},
		{"/registry/dockerhub/app/s3cret/more", "/registry/dockerhub/app/REDACTED"},
		{"//registry//dockerhub/app/s3cret", "/registry/dockerhub/app/REDACTED"},
		{"/./registry/dockerhub/./app/s3cret", "/registry/dockerhub/app/REDACTED"},
		{"/registry/dockerhub/app/../s3cret", "/registry/dockerhub/app/REDACTED"},
		{"/github-package-update/app/redeploy", "/github-package-update/app/redeploy"},
		{"/x/registry/a/b/c", "/x/registry/a/b/REDACTED"},
		{"/REGISTRY/a/b/s3cret", "/REGISTRY/a/b/REDACTED"},
		{"/api/Registry2/a/b/s3cret/x", "/api/Registry2/a/b/REDACTED"},
		{"", ""},
	} {
		if got := redactPath(tc.in); got != tc.want || strings.Contains(got, "s3cret") {
			t.Errorf("redactPath(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestRedactQuery(t *testing.T) {
	for _, tc := range []struct {
		name, raw, want string
		secret          string // must not appear in the result
	}{
		{name: "empty", raw: "", want: ""},
		{name: "no secret", raw: "a=1&b=two", want: "a=1&b=two"},
		{name: "token", raw: "token=s3cret", want: "token=REDACTED", secret: "s3cret"},
		{name: "upper case", raw: "TOKEN=s3cret", want: "TOKEN=REDACTED", secret: "s3cret"},
		{name: "mixed case", raw: "ToKeN=s3cret", want: "ToKeN=REDACTED", secret: "s3cret"},
		{name: "access_token", raw: "access_token=s3cret", want: "access_token=REDACTED", secret: "s3cret"},
		{name: "secret", raw: "secret=s3cret", want: "secret=REDACTED", secret: "s3cret"},
		{name: "encoded key", raw: "%74oken=s3cret", want: "%74oken=REDACTED", secret: "s3cret"},
		{name: "encoded key upper hex", raw: "TOK%45N=s3cret", want: "TOK%45N=REDACTED", secret: "s3cret"},
		{name: "no value", raw: "token", want: "token"},
		{name: "empty value", raw: "token=", want: "token=REDACTED"},
		{name: "several params", raw: "a=1&token=s3cret&b=2&access_token=s3cret2&c", want: "a=1&token=REDACTED&b=2&access_token=REDACTED&c", secret: "s3cret"},
		{name: "repeated", raw: "token=one&token=two", want: "token=REDACTED&token=REDACTED", secret: "one"},
		{name: "encoded ampersand in value", raw: "token=ab%26cd&x=1", want: "token=REDACTED&x=1", secret: "cd"},
		{name: "equals in value", raw: "token=a=b", want: "token=REDACTED", secret: "a=b"},
		{name: "bad escape elsewhere", raw: "x=%zz&token=s3cret", want: "x=%zz&token=REDACTED", secret: "s3cret"},
		{name: "bad escape in key", raw: "tok%zzen=v", want: "tok%zzen=v"},
		{name: "plus in key", raw: "+token=s3cret", want: "+token=REDACTED", secret: "s3cret"},
		{name: "not a token", raw: "tokens=1&my_token_id=2", want: "tokens=1&my_token_id=2"},
		// Go's server does not split on ';' but the raw query reaches the row as typed, so a
		// token after a ';' must not be stored either.
		{name: "semicolon separator", raw: "x=1;token=s3cret", secret: "s3cret"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := redactQuery(tc.raw)
			if tc.secret != "" && strings.Contains(got, tc.secret) {
				t.Errorf("redactQuery(%q) = %q keeps the secret %q", tc.raw, got, tc.secret)
			}
			if tc.want != "" || tc.raw == "" {
				if got != tc.want {
					t.Errorf("redactQuery(%q) = %q, want %q", tc.raw, got, tc.want)
				}
			}
		})
	}
}

func TestNewRequestIDIsUnique(t *testing.T) {
	seen := map[string]bool{}
	for i := 0; i < 1000; i++ {
		id := newRequestID()
		if len(id) != 32 || strings.Trim(id, "0123456789abcdef") != "" {
			t.Fatalf("request id %q is not 32 hex digits", id)
		}
		if seen[id] {
			t.Fatalf("request id %q repeated", id)
		}
		seen[id] = true
	}
}

// Reading the log: filters, the events command, the events API, /metrics and /health details.

// update rewrites the golden files under testdata/events instead of comparing with them, and
// saves the status page's screenshot.
var update = flag.Bool("update", false, "rewrite the golden files under testdata/events and testdata/status-page.png")

// fixtureNow is the "now" the filter tests resolve relative times against.
var fixtureNow = time.Date(2024, 3, 1, 15, 0, 0, 0, time.UTC)

// fixtureToken is a token that reached a stored query before redaction existed; it must never
// come back out.
const fixtureToken = "tok-abc-123"

// fixtureEvents are the rows of the reading tests; written in one Write to a fresh database they
// get ids 1 to 15 in this order. Two days: a failed pull on 28 February, and on 1 March a
// scheduler tick, a refused push, a redeploy of delivery d-1 with every step, an ignored npm
// push, a manual trigger and a 404.
func fixtureEvents() []event {
	day1 := time.Date(2024, 2, 28, 9, 0, 0, 0, time.UTC)
	day2 := time.Date(2024, 3, 1, 0, 0, 0, 0, time.UTC)
	at := func(base time.Time, h, m, s int) time.Time {
		return base.Add(time.Duration(h)*time.Hour + time.Duration(m)*time.Minute + time.Duration(s)*time.Second)
	}
	task := func(ts time.Time, delivery, unit, image, step string, status int, d time.Duration, extra map[string]any) event {
		meta := map[string]any{"delivery": delivery, "unit": unit, "image": image, "event": "package", "step": step}
		for k, v := range extra {
			meta[k] = v
		}
		return event{RequestID: "task-" + delivery, TS: ts, Method: "TASK", Path: "/github-package-update/" + strings.TrimSuffix(unit, ".service"),
			Status: status, Action: "github-task", Duration: d, Meta: meta}
	}
	const web, demo = "ghcr.io/acme/web:stable", "ghcr.io/acme/demo:latest"
	return []event{
		/* 1 */ {RequestID: "req-health", TS: day1, Method: "GET", Path: "/health", Status: 200, Action: "health",
			Duration: 2 * time.Millisecond, Meta: map[string]any{"path": "/health", "remote_addr": "127.0.0.1:40000"}},
		/* 2 */ {RequestID: "req-web", TS: at(day1, 0, 5, 0), Method: "POST", Path: "/github-package-update/web", Status: 202,
			Action: "github-webhook", Duration: 41 * time.Millisecond, Meta: map[string]any{"delivery": "d-old", "unit": "web.service",
				"image": web, "reason": "queued", "event": "package", "task_unit": "webhook-task-d-old.service"}},
		/* 3 */ task(at(day1, 0, 5, 1), "d-old", "web.service", web, "started", 202, 0, map[string]any{"force": false}),
		/* 4 */ task(at(day1, 0, 5, 9), "d-old", "web.service", web, "pull-failed", 502, 8200*time.Millisecond, map[string]any{
			"attempts": 3, "exit_code": 125,
			"error": "podman pull --quiet -- " + web + " failed (exit 125): Error: initializing source docker://" + web + ": manifest unknown"}),
		/* 5 */ {RequestID: "req-tick", TS: at(day2, 13, 30, 0), Method: "SCHEDULER", Status: 202, Action: "scheduler",
			Duration: 310 * time.Millisecond, Meta: map[string]any{"unit": "podman-auto-update.service", "iteration": 7}},
		/* 6 */ {RequestID: "req-badsig", TS: at(day2, 14, 2, 0), Method: "POST", Path: "/github-package-update/demo", Status: 401,
			Action: "github-webhook", Duration: time.Millisecond, Meta: map[string]any{"reason": "bad-signature", "body_bytes": 1234}},
		/* 7 */ {RequestID: "req-push", TS: at(day2, 14, 2, 3), Method: "POST", Path: "/github-package-update/demo", Status: 202,
			Action: "github-webhook", Duration: 38 * time.Millisecond, Meta: map[string]any{"delivery": "d-1", "unit": "demo.service",
				"image": demo, "reason": "queued", "event": "package", "query": "token=" + fixtureToken + "&x=1"}},
		/* 8 */ task(at(day2, 14, 2, 3), "d-1", "demo.service", demo, "started", 202, 0, map[string]any{"force": false}),
		/* 9 */ task(at(day2, 14, 2, 5), "d-1", "demo.service", demo, "pulled", 200, 2100*time.Millisecond, map[string]any{
			"attempts": 1, "exit_code": 0, "pull_ms": 1500, "previous_image_id": "1111", "image_id": "2222"}),
		/* 10 */ task(at(day2, 14, 2, 6), "d-1", "demo.service", demo, "restarted", 200, 3*time.Second, map[string]any{"exit_code": 0, "restart_ms": 800}),
		/* 11 */ task(at(day2, 14, 2, 26), "d-1", "demo.service", demo, "healthy", 200, 23*time.Second, map[string]any{"reason": "new image"}),
		/* 12 */ task(at(day2, 14, 2, 26), "d-1", "demo.service", demo, "completed", 200, 23*time.Second, map[string]any{"image_id": "2222"}),
		/* 13 */ {RequestID: "req-npm", TS: at(day2, 14, 10, 0), Method: "POST", Path: "/github-package-update/demo", Status: 202,
			Action: "github-webhook", Duration: 3 * time.Millisecond, Meta: map[string]any{"delivery": "d-2", "unit": "demo.service",
				"reason": "not-container", "event": "package"}},
		/* 14 */ {RequestID: "req-manual", TS: at(day2, 14, 30, 0), Method: "POST", Path: "/api/manual/trigger", Status: 202,
			Action: "manual-trigger", Duration: 1200 * time.Millisecond, Meta: map[string]any{"caller": "ops", "reason": "hotfix", "dry_run": false}},
		/* 15 */ {RequestID: "req-404", TS: at(day2, 14, 45, 0), Method: "GET", Path: "/nope", Status: 404, Action: "not-found",
			Meta: map[string]any{"path": "/nope"}},
	}
}

// writeFixture writes fixtureEvents through l and fails unless they got ids 1 to 15.
func writeFixture(t *testing.T, l *eventLog) {
	t.Helper()
	if err := l.Write(context.Background(), fixtureEvents()...); err != nil {
		t.Fatalf("write the fixture rows: %v", err)
	}
	var lo, hi int64
	if err := l.db.QueryRow(`SELECT min(id), max(id) FROM event_log`).Scan(&lo, &hi); err != nil || lo != 1 || hi != int64(len(fixtureEvents())) {
		t.Fatalf("fixture ids %d..%d (%v), want 1..%d: the database was not fresh", lo, hi, err, len(fixtureEvents()))
	}
}

// fixtureDB writes the fixture rows into a new database file and returns its path.
func fixtureDB(t *testing.T, path string) string {
	t.Helper()
	l, err := openEventLog(path, newLogger(&syncBuffer{}))
	if err != nil {
		t.Fatal(err)
	}
	writeFixture(t, l)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

func eventIDs(evs []storedEvent) []int64 {
	ids := []int64{}
	for _, e := range evs {
		ids = append(ids, e.ID)
	}
	return ids
}

// idRange returns from, from-1 … to (or ascending when from < to).
func idRange(from, to int64) []int64 {
	ids := []int64{}
	step := int64(-1)
	if from < to {
		step = 1
	}
	for i := from; ; i += step {
		ids = append(ids, i)
		if i == to {
			return ids
		}
	}
}

// Benchmarks of the event log (issue 7): rows queued through the batching writer, and rows
// committed one at a time with Write.

func benchEvent(i int) event {
	return event{RequestID: newRequestID(), TS: time.Now(), Method: "GET", Path: "/health", Status: 200, Action: "health",
		Duration: time.Millisecond, Meta: map[string]any{"path": "/health", "query": "token=REDACTED", "n": i}}
}

// BenchmarkEventLogRecord queues b.N rows and closes the log, which returns once every row is
// committed: the figure is one row through the batching writer.
func BenchmarkEventLogRecord(b *testing.B) {
	logs := &syncBuffer{}
	l, err := openEventLog(filepath.Join(b.TempDir(), "events.db"), newLogger(logs))
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		l.Record(benchEvent(i))
	}
	if err := l.Close(); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	if n := l.failures.Load(); n != 0 {
		b.Fatalf("%d rows spilled:\n%s", n, logs)
	}
}

// BenchmarkEventLogWrite commits one row per transaction, as a redeploy step does.
func BenchmarkEventLogWrite(b *testing.B) {
	logs := &syncBuffer{}
	l, err := openEventLog(filepath.Join(b.TempDir(), "events.db"), newLogger(logs))
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	ctx := context.Background()
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		if err := l.Write(ctx, benchEvent(i)); err != nil {
			b.Fatal(err)
		}
	}
}

// TestMigrationKeepsClaimsStories: a database of the version before migration 0005 (claims
// without a step, the status page's JSON indexes on event_log) opens with each claim's step taken
// from its task's newest row, and event_log left with the original tool's indexes only.
func TestMigrationKeepsClaimsStories(t *testing.T) {
	path := filepath.Join(t.TempDir(), "events.db")
	db := rawDB(t, path)
	ms, err := loadMigrations()
	if err != nil {
		t.Fatal(err)
	}
	db.Exec(`CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)`)
	for _, m := range ms[:4] {
		if _, err := db.Exec(m.sql); err != nil {
			t.Fatalf("%s: %v", m.name, err)
		}
		db.Exec(`INSERT INTO schema_migrations VALUES (?, ?, 1)`, m.version, m.name)
	}
	for _, q := range []string{
		`INSERT INTO github_deliveries (delivery_id, unit, image, event, request_id, status, received_at, updated_at, covered_by, task_unit)
			VALUES ('d-1', 'a.service', 'ghcr.io/o/a:1', 'package', 'r1', 'done', 1, 2, 'd-1', 'webhook-task-d-1'),
			('d-2', 'a.service', 'ghcr.io/o/a:1', 'package', 'r2', 'done', 1, 2, 'd-1', 'webhook-task-d-1'),
			('d-3', 'b.service', 'ghcr.io/o/b:1', 'package', 'r3', 'pending', 1, 2, NULL, NULL)`,
		`INSERT INTO event_log (request_id, ts, method, status, action, duration_ms, meta) VALUES
			('t', 1, 'TASK', 200, 'github-task', 0, '{"delivery":"d-1","step":"pulled"}'),
			('t', 2, 'TASK', 500, 'github-task', 0, '{"delivery":"d-1","step":"rolled-back"}')`,
	} {
		if _, err := db.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()
	l := openTestLog(t, path, &syncBuffer{})
	for id, want := range map[string]string{"d-1": "rolled-back", "d-2": "rolled-back", "d-3": ""} {
		var step string
		if err := l.db.QueryRow(`SELECT step FROM github_deliveries WHERE delivery_id = ?`, id).Scan(&step); err != nil || step != want {
			t.Errorf("claim %s: step %q, %v; want %q", id, step, err, want)
		}
	}
	var indexes []string
	rows, err := l.db.Query(`SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'event_log' AND sql IS NOT NULL ORDER BY name`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var n string
		rows.Scan(&n)
		indexes = append(indexes, n)
	}
	rows.Close()
	if want := []string{"idx_event_log_action", "idx_event_log_ts"}; !slices.Equal(indexes, want) {
		t.Errorf("event_log indexes %v, want the original tool's %v", indexes, want)
	}
}

// TestClaimOutcome: the one outcome model, from a claim's status and its task's newest step.
func TestClaimOutcome(t *testing.T) {
	for _, tc := range []struct {
		status claimStatus
		step   string
		want   outcome
	}{
		{claimPending, "", outcome{"running", "queued"}},
		{claimDispatching, "", outcome{"running", "dispatching"}},
		{claimDispatched, "", outcome{"running", "dispatched"}},
		{claimDispatched, "pulled", outcome{"running", "pulled"}},
		{claimDispatched, "completed", outcome{"ok", "restarted, healthy"}},
		{claimDone, "completed", outcome{"ok", "restarted, healthy"}},
		{claimDone, "up-to-date", outcome{"ok", "up to date"}},
		{claimDone, "rolled-back", outcome{"rolled-back", "rolled back"}},
		{claimDone, "rate-limited", outcome{"skipped", "rate limited"}},
		{claimDone, "pull-failed", outcome{"failed", "pull failed"}},
		{claimDone, "image-mismatch", outcome{"failed", "image mismatch"}},
		{claimDone, "health-failed", outcome{"failed", "ended without a last step after health failed"}},
		{claimDone, "", outcome{"failed", "ended without a last step"}},
		{claimFailed, "", outcome{"failed", "dispatch failed"}},
	} {
		if got := claimOutcome(tc.status, tc.step); got != tc.want {
			t.Errorf("claimOutcome(%s, %q) = %v, want %v", tc.status, tc.step, got, tc.want)
		}
	}
	if got := requestOutcome(202, "tag-mismatch"); got != (outcome{"ignored", "tag mismatch"}) {
		t.Errorf("requestOutcome(202, tag-mismatch) = %v", got)
	}
	if got := requestOutcome(400, "invalid-json"); got != (outcome{"failed", "invalid json"}) {
		t.Errorf("requestOutcome(400, invalid-json) = %v", got)
	}
}
