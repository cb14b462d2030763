// webhook_adversarial_test.go tests webhook.go against hostile and broken clients: adversarial
// GitHub and registry requests written as raw exchanges (bad signatures, bad bodies, unset
// secrets), slow clients and slowloris against the built binary, and event-log faults (a locked
// or unwritable database) under deliveries. advServer, its helpers and rawExchange, which the
// other webhook tests use too, live here.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Adversarial requests against the running server.

const (
	advSecret      = "adv webhook secret"
	advToken       = "adv-TOKEN-5f1e2d3c"
	advManualToken = "adv-MANUAL-9a8b7c6d"
	advWrongToken  = "adv-WRONG-0c0c0c0c"
	advMaxBody     = 64 << 10
	sigRight       = "<sign>" // advCase.sig: the right signature of the case's body
	advUnitPath    = "/github-package-update/web"
)

// rawExchange writes one request by hand, so target and headers reach the server exactly as
// written; the body goes with a Content-Length or, when chunked, as chunks without one. The body
// is written while the answer is read, so a server that answers early (413) cannot deadlock it.
func rawExchange(addr, method, target string, header [][2]string, body []byte, chunked bool) (*http.Response, string, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(hangGuard))
	var head strings.Builder
	fmt.Fprintf(&head, "%s %s HTTP/1.1\r\nHost: test\r\nConnection: close\r\n", method, target)
	for _, h := range header {
		fmt.Fprintf(&head, "%s: %s\r\n", h[0], h[1])
	}
	switch {
	case chunked:
		head.WriteString("Transfer-Encoding: chunked\r\n")
	case body != nil:
		fmt.Fprintf(&head, "Content-Length: %d\r\n", len(body))
	}
	head.WriteString("\r\n")
	go func() {
		w := bufio.NewWriter(c)
		w.WriteString(head.String())
		if !chunked {
			w.Write(body)
		} else {
			for i := 0; i < len(body); i += 4096 {
				chunk := body[i:min(i+4096, len(body))]
				fmt.Fprintf(w, "%x\r\n%s\r\n", len(chunk), chunk)
			}
			w.WriteString("0\r\n\r\n")
		}
		w.Flush() // an error means the server answered and closed early
	}()
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: method})
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp, string(b), err
}

// advCase is one adversarial request and what must come of it.
type advCase struct {
	name     string
	method   string // default POST
	target   string // default advUnitPath
	event    string // X-GitHub-Event on GitHub routes: default "package", "-" none
	delivery string // X-GitHub-Delivery on GitHub routes: default a fresh id
	sig      string // X-Hub-Signature-256 on GitHub routes: sigRight, a literal value, or "" none
	header   [][2]string
	body     []byte
	chunked  bool

	status   int
	text     string   // part of the answer
	action   string   // the row's action
	reason   string   // the row's meta reason (or error code, on the manual API)
	calls    []string // programs run, as runFake keys, in order
	readOnly bool     // instead of calls: only commands that read (a dry run's plan) may run
	argvHas  string   // part of the last systemd-run command line
}

// readOnlyCommands are the runFake keys of commands that change nothing.
var readOnlyCommands = map[string]bool{"podman-image-inspect": true, "podman-image-exists": true, "podman-ps": true, "systemctl-show": true}

// advServer is the server under attack with recording fakes for everything it may run.
type advServer struct {
	*testServer
	h *fakeHost
}

func newAdvServer(t *testing.T, env map[string]string) *advServer {
	t.Helper()
	h, _ := newFakeHostWithRun(t)
	full := map[string]string{
		"GITHUB_WEBHOOK_SECRET":  advSecret,
		"WEBHOOK_TOKEN":          advToken,
		"WEBHOOK_MANUAL_TOKEN":   advManualToken,
		"GITHUB_ALLOWED_EVENTS":  "package,registry_package,ping",
		"WEBHOOK_MAX_BODY_BYTES": strconv.Itoa(advMaxBody),
	}
	for k, v := range env {
		full[k] = v
	}
	ts := newTestServer(t, full, nil)
	// No Quadlet file of the operator's may steer the match, and every lookup is counted.
	ts.srv.getenv = mapEnv(map[string]string{"HOME": t.TempDir()})
	ts.srv.units.ttl = 0
	return &advServer{testServer: ts, h: h}
}

// storedRows is every event row of s as text, one "path action meta" line each, to search for
// what must never be stored.
func (s *advServer) storedRows(t *testing.T) string {
	t.Helper()
	var stored strings.Builder
	for _, r := range readRows(t, rawDB(t, s.cfg.dbPath), "") {
		fmt.Fprintf(&stored, "%s %s %s\n", r.path.String, r.action, r.meta)
	}
	return stored.String()
}

// settleQueue runs the dispatcher until nothing is due and then ends every task it started, as
// run-task does, so the next request finds no task running.
func (s *advServer) settleQueue(t *testing.T) {
	t.Helper()
	s.drain(t)
	for _, c := range s.h.callsOf(keySystemdRun) {
		if err := s.events.settleTask(context.Background(), taskUnitName(c[len(c)-2]), "done", "", time.Time{}, nil); err != nil {
			t.Fatal(err)
		}
	}
}

// runAdvCases sends every case, checks its answer and what ran, then closes the server and
// checks that each request left its row. It returns the number of cases.
func runAdvCases(t *testing.T, s *advServer, cases []advCase) int {
	t.Helper()
	ids := make([]string, len(cases))
	for i := range cases {
		c := &cases[i]
		if c.method == "" {
			c.method = "POST"
		}
		if c.target == "" {
			c.target = advUnitPath
		}
		header := slices.Clone(c.header)
		if strings.HasPrefix(c.target, "/github-package-update/") {
			if c.event == "" {
				c.event = "package"
			}
			if c.event != "-" {
				header = append(header, [2]string{"X-GitHub-Event", c.event})
			}
			if c.delivery == "" {
				c.delivery = fmt.Sprintf("adv-%d", i)
			}
			header = append(header, [2]string{"X-GitHub-Delivery", c.delivery})
			switch c.sig {
			case "":
			case sigRight:
				header = append(header, [2]string{"X-Hub-Signature-256", hubSignature(advSecret, c.body)})
			default:
				header = append(header, [2]string{"X-Hub-Signature-256", c.sig})
			}
		}
		before := len(s.h.calls())
		resp, body, err := rawExchange(s.Listener.Addr().String(), c.method, c.target, header, c.body, c.chunked)
		if err != nil {
			t.Errorf("%s: %s %s: %v", c.name, c.method, c.target, err)
			continue
		}
		s.settleQueue(t)
		ids[i] = resp.Header.Get("X-Request-Id")
		if resp.StatusCode != c.status || !strings.Contains(body, c.text) {
			t.Errorf("%s: %s %s = %d %q, want %d containing %q", c.name, c.method, c.target, resp.StatusCode, body, c.status, c.text)
		}
		if c.status == http.StatusMethodNotAllowed && resp.Header.Get("Allow") == "" {
			t.Errorf("%s: 405 without an Allow header", c.name)
		}
		calls := s.h.calls()[before:]
		var keys []string
		for _, call := range calls {
			keys = append(keys, call[0]+"-"+fakeVerb(call[0], call[1:]))
		}
		switch {
		case c.readOnly:
			for _, k := range keys {
				if !readOnlyCommands[k] {
					t.Errorf("%s: ran %s, which is not read-only:\n%s", c.name, k, fakeCallLines(calls))
				}
			}
		case !slices.Equal(keys, c.calls):
			t.Errorf("%s: ran %q, want %q:\n%s", c.name, keys, c.calls, fakeCallLines(calls))
		}
		if c.argvHas != "" {
			run := s.h.callsOf(keySystemdRun)
			if len(run) == 0 || !strings.Contains(strings.Join(run[len(run)-1], " "), c.argvHas) {
				t.Errorf("%s: the last systemd-run call lacks %q:\n%s", c.name, c.argvHas, fakeCallLines(run))
			}
		}
	}
	rows := s.rows(t)
	for i, c := range cases {
		if ids[i] == "" {
			continue
		}
		r, ok := rows[ids[i]]
		if !ok {
			t.Errorf("%s: no event row for request %s", c.name, ids[i])
			continue
		}
		var meta map[string]any
		json.Unmarshal([]byte(r.meta), &meta)
		if r.status != c.status || (c.action != "" && r.action != c.action) {
			t.Errorf("%s: row status %d action %s, want %d %s", c.name, r.status, r.action, c.status, c.action)
		}
		if c.reason != "" && meta["reason"] != c.reason && meta["error"] != c.reason {
			t.Errorf("%s: row reason %v error %v, want %s", c.name, meta["reason"], meta["error"], c.reason)
		}
	}
	return len(cases)
}

// TestAdversarialRequests sends every request shape the issue lists, and more, to the running
// server. Each case names its status, the programs it may run (nothing, for every refusal) and
// its event row. Decisions this table documents:
//   - hex digits of the signature are accepted in either case (the same 32 bytes); the
//     "sha256=" prefix must be lowercase; when the header comes twice, the first one counts;
//   - a correctly signed body that is not JSON is 400 (GitHub's delivery log must not show a
//     success for a body the server could not read); JSON that is not a package event, or a
//     package event whose action is not published or updated, is 202 "ignored";
//   - a payload may name only a registry host in WEBHOOK_REGISTRY_HOSTS (default ghcr.io), else
//     403;
//   - the manual API reads JSON with encoding/json: a duplicated key takes the last value, keys
//     match case-insensitively ("TOKEN" is "token"), a value of the wrong type is 400 before the
//     token is checked, and anything after the object is 400;
//   - a token is taken from "Authorization: Bearer" or the JSON body on the manual API, never
//     from its query string; /auto-update and the GET routes also take ?token=;
//   - owner and name in a payload are lowercased (GitHub's names are case-insensitive, OCI
//     paths are lowercase), but an image given to the manual API must already be a valid
//     reference: nothing there is rewritten.
func TestAdversarialRequests(t *testing.T) {
	s := newAdvServer(t, nil)
	pkg := func(owner, name, tag string) []byte { return githubPackagePayload("ghcr.io", owner, name, tag, "") }
	pkgHost := func(host string) []byte { return githubPackagePayload(host, "octo-org", "web", "v1", "") }
	ok := pkg("octo-org", "web", "v1")
	hexOK := hubSignature(advSecret, ok)[len("sha256="):]
	sha1Sig := func(body []byte) string {
		mac := hmac.New(sha1.New, []byte(advSecret))
		mac.Write(body)
		return "sha1=" + hex.EncodeToString(mac.Sum(nil))
	}
	queued := []string{"systemctl-show", "systemctl-show", keySystemdRun} // the request's unit lookup, the dispatcher's policy
	bearer := func(tok string) [][2]string { return [][2]string{{"Authorization", "Bearer " + tok}} }
	trigger := func(body string) []byte { return []byte(body) }
	service := func(image string) []byte {
		b, _ := json.Marshal(map[string]any{"image": image})
		return b
	}
	long := strings.Repeat("a", 256)

	cases := []advCase{
		// The delivery that works, as the control.
		{name: "valid delivery", body: ok, sig: sigRight, status: 202, text: "auto-update queued", action: "github-webhook",
			reason: "queued", calls: queued, argvHas: " -- web.service ghcr.io/octo-org/web:v1 package adv-0 " + advUnitPath},

		// Every shape of a bad signature: 401, nothing run, the refusal recorded.
		{name: "no signature header", body: ok, status: 401, reason: "bad-signature"},
		{name: "empty signature header", body: ok, sig: " ", status: 401, reason: "bad-signature"},
		{name: "sha1 signature only", body: ok, header: [][2]string{{"X-Hub-Signature", sha1Sig(ok)}}, status: 401, reason: "bad-signature"},
		{name: "sha1 value in the sha256 header", body: ok, sig: sha1Sig(ok), status: 401, reason: "bad-signature"},
		{name: "prefix only", body: ok, sig: "sha256=", status: 401, reason: "bad-signature"},
		{name: "odd-length hex", body: ok, sig: "sha256=" + hexOK[:63], status: 401, reason: "bad-signature"},
		{name: "non-hex digits", body: ok, sig: "sha256=" + strings.Repeat("zz", 32), status: 401, reason: "bad-signature"},
		{name: "wrong signature", body: ok, sig: "sha256=" + strings.Repeat("0", 64), status: 401, reason: "bad-signature"},
		{name: "right signature of another body", body: ok, sig: hubSignature(advSecret, pkg("octo-org", "web", "v2")), status: 401, reason: "bad-signature"},
		{name: "signature under another secret", body: ok, sig: hubSignature(advSecret+"x", ok), status: 401, reason: "bad-signature"},
		{name: "right signature, one more byte of body", body: append(slices.Clone(ok), ' '), sig: hubSignature(advSecret, ok), status: 401, reason: "bad-signature"},
		{name: "uppercase prefix", body: ok, sig: "SHA256=" + hexOK, status: 401, reason: "bad-signature"},
		{name: "no prefix", body: ok, sig: hexOK, status: 401, reason: "bad-signature"},
		{name: "signature twice in one header", body: ok, sig: "sha256=" + hexOK + ",sha256=" + hexOK, status: 401, reason: "bad-signature"},
		{name: "twice as long", body: ok, sig: "sha256=" + hexOK + hexOK, status: 401, reason: "bad-signature"},
		{name: "two headers, the wrong one first", body: ok, header: [][2]string{{"X-Hub-Signature-256", "sha256=" + strings.Repeat("0", 64)},
			{"X-Hub-Signature-256", "sha256=" + hexOK}}, status: 401, reason: "bad-signature"},
		{name: "two headers, the right one first", body: ok, header: [][2]string{{"X-Hub-Signature-256", "sha256=" + hexOK},
			{"X-Hub-Signature-256", "sha256=" + strings.Repeat("0", 64)}}, status: 202, reason: "queued", calls: queued},
		{name: "uppercase hex digits are the same signature", body: ok, sig: "sha256=" + strings.ToUpper(hexOK), status: 202, reason: "queued", calls: queued},
		{name: "bad signature with a ping", event: "ping", body: []byte(`{"zen":"x"}`), sig: "sha256=" + hexOK, status: 401, reason: "bad-signature"},

		// Bodies over the cap, announced or not.
		{name: "oversize body with Content-Length", body: bytes.Repeat([]byte("x"), advMaxBody+1), sig: sigRight, status: 413, action: "body-too-large"},
		{name: "oversize chunked body", body: bytes.Repeat([]byte("x"), 4*advMaxBody), sig: sigRight, chunked: true, status: 413,
			action: "github-webhook", reason: "body-too-large"},
		{name: "chunked body under the cap", body: ok, sig: sigRight, chunked: true, status: 202, reason: "queued", calls: queued},
		{name: "oversize chunked body to the manual API", target: "/api/manual/trigger", header: bearer(advManualToken),
			body: bytes.Repeat([]byte(" "), 4*advMaxBody), chunked: true, status: 413, action: "manual-trigger", reason: "body-too-large"},

		// Events and delivery ids.
		{name: "ping", event: "ping", body: []byte(`{"zen":"Design for failure.","hook_id":1}`), sig: sigRight, status: 200, text: "pong", action: "github-ping"},
		{name: "event not allowed", event: "push", body: ok, sig: sigRight, status: 202, text: "event ignored", reason: "event-not-allowed"},
		{name: "no event header", event: "-", body: ok, sig: sigRight, status: 400, reason: "bad-event-header"},
		{name: "event header in capitals", event: "Package", body: ok, sig: sigRight, status: 400, reason: "bad-event-header"},
		{name: "push payload as a package event", body: []byte(`{"ref":"refs/heads/main","repository":{"owner":{"login":"o"}}}`), sig: sigRight,
			status: 202, reason: "not-a-package"},
		{name: "signed body that is not JSON", body: []byte("payload=%7B%7D"), sig: sigRight, status: 400, reason: "invalid-json"},
		{name: "signed body cut short", body: ok[:len(ok)-1], sig: hubSignature(advSecret, ok[:len(ok)-1]), status: 400, reason: "invalid-json"},
		{name: "signed JSON that is not an object", body: []byte(`[1,2]`), sig: sigRight, status: 400, reason: "invalid-json"},
		{name: "package deleted", body: withAction(ok, "deleted"), sig: sigRight, status: 202, text: `action "deleted" does not redeploy`, reason: "action-ignored"},
		{name: "package without an action", body: withAction(ok, ""), sig: sigRight, status: 202, reason: "action-ignored"},
		{name: "package updated", body: withAction(ok, "updated"), sig: sigRight, status: 202, reason: "queued", calls: queued},
		{name: "registry host not allowed", body: pkgHost("registry.example.com"), sig: sigRight, status: 403,
			text: "WEBHOOK_REGISTRY_HOSTS", reason: "registry-not-allowed"},
		{name: "GitHub Enterprise host not allowed by default", body: pkgHost("containers.ghe.example.com"), sig: sigRight, status: 403,
			reason: "registry-not-allowed"},
		{name: "npm package", body: loadPayload(t, "package-published-npm.json"), sig: sigRight, status: 202, reason: "not-container"},
		{name: "untagged manifest", body: loadPayload(t, "package-published-untagged.json"), sig: sigRight, status: 202, reason: "missing-tag"},
		{name: "empty tag", body: pkg("octo-org", "web", ""), sig: sigRight, status: 202, reason: "missing-tag"},
		{name: "registry_package event", event: "registry_package", body: loadPayload(t, "registry-package-published-container.json"), sig: sigRight,
			status: 202, reason: "queued", calls: queued, argvHas: " ghcr.io/octo-org/hello-world:v1.2.3 registry_package "},
		{name: "uppercase owner and name are lowercased", body: pkg("Octo-ORG", "Web", "v1"), sig: sigRight, status: 202, reason: "queued",
			calls: queued, argvHas: " -- web.service ghcr.io/octo-org/web:v1 package "},
		{name: "delivery id with a path", delivery: "../../x", body: ok, sig: sigRight, status: 400, reason: "bad-delivery-header"},
		{name: "delivery id that reads as a flag", delivery: "-rf", body: ok, sig: sigRight, status: 400, reason: "bad-delivery-header"},
		{name: "delivery id of 200 characters", delivery: strings.Repeat("d", 200), body: ok, sig: sigRight, status: 400, reason: "bad-delivery-header"},
		{name: "first copy of a delivery", delivery: "adv-dup", body: ok, sig: sigRight, status: 202, reason: "queued", calls: queued},
		{name: "second copy of a delivery", delivery: "adv-dup", body: ok, sig: sigRight, status: 202, text: "duplicate delivery",
			reason: "duplicate", calls: []string{"systemctl-show"}},

		// Unit values in the path: refused before anything runs.
		{name: "unit --authfile=x", target: "/github-package-update/--authfile=x", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit -q", target: "/github-package-update/-q", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit -.slice", target: "/github-package-update/-.slice", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit foo@*.service", target: "/github-package-update/foo@*.service", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit template without instance", target: "/github-package-update/foo@.service", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit ../x", target: "/github-package-update/../x", body: ok, sig: sigRight, status: 404, action: "not-found"},
		{name: "unit %2e%2e", target: "/github-package-update/%2e%2e", body: ok, sig: sigRight, status: 404, action: "not-found"},
		{name: "unit %2e%2e%2fx", target: "/github-package-update/%2e%2e%2fx", body: ok, sig: sigRight, status: 404, action: "not-found"},
		{name: "unit with NUL", target: "/github-package-update/foo%00", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit with newline", target: "/github-package-update/foo%0a-q", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit with CRLF", target: "/github-package-update/foo%0d%0aX-Evil:%201", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit with an encoded slash", target: "/github-package-update/foo%2f-q", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit prefix then a flag", target: "/github-package-update/github-package-update%2f-q", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit leading slash then a flag", target: "/github-package-update/%2f-x", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit with a backslash", target: "/github-package-update/foo%5cx", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit with a space", target: "/github-package-update/foo%20bar", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit of 256 bytes", target: "/github-package-update/" + strings.Repeat("a", 248), body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},
		{name: "unit of 255 bytes is fine", target: "/github-package-update/" + strings.Repeat("a", 247), body: ok, sig: sigRight, status: 202,
			reason: "queued", calls: queued},
		{name: "unit through /redeploy", target: "/github-package-update/-q/redeploy", body: ok, sig: sigRight, status: 400, reason: "invalid-unit"},

		// Image values in the payload: refused whole before anything runs.
		{name: "name -q", body: pkg("octo-org", "-q", "v1"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "name --authfile=x", body: pkg("octo-org", "--authfile=x", "v1"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "owner -q", body: pkg("-q", "web", "v1"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "tag --authfile=x", body: pkg("octo-org", "web", "--authfile=x"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "tag -q", body: pkg("octo-org", "web", "-q"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "name ../x", body: pkg("octo-org", "../x", "v1"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "name %2e%2e", body: pkg("octo-org", "%2e%2e", "v1"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "name with NUL", body: pkg("octo-org", "a\x00b", "v1"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "tag with a newline", body: pkg("octo-org", "web", "v1\n--tls-verify=false"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "name of 256 characters", body: pkg("octo-org", long, "v1"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "tag of 129 characters", body: pkg("octo-org", "web", strings.Repeat("t", 129)), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "name is a transport", body: pkg("octo-org", "docker-archive:/tmp/x.tar", "v1"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "registry docker-archive:", body: pkgHost("docker-archive:"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "registry dir:", body: pkgHost("dir:"), sig: sigRight, status: 400, reason: "invalid-image"},
		{name: "registry containers-storage:", body: pkgHost("containers-storage:"), sig: sigRight, status: 400, reason: "invalid-image"},

		// Manual API: tokens and JSON.
		{name: "trigger without a token", target: "/api/manual/trigger", body: trigger(`{"units":["a"]}`), status: 401, action: "manual-trigger", reason: "unauthorized"},
		{name: "trigger with an empty body", target: "/api/manual/trigger", status: 401, reason: "unauthorized"},
		{name: "trigger token too short", target: "/api/manual/trigger", body: trigger(`{"token":"` + advManualToken[:8] + `"}`), status: 401, reason: "unauthorized"},
		{name: "trigger token too long", target: "/api/manual/trigger", body: trigger(`{"token":"` + advManualToken + `x"}`), status: 401, reason: "unauthorized"},
		{name: "trigger with the webhook token", target: "/api/manual/trigger", body: trigger(`{"token":"` + advToken + `"}`), status: 401, reason: "unauthorized"},
		{name: "token of the wrong JSON type", target: "/api/manual/trigger", body: trigger(`{"token":12345}`), status: 400, reason: "bad-json"},
		{name: "token as a list", target: "/api/manual/trigger", body: trigger(`{"token":["` + advManualToken + `"]}`), status: 400, reason: "bad-json"},
		{name: "token null", target: "/api/manual/trigger", body: trigger(`{"token":null,"units":["a"]}`), status: 401, reason: "unauthorized"},
		{name: "duplicated token key, the right one last", target: "/api/manual/trigger",
			body: trigger(`{"token":"` + advWrongToken + `","token":"` + advManualToken + `","units":["a"],"dry_run":true}`), status: 202},
		{name: "duplicated token key, the right one first", target: "/api/manual/trigger",
			body: trigger(`{"token":"` + advManualToken + `","token":"` + advWrongToken + `","units":["a"],"dry_run":true}`), status: 401, reason: "unauthorized"},
		{name: "token key in capitals", target: "/api/manual/trigger", body: trigger(`{"TOKEN":"` + advManualToken + `","units":["a"],"dry_run":true}`), status: 202},
		{name: "trailing object", target: "/api/manual/trigger", body: trigger(`{"token":"` + advManualToken + `","units":["a"]} {"units":["b"]}`), status: 400, reason: "bad-json"},
		{name: "trailing garbage", target: "/api/manual/trigger", body: trigger(`{"token":"` + advManualToken + `","units":["a"]}x`), status: 400, reason: "bad-json"},
		{name: "unknown field", target: "/api/manual/trigger", body: trigger(`{"token":"` + advManualToken + `","unit":"a"}`), status: 400, reason: "bad-json"},
		{name: "wrong bearer, right body token", target: "/api/manual/trigger", header: bearer(advWrongToken),
			body: trigger(`{"token":"` + advManualToken + `","units":["a"]}`), status: 401, reason: "unauthorized"},
		{name: "token in the query of the manual API", target: "/api/manual/trigger?token=" + advManualToken, body: trigger(`{"units":["a"]}`), status: 401, reason: "unauthorized"},
		{name: "only hostile units", target: "/api/manual/trigger", header: bearer(advManualToken),
			body: trigger(`{"units":["--authfile=x","-q","-.slice","foo@*.service","../x","%2e%2e","a\u0000","a\nb","` + long + `"]}`), status: 400},
		{name: "a hostile unit beside a good one", target: "/api/manual/trigger", header: bearer(advManualToken),
			body: trigger(`{"units":["-q","good"]}`), status: 207, calls: []string{"systemctl-restart"}},

		// Manual services API: unit names and images.
		{name: "service -q", target: "/api/manual/services/-q", header: bearer(advManualToken), body: []byte(`{}`), status: 400, reason: "invalid-unit"},
		{name: "service foo@*", target: "/api/manual/services/foo@*", header: bearer(advManualToken), body: []byte(`{}`), status: 400, reason: "invalid-unit"},
		{name: "service with NUL", target: "/api/manual/services/a%00", header: bearer(advManualToken), body: []byte(`{}`), status: 400, reason: "invalid-unit"},
		{name: "service %2e%2e", target: "/api/manual/services/%2e%2e", header: bearer(advManualToken), body: []byte(`{}`), status: 404, action: "not-found"},
		{name: "service without a token", target: "/api/manual/services/web", body: service("ghcr.io/o/n:1"), status: 401, reason: "unauthorized"},
		{name: "service image, valid", target: "/api/manual/services/web", header: bearer(advManualToken), body: service("ghcr.io/o/n:1"), status: 202,
			calls: []string{keySystemdRun}, argvHas: " -- web.service ghcr.io/o/n:1 manual "},
		{name: "service image, dry run", target: "/api/manual/services/web", header: bearer(advManualToken),
			body: []byte(`{"image":"ghcr.io/o/n:1","dry_run":true}`), status: 202, readOnly: true},
	}
	for _, img := range []string{"--authfile=x", "-q", "docker-archive:/tmp/x.tar", "docker-archive:ghcr.io/o/n:1", "dir:/tmp/x",
		"containers-storage:ghcr.io/o/n:1", "oci-archive:/tmp/x.tar", "docker://ghcr.io/o/n:1", "docker-daemon:ghcr.io/o/n:1",
		"ghcr.io/o/n:1\n--tls-verify=false", "ghcr.io/o/n:1\x00", "../x:1", "ghcr.io/%2e%2e/n:1", "ghcr.io/O/N:1", "ghcr.io/o/" + long + ":1", "nginx:latest"} {
		cases = append(cases, advCase{name: "service image " + strconv.Quote(img), target: "/api/manual/services/web",
			header: bearer(advManualToken), body: service(img), status: 400, reason: "invalid-image"})
	}
	cases = append(cases, []advCase{
		// Tokens in query strings, and the GET routes that take them.
		{name: "auto-update with the query token", method: "GET", target: "/auto-update?token=" + advToken, status: 202, action: "auto-update",
			calls: []string{"systemctl-start"}},
		{name: "auto-update with a wrong query token", method: "GET", target: "/auto-update?token=" + advWrongToken, status: 401, reason: "unauthorized"},
		{name: "auto-update with the manual token", method: "POST", target: "/auto-update?token=" + advManualToken, status: 401, reason: "unauthorized"},
		{name: "auto-update token hidden in a second parameter", method: "GET", target: "/auto-update?x=1&token=" + advWrongToken + "&token=" + advToken, status: 401},
		{name: "events with the query token", method: "GET", target: "/api/events?limit=1&token=" + advManualToken, status: 200, action: "events-api"},
		{name: "events with a wrong query token", method: "GET", target: "/api/events?token=" + advWrongToken, status: 401},
		{name: "hello with a token in the query", method: "GET", target: "/sse/hello?token=" + advToken, status: 200, action: "sse-hello"},

		// GET and other methods on POST routes.
		{name: "GET a delivery route", method: "GET", target: advUnitPath, status: 405, action: "method-not-allowed"},
		{name: "GET a redeploy route", method: "GET", target: advUnitPath + "/redeploy", status: 405, action: "method-not-allowed"},
		{name: "GET the manual trigger", method: "GET", target: "/api/manual/trigger?token=" + advManualToken, status: 405, action: "method-not-allowed"},
		{name: "GET a manual service", method: "GET", target: "/api/manual/services/web", status: 405, action: "method-not-allowed"},
		{name: "PUT a delivery route", method: "PUT", target: advUnitPath, body: ok, status: 405, action: "method-not-allowed"},
		{name: "DELETE the manual trigger", method: "DELETE", target: "/api/manual/trigger", status: 405, action: "method-not-allowed"},
		{name: "PUT auto-update", method: "PUT", target: "/auto-update?token=" + advToken, status: 405, action: "method-not-allowed"},
		{name: "HEAD auto-update", method: "HEAD", target: "/auto-update?token=" + advToken, status: 405, action: "auto-update"},
		{name: "POST the events API", method: "POST", target: "/api/events", status: 405, action: "method-not-allowed"},
	}...)
	n := runAdvCases(t, s, cases)

	// No token, secret or wrong token reaches a log line or a row, whatever the route.
	t.Run("no secret reaches a log line or a row", func(t *testing.T) {
		stored := s.storedRows(t)
		for _, secret := range []string{advToken, advManualToken, advWrongToken, advManualToken[:8], advSecret} {
			if strings.Contains(stored, secret) {
				t.Errorf("%q reached an event row", secret)
			}
			if strings.Contains(s.logs.String(), secret) {
				t.Errorf("%q reached the log:\n%s", secret, s.logs)
			}
		}
		if !strings.Contains(stored, "token=REDACTED") {
			t.Errorf("no row shows a redacted query token; rows:\n%s", stored)
		}
	})
	t.Logf("%d adversarial requests", n)
}

// TestAdversarialSecretUnset: with no GITHUB_WEBHOOK_SECRET every delivery, signed or not, is
// refused with 500 and nothing runs.
func TestAdversarialSecretUnset(t *testing.T) {
	s := newAdvServer(t, map[string]string{"GITHUB_WEBHOOK_SECRET": ""})
	ok := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
	runAdvCases(t, s, []advCase{
		{name: "signed with the empty secret", body: ok, sig: hubSignature("", ok), status: 500, text: "server misconfigured", reason: "secret-unset"},
		{name: "unsigned", body: ok, status: 500, reason: "secret-unset"},
		{name: "ping", event: "ping", body: []byte(`{}`), sig: hubSignature("", []byte(`{}`)), status: 500, reason: "secret-unset"},
	})
}

// Registry push routes: one secret per source, units that name their image in a Quadlet file.
const (
	advRegistryToken = "adv-REGISTRY-3e4f5a6b"
	advGiteaSecret   = "adv gitea secret"
)

// newAdvRegistryServer is newAdvServer with every registry source's secret set and a Quadlet
// file per unit in images (unit name → Image=) under the server's HOME.
func newAdvRegistryServer(t *testing.T, env map[string]string, images map[string]string) *advServer {
	t.Helper()
	full := map[string]string{}
	for name := range pushSources {
		if name != "github" {
			full[secretEnv(name)] = advRegistryToken
		}
	}
	full[secretEnv("gitea")] = advGiteaSecret
	for k, v := range env {
		full[k] = v
	}
	s := newAdvServer(t, full)
	home := t.TempDir()
	dir := filepath.Join(home, ".config", "containers", "systemd")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for unit, image := range images {
		if err := os.WriteFile(filepath.Join(dir, unit+".container"), []byte("[Container]\nImage="+image+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	s.srv.getenv = mapEnv(map[string]string{"HOME": home})
	return s
}

// giteaHeaders are the headers Gitea sends with a package event, signed under secret.
func giteaHeaders(secret string, body []byte, delivery string) [][2]string {
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write(body)
	return [][2]string{{"X-Gitea-Event", "package"}, {"X-Gitea-Delivery", delivery}, {"X-Gitea-Signature", hex.EncodeToString(mac.Sum(nil))}}
}

// TestAdversarialRegistry sends each registry source the push it documents and every way of
// getting it wrong: missing and wrong credentials, other events, untagged pushes, hostile
// references, oversized bodies, units that name no image or another one. Each case names its
// status, what ran (nothing but the unit lookup, for every refusal) and its row; no secret
// reaches a row or the log, whether it came in a header, the query or the path.
func TestAdversarialRegistry(t *testing.T) {
	s := newAdvRegistryServer(t, nil, map[string]string{
		"dist":   "reg.example:5000/e2e/app",
		"harbor": "hub.harbor.com/test-webhook/debian:latest",
		"gitea":  "gitea.example.com/octo/web:v1.4.0",
		"hub":    "docker.io/svendowideit/testhook:latest",
		"quay":   "quay.io/mynamespace/repository:latest",
	})
	queued := []string{"systemctl-show", "systemctl-show", keySystemdRun} // the request's unit lookup, the dispatcher's policy
	looked := []string{"systemctl-show"}
	bearer := func(tok string) [][2]string { return [][2]string{{"Authorization", "Bearer " + tok}} }
	okAuth := bearer(advRegistryToken)
	dist := func(events ...map[string]any) []byte { return distEnvelope(events...) }
	push := func(id, repo, tag string) map[string]any {
		return distEvent(id, "push", manifestV2, repo, tag, "reg.example:5000")
	}
	harbor := loadPayload(t, "harbor-push-artifact.json")
	gitea := loadPayload(t, "gitea-package-created.json")
	giteaID := "6b1e1a6c-3ef4-4c2e-9c41-0f8e2c3d4a5b"
	hub := loadPayload(t, "dockerhub-push.json")
	quay := loadPayload(t, "quay-push.json")
	huge := bytes.Repeat([]byte(" "), advMaxBody+1)
	cases := []advCase{
		// Distribution.
		{name: "distribution push", target: "/registry/distribution/dist", header: okAuth, body: dist(push("d-1", "e2e/app", "latest")),
			status: 202, text: "auto-update queued", action: "registry-webhook", reason: "queued", calls: queued,
			argvHas: " -- dist.service reg.example:5000/e2e/app:latest distribution dist-d-1 /registry/distribution/dist"},
		{name: "distribution retry of the same event", target: "/registry/distribution/dist", header: okAuth, body: dist(push("d-1", "e2e/app", "latest")),
			status: 202, text: "duplicate delivery", reason: "duplicate", calls: looked},
		{name: "distribution blobs and a manifest in one envelope", target: "/registry/distribution/dist", header: okAuth,
			body:   dist(distEvent("b-1", "push", "application/octet-stream", "e2e/app", "", "reg.example:5000"), push("d-2", "e2e/app", "latest")),
			status: 202, reason: "queued", calls: queued, argvHas: " distribution dist-d-2 "},
		{name: "distribution two tags, the unit's second", target: "/registry/distribution/dist", header: okAuth,
			body: dist(push("d-3", "e2e/app", "v9"), push("d-4", "e2e/app", "latest")), status: 202, reason: "queued", calls: queued, argvHas: " distribution dist-d-4 "},
		{name: "distribution without a token", target: "/registry/distribution/dist", body: dist(push("d-5", "e2e/app", "latest")), status: 401, reason: "unauthorized"},
		{name: "distribution body that is not JSON", target: "/registry/distribution/dist", header: okAuth, body: []byte("events=1"), status: 400, reason: "invalid-json"},
		{name: "distribution wrong token", target: "/registry/distribution/dist", header: bearer(advWrongToken), body: dist(push("d-6", "e2e/app", "latest")), status: 401, reason: "unauthorized"},
		{name: "distribution token as Basic", target: "/registry/distribution/dist", header: [][2]string{{"Authorization", "Basic " + advRegistryToken}},
			body: dist(push("d-7", "e2e/app", "latest")), status: 401, reason: "unauthorized"},
		{name: "distribution token in the query instead of the header", target: "/registry/distribution/dist?token=" + advRegistryToken,
			body: dist(push("d-8", "e2e/app", "latest")), status: 401, reason: "unauthorized"},
		{name: "distribution another source's secret", target: "/registry/distribution/dist", header: bearer(advGiteaSecret), body: dist(push("d-9", "e2e/app", "latest")), status: 401},
		{name: "distribution blob only", target: "/registry/distribution/dist", header: okAuth,
			body: dist(distEvent("b-2", "push", "application/octet-stream", "e2e/app", "", "reg.example:5000")), status: 202, reason: "not-a-manifest"},
		{name: "distribution pull", target: "/registry/distribution/dist", header: okAuth,
			body: dist(distEvent("p-1", "pull", manifestV2, "e2e/app", "latest", "reg.example:5000")), status: 202, reason: "not-a-push"},
		{name: "distribution untagged", target: "/registry/distribution/dist", header: okAuth, body: dist(push("u-1", "e2e/app", "")), status: 202, reason: "missing-tag"},
		{name: "distribution repository -q", target: "/registry/distribution/dist", header: okAuth, body: dist(push("i-1", "-q", "latest")), status: 400, reason: "invalid-image"},
		{name: "distribution tag --authfile=x", target: "/registry/distribution/dist", header: okAuth, body: dist(push("i-2", "e2e/app", "--authfile=x")), status: 400, reason: "invalid-image"},
		{name: "distribution host dir:", target: "/registry/distribution/dist", header: okAuth,
			body: dist(distEvent("i-3", "push", manifestV2, "e2e/app", "latest", "dir:")), status: 400, reason: "invalid-image"},
		{name: "distribution another repository", target: "/registry/distribution/dist", header: okAuth, body: dist(push("m-1", "e2e/other", "latest")),
			status: 202, text: "repository mismatch", reason: "repository-mismatch", calls: looked},
		{name: "distribution another tag", target: "/registry/distribution/dist", header: okAuth, body: dist(push("m-2", "e2e/app", "v2")), status: 202, reason: "tag-mismatch", calls: looked},
		{name: "distribution unit that names no image", target: "/registry/distribution/noimage", header: okAuth, body: dist(push("n-1", "e2e/app", "latest")),
			status: 202, reason: "unit-image-unknown", calls: looked},
		{name: "distribution unit -q", target: "/registry/distribution/-q", header: okAuth, body: dist(push("n-2", "e2e/app", "latest")), status: 400, reason: "invalid-unit"},
		{name: "distribution oversized body", target: "/registry/distribution/dist", header: okAuth, body: huge, status: 413, action: "body-too-large"},
		{name: "distribution oversized chunked body", target: "/registry/distribution/dist", header: okAuth, body: huge, chunked: true, status: 413,
			action: "registry-webhook", reason: "body-too-large"},

		// Harbor.
		{name: "harbor push", target: "/registry/harbor/harbor", header: okAuth, body: harbor, status: 202, reason: "queued", calls: queued,
			argvHas: " -- harbor.service hub.harbor.com/test-webhook/debian:latest harbor harbor-"},
		{name: "harbor retry", target: "/registry/harbor/harbor", header: okAuth, body: harbor, status: 202, reason: "duplicate", calls: looked},
		{name: "harbor auth header without Bearer", target: "/registry/harbor/harbor", header: [][2]string{{"Authorization", advRegistryToken}}, body: harbor, status: 401},
		{name: "harbor no auth", target: "/registry/harbor/harbor", body: harbor, status: 401, reason: "unauthorized"},
		{name: "harbor pull event", target: "/registry/harbor/harbor", header: okAuth, body: loadPayload(t, "harbor-pull-artifact.json"), status: 202, reason: "not-a-push"},
		{name: "harbor untagged", target: "/registry/harbor/harbor", header: okAuth,
			body:   loadPayload(t, "harbor-push-artifact.json", setField("event_data.resources", []any{map[string]any{"digest": digestV1, "tag": "", "resource_url": "hub.harbor.com/test-webhook/debian@" + digestV1}})),
			status: 202, reason: "missing-tag"},
		{name: "harbor repository ../x", target: "/registry/harbor/harbor", header: okAuth,
			body: loadPayload(t, "harbor-push-artifact.json", setField("event_data.repository.repo_full_name", "../x")), status: 400, reason: "invalid-image"},
		{name: "harbor oversized", target: "/registry/harbor/harbor", header: okAuth, body: huge, status: 413},

		// Gitea and Forgejo.
		{name: "gitea package created", target: "/registry/gitea/gitea", header: giteaHeaders(advGiteaSecret, gitea, giteaID), body: gitea,
			status: 202, reason: "queued", calls: queued, argvHas: " -- gitea.service gitea.example.com/octo/web:v1.4.0 gitea gitea-" + giteaID + " "},
		{name: "gitea redelivery", target: "/registry/gitea/gitea", header: giteaHeaders(advGiteaSecret, gitea, giteaID), body: gitea, status: 202, reason: "duplicate", calls: looked},
		{name: "forgejo signature header", target: "/registry/gitea/gitea", body: gitea, header: [][2]string{{"X-Forgejo-Event", "package"},
			{"X-Forgejo-Delivery", "f-1"}, {"X-Forgejo-Signature", giteaHeaders(advGiteaSecret, gitea, "")[2][1]}}, status: 202, reason: "queued", calls: queued, argvHas: " gitea-f-1 "},
		{name: "gitea unsigned", target: "/registry/gitea/gitea", header: giteaHeaders(advGiteaSecret, gitea, "g-2")[:2], body: gitea, status: 401, reason: "unauthorized"},
		{name: "gitea signed under another secret", target: "/registry/gitea/gitea", header: giteaHeaders(advRegistryToken, gitea, "g-3"), body: gitea, status: 401},
		{name: "gitea signature of another body", target: "/registry/gitea/gitea", header: giteaHeaders(advGiteaSecret, hub, "g-4"), body: gitea, status: 401},
		{name: "gitea signature with GitHub's prefix", target: "/registry/gitea/gitea", header: [][2]string{{"X-Gitea-Event", "package"},
			{"X-Gitea-Signature", "sha256=" + giteaHeaders(advGiteaSecret, gitea, "")[2][1]}}, body: gitea, status: 401},
		{name: "gitea bearer token instead of a signature", target: "/registry/gitea/gitea", header: bearer(advGiteaSecret), body: gitea, status: 401},
		{name: "gitea push event", target: "/registry/gitea/gitea", body: gitea,
			header: append(giteaHeaders(advGiteaSecret, gitea, "g-5")[1:], [2]string{"X-Gitea-Event", "push"}), status: 202, reason: "not-a-package"},
		{name: "gitea package deleted", target: "/registry/gitea/gitea", body: loadPayload(t, "gitea-package-created.json", setField("action", "deleted")),
			header: giteaHeaders(advGiteaSecret, loadPayload(t, "gitea-package-created.json", setField("action", "deleted")), "g-6"), status: 202, reason: "not-created"},
		{name: "gitea untagged", target: "/registry/gitea/gitea", body: loadPayload(t, "gitea-package-created.json", setField("package.version", digestV1)),
			header: giteaHeaders(advGiteaSecret, loadPayload(t, "gitea-package-created.json", setField("package.version", digestV1)), "g-7"), status: 202, reason: "missing-tag"},
		{name: "gitea name --authfile=x", target: "/registry/gitea/gitea", body: loadPayload(t, "gitea-package-created.json", setField("package.name", "--authfile=x")),
			header: giteaHeaders(advGiteaSecret, loadPayload(t, "gitea-package-created.json", setField("package.name", "--authfile=x")), "g-8"), status: 400, reason: "invalid-image"},
		{name: "gitea oversized", target: "/registry/gitea/gitea", header: giteaHeaders(advGiteaSecret, huge, "g-9"), body: huge, status: 413},

		// Docker Hub: the token in the path or the query.
		{name: "dockerhub push, token in the path", target: "/registry/dockerhub/hub/" + advRegistryToken, body: hub, status: 202, reason: "queued", calls: queued,
			argvHas: " -- hub.service docker.io/svendowideit/testhook:latest dockerhub hub-"},
		{name: "dockerhub same push, token in the query", target: "/registry/dockerhub/hub?token=" + advRegistryToken, body: hub, status: 202, reason: "duplicate", calls: looked},
		{name: "dockerhub without a token", target: "/registry/dockerhub/hub", body: hub, status: 401, reason: "unauthorized"},
		{name: "dockerhub wrong path token", target: "/registry/dockerhub/hub/" + advWrongToken, body: hub, status: 401, reason: "unauthorized"},
		{name: "dockerhub wrong path token, right query token", target: "/registry/dockerhub/hub/" + advWrongToken + "?token=" + advRegistryToken, body: hub, status: 401},
		{name: "dockerhub bearer header instead", target: "/registry/dockerhub/hub", header: okAuth, body: hub, status: 401},
		{name: "dockerhub token and more path", target: "/registry/dockerhub/hub/" + advRegistryToken + "/x", body: hub, status: 404},
		{name: "dockerhub no tag", target: "/registry/dockerhub/hub/" + advRegistryToken, body: loadPayload(t, "dockerhub-push.json", setField("push_data.tag", "")),
			status: 202, reason: "missing-tag"},
		{name: "dockerhub not a push", target: "/registry/dockerhub/hub/" + advRegistryToken, body: []byte(`{"repository":{"repo_name":"a/b"}}`), status: 202, reason: "not-a-push"},
		{name: "dockerhub tag -q", target: "/registry/dockerhub/hub/" + advRegistryToken, body: loadPayload(t, "dockerhub-push.json", setField("push_data.tag", "-q")),
			status: 400, reason: "invalid-image"},
		{name: "dockerhub oversized", target: "/registry/dockerhub/hub/" + advRegistryToken, body: huge, status: 413},

		// Quay: no id, so each request stands alone.
		{name: "quay push, token in the query", target: "/registry/quay/quay?token=" + advRegistryToken, body: quay, status: 202, reason: "queued", calls: queued,
			argvHas: " -- quay.service quay.io/mynamespace/repository:latest quay quay-"},
		{name: "quay same push again is its own delivery", target: "/registry/quay/quay/" + advRegistryToken, body: quay, status: 202, reason: "queued", calls: queued},
		{name: "quay without a token", target: "/registry/quay/quay", body: quay, status: 401, reason: "unauthorized"},
		{name: "quay wrong token", target: "/registry/quay/quay?token=" + advWrongToken, body: quay, status: 401},
		{name: "quay build notification", target: "/registry/quay/quay?token=" + advRegistryToken, body: loadPayload(t, "quay-build-queued.json"), status: 202, reason: "not-a-push"},
		{name: "quay docker_url docker-archive:", target: "/registry/quay/quay?token=" + advRegistryToken,
			body: loadPayload(t, "quay-push.json", setField("docker_url", "docker-archive:/tmp/x.tar")), status: 400, reason: "invalid-image"},
		{name: "quay oversized", target: "/registry/quay/quay?token=" + advRegistryToken, body: huge, status: 413},

		// Routes.
		{name: "unknown source", target: "/registry/nexus/dist", header: okAuth, body: dist(push("x-1", "e2e/app", "latest")), status: 404, reason: "unknown-source"},
		{name: "GET a registry route", method: "GET", target: "/registry/dockerhub/hub/" + advRegistryToken, status: 405, action: "method-not-allowed"},
		{name: "no unit", target: "/registry/distribution/", header: okAuth, body: dist(push("x-2", "e2e/app", "latest")), status: 404},
	}
	n := runAdvCases(t, s, cases)

	t.Run("no secret reaches a row, the log or a command line", func(t *testing.T) {
		stored := s.storedRows(t)
		for _, secret := range []string{advRegistryToken, advGiteaSecret, advWrongToken} {
			if strings.Contains(stored, secret) {
				t.Errorf("%q reached an event row:\n%s", secret, stored)
			}
			if strings.Contains(s.logs.String(), secret) {
				t.Errorf("%q reached the log:\n%s", secret, s.logs)
			}
			for _, c := range s.h.callsOf(keySystemdRun) {
				if strings.Contains(strings.Join(c, " "), secret) {
					t.Errorf("%q reached a systemd-run command line: %q", secret, c)
				}
			}
		}
		for _, want := range []string{"/registry/dockerhub/hub/REDACTED", "token=REDACTED"} {
			if !strings.Contains(stored, want) {
				t.Errorf("no row shows %s; rows:\n%s", want, stored)
			}
		}
	})
	t.Logf("%d adversarial registry requests", n)
}

// TestAdversarialRegistrySecretUnset: a source whose secret is unset refuses every push with 500,
// whatever it carries, and runs nothing; the other sources are not affected.
func TestAdversarialRegistrySecretUnset(t *testing.T) {
	s := newAdvRegistryServer(t, map[string]string{secretEnv("distribution"): "", secretEnv("dockerhub"): " "},
		map[string]string{"dist": "reg.example:5000/e2e/app"})
	body := distEnvelope(distEvent("s-1", "push", manifestV2, "e2e/app", "latest", "reg.example:5000"))
	runAdvCases(t, s, []advCase{
		{name: "distribution with a bearer token", target: "/registry/distribution/dist", header: [][2]string{{"Authorization", "Bearer " + advRegistryToken}},
			body: body, status: 500, text: "server misconfigured", action: "registry-webhook", reason: "secret-unset"},
		{name: "distribution with an empty bearer token", target: "/registry/distribution/dist", header: [][2]string{{"Authorization", "Bearer "}}, body: body, status: 500, reason: "secret-unset"},
		{name: "dockerhub with a blank secret", target: "/registry/dockerhub/dist/%20", body: loadPayload(t, "dockerhub-push.json"), status: 500, reason: "secret-unset"},
		{name: "harbor still works", target: "/registry/harbor/dist", header: [][2]string{{"Authorization", "Bearer " + advRegistryToken}},
			body: loadPayload(t, "harbor-push-artifact.json"), status: 202, reason: "host-mismatch", calls: []string{"systemctl-show"}},
	})
}

// slowServer serves s's handler with cmdServer's http.Server settings but 1 s read timeouts.
func slowServer(t *testing.T, s *advServer) (addr string, stop func()) {
	t.Helper()
	cfg := *s.cfg
	cfg.readHeaderTimeout, cfg.readTimeout = time.Second, time.Second
	hs := newHTTPServer(&cfg, s.srv, s.srv.log)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go hs.Serve(l)
	t.Cleanup(func() { hs.Close() })
	return l.Addr().String(), func() { hs.Close() }
}

// trickle writes head, then one byte of more every 100 ms until the connection fails or stop is
// closed. It reports how many bytes of more it wrote.
func trickle(c net.Conn, head, more string, stop <-chan struct{}) <-chan int {
	wrote := make(chan int, 1)
	go func() {
		n := 0
		defer func() { wrote <- n }()
		if _, err := io.WriteString(c, head); err != nil {
			return
		}
		for i := 0; i < len(more); i++ {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			if _, err := c.Write([]byte{more[i]}); err != nil {
				return
			}
			n++
		}
	}()
	return wrote
}

// waitClosed reads from c until the server closes it, failing the test after hangGuard: a
// server without read timeouts keeps a trickling client forever. It returns what was read.
func waitClosed(t *testing.T, c net.Conn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(hangGuard))
	got, err := io.ReadAll(c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the slow connection was still open after %s", hangGuard)
	}
	return string(got)
}

// TestSlowClients: a client that trickles its headers (slowloris) or its body is cut off at the
// server's read timeouts while another client is served meanwhile. A trickled body reaches the
// handler, which answers 400 and leaves a row; trickled headers never become a request, so
// net/http closes the connection without an answer and there is no row to write.
func TestSlowClients(t *testing.T) {
	s := newAdvServer(t, nil)
	addr, stop := slowServer(t, s)
	body := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
	cases := []struct {
		name, head, more string
		status           int // 0: no answer at all
	}{
		{"slowloris headers", "POST " + advUnitPath + " HTTP/1.1\r\nHost: test\r\n", strings.Repeat("X-Slow: 1\r\n", 100), 0},
		{"trickled body", fmt.Sprintf("POST %s HTTP/1.1\r\nHost: test\r\nX-GitHub-Event: package\r\nX-GitHub-Delivery: slow-1\r\n"+
			"X-Hub-Signature-256: %s\r\nContent-Length: %d\r\n\r\n", advUnitPath, hubSignature(advSecret, body), len(body)), string(body), 400},
	}
	var ids []string
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			done := make(chan struct{})
			wrote := trickle(c, tc.head, tc.more, done)
			// Another client is served while the slow one holds its connection.
			resp, text, err := rawExchange(addr, "GET", "/health", nil, nil, false)
			if err != nil || resp.StatusCode != 200 || text != "ok" {
				t.Fatalf("another client during the slow one: %v %v %q", resp, err, text)
			}
			got := waitClosed(t, c)
			close(done)
			if n := <-wrote; n >= len(tc.more) {
				t.Fatalf("the whole request was sent (%d bytes): the close proves nothing", n)
			}
			if tc.status == 0 {
				if got != "" {
					t.Errorf("slow headers got an answer: %q", got)
				}
				return
			}
			resp, err = http.ReadResponse(bufio.NewReader(strings.NewReader(got)), nil)
			if err != nil || resp.StatusCode != tc.status {
				t.Fatalf("answer to the slow client %q (%v), want status %d", got, err, tc.status)
			}
			ids = append(ids, resp.Header.Get("X-Request-Id"))
		})
	}
	stop()
	rows := s.rows(t)
	for _, id := range ids {
		if r, ok := rows[id]; !ok || r.status != 400 || !strings.Contains(r.meta, "body-unreadable") {
			t.Errorf("row of the trickled body: %+v (found %v), want status 400 body-unreadable", r, ok)
		}
	}
	if calls := s.h.calls(); len(calls) != 0 {
		t.Errorf("slow clients ran commands:\n%s", fakeCallLines(calls))
	}
	if n := len(rows); n != 1+len(ids) || probeCount(t, rows) != 2 {
		t.Errorf("%d rows counting %d probes, want %d (the summary of two /health probes and the trickled body)", n, probeCount(t, rows), 1+len(ids))
	}
}

// TestSlowlorisBinary checks that cmdServer itself sets the header timeout: the built server
// closes a connection whose headers never end (after its 10 s ReadHeaderTimeout) while it keeps
// answering others.
func TestSlowlorisBinary(t *testing.T) {
	bin := buildServerBinary(t)
	addr := freeLoopbackAddr(t)
	p := startServerProc(t, bin, []string{"--listen", addr, "--state-dir", t.TempDir()}, nil, nil)
	p.waitLog(t, "listening on")
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	done := make(chan struct{})
	defer close(done)
	wrote := trickle(c, "GET /health HTTP/1.1\r\nHost: test\r\n", strings.Repeat("X-Slow: 1\r\n", 1000), done)
	if resp, _, err := rawExchange(addr, "GET", "/health", nil, nil, false); err != nil || resp.StatusCode != 200 {
		t.Fatalf("another client during the slowloris: %v %v", resp, err)
	}
	if got := waitClosed(t, c); got != "" {
		t.Errorf("slow headers got an answer: %q", got)
	}
	if n := <-wrote; n >= 11000 {
		t.Fatal("the headers were all sent")
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := p.wait(); err != nil {
		t.Fatalf("server exit: %v\n%s", err, p.stderr())
	}
}

// Faults of the event log under a running server.

// signedDelivery sends a signed package delivery through the test server's client and returns
// the response and its text.
func (s *advServer) signedDelivery(t *testing.T, unit, delivery string, body []byte) (*http.Response, string) {
	t.Helper()
	resp, text, err := s.postDelivery(unit, delivery, body)
	if err != nil {
		t.Fatalf("delivery %s: %v", delivery, err)
	}
	return resp, text
}

// postDelivery sends a signed package delivery and returns the response (its body read and
// closed) and its text. It may run outside the test's goroutine.
func (s *advServer) postDelivery(unit, delivery string, body []byte) (*http.Response, string, error) {
	return s.postDeliveryCtx(context.Background(), unit, delivery, body)
}

// postDeliveryCtx is postDelivery with a context that can hang up on the server.
func (s *advServer) postDeliveryCtx(ctx context.Context, unit, delivery string, body []byte) (*http.Response, string, error) {
	req, _ := http.NewRequestWithContext(ctx, "POST", s.URL+"/github-package-update/"+unit, bytes.NewReader(body))
	req.Header.Set("X-Hub-Signature-256", hubSignature(advSecret, body))
	req.Header.Set("X-GitHub-Event", "package")
	req.Header.Set("X-GitHub-Delivery", delivery)
	resp, err := s.Client().Do(req)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, strings.TrimSpace(string(b)), nil
}

// TestFaultDatabaseLocked: another process holds the database's write lock for 3 s. A delivery
// that arrives meanwhile waits for it (the busy timeout is 10 s), is then recorded and answered
// 202; no row is lost or spilled.
func TestFaultDatabaseLocked(t *testing.T) {
	s := newAdvServer(t, nil)
	body := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
	ctx := context.Background()
	conn, err := rawDB(t, s.cfg.dbPath).Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
		t.Fatal(err)
	}
	var released atomic.Bool
	go func() {
		time.Sleep(3 * time.Second)
		released.Store(true) // before the lock goes: a write that finishes has waited for it
		conn.ExecContext(ctx, "ROLLBACK")
	}()
	health, _ := s.getHello(t)
	resp, text := s.signedDelivery(t, "web", "locked-1", body)
	if resp.StatusCode != 202 || text != "auto-update queued" {
		t.Fatalf("delivery while the database is locked: %d %q, want 202 auto-update queued\nlog:\n%s", resp.StatusCode, text, s.logs)
	}
	if !released.Load() {
		t.Fatal("the delivery was answered while another writer held the lock: its record cannot be committed")
	}
	id := resp.Header.Get("X-Request-Id")
	s.drain(t)
	rows := s.rows(t)
	if r, ok := rows[id]; !ok || r.status != 202 {
		t.Errorf("row of the delivery: %+v %v", r, ok)
	}
	if _, ok := rows[health]; !ok {
		t.Errorf("no row for the /sse/hello answered during the lock")
	}
	db := rawDB(t, s.cfg.dbPath)
	if n := queryInt(t, db, `SELECT count(*) FROM github_deliveries WHERE delivery_id = 'locked-1' AND status = 'dispatched'`); n != 1 {
		t.Errorf("github_deliveries has %d dispatched rows for locked-1, want 1", n)
	}
	if strings.Contains(s.logs.String(), "unwritten event") {
		t.Errorf("rows were spilled:\n%s", s.logs)
	}
	if n := len(s.h.callsOf(keySystemdRun)); n != 1 {
		t.Errorf("%d dispatches, want 1", n)
	}
}

// getHello asks for /sse/hello, a request that has a row of its own, and returns its request
// id and status.
func (s *advServer) getHello(t *testing.T) (string, int) {
	t.Helper()
	resp, err := s.Client().Get(s.URL + "/sse/hello")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("/sse/hello = %d", resp.StatusCode)
	}
	return resp.Header.Get("X-Request-Id"), resp.StatusCode
}

// TestFaultDatabaseUnwritable puts the database on a small tmpfs and fills it after the server
// started: every request is still answered (a delivery that cannot be recorded is 500, so GitHub
// shows it failed and it can be redelivered), every row that cannot be written is on stderr as
// a JSON line, /health fails naming the database, and once space is back rows are written and
// /health is fine again. (A read-only directory cannot
// stand in: root ignores file modes, and SQLite keeps writing through its open files.)
func TestFaultDatabaseUnwritable(t *testing.T) {
	if os.Geteuid() != 0 {
		rigSkipOrFail(t, "mounting a tmpfs needs root")
	}
	state := t.TempDir()
	mnt := filepath.Join(state, "data")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", mnt, "tmpfs", 0, "size=2m,mode=0700"); err != nil {
		rigSkipOrFail(t, "cannot mount a tmpfs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })
	s := newAdvServer(t, map[string]string{"WEBHOOK_STATE_DIR": state})
	s.cfg.stateDir = state
	s.cfg.diskReserve = 0 // writes that fail, not the free-space reserve (TestDiskReserve)
	if _, code := s.getHello(t); code != 200 {
		t.Fatal("no /health before the fault")
	}
	waitPending(t, s.events)

	filler, err := os.Create(filepath.Join(mnt, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 64<<10)
	for {
		if _, err := filler.Write(chunk); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	filler.Close()

	// waitHealth polls /health until ok accepts its answer.
	waitHealth := func(t *testing.T, what string, ok func(code int, body string) bool) {
		t.Helper()
		for deadline := time.Now().Add(hangGuard); ; time.Sleep(200 * time.Millisecond) {
			resp, err := s.Client().Get(s.URL + "/health")
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if ok(resp.StatusCode, string(b)) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting until %s: /health = %d %q", what, resp.StatusCode, b)
			}
		}
	}

	t.Run("every request is answered, and spilled when it cannot be written", func(t *testing.T) {
		body := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
		var ids []string
		for _, c := range []struct {
			name   string
			do     func() *http.Response
			status int
		}{
			{"hello", func() *http.Response { r, _ := s.Client().Get(s.URL + "/sse/hello"); return r }, 200},
			{"not found", func() *http.Response { r, _ := s.Client().Get(s.URL + "/nope?token=" + advToken); return r }, 404},
			{"bad signature", func() *http.Response {
				r, _ := s.Client().Post(s.URL+advUnitPath, "application/json", bytes.NewReader(body))
				return r
			}, 401},
			{"delivery", func() *http.Response { r, _ := s.signedDelivery(t, "web", "full-1", body); return r }, 500},
		} {
			resp := c.do()
			if resp == nil {
				t.Fatalf("%s: no answer while the database is unwritable", c.name)
			}
			resp.Body.Close()
			if resp.StatusCode != c.status {
				t.Errorf("%s: %d, want %d", c.name, resp.StatusCode, c.status)
			}
			ids = append(ids, resp.Header.Get("X-Request-Id"))
		}
		waitPending(t, s.events)
		spilt := map[string]bool{}
		for _, e := range spilled(t, s.logs.String()) {
			spilt[fmt.Sprint(e["request_id"])] = true
		}
		for _, id := range ids {
			if !spilt[id] {
				t.Errorf("request %s was neither written nor spilled to stderr; log:\n%s", id, s.logs)
			}
		}
		if n := len(s.h.callsOf(keySystemdRun)); n != 0 {
			t.Errorf("a delivery that could not be recorded was dispatched %d times", n)
		}
		if strings.Contains(s.logs.String(), advToken) {
			t.Errorf("a spilled row carries the token:\n%s", s.logs)
		}
	})

	// /health says so (within the second its answer is kept), naming the database. Polled
	// slowly: every request writes a row, and the tmpfs has room for few.
	t.Run("health fails naming the database", func(t *testing.T) {
		waitHealth(t, "plain /health fails naming the database while rows cannot be written", func(code int, body string) bool {
			return code == 503 && body == "fail: database\n"
		})
	})

	// Space again: the next request is written, and /health is fine again.
	t.Run("rows are written again once space is back", func(t *testing.T) {
		if err := os.Remove(filepath.Join(mnt, "filler")); err != nil {
			t.Fatal(err)
		}
		waitHealth(t, "plain /health answers 200 once rows are written again", func(code int, _ string) bool { return code == 200 })
		after, _ := s.getHello(t)
		rows := s.rows(t)
		if _, ok := rows[after]; !ok {
			t.Errorf("the event log did not recover once space was back; log:\n%s", s.logs)
		}
	})
}
