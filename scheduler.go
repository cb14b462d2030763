// scheduler.go owns the triggers and a person's decisions: the scheduler loop, trigger-units,
// trigger-all, /auto-update, /api/manual/*, approve/reject/retry (CLI and API), and the image check
// (server loop and check command). Ticks follow start + n·interval, never overlap, skip overrun
// slots; a manual restart holds the unit's lock; HTTP commands run detached; caller text passes
// cleanText. Checks run one at a time, bounded; a failed one is stored, retried with backoff.
package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"maps"
	"net/http"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode"
)

// minSchedulerInterval is the shortest interval the scheduler accepts; a variable for tests.
var minSchedulerInterval = 60 * time.Second

const usageScheduler = `usage: webhook-auto-update scheduler [--interval SECS] [--max-iterations N] [--state-dir DIR] [--db URL]

Starts MANUAL_AUTO_UPDATE_UNIT (default podman-auto-update.service) at once and then every
--interval seconds (default AUTO_UPDATE_INTERVAL_SECS or 900; at least 60), until SIGTERM or
SIGINT, or until --max-iterations ticks have run (default WEBHOOK_SCHEDULER_MAX_TICKS, unbounded).
Each tick waits for systemctl and writes an event_log row (action "scheduler").

Exit status: 0 when every tick succeeded or the scheduler was stopped by a signal, 1 when a tick
failed in a run bounded by --max-iterations, 2 usage error.
`

func cmdScheduler(c *cli, args []string) int {
	var intervalSecs, maxTicks int
	cfg, code := c.setupNoArgs("scheduler", usageScheduler, args, func(fs *flag.FlagSet, cfg *config) {
		intervalSecs, maxTicks = int(cfg.interval/time.Second), cfg.maxTicks
		fs.Var(positiveInt{&intervalSecs}, "interval", "")
		fs.Var(positiveInt{&maxTicks}, "max-iterations", "")
	})
	if code >= 0 {
		return code
	}
	unit, err := resolveUnit(cfg.autoUpdateUnit)
	if err != nil {
		c.log.errorf("invalid MANUAL_AUTO_UPDATE_UNIT: %v", err)
		return 2
	}
	interval := time.Duration(intervalSecs) * time.Second
	if interval < minSchedulerInterval {
		c.log.warnf("interval %s is below the minimum: using %s", interval, minSchedulerInterval)
		interval = minSchedulerInterval
	}
	// A tick waits for a oneshot's whole run, so systemctl may take up to the interval.
	tickCfg := *cfg
	tickCfg.commandTimeout = max(cfg.commandTimeout, interval)
	events, closeLog := openCommandLog(c, cfg)
	defer closeLog()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	s := &scheduler{unit: unit, interval: interval, maxTicks: maxTicks, log: c.log, now: time.Now, sleep: sleepContext,
		tick:   func(ctx context.Context) cmdResult { return startUnit(ctx, &tickCfg, unit) },
		record: func(ev event) { writeCommandEvent(c.log, events, ev) },
		housekeep: func(ctx context.Context) {
			if events == nil {
				return
			}
			if _, err := events.deleteOlderThan(ctx, time.Now().Add(-cfg.requestRetention), false, true); err != nil && ctx.Err() == nil {
				c.log.warnf("scheduler: cannot delete request rows older than WEBHOOK_REQUEST_RETENTION_DAYS: %v", err)
			}
			if _, err := events.deleteRequestsBeyond(ctx, cfg.requestRowsMax, false); err != nil && ctx.Err() == nil {
				c.log.warnf("scheduler: cannot delete request rows beyond WEBHOOK_REQUEST_ROWS_MAX: %v", err)
			}
		},
	}
	bound := map[bool]string{true: "until stopped", false: fmt.Sprintf("for %d iterations", maxTicks)}[maxTicks <= 0]
	c.log.infof("scheduler: starting %s every %s, %s", unit, interval, bound)
	return s.run(ctx)
}

// scheduler starts a unit on a fixed schedule; its clock, sleep and actions are values for tests.
type scheduler struct {
	unit      string
	interval  time.Duration
	maxTicks  int // 0: unbounded
	log       *logger
	now       func() time.Time
	sleep     func(ctx context.Context, d time.Duration) error // returns early with ctx.Err()
	tick      func(ctx context.Context) cmdResult
	record    func(event)
	housekeep func(ctx context.Context) // after each tick: enforce the event log's retention
}

// run ticks at start + n·interval until ctx ends or maxTicks ticks ran, returning the exit status.
func (s *scheduler) run(ctx context.Context) int {
	start := s.now()
	failed := 0
	var slot int64
	for iteration := 1; ; iteration++ {
		if ctx.Err() != nil {
			s.log.infof("scheduler: stopped after %d iterations", iteration-1)
			return 0
		}
		began := s.now()
		res := s.tick(ctx)
		status, code := "ok", http.StatusAccepted
		switch {
		case res.err != nil && ctx.Err() != nil:
			status, code = "interrupted", http.StatusServiceUnavailable
		case res.err != nil:
			status, code = failStatus(res), http.StatusInternalServerError
		}
		meta := map[string]any{"iteration": iteration, "slot": slot, "unit": s.unit, "status": status,
			"interval_secs": int64(s.interval / time.Second)}
		if res.err != nil {
			meta["exit_code"], meta["stderr"], meta["error"] = res.exitCode, res.stderr, res.err.Error()
		}
		s.record(event{RequestID: newRequestID(), TS: s.now(), Method: "SCHEDULER", Status: code,
			Action: "scheduler", Duration: s.now().Sub(began), Meta: meta})
		if s.housekeep != nil {
			s.housekeep(ctx)
		}
		switch status {
		case "interrupted":
			s.log.infof("scheduler: stopped during iteration %d", iteration)
			return 0
		case "ok":
			s.log.infof("scheduler: iteration %d: started %s", iteration, s.unit)
		default:
			failed++
			s.log.errorf("scheduler: iteration %d: %v", iteration, res.err)
		}
		if s.maxTicks > 0 && iteration >= s.maxTicks {
			return min(failed, 1)
		}
		next := slot + 1
		if elapsed := s.now().Sub(start); time.Duration(next)*s.interval < elapsed {
			next = int64((elapsed + s.interval - 1) / s.interval)
			s.log.warnf("scheduler: iteration %d overran its interval, skipping %d missed slots", iteration, next-slot-1)
		}
		slot = next
		s.sleep(ctx, start.Add(time.Duration(slot)*s.interval).Sub(s.now())) // interrupted: ctx.Err() at the top
	}
}

// sleepContext waits d or until ctx ends, returning ctx.Err().
func sleepContext(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
	return ctx.Err()
}

// openCommandLog opens a command's event log and its closer; none (nil): rows go to stderr.
func openCommandLog(c *cli, cfg *config) (events *eventLog, closeLog func()) {
	err := ensureStateDir(cfg.stateDir)
	if err == nil {
		if events, err = openEventLog(cfg.dbPath, c.log); err == nil {
			return events, func() { events.Close() }
		}
	}
	c.log.warnf("event log unavailable, events go to stderr: %v", err)
	return nil, func() {}
}

// writeCommandEvent commits one row before it returns, or prints it to stderr with no event log.
func writeCommandEvent(lg *logger, events *eventLog, ev event) {
	if events == nil {
		lg.warnf("unwritten event: %s", marshalJSON(map[string]any{"request_id": ev.RequestID,
			"ts": ev.TS.Unix(), "method": ev.Method, "path": ev.Path, "status": ev.Status,
			"action": ev.Action, "duration_ms": ev.Duration.Milliseconds(), "meta": ev.Meta}))
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*busyTimeout)
	defer cancel()
	events.Write(ctx, ev)
}

const usageTriggerUnits = `usage: webhook-auto-update trigger-units [flags] <unit>...

Restarts the named units now, one after the other (the auto-update unit is started instead, so a
running update is never cut short), and prints one "unit -> status" line per unit, followed by an
indented message when there is one. A unit is written foo, foo.service, foo/redeploy or
github-package-update/foo.

flags:
  --units a,b      more units, comma-separated
  --all            also the auto-update unit and WEBHOOK_MANUAL_UNITS
  --dry-run        print what would be done and run nothing
  --caller NAME    who asked, stored in the event log (default "cli")
  --reason TEXT    why, stored in the event log
  --state-dir DIR, --db URL

Statuses: triggered, dry-run, failed (systemctl exited non-zero), error (systemctl could not
run), invalid (not a unit name; never run).
Exit status: 0 every unit triggered, 1 a unit failed, 2 usage error or nothing valid to trigger.
`

const usageTriggerAll = `usage: webhook-auto-update trigger-all [--dry-run] [--caller NAME] [--reason TEXT]

Starts MANUAL_AUTO_UPDATE_UNIT and restarts every unit of WEBHOOK_MANUAL_UNITS now, and prints
one "unit -> status" line per unit, as trigger-units does.
Exit status: 0 every unit triggered, 1 a unit failed, 2 usage error or nothing valid to trigger.
`

// cmdTrigger runs trigger-units or trigger-all, prints the results and writes the cli-trigger row.
func cmdTrigger(c *cli, args []string, command, usage string) int {
	var dryRun, all bool
	var caller, reason string
	var more []string
	cfg, rest, code := c.setup(command, usage, args, func(fs *flag.FlagSet, cfg *config) {
		fs.BoolVar(&dryRun, "dry-run", false, "")
		fs.StringVar(&caller, "caller", "cli", "")
		fs.StringVar(&reason, "reason", "", "")
		if command == "trigger-units" {
			fs.BoolVar(&all, "all", false, "")
			fs.Func("units", "", func(s string) error { more = append(more, splitList(s)...); return nil })
		}
	})
	if code >= 0 {
		return code
	}
	ids := append(rest, more...)
	switch {
	case command == "trigger-all" && len(rest) > 0:
		return c.usageError(command, usage, "unexpected argument %q (use trigger-units to name units)", rest[0])
	case command == "trigger-all":
		all = true
	case len(ids) == 0 && !all:
		return c.usageError(command, usage, "nothing to trigger: name units, or use --all or trigger-all")
	}
	caller, reason = cleanText(caller, manualTextMax), cleanText(reason, manualTextMax)
	events, closeLog := openCommandLog(c, cfg)
	defer closeLog()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	start := time.Now()
	results := triggerUnits(ctx, cfg, ids, all, dryRun)
	for _, r := range results {
		fmt.Fprintf(c.stdout, "%s -> %s\n", r.Unit, r.Status)
		if r.Message != "" {
			fmt.Fprintf(c.stdout, "    %s\n", strings.ReplaceAll(strings.TrimSpace(r.Message), "\n", "\n    "))
		}
	}
	status := triggerStatus(results)
	exit := map[int]int{http.StatusBadRequest: 2, http.StatusMultiStatus: 1}[status]
	if exit == 2 {
		c.log.errorf("%s: nothing valid to trigger", command)
	}
	requested := make([]string, 0, len(ids))
	for _, id := range ids {
		requested = append(requested, cleanText(id, maxUnitNameLen))
	}
	writeCommandEvent(c.log, events, event{RequestID: newRequestID(), TS: time.Now(), Method: "CLI",
		Status: status, Action: "cli-trigger", Duration: time.Since(start), Meta: map[string]any{
			"command": command, "caller": caller, "reason": reason, "dry_run": dryRun, "all": all,
			"requested": requested, "units": results}})
	return exit
}

const usageDecide = `usage: webhook-auto-update approve|reject DELIVERY [--caller NAME] [--reason TEXT]

Approves (or rejects) a delivery awaiting approval, with the deliveries of its unit and image
waiting with it, and stores who and why in the event log. A running server's dispatcher sees an
approval within 30 s. Exit status: 0 done, 1 not awaiting approval or failed, 2 usage error.
`

func cmdDecide(c *cli, args []string, decision string) int {
	var caller, reason string
	cfg, rest, code := c.setup(decision, usageDecide, args, func(fs *flag.FlagSet, cfg *config) {
		fs.StringVar(&caller, "caller", "cli", "")
		fs.StringVar(&reason, "reason", "", "")
	})
	if code >= 0 {
		return code
	}
	if len(rest) != 1 || !reDeliveryID.MatchString(rest[0]) {
		return c.usageError(decision, usageDecide, "name one delivery id")
	}
	events, err := openEventLog(cfg.dbPath, c.log)
	if err != nil {
		c.log.errorf("%s: %v", decision, err)
		return 1
	}
	defer events.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*busyTimeout)
	defer cancel()
	n, err := events.decideClaim(ctx, rest[0], decision, event{RequestID: newRequestID(), TS: time.Now(), Method: "CLI",
		Status: http.StatusOK, Action: "decision", Meta: map[string]any{"decision": decision,
			"caller": cleanText(caller, manualTextMax), "reason": cleanText(reason, manualTextMax)}})
	switch {
	case err != nil:
		c.log.errorf("%s of delivery %s: %v", decision, rest[0], err)
	case n == 0:
		c.log.errorf("delivery %s is not awaiting approval", rest[0])
	default:
		fmt.Fprintf(c.stdout, "%s -> %s (%d deliveries)\n", rest[0], map[string]string{"approve": "approved", "reject": "rejected"}[decision], n)
		return 0
	}
	return 1
}

// manualTextMax caps a manual trigger's caller and reason, manualUnitsMax the units it names.
const (
	manualTextMax  = 200
	manualUnitsMax = 256
)

// manualRequest reads a body into v and checks the manual token (Bearer first, else the body's,
// cleared) or takes a trusted proxy's user, returned as the caller. false: it has answered.
func (s *server) manualRequest(w http.ResponseWriter, r *http.Request, v any, bodyToken *string) (user string, ok bool) {
	user, refused := s.forwardedUser(r)
	if s.cfg.manualToken == "" && user == "" {
		s.log.warnf("%s refused: neither WEBHOOK_MANUAL_TOKEN nor WEBHOOK_TOKEN is set", r.URL.Path)
	}
	header, hasHeader := bearerToken(r)
	status, code, text := http.StatusUnauthorized, "unauthorized", "unauthorized"
	if refused {
		status, code, text = http.StatusForbidden, "not-from-proxy", "forward auth is on: come through the proxy of WEBHOOK_FORWARD_AUTH_FROM"
	} else if user != "" || !hasHeader || tokenMatches(s.cfg.manualToken, header) {
		var tooLarge *http.MaxBytesError
		switch err := decodeStrict(r.Body, v); {
		case errors.Is(err, errBodyBudget):
			w.Header().Set("Retry-After", "5")
			status, code, text = http.StatusServiceUnavailable, "body-budget", errBodyBudget.Error()+"; retry in a few seconds"
		case errors.As(err, &tooLarge):
			status, code, text = http.StatusRequestEntityTooLarge, "body-too-large", "request body too large"
		case err != nil:
			status, code, text = http.StatusBadRequest, "bad-json", "invalid request body: "+err.Error()
		case user != "" || hasHeader || tokenMatches(s.cfg.manualToken, *bodyToken):
			*bodyToken = ""
			return user, true
		}
	}
	manualError(w, r, status, code, text)
	return "", false
}

// handleDecision is POST /api/deliveries/<id>/approve, …/reject or …/retry, JSON {token, caller, reason}.
func (s *server) handleDecision(w http.ResponseWriter, r *http.Request) {
	info(r).action = "decision"
	var req struct{ Token, Caller, Reason string }
	if user, ok := s.manualRequest(w, r, &req, &req.Token); ok {
		status, text := s.decide(r, r.PathValue("id"), r.PathValue("decision"), cmp.Or(user, cleanText(req.Caller, manualTextMax)), req.Reason)
		replyJSON(w, status, map[string]any{"delivery": r.PathValue("id"), "decision": r.PathValue("decision"), "message": text})
	}
}

// decide records a person's decision on a delivery in the request's row and wakes the dispatcher.
func (s *server) decide(r *http.Request, id, decision, caller, reason string) (int, string) {
	ri := info(r)
	if !reDeliveryID.MatchString(id) || !slices.Contains([]string{"approve", "reject", "retry"}, decision) {
		return http.StatusNotFound, "no such delivery or decision (approve, reject, retry)"
	}
	ri.meta["delivery"], ri.meta["decision"], ri.meta["caller"], ri.meta["reason"] = id, decision, caller, cleanText(reason, manualTextMax)
	n, err := s.events.decideClaim(r.Context(), id, decision, event{RequestID: ri.id, TS: s.now(), Method: r.Method,
		Path: r.URL.Path, Status: http.StatusOK, Action: "decision", Meta: maps.Clone(ri.meta)})
	if err != nil {
		s.log.errorf("%s of delivery %s: %v", decision, id, err)
		return http.StatusInternalServerError, "cannot record the decision"
	} else if n == 0 {
		return http.StatusConflict, "delivery " + id + " is " + map[bool]string{true: "not finished", false: "not awaiting approval"}[decision == "retry"]
	}
	ri.recorded = true // in each claim's row
	select {
	case s.wake <- struct{}{}:
	default:
	}
	return http.StatusOK, fmt.Sprintf("%s: %d deliveries", decision, n)
}

// handleAutoUpdate checks the token (?token= or Bearer) and global limit, then starts the unit.
func (s *server) handleAutoUpdate(w http.ResponseWriter, r *http.Request) {
	ri := info(r)
	ri.action = "auto-update"
	if r.Method == http.MethodHead {
		w.Header().Set("Allow", "GET, POST")
		reply(w, r, http.StatusMethodNotAllowed, "method-not-allowed", "method not allowed")
		return
	}
	if !tokenMatches(s.cfg.token, requestToken(r)) {
		if s.cfg.token == "" {
			s.log.warnf("/auto-update refused: WEBHOOK_TOKEN is not set")
		}
		reply(w, r, http.StatusUnauthorized, "unauthorized", "unauthorized")
		return
	}
	unit, err := resolveUnit(s.cfg.autoUpdateUnit)
	if err != nil {
		s.log.errorf("/auto-update: MANUAL_AUTO_UPDATE_UNIT: %v", err)
		reply(w, r, http.StatusInternalServerError, "unit-invalid", "server misconfigured")
		return
	}
	ri.meta["unit"] = unit
	d, err := autoUpdateLimiter(s.cfg).take(r.Context())
	switch {
	case errors.Is(err, errLockTimeout):
		w.Header().Set("Retry-After", "2")
		reply(w, r, http.StatusTooManyRequests, "rate-limit-busy", "busy, retry shortly")
		return
	case err != nil:
		s.log.errorf("/auto-update rate limit: %v", err)
		reply(w, r, http.StatusInternalServerError, "limit-error", "cannot read the rate limit")
		return
	case !d.allowed:
		ri.meta["counts"] = d.counts
		w.Header().Set("Retry-After", strconv.Itoa(int(d.retryAfter/time.Second)))
		reply(w, r, http.StatusTooManyRequests, "rate-limited", "too many requests")
		return
	}
	http.NewResponseController(w).SetWriteDeadline(time.Now().Add(s.cfg.commandTimeout + 10*time.Second))
	res := startUnit(context.WithoutCancel(r.Context()), s.cfg, unit)
	if res.note != "" {
		ri.meta["note"] = res.note
	}
	if res.err != nil {
		ri.meta["exit_code"], ri.meta["stderr"] = res.exitCode, res.stderr
		s.log.errorf("/auto-update: %v", res.err)
		reply(w, r, http.StatusInternalServerError, "start-failed", res.err.Error())
		return
	}
	reply(w, r, http.StatusAccepted, "started", "auto-update triggered")
}

// manualEcho is what a manual trigger's body says of itself, answered back cleaned.
type manualEcho struct {
	DryRun bool   `json:"dry_run"`
	Caller string `json:"caller"`
	Reason string `json:"reason"`
}

// manualBegin is manualRequest, then e's caller (a proxy's user wins) and reason cleaned into the row.
func (s *server) manualBegin(w http.ResponseWriter, r *http.Request, action string, req any, token *string, e *manualEcho) bool {
	ri := info(r)
	ri.action = action
	user, ok := s.manualRequest(w, r, req, token)
	if ok {
		e.Caller, e.Reason = cmp.Or(user, cleanText(e.Caller, manualTextMax)), cleanText(e.Reason, manualTextMax)
		ri.meta["caller"], ri.meta["reason"], ri.meta["dry_run"] = e.Caller, e.Reason, e.DryRun
	}
	return ok
}

// manualTriggerRequest is the body of POST /api/manual/trigger.
type manualTriggerRequest struct {
	Token string   `json:"token"`
	All   bool     `json:"all"`
	Units []string `json:"units"`
	manualEcho
}

type manualTriggerResponse struct {
	Triggered []triggerResult `json:"triggered"`
	manualEcho
}

// handleManualTrigger runs triggerUnits for the request and answers with triggerStatus.
func (s *server) handleManualTrigger(w http.ResponseWriter, r *http.Request) {
	var req manualTriggerRequest
	if !s.manualBegin(w, r, "manual-trigger", &req, &req.Token, &req.manualEcho) {
		return
	}
	if len(req.Units) > manualUnitsMax {
		manualError(w, r, http.StatusBadRequest, "too-many-units", fmt.Sprintf("at most %d units per request", manualUnitsMax))
		return
	}
	http.NewResponseController(w).SetWriteDeadline(time.Now().Add(time.Duration(len(req.Units)+len(s.cfg.manualUnits)+1)*s.cfg.commandTimeout + 10*time.Second))
	resp := manualTriggerResponse{triggerUnits(context.WithoutCancel(r.Context()), s.cfg, req.Units, req.All, req.DryRun), req.manualEcho}
	info(r).meta["units"] = resp.Triggered
	for _, t := range resp.Triggered {
		if !t.ok() {
			s.log.warnf("manual trigger of %s by %q: %s: %s", t.Unit, resp.Caller, t.Status, t.Message)
		}
	}
	replyJSON(w, triggerStatus(resp.Triggered), resp)
}

// manualServiceRequest is the body of POST /api/manual/services/<name>.
type manualServiceRequest struct {
	Token string `json:"token"`
	Image string `json:"image"`
	Force bool   `json:"force"`
	manualEcho
}

type manualServiceResponse struct {
	Unit     string   `json:"unit"`
	Image    string   `json:"image,omitempty"`
	Status   string   `json:"status"` // triggered, queued, dry-run, failed, error
	Message  string   `json:"message"`
	TaskUnit string   `json:"task_unit,omitempty"`
	Plan     []string `json:"plan,omitempty"` // dry run with an image: what the redeploy would do
	manualEcho
}

// handleManualService redeploys one service: with an image by a run-task, else by a restart.
func (s *server) handleManualService(w http.ResponseWriter, r *http.Request) {
	var req manualServiceRequest
	if !s.manualBegin(w, r, "manual-service", &req, &req.Token, &req.manualEcho) {
		return
	}
	ri := info(r)
	unit, err := resolveUnit(r.PathValue("name"))
	if err != nil {
		manualError(w, r, http.StatusBadRequest, "invalid-unit", err.Error())
		return
	}
	resp := manualServiceResponse{Unit: unit, manualEcho: req.manualEcho}
	ri.meta["unit"] = unit
	var ref imageRef
	if req.Image != "" {
		if ref, err = parseImageRef(strings.TrimSpace(req.Image)); err != nil {
			manualError(w, r, http.StatusBadRequest, "invalid-image", err.Error())
			return
		}
		resp.Image = ref.String()
		ri.meta["image"] = resp.Image
	}
	status := http.StatusAccepted
	switch {
	case req.DryRun && resp.Image != "":
		ctx, cancel := context.WithTimeout(r.Context(), dispatchTimeout)
		resp.Plan = planRedeploy(ctx, s.cfg, s.getenv, unit, ref, req.Force)
		cancel()
		resp.Status, resp.Message = triggerDryRun, "would pull "+resp.Image+" and restart "+unit+" as the plan says"
	case resp.Image != "":
		spec := taskSpec{unit: unit, image: resp.Image, event: "manual", delivery: "manual-" + ri.id,
			path: r.URL.Path, force: req.Force}
		resp.TaskUnit = taskUnitName(spec.delivery)
		ri.meta["task_unit"], ri.meta["force"] = resp.TaskUnit, req.Force
		if res := s.startManual(r.Context(), spec); res.err != nil {
			s.log.errorf("cannot dispatch the manual redeploy of %s: %v", unit, res.err)
			ri.meta["exit_code"], ri.meta["stderr"] = res.exitCode, res.stderr
			resp.Status, resp.Message, status = triggerError, res.err.Error(), http.StatusInternalServerError
			break
		}
		resp.Status, resp.Message = "queued", "redeploy queued as "+resp.TaskUnit
	default:
		http.NewResponseController(w).SetWriteDeadline(time.Now().Add(s.cfg.commandTimeout + 10*time.Second))
		t := triggerUnits(context.WithoutCancel(r.Context()), s.cfg, []string{unit}, false, req.DryRun)[0]
		resp.Status, resp.Message = t.Status, t.Message
		if !t.ok() {
			s.log.warnf("manual restart of %s by %q: %s: %s", unit, resp.Caller, t.Status, t.Message)
			status = map[bool]int{true: http.StatusConflict, false: http.StatusInternalServerError}[t.busy]
		}
	}
	ri.meta["status"] = resp.Status
	replyJSON(w, status, resp)
}

// startManual dispatches a person's redeploy at once as a claim of its own, so the queue sees it.
func (s *server) startManual(ctx context.Context, spec taskSpec) cmdResult {
	ctx = context.WithoutCancel(ctx)
	if err := s.events.claimDispatching(ctx, spec); err != nil {
		return cmdResult{exitCode: -1, err: fmt.Errorf("cannot record the redeploy: %w", err)}
	}
	res := s.runTask(ctx, spec)
	status, errText := claimDispatched, ""
	if res.err != nil {
		status, errText = claimFailed, res.err.Error()
	}
	if err := s.events.settleTask(ctx, taskUnitName(spec.delivery), status, errText, time.Time{}, nil); err != nil {
		s.log.errorf("cannot record the dispatch of %s: %v", taskUnitName(spec.delivery), err)
	}
	return res
}

// Statuses of one unit in a manual trigger, as pod-upgrade-trigger reported them.
const (
	triggerOK      = "triggered"
	triggerDryRun  = "dry-run"
	triggerFailed  = "failed"  // systemctl ran and exited non-zero
	triggerError   = "error"   // systemctl could not be run (not on PATH, timed out, killed)
	triggerInvalid = "invalid" // the identifier is not a unit this program may touch
)

type triggerResult struct {
	Unit    string `json:"unit"`
	Status  string `json:"status"`
	Message string `json:"message"`
	busy    bool   // an error because the unit's lock is held
}

func (t triggerResult) ok() bool { return t.Status == triggerOK || t.Status == triggerDryRun }

// failStatus is the trigger status of a systemctl run that failed.
func failStatus(res cmdResult) string {
	if res.exitCode > 0 {
		return triggerFailed
	}
	return triggerError
}

// planTrigger resolves ids (after the auto-update unit and WEBHOOK_MANUAL_UNITS with all or none), each once.
func planTrigger(cfg *config, ids []string, all bool) []triggerResult {
	if all || len(ids) == 0 {
		ids = append(append([]string{cfg.autoUpdateUnit}, cfg.manualUnits...), ids...)
	}
	var plan []triggerResult
	for _, id := range ids {
		r := triggerResult{}
		if unit, err := resolveUnit(id); err != nil {
			r = triggerResult{Unit: cleanText(id, maxUnitNameLen), Status: triggerInvalid, Message: err.Error()}
		} else {
			r.Unit = unit
		}
		if !slices.ContainsFunc(plan, func(p triggerResult) bool { return p.Unit == r.Unit && p.Status == r.Status }) {
			plan = append(plan, r)
		}
	}
	return plan
}

// triggerUnits starts the auto-update oneshot and restarts the others under their unit lock (a
// restart amid a redeploy could fail its gate and roll a good image back): a held lock is busy.
func triggerUnits(ctx context.Context, cfg *config, ids []string, all, dryRun bool) []triggerResult {
	plan := planTrigger(cfg, ids, all)
	auto, _ := resolveUnit(cfg.autoUpdateUnit)
	for i := range plan {
		r := &plan[i]
		var res cmdResult
		switch {
		case r.Status == triggerInvalid:
			continue
		case dryRun:
			r.Status, r.Message = triggerDryRun, "would "+map[bool]string{true: "start", false: "restart"}[r.Unit == auto]+" "+r.Unit
			continue
		case r.Unit == auto:
			res = startUnit(ctx, cfg, r.Unit)
		default:
			lock, err := lockFile(ctx, unitLockPath(cfg.stateDir, r.Unit), 0)
			if r.busy = errors.Is(err, errLockTimeout); r.busy {
				r.Status, r.Message = triggerError, r.Unit+" is busy (a redeploy or another restart holds its lock): not restarted; try again once it is done"
				continue
			} else if err != nil {
				res = cmdResult{exitCode: -1, err: fmt.Errorf("cannot take the unit's lock: %w", err)}
			} else {
				res = restartUnit(ctx, cfg, r.Unit)
				lock.Unlock()
			}
		}
		r.Status, r.Message = triggerOK, res.note
		if res.err != nil {
			r.Status, r.Message = failStatus(res), res.err.Error()
		}
	}
	return plan
}

// triggerStatus is a manual trigger's HTTP status: 400 no unit valid, 207 one not triggered, 202.
func triggerStatus(results []triggerResult) int {
	switch {
	case !slices.ContainsFunc(results, func(r triggerResult) bool { return r.Status != triggerInvalid }):
		return http.StatusBadRequest
	case slices.ContainsFunc(results, func(r triggerResult) bool { return !r.ok() }):
		return http.StatusMultiStatus
	}
	return http.StatusAccepted
}

// cleanText makes caller text safe to print and store: valid UTF-8, no controls, trimmed, <= max runes.
func cleanText(s string, max int) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) || r == '\u2028' || r == '\u2029' {
			return -1
		}
		return r
	}, strings.ToValidUTF8(s, "\uFFFD"))
	if rs := []rune(s); len(rs) > max {
		s = string(rs[:max])
	}
	return strings.TrimSpace(s)
}

// The image check: a call's timeout, the server's first round, and a failed check's first retry
// (each next waits twice as long, up to the interval).
const (
	checkTimeout    = time.Minute
	checkFirstAfter = 10 * time.Second
	checkRetryMin   = time.Minute
)

const usageCheck = `usage: webhook-auto-update check [--state-dir DIR] [--db URL] [UNIT...]

Checks and prints "unit -> state" for each unit (default: every Quadlet unit); on-update=deploy queues an update.
Exit status: 0 every check succeeded, 1 a check failed, 2 usage error or skopeo missing.
`

func cmdCheck(c *cli, args []string) int {
	cfg, units, code := c.setup("check", usageCheck, args, nil)
	if code >= 0 {
		return code
	}
	if _, err := exec.LookPath("skopeo"); err != nil {
		c.log.errorf("check: skopeo is not installed or not on PATH: install the Debian package skopeo")
		return 2
	}
	for i, id := range units {
		u, err := resolveUnit(id)
		if units[i] = u; err != nil {
			return c.usageError("check", usageCheck, "%v", err)
		}
	}
	if len(units) == 0 {
		units = quadletUnits(c.getenv)
	}
	events, closeLog := openCommandLog(c, cfg)
	defer closeLog()
	if events == nil {
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	s, exit := newServer(cfg, c.log, events), 0
	s.getenv = c.getenv
	for _, u := range units {
		r, ok := s.checkRegistry(ctx, u, true)
		line := map[bool]string{true: r.State().Label, false: "not checked (no Image=, or check=off)"}[ok]
		if r.Error != "" {
			exit, line = 1, line+": "+r.Error
		}
		fmt.Fprintf(c.stdout, "%s -> %s\n", u, line)
	}
	return exit
}

// runChecks checks each unit when it is due, the first round shortly after the start.
func (s *server) runChecks(ctx context.Context) {
	if _, err := exec.LookPath("skopeo"); err != nil {
		s.log.warnf("WEBHOOK_CHECK_INTERVAL_SECS is set, but skopeo is not on PATH: every image check fails until the Debian package skopeo is installed")
	}
	for wait := checkFirstAfter; sleepContext(ctx, wait) == nil; {
		next := s.now().Add(s.cfg.checkInterval).Unix()
		for _, unit := range quadletUnits(s.getenv) {
			if c, ok := s.checkRegistry(ctx, unit, false); ok {
				next = min(next, c.NextTry)
			}
		}
		wait = max(time.Unix(next, 0).Sub(s.now()), time.Second)
	}
}

// quadletUnits are the units of the user's Quadlet .container files, where inspectUnit looks.
func quadletUnits(getenv func(string) string) (units []string) {
	files, _ := filepath.Glob(filepath.Join(cmp.Or(getenv("XDG_CONFIG_HOME"), "/nonexistent"), "containers/systemd/*.container"))
	more, _ := filepath.Glob(filepath.Join(cmp.Or(getenv("HOME"), "/nonexistent"), ".config/containers/systemd/*.container"))
	for _, f := range append(files, more...) {
		if u, err := resolveUnit(strings.TrimSuffix(filepath.Base(f), ".container")); err == nil {
			units = append(units, u)
		}
	}
	slices.Sort(units)
	return slices.Compact(units)
}

// checkRegistry compares the registry's digest of the unit's Image= with the running one when due
// (or forced), stores it, and queues an update with on-update=deploy. !ok: no Image= or check=off.
func (s *server) checkRegistry(ctx context.Context, unit string, force bool) (c registryCheck, ok bool) {
	now := s.now()
	_, uf, err := inspectUnit(ctx, s.cfg, s.getenv, unit)
	pol, perr := parsePolicy(uf.labels, s.cfg.policyDefaults)
	prev, rerr := readRegistryChecks(ctx, s.events.db, " WHERE unit = ?", unit)
	if err = errors.Join(err, perr, rerr); err == nil && (uf.image == "" || pol.check < 0) {
		return c, false
	}
	if prev = append(prev, registryCheck{}); !force && now.Unix() < prev[0].NextTry {
		return prev[0], true
	}
	c = registryCheck{Unit: unit, Image: uf.image, Remote: prev[0].Remote, Running: prev[0].Running, FirstSeen: prev[0].FirstSeen, Checked: now.Unix()}
	every := cmp.Or(max(pol.check, 0), s.cfg.checkInterval)
	var ref imageRef
	var remote string
	var running []string
	var seen *notice // an update first seen
	if err == nil {
		ref, remote, running, err = imageDigests(ctx, s.cfg, unit, uf.image)
	}
	if c.NextTry = now.Add(every).Unix(); err != nil {
		wait := checkRetryMin
		if prev[0].Error != "" {
			wait = max(wait, 2*time.Duration(prev[0].NextTry-prev[0].Checked)*time.Second)
		}
		c.Error, c.NextTry = err.Error(), now.Add(min(wait, max(every, checkRetryMin))).Unix()
	} else if c.Remote, c.Running = remote, running[0]; slices.Contains(running, remote) {
		c.Running, c.FirstSeen = remote, 0
	} else if c.FirstSeen == 0 || prev[0].Remote != remote {
		c.FirstSeen, seen = now.Unix(), &notice{Kind: "update", Time: now, Unit: unit, Image: c.Image, Digest: remote, Reason: "it runs " + c.Running}
	}
	ev := event{RequestID: newRequestID(), TS: now, Method: "CHECK", Status: http.StatusOK, Action: "image-check", Duration: s.now().Sub(now),
		Meta: map[string]any{"unit": unit, "image": c.Image, "state": c.State().Class, "remote_digest": c.Remote, "running_digest": c.Running}}
	if c.Error != "" {
		ev.Status, ev.Meta["error"] = http.StatusBadGateway, c.Error
	}
	var evs []event
	queued := c.Error == "" && c.updateAvailable() && pol.deploy && s.deploy(ctx, c, ref, ev)
	if !queued && (c.Error != "" || c.State().Class != prev[0].State().Class || c.Remote != prev[0].Remote) {
		evs = append(evs, ev)
	}
	if err := s.events.saveRegistryCheck(ctx, c, evs, seen); err != nil {
		s.log.errorf("image check of %s: cannot store it: %v", unit, err)
	}
	return c, true
}

// imageDigests are the digest image's tag points to in its registry (skopeo) and podman's digests
// of the image the unit's container runs (no container: ref's), podman's own first.
func imageDigests(ctx context.Context, cfg *config, unit, image string) (ref imageRef, remote string, running []string, err error) {
	if ref, err = parseImageRef(withDefaultTag(image)); err != nil {
		return ref, "", nil, err
	}
	res := runCommand(ctx, checkTimeout, "skopeo", "inspect", "--no-tags", "--format", "{{.Digest}}", "--", "docker://"+ref.String())
	if remote = validDigest(strings.TrimSpace(res.stdout)); res.err == nil && remote == "" {
		res.err = fmt.Errorf("skopeo inspect printed %q, not a digest", cleanText(strings.TrimSpace(res.stdout), 100))
	}
	if res.err != nil {
		return ref, "", nil, res.err
	}
	target := cmp.Or(findUnitContainer(ctx, cfg, unit, "").imageID, ref.String())
	res = runCommand(ctx, checkTimeout, "podman", "image", "inspect", "--format", "{{.Digest}}{{range .RepoDigests}} {{.}}{{end}}", "--", target)
	for _, f := range strings.Fields(res.stdout) {
		if d := validDigest(f[strings.LastIndex(f, "@")+1:]); d != "" {
			running = append(running, d)
		}
	}
	if res.err == nil && len(running) == 0 {
		res.err = fmt.Errorf("podman knows no digest of the image %s runs (%s)", unit, target)
	}
	return ref, remote, running, res.err
}

// deploy queues c's digest as a claim (id from unit and digest: once) unless the gate rejected it.
func (s *server) deploy(ctx context.Context, c registryCheck, ref imageRef, ev event) bool {
	spec := taskSpec{unit: c.Unit, image: ref.String(), event: "check", delivery: hashID("check", c.Unit, c.Remote), path: "check", digest: c.Remote}
	rejected, _, err := s.events.rejectedDigest(ctx, c.Unit, c.Remote)
	claimed := false
	if ev.Meta["reason"] = "rejected-before"; err == nil && rejected == "" {
		ev.Status, ev.Meta["delivery"], ev.Meta["reason"] = http.StatusAccepted, spec.delivery, "queued"
		claimed, err = s.events.claimDelivery(ctx, spec, ev)
	}
	if err != nil {
		s.log.errorf("image check of %s: cannot queue the redeploy to %s: %v", c.Unit, c.Remote, err)
	}
	select {
	case s.wake <- struct{}{}:
	default:
	}
	return claimed
}
