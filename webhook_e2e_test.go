// webhook_e2e_test.go tests webhook.go end to end on the rig: a signed GitHub delivery and a
// registry push redeploying a real unit, a unit without a Quadlet image, a server killed in the
// middle of a burst, and a unit's policies from its .container labels: an approval given on the
// status page in headless chromium (a cross-site one refused), and a cooldown covering pushes.
package main

import (
	"bufio"
	"bytes"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestE2EGitHubDelivery drives the product's main job on the real rig: a signed delivery for a
// new image ends with the unit's container running it, with a row for every step.
func TestE2EGitHubDelivery(t *testing.T) {
	r, s, name, ref, id1, id2, unit, ctr := e2eTwoVersions(t, "demo")
	r.TagLocal(t, id1, ref) // the host still has v1 locally; the registry has v2
	if id1 == id2 {
		t.Fatal("v1 and v2 have the same image ID")
	}
	body := githubPackagePayload(r.Registry(), "e2e", name, "latest", "")

	t.Run("bad signature runs nothing", func(t *testing.T) {
		code, text := s.deliver(t, unit, "package", "bad-sig-1", body, "wrong secret")
		if code != http.StatusUnauthorized {
			t.Fatalf("status %d %q, want 401", code, text)
		}
	})
	t.Run("tag mismatch runs nothing", func(t *testing.T) {
		other := githubPackagePayload(r.Registry(), "e2e", name, "v9", "")
		code, text := s.deliver(t, unit, "package", "mismatch-1", other, s.secret)
		if code != http.StatusAccepted || !strings.Contains(text, "tag mismatch") {
			t.Fatalf("status %d %q, want 202 tag mismatch", code, text)
		}
	})

	start := time.Now()
	code, text := s.deliver(t, unit, "package", "delivery-v2", body, s.secret)
	answered := time.Since(start)
	if code != http.StatusAccepted || text != "auto-update queued" {
		t.Fatalf("delivery: %d %q, want 202 auto-update queued; server log:\n%s", code, text, s.log)
	}
	r.WaitFor(t, 3*time.Minute, func() bool {
		if rows := s.taskRows(t, "delivery-v2"); len(rows) > 0 && finalSteps[rows[len(rows)-1].step] && rows[len(rows)-1].step != "completed" {
			t.Fatalf("the task ended without running v2: %s; server log:\n%s", stepDetails(rows), s.log)
		}
		return r.ContainerImage(t, ctr) == id2
	}, ctr+" to run v2")
	running := time.Since(start)
	rows := s.waitTask(t, r, "delivery-v2")
	got := strings.Join(steps(rows), ",")
	if got != "started,pulled,restarted,healthy,completed" {
		t.Fatalf("task steps %s; server log:\n%s", stepDetails(rows), s.log)
	}
	var pullMS, restartMS any
	for _, row := range rows {
		switch row.step {
		case "pulled":
			pullMS = row.meta["pull_ms"]
		case "restarted":
			restartMS = row.meta["restart_ms"]
		}
	}
	t.Logf("delivery answered in %s; container on v2 after %s (podman pull %v ms, systemctl restart %v ms); task rows %s",
		answered, running, pullMS, restartMS, got)
	if n := len(s.taskRows(t, "mismatch-1")); n != 0 {
		t.Errorf("tag mismatch ran a task: %d rows", n)
	}
	if st := r.Show(t, unit, "ActiveState")["ActiveState"]; st != "active" {
		t.Errorf("%s is %s after the redeploy", unit, st)
	}

	t.Run("same delivery again is a duplicate", func(t *testing.T) {
		code, text := s.deliver(t, unit, "package", "delivery-v2", body, s.secret)
		if code != http.StatusAccepted || text != "duplicate delivery" {
			t.Fatalf("redelivery: %d %q, want 202 duplicate delivery", code, text)
		}
	})

	t.Run("same image again does not restart", func(t *testing.T) {
		pid := r.Show(t, unit, "MainPID")["MainPID"]
		code, _ := s.deliver(t, unit, "package", "delivery-v2-again", body, s.secret)
		if code != http.StatusAccepted {
			t.Fatalf("status %d", code)
		}
		rows := s.waitTask(t, r, "delivery-v2-again")
		if last := rows[len(rows)-1].step; last != "up-to-date" {
			t.Fatalf("steps %s, want to end up-to-date", stepDetails(rows))
		}
		if now := r.Show(t, unit, "MainPID")["MainPID"]; now != pid {
			t.Fatalf("MainPID changed %s → %s: the unit was restarted", pid, now)
		}
	})

	// Images are pushed with the parent test's t: a subtest's cleanup would remove an image that
	// the unit still runs.
	tt := t
	t.Run("three deliveries for one push restart once, one task at a time", func(t *testing.T) {
		_, id3 := r.PushImage(tt, "e2e/"+name, "latest", "v3")
		r.TagLocal(t, id2, ref)
		ids := []string{"multi-1", "multi-2", "multi-3"}
		for _, d := range ids {
			if code, text := s.deliver(t, unit, "package", d, body, s.secret); code != http.StatusAccepted {
				t.Fatalf("%s: %d %q", d, code, text)
			}
		}
		var restarts int
		type span struct{ first, last int64 }
		var spans []span
		tasks := map[string]bool{} // the three are covered by one or two tasks
		for _, d := range ids {
			if l := s.leader(t, r, d); tasks[l] {
				continue
			} else {
				tasks[l] = true
			}
			rows := s.waitTask(t, r, d)
			var sp span
			for _, row := range rows {
				if row.step == "restarted" {
					restarts++
				}
				if row.step != "started" && sp.first == 0 {
					sp.first = row.id // the first row written under the image lock
				}
				sp.last = row.id
			}
			spans = append(spans, sp)
		}
		if restarts != 1 {
			for _, d := range ids {
				for _, row := range s.taskRows(t, d) {
					t.Logf("%s %d %s %v", d, row.id, row.step, row.meta["error"])
				}
			}
			t.Fatalf("%d restarts for one push, want 1", restarts)
		}
		sort.Slice(spans, func(i, j int) bool { return spans[i].first < spans[j].first })
		for i := 1; i < len(spans); i++ {
			if spans[i].first < spans[i-1].last {
				t.Fatalf("redeploys overlapped: %v", spans)
			}
		}
		if got := r.ContainerImage(t, ctr); got != id3 {
			t.Fatalf("container runs %s, want v3 %s", got, id3)
		}
	})

	t.Run("a broken image is rolled back", func(t *testing.T) {
		good := r.ContainerImage(t, ctr)
		_, broken := r.PushBrokenImage(tt, "e2e/"+name, "latest")
		r.TagLocal(t, good, ref)
		code, _ := s.deliver(t, unit, "package", "broken-1", body, s.secret)
		if code != http.StatusAccepted {
			t.Fatalf("status %d", code)
		}
		rows := s.waitTask(t, r, "broken-1")
		if last := rows[len(rows)-1].step; last != "rolled-back" {
			t.Fatalf("steps %s, want to end rolled-back; server log:\n%s", stepDetails(rows), s.log)
		}
		r.WaitFor(t, 30*time.Second, func() bool { return r.ContainerImage(t, ctr) == good }, ctr+" back on the good image")
		if st := r.Show(t, unit, "ActiveState")["ActiveState"]; st != "active" {
			t.Fatalf("%s is %s after the rollback", unit, st)
		}
		if out, err := r.Podman(t, "image", "exists", broken); err != nil {
			t.Fatalf("the failed image %s was removed; it must be kept for inspection: %v %s", broken, err, out)
		}
	})

	t.Run("force restarts an unchanged image", func(t *testing.T) {
		pid := r.Show(t, unit, "MainPID")["MainPID"]
		bin := buildBinary(t)
		cmd := r.Command(bin, "run-task", "--force", "--state-dir", s.state, "--", unit, ref, "manual", "force-1", "/manual")
		cmd.Env = append(cmd.Env, e2eHealthSettle)
		// The registry holds the broken image under the tag: push the running one back, so the
		// pull brings nothing new.
		if out, err := r.Podman(t, "push", "--quiet", ref); err != nil {
			t.Fatalf("push %s: %v %s", ref, err, out)
		}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("run-task --force: %v\n%s", err, out)
		}
		rows := s.waitTask(t, r, "force-1")
		if !strings.Contains(strings.Join(steps(rows), ","), "restarted") {
			t.Fatalf("steps %s, want a restart", stepDetails(rows))
		}
		if now := r.Show(t, unit, "MainPID")["MainPID"]; now == pid {
			t.Fatalf("MainPID unchanged (%s): not restarted", pid)
		}
	})
}

// TestE2EUnitWithoutImage: a unit with no Quadlet file is not redeployed by a push of another
// package to its route — nothing is pulled, it is not restarted — and is still redeployed by a
// push of the image its container runs.
func TestE2EUnitWithoutImage(t *testing.T) {
	r := needRig(t)
	// The rig user's HOME has no .container file for this unit: it has no Image= anywhere.
	s := startE2EServer(t)
	name := rigUniqueName(t, "plain")
	ref, id1 := r.PushImage(t, "e2e/"+name, "latest", "v1")
	base := rigUniqueName(t, "plain")
	unit, ctr := base+".service", base
	r.InstallUnit(t, unit, r.ContainerUnit(ctr, ref))
	if _, err := r.Systemctl(t, "start", unit); err != nil {
		t.Fatal(err)
	}
	r.WaitFor(t, 60*time.Second, func() bool { return r.ContainerImage(t, ctr) == id1 }, unit+" to run v1")
	pid := r.Show(t, unit, "MainPID")["MainPID"]

	other := name + "-other"
	otherRef, otherID := r.PushImage(t, "e2e/"+other, "latest", "other")
	if _, err := r.Podman(t, "rmi", "--force", otherRef); err != nil {
		t.Fatal(err) // not in the local store, so a pull would show
	}
	code, text := s.deliver(t, unit, "package", "unrelated-1", githubPackagePayload(r.Registry(), "e2e", other, "latest", ""), s.secret)
	if code != http.StatusAccepted {
		t.Fatalf("delivery of an unrelated package: %d %q", code, text)
	}
	rows := s.waitTask(t, r, "unrelated-1")
	if got := strings.Join(steps(rows), ","); got != "started,image-mismatch" {
		t.Fatalf("steps %s, want started,image-mismatch; server log:\n%s", got, s.log)
	}
	t.Logf("refused: %v", rows[len(rows)-1].meta["reason"])
	if now := r.Show(t, unit, "MainPID")["MainPID"]; now != pid {
		t.Errorf("MainPID %s → %s: the unit was restarted by an unrelated package", pid, now)
	}
	if got := r.ContainerImage(t, ctr); got != id1 {
		t.Errorf("container runs %s, want still v1 %s", got, id1)
	}
	if out, err := r.Podman(t, "image", "exists", otherID); err == nil {
		t.Errorf("the unrelated image %s was pulled: %s", otherID, out)
	}

	// Its own image still redeploys it.
	_, id2 := r.PushImage(t, "e2e/"+name, "latest", "v2")
	r.TagLocal(t, id1, ref)
	code, text = s.deliver(t, unit, "package", "own-1", githubPackagePayload(r.Registry(), "e2e", name, "latest", ""), s.secret)
	if code != http.StatusAccepted {
		t.Fatalf("delivery of the unit's image: %d %q", code, text)
	}
	rows = s.waitTask(t, r, "own-1")
	if got := strings.Join(steps(rows), ","); got != "started,pulled,restarted,healthy,completed" {
		t.Fatalf("steps %s; server log:\n%s", got, s.log)
	}
	r.WaitFor(t, 30*time.Second, func() bool { return r.ContainerImage(t, ctr) == id2 }, ctr+" to run v2")
}

// TestE2ERegistryPush drives a registry push end to end with no hand-made payload: a real
// docker-registry whose notifications point at the server, and podman push. A push of v2 ends
// with the unit's container on v2; the same image pushed again is up to date; a push to another
// repository restarts nothing. A second endpoint with a wrong token is refused 401 on every
// retry of the same events, which never become claims of their own: each pushed manifest is
// claimed once, under its Distribution event id.
func TestE2ERegistryPush(t *testing.T) {
	r := needRig(t)
	token := rigUniqueName(t, "token")
	registries := filepath.Join(r.TempDir(t), "registries.conf") // read by the server's tasks, as the rig's user
	s := startE2EServer(t, secretEnv("distribution")+"="+token, "CONTAINERS_REGISTRIES_CONF="+registries)
	base := rigUniqueName(t, "app")
	hook := s.url + "/registry/distribution/" + base
	// The README's notifications section, plus a second endpoint whose token is wrong.
	reg := r.StartRegistry(t, fmt.Sprintf(`notifications:
  endpoints:
    - name: webhook-auto-update
      url: %[1]s
      headers:
        Authorization: [Bearer %[2]s]
      timeout: 5s
      threshold: 3
      backoff: 1s
      ignoredmediatypes:
        - application/octet-stream
    - name: wrong-token
      url: %[1]s
      headers:
        Authorization: [Bearer wrong-%[2]s]
      timeout: 5s
      threshold: 1
      backoff: 1s
`, hook, token))
	// The redeploy's podman pull reads the server's registries.conf: the rig user's, and this
	// registry.
	rigConf, err := os.ReadFile(filepath.Join(r.home, ".config", "containers", "registries.conf"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	if err := os.WriteFile(registries, fmt.Appendf(rigConf, "\n[[registry]]\nlocation = %q\ninsecure = true\n", reg), 0o644); err != nil {
		t.Fatal(err)
	}

	name := rigUniqueName(t, "demo")
	ref := reg + "/e2e/" + name + ":latest"
	_, id1 := r.PushImage(t, "e2e/"+name, "latest", "v1") // built through the rig's registry
	_, id2 := r.PushImage(t, "e2e/"+name, "latest", "v2")
	if id1 == id2 {
		t.Fatal("v1 and v2 have the same image ID")
	}
	r.TagLocal(t, id1, ref)
	unit, ctr := e2eNamedContainerUnit(t, r, base, ref, id1)
	// pushTo pushes a local image to the notifying registry without retagging it here, so the
	// host keeps running and holding what it had.
	pushTo := func(t *testing.T, id, dest string) time.Time {
		t.Helper()
		if out, err := r.Podman(t, "push", "--quiet", "--tls-verify=false", id, "docker://"+dest); err != nil {
			t.Fatalf("push %s: %v %s", dest, err, out)
		}
		return time.Now()
	}
	claims := func() []string {
		var ids []string
		scanRows(t, s.db, false, `SELECT delivery_id FROM github_deliveries WHERE unit = ? ORDER BY rowid`, []any{unit},
			func(rows *sql.Rows) error {
				var id string
				rows.Scan(&id) // a poll: a row it cannot read counts as ""
				ids = append(ids, id)
				return nil
			})
		return ids
	}
	// nextClaim waits for the claim after the n claims so far, notes when it was seen, and waits
	// for its task to end.
	var claimed time.Time
	nextClaim := func(t *testing.T, n int) (string, []taskRow) {
		t.Helper()
		var ids []string
		r.WaitFor(t, 60*time.Second, func() bool { ids = claims(); return len(ids) > n }, "the registry's push to be claimed")
		claimed = time.Now()
		if len(ids) != n+1 {
			t.Fatalf("claims %v after %d: one push was claimed more than once", ids, n)
		}
		return ids[n], s.waitTask(t, r, ids[n])
	}
	rowCount := func(where string) int {
		var n int
		if err := s.db.QueryRow(`SELECT count(*) FROM event_log WHERE action = 'registry-webhook' AND ` + where).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}

	pushTo(t, id1, ref)
	id, rows := nextClaim(t, 0)
	if last := rows[len(rows)-1].step; last != "up-to-date" || !strings.HasPrefix(id, "dist-") {
		t.Fatalf("push of the running image: claim %s, steps %v; want a dist- claim ending up-to-date; server log:\n%s", id, steps(rows), s.log)
	}

	pushed := pushTo(t, id2, ref)
	id, rows = nextClaim(t, 1)
	r.WaitFor(t, 60*time.Second, func() bool { return r.ContainerImage(t, ctr) == id2 }, ctr+" to run v2")
	running := time.Since(pushed)
	if got := strings.Join(steps(rows), ","); got != "started,pulled,restarted,healthy,completed" {
		t.Fatalf("push of v2: claim %s, steps %s; server log:\n%s", id, got, s.log)
	}
	t.Logf("podman push of v2 → claimed within %s → container on v2 after %s (claim %s)",
		claimed.Sub(pushed).Round(time.Millisecond), running.Round(time.Millisecond), id)

	t.Run("same image pushed again is up to date", func(t *testing.T) {
		pid := r.Show(t, unit, "MainPID")["MainPID"]
		pushTo(t, id2, ref)
		_, rows := nextClaim(t, 2)
		if last := rows[len(rows)-1].step; last != "up-to-date" {
			t.Fatalf("steps %v, want to end up-to-date", steps(rows))
		}
		if now := r.Show(t, unit, "MainPID")["MainPID"]; now != pid {
			t.Fatalf("MainPID changed %s → %s: the unit was restarted", pid, now)
		}
	})

	t.Run("a push to another repository restarts nothing", func(t *testing.T) {
		pid := r.Show(t, unit, "MainPID")["MainPID"]
		before := rowCount(`json_extract(meta, '$.reason') = 'repository-mismatch'`)
		pushTo(t, id2, reg+"/e2e/"+name+"-other:latest") // v1 is gone: the redeploy pruned it
		r.WaitFor(t, 60*time.Second, func() bool { return rowCount(`json_extract(meta, '$.reason') = 'repository-mismatch'`) > before },
			"the push to another repository to be answered")
		if ids := claims(); len(ids) != 3 {
			t.Fatalf("claims %v: the push to another repository was claimed", ids)
		}
		if now := r.Show(t, unit, "MainPID")["MainPID"]; now != pid || r.ContainerImage(t, ctr) != id2 {
			t.Fatalf("MainPID %s → %s, image %s: the unit was touched", pid, now, r.ContainerImage(t, ctr))
		}
	})

	t.Run("a wrong token is refused on every retry and never claimed", func(t *testing.T) {
		r.WaitFor(t, 60*time.Second, func() bool { return rowCount(`status = 401`) >= 3 }, "the wrong-token endpoint to retry a refused event")
		refused, claimed := rowCount(`status = 401`), claims()
		if len(claimed) != 3 {
			t.Fatalf("claims %v after %d refused retries: want the 3 pushes claimed once each", claimed, refused)
		}
		t.Logf("%d refused requests from the wrong-token endpoint; claims %v", refused, claimed)
	})
}

// watchTimestampFiles checks every timestamp log under state every few milliseconds until stop
// is closed, and reports the paths it ever saw empty (a torn write).
func watchTimestampFiles(state string, stop <-chan struct{}) <-chan []string {
	out := make(chan []string, 1)
	go func() {
		var empty []string
		for {
			select {
			case <-stop:
				out <- empty
				return
			case <-time.After(2 * time.Millisecond):
			}
			files, _ := filepath.Glob(filepath.Join(state, "github-image-limits", "*.db"))
			files = append(files, filepath.Join(state, "ratelimit.db"))
			for _, f := range files {
				if fi, err := os.Stat(f); err == nil && fi.Size() == 0 && !slices.Contains(empty, f) {
					empty = append(empty, f)
				}
			}
		}
	}()
	return out
}

// e2eIdleAppServer pushes e2e/repo:latest, starts repo.service (an app that runs no container,
// so it names no image: WEBHOOK_ALLOW_ANY_IMAGE lets its tasks redeploy it) and installs the
// socket-activated server signing with secret, with extra unit lines; the socket is not started.
func e2eIdleAppServer(t *testing.T, r *rig, bin, state, logPath string, port int, repo, secret string, extra ...string) (ref, service, socket string) {
	t.Helper()
	ref, _ = r.PushImage(t, "e2e/"+repo, "latest", "v1")
	app := repo + ".service"
	r.InstallUnit(t, app, "[Service]\nExecStart=/bin/sleep 1000\n")
	if _, err := r.Systemctl(t, "start", app); err != nil {
		t.Fatal(err)
	}
	service, socket = r.installSocketServer(t, bin, state, logPath, port, append([]string{"Environment=GITHUB_WEBHOOK_SECRET=" + secret,
		"Environment=WEBHOOK_HEALTH_SETTLE_SECS=1", "Environment=WEBHOOK_REGISTRY_HOSTS=" + r.Registry(),
		"Environment=WEBHOOK_ALLOW_ANY_IMAGE=true"}, extra...)...)
	return ref, service, socket
}

// TestE2EKillServerMidBurst runs the built server under a real socket unit (Restart=on-failure,
// as deployed) and kills it with SIGKILL while a burst of deliveries is in flight. The socket
// keeps accepting; systemd starts the server again. Every delivery answered 202 must be in
// github_deliveries with its request row, and its task (a real run-task in a transient unit,
// pulling from the rig's registry) must finish. Deliveries that lost their connection in the
// kill are redelivered, as an operator would from GitHub's UI, and the same holds for them. No
// timestamp log is ever seen empty.
func TestE2EKillServerMidBurst(t *testing.T) {
	r, bin, state, logPath, port := e2eSocketRig(t)
	secret := "kill-e2e-" + randomName(t)
	repo := rigUniqueName(t, "kill")
	ref, service, socket := e2eIdleAppServer(t, r, bin, state, logPath, port, repo, secret, "Restart=on-failure", "RestartSec=1")
	if _, err := r.Systemctl(t, "start", socket); err != nil {
		t.Fatal(err)
	}
	serverLog := func() string { b, _ := os.ReadFile(logPath); return string(b) }
	url := fmt.Sprintf("http://127.0.0.1:%d/github-package-update/%s", port, repo)
	body := githubPackagePayload(r.Registry(), "e2e", repo, "latest", "")
	client := &http.Client{Timeout: 2 * time.Minute}
	send := func(delivery string) (int, string, string, error) {
		req, _ := http.NewRequest("POST", url, bytes.NewReader(body))
		req.Header.Set("X-Hub-Signature-256", hubSignature(secret, body))
		req.Header.Set("X-GitHub-Event", "package")
		req.Header.Set("X-GitHub-Delivery", delivery)
		resp, err := client.Do(req)
		if err != nil {
			return 0, "", "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp.StatusCode, strings.TrimSpace(string(b)), resp.Header.Get("X-Request-Id"), err
	}
	if code, text, _, err := send("kill-first"); err != nil || code != 202 {
		t.Fatalf("first delivery: %d %q %v; server log:\n%s", code, text, err, serverLog())
	}
	oldPID := r.Show(t, service, "MainPID")["MainPID"]

	stopWatch := make(chan struct{})
	emptySeen := watchTimestampFiles(state, stopWatch)
	type answer struct {
		code      int
		text, rid string
		err       error
	}
	const workers, each = 4, 8
	var mu sync.Mutex
	answers := map[string]answer{}
	var answered atomic.Int32
	killed := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				id := fmt.Sprintf("kill-%d-%d", w, i)
				code, text, rid, err := send(id)
				mu.Lock()
				answers[id] = answer{code, text, rid, err}
				mu.Unlock()
				if answered.Add(1) == workers*each/3 {
					close(killed)
				}
			}
		}()
	}
	<-killed
	pid, _ := strconv.Atoi(oldPID)
	if pid <= 1 {
		t.Fatalf("MainPID of %s is %q", service, oldPID)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	wg.Wait()

	// What lost its connection is redelivered, once the server is back.
	var lost []string
	for id, a := range answers {
		if a.err != nil {
			lost = append(lost, id)
		}
	}
	sort.Strings(lost)
	redelivered := map[string]answer{}
	for _, id := range lost {
		code, text, rid, err := send(id)
		if err != nil {
			t.Fatalf("redelivery of %s: %v; server log:\n%s", id, err, serverLog())
		}
		redelivered[id] = answer{code, text, rid, err}
	}
	newPID := r.Show(t, service, "MainPID")["MainPID"]
	if newPID == oldPID || newPID == "0" {
		t.Fatalf("%s: MainPID %s after the kill of %s: not restarted", service, newPID, oldPID)
	}

	e2e := &e2eServer{url: url, state: state, secret: secret, log: &syncBuffer{}, db: rawDB(t, filepath.Join(state, "data", "pod-upgrade-trigger.db"))}
	accepted := map[string]string{"kill-first": ""}
	counts := map[string]int{}
	check := func(id string, a answer, how string) {
		counts[how+" "+strconv.Itoa(a.code)+" "+a.text]++
		if a.err != nil {
			return
		}
		// A redelivery may be refused with 500 (GitHub then shows it failed): its claim's task
		// unit may still exist. What must never happen is a 2xx without a task.
		if a.code != 202 && !(how == "redelivered" && a.code == 500) {
			t.Errorf("%s %s: %d %q", how, id, a.code, a.text)
		}
		if a.code/100 == 2 {
			accepted[id] = a.rid
		}
	}
	for id, a := range answers {
		check(id, a, "first")
	}
	for id, a := range redelivered {
		check(id, a, "redelivered")
	}
	t.Logf("kill -9 of pid %s after %d answers; restarted as %s; answers: %v", oldPID, workers*each/3, newPID, counts)
	// Every delivery answered 202 runs, once the restarted server has its queue: its claim ends
	// done, covered by a task that finished. A task started before the kill is not started
	// again (the restart finds its unit), one never started is.
	for id, rid := range accepted {
		if rid != "" && queryInt(t, e2e.db, `SELECT count(*) FROM event_log WHERE request_id = ? AND status = 202`, rid) != 1 {
			t.Errorf("accepted delivery %s: no 202 row for its request %s", id, rid)
		}
		var status, leader string
		r.WaitFor(t, 120*time.Second, func() bool {
			err := e2e.db.QueryRow(`SELECT status, coalesce(covered_by, '') FROM github_deliveries WHERE delivery_id = ?`, id).
				Scan(&status, &leader)
			return err == nil && status == "done"
		}, "the claim of "+id+" to be done")
		rows := e2e.waitTask(t, r, leader)
		if last := rows[len(rows)-1].step; last != "up-to-date" && last != "completed" {
			t.Errorf("task of %s (run by %s): steps %s", id, leader, stepDetails(rows))
		}
	}
	if n := queryInt(t, e2e.db, `SELECT count(*) FROM (SELECT json_extract(meta, '$.delivery') d FROM event_log
		WHERE action = 'github-task' AND json_extract(meta, '$.step') = 'started' GROUP BY d HAVING count(*) > 1)`); n != 0 {
		t.Errorf("%d tasks started twice", n)
	}
	var pulled int
	for _, row := range e2e.taskRows(t, "") {
		if row.step == "pulled" {
			pulled++
		}
	}
	close(stopWatch)
	if empty := <-emptySeen; len(empty) > 0 {
		t.Errorf("timestamp logs seen empty: %q", empty)
	}
	ts, bad, err := readTimestamps(imageLimitPath(state, ref))
	if err != nil || bad != 0 || len(ts) != pulled {
		t.Errorf("per-image log: %d timestamps, %d bad, %v; want one per task that pulled (%d)", len(ts), bad, err, pulled)
	}
	if t.Failed() {
		t.Logf("server log:\n%s", serverLog())
	}
}

// TestE2EApprovalOnThePage: a unit whose .container file says webhook-auto-update.approve=true
// is not redeployed by a delivery until a person approves it. The claim waits awaiting-approval
// (/api/deliveries/<id> says so), nothing is pulled and no task runs; an approval POSTed from
// another site is refused 403 and decides nothing, with the page's session or the API's token;
// the Approve button on the delivery's page, clicked in a real headless chromium, starts the
// redeploy, and the container runs the new image.
func TestE2EApprovalOnThePage(t *testing.T) {
	r := needRig(t)
	browser, err := chromiumPath()
	if err != nil {
		rigSkipOrFail(t, "%v", err)
	}
	token := "approve-" + randomName(t)
	s := startE2EServer(t, "WEBHOOK_MANUAL_TOKEN="+token)
	name := rigUniqueName(t, "approve")
	ref, id1 := r.PushImage(t, "e2e/"+name, "latest", "v1")
	unit, ctr := e2eNamedContainerUnit(t, r, rigUniqueName(t, "app"), ref, id1, "Label=webhook-auto-update.approve=true")
	_, id2 := r.PushImage(t, "e2e/"+name, "latest", "v2")
	r.TagLocal(t, id1, ref) // the host has v1 under the tag: a pull would move it to v2
	const id = "approve-v2"
	if code, text := s.deliver(t, unit, "package", id, githubPackagePayload(r.Registry(), "e2e", name, "latest", ""), s.secret); code != http.StatusAccepted || text != "auto-update queued" {
		t.Fatalf("delivery: %d %q, want 202 auto-update queued; server log:\n%s", code, text, s.log)
	}
	var answer map[string]any
	r.WaitFor(t, 60*time.Second, func() bool {
		answer = s.delivery(t, token, id)
		return answer["wait"] != nil || len(s.taskRows(t, "")) > 0
	}, "the claim of "+id+" to wait or run")
	if answer["wait"] != "awaiting-approval" {
		t.Fatalf("/api/deliveries/%s: %v; want wait awaiting-approval; task rows %s; server log:\n%s", id, answer, stepDetails(s.taskRows(t, "")), s.log)
	}
	t.Logf("/api/deliveries/%s: wait %v until %v, outcome %v (%v)", id, answer["wait"], answer["wait_until"], answer["outcome"], answer["label"])
	nothingRan := func(when string) {
		t.Helper()
		if rows := s.taskRows(t, ""); len(rows) > 0 {
			t.Fatalf("%s: a task ran: %s", when, stepDetails(rows))
		}
		if got := strings.TrimSpace(r.mustPodman(t, "image", "inspect", "--format", "{{.Id}}", ref)); got != id1 {
			t.Fatalf("%s: %s is %s locally, not v1 %s: it was pulled", when, ref, got, id1)
		}
		if got := r.ContainerImage(t, ctr); got != id1 {
			t.Fatalf("%s: %s runs %s, want still v1 %s", when, ctr, got, id1)
		}
		var status, step string
		var taskUnit sql.NullString
		if err := s.db.QueryRow(`SELECT status, step, task_unit FROM github_deliveries WHERE delivery_id = ?`, id).Scan(&status, &step, &taskUnit); err != nil {
			t.Fatal(err)
		}
		if status != "pending" || step != waitApproval || taskUnit.Valid {
			t.Fatalf("%s: claim %s is %s, step %s, task unit %v; want pending awaiting-approval without a task", when, id, status, step, taskUnit)
		}
	}
	nothingRan("awaiting approval")

	t.Run("an approval from another site is refused", func(t *testing.T) {
		client := &http.Client{Timeout: 30 * time.Second,
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
		send := func(method, path, body string, hdr map[string]string) (int, string, http.Header) {
			t.Helper()
			req, _ := http.NewRequest(method, s.url+path, strings.NewReader(body))
			for k, v := range hdr {
				req.Header.Set(k, v)
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			return resp.StatusCode, string(b), resp.Header
		}
		form := "application/x-www-form-urlencoded"
		code, _, hdr := send("POST", "/status/login", "next=%2Fstatus%2F&token="+token, map[string]string{"Content-Type": form})
		session, _, _ := strings.Cut(hdr.Get("Set-Cookie"), ";")
		if code != http.StatusSeeOther || !strings.HasPrefix(session, statusCookie+"=") {
			t.Fatalf("log in: %d, Set-Cookie %q", code, hdr.Get("Set-Cookie"))
		}
		// The session is good: the delivery's page shows its Approve button to it.
		if code, page, _ := send("GET", "/status/deliveries/"+id, "", map[string]string{"Cookie": session}); code != 200 || !strings.Contains(page, `class="approve"`) {
			t.Fatalf("the delivery's page with the session: %d, no Approve button:\n%s", code, page)
		}
		for _, tc := range []struct {
			name, path, body string
			hdr              map[string]string
		}{
			{"the page's form, Origin of another site", "/status/deliveries/" + id + "/approve", "reason=csrf",
				map[string]string{"Cookie": session, "Content-Type": form, "Origin": "http://attacker.example"}},
			{"the page's form, Sec-Fetch-Site cross-site", "/status/deliveries/" + id + "/approve", "reason=csrf",
				map[string]string{"Cookie": session, "Content-Type": form, "Sec-Fetch-Site": "cross-site", "Origin": "http://attacker.example"}},
			{"the API with its token, Sec-Fetch-Site cross-site", "/api/deliveries/" + id + "/approve", `{"caller":"attacker","reason":"csrf"}`,
				map[string]string{"Authorization": "Bearer " + token, "Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}},
		} {
			code, text, _ := send("POST", tc.path, tc.body, tc.hdr)
			if code != http.StatusForbidden || !strings.Contains(text, "cross-origin request detected") {
				t.Errorf("%s: %d %q, want 403 cross-origin request detected", tc.name, code, text)
			}
		}
		if n := queryInt(t, s.db, `SELECT count(*) FROM event_log WHERE action = 'decision'`); n != 0 {
			t.Errorf("%d decision rows after refused approvals", n)
		}
		nothingRan("after the refused approvals")
	})

	p := startBrowser(t, browser)
	p.call("Page.navigate", map[string]any{"url": s.url + "/status/deliveries/" + id}, nil)
	p.waitFor(`document.readyState === 'complete' && document.getElementById('token')`)
	p.eval(`document.getElementById('token').focus()`, nil)
	p.call("Input.insertText", map[string]any{"text": token}, nil)
	for _, typ := range []string{"keyDown", "keyUp"} {
		p.call("Input.dispatchKeyEvent", map[string]any{"type": typ, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "text": "\r"}, nil)
	}
	approve := `form[action="/status/deliveries/` + id + `/approve"] button.approve`
	p.waitFor(`document.readyState === 'complete' && location.pathname === '/status/deliveries/` + id + `' && document.querySelector('` + approve + `')`)
	if f := p.facts(); !strings.Contains(f.Text, "awaiting-approval") {
		t.Errorf("the delivery's page does not say it awaits approval:\n%s", f.Text)
	}
	p.eval(`document.querySelector('input[name="reason"]').focus()`, nil)
	p.call("Input.insertText", map[string]any{"text": "tested on the rig"}, nil)
	p.click(approve)
	p.waitFor(`document.readyState === 'complete' && document.querySelector('h1') && document.querySelector('h1').textContent === 'Done'`)
	if f := p.facts(); !strings.Contains(f.Text, "approve: 1 deliveries") {
		t.Errorf("after Approve the page says:\n%s", f.Text)
	}

	r.WaitFor(t, 3*time.Minute, func() bool {
		if rows := s.taskRows(t, id); len(rows) > 0 && finalSteps[rows[len(rows)-1].step] && rows[len(rows)-1].step != "completed" {
			t.Fatalf("the approved task ended without running v2: %s; server log:\n%s", stepDetails(rows), s.log)
		}
		return r.ContainerImage(t, ctr) == id2
	}, ctr+" to run v2 after the approval")
	rows := s.waitTask(t, r, id)
	if got := strings.Join(steps(rows), ","); got != "started,pulled,restarted,healthy,completed" {
		t.Fatalf("task steps %s; server log:\n%s", stepDetails(rows), s.log)
	}
	var caller, reason string
	if err := s.db.QueryRow(`SELECT json_extract(meta, '$.caller'), json_extract(meta, '$.reason') FROM event_log
		WHERE action = 'decision' AND json_extract(meta, '$.delivery') = ? AND json_extract(meta, '$.decision') = 'approve'`, id).
		Scan(&caller, &reason); err != nil {
		t.Fatalf("the approval's row: %v", err)
	}
	if caller != "status page" || reason != "tested on the rig" {
		t.Errorf("the approval's row: caller %q, reason %q; want the status page's, with the reason typed", caller, reason)
	}
	answer = s.delivery(t, token, id)
	t.Logf("approved on the page → %s runs v2; /api/deliveries/%s: outcome %v (%v), wait %v", ctr, id, answer["outcome"], answer["label"], answer["wait"])
}

// TestE2ECooldownCoversPushes: a unit whose .container file says webhook-auto-update.cooldown=8s
// gets three pushes of its tag in a row, each announced by a delivery. Every claim waits in
// cooldown, each push restarting the wait; once the tag was quiet for the cooldown, one task,
// dispatched no earlier, covers all three, and the container runs the third push's image.
func TestE2ECooldownCoversPushes(t *testing.T) {
	r := needRig(t)
	const cooldown = 8 * time.Second
	token := "cooldown-" + randomName(t)
	s := startE2EServer(t, "WEBHOOK_MANUAL_TOKEN="+token)
	name := rigUniqueName(t, "cool")
	ref, id1 := r.PushImage(t, "e2e/"+name, "latest", "v1")
	unit, ctr := e2eNamedContainerUnit(t, r, rigUniqueName(t, "app"), ref, id1, "Label=webhook-auto-update.cooldown="+cooldown.String())
	// The three images are built first (under another repository), so that the pushes of the
	// tag follow each other closely: each is a podman push of a local image.
	var images []string
	for _, v := range []string{"v2", "v3", "v4"} {
		_, id := r.PushImage(t, "e2e/"+name+"-staged", v, v)
		images = append(images, id)
	}
	body := githubPackagePayload(r.Registry(), "e2e", name, "latest", "")
	deliveries := []string{"cool-1", "cool-2", "cool-3"}
	var last time.Time
	var gaps []time.Duration
	for i, d := range deliveries {
		if out, err := r.Podman(t, "push", "--quiet", "--tls-verify=false", images[i], "docker://"+ref); err != nil {
			t.Fatalf("push %s: %v %s", ref, err, out)
		}
		if code, text := s.deliver(t, unit, "package", d, body, s.secret); code != http.StatusAccepted || text != "auto-update queued" {
			t.Fatalf("delivery %s: %d %q; server log:\n%s", d, code, text, s.log)
		}
		if !last.IsZero() {
			gaps = append(gaps, time.Since(last))
		}
		last = time.Now()
		if i > 0 {
			continue
		}
		var answer map[string]any
		r.WaitFor(t, 30*time.Second, func() bool {
			answer = s.delivery(t, token, d)
			return answer["wait"] != nil || len(s.taskRows(t, "")) > 0
		}, "the claim of "+d+" to wait or run")
		if answer["wait"] != waitCooldown {
			t.Fatalf("/api/deliveries/%s: %v; want wait cooldown; task rows %s", d, answer, stepDetails(s.taskRows(t, "")))
		}
	}
	if slices.Max(gaps) >= cooldown {
		t.Fatalf("pushes %v apart, not within the cooldown %s: this machine is too slow for the test's timing", gaps, cooldown)
	}

	r.WaitFor(t, 3*time.Minute, func() bool {
		if rows := s.taskRows(t, ""); len(rows) > 0 && finalSteps[rows[len(rows)-1].step] && rows[len(rows)-1].step != "completed" {
			t.Fatalf("a task ended without running v4: %s; server log:\n%s", stepDetails(rows), s.log)
		}
		return r.ContainerImage(t, ctr) == images[2]
	}, ctr+" to run v4, the third push")
	rows := s.waitTask(t, r, deliveries[2])
	if got := strings.Join(steps(rows), ","); got != "started,pulled,restarted,healthy,completed" {
		t.Fatalf("task steps %s; server log:\n%s", stepDetails(rows), s.log)
	}
	if all := s.taskRows(t, ""); len(all) != len(rows) {
		t.Fatalf("%d task rows, want the one task's %d: %s", len(all), len(rows), stepDetails(all))
	}
	for _, d := range deliveries {
		var status, coveredBy string
		if err := s.db.QueryRow(`SELECT status, coalesce(covered_by, '') FROM github_deliveries WHERE delivery_id = ?`, d).Scan(&status, &coveredBy); err != nil {
			t.Fatal(err)
		}
		if status != "done" || coveredBy != deliveries[0] {
			t.Errorf("claim %s: %s, covered by %q; want done, covered by %s", d, status, coveredBy, deliveries[0])
		}
		if n := queryInt(t, s.db, `SELECT count(*) FROM event_log WHERE action = 'github-dispatch'
			AND json_extract(meta, '$.delivery') = ? AND json_extract(meta, '$.reason') = 'cooldown'`, d); n != 1 {
			t.Errorf("claim %s: %d rows entering the cooldown, want 1", d, n)
		}
	}
	// The task was dispatched once the newest claim was cooldown old (rows have whole seconds).
	newestMS := int64(queryInt(t, s.db, `SELECT max(claimed_at) FROM github_deliveries WHERE unit = ?`, unit))
	dispatched := int64(queryInt(t, s.db, `SELECT min(ts) FROM event_log WHERE action = 'github-dispatch' AND json_extract(meta, '$.reason') = 'dispatching'`))
	if quiet := (newestMS + cooldown.Milliseconds()) / 1000; dispatched < quiet {
		t.Errorf("dispatched at %d, before the tag was quiet for %s (%d)", dispatched, cooldown, quiet)
	}
	t.Logf("three pushes %v apart → one task (delivery %s) dispatched %ds after the last claim, covering %v; %s runs v4",
		gaps, deliveries[0], dispatched-newestMS/1000, deliveries, ctr)
}

// keepAliveClient sends requests written by hand over one connection at a time, reconnecting
// after an answer that ends it, so that every request sent either has an answer or is counted
// lost (net/http's client would retry a GET on its own and hide a drop).
type keepAliveClient struct {
	addr string
	c    net.Conn
	br   *bufio.Reader
}

func (k *keepAliveClient) do(req string) (int, string, error) {
	if k.c == nil {
		c, err := net.Dial("tcp", k.addr)
		if err != nil {
			return 0, "", err
		}
		k.c, k.br = c, bufio.NewReader(c)
	}
	k.c.SetDeadline(time.Now().Add(time.Minute))
	resp, err := func() (*http.Response, error) {
		if _, err := io.WriteString(k.c, req); err != nil {
			return nil, err
		}
		return http.ReadResponse(k.br, nil)
	}()
	var body []byte
	if err == nil {
		body, err = io.ReadAll(resp.Body)
	}
	if err != nil || resp.Close {
		k.c.Close()
		k.c = nil
	}
	if err != nil {
		return 0, "", err
	}
	return resp.StatusCode, strings.TrimSpace(string(body)), nil
}

// TestE2ERestartLosesNothing restarts the socket-activated server six times while one client
// asks /health in a loop and others send signed deliveries, each on keep-alive connections:
// every request is answered (by the old process or the new one), and every delivery answered
// 202 ends done.
func TestE2ERestartLosesNothing(t *testing.T) {
	r, bin, state, logPath, port := e2eSocketRig(t)
	secret := "restart-e2e-" + randomName(t)
	repo := rigUniqueName(t, "rst")
	_, service, socket := e2eIdleAppServer(t, r, bin, state, logPath, port, repo, secret, "Environment=WEBHOOK_IMAGE_LIMIT_COUNT=10000",
		"StartLimitInterval=0") // six restarts in a few seconds are this test's point, not a crash loop
	if _, err := r.Systemctl(t, "start", socket); err != nil {
		t.Fatal(err)
	}
	serverLog := func() string { b, _ := os.ReadFile(logPath); return string(b) }
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	body := githubPackagePayload(r.Registry(), "e2e", repo, "latest", "")
	deliveryReq := func(id string) string {
		return fmt.Sprintf("POST /github-package-update/%s HTTP/1.1\r\nHost: test\r\nX-Hub-Signature-256: %s\r\n"+
			"X-GitHub-Event: package\r\nX-GitHub-Delivery: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
			repo, hubSignature(secret, body), id, len(body), body)
	}
	if code, text, err := (&keepAliveClient{addr: addr}).do(deliveryReq("rst-first")); err != nil || code != 202 {
		t.Fatalf("first delivery: %d %q %v; server log:\n%s", code, text, err, serverLog())
	}

	stop := make(chan struct{})
	var mu sync.Mutex
	var lost []string
	var health, deliveries atomic.Int64
	accepted := []string{"rst-first"}
	var wg sync.WaitGroup
	loop := func(name string, next func(i int) (req, id string), ok func(code int, id string)) {
		defer wg.Done()
		k := &keepAliveClient{addr: addr}
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			req, id := next(i)
			code, text, err := k.do(req)
			if err != nil {
				mu.Lock()
				lost = append(lost, fmt.Sprintf("%s %d: %v", name, i, err))
				mu.Unlock()
				continue
			}
			if code != 200 && code != 202 {
				t.Errorf("%s %d: %d %q", name, i, code, text)
			}
			ok(code, id)
		}
	}
	wg.Add(1)
	go loop("health", func(int) (string, string) { return "GET /health HTTP/1.1\r\nHost: test\r\n\r\n", "" },
		func(int, string) { health.Add(1) })
	for w := range 3 {
		wg.Add(1)
		go loop(fmt.Sprint("deliveries-", w), func(i int) (string, string) {
			time.Sleep(20 * time.Millisecond)
			id := fmt.Sprintf("rst-%d-%d", w, i)
			return deliveryReq(id), id
		}, func(code int, id string) {
			deliveries.Add(1)
			if code == 202 {
				mu.Lock()
				accepted = append(accepted, id)
				mu.Unlock()
			}
		})
	}
	pids := []string{r.Show(t, service, "MainPID")["MainPID"]}
	for range 6 {
		before := health.Load() + deliveries.Load()
		r.WaitFor(t, time.Minute, func() bool { return health.Load()+deliveries.Load() > before+200 }, "answers between restarts")
		if _, err := r.Systemctl(t, "restart", service); err != nil {
			t.Fatalf("restart: %v; server log:\n%s", err, serverLog())
		}
		pids = append(pids, r.Show(t, service, "MainPID")["MainPID"])
	}
	before := health.Load()
	r.WaitFor(t, time.Minute, func() bool { return health.Load() > before+50 }, "answers after the last restart")
	close(stop)
	wg.Wait()
	t.Logf("main PIDs %v; %d /health and %d deliveries answered, %d accepted, %d lost", pids, health.Load(), deliveries.Load(), len(accepted), len(lost))
	if len(slices.Compact(slices.Clone(pids))) != 7 {
		t.Errorf("main PIDs %v: want 7 processes", pids)
	}
	if len(lost) > 0 {
		t.Errorf("%d requests lost across the restarts: %v; server log:\n%s", len(lost), lost, serverLog())
	}
	db := rawDB(t, filepath.Join(state, "data", "pod-upgrade-trigger.db"))
	r.WaitFor(t, 3*time.Minute, func() bool {
		return queryInt(t, db, `SELECT count(*) FROM github_deliveries WHERE status = 'done'`) >= len(accepted)
	}, "every accepted delivery's claim to be done")
	var notDone []string
	for _, id := range accepted {
		var status string
		if err := db.QueryRow(`SELECT status FROM github_deliveries WHERE delivery_id = ?`, id).Scan(&status); err != nil || status != "done" {
			notDone = append(notDone, id+" "+status)
		}
	}
	if len(notDone) > 0 {
		t.Errorf("accepted deliveries not done: %v", notDone)
	}
}

// TestE2ERedeployBreakdown redeploys a serving app five times, alternating v1 and v2, from signed
// GitHub deliveries, and reports where each redeploy's time went: podman's own steps (pull,
// restart, the app's start) beside ours. A report, not an assertion on speed.
func TestE2ERedeployBreakdown(t *testing.T) {
	r := needRig(t)
	const settle = 2 * time.Second
	s := startE2EServer(t, fmt.Sprintf("WEBHOOK_HEALTH_SETTLE_SECS=%d", int(settle/time.Second)))
	name := rigUniqueName(t, "perf")
	ref, id1, _ := e2ePushApp(t, r, "e2e/"+name, "v1", appServe, appHealthy)
	_, id2, _ := e2ePushApp(t, r, "e2e/"+name, "v2", appServe, appHealthy)
	e2eRepush(t, r, id1, ref)
	app := e2eAppUnit(t, r, ref, "v1", false)
	body := githubPackagePayload(r.Registry(), "e2e", name, "latest", "")

	cols := []string{"answer", "202 → task process started", "task process → run-task begins",
		"ours around the pull (locks, lookups)", "pull", "restart", "container start → serving",
		"POST → new version serving", "ours before serving", "gate beyond the settle, prune, end"}
	samples := map[string][]float64{}
	for i := range 5 {
		version, id := "v2", id2
		if i%2 == 1 {
			version, id = "v1", id1
		}
		e2eRepush(t, r, id, ref)
		delivery := fmt.Sprintf("perf-%d", i)
		sent := time.Now()
		code, text := s.deliver(t, app.unit, "package", delivery, body, s.secret)
		answered := time.Now()
		if code != http.StatusAccepted {
			t.Fatalf("%s: %d %q", delivery, code, text)
		}
		for deadline := time.Now().Add(2 * time.Minute); app.serves() != version; time.Sleep(2 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: %s never served %s; rows %s; log:\n%s", delivery, app.unit, version, stepDetails(s.taskRows(t, delivery)), s.log)
			}
		}
		serving := time.Now()
		rows := s.waitTask(t, r, delivery)
		if got := strings.Join(steps(rows), ","); got != "started,pulled,restarted,healthy,completed" {
			t.Fatalf("%s: steps %s", delivery, stepDetails(rows))
		}
		meta := func(step, key string) float64 {
			for _, row := range rows {
				if row.step == step {
					v, _ := row.meta[key].(float64)
					return v
				}
			}
			return 0
		}
		ms := func(t time.Time) float64 { return float64(t.UnixMicro()) / 1000 }
		begins := float64(rowMS(t, rows, "started"))
		process := begins - meta("started", "startup_ms")
		restarted := float64(rowMS(t, rows, "restarted"))
		pull, restart := meta("pulled", "pull_ms"), meta("restarted", "restart_ms")
		total := ms(serving) - ms(sent)
		start := ms(serving) - restarted
		v := []float64{ms(answered) - ms(sent), process - ms(answered), begins - process,
			restarted - restart - pull - begins, pull, restart, start, total, total - pull - restart - start,
			float64(rowMS(t, rows, "completed")) - restarted - float64(settle/time.Millisecond)}
		for j, c := range cols {
			samples[c] = append(samples[c], v[j])
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "redeploy breakdown, 5 deliveries alternating v1/v2 (ms):\n| step (ms) | min | median | runs |\n| --- | --- | --- | --- |\n")
	for _, c := range cols {
		v := slices.Clone(samples[c])
		slices.Sort(v)
		var runs []string
		for _, x := range samples[c] {
			runs = append(runs, fmt.Sprintf("%.0f", x))
		}
		fmt.Fprintf(&b, "| %s | %.1f | %.1f | %s |\n", c, v[0], v[len(v)/2], strings.Join(runs, " "))
	}
	t.Log(b.String())
}
