// ratelimit_test.go tests ratelimit.go's timestamp logs and locks: the limiter's windows, corrupt
// lines, bounded lock waits, two processes sharing a log, a lock file that survives deletion,
// timestamp parsing (fuzzed), the limiter benchmarks, and, on the rig, a killed run-task whose
// image lock the kernel releases.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// limiterBase is the fixed "now" of the limiter tables; offsets are seconds relative to it.
var limiterBase = time.Unix(1_700_000_000, 0)

func offsetsToLog(offsets []int64) []byte {
	var ts []int64
	for _, o := range offsets {
		ts = append(ts, limiterBase.Unix()+o)
	}
	return formatTimestamps(ts)
}

func logOffsets(t *testing.T, path string) []int64 {
	t.Helper()
	ts, bad, err := readTimestamps(path)
	if err != nil {
		t.Fatal(err)
	}
	if bad != 0 {
		t.Fatalf("%s has %d unreadable lines after a write", path, bad)
	}
	var out []int64
	for _, v := range ts {
		out = append(out, v-limiterBase.Unix())
	}
	return out
}

func TestLimiterWindows(t *testing.T) {
	two := []window{{2, 600 * time.Second}, {10, 18000 * time.Second}}
	// Ten events spread over the long window, none in the short one.
	var tenLong []int64
	for i := int64(0); i < 10; i++ {
		tenLong = append(tenLong, -17000+i*1500) // -17000 … -3500
	}
	for _, tc := range []struct {
		name       string
		windows    []window
		log        []int64
		at         int64 // offset of the attempt
		allowed    bool
		counts     []int
		retryAfter time.Duration
		after      []int64 // the log afterwards
	}{
		{name: "empty log", windows: two, at: 0, allowed: true, counts: []int{0, 0}, after: []int64{0}},
		{name: "short window has room", windows: two, log: []int64{-100}, allowed: true,
			counts: []int{1, 1}, after: []int64{-100, 0}},
		{name: "short window full", windows: two, log: []int64{-100, -50}, allowed: false,
			counts: []int{2, 2}, retryAfter: 500 * time.Second, after: []int64{-100, -50}},
		{name: "an event exactly one span old has left the window", windows: two, log: []int64{-600, -50},
			allowed: true, counts: []int{1, 2}, after: []int64{-600, -50, 0}},
		{name: "long window full", windows: two, log: tenLong, allowed: false,
			counts: []int{0, 10}, retryAfter: 1000 * time.Second, after: tenLong},
		{name: "both full: wait for the later of the two", windows: two,
			log: append(append([]int64{}, tenLong[2:]...), -10, -5), allowed: false,
			counts: []int{2, 10}, retryAfter: (-17000 + 3000 + 18000) * time.Second,
			after: append(append([]int64{}, tenLong[2:]...), -10, -5)},
		{name: "events no window counts are dropped on write", windows: two, log: []int64{-50000, -18000, -100},
			allowed: true, counts: []int{1, 1}, after: []int64{-100, 0}},
		{name: "future events (clock stepped back) are not counted", windows: two, log: []int64{30, 40},
			allowed: true, counts: []int{0, 0}, after: []int64{30, 40, 0}},
		{name: "single window of one", windows: []window{{1, time.Hour}}, log: []int64{-3599},
			allowed: false, counts: []int{1}, retryAfter: time.Second, after: []int64{-3599}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			l := &limiter{logPath: filepath.Join(dir, "ratelimit.db"), lockPath: filepath.Join(dir, "ratelimit.lock"),
				windows: tc.windows, lockTimeout: time.Second, now: func() time.Time { return limiterBase.Add(time.Duration(tc.at) * time.Second) }}
			if tc.log != nil {
				if err := os.WriteFile(l.logPath, offsetsToLog(tc.log), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			// check must agree with take and change nothing.
			c, err := l.check(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			d, err := l.take(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if c.allowed != d.allowed || !reflect.DeepEqual(c.counts, d.counts) {
				t.Errorf("check = %+v, take = %+v: they must agree", c, d)
			}
			if d.allowed != tc.allowed || !reflect.DeepEqual(d.counts, tc.counts) || d.retryAfter != tc.retryAfter {
				t.Errorf("take = allowed %v counts %v retry %s, want %v %v %s", d.allowed, d.counts, d.retryAfter, tc.allowed, tc.counts, tc.retryAfter)
			}
			if got := logOffsets(t, l.logPath); !reflect.DeepEqual(got, tc.after) {
				t.Errorf("log afterwards = %v, want %v", got, tc.after)
			}
		})
	}
}

// TestLimiterCorruptLines: unreadable lines are skipped (and counted), never fatal, and vanish
// when the log is rewritten.
func TestLimiterCorruptLines(t *testing.T) {
	for _, tc := range []struct {
		name    string
		content string
		skipped int
		counts  []int
		allowed bool
	}{
		{"garbage around valid lines", "abc\n%d\n\n  12x \n-5\n%d\n", 3, []int{2}, false},
		{"only garbage", "\x00\x01\nnot a number\n99999999999999999999999\n", 3, []int{0}, true},
		{"no trailing newline, windows line endings", "%d\r\n%d", 0, []int{2}, false},
		{"binary junk", "\xff\xfe\xfd", 1, []int{0}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "ratelimit.db")
			content := tc.content
			if strings.Contains(content, "%d") {
				content = fmt.Sprintf(content, limiterBase.Unix()-10, limiterBase.Unix()-5)
			}
			if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			l := &limiter{logPath: path, lockPath: filepath.Join(dir, "ratelimit.lock"), windows: []window{{2, time.Minute}},
				lockTimeout: time.Second, now: func() time.Time { return limiterBase }}
			d, err := l.take(context.Background())
			if err != nil {
				t.Fatalf("take on a corrupt log: %v", err)
			}
			if d.skipped != tc.skipped || d.allowed != tc.allowed || !reflect.DeepEqual(d.counts, tc.counts) {
				t.Errorf("take = %+v, want skipped %d allowed %v counts %v", d, tc.skipped, tc.allowed, tc.counts)
			}
			if tc.allowed {
				logOffsets(t, path) // fails on any unreadable line left behind
			}
		})
	}
}

// TestLimiterLockTimeout: a lock held elsewhere makes take give up after lockTimeout with
// errLockTimeout (the /auto-update handler answers 429) and leaves the log alone.
func TestLimiterLockTimeout(t *testing.T) {
	dir := t.TempDir()
	l := &limiter{logPath: filepath.Join(dir, "ratelimit.db"), lockPath: filepath.Join(dir, "ratelimit.lock"),
		windows: []window{{5, time.Minute}}, lockTimeout: 50 * time.Millisecond, now: time.Now}
	held := holdFlock(t, l.lockPath)
	_, err := l.take(context.Background())
	if !errors.Is(err, errLockTimeout) {
		t.Fatalf("take with the lock held elsewhere: %v, want errLockTimeout", err)
	}
	if _, err := os.Stat(l.logPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the log was written without the lock: %v", err)
	}
	held()
	if d, err := l.take(context.Background()); err != nil || !d.allowed {
		t.Fatalf("take after the lock was released: %+v %v", d, err)
	}
}

const limiterChildEnv = "WAU_TEST_LIMITER_CHILD"

// TestLimiterAcrossProcesses runs the limiter from several processes at once, all released by
// one signal: exactly count attempts are allowed, and the log holds exactly those, so no update
// was lost and none was admitted twice.
func TestLimiterAcrossProcesses(t *testing.T) {
	const procs, attempts, limit = 6, 20, 50
	dir := t.TempDir()
	start := filepath.Join(dir, "go")
	var cmds []*exec.Cmd
	var outs []*strings.Builder
	for i := 0; i < procs; i++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestLimiterChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s|%s|%d|%d", limiterChildEnv, dir, start, attempts, limit))
		out := &strings.Builder{}
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds, outs = append(cmds, cmd), append(outs, out)
	}
	if err := os.WriteFile(start, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	total := 0
	for i, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Fatalf("child %d: %v\n%s", i, err, outs[i])
		}
		var n int
		for _, line := range strings.Split(outs[i].String(), "\n") {
			if v, ok := strings.CutPrefix(line, "allowed="); ok {
				n, _ = strconv.Atoi(v)
			}
		}
		total += n
	}
	if total != limit {
		t.Errorf("%d processes × %d attempts: %d allowed, want exactly %d", procs, attempts, total, limit)
	}
	ts, bad, err := readTimestamps(filepath.Join(dir, "ratelimit.db"))
	if err != nil || bad != 0 || len(ts) != limit {
		t.Errorf("the log holds %d timestamps (%d unreadable, %v), want %d", len(ts), bad, err, limit)
	}
}

// TestLimiterChild is the child process of TestLimiterAcrossProcesses; it skips otherwise.
func TestLimiterChild(t *testing.T) {
	spec := os.Getenv(limiterChildEnv)
	if spec == "" {
		t.Skip("helper process of TestLimiterAcrossProcesses")
	}
	parts := strings.Split(spec, "|")
	dir, start := parts[0], parts[1]
	attempts, _ := strconv.Atoi(parts[2])
	limit, _ := strconv.Atoi(parts[3])
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Millisecond) {
		if _, err := os.Stat(start); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("never told to start")
		}
	}
	l := &limiter{logPath: filepath.Join(dir, "ratelimit.db"), lockPath: filepath.Join(dir, "ratelimit.lock"),
		windows: []window{{limit, time.Hour}}, lockTimeout: time.Minute, now: time.Now}
	allowed := 0
	for i := 0; i < attempts; i++ {
		d, err := l.take(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if d.allowed {
			allowed++
		}
	}
	fmt.Printf("allowed=%d\n", allowed)
}

// TestLockFileSurvivesDeletion: prune-state may delete an idle lock file. A process that was
// waiting on it must then lock the file the path names now, not the deleted one, or two
// redeploys of one image could run at once.
func TestLockFileSurvivesDeletion(t *testing.T) {
	path := filepath.Join(t.TempDir(), "locks", "img.lock")
	first, err := lockFile(context.Background(), path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan *fileLock, 1)
	go func() {
		l, err := lockFile(context.Background(), path, 10*time.Second)
		if err != nil {
			t.Error(err)
		}
		got <- l
	}()
	// Let the waiter open the old file, then delete it (as prune-state does, holding the lock).
	time.Sleep(50 * time.Millisecond)
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	first.Unlock()
	second := <-got
	if second == nil {
		t.Fatal("no lock")
	}
	defer second.Unlock()
	held, _ := second.f.Stat()
	named, err := os.Stat(path)
	if err != nil || !os.SameFile(held, named) {
		t.Fatalf("the waiter holds a lock on a file the path no longer names (stat: %v)", err)
	}
	if third, err := lockFile(context.Background(), path, 100*time.Millisecond); err == nil {
		third.Unlock()
		t.Fatal("a third process got the lock while the waiter held it")
	}
}

// Fuzzing and benchmarks (issue 7).

// FuzzParseTimestamps: any file parses without a panic; every line that is not blank is either a
// timestamp or counted as skipped; what is kept is never negative and survives a rewrite.
func FuzzParseTimestamps(f *testing.F) {
	for _, s := range []string{"1700000000\n1700000600\n", "", "\n\n", "-1\nx\n 42 \r\n", "99999999999999999999\n",
		"1700000000", "+5\n0x10\n1e3\n\x00\n"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		ts, bad := parseTimestamps(data)
		lines := 0
		for _, l := range strings.Split(string(data), "\n") {
			if strings.TrimSpace(l) != "" {
				lines++
			}
		}
		if len(ts)+bad != lines {
			t.Errorf("%d timestamps and %d skipped from %d lines", len(ts), bad, lines)
		}
		for _, v := range ts {
			if v < 0 {
				t.Errorf("kept the negative timestamp %d", v)
			}
		}
		again, bad2 := parseTimestamps(formatTimestamps(ts))
		if bad2 != 0 || len(again) != len(ts) || len(ts) > 0 && !reflect.DeepEqual(again, ts) {
			t.Errorf("rewritten %v reads back as %v (%d skipped)", ts, again, bad2)
		}
	})
}

// BenchmarkLimiterCheck reads a full per-image log (60 redeploys within the hour), as the
// request path does for every delivery.
func BenchmarkLimiterCheck(b *testing.B) {
	dir := b.TempDir()
	l := &limiter{logPath: filepath.Join(dir, "x.db"), windows: []window{{60, time.Hour}}, now: func() time.Time { return limiterBase }}
	var offsets []int64
	for i := int64(0); i < 59; i++ {
		offsets = append(offsets, -i*60)
	}
	if err := os.WriteFile(l.logPath, offsetsToLog(offsets), 0o600); err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if d, err := l.check(ctx); err != nil || !d.allowed {
			b.Fatal(d, err)
		}
	}
}

// BenchmarkLimiterTake records an event under the lock file and rewrites the log (temp file,
// fsync, rename, fsync of the directory), as run-task and /auto-update do; the clock moves a
// minute per take so the log stays at its steady size.
func BenchmarkLimiterTake(b *testing.B) {
	dir := b.TempDir()
	now := limiterBase
	l := &limiter{logPath: filepath.Join(dir, "x.db"), lockPath: filepath.Join(dir, "x.lock"), windows: []window{{60, time.Hour}},
		lockTimeout: time.Second, now: func() time.Time { return now }}
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		now = now.Add(time.Minute)
		if d, err := l.take(ctx); err != nil || !d.allowed {
			b.Fatal(d, err)
		}
	}
}

// TestE2EKillRunTask kills a real run-task (its transient unit, with systemctl --user kill -s
// KILL) while it holds the image's lock, stuck in the restart of a unit whose start never ends.
// The kernel drops the flock with the process: the next delivery of the same image gets the lock
// and redeploys.
func TestE2EKillRunTask(t *testing.T) {
	r := needRig(t)
	// The app runs no container, so it names no image: WEBHOOK_ALLOW_ANY_IMAGE lets the tasks
	// this test is about pull and restart it.
	s := startE2EServer(t, "WEBHOOK_TASK_LOCK_TIMEOUT_SECS=60", "WEBHOOK_ALLOW_ANY_IMAGE=true")
	repo := rigUniqueName(t, "stuck")
	ref, _ := r.PushImage(t, "e2e/"+repo, "latest", "v1")
	app := repo + ".service"
	unitPath := r.InstallUnit(t, app, "[Service]\nExecStartPre=/bin/sleep 1000\nExecStart=/bin/sleep 1000\n")
	body := githubPackagePayload(r.Registry(), "e2e", repo, "latest", "")
	lock := imageLockPath(s.state, ref)

	if code, text := s.deliver(t, repo, "package", "stuck-1", body, s.secret); code != 202 {
		t.Fatalf("first delivery: %d %q; log:\n%s", code, text, s.log)
	}
	r.WaitFor(t, 2*time.Minute, func() bool {
		return slices.Contains(steps(s.taskRows(t, "stuck-1")), "pulled") && r.Show(t, app, "ActiveState")["ActiveState"] == "activating"
	}, "the first task to hang in the restart of "+app)
	if lk, free, err := tryLockFile(lock, 0); err != nil || free {
		lk.Unlock()
		t.Fatalf("the hanging task does not hold %s (free %v, %v)", lock, free, err)
	}
	task := taskUnitName("stuck-1") + ".service"
	if _, err := r.Systemctl(t, "kill", "-s", "KILL", "--", task); err != nil {
		t.Fatal(err)
	}
	r.WaitFor(t, time.Minute, func() bool {
		st := r.Show(t, task, "ActiveState")["ActiveState"]
		return st != "active" && st != "deactivating"
	}, task+" to die")
	r.WaitFor(t, 30*time.Second, func() bool {
		lk, free, err := tryLockFile(lock, 0)
		lk.Unlock()
		return err == nil && free
	}, "the killed task's lock to be released")

	// The unit is fixed and its stuck start cancelled; the next delivery goes through the lock.
	if _, err := r.Systemctl(t, "stop", "--", app); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(unitPath, []byte("[Service]\nExecStart=/bin/sleep 1000\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Systemctl(t, "daemon-reload"); err != nil {
		t.Fatal(err)
	}
	if code, text := s.deliver(t, repo, "package", "stuck-2", body, s.secret); code != 202 {
		t.Fatalf("second delivery: %d %q", code, text)
	}
	rows := s.waitTask(t, r, "stuck-2")
	if got := strings.Join(steps(rows), ","); got != "started,pulled,restarted,healthy,completed" {
		t.Fatalf("second task: %s; log:\n%s", stepDetails(rows), s.log)
	}
	if got := steps(s.taskRows(t, "stuck-1")); !slices.Equal(got, []string{"started", "pulled"}) {
		t.Errorf("the killed task wrote %v, want [started pulled]", got)
	}
	if ts, bad, err := readTimestamps(imageLimitPath(s.state, ref)); err != nil || bad != 0 || len(ts) != 2 {
		t.Errorf("per-image log: %d timestamps, %d bad, %v; want 2", len(ts), bad, err)
	}
}
