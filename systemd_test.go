// systemd_test.go tests socket activation and sd_notify against real sockets (a TCP listener's fd
// handed in through firstListenFD, datagrams received on a real unixgram socket), and checks the
// unit files and the environment example under systemd/ against the code they describe. It also
// tests unit resolution and Quadlet images (fuzzed), starts that outlive their limit, lookups, the
// child environment, and, with the built binary, readiness after listening and (on the rig) a
// real socket-activated service.
package main

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// rawListenerFD returns a fresh fd, owned by no *os.File, for a new loopback TCP listener, with
// FD_CLOEXEC cleared as systemd passes it. The code under test takes ownership of the fd (it
// closes it); the test keeps only the address.
func rawListenerFD(t *testing.T) (int, string) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	f, err := l.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd, err := syscall.Dup(int(f.Fd())) // plain dup: no close-on-exec, like an inherited fd
	if err != nil {
		t.Fatal(err)
	}
	if cloexec(t, fd) {
		t.Fatalf("setup: dup'ed fd %d already has FD_CLOEXEC", fd)
	}
	return fd, l.Addr().String()
}

// cloexec reports whether fd has FD_CLOEXEC set; a closed fd is reported as set (it cannot leak).
func cloexec(t *testing.T, fd int) bool {
	t.Helper()
	flags, _, errno := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), syscall.F_GETFD, 0)
	if errno == syscall.EBADF {
		return true
	}
	if errno != 0 {
		t.Fatalf("fcntl(%d, F_GETFD): %v", fd, errno)
	}
	return flags&syscall.FD_CLOEXEC != 0
}

// listenerCloexec reports FD_CLOEXEC of the fd behind a listener returned by the code.
func listenerCloexec(t *testing.T, l net.Listener) bool {
	t.Helper()
	sc, ok := l.(syscall.Conn)
	if !ok {
		t.Fatalf("listener %T has no SyscallConn", l)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var set bool
	if err := rc.Control(func(fd uintptr) { set = cloexec(t, int(fd)) }); err != nil {
		t.Fatal(err)
	}
	return set
}

// setFirstListenFD points the code at fd for the duration of the test.
func setFirstListenFD(t *testing.T, fd int) {
	t.Helper()
	old := firstListenFD
	firstListenFD = fd
	t.Cleanup(func() { firstListenFD = old })
}

// assertUnset fails the test when any of the variables is still in the environment.
func assertUnset(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		if v, ok := os.LookupEnv(n); ok {
			t.Errorf("%s=%q is still set: child processes would inherit it", n, v)
		}
	}
}

// assertServes accepts one real connection through l and exchanges a line over it.
func assertServes(t *testing.T, l net.Listener, addr string) {
	t.Helper()
	if got := l.Addr().String(); got != addr {
		t.Errorf("listener address = %s, want %s (the socket handed in)", got, addr)
	}
	accepted := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			accepted <- err
			return
		}
		defer c.Close()
		_, err = io.WriteString(c, "hello\n")
		accepted <- err
	}()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("reading through the activated listener: %v", err)
	}
	if line != "hello\n" {
		t.Errorf("read %q through the activated listener, want %q", line, "hello\n")
	}
	if err := <-accepted; err != nil {
		t.Fatalf("accept on the activated listener: %v", err)
	}
}

var listenVars = []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"}

func TestActivationListenerFromSystemd(t *testing.T) {
	fd, addr := rawListenerFD(t)
	setFirstListenFD(t, fd)
	ls, err := activateAsSystemd(t, "1", "web")
	if err != nil {
		t.Fatalf("activationListeners: %v", err)
	}
	if len(ls) != 1 {
		t.Fatalf("got %d listeners, want 1", len(ls))
	}
	assertUnset(t, listenVars...)
	if !cloexec(t, fd) {
		t.Errorf("passed fd %d is still open without FD_CLOEXEC: a child process would inherit it", fd)
	}
	if !listenerCloexec(t, ls[0]) {
		t.Errorf("the returned listener's fd lacks FD_CLOEXEC")
	}
	assertServes(t, ls[0], addr)
}

// TestActivationSeveralListeners checks that every passed fd is served, not only the first.
func TestActivationSeveralListeners(t *testing.T) {
	a, addr1 := rawListenerFD(t)
	b, addr2 := rawListenerFD(t)
	// systemd passes consecutive fds: move both to a free pair.
	fd1 := 100
	for fdOpen(fd1) || fdOpen(fd1+1) {
		fd1++
	}
	for i, fd := range []int{a, b} {
		if err := syscall.Dup3(fd, fd1+i, 0); err != nil {
			t.Fatal(err)
		}
		syscall.Close(fd)
	}
	setFirstListenFD(t, fd1)
	ls, err := activateAsSystemd(t, "2", "web:other")
	if err != nil {
		t.Fatalf("activationListeners: %v", err)
	}
	if len(ls) != 2 {
		t.Fatalf("got %d listeners, want 2", len(ls))
	}
	assertUnset(t, listenVars...)
	for i, fd := range []int{fd1, fd1 + 1} {
		if !cloexec(t, fd) {
			t.Errorf("passed fd %d is still open without FD_CLOEXEC", fd)
		}
		if !listenerCloexec(t, ls[i]) {
			t.Errorf("listener %d lacks FD_CLOEXEC", i)
		}
	}
	assertServes(t, ls[0], addr1)
	assertServes(t, ls[1], addr2)
}

// activateAsSystemd sets LISTEN_PID (this process), LISTEN_FDS and LISTEN_FDNAMES as systemd
// does for an activated service, and returns what activationListeners makes of them; the
// listeners are closed when the test ends.
func activateAsSystemd(t *testing.T, fds, names string) ([]net.Listener, error) {
	t.Helper()
	t.Setenv("LISTEN_PID", strconv.Itoa(os.Getpid()))
	t.Setenv("LISTEN_FDS", fds)
	t.Setenv("LISTEN_FDNAMES", names)
	ls, err := activationListeners(os.Getenv)
	t.Cleanup(func() {
		for _, l := range ls {
			l.Close()
		}
	})
	return ls, err
}

func fdOpen(fd int) bool {
	_, _, errno := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), syscall.F_GETFD, 0)
	return errno != syscall.EBADF
}

func TestActivationNotForThisProcess(t *testing.T) {
	fd, _ := rawListenerFD(t)
	defer syscall.Close(fd)
	setFirstListenFD(t, fd)
	for _, tc := range []struct {
		name string
		env  map[string]string
	}{
		{"another pid", map[string]string{"LISTEN_PID": strconv.Itoa(os.Getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}},
		{"pid not a number", map[string]string{"LISTEN_PID": "self", "LISTEN_FDS": "1"}},
		{"no pid", map[string]string{"LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}},
		{"no fds", map[string]string{"LISTEN_PID": strconv.Itoa(os.Getpid())}},
		{"nothing set", map[string]string{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, v := range listenVars {
				t.Setenv(v, "") // registers the restore
				os.Unsetenv(v)
			}
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			ls, err := activationListeners(os.Getenv)
			if err != nil {
				t.Fatalf("activationListeners: %v", err)
			}
			if len(ls) != 0 {
				for _, l := range ls {
					l.Close()
				}
				t.Fatalf("got %d listeners for a process that was not activated", len(ls))
			}
			assertUnset(t, listenVars...)
			if !fdOpen(fd) {
				t.Errorf("fd %d was closed although it was not passed to this process", fd)
			}
		})
	}
}

func TestActivationInvalidFDCount(t *testing.T) {
	for _, fds := range []string{"x", "-1", "1x", "0x1"} {
		t.Run(fds, func(t *testing.T) {
			ls, err := activateAsSystemd(t, fds, "web")
			if err == nil {
				t.Fatalf("LISTEN_FDS=%q: no error, %d listeners", fds, len(ls))
			}
			if !strings.Contains(err.Error(), "LISTEN_FDS") {
				t.Errorf("error %q does not name LISTEN_FDS", err)
			}
			assertUnset(t, listenVars...)
		})
	}
}

// TestActivationFDNotASocket hands in a regular file: an error naming the fd, not a panic.
func TestActivationFDNotASocket(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "not-a-socket"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd, err := syscall.Dup(int(f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	setFirstListenFD(t, fd)
	_, err = activateAsSystemd(t, "1", "web")
	if err == nil {
		t.Fatal("a regular file was accepted as a listening socket")
	}
	if !strings.Contains(err.Error(), strconv.Itoa(fd)) {
		t.Errorf("error %q does not name fd %d", err, fd)
	}
	if fdOpen(fd) {
		syscall.Close(fd)
	}
}

// notifySocket listens for sd_notify datagrams on name (a path, or "@..." for an abstract socket).
func notifySocket(t *testing.T, name string) *net.UnixConn {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// receive reads one datagram, failing the test if none arrives in a generous time.
func receive(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 4096)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("no notification received: %v", err)
	}
	return string(buf[:n])
}

var notifyVars = []string{"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}

func TestNotify(t *testing.T) {
	for _, tc := range []struct {
		name   string
		socket string
	}{
		{"path", filepath.Join(t.TempDir(), "notify")},
		{"abstract", "@webhook-test-" + randomName(t)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock := notifySocket(t, tc.socket)
			t.Setenv("NOTIFY_SOCKET", tc.socket)
			t.Setenv("WATCHDOG_USEC", "200000")
			t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))

			n, err := newNotifier(os.Getenv)
			if err != nil {
				t.Fatalf("newNotifier: %v", err)
			}
			defer n.Close()
			assertUnset(t, notifyVars...)

			for _, state := range []string{"READY=1", "STOPPING=1"} {
				if err := n.notify(state); err != nil {
					t.Fatalf("notify(%q): %v", state, err)
				}
				if got := receive(t, sock); got != state {
					t.Errorf("received %q, want %q", got, state)
				}
			}

			var logs strings.Builder
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() {
				defer close(done)
				n.runWatchdog(ctx, newLogger(&logs))
			}()
			for i := 0; i < 2; i++ {
				if got := receive(t, sock); got != "WATCHDOG=1" {
					t.Errorf("received %q, want WATCHDOG=1", got)
				}
			}
			cancel()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("runWatchdog did not return after its context ended")
			}
		})
	}
}

func TestNotifyWithoutSocket(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	os.Unsetenv("NOTIFY_SOCKET")
	t.Setenv("WATCHDOG_USEC", "200000")
	n, err := newNotifier(os.Getenv)
	if err != nil {
		t.Fatalf("newNotifier: %v", err)
	}
	defer n.Close()
	if err := n.notify("READY=1"); err != nil {
		t.Errorf("notify without NOTIFY_SOCKET: %v", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		n.runWatchdog(context.Background(), newLogger(io.Discard))
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("runWatchdog without NOTIFY_SOCKET did not return at once")
	}
	assertUnset(t, "WATCHDOG_USEC")

	var nilNotifier *notifier
	if err := nilNotifier.notify("READY=1"); err != nil {
		t.Errorf("notify on a nil notifier: %v", err)
	}
	nilNotifier.Close()
}

// TestNotifyWatchdogSettings checks that WATCHDOG_USEC is only honoured for this process
// (WATCHDOG_PID, sd_watchdog_enabled(3)) and only when it is a positive number.
func TestNotifyWatchdogSettings(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "notify")
	notifySocket(t, socket)
	for _, tc := range []struct {
		name string
		usec string
		pid  string
		want time.Duration
	}{
		{"set", "200000", "", 200 * time.Millisecond},
		{"this pid", "30000000", strconv.Itoa(os.Getpid()), 30 * time.Second},
		{"another pid", "200000", strconv.Itoa(os.Getpid() + 1), 0},
		{"zero", "0", "", 0},
		{"negative", "-5", "", 0},
		{"not a number", "soon", "", 0},
		{"unset", "", "", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("NOTIFY_SOCKET", socket)
			t.Setenv("WATCHDOG_USEC", tc.usec)
			t.Setenv("WATCHDOG_PID", tc.pid)
			n, err := newNotifier(os.Getenv)
			if err != nil {
				t.Fatal(err)
			}
			defer n.Close()
			if n.watchdog != tc.want {
				t.Errorf("watchdog interval = %v, want %v", n.watchdog, tc.want)
			}
			assertUnset(t, notifyVars...)
		})
	}
}

func TestNotifySocketMissing(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", filepath.Join(t.TempDir(), "nobody-listens"))
	n, err := newNotifier(os.Getenv)
	if err == nil {
		t.Error("newNotifier: no error for a socket nobody listens on")
	} else if !strings.Contains(err.Error(), "NOTIFY_SOCKET") {
		t.Errorf("error %q does not name NOTIFY_SOCKET", err)
	}
	// The server only warns: the notifier it got back must still be usable as a no-op.
	if err := n.notify("READY=1"); err != nil {
		t.Errorf("notify on the fallback notifier: %v", err)
	}
	n.Close()
	assertUnset(t, "NOTIFY_SOCKET")
}

// unit files and the environment example

// unitDirectives parses a systemd unit or environment file into section → key → values.
func unitDirectives(t *testing.T, name string) map[string]map[string][]string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("systemd", name))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]map[string][]string{}
	section := ""
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok {
				t.Fatalf("systemd/%s:%d: %q is not KEY=VALUE", name, i+1, line)
			}
			if out[section] == nil {
				out[section] = map[string][]string{}
			}
			k = strings.TrimSpace(k)
			out[section][k] = append(out[section][k], strings.TrimSpace(v))
		}
	}
	return out
}

func TestUnitFiles(t *testing.T) {
	cfg, err := loadConfig(func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	units := map[string]map[string]map[string][]string{
		"socket":  unitDirectives(t, "webhook-auto-update.socket"),
		"service": unitDirectives(t, "webhook-auto-update.service"),
	}
	for _, tc := range []struct {
		unit, section, key, want string
	}{
		// The socket listens where the server listens by default, so both ways reach the same port.
		{"socket", "Socket", "ListenStream", cfg.listen},
		{"socket", "Socket", "Accept", "no"},
		{"socket", "Install", "WantedBy", "sockets.target"},
		{"service", "Unit", "Requires", "webhook-auto-update.socket"},
		{"service", "Unit", "After", "webhook-auto-update.socket"},
		{"service", "Service", "Type", "notify"},
		{"service", "Service", "NotifyAccess", "main"},
		{"service", "Service", "ExecStart", "%h/.local/bin/webhook-auto-update server"},
		{"service", "Service", "EnvironmentFile", "-%h/.config/webhook-auto-update/webhook-auto-update.env"},
		{"service", "Service", "Restart", "on-failure"},
		{"service", "Service", "WatchdogSec", "60"},
		{"service", "Service", "UMask", "0077"},
		{"service", "Install", "WantedBy", "default.target"},
	} {
		got := units[tc.unit][tc.section][tc.key]
		if !reflect.DeepEqual(got, []string{tc.want}) {
			t.Errorf("webhook-auto-update.%s [%s] %s = %q, want %q", tc.unit, tc.section, tc.key, got, tc.want)
		}
	}
	// The server's graceful shutdown must fit inside the stop timeout systemd grants it.
	stop := units["service"]["Service"]["TimeoutStopSec"]
	if len(stop) != 1 {
		t.Fatalf("TimeoutStopSec = %q, want one value", stop)
	}
	secs, err := strconv.Atoi(stop[0])
	if err != nil || time.Duration(secs)*time.Second <= cfg.shutdownTimeout {
		t.Errorf("TimeoutStopSec=%s must be a number of seconds above the shutdown timeout %s", stop[0], cfg.shutdownTimeout)
	}
	// A user unit's sandboxing options that imply NoNewPrivileges break the setuid newuidmap
	// that rootless podman needs.
	for _, k := range []string{"NoNewPrivileges", "PrivateUsers", "PrivateTmp", "ProtectSystem", "ProtectHome"} {
		if v, ok := units["service"]["Service"][k]; ok {
			t.Errorf("webhook-auto-update.service sets %s=%q: it breaks rootless podman (newuidmap) or fails in a user manager", k, v)
		}
	}
}

// TestSystemdAnalyzeVerify runs systemd's own parser over the user units. systemd-analyze
// reports a bad directive on stderr but still exits 0, so any output fails the test.
func TestSystemdAnalyzeVerify(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed")
	}
	home, runtimeDir := t.TempDir(), t.TempDir()
	unitDir := filepath.Join(home, ".config", "systemd", "user")
	// verify checks that ExecStart= (%h/.local/bin/webhook-auto-update) is executable.
	bin := filepath.Join(home, ".local", "bin", "webhook-auto-update")
	if err := os.MkdirAll(filepath.Dir(bin), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(unitDir, 0o700); err != nil {
		t.Fatal(err)
	}
	var units []string
	for _, name := range []string{"webhook-auto-update.socket", "webhook-auto-update.service"} {
		b, err := os.ReadFile(filepath.Join("systemd", name))
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(unitDir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		units = append(units, p)
	}
	ctx, cancel := context.WithTimeout(context.Background(), hangGuard)
	defer cancel()
	cmd := exec.CommandContext(ctx, sa, append([]string{"--user", "verify"}, units...)...)
	cmd.Env = []string{"HOME=" + home, "XDG_RUNTIME_DIR=" + runtimeDir, "PATH=" + os.Getenv("PATH")}
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) != 0 {
		t.Errorf("systemd-analyze --user verify: %v\n%s", err, out)
	}
}

var envLine = regexp.MustCompile(`^#([A-Z][A-Z0-9_]*)=(.*)$`)

// TestEnvExampleDocumentsEveryVariable reads the example environment file and checks that it
// names every variable loadConfig reads, with the default loadConfig uses (an empty value stands
// for a default derived at run time, such as the state directory's web/dist).
func TestEnvExampleDocumentsEveryVariable(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("systemd", "webhook-auto-update.env.example"))
	if err != nil {
		t.Fatal(err)
	}
	documented := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if m := envLine.FindStringSubmatch(strings.TrimSpace(line)); m != nil {
			if _, dup := documented[m[1]]; dup {
				t.Errorf("%s is documented twice", m[1])
			}
			documented[m[1]] = m[2]
		} else if k, _, ok := strings.Cut(line, "="); ok && !strings.HasPrefix(strings.TrimSpace(line), "#") {
			t.Errorf("%q is set, not commented out: the example must not change any default", k)
		}
	}

	read := map[string]bool{}
	base, err := loadConfig(func(name string) string { read[name] = true; return "" })
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for n := range read {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		if name == "HOME" || name == "XDG_STATE_HOME" {
			continue // the host's, not settings of this program: they place the defaults
		}
		def, ok := documented[name]
		if !ok {
			t.Errorf("loadConfig reads %s but webhook-auto-update.env.example does not document it", name)
			continue
		}
		cfg, err := loadConfig(func(n string) string {
			if n == name {
				return def
			}
			return ""
		})
		if err != nil {
			t.Errorf("the documented default %s=%s is refused: %v", name, def, err)
			continue
		}
		if !reflect.DeepEqual(cfg, base) {
			t.Errorf("the documented default %s=%s is not the default loadConfig uses", name, def)
		}
	}
	for name := range documented {
		if !read[name] {
			t.Errorf("webhook-auto-update.env.example documents %s, which loadConfig never reads", name)
		}
	}
}

// TestNotifyReadyAfterListening runs the built binary with NOTIFY_SOCKET and checks that when
// READY=1 arrives /health already answers, and that STOPPING=1 follows SIGTERM.
func TestNotifyReadyAfterListening(t *testing.T) {
	bin := buildServerBinary(t)
	dir := t.TempDir()
	sockPath := filepath.Join(dir, "notify")
	sock := notifySocket(t, sockPath)
	addr := freeLoopbackAddr(t)
	p := startServerProc(t, bin, []string{"--listen", addr, "--state-dir", filepath.Join(dir, "state")},
		[]string{"NOTIFY_SOCKET=" + sockPath}, nil)

	if got := receive(t, sock); got != "READY=1" {
		t.Fatalf("first notification %q, want READY=1", got)
	}
	// No polling: READY=1 promises the listener is up and the database migrated.
	resp, err := http.Get("http://" + addr + "/health")
	if err != nil {
		t.Fatalf("/health right after READY=1: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/health right after READY=1: %s", resp.Status)
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if got := receive(t, sock); got != "STOPPING=1" {
		t.Errorf("notification after SIGTERM %q, want STOPPING=1", got)
	}
	if err := p.wait(); err != nil {
		t.Fatalf("server exit: %v\nstderr:\n%s", err, p.stderr())
	}
}

// Fuzzing (issue 7): unit identifiers and Quadlet files. Seeds are below and under
// testdata/fuzz/<target>; `go test -fuzz` explores from there.

// FuzzResolveUnit: whatever resolveUnit or validUnitName accepts passes validUnitName, cannot
// start with "-", and is stable; the transient unit name of any delivery id is valid too.
func FuzzResolveUnit(f *testing.F) {
	for _, s := range []string{"foo", "foo.service", "foo/redeploy", "github-package-update/foo", "/foo",
		"--authfile=x", "-q", "-.slice", "foo@*.service", "../x", "%2e%2e", "a\x00", "a\nb", strings.Repeat("a", 256),
		"a@.service", "a@b.service", "github-package-update/-q", "/-x", " foo ", "foo.service.service", "x:y_z.service"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		if u, err := resolveUnit(id); err == nil {
			checkUnitInvariants(t, id, u)
		}
		if validUnitName(id) == nil {
			checkUnitInvariants(t, id, id)
		}
		task := taskUnitName(id) + ".service"
		if err := validUnitName(task); err != nil {
			t.Errorf("taskUnitName(%q) gives the invalid unit %q: %v", id, task, err)
		}
	})
}

// FuzzQuadletImage: any file parses without a panic to a single-line value; what a pull could
// use of it passes parseImageRef's invariants; and a plain Image= value written into a
// [Container] section (LF or CRLF) is read back exactly.
func FuzzQuadletImage(f *testing.F) {
	for _, s := range []struct{ data, value string }{
		{"[Unit]\nDescription=x\n\n[Container]\nImage=ghcr.io/o/n:1\n", "ghcr.io/o/n:1"},
		{"[Container]\nImage=\"docker://ghcr.io/o/n:1\"\n", "127.0.0.1:5000/demo:v2"},
		{"[Container]\r\nImage=a \\\r\n  b\r\n", "ghcr.io/o/n@sha256:" + strings.Repeat("a", 64)},
		{"[Container]\nImage=x\n[Service]\nImage=y\n#Image=z\n[Container]\n;Image=w\n", "-q"},
		{"[Container]\nImage='--authfile=x'\n", "docker-archive:/tmp/x.tar"},
		{"\\\n\\\\\n[Container]\nImage=\\", "a=b c"},
		{"", ""},
	} {
		f.Add([]byte(s.data), s.value)
	}
	f.Fuzz(func(t *testing.T, data []byte, value string) {
		uf := unitFile{labels: map[string]string{}}
		uf.readQuadlet(data)
		img := uf.image
		if strings.ContainsRune(img, '\n') {
			t.Errorf("readQuadlet returned a multi-line image %q", img)
		}
		// A label value written quoted, with its quote and backslash escaped, reads back exactly.
		esc := strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(value)
		if !strings.ContainsAny(value, "\r\n") {
			l := unitFile{labels: map[string]string{}}
			l.readQuadlet([]byte("[Container]\nLabel=a=1 \"k=" + esc + "\"\n"))
			if l.labels["k"] != value || l.labels["a"] != "1" {
				t.Errorf("Label=\"k=%s\" read as %q, want k=%q a=1", esc, l.labels, value)
			}
		}
		if ref, err := parseImageRef(img); err == nil {
			checkRefInvariants(t, ref)
		}
		plain := !strings.ContainsRune(value, '\n') && value == strings.TrimSpace(value) &&
			!strings.HasSuffix(value, "\\") && !strings.HasPrefix(value, "docker://") &&
			!(len(value) >= 2 && (value[0] == '"' || value[0] == '\'') && value[len(value)-1] == value[0])
		if !plain {
			return
		}
		for _, file := range []string{"[Container]\nImage=" + value + "\n", "[Unit]\r\nX=1\r\n[Container]\r\nImage=" + value + "\r\n"} {
			var uf unitFile
			if uf.readQuadlet([]byte(file)); uf.image != value {
				t.Errorf("readQuadlet(%q) image %q, want %q", file, uf.image, value)
			}
		}
	})
}

// TestStartStillRunning: when systemctl is killed at its time limit while the unit's job goes on
// (a long podman auto-update), the start is reported as triggered with a note, not as failed; a
// unit that is not starting stays an error. The fake start never ends; the time limit also bounds
// the systemctl show that follows, so it is seconds, not a margin a slow (-race) run could miss.
func TestStartStillRunning(t *testing.T) {
	for _, tc := range []struct {
		name    string
		state   string
		wantErr bool
	}{
		{"job still running", "ActiveState=activating\nSubState=start\nResult=success\nNRestarts=0\nMainPID=42\nLoadState=loaded\n", false},
		{"unit running", "ActiveState=active\nSubState=running\nResult=success\nNRestarts=0\nMainPID=42\nLoadState=loaded\n", false},
		{"unit failed", "ActiveState=failed\nSubState=failed\nResult=exit-code\nNRestarts=0\nMainPID=0\nLoadState=loaded\n", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newFakeHost(t)
			h.set("systemctl-start.sleep", "1h")
			h.set("unit.state", tc.state)
			const limit = 2 * time.Second
			cfg := &config{commandTimeout: limit}
			res := startUnit(context.Background(), cfg, "podman-auto-update.service")
			if (res.err != nil) != tc.wantErr {
				t.Fatalf("err %v, want error %v", res.err, tc.wantErr)
			}
			if !tc.wantErr && !strings.Contains(res.note, "stopped waiting") {
				t.Errorf("note %q, want it to say systemctl stopped waiting", res.note)
			}
			results := triggerUnits(context.Background(), &config{commandTimeout: limit,
				autoUpdateUnit: "podman-auto-update.service"}, nil, true, false)
			if got := results[0].Status; (got == triggerOK) == tc.wantErr {
				t.Errorf("trigger status %q (%s)", got, results[0].Message)
			}
		})
	}
}

// TestConfiguredImageQuadlet: the unit's Quadlet file names the image; a drop-in overrides it; an
// untagged Image= means :latest, as podman reads it.
func TestConfiguredImageQuadlet(t *testing.T) {
	h := newFakeHost(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "web.container")
	h.set("unit.state", "ActiveState=active\nLoadState=loaded\nSourcePath="+file+"\n")
	cfg := &config{commandTimeout: 5 * time.Second}
	getenv := func(string) string { return "" }
	write := func(p, s string) {
		t.Helper()
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(file, "[Container]\nImage=ghcr.io/me/web\n")
	_, uf, err := inspectUnit(context.Background(), cfg, getenv, "web.service")
	if err != nil || uf.image != "ghcr.io/me/web" || uf.source != file {
		t.Fatalf("configuredImage = %+v %v", uf, err)
	}
	write(filepath.Join(file+".d", "10-pin.conf"), "[Container]\nImage=ghcr.io/me/web:v2\n")
	write(filepath.Join(file+".d", "05-other.conf"), "[Container]\nImage=ghcr.io/me/old:v1\n")
	write(filepath.Join(file+".d", "20-env.conf"), "[Container]\nEnvironment=A=1\n")
	_, uf, err = inspectUnit(context.Background(), cfg, getenv, "web.service")
	if err != nil || uf.image != "ghcr.io/me/web:v2" || !strings.HasSuffix(uf.source, "10-pin.conf") {
		t.Fatalf("with drop-ins: %+v %v, want the last drop-in naming an image", uf, err)
	}
	for in, want := range map[string]string{
		"ghcr.io/me/web":            "ghcr.io/me/web:latest",
		"ghcr.io/me/web:v1":         "ghcr.io/me/web:v1",
		"127.0.0.1:5000/me/web":     "127.0.0.1:5000/me/web:latest",
		"127.0.0.1:5000/me/web:v1":  "127.0.0.1:5000/me/web:v1",
		"ghcr.io/me/web@sha256:abc": "ghcr.io/me/web@sha256:abc",
		"web.image":                 "web.image", // a Quadlet .image unit: not a reference, refused later
		"":                          "",
	} {
		if got := withDefaultTag(in); got != want {
			t.Errorf("withDefaultTag(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestQuadletLabels: Label= lines are split as Quadlet splits them (systemd's quoting, escapes),
// a later key overrides, an empty Label= clears, drop-ins apply in order, and only [Container]
// counts. Debian's podman 4.3 has no Quadlet generator, so the rules are podman's documented ones
// (quadlet's LookupAllKeyVal: SplitRelax|SplitUnquote|SplitCUnescape), not a run of it.
func TestQuadletLabels(t *testing.T) {
	for _, tc := range []struct {
		file string
		want map[string]string
	}{
		{"[Container]\nLabel=webhook-auto-update.cooldown=15m\n", map[string]string{"webhook-auto-update.cooldown": "15m"}},
		{"[Container]\nLabel=\"webhook-auto-update.window=Sat,Sun *-*-* 02:00\" webhook-auto-update.window-length=3h\n",
			map[string]string{"webhook-auto-update.window": "Sat,Sun *-*-* 02:00", "webhook-auto-update.window-length": "3h"}},
		{"[Container]\nLabel=a=1 b=2\nLabel=a=3\n", map[string]string{"a": "3", "b": "2"}},
		{"[Container]\nLabel=a=1\nLabel=\nLabel=b=2\n", map[string]string{"b": "2"}},
		{"[Container]\nLabel=a='x y' b=c\\ d e=\"q\\\"t\" noequals\n", map[string]string{"a": "x y", "b": "c d", "e": `q"t`}},
		{"[Container]\nLabel=a=\"unterminated b=2\n", map[string]string{}},
		{"[Container]\nLabel=a=1 \\\n  b=2\n[Service]\nLabel=c=3\n#Label=d=4\n", map[string]string{"a": "1", "b": "2"}},
	} {
		uf := unitFile{labels: map[string]string{}}
		uf.readQuadlet([]byte(tc.file))
		if !maps.Equal(uf.labels, tc.want) {
			t.Errorf("labels of %q = %q, want %q", tc.file, uf.labels, tc.want)
		}
	}
	h := newFakeHost(t)
	file := filepath.Join(t.TempDir(), "web.container")
	h.set("unit.state", "LoadState=loaded\nSourcePath="+file+"\n")
	os.WriteFile(file, []byte("[Container]\nImage=ghcr.io/me/web:v1\nLabel=a=1 b=1\n"), 0o600)
	os.MkdirAll(file+".d", 0o755)
	os.WriteFile(filepath.Join(file+".d", "20-b.conf"), []byte("[Container]\nLabel=b=3\n"), 0o600)
	os.WriteFile(filepath.Join(file+".d", "10-a.conf"), []byte("[Container]\nLabel=b=2 c=2\n"), 0o600)
	_, uf, err := inspectUnit(context.Background(), &config{commandTimeout: 5 * time.Second}, func(string) string { return "" }, "web.service")
	if want := map[string]string{"a": "1", "b": "3", "c": "2"}; err != nil || !maps.Equal(uf.labels, want) || uf.image != "ghcr.io/me/web:v1" || uf.source != file {
		t.Errorf("with drop-ins: %+v %v, want labels %q, the image and source of the file", uf, err, want)
	}
}

// TestChildEnvHasNoSecrets: commands the program runs never inherit the GitHub secret or a token.
func TestChildEnvHasNoSecrets(t *testing.T) {
	t.Setenv("GITHUB_WEBHOOK_SECRET", "gh-secret-value")
	t.Setenv("WEBHOOK_TOKEN", "token-value")
	t.Setenv("WEBHOOK_MANUAL_TOKEN", "manual-value")
	t.Setenv("WEBHOOK_FUTURE_API_KEY", "future-value")
	for name := range pushSources {
		t.Setenv(secretEnv(name), name+"-registry-value")
	}
	t.Setenv("WEBHOOK_STATE_DIR", "/state")
	env := strings.Join(childEnv(), "\n")
	for _, secret := range []string{"gh-secret-value", "token-value", "manual-value", "future-value", "registry-value"} {
		if strings.Contains(env, secret) {
			t.Errorf("child environment carries %q", secret)
		}
	}
	if !strings.Contains(env, "WEBHOOK_STATE_DIR=/state") {
		t.Error("child environment lost WEBHOOK_STATE_DIR")
	}
	out := runCommand(context.Background(), 5*time.Second, "/usr/bin/env")
	if out.err != nil || strings.Contains(out.stdout, "gh-secret-value") || strings.Contains(out.stdout, "token-value") {
		t.Fatalf("a command saw a secret (err %v):\n%s", out.err, out.stdout)
	}
}

// TestUnitLookups: concurrent lookups of one unit share one systemctl show; an answer is reused
// for the cache's ttl, then asked again, so a daemon-reload'ed change is seen; another unit has
// its own entry; a caller whose context ends does not cut the shared lookup short.
func TestUnitLookups(t *testing.T) {
	h := newFakeHost(t)
	h.set("systemctl-show.sleep", "1s")
	dir := t.TempDir()
	file := filepath.Join(dir, "web.container")
	if err := os.WriteFile(file, []byte("[Container]\nImage=ghcr.io/me/web:v1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	h.set("unit.state", "LoadState=loaded\nSourcePath="+file+"\n")
	cfg := &config{commandTimeout: 5 * time.Second}
	getenv := func(string) string { return "" }
	c := &unitLookups{ttl: time.Hour}
	const n = 10
	results := make(chan error, n)
	for range n {
		go func() {
			uf, err := c.configuredImage(context.Background(), cfg, getenv, "web.service")
			if err == nil && uf.image != "ghcr.io/me/web:v1" {
				err = fmt.Errorf("image %q", uf.image)
			}
			results <- err
		}()
	}
	for range n {
		if err := <-results; err != nil {
			t.Errorf("shared lookup: %v", err)
		}
	}
	if got := len(h.callsOf("systemctl-show")); got != 1 {
		t.Fatalf("%d concurrent lookups of one unit ran systemctl %d times, want once", n, got)
	}
	h.set("systemctl-show.sleep", "0s")
	h.set("unit.state", "LoadState=not-found\n")
	os.WriteFile(file, []byte("[Container]\nImage=ghcr.io/me/web:v2\n"), 0o600)
	if uf, err := c.configuredImage(context.Background(), cfg, getenv, "web.service"); uf.image != "ghcr.io/me/web:v1" || err != nil {
		t.Errorf("within the ttl: %q %v, want the cached ghcr.io/me/web:v1", uf.image, err)
	}
	c.entries["web.service"].at = time.Now().Add(-2 * time.Hour) // as if the ttl had passed
	if _, err := c.configuredImage(context.Background(), cfg, getenv, "web.service"); !errors.Is(err, errUnitNotFound) {
		t.Errorf("after the ttl: %v, want the unit now not found", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.configuredImage(ctx, cfg, getenv, "db.service"); !errors.Is(err, errUnitNotFound) {
		t.Errorf("a lookup asked with an ended context: %v, want it run to its end (not found)", err)
	}
	if want := []string{"show", "-p", "LoadState", "-p", "SourcePath", "-p", "ActiveState", "-p", "SubState", "-p", "Result",
		"-p", "NRestarts", "-p", "ExecMainStatus", "-p", "ExecMainCode", "--", "web.service"}; !slices.Equal(h.callsOf("systemctl-show")[0][2:], want) {
		t.Errorf("lookup argv %q, want systemctl --user %q", h.callsOf("systemctl-show")[0], want)
	}
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
	r, bin, state, logPath, port := e2eSocketRig(t)
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

// TestWatchGate runs the gate on a fake clock: a sample every poll of 500 ms over a 3 s settle.
// A problem fails the gate at the sample that shows it, not at the settle's end; passing takes
// the settle's full length.
// TestWatchGateSlowLook: a look that took past the settle (a loaded host) does not pass the gate
// by itself: a last look follows, and its failing healthcheck is the verdict.
func TestWatchGateSlowLook(t *testing.T) {
	var clock time.Duration
	base := time.Unix(1700000000, 0)
	now := func() time.Time { return base.Add(clock) }
	after := func(d time.Duration) <-chan time.Time { clock += d; c := make(chan time.Time, 1); c <- now(); return c }
	active := unitSample{activeState: "active", subState: "running", result: "success"}
	var lasts []bool
	sample := func(last bool) (gateSample, error) {
		lasts = append(lasts, last)
		clock += 4 * time.Second // slower than the whole settle
		return gateSample{at: now(), unit: active, checkFailed: last}, nil
	}
	verdict, _, _ := watchGate(context.Background(), now, after, 500*time.Millisecond, 3*time.Second, active, sample)
	if !strings.Contains(verdict, "unhealthy at the end") || !slices.Equal(lasts, []bool{false, true}) {
		t.Errorf("verdict %q after looks (last?) %v, want a last look whose failing healthcheck fails the gate", verdict, lasts)
	}
}

func TestWatchGate(t *testing.T) {
	const poll, settle = 500 * time.Millisecond, 3 * time.Second
	u := func(active, sub string, n int) unitSample {
		return unitSample{activeState: active, subState: sub, result: "success", nRestarts: n}
	}
	active, activating := u("active", "running", 0), u("activating", "start", 0)
	running := unitContainer{id: "c0ffee", state: "running"}
	healthy, starting, unhealthy := running, running, running
	healthy.health, starting.health, unhealthy.health = "healthy", "starting", "unhealthy"
	exited := unitContainer{id: "c0ffee", state: "exited", exitCode: 1}
	crashed := u("failed", "failed", 0)
	crashed.result, crashed.exitCode = "exit-code", 1
	g := func(unit unitSample, ctr unitContainer) gateSample { return gateSample{unit: unit, ctr: ctr} }
	failing := g(active, starting)
	failing.checkFailed = true
	for _, tc := range []struct {
		name     string
		baseline unitSample
		samples  []gateSample // the last one repeats
		want     string       // "" passes, else a substring of the verdict
		at       time.Duration
	}{
		{"active throughout", active, []gateSample{g(active, running)}, "", settle},
		{"activating, then active and healthy", active, []gateSample{g(activating, unitContainer{}), g(active, starting), g(active, healthy)}, "", settle},
		{"no container: systemd's word", active, []gateSample{g(active, unitContainer{})}, "", settle},
		{"NRestarts reset by the explicit restart", u("active", "running", 5), []gateSample{g(active, running)}, "", settle},
		{"a high NRestarts unchanged", u("active", "running", 5), []gateSample{g(u("active", "running", 5), running)}, "", settle},
		{"the unit fails at 1 s", active, []gateSample{g(active, running), g(active, running), g(crashed, exited)}, "exited with code 1 (result exit-code)", time.Second},
		{"the container exits at 1.5 s", active, []gateSample{g(active, running), g(active, running), g(active, running), g(active, exited)}, "exited with code 1", 1500 * time.Millisecond},
		{"restarted by systemd at 0.5 s", active, []gateSample{g(active, running), g(u("active", "running", 1), running)}, "restarted the unit on its own", poll},
		{"deactivating", active, []gateSample{g(u("deactivating", "stop-sigterm", 0), running)}, "became deactivating", 0},
		{"unhealthy at 1 s", active, []gateSample{g(active, starting), g(active, starting), g(active, unhealthy)}, "unhealthy", time.Second},
		{"a failing healthcheck below podman's retries is not yet a verdict", active, []gateSample{failing, g(active, healthy)}, "", settle},
		{"healthcheck still failing at the end", active, []gateSample{failing}, "unhealthy at the end of the settle", settle},
		{"still activating at the end", active, []gateSample{g(activating, unitContainer{})}, "not active", settle},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var clock time.Duration
			base := time.Unix(1700000000, 0)
			now := func() time.Time { return base.Add(clock) }
			after := func(d time.Duration) <-chan time.Time {
				clock += d
				c := make(chan time.Time, 1)
				c <- now()
				return c
			}
			n := 0
			sample := func(last bool) (gateSample, error) {
				s := tc.samples[min(n, len(tc.samples)-1)]
				n++
				if last && s.ctr.health == "" {
					s.ctr = unitContainer{} // the settle's last look asks systemd alone
				}
				s.at = now()
				return s, nil
			}
			verdict, _, cut := watchGate(context.Background(), now, after, poll, settle, tc.baseline, sample)
			if tc.want == "" && verdict != "" || tc.want != "" && !strings.Contains(verdict, tc.want) {
				t.Errorf("verdict %q, want %q", verdict, tc.want)
			}
			if clock != tc.at || cut {
				t.Errorf("decided at %s (cut %v), want at %s", clock, cut, tc.at)
			}
		})
	}
	t.Run("a stopped task decides on one more sample", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		verdict, _, cut := watchGate(ctx, time.Now, time.After, poll, time.Hour, active, func(bool) (gateSample, error) {
			return gateSample{at: time.Now(), unit: active}, nil
		})
		if verdict != "" || !cut {
			t.Errorf("verdict %q, cut %v; want healthy, cut short", verdict, cut)
		}
	})
}
