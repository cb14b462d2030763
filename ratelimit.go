// ratelimit.go owns the state directory's timestamp logs (one unix timestamp per line, the
// original tool's format; a line that does not parse is skipped) and lock files. A log is only
// replaced whole (writeFileAtomic), under flock(2) of a separate lock file since the log itself
// is replaced, and every lock wait is bounded.
package main

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type window struct {
	count int
	span  time.Duration
}

var errLockTimeout = errors.New("timed out waiting for the lock")

// maxKeyLen bounds a state file's key, leaving room in a 255-byte file name for its suffix.
const maxKeyLen = 200

// imageKey turns an image reference into a file name, as the original tool named its files.
func imageKey(image string) string {
	b := []byte(strings.ToLower(image))
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			b[i] = '_'
		}
	}
	return fitKey(string(b), strings.ToLower(image))
}

// fitKey shortens a key over maxKeyLen, ending it in the SHA-256 of whole so it stays unique.
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

// unitLockPath serializes a unit's redeploys, among the image locks ("@" is in no image key).
func unitLockPath(stateDir, unit string) string {
	return filepath.Join(stateDir, "github-image-locks", fitKey("unit@"+unit, unit)+".lock")
}

func parseTimestamps(data []byte) (ts []int64, bad int) {
	for _, line := range strings.Split(string(data), "\n") {
		if line = strings.TrimSpace(line); line == "" {
			continue
		}
		if n, err := strconv.ParseInt(line, 10, 64); err == nil && n >= 0 {
			ts = append(ts, n)
		} else {
			bad++
		}
	}
	return ts, bad
}

func readTimestamps(path string) (ts []int64, bad int, err error) {
	data, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, 0, err
	}
	ts, bad = parseTimestamps(data)
	return ts, bad, nil
}

// writeFileAtomic replaces path so that readers and a crash see either the old or the new content.
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
	// Every step runs (Close must); the first failure is returned and the temp file removed.
	_, err = tmp.Write(data)
	if err = cmp.Or(err, tmp.Chmod(perm), tmp.Sync(), tmp.Close()); err != nil {
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
	var b []byte
	for _, t := range ts {
		b = append(strconv.AppendInt(b, t, 10), '\n')
	}
	return b
}

// fileLock is an exclusive flock(2) on a lock file; the kernel drops it when the process dies.
type fileLock struct{ f *os.File }

// lockFile waits up to timeout (or until ctx ends) for the lock on path, creating the file. As
// prune-state may delete a lock file nobody holds, a lock counts only on the file path still names.
func lockFile(ctx context.Context, path string, timeout time.Duration) (*fileLock, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(timeout)
	for wait := time.Millisecond; ; wait = min(wait*2, 50*time.Millisecond) {
		lk, free, err := tryLockFile(path, os.O_CREATE)
		switch {
		case errors.As(err, new(*os.PathError)): // the open failed, not flock
			return nil, err
		case err != nil && !errors.Is(err, syscall.EINTR):
			return nil, fmt.Errorf("lock %s: %w", path, err)
		case free:
			held, statErr := lk.f.Stat()
			named, pathErr := os.Stat(path)
			if statErr == nil && pathErr == nil && os.SameFile(held, named) {
				return lk, nil
			}
			lk.Unlock()
			continue
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("lock %s: %w (%s)", path, errLockTimeout, timeout)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("lock %s: %w", path, ctx.Err())
		case <-time.After(wait):
		}
	}
}

// tryLockFile takes the lock only if it is free at once; only flag os.O_CREATE creates the file.
func tryLockFile(path string, flag int) (*fileLock, bool, error) {
	f, err := os.OpenFile(path, os.O_RDWR|flag, 0o600)
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

// limiter admits an event when every window has room; its log keeps what the longest can count.
type limiter struct {
	logPath     string
	lockPath    string // empty: the caller already holds a lock that covers logPath
	windows     []window
	lockTimeout time.Duration
	now         func() time.Time
}

type decision struct {
	allowed    bool
	retryAfter time.Duration // when refused: until the oldest counted event leaves its window
	counts     []int         // events in each window before this one
	skipped    int           // corrupt lines dropped from the log
}

func (l *limiter) take(ctx context.Context) (decision, error) { return l.do(ctx, true) }

// check reports whether take would succeed, changing nothing.
func (l *limiter) check(ctx context.Context) (decision, error) { return l.do(ctx, false) }

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
		in := slices.DeleteFunc(slices.Clone(ts), func(t int64) bool { return t <= now-span || t > now })
		d.counts = append(d.counts, len(in))
		if len(in) >= w.count {
			d.allowed = false
			slices.Sort(in)
			// The window frees a slot when its len(in)-count+1'th oldest event leaves it.
			free := in[len(in)-w.count] + span - now
			d.retryAfter = max(d.retryAfter, time.Duration(max(free, 1))*time.Second)
		}
	}
	if !record || !d.allowed {
		return d, nil
	}
	kept := slices.DeleteFunc(ts, func(t int64) bool { return t <= now-longest })
	if err := writeFileAtomic(l.logPath, formatTimestamps(append(kept, now)), 0o600); err != nil {
		return decision{}, fmt.Errorf("write %s: %w", l.logPath, err)
	}
	return d, nil
}

func autoUpdateLimiter(cfg *config) *limiter {
	return &limiter{logPath: filepath.Join(cfg.stateDir, "ratelimit.db"), lockPath: filepath.Join(cfg.stateDir, "ratelimit.lock"),
		windows: cfg.autoUpdateLimits[:], lockTimeout: 2 * time.Second, now: time.Now}
}

// imageLimiter is the per-image redeploy limit, unlocked: only run-task writes it, under the redeploy lock.
func imageLimiter(cfg *config, image string) *limiter {
	return &limiter{logPath: imageLimitPath(cfg.stateDir, image), windows: []window{cfg.imageLimit}, now: time.Now}
}
