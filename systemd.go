// systemd.go owns everything that talks to systemd: socket activation (sd_listen_fds(3)),
// readiness and watchdog notifications (sd_notify(3)), unit name validation and resolution, the
// systemctl command lines (start, restart, show, and a start that outlives its time limit), a
// delivery's unit lookup (the unit's Quadlet file and its Image=, concurrent systemctl show calls
// shared), the run-task transient unit (its name, its systemd-run argv and the allow-listed
// environment of every child process), and the health gate's unit samples and verdict. The manual
// triggers that restart units are scheduler.go's.
//
// Rules: the activation and notify variables are read straight from the environment and unset
// once read, so no child process (systemctl, podman, systemd-run) inherits them; passed fds are
// marked close-on-exec for the same reason. Every value that reaches systemctl's argv has passed
// validUnitName and follows "--".
package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
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

// taskSpec is what one run-task is asked to do.
type taskSpec struct {
	unit     string // validated service name
	image    string // validated image reference
	event    string // X-GitHub-Event, or "manual"
	delivery string // GitHub delivery id, or a generated one; names the transient unit
	path     string // the request path that caused it
	force    bool   // restart even when the pulled image is unchanged
	digest   string // manifest digest the delivery named, recorded for verification
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
