// eventlog.go owns the SQLite audit log: opening the database named by WEBHOOK_DB_URL, applying
// the embedded migrations, writing event_log rows, and reading them back for the events command,
// /api/events, /metrics and the built-in status page (its queries, handlers, session cookie,
// html/template text and SVG chart, in the last section).
//
// Rules: the event_log schema is the original tool's (migrations/0001), so a database it created
// keeps working. Every migration runs once, in its own BEGIN IMMEDIATE transaction that records
// it in schema_migrations and re-reads that table first, because another process may migrate the
// same file at the same moment. A database newer than this binary is refused. Rows are written
// by one background writer in batched transactions so logging never slows a request; a row that
// cannot be written is printed to stderr as one JSON line, so no event is silently lost. Secrets
// never reach a row: query strings pass through redactQuery. The log knows the device and inode
// of the file it opened and the outcome of its newest write, so /health can tell when its path
// names another file now (usable) or writes fail (lastWriteFailed). The status page only reads;
// what it shows from the log reaches HTML only through html/template; it runs no script and
// sends a Content-Security-Policy that allows nothing but its own hashed stylesheet and forms;
// the manual token is only ever posted to its login form, never put in a URL, a page or a log
// line.
package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"database/sql"
	"embed"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"html/template"
	"io"
	"io/fs"
	"math"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	_ "modernc.org/sqlite"
)

//go:embed migrations/*.sql
var migrationFiles embed.FS

// busyTimeout is how long a writer waits for another process's write lock before failing.
// taskBusyTimeout is run-task's: nobody waits for a task's rows, and when many tasks start at
// once (a host with many units, or 200 in the load test beside another test run) the last of
// them can wait behind all the others, since SQLite's busy handler serves no queue.
const (
	busyTimeout     = 10 * time.Second
	taskBusyTimeout = 2 * time.Minute
)

// event is one event_log row.
type event struct {
	RequestID string
	TS        time.Time
	Method    string
	Path      string
	Status    int
	Action    string
	Duration  time.Duration
	Meta      map[string]any
}

// eventLog is the open database plus its background writer.
type eventLog struct {
	db   *sql.DB
	path string
	log  *logger

	mu     sync.RWMutex // guards closed against a send on the closed queue
	closed bool
	queue  chan queued
	done   chan struct{}

	// writing admits one of this process's write transactions at a time. Without it, concurrent
	// writers (a burst of deliveries, each claiming and settling its id) wait for each other
	// inside SQLite's busy handler, which polls with sleeps of up to 100 ms and leaves the lock
	// idle in between: under 200 concurrent deliveries a claim waited a median 1.1 s and some
	// ran out of the request's budget. Here they queue in order and each waits only for the
	// transactions ahead of it; the busy timeout still covers other processes (run-task, prune).
	writing chan struct{}

	pending  atomic.Int64 // queued, not yet committed
	failures atomic.Int64 // rows that could not be written and went to stderr

	file         fileID       // the database file as opened, to tell when its path names another
	lastWriteOK  atomic.Int64 // when a write transaction last committed, unix nanoseconds
	lastWriteBad atomic.Int64 // when one last failed
	lastWriteErr atomic.Value // its error text
}

// fileID names a file by device and inode, which stay with the file when its path changes.
type fileID struct{ dev, ino uint64 }

func statID(path string) (fileID, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileID{}, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fileID{}, fmt.Errorf("stat %s: no device and inode", path)
	}
	return fileID{dev: uint64(st.Dev), ino: st.Ino}, nil
}

// usable reports an error when the database file at the log's path is no longer the one it
// opened: deleted (its writes go to an inode nobody will read) or replaced by another file. A
// delivery must not be claimed then: its claim would vanish, and a redelivery would run it again.
func (l *eventLog) usable() error {
	id, err := statID(l.path)
	if err == nil && id == l.file {
		return nil
	}
	how := "replaced by another file"
	if errors.Is(err, fs.ErrNotExist) {
		how = "deleted"
	} else if err != nil {
		how = err.Error()
	}
	return fmt.Errorf("the database file %s is not the one this server opened (%s): restart the server to open it again", l.path, how)
}

// lastWriteFailed reports the error of the newest write transaction when it failed; one that
// commits after it clears it.
func (l *eventLog) lastWriteFailed() error {
	if l.lastWriteBad.Load() <= l.lastWriteOK.Load() {
		return nil
	}
	msg, _ := l.lastWriteErr.Load().(string)
	return fmt.Errorf("the newest write to the database failed: %s", msg)
}

// probe commits a write that changes nothing (a row rewritten with its own values), so it needs
// the write lock and room for a page, as a row does; an empty transaction would commit on a
// full disk. It is not counted as a write of the log's own.
func (l *eventLog) probe(ctx context.Context) error {
	select {
	case l.writing <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("waiting for the database: %w", context.Cause(ctx))
	}
	defer func() { <-l.writing }()
	return l.writeTx(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `UPDATE schema_migrations SET applied_at = applied_at
			WHERE version = (SELECT max(version) FROM schema_migrations)`)
		return err
	})
}

// databasePath turns WEBHOOK_DB_URL (or --db) into a file path. It accepts a bare path and
// sqlite://PATH (sqlite:PATH too, as the original tool's sqlx did); a relative path is under the
// state directory. The only query accepted is mode=rwc, which original-tool URLs carry and which
// is what this program always does (read-write, created if missing). Anything else — another
// scheme, another parameter — is an error naming the variable: silently opening a different
// database than the operator wrote is worse than refusing to start.
func databasePath(dbURL, stateDir string) (string, error) {
	p := strings.TrimSpace(dbURL)
	bad := func(why string) (string, error) {
		return "", fmt.Errorf("invalid WEBHOOK_DB_URL=%q (or --db): %s; want sqlite://PATH or a bare PATH", dbURL, why)
	}
	switch {
	case strings.HasPrefix(p, "sqlite://"):
		p = strings.TrimPrefix(p, "sqlite://")
	case strings.HasPrefix(p, "sqlite:"):
		p = strings.TrimPrefix(p, "sqlite:")
	case reURLScheme.MatchString(p):
		return bad("only SQLite is supported, not " + reURLScheme.FindString(p) + " (a path with a colon must be written sqlite://PATH)")
	}
	if path, query, ok := strings.Cut(p, "?"); ok {
		p = path
		for _, kv := range strings.Split(query, "&") {
			if kv != "mode=rwc" && kv != "" {
				return bad(fmt.Sprintf("the query parameter %q is not supported (only mode=rwc, which is what this program does)", kv))
			}
		}
	}
	if p == "" || p == ":memory:" || strings.ContainsAny(p, "#\x00") {
		return bad("a file path is required")
	}
	if !filepath.IsAbs(p) {
		p = filepath.Join(stateDir, p)
	}
	return filepath.Clean(p), nil
}

// reURLScheme matches a URL scheme at the start of WEBHOOK_DB_URL ("postgres:", "file:").
var reURLScheme = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9+.-]*:`)

// openEventLog opens (creating 0600 if needed) and migrates the database, then starts the
// background writer. The caller must Close it to flush queued rows.
func openEventLog(path string, lg *logger) (*eventLog, error) {
	return openEventLogWaiting(path, lg, busyTimeout)
}

// openEventLogWaiting is openEventLog whose writers wait up to wait for another process's lock.
func openEventLogWaiting(path string, lg *logger, wait time.Duration) (*eventLog, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("cannot create the directory of database %s: %w (set --state-dir or WEBHOOK_STATE_DIR, or --db or WEBHOOK_DB_URL)", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("cannot open database %s: %w (set --state-dir or WEBHOOK_STATE_DIR, or --db or WEBHOOK_DB_URL)", path, err)
	}
	f.Close()
	dsn := "file:" + path + "?_pragma=busy_timeout(" + strconv.Itoa(int(wait/time.Millisecond)) + ")" +
		"&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)&_txlock=immediate"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("cannot open database %s: %w", path, err)
	}
	db.SetMaxOpenConns(4)
	ctx, cancel := context.WithTimeout(context.Background(), 2*wait)
	defer cancel()
	if err := migrate(ctx, db); err != nil {
		db.Close()
		return nil, fmt.Errorf("database %s: %w", path, err)
	}
	id, err := statID(path)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("database %s: %w", path, err)
	}
	l := &eventLog{db: db, path: path, log: lg, queue: make(chan queued, 4096), done: make(chan struct{}),
		writing: make(chan struct{}, 1), file: id}
	go l.writer()
	return l, nil
}

// migration is one embedded migrations/NNNN_name.sql file.
type migration struct {
	version int
	name    string
	sql     string
}

func loadMigrations() ([]migration, error) {
	names, err := fs.Glob(migrationFiles, "migrations/*.sql")
	if err != nil {
		return nil, err
	}
	var ms []migration
	seen := map[int]string{}
	for _, n := range names {
		base := filepath.Base(n)
		num, _, ok := strings.Cut(base, "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || v <= 0 {
			return nil, fmt.Errorf("migration %s: name must start with a version number and '_'", base)
		}
		if prev, dup := seen[v]; dup {
			return nil, fmt.Errorf("migrations %s and %s share version %d", prev, base, v)
		}
		seen[v] = base
		body, err := migrationFiles.ReadFile(n)
		if err != nil {
			return nil, err
		}
		ms = append(ms, migration{version: v, name: base, sql: string(body)})
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].version < ms[j].version })
	return ms, nil
}

// migrate applies every embedded migration the database lacks, each in its own transaction.
func migrate(ctx context.Context, db *sql.DB) error {
	ms, err := loadMigrations()
	if err != nil {
		return err
	}
	latest := ms[len(ms)-1].version
	// An up-to-date database is opened without the write lock: every run-task and command opens
	// it, and many at once would each queue for the lock five times to find nothing to do.
	var newest sql.NullInt64
	if err := db.QueryRowContext(ctx, `SELECT max(version) FROM schema_migrations`).Scan(&newest); err == nil &&
		newest.Valid && int(newest.Int64) == latest {
		return nil
	}
	if _, err := db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
		version INTEGER PRIMARY KEY,
		name TEXT NOT NULL,
		applied_at INTEGER NOT NULL)`); err != nil {
		return fmt.Errorf("create schema_migrations: %w", err)
	}
	for _, m := range ms {
		if err := applyMigration(ctx, db, m, latest); err != nil {
			return err
		}
	}
	return nil
}

func applyMigration(ctx context.Context, db *sql.DB, m migration, latest int) error {
	tx, err := db.BeginTx(ctx, nil) // BEGIN IMMEDIATE through _txlock
	if err != nil {
		return fmt.Errorf("begin migration %s: %w", m.name, err)
	}
	defer tx.Rollback()
	var newest sql.NullInt64
	if err := tx.QueryRowContext(ctx, `SELECT max(version) FROM schema_migrations`).Scan(&newest); err != nil {
		return fmt.Errorf("read schema version: %w", err)
	}
	if newest.Valid && int(newest.Int64) > latest {
		return fmt.Errorf("schema version %d is newer than this binary knows (%d): run a newer webhook-auto-update or point WEBHOOK_DB_URL at another database", newest.Int64, latest)
	}
	var n int
	if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM schema_migrations WHERE version = ?`, m.version).Scan(&n); err != nil {
		return fmt.Errorf("read schema_migrations: %w", err)
	}
	if n > 0 {
		return nil
	}
	if _, err := tx.ExecContext(ctx, m.sql); err != nil {
		return fmt.Errorf("migration %s: %w", m.name, err)
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)`,
		m.version, m.name, time.Now().Unix()); err != nil {
		return fmt.Errorf("record migration %s: %w", m.name, err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit migration %s: %w", m.name, err)
	}
	return nil
}

// schemaVersion is the newest applied migration.
func (l *eventLog) schemaVersion(ctx context.Context) (int, error) {
	var v sql.NullInt64
	err := l.db.QueryRowContext(ctx, `SELECT max(version) FROM schema_migrations`).Scan(&v)
	return int(v.Int64), err
}

// queued is a row for the background writer; for a delivery's claim (claimDelivery), also the
// delivery to claim, the row being written only when the claim succeeds, and where to report.
type queued struct {
	event
	claim  *taskSpec
	result chan claimResult // buffered, for a claim: its outcome once the batch is committed
}

type claimResult struct {
	claimed bool
	err     error
}

// Record queues an event for the background writer. It waits for room in the queue for a
// bounded time only; past that, or after Close, the event goes to stderr instead of the table.
func (l *eventLog) Record(ev event) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.closed {
		l.spill([]event{ev}, errors.New("event log already closed"))
		return
	}
	l.pending.Add(1)
	select {
	case l.queue <- queued{event: ev}:
		return
	default:
	}
	t := time.NewTimer(5 * time.Second)
	defer t.Stop()
	select {
	case l.queue <- queued{event: ev}:
	case <-t.C:
		l.pending.Add(-1)
		l.spill([]event{ev}, errors.New("event queue full"))
	}
}

// Write commits events before it returns; used where an answer must not be sent before its
// record is durable. A failure also spills the events to stderr.
func (l *eventLog) Write(ctx context.Context, evs ...event) error {
	if err := l.insert(ctx, evs); err != nil {
		l.spill(evs, err)
		return err
	}
	return nil
}

// Close stops accepting events, writes every queued one, and closes the database.
func (l *eventLog) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	close(l.queue)
	l.mu.Unlock()
	<-l.done
	return l.db.Close()
}

// writer commits what is queued in batches: one transaction for whatever arrived while the
// previous one committed. Claims go the same way, so a burst of deliveries costs one commit per
// batch, not one each (group commit).
func (l *eventLog) writer() {
	defer close(l.done)
	batch := make([]queued, 0, 256)
	for q := range l.queue {
		batch = append(batch[:0], q)
	fill:
		for len(batch) < cap(batch) {
			select {
			case q, ok := <-l.queue:
				if !ok {
					break fill
				}
				batch = append(batch, q)
			default:
				break fill
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*busyTimeout)
		l.commit(ctx, batch)
		cancel()
		l.pending.Add(-int64(len(batch)))
	}
}

// commit writes a batch in one transaction and reports each claim's outcome. When the
// transaction fails, the rows that are not claims go to stderr; a claim's caller answers the
// failure, and its request's row is recorded then.
func (l *eventLog) commit(ctx context.Context, batch []queued) {
	claimed := make([]bool, len(batch))
	err := l.write(ctx, func(tx *sql.Tx) error {
		insert, err := tx.PrepareContext(ctx, insertEventSQL) // once per batch, not once per row
		if err != nil {
			return err
		}
		defer insert.Close()
		var claim *sql.Stmt
		for i, q := range batch {
			if q.claim != nil {
				if claim == nil {
					if claim, err = tx.PrepareContext(ctx, claimSQL); err != nil {
						return err
					}
					defer claim.Close()
				}
				if claimed[i], err = claimIn(ctx, claim, *q.claim, q.event); err != nil {
					return err
				}
				if !claimed[i] {
					continue
				}
			}
			if _, err := insert.ExecContext(ctx, q.insertArgs()...); err != nil {
				return err
			}
		}
		return nil
	})
	var lost []event
	for i, q := range batch {
		switch {
		case q.result != nil:
			q.result <- claimResult{claimed: claimed[i] && err == nil, err: err}
		case err != nil:
			lost = append(lost, q.event)
		}
	}
	if err != nil {
		l.spill(lost, err)
	}
}

// write runs fn in a write transaction (BEGIN IMMEDIATE through _txlock) and commits it when fn
// returns nil. It waits its turn behind this process's other write transactions (see writing),
// for as long as ctx allows.
func (l *eventLog) write(ctx context.Context, fn func(tx *sql.Tx) error) error {
	select {
	case l.writing <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("waiting for the database: %w", context.Cause(ctx))
	}
	defer func() { <-l.writing }()
	err := l.writeTx(ctx, fn)
	if err != nil {
		l.lastWriteErr.Store(err.Error())
		l.lastWriteBad.Store(time.Now().UnixNano())
	} else {
		l.lastWriteOK.Store(time.Now().UnixNano())
	}
	return err
}

func (l *eventLog) writeTx(ctx context.Context, fn func(tx *sql.Tx) error) error {
	tx, err := l.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := fn(tx); err != nil {
		return err
	}
	return tx.Commit()
}

func (l *eventLog) insert(ctx context.Context, evs []event) error {
	return l.write(ctx, func(tx *sql.Tx) error { return insertEvents(ctx, tx, evs) })
}

// rowsPerWrite bounds the rows one transaction of the dispatcher writes, and so how long the
// claims behind it wait for the write lock.
const rowsPerWrite = 128

const insertEventSQL = `INSERT INTO event_log
	(request_id, ts, method, path, status, action, duration_ms, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`

// insertEvents writes evs inside tx; an empty path is stored as NULL, as the original did.
func insertEvents(ctx context.Context, tx *sql.Tx, evs []event) error {
	if len(evs) == 0 {
		return nil
	}
	stmt, err := tx.PrepareContext(ctx, insertEventSQL) // once per batch, not once per row
	if err != nil {
		return err
	}
	defer stmt.Close()
	for _, ev := range evs {
		if _, err := stmt.ExecContext(ctx, ev.insertArgs()...); err != nil {
			return err
		}
	}
	return nil
}

// insertArgs are the values of insertEventSQL for ev.
func (ev event) insertArgs() []any {
	var path any
	if ev.Path != "" {
		path = ev.Path
	}
	return []any{ev.RequestID, ev.TS.Unix(), ev.Method, path, ev.Status, ev.Action, ev.Duration.Milliseconds(), ev.metaJSON()}
}

// spill prints events that could not be written as JSON lines, so an operator can recover them
// from the journal.
func (l *eventLog) spill(evs []event, cause error) {
	l.failures.Add(int64(len(evs)))
	for _, ev := range evs {
		line := marshalJSON(map[string]any{
			"request_id": ev.RequestID, "ts": ev.TS.Unix(), "method": ev.Method, "path": ev.Path,
			"status": ev.Status, "action": ev.Action, "duration_ms": ev.Duration.Milliseconds(),
			"meta": json.RawMessage(ev.metaJSON()),
		})
		l.log.warnf("event log write failed (%v), unwritten event: %s", cause, line)
	}
}

func (ev event) metaJSON() string {
	if ev.Meta == nil {
		return "{}"
	}
	return marshalJSON(ev.Meta)
}

// marshalJSON encodes v compactly without HTML escaping ("&" stays "&" in stored queries).
func marshalJSON(v any) string {
	var b strings.Builder
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return marshalJSON(map[string]any{"meta_error": err.Error()})
	}
	return strings.TrimSuffix(b.String(), "\n")
}

// newRequestID returns 16 random bytes in hex, unique per request, task and CLI run.
func newRequestID() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// secretParams are query parameters whose values never reach a log line or a row.
var secretParams = map[string]bool{"token": true, "access_token": true, "secret": true}

// redactPath hides the token of a registry route, /registry/<source>/<unit>/<token>: every
// segment after the unit becomes REDACTED, however the path is spelled ("//", "/./", "..").
func redactPath(p string) string {
	var segs []string
	for _, s := range strings.Split(p, "/") {
		if s != "" && s != "." {
			segs = append(segs, s)
		}
	}
	if len(segs) < 4 || segs[0] != "registry" {
		return p
	}
	return "/registry/" + segs[1] + "/" + segs[2] + "/REDACTED"
}

// redactQuery replaces the values of secret parameters in a raw query string. It works on the
// raw text, splitting on "&" and ";" (which some parsers also accept) and keeping the separators,
// so a query that does not parse is still redacted rather than logged as it came.
func redactQuery(raw string) string {
	if raw == "" {
		return ""
	}
	var b strings.Builder
	for raw != "" {
		part, sep := raw, ""
		if i := strings.IndexAny(raw, "&;"); i >= 0 {
			part, sep, raw = raw[:i], raw[i:i+1], raw[i+1:]
		} else {
			raw = ""
		}
		k, _, hasValue := strings.Cut(part, "=")
		name, err := url.QueryUnescape(k)
		if err != nil {
			name = k
		}
		if secretParams[strings.ToLower(strings.TrimSpace(name))] && hasValue {
			part = k + "=REDACTED"
		}
		b.WriteString(part + sep)
	}
	return b.String()
}

// The delivery queue. A GitHub delivery's claim row in github_deliveries (migrations/0003) is
// its place in the queue: claimDelivery commits it as 'pending' together with the request's
// row, the server answers 202, and the dispatcher (webhook.go) later takes it with nextTask.
// Every change of a claim's status is one transaction that also writes the rows saying so, so
// the event log tells each delivery's story in order: queued, dispatched (or retried, or
// failed), then the task's steps.

// claimDelivery records a delivery as pending, with the request's row ev, in one transaction
// (the writer's next batch), and returns once it is committed. It reports false, writing
// nothing, when the delivery id is already claimed: a copy of a delivery is a duplicate through
// the table's primary key alone. A claim whose dispatch failed for good is taken over, because
// only a person redelivers on GitHub. When ctx ends first the claim may still be committed.
func (l *eventLog) claimDelivery(ctx context.Context, t taskSpec, ev event) (bool, error) {
	q := queued{event: ev, claim: &t, result: make(chan claimResult, 1)}
	l.mu.RLock()
	if l.closed {
		l.mu.RUnlock()
		return false, fmt.Errorf("record delivery %s: event log already closed", t.delivery)
	}
	l.pending.Add(1)
	select {
	case l.queue <- q:
	case <-ctx.Done():
		l.pending.Add(-1)
		l.mu.RUnlock()
		return false, fmt.Errorf("record delivery %s: %w", t.delivery, context.Cause(ctx))
	}
	l.mu.RUnlock()
	select {
	case r := <-q.result:
		if r.err != nil {
			return false, fmt.Errorf("record delivery %s: %w", t.delivery, r.err)
		}
		return r.claimed, nil
	case <-ctx.Done():
		return false, fmt.Errorf("record delivery %s: %w", t.delivery, context.Cause(ctx))
	}
}

// claimSQL inserts a claim as pending, or takes over one that failed for good.
const claimSQL = `INSERT INTO github_deliveries
	(delivery_id, unit, image, event, request_id, status, received_at, updated_at, path, digest, claimed_at)
	VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?)
	ON CONFLICT (delivery_id) DO UPDATE SET unit = excluded.unit, image = excluded.image,
		event = excluded.event, request_id = excluded.request_id, status = 'pending',
		updated_at = excluded.updated_at, path = excluded.path, digest = excluded.digest,
		claimed_at = excluded.claimed_at, attempts = 0, next_attempt_at = 0,
		covered_by = NULL, task_unit = NULL, error = NULL
	WHERE github_deliveries.status = 'failed'`

// claimIn claims t with the prepared claimSQL, and reports whether it did.
func claimIn(ctx context.Context, claim *sql.Stmt, t taskSpec, ev event) (bool, error) {
	res, err := claim.ExecContext(ctx, t.delivery, t.unit, t.image, t.event, ev.RequestID, ev.TS.Unix(), ev.TS.Unix(),
		t.path, t.digest, ev.TS.UnixMilli())
	if err != nil {
		return false, err
	}
	n, err := res.RowsAffected()
	return n == 1, err
}

// queuedTask is one task the dispatcher starts: the first pending claim in arrival order whose
// unit runs no task, and every other pending claim of the same unit and image, which the task
// covers. The pull fetches the tag as it is when the task runs, which includes every push
// announced before, whatever its digest.
type queuedTask struct {
	taskSpec           // the first claim's; digest is the newest claim's
	covered  []string  // the deliveries whose claims the task covers, the first one first
	attempts int       // systemd-runs that failed before
	claimed  time.Time // when the first claim arrived
}

// nextTask takes the next task off the queue, marking its claims 'dispatching' with the task
// unit's name and writing the rows that rows makes of it, and returns it; ok is false when no
// claim is due. pending counts the claims left waiting (for their unit's running task, or for a
// retry).
func (l *eventLog) nextTask(ctx context.Context, now time.Time, rows func(queuedTask) []event) (qt queuedTask, ok bool, pending int, err error) {
	// Looking is a read: a burst wakes the dispatcher once per claim, mostly to find its unit
	// busy, and those looks must not take turns for the write lock with the claims. Only the
	// dispatcher changes pending claims to dispatching, so what it read is still there.
	var claimedMS int64
	err = l.db.QueryRowContext(ctx, `SELECT delivery_id, unit, image, event, path, attempts, claimed_at
		FROM github_deliveries
		WHERE status = 'pending' AND next_attempt_at <= ?
			AND unit NOT IN (SELECT unit FROM github_deliveries WHERE status IN ('dispatching', 'dispatched'))
		ORDER BY claimed_at, rowid LIMIT 1`, now.UnixMilli()).
		Scan(&qt.delivery, &qt.unit, &qt.image, &qt.event, &qt.path, &qt.attempts, &claimedMS)
	if errors.Is(err, sql.ErrNoRows) {
		err = l.db.QueryRowContext(ctx, `SELECT count(*) FROM github_deliveries WHERE status = 'pending'`).Scan(&pending)
		return qt, false, pending, err
	}
	if err != nil {
		return qt, false, 0, err
	}
	qt.claimed = time.UnixMilli(claimedMS)
	var evs []event
	err = l.write(ctx, func(tx *sql.Tx) error {
		taken, err := tx.QueryContext(ctx, `UPDATE github_deliveries
			SET status = 'dispatching', covered_by = ?, task_unit = ?, updated_at = ?
			WHERE status = 'pending' AND unit = ? AND image = ?
			RETURNING delivery_id, digest, claimed_at`,
			qt.delivery, taskUnitName(qt.delivery), now.Unix(), qt.unit, qt.image)
		if err != nil {
			return err
		}
		defer taken.Close()
		var newest int64 = -1
		for taken.Next() {
			var id, digest string
			var at int64
			if err := taken.Scan(&id, &digest, &at); err != nil {
				return err
			}
			if id == qt.delivery {
				qt.covered = append([]string{id}, qt.covered...)
			} else {
				qt.covered = append(qt.covered, id)
			}
			if at > newest && digest != "" {
				qt.digest, newest = digest, at
			}
		}
		if err := taken.Err(); err != nil {
			return err
		}
		taken.Close()
		if len(qt.covered) == 0 || qt.covered[0] != qt.delivery {
			return fmt.Errorf("claim %s is no longer pending", qt.delivery)
		}
		evs = rows(qt)
		return insertEvents(ctx, tx, evs[:min(len(evs), rowsPerWrite)])
	})
	if err != nil {
		return qt, false, 0, err
	}
	// The rows of the other covered claims follow in transactions of rowsPerWrite, still before
	// the task starts, so every story reads dispatching before the task's steps. In one
	// transaction, a burst's thousand covered claims held the write lock, and every claim
	// waiting behind it, for over 100 ms.
	for evs = evs[min(len(evs), rowsPerWrite):]; len(evs) > 0; evs = evs[min(len(evs), rowsPerWrite):] {
		chunk := evs[:min(len(evs), rowsPerWrite)]
		if err := l.insert(ctx, chunk); err != nil {
			l.spill(chunk, err)
		}
	}
	return qt, true, 0, nil
}

// settleTask moves the claims of a task unit that are dispatching or dispatched to status:
// 'dispatched' (systemd-run started the task, or it was seen running), 'done' (it ended),
// 'pending' (its systemd-run failed: retry at retryAt) or 'failed', with errText, and writes
// evs in the same transaction.
func (l *eventLog) settleTask(ctx context.Context, taskUnit, status, errText string, retryAt time.Time, evs []event) error {
	return l.write(ctx, func(tx *sql.Tx) error {
		var err error
		now := time.Now().Unix()
		if status == "pending" {
			_, err = tx.ExecContext(ctx, `UPDATE github_deliveries SET status = 'pending', attempts = attempts + 1,
				next_attempt_at = ?, error = ?, covered_by = NULL, task_unit = NULL, updated_at = ?
				WHERE task_unit = ? AND status = 'dispatching'`, retryAt.UnixMilli(), errText, now, taskUnit)
		} else {
			_, err = tx.ExecContext(ctx, `UPDATE github_deliveries SET status = ?, error = coalesce(nullif(?, ''), error),
				updated_at = ? WHERE task_unit = ? AND status IN ('dispatching', 'dispatched')`, status, errText, now, taskUnit)
		}
		if err != nil {
			return err
		}
		return insertEvents(ctx, tx, evs)
	})
}

// claimedTask is a task unit whose claims are in status (dispatching or dispatched), with the
// first claim it covers.
type claimedTask struct{ taskUnit, delivery, unit string }

// tasksIn lists the task units whose claims are in status and were last updated before
// before.
func (l *eventLog) tasksIn(ctx context.Context, status string, before time.Time) ([]claimedTask, error) {
	rows, err := l.db.QueryContext(ctx, `SELECT DISTINCT task_unit, covered_by, unit FROM github_deliveries
		WHERE status = ? AND updated_at < ? AND task_unit IS NOT NULL`, status, before.Unix())
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []claimedTask
	for rows.Next() {
		var c claimedTask
		var leader sql.NullString
		if err := rows.Scan(&c.taskUnit, &leader, &c.unit); err != nil {
			return nil, err
		}
		c.delivery = leader.String
		out = append(out, c)
	}
	return out, rows.Err()
}

// queueStats counts the pending claims and returns when the oldest of them arrived (zero when
// there is none), for /metrics and the status page.
func (l *eventLog) queueStats(ctx context.Context) (pending int, oldest time.Time, err error) {
	var first sql.NullInt64
	err = l.db.QueryRowContext(ctx, `SELECT count(*), min(claimed_at) FROM github_deliveries WHERE status = 'pending'`).
		Scan(&pending, &first)
	if first.Valid {
		oldest = time.UnixMilli(first.Int64)
	}
	return pending, oldest, err
}

// eventFilter selects event_log rows for the events command, /api/events and
// /api/deliveries/<id>. Zero values select everything.
type eventFilter struct {
	limit    int
	action   string
	unit     string
	delivery string
	since    time.Time
	status   int
	beforeID int64 // keyset paging: only rows with a smaller id
	afterID  int64 // --follow: only rows with a larger id, oldest first
}

// maxEventsLimit caps one page of /api/events.
const maxEventsLimit = 500

// parseEventFilter reads a filter from named string values (query parameters or flags): limit,
// action, unit, delivery, since (a duration back from now such as 2h, or RFC 3339), status,
// before_id. A unit is matched as the program resolves it ("foo" means "foo.service").
func parseEventFilter(get func(string) string, now time.Time) (eventFilter, error) {
	f := eventFilter{limit: 50, action: get("action"), delivery: get("delivery")}
	if v := get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return f, fmt.Errorf("invalid limit %q: want a whole number greater than zero", v)
		}
		f.limit = min(n, maxEventsLimit)
	}
	if v := get("unit"); v != "" {
		u, err := resolveUnit(v)
		if err != nil {
			return f, err
		}
		f.unit = u
	}
	if v := get("since"); v != "" {
		if d, err := time.ParseDuration(v); err == nil && d > 0 {
			f.since = now.Add(-d)
		} else if t, err := time.Parse(time.RFC3339, v); err == nil {
			f.since = t
		} else {
			return f, fmt.Errorf("invalid since %q: want a duration such as 90m or an RFC 3339 time", v)
		}
	}
	if v := get("status"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 100 || n > 599 {
			return f, fmt.Errorf("invalid status %q: want an HTTP status code", v)
		}
		f.status = n
	}
	if v := get("before_id"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			return f, fmt.Errorf("invalid before_id %q", v)
		}
		f.beforeID = n
	}
	return f, nil
}

// storedEvent is one event_log row as read back.
type storedEvent struct {
	ID         int64          `json:"id"`
	RequestID  string         `json:"request_id"`
	TS         int64          `json:"ts"`
	Time       string         `json:"time"`
	Method     string         `json:"method"`
	Path       string         `json:"path"`
	Status     int            `json:"status"`
	Action     string         `json:"action"`
	DurationMS int64          `json:"duration_ms"`
	Meta       map[string]any `json:"meta"`
}

// eventsSQL is the query of queryEvents and its arguments.
func eventsSQL(f eventFilter) (string, []any) {
	var where []string
	var args []any
	add := func(cond string, v any) {
		where = append(where, cond)
		args = append(args, v)
	}
	if f.action != "" {
		add("action = ?", f.action)
	}
	if f.unit != "" {
		add("json_extract(meta, '$.unit') = ?", f.unit)
	}
	if f.delivery != "" {
		add("json_extract(meta, '$.delivery') = ?", f.delivery)
	}
	if !f.since.IsZero() {
		add("ts >= ?", f.since.Unix())
	}
	if f.status != 0 {
		add("status = ?", f.status)
	}
	if f.beforeID > 0 {
		add("id < ?", f.beforeID)
	}
	order := "DESC"
	if f.afterID != 0 { // a negative afterID asks for every row, oldest first
		add("id > ?", max(f.afterID, 0))
		order = "ASC"
	}
	q := `SELECT id, request_id, ts, method, coalesce(path, ''), status, action, duration_ms, meta FROM event_log`
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	q += " ORDER BY id " + order
	if f.limit > 0 {
		q += " LIMIT " + strconv.Itoa(f.limit)
	}
	return q, args
}

// queryEvents returns matching rows, newest first (oldest first with afterID).
func queryEvents(ctx context.Context, db *sql.DB, f eventFilter) ([]storedEvent, error) {
	q, args := eventsSQL(f)
	rows, err := db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := []storedEvent{}
	for rows.Next() {
		var e storedEvent
		var meta string
		if err := rows.Scan(&e.ID, &e.RequestID, &e.TS, &e.Method, &e.Path, &e.Status, &e.Action, &e.DurationMS, &meta); err != nil {
			return nil, err
		}
		if json.Unmarshal([]byte(meta), &e.Meta) != nil {
			e.Meta = map[string]any{"raw": meta}
		}
		redactMeta(e.Meta)
		e.Time = time.Unix(e.TS, 0).UTC().Format(time.RFC3339)
		out = append(out, e)
	}
	return out, rows.Err()
}

// redactMeta re-applies redaction on the way out, for rows written by older versions or the
// original tool: a query's secret values and any secret-named key are masked.
func redactMeta(m map[string]any) {
	for k, v := range m {
		if secretParams[strings.ToLower(k)] {
			m[k] = "REDACTED"
			continue
		}
		if s, ok := v.(string); ok && k == "query" {
			m[k] = redactQuery(s)
		}
	}
}

// openEventReader opens an existing database read-only, for the events command.
func openEventReader(path string) (*sql.DB, error) {
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("no event log at %s: %w (set --state-dir or WEBHOOK_STATE_DIR, or --db or WEBHOOK_DB_URL)", path, err)
	}
	db, err := sql.Open("sqlite", "file:"+path+"?mode=ro&_pragma=busy_timeout("+strconv.Itoa(int(busyTimeout/time.Millisecond))+")")
	if err != nil {
		return nil, err
	}
	return db, db.Ping()
}

// eventColumns are the columns of the events table output.
var eventColumns = []string{"TIME", "STATUS", "ACTION", "METHOD", "PATH", "UNIT", "IMAGE", "DURATION", "DETAILS"}

// eventLine formats one row for the table; loc is the time zone to show.
func eventLine(e storedEvent, loc *time.Location) []string {
	str := func(k string) string {
		if v, ok := e.Meta[k].(string); ok && v != "" {
			return v
		}
		return "-"
	}
	var details []string
	for _, k := range []string{"step", "reason", "delivery", "caller", "error", "warning"} {
		if v, ok := e.Meta[k]; ok && v != "" && v != nil {
			s := []rune(fmt.Sprint(v))
			if len(s) > 60 {
				s = append(s[:57], []rune("...")...)
			}
			details = append(details, k+"="+string(s))
		}
	}
	if len(details) == 0 {
		details = []string{"-"}
	}
	path := e.Path
	if path == "" {
		path = "-"
	}
	cells := []string{
		time.Unix(e.TS, 0).In(loc).Format("2006-01-02 15:04:05"), strconv.Itoa(e.Status), e.Action, e.Method,
		path, str("unit"), str("image"), (time.Duration(e.DurationMS) * time.Millisecond).String(), strings.Join(details, " "),
	}
	for i, c := range cells {
		cells[i] = oneLine(c)
	}
	return cells
}

// oneLine makes a table cell safe: one line, no tabs, valid UTF-8, no control characters (a
// stored stderr could otherwise break the table or the terminal).
func oneLine(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r == utf8.RuneError:
			return '?'
		case unicode.IsControl(r):
			return ' '
		}
		return r
	}, strings.ToValidUTF8(s, "?"))
}

// stepCounts counts github-task rows by step, so redeploy outcomes survive the run-task
// processes that wrote them.
func stepCounts(ctx context.Context, db *sql.DB) (map[string]int64, error) {
	rows, err := db.QueryContext(ctx, `SELECT coalesce(json_extract(meta, '$.step'), ''), count(*)
		FROM event_log WHERE action = 'github-task' GROUP BY 1`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]int64{}
	for rows.Next() {
		var step string
		var n int64
		if err := rows.Scan(&step, &n); err != nil {
			return nil, err
		}
		out[step] = n
	}
	return out, rows.Err()
}

// stepDurations returns the values (milliseconds) of a meta key over github-task rows of a step.
func stepDurations(ctx context.Context, db *sql.DB, step, key string) ([]float64, error) {
	rows, err := db.QueryContext(ctx, `SELECT json_extract(meta, '$.'||?) FROM event_log
		WHERE action = 'github-task' AND json_extract(meta, '$.step') = ? AND json_extract(meta, '$.'||?) IS NOT NULL`, key, step, key)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []float64
	for rows.Next() {
		var ms float64
		if err := rows.Scan(&ms); err != nil {
			return nil, err
		}
		out = append(out, ms)
	}
	return out, rows.Err()
}

// lastEvent returns the newest row of an action, or nil.
func lastEvent(ctx context.Context, db *sql.DB, action string) (*storedEvent, error) {
	evs, err := queryEvents(ctx, db, eventFilter{action: action, limit: 1})
	if err != nil || len(evs) == 0 {
		return nil, err
	}
	return &evs[0], nil
}

// metrics holds the server's in-process counters for /metrics. What run-task processes do is
// counted from event_log instead, so it is not lost when they exit.
type metrics struct {
	mu         sync.Mutex
	start      time.Time
	requests   map[[2]string]int64 // route pattern, status
	deliveries map[string]int64    // outcome of a GitHub delivery
	rejections map[string]int64    // 429s by action
	dispatches map[string]int64    // systemd-runs of queued tasks by result
}

func newMetrics(now time.Time) *metrics {
	return &metrics{start: now, requests: map[[2]string]int64{}, deliveries: map[string]int64{}, rejections: map[string]int64{},
		dispatches: map[string]int64{}}
}

// dispatched counts one systemd-run of a queued task: dispatched, dispatch-retry or dispatch-failed.
func (m *metrics) dispatched(result string) {
	m.mu.Lock()
	m.dispatches[result]++
	m.mu.Unlock()
}

// observe counts one answered request. The route is the matched pattern, so labels stay few.
func (m *metrics) observe(route string, status int, action string, reason any) {
	if route == "" {
		route = "unmatched"
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.requests[[2]string{route, strconv.Itoa(status)}]++
	if action == "github-webhook" || action == "github-ping" {
		outcome, _ := reason.(string)
		if action == "github-ping" {
			outcome = "ping"
		}
		if outcome == "" {
			outcome = "other"
		}
		m.deliveries[outcome]++
	}
	if status == 429 {
		m.rejections[action]++
	}
}

// Histogram buckets, in seconds.
var (
	pullBuckets    = []float64{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}
	restartBuckets = []float64{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}
)

// writeMetrics writes the Prometheus text exposition format, version 0.0.4.
func (m *metrics) writeMetrics(ctx context.Context, w io.Writer, events *eventLog) error {
	p := &promWriter{w: w}
	m.mu.Lock()
	p.family("webhook_http_requests_total", "counter", "HTTP requests answered, by route pattern and status.")
	for _, k := range sortedKeys(m.requests, func(a, b [2]string) bool { return a[0] < b[0] || a[0] == b[0] && a[1] < b[1] }) {
		p.sample("webhook_http_requests_total", []string{"route", k[0], "status", k[1]}, float64(m.requests[k]))
	}
	p.family("webhook_github_deliveries_total", "counter", "GitHub deliveries by outcome (queued, duplicate, ignored reasons, rate limits, refusals).")
	for _, k := range sortedKeys(m.deliveries, func(a, b string) bool { return a < b }) {
		p.sample("webhook_github_deliveries_total", []string{"outcome", k}, float64(m.deliveries[k]))
	}
	p.family("webhook_rate_limit_rejections_total", "counter", "Requests refused with 429, by action.")
	for _, k := range sortedKeys(m.rejections, func(a, b string) bool { return a < b }) {
		p.sample("webhook_rate_limit_rejections_total", []string{"action", k}, float64(m.rejections[k]))
	}
	p.family("webhook_dispatches_total", "counter", "systemd-runs of queued redeploy tasks, by result (dispatched, dispatch-retry, dispatch-failed).")
	for _, k := range sortedKeys(m.dispatches, func(a, b string) bool { return a < b }) {
		p.sample("webhook_dispatches_total", []string{"result", k}, float64(m.dispatches[k]))
	}
	start := m.start
	m.mu.Unlock()

	p.family("webhook_event_log_write_failures_total", "counter", "Event rows that could not be written and went to stderr.")
	p.sample("webhook_event_log_write_failures_total", nil, float64(events.failures.Load()))
	p.family("webhook_event_log_queue_depth", "gauge", "Event rows queued and not yet committed.")
	p.sample("webhook_event_log_queue_depth", nil, float64(events.pending.Load()))
	pending, oldest, err := events.queueStats(ctx)
	if err != nil {
		return err
	}
	p.family("webhook_delivery_queue_pending", "gauge", "Deliveries recorded and waiting for their redeploy task to be started.")
	p.sample("webhook_delivery_queue_pending", nil, float64(pending))
	age := 0.0
	if !oldest.IsZero() {
		age = max(time.Since(oldest).Seconds(), 0)
	}
	p.family("webhook_delivery_queue_oldest_age_seconds", "gauge", "Age of the oldest pending delivery; 0 when none waits.")
	p.sample("webhook_delivery_queue_oldest_age_seconds", nil, age)
	p.family("process_start_time_seconds", "gauge", "Start time of the process since the unix epoch in seconds.")
	p.sample("process_start_time_seconds", nil, float64(start.Unix()))
	p.family("webhook_build_info", "gauge", "Build information; the value is always 1.")
	p.sample("webhook_build_info", []string{"version", buildVersion(), "goversion", runtime.Version()}, 1)

	steps, err := stepCounts(ctx, events.db)
	if err != nil {
		return err
	}
	p.family("webhook_redeploy_steps_total", "counter", "Redeploy task steps recorded in event_log, by step (pulled, restarted, up-to-date, rolled-back, …).")
	for _, k := range sortedKeys(steps, func(a, b string) bool { return a < b }) {
		p.sample("webhook_redeploy_steps_total", []string{"step", k}, float64(steps[k]))
	}
	for _, h := range []struct {
		name, help, step, key string
		buckets               []float64
	}{
		{"webhook_pull_duration_seconds", "Duration of successful image pulls, retries included.", "pulled", "pull_ms", pullBuckets},
		{"webhook_restart_duration_seconds", "Duration of systemctl restart of redeployed units.", "restarted", "restart_ms", restartBuckets},
	} {
		ms, err := stepDurations(ctx, events.db, h.step, h.key)
		if err != nil {
			return err
		}
		p.family(h.name, "histogram", h.help)
		p.histogram(h.name, h.buckets, ms)
	}
	return p.err
}

func sortedKeys[K comparable, V any](m map[K]V, less func(a, b K) bool) []K {
	keys := make([]K, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return less(keys[i], keys[j]) })
	return keys
}

// promWriter writes metric families in the text exposition format.
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

// sample writes one line; labels are name/value pairs.
func (p *promWriter) sample(name string, labels []string, v float64) {
	var b strings.Builder
	b.WriteString(name)
	if len(labels) > 0 {
		b.WriteByte('{')
		esc := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)
		for i := 0; i+1 < len(labels); i += 2 {
			if i > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `%s="%s"`, labels[i], esc.Replace(labels[i+1]))
		}
		b.WriteByte('}')
	}
	p.printf("%s %s\n", b.String(), strconv.FormatFloat(v, 'g', -1, 64))
}

// histogram writes cumulative buckets of millisecond values as seconds.
func (p *promWriter) histogram(name string, buckets []float64, ms []float64) {
	var sum float64
	counts := make([]int, len(buckets))
	for _, v := range ms {
		s := v / 1000
		sum += s
		for i, le := range buckets {
			if s <= le {
				counts[i]++
			}
		}
	}
	for i, le := range buckets {
		p.sample(name+"_bucket", []string{"le", strconv.FormatFloat(le, 'g', -1, 64)}, float64(counts[i]))
	}
	p.sample(name+"_bucket", []string{"le", "+Inf"}, float64(len(ms)))
	p.sample(name+"_sum", nil, sum)
	p.sample(name+"_count", nil, float64(len(ms)))
}

const usageEvents = `usage: webhook-auto-update events [--limit N] [--action A] [--unit U] [--delivery ID]
                                  [--since DURATION|RFC3339] [--status CODE] [--json] [--follow]

Prints event_log rows, newest first, as a table in local time (or JSON lines with --json).
--follow keeps printing new rows, oldest first, until interrupted.
`

func cmdEvents(c *cli, args []string) int {
	vals := map[string]*string{}
	var asJSON, follow bool
	cfg, rest, code := c.setup("events", usageEvents, args, func(fs *flag.FlagSet, cfg *config) {
		for _, name := range []string{"limit", "action", "unit", "delivery", "since", "status"} {
			vals[name] = fs.String(name, "", "")
		}
		fs.BoolVar(&asJSON, "json", false, "")
		fs.BoolVar(&follow, "follow", false, "")
	})
	if code >= 0 {
		return code
	}
	if len(rest) > 0 {
		c.log.errorf("events: unexpected argument %q", rest[0])
		fmt.Fprint(c.stderr, usageEvents)
		return 2
	}
	f, err := parseEventFilter(func(k string) string {
		if v := vals[k]; v != nil {
			return *v
		}
		return "" // before_id is for the API's paging only
	}, time.Now())
	if err != nil {
		c.log.errorf("events: %v", err)
		return 2
	}
	db, err := openEventReader(cfg.dbPath)
	if err != nil {
		c.log.errorf("%v", err)
		return 1
	}
	defer db.Close()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	evs, err := queryEvents(ctx, db, f)
	if err != nil {
		c.log.errorf("read events from %s: %v", cfg.dbPath, err)
		return 1
	}
	printEvents(c.stdout, evs, asJSON, true)
	if !follow {
		return 0
	}
	var last int64
	for _, e := range evs {
		last = max(last, e.ID)
	}
	if last == 0 {
		db.QueryRowContext(ctx, `SELECT coalesce(max(id), 0) FROM event_log`).Scan(&last)
	}
	for {
		select {
		case <-ctx.Done():
			return 0
		case <-time.After(time.Second):
		}
		f.afterID, f.beforeID, f.limit = last, 0, maxEventsLimit
		evs, err := queryEvents(ctx, db, f)
		if err != nil {
			if ctx.Err() != nil {
				return 0
			}
			c.log.warnf("read events: %v", err)
			continue
		}
		printEvents(c.stdout, evs, asJSON, false)
		for _, e := range evs {
			last = max(last, e.ID)
		}
	}
}

// printEvents writes rows as an aligned table (with a header when asked) or JSON lines.
func printEvents(w io.Writer, evs []storedEvent, asJSON, header bool) {
	if asJSON {
		for _, e := range evs {
			fmt.Fprintln(w, marshalJSON(e))
		}
		return
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	if header {
		fmt.Fprintln(tw, strings.Join(eventColumns, "\t"))
	}
	for _, e := range evs {
		fmt.Fprintln(tw, strings.Join(eventLine(e, time.Local), "\t"))
	}
	tw.Flush()
}

// requestRows selects the rows of HTTP requests: every row but those of the command line, the
// scheduler and redeploy tasks, which are what happened on the operator's behalf.
const requestRows = `method NOT IN ('CLI', 'SCHEDULER', 'TASK')`

// deleteOlderThan deletes event_log rows older than cutoff (only request rows, with
// requestsOnly) in batches of 1000, each its own short transaction, so a large delete never
// holds the write lock for long. A dry run only counts.
func (l *eventLog) deleteOlderThan(ctx context.Context, cutoff time.Time, dryRun, requestsOnly bool) (int64, error) {
	where := `ts < ?`
	if requestsOnly {
		where += ` AND ` + requestRows
	}
	if dryRun {
		var n int64
		err := l.db.QueryRowContext(ctx, `SELECT count(*) FROM event_log WHERE `+where, cutoff.Unix()).Scan(&n)
		return n, err
	}
	var total int64
	for {
		var n int64
		err := l.write(ctx, func(tx *sql.Tx) error {
			res, err := tx.ExecContext(ctx, `DELETE FROM event_log WHERE id IN
				(SELECT id FROM event_log WHERE `+where+` ORDER BY id LIMIT 1000)`, cutoff.Unix())
			if err == nil {
				n, err = res.RowsAffected()
			}
			return err
		})
		total += n
		if err != nil || n == 0 {
			return total, err
		}
	}
}

// ---------------------------------------------------------------------------------------------
// The status page: what was redeployed, when, and what failed, for a person with a browser.
//
// It is served at / when there is no web/dist bundle and always under /status/: an overview
// (every unit seen in the log with the outcome of its last redeploy, the queue of pending
// claims, redeploys per day over 30 days as an SVG chart drawn here), the deliveries newest
// first, and the story of one delivery. It only reads. Everything from event_log reaches the
// HTML through html/template, which escapes it for where it lands; the page runs no script,
// and the Content-Security-Policy allows only its own stylesheet (by hash), its forms and
// nothing else. Access takes the manual token once, in a POST form; the session cookie that
// replaces it is signed with a key derived from that token (a new token ends every session),
// so the token never travels in a URL, a page or a log line.

// statusPageSize is how many deliveries one page lists.
const statusPageSize = 25

// statusSessionTTL is how long a login to the status page lasts.
const statusSessionTTL = 12 * time.Hour

// statusCookie names the session cookie.
const statusCookie = "wau_status"

// stepOutcomes classifies the github-task steps that end a redeploy. A task whose newest row has
// any other step (started, pulled, restarted, health-failed, healthy…) is still running, or
// ended without a last word.
var stepOutcomes = map[string]string{
	"completed": "ok", "up-to-date": "ok",
	"rolled-back":  "rolled-back",
	"rate-limited": "skipped",
	"pull-failed":  "failed", "rollback-failed": "failed", "rollback-impossible": "failed",
	"lock-failed": "failed", "limit-failed": "failed", "invalid": "failed",
}

// statusOutcomes are the outcome classes a delivery can be filtered by, in the order offered.
var statusOutcomes = []string{"ok", "rolled-back", "failed", "running", "skipped", "ignored"}

// outcomeSQL is a CASE expression that classifies the step in column col as stepOutcomes does.
func outcomeSQL(col string) string {
	var b strings.Builder
	b.WriteString("CASE " + col)
	for _, step := range sortedKeys(stepOutcomes, func(a, b string) bool { return a < b }) {
		fmt.Fprintf(&b, " WHEN '%s' THEN '%s'", step, stepOutcomes[step])
	}
	b.WriteString(" ELSE 'running' END")
	return b.String()
}

// stepLabel is the words shown for a step: "completed" reads "restarted, healthy".
func stepLabel(step string) string {
	switch step {
	case "completed":
		return "restarted, healthy"
	case "":
		return "no task yet"
	}
	return strings.ReplaceAll(step, "-", " ")
}

// terminalStepsSQL lists the steps of stepOutcomes as an SQL list.
func terminalStepsSQL() string {
	var q []string
	for _, step := range sortedKeys(stepOutcomes, func(a, b string) bool { return a < b }) {
		q = append(q, "'"+step+"'")
	}
	return "(" + strings.Join(q, ", ") + ")"
}

// unitStatus is one line of the overview.
type unitStatus struct {
	Unit, Image      string
	Outcome, Label   string // class and words of the last finished redeploy ("" none yet)
	When             string // when it finished
	Delivery         string // whose task it was, linked when it is a valid delivery id
	Linkable         bool
	Error            string
	Running          string // the newest step of a task newer than the last finished one
	RunningAt        string
	LastSeenRequest  string // the last delivery's reason, when newer than any task
	LastSeenLinkable bool
	LastSeenDelivery string
}

// statusUnitsSQL picks, for each unit, the ids of its newest finished task row, newest task row,
// newest delivery, newest manual redeploy and newest dispatch row. Its units hop from one unit to the next in
// idx_event_log_unit (a skip scan) instead of reading every entry.
var statusUnitsSQL = func() string {
	const byUnit = `FROM event_log WHERE json_extract(meta, '$.unit') = u.unit AND action = `
	return `WITH RECURSIVE units(unit) AS (
			SELECT min(json_extract(meta, '$.unit')) FROM event_log WHERE json_extract(meta, '$.unit') > ''
			UNION ALL
			SELECT (SELECT min(json_extract(meta, '$.unit')) FROM event_log WHERE json_extract(meta, '$.unit') > units.unit)
			FROM units WHERE units.unit IS NOT NULL LIMIT 10000)
		SELECT unit, done, task, webhook, manual, dispatch FROM (SELECT u.unit,
			coalesce((SELECT id ` + byUnit + `'github-task' AND json_extract(meta, '$.step') IN ` + terminalStepsSQL() + `
				ORDER BY id DESC LIMIT 1), 0) AS done,
			coalesce((SELECT max(id) ` + byUnit + `'github-task'), 0) AS task,
			coalesce((SELECT max(id) ` + byUnit + `'github-webhook'), 0) AS webhook,
			coalesce((SELECT max(id) ` + byUnit + `'manual-service'), 0) AS manual,
			coalesce((SELECT max(id) ` + byUnit + `'github-dispatch'), 0) AS dispatch
		FROM units AS u WHERE u.unit IS NOT NULL)
		WHERE task + webhook + manual + dispatch > 0 ORDER BY unit LIMIT 1000`
}()

// statusUnits returns every unit named by a delivery, a task or a manual redeploy, by name:
// the last finished redeploy, any task running since, and the image last seen. It walks the
// distinct units of idx_event_log_unit, then picks each unit's rows through the same index
// (newest first), so the cost grows with the number of units, not of rows.
func statusUnits(ctx context.Context, db *sql.DB, loc *time.Location) ([]unitStatus, error) {
	rows, err := db.QueryContext(ctx, statusUnitsSQL)
	if err != nil {
		return nil, err
	}
	type picked struct {
		unit                                        string
		done, task, webhook, manual, dispatch, last int64
	}
	var ps []picked
	var ids []any
	for rows.Next() {
		var p picked
		if err := rows.Scan(&p.unit, &p.done, &p.task, &p.webhook, &p.manual, &p.dispatch); err != nil {
			rows.Close()
			return nil, err
		}
		p.last = max(p.task, p.webhook, p.manual, p.dispatch)
		ps = append(ps, p)
		ids = append(ids, p.last, p.done, p.task, p.webhook, p.dispatch)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	byID, err := eventsByID(ctx, db, ids)
	if err != nil {
		return nil, err
	}
	out := make([]unitStatus, 0, len(ps))
	for _, p := range ps {
		u := unitStatus{Unit: p.unit}
		u.Image = metaString(byID[p.last].Meta, "image")
		// A dispatch that failed for good, newer than the last task's end, is the last redeploy:
		// it never ran.
		if d, ok := byID[p.dispatch]; ok && p.dispatch > p.done && metaString(d.Meta, "reason") == "dispatch-failed" {
			p.done = p.dispatch
		}
		if done, ok := byID[p.done]; ok {
			step := metaString(done.Meta, "step")
			u.Outcome, u.Label, u.When = stepOutcomes[step], stepLabel(step), statusTime(done.TS, loc)
			if done.Action == "github-dispatch" {
				u.Outcome, u.Label = "failed", "dispatch failed"
			}
			u.Delivery = metaString(done.Meta, "delivery")
			u.Linkable = reDeliveryID.MatchString(u.Delivery)
			u.Error = metaString(done.Meta, "error")
			if img := metaString(done.Meta, "image"); u.Image == "" {
				u.Image = img
			}
		}
		if task, ok := byID[p.task]; ok && p.task > p.done {
			u.Running, u.RunningAt = stepLabel(metaString(task.Meta, "step")), statusTime(task.TS, loc)
		}
		if wh, ok := byID[p.webhook]; ok && p.webhook > max(p.task, p.done) {
			u.LastSeenRequest = metaString(wh.Meta, "reason")
			u.LastSeenDelivery = metaString(wh.Meta, "delivery")
			u.LastSeenLinkable = reDeliveryID.MatchString(u.LastSeenDelivery)
		}
		out = append(out, u)
	}
	return out, nil
}

// eventsByID reads the rows with the given ids (0 is skipped), meta redacted as queryEvents does.
func eventsByID(ctx context.Context, db *sql.DB, ids []any) (map[int64]storedEvent, error) {
	out := map[int64]storedEvent{}
	var want []any
	for _, id := range ids {
		if id.(int64) != 0 {
			want = append(want, id)
		}
	}
	for len(want) > 0 {
		chunk := want[:min(len(want), 500)]
		want = want[len(chunk):]
		rows, err := db.QueryContext(ctx, `SELECT id, ts, action, status, meta FROM event_log WHERE id IN (?`+
			strings.Repeat(", ?", len(chunk)-1)+`)`, chunk...)
		if err != nil {
			return nil, err
		}
		for rows.Next() {
			var e storedEvent
			var meta string
			if err := rows.Scan(&e.ID, &e.TS, &e.Action, &e.Status, &meta); err != nil {
				rows.Close()
				return nil, err
			}
			if json.Unmarshal([]byte(meta), &e.Meta) != nil {
				e.Meta = map[string]any{}
			}
			redactMeta(e.Meta)
			out[e.ID] = e
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// metaString returns a meta value as text: strings as they are, anything else as JSON.
func metaString(m map[string]any, k string) string {
	switch v := m[k].(type) {
	case nil:
		return ""
	case string:
		return v
	default:
		return marshalJSON(v)
	}
}

// statusTime formats a unix time for the page.
func statusTime(ts int64, loc *time.Location) string {
	return time.Unix(ts, 0).In(loc).Format("2006-01-02 15:04:05 MST")
}

// queueStatus is the queue of claimed deliveries not yet handed to a task.
type queueStatus struct {
	Pending int64
	Oldest  string // age of the oldest pending claim
}

// statusQueue counts pending claims in github_deliveries and the age of the oldest.
func statusQueue(ctx context.Context, db *sql.DB, now time.Time) (queueStatus, error) {
	var q queueStatus
	var oldest int64
	err := db.QueryRowContext(ctx, `SELECT count(*), coalesce(min(received_at), 0) FROM github_deliveries
		WHERE status IN ('pending', 'dispatching')`).Scan(&q.Pending, &oldest)
	if q.Pending > 0 {
		q.Oldest = max(now.Sub(time.Unix(oldest, 0)), 0).Truncate(time.Second).String()
	}
	return q, err
}

// chartDays is how many days the chart shows, today included.
const chartDays = 30

// chartView is the redeploys-per-day chart, laid out here so the template only places shapes.
type chartView struct {
	Width, Height, Base int
	Max                 int
	Bars                []chartBar
	Ticks               []chartTick
	Totals              map[string]int
	Summary             string
}

type chartBar struct {
	Title string
	Segs  []chartSeg
}

type chartSeg struct {
	X, Y, W, H int
	Class      string
}

type chartTick struct {
	X     int
	Label string
}

// chartSQL reads the finished task steps since a time. Without statistics SQLite would pick
// idx_event_log_action and parse every task row's JSON, hence INDEXED BY.
var chartSQL = `SELECT ts, json_extract(meta, '$.step') FROM event_log INDEXED BY idx_event_log_task_step
	WHERE action = 'github-task' AND json_extract(meta, '$.step') IN ` + terminalStepsSQL() + ` AND ts >= ?`

// redeployChart counts finished redeploys that restarted something (restarted healthy, rolled
// back, failed; up-to-date and rate-limited runs changed nothing) per local day, for the last
// chartDays days.
func redeployChart(ctx context.Context, db *sql.DB, now time.Time, loc *time.Location) (chartView, error) {
	now = now.In(loc)
	today := time.Date(now.Year(), now.Month(), now.Day(), 0, 0, 0, 0, loc)
	first := today.AddDate(0, 0, -(chartDays - 1))
	rows, err := db.QueryContext(ctx, chartSQL, first.Unix())
	if err != nil {
		return chartView{}, err
	}
	defer rows.Close()
	counts := make([]map[string]int, chartDays)
	for i := range counts {
		counts[i] = map[string]int{}
	}
	totals := map[string]int{}
	for rows.Next() {
		var ts int64
		var step string
		if err := rows.Scan(&ts, &step); err != nil {
			return chartView{}, err
		}
		class := stepOutcomes[step]
		if step == "up-to-date" || class == "skipped" {
			continue
		}
		t := time.Unix(ts, 0).In(loc)
		day := time.Date(t.Year(), t.Month(), t.Day(), 0, 0, 0, 0, loc)
		i := int(math.Round(day.Sub(first).Hours() / 24)) // a DST day is 23 or 25 hours long
		if i < 0 || i >= chartDays {
			continue
		}
		counts[i][class]++
		totals[class]++
	}
	if err := rows.Err(); err != nil {
		return chartView{}, err
	}
	c := chartView{Width: 40 + chartDays*20 + 10, Height: 150, Base: 120, Max: 1, Totals: totals}
	for _, m := range counts {
		c.Max = max(c.Max, m["ok"]+m["rolled-back"]+m["failed"])
	}
	for i, m := range counts {
		day := first.AddDate(0, 0, i)
		x, y := 40+i*20, c.Base
		bar := chartBar{Title: fmt.Sprintf("%s: %d restarted healthy, %d rolled back, %d failed",
			day.Format("Mon 2 Jan"), m["ok"], m["rolled-back"], m["failed"])}
		for _, class := range []string{"ok", "rolled-back", "failed"} {
			if m[class] == 0 {
				continue
			}
			h := max(m[class]*(c.Base-10)/c.Max, 2)
			y -= h
			bar.Segs = append(bar.Segs, chartSeg{X: x, Y: y, W: 16, H: h, Class: class})
		}
		c.Bars = append(c.Bars, bar)
		if (chartDays-1-i)%7 == 0 { // weekly, ending today
			c.Ticks = append(c.Ticks, chartTick{X: x + 8, Label: day.Format("2 Jan")})
		}
	}
	c.Summary = fmt.Sprintf("Redeploys per day over the last %d days: %d restarted healthy, %d rolled back, %d failed",
		chartDays, totals["ok"], totals["rolled-back"], totals["failed"])
	return c, nil
}

// deliveryFilter selects the deliveries page.
type deliveryFilter struct {
	Unit    string
	Outcome string
	Before  int64 // keyset paging: request rows with a smaller id
}

// deliveryRow is one delivery on the deliveries page.
type deliveryRow struct {
	ID                     int64
	When                   string
	Status                 int
	Delivery, Unit, Image  string
	Reason, Outcome, Label string
	Linkable               bool
}

// deliveriesSQL is the query of one deliveries page and its arguments.
func deliveriesSQL(f deliveryFilter) (string, []any) {
	where := []string{`action = 'github-webhook'`, `json_extract(meta, '$.delivery') IS NOT NULL`}
	var args []any
	if f.Unit != "" {
		where, args = append(where, `json_extract(meta, '$.unit') = ?`), append(args, f.Unit)
	}
	if f.Before > 0 {
		where, args = append(where, `id < ?`), append(args, f.Before)
	}
	outcome := ""
	if f.Outcome != "" {
		outcome, args = `WHERE outcome = ?`, append(args, f.Outcome)
	}
	args = append(args, statusPageSize)
	// A delivery's newest github-dispatch row names the claim whose task covered it (covered_by)
	// and whether its dispatch failed for good; its outcome is that task's newest step.
	const dispatch = `(SELECT json_extract(d.meta, '$.%s') FROM event_log AS d
		WHERE json_extract(d.meta, '$.delivery') = json_extract(r.meta, '$.delivery') AND d.action = 'github-dispatch'
		ORDER BY d.id DESC LIMIT 1)`
	return `SELECT id, ts, status, delivery, unit, image, reason, step, dispatch,
			CASE WHEN reason NOT IN ('queued', 'dispatching', 'pending') THEN
				CASE WHEN status >= 400 THEN 'failed' ELSE 'ignored' END
			WHEN step <> '' THEN ` + outcomeSQL("step") + `
			WHEN dispatch = 'dispatch-failed' THEN 'failed'
			ELSE 'running' END AS outcome
		FROM (SELECT id, ts, status, delivery, unit, image, reason, dispatch,
				coalesce((SELECT json_extract(t.meta, '$.step') FROM event_log AS t
					WHERE json_extract(t.meta, '$.delivery') = task AND t.action = 'github-task'
					ORDER BY t.id DESC LIMIT 1), '') AS step
			FROM (SELECT id, ts, status,
					json_extract(meta, '$.delivery') AS delivery,
					coalesce(json_extract(meta, '$.unit'), '') AS unit,
					coalesce(json_extract(meta, '$.image'), '') AS image,
					coalesce(json_extract(meta, '$.reason'), '') AS reason,
					coalesce(` + fmt.Sprintf(dispatch, "reason") + `, '') AS dispatch,
					coalesce(` + fmt.Sprintf(dispatch, "covered_by") + `, json_extract(meta, '$.delivery')) AS task
				FROM event_log AS r WHERE ` + strings.Join(where, " AND ") + ` ORDER BY id DESC))
		` + outcome + ` ORDER BY id DESC LIMIT ?`, args
}

// statusDeliveries returns one page of GitHub deliveries, newest first: each request row with
// the outcome of the task that ran it (its own, or the one that covered it). Request rows are
// read newest first and each one's newest task step is looked up through idx_event_log_delivery,
// so a page reads its own rows plus those the outcome filter skips.
func statusDeliveries(ctx context.Context, db *sql.DB, f deliveryFilter, loc *time.Location) ([]deliveryRow, error) {
	q, args := deliveriesSQL(f)
	rows, err := db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []deliveryRow
	for rows.Next() {
		var d deliveryRow
		var ts int64
		var step, dispatch string
		if err := rows.Scan(&d.ID, &ts, &d.Status, &d.Delivery, &d.Unit, &d.Image, &d.Reason, &step, &dispatch, &d.Outcome); err != nil {
			return nil, err
		}
		d.When, d.Linkable = statusTime(ts, loc), reDeliveryID.MatchString(d.Delivery)
		switch {
		case d.Outcome == "ignored" || d.Outcome == "failed" && d.Reason != "queued":
			d.Label = strings.ReplaceAll(d.Reason, "-", " ")
		case step != "":
			d.Label = stepLabel(step)
		default:
			d.Label = strings.ReplaceAll(cmp.Or(dispatch, d.Reason), "-", " ")
		}
		out = append(out, d)
	}
	return out, rows.Err()
}

// storyView is one delivery: what GitHub sent, what was decided, and every step of its task.
type storyView struct {
	Delivery, Unit, Image, Digest string
	Outcome, Label                string
	Task, TaskUnit                string // the delivery whose task ran this one, when another's
	Pull, Restart                 string
	Error                         string
	Rows                          []storyRow
}

type storyRow struct {
	When, Action, Step string
	Status             int
	Class              string
	Elapsed            string
	Details            []storyDetail
	Error, Stderr      string
}

type storyDetail struct{ Key, Value string }

// storyHidden are meta keys the story shows elsewhere or that say nothing new on each row.
var storyHidden = map[string]bool{"delivery": true, "unit": true, "image": true, "event": true, "step": true,
	"path": true, "error": true, "stderr": true}

// deliveryStory reads a delivery's rows, and the steps of the task that covered it when that is
// another delivery's. It returns ok false when the log has no row of it.
func deliveryStory(ctx context.Context, db *sql.DB, id string, loc *time.Location) (storyView, bool, error) {
	v := storyView{Delivery: id}
	evs, err := queryEvents(ctx, db, eventFilter{delivery: id, afterID: -1})
	if err != nil || len(evs) == 0 {
		return v, false, err
	}
	carrier := taskDelivery(evs)
	for _, e := range evs {
		if tu := metaString(e.Meta, "task_unit"); tu != "" {
			v.TaskUnit = tu
		}
	}
	if carrier != "" {
		steps, err := queryEvents(ctx, db, eventFilter{action: "github-task", delivery: carrier, afterID: -1})
		if err != nil {
			return v, false, err
		}
		evs = append(evs, steps...)
		slices.SortFunc(evs, func(a, b storedEvent) int { return cmp.Compare(a.ID, b.ID) })
		v.Task = carrier
	}
	var lastStep, dispatch string
	for _, e := range evs {
		if u := metaString(e.Meta, "unit"); u != "" {
			v.Unit = u
		}
		if img := metaString(e.Meta, "image"); img != "" {
			v.Image = img
		}
		for _, k := range []string{"digest", "delivery_digest", "pulled_digest"} {
			if d := metaString(e.Meta, k); d != "" {
				v.Digest = d
			}
		}
		if ms, ok := e.Meta["pull_ms"].(float64); ok {
			v.Pull = (time.Duration(ms) * time.Millisecond).String()
		}
		if ms, ok := e.Meta["restart_ms"].(float64); ok {
			v.Restart = (time.Duration(ms) * time.Millisecond).String()
		}
		step := metaString(e.Meta, "step")
		if e.Action == "github-dispatch" {
			dispatch = metaString(e.Meta, "reason")
		}
		if err := metaString(e.Meta, "error"); err != "" && e.Action != "github-webhook" {
			v.Error = err
		}
		if e.Action == "github-task" {
			lastStep = step
		} else if step == "" {
			step = metaString(e.Meta, "reason")
		}
		r := storyRow{When: statusTime(e.TS, loc), Action: e.Action, Step: step, Status: e.Status,
			Elapsed: (time.Duration(e.DurationMS) * time.Millisecond).String(),
			Error:   metaString(e.Meta, "error"), Stderr: metaString(e.Meta, "stderr")}
		switch {
		case e.Status >= 500 || stepOutcomes[step] == "failed":
			r.Class = "failed"
		case stepOutcomes[step] == "rolled-back":
			r.Class = "rolled-back"
		case e.Status >= 400:
			r.Class = "skipped"
		}
		for _, k := range sortedKeys(e.Meta, func(a, b string) bool { return a < b }) {
			if !storyHidden[k] {
				r.Details = append(r.Details, storyDetail{k, metaString(e.Meta, k)})
			}
		}
		v.Rows = append(v.Rows, r)
	}
	reason := metaString(evs[0].Meta, "reason")
	switch {
	case lastStep != "":
		v.Outcome, v.Label = cmp.Or(stepOutcomes[lastStep], "running"), stepLabel(lastStep)
	case dispatch == "dispatch-failed":
		v.Outcome, v.Label = "failed", "dispatch failed"
	case dispatch != "" || reason == "queued":
		v.Outcome, v.Label = "running", strings.ReplaceAll(cmp.Or(dispatch, reason), "-", " ")+", no task step yet"
	case evs[0].Status >= 400:
		v.Outcome, v.Label = "failed", strings.ReplaceAll(reason, "-", " ")
	default:
		v.Outcome, v.Label = "ignored", strings.ReplaceAll(reason, "-", " ")
	}
	if v.Outcome != "failed" && v.Outcome != "rolled-back" {
		v.Error = "" // a retried dispatch's error, say: the rows still show it
	}
	return v, true, nil
}

// statusView is what one status page shows; Page picks the template's section.
type statusView struct {
	Page    string // overview, deliveries, story, login, no-token, error
	Title   string
	Nav     bool
	Refresh bool
	Message string
	Next    string // where the login form returns to

	Now        string
	Units      []unitStatus
	Failing    int
	Queue      queueStatus
	Chart      chartView
	Filter     deliveryFilter
	Outcomes   []string
	Deliveries []deliveryRow
	Older      int64 // before= of the next page, 0 when this is the last
	Story      storyView
}

// statusStyle is the page's only stylesheet, inline and allowed by its hash in the CSP.
const statusStyle = `
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
header{display:flex;gap:1.5em;align-items:center;padding:.6em 1.2em;background:#1d232a;color:#fff}
header a,header button{color:#fff;background:none;border:0;font:inherit;cursor:pointer;text-decoration:underline}
header form{margin:0}
main{padding:1em 1.2em;max-width:1200px}
h1{font-size:1.3em;margin:.2em 0 .6em}h2{font-size:1.1em;margin:1.4em 0 .5em}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{text-align:left;padding:.35em .6em;border-bottom:1px solid #e3e6ea;vertical-align:top}
th{background:#eef0f3;font-weight:600}
td.wrap,code{word-break:break-all}
code{font:12px ui-monospace,monospace}
pre{white-space:pre-wrap;word-break:break-all;max-height:12em;overflow:auto;margin:.3em 0;font:12px ui-monospace,monospace}
.badge{display:inline-block;padding:0 .5em;border-radius:3px;font-weight:600;font-size:12px;text-transform:uppercase}
.badge.ok{background:#d5f0dc;color:#14522a}.badge.rolled-back{background:#ffe8b3;color:#6b4500}
.badge.failed{background:#b3261e;color:#fff}.badge.running{background:#dbe7ff;color:#123e8c}
.badge.skipped,.badge.ignored{background:#e6e6e6;color:#333}
tr.failed td{background:#fdecea}tr.failed td:first-child{border-left:4px solid #b3261e}
tr.rolled-back td:first-child{border-left:4px solid #d08a00}
pre.err{color:#8c1d18;background:#fdecea;padding:.3em}
.note{background:#fff;border:1px solid #e3e6ea;padding:.8em 1em;max-width:40em}
.alert{color:#8c1d18;font-weight:600}
.queue{background:#fff;border:1px solid #e3e6ea;padding:.5em 1em;display:inline-block}
form.filter{margin:.5em 0;display:flex;gap:.8em;align-items:end;flex-wrap:wrap}
label{display:block;font-size:12px;color:#555}
input,select,button{font:inherit}
.pager{margin:.8em 0;display:flex;gap:1.5em}
svg{background:#fff;border:1px solid #e3e6ea}
svg .ok{fill:#2e9b4f}svg .rolled-back{fill:#e0a100}svg .failed{fill:#b3261e}
svg text{font:11px system-ui,sans-serif;fill:#555}svg line{stroke:#aaa}
.legend span{margin-right:1.2em}.legend i{display:inline-block;width:.9em;height:.9em;margin-right:.3em;vertical-align:-.1em}
.legend .ok{background:#2e9b4f}.legend .rolled-back{background:#e0a100}.legend .failed{background:#b3261e}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em;background:#fff;padding:.8em 1em;border:1px solid #e3e6ea}
dt{color:#555}dd{margin:0;word-break:break-all}
`

// statusCSP is the page's Content-Security-Policy: nothing may load or run except the inline
// stylesheet above, and forms post only to this server.
var statusCSP = func() string {
	sum := sha256.Sum256([]byte(statusStyle))
	return "default-src 'none'; style-src 'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'; " +
		"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
}()

// statusTemplate renders every status page; escaping is html/template's, by context.
var statusTemplate = template.Must(template.New("status").Parse(`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{{- if .Refresh}}
<meta http-equiv="refresh" content="30">{{end}}
<title>{{.Title}} · webhook-auto-update</title>
<style>` + statusStyle + `</style>
</head>
<body>
<header><strong>webhook-auto-update</strong>
{{- if .Nav}}
<a href="/status/">Overview</a>
<a href="/status/deliveries">Deliveries</a>
<form method="post" action="/status/logout"><button type="submit">Log out</button></form>
{{- end}}
</header>
<main>
{{- if eq .Page "no-token"}}
<h1>Status page</h1>
<div class="note">
<p>The status page needs the manual token, and this server has none.</p>
<p>Set <code>WEBHOOK_MANUAL_TOKEN</code> (or <code>WEBHOOK_TOKEN</code>) in the server's
environment, for example in <code>~/.config/webhook-auto-update/webhook-auto-update.env</code> for the user unit,
restart the server, then log in here with that token.</p>
</div>
{{- else if eq .Page "login"}}
<h1>Log in</h1>
<form method="post" action="/status/login" class="note login">
{{- if .Message}}<p class="alert" role="alert">{{.Message}}</p>{{end}}
<label for="token">Manual token (WEBHOOK_MANUAL_TOKEN)</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<input type="hidden" name="next" value="{{.Next}}">
<button type="submit">Log in</button>
</form>
{{- else if eq .Page "error"}}
<h1>{{.Title}}</h1>
<p class="alert">{{.Message}}</p>
{{- else if eq .Page "overview"}}
<h1>Overview</h1>
<p>As of {{.Now}}. Units in the log: {{len .Units}}{{if .Failing}}; <strong class="alert">failed on their last redeploy: {{.Failing}}</strong>{{end}}.</p>
<p class="queue">Queue: {{if .Queue.Pending}}<strong>{{.Queue.Pending}} pending</strong>, the oldest waiting {{.Queue.Oldest}}{{else}}empty{{end}}</p>
<h2>Units</h2>
<table>
<thead><tr><th>Unit</th><th>Image</th><th>Last redeploy</th><th>Finished</th><th>Delivery</th></tr></thead>
<tbody>
{{- range .Units}}
<tr class="{{.Outcome}}">
<td class="wrap">{{.Unit}}</td>
<td class="wrap"><code>{{.Image}}</code></td>
<td>{{if .Outcome}}<span class="badge {{.Outcome}}">{{.Outcome}}</span> {{.Label}}{{else}}none yet{{end}}
{{- if .Running}}<br><span class="badge running">running</span> {{.Running}} at {{.RunningAt}}{{end}}
{{- if .Error}}<pre class="err">{{.Error}}</pre>{{end}}
{{- if .LastSeenRequest}}<br>last delivery: {{if .LastSeenLinkable}}<a href="/status/deliveries/{{.LastSeenDelivery}}">{{.LastSeenRequest}}</a>{{else}}{{.LastSeenRequest}}{{end}}{{end}}</td>
<td>{{.When}}</td>
<td class="wrap">{{if .Linkable}}<a href="/status/deliveries/{{.Delivery}}">{{.Delivery}}</a>{{else}}{{.Delivery}}{{end}}</td>
</tr>
{{- else}}
<tr><td colspan="5">No unit in the event log yet: nothing was delivered or redeployed.</td></tr>
{{- end}}
</tbody>
</table>
<h2>Redeploys per day</h2>
<svg role="img" aria-labelledby="chart-title" width="{{.Chart.Width}}" height="{{.Chart.Height}}" viewBox="0 0 {{.Chart.Width}} {{.Chart.Height}}" xmlns="http://www.w3.org/2000/svg">
<title id="chart-title">{{.Chart.Summary}}</title>
<line x1="36" y1="{{.Chart.Base}}" x2="{{.Chart.Width}}" y2="{{.Chart.Base}}"/>
<text x="4" y="14">{{.Chart.Max}}</text><text x="4" y="{{.Chart.Base}}">0</text>
{{- range .Chart.Bars}}
<g><title>{{.Title}}</title>{{range .Segs}}<rect class="{{.Class}}" x="{{.X}}" y="{{.Y}}" width="{{.W}}" height="{{.H}}"/>{{end}}</g>
{{- end}}
{{- range .Chart.Ticks}}
<text x="{{.X}}" y="{{$.Chart.Height}}" text-anchor="middle" dy="-12">{{.Label}}</text>
{{- end}}
</svg>
<p class="legend"><span><i class="ok"></i>restarted healthy: {{index .Chart.Totals "ok"}}</span><span><i class="rolled-back"></i>rolled back: {{index .Chart.Totals "rolled-back"}}</span><span><i class="failed"></i>failed: {{index .Chart.Totals "failed"}}</span></p>
{{- else if eq .Page "deliveries"}}
<h1>Deliveries</h1>
<form method="get" action="/status/deliveries" class="filter">
<div><label for="unit">Unit</label><input id="unit" name="unit" value="{{.Filter.Unit}}" placeholder="all units"></div>
<div><label for="outcome">Outcome</label><select id="outcome" name="outcome"><option value="">all</option>
{{- range .Outcomes}}<option{{if eq . $.Filter.Outcome}} selected{{end}}>{{.}}</option>{{end}}</select></div>
<button type="submit">Filter</button>
</form>
<table>
<thead><tr><th>Received</th><th>Unit</th><th>Image</th><th>Outcome</th><th>Delivery</th></tr></thead>
<tbody>
{{- range .Deliveries}}
<tr class="{{.Outcome}}">
<td>{{.When}}</td>
<td class="wrap">{{.Unit}}</td>
<td class="wrap"><code>{{.Image}}</code></td>
<td><span class="badge {{.Outcome}}">{{.Outcome}}</span> {{.Label}}</td>
<td class="wrap">{{if .Linkable}}<a href="/status/deliveries/{{.Delivery}}">{{.Delivery}}</a>{{else}}{{.Delivery}}{{end}}</td>
</tr>
{{- else}}
<tr><td colspan="5">No delivery matches.</td></tr>
{{- end}}
</tbody>
</table>
<p class="pager">{{if .Filter.Before}}<a href="/status/deliveries?unit={{.Filter.Unit}}&amp;outcome={{.Filter.Outcome}}">Newest</a>{{end}}
{{- if .Older}} <a href="/status/deliveries?unit={{.Filter.Unit}}&amp;outcome={{.Filter.Outcome}}&amp;before={{.Older}}">Older</a>{{end}}</p>
{{- else if eq .Page "story"}}
{{- with .Story}}
<h1>Delivery <code>{{.Delivery}}</code></h1>
<dl>
<dt>Outcome</dt><dd><span class="badge {{.Outcome}}">{{.Outcome}}</span> {{.Label}}</dd>
<dt>Unit</dt><dd>{{.Unit}}</dd>
<dt>Image</dt><dd><code>{{.Image}}</code></dd>
{{- if .Digest}}<dt>Digest</dt><dd><code>{{.Digest}}</code></dd>{{end}}
{{- if .Pull}}<dt>Pull</dt><dd>{{.Pull}}</dd>{{end}}
{{- if .Restart}}<dt>Restart</dt><dd>{{.Restart}}</dd>{{end}}
{{- if .Task}}<dt>Covered by</dt><dd>the task of delivery <a href="/status/deliveries/{{.Task}}">{{.Task}}</a></dd>{{end}}
{{- if .TaskUnit}}<dt>Task unit</dt><dd><code>{{.TaskUnit}}</code></dd>{{end}}
{{- if .Error}}<dt>Error</dt><dd><pre class="err">{{.Error}}</pre></dd>{{end}}
</dl>
<h2>Steps</h2>
<table>
<thead><tr><th>Time</th><th>Action</th><th>Step</th><th>Status</th><th>Elapsed</th><th>Details</th></tr></thead>
<tbody>
{{- range .Rows}}
<tr class="{{.Class}}">
<td>{{.When}}</td><td>{{.Action}}</td><td>{{.Step}}</td><td>{{.Status}}</td><td>{{.Elapsed}}</td>
<td class="wrap">{{range .Details}}<code>{{.Key}}={{.Value}}</code> {{end}}
{{- if .Error}}<pre class="err">{{.Error}}</pre>{{end}}{{if .Stderr}}<pre>{{.Stderr}}</pre>{{end}}</td>
</tr>
{{- end}}
</tbody>
</table>
{{- end}}
{{- end}}
</main>
</body>
</html>
`))

// statusHeaders are sent with every status page: no caching of what a login showed, no
// framing, no referrer, and the CSP.
func statusHeaders(w http.ResponseWriter) {
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Content-Security-Policy", statusCSP)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Cache-Control", "no-store")
}

// renderStatus writes one status page; a template failure is a 500 and a log line.
func (s *server) renderStatus(w http.ResponseWriter, status int, v statusView) {
	var buf bytes.Buffer
	if err := statusTemplate.Execute(&buf, v); err != nil {
		s.log.errorf("status page %s: %v", v.Page, err)
		http.Error(w, "cannot render the status page", http.StatusInternalServerError)
		return
	}
	statusHeaders(w)
	w.WriteHeader(status)
	w.Write(buf.Bytes())
}

// statusSessionKey derives the key that signs sessions from the manual token, so a new token
// ends every session and the key itself is never stored.
func statusSessionKey(token string) []byte {
	m := hmac.New(sha256.New, []byte(token))
	m.Write([]byte("webhook-auto-update status page session"))
	return m.Sum(nil)
}

// statusSession is the cookie value of a session that ends at expires: the unix time and its
// HMAC under statusSessionKey.
func statusSession(token string, expires time.Time) string {
	exp := strconv.FormatInt(expires.Unix(), 10)
	m := hmac.New(sha256.New, statusSessionKey(token))
	m.Write([]byte(exp))
	return exp + "." + base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// validStatusSession reports whether a cookie value is a session signed under token that has
// not expired (and does not claim to last longer than a login gives).
func validStatusSession(token, value string, now time.Time) bool {
	exp, _, ok := strings.Cut(value, ".")
	n, err := strconv.ParseInt(exp, 10, 64)
	if token == "" || !ok || err != nil || n <= now.Unix() || n > now.Add(statusSessionTTL).Unix() {
		return false
	}
	return hmac.Equal([]byte(value), []byte(statusSession(token, time.Unix(n, 0))))
}

// statusAllowed answers the request itself and returns false unless it carries a valid session:
// without a manual token configured the page says how to set one, else it shows the login form.
func (s *server) statusAllowed(w http.ResponseWriter, r *http.Request) bool {
	info(r).action = "status-page"
	if s.cfg.manualToken == "" {
		s.renderStatus(w, http.StatusForbidden, statusView{Page: "no-token", Title: "Status page"})
		return false
	}
	if c, err := r.Cookie(statusCookie); err == nil && validStatusSession(s.cfg.manualToken, c.Value, s.now()) {
		return true
	}
	next := r.URL.Path
	if r.URL.RawQuery != "" {
		next += "?" + r.URL.RawQuery
	}
	s.renderStatus(w, http.StatusOK, statusView{Page: "login", Title: "Log in", Next: next})
	return false
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

// handleStatusLogin exchanges the manual token, posted in the login form, for a session cookie:
// HttpOnly, SameSite=Strict (so no other site can make the browser send it, which is also what
// keeps the two forms safe from cross-site posts), Secure when the request came over TLS.
func (s *server) handleStatusLogin(w http.ResponseWriter, r *http.Request) {
	ri := info(r)
	ri.action = "status-login"
	next := statusNext(r.PostFormValue("next"))
	if s.cfg.manualToken == "" {
		ri.meta["reason"] = "no-token"
		s.renderStatus(w, http.StatusForbidden, statusView{Page: "no-token", Title: "Status page"})
		return
	}
	if !tokenMatches(s.cfg.manualToken, r.PostFormValue("token")) {
		ri.meta["reason"] = "wrong-token"
		s.renderStatus(w, http.StatusForbidden, statusView{Page: "login", Title: "Log in", Next: next,
			Message: "That is not the manual token: check WEBHOOK_MANUAL_TOKEN (or WEBHOOK_TOKEN) in the server's environment."})
		return
	}
	ri.meta["reason"] = "ok"
	expires := s.now().Add(statusSessionTTL)
	http.SetCookie(w, &http.Cookie{Name: statusCookie, Value: statusSession(s.cfg.manualToken, expires), Path: "/",
		Expires: expires, MaxAge: int(statusSessionTTL / time.Second), HttpOnly: true, SameSite: http.SameSiteStrictMode,
		Secure: r.TLS != nil || r.Header.Get("X-Forwarded-Proto") == "https"})
	http.Redirect(w, r, next, http.StatusSeeOther)
}

// handleStatusLogout clears the session cookie. The session itself stays valid until it expires
// or the token changes: a browser that kept a copy is not logged out, a token rotation is.
func (s *server) handleStatusLogout(w http.ResponseWriter, r *http.Request) {
	info(r).action = "status-logout"
	http.SetCookie(w, &http.Cookie{Name: statusCookie, Value: "", Path: "/", MaxAge: -1, HttpOnly: true,
		SameSite: http.SameSiteStrictMode, Secure: r.TLS != nil || r.Header.Get("X-Forwarded-Proto") == "https"})
	http.Redirect(w, r, "/status/", http.StatusSeeOther)
}

// statusFailed answers a page whose query failed.
func (s *server) statusFailed(w http.ResponseWriter, page string, err error) {
	s.log.errorf("status page %s: cannot read the event log: %v", page, err)
	s.renderStatus(w, http.StatusInternalServerError, statusView{Page: "error", Title: "Error", Nav: true,
		Message: "Cannot read the event log; the server's log says why."})
}

// handleStatusOverview shows every unit, the queue and the chart; it refreshes itself every 30 s.
func (s *server) handleStatusOverview(w http.ResponseWriter, r *http.Request) {
	if !s.statusAllowed(w, r) {
		return
	}
	ctx := r.Context()
	now := s.now()
	v := statusView{Page: "overview", Title: "Overview", Nav: true, Refresh: true, Now: statusTime(now.Unix(), time.Local)}
	var err error
	if v.Units, err = statusUnits(ctx, s.events.db, time.Local); err != nil {
		s.statusFailed(w, "overview", err)
		return
	}
	for _, u := range v.Units {
		if u.Outcome == "failed" {
			v.Failing++
		}
	}
	if v.Queue, err = statusQueue(ctx, s.events.db, now); err != nil {
		s.statusFailed(w, "overview", err)
		return
	}
	if v.Chart, err = redeployChart(ctx, s.events.db, now, time.Local); err != nil {
		s.statusFailed(w, "overview", err)
		return
	}
	s.renderStatus(w, http.StatusOK, v)
}

// handleStatusDeliveries lists deliveries newest first, filtered by ?unit= and ?outcome=, paged
// by ?before=.
func (s *server) handleStatusDeliveries(w http.ResponseWriter, r *http.Request) {
	if !s.statusAllowed(w, r) {
		return
	}
	q := r.URL.Query()
	v := statusView{Page: "deliveries", Title: "Deliveries", Nav: true, Outcomes: statusOutcomes,
		Filter: deliveryFilter{Outcome: q.Get("outcome")}}
	bad := func(msg string) {
		s.renderStatus(w, http.StatusBadRequest, statusView{Page: "error", Title: "Deliveries", Nav: true, Message: msg})
	}
	if u := strings.TrimSpace(q.Get("unit")); u != "" {
		unit, err := resolveUnit(u)
		if err != nil {
			bad(err.Error())
			return
		}
		v.Filter.Unit = unit
	}
	if v.Filter.Outcome != "" && !slices.Contains(statusOutcomes, v.Filter.Outcome) {
		bad("unknown outcome: choose one of " + strings.Join(statusOutcomes, ", "))
		return
	}
	if b := q.Get("before"); b != "" {
		n, err := strconv.ParseInt(b, 10, 64)
		if err != nil || n <= 0 {
			bad("invalid before: want the id of a delivery row")
			return
		}
		v.Filter.Before = n
	}
	var err error
	if v.Deliveries, err = statusDeliveries(r.Context(), s.events.db, v.Filter, time.Local); err != nil {
		s.statusFailed(w, "deliveries", err)
		return
	}
	if len(v.Deliveries) == statusPageSize {
		v.Older = v.Deliveries[len(v.Deliveries)-1].ID
	}
	s.renderStatus(w, http.StatusOK, v)
}

// handleStatusStory shows one delivery's story.
func (s *server) handleStatusStory(w http.ResponseWriter, r *http.Request) {
	if !s.statusAllowed(w, r) {
		return
	}
	id := r.PathValue("id")
	if !reDeliveryID.MatchString(id) {
		s.renderStatus(w, http.StatusBadRequest, statusView{Page: "error", Title: "Delivery", Nav: true, Message: "invalid delivery id"})
		return
	}
	story, ok, err := deliveryStory(r.Context(), s.events.db, id, time.Local)
	if err != nil {
		s.statusFailed(w, "delivery", err)
		return
	}
	if !ok {
		s.renderStatus(w, http.StatusNotFound, statusView{Page: "error", Title: "Delivery", Nav: true,
			Message: "The event log has no row of delivery " + id + "."})
		return
	}
	s.renderStatus(w, http.StatusOK, statusView{Page: "story", Title: "Delivery " + id, Nav: true, Story: story})
}
