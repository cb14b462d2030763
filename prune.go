// prune.go owns prune-state: it trims the state directory's timestamp logs (ratelimit.go's layout)
// under their writers' lock, only tried for an image's so a redeploy is skipped, never delayed, and
// deletes stale lock files only while holding them, stale temp files, old and surplus event_log rows.
// It keeps timestamps a limit still counts, follows no symlink, and a dry run writes only its row.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"time"
)

const usagePruneState = `usage: webhook-auto-update prune-state [--max-age-hours N] [--dry-run] [--events-max-age-days N]
                                       [--state-dir DIR] [--db URL]

Drops timestamps older than --max-age-hours (default 24) from ratelimit.db and from every
github-image-limits/*.db, deletes the logs left empty, and deletes github-image-locks/*.lock
files not modified within the retention unless a running redeploy holds them. Timestamps that a
rate-limit window (WEBHOOK_LIMIT*_WINDOW, WEBHOOK_IMAGE_LIMIT_WINDOW) still counts are kept.
Prints one line:

  Trimmed entries=N removed_dbs=N removed_locks=N dry_run=BOOL

where entries counts dropped timestamps and unreadable lines. --dry-run reports what a real run
would do and changes nothing in the state directory.

It also deletes the event_log rows of HTTP requests older than WEBHOOK_REQUEST_RETENTION_DAYS
(default 30; the rows of redeploys, triggers and scheduler ticks are kept) and says how many on
standard error. --events-max-age-days N also deletes
every event_log row older than N days, in batches, and prints "Deleted events=N older_than=TIME
dry_run=BOOL" (default: keep them).
Exit status: 0 done (files a redeploy holds are skipped, not an error), 1 a file could not be
pruned, 2 usage error.
`

func cmdPruneState(c *cli, args []string) int {
	hours, dryRun, eventDays := 24, false, 0
	cfg, code := c.setupNoArgs("prune-state", usagePruneState, args, func(fs *flag.FlagSet, cfg *config) {
		fs.Var(positiveInt{&hours}, "max-age-hours", "")
		fs.BoolVar(&dryRun, "dry-run", false, "")
		fs.Var(positiveInt{&eventDays}, "events-max-age-days", "")
	})
	if code >= 0 {
		return code
	}
	if fi, err := os.Stat(cfg.stateDir); err != nil || !fi.IsDir() {
		c.log.infof("prune-state: no state directory at %s", cfg.stateDir)
		fmt.Fprintf(c.stdout, "Trimmed entries=0 removed_dbs=0 removed_locks=0 dry_run=%t\n", dryRun)
		return 0
	}
	events, closeLog := openCommandLog(c, cfg)
	defer closeLog()
	start := time.Now()
	rep := newPruner(cfg, time.Duration(hours)*time.Hour, dryRun, start, c.log).run(context.Background())
	fmt.Fprintf(c.stdout, "Trimmed entries=%d removed_dbs=%d removed_locks=%d dry_run=%t\n",
		rep.entries, rep.removedDBs, rep.removedLocks, dryRun)
	deleteRows := func(cutoff time.Time, requestsOnly bool, what string) int64 {
		n, err := events.deleteOlderThan(context.Background(), cutoff, dryRun, requestsOnly)
		if err != nil {
			rep.errs = append(rep.errs, what+": "+err.Error())
		}
		return n
	}
	var deleted, deletedRequests int64
	if events != nil {
		cutoff := start.Add(-cfg.requestRetention)
		deletedRequests = deleteRows(cutoff, true, "delete old request rows")
		beyond, err := events.deleteRequestsBeyond(context.Background(), cfg.requestRowsMax, dryRun)
		if err != nil {
			rep.errs = append(rep.errs, "delete request rows beyond WEBHOOK_REQUEST_ROWS_MAX: "+err.Error())
		}
		deletedRequests += beyond
		// On stderr: stdout keeps the original tool's one line, which scripts read.
		c.log.infof("prune-state: %s %d request rows older than %s (WEBHOOK_REQUEST_RETENTION_DAYS) or beyond the newest %d (WEBHOOK_REQUEST_ROWS_MAX)",
			map[bool]string{false: "deleted", true: "would delete"}[dryRun], deletedRequests, cutoff.UTC().Format(time.RFC3339), cfg.requestRowsMax)
	}
	if eventDays > 0 && events == nil {
		rep.errs = append(rep.errs, "event log unavailable: old events not deleted")
	} else if eventDays > 0 {
		cutoff := start.Add(-time.Duration(eventDays) * 24 * time.Hour)
		deleted = deleteRows(cutoff, false, "delete old events")
		fmt.Fprintf(c.stdout, "Deleted events=%d older_than=%s dry_run=%t\n", deleted, cutoff.UTC().Format(time.RFC3339), dryRun)
	}
	status, exit := http.StatusOK, 0
	if len(rep.errs) > 0 {
		c.log.errorf("prune-state: %s", strings.Join(rep.errs, "; "))
		status, exit = http.StatusInternalServerError, 1
	}
	writeCommandEvent(c.log, events, event{RequestID: newRequestID(), TS: time.Now(), Method: "CLI",
		Status: status, Action: "prune-state", Duration: time.Since(start), Meta: map[string]any{
			"max_age_hours": hours, "dry_run": dryRun, "entries": rep.entries,
			"removed_dbs": rep.removedDBs, "removed_locks": rep.removedLocks,
			"removed_temp": rep.removedTemp, "busy": rep.busy, "errors": rep.errs,
			"events_max_age_days": eventDays, "deleted_events": deleted,
			"request_retention_days": int(cfg.requestRetention / (24 * time.Hour)), "deleted_request_rows": deletedRequests}})
	return exit
}

type pruner struct {
	stateDir    string
	cutoff      time.Time // files last modified before it are stale
	limitCutoff int64     // ratelimit.db keeps timestamps at or after it
	imageCutoff int64     // github-image-limits/*.db keep timestamps at or after it
	dryRun      bool
	log         *logger
}

// pruneReport is what a run did, or on a dry run would do.
type pruneReport struct {
	entries                               int      // timestamps and unreadable lines dropped
	removedDBs, removedLocks, removedTemp int      // removedTemp: stale temp files of an interrupted writeFileAtomic
	busy                                  []string // files skipped because a redeploy held their lock
	errs                                  []string
}

func (r *pruneReport) fail(lg *logger, format string, a ...any) {
	msg := fmt.Sprintf(format, a...)
	lg.errorf("prune-state: %s", msg)
	r.errs = append(r.errs, msg)
}

// newPruner extends each log's retention to its longest rate-limit window, so no limit loosens.
func newPruner(cfg *config, maxAge time.Duration, dryRun bool, now time.Time, lg *logger) *pruner {
	return &pruner{
		stateDir:    cfg.stateDir,
		cutoff:      now.Add(-maxAge),
		limitCutoff: now.Add(-max(maxAge, cfg.autoUpdateLimits[0].span, cfg.autoUpdateLimits[1].span)).Unix(),
		imageCutoff: now.Add(-max(maxAge, cfg.imageLimit.span)).Unix(),
		dryRun:      dryRun,
		log:         lg,
	}
}

// run prunes the logs before the locks, so a lock file the log pass created is recent and stays.
func (p *pruner) run(ctx context.Context) (rep pruneReport) {
	p.pruneGlobalLog(ctx, &rep)
	p.pruneImageLogs(&rep)
	p.pruneLocks(&rep)
	p.pruneTemps(&rep)
	return rep
}

// is reports whether path (not followed) is a kind want accepts; unless quiet or absent, says why not.
func (p *pruner) is(path string, want func(fs.FileMode) bool, kind string, quiet bool, rep *pruneReport) (fs.FileInfo, bool) {
	fi, err := os.Lstat(path)
	switch {
	case err != nil && !quiet && !errors.Is(err, fs.ErrNotExist):
		rep.fail(p.log, "%v", err)
	case err == nil && !quiet && !want(fi.Mode()):
		p.log.warnf("prune-state: %s is not %s (a symlink?): left alone", path, kind)
	}
	return fi, err == nil && want(fi.Mode())
}

// each calls fn for every regular file directly in dir whose name matches; dir is not followed.
func (p *pruner) each(dir string, match func(string) bool, quiet bool, rep *pruneReport, fn func(string, fs.FileInfo)) {
	if _, ok := p.is(dir, fs.FileMode.IsDir, "a directory", false, rep); !ok {
		return
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		rep.fail(p.log, "%v", err)
	}
	for _, e := range entries {
		if !match(e.Name()) {
			continue
		}
		path := filepath.Join(dir, e.Name())
		if fi, ok := p.is(path, fs.FileMode.IsRegular, "a regular file", quiet, rep); ok {
			fn(path, fi)
		}
	}
}

func visible(ext string) func(string) bool {
	return func(name string) bool { return !strings.HasPrefix(name, ".") && strings.HasSuffix(name, ext) }
}

// remove deletes path, except on a dry run, and reports whether it is (or would be) gone.
func (p *pruner) remove(path string, rep *pruneReport) bool {
	if p.dryRun {
		return true
	}
	err := os.Remove(path)
	if err != nil {
		rep.fail(p.log, "%v", err)
	}
	return err == nil
}

// pruneGlobalLog trims ratelimit.db under ratelimit.lock, as the /auto-update limiter writes it.
func (p *pruner) pruneGlobalLog(ctx context.Context, rep *pruneReport) {
	path, lockPath := filepath.Join(p.stateDir, "ratelimit.db"), filepath.Join(p.stateDir, "ratelimit.lock")
	if _, ok := p.is(path, fs.FileMode.IsRegular, "a regular file", false, rep); !ok {
		return
	}
	if fi, err := os.Lstat(lockPath); err == nil && !fi.Mode().IsRegular() {
		rep.fail(p.log, "%s is not a regular file: %s left alone", lockPath, path)
		return
	}
	// A dry run reads unlocked, since locking could create ratelimit.lock; logs are replaced whole.
	if !p.dryRun {
		lk, err := lockFile(ctx, lockPath, 2*time.Second)
		if err != nil {
			rep.fail(p.log, "%s: %v", path, err)
			return
		}
		defer lk.Unlock()
	}
	p.trim(path, p.limitCutoff, rep)
}

// pruneImageLogs trims each github-image-limits/*.db under its redeploy lock, skipping a held one.
func (p *pruner) pruneImageLogs(rep *pruneReport) {
	p.each(filepath.Join(p.stateDir, "github-image-limits"), visible(".db"), false, rep, func(path string, _ fs.FileInfo) {
		lockPath := filepath.Join(p.stateDir, "github-image-locks", strings.TrimSuffix(filepath.Base(path), ".db")+".lock")
		lk, held, err := p.tryImageLock(lockPath)
		defer lk.Unlock()
		switch {
		case err != nil:
			rep.fail(p.log, "%s: lock %s: %v", path, lockPath, err)
		case held:
			p.log.infof("prune-state: %s skipped: a redeploy holds %s", path, lockPath)
			rep.busy = append(rep.busy, path)
		default:
			p.trim(path, p.imageCutoff, rep)
		}
	})
}

// tryImageLock takes a redeploy lock without waiting, creating it as run-task would (not on a dry run).
func (p *pruner) tryImageLock(path string) (lk *fileLock, held bool, err error) {
	fi, err := os.Lstat(path)
	switch {
	case err == nil && !fi.Mode().IsRegular():
		return nil, false, errors.New("not a regular file (a symlink?)")
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return nil, false, err
	case err != nil && p.dryRun:
		return nil, false, nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, false, err
	}
	lk, free, err := tryLockFile(path, os.O_CREATE|syscall.O_NOFOLLOW)
	return lk, !free && err == nil, err
}

// trim drops the timestamps before cutoff and unreadable lines, rewriting or deleting the log.
func (p *pruner) trim(path string, cutoff int64, rep *pruneReport) {
	data, err := os.ReadFile(path)
	if err != nil {
		rep.fail(p.log, "%v", err)
		return
	}
	ts, bad := parseTimestamps(data)
	kept := slices.DeleteFunc(slices.Clone(ts), func(t int64) bool { return t < cutoff })
	dropped := len(ts) - len(kept) + bad
	switch {
	case len(kept) == 0 && !p.remove(path, rep):
		return
	case len(kept) == 0:
		rep.removedDBs++
	case dropped > 0 && !p.dryRun:
		if err := writeFileAtomic(path, formatTimestamps(kept), 0o600); err != nil {
			rep.fail(p.log, "rewrite %s: %v", path, err)
			return
		}
	}
	rep.entries += dropped
}

// pruneLocks deletes stale github-image-locks/*.lock files, each only while holding it.
func (p *pruner) pruneLocks(rep *pruneReport) {
	p.each(filepath.Join(p.stateDir, "github-image-locks"), visible(".lock"), false, rep, func(path string, fi fs.FileInfo) {
		if !fi.ModTime().Before(p.cutoff) {
			return
		}
		lk, free, err := tryLockFile(path, 0)
		defer lk.Unlock()
		switch {
		case err != nil:
			rep.fail(p.log, "lock %s: %v", path, err)
		case !free:
			p.log.infof("prune-state: %s kept: a redeploy holds it", path)
			rep.busy = append(rep.busy, path)
		case p.remove(path, rep):
			rep.removedLocks++
		}
	})
}

// reTempFile matches the temp files of writeFileAtomic (os.CreateTemp's "*" is digits).
var reTempFile = regexp.MustCompile(`^\..+\.tmp-[0-9]+$`)

// pruneTemps deletes stale writeFileAtomic temp files; a younger one may be a write in progress.
func (p *pruner) pruneTemps(rep *pruneReport) {
	for _, dir := range []string{p.stateDir, filepath.Join(p.stateDir, "github-image-limits")} {
		p.each(dir, reTempFile.MatchString, true, rep, func(path string, fi fs.FileInfo) {
			if fi.ModTime().Before(p.cutoff) && p.remove(path, rep) {
				rep.removedTemp++
			}
		})
	}
}
