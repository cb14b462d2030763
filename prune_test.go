// prune_test.go tests prune.go's prune-state: trimming and deleting the state directory's
// timestamp logs and lock files against a snapshot of the tree, keeping what a rate-limit window
// still counts, the command and its --dry-run, old event rows and request-row retention, and, on
// the rig, leaving a running redeploy's lock alone.
package main

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fileState is what prune-state could change about a file.
type fileState struct {
	mode  fs.FileMode
	mtime time.Time
	data  string
	link  string
}

// snapshotTree records every file, directory and symlink under root (without following links),
// except the paths under skip.
func snapshotTree(t *testing.T, root, skip string) map[string]fileState {
	t.Helper()
	out := map[string]fileState{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if skip != "" && (path == skip || strings.HasPrefix(path, skip+string(os.PathSeparator))) {
			return filepath.SkipDir
		}
		fi, err := os.Lstat(path)
		if err != nil {
			return err
		}
		st := fileState{mode: fi.Mode(), mtime: fi.ModTime()}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			st.link, _ = os.Readlink(path)
		case fi.Mode().IsRegular():
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			st.data = string(b)
		case fi.IsDir():
			st.mtime = time.Time{} // a directory's mtime changes when the event log's data/ appears
		}
		rel, _ := filepath.Rel(root, path)
		out[rel] = st
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// pruneFixture builds a state directory around now and returns it and a directory outside it
// that symlinks point into.
type pruneFixture struct {
	state, outside string
	now            time.Time
}

func newPruneFixture(t *testing.T) *pruneFixture {
	t.Helper()
	f := &pruneFixture{state: t.TempDir(), outside: t.TempDir(), now: time.Now()}
	limits := filepath.Join(f.state, "github-image-limits")
	locks := filepath.Join(f.state, "github-image-locks")
	for _, d := range []string{limits, locks} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	ago := func(h float64) string {
		return fmt.Sprint(f.now.Add(-time.Duration(h * float64(time.Hour))).Unix())
	}
	write := func(path string, lines []string, age time.Duration) {
		t.Helper()
		content := ""
		if lines != nil {
			content = strings.Join(lines, "\n") + "\n"
		}
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		mt := f.now.Add(-age)
		if err := os.Chtimes(path, mt, mt); err != nil {
			t.Fatal(err)
		}
	}
	old := 48 * time.Hour
	write(filepath.Join(f.state, "ratelimit.db"), []string{ago(30), ago(25), "garbage", ago(1), ago(0)}, 0)
	write(filepath.Join(f.state, "ratelimit.lock"), nil, old)
	write(filepath.Join(limits, "old.db"), []string{ago(48)}, old)
	write(filepath.Join(limits, "mixed.db"), []string{ago(30), ago(2), "x"}, time.Hour) // its lock file is missing
	write(filepath.Join(limits, "fresh.db"), []string{ago(1)}, time.Hour)
	write(filepath.Join(limits, "empty.db"), nil, old)
	write(filepath.Join(limits, "busy.db"), []string{ago(48)}, old)
	write(filepath.Join(limits, "notes.txt"), []string{ago(48)}, old)
	write(filepath.Join(limits, ".mixed.db.tmp-123456"), []string{ago(48)}, old)
	write(filepath.Join(limits, ".fresh.db.tmp-654321"), []string{ago(48)}, time.Minute)
	write(filepath.Join(f.state, ".ratelimit.db.tmp-42"), nil, old)
	write(filepath.Join(locks, "old.lock"), nil, old)
	write(filepath.Join(locks, "fresh.lock"), nil, time.Hour)
	write(filepath.Join(locks, "busy.lock"), nil, old)
	write(filepath.Join(locks, "empty.lock"), nil, old)
	write(filepath.Join(locks, "readme"), nil, old)
	// Symlinks out of the state directory must never be followed.
	write(filepath.Join(f.outside, "victim.db"), []string{ago(48)}, old)
	write(filepath.Join(f.outside, "victim.lock"), nil, old)
	for link, target := range map[string]string{
		filepath.Join(limits, "link.db"):   filepath.Join(f.outside, "victim.db"),
		filepath.Join(locks, "link.lock"):  filepath.Join(f.outside, "victim.lock"),
		filepath.Join(locks, "dir-link.d"): f.outside,
	} {
		if err := os.Symlink(target, link); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

func (f *pruneFixture) config(t *testing.T, env map[string]string) *config {
	t.Helper()
	full := map[string]string{"WEBHOOK_STATE_DIR": f.state}
	for k, v := range env {
		full[k] = v
	}
	return testConfig(t, full)
}

// counts is the comparable part of a report.
func (r pruneReport) counts() string {
	busy := append([]string(nil), r.busy...)
	sort.Strings(busy)
	return fmt.Sprintf("entries=%d dbs=%d locks=%d temp=%d busy=%v errs=%v", r.entries, r.removedDBs, r.removedLocks, r.removedTemp, busy, r.errs)
}

// TestPruneState prunes a built state directory: a dry run changes no byte, mode or mtime and
// reports exactly what the real run then does; the real run trims, deletes and keeps what the
// rules say, leaves a held lock and its log alone, and follows no symlink.
func TestPruneState(t *testing.T) {
	f := newPruneFixture(t)
	cfg := f.config(t, nil)
	held := holdFlock(t, filepath.Join(f.state, "github-image-locks", "busy.lock"))
	var logs syncBuffer
	lg := newLogger(&logs)

	before := snapshotTree(t, f.state, "")
	outsideBefore := snapshotTree(t, f.outside, "")
	dry := newPruner(cfg, 24*time.Hour, true, f.now, lg).run(context.Background())
	// The real run only makes sense on the tree the dry run left as it was.
	if !t.Run("the dry run changes nothing", func(t *testing.T) {
		if after := snapshotTree(t, f.state, ""); !reflect.DeepEqual(after, before) {
			t.Fatalf("the dry run changed the state directory:\nbefore %v\nafter  %v", before, after)
		}
	}) {
		return
	}

	real := newPruner(cfg, 24*time.Hour, false, f.now, lg).run(context.Background())
	after := snapshotTree(t, f.state, "")
	t.Run("the real run does what the dry run reported", func(t *testing.T) {
		if dry.counts() != real.counts() {
			t.Errorf("dry run reported %s, the real run did %s", dry.counts(), real.counts())
		}
		limits := filepath.Join(f.state, "github-image-limits")
		locks := filepath.Join(f.state, "github-image-locks")
		want := fmt.Sprintf("entries=6 dbs=2 locks=2 temp=2 busy=[%s %s] errs=[]", filepath.Join(limits, "busy.db"), filepath.Join(locks, "busy.lock"))
		if real.counts() != want {
			t.Errorf("report %s, want %s", real.counts(), want)
		}
	})
	t.Run("each path is trimmed, deleted or kept", func(t *testing.T) {
		ts := func(h float64) string {
			return fmt.Sprint(f.now.Add(-time.Duration(h*float64(time.Hour))).Unix()) + "\n"
		}
		for _, tc := range []struct {
			path    string
			gone    bool
			data    string // "" with !gone: unchanged since before
			changed bool
		}{
			{path: "ratelimit.db", data: ts(1) + ts(0), changed: true},
			{path: "ratelimit.lock"},
			{path: "github-image-limits/old.db", gone: true},
			{path: "github-image-limits/mixed.db", data: ts(2), changed: true},
			{path: "github-image-limits/fresh.db"},
			{path: "github-image-limits/empty.db", gone: true},
			{path: "github-image-limits/busy.db"},
			{path: "github-image-limits/notes.txt"},
			{path: "github-image-limits/link.db"},
			{path: "github-image-limits/.mixed.db.tmp-123456", gone: true},
			{path: "github-image-limits/.fresh.db.tmp-654321"},
			{path: ".ratelimit.db.tmp-42", gone: true},
			{path: "github-image-locks/old.lock", gone: true},
			{path: "github-image-locks/empty.lock", gone: true},
			{path: "github-image-locks/fresh.lock"},
			{path: "github-image-locks/busy.lock"},
			{path: "github-image-locks/readme"},
			{path: "github-image-locks/link.lock"},
			{path: "github-image-locks/dir-link.d"},
		} {
			got, ok := after[tc.path]
			switch {
			case tc.gone && ok:
				t.Errorf("%s still exists", tc.path)
			case tc.gone:
			case !ok:
				t.Errorf("%s was deleted", tc.path)
			case tc.changed && (got.data != tc.data || got.mode.Perm() != 0o600):
				t.Errorf("%s = %q mode %v, want %q mode 0600", tc.path, got.data, got.mode, tc.data)
			case !tc.changed && !reflect.DeepEqual(got, before[tc.path]):
				t.Errorf("%s changed: %+v, was %+v", tc.path, got, before[tc.path])
			}
		}
	})
	t.Run("a rewritten log has its lock, and no symlink is followed", func(t *testing.T) {
		// The log pass created the missing lock of mixed.db, as run-task would, so it took the lock.
		if _, ok := after["github-image-locks/mixed.lock"]; !ok {
			t.Errorf("mixed.db was rewritten without its lock file")
		}
		if got := snapshotTree(t, f.outside, ""); !reflect.DeepEqual(got, outsideBefore) {
			t.Errorf("a symlink was followed out of the state directory:\nbefore %v\nafter  %v", outsideBefore, got)
		}
	})

	// Once the redeploy is done, its lock and log go too; a further run finds nothing else.
	t.Run("a released lock and its log go too", func(t *testing.T) {
		held()
		again := newPruner(cfg, 24*time.Hour, false, f.now, lg).run(context.Background())
		if got := again.counts(); got != "entries=1 dbs=1 locks=1 temp=0 busy=[] errs=[]" {
			t.Errorf("after the lock was released: %s, want busy.db and busy.lock pruned", got)
		}
		if got := newPruner(cfg, 24*time.Hour, false, f.now, lg).run(context.Background()).counts(); got != "entries=0 dbs=0 locks=0 temp=0 busy=[] errs=[]" {
			t.Errorf("a third run found %s, want nothing", got)
		}
	})
}

// TestPruneKeepsWhatLimitsCount: a retention shorter than a rate-limit window never drops a
// timestamp the window still counts.
func TestPruneKeepsWhatLimitsCount(t *testing.T) {
	for _, tc := range []struct {
		name      string
		env       map[string]string
		maxAge    time.Duration
		wantGlob  int // timestamps left in ratelimit.db (of 2h, 6h, 30h old)
		wantImage int // timestamps left in the image log (of the same)
	}{
		{"default windows, 1h retention", nil, time.Hour, 1, 0},                                          // 5h window keeps 2h; the image's 1h window keeps none
		{"long image window", map[string]string{"WEBHOOK_IMAGE_LIMIT_WINDOW": "25200"}, time.Hour, 1, 2}, // 7h
		{"retention longer than every window", nil, 10 * time.Hour, 2, 2},
		{"long auto-update window", map[string]string{"WEBHOOK_LIMIT1_WINDOW": "200000"}, time.Hour, 3, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			state := t.TempDir()
			now := time.Now()
			var lines []string
			for _, h := range []int{2, 6, 30} {
				lines = append(lines, fmt.Sprint(now.Add(-time.Duration(h)*time.Hour).Unix()))
			}
			data := []byte(strings.Join(lines, "\n") + "\n")
			image := imageLimitPath(state, "ghcr.io/o/app:1")
			for _, p := range []string{filepath.Join(state, "ratelimit.db"), image} {
				if err := writeFileAtomic(p, data, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			f := &pruneFixture{state: state}
			newPruner(f.config(t, tc.env), tc.maxAge, false, now, newLogger(&syncBuffer{})).run(context.Background())
			for _, c := range []struct {
				path string
				want int
			}{{filepath.Join(state, "ratelimit.db"), tc.wantGlob}, {image, tc.wantImage}} {
				ts, _, err := readTimestamps(c.path)
				if err != nil || len(ts) != c.want {
					t.Errorf("%s keeps %d timestamps (%v), want %d", filepath.Base(c.path), len(ts), err, c.want)
				}
			}
		})
	}
}

// TestPruneStateCommand runs prune-state in-process: its one output line, exit status, flags and
// event row.
func TestPruneStateCommand(t *testing.T) {
	for _, tc := range []struct {
		name    string
		args    []string
		missing bool // the state directory does not exist
		want    int
		wantOut string
		wantErr string
	}{
		{name: "real", args: nil, want: 0, wantOut: "Trimmed entries=7 removed_dbs=3 removed_locks=3 dry_run=false\n"},
		{name: "dry run", args: []string{"--dry-run"}, want: 0, wantOut: "Trimmed entries=7 removed_dbs=3 removed_locks=3 dry_run=true\n"},
		{name: "longer retention", args: []string{"--max-age-hours", "100"}, want: 0, wantOut: "Trimmed entries=2 removed_dbs=1 removed_locks=0 dry_run=false\n"},
		{name: "zero hours", args: []string{"--max-age-hours", "0"}, want: 2, wantErr: "want a whole number greater than zero"},
		{name: "not a number", args: []string{"--max-age-hours=1d"}, want: 2, wantErr: "max-age-hours"},
		{name: "stray argument", args: []string{"all"}, want: 2, wantErr: "unexpected argument"},
		{name: "no state directory", missing: true, want: 0, wantOut: "Trimmed entries=0 removed_dbs=0 removed_locks=0 dry_run=false\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newPruneFixture(t)
			state := f.state
			if tc.missing {
				state = filepath.Join(t.TempDir(), "nowhere")
			}
			var out, errb syncBuffer
			got := run(append([]string{"prune-state"}, tc.args...), mapEnv(map[string]string{"WEBHOOK_STATE_DIR": state}), &out, &errb)
			if got != tc.want || out.String() != tc.wantOut || !strings.Contains(errb.String(), tc.wantErr) {
				t.Fatalf("exit %d stdout %q, want %d %q; stderr (want %q):\n%s", got, out.String(), tc.want, tc.wantOut, tc.wantErr, errb.String())
			}
			if tc.missing {
				if _, err := os.Stat(state); err == nil {
					t.Errorf("prune-state created the missing state directory")
				}
				return
			}
			if tc.want != 0 {
				return
			}
			rows := actionRows(t, filepath.Join(state, "data", "pod-upgrade-trigger.db"), "prune-state")
			if len(rows) != 1 || rows[0].Method != "CLI" || rows[0].Status != 200 {
				t.Fatalf("rows %+v, want one CLI row with status 200", rows)
			}
			line := fmt.Sprintf("Trimmed entries=%v removed_dbs=%v removed_locks=%v dry_run=%v\n",
				rows[0].Meta["entries"], rows[0].Meta["removed_dbs"], rows[0].Meta["removed_locks"], rows[0].Meta["dry_run"])
			if line != tc.wantOut {
				t.Errorf("row says %q, stdout %q", line, tc.wantOut)
			}
		})
	}
}

// TestE2EPruneLeavesRunningTaskLock runs a real run-task of the built binary, kept inside its
// redeploy (holding the image's lock) by a pull that fails and waits to retry, and checks that
// prune-state, with every file made old, leaves that lock and that image's log alone while it
// prunes another image's stale lock.
func TestE2EPruneLeavesRunningTaskLock(t *testing.T) {
	r := needRig(t)
	bin := buildBinary(t)
	state := r.TempDir(t)
	image := r.Registry() + "/" + rigUniqueName(t, "absent") + ":v1"
	lockPath := imageLockPath(state, image)
	logPath := imageLimitPath(state, image)
	// The unit does not exist, so it names no image: WEBHOOK_ALLOW_ANY_IMAGE lets the task go on
	// to the pull this test is about.
	env := append(r.rigEnv(), "WEBHOOK_STATE_DIR="+state, "WEBHOOK_PULL_ATTEMPTS=2", "WEBHOOK_PULL_RETRY_SECS=600",
		"WEBHOOK_ALLOW_ANY_IMAGE=true")

	task := r.Command(bin, "run-task", "--", "prune-e2e.service", image, "manual", "manual-prune-e2e", "/test")
	task.Env = env
	var taskErr syncBuffer
	task.Stdout, task.Stderr = &taskErr, &taskErr
	if err := task.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- task.Wait() }()
	t.Cleanup(func() {
		task.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			task.Process.Kill()
		}
	})
	// The task is inside its redeploy once it waits to retry the pull, holding the lock.
	r.WaitFor(t, 2*time.Minute, func() bool { return strings.Contains(taskErr.String(), "retrying in") }, "run-task to wait for its pull retry; its output: "+taskErr.String())
	if lk, free, err := tryLockFile(lockPath, 0); err != nil || free {
		lk.Unlock()
		t.Fatalf("run-task does not hold %s (free %v, %v); its output:\n%s", lockPath, free, err, taskErr.String())
	}

	// Make everything stale: the running task's lock and log, and another image's lock.
	other := imageLockPath(state, r.Registry()+"/other:v1")
	if err := os.WriteFile(other, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-72 * time.Hour)
	stale := fmt.Sprintf("%d\n", old.Unix())
	if err := os.WriteFile(logPath, []byte(stale), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{lockPath, logPath, other} {
		if err := os.Chtimes(p, old, old); err != nil {
			t.Fatal(err)
		}
	}
	r.Chown(t, other, logPath)

	for _, args := range [][]string{{"--dry-run"}, {}} {
		cmd := r.Command(bin, append([]string{"prune-state", "--max-age-hours", "1"}, args...)...)
		cmd.Env = env
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("prune-state %v: %v", args, err)
		}
		want := fmt.Sprintf("Trimmed entries=0 removed_dbs=0 removed_locks=1 dry_run=%t\n", len(args) > 0)
		if string(out) != want {
			t.Errorf("prune-state %v printed %q, want %q", args, out, want)
		}
	}
	if _, err := os.Stat(lockPath); err != nil {
		t.Errorf("the running run-task's lock was removed: %v", err)
	}
	if b, err := os.ReadFile(logPath); err != nil || string(b) != stale {
		t.Errorf("the running run-task's log was changed: %q %v", b, err)
	}
	if _, err := os.Stat(other); err == nil {
		t.Errorf("the stale unheld lock %s was kept", other)
	}
	select {
	case err := <-done:
		t.Fatalf("run-task ended during the test (%v); its output:\n%s", err, taskErr.String())
	default:
	}
}

// TestPruneOldEvents checks --events-max-age-days: a dry run counts the rows it would delete and
// deletes none; a real run deletes exactly the rows older than the cutoff, across batches.
func TestPruneOldEvents(t *testing.T) {
	state := t.TempDir()
	dbPath := filepath.Join(state, "data", "pod-upgrade-trigger.db")
	events, err := openEventLog(dbPath, newLogger(io.Discard))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	var evs []event
	for i := 0; i < 2500; i++ { // more than one 1000-row batch
		evs = append(evs, event{RequestID: fmt.Sprint("old-", i), TS: now.Add(-72 * time.Hour), Method: "GET", Status: 200, Action: "health"})
	}
	for i := 0; i < 7; i++ {
		evs = append(evs, event{RequestID: fmt.Sprint("new-", i), TS: now.Add(-time.Hour), Method: "GET", Status: 200, Action: "health"})
	}
	if err := events.Write(context.Background(), evs...); err != nil {
		t.Fatal(err)
	}
	events.Close()
	count := func() int {
		return len(actionRows(t, dbPath, "health"))
	}
	env := mapEnv(map[string]string{"WEBHOOK_STATE_DIR": state})
	for _, tc := range []struct {
		args     []string
		wantLine string
		wantLeft int
	}{
		{[]string{"--dry-run", "--events-max-age-days", "2"}, "Deleted events=2500 ", 2507},
		{[]string{"--events-max-age-days", "4"}, "Deleted events=0 ", 2507},
		{[]string{"--events-max-age-days", "2"}, "Deleted events=2500 ", 7},
		{[]string{"--events-max-age-days", "2"}, "Deleted events=0 ", 7},
	} {
		var out, errb syncBuffer
		if code := run(append([]string{"prune-state"}, tc.args...), env, &out, &errb); code != 0 {
			t.Fatalf("%v: exit %d\n%s", tc.args, code, errb.String())
		}
		if !strings.Contains(out.String(), tc.wantLine) {
			t.Errorf("%v: stdout %q, want %q", tc.args, out.String(), tc.wantLine)
		}
		if got := count(); got != tc.wantLeft {
			t.Errorf("%v: %d health rows left, want %d", tc.args, got, tc.wantLeft)
		}
	}
	var out, errb syncBuffer
	if code := run([]string{"prune-state", "--events-max-age-days", "0"}, env, &out, &errb); code != 2 {
		t.Errorf("--events-max-age-days 0: exit %d, want 2", code)
	}
}

// TestPruneRequestRetention: prune-state deletes request rows older than
// WEBHOOK_REQUEST_RETENTION_DAYS (default 30) and keeps every row of redeploys, triggers and
// scheduler ticks; a dry run counts and deletes nothing.
func TestPruneRequestRetention(t *testing.T) {
	state := t.TempDir()
	dbPath := filepath.Join(state, "data", "pod-upgrade-trigger.db")
	seedRetention(t, dbPath)
	left := func() int {
		return queryInt(t, rawDB(t, dbPath), `SELECT count(*) FROM event_log WHERE action != 'prune-state'`)
	}
	for _, tc := range []struct {
		name     string
		env      map[string]string
		args     []string
		wantLine string
		wantLeft int
	}{
		{"dry run", nil, []string{"--dry-run"}, "would delete 1500 request rows", 1506},
		{"a longer retention", map[string]string{"WEBHOOK_REQUEST_RETENTION_DAYS": "60"}, nil, "deleted 0 request rows", 1506},
		{"the default retention", nil, nil, "deleted 1500 request rows", 6},
		{"again", nil, nil, "deleted 0 request rows", 6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := map[string]string{"WEBHOOK_STATE_DIR": state}
			for k, v := range tc.env {
				env[k] = v
			}
			var out, errb syncBuffer
			if code := run(append([]string{"prune-state"}, tc.args...), mapEnv(env), &out, &errb); code != 0 {
				t.Fatalf("exit %d\n%s", code, errb.String())
			}
			if !strings.Contains(errb.String(), tc.wantLine) {
				t.Errorf("stderr %q, want %q", errb.String(), tc.wantLine)
			}
			if got := left(); got != tc.wantLeft {
				t.Errorf("%d rows left, want %d", got, tc.wantLeft)
			}
		})
	}
	if n := queryInt(t, rawDB(t, dbPath), `SELECT count(*) FROM event_log WHERE request_id IN ('old-TASK', 'old-CLI', 'old-SCHEDULER')`); n != 3 {
		t.Errorf("%d of the 3 old task, CLI and scheduler rows kept, want 3", n)
	}
	var out, errb syncBuffer
	if code := run([]string{"prune-state"}, mapEnv(map[string]string{"WEBHOOK_STATE_DIR": state, "WEBHOOK_REQUEST_RETENTION_DAYS": "0"}), &out, &errb); code != 2 {
		t.Errorf("WEBHOOK_REQUEST_RETENTION_DAYS=0: exit %d, want 2", code)
	}
}
