// webhook_health_test.go tests webhook.go's observability routes: /health (short and verbose,
// its failures, that it tells the truth about the event log and never queues for its write
// lock) and the token of /metrics. What /metrics reports is eventlog_metrics_test.go's.
package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestMetricsToken(t *testing.T) {
	const token = "metrics-token-4f1e"
	ts := newTestServer(t, map[string]string{"WEBHOOK_METRICS_TOKEN": token, "WEBHOOK_TOKEN": "other-token"}, nil)
	var ids []string
	for _, tc := range []struct {
		name   string
		target string
		hdr    map[string]string
		want   int
	}{
		{name: "no token", target: "/metrics", want: 401},
		{name: "wrong bearer", target: "/metrics", hdr: map[string]string{"Authorization": "Bearer nope"}, want: 401},
		{name: "wrong query token", target: "/metrics?token=nope", want: 401},
		{name: "another route's token", target: "/metrics?token=other-token", want: 401},
		{name: "bearer", target: "/metrics", hdr: map[string]string{"Authorization": "Bearer " + token}, want: 200},
		{name: "query token", target: "/metrics?token=" + token, want: 200},
	} {
		resp, body := obsGet(t, ts, tc.target, tc.hdr)
		if resp.StatusCode != tc.want {
			t.Errorf("%s: %d %q, want %d", tc.name, resp.StatusCode, body, tc.want)
		}
		if resp.StatusCode == 401 && strings.Contains(body, "webhook_") {
			t.Errorf("%s: a refused scrape returned metrics", tc.name)
		}
		ids = append(ids, resp.Header.Get("X-Request-Id"))
	}
	rows := ts.rows(t)
	for i, id := range ids {
		r, ok := rows[id]
		if i >= 4 { // the two scrapes that succeeded are counted in the probe summary
			if ok || probeCount(t, rows) != 2 {
				t.Errorf("scrape %d: own row %v, probe summaries count %d; want it counted there", i, ok, probeCount(t, rows))
			}
			continue
		}
		if !ok {
			t.Errorf("no row for request %s", id)
			continue
		}
		if r.action != "metrics" || strings.Contains(r.meta, token) {
			t.Errorf("row %+v: want action metrics and no token", r)
		}
	}
	if strings.Contains(ts.logs.String(), token) {
		t.Errorf("the log holds the metrics token:\n%s", ts.logs.String())
	}
}

// healthBody is the verbose /health answer.
type healthBody struct {
	Status   string   `json:"status"`
	Failing  []string `json:"failing"`
	Database struct {
		Path          string `json:"path"`
		Writable      bool   `json:"writable"`
		SchemaVersion *int   `json:"schema_version"`
		PendingWrites *int64 `json:"pending_writes"`
		Error         string `json:"error"`
	} `json:"database"`
	StateDir struct {
		Path     string `json:"path"`
		Writable bool   `json:"writable"`
		Error    string `json:"error"`
	} `json:"state_dir"`
	GitHubSecret  *bool           `json:"github_secret_configured"`
	Token         *bool           `json:"token_configured"`
	ManualToken   *bool           `json:"manual_token_configured"`
	MetricsToken  *bool           `json:"metrics_token_configured"`
	Registry      map[string]bool `json:"registry_tokens_configured"`
	SchedulerTick *struct {
		Time   string `json:"time"`
		Status int    `json:"status"`
	} `json:"last_scheduler_tick"`
}

// getHealth sends GET target (with Accept when accept is set) and decodes a JSON answer.
func getHealth(t *testing.T, ts *testServer, target, accept string) (int, healthBody, string) {
	t.Helper()
	return obsGetJSON[healthBody](t, ts, target, "Accept", accept)
}

func TestHealthVerbose(t *testing.T) {
	ms, err := loadMigrations()
	if err != nil {
		t.Fatal(err)
	}
	latest := ms[len(ms)-1].version
	secrets := map[string]string{
		"GITHUB_WEBHOOK_SECRET":         "gh-secret-VALUE-1",
		"WEBHOOK_TOKEN":                 "plain-token-VALUE-2",
		"WEBHOOK_MANUAL_TOKEN":          "manual-token-VALUE-3",
		"WEBHOOK_METRICS_TOKEN":         "metrics-token-VALUE-4",
		"WEBHOOK_REGISTRY_TOKEN_HARBOR": "harbor-token-VALUE-5",
	}
	for _, tc := range []struct {
		name                           string
		env                            []string // which of secrets to set
		secret, token, manual, metrics bool
	}{
		{name: "everything configured", env: []string{"GITHUB_WEBHOOK_SECRET", "WEBHOOK_TOKEN", "WEBHOOK_MANUAL_TOKEN", "WEBHOOK_METRICS_TOKEN", "WEBHOOK_REGISTRY_TOKEN_HARBOR"},
			secret: true, token: true, manual: true, metrics: true},
		{name: "nothing configured"},
		{name: "only WEBHOOK_TOKEN, which the manual API falls back to", env: []string{"WEBHOOK_TOKEN"}, token: true, manual: true},
		{name: "secret and metrics token", env: []string{"GITHUB_WEBHOOK_SECRET", "WEBHOOK_METRICS_TOKEN"}, secret: true, metrics: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := map[string]string{}
			for _, k := range tc.env {
				env[k] = secrets[k]
			}
			ts := newTestServer(t, env, nil)
			tick := func(ts time.Time, status int) event {
				return event{RequestID: "tick", TS: ts, Method: "SCHEDULER", Status: status, Action: "scheduler",
					Meta: map[string]any{"unit": "podman-auto-update.service"}}
			}
			if err := ts.events.Write(context.Background(), tick(fixtureNow.Add(-time.Hour), 202),
				tick(fixtureNow, 500), event{RequestID: "x", TS: fixtureNow.Add(time.Hour), Method: "GET", Status: 200, Action: "health"}); err != nil {
				t.Fatal(err)
			}
			for _, ask := range []struct{ target, accept string }{
				{"/health?verbose=1", ""},
				{"/health", "application/json"},
				{"/health", "text/html, application/json;q=0.9"},
			} {
				code, h, body := getHealth(t, ts, ask.target, ask.accept)
				if code != 200 || h.Status != "ok" || len(h.Failing) != 0 {
					t.Errorf("%s (Accept %q): %d %s", ask.target, ask.accept, code, body)
				}
				if !h.Database.Writable || h.Database.SchemaVersion == nil || *h.Database.SchemaVersion != latest ||
					h.Database.PendingWrites == nil || h.Database.Path != ts.cfg.dbPath {
					t.Errorf("database %+v, want writable, schema version %d, pending writes, path %s", h.Database, latest, ts.cfg.dbPath)
				}
				if !h.StateDir.Writable || h.StateDir.Path != ts.cfg.stateDir {
					t.Errorf("state_dir %+v", h.StateDir)
				}
				for _, c := range []struct {
					name string
					got  *bool
					want bool
				}{
					{"github_secret_configured", h.GitHubSecret, tc.secret}, {"token_configured", h.Token, tc.token},
					{"manual_token_configured", h.ManualToken, tc.manual}, {"metrics_token_configured", h.MetricsToken, tc.metrics},
				} {
					if c.got == nil || *c.got != c.want {
						t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
					}
				}
				harbor := slices.Contains(tc.env, "WEBHOOK_REGISTRY_TOKEN_HARBOR")
				if len(h.Registry) != len(pushSources)-1 || h.Registry["harbor"] != harbor || h.Registry["quay"] || h.Registry["github"] {
					t.Errorf("registry_tokens_configured %v, want every registry source, harbor %v", h.Registry, harbor)
				}
				if h.SchedulerTick == nil || h.SchedulerTick.Time != "2024-03-01T15:00:00Z" || h.SchedulerTick.Status != 500 {
					t.Errorf("last_scheduler_tick %+v, want the newest scheduler row (15:00, 500)", h.SchedulerTick)
				}
				for _, v := range secrets {
					if strings.Contains(body, v) {
						t.Errorf("the body holds a secret value: %s", body)
					}
				}
			}
			// Probes still get the two bytes they expect.
			for _, target := range []string{"/health", "/health?verbose=", "/health?x=1"} {
				resp, body := obsGet(t, ts, target, nil)
				if resp.StatusCode != 200 || body != "ok" {
					t.Errorf("GET %s = %d %q, want 200 \"ok\"", target, resp.StatusCode, body)
				}
			}
		})
	}
	t.Run("no scheduler tick yet", func(t *testing.T) {
		ts := newTestServer(t, nil, nil)
		code, h, body := getHealth(t, ts, "/health?verbose=1", "")
		if code != 200 || h.SchedulerTick != nil || strings.Contains(body, "last_scheduler_tick") {
			t.Errorf("%d %s, want 200 without last_scheduler_tick", code, body)
		}
	})
}

func TestHealthVerboseFailures(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		state string
	}{
		{name: "state dir under a regular file", state: filepath.Join(file, "state")},
		{name: "state dir removed", state: filepath.Join(t.TempDir(), "gone")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := newTestServer(t, nil, func(cfg *config) { cfg.stateDir = tc.state })
			code, h, body := getHealth(t, ts, "/health?verbose=1", "")
			if code != 503 || h.Status != "fail" || !reflect.DeepEqual(h.Failing, []string{"state_dir"}) ||
				h.StateDir.Writable || h.StateDir.Error == "" || !h.Database.Writable {
				t.Errorf("%d %s, want 503 failing [state_dir] only", code, body)
			}
			if resp, body := obsGet(t, ts, "/health", nil); resp.StatusCode != 503 || body != "fail: state_dir\n" {
				t.Errorf("plain /health = %d %q, want 503 naming state_dir: a probe must see what verbose sees", resp.StatusCode, body)
			}
		})
	}

	t.Run("database write lock held elsewhere", func(t *testing.T) {
		ts := newTestServer(t, nil, nil)
		db := rawDB(t, ts.cfg.dbPath)
		ctx := context.Background()
		conn, err := db.Conn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
			t.Fatal(err)
		}
		locked := true
		release := func() {
			if locked {
				locked = false
				if _, err := conn.ExecContext(ctx, "ROLLBACK"); err != nil {
					t.Error(err)
				}
			}
		}
		defer release()
		begun := time.Now()
		code, h, body := getHealth(t, ts, "/health?verbose=1", "")
		took := time.Since(begun)
		// Plain /health does not take the write lock: a lock held elsewhere is not a failure.
		if resp, body := obsGet(t, ts, "/health", nil); resp.StatusCode != 200 {
			t.Errorf("plain /health with the lock held elsewhere: %d %q", resp.StatusCode, body)
		}
		release()
		// Not an assertion on time: the write probe is bounded by a 2 s context, and this shows
		// whether that bound holds against busy_timeout (10 s).
		t.Logf("verbose /health with the write lock held elsewhere answered %d after %s (probe context 2s, busy_timeout %s)",
			code, took.Round(100*time.Millisecond), busyTimeout)
		if code != 503 || h.Status != "fail" || !slices.Contains(h.Failing, "database") || h.Database.Writable || h.Database.Error == "" {
			t.Errorf("%d %s, want 503 failing database", code, body)
		}
		if slices.Contains(h.Failing, "state_dir") {
			t.Errorf("state_dir reported failing while only the database was locked: %s", body)
		}
		// Once the lock is gone, the same question is answered 200 again (the answer is kept
		// for a second).
		waitFor(t, "verbose /health to answer 200 after the lock was released", func() bool {
			code, _, _ := getHealth(t, ts, "/health?verbose=1", "")
			return code == 200
		})
	})
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
