// main_cli_test.go tests main.go: the command line through run (subcommands, usage, exit
// statuses), the configuration read from the environment and overridden by flags (defaults,
// invalid values, durations too large to represent), flag parsing with interspersed arguments,
// the default state directory rule and the units' environment file, and, on the rig, a deployed
// user's CLI finding the server's state with no flags.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestCommandLine(t *testing.T) {
	for _, tc := range []struct {
		args       []string
		code       int
		stdout     string // substring
		stderr     string // substring
		wantStderr bool
	}{
		{args: []string{"help"}, code: 0, stdout: "usage: webhook-auto-update"},
		{args: []string{"-h"}, code: 0, stdout: "usage: webhook-auto-update"},
		{args: []string{"--help"}, code: 0, stdout: "usage: webhook-auto-update"},
		{args: []string{"version"}, code: 0, stdout: "webhook-auto-update "},
		{args: []string{"--version"}, code: 0, stdout: "webhook-auto-update "},
		{args: []string{}, code: 2, stderr: "usage: webhook-auto-update", wantStderr: true},
		{args: []string{"frobnicate"}, code: 2, stderr: "usage: webhook-auto-update", wantStderr: true},
		{args: []string{"--frobnicate"}, code: 2, stderr: `"--frobnicate"`, wantStderr: true},
		{args: []string{"server", "-h"}, code: 0, stdout: "usage: webhook-auto-update server"},
		{args: []string{"--server", "-h"}, code: 0, stdout: "usage: webhook-auto-update server"},
		{args: []string{"--server", "--help"}, code: 0, stdout: "usage: webhook-auto-update server"},
		{args: []string{"server", "--bogus"}, code: 2, stderr: "usage: webhook-auto-update server", wantStderr: true},
		{args: []string{"server", "--listen"}, code: 2, stderr: "listen", wantStderr: true},
		{args: []string{"server", "--listen", "127.0.0.1:0", "extra"}, code: 2, stderr: `"extra"`, wantStderr: true},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			code, stdout, stderr := runCLI(t, map[string]string{"WEBHOOK_STATE_DIR": t.TempDir()}, tc.args...)
			if code != tc.code {
				t.Errorf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, stdout, stderr)
			}
			if !strings.Contains(stdout, tc.stdout) || !strings.Contains(stderr, tc.stderr) {
				t.Errorf("stdout %q, stderr %q; want them to contain %q and %q", stdout, stderr, tc.stdout, tc.stderr)
			}
			if !tc.wantStderr && stderr != "" {
				t.Errorf("unexpected stderr %q", stderr)
			}
			if tc.code != 0 && stdout != "" {
				t.Errorf("a failing command wrote to stdout: %q", stdout)
			}
		})
	}
}

func TestInvalidVariables(t *testing.T) {
	for _, tc := range []struct{ name, value string }{
		{"WEBHOOK_LIMIT1_COUNT", "abc"},
		{"WEBHOOK_LIMIT1_WINDOW", "0"},
		{"WEBHOOK_LIMIT2_COUNT", "-1"},
		{"WEBHOOK_LIMIT2_WINDOW", "1h"},
		{"AUTO_UPDATE_INTERVAL_SECS", "x"},
		{"WEBHOOK_MAX_BODY_BYTES", "0"},
		{"WEBHOOK_MAX_BODY_BYTES", "5MiB"},
		{"WEBHOOK_SCHEDULER_MAX_TICKS", "-3"},
		{"WEBHOOK_IMAGE_LIMIT_COUNT", "1.5"},
		{"WEBHOOK_IMAGE_LIMIT_WINDOW", "0"},
		{"WEBHOOK_PULL_ATTEMPTS", "three"},
		{"WEBHOOK_PULL_RETRY_SECS", "-5"},
		{"WEBHOOK_PULL_TIMEOUT_SECS", "99999999999999999999"},
		{"WEBHOOK_COMMAND_TIMEOUT_SECS", "0"},
		{"WEBHOOK_DB_URL", ":memory:"},
		{"WEBHOOK_BODY_BUDGET_BYTES", "0"},
		{"WEBHOOK_REGISTRY_HOSTS", "ghcr.io,docker-archive:"},
		{"WEBHOOK_REGISTRY_HOSTS", "https://ghcr.io"},
		{"WEBHOOK_DB_URL", "postgres://x"},
		{"WEBHOOK_DB_URL", "sqlite://events.db?mode=ro"},
		{"WEBHOOK_ALLOW_ANY_IMAGE", "maybe"},
		{"WEBHOOK_DEFAULT_WINDOW", "Sat *-*-* 25:00"}, // judged by systemd-analyze at the server's start
	} {
		t.Run(tc.name+"="+tc.value, func(t *testing.T) {
			env := map[string]string{tc.name: tc.value}
			if tc.name == "WEBHOOK_DEFAULT_WINDOW" {
				env["WEBHOOK_DEFAULT_WINDOW_LENGTH"] = "1h"
			}
			code, stdout, stderr := runCLI(t, env, "server", "--listen", "127.0.0.1:0", "--state-dir", t.TempDir())
			if code != 2 {
				t.Fatalf("exit %d, want 2\nstderr: %s", code, stderr)
			}
			if !strings.Contains(stderr, tc.name) || !strings.Contains(stderr, tc.value) {
				t.Errorf("stderr %q does not name %s and its value %q", stderr, tc.name, tc.value)
			}
			if lines := strings.Count(stderr, "\n"); lines != 1 || !strings.HasPrefix(stderr, "<3>") {
				t.Errorf("stderr %q, want one error line with the <3> priority", stderr)
			}
			if stdout != "" {
				t.Errorf("stdout %q, want nothing", stdout)
			}
		})
	}
}

// TestHugeSecondsDoNotWrap checks that a number of seconds too large for a time.Duration is
// refused rather than wrapped into a negative or tiny interval, which would turn a window that
// is meant to be very long into no limit at all.
func TestHugeSecondsDoNotWrap(t *testing.T) {
	for _, name := range []string{"WEBHOOK_LIMIT1_WINDOW", "WEBHOOK_LIMIT2_WINDOW", "WEBHOOK_IMAGE_LIMIT_WINDOW",
		"AUTO_UPDATE_INTERVAL_SECS", "WEBHOOK_PULL_TIMEOUT_SECS", "WEBHOOK_COMMAND_TIMEOUT_SECS"} {
		for _, value := range []string{"18446744074"} { // 2^64 ns in seconds: wraps to 290ms
			t.Run(name+"="+value, func(t *testing.T) {
				cfg, err := loadConfig(mapEnv(map[string]string{name: value}))
				if err != nil {
					if !strings.Contains(err.Error(), name) {
						t.Errorf("error %q does not name %s", err, name)
					}
					return
				}
				for _, d := range []time.Duration{cfg.autoUpdateLimits[0].span, cfg.autoUpdateLimits[1].span,
					cfg.imageLimit.span, cfg.interval, cfg.pullTimeout, cfg.commandTimeout} {
					if d < time.Second {
						t.Fatalf("%s=%s accepted as a duration of %v", name, value, d)
					}
				}
			})
		}
	}
}

func TestFlagsOverrideEnvironment(t *testing.T) {
	env := map[string]string{"WEBHOOK_STATE_DIR": "/from/env", "WEBHOOK_DB_URL": "sqlite://env.db"}
	c := &cli{getenv: mapEnv(env), stdout: io.Discard, stderr: io.Discard, log: newLogger(io.Discard)}
	var listen string
	cfg, rest, code := c.setup("test", "usage", []string{"pos", "--state-dir", "/from/flag", "--db", "flag.db", "--listen", "[::1]:9"},
		func(fs *flag.FlagSet, cfg *config) { fs.StringVar(&listen, "listen", cfg.listen, "") })
	if code >= 0 {
		t.Fatalf("setup exit %d", code)
	}
	if cfg.stateDir != "/from/flag" || cfg.dbPath != "/from/flag/flag.db" || listen != "[::1]:9" {
		t.Errorf("stateDir %q, dbPath %q, listen %q", cfg.stateDir, cfg.dbPath, listen)
	}
	if cfg.webDist != "/from/flag/web/dist" || cfg.debugPayloadPath != "/from/flag/last_payload.bin" {
		t.Errorf("webDist %q, debugPayloadPath %q: not derived from the flag's state dir", cfg.webDist, cfg.debugPayloadPath)
	}
	if !reflect.DeepEqual(rest, []string{"pos"}) {
		t.Errorf("rest %q, want [pos]", rest)
	}
}

func TestLoadConfigDefaults(t *testing.T) {
	if _, err := os.Stat(legacyStateDir); err == nil {
		t.Fatalf("%s exists on this host: the default state directory would be it, not the home one this test checks", legacyStateDir)
	}
	home := t.TempDir()
	cfg, err := loadConfig(mapEnv(map[string]string{"HOME": home}))
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.finish(); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(home, ".local", "state", "webhook-auto-update")
	for _, tc := range []struct {
		name      string
		got, want any
	}{
		{"stateDir", cfg.stateDir, state},
		{"dbPath", cfg.dbPath, state + "/data/pod-upgrade-trigger.db"},
		{"listen", cfg.listen, "127.0.0.1:8088"},
		{"autoUpdateUnit", cfg.autoUpdateUnit, "podman-auto-update.service"},
		{"webDist", cfg.webDist, state + "/web/dist"},
		{"debugPayloadPath", cfg.debugPayloadPath, state + "/last_payload.bin"},
		{"allowAnyImage", cfg.allowAnyImage, false},
		{"envFile", cfg.envFile, ""},
		{"maxBodyBytes", cfg.maxBodyBytes, int64(5 << 20)},
		{"interval", cfg.interval, 900 * time.Second},
		{"maxTicks", cfg.maxTicks, 0},
		{"limit1", cfg.autoUpdateLimits[0], window{2, 600 * time.Second}},
		{"limit2", cfg.autoUpdateLimits[1], window{10, 18000 * time.Second}},
		{"imageLimit", cfg.imageLimit, window{60, time.Hour}},
		{"pullAttempts", cfg.pullAttempts, 3},
		{"pullRetryDelay", cfg.pullRetryDelay, 5 * time.Second},
		{"bodyBudget", cfg.bodyBudget, int64(32 << 20)},
		{"registryHosts", cfg.registryHosts, []string{"ghcr.io"}},
	} {
		if !reflect.DeepEqual(tc.got, tc.want) {
			t.Errorf("default %s = %v, want %v", tc.name, tc.got, tc.want)
		}
	}
	for _, d := range []time.Duration{cfg.readHeaderTimeout, cfg.readTimeout, cfg.writeTimeout, cfg.idleTimeout} {
		if d <= 0 {
			t.Errorf("an http.Server timeout is unset: a slow client could hold a connection forever")
		}
	}

	cfg, err = loadConfig(mapEnv(map[string]string{
		"WEBHOOK_TOKEN": " tok ", "GITHUB_ALLOWED_EVENTS": "package, registry_package,,",
		"WEBHOOK_MANUAL_UNITS": "a.service,\nb\r\n, c ", "WEBHOOK_REGISTRY_HOSTS": "ghcr.io, Containers.GHE.example.com,127.0.0.1:5000",
	}))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.token != "tok" || cfg.manualToken != "tok" {
		t.Errorf("token %q, manual token %q; want both \"tok\" (the manual token defaults to WEBHOOK_TOKEN)", cfg.token, cfg.manualToken)
	}
	if !reflect.DeepEqual(cfg.allowedEvents, []string{"package", "registry_package"}) {
		t.Errorf("allowedEvents %q", cfg.allowedEvents)
	}
	if !reflect.DeepEqual(cfg.manualUnits, []string{"a.service", "b", "c"}) {
		t.Errorf("manualUnits %q", cfg.manualUnits)
	}
	if !reflect.DeepEqual(cfg.registryHosts, []string{"ghcr.io", "containers.ghe.example.com", "127.0.0.1:5000"}) {
		t.Errorf("registryHosts %q", cfg.registryHosts)
	}
}

// TestDefaultStateDir: one rule for every subcommand and the units, which set none. The original
// tool's directory wins when it exists, so a host that switches binaries keeps its state; else
// the XDG state directory, else the one under HOME; neither is "" (finish reports it).
func TestDefaultStateDir(t *testing.T) {
	for _, tc := range []struct {
		name   string
		env    map[string]string
		legacy bool
		want   string
	}{
		{"legacy directory exists", map[string]string{"HOME": "/home/me", "XDG_STATE_HOME": "/x"}, true, "/srv/pod-upgrade-trigger"},
		{"XDG_STATE_HOME", map[string]string{"HOME": "/home/me", "XDG_STATE_HOME": "/x/state"}, false, "/x/state/webhook-auto-update"},
		{"HOME only", map[string]string{"HOME": "/home/me"}, false, "/home/me/.local/state/webhook-auto-update"},
		{"relative XDG_STATE_HOME is ignored, as the XDG spec says", map[string]string{"HOME": "/home/me", "XDG_STATE_HOME": "state"}, false, "/home/me/.local/state/webhook-auto-update"},
		{"relative HOME", map[string]string{"HOME": "me"}, false, ""},
		{"nothing", nil, false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := defaultStateDir(mapEnv(tc.env), tc.legacy); got != tc.want {
				t.Errorf("defaultStateDir(%v, legacy %v) = %q, want %q", tc.env, tc.legacy, got, tc.want)
			}
		})
	}
}

// TestStateDirAndEnvFile runs the command line as a deployed user runs it: no flags, HOME set,
// and maybe the units' environment file. The environment wins over the file, a flag over both,
// and a broken file or no state directory at all is a configuration error (exit 2) that says
// what to set.
func TestStateDirAndEnvFile(t *testing.T) {
	if _, err := os.Stat(legacyStateDir); err == nil {
		t.Fatalf("%s exists on this host: the default state directory would be it", legacyStateDir)
	}
	for _, tc := range []struct {
		name     string
		file     string // the environment file's content; "-" none
		env      map[string]string
		args     []string
		code     int
		state    string // relative to HOME
		stderr   string
		dbInFile bool
	}{
		{name: "no file: the home default", file: "-", code: 0, state: ".local/state/webhook-auto-update"},
		{name: "XDG_STATE_HOME", file: "-", env: map[string]string{"XDG_STATE_HOME": "{home}/xdg"}, code: 0, state: "xdg/webhook-auto-update"},
		{name: "state dir from the file", file: "# comment\n; other\n\nWEBHOOK_STATE_DIR={home}/from-file\n", code: 0, state: "from-file"},
		{name: "quoted value", file: "WEBHOOK_STATE_DIR=\"{home}/quoted\"\n", code: 0, state: "quoted"},
		{name: "environment wins", file: "WEBHOOK_STATE_DIR={home}/from-file\n", env: map[string]string{"WEBHOOK_STATE_DIR": "{home}/from-env"}, code: 0, state: "from-env"},
		{name: "flag wins", file: "WEBHOOK_STATE_DIR={home}/from-file\n", env: map[string]string{"WEBHOOK_STATE_DIR": "{home}/from-env"},
			args: []string{"--state-dir", "{home}/from-flag"}, code: 0, state: "from-flag"},
		{name: "a bad value in the file is exit 2", file: "WEBHOOK_PULL_ATTEMPTS=three\n", code: 2, stderr: "WEBHOOK_PULL_ATTEMPTS"},
		{name: "a bad database URL in the file is exit 2", file: "WEBHOOK_DB_URL=postgres://db/x\n", code: 2, stderr: "WEBHOOK_DB_URL"},
		{name: "a line that is not NAME=value", file: "export WEBHOOK_STATE_DIR\n", code: 2, stderr: "webhook-auto-update.env: line 1"},
		{name: "a continuation line", file: "WEBHOOK_MANUAL_UNITS=a,\\\n b\n", code: 2, stderr: "continuations"},
		{name: "no HOME and nothing set", file: "-", env: map[string]string{"HOME": ""}, code: 2, stderr: "--state-dir"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			home := t.TempDir()
			fill := func(s string) string { return strings.ReplaceAll(s, "{home}", home) }
			if tc.file != "-" {
				dir := filepath.Join(home, ".config", "webhook-auto-update")
				if err := os.MkdirAll(dir, 0o700); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(dir, "webhook-auto-update.env"), []byte(fill(tc.file)), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			env := map[string]string{"HOME": home}
			for k, v := range tc.env {
				env[k] = fill(v)
			}
			var args []string
			for _, a := range tc.args {
				args = append(args, fill(a))
			}
			// A dry run runs no systemctl but writes its row, so the event log shows which state
			// directory the command used.
			code, stdout, stderr := runCLI(t, env, append([]string{"trigger-units", "app", "--dry-run"}, args...)...)
			if code != tc.code || !strings.Contains(stderr, tc.stderr) {
				t.Fatalf("exit %d, want %d with stderr containing %q\nstdout: %s\nstderr: %s", code, tc.code, tc.stderr, stdout, stderr)
			}
			if tc.code != 0 {
				return
			}
			db := filepath.Join(home, tc.state, "data", "pod-upgrade-trigger.db")
			if _, err := os.Stat(db); err != nil {
				t.Errorf("no event log at %s: %v (the command used another state directory)", db, err)
			}
		})
	}
}

func TestParseInterspersed(t *testing.T) {
	for _, tc := range []struct {
		name    string
		args    []string
		rest    []string
		x       string
		v       bool
		wantErr error // nil, flag.ErrHelp, or errAny
	}{
		{name: "empty", args: nil, rest: nil},
		{name: "positional only", args: []string{"a", "b"}, rest: []string{"a", "b"}},
		{name: "flags first", args: []string{"-x", "1", "-v", "a"}, rest: []string{"a"}, x: "1", v: true},
		{name: "flags after positionals", args: []string{"a", "-x", "1", "b", "--v"}, rest: []string{"a", "b"}, x: "1", v: true},
		{name: "x=value form", args: []string{"a", "--x=2"}, rest: []string{"a"}, x: "2"},
		{name: "terminator", args: []string{"a", "--", "-x", "b"}, rest: []string{"a", "-x", "b"}},
		{name: "terminator first", args: []string{"--", "-v"}, rest: []string{"-v"}},
		{name: "flag after terminator not parsed", args: []string{"-v", "--", "-x", "3"}, rest: []string{"-x", "3"}, v: true},
		{name: "single dash is positional", args: []string{"-", "-v"}, rest: []string{"-"}, v: true},
		{name: "unknown flag", args: []string{"a", "-y"}, wantErr: errAny},
		{name: "missing value", args: []string{"a", "-x"}, wantErr: errAny},
		{name: "help", args: []string{"a", "-h"}, wantErr: flag.ErrHelp},
		// "--" as the value of a flag is a value, not the end of the flags.
		{name: "terminator as a value", args: []string{"-x", "--", "a", "-v"}, rest: []string{"a"}, x: "--", v: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := flag.NewFlagSet("t", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			x := fs.String("x", "", "")
			v := fs.Bool("v", false, "")
			rest, err := parseInterspersed(fs, tc.args)
			switch {
			case tc.wantErr == errAny:
				if err == nil {
					t.Fatalf("no error, rest %q", rest)
				}
				return
			case tc.wantErr != nil:
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err %v, want %v", err, tc.wantErr)
				}
				return
			case err != nil:
				t.Fatalf("err %v", err)
			}
			if !reflect.DeepEqual(rest, tc.rest) || *x != tc.x || *v != tc.v {
				t.Errorf("rest %q x %q v %v; want %q %q %v", rest, *x, *v, tc.rest, tc.x, tc.v)
			}
		})
	}
}

var errAny = errors.New("any error")

// TestE2EDeployedUserCLI: the server runs as a user unit with no --state-dir, as the shipped units
// run it; the same user's events and trigger-units, with no flags, see and use its state — with
// the default directory, and with WEBHOOK_STATE_DIR set only in the units' environment file.
func TestE2EDeployedUserCLI(t *testing.T) {
	r := needRig(t)
	bin := buildBinary(t)
	for _, tc := range []struct {
		name, envFile, state string // state relative to HOME
	}{
		{"default state directory", "", ".local/state/webhook-auto-update"},
		{"state directory from the environment file", "WEBHOOK_STATE_DIR={home}/elsewhere\n", "elsewhere"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			home := r.TempDir(t) // the deployed user's
			envFile := filepath.Join(home, ".config", "webhook-auto-update", "webhook-auto-update.env")
			if tc.envFile != "" {
				if err := os.MkdirAll(filepath.Dir(envFile), 0o700); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(envFile, []byte(strings.ReplaceAll(tc.envFile, "{home}", home)), 0o600); err != nil {
					t.Fatal(err)
				}
				r.Chown(t, filepath.Join(home, ".config"), filepath.Dir(envFile), envFile)
			}
			port, err := rigFreePort()
			if err != nil {
				t.Fatal(err)
			}
			// As the shipped webhook-auto-update.service, with this test's HOME for the user's.
			server := rigUniqueName(t, "webhook") + ".service"
			r.InstallUnit(t, server, fmt.Sprintf(`[Service]
Type=notify
NotifyAccess=main
Environment=HOME=%s
EnvironmentFile=-%s
ExecStart=%s server --listen 127.0.0.1:%d
`, home, envFile, bin, port))
			app := rigUniqueName(t, "app") + ".service"
			r.InstallUnit(t, app, "[Service]\nExecStart=/bin/sleep 1000\n")
			if _, err := r.Systemctl(t, "start", server, app); err != nil {
				t.Fatal(err)
			}
			// A 404 is written at once (successful probes are summarised a minute later).
			var resp *http.Response
			r.WaitFor(t, 30*time.Second, func() bool {
				resp, err = http.Get(fmt.Sprintf("http://127.0.0.1:%d/e2e-cli-check", port))
				return err == nil
			}, server+" to answer")
			resp.Body.Close()

			// The deployed user's shell: HOME and the user manager's runtime directory, nothing else.
			cli := func(args ...string) string {
				t.Helper()
				cmd := r.Command(bin, args...)
				cmd.Env = []string{"HOME=" + home, "PATH=" + rigSystemPath, "XDG_RUNTIME_DIR=" + r.runtimeDir}
				out, err := cmd.CombinedOutput()
				if err != nil {
					t.Fatalf("webhook-auto-update %s: %v\n%s", strings.Join(args, " "), err, out)
				}
				return string(out)
			}
			pid := r.Show(t, app, "MainPID")["MainPID"]
			if out := cli("trigger-units", app, "--caller", "e2e"); !strings.Contains(out, app+" -> triggered") {
				t.Fatalf("trigger-units: %s", out)
			}
			if now := r.Show(t, app, "MainPID")["MainPID"]; now == pid {
				t.Errorf("%s not restarted (MainPID %s)", app, pid)
			}
			out := cli("events", "--json")
			for _, want := range []string{`"path":"/e2e-cli-check"`, `"action":"cli-trigger"`} {
				if !strings.Contains(out, want) {
					t.Errorf("events does not show %s: the CLI and the server use different state\n%s", want, out)
				}
			}
			if _, err := os.Stat(filepath.Join(home, tc.state, "data", "pod-upgrade-trigger.db")); err != nil {
				t.Errorf("no event log under %s: %v", tc.state, err)
			}
		})
	}
}
