// ratelimit.go owns the state directory's timestamp logs and lock files: the global
// /auto-update limiter (ratelimit.db + ratelimit.lock), the per-image redeploy limit
// (github-image-limits/<key>.db) and the per-image redeploy lock (github-image-locks/<key>.lock).
//
// Rules: a timestamp log is one unix timestamp per line, the original tool's format. It is only
// ever replaced whole (temp file in the same directory, fsync, rename, fsync of the directory),
// so a crash leaves the old or the new content, never a torn or empty file. A line that does not
// parse is skipped, never fatal. Read-modify-write of a log happens under syscall.Flock of a
// separate, stable lock file (the log itself is replaced, so it cannot carry the lock), and every
// lock wait is bounded.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// window is a sliding-window rate limit: at most count events within span.
type window struct {
	count int
	span  time.Duration
}

// errLockTimeout reports a lock that another process held for longer than the caller waits.
var errLockTimeout = errors.New("timed out waiting for the lock")

// imageKey turns an image reference into a file name: lowercased, and every character outside
// [a-z0-9._-] replaced by "_", as the original tool named its per-image files. A valid reference
// can be longer than a file name may be (255 bytes): see fitKey.
func imageKey(image string) string {
	b := []byte(strings.ToLower(image))
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			b[i] = '_'
		}
	}
	return fitKey(string(b), strings.ToLower(image))
}

// maxKeyLen bounds a state file's key, leaving room in a 255-byte file name for its suffix.
const maxKeyLen = 200

// fitKey returns key when it is at most maxKeyLen bytes; a longer key keeps its first part and
// ends in the SHA-256 of whole (what the key was made from), so it stays unique.
func fitKey(key, whole string) string {
	if len(key) <= maxKeyLen {
		return key
	}
	sum := sha256.Sum256([]byte(whole))
	return key[:maxKeyLen-1-2*len(sum)] + "_" + hex.EncodeToString(sum[:])
}

func imageLimitPath(stateDir, image string) string {
	return filepath.Join(stateDir, "github-image-limits", imageKey(image)+".db")
}

func imageLockPath(stateDir, image string) string {
	return filepath.Join(stateDir, "github-image-locks", imageKey(image)+".lock")
}

// unitLockPath is the lock that keeps redeploys of one unit one at a time, whatever image or tag
// each pulls. It sits with the image locks, so prune-state treats it like them; no image key
// contains "@", so the names never meet. A unit name is at most 255 bytes, hence the hash when
// the file name would be longer.
func unitLockPath(stateDir, unit string) string {
	return filepath.Join(stateDir, "github-image-locks", fitKey("unit@"+unit, unit)+".lock")
}

// parseTimestamps reads a timestamp log; it returns the valid timestamps in file order and how
// many lines were skipped as corrupt.
func parseTimestamps(data []byte) (ts []int64, bad int) {
	for _, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		n, err := strconv.ParseInt(line, 10, 64)
		if err != nil || n < 0 {
			bad++
			continue
		}
		ts = append(ts, n)
	}
	return ts, bad
}

// readTimestamps reads a timestamp log; a missing file is an empty log.
func readTimestamps(path string) (ts []int64, bad int, err error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, 0, nil
	}
	if err != nil {
		return nil, 0, err
	}
	ts, bad = parseTimestamps(data)
	return ts, bad, nil
}

// writeFileAtomic replaces path with data so that readers and a crash see either the old or the
// new content: temp file in the same directory, fsync, rename, fsync of the directory.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // a no-op after the rename
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func formatTimestamps(ts []int64) []byte {
	var b strings.Builder
	for _, t := range ts {
		b.WriteString(strconv.FormatInt(t, 10))
		b.WriteByte('\n')
	}
	return []byte(b.String())
}

// fileLock is an exclusive flock(2) on a lock file; the kernel drops it when the process dies.
type fileLock struct{ f *os.File }

// lockFile waits up to timeout (or until ctx ends) for an exclusive lock on path, creating the
// file and its directory when missing. prune-state may delete a lock file that nobody holds; a
// waiter that then gets the lock on the deleted file notices (the path no longer names the file
// it locked) and starts over on the new one.
func lockFile(ctx context.Context, path string, timeout time.Duration) (*fileLock, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(timeout)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	for wait := time.Millisecond; ; wait = min(wait*2, 50*time.Millisecond) {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			held, statErr := f.Stat()
			named, pathErr := os.Stat(path)
			if statErr == nil && pathErr == nil && os.SameFile(held, named) {
				return &fileLock{f: f}, nil
			}
			// Deleted (or replaced) while we waited: lock the file the path names now.
			f.Close()
			if f, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600); err != nil {
				return nil, err
			}
			continue
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w (%s)", path, errLockTimeout, timeout)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, ctx.Err())
		case <-time.After(wait):
		}
	}
}

// tryLockFile takes the lock only if it is free at once; it never creates the file.
func tryLockFile(path string) (*fileLock, bool, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, false, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, false, nil
		}
		return nil, false, err
	}
	return &fileLock{f: f}, true, nil
}

func (l *fileLock) Unlock() {
	if l != nil && l.f != nil {
		syscall.Flock(int(l.f.Fd()), syscall.LOCK_UN)
		l.f.Close()
		l.f = nil
	}
}

// limiter is a sliding-window limiter over a timestamp log. Every window must have room for a
// new event; the log keeps only what the longest window can still count.
type limiter struct {
	logPath     string
	lockPath    string // empty: the caller already holds a lock that covers logPath
	windows     []window
	lockTimeout time.Duration
	now         func() time.Time
}

// decision is a limiter's answer.
type decision struct {
	allowed    bool
	retryAfter time.Duration // when refused: until the oldest counted event leaves its window
	counts     []int         // events in each window before this one
	skipped    int           // corrupt lines dropped from the log
}

// take records one event now if every window has room, and reports the decision.
func (l *limiter) take(ctx context.Context) (decision, error) {
	return l.do(ctx, true)
}

// check reports whether take would succeed, changing nothing.
func (l *limiter) check(ctx context.Context) (decision, error) {
	return l.do(ctx, false)
}

func (l *limiter) do(ctx context.Context, record bool) (decision, error) {
	if l.lockPath != "" && record {
		lk, err := lockFile(ctx, l.lockPath, l.lockTimeout)
		if err != nil {
			return decision{}, err
		}
		defer lk.Unlock()
	}
	ts, bad, err := readTimestamps(l.logPath)
	if err != nil {
		return decision{}, err
	}
	now := l.now().Unix()
	d := decision{allowed: true, skipped: bad}
	var longest int64
	for _, w := range l.windows {
		span := int64(w.span / time.Second)
		longest = max(longest, span)
		var in []int64
		for _, t := range ts {
			if t > now-span && t <= now {
				in = append(in, t)
			}
		}
		d.counts = append(d.counts, len(in))
		if len(in) >= w.count {
			d.allowed = false
			sort.Slice(in, func(i, j int) bool { return in[i] < in[j] })
			// The window frees a slot when its len(in)-count+1'th oldest event leaves it.
			free := in[len(in)-w.count] + span - now
			d.retryAfter = max(d.retryAfter, time.Duration(max(free, 1))*time.Second)
		}
	}
	if !record || !d.allowed {
		return d, nil
	}
	kept := ts[:0:0]
	for _, t := range ts {
		if t > now-longest {
			kept = append(kept, t)
		}
	}
	kept = append(kept, now)
	if err := writeFileAtomic(l.logPath, formatTimestamps(kept), 0o600); err != nil {
		return decision{}, fmt.Errorf("write %s: %w", l.logPath, err)
	}
	return d, nil
}

// autoUpdateLimiter is the global two-window limiter of /auto-update.
func autoUpdateLimiter(cfg *config) *limiter {
	return &limiter{
		logPath:     filepath.Join(cfg.stateDir, "ratelimit.db"),
		lockPath:    filepath.Join(cfg.stateDir, "ratelimit.lock"),
		windows:     cfg.autoUpdateLimits[:],
		lockTimeout: 2 * time.Second,
		now:         time.Now,
	}
}

// imageLimiter is the per-image redeploy limit. Its log is written only by run-task while it
// holds the image's redeploy lock, so it needs no lock of its own; readers (the webhook's early
// check) only ever see a whole file.
func imageLimiter(cfg *config, image string) *limiter {
	return &limiter{
		logPath: imageLimitPath(cfg.stateDir, image),
		windows: []window{cfg.imageLimit},
		now:     time.Now,
	}
}
