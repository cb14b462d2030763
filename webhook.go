// webhook.go owns the HTTP surface of `webhook-auto-update server`: the listeners, the routing,
// the GitHub delivery route, the static web UI, the observability routes and the per-request
// event row. The manual-trigger handlers live with the other triggers in scheduler.go.
//
// Rules: every request, including 404s, 405s and refused bodies, produces exactly one event_log
// row, written by the middleware in ServeHTTP unless a handler committed it itself. Query strings
// are redacted before they are logged or stored. Bodies are capped (WEBHOOK_MAX_BODY_BYTES → 413).
// No path containing a ".." segment, however encoded, reaches a handler, and static files are
// opened through os.Root so nothing outside the web dist directory can be served.
package main

import (
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log"
	"mime"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path"
	"regexp"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const usageServer = `usage: webhook-auto-update server [--listen ADDR] [--state-dir DIR] [--db URL]

Serves GitHub package webhooks, the manual API and the web UI. Under systemd socket activation
it serves the passed sockets; otherwise it listens on --listen (default 127.0.0.1:8088).
`

func cmdServer(c *cli, args []string) int {
	cfg, rest, code := c.setup("server", usageServer, args, func(fs *flag.FlagSet, cfg *config) {
		fs.StringVar(&cfg.listen, "listen", cfg.listen, "")
	})
	if code >= 0 {
		return code
	}
	if len(rest) > 0 {
		c.log.errorf("server: unexpected argument %q", rest[0])
		fmt.Fprint(c.stderr, usageServer)
		return 2
	}
	if err := ensureStateDir(cfg.stateDir); err != nil {
		c.log.errorf("%v", err)
		return 1
	}
	events, err := openEventLog(cfg.dbPath, c.log)
	if err != nil {
		c.log.errorf("cannot start: %v", err)
		return 1
	}
	defer events.Close()
	if n, err := events.releaseStaleClaims(context.Background()); err != nil {
		c.log.warnf("cannot release deliveries left dispatching: %v", err)
	} else if n > 0 {
		c.log.warnf("%d deliveries were left dispatching by a server that stopped: a redelivery will run them", n)
	}

	listeners, err := activationListeners(c.getenv)
	if err != nil {
		c.log.errorf("cannot start: %v", err)
		return 1
	}
	if len(listeners) == 0 {
		l, err := net.Listen("tcp", cfg.listen)
		if err != nil {
			c.log.errorf("cannot listen on %s: %v (set --listen to a free address)", cfg.listen, err)
			return 1
		}
		listeners = append(listeners, l)
	}
	sd, err := newNotifier(c.getenv)
	if err != nil {
		c.log.warnf("%v", err)
	}
	defer sd.Close()
	if cfg.secret == "" {
		c.log.warnf("GITHUB_WEBHOOK_SECRET is not set: every GitHub delivery will be refused with 500")
	}

	srv := newServer(cfg, c.log, events)
	hs := &http.Server{
		Handler:           srv,
		ReadHeaderTimeout: cfg.readHeaderTimeout,
		ReadTimeout:       cfg.readTimeout,
		WriteTimeout:      cfg.writeTimeout,
		IdleTimeout:       cfg.idleTimeout,
		ErrorLog:          log.New(c.log, "", 0),
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	serveErr := make(chan error, len(listeners))
	for _, l := range listeners {
		c.log.infof("listening on %s", l.Addr())
		go func(l net.Listener) { serveErr <- hs.Serve(l) }(l)
	}
	if err := sd.notify("READY=1"); err != nil {
		c.log.warnf("readiness notification failed: %v", err)
	}
	go sd.runWatchdog(ctx, c.log)

	status := 0
	select {
	case <-ctx.Done():
		c.log.infof("shutting down")
	case err := <-serveErr:
		c.log.errorf("server stopped: %v", err)
		status = 1
	}
	sd.notify("STOPPING=1")
	sctx, cancel := context.WithTimeout(context.Background(), cfg.shutdownTimeout)
	defer cancel()
	if err := hs.Shutdown(sctx); err != nil {
		// A handler may be waiting for systemctl (bounded by the command timeout): its unit
		// was started or restarted, and its row must not be lost, so wait for it, bounded too.
		c.log.warnf("in-flight requests did not finish within %s: waiting up to %s more", cfg.shutdownTimeout, cfg.commandTimeout+10*time.Second)
		done := make(chan struct{})
		go func() { srv.inflight.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(cfg.commandTimeout + 10*time.Second):
			c.log.errorf("requests still in flight at exit: their rows are lost")
		}
	}
	if err := events.Close(); err != nil {
		c.log.warnf("closing the event log: %v", err)
	}
	return status
}

// server is the HTTP handler: a ServeMux for routing (it answers 404 and 405 with Allow) wrapped
// by ServeHTTP for the cross-cutting rules.
type server struct {
	cfg     *config
	log     *logger
	events  *eventLog
	metrics *metrics
	mux     *http.ServeMux
	now     func() time.Time

	inflight sync.WaitGroup // handlers running, waited for at shutdown
	work     chan struct{}  // deliveries doing their commands and writes now (see admit)
	shows    sharedShows    // concurrent deliveries for one unit share its systemctl show
	batches  batches        // deliveries waiting for a slot, by what their task would do
	handling handling       // the delivery ids being handled, so a copy waits for the first

	// Process boundaries, swapped in tests.
	getenv  func(string) string
	environ func() []string
	exe     string // this binary, run by systemd-run as run-task
	exec    func(ctx context.Context, timeout time.Duration, argv ...string) cmdResult
}

func newServer(cfg *config, lg *logger, events *eventLog) *server {
	s := &server{cfg: cfg, log: lg, events: events, metrics: newMetrics(time.Now()), mux: http.NewServeMux(), now: time.Now,
		getenv: os.Getenv, environ: os.Environ, exec: runCommand, work: make(chan struct{}, deliverySlots())}
	s.exe, _ = os.Executable()
	s.mux.HandleFunc("POST /github-package-update/{unit}", s.handleGitHub)
	s.mux.HandleFunc("POST /github-package-update/{unit}/redeploy", s.handleGitHub)
	s.mux.HandleFunc("GET /health", s.handleHealth)
	s.mux.HandleFunc("GET /sse/hello", s.handleHello)
	s.mux.HandleFunc("GET /metrics", s.handleMetrics)
	s.mux.HandleFunc("GET /api/events", s.handleEvents)
	s.mux.HandleFunc("GET /api/deliveries/{id}", s.handleDelivery)
	s.mux.HandleFunc("GET /auto-update", s.handleAutoUpdate)
	s.mux.HandleFunc("POST /auto-update", s.handleAutoUpdate)
	s.mux.HandleFunc("POST /api/manual/trigger", s.handleManualTrigger)
	s.mux.HandleFunc("POST /api/manual/services/{name}", s.handleManualService)
	for _, p := range []string{"/{$}", "/index.html", "/assets/", "/favicon.ico", "/vite.svg"} {
		s.mux.HandleFunc("GET "+p, s.handleStatic)
	}
	return s
}

// requestInfo travels with a request so handlers can name the action and add to the row's meta.
type requestInfo struct {
	id       string
	action   string
	meta     map[string]any
	recorded bool // the handler committed the row itself
}

type requestInfoKey struct{}

func info(r *http.Request) *requestInfo {
	if ri, ok := r.Context().Value(requestInfoKey{}).(*requestInfo); ok {
		return ri
	}
	return &requestInfo{meta: map[string]any{}}
}

// statusWriter remembers the status code for the event row.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.inflight.Add(1)
	defer s.inflight.Done()
	start := s.now()
	ri := &requestInfo{id: newRequestID(), meta: map[string]any{}}
	sw := &statusWriter{ResponseWriter: w}
	sw.Header().Set("X-Request-Id", ri.id)
	r = r.WithContext(context.WithValue(r.Context(), requestInfoKey{}, ri))
	r.Body = http.MaxBytesReader(sw, r.Body, s.cfg.maxBodyBytes)
	// The row is written whatever happens, a panicking handler included (answered 500 here).
	defer func() {
		if p := recover(); p != nil {
			if p == http.ErrAbortHandler {
				panic(p)
			}
			s.log.errorf("panic serving %s %s: %v\n%s", r.Method, r.URL.Path, p, debug.Stack())
			ri.meta["panic"] = fmt.Sprint(p)
			if sw.status == 0 {
				http.Error(sw, "internal error", http.StatusInternalServerError)
			}
			s.finish(r, ri, sw.status, start)
		}
	}()

	switch {
	case hasDotDot(r.URL.Path):
		ri.action = "not-found"
		http.Error(sw, "not found", http.StatusNotFound)
	case r.ContentLength > s.cfg.maxBodyBytes:
		ri.action = "body-too-large"
		http.Error(sw, "request body too large", http.StatusRequestEntityTooLarge)
	default:
		s.mux.ServeHTTP(sw, r)
	}
	if sw.status == 0 {
		sw.status = http.StatusOK
	}
	s.finish(r, ri, sw.status, start)
}

// finish counts an answered request and records its row, unless the handler committed it.
func (s *server) finish(r *http.Request, ri *requestInfo, status int, start time.Time) {
	action := ri.action
	if action == "" {
		action = defaultAction(r.Pattern, status)
	}
	s.metrics.observe(r.Pattern, status, action, ri.meta["reason"])
	if ri.recorded {
		return
	}
	s.events.Record(s.requestEvent(r, ri, status, s.now().Sub(start)))
}

// requestEvent builds the event_log row of a request.
func (s *server) requestEvent(r *http.Request, ri *requestInfo, status int, d time.Duration) event {
	action := ri.action
	if action == "" {
		action = defaultAction(r.Pattern, status)
	}
	meta := ri.meta
	meta["path"] = r.URL.Path
	if q := redactQuery(r.URL.RawQuery); q != "" {
		meta["query"] = q
	}
	if r.RemoteAddr != "" {
		meta["remote_addr"] = r.RemoteAddr
	}
	return event{RequestID: ri.id, TS: s.now(), Method: r.Method, Path: r.URL.Path, Status: status,
		Action: action, Duration: d, Meta: meta}
}

// defaultAction names a request's action from its route when the handler did not.
func defaultAction(pattern string, status int) string {
	switch {
	case status == http.StatusNotFound && pattern == "":
		return "not-found"
	case status == http.StatusMethodNotAllowed && pattern == "":
		return "method-not-allowed"
	}
	switch pattern {
	case "GET /health":
		return "health"
	case "GET /sse/hello":
		return "sse-hello"
	case "":
		return "http"
	}
	return "static"
}

// hasDotDot reports whether a decoded URL path has a ".." segment; "%2e%2e" is already decoded.
func hasDotDot(p string) bool {
	for _, seg := range strings.FieldsFunc(p, func(r rune) bool { return r == '/' || r == '\\' }) {
		if seg == ".." {
			return true
		}
	}
	return false
}

// handleHello sends one server-sent event, as the original tool's UI expects.
func (s *server) handleHello(w http.ResponseWriter, r *http.Request) {
	data, _ := json.Marshal(map[string]any{
		"message":   "hello from webhook-auto-update",
		"timestamp": s.now().Unix(),
	})
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	fmt.Fprintf(w, "event: hello\ndata: %s\n\n", data)
}

// staticTypes fixes the content types the UI bundle needs, independent of /etc/mime.types.
var staticTypes = map[string]string{
	".html":  "text/html; charset=utf-8",
	".js":    "text/javascript; charset=utf-8",
	".mjs":   "text/javascript; charset=utf-8",
	".css":   "text/css; charset=utf-8",
	".json":  "application/json",
	".map":   "application/json",
	".svg":   "image/svg+xml",
	".ico":   "image/x-icon",
	".png":   "image/png",
	".jpg":   "image/jpeg",
	".webp":  "image/webp",
	".woff":  "font/woff",
	".woff2": "font/woff2",
	".txt":   "text/plain; charset=utf-8",
}

// handleStatic serves the web UI bundle. os.Root refuses any name, symlinks included, that
// resolves outside the dist directory.
func (s *server) handleStatic(w http.ResponseWriter, r *http.Request) {
	name := strings.TrimPrefix(r.URL.Path, "/")
	if name == "" {
		name = "index.html"
	}
	root, err := os.OpenRoot(s.cfg.webDist)
	if err != nil {
		if name == "index.html" {
			http.Error(w, "web ui not built", http.StatusNotFound)
			return
		}
		http.NotFound(w, r)
		return
	}
	defer root.Close()
	f, err := root.Open(name)
	if err != nil {
		if name == "index.html" && errors.Is(err, fs.ErrNotExist) {
			http.Error(w, "web ui not built", http.StatusNotFound)
			return
		}
		http.NotFound(w, r)
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		http.NotFound(w, r)
		return
	}
	ext := strings.ToLower(path.Ext(name))
	ctype := staticTypes[ext]
	if ctype == "" {
		ctype = mime.TypeByExtension(ext)
	}
	if ctype != "" {
		w.Header().Set("Content-Type", ctype)
	}
	w.Header().Set("X-Content-Type-Options", "nosniff")
	http.ServeContent(w, r, name, st.ModTime(), f)
}

// verifySignature checks GitHub's X-Hub-Signature-256 header ("sha256=" and the hex HMAC-SHA256
// of the raw body under the webhook secret) in constant time. The error says what was wrong with
// the header, never what the signature should have been.
func verifySignature(secret string, body []byte, header string) error {
	header = strings.TrimSpace(header)
	if header == "" {
		return errors.New("missing X-Hub-Signature-256 header")
	}
	hexSig, ok := strings.CutPrefix(header, "sha256=")
	if !ok {
		return errors.New("X-Hub-Signature-256 is not a sha256= signature")
	}
	got, err := hex.DecodeString(hexSig)
	if err != nil || len(got) != sha256.Size {
		return errors.New("X-Hub-Signature-256 is not 64 hex digits")
	}
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write(body)
	if !hmac.Equal(got, mac.Sum(nil)) {
		return errors.New("signature does not match the body")
	}
	return nil
}

// reDeliveryID accepts GitHub's delivery ids (GUIDs) and other plain ids. It admits only what
// taskUnitName keeps as it is (no replacement, no truncation), so two ids never share a task unit.
var reDeliveryID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$`)

// reEventName accepts X-GitHub-Event values (package, registry_package, ping, …).
var reEventName = regexp.MustCompile(`^[a-z][a-z_]{0,63}$`)

// debugPayloadCap bounds the dump of a body whose signature failed.
const debugPayloadCap = 1 << 20

// reply answers with a plain-text body and notes the reason in the event row.
func reply(w http.ResponseWriter, r *http.Request, status int, reason, text string) {
	if reason != "" {
		info(r).meta["reason"] = reason
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	fmt.Fprintln(w, text)
}

// handleGitHub receives a GitHub package delivery for the unit in the path. The checks run in
// SPEC.md's order and the request path never pulls or restarts: GitHub gives up after 10 s, so
// the redeploy is handed to a transient systemd unit (run-task).
func (s *server) handleGitHub(w http.ResponseWriter, r *http.Request) {
	ri := info(r)
	ri.action = "github-webhook"
	if s.cfg.secret == "" {
		s.log.errorf("github delivery refused: GITHUB_WEBHOOK_SECRET is not set")
		reply(w, r, http.StatusInternalServerError, "secret-unset", "server misconfigured")
		return
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			reply(w, r, http.StatusRequestEntityTooLarge, "body-too-large", "request body too large")
			return
		}
		reply(w, r, http.StatusBadRequest, "body-unreadable", "cannot read request body")
		return
	}
	if err := verifySignature(s.cfg.secret, body, r.Header.Get("X-Hub-Signature-256")); err != nil {
		sum := sha256.Sum256(body)
		ri.meta["body_bytes"] = len(body)
		ri.meta["body_sha256"] = hex.EncodeToString(sum[:])
		saved := min(len(body), debugPayloadCap)
		if werr := writeFileAtomic(s.cfg.debugPayloadPath, body[:saved], 0o600); werr != nil {
			s.log.warnf("cannot save the refused payload to %s: %v", s.cfg.debugPayloadPath, werr)
		}
		s.log.warnf("github delivery for %s refused: %v (body %d bytes, sha256 %x, saved to %s)",
			r.URL.Path, err, len(body), sum, s.cfg.debugPayloadPath)
		reply(w, r, http.StatusUnauthorized, "bad-signature", "invalid signature")
		return
	}

	eventName := r.Header.Get("X-GitHub-Event")
	ri.meta["event"] = eventName
	if !reEventName.MatchString(eventName) {
		reply(w, r, http.StatusBadRequest, "bad-event-header", "missing or invalid X-GitHub-Event header")
		return
	}
	deliveryID := r.Header.Get("X-GitHub-Delivery")
	if deliveryID == "" {
		deliveryID = "req-" + ri.id // no id to de-duplicate on: this request stands alone
	}
	ri.meta["delivery"] = deliveryID
	if !reDeliveryID.MatchString(deliveryID) {
		ri.meta["delivery"] = "(invalid)"
		reply(w, r, http.StatusBadRequest, "bad-delivery-header", "invalid X-GitHub-Delivery header")
		return
	}
	if len(s.cfg.allowedEvents) > 0 && !slices.Contains(s.cfg.allowedEvents, eventName) {
		reply(w, r, http.StatusAccepted, "event-not-allowed", "event ignored")
		return
	}
	if eventName == "ping" {
		ri.action = "github-ping"
		reply(w, r, http.StatusOK, "", "pong")
		return
	}
	unit, err := resolveUnit(r.PathValue("unit"))
	if err != nil {
		reply(w, r, http.StatusBadRequest, "invalid-unit", err.Error())
		return
	}
	ri.meta["unit"] = unit

	d, err := deliveryFromPayload(body)
	var ign *ignoredError
	if errors.As(err, &ign) {
		reply(w, r, http.StatusAccepted, ign.reason, "ignored: "+ign.Error())
		return
	}
	if err != nil {
		reply(w, r, http.StatusBadRequest, "invalid-image", err.Error())
		return
	}
	ri.meta["pushed"] = d.repo()
	ri.meta["tags"] = d.tags
	if d.digest != "" {
		ri.meta["digest"] = d.digest
	}

	// GitHub waits 10 s at most: the rest of the request shares one budget below that, and no
	// single command may take more than requestCommandTimeout of it.
	ctx, cancel := context.WithTimeout(r.Context(), requestBudget)
	defer cancel()
	mctx, mcancel := context.WithTimeout(ctx, requestCommandTimeout)
	ref, status, reason, text := s.matchUnitImage(mctx, unit, d)
	mcancel()
	if status != 0 {
		reply(w, r, status, reason, text)
		return
	}
	image := ref.String()
	ri.meta["image"] = image

	lim, err := imageLimiter(s.cfg, image).check(ctx)
	if err != nil {
		s.log.errorf("per-image limit for %s: %v", image, err)
		reply(w, r, http.StatusInternalServerError, "limit-error", "cannot read the per-image limit")
		return
	}
	if !lim.allowed {
		w.Header().Set("Retry-After", strconv.Itoa(int(lim.retryAfter/time.Second)))
		reply(w, r, http.StatusTooManyRequests, "image-rate-limited", "too many redeploys of "+image)
		return
	}
	s.dispatchDelivery(ctx, w, r, taskSpec{unit: unit, image: image, event: eventName, delivery: deliveryID,
		path: r.URL.Path, digest: d.digest})
}

// dispatchReserve is the part of requestBudget a delivery keeps for its systemd-run and settle:
// it waits for a slot (see admit) only while more than this is left.
const dispatchReserve = time.Second

// deliverySlots is how many deliveries dispatch at once: enough to keep the CPUs busy while
// systemd-run waits on systemd, few enough that the process stays responsive.
func deliverySlots() int { return max(4, 4*runtime.GOMAXPROCS(0)) }

// admit waits for a dispatch slot while more than dispatchReserve of ctx's budget is left. A
// burst beyond the slots queues in arrival order: on a 2-CPU host, 200 deliveries starting their
// processes at once all shared the CPU and all finished late, some past the budget; queued, the
// early ones are answered at once and the late ones still in time. It returns the slot's
// release, or nil with the time waited when no slot came free: the delivery's batch is then
// refused, its claims settled "busy", which a redelivery takes over.
func (s *server) admit(ctx context.Context) (release func(), waited time.Duration) {
	start := time.Now()
	release = func() {
		s.metrics.dispatching.Add(-1)
		<-s.work
	}
	select {
	case s.work <- struct{}{}:
		s.metrics.dispatching.Add(1)
		return release, 0
	default:
	}
	wait := dispatchReserve // no deadline: wait as long as one dispatch may take
	if dl, ok := ctx.Deadline(); ok {
		wait = time.Until(dl) - dispatchReserve
	}
	t := time.NewTimer(max(wait, 0))
	defer t.Stop()
	s.metrics.waiting.Add(1)
	defer s.metrics.waiting.Add(-1)
	select {
	case s.work <- struct{}{}:
		s.metrics.dispatching.Add(1)
		return release, time.Since(start)
	case <-t.C:
	case <-ctx.Done():
	}
	return nil, time.Since(start)
}

// matchUnitImage picks the reference to pull. When the unit's Quadlet file names an Image=, the
// delivery must be for the same registry host and repository and carry its tag; otherwise the
// first pushed tag is used. A non-zero status is the answer to send instead.
func (s *server) matchUnitImage(ctx context.Context, unit string, d delivery) (imageRef, int, string, string) {
	configured, source, err := configuredImage(ctx, &s.shows, s.cfg, s.getenv, unit)
	if errors.Is(err, errUnitNotFound) {
		return imageRef{}, http.StatusNotFound, "unit-not-found", "unit " + unit + " not found"
	}
	if err != nil {
		s.log.errorf("cannot read the definition of %s: %v", unit, err)
		return imageRef{}, http.StatusInternalServerError, "unit-unreadable", "cannot read the unit definition"
	}
	if configured == "" {
		return d.ref(d.tags[0]), 0, "", ""
	}
	want, err := parseImageRef(withDefaultTag(configured))
	if err != nil {
		// Not a "tag mismatch": nothing this unit names could ever match, and the operator must
		// see that in GitHub's delivery log, not find a 202.
		s.log.errorf("%s names an image this program cannot match (%v): refusing the delivery", source, err)
		return imageRef{}, http.StatusInternalServerError, "unit-image-unreadable",
			"the unit's Image= is not a full image reference (registry/owner/name[:tag])"
	}
	if want.host != d.host || want.path != d.path || !slices.Contains(d.tags, want.tag) {
		return imageRef{}, http.StatusAccepted, "tag-mismatch", "tag mismatch: the unit runs " + want.String()
	}
	return d.ref(want.tag), 0, "", ""
}

// dispatchDelivery claims the delivery id, has a task dispatched for it (its own, or the one of
// the delivery it joins: see dispatchBatch), and answers only after the delivery's record and
// the request's row are committed. A second copy of a delivery this process is still handling
// waits for the first to end and then goes through the claim as a redelivery would: answered
// "duplicate" when the first was queued, taking it over when the first was refused.
func (s *server) dispatchDelivery(ctx context.Context, w http.ResponseWriter, r *http.Request, spec taskSpec) {
	ri := info(r)
	start := s.now()
	handled, ok := s.handling.hold(ctx, spec.delivery)
	if !ok {
		w.Header().Set("Retry-After", "10")
		reply(w, r, http.StatusServiceUnavailable, "busy", "a copy of this delivery is still being handled; redeliver it later")
		return
	}
	defer handled()
	ri.meta["reason"] = "dispatching"
	rowID, err := s.events.claimDelivery(ctx, spec.delivery, spec.unit, spec.image, spec.event,
		s.requestEvent(r, ri, http.StatusAccepted, 0))
	if err != nil {
		s.log.errorf("%v", err)
		reply(w, r, http.StatusInternalServerError, "record-failed", "cannot record the delivery")
		return
	}
	if rowID == 0 {
		reply(w, r, http.StatusAccepted, "duplicate", "duplicate delivery")
		return
	}
	// The claim must be settled whatever happens: one left "dispatching" answers redeliveries
	// "duplicate" until it goes stale.
	settled := false
	settle := func(status string, ev event) {
		settled = true
		sctx, scancel := context.WithTimeout(context.WithoutCancel(ctx), 2*busyTimeout)
		defer scancel()
		err := s.events.settleDelivery(sctx, spec.delivery, status, rowID, ev)
		if err != nil { // once more
			err = s.events.settleDelivery(sctx, spec.delivery, status, rowID, ev)
		}
		if err != nil {
			s.log.errorf("cannot record the delivery %s as %s: %v", spec.delivery, status, err)
			s.events.spill([]event{ev}, err)
		}
		ri.recorded = true
	}
	defer func() {
		if settled {
			return
		}
		p := recover() // the handler panicked: ServeHTTP logs it and answers 500
		ri.meta["reason"] = outcomeFailed.settled
		if p != nil {
			ri.meta["panic"] = fmt.Sprint(p)
		}
		settle(outcomeFailed.settled, s.requestEvent(r, ri, http.StatusInternalServerError, s.now().Sub(start)))
		if p != nil {
			panic(p)
		}
	}()

	res := s.dispatchBatch(ctx, spec)
	out := res.out
	if res.waited >= time.Millisecond {
		ri.meta["queued_ms"] = res.waited.Milliseconds()
	}
	if res.carrier != spec.delivery {
		ri.meta["coalesced_into"] = res.carrier
	} else if res.riders > 0 {
		ri.meta["joined"] = res.riders
	}
	ri.meta["reason"] = out.settled
	switch out.settled {
	case "queued":
		ri.meta["task_unit"] = taskUnitName(res.carrier)
		if res.carrier != spec.delivery {
			s.metrics.coalesced.Add(1)
		}
	case "busy":
		w.Header().Set("Retry-After", "10")
		how := ""
		if res.carrier != spec.delivery {
			how = " (it had joined " + res.carrier + ")"
		}
		s.log.warnf("github delivery %s for %s refused: no dispatch slot (of %d) came free in %s%s",
			spec.delivery, spec.unit, cap(s.work), res.waited.Round(time.Millisecond), how)
	default:
		if res.carrier == spec.delivery {
			s.log.errorf("cannot dispatch the redeploy of %s: %v", spec.unit, out.res.err)
		} else {
			s.log.errorf("github delivery %s for %s failed with the task of %s, which it joined", spec.delivery, spec.unit, res.carrier)
		}
		ri.meta["stderr"] = out.res.stderr
		ri.meta["exit_code"] = out.res.exitCode
	}
	// Recorded even past the budget: the task may be running, and the claim must say so.
	settle(out.settled, s.requestEvent(r, ri, out.status, s.now().Sub(start)))
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(out.status)
	fmt.Fprintln(w, out.text)
}

// handling holds the delivery ids this process is handling now (see dispatchDelivery).
type handling struct {
	mu      sync.Mutex
	ids     map[string]chan struct{} // closed when that delivery's handling ends
	waiting atomic.Int64             // copies waiting for the first to end
}

// hold waits until no other request of this process handles id, then marks it handled until
// the returned release is called. It gives up when ctx ends first.
func (h *handling) hold(ctx context.Context, id string) (release func(), ok bool) {
	for {
		h.mu.Lock()
		busy, taken := h.ids[id]
		if !taken {
			if h.ids == nil {
				h.ids = map[string]chan struct{}{}
			}
			done := make(chan struct{})
			h.ids[id] = done
			h.mu.Unlock()
			return func() {
				h.mu.Lock()
				delete(h.ids, id)
				h.mu.Unlock()
				close(done)
			}, true
		}
		h.mu.Unlock()
		h.waiting.Add(1)
		select {
		case <-busy:
			h.waiting.Add(-1)
		case <-ctx.Done():
			h.waiting.Add(-1)
			return nil, false
		}
	}
}

// batchKey is what one task does: redeploy this unit from this image reference, pushed with
// this digest. Deliveries with equal keys may share a task.
type batchKey struct{ unit, image, digest string }

// batch is a delivery waiting for a dispatch slot (the carrier) and the deliveries with its key
// that arrive while it waits (its riders). One task, the carrier's, covers them all: it is
// dispatched after the last of them arrived, and GitHub sends a delivery only once its push is
// done, so the task's pull fetches what each of their pushes put in the registry. Once the
// carrier has a slot the batch closes, before systemd-run starts: a later delivery gets a task
// of its own. A carrier whose budget runs out hands the batch to the rider with the most budget
// left, which waits on; only when none has any left is the batch refused busy. A rider whose
// own budget runs out first leaves the batch and is refused busy on its own.
type batch struct {
	carrier string        // guarded by batches.mu
	riders  []*batchRider // guarded by batches.mu: the deliveries waiting on the carrier
	closed  bool          // guarded by batches.mu: its riders are now the task's
	done    chan struct{} // closed once out is set
	out     batchOutcome  // what every delivery still in the batch gets
}

// batchRider is a delivery waiting on its batch's carrier.
type batchRider struct {
	delivery string
	deadline time.Time     // when it must stop waiting for a slot
	promoted chan struct{} // closed when it becomes the carrier
}

// batchOutcome is the answer every delivery of a batch gets.
type batchOutcome struct {
	status  int
	settled string // the deliveries' status: queued, busy or dispatch-failed
	text    string
	res     cmdResult // systemd-run's result, when it failed
}

var (
	outcomeQueued = batchOutcome{status: http.StatusAccepted, settled: "queued", text: "auto-update queued"}
	outcomeBusy   = batchOutcome{status: http.StatusServiceUnavailable, settled: "busy",
		text: "too many deliveries in progress; redeliver it later"}
	outcomeFailed = batchOutcome{status: http.StatusInternalServerError, settled: "dispatch-failed",
		text: "cannot start the redeploy task"}
)

// batches holds the batches whose carrier is still waiting for a slot.
type batches struct {
	mu   sync.Mutex
	open map[batchKey]*batch
}

// join adds delivery to the open batch for k as a rider, or opens one with delivery as its
// carrier (rider nil).
func (bs *batches) join(k batchKey, delivery string, deadline time.Time) (*batch, *batchRider) {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	if b := bs.open[k]; b != nil {
		r := &batchRider{delivery: delivery, deadline: deadline, promoted: make(chan struct{})}
		b.riders = append(b.riders, r)
		return b, r
	}
	if bs.open == nil {
		bs.open = map[batchKey]*batch{}
	}
	b := &batch{carrier: delivery, done: make(chan struct{}), out: outcomeFailed}
	bs.open[k] = b
	return b, nil
}

// close stops b from taking riders and returns those it has.
func (bs *batches) close(k batchKey, b *batch) []*batchRider {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	if bs.open[k] == b {
		delete(bs.open, k)
	}
	b.closed = true
	return b.riders
}

// leave takes rider r out of b, unless b is closed or r was promoted, and returns b's carrier.
func (bs *batches) leave(b *batch, r *batchRider) (left bool, carrier string) {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	i := slices.Index(b.riders, r)
	if b.closed || i < 0 {
		return false, b.carrier
	}
	b.riders = slices.Delete(b.riders, i, i+1)
	return true, b.carrier
}

// handOff makes the rider of b with the most time left to wait the carrier, when one has more
// than dispatchReserve left, and reports whether it did. When it did not, b is closed in the
// same step, so no delivery joins a batch that is being refused.
func (bs *batches) handOff(k batchKey, b *batch) bool {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	best := -1
	for i, r := range b.riders {
		if time.Until(r.deadline) > dispatchReserve && (best < 0 || r.deadline.After(b.riders[best].deadline)) {
			best = i
		}
	}
	if best < 0 {
		if bs.open[k] == b {
			delete(bs.open, k)
		}
		b.closed = true
		return false
	}
	next := b.riders[best]
	b.riders = slices.Delete(b.riders, best, best+1)
	b.carrier = next.delivery
	close(next.promoted)
	return true
}

// riderCount is how many deliveries wait on another's slot now.
func (bs *batches) riderCount() int {
	bs.mu.Lock()
	defer bs.mu.Unlock()
	n := 0
	for _, b := range bs.open {
		n += len(b.riders)
	}
	return n
}

// batchResult is what dispatchBatch did for one delivery.
type batchResult struct {
	out     batchOutcome
	carrier string        // the delivery whose task covers this one (itself, unless it rode)
	riders  int           // for a carrier whose task started: how many rode on it
	waited  time.Duration // this delivery's wait
}

// dispatchBatch joins spec's delivery to the open batch of its key as a rider, or opens one and,
// as its carrier, waits for a dispatch slot and starts the task. A carrier whose client hangs up
// waits on: its riders depend on it. A batch refused busy, or whose systemd-run failed, is
// answered so as a whole; the deliveries are settled so, and their redeliveries run normally.
func (s *server) dispatchBatch(ctx context.Context, spec taskSpec) batchResult {
	start := time.Now()
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = start.Add(requestBudget)
	}
	key := batchKey{spec.unit, spec.image, spec.digest}
	b, me := s.batches.join(key, spec.delivery, deadline)
	if me != nil {
		// A rider waits as long as it would for a slot of its own: a carrier handed the batch
		// may have a later deadline than this rider.
		t := time.NewTimer(max(time.Until(deadline)-dispatchReserve, 0))
		defer t.Stop()
		select {
		case <-b.done:
			return batchResult{out: b.out, carrier: b.carrier, waited: time.Since(start)}
		case <-me.promoted: // the carrier ran out of time before a slot came free
		case <-t.C:
			if left, carrier := s.batches.leave(b, me); left {
				return batchResult{out: outcomeBusy, carrier: carrier, waited: time.Since(start)}
			}
			select { // too late to leave: the task is being started, or this rider carries
			case <-b.done:
				return batchResult{out: b.out, carrier: b.carrier, waited: time.Since(start)}
			case <-me.promoted:
			}
		}
	}
	res := s.carry(ctx, deadline, key, b, spec)
	res.waited = time.Since(start)
	return res
}

// carry is the carrier's part of dispatchBatch.
func (s *server) carry(ctx context.Context, deadline time.Time, key batchKey, b *batch, spec taskSpec) batchResult {
	handedOff := false
	defer func() {
		if !handedOff { // also when a panic unwinds: the riders are answered, the batch is gone
			s.batches.close(key, b)
			close(b.done)
		}
	}()
	actx, cancel := context.WithDeadline(context.WithoutCancel(ctx), deadline)
	defer cancel()
	release, _ := s.admit(actx)
	res := batchResult{carrier: spec.delivery}
	if release == nil {
		if handedOff = s.batches.handOff(key, b); handedOff {
			res.out = outcomeBusy
			return res
		}
		b.out = outcomeBusy
		res.out = b.out
		return res
	}
	defer release()
	res.riders = len(s.batches.close(key, b))
	if r := s.dispatchTask(ctx, spec); r.err != nil {
		b.out = outcomeFailed
		b.out.res = r
	} else {
		b.out = outcomeQueued
	}
	res.out = b.out
	return res
}

// dispatchTask starts run-task for spec as a transient user unit (systemd-run returns once the
// unit is started). The request's cancellation does not cut it short. When systemd-run fails but the task started anyway (its time bound cut it short after the
// unit was up), the dispatch counts as done: reporting a failure would invite a second redeploy.
func (s *server) dispatchTask(ctx context.Context, spec taskSpec) cmdResult {
	argv := dispatchArgv(s.exe, s.cfg, s.environ(), spec)
	res := s.exec(context.WithoutCancel(ctx), commandShare(ctx, s.cfg.commandTimeout), argv...)
	if res.err != nil && s.taskUnitStarted(ctx, spec.delivery) {
		s.log.warnf("systemd-run for %s failed (%v), but %s has started", spec.unit, res.err, taskUnitName(spec.delivery))
		res.err = nil
	}
	return res
}

// commandShare is how long a command may run within ctx's budget: at most requestCommandTimeout
// and what is left of the budget, but never less than a second, since a command cut off at
// once would be reported as failed although it may well have succeeded.
func commandShare(ctx context.Context, limit time.Duration) time.Duration {
	d := min(limit, requestCommandTimeout)
	if dl, ok := ctx.Deadline(); ok {
		d = min(d, time.Until(dl))
	}
	return max(d, time.Second)
}

// taskUnitStarted reports whether the task of a delivery started after all: its transient unit
// is running, or it already wrote a row (a finished unit is collected and unknown to systemd).
func (s *server) taskUnitStarted(ctx context.Context, delivery string) bool {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), commandShare(ctx, requestCommandTimeout))
	defer cancel()
	if p, err := showUnit(ctx, s.cfg, taskUnitName(delivery)+".service", "ActiveState"); err == nil &&
		(p["ActiveState"] == "active" || p["ActiveState"] == "activating") {
		return true
	}
	rows, err := queryEvents(ctx, s.events.db, eventFilter{action: "github-task", delivery: delivery, limit: 1})
	return err == nil && len(rows) > 0
}

// requestCommandTimeout bounds a command run while a client waits (GitHub gives up after 10 s).
const requestCommandTimeout = 4 * time.Second

// requestBudget bounds the whole handling of a GitHub delivery after its body is read, so the
// answer comes before GitHub's 10 s limit (the rows are committed even past it).
const requestBudget = 8 * time.Second

// Tokens and JSON answers, shared by the manual-trigger routes (scheduler.go) and the
// observability routes below. A token is compared in constant time and never reaches a log line
// or an event row (the middleware redacts the query, and bodies are never stored).

// tokenMatches compares a presented token with the configured one in constant time. Both sides
// are hashed first, so neither the token's length nor a shared prefix shows in the timing. An
// empty configured token matches nothing: the route is then closed.
func tokenMatches(configured, presented string) bool {
	if configured == "" || presented == "" {
		return false
	}
	a, b := sha256.Sum256([]byte(configured)), sha256.Sum256([]byte(presented))
	return subtle.ConstantTimeCompare(a[:], b[:]) == 1
}

// bearerToken returns the credentials of an "Authorization: Bearer" header (RFC 6750) and
// whether the request carried one.
func bearerToken(r *http.Request) (string, bool) {
	scheme, token, ok := strings.Cut(strings.TrimSpace(r.Header.Get("Authorization")), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	return strings.TrimSpace(token), true
}

// extendWriteDeadline gives a handler that waits for systemctl the time to answer: the server's
// WriteTimeout is shorter than a restart may take.
func extendWriteDeadline(w http.ResponseWriter, d time.Duration) {
	http.NewResponseController(w).SetWriteDeadline(time.Now().Add(d)) // unsupported: keep the default
}

// replyJSON answers with a JSON body.
func replyJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	io.WriteString(w, marshalJSON(v)+"\n")
}

// manualError answers a manual API request with {"error": text} and notes code in the event row.
func manualError(w http.ResponseWriter, r *http.Request, status int, code, text string) {
	info(r).meta["error"] = code
	replyJSON(w, status, map[string]string{"error": text})
}

// decodeStrict decodes one JSON object into v: unknown fields, wrong types and anything after the
// object are errors. An empty body leaves every field at its default.
func decodeStrict(body io.Reader, v any) error {
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		if errors.Is(err, io.EOF) {
			return nil
		}
		return err
	}
	var extra json.RawMessage
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			return err
		}
		return errors.New("unexpected data after the JSON object")
	}
	return nil
}

// Observability: /health?verbose=1, /metrics, /api/events and /api/deliveries/<id>. The event
// rows themselves are read and formatted by eventlog.go.

// handleHealth answers "ok" for probes; with ?verbose=1 or "Accept: application/json" it checks
// the database, the state directory and the configuration, and answers 503 naming what failed.
func (s *server) handleHealth(w http.ResponseWriter, r *http.Request) {
	if r.URL.Query().Get("verbose") == "" && !strings.Contains(r.Header.Get("Accept"), "application/json") {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Write([]byte("ok"))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	var failing []string
	db := map[string]any{"path": s.cfg.dbPath, "pending_writes": s.events.pending.Load(), "write_failures": s.events.failures.Load()}
	if v, err := s.events.schemaVersion(ctx); err == nil {
		db["schema_version"] = v
	}
	// An empty write transaction: BEGIN IMMEDIATE takes the write lock, so this fails when the
	// database cannot be written.
	if err := s.events.write(ctx, func(*sql.Tx) error { return nil }); err != nil {
		db["writable"], db["error"] = false, err.Error()
		failing = append(failing, "database")
	} else {
		db["writable"] = true
	}
	state := map[string]any{"path": s.cfg.stateDir, "writable": true}
	if f, err := os.CreateTemp(s.cfg.stateDir, ".health-*"); err != nil {
		state["writable"], state["error"] = false, err.Error()
		failing = append(failing, "state_dir")
	} else {
		f.Close()
		os.Remove(f.Name())
	}
	body := map[string]any{
		"status":   "ok",
		"database": db, "state_dir": state,
		"github_secret_configured": s.cfg.secret != "",
		"token_configured":         s.cfg.token != "",
		"manual_token_configured":  s.cfg.manualToken != "",
		"metrics_token_configured": s.cfg.metricsToken != "",
		"version":                  buildVersion(),
	}
	if tick, err := lastEvent(ctx, s.events.db, "scheduler"); err == nil && tick != nil {
		body["last_scheduler_tick"] = map[string]any{"time": tick.Time, "status": tick.Status}
	}
	status := http.StatusOK
	if len(failing) > 0 {
		body["status"], body["failing"] = "fail", failing
		status = http.StatusServiceUnavailable
	}
	replyJSON(w, status, body)
}

// readToken checks a token presented as "Authorization: Bearer" or as ?token= on a GET route.
func readToken(r *http.Request, configured string) bool {
	if t, ok := bearerToken(r); ok {
		return tokenMatches(configured, t)
	}
	return tokenMatches(configured, r.URL.Query().Get("token"))
}

// handleMetrics serves the Prometheus text format; WEBHOOK_METRICS_TOKEN, when set, is required.
func (s *server) handleMetrics(w http.ResponseWriter, r *http.Request) {
	info(r).action = "metrics"
	if s.cfg.metricsToken != "" && !readToken(r, s.cfg.metricsToken) {
		reply(w, r, http.StatusUnauthorized, "unauthorized", "unauthorized")
		return
	}
	var buf strings.Builder
	if err := s.metrics.writeMetrics(r.Context(), &buf, s.events); err != nil {
		s.log.errorf("metrics: %v", err)
		reply(w, r, http.StatusInternalServerError, "metrics-failed", "cannot read the event log")
		return
	}
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	io.WriteString(w, buf.String())
}

// handleEvents lists event rows, newest first, with the events command's filters as query
// parameters and keyset paging: pass next_before_id back as before_id for the next page.
func (s *server) handleEvents(w http.ResponseWriter, r *http.Request) {
	info(r).action = "events-api"
	if !readToken(r, s.cfg.manualToken) {
		manualError(w, r, http.StatusUnauthorized, "unauthorized", "unauthorized")
		return
	}
	q := r.URL.Query()
	f, err := parseEventFilter(q.Get, s.now())
	if err != nil {
		manualError(w, r, http.StatusBadRequest, "bad-filter", err.Error())
		return
	}
	evs, err := queryEvents(r.Context(), s.events.db, f)
	if err != nil {
		s.log.errorf("events api: %v", err)
		manualError(w, r, http.StatusInternalServerError, "query-failed", "cannot read the event log")
		return
	}
	var next any
	if len(evs) == f.limit {
		next = evs[len(evs)-1].ID
	}
	replyJSON(w, http.StatusOK, map[string]any{"events": evs, "next_before_id": next})
}

// handleDelivery returns every row of one GitHub delivery in order: the request, then each step
// of its redeploy.
func (s *server) handleDelivery(w http.ResponseWriter, r *http.Request) {
	info(r).action = "events-api"
	if !readToken(r, s.cfg.manualToken) {
		manualError(w, r, http.StatusUnauthorized, "unauthorized", "unauthorized")
		return
	}
	id := r.PathValue("id")
	if !reDeliveryID.MatchString(id) {
		manualError(w, r, http.StatusBadRequest, "bad-delivery", "invalid delivery id")
		return
	}
	evs, err := queryEvents(r.Context(), s.events.db, eventFilter{delivery: id, afterID: -1})
	if err != nil {
		s.log.errorf("deliveries api: %v", err)
		manualError(w, r, http.StatusInternalServerError, "query-failed", "cannot read the event log")
		return
	}
	if len(evs) == 0 {
		manualError(w, r, http.StatusNotFound, "not-found", "no events for delivery "+id)
		return
	}
	answer := map[string]any{"delivery": id, "events": evs}
	// A delivery that joined another's task: that task's steps are the rest of its story.
	if carrier := taskDelivery(evs); carrier != "" {
		steps, err := queryEvents(r.Context(), s.events.db, eventFilter{action: "github-task", delivery: carrier, afterID: -1})
		if err != nil {
			s.log.errorf("deliveries api: %v", err)
			manualError(w, r, http.StatusInternalServerError, "query-failed", "cannot read the event log")
			return
		}
		evs = append(evs, steps...)
		slices.SortFunc(evs, func(a, b storedEvent) int { return cmp.Compare(a.ID, b.ID) })
		answer["events"], answer["task_delivery"] = evs, carrier
	}
	replyJSON(w, http.StatusOK, answer)
}

// taskDelivery returns the delivery whose task a delivery's rows say it was queued with, when
// that is another delivery's (see dispatchBatch), or "".
func taskDelivery(evs []storedEvent) string {
	for _, e := range slices.Backward(evs) {
		into, _ := e.Meta["coalesced_into"].(string)
		if e.Action == "github-webhook" && e.Meta["reason"] == "queued" && reDeliveryID.MatchString(into) {
			return into
		}
	}
	return ""
}
