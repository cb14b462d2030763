// scheduler.go owns the triggers on the operator's behalf: the scheduler loop, trigger-units and
// trigger-all, their HTTP faces (/auto-update, /api/manual/*), and the manual-trigger logic
// they share, so the command line and the API resolve, run and report units alike.
//
// Rules: ticks follow a fixed schedule (start + n·interval), never overlap, and skip the slots a
// long tick overran; SIGTERM and SIGINT end the scheduler at once with status 0. Every tick and
// trigger writes a row. A manual restart holds the unit's lock, so it never cuts into a
// redeploy; caller-supplied text passes cleanText before it is printed or stored.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode"
)

// minSchedulerInterval is the shortest interval the scheduler accepts, as pod-upgrade-trigger
// did (60 s); a shorter one is raised to it with a warning. A variable so that tests can lower it.
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
	cfg, rest, code := c.setup("scheduler", usageScheduler, args, func(fs *flag.FlagSet, cfg *config) {
		intervalSecs, maxTicks = int(cfg.interval/time.Second), cfg.maxTicks
		fs.Var(positiveInt{&intervalSecs}, "interval", "")
		fs.Var(positiveInt{&maxTicks}, "max-iterations", "")
	})
	if code >= 0 {
		return code
	}
	if len(rest) > 0 {
		c.log.errorf("scheduler: unexpected argument %q", rest[0])
		fmt.Fprint(c.stderr, usageScheduler)
		return 2
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
	// A tick waits for the unit's start job, which for a oneshot such as podman-auto-update lasts
	// as long as the update; it may take up to the interval before systemctl is given up on.
	tickCfg := *cfg
	tickCfg.commandTimeout = max(cfg.commandTimeout, interval)

	events := openCommandLog(c, cfg)
	if events != nil {
		defer events.Close()
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	s := &scheduler{
		unit:     unit,
		interval: interval,
		maxTicks: maxTicks,
		log:      c.log,
		now:      time.Now,
		sleep:    sleepContext,
		tick:     func(ctx context.Context) cmdResult { return startUnit(ctx, &tickCfg, unit) },
		record:   func(ev event) { writeCommandEvent(c.log, events, ev) },
		housekeep: func(ctx context.Context) {
			if events == nil {
				return
			}
			if _, err := events.deleteOlderThan(ctx, time.Now().Add(-cfg.requestRetention), false, true); err != nil && ctx.Err() == nil {
				c.log.warnf("scheduler: cannot delete request rows older than WEBHOOK_REQUEST_RETENTION_DAYS: %v", err)
			}
		},
	}
	bound := "until stopped"
	if maxTicks > 0 {
		bound = fmt.Sprintf("for %d iterations", maxTicks)
	}
	c.log.infof("scheduler: starting %s every %s, %s", unit, interval, bound)
	return s.run(ctx)
}

// scheduler starts a unit on a fixed schedule. Its clock, sleep, tick and record are plain values
// so a test can run it without waiting and without systemd.
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

// run ticks at start, start+interval, start+2·interval, … until ctx ends or maxTicks ticks have
// run, and returns the exit status.
func (s *scheduler) run(ctx context.Context) int {
	start := s.now()
	failed := 0
	var slot int64 // the schedule slot of the current tick; slot n is due at start + n·interval
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
		case res.err != nil && res.exitCode > 0:
			status, code = triggerFailed, http.StatusInternalServerError
		case res.err != nil:
			status, code = triggerError, http.StatusInternalServerError
		}
		meta := map[string]any{"iteration": iteration, "slot": slot, "unit": s.unit, "status": status,
			"interval_secs": int64(s.interval / time.Second)}
		if res.err != nil {
			meta["exit_code"] = res.exitCode
			meta["stderr"] = res.stderr
			meta["error"] = res.err.Error()
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
			break
		}

		// The next slot is the first one not yet past: a tick that overran the interval skips
		// the slots it missed instead of starting the unit again at once.
		next := slot + 1
		if elapsed := s.now().Sub(start); time.Duration(next)*s.interval < elapsed {
			next = int64((elapsed + s.interval - 1) / s.interval)
			s.log.warnf("scheduler: iteration %d overran its interval, skipping %d missed slots", iteration, next-slot-1)
		}
		slot = next
		if err := s.sleep(ctx, start.Add(time.Duration(slot)*s.interval).Sub(s.now())); err != nil {
			s.log.infof("scheduler: stopped after %d iterations", iteration)
			return 0
		}
	}
	if failed > 0 {
		return 1
	}
	return 0
}

// sleepContext waits for d or until ctx ends, whichever comes first.
func sleepContext(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// openCommandLog opens the event log for a command-line run. When it cannot be opened the command
// still does its work, and its rows go to stderr instead; it then returns nil.
func openCommandLog(c *cli, cfg *config) *eventLog {
	if err := ensureStateDir(cfg.stateDir); err != nil {
		c.log.warnf("event log unavailable, events go to stderr: %v", err)
		return nil
	}
	events, err := openEventLog(cfg.dbPath, c.log)
	if err != nil {
		c.log.warnf("event log unavailable, events go to stderr: %v", err)
		return nil
	}
	return events
}

// writeCommandEvent commits one row before it returns, or prints it to stderr when there is no
// event log (a failed write is printed by Write itself).
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

// triggerFlags are the flags trigger-units and trigger-all share.
type triggerFlags struct {
	dryRun         bool
	caller, reason string
}

func (f *triggerFlags) define(fs *flag.FlagSet) {
	fs.BoolVar(&f.dryRun, "dry-run", false, "")
	fs.StringVar(&f.caller, "caller", "cli", "")
	fs.StringVar(&f.reason, "reason", "", "")
}

func cmdTriggerUnits(c *cli, args []string) int {
	var f triggerFlags
	var all bool
	var more []string
	cfg, rest, code := c.setup("trigger-units", usageTriggerUnits, args, func(fs *flag.FlagSet, cfg *config) {
		f.define(fs)
		fs.BoolVar(&all, "all", false, "")
		fs.Func("units", "", func(s string) error { more = append(more, splitList(s)...); return nil })
	})
	if code >= 0 {
		return code
	}
	ids := append(rest, more...)
	if len(ids) == 0 && !all {
		c.log.errorf("trigger-units: nothing to trigger: name units, or use --all or trigger-all")
		fmt.Fprint(c.stderr, usageTriggerUnits)
		return 2
	}
	return runTrigger(c, cfg, "trigger-units", ids, all, f)
}

func cmdTriggerAll(c *cli, args []string) int {
	var f triggerFlags
	cfg, rest, code := c.setup("trigger-all", usageTriggerAll, args, func(fs *flag.FlagSet, cfg *config) {
		f.define(fs)
	})
	if code >= 0 {
		return code
	}
	if len(rest) > 0 {
		c.log.errorf("trigger-all: unexpected argument %q (use trigger-units to name units)", rest[0])
		fmt.Fprint(c.stderr, usageTriggerAll)
		return 2
	}
	return runTrigger(c, cfg, "trigger-all", nil, true, f)
}

// runTrigger triggers units for trigger-units and trigger-all, prints the results and writes the
// cli-trigger row.
func runTrigger(c *cli, cfg *config, command string, ids []string, all bool, f triggerFlags) int {
	caller, reason := cleanText(f.caller, manualTextMax), cleanText(f.reason, manualTextMax)
	events := openCommandLog(c, cfg)
	if events != nil {
		defer events.Close()
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	start := time.Now()
	results := triggerUnits(ctx, cfg, ids, all, f.dryRun)
	for _, r := range results {
		fmt.Fprintf(c.stdout, "%s -> %s\n", r.Unit, r.Status)
		if r.Message != "" {
			fmt.Fprintf(c.stdout, "    %s\n", strings.ReplaceAll(strings.TrimSpace(r.Message), "\n", "\n    "))
		}
	}
	status, exit := http.StatusAccepted, 0
	switch valid, ok := triggerOutcome(results); {
	case valid == 0:
		status, exit = http.StatusBadRequest, 2
		c.log.errorf("%s: nothing valid to trigger", command)
	case !ok:
		status, exit = http.StatusMultiStatus, 1
	}
	writeCommandEvent(c.log, events, event{RequestID: newRequestID(), TS: time.Now(), Method: "CLI",
		Status: status, Action: "cli-trigger", Duration: time.Since(start), Meta: map[string]any{
			"command": command, "caller": caller, "reason": reason, "dry_run": f.dryRun, "all": all,
			"requested": cleanList(ids), "units": results}})
	return exit
}

// cleanList applies cleanText to each requested identifier before it is stored.
func cleanList(ids []string) []string {
	out := make([]string, 0, len(ids))
	for _, id := range ids {
		out = append(out, cleanText(id, maxUnitNameLen))
	}
	return out
}

// Manual triggers: /auto-update and /api/manual/*. A token is compared in constant time and
// never reaches a log line or an event row (the query is redacted by the middleware, and bodies
// are never stored). Units reach systemctl only through triggerUnits (below), which
// validates them; commands run detached from the request's cancellation, so a client that hangs
// up cannot kill systemctl halfway through a restart.

// extendWriteDeadline gives a handler that waits for systemctl the time to answer.
func extendWriteDeadline(w http.ResponseWriter, d time.Duration) {
	http.NewResponseController(w).SetWriteDeadline(time.Now().Add(d))
}

// manualTextMax caps the caller and reason a manual trigger stores.
const manualTextMax = 200

// manualUnitsMax caps the units one manual trigger may name.
const manualUnitsMax = 256

// manualRequest reads a manual API body into v and checks the manual token, taken from an
// "Authorization: Bearer" header or else from the body's token field. It has answered the
// request when it returns false. A wrong header is refused before the body is read.
func (s *server) manualRequest(w http.ResponseWriter, r *http.Request, v any, bodyToken *string) bool {
	if s.cfg.manualToken == "" {
		s.log.warnf("%s refused: neither WEBHOOK_MANUAL_TOKEN nor WEBHOOK_TOKEN is set", r.URL.Path)
	}
	header, hasHeader := bearerToken(r)
	if hasHeader && !tokenMatches(s.cfg.manualToken, header) {
		manualError(w, r, http.StatusUnauthorized, "unauthorized", "unauthorized")
		return false
	}
	if err := decodeStrict(r.Body, v); err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			manualError(w, r, http.StatusRequestEntityTooLarge, "body-too-large", "request body too large")
			return false
		}
		manualError(w, r, http.StatusBadRequest, "bad-json", "invalid request body: "+err.Error())
		return false
	}
	if !hasHeader && !tokenMatches(s.cfg.manualToken, *bodyToken) {
		manualError(w, r, http.StatusUnauthorized, "unauthorized", "unauthorized")
		return false
	}
	*bodyToken = ""
	return true
}

// handleAutoUpdate starts the auto-update unit: token (?token=, the original's way, or a Bearer
// header), then the global two-window limit, then systemctl --user start.
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
	extendWriteDeadline(w, s.cfg.commandTimeout+10*time.Second)
	res := startUnit(context.WithoutCancel(r.Context()), s.cfg, unit)
	if res.note != "" {
		ri.meta["note"] = res.note
	}
	if res.err != nil {
		ri.meta["exit_code"] = res.exitCode
		ri.meta["stderr"] = res.stderr
		s.log.errorf("/auto-update: %v", res.err)
		reply(w, r, http.StatusInternalServerError, "start-failed", res.err.Error())
		return
	}
	reply(w, r, http.StatusAccepted, "started", "auto-update triggered")
}

// manualTriggerRequest is the body of POST /api/manual/trigger.
type manualTriggerRequest struct {
	Token  string   `json:"token"`
	All    bool     `json:"all"`
	Units  []string `json:"units"`
	DryRun bool     `json:"dry_run"`
	Caller string   `json:"caller"`
	Reason string   `json:"reason"`
}

// manualTriggerResponse is its answer.
type manualTriggerResponse struct {
	Triggered []triggerResult `json:"triggered"`
	DryRun    bool            `json:"dry_run"`
	Caller    string          `json:"caller"`
	Reason    string          `json:"reason"`
}

// handleManualTrigger restarts the named units (or, with all or no units, the auto-update unit and
// WEBHOOK_MANUAL_UNITS): 202 when every unit was triggered, 207 when one failed, 400 when none
// was valid.
func (s *server) handleManualTrigger(w http.ResponseWriter, r *http.Request) {
	ri := info(r)
	ri.action = "manual-trigger"
	var req manualTriggerRequest
	if !s.manualRequest(w, r, &req, &req.Token) {
		return
	}
	if len(req.Units) > manualUnitsMax {
		manualError(w, r, http.StatusBadRequest, "too-many-units", fmt.Sprintf("at most %d units per request", manualUnitsMax))
		return
	}
	resp := manualTriggerResponse{DryRun: req.DryRun,
		Caller: cleanText(req.Caller, manualTextMax), Reason: cleanText(req.Reason, manualTextMax)}
	ri.meta["caller"], ri.meta["reason"], ri.meta["dry_run"] = resp.Caller, resp.Reason, resp.DryRun
	extendWriteDeadline(w, time.Duration(len(req.Units)+len(s.cfg.manualUnits)+1)*s.cfg.commandTimeout+10*time.Second)
	resp.Triggered = triggerUnits(context.WithoutCancel(r.Context()), s.cfg, req.Units, req.All, req.DryRun)
	ri.meta["units"] = resp.Triggered
	status := http.StatusAccepted
	switch valid, ok := triggerOutcome(resp.Triggered); {
	case valid == 0:
		status = http.StatusBadRequest
	case !ok:
		status = http.StatusMultiStatus
	}
	for _, t := range resp.Triggered {
		if t.Status != triggerOK && t.Status != triggerDryRun {
			s.log.warnf("manual trigger of %s by %q: %s: %s", t.Unit, resp.Caller, t.Status, t.Message)
		}
	}
	replyJSON(w, status, resp)
}

// manualServiceRequest is the body of POST /api/manual/services/<name>.
type manualServiceRequest struct {
	Token  string `json:"token"`
	Image  string `json:"image"`
	DryRun bool   `json:"dry_run"`
	Caller string `json:"caller"`
	Reason string `json:"reason"`
	Force  bool   `json:"force"`
}

// manualServiceResponse is its answer.
type manualServiceResponse struct {
	Unit     string   `json:"unit"`
	Image    string   `json:"image,omitempty"`
	Status   string   `json:"status"` // triggered, queued, dry-run, failed, error
	Message  string   `json:"message"`
	TaskUnit string   `json:"task_unit,omitempty"`
	Plan     []string `json:"plan,omitempty"` // dry run with an image: what the redeploy would do
	DryRun   bool     `json:"dry_run"`
	Caller   string   `json:"caller"`
	Reason   string   `json:"reason"`
}

// handleManualService redeploys one service. With an image it dispatches the same run-task as a
// GitHub delivery (pull, then restart) and answers 202 once the task unit started; without one
// it restarts the unit and answers when systemctl is done.
func (s *server) handleManualService(w http.ResponseWriter, r *http.Request) {
	ri := info(r)
	ri.action = "manual-service"
	var req manualServiceRequest
	if !s.manualRequest(w, r, &req, &req.Token) {
		return
	}
	unit, err := resolveUnit(r.PathValue("name"))
	if err != nil {
		manualError(w, r, http.StatusBadRequest, "invalid-unit", err.Error())
		return
	}
	resp := manualServiceResponse{Unit: unit, DryRun: req.DryRun,
		Caller: cleanText(req.Caller, manualTextMax), Reason: cleanText(req.Reason, manualTextMax)}
	ri.meta["unit"], ri.meta["caller"], ri.meta["reason"], ri.meta["dry_run"] = unit, resp.Caller, resp.Reason, resp.DryRun
	if req.Image != "" {
		ref, err := parseImageRef(strings.TrimSpace(req.Image))
		if err != nil {
			manualError(w, r, http.StatusBadRequest, "invalid-image", err.Error())
			return
		}
		resp.Image = ref.String()
		ri.meta["image"] = resp.Image
	}
	status := http.StatusAccepted
	switch {
	case req.DryRun && resp.Image != "":
		ref, _ := parseImageRef(resp.Image)
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
		extendWriteDeadline(w, s.cfg.commandTimeout+10*time.Second)
		t := triggerUnits(context.WithoutCancel(r.Context()), s.cfg, []string{unit}, false, req.DryRun)[0]
		resp.Status, resp.Message = t.Status, t.Message
		if t.Status != triggerOK && t.Status != triggerDryRun {
			s.log.warnf("manual restart of %s by %q: %s: %s", unit, resp.Caller, t.Status, t.Message)
			status = http.StatusInternalServerError
			if t.busy {
				status = http.StatusConflict
			}
		}
	}
	ri.meta["status"] = resp.Status
	replyJSON(w, status, resp)
}

// startManual dispatches a redeploy a person asked for at once, as a claim of its own: the queue
// holds the unit's later claims behind it, and the status page shows it.
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

// Manual triggers. The HTTP API (/api/manual/*) and the trigger-units / trigger-all commands
// share the code below, so both resolve, de-duplicate, run and report units the same way.

// Statuses of one unit in a manual trigger, as pod-upgrade-trigger reported them (the "status"
// of each entry in the API's "triggered" list and of each line trigger-units prints).
const (
	triggerOK      = "triggered" // systemctl succeeded
	triggerDryRun  = "dry-run"   // nothing was run
	triggerFailed  = "failed"    // systemctl ran and exited non-zero
	triggerError   = "error"     // systemctl could not be run (not on PATH, timed out, killed)
	triggerInvalid = "invalid"   // the identifier is not a unit this program may touch
)

// triggerResult is what happened to one unit of a manual trigger.
type triggerResult struct {
	Unit    string `json:"unit"`
	Status  string `json:"status"`
	Message string `json:"message"`
	busy    bool   // an error because the unit's lock is held (see triggerUnits)
}

// planTrigger resolves unit identifiers (see resolveUnit) in the order given. With all set, or
// when ids is empty, the auto-update unit and WEBHOOK_MANUAL_UNITS come first. A unit named twice,
// in any spelling, appears once; an identifier that does not resolve is reported invalid and
// will never reach systemctl.
func planTrigger(cfg *config, ids []string, all bool) []triggerResult {
	if all || len(ids) == 0 {
		ids = append(append([]string{cfg.autoUpdateUnit}, cfg.manualUnits...), ids...)
	}
	seen := map[string]bool{}
	var plan []triggerResult
	for _, id := range ids {
		unit, err := resolveUnit(id)
		if err != nil {
			shown := cleanText(id, maxUnitNameLen)
			if !seen["invalid:"+shown] {
				seen["invalid:"+shown] = true
				plan = append(plan, triggerResult{Unit: shown, Status: triggerInvalid, Message: err.Error()})
			}
			continue
		}
		if !seen[unit] {
			seen[unit] = true
			plan = append(plan, triggerResult{Unit: unit})
		}
	}
	return plan
}

// triggerUnits plans a manual trigger and runs it, one unit after the other: the auto-update unit
// is started (it is usually a oneshot that must not be interrupted), every other unit is
// restarted. A failure is reported and the remaining units are still processed. A unit is
// restarted while holding its unit lock, the one run-task holds for a whole redeploy: a restart
// in the middle of one could fail its health gate and roll a good image back. So a unit whose
// lock is held (by a redeploy, or another restart) is not restarted but reported as an error, to
// be retried once it is free.
func triggerUnits(ctx context.Context, cfg *config, ids []string, all, dryRun bool) []triggerResult {
	plan := planTrigger(cfg, ids, all)
	auto, _ := resolveUnit(cfg.autoUpdateUnit)
	for i := range plan {
		r := &plan[i]
		if r.Status == triggerInvalid {
			continue
		}
		verb := "restart"
		if r.Unit == auto {
			verb = "start"
		}
		if dryRun {
			r.Status, r.Message = triggerDryRun, "would "+verb+" "+r.Unit
			continue
		}
		var res cmdResult
		if r.Unit == auto {
			res = startUnit(ctx, cfg, r.Unit)
		} else if res, r.busy = restartLocked(ctx, cfg, r.Unit); r.busy {
			r.Status, r.Message = triggerError, r.Unit+" is busy (a redeploy or another restart holds its lock): not restarted; try again once it is done"
			continue
		}
		switch {
		case res.err == nil:
			r.Status, r.Message = triggerOK, res.note
		case res.exitCode > 0:
			r.Status, r.Message = triggerFailed, res.err.Error()
		default:
			r.Status, r.Message = triggerError, res.err.Error()
		}
	}
	return plan
}

// restartLocked restarts unit while holding its unit lock, without waiting for it: busy when
// another holds it. A lock that cannot be taken for another reason is reported as the result.
func restartLocked(ctx context.Context, cfg *config, unit string) (res cmdResult, busy bool) {
	lock, err := lockFile(ctx, unitLockPath(cfg.stateDir, unit), 0)
	if errors.Is(err, errLockTimeout) {
		return cmdResult{}, true
	}
	if err != nil {
		return cmdResult{exitCode: -1, err: fmt.Errorf("cannot take the unit's lock: %w", err)}, false
	}
	defer lock.Unlock()
	return restartUnit(ctx, cfg, unit), false
}

// triggerOutcome sums up a manual trigger: valid is how many units were valid, ok whether every
// unit was triggered (or would be, on a dry run).
func triggerOutcome(results []triggerResult) (valid int, ok bool) {
	ok = true
	for _, r := range results {
		if r.Status != triggerInvalid {
			valid++
		}
		if r.Status != triggerOK && r.Status != triggerDryRun {
			ok = false
		}
	}
	return valid, ok
}

// cleanText makes a caller-supplied string safe to print and store: invalid UTF-8 replaced,
// control characters (newlines, escapes) dropped, surrounding space trimmed, at most max runes.
func cleanText(s string, max int) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	var b strings.Builder
	n := 0
	for _, r := range s {
		if unicode.IsControl(r) || r == '\u2028' || r == '\u2029' {
			continue
		}
		if n == max {
			break
		}
		b.WriteRune(r)
		n++
	}
	return strings.TrimSpace(b.String())
}
