// eventlog.go owns the SQLite database: opening and migrating it, the batching writer of event_log
// rows, the delivery queue's SQL (github_deliveries rows are the claims), the one outcome model,
// notifications (the outbox, WEBHOOK_NOTIFY_URLS' formats, the messages and the server's sender),
// the events command, the image checks' rows, and the status page's queries and template (its
// handlers are webhook.go's, reading through the query_only reader, never the writer's connections).
//
// Rules: event_log keeps the original tool's schema and indexes. Each migration runs once in its own
// BEGIN IMMEDIATE transaction, re-reading schema_migrations; a newer database is refused. One writer
// goroutine commits rows in batches; an unwritable row goes to stderr as a JSON line. A claim's status
// changes in one transaction with the rows that say so, and an outcome's message (notifyTx) with them;
// a target's secret never reaches a row, a log line or the page. Page data reaches HTML only via html/template.
package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"database/sql"
	"embed"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"html/template"
	"io"
	"io/fs"
	"maps"
	"math"
	"math/rand/v2"
	"mime"
	"mime/quotedprintable"
	"net"
	"net/http"
	"net/mail"
	"net/smtp"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
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

// busyTimeout is how long a writer waits for another process's lock; run-task, whose rows nobody waits for, waits longer.
const (
	busyTimeout     = 10 * time.Second
	taskBusyTimeout = 2 * time.Minute
)

type event struct {
	RequestID, Method, Path, Action string
	TS                              time.Time
	Status                          int
	Duration                        time.Duration
	Meta                            map[string]any
}

// eventLog is the open database and its writer; writing admits one of this process's write transactions at a time.
type eventLog struct {
	db            *sql.DB
	reader        *sql.DB // query_only, for /metrics, /health, /api and the page: never the writer's connections
	path          string
	log           *logger
	file          fileID
	mu            sync.RWMutex // guards closed against a send on the closed queue
	closed        bool
	queue         chan queued
	done, writing chan struct{}

	pending, failures         atomic.Int64 // queued but not committed; sent to stderr
	lastWriteOK, lastWriteBad atomic.Int64 // unix nanoseconds
	lastWriteErr              atomic.Value
}

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

// usable errs when the path no longer names the file opened: a claim committed to it would vanish.
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

// lastWriteFailed reports the newest write's error until a later write commits.
func (l *eventLog) lastWriteFailed() error {
	if l.lastWriteBad.Load() <= l.lastWriteOK.Load() {
		return nil
	}
	msg, _ := l.lastWriteErr.Load().(string)
	return fmt.Errorf("the newest write to the database failed: %s", msg)
}

// probe commits a no-op write that needs the lock and a page, as a row does: /health's answer, not a failed write.
func (l *eventLog) probe(ctx context.Context) error {
	return l.inTurn(ctx, false, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `UPDATE schema_migrations SET applied_at = applied_at
			WHERE version = (SELECT max(version) FROM schema_migrations)`)
		return err
	})
}

// databasePath turns WEBHOOK_DB_URL (PATH, sqlite://PATH or sqlite:PATH, no query but mode=rwc) into a path, else errs.
func databasePath(dbURL, stateDir string) (string, error) {
	p := strings.TrimSpace(dbURL)
	bad := func(why string) (string, error) {
		return "", fmt.Errorf("invalid WEBHOOK_DB_URL=%q (or --db): %s; want sqlite://PATH or a bare PATH", dbURL, why)
	}
	if rest, ok := strings.CutPrefix(p, "sqlite:"); ok {
		p = strings.TrimPrefix(rest, "//")
	} else if reURLScheme.MatchString(p) {
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

var reURLScheme = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9+.-]*:`)

func openEventLog(path string, lg *logger) (*eventLog, error) {
	return openEventLogWaiting(path, lg, busyTimeout)
}

// openEventLogWaiting opens (creating 0600) and migrates the database and starts the writer.
func openEventLogWaiting(path string, lg *logger, wait time.Duration) (*eventLog, error) {
	hint := " (set --state-dir or WEBHOOK_STATE_DIR, or --db or WEBHOOK_DB_URL)"
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("cannot create the directory of database %s: %w%s", path, err, hint)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("cannot open database %s: %w%s", path, err, hint)
	}
	f.Close()
	dsn := "file:" + path + "?_pragma=busy_timeout(" + strconv.Itoa(int(wait/time.Millisecond)) + ")"
	db, err := sql.Open("sqlite", dsn+"&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)&_txlock=immediate")
	if err != nil {
		return nil, fmt.Errorf("cannot open database %s: %w", path, err)
	}
	db.SetMaxOpenConns(4)
	ctx, cancel := context.WithTimeout(context.Background(), 2*wait)
	defer cancel()
	id, err := statID(path)
	if err == nil {
		err = migrate(ctx, db)
	}
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("database %s: %w", path, err)
	}
	// Only an unknown driver fails sql.Open, and the writer's just succeeded.
	reader, _ := sql.Open("sqlite", dsn+"&_pragma=query_only(1)")
	reader.SetMaxOpenConns(2)
	l := &eventLog{db: db, reader: reader, path: path, log: lg, queue: make(chan queued, 4096), done: make(chan struct{}),
		writing: make(chan struct{}, 1), file: id}

	go l.writer()
	return l, nil
}

type migration struct {
	version   int
	name, sql string
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
	slices.SortFunc(ms, func(a, b migration) int { return a.version - b.version })
	return ms, nil
}

// migrate applies the migrations the database lacks; an up-to-date one takes no lock (every run-task opens it).
func migrate(ctx context.Context, db *sql.DB) error {
	ms, err := loadMigrations()
	if err != nil {
		return err
	}
	latest := ms[len(ms)-1].version
	if v, err := schemaVersion(ctx, db); err == nil && v == latest {
		return nil
	}
	if _, err := db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
		version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)`); err != nil {
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
	newest, err := schemaVersion(ctx, tx)
	if err != nil {
		return fmt.Errorf("read schema version: %w", err)
	}
	if newest > latest {
		return fmt.Errorf("schema version %d is newer than this binary knows (%d): run a newer webhook-auto-update or point WEBHOOK_DB_URL at another database", newest, latest)
	}
	var n int
	if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM schema_migrations WHERE version = ?`, m.version).Scan(&n); err != nil || n > 0 {
		return err
	}
	if _, err := tx.ExecContext(ctx, m.sql); err != nil {
		return fmt.Errorf("migration %s: %w", m.name, err)
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)`,
		m.version, m.name, time.Now().Unix()); err != nil {
		return fmt.Errorf("record migration %s: %w", m.name, err)
	}
	return tx.Commit()
}

// querier is a *sql.DB or a *sql.Tx.
type querier interface {
	QueryContext(context.Context, string, ...any) (*sql.Rows, error)
	QueryRowContext(context.Context, string, ...any) *sql.Row
}

// schemaVersion is the newest applied migration.
func schemaVersion(ctx context.Context, q querier) (int, error) {
	var v sql.NullInt64
	err := q.QueryRowContext(ctx, `SELECT max(version) FROM schema_migrations`).Scan(&v)
	return int(v.Int64), err
}

// queued is a row for the writer; a claim's row is written only when the claim succeeds, reported on result.
type queued struct {
	event
	claim  *taskSpec
	result chan claimResult
}

type claimResult struct {
	claimed bool
	err     error
}

// Record queues a row, waiting at most 5s for room; past that, or after Close, it goes to stderr.
func (l *eventLog) Record(ev event) {
	if err := l.enqueue(context.Background(), queued{event: ev}, 5*time.Second); err != nil {
		l.spill([]event{ev}, err)
	}
}

// enqueue hands q to the writer, waiting when the queue is full until ctx ends or, when set, for wait.
func (l *eventLog) enqueue(ctx context.Context, q queued, wait time.Duration) error {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.closed {
		return errors.New("event log already closed")
	}
	l.pending.Add(1)
	select {
	case l.queue <- q:
		return nil
	default:
	}
	if wait > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(ctx, wait, errors.New("event queue full"))
		defer cancel()
	}
	select {
	case l.queue <- q:
		return nil
	case <-ctx.Done():
		l.pending.Add(-1)
		return context.Cause(ctx)
	}
}

// Write commits rows before it returns; a failure also spills them to stderr.
func (l *eventLog) Write(ctx context.Context, evs ...event) error {
	err := l.write(ctx, func(tx *sql.Tx) error { return l.insertEvents(ctx, tx, evs) })
	if err != nil {
		l.spill(evs, err)
	}
	return err
}

// Close stops accepting rows, commits every queued one and closes the database.
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
	l.reader.Close()
	return l.db.Close()
}

// writer commits whatever arrived during the previous commit in one transaction, claims included.
func (l *eventLog) writer() {
	defer close(l.done)
	batch := make([]queued, 0, 256)
	var committed time.Time
	for q := range l.queue {
		batch = append(batch[:0], q)
		if q.claim == nil && time.Since(committed) < commitGap && len(l.queue) < rowsPerInsert {
			time.Sleep(commitGap) // rows are coming in, a few at a time: let more join this commit
		}
		for len(batch) < cap(batch) && len(l.queue) > 0 { // only this goroutine receives: no wait
			batch = append(batch, <-l.queue)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*busyTimeout)
		l.commit(ctx, batch)
		cancel()
		l.pending.Add(-int64(len(batch)))
		committed = time.Now()
	}
}

// commit writes a batch and reports each claim; on failure the rows that are not claims go to stderr.
func (l *eventLog) commit(ctx context.Context, batch []queued) {
	claimed := make([]bool, len(batch))
	err := l.write(ctx, func(tx *sql.Tx) error {
		var evs []event
		for i, q := range batch {
			if q.claim != nil {
				var err error
				if claimed[i], err = insertClaim(ctx, tx, *q.claim, q.event, claimPending); err != nil {
					return err
				}
			}
			if q.claim == nil || claimed[i] {
				evs = append(evs, q.event)
			}
		}
		return l.insertEvents(ctx, tx, evs)
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

func (l *eventLog) write(ctx context.Context, fn func(tx *sql.Tx) error) error {
	return l.inTurn(ctx, true, fn)
}

// inTurn runs fn in a write transaction behind this process's others; with record, it is the newest write.
func (l *eventLog) inTurn(ctx context.Context, record bool, fn func(tx *sql.Tx) error) error {
	select {
	case l.writing <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("waiting for the database: %w", context.Cause(ctx))
	}
	defer func() { <-l.writing }()
	tx, err := l.db.BeginTx(ctx, nil)
	if err == nil {
		defer tx.Rollback()
		if err = fn(tx); err == nil {
			err = tx.Commit()
		}
	}
	switch {
	case record && err != nil:
		l.lastWriteErr.Store(err.Error())
		l.lastWriteBad.Store(time.Now().UnixNano())
	case record:
		l.lastWriteOK.Store(time.Now().UnixNano())
	}
	return err
}

// commitGap is how long a small batch of rows may fill after a recent commit; a batch starting with a claim does not wait.
const commitGap = 2 * time.Millisecond

// rowsPerWrite bounds the rows of one dispatcher transaction, and so how long claims wait.
const rowsPerWrite = 128

const insertEventSQL = `INSERT INTO event_log
	(request_id, ts, method, path, status, action, duration_ms, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`

// insertEvents writes evs with statements of rowsPerInsert rows while that many are left, then of one.
func (l *eventLog) insertEvents(ctx context.Context, tx *sql.Tx, evs []event) error {
	for width := rowsPerInsert; len(evs) > 0; width = 1 {
		if len(evs) < width {
			continue
		}
		stmt, err := tx.PrepareContext(ctx, insertEventSQL+strings.Repeat(", (?, ?, ?, ?, ?, ?, ?, ?)", width-1))
		if err != nil {
			return err
		}
		defer stmt.Close()
		for ; len(evs) >= width; evs = evs[width:] {
			args := make([]any, 0, 8*width)
			for _, ev := range evs[:width] {
				args = append(args, ev.insertArgs()...)
			}
			if _, err := stmt.ExecContext(ctx, args...); err != nil {
				return err
			}
		}
	}
	return nil
}

const rowsPerInsert = 32

// insertArgs are insertEventSQL's values; an empty path is NULL, as the original tool stored it.
func (ev event) insertArgs() []any {
	var path any
	if ev.Path != "" {
		path = ev.Path
	}
	return []any{ev.RequestID, ev.TS.Unix(), ev.Method, path, ev.Status, ev.Action, ev.Duration.Milliseconds(), ev.metaJSON()}
}

func (l *eventLog) spill(evs []event, cause error) {
	l.failures.Add(int64(len(evs)))
	spill(l.log, evs, cause)
}

// spill is the one way an unwritten row is printed: a JSON line, to recover from the journal.
func spill(lg *logger, evs []event, cause error) {
	for _, ev := range evs {
		lg.warnf("event log write failed (%v), unwritten event: %s", cause, marshalJSON(map[string]any{
			"request_id": ev.RequestID, "ts": ev.TS.Unix(), "method": ev.Method, "path": ev.Path,
			"status": ev.Status, "action": ev.Action, "duration_ms": ev.Duration.Milliseconds(),
			"meta": json.RawMessage(ev.metaJSON()),
		}))
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

func newRequestID() string {
	var b [16]byte
	binary.NativeEndian.PutUint64(b[:], rand.Uint64())
	binary.NativeEndian.PutUint64(b[8:], rand.Uint64())
	return hex.EncodeToString(b[:])
}

// The delivery queue: claimDelivery commits a pending claim, nextTask takes it, run-task records its steps.

// claimStatus is a claim's state: pending (maybe in a policy's wait step) → dispatching (systemd-run)
// → dispatched (its task runs) → done (also rejected, expired); or failed, which a redelivery may claim again.
type claimStatus string

const (
	claimPending     claimStatus = "pending"
	claimDispatching claimStatus = "dispatching"
	claimDispatched  claimStatus = "dispatched"
	claimDone        claimStatus = "done"
	claimFailed      claimStatus = "failed"

	waitCooldown, waitWindow, waitApproval = "cooldown", "window", "awaiting-approval"
)

// claimDelivery commits a pending claim with ev in the writer's next batch; false is a duplicate, nothing written.
func (l *eventLog) claimDelivery(ctx context.Context, t taskSpec, ev event) (bool, error) {
	q := queued{event: ev, claim: &t, result: make(chan claimResult, 1)}
	fail := func(err error) (bool, error) { return false, fmt.Errorf("record delivery %s: %w", t.delivery, err) }
	if err := l.enqueue(ctx, q, 0); err != nil {
		return fail(err)
	}
	select {
	case r := <-q.result:
		if r.err != nil {
			return fail(r.err)
		}
		return r.claimed, nil
	case <-ctx.Done():
		return fail(context.Cause(ctx))
	}
}

// insertClaim claims t in status, taking over a failed claim; a dispatching one (a manual redeploy) names its task unit.
func insertClaim(ctx context.Context, tx *sql.Tx, t taskSpec, ev event, status claimStatus) (bool, error) {
	var taskUnit, coveredBy any
	if status == claimDispatching {
		taskUnit, coveredBy = taskUnitName(t.delivery), t.delivery
	}
	res, err := tx.ExecContext(ctx, `INSERT INTO github_deliveries (delivery_id, unit, image, event, request_id,
			status, received_at, updated_at, path, digest, claimed_at, task_unit, covered_by)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
		ON CONFLICT (delivery_id) DO UPDATE SET unit = excluded.unit, image = excluded.image,
			event = excluded.event, request_id = excluded.request_id, status = excluded.status,
			updated_at = excluded.updated_at, path = excluded.path, digest = excluded.digest,
			claimed_at = excluded.claimed_at, attempts = 0, next_attempt_at = 0, step = '',
			covered_by = excluded.covered_by, task_unit = excluded.task_unit, error = NULL
		WHERE github_deliveries.status = 'failed'`,
		t.delivery, t.unit, t.image, t.event, ev.RequestID, status, ev.TS.Unix(), ev.TS.Unix(), t.path, t.digest,
		ev.TS.UnixMilli(), taskUnit, coveredBy)
	if err != nil {
		return false, err
	}
	n, err := res.RowsAffected()
	return n == 1, err
}

// claimDispatching records a manual redeploy as a dispatching claim, so the queue and page know it.
func (l *eventLog) claimDispatching(ctx context.Context, t taskSpec) error {
	return l.write(ctx, func(tx *sql.Tx) error {
		_, err := insertClaim(ctx, tx, t, event{RequestID: newRequestID(), TS: time.Now()}, claimDispatching)
		return err
	})
}

// queuedTask is the first pending claim whose unit runs no task, covering the other pending claims
// of its unit and image: the pull fetches the tag as it is then, with every push announced before.
type queuedTask struct {
	taskSpec                  // the first claim's; digest is the newest claim's
	covered         []string  // the deliveries covered, the first one first
	attempts        int       // systemd-runs that failed before
	claimed, newest time.Time // when the first and the last of its claims arrived
	unapproved      time.Time // when the first claim no person approved arrived; zero: none
}

// hold is a policy's answer for a task: its claims wait in step until until (a wait step), or
// expire (those unapproved since until), or fail (policy-invalid, errText); "" runs the task.
type hold struct {
	step, errText string
	until         time.Time
}

// nextTask marks the next due task's claims dispatching with the rows rows makes of it, unless policy
// holds them; wake is when to look again (zero: at once). Only the dispatcher takes pending claims.
func (l *eventLog) nextTask(ctx context.Context, now time.Time, policy func(queuedTask) hold, rows func(queuedTask) []event) (qt queuedTask, ok bool, wake time.Time, err error) {
	var claimedMS, newestMS, unapprovedMS int64
	err = l.db.QueryRowContext(ctx, `SELECT delivery_id, unit, image, event, path, attempts, claimed_at,
			(SELECT max(claimed_at) FROM github_deliveries g WHERE g.status = 'pending' AND g.unit = d.unit AND g.image = d.image),
			(SELECT coalesce(min(claimed_at), 0) FROM github_deliveries g WHERE g.status = 'pending' AND g.unit = d.unit
				AND g.image = d.image AND NOT approved)
		FROM github_deliveries d WHERE status = 'pending' AND next_attempt_at <= ?
			AND unit NOT IN (SELECT unit FROM github_deliveries WHERE status IN ('dispatching', 'dispatched'))
		ORDER BY claimed_at, rowid LIMIT 1`, now.UnixMilli()).
		Scan(&qt.delivery, &qt.unit, &qt.image, &qt.event, &qt.path, &qt.attempts, &claimedMS, &newestMS, &unapprovedMS)
	if errors.Is(err, sql.ErrNoRows) {
		var due int
		var first sql.NullInt64
		err = l.db.QueryRowContext(ctx, `SELECT total(next_attempt_at <= ?), min(next_attempt_at) FROM github_deliveries
			WHERE status = 'pending'`, now.UnixMilli()).Scan(&due, &first)
		switch wake = now.Add(dispatchIdle); {
		case due > 0: // behind a running task
			wake = now.Add(dispatchPoll)
		case first.Valid:
			wake = time.UnixMilli(min(first.Int64, wake.UnixMilli()))
		}
		return qt, false, wake, err
	}
	if err != nil {
		return qt, false, now.Add(dispatchPoll), err
	}
	qt.claimed, qt.newest = time.UnixMilli(claimedMS), time.UnixMilli(newestMS)
	if unapprovedMS > 0 {
		qt.unapproved = time.UnixMilli(unapprovedMS)
	}
	var evs []event
	h := policy(qt)
	err = l.write(ctx, func(tx *sql.Tx) error {
		if h.step != "" {
			return l.holdClaims(ctx, tx, qt, h, now)
		}
		if err := takeClaims(ctx, tx, &qt, now); err != nil {
			return err
		}
		evs = rows(qt)
		return l.insertEvents(ctx, tx, evs[:min(len(evs), rowsPerWrite)])
	})
	if err != nil || h.step != "" {
		return qt, false, time.Time{}, err
	}
	// The other covered claims' rows follow in small transactions, still before the task starts.
	for evs = evs[min(len(evs), rowsPerWrite):]; len(evs) > 0; evs = evs[min(len(evs), rowsPerWrite):] {
		l.Write(ctx, evs[:min(len(evs), rowsPerWrite)]...)
	}
	return qt, true, time.Time{}, nil
}

// holdClaims applies h to qt's pending claims, with a row for each that enters a wait or ends.
func (l *eventLog) holdClaims(ctx context.Context, tx *sql.Tx, qt queuedTask, h hold, now time.Time) error {
	group, args := `status = 'pending' AND unit = ? AND image = ?`, []any{qt.unit, qt.image}
	set, code, also := `step = ?, next_attempt_at = ?`, 202, ` AND step IS NOT ?`
	setArgs, alsoArgs := []any{h.step, h.until.UnixMilli()}, []any{h.step}
	switch h.step {
	case "expired":
		set, code, also, setArgs, alsoArgs = `status = 'done', step = 'expired'`, 410, ` AND NOT approved AND claimed_at <= ?`, nil, []any{h.until.UnixMilli()}
	case "policy-invalid":
		set, code, setArgs, also, alsoArgs = `status = 'failed', step = 'policy-invalid', error = ?`, 422, []any{h.errText}, "", nil
	}
	ids, err := updateClaims(ctx, tx, set, group+also, append(setArgs, slices.Concat([]any{now.Unix()}, args, alsoArgs)...))
	if err == nil && code == 202 {
		_, err = tx.ExecContext(ctx, `UPDATE github_deliveries SET next_attempt_at = ? WHERE `+group, append([]any{h.until.UnixMilli()}, args...)...)
	}
	if err == nil && h.step == waitApproval && len(ids) > 0 {
		err = notifyTx(ctx, tx, notice{Kind: "approval", Time: now, Delivery: ids[0], Unit: qt.unit, Image: qt.image,
			Reason: "approve or reject it on the status page or with webhook-auto-update approve|reject " + ids[0]})
	}
	evs, id := make([]event, 0, len(ids)), newRequestID()
	for _, c := range ids {
		meta := map[string]any{"delivery": c, "unit": qt.unit, "image": qt.image, "reason": h.step}
		if code == 202 {
			meta["wait_until"] = h.until.UTC().Format(time.RFC3339)
		} else if h.errText != "" {
			meta["error"] = h.errText
		}
		evs = append(evs, event{RequestID: id, TS: now, Method: "QUEUE", Path: qt.path, Status: code, Action: "github-dispatch", Meta: meta})
	}
	if err != nil {
		return err
	}
	return l.insertEvents(ctx, tx, evs)
}

// updateClaims sets set where where holds, returning the delivery ids; args: set's, updated_at, where's.
func updateClaims(ctx context.Context, tx *sql.Tx, set, where string, args []any) ([]string, error) {
	return collect(ctx, tx, `UPDATE github_deliveries SET `+set+`, updated_at = ? WHERE `+where+` RETURNING delivery_id`, args,
		func(id *string) []any { return []any{id} })
}

// decideClaim approves or rejects id's claims awaiting approval, or retries it when it ended, with a copy of
// ev for each claim changed; 0: it was in no state for that decision.
func (l *eventLog) decideClaim(ctx context.Context, id, decision string, ev event) (n int, err error) {
	awaiting := `status = 'pending' AND step = 'awaiting-approval' AND (unit, image) IN
		(SELECT unit, image FROM github_deliveries WHERE delivery_id = ? AND status = 'pending' AND step = 'awaiting-approval')`
	set, where := map[string]string{"approve": `approved = 1, step = 'approved', next_attempt_at = 0`,
		"reject": `status = 'done', step = 'rejected', error = ?`}[decision], awaiting
	args := []any{ev.Meta["reason"], ev.TS.Unix(), id}
	switch decision {
	case "approve":
		args = args[1:]
	case "retry":
		set, where = `status = 'pending', step = '', attempts = 0, next_attempt_at = 0, covered_by = NULL, task_unit = NULL,
			error = NULL, claimed_at = `+strconv.FormatInt(ev.TS.UnixMilli(), 10), `delivery_id = ? AND status IN ('done', 'failed')`
		args = args[1:]
	}
	err = l.write(ctx, func(tx *sql.Tx) error {
		ids, err := updateClaims(ctx, tx, set, where, args)
		evs := make([]event, len(ids))
		for i, c := range ids {
			evs[i], evs[i].Meta = ev, maps.Clone(ev.Meta)
			evs[i].Meta["delivery"], n = c, len(ids)
		}
		if err != nil {
			return err
		}
		return l.insertEvents(ctx, tx, evs)
	})
	return n, err
}

// takeClaims marks qt's pending claims of its unit and image dispatching and fills covered.
func takeClaims(ctx context.Context, tx *sql.Tx, qt *queuedTask, now time.Time) error {
	type taken struct {
		id, digest string
		at         int64
	}
	cs, err := collect(ctx, tx, `UPDATE github_deliveries
		SET status = 'dispatching', covered_by = ?, task_unit = ?, updated_at = ?, step = ''
		WHERE status = 'pending' AND unit = ? AND image = ? RETURNING delivery_id, digest, claimed_at`,
		[]any{qt.delivery, taskUnitName(qt.delivery), now.Unix(), qt.unit, qt.image},
		func(c *taken) []any { return []any{&c.id, &c.digest, &c.at} })
	var newest int64 = -1
	for _, c := range cs {
		if c.id == qt.delivery {
			qt.covered = append([]string{c.id}, qt.covered...)
		} else {
			qt.covered = append(qt.covered, c.id)
		}
		if c.at > newest && c.digest != "" {
			qt.digest, newest = c.digest, c.at
		}
	}
	if err != nil || (len(qt.covered) > 0 && qt.covered[0] == qt.delivery) {
		return err
	}
	return fmt.Errorf("claim %s is no longer pending", qt.delivery)
}

// settleTask moves a task unit's claims to status (pending: retry at retryAt) with errText and evs; a
// dispatch given up, or a task that died before its last step, is an outcome to notify.
func (l *eventLog) settleTask(ctx context.Context, taskUnit string, status claimStatus, errText string, retryAt time.Time, evs []event) error {
	return l.write(ctx, func(tx *sql.Tx) error {
		var err error
		now := time.Now().Unix()
		if status == claimPending {
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
		if err := l.insertEvents(ctx, tx, evs); err != nil {
			return err
		}
		kind, meta, step := "", map[string]any{"error": errText}, ""
		if len(evs) > 0 {
			meta = evs[0].Meta
		}
		tx.QueryRowContext(ctx, `SELECT step FROM github_deliveries WHERE task_unit = ?`, taskUnit).Scan(&step)
		if _, ended := stepClasses[step]; status == claimFailed {
			kind = "dispatch-failed"
		} else if status == claimDone && errText != "" && !ended {
			kind = "failed"
		}
		return outcomeNotice(ctx, tx, taskUnit, kind, time.Now(), meta)
	})
}

// taskStep writes a task's row and records its step (and error) on the claims it runs.
func (l *eventLog) taskStep(ctx context.Context, taskUnit, step, errText string, ev event) error {
	err := l.write(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `UPDATE github_deliveries SET step = ?, error = coalesce(nullif(?, ''), error),
			updated_at = ? WHERE task_unit = ? AND status IN ('dispatching', 'dispatched')`,
			step, errText, ev.TS.Unix(), taskUnit); err != nil {
			return err
		}
		if err := l.insertEvents(ctx, tx, []event{ev}); err != nil {
			return err
		}
		return outcomeNotice(ctx, tx, taskUnit, stepNotice(step), ev.TS, ev.Meta)
	})
	if err != nil {
		l.spill([]event{ev}, err)
	}
	return err
}

// rejectedDigest is the delivery and end of the newest finished redeploy of digest on unit when the gate
// rejected it (rolled back, or its rollback failed), else "": no caller redeploys a rejected digest.
func (l *eventLog) rejectedDigest(ctx context.Context, unit, digest string) (delivery string, at time.Time, err error) {
	var step string
	var ts int64
	err = l.db.QueryRowContext(ctx, `SELECT delivery_id, updated_at, step FROM github_deliveries
		WHERE unit = ? AND digest = ? AND step IN ('completed', 'up-to-date', 'rolled-back', 'rollback-failed', 'rollback-impossible')
		ORDER BY claimed_at DESC LIMIT 1`, unit, digest).Scan(&delivery, &ts, &step)
	if errors.Is(err, sql.ErrNoRows) || err == nil && stepClasses[step] == "ok" {
		return "", time.Time{}, nil
	}
	return delivery, time.Unix(ts, 0), err
}

// claimedTask is a task unit whose claims are in one status, with the delivery whose task it is.
type claimedTask struct{ taskUnit, delivery, unit string }

func (l *eventLog) tasksIn(ctx context.Context, status claimStatus, before time.Time) ([]claimedTask, error) {
	return collect(ctx, l.db, `SELECT DISTINCT task_unit, coalesce(covered_by, ''), unit FROM github_deliveries
		WHERE status = ? AND updated_at < ? AND task_unit IS NOT NULL`, []any{status, before.Unix()},
		func(c *claimedTask) []any { return []any{&c.taskUnit, &c.delivery, &c.unit} })
}

const taskRanSQL = `SELECT count(*) FROM (SELECT 1 FROM event_log WHERE ts >= ?
	AND +action = 'github-task' AND json_extract(meta, '$.delivery') = ? LIMIT 1)`

func (l *eventLog) taskRan(ctx context.Context, delivery string, since time.Time) (bool, error) {
	var n int
	err := l.db.QueryRowContext(ctx, taskRanSQL, since.Unix(), delivery).Scan(&n)
	return n > 0, err
}

// queueStats is the queue depth of /metrics and the status page: pending claims, the oldest's arrival.
func queueStats(ctx context.Context, db *sql.DB) (pending int, oldest time.Time, err error) {
	var first sql.NullInt64
	err = db.QueryRowContext(ctx, `SELECT count(*), min(claimed_at) FROM github_deliveries WHERE status = 'pending'`).
		Scan(&pending, &first)
	if first.Valid {
		oldest = time.UnixMilli(first.Int64)
	}
	return pending, oldest, err
}

// collect reads a query's rows into Ts, each scanned into the fields dest names.
func collect[T any](ctx context.Context, db querier, query string, args []any, dest func(*T) []any) ([]T, error) {
	var out []T
	err := scan(ctx, db, query, args, func(rows *sql.Rows) error {
		var v T
		err := rows.Scan(dest(&v)...)
		out = append(out, v)
		return err
	})
	return out, err
}

func scan(ctx context.Context, db querier, query string, args []any, each func(*sql.Rows) error) error {
	rows, err := db.QueryContext(ctx, query, args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		if err := each(rows); err != nil {
			return err
		}
	}
	return rows.Err()
}

// The outcome model, which every reader shows: a claim's outcome follows from its status and its
// task's newest step; a delivery that was never claimed is ignored (2xx) or refused (failed).

// outcome is a class (ok, rolled-back, failed, running, skipped, ignored) and words for it.
type outcome struct{ Class, Label string }

var outcomeClasses = []string{"ok", "rolled-back", "failed", "running", "skipped", "ignored"}

// stepClasses classifies the steps that end a task.
var stepClasses = map[string]string{
	"completed": "ok", "up-to-date": "ok", "rolled-back": "rolled-back", "rate-limited": "skipped",
	"digest-rejected": "skipped", "pull-failed": "failed", "rollback-failed": "failed", "rollback-impossible": "failed", "lock-failed": "failed",
	"limit-failed": "failed", "invalid": "failed", "image-mismatch": "failed", "image-unknown": "failed",
	"policy-invalid": "failed", "rejected": "skipped", "expired": "skipped",
}

func claimOutcome(status claimStatus, step string) outcome {
	class, ended := stepClasses[step]
	switch {
	case status == claimFailed && step == "policy-invalid":
		return outcome{"failed", stepLabel(step)}
	case status == claimFailed:
		return outcome{"failed", "dispatch failed"}
	case ended && (status == claimDone || status == claimDispatched):
		return outcome{class, stepLabel(step)}
	case status == claimDone:
		return outcome{"failed", "ended without a last step" + strings.TrimPrefix(" after "+stepLabel(step), " after no task yet")}
	case step != "":
		return outcome{"running", stepLabel(step)}
	case status == claimPending:
		return outcome{"running", "queued"}
	}
	return outcome{"running", string(status)}
}

func requestOutcome(status int, reason string) outcome {
	return outcome{map[bool]string{true: "failed", false: "ignored"}[status >= 400], strings.ReplaceAll(reason, "-", " ")}
}

func stepLabel(step string) string {
	return cmp.Or(map[string]string{"completed": "restarted, healthy", "": "no task yet"}[step], strings.ReplaceAll(step, "-", " "))
}

// eventFilter selects event_log rows for the events command and /api/events; zero values select
// everything. A unit or delivery is matched in meta without an index, reading the whole log.
type eventFilter struct {
	limit                  int
	action, unit, delivery string
	since                  time.Time
	status                 int
	beforeID               int64 // keyset paging: only rows with a smaller id
	afterID                int64 // --follow: only rows with a larger id, oldest first; -1 every row
}

const maxEventsLimit = 500

// parseEventFilter reads query parameters or flags; the first invalid one, in order, is the error.
func parseEventFilter(get func(string) string, now time.Time) (eventFilter, error) {
	f := eventFilter{limit: 50, action: get("action"), delivery: get("delivery")}
	var err error
	num := func(name string, lo, hi int64, want string) int64 {
		v := get(name)
		n, perr := strconv.ParseInt(v, 10, 64)
		if v != "" && err == nil && (perr != nil || n < lo || n > hi) {
			err = fmt.Errorf("invalid %s %q%s", name, v, want)
		}
		return n
	}
	if n := num("limit", 1, math.MaxInt64, ": want a whole number greater than zero"); n > 0 {
		f.limit = int(min(n, maxEventsLimit))
	}
	if v := get("unit"); v != "" && err == nil {
		f.unit, err = resolveUnit(v)
	}
	if v := get("since"); v != "" && err == nil {
		if d, perr := time.ParseDuration(v); perr == nil && d > 0 {
			f.since = now.Add(-d)
		} else if t, perr := time.Parse(time.RFC3339, v); perr == nil {
			f.since = t
		} else {
			err = fmt.Errorf("invalid since %q: want a duration such as 90m or an RFC 3339 time", v)
		}
	}
	f.status = int(num("status", 100, 599, ": want an HTTP status code"))
	f.beforeID = num("before_id", 1, math.MaxInt64, "")
	return f, err
}

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

const eventColumnsSQL = `SELECT id, request_id, ts, method, coalesce(path, ''), status, action, duration_ms, meta FROM event_log`

// queryEvents returns matching rows, newest first (oldest first with afterID).
func queryEvents(ctx context.Context, db *sql.DB, f eventFilter) ([]storedEvent, error) {
	var where []string
	var args []any
	add := func(on bool, cond string, v any) {
		if on {
			where, args = append(where, cond), append(args, v)
		}
	}
	add(f.action != "", "action = ?", f.action)
	add(f.unit != "", "json_extract(meta, '$.unit') = ?", f.unit)
	add(f.delivery != "", "json_extract(meta, '$.delivery') = ?", f.delivery)
	add(!f.since.IsZero(), "ts >= ?", f.since.Unix())
	add(f.status != 0, "status = ?", f.status)
	add(f.beforeID > 0, "id < ?", f.beforeID)
	add(f.afterID != 0, "id > ?", max(f.afterID, 0))
	q := eventColumnsSQL
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	q += " ORDER BY id" + map[bool]string{true: " ASC", false: " DESC"}[f.afterID != 0]
	if f.limit > 0 {
		q += " LIMIT " + strconv.Itoa(f.limit)
	}
	return readEvents(ctx, db, q, args...)
}

// readEvents reads rows of a query of eventColumnsSQL, redacting meta again for rows older versions wrote.
func readEvents(ctx context.Context, db *sql.DB, query string, args ...any) ([]storedEvent, error) {
	out := []storedEvent{}
	err := scan(ctx, db, query, args, func(rows *sql.Rows) error {
		var e storedEvent
		var meta string
		if err := rows.Scan(&e.ID, &e.RequestID, &e.TS, &e.Method, &e.Path, &e.Status, &e.Action, &e.DurationMS, &meta); err != nil {
			return err
		}
		if json.Unmarshal([]byte(meta), &e.Meta) != nil {
			e.Meta = map[string]any{"raw": meta}
		}
		for k, v := range e.Meta {
			if s, ok := v.(string); ok && k == "query" {
				e.Meta[k] = redactQuery(s)
			} else if secretParams[strings.ToLower(k)] {
				e.Meta[k] = "REDACTED"
			}
		}
		e.Time = time.Unix(e.TS, 0).UTC().Format(time.RFC3339)
		out = append(out, e)
		return nil
	})
	return out, err
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

// countsBy counts rows by the first column; task steps are counted from rows, so they survive run-task.
// Queries of countsBy: the task steps recorded, and the claims waiting for a policy.
const (
	stepCountsSQL = `SELECT coalesce(json_extract(meta, '$.step'), ''), count(*) FROM event_log WHERE action = 'github-task' GROUP BY 1`
	waitingSQL    = `SELECT step, count(*) FROM github_deliveries WHERE status = 'pending'
		AND step IN ('cooldown', 'window', 'awaiting-approval') GROUP BY 1`
)

func countsBy(ctx context.Context, db *sql.DB, query string) (map[string]int64, error) {
	out := map[string]int64{}
	err := scan(ctx, db, query, nil, func(rows *sql.Rows) error {
		var step string
		var n int64
		err := rows.Scan(&step, &n)
		out[step] = n
		return err
	})
	return out, err
}

// stepDurations returns a meta value (milliseconds) of every github-task row of a step.
func stepDurations(ctx context.Context, db *sql.DB, step, key string) ([]float64, error) {
	return collect(ctx, db, `SELECT json_extract(meta, '$.'||?) FROM event_log WHERE action = 'github-task'
		AND json_extract(meta, '$.step') = ? AND json_extract(meta, '$.'||?) IS NOT NULL`, []any{key, step, key},
		func(ms *float64) []any { return []any{ms} })
}

// outcomeCounts counts the tasks that ended (their first claims) by outcome class.
func outcomeCounts(ctx context.Context, db *sql.DB) (map[string]int64, error) {
	out := map[string]int64{}
	err := scan(ctx, db, `SELECT status, step, count(*) FROM github_deliveries
		WHERE status IN ('done', 'failed') AND coalesce(covered_by, delivery_id) = delivery_id GROUP BY 1, 2`, nil,
		func(rows *sql.Rows) error {
			var status, step string
			var n int64
			err := rows.Scan(&status, &step, &n)
			out[claimOutcome(claimStatus(status), step).Class] += n
			return err
		})
	return out, err
}

// Notifications. notifyTx queues a message with the row it tells of; runNotifier sends it to each
// WEBHOOK_NOTIFY_URLS target until 2xx, backing off until the horizon, with a notify row per attempt.

// notice is one message, and the JSON body of a generic target's request.
type notice struct {
	ID          string    `json:"id"`
	Kind        string    `json:"kind"`
	Time        time.Time `json:"time"`
	Delivery    string    `json:"delivery,omitempty"`
	Unit        string    `json:"unit,omitempty"`
	Image       string    `json:"image,omitempty"`
	Before      string    `json:"image_before,omitempty"`
	After       string    `json:"image_after,omitempty"`
	Failed      string    `json:"image_failed,omitempty"`
	Digest      string    `json:"digest,omitempty"`
	Reason      string    `json:"reason,omitempty"`
	SincePushMS int64     `json:"push_to_outcome_ms,omitempty"`
	Link        string    `json:"link,omitempty"`
	Title       string    `json:"title"`
	Message     string    `json:"message"`
}

// noticeKinds are the kinds of message and their words; WEBHOOK_NOTIFY_ON picks among them.
var noticeKinds = map[string]string{"healthy": "redeployed, healthy", "rolled-back": "rolled back", "failed": "failed",
	"rollback-failed": "rollback failed", "dispatch-failed": "dispatch given up", "approval": "awaiting approval", "update": "update available", "test": "test message"}

// notifyTx queues n in tx, so it is sent if and only if tx commits: the one way to notify.
func notifyTx(ctx context.Context, tx *sql.Tx, n notice) error {
	n.ID, n.Time = cmp.Or(n.ID, newRequestID()), cmp.Or(n.Time, time.Now())
	_, err := tx.ExecContext(ctx, `INSERT INTO notify_outbox (kind, delivery_id, fields, created_at) VALUES (?, ?, ?, ?)`,
		n.Kind, n.Delivery, marshalJSON(n), n.Time.UnixMilli())
	return err
}

// stepNotice is the kind of message a task's step ends it with, "" none.
func stepNotice(step string) string {
	kind := map[string]string{"completed": "healthy", "rolled-back": "rolled-back", "rollback-failed": "rollback-failed",
		"rollback-impossible": "rollback-failed"}[step]
	return cmp.Or(kind, map[bool]string{true: "failed"}[stepClasses[step] == "failed"])
}

// outcomeNotice queues the one message of a task's outcome (kind "" none), from its claims and meta.
func outcomeNotice(ctx context.Context, tx *sql.Tx, taskUnit, kind string, at time.Time, meta map[string]any) error {
	var leader, unit, image, digest sql.NullString
	var sincePush int64
	if err := tx.QueryRowContext(ctx, `SELECT coalesce(covered_by, delivery_id), unit, image, max(nullif(digest, '')), coalesce(? - min(claimed_at), 0)
		FROM github_deliveries WHERE task_unit = ?`, at.UnixMilli(), taskUnit).Scan(&leader, &unit, &image, &digest, &sincePush); err != nil || kind == "" {
		return err
	}
	m := func(k string) string { return metaString(meta, k) }
	n := notice{Kind: kind, Time: at, Delivery: cmp.Or(leader.String, m("delivery")), Unit: cmp.Or(unit.String, m("unit")),
		Image: cmp.Or(image.String, m("image")), Before: m("previous_image_id"), After: m("image_id"), Failed: m("failed_image_id"),
		Digest: cmp.Or(digest.String, m("pulled_digest")), Reason: cmp.Or(m("error"), m("reason")), SincePushMS: sincePush}
	return notifyTx(ctx, tx, n)
}

// render fills in the link to the story (with WEBHOOK_PUBLIC_URL), the title and the text.
func (n *notice) render(publicURL string) {
	if publicURL != "" && n.Delivery != "" {
		n.Link = strings.TrimRight(publicURL, "/") + "/status/deliveries/" + url.PathEscape(n.Delivery)
	}
	n.Title = cmp.Or(n.Unit, "webhook-auto-update") + ": " + noticeKinds[n.Kind]
	lines, since := "", map[bool]string{true: (time.Duration(n.SincePushMS) * time.Millisecond).Round(time.Second).String()}[n.SincePushMS > 0]
	for _, kv := range [][2]string{{"outcome", noticeKinds[n.Kind]}, {"reason", n.Reason}, {"unit", n.Unit}, {"image", n.Image},
		{"before", n.Before}, {"after", n.After}, {"rejected", n.Failed}, {"digest", n.Digest}, {"push to outcome", since},
		{"delivery", n.Delivery}, {"story", n.Link}} {
		if kv[1] != "" {
			lines += kv[0] + ": " + kv[1] + "\n"
		}
	}
	n.Message = strings.TrimSuffix(lines, "\n")
}

// notifySettings are WEBHOOK_NOTIFY_*: the targets, the kinds they get and how long to retry.
type notifySettings struct {
	targets                                     []notifyTarget
	on                                          map[string]bool
	secret, publicURL                           string
	timeout, backoff, maxBackoff, horizon, poll time.Duration
}

// notifyTarget is one entry of WEBHOOK_NOTIFY_URLS, name its URL without secrets: an HTTP POST
// (body writes the request's body and the headers that depend on the message) or a mail.
type notifyTarget struct {
	scheme, name, endpoint string
	header                 http.Header
	body                   func(n notice, h http.Header) string
	mail                   *mailTarget
}

type mailTarget struct {
	addr, host, user, pass, from, subject, tls string // tls: implicit, starttls or none
	to                                         []string
}

var (
	reNotifyScheme = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9+.-]*://`)
	reSlackToken   = regexp.MustCompile(`^(?:(xox.|hook)[-:]|:?)([A-Z0-9]{9,})([-/,])([A-Z0-9]{9,})([-/,])([A-Za-z0-9]{24,})$`)
	reGotifyToken  = regexp.MustCompile(`^A[A-Za-z0-9._-]{14}$`)
	ntfyPriority   = map[string]string{"1": "1", "2": "2", "3": "3", "4": "4", "5": "5", "min": "1", "low": "2", "default": "3", "high": "4", "max": "5", "urgent": "5"}
	shoutrrrBool   = map[string]string{"yes": "yes", "true": "yes", "1": "yes", "no": "no", "false": "no", "0": "no"} // shoutrrr's yes/no values
	// notifyOptions are the query options of each scheme, shoutrrr's alias after a |.
	notifyOptions = map[string][]string{"ntfy": {"title", "priority", "tags", "scheme"}, "gotify": {"title", "priority", "disabletls"},
		"slack": {"title"}, "discord": {"title"}, "smtp": {"subject|title", "from|fromaddress", "to|toaddresses", "usestarttls"},
		"generic": {"title", "disabletls"}, "generic+https": {"title", "disabletls"}, "generic+http": {"title", "disabletls"}}
)

// parseNotifyURL reads one URL in shoutrrr's format; errors never hold a secret. An unknown option is an
// error, except a generic target's own query (not template, contenttype, titlekey, messagekey, method, $key, @header).
func parseNotifyURL(raw string) (notifyTarget, error) {
	scheme, _, _ := strings.Cut(raw, "://")
	if !reNotifyScheme.MatchString(raw) {
		scheme = "?" // no scheme: what stands before a "://" may be a secret
	}
	t := notifyTarget{scheme: strings.ToLower(scheme), header: http.Header{"Content-Type": {"application/json"}}}
	t.name = oneLine(t.scheme) + "://…"
	u, err := url.Parse(raw)
	options, known := notifyOptions[t.scheme]
	wrong := func(want string) (notifyTarget, error) { return notifyTarget{}, fmt.Errorf("%s: %s", t.name, want) }
	if err != nil || scheme == "?" {
		return wrong("not a URL (want scheme://…)")
	} else if !known {
		return wrong("unknown scheme (want ntfy, gotify, slack, discord, smtp or generic)")
	}
	opt, pass, q := map[string]string{}, url.Values{}, u.Query()
	for _, k := range slices.Sorted(maps.Keys(q)) {
		lk := strings.ToLower(k)
		i := slices.IndexFunc(options, func(o string) bool { name, alias, _ := strings.Cut(o, "|"); return lk == name || lk == alias })
		switch {
		case i >= 0 && strings.HasSuffix(lk, "tls") && shoutrrrBool[strings.ToLower(q[k][0])] == "":
			return wrong(lk + " must be yes or no") // disabletls, usestarttls
		case i >= 0:
			opt[strings.Split(options[i], "|")[0]] = q[k][0]
		case strings.HasPrefix(t.scheme, "generic") && strings.IndexAny(k, "$@") != 0 &&
			!slices.Contains([]string{"template", "contenttype", "titlekey", "messagekey", "method"}, lk):
			pass[k] = q[k]
		default:
			return wrong("unsupported option " + lk)
		}
	}
	title := opt["title"]
	yes := func(key, def string) bool { return shoutrrrBool[strings.ToLower(cmp.Or(opt[key], def))] == "yes" }
	plain := func(key, def string) string { return map[bool]string{true: "http", false: "https"}[yes(key, def)] }
	switch t.scheme {
	case "ntfy":
		topic, sch, prio := strings.Trim(u.Path, "/"), cmp.Or(opt["scheme"], "https"), ntfyPriority[strings.ToLower(opt["priority"])]
		if u.Hostname() == "" || topic == "" || sch != "https" && sch != "http" {
			return wrong("want ntfy://[user:pass@]host[:port]/topic[?scheme=http]")
		}
		if t.name = "ntfy://" + u.Host + "/" + topic; prio == "" && opt["priority"] != "" {
			return wrong("priority must be 1 to 5 or min, low, default, high, max, urgent")
		}
		dest := url.URL{Scheme: sch, User: u.User, Host: u.Host, Path: "/" + topic} // net/http sends the user as Basic auth
		t.endpoint, t.header = dest.String(), http.Header{}
		t.body = func(n notice, h http.Header) string {
			for k, v := range map[string]string{"Title": cmp.Or(title, n.Title), "Priority": prio, "Tags": opt["tags"], "Click": n.Link} {
				if v != "" {
					h.Set(k, v)
				}
			}
			return n.Message
		}
	case "gotify":
		token := strings.Trim(u.Path, "/")
		prio, err := strconv.Atoi(cmp.Or(opt["priority"], "0"))
		if u.Hostname() == "" || !reGotifyToken.MatchString(token) {
			return wrong("want gotify://host[:port]/TOKEN with an application token (15 characters, starting with A)")
		}
		if t.name = "gotify://" + u.Host + "/…"; err != nil {
			return wrong("priority must be a number")
		}
		t.endpoint = plain("disabletls", "no") + "://" + u.Host + "/message"
		t.header.Set("X-Gotify-Key", token)
		t.body = func(n notice, _ http.Header) string {
			return marshalJSON(map[string]any{"title": cmp.Or(title, n.Title), "message": n.Message, "priority": prio})
		}
	case "slack": // the token as hook:TOKEN@webhook, or as the host and path (a user there, shoutrrr's botname, is refused)
		m := reSlackToken.FindStringSubmatch(cmp.Or(u.User.String(), u.Host+u.Path))
		if m == nil || m[1] != "" && m[1] != "hook" || m[3] != m[5] {
			return wrong("want an incoming webhook, slack://hook:TOKEN@webhook or slack://T…/B…/X… (bot tokens and botname are not supported)")
		}
		t.name, t.endpoint = "slack://"+m[2]+"/…", "https://hooks.slack.com/services/"+m[2]+"/"+m[4]+"/"+m[6]
		t.body = func(n notice, _ http.Header) string {
			return marshalJSON(map[string]any{"text": cmp.Or(title, n.Title), "attachments": []map[string]string{{"text": n.Message}}})
		}
	case "discord":
		if u.Hostname() == "" || u.User.Username() == "" || strings.Trim(u.Path, "/") != "" {
			return wrong("want discord://TOKEN@WEBHOOKID")
		}
		t.name, t.endpoint = "discord://…@"+u.Host, "https://discord.com/api/webhooks/"+u.Host+"/"+u.User.Username()
		t.body = func(n notice, _ http.Header) string {
			return marshalJSON(map[string]any{"embeds": []any{map[string]any{"title": cmp.Or(title, n.Title), "description": n.Message,
				"url": n.Link, "timestamp": n.Time.UTC().Format(time.RFC3339)}}})
		}
	case "smtp": // STARTTLS unless usestarttls=no; implicit TLS on port 465
		from, err := mail.ParseAddress(opt["from"])
		to, errTo := mail.ParseAddressList(opt["to"])
		if u.Hostname() == "" || err != nil || errTo != nil {
			return wrong("want smtp://[user:pass@]host:port/?from=ADDRESS&to=ADDRESS[,ADDRESS]")
		}
		pass, _ := u.User.Password()
		m := &mailTarget{addr: net.JoinHostPort(u.Hostname(), cmp.Or(u.Port(), "25")), host: u.Hostname(), user: u.User.Username(), pass: pass,
			from: from.Address, subject: opt["subject"], tls: cmp.Or(map[bool]string{true: "implicit"}[u.Port() == "465"],
				map[bool]string{true: "starttls", false: "none"}[yes("usestarttls", "yes")])}
		for _, a := range to {
			m.to = append(m.to, a.Address)
		}
		t.name, t.mail = "smtp://"+m.addr+"/?to="+strings.Join(m.to, ","), m
	default: // generic, generic+https, generic+http
		if u.Hostname() == "" {
			return wrong("want generic+https://host[:port]/path")
		}
		dest := url.URL{Scheme: plain("disabletls", strconv.FormatBool(t.scheme == "generic+http")), User: u.User, Host: u.Host, Path: u.Path, RawQuery: pass.Encode()}
		t.name, t.endpoint = "generic+"+dest.Scheme+"://"+u.Host+"/…", dest.String()
		t.body = func(n notice, h http.Header) string {
			n.Title = cmp.Or(title, n.Title)
			h.Set("X-Webhook-Id", n.ID)
			h.Set("X-Webhook-Timestamp", strconv.FormatInt(n.Time.Unix(), 10))
			return marshalJSON(n)
		}
	}
	return t, nil
}

// request is t's request for n; a generic target's body is signed as GitHub signs its deliveries.
func (t notifyTarget) request(n notice, secret string) (*http.Request, error) {
	h := t.header.Clone()
	body := t.body(n, h)
	if strings.HasPrefix(t.scheme, "generic") {
		h.Set("X-Signature-256", "sha256="+hex.EncodeToString(hmacSHA256(secret, []byte(body))))
	}
	req, err := http.NewRequest("POST", t.endpoint, strings.NewReader(body))
	if err == nil {
		req.Header = h
	}
	return req, err
}

// notifyClient follows no redirect: a token in a header must not travel to another host.
var notifyClient = &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

// send delivers n within timeout; 2xx is success. Errors name the target, never its URL.
func (t notifyTarget) send(ctx context.Context, n notice, secret string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if t.mail != nil {
		return t.mail.send(ctx, n)
	}
	req, err := t.request(n, secret)
	var resp *http.Response
	if err == nil {
		resp, err = notifyClient.Do(req.WithContext(ctx))
	}
	if ue := (*url.Error)(nil); errors.As(err, &ue) {
		err = ue.Err // its text is the whole URL, secrets included
	}
	if err != nil {
		return fmt.Errorf("%s: %w", t.name, err)
	}
	defer resp.Body.Close()
	text, _ := io.ReadAll(io.LimitReader(resp.Body, 200))
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s answered %s: %s", t.name, resp.Status, oneLine(strings.TrimSpace(string(text))))
	}
	return nil
}

// message is the mail of n: plain text, quoted-printable, its Message-ID the notice's id.
func (m *mailTarget) message(n notice) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "From: %s\r\nTo: %s\r\nSubject: %s\r\nDate: %s\r\nMessage-ID: <%s@webhook-auto-update>\r\nMIME-Version: 1.0\r\n"+
		"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n", m.from, strings.Join(m.to, ", "),
		mime.QEncoding.Encode("utf-8", cmp.Or(m.subject, n.Title)), n.Time.UTC().Format(time.RFC1123Z), n.ID)
	w := quotedprintable.NewWriter(&b)
	w.Write([]byte(strings.ReplaceAll(n.Message, "\n", "\r\n") + "\r\n"))
	w.Close()
	return b.Bytes()
}

// send speaks SMTP (net/smtp): STARTTLS unless the URL turned it off, so never plain text by accident.
func (m *mailTarget) send(ctx context.Context, n notice) error {
	conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", m.addr)
	var c *smtp.Client
	if err == nil {
		defer conn.Close()
		deadline, _ := ctx.Deadline()
		conn.SetDeadline(deadline)
		if m.tls == "implicit" {
			conn = tls.Client(conn, &tls.Config{ServerName: m.host})
		}
		c, err = smtp.NewClient(conn, m.host) // says EHLO localhost at its first command
	}
	if err == nil && m.tls == "starttls" {
		if ok, _ := c.Extension("STARTTLS"); !ok {
			err = errors.New("the server offers no STARTTLS (usestarttls=no sends in plain text)")
		} else {
			err = c.StartTLS(&tls.Config{ServerName: m.host})
		}
	}
	if err == nil && m.user != "" {
		err = c.Auth(smtp.PlainAuth("", m.user, m.pass, m.host))
	}
	if err == nil {
		err = c.Mail(m.from)
	}
	for i := 0; err == nil && i < len(m.to); i++ {
		err = c.Rcpt(m.to[i])
	}
	var w io.WriteCloser
	if err == nil {
		if w, err = c.Data(); err == nil {
			_, err = w.Write(m.message(n))
			err = cmp.Or(err, w.Close(), c.Quit())
		}
	}
	if err != nil {
		return fmt.Errorf("smtp %s: %w", m.addr, err)
	}
	return nil
}

// targetState is one target's part of a message: failed (retrying), sent or given-up.
type targetState struct {
	State, Error string
	Attempts     int
}

// outboxRow is a notify_outbox row that is due.
type outboxRow struct {
	id, created    int64
	fields, states string
	attempts       int
}

const noticesPerRound = 64

// runNotifier sends due messages, oldest first, until ctx ends; a target that failed is skipped for the round.
func (l *eventLog) runNotifier(ctx context.Context, ns *notifySettings) {
	for ctx.Err() == nil {
		due, err := collect(ctx, l.db, `SELECT id, created_at, fields, targets, attempts FROM notify_outbox
			WHERE state = 'pending' AND next_attempt_at <= ? ORDER BY id LIMIT ?`, []any{time.Now().UnixMilli(), noticesPerRound},
			func(r *outboxRow) []any { return []any{&r.id, &r.created, &r.fields, &r.states, &r.attempts} })
		if err != nil && ctx.Err() == nil {
			l.log.errorf("notifications: %v", err)
		}
		down := map[string]bool{}
		for _, r := range due {
			l.sendNotice(ctx, ns, r, down)
		}
		if len(due) < noticesPerRound {
			sleepContext(ctx, ns.poll)
		}
	}
}

// sendNotice sends r's message to each target that wants it and has not answered 2xx (past the
// horizon, a failure gives up), then records the attempts and the message's state in one transaction.
func (l *eventLog) sendNotice(ctx context.Context, ns *notifySettings, r outboxRow, down map[string]bool) {
	var n notice
	states, evs := map[string]targetState{}, []event(nil)
	json.Unmarshal([]byte(r.fields), &n) // unreadable: a kind nobody wants, deleted
	json.Unmarshal([]byte(r.states), &states)
	n.render(ns.publicURL)
	expired, state := time.Since(time.UnixMilli(r.created)) >= ns.horizon, "sent"
	for _, t := range ns.targets {
		st := states[t.name]
		if !ns.on[n.Kind] || st.State == "sent" {
			continue
		} else if down[t.name] && !expired {
			state = "pending"
			continue
		}
		start := time.Now()
		err := t.send(ctx, n, ns.secret, ns.timeout)
		if ctx.Err() != nil {
			return // shutting down: sent again after the restart
		}
		st, status := targetState{State: "sent", Attempts: st.Attempts + 1}, http.StatusOK
		if err != nil {
			st.State, st.Error, status, down[t.name] = map[bool]string{true: "given-up", false: "failed"}[expired], err.Error(), http.StatusBadGateway, true
			state = map[bool]string{true: "failed", false: "pending"}[expired && state != "pending"]
			l.log.warnf("notification %s of %s to %s: %s after attempt %d: %v", n.Kind, cmp.Or(n.Delivery, n.ID), t.name, st.State, st.Attempts, err)
		}
		states[t.name] = st
		meta := map[string]any{"kind": n.Kind, "target": t.name, "scheme": t.scheme, "result": st.State, "attempt": st.Attempts,
			"notice": n.ID, "delivery": n.Delivery, "unit": n.Unit}
		if st.Error != "" {
			meta["error"] = st.Error
		}
		evs = append(evs, event{RequestID: n.ID, TS: time.Now(), Method: "NOTIFY", Status: status, Action: "notify", Duration: time.Since(start), Meta: meta})
	}
	next, wctx := time.Now().Add(min(ns.backoff<<min(r.attempts, 20), ns.maxBackoff)), context.WithoutCancel(ctx)
	err := l.write(wctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(wctx, `UPDATE notify_outbox SET state = ?, targets = ?, attempts = attempts + 1,
			next_attempt_at = ? WHERE id = ?`, state, marshalJSON(states), next.UnixMilli(), r.id)
		if err == nil && len(states) == 0 && state == "sent" {
			_, err = tx.ExecContext(wctx, `DELETE FROM notify_outbox WHERE id = ?`, r.id) // nobody wanted it
		}
		return cmp.Or(err, l.insertEvents(wctx, tx, evs))
	})
	if err != nil {
		l.log.errorf("notifications: cannot record message %d (it may be sent again): %v", r.id, err)
	}
}

// notifyCounts counts the notify rows by scheme and result, for /metrics.
func notifyCounts(ctx context.Context, db *sql.DB) (map[[2]string]int64, error) {
	flat, err := countsBy(ctx, db, `SELECT json_extract(meta, '$.scheme') || ' ' || json_extract(meta, '$.result'), count(*)
		FROM event_log WHERE action = 'notify' GROUP BY 1`)
	out := map[[2]string]int64{}
	for k, n := range flat {
		scheme, result, _ := strings.Cut(k, " ")
		out[[2]string{scheme, result}] = n
	}
	return out, err
}

// noticeView is a story's message on the status page: its kind, state and each target's.
type noticeView struct {
	When, Kind, State, targets string
	created                    int64
	Targets                    map[string]targetState
}

func storyNotices(ctx context.Context, db *sql.DB, delivery string, loc *time.Location) ([]noticeView, error) {
	out, err := collect(ctx, db, `SELECT created_at, kind, state, targets FROM notify_outbox WHERE delivery_id = ? ORDER BY id`,
		[]any{delivery}, func(v *noticeView) []any { return []any{&v.created, &v.Kind, &v.State, &v.targets} })
	for i, v := range out {
		out[i].When = statusTime(v.created/1000, loc)
		err = cmp.Or(err, json.Unmarshal([]byte(v.targets), &out[i].Targets))
	}
	return out, err
}

const requestRowsSQL = `method NOT IN ('CLI', 'SCHEDULER', 'TASK', 'NOTIFY')` // not what ran on the operator's behalf

// deleteOlderThan deletes rows older than cutoff (only HTTP requests' rows, with requestsOnly).
func (l *eventLog) deleteOlderThan(ctx context.Context, cutoff time.Time, dryRun, requestsOnly bool) (int64, error) {
	where := `ts < ?`
	if requestsOnly {
		where += ` AND ` + requestRowsSQL
	}
	return l.deleteWhere(ctx, where, cutoff.Unix(), dryRun)
}

// deleteRequestsBeyond deletes the request rows older than the newest keep (WEBHOOK_REQUEST_ROWS_MAX).
func (l *eventLog) deleteRequestsBeyond(ctx context.Context, keep int, dryRun bool) (int64, error) {
	var edge int64 // 0: no more than keep
	if err := l.db.QueryRowContext(ctx, `SELECT coalesce((SELECT id FROM event_log WHERE `+requestRowsSQL+`
		ORDER BY id DESC LIMIT 1 OFFSET ?), 0)`, keep-1).Scan(&edge); err != nil {
		return 0, err
	}
	return l.deleteWhere(ctx, `id < ? AND `+requestRowsSQL, edge, dryRun)
}

// deleteWhere deletes in batches of 1000, each its own short transaction; a dry run only counts.
func (l *eventLog) deleteWhere(ctx context.Context, where string, arg int64, dryRun bool) (int64, error) {
	if dryRun {
		var n int64
		err := l.db.QueryRowContext(ctx, `SELECT count(*) FROM event_log WHERE `+where, arg).Scan(&n)
		return n, err
	}
	var total int64
	for {
		var n int64
		err := l.write(ctx, func(tx *sql.Tx) error {
			res, err := tx.ExecContext(ctx, `DELETE FROM event_log WHERE id IN
				(SELECT id FROM event_log WHERE `+where+` ORDER BY id LIMIT 1000)`, arg)
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

const usageEvents = `usage: webhook-auto-update events [--limit N] [--action A] [--unit U] [--delivery ID]
                                  [--since DURATION|RFC3339] [--status CODE] [--json] [--follow]

Prints event_log rows, newest first, as a table in local time (or JSON lines with --json).
--follow keeps printing new rows, oldest first, until interrupted. With --delivery, a last
line gives the queued delivery's outcome ("outcome: ok, restarted, healthy").
`

func cmdEvents(c *cli, args []string) int {
	vals := map[string]*string{}
	var asJSON, follow bool
	cfg, code := c.setupNoArgs("events", usageEvents, args, func(fs *flag.FlagSet, cfg *config) {
		for _, name := range []string{"limit", "action", "unit", "delivery", "since", "status"} {
			vals[name] = fs.String(name, "", "")
		}
		fs.BoolVar(&asJSON, "json", false, "")
		fs.BoolVar(&follow, "follow", false, "")
	})
	if code >= 0 {
		return code
	}
	f, err := parseEventFilter(func(k string) string { return *cmp.Or(vals[k], new(string)) }, time.Now())
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
	if f.delivery != "" && !asJSON {
		if cs, err := readClaims(ctx, db, time.Local, claimColumnsSQL+` WHERE delivery_id = ?`, f.delivery); err == nil && len(cs) > 0 {
			fmt.Fprintf(c.stdout, "outcome: %s, %s\n", cs[0].Outcome.Class, cs[0].Outcome.Label)
		}
	}
	if follow {
		followEvents(ctx, c, db, f, evs, asJSON)
	}
	return 0
}

func followEvents(ctx context.Context, c *cli, db *sql.DB, f eventFilter, evs []storedEvent, asJSON bool) {
	var last int64
	for _, e := range evs {
		last = max(last, e.ID)
	}
	if last == 0 {
		db.QueryRowContext(ctx, `SELECT coalesce(max(id), 0) FROM event_log`).Scan(&last)
	}
	for sleepContext(ctx, time.Second) == nil {
		f.afterID, f.beforeID, f.limit = last, 0, maxEventsLimit
		evs, err := queryEvents(ctx, db, f)
		if err != nil {
			if ctx.Err() == nil {
				c.log.warnf("read events: %v", err)
			}
			continue
		}
		printEvents(c.stdout, evs, asJSON, false)
		for _, e := range evs {
			last = max(last, e.ID)
		}
	}
}

func printEvents(w io.Writer, evs []storedEvent, asJSON, header bool) {
	if asJSON {
		for _, e := range evs {
			fmt.Fprintln(w, marshalJSON(e))
		}
		return
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	if header {
		fmt.Fprintln(tw, "TIME\tSTATUS\tACTION\tMETHOD\tPATH\tUNIT\tIMAGE\tDURATION\tDETAILS")
	}
	for _, e := range evs {
		str := func(k string) string { return cmp.Or(metaString(e.Meta, k), "-") }
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
		cells := []string{
			time.Unix(e.TS, 0).Local().Format("2006-01-02 15:04:05"), strconv.Itoa(e.Status), e.Action, e.Method,
			cmp.Or(e.Path, "-"), str("unit"), str("image"), (time.Duration(e.DurationMS) * time.Millisecond).String(),
			cmp.Or(strings.Join(details, " "), "-"),
		}
		for i, c := range cells {
			cells[i] = oneLine(c)
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	tw.Flush()
}

// oneLine makes a table cell one line of valid UTF-8 without control characters.
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

// metaString returns a meta value as text: strings as they are, anything else as JSON.
func metaString(m map[string]any, k string) string {
	if s, ok := m[k].(string); ok || m[k] == nil {
		return s
	}
	return marshalJSON(m[k])
}

// The status page's data. Everything but a story's rows comes from the claims table.

// claim is a github_deliveries row, classified; When is the page's time.
type claim struct {
	ID, Received, Updated, Until, ClaimedMS                 int64 // Until: a wait's end, unix ms
	Delivery, Unit, Image, TaskUnit, CoveredBy, Error, Step string
	Status                                                  claimStatus
	Outcome                                                 outcome
	When                                                    string
}

const claimColumnsSQL = `SELECT rowid, delivery_id, unit, image, coalesce(task_unit, ''), coalesce(covered_by, ''),
	coalesce(error, ''), step, status, received_at, updated_at, next_attempt_at, claimed_at FROM github_deliveries`

func readClaims(ctx context.Context, db *sql.DB, loc *time.Location, query string, args ...any) ([]claim, error) {
	cs, err := collect(ctx, db, query, args, func(c *claim) []any {
		return []any{&c.ID, &c.Delivery, &c.Unit, &c.Image, &c.TaskUnit, &c.CoveredBy, &c.Error, &c.Step,
			&c.Status, &c.Received, &c.Updated, &c.Until, &c.ClaimedMS}
	})
	for i, c := range cs {
		cs[i].Outcome, cs[i].When = claimOutcome(c.Status, c.Step), statusTime(c.Received, loc)
		if c.Waiting() {
			cs[i].Outcome.Label += " until " + statusTime(c.Until/1000, loc)
		}
	}
	return cs, err
}

func (c claim) task() string { return cmp.Or(c.CoveredBy, c.Delivery) }

func (c claim) Waiting() bool {
	return c.Status == claimPending && slices.Contains([]string{waitCooldown, waitWindow, waitApproval}, c.Step)
}

// unitStatus is an overview line: the unit's last finished claim, its newest if still under way,
// and its image check.
type unitStatus struct {
	Unit, Image         string
	Policy, PolicyError string // the overview's words for its policy, or why it is malformed
	Last, Running       *claim
	Check               *registryCheck
}

const (
	unitsSQL = `WITH RECURSIVE u(unit) AS (SELECT min(unit) FROM github_deliveries
			UNION ALL SELECT (SELECT min(unit) FROM github_deliveries WHERE unit > u.unit) FROM u WHERE u.unit IS NOT NULL LIMIT 1001)
		SELECT unit FROM u WHERE unit IS NOT NULL`
	unitNewestSQL = claimColumnsSQL + ` WHERE unit = ? ORDER BY claimed_at DESC LIMIT 1`
	unitLastSQL   = claimColumnsSQL + ` WHERE unit = ? AND status IN ('done', 'failed') ORDER BY claimed_at DESC LIMIT 1`
)

// statusUnits reads every unit that has a claim or an image check: the distinct units are walked
// through idx_github_deliveries_unit (a skip scan), then each unit's newest claims through it too.
func statusUnits(ctx context.Context, db *sql.DB, loc *time.Location) ([]unitStatus, error) {
	units, err := collect(ctx, db, unitsSQL, nil, func(u *string) []any { return []any{u} })
	out := make([]unitStatus, 0, len(units))
	for _, u := range units {
		if err != nil {
			break
		}
		var newest, last []claim
		if newest, err = readClaims(ctx, db, loc, unitNewestSQL, u); err == nil {
			last, err = readClaims(ctx, db, loc, unitLastSQL, u)
		}
		if err != nil || len(newest) == 0 {
			continue
		}
		us := unitStatus{Unit: u, Image: newest[0].Image}
		if len(last) > 0 {
			us.Last = &last[0]
			us.Last.When = statusTime(us.Last.Updated, loc)
		}
		if us.Last == nil || newest[0].Delivery != us.Last.Delivery {
			us.Running = &newest[0]
			us.Running.When = statusTime(us.Running.Updated, loc)
		}
		out = append(out, us)
	}
	checks, cerr := readRegistryChecks(ctx, db, "")
	for i := range checks {
		at, found := slices.BinarySearchFunc(out, checks[i].Unit, func(u unitStatus, t string) int { return strings.Compare(u.Unit, t) })
		if !found {
			out = slices.Insert(out, at, unitStatus{Unit: checks[i].Unit, Image: checks[i].Image})
		}
		out[at].Check = &checks[i]
	}
	return out, errors.Join(err, cerr)
}

// registryCheck is an image_checks row: the image check's newest word on a unit.
type registryCheck struct {
	Unit, Image, Remote, Running, Error string
	Checked, FirstSeen, NextTry         int64
}

func (c registryCheck) updateAvailable() bool { return c.Remote != "" && c.Remote != c.Running }

// State classifies a check as outcomes are: ok (up to date), update (since when), failed.
func (c registryCheck) State() outcome {
	switch {
	case c.Error != "":
		return outcome{"failed", "check failed"}
	case c.updateAvailable():
		return outcome{"update", "update available since " + statusTime(c.FirstSeen, time.Local)}
	}
	return outcome{"ok", "up to date"}
}

func readRegistryChecks(ctx context.Context, db *sql.DB, where string, args ...any) ([]registryCheck, error) {
	return collect(ctx, db, `SELECT unit, image, remote_digest, running_digest, checked_at, first_seen_at, error, next_try
		FROM image_checks`+where+` ORDER BY unit`, args, func(c *registryCheck) []any {
		return []any{&c.Unit, &c.Image, &c.Remote, &c.Running, &c.Checked, &c.FirstSeen, &c.Error, &c.NextTry}
	})
}

// saveRegistryCheck stores a check with the rows that say what changed and its message, if any,
// in one transaction.
func (l *eventLog) saveRegistryCheck(ctx context.Context, c registryCheck, evs []event, n *notice) error {
	return l.write(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT OR REPLACE INTO image_checks VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
			c.Unit, c.Image, c.Remote, c.Running, c.Checked, c.FirstSeen, c.Error, c.NextTry)
		if err == nil && n != nil {
			err = notifyTx(ctx, tx, *n)
		}
		if err != nil {
			return err
		}
		return l.insertEvents(ctx, tx, evs)
	})
}

func statusTime(ts int64, loc *time.Location) string {
	return time.Unix(ts, 0).In(loc).Format("2006-01-02 15:04:05 MST")
}

const chartDays = 30

// chartView is the redeploys-per-day chart, laid out here so the template only places shapes.
type (
	chartView struct {
		Width, Height, Base, Max int
		Bars                     []chartBar
		Ticks                    []chartTick
		Totals                   map[string]int
		Summary                  string
	}
	chartBar struct {
		Title string
		Segs  []chartSeg
	}
	chartSeg struct {
		X, Y, W, H int
		Class      string
	}
	chartTick struct {
		X     int
		Label string
	}
)

// chartClasses are the outcomes the chart counts: the tasks that restarted something.
var chartClasses = []string{"ok", "rolled-back", "failed"}

func chartSQL(days []string) string {
	return `WITH days(i, lo, hi) AS (VALUES ` + strings.Join(days, ", ") + `)
		SELECT days.i, c.status, c.step, count(*) FROM days JOIN github_deliveries AS c
			ON c.claimed_at >= days.lo AND c.claimed_at < days.hi
		WHERE +c.status = 'done' AND c.covered_by = c.delivery_id AND c.step NOT IN ('up-to-date', '') GROUP BY 1, 2, 3`
}

// redeployChart counts the tasks that changed something (not up-to-date or skipped) per local day,
// by outcome; each day is one range of idx_github_deliveries_claimed, counted in SQL.
func redeployChart(ctx context.Context, db *sql.DB, now time.Time, loc *time.Location) (chartView, error) {
	now = now.In(loc)
	first := time.Date(now.Year(), now.Month(), now.Day()-(chartDays-1), 0, 0, 0, 0, loc)
	var days []string
	var args []any
	counts := make([]map[string]int, chartDays)
	for i := range chartDays {
		days = append(days, "(?, ?, ?)")
		args = append(args, i, first.AddDate(0, 0, i).UnixMilli(), first.AddDate(0, 0, i+1).UnixMilli())
		counts[i] = map[string]int{}
	}
	c := chartView{Width: 40 + chartDays*20 + 10, Height: 150, Base: 120, Max: 1, Totals: map[string]int{}}
	err := scan(ctx, db, chartSQL(days), args, func(rows *sql.Rows) error {
		var i, n int
		var status, step string
		if err := rows.Scan(&i, &status, &step, &n); err != nil {
			return err
		}
		if class := claimOutcome(claimStatus(status), step).Class; slices.Contains(chartClasses, class) {
			counts[i][class] += n
			c.Totals[class] += n
			c.Max = max(c.Max, counts[i]["ok"]+counts[i]["rolled-back"]+counts[i]["failed"])
		}
		return nil
	})
	if err != nil {
		return chartView{}, err
	}
	for i, m := range counts {
		day := first.AddDate(0, 0, i)
		x, y := 40+i*20, c.Base
		bar := chartBar{Title: fmt.Sprintf("%s: %d restarted healthy, %d rolled back, %d failed",
			day.Format("Mon 2 Jan"), m["ok"], m["rolled-back"], m["failed"])}
		for _, class := range chartClasses {
			if m[class] > 0 {
				h := max(m[class]*(c.Base-10)/c.Max, 2)
				y -= h
				bar.Segs = append(bar.Segs, chartSeg{X: x, Y: y, W: 16, H: h, Class: class})
			}
		}
		c.Bars = append(c.Bars, bar)
		if (chartDays-1-i)%7 == 0 {
			c.Ticks = append(c.Ticks, chartTick{X: x + 8, Label: day.Format("2 Jan")})
		}
	}
	c.Summary = fmt.Sprintf("Redeploys per day over the last %d days: %d restarted healthy, %d rolled back, %d failed",
		chartDays, c.Totals["ok"], c.Totals["rolled-back"], c.Totals["failed"])
	return c, nil
}

type deliveryFilter struct {
	Unit, Outcome string
	Before        int64 // keyset paging: claims (event rows, for ignored) with a smaller id
}

const (
	statusPageSize = 25
	pageScanLimit  = 5000 // rows one page reads at most to fill itself; the next page goes on
)

// statusDeliveries returns a page of deliveries, newest first, and the next page's before (0: the
// last), reading at most pageScanLimit claims; ignored ones, without a claim, are push request rows.
func statusDeliveries(ctx context.Context, db *sql.DB, f deliveryFilter, loc *time.Location) ([]claim, int64, error) {
	if f.Outcome == "ignored" {
		return ignoredDeliveries(ctx, db, f, loc)
	}
	before, chunk := cmp.Or(f.Before, math.MaxInt64), statusPageSize
	if f.Outcome != "" {
		chunk = 250
	}
	var page []claim
	for scanned := 0; scanned < pageScanLimit; scanned += chunk {
		q, args := claimColumnsSQL+` WHERE rowid < ?`, []any{before}
		if f.Unit != "" {
			q, args = q+` AND unit = ?`, append(args, f.Unit)
		}
		cs, err := readClaims(ctx, db, loc, q+` ORDER BY rowid DESC LIMIT ?`, append(args, chunk)...)
		if err != nil {
			return nil, 0, err
		}
		for _, c := range cs {
			if before = c.ID; f.Outcome == "" || c.Outcome.Class == f.Outcome {
				if page = append(page, c); len(page) == statusPageSize {
					return page, c.ID, nil
				}
			}
		}
		if len(cs) < chunk {
			return page, 0, nil
		}
	}
	return page, before, nil
}

// ignoredSQL reads the newest pageScanLimit push request rows before an id and keeps those that
// named a delivery and were not queued.
const ignoredSQL = eventColumnsSQL + ` WHERE id IN (SELECT id FROM event_log WHERE action IN ('github-webhook', 'registry-webhook')
		AND id < ? ORDER BY id DESC LIMIT ?)
	AND json_extract(meta, '$.reason') IS NOT 'queued' AND json_extract(meta, '$.delivery') IS NOT NULL
	AND (? = '' OR json_extract(meta, '$.unit') = ?) ORDER BY id DESC LIMIT ?`

func ignoredDeliveries(ctx context.Context, db *sql.DB, f deliveryFilter, loc *time.Location) ([]claim, int64, error) {
	before := cmp.Or(f.Before, math.MaxInt64)
	evs, err := readEvents(ctx, db, ignoredSQL, before, pageScanLimit, f.Unit, f.Unit, statusPageSize)
	if err != nil {
		return nil, 0, err
	}
	var page []claim
	for _, e := range evs {
		page = append(page, claim{ID: e.ID, Delivery: metaString(e.Meta, "delivery"), Unit: metaString(e.Meta, "unit"),
			Image: metaString(e.Meta, "image"), Outcome: requestOutcome(e.Status, metaString(e.Meta, "reason")), When: statusTime(e.TS, loc)})
	}
	if len(page) == statusPageSize {
		return page, page[len(page)-1].ID, nil
	}
	var scanned int
	var oldest sql.NullInt64
	err = db.QueryRowContext(ctx, `SELECT count(*), min(id) FROM (SELECT id FROM event_log
		WHERE action IN ('github-webhook', 'registry-webhook') AND id < ? ORDER BY id DESC LIMIT ?)`, before, pageScanLimit).Scan(&scanned, &oldest)
	if err != nil || scanned < pageScanLimit {
		return page, 0, err
	}
	return page, oldest.Int64, nil
}

// storyView is one delivery: its claim, what it was decided, and every row of its story.
type storyView struct {
	Delivery, Unit, Image, Digest, Pull, Restart, Error string
	Task, TaskUnit                                      string // the delivery whose task ran this one, when another's
	Wait, Until                                         string // the policy it waits for, and till when
	Retry                                               bool   // it failed, and a person may queue it again
	Outcome                                             outcome
	Totals                                              []storyDetail // and after a rollback, that the registry names the rejected digest
	Events                                              []storedEvent
	Rows                                                []storyRow
	Notices                                             []noticeView
	stepMS                                              map[string]int64 // each task step's time (unix ms)
}

type storyRow struct {
	When, Action, Step, Class, Elapsed, Error, Stderr string
	Status                                            int
	Details                                           []storyDetail
}

type storyDetail struct{ Key, Value string }

var storyHidden = map[string]bool{"delivery": true, "unit": true, "image": true, "event": true, "step": true,
	"path": true, "error": true, "stderr": true, "at_ms": true}

const storySQL = eventColumnsSQL + ` WHERE ts BETWEEN ? AND ? AND (json_extract(meta, '$.delivery') = ?
	OR action = 'github-task' AND json_extract(meta, '$.delivery') = ?) ORDER BY id`

// deliveryStory reads the rows written while its claim was open (idx_event_log_ts) that name it,
// and the steps of the task that ran it; without a claim, every row naming it. ok: some row does.
func deliveryStory(ctx context.Context, db *sql.DB, id string, now time.Time, loc *time.Location) (storyView, bool, error) {
	v := storyView{Delivery: id, stepMS: map[string]int64{}}
	cs, err := readClaims(ctx, db, loc, claimColumnsSQL+` WHERE delivery_id = ?`, id)
	switch {
	case err != nil:
		return v, false, err
	case len(cs) == 0:
		if v.Events, err = unclaimedStory(ctx, db, id, &v); err != nil || len(v.Events) == 0 {
			return v, false, err
		}
	default:
		c := cs[0]
		end := c.Updated
		if c.Status != claimDone && c.Status != claimFailed {
			end = now.Unix()
		}
		v.Events, err = readEvents(ctx, db, storySQL, c.Received, end, id, c.task())
		if err != nil {
			return v, false, err
		}
		v.Unit, v.Image, v.Outcome = c.Unit, c.Image, c.Outcome
		if c.TaskUnit != "" {
			v.TaskUnit = c.TaskUnit + ".service"
		}
		if c.task() != id {
			v.Task = c.task()
		}
		if c.Outcome.Class == "failed" || c.Outcome.Class == "rolled-back" {
			v.Error, v.Retry = c.Error, c.Outcome.Class == "failed" && c.Status != claimDispatched
		}
		if c.Waiting() {
			v.Wait, v.Until = c.Step, time.UnixMilli(c.Until).In(loc).Format(time.RFC3339)
		}
	}
	for _, e := range v.Events {
		v.addRow(e, loc)
	}
	if len(cs) > 0 {
		v.addTotals(cs[0].ClaimedMS)
	}
	v.Notices, err = storyNotices(ctx, db, cmp.Or(v.Task, id), loc)
	return v, true, err
}

// addTotals adds the story's totals: push to serving, to healthy, to rolled back, and the rollback's own time.
func (v *storyView) addTotals(pushed int64) {
	total := func(label string, from, to int64) {
		if from != 0 && to >= from {
			v.Totals = append(v.Totals, storyDetail{label, (time.Duration(to-from) * time.Millisecond).String()})
		}
	}
	total("Push → serving", pushed, v.stepMS["serving"])
	total("Push → healthy", pushed, v.stepMS["healthy"])
	total("Rollback (from the failure)", v.stepMS["health-failed"], v.stepMS["rolled-back"])
	total("Push → rolled back", pushed, v.stepMS["rolled-back"])
}

// unclaimedStory reads from the whole log the rows naming a delivery that has no claim.
func unclaimedStory(ctx context.Context, db *sql.DB, id string, v *storyView) ([]storedEvent, error) {
	evs, err := queryEvents(ctx, db, eventFilter{delivery: id, afterID: -1})
	if err != nil || len(evs) == 0 {
		return evs, err
	}
	v.Outcome = requestOutcome(evs[0].Status, metaString(evs[0].Meta, "reason"))
	for _, e := range evs {
		if e.Action == "github-task" {
			v.Outcome = claimOutcome(claimDone, metaString(e.Meta, "step"))
		}
	}
	return evs, nil
}

func (v *storyView) addRow(e storedEvent, loc *time.Location) {
	v.Unit, v.Image = cmp.Or(v.Unit, metaString(e.Meta, "unit")), cmp.Or(v.Image, metaString(e.Meta, "image"))
	for _, k := range []string{"digest", "delivery_digest", "pulled_digest"} {
		v.Digest = cmp.Or(metaString(e.Meta, k), v.Digest)
	}
	for k, d := range map[string]*string{"pull_ms": &v.Pull, "restart_ms": &v.Restart} {
		if ms, ok := e.Meta[k].(float64); ok {
			*d = (time.Duration(ms) * time.Millisecond).String()
		}
	}
	step := metaString(e.Meta, "step")
	if e.Action != "github-task" {
		step = cmp.Or(metaString(e.Meta, "decision"), metaString(e.Meta, "reason"))
	}
	when := statusTime(e.TS, loc)
	if ms, ok := e.Meta["at_ms"].(float64); ok && e.Action == "github-task" {
		when = time.UnixMilli(int64(ms)).In(loc).Format("2006-01-02 15:04:05.000 MST")
		v.stepMS[step] = int64(ms)
		if serving, ok := e.Meta["serving_at_ms"].(float64); ok && step == "healthy" {
			v.stepMS["serving"] = int64(serving)
		}
	}
	if note := metaString(e.Meta, "registry_note"); note != "" && step == "rolled-back" {
		v.Totals = append(v.Totals, storyDetail{"Registry", note})
	}
	r := storyRow{When: when, Action: e.Action, Step: step, Status: e.Status,
		Elapsed: (time.Duration(e.DurationMS) * time.Millisecond).String(),
		Error:   metaString(e.Meta, "error"), Stderr: metaString(e.Meta, "stderr")}
	switch class := stepClasses[step]; {
	case e.Status >= 500 || class == "failed":
		r.Class = "failed"
	case class == "rolled-back":
		r.Class = "rolled-back"
	case e.Status >= 400:
		r.Class = "skipped"
	}
	for _, k := range slices.Sorted(maps.Keys(e.Meta)) {
		if !storyHidden[k] {
			r.Details = append(r.Details, storyDetail{k, metaString(e.Meta, k)})
		}
	}
	v.Rows = append(v.Rows, r)
}

// statusView is what one status page shows; Page picks the template's section.
type statusView struct {
	Page           string // overview, deliveries, story, login, no-token, error, done
	Title, Message string
	Nav, Refresh   bool
	Next           string // where the login form (or a done page's link) returns to

	Now, Oldest      string
	Units            []unitStatus
	Failing, Pending int
	Waiting          map[string]int64 // pending claims by their policy wait
	Chart            chartView
	Filter           deliveryFilter
	Outcomes         []string
	Deliveries       []claim
	Older            int64 // before= of the next page, 0 when this is the last
	Story            storyView
}

// statusStyle is the page's only stylesheet, inline and allowed by its hash in the CSP.
const statusStyle = `
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
header{display:flex;gap:1.5em;align-items:center;padding:.6em 1.2em;background:#1d232a;color:#fff}
header a,header button{color:#fff;background:none;border:0;font:inherit;cursor:pointer;text-decoration:underline}header form{margin:0}
main{padding:1em 1.2em;max-width:1200px}h1{font-size:1.3em;margin:.2em 0 .6em}h2{font-size:1.1em;margin:1.4em 0 .5em}
table{border-collapse:collapse;width:100%;background:#fff}th,td{text-align:left;padding:.35em .6em;border-bottom:1px solid #e3e6ea;vertical-align:top}
th{background:#eef0f3;font-weight:600}td.wrap,code{word-break:break-all}code{font:12px ui-monospace,monospace}
pre{white-space:pre-wrap;word-break:break-all;max-height:12em;overflow:auto;margin:.3em 0;font:12px ui-monospace,monospace}
.badge{display:inline-block;padding:0 .5em;border-radius:3px;font-weight:600;font-size:12px;text-transform:uppercase}
.badge.ok{background:#d5f0dc;color:#14522a}.badge.rolled-back{background:#ffe8b3;color:#6b4500}.badge.failed{background:#b3261e;color:#fff}
.badge.running{background:#dbe7ff;color:#123e8c}.badge.update{background:#ffe8b3;color:#6b4500;text-transform:none}.badge.skipped,.badge.ignored{background:#e6e6e6;color:#333}tr.failed td{background:#fdecea}
tr.failed td:first-child{border-left:4px solid #b3261e}tr.rolled-back td:first-child{border-left:4px solid #d08a00}
pre.err{color:#8c1d18;background:#fdecea;padding:.3em}.note{background:#fff;border:1px solid #e3e6ea;padding:.8em 1em;max-width:40em}
.alert{color:#8c1d18;font-weight:600}.queue{background:#fff;border:1px solid #e3e6ea;padding:.5em 1em;display:inline-block}
form.filter{margin:.5em 0;display:flex;gap:.8em;align-items:end;flex-wrap:wrap}label{display:block;font-size:12px;color:#555}
input,select,button{font:inherit}.pager{margin:.8em 0;display:flex;gap:1.5em}svg{background:#fff;border:1px solid #e3e6ea}svg .ok{fill:#2e9b4f}
svg .rolled-back{fill:#e0a100}svg .failed{fill:#b3261e}svg text{font:11px system-ui,sans-serif;fill:#555}svg line{stroke:#aaa}
.legend span{margin-right:1.2em}.legend i{display:inline-block;width:.9em;height:.9em;margin-right:.3em;vertical-align:-.1em}
.legend .ok{background:#2e9b4f}.legend .rolled-back{background:#e0a100}.legend .failed{background:#b3261e}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em;background:#fff;padding:.8em 1em;border:1px solid #e3e6ea}dt{color:#555}
dd{margin:0;word-break:break-all}form.act{display:flex;gap:.4em;margin:.3em 0}
`

// statusTemplate renders every status page; escaping is html/template's, by context.
var statusTemplate = template.Must(template.New("status").Funcs(template.FuncMap{
	"linkable": func(id string) bool { return reDeliveryID.MatchString(id) },
}).Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
{{- if .Refresh}}
<meta http-equiv="refresh" content="30">{{end}}
<title>{{.Title}} · webhook-auto-update</title>
<style>` + statusStyle + `</style>
</head><body><header><strong>webhook-auto-update</strong>
{{- if .Nav}}
<a href="/status/">Overview</a> <a href="/status/deliveries">Deliveries</a>
<form method="post" action="/status/logout"><button type="submit">Log out</button></form>
{{- end}}
</header>
<main>
{{- define "delivery"}}{{if linkable .}}<a href="/status/deliveries/{{.}}">{{.}}</a>{{else}}{{.}}{{end}}{{end}}
{{- define "decide"}}<form method="post" action="/status/deliveries/{{.}}/approve" class="act"><input name="reason" placeholder="reason" aria-label="reason">
<button type="submit" class="approve">Approve</button><button type="submit" formaction="/status/deliveries/{{.}}/reject">Reject</button></form>{{end}}
{{- if eq .Page "no-token"}}
<h1>Status page</h1>
<div class="note">
<p>The status page needs the manual token, and this server has none.</p><p>Set <code>WEBHOOK_MANUAL_TOKEN</code> (or <code>WEBHOOK_TOKEN</code>) in the server's
environment, for example in <code>~/.config/webhook-auto-update/webhook-auto-update.env</code> for the user unit,
restart the server, then log in here with that token.</p>
</div>
{{- else if eq .Page "login"}}
<h1>Log in</h1>
<form method="post" action="/status/login" class="note login">
{{- if .Message}}<p class="alert" role="alert">{{.Message}}</p>{{end}}
<label for="token">Manual token (WEBHOOK_MANUAL_TOKEN)</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<input type="hidden" name="next" value="{{.Next}}"><button type="submit">Log in</button></form>
{{- else if eq .Page "error"}}
<h1>{{.Title}}</h1>
<p class="alert">{{.Message}}</p>
{{- else if eq .Page "done"}}
<h1>{{.Title}}</h1>
<p class="note" role="status">{{.Message}}</p><p><a href="{{.Next}}">Back</a></p>
{{- else if eq .Page "overview"}}
<h1>Overview</h1>
<p>As of {{.Now}}. Units in the log: {{len .Units}}{{if .Failing}}; <strong class="alert">failed on their last redeploy: {{.Failing}}</strong>{{end}}.</p>
<p class="queue">Queue: {{if .Pending}}<strong>{{.Pending}} pending</strong>, the oldest waiting {{.Oldest}}{{range $k, $n := .Waiting}}; {{$n}} {{$k}}{{end}}{{else}}empty{{end}}</p>
<h2>Units</h2><table><thead><tr><th>Unit</th><th>Image</th><th>Last redeploy</th><th>Finished</th><th>Delivery</th><th>Policy</th></tr></thead><tbody>
{{- range .Units}}
<tr class="{{with .Last}}{{.Outcome.Class}}{{end}}">
<td class="wrap">{{.Unit}}</td>
<td class="wrap"><code>{{.Image}}</code>{{with .Check}}<br><span class="badge {{.State.Class}}">{{.State.Label}}</span>
{{- if .Error}}<pre class="err">{{.Error}}</pre>{{end}}{{end}}</td>
<td>{{with .Last}}<span class="badge {{.Outcome.Class}}">{{.Outcome.Class}}</span> {{.Outcome.Label}}{{else}}none yet{{end}}
{{- with .Running}}<br><span class="badge running">running</span> {{.Outcome.Label}} at {{.When}}{{if .Waiting}} (delivery {{template "delivery" .Delivery}}){{end}}
{{- if eq .Step "awaiting-approval"}}{{template "decide" .Delivery}}{{end}}{{end}}
{{- with .Last}}{{if and .Error (or (eq .Outcome.Class "failed") (eq .Outcome.Class "rolled-back"))}}<pre class="err">{{.Error}}</pre>{{end}}{{end}}</td>
<td>{{with .Last}}{{.When}}{{end}}</td>
<td class="wrap">{{with .Last}}{{template "delivery" .CoveredBy}}{{end}}</td>
<td>{{.Policy}}{{with .PolicyError}}<span class="alert">{{.}}</span>{{end}}
<form method="post" action="/status/units/{{.Unit}}/redeploy" class="act"><input type="hidden" name="image" value="{{.Image}}">
<label><input type="checkbox" name="force" value="1"> force</label><button type="submit">Redeploy now</button></form></td>
</tr>
{{- else}}
<tr><td colspan="6">No unit in the event log yet: nothing was delivered or redeployed.</td></tr>
{{- end}}
</tbody></table>
<h2>Redeploys per day</h2><svg role="img" aria-labelledby="chart-title" width="{{.Chart.Width}}" height="{{.Chart.Height}}" viewBox="0 0 {{.Chart.Width}} {{.Chart.Height}}" xmlns="http://www.w3.org/2000/svg">
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
<div><label for="outcome">Outcome</label><select id="outcome" name="outcome"><option value="">all queued</option>
{{- range .Outcomes}}<option{{if eq . $.Filter.Outcome}} selected{{end}}>{{.}}</option>{{end}}</select></div>
<button type="submit">Filter</button>
</form><table><thead><tr><th>Received</th><th>Unit</th><th>Image</th><th>Outcome</th><th>Delivery</th></tr></thead><tbody>
{{- range .Deliveries}}
<tr class="{{.Outcome.Class}}">
<td>{{.When}}</td>
<td class="wrap">{{.Unit}}</td>
<td class="wrap"><code>{{.Image}}</code></td>
<td><span class="badge {{.Outcome.Class}}">{{.Outcome.Class}}</span> {{.Outcome.Label}}</td>
<td class="wrap">{{template "delivery" .Delivery}}</td>
</tr>
{{- else}}
<tr><td colspan="5">No delivery matches.</td></tr>
{{- end}}
</tbody></table>
<p class="pager">{{if .Filter.Before}}<a href="/status/deliveries?unit={{.Filter.Unit}}&amp;outcome={{.Filter.Outcome}}">Newest</a>{{end}}
{{- if .Older}} <a href="/status/deliveries?unit={{.Filter.Unit}}&amp;outcome={{.Filter.Outcome}}&amp;before={{.Older}}">Older</a>{{end}}</p>
{{- else if eq .Page "story"}}
{{- with .Story}}
<h1>Delivery <code>{{.Delivery}}</code></h1>
<dl>
<dt>Outcome</dt><dd><span class="badge {{.Outcome.Class}}">{{.Outcome.Class}}</span> {{.Outcome.Label}}</dd>
<dt>Unit</dt><dd>{{.Unit}}</dd>
<dt>Image</dt><dd><code>{{.Image}}</code></dd>
{{- if .Digest}}<dt>Digest</dt><dd><code>{{.Digest}}</code></dd>{{end}}
{{- if .Pull}}<dt>Pull</dt><dd>{{.Pull}}</dd>{{end}}
{{- if .Restart}}<dt>Restart</dt><dd>{{.Restart}}</dd>{{end}}
{{- range .Totals}}<dt>{{.Key}}</dt><dd>{{.Value}}</dd>{{end}}
{{- if .Task}}<dt>Covered by</dt><dd>the task of delivery {{template "delivery" .Task}}</dd>{{end}}
{{- if .TaskUnit}}<dt>Task unit</dt><dd><code>{{.TaskUnit}}</code></dd>{{end}}
{{- if .Error}}<dt>Error</dt><dd><pre class="err">{{.Error}}</pre></dd>{{end}}
{{- if .Wait}}<dt>Waiting for</dt><dd>{{.Wait}} until {{.Until}}{{if eq .Wait "awaiting-approval"}}{{template "decide" .Delivery}}{{end}}</dd>{{end}}
{{- if .Retry}}<dt>Retry</dt><dd><form method="post" action="/status/deliveries/{{.Delivery}}/retry" class="act"><button type="submit">Queue it again</button></form></dd>{{end}}
</dl>
<h2>Steps</h2><table><thead><tr><th>Time</th><th>Action</th><th>Step</th><th>Status</th><th>Elapsed</th><th>Details</th></tr></thead><tbody>
{{- range .Rows}}
<tr class="{{.Class}}">
<td>{{.When}}</td><td>{{.Action}}</td><td>{{.Step}}</td><td>{{.Status}}</td><td>{{.Elapsed}}</td>
<td class="wrap">{{range .Details}}<code>{{.Key}}={{.Value}}</code> {{end}}
{{- if .Error}}<pre class="err">{{.Error}}</pre>{{end}}{{if .Stderr}}<pre>{{.Stderr}}</pre>{{end}}</td>
</tr>
{{- end}}
</tbody></table>
{{- if .Notices}}
<h2>Notifications</h2><table><thead><tr><th>Queued</th><th>Message</th><th>State</th><th>Targets</th></tr></thead><tbody>
{{- range .Notices}}
<tr class="{{if eq .State "failed"}}failed{{end}}"><td>{{.When}}</td><td>{{.Kind}}</td><td>{{.State}}</td>
<td class="wrap">{{range $name, $t := .Targets}}<code>{{$name}}</code> {{$t.State}} after {{$t.Attempts}} attempts{{with $t.Error}}: {{.}}{{end}}<br>{{end}}</td></tr>
{{- end}}
</tbody></table>
{{- end}}
{{- end}}
{{- end}}
</main></body></html>
`))
