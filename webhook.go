// webhook.go owns the HTTP surface of `webhook-auto-update server`: the listeners, the routes of
// SPEC.md, the static web UI, and the per-request event row.
//
// Rules: every request, including 404s, 405s and refused bodies, produces exactly one event_log
// row, written by the middleware in ServeHTTP unless a handler committed it itself. Query strings
// are redacted before they are logged or stored. Bodies are capped (WEBHOOK_MAX_BODY_BYTES → 413).
// No path containing a ".." segment, however encoded, reaches a handler, and static files are
// opened through os.Root so nothing outside the web dist directory can be served.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log"
	"mime"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path"
	"strings"
	"sync"
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
		c.log.warnf("in-flight requests did not finish within %s: %v", cfg.shutdownTimeout, err)
	}
	srv.wait()
	if err := events.Close(); err != nil {
		c.log.warnf("closing the event log: %v", err)
	}
	return status
}

// server is the HTTP handler: a ServeMux for routing (it answers 404 and 405 with Allow) wrapped
// by ServeHTTP for the cross-cutting rules.
type server struct {
	cfg    *config
	log    *logger
	events *eventLog
	mux    *http.ServeMux
	now    func() time.Time
	tasks  sync.WaitGroup // background work started by handlers, waited for at shutdown
}

func newServer(cfg *config, lg *logger, events *eventLog) *server {
	s := &server{cfg: cfg, log: lg, events: events, mux: http.NewServeMux(), now: time.Now}
	s.mux.HandleFunc("GET /health", s.handleHealth)
	s.mux.HandleFunc("GET /sse/hello", s.handleHello)
	for _, p := range []string{"/{$}", "/index.html", "/assets/", "/favicon.ico", "/vite.svg"} {
		s.mux.HandleFunc("GET "+p, s.handleStatic)
	}
	return s
}

func (s *server) wait() { s.tasks.Wait() }

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
	start := s.now()
	ri := &requestInfo{id: newRequestID(), meta: map[string]any{}}
	sw := &statusWriter{ResponseWriter: w}
	sw.Header().Set("X-Request-Id", ri.id)
	r = r.WithContext(context.WithValue(r.Context(), requestInfoKey{}, ri))
	r.Body = http.MaxBytesReader(sw, r.Body, s.cfg.maxBodyBytes)

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
	if ri.recorded {
		return
	}
	s.events.Record(s.requestEvent(r, ri, sw.status, s.now().Sub(start)))
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

func (s *server) handleHealth(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Write([]byte("ok"))
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
