// main_test.go owns the test harness: TestMain, the fake programs the test
// binary impersonates, and the rig that drives the real programs of E2E.md
// (a systemd --user manager, podman and a local registry) for system tests.
//
// Rules: the rig starts once per test binary, on the first needRig call, and
// TestMain tears it down; every unit, container and image a test creates is
// removed by that test's t.Cleanup; every command runs with a timeout; a
// missing prerequisite skips, except under CI=true or WEBHOOK_E2E=1, where it
// fails.
package main

import (
	"archive/tar"
	"bufio"
	"context"
	"database/sql"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// fakePrograms maps a program name to the fake that runs when the test binary
// is started under that name (see installFakes). Other test files register
// their fakes from init.
var fakePrograms = map[string]func() int{}

func TestMain(m *testing.M) {
	if fake, ok := fakePrograms[filepath.Base(os.Args[0])]; ok {
		os.Exit(fake())
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
	// rigCmdTimeout bounds every command the rig runs.
	rigCmdTimeout = 2 * time.Minute
	// rigSystemPath is where the rig looks for the real programs, so a test
	// that put fakes on PATH never hands a fake to the rig.
	rigSystemPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	// rigUserManager is the binary E2E.md starts as the systemd --user manager.
	rigUserManager = "/lib/systemd/systemd"
	// rigRuntimeDir is root's XDG_RUNTIME_DIR.
	rigRuntimeDir = "/run/user/0"
	// rigSystemPrivate is where root's podman auto-update looks for the system
	// manager; the rig points it at the user manager (E2E.md).
	rigSystemPrivate = "/run/systemd/private"
)

// rigRun runs name with args and a timeout and returns the combined
// output; an error names the command and carries its output.
func rigRun(timeout time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	// A child such as conmon may keep the output pipe open after the
	// command itself has exited.
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if errors.Is(err, exec.ErrWaitDelay) && cmd.ProcessState != nil && cmd.ProcessState.Success() {
		err = nil
	}
	if ctx.Err() != nil {
		err = fmt.Errorf("timed out after %s: %w", timeout, err)
	}
	if err != nil {
		return string(out), fmt.Errorf("%s: %w: %s", strings.Join(append([]string{name}, args...), " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// rigLookPath finds a program in rigSystemPath, ignoring PATH.
func rigLookPath(name string) (string, error) {
	for _, dir := range filepath.SplitList(rigSystemPath) {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found in %s", name, rigSystemPath)
}

// rigRequired reports whether system tests must run rather than skip.
func rigRequired() bool {
	return os.Getenv("CI") == "true" || os.Getenv("WEBHOOK_E2E") == "1"
}

// rigSkipOrFail skips the test, or fails it when rigRequired.
func rigSkipOrFail(t *testing.T, format string, args ...any) {
	t.Helper()
	if rigRequired() {
		t.Fatalf(format+" (CI=true or WEBHOOK_E2E=1 demands system tests)", args...)
	}
	t.Skipf(format, args...)
}

// rigMissing lists what the rig needs and this machine lacks, each with
// the Debian package that provides it.
func rigMissing() []string {
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root (uid 0)")
	}
	for _, p := range []struct{ name, pkg string }{
		{"podman", "podman"},
		{"runc", "runc"},
		{"docker-registry", "docker-registry"},
		{"systemctl", "systemd"},
		{"systemd-run", "systemd"},
	} {
		if _, err := rigLookPath(p.name); err != nil {
			missing = append(missing, fmt.Sprintf("%s (apt package %s)", p.name, p.pkg))
		}
	}
	if fi, err := os.Stat(rigUserManager); err != nil || fi.Mode()&0o111 == 0 {
		missing = append(missing, rigUserManager+" (apt package systemd)")
	}
	if err := rigCheckStatic("/bin/busybox"); err != nil {
		missing = append(missing, fmt.Sprintf("static /bin/busybox (apt package busybox-static): %v", err))
	}
	return missing
}

// rigCheckStatic reports an error unless path is a statically linked ELF
// executable, which is what lets it run alone in a test image.
func rigCheckStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked", path)
		}
	}
	return nil
}

// rig is the shared real system of E2E.md: a systemd --user manager, a local
// registry and podman configured by files in a temporary directory.
type rig struct {
	dir        string // everything the rig owns, removed at teardown
	runtimeDir string // XDG_RUNTIME_DIR of the user manager
	unitDir    string // runtime unit directory of the user manager
	registry   string // host:port of the local registry
	podman     string
	systemctl  string
	storage    string // storage driver of the rig's own store; "" means the host's store
	notes      []string

	manager        *exec.Cmd // nil when an already running manager was reused
	managerCancel  context.CancelFunc
	managerDone    chan struct{}
	registryCmd    *exec.Cmd
	registryCancel context.CancelFunc
	registryDone   chan struct{}

	createdSystemDir bool // we made /run/systemd/system
	createdPrivate   bool // we made the /run/systemd/private symlink
	managerEnv       []string
}

var (
	rigOnce     sync.Once
	rigMu       sync.Mutex // guards theRig for teardown
	theRig      *rig
	rigErr      error
	rigStartup  time.Duration
	rigReported atomic.Bool
)

// needRig returns the shared rig, starting it on first use. It skips the test
// when the machine cannot run it (see rigSkipOrFail) and fails it when the rig
// did not come up.
func needRig(t *testing.T) *rig {
	t.Helper()
	if testing.Short() {
		rigSkipOrFail(t, "system test skipped in -short mode")
	}
	if missing := rigMissing(); len(missing) > 0 {
		rigSkipOrFail(t, "system test needs %s", strings.Join(missing, ", "))
	}
	rigOnce.Do(func() {
		start := time.Now()
		r, err := rigStart()
		rigMu.Lock()
		theRig, rigErr = r, err
		rigMu.Unlock()
		rigStartup = time.Since(start)
	})
	if rigErr != nil {
		t.Fatalf("start test rig: %v", rigErr)
	}
	if !rigReported.Swap(true) {
		how := "started"
		if theRig.manager == nil {
			how = "reused"
		}
		storage := theRig.storage
		if storage == "" {
			storage = "host default"
		}
		t.Logf("test rig ready in %s: registry %s, storage %s, user manager %s", rigStartup.Round(time.Millisecond), theRig.registry, storage, how)
		for _, n := range theRig.notes {
			t.Logf("test rig: %s", n)
		}
	}
	return theRig
}

// rigStart brings up the rig; on error it tears down what it started.
func rigStart() (_ *rig, err error) {
	r := &rig{runtimeDir: rigRuntimeDir}
	rigMu.Lock()
	theRig = r // so rigTeardown cleans up a half-started rig too
	rigMu.Unlock()
	defer func() {
		if err != nil {
			if terr := rigTeardown(); terr != nil {
				err = fmt.Errorf("%w (teardown: %v)", err, terr)
			}
		}
	}()
	if r.podman, err = rigLookPath("podman"); err != nil {
		return nil, err
	}
	if r.systemctl, err = rigLookPath("systemctl"); err != nil {
		return nil, err
	}
	if r.dir, err = os.MkdirTemp("", "webhook-rig-"); err != nil {
		return nil, err
	}
	r.unitDir = filepath.Join(r.runtimeDir, "systemd", "user")
	if err := r.startManager(); err != nil {
		return nil, err
	}
	if err := r.linkPrivate(); err != nil {
		return nil, err
	}
	if err := r.startRegistry(); err != nil {
		return nil, err
	}
	if err := r.configurePodman(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(r.unitDir, 0o755); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *rig) systemctlUser(args ...string) (string, error) {
	return rigRun(rigCmdTimeout, r.systemctl, append([]string{"--user"}, args...)...)
}

// managerState returns the first line systemctl --user is-system-running prints.
func (r *rig) managerState() string {
	out, _ := r.systemctlUser("is-system-running")
	line, _, _ := strings.Cut(strings.TrimSpace(out), "\n")
	return line
}

// startManager reuses a running systemd --user manager or starts one, as in
// E2E.md.
func (r *rig) startManager() error {
	if _, err := os.Stat("/run/systemd/system"); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll("/run/systemd/system", 0o755); err != nil {
			return err
		}
		r.createdSystemDir = true
	}
	if err := os.MkdirAll(r.runtimeDir, 0o700); err != nil {
		return err
	}
	if err := os.Chmod(r.runtimeDir, 0o700); err != nil {
		return err
	}
	os.Setenv("XDG_RUNTIME_DIR", r.runtimeDir)

	switch r.managerState() {
	case "running", "degraded":
		return nil
	case "initializing", "starting":
		return r.waitManager(nil, "")
	}

	logPath := filepath.Join(r.dir, "systemd-user.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logFile.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, rigUserManager, "--user")
	cmd.Dir = "/"
	// A login-like environment, not the test's: units see only this plus
	// what set-environment adds, as on a real host.
	cmd.Env = []string{
		"HOME=/root", "USER=root", "LOGNAME=root", "SHELL=/bin/sh",
		"PATH=" + rigSystemPath, "LANG=C.UTF-8", "XDG_RUNTIME_DIR=" + r.runtimeDir,
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Pdeathsig: syscall.SIGTERM}
	// SIGTERM makes a user manager start exit.target, stopping every unit.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 20 * time.Second
	if err := cmd.Start(); err != nil {
		cancel()
		return fmt.Errorf("start %s --user: %w", rigUserManager, err)
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		close(done)
	}()
	r.manager, r.managerCancel, r.managerDone = cmd, cancel, done
	return r.waitManager(done, logPath)
}

// waitManager polls until the user manager is running or degraded.
func (r *rig) waitManager(done chan struct{}, logPath string) error {
	deadline := time.Now().Add(20 * time.Second)
	for {
		state := r.managerState()
		if state == "running" || state == "degraded" {
			return nil
		}
		exited := false
		if done != nil {
			select {
			case <-done:
				exited = true
			default:
			}
		}
		if exited || time.Now().After(deadline) {
			why := "did not become running within 20s"
			if exited {
				why = "exited: " + r.manager.ProcessState.String()
			}
			var log []byte
			if logPath != "" {
				log, _ = os.ReadFile(logPath)
			}
			return fmt.Errorf("%s --user %s (systemctl --user is-system-running: %q); its output: %s", rigUserManager, why, state, strings.TrimSpace(string(log)))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// linkPrivate points /run/systemd/private at the user manager if nothing is
// there, so podman auto-update run as root restarts user units (E2E.md).
func (r *rig) linkPrivate() error {
	target := filepath.Join(r.runtimeDir, "systemd", "private")
	if cur, err := os.Readlink(rigSystemPrivate); err == nil && cur == target {
		r.notes = append(r.notes, rigSystemPrivate+" already points at the user manager; left in place")
		return nil
	}
	if _, err := os.Lstat(rigSystemPrivate); !errors.Is(err, os.ErrNotExist) {
		r.notes = append(r.notes, rigSystemPrivate+" exists and is not ours: podman auto-update will talk to the system manager")
		return nil
	}
	if err := os.Symlink(target, rigSystemPrivate); err != nil {
		return fmt.Errorf("link %s to the user manager: %w", rigSystemPrivate, err)
	}
	r.createdPrivate = true
	return nil
}

// rigFreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func rigFreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// startRegistry runs docker-registry on a free port, retrying another port if
// the first one was taken meanwhile.
func (r *rig) startRegistry() error {
	bin, err := rigLookPath("docker-registry")
	if err != nil {
		return err
	}
	storage := filepath.Join(r.dir, "registry")
	if err := os.MkdirAll(storage, 0o700); err != nil {
		return err
	}
	for attempt := 1; ; attempt++ {
		err := r.tryRegistry(bin, storage)
		if err == nil || attempt == 3 {
			return err
		}
	}
}

func (r *rig) tryRegistry(bin, storage string) error {
	reg, err := rigServeRegistry(bin, r.dir, storage, "")
	if err != nil {
		return err
	}
	r.registry, r.registryCmd, r.registryCancel, r.registryDone = reg.addr, reg.cmd, reg.cancel, reg.done
	return nil
}

// rigRegistry is a running docker-registry.
type rigRegistry struct {
	addr   string
	cmd    *exec.Cmd
	cancel context.CancelFunc
	done   chan struct{}
}

// rigServeRegistry runs docker-registry on a free port with its config, log and storage under
// dir; extra is appended to the config (top-level YAML sections, such as notifications).
func rigServeRegistry(bin, dir, storage, extra string) (*rigRegistry, error) {
	port, err := rigFreePort()
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	// No auth section: Debian's default config demands htpasswd.
	cfg := fmt.Sprintf("version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nhttp:\n  addr: %s\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\n", addr, storage)
	cfgPath := filepath.Join(dir, "registry.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg+extra), 0o600); err != nil {
		return nil, err
	}
	logPath := filepath.Join(dir, "registry.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, bin, "serve", cfgPath)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		cancel()
		return nil, fmt.Errorf("start %s serve %s: %w", bin, cfgPath, err)
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		close(done)
	}()
	client := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, err := client.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return &rigRegistry{addr: addr, cmd: cmd, cancel: cancel, done: done}, nil
			}
		}
		exited := false
		select {
		case <-done:
			exited = true
		default:
		}
		if exited || time.Now().After(deadline) {
			cancel()
			<-done
			log, _ := os.ReadFile(logPath)
			return nil, fmt.Errorf("%s serve %s: not answering GET http://%s/v2/ (last error %v); its output: %s", bin, cfgPath, addr, err, strings.TrimSpace(string(log)))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// StartRegistry runs another docker-registry, with its own storage and extra appended to its
// config (a notifications section, say), until the test ends, and returns its host:port. Podman
// reaches it over plain HTTP with --tls-verify=false, or through a registries.conf naming it.
func (r *rig) StartRegistry(t *testing.T, extra string) string {
	t.Helper()
	bin, err := rigLookPath("docker-registry")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var reg *rigRegistry
	for attempt := 1; reg == nil; attempt++ {
		if reg, err = rigServeRegistry(bin, dir, filepath.Join(dir, "storage"), extra); err != nil && attempt == 3 {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		reg.cancel()
		<-reg.done
	})
	return reg.addr
}

// rigEnvNames are the variables the rig sets in the test process and in the
// user manager.
var rigEnvNames = []string{"CONTAINERS_CONF", "CONTAINERS_REGISTRIES_CONF", "CONTAINERS_STORAGE_CONF"}

// configurePodman writes the containers.conf and registries.conf of E2E.md and,
// where the host supports it, a storage.conf with a private image store; it
// exports them to the test process and to the user manager.
func (r *rig) configurePodman() error {
	dir := filepath.Join(r.dir, "containers")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	conf := filepath.Join(dir, "containers.conf")
	// crun fails on this machine kind (hybrid cgroups, rlimits): E2E.md.
	if err := os.WriteFile(conf, []byte(`[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
`), 0o644); err != nil {
		return err
	}
	registries := filepath.Join(dir, "registries.conf")
	if err := os.WriteFile(registries, []byte(fmt.Sprintf("[[registry]]\nlocation = %q\ninsecure = true\n", r.registry)), 0o644); err != nil {
		return err
	}
	os.Setenv("CONTAINERS_CONF", conf)
	os.Setenv("CONTAINERS_REGISTRIES_CONF", registries)

	storageConf := filepath.Join(dir, "storage.conf")
	var tried []string
	for _, driver := range []string{"overlay", "vfs"} {
		root := filepath.Join(r.dir, "storage-"+driver)
		text := fmt.Sprintf("[storage]\ndriver = %q\ngraphroot = %q\nrunroot = %q\n", driver, filepath.Join(root, "graph"), filepath.Join(root, "run"))
		if err := os.WriteFile(storageConf, []byte(text), 0o644); err != nil {
			return err
		}
		os.Setenv("CONTAINERS_STORAGE_CONF", storageConf)
		out, err := rigRun(rigCmdTimeout, r.podman, "info", "--format", "{{.Store.GraphDriverName}}")
		if err == nil && strings.TrimSpace(out) == driver {
			r.storage = driver
			break
		}
		tried = append(tried, fmt.Sprintf("%s: %v %s", driver, err, strings.TrimSpace(out)))
		rigUnmountUnder(root)
		os.RemoveAll(root)
	}
	if r.storage == "" {
		os.Unsetenv("CONTAINERS_STORAGE_CONF")
		os.Remove(storageConf)
		r.notes = append(r.notes, "no private image store works here, using the host's: "+strings.Join(tried, "; "))
	}

	args := []string{"set-environment"}
	for _, name := range rigEnvNames {
		if v, ok := os.LookupEnv(name); ok {
			args = append(args, name+"="+v)
			r.managerEnv = append(r.managerEnv, name)
		}
	}
	if _, err := r.systemctlUser(args...); err != nil {
		return err
	}
	return nil
}

// rigTeardown stops and removes whatever the rig started; it is safe to call
// when no rig was started.
func rigTeardown() error {
	rigMu.Lock()
	r := theRig
	theRig = nil
	rigMu.Unlock()
	if r == nil {
		return nil
	}
	var errs []error
	if len(r.managerEnv) > 0 && r.manager == nil {
		if _, err := r.systemctlUser(append([]string{"unset-environment"}, r.managerEnv...)...); err != nil {
			errs = append(errs, err)
		}
	}
	if r.manager != nil {
		r.managerCancel()
		<-r.managerDone
	}
	if r.createdPrivate {
		if err := os.Remove(rigSystemPrivate); err != nil {
			errs = append(errs, err)
		}
	}
	if r.createdSystemDir {
		// Only if empty: something else may have started using it.
		os.Remove("/run/systemd/system")
	}
	if r.storage != "" {
		if _, err := rigRun(rigCmdTimeout, r.podman, "rm", "--all", "--force", "--time", "0"); err != nil {
			errs = append(errs, err)
		}
		if _, err := rigRun(rigCmdTimeout, r.podman, "rmi", "--all", "--force"); err != nil {
			errs = append(errs, err)
		}
	}
	if r.registryCmd != nil {
		r.registryCancel()
		<-r.registryDone
	}
	if r.dir != "" {
		rigUnmountUnder(r.dir)
		if err := os.RemoveAll(r.dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// rigUnmountUnder detaches every mount below dir, deepest first, so a storage
// driver's leftovers cannot block removing it.
func rigUnmountUnder(dir string) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return
	}
	defer f.Close()
	var points []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) > 4 && strings.HasPrefix(fields[4], dir+"/") {
			points = append(points, fields[4])
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(points)))
	for _, p := range points {
		syscall.Unmount(p, syscall.MNT_DETACH)
	}
}

// Registry returns the local registry's host:port.
func (r *rig) Registry() string { return r.registry }

// UnitDir returns the user manager's runtime unit directory that InstallUnit
// writes to.
func (r *rig) UnitDir() string { return r.unitDir }

// Podman runs the real podman with the rig's configuration.
func (r *rig) Podman(t *testing.T, args ...string) (string, error) {
	t.Helper()
	return rigRun(rigCmdTimeout, r.podman, args...)
}

func (r *rig) mustPodman(t *testing.T, args ...string) string {
	t.Helper()
	out, err := r.Podman(t, args...)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

// Systemctl runs systemctl --user args.
func (r *rig) Systemctl(t *testing.T, args ...string) (string, error) {
	t.Helper()
	return r.systemctlUser(args...)
}

// Show returns the named properties of unit, from systemctl --user show.
func (r *rig) Show(t *testing.T, unit string, props ...string) map[string]string {
	t.Helper()
	args := []string{"show"}
	for _, p := range props {
		args = append(args, "--property="+p)
	}
	out, err := r.systemctlUser(append(args, "--", unit)...)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			m[k] = v
		}
	}
	return m
}

// WaitFor polls cond until it holds, failing the test after timeout.
func (r *rig) WaitFor(t *testing.T, timeout time.Duration, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// PushImage pushes repo:tag to the local registry as a busybox image whose
// /VERSION holds version, and returns its reference and image ID. The image
// stays tagged ref in the local store until the test ends.
func (r *rig) PushImage(t *testing.T, repo, tag, version string) (ref, imageID string) {
	t.Helper()
	return r.pushImage(t, repo, tag, version, true)
}

// PushBrokenImage pushes repo:tag as an image without /bin/busybox, so a
// container running /bin/busybox fails at once.
func (r *rig) PushBrokenImage(t *testing.T, repo, tag string) (ref, imageID string) {
	t.Helper()
	return r.pushImage(t, repo, tag, "broken", false)
}

func (r *rig) pushImage(t *testing.T, repo, tag, version string, busybox bool) (string, string) {
	t.Helper()
	ref := r.registry + "/" + repo + ":" + tag
	archive := filepath.Join(t.TempDir(), "image.tar")
	if err := rigImageTar(archive, version, busybox); err != nil {
		t.Fatalf("build image %s: %v", ref, err)
	}
	r.mustPodman(t, "import", "--quiet", archive, ref)
	r.mustPodman(t, "push", "--quiet", ref)
	id := r.mustPodman(t, "image", "inspect", "--format", "{{.Id}}", ref)
	t.Cleanup(func() {
		if out, err := r.Podman(t, "rmi", "--force", id); err != nil && !strings.Contains(out, "image not known") {
			t.Errorf("remove image %s: %v", ref, err)
		}
	})
	return ref, id
}

// rigImageTar writes a root filesystem holding VERSION and, if busybox, a
// copy of the static /bin/busybox as bin/busybox.
func rigImageTar(path, version string, busybox bool) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	mtime := time.Unix(1700000000, 0)
	if busybox {
		bb, err := os.ReadFile("/bin/busybox")
		if err != nil {
			return err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: "bin/", Mode: 0o755, ModTime: mtime}); err != nil {
			return err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "bin/busybox", Mode: 0o755, Size: int64(len(bb)), ModTime: mtime}); err != nil {
			return err
		}
		if _, err := tw.Write(bb); err != nil {
			return err
		}
	}
	body := []byte(version + "\n")
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "VERSION", Mode: 0o644, Size: int64(len(body)), ModTime: mtime}); err != nil {
		return err
	}
	if _, err := tw.Write(body); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return f.Close()
}

// TagLocal points ref at imageID in the local store only, so that a unit runs
// an older image than the registry holds.
func (r *rig) TagLocal(t *testing.T, imageID, ref string) {
	t.Helper()
	r.mustPodman(t, "tag", imageID, ref)
}

// ContainerImage returns the image ID the running container name uses, or ""
// when no such container runs.
func (r *rig) ContainerImage(t *testing.T, name string) string {
	t.Helper()
	out, err := r.Podman(t, "ps", "--no-trunc", "--filter", "name=^"+name+"$", "--format", "{{.ImageID}}")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(out)
}

// ContainerUnit returns a service that runs image as container name the way
// podman generate systemd does: labelled for podman auto-update and with
// PODMAN_SYSTEMD_UNIT, so podman auto-update can restart it. unitLines go
// into its [Unit] section (for example SourcePath=).
func (r *rig) ContainerUnit(name, image string, unitLines ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "[Unit]\nDescription=test container %s\n", name)
	for _, l := range unitLines {
		b.WriteString(l + "\n")
	}
	// rm -t 0 kills the container at once (busybox sleep as PID 1 ignores
	// SIGTERM), so podman run exits 137.
	fmt.Fprintf(&b, `
[Service]
Environment=PODMAN_SYSTEMD_UNIT=%%n
SuccessExitStatus=137 143
ExecStartPre=-%[1]s rm --force --ignore --time 0 %[2]s
ExecStart=%[1]s run --rm --name %[2]s --label io.containers.autoupdate=registry %[3]s /bin/busybox sleep 1000
ExecStop=%[1]s rm --force --ignore --time 0 %[2]s
`, r.podman, name, image)
	return b.String()
}

// InstallUnit writes unit name into the user manager's runtime unit directory
// and reloads; at cleanup it stops the unit, removes its containers and the
// file, and reloads again.
func (r *rig) InstallUnit(t *testing.T, name, content string) string {
	t.Helper()
	if name == "" || strings.ContainsAny(name, "/\x00") {
		t.Fatalf("install unit: bad unit name %q", name)
	}
	path := filepath.Join(r.unitDir, name)
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatalf("install unit %s: %v", name, err)
	}
	t.Cleanup(func() {
		if _, err := r.systemctlUser("stop", "--", name); err != nil {
			t.Errorf("clean up unit %s: %v", name, err)
		}
		if out, err := r.Podman(t, "ps", "--all", "--quiet", "--filter", "label=PODMAN_SYSTEMD_UNIT="+name); err == nil {
			for _, id := range strings.Fields(out) {
				if _, err := r.Podman(t, "rm", "--force", "--ignore", "--time", "0", id); err != nil {
					t.Errorf("clean up unit %s: %v", name, err)
				}
			}
		}
		r.systemctlUser("reset-failed", "--", name)
		if err := os.Remove(path); err != nil {
			t.Errorf("clean up unit %s: %v", name, err)
		}
		if _, err := r.systemctlUser("daemon-reload"); err != nil {
			t.Errorf("clean up unit %s: %v", name, err)
		}
	})
	if _, err := r.systemctlUser("daemon-reload"); err != nil {
		t.Fatal(err)
	}
	return path
}

var rigUniqueCounter atomic.Int64

// rigUniqueName returns prefix plus the test name and a counter, lowercased to
// what unit, container and repository names all accept.
func rigUniqueName(t *testing.T, prefix string) string {
	name := strings.Map(func(c rune) rune {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
			return c
		case c >= 'A' && c <= 'Z':
			return c + 'a' - 'A'
		}
		return '-'
	}, strings.TrimPrefix(t.Name(), "Test"))
	if len(name) > 40 {
		name = name[:40]
	}
	return fmt.Sprintf("%s-%s-%d", prefix, strings.Trim(name, "-"), rigUniqueCounter.Add(1))
}

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

// TestRigSmoke checks the rig itself: two pushed images differ, a unit runs
// the older one, and podman auto-update moves it to the newer one through the
// user manager.
func TestRigSmoke(t *testing.T) {
	r := needRig(t)
	ref, v1 := r.PushImage(t, "demo", "latest", "v1")
	_, v2 := r.PushImage(t, "demo", "latest", "v2")
	if v1 == v2 {
		t.Fatalf("v1 and v2 of %s have the same image id %s", ref, v1)
	}
	r.TagLocal(t, v1, ref)

	const unit = "rig-smoke.service"
	r.InstallUnit(t, unit, r.ContainerUnit("rig-smoke", ref))
	if _, err := r.Systemctl(t, "start", unit); err != nil {
		t.Fatal(err)
	}
	r.WaitFor(t, 30*time.Second, func() bool { return r.ContainerImage(t, "rig-smoke") == v1 }, "rig-smoke to run v1 "+v1)
	if out, err := r.Systemctl(t, "is-active", unit); err != nil || strings.TrimSpace(out) != "active" {
		t.Fatalf("%s is not active: %q %v", unit, out, err)
	}

	if !r.createdPrivate {
		t.Logf("skipping podman auto-update: %s is not the rig's link", rigSystemPrivate)
		return
	}
	// As the server's /auto-update does: podman's own oneshot unit, which
	// sees the rig's CONTAINERS_* only through the manager's environment.
	if _, err := r.Systemctl(t, "start", "podman-auto-update.service"); err != nil {
		t.Fatal(err)
	}
	r.WaitFor(t, 30*time.Second, func() bool { return r.ContainerImage(t, "rig-smoke") == v2 }, "rig-smoke to run v2 "+v2+" after podman-auto-update.service")
}

// installSocketServer installs the built server as it is deployed: a Type=notify service behind a
// socket unit on 127.0.0.1:port, with extra [Service] lines and its output appended to logPath.
// The service is installed before the socket, so cleanup stops the socket first. It returns the
// two unit names; the caller starts the socket.
func (r *rig) installSocketServer(t *testing.T, bin, state, logPath string, port int, extra ...string) (service, socket string) {
	t.Helper()
	name := rigUniqueName(t, "webhook")
	service, socket = name+".service", name+".socket"
	r.InstallUnit(t, service, fmt.Sprintf(`[Unit]
Description=webhook-auto-update e2e server

[Service]
Type=notify
NotifyAccess=main
ExecStart=%s server --state-dir %s
%sStandardOutput=append:%s
StandardError=append:%s
`, bin, state, strings.Join(append(extra, ""), "\n"), logPath, logPath))
	r.InstallUnit(t, socket, fmt.Sprintf("[Socket]\nListenStream=127.0.0.1:%d\nAccept=no\n", port))
	return service, socket
}

// TestE2ESocketActivation runs the built server under the user manager behind
// a socket unit, as deployed, and checks it answers, stops cleanly on SIGTERM
// and logged the request.
func TestE2ESocketActivation(t *testing.T) {
	r := needRig(t)
	bin := buildBinary(t)
	state := t.TempDir()
	logPath := filepath.Join(t.TempDir(), "server.log")
	port, err := rigFreePort()
	if err != nil {
		t.Fatal(err)
	}
	service, socket := r.installSocketServer(t, bin, state, logPath, port)
	serverLog := func() string {
		b, _ := os.ReadFile(logPath)
		return strings.TrimSpace(string(b))
	}

	if _, err := r.Systemctl(t, "start", socket); err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Timeout: 30 * time.Second}
	resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/health", port))
	if err != nil {
		t.Fatalf("get /health through %s: %v; server output: %s", socket, err, serverLog())
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK || strings.TrimSpace(string(body)) != "ok" {
		t.Fatalf("get /health: %d %q, want 200 \"ok\"", resp.StatusCode, body)
	}
	if out, err := r.Systemctl(t, "is-active", service); err != nil || strings.TrimSpace(out) != "active" {
		t.Fatalf("%s is not active after a request: %q %v; server output: %s", service, out, err, serverLog())
	}

	if _, err := r.Systemctl(t, "stop", socket, service); err != nil {
		t.Fatal(err)
	}
	got := r.Show(t, service, "ActiveState", "Result", "ExecMainStatus")
	if got["Result"] != "success" || got["ExecMainStatus"] != "0" {
		t.Fatalf("%s after stop: %v, want Result=success ExecMainStatus=0; server output: %s", service, got, serverLog())
	}

	db, err := sql.Open("sqlite", filepath.Join(state, "data", "pod-upgrade-trigger.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var n int
	// A successful probe is counted in the probe summary, which the stopping server flushes.
	if err := db.QueryRow(`SELECT COUNT(*) FROM event_log WHERE action = 'probe-summary'
		AND json_extract(meta, '$.routes."GET /health"') = 1`).Scan(&n); err != nil {
		t.Fatalf("read event_log: %v", err)
	}
	if n != 1 {
		t.Fatalf("event_log has %d probe summaries counting the GET /health, want 1; server output: %s", n, serverLog())
	}
}
