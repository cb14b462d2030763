// podman.go owns images and the redeploy: push payloads (GitHub's, each registry's) read into
// image references, the reference grammar, podman's argv, and run-task: pull, restart, gate, roll
// back. Rules: parsers are pure; a fine payload but no tagged push is an *ignoredError, one bad
// reference refuses it whole. A reference reaches podman only after parseImageRef, after "--". A
// redeploy pulls only the image the unit runs (Image=, else its container's), rolls back to what
// its container ran, refuses unless forced a digest the gate rejected (rejectedDigest).
package main

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type taskSpec struct {
	unit     string // validated service name
	image    string // validated image reference
	event    string // X-GitHub-Event, or "manual"
	delivery string // GitHub delivery id, or a generated one; names the transient unit
	path     string // the request path that caused it
	force    bool   // restart even when the pulled image is unchanged
	digest   string // manifest digest the delivery named, recorded for verification
}

type imageRef struct{ host, path, tag, digest string }

func (r imageRef) repo() string { return r.host + "/" + r.path }

func (r imageRef) String() string {
	s := r.repo()
	if r.tag != "" {
		s += ":" + r.tag
	}
	if r.digest != "" {
		s += "@" + r.digest
	}
	return s
}

// The OCI distribution reference grammar, restricted to references with a registry host.
var (
	refDomainComponent = `(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])`
	refDomain          = `(?:` + refDomainComponent + `(?:\.` + refDomainComponent + `)*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?`
	refPathComponent   = `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`
	reDomain           = regexp.MustCompile(`^` + refDomain + `$`)
	rePath             = regexp.MustCompile(`^` + refPathComponent + `(?:/` + refPathComponent + `)*$`)
	reTag              = regexp.MustCompile(`^[\w][\w.-]{0,127}$`)
	reDigest           = regexp.MustCompile(`^sha256:[a-f0-9]{64}$`)
)

// parseImageRef parses "host/path[:tag][@digest]", host and tag or digest required: a pull never guesses.
func parseImageRef(s string) (imageRef, error) {
	var r imageRef
	if s == "" || len(s) > 512 || strings.HasPrefix(s, "-") || strings.ContainsAny(s, " \t\r\n\x00\\") {
		return r, fmt.Errorf("invalid image reference %q", s)
	}
	rest, digest, hasDigest := strings.Cut(s, "@")
	if r.digest = digest; hasDigest && !reDigest.MatchString(digest) {
		return r, fmt.Errorf("invalid image reference %q: bad digest", s)
	}
	host, p, ok := strings.Cut(rest, "/")
	if !ok || !(strings.ContainsAny(host, ".:") || host == "localhost") {
		return r, fmt.Errorf("invalid image reference %q: a registry host is required (e.g. ghcr.io/owner/name:tag)", s)
	}
	if i := strings.LastIndexByte(p, ':'); i >= 0 {
		p, r.tag = p[:i], p[i+1:]
		if !reTag.MatchString(r.tag) {
			return r, fmt.Errorf("invalid image reference %q: bad tag", s)
		}
	}
	if !reDomain.MatchString(host) {
		return r, fmt.Errorf("invalid image reference %q: bad registry host %q", s, host)
	}
	if !rePath.MatchString(p) || len(host)+1+len(p) > 255 {
		return r, fmt.Errorf("invalid image reference %q: the repository must be lowercase path components", s)
	}
	if r.tag == "" && r.digest == "" {
		return r, fmt.Errorf("invalid image reference %q: a tag or digest is required", s)
	}
	r.host, r.path = strings.ToLower(host), p
	return r, nil
}

// withDefaultTag adds ":latest" where neither tag nor digest is named, as podman reads Image=.
func withDefaultTag(s string) string {
	last := s[strings.LastIndexByte(s, '/')+1:]
	if s == "" || strings.Contains(last, ":") || strings.Contains(s, "@") || !strings.Contains(s, "/") {
		return s
	}
	return s + ":latest"
}

// delivery is what a push notification says was pushed: one repository, and its tags.
type delivery struct {
	host, path string   // path is owner/name, lowercased
	tags       []string // every non-empty pushed tag, first the primary one
	digest     string   // manifest digest when the payload carries one
	id         string   // the delivery id it is claimed under, unique per source ("" until known)
}

func (d delivery) repo() string            { return d.host + "/" + d.path }
func (d delivery) ref(tag string) imageRef { return imageRef{host: d.host, path: d.path, tag: tag} }

// imageMismatch says which check (host-, repository- or tag-mismatch) a push fails against want.
func imageMismatch(want imageRef, host, path string, tags []string) (reason, text string) {
	switch {
	case want.host != host:
		return "host-mismatch", fmt.Sprintf("host mismatch: the unit runs %s, from registry %s, not %s", want, want.host, host)
	case want.path != path:
		return "repository-mismatch", fmt.Sprintf("repository mismatch: the unit runs %s, not %s/%s", want, host, path)
	case !slices.Contains(tags, want.tag):
		return "tag-mismatch", fmt.Sprintf("tag mismatch: the unit runs %s, and %s was pushed as %s", want, want.repo(), strings.Join(tags, ", "))
	}
	return "", ""
}

// ignoredError is a payload acknowledged (202) but not acted on; reason goes to the answer and row.
type ignoredError struct{ reason, detail string }

func (e *ignoredError) Error() string { return e.reason + ": " + e.detail }

func ignored(reason, format string, a ...any) error {
	return &ignoredError{reason: reason, detail: fmt.Sprintf(format, a...)}
}

// errInvalidJSON is a body that is not the JSON its source sends: refused (400), not ignored.
var errInvalidJSON = errors.New("the body is not valid JSON")

func decodeJSON(body []byte, v any) error {
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("%w: %v", errInvalidJSON, err)
	}
	return nil
}

func validDigest(s string) string {
	if reDigest.MatchString(s) {
		return s
	}
	return ""
}

type packagePayload struct {
	Action          string       `json:"action"`
	Package         *packageBody `json:"package"`
	RegistryPackage *packageBody `json:"registry_package"`
	Repository      struct {
		Owner *ghUser `json:"owner"` // a pointer, as Go's error text for a mistyped repository names it
	} `json:"repository"`
}

type ghUser struct {
	Login string `json:"login"`
}

type packageBody struct {
	Name           string `json:"name"`
	Namespace      string `json:"namespace"`
	PackageType    string `json:"package_type"`
	Owner          ghUser `json:"owner"`
	PackageVersion struct {
		Version           string `json:"version"`
		ContainerMetadata *struct {
			Tag *struct {
				Name   string `json:"name"`
				Digest string `json:"digest"`
			} `json:"tag"`
		} `json:"container_metadata"`
		Metadata json.RawMessage `json:"metadata"` // GitHub sends []; older deliveries carried {"container":{"tags":[…]}}
	} `json:"package_version"`
	Registry struct {
		Host string `json:"host"`
		URL  string `json:"url"`
	} `json:"registry"`
}

// deliveryFromPayload reads the pushed image from a GitHub package or registry_package payload.
func deliveryFromPayload(body []byte) (delivery, error) {
	var p packagePayload
	err := decodeJSON(body, &p)
	pkg := cmp.Or(p.Package, p.RegistryPackage)
	switch {
	case err != nil:
		return delivery{}, err
	case pkg == nil:
		return delivery{}, ignored("not-a-package", "the payload has neither package nor registry_package")
	case p.Action != "published" && p.Action != "updated":
		return delivery{}, ignored("action-ignored", "action %q does not redeploy (only published and updated do)", p.Action)
	case !slices.Contains([]string{"container", "docker"}, strings.ToLower(strings.TrimSpace(pkg.PackageType))):
		return delivery{}, ignored("not-container", "package_type %q is not a container image", pkg.PackageType)
	}
	host, err := registryHost(pkg)
	if err != nil {
		return delivery{}, err
	}
	ns, _, _ := strings.Cut(pkg.Namespace, "/")
	owner := strings.ToLower(strings.TrimSpace(cmp.Or(pkg.Owner.Login, cmp.Or(p.Repository.Owner, &ghUser{}).Login, ns)))
	name := strings.ToLower(strings.TrimSpace(pkg.Name))
	if owner == "" || name == "" {
		return delivery{}, ignored("missing-name", "the payload names no package owner or name")
	}
	d := delivery{host: host, path: owner + "/" + name}
	d.tags, d.digest = pushedTags(pkg)
	if len(d.tags) == 0 {
		return d, ignored("missing-tag", "the pushed manifest has no tag (an untagged or per-platform manifest)")
	}
	_, err = checkPushes([]delivery{d}, nil)
	return d, err
}

// registryHost is registry.host, else registry.url's host, else ghcr.io, also for *.pkg.github.com.
func registryHost(pkg *packageBody) (string, error) {
	host := strings.TrimSpace(pkg.Registry.Host)
	if u := strings.TrimSpace(pkg.Registry.URL); host == "" && u != "" {
		if !strings.Contains(u, "://") {
			u = "https://" + u
		}
		if pu, err := url.Parse(u); err == nil {
			host = pu.Host
		}
	}
	host = strings.ToLower(cmp.Or(host, "ghcr.io"))
	if !reDomain.MatchString(host) {
		return "", fmt.Errorf("payload names an invalid registry host %q", host)
	}
	if strings.HasSuffix(host, ".pkg.github.com") || host == "pkg.github.com" {
		host = "ghcr.io"
	}
	return host, nil
}

// pushedTags lists the pushed tags once each, container_metadata.tag first, and a valid digest.
func pushedTags(pkg *packageBody) (tags []string, digest string) {
	v := pkg.PackageVersion
	add := func(t string) {
		if t = strings.TrimSpace(t); t != "" && !slices.Contains(tags, t) {
			tags = append(tags, t)
		}
	}
	if cm := v.ContainerMetadata; cm != nil && cm.Tag != nil {
		add(cm.Tag.Name)
		digest = validDigest(cm.Tag.Digest)
	}
	var md struct{ Container struct{ Tags []string } }
	if strings.HasPrefix(strings.TrimSpace(string(v.Metadata)), "{") && json.Unmarshal(v.Metadata, &md) == nil {
		for _, t := range md.Container.Tags {
			add(t)
		}
	}
	return tags, cmp.Or(digest, validDigest(v.Version))
}

// pushID is "<prefix>-<id>" if a valid delivery id, else hashID of it: ids of two sources never meet.
func pushID(prefix, id string) string {
	if reDeliveryID.MatchString(prefix+"-"+id) && id != "" {
		return prefix + "-" + id
	}
	return hashID(prefix, id)
}

func hashID(prefix string, parts ...string) string {
	sum := sha256.Sum256([]byte(strings.Join(parts, "\x00")))
	return prefix + "-" + hex.EncodeToString(sum[:16])
}

func splitImageURL(s string) (host, path string) {
	s = strings.TrimSpace(s)
	if _, rest, ok := strings.Cut(s, "://"); ok {
		s = rest
	}
	host, path, _ = strings.Cut(s, "/")
	return strings.ToLower(host), strings.ToLower(path)
}

// checkPushes refuses the whole payload when one reference in ds is invalid; with none, it is why.
func checkPushes(ds []delivery, why error) ([]delivery, error) {
	if len(ds) == 0 {
		return nil, why
	}
	for _, d := range ds {
		for _, t := range d.tags {
			if _, err := parseImageRef(d.ref(t).String()); err != nil {
				return nil, fmt.Errorf("payload names an invalid image: %w", err)
			}
		}
	}
	return ds, nil
}

// isUntagged reports an empty tag or a digest, which registries send for an untagged manifest.
func isUntagged(tag string) bool {
	return strings.TrimSpace(tag) == "" || strings.HasPrefix(tag, "sha256:")
}

// manifestTypes are the manifest and index media types; any other Distribution target is a blob.
var manifestTypes = []string{"application/vnd.docker.distribution.manifest.v1+json", "application/vnd.docker.distribution.manifest.v1+prettyjws",
	"application/vnd.docker.distribution.manifest.v2+json", "application/vnd.docker.distribution.manifest.list.v2+json",
	"application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json"}

// distributionPushes reads a CNCF Distribution envelope's tagged manifest pushes, from request.host.
func distributionPushes(body []byte, _ http.Header) ([]delivery, error) {
	var env struct {
		Events []struct {
			ID     string `json:"id"`
			Action string `json:"action"`
			Target struct {
				MediaType  string `json:"mediaType"`
				Digest     string `json:"digest"`
				Repository string `json:"repository"`
				URL        string `json:"url"`
				Tag        string `json:"tag"`
			} `json:"target"`
			Request struct {
				Host string `json:"host"`
			} `json:"request"`
		} `json:"events"`
	}
	if err := decodeJSON(body, &env); err != nil {
		return nil, err
	}
	why := ignored("no-events", "the envelope holds no events")
	var ds []delivery
	for _, e := range env.Events {
		switch {
		case e.Action != "push":
			why = ignored("not-a-push", "%q events do not redeploy", e.Action)
		case !slices.Contains(manifestTypes, e.Target.MediaType):
			why = ignored("not-a-manifest", "a push of %q is a blob, not a manifest", e.Target.MediaType)
		case isUntagged(e.Target.Tag):
			why = ignored("missing-tag", "the pushed manifest has no tag (an untagged or per-platform manifest)")
		default:
			host, _ := splitImageURL(e.Target.URL)
			host = strings.ToLower(strings.TrimSpace(cmp.Or(e.Request.Host, host)))
			ds = append(ds, delivery{host: host, path: strings.ToLower(e.Target.Repository), tags: []string{e.Target.Tag},
				digest: validDigest(e.Target.Digest), id: pushID("dist", e.ID)})
		}
	}
	return checkPushes(ds, why)
}

// harborPushes reads a Harbor PUSH_ARTIFACT webhook (default format); its id hashes occur_at.
func harborPushes(body []byte, _ http.Header) ([]delivery, error) {
	var ev struct {
		Type      string      `json:"type"`
		OccurAt   json.Number `json:"occur_at"`
		EventData struct {
			Resources []struct {
				Digest      string `json:"digest"`
				Tag         string `json:"tag"`
				ResourceURL string `json:"resource_url"`
			} `json:"resources"`
			Repository struct {
				RepoFullName string `json:"repo_full_name"`
			} `json:"repository"`
		} `json:"event_data"`
	}
	switch err := decodeJSON(body, &ev); {
	case err != nil:
		return nil, err
	case ev.Type != "PUSH_ARTIFACT":
		return nil, ignored("not-a-push", "%q events do not redeploy (and a CloudEvents payload is not read: choose Harbor's default format)", ev.Type)
	}
	path := strings.ToLower(ev.EventData.Repository.RepoFullName)
	var ds []delivery
	for _, res := range ev.EventData.Resources {
		if !isUntagged(res.Tag) {
			host, _ := splitImageURL(res.ResourceURL)
			ds = append(ds, delivery{host: host, path: path, tags: []string{res.Tag}, digest: validDigest(res.Digest),
				id: hashID("harbor", host, path, res.Tag, res.Digest, ev.OccurAt.String())})
		}
	}
	return checkPushes(ds, ignored("missing-tag", "the pushed artifact has no tag"))
}

// giteaPushes reads a Gitea or Forgejo "package" webhook: a container version (the tag) created.
func giteaPushes(body []byte, h http.Header) ([]delivery, error) {
	event, deliveryID := h.Get("X-Gitea-Event"), h.Get("X-Gitea-Delivery")
	if event == "" {
		event, deliveryID = h.Get("X-Forgejo-Event"), h.Get("X-Forgejo-Delivery")
	}
	var ev struct {
		Action  string `json:"action"`
		Package *struct {
			Type      string  `json:"type"`
			Name      string  `json:"name"`
			Version   string  `json:"version"`
			HTMLURL   string  `json:"html_url"`
			CreatedAt string  `json:"created_at"`
			Owner     *ghUser `json:"owner"`
		} `json:"package"`
	}
	err := decodeJSON(body, &ev)
	p := ev.Package
	switch {
	case event != "package":
		return nil, ignored("not-a-package", "%q events do not redeploy", event)
	case err != nil:
		return nil, err
	case p == nil:
		return nil, ignored("not-a-package", "the payload has no package")
	case ev.Action != "created":
		return nil, ignored("not-created", "%q package events do not redeploy", ev.Action)
	case p.Type != "container":
		return nil, ignored("not-container", "package type %q is not a container image", p.Type)
	case isUntagged(p.Version):
		return nil, ignored("missing-tag", "the pushed manifest has no tag (an untagged or per-platform manifest)")
	case p.Owner == nil || p.Owner.Login == "" || p.Name == "":
		return nil, ignored("missing-name", "the payload names no package owner or name")
	}
	host, _ := splitImageURL(p.HTMLURL)
	path := strings.ToLower(p.Owner.Login + "/" + p.Name)
	id := pushID("gitea", deliveryID)
	if deliveryID == "" {
		id = hashID("gitea", host, path, p.Version, p.CreatedAt)
	}
	return checkPushes([]delivery{{host: host, path: path, tags: []string{p.Version}, id: id}}, nil)
}

// dockerHubPushes reads a Docker Hub webhook: push_data.tag pushed to docker.io/repository.repo_name.
func dockerHubPushes(body []byte, _ http.Header) ([]delivery, error) {
	var ev struct {
		PushData *struct {
			Tag      string      `json:"tag"`
			PushedAt json.Number `json:"pushed_at"`
		} `json:"push_data"`
		Repository *struct {
			RepoName string `json:"repo_name"`
		} `json:"repository"`
	}
	switch err := decodeJSON(body, &ev); {
	case err != nil:
		return nil, err
	case ev.PushData == nil || ev.Repository == nil:
		return nil, ignored("not-a-push", "the payload has no push_data or repository")
	case isUntagged(ev.PushData.Tag):
		return nil, ignored("missing-tag", "the push has no tag")
	}
	path := strings.ToLower(strings.TrimSpace(ev.Repository.RepoName))
	if path != "" && !strings.Contains(path, "/") {
		path = "library/" + path
	}
	return checkPushes([]delivery{{host: "docker.io", path: path, tags: []string{ev.PushData.Tag},
		id: hashID("hub", path, ev.PushData.Tag, ev.PushData.PushedAt.String())}}, nil)
}

// quayPushes reads a Quay "Push to Repository" notification; Quay sends no id, the handler gives one.
func quayPushes(body []byte, _ http.Header) ([]delivery, error) {
	var ev struct {
		DockerURL   string          `json:"docker_url"`
		UpdatedTags json.RawMessage `json:"updated_tags"`
	}
	if err := decodeJSON(body, &ev); err != nil {
		return nil, err
	}
	var tags []string
	if strings.HasPrefix(strings.TrimSpace(string(ev.UpdatedTags)), "{") {
		var byTag map[string]any
		if json.Unmarshal(ev.UpdatedTags, &byTag) == nil {
			tags = slices.Sorted(maps.Keys(byTag))
		}
	} else if len(ev.UpdatedTags) > 0 && json.Unmarshal(ev.UpdatedTags, &tags) != nil {
		return nil, fmt.Errorf("%w: updated_tags is neither a list nor an object", errInvalidJSON)
	}
	var d delivery
	d.host, d.path = splitImageURL(ev.DockerURL)
	for _, t := range tags {
		if !isUntagged(t) && !slices.Contains(d.tags, t) {
			d.tags = append(d.tags, t)
		}
	}
	if len(d.tags) == 0 {
		return nil, ignored("not-a-push", "the notification names no updated_tags: not a push with a tag")
	}
	return checkPushes([]delivery{d}, nil)
}

func pullImage(ctx context.Context, cfg *config, lg *logger, ref imageRef) (cmdResult, int) {
	for attempt := 1; ; attempt++ {
		res := runCommand(ctx, cfg.pullTimeout, "podman", "pull", "--quiet", "--", "docker://"+ref.String())
		if res.err == nil || attempt >= cfg.pullAttempts || ctx.Err() != nil {
			return res, attempt
		}
		lg.warnf("pull %s, attempt %d of %d: %v; retrying in %s", ref, attempt, cfg.pullAttempts, res.err, cfg.pullRetryDelay)
		if sleepContext(ctx, cfg.pullRetryDelay) != nil {
			return res, attempt
		}
	}
}

// localImageID is the ID of the local image that ref names, or "" when there is none.
func localImageID(ctx context.Context, cfg *config, ref imageRef) (string, error) {
	res := runCommand(ctx, cfg.commandTimeout, "podman", "image", "inspect", "--format", "{{.Id}}", "--", ref.String())
	if res.err != nil {
		if strings.Contains(res.stderr, "image not known") || strings.Contains(res.stderr, "no such image") {
			return "", nil
		}
		return "", res.err
	}
	return strings.TrimSpace(res.stdout), nil
}

const usageRunTask = `usage: webhook-auto-update run-task [--force] [--digest D] [--state-dir DIR] [--db URL] [--] <unit> <image> <event> <delivery> <path>

Runs one redeploy: holds the image's lock and the unit's, records it in the per-image limit,
pulls the image, restarts the unit and prunes dangling images, writing an event_log row for every
step. The server starts it as a transient unit with systemd-run; it is not meant to be run by hand.
`

func cmdRunTask(c *cli, args []string) int {
	force, digest := false, ""
	cfg, rest, code := c.setup("run-task", usageRunTask, args, func(fs *flag.FlagSet, cfg *config) {
		fs.BoolVar(&force, "force", false, "")
		fs.StringVar(&digest, "digest", "", "")
	})
	if code >= 0 {
		return code
	}
	if len(rest) != 5 {
		c.log.errorf("run-task: want 5 arguments (unit image event delivery path), got %d", len(rest))
		fmt.Fprint(c.stderr, usageRunTask)
		return 2
	}
	t := &task{cfg: cfg, log: c.log, getenv: c.getenv, id: newRequestID(), now: time.Now, started: time.Now(), taskSpec: taskSpec{
		unit: rest[0], image: rest[1], event: rest[2], delivery: rest[3], path: rest[4], force: force, digest: digest}}
	if err := ensureStateDir(cfg.stateDir); err != nil {
		c.log.errorf("%v", err)
		return 1
	}
	events, err := openEventLogWaiting(cfg.dbPath, c.log, taskBusyTimeout)
	if err != nil {
		c.log.errorf("event log unavailable, task events go to stderr: %v", err)
	} else {
		defer events.Close()
		t.events = events
		defer func() { // the server's queue runs the unit's next task once this one's claims are done
			ctx, cancel := context.WithTimeout(context.Background(), 2*taskBusyTimeout)
			defer cancel()
			if err := events.settleTask(ctx, taskUnitName(t.delivery), "done", "", time.Time{}, nil); err != nil {
				c.log.errorf("cannot mark the deliveries of %s done (the server will find it ended): %v", taskUnitName(t.delivery), err)
			}
		}()
	}
	if err = validUnitName(t.unit); err == nil {
		t.ref, err = parseImageRef(t.image)
	}
	if err == nil && t.digest != "" && !reDigest.MatchString(t.digest) {
		err = errors.New("invalid --digest")
	}
	if err != nil {
		t.step("invalid", http.StatusBadRequest, nil, map[string]any{"error": err.Error()})
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	return t.run(ctx)
}

var processStart = time.Now() // so a task's first row says how long its start took

type task struct {
	taskSpec
	cfg     *config
	log     *logger
	getenv  func(string) string // HOME and XDG_CONFIG_HOME, to find the unit's Quadlet file
	events  *eventLog           // nil: rows go to stderr
	id      string
	ref     imageRef
	now     func() time.Time
	started time.Time
}

func (t *task) step(name string, status int, res *cmdResult, extra map[string]any) {
	meta := map[string]any{"delivery": t.delivery, "unit": t.unit, "image": t.image, "event": t.event, "step": name}
	if res != nil {
		meta["exit_code"] = res.exitCode
		if res.stderr != "" {
			meta["stderr"] = res.stderr
		}
		if res.err != nil {
			meta["error"] = res.err.Error()
		}
	}
	maps.Copy(meta, extra)
	now := t.now()
	meta["at_ms"] = now.UnixMilli()
	ev := event{RequestID: t.id, TS: now, Method: "TASK", Path: t.path, Status: status,
		Action: "github-task", Duration: now.Sub(t.started), Meta: meta}
	if t.events == nil {
		spill(t.log, []event{ev}, errors.New("no event log"))
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*taskBusyTimeout)
	defer cancel()
	errText, _ := meta["error"].(string)
	t.events.taskStep(ctx, taskUnitName(t.delivery), name, errText, ev) // a failure is already on stderr
}

// fail logs a failed step as an error, records its row and returns 1, the failed task's status.
func (t *task) fail(name string, status int, res *cmdResult, meta map[string]any, format string, a ...any) int {
	t.log.errorf(format, a...)
	t.step(name, status, res, meta)
	return 1
}

// lock takes the image's lock, then the unit's (in this order: no deadlock); the caller releases held.
func (t *task) lock(ctx context.Context) (held []*fileLock, ok bool) {
	deadline := time.Now().Add(t.cfg.taskLockWait)
	for _, path := range []string{imageLockPath(t.cfg.stateDir, t.image), unitLockPath(t.cfg.stateDir, t.unit)} {
		lock, err := lockFile(ctx, path, time.Until(deadline))
		if err != nil {
			t.fail("lock-failed", http.StatusServiceUnavailable, nil, map[string]any{"error": err.Error(), "lock": filepath.Base(path)},
				"redeploy of %s to %s: %v", t.unit, t.image, err)
			return held, false
		}
		held = append(held, lock)
		now := time.Now()
		os.Chtimes(path, now, now) // a used lock is fresh: prune-state deletes only long-idle ones
	}
	return held, true
}

// run performs the redeploy: exit 0 done, up to date or refused, 1 a step failed (rolled back or not).
func (t *task) run(ctx context.Context) int {
	t.started = t.now()
	t.step("started", http.StatusAccepted, nil, map[string]any{"force": t.force, "digest": t.digest,
		"startup_ms": t.started.Sub(processStart).Milliseconds()})
	held, ok := t.lock(ctx)
	for _, l := range held {
		defer l.Unlock()
	}
	if !ok {
		return 1
	}
	ctr := findUnitContainer(ctx, t.cfg, t.unit, "") // under the unit's lock, before the pull: the check's and rollback's
	pre, ok := t.checkImage(ctx, ctr)
	if !ok || t.rejectedBefore(ctx) {
		return 0
	}
	lim, err := imageLimiter(t.cfg, t.image).take(ctx)
	if err != nil {
		return t.fail("limit-failed", http.StatusInternalServerError, nil, map[string]any{"error": err.Error()},
			"redeploy of %s to %s: per-image limit: %v", t.unit, t.image, err)
	}
	if !lim.allowed {
		t.log.warnf("redeploy of %s to %s refused: more than %d redeploys of this image within %s",
			t.unit, t.image, t.cfg.imageLimit.count, t.cfg.imageLimit.span)
		t.step("rate-limited", http.StatusTooManyRequests, nil, map[string]any{"retry_after_secs": int(lim.retryAfter / time.Second)})
		return 0
	}
	var tagged string // what the tag named: it matters only when no container runs (see rollbackTarget)
	if ctr.imageID == "" {
		if tagged, err = localImageID(ctx, t.cfg, t.ref); err != nil {
			t.log.warnf("redeploy of %s: cannot read the current image of %s: %v", t.unit, t.image, err)
		}
	}
	before := cmp.Or(ctr.imageID, tagged)
	pullStart := t.now()
	res, attempts := pullImage(ctx, t.cfg, t.log, t.ref)
	pullMS := t.now().Sub(pullStart).Milliseconds()
	if res.err != nil {
		return t.fail("pull-failed", http.StatusBadGateway, &res, map[string]any{"attempts": attempts},
			"redeploy of %s: pull of %s failed after %d attempts: %v", t.unit, t.image, attempts, res.err)
	}
	after := strings.TrimSpace(res.stdout) // podman pull --quiet prints the pulled image's ID
	if validDigest("sha256:"+after) == "" {
		t.log.warnf("redeploy of %s: podman pull printed no image ID for %s: %q", t.unit, t.image, after)
		after = ""
	}
	t.step("pulled", http.StatusOK, &res, map[string]any{"attempts": attempts, "previous_image_id": tagged,
		"image_id": after, "running_image_id": ctr.imageID, "pull_ms": pullMS})
	restart, why := decideRestart(restartFacts{before: before, after: after, running: ctr.imageID,
		active: pre.activeState == "active", force: t.force})
	if !restart {
		t.log.infof("%s already runs %s (%s): not restarted", t.unit, t.image, why)
		t.step("up-to-date", http.StatusOK, nil, map[string]any{"image_id": after, "reason": why})
		return 0
	}
	g := t.restartAndGate(ctx, "", pre, ctr.id, after)
	if g.verdict != "" {
		target, source := rollbackTarget(ctr.imageID, before)
		return t.rollback(ctx, target, source, after, g)
	}
	meta := map[string]any{"reason": why, "settle_cut_short": g.cut, "delivery_digest": t.digest, "container_id": g.ctr.id,
		"serving_at_ms": g.servingMS}
	maps.Copy(meta, g.digests)
	if g.ctr.imageID != "" && after != "" && g.ctr.imageID != after {
		meta["warning"] = "the unit's container runs image " + g.ctr.imageID + ", not the pulled " + after
	}
	t.step("healthy", http.StatusOK, nil, meta)
	pruneStart := t.now()
	if res := runCommand(ctx, t.cfg.commandTimeout, "podman", "image", "prune", "-f"); res.err != nil {
		t.log.warnf("redeploy of %s: image prune failed (ignored): %v", t.unit, res.err)
		t.step("prune-failed", http.StatusOK, &res, nil)
	}
	t.log.infof("redeployed %s with %s", t.unit, t.image)
	t.step("completed", http.StatusOK, nil, map[string]any{"image_id": after, "previous_image_id": before,
		"prune_ms": t.now().Sub(pruneStart).Milliseconds()})
	return 0
}

// gateResult is what restartAndGate saw.
type gateResult struct {
	verdict   string // "" healthy
	last      gateSample
	ctr       unitContainer  // the newest container
	servingMS int64          // when it first served (unix ms)
	digests   map[string]any // its image's
	cut       bool           // ctx cut the settle short
	failure   map[string]any // the failed container's exit code, log tail and healthcheck output
}

// restartAndGate restarts the unit and watches the settle; rows are prefix+"restarted" and so on.
func (t *task) restartAndGate(ctx context.Context, prefix string, pre unitSample, old, image string) gateResult {
	bg := context.WithoutCancel(ctx)
	restartStart := t.now()
	res := restartUnit(bg, t.cfg, t.unit)
	if res.err != nil {
		t.fail(prefix+"restart-failed", http.StatusInternalServerError, &res, nil, "redeploy of %s: %srestart failed: %v", t.unit, prefix, res.err)
		return gateResult{verdict: "restart failed: " + res.err.Error()}
	}
	t.step(prefix+"restarted", http.StatusOK, &res, map[string]any{"restart_ms": t.now().Sub(restartStart).Milliseconds()})
	g := gateResult{digests: map[string]any{}}
	looks, asked, checked := 0, false, false // asked: a look asked podman; checked: it found a healthcheck, run in the last look
	sample := func(last bool) (gateSample, error) {
		u, err := sampleUnit(bg, t.cfg, t.unit)
		s := gateSample{at: t.now(), unit: u}
		// The first look asks systemd alone (podman ps slows the start); the last too once a look found no healthcheck.
		if looks++; err != nil || looks == 1 && !last || last && asked && !checked {
			return s, err
		}
		asked = true
		s.ctr = findUnitContainer(bg, t.cfg, t.unit, old)
		g.ctr = cmp.Or(s.ctr, g.ctr)
		if checked = s.ctr.health != "" && s.ctr.state == "running"; checked {
			s.checkFailed = runCommand(bg, t.cfg.commandTimeout, "podman", "healthcheck", "run", "--", s.ctr.id).exitCode == 1
		}
		if g.servingMS == 0 && s.ctr.state == "running" && s.ctr.health != "starting" && s.ctr.health != "unhealthy" && !s.checkFailed {
			g.servingMS = s.at.UnixMilli()
			g.digests = t.digests(bg, s.ctr.id, image)
		}
		return s, nil
	}
	g.verdict, g.last, g.cut = watchGate(ctx, t.now, time.After, t.cfg.healthPoll, t.cfg.healthSettle, pre, sample)
	if g.verdict != "" {
		if g.last.ctr.id == "" { // the look that failed asked systemd alone
			g.ctr = cmp.Or(findUnitContainer(bg, t.cfg, t.unit, old), g.ctr)
		}
		g.failure = t.explainFailure(bg, g.ctr.id)
		meta := map[string]any{"error": g.verdict, "settle_cut_short": g.cut}
		maps.Copy(meta, g.failure)
		t.fail(prefix+"health-failed", http.StatusInternalServerError, nil, meta, "redeploy of %s: %shealth gate failed: %s", t.unit, prefix, g.verdict)
	}
	return g
}

// explainFailure reads a failed container's exit code, log tail and healthcheck output, redacted.
func (t *task) explainFailure(ctx context.Context, id string) map[string]any {
	meta := map[string]any{}
	if id == "" {
		return meta
	}
	res := runCommand(ctx, t.cfg.commandTimeout, "podman", "container", "inspect", "--format", "{{.State.ExitCode}} {{json .State.Health.Log}}", "--", id)
	var runs []struct{ Output string }
	if code, log, ok := strings.Cut(strings.TrimSpace(res.stdout), " "); res.err == nil && ok {
		meta["container_exit_code"], _ = strconv.Atoi(code)
		if json.Unmarshal([]byte(log), &runs) == nil && len(runs) > 0 {
			meta["healthcheck_output"] = redactText(tail(strings.TrimSpace(runs[len(runs)-1].Output), 1024))
		}
	}
	res = runCommand(ctx, t.cfg.commandTimeout, "podman", "logs", "--tail", "20", "--", id) // and tail() bounds its bytes
	if text := strings.TrimSpace(res.stdout + res.stderr); res.err == nil && text != "" {
		meta["log_tail"] = redactText(tail(text, 2048))
	}
	return meta
}

var reSecretText = regexp.MustCompile(`(?i)\b(token|secret|password|passwd|api[_-]?key|authorization)(\s*[:=]\s*)(\S+)`)

// redactText hides the values of token=, secret:, password= and the like in text an app printed.
func redactText(s string) string { return reSecretText.ReplaceAllString(s, "${1}${2}REDACTED") }

// digests is the pulled image's digest and the one its container runs, read in one podman inspect.
func (t *task) digests(ctx context.Context, container, image string) map[string]any {
	meta := map[string]any{}
	res := runCommand(ctx, t.cfg.commandTimeout, "podman", "inspect", "--", container, cmp.Or(image, t.ref.String()))
	var objs []struct{ ID, Digest, ImageDigest string }
	if res.err != nil || json.Unmarshal([]byte(res.stdout), &objs) != nil {
		return meta
	}
	for _, o := range objs {
		if o.ImageDigest != "" {
			meta["running_digest"] = o.ImageDigest
		} else if o.Digest != "" {
			meta["pulled_digest"] = o.Digest
		}
	}
	return meta // no warning on two digests: one image pushed twice has two (see the image ID check)
}

// rollbackTarget is the image the unit's container ran before the pull, else what the local tag named.
func rollbackTarget(running, before string) (target, source string) {
	if running != "" {
		return running, "container"
	}
	return before, "local-tag"
}

var rollbackSources = map[string]string{
	"container": "what the unit's container ran before the pull",
	"local-tag": "what the local tag named before the pull; no container was running",
}

// rollback tags before back as the reference, restarts and gates, keeping the failed image to inspect.
func (t *task) rollback(ctx context.Context, before, source, after string, failed gateResult) int {
	bg := context.WithoutCancel(ctx)
	meta := map[string]any{"error": failed.verdict, "failed_image_id": after, "rollback_source": source}
	maps.Copy(meta, failed.failure)
	exists := before != "" && runCommand(bg, t.cfg.commandTimeout, "podman", "image", "exists", "--", before).err == nil
	if plan := rollbackPlan(before, after, exists); plan != "" {
		meta["rollback_error"] = plan
		return t.fail("rollback-impossible", http.StatusInternalServerError, nil, meta,
			"redeploy of %s failed and cannot be rolled back: %s; the unit is left as it is", t.unit, plan)
	}
	pulled, _ := failed.digests["pulled_digest"].(string)
	meta["rejected_digest"] = cmp.Or(t.digest, pulled, after)
	meta["registry_note"] = fmt.Sprintf("the registry's %s still names the rejected %s: podman auto-update or the next pull "+
		"brings it back; a delivery of it is refused unless forced, so push a fixed image", t.ref, meta["rejected_digest"])
	start := t.now()
	res := runCommand(bg, t.cfg.commandTimeout, "podman", "tag", "--", before, t.ref.String())
	if res.err != nil {
		meta["rollback_error"] = res.err.Error()
		return t.fail("rollback-failed", http.StatusInternalServerError, &res, meta, "redeploy of %s: rollback failed: %v", t.unit, res.err)
	}
	if g := t.restartAndGate(bg, "rollback-", failed.last.unit, failed.ctr.id, before); g.verdict != "" {
		meta["rollback_error"], meta["previous_image_id"] = g.verdict, before
		return t.fail("rollback-failed", http.StatusInternalServerError, nil, meta,
			"redeploy of %s: rollback to %s failed too: %s", t.unit, before, g.verdict)
	}
	t.log.warnf("redeploy of %s to %s failed (%s): rolled back to image %s, %s", t.unit, t.image, failed.verdict, before, rollbackSources[source])
	meta["image_id"], meta["previous_image_id"], meta["rollback_ms"] = before, before, t.now().Sub(start).Milliseconds()
	t.step("rolled-back", http.StatusInternalServerError, nil, meta)
	return 1
}

// rejectedBefore refuses, unless forced, a delivery of a digest the gate rejected on this unit.
func (t *task) rejectedBefore(ctx context.Context) bool {
	if t.force || t.digest == "" || t.events == nil {
		return false
	}
	by, at, err := t.events.rejectedDigest(ctx, t.unit, t.digest)
	if err != nil {
		t.log.warnf("redeploy of %s: cannot read earlier rejections of %s (going ahead): %v", t.unit, t.digest, err)
	}
	if by == "" {
		return false
	}
	why := fmt.Sprintf("the health gate rejected %s on %s at %s (delivery %s): not redeployed again; push a fixed image, "+
		"or redeploy it anyway with POST /api/manual/services/%s and \"force\": true", t.digest, t.unit,
		at.UTC().Format(time.RFC3339), by, strings.TrimSuffix(t.unit, ".service"))
	t.log.warnf("redeploy of %s to %s refused: %s", t.unit, t.image, why)
	t.step("digest-rejected", http.StatusConflict, nil, map[string]any{"reason": why, "rejected_by": by})
	return true
}

// checkImage reads the unit's state and Image=, and whether it runs the pushed image, else refuses.
func (t *task) checkImage(ctx context.Context, ctr unitContainer) (unitSample, bool) {
	pre, uf, err := inspectUnit(ctx, t.cfg, t.getenv, t.unit)
	if err != nil {
		t.log.warnf("redeploy of %s: cannot read the unit's Image= (%v): checking its container's image instead", t.unit, err)
		uf = unitFile{}
	}
	step, why := imageCheck(t.ref, uf.image, ctr.image, t.cfg.allowAnyImage)
	if step == "" {
		return pre, true
	}
	t.log.warnf("redeploy of %s to %s refused, nothing pulled or restarted: %s", t.unit, t.image, why)
	meta := map[string]any{"reason": why, "running_image": ctr.image}
	if uf.source != "" {
		meta["unit_image"], meta["unit_image_source"] = uf.image, uf.source
	}
	t.step(step, http.StatusConflict, nil, meta)
	return pre, false
}

// imageCheck is "" when ref matches the unit's Image=, else (allowAny aside) its container's, else the step and why.
func imageCheck(ref imageRef, configured, running string, allowAny bool) (step, why string) {
	want, what := configured, "the unit's Image="
	switch {
	case configured != "":
	case allowAny:
		return "", ""
	case running != "":
		want, what = running, "the unit has no Image= (no Quadlet .container file) and its container runs an image that"
	default:
		return "image-unknown", "the unit has no Image= (no Quadlet .container file) and runs no container, so which image it runs is unknown: " +
			"start it, give it a .container file with Image=, or set WEBHOOK_ALLOW_ANY_IMAGE=true"
	}
	w, err := parseImageRef(withDefaultTag(want))
	if err != nil {
		return "image-unknown", fmt.Sprintf("%s %q is not a full image reference (registry/owner/name[:tag])", what, want)
	}
	if _, text := imageMismatch(w, ref.host, ref.path, []string{ref.tag}); text != "" {
		return "image-mismatch", text
	}
	return "", ""
}

type restartFacts struct {
	before, after string // the reference's local image ID before and after the pull ("" none)
	running       string // image ID of the unit's container ("" not found)
	active, force bool   // the unit is active; the redeploy is forced
}

// decideRestart says whether a redeploy must restart the unit, and why: an unchanged active one is left.
func decideRestart(f restartFacts) (bool, string) {
	switch {
	case f.force:
		return true, "forced"
	case !f.active:
		return true, "the unit is not active"
	case f.after == "":
		return true, "the pulled image ID is unknown"
	case f.running != "" && f.running != f.after:
		return true, "the container runs another image"
	case f.running == "" && f.before != f.after:
		return true, "a new image was pulled"
	}
	return false, "up to date"
}

// rollbackPlan says why a rollback from after to before is impossible, or "" when it can run.
func rollbackPlan(before, after string, beforeExists bool) string {
	switch {
	case before == "":
		return "there was no previous image"
	case before == after:
		return "the previous image is the one that failed"
	case !beforeExists:
		return "the previous image " + before + " no longer exists (pruned)"
	}
	return ""
}

// unitContainer is one of a unit's containers; health is healthy, unhealthy, starting or "" (none).
type unitContainer struct {
	id, imageID, image, state, health string
	exitCode                          int
}

var reHealth = regexp.MustCompile(`\((healthy|unhealthy|starting)\)`)

// findUnitContainer finds by label, else name systemd-<name>, the newest running container, else (not
// set) the newest other than not; not found is the zero value.
func findUnitContainer(ctx context.Context, cfg *config, unit, not string) unitContainer {
	type psEntry struct { // a container in podman ps --format json; Status ends "(healthy)" and so on
		ID, ImageID, Image, State, Status string
		ExitCode                          int
		Created                           int64
	}
	for _, filter := range []string{"label=PODMAN_SYSTEMD_UNIT=" + unit, "name=^systemd-" + strings.TrimSuffix(unit, ".service") + "$"} {
		res := runCommand(ctx, cfg.commandTimeout, "podman", "ps", "--all", "--no-trunc", "--filter", filter, "--format", "json")
		var list []psEntry
		if res.err != nil || json.Unmarshal([]byte(cmp.Or(strings.TrimSpace(res.stdout), "[]")), &list) != nil {
			return unitContainer{}
		}
		slices.SortStableFunc(list, func(a, b psEntry) int { return cmp.Compare(b.Created, a.Created) })
		for _, c := range list {
			if c.ID != not && (not != "" || c.State == "running") {
				return unitContainer{id: c.ID, imageID: strings.TrimPrefix(c.ImageID, "sha256:"), image: c.Image,
					state: c.State, health: strings.Trim(reHealth.FindString(c.Status), "()"), exitCode: c.ExitCode}
			}
		}
		if len(list) > 0 {
			break // the label found the unit's containers: none is the one asked for
		}
	}
	return unitContainer{}
}

// planRedeploy is the manual API's dry run: what run-task would do, found by reading only.
func planRedeploy(ctx context.Context, cfg *config, getenv func(string) string, unit string, ref imageRef, force bool) []string {
	ctr := findUnitContainer(ctx, cfg, unit, "")
	pre, uf, cerr := inspectUnit(ctx, cfg, getenv, unit)
	if step, why := imageCheck(ref, uf.image, ctr.image, cfg.allowAnyImage); cerr == nil && step != "" {
		return []string{"refuse (" + step + "), pulling and restarting nothing: " + why}
	}
	plan := []string{fmt.Sprintf("pull %s (podman pull -- docker://%s, %d attempts %s apart)", ref, ref, cfg.pullAttempts, cfg.pullRetryDelay)}
	before, err := localImageID(ctx, cfg, ref)
	switch {
	case force:
		plan = append(plan, "restart "+unit+" even if the image is unchanged (force)")
	case cerr != nil && !errors.Is(cerr, errUnitNotFound):
		plan = append(plan, "restart "+unit+" if the pulled image differs (its state cannot be read: "+cerr.Error()+")")
	case pre.activeState != "active":
		plan = append(plan, "restart "+unit+": it is "+pre.activeState+", not active")
	case ctr.imageID != "":
		plan = append(plan, "restart "+unit+" only if the pulled image differs from the one its container runs ("+ctr.imageID+"), else record up-to-date")
	default:
		plan = append(plan, "restart "+unit+" only if the pulled image differs from the local one ("+cmp.Or(before, "none")+"), else record up-to-date")
	}
	plan = append(plan, fmt.Sprintf("after a restart, require %s to stay active for %s without systemd restarting it, its container running and its podman healthcheck (if any) passing, looked at every %s: a failure ends the wait", unit, cfg.healthSettle, cfg.healthPoll))
	target, source := rollbackTarget(ctr.imageID, before)
	switch reason := rollbackPlan(target, "", target != ""); {
	case err != nil && ctr.imageID == "":
		plan = append(plan, "on a failed gate, roll back to the current local image if it can be read (it cannot now: "+err.Error()+")")
	case reason != "":
		plan = append(plan, "on a failed gate, no rollback is possible: "+reason)
	default:
		plan = append(plan, "on a failed gate, tag "+target+" ("+rollbackSources[source]+") back as "+ref.String()+", restart and check again; keep the new image for inspection")
	}
	return append(plan, "after a healthy result, podman image prune -f")
}
