// systemd.go owns everything that talks to systemd: socket activation (sd_listen_fds(3)),
// readiness and watchdog notifications (sd_notify(3)), and, for the redeploy, unit name
// validation and the systemctl / systemd-run command lines.
//
// Rules: the activation and notify variables are read straight from the environment and unset
// once read, so no child process (systemctl, podman, systemd-run) inherits them; passed fds are
// marked close-on-exec for the same reason. Every value that reaches systemctl's argv has passed
// validUnitName and follows "--".
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
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
