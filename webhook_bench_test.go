// webhook_bench_test.go benchmarks webhook.go's routes: a GitHub delivery (queued, ignored, tag
// mismatch), a registry push, a burst of deliveries and /health.
package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Benchmarks of the request path. Run them with
//
//	go test -run '^$' -bench . -benchtime 200ms .
//
// systemctl is /bin/true here: configuredImage runs "systemctl --user show" through runCommand,
// which a test cannot swap (only dispatch goes through s.exec), so a delivery that reaches the
// Quadlet match always costs one process start. /bin/true prints nothing, which reads as a unit
// with no Quadlet file, so the first pushed tag is used.

// benchServer is the server of newTestServer with dispatch stubbed and /bin/true as systemctl.
func benchServer(b *testing.B, quadletImage string) *testServer {
	b.Helper()
	bin := b.TempDir()
	if err := os.Symlink("/bin/true", filepath.Join(bin, "systemctl")); err != nil {
		b.Fatal(err)
	}
	b.Setenv("PATH", bin)
	ts := newTestServer(b, map[string]string{"GITHUB_WEBHOOK_SECRET": advSecret}, nil)
	home := b.TempDir()
	if quadletImage != "" {
		dir := filepath.Join(home, ".config", "containers", "systemd")
		os.MkdirAll(dir, 0o700)
		if err := os.WriteFile(filepath.Join(dir, "web.container"), []byte("[Container]\nImage="+quadletImage+"\n"), 0o600); err != nil {
			b.Fatal(err)
		}
	}
	ts.srv.getenv = mapEnv(map[string]string{"HOME": home})
	ts.srv.exec = func(ctx context.Context, timeout time.Duration, argv ...string) cmdResult {
		return cmdResult{argv: argv}
	}
	return ts
}

func benchDeliveries(b *testing.B, quadletImage string, body []byte, want int, wantText string) {
	ts := benchServer(b, quadletImage)
	sig := hubSignature(advSecret, body)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		req := httptest.NewRequest("POST", advUnitPath, bytes.NewReader(body))
		req.Header.Set("X-Hub-Signature-256", sig)
		req.Header.Set("X-GitHub-Event", "package")
		req.Header.Set("X-GitHub-Delivery", "bench-"+strconv.Itoa(i))
		rec := httptest.NewRecorder()
		ts.srv.ServeHTTP(rec, req)
		if rec.Code != want || !strings.Contains(rec.Body.String(), wantText) {
			b.Fatalf("%d %q, want %d %q", rec.Code, rec.Body, want, wantText)
		}
	}
}

// BenchmarkGitHubDelivery: a signed delivery through the whole handler (signature, payload,
// the unit lookup, reused for 2 s, per-image limit check, the claim committed in SQLite) up to
// its 202; the dispatcher is not running.
func BenchmarkGitHubDelivery(b *testing.B) {
	benchDeliveries(b, "", githubPackagePayload("ghcr.io", "octo-org", "web", "v1", ""), 202, "auto-update queued")
}

// BenchmarkRegistryPush: a Distribution envelope (a blob push and a tagged manifest push, as
// podman push sends them) through the whole handler, up to its 202, for the unit whose Quadlet
// file names the pushed image: beside BenchmarkGitHubDelivery, what the bearer check and the
// envelope cost instead of the HMAC and GitHub's payload.
func BenchmarkRegistryPush(b *testing.B) {
	ts := benchServer(b, "reg.example:5000/e2e/app:latest")
	ts.cfg.secrets["distribution"] = advRegistryToken
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		id := "bench-" + strconv.Itoa(i)
		body := distEnvelope(distEvent(id+"-blob", "push", "application/octet-stream", "e2e/app", "", "reg.example:5000"),
			distEvent(id, "push", manifestV2, "e2e/app", "latest", "reg.example:5000"))
		req := httptest.NewRequest("POST", "/registry/distribution/web", bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+advRegistryToken)
		rec := httptest.NewRecorder()
		ts.srv.ServeHTTP(rec, req)
		if rec.Code != 202 || !strings.Contains(rec.Body.String(), "auto-update queued") {
			b.Fatalf("%d %q, want 202 auto-update queued", rec.Code, rec.Body)
		}
	}
}

// BenchmarkGitHubIgnored: a signed delivery of an npm package, acknowledged and ignored.
func BenchmarkGitHubIgnored(b *testing.B) {
	body, err := os.ReadFile(filepath.Join("testdata", "payloads", "package-published-npm.json"))
	if err != nil {
		b.Fatal(err)
	}
	benchDeliveries(b, "", body, 202, "not-container")
}

// BenchmarkGitHubTagMismatch: a signed delivery that passes every check but the last and is
// answered 202 "tag mismatch" (the unit's Quadlet file names another tag): the request path's
// whole cost short of the claim, the load run's "ignored after every check".
func BenchmarkGitHubTagMismatch(b *testing.B) {
	benchDeliveries(b, "ghcr.io/octo-org/web:latest", githubPackagePayload("ghcr.io", "octo-org", "web", "v9", ""), 202, "tag mismatch")
}

// BenchmarkDeliveryBurst: 32 clients send signed deliveries with unique ids for one image over
// loopback HTTP, with the dispatcher running (systemd-run stubbed; the task it starts keeps the
// unit busy, as a real one would for seconds). It reports the answer time's median and 99th
// percentile, and the tasks started (the queue starts one per unit at a time).
func BenchmarkDeliveryBurst(b *testing.B) {
	ts := benchServer(b, "")
	var started atomic.Int64
	ts.srv.exec = func(ctx context.Context, timeout time.Duration, argv ...string) cmdResult {
		started.Add(1)
		return cmdResult{argv: argv}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); ts.srv.runDispatcher(ctx) }()
	defer func() { cancel(); <-done }()
	body := githubPackagePayload("ghcr.io", "octo-org", "web", "v1", "")
	sig := hubSignature(advSecret, body)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	defer client.CloseIdleConnections()
	var (
		id   atomic.Int64
		mu   sync.Mutex
		took []time.Duration
	)
	b.SetParallelism(max(1, 32/runtime.GOMAXPROCS(0)))
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		var mine []time.Duration
		for pb.Next() {
			req, _ := http.NewRequest("POST", ts.URL+advUnitPath, bytes.NewReader(body))
			req.Header.Set("X-Hub-Signature-256", sig)
			req.Header.Set("X-GitHub-Event", "package")
			req.Header.Set("X-GitHub-Delivery", fmt.Sprintf("burst-%d", id.Add(1)))
			t0 := time.Now()
			resp, err := client.Do(req)
			if err != nil {
				b.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			mine = append(mine, time.Since(t0))
			if resp.StatusCode != 202 {
				b.Errorf("delivery answered %d, want 202", resp.StatusCode)
				return
			}
		}
		mu.Lock()
		took = append(took, mine...)
		mu.Unlock()
	})
	b.StopTimer()
	slices.Sort(took)
	if len(took) > 0 {
		b.ReportMetric(float64(took[len(took)/2].Microseconds())/1000, "p50-ms")
		b.ReportMetric(float64(took[len(took)*99/100].Microseconds())/1000, "p99-ms")
	}
	b.ReportMetric(float64(started.Load()), "tasks")
}

// BenchmarkHealth compares GET /health of the server (request id, body cap, routing, metrics
// and the probe summary) with a bare net/http handler answering "ok", both called directly and
// over loopback HTTP with keep-alive.
func BenchmarkHealth(b *testing.B) {
	ts := newTestServer(b, nil, nil)
	bare := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok")) })
	for _, h := range []struct {
		name string
		h    http.Handler
	}{{"server", ts.srv}, {"bare", bare}} {
		b.Run("handler/"+h.name, func(b *testing.B) {
			req := httptest.NewRequest("GET", "/health", nil)
			b.ReportAllocs()
			for b.Loop() {
				rec := httptest.NewRecorder()
				h.h.ServeHTTP(rec, req)
				if rec.Code != 200 {
					b.Fatal(rec.Code)
				}
			}
		})
		b.Run("loopback/"+h.name, func(b *testing.B) {
			srv := httptest.NewServer(h.h)
			defer srv.Close()
			client := srv.Client()
			b.ReportAllocs()
			for b.Loop() {
				resp, err := client.Get(srv.URL + "/health")
				if err != nil {
					b.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					b.Fatal(resp.StatusCode)
				}
			}
		})
	}
}
