// systemd.go owns what talks to systemd and starts programs: socket activation (sd_listen_fds(3)),
// sd_notify(3), unit names, systemctl, a delivery's unit lookup (its Quadlet file's Image=), the
// dispatcher that starts each queued redeploy as a transient unit with systemd-run, runCommand
// and the environment every child gets, and the health gate's samples and verdict.
//
// Rules: the activation and notify variables are unset once read and passed fds are
// close-on-exec, so no child inherits them; children get no secret (childEnv). Every value in
// systemctl's argv passed validUnitName and follows "--". One dispatcher goroutine consumes the
// durable queue, so it needs no lock; a claim only wakes it.
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
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// firstListenFD is SD_LISTEN_FDS_START. It is a variable so that a test can hand in the fd of a
// real listener without starting a subprocess.
var firstListenFD = 3

// activationListeners returns the sockets systemd passed to this process, or none when the
// process was not socket-activated (LISTEN_PID absent or naming another process, as
// sd_listen_fds(3) requires). LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES are unset either way.
func activationListeners(getenv func(string) string) ([]net.Listener, error) {
	pidText, fdsText, namesText := getenv("LISTEN_PID"), getenv("LISTEN_FDS"), getenv("LISTEN_FDNAMES")
	for _, v := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
		os.Unsetenv(v)
	}
	if pidText == "" || fdsText == "" {
		return nil, nil
	}
	if pid, err := strconv.Atoi(pidText); err != nil || pid != os.Getpid() {
		return nil, nil
	}
	n, err := strconv.Atoi(fdsText)
	if err != nil || n < 0 {
		return nil, fmt.Errorf("invalid LISTEN_FDS=%q from systemd", fdsText)
	}
	names := strings.Split(namesText, ":")
	var ls []net.Listener
	for i := 0; i < n; i++ {
		fd := firstListenFD + i
		syscall.CloseOnExec(fd)
		name := "LISTEN_FD_" + strconv.Itoa(fd)
		if i < len(names) && names[i] != "" {
			name = names[i]
		}
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

// newNotifier connects to $NOTIFY_SOCKET when systemd set it. A leading "@" names an abstract
// socket, which Go's unix socket addresses already understand. NOTIFY_SOCKET, WATCHDOG_USEC and
// WATCHDOG_PID are unset so children do not inherit them.
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
	if us, err := strconv.ParseInt(usec, 10, 64); err == nil && us > 0 {
		if pid, err := strconv.Atoi(wpid); wpid == "" || (err == nil && pid == os.Getpid()) {
			n.watchdog = time.Duration(us) * time.Microsecond
		}
	}
	return n, nil
}

// notify sends one state string such as "READY=1".
func (n *notifier) notify(state string) error {
	if n == nil || n.conn == nil {
		return nil
	}
	_, err := n.conn.Write([]byte(state))
	return err
}

// runWatchdog sends WATCHDOG=1 every half watchdog interval until ctx ends.
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

// maxUnitNameLen is UNIT_NAME_MAX from systemd's unit-name.h.
const maxUnitNameLen = 255

var reUnitName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9:_.@-]*\.service$`)

// validUnitName accepts the service names this program may pass to systemctl: the characters
// systemd.unit(5) allows in a name (no "\" escapes, no glob characters), at most 255 bytes,
// never a leading "-" (it would read as a flag), and a template only with its instance.
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

// resolveUnit turns a unit identifier as operators and the original tool spell it into a
// validated service name: "foo" and "foo.service" → "foo.service", and the webhook spellings
// "foo/redeploy" and "github-package-update/foo" → "foo.service".
func resolveUnit(id string) (string, error) {
	u := strings.TrimSpace(id)
	u = strings.TrimPrefix(u, "/")
	u = strings.TrimPrefix(u, "github-package-update/")
	u = strings.TrimSuffix(u, "/redeploy")
	if u != "" && !strings.HasSuffix(u, ".service") {
		u += ".service"
	}
	if err := validUnitName(u); err != nil {
		return "", err
	}
	return u, nil
}

// systemctl runs "systemctl --user ARGS…".
func systemctl(ctx context.Context, cfg *config, args ...string) cmdResult {
	return runCommand(ctx, cfg.commandTimeout, append([]string{"systemctl", "--user"}, args...)...)
}

// restartUnit restarts a validated unit and waits for the job, as systemctl does by default.
func restartUnit(ctx context.Context, cfg *config, unit string) cmdResult {
	return stillRunning(ctx, cfg, unit, systemctl(ctx, cfg, "restart", "--", unit))
}

// startUnit starts a validated unit.
func startUnit(ctx context.Context, cfg *config, unit string) cmdResult {
	return stillRunning(ctx, cfg, unit, systemctl(ctx, cfg, "start", "--", unit))
}

// stillRunning turns a systemctl that was killed at its time limit while the unit's job went on
// (a long podman auto-update, say) into a success with a note: systemd keeps running the job, and
// reporting it as failed would be untrue. A unit that is not starting or running stays an error.
func stillRunning(ctx context.Context, cfg *config, unit string, res cmdResult) cmdResult {
	if !res.timedOut {
		return res
	}
	s, err := sampleUnit(context.WithoutCancel(ctx), cfg, unit)
	if err != nil || (s.activeState != "activating" && s.activeState != "active" && s.activeState != "reloading") {
		return res
	}
	res.err = nil
	res.note = fmt.Sprintf("systemctl stopped waiting after %s; %s is %s/%s and systemd carries on", cfg.commandTimeout, unit, s.activeState, s.subState)
	return res
}

// showUnit reads unit properties with "systemctl --user show -p P… -- UNIT".
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

// unitLookupTTL is how long the unit lookup of a delivery is reused: long enough that a burst
// of deliveries for one unit costs one systemctl and one read of its files, short enough that a
// changed Quadlet file, or a unit file changed and daemon-reload'ed, is seen within seconds.
const unitLookupTTL = 2 * time.Second

// unitLookupTimeout bounds one lookup.
const unitLookupTimeout = 5 * time.Second

// maxUnitLookups bounds the cache; past it, entries are dropped rather than kept forever.
const maxUnitLookups = 1024

// unitLookups caches configuredImage per unit for ttl, so that no delivery starts a process or
// reads a file in steady state. A caller that finds an entry being refreshed waits on that
// entry's mutex for the same answer.
type unitLookups struct {
	ttl     time.Duration // unitLookupTTL; 0 in tests that count every systemctl
	mu      sync.Mutex
	entries map[string]*unitLookup
}

type unitLookup struct {
	mu            sync.Mutex // held while the lookup runs
	at            time.Time
	image, source string
	err           error
}

// configuredImage is configuredImage(ctx, cfg, getenv, unit), from the cache when fresh.
func (c *unitLookups) configuredImage(ctx context.Context, cfg *config, getenv func(string) string, unit string) (image, source string, err error) {
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
		// Not cut short by the asking client: the answer is shared, and a request must not wait
		// past GitHub's 10 s for systemd.
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), unitLookupTimeout)
		e.image, e.source, e.err = configuredImage(lctx, cfg, getenv, unit)
		cancel()
		e.at = time.Now()
	}
	return e.image, e.source, e.err
}

// errUnitNotFound reports a unit that systemd does not know.
var errUnitNotFound = errors.New("unit not found")

// configuredImage finds the image a unit is meant to run: the Image= of the Quadlet .container
// file that generated it (its SourcePath, from "systemctl show"), else of <name>.container under
// $XDG_CONFIG_HOME/containers/systemd or ~/.config/containers/systemd. It returns "" when the unit
// names no image, and errUnitNotFound when systemd does not know the unit.
func configuredImage(ctx context.Context, cfg *config, getenv func(string) string, unit string) (image, source string, err error) {
	props, err := showUnit(ctx, cfg, unit, "LoadState", "SourcePath", "FragmentPath")
	if err != nil {
		return "", "", err
	}
	if props["LoadState"] == "not-found" {
		return "", "", fmt.Errorf("%s: %w", unit, errUnitNotFound)
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
			return "", c, err
		}
		image, source = quadletImage(data), c
		// Drop-ins (NAME.container.d/*.conf, in lexical order) override the file, as in systemd.
		dropins, _ := filepath.Glob(c + ".d/*.conf")
		sort.Strings(dropins)
		for _, d := range dropins {
			if data, err := os.ReadFile(d); err == nil {
				if img := quadletImage(data); img != "" {
					image, source = img, d
				}
			}
		}
		return image, source, nil
	}
	return "", "", nil
}

// quadletImage returns the Image= of a Quadlet file's [Container] section (the last one wins, as
// systemd.unit(5) parsing does), with line continuations joined, quotes and a docker:// prefix
// removed. It returns "" when there is none.
func quadletImage(data []byte) string {
	var image, section, pending string
	for _, raw := range strings.Split(string(data), "\n") {
		line := strings.TrimRight(raw, "\r")
		if pending != "" {
			line = pending + " " + strings.TrimSpace(line)
			pending = ""
		}
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "#") || strings.HasPrefix(trimmed, ";") {
			continue
		}
		if strings.HasSuffix(trimmed, "\\") {
			pending = strings.TrimSuffix(trimmed, "\\")
			continue
		}
		if strings.HasPrefix(trimmed, "[") && strings.HasSuffix(trimmed, "]") {
			section = trimmed[1 : len(trimmed)-1]
			continue
		}
		k, v, ok := strings.Cut(trimmed, "=")
		if !ok || section != "Container" || strings.TrimSpace(k) != "Image" {
			continue
		}
		v = strings.TrimSpace(v)
		if len(v) >= 2 && (v[0] == '"' && v[len(v)-1] == '"' || v[0] == '\'' && v[len(v)-1] == '\'') {
			v = v[1 : len(v)-1]
		}
		image = strings.TrimPrefix(v, "docker://")
	}
	return image
}

// taskUnitName is the transient unit of one redeploy: webhook-task-<delivery>, with every
// character systemd would reject replaced.
func taskUnitName(deliveryID string) string {
	b := []byte(deliveryID)
	if len(b) > 64 {
		b = b[:64]
	}
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			b[i] = '_'
		}
	}
	return "webhook-task-" + string(b)
}

// taskEnvNames and taskEnvPrefixes name the variables a redeploy needs from the server's
// environment; transient units do not inherit it. Secrets are never among them (isSecretEnv).
var taskEnvNames = []string{"PATH", "HOME", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME",
	"CONTAINERS_CONF", "CONTAINERS_REGISTRIES_CONF", "CONTAINERS_STORAGE_CONF", "REGISTRY_AUTH_FILE"}

var taskEnvPrefixes = []string{"WEBHOOK_"}

// isSecretEnv reports whether a variable of this program holds a secret: the GitHub secret and
// any WEBHOOK_ setting whose name says token, secret, password or key — today's tokens and any
// added later. Such variables reach no child process.
func isSecretEnv(name string) bool {
	if name == "GITHUB_WEBHOOK_SECRET" {
		return true
	}
	if !strings.HasPrefix(name, "WEBHOOK_") {
		return false
	}
	for _, w := range []string{"TOKEN", "SECRET", "PASSWORD", "KEY"} {
		if strings.Contains(name, w) {
			return true
		}
	}
	return false
}

// childEnv is this process's environment without its secrets, for every command it runs.
func childEnv() []string {
	env := os.Environ()
	out := env[:0:0]
	for _, kv := range env {
		if name, _, _ := strings.Cut(kv, "="); !isSecretEnv(name) {
			out = append(out, kv)
		}
	}
	return out
}

// dispatchArgv builds the systemd-run command line that runs one redeploy as a transient user
// unit, so it outlives a restart of the server. Variables are passed as "-E NAME", which copies
// the value from this process, so no value appears in argv.
func dispatchArgv(exe string, cfg *config, environ []string, t taskSpec) []string {
	argv := []string{"systemd-run", "--user", "--collect", "--quiet", "--unit=" + taskUnitName(t.delivery)}
	for _, kv := range environ {
		name, _, _ := strings.Cut(kv, "=")
		pass := slices.Contains(taskEnvNames, name)
		for _, p := range taskEnvPrefixes {
			pass = pass || strings.HasPrefix(name, p)
		}
		if pass && !isSecretEnv(name) {
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

// unitSample is one reading of a unit's state during the health gate.
type unitSample struct {
	activeState string // active, activating, deactivating, failed, inactive, reloading
	subState    string
	result      string // success, exit-code, signal, …
	nRestarts   int    // automatic restarts by systemd (Restart=)
}

var unitSampleProps = []string{"ActiveState", "SubState", "Result", "NRestarts"}

func sampleUnit(ctx context.Context, cfg *config, unit string) (unitSample, error) {
	p, err := showUnit(ctx, cfg, unit, unitSampleProps...)
	if err != nil {
		return unitSample{}, err
	}
	n, _ := strconv.Atoi(p["NRestarts"])
	return unitSample{activeState: p["ActiveState"], subState: p["SubState"], result: p["Result"],
		nRestarts: n}, nil
}

// sampleProblem says what is wrong with one sample, or "" when nothing is (yet).
func sampleProblem(baseline, s unitSample) string {
	switch {
	case s.nRestarts > baseline.nRestarts:
		return fmt.Sprintf("systemd restarted the unit on its own (NRestarts %d → %d, result %s)", baseline.nRestarts, s.nRestarts, s.result)
	case s.activeState == "failed" || s.activeState == "inactive" || s.activeState == "deactivating":
		return fmt.Sprintf("the unit became %s/%s (result %s)", s.activeState, s.subState, s.result)
	}
	return ""
}

// gateVerdict judges a unit after a restart from the samples taken over the settle window: it
// must end active, must not have failed or stopped on the way, and systemd must not have restarted
// it on its own (NRestarts above baseline). An empty verdict means healthy.
func gateVerdict(baseline unitSample, samples []unitSample) string {
	if len(samples) == 0 {
		return "the unit was never observed after the restart"
	}
	for _, s := range samples {
		if p := sampleProblem(baseline, s); p != "" {
			return p
		}
	}
	if last := samples[len(samples)-1]; last.activeState != "active" {
		return fmt.Sprintf("the unit is %s/%s, not active, at the end of the settle window", last.activeState, last.subState)
	}
	return ""
}

// watchUnit samples the unit every cfg.healthPoll for cfg.healthSettle, stopping early on a
// sample that already fails the gate. When ctx ends (the task's unit is being stopped) it takes
// one last sample and returns, so the caller can still decide and record quickly.
func watchUnit(ctx context.Context, cfg *config, unit string, baseline unitSample) ([]unitSample, bool) {
	var samples []unitSample
	deadline := time.Now().Add(cfg.healthSettle)
	quick := context.WithoutCancel(ctx)
	for {
		s, err := sampleUnit(quick, cfg, unit)
		if err == nil {
			samples = append(samples, s)
			if sampleProblem(baseline, s) != "" {
				return samples, false
			}
		}
		if !time.Now().Before(deadline) {
			return samples, false
		}
		select {
		case <-ctx.Done():
			if s, err := sampleUnit(quick, cfg, unit); err == nil {
				samples = append(samples, s)
			}
			return samples, true
		case <-time.After(min(cfg.healthPoll, time.Until(deadline))):
		}
	}
}

// cmdResult is what one finished command left behind.
type cmdResult struct {
	argv     []string
	stdout   string
	stderr   string
	exitCode int // -1 when the command did not run or was killed
	err      error
	timedOut bool
	note     string // a remark on a success, e.g. that systemctl stopped waiting for a running job
}

// runCommand runs argv with a timeout and childEnv; a non-zero exit, a timeout or a missing
// program is an error naming the command, with the tail of its stderr.
func runCommand(ctx context.Context, timeout time.Duration, argv ...string) cmdResult {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.WaitDelay = 5 * time.Second
	cmd.Env = childEnv()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	res := cmdResult{argv: argv, stdout: stdout.String(), stderr: tail(stderr.String(), 2048), exitCode: -1}
	if cmd.ProcessState != nil {
		res.exitCode = cmd.ProcessState.ExitCode()
	}
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

// tail keeps the last n bytes of s, where the reason of a failure usually is.
func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "…" + s[len(s)-n:]
}

// The dispatcher takes the queue's claims in arrival order and starts one task per unit and image
// (see queuedTask), one unit at a time: while a unit's task runs, its later claims wait.
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
// In a burst every claim wakes it; looks are dispatchLookGap apart, the wakes between folded.
func (s *server) runDispatcher(ctx context.Context) {
	s.reconcile(ctx, claimDispatching, s.now().Add(time.Second))
	for ctx.Err() == nil {
		looked := time.Now()
		wait := s.dispatchNext(ctx)
		if ev := s.probes.take(s.now(), false); ev != nil {
			s.events.Record(*ev)
		}
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

// dispatchNext starts the next task that is due and returns how long to wait before looking
// again (0: at once).
func (s *server) dispatchNext(ctx context.Context) time.Duration {
	if now := s.now(); now.Sub(s.reconciled) >= dispatchPoll {
		s.reconciled = now
		s.reconcile(ctx, claimDispatching, now.Add(-2*dispatchTimeout))
		s.reconcile(ctx, claimDispatched, now.Add(-taskCheckAfter))
	}
	qt, ok, pending, err := s.events.nextTask(ctx, s.now(), func(qt queuedTask) []event {
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
	case pending > 0:
		return dispatchPoll
	}
	return dispatchIdle
}

// startTask runs systemd-run for qt and settles its claims: dispatched, pending again for a retry
// with backoff, or failed once the attempts or the claim's age are used up. A systemd-run under
// way is finished and recorded also at shutdown.
func (s *server) startTask(ctx context.Context, qt queuedTask) {
	bg := context.WithoutCancel(ctx)
	taskUnit := taskUnitName(qt.delivery)
	res := s.runTask(bg, qt.taskSpec)
	now := s.now()
	status, reason, code, retryAt := claimDispatched, "", 0, time.Time{}
	switch {
	case res.err == nil:
		s.log.infof("dispatched %s for %s (%s), covering %d deliveries", taskUnit, qt.unit, qt.image, len(qt.covered))
	case qt.attempts+1 < dispatchAttempts && now.Sub(qt.claimed) < dispatchMaxAge:
		status, reason, code, retryAt = claimPending, "dispatch-retry", http.StatusServiceUnavailable, now.Add(retryDelay(qt.attempts))
		s.log.warnf("cannot dispatch the redeploy of %s (attempt %d of %d), retrying in %s: %v",
			qt.unit, qt.attempts+1, dispatchAttempts, retryDelay(qt.attempts), res.err)
	default:
		status, reason, code = claimFailed, "dispatch-failed", http.StatusInternalServerError
		s.log.errorf("cannot dispatch the redeploy of %s after %d attempts, giving up on delivery %s and %d it covers: %v",
			qt.unit, qt.attempts+1, qt.delivery, len(qt.covered)-1, res.err)
	}
	errText := ""
	if res.err != nil {
		errText = res.err.Error()
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

// dispatchRows are the rows of qt's claims saying reason ("" none), with the command's result
// when it failed; the rows of one dispatch share a request id, as a task's do.
func dispatchRows(qt queuedTask, reason string, code int, now time.Time, res cmdResult, retryAt time.Time) []event {
	if reason == "" {
		return nil
	}
	evs := make([]event, 0, len(qt.covered))
	id := newRequestID()
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

// runTask starts run-task for spec as a transient user unit. A systemd-run that failed although
// the task started (cut off after the unit was up) counts as done: a second task would redeploy
// twice.
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
	p, err := showUnit(ctx, s.cfg, taskUnitName(delivery)+".service", "LoadState", "ActiveState")
	if err != nil {
		return taskUnknown
	}
	if p["LoadState"] == "loaded" {
		switch p["ActiveState"] {
		case "active", "activating", "deactivating", "reloading":
			return taskRunning
		}
		return taskEnded
	}
	ran, err := s.events.taskRan(ctx, delivery, since)
	switch {
	case err != nil:
		return taskUnknown
	case ran:
		return taskEnded
	}
	return taskNotStarted
}

// reconcile settles the claims left in status since before. A dispatching claim (the server
// stopped during systemd-run) is dispatched if its task started, else pending again; running it
// again is harmless, as an unchanged image is up-to-date. A dispatched claim whose task unit is
// gone without marking it done (killed) becomes done, so its unit's queue moves on.
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
		var err error
		switch {
		case st == taskUnknown:
			continue
		case status == claimDispatched && st == taskRunning:
			err = s.events.settleTask(ctx, t.taskUnit, claimDispatched, "", time.Time{}, nil)
		case status == claimDispatched:
			s.log.warnf("%s for %s ended without recording its end (killed?)", t.taskUnit, t.unit)
			err = s.events.settleTask(ctx, t.taskUnit, claimDone, "the task ended without recording its end", time.Time{}, nil)
		case st == taskNotStarted:
			s.log.warnf("%s for %s was being dispatched when the server stopped: queued again", t.taskUnit, t.unit)
			err = s.events.settleTask(ctx, t.taskUnit, claimPending, "the server stopped during systemd-run", s.now(), nil)
		default:
			err = s.events.settleTask(ctx, t.taskUnit, claimDispatched, "", time.Time{}, nil)
		}
		if err != nil && ctx.Err() == nil {
			s.log.errorf("delivery queue: %s: %v", t.taskUnit, err)
		}
	}
}
