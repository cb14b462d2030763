// podman_runtask_test.go tests the redeploy podman.go runs (run-task): the whole flow against
// fake podman and systemctl (its rows, per-image limit, locks and state file keys), the
// systemd-run argv that dispatches it, the task unit's name, pull faults seen through a whole
// run-task, and, on the rig, the rollback to the image the container ran. The fakes and their
// rules are main_test.go's.
package main

import (
	"bytes"
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// the run-task flow

// githubTaskRow is one event_log row of action github-task.
type githubTaskRow struct {
	status     int
	method     string
	path       string
	durationMS int64
	meta       map[string]any
}

func (r githubTaskRow) step() string { s, _ := r.meta["step"].(string); return s }

// githubTaskRows reads the github-task rows of one delivery from the state directory's database.
func githubTaskRows(t *testing.T, stateDir, deliveryID string) []githubTaskRow {
	t.Helper()
	path := filepath.Join(stateDir, "data", "pod-upgrade-trigger.db")
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("event log: %v", err)
	}
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var out []githubTaskRow
	scanRows(t, db, true, `SELECT status, method, coalesce(path, ''), duration_ms, meta FROM event_log
		WHERE action = 'github-task' ORDER BY id`, nil, func(rows *sql.Rows) error {
		var r githubTaskRow
		if err := scanMeta(rows, true, &r.meta, &r.status, &r.method, &r.path, &r.durationMS); err != nil {
			return err
		}
		if r.meta["delivery"] == deliveryID {
			out = append(out, r)
		}
		return nil
	})
	return out
}

func stepsOf(rows []githubTaskRow) []string {
	var out []string
	for _, r := range rows {
		out = append(out, r.step())
	}
	return out
}

// runTaskInProcess runs "webhook-auto-update run-task" through run with env as its environment.
func runTaskInProcess(t *testing.T, env map[string]string, args ...string) (code int, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	done := make(chan int, 1)
	go func() { done <- run(args, func(k string) string { return env[k] }, &out, &errb) }()
	select {
	case code = <-done:
	case <-time.After(2 * time.Minute):
		t.Fatalf("run-task did not return")
	}
	return code, errb.String()
}

const (
	flowImage = "ghcr.io/octo-org/hello-world:v1.2.3"
	flowUnit  = "hello-world.service"
	// anyImage lets a unit without Image= take any image (task.checkImage): the run-task tests
	// that are about something else (locks, limits, pull faults) set it rather than a Quadlet
	// file for each unit and tag they use.
	anyImage = "WEBHOOK_ALLOW_ANY_IMAGE"
)

// quadletHome returns a HOME whose ~/.config/containers/systemd/ holds a Quadlet file for unit
// with Image=image, as the task finds it.
func quadletHome(t *testing.T, unit, image string) string {
	t.Helper()
	home := t.TempDir()
	dir := filepath.Join(home, ".config", "containers", "systemd")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	body := "[Container]\nImage=" + image + "\n"
	if err := os.WriteFile(filepath.Join(dir, strings.TrimSuffix(unit, ".service")+".container"), []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return home
}

func TestRunTaskFlow(t *testing.T) {
	// Each case is one run-task. files script the fakes: image.id is the local image before the
	// pull, image.next what the pull brings.
	newImage := map[string]string{"image.id": oldImageID, "image.next": newImageID}
	with := func(base map[string]string, kv ...string) map[string]string {
		m := map[string]string{}
		for k, v := range base {
			m[k] = v
		}
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	restartArgv := []string{"systemctl", "--user", "restart", "--", flowUnit}
	tagBack := []string{"podman", "tag", "--", oldImageID, flowImage}

	for _, tc := range []struct {
		name  string
		files map[string]string
		flags []string
		env   map[string]string
		unit  string // default flowUnit
		image string // default flowImage
		// The unit's Quadlet file names Image=quadlet (default flowImage), unless noQuadlet.
		quadlet   string
		noQuadlet bool
		steps     []string
		code      int
		check     func(t *testing.T, h *fakeHost, rows []githubTaskRow)
	}{
		{name: "new image, unit stays active", files: newImage,
			steps: []string{"started", "pulled", "restarted", "healthy", "completed"}, code: 0,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "systemctl-restart", restartArgv)
				if n := len(h.callsOf("podman-image-prune")); n != 1 {
					t.Errorf("%d prunes after a healthy redeploy, want 1", n)
				}
				if m := rows[1].meta; m["previous_image_id"] != oldImageID || m["image_id"] != newImageID {
					t.Errorf("pulled row: previous_image_id %v, image_id %v; want %s, %s", m["previous_image_id"], m["image_id"], oldImageID, newImageID)
				}
				if rows[len(rows)-1].meta["image_id"] != newImageID {
					t.Errorf("completed row image_id = %v, want %s", rows[len(rows)-1].meta["image_id"], newImageID)
				}
			}},
		{name: "same image, unit active: up to date", files: map[string]string{"image.id": oldImageID},
			steps: []string{"started", "pulled", "up-to-date"}, code: 0,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "systemctl-restart")
				wantCalls(t, h, "podman-image-prune")
			}},
		{name: "same image forced", files: map[string]string{"image.id": oldImageID}, flags: []string{"--force"},
			steps: []string{"started", "pulled", "restarted", "healthy", "completed"}, code: 0,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "systemctl-restart", restartArgv)
				if rows[0].meta["force"] != true || rows[3].meta["reason"] != "forced" {
					t.Errorf("force not recorded: started %v, healthy %v", rows[0].meta, rows[3].meta)
				}
			}},
		{name: "same image, unit inactive", files: map[string]string{"image.id": oldImageID, "unit.state": failedUnit,
			"restart.after.1": activeUnit},
			steps: []string{"started", "pulled", "restarted", "healthy", "completed"}, code: 0},
		{name: "new image fails the gate: rolled back", files: with(newImage, "restart.after.1", failedUnit, "restart.after.2", activeUnit),
			steps: []string{"started", "pulled", "restarted", "health-failed", "rollback-restarted", "rolled-back"}, code: 1,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "podman-tag", tagBack)
				wantCalls(t, h, "systemctl-restart", restartArgv, restartArgv)
				wantCalls(t, h, "podman-image-prune") // the failed image is kept for inspection
				if got := h.read("image.id"); got != oldImageID {
					t.Errorf("after the rollback the reference names %q, want the previous image %q", got, oldImageID)
				}
				last := rows[len(rows)-1].meta
				if last["image_id"] != oldImageID || last["failed_image_id"] != newImageID {
					t.Errorf("rolled-back row %v: want image_id %s, failed_image_id %s", last, oldImageID, newImageID)
				}
				if !strings.Contains(fmt.Sprint(rows[3].meta["error"]), "failed") {
					t.Errorf("health-failed row error = %v, want the unit's state", rows[3].meta["error"])
				}
			}},
		{name: "no previous image: rollback impossible", files: map[string]string{"image.next": newImageID, "restart.after.1": failedUnit},
			steps: []string{"started", "pulled", "restarted", "health-failed", "rollback-impossible"}, code: 1,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "podman-tag")
				wantCalls(t, h, "systemctl-restart", restartArgv)
				if e := fmt.Sprint(rows[len(rows)-1].meta["rollback_error"]); !strings.Contains(e, "no previous image") {
					t.Errorf("rollback_error = %q", e)
				}
			}},
		{name: "previous image pruned: rollback impossible", files: with(newImage, "restart.after.1", failedUnit, "podman-image-exists.exit", "1"),
			steps: []string{"started", "pulled", "restarted", "health-failed", "rollback-impossible"}, code: 1,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "podman-tag")
				wantCalls(t, h, "podman-image-exists", []string{"podman", "image", "exists", "--", oldImageID})
				if e := fmt.Sprint(rows[len(rows)-1].meta["rollback_error"]); !strings.Contains(e, "no longer exists") {
					t.Errorf("rollback_error = %q", e)
				}
			}},
		{name: "previous image fails too: rollback failed", files: with(newImage, "restart.after.1", failedUnit, "restart.after.2", failedUnit),
			steps: []string{"started", "pulled", "restarted", "health-failed", "rollback-restarted", "rollback-health-failed", "rollback-failed"}, code: 1,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "podman-tag", tagBack)
			}},
		{name: "podman healthcheck fails: rolled back, the row explains", files: with(newImage,
			"podman-ps.stdout", psJSON("f00dcafe", oldImageID, 100, "running", "Up 5 minutes (healthy)"),
			"ps.after.1", psJSON("beef", newImageID, 200, "running", "Up 1 second (unhealthy)"),
			"ps.after.2", psJSON("0ddba11", oldImageID, 300, "running", "Up 1 second (starting)"),
			"podman-container-inspect.stdout", `0 [{"ExitCode":1,"Output":"health: db down, password=hunter2"}]`,
			"podman-logs.stdout", "starting\nlistening on :8080\n"),
			steps: []string{"started", "pulled", "restarted", "health-failed", "rollback-restarted", "rolled-back"}, code: 1,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				m := rows[3].meta
				if e := fmt.Sprint(m["error"]); !strings.Contains(e, "podman healthcheck") {
					t.Errorf("health-failed error = %q, want the healthcheck", e)
				}
				if m["healthcheck_output"] != "health: db down, password=REDACTED" || m["log_tail"] != "starting\nlistening on :8080" || m["container_exit_code"] != float64(0) {
					t.Errorf("health-failed row %v: want the healthcheck's output (redacted) and the log tail", m)
				}
				wantCalls(t, h, "podman-logs", []string{"podman", "logs", "--tail", "20", "--", "beef"})
				// The deploy's gate ran the new container's healthcheck; the rollback's, the one it started.
				calls := h.callsOf("podman-healthcheck")
				if len(calls) < 2 || calls[0][4] != "beef" || slices.ContainsFunc(calls[1:], func(c []string) bool { return c[4] != "0ddba11" }) {
					t.Errorf("healthcheck calls:\n%s", fakeCallLines(calls))
				}
			}},
		{name: "restart fails", files: with(newImage, "systemctl-restart.exit", "1", "systemctl-restart.stderr", "Job for hello-world.service failed.\n"),
			steps: []string{"started", "pulled", "restart-failed", "rollback-restart-failed", "rollback-failed"}, code: 1,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				if e := fmt.Sprint(rows[2].meta["stderr"]); !strings.Contains(e, "Job for hello-world.service failed") {
					t.Errorf("restart-failed stderr = %q", e)
				}
			}},
		{name: "prune failure only warns", files: with(newImage, "podman-image-prune.exit", "125"),
			steps: []string{"started", "pulled", "restarted", "healthy", "prune-failed", "completed"}, code: 0},
		{name: "pull fails for good", env: map[string]string{"WEBHOOK_PULL_ATTEMPTS": "2"},
			files: with(newImage, "podman-pull.exit", "125", "podman-pull.stderr", "Error: reading manifest v1.2.3: manifest unknown\n"),
			steps: []string{"started", "pull-failed"}, code: 1,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				pull := []string{"podman", "pull", "--quiet", "--", "docker://" + flowImage}
				wantCalls(t, h, "podman-pull", pull, pull)
				wantCalls(t, h, "systemctl-restart")
				m := rows[1].meta
				if m["attempts"] != float64(2) || m["exit_code"] != float64(125) || !strings.Contains(fmt.Sprint(m["stderr"]), "manifest unknown") {
					t.Errorf("pull-failed meta = %v", m)
				}
			}},
		{name: "digest is recorded", files: newImage, flags: []string{"--digest", digestV1},
			steps: []string{"started", "pulled", "restarted", "healthy", "completed"}, code: 0,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				if rows[0].meta["digest"] != digestV1 || rows[3].meta["delivery_digest"] != digestV1 {
					t.Errorf("digest not recorded: started %v, healthy %v", rows[0].meta, rows[3].meta)
				}
			}},
		{name: "no Image=, no container: nothing pulled or restarted", noQuadlet: true, files: newImage,
			steps: []string{"started", "image-unknown"}, code: 0,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "podman-pull")
				wantCalls(t, h, "systemctl-restart")
				if r := fmt.Sprint(rows[1].meta["reason"]); !strings.Contains(r, "WEBHOOK_ALLOW_ANY_IMAGE") || rows[1].status != 409 {
					t.Errorf("image-unknown row: status %d, reason %q; want 409 and how to fix it", rows[1].status, r)
				}
			}},
		{name: "no Image=, the container runs another package: nothing pulled or restarted", noQuadlet: true,
			files: with(newImage, "podman-ps.stdout", psJSON("c0ffee", oldImageID, 100, "running", "Up", "ghcr.io/octo-org/plain:latest")),
			steps: []string{"started", "image-mismatch"}, code: 0,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "podman-pull")
				wantCalls(t, h, "systemctl-restart")
				if r := fmt.Sprint(rows[1].meta["reason"]); !strings.Contains(r, "repository mismatch: the unit runs ghcr.io/octo-org/plain:latest") {
					t.Errorf("image-mismatch reason %q", r)
				}
				if n := len(h.callsOf("podman-pull")) + len(h.callsOf("podman-image-inspect")); n != 0 {
					t.Errorf("%d podman image calls before the refusal, want none", n)
				}
			}},
		{name: "no Image=, the container runs the pushed image: redeployed", noQuadlet: true,
			files: with(newImage, "podman-ps.stdout", psJSON("c0ffee", oldImageID, 100, "running", "Up", flowImage)),
			steps: []string{"started", "pulled", "restarted", "healthy", "completed"}, code: 0},
		{name: "no Image=, no container, WEBHOOK_ALLOW_ANY_IMAGE: redeployed as before", noQuadlet: true, files: newImage,
			env: map[string]string{anyImage: "true"}, steps: []string{"started", "pulled", "restarted", "healthy", "completed"}, code: 0},
		{name: "Image= names another tag (a manual redeploy): nothing pulled", quadlet: "ghcr.io/octo-org/hello-world:v9", files: newImage,
			steps: []string{"started", "image-mismatch"}, code: 0,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "podman-pull")
				if r := fmt.Sprint(rows[1].meta["reason"]); !strings.HasPrefix(r, "tag mismatch") || rows[1].meta["unit_image"] != "ghcr.io/octo-org/hello-world:v9" {
					t.Errorf("image-mismatch meta %v", rows[1].meta)
				}
			}},
		{name: "rollback to the image the container ran, though the tag had moved",
			// Another unit's redeploy moved the local tag to otherImageID; the container still ran
			// oldImageID, and that is what the unit must get back.
			files: map[string]string{"image.id": otherImageID, "image.next": newImageID,
				"podman-ps.stdout": psJSON("c0ffee", oldImageID, 100, "running", "Up", flowImage),
				"restart.after.1":  failedUnit, "restart.after.2": activeUnit},
			steps: []string{"started", "pulled", "restarted", "health-failed", "rollback-restarted", "rolled-back"}, code: 1,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "podman-tag", tagBack)
				last := rows[len(rows)-1].meta
				if last["image_id"] != oldImageID || last["rollback_source"] != "container" {
					t.Errorf("rolled-back row %v: want image_id %s (the container's), not the tag's previous %s", last, oldImageID, otherImageID)
				}
				// What the tag named is not looked up when a container runs: the rollback needs only the container's.
				if m := rows[1].meta; m["previous_image_id"] != "" || m["running_image_id"] != oldImageID {
					t.Errorf("pulled row %v: want no previous_image_id and running_image_id %s", m, oldImageID)
				}
				wantCalls(t, h, "podman-image-inspect")
			}},
		{name: "unit that reads as a flag", unit: "-x.service", files: newImage, steps: []string{"invalid"}, code: 2},
		{name: "unit with a glob", unit: "hello*.service", files: newImage, steps: []string{"invalid"}, code: 2},
		{name: "image with a transport", image: "docker://ghcr.io/octo-org/hello-world:v1.2.3", files: newImage, steps: []string{"invalid"}, code: 2},
		{name: "image that reads as a flag", image: "--authfile=/tmp/x", files: newImage, steps: []string{"invalid"}, code: 2},
		{name: "image without a registry", image: "nginx:latest", files: newImage, steps: []string{"invalid"}, code: 2},
		{name: "invalid digest", flags: []string{"--digest", "sha256:xyz"}, files: newImage, steps: []string{"invalid"}, code: 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newFakeHostFiles(t, tc.files)
			state := t.TempDir()
			unit, image := cmp.Or(tc.unit, flowUnit), cmp.Or(tc.image, flowImage)
			home := t.TempDir()
			if !tc.noQuadlet {
				home = quadletHome(t, unit, cmp.Or(tc.quadlet, flowImage))
			}
			env := map[string]string{"WEBHOOK_HEALTH_SETTLE_SECS": "1", "WEBHOOK_PULL_RETRY_SECS": "1", "WEBHOOK_COMMAND_TIMEOUT_SECS": "60", "HOME": home}
			for k, v := range tc.env {
				env[k] = v
			}
			args := append(append([]string{"run-task", "--state-dir", state}, tc.flags...),
				"--", unit, image, "package", "d-1", "/github-package-update/hello-world")
			code, stderr := runTaskInProcess(t, env, args...)
			rows := githubTaskRows(t, state, "d-1")
			if got := stepsOf(rows); !slices.Equal(got, tc.steps) || code != tc.code {
				t.Fatalf("run-task exit %d, steps %q; want exit %d, steps %q\nstderr:\n%s\nfake calls:\n%s",
					code, got, tc.code, tc.steps, stderr, fakeCallLines(h.calls()))
			}
			for _, r := range rows {
				if r.method != "TASK" || r.path != "/github-package-update/hello-world" || r.meta["unit"] != unit || r.meta["image"] != image {
					t.Errorf("row %s: method %q path %q unit %v image %v", r.step(), r.method, r.path, r.meta["unit"], r.meta["image"])
				}
			}
			if tc.code == 2 {
				if calls := h.calls(); len(calls) != 0 || rows[0].status != 400 {
					t.Errorf("invalid input: status %d, commands run:\n%s", rows[0].status, fakeCallLines(calls))
				}
			}
			if tc.check != nil {
				tc.check(t, h, rows)
			}
		})
	}
}

// TestRunTaskRowDurations checks duration_ms of task rows: the time since the task started, so
// never negative and, for these runs of a few seconds, far below an hour. The bound is a sanity
// check, not a measurement.
func TestRunTaskRowDurations(t *testing.T) {
	for _, tc := range []struct {
		name, unit, image string
		steps             []string
	}{
		{"redeploy", flowUnit, flowImage, []string{"started", "pulled", "up-to-date"}},
		{"invalid unit", "-x.service", flowImage, []string{"invalid"}},
		{"invalid image", flowUnit, "docker://" + flowImage, []string{"invalid"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newFakeHost(t)
			h.set("image.id", oldImageID)
			state := t.TempDir()
			code, stderr := runTaskInProcess(t, map[string]string{"WEBHOOK_HEALTH_SETTLE_SECS": "1", anyImage: "true"}, "run-task", "--state-dir", state, "--",
				tc.unit, tc.image, "package", "d-1", "/github-package-update/hello-world")
			rows := githubTaskRows(t, state, "d-1")
			if got := stepsOf(rows); !slices.Equal(got, tc.steps) {
				t.Fatalf("exit %d, steps %q, want %q\nstderr:\n%s", code, got, tc.steps, stderr)
			}
			for _, r := range rows {
				if r.durationMS < 0 || r.durationMS > int64(time.Hour/time.Millisecond) {
					t.Errorf("row %s: duration_ms = %d, not the time since the task started", r.step(), r.durationMS)
				}
			}
		})
	}
}

func TestRunTaskPerImageLimit(t *testing.T) {
	h := newFakeHost(t)
	h.set("image.id", oldImageID)
	state := t.TempDir()
	env := map[string]string{"WEBHOOK_IMAGE_LIMIT_COUNT": "1", "WEBHOOK_HEALTH_SETTLE_SECS": "1", anyImage: "true"}
	for i, want := range []struct {
		steps []string
		pulls int
	}{
		{[]string{"started", "pulled", "up-to-date"}, 1},
		{[]string{"started", "rate-limited"}, 1},
	} {
		delivery := fmt.Sprintf("d-%d", i+1)
		code, stderr := runTaskInProcess(t, env, "run-task", "--state-dir", state, "--",
			flowUnit, flowImage, "package", delivery, "/github-package-update/hello-world")
		rows := githubTaskRows(t, state, delivery)
		if got := stepsOf(rows); code != 0 || !slices.Equal(got, want.steps) {
			t.Fatalf("run %d: exit %d, steps %q; want exit 0, steps %q\nstderr:\n%s", i+1, code, got, want.steps, stderr)
		}
		if n := len(h.callsOf("podman-pull")); n != want.pulls {
			t.Errorf("run %d: %d pulls so far, want %d", i+1, n, want.pulls)
		}
		if i == 1 {
			if ra, _ := rows[1].meta["retry_after_secs"].(float64); ra <= 0 || rows[1].status != 429 {
				t.Errorf("rate-limited row: status %d, meta %v", rows[1].status, rows[1].meta)
			}
		}
	}
	if data, err := os.ReadFile(imageLimitPath(state, flowImage)); err != nil || len(bytes.Fields(data)) != 1 {
		t.Errorf("per-image log %s = %q, %v; want the one allowed redeploy", imageLimitPath(state, flowImage), data, err)
	}
}

// TestRunTaskLocks: a redeploy holds its image's lock and its unit's lock. While another
// process holds either, a task for that image (another unit) or that unit (another image) waits,
// then stops lock-failed having run nothing and charged no limit; a lock on another image and
// unit does not hold it up; once the lock is free the task goes through.
func TestRunTaskLocks(t *testing.T) {
	const otherImage, otherUnit = "ghcr.io/octo-org/hello-world:v2", "other.service"
	for _, c := range []struct {
		name        string
		held        string // the lock another process holds
		unit, image string // the task's
		blocked     bool
	}{
		{"image lock, another unit", imageLockPath("STATE", flowImage), otherUnit, flowImage, true},
		{"unit lock, another tag", unitLockPath("STATE", flowUnit), flowUnit, otherImage, true},
		{"another image and unit", imageLockPath("STATE", otherImage), flowUnit, flowImage, false},
		{"another unit's lock", unitLockPath("STATE", otherUnit), flowUnit, flowImage, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := newFakeHost(t)
			h.set("image.id", oldImageID)
			h.set("image.next", newImageID)
			state := t.TempDir()
			held, err := lockFile(context.Background(), strings.Replace(c.held, "STATE", state, 1), time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer held.Unlock()
			env := map[string]string{"WEBHOOK_TASK_LOCK_TIMEOUT_SECS": "1", "WEBHOOK_HEALTH_SETTLE_SECS": "1", anyImage: "true"}
			run := func(delivery string) (int, []string, string) {
				code, stderr := runTaskInProcess(t, env, "run-task", "--state-dir", state, "--",
					c.unit, c.image, "package", delivery, "/github-package-update/hello-world")
				return code, stepsOf(githubTaskRows(t, state, delivery)), stderr
			}
			done := []string{"started", "pulled", "restarted", "healthy", "completed"}
			code, steps, stderr := run("d-1")
			if !c.blocked {
				if code != 0 || !slices.Equal(steps, done) {
					t.Fatalf("exit %d, steps %q; want exit 0, %q\nstderr:\n%s", code, steps, done, stderr)
				}
				return
			}
			if code != 1 || !slices.Equal(steps, []string{"started", "lock-failed"}) {
				t.Fatalf("exit %d, steps %q; want exit 1, [started lock-failed]\nstderr:\n%s", code, steps, stderr)
			}
			if calls := h.calls(); len(calls) != 0 {
				t.Errorf("commands ran without the lock:\n%s", fakeCallLines(calls))
			}
			if _, err := os.Stat(imageLimitPath(state, c.image)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the per-image limit was charged without the lock: %v", err)
			}
			if !strings.Contains(stderr, filepath.Base(strings.Replace(c.held, "STATE", state, 1))) {
				t.Errorf("the log does not name the lock that was held:\n%s", stderr)
			}

			// Once the lock is free the task goes through.
			held.Unlock()
			if code, steps, stderr := run("d-2"); code != 0 || !slices.Equal(steps, done) {
				t.Errorf("after release: exit %d, steps %q\nstderr:\n%s", code, steps, stderr)
			}
		})
	}
}

// TestStateFileKeys: image keys keep the seed layout, and a key that would not fit in a file
// name (a valid reference may be 400 bytes, a unit name 255) ends in a hash instead, so that two
// such references still get two files and a lock can be taken on them.
func TestStateFileKeys(t *testing.T) {
	if got := imageLockPath("/s", flowImage); got != "/s/github-image-locks/ghcr.io_octo-org_hello-world_v1.2.3.lock" {
		t.Errorf("image lock path %s, want the seed layout", got)
	}
	if got := unitLockPath("/s", "web@1.service"); got != "/s/github-image-locks/unit@web@1.service.lock" {
		t.Errorf("unit lock path %s", got)
	}
	long := "ghcr.io/" + strings.Repeat("a", 200) + "/" + strings.Repeat("b", 40) + ":" + strings.Repeat("t", 128)
	if _, err := parseImageRef(long); err != nil {
		t.Fatalf("the long reference is not valid, so it tests nothing: %v", err)
	}
	longUnit := strings.Repeat("u", 247) + ".service"
	if _, err := resolveUnit(longUnit); err != nil {
		t.Fatalf("the long unit name is not valid, so it tests nothing: %v", err)
	}
	state := t.TempDir()
	paths := []string{imageLockPath(state, long), imageLockPath(state, long[:len(long)-1]+"u"),
		imageLimitPath(state, long), unitLockPath(state, longUnit), unitLockPath(state, "v"+longUnit[1:])}
	seen := map[string]bool{}
	for _, p := range paths {
		if n := len(filepath.Base(p)); n > 255 {
			t.Errorf("%s: file name of %d bytes", p, n)
		}
		if seen[p] {
			t.Errorf("two keys share %s", p)
		}
		seen[p] = true
	}
	for _, p := range []string{paths[0], paths[3]} {
		lk, err := lockFile(context.Background(), p, time.Second)
		if err != nil {
			t.Errorf("lock on a long key: %v", err)
			continue
		}
		lk.Unlock()
	}
}

// dispatch

func TestDispatchArgv(t *testing.T) {
	cfg := &config{stateDir: "/var/lib/webhook", dbPath: "/var/lib/webhook/data/pod-upgrade-trigger.db"}
	environ := []string{
		"WEBHOOK_STATE_DIR=/var/lib/webhook",
		"WEBHOOK_TOKEN=tok-s3cret",
		"WEBHOOK_MANUAL_TOKEN=manual-s3cret",
		"WEBHOOK_METRICS_TOKEN=metrics-s3cret",
		"GITHUB_WEBHOOK_SECRET=gh-s3cret",
		"WEBHOOK_REGISTRY_TOKEN_DISTRIBUTION=dist-s3cret",
		"WEBHOOK_REGISTRY_TOKEN_GITEA=gitea-s3cret",
		"WEBHOOK_HEALTH_SETTLE_SECS=20",
		"CONTAINERS_CONF=/etc/containers/x.conf",
		"PATH=/usr/local/bin:/usr/bin",
		"HOME=/root",
		"XDG_RUNTIME_DIR=/run/user/0",
		"NOTIFY_SOCKET=/run/systemd/notify",
		"LISTEN_FDS=1",
		"AWS_SECRET_ACCESS_KEY=aws-s3cret",
		"UNRELATED=1",
	}
	wantEnv := []string{"WEBHOOK_STATE_DIR", "WEBHOOK_HEALTH_SETTLE_SECS", "CONTAINERS_CONF", "PATH", "HOME", "XDG_RUNTIME_DIR"}
	const exe = "/usr/local/bin/webhook-auto-update"
	base := taskSpec{unit: flowUnit, image: flowImage, event: "package",
		delivery: "72d3162e-cc78-11e3-81ab-4c9367dc0958", path: "/github-package-update/hello-world"}
	for _, tc := range []struct {
		name     string
		edit     func(s *taskSpec)
		unitName string
		force    bool
		digest   bool
	}{
		{name: "plain", unitName: "webhook-task-72d3162e-cc78-11e3-81ab-4c9367dc0958"},
		{name: "forced", edit: func(s *taskSpec) { s.force = true }, force: true, unitName: "webhook-task-72d3162e-cc78-11e3-81ab-4c9367dc0958"},
		{name: "with digest", edit: func(s *taskSpec) { s.digest = digestV1 }, digest: true, unitName: "webhook-task-72d3162e-cc78-11e3-81ab-4c9367dc0958"},
		{name: "forced with digest", edit: func(s *taskSpec) { s.force, s.digest = true, digestV1 }, force: true, digest: true,
			unitName: "webhook-task-72d3162e-cc78-11e3-81ab-4c9367dc0958"},
		{name: "manual delivery id", edit: func(s *taskSpec) {
			s.delivery, s.event, s.path = "manual/ops 1", "manual", "/api/manual/services/hello-world"
		},
			unitName: "webhook-task-manual_ops_1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			spec := base
			if tc.edit != nil {
				tc.edit(&spec)
			}
			argv := dispatchArgv(exe, cfg, environ, spec)
			joined := strings.Join(argv, " ")
			if !slices.Equal(argv[:5], []string{"systemd-run", "--user", "--collect", "--quiet", "--unit=" + tc.unitName}) {
				t.Errorf("argv starts %q", argv[:min(5, len(argv))])
			}
			first, last := slices.Index(argv, "--"), lastIndex(argv, "--")
			if first < 0 || first == last {
				t.Fatalf("argv %q: want a -- before the program and another before the positional arguments", argv)
			}
			if !slices.Equal(argv[first+1:first+3], []string{exe, "run-task"}) {
				t.Errorf("after the first --: %q, want %s run-task", argv[first+1:first+3], exe)
			}
			if got, want := argv[last+1:], []string{spec.unit, spec.image, spec.event, spec.delivery, spec.path}; !slices.Equal(got, want) {
				t.Errorf("positional arguments %q, want %q", got, want)
			}
			var passed []string
			for i := 0; i < first; i++ {
				if argv[i] == "-E" {
					passed = append(passed, argv[i+1])
				}
			}
			slices.Sort(passed)
			want := slices.Clone(wantEnv)
			slices.Sort(want)
			if !slices.Equal(passed, want) {
				t.Errorf("-E passes %q, want %q", passed, want)
			}
			for _, a := range argv {
				if strings.Contains(a, "=") && !strings.HasPrefix(a, "--unit=") {
					t.Errorf("argv element %q carries a value: variables must be passed by name", a)
				}
			}
			for _, secret := range []string{"s3cret", "WEBHOOK_TOKEN", "WEBHOOK_MANUAL_TOKEN", "WEBHOOK_METRICS_TOKEN", "GITHUB_WEBHOOK_SECRET",
				"WEBHOOK_REGISTRY_TOKEN_DISTRIBUTION", "WEBHOOK_REGISTRY_TOKEN_GITEA", "NOTIFY_SOCKET", "LISTEN_FDS"} {
				if slices.Contains(argv, secret) || strings.Contains(joined, "s3cret") {
					t.Errorf("argv passes %s: %q", secret, argv)
				}
			}
			flags := argv[first+3 : last]
			wantFlags := []string{"--state-dir", cfg.stateDir, "--db", cfg.dbPath}
			if tc.force {
				wantFlags = append(wantFlags, "--force")
			}
			if tc.digest {
				wantFlags = append(wantFlags, "--digest", digestV1)
			}
			if !slices.Equal(flags, wantFlags) {
				t.Errorf("run-task flags %q, want %q", flags, wantFlags)
			}
		})
	}
}

func lastIndex(s []string, v string) int {
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == v {
			return i
		}
	}
	return -1
}

// TestDispatchedArgvRuns feeds what dispatchArgv builds back into run, so the server and
// run-task agree on the command line.
func TestDispatchedArgvRuns(t *testing.T) {
	h := newFakeHost(t)
	h.set("image.id", oldImageID)
	state := t.TempDir()
	cfg := &config{stateDir: state, dbPath: filepath.Join(state, "data", "pod-upgrade-trigger.db")}
	spec := taskSpec{unit: flowUnit, image: flowImage, event: "package", delivery: "d-dispatch",
		path: "/github-package-update/hello-world", force: true, digest: digestV1}
	argv := dispatchArgv("/usr/local/bin/webhook-auto-update", cfg, nil, spec)
	first := slices.Index(argv, "--")
	code, stderr := runTaskInProcess(t, map[string]string{"WEBHOOK_HEALTH_SETTLE_SECS": "1", anyImage: "true"}, argv[first+2:]...)
	rows := githubTaskRows(t, state, "d-dispatch")
	if got := stepsOf(rows); code != 0 || !slices.Equal(got, []string{"started", "pulled", "restarted", "healthy", "completed"}) {
		t.Fatalf("exit %d, steps %q\nstderr:\n%s", code, got, stderr)
	}
	if m := rows[0].meta; m["force"] != true || m["digest"] != digestV1 || m["event"] != "package" {
		t.Errorf("started row %v: the dispatched flags did not arrive", m)
	}
}

func TestTaskUnitName(t *testing.T) {
	long := strings.Repeat("0123456789", 10)
	for _, tc := range []struct{ delivery, want string }{
		{"d-1", "webhook-task-d-1"},
		{"72d3162e-cc78-11e3-81ab-4c9367dc0958", "webhook-task-72d3162e-cc78-11e3-81ab-4c9367dc0958"},
		{"Manual_ABC", "webhook-task-Manual_ABC"},
		{"a/b c", "webhook-task-a_b_c"},
		{"../../etc/passwd", "webhook-task-______etc_passwd"},
		{"x.service", "webhook-task-x_service"},
		{"a@b", "webhook-task-a_b"},
		{"*?[]", "webhook-task-____"},
		{"a\nb\x00c", "webhook-task-a_b_c"},
		{"é", "webhook-task-__"},
		{"--unit=evil", "webhook-task---unit_evil"},
		{long, "webhook-task-" + long[:64]},
		{"", "webhook-task-"},
	} {
		t.Run(strconv.Quote(tc.delivery), func(t *testing.T) {
			got := taskUnitName(tc.delivery)
			if got != tc.want {
				t.Errorf("taskUnitName(%q) = %q, want %q", tc.delivery, got, tc.want)
			}
			if err := validUnitName(got + ".service"); err != nil {
				t.Errorf("taskUnitName(%q) = %q is not a valid unit name: %v", tc.delivery, got, err)
			}
		})
	}
}

// Proof suites (issue 7): the fake systemd-run and the pull recorder (main_test.go) for the
// one-redeploy-at-a-time check, and the pull faults of a whole run-task. The pull faults of
// pullImage alone (fails then succeeds, hangs and is killed, fails for good) are TestPullImage's
// cases, and "pull fails for good: no restart" is a TestRunTaskFlow case; the tests below add the
// same faults seen through a whole run-task.

func TestOverlapping(t *testing.T) {
	if got := overlapping([]pullInterval{{1, 2, 1}, {2, 3, 2}, {5, 9, 3}}); got != nil {
		t.Errorf("back-to-back pulls reported as overlapping: %v", got)
	}
	if got := overlapping([]pullInterval{{1, 4, 1}, {3, 5, 2}}); len(got) != 2 {
		t.Errorf("overlapping pulls not reported: %v", got)
	}
}

// TestRunTaskPullFaults runs whole redeploys through pull faults: a pull that fails twice and
// then succeeds goes on to restart the unit; a pull that hangs is killed at
// WEBHOOK_PULL_TIMEOUT_SECS on every attempt and nothing is restarted.
func TestRunTaskPullFaults(t *testing.T) {
	for _, tc := range []struct {
		name     string
		files    map[string]string
		env      map[string]string
		steps    []string
		code     int
		attempts float64
		restarts int
		errHas   string
	}{
		{name: "fails twice, then succeeds", files: map[string]string{"podman-pull.fails": "2"},
			steps: []string{"started", "pulled", "restarted", "healthy", "completed"}, attempts: 3, restarts: 1},
		{name: "hangs: killed at the timeout on each attempt, no restart", files: map[string]string{"podman-pull.sleep": "60s"},
			env:   map[string]string{"WEBHOOK_PULL_TIMEOUT_SECS": "1", "WEBHOOK_PULL_ATTEMPTS": "2"},
			steps: []string{"started", "pull-failed"}, code: 1, attempts: 2, restarts: 0, errHas: "timed out"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newFakeHost(t)
			h.set("image.id", oldImageID)
			h.set("image.next", newImageID)
			for k, v := range tc.files {
				h.set(k, v)
			}
			state := t.TempDir()
			env := map[string]string{"WEBHOOK_HEALTH_SETTLE_SECS": "1", "WEBHOOK_PULL_RETRY_SECS": "1", anyImage: "true"}
			for k, v := range tc.env {
				env[k] = v
			}
			code, stderr := runTaskInProcess(t, env, "run-task", "--state-dir", state, "--",
				flowUnit, flowImage, "package", "d-fault", "/github-package-update/hello-world")
			rows := githubTaskRows(t, state, "d-fault")
			if got := stepsOf(rows); code != tc.code || !slices.Equal(got, tc.steps) {
				t.Fatalf("exit %d, steps %q; want %d, %q\nstderr:\n%s\ncalls:\n%s", code, got, tc.code, tc.steps, stderr, fakeCallLines(h.calls()))
			}
			last := rows[1].meta
			if last["attempts"] != tc.attempts {
				t.Errorf("%s row: attempts %v, want %v", rows[1].step(), last["attempts"], tc.attempts)
			}
			if n := len(h.callsOf("podman-pull")); float64(n) != tc.attempts {
				t.Errorf("%d pulls ran, want %v", n, tc.attempts)
			}
			if n := len(h.callsOf("systemctl-restart")); n != tc.restarts {
				t.Errorf("%d restarts, want %d", n, tc.restarts)
			}
			if tc.errHas != "" && !strings.Contains(fmt.Sprint(last["error"]), tc.errHas) {
				t.Errorf("%s row error %v, want %q", rows[1].step(), last["error"], tc.errHas)
			}
			if h.has("podman-pull.woke") {
				t.Error("a hanging pull finished its sleep: it was not killed")
			}
		})
	}
}

// TestE2ERollbackToWhatRan: the local tag is moved after the unit started (as another unit's
// redeploy of the same tag does); a broken push is rolled back to the image the container ran,
// not to the one the tag named before the pull.
func TestE2ERollbackToWhatRan(t *testing.T) {
	r, s, name, ref, id1, id2, unit, ctr := e2eTwoVersions(t, "rb")
	_, broken := r.PushBrokenImage(t, "e2e/"+name, "latest")
	r.TagLocal(t, id2, ref) // another unit's redeploy moved the local tag to v2; this unit still runs v1
	if id1 == id2 || id2 == broken {
		t.Fatal("v1, v2 and the broken image are not three images")
	}
	code, text := s.deliver(t, unit, "package", "broken-1", githubPackagePayload(r.Registry(), "e2e", name, "latest", ""), s.secret)
	if code != http.StatusAccepted {
		t.Fatalf("delivery: %d %q", code, text)
	}
	rows := s.waitTask(t, r, "broken-1")
	last := rows[len(rows)-1]
	if last.step != "rolled-back" {
		t.Fatalf("steps %v, want to end rolled-back; server log:\n%s", steps(rows), s.log)
	}
	if last.meta["image_id"] != id1 {
		t.Errorf("rolled back to %v (%v), want the image the container ran, v1 %s (not the tag's v2 %s)", last.meta["image_id"], last.meta["rollback_source"], id1, id2)
	}
	r.WaitFor(t, 30*time.Second, func() bool { return r.ContainerImage(t, ctr) == id1 }, ctr+" back on v1 "+id1)
	if st := r.Show(t, unit, "ActiveState")["ActiveState"]; st != "active" {
		t.Errorf("%s is %s after the rollback", unit, st)
	}
}

// TestE2EGateFailsFast: on the rig, with the default 20 s settle, an image whose podman
// healthcheck fails (interval 1 s) and one whose app exits 1 are each rolled back once the
// failure shows, long before the settle ends, and their rows say why: the exit code, the log's
// last line, the healthcheck's output, and that the registry still names the rejected digest,
// whose next delivery is refused.
func TestE2EGateFailsFast(t *testing.T) {
	r := needRig(t)
	const settle = 20 * time.Second
	s := startE2EServer(t, fmt.Sprintf("WEBHOOK_HEALTH_SETTLE_SECS=%d", int(settle/time.Second)))
	name := rigUniqueName(t, "gate")
	ref, good, _ := e2ePushApp(t, r, "e2e/"+name, "v1", appServe, appHealthy)
	app := e2eAppUnit(t, r, ref, "v1", true)

	// deploy delivers the image pushed as version and returns the task's rows once it ended,
	// after checking that v1 serves again, and when it did (unix ms).
	deploy := func(t *testing.T, delivery, digest string) ([]taskRow, int64) {
		t.Helper()
		body := githubPackagePayload(r.Registry(), "e2e", name, "latest", digest)
		if code, text := s.deliver(t, app.unit, "package", delivery, body, s.secret); code != http.StatusAccepted {
			t.Fatalf("%s: %d %q", delivery, code, text)
		}
		var back int64
		for deadline := time.Now().Add(3 * time.Minute); ; time.Sleep(10 * time.Millisecond) {
			rows := s.taskRows(t, delivery)
			restarted := slices.ContainsFunc(rows, func(r taskRow) bool { return r.step == "rollback-restarted" })
			if v := app.serves(); restarted && v == "v1" && back == 0 {
				back = time.Now().UnixMilli()
			}
			if len(rows) > 0 && finalSteps[rows[len(rows)-1].step] && (back != 0 || !restarted) {
				return rows, back
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s did not end with v1 serving: rows %s; log:\n%s", delivery, stepDetails(rows), s.log)
			}
		}
	}
	row := func(rows []taskRow, step string) map[string]any {
		for _, r := range rows {
			if r.step == step {
				return r.meta
			}
		}
		t.Fatalf("no %s row: %s", step, stepDetails(rows))
		return nil
	}
	wantSteps := "started,pulled,restarted,health-failed,rollback-restarted,rolled-back"

	t.Run("a failing healthcheck", func(t *testing.T) {
		_, _, digest := e2ePushApp(t, r, "e2e/"+name, "v2-unhealthy", appServe, appUnhealthy)
		rows, back := deploy(t, "unhealthy-1", digest)
		if got := strings.Join(steps(rows), ","); got != wantSteps {
			t.Fatalf("steps %s", stepDetails(rows))
		}
		restarted, failed := rowMS(t, rows, "restarted"), rowMS(t, rows, "health-failed")
		t.Logf("failure seen %d ms after the restart; v1 serving again %d ms after it", failed-restarted, back-restarted)
		if failed-restarted >= settle.Milliseconds() {
			t.Errorf("the gate failed %d ms after the restart: it waited for the settle's end", failed-restarted)
		}
		m := row(rows, "health-failed")
		if !strings.Contains(fmt.Sprint(m["error"]), "unhealthy") || m["healthcheck_output"] != "health: the database is unreachable" {
			t.Errorf("health-failed row %v: want unhealthy and the healthcheck's output", m)
		}
		rb := row(rows, "rolled-back")
		if rb["rejected_digest"] != digest || !strings.Contains(fmt.Sprint(rb["registry_note"]), digest) {
			t.Errorf("rolled-back row %v: want the rejected digest %s and that the registry still names it", rb, digest)
		}
		if got := r.ContainerImage(t, app.ctr); got != good {
			t.Errorf("container runs %s after the rollback, want v1 %s", got, good)
		}

		again := s.deliverAndWait(t, r, app.unit, "unhealthy-2", githubPackagePayload(r.Registry(), "e2e", name, "latest", digest))
		if got := strings.Join(steps(again), ","); got != "started,digest-rejected" {
			t.Fatalf("the same digest again: steps %s, want it refused", stepDetails(again))
		}
		if why := fmt.Sprint(again[1].meta["reason"]); !strings.Contains(why, "unhealthy-1") || !strings.Contains(why, `"force": true`) {
			t.Errorf("refusal reason %q: want the delivery that was rejected and how to force it", why)
		}
	})

	t.Run("an app that exits 1", func(t *testing.T) {
		_, _, digest := e2ePushApp(t, r, "e2e/"+name, "v3-crash", appCrash, appHealthy)
		rows, _ := deploy(t, "crash-1", digest)
		if got := strings.Join(steps(rows), ","); got != wantSteps {
			t.Fatalf("steps %s", stepDetails(rows))
		}
		if d := rowMS(t, rows, "health-failed") - rowMS(t, rows, "restarted"); d >= settle.Milliseconds() {
			t.Errorf("the gate failed %d ms after the restart: it waited for the settle's end", d)
		}
		m := row(rows, "health-failed")
		if e := fmt.Sprint(m["error"]); !strings.Contains(e, "exited with code 1") {
			t.Errorf("health-failed error %q, want the exit code", e)
		}
		if m["container_exit_code"] != float64(1) || !strings.HasSuffix(fmt.Sprint(m["log_tail"]), "fatal: cannot read /etc/app.conf") {
			t.Errorf("health-failed row %v: want exit code 1 and the log's last line", m)
		}
	})
}

// TestRunTaskRefusesARejectedDigest: a digest whose redeploy of a unit was rolled back is not
// redeployed to it again unless forced; a later redeploy of it that passed lifts the refusal, and
// another unit is not concerned.
func TestRunTaskRefusesARejectedDigest(t *testing.T) {
	state := t.TempDir()
	l, err := openEventLog(filepath.Join(state, "data", "pod-upgrade-trigger.db"), newLogger(io.Discard))
	if err != nil {
		t.Fatal(err)
	}
	claim := func(delivery, unit, step string, at int64) {
		t.Helper()
		if _, err := l.db.Exec(`INSERT INTO github_deliveries (delivery_id, unit, image, event, request_id, status,
			received_at, updated_at, digest, claimed_at, step) VALUES (?, ?, ?, 'package', 'r', 'done', ?, ?, ?, ?, ?)`,
			delivery, unit, flowImage, at, at, digestV1, at*1000, step); err != nil {
			t.Fatal(err)
		}
	}
	claim("bad-1", flowUnit, "rolled-back", 1700000000)
	claim("bad-1-copy", flowUnit, "digest-rejected", 1700000100) // a refusal is no verdict on the digest
	l.Close()
	env := map[string]string{"WEBHOOK_HEALTH_SETTLE_SECS": "1", "HOME": quadletHome(t, flowUnit, flowImage)}
	runTask := func(delivery string, flags ...string) []string {
		t.Helper()
		args := append(append([]string{"run-task", "--state-dir", state, "--digest", digestV1}, flags...),
			"--", flowUnit, flowImage, "package", delivery, "/github-package-update/hello-world")
		runTaskInProcess(t, env, args...)
		return stepsOf(githubTaskRows(t, state, delivery))
	}

	h := newFakeHostFiles(t, map[string]string{"image.id": oldImageID, "image.next": newImageID})
	if got := runTask("bad-2"); !slices.Equal(got, []string{"started", "digest-rejected"}) {
		t.Fatalf("steps %q, want the digest refused", got)
	}
	if rows := githubTaskRows(t, state, "bad-2"); rows[1].status != http.StatusConflict ||
		!strings.Contains(fmt.Sprint(rows[1].meta["reason"]), "(delivery bad-1)") || rows[1].meta["rejected_by"] != "bad-1" {
		t.Errorf("digest-rejected row %d %v: want 409 naming delivery bad-1", rows[1].status, rows[1].meta)
	}
	wantCalls(t, h, "podman-pull")
	if got := runTask("forced-1", "--force"); !slices.Equal(got, []string{"started", "pulled", "restarted", "healthy", "completed"}) {
		t.Fatalf("forced: steps %q, want a redeploy", got)
	}

	l, err = openEventLog(filepath.Join(state, "data", "pod-upgrade-trigger.db"), newLogger(io.Discard))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx := context.Background()
	if by, _, err := l.rejectedDigest(ctx, "other.service", digestV1); err != nil || by != "" {
		t.Errorf("another unit: rejected by %q (%v), want none", by, err)
	}
	if by, at, err := l.rejectedDigest(ctx, flowUnit, digestV1); err != nil || by != "bad-1" || at.Unix() != 1700000000 {
		t.Errorf("rejected by %q at %v (%v), want bad-1", by, at, err)
	}
	claim("good-1", flowUnit, "completed", 1700000200)
	if by, _, err := l.rejectedDigest(ctx, flowUnit, digestV1); err != nil || by != "" {
		t.Errorf("after a redeploy of it passed: rejected by %q (%v), want none", by, err)
	}
}
