// podman.go owns container images and the redeploy: reading push payloads (GitHub's package
// events and each registry's push event) into image references, the reference grammar, the
// podman command lines, and run-task, which pulls, restarts, gates and rolls back.
//
// Rules: payload parsers are pure; what is fine but not a tagged push is an *ignoredError, and
// one invalid reference refuses the whole payload. A reference reaches podman's argv only after
// parseImageRef accepted it, always as "docker://REF" after "--". A redeploy pulls only the image
// the unit runs (its Image=, else its container's, checked before the pull) and rolls back to
// what its container ran before the pull.
package main

import (
	"bytes"
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
	"strings"
	"syscall"
	"time"
)

// taskSpec is what one run-task is asked to do.
type taskSpec struct {
	unit     string // validated service name
	image    string // validated image reference
	event    string // X-GitHub-Event, or "manual"
	delivery string // GitHub delivery id, or a generated one; names the transient unit
	path     string // the request path that caused it
	force    bool   // restart even when the pulled image is unchanged
	digest   string // manifest digest the delivery named, recorded for verification
}

// imageRef is a parsed image reference: host/path with a tag and/or a digest.
type imageRef struct {
	host   string
	path   string
	tag    string
	digest string
}

// repo is the reference without tag or digest.
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

// The OCI distribution reference grammar (distribution/reference, regexp.go), restricted to
// references with an explicit registry host.
var (
	refDomainComponent = `(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])`
	refDomain          = `(?:` + refDomainComponent + `(?:\.` + refDomainComponent + `)*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?`
	refPathComponent   = `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`
	reDomain           = regexp.MustCompile(`^` + refDomain + `$`)
	rePath             = regexp.MustCompile(`^` + refPathComponent + `(?:/` + refPathComponent + `)*$`)
	reTag              = regexp.MustCompile(`^[\w][\w.-]{0,127}$`)
	reDigest           = regexp.MustCompile(`^sha256:[a-f0-9]{64}$`)
)

// parseImageRef parses and validates "host/path[:tag][@digest]". The host is required (it must
// contain "." or ":" or be "localhost", as the distribution grammar tells a host from a path),
// and at least a tag or a digest is required, so a pull never guesses.
func parseImageRef(s string) (imageRef, error) {
	var r imageRef
	if s == "" || len(s) > 512 || strings.HasPrefix(s, "-") || strings.ContainsAny(s, " \t\r\n\x00\\") {
		return r, fmt.Errorf("invalid image reference %q", s)
	}
	rest := s
	if i := strings.IndexByte(rest, '@'); i >= 0 {
		r.digest = rest[i+1:]
		rest = rest[:i]
		if !reDigest.MatchString(r.digest) {
			return r, fmt.Errorf("invalid image reference %q: bad digest", s)
		}
	}
	host, p, ok := strings.Cut(rest, "/")
	if !ok || !(strings.ContainsAny(host, ".:") || host == "localhost") {
		return r, fmt.Errorf("invalid image reference %q: a registry host is required (e.g. ghcr.io/owner/name:tag)", s)
	}
	if i := strings.LastIndexByte(p, ':'); i >= 0 {
		r.tag = p[i+1:]
		p = p[:i]
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

// withDefaultTag adds ":latest" to a reference that names neither a tag nor a digest, as podman
// reads "Image=ghcr.io/me/app" in a Quadlet file.
func withDefaultTag(s string) string {
	last := s[strings.LastIndexByte(s, '/')+1:]
	if s == "" || strings.Contains(last, ":") || strings.Contains(s, "@") || !strings.Contains(s, "/") {
		return s
	}
	return s + ":latest"
}

// delivery is what a push notification says was pushed: one repository, and its tags.
type delivery struct {
	host   string
	path   string   // owner/name, lowercased
	tags   []string // every non-empty pushed tag, first the primary one
	digest string   // manifest digest when the payload carries one
	id     string   // the delivery id it is claimed under, unique per source ("" until known)
}

// repo is the pushed repository, host/owner/name.
func (d delivery) repo() string { return d.host + "/" + d.path }

// ref is the reference to pull for one of the pushed tags.
func (d delivery) ref(tag string) imageRef {
	return imageRef{host: d.host, path: d.path, tag: tag}
}

// imageMismatch says which check a pushed image fails against want, the image a unit runs:
// reason is host-mismatch, repository-mismatch or tag-mismatch and text says what differs; both
// are "" when host, path and one of tags match want.
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

// ignoredError is a payload the webhook acknowledges (202) but does not act on; reason is the
// machine-readable word that goes into the response and the event row.
type ignoredError struct{ reason, detail string }

func (e *ignoredError) Error() string { return e.reason + ": " + e.detail }

func ignored(reason, format string, a ...any) error {
	return &ignoredError{reason: reason, detail: fmt.Sprintf(format, a...)}
}

// The payload fields this program reads, as documented for GitHub's "package" and
// "registry_package" webhook events.
type packagePayload struct {
	Action          string       `json:"action"`
	Package         *packageBody `json:"package"`
	RegistryPackage *packageBody `json:"registry_package"`
	Repository      *struct {
		Owner *ghUser `json:"owner"`
	} `json:"repository"`
}

type ghUser struct {
	Login string `json:"login"`
}

type packageBody struct {
	Name           string  `json:"name"`
	Namespace      string  `json:"namespace"`
	PackageType    string  `json:"package_type"`
	Owner          *ghUser `json:"owner"`
	PackageVersion *struct {
		Version           string `json:"version"`
		ContainerMetadata *struct {
			Tag *struct {
				Name   string `json:"name"`
				Digest string `json:"digest"`
			} `json:"tag"`
		} `json:"container_metadata"`
		// GitHub documents metadata as an array (and sends []); older container deliveries
		// carried {"container":{"tags":[…]}}. Decoded by hand so either shape is accepted.
		Metadata json.RawMessage `json:"metadata"`
	} `json:"package_version"`
	Registry *struct {
		Host string `json:"host"`
		URL  string `json:"url"`
	} `json:"registry"`
}

// errInvalidJSON is a body that does not parse as the JSON its source sends: no source sends
// one, so it is refused (400), not acknowledged as something merely not for us.
var errInvalidJSON = errors.New("the body is not valid JSON")

// redeployActions are the package event actions that redeploy: GitHub's package and
// registry_package events are "published" (a new version) or "updated" (a version's tags moved).
var redeployActions = []string{"published", "updated"}

// deliveryFromPayload extracts the pushed image from a package or registry_package payload.
// Payloads that are fine but not for us return an *ignoredError; a body that is not JSON, or
// names an image that is not a valid reference, returns another error.
func deliveryFromPayload(body []byte) (delivery, error) {
	var p packagePayload
	if err := json.Unmarshal(body, &p); err != nil {
		return delivery{}, fmt.Errorf("%w: %v", errInvalidJSON, err)
	}
	pkg := p.Package
	if pkg == nil {
		pkg = p.RegistryPackage
	}
	if pkg == nil {
		return delivery{}, ignored("not-a-package", "the payload has neither package nor registry_package")
	}
	if !slices.Contains(redeployActions, p.Action) {
		return delivery{}, ignored("action-ignored", "action %q does not redeploy (only published and updated do)", p.Action)
	}
	switch strings.ToLower(strings.TrimSpace(pkg.PackageType)) {
	case "container", "docker":
	default:
		return delivery{}, ignored("not-container", "package_type %q is not a container image", pkg.PackageType)
	}
	host, err := registryHost(pkg)
	if err != nil {
		return delivery{}, err
	}
	owner, name := packageName(&p, pkg)
	if owner == "" || name == "" {
		return delivery{}, ignored("missing-name", "the payload names no package owner or name")
	}
	d := delivery{host: host, path: owner + "/" + name}
	d.tags, d.digest = pushedTags(pkg)
	if len(d.tags) == 0 {
		return d, ignored("missing-tag", "the pushed manifest has no tag (an untagged or per-platform manifest)")
	}
	// Every reference we could act on must pass the grammar, or the delivery is refused whole.
	for _, t := range d.tags {
		if _, err := parseImageRef(d.ref(t).String()); err != nil {
			return d, fmt.Errorf("payload names an invalid image: %w", err)
		}
	}
	return d, nil
}

// registryHost is the lowercased registry host a package was pushed to: registry.host, else the
// host of registry.url, else ghcr.io. GitHub's registry object names itself
// https://CONTAINER.pkg.github.com/OWNER; its images live on ghcr.io.
func registryHost(pkg *packageBody) (string, error) {
	host := "ghcr.io"
	if pkg.Registry != nil {
		if h := strings.TrimSpace(pkg.Registry.Host); h != "" {
			host = h
		} else if u := strings.TrimSpace(pkg.Registry.URL); u != "" {
			if !strings.Contains(u, "://") {
				u = "https://" + u
			}
			if pu, err := url.Parse(u); err == nil && pu.Host != "" {
				host = pu.Host
			}
		}
	}
	host = strings.ToLower(host)
	if !reDomain.MatchString(host) {
		return "", fmt.Errorf("payload names an invalid registry host %q", host)
	}
	if strings.HasSuffix(host, ".pkg.github.com") || host == "pkg.github.com" {
		host = "ghcr.io"
	}
	return host, nil
}

// packageName is the package's owner (package.owner.login, else repository.owner.login, else
// the first part of package.namespace) and name, both lowercased.
func packageName(p *packagePayload, pkg *packageBody) (owner, name string) {
	switch {
	case pkg.Owner != nil && pkg.Owner.Login != "":
		owner = pkg.Owner.Login
	case p.Repository != nil && p.Repository.Owner != nil && p.Repository.Owner.Login != "":
		owner = p.Repository.Owner.Login
	case pkg.Namespace != "":
		owner, _, _ = strings.Cut(pkg.Namespace, "/")
	}
	return strings.ToLower(strings.TrimSpace(owner)), strings.ToLower(strings.TrimSpace(pkg.Name))
}

// pushedTags lists the non-blank pushed tags, primary (container_metadata.tag) first and each
// once, and the manifest digest when the payload carries a valid one.
func pushedTags(pkg *packageBody) (tags []string, digest string) {
	v := pkg.PackageVersion
	if v == nil {
		return nil, ""
	}
	seen := map[string]bool{}
	add := func(t string) {
		if t = strings.TrimSpace(t); t != "" && !seen[t] {
			seen[t] = true
			tags = append(tags, t)
		}
	}
	if cm := v.ContainerMetadata; cm != nil && cm.Tag != nil {
		add(cm.Tag.Name)
		if reDigest.MatchString(cm.Tag.Digest) {
			digest = cm.Tag.Digest
		}
	}
	var md struct {
		Container *struct {
			Tags []string `json:"tags"`
		} `json:"container"`
	}
	if bytes.HasPrefix(bytes.TrimSpace(v.Metadata), []byte("{")) && json.Unmarshal(v.Metadata, &md) == nil && md.Container != nil {
		for _, t := range md.Container.Tags {
			add(t)
		}
	}
	if digest == "" && reDigest.MatchString(v.Version) {
		digest = v.Version
	}
	return tags, digest
}

// Registry push events, as each project documents its webhook payload. Every parser returns one
// delivery per pushed repository and tag set, with the id it is claimed under: the source's own
// event id where it sends one, else a hash of what identifies the push (so a retry of the same
// event is a duplicate), prefixed with the source, so ids of different sources never meet.

// pushID is the delivery id of an event a source identified as id: "<prefix>-<id>" when that is a
// valid delivery id, else a stable hash of it.
func pushID(prefix, id string) string {
	if reDeliveryID.MatchString(prefix+"-"+id) && id != "" {
		return prefix + "-" + id
	}
	return hashID(prefix, id)
}

// hashID is "<prefix>-" and 32 hex digits of the SHA-256 of parts: a stable id for an event its
// source does not number.
func hashID(prefix string, parts ...string) string {
	sum := sha256.Sum256([]byte(strings.Join(parts, "\x00")))
	return prefix + "-" + hex.EncodeToString(sum[:16])
}

// splitImageURL splits "host/path" (a scheme, as in "https://host/path", is dropped) into its
// lowercased host and path.
func splitImageURL(s string) (host, path string) {
	s = strings.TrimSpace(s)
	if _, rest, ok := strings.Cut(s, "://"); ok {
		s = rest
	}
	host, path, _ = strings.Cut(s, "/")
	return strings.ToLower(host), strings.ToLower(path)
}

// checkPushes returns ds when every reference in it is valid, refusing the whole payload
// otherwise; no push at all is ignored with why.
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

// isUntagged reports a tag that is empty or a digest: registries name an untagged manifest by
// its digest where a tag would be.
func isUntagged(tag string) bool {
	return strings.TrimSpace(tag) == "" || strings.HasPrefix(tag, "sha256:")
}

// manifestTypes are the media types of manifests and indexes; every other target of a
// Distribution event is a blob (a layer or a config).
var manifestTypes = map[string]bool{
	"application/vnd.docker.distribution.manifest.v1+json":      true,
	"application/vnd.docker.distribution.manifest.v1+prettyjws": true,
	"application/vnd.docker.distribution.manifest.v2+json":      true,
	"application/vnd.docker.distribution.manifest.list.v2+json": true,
	"application/vnd.oci.image.manifest.v1+json":                true,
	"application/vnd.oci.image.index.v1+json":                   true,
}

// distributionPushes reads a CNCF Distribution (registry:2) notification envelope
// (application/vnd.docker.distribution.events.v1+json): the manifest pushes with a tag. Blob
// pushes, pulls, deletes and untagged manifests (a multi-platform image's per-platform ones) are
// skipped. The host is the one the client pushed to (request.host), which is the one units pull
// from; the event id is Distribution's own.
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
	if err := json.Unmarshal(body, &env); err != nil {
		return nil, fmt.Errorf("%w: %v", errInvalidJSON, err)
	}
	why := ignored("no-events", "the envelope holds no events")
	var ds []delivery
	for _, e := range env.Events {
		switch {
		case e.Action != "push":
			why = ignored("not-a-push", "%q events do not redeploy", e.Action)
			continue
		case !manifestTypes[e.Target.MediaType]:
			why = ignored("not-a-manifest", "a push of %q is a blob, not a manifest", e.Target.MediaType)
			continue
		case isUntagged(e.Target.Tag):
			why = ignored("missing-tag", "the pushed manifest has no tag (an untagged or per-platform manifest)")
			continue
		}
		host := e.Request.Host
		if host == "" {
			host, _ = splitImageURL(e.Target.URL)
		}
		d := delivery{host: strings.ToLower(strings.TrimSpace(host)), path: strings.ToLower(e.Target.Repository),
			tags: []string{e.Target.Tag}, id: pushID("dist", e.ID)}
		if reDigest.MatchString(e.Target.Digest) {
			d.digest = e.Target.Digest
		}
		ds = append(ds, d)
	}
	return checkPushes(ds, why)
}

// harborPushes reads a Harbor webhook in its default payload format: a PUSH_ARTIFACT event, one
// delivery per tagged resource. Harbor numbers no events, so the id hashes the resource and the
// event's time (occur_at), which a retry keeps.
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
	if err := json.Unmarshal(body, &ev); err != nil {
		return nil, fmt.Errorf("%w: %v", errInvalidJSON, err)
	}
	if ev.Type != "PUSH_ARTIFACT" {
		return nil, ignored("not-a-push", "%q events do not redeploy (and a CloudEvents payload is not read: choose Harbor's default format)", ev.Type)
	}
	why := ignored("missing-tag", "the pushed artifact has no tag")
	var ds []delivery
	for _, res := range ev.EventData.Resources {
		if isUntagged(res.Tag) {
			continue
		}
		host, _ := splitImageURL(res.ResourceURL)
		path := strings.ToLower(ev.EventData.Repository.RepoFullName)
		d := delivery{host: host, path: path, tags: []string{res.Tag},
			id: hashID("harbor", host, path, res.Tag, res.Digest, ev.OccurAt.String())}
		if reDigest.MatchString(res.Digest) {
			d.digest = res.Digest
		}
		ds = append(ds, d)
	}
	return checkPushes(ds, why)
}

// giteaPushes reads a Gitea or Forgejo "package" webhook: a container package version created.
// The version is the tag (a digest for an untagged manifest); the registry is the instance
// itself, so the host comes from the package's html_url. The id is the delivery header's.
func giteaPushes(body []byte, h http.Header) ([]delivery, error) {
	event, deliveryID := h.Get("X-Gitea-Event"), h.Get("X-Gitea-Delivery")
	if event == "" {
		event, deliveryID = h.Get("X-Forgejo-Event"), h.Get("X-Forgejo-Delivery")
	}
	if event != "package" {
		return nil, ignored("not-a-package", "%q events do not redeploy", event)
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
	if err := json.Unmarshal(body, &ev); err != nil {
		return nil, fmt.Errorf("%w: %v", errInvalidJSON, err)
	}
	p := ev.Package
	switch {
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

// dockerHubPushes reads a Docker Hub repository webhook: a push of push_data.tag to
// repository.repo_name on docker.io ("nginx" is "library/nginx"). Docker Hub numbers no events,
// so the id hashes the repository, the tag and the push time.
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
	if err := json.Unmarshal(body, &ev); err != nil {
		return nil, fmt.Errorf("%w: %v", errInvalidJSON, err)
	}
	switch {
	case ev.PushData == nil || ev.Repository == nil:
		return nil, ignored("not-a-push", "the payload has no push_data or repository")
	case isUntagged(ev.PushData.Tag):
		return nil, ignored("missing-tag", "the push has no tag")
	}
	path := strings.ToLower(strings.TrimSpace(ev.Repository.RepoName))
	if path != "" && !strings.Contains(path, "/") {
		path = "library/" + path
	}
	tag := ev.PushData.Tag
	return checkPushes([]delivery{{host: "docker.io", path: path, tags: []string{tag},
		id: hashID("hub", path, tag, ev.PushData.PushedAt.String())}}, nil)
}

// quayPushes reads a Quay "Push to Repository" notification: the tags in updated_tags of the
// image at docker_url (a list; early Quay sent an object of tag → image id, read too). Other
// notifications (builds, vulnerabilities) carry no updated_tags. Quay sends neither an id nor a
// time, so the handler claims each request under its own id.
func quayPushes(body []byte, _ http.Header) ([]delivery, error) {
	var ev struct {
		DockerURL   string          `json:"docker_url"`
		UpdatedTags json.RawMessage `json:"updated_tags"`
	}
	if err := json.Unmarshal(body, &ev); err != nil {
		return nil, fmt.Errorf("%w: %v", errInvalidJSON, err)
	}
	var tags []string
	if bytes.HasPrefix(bytes.TrimSpace(ev.UpdatedTags), []byte("{")) {
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

// pullImage pulls ref with retries: cfg.pullAttempts attempts, cfg.pullRetryDelay apart, each
// bounded by cfg.pullTimeout. It returns the last result and how many attempts were made.
func pullImage(ctx context.Context, cfg *config, lg *logger, ref imageRef) (cmdResult, int) {
	var res cmdResult
	for attempt := 1; ; attempt++ {
		res = runCommand(ctx, cfg.pullTimeout, "podman", "pull", "--quiet", "--", "docker://"+ref.String())
		if res.err == nil || attempt >= cfg.pullAttempts || ctx.Err() != nil {
			return res, attempt
		}
		lg.warnf("pull %s, attempt %d of %d: %v; retrying in %s", ref, attempt, cfg.pullAttempts, res.err, cfg.pullRetryDelay)
		select {
		case <-ctx.Done():
			return res, attempt
		case <-time.After(cfg.pullRetryDelay):
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

// pruneImages removes dangling images; callers only warn on failure.
func pruneImages(ctx context.Context, cfg *config) cmdResult {
	return runCommand(ctx, cfg.commandTimeout, "podman", "image", "prune", "-f")
}

const usageRunTask = `usage: webhook-auto-update run-task [--force] [--digest D] [--state-dir DIR] [--db URL] [--] <unit> <image> <event> <delivery> <path>

Runs one redeploy: holds the image's lock and the unit's, records it in the per-image limit,
pulls the image, restarts the unit and prunes dangling images, writing an event_log row for every
step. The server starts it as a transient unit with systemd-run; it is not meant to be run by hand.
`

func cmdRunTask(c *cli, args []string) int {
	var force bool
	var digest string
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
		// The redeploy still runs: its rows go to stderr (and so to the journal) instead.
		c.log.errorf("event log unavailable, task events go to stderr: %v", err)
	} else {
		defer events.Close()
		t.events = events
		// The server's queue runs the unit's next task once this one's claims are done.
		defer func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*taskBusyTimeout)
			defer cancel()
			if err := events.settleTask(ctx, taskUnitName(t.delivery), "done", "", time.Time{}, nil); err != nil {
				c.log.errorf("cannot mark the deliveries of %s done (the server will find it ended): %v", taskUnitName(t.delivery), err)
			}
		}()
	}
	if err := validUnitName(t.unit); err != nil {
		t.step("invalid", http.StatusBadRequest, nil, map[string]any{"error": err.Error()})
		return 2
	}
	ref, err := parseImageRef(t.image)
	if err != nil {
		t.step("invalid", http.StatusBadRequest, nil, map[string]any{"error": err.Error()})
		return 2
	}
	t.ref = ref
	if t.digest != "" && !reDigest.MatchString(t.digest) {
		t.step("invalid", http.StatusBadRequest, nil, map[string]any{"error": "invalid --digest"})
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	return t.run(ctx)
}

// task is one redeploy of one unit to one image, as run by run-task.
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

// step writes the event_log row of one step (action github-task).
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
	for k, v := range extra {
		meta[k] = v
	}
	ev := event{RequestID: t.id, TS: t.now(), Method: "TASK", Path: t.path, Status: status,
		Action: "github-task", Duration: t.now().Sub(t.started), Meta: meta}
	if t.events == nil {
		spill(t.log, []event{ev}, errors.New("no event log"))
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*taskBusyTimeout)
	defer cancel()
	errText, _ := meta["error"].(string)
	t.events.taskStep(ctx, taskUnitName(t.delivery), name, errText, ev) // a failure is already on stderr
}

// run performs the redeploy and returns the exit status: 0 done, up to date, or refused by the
// per-image limit (which is not a failure); 1 a step failed, whether or not it was rolled back.
func (t *task) run(ctx context.Context) int {
	t.started = t.now()
	t.step("started", http.StatusAccepted, nil, map[string]any{"force": t.force, "digest": t.digest})
	// One redeploy of an image at a time, and one of a unit: two tags pushed for one unit must not
	// restart it at once, or one's rollback could undo the other's restart. Every task takes the
	// image's lock first, so no two tasks can each hold a lock the other waits for.
	deadline := time.Now().Add(t.cfg.taskLockWait)
	for _, path := range []string{imageLockPath(t.cfg.stateDir, t.image), unitLockPath(t.cfg.stateDir, t.unit)} {
		lock, err := lockFile(ctx, path, time.Until(deadline))
		if err != nil {
			t.log.errorf("redeploy of %s to %s: %v", t.unit, t.image, err)
			t.step("lock-failed", http.StatusServiceUnavailable, nil, map[string]any{"error": err.Error(), "lock": filepath.Base(path)})
			return 1
		}
		defer lock.Unlock()
		// A used lock is a fresh lock: prune-state deletes only those idle for its whole retention.
		now := time.Now()
		os.Chtimes(path, now, now)
	}

	// Read before the pull, under the unit's lock: the image the unit's container runs is both
	// what the pushed image must be (checkImage) and what a failed redeploy rolls back to.
	ctr := findUnitContainer(ctx, t.cfg, t.unit)
	if !t.checkImage(ctx, ctr) {
		return 0
	}

	lim, err := imageLimiter(t.cfg, t.image).take(ctx)
	if err != nil {
		t.log.errorf("redeploy of %s to %s: per-image limit: %v", t.unit, t.image, err)
		t.step("limit-failed", http.StatusInternalServerError, nil, map[string]any{"error": err.Error()})
		return 1
	}
	if !lim.allowed {
		t.log.warnf("redeploy of %s to %s refused: more than %d redeploys of this image within %s",
			t.unit, t.image, t.cfg.imageLimit.count, t.cfg.imageLimit.span)
		t.step("rate-limited", http.StatusTooManyRequests, nil, map[string]any{"retry_after_secs": int(lim.retryAfter / time.Second)})
		return 0
	}

	before, err := localImageID(ctx, t.cfg, t.ref)
	if err != nil {
		t.log.warnf("redeploy of %s: cannot read the current image of %s: %v", t.unit, t.image, err)
	}
	pullStart := t.now()
	res, attempts := pullImage(ctx, t.cfg, t.log, t.ref)
	pullMS := t.now().Sub(pullStart).Milliseconds()
	if res.err != nil {
		t.log.errorf("redeploy of %s: pull of %s failed after %d attempts: %v", t.unit, t.image, attempts, res.err)
		t.step("pull-failed", http.StatusBadGateway, &res, map[string]any{"attempts": attempts})
		return 1
	}
	after, err := localImageID(ctx, t.cfg, t.ref)
	if err != nil || after == "" {
		t.log.warnf("redeploy of %s: cannot read the pulled image of %s: %v", t.unit, t.image, err)
	}
	t.step("pulled", http.StatusOK, &res, map[string]any{"attempts": attempts, "previous_image_id": before,
		"image_id": after, "running_image_id": ctr.imageID, "pull_ms": pullMS})

	pre, err := sampleUnit(ctx, t.cfg, t.unit)
	if err != nil {
		t.log.warnf("redeploy of %s: cannot read the unit state: %v", t.unit, err)
	}
	restart, why := decideRestart(restartFacts{before: before, after: after, running: ctr.imageID,
		active: pre.activeState == "active", force: t.force})
	if !restart {
		t.log.infof("%s already runs %s (%s): not restarted", t.unit, t.image, why)
		t.step("up-to-date", http.StatusOK, nil, map[string]any{"image_id": after, "reason": why})
		return 0
	}

	verdict, interrupted := t.restartAndGate(ctx, pre)
	if verdict != "" {
		target, source := rollbackTarget(ctr.imageID, before)
		return t.rollback(ctx, target, source, after, verdict)
	}
	t.step("healthy", http.StatusOK, nil, t.verify(ctx, after, map[string]any{"reason": why, "settle_cut_short": interrupted}))
	if res := pruneImages(ctx, t.cfg); res.err != nil {
		t.log.warnf("redeploy of %s: image prune failed (ignored): %v", t.unit, res.err)
		t.step("prune-failed", http.StatusOK, &res, nil)
	}
	t.log.infof("redeployed %s with %s", t.unit, t.image)
	t.step("completed", http.StatusOK, nil, map[string]any{"image_id": after})
	return 0
}

// restartAndGate restarts the unit and watches it for the settle window. It returns the gate's
// verdict ("" healthy) and whether a stop request cut the window short.
func (t *task) restartAndGate(ctx context.Context, pre unitSample) (string, bool) {
	restartStart := t.now()
	res := restartUnit(context.WithoutCancel(ctx), t.cfg, t.unit)
	restartMS := t.now().Sub(restartStart).Milliseconds()
	if res.err != nil {
		t.log.errorf("redeploy of %s: restart failed: %v", t.unit, res.err)
		t.step("restart-failed", http.StatusInternalServerError, &res, nil)
		return "restart failed: " + res.err.Error(), false
	}
	t.step("restarted", http.StatusOK, &res, map[string]any{"restart_ms": restartMS})
	baseline := pre
	if post, err := sampleUnit(context.WithoutCancel(ctx), t.cfg, t.unit); err == nil && post.nRestarts < baseline.nRestarts {
		baseline = post // systemd reset NRestarts on the explicit restart
	}
	samples, interrupted := watchUnit(ctx, t.cfg, t.unit, baseline)
	verdict := gateVerdict(baseline, samples)
	if verdict == "" {
		if ctr := findUnitContainer(context.WithoutCancel(ctx), t.cfg, t.unit); ctr.id != "" {
			if h := containerHealth(context.WithoutCancel(ctx), t.cfg, ctr.id); strings.HasPrefix(h, "unhealthy") {
				verdict = "podman healthcheck: " + h
			}
		}
	}
	if verdict != "" {
		t.log.errorf("redeploy of %s: health gate failed: %s", t.unit, verdict)
		t.step("health-failed", http.StatusInternalServerError, nil, map[string]any{"error": verdict, "settle_cut_short": interrupted})
	}
	return verdict, interrupted
}

// rollbackTarget is the image a failed redeploy goes back to: the one the unit's container ran
// before the pull, which is what the unit last ran whatever the local tag pointed at since (another
// unit's redeploy may have moved it). Only when no container was found (the unit was not running)
// is it the image the tag named before the pull. source says which: "container" or "local-tag".
func rollbackTarget(running, before string) (target, source string) {
	if running != "" {
		return running, "container"
	}
	return before, "local-tag"
}

// rollbackSources words rollbackTarget's source for a log line.
var rollbackSources = map[string]string{
	"container": "what the unit's container ran before the pull",
	"local-tag": "what the local tag named before the pull; no container was running",
}

// rollback puts the previous image back under the reference, restarts and gates again. The new
// image is kept (nothing is pruned) so the operator can inspect it.
func (t *task) rollback(ctx context.Context, before, source, after, why string) int {
	switch plan := rollbackPlan(before, after, imageExists(context.WithoutCancel(ctx), t.cfg, before)); plan {
	case "":
	default:
		t.log.errorf("redeploy of %s failed and cannot be rolled back: %s; the unit is left as it is", t.unit, plan)
		t.step("rollback-impossible", http.StatusInternalServerError, nil, map[string]any{"error": why, "rollback_error": plan,
			"failed_image_id": after, "rollback_source": source})
		return 1
	}
	bg := context.WithoutCancel(ctx)
	res := runCommand(bg, t.cfg.commandTimeout, "podman", "tag", "--", before, t.ref.String())
	if res.err != nil {
		t.log.errorf("redeploy of %s: rollback failed: %v", t.unit, res.err)
		t.step("rollback-failed", http.StatusInternalServerError, &res, map[string]any{"error": why, "rollback_error": res.err.Error()})
		return 1
	}
	pre, _ := sampleUnit(bg, t.cfg, t.unit)
	verdict, _ := t.restartAndGate(bg, pre)
	if verdict != "" {
		t.log.errorf("redeploy of %s: rollback to %s failed too: %s", t.unit, before, verdict)
		t.step("rollback-failed", http.StatusInternalServerError, nil, map[string]any{"error": why, "rollback_error": verdict,
			"failed_image_id": after, "previous_image_id": before})
		return 1
	}
	t.log.warnf("redeploy of %s to %s failed (%s): rolled back to image %s, %s", t.unit, t.image, why, before, rollbackSources[source])
	t.step("rolled-back", http.StatusInternalServerError, nil, map[string]any{"error": why, "failed_image_id": after, "image_id": before,
		"rollback_source": source})
	return 1
}

// checkImage makes sure, before anything is pulled, that the pushed image is the one the unit
// runs: the Image= of its Quadlet file (the request already matched it; a manual redeploy did
// not), else the image its running container was started from. A unit that names no image
// and runs no container takes none, unless WEBHOOK_ALLOW_ANY_IMAGE is set. On a refusal it writes
// the step that says why and returns false: nothing is pulled or restarted.
func (t *task) checkImage(ctx context.Context, ctr unitContainer) bool {
	configured, source, err := configuredImage(ctx, t.cfg, t.getenv, t.unit)
	if err != nil {
		// The container still tells which image the unit runs.
		t.log.warnf("redeploy of %s: cannot read the unit's Image= (%v): checking its container's image instead", t.unit, err)
		configured, source = "", ""
	}
	step, why := imageCheck(t.ref, configured, ctr.image, t.cfg.allowAnyImage)
	if step == "" {
		return true
	}
	t.log.warnf("redeploy of %s to %s refused, nothing pulled or restarted: %s", t.unit, t.image, why)
	meta := map[string]any{"reason": why, "running_image": ctr.image}
	if source != "" {
		meta["unit_image"], meta["unit_image_source"] = configured, source
	}
	t.step(step, http.StatusConflict, nil, meta)
	return false
}

// imageCheck decides whether ref may be deployed to a unit whose Quadlet Image= is configured
// ("" none) and whose running container was started from the image named running ("" no
// container, or none known). It returns "" when it may, else the step to record
// (image-mismatch, image-unknown) and why. allowAny lets a unit without Image= take any image,
// the behaviour before this check existed.
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

// verify adds to meta the digest that was pulled, the one the unit's container runs and, when the
// delivery named one, that digest; a mismatch between pulled and running is a warning.
func (t *task) verify(ctx context.Context, after string, meta map[string]any) map[string]any {
	ctx = context.WithoutCancel(ctx)
	if t.digest != "" {
		meta["delivery_digest"] = t.digest
	}
	pulled := runCommand(ctx, t.cfg.commandTimeout, "podman", "image", "inspect", "--format", "{{.Digest}}", "--", t.ref.String())
	if pulled.err == nil {
		meta["pulled_digest"] = strings.TrimSpace(pulled.stdout)
	}
	ctr := findUnitContainer(ctx, t.cfg, t.unit)
	if ctr.id == "" {
		return meta
	}
	meta["container_id"] = ctr.id
	running := runCommand(ctx, t.cfg.commandTimeout, "podman", "container", "inspect", "--format", "{{.ImageDigest}}", "--", ctr.id)
	if running.err == nil {
		meta["running_digest"] = strings.TrimSpace(running.stdout)
	}
	if ctr.imageID != "" && after != "" && ctr.imageID != after {
		meta["warning"] = "the unit's container runs image " + ctr.imageID + ", not the pulled " + after
	} else if p, r := meta["pulled_digest"], meta["running_digest"]; p != nil && r != nil && p != r {
		meta["warning"] = fmt.Sprintf("pulled digest %v differs from the running container's %v", p, r)
	}
	return meta
}

// restartFacts is what decideRestart looks at.
type restartFacts struct {
	before  string // local image ID of the reference before the pull ("" none)
	after   string // and after it
	running string // image ID of the unit's container ("" not found)
	active  bool   // the unit is active
	force   bool
}

// decideRestart says whether a redeploy must restart the unit, and why. An unchanged image on an
// active unit is a no-op; this also collapses the burst of per-manifest deliveries of one push.
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

// unitContainer is the container a unit runs: its ID, its image's ID and the image name it was
// started from (as podman ps shows it; "" when podman shows none).
type unitContainer struct{ id, imageID, image string }

// findUnitContainer finds the running container of a unit: podman labels containers started
// under systemd (Quadlet, podman generate systemd) with PODMAN_SYSTEMD_UNIT; Quadlet names them
// systemd-<name> by default. A zero value means not found; the gate then relies on systemd alone.
func findUnitContainer(ctx context.Context, cfg *config, unit string) unitContainer {
	for _, filter := range []string{"label=PODMAN_SYSTEMD_UNIT=" + unit, "name=^systemd-" + strings.TrimSuffix(unit, ".service") + "$"} {
		res := runCommand(ctx, cfg.commandTimeout, "podman", "ps", "--no-trunc", "--filter", filter, "--format", "{{.ID}} {{.ImageID}} {{.Image}}")
		if res.err != nil {
			return unitContainer{}
		}
		if f := strings.Fields(res.stdout); len(f) >= 2 {
			c := unitContainer{id: f[0], imageID: strings.TrimPrefix(f[1], "sha256:")}
			if len(f) >= 3 {
				c.image = f[2]
			}
			return c
		}
	}
	return unitContainer{}
}

// containerHealth runs the container's podman healthcheck: "healthy", "unhealthy: …", or "none"
// when it has none or podman cannot tell.
func containerHealth(ctx context.Context, cfg *config, id string) string {
	res := runCommand(ctx, cfg.commandTimeout, "podman", "healthcheck", "run", "--", id)
	switch {
	case res.err == nil:
		return "healthy"
	case res.exitCode == 1:
		return "unhealthy: " + strings.TrimSpace(res.stdout+" "+res.stderr)
	}
	return "none"
}

// imageExists reports whether a local image ID is still there.
func imageExists(ctx context.Context, cfg *config, id string) bool {
	return id != "" && runCommand(ctx, cfg.commandTimeout, "podman", "image", "exists", "--", id).err == nil
}

// planRedeploy describes, without changing anything, what run-task would do to redeploy unit to
// ref: the dry run of the manual services API. It only reads (image inspect, podman ps,
// systemctl show); what it cannot read it says it cannot.
func planRedeploy(ctx context.Context, cfg *config, getenv func(string) string, unit string, ref imageRef, force bool) []string {
	ctr := findUnitContainer(ctx, cfg, unit)
	configured, _, cerr := configuredImage(ctx, cfg, getenv, unit)
	if step, why := imageCheck(ref, configured, ctr.image, cfg.allowAnyImage); cerr == nil && step != "" {
		return []string{"refuse (" + step + "), pulling and restarting nothing: " + why}
	}
	plan := []string{fmt.Sprintf("pull %s (podman pull -- docker://%s, %d attempts %s apart)", ref, ref, cfg.pullAttempts, cfg.pullRetryDelay)}
	before, err := localImageID(ctx, cfg, ref)
	pre, perr := sampleUnit(ctx, cfg, unit)
	switch {
	case force:
		plan = append(plan, "restart "+unit+" even if the image is unchanged (force)")
	case perr != nil:
		plan = append(plan, "restart "+unit+" if the pulled image differs (its state cannot be read: "+perr.Error()+")")
	case pre.activeState != "active":
		plan = append(plan, "restart "+unit+": it is "+pre.activeState+", not active")
	case ctr.imageID != "":
		plan = append(plan, "restart "+unit+" only if the pulled image differs from the one its container runs ("+ctr.imageID+"), else record up-to-date")
	default:
		plan = append(plan, "restart "+unit+" only if the pulled image differs from the local one ("+orNone(before)+"), else record up-to-date")
	}
	plan = append(plan, fmt.Sprintf("after a restart, require %s to stay active for %s without systemd restarting it, and its podman healthcheck (if any) to pass", unit, cfg.healthSettle))
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

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
