// main_test.go owns the test harness every concern's tests share: TestMain; the fake programs
// the test binary impersonates (podman, systemctl, systemd-run, loginctl, skopeo), all registered by the
// one init below; the in-process test server and configuration builders; payload builders and
// signatures; readers of event_log rows; waits; the host-wide lock a test that loads the machine
// takes (hostExclusive); and the built binary and the processes started
// from it. Helpers one concern uses stay in that concern's test file; the rig of the system tests
// is main_rig_test.go's, and the end-to-end server harness on it main_e2e_test.go's.
//
// Rules: the fakes are the test binary itself (installFakes), scripted through files in a state
// directory named by FAKE_PODMAN_DIR / FAKE_SYSTEMCTL_DIR / FAKE_SYSTEMD_RUN_DIR: every call
// appends its argv to argv.log, and a file <prog>-<verb>.{sleep,fails,exit,stdout,stderr} changes
// what one subcommand does. A test that puts only the fakes on PATH cannot reach a real podman or
// systemd. Waits are bounded by hangGuard, which is never a measurement.
package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// fakePrograms maps a program name to the fake that runs when the test binary
// is started under that name (see installFakes). The init below registers
// every fake.
var fakePrograms = map[string]func() int{}

func TestMain(m *testing.M) {
	if fake, ok := fakePrograms[filepath.Base(os.Args[0])]; ok {
		os.Exit(fake())
	}
	for _, err := range rigSweep() {
		fmt.Fprintf(os.Stderr, "test rig sweep: %v\n", err)
	}
	code := m.Run()
	if err := rigTeardown(); err != nil {
		fmt.Fprintf(os.Stderr, "test rig teardown: %v\n", err)
	}
	if binaryDir != "" {
		os.RemoveAll(binaryDir)
	}
	os.Exit(code)
}

// fake programs

func init() {
	// loginctl enable-linger needs logind; the README's deploy block only has to reach it.
	fakePrograms["loginctl"] = func() int { return 0 }
	chainFake("podman", fakePodmanDirEnv)
	chainFake("systemctl", fakeSystemctlDirEnv)
	chainFake("skopeo", fakePodmanDirEnv) // scripted as skopeo-inspect.*, in podman's directory
	// systemd-run only records (and obeys systemd-run---user.{exit,fails,sleep,...}); a test that
	// wants the transient unit's work done runs the recorded command itself.
	chainFake("systemd-run", fakeSystemdRunDirEnv)
	// The pull recorder wraps the scripted podman.
	prevPodman := fakePrograms["podman"]
	fakePrograms["podman"] = func() int {
		path := os.Getenv(fakePullIntervalsEnv)
		if path == "" || len(os.Args) < 2 || os.Args[1] != "pull" {
			return prevPodman()
		}
		start := time.Now().UnixNano()
		code := prevPodman()
		if f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600); err == nil {
			fmt.Fprintf(f, "%d %d %d\n", start, time.Now().UnixNano(), os.Getpid())
			f.Close()
		}
		return code
	}
	// The logging systemctl only answers when its log variable is set, and hands over to the
	// scripted one otherwise.
	prevSystemctl := fakePrograms["systemctl"]
	fakePrograms["systemctl"] = func() int {
		if os.Getenv(fakeSystemctlLogEnv) == "" && prevSystemctl != nil {
			return prevSystemctl()
		}
		return fakeSystemctl()
	}
}

// installFakes links the test binary into a fresh directory under each of
// names and returns the directory; the caller prepends it to PATH so that
// running one of names runs the matching fakePrograms entry.
func installFakes(t *testing.T, names ...string) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		exe = os.Args[0]
	}
	dir := t.TempDir()
	for _, name := range names {
		if _, ok := fakePrograms[name]; !ok {
			t.Fatalf("install fake %q: no entry in fakePrograms", name)
		}
		dst := filepath.Join(dir, name)
		if err := os.Link(exe, dst); err != nil {
			if err := copyExecutable(exe, dst, 0o755); err != nil {
				t.Fatalf("install fake %q: %v", name, err)
			}
		}
	}
	return dir
}

func copyExecutable(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copy %s to %s: %w", src, dst, err)
	}
	return out.Close()
}

const (
	fakePodmanDirEnv    = "FAKE_PODMAN_DIR"
	fakeSystemctlDirEnv = "FAKE_SYSTEMCTL_DIR"
)

const (
	// fakeSystemdRunDirEnv names the state directory of the fake systemd-run; newFakeHostWithRun
	// points it at the podman/systemctl one, so one argv.log lists every program run.
	fakeSystemdRunDirEnv = "FAKE_SYSTEMD_RUN_DIR"
	// fakePullIntervalsEnv names a file to which the fake podman appends "START END PID" (unix
	// nanoseconds) for every pull, so a test can check that pulls never overlapped.
	fakePullIntervalsEnv = "FAKE_PULL_INTERVALS"
	// keySystemdRun is the runFake key of systemd-run: its first argument is always --user.
	keySystemdRun = "systemd-run---user"
)

// chainFake registers the scripted fake for prog. A fake another test file registered earlier
// keeps running whenever this one's state directory is not set.
func chainFake(prog, env string) {
	prev := fakePrograms[prog]
	fakePrograms[prog] = func() int {
		dir := os.Getenv(env)
		if dir == "" && prev != nil {
			return prev()
		}
		return runFake(prog, env, dir, os.Args[1:])
	}
}

// fakeVerb names the subcommand of a call: "pull", "image-inspect", "restart".
// argsAfterDashes drops a leading "--", as podman's flag parser does.
func argsAfterDashes(args []string) []string {
	if len(args) > 0 && args[0] == "--" {
		return args[1:]
	}
	return args
}

func fakeVerb(prog string, args []string) string {
	if prog == "systemctl" {
		for len(args) > 0 && args[0] == "--user" {
			args = args[1:]
		}
	}
	if len(args) == 0 {
		return ""
	}
	if prog == "podman" && (args[0] == "image" || args[0] == "container") && len(args) > 1 {
		return args[0] + "-" + args[1]
	}
	return args[0]
}

// activeUnit is what "systemctl show" prints when the test set no unit.state; failedUnit is a
// unit whose main process exited with an error.
const (
	activeUnit = "ActiveState=active\nSubState=running\nResult=success\nNRestarts=0\nMainPID=4242\nLoadState=loaded\n"
	failedUnit = "ActiveState=failed\nSubState=failed\nResult=exit-code\nNRestarts=0\nMainPID=0\nLoadState=loaded\nExecMainStatus=1\nExecMainCode=1\n"
)

// runFake is the whole fake podman / systemctl. Scripted files win over the built-in behaviour:
//
//	<key>.sleep   a Go duration slept first; <key>.woke is created after it
//	<key>.fails   fail (exit 1) this many more times
//	<key>.exit, <key>.stdout, <key>.stderr   print these and exit with that status (default 0)
//
// where key is "<prog>-<verb>". Built in: pull moves image.next into image.id; image inspect
// prints image.id ("image not known" when empty); tag sets image.id to its source; healthcheck
// reports no healthcheck (125); systemctl show prints unit.state; the Nth restart copies
// restart.after.N into unit.state and ps.after.N into podman-ps.stdout.
func runFake(prog, env, dir string, args []string) int {
	if dir == "" {
		fmt.Fprintf(os.Stderr, "fake %s: %s is not set\n", prog, env)
		return 127
	}
	if len(args) == 1 && args[0] == "fake-ping" {
		fmt.Printf("fake %s\n", prog)
		return 0
	}
	file := func(name string) string { return filepath.Join(dir, name) }
	read := func(name string) string {
		b, _ := os.ReadFile(file(name))
		return string(b)
	}
	write := func(name, s string) { os.WriteFile(file(name), []byte(s), 0o600) }
	exists := func(name string) bool { _, err := os.Stat(file(name)); return err == nil }
	number := func(name string) int { n, _ := strconv.Atoi(strings.TrimSpace(read(name))); return n }

	line, _ := json.Marshal(append([]string{prog}, args...))
	if f, err := os.OpenFile(file("argv.log"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600); err == nil {
		f.Write(append(line, '\n'))
		f.Close()
	}
	key := prog + "-" + fakeVerb(prog, args)
	n := number(key+".count") + 1
	write(key+".count", strconv.Itoa(n))

	if d, err := time.ParseDuration(strings.TrimSpace(read(key + ".sleep"))); err == nil {
		time.Sleep(d)
		write(key+".woke", "")
	}
	if left := number(key + ".fails"); left > 0 {
		write(key+".fails", strconv.Itoa(left-1))
		fmt.Fprintf(os.Stderr, "Error: scripted failure of %s\n", key)
		return 1
	}
	if exists(key+".exit") || exists(key+".stdout") || exists(key+".stderr") {
		fmt.Print(read(key + ".stdout"))
		fmt.Fprint(os.Stderr, read(key+".stderr"))
		return number(key + ".exit")
	}
	switch key {
	case "podman-pull":
		if next := strings.TrimSpace(read("image.next")); next != "" {
			write("image.id", next)
			os.Remove(file("image.next"))
		}
		fmt.Println(strings.TrimSpace(read("image.id")))
	case "podman-image-inspect":
		if slices.ContainsFunc(args, func(a string) bool { return strings.Contains(a, ".Digest") }) {
			fmt.Println("sha256:" + strings.Repeat("d", 64))
			return 0
		}
		id := strings.TrimSpace(read("image.id"))
		if id == "" {
			fmt.Fprintf(os.Stderr, "Error: %s: image not known\n", args[len(args)-1])
			return 125
		}
		fmt.Println(id)
	case "podman-tag":
		if a := argsAfterDashes(args[1:]); len(a) > 0 {
			write("image.id", a[0])
		}
	case "podman-healthcheck":
		fmt.Fprintln(os.Stderr, "Error: container has no defined healthcheck")
		return 125
	case "systemctl-show":
		state := read("unit.state")
		if state == "" {
			state = activeUnit
		}
		// A redeploy's transient unit exists only once the fake systemd-run has started it.
		if last := args[len(args)-1]; strings.HasPrefix(last, "webhook-task-") {
			state = "LoadState=not-found\nActiveState=inactive\nSubState=dead\n"
			if exists("started." + strings.TrimSuffix(last, ".service")) {
				state = activeUnit
			}
		}
		fmt.Print(state)
	case keySystemdRun:
		for _, a := range args {
			if name, ok := strings.CutPrefix(a, "--unit="); ok {
				write("started."+name, "")
			}
		}
	case "systemctl-restart":
		if s := read(fmt.Sprintf("restart.after.%d", n)); s != "" {
			write("unit.state", s)
		}
		if s := read(fmt.Sprintf("ps.after.%d", n)); s != "" {
			write("podman-ps.stdout", s)
		}
	}
	return 0
}

// psJSON is podman ps --format json listing one container of image (its ID), created at created.
func psJSON(id, imageID string, created int64, state, status string, image ...string) string {
	b, _ := json.Marshal([]map[string]any{{"Id": id, "ImageID": imageID, "Image": strings.Join(image, ""), "State": state,
		"Status": status, "Created": created, "ExitCode": 0}})
	return string(b) + "\n"
}

// fakeHost is the state directory of the fakes for one test.
type fakeHost struct {
	t   *testing.T
	dir string
}

// newFakeHost puts fake podman and systemctl alone on PATH and checks that they answer.
func newFakeHost(t *testing.T) *fakeHost {
	t.Helper()
	bin := installFakes(t, "podman", "systemctl")
	dir := t.TempDir()
	t.Setenv("PATH", bin)
	t.Setenv(fakePodmanDirEnv, dir)
	t.Setenv(fakeSystemctlDirEnv, dir)
	for _, prog := range []string{"podman", "systemctl"} {
		out, err := exec.Command(prog, "fake-ping").Output()
		if err != nil || strings.TrimSpace(string(out)) != "fake "+prog {
			t.Fatalf("%s on PATH is not this file's fake (output %q, %v): did another test file replace fakePrograms[%q]?", prog, out, err, prog)
		}
	}
	return &fakeHost{t: t, dir: dir}
}

// newFakeHostFiles is newFakeHost with the scripting files (name → content) already written.
func newFakeHostFiles(t *testing.T, files map[string]string) *fakeHost {
	t.Helper()
	h := newFakeHost(t)
	for name, content := range files {
		h.set(name, content)
	}
	return h
}

func (h *fakeHost) set(name, content string) {
	h.t.Helper()
	if err := os.WriteFile(filepath.Join(h.dir, name), []byte(content), 0o600); err != nil {
		h.t.Fatal(err)
	}
}

func (h *fakeHost) has(name string) bool {
	_, err := os.Stat(filepath.Join(h.dir, name))
	return err == nil
}

func (h *fakeHost) read(name string) string {
	b, _ := os.ReadFile(filepath.Join(h.dir, name))
	return strings.TrimSpace(string(b))
}

// calls returns the argv of every fake call so far, in order.
func (h *fakeHost) calls() [][]string {
	h.t.Helper()
	data, err := os.ReadFile(filepath.Join(h.dir, "argv.log"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		h.t.Fatal(err)
	}
	var out [][]string
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		if line == "" {
			continue
		}
		var argv []string
		if err := json.Unmarshal([]byte(line), &argv); err != nil {
			h.t.Fatalf("argv.log line %q: %v", line, err)
		}
		out = append(out, argv)
	}
	return out
}

// callsOf returns the calls of one "<prog>-<verb>" key.
func (h *fakeHost) callsOf(key string) [][]string {
	var out [][]string
	for _, c := range h.calls() {
		if c[0]+"-"+fakeVerb(c[0], c[1:]) == key {
			out = append(out, c)
		}
	}
	return out
}

func fakeCallLines(calls [][]string) string {
	var b strings.Builder
	for _, c := range calls {
		b.WriteString("  " + strings.Join(c, " ") + "\n")
	}
	return b.String()
}

// wantCalls checks the exact argv of every call of one fake subcommand.
func wantCalls(t *testing.T, h *fakeHost, key string, want ...[]string) {
	t.Helper()
	got := h.callsOf(key)
	ok := len(got) == len(want)
	for i := 0; ok && i < len(got); i++ {
		ok = slices.Equal(got[i], want[i])
	}
	if !ok {
		t.Errorf("%s calls:\n%swant:\n%s", key, fakeCallLines(got), fakeCallLines(want))
	}
}

// newFakeHostWithRun is newFakeHost plus the fake systemd-run on PATH, recording into the same
// state directory. It returns the PATH that holds the three fakes.
func newFakeHostWithRun(t *testing.T) (*fakeHost, string) {
	t.Helper()
	h := newFakeHost(t)
	path := installFakes(t, "systemd-run") + string(os.PathListSeparator) + os.Getenv("PATH")
	t.Setenv("PATH", path)
	t.Setenv(fakeSystemdRunDirEnv, h.dir)
	return h, path
}

// pullInterval is one recorded pull.
type pullInterval struct{ start, end, pid int64 }

// readPullIntervals reads what the fake podman recorded, sorted by start.
func readPullIntervals(t *testing.T, path string) []pullInterval {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var out []pullInterval
	for _, line := range strings.Fields(strings.ReplaceAll(string(data), " ", ",")) {
		var p pullInterval
		if _, err := fmt.Sscanf(line, "%d,%d,%d", &p.start, &p.end, &p.pid); err != nil {
			t.Fatalf("pull interval %q: %v", line, err)
		}
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b pullInterval) int { return cmp.Compare(a.start, b.start) })
	return out
}

// overlapping returns the first pair of recorded pulls that overlapped, or nil.
func overlapping(ps []pullInterval) []pullInterval {
	for i := 1; i < len(ps); i++ {
		if ps[i].start < ps[i-1].end {
			return ps[i-1 : i+1]
		}
	}
	return nil
}

var (
	oldImageID   = strings.Repeat("a", 64)
	otherImageID = strings.Repeat("c", 64)
	newImageID   = strings.Repeat("b", 64)
)

// The fake systemctl records its argv, one line per call, to the file named by
// fakeSystemctlLogEnv, and fails (exit 1, with a systemd-like message on stderr) for the units
// listed in fakeSystemctlFailEnv.
const (
	fakeSystemctlLogEnv  = "WAU_FAKE_SYSTEMCTL_LOG"
	fakeSystemctlFailEnv = "WAU_FAKE_SYSTEMCTL_FAIL"
)

func fakeSystemctl() int {
	args := os.Args[1:]
	if p := os.Getenv(fakeSystemctlLogEnv); p != "" {
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			fmt.Fprintln(os.Stderr, "fake systemctl:", err)
			return 99
		}
		fmt.Fprintln(f, strings.Join(args, " "))
		f.Close()
	}
	if len(args) == 0 {
		return 0
	}
	unit := args[len(args)-1]
	for _, u := range splitList(os.Getenv(fakeSystemctlFailEnv)) {
		if u == unit {
			fmt.Fprintf(os.Stderr, "Job for %s failed because the control process exited with error code.\nSee \"systemctl --user status %s\" for details.\n", unit, unit)
			return 1
		}
	}
	return 0
}

// the in-process server and its configuration

// hangGuard bounds waits that only end early when the code is broken; it is never a measurement.
const hangGuard = 30 * time.Second

// mapEnv is a getenv over a fixed map.
func mapEnv(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

// testConfig loads the configuration from env and finishes it as cmdServer does, with the state
// directory in a temp dir unless env names one.
func testConfig(t testing.TB, env map[string]string) *config {
	t.Helper()
	// Tests count rows request by request; TestStrangersCostBounded tests the summary.
	full := map[string]string{"WEBHOOK_STATE_DIR": t.TempDir(), "WEBHOOK_REFUSED_ROWS_PER_MINUTE": "1000000"}
	for k, v := range env {
		full[k] = v
	}
	cfg, err := loadConfig(mapEnv(full))
	if err != nil {
		t.Fatalf("loadConfig: %v", err)
	}
	if err := cfg.finish(); err != nil {
		t.Fatalf("finish: %v", err)
	}
	return cfg
}

// testServer is a server on an httptest listener with its event log.
type testServer struct {
	*httptest.Server
	srv    *server
	cfg    *config
	events *eventLog
	logs   *syncBuffer
	closed bool
}

// newTestServer builds the server of cmdServer from env, with the state directory in a temp dir.
// edit may change the configuration before the server is built.
func newTestServer(t testing.TB, env map[string]string, edit func(cfg *config)) *testServer {
	t.Helper()
	cfg := testConfig(t, env)
	if edit != nil {
		edit(cfg)
	}
	logs := &syncBuffer{}
	lg := newLogger(logs)
	events, err := openEventLog(cfg.dbPath, lg)
	if err != nil {
		t.Fatalf("openEventLog: %v", err)
	}
	srv := newServer(cfg, lg, events)
	hs := httptest.NewUnstartedServer(srv)
	hs.Config = newHTTPServer(cfg, srv, lg) // cmdServer's settings, header bound included
	hs.Start()
	ts := &testServer{Server: hs, srv: srv, cfg: cfg, events: events, logs: logs}
	t.Cleanup(ts.shutdown)
	return ts
}

// shutdown stops the server after every request finished, then flushes the event log, as
// cmdServer does.
func (ts *testServer) shutdown() {
	if ts.closed {
		return
	}
	ts.closed = true
	ts.Server.Close()
	ts.srv.flushSummaries(true)
	ts.events.Close()
}

// probeCount adds up the probes counted by the probe-summary rows.
func probeCount(t *testing.T, rows map[string]eventRow) int {
	t.Helper()
	n := 0
	for _, r := range rows {
		if r.action != "probe-summary" {
			continue
		}
		var meta struct{ Count int }
		if err := json.Unmarshal([]byte(r.meta), &meta); err != nil {
			t.Fatal(err)
		}
		n += meta.Count
	}
	return n
}

// drain runs the dispatcher until nothing is due, as its goroutine does after a wake-up, so a
// test sees every queued task started (or retried) when drain returns.
func (ts *testServer) drain(t testing.TB) {
	t.Helper()
	for i := 0; ts.srv.dispatchNext(context.Background()) == 0; i++ {
		if i == 10000 {
			t.Fatal("the dispatcher never ran out of work")
		}
	}
}

// do sends one request through a real client and returns the response and its body.
func (ts *testServer) do(t *testing.T, method, path string, body io.Reader) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, ts.URL+path, body)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := ts.Client().Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading the body: %v", method, path, err)
	}
	return resp, string(b)
}

// raw writes a request line by hand, so the path reaches the server exactly as written (Go's
// client would clean it), and reads the response.
func (ts *testServer) raw(t *testing.T, method, target string) (*http.Response, string) {
	t.Helper()
	c, err := net.Dial("tcp", ts.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(hangGuard))
	if _, err := fmt.Fprintf(c, "%s %s HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n", method, target); err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(method, "http://test/", nil)
	resp, err := http.ReadResponse(bufio.NewReader(c), req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, target, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// rows closes the server and returns the event_log rows by request id.
func (ts *testServer) rows(t *testing.T) map[string]eventRow {
	t.Helper()
	ts.shutdown()
	return ts.rowsSoFar(t)
}

// rowsSoFar returns the event_log rows by request id with the server still running: the rows of
// the requests answered so far (a delivery is answered after its row is committed).
func (ts *testServer) rowsSoFar(t *testing.T) map[string]eventRow {
	t.Helper()
	out := map[string]eventRow{}
	for _, r := range readRows(t, rawDB(t, ts.cfg.dbPath), "") {
		if _, dup := out[r.requestID]; dup && r.method != "QUEUE" { // the rows of one dispatch share an id
			t.Errorf("request id %s has two rows", r.requestID)
		}
		out[r.requestID] = r
	}
	return out
}

// deliveryRows are the rows of a delivery, oldest first.
func (ts *testServer) deliveryRows(t *testing.T, delivery string) []storedEvent {
	t.Helper()
	waitPending(t, ts.events)
	evs, err := queryEvents(context.Background(), ts.events.db, eventFilter{delivery: delivery, afterID: -1})
	if err != nil {
		t.Fatal(err)
	}
	return evs
}

// runCLI runs the whole program in-process. A server that fails to exit is a test failure,
// not a hang.
func runCLI(t *testing.T, env map[string]string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb syncBuffer
	done := make(chan int, 1)
	go func() { done <- run(args, mapEnv(env), &out, &errb) }()
	select {
	case code = <-done:
	case <-time.After(hangGuard):
		t.Fatalf("run(%q) did not return; stderr:\n%s", args, errb.String())
	}
	return code, out.String(), errb.String()
}

// obsClient bounds every request of these tests; a hang is a failure, not a measurement.
var obsClient = &http.Client{Timeout: hangGuard}

// obsGet sends a GET with headers to the test server.
func obsGet(t *testing.T, ts *testServer, target string, hdr map[string]string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest("GET", ts.URL+target, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := obsClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", target, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(b)
}

// obsGetJSON sends a GET with the header name: value (none if value is empty) and decodes the
// answer, which must be JSON with Content-Type application/json. It returns the status, the
// decoded body and the raw body.
func obsGetJSON[T any](t *testing.T, ts *testServer, target, name, value string) (int, T, string) {
	t.Helper()
	hdr := map[string]string{}
	if value != "" {
		hdr[name] = value
	}
	resp, body := obsGet(t, ts, target, hdr)
	var v T
	if err := json.Unmarshal([]byte(body), &v); err != nil {
		t.Fatalf("GET %s: %d, body %q is not JSON: %v", target, resp.StatusCode, body, err)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("GET %s: Content-Type %q", target, ct)
	}
	return resp.StatusCode, v, body
}

// payloads, signatures and the invariants of what parses them

// payloadEdit sets one dotted path of a JSON payload to value, or deletes it when drop is set.
type payloadEdit struct {
	path  string
	value any
	drop  bool
}

func setField(path string, v any) payloadEdit { return payloadEdit{path: path, value: v} }
func dropField(path string) payloadEdit       { return payloadEdit{path: path, drop: true} }

// loadPayload reads testdata/payloads/<name> and applies edits.
func loadPayload(t *testing.T, name string, edits ...payloadEdit) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", "payloads", name))
	if err != nil {
		t.Fatal(err)
	}
	if len(edits) == 0 {
		return data
	}
	var doc map[string]any
	if err := json.Unmarshal(data, &doc); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	for _, e := range edits {
		parts := strings.Split(e.path, ".")
		m := doc
		for _, p := range parts[:len(parts)-1] {
			next, ok := m[p].(map[string]any)
			if !ok {
				t.Fatalf("%s: no object at %q of %s", name, p, e.path)
			}
			m = next
		}
		if e.drop {
			delete(m, parts[len(parts)-1])
		} else {
			m[parts[len(parts)-1]] = e.value
		}
	}
	out, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

const (
	digestV1       = "sha256:ec68d7c2581952ba5cec6a35581e19ff826cc2c6a3d7e70a577fc1f3fde96175"
	digestV2       = "sha256:4cb489d904a289e570cfb53d545a9ed23477eadff1d4a8f0a6d3a8177aac679a"
	digestPlatform = "sha256:88c7275ef3ef13f6eb8bf6a201c972557ab952d4d6ebe115ca80d40a1c9b64c3"
)

const manifestV2 = "application/vnd.docker.distribution.manifest.v2+json"

// distEvent is one Distribution notification event, laid out as registry:2 sends it.
func distEvent(id, action, mediaType, repo, tag, host string) map[string]any {
	return map[string]any{"id": id, "timestamp": "2026-11-27T10:00:00Z", "action": action,
		"target": map[string]any{"mediaType": mediaType, "size": 528, "digest": digestV1, "length": 528, "repository": repo,
			"url": "http://" + host + "/v2/" + repo + "/manifests/" + digestV1, "tag": tag},
		"request": map[string]any{"id": "r1", "addr": "127.0.0.1:40000", "host": host, "method": "PUT", "useragent": "containers/5.23"},
		"actor":   map[string]any{}, "source": map[string]any{"addr": "box:5000", "instanceID": "i1"}}
}

// distEnvelope is a Distribution notification envelope of events.
func distEnvelope(events ...map[string]any) []byte {
	b, _ := json.Marshal(map[string]any{"events": events})
	return b
}

// withAction returns a package payload with its action replaced ("" drops it).
func withAction(body []byte, action string) []byte {
	var p map[string]any
	json.Unmarshal(body, &p)
	if action == "" {
		delete(p, "action")
	} else {
		p["action"] = action
	}
	b, _ := json.Marshal(p)
	return b
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

// hubSignature is GitHub's X-Hub-Signature-256 value for body under secret.
func hubSignature(secret string, body []byte) string {
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write(body)
	return "sha256=" + hex.EncodeToString(mac.Sum(nil))
}

// checkRefInvariants holds for every accepted reference: it round-trips through String, and
// what reaches argv can be neither a flag nor a transport.
func checkRefInvariants(t *testing.T, r imageRef) {
	t.Helper()
	s := r.String()
	again, err := parseImageRef(s)
	if err != nil || again != r {
		t.Errorf("round trip of %q: %+v, %v; want %+v", s, again, err, r)
	}
	if strings.HasPrefix(s, "-") || strings.Contains(s, "://") || strings.ContainsAny(s, " \t\r\n\x00") {
		t.Errorf("accepted reference %q could be read as a flag, a transport or two arguments", s)
	}
	if r.tag == "" && r.digest == "" {
		t.Errorf("accepted reference %q names neither a tag nor a digest", s)
	}
}

// checkUnitInvariants holds for every name this program may hand to systemctl.
func checkUnitInvariants(t *testing.T, from, u string) {
	t.Helper()
	if err := validUnitName(u); err != nil {
		t.Fatalf("%q was accepted as %q, which validUnitName refuses: %v", from, u, err)
	}
	if strings.HasPrefix(u, "-") || !strings.HasSuffix(u, ".service") || len(u) > maxUnitNameLen {
		t.Errorf("%q was accepted as %q: a flag, not a service, or too long", from, u)
	}
	if strings.ContainsAny(u, "*?[]/\\ \t\r\n\x00%\"'$;|&") {
		t.Errorf("%q was accepted as %q, which holds a glob, path, quote or control character", from, u)
	}
	if again, err := resolveUnit(u); err != nil || again != u {
		t.Errorf("resolveUnit(%q) = %q, %v: a resolved name must resolve to itself", u, again, err)
	}
}

// logs, event_log rows and state files

// syncBuffer is a bytes.Buffer safe to read while the writer goroutine may log.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// dirWithFile returns a fresh directory and a regular file in it, for paths that must fail
// because a file stands where a directory should.
func dirWithFile(t *testing.T) (dir, file string) {
	t.Helper()
	dir = t.TempDir()
	file = filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	return dir, file
}

// rawDB opens the database file directly, as another process would, independent of eventlog.go.
func rawDB(t *testing.T, path string) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func queryInt(t *testing.T, db *sql.DB, query string, args ...any) int {
	t.Helper()
	var n int
	if err := db.QueryRow(query, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	return n
}

// eventRow is an event_log row as stored.
type eventRow struct {
	id         int64
	requestID  string
	ts         int64
	method     string
	path       sql.NullString
	status     int
	action     string
	durationMS int64
	meta       string
	createdAt  int64
}

// scanRows is the query-and-scan loop of every reader of event_log and github_deliveries rows: it
// runs query against db and calls scan for each row, in order. A failed query fails the test, and
// so does an error scan returns; a reader that tolerates a bad row (a poll of a log still being
// written) ignores the error inside scan and returns nil. With checkEnd, an error that ends the
// rows early fails the test too; without it the reader sees a short read, as a poll that simply
// looks again wants.
func scanRows(t testing.TB, db *sql.DB, checkEnd bool, query string, args []any, scan func(*sql.Rows) error) {
	t.Helper()
	rows, err := db.Query(query, args...)
	if err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	defer rows.Close()
	for rows.Next() {
		if err := scan(rows); err != nil {
			t.Fatal(err)
		}
	}
	if err := rows.Err(); checkEnd && err != nil {
		t.Fatal(err)
	}
}

// scanMeta scans a row whose last column is a meta JSON object into dest and meta; a meta that is
// not JSON is an error only when strict.
func scanMeta(rows *sql.Rows, strict bool, meta *map[string]any, dest ...any) error {
	var js string
	if err := rows.Scan(append(dest, &js)...); err != nil {
		return err
	}
	if err := json.Unmarshal([]byte(js), meta); err != nil && strict {
		return fmt.Errorf("meta %q: %v", js, err)
	}
	return nil
}

func readRows(t *testing.T, db *sql.DB, where string, args ...any) []eventRow {
	t.Helper()
	var out []eventRow
	scanRows(t, db, true, `SELECT id, request_id, ts, method, path, status, action, duration_ms, meta, created_at
		FROM event_log `+where+` ORDER BY id`, args, func(rows *sql.Rows) error {
		var r eventRow
		if err := rows.Scan(&r.id, &r.requestID, &r.ts, &r.method, &r.path, &r.status, &r.action,
			&r.durationMS, &r.meta, &r.createdAt); err != nil {
			return err
		}
		out = append(out, r)
		return nil
	})
	return out
}

// actionRow is an event_log row as the tests of this file read it.
type actionRow struct {
	Method string
	Path   string
	Status int
	Action string
	Meta   map[string]any
}

// actionRows reads the rows of one action (all rows when action is "") from a database file.
func actionRows(t *testing.T, dbPath, action string) []actionRow {
	t.Helper()
	db, err := sql.Open("sqlite", dbPath)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var out []actionRow
	scanRows(t, db, false, `SELECT method, COALESCE(path, ''), status, action, meta FROM event_log
		WHERE ? = '' OR action = ? ORDER BY id`, []any{action, action}, func(rows *sql.Rows) error {
		var r actionRow
		if err := scanMeta(rows, true, &r.Meta, &r.Method, &r.Path, &r.Status, &r.Action); err != nil {
			return err
		}
		out = append(out, r)
		return nil
	})
	return out
}

// spilled parses the JSON events a logger printed after a failed write.
func spilled(t *testing.T, logs string) []map[string]any {
	t.Helper()
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(logs))
	for sc.Scan() {
		line := sc.Text()
		_, js, ok := strings.Cut(line, "unwritten event: ")
		if !ok {
			continue
		}
		if !strings.HasPrefix(line, "<4>") {
			t.Errorf("spilled event without the warning priority: %q", line)
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(js), &m); err != nil {
			t.Fatalf("spilled event is not one JSON object: %q: %v", js, err)
		}
		out = append(out, m)
	}
	return out
}

// seedRetention writes, 40 days old, 1500 request rows (more than one delete batch) and one row
// each of a redeploy task, a CLI trigger and a scheduler tick, and 3 request rows of yesterday.
func seedRetention(t *testing.T, dbPath string) {
	t.Helper()
	events, err := openEventLog(dbPath, newLogger(io.Discard))
	if err != nil {
		t.Fatal(err)
	}
	defer events.Close()
	old, recent := time.Now().Add(-40*24*time.Hour), time.Now().Add(-24*time.Hour)
	var evs []event
	for i := range 1500 {
		evs = append(evs, event{RequestID: fmt.Sprint("old-", i), TS: old, Method: "POST", Path: "/x", Status: 401, Action: "github-webhook"})
	}
	for _, m := range []string{"TASK", "CLI", "SCHEDULER"} {
		evs = append(evs, event{RequestID: "old-" + m, TS: old, Method: m, Status: 200, Action: "kept"})
	}
	for i := range 3 {
		evs = append(evs, event{RequestID: fmt.Sprint("new-", i), TS: recent, Method: "GET", Status: 200, Action: "health"})
	}
	if err := events.Write(context.Background(), evs...); err != nil {
		t.Fatal(err)
	}
}

// holdFlock takes an exclusive flock on path through a separate open file description (so it
// conflicts with any other open of the file, in this process too) and returns its release.
func holdFlock(t *testing.T, path string) (release func()) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		t.Fatalf("flock %s: %v", path, err)
	}
	done := false
	release = func() {
		if !done {
			done = true
			f.Close()
		}
	}
	t.Cleanup(release)
	return release
}

func randomName(t *testing.T) string {
	t.Helper()
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b[:])
}

// waits

// waitFor polls cond until it holds, failing the test after hangGuard.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(hangGuard)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// hostExclusive holds the host-wide flock named name until t ends. A test that loads the
// machine on purpose (hundreds of processes at once) takes it, so two test runs on one host take
// turns at it instead of each meeting the other's load on top of its own: on 2 vCPUs, two such
// bursts at once left deliveries unanswered after a minute. The wait is bounded, and says who
// it waited for.
func hostExclusive(t *testing.T, name string) {
	t.Helper()
	path := filepath.Join(os.TempDir(), "webhook-auto-update-test-"+name+".lock")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o666)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	deadline := time.Now().Add(20 * hangGuard)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) || time.Now().After(deadline) {
			t.Fatalf("flock %s (held by another test run's %s for %s?): %v", path, name, 20*hangGuard, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitPending waits until the event log's writer has handled everything queued.
func waitPending(t *testing.T, l *eventLog) {
	t.Helper()
	deadline := time.Now().Add(hangGuard)
	for l.pending.Load() > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d events still queued after %s", l.pending.Load(), hangGuard)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// the built binary

var (
	binaryOnce sync.Once
	binaryDir  string
	binaryPath string
	binaryErr  error
)

// buildBinary builds webhook-auto-update once per test binary and returns its
// path; TestMain removes it.
func buildBinary(t *testing.T) string {
	t.Helper()
	binaryOnce.Do(func() {
		goBin, err := exec.LookPath("go")
		if err != nil {
			goBin = filepath.Join(os.Getenv("GOROOT"), "bin", "go")
			if _, err := os.Stat(goBin); err != nil {
				binaryErr = errors.New("go not found on PATH or in $GOROOT/bin")
				return
			}
		}
		if binaryDir, binaryErr = os.MkdirTemp("", "webhook-bin-"); binaryErr != nil {
			return
		}
		// The rig's user runs the binary too; the marker lets rigSweep remove
		// the directory if this process dies before TestMain does.
		if binaryErr = os.Chmod(binaryDir, 0o755); binaryErr != nil {
			return
		}
		if binaryErr = rigWriteOwner(binaryDir); binaryErr != nil {
			return
		}
		p := filepath.Join(binaryDir, "webhook-auto-update")
		if _, binaryErr = rigRun(5*time.Minute, goBin, "build", "-buildvcs=false", "-o", p, "."); binaryErr == nil {
			binaryPath = p
		}
	})
	if binaryErr != nil {
		t.Fatalf("build webhook-auto-update: %v", binaryErr)
	}
	return binaryPath
}

// buildServerBinary is the binary built once per test run (buildBinary in main_test.go); -short
// skips the tests that need it.
func buildServerBinary(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds the binary")
	}
	return buildBinary(t)
}

// freeLoopbackAddr returns a loopback address that was free a moment ago.
func freeLoopbackAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// serverProc is a started server process whose stderr is collected line by line.
type serverProc struct {
	cmd   *exec.Cmd
	errb  syncBuffer
	lines chan string
	done  chan error
	err   error
	once  sync.Once
}

// startServerProc starts argv (the binary, or a wrapper running it) with a clean environment plus env.
func startServerProc(t *testing.T, bin string, args, env []string, files []*os.File) *serverProc {
	t.Helper()
	return startProc(t, exec.Command(bin, append([]string{"server"}, args...)...), env, files)
}

func startProc(t *testing.T, cmd *exec.Cmd, env []string, files []*os.File) *serverProc {
	t.Helper()
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir()}, env...)
	cmd.ExtraFiles = files
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &serverProc{cmd: cmd, lines: make(chan string, 1000), done: make(chan error, 1)}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			p.errb.Write([]byte(sc.Text() + "\n"))
			select {
			case p.lines <- sc.Text():
			default:
			}
		}
		p.done <- cmd.Wait()
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			cmd.Process.Kill()
			p.wait()
		}
	})
	return p
}

func (p *serverProc) stderr() string { return p.errb.String() }

// wait returns the exit error of the process, failing loudly only through the caller.
func (p *serverProc) wait() error {
	p.once.Do(func() {
		select {
		case p.err = <-p.done:
		case <-time.After(hangGuard):
			p.cmd.Process.Kill()
			p.err = fmt.Errorf("did not exit after %s: %w", hangGuard, <-p.done)
		}
	})
	return p.err
}

// waitLog waits for a stderr line containing s.
func (p *serverProc) waitLog(t *testing.T, s string) string {
	t.Helper()
	timeout := time.After(hangGuard)
	for {
		select {
		case line := <-p.lines:
			if strings.Contains(line, s) {
				return line
			}
		case <-timeout:
			t.Fatalf("no log line with %q; stderr:\n%s", s, p.stderr())
		}
	}
}
