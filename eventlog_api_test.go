// eventlog_api_test.go tests reading the event log through /api/events and
// /api/deliveries/<id>: the token, filters, paging, a delivery's story and its order, and, on the
// rig, a real redeploy's story read back through the events command and the API.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// eventsPage is the answer of /api/events and /api/deliveries/<id>.
type eventsPage struct {
	Events       []storedEvent `json:"events"`
	NextBeforeID *int64        `json:"next_before_id"`
	Delivery     string        `json:"delivery"`
	TaskDelivery string        `json:"task_delivery"`
	Error        string        `json:"error"`
}

// getPage sends GET target with the bearer token (none when "") and decodes the answer.
func getPage(t *testing.T, ts *testServer, target, bearer string) (int, eventsPage, string) {
	t.Helper()
	if bearer != "" {
		bearer = "Bearer " + bearer
	}
	return obsGetJSON[eventsPage](t, ts, target, "Authorization", bearer)
}

const apiToken = "api-token-9c2d"

func TestEventsAPIAuth(t *testing.T) {
	ts := newTestServer(t, map[string]string{"WEBHOOK_MANUAL_TOKEN": apiToken, "WEBHOOK_TOKEN": "plain-token-77"}, nil)
	writeFixture(t, ts.events)
	var ids []string
	for _, tc := range []struct {
		name, target string
		hdr          map[string]string
		want         int
	}{
		{name: "no token", target: "/api/events", want: 401},
		{name: "empty query token", target: "/api/events?token=", want: 401},
		{name: "wrong bearer", target: "/api/events", hdr: map[string]string{"Authorization": "Bearer wrong"}, want: 401},
		{name: "wrong query token", target: "/api/events?token=wrong", want: 401},
		{name: "WEBHOOK_TOKEN is not the manual token", target: "/api/events?token=plain-token-77", want: 401},
		{name: "basic auth", target: "/api/events", hdr: map[string]string{"Authorization": "Basic " + apiToken}, want: 401},
		{name: "wrong bearer beats a right query token", target: "/api/events?token=" + apiToken,
			hdr: map[string]string{"Authorization": "Bearer wrong"}, want: 401},
		{name: "bearer", target: "/api/events", hdr: map[string]string{"Authorization": "Bearer " + apiToken}, want: 200},
		{name: "bearer in lower case", target: "/api/events", hdr: map[string]string{"Authorization": "bearer " + apiToken}, want: 200},
		{name: "query token", target: "/api/events?limit=2&token=" + apiToken, want: 200},
		{name: "deliveries without a token", target: "/api/deliveries/d-1", want: 401},
		{name: "deliveries with a wrong token", target: "/api/deliveries/d-1?token=wrong", want: 401},
		{name: "deliveries with the query token", target: "/api/deliveries/d-1?token=" + apiToken, want: 200},
		{name: "deliveries with bearer", target: "/api/deliveries/d-1", hdr: map[string]string{"Authorization": "Bearer " + apiToken}, want: 200},
	} {
		resp, body := obsGet(t, ts, tc.target, tc.hdr)
		if resp.StatusCode != tc.want {
			t.Errorf("%s: %d %q, want %d", tc.name, resp.StatusCode, body, tc.want)
		}
		if tc.want == 401 && body != "{\"error\":\"unauthorized\"}\n" {
			t.Errorf("%s: refused with body %q", tc.name, body)
		}
		if strings.Contains(body, fixtureToken) {
			t.Errorf("%s: the stored token came back: %s", tc.name, body)
		}
		ids = append(ids, resp.Header.Get("X-Request-Id"))
	}
	ts.shutdown() // flushes the log
	rows := map[string]eventRow{}
	for _, r := range readRows(t, rawDB(t, ts.cfg.dbPath), `WHERE action = 'events-api'`) {
		rows[r.requestID] = r
	}
	if len(rows) != len(ids) {
		t.Errorf("%d events-api rows for %d requests", len(rows), len(ids))
	}
	for _, id := range ids {
		r, ok := rows[id]
		if !ok {
			t.Errorf("no row for request %s", id)
			continue
		}
		if r.action != "events-api" {
			t.Errorf("request %s: action %q, want events-api", id, r.action)
		}
	}
	for _, tok := range []string{apiToken, "plain-token-77"} {
		for id, r := range rows {
			if strings.Contains(r.meta, tok) {
				t.Errorf("row %s stores a token: %s", id, r.meta)
			}
		}
		if strings.Contains(ts.logs.String(), tok) {
			t.Errorf("the log holds a token:\n%s", ts.logs.String())
		}
	}
}

func TestEventsAPIFilters(t *testing.T) {
	ts := newTestServer(t, map[string]string{"WEBHOOK_MANUAL_TOKEN": apiToken}, nil)
	writeFixture(t, ts.events)
	null := func() *int64 { return nil }
	id := func(n int64) *int64 { return &n }
	for _, tc := range []struct {
		name  string
		query string
		want  []int64
		next  *int64
	}{
		{name: "action", query: "action=github-task", want: []int64{12, 11, 10, 9, 8, 4, 3}, next: null()},
		{name: "unit", query: "unit=web", want: []int64{4, 3, 2}, next: null()},
		{name: "unit full name", query: "unit=web.service&limit=2", want: []int64{4, 3}, next: id(3)},
		{name: "delivery", query: "delivery=d-1", want: idRange(12, 7), next: null()},
		{name: "status", query: "status=202&before_id=16", want: []int64{14, 13, 8, 7, 5, 3, 2}, next: null()},
		{name: "since RFC 3339", query: "since=" + url.QueryEscape("2024-03-01T14:02:03Z") + "&before_id=16", want: idRange(15, 7), next: null()},
		{name: "since with an offset", query: "since=" + url.QueryEscape("2024-03-01T16:02:03+02:00") + "&before_id=16", want: idRange(15, 7), next: null()},
		{name: "before_id", query: "before_id=4", want: []int64{3, 2, 1}, next: null()},
		{name: "limit exactly the rest", query: "before_id=4&limit=3", want: []int64{3, 2, 1}, next: id(1)},
		{name: "limit and before_id", query: "before_id=10&limit=4", want: []int64{9, 8, 7, 6}, next: id(6)},
		{name: "combined", query: "action=github-webhook&unit=demo&status=202", want: []int64{13, 7}, next: null()},
		{name: "nothing matches", query: "action=nothing", want: []int64{}, next: null()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, p, body := getPage(t, ts, "/api/events?"+tc.query, apiToken)
			if code != 200 {
				t.Fatalf("%d %s", code, body)
			}
			if got := eventIDs(p.Events); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("ids %v, want %v", got, tc.want)
			}
			if !reflect.DeepEqual(p.NextBeforeID, tc.next) {
				t.Errorf("next_before_id %v, want %v", p.NextBeforeID, tc.next)
			}
			if !strings.Contains(body, `"events":[`) {
				t.Errorf("events is not a JSON array: %s", body)
			}
			if strings.Contains(body, fixtureToken) {
				t.Errorf("a stored token came back: %s", body)
			}
		})
	}
	for _, q := range []string{"limit=0", "limit=-1", "limit=abc", "since=yesterday", "status=42", "status=abc",
		"unit=a%20b", "unit=..%2Fx", "before_id=abc", "before_id=0"} {
		t.Run("bad "+q, func(t *testing.T) {
			code, p, body := getPage(t, ts, "/api/events?"+q, apiToken)
			param, _, _ := strings.Cut(q, "=")
			if code != 400 || !strings.Contains(p.Error, param) || len(p.Events) != 0 {
				t.Errorf("%d %s, want 400 naming %s", code, body, param)
			}
		})
	}
	t.Run("limit capped at 500", func(t *testing.T) {
		var evs []event
		for i := 0; i < 600; i++ {
			evs = append(evs, event{RequestID: fmt.Sprintf("bulk-%d", i), TS: fixtureNow, Method: "GET", Status: 200, Action: "bulk"})
		}
		if err := ts.events.Write(context.Background(), evs...); err != nil {
			t.Fatal(err)
		}
		code, p, _ := getPage(t, ts, "/api/events?action=bulk&limit=100000", apiToken)
		if code != 200 || len(p.Events) != 500 || p.NextBeforeID == nil || *p.NextBeforeID != p.Events[499].ID {
			t.Fatalf("%d, %d rows, next %v; want 200, 500 rows and a next_before_id", code, len(p.Events), p.NextBeforeID)
		}
	})
}

// walkEvents pages through /api/events with before_id until next_before_id is null and returns
// every id in the order received.
func walkEvents(t *testing.T, ts *testServer, query string) ([]int64, int) {
	t.Helper()
	var ids []int64
	pages := 0
	before := ""
	for {
		code, p, body := getPage(t, ts, "/api/events?"+query+before, apiToken)
		if code != 200 {
			t.Fatalf("page %d: %d %s", pages+1, code, body)
		}
		pages++
		ids = append(ids, eventIDs(p.Events)...)
		if p.NextBeforeID == nil {
			return ids, pages
		}
		if len(p.Events) == 0 || *p.NextBeforeID != p.Events[len(p.Events)-1].ID {
			t.Fatalf("page %d: next_before_id %d is not the last id of %v", pages, *p.NextBeforeID, eventIDs(p.Events))
		}
		if pages > 10000 {
			t.Fatal("paging does not end")
		}
		before = "&before_id=" + strconv.FormatInt(*p.NextBeforeID, 10)
	}
}

func TestEventsAPIPaging(t *testing.T) {
	ts := newTestServer(t, map[string]string{"WEBHOOK_MANUAL_TOKEN": apiToken}, nil)
	writeFixture(t, ts.events)
	var seed []event
	for i := 0; i < 285; i++ {
		seed = append(seed, event{RequestID: fmt.Sprintf("seed-%d", i), TS: fixtureNow, Method: "GET", Path: "/health",
			Status: 200, Action: "health"})
	}
	if err := ts.events.Write(context.Background(), seed...); err != nil {
		t.Fatal(err)
	}
	db := rawDB(t, ts.cfg.dbPath)

	t.Run("every row exactly once", func(t *testing.T) {
		ids, pages := walkEvents(t, ts, "action=health&limit=7")
		// The seeded rows 16 to 300 and the fixture's one health row, 1.
		if want := append(idRange(300, 16), 1); !reflect.DeepEqual(ids, want) {
			t.Errorf("walked %d ids in %d pages, want 300 down to 16 and 1, once each: %v", len(ids), pages, ids)
		}
		if pages != (286+6)/7 {
			t.Errorf("%d pages of 7 for 286 rows, want %d", pages, (286+6)/7)
		}
	})

	t.Run("while rows are being inserted", func(t *testing.T) {
		stop := make(chan struct{})
		var inserted atomic.Int64
		errc := make(chan error, 1)
		go func() {
			defer close(errc)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				batch := []event{
					{RequestID: fmt.Sprintf("live-%d-a", i), TS: time.Now(), Method: "GET", Status: 200, Action: "live"},
					{RequestID: fmt.Sprintf("live-%d-b", i), TS: time.Now(), Method: "GET", Status: 200, Action: "live"},
				}
				if err := ts.events.Write(context.Background(), batch...); err != nil {
					errc <- err
					return
				}
				inserted.Add(int64(len(batch)))
			}
		}()
		// Let the writer get going, so that inserts interleave with the whole walk.
		for deadline := time.Now().Add(hangGuard); inserted.Load() < 20; {
			if time.Now().After(deadline) {
				t.Fatal("the inserting goroutine wrote nothing")
			}
			time.Sleep(time.Millisecond)
		}
		var atStart int64
		if err := db.QueryRow(`SELECT max(id) FROM event_log`).Scan(&atStart); err != nil {
			t.Fatal(err)
		}
		before := inserted.Load()
		ids, pages := walkEvents(t, ts, "limit=9")
		during := inserted.Load() - before
		close(stop)
		if err := <-errc; err != nil {
			t.Fatalf("inserting: %v", err)
		}
		if during == 0 {
			t.Fatal("no row was inserted while paging; the test proved nothing")
		}
		seen := map[int64]bool{}
		for i, id := range ids {
			if seen[id] {
				t.Fatalf("id %d repeated (position %d)", id, i)
			}
			seen[id] = true
			if i > 0 && id >= ids[i-1] {
				t.Fatalf("ids not strictly decreasing at position %d: %d after %d", i, id, ids[i-1])
			}
		}
		for id := int64(1); id <= atStart; id++ {
			if !seen[id] {
				t.Fatalf("row %d existed when paging began and was skipped", id)
			}
		}
		if ids[0] < atStart {
			t.Fatalf("the first page started at %d, below the %d rows that existed", ids[0], atStart)
		}
		// Nothing skipped at all: from the first id down, every id is there.
		if want := idRange(ids[0], 1); !reflect.DeepEqual(ids, want) {
			t.Errorf("ids are not every id from %d down to 1", ids[0])
		}
		t.Logf("%d pages, %d ids; %d rows inserted during the walk", pages, len(ids), during)
	})
}

func TestDeliveryAPI(t *testing.T) {
	ts := newTestServer(t, map[string]string{"WEBHOOK_MANUAL_TOKEN": apiToken}, nil)
	writeFixture(t, ts.events)
	// A later delivery whose id extends d-1's, and a row for d-1 written after it: exact match,
	// and order by id.
	if err := ts.events.Write(context.Background(),
		event{RequestID: "req-d10", TS: fixtureNow, Method: "POST", Path: "/github-package-update/demo", Status: 202,
			Action: "github-webhook", Meta: map[string]any{"delivery": "d-10"}},
		event{RequestID: "task-d-1", TS: fixtureNow, Method: "TASK", Status: 200, Action: "github-task",
			Meta: map[string]any{"delivery": "d-1", "step": "prune-failed"}},
	); err != nil {
		t.Fatal(err)
	}
	t.Run("a delivery's own task", func(t *testing.T) {
		code, p, body := getPage(t, ts, "/api/deliveries/d-1", apiToken)
		if code != 200 || p.Delivery != "d-1" {
			t.Fatalf("%d %s", code, body)
		}
		if got := eventIDs(p.Events); !reflect.DeepEqual(got, []int64{7, 8, 9, 10, 11, 12, 17}) {
			t.Errorf("ids %v, want 7 to 12 and 17 in ascending order", got)
		}
		var story []string
		for _, e := range p.Events {
			s, _ := e.Meta["step"].(string)
			story = append(story, e.Action+":"+s)
		}
		if want := "github-webhook:,github-task:started,github-task:pulled,github-task:restarted,github-task:healthy,github-task:completed,github-task:prune-failed"; strings.Join(story, ",") != want {
			t.Errorf("story %s, want %s", strings.Join(story, ","), want)
		}
		if strings.Contains(body, fixtureToken) {
			t.Errorf("the request row's stored token came back: %s", body)
		}
		if p.TaskDelivery != "" {
			t.Errorf("d-1 ran its own task, yet task_delivery is %q", p.TaskDelivery)
		}
	})

	// A delivery covered by d-1's task: its story goes on with its dispatch row, then d-1's
	// task steps, not d-1's request, and the answer names d-1.
	t.Run("a delivery covered by another's task", func(t *testing.T) {
		if err := ts.events.Write(context.Background(),
			event{RequestID: "req-d20", TS: fixtureNow, Method: "POST", Path: "/github-package-update/demo", Status: 202,
				Action: "github-webhook", Meta: map[string]any{"delivery": "d-20", "reason": "queued"}},
			event{RequestID: "req-d20", TS: fixtureNow, Method: "QUEUE", Path: "/github-package-update/demo", Status: 202,
				Action: "github-dispatch", Meta: map[string]any{"delivery": "d-20", "reason": "dispatching", "covered_by": "d-1"}},
		); err != nil {
			t.Fatal(err)
		}
		// Its claim was open from long before d-1's request until after d-1's task ended: the
		// window holds d-1's own rows too, and only its task steps belong to d-20's story.
		if _, err := ts.events.db.Exec(`INSERT INTO github_deliveries (delivery_id, unit, image, event, request_id, status,
			received_at, updated_at, claimed_at, step, covered_by, task_unit) VALUES ('d-20', 'demo.service', 'ghcr.io/acme/demo:latest',
			'package', 'req-d20', 'done', 0, ?, 0, 'completed', 'd-1', 'webhook-task-d-1')`, fixtureNow.Add(time.Hour).Unix()); err != nil {
			t.Fatal(err)
		}
		code, p, body := getPage(t, ts, "/api/deliveries/d-20", apiToken)
		if code != 200 || p.Delivery != "d-20" || p.TaskDelivery != "d-1" {
			t.Fatalf("covered delivery: %d %s", code, body)
		}
		var story []string
		for _, e := range p.Events {
			s, _ := e.Meta["step"].(string)
			story = append(story, e.Action+":"+s+":"+e.Meta["delivery"].(string))
		}
		if want := "github-task:started:d-1,github-task:pulled:d-1,github-task:restarted:d-1,github-task:healthy:d-1,github-task:completed:d-1,github-task:prune-failed:d-1,github-webhook::d-20,github-dispatch::d-20"; strings.Join(story, ",") != want {
			t.Errorf("story of the covered delivery %s, want %s", strings.Join(story, ","), want)
		}
	})

	for _, tc := range []struct {
		name, target string
		raw          bool
		want         []int // any of
	}{
		{name: "unknown id", target: "/api/deliveries/d-999", want: []int{404}},
		{name: "space", target: "/api/deliveries/a%20b", want: []int{400}},
		{name: "leading dash", target: "/api/deliveries/-x", want: []int{400}},
		{name: "NUL", target: "/api/deliveries/a%00b", want: []int{400}},
		{name: "quote", target: "/api/deliveries/a%22b", want: []int{400}},
		{name: "too long", target: "/api/deliveries/" + strings.Repeat("a", 129), want: []int{400}},
		{name: "encoded slash", target: "/api/deliveries/a%2Fb", want: []int{400, 404}},
		{name: "dot dot", target: "/api/deliveries/..", raw: true, want: []int{400, 404}},
		{name: "encoded dot dot", target: "/api/deliveries/%2e%2e", raw: true, want: []int{400, 404}},
		{name: "dot dot then more", target: "/api/deliveries/../events", raw: true, want: []int{400, 404}},
		{name: "empty", target: "/api/deliveries/", want: []int{400, 404}},
		{name: "sql wildcard", target: "/api/deliveries/d-%25", want: []int{400}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var resp *http.Response
			var body string
			if tc.raw {
				resp, body = ts.raw(t, "GET", tc.target+"?token="+apiToken)
			} else {
				resp, body = obsGet(t, ts, tc.target, map[string]string{"Authorization": "Bearer " + apiToken})
			}
			if !slices.Contains(tc.want, resp.StatusCode) {
				t.Errorf("%s: %d %q, want one of %v", tc.target, resp.StatusCode, body, tc.want)
			}
			if strings.Contains(body, `"events"`) {
				t.Errorf("%s answered rows: %s", tc.target, body)
			}
		})
	}
	if strings.Contains(ts.logs.String(), "panic") {
		t.Errorf("the server panicked:\n%s", ts.logs.String())
	}
}

// TestDeliveryStoryStartsWithTheRequest checks the order of /api/deliveries/<id> when run-task
// is fast: systemd-run returns once the task unit started, and the task writes its "started" row
// at once. The fake systemd-run here does exactly that before returning, deterministically.
func TestDeliveryStoryStartsWithTheRequest(t *testing.T) {
	newFakeHost(t) // the dispatcher reads the unit's policy
	ts := newTestServer(t, map[string]string{"WEBHOOK_MANUAL_TOKEN": apiToken, "GITHUB_WEBHOOK_SECRET": "s"}, nil)
	const delivery = "fast-task-1"
	ts.srv.exec = func(ctx context.Context, timeout time.Duration, argv ...string) cmdResult {
		if err := ts.events.Write(ctx, event{RequestID: "task", TS: time.Now(), Method: "TASK", Status: 202, Action: "github-task",
			Meta: map[string]any{"delivery": delivery, "step": "started"}}); err != nil {
			t.Error(err)
		}
		return cmdResult{argv: argv}
	}
	w := httptest.NewRecorder()
	r := httptest.NewRequest("POST", "/github-package-update/demo", nil)
	// As handleGitHub leaves it before enqueueing.
	r = r.WithContext(context.WithValue(r.Context(), requestInfoKey{}, &requestInfo{id: "req-fast",
		action: "github-webhook", meta: map[string]any{"delivery": delivery, "unit": "demo.service"}}))
	ts.srv.enqueue(w, r, taskSpec{unit: "demo.service", image: "ghcr.io/acme/demo:latest", event: "package",
		delivery: delivery, path: "/github-package-update/demo"})
	if w.Code != http.StatusAccepted {
		t.Fatalf("enqueue: %d %s", w.Code, w.Body.String())
	}
	ts.drain(t)
	code, p, body := getPage(t, ts, "/api/deliveries/"+delivery, apiToken)
	if code != 200 || len(p.Events) != 3 {
		t.Fatalf("%d %s, want the request, the dispatch and the started row", code, body)
	}
	var story []string
	for _, e := range p.Events {
		s, _ := e.Meta["reason"].(string)
		if step, ok := e.Meta["step"].(string); ok {
			s = step
		}
		story = append(story, e.Action+":"+s)
	}
	if got := strings.Join(story, ","); got != "github-webhook:queued,github-dispatch:dispatching,github-task:started" {
		t.Errorf("the story of delivery %s reads %s: the request that caused the task must come first", delivery, got)
	}
}

// TestE2EEventsOfADelivery runs one real redeploy on the rig and reads its story back through
// the built binary's events command and through /api/deliveries/<id>, as an operator would.
func TestE2EEventsOfADelivery(t *testing.T) {
	r := needRig(t)
	const token = "e2e-events-token"
	s := startE2EServer(t, "WEBHOOK_MANUAL_TOKEN="+token)
	name := rigUniqueName(t, "demo")
	ref, id1 := r.PushImage(t, "e2e/"+name, "latest", "v1")
	unit, ctr := e2eContainerUnit(t, r, ref, id1)
	_, id2 := r.PushImage(t, "e2e/"+name, "latest", "v2")
	r.TagLocal(t, id1, ref)
	delivery := rigUniqueName(t, "delivery")
	body := githubPackagePayload(r.Registry(), "e2e", name, "latest", "")
	if code, text := s.deliver(t, unit, "package", delivery, body, s.secret); code != http.StatusAccepted {
		t.Fatalf("delivery: %d %q; server log:\n%s", code, text, s.log)
	}
	rows := s.waitTask(t, r, delivery)
	if got := strings.Join(steps(rows), ","); got != "started,pulled,restarted,healthy,completed" {
		t.Fatalf("task steps %s; server log:\n%s", stepDetails(rows), s.log)
	}
	if got := r.ContainerImage(t, ctr); got != id2 {
		t.Fatalf("%s runs %s, want v2 %s", ctr, got, id2)
	}

	bin := buildBinary(t)
	events := func(args ...string) string {
		t.Helper()
		cmd := r.Command(bin, append([]string{"events", "--state-dir", s.state, "--delivery", delivery}, args...)...)
		cmd.Env = append(cmd.Env, "TZ=UTC")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil || stderr.Len() > 0 {
			t.Fatalf("events %v: %v; stderr %s", args, err, stderr.String())
		}
		return string(out)
	}
	table := events()
	lines := strings.Split(strings.TrimSuffix(table, "\n"), "\n")
	if len(lines) != 9 || !strings.HasPrefix(lines[0], "TIME") || lines[8] != "outcome: ok, restarted, healthy" {
		t.Fatalf("events --delivery %s printed %d lines, want a header, 7 rows and the outcome:\n%s", delivery, len(lines), table)
	}
	lines = lines[:8]
	// Newest first, and in the order things happened: the request row is committed before the
	// 202, the dispatch row as the dispatcher takes the claim, before systemd-run starts the task.
	var story []string
	for _, line := range lines[1:] {
		if !strings.Contains(line, "delivery="+delivery) || !strings.Contains(line, unit) {
			t.Errorf("row %q is not of %s on %s", line, delivery, unit)
		}
		what := ""
		switch {
		case strings.Contains(line, " github-webhook ") && strings.Contains(line, " 202 ") && strings.Contains(line, " POST "):
			what = "queued"
		case strings.Contains(line, " github-dispatch "):
			what = "dispatch"
		}
		for _, key := range []string{"step=", "reason="} {
			if _, v, ok := strings.Cut(line, key); ok && what == "" {
				what, _, _ = strings.Cut(v, " ")
			}
		}
		story = append([]string{what}, story...)
	}
	if got, want := strings.Join(story, ","), "queued,dispatch,started,pulled,restarted,healthy,completed"; got != want {
		t.Errorf("events --delivery tells %s, want %s:\n%s", got, want, table)
	}
	var cli []storedEvent
	for _, line := range strings.Split(strings.TrimSuffix(events("--json"), "\n"), "\n") {
		var e storedEvent
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("events --json line %q: %v", line, err)
		}
		cli = append(cli, e)
	}
	slices.Reverse(cli)

	req, _ := http.NewRequest("GET", s.url+"/api/deliveries/"+delivery, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := obsClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var api eventsPage
	err = json.NewDecoder(resp.Body).Decode(&api)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("/api/deliveries/%s: %d %v", delivery, resp.StatusCode, err)
	}
	if !reflect.DeepEqual(api.Events, cli) {
		t.Errorf("/api/deliveries/%s rows differ from the events command's:\n api %+v\n cli %+v", delivery, api.Events, cli)
	}
	if ids := eventIDs(api.Events); !slices.IsSorted(ids) || len(ids) != 7 {
		t.Errorf("/api/deliveries ids %v, want 7 ascending", ids)
	}

	resp, err = obsClient.Get(s.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	mb, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	fams, err := parseExposition(string(mb))
	if err != nil {
		t.Fatalf("/metrics: %v\n%s", err, mb)
	}
	st := samplesBy(t, fams, "webhook_redeploy_steps_total", "webhook_redeploy_steps_total", "step")
	for _, step := range []string{"started", "pulled", "restarted", "healthy", "completed"} {
		if st[step] < 1 {
			t.Errorf("webhook_redeploy_steps_total{step=%q} = %v after the redeploy", step, st[step])
		}
	}
	if q := samplesBy(t, fams, "webhook_github_deliveries_total", "webhook_github_deliveries_total", "outcome")["queued"]; q != 1 {
		t.Errorf("webhook_github_deliveries_total{outcome=\"queued\"} = %v, want 1", q)
	}
	if c := samplesBy(t, fams, "webhook_pull_duration_seconds", "webhook_pull_duration_seconds_count")[""]; c != 1 {
		t.Errorf("webhook_pull_duration_seconds_count = %v, want 1", c)
	}
	t.Logf("webhook-auto-update events --delivery %s:\n%s", delivery, table)
	var excerpt []string
	for _, line := range strings.Split(string(mb), "\n") {
		for _, p := range []string{"webhook_http_requests_total", "webhook_github_deliveries_total", "webhook_redeploy_steps_total",
			"webhook_pull_duration_seconds", "webhook_restart_duration_seconds"} {
			if strings.HasPrefix(line, p) || strings.HasPrefix(line, "# TYPE "+p) {
				excerpt = append(excerpt, line)
				break
			}
		}
	}
	t.Logf("/metrics excerpt:\n%s", strings.Join(excerpt, "\n"))
}
