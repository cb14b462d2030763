// eventlog.go owns the SQLite audit log: opening the database named by WEBHOOK_DB_URL, applying
// the embedded migrations, and writing event_log rows.
//
// Rules: the event_log schema is the original tool's (migrations/0001), so a database it created
// keeps working. Every migration runs once, in its own BEGIN IMMEDIATE transaction that records
// it in schema_migrations and re-reads that table first, because another process may migrate the
// same file at the same moment. A database newer than this binary is refused. Rows are written
// by one background writer in batched transactions so logging never slows a request; a row that
// cannot be written is printed to stderr as one JSON line, so no event is silently lost. Secrets
// never reach a row: query strings pass through redactQuery.
package main

import (
	"context"
	"crypto/rand"
	"database/sql"
	"embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	_ "modernc.org/sqlite"
)

//go:embed migrations/*.sql
var migrationFiles embed.FS

// busyTimeout is how long a writer waits for another process's write lock before failing.
const busyTimeout = 10 * time.Second

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
	queue  chan event
	done   chan struct{}

	pending  atomic.Int64 // queued, not yet committed
	failures atomic.Int64 // rows that could not be written and went to stderr
}

// databasePath turns WEBHOOK_DB_URL into a file path: the sqlite:// (or sqlite:) prefix is
// optional, a query such as ?mode=rwc from the original tool's URLs is ignored, and a relative
// path is under the state directory.
func databasePath(dbURL, stateDir string) (string, error) {
	p := strings.TrimSpace(dbURL)
	switch {
	case strings.HasPrefix(p, "sqlite://"):
		p = strings.TrimPrefix(p, "sqlite://")
	case strings.HasPrefix(p, "sqlite:"):
		p = strings.TrimPrefix(p, "sqlite:")
	}
	if i := strings.IndexByte(p, '?'); i >= 0 {
		p = p[:i]
	}
	if p == "" || p == ":memory:" || strings.ContainsAny(p, "#\x00") {
		return "", fmt.Errorf("invalid WEBHOOK_DB_URL=%q: want sqlite://PATH with a file path", dbURL)
	}
	if !filepath.IsAbs(p) {
		p = filepath.Join(stateDir, p)
	}
	return filepath.Clean(p), nil
}

// openEventLog opens (creating 0600 if needed) and migrates the database, then starts the
// background writer. The caller must Close it to flush queued rows.
func openEventLog(path string, lg *logger) (*eventLog, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("cannot create the database directory: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("cannot open database %s: %w", path, err)
	}
	f.Close()
	dsn := "file:" + path + "?_pragma=busy_timeout(" + strconv.Itoa(int(busyTimeout/time.Millisecond)) + ")" +
		"&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)&_txlock=immediate"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("cannot open database %s: %w", path, err)
	}
	db.SetMaxOpenConns(4)
	ctx, cancel := context.WithTimeout(context.Background(), 2*busyTimeout)
	defer cancel()
	if err := migrate(ctx, db); err != nil {
		db.Close()
		return nil, fmt.Errorf("database %s: %w", path, err)
	}
	l := &eventLog{db: db, path: path, log: lg, queue: make(chan event, 4096), done: make(chan struct{})}
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
	case l.queue <- ev:
		return
	default:
	}
	t := time.NewTimer(5 * time.Second)
	defer t.Stop()
	select {
	case l.queue <- ev:
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

func (l *eventLog) writer() {
	defer close(l.done)
	batch := make([]event, 0, 256)
	for ev := range l.queue {
		batch = append(batch[:0], ev)
	fill:
		for len(batch) < cap(batch) {
			select {
			case ev, ok := <-l.queue:
				if !ok {
					break fill
				}
				batch = append(batch, ev)
			default:
				break fill
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*busyTimeout)
		if err := l.insert(ctx, batch); err != nil {
			l.spill(batch, err)
		}
		cancel()
		l.pending.Add(-int64(len(batch)))
	}
}

func (l *eventLog) insert(ctx context.Context, evs []event) error {
	tx, err := l.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	for _, ev := range evs {
		if err := insertEvent(ctx, tx, ev); err != nil {
			return err
		}
	}
	return tx.Commit()
}

const insertEventSQL = `INSERT INTO event_log
	(request_id, ts, method, path, status, action, duration_ms, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`

// insertEvent writes one row inside tx; an empty path is stored as NULL, as the original did.
func insertEvent(ctx context.Context, tx *sql.Tx, ev event) error {
	var path any
	if ev.Path != "" {
		path = ev.Path
	}
	_, err := tx.ExecContext(ctx, insertEventSQL, ev.RequestID, ev.TS.Unix(), ev.Method, path, ev.Status,
		ev.Action, ev.Duration.Milliseconds(), ev.metaJSON())
	return err
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

// redactQuery replaces the values of secret parameters in a raw query string. It works on the
// raw text, so a query that does not parse is still redacted rather than logged as it came.
func redactQuery(raw string) string {
	if raw == "" {
		return ""
	}
	parts := strings.Split(raw, "&")
	for i, p := range parts {
		k, _, hasValue := strings.Cut(p, "=")
		name, err := url.QueryUnescape(k)
		if err != nil {
			name = k
		}
		if secretParams[strings.ToLower(strings.TrimSpace(name))] && hasValue {
			parts[i] = k + "=REDACTED"
		}
	}
	return strings.Join(parts, "&")
}

// staleClaim is how long a delivery may stay "dispatching" before a redelivery may take it over:
// the server that claimed it died between the claim and systemd-run.
const staleClaim = 2 * time.Minute

// claimDelivery records a GitHub delivery id before its redeploy is dispatched. It reports false
// when the id was already accepted, so the caller answers "duplicate delivery". A delivery whose
// dispatch failed, or whose claim went stale, may be claimed again.
func (l *eventLog) claimDelivery(ctx context.Context, id, unit, image, eventName, requestID string, now time.Time) (bool, error) {
	res, err := l.db.ExecContext(ctx, `INSERT INTO github_deliveries
		(delivery_id, unit, image, event, request_id, status, received_at, updated_at)
		VALUES (?, ?, ?, ?, ?, 'dispatching', ?, ?)
		ON CONFLICT (delivery_id) DO UPDATE SET unit = excluded.unit, image = excluded.image,
			event = excluded.event, request_id = excluded.request_id, status = 'dispatching',
			updated_at = excluded.updated_at
		WHERE github_deliveries.status = 'dispatch-failed'
			OR (github_deliveries.status = 'dispatching' AND github_deliveries.updated_at < ?)`,
		id, unit, image, eventName, requestID, now.Unix(), now.Unix(), now.Add(-staleClaim).Unix())
	if err != nil {
		return false, fmt.Errorf("record delivery %s: %w", id, err)
	}
	n, err := res.RowsAffected()
	return n == 1, err
}

// settleDelivery sets a claimed delivery's status and commits the request's event row in the
// same transaction, so the answer to GitHub is sent only once both are durable.
func (l *eventLog) settleDelivery(ctx context.Context, id, status string, ev event) error {
	tx, err := l.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `UPDATE github_deliveries SET status = ?, updated_at = ? WHERE delivery_id = ?`,
		status, ev.TS.Unix(), id); err != nil {
		return err
	}
	if err := insertEvent(ctx, tx, ev); err != nil {
		return err
	}
	return tx.Commit()
}
