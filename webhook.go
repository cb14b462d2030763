// webhook.go owns the HTTP surface of `webhook-auto-update server`: capped listeners, draining
// shutdown, routing, request rows, pushes (one path for GitHub and every registry), the web UI,
// /health, /metrics (the image checks' gauges too), the events API, and the status page (actions,
// session, login throttle, CSP, forward auth); every page and API POST passes CrossOriginProtection.
//
// Rules: every request gets one event_log row or is counted in a summary row (successful probes;
// refusals past a minute's budget or below the disk reserve), each value cut to maxFieldBytes,
// every secret redacted. A push runs handlePush's checks in the README's order; an unset secret
// refuses everything; secrets compare in constant time. Bodies are capped alone and, as bytes
// arrive, together. Readers use the read-only connections. Transfer-Encoding or shutdown ends the
// connection (RFC 9112 §6.1). Static files open via os.Root, non-blocking.
package main

import (
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"maps"
	"math"
	"mime"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/signal"
	"path"
	"path/filepath"
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
	"unicode/utf8"
)

const (
	maxHeaderBytes   = 16 << 10        // a request line and its headers; net/http answers 431 above
	maxFieldBytes    = 1024            // each value a row stores from a request, so a row is a few KB
	bodyBudgetWait   = 2 * time.Second // for room in the body budget, then 503
	debugPayloadCap  = 1 << 20         // how much of a refused body is saved
	healthCacheFor   = time.Second     // how long one health check, write probe or metrics reading is used
	statusSessionTTL = 12 * time.Hour  // what a status page login gives
	statusCookie     = "wau_status"
)

const usageServer = `usage: webhook-auto-update server [--listen ADDR] [--state-dir DIR] [--db URL]

Serves GitHub package webhooks, the manual API and the web UI. Under systemd socket activation
it serves the passed sockets; otherwise it listens on --listen (default 127.0.0.1:8088).
`

func cmdServer(c *cli, args []string) int {
	cfg, code := c.setupNoArgs("server", usageServer, args, func(fs *flag.FlagSet, cfg *config) {
		fs.StringVar(&cfg.listen, "listen", cfg.listen, "")
	})
	if code >= 0 {
		return code
	}
	// The default window's calendar is systemd-analyze's to judge; the server asks it once at start.
	if p, _ := parsePolicy(nil, cfg.policyDefaults); p.window != "" {
		if _, err := p.windowOpens(context.Background(), time.Now()); err != nil {
			c.log.errorf("invalid WEBHOOK_DEFAULT_WINDOW: %v", err)
			return 2
		}
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
	from := ""
	if cfg.envFile != "" {
		from = " (settings also from " + cfg.envFile + ")"
	}
	c.log.infof("state directory %s, event log %s%s", cfg.stateDir, cfg.dbPath, from)
	if cfg.secrets["github"] == "" {
		c.log.warnf("GITHUB_WEBHOOK_SECRET is not set: every GitHub delivery will be refused with 500")
	}
	if also := ", and so do the manual API and /api/events (or set WEBHOOK_MANUAL_TOKEN for them)"; cfg.token == "" {
		if cfg.manualToken != "" {
			also = ""
		}
		c.log.warnf("WEBHOOK_TOKEN is not set: /auto-update refuses every request with 401%s", also)
	}
	listeners, err := activationListeners(c.getenv)
	if err == nil && len(listeners) == 0 {
		var l net.Listener
		if l, err = net.Listen("tcp", cfg.listen); err != nil {
			err = fmt.Errorf("cannot listen on %s: %v (set --listen to a free address)", cfg.listen, err)
		}
		listeners = append(listeners, l)
	}
	if err != nil {
		c.log.errorf("cannot start: %v", err)
		return 1
	}
	sd, err := newNotifier(c.getenv)
	if err != nil {
		c.log.warnf("%v", err)
	}
	defer sd.Close()
	return newServer(cfg, c.log, events).serve(listeners, sd)
}

// serve runs until SIGTERM or SIGINT, then finishes the requests in flight and the dispatcher's.
func (s *server) serve(listeners []net.Listener, sd *notifier) int {
	hs := newHTTPServer(s.cfg, s, s.log)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	serveErr := make(chan error, len(listeners))
	for i, l := range listeners {
		s.log.infof("listening on %s", l.Addr())
		listeners[i] = &capListener{Listener: l, c: s.conns}
		go func() { serveErr <- hs.Serve(listeners[i]) }()
	}
	if err := sd.notify("READY=1"); err != nil {
		s.log.warnf("readiness notification failed: %v", err)
	}
	go sd.runWatchdog(ctx, s.log)
	dctx, stopDispatcher := context.WithCancel(context.Background())
	var background sync.WaitGroup // the dispatcher, the notifier and the image checks
	background.Go(func() { s.runDispatcher(dctx) })
	background.Go(func() { s.events.runNotifier(dctx, &s.cfg.notify) })
	if s.cfg.checkInterval > 0 {
		background.Go(func() { s.runChecks(dctx) })
	}
	status := 0
	select {
	case <-ctx.Done():
		s.log.infof("shutting down")
	case err := <-serveErr:
		s.log.errorf("server stopped: %v", err)
		status = 1
	}
	sd.notify("STOPPING=1")
	sctx, cancel := context.WithTimeout(context.Background(), s.cfg.shutdownTimeout)
	defer cancel()
	// Answers end their connections, an idle one has 2 s for a last request, new ones wait in the socket.
	s.draining.Store(true)
	for _, l := range listeners {
		l.Close()
	}
	for end := time.Now().Add(2 * time.Second); s.conns.count() > 0 && time.Now().Before(end); {
		time.Sleep(10 * time.Millisecond)
	}
	if err := hs.Shutdown(sctx); err != nil && !errors.Is(err, net.ErrClosed) { // serve closed the listeners
		// A handler waiting for systemctl restarted a unit: its row must not be lost.
		wait := s.cfg.commandTimeout + 10*time.Second
		s.log.warnf("in-flight requests did not finish within %s: waiting up to %s more", s.cfg.shutdownTimeout, wait)
		done := make(chan struct{})
		go func() { s.inflight.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(wait):
			s.log.errorf("requests still in flight at exit: their rows are lost")
		}
	}
	stopDispatcher()
	background.Wait()
	s.flushSummaries(true)
	return status
}

func newHTTPServer(cfg *config, s *server, lg *logger) *http.Server {
	return &http.Server{Handler: s, ReadHeaderTimeout: cfg.readHeaderTimeout, ReadTimeout: cfg.readTimeout, ConnState: s.conns.track,
		WriteTimeout: cfg.writeTimeout, IdleTimeout: cfg.idleTimeout, MaxHeaderBytes: maxHeaderBytes, ErrorLog: log.New(lg, "", 0)}
}

// connTracker follows each connection's state (ConnState): at the cap a quiet one gives way.
type connTracker struct {
	mu   sync.Mutex
	max  int
	open map[net.Conn]time.Time // since when it is idle or new; zero: a request is being answered
}

func (c *connTracker) track(conn net.Conn, st http.ConnState) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch _, ok := c.open[conn]; {
	case !ok:
	case st == http.StateClosed || st == http.StateHijacked:
		delete(c.open, conn)
	case st == http.StateActive:
		c.open[conn] = time.Time{}
	default:
		c.open[conn] = time.Now()
	}
}

func (c *connTracker) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.open)
}

// admit takes conn below the cap; at it, one quiet for a second is closed instead, or else conn.
func (c *connTracker) admit(conn net.Conn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for old, since := range c.open {
		if len(c.open) < c.max {
			break
		}
		if !since.IsZero() && time.Since(since) > time.Second {
			old.Close()
			delete(c.open, old)
		}
	}
	if len(c.open) >= c.max {
		return false
	}
	c.open[conn] = time.Now()
	return true
}

// capListener closes at once a connection the tracker does not admit.
type capListener struct {
	net.Listener
	c *connTracker
}

func (l *capListener) Accept() (net.Conn, error) {
	for {
		conn, err := l.Listener.Accept()
		if err != nil || l.c.admit(conn) {
			return conn, err
		}
		conn.Close()
	}
}

// server is the HTTP handler: ServeHTTP's shared rules around a ServeMux (404, 405 with Allow).
type server struct {
	cfg        *config
	log        *logger
	events     *eventLog
	metrics    *metrics
	mux        *http.ServeMux
	now        func() time.Time
	inflight   sync.WaitGroup // handlers running, waited for at shutdown
	units      unitLookups    // the unit lookups of deliveries, reused for seconds
	wake       chan struct{}  // a claim was queued: the dispatcher looks at once
	probes     summary        // successful health and metrics probes, one row a minute
	refused    summary        // refused and unknown requests beyond WEBHOOK_REFUSED_ROWS_PER_MINUTE
	bodies     *byteBudget    // request bodies in memory
	conns      *connTracker   // open connections: capped, drained at shutdown
	logins     loginThrottle  // failed status page logins by client
	draining   atomic.Bool    // shutting down: every answer ends its connection
	secretsOut *strings.Replacer
	secrets    []string // secretsOut's pairs
	disk       cached[int]
	figures    cached[*promWriter]
	lastDump   atomic.Int64 // when saveRefused last wrote, unix nanoseconds
	health     cached[healthReport]
	probe      cached[error]
	reconciled time.Time // when the dispatcher last looked for half-done claims
	getenv     func(string) string
	environ    func() []string
	exe        string // this binary, run by systemd-run as run-task
	saveFile   func(path string, data []byte, perm os.FileMode) error
	exec       func(ctx context.Context, timeout time.Duration, argv ...string) cmdResult
}

func newServer(cfg *config, lg *logger, events *eventLog) *server {
	s := &server{cfg: cfg, log: lg, events: events, mux: http.NewServeMux(), now: time.Now, getenv: os.Getenv, environ: os.Environ,
		exec: runCommand, saveFile: writeFileAtomic, wake: make(chan struct{}, 1), units: unitLookups{ttl: unitLookupTTL},
		bodies: &byteBudget{total: cfg.bodyBudget, free: cfg.bodyBudget, freed: make(chan struct{})},
		probes: summary{action: "probe-summary"}, refused: summary{action: "request-summary"},
		figures: cached[*promWriter]{inFlight: true}, conns: &connTracker{max: cfg.maxConns, open: map[net.Conn]time.Time{}}, logins: loginThrottle{fails: map[string]*loginFails{}},
		metrics: &metrics{start: time.Now(), requests: map[[2]string]int64{}, deliveries: map[string]int64{},
			rejections: map[string]int64{}, dispatches: map[string]int64{}}}
	s.exe, _ = os.Executable()
	var pairs []string // a longer secret before its prefix
	for _, v := range slices.SortedFunc(slices.Values(append(slices.Collect(maps.Values(cfg.secrets)), cfg.token, cfg.manualToken,
		cfg.metricsToken)), func(a, b string) int { return len(b) - len(a) }) {
		if len(v) >= 6 { // a shorter one would hide every word it is part of; its places are still redacted
			pairs = append(pairs, v, "REDACTED", url.QueryEscape(v), "REDACTED", url.PathEscape(v), "REDACTED")
		}
	}
	s.secrets, s.secretsOut = pairs, strings.NewReplacer(pairs...)
	routes := map[string]http.HandlerFunc{
		"POST /github-package-update/{unit}": s.handlePush, "POST /github-package-update/{unit}/redeploy": s.handlePush,
		"POST /registry/{source}/{unit}": s.handlePush, "POST /registry/{source}/{unit}/{token}": s.handlePush,
		"GET /health": s.handleHealth, "GET /sse/hello": s.handleHello, "GET /metrics": s.handleMetrics, "GET /api/events": s.handleEvents,
		"GET /api/deliveries/{id}": s.handleDelivery, "GET /auto-update": s.handleAutoUpdate, "POST /auto-update": s.handleAutoUpdate,
		"POST /api/manual/trigger": s.handleManualTrigger, "POST /api/manual/services/{name}": s.handleManualService,
		"GET /status/{$}": s.handleStatusOverview, "GET /status/deliveries": s.handleStatusDeliveries,
		"GET /status/deliveries/{id}": s.handleStatusStory, "POST /status/login": s.handleStatusLogin, "POST /status/logout": s.handleStatusLogout,
		"POST /api/deliveries/{id}/{decision}": s.handleDecision, "POST /status/deliveries/{id}/{decision}": s.handleStatusAction,
		"POST /status/units/{unit}/redeploy": s.handleStatusAction,
	}
	for _, p := range []string{"/{$}", "/index.html", "/assets/", "/favicon.ico", "/vite.svg"} {
		routes["GET "+p] = s.handleStatic
	}
	// A browser's cross-site POST to the page or the API is refused (403) before it is read.
	cop := http.NewCrossOriginProtection()
	for pattern, h := range routes {
		if strings.HasPrefix(pattern, "POST /status/") || strings.HasPrefix(pattern, "POST /api/") {
			s.mux.Handle(pattern, cop.Handler(h))
		} else {
			s.mux.HandleFunc(pattern, h)
		}
	}
	return s
}

// requestInfo travels with a request so handlers can name the action and add to the row's meta.
type requestInfo struct {
	id, action string
	start      time.Time
	meta       map[string]any
	recorded   bool // the handler committed the row itself
}

type requestInfoKey struct{}

func info(r *http.Request) *requestInfo {
	if ri, ok := r.Context().Value(requestInfoKey{}).(*requestInfo); ok {
		return ri
	}
	return &requestInfo{meta: map[string]any{}}
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	w.status = cmp.Or(w.status, code)
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	w.status = cmp.Or(w.status, http.StatusOK)
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.inflight.Add(1)
	defer s.inflight.Done()
	ri := &requestInfo{id: newRequestID(), start: s.now(), meta: map[string]any{}}
	sw := &statusWriter{ResponseWriter: w}
	sw.Header()["X-Request-Id"] = []string{ri.id} // canonical already: Set would only check it
	r = r.WithContext(context.WithValue(r.Context(), requestInfoKey{}, ri))
	body := &budgetBody{ReadCloser: http.MaxBytesReader(sw, r.Body, s.cfg.maxBodyBytes), b: s.bodies, ctx: r.Context()}
	r.Body = body
	defer func() {
		s.bodies.give(body.held)
		if p := recover(); p != nil {
			if p == http.ErrAbortHandler {
				panic(p)
			}
			s.log.errorf("panic serving %s %s: %v\n%s", r.Method, r.URL.Path, p, debug.Stack())
			ri.meta["panic"] = fmt.Sprint(p)
			if sw.status == 0 {
				http.Error(sw, "internal error", http.StatusInternalServerError)
			}
			s.finish(r, ri, sw.status)
		}
	}()
	if r.TransferEncoding != nil || s.draining.Load() { // a proxy may have framed it by a Content-Length net/http dropped
		sw.Header().Set("Connection", "close")
	}
	switch {
	case strings.Contains(r.URL.Path, "..") && slices.Contains(strings.FieldsFunc(r.URL.Path, func(c rune) bool { return c == '/' || c == '\\' }), ".."):
		ri.action = "not-found"
		http.Error(sw, "not found", http.StatusNotFound)
	case r.ContentLength > s.cfg.maxBodyBytes:
		ri.action = "body-too-large"
		http.Error(sw, "request body too large", http.StatusRequestEntityTooLarge)
	default:
		s.mux.ServeHTTP(sw, r)
	}
	s.finish(r, ri, cmp.Or(sw.status, http.StatusOK))
}

// finish counts an answered request and records its row, unless the handler committed it.
func (s *server) finish(r *http.Request, ri *requestInfo, status int) {
	action := cmp.Or(ri.action, defaultAction(r.Pattern, status))
	s.metrics.observe(r.Pattern, status, action, ri.meta["reason"])
	if ri.recorded {
		return
	}
	d, now, low := s.now().Sub(ri.start), s.now(), s.diskFree() < s.cfg.diskReserve
	sum, budget := &s.refused, int64(s.cfg.refusedRows)
	switch {
	case status == http.StatusOK && (r.Pattern == "GET /health" || r.Pattern == "GET /metrics"):
		sum, budget = &s.probes, 0
	case low: // request rows stop first: the reserve is for claims and task rows
		budget = 0
	case status < 400:
		sum = nil
	}
	if sum != nil {
		own, ev := sum.add(r.Pattern, status, s.redact(r.Method+" "+redactPath(r.URL.Path)), d, now, budget)
		if ev != nil {
			s.events.Record(*ev)
		}
		if !own {
			return
		}
	}
	s.events.Record(s.requestEvent(r, ri, status, d))
}

// diskFree is the free space of the database's file system, read at most once a second.
func (s *server) diskFree() int {
	return s.disk.get(s.now, func(context.Context) int {
		var st syscall.Statfs_t
		if err := syscall.Statfs(filepath.Dir(s.cfg.dbPath), &st); err != nil {
			return math.MaxInt // no reading is no reason to stop recording
		}
		return int(st.Bavail) * int(st.Bsize)
	})
}

func (s *server) requestEvent(r *http.Request, ri *requestInfo, status int, d time.Duration) event {
	meta := ri.meta
	meta["path"] = redactPath(r.URL.Path)
	if q := redactQuery(r.URL.RawQuery); q != "" {
		meta["query"] = q
	}
	if r.RemoteAddr != "" {
		meta["remote_addr"] = r.RemoteAddr
	}
	for k, v := range meta {
		switch v := v.(type) {
		case string:
			meta[k] = boundField(s.redact(v))
		case []string:
			out := make([]string, len(v))
			for i, v := range v {
				out[i] = boundField(s.redact(v))
			}
			meta[k] = out
		}
	}
	return event{RequestID: ri.id, TS: s.now(), Method: boundField(s.redact(r.Method)), Path: boundField(s.redact(redactPath(r.URL.Path))),
		Status: status, Action: cmp.Or(ri.action, defaultAction(r.Pattern, status)), Duration: d, Meta: meta}
}

// boundField cuts s at a rune boundary and says how long it was.
func boundField(s string) string {
	if len(s) <= maxFieldBytes {
		return s
	}
	cut := maxFieldBytes
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…[truncated: " + strconv.Itoa(len(s)) + " bytes]"
}

// defaultAction names a request's action from its route when the handler did not.
func defaultAction(pattern string, status int) string {
	switch {
	case pattern == "" && status == http.StatusNotFound:
		return "not-found"
	case pattern == "" && status == http.StatusMethodNotAllowed:
		return "method-not-allowed"
	}
	return cmp.Or(routeActions[pattern], "static")
}

var routeActions = map[string]string{"": "http", "GET /health": "health", "GET /sse/hello": "sse-hello"}

// byteBudget bounds the bodies in memory, counting bytes as they arrive, freed when answered.
type byteBudget struct {
	mu          sync.Mutex
	total, free int64
	freed       chan struct{} // closed and replaced whenever bytes are freed
}

// take counts n bytes, waiting up to bodyBudgetWait for room.
func (b *byteBudget) take(ctx context.Context, n int64) bool {
	var timeout <-chan time.Time // only a read that waits pays for a timer
	for {
		b.mu.Lock()
		if n <= b.free {
			b.free -= n
			b.mu.Unlock()
			return true
		}
		freed := b.freed
		b.mu.Unlock()
		if timeout == nil {
			timeout = time.After(bodyBudgetWait)
		}
		select {
		case <-freed:
		case <-timeout:
			return false
		case <-ctx.Done():
			return false
		}
	}
}

func (b *byteBudget) give(n int64) {
	b.mu.Lock()
	b.free += n
	close(b.freed)
	b.freed = make(chan struct{})
	b.mu.Unlock()
}

// budgetBody is a request body whose bytes are taken from the budget as they are read.
type budgetBody struct {
	io.ReadCloser
	b    *byteBudget
	ctx  context.Context
	held int64
}

func (r *budgetBody) Read(p []byte) (int, error) {
	n, err := r.ReadCloser.Read(p)
	if n > 0 && !r.b.take(r.ctx, int64(n)) {
		return 0, errBodyBudget
	}
	r.held += int64(n)
	return n, err
}

func (s *server) handleHello(w http.ResponseWriter, r *http.Request) {
	data, _ := json.Marshal(map[string]any{"message": "hello from webhook-auto-update", "timestamp": s.now().Unix()})
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	fmt.Fprintf(w, "event: hello\ndata: %s\n\n", data)
}

// staticTypes fixes the content types the UI bundle needs, independent of /etc/mime.types.
var staticTypes = map[string]string{
	".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".mjs": "text/javascript; charset=utf-8",
	".css": "text/css; charset=utf-8", ".json": "application/json", ".map": "application/json", ".svg": "image/svg+xml",
	".ico": "image/x-icon", ".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp", ".woff": "font/woff",
	".woff2": "font/woff2", ".txt": "text/plain; charset=utf-8",
}

// handleStatic serves the UI bundle's regular files (via os.Root; O_NONBLOCK: a FIFO cannot hang it); else / is the status page.
func (s *server) handleStatic(w http.ResponseWriter, r *http.Request) {
	name := cmp.Or(strings.TrimPrefix(r.URL.Path, "/"), "index.html")
	var f *os.File
	root, err := os.OpenRoot(s.cfg.webDist)
	if err == nil {
		defer root.Close()
		f, err = root.OpenFile(name, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	}
	if err != nil {
		missing := root == nil || errors.Is(err, os.ErrNotExist)
		switch {
		case missing && r.URL.Path == "/":
			s.handleStatusOverview(w, r)
		case missing && name == "index.html":
			http.Error(w, "web ui not built", http.StatusNotFound)
		default:
			http.NotFound(w, r)
		}
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		http.NotFound(w, r)
		return
	}
	ext := strings.ToLower(path.Ext(name))
	if ctype := cmp.Or(staticTypes[ext], mime.TypeByExtension(ext)); ctype != "" {
		w.Header().Set("Content-Type", ctype)
	}
	w.Header().Set("X-Content-Type-Options", "nosniff")
	http.ServeContent(w, r, name, st.ModTime(), f)
}

// pushSource is what differs between GitHub and each registry; everything else is shared.
type pushSource struct {
	auth   func(secret string, r *http.Request, body []byte) error // nil error: authenticated
	parse  func(body []byte, h http.Header) ([]delivery, error)
	github bool // its own headers and rows' action; registry hosts must be allowed; a unit without Image= takes the first pushed tag
}

// pushSources are the sources by the name in their route; "github" is /github-package-update.
var pushSources = map[string]pushSource{
	"github":       {auth: githubAuth, parse: githubPushes, github: true},
	"distribution": {auth: bearerAuth, parse: distributionPushes},
	"harbor":       {auth: bearerAuth, parse: harborPushes},
	"gitea":        {auth: giteaAuth, parse: giteaPushes},
	"dockerhub":    {auth: urlTokenAuth, parse: dockerHubPushes},
	"quay":         {auth: urlTokenAuth, parse: quayPushes},
}

// secretEnv names the variable holding a source's secret; isSecretEnv keeps it from children.
func secretEnv(source string) string {
	if source == "github" {
		return "GITHUB_WEBHOOK_SECRET"
	}
	return "WEBHOOK_REGISTRY_TOKEN_" + strings.ToUpper(source)
}

// push is one notification as the checks learn it: id from the source's headers, d the push acted on, ref what to pull.
type push struct {
	r                     *http.Request
	ri                    *requestInfo
	src                   pushSource
	name, event, id, unit string
	body                  []byte
	pushes                []delivery
	d                     delivery
	ref                   imageRef
	uf                    unitFile
}

// refusal stops a push: reason is for the row, retryAfter (seconds) for Retry-After.
type refusal struct {
	status       int
	reason, text string
	retryAfter   int
}

func refuse(status int, reason, text string) *refusal {
	return &refusal{status: status, reason: reason, text: text}
}

// handlePush runs the README's "What happens on a delivery" in order; pulls and restarts are the queue's.
func (s *server) handlePush(w http.ResponseWriter, r *http.Request) {
	p := &push{r: r, ri: info(r)}
	for _, check := range []func(*push) *refusal{s.pushSource, s.pushBody, s.pushAuth,
		s.pushHeaders, s.pushUnit, s.pushPayload, s.pushImage, s.pushPolicy, s.pushLimits} {
		if no := check(p); no != nil {
			if no.retryAfter > 0 {
				w.Header().Set("Retry-After", strconv.Itoa(no.retryAfter))
			}
			reply(w, r, no.status, no.reason, no.text)
			return
		}
	}
	s.enqueue(w, r, taskSpec{unit: p.unit, image: p.ref.String(), event: p.event, delivery: p.d.id,
		path: redactPath(r.URL.Path), digest: p.d.digest})
}

// 1. The source is known; 2. its secret is configured.
func (s *server) pushSource(p *push) *refusal {
	p.name = cmp.Or(p.r.PathValue("source"), "github")
	src, ok := pushSources[p.name]
	p.ri.action, p.src, p.event = "registry-webhook", src, p.name
	switch {
	case !ok || p.r.PathValue("source") == "github":
		return refuse(http.StatusNotFound, "unknown-source", "unknown registry source: want distribution, harbor, gitea, dockerhub or quay")
	case src.github:
		p.ri.action = "github-webhook"
	default:
		p.ri.meta["source"] = p.name
	}
	if s.cfg.secrets[p.name] == "" {
		s.log.errorf("%s push refused: %s is not set", p.name, secretEnv(p.name))
		return refuse(http.StatusInternalServerError, "secret-unset", "server misconfigured")
	}
	return nil
}

// 3. The body is read whole, within the cap.
func (s *server) pushBody(p *push) *refusal {
	var err error
	p.body, err = io.ReadAll(p.r.Body) // grown as bytes arrive, never to a size only announced
	switch _, tooLarge := errors.AsType[*http.MaxBytesError](err); {
	case errors.Is(err, errBodyBudget):
		return &refusal{http.StatusServiceUnavailable, "body-budget", "too many request bodies in progress; retry in a few seconds", 5}
	case tooLarge:
		return refuse(http.StatusRequestEntityTooLarge, "body-too-large", "request body too large")
	case err != nil:
		return refuse(http.StatusBadRequest, "body-unreadable", "cannot read request body")
	}
	return nil
}

// 4. The source's authentication passes; a refused GitHub body is kept for debugging.
func (s *server) pushAuth(p *push) *refusal {
	err := p.src.auth(s.cfg.secrets[p.name], p.r, p.body)
	if err == nil {
		return nil
	}
	if !p.src.github {
		s.log.warnf("%s push to %s refused: %v", p.name, redactPath(p.r.URL.Path), err)
		return refuse(http.StatusUnauthorized, "unauthorized", "unauthorized")
	}
	sum := sha256.Sum256(p.body)
	p.ri.meta["body_bytes"], p.ri.meta["body_sha256"] = len(p.body), hex.EncodeToString(sum[:])
	where := "not saved: one was saved less than a second ago"
	if p.ri.meta["payload_saved"] = s.saveRefused(p.body); p.ri.meta["payload_saved"] == true {
		where = "saved to " + s.cfg.debugPayloadPath
	}
	s.log.warnf("github delivery for %s refused: %v (body %d bytes, sha256 %x, %s)", boundField(p.r.URL.Path), err, len(p.body), sum, where)
	return refuse(http.StatusUnauthorized, "bad-signature", "invalid signature")
}

// 6. The unit comes from the path.
func (s *server) pushUnit(p *push) *refusal {
	unit, err := resolveUnit(p.r.PathValue("unit"))
	if err != nil {
		return refuse(http.StatusBadRequest, "invalid-unit", err.Error())
	}
	p.unit, p.ri.meta["unit"] = unit, unit
	return nil
}

// 7. The payload names tagged pushes of valid images, from allowed registries.
func (s *server) pushPayload(p *push) *refusal {
	pushes, err := p.src.parse(p.body, p.r.Header)
	switch ign, ignored := errors.AsType[*ignoredError](err); {
	case ignored:
		return refuse(http.StatusAccepted, ign.reason, "ignored: "+ign.Error())
	case errors.Is(err, errInvalidJSON):
		return refuse(http.StatusBadRequest, "invalid-json", err.Error())
	case err != nil:
		return refuse(http.StatusBadRequest, "invalid-image", err.Error())
	}
	var shown []string
	for i := range pushes {
		pushes[i].id = cmp.Or(p.id, pushes[i].id, p.name+"-"+p.ri.id)
		if i < 16 && len(pushes) > 1 {
			shown = append(shown, pushes[i].repo()+":"+strings.Join(pushes[i].tags, ","))
		}
	}
	p.pushes, p.ri.meta["pushed"], p.ri.meta["delivery"] = pushes, shown, pushes[0].id
	if len(pushes) == 1 { // the usual push: its fields as they are, not a one-line list
		p.ri.meta["pushed"], p.ri.meta["tags"] = pushes[0].repo(), pushes[0].tags
		if pushes[0].digest != "" {
			p.ri.meta["digest"] = pushes[0].digest
		}
	}
	if h := pushes[0].host; p.src.github && !slices.Contains(s.cfg.registryHosts, h) {
		s.log.warnf("github delivery for %s refused: registry host %s is not in WEBHOOK_REGISTRY_HOSTS", pushes[0].repo(), h)
		return refuse(http.StatusForbidden, "registry-not-allowed", "registry host "+h+" is not allowed: add it to WEBHOOK_REGISTRY_HOSTS to pull from it")
	}
	return nil
}

// 8. A push matches the unit's Quadlet Image= (same host and repository, its tag; of several, the
// last). Without Image=, a GitHub push's first tag, which the task checks against the running one.
func (s *server) pushImage(p *push) *refusal {
	var err error
	p.uf, err = s.units.configuredImage(p.r.Context(), s.cfg, s.getenv, p.unit)
	switch {
	case errors.Is(err, errUnitNotFound):
		return refuse(http.StatusNotFound, "unit-not-found", "unit "+p.unit+" not found")
	case err != nil:
		s.log.errorf("cannot read the definition of %s: %v", p.unit, err)
		return refuse(http.StatusInternalServerError, "unit-unreadable", "cannot read the unit definition")
	case p.uf.image == "" && p.src.github:
		p.d, p.ref = p.pushes[0], p.pushes[0].ref(p.pushes[0].tags[0])
	case p.uf.image == "":
		return refuse(http.StatusAccepted, "unit-image-unknown", "ignored: "+p.unit+" names no image (Image= in its Quadlet .container file), so no registry push can match it")
	default:
		want, err := parseImageRef(withDefaultTag(p.uf.image))
		if err != nil {
			s.log.errorf("%s names an image this program cannot match (%v): refusing the delivery", p.uf.source, err)
			return refuse(http.StatusInternalServerError, "unit-image-unreadable", "the unit's Image= is not a full image reference (registry/owner/name[:tag])")
		}
		var reason, text string
		for _, d := range slices.Backward(p.pushes) {
			if reason, text = imageMismatch(want, d.host, d.path, d.tags); reason == "" {
				p.d, p.ref = d, d.ref(want.tag)
				break
			}
		}
		if reason != "" {
			return refuse(http.StatusAccepted, reason, text)
		}
	}
	p.ri.meta["image"], p.ri.meta["delivery"] = p.ref.String(), p.d.id
	return nil
}

// 9. The unit's policy is one this program can follow (its window one systemd-analyze reads).
func (s *server) pushPolicy(p *push) *refusal {
	pol, err := parsePolicy(p.uf.labels, s.cfg.policyDefaults)
	if err == nil {
		_, err = pol.windowOpens(p.r.Context(), s.now())
	}
	if err != nil {
		s.log.warnf("delivery for %s refused: its policy is malformed: %v", p.unit, err)
		return refuse(http.StatusAccepted, "policy-invalid", "ignored: the unit's policy is malformed: "+err.Error())
	}
	return nil
}

// 10. The per-image limit has room, and the database is the one this server opened.
func (s *server) pushLimits(p *push) *refusal {
	image := p.ref.String()
	lim, err := imageLimiter(s.cfg, image).check(p.r.Context())
	switch {
	case err != nil:
		s.log.errorf("per-image limit for %s: %v", image, err)
		return refuse(http.StatusInternalServerError, "limit-error", "cannot read the per-image limit")
	case !lim.allowed:
		return &refusal{http.StatusTooManyRequests, "image-rate-limited", "too many redeploys of " + image, int(lim.retryAfter / time.Second)}
	}
	if err := s.events.usable(); err != nil {
		s.log.errorf("delivery refused: %v", err)
		return &refusal{http.StatusServiceUnavailable, "database-replaced", "cannot record the delivery: the server's database was deleted or replaced; redeliver it after a restart", 60}
	}
	return nil
}

// 11. The delivery is claimed; 202 once the claim and the request's row are committed.
func (s *server) enqueue(w http.ResponseWriter, r *http.Request, spec taskSpec) {
	ri := info(r)
	ri.meta["reason"] = "queued"
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), busyTimeout)
	defer cancel()
	claimed, err := s.events.claimDelivery(ctx, spec, s.requestEvent(r, ri, http.StatusAccepted, s.now().Sub(ri.start)))
	switch {
	case err != nil:
		s.log.errorf("%v", err)
		reply(w, r, http.StatusInternalServerError, "record-failed", "cannot record the delivery")
	case !claimed:
		reply(w, r, http.StatusAccepted, "duplicate", "duplicate delivery")
	default:
		ri.recorded = true
		select {
		case s.wake <- struct{}{}:
		default:
		}
		reply(w, r, http.StatusAccepted, "queued", "auto-update queued")
	}
}

// reDeliveryID accepts only ids taskUnitName keeps as they are, so two never share a task unit.
var (
	reDeliveryID  = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$`)
	reEventName   = regexp.MustCompile(`^[a-z][a-z_]{0,63}$`)
	errBodyBudget = errors.New("too many request bodies in progress")
)

// registryIDPrefixes are the registry sources' delivery id namespaces (pushID, hashID, the source's
// name): a GitHub delivery id is not signed, so it may use none, or it could claim their pushes.
var registryIDPrefixes = []string{"dist-", "harbor-", "gitea-", "hub-", "distribution-", "dockerhub-", "quay-"}

// 5. GitHub's headers: X-GitHub-Event and X-GitHub-Delivery, the allowed events; a ping is answered.
func (s *server) pushHeaders(p *push) *refusal {
	if !p.src.github {
		return nil
	}
	p.event = p.r.Header.Get("X-GitHub-Event")
	p.ri.meta["event"] = p.event
	if !reEventName.MatchString(p.event) {
		return refuse(http.StatusBadRequest, "bad-event-header", "missing or invalid X-GitHub-Event header")
	}
	p.id = cmp.Or(p.r.Header.Get("X-GitHub-Delivery"), "req-"+p.ri.id)
	p.ri.meta["delivery"] = p.id
	if !reDeliveryID.MatchString(p.id) {
		p.ri.meta["delivery"] = "(invalid)"
		return refuse(http.StatusBadRequest, "bad-delivery-header", "invalid X-GitHub-Delivery header")
	}
	if slices.ContainsFunc(registryIDPrefixes, func(prefix string) bool { return strings.HasPrefix(p.id, prefix) }) {
		return refuse(http.StatusBadRequest, "bad-delivery-header", "X-GitHub-Delivery is in a registry source's id namespace")
	}
	if len(s.cfg.allowedEvents) > 0 && !slices.Contains(s.cfg.allowedEvents, p.event) {
		return refuse(http.StatusAccepted, "event-not-allowed", "event ignored")
	}
	if p.event == "ping" {
		p.ri.action = "github-ping"
		return refuse(http.StatusOK, "", "pong")
	}
	return nil
}

func githubPushes(body []byte, _ http.Header) ([]delivery, error) {
	d, err := deliveryFromPayload(body)
	return []delivery{d}, err
}

// githubAuth checks X-Hub-Signature-256: "sha256=" and the hex HMAC-SHA256 of the body.
func githubAuth(secret string, r *http.Request, body []byte) error {
	return verifySignature(secret, body, r.Header.Get("X-Hub-Signature-256"))
}

func verifySignature(secret string, body []byte, header string) error {
	switch hexSig, ok := strings.CutPrefix(strings.TrimSpace(header), "sha256="); {
	case strings.TrimSpace(header) == "":
		return errors.New("missing X-Hub-Signature-256 header")
	case !ok:
		return errors.New("X-Hub-Signature-256 is not a sha256= signature")
	default:
		return checkHMAC(secret, body, hexSig, "X-Hub-Signature-256")
	}
}

// checkHMAC checks in constant time that hexSig, from header, is the HMAC-SHA256 of body.
func checkHMAC(secret string, body []byte, hexSig, header string) error {
	got, err := hex.DecodeString(hexSig)
	if err != nil || len(got) != sha256.Size {
		return fmt.Errorf("%s is not 64 hex digits", header)
	}
	if !hmac.Equal(got, hmacSHA256(secret, body)) {
		return errors.New("signature does not match the body")
	}
	return nil
}

// hmacSHA256 is the signature of GitHub's deliveries and of this program's generic notifications.
func hmacSHA256(secret string, body []byte) []byte {
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write(body)
	return mac.Sum(nil)
}

// bearerAuth accepts "Authorization: Bearer <secret>" (Distribution's headers, Harbor's Auth Header).
func bearerAuth(secret string, r *http.Request, _ []byte) error {
	token, _ := bearerToken(r) // "" unless ok
	return checkToken(secret, token, "no Authorization: Bearer header", "wrong bearer token")
}

// giteaAuth checks X-Gitea-Signature (Forgejo: X-Forgejo-Signature), the hex HMAC of the body.
func giteaAuth(secret string, r *http.Request, body []byte) error {
	for _, header := range []string{"X-Gitea-Signature", "X-Forgejo-Signature"} {
		if sig := strings.TrimSpace(r.Header.Get(header)); sig != "" {
			return checkHMAC(secret, body, sig, header)
		}
	}
	return errors.New("no X-Gitea-Signature or X-Forgejo-Signature header")
}

// urlTokenAuth takes the secret from the path's last segment or ?token= (Docker Hub, Quay); rows redact both.
func urlTokenAuth(secret string, r *http.Request, _ []byte) error {
	return checkToken(secret, cmp.Or(r.PathValue("token"), r.URL.Query().Get("token")), "no token in the path or the query", "wrong token")
}

// checkToken refuses a missing token, or one that does not match secret, with the error given.
func checkToken(secret, token, missing, wrong string) error {
	switch {
	case token == "":
		return errors.New(missing)
	case !tokenMatches(secret, token):
		return errors.New(wrong)
	}
	return nil
}

// saveRefused writes a refused body (≤ debugPayloadCap) after the answer, at most once a second; true if it will.
func (s *server) saveRefused(body []byte) bool {
	now, last := s.now().UnixNano(), s.lastDump.Load()
	if last != 0 && now-last < int64(time.Second) || !s.lastDump.CompareAndSwap(last, now) {
		return false
	}
	b := slices.Clone(body[:min(len(body), debugPayloadCap)])
	s.inflight.Add(1)
	go func() {
		defer s.inflight.Done()
		if err := s.saveFile(s.cfg.debugPayloadPath, b, 0o600); err != nil {
			s.log.warnf("cannot save the refused payload to %s: %v", s.cfg.debugPayloadPath, err)
		}
	}()
	return true
}

// writeHead sends status with a content type browsers must not second-guess.
func writeHead(w http.ResponseWriter, status int, contentType string) {
	w.Header().Set("Content-Type", contentType)
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
}

// reply answers with a plain-text body and notes the reason in the row.
func reply(w http.ResponseWriter, r *http.Request, status int, reason, text string) {
	if reason != "" {
		info(r).meta["reason"] = reason
	}
	writeHead(w, status, "text/plain; charset=utf-8")
	fmt.Fprintln(w, text)
}

func replyJSON(w http.ResponseWriter, status int, v any) {
	writeHead(w, status, "application/json")
	io.WriteString(w, marshalJSON(v)+"\n")
}

func manualError(w http.ResponseWriter, r *http.Request, status int, code, text string) {
	info(r).meta["error"] = code
	replyJSON(w, status, map[string]string{"error": text})
}

// decodeStrict decodes one JSON object into v (no unknown field, wrong type or trailing data; empty: v as is).
func decodeStrict(body io.Reader, v any) error {
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); errors.Is(err, io.EOF) {
		return nil
	} else if err != nil {
		return err
	}
	var extra json.RawMessage
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		if _, tooLarge := errors.AsType[*http.MaxBytesError](err); tooLarge {
			return err
		}
		return errors.New("unexpected data after the JSON object")
	}
	return nil
}

// summary counts requests of one kind (successful probes; refusals past the minute's row budget) in a row a minute.
type summary struct {
	action           string
	mu               sync.Mutex
	minute           time.Time // the minute being counted; zero: nothing yet
	rows, n          int64     // rows let through this minute; requests counted
	routes, statuses map[string]int64
	samples          []string
	slowest          time.Duration
}

// add gives the request its own row within budget, else counts it; ev is a minute that ended.
func (p *summary) add(route string, status int, sample string, d time.Duration, now time.Time, budget int64) (own bool, ev *event) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ev = p.takeLocked(now, false)
	if m := now.Truncate(time.Minute); !p.minute.Equal(m) {
		p.minute, p.rows, p.n, p.routes, p.statuses, p.samples, p.slowest = m, 0, 0, map[string]int64{}, map[string]int64{}, nil, 0
	}
	if p.rows < budget {
		p.rows++
		return true, ev
	}
	p.n++
	p.routes[cmp.Or(route, "unmatched")]++
	p.statuses[strconv.Itoa(status)]++
	if len(p.samples) < 3 && sample != "" {
		p.samples = append(p.samples, sample[:min(len(sample), 200)])
	}
	p.slowest = max(p.slowest, d)
	return false, ev
}

func (p *summary) takeLocked(now time.Time, force bool) *event {
	if p.n == 0 || !force && now.Truncate(time.Minute).Equal(p.minute) {
		return nil
	}
	status, _ := strconv.Atoi(slices.MaxFunc(slices.Collect(maps.Keys(p.statuses)), func(a, b string) int { return cmp.Compare(p.statuses[a], p.statuses[b]) }))
	ev := &event{RequestID: newRequestID(), TS: p.minute, Method: "HTTP", Status: status, Action: p.action, Duration: p.slowest,
		Meta: map[string]any{"count": p.n, "routes": p.routes, "statuses": p.statuses, "slowest_ms": p.slowest.Milliseconds(),
			"from": p.minute.UTC().Format(time.RFC3339), "samples": p.samples}}
	p.n, p.routes, p.statuses, p.samples, p.slowest = 0, map[string]int64{}, map[string]int64{}, nil, 0
	return ev
}

// flushSummaries records the summaries of minutes that ended (force: also the current one).
func (s *server) flushSummaries(force bool) {
	for _, p := range []*summary{&s.probes, &s.refused} {
		p.mu.Lock()
		ev := p.takeLocked(s.now(), force)
		p.mu.Unlock()
		if ev != nil {
			s.events.Record(*ev)
		}
	}
}

// tokenMatches compares sha256 sums in constant time (no length or prefix shows); "" matches nothing.
func tokenMatches(configured, presented string) bool {
	if configured == "" || presented == "" {
		return false
	}
	a, b := sha256.Sum256([]byte(configured)), sha256.Sum256([]byte(presented))
	return hmac.Equal(a[:], b[:])
}

// bearerToken returns the credentials of "Authorization: Bearer" (RFC 6750).
func bearerToken(r *http.Request) (string, bool) {
	scheme, token, ok := strings.Cut(strings.TrimSpace(r.Header.Get("Authorization")), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	return strings.TrimSpace(token), true
}

func requestToken(r *http.Request) string {
	t, _ := bearerToken(r) // "" unless ok
	return cmp.Or(t, r.URL.Query().Get("token"))
}

var (
	secretParams = map[string]bool{"token": true, "access_token": true, "secret": true} // their values are never logged or stored
	reQueryPart  = regexp.MustCompile(`[^&;]+`)
)

// redact replaces every configured secret and token, as it is or URL-escaped, wherever it is.
func (s *server) redact(v string) string {
	for i := 0; i < len(s.secrets); i += 2 { // only a value holding one pays for the Replacer
		if strings.Contains(v, s.secrets[i]) {
			return s.secretsOut.Replace(v)
		}
	}
	return v
}

// redactPath hides what follows /registry/<source>/<unit>/, however spelled, cased or prefixed.
func redactPath(p string) string {
	segs := slices.DeleteFunc(strings.Split(p, "/"), func(s string) bool { return s == "" || s == "." })
	for i, seg := range segs {
		if strings.Contains(strings.ToLower(seg), "registry") && len(segs) > i+3 {
			return "/" + strings.Join(segs[:i+3], "/") + "/REDACTED"
		}
	}
	return p
}

// redactQuery redacts secret parameters part by part, without parsing: a bad query is redacted too.
func redactQuery(raw string) string {
	return reQueryPart.ReplaceAllStringFunc(raw, func(part string) string {
		k, _, hasValue := strings.Cut(part, "=")
		name, err := url.QueryUnescape(k)
		if err != nil {
			name = k
		}
		if secretParams[strings.ToLower(strings.TrimSpace(name))] && hasValue {
			return k + "=REDACTED"
		}
		return part
	})
}

// handleHealth answers "ok", or 503 "fail: " and the failing checks; with ?verbose=1 or
// "Accept: application/json", the checks as JSON, having also probed that a write commits.
func (s *server) handleHealth(w http.ResponseWriter, r *http.Request) {
	h := s.health.get(s.now, s.checkHealth)
	if (r.URL.RawQuery == "" || r.URL.Query().Get("verbose") == "") && !strings.Contains(r.Header.Get("Accept"), "application/json") {
		w.Header()["Content-Type"] = []string{"text/plain; charset=utf-8"}
		if len(h.failing) == 0 {
			w.Write([]byte("ok"))
			return
		}
		info(r).meta["failing"] = h.failing
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, "fail: "+strings.Join(h.failing, ", ")+"\n")
		return
	}
	failing, db := h.failing, maps.Clone(h.db)
	if err := s.probe.get(s.now, s.events.probe); err != nil { // a write that changes nothing
		msg := err.Error()
		if prev, ok := db["error"].(string); ok {
			msg = prev + "; " + msg
		}
		db["writable"], db["error"] = false, msg
		if !slices.Contains(failing, "database") {
			failing = append(slices.Clone(failing), "database")
		}
	}
	body := maps.Clone(h.body)
	body["database"], body["status"] = db, "ok"
	status := http.StatusOK
	if len(failing) > 0 {
		body["status"], body["failing"], status = "fail", failing, http.StatusServiceUnavailable
	}
	info(r).meta["failing"] = failing
	replyJSON(w, status, body)
}

type healthReport struct {
	failing  []string
	db, body map[string]any
}

// cached is a value computed one at a time and reused for healthCacheFor (inFlight: only by the
// callers that arrived while it was computed); plain /health never waits for the write probe.
type cached[T any] struct {
	mu       sync.Mutex
	at       time.Time
	v        T
	inFlight bool
}

func (c *cached[T]) get(now func() time.Time, compute func(ctx context.Context) T) T {
	arrived := now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if t := now(); !c.at.IsZero() && !t.Before(c.at) && (c.inFlight && c.at.After(arrived) || !c.inFlight && t.Sub(c.at) < healthCacheFor) {
		return c.v
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	c.v, c.at = compute(ctx), now()
	return c.v
}

// checkHealth: the database is the file opened, its newest write did not fail, the state dir takes a file.
func (s *server) checkHealth(ctx context.Context) healthReport {
	var failing []string
	db := map[string]any{"path": s.cfg.dbPath, "pending_writes": s.events.pending.Load(),
		"write_failures": s.events.failures.Load(), "writable": true}
	if v, err := schemaVersion(ctx, s.events.reader); err == nil {
		db["schema_version"] = v
	}
	if err := errors.Join(s.events.usable(), s.events.lastWriteFailed()); err != nil { // joined by "; "
		db["writable"], db["error"] = false, strings.ReplaceAll(err.Error(), "\n", "; ")
		failing = append(failing, "database")
	}
	if free := s.diskFree(); free < s.cfg.diskReserve {
		db["free_bytes"], db["request_rows"] = free, "summarised: free space is below WEBHOOK_DISK_RESERVE_MB"
		failing = append(failing, "disk")
	}
	state := map[string]any{"path": s.cfg.stateDir, "writable": true}
	if f, err := os.CreateTemp(s.cfg.stateDir, ".health-*"); err != nil {
		state["writable"], state["error"] = false, err.Error()
		failing = append(failing, "state_dir")
	} else {
		f.Close()
		os.Remove(f.Name())
	}
	registry := map[string]bool{} // each WEBHOOK_REGISTRY_TOKEN_<SOURCE>, by source
	for name, secret := range s.cfg.secrets {
		registry[name] = secret != ""
	}
	delete(registry, "github")
	body := map[string]any{"state_dir": state, "github_secret_configured": s.cfg.secrets["github"] != "",
		"token_configured": s.cfg.token != "", "manual_token_configured": s.cfg.manualToken != "",
		"metrics_token_configured": s.cfg.metricsToken != "", "version": buildVersion(), "registry_tokens_configured": registry}
	if ticks, err := queryEvents(ctx, s.events.reader, eventFilter{action: "scheduler", limit: 1}); err == nil && len(ticks) > 0 {
		body["last_scheduler_tick"] = map[string]any{"time": ticks[0].Time, "status": ticks[0].Status}
	}
	return healthReport{failing: failing, db: db, body: body}
}

// metrics counts what the server does; run-task processes' work is counted from the database.
type metrics struct {
	mu         sync.Mutex
	start      time.Time
	requests   map[[2]string]int64 // route pattern, status
	deliveries map[string]int64    // GitHub deliveries by reason
	rejections map[string]int64    // 429s by action
	dispatches map[string]int64    // systemd-runs of queued tasks by result
}

func (m *metrics) dispatched(result string) {
	m.mu.Lock()
	m.dispatches[result]++
	m.mu.Unlock()
}

// observe counts one answered request by its matched pattern, so labels stay few.
func (m *metrics) observe(route string, status int, action string, reason any) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.requests[[2]string{cmp.Or(route, "unmatched"), strconv.Itoa(status)}]++
	switch action {
	case "github-ping":
		m.deliveries["ping"]++
	case "github-webhook":
		r, _ := reason.(string)
		m.deliveries[cmp.Or(r, "other")]++
	}
	if status == http.StatusTooManyRequests {
		m.rejections[action]++
	}
}

// handleMetrics serves the Prometheus text format; WEBHOOK_METRICS_TOKEN, when set, is required.
func (s *server) handleMetrics(w http.ResponseWriter, r *http.Request) {
	info(r).action = "metrics"
	if s.cfg.metricsToken != "" && !tokenMatches(s.cfg.metricsToken, requestToken(r)) {
		reply(w, r, http.StatusUnauthorized, "unauthorized", "unauthorized")
		return
	}
	var buf strings.Builder
	p, m := &promWriter{w: &buf}, s.metrics
	m.mu.Lock()
	p.counters("webhook_http_requests_total", "HTTP requests answered, by route pattern and status.", []string{"route", "status"}, m.requests)
	p.counter("webhook_github_deliveries_total", "GitHub deliveries by outcome (queued, duplicate, ignored reasons, rate limits, refusals).", "outcome", m.deliveries)
	p.counter("webhook_rate_limit_rejections_total", "Requests refused with 429, by action.", "action", m.rejections)
	p.counter("webhook_dispatches_total", "systemd-runs of queued redeploy tasks, by result (dispatched, dispatch-retry, dispatch-failed).", "result", m.dispatches)
	m.mu.Unlock()
	p.gauge("webhook_event_log_write_failures_total", "counter", "Event rows that could not be written and went to stderr.", float64(s.events.failures.Load()))
	p.gauge("webhook_event_log_queue_depth", "gauge", "Event rows queued and not yet committed.", float64(s.events.pending.Load()))
	p.gauge("process_start_time_seconds", "gauge", "Start time of the process since the unix epoch in seconds.", float64(m.start.Unix()))
	p.family("webhook_build_info", "gauge", "Build information; the value is always 1.")
	p.sample("webhook_build_info", []string{"version", buildVersion(), "goversion", runtime.Version()}, 1)
	f := s.figures.get(s.now, s.writeDBMetrics)
	p.printf("%s", f.w)
	if err := cmp.Or(f.err, p.err); err != nil {
		s.log.errorf("metrics: %v", err)
		reply(w, r, http.StatusInternalServerError, "metrics-failed", "cannot read the event log")
		return
	}
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	io.WriteString(w, buf.String())
}

// writeDBMetrics renders /metrics' part from the database, read by one scrape at a time (cached.inFlight).
func (s *server) writeDBMetrics(ctx context.Context) *promWriter {
	p, db := &promWriter{w: &strings.Builder{}}, s.events.reader
	pending, oldest, err := queueStats(ctx, db)
	waiting, err1 := countsBy(ctx, db, waitingSQL)
	outcomes, err2 := outcomeCounts(ctx, db)
	steps, err3 := countsBy(ctx, db, stepCountsSQL)
	sends, err4 := notifyCounts(ctx, db)
	checks, err5 := readRegistryChecks(ctx, db, "")
	if p.err = cmp.Or(err, err1, err2, err3, err4, err5); p.err != nil {
		return p
	}
	p.gauge("webhook_delivery_queue_pending", "gauge", "Deliveries recorded and waiting for their redeploy task to be started.", float64(pending))
	age := 0.0
	if !oldest.IsZero() {
		age = max(time.Since(oldest).Seconds(), 0)
	}
	p.gauge("webhook_delivery_queue_oldest_age_seconds", "gauge", "Age of the oldest pending delivery; 0 when none waits.", age)
	p.family("webhook_delivery_queue_waiting", "gauge", "Pending deliveries waiting for their unit's policy, by reason.")
	for _, r := range []string{waitCooldown, waitWindow, waitApproval} {
		p.sample("webhook_delivery_queue_waiting", []string{"reason", r}, float64(waiting[r]))
	}
	p.family("webhook_image_update_available", "gauge", "1 while the newest digest the registry check found for a unit's image is not the one its container runs.")
	for _, c := range checks {
		p.sample("webhook_image_update_available", []string{"unit", c.Unit}, map[bool]float64{true: 1}[c.updateAvailable()])
	}
	p.family("webhook_image_check_timestamp_seconds", "gauge", "When a unit's image was last checked (successfully or not), since the unix epoch.")
	for _, c := range checks {
		p.sample("webhook_image_check_timestamp_seconds", []string{"unit", c.Unit}, float64(c.Checked))
	}
	p.counter("webhook_redeploys_total", "Redeploy tasks that ended, by outcome (ok, rolled-back, failed, skipped).", "outcome", outcomes)
	p.counters("webhook_notifications_total", "Notification attempts, by scheme and result (sent, failed, given-up).", []string{"scheme", "result"}, sends)
	p.counter("webhook_redeploy_steps_total", "Redeploy task steps recorded in event_log, by step (pulled, restarted, up-to-date, rolled-back, …).", "step", steps)
	for _, h := range []struct {
		name, help, step, key string
		buckets               []float64
	}{
		{"webhook_pull_duration_seconds", "Duration of successful image pulls, retries included.", "pulled", "pull_ms",
			[]float64{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}},
		{"webhook_restart_duration_seconds", "Duration of systemctl restart of redeployed units.", "restarted", "restart_ms",
			[]float64{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}},
	} {
		ms, err := stepDurations(ctx, db, h.step, h.key)
		if err != nil {
			p.err = err
			return p
		}
		p.family(h.name, "histogram", h.help)
		p.histogram(h.name, h.buckets, ms)
	}
	return p
}

// promWriter writes the text exposition format, keeping the first write error.
type promWriter struct {
	w   io.Writer
	err error
}

func (p *promWriter) printf(format string, a ...any) {
	if p.err == nil {
		_, p.err = fmt.Fprintf(p.w, format, a...)
	}
}

func (p *promWriter) family(name, typ, help string) {
	p.printf("# HELP %s %s\n# TYPE %s %s\n", name, strings.NewReplacer(`\`, `\\`, "\n", `\n`).Replace(help), name, typ)
}

func (p *promWriter) gauge(name, typ, help string, v float64) {
	p.family(name, typ, help)
	p.sample(name, nil, v)
}

func (p *promWriter) counter(name, help, label string, m map[string]int64) {
	p.family(name, "counter", help)
	for _, k := range slices.Sorted(maps.Keys(m)) {
		p.sample(name, []string{label, k}, float64(m[k]))
	}
}

func (p *promWriter) counters(name, help string, labels []string, m map[[2]string]int64) {
	p.family(name, "counter", help)
	for _, k := range slices.SortedFunc(maps.Keys(m), func(a, b [2]string) int { return slices.Compare(a[:], b[:]) }) {
		p.sample(name, []string{labels[0], k[0], labels[1], k[1]}, float64(m[k]))
	}
}

func (p *promWriter) sample(name string, labels []string, v float64) {
	esc := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)
	var pairs []string
	for i := 0; i+1 < len(labels); i += 2 {
		pairs = append(pairs, labels[i]+`="`+esc.Replace(labels[i+1])+`"`)
	}
	if len(pairs) > 0 {
		name += "{" + strings.Join(pairs, ",") + "}"
	}
	p.printf("%s %s\n", name, strconv.FormatFloat(v, 'g', -1, 64))
}

func (p *promWriter) histogram(name string, buckets []float64, ms []float64) {
	var sum float64
	for _, v := range ms {
		sum += v / 1000
	}
	for _, le := range buckets {
		n := len(slices.DeleteFunc(slices.Clone(ms), func(v float64) bool { return v/1000 > le }))
		p.sample(name+"_bucket", []string{"le", strconv.FormatFloat(le, 'g', -1, 64)}, float64(n))
	}
	p.sample(name+"_bucket", []string{"le", "+Inf"}, float64(len(ms)))
	p.sample(name+"_sum", nil, sum)
	p.sample(name+"_count", nil, float64(len(ms)))
}

// handleEvents lists rows newest first, with the events command's filters, paged by next_before_id.
func (s *server) handleEvents(w http.ResponseWriter, r *http.Request) {
	if !s.apiAuthorized(w, r) {
		return
	}
	f, err := parseEventFilter(r.URL.Query().Get, s.now())
	if err != nil {
		manualError(w, r, http.StatusBadRequest, "bad-filter", err.Error())
		return
	}
	evs, err := queryEvents(r.Context(), s.events.reader, f)
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

// handleDelivery answers one delivery's story: its outcome and every row, oldest first.
func (s *server) handleDelivery(w http.ResponseWriter, r *http.Request) {
	if !s.apiAuthorized(w, r) {
		return
	}
	id := r.PathValue("id")
	if !reDeliveryID.MatchString(id) {
		manualError(w, r, http.StatusBadRequest, "bad-delivery", "invalid delivery id")
		return
	}
	v, ok, err := deliveryStory(r.Context(), s.events.reader, id, s.now(), time.UTC)
	switch {
	case err != nil:
		s.log.errorf("deliveries api: %v", err)
		manualError(w, r, http.StatusInternalServerError, "query-failed", "cannot read the event log")
	case !ok:
		manualError(w, r, http.StatusNotFound, "not-found", "no events for delivery "+id)
	default:
		answer := map[string]any{"delivery": id, "events": v.Events, "outcome": v.Outcome.Class, "label": v.Outcome.Label}
		if v.Task != "" {
			answer["task_delivery"] = v.Task
		}
		if v.Wait != "" {
			answer["wait"], answer["wait_until"] = v.Wait, v.Until
		}
		replyJSON(w, http.StatusOK, answer)
	}
}

// The status page trades the manual token, posted once, for a cookie signed by a key derived from it
// (a new token ends every session); it runs no script: its CSP allows its stylesheet, by hash, and forms.
var statusCSP = func() string {
	sum := sha256.Sum256([]byte(statusStyle))
	return "default-src 'none'; style-src 'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'; " +
		"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
}()

// renderStatus writes one page with headers that forbid caching, framing and referrers.
func (s *server) renderStatus(w http.ResponseWriter, status int, v statusView) {
	var buf strings.Builder
	if err := statusTemplate.Execute(&buf, v); err != nil {
		s.log.errorf("status page %s: %v", v.Page, err)
		http.Error(w, "cannot render the status page", http.StatusInternalServerError)
		return
	}
	h := w.Header()
	h.Set("Content-Security-Policy", statusCSP)
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Cache-Control", "no-store")
	writeHead(w, status, "text/html; charset=utf-8")
	io.WriteString(w, buf.String())
}

// statusSession is a session cookie: expiry and its HMAC under a key derived from the token.
func statusSession(token string, expires time.Time) string {
	key := hmac.New(sha256.New, []byte(token))
	key.Write([]byte("webhook-auto-update status page session"))
	exp := strconv.FormatInt(expires.Unix(), 10)
	m := hmac.New(sha256.New, key.Sum(nil))
	m.Write([]byte(exp))
	return exp + "." + base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// validStatusSession accepts a session signed under token, unexpired and no longer than a login's.
func validStatusSession(token, value string, now time.Time) bool {
	exp, _, ok := strings.Cut(value, ".")
	n, err := strconv.ParseInt(exp, 10, 64)
	if token == "" || !ok || err != nil || n <= now.Unix() || n > now.Add(statusSessionTTL).Unix() {
		return false
	}
	return hmac.Equal([]byte(value), []byte(statusSession(token, time.Unix(n, 0))))
}

// statusNext is where a login returns to: a path on this server, else the overview.
func statusNext(next string) string {
	u, err := url.Parse(next)
	if err != nil || u.Scheme != "" || u.Host != "" || !strings.HasPrefix(next, "/") || strings.HasPrefix(next, "//") ||
		strings.ContainsAny(next, "\\\r\n") {
		return "/status/"
	}
	return next
}

// handleStatusLogin trades the posted manual token for a session cookie: HttpOnly, SameSite=Strict, Secure over TLS.
func (s *server) handleStatusLogin(w http.ResponseWriter, r *http.Request) {
	ri := info(r)
	ri.action = "status-login"
	next := statusNext(r.PostFormValue("next"))
	client, _, _ := net.SplitHostPort(r.RemoteAddr)
	switch wait := s.logins.wait(client, s.now(), false); {
	case wait > 0:
		ri.meta["reason"] = "login-throttled"
		w.Header().Set("Retry-After", strconv.Itoa(int((wait+time.Second-1)/time.Second)))
		s.renderStatus(w, http.StatusTooManyRequests, statusView{Page: "login", Title: "Log in", Next: next,
			Message: "Too many failed logins from your address: wait a while before the next try."})
	case s.cfg.manualToken == "":
		ri.meta["reason"] = "no-token"
		s.renderStatus(w, http.StatusForbidden, statusView{Page: "no-token", Title: "Status page"})
	case !tokenMatches(s.cfg.manualToken, r.PostFormValue("token")):
		ri.meta["reason"] = "wrong-token"
		s.logins.wait(client, s.now(), true)
		s.renderStatus(w, http.StatusForbidden, statusView{Page: "login", Title: "Log in", Next: next,
			Message: "That is not the manual token: check WEBHOOK_MANUAL_TOKEN (or WEBHOOK_TOKEN) in the server's environment."})
	default:
		ri.meta["reason"] = "ok"
		http.SetCookie(w, statusCookieFor(r, statusSession(s.cfg.manualToken, s.now().Add(statusSessionTTL)), int(statusSessionTTL/time.Second)))
		http.Redirect(w, r, next, http.StatusSeeOther)
	}
}

// loginLimit: after count failed logins each makes the client wait, from 1 s doubling up to span.
var loginLimit, maxLoginClients = window{count: 5, span: 15 * time.Minute}, 4096

// loginThrottle counts failed logins by client address, forgetting the stalest past maxLoginClients.
type loginThrottle struct {
	mu    sync.Mutex
	fails map[string]*loginFails
}

type loginFails struct {
	n           int
	last, until time.Time
}

// wait is how long client must wait for its next login; with failed, counting a failure first.
func (t *loginThrottle) wait(client string, now time.Time, failed bool) time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	f := cmp.Or(t.fails[client], &loginFails{})
	if failed {
		if t.fails[client] != f || now.Sub(f.last) > loginLimit.span {
			if len(t.fails) >= maxLoginClients {
				delete(t.fails, slices.MinFunc(slices.Collect(maps.Keys(t.fails)), func(a, b string) int { return t.fails[a].last.Compare(t.fails[b].last) }))
			}
			f = &loginFails{}
			t.fails[client] = f
		}
		if f.n, f.last = f.n+1, now; f.n >= loginLimit.count {
			f.until = now.Add(min(time.Second<<min(f.n-loginLimit.count, 20), loginLimit.span))
		}
	}
	return max(f.until.Sub(now), 0)
}

func statusCookieFor(r *http.Request, value string, maxAge int) *http.Cookie {
	c := &http.Cookie{Name: statusCookie, Value: value, Path: "/", MaxAge: maxAge, HttpOnly: true, SameSite: http.SameSiteStrictMode,
		Secure: r.TLS != nil || r.Header.Get("X-Forwarded-Proto") == "https"}
	if maxAge > 0 {
		c.Expires = time.Now().Add(time.Duration(maxAge) * time.Second)
	}
	return c
}

// handleStatusLogout clears the cookie; the session itself lasts until expiry or a new token.
func (s *server) handleStatusLogout(w http.ResponseWriter, r *http.Request) {
	info(r).action = "status-logout"
	http.SetCookie(w, statusCookieFor(r, "", -1))
	http.Redirect(w, r, "/status/", http.StatusSeeOther)
}

// statusPage renders build's view to a valid session, else the login page; a failed read, the error page.
func (s *server) statusPage(w http.ResponseWriter, r *http.Request, page string, build func() (int, statusView, error)) {
	info(r).action = "status-page"
	switch user, refused := s.pageUser(r); {
	case refused:
		s.renderStatus(w, http.StatusForbidden, statusError("Status page", "Forward auth is on: open the page through the proxy of WEBHOOK_FORWARD_AUTH_FROM."))
	case user == "" && s.cfg.manualToken == "":
		s.renderStatus(w, http.StatusForbidden, statusView{Page: "no-token", Title: "Status page"})
	case user == "":
		next := r.URL.Path
		if r.URL.RawQuery != "" {
			next += "?" + r.URL.RawQuery
		}
		s.renderStatus(w, http.StatusOK, statusView{Page: "login", Title: "Log in", Next: next})
	default:
		status, v, err := build()
		if err != nil {
			s.log.errorf("status page %s: cannot read the event log: %v", page, err)
			status, v = http.StatusInternalServerError, statusError("Error", "Cannot read the event log; the server's log says why.")
		}
		s.renderStatus(w, status, v)
	}
}

// forwardedUser is WEBHOOK_FORWARD_AUTH_HEADER's user on a request from WEBHOOK_FORWARD_AUTH_FROM;
// refused: forward auth is on and the request came from elsewhere, so neither header nor token counts.
func (s *server) forwardedUser(r *http.Request) (user string, refused bool) {
	if s.cfg.forwardAuthHeader == "" {
		return "", false
	}
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil || !slices.ContainsFunc(s.cfg.forwardAuthFrom, func(p netip.Prefix) bool { return p.Contains(ap.Addr().Unmap()) }) {
		return "", true
	}
	return cleanText(r.Header.Get(s.cfg.forwardAuthHeader), manualTextMax), false
}

// pageUser is who asks for a status page: the proxy's user, else "status page" for a valid session.
func (s *server) pageUser(r *http.Request) (user string, refused bool) {
	if user, refused = s.forwardedUser(r); user != "" || refused {
		return user, refused
	}
	if c, err := r.Cookie(statusCookie); err == nil && validStatusSession(s.cfg.manualToken, c.Value, s.now()) {
		return "status page", false
	}
	return "", false
}

// apiAuthorized checks the manual token of a GET of the events API, or the proxy's user.
func (s *server) apiAuthorized(w http.ResponseWriter, r *http.Request) bool {
	info(r).action = "events-api"
	switch user, refused := s.forwardedUser(r); {
	case refused:
		manualError(w, r, http.StatusForbidden, "not-from-proxy", "forward auth is on: come through the proxy of WEBHOOK_FORWARD_AUTH_FROM")
	case user == "" && !tokenMatches(s.cfg.manualToken, requestToken(r)):
		manualError(w, r, http.StatusUnauthorized, "unauthorized", "unauthorized")
	default:
		return true
	}
	return false
}

// handleStatusAction runs a page button (approve, reject, retry a delivery; redeploy a unit, maybe forced).
func (s *server) handleStatusAction(w http.ResponseWriter, r *http.Request) {
	ri := info(r)
	ri.action = "status-action"
	user, _ := s.pageUser(r)
	if user == "" {
		s.renderStatus(w, http.StatusForbidden, statusError("Not logged in", "Log in, then repeat the action."))
		return
	}
	status, text, back := http.StatusOK, "", "/status/deliveries/"+r.PathValue("id")
	if unit := r.PathValue("unit"); unit != "" {
		back = "/status/"
		spec, err := resolveUnit(unit)
		ref, rerr := parseImageRef(r.PostFormValue("image"))
		if err = cmp.Or(err, rerr); err != nil {
			status, text = http.StatusBadRequest, err.Error()
		} else if res := s.startManual(r.Context(), taskSpec{unit: spec, image: ref.String(), event: "manual", delivery: "manual-" + ri.id,
			path: r.URL.Path, force: r.PostFormValue("force") != ""}); res.err != nil {
			status, text = http.StatusInternalServerError, res.err.Error()
		} else {
			text = "Redeploy of " + spec + " started as " + taskUnitName("manual-"+ri.id) + "."
		}
		ri.meta["unit"], ri.meta["caller"], ri.meta["image"] = spec, user, ref.String()
	} else {
		status, text = s.decide(r, r.PathValue("id"), r.PathValue("decision"), user, r.PostFormValue("reason"))
	}
	s.renderStatus(w, status, statusView{Page: "done", Title: "Done", Nav: true, Message: text, Next: back})
}

func statusError(title, message string) statusView {
	return statusView{Page: "error", Title: title, Nav: true, Message: message}
}

// handleStatusOverview shows every unit, the queue and the chart; it refreshes every 30 s.
func (s *server) handleStatusOverview(w http.ResponseWriter, r *http.Request) {
	s.statusPage(w, r, "overview", func() (int, statusView, error) {
		ctx, now := r.Context(), s.now()
		v := statusView{Page: "overview", Title: "Overview", Nav: true, Refresh: true, Now: statusTime(now.Unix(), time.Local)}
		var err error
		if v.Units, err = statusUnits(ctx, s.events.reader, time.Local); err != nil {
			return 0, v, err
		}
		for i, u := range v.Units {
			if u.Last != nil && u.Last.Outcome.Class == "failed" {
				v.Failing++
			}
			v.Units[i].Policy, v.Units[i].PolicyError = s.policyText(ctx, u.Unit)
		}
		var oldest time.Time
		if v.Pending, oldest, err = queueStats(ctx, s.events.reader); err == nil && v.Pending > 0 {
			v.Oldest = max(now.Sub(oldest), 0).Truncate(time.Second).String()
			v.Waiting, err = countsBy(ctx, s.events.reader, waitingSQL)
		}
		if err == nil {
			v.Chart, err = redeployChart(ctx, s.events.reader, now, time.Local)
		}
		return http.StatusOK, v, err
	})
}

// policyText says what a unit's policy holds its redeploys for, or why it cannot be followed.
func (s *server) policyText(ctx context.Context, unit string) (text, problem string) {
	p, err := s.unitPolicy(ctx, unit)
	opens := s.now()
	if err == nil {
		opens, err = p.windowOpens(ctx, opens)
	}
	if err != nil {
		return "", err.Error()
	}
	if text = fmt.Sprintf("cooldown %s; approval %t", p.cooldown, p.approve); p.window != "" {
		text += fmt.Sprintf("; window %s for %s, open from %s", p.window, p.length, statusTime(opens.Unix(), time.Local))
	}
	return text, ""
}

// handleStatusDeliveries lists deliveries newest first, by ?unit= and ?outcome=, paged by ?before=.
func (s *server) handleStatusDeliveries(w http.ResponseWriter, r *http.Request) {
	s.statusPage(w, r, "deliveries", func() (int, statusView, error) {
		q := r.URL.Query()
		v := statusView{Page: "deliveries", Title: "Deliveries", Nav: true, Outcomes: outcomeClasses,
			Filter: deliveryFilter{Outcome: q.Get("outcome")}}
		var problem, err error
		if u := strings.TrimSpace(q.Get("unit")); u != "" {
			v.Filter.Unit, problem = resolveUnit(u)
		}
		if v.Filter.Outcome != "" && !slices.Contains(outcomeClasses, v.Filter.Outcome) {
			problem = errors.New("unknown outcome: choose one of " + strings.Join(outcomeClasses, ", "))
		}
		if b := q.Get("before"); b != "" {
			if v.Filter.Before, err = strconv.ParseInt(b, 10, 64); err != nil || v.Filter.Before <= 0 {
				problem = errors.New("invalid before: want the id of a delivery row")
			}
		}
		if problem != nil {
			return http.StatusBadRequest, statusError("Deliveries", problem.Error()), nil
		}
		v.Deliveries, v.Older, err = statusDeliveries(r.Context(), s.events.reader, v.Filter, time.Local)
		return http.StatusOK, v, err
	})
}

func (s *server) handleStatusStory(w http.ResponseWriter, r *http.Request) {
	s.statusPage(w, r, "delivery", func() (int, statusView, error) {
		id := r.PathValue("id")
		if !reDeliveryID.MatchString(id) {
			return http.StatusBadRequest, statusError("Delivery", "invalid delivery id"), nil
		}
		story, ok, err := deliveryStory(r.Context(), s.events.reader, id, s.now(), time.Local)
		if !ok {
			return http.StatusNotFound, statusError("Delivery", "The event log has no row of delivery "+id+"."), err
		}
		return http.StatusOK, statusView{Page: "story", Title: "Delivery " + id, Nav: true, Story: story}, err
	})
}
