package main

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"
)

// e2eServer is the built binary serving on a free loopback port, as an operator runs it.
type e2eServer struct {
	url    string
	state  string
	secret string
	log    *bytes.Buffer
	db     *sql.DB
}

// startE2EServer starts `webhook-auto-update server` with the given extra environment and stops
// it (SIGTERM, expecting exit 0) when the test ends.
func startE2EServer(t *testing.T, extraEnv ...string) *e2eServer {
	t.Helper()
	bin := buildBinary(t)
	port, err := rigFreePort()
	if err != nil {
		t.Fatal(err)
	}
	s := &e2eServer{url: fmt.Sprintf("http://127.0.0.1:%d", port), state: t.TempDir(),
		secret: "e2e secret " + rigUniqueName(t, "s"), log: &bytes.Buffer{}}
	cmd := exec.Command(bin, "server", "--listen", fmt.Sprintf("127.0.0.1:%d", port), "--state-dir", s.state)
	cmd.Env = append(os.Environ(), "GITHUB_WEBHOOK_SECRET="+s.secret, "WEBHOOK_HEALTH_SETTLE_SECS=2",
		"WEBHOOK_PULL_RETRY_SECS=1")
	cmd.Env = append(cmd.Env, extraEnv...)
	cmd.Stdout, cmd.Stderr = s.log, s.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("server exit: %v; log:\n%s", err, s.log)
			}
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			t.Errorf("server did not exit after SIGTERM; log:\n%s", s.log)
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get(s.url + "/health")
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("server did not answer /health: %v; log:\n%s", err, s.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
	db, err := sql.Open("sqlite", filepath.Join(s.state, "data", "pod-upgrade-trigger.db")+"?_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	s.db = db
	return s
}

// packagePayload is a GitHub "package" event for host/owner/name:tag, laid out as GitHub sends it.
func githubPackagePayload(host, owner, name, tag, digest string) []byte {
	p := map[string]any{
		"action": "published",
		"package": map[string]any{
			"id": 1, "name": name, "namespace": owner, "ecosystem": "CONTAINER", "package_type": "CONTAINER",
			"owner": map[string]any{"login": owner, "type": "User"},
			"package_version": map[string]any{
				"id": 2, "version": digest, "name": digest,
				"container_metadata": map[string]any{
					"tag":      map[string]any{"name": tag, "digest": digest},
					"labels":   map[string]any{},
					"manifest": map[string]any{},
				},
				"package_url": host + "/" + owner + "/" + name + ":" + tag,
			},
			"registry": map[string]any{"about_url": "https://docs.github.com", "name": "GitHub CONTAINER registry",
				"type": "CONTAINER", "url": "http://" + host + "/" + owner, "vendor": "GitHub Inc"},
		},
		"repository": map[string]any{"name": name, "owner": map[string]any{"login": owner}},
		"sender":     map[string]any{"login": owner},
	}
	b, _ := json.Marshal(p)
	return b
}

// deliver sends a signed GitHub delivery and returns the status and body.
func (s *e2eServer) deliver(t *testing.T, unit, event, delivery string, body []byte, secret string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("POST", s.url+"/github-package-update/"+unit, bytes.NewReader(body))
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write(body)
	req.Header.Set("X-Hub-Signature-256", "sha256="+hex.EncodeToString(mac.Sum(nil)))
	req.Header.Set("X-GitHub-Event", event)
	req.Header.Set("X-GitHub-Delivery", delivery)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b))
}

// taskRow is one github-task row.
type taskRow struct {
	id        int64
	requestID string
	step      string
	delivery  string
	meta      map[string]any
}

func (s *e2eServer) taskRows(t *testing.T, delivery string) []taskRow {
	t.Helper()
	rows, err := s.db.Query(`SELECT id, request_id, meta FROM event_log WHERE action = 'github-task' ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []taskRow
	for rows.Next() {
		var r taskRow
		var meta string
		if err := rows.Scan(&r.id, &r.requestID, &meta); err != nil {
			t.Fatal(err)
		}
		json.Unmarshal([]byte(meta), &r.meta)
		r.step, _ = r.meta["step"].(string)
		r.delivery, _ = r.meta["delivery"].(string)
		if delivery == "" || r.delivery == delivery {
			out = append(out, r)
		}
	}
	return out
}

func steps(rows []taskRow) []string {
	var s []string
	for _, r := range rows {
		s = append(s, r.step)
	}
	return s
}

var finalSteps = map[string]bool{"completed": true, "up-to-date": true, "rolled-back": true, "rollback-failed": true,
	"rollback-impossible": true, "pull-failed": true, "rate-limited": true, "lock-failed": true, "limit-failed": true, "invalid": true}

// waitTask waits until the task of a delivery wrote its final row and returns its rows.
func (s *e2eServer) waitTask(t *testing.T, r *rig, delivery string) []taskRow {
	t.Helper()
	var rows []taskRow
	r.WaitFor(t, 120*time.Second, func() bool {
		rows = s.taskRows(t, delivery)
		return len(rows) > 0 && finalSteps[rows[len(rows)-1].step]
	}, "the task of delivery "+delivery+" to finish")
	return rows
}

// e2eContainerUnit installs a unit running ref from a Quadlet-style .container file as its
// SourcePath, starts it and waits until its container runs wantID.
func e2eContainerUnit(t *testing.T, r *rig, ref, wantID string) (unit, ctr string) {
	t.Helper()
	base := rigUniqueName(t, "app")
	unit, ctr = base+".service", base
	quadlet := filepath.Join(t.TempDir(), base+".container")
	if err := os.WriteFile(quadlet, []byte("[Unit]\nDescription=e2e\n\n[Container]\nImage="+ref+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r.InstallUnit(t, unit, r.ContainerUnit(ctr, ref, "SourcePath="+quadlet))
	if _, err := r.Systemctl(t, "start", unit); err != nil {
		t.Fatal(err)
	}
	r.WaitFor(t, 60*time.Second, func() bool { return r.ContainerImage(t, ctr) == wantID }, unit+" to run "+wantID)
	return unit, ctr
}

// TestE2EGitHubDelivery drives the product's main job on the real rig: a signed delivery for a
// new image ends with the unit's container running it, with a row for every step.
func TestE2EGitHubDelivery(t *testing.T) {
	r := needRig(t)
	s := startE2EServer(t)
	name := rigUniqueName(t, "demo")
	ref, id1 := r.PushImage(t, "e2e/"+name, "latest", "v1")
	unit, ctr := e2eContainerUnit(t, r, ref, id1)
	_, id2 := r.PushImage(t, "e2e/"+name, "latest", "v2")
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
	r.WaitFor(t, 120*time.Second, func() bool { return r.ContainerImage(t, ctr) == id2 }, ctr+" to run v2")
	running := time.Since(start)
	rows := s.waitTask(t, r, "delivery-v2")
	got := strings.Join(steps(rows), ",")
	if got != "started,pulled,restarted,healthy,completed" {
		t.Fatalf("task steps %s; server log:\n%s", got, s.log)
	}
	t.Logf("delivery answered in %s; container on v2 after %s; task rows %s", answered, running, got)
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
			t.Fatalf("steps %v, want to end up-to-date", steps(rows))
		}
		if now := r.Show(t, unit, "MainPID")["MainPID"]; now != pid {
			t.Fatalf("MainPID changed %s → %s: the unit was restarted", pid, now)
		}
	})

	// Images are pushed with the parent test's t: a subtest's cleanup would remove an image that
	// the unit still runs.
	tt := t
	t.Run("three deliveries for one push restart once, one at a time", func(t *testing.T) {
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
		for _, d := range ids {
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
			t.Fatalf("steps %v, want to end rolled-back; server log:\n%s", steps(rows), s.log)
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
		cmd := exec.Command(bin, "run-task", "--force", "--state-dir", s.state, "--", unit, ref, "manual", "force-1", "/manual")
		cmd.Env = append(os.Environ(), "WEBHOOK_HEALTH_SETTLE_SECS=2")
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
			t.Fatalf("steps %v, want a restart", steps(rows))
		}
		if now := r.Show(t, unit, "MainPID")["MainPID"]; now == pid {
			t.Fatalf("MainPID unchanged (%s): not restarted", pid)
		}
	})
}
