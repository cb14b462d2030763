// main_readme_test.go tests README.md against the code: TestREADME runs its sh blocks (the
// convention is below) against fakes, and TestREADMEHandWrittenUnit checks the hand-written unit
// it shows.
package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// The README's examples, run as a reader would run them.
//
// Convention, for everyone who edits README.md:
//   - A fenced block whose info string is "sh" is an example, and TestREADME runs it: the blocks
//     in README order, each with "bash -euo pipefail" in one sandbox shared by all (a copy of the
//     module as the working directory, a fresh HOME, PATH = fake podman/systemctl/systemd-run/
//     loginctl, then ~/.local/bin, then the system's, EDITOR=true) and in a network namespace of
//     its own, so 127.0.0.1:8088 is the example's. A block must exit 0, and every "# => TEXT"
//     comment in it must appear in its output.
//   - Every other block (```ini, ```toml, ```text, a bare ```) is not run: output, usage, files.
//   - An HTML comment on the line just before a fence changes that:
//     <!-- readme-test: skip: REASON --> does not run an sh block (a reason is required);
//     <!-- readme-test: background CMD --> runs CMD in the background first, waits until
//     127.0.0.1:8088/health answers, and stops it with SIGTERM after the block;
//     <!-- readme-test: rig-unit --> and <!-- readme-test: rig-quadlet --> mark the hand-written
//     .service and its .container file, which TestREADMEHandWrittenUnit installs on the real rig.
//   - An unknown marker fails the test, so a typo cannot silently skip an example.

// readmeBlock is one fenced block of README.md.
type readmeBlock struct {
	line   int    // of the opening fence, 1-based
	lang   string // the fence's info string
	marker string // the readme-test marker before it, "" none
	body   string
}

var reReadmeMarker = regexp.MustCompile(`^<!-- readme-test: (.*) -->$`)

// readmeBlocks splits README.md into its fenced blocks.
func readmeBlocks(t *testing.T) []readmeBlock {
	t.Helper()
	data, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	var blocks []readmeBlock
	var cur *readmeBlock
	prev := ""
	for i, line := range strings.Split(string(data), "\n") {
		switch {
		case cur == nil && strings.HasPrefix(line, "```"):
			cur = &readmeBlock{line: i + 1, lang: strings.TrimSpace(strings.TrimPrefix(line, "```"))}
			if m := reReadmeMarker.FindStringSubmatch(strings.TrimSpace(prev)); m != nil {
				cur.marker = strings.TrimSpace(m[1])
			}
		case cur != nil && strings.TrimSpace(line) == "```":
			blocks = append(blocks, *cur)
			cur = nil
		case cur != nil:
			cur.body += line + "\n"
		}
		prev = line
	}
	if cur != nil {
		t.Fatalf("README.md:%d: unclosed fence", cur.line)
	}
	return blocks
}

// readmeSandbox copies what the examples need (the module's sources, migrations/, systemd/) into
// a fresh directory, so no example writes into the checkout.
func readmeSandbox(t *testing.T) (work, home string) {
	t.Helper()
	dir := t.TempDir()
	work, home = filepath.Join(dir, "src"), filepath.Join(dir, "home")
	for _, d := range []string{work, home, filepath.Join(work, "migrations"), filepath.Join(work, "systemd")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	var files []string
	for _, pattern := range []string{"go.mod", "go.sum", "*.go", "migrations/*", "systemd/*"} {
		m, err := filepath.Glob(pattern)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, m...)
	}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		if err := copyExecutable(f, filepath.Join(work, f), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return work, home
}

// TestREADME runs the README's sh blocks (see the convention above) against fakes of podman,
// systemctl and systemd-run: the real binary, built by the examples themselves, and real curl.
func TestREADME(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary the way the README does")
	}
	var missing []string
	for _, p := range []string{"bash", "curl", "unshare", "ip", "go"} {
		if _, err := exec.LookPath(p); err != nil {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		rigSkipOrFail(t, "TestREADME needs %s", strings.Join(missing, ", "))
	}
	if _, err := os.Stat(legacyStateDir); err == nil {
		t.Fatalf("%s exists on this host: the examples would use it as their state directory", legacyStateDir)
	}
	work, home := readmeSandbox(t)
	fakes := installFakes(t, "podman", "systemctl", "systemd-run", "loginctl")
	fakeState := t.TempDir()
	goEnv := func(name string) string {
		out, err := exec.Command("go", "env", name).Output()
		if err != nil {
			t.Fatalf("go env %s: %v", name, err)
		}
		return strings.TrimSpace(string(out))
	}
	goBin, _ := exec.LookPath("go")
	env := []string{
		"HOME=" + home, "USER=readme", "EDITOR=true", "LANG=C.UTF-8",
		"PATH=" + strings.Join([]string{fakes, filepath.Join(home, ".local", "bin"), filepath.Dir(goBin), rigSystemPath}, ":"),
		// The examples' go build uses this test run's caches, offline.
		"GOCACHE=" + goEnv("GOCACHE"), "GOMODCACHE=" + goEnv("GOMODCACHE"), "GOPATH=" + goEnv("GOPATH"),
		"GOTOOLCHAIN=local", "GOPROXY=off", "GOFLAGS=-mod=mod",
		fakePodmanDirEnv + "=" + fakeState, fakeSystemctlDirEnv + "=" + fakeState, fakeSystemdRunDirEnv + "=" + fakeState,
	}
	unshare := []string{"unshare", "--net"}
	if os.Geteuid() != 0 {
		unshare = append(unshare, "--map-root-user")
	}

	ran := 0
	for _, b := range readmeBlocks(t) {
		where := fmt.Sprintf("README.md:%d", b.line)
		background := ""
		switch {
		case b.marker == "":
		case strings.HasPrefix(b.marker, "skip:") && strings.TrimSpace(strings.TrimPrefix(b.marker, "skip:")) != "":
			t.Logf("%s: not run: %s", where, strings.TrimSpace(strings.TrimPrefix(b.marker, "skip:")))
			continue
		case strings.HasPrefix(b.marker, "background "):
			background = strings.TrimPrefix(b.marker, "background ")
		case b.marker == "rig-unit" || b.marker == "rig-quadlet":
			continue // TestREADMEHandWrittenUnit
		default:
			t.Errorf("%s: unknown readme-test marker %q", where, b.marker)
			continue
		}
		if b.lang != "sh" {
			if background != "" {
				t.Errorf("%s: a background marker on a %q block, which is not run", where, b.lang)
			}
			continue
		}
		script := b.body
		if background != "" {
			script = fmt.Sprintf(`%s >readme-background.log 2>&1 &
bg=$!
trap 'kill $bg; wait $bg' EXIT
for i in $(seq 100); do curl -sf 127.0.0.1:8088/health >/dev/null && break; sleep 0.1; done
curl -sf 127.0.0.1:8088/health >/dev/null || { cat readme-background.log; exit 1; }
%s`, background, b.body)
		}
		path := filepath.Join(t.TempDir(), "block.sh")
		if err := os.WriteFile(path, []byte(script), 0o644); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		argv := append(append([]string{}, unshare...), "bash", "-c", `ip link set lo up && exec bash -euo pipefail "$0"`, path)
		cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
		cmd.Dir, cmd.Env, cmd.WaitDelay = work, env, 5*time.Second
		out, err := cmd.CombinedOutput()
		cancel()
		ran++
		if err != nil {
			t.Errorf("%s: the example failed: %v\n--- block ---\n%s--- output ---\n%s", where, err, b.body, out)
			continue
		}
		for _, line := range strings.Split(b.body, "\n") {
			if _, want, ok := strings.Cut(line, "# => "); ok && !strings.Contains(string(out), strings.TrimSpace(want)) {
				t.Errorf("%s: the output does not contain %q\n--- output ---\n%s", where, strings.TrimSpace(want), out)
			}
		}
		t.Logf("%s: ok", where)
	}
	if ran == 0 {
		t.Fatal("README.md has no sh example to run")
	}
}

// TestREADMEHandWrittenUnit installs the README's hand-written unit and its .container file (the
// rig-unit and rig-quadlet blocks) on the real rig, with only the names and the image replaced,
// and checks that a delivery redeploys it: the tool finds its container and its Image=, and its
// stop works.
func TestREADMEHandWrittenUnit(t *testing.T) {
	r := needRig(t)
	var unitText, quadletText string
	for _, b := range readmeBlocks(t) {
		switch b.marker {
		case "rig-unit":
			unitText = b.body
		case "rig-quadlet":
			quadletText = b.body
		}
	}
	if unitText == "" || quadletText == "" {
		t.Fatal("README.md has no rig-unit or rig-quadlet block")
	}
	name := rigUniqueName(t, "handwritten")
	ref, id1 := r.PushImage(t, "e2e/"+name, "latest", "v1")
	// The rig's images have no command of their own, as a real app's has: ExecStart gets one.
	unitText = strings.ReplaceAll(unitText, "ghcr.io/me/myapp:latest\n", "ghcr.io/me/myapp:latest /bin/busybox sleep 1000\n")
	fill := func(s string) string {
		s = strings.ReplaceAll(s, "ghcr.io/me/myapp:latest", ref)
		s = strings.ReplaceAll(s, "/usr/bin/podman", r.podman)
		return strings.ReplaceAll(s, "myapp", name)
	}
	// Where Quadlet keeps .container files: the rig user's own ~/.config/containers/systemd,
	// beside the podman configuration its tasks need.
	quadlet := filepath.Join(r.home, ".config", "containers", "systemd", name+".container")
	if err := os.MkdirAll(filepath.Dir(quadlet), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(quadlet, []byte(fill(quadletText)), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(quadlet) })
	r.Chown(t, filepath.Dir(quadlet), quadlet)
	unit, ctr := name+".service", "systemd-"+name
	r.InstallUnit(t, unit, fill(unitText))
	if _, err := r.Systemctl(t, "start", unit); err != nil {
		t.Fatal(err)
	}
	r.WaitFor(t, 60*time.Second, func() bool { return r.ContainerImage(t, ctr) == id1 }, unit+" to run v1 (unit:\n"+fill(unitText)+")")

	s := startE2EServer(t)
	if code, text := s.deliver(t, unit, "package", "hw-other", githubPackagePayload(r.Registry(), "e2e", name+"-x", "latest", ""), s.secret); code != http.StatusAccepted || !strings.HasPrefix(text, "repository mismatch") {
		t.Errorf("a push of another repository: %d %q, want 202 repository mismatch (the .container file's Image= was not read)", code, text)
	}
	_, id2 := r.PushImage(t, "e2e/"+name, "latest", "v2")
	r.TagLocal(t, id1, ref)
	if code, text := s.deliver(t, unit, "package", "hw-1", githubPackagePayload(r.Registry(), "e2e", name, "latest", ""), s.secret); code != http.StatusAccepted {
		t.Fatalf("delivery: %d %q", code, text)
	}
	rows := s.waitTask(t, r, "hw-1")
	if got := strings.Join(steps(rows), ","); got != "started,pulled,restarted,healthy,completed" {
		t.Fatalf("steps %s; server log:\n%s", got, s.log)
	}
	for _, row := range rows {
		if row.step == "restarted" {
			t.Logf("restart of the hand-written unit took %v ms (its ExecStop waits up to 10 s for a PID 1 that ignores SIGTERM)", row.meta["restart_ms"])
		}
		if row.step == "healthy" && row.meta["container_id"] == nil {
			t.Errorf("the healthy row names no container: the tool did not find the unit's container (%v)", row.meta)
		}
	}
	r.WaitFor(t, 30*time.Second, func() bool { return r.ContainerImage(t, ctr) == id2 }, ctr+" to run v2")
}
