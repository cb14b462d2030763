// main_rig_test.go owns the rig: the real programs the tool drives in production (a systemd
// --user manager, rootless podman and a local registry), for system tests, and the tests of the
// rig itself (TestRigOwnerAlive, TestRigSmoke).
//
// The rig is one throwaway non-root user per test run, wau-rig-<pid>, with its
// own user manager (in a cgroup it owns, XDG_RUNTIME_DIR /run/user/<uid>), its
// own rootless podman store (driver vfs, configured in its
// ~/.config/containers) and its own docker-registry on a free port, so two test
// runs on one host never share a manager, a store or a registry. The server and
// run-task processes of system tests run as that user (rig.Command).
//
// Rules: the rig starts once per test binary, on the first needRig call, and
// TestMain tears it down; TestMain first sweeps what runs that died (a timeout
// panic skips teardown) left behind, recognised by the owner marker each holds
// (the owning test process's PID and start time), never touching a live run's;
// every unit, container and image a test creates is removed by that test's
// t.Cleanup; every command runs with a timeout; a missing prerequisite skips,
// except under CI=true or WEBHOOK_E2E=1, where it fails.
package main

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

const (
	// rigCmdTimeout bounds every command the rig runs.
	rigCmdTimeout = 2 * time.Minute
	// rigSystemPath is where the rig looks for the real programs, so a test
	// that put fakes on PATH never hands a fake to the rig.
	rigSystemPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	// rigUserManager is the systemd --user manager binary.
	rigUserManager = "/lib/systemd/systemd"
	// rigUserPrefix names the rig's throwaway users: rigUserPrefix + the PID of
	// the test process that owns it.
	rigUserPrefix = "wau-rig-"
	// rigOwnerFile, in the rig user's home (and in buildBinary's directory),
	// records the owning test process as "<pid> <start time>".
	rigOwnerFile = ".wau-rig-owner"
	// rigSystemDir must exist for systemd --user to start (it is how systemd
	// tells it was booted with systemd); on a host without systemd as PID 1 the
	// rig makes it and leaves rigSystemDirMark in it.
	rigSystemDir     = "/run/systemd/system"
	rigSystemDirMark = rigSystemDir + "/.made-by-wau-rig"
)

// rigRun runs name with args and a timeout as the test process and returns
// its standard output; an error names the command and carries its output.
func rigRun(timeout time.Duration, name string, args ...string) (string, error) {
	return rigRunCmd(timeout, exec.Command(name, args...))
}

// rigRunCmd runs cmd with a timeout and returns its standard output; an error
// names the command and carries its standard error and output. Only standard
// output is returned: rootless podman warns on standard error, which must not
// end up in an image ID.
func rigRunCmd(timeout time.Duration, cmd *exec.Cmd) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c := exec.CommandContext(ctx, cmd.Path, cmd.Args[1:]...)
	c.Env, c.Dir, c.SysProcAttr = cmd.Env, cmd.Dir, cmd.SysProcAttr
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	// A child such as conmon may keep the output pipe open after the
	// command itself has exited.
	c.WaitDelay = 5 * time.Second
	err := c.Run()
	if errors.Is(err, exec.ErrWaitDelay) && c.ProcessState != nil && c.ProcessState.Success() {
		err = nil
	}
	if ctx.Err() != nil {
		err = fmt.Errorf("timed out after %s: %w", timeout, err)
	}
	if err != nil {
		return stdout.String(), fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), err,
			strings.TrimSpace(stderr.String()+"\n"+stdout.String()))
	}
	return stdout.String(), nil
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
		missing = append(missing, "root (uid 0), to add the rig's user")
	}
	for _, p := range []struct{ name, pkg string }{
		{"podman", "podman"},
		{"runc", "runc"},
		{"docker-registry", "docker-registry"},
		{"systemctl", "systemd"},
		{"systemd-run", "systemd"},
		{"newuidmap", "uidmap"},
		{"useradd", "passwd"},
		{"userdel", "passwd"},
		{"setpriv", "util-linux"},
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
	if len(rigCgroupRoots()) == 0 {
		missing = append(missing, "a writable cgroup hierarchy under /sys/fs/cgroup")
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

// rigCgroupRoots returns the cgroup hierarchies a user manager needs a cgroup
// of its own in (what logind's user@.service gives it on a real host): the
// cgroup2 hierarchy, and on a hybrid host also the name=systemd one.
func rigCgroupRoots() []string {
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return []string{"/sys/fs/cgroup"}
	}
	var roots []string
	for _, h := range []string{"/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"} {
		if _, err := os.Stat(filepath.Join(h, "cgroup.procs")); err == nil {
			roots = append(roots, h)
		}
	}
	return roots
}

// rig is the real system a test run drives: a throwaway user with its own
// systemd --user manager and rootless podman, and a local registry.
type rig struct {
	user       string // wau-rig-<pid>
	uid, gid   int
	home       string // the user's home: podman's store and configuration, and dir
	dir        string // what the rig itself keeps (registry storage, logs), in home
	runtimeDir string // XDG_RUNTIME_DIR of the user manager
	unitDir    string // runtime unit directory of the user manager
	registry   string // host:port of the local registry
	podman     string
	systemctl  string
	storage    string // storage driver of the user's store

	manager        *exec.Cmd
	managerCancel  context.CancelFunc
	managerDone    chan struct{}
	registryCmd    *exec.Cmd
	registryCancel context.CancelFunc
	registryDone   chan struct{}
	systemDir      *os.File // a shared flock on rigSystemDir while the manager needs it
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
		t.Logf("test rig ready in %s: user %s (uid %d), registry %s, storage %s",
			rigStartup.Round(time.Millisecond), theRig.user, theRig.uid, theRig.registry, theRig.storage)
	}
	return theRig
}

// rigStart brings up the rig; on error it tears down what it started.
func rigStart() (_ *rig, err error) {
	r := &rig{user: rigUserPrefix + strconv.Itoa(os.Getpid())}
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
	if err := r.addUser(); err != nil {
		return nil, err
	}
	if err := r.startManager(); err != nil {
		return nil, err
	}
	if err := r.startRegistry(); err != nil {
		return nil, err
	}
	if err := r.configurePodman(); err != nil {
		return nil, err
	}
	return r, nil
}

// addUser adds the rig's user, marks its home as this process's, and makes
// the directories the rig keeps there.
func (r *rig) addUser() error {
	if _, err := rigRun(rigCmdTimeout, "useradd", "--create-home", "--shell", "/bin/sh",
		"--comment", "webhook-auto-update test rig", "--", r.user); err != nil {
		return err
	}
	u, err := user.Lookup(r.user)
	if err != nil {
		return err
	}
	r.home = u.HomeDir
	if r.uid, err = strconv.Atoi(u.Uid); err != nil {
		return err
	}
	if r.gid, err = strconv.Atoi(u.Gid); err != nil {
		return err
	}
	if err := rigWriteOwner(r.home); err != nil {
		return err
	}
	// Others may enter the home (not list it): root's registry keeps its
	// storage in dir, and nothing secret lives here.
	if err := os.Chmod(r.home, 0o711); err != nil {
		return err
	}
	r.dir = filepath.Join(r.home, "rig")
	r.runtimeDir = fmt.Sprintf("/run/user/%d", r.uid)
	r.unitDir = filepath.Join(r.runtimeDir, "systemd", "user")
	if err := os.Mkdir(r.dir, 0o700); err != nil {
		return err
	}
	if err := r.mkdirOwned(filepath.Join(r.home, "tmp")); err != nil {
		return err
	}
	// A runtime directory left by an earlier user with this uid is not ours.
	if err := os.RemoveAll(r.runtimeDir); err != nil {
		return err
	}
	for _, d := range []string{r.runtimeDir, filepath.Dir(r.unitDir), r.unitDir} {
		if err := r.mkdirOwned(d); err != nil {
			return err
		}
	}
	return nil
}

// mkdirOwned makes dir (mode 0700) owned by the rig's user.
func (r *rig) mkdirOwned(dir string) error {
	if err := os.Mkdir(dir, 0o700); err != nil {
		return err
	}
	return os.Chown(dir, r.uid, r.gid)
}

// rigWriteOwner records this test process as the owner of dir.
func rigWriteOwner(dir string) error {
	start, err := rigStartTime(os.Getpid())
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, rigOwnerFile+".tmp")
	if err := os.WriteFile(tmp, []byte(fmt.Sprintf("%d %d\n", os.Getpid(), start)), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, rigOwnerFile))
}

// rigStartTime returns the start time of process pid, in clock ticks since
// boot (field 22 of /proc/<pid>/stat): with the PID it names one process,
// however PIDs are reused.
func rigStartTime(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name, field 2, may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	fields := strings.Fields(string(b[i+1:]))
	if i < 0 || len(fields) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	return strconv.ParseUint(fields[19], 10, 64)
}

// rigOwnerAlive reports whether the test process recorded in dir's owner
// marker still runs. Without a marker (its owner may be about to write it) it
// reports whether pid runs, and true if pid is 0: what is not known to be dead
// is left alone.
func rigOwnerAlive(dir string, pid int) bool {
	b, err := os.ReadFile(filepath.Join(dir, rigOwnerFile))
	if err != nil {
		if pid == 0 {
			return true
		}
		_, err := os.Stat(fmt.Sprintf("/proc/%d", pid))
		return err == nil
	}
	var start uint64
	if _, err := fmt.Sscanf(string(b), "%d %d", &pid, &start); err != nil {
		return false
	}
	now, err := rigStartTime(pid)
	return err == nil && now == start
}

// rigEnv is the environment of everything that runs as the rig's user: a
// login's, as on a real host, and nothing of the test process's.
func (r *rig) rigEnv() []string {
	return []string{
		"HOME=" + r.home, "USER=" + r.user, "LOGNAME=" + r.user, "SHELL=/bin/sh",
		"PATH=" + rigSystemPath, "LANG=C.UTF-8", "XDG_RUNTIME_DIR=" + r.runtimeDir,
		"DBUS_SESSION_BUS_ADDRESS=unix:path=" + filepath.Join(r.runtimeDir, "bus"),
	}
}

// Command returns a command that runs name as the rig's user, in its home,
// with its login environment (rigEnv); the caller may append to Env. The
// process is the command itself, so signals and PIDs are the caller's to use.
func (r *rig) Command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	cmd.Env = r.rigEnv()
	cmd.Dir = r.home
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: uint32(r.uid), Gid: uint32(r.gid), Groups: []uint32{}},
	}
	return cmd
}

// TempDir returns a new directory owned by the rig's user (t.TempDir's are
// root's and closed to it), removed when the test ends.
func (r *rig) TempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp(filepath.Join(r.home, "tmp"), "t-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, r.uid, r.gid); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// Chown gives paths to the rig's user, for files a test wrote as root where
// the rig's processes write too.
func (r *rig) Chown(t *testing.T, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if err := os.Lchown(p, r.uid, r.gid); err != nil {
			t.Fatal(err)
		}
	}
}

// runAs runs name as the rig's user and returns its standard output.
func (r *rig) runAs(name string, args ...string) (string, error) {
	return rigRunCmd(rigCmdTimeout, r.Command(name, args...))
}

func (r *rig) systemctlUser(args ...string) (string, error) {
	return r.runAs(r.systemctl, append([]string{"--user"}, args...)...)
}

// managerState returns the first line systemctl --user is-system-running prints.
func (r *rig) managerState() string {
	out, _ := r.systemctlUser("is-system-running")
	line, _, _ := strings.Cut(strings.TrimSpace(out), "\n")
	return line
}

// startManager starts the user's systemd --user manager in a cgroup it owns,
// which it needs to start at all (without one it exits 1 silently: EACCES on
// its cgroup.procs). Only root may move a process into that cgroup, so a
// shell moves itself there first and then becomes the user and the manager,
// keeping its PID; setpriv's --pdeathsig stops the manager if the test
// process dies.
func (r *rig) startManager() error {
	release, err := rigHoldSystemDir()
	if err != nil {
		return err
	}
	r.systemDir = release
	var procs []string
	for _, root := range rigCgroupRoots() {
		cg := filepath.Join(root, r.user, fmt.Sprintf("user@%d.service", r.uid))
		if err := os.MkdirAll(cg, 0o755); err != nil {
			return fmt.Errorf("make the user manager's cgroup: %w", err)
		}
		if err := filepath.WalkDir(filepath.Join(root, r.user), func(p string, _ fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			return os.Lchown(p, r.uid, r.gid)
		}); err != nil {
			return fmt.Errorf("give the user manager's cgroup to %s: %w", r.user, err)
		}
		procs = append(procs, filepath.Join(cg, "cgroup.procs"))
	}

	logPath := filepath.Join(r.dir, "systemd-user.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logFile.Close()
	ctx, cancel := context.WithCancel(context.Background())
	args := []string{"-c", `while [ "$1" != -- ]; do echo $$ >"$1" || exit 1; shift; done; shift; exec "$@"`, "sh"}
	args = append(args, procs...)
	args = append(args, "--", "setpriv", "--reuid", strconv.Itoa(r.uid), "--regid", strconv.Itoa(r.gid),
		"--init-groups", "--pdeathsig", "TERM", "--", "env", "-i")
	args = append(args, r.rigEnv()...)
	args = append(args, rigUserManager, "--user")
	cmd := exec.CommandContext(ctx, "/bin/sh", args...)
	cmd.Dir = r.home
	cmd.Env = []string{"PATH=" + rigSystemPath}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	// SIGTERM makes a user manager start exit.target, stopping every unit.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 30 * time.Second
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
	const limit = 60 * time.Second
	deadline := time.Now().Add(limit)
	for {
		state := r.managerState()
		if state == "running" || state == "degraded" {
			return nil
		}
		exited := false
		select {
		case <-done:
			exited = true
		default:
		}
		if exited || time.Now().After(deadline) {
			why := fmt.Sprintf("did not become running within %s", limit)
			if exited {
				why = "exited: " + r.manager.ProcessState.String()
			}
			log, _ := os.ReadFile(logPath)
			return fmt.Errorf("%s --user as %s %s (systemctl --user is-system-running: %q); its output: %s",
				rigUserManager, r.user, why, state, strings.TrimSpace(string(log)))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// rigHoldSystemDir makes sure rigSystemDir exists and holds a shared flock on
// it until the returned file is closed. Two runs need it at once and either
// may finish first: the flock tells the last one out (rigReleaseSystemDir)
// that it may remove the directory, and only if a rig made it. Making and
// removing happen under an exclusive flock on its parent.
func rigHoldSystemDir() (*os.File, error) {
	parent, err := rigLockParent()
	if err != nil {
		return nil, err
	}
	defer parent.Close()
	if _, err := os.Stat(rigSystemDir); errors.Is(err, os.ErrNotExist) {
		if err := os.Mkdir(rigSystemDir, 0o755); err != nil {
			return nil, err
		}
		if err := os.WriteFile(rigSystemDirMark, nil, 0o644); err != nil {
			return nil, err
		}
	}
	d, err := os.Open(rigSystemDir)
	if err != nil {
		return nil, err
	}
	// Exclusive flocks on it are only taken under the parent's: this cannot wait.
	if err := syscall.Flock(int(d.Fd()), syscall.LOCK_SH); err != nil {
		d.Close()
		return nil, fmt.Errorf("flock %s: %w", rigSystemDir, err)
	}
	return d, nil
}

// rigReleaseSystemDir drops held (nil if none) and removes rigSystemDir if a
// rig made it and no rig holds it any more.
func rigReleaseSystemDir(held *os.File) error {
	parent, err := rigLockParent()
	if err != nil {
		return err
	}
	defer parent.Close()
	if held != nil {
		held.Close()
	}
	d, err := os.Open(rigSystemDir)
	if err != nil {
		return nil
	}
	defer d.Close()
	if syscall.Flock(int(d.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) != nil {
		return nil // another run's manager still needs it
	}
	if _, err := os.Stat(rigSystemDirMark); err != nil {
		return nil // not a rig's
	}
	if err := os.Remove(rigSystemDirMark); err != nil {
		return err
	}
	return os.Remove(rigSystemDir)
}

// rigLockParent opens rigSystemDir's parent with an exclusive flock, released
// when the file is closed.
func rigLockParent() (*os.File, error) {
	dir := filepath.Dir(rigSystemDir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("flock %s: %w", dir, err)
	}
	return f, nil
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
	deadline := time.Now().Add(time.Minute)
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

// configurePodman writes the user's rootless podman configuration: runc
// rather than crun (which fails on hosts with hybrid cgroups and rlimits),
// cgroupfs, no network namespace, the vfs storage driver (which needs
// nothing from the kernel), and the rig's registry as an insecure (plain
// HTTP) one. The units podman auto-update restarts and podman-auto-update.service
// read it too: they run as the user, without the test's environment.
func (r *rig) configurePodman() error {
	dir := filepath.Join(r.home, ".config", "containers")
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := r.mkdirOwned(d); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
	}
	files := map[string]string{
		"containers.conf": `[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
`,
		"storage.conf":    "[storage]\ndriver = \"vfs\"\n",
		"registries.conf": fmt.Sprintf("[[registry]]\nlocation = %q\ninsecure = true\n", r.registry),
	}
	for name, text := range files {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			return err
		}
		if err := os.Chown(p, r.uid, r.gid); err != nil {
			return err
		}
	}
	out, err := r.runAs(r.podman, "info", "--format", "{{.Store.GraphDriverName}}")
	if err != nil {
		return fmt.Errorf("rootless podman as %s: %w", r.user, err)
	}
	r.storage = strings.TrimSpace(out)
	if r.storage != "vfs" {
		return fmt.Errorf("rootless podman as %s uses storage driver %q, want vfs from %s", r.user, r.storage, filepath.Join(dir, "storage.conf"))
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
	if r.manager != nil {
		// Stops every unit; WaitDelay bounds a manager that hangs.
		r.managerCancel()
		<-r.managerDone
	}
	if r.registryCmd != nil {
		r.registryCancel()
		<-r.registryDone
	}
	if err := rigRemoveUser(r.user); err != nil {
		errs = append(errs, err)
	}
	if r.systemDir != nil {
		if err := rigReleaseSystemDir(r.systemDir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// rigSweep removes what test runs that are gone left behind: rig users
// (wau-rig-*) whose home's owner marker names a process that no longer runs,
// and buildBinary directories likewise. A timeout panic ends the test binary
// without TestMain's teardown; the next run cleans up here. A live run's
// leftovers-to-be are never touched.
func rigSweep() []error {
	if os.Geteuid() != 0 {
		return nil
	}
	var errs []error
	users, err := rigUsers()
	if err != nil {
		errs = append(errs, err)
	}
	for name, home := range users {
		pid, _ := strconv.Atoi(strings.TrimPrefix(name, rigUserPrefix))
		if !rigOwnerAlive(home, pid) {
			if err := rigRemoveUser(name); err != nil {
				errs = append(errs, err)
			}
		}
	}
	bins, _ := filepath.Glob(filepath.Join(os.TempDir(), "webhook-bin-*"))
	for _, dir := range bins {
		if _, err := os.Stat(filepath.Join(dir, rigOwnerFile)); err == nil && !rigOwnerAlive(dir, 0) {
			if err := os.RemoveAll(dir); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := rigReleaseSystemDir(nil); err != nil {
		errs = append(errs, err)
	}
	return errs
}

// rigUsers returns the rig users in /etc/passwd and their homes.
func rigUsers() (map[string]string, error) {
	f, err := os.Open("/etc/passwd")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	users := map[string]string{}
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Split(s.Text(), ":")
		if len(fields) >= 6 && strings.HasPrefix(fields[0], rigUserPrefix) {
			users[fields[0]] = fields[5]
		}
	}
	return users, s.Err()
}

// rigRemoveUser removes a rig user and everything it ran and owned: its
// processes (the manager, its units, conmon, podman's pause process, a
// server a test started), its cgroups, its runtime directory, and the user
// with its home. The user is removed last, so an interrupted removal is
// found again by rigSweep.
func rigRemoveUser(name string) error {
	if !strings.HasPrefix(name, rigUserPrefix) {
		return fmt.Errorf("remove rig user %q: not a rig user", name)
	}
	u, err := user.Lookup(name)
	if err != nil {
		var unknown user.UnknownUserError
		if errors.As(err, &unknown) {
			return nil
		}
		return err
	}
	uid, err := strconv.Atoi(u.Uid)
	if err != nil || uid == 0 {
		return fmt.Errorf("remove rig user %s: bad uid %q", name, u.Uid)
	}
	var errs []error
	if err := rigKillUID(uid); err != nil {
		errs = append(errs, err)
	}
	for _, root := range rigCgroupRoots() {
		if err := rigRemoveCgroup(filepath.Join(root, name)); err != nil {
			errs = append(errs, err)
		}
	}
	if err := os.RemoveAll(fmt.Sprintf("/run/user/%d", uid)); err != nil {
		errs = append(errs, err)
	}
	if _, err := rigRun(rigCmdTimeout, "userdel", "--remove", "--", name); err != nil &&
		!strings.Contains(err.Error(), "mail spool") {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return fmt.Errorf("remove rig user %s: %w", name, errors.Join(errs...))
	}
	return nil
}

// rigKillUID kills every process whose real or effective uid is uid and
// waits until none is left.
func rigKillUID(uid int) error {
	const limit = 30 * time.Second
	deadline := time.Now().Add(limit)
	for {
		pids := rigPIDsOf(uid)
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes %v of uid %d still run %s after SIGKILL", pids, uid, limit)
		}
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// rigPIDsOf lists the processes whose real or effective uid is uid, zombies
// aside (they are gone but for their parent's wait).
func rigPIDsOf(uid int) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "status"))
		if err != nil {
			continue
		}
		mine, zombie := false, false
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			switch {
			case len(f) >= 3 && f[0] == "Uid:":
				mine = f[1] == strconv.Itoa(uid) || f[2] == strconv.Itoa(uid)
			case len(f) >= 2 && f[0] == "State:":
				zombie = f[1] == "Z"
			}
		}
		if mine && !zombie {
			pids = append(pids, pid)
		}
	}
	return pids
}

// rigRemoveCgroup removes the cgroup tree at dir, deepest first, waiting for
// the kernel to let go of processes that just died.
func rigRemoveCgroup(dir string) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		var dirs []string
		filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		var last error
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := os.Remove(dirs[i]); err != nil && !errors.Is(err, os.ErrNotExist) {
				last = err
			}
		}
		if last == nil || time.Now().After(deadline) {
			return last
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Registry returns the local registry's host:port.
func (r *rig) Registry() string { return r.registry }

// UnitDir returns the user manager's runtime unit directory that InstallUnit
// writes to.
func (r *rig) UnitDir() string { return r.unitDir }

// Podman runs the real podman as the rig's user and returns its standard
// output; an error carries its standard error.
func (r *rig) Podman(t *testing.T, args ...string) (string, error) {
	t.Helper()
	return r.runAs(r.podman, args...)
}

func (r *rig) mustPodman(t *testing.T, args ...string) string {
	t.Helper()
	out, err := r.Podman(t, args...)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

// Systemctl runs systemctl --user args as the rig's user and returns its
// standard output; an error carries its standard error.
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
	return r.pushImage(t, repo, tag, version, true, nil)
}

// PushBrokenImage pushes repo:tag as an image without /bin/busybox, so a
// container running /bin/busybox fails at once.
func (r *rig) PushBrokenImage(t *testing.T, repo, tag string) (ref, imageID string) {
	t.Helper()
	return r.pushImage(t, repo, tag, "broken", false, nil)
}

func (r *rig) pushImage(t *testing.T, repo, tag, version string, busybox bool, files map[string]string) (string, string) {
	t.Helper()
	ref := r.registry + "/" + repo + ":" + tag
	archive := filepath.Join(r.TempDir(t), "image.tar")
	if err := rigImageTar(archive, version, busybox, files); err != nil {
		t.Fatalf("build image %s: %v", ref, err)
	}
	r.mustPodman(t, "import", "--quiet", archive, ref)
	r.mustPodman(t, "push", "--quiet", ref)
	id := r.mustPodman(t, "image", "inspect", "--format", "{{.Id}}", ref)
	t.Cleanup(func() {
		if _, err := r.Podman(t, "rmi", "--force", id); err != nil && !strings.Contains(err.Error(), "image not known") {
			t.Errorf("remove image %s: %v", ref, err)
		}
	})
	return ref, id
}

// rigImageTar writes a root filesystem holding VERSION, files and, if busybox,
// a copy of the static /bin/busybox as bin/busybox.
func rigImageTar(path, version string, busybox bool, files map[string]string) error {
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
	files = maps.Clone(files)
	if files == nil {
		files = map[string]string{}
	}
	files["VERSION"] = version + "\n"
	for _, name := range slices.Sorted(maps.Keys(files)) {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o755, Size: int64(len(files[name])), ModTime: mtime}); err != nil {
			return err
		}
		if _, err := tw.Write([]byte(files[name])); err != nil {
			return err
		}
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

// TestRigOwnerAlive: rigSweep removes a rig only when the test process its marker names is gone,
// a PID reused by another process included, and leaves alone what it cannot tell.
func TestRigOwnerAlive(t *testing.T) {
	self := os.Getpid()
	start, err := rigStartTime(self)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		marker string // "" writes none
		pid    int    // the PID a rig user's name carries, 0 for none
		alive  bool
	}{
		{"this process", fmt.Sprintf("%d %d\n", self, start), 0, true},
		{"its PID, another start time", fmt.Sprintf("%d %d\n", self, start+1), 0, false},
		{"a PID nobody runs", fmt.Sprintf("%d %d\n", 1<<22+1, start), 0, false},
		{"a torn marker", "12", 0, false},
		{"no marker, no PID", "", 0, true},
		{"no marker, a live PID", "", self, true},
		{"no marker, a PID nobody runs", "", 1<<22 + 1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.marker != "" {
				if err := os.WriteFile(filepath.Join(dir, rigOwnerFile), []byte(tc.marker), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			if got := rigOwnerAlive(dir, tc.pid); got != tc.alive {
				t.Errorf("rigOwnerAlive with marker %q and pid %d = %v, want %v", tc.marker, tc.pid, got, tc.alive)
			}
		})
	}
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

	// As the server's /auto-update does: podman's own oneshot unit, which
	// finds the rig's registry in the user's podman configuration.
	if _, err := r.Systemctl(t, "start", "podman-auto-update.service"); err != nil {
		t.Fatal(err)
	}
	r.WaitFor(t, 30*time.Second, func() bool { return r.ContainerImage(t, "rig-smoke") == v2 }, "rig-smoke to run v2 "+v2+" after podman-auto-update.service")
}
