// webhook.go owns the HTTP surface of `webhook-auto-update server`: the listeners, the routing,
// the GitHub delivery route, the registry push routes (/registry/<source>/<unit>: each source's
// authentication and secret), the checks every push shares before it is queued, the static web
// UI, the observability routes and the per-request event row. The manual-trigger handlers live
// with the other triggers in scheduler.go; payload parsing lives in podman.go; the status page's
// handlers (routed here: / without a web dist bundle, and /status/) live in eventlog.go.
//
// Rules: every request that reaches the handler, including 404s, 405s and refused bodies,
// produces exactly one event_log row, written by the middleware in ServeHTTP unless a handler
// committed it itself; a request line and headers over maxHeaderBytes are refused by net/http
// (431) before that. Every value a row stores from a request is cut to maxFieldBytes, and query
// strings and the token segment of a registry path are redacted before they are logged or
// stored. A push source whose secret is unset refuses every request (500), and every secret is
// compared in constant time. Bodies are capped (WEBHOOK_MAX_BODY_BYTES → 413), and all bodies in
// memory together are bounded (WEBHOOK_BODY_BUDGET_BYTES → 503 with Retry-After). A request with
// both Content-Length and Transfer-Encoding is 400 and ends its connection (framedConn). A
// refused payload is saved at most once a second, never while its client waits. No path
// containing a ".." segment, however encoded, reaches a handler, and static files are opened
// through os.Root so nothing outside the web dist directory can be served, and without
// blocking, so a FIFO cannot hold a request.
package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log"
	"maps"
	"mime"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path"
	"regexp"
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
	from := ""
	if cfg.envFile != "" {
		from = " (settings also from " + cfg.envFile + ")"
	}
	c.log.infof("state directory %s, event log %s%s", cfg.stateDir, cfg.dbPath, from)
	if cfg.secret == "" {
		c.log.warnf("GITHUB_WEBHOOK_SECRET is not set: every GitHub delivery will be refused with 500")
	}
	if cfg.token == "" {
		also := ", and so do the manual API and /api/events (or set WEBHOOK_MANUAL_TOKEN for them)"
		if cfg.manualToken != "" {
			also = ""
		}
		c.log.warnf("WEBHOOK_TOKEN is not set: /auto-update refuses every request with 401%s", also)
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

	srv := newServer(cfg, c.log, events)
	hs := newHTTPServer(cfg, srv, c.log)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	serveErr := make(chan error, len(listeners))
	for _, l := range listeners {
		c.log.infof("listening on %s", l.Addr())
		go func(l net.Listener) { serveErr <- hs.Serve(framedListener{l}) }(l)
	}
	if err := sd.notify("READY=1"); err != nil {
		c.log.warnf("readiness notification failed: %v", err)
	}
	go sd.runWatchdog(ctx, c.log)
	dctx, stopDispatcher := context.WithCancel(context.Background())
	dispatcherDone := make(chan struct{})
	go func() { defer close(dispatcherDone); srv.runDispatcher(dctx) }()

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
	// Claims not yet dispatched stay pending for the next start; a systemd-run under way is
	// finished and recorded (bounded by dispatchTimeout).
	stopDispatcher()
	<-dispatcherDone
	if ev := srv.probes.take(time.Now(), true); ev != nil {
		events.Record(*ev)
	}
	if err := events.Close(); err != nil {
		c.log.warnf("closing the event log: %v", err)
	}
	return status
}

// maxHeaderBytes bounds a request line and its header fields (net/http answers 431 above it,
// without a row): GitHub's deliveries need a few KB, and a 1 MB request line must not get in.
const maxHeaderBytes = 16 << 10

// newHTTPServer is the http.Server that serves h with cfg's timeouts and header bound. Serve it
// on a framedListener, so h can refuse a request whose framing is ambiguous (see framedConn).
func newHTTPServer(cfg *config, h http.Handler, lg *logger) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: cfg.readHeaderTimeout,
		ReadTimeout:       cfg.readTimeout,
		WriteTimeout:      cfg.writeTimeout,
		IdleTimeout:       cfg.idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          log.New(lg, "", 0),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if fc, ok := c.(*framedConn); ok {
				ctx = context.WithValue(ctx, framedConnKey{}, fc)
			}
			return ctx
		},
	}
}

// framedListener hands out connections that note how each request on them is framed.
type framedListener struct{ net.Listener }

func (l framedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &framedConn{Conn: c}, nil
}

type framedConnKey struct{}

// framedConn reads the request heads of a connection as they pass to net/http and notes, for
// each, whether it carried both Content-Length and Transfer-Encoding. net/http honours the
// Transfer-Encoding and deletes the Content-Length before a handler runs, but a proxy in front
// may have used the Content-Length and read the rest of the body as a request of its own
// (request smuggling): RFC 9112 §6.1 wants such a request refused and the connection closed.
// Only heads are parsed: a Content-Length body is skipped by its length, and a request with a
// Transfer-Encoding is the last one read, because the server closes the connection after it.
type framedConn struct {
	net.Conn
	mu    sync.Mutex
	head  []byte       // the head being read, up to its blank line
	skip  int64        // body bytes to pass before the next head
	done  bool         // no more heads are read: the connection ends with the current request
	heads []framedHead // read, not yet claimed by a handler
}

// framedHead is what one request head said about its framing.
type framedHead struct {
	line string // the request line, to pair the head with its request
	both bool   // Content-Length and Transfer-Encoding were both present
}

func (c *framedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	c.scan(p[:n])
	c.mu.Unlock()
	return n, err
}

// scan follows the stream: body bytes are skipped, head bytes collected until the blank line.
func (c *framedConn) scan(b []byte) {
	for len(b) > 0 && !c.done {
		if c.skip > 0 {
			k := min(c.skip, int64(len(b)))
			c.skip -= k
			b = b[k:]
			continue
		}
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			i = len(b) - 1
		}
		c.head = append(c.head, b[:i+1]...)
		b = b[i+1:]
		if len(c.head) > maxHeaderBytes+4096 { // net/http refuses it and closes
			c.done = true
			return
		}
		if c.head[len(c.head)-1] != '\n' {
			return
		}
		if line := bytes.TrimRight(c.head[bytes.LastIndexByte(c.head[:len(c.head)-1], '\n')+1:], "\r\n"); len(line) == 0 {
			c.endHead()
		}
	}
}

// endHead records the head just read and sets how its body is framed.
func (c *framedConn) endHead() {
	lines := strings.Split(strings.TrimRight(string(c.head), "\r\n"), "\n")
	c.head = c.head[:0]
	if lines[0] == "" { // no request line: net/http answers 400 and closes
		c.done = true
		return
	}
	var cl, te bool
	var length string
	for _, l := range lines[1:] {
		name, value, _ := strings.Cut(strings.TrimRight(l, "\r"), ":")
		switch {
		case strings.EqualFold(name, "Content-Length"):
			cl, length = true, strings.TrimSpace(value)
		case strings.EqualFold(name, "Transfer-Encoding"):
			te = true
		}
	}
	c.heads = append(c.heads, framedHead{line: strings.TrimRight(lines[0], "\r"), both: cl && te})
	n, err := strconv.ParseInt(length, 10, 64)
	switch {
	case te || (cl && (err != nil || n < 0)):
		c.done = true
	case cl:
		c.skip = n
	}
}

// ambiguousFraming reports whether r came with both Content-Length and Transfer-Encoding. The
// heads before r's that no handler claimed (net/http answered them itself) are dropped.
func ambiguousFraming(r *http.Request) bool {
	c, ok := r.Context().Value(framedConnKey{}).(*framedConn)
	if !ok {
		return false
	}
	line := r.Method + " " + r.RequestURI + " " + r.Proto
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, h := range c.heads {
		if h.line == line {
			c.heads = c.heads[i+1:]
			return h.both
		}
	}
	return false
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

	inflight    sync.WaitGroup // handlers running, waited for at shutdown
	units       unitLookups    // the unit lookups of deliveries, reused for seconds
	wake        chan struct{}  // a claim was queued: the dispatcher looks at once (see enqueue)
	probes      probeSummary   // successful health and metrics probes, one row a minute
	bodies      *byteBudget    // request bodies in memory (WEBHOOK_BODY_BUDGET_BYTES)
	lastDump    atomic.Int64   // when saveRefused last wrote, unix nanoseconds
	healthCache healthCache

	reconciled time.Time // when the dispatcher last looked for half-done claims; its own

	// Process boundaries, swapped in tests.
	getenv   func(string) string
	environ  func() []string
	exe      string // this binary, run by systemd-run as run-task
	saveFile func(path string, data []byte, perm os.FileMode) error
	exec     func(ctx context.Context, timeout time.Duration, argv ...string) cmdResult
}

func newServer(cfg *config, lg *logger, events *eventLog) *server {
	s := &server{cfg: cfg, log: lg, events: events, metrics: newMetrics(time.Now()), mux: http.NewServeMux(), now: time.Now,
		getenv: os.Getenv, environ: os.Environ, exec: runCommand, saveFile: writeFileAtomic, wake: make(chan struct{}, 1),
		units: unitLookups{ttl: unitLookupTTL}, bodies: newByteBudget(cfg.bodyBudget)}
	s.exe, _ = os.Executable()
	s.mux.HandleFunc("POST /github-package-update/{unit}", s.handleGitHub)
	s.mux.HandleFunc("POST /github-package-update/{unit}/redeploy", s.handleGitHub)
	s.mux.HandleFunc("POST /registry/{source}/{unit}", s.handleRegistry)
	s.mux.HandleFunc("POST /registry/{source}/{unit}/{token}", s.handleRegistry)
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
	s.mux.HandleFunc("GET /status/{$}", s.handleStatusOverview)
	s.mux.HandleFunc("GET /status/deliveries", s.handleStatusDeliveries)
	s.mux.HandleFunc("GET /status/deliveries/{id}", s.handleStatusStory)
	s.mux.HandleFunc("POST /status/login", s.handleStatusLogin)
	s.mux.HandleFunc("POST /status/logout", s.handleStatusLogout)
	return s
}

// requestInfo travels with a request so handlers can name the action and add to the row's meta.
type requestInfo struct {
	id       string
	start    time.Time
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
	ri := &requestInfo{id: newRequestID(), start: start, meta: map[string]any{}}
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

	if r.TransferEncoding != nil {
		// The connection's later heads are not followed (see framedConn): it ends here.
		sw.Header().Set("Connection", "close")
	}
	switch {
	case ambiguousFraming(r):
		ri.action = "bad-framing"
		http.Error(sw, "a request must not have both Content-Length and Transfer-Encoding", http.StatusBadRequest)
	case hasDotDot(r.URL.Path):
		ri.action = "not-found"
		http.Error(sw, "not found", http.StatusNotFound)
	case r.ContentLength > s.cfg.maxBodyBytes:
		ri.action = "body-too-large"
		http.Error(sw, "request body too large", http.StatusRequestEntityTooLarge)
	default:
		release, ok := s.bodies.reserve(r.Context(), bodyReservation(r, s.cfg.maxBodyBytes))
		if !ok {
			ri.action = "body-budget"
			sw.Header().Set("Retry-After", "5")
			http.Error(sw, "too many request bodies in progress; retry in a few seconds", http.StatusServiceUnavailable)
			break
		}
		defer release()
		s.mux.ServeHTTP(sw, r)
	}
	if sw.status == 0 {
		sw.status = http.StatusOK
	}
	s.finish(r, ri, sw.status, start)
}

// bodyReservation is how many bytes of the body budget a request holds while it is handled: its
// Content-Length, or the body cap when it is chunked.
func bodyReservation(r *http.Request, maxBody int64) int64 {
	if r.ContentLength < 0 {
		return maxBody
	}
	return min(r.ContentLength, maxBody)
}

// bodyBudgetWait is how long a request waits for room in the body budget before it is refused.
const bodyBudgetWait = 2 * time.Second

// byteBudget bounds the request bodies the server holds in memory at once: a request reserves
// its body's bytes before a handler reads them and frees them when it is answered, so hundreds
// of concurrent 5 MiB bodies, signed or not, cannot take the process's memory.
type byteBudget struct {
	mu    sync.Mutex
	total int64
	free  int64
	freed chan struct{} // closed (and replaced) whenever bytes are freed
}

func newByteBudget(total int64) *byteBudget {
	return &byteBudget{total: total, free: total, freed: make(chan struct{})}
}

// reserve takes n bytes (at most the whole budget), waiting up to bodyBudgetWait for them, and
// returns their release; ok is false when they did not come free in time.
func (b *byteBudget) reserve(ctx context.Context, n int64) (release func(), ok bool) {
	n = min(n, b.total)
	if n <= 0 {
		return func() {}, true
	}
	t := time.NewTimer(bodyBudgetWait)
	defer t.Stop()
	for {
		b.mu.Lock()
		if n <= b.free {
			b.free -= n
			b.mu.Unlock()
			return func() {
				b.mu.Lock()
				b.free += n
				close(b.freed)
				b.freed = make(chan struct{})
				b.mu.Unlock()
			}, true
		}
		freed := b.freed
		b.mu.Unlock()
		select {
		case <-freed:
		case <-t.C:
			return nil, false
		case <-ctx.Done():
			return nil, false
		}
	}
}

// readBody reads a request's body; one with a Content-Length into a buffer of that size, so a
// body takes the memory its reservation counted and no more.
func readBody(r *http.Request) ([]byte, error) {
	if r.ContentLength <= 0 {
		return io.ReadAll(r.Body)
	}
	b := make([]byte, r.ContentLength)
	if _, err := io.ReadFull(r.Body, b); err != nil {
		return nil, err
	}
	return b, nil
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
	d := s.now().Sub(start)
	if status == http.StatusOK && (r.Pattern == "GET /health" || r.Pattern == "GET /metrics") {
		if ev := s.probes.add(r.Pattern, d, s.now()); ev != nil {
			s.events.Record(*ev)
		}
		return
	}
	s.events.Record(s.requestEvent(r, ri, status, d))
}

// requestEvent builds the event_log row of a request.
func (s *server) requestEvent(r *http.Request, ri *requestInfo, status int, d time.Duration) event {
	action := ri.action
	if action == "" {
		action = defaultAction(r.Pattern, status)
	}
	meta := ri.meta
	meta["path"] = redactPath(r.URL.Path)
	if q := redactQuery(r.URL.RawQuery); q != "" {
		meta["query"] = q
	}
	if r.RemoteAddr != "" {
		meta["remote_addr"] = r.RemoteAddr
	}
	for k, v := range meta {
		meta[k] = boundValue(v)
	}
	return event{RequestID: ri.id, TS: s.now(), Method: boundField(r.Method), Path: boundField(redactPath(r.URL.Path)),
		Status: status, Action: action, Duration: d, Meta: meta}
}

// maxFieldBytes bounds each value a request row stores (path, query, header-derived meta), so
// that a client, signed in or not, adds at most a few KB to the database per request.
const maxFieldBytes = 1024

// boundField cuts s to maxFieldBytes (at a rune boundary) and marks the cut with the original
// length, so the row still says how large the value was.
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

// boundValue applies boundField to a meta value: a string, or each string of a list.
func boundValue(v any) any {
	switch v := v.(type) {
	case string:
		return boundField(v)
	case []string:
		out := make([]string, len(v))
		for i, s := range v {
			out[i] = boundField(s)
		}
		return out
	}
	return v
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

// handleStatic serves the web UI bundle: regular files only, anything else is 404. os.Root
// refuses any name, symlinks included, that resolves outside the dist directory. Without a
// bundle, / is the built-in status page.
func (s *server) handleStatic(w http.ResponseWriter, r *http.Request) {
	name := strings.TrimPrefix(r.URL.Path, "/")
	if name == "" {
		name = "index.html"
	}
	root, err := os.OpenRoot(s.cfg.webDist)
	if err != nil {
		if r.URL.Path == "/" {
			s.handleStatusOverview(w, r)
			return
		}
		if name == "index.html" {
			http.Error(w, "web ui not built", http.StatusNotFound)
			return
		}
		http.NotFound(w, r)
		return
	}
	defer root.Close()
	// O_NONBLOCK: opening a FIFO (or a device) would otherwise wait for a writer, holding the
	// request and the server's shutdown; what is not a regular file is refused below.
	f, err := root.OpenFile(name, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		if r.URL.Path == "/" && errors.Is(err, fs.ErrNotExist) {
			s.handleStatusOverview(w, r)
			return
		}
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
	return checkHMAC(secret, body, hexSig, "X-Hub-Signature-256")
}

// checkHMAC checks that hexSig, taken from the named header, is the hex HMAC-SHA256 of body
// under secret, in constant time.
func checkHMAC(secret string, body []byte, hexSig, header string) error {
	got, err := hex.DecodeString(hexSig)
	if err != nil || len(got) != sha256.Size {
		return fmt.Errorf("%s is not 64 hex digits", header)
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

// saveRefused writes the first debugPayloadCap bytes of a body whose signature failed to the
// debug payload path, at most once a second, and reports whether it did. The write (an fsynced
// replace of up to 1 MiB) runs after the answer, so a flood of bad signatures costs one write a
// second and never a client's wait.
func (s *server) saveRefused(body []byte) bool {
	now, last := s.now().UnixNano(), s.lastDump.Load()
	if last != 0 && now-last < int64(time.Second) || !s.lastDump.CompareAndSwap(last, now) {
		return false
	}
	b := bytes.Clone(body[:min(len(body), debugPayloadCap)])
	s.inflight.Add(1) // counted with the handlers, whose end a shutdown past its bound waits for
	go func() {
		defer s.inflight.Done()
		if err := s.saveFile(s.cfg.debugPayloadPath, b, 0o600); err != nil {
			s.log.warnf("cannot save the refused payload to %s: %v", s.cfg.debugPayloadPath, err)
		}
	}()
	return true
}

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
// the order the README's "What happens on a delivery" lists, and the request path never pulls or
// restarts: GitHub gives up after 10 s, so the redeploy is handed to a transient systemd unit
// (run-task).
func (s *server) handleGitHub(w http.ResponseWriter, r *http.Request) {
	ri := info(r)
	ri.action = "github-webhook"
	if s.cfg.secret == "" {
		s.log.errorf("github delivery refused: GITHUB_WEBHOOK_SECRET is not set")
		reply(w, r, http.StatusInternalServerError, "secret-unset", "server misconfigured")
		return
	}
	body, ok := readPushBody(w, r)
	if !ok {
		return
	}
	if err := verifySignature(s.cfg.secret, body, r.Header.Get("X-Hub-Signature-256")); err != nil {
		sum := sha256.Sum256(body)
		ri.meta["body_bytes"] = len(body)
		ri.meta["body_sha256"] = hex.EncodeToString(sum[:])
		where := "not saved: one was saved less than a second ago"
		if ri.meta["payload_saved"] = s.saveRefused(body); ri.meta["payload_saved"] == true {
			where = "saved to " + s.cfg.debugPayloadPath
		}
		s.log.warnf("github delivery for %s refused: %v (body %d bytes, sha256 %x, %s)",
			boundField(r.URL.Path), err, len(body), sum, where)
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
	if refusePayload(w, r, err) {
		return
	}
	ri.meta["pushed"] = d.repo()
	if !slices.Contains(s.cfg.registryHosts, d.host) {
		s.log.warnf("github delivery for %s refused: registry host %s is not in WEBHOOK_REGISTRY_HOSTS", d.repo(), d.host)
		reply(w, r, http.StatusForbidden, "registry-not-allowed",
			"registry host "+d.host+" is not allowed: add it to WEBHOOK_REGISTRY_HOSTS to pull from it")
		return
	}
	d.id = deliveryID
	s.queuePush(w, r, unit, eventName, []delivery{d}, true)
}

// refusePayload answers the error of a payload parser, GitHub's or a registry's, and reports
// whether there was one: what is fine but not for us (*ignoredError) is 202 with its reason, a
// body that is not its source's JSON 400 invalid-json, and a push of an invalid image 400.
func refusePayload(w http.ResponseWriter, r *http.Request, err error) bool {
	var ign *ignoredError
	switch {
	case err == nil:
		return false
	case errors.As(err, &ign):
		reply(w, r, http.StatusAccepted, ign.reason, "ignored: "+ign.Error())
	case errors.Is(err, errInvalidJSON):
		reply(w, r, http.StatusBadRequest, "invalid-json", err.Error())
	default:
		reply(w, r, http.StatusBadRequest, "invalid-image", err.Error())
	}
	return true
}

// readPushBody reads a push notification's body (readBody), answering 413 past the body cap.
func readPushBody(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	body, err := readBody(r)
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			reply(w, r, http.StatusRequestEntityTooLarge, "body-too-large", "request body too large")
			return nil, false
		}
		reply(w, r, http.StatusBadRequest, "body-unreadable", "cannot read request body")
		return nil, false
	}
	return body, true
}

// queuePush runs the checks every authenticated and parsed push notification shares, GitHub's
// and the registries': the unit's image must match one of the pushes, the per-image limit must
// allow one more redeploy, and then the delivery is claimed and queued (enqueue). anyImage lets
// a unit whose Quadlet file names no image take the first pushed tag, which the task then checks
// against the unit's running container before it pulls (task.checkImage), as GitHub deliveries
// always could; a registry push redeploys only a unit whose image is known.
func (s *server) queuePush(w http.ResponseWriter, r *http.Request, unit, event string, pushes []delivery, anyImage bool) {
	ri := info(r)
	if len(pushes) == 1 {
		ri.meta["pushed"] = pushes[0].repo()
		ri.meta["tags"] = pushes[0].tags
		if pushes[0].digest != "" {
			ri.meta["digest"] = pushes[0].digest
		}
	} else {
		var pushed []string
		for _, p := range pushes[:min(len(pushes), 16)] {
			pushed = append(pushed, p.repo()+":"+strings.Join(p.tags, ","))
		}
		ri.meta["pushed"] = pushed
	}

	d, ref, status, reason, text := s.matchUnitImage(r.Context(), unit, pushes, anyImage)
	if status != 0 {
		reply(w, r, status, reason, text)
		return
	}
	image := ref.String()
	ri.meta["image"], ri.meta["delivery"] = image, d.id

	lim, err := imageLimiter(s.cfg, image).check(r.Context())
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
	if err := s.events.usable(); err != nil {
		s.log.errorf("delivery refused: %v", err)
		w.Header().Set("Retry-After", "60")
		reply(w, r, http.StatusServiceUnavailable, "database-replaced", "cannot record the delivery: the server's database was deleted or replaced; redeliver it after a restart")
		return
	}
	s.enqueue(w, r, taskSpec{unit: unit, image: image, event: event, delivery: d.id,
		path: redactPath(r.URL.Path), digest: d.digest})
}

// matchUnitImage picks the push to act on and the reference to pull. When the unit's Quadlet
// file names an Image=, a push must be for the same registry host and repository and carry its
// tag (of several that do, the last one, the newest, is taken), and a refusal names the check
// that failed; otherwise, with anyImage, the first pushed tag is used. A non-zero status is the
// answer to send instead.
func (s *server) matchUnitImage(ctx context.Context, unit string, pushes []delivery, anyImage bool) (delivery, imageRef, int, string, string) {
	configured, source, err := s.units.configuredImage(ctx, s.cfg, s.getenv, unit)
	if errors.Is(err, errUnitNotFound) {
		return delivery{}, imageRef{}, http.StatusNotFound, "unit-not-found", "unit " + unit + " not found"
	}
	if err != nil {
		s.log.errorf("cannot read the definition of %s: %v", unit, err)
		return delivery{}, imageRef{}, http.StatusInternalServerError, "unit-unreadable", "cannot read the unit definition"
	}
	if configured == "" && anyImage {
		return pushes[0], pushes[0].ref(pushes[0].tags[0]), 0, "", ""
	}
	if configured == "" {
		return delivery{}, imageRef{}, http.StatusAccepted, "unit-image-unknown",
			"ignored: " + unit + " names no image (Image= in its Quadlet .container file), so no registry push can match it"
	}
	want, err := parseImageRef(withDefaultTag(configured))
	if err != nil {
		// Not a "tag mismatch": nothing this unit names could ever match, and the operator must
		// see that in the sender's delivery log, not find a 202.
		s.log.errorf("%s names an image this program cannot match (%v): refusing the delivery", source, err)
		return delivery{}, imageRef{}, http.StatusInternalServerError, "unit-image-unreadable",
			"the unit's Image= is not a full image reference (registry/owner/name[:tag])"
	}
	var reason, text string
	for _, d := range slices.Backward(pushes) {
		if reason, text = imageMismatch(want, d.host, d.path, d.tags); reason == "" {
			return d, d.ref(want.tag), 0, "", ""
		}
	}
	return delivery{}, imageRef{}, http.StatusAccepted, reason, text // of the first push
}

// registrySource is a registry that may push to /registry/<name>/<unit>: how it authenticates
// and how its body is read (podman.go).
type registrySource struct {
	auth  func(secret string, r *http.Request, body []byte) error
	parse func(body []byte, h http.Header) ([]delivery, error)
}

// registrySources are the registries the README documents, by the name in the route. Each has
// its own secret, WEBHOOK_REGISTRY_TOKEN_<NAME> (registryTokenEnv).
var registrySources = map[string]registrySource{
	"distribution": {auth: bearerAuth, parse: distributionPushes},
	"harbor":       {auth: bearerAuth, parse: harborPushes},
	"gitea":        {auth: giteaAuth, parse: giteaPushes},
	"dockerhub":    {auth: urlTokenAuth, parse: dockerHubPushes},
	"quay":         {auth: urlTokenAuth, parse: quayPushes},
}

// registryTokenEnv names the variable holding a source's secret. isSecretEnv keeps it from child
// processes, as it does every WEBHOOK_*TOKEN* variable.
func registryTokenEnv(source string) string {
	return "WEBHOOK_REGISTRY_TOKEN_" + strings.ToUpper(source)
}

// bearerAuth accepts "Authorization: Bearer <secret>": what a Distribution endpoint's headers
// and Harbor's "Auth Header" are set to send.
func bearerAuth(secret string, r *http.Request, _ []byte) error {
	token, ok := bearerToken(r)
	if !ok {
		return errors.New("no Authorization: Bearer header")
	}
	if !tokenMatches(secret, token) {
		return errors.New("wrong bearer token")
	}
	return nil
}

// giteaAuth checks the hex HMAC-SHA256 of the body that Gitea sends as X-Gitea-Signature and
// Forgejo as X-Forgejo-Signature (it sends X-Gitea-Signature too).
func giteaAuth(secret string, r *http.Request, body []byte) error {
	header := "X-Gitea-Signature"
	sig := strings.TrimSpace(r.Header.Get(header))
	if sig == "" {
		header = "X-Forgejo-Signature"
		sig = strings.TrimSpace(r.Header.Get(header))
	}
	if sig == "" {
		return errors.New("no X-Gitea-Signature or X-Forgejo-Signature header")
	}
	return checkHMAC(secret, body, sig, header)
}

// urlTokenAuth accepts the secret as the path's last segment (/registry/<source>/<unit>/<secret>)
// or as ?token=, for registries that sign nothing and send no header of the operator's choice
// (Docker Hub, Quay). Both places are redacted in rows and logs (redactPath, redactQuery).
func urlTokenAuth(secret string, r *http.Request, _ []byte) error {
	token := r.PathValue("token")
	if token == "" {
		token = r.URL.Query().Get("token")
	}
	if token == "" {
		return errors.New("no token in the path or the query")
	}
	if !tokenMatches(secret, token) {
		return errors.New("wrong token")
	}
	return nil
}

// handleRegistry receives a push notification from a self-hosted registry for the unit in the
// path. Once the source's own authentication passed and its payload was read, the checks, claim
// and queue are a GitHub delivery's (queuePush). A registry that retries a refused event (as
// Distribution and Harbor do) sends the same event id, so its copies are duplicates.
func (s *server) handleRegistry(w http.ResponseWriter, r *http.Request) {
	ri := info(r)
	ri.action = "registry-webhook"
	name := r.PathValue("source")
	src, ok := registrySources[name]
	if !ok {
		reply(w, r, http.StatusNotFound, "unknown-source", "unknown registry source: want distribution, harbor, gitea, dockerhub or quay")
		return
	}
	ri.meta["source"] = name
	secret := s.cfg.registryTokens[name]
	if secret == "" {
		s.log.errorf("%s push refused: %s is not set", name, registryTokenEnv(name))
		reply(w, r, http.StatusInternalServerError, "secret-unset", "server misconfigured")
		return
	}
	body, ok := readPushBody(w, r)
	if !ok {
		return
	}
	if err := src.auth(secret, r, body); err != nil {
		s.log.warnf("%s push to %s refused: %v", name, redactPath(r.URL.Path), err)
		reply(w, r, http.StatusUnauthorized, "unauthorized", "unauthorized")
		return
	}
	unit, err := resolveUnit(r.PathValue("unit"))
	if err != nil {
		reply(w, r, http.StatusBadRequest, "invalid-unit", err.Error())
		return
	}
	ri.meta["unit"] = unit
	pushes, err := src.parse(body, r.Header)
	if refusePayload(w, r, err) {
		return
	}
	for i := range pushes {
		if pushes[i].id == "" { // a source with no event id: this request stands alone
			pushes[i].id = name + "-" + ri.id
		}
	}
	s.queuePush(w, r, unit, name, pushes, false)
}

// enqueue claims the delivery and answers 202 as soon as the claim and the request's row are
// committed: nothing on the request path waits for systemd-run. The dispatcher starts the task.
func (s *server) enqueue(w http.ResponseWriter, r *http.Request, spec taskSpec) {
	ri := info(r)
	ri.meta["reason"] = "queued"
	// Once its body is read, a delivery is recorded even if its client hangs up now.
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
		select { // wake the dispatcher; a wake-up already pending covers this claim too
		case s.wake <- struct{}{}:
		default:
		}
		reply(w, r, http.StatusAccepted, "queued", "auto-update queued")
	}
}

// The dispatcher: one goroutine takes the queue's claims in arrival order and starts a task for
// each unit and image (see queuedTask), one unit at a time: while a unit's task runs, its later
// claims wait, so a burst of deliveries starts at most one task per unit plus one after it. One
// consumer of a durable queue needs no lock of its own; a delivery only wakes it (s.wake).
const (
	dispatchTimeout  = 30 * time.Second      // bounds one systemd-run, which returns once the unit started
	dispatchAttempts = 5                     // systemd-runs tried for one task before its claims fail
	dispatchMaxAge   = 10 * time.Minute      // no retry for a claim queued longer than this
	dispatchPoll     = time.Second           // how often a queue waiting for running tasks is read
	dispatchIdle     = 30 * time.Second      // and an idle one (probe summaries, tasks that died)
	dispatchLookGap  = 50 * time.Millisecond // the least time between two looks a claim wakes
	taskCheckAfter   = 10 * time.Second      // a dispatched task not heard of for this long is looked up
)

// retryDelay is the wait before the next systemd-run of a task that failed attempts times.
func retryDelay(attempts int) time.Duration { return min(time.Second<<min(attempts, 6), time.Minute) }

// runDispatcher dispatches until ctx ends. It first settles what a previous server left
// half-done, so claims pending at a crash run once the server is back.
func (s *server) runDispatcher(ctx context.Context) {
	s.reconcile(ctx, "dispatching", s.now().Add(time.Second))
	for ctx.Err() == nil {
		looked := time.Now()
		wait := s.dispatchNext(ctx)
		if ev := s.probes.take(s.now(), false); ev != nil {
			s.events.Record(*ev)
		}
		if wait == 0 {
			continue
		}
		select {
		case <-ctx.Done():
		case <-s.wake:
			// A look reads the pending claims, and in a burst for one unit every claim wakes
			// one that finds the unit still busy: thousands a second, each reading thousands
			// of claims. Looks a claim wakes are dispatchLookGap apart instead (the wakes in
			// between fold into one), which delays a task by that much at most.
			sleepContext(ctx, dispatchLookGap-time.Since(looked))
		case <-time.After(wait):
		}
	}
}

// dispatchNext starts the next task that is due and returns how long to wait before looking
// again (0: at once).
func (s *server) dispatchNext(ctx context.Context) time.Duration {
	if now := s.now(); now.Sub(s.reconciled) >= dispatchPoll {
		s.reconciled = now
		s.reconcile(ctx, "dispatching", now.Add(-2*dispatchTimeout)) // a settle that failed
		s.reconcile(ctx, "dispatched", now.Add(-taskCheckAfter))
	}
	qt, ok, pending, err := s.events.nextTask(ctx, s.now(), func(qt queuedTask) []event {
		return dispatchRows(qt, "dispatching", http.StatusAccepted, s.now(), cmdResult{}, time.Time{})
	})
	switch {
	case err != nil:
		if ctx.Err() == nil {
			s.log.errorf("delivery queue: %v", err)
		}
		return dispatchPoll
	case ok:
		s.startTask(ctx, qt)
		return 0
	case pending > 0:
		return dispatchPoll
	}
	return dispatchIdle
}

// startTask runs systemd-run for qt and records the outcome for every claim it covers:
// dispatched, pending again for a retry with backoff, or failed once the attempts or the
// claim's age are used up. A started systemd-run is finished and recorded also at shutdown.
func (s *server) startTask(ctx context.Context, qt queuedTask) {
	bg := context.WithoutCancel(ctx)
	taskUnit := taskUnitName(qt.delivery)
	res := s.runTask(bg, qt.taskSpec)
	now := s.now()
	var status, reason, errText string
	var code int
	var retryAt time.Time
	switch {
	case res.err == nil:
		// The claims' "dispatching" rows, written as they were taken, and the task's own rows
		// tell the rest: only the status changes.
		status = "dispatched"
		s.log.infof("dispatched %s for %s (%s), covering %d deliveries", taskUnit, qt.unit, qt.image, len(qt.covered))
	case qt.attempts+1 < dispatchAttempts && now.Sub(qt.claimed) < dispatchMaxAge:
		status, reason, code, retryAt = "pending", "dispatch-retry", http.StatusServiceUnavailable, now.Add(retryDelay(qt.attempts))
		s.log.warnf("cannot dispatch the redeploy of %s (attempt %d of %d), retrying in %s: %v",
			qt.unit, qt.attempts+1, dispatchAttempts, retryDelay(qt.attempts), res.err)
	default:
		status, reason, code = "failed", "dispatch-failed", http.StatusInternalServerError
		s.log.errorf("cannot dispatch the redeploy of %s after %d attempts, giving up on delivery %s and %d it covers: %v",
			qt.unit, qt.attempts+1, qt.delivery, len(qt.covered)-1, res.err)
	}
	if res.err != nil {
		errText = res.err.Error()
	}
	s.metrics.dispatched(cmp.Or(reason, status))
	wctx, cancel := context.WithTimeout(bg, 3*busyTimeout)
	defer cancel()
	evs := dispatchRows(qt, reason, code, now, res, retryAt)
	if err := s.events.settleTask(wctx, taskUnit, status, errText, retryAt, evs); err != nil {
		s.log.errorf("cannot record the dispatch of %s (checked again later): %v", taskUnit, err)
		s.events.spill(evs, err)
	}
}

// dispatchRows are the rows of the claims qt covers saying reason ("dispatching",
// "dispatch-retry", "dispatch-failed"; "" none), with the command's result when it failed.
func dispatchRows(qt queuedTask, reason string, code int, now time.Time, res cmdResult, retryAt time.Time) []event {
	if reason == "" {
		return nil
	}
	evs := make([]event, 0, len(qt.covered))
	id := newRequestID() // the rows of one dispatch share an id, as a task's do
	for _, c := range qt.covered {
		meta := map[string]any{"delivery": c, "unit": qt.unit, "image": qt.image, "event": qt.event,
			"reason": reason, "attempt": qt.attempts + 1, "task_unit": taskUnitName(qt.delivery)}
		if c != qt.delivery {
			meta["covered_by"] = qt.delivery
		} else if len(qt.covered) > 1 {
			meta["covers"] = len(qt.covered)
		}
		if res.err != nil {
			meta["error"], meta["exit_code"] = res.err.Error(), res.exitCode
			if res.stderr != "" {
				meta["stderr"] = res.stderr
			}
		}
		if !retryAt.IsZero() {
			meta["retry_in_ms"] = retryAt.Sub(now).Milliseconds()
		}
		evs = append(evs, event{RequestID: id, TS: now, Method: "QUEUE", Path: qt.path, Status: code,
			Action: "github-dispatch", Duration: now.Sub(qt.claimed), Meta: meta})
	}
	return evs
}

// runTask starts run-task for spec as a transient user unit (systemd-run returns once the unit
// started). A systemd-run that failed although the task started (cut off at its time bound
// after the unit was up) counts as done: a second task would redeploy twice.
func (s *server) runTask(ctx context.Context, spec taskSpec) cmdResult {
	res := s.exec(ctx, dispatchTimeout, dispatchArgv(s.exe, s.cfg, s.environ(), spec)...)
	if res.err != nil {
		if st := s.taskState(ctx, spec.delivery); st == taskRunning || st == taskEnded {
			s.log.warnf("systemd-run for %s failed (%v), but %s has started", spec.unit, res.err, taskUnitName(spec.delivery))
			res.err = nil
		}
	}
	return res
}

// taskState is what is known of a task unit.
type taskState int

const (
	taskUnknown    taskState = iota // systemd could not be asked
	taskNotStarted                  // systemd does not know it and it wrote no row
	taskRunning
	taskEnded // it ran: systemd reports it ended, or it is collected and its rows are there
)

// taskState asks systemd about the task unit of a delivery; a finished task unit is collected
// (--collect) and unknown to systemd, so the task's own rows tell whether it ran.
func (s *server) taskState(ctx context.Context, delivery string) taskState {
	ctx, cancel := context.WithTimeout(ctx, unitLookupTimeout)
	defer cancel()
	p, err := showUnit(ctx, s.cfg, taskUnitName(delivery)+".service", "LoadState", "ActiveState")
	if err != nil {
		return taskUnknown
	}
	if p["LoadState"] == "loaded" {
		switch p["ActiveState"] {
		case "active", "activating", "deactivating", "reloading":
			return taskRunning
		}
		return taskEnded
	}
	rows, err := queryEvents(ctx, s.events.db, eventFilter{action: "github-task", delivery: delivery, limit: 1})
	switch {
	case err != nil:
		return taskUnknown
	case len(rows) > 0:
		return taskEnded
	}
	return taskNotStarted
}

// reconcile settles the claims left in status since before. Claims left 'dispatching' (the
// server stopped, or could not record, while systemd-run ran) become dispatched when their task
// started, else pending again; running it again is harmless, as an unchanged image is
// up-to-date. Claims 'dispatched' whose task unit is gone without run-task having marked them
// done (it was killed) become done, so their unit's queue moves on.
func (s *server) reconcile(ctx context.Context, status string, before time.Time) {
	tasks, err := s.events.tasksIn(ctx, status, before)
	if err != nil {
		if ctx.Err() == nil {
			s.log.errorf("delivery queue: %v", err)
		}
		return
	}
	for _, t := range tasks {
		st := s.taskState(ctx, t.delivery)
		var err error
		switch {
		case st == taskUnknown:
			continue // asked again next time
		case status == "dispatched" && st == taskRunning:
			err = s.events.settleTask(ctx, t.taskUnit, "dispatched", "", time.Time{}, nil)
		case status == "dispatched":
			s.log.warnf("%s for %s ended without recording its end (killed?)", t.taskUnit, t.unit)
			err = s.events.settleTask(ctx, t.taskUnit, "done", "the task ended without recording its end", time.Time{}, nil)
		case st == taskNotStarted:
			s.log.warnf("%s for %s was being dispatched when the server stopped: queued again", t.taskUnit, t.unit)
			err = s.events.settleTask(ctx, t.taskUnit, "pending", "the server stopped during systemd-run", s.now(), nil)
		default:
			err = s.events.settleTask(ctx, t.taskUnit, "dispatched", "", time.Time{}, nil)
		}
		if err != nil && ctx.Err() == nil {
			s.log.errorf("delivery queue: %s: %v", t.taskUnit, err)
		}
	}
}

// probeSummary folds successful /health and /metrics probes into one event row per minute:
// every request stays accounted for, but a monitor polling every second writes 1,440 rows a
// day, not 86,400, and the probe no longer pays for an insert. Probes arrive concurrently, so
// the counts are kept under a mutex.
type probeSummary struct {
	mu      sync.Mutex
	minute  time.Time        // start of the minute being counted; zero: nothing counted
	routes  map[string]int64 // probes by route pattern
	slowest time.Duration
}

// add counts one probe and returns the row of the previous minute when a new one began.
func (p *probeSummary) add(route string, d time.Duration, now time.Time) *event {
	p.mu.Lock()
	defer p.mu.Unlock()
	ev := p.takeLocked(now, false)
	if p.minute.IsZero() {
		p.minute, p.routes, p.slowest = now.Truncate(time.Minute), map[string]int64{}, 0
	}
	p.routes[route]++
	p.slowest = max(p.slowest, d)
	return ev
}

// take returns the summary row of a minute that has ended (any minute, with force) and resets.
func (p *probeSummary) take(now time.Time, force bool) *event {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.takeLocked(now, force)
}

func (p *probeSummary) takeLocked(now time.Time, force bool) *event {
	if p.minute.IsZero() || !force && now.Truncate(time.Minute).Equal(p.minute) {
		return nil
	}
	var n int64
	for _, c := range p.routes {
		n += c
	}
	ev := &event{RequestID: newRequestID(), TS: p.minute, Method: "GET", Status: http.StatusOK, Action: "probe-summary",
		Duration: p.slowest, Meta: map[string]any{"count": n, "routes": p.routes, "statuses": map[string]int64{"200": n},
			"slowest_ms": p.slowest.Milliseconds(), "from": p.minute.UTC().Format(time.RFC3339)}}
	p.minute, p.routes = time.Time{}, nil
	return ev
}

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

// handleHealth answers "ok", or 503 "fail: " and the failing checks; with ?verbose=1 or
// "Accept: application/json" it answers the checks as JSON and also probes that a write commits.
func (s *server) handleHealth(w http.ResponseWriter, r *http.Request) {
	h := s.checkHealth()
	if r.URL.Query().Get("verbose") == "" && !strings.Contains(r.Header.Get("Accept"), "application/json") {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if len(h.failing) > 0 {
			info(r).meta["failing"] = h.failing
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, "fail: "+strings.Join(h.failing, ", ")+"\n")
			return
		}
		w.Write([]byte("ok"))
		return
	}
	failing := h.failing
	db := maps.Clone(h.db)
	if err := s.probeHealth(); err != nil {
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
		body["status"], body["failing"] = "fail", failing
		status = http.StatusServiceUnavailable
	}
	info(r).meta["failing"] = failing
	replyJSON(w, status, body)
}

// healthCacheFor is how long one health check answers every /health: a check a second is
// enough for a monitor, and a flood of /health must neither queue for the database's write lock
// nor create a file per call.
const healthCacheFor = time.Second

// healthReport is the newest health check; read-only once built.
type healthReport struct {
	failing []string       // the failing checks: database, state_dir
	db      map[string]any // the database's part of the verbose answer
	body    map[string]any // the rest of the verbose answer
}

// healthCache holds the newest health check and write probe. Each mutex also makes concurrent
// callers share one check, and the probe, which may wait for the write lock, has its own, so
// that plain /health never waits for it.
type healthCache struct {
	mu     sync.Mutex
	at     time.Time
	report healthReport

	probeMu  sync.Mutex
	probeAt  time.Time
	probeErr error
}

// fresh reports whether a check made at at still answers now.
func fresh(at, now time.Time) bool {
	return !at.IsZero() && !now.Before(at) && now.Sub(at) < healthCacheFor
}

// checkHealth checks, at most once per healthCacheFor, that the database file at its path is
// the one open and that the log's newest write did not fail, and that the state directory takes
// a new file.
func (s *server) checkHealth() healthReport {
	c := &s.healthCache
	c.mu.Lock()
	defer c.mu.Unlock()
	if fresh(c.at, s.now()) {
		return c.report
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var failing []string
	db := map[string]any{"path": s.cfg.dbPath, "pending_writes": s.events.pending.Load(),
		"write_failures": s.events.failures.Load(), "writable": true}
	if v, err := s.events.schemaVersion(ctx); err == nil {
		db["schema_version"] = v
	}
	var dbErrs []string
	for _, err := range []error{s.events.usable(), s.events.lastWriteFailed()} {
		if err != nil {
			dbErrs = append(dbErrs, err.Error())
		}
	}
	if len(dbErrs) > 0 {
		db["writable"], db["error"] = false, strings.Join(dbErrs, "; ")
		failing = append(failing, "database")
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
		"state_dir":                state,
		"github_secret_configured": s.cfg.secret != "",
		"token_configured":         s.cfg.token != "",
		"manual_token_configured":  s.cfg.manualToken != "",
		"metrics_token_configured": s.cfg.metricsToken != "",
		"version":                  buildVersion(),
	}
	if tick, err := lastEvent(ctx, s.events.db, "scheduler"); err == nil && tick != nil {
		body["last_scheduler_tick"] = map[string]any{"time": tick.Time, "status": tick.Status}
	}
	c.at, c.report = s.now(), healthReport{failing: failing, db: db, body: body}
	return c.report
}

// probeHealth commits a write that changes nothing (see eventLog.probe), at most once per
// healthCacheFor, bounded by 2 s when another writer holds the lock.
func (s *server) probeHealth() error {
	c := &s.healthCache
	c.probeMu.Lock()
	defer c.probeMu.Unlock()
	if fresh(c.probeAt, s.now()) {
		return c.probeErr
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	c.probeErr = s.events.probe(ctx)
	c.probeAt = s.now()
	return c.probeErr
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
	// A delivery covered by another's task: that task's steps are the rest of its story.
	if leader := taskDelivery(evs); leader != "" {
		steps, err := queryEvents(r.Context(), s.events.db, eventFilter{action: "github-task", delivery: leader, afterID: -1})
		if err != nil {
			s.log.errorf("deliveries api: %v", err)
			manualError(w, r, http.StatusInternalServerError, "query-failed", "cannot read the event log")
			return
		}
		evs = append(evs, steps...)
		slices.SortFunc(evs, func(a, b storedEvent) int { return cmp.Compare(a.ID, b.ID) })
		answer["events"], answer["task_delivery"] = evs, leader
	}
	replyJSON(w, http.StatusOK, answer)
}

// taskDelivery returns the delivery whose task covered a delivery, when that is another
// delivery's (see queuedTask), or "".
func taskDelivery(evs []storedEvent) string {
	for _, e := range slices.Backward(evs) {
		leader, _ := e.Meta["covered_by"].(string)
		if e.Action == "github-dispatch" && e.Meta["reason"] == "dispatching" && reDeliveryID.MatchString(leader) {
			return leader
		}
	}
	return ""
}
