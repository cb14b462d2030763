// webhook_queue_test.go tests webhook.go's queue and dispatcher: the dispatcher's rules
// (dispatchRig), a queue that survives a server restart, and load bursts that must each be
// answered, recorded and redeployed exactly once.
package main

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Load.

// burstReq is one delivery of a burst; burstResult what came of it.
type burstReq struct {
	unit, delivery string
	body           []byte
}

type burstResult struct {
	burstReq
	status int
	text   string
	took   time.Duration
	err    error
}

// burst sends every delivery at once, each on its own connection, and waits for every answer.
func (s *advServer) burst(client *http.Client, reqs []burstReq) []burstResult {
	out := make([]burstResult, len(reqs))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, r := range reqs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequest("POST", s.URL+"/github-package-update/"+r.unit, bytes.NewReader(r.body))
			req.Header.Set("X-Hub-Signature-256", hubSignature(advSecret, r.body))
			req.Header.Set("X-GitHub-Event", "package")
			req.Header.Set("X-GitHub-Delivery", r.delivery)
			<-start
			t0 := time.Now()
			res := burstResult{burstReq: r}
			resp, err := client.Do(req)
			if err == nil {
				b, rerr := io.ReadAll(resp.Body)
				resp.Body.Close()
				res.status, res.text, err = resp.StatusCode, strings.TrimSpace(string(b)), rerr
			}
			res.took, res.err = time.Since(t0), err
			out[i] = res
		}()
	}
	close(start)
	wg.Wait()
	return out
}

// summarize fails the test for a request that got no answer, or an answer other than 2xx or
// 429; it returns the answers counted by text, and the median and maximum answer times.
func summarize(t *testing.T, name string, res []burstResult) (map[string]int, time.Duration, time.Duration) {
	t.Helper()
	texts := map[string]int{}
	var took []time.Duration
	for _, r := range res {
		switch {
		case r.err != nil:
			t.Errorf("%s: delivery %s got no answer: %v", name, r.delivery, r.err)
		case r.status/100 != 2 && r.status != 429:
			t.Errorf("%s: delivery %s: %d %q, want 2xx or 429", name, r.delivery, r.status, r.text)
		}
		texts[r.text]++
		took = append(took, r.took)
	}
	slices.Sort(took)
	return texts, took[len(took)/2], took[len(took)-1]
}

func openFDs(t *testing.T) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(fds)
}

// settle waits until the process has at most maxG goroutines and maxFD descriptors, and returns
// what it has then; it fails the test when that does not happen within hangGuard.
func settle(t *testing.T, what string, maxG, maxFD int) (int, int) {
	t.Helper()
	deadline := time.Now().Add(hangGuard)
	for {
		runtime.GC()
		g, fd := runtime.NumGoroutine(), openFDs(t)
		if g <= maxG && fd <= maxFD {
			return g, fd
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s, after %s idle: %d goroutines (at most %d expected), %d descriptors (at most %d)", what, hangGuard, g, maxG, fd, maxFD)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// deliveryStatuses counts github_deliveries rows by status for delivery ids with prefix.
func deliveryStatuses(t *testing.T, db *sql.DB, prefix string) map[string]int {
	t.Helper()
	rows, err := db.Query(`SELECT status, count(*) FROM github_deliveries WHERE delivery_id LIKE ? GROUP BY 1`, prefix+"%")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]int{}
	for rows.Next() {
		var st string
		var n int
		if err := rows.Scan(&st, &n); err != nil {
			t.Fatal(err)
		}
		out[st] = n
	}
	return out
}

// checkCoverage checks the queue after a burst: every claim with prefix is dispatched (or
// done) by exactly one task, that of the claim its covered_by names, which covers itself, is
// for the same unit and image, and was started by exactly one systemd-run (dispatches counts
// them by delivery id); every claim has one "dispatching" row. It returns the number of
// claims and of tasks per unit.
func checkCoverage(t *testing.T, db *sql.DB, prefix string, dispatches map[string]int) (claims int, tasksPerUnit map[string]int) {
	t.Helper()
	rows, err := db.Query(`SELECT delivery_id, status, coalesce(covered_by, ''), coalesce(task_unit, ''), unit || ' ' || image,
		(SELECT count(*) FROM event_log WHERE action = 'github-dispatch' AND json_extract(meta, '$.reason') = 'dispatching'
			AND json_extract(meta, '$.delivery') = delivery_id)
		FROM github_deliveries WHERE delivery_id LIKE ?`, prefix+"%")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	leaderOf, target := map[string]string{}, map[string]string{}
	for rows.Next() {
		var id, status, leader, taskUnit, unitImage string
		var dispatchRows int
		if err := rows.Scan(&id, &status, &leader, &taskUnit, &unitImage, &dispatchRows); err != nil {
			t.Fatal(err)
		}
		if (status != "dispatched" && status != "done") || leader == "" || taskUnit != taskUnitName(leader) || dispatchRows != 1 {
			t.Errorf("%s: claim %s is %s, covered by %q with task unit %q and %d dispatching rows; want dispatched by one task",
				prefix, id, status, leader, taskUnit, dispatchRows)
		}
		leaderOf[id], target[id] = leader, unitImage
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	tasksPerUnit = map[string]int{}
	for id, leader := range leaderOf {
		if leaderOf[leader] != leader || dispatches[leader] != 1 || target[id] != target[leader] {
			t.Errorf("%s: claim %s for %s is covered by %s's task (for %s, itself covered by %q), started %d times",
				prefix, id, target[id], leader, target[leader], leaderOf[leader], dispatches[leader])
		}
		if leader == id {
			tasksPerUnit[strings.Fields(target[id])[0]]++
		}
	}
	for id, n := range dispatches {
		if leaderOf[id] != id || n != 1 {
			t.Errorf("%s: task of %s started %d times; its claim is covered by %q", prefix, id, n, leaderOf[id])
		}
	}
	return len(leaderOf), tasksPerUnit
}

// TestLoadBursts sends 200 concurrent signed deliveries for one image (different delivery ids),
// then a mixed burst over 20 images with duplicate copies, against the server with its
// dispatcher running and recording fakes (fake systemctl answers its show and reports a started
// task unit active until the test ends it as run-task would; fake systemd-run records the
// dispatch). Every delivery is answered 202 ("auto-update queued", or "duplicate delivery" for
// a copy); the answer times are logged, not judged. The queue's accounting must be exact (see
// checkCoverage), with at most two tasks per unit for a burst: the one running when it started
// and one covering everything that queued behind it. The request path only checks the
// per-image limit; run-task takes it. So the recorded tasks of the one-image burst, and copies
// of them under other delivery ids up to 200, then run as real run-task processes of the built
// binary, all at once, with a pull that takes a while and records when it ran: the pulls never
// overlap (one redeploy per image at a time), exactly WEBHOOK_IMAGE_LIMIT_COUNT of them pull and
// the rest stop rate-limited, the per-image log holds exactly that many timestamps, and the next
// delivery is refused with 429. Between and after the bursts the server goes back to its
// goroutines and descriptors; the slack covers SQLite's pool, which may keep up to 3 more
// connections of 2 descriptors each.
func TestLoadBursts(t *testing.T) {
	if testing.Short() {
		t.Skip("load test")
	}
	const n, limit, images = 200, 20, 20
	bin := buildServerBinary(t) // before the fakes replace PATH
	hostExclusive(t, "load")
	s := newAdvServer(t, map[string]string{"WEBHOOK_IMAGE_LIMIT_COUNT": strconv.Itoa(limit)})
	s.srv.exe = bin
	s.h.set("image.id", oldImageID)
	// Only a hang is caught here: answer times are logged, and a shared 2-vCPU host is slow.
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 2 * n}, Timeout: 6 * hangGuard}
	defer client.CloseIdleConnections()
	image := "ghcr.io/octo-org/web:v1"
	body := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
	db := rawDB(t, s.cfg.dbPath)

	dctx, stopDispatcher := context.WithCancel(context.Background())
	dispatcherDone := make(chan struct{})
	go func() { defer close(dispatcherDone); s.srv.runDispatcher(dctx) }()
	defer func() { stopDispatcher(); <-dispatcherDone }()
	// endTasks does what run-task does as it ends, for every task started so far.
	endTasks := func() {
		for _, c := range s.h.callsOf(keySystemdRun) {
			if err := s.events.settleTask(context.Background(), taskUnitName(c[len(c)-2]), "done", "", time.Time{}, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	tasksOf := func(prefix string) (map[string]int, [][]string) {
		dispatches := map[string]int{}
		var argvs [][]string
		for _, c := range s.h.callsOf(keySystemdRun) {
			if id := c[len(c)-2]; strings.HasPrefix(id, prefix) {
				dispatches[id]++
				argvs = append(argvs, c)
			}
		}
		return dispatches, argvs
	}
	idle := func(prefix string) {
		waitFor(t, prefix+" claims dispatched", func() bool {
			st := deliveryStatuses(t, db, prefix)
			return len(st) > 0 && st["pending"] == 0 && st["dispatching"] == 0
		})
	}

	// Warm up, then take the baseline.
	s.burst(client, []burstReq{{"web", "warm", githubPackagePayload("ghcr.io", "octo-org", "warm", "v1", "")}})
	waitFor(t, "the warm-up task", func() bool { d, _ := tasksOf("warm"); return len(d) == 1 })
	endTasks()
	client.CloseIdleConnections()
	waitPending(t, s.events)
	g0, fd0 := settle(t, "before the bursts", math.MaxInt, math.MaxInt)

	var same []burstReq
	for i := 0; i < n; i++ {
		same = append(same, burstReq{"web", fmt.Sprintf("load-%03d", i), body})
	}
	start := time.Now()
	texts, median, slowest := summarize(t, "one image", s.burst(client, same))
	t.Logf("one image: %d concurrent deliveries answered in %s: %v; answer time median %s, max %s",
		n, time.Since(start).Round(time.Millisecond), texts, median.Round(time.Millisecond), slowest.Round(time.Millisecond))
	if texts["auto-update queued"] != n {
		t.Errorf("one image: answers %v, want every delivery queued", texts)
	}
	// The first task runs on (the fake systemd keeps it active) while the burst queues behind
	// it; once it ends, one task covers everything that waited.
	waitFor(t, "the first task", func() bool { d, _ := tasksOf("load-"); return len(d) == 1 })
	endTasks()
	idle("load-")
	dispatches, dispatched := tasksOf("load-")
	claims, perUnit := checkCoverage(t, db, "load-", dispatches)
	if claims != n || perUnit["web.service"] > 2 {
		t.Errorf("one image: %d claims, %d tasks: want %d claims covered by at most 2 tasks", claims, perUnit["web.service"], n)
	}
	t.Logf("one image: %d tasks for %d deliveries", len(dispatched), claims)
	endTasks()
	client.CloseIdleConnections()
	g1, fd1 := settle(t, "after the first burst", g0+5, fd0+8)

	var mixed []burstReq
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("app-%02d", i%images)
		r := burstReq{name, fmt.Sprintf("mixed-%03d", i), githubPackagePayload("ghcr.io", "octo-org", name, "v1", "")}
		mixed = append(mixed, r)
		if i%10 == 0 {
			mixed = append(mixed, r) // a second copy of the same delivery, at the same moment
		}
	}
	start = time.Now()
	texts, median, slowest = summarize(t, "mixed", s.burst(client, mixed))
	t.Logf("%d images: %d concurrent deliveries (%d of them twice) answered in %s: %v; answer time median %s, max %s",
		images, len(mixed), len(mixed)-n, time.Since(start).Round(time.Millisecond), texts, median.Round(time.Millisecond), slowest.Round(time.Millisecond))
	if texts["auto-update queued"] != n || texts["duplicate delivery"] != len(mixed)-n {
		t.Errorf("mixed: answers %v, want %d queued and %d duplicates", texts, n, len(mixed)-n)
	}
	waitFor(t, "a task for every unit", func() bool { d, _ := tasksOf("mixed-"); return len(d) >= images })
	endTasks()
	idle("mixed-")
	dispatches, _ = tasksOf("mixed-")
	claims, perUnit = checkCoverage(t, db, "mixed-", dispatches)
	if claims != n || len(perUnit) != images {
		t.Errorf("mixed: %d claims for %d units, want %d for %d", claims, len(perUnit), n, images)
	}
	for unit, c := range perUnit {
		if c > 2 {
			t.Errorf("mixed: %d tasks for %s, want at most 2", c, unit)
		}
	}
	t.Logf("mixed: %d tasks for %d deliveries", len(dispatches), claims)
	endTasks()
	client.CloseIdleConnections()
	g2, fd2 := settle(t, "after the second burst", g0+5, fd0+8)
	t.Logf("goroutines %d → %d → %d, descriptors %d → %d → %d", g0, g1, g2, fd0, fd1, fd2)

	// The tasks of the one-image burst, as systemd would run them.
	intervals := filepath.Join(t.TempDir(), "pulls")
	s.h.set("podman-pull.sleep", "100ms")
	var cmds []*exec.Cmd
	var outs []*syncBuffer
	for i := len(dispatched); i < n; i++ {
		argv := slices.Clone(dispatched[0])
		argv[len(argv)-2] = fmt.Sprintf("load-run-%03d", i)
		dispatched = append(dispatched, argv)
	}
	for _, argv := range dispatched {
		first := slices.Index(argv, "--")
		cmd := exec.Command(argv[first+1], argv[first+2:]...)
		// The fake podman shows no container for the unit, which names no image: opt in, so the
		// tasks go on to the pull and the per-image limit this test counts.
		cmd.Env = append(os.Environ(), fakePullIntervalsEnv+"="+intervals, "WEBHOOK_IMAGE_LIMIT_COUNT="+strconv.Itoa(limit),
			"WEBHOOK_ALLOW_ANY_IMAGE=true")
		out := &syncBuffer{}
		cmd.Stdout, cmd.Stderr = out, out
		cmds, outs = append(cmds, cmd), append(outs, out)
	}
	start = time.Now()
	for _, cmd := range cmds {
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
	}
	for i, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Errorf("run-task %d: %v\n%s", i, err, outs[i])
		}
	}
	t.Logf("%d run-task processes started at once finished in %s", len(cmds), time.Since(start).Round(time.Millisecond))
	steps := map[string]int{}
	rows, err := db.Query(`SELECT json_extract(meta, '$.step'), count(*) FROM event_log WHERE action = 'github-task'
		AND json_extract(meta, '$.delivery') LIKE 'load-%' GROUP BY 1`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var step string
		var c int
		rows.Scan(&step, &c)
		steps[step] = c
	}
	rows.Close()
	tasks := len(cmds)
	took := min(limit, tasks)
	want := map[string]int{"started": tasks, "pulled": took, "up-to-date": took}
	if tasks > limit {
		want["rate-limited"] = tasks - limit
	}
	if !reflect.DeepEqual(steps, want) {
		t.Errorf("task steps %v, want %v", steps, want)
		for i, out := range outs { // a step that could not be written is on its task's stderr
			if o := out.String(); strings.Contains(o, "unwritten event") || strings.Contains(o, "event log") {
				t.Errorf("run-task %d:\n%s", i, o)
			}
		}
	}
	pulls := readPullIntervals(t, intervals)
	if len(pulls) != took {
		t.Errorf("%d pulls, want exactly %d", len(pulls), took)
	}
	if o := overlapping(pulls); o != nil {
		t.Errorf("two redeploys of one image pulled at once: %v", o)
	}
	if ts, bad, err := readTimestamps(imageLimitPath(s.cfg.stateDir, image)); err != nil || len(ts) != took || bad != 0 {
		t.Errorf("per-image log: %d timestamps, %d bad, %v; want exactly %d", len(ts), bad, err, took)
	}
	if strings.Contains(s.logs.String(), "unwritten event") {
		t.Errorf("rows were spilled:\n%s", s.logs)
	}

	// The limit is used up: the next delivery is refused on the request path.
	before := len(s.h.callsOf(keySystemdRun))
	resp, text := s.signedDelivery(t, "web", "load-after", body)
	if ra := resp.Header.Get("Retry-After"); resp.StatusCode != 429 || ra == "" || ra == "0" {
		t.Errorf("delivery after %d redeploys: %d %q Retry-After %q, want 429 with a Retry-After", took, resp.StatusCode, text, ra)
	}
	if len(s.h.callsOf(keySystemdRun)) != before {
		t.Error("a rate-limited delivery was dispatched")
	}
}

// TestQueueSurvivesRestart: a server killed between its 202s and their dispatch leaves claims
// pending, and one killed during systemd-run leaves them dispatching. The restarted server (the
// real binary, with fakes) runs each of them exactly once: a pending claim and a dispatching
// one whose task never started are dispatched, one whose task unit exists is not started again.
// A redelivery of a claim that is queued is a duplicate: its redeploy runs.
func TestQueueSurvivesRestart(t *testing.T) {
	bin := buildServerBinary(t) // before the fakes replace PATH
	h, path := newFakeHostWithRun(t)
	state := t.TempDir()
	dbPath := filepath.Join(state, "data", "pod-upgrade-trigger.db")
	body := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")

	// The server that died: three claims committed and answered 202.
	dead, err := openEventLog(dbPath, newLogger(io.Discard))
	if err != nil {
		t.Fatal(err)
	}
	for i, unit := range []string{"web.service", "db.service", "cache.service"} {
		id := fmt.Sprintf("crash-%d", i+1)
		spec := taskSpec{unit: unit, image: "ghcr.io/octo-org/web:v1", event: "package", delivery: id, path: advUnitPath}
		ok, err := dead.claimDelivery(context.Background(), spec, event{RequestID: "dead-" + id, TS: time.Now(),
			Method: "POST", Path: advUnitPath, Status: 202, Action: "github-webhook", Meta: map[string]any{"delivery": id, "reason": "queued"}})
		if err != nil || !ok {
			t.Fatalf("claim %s: %v %v", id, ok, err)
		}
	}
	// crash-2 and crash-3 were being dispatched (systemd-run under way); only crash-3's task
	// unit started.
	db := rawDB(t, dbPath)
	if _, err := db.Exec(`UPDATE github_deliveries SET status = CASE delivery_id WHEN 'crash-1' THEN 'pending' ELSE 'dispatching' END,
		covered_by = CASE delivery_id WHEN 'crash-1' THEN NULL ELSE delivery_id END,
		task_unit = CASE delivery_id WHEN 'crash-1' THEN NULL ELSE 'webhook-task-' || delivery_id END`); err != nil {
		t.Fatal(err)
	}
	dead.Close()
	h.set("started.webhook-task-crash-3", "")

	addr := freeLoopbackAddr(t)
	p := startServerProc(t, bin, []string{"--listen", addr, "--state-dir", state}, []string{"PATH=" + path,
		"GITHUB_WEBHOOK_SECRET=" + advSecret, fakePodmanDirEnv + "=" + h.dir, fakeSystemctlDirEnv + "=" + h.dir,
		fakeSystemdRunDirEnv + "=" + h.dir}, nil)
	p.waitLog(t, "listening on")
	dispatches := func() map[string]int {
		out := map[string]int{}
		for _, c := range h.callsOf(keySystemdRun) {
			out[c[len(c)-2]]++
		}
		return out
	}
	waitFor(t, "the claims left behind dispatched", func() bool {
		return reflect.DeepEqual(deliveryStatuses(t, db, "crash-"), map[string]int{"dispatched": 3})
	})
	if d := dispatches(); !reflect.DeepEqual(d, map[string]int{"crash-1": 1, "crash-2": 1}) {
		t.Errorf("systemd-run calls by delivery %v, want crash-1 and crash-2 once, crash-3 (already started) never\n%s", d, p.stderr())
	}
	resp, text, err := rawExchange(addr, "POST", advUnitPath, [][2]string{{"X-GitHub-Event", "package"},
		{"X-GitHub-Delivery", "crash-1"}, {"X-Hub-Signature-256", hubSignature(advSecret, body)}}, body, false)
	if err != nil || resp.StatusCode != 202 || strings.TrimSpace(text) != "duplicate delivery" {
		t.Errorf("redelivery of a queued claim: %v %q %v, want 202 duplicate delivery", resp, text, err)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	if err := p.wait(); err != nil {
		t.Errorf("server exit: %v\n%s", err, p.stderr())
	}
}

// dispatchRig is a server whose dispatcher a test drives by hand (drain), with fake systemctl,
// a scripted systemd-run and a clock the test moves.
type dispatchRig struct {
	*testServer
	h       *fakeHost
	now     time.Time
	fail    int      // systemd-runs that fail from now on
	started bool     // a failing systemd-run started its task anyway
	runs    []string // the delivery of every systemd-run, in order
	seq     int
}

func newDispatchRig(t *testing.T) *dispatchRig {
	h := newFakeHost(t)
	d := &dispatchRig{h: h, now: time.Now()}
	d.testServer = newTestServer(t, nil, nil)
	d.srv.now = func() time.Time { return d.now }
	d.srv.exec = func(ctx context.Context, timeout time.Duration, argv ...string) cmdResult {
		delivery := argv[len(argv)-2]
		d.runs = append(d.runs, delivery)
		if d.fail > 0 {
			d.fail--
			if d.started {
				h.set("started."+taskUnitName(delivery), "")
			}
			return cmdResult{argv: argv, exitCode: 1, stderr: "Failed to start transient service unit", err: errors.New("systemd-run failed (exit 1)")}
		}
		h.set("started."+taskUnitName(delivery), "") // fake systemctl show: the task unit is active
		return cmdResult{argv: argv}
	}
	return d
}

// claim queues a delivery as the request path does, a millisecond after the previous one.
func (d *dispatchRig) claim(t *testing.T, id, unit, image string) {
	t.Helper()
	d.seq++
	ok, err := d.events.claimDelivery(context.Background(), taskSpec{unit: unit, image: image, event: "package", delivery: id, path: "/p"},
		event{RequestID: "req-" + id, TS: d.now.Add(time.Duration(d.seq) * time.Millisecond), Method: "POST", Status: 202,
			Action: "github-webhook", Meta: map[string]any{"delivery": id, "reason": "queued"}})
	if err != nil || !ok {
		t.Fatalf("claim %s: %v %v", id, ok, err)
	}
}

// end ends the task of leader as run-task does, or (vanish) as a killed one does: its unit gone,
// its claims not marked done.
func (d *dispatchRig) end(t *testing.T, leader string, vanish bool) {
	t.Helper()
	os.Remove(filepath.Join(d.h.dir, "started."+taskUnitName(leader)))
	if !vanish {
		if err := d.events.settleTask(context.Background(), taskUnitName(leader), "done", "", time.Time{}, nil); err != nil {
			t.Fatal(err)
		}
	}
}

// state is each claim's status and covering delivery, as "status/covered_by".
func (d *dispatchRig) state(t *testing.T) map[string]string {
	t.Helper()
	rows, err := rawDB(t, d.cfg.dbPath).Query(`SELECT delivery_id, status || '/' || coalesce(covered_by, '') FROM github_deliveries`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var id, st string
		rows.Scan(&id, &st)
		out[id] = st
	}
	return out
}

// TestDispatcherRules drives the dispatcher step by step: claims are taken in arrival order; a
// task covers every pending claim of its unit and image; while a unit's task runs, its later
// claims (any image) wait, and another unit's do not; a task that ends lets the next one start,
// also when it was killed without marking its claims done; a failed systemd-run is retried with
// backoff, not before its time, and after dispatchAttempts the claims fail with the error in
// their rows; a failed claim is taken over by its redelivery; a systemd-run that failed although
// its task started counts as dispatched; a claim left dispatching by a stopped server is queued
// again when its task never started.
func TestDispatcherRules(t *testing.T) {
	const imgA, imgB = "ghcr.io/o/a:v1", "ghcr.io/o/a:v2"
	d := newDispatchRig(t)
	// The subtests share d and run in order: each goes on from the queue the one before left.
	// The second uses the first's tasks, so it runs only when the first passed.
	if t.Run("claims in arrival order, one task per unit and image", func(t *testing.T) {
		d.claim(t, "a-1", "a.service", imgA)
		d.claim(t, "b-1", "b.service", imgA)
		d.claim(t, "a-2", "a.service", imgA)
		d.drain(t)
		if !slices.Equal(d.runs, []string{"a-1", "b-1"}) {
			t.Fatalf("tasks started for %q, want a-1 (covering a-2) then b-1, in arrival order", d.runs)
		}
		if st := d.state(t); st["a-2"] != "dispatched/a-1" || st["a-1"] != "dispatched/a-1" || st["b-1"] != "dispatched/b-1" {
			t.Errorf("claims %v, want a-2 covered by a-1's task", st)
		}
	}) {
		t.Run("a unit's later claims wait for its task, also a killed one", func(t *testing.T) {
			d.claim(t, "a-3", "a.service", imgA)
			d.claim(t, "a-4", "a.service", imgB)
			d.claim(t, "c-1", "c.service", imgA)
			d.drain(t)
			if !slices.Equal(d.runs[2:], []string{"c-1"}) {
				t.Fatalf("while a's task runs: tasks %q, want only c-1's", d.runs[2:])
			}
			d.end(t, "a-1", false)
			d.drain(t)
			if !slices.Equal(d.runs[3:], []string{"a-3"}) || d.state(t)["a-4"] != "pending/" {
				t.Fatalf("after a's task ended: tasks %q, claims %v; want a-3's task, a-4 (another image) waiting for it", d.runs[3:], d.state(t))
			}
			d.end(t, "a-3", true) // killed: its claims stay dispatched until the dispatcher looks
			d.drain(t)
			if len(d.runs) != 4 {
				t.Fatalf("a task started before the killed one was noticed: %q", d.runs)
			}
			// settleTask stamps claims with the real clock (run-task calls it too), which runs ahead
			// of d.now while the rig works (seconds under -race): jump well past taskCheckAfter.
			d.now = d.now.Add(taskCheckAfter + time.Minute)
			d.drain(t)
			if !slices.Equal(d.runs[4:], []string{"a-4"}) || d.state(t)["a-3"] != "done/a-3" {
				t.Fatalf("after the killed task was noticed: tasks %q, claims %v", d.runs[4:], d.state(t))
			}
		})
	}

	// Retries with backoff, then failure; the redelivery takes the failed claim over.
	t.Run("failed systemd-runs are retried, then fail; a redelivery takes over", func(t *testing.T) {
		d.fail = dispatchAttempts
		d.claim(t, "e-1", "e.service", imgA)
		for attempt := 1; attempt <= dispatchAttempts; attempt++ {
			d.drain(t)
			d.drain(t) // not due again before its backoff
			if n := slices.Index(d.runs, "e-1"); n < 0 || len(d.runs)-n != attempt {
				t.Fatalf("attempt %d: systemd-runs %q", attempt, d.runs)
			}
			d.now = d.now.Add(retryDelay(attempt - 1))
		}
		if st := d.state(t)["e-1"]; st != "failed/e-1" {
			t.Fatalf("e-1 after %d failed systemd-runs: %s, want failed", dispatchAttempts, st)
		}
		var reasons []string
		for _, e := range d.deliveryRows(t, "e-1") {
			reasons = append(reasons, fmt.Sprint(e.Meta["reason"]))
			if r := e.Meta["reason"]; (r == "dispatch-retry" || r == "dispatch-failed") && !strings.Contains(fmt.Sprint(e.Meta["stderr"]), "Failed to start") {
				t.Errorf("row %v lacks systemd-run's stderr", e.Meta)
			}
		}
		want := []string{"queued"}
		for i := 1; i < dispatchAttempts; i++ {
			want = append(want, "dispatching", "dispatch-retry")
		}
		want = append(want, "dispatching", "dispatch-failed")
		if !slices.Equal(reasons, want) {
			t.Errorf("rows of e-1: %q, want %q", reasons, want)
		}
		if !strings.Contains(d.logs.String(), "giving up on delivery e-1") {
			t.Errorf("the give-up is not in the log:\n%s", d.logs)
		}
		d.seq++
		if ok, err := d.events.claimDelivery(context.Background(), taskSpec{unit: "e.service", image: imgA, event: "package", delivery: "e-1"},
			event{RequestID: "req-e-1-again", TS: d.now, Method: "POST", Status: 202, Action: "github-webhook"}); !ok || err != nil {
			t.Fatalf("redelivery of a failed claim: %v %v, want it taken over", ok, err)
		}
		if ok, _ := d.events.claimDelivery(context.Background(), taskSpec{unit: "e.service", image: imgA, event: "package", delivery: "e-1"},
			event{RequestID: "req-e-1-copy", TS: d.now, Method: "POST", Status: 202, Action: "github-webhook"}); ok {
			t.Error("a copy of a pending claim was claimed again")
		}
		d.drain(t)
		if st := d.state(t)["e-1"]; st != "dispatched/e-1" {
			t.Errorf("redelivered e-1: %s, want dispatched", st)
		}
	})

	// systemd-run failed, but the task had started: dispatched, not retried.
	t.Run("a failed systemd-run whose task started is dispatched", func(t *testing.T) {
		d.fail, d.started = 1, true
		d.claim(t, "f-1", "f.service", imgA)
		d.drain(t)
		if st := d.state(t)["f-1"]; st != "dispatched/f-1" {
			t.Errorf("f-1, whose systemd-run failed after the task started: %s, want dispatched", st)
		}
		d.started = false
	})

	// A server stopped during systemd-run: the task never started, so the claim is queued again.
	t.Run("a claim a stopped server left dispatching is queued again", func(t *testing.T) {
		d.claim(t, "g-1", "g.service", imgA)
		if _, ok, _, err := d.events.nextTask(context.Background(), d.now, func(queuedTask) hold { return hold{} }, func(queuedTask) []event { return nil }); !ok || err != nil {
			t.Fatal(ok, err)
		}
		d.srv.reconcile(context.Background(), "dispatching", d.now.Add(time.Minute))
		if st := d.state(t)["g-1"]; st != "pending/" {
			t.Errorf("g-1 left dispatching with no task: %s, want pending", st)
		}
		d.drain(t)
		if st := d.state(t)["g-1"]; st != "dispatched/g-1" {
			t.Errorf("g-1 after the restart: %s, want dispatched", st)
		}
		pending, oldest, err := queueStats(context.Background(), d.events.db)
		if err != nil || pending != 0 || !oldest.IsZero() {
			t.Errorf("queueStats with nothing pending: %d %v %v", pending, oldest, err)
		}
	})
}
