// prune.go owns prune-state: housekeeping of the state directory's timestamp logs and lock files
// (the layout of ratelimit.go), and of old event_log rows (request rows past their retention
// always, every row past --events-max-age-days when asked).
//
// Rules: a timestamp log is trimmed under the same lock its writers take (ratelimit.lock for
// ratelimit.db; the image's redeploy lock for github-image-limits/<key>.db, tried without waiting
// so a running redeploy is skipped, never delayed) and is replaced whole by writeFileAtomic; a
// log left empty is deleted. A lock file is deleted only while prune holds it, so never under a
// running redeploy. Timestamps a rate-limit window still counts are kept whatever the retention,
// so pruning never loosens a limit. Symlinks are never followed: only regular files directly in
// the state directory and its two sub-directories are touched. --dry-run takes the same locks
// (without creating any file), computes the same counts and changes no file in the state
// directory; only its event_log row is written.
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
	"strings"
	"syscall"
	"time"
)

// defaultRetentionHours is prune-state's retention, the original tool's (86 400 s).
const defaultRetentionHours = 24

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
	hours, dryRun, eventDays := defaultRetentionHours, false, 0
	cfg, rest, code := c.setup("prune-state", usagePruneState, args, func(fs *flag.FlagSet, cfg *config) {
		fs.Var(positiveInt{&hours}, "max-age-hours", "")
		fs.BoolVar(&dryRun, "dry-run", false, "")
		fs.Var(positiveInt{&eventDays}, "events-max-age-days", "")
	})
	if code >= 0 {
		return code
	}
	if len(rest) > 0 {
		c.log.errorf("prune-state: unexpected argument %q", rest[0])
		fmt.Fprint(c.stderr, usagePruneState)
		return 2
	}
	if fi, err := os.Stat(cfg.stateDir); err != nil || !fi.IsDir() {
		// Nothing to prune, and nothing is created for it.
		c.log.infof("prune-state: no state directory at %s", cfg.stateDir)
		fmt.Fprintf(c.stdout, "Trimmed entries=0 removed_dbs=0 removed_locks=0 dry_run=%t\n", dryRun)
		return 0
	}
	events := openCommandLog(c, cfg)
	if events != nil {
		defer events.Close()
	}
	start := time.Now()
	p := newPruner(cfg, time.Duration(hours)*time.Hour, dryRun, start, c.log)
	rep := p.run(context.Background())
	fmt.Fprintf(c.stdout, "Trimmed entries=%d removed_dbs=%d removed_locks=%d dry_run=%t\n",
		rep.entries, rep.removedDBs, rep.removedLocks, dryRun)
	status, exit := http.StatusOK, 0
	var deleted, deletedRequests int64
	if events != nil { // else openCommandLog warned: the rows cannot be reached
		cutoff := start.Add(-cfg.requestRetention)
		var err error
		if deletedRequests, err = events.deleteOlderThan(context.Background(), cutoff, dryRun, true); err != nil {
			rep.errs = append(rep.errs, "delete old request rows: "+err.Error())
		}
		// On stderr: stdout keeps the original tool's one line, which scripts read.
		verb := "deleted"
		if dryRun {
			verb = "would delete"
		}
		c.log.infof("prune-state: %s %d request rows older than %s (WEBHOOK_REQUEST_RETENTION_DAYS)", verb, deletedRequests, cutoff.UTC().Format(time.RFC3339))
	}
	if eventDays > 0 {
		if events == nil {
			rep.errs = append(rep.errs, "event log unavailable: old events not deleted")
		} else {
			cutoff := start.Add(-time.Duration(eventDays) * 24 * time.Hour)
			var err error
			if deleted, err = events.deleteOlderThan(context.Background(), cutoff, dryRun, false); err != nil {
				rep.errs = append(rep.errs, "delete old events: "+err.Error())
			}
			fmt.Fprintf(c.stdout, "Deleted events=%d older_than=%s dry_run=%t\n", deleted, cutoff.UTC().Format(time.RFC3339), dryRun)
		}
	}
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

// pruner is one prune-state run.
type pruner struct {
	stateDir    string
	cutoff      time.Time // files last modified before it are stale
	limitCutoff int64     // ratelimit.db keeps timestamps at or after it
	imageCutoff int64     // github-image-limits/*.db keep timestamps at or after it
	lockWait    time.Duration
	dryRun      bool
	log         *logger
}

// pruneReport is what a run did, or on a dry run would do.
type pruneReport struct {
	entries      int      // timestamps and unreadable lines dropped
	removedDBs   int      // timestamp logs deleted because they were (or became) empty
	removedLocks int      // stale lock files deleted
	removedTemp  int      // stale temp files of an interrupted writeFileAtomic deleted
	busy         []string // files skipped because a redeploy held their lock
	errs         []string
}

func (r *pruneReport) fail(lg *logger, format string, a ...any) {
	msg := fmt.Sprintf(format, a...)
	lg.errorf("prune-state: %s", msg)
	r.errs = append(r.errs, msg)
}

// newPruner sets the cutoffs: now minus the retention, moved back for each log to its longest
// rate-limit window if that is longer, so that no timestamp a limit still counts is dropped.
func newPruner(cfg *config, maxAge time.Duration, dryRun bool, now time.Time, lg *logger) *pruner {
	longest := time.Duration(0)
	for _, w := range cfg.autoUpdateLimits {
		longest = max(longest, w.span)
	}
	return &pruner{
		stateDir:    cfg.stateDir,
		cutoff:      now.Add(-maxAge),
		limitCutoff: now.Add(-max(maxAge, longest)).Unix(),
		imageCutoff: now.Add(-max(maxAge, cfg.imageLimit.span)).Unix(),
		lockWait:    2 * time.Second,
		dryRun:      dryRun,
		log:         lg,
	}
}

// run prunes the logs first and the locks after, so a lock file the log pass created (it locks an
// image whose lock file was missing) is recent and stays.
func (p *pruner) run(ctx context.Context) pruneReport {
	var rep pruneReport
	p.pruneGlobalLog(ctx, &rep)
	p.pruneImageLogs(&rep)
	p.pruneLocks(&rep)
	for _, dir := range []string{p.stateDir, filepath.Join(p.stateDir, "github-image-limits")} {
		p.pruneTemps(dir, &rep)
	}
	return rep
}

// regularFile reports whether path is a regular file without following a symlink; a missing
// file is (false, nil).
func regularFile(path string) (fs.FileInfo, bool, error) {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	return fi, fi.Mode().IsRegular(), nil
}

// realDir lists dir when it is a directory and not a symlink; a missing dir lists nothing.
func (p *pruner) realDir(dir string, rep *pruneReport) []fs.DirEntry {
	fi, err := os.Lstat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		rep.fail(p.log, "%v", err)
		return nil
	case !fi.IsDir():
		p.log.warnf("prune-state: %s is not a directory (a symlink?): left alone", dir)
		return nil
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		rep.fail(p.log, "%v", err)
	}
	return entries
}

// pruneGlobalLog trims ratelimit.db under ratelimit.lock, as the /auto-update limiter writes it.
func (p *pruner) pruneGlobalLog(ctx context.Context, rep *pruneReport) {
	path := filepath.Join(p.stateDir, "ratelimit.db")
	if _, ok, err := p.checkRegular(path, rep); !ok || err != nil {
		return
	}
	lockPath := filepath.Join(p.stateDir, "ratelimit.lock")
	if fi, err := os.Lstat(lockPath); err == nil && !fi.Mode().IsRegular() {
		rep.fail(p.log, "%s is not a regular file: %s left alone", lockPath, path)
		return
	}
	if !p.dryRun {
		// A dry run reads without the lock, since taking it could create ratelimit.lock; the
		// log is only ever replaced whole, so the read is consistent either way.
		lk, err := lockFile(ctx, lockPath, p.lockWait)
		if err != nil {
			rep.fail(p.log, "%s: %v", path, err)
			return
		}
		defer lk.Unlock()
	}
	p.trim(path, p.limitCutoff, rep)
}

// checkRegular reports whether path exists as a regular file; a symlink or other file is
// reported and left alone.
func (p *pruner) checkRegular(path string, rep *pruneReport) (fs.FileInfo, bool, error) {
	fi, ok, err := regularFile(path)
	switch {
	case err != nil:
		rep.fail(p.log, "%v", err)
	case fi != nil && !ok:
		p.log.warnf("prune-state: %s is not a regular file (a symlink?): left alone", path)
	}
	return fi, ok, err
}

// pruneImageLogs trims every github-image-limits/<key>.db under its image's redeploy lock. A lock
// a redeploy holds is not waited for: that log is skipped this time.
func (p *pruner) pruneImageLogs(rep *pruneReport) {
	dir := filepath.Join(p.stateDir, "github-image-limits")
	for _, e := range p.realDir(dir, rep) {
		name := e.Name()
		if strings.HasPrefix(name, ".") || !strings.HasSuffix(name, ".db") {
			continue
		}
		path := filepath.Join(dir, name)
		if _, ok, err := p.checkRegular(path, rep); !ok || err != nil {
			continue
		}
		lockPath := filepath.Join(p.stateDir, "github-image-locks", strings.TrimSuffix(name, ".db")+".lock")
		lk, held, err := p.tryImageLock(lockPath)
		if err != nil {
			rep.fail(p.log, "%s: lock %s: %v", path, lockPath, err)
			continue
		}
		if held {
			p.log.infof("prune-state: %s skipped: a redeploy holds %s", path, lockPath)
			rep.busy = append(rep.busy, path)
			continue
		}
		p.trim(path, p.imageCutoff, rep)
		lk.Unlock()
	}
}

// tryImageLock takes an image's redeploy lock without waiting. held reports that another process
// has it. A missing lock file is created, as run-task would, except on a dry run, where no file
// may appear and a missing lock counts as free.
func (p *pruner) tryImageLock(path string) (lk *fileLock, held bool, err error) {
	fi, ok, err := regularFile(path)
	switch {
	case err != nil:
		return nil, false, err
	case fi != nil && !ok:
		return nil, false, errors.New("not a regular file (a symlink?)")
	case fi == nil && p.dryRun:
		return nil, false, nil
	case fi == nil:
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return nil, false, err
		}
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
		if err != nil {
			return nil, false, err
		}
		f.Close()
	}
	lk, ok, err = tryLockFile(path)
	if err != nil {
		return nil, false, err
	}
	return lk, !ok, nil
}

// trim drops the timestamps before cutoff and the unreadable lines from a log, replacing it
// atomically, or deletes it when nothing is left.
func (p *pruner) trim(path string, cutoff int64, rep *pruneReport) {
	data, err := os.ReadFile(path)
	if err != nil {
		rep.fail(p.log, "%v", err)
		return
	}
	ts, bad := parseTimestamps(data)
	kept := ts[:0:0]
	for _, t := range ts {
		if t >= cutoff {
			kept = append(kept, t)
		}
	}
	dropped := len(ts) - len(kept) + bad
	if len(kept) == 0 {
		if !p.dryRun {
			if err := os.Remove(path); err != nil {
				rep.fail(p.log, "%v", err)
				return
			}
		}
		rep.entries += dropped
		rep.removedDBs++
		return
	}
	if dropped == 0 {
		return
	}
	if !p.dryRun {
		if err := writeFileAtomic(path, formatTimestamps(kept), 0o600); err != nil {
			rep.fail(p.log, "rewrite %s: %v", path, err)
			return
		}
	}
	rep.entries += dropped
}

// pruneLocks deletes github-image-locks/*.lock files not modified since the cutoff, each only
// while holding it: a lock a redeploy holds stays.
func (p *pruner) pruneLocks(rep *pruneReport) {
	dir := filepath.Join(p.stateDir, "github-image-locks")
	for _, e := range p.realDir(dir, rep) {
		name := e.Name()
		if strings.HasPrefix(name, ".") || !strings.HasSuffix(name, ".lock") {
			continue
		}
		path := filepath.Join(dir, name)
		fi, ok, err := p.checkRegular(path, rep)
		if !ok || err != nil || !fi.ModTime().Before(p.cutoff) {
			continue
		}
		lk, free, err := tryLockFile(path)
		if err != nil {
			rep.fail(p.log, "lock %s: %v", path, err)
			continue
		}
		if !free {
			p.log.infof("prune-state: %s kept: a redeploy holds it", path)
			rep.busy = append(rep.busy, path)
			continue
		}
		if !p.dryRun {
			if err := os.Remove(path); err != nil {
				lk.Unlock()
				rep.fail(p.log, "%v", err)
				continue
			}
		}
		lk.Unlock()
		rep.removedLocks++
	}
}

// reTempFile matches the temp files of writeFileAtomic (os.CreateTemp's "*" is digits).
var reTempFile = regexp.MustCompile(`^\..+\.tmp-[0-9]+$`)

// pruneTemps deletes temp files an interrupted writeFileAtomic left, once they are older than the
// cutoff; a younger one may belong to a write in progress.
func (p *pruner) pruneTemps(dir string, rep *pruneReport) {
	for _, e := range p.realDir(dir, rep) {
		if !reTempFile.MatchString(e.Name()) {
			continue
		}
		path := filepath.Join(dir, e.Name())
		fi, ok, err := regularFile(path)
		if err != nil || !ok || !fi.ModTime().Before(p.cutoff) {
			continue
		}
		if !p.dryRun {
			if err := os.Remove(path); err != nil {
				rep.fail(p.log, "%v", err)
				continue
			}
		}
		rep.removedTemp++
	}
}
