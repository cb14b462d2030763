// eventlog_metrics_test.go tests the metrics eventlog.go computes for /metrics, read back
// through a strict parser of the Prometheus text exposition format (parseExposition, itself
// tested by TestParseExposition).
package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"reflect"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The exposition format, parsed back.

// promSample is one sample line.
type promSample struct {
	name   string
	labels map[string]string
	value  float64
}

// promFamily is one metric family with its HELP, TYPE and samples in order.
type promFamily struct {
	name, typ, help string
	samples         []promSample
}

var (
	rePromName  = regexp.MustCompile(`^[a-zA-Z_:][a-zA-Z0-9_:]*$`)
	rePromLabel = regexp.MustCompile(`^[a-zA-Z_][a-zA-Z0-9_]*$`)
)

// parseExposition parses the Prometheus text format 0.0.4 strictly enough to catch a malformed
// line: names, quoted and escaped label values, float values, one HELP and TYPE per family before
// its samples, families not interleaved, no repeated series, and histograms with cumulative
// buckets whose +Inf bucket equals _count.
func parseExposition(text string) (map[string]*promFamily, error) {
	if text == "" || !strings.HasSuffix(text, "\n") {
		return nil, errors.New("the exposition must end with a newline")
	}
	fams := map[string]*promFamily{}
	var cur *promFamily
	done := map[string]bool{} // families that ended: they may not come back
	series := map[string]bool{}
	enter := func(name string) (*promFamily, error) {
		if cur != nil && cur.name == name {
			return cur, nil
		}
		if done[name] {
			return nil, fmt.Errorf("family %s interleaved with another", name)
		}
		if cur != nil {
			done[cur.name] = true
		}
		if fams[name] == nil {
			fams[name] = &promFamily{name: name}
		}
		cur = fams[name]
		return cur, nil
	}
	for n, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		fail := func(format string, a ...any) error {
			return fmt.Errorf("line %d %q: %s", n+1, line, fmt.Sprintf(format, a...))
		}
		switch {
		case line == "":
			continue
		case strings.HasPrefix(line, "#"):
			fields := strings.SplitN(line, " ", 4)
			if len(fields) < 3 || fields[0] != "#" || (fields[1] != "HELP" && fields[1] != "TYPE") {
				continue // a plain comment
			}
			if !rePromName.MatchString(fields[2]) {
				return nil, fail("bad metric name")
			}
			f, err := enter(fields[2])
			if err != nil {
				return nil, fail("%v", err)
			}
			rest := ""
			if len(fields) == 4 {
				rest = fields[3]
			}
			if fields[1] == "HELP" {
				if f.help != "" {
					return nil, fail("second HELP")
				}
				for i := 0; i < len(rest); i++ {
					if rest[i] == '\\' {
						if i+1 == len(rest) || (rest[i+1] != '\\' && rest[i+1] != 'n') {
							return nil, fail("bad escape in HELP")
						}
						i++
					}
				}
				f.help = rest
				continue
			}
			if f.typ != "" {
				return nil, fail("second TYPE")
			}
			if len(f.samples) > 0 {
				return nil, fail("TYPE after samples")
			}
			switch rest {
			case "counter", "gauge", "histogram", "summary", "untyped":
				f.typ = rest
			default:
				return nil, fail("unknown type %q", rest)
			}
		default:
			s, err := parseSample(line)
			if err != nil {
				return nil, fail("%v", err)
			}
			famName := s.name
			if cur != nil && cur.typ == "histogram" {
				for _, suf := range []string{"_bucket", "_sum", "_count"} {
					if strings.TrimSuffix(s.name, suf) == cur.name && s.name != cur.name {
						famName = cur.name
					}
				}
			}
			f, err := enter(famName)
			if err != nil {
				return nil, fail("%v", err)
			}
			if f.typ == "" {
				return nil, fail("sample without a TYPE line")
			}
			if f.typ == "histogram" && famName == s.name {
				return nil, fail("histogram sample without _bucket, _sum or _count")
			}
			if f.typ == "histogram" && strings.HasSuffix(s.name, "_bucket") && s.labels["le"] == "" {
				return nil, fail("bucket without le")
			}
			key := s.name + "{"
			for _, k := range slices.Sorted(maps.Keys(s.labels)) {
				key += k + "=" + strconv.Quote(s.labels[k]) + ","
			}
			if series[key] {
				return nil, fail("repeated series")
			}
			series[key] = true
			f.samples = append(f.samples, s)
		}
	}
	for _, f := range fams {
		if f.typ == "" {
			return nil, fmt.Errorf("family %s has no TYPE", f.name)
		}
		if f.typ == "histogram" {
			if err := checkHistogram(f); err != nil {
				return nil, err
			}
		}
	}
	return fams, nil
}

// parseSample reads `name{label="value",…} value [timestamp]`.
func parseSample(line string) (promSample, error) {
	s := promSample{labels: map[string]string{}}
	i := strings.IndexAny(line, "{ ")
	if i < 0 {
		return s, errors.New("no value")
	}
	s.name = line[:i]
	if !rePromName.MatchString(s.name) {
		return s, errors.New("bad metric name")
	}
	rest := line[i:]
	if rest[0] == '{' {
		rest = rest[1:]
		for {
			if strings.HasPrefix(rest, "}") {
				rest = rest[1:]
				break
			}
			eq := strings.IndexByte(rest, '=')
			if eq < 0 {
				return s, errors.New("label without =")
			}
			name := rest[:eq]
			if !rePromLabel.MatchString(name) {
				return s, fmt.Errorf("bad label name %q", name)
			}
			if _, dup := s.labels[name]; dup {
				return s, fmt.Errorf("label %s twice", name)
			}
			rest = rest[eq+1:]
			if !strings.HasPrefix(rest, `"`) {
				return s, fmt.Errorf("label %s: value not quoted", name)
			}
			var v strings.Builder
			closed := false
			j := 1
			for ; j < len(rest); j++ {
				c := rest[j]
				if c == '"' {
					closed = true
					break
				}
				if c == '\n' {
					return s, errors.New("raw newline in a label value")
				}
				if c == '\\' {
					if j+1 == len(rest) {
						return s, errors.New("dangling backslash")
					}
					j++
					switch rest[j] {
					case '\\':
						v.WriteByte('\\')
					case '"':
						v.WriteByte('"')
					case 'n':
						v.WriteByte('\n')
					default:
						return s, fmt.Errorf("bad escape \\%c", rest[j])
					}
					continue
				}
				v.WriteByte(c)
			}
			if !closed {
				return s, fmt.Errorf("label %s: unterminated value", name)
			}
			s.labels[name] = v.String()
			rest = rest[j+1:]
			switch {
			case strings.HasPrefix(rest, ","):
				rest = rest[1:]
			case strings.HasPrefix(rest, "}"):
			default:
				return s, errors.New("labels not separated by a comma")
			}
		}
	}
	if !strings.HasPrefix(rest, " ") {
		return s, errors.New("no space before the value")
	}
	fields := strings.Split(rest[1:], " ")
	if len(fields) > 2 || fields[0] == "" {
		return s, errors.New("want a value and an optional timestamp")
	}
	switch fields[0] {
	case "+Inf":
		s.value = math.Inf(1)
	case "-Inf":
		s.value = math.Inf(-1)
	case "NaN":
		s.value = math.NaN()
	default:
		v, err := strconv.ParseFloat(fields[0], 64)
		if err != nil || strings.ContainsAny(fields[0], "_xXpP") || strings.EqualFold(fields[0], "inf") ||
			strings.EqualFold(fields[0], "infinity") || strings.EqualFold(fields[0], "nan") {
			return s, fmt.Errorf("bad value %q", fields[0])
		}
		s.value = v
	}
	if len(fields) == 2 {
		if _, err := strconv.ParseInt(fields[1], 10, 64); err != nil {
			return s, fmt.Errorf("bad timestamp %q", fields[1])
		}
	}
	return s, nil
}

// checkHistogram checks that the buckets of f rise with le, are cumulative, and end in +Inf
// equal to _count, and that _sum is there.
func checkHistogram(f *promFamily) error {
	var les, counts []float64
	var count, sum *float64
	for i := range f.samples {
		s := &f.samples[i]
		switch s.name {
		case f.name + "_bucket":
			le, err := strconv.ParseFloat(s.labels["le"], 64)
			if s.labels["le"] == "+Inf" {
				le, err = math.Inf(1), nil
			}
			if err != nil {
				return fmt.Errorf("%s: bad le %q", f.name, s.labels["le"])
			}
			les, counts = append(les, le), append(counts, s.value)
		case f.name + "_count":
			count = &s.value
		case f.name + "_sum":
			sum = &s.value
		}
	}
	if count == nil || sum == nil || len(les) == 0 {
		return fmt.Errorf("%s: histogram without _count, _sum or buckets", f.name)
	}
	for i := 1; i < len(les); i++ {
		if les[i] <= les[i-1] || counts[i] < counts[i-1] {
			return fmt.Errorf("%s: buckets not ascending and cumulative at le=%v", f.name, les[i])
		}
	}
	if !math.IsInf(les[len(les)-1], 1) || counts[len(counts)-1] != *count {
		return fmt.Errorf("%s: the last bucket must be +Inf and equal _count", f.name)
	}
	return nil
}

// TestParseExposition makes sure the parser the /metrics tests rely on refuses what it must.
func TestParseExposition(t *testing.T) {
	good := "# HELP m_total Help with a \\\\ and a \\n.\n# TYPE m_total counter\n" +
		`m_total{a="x\"y",b="back\\slash",c="new\nline",} 3` + "\nm_total 1e3 1700000000000\n" +
		"# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n"
	fams, err := parseExposition(good)
	if err != nil {
		t.Fatalf("valid exposition refused: %v", err)
	}
	if s := fams["m_total"].samples[0]; !reflect.DeepEqual(s.labels, map[string]string{"a": `x"y`, "b": `back\slash`, "c": "new\nline"}) || s.value != 3 {
		t.Errorf("escaped labels parsed as %+v", s)
	}
	if v := fams["m_total"].samples[1].value; v != 1000 {
		t.Errorf("1e3 parsed as %v", v)
	}
	// What promWriter writes parses back to what it was given, escapes included.
	var b strings.Builder
	p := &promWriter{w: &b}
	p.family("x_total", "counter", "Help with a \\ backslash\nand a newline.")
	labels := []string{"a", `quote " here`, "b", `back\slash`, "c", "new\nline", "d", ""}
	p.sample("x_total", labels, 2.5)
	p.family("y_seconds", "histogram", "A histogram.")
	p.histogram("y_seconds", []float64{0.5, 1}, []float64{500, 700, 2000})
	if p.err != nil {
		t.Fatal(p.err)
	}
	fams, err = parseExposition(b.String())
	if err != nil {
		t.Fatalf("promWriter output does not parse: %v\n%s", err, b.String())
	}
	want := map[string]string{"a": `quote " here`, "b": `back\slash`, "c": "new\nline", "d": ""}
	if s := fams["x_total"].samples; len(s) != 1 || !reflect.DeepEqual(s[0].labels, want) || s[0].value != 2.5 {
		t.Errorf("promWriter sample read back as %+v, want labels %v and 2.5", s, want)
	}
	if h := samplesBy(t, fams, "y_seconds", "y_seconds_bucket", "le"); !reflect.DeepEqual(h, map[string]float64{"0.5": 1, "1": 2, "+Inf": 3}) {
		t.Errorf("promWriter buckets %v", h)
	}

	const typ = "# TYPE m counter\n"
	for _, bad := range []string{
		"",
		typ + "m 1",                        // no final newline
		typ + "m{a=\"b\" 1\n",              // unclosed labels
		typ + "m{a=b} 1\n",                 // unquoted value
		typ + "m{a=\"\\q\"} 1\n",           // unknown escape
		typ + "m{a=\"x} 1\n",               // unterminated value
		typ + "m{a=\"1\"b=\"2\"} 1\n",      // no comma
		typ + "m{1a=\"x\"} 1\n",            // bad label name
		typ + "m{a=\"1\",a=\"2\"} 1\n",     // repeated label
		typ + "m 1x\n",                     // bad value
		typ + "m\n",                        // no value
		typ + "m  1\n",                     // two spaces
		typ + "m 1 2 3\n",                  // too many fields
		typ + "m 1 soon\n",                 // bad timestamp
		"# TYPE 1m counter\n1m 1\n",        // bad name
		"# TYPE m countr\nm 1\n",           // unknown type
		typ + typ + "m 1\n",                // TYPE twice
		"m 1\n",                            // no TYPE
		typ + "m 1\n" + typ,                // TYPE after samples
		typ + "m 1\nm 2\n",                 // repeated series
		typ + "# TYPE n gauge\nn 1\nm 1\n", // interleaved
		"# HELP m bad \\t escape\n" + typ + "m 1\n",
		"# TYPE h histogram\nh 1\n",                                                               // no suffix
		"# TYPE h histogram\nh_bucket 1\nh_sum 1\nh_count 1\n",                                    // no le
		"# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n", // not cumulative
		"# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n", // +Inf != count
		"# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",                          // no +Inf
		"# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",                                // no _sum
	} {
		if _, err := parseExposition(bad); err == nil {
			t.Errorf("parseExposition accepted %q", bad)
		}
	}
}

// samples returns the samples of a family named name, keyed by the values of the given labels
// joined with "|".
func samplesBy(t *testing.T, fams map[string]*promFamily, name, sampleName string, labels ...string) map[string]float64 {
	t.Helper()
	f := fams[name]
	if f == nil {
		t.Fatalf("no family %s", name)
	}
	out := map[string]float64{}
	for _, s := range f.samples {
		if s.name != sampleName {
			continue
		}
		var key []string
		for _, l := range labels {
			key = append(key, s.labels[l])
		}
		out[strings.Join(key, "|")] = s.value
	}
	return out
}

// scrape fetches and parses /metrics.
func scrape(t *testing.T, ts *testServer, hdr map[string]string) map[string]*promFamily {
	t.Helper()
	resp, body := obsGet(t, ts, "/metrics", hdr)
	if resp.StatusCode != 200 {
		t.Fatalf("GET /metrics = %d %q", resp.StatusCode, body)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "text/plain; version=0.0.4; charset=utf-8" {
		t.Errorf("Content-Type %q, want the 0.0.4 text format", ct)
	}
	fams, err := parseExposition(body)
	if err != nil {
		t.Fatalf("malformed /metrics: %v\n%s", err, body)
	}
	return fams
}

// seedTaskRows writes github-task rows as run-task processes do, for the counters and
// histograms /metrics derives from event_log.
func seedTaskRows(t *testing.T, l *eventLog) {
	t.Helper()
	ts := time.Date(2024, 3, 1, 12, 0, 0, 0, time.UTC)
	row := func(delivery, step string, extra map[string]any) event {
		meta := map[string]any{"delivery": delivery, "unit": "demo.service", "image": "ghcr.io/acme/demo:latest", "step": step}
		for k, v := range extra {
			meta[k] = v
		}
		return event{RequestID: "task-" + delivery, TS: ts, Method: "TASK", Path: "/github-package-update/demo", Status: 200,
			Action: "github-task", Meta: meta}
	}
	evs := []event{
		row("a", "started", nil), row("a", "pulled", map[string]any{"pull_ms": 250}),
		row("a", "restarted", map[string]any{"restart_ms": 125}), row("a", "healthy", nil), row("a", "completed", nil),
		row("b", "started", nil), row("b", "pulled", map[string]any{"pull_ms": 1500}), row("b", "up-to-date", nil),
		row("c", "started", nil), row("c", "pulled", map[string]any{"pull_ms": 4000}),
		row("c", "restarted", map[string]any{"restart_ms": 3000}), row("c", "health-failed", nil), row("c", "rolled-back", nil),
		// An older task row without pull_ms counts as a step but not in the histogram.
		row("d", "started", nil), row("d", "pulled", nil),
		// Not a task row: a step key elsewhere counts for nothing.
		{RequestID: "m", TS: ts, Method: "POST", Status: 202, Action: "manual-service", Meta: map[string]any{"step": "pulled", "pull_ms": 99999}},
	}
	if err := l.Write(context.Background(), evs...); err != nil {
		t.Fatal(err)
	}
}

// TestMetrics drives a scripted sequence of requests that run no command, seeds task rows, and
// checks /metrics sample by sample.
func TestMetrics(t *testing.T) {
	const secret = "metrics test secret"
	ts := newTestServer(t, map[string]string{"GITHUB_WEBHOOK_SECRET": secret}, nil)
	seedTaskRows(t, ts.events)
	gh := &e2eServer{url: ts.URL} // its deliver signs and sends a GitHub delivery
	ping := []byte(`{"zen":"Keep it logically awesome.","hook_id":1}`)
	npm := loadPayload(t, "package-published-npm.json")
	for _, step := range []struct {
		name string
		do   func() int
		want int
	}{
		{"health", func() int { r, _ := ts.do(t, "GET", "/health", nil); return r.StatusCode }, 200},
		{"health", func() int { r, _ := ts.do(t, "GET", "/health", nil); return r.StatusCode }, 200},
		{"health", func() int { r, _ := ts.do(t, "GET", "/health?verbose=1", nil); return r.StatusCode }, 200},
		{"unknown path", func() int { r, _ := ts.do(t, "GET", "/nope", nil); return r.StatusCode }, 404},
		{"unknown path", func() int { r, _ := ts.do(t, "GET", "/api/nope?token=x", nil); return r.StatusCode }, 404},
		{"POST /health", func() int { r, _ := ts.do(t, "POST", "/health", nil); return r.StatusCode }, 405},
		{"bad signature", func() int { c, _ := gh.deliver(t, "demo", "package", "bad-1", npm, "wrong"); return c }, 401},
		{"bad signature", func() int { c, _ := gh.deliver(t, "demo", "package", "bad-2", npm, ""); return c }, 401},
		{"ping", func() int { c, _ := gh.deliver(t, "demo", "ping", "ping-1", ping, secret); return c }, 200},
		{"npm ignored", func() int { c, _ := gh.deliver(t, "demo", "package", "npm-1", npm, secret); return c }, 202},
		{"npm ignored, redeploy route", func() int { c, _ := gh.deliver(t, "demo/redeploy", "package", "npm-2", npm, secret); return c }, 202},
		{"events api without a token", func() int { r, _ := ts.do(t, "GET", "/api/events", nil); return r.StatusCode }, 401},
	} {
		if got := step.do(); got != step.want {
			t.Fatalf("%s: status %d, want %d", step.name, got, step.want)
		}
	}

	// One scrape after those requests, which the first four subtests read; the subtests run in order.
	fams := scrape(t, ts, nil)
	check := func(t *testing.T, name string, got, want map[string]float64) {
		t.Helper()
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s\n got %v\nwant %v", name, got, want)
		}
	}

	t.Run("families and types", func(t *testing.T) {
		wantTypes := map[string]string{
			"webhook_http_requests_total": "counter", "webhook_github_deliveries_total": "counter",
			"webhook_rate_limit_rejections_total": "counter", "webhook_event_log_write_failures_total": "counter",
			"webhook_event_log_queue_depth": "gauge", "process_start_time_seconds": "gauge", "webhook_build_info": "gauge",
			"webhook_delivery_queue_pending": "gauge", "webhook_delivery_queue_waiting": "gauge", "webhook_delivery_queue_oldest_age_seconds": "gauge",
			"webhook_dispatches_total":     "counter",
			"webhook_redeploy_steps_total": "counter", "webhook_notifications_total": "counter", "webhook_redeploys_total": "counter", "webhook_pull_duration_seconds": "histogram",
			"webhook_restart_duration_seconds": "histogram",
			"webhook_image_update_available":   "gauge", "webhook_image_check_timestamp_seconds": "gauge",
		}
		gotTypes := map[string]string{}
		for name, f := range fams {
			gotTypes[name] = f.typ
			if f.help == "" {
				t.Errorf("%s has no HELP", name)
			}
		}
		if !reflect.DeepEqual(gotTypes, wantTypes) {
			t.Errorf("families and types\n got %v\nwant %v", gotTypes, wantTypes)
		}
	})

	t.Run("counters", func(t *testing.T) {
		check(t, "webhook_http_requests_total", samplesBy(t, fams, "webhook_http_requests_total", "webhook_http_requests_total", "route", "status"),
			map[string]float64{
				"GET /health|200": 3, "unmatched|404": 2, "unmatched|405": 1,
				"POST /github-package-update/{unit}|401": 2, "POST /github-package-update/{unit}|200": 1,
				"POST /github-package-update/{unit}|202": 1, "POST /github-package-update/{unit}/redeploy|202": 1,
				"GET /api/events|401": 1,
			})
		check(t, "webhook_github_deliveries_total", samplesBy(t, fams, "webhook_github_deliveries_total", "webhook_github_deliveries_total", "outcome"),
			map[string]float64{"bad-signature": 2, "ping": 1, "not-container": 2})
		check(t, "webhook_rate_limit_rejections_total", samplesBy(t, fams, "webhook_rate_limit_rejections_total", "webhook_rate_limit_rejections_total", "action"),
			map[string]float64{})
		check(t, "webhook_redeploy_steps_total", samplesBy(t, fams, "webhook_redeploy_steps_total", "webhook_redeploy_steps_total", "step"),
			map[string]float64{"started": 4, "pulled": 4, "restarted": 2, "healthy": 1, "completed": 1, "up-to-date": 1,
				"health-failed": 1, "rolled-back": 1})
	})

	t.Run("histograms", func(t *testing.T) {
		// Pulls of 0.25 s, 1.5 s and 4 s; restarts of 0.125 s and 3 s. A value on a bound is in it.
		check(t, "webhook_pull_duration_seconds_bucket", samplesBy(t, fams, "webhook_pull_duration_seconds", "webhook_pull_duration_seconds_bucket", "le"),
			map[string]float64{"0.1": 0, "0.25": 1, "0.5": 1, "1": 1, "2.5": 2, "5": 3, "10": 3, "30": 3, "60": 3, "120": 3,
				"300": 3, "600": 3, "+Inf": 3})
		check(t, "webhook_pull_duration_seconds sum and count", map[string]float64{
			"sum":   samplesBy(t, fams, "webhook_pull_duration_seconds", "webhook_pull_duration_seconds_sum")[""],
			"count": samplesBy(t, fams, "webhook_pull_duration_seconds", "webhook_pull_duration_seconds_count")[""],
		}, map[string]float64{"sum": 5.75, "count": 3})
		check(t, "webhook_restart_duration_seconds_bucket", samplesBy(t, fams, "webhook_restart_duration_seconds", "webhook_restart_duration_seconds_bucket", "le"),
			map[string]float64{"0.05": 0, "0.1": 0, "0.25": 1, "0.5": 1, "1": 1, "2.5": 1, "5": 2, "10": 2, "30": 2, "60": 2, "+Inf": 2})
		check(t, "webhook_restart_duration_seconds sum and count", map[string]float64{
			"sum":   samplesBy(t, fams, "webhook_restart_duration_seconds", "webhook_restart_duration_seconds_sum")[""],
			"count": samplesBy(t, fams, "webhook_restart_duration_seconds", "webhook_restart_duration_seconds_count")[""],
		}, map[string]float64{"sum": 3.125, "count": 2})
	})

	t.Run("gauges and build info", func(t *testing.T) {
		check(t, "webhook_event_log_write_failures_total", samplesBy(t, fams, "webhook_event_log_write_failures_total", "webhook_event_log_write_failures_total"),
			map[string]float64{"": 0})
		if q := samplesBy(t, fams, "webhook_event_log_queue_depth", "webhook_event_log_queue_depth"); len(q) != 1 || q[""] < 0 {
			t.Errorf("webhook_event_log_queue_depth = %v, want one sample >= 0", q)
		}
		start := samplesBy(t, fams, "process_start_time_seconds", "process_start_time_seconds")
		if len(start) != 1 || start[""] <= 0 || start[""] > float64(time.Now().Unix()) {
			t.Errorf("process_start_time_seconds = %v, want one sample of a past unix time", start)
		}
		if bi := fams["webhook_build_info"].samples; len(bi) != 1 || bi[0].value != 1 || bi[0].labels["goversion"] != runtime.Version() {
			t.Errorf("webhook_build_info = %+v, want one sample of value 1 with goversion %s", bi, runtime.Version())
		} else if _, ok := bi[0].labels["version"]; !ok {
			t.Errorf("webhook_build_info has no version label: %v", bi[0].labels)
		}
	})

	// A scrape is itself counted, by the next one.
	t.Run("a scrape is counted by the next", func(t *testing.T) {
		fams := scrape(t, ts, nil)
		if got := samplesBy(t, fams, "webhook_http_requests_total", "webhook_http_requests_total", "route", "status")["GET /metrics|200"]; got != 1 {
			t.Errorf("after one scrape, GET /metrics|200 = %v, want 1", got)
		}
	})

	// The run-task counters come from event_log: a task row written now shows in the next scrape.
	t.Run("task counters come from event_log", func(t *testing.T) {
		if err := ts.events.Write(context.Background(), event{RequestID: "e", TS: time.Now(), Method: "TASK", Status: 200,
			Action: "github-task", Meta: map[string]any{"step": "restarted", "restart_ms": 20000}}); err != nil {
			t.Fatal(err)
		}
		fams := scrape(t, ts, nil)
		if got := samplesBy(t, fams, "webhook_redeploy_steps_total", "webhook_redeploy_steps_total", "step")["restarted"]; got != 3 {
			t.Errorf("restarted steps = %v after one more row, want 3", got)
		}
		if got := samplesBy(t, fams, "webhook_restart_duration_seconds", "webhook_restart_duration_seconds_bucket", "le"); got["10"] != 2 || got["30"] != 3 {
			t.Errorf("restart buckets after a 20 s restart: %v", got)
		}
	})
}
