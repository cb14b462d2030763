// podman_test.go tests podman.go and the redeploy it runs: payload → image reference (GitHub's
// and each registry's, on the documented samples in testdata/payloads), reference
// validation, the restart and rollback decisions, runCommand, pullImage with retries, the whole
// run-task flow against fake podman and systemctl, and the systemd-run argv that dispatches it.
//
// Rules: the fakes are the test binary itself (installFakes in main_test.go), registered here as
// "podman" and "systemctl" and scripted through files in a state directory named by
// FAKE_PODMAN_DIR / FAKE_SYSTEMCTL_DIR: every call appends its argv to argv.log, and a file
// <prog>-<verb>.{sleep,fails,exit,stdout,stderr} changes what one subcommand does. PATH holds only
// the fakes, so no test here can reach a real podman or systemd. No test measures wall-clock time;
// timeouts only bound a fake that would otherwise sleep.
package main

import (
	"bytes"
	"cmp"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

const (
	fakePodmanDirEnv    = "FAKE_PODMAN_DIR"
	fakeSystemctlDirEnv = "FAKE_SYSTEMCTL_DIR"
)

func init() {
	chainFake("podman", fakePodmanDirEnv)
	chainFake("systemctl", fakeSystemctlDirEnv)
}

// chainFake registers the scripted fake for prog. A fake another test file registered earlier
// keeps running whenever this one's state directory is not set.
func chainFake(prog, env string) {
	prev := fakePrograms[prog]
	fakePrograms[prog] = func() int {
		dir := os.Getenv(env)
		if dir == "" && prev != nil {
			return prev()
		}
		return runFake(prog, env, dir, os.Args[1:])
	}
}

// fakeVerb names the subcommand of a call: "pull", "image-inspect", "restart".
// argsAfterDashes drops a leading "--", as podman's flag parser does.
func argsAfterDashes(args []string) []string {
	if len(args) > 0 && args[0] == "--" {
		return args[1:]
	}
	return args
}

func fakeVerb(prog string, args []string) string {
	if prog == "systemctl" {
		for len(args) > 0 && args[0] == "--user" {
			args = args[1:]
		}
	}
	if len(args) == 0 {
		return ""
	}
	if prog == "podman" && (args[0] == "image" || args[0] == "container") && len(args) > 1 {
		return args[0] + "-" + args[1]
	}
	return args[0]
}

// activeUnit is what "systemctl show" prints when the test set no unit.state; failedUnit is a
// unit whose main process exited with an error.
const (
	activeUnit = "ActiveState=active\nSubState=running\nResult=success\nNRestarts=0\nMainPID=4242\nLoadState=loaded\n"
	failedUnit = "ActiveState=failed\nSubState=failed\nResult=exit-code\nNRestarts=0\nMainPID=0\nLoadState=loaded\n"
)

// runFake is the whole fake podman / systemctl. Scripted files win over the built-in behaviour:
//
//	<key>.sleep   a Go duration slept first; <key>.woke is created after it
//	<key>.fails   fail (exit 1) this many more times
//	<key>.exit, <key>.stdout, <key>.stderr   print these and exit with that status (default 0)
//
// where key is "<prog>-<verb>". Built in: pull moves image.next into image.id; image inspect
// prints image.id ("image not known" when empty); tag sets image.id to its source; healthcheck
// reports no healthcheck (125); systemctl show prints unit.state; the Nth restart copies
// restart.after.N into unit.state.
func runFake(prog, env, dir string, args []string) int {
	if dir == "" {
		fmt.Fprintf(os.Stderr, "fake %s: %s is not set\n", prog, env)
		return 127
	}
	if len(args) == 1 && args[0] == "fake-ping" {
		fmt.Printf("fake %s\n", prog)
		return 0
	}
	file := func(name string) string { return filepath.Join(dir, name) }
	read := func(name string) string {
		b, _ := os.ReadFile(file(name))
		return string(b)
	}
	write := func(name, s string) { os.WriteFile(file(name), []byte(s), 0o600) }
	exists := func(name string) bool { _, err := os.Stat(file(name)); return err == nil }
	number := func(name string) int { n, _ := strconv.Atoi(strings.TrimSpace(read(name))); return n }

	line, _ := json.Marshal(append([]string{prog}, args...))
	if f, err := os.OpenFile(file("argv.log"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600); err == nil {
		f.Write(append(line, '\n'))
		f.Close()
	}
	key := prog + "-" + fakeVerb(prog, args)
	n := number(key+".count") + 1
	write(key+".count", strconv.Itoa(n))

	if d, err := time.ParseDuration(strings.TrimSpace(read(key + ".sleep"))); err == nil {
		time.Sleep(d)
		write(key+".woke", "")
	}
	if left := number(key + ".fails"); left > 0 {
		write(key+".fails", strconv.Itoa(left-1))
		fmt.Fprintf(os.Stderr, "Error: scripted failure of %s\n", key)
		return 1
	}
	if exists(key+".exit") || exists(key+".stdout") || exists(key+".stderr") {
		fmt.Print(read(key + ".stdout"))
		fmt.Fprint(os.Stderr, read(key+".stderr"))
		return number(key + ".exit")
	}
	switch key {
	case "podman-pull":
		if next := strings.TrimSpace(read("image.next")); next != "" {
			write("image.id", next)
			os.Remove(file("image.next"))
		}
		fmt.Println(strings.TrimSpace(read("image.id")))
	case "podman-image-inspect":
		if slices.ContainsFunc(args, func(a string) bool { return strings.Contains(a, ".Digest") }) {
			fmt.Println("sha256:" + strings.Repeat("d", 64))
			return 0
		}
		id := strings.TrimSpace(read("image.id"))
		if id == "" {
			fmt.Fprintf(os.Stderr, "Error: %s: image not known\n", args[len(args)-1])
			return 125
		}
		fmt.Println(id)
	case "podman-tag":
		if a := argsAfterDashes(args[1:]); len(a) > 0 {
			write("image.id", a[0])
		}
	case "podman-healthcheck":
		fmt.Fprintln(os.Stderr, "Error: container has no defined healthcheck")
		return 125
	case "systemctl-show":
		state := read("unit.state")
		if state == "" {
			state = activeUnit
		}
		// A redeploy's transient unit exists only once the fake systemd-run has started it.
		if last := args[len(args)-1]; strings.HasPrefix(last, "webhook-task-") {
			state = "LoadState=not-found\nActiveState=inactive\nSubState=dead\n"
			if exists("started." + strings.TrimSuffix(last, ".service")) {
				state = activeUnit
			}
		}
		fmt.Print(state)
	case keySystemdRun:
		for _, a := range args {
			if name, ok := strings.CutPrefix(a, "--unit="); ok {
				write("started."+name, "")
			}
		}
	case "systemctl-restart":
		if s := read(fmt.Sprintf("restart.after.%d", n)); s != "" {
			write("unit.state", s)
		}
	}
	return 0
}

// fakeHost is the state directory of the fakes for one test.
type fakeHost struct {
	t   *testing.T
	dir string
}

// newFakeHost puts fake podman and systemctl alone on PATH and checks that they answer.
func newFakeHost(t *testing.T) *fakeHost {
	t.Helper()
	bin := installFakes(t, "podman", "systemctl")
	dir := t.TempDir()
	t.Setenv("PATH", bin)
	t.Setenv(fakePodmanDirEnv, dir)
	t.Setenv(fakeSystemctlDirEnv, dir)
	for _, prog := range []string{"podman", "systemctl"} {
		out, err := exec.Command(prog, "fake-ping").Output()
		if err != nil || strings.TrimSpace(string(out)) != "fake "+prog {
			t.Fatalf("%s on PATH is not this file's fake (output %q, %v): did another test file replace fakePrograms[%q]?", prog, out, err, prog)
		}
	}
	return &fakeHost{t: t, dir: dir}
}

func (h *fakeHost) set(name, content string) {
	h.t.Helper()
	if err := os.WriteFile(filepath.Join(h.dir, name), []byte(content), 0o600); err != nil {
		h.t.Fatal(err)
	}
}

func (h *fakeHost) has(name string) bool {
	_, err := os.Stat(filepath.Join(h.dir, name))
	return err == nil
}

func (h *fakeHost) read(name string) string {
	b, _ := os.ReadFile(filepath.Join(h.dir, name))
	return strings.TrimSpace(string(b))
}

// calls returns the argv of every fake call so far, in order.
func (h *fakeHost) calls() [][]string {
	h.t.Helper()
	data, err := os.ReadFile(filepath.Join(h.dir, "argv.log"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		h.t.Fatal(err)
	}
	var out [][]string
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		if line == "" {
			continue
		}
		var argv []string
		if err := json.Unmarshal([]byte(line), &argv); err != nil {
			h.t.Fatalf("argv.log line %q: %v", line, err)
		}
		out = append(out, argv)
	}
	return out
}

// callsOf returns the calls of one "<prog>-<verb>" key.
func (h *fakeHost) callsOf(key string) [][]string {
	var out [][]string
	for _, c := range h.calls() {
		if c[0]+"-"+fakeVerb(c[0], c[1:]) == key {
			out = append(out, c)
		}
	}
	return out
}

func fakeCallLines(calls [][]string) string {
	var b strings.Builder
	for _, c := range calls {
		b.WriteString("  " + strings.Join(c, " ") + "\n")
	}
	return b.String()
}

// payload → image reference

// payloadEdit sets one dotted path of a JSON payload to value, or deletes it when drop is set.
type payloadEdit struct {
	path  string
	value any
	drop  bool
}

func setField(path string, v any) payloadEdit { return payloadEdit{path: path, value: v} }
func dropField(path string) payloadEdit       { return payloadEdit{path: path, drop: true} }

// loadPayload reads testdata/payloads/<name> and applies edits.
func loadPayload(t *testing.T, name string, edits ...payloadEdit) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", "payloads", name))
	if err != nil {
		t.Fatal(err)
	}
	if len(edits) == 0 {
		return data
	}
	var doc map[string]any
	if err := json.Unmarshal(data, &doc); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	for _, e := range edits {
		parts := strings.Split(e.path, ".")
		m := doc
		for _, p := range parts[:len(parts)-1] {
			next, ok := m[p].(map[string]any)
			if !ok {
				t.Fatalf("%s: no object at %q of %s", name, p, e.path)
			}
			m = next
		}
		if e.drop {
			delete(m, parts[len(parts)-1])
		} else {
			m[parts[len(parts)-1]] = e.value
		}
	}
	out, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

const (
	digestV1       = "sha256:ec68d7c2581952ba5cec6a35581e19ff826cc2c6a3d7e70a577fc1f3fde96175"
	digestV2       = "sha256:4cb489d904a289e570cfb53d545a9ed23477eadff1d4a8f0a6d3a8177aac679a"
	digestPlatform = "sha256:88c7275ef3ef13f6eb8bf6a201c972557ab952d4d6ebe115ca80d40a1c9b64c3"
)

func TestDeliveryFromPayload(t *testing.T) {
	const pub = "package-published-container.json"
	ghcr := func(tags ...string) delivery {
		return delivery{host: "ghcr.io", path: "octo-org/hello-world", tags: tags, digest: digestV1, action: "published"}
	}
	withHost := func(d delivery, host string) delivery { d.host = host; return d }
	withPath := func(d delivery, path string) delivery { d.path = path; return d }
	withDigest := func(d delivery, digest string) delivery { d.digest = digest; return d }
	for _, tc := range []struct {
		name    string
		file    string
		edits   []payloadEdit
		raw     string // used instead of file when set
		want    delivery
		ignored string // the ignoredError reason expected
		wantErr bool   // a non-ignored error expected
	}{
		{name: "package published to ghcr", file: pub, want: ghcr("v1.2.3", "latest")},
		{name: "package updated, tags deduplicated, primary first", file: "package-updated-container.json",
			want: delivery{host: "ghcr.io", path: "octo-org/hello-world", tags: []string{"v2", "latest"}, digest: digestV2, action: "updated"}},
		{name: "registry_package root", file: "registry-package-published-container.json", want: ghcr("v1.2.3", "latest")},
		{name: "package_type container lowercase", file: pub, edits: []payloadEdit{setField("package.package_type", "container")},
			want: ghcr("v1.2.3", "latest")},
		{name: "package_type Container mixed case", file: pub, edits: []payloadEdit{setField("package.package_type", "Container")},
			want: ghcr("v1.2.3", "latest")},
		{name: "legacy docker package maps to ghcr", file: "package-published-docker.json", want: ghcr("v1.2.3", "latest")},
		{name: "npm package ignored", file: "package-published-npm.json", ignored: "not-container"},
		{name: "npm package without metadata ignored", file: "package-published-npm.json",
			edits: []payloadEdit{dropField("package.package_version.metadata")}, ignored: "not-container"},
		{name: "maven package ignored", file: pub, edits: []payloadEdit{setField("package.package_type", "maven")}, ignored: "not-container"},
		{name: "registry.host wins", file: pub, edits: []payloadEdit{setField("package.registry.host", "registry.example.com:5000")},
			want: withHost(ghcr("v1.2.3", "latest"), "registry.example.com:5000")},
		{name: "registry.url host lowercased", file: pub, edits: []payloadEdit{setField("package.registry.url", "https://Registry.Example.COM:8443/Octo-Org")},
			want: withHost(ghcr("v1.2.3", "latest"), "registry.example.com:8443")},
		{name: "registry.url without scheme", file: pub, edits: []payloadEdit{setField("package.registry.url", "registry.example.com/octo-org")},
			want: withHost(ghcr("v1.2.3", "latest"), "registry.example.com")},
		{name: "no registry object defaults to ghcr.io", file: pub, edits: []payloadEdit{dropField("package.registry")},
			want: ghcr("v1.2.3", "latest")},
		{name: "empty registry url defaults to ghcr.io", file: pub, edits: []payloadEdit{setField("package.registry.url", "")},
			want: ghcr("v1.2.3", "latest")},
		{name: "owner from repository.owner.login", file: pub, edits: []payloadEdit{dropField("package.owner"), setField("repository.owner.login", "Other-Org")},
			want: withPath(ghcr("v1.2.3", "latest"), "other-org/hello-world")},
		{name: "owner from empty package owner falls back", file: pub, edits: []payloadEdit{setField("package.owner", map[string]any{}), setField("repository.owner.login", "Other-Org")},
			want: withPath(ghcr("v1.2.3", "latest"), "other-org/hello-world")},
		{name: "owner from namespace first part", file: pub, edits: []payloadEdit{dropField("package.owner"), dropField("repository"), setField("package.namespace", "NameSpace-Org/hello-world")},
			want: withPath(ghcr("v1.2.3", "latest"), "namespace-org/hello-world")},
		{name: "owner and name lowercased", file: pub, edits: []payloadEdit{setField("package.owner.login", "OctoCAT"), setField("package.name", "Hello-World")},
			want: withPath(ghcr("v1.2.3", "latest"), "octocat/hello-world")},
		{name: "no owner anywhere", file: pub, edits: []payloadEdit{dropField("package.owner"), dropField("repository"), dropField("package.namespace")},
			ignored: "missing-name"},
		{name: "tag only in container_metadata", file: pub, edits: []payloadEdit{dropField("package.package_version.metadata")},
			want: ghcr("v1.2.3")},
		{name: "tags only in metadata.container.tags", file: pub, edits: []payloadEdit{dropField("package.package_version.container_metadata")},
			want: ghcr("v1.2.3", "latest")},
		{name: "untagged per-platform manifest", file: "package-published-untagged.json", ignored: "missing-tag"},
		{name: "only blank tags", file: pub, edits: []payloadEdit{setField("package.package_version.container_metadata.tag.name", " "),
			setField("package.package_version.metadata.container.tags", []any{"", " "})}, ignored: "missing-tag"},
		{name: "package_version null", file: pub, edits: []payloadEdit{setField("package.package_version", nil)}, ignored: "missing-tag"},
		{name: "neither package nor registry_package", raw: `{"action":"published","repository":{"owner":{"login":"o"}}}`, ignored: "not-a-package"},
		{name: "invalid JSON", raw: `{"action": "published", "package": {"name": "hello-world"`, wantErr: true},
		{name: "not JSON at all", raw: "payload=%7B%7D", wantErr: true},
		{name: "action deleted", file: pub, edits: []payloadEdit{setField("action", "deleted")}, ignored: "action-ignored"},
		{name: "action missing", file: pub, edits: []payloadEdit{dropField("action")}, ignored: "action-ignored"},
		{name: "action in capitals", file: pub, edits: []payloadEdit{setField("action", "Published")}, ignored: "action-ignored"},
		{name: "registry_package updated", file: "registry-package-published-container.json", edits: []payloadEdit{setField("action", "updated")},
			want: delivery{host: "ghcr.io", path: "octo-org/hello-world", tags: []string{"v1.2.3", "latest"}, digest: digestV1, action: "updated"}},
		{name: "name that reads as a flag", file: pub, edits: []payloadEdit{setField("package.name", "-q")}, wantErr: true},
		{name: "name with a space", file: pub, edits: []payloadEdit{setField("package.name", "a b")}, wantErr: true},
		{name: "name is dot-dot", file: pub, edits: []payloadEdit{setField("package.name", "..")}, wantErr: true},
		{name: "name with a transport", file: pub, edits: []payloadEdit{setField("package.name", "docker-archive:/tmp/x.tar")}, wantErr: true},
		{name: "tag that reads as a flag", file: pub, edits: []payloadEdit{setField("package.package_version.container_metadata.tag.name", "--authfile=x")}, wantErr: true},
		{name: "tag of 129 characters", file: pub, edits: []payloadEdit{setField("package.package_version.container_metadata.tag.name", strings.Repeat("t", 129))}, wantErr: true},
		{name: "registry host that is a transport", file: pub, edits: []payloadEdit{setField("package.registry.host", "docker-daemon:")}, wantErr: true},
		{name: "digest from package_version.version when the tag has none", file: pub,
			edits: []payloadEdit{setField("package.package_version.container_metadata.tag.digest", "")}, want: ghcr("v1.2.3", "latest")},
		{name: "invalid digests are dropped", file: pub, edits: []payloadEdit{
			setField("package.package_version.container_metadata.tag.digest", "sha256:6c62fb45fe66bfb1ea9a66abc38f6a0cc974292b"),
			setField("package.package_version.version", "1.2.3")}, want: withDigest(ghcr("v1.2.3", "latest"), "")},
		{name: "uppercase hex digest is not valid", file: pub, edits: []payloadEdit{
			setField("package.package_version.container_metadata.tag.digest", strings.ToUpper(digestV1)),
			setField("package.package_version.version", "")}, want: withDigest(ghcr("v1.2.3", "latest"), "")},
		// GitHub's example payloads carry a truncated 40-hex tag digest next to a valid version
		// digest; the valid one should still be recorded.
		{name: "invalid tag digest falls back to a valid version digest", file: pub, edits: []payloadEdit{
			setField("package.package_version.container_metadata.tag.digest", "sha256:6c62fb45fe66bfb1ea9a66abc38f6a0cc974292b")},
			want: ghcr("v1.2.3", "latest")},
		// GitHub's schema documents package_version.metadata as an array, and real container
		// deliveries carry "metadata": []; the tag is in container_metadata.
		{name: "metadata as GitHub documents it, an array", file: "package-published-metadata-array.json", want: ghcr("v1.2.3")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := []byte(tc.raw)
			if tc.raw == "" {
				body = loadPayload(t, tc.file, tc.edits...)
			}
			d, err := deliveryFromPayload(body)
			var ig *ignoredError
			switch {
			case tc.ignored != "":
				if !errors.As(err, &ig) || ig.reason != tc.ignored {
					t.Fatalf("deliveryFromPayload = %+v, %v; want ignored %q", d, err, tc.ignored)
				}
				return
			case tc.wantErr:
				if err == nil || errors.As(err, &ig) {
					t.Fatalf("deliveryFromPayload = %+v, %v; want a refusal that is not merely ignored", d, err)
				}
				return
			case err != nil:
				t.Fatalf("deliveryFromPayload: %v", err)
			}
			if d.host != tc.want.host || d.path != tc.want.path || !slices.Equal(d.tags, tc.want.tags) ||
				d.digest != tc.want.digest || d.action != tc.want.action {
				t.Errorf("deliveryFromPayload =\n  %+v\nwant\n  %+v", d, tc.want)
			}
			// Whatever is accepted must be a reference podman can be given safely.
			for _, tag := range d.tags {
				ref := d.ref(tag)
				if _, err := parseImageRef(ref.String()); err != nil {
					t.Errorf("accepted tag %q gives an invalid reference: %v", tag, err)
				}
			}
		})
	}
}

// reference validation

func TestParseImageRef(t *testing.T) {
	hex64 := strings.Repeat("0123456789abcdef", 4)
	for _, tc := range []struct {
		in   string
		want imageRef // zero: invalid
	}{
		{"ghcr.io/o/n:latest", imageRef{host: "ghcr.io", path: "o/n", tag: "latest"}},
		{"ghcr.io/octo-org/hello-world:v1.2.3", imageRef{host: "ghcr.io", path: "octo-org/hello-world", tag: "v1.2.3"}},
		{"127.0.0.1:5000/demo:v2", imageRef{host: "127.0.0.1:5000", path: "demo", tag: "v2"}},
		{"localhost/x:1", imageRef{host: "localhost", path: "x", tag: "1"}},
		{"localhost:5000/x:1", imageRef{host: "localhost:5000", path: "x", tag: "1"}},
		{"[::1]:5000/demo:v2", imageRef{host: "[::1]:5000", path: "demo", tag: "v2"}},
		{"host.example/a/b/c:tag@sha256:" + hex64, imageRef{host: "host.example", path: "a/b/c", tag: "tag", digest: "sha256:" + hex64}},
		{"ghcr.io/o/n@sha256:" + hex64, imageRef{host: "ghcr.io", path: "o/n", digest: "sha256:" + hex64}},
		{"ghcr.io/o/a_b.c__d--e:T_1.x-y", imageRef{host: "ghcr.io", path: "o/a_b.c__d--e", tag: "T_1.x-y"}},
		{"GHCR.IO/o/n:1", imageRef{host: "ghcr.io", path: "o/n", tag: "1"}},
		{"ghcr.io/o/n:" + strings.Repeat("t", 128), imageRef{host: "ghcr.io", path: "o/n", tag: strings.Repeat("t", 128)}},

		{"nginx:latest", imageRef{}},
		{"library/nginx:1", imageRef{}},
		{"nginx", imageRef{}},
		{"ghcr.io/Octo-Org/n:1", imageRef{}},
		{"--authfile=x", imageRef{}},
		{"-q", imageRef{}},
		{"-ghcr.io/o/n:1", imageRef{}},
		{"ghcr.io/-o/n:1", imageRef{}},
		{"docker-archive:/tmp/x.tar", imageRef{}},
		{"docker-archive:/tmp/x.tar:tag", imageRef{}},
		{"oci-archive:/tmp/x.tar", imageRef{}},
		{"dir:/tmp/x", imageRef{}},
		{"containers-storage:foo", imageRef{}},
		{"containers-storage:[overlay@/var/lib/containers]ghcr.io/o/n:1", imageRef{}},
		{"docker://ghcr.io/o/n:t", imageRef{}},
		{"docker-daemon:ghcr.io/o/n:t", imageRef{}},
		{"ghcr.io/o/n:t ", imageRef{}},
		{"ghcr.io/o/n :t", imageRef{}},
		{"ghcr.io/o/n:t\x00", imageRef{}},
		{"ghcr.io/o/n:t\n--tls-verify=false", imageRef{}},
		{"ghcr.io/o/n:t\r", imageRef{}},
		{"ghcr.io/../n:1", imageRef{}},
		{"ghcr.io/o/../n:1", imageRef{}},
		{"../ghcr.io/o/n:1", imageRef{}},
		{"ghcr.io//n:1", imageRef{}},
		{"ghcr.io/o/n/:1", imageRef{}},
		{"ghcr.io/o/n*:1", imageRef{}},
		{`ghcr.io/o\n:1`, imageRef{}},
		{"ghcr.io/o/n:" + strings.Repeat("t", 129), imageRef{}},
		{"ghcr.io/o/n:-t", imageRef{}},
		{"ghcr.io/o/n:.t", imageRef{}},
		{"ghcr.io/o/n:", imageRef{}},
		{"ghcr.io/o/n", imageRef{}},
		{"ghcr.io/o/n:a:b", imageRef{}},
		{"ghcr.io:/o/n:1", imageRef{}},
		{"ghcr.io/o/n@sha256:" + hex64[:40], imageRef{}},
		{"ghcr.io/o/n@sha256:" + strings.ToUpper(hex64), imageRef{}},
		{"ghcr.io/o/n@sha512:" + hex64 + hex64, imageRef{}},
		{"ghcr.io/o/n:1@", imageRef{}},
		{"user@ghcr.io/o/n:1", imageRef{}},
		{"ghcr.io/" + strings.Repeat("a", 250) + ":1", imageRef{}},
		{"", imageRef{}},
	} {
		t.Run(strconv.Quote(tc.in), func(t *testing.T) {
			got, err := parseImageRef(tc.in)
			if tc.want == (imageRef{}) {
				if err == nil {
					t.Fatalf("parseImageRef(%q) = %+v, want an error", tc.in, got)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseImageRef(%q): %v", tc.in, err)
			}
			if got != tc.want {
				t.Errorf("parseImageRef(%q) = %+v, want %+v", tc.in, got, tc.want)
			}
			checkRefInvariants(t, got)
		})
	}
}

// checkRefInvariants holds for every accepted reference: it round-trips through String, and
// what reaches argv can be neither a flag nor a transport.
func checkRefInvariants(t *testing.T, r imageRef) {
	t.Helper()
	s := r.String()
	again, err := parseImageRef(s)
	if err != nil || again != r {
		t.Errorf("round trip of %q: %+v, %v; want %+v", s, again, err, r)
	}
	if strings.HasPrefix(s, "-") || strings.Contains(s, "://") || strings.ContainsAny(s, " \t\r\n\x00") {
		t.Errorf("accepted reference %q could be read as a flag, a transport or two arguments", s)
	}
	if r.tag == "" && r.digest == "" {
		t.Errorf("accepted reference %q names neither a tag nor a digest", s)
	}
}

func FuzzParseImageRef(f *testing.F) {
	for _, s := range []string{"ghcr.io/o/n:latest", "127.0.0.1:5000/demo:v2", "localhost/x:1", "-q",
		"docker://ghcr.io/o/n:t", "dir:/tmp/x", "ghcr.io/o/n@sha256:" + strings.Repeat("a", 64), "[::1]:5/a:b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if r, err := parseImageRef(s); err == nil {
			checkRefInvariants(t, r)
		}
	})
}

// decisions

func TestDecideRestart(t *testing.T) {
	const old, fresh, other = "aaaa", "bbbb", "cccc"
	for _, tc := range []struct {
		name    string
		f       restartFacts
		restart bool
		reason  string
	}{
		{"new image pulled, container unknown", restartFacts{before: old, after: fresh, active: true}, true, "new image"},
		{"first pull, nothing before", restartFacts{before: "", after: fresh, active: true}, true, "new image"},
		{"same image, active", restartFacts{before: old, after: old, active: true}, false, "up to date"},
		{"same image, container runs it", restartFacts{before: old, after: old, running: old, active: true}, false, "up to date"},
		{"new image already running (a queued duplicate)", restartFacts{before: old, after: fresh, running: fresh, active: true}, false, "up to date"},
		{"same image but the container runs an older one", restartFacts{before: fresh, after: fresh, running: old, active: true}, true, "another image"},
		{"container runs a third image", restartFacts{before: old, after: fresh, running: other, active: true}, true, "another image"},
		{"same image, unit inactive", restartFacts{before: old, after: old, active: false}, true, "not active"},
		{"same image running, unit inactive", restartFacts{before: old, after: old, running: old, active: false}, true, "not active"},
		{"pulled ID unknown", restartFacts{before: old, after: "", active: true}, true, "unknown"},
		{"nothing known at all", restartFacts{active: true}, true, "unknown"},
		{"forced with the same image", restartFacts{before: old, after: old, running: old, active: true, force: true}, true, "forced"},
		{"forced and inactive", restartFacts{before: old, after: fresh, active: false, force: true}, true, "forced"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			restart, why := decideRestart(tc.f)
			if restart != tc.restart || !strings.Contains(why, tc.reason) {
				t.Errorf("decideRestart(%+v) = %v, %q; want %v, containing %q", tc.f, restart, why, tc.restart, tc.reason)
			}
		})
	}
}

// TestImageMismatch: a refusal names the check that failed — host, repository or tag — in that
// order, so a push to another registry is never reported as a tag mismatch.
func TestImageMismatch(t *testing.T) {
	want := imageRef{host: "ghcr.io", path: "me/app", tag: "v2"}
	for _, tc := range []struct {
		name, host, path string
		tags             []string
		reason, text     string
	}{
		{"match", "ghcr.io", "me/app", []string{"v1", "v2"}, "", ""},
		{"other host", "quay.io", "me/app", []string{"v2"}, "host-mismatch", "host mismatch: the unit runs ghcr.io/me/app:v2, from registry ghcr.io, not quay.io"},
		{"other host and repository", "quay.io", "you/other", []string{"v9"}, "host-mismatch", "registry ghcr.io, not quay.io"},
		{"other repository", "ghcr.io", "me/other", []string{"v2"}, "repository-mismatch", "repository mismatch: the unit runs ghcr.io/me/app:v2, not ghcr.io/me/other"},
		{"other tag", "ghcr.io", "me/app", []string{"v1", "latest"}, "tag-mismatch", "tag mismatch: the unit runs ghcr.io/me/app:v2, and ghcr.io/me/app was pushed as v1, latest"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reason, text := imageMismatch(want, tc.host, tc.path, tc.tags)
			if reason != tc.reason || !strings.Contains(text, tc.text) || (tc.text == "") != (text == "") {
				t.Errorf("imageMismatch = %q, %q; want %q, containing %q", reason, text, tc.reason, tc.text)
			}
		})
	}
}

// TestImageCheck: what a task may deploy to a unit, before it pulls anything.
func TestImageCheck(t *testing.T) {
	ref := imageRef{host: "ghcr.io", path: "me/app", tag: "latest"}
	for _, tc := range []struct {
		name, configured, running string
		allowAny                  bool
		step, why                 string
	}{
		{"Image= matches", "ghcr.io/me/app", "", false, "", ""},
		{"Image= wins over the container", "ghcr.io/me/app:latest", "ghcr.io/me/other:latest", false, "", ""},
		{"Image= differs", "ghcr.io/me/app:v2", "", false, "image-mismatch", "tag mismatch"},
		{"Image= differs, allowAny does not apply", "quay.io/me/app", "", true, "image-mismatch", "host mismatch"},
		{"Image= unreadable", "app", "", false, "image-unknown", "not a full image reference"},
		{"container runs it", "", "ghcr.io/me/app:latest", false, "", ""},
		{"container runs it, untagged name", "", "ghcr.io/me/app", false, "", ""},
		{"container runs another repository", "", "ghcr.io/me/plain:latest", false, "image-mismatch", "repository mismatch"},
		{"container started from an ID", "", strings.Repeat("f", 64), false, "image-unknown", "not a full image reference"},
		{"nothing known", "", "", false, "image-unknown", "WEBHOOK_ALLOW_ANY_IMAGE"},
		{"nothing known, allowAny", "", "", true, "", ""},
		{"container runs another image, allowAny", "", "ghcr.io/me/plain:latest", true, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			step, why := imageCheck(ref, tc.configured, tc.running, tc.allowAny)
			if step != tc.step || !strings.Contains(why, tc.why) || (tc.step == "") != (why == "") {
				t.Errorf("imageCheck(%q, %q, %v) = %q, %q; want %q, containing %q", tc.configured, tc.running, tc.allowAny, step, why, tc.step, tc.why)
			}
		})
	}
}

// TestRollbackTarget: the image the unit's container ran wins over the tag's previous image.
func TestRollbackTarget(t *testing.T) {
	if got, src := rollbackTarget("run", "tag"); got != "run" || src != "container" {
		t.Errorf("rollbackTarget(run, tag) = %q, %q; want the container's", got, src)
	}
	if got, src := rollbackTarget("", "tag"); got != "tag" || src != "local-tag" {
		t.Errorf("rollbackTarget(\"\", tag) = %q, %q; want the tag's", got, src)
	}
}

func TestRollbackPlan(t *testing.T) {
	for _, tc := range []struct {
		name          string
		before, after string
		exists        bool
		want          string // "" possible, else a substring of the reason
	}{
		{"previous image still there", "aaaa", "bbbb", true, ""},
		{"no previous image", "", "bbbb", false, "no previous image"},
		{"no previous image, exists ignored", "", "bbbb", true, "no previous image"},
		{"previous image is the failed one", "aaaa", "aaaa", true, "the one that failed"},
		{"previous image pruned", "aaaa", "bbbb", false, "no longer exists"},
		{"pulled ID unknown, previous there", "aaaa", "", true, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := rollbackPlan(tc.before, tc.after, tc.exists)
			if tc.want == "" && got != "" || tc.want != "" && !strings.Contains(got, tc.want) {
				t.Errorf("rollbackPlan(%q, %q, %v) = %q, want %q", tc.before, tc.after, tc.exists, got, tc.want)
			}
		})
	}
}

func TestGateVerdict(t *testing.T) {
	s := func(active, sub string, n int) unitSample {
		return unitSample{activeState: active, subState: sub, result: "success", nRestarts: n}
	}
	active, activating := s("active", "running", 0), s("activating", "start", 0)
	for _, tc := range []struct {
		name     string
		baseline unitSample
		samples  []unitSample
		want     string // "" healthy, else a substring of the verdict
	}{
		{"active throughout", active, []unitSample{active, active, active}, ""},
		{"activating then active", active, []unitSample{activating, active}, ""},
		{"NRestarts unchanged at a high baseline", s("active", "running", 5), []unitSample{s("active", "running", 5)}, ""},
		{"never observed", active, nil, "never observed"},
		{"failed at once", active, []unitSample{s("failed", "failed", 0)}, "became failed"},
		{"failed on the way, active at the end", active, []unitSample{active, s("failed", "failed", 0), active}, "became failed"},
		{"inactive", active, []unitSample{s("inactive", "dead", 0)}, "became inactive"},
		{"deactivating", active, []unitSample{active, s("deactivating", "stop-sigterm", 0)}, "became deactivating"},
		{"restarted by systemd", active, []unitSample{active, s("active", "running", 1)}, "restarted the unit on its own"},
		{"restarted while activating", s("active", "running", 2), []unitSample{s("activating", "auto-restart", 3)}, "on its own"},
		{"still activating at the end", active, []unitSample{activating, activating}, "not active"},
		{"still reloading at the end", active, []unitSample{s("reloading", "reload", 0)}, "not active"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := gateVerdict(tc.baseline, tc.samples)
			if tc.want == "" && got != "" || tc.want != "" && !strings.Contains(got, tc.want) {
				t.Errorf("gateVerdict = %q, want %q", got, tc.want)
			}
		})
	}
}

// commands

func TestRunCommand(t *testing.T) {
	longErr := strings.Repeat("x", 5000) + "\nTHE-END"
	for _, tc := range []struct {
		name    string
		files   map[string]string
		argv    []string
		timeout time.Duration
		stdout  string
		code    int
		errHas  []string // "" error: none expected
		check   func(t *testing.T, h *fakeHost, res cmdResult)
	}{
		{name: "success", files: map[string]string{"podman-version.stdout": "podman version 5.0.0\n"},
			argv: []string{"podman", "version"}, stdout: "podman version 5.0.0\n", code: 0},
		{name: "non-zero exit", argv: []string{"podman", "version", "--format", "json"},
			files: map[string]string{"podman-version.exit": "3", "podman-version.stderr": "warning: first\nError: cannot connect to podman\n"},
			code:  3, errHas: []string{"podman version --format json", "exit 3", "Error: cannot connect to podman"},
			check: func(t *testing.T, h *fakeHost, res cmdResult) {
				if !strings.Contains(res.stderr, "cannot connect") {
					t.Errorf("stderr = %q, want the command's stderr", res.stderr)
				}
			}},
		{name: "stderr is cut to its tail", argv: []string{"podman", "version"},
			files: map[string]string{"podman-version.exit": "1", "podman-version.stderr": longErr},
			code:  1, errHas: []string{"exit 1", "THE-END"},
			check: func(t *testing.T, h *fakeHost, res cmdResult) {
				if !strings.HasSuffix(res.stderr, "THE-END") || !strings.HasPrefix(res.stderr, "…") || len(res.stderr) > 2048+len("…") {
					t.Errorf("stderr tail has %d bytes, starts %q, ends %q", len(res.stderr), res.stderr[:min(8, len(res.stderr))], res.stderr[max(0, len(res.stderr)-8):])
				}
			}},
		{name: "missing program", argv: []string{"webhook-auto-update-no-such-program", "pull"},
			code: -1, errHas: []string{"webhook-auto-update-no-such-program is not installed or not on PATH"}},
		{name: "timeout kills the program", argv: []string{"podman", "version"}, timeout: 500 * time.Millisecond,
			files: map[string]string{"podman-version.sleep": "20s"},
			code:  -1, errHas: []string{"podman version", "timed out", "killed"},
			check: func(t *testing.T, h *fakeHost, res cmdResult) {
				if h.has("podman-version.woke") {
					t.Error("the fake finished its sleep: it was not killed at the timeout")
				}
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newFakeHost(t)
			for name, content := range tc.files {
				h.set(name, content)
			}
			timeout := tc.timeout
			if timeout == 0 {
				timeout = time.Minute
			}
			res := runCommand(context.Background(), timeout, tc.argv...)
			if !slices.Equal(res.argv, tc.argv) {
				t.Errorf("argv = %q, want %q", res.argv, tc.argv)
			}
			if res.exitCode != tc.code {
				t.Errorf("exit code = %d, want %d", res.exitCode, tc.code)
			}
			if tc.stdout != "" && res.stdout != tc.stdout {
				t.Errorf("stdout = %q, want %q", res.stdout, tc.stdout)
			}
			switch {
			case len(tc.errHas) == 0 && res.err != nil:
				t.Errorf("err = %v, want none", res.err)
			case len(tc.errHas) > 0 && res.err == nil:
				t.Errorf("err = nil, want one containing %q", tc.errHas)
			case res.err != nil:
				for _, s := range tc.errHas {
					if !strings.Contains(res.err.Error(), s) {
						t.Errorf("err = %q, want it to contain %q", res.err, s)
					}
				}
			}
			if tc.check != nil {
				tc.check(t, h, res)
			}
		})
	}
}

func TestPullImage(t *testing.T) {
	ref := imageRef{host: "ghcr.io", path: "octo-org/hello-world", tag: "v1.2.3"}
	wantArgv := []string{"podman", "pull", "--quiet", "--", "docker://ghcr.io/octo-org/hello-world:v1.2.3"}
	for _, tc := range []struct {
		name     string
		files    map[string]string
		attempts int
		timeout  time.Duration
		wantTry  int
		errHas   string // "": success expected
		check    func(t *testing.T, h *fakeHost, res cmdResult)
	}{
		{name: "first attempt succeeds", attempts: 3, wantTry: 1},
		{name: "fails twice then succeeds", files: map[string]string{"podman-pull.fails": "2"}, attempts: 3, wantTry: 3},
		{name: "fails for good", attempts: 3, wantTry: 3, errHas: "exit 125",
			files: map[string]string{"podman-pull.exit": "125", "podman-pull.stderr": "Error: initializing source docker://ghcr.io/octo-org/hello-world:v1.2.3: manifest unknown\n"},
			check: func(t *testing.T, h *fakeHost, res cmdResult) {
				if !strings.Contains(res.stderr, "manifest unknown") || res.exitCode != 125 {
					t.Errorf("last result: exit %d, stderr %q; want 125 and podman's message", res.exitCode, res.stderr)
				}
			}},
		{name: "one attempt configured", files: map[string]string{"podman-pull.fails": "5"}, attempts: 1, wantTry: 1, errHas: "exit 1"},
		{name: "a hanging pull is killed at the timeout", files: map[string]string{"podman-pull.sleep": "20s"},
			attempts: 2, timeout: 500 * time.Millisecond, wantTry: 2, errHas: "timed out",
			check: func(t *testing.T, h *fakeHost, res cmdResult) {
				if h.has("podman-pull.woke") {
					t.Error("a pull finished its sleep: it was not killed at cfg.pullTimeout")
				}
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newFakeHost(t)
			for name, content := range tc.files {
				h.set(name, content)
			}
			cfg := &config{pullAttempts: tc.attempts, pullRetryDelay: 10 * time.Millisecond, pullTimeout: tc.timeout, commandTimeout: time.Minute}
			if cfg.pullTimeout == 0 {
				cfg.pullTimeout = time.Minute
			}
			var logs bytes.Buffer
			res, tries := pullImage(context.Background(), cfg, newLogger(&logs), ref)
			if tries != tc.wantTry {
				t.Errorf("attempts = %d, want %d", tries, tc.wantTry)
			}
			if tc.errHas == "" && res.err != nil || tc.errHas != "" && (res.err == nil || !strings.Contains(res.err.Error(), tc.errHas)) {
				t.Errorf("err = %v, want %q", res.err, tc.errHas)
			}
			pulls := h.callsOf("podman-pull")
			if tc.timeout == 0 && len(pulls) != tc.wantTry {
				t.Errorf("%d pull calls, want %d:\n%s", len(pulls), tc.wantTry, fakeCallLines(pulls))
			}
			for _, c := range pulls {
				if !slices.Equal(c, wantArgv) {
					t.Errorf("pull argv = %q, want %q", c, wantArgv)
				}
			}
			if retries := strings.Count(logs.String(), "retrying"); retries != tc.wantTry-1 {
				t.Errorf("%d retry warnings, want %d:\n%s", retries, tc.wantTry-1, logs.String())
			}
			if tc.check != nil {
				tc.check(t, h, res)
			}
		})
	}
}

func TestPullImageStopsWhenCancelled(t *testing.T) {
	h := newFakeHost(t)
	h.set("podman-pull.fails", "5")
	cfg := &config{pullAttempts: 5, pullRetryDelay: time.Hour, pullTimeout: time.Minute}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	go func() {
		_, tries := pullImage(ctx, cfg, newLogger(&bytes.Buffer{}), imageRef{host: "ghcr.io", path: "o/n", tag: "1"})
		done <- tries
	}()
	// Wait for the first attempt to be logged, then stop the task as systemd would.
	for i := 0; len(h.callsOf("podman-pull")) == 0; i++ {
		if i > 3000 {
			t.Fatal("the first pull never ran")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	select {
	case tries := <-done:
		if tries != 1 {
			t.Errorf("attempts = %d, want 1: the retry delay must end with the context", tries)
		}
	case <-time.After(time.Minute):
		t.Fatal("pullImage kept waiting for the retry delay after its context ended")
	}
}

// the run-task flow

// githubTaskRow is one event_log row of action github-task.
type githubTaskRow struct {
	status     int
	method     string
	path       string
	durationMS int64
	meta       map[string]any
}

func (r githubTaskRow) step() string { s, _ := r.meta["step"].(string); return s }

// githubTaskRows reads the github-task rows of one delivery from the state directory's database.
func githubTaskRows(t *testing.T, stateDir, deliveryID string) []githubTaskRow {
	t.Helper()
	path := filepath.Join(stateDir, "data", "pod-upgrade-trigger.db")
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("event log: %v", err)
	}
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	rows, err := db.Query(`SELECT status, method, coalesce(path, ''), duration_ms, meta FROM event_log
		WHERE action = 'github-task' ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []githubTaskRow
	for rows.Next() {
		var r githubTaskRow
		var meta string
		if err := rows.Scan(&r.status, &r.method, &r.path, &r.durationMS, &meta); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal([]byte(meta), &r.meta); err != nil {
			t.Fatalf("meta %q: %v", meta, err)
		}
		if r.meta["delivery"] == deliveryID {
			out = append(out, r)
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func stepsOf(rows []githubTaskRow) []string {
	var out []string
	for _, r := range rows {
		out = append(out, r.step())
	}
	return out
}

// runTaskInProcess runs "webhook-auto-update run-task" through run with env as its environment.
func runTaskInProcess(t *testing.T, env map[string]string, args ...string) (code int, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	done := make(chan int, 1)
	go func() { done <- run(args, func(k string) string { return env[k] }, &out, &errb) }()
	select {
	case code = <-done:
	case <-time.After(2 * time.Minute):
		t.Fatalf("run-task did not return")
	}
	return code, errb.String()
}

const (
	flowImage = "ghcr.io/octo-org/hello-world:v1.2.3"
	flowUnit  = "hello-world.service"
	// anyImage lets a unit without Image= take any image (task.checkImage): the run-task tests
	// that are about something else (locks, limits, pull faults) set it rather than a Quadlet
	// file for each unit and tag they use.
	anyImage = "WEBHOOK_ALLOW_ANY_IMAGE"
)

// quadletHome returns a HOME whose ~/.config/containers/systemd/ holds a Quadlet file for unit
// with Image=image, as the task finds it.
func quadletHome(t *testing.T, unit, image string) string {
	t.Helper()
	home := t.TempDir()
	dir := filepath.Join(home, ".config", "containers", "systemd")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	body := "[Container]\nImage=" + image + "\n"
	if err := os.WriteFile(filepath.Join(dir, strings.TrimSuffix(unit, ".service")+".container"), []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return home
}

var (
	oldImageID   = strings.Repeat("a", 64)
	otherImageID = strings.Repeat("c", 64)
	newImageID   = strings.Repeat("b", 64)
)

func TestRunTaskFlow(t *testing.T) {
	// Each case is one run-task. files script the fakes: image.id is the local image before the
	// pull, image.next what the pull brings.
	newImage := map[string]string{"image.id": oldImageID, "image.next": newImageID}
	with := func(base map[string]string, kv ...string) map[string]string {
		m := map[string]string{}
		for k, v := range base {
			m[k] = v
		}
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	restartArgv := []string{"systemctl", "--user", "restart", "--", flowUnit}
	tagBack := []string{"podman", "tag", "--", oldImageID, flowImage}

	for _, tc := range []struct {
		name  string
		files map[string]string
		flags []string
		env   map[string]string
		unit  string // default flowUnit
		image string // default flowImage
		// The unit's Quadlet file names Image=quadlet (default flowImage), unless noQuadlet.
		quadlet   string
		noQuadlet bool
		steps     []string
		code      int
		check     func(t *testing.T, h *fakeHost, rows []githubTaskRow)
	}{
		{name: "new image, unit stays active", files: newImage,
			steps: []string{"started", "pulled", "restarted", "healthy", "completed"}, code: 0,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "systemctl-restart", restartArgv)
				if n := len(h.callsOf("podman-image-prune")); n != 1 {
					t.Errorf("%d prunes after a healthy redeploy, want 1", n)
				}
				if m := rows[1].meta; m["previous_image_id"] != oldImageID || m["image_id"] != newImageID {
					t.Errorf("pulled row: previous_image_id %v, image_id %v; want %s, %s", m["previous_image_id"], m["image_id"], oldImageID, newImageID)
				}
				if rows[len(rows)-1].meta["image_id"] != newImageID {
					t.Errorf("completed row image_id = %v, want %s", rows[len(rows)-1].meta["image_id"], newImageID)
				}
			}},
		{name: "same image, unit active: up to date", files: map[string]string{"image.id": oldImageID},
			steps: []string{"started", "pulled", "up-to-date"}, code: 0,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "systemctl-restart")
				wantCalls(t, h, "podman-image-prune")
			}},
		{name: "same image forced", files: map[string]string{"image.id": oldImageID}, flags: []string{"--force"},
			steps: []string{"started", "pulled", "restarted", "healthy", "completed"}, code: 0,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "systemctl-restart", restartArgv)
				if rows[0].meta["force"] != true || rows[3].meta["reason"] != "forced" {
					t.Errorf("force not recorded: started %v, healthy %v", rows[0].meta, rows[3].meta)
				}
			}},
		{name: "same image, unit inactive", files: map[string]string{"image.id": oldImageID, "unit.state": failedUnit,
			"restart.after.1": activeUnit},
			steps: []string{"started", "pulled", "restarted", "healthy", "completed"}, code: 0},
		{name: "new image fails the gate: rolled back", files: with(newImage, "restart.after.1", failedUnit, "restart.after.2", activeUnit),
			steps: []string{"started", "pulled", "restarted", "health-failed", "restarted", "rolled-back"}, code: 1,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "podman-tag", tagBack)
				wantCalls(t, h, "systemctl-restart", restartArgv, restartArgv)
				wantCalls(t, h, "podman-image-prune") // the failed image is kept for inspection
				if got := h.read("image.id"); got != oldImageID {
					t.Errorf("after the rollback the reference names %q, want the previous image %q", got, oldImageID)
				}
				last := rows[len(rows)-1].meta
				if last["image_id"] != oldImageID || last["failed_image_id"] != newImageID {
					t.Errorf("rolled-back row %v: want image_id %s, failed_image_id %s", last, oldImageID, newImageID)
				}
				if !strings.Contains(fmt.Sprint(rows[3].meta["error"]), "failed") {
					t.Errorf("health-failed row error = %v, want the unit's state", rows[3].meta["error"])
				}
			}},
		{name: "no previous image: rollback impossible", files: map[string]string{"image.next": newImageID, "restart.after.1": failedUnit},
			steps: []string{"started", "pulled", "restarted", "health-failed", "rollback-impossible"}, code: 1,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "podman-tag")
				wantCalls(t, h, "systemctl-restart", restartArgv)
				if e := fmt.Sprint(rows[len(rows)-1].meta["rollback_error"]); !strings.Contains(e, "no previous image") {
					t.Errorf("rollback_error = %q", e)
				}
			}},
		{name: "previous image pruned: rollback impossible", files: with(newImage, "restart.after.1", failedUnit, "podman-image-exists.exit", "1"),
			steps: []string{"started", "pulled", "restarted", "health-failed", "rollback-impossible"}, code: 1,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "podman-tag")
				wantCalls(t, h, "podman-image-exists", []string{"podman", "image", "exists", "--", oldImageID})
				if e := fmt.Sprint(rows[len(rows)-1].meta["rollback_error"]); !strings.Contains(e, "no longer exists") {
					t.Errorf("rollback_error = %q", e)
				}
			}},
		{name: "previous image fails too: rollback failed", files: with(newImage, "restart.after.1", failedUnit, "restart.after.2", failedUnit),
			steps: []string{"started", "pulled", "restarted", "health-failed", "restarted", "health-failed", "rollback-failed"}, code: 1,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "podman-tag", tagBack)
			}},
		{name: "podman healthcheck fails: rolled back", files: with(newImage,
			"podman-ps.stdout", "f00dcafe sha256:"+oldImageID+"\n", "podman-healthcheck.fails", "1"),
			steps: []string{"started", "pulled", "restarted", "health-failed", "restarted", "rolled-back"}, code: 1,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				if e := fmt.Sprint(rows[3].meta["error"]); !strings.Contains(e, "podman healthcheck") {
					t.Errorf("health-failed error = %q, want the healthcheck", e)
				}
				wantCalls(t, h, "podman-healthcheck", []string{"podman", "healthcheck", "run", "--", "f00dcafe"},
					[]string{"podman", "healthcheck", "run", "--", "f00dcafe"})
			}},
		{name: "restart fails", files: with(newImage, "systemctl-restart.exit", "1", "systemctl-restart.stderr", "Job for hello-world.service failed.\n"),
			steps: []string{"started", "pulled", "restart-failed", "restart-failed", "rollback-failed"}, code: 1,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				if e := fmt.Sprint(rows[2].meta["stderr"]); !strings.Contains(e, "Job for hello-world.service failed") {
					t.Errorf("restart-failed stderr = %q", e)
				}
			}},
		{name: "prune failure only warns", files: with(newImage, "podman-image-prune.exit", "125"),
			steps: []string{"started", "pulled", "restarted", "healthy", "prune-failed", "completed"}, code: 0},
		{name: "pull fails for good", env: map[string]string{"WEBHOOK_PULL_ATTEMPTS": "2"},
			files: with(newImage, "podman-pull.exit", "125", "podman-pull.stderr", "Error: reading manifest v1.2.3: manifest unknown\n"),
			steps: []string{"started", "pull-failed"}, code: 1,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				pull := []string{"podman", "pull", "--quiet", "--", "docker://" + flowImage}
				wantCalls(t, h, "podman-pull", pull, pull)
				wantCalls(t, h, "systemctl-restart")
				m := rows[1].meta
				if m["attempts"] != float64(2) || m["exit_code"] != float64(125) || !strings.Contains(fmt.Sprint(m["stderr"]), "manifest unknown") {
					t.Errorf("pull-failed meta = %v", m)
				}
			}},
		{name: "digest is recorded", files: newImage, flags: []string{"--digest", digestV1},
			steps: []string{"started", "pulled", "restarted", "healthy", "completed"}, code: 0,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				if rows[0].meta["digest"] != digestV1 || rows[3].meta["delivery_digest"] != digestV1 {
					t.Errorf("digest not recorded: started %v, healthy %v", rows[0].meta, rows[3].meta)
				}
			}},
		{name: "no Image=, no container: nothing pulled or restarted", noQuadlet: true, files: newImage,
			steps: []string{"started", "image-unknown"}, code: 0,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "podman-pull")
				wantCalls(t, h, "systemctl-restart")
				if r := fmt.Sprint(rows[1].meta["reason"]); !strings.Contains(r, "WEBHOOK_ALLOW_ANY_IMAGE") || rows[1].status != 409 {
					t.Errorf("image-unknown row: status %d, reason %q; want 409 and how to fix it", rows[1].status, r)
				}
			}},
		{name: "no Image=, the container runs another package: nothing pulled or restarted", noQuadlet: true,
			files: with(newImage, "podman-ps.stdout", "c0ffee sha256:"+oldImageID+" ghcr.io/octo-org/plain:latest\n"),
			steps: []string{"started", "image-mismatch"}, code: 0,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "podman-pull")
				wantCalls(t, h, "systemctl-restart")
				if r := fmt.Sprint(rows[1].meta["reason"]); !strings.Contains(r, "repository mismatch: the unit runs ghcr.io/octo-org/plain:latest") {
					t.Errorf("image-mismatch reason %q", r)
				}
				if n := len(h.callsOf("podman-pull")) + len(h.callsOf("podman-image-inspect")); n != 0 {
					t.Errorf("%d podman image calls before the refusal, want none", n)
				}
			}},
		{name: "no Image=, the container runs the pushed image: redeployed", noQuadlet: true,
			files: with(newImage, "podman-ps.stdout", "c0ffee sha256:"+oldImageID+" "+flowImage+"\n"),
			steps: []string{"started", "pulled", "restarted", "healthy", "completed"}, code: 0},
		{name: "no Image=, no container, WEBHOOK_ALLOW_ANY_IMAGE: redeployed as before", noQuadlet: true, files: newImage,
			env: map[string]string{anyImage: "true"}, steps: []string{"started", "pulled", "restarted", "healthy", "completed"}, code: 0},
		{name: "Image= names another tag (a manual redeploy): nothing pulled", quadlet: "ghcr.io/octo-org/hello-world:v9", files: newImage,
			steps: []string{"started", "image-mismatch"}, code: 0,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "podman-pull")
				if r := fmt.Sprint(rows[1].meta["reason"]); !strings.HasPrefix(r, "tag mismatch") || rows[1].meta["unit_image"] != "ghcr.io/octo-org/hello-world:v9" {
					t.Errorf("image-mismatch meta %v", rows[1].meta)
				}
			}},
		{name: "rollback to the image the container ran, though the tag had moved",
			// Another unit's redeploy moved the local tag to otherImageID; the container still ran
			// oldImageID, and that is what the unit must get back.
			files: map[string]string{"image.id": otherImageID, "image.next": newImageID,
				"podman-ps.stdout": "c0ffee sha256:" + oldImageID + " " + flowImage + "\n",
				"restart.after.1":  failedUnit, "restart.after.2": activeUnit},
			steps: []string{"started", "pulled", "restarted", "health-failed", "restarted", "rolled-back"}, code: 1,
			check: func(t *testing.T, h *fakeHost, rows []githubTaskRow) {
				wantCalls(t, h, "podman-tag", tagBack)
				last := rows[len(rows)-1].meta
				if last["image_id"] != oldImageID || last["rollback_source"] != "container" {
					t.Errorf("rolled-back row %v: want image_id %s (the container's), not the tag's previous %s", last, oldImageID, otherImageID)
				}
				if m := rows[1].meta; m["previous_image_id"] != otherImageID || m["running_image_id"] != oldImageID {
					t.Errorf("pulled row %v: want previous_image_id %s and running_image_id %s", m, otherImageID, oldImageID)
				}
			}},
		{name: "unit that reads as a flag", unit: "-x.service", files: newImage, steps: []string{"invalid"}, code: 2},
		{name: "unit with a glob", unit: "hello*.service", files: newImage, steps: []string{"invalid"}, code: 2},
		{name: "image with a transport", image: "docker://ghcr.io/octo-org/hello-world:v1.2.3", files: newImage, steps: []string{"invalid"}, code: 2},
		{name: "image that reads as a flag", image: "--authfile=/tmp/x", files: newImage, steps: []string{"invalid"}, code: 2},
		{name: "image without a registry", image: "nginx:latest", files: newImage, steps: []string{"invalid"}, code: 2},
		{name: "invalid digest", flags: []string{"--digest", "sha256:xyz"}, files: newImage, steps: []string{"invalid"}, code: 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newFakeHost(t)
			for name, content := range tc.files {
				h.set(name, content)
			}
			state := t.TempDir()
			unit, image := cmp.Or(tc.unit, flowUnit), cmp.Or(tc.image, flowImage)
			home := t.TempDir()
			if !tc.noQuadlet {
				home = quadletHome(t, unit, cmp.Or(tc.quadlet, flowImage))
			}
			env := map[string]string{"WEBHOOK_HEALTH_SETTLE_SECS": "1", "WEBHOOK_PULL_RETRY_SECS": "1", "WEBHOOK_COMMAND_TIMEOUT_SECS": "60", "HOME": home}
			for k, v := range tc.env {
				env[k] = v
			}
			args := append(append([]string{"run-task", "--state-dir", state}, tc.flags...),
				"--", unit, image, "package", "d-1", "/github-package-update/hello-world")
			code, stderr := runTaskInProcess(t, env, args...)
			rows := githubTaskRows(t, state, "d-1")
			if got := stepsOf(rows); !slices.Equal(got, tc.steps) || code != tc.code {
				t.Fatalf("run-task exit %d, steps %q; want exit %d, steps %q\nstderr:\n%s\nfake calls:\n%s",
					code, got, tc.code, tc.steps, stderr, fakeCallLines(h.calls()))
			}
			for _, r := range rows {
				if r.method != "TASK" || r.path != "/github-package-update/hello-world" || r.meta["unit"] != unit || r.meta["image"] != image {
					t.Errorf("row %s: method %q path %q unit %v image %v", r.step(), r.method, r.path, r.meta["unit"], r.meta["image"])
				}
			}
			if tc.code == 2 {
				if calls := h.calls(); len(calls) != 0 || rows[0].status != 400 {
					t.Errorf("invalid input: status %d, commands run:\n%s", rows[0].status, fakeCallLines(calls))
				}
			}
			if tc.check != nil {
				tc.check(t, h, rows)
			}
		})
	}
}

// wantCalls checks the exact argv of every call of one fake subcommand.
func wantCalls(t *testing.T, h *fakeHost, key string, want ...[]string) {
	t.Helper()
	got := h.callsOf(key)
	ok := len(got) == len(want)
	for i := 0; ok && i < len(got); i++ {
		ok = slices.Equal(got[i], want[i])
	}
	if !ok {
		t.Errorf("%s calls:\n%swant:\n%s", key, fakeCallLines(got), fakeCallLines(want))
	}
}

// TestRunTaskRowDurations checks duration_ms of task rows: the time since the task started, so
// never negative and, for these runs of a few seconds, far below an hour. The bound is a sanity
// check, not a measurement.
func TestRunTaskRowDurations(t *testing.T) {
	for _, tc := range []struct {
		name, unit, image string
		steps             []string
	}{
		{"redeploy", flowUnit, flowImage, []string{"started", "pulled", "up-to-date"}},
		{"invalid unit", "-x.service", flowImage, []string{"invalid"}},
		{"invalid image", flowUnit, "docker://" + flowImage, []string{"invalid"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newFakeHost(t)
			h.set("image.id", oldImageID)
			state := t.TempDir()
			code, stderr := runTaskInProcess(t, map[string]string{"WEBHOOK_HEALTH_SETTLE_SECS": "1", anyImage: "true"}, "run-task", "--state-dir", state, "--",
				tc.unit, tc.image, "package", "d-1", "/github-package-update/hello-world")
			rows := githubTaskRows(t, state, "d-1")
			if got := stepsOf(rows); !slices.Equal(got, tc.steps) {
				t.Fatalf("exit %d, steps %q, want %q\nstderr:\n%s", code, got, tc.steps, stderr)
			}
			for _, r := range rows {
				if r.durationMS < 0 || r.durationMS > int64(time.Hour/time.Millisecond) {
					t.Errorf("row %s: duration_ms = %d, not the time since the task started", r.step(), r.durationMS)
				}
			}
		})
	}
}

func TestRunTaskPerImageLimit(t *testing.T) {
	h := newFakeHost(t)
	h.set("image.id", oldImageID)
	state := t.TempDir()
	env := map[string]string{"WEBHOOK_IMAGE_LIMIT_COUNT": "1", "WEBHOOK_HEALTH_SETTLE_SECS": "1", anyImage: "true"}
	for i, want := range []struct {
		steps []string
		pulls int
	}{
		{[]string{"started", "pulled", "up-to-date"}, 1},
		{[]string{"started", "rate-limited"}, 1},
	} {
		delivery := fmt.Sprintf("d-%d", i+1)
		code, stderr := runTaskInProcess(t, env, "run-task", "--state-dir", state, "--",
			flowUnit, flowImage, "package", delivery, "/github-package-update/hello-world")
		rows := githubTaskRows(t, state, delivery)
		if got := stepsOf(rows); code != 0 || !slices.Equal(got, want.steps) {
			t.Fatalf("run %d: exit %d, steps %q; want exit 0, steps %q\nstderr:\n%s", i+1, code, got, want.steps, stderr)
		}
		if n := len(h.callsOf("podman-pull")); n != want.pulls {
			t.Errorf("run %d: %d pulls so far, want %d", i+1, n, want.pulls)
		}
		if i == 1 {
			if ra, _ := rows[1].meta["retry_after_secs"].(float64); ra <= 0 || rows[1].status != 429 {
				t.Errorf("rate-limited row: status %d, meta %v", rows[1].status, rows[1].meta)
			}
		}
	}
	if data, err := os.ReadFile(imageLimitPath(state, flowImage)); err != nil || len(bytes.Fields(data)) != 1 {
		t.Errorf("per-image log %s = %q, %v; want the one allowed redeploy", imageLimitPath(state, flowImage), data, err)
	}
}

// TestRunTaskLocks: a redeploy holds its image's lock and its unit's lock. While another
// process holds either, a task for that image (another unit) or that unit (another image) waits,
// then stops lock-failed having run nothing and charged no limit; a lock on another image and
// unit does not hold it up; once the lock is free the task goes through.
func TestRunTaskLocks(t *testing.T) {
	const otherImage, otherUnit = "ghcr.io/octo-org/hello-world:v2", "other.service"
	for _, c := range []struct {
		name        string
		held        string // the lock another process holds
		unit, image string // the task's
		blocked     bool
	}{
		{"image lock, another unit", imageLockPath("STATE", flowImage), otherUnit, flowImage, true},
		{"unit lock, another tag", unitLockPath("STATE", flowUnit), flowUnit, otherImage, true},
		{"another image and unit", imageLockPath("STATE", otherImage), flowUnit, flowImage, false},
		{"another unit's lock", unitLockPath("STATE", otherUnit), flowUnit, flowImage, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := newFakeHost(t)
			h.set("image.id", oldImageID)
			h.set("image.next", newImageID)
			state := t.TempDir()
			held, err := lockFile(context.Background(), strings.Replace(c.held, "STATE", state, 1), time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer held.Unlock()
			env := map[string]string{"WEBHOOK_TASK_LOCK_TIMEOUT_SECS": "1", "WEBHOOK_HEALTH_SETTLE_SECS": "1", anyImage: "true"}
			run := func(delivery string) (int, []string, string) {
				code, stderr := runTaskInProcess(t, env, "run-task", "--state-dir", state, "--",
					c.unit, c.image, "package", delivery, "/github-package-update/hello-world")
				return code, stepsOf(githubTaskRows(t, state, delivery)), stderr
			}
			done := []string{"started", "pulled", "restarted", "healthy", "completed"}
			code, steps, stderr := run("d-1")
			if !c.blocked {
				if code != 0 || !slices.Equal(steps, done) {
					t.Fatalf("exit %d, steps %q; want exit 0, %q\nstderr:\n%s", code, steps, done, stderr)
				}
				return
			}
			if code != 1 || !slices.Equal(steps, []string{"started", "lock-failed"}) {
				t.Fatalf("exit %d, steps %q; want exit 1, [started lock-failed]\nstderr:\n%s", code, steps, stderr)
			}
			if calls := h.calls(); len(calls) != 0 {
				t.Errorf("commands ran without the lock:\n%s", fakeCallLines(calls))
			}
			if _, err := os.Stat(imageLimitPath(state, c.image)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the per-image limit was charged without the lock: %v", err)
			}
			if !strings.Contains(stderr, filepath.Base(strings.Replace(c.held, "STATE", state, 1))) {
				t.Errorf("the log does not name the lock that was held:\n%s", stderr)
			}

			// Once the lock is free the task goes through.
			held.Unlock()
			if code, steps, stderr := run("d-2"); code != 0 || !slices.Equal(steps, done) {
				t.Errorf("after release: exit %d, steps %q\nstderr:\n%s", code, steps, stderr)
			}
		})
	}
}

// TestStateFileKeys: image keys keep the seed layout, and a key that would not fit in a file
// name (a valid reference may be 400 bytes, a unit name 255) ends in a hash instead, so that two
// such references still get two files and a lock can be taken on them.
func TestStateFileKeys(t *testing.T) {
	if got := imageLockPath("/s", flowImage); got != "/s/github-image-locks/ghcr.io_octo-org_hello-world_v1.2.3.lock" {
		t.Errorf("image lock path %s, want the seed layout", got)
	}
	if got := unitLockPath("/s", "web@1.service"); got != "/s/github-image-locks/unit@web@1.service.lock" {
		t.Errorf("unit lock path %s", got)
	}
	long := "ghcr.io/" + strings.Repeat("a", 200) + "/" + strings.Repeat("b", 40) + ":" + strings.Repeat("t", 128)
	if _, err := parseImageRef(long); err != nil {
		t.Fatalf("the long reference is not valid, so it tests nothing: %v", err)
	}
	longUnit := strings.Repeat("u", 247) + ".service"
	if _, err := resolveUnit(longUnit); err != nil {
		t.Fatalf("the long unit name is not valid, so it tests nothing: %v", err)
	}
	state := t.TempDir()
	paths := []string{imageLockPath(state, long), imageLockPath(state, long[:len(long)-1]+"u"),
		imageLimitPath(state, long), unitLockPath(state, longUnit), unitLockPath(state, "v"+longUnit[1:])}
	seen := map[string]bool{}
	for _, p := range paths {
		if n := len(filepath.Base(p)); n > 255 {
			t.Errorf("%s: file name of %d bytes", p, n)
		}
		if seen[p] {
			t.Errorf("two keys share %s", p)
		}
		seen[p] = true
	}
	for _, p := range []string{paths[0], paths[3]} {
		lk, err := lockFile(context.Background(), p, time.Second)
		if err != nil {
			t.Errorf("lock on a long key: %v", err)
			continue
		}
		lk.Unlock()
	}
}

// dispatch

func TestDispatchArgv(t *testing.T) {
	cfg := &config{stateDir: "/var/lib/webhook", dbPath: "/var/lib/webhook/data/pod-upgrade-trigger.db"}
	environ := []string{
		"WEBHOOK_STATE_DIR=/var/lib/webhook",
		"WEBHOOK_TOKEN=tok-s3cret",
		"WEBHOOK_MANUAL_TOKEN=manual-s3cret",
		"WEBHOOK_METRICS_TOKEN=metrics-s3cret",
		"GITHUB_WEBHOOK_SECRET=gh-s3cret",
		"WEBHOOK_REGISTRY_TOKEN_DISTRIBUTION=dist-s3cret",
		"WEBHOOK_REGISTRY_TOKEN_GITEA=gitea-s3cret",
		"WEBHOOK_HEALTH_SETTLE_SECS=20",
		"CONTAINERS_CONF=/etc/containers/x.conf",
		"PATH=/usr/local/bin:/usr/bin",
		"HOME=/root",
		"XDG_RUNTIME_DIR=/run/user/0",
		"NOTIFY_SOCKET=/run/systemd/notify",
		"LISTEN_FDS=1",
		"AWS_SECRET_ACCESS_KEY=aws-s3cret",
		"UNRELATED=1",
	}
	wantEnv := []string{"WEBHOOK_STATE_DIR", "WEBHOOK_HEALTH_SETTLE_SECS", "CONTAINERS_CONF", "PATH", "HOME", "XDG_RUNTIME_DIR"}
	const exe = "/usr/local/bin/webhook-auto-update"
	base := taskSpec{unit: flowUnit, image: flowImage, event: "package",
		delivery: "72d3162e-cc78-11e3-81ab-4c9367dc0958", path: "/github-package-update/hello-world"}
	for _, tc := range []struct {
		name     string
		edit     func(s *taskSpec)
		unitName string
		force    bool
		digest   bool
	}{
		{name: "plain", unitName: "webhook-task-72d3162e-cc78-11e3-81ab-4c9367dc0958"},
		{name: "forced", edit: func(s *taskSpec) { s.force = true }, force: true, unitName: "webhook-task-72d3162e-cc78-11e3-81ab-4c9367dc0958"},
		{name: "with digest", edit: func(s *taskSpec) { s.digest = digestV1 }, digest: true, unitName: "webhook-task-72d3162e-cc78-11e3-81ab-4c9367dc0958"},
		{name: "forced with digest", edit: func(s *taskSpec) { s.force, s.digest = true, digestV1 }, force: true, digest: true,
			unitName: "webhook-task-72d3162e-cc78-11e3-81ab-4c9367dc0958"},
		{name: "manual delivery id", edit: func(s *taskSpec) {
			s.delivery, s.event, s.path = "manual/ops 1", "manual", "/api/manual/services/hello-world"
		},
			unitName: "webhook-task-manual_ops_1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			spec := base
			if tc.edit != nil {
				tc.edit(&spec)
			}
			argv := dispatchArgv(exe, cfg, environ, spec)
			joined := strings.Join(argv, " ")
			if !slices.Equal(argv[:5], []string{"systemd-run", "--user", "--collect", "--quiet", "--unit=" + tc.unitName}) {
				t.Errorf("argv starts %q", argv[:min(5, len(argv))])
			}
			first, last := slices.Index(argv, "--"), lastIndex(argv, "--")
			if first < 0 || first == last {
				t.Fatalf("argv %q: want a -- before the program and another before the positional arguments", argv)
			}
			if !slices.Equal(argv[first+1:first+3], []string{exe, "run-task"}) {
				t.Errorf("after the first --: %q, want %s run-task", argv[first+1:first+3], exe)
			}
			if got, want := argv[last+1:], []string{spec.unit, spec.image, spec.event, spec.delivery, spec.path}; !slices.Equal(got, want) {
				t.Errorf("positional arguments %q, want %q", got, want)
			}
			var passed []string
			for i := 0; i < first; i++ {
				if argv[i] == "-E" {
					passed = append(passed, argv[i+1])
				}
			}
			slices.Sort(passed)
			want := slices.Clone(wantEnv)
			slices.Sort(want)
			if !slices.Equal(passed, want) {
				t.Errorf("-E passes %q, want %q", passed, want)
			}
			for _, a := range argv {
				if strings.Contains(a, "=") && !strings.HasPrefix(a, "--unit=") {
					t.Errorf("argv element %q carries a value: variables must be passed by name", a)
				}
			}
			for _, secret := range []string{"s3cret", "WEBHOOK_TOKEN", "WEBHOOK_MANUAL_TOKEN", "WEBHOOK_METRICS_TOKEN", "GITHUB_WEBHOOK_SECRET",
				"WEBHOOK_REGISTRY_TOKEN_DISTRIBUTION", "WEBHOOK_REGISTRY_TOKEN_GITEA", "NOTIFY_SOCKET", "LISTEN_FDS"} {
				if slices.Contains(argv, secret) || strings.Contains(joined, "s3cret") {
					t.Errorf("argv passes %s: %q", secret, argv)
				}
			}
			flags := argv[first+3 : last]
			wantFlags := []string{"--state-dir", cfg.stateDir, "--db", cfg.dbPath}
			if tc.force {
				wantFlags = append(wantFlags, "--force")
			}
			if tc.digest {
				wantFlags = append(wantFlags, "--digest", digestV1)
			}
			if !slices.Equal(flags, wantFlags) {
				t.Errorf("run-task flags %q, want %q", flags, wantFlags)
			}
		})
	}
}

func lastIndex(s []string, v string) int {
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == v {
			return i
		}
	}
	return -1
}

// TestDispatchedArgvRuns feeds what dispatchArgv builds back into run, so the server and
// run-task agree on the command line.
func TestDispatchedArgvRuns(t *testing.T) {
	h := newFakeHost(t)
	h.set("image.id", oldImageID)
	state := t.TempDir()
	cfg := &config{stateDir: state, dbPath: filepath.Join(state, "data", "pod-upgrade-trigger.db")}
	spec := taskSpec{unit: flowUnit, image: flowImage, event: "package", delivery: "d-dispatch",
		path: "/github-package-update/hello-world", force: true, digest: digestV1}
	argv := dispatchArgv("/usr/local/bin/webhook-auto-update", cfg, nil, spec)
	first := slices.Index(argv, "--")
	code, stderr := runTaskInProcess(t, map[string]string{"WEBHOOK_HEALTH_SETTLE_SECS": "1", anyImage: "true"}, argv[first+2:]...)
	rows := githubTaskRows(t, state, "d-dispatch")
	if got := stepsOf(rows); code != 0 || !slices.Equal(got, []string{"started", "pulled", "restarted", "healthy", "completed"}) {
		t.Fatalf("exit %d, steps %q\nstderr:\n%s", code, got, stderr)
	}
	if m := rows[0].meta; m["force"] != true || m["digest"] != digestV1 || m["event"] != "package" {
		t.Errorf("started row %v: the dispatched flags did not arrive", m)
	}
}

func TestTaskUnitName(t *testing.T) {
	long := strings.Repeat("0123456789", 10)
	for _, tc := range []struct{ delivery, want string }{
		{"d-1", "webhook-task-d-1"},
		{"72d3162e-cc78-11e3-81ab-4c9367dc0958", "webhook-task-72d3162e-cc78-11e3-81ab-4c9367dc0958"},
		{"Manual_ABC", "webhook-task-Manual_ABC"},
		{"a/b c", "webhook-task-a_b_c"},
		{"../../etc/passwd", "webhook-task-______etc_passwd"},
		{"x.service", "webhook-task-x_service"},
		{"a@b", "webhook-task-a_b"},
		{"*?[]", "webhook-task-____"},
		{"a\nb\x00c", "webhook-task-a_b_c"},
		{"é", "webhook-task-__"},
		{"--unit=evil", "webhook-task---unit_evil"},
		{long, "webhook-task-" + long[:64]},
		{"", "webhook-task-"},
	} {
		t.Run(strconv.Quote(tc.delivery), func(t *testing.T) {
			got := taskUnitName(tc.delivery)
			if got != tc.want {
				t.Errorf("taskUnitName(%q) = %q, want %q", tc.delivery, got, tc.want)
			}
			if err := validUnitName(got + ".service"); err != nil {
				t.Errorf("taskUnitName(%q) = %q is not a valid unit name: %v", tc.delivery, got, err)
			}
		})
	}
}

// Proof suites (issue 7): the fake systemd-run, a pull recorder for the one-redeploy-at-a-time
// check, payload fuzzing, and the pull faults of a whole run-task. The pull faults of pullImage
// alone (fails then succeeds, hangs and is killed, fails for good) are TestPullImage's cases, and
// "pull fails for good: no restart" is a TestRunTaskFlow case; the tests below add the same
// faults seen through a whole run-task.

const (
	// fakeSystemdRunDirEnv names the state directory of the fake systemd-run; newFakeHostWithRun
	// points it at the podman/systemctl one, so one argv.log lists every program run.
	fakeSystemdRunDirEnv = "FAKE_SYSTEMD_RUN_DIR"
	// fakePullIntervalsEnv names a file to which the fake podman appends "START END PID" (unix
	// nanoseconds) for every pull, so a test can check that pulls never overlapped.
	fakePullIntervalsEnv = "FAKE_PULL_INTERVALS"
	// keySystemdRun is the runFake key of systemd-run: its first argument is always --user.
	keySystemdRun = "systemd-run---user"
)

func init() {
	// systemd-run only records (and obeys systemd-run---user.{exit,fails,sleep,...}); a test that
	// wants the transient unit's work done runs the recorded command itself.
	chainFake("systemd-run", fakeSystemdRunDirEnv)
	prev := fakePrograms["podman"]
	fakePrograms["podman"] = func() int {
		path := os.Getenv(fakePullIntervalsEnv)
		if path == "" || len(os.Args) < 2 || os.Args[1] != "pull" {
			return prev()
		}
		start := time.Now().UnixNano()
		code := prev()
		if f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600); err == nil {
			fmt.Fprintf(f, "%d %d %d\n", start, time.Now().UnixNano(), os.Getpid())
			f.Close()
		}
		return code
	}
}

// newFakeHostWithRun is newFakeHost plus the fake systemd-run on PATH, recording into the same
// state directory. It returns the PATH that holds the three fakes.
func newFakeHostWithRun(t *testing.T) (*fakeHost, string) {
	t.Helper()
	h := newFakeHost(t)
	path := installFakes(t, "systemd-run") + string(os.PathListSeparator) + os.Getenv("PATH")
	t.Setenv("PATH", path)
	t.Setenv(fakeSystemdRunDirEnv, h.dir)
	return h, path
}

// pullInterval is one recorded pull.
type pullInterval struct{ start, end, pid int64 }

// readPullIntervals reads what the fake podman recorded, sorted by start.
func readPullIntervals(t *testing.T, path string) []pullInterval {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var out []pullInterval
	for _, line := range strings.Fields(strings.ReplaceAll(string(data), " ", ",")) {
		var p pullInterval
		if _, err := fmt.Sscanf(line, "%d,%d,%d", &p.start, &p.end, &p.pid); err != nil {
			t.Fatalf("pull interval %q: %v", line, err)
		}
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b pullInterval) int { return cmp.Compare(a.start, b.start) })
	return out
}

// overlapping returns the first pair of recorded pulls that overlapped, or nil.
func overlapping(ps []pullInterval) []pullInterval {
	for i := 1; i < len(ps); i++ {
		if ps[i].start < ps[i-1].end {
			return ps[i-1 : i+1]
		}
	}
	return nil
}

func TestOverlapping(t *testing.T) {
	if got := overlapping([]pullInterval{{1, 2, 1}, {2, 3, 2}, {5, 9, 3}}); got != nil {
		t.Errorf("back-to-back pulls reported as overlapping: %v", got)
	}
	if got := overlapping([]pullInterval{{1, 4, 1}, {3, 5, 2}}); len(got) != 2 {
		t.Errorf("overlapping pulls not reported: %v", got)
	}
}

// FuzzDeliveryFromPayload feeds raw payloads, seeded with testdata/payloads and its corpus under
// testdata/fuzz. Whatever is accepted must be a delivery whose every tag forms a reference
// parseImageRef accepts unchanged, that cannot start with "-".
func FuzzDeliveryFromPayload(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "payloads", "*.json"))
	for _, name := range files {
		data, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		checkDelivery(t, body)
	})
}

// FuzzPayloadFields builds GitHub-shaped payloads (githubPackagePayload) from fuzzed registry
// host, owner, name and tag, which reaches the reference checks far faster than mutating whole
// payloads; the invariants are FuzzDeliveryFromPayload's.
func FuzzPayloadFields(f *testing.F) {
	for _, s := range [][4]string{
		{"ghcr.io", "Octo-Org", "hello-world", "v1.2.3"},
		{"127.0.0.1:5000", "o", "n", "latest"},
		{"ghcr.io", "-q", "n", "1"},
		{"ghcr.io", "o", "--authfile=x", "1"},
		{"ghcr.io", "o", "n", "--tls-verify=false"},
		{"docker-archive:", "o", "n", "1"},
		{"dir:", "o", "/tmp/x", "1"},
		{"ghcr.io", "O", "N", "T"},
		{"ghcr.io", "o", "..", "1"},
		{"ghcr.io", "o", "%2e%2e", "1"},
		{"ghcr.io", "o", "n\x00", "1\n-q"},
		{"[::1]:5000", "o", "n", strings.Repeat("t", 128)},
	} {
		f.Add(s[0], s[1], s[2], s[3])
	}
	f.Fuzz(func(t *testing.T, host, owner, name, tag string) {
		checkDelivery(t, githubPackagePayload(host, owner, name, tag, ""))
	})
}

// checkDelivery runs deliveryFromPayload and checks the invariants of an accepted delivery.
func checkDelivery(t *testing.T, body []byte) {
	t.Helper()
	d, err := deliveryFromPayload(body)
	if err != nil {
		return
	}
	checkDeliveryInvariants(t, d)
}

// checkDeliveryInvariants checks an accepted delivery: tags, a lowercase host and repository,
// and references that parse back unchanged and cannot read as a flag.
func checkDeliveryInvariants(t *testing.T, d delivery) {
	t.Helper()
	if len(d.tags) == 0 {
		t.Fatalf("accepted a delivery without tags: %+v", d)
	}
	if !reDomain.MatchString(d.host) || d.host != strings.ToLower(d.host) || d.path != strings.ToLower(d.path) {
		t.Errorf("accepted host %q path %q: not a lowercase registry host and repository", d.host, d.path)
	}
	if d.digest != "" && !reDigest.MatchString(d.digest) {
		t.Errorf("accepted digest %q", d.digest)
	}
	seen := map[string]bool{}
	for _, tag := range d.tags {
		if seen[tag] {
			t.Errorf("tag %q listed twice in %q", tag, d.tags)
		}
		seen[tag] = true
		ref := d.ref(tag)
		got, err := parseImageRef(ref.String())
		if err != nil {
			t.Fatalf("accepted tag %q gives %q, which parseImageRef refuses: %v", tag, ref, err)
		}
		if got != ref {
			t.Errorf("reference %q parses back as %+v, not %+v", ref, got, ref)
		}
		if strings.HasPrefix(ref.String(), "-") {
			t.Errorf("accepted reference %q starts with -", ref)
		}
		checkRefInvariants(t, got)
	}
}

// TestRunTaskPullFaults runs whole redeploys through pull faults: a pull that fails twice and
// then succeeds goes on to restart the unit; a pull that hangs is killed at
// WEBHOOK_PULL_TIMEOUT_SECS on every attempt and nothing is restarted.
func TestRunTaskPullFaults(t *testing.T) {
	for _, tc := range []struct {
		name     string
		files    map[string]string
		env      map[string]string
		steps    []string
		code     int
		attempts float64
		restarts int
		errHas   string
	}{
		{name: "fails twice, then succeeds", files: map[string]string{"podman-pull.fails": "2"},
			steps: []string{"started", "pulled", "restarted", "healthy", "completed"}, attempts: 3, restarts: 1},
		{name: "hangs: killed at the timeout on each attempt, no restart", files: map[string]string{"podman-pull.sleep": "60s"},
			env:   map[string]string{"WEBHOOK_PULL_TIMEOUT_SECS": "1", "WEBHOOK_PULL_ATTEMPTS": "2"},
			steps: []string{"started", "pull-failed"}, code: 1, attempts: 2, restarts: 0, errHas: "timed out"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newFakeHost(t)
			h.set("image.id", oldImageID)
			h.set("image.next", newImageID)
			for k, v := range tc.files {
				h.set(k, v)
			}
			state := t.TempDir()
			env := map[string]string{"WEBHOOK_HEALTH_SETTLE_SECS": "1", "WEBHOOK_PULL_RETRY_SECS": "1", anyImage: "true"}
			for k, v := range tc.env {
				env[k] = v
			}
			code, stderr := runTaskInProcess(t, env, "run-task", "--state-dir", state, "--",
				flowUnit, flowImage, "package", "d-fault", "/github-package-update/hello-world")
			rows := githubTaskRows(t, state, "d-fault")
			if got := stepsOf(rows); code != tc.code || !slices.Equal(got, tc.steps) {
				t.Fatalf("exit %d, steps %q; want %d, %q\nstderr:\n%s\ncalls:\n%s", code, got, tc.code, tc.steps, stderr, fakeCallLines(h.calls()))
			}
			last := rows[1].meta
			if last["attempts"] != tc.attempts {
				t.Errorf("%s row: attempts %v, want %v", rows[1].step(), last["attempts"], tc.attempts)
			}
			if n := len(h.callsOf("podman-pull")); float64(n) != tc.attempts {
				t.Errorf("%d pulls ran, want %v", n, tc.attempts)
			}
			if n := len(h.callsOf("systemctl-restart")); n != tc.restarts {
				t.Errorf("%d restarts, want %d", n, tc.restarts)
			}
			if tc.errHas != "" && !strings.Contains(fmt.Sprint(last["error"]), tc.errHas) {
				t.Errorf("%s row error %v, want %q", rows[1].step(), last["error"], tc.errHas)
			}
			if h.has("podman-pull.woke") {
				t.Error("a hanging pull finished its sleep: it was not killed")
			}
		})
	}
}

// distEvent is one Distribution notification event, laid out as registry:2 sends it.
func distEvent(id, action, mediaType, repo, tag, host string) map[string]any {
	return map[string]any{"id": id, "timestamp": "2026-11-27T10:00:00Z", "action": action,
		"target": map[string]any{"mediaType": mediaType, "size": 528, "digest": digestV1, "length": 528, "repository": repo,
			"url": "http://" + host + "/v2/" + repo + "/manifests/" + digestV1, "tag": tag},
		"request": map[string]any{"id": "r1", "addr": "127.0.0.1:40000", "host": host, "method": "PUT", "useragent": "containers/5.23"},
		"actor":   map[string]any{}, "source": map[string]any{"addr": "box:5000", "instanceID": "i1"}}
}

// noRequestHost drops request.host from a Distribution event.
func noRequestHost(e map[string]any) map[string]any {
	delete(e["request"].(map[string]any), "host")
	return e
}

// distEnvelope is a Distribution notification envelope of events.
func distEnvelope(events ...map[string]any) []byte {
	b, _ := json.Marshal(map[string]any{"events": events})
	return b
}

const manifestV2 = "application/vnd.docker.distribution.manifest.v2+json"

// TestRegistryPushes reads each source's documented sample payload, and variants of it, with
// the source's parser: what is a tagged push becomes deliveries (image and id), what is fine
// but not one is ignored with a reason, and an invalid reference refuses the whole payload.
func TestRegistryPushes(t *testing.T) {
	type want struct{ host, path, tag, digest, id string }
	gitea := http.Header{"X-Gitea-Event": {"package"}, "X-Gitea-Delivery": {"6b1e1a6c-3ef4-4c2e-9c41-0f8e2c3d4a5b"}}
	forgejo := http.Header{"X-Forgejo-Event": {"package"}, "X-Forgejo-Delivery": {"0c6b7c55-1f0e-4f2a-8a3b-5d9e8f7a6b5c"}}
	const harborDigest = "sha256:8a9e9863dbb6e10edb5adfe917c00da84e1700fa76e7ed02476aa6e6fb8ee0d8"
	harborID := hashID("harbor", "hub.harbor.com", "test-webhook/debian", "latest", harborDigest, "1586922308")
	hubID := hashID("hub", "svendowideit/testhook", "latest", "1417566161")
	push := func(tag string) map[string]any {
		return distEvent("e-"+tag, "push", manifestV2, "e2e/app", tag, "127.0.0.1:5000")
	}
	for _, tc := range []struct {
		name, source string
		file         string
		edits        []payloadEdit
		raw          []byte // instead of file
		header       http.Header
		want         []want
		ignored      string
		wantErr      bool
	}{
		// Distribution: the documented sample holds a pull, a blob push and a manifest push.
		{name: "distribution sample", source: "distribution", file: "distribution-push.json",
			want: []want{{"registrycluster.local", "library/test", "latest", "sha256:fea8895f450959fa676bcc1df0611ea93823a735a01205fd8622846041d0c7cf", "dist-asdf-asdf-asdf-asdf-0"}}},
		{name: "distribution OCI manifest", source: "distribution", raw: distEnvelope(distEvent("x1", "push", "application/vnd.oci.image.manifest.v1+json", "e2e/app", "v2", "127.0.0.1:5000")),
			want: []want{{"127.0.0.1:5000", "e2e/app", "v2", digestV1, "dist-x1"}}},
		{name: "distribution OCI index", source: "distribution", raw: distEnvelope(distEvent("x2", "push", "application/vnd.oci.image.index.v1+json", "e2e/app", "v2", "127.0.0.1:5000")),
			want: []want{{"127.0.0.1:5000", "e2e/app", "v2", digestV1, "dist-x2"}}},
		{name: "distribution two tags in one envelope", source: "distribution", raw: distEnvelope(push("v1"), push("latest")),
			want: []want{{"127.0.0.1:5000", "e2e/app", "v1", digestV1, "dist-e-v1"}, {"127.0.0.1:5000", "e2e/app", "latest", digestV1, "dist-e-latest"}}},
		{name: "distribution host from target.url when request.host is empty", source: "distribution",
			raw:  distEnvelope(noRequestHost(distEvent("x3", "push", manifestV2, "e2e/app", "v1", "Reg.Example:5000"))),
			want: []want{{"reg.example:5000", "e2e/app", "v1", digestV1, "dist-x3"}}},
		{name: "distribution with no host at all", source: "distribution",
			raw: distEnvelope(noRequestHost(distEvent("x4", "push", manifestV2, "e2e/app", "v1", ""))), wantErr: true},
		{name: "distribution id that is not a delivery id is hashed", source: "distribution",
			raw:  distEnvelope(distEvent("../../x y", "push", manifestV2, "e2e/app", "v1", "127.0.0.1:5000")),
			want: []want{{"127.0.0.1:5000", "e2e/app", "v1", digestV1, hashID("dist", "../../x y")}}},
		{name: "distribution blob push only", source: "distribution", raw: distEnvelope(distEvent("b", "push", "application/octet-stream", "e2e/app", "", "h:5000")), ignored: "not-a-manifest"},
		{name: "distribution layer push", source: "distribution", raw: distEnvelope(distEvent("b", "push", "application/vnd.oci.image.layer.v1.tar+gzip", "e2e/app", "", "h:5000")), ignored: "not-a-manifest"},
		{name: "distribution pull", source: "distribution", raw: distEnvelope(distEvent("p", "pull", manifestV2, "e2e/app", "v1", "h:5000")), ignored: "not-a-push"},
		{name: "distribution delete", source: "distribution", raw: distEnvelope(distEvent("d", "delete", manifestV2, "e2e/app", "v1", "h:5000")), ignored: "not-a-push"},
		{name: "distribution untagged manifest", source: "distribution", raw: distEnvelope(distEvent("u", "push", manifestV2, "e2e/app", "", "h:5000")), ignored: "missing-tag"},
		{name: "distribution empty envelope", source: "distribution", raw: []byte(`{"events":[]}`), ignored: "no-events"},
		{name: "distribution not JSON", source: "distribution", raw: []byte(`events=1`), ignored: "invalid-json"},
		{name: "distribution repository that reads as a flag", source: "distribution", raw: distEnvelope(distEvent("f", "push", manifestV2, "-q", "v1", "h:5000")), wantErr: true},
		{name: "distribution tag that reads as a flag", source: "distribution", raw: distEnvelope(distEvent("f", "push", manifestV2, "e2e/app", "--authfile=x", "h:5000")), wantErr: true},
		{name: "distribution host that is a transport", source: "distribution", raw: distEnvelope(distEvent("f", "push", manifestV2, "e2e/app", "v1", "docker-archive:")), wantErr: true},
		{name: "distribution one bad event refuses the envelope", source: "distribution", raw: distEnvelope(push("v1"), distEvent("f", "push", manifestV2, "e2e/../x", "v1", "h:5000")), wantErr: true},

		// Harbor, default payload format.
		{name: "harbor sample", source: "harbor", file: "harbor-push-artifact.json", want: []want{{"hub.harbor.com", "test-webhook/debian", "latest", harborDigest, harborID}}},
		{name: "harbor pull", source: "harbor", file: "harbor-pull-artifact.json", ignored: "not-a-push"},
		{name: "harbor scan event", source: "harbor", file: "harbor-push-artifact.json", edits: []payloadEdit{setField("type", "SCANNING_COMPLETED")}, ignored: "not-a-push"},
		{name: "harbor CloudEvents format", source: "harbor", raw: []byte(`{"specversion":"1.0","type":"harbor.artifact.pushed","data":{}}`), ignored: "not-a-push"},
		{name: "harbor untagged artifact", source: "harbor", file: "harbor-push-artifact.json",
			raw:     []byte(`{"type":"PUSH_ARTIFACT","occur_at":1,"event_data":{"resources":[{"digest":"` + harborDigest + `","tag":"` + harborDigest + `","resource_url":"h.io/p/a@` + harborDigest + `"}],"repository":{"repo_full_name":"p/a"}}}`),
			ignored: "missing-tag"},
		{name: "harbor resource_url with a scheme", source: "harbor",
			raw:  []byte(`{"type":"PUSH_ARTIFACT","occur_at":7,"event_data":{"resources":[{"tag":"v1","resource_url":"https://H.io:8443/p/a:v1"}],"repository":{"repo_full_name":"p/a"}}}`),
			want: []want{{"h.io:8443", "p/a", "v1", "", hashID("harbor", "h.io:8443", "p/a", "v1", "", "7")}}},
		{name: "harbor repository that reads as a flag", source: "harbor", file: "harbor-push-artifact.json",
			edits: []payloadEdit{setField("event_data.repository.repo_full_name", "-q")}, wantErr: true},

		// Gitea and Forgejo.
		{name: "gitea sample", source: "gitea", file: "gitea-package-created.json", header: gitea,
			want: []want{{"gitea.example.com", "octo/web", "v1.4.0", "", "gitea-6b1e1a6c-3ef4-4c2e-9c41-0f8e2c3d4a5b"}}},
		{name: "forgejo headers", source: "gitea", file: "gitea-package-created.json", header: forgejo,
			want: []want{{"gitea.example.com", "octo/web", "v1.4.0", "", "gitea-0c6b7c55-1f0e-4f2a-8a3b-5d9e8f7a6b5c"}}},
		{name: "gitea without a delivery header", source: "gitea", file: "gitea-package-created.json", header: http.Header{"X-Gitea-Event": {"package"}},
			want: []want{{"gitea.example.com", "octo/web", "v1.4.0", "", hashID("gitea", "gitea.example.com", "octo/web", "v1.4.0", "2024-05-06T10:11:12Z")}}},
		{name: "gitea push event", source: "gitea", file: "gitea-package-created.json", header: http.Header{"X-Gitea-Event": {"push"}}, ignored: "not-a-package"},
		{name: "gitea no event header", source: "gitea", file: "gitea-package-created.json", ignored: "not-a-package"},
		{name: "gitea package deleted", source: "gitea", file: "gitea-package-created.json", header: gitea, edits: []payloadEdit{setField("action", "deleted")}, ignored: "not-created"},
		{name: "gitea npm package", source: "gitea", file: "gitea-package-created.json", header: gitea, edits: []payloadEdit{setField("package.type", "npm")}, ignored: "not-container"},
		{name: "gitea untagged manifest", source: "gitea", file: "gitea-package-created.json", header: gitea, edits: []payloadEdit{setField("package.version", digestV1)}, ignored: "missing-tag"},
		{name: "gitea no owner", source: "gitea", file: "gitea-package-created.json", header: gitea, edits: []payloadEdit{dropField("package.owner")}, ignored: "missing-name"},
		{name: "gitea version that reads as a flag", source: "gitea", file: "gitea-package-created.json", header: gitea, edits: []payloadEdit{setField("package.version", "-q")}, wantErr: true},
		{name: "gitea html_url missing", source: "gitea", file: "gitea-package-created.json", header: gitea, edits: []payloadEdit{dropField("package.html_url")}, wantErr: true},

		// Docker Hub.
		{name: "dockerhub sample", source: "dockerhub", file: "dockerhub-push.json", want: []want{{"docker.io", "svendowideit/testhook", "latest", "", hubID}}},
		{name: "dockerhub official image", source: "dockerhub", file: "dockerhub-push.json", edits: []payloadEdit{setField("repository.repo_name", "nginx")},
			want: []want{{"docker.io", "library/nginx", "latest", "", hashID("hub", "library/nginx", "latest", "1417566161")}}},
		{name: "dockerhub no tag", source: "dockerhub", file: "dockerhub-push.json", edits: []payloadEdit{setField("push_data.tag", "")}, ignored: "missing-tag"},
		{name: "dockerhub no push_data", source: "dockerhub", file: "dockerhub-push.json", edits: []payloadEdit{dropField("push_data")}, ignored: "not-a-push"},
		{name: "dockerhub tag that reads as a flag", source: "dockerhub", file: "dockerhub-push.json", edits: []payloadEdit{setField("push_data.tag", "--authfile=x")}, wantErr: true},

		// Quay.
		{name: "quay sample", source: "quay", file: "quay-push.json", want: []want{{"quay.io", "mynamespace/repository", "latest", "", ""}}},
		{name: "quay legacy updated_tags object", source: "quay", file: "quay-push-legacy.json", want: []want{{"quay.io", "devtable/ubuntu", "latest", "", ""}}},
		{name: "quay build queued", source: "quay", file: "quay-build-queued.json", ignored: "not-a-push"},
		{name: "quay updated_tags of the wrong type", source: "quay", file: "quay-push.json", edits: []payloadEdit{setField("updated_tags", 7)}, ignored: "invalid-json"},
		{name: "quay self-hosted with a port", source: "quay", file: "quay-push.json", edits: []payloadEdit{setField("docker_url", "Quay.Example.com:8443/ns/app")},
			want: []want{{"quay.example.com:8443", "ns/app", "latest", "", ""}}},
		{name: "quay tag that reads as a flag", source: "quay", file: "quay-push.json", edits: []payloadEdit{setField("updated_tags", []any{"latest", "-q"})}, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := tc.raw
			if body == nil {
				body = loadPayload(t, tc.file, tc.edits...)
			}
			ds, err := registrySources[tc.source].parse(body, tc.header)
			var ig *ignoredError
			switch {
			case tc.ignored != "":
				if !errors.As(err, &ig) || ig.reason != tc.ignored {
					t.Fatalf("%s parser = %+v, %v; want ignored %q", tc.source, ds, err, tc.ignored)
				}
				return
			case tc.wantErr:
				if err == nil || errors.As(err, &ig) {
					t.Fatalf("%s parser = %+v, %v; want a refusal that is not merely ignored", tc.source, ds, err)
				}
				return
			case err != nil:
				t.Fatalf("%s parser: %v", tc.source, err)
			}
			var got []want
			for _, d := range ds {
				checkDeliveryInvariants(t, d)
				for _, tag := range d.tags {
					got = append(got, want{d.host, d.path, tag, d.digest, d.id})
				}
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("%s parser =\n  %+v\nwant\n  %+v", tc.source, got, tc.want)
			}
		})
	}
}

// TestPushIDs: a derived id is stable for the same push and differs for another push of the
// same tag, and every id is a delivery id whose task unit name is unchanged.
func TestPushIDs(t *testing.T) {
	body := loadPayload(t, "harbor-push-artifact.json")
	later := loadPayload(t, "harbor-push-artifact.json", setField("occur_at", 1586922999))
	a, _ := harborPushes(body, nil)
	b, _ := harborPushes(body, nil)
	c, _ := harborPushes(later, nil)
	if a[0].id != b[0].id {
		t.Errorf("the same event gave ids %s and %s: a retry would not be a duplicate", a[0].id, b[0].id)
	}
	if a[0].id == c[0].id {
		t.Errorf("two pushes of one tag share id %s: the second would be taken for a duplicate", a[0].id)
	}
	for _, id := range []string{a[0].id, pushID("dist", strings.Repeat("x", 70)), pushID("dist", ""), pushID("gitea", "a/b"), hashID("hub", "a")} {
		if !reDeliveryID.MatchString(id) || taskUnitName(id) != "webhook-task-"+id {
			t.Errorf("id %q is not a delivery id kept as it is in its task unit's name", id)
		}
	}
}

// checkRegistryPushes is checkDelivery for the registry parsers: whatever one accepts is a set of
// deliveries with valid, claimable ids.
func checkRegistryPushes(t *testing.T, source string, body []byte, h http.Header) {
	t.Helper()
	ds, err := registrySources[source].parse(body, h)
	if err != nil {
		return
	}
	if len(ds) == 0 {
		t.Fatalf("%s: accepted a payload with no push", source)
	}
	for _, d := range ds {
		checkDeliveryInvariants(t, d)
		if !reDeliveryID.MatchString(d.id) && !(source == "quay" && d.id == "") {
			t.Errorf("%s: accepted delivery id %q", source, d.id)
		}
	}
}

// registryFuzzSeeds adds the documented samples of a source (testdata/payloads/<prefix>*.json).
func registryFuzzSeeds(f *testing.F, prefix string, add func([]byte)) {
	files, _ := filepath.Glob(filepath.Join("testdata", "payloads", prefix+"*.json"))
	if len(files) == 0 {
		f.Fatalf("no testdata/payloads/%s*.json samples", prefix)
	}
	for _, name := range files {
		data, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		add(data)
	}
}

// FuzzDistributionPushes, FuzzHarborPushes, FuzzGiteaPushes, FuzzDockerHubPushes and
// FuzzQuayPushes feed raw bodies to each registry parser, seeded with its documented samples and
// the corpus under testdata/fuzz; the invariants are checkRegistryPushes'.
func FuzzDistributionPushes(f *testing.F) {
	registryFuzzSeeds(f, "distribution", func(b []byte) { f.Add(b) })
	f.Fuzz(func(t *testing.T, body []byte) { checkRegistryPushes(t, "distribution", body, nil) })
}

func FuzzHarborPushes(f *testing.F) {
	registryFuzzSeeds(f, "harbor", func(b []byte) { f.Add(b) })
	f.Fuzz(func(t *testing.T, body []byte) { checkRegistryPushes(t, "harbor", body, nil) })
}

func FuzzGiteaPushes(f *testing.F) {
	registryFuzzSeeds(f, "gitea", func(b []byte) { f.Add(b, "package", "6b1e1a6c-3ef4-4c2e-9c41-0f8e2c3d4a5b") })
	f.Fuzz(func(t *testing.T, body []byte, event, delivery string) {
		checkRegistryPushes(t, "gitea", body, http.Header{"X-Gitea-Event": {event}, "X-Gitea-Delivery": {delivery}})
	})
}

func FuzzDockerHubPushes(f *testing.F) {
	registryFuzzSeeds(f, "dockerhub", func(b []byte) { f.Add(b) })
	f.Fuzz(func(t *testing.T, body []byte) { checkRegistryPushes(t, "dockerhub", body, nil) })
}

func FuzzQuayPushes(f *testing.F) {
	registryFuzzSeeds(f, "quay", func(b []byte) { f.Add(b) })
	f.Fuzz(func(t *testing.T, body []byte) { checkRegistryPushes(t, "quay", body, nil) })
}
