// Package qmpdiff runs QMP scripts against qemu-storage-daemon and blockd
// and compares what they answer.
//
// A script (scripts/*.qmp) is sent line by line. A line is one or more
// JSON requests, sent as written plus "\n"; "@TMP@" stands for the
// daemon's temporary directory. Blank lines and lines starting with "#" are
// skipped. Lines starting with "!" are directives:
//
//	!raw "Go-quoted bytes"        send bytes as they are (control characters, partial input)
//	!rawrep N "Go-quoted bytes"   send the bytes N times
//	!wait EVENT {json}            wait for an event whose data contains the given members
//	!capture @NAME@               set @NAME@, in later lines, to the first "#block..." node
//	                              name in the replies to the previous line
//
// After sending, the harness waits for as many replies as the input holds
// requests (it counts them with blockd's own QMP parser, which is checked
// against QEMU's elsewhere). Replies are recorded per line, ordered by id.
// Events are compared as a multiset per segment: a segment ends at each
// !wait (once the awaited event has arrived) and at the end of the script,
// so a script must !wait for asynchronous events (jobs) before anything
// that depends on them.
//
// Before comparing, only these are normalised: event timestamps, version
// numbers (greeting and query-version), "actual-size" values, the path of
// the temporary directory, and the two random digits of "#blockNNN" node
// names. query-commands replies are compared on the intersection of the two
// command lists only, since blockd implements a subset of QSD's commands.
//
// QSD's transcripts are kept in golden/*.out, so blockd can be checked when
// QSD is not installed. Environment:
//
//	BLOCKD_BIN=path      blockd binary (default: go build ./cmd/blockd; skipped if that does not
//	                     exist; "none" skips the blockd side)
//	QSD_BIN=path         qemu-storage-daemon (default: from PATH; required when CI=true;
//	                     "none" compares blockd with the golden files only)
//	UPDATE_GOLDEN=1      rewrite the golden files from QSD
//	QMPDIFF_SCRIPT=name  run only scripts whose name contains this
package qmpdiff

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"blockd/qmp"
)

// item is one script line.
type item struct {
	text    string // the line as written
	send    []byte // bytes to send (with @TMP@ unreplaced), or nil for a wait
	event   string // !wait: event name
	match   map[string]any
	capture string // !capture: the variable
}

func parseScript(path string) ([]item, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var items []item
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		trimmed := strings.TrimSpace(line)
		if trimmed == "" || strings.HasPrefix(trimmed, "#") {
			continue
		}
		it := item{text: line}
		switch {
		case strings.HasPrefix(trimmed, "!raw "):
			s, err := strconv.Unquote(strings.TrimSpace(trimmed[5:]))
			if err != nil {
				return nil, fmt.Errorf("%s:%d: %v", path, n, err)
			}
			it.send = []byte(s)
		case strings.HasPrefix(trimmed, "!rawrep "):
			count, rest, _ := strings.Cut(strings.TrimSpace(trimmed[8:]), " ")
			k, err := strconv.Atoi(count)
			if err != nil {
				return nil, fmt.Errorf("%s:%d: %v", path, n, err)
			}
			s, err := strconv.Unquote(strings.TrimSpace(rest))
			if err != nil {
				return nil, fmt.Errorf("%s:%d: %v", path, n, err)
			}
			it.send = bytes.Repeat([]byte(s), k)
		case strings.HasPrefix(trimmed, "!wait "):
			name, rest, _ := strings.Cut(strings.TrimSpace(trimmed[6:]), " ")
			it.event = name
			if strings.TrimSpace(rest) != "" {
				if err := json.Unmarshal([]byte(rest), &it.match); err != nil {
					return nil, fmt.Errorf("%s:%d: %v", path, n, err)
				}
			}
		case strings.HasPrefix(trimmed, "!capture "):
			it.capture = strings.TrimSpace(trimmed[9:])
		case strings.HasPrefix(trimmed, "!"):
			return nil, fmt.Errorf("%s:%d: unknown directive", path, n)
		default:
			it.send = []byte(line + "\n")
		}
		items = append(items, it)
	}
	return items, sc.Err()
}

// daemon is a running QMP server process.
type daemon struct {
	cmd  *exec.Cmd
	tmp  string
	conn net.Conn
	msgs chan any
	// regreets counts greetings after the first on the same connection.
	regreets atomic.Int32
}

func startDaemon(t *testing.T, bin string) *daemon {
	t.Helper()
	tmp := t.TempDir()
	sock := filepath.Join(tmp, "qmp.sock")
	cmd := exec.Command(bin, "--chardev", "socket,id=m,path="+sock+",server=on,wait=off", "--monitor", "chardev=m")
	cmd.Dir = tmp
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("%s: %v", bin, err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	d := &daemon{cmd: cmd, tmp: tmp, msgs: make(chan any, 4096)}
	t.Cleanup(func() {
		if d.conn != nil {
			d.conn.Close()
		}
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() && stderr.Len() > 0 {
			t.Logf("%s stderr:\n%s", filepath.Base(bin), stderr.String())
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		conn, err := net.Dial("unix", sock)
		if err == nil {
			d.conn = conn
			break
		}
		select {
		case <-exited:
			t.Fatalf("%s exited at startup: %s", bin, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no QMP socket: %v", bin, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	go func() {
		defer close(d.msgs)
		first := true
		p := qmp.NewParser(func(v any, err error) {
			if err != nil {
				v = map[string]any{"harness-error": "unparsable output: " + err.Error()}
			}
			if m, ok := v.(map[string]any); ok && first {
				first = false
			} else if _, ok := m["QMP"]; ok {
				// A second greeting on one connection: a daemon fault,
				// counted and reported by run instead of shifting
				// every later reply by one.
				d.regreets.Add(1)
				return
			}
			d.msgs <- v
		})
		buf := make([]byte, 64<<10)
		for {
			n, err := d.conn.Read(buf)
			p.Feed(buf[:n])
			if err != nil {
				return
			}
		}
	}()
	return d
}

func (d *daemon) next(timeout time.Duration) (any, bool) {
	select {
	case m, ok := <-d.msgs:
		if !ok {
			return map[string]any{"harness-error": "connection closed"}, false
		}
		return m, true
	case <-time.After(timeout):
		return nil, false
	}
}

func isEvent(m any) bool {
	d, _ := m.(map[string]any)
	_, ok := d["event"]
	return ok
}

// run plays a script against a daemon and returns the normalised
// transcript, one entry per line. A daemon that stops answering ends the
// script at that line (stalled is true) instead of waiting out every
// remaining line.
func run(t *testing.T, bin string, items []item) (out []string, stalled bool) {
	d := startDaemon(t, bin)
	add := func(prefix string, v any) { out = append(out, prefix+canon(v)) }

	g, ok := d.next(10 * time.Second)
	if !ok {
		t.Fatal("no greeting")
	}
	add("greeting ", normVersion(norm(g, d.tmp), "QMP", "version"))

	counter := qmp.NewParser(nil)
	var segment []any
	closeSegment := func() {
		var evs []string
		for _, e := range segment {
			evs = append(evs, "* "+canon(e))
		}
		sort.Strings(evs)
		out = append(out, evs...)
		segment = nil
	}
	vars := map[string]string{}
	var lastRaw []any // replies to the previous line, not normalised
script:
	for _, it := range items {
		out = append(out, "> "+it.text)
		if it.capture != "" {
			name := findBlockName(lastRaw)
			if name == "" {
				out = append(out, "! nothing to capture")
			}
			vars[it.capture] = name
			continue
		}
		if it.send == nil {
			// !wait: the event may have come with an earlier reply.
			found := false
			for _, e := range segment {
				found = found || eventMatches(e, it.event, it.match)
			}
			for !found {
				m, ok := d.next(30 * time.Second)
				if !ok {
					out = append(out, fmt.Sprintf("! timeout waiting for %s %v", it.event, it.match))
					break
				}
				m = norm(m, d.tmp)
				if !isEvent(m) {
					add("! unexpected reply ", m)
					continue
				}
				segment = append(segment, m)
				found = eventMatches(m, it.event, it.match)
			}
			closeSegment()
			continue
		}
		data := bytes.ReplaceAll(it.send, []byte("@TMP@"), []byte(d.tmp))
		for k, v := range vars {
			data = bytes.ReplaceAll(data, []byte(k), []byte(v))
		}
		want := 0
		var requests []any
		counter.SetEmit(func(v any, err error) {
			want++
			requests = append(requests, v)
		})
		counter.Feed(data)
		if _, err := d.conn.Write(data); err != nil {
			out = append(out, "! write: "+err.Error())
			break
		}
		var replies []any
		lastRaw = nil
		for len(replies) < want {
			m, ok := d.next(20 * time.Second)
			if !ok {
				out = append(out, fmt.Sprintf("! timeout: got %d of %d replies", len(replies), want))
				stalled = true
				break script
			}
			if !isEvent(m) {
				lastRaw = append(lastRaw, m)
			}
			m = norm(m, d.tmp)
			if isEvent(m) {
				segment = append(segment, m)
				continue
			}
			replies = append(replies, m)
		}
		sortByID(replies)
		for _, r := range replies {
			switch command(requests, r) {
			case "query-version":
				add("< ", normVersion(r, "return"))
			case "query-commands":
				if _, ok := r.(map[string]any)["return"]; ok {
					add("<< ", r)
				} else {
					add("< ", r)
				}
			default:
				add("< ", r)
			}
		}
	}
	// Events still in flight.
	for {
		m, ok := d.next(100 * time.Millisecond)
		if !ok {
			break
		}
		m = norm(m, d.tmp)
		if isEvent(m) {
			segment = append(segment, m)
		} else {
			add("! unexpected reply ", m)
		}
	}
	out = append(out, "> (end)")
	closeSegment()
	if n := d.regreets.Load(); n > 0 {
		if isQSD(bin) {
			// qemu-storage-daemon 7.2 now and then greets a client that
			// connected while the monitor was starting twice; that is the
			// reference's flake, not a behaviour to match.
			t.Logf("qemu-storage-daemon greeted %d extra time(s); ignored", n)
		} else {
			out = append(out, fmt.Sprintf("! %d repeated greeting(s)", n))
		}
	}
	return out, stalled
}

var blockNameRaw = regexp.MustCompile(`^#block[0-9]+$`)

// findBlockName returns the first automatic node name in v.
func findBlockName(v any) string {
	switch x := v.(type) {
	case string:
		if blockNameRaw.MatchString(x) {
			return x
		}
	case []any:
		for _, e := range x {
			if s := findBlockName(e); s != "" {
				return s
			}
		}
	case map[string]any:
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			if s := findBlockName(x[k]); s != "" {
				return s
			}
		}
	}
	return ""
}

// command finds the command a reply answers (by id, or the only request).
func command(requests []any, reply any) string {
	r, _ := reply.(map[string]any)
	id, hasID := r["id"]
	for _, q := range requests {
		qd, _ := q.(map[string]any)
		qid, qHasID := qd["id"]
		if len(requests) == 1 || (hasID && qHasID && canon(qid) == canon(id)) {
			if s, ok := qd["execute"].(string); ok {
				return s
			}
		}
	}
	return ""
}

func eventMatches(m any, name string, match map[string]any) bool {
	d := m.(map[string]any)
	if d["event"] != name {
		return false
	}
	data, _ := d["data"].(map[string]any)
	for k, v := range match {
		if canon(data[k]) != canon(v) {
			return false
		}
	}
	return true
}

// sortByID orders replies by their id; replies without one keep their
// order and come first.
func sortByID(replies []any) {
	key := func(r any) string {
		d, _ := r.(map[string]any)
		if id, ok := d["id"]; ok {
			return "1" + canon(id)
		}
		return "0"
	}
	sort.SliceStable(replies, func(i, j int) bool { return key(replies[i]) < key(replies[j]) })
}

var blockName = regexp.MustCompile(`#block([0-9]*)[0-9]{2}`)

// norm normalises one message (see the package comment).
func norm(v any, tmp string) any {
	switch x := v.(type) {
	case map[string]any:
		m := make(map[string]any, len(x))
		for k, e := range x {
			switch k {
			case "timestamp":
				if _, ev := x["event"]; ev {
					continue
				}
			case "actual-size":
				m[k] = json.Number("0")
				continue
			}
			m[k] = norm(e, tmp)
		}
		return m
	case []any:
		l := make([]any, len(x))
		for i, e := range x {
			l[i] = norm(e, tmp)
		}
		return l
	case string:
		s := strings.ReplaceAll(x, tmp, "@TMP@")
		return blockName.ReplaceAllString(s, "#block${1}NN")
	}
	return v
}

// normVersion blanks the version numbers and package string of the
// VersionInfo found at path in v.
func normVersion(v any, path ...string) any {
	d, _ := v.(map[string]any)
	if d == nil {
		return v
	}
	if len(path) > 1 {
		d[path[0]] = normVersion(d[path[0]], path[1:]...)
		return d
	}
	info, _ := d[path[0]].(map[string]any)
	if info == nil {
		return d
	}
	if _, ok := info["package"].(string); ok {
		info["package"] = "<package>"
	}
	if q, _ := info["qemu"].(map[string]any); q != nil {
		for k, n := range q {
			if _, ok := n.(json.Number); ok {
				q[k] = json.Number("0")
			}
		}
	}
	return d
}

// canon is a deterministic encoding (sorted keys).
func canon(v any) string {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return fmt.Sprintf("<unencodable %v>", err)
	}
	return strings.TrimSuffix(b.String(), "\n")
}

// diff compares a transcript with the expected one and returns a report of
// the differences, or "".
func diff(want, got []string) string {
	var b strings.Builder
	n := max(len(want), len(got))
	bad := 0
	for i := 0; i < n; i++ {
		var w, g string
		if i < len(want) {
			w = want[i]
		}
		if i < len(got) {
			g = got[i]
		}
		if w == g || sameCommands(w, g) {
			continue
		}
		bad++
		if bad > 12 {
			fmt.Fprintf(&b, "... more differences\n")
			break
		}
		fmt.Fprintf(&b, "line %d:\n  want %s\n  got  %s\n", i+1, w, g)
	}
	return b.String()
}

// sameCommands compares two query-commands replies on the intersection of
// their command names.
func sameCommands(a, b string) bool {
	if !strings.HasPrefix(a, "<< ") || !strings.HasPrefix(b, "<< ") {
		return false
	}
	parse := func(s string) (map[string]any, map[string]bool, bool) {
		var m map[string]any
		if json.Unmarshal([]byte(s[3:]), &m) != nil {
			return nil, nil, false
		}
		list, ok := m["return"].([]any)
		if !ok {
			return m, nil, true
		}
		names := map[string]bool{}
		for _, e := range list {
			em, _ := e.(map[string]any)
			name, ok := em["name"].(string)
			if !ok || len(em) != 1 {
				return nil, nil, false
			}
			names[name] = true
		}
		delete(m, "return")
		return m, names, true
	}
	ma, na, oka := parse(a)
	mb, nb, okb := parse(b)
	if !oka || !okb || (na == nil) != (nb == nil) || canon(ma) != canon(mb) {
		return false
	}
	common := 0
	for n := range na {
		if nb[n] {
			common++
		}
	}
	return na == nil || common > 0
}

// isQSD reports whether bin is the reference daemon.
func isQSD(bin string) bool { return filepath.Base(bin) == "qemu-storage-daemon" }
