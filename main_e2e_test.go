// main_e2e_test.go owns the harness the end-to-end tests of every concern share: the built
// server running as the rig's user (e2eServer, startE2EServer, e2eSocketRig, e2eTwoVersions),
// deliveries to it and its answer about one (delivery), and readers of the github-task rows a
// redeploy writes (taskRows, waitTask, steps, stepDetails), plus the container units those tests
// install (with extra .container lines such as a policy's Label=).
package main

import (
	"bytes"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// GitHub deliveries end to end, on the real rig.

// e2eSocketRig is the setup of a test that runs the built server under a socket unit on the
// rig: the binary, a state directory and a log path the rig's user can write, and a free port.
func e2eSocketRig(t *testing.T) (r *rig, bin, state, logPath string, port int) {
	t.Helper()
	r = needRig(t)
	bin = buildBinary(t)
	state = r.TempDir(t)
	logPath = filepath.Join(r.TempDir(t), "server.log")
	port, err := rigFreePort()
	if err != nil {
		t.Fatal(err)
	}
	return r, bin, state, logPath, port
}

// e2eServer is the built binary serving on a free loopback port, as an operator runs it.
type e2eServer struct {
	url    string
	state  string
	secret string
	log    *syncBuffer // written by the server process as it runs
	db     *sql.DB
}

// startE2EServer starts `webhook-auto-update server` with the given extra environment and stops
// it (SIGTERM, expecting exit 0) when the test ends.
// e2eHealthSettle is the health gate's settle window in the E2E servers. A broken image's
// container fails only once rootless podman has started it, which on a loaded machine (two runs,
// -race) took longer than 2 s: the gate then saw an active unit and passed it.
const e2eHealthSettle = "WEBHOOK_HEALTH_SETTLE_SECS=10"

func startE2EServer(t *testing.T, extraEnv ...string) *e2eServer {
	t.Helper()
	r := needRig(t)
	bin := buildBinary(t)
	port, err := rigFreePort()
	if err != nil {
		t.Fatal(err)
	}
	s := &e2eServer{url: fmt.Sprintf("http://127.0.0.1:%d", port), state: r.TempDir(t),
		secret: "e2e secret " + rigUniqueName(t, "s"), log: &syncBuffer{}}
	cmd := r.Command(bin, "server", "--listen", fmt.Sprintf("127.0.0.1:%d", port), "--state-dir", s.state)
	cmd.Env = append(cmd.Env, "GITHUB_WEBHOOK_SECRET="+s.secret, e2eHealthSettle,
		"WEBHOOK_PULL_RETRY_SECS=1")
	rigMu.Lock()
	if theRig != nil { // deliveries name the rig's registry
		cmd.Env = append(cmd.Env, "WEBHOOK_REGISTRY_HOSTS=ghcr.io,"+theRig.registry)
	}
	rigMu.Unlock()
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

// deliver sends a signed GitHub delivery and returns the status and body.
func (s *e2eServer) deliver(t *testing.T, unit, event, delivery string, body []byte, secret string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("POST", s.url+"/github-package-update/"+unit, bytes.NewReader(body))
	req.Header.Set("X-Hub-Signature-256", hubSignature(secret, body))
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

// delivery returns the answer of GET /api/deliveries/<id> with the manual token (its outcome,
// and its wait while a policy holds it); a status other than 200 fails the test.
func (s *e2eServer) delivery(t *testing.T, token, id string) map[string]any {
	t.Helper()
	req, _ := http.NewRequest("GET", s.url+"/api/deliveries/"+id, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var answer map[string]any
	if err := json.Unmarshal(b, &answer); resp.StatusCode != http.StatusOK || err != nil {
		t.Fatalf("GET /api/deliveries/%s: %s %v: %s", id, resp.Status, err, b)
	}
	return answer
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
	var out []taskRow
	// A poll of a log still being written: a meta that is not JSON reads as empty, and a read cut
	// short is looked at again.
	scanRows(t, s.db, false, `SELECT id, request_id, meta FROM event_log WHERE action = 'github-task' ORDER BY id`, nil,
		func(rows *sql.Rows) error {
			var r taskRow
			if err := scanMeta(rows, false, &r.meta, &r.id, &r.requestID); err != nil {
				return err
			}
			r.step, _ = r.meta["step"].(string)
			r.delivery, _ = r.meta["delivery"].(string)
			if delivery == "" || r.delivery == delivery {
				out = append(out, r)
			}
			return nil
		})
	return out
}

func steps(rows []taskRow) []string {
	var s []string
	for _, r := range rows {
		s = append(s, r.step)
	}
	return s
}

var finalSteps = map[string]bool{"completed": true, "digest-rejected": true, "up-to-date": true, "rolled-back": true, "rollback-failed": true,
	"rollback-impossible": true, "pull-failed": true, "image-mismatch": true, "image-unknown": true, "rate-limited": true, "lock-failed": true, "limit-failed": true, "invalid": true}

// waitTask waits until the task that covers a delivery wrote its final row and returns its rows;
// if it never does, the failure shows the rows so far, with their errors, and the server's log.
func (s *e2eServer) waitTask(t *testing.T, r *rig, delivery string) []taskRow {
	t.Helper()
	leader := s.leader(t, r, delivery)
	const limit = 3 * time.Minute
	for deadline := time.Now().Add(limit); ; time.Sleep(100 * time.Millisecond) {
		rows := s.taskRows(t, leader)
		if len(rows) > 0 && finalSteps[rows[len(rows)-1].step] {
			return rows
		}
		if time.Now().After(deadline) {
			t.Fatalf("the task of delivery %s (covering %s) did not finish within %s; its rows: %s; server log:\n%s",
				leader, delivery, limit, stepDetails(rows), s.log)
		}
	}
}

// stepDetails lists rows' steps with the error each carries (a pull's stderr, say), for failures.
func stepDetails(rows []taskRow) string {
	var b strings.Builder
	for i, r := range rows {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(r.step)
		if e, ok := r.meta["error"]; ok {
			fmt.Fprintf(&b, " (error: %v)", e)
		}
	}
	if b.Len() == 0 {
		return "none"
	}
	return b.String()
}

// leader waits until the claim of delivery is dispatched and returns the delivery whose task
// covers it (itself, unless it queued behind an earlier claim of the same unit and image, or
// when run-task was started by hand).
func (s *e2eServer) leader(t *testing.T, r *rig, delivery string) string {
	t.Helper()
	var leader string
	r.WaitFor(t, 120*time.Second, func() bool {
		var status string
		err := s.db.QueryRow(`SELECT status, coalesce(covered_by, '') FROM github_deliveries WHERE delivery_id = ?`, delivery).
			Scan(&status, &leader)
		if errors.Is(err, sql.ErrNoRows) && len(s.taskRows(t, delivery)) > 0 {
			leader = delivery // a run-task started by hand: no claim
			return true
		}
		return err == nil && (status == "dispatched" || status == "done")
	}, "the claim of "+delivery+" to be dispatched")
	return leader
}

// e2eTwoVersions is the start of a redeploy test on the rig: the server, a fresh image name
// (prefix-…) under e2e/ in the rig's registry, a unit whose container runs its v1, and its v2
// pushed under the same tag.
func e2eTwoVersions(t *testing.T, prefix string) (r *rig, s *e2eServer, name, ref, id1, id2, unit, ctr string) {
	t.Helper()
	r = needRig(t)
	s = startE2EServer(t)
	name = rigUniqueName(t, prefix)
	ref, id1 = r.PushImage(t, "e2e/"+name, "latest", "v1")
	unit, ctr = e2eContainerUnit(t, r, ref, id1)
	_, id2 = r.PushImage(t, "e2e/"+name, "latest", "v2")
	return r, s, name, ref, id1, id2, unit, ctr
}

// e2eContainerUnit installs a unit running ref from a Quadlet-style .container file as its
// SourcePath, starts it and waits until its container runs wantID.
func e2eContainerUnit(t *testing.T, r *rig, ref, wantID string) (unit, ctr string) {
	t.Helper()
	return e2eNamedContainerUnit(t, r, rigUniqueName(t, "app"), ref, wantID)
}

// e2eNamedContainerUnit is e2eContainerUnit for the unit base.service, whose container is base;
// containerLines go into the .container file's [Container] section (Label= policies, say).
func e2eNamedContainerUnit(t *testing.T, r *rig, base, ref, wantID string, containerLines ...string) (unit, ctr string) {
	t.Helper()
	unit, ctr = base+".service", base
	quadlet := filepath.Join(r.TempDir(t), base+".container")
	text := "[Unit]\nDescription=e2e\n\n[Container]\nImage=" + ref + "\n" + strings.Join(append(containerLines, ""), "\n")
	if err := os.WriteFile(quadlet, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	r.InstallUnit(t, unit, r.ContainerUnit(ctr, ref, "SourcePath="+quadlet))
	if _, err := r.Systemctl(t, "start", unit); err != nil {
		t.Fatal(err)
	}
	r.WaitFor(t, 60*time.Second, func() bool { return r.ContainerImage(t, ctr) == wantID }, unit+" to run "+wantID)
	return unit, ctr
}

// e2eApp is a unit whose container serves its image's files with busybox httpd on a loopback
// port of the host's network, so a test sees which version serves (GET /VERSION) and when.
type e2eApp struct {
	unit, ctr, ref, repo string
	port                 int
}

// The images' /app.sh and /health.sh: appServe serves, appCrash prints a line and exits 1,
// appHealthy and appUnhealthy are the healthcheck's answers.
const (
	appServe     = "exec /bin/busybox httpd -f -p 127.0.0.1:$APP_PORT -h /\n"
	appCrash     = "echo \"fatal: cannot read /etc/app.conf\"\nexit 1\n"
	appHealthy   = "echo ok\n"
	appUnhealthy = "echo \"health: the database is unreachable\"\nexit 1\n"
)

// e2ePushApp pushes an app image (its /VERSION, /app.sh and /health.sh) as repo:latest and
// returns its reference, image ID and manifest digest.
func e2ePushApp(t *testing.T, r *rig, repo, version, app, health string) (ref, id, digest string) {
	t.Helper()
	ref, id = r.pushImage(t, repo, "latest", version, true, map[string]string{"app.sh": app, "health.sh": health})
	r.TagLocal(t, id, r.registry+"/"+repo+":keep-"+version) // not dangling when the tag moves on, so no prune removes it
	return ref, id, e2eRepush(t, r, id, ref)
}

// e2eRepush points ref at image id, pushes it and returns the digest the registry gave it.
func e2eRepush(t *testing.T, r *rig, id, ref string) string {
	t.Helper()
	r.TagLocal(t, id, ref)
	file := filepath.Join(r.TempDir(t), "digest")
	r.mustPodman(t, "push", "--quiet", "--digestfile", file, ref)
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// e2eAppUnit installs and starts the app unit for ref, with a podman healthcheck every second
// when health is set, and waits until it serves version. Its container is kept after it exits
// (no --rm), so its logs and exit code can be read.
func e2eAppUnit(t *testing.T, r *rig, ref, version string, health bool) e2eApp {
	t.Helper()
	port, err := rigFreePort()
	if err != nil {
		t.Fatal(err)
	}
	base := rigUniqueName(t, "web")
	a := e2eApp{unit: base + ".service", ctr: base, ref: ref, port: port}
	quadlet := filepath.Join(r.TempDir(t), base+".container")
	if err := os.WriteFile(quadlet, []byte("[Container]\nImage="+ref+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	check := ""
	if health {
		check = `--health-cmd '["/bin/busybox","sh","/health.sh"]' --health-interval 1s `
	}
	r.InstallUnit(t, a.unit, fmt.Sprintf(`[Unit]
Description=e2e app %[2]s
SourcePath=%[5]s

[Service]
Environment=PODMAN_SYSTEMD_UNIT=%%n
SuccessExitStatus=137 143
ExecStartPre=-%[1]s rm --force --ignore --time 0 %[2]s
ExecStart=%[1]s run --name %[2]s --network host -e APP_PORT=%[3]d --label io.containers.autoupdate=registry %[6]s%[4]s /bin/busybox sh /app.sh
ExecStop=%[1]s stop --ignore --time 0 %[2]s
`, r.podman, a.ctr, port, ref, quadlet, check))
	t.Cleanup(func() { r.Podman(t, "rm", "--force", "--ignore", "--time", "0", a.ctr) })
	if _, err := r.Systemctl(t, "start", a.unit); err != nil {
		t.Fatal(err)
	}
	r.WaitFor(t, 60*time.Second, func() bool { return a.serves() == version }, a.unit+" to serve "+version)
	return a
}

// serves is the version the app answers with, "" when it does not answer.
func (a e2eApp) serves() string {
	c := http.Client{Timeout: time.Second}
	resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/VERSION", a.port))
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// claimedMS is when the server claimed a delivery (unix ms): the push, as far as it knows.
func (s *e2eServer) claimedMS(t *testing.T, delivery string) int64 {
	t.Helper()
	var ms int64
	if err := s.db.QueryRow(`SELECT claimed_at FROM github_deliveries WHERE delivery_id = ?`, delivery).Scan(&ms); err != nil {
		t.Fatalf("claim of %s: %v", delivery, err)
	}
	return ms
}

// rowMS is a task row's time (unix ms), from its at_ms.
func rowMS(t *testing.T, rows []taskRow, step string) int64 {
	t.Helper()
	for _, r := range rows {
		if r.step == step {
			if ms, ok := r.meta["at_ms"].(float64); ok {
				return int64(ms)
			}
			t.Fatalf("row %s has no at_ms: %v", step, r.meta)
		}
	}
	t.Fatalf("no %s row in %s", step, stepDetails(rows))
	return 0
}

// deliverAndWait delivers a signed GitHub package event and returns its task's rows once it ended.
func (s *e2eServer) deliverAndWait(t *testing.T, r *rig, unit, delivery string, body []byte) []taskRow {
	t.Helper()
	if code, text := s.deliver(t, unit, "package", delivery, body, s.secret); code != http.StatusAccepted {
		t.Fatalf("%s: %d %q", delivery, code, text)
	}
	return s.waitTask(t, r, delivery)
}
