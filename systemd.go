// systemd.go owns what talks to systemd and starts programs: socket activation, sd_notify, unit
// names and lookups, systemctl, the dispatcher of queued redeploys (systemd-run) and the units'
// policies it applies to every claim (policyHold), runCommand and the health gate (it fails at the
// look that sees a failure). No child inherits the activation and notify variables, passed fds or
// a secret; a unit name in systemctl's argv passed validUnitName and follows "--". One dispatcher
// goroutine consumes the durable queue, so it needs no lock; a claim only wakes it.
package main

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"
)

var firstListenFD = 3 // SD_LISTEN_FDS_START, a variable so that a test can hand in a listener's fd

// activationListeners returns the sockets systemd passed to this process, as sd_listen_fds(3).
func activationListeners(getenv func(string) string) ([]net.Listener, error) {
	pidText, fdsText, namesText := getenv("LISTEN_PID"), getenv("LISTEN_FDS"), getenv("LISTEN_FDNAMES")
	for _, v := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
		os.Unsetenv(v)
	}
	if pid, err := strconv.Atoi(pidText); err != nil || pid != os.Getpid() || fdsText == "" {
		return nil, nil
	}
	n, err := strconv.Atoi(fdsText)
	if err != nil || n < 0 {
		return nil, fmt.Errorf("invalid LISTEN_FDS=%q from systemd", fdsText)
	}
	names := append(strings.Split(namesText, ":"), make([]string, n)...)
	var ls []net.Listener
	for i := range n {
		fd := firstListenFD + i
		syscall.CloseOnExec(fd)
		name := cmp.Or(names[i], "LISTEN_FD_"+strconv.Itoa(fd))
		f := os.NewFile(uintptr(fd), name)
		l, err := net.FileListener(f) // duplicates the fd
		f.Close()
		if err != nil {
			for _, l := range ls {
				l.Close()
			}
			return nil, fmt.Errorf("socket-activated fd %d (%s) is not a listening socket: %w", fd, name, err)
		}
		ls = append(ls, l)
	}
	return ls, nil
}

// notifier sends sd_notify datagrams to $NOTIFY_SOCKET; the zero value does nothing.
type notifier struct {
	conn     *net.UnixConn
	watchdog time.Duration
}

func newNotifier(getenv func(string) string) (*notifier, error) {
	path, usec, wpid := getenv("NOTIFY_SOCKET"), getenv("WATCHDOG_USEC"), getenv("WATCHDOG_PID")
	for _, v := range []string{"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} {
		os.Unsetenv(v)
	}
	n := &notifier{}
	if path == "" {
		return n, nil
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return n, fmt.Errorf("cannot connect to NOTIFY_SOCKET %s: %w", path, err)
	}
	n.conn = conn
	us, err := strconv.ParseInt(usec, 10, 64)
	if pid, perr := strconv.Atoi(wpid); err == nil && us > 0 && (wpid == "" || perr == nil && pid == os.Getpid()) {
		n.watchdog = time.Duration(us) * time.Microsecond
	}
	return n, nil
}

func (n *notifier) notify(state string) error {
	if n == nil || n.conn == nil {
		return nil
	}
	_, err := n.conn.Write([]byte(state))
	return err
}

func (n *notifier) runWatchdog(ctx context.Context, lg *logger) {
	if n == nil || n.conn == nil || n.watchdog <= 0 {
		return
	}
	t := time.NewTicker(n.watchdog / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := n.notify("WATCHDOG=1"); err != nil {
				lg.warnf("watchdog notification failed: %v", err)
			}
		}
	}
}

func (n *notifier) Close() {
	if n != nil && n.conn != nil {
		n.conn.Close()
	}
}

const maxUnitNameLen = 255 // UNIT_NAME_MAX from systemd's unit-name.h

var reUnitName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9:_.@-]*\.service$`)

// validUnitName accepts systemd.unit(5) service names: no escapes, globs, leading "-" or bare template.
func validUnitName(name string) error {
	switch {
	case name == "":
		return errors.New("empty unit name")
	case len(name) > maxUnitNameLen:
		return fmt.Errorf("unit name is %d bytes long, more than %d", len(name), maxUnitNameLen)
	case !reUnitName.MatchString(name):
		return fmt.Errorf("invalid unit name %q: want letters, digits and :_.@- ending in .service", name)
	case strings.Contains(name, "@.service"):
		return fmt.Errorf("invalid unit name %q: a template needs an instance (name@instance.service)", name)
	}
	return nil
}

// resolveUnit reads "foo", "foo/redeploy" and "github-package-update/foo" as "foo.service".
func resolveUnit(id string) (string, error) {
	u := strings.TrimSuffix(strings.TrimPrefix(strings.TrimPrefix(strings.TrimSpace(id), "/"), "github-package-update/"), "/redeploy")
	if u != "" && !strings.HasSuffix(u, ".service") {
		u += ".service"
	}
	if err := validUnitName(u); err != nil {
		return "", err
	}
	return u, nil
}

func systemctl(ctx context.Context, cfg *config, args ...string) cmdResult {
	return runCommand(ctx, cfg.commandTimeout, append([]string{"systemctl", "--user"}, args...)...)
}

func restartUnit(ctx context.Context, cfg *config, unit string) cmdResult {
	return stillRunning(ctx, cfg, unit, systemctl(ctx, cfg, "restart", "--", unit))
}

func startUnit(ctx context.Context, cfg *config, unit string) cmdResult {
	return stillRunning(ctx, cfg, unit, systemctl(ctx, cfg, "start", "--", unit))
}

// stillRunning counts a systemctl killed at its time limit while the unit's job goes on as a success.
func stillRunning(ctx context.Context, cfg *config, unit string, res cmdResult) cmdResult {
	if !res.timedOut {
		return res
	}
	s, err := sampleUnit(context.WithoutCancel(ctx), cfg, unit)
	if err != nil || !slices.Contains([]string{"activating", "active", "reloading"}, s.activeState) {
		return res
	}
	res.err, res.note = nil, fmt.Sprintf("systemctl stopped waiting after %s; %s is %s/%s and systemd carries on", cfg.commandTimeout, unit, s.activeState, s.subState)
	return res
}

func showUnit(ctx context.Context, cfg *config, unit string, props ...string) (map[string]string, error) {
	args := []string{"show"}
	for _, p := range props {
		args = append(args, "-p", p)
	}
	res := systemctl(ctx, cfg, append(args, "--", unit)...)
	if res.err != nil {
		return nil, res.err
	}
	out := map[string]string{}
	for _, line := range strings.Split(res.stdout, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			out[k] = v
		}
	}
	return out, nil
}

const (
	unitLookupTTL     = 2 * time.Second // a burst of deliveries shares a lookup; a change is seen in seconds
	unitLookupTimeout = 5 * time.Second
	maxUnitLookups    = 1024 // past it, the cache is emptied rather than kept forever
)

// unitLookups caches inspectUnit's Quadlet file per unit; callers of a refreshing entry share its answer.
type unitLookups struct {
	ttl     time.Duration // unitLookupTTL; 0 in tests that count every systemctl
	mu      sync.Mutex
	entries map[string]*unitLookup
}

type unitLookup struct {
	mu  sync.Mutex // held while the lookup runs
	at  time.Time
	uf  unitFile
	err error
}

func (c *unitLookups) configuredImage(ctx context.Context, cfg *config, getenv func(string) string, unit string) (unitFile, error) {
	c.mu.Lock()
	e := c.entries[unit]
	if e == nil {
		if c.entries == nil || len(c.entries) >= maxUnitLookups {
			c.entries = map[string]*unitLookup{}
		}
		e = &unitLookup{}
		c.entries[unit] = e
	}
	c.mu.Unlock()
	e.mu.Lock()
	defer e.mu.Unlock()
	if time.Since(e.at) >= c.ttl {
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), unitLookupTimeout) // shared: not the asker's to cut short
		_, e.uf, e.err = inspectUnit(lctx, cfg, getenv, unit)
		cancel()
		e.at = time.Now()
	}
	return e.uf, e.err
}

var errUnitNotFound = errors.New("unit not found")

// unitFile is what a unit's Quadlet file and drop-ins say: Image=, the file naming it, Label= pairs.
type unitFile struct {
	image, source string
	labels        map[string]string
}

// inspectUnit reads a unit's state and Quadlet file (SourcePath, else <name>.container); errUnitNotFound if unknown.
func inspectUnit(ctx context.Context, cfg *config, getenv func(string) string, unit string) (u unitSample, _ unitFile, err error) {
	props, err := showUnit(ctx, cfg, unit, append([]string{"LoadState", "SourcePath"}, unitStateProps...)...)
	if err != nil {
		return unitSample{}, unitFile{}, err
	}
	if u = unitFromProps(props); props["LoadState"] == "not-found" {
		return u, unitFile{}, fmt.Errorf("%s: %w", unit, errUnitNotFound)
	}
	var candidates []string
	if sp := props["SourcePath"]; strings.HasSuffix(sp, ".container") {
		candidates = append(candidates, sp)
	}
	base := strings.TrimSuffix(unit, ".service") + ".container"
	if x := getenv("XDG_CONFIG_HOME"); x != "" {
		candidates = append(candidates, filepath.Join(x, "containers", "systemd", base))
	}
	if h := getenv("HOME"); h != "" {
		candidates = append(candidates, filepath.Join(h, ".config", "containers", "systemd", base))
	}
	for _, c := range candidates {
		data, err := os.ReadFile(c)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return u, unitFile{source: c}, err
		}
		uf := unitFile{source: c, labels: map[string]string{}}
		uf.readQuadlet(data)
		dropins, _ := filepath.Glob(c + ".d/*.conf") // they override the file in lexical order, as in systemd
		slices.Sort(dropins)
		for _, d := range dropins {
			data, _ := os.ReadFile(d) // an unreadable drop-in is skipped
			if uf.readQuadlet(data) {
				uf.source = d
			}
		}
		return u, uf, nil
	}
	return u, unitFile{}, nil
}

// readQuadlet applies a [Container] section to uf as systemd.unit(5) parses it, true on an Image=; bad
// Label= words are skipped, a later key overrides, and an empty Label= clears the labels before it.
func (uf *unitFile) readQuadlet(data []byte) (named bool) {
	var section, pending string
	for _, line := range strings.Split(string(data), "\n") {
		if line = strings.TrimSpace(line); pending != "" {
			line, pending = strings.TrimSpace(pending+" "+line), ""
		}
		k, v, ok := strings.Cut(line, "=")
		switch k, v = strings.TrimSpace(k), strings.TrimSpace(v); {
		case strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"): // a comment
		case strings.HasSuffix(line, "\\"):
			pending = strings.TrimSuffix(line, "\\")
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
		case !ok || section != "Container":
		case k == "Image":
			if len(v) >= 2 && (v[0] == '"' && v[len(v)-1] == '"' || v[0] == '\'' && v[len(v)-1] == '\'') {
				v = v[1 : len(v)-1]
			}
			uf.image, named = strings.TrimPrefix(v, "docker://"), true
		case k == "Label" && v == "":
			clear(uf.labels)
		case k == "Label" && uf.labels != nil:
			words, ok := splitWords(v)
			for _, w := range words {
				if lk, lv, kv := strings.Cut(w, "="); kv && ok {
					uf.labels[lk] = lv
				}
			}
		}
	}
	return named
}

// splitWords splits s as systemd's extract_first_word (UNQUOTE|CUNESCAPE|RELAX); !ok: a quote is open.
func splitWords(s string) (words []string, ok bool) {
	var w strings.Builder
	var quote byte
	in := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '\\' && i+1 < len(s):
			i, in = i+1, true
			w.WriteByte(cmp.Or(map[byte]byte{'n': '\n', 't': '\t', 'r': '\r', 's': ' '}[s[i]], s[i]))
		case quote != 0 && c == quote:
			quote = 0
		case quote != 0:
			w.WriteByte(c)
		case c == '"' || c == '\'':
			quote, in = c, true
		case c == ' ' || c == '\t':
			if in {
				words, in = append(words, w.String()), false
				w.Reset()
			}
		default:
			w.WriteByte(c)
			in = true
		}
	}
	if in {
		words = append(words, w.String())
	}
	return words, quote == 0
}

// taskUnitName is the transient unit of one redeploy, with what systemd would reject replaced.
func taskUnitName(deliveryID string) string {
	b := []byte(deliveryID[:min(len(deliveryID), 64)])
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			b[i] = '_'
		}
	}
	return "webhook-task-" + string(b)
}

// taskEnvNames and WEBHOOK_ variables but secrets are passed on, as transient units inherit none.
var taskEnvNames = []string{"PATH", "HOME", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME",
	"CONTAINERS_CONF", "CONTAINERS_REGISTRIES_CONF", "CONTAINERS_STORAGE_CONF", "REGISTRY_AUTH_FILE"}

// isSecretEnv reports the GitHub secret, notification URLs, any WEBHOOK_ token, secret, password or key.
func isSecretEnv(name string) bool {
	return name == "GITHUB_WEBHOOK_SECRET" || name == "WEBHOOK_NOTIFY_URLS" || strings.HasPrefix(name, "WEBHOOK_") &&
		slices.ContainsFunc([]string{"TOKEN", "SECRET", "PASSWORD", "KEY"}, func(w string) bool { return strings.Contains(name, w) })
}

// childEnv is this process's environment without its secrets, for every command it runs.
func childEnv() []string {
	return slices.DeleteFunc(os.Environ(), func(kv string) bool {
		name, _, _ := strings.Cut(kv, "=")
		return isSecretEnv(name)
	})
}

// dispatchArgv runs a redeploy as a transient unit, outliving a server restart; -E keeps values out of argv.
func dispatchArgv(exe string, cfg *config, environ []string, t taskSpec) []string {
	argv := []string{"systemd-run", "--user", "--collect", "--quiet", "--unit=" + taskUnitName(t.delivery)}
	for _, kv := range environ {
		name, _, _ := strings.Cut(kv, "=")
		if (slices.Contains(taskEnvNames, name) || strings.HasPrefix(name, "WEBHOOK_")) && !isSecretEnv(name) {
			argv = append(argv, "-E", name)
		}
	}
	argv = append(argv, "--", exe, "run-task", "--state-dir", cfg.stateDir, "--db", cfg.dbPath)
	if t.force {
		argv = append(argv, "--force")
	}
	if t.digest != "" {
		argv = append(argv, "--digest", t.digest)
	}
	return append(argv, "--", t.unit, t.image, t.event, t.delivery, t.path)
}

type unitSample struct {
	activeState string // active, activating, deactivating, failed, inactive, reloading
	subState    string
	result      string // success, exit-code, signal, …
	nRestarts   int    // automatic restarts by systemd (Restart=)
	exitCode    int    // ExecMainStatus: the main process's exit status, or its signal
	killed      bool   // ExecMainCode says a signal ended it (2 killed, 3 dumped)
}

var unitStateProps = []string{"ActiveState", "SubState", "Result", "NRestarts", "ExecMainStatus", "ExecMainCode"}

func sampleUnit(ctx context.Context, cfg *config, unit string) (unitSample, error) {
	p, err := showUnit(ctx, cfg, unit, unitStateProps...)
	return unitFromProps(p), err
}

func unitFromProps(p map[string]string) unitSample {
	n, _ := strconv.Atoi(p["NRestarts"])
	code, _ := strconv.Atoi(p["ExecMainStatus"])
	return unitSample{activeState: p["ActiveState"], subState: p["SubState"], result: p["Result"], nRestarts: n,
		exitCode: code, killed: p["ExecMainCode"] == "2" || p["ExecMainCode"] == "3"}
}

// exited says how the unit's main process last ended, as systemd recorded it.
func (s unitSample) exited() string {
	how := "exited with code"
	if s.killed {
		how = "was killed by signal"
	}
	return fmt.Sprintf("its main process %s %d (result %s)", how, s.exitCode, s.result)
}

// gateSample is one look during the settle: the unit, its newest container, a failed healthcheck run.
type gateSample struct {
	at          time.Time
	unit        unitSample
	ctr         unitContainer // zero when the look took no container or found none
	checkFailed bool
}

// gateVerdict judges a settle's newest sample: a restart by systemd, a stopped or unhealthy unit or
// container fail at once; once the settle passed, the unit must be active and its healthcheck pass.
func gateVerdict(baseline unitSample, start time.Time, settle time.Duration, s gateSample) (verdict string, done bool) {
	switch u := s.unit; {
	case u.nRestarts > baseline.nRestarts:
		return fmt.Sprintf("systemd restarted the unit on its own (NRestarts %d → %d): %s", baseline.nRestarts, u.nRestarts, u.exited()), true
	case u.activeState == "failed" || u.activeState == "inactive" || u.activeState == "deactivating":
		return fmt.Sprintf("the unit became %s/%s: %s", u.activeState, u.subState, u.exited()), true
	case slices.Contains([]string{"exited", "stopped", "dead"}, s.ctr.state):
		return fmt.Sprintf("the container %s exited with code %d", s.ctr.id[:min(len(s.ctr.id), 12)], s.ctr.exitCode), true
	case s.ctr.health == "unhealthy":
		return "podman healthcheck: the container is unhealthy", true
	case s.at.Sub(start) < settle:
		return "", false
	case u.activeState != "active":
		return fmt.Sprintf("the unit is %s/%s, not active, at the end of the settle window", u.activeState, u.subState), true
	case s.checkFailed:
		return "podman healthcheck: unhealthy at the end of the settle window", true
	}
	return "", true
}

// watchGate samples every poll until the gate fails or the settle passed; NRestarts counts from
// the first sample's (a restart resets it). When ctx ends one last sample decides, and cut is set.
func watchGate(ctx context.Context, now func() time.Time, after func(time.Duration) <-chan time.Time, poll, settle time.Duration,
	baseline unitSample, sample func(last bool) (gateSample, error)) (verdict string, last gateSample, cut bool) {
	start, seen := now(), false
	for {
		final := now().Sub(start) >= settle || ctx.Err() != nil
		s, err := sample(final)
		if err == nil {
			if !seen && s.unit.nRestarts < baseline.nRestarts {
				baseline.nRestarts = s.unit.nRestarts
			}
			seen, last, cut = true, s, ctx.Err() != nil
			if cut {
				settle = 0 // being stopped: this sample decides
			}
			if v, done := gateVerdict(baseline, start, settle, s); done && (v != "" || final) { // only a last look passes
				return v, s, cut
			}
		} else if final {
			return "the unit could not be observed at the end of the settle window: " + err.Error(), last, ctx.Err() != nil
		}
		select {
		case <-ctx.Done():
		case <-after(min(poll, max(settle-now().Sub(start), 0))):
		}
	}
}

type cmdResult struct {
	argv           []string
	stdout, stderr string
	exitCode       int // -1 when the command did not run or was killed
	err            error
	timedOut       bool
	note           string // a remark on a success, e.g. that systemctl stopped waiting for a running job
}

// runCommand runs argv with childEnv and a timeout; a failure is an error naming it and its stderr.
func runCommand(ctx context.Context, timeout time.Duration, argv ...string) cmdResult {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.WaitDelay, cmd.Env = 5*time.Second, childEnv()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	res := cmdResult{argv: argv, stdout: stdout.String(), stderr: tail(stderr.String(), 2048),
		exitCode: cmd.ProcessState.ExitCode()} // -1 also when it did not start (nil ProcessState)
	output := ""
	if s := strings.TrimSpace(res.stderr); s != "" {
		output = ": " + s
	}
	switch {
	case err == nil:
	case errors.Is(err, exec.ErrNotFound):
		res.err = fmt.Errorf("%s is not installed or not on PATH", argv[0])
	case ctx.Err() == context.DeadlineExceeded:
		res.timedOut = true
		res.err = fmt.Errorf("%s timed out after %s and was killed%s", strings.Join(argv, " "), timeout, output)
	default:
		res.err = fmt.Errorf("%s failed (exit %d)%s", strings.Join(argv, " "), res.exitCode, output)
	}
	return res
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "…" + s[len(s)-n:]
}

// The dispatcher starts one task per unit and image in arrival order; a unit's later claims wait.
const (
	dispatchTimeout  = 30 * time.Second      // bounds one systemd-run, which returns once the unit started
	dispatchAttempts = 5                     // systemd-runs tried for one task before its claims fail
	dispatchMaxAge   = 10 * time.Minute      // no retry for a claim queued longer than this
	dispatchPoll     = time.Second           // how often a queue waiting for running tasks is read
	dispatchIdle     = 30 * time.Second      // and an idle one
	dispatchLookGap  = 50 * time.Millisecond // the least time between two looks claims wake
	taskCheckAfter   = 10 * time.Second      // a dispatched task not heard of for this long is looked up
)

func retryDelay(attempts int) time.Duration { return min(time.Second<<min(attempts, 6), time.Minute) }

// runDispatcher dispatches until ctx ends, first settling what a previous server left half-done.
func (s *server) runDispatcher(ctx context.Context) {
	s.reconcile(ctx, claimDispatching, s.now().Add(time.Second))
	for ctx.Err() == nil {
		looked := time.Now()
		wait := s.dispatchNext(ctx)
		s.flushSummaries(false)
		if wait == 0 {
			continue
		}
		select {
		case <-ctx.Done():
		case <-s.wake:
			sleepContext(ctx, dispatchLookGap-time.Since(looked))
		case <-time.After(wait):
		}
	}
}

// dispatchNext starts the next task that is due and returns how long to wait (0: look again).
func (s *server) dispatchNext(ctx context.Context) time.Duration {
	if now := s.now(); now.Sub(s.reconciled) >= dispatchPoll {
		s.reconciled = now
		s.reconcile(ctx, claimDispatching, now.Add(-2*dispatchTimeout))
		s.reconcile(ctx, claimDispatched, now.Add(-taskCheckAfter))
	}
	qt, ok, wake, err := s.events.nextTask(ctx, s.now(), func(qt queuedTask) hold { return s.policyHold(ctx, qt) },
		func(qt queuedTask) []event {
			return dispatchRows(qt, "dispatching", http.StatusAccepted, s.now(), cmdResult{}, time.Time{})
		})
	switch {
	case err != nil:
		if ctx.Err() == nil {
			s.log.errorf("delivery queue: %v", err)
		}
		return dispatchPoll
	case ok:
		s.startTask(ctx, qt)
		return 0
	}
	return max(wake.Sub(s.now()), 0)
}

// policy is when a unit may redeploy (its tag quiet for cooldown, approved, its window open) and
// how its image is checked: every check (0: WEBHOOK_CHECK_INTERVAL_SECS, < 0: never), deploying an update.
type policy struct {
	cooldown, length, check time.Duration
	window                  string
	approve, deploy         bool
}

// policyKeys are the labels' keys (after "webhook-auto-update.") and the defaults' variables.
var policyKeys = map[string]string{"cooldown": "WEBHOOK_DEFAULT_COOLDOWN", "window": "WEBHOOK_DEFAULT_WINDOW",
	"window-length": "WEBHOOK_DEFAULT_WINDOW_LENGTH", "approve": "WEBHOOK_DEFAULT_APPROVE"}

// parsePolicy reads labels over defaults; a malformed value is an error naming its label.
func parsePolicy(labels, defaults map[string]string) (policy, error) {
	var p policy
	for _, k := range []string{"cooldown", "window-length", "approve", "window", "check", "on-update"} {
		v, err := cmp.Or(labels["webhook-auto-update."+k], defaults[k]), error(nil)
		switch d, derr := time.ParseDuration(v); {
		case v == "":
		case k == "approve":
			p.approve, err = strconv.ParseBool(v)
		case k == "window":
			if p.window = v; p.length <= 0 || len(v) > 256 || strings.ContainsFunc(v, unicode.IsControl) {
				err = errors.New("want a systemd.time calendar event of at most 256 characters, with window-length set")
			}
		case k == "on-update":
			if p.deploy = v == "deploy"; v != "deploy" && v != "notify" {
				err = errors.New("want notify or deploy")
			}
		case k == "check" && v == "off":
			p.check = -1
		case k == "check" && (derr != nil || d < time.Minute):
			err = errors.New("want off or a duration of at least 1m, such as 6h")
		case derr != nil || d <= 0:
			err = errors.New("want a positive duration such as 15m or 3h")
		case k == "check":
			p.check = d
		case k == "cooldown":
			p.cooldown = d
		default:
			p.length = d
		}
		if err != nil {
			return policy{}, fmt.Errorf("webhook-auto-update.%s=%q: %v", k, v, err)
		}
	}
	if p.length > 0 && p.window == "" {
		return policy{}, errors.New("webhook-auto-update.window-length is set without webhook-auto-update.window")
	}
	return p, nil
}

// windowOpens is when p's window opens next (now while open): systemd-analyze's first elapse after now-length.
func (p policy) windowOpens(ctx context.Context, now time.Time) (time.Time, error) {
	if p.window == "" {
		return now, nil
	}
	res := runCommand(ctx, unitLookupTimeout, "systemd-analyze", "calendar",
		"--base-time=@"+strconv.FormatInt(now.Add(-p.length).Unix(), 10), "--", p.window)
	if res.err != nil {
		return now, fmt.Errorf("webhook-auto-update.window=%q: %v", p.window, res.err)
	}
	var at string
	for _, line := range strings.Split(res.stdout, "\n") {
		if k, v, _ := strings.Cut(strings.TrimSpace(line), ": "); k == "(in UTC)" || k == "Next elapse" && at == "" {
			at = v
		}
	}
	t, err := time.Parse("Mon 2006-01-02 15:04:05 MST", at)
	if err != nil || t.Location() != time.UTC {
		return now, fmt.Errorf("webhook-auto-update.window=%q never opens again (systemd-analyze: %q)", p.window, at)
	}
	if !t.After(now) {
		return now, nil
	}
	return t, nil
}

// policyHold holds every claim for cooldown, then approval, then the window; an unreadable policy fails it.
func (s *server) policyHold(ctx context.Context, qt queuedTask) hold {
	now := s.now()
	p, err := s.unitPolicy(ctx, qt.unit)
	switch ttl := s.cfg.approvalTTL; {
	case err != nil:
		return hold{step: "policy-invalid", errText: err.Error()}
	case p.cooldown > 0 && qt.newest.Add(p.cooldown).After(now):
		return hold{step: waitCooldown, until: qt.newest.Add(p.cooldown)}
	case p.approve && !qt.unapproved.IsZero() && !qt.unapproved.Add(ttl).After(now):
		return hold{step: "expired", until: now.Add(-ttl)}
	case p.approve && !qt.unapproved.IsZero():
		return hold{step: waitApproval, until: qt.unapproved.Add(ttl)}
	}
	if opens, err := p.windowOpens(ctx, now); err != nil {
		return hold{step: "policy-invalid", errText: err.Error()}
	} else if opens.After(now) {
		return hold{step: waitWindow, until: opens}
	}
	return hold{}
}

// unitPolicy is a unit's policy: its Quadlet labels over the defaults (alone for a unit without).
func (s *server) unitPolicy(ctx context.Context, unit string) (policy, error) {
	uf, err := s.units.configuredImage(ctx, s.cfg, s.getenv, unit)
	if err != nil && !errors.Is(err, errUnitNotFound) {
		return policy{}, fmt.Errorf("cannot read the policy of %s: %w", unit, err)
	}
	return parsePolicy(uf.labels, s.cfg.policyDefaults)
}

// startTask runs systemd-run for qt and settles its claims dispatched, pending a retry, or failed.
func (s *server) startTask(ctx context.Context, qt queuedTask) {
	bg := context.WithoutCancel(ctx)
	taskUnit := taskUnitName(qt.delivery)
	res := s.runTask(bg, qt.taskSpec)
	now := s.now()
	status, reason, code, retryAt, errText := claimDispatched, "", 0, time.Time{}, ""
	switch {
	case res.err == nil:
		s.log.infof("dispatched %s for %s (%s), covering %d deliveries", taskUnit, qt.unit, qt.image, len(qt.covered))
	case qt.attempts+1 < dispatchAttempts && now.Sub(qt.claimed) < dispatchMaxAge:
		status, reason, code, retryAt, errText = claimPending, "dispatch-retry", http.StatusServiceUnavailable,
			now.Add(retryDelay(qt.attempts)), res.err.Error()
		s.log.warnf("cannot dispatch the redeploy of %s (attempt %d of %d), retrying in %s: %v",
			qt.unit, qt.attempts+1, dispatchAttempts, retryDelay(qt.attempts), res.err)
	default:
		status, reason, code, errText = claimFailed, "dispatch-failed", http.StatusInternalServerError, res.err.Error()
		s.log.errorf("cannot dispatch the redeploy of %s after %d attempts, giving up on delivery %s and %d it covers: %v",
			qt.unit, qt.attempts+1, qt.delivery, len(qt.covered)-1, res.err)
	}
	s.metrics.dispatched(cmp.Or(reason, string(status)))
	wctx, cancel := context.WithTimeout(bg, 3*busyTimeout)
	defer cancel()
	evs := dispatchRows(qt, reason, code, now, res, retryAt)
	if err := s.events.settleTask(wctx, taskUnit, status, errText, retryAt, evs); err != nil {
		s.log.errorf("cannot record the dispatch of %s (checked again later): %v", taskUnit, err)
		s.events.spill(evs, err)
	}
}

// dispatchRows are the rows of qt's claims saying reason ("" none); they share a request id.
func dispatchRows(qt queuedTask, reason string, code int, now time.Time, res cmdResult, retryAt time.Time) []event {
	if reason == "" {
		return nil
	}
	evs, id := make([]event, 0, len(qt.covered)), newRequestID()
	for _, c := range qt.covered {
		meta := map[string]any{"delivery": c, "unit": qt.unit, "image": qt.image, "event": qt.event,
			"reason": reason, "attempt": qt.attempts + 1, "task_unit": taskUnitName(qt.delivery)}
		if c != qt.delivery {
			meta["covered_by"] = qt.delivery
		} else if len(qt.covered) > 1 {
			meta["covers"] = len(qt.covered)
		}
		if res.err != nil {
			meta["error"], meta["exit_code"] = res.err.Error(), res.exitCode
			if res.stderr != "" {
				meta["stderr"] = res.stderr
			}
		}
		if !retryAt.IsZero() {
			meta["retry_in_ms"] = retryAt.Sub(now).Milliseconds()
		}
		evs = append(evs, event{RequestID: id, TS: now, Method: "QUEUE", Path: qt.path, Status: code,
			Action: "github-dispatch", Duration: now.Sub(qt.claimed), Meta: meta})
	}
	return evs
}

// runTask starts run-task for spec; a failed systemd-run whose task started counts as done.
func (s *server) runTask(ctx context.Context, spec taskSpec) cmdResult {
	res := s.exec(ctx, dispatchTimeout, dispatchArgv(s.exe, s.cfg, s.environ(), spec)...)
	if res.err != nil {
		if st := s.taskState(ctx, spec.delivery, time.Now().Add(-dispatchTimeout)); st == taskRunning || st == taskEnded {
			s.log.warnf("systemd-run for %s failed (%v), but %s has started", spec.unit, res.err, taskUnitName(spec.delivery))
			res.err = nil
		}
	}
	return res
}

type taskState int

const (
	taskUnknown    taskState = iota // systemd could not be asked
	taskNotStarted                  // systemd does not know it and it wrote no row
	taskRunning
	taskEnded // systemd reports it ended, or it is collected and wrote rows since since
)

// taskState asks systemd about a delivery's task unit; a collected one is told by its rows.
func (s *server) taskState(ctx context.Context, delivery string, since time.Time) taskState {
	ctx, cancel := context.WithTimeout(ctx, unitLookupTimeout)
	defer cancel()
	switch p, err := showUnit(ctx, s.cfg, taskUnitName(delivery)+".service", "LoadState", "ActiveState"); {
	case err != nil:
		return taskUnknown
	case p["LoadState"] == "loaded" && slices.Contains([]string{"active", "activating", "deactivating", "reloading"}, p["ActiveState"]):
		return taskRunning
	case p["LoadState"] == "loaded":
		return taskEnded
	}
	if ran, err := s.events.taskRan(ctx, delivery, since); err != nil {
		return taskUnknown
	} else if ran {
		return taskEnded
	}
	return taskNotStarted
}

// reconcile settles claims in status since before: dispatching ones as their task went, dead ones done.
func (s *server) reconcile(ctx context.Context, status claimStatus, before time.Time) {
	tasks, err := s.events.tasksIn(ctx, status, before)
	if err != nil {
		if ctx.Err() == nil {
			s.log.errorf("delivery queue: %v", err)
		}
		return
	}
	for _, t := range tasks {
		st := s.taskState(ctx, t.delivery, before.Add(-dispatchMaxAge))
		to, note, at := claimDispatched, "", time.Time{}
		switch {
		case st == taskUnknown:
			continue
		case status == claimDispatched && st == taskRunning:
		case status == claimDispatched:
			s.log.warnf("%s for %s ended without recording its end (killed?)", t.taskUnit, t.unit)
			to, note = claimDone, "the task ended without recording its end"
		case st == taskNotStarted:
			s.log.warnf("%s for %s was being dispatched when the server stopped: queued again", t.taskUnit, t.unit)
			to, note, at = claimPending, "the server stopped during systemd-run", s.now()
		}
		if err := s.events.settleTask(ctx, t.taskUnit, to, note, at, nil); err != nil && ctx.Err() == nil {
			s.log.errorf("delivery queue: %s: %v", t.taskUnit, err)
		}
	}
}
