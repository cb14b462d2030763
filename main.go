// main.go owns the command line: subcommand dispatch, the configuration (environment, the units'
// environment file, flags), the default state directory, the usage text and the logger.
//
// Rules: only main calls os.Exit; a subcommand returns its exit status (0 all good, 1 a runtime
// failure, 2 a usage or configuration error). Results go to stdout, log lines to stderr, one per
// event with a syslog priority prefix (<3> error, <4> warning, <6> info) for journald. Log text is
// lowercase with no trailing period, names what failed and how to fix it, and holds no secret.
package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"time"
)

func main() {
	os.Exit(run(os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

const usage = `usage: webhook-auto-update <command> [flags]

commands:
  server         serve GitHub package webhooks and the manual API over HTTP
  scheduler      start the auto-update unit on a fixed interval
  trigger-units  restart the named units now
  trigger-all    restart the auto-update unit and WEBHOOK_MANUAL_UNITS now
  prune-state    drop old entries from the state directory
  events         show what happened, from the event log
  approve        approve a delivery awaiting approval (reject: refuse it)
  notify-test    send a test message to every WEBHOOK_NOTIFY_URLS target
  check          compare each unit's image with its registry (skopeo)
  run-task       run one redeploy (started by the server through systemd-run)
  version        print the version
  help           print this text

Every command reads its configuration from the environment, then from
~/.config/webhook-auto-update/webhook-auto-update.env (see README.md), and accepts
--state-dir DIR and --db URL to override WEBHOOK_STATE_DIR and WEBHOOK_DB_URL.
Run 'webhook-auto-update <command> -h' for the flags of one command.
`

// cli carries the process boundaries, so a test can run the whole program in-process.
type cli struct {
	getenv         func(string) string
	stdout, stderr io.Writer
	log            *logger
}

var commands = map[string]func(c *cli, args []string) int{
	"server":        cmdServer,
	"run-task":      cmdRunTask,
	"scheduler":     cmdScheduler,
	"trigger-units": func(c *cli, a []string) int { return cmdTrigger(c, a, "trigger-units", usageTriggerUnits) },
	"trigger-all":   func(c *cli, a []string) int { return cmdTrigger(c, a, "trigger-all", usageTriggerAll) },
	"prune-state":   cmdPruneState,
	"events":        cmdEvents,
	"approve":       func(c *cli, a []string) int { return cmdDecide(c, a, "approve") },
	"reject":        func(c *cli, a []string) int { return cmdDecide(c, a, "reject") },
	"notify-test":   cmdNotifyTest,
	"check":         cmdCheck,
	"version":       cmdVersion,
	"help":          cmdHelp,
	"h":             cmdHelp,
}

func run(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	c := &cli{getenv: getenv, stdout: stdout, stderr: stderr, log: newLogger(stderr)}
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	// The original tool spelled subcommands as flags (--server); both spellings work.
	cmd, ok := commands[strings.TrimLeft(args[0], "-")]
	if !ok {
		c.log.errorf("unknown command %q", args[0])
		fmt.Fprint(stderr, usage)
		return 2
	}
	return cmd(c, args[1:])
}

func cmdHelp(c *cli, args []string) int {
	fmt.Fprint(c.stdout, usage)
	return 0
}

func cmdVersion(c *cli, args []string) int {
	fmt.Fprintf(c.stdout, "webhook-auto-update %s\n", buildVersion())
	return 0
}

// buildVersion reports the module version and, for a build from a checkout, the commit.
func buildVersion() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	vcs := map[string]string{}
	for _, s := range info.Settings {
		vcs[s.Key] = s.Value
	}
	v := info.Main.Version
	if rev := vcs["vcs.revision"]; rev != "" {
		v += " " + rev[:min(len(rev), 12)] + map[bool]string{true: "-dirty"}[vcs["vcs.modified"] == "true"]
	}
	return strings.TrimSpace(v)
}

// config is every setting: loadConfig reads the environment, flags override it, finish derives paths.
type config struct {
	stateDir, dbURL, dbPath, listen  string
	secrets                          map[string]string // each push source's secret; "" or none: refused
	allowedEvents                    []string          // empty: every event
	registryHosts                    []string          // registry hosts a GitHub delivery may pull from, lowercase
	token, manualToken, metricsToken string
	manualUnits                      []string
	autoUpdateUnit, webDist          string
	debugPayloadPath, envFile        string            // envFile: the environment file read (envFilePath), "" none
	maxBodyBytes, bodyBudget         int64             // bodyBudget: body bytes held in memory at once, over all requests
	allowAnyImage                    bool              // units without Image= take any pushed image (see task.checkImage)
	policyDefaults                   map[string]string // policy label key → value for units without the label
	approvalTTL                      time.Duration
	forwardAuthHeader                string         // a trusted proxy's user header, "" none
	forwardAuthFrom                  []netip.Prefix // the proxies it is trusted from
	notify                           notifySettings

	interval         time.Duration
	checkInterval    time.Duration // 0: the server checks no image
	maxTicks         int           // 0: unbounded
	requestRetention time.Duration // request rows older than it are deleted (prune-state, scheduler)
	autoUpdateLimits [2]window
	imageLimit       window

	pullAttempts                                                                        int
	refusedRows, maxConns, requestRowsMax, diskReserve                                  int // refusals' rows a minute, connections, request rows kept, free bytes kept
	pullRetryDelay, pullTimeout, commandTimeout, taskLockWait, healthSettle, healthPoll time.Duration
	readHeaderTimeout, readTimeout, writeTimeout, idleTimeout, shutdownTimeout          time.Duration
}

// legacyStateDir is the original tool's state directory, used when it exists to keep its state.
const legacyStateDir = "/srv/pod-upgrade-trigger"

// defaultStateDir is the state directory of every subcommand and shipped unit; "" without HOME.
func defaultStateDir(getenv func(string) string, legacyExists bool) string {
	switch {
	case legacyExists:
		return legacyStateDir
	case filepath.IsAbs(getenv("XDG_STATE_HOME")):
		return filepath.Join(getenv("XDG_STATE_HOME"), "webhook-auto-update")
	case filepath.IsAbs(getenv("HOME")):
		return filepath.Join(getenv("HOME"), ".local", "state", "webhook-auto-update")
	}
	return ""
}

// envFilePath is the shipped units' EnvironmentFile=, read by every subcommand too.
func envFilePath(getenv func(string) string) string {
	if h := getenv("HOME"); filepath.IsAbs(h) {
		return filepath.Join(h, ".config", "webhook-auto-update", "webhook-auto-update.env")
	}
	return ""
}

// withEnvFile backs getenv with the file at path (a set variable wins); a missing file changes nothing.
func withEnvFile(getenv func(string) string, path string) (func(string) string, string, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return getenv, "", nil
	}
	if err != nil {
		return nil, "", fmt.Errorf("cannot read the environment file %s: %w (fix its permissions or remove it)", path, err)
	}
	vars, err := parseEnvFile(data)
	if err != nil {
		return nil, "", fmt.Errorf("environment file %s: %w", path, err)
	}
	return func(name string) string { return cmp.Or(getenv(name), vars[name]) }, path, nil
}

// parseEnvFile reads a systemd EnvironmentFile= (systemd.exec(5)); a line continuation is an error.
func parseEnvFile(data []byte) (map[string]string, error) {
	vars := map[string]string{}
	for i, line := range strings.Split(string(data), "\n") {
		if line = strings.TrimSpace(line); line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		name, value, ok := strings.Cut(line, "=")
		name, value = strings.TrimSpace(name), strings.TrimSpace(value)
		if !ok || !reEnvName.MatchString(name) {
			return nil, fmt.Errorf("line %d: want NAME=value", i+1)
		}
		if strings.HasSuffix(value, "\\") {
			return nil, fmt.Errorf("line %d: %s: line continuations are not supported, write the value on one line", i+1, name)
		}
		if len(value) >= 2 && (value[0] == '"' || value[0] == '\'') && value[len(value)-1] == value[0] {
			value = value[1 : len(value)-1]
		}
		vars[name] = value
	}
	return vars, nil
}

var reEnvName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// loadConfig reads the environment, backed by envFilePath; a bad value is an error naming it.
func loadConfig(getenv func(string) string) (*config, error) {
	getenv, envFile, err := withEnvFile(getenv, envFilePath(getenv))
	if err != nil {
		return nil, err
	}
	_, legacyErr := os.Stat(legacyStateDir)
	p := &envParser{getenv: getenv}
	cfg := &config{
		envFile:           envFile,
		stateDir:          p.str("WEBHOOK_STATE_DIR", defaultStateDir(getenv, legacyErr == nil)),
		dbURL:             p.str("WEBHOOK_DB_URL", "sqlite://data/pod-upgrade-trigger.db"),
		listen:            "127.0.0.1:8088",
		allowedEvents:     splitList(getenv("GITHUB_ALLOWED_EVENTS")),
		registryHosts:     p.hosts("WEBHOOK_REGISTRY_HOSTS", "ghcr.io"),
		token:             strings.TrimSpace(getenv("WEBHOOK_TOKEN")),
		manualToken:       p.str("WEBHOOK_MANUAL_TOKEN", strings.TrimSpace(getenv("WEBHOOK_TOKEN"))),
		metricsToken:      strings.TrimSpace(getenv("WEBHOOK_METRICS_TOKEN")),
		manualUnits:       splitList(getenv("WEBHOOK_MANUAL_UNITS")),
		autoUpdateUnit:    p.str("MANUAL_AUTO_UPDATE_UNIT", "podman-auto-update.service"),
		webDist:           strings.TrimSpace(getenv("WEBHOOK_WEB_DIST")),
		debugPayloadPath:  strings.TrimSpace(getenv("WEBHOOK_DEBUG_PAYLOAD_PATH")),
		maxBodyBytes:      int64(p.positive("WEBHOOK_MAX_BODY_BYTES", 5<<20)),
		bodyBudget:        int64(p.positive("WEBHOOK_BODY_BUDGET_BYTES", 32<<20)),
		allowAnyImage:     p.boolean("WEBHOOK_ALLOW_ANY_IMAGE"),
		approvalTTL:       p.seconds("WEBHOOK_APPROVAL_TTL_SECS", 7*24*3600),
		policyDefaults:    map[string]string{},
		forwardAuthHeader: http.CanonicalHeaderKey(p.str("WEBHOOK_FORWARD_AUTH_HEADER", "")),
		notify:            p.notify(),
		refusedRows:       p.positive("WEBHOOK_REFUSED_ROWS_PER_MINUTE", 60),
		maxConns:          p.positive("WEBHOOK_MAX_CONNECTIONS", 1024),
		diskReserve:       p.positive("WEBHOOK_DISK_RESERVE_MB", 256) << 20,
		requestRowsMax:    p.positive("WEBHOOK_REQUEST_ROWS_MAX", 200000),
		secrets:           map[string]string{},

		interval:         p.seconds("AUTO_UPDATE_INTERVAL_SECS", 900),
		checkInterval:    p.seconds("WEBHOOK_CHECK_INTERVAL_SECS", 0),
		maxTicks:         p.positive("WEBHOOK_SCHEDULER_MAX_TICKS", 0),
		requestRetention: p.count("WEBHOOK_REQUEST_RETENTION_DAYS", 30, 24*time.Hour, 100*366, "more than 100 years"),

		autoUpdateLimits: [2]window{
			{p.positive("WEBHOOK_LIMIT1_COUNT", 2), p.seconds("WEBHOOK_LIMIT1_WINDOW", 600)},
			{p.positive("WEBHOOK_LIMIT2_COUNT", 10), p.seconds("WEBHOOK_LIMIT2_WINDOW", 18000)},
		},
		imageLimit: window{p.positive("WEBHOOK_IMAGE_LIMIT_COUNT", 60), p.seconds("WEBHOOK_IMAGE_LIMIT_WINDOW", 3600)},

		pullAttempts:   p.positive("WEBHOOK_PULL_ATTEMPTS", 3),
		pullRetryDelay: p.seconds("WEBHOOK_PULL_RETRY_SECS", 5),
		pullTimeout:    p.seconds("WEBHOOK_PULL_TIMEOUT_SECS", 600),
		commandTimeout: p.seconds("WEBHOOK_COMMAND_TIMEOUT_SECS", 120),
		taskLockWait:   p.seconds("WEBHOOK_TASK_LOCK_TIMEOUT_SECS", 3600),
		healthSettle:   p.seconds("WEBHOOK_HEALTH_SETTLE_SECS", 20),
		healthPoll:     500 * time.Millisecond,

		readHeaderTimeout: 10 * time.Second,
		readTimeout:       60 * time.Second,
		writeTimeout:      60 * time.Second,
		idleTimeout:       120 * time.Second,
		shutdownTimeout:   25 * time.Second,
	}
	for k, name := range policyKeys {
		cfg.policyDefaults[k] = p.str(name, "")
	}
	if _, err := parsePolicy(nil, cfg.policyDefaults); err != nil {
		p.fail("invalid WEBHOOK_DEFAULT_* policy: %v", err)
	}
	for _, f := range splitList(getenv("WEBHOOK_FORWARD_AUTH_FROM")) {
		pf, err := netip.ParsePrefix(f)
		if a, aerr := netip.ParseAddr(f); aerr == nil {
			pf, err = a.Prefix(a.BitLen())
		}
		if err != nil {
			p.fail("invalid WEBHOOK_FORWARD_AUTH_FROM: %q is not an address or CIDR prefix", f)
		}
		cfg.forwardAuthFrom = append(cfg.forwardAuthFrom, pf)
	}
	if (cfg.forwardAuthHeader == "") != (len(cfg.forwardAuthFrom) == 0) {
		p.fail("WEBHOOK_FORWARD_AUTH_HEADER and WEBHOOK_FORWARD_AUTH_FROM must be set together")
	}
	for name := range pushSources {
		cfg.secrets[name] = strings.TrimSpace(getenv(secretEnv(name)))
	}
	return cfg, p.err
}

// finish resolves the settings that depend on the state directory, after flags have been read.
func (cfg *config) finish() error {
	if cfg.stateDir == "" {
		return errors.New("no state directory: set WEBHOOK_STATE_DIR or --state-dir (the default needs HOME or XDG_STATE_HOME)")
	}
	// Absolute, because redeploys run as transient units whose working directory is not ours.
	abs, err := filepath.Abs(cfg.stateDir)
	if err != nil {
		return fmt.Errorf("state directory %s: %w", cfg.stateDir, err)
	}
	cfg.stateDir = abs
	if cfg.dbPath, err = databasePath(cfg.dbURL, cfg.stateDir); err != nil {
		return err
	}
	cfg.webDist = cmp.Or(cfg.webDist, filepath.Join(cfg.stateDir, "web", "dist"))
	cfg.debugPayloadPath = cmp.Or(cfg.debugPayloadPath, filepath.Join(cfg.stateDir, "last_payload.bin"))
	return nil
}

func ensureStateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("cannot create the state directory %s: %w (set WEBHOOK_STATE_DIR or --state-dir to a writable directory)", dir, err)
	}
	return nil
}

// envParser reads typed environment variables and keeps the first error.
type envParser struct {
	getenv func(string) string
	err    error
}

func (p *envParser) fail(format string, a ...any) {
	if p.err == nil {
		p.err = fmt.Errorf(format, a...)
	}
}

func (p *envParser) str(name, def string) string {
	return cmp.Or(strings.TrimSpace(p.getenv(name)), def)
}

func (p *envParser) boolean(name string) bool {
	switch v := strings.ToLower(strings.TrimSpace(p.getenv(name))); v {
	case "", "0", "false", "no":
	case "1", "true", "yes":
		return true
	default:
		p.fail("invalid %s=%q: want true or false", name, v)
	}
	return false
}

func (p *envParser) positive(name string, def int) int {
	v := strings.TrimSpace(p.getenv(name))
	if err := (positiveInt{&def}).Set(v); err != nil && v != "" {
		p.fail("invalid %s=%q: %v", name, v, err)
	}
	return def
}

// count reads a positive number of units, at most limit of them (tooMany says why).
func (p *envParser) count(name string, def int, unit time.Duration, limit int64, tooMany string) time.Duration {
	n := p.positive(name, def)
	if int64(n) > limit {
		p.fail("invalid %s=%q: %s", name, p.getenv(name), tooMany)
		n = def
	}
	return time.Duration(n) * unit
}

func (p *envParser) seconds(name string, def int) time.Duration {
	return p.count(name, def, time.Second, math.MaxInt64/int64(time.Second), "too many seconds")
}

func (p *envParser) hosts(name, def string) []string {
	list := splitList(p.str(name, def))
	for i, h := range list {
		if list[i] = strings.ToLower(h); !reDomain.MatchString(list[i]) {
			p.fail("invalid %s=%q: %q is not a registry host (host or host:port, comma-separated)", name, p.getenv(name), h)
		}
	}
	return list
}

// notify reads WEBHOOK_NOTIFY_*; an entry is named by its number and its URL without secrets.
func (p *envParser) notify() notifySettings {
	ns := notifySettings{secret: strings.TrimSpace(p.getenv("WEBHOOK_NOTIFY_SECRET")), publicURL: p.str("WEBHOOK_PUBLIC_URL", ""),
		on: map[string]bool{}, timeout: 10 * time.Second, backoff: 5 * time.Second, maxBackoff: 10 * time.Minute, horizon: 24 * time.Hour, poll: 2 * time.Second}
	seen := map[string]int{}
	for i, entry := range splitNotifyURLs(p.getenv("WEBHOOK_NOTIFY_URLS")) {
		t, err := parseNotifyURL(entry)
		if err == nil && strings.HasPrefix(t.scheme, "generic") && ns.secret == "" {
			err = fmt.Errorf("%s: a generic target needs WEBHOOK_NOTIFY_SECRET, which signs its messages", t.name)
		}
		if err != nil {
			p.fail("invalid WEBHOOK_NOTIFY_URLS entry %d, %v", i+1, err)
		}
		if seen[t.name]++; seen[t.name] > 1 {
			t.name += " #" + strconv.Itoa(seen[t.name])
		}
		ns.targets = append(ns.targets, t)
	}
	for _, k := range splitList(p.str("WEBHOOK_NOTIFY_ON", "rolled-back,failed,rollback-failed,dispatch-failed,approval,update")) {
		if _, ok := noticeKinds[k]; !ok || k == "test" {
			p.fail("invalid WEBHOOK_NOTIFY_ON=%q: %q is not healthy, rolled-back, failed, rollback-failed, dispatch-failed, approval or update", p.getenv("WEBHOOK_NOTIFY_ON"), k)
		}
		ns.on[k] = true
	}
	if u, err := url.Parse(ns.publicURL); ns.publicURL != "" && (err != nil || u.Host == "" || u.Scheme != "https" && u.Scheme != "http") {
		p.fail("invalid WEBHOOK_PUBLIC_URL=%q: want the status page's base URL, https://host[:port][/path]", ns.publicURL)
	}
	return ns
}

// splitNotifyURLs splits at newlines and at commas that start another scheme://, so a comma in a
// URL (smtp's to=a,b) stays in it.
func splitNotifyURLs(s string) (out []string) {
	for _, f := range strings.Split(reNotifyNext.ReplaceAllString(s, "\n$1"), "\n") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

var reNotifyNext = regexp.MustCompile(`,\s*([A-Za-z][A-Za-z0-9+.-]*://)`)

const usageNotifyTest = `usage: webhook-auto-update notify-test

Sends a test message to every target of WEBHOOK_NOTIFY_URLS and prints each result; exit 1 if
any failed.
`

func cmdNotifyTest(c *cli, args []string) int {
	cfg, code := c.setupNoArgs("notify-test", usageNotifyTest, args, nil)
	if code >= 0 {
		return code
	}
	if len(cfg.notify.targets) == 0 {
		c.log.errorf("notify-test: WEBHOOK_NOTIFY_URLS is empty: no target to send to")
		return 2
	}
	n := notice{ID: newRequestID(), Kind: "test", Time: time.Now(), Reason: "webhook-auto-update notify-test"}
	n.render(cfg.notify.publicURL)
	status := 0
	for _, t := range cfg.notify.targets {
		if err := t.send(context.Background(), n, cfg.notify.secret, cfg.notify.timeout); err != nil {
			fmt.Fprintf(c.stdout, "failed %s: %v\n", t.name, oneLine(err.Error()))
			status = 1
		} else {
			fmt.Fprintf(c.stdout, "sent   %s\n", t.name)
		}
	}
	return status
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == '\n' || r == '\r' }) {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// setup reads the configuration and a subcommand's flags (define's, --state-dir and --db), mixed
// with positional arguments. It returns those and, when the command must stop, a status >= 0.
func (c *cli) setup(name, help string, args []string, define func(fs *flag.FlagSet, cfg *config)) (*config, []string, int) {
	cfg, err := loadConfig(c.getenv)
	if err != nil {
		c.log.errorf("%v", err)
		return nil, nil, 2
	}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&cfg.stateDir, "state-dir", cfg.stateDir, "")
	fs.StringVar(&cfg.dbURL, "db", cfg.dbURL, "")
	if define != nil {
		define(fs, cfg)
	}
	rest, err := parseInterspersed(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(c.stdout, help)
		return nil, nil, 0
	}
	if err != nil {
		return nil, nil, c.usageError(name, help, "%v", err)
	}
	if err := cfg.finish(); err != nil {
		c.log.errorf("%v", err)
		return nil, nil, 2
	}
	return cfg, rest, -1
}

// setupNoArgs is setup for a command that takes no positional argument.
func (c *cli) setupNoArgs(name, help string, args []string, define func(fs *flag.FlagSet, cfg *config)) (*config, int) {
	cfg, rest, code := c.setup(name, help, args, define)
	if code < 0 && len(rest) > 0 {
		return nil, c.usageError(name, help, "unexpected argument %q", rest[0])
	}
	return cfg, code
}

func (c *cli) usageError(name, help, format string, a ...any) int {
	c.log.errorf("%s: %s", name, fmt.Sprintf(format, a...))
	fmt.Fprint(c.stderr, help)
	return 2
}

// parseInterspersed parses flags that may follow positional arguments; "--" ends the flags.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var rest []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		left := fs.Args()
		used := len(args) - len(left)
		if len(left) == 0 || used > 0 && args[used-1] == "--" && (used == 1 || !isFlagValue(fs, args[used-2])) {
			return append(rest, left...), nil
		}
		rest = append(rest, left[0])
		args = left[1:]
	}
}

// positiveInt is a flag.Value that makes "--interval 0" a usage error, not a silent default.
type positiveInt struct{ p *int }

func (v positiveInt) String() string {
	if v.p == nil {
		return ""
	}
	return strconv.Itoa(*v.p)
}

func (v positiveInt) Set(s string) error {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || n <= 0 {
		return errors.New("want a whole number greater than zero")
	}
	*v.p = n
	return nil
}

// isFlagValue reports whether a "--" after the argument last is its flag's value ("-caller --").
func isFlagValue(fs *flag.FlagSet, last string) bool {
	f := fs.Lookup(strings.TrimLeft(last, "-"))
	if f == nil || !strings.HasPrefix(last, "-") || strings.Contains(last, "=") || last == "--" {
		return false
	}
	b, ok := f.Value.(interface{ IsBoolFlag() bool })
	return !ok || !b.IsBoolFlag()
}

type logger struct {
	mu sync.Mutex
	w  io.Writer
}

func newLogger(w io.Writer) *logger { return &logger{w: w} }

func (l *logger) infof(format string, a ...any)  { l.printf("<6>", format, a...) }
func (l *logger) warnf(format string, a ...any)  { l.printf("<4>", format, a...) }
func (l *logger) errorf(format string, a ...any) { l.printf("<3>", format, a...) }

func (l *logger) printf(prio, format string, a ...any) {
	// One event, one line: a multi-line command output must not split the record in journald.
	msg := strings.ReplaceAll(strings.TrimRight(fmt.Sprintf(format, a...), "\n"), "\n", `\n`)
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintf(l.w, "%swebhook-auto-update: %s\n", prio, msg)
}

// Write lets the logger stand behind a log.Logger (net/http's ErrorLog) as warnings.
func (l *logger) Write(p []byte) (int, error) {
	l.warnf("%s", strings.TrimSpace(string(p)))
	return len(p), nil
}
