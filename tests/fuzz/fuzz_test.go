// Package fuzz holds fuzz targets that cross package lines: secret loading
// (base64 and AES-CBC decoding, which the secrets package does not fuzz)
// and QMP command handlers of an in-process daemon driven with arbitrary
// arguments.
package fuzz

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/sirupsen/logrus"

	"blockd/daemon"
	"blockd/drivers/blkdebug"
	"blockd/drivers/luks"
	"blockd/drivers/null"
	"blockd/drivers/qcow2"
	"blockd/drivers/raw"
	"blockd/internal/keymem"
	"blockd/qmp"
	"blockd/secrets"
	"blockd/tests/harness"
)

// FuzzSecret loads secrets from arbitrary data in both formats, plain and
// AES-encrypted with arbitrary IVs.
func FuzzSecret(f *testing.F) {
	f.Add("hello", false, false, "")
	f.Add("aGVsbG8=", true, false, "")
	f.Add("aGVs bG8=\n", true, false, "")
	f.Add("FWcfP8PkVbp2k1e9SqzJSQ==", true, true, "AAAAAAAAAAAAAAAAAAAAAA==")
	f.Add("0123456789abcdef", false, true, "AAAAAAAAAAAAAAAAAAAAAA")
	f.Add("", true, true, "")
	f.Fuzz(func(t *testing.T, data string, b64, keyed bool, iv string) {
		var st secrets.Store
		key := "0123456789abcdef0123456789abcdef"
		if err := st.Add(secrets.Options{ID: "mk", Data: &key}); err != nil {
			t.Fatal(err)
		}
		o := secrets.Options{ID: "s", Data: &data, IV: iv}
		if b64 {
			o.Format = secrets.FormatBase64
		}
		if keyed {
			o.KeyID = "mk"
		}
		if err := st.Add(o); err != nil {
			return
		}
		got, err := st.Get("s")
		if err != nil {
			t.Fatalf("Get after Add: %v", err)
		}
		// QEMU's JSON parser stores U+0000 as C0 80 (modified UTF-8), and
		// the store keeps secrets the way QEMU holds them.
		if want := strings.ReplaceAll(data, "\x00", "\xc0\x80"); !b64 && !keyed && string(got) != want {
			t.Fatalf("raw secret %q came back as %q", data, got)
		}
		keymem.Free(got) // copies are key memory
		if u, err := st.GetUTF8("s"); err == nil {
			keymem.Free(u)
		}
		if err := st.Delete("s"); err != nil {
			t.Fatal(err)
		}
	})
}

// qmpAllowed are the commands FuzzQMP may run: everything that only
// touches the in-memory graph (the file driver is not registered, so no
// node reaches the filesystem; qcow2 and luks nodes sit on null-co).
var qmpAllowed = map[string]bool{
	"blockdev-add": true, "blockdev-del": true, "query-named-block-nodes": true, "query-block": true,
	"block_resize": true, "object-add": true, "object-del": true, "blockdev-create": true,
	"x-blockdev-amend": true, "query-jobs": true, "job-dismiss": true, "job-cancel": true,
	"job-pause": true, "job-resume": true, "job-complete": true, "job-finalize": true,
	"query-version": true, "query-commands": true, "query-block-exports": true,
	"block-export-add": true, "block-export-del": true, "nbd-server-add": true, "nbd-server-remove": true,
	"blockdev-snapshot": true, "blockdev-reopen": true, "block-set-write-threshold": true,
	"block-stream": true, "block-commit": true, "blockdev-mirror": true, "query-block-jobs": true,
	"block-job-set-speed": true, "block-job-cancel": true, "block-job-pause": true, "block-job-resume": true,
	"block-job-complete": true, "block-job-finalize": true, "block-job-dismiss": true,
}

// unsafeArgs rejects arguments that would read files (secret file=,
// tls-creds dir=) or take long (KDF benchmarks with large targets, argon2
// with its default memory).
func unsafeArgs(v any) bool {
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			switch k {
			case "file", "dir":
				if _, ok := e.(string); ok {
					return true
				}
			case "iter-time":
				if n, ok := e.(json.Number); !ok || n.String() > "50" || len(n.String()) > 2 {
					return true
				}
			case "pbkdf":
				if e != "pbkdf2" {
					return true
				}
			}
			if unsafeArgs(e) {
				return true
			}
		}
	case []any:
		for _, e := range x {
			if unsafeArgs(e) {
				return true
			}
		}
	}
	return false
}

type request struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments"`
}

func qmpSeeds(f *testing.F) {
	scripts, _ := filepath.Glob("../qmpdiff/scripts/*.qmp")
	for _, p := range scripts {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		var keep []string
		for _, l := range strings.Split(string(b), "\n") {
			if !strings.HasPrefix(l, "#") && strings.Contains(l, `"execute"`) {
				keep = append(keep, l)
			}
		}
		f.Add(strings.Join(keep, "\n"))
	}
	f.Add(`{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0","data":"pw"}}
{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","size":8388608,"read-zeroes":true}}
{"execute":"blockdev-create","arguments":{"job-id":"c","options":{"driver":"luks","file":"n0","size":4194304,"key-secret":"s0","iter-time":1}}}
{"execute":"query-jobs"}
{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r0","file":{"driver":"blkdebug","image":"n0","inject-error":[{"iotype":"read","errno":5}]}}}
{"execute":"block_resize","arguments":{"node-name":"r0","size":1048576}}
{"execute":"query-named-block-nodes","arguments":{"flat":false}}
{"execute":"blockdev-del","arguments":{"node-name":"r0"}}`)
	f.Add(`{"execute":"blockdev-add","arguments":{"driver":"luks","node-name":"l","key-secret":"s","file":{"driver":"null-co","size":4096}}}
{"execute":"x-blockdev-amend","arguments":{"job-id":"a","node-name":"l","options":{"driver":"luks","state":"inactive","keyslot":9}}}
{"execute":"job-cancel","arguments":{"id":"a"}}`)
}

// FuzzQMP runs arbitrary sequences of graph, object and job commands with
// arbitrary arguments on a fresh in-process daemon: every command gets a
// reply within 10 s and no handler panics (the monitor recovers panics and
// logs them; the log is checked).
func FuzzQMP(f *testing.F) {
	qmpSeeds(f)
	f.Fuzz(func(t *testing.T, script string) {
		var reqs []request
		sc := bufio.NewScanner(strings.NewReader(script))
		sc.Buffer(nil, 1<<20)
		for sc.Scan() && len(reqs) < 32 {
			var r request
			d := json.NewDecoder(strings.NewReader(sc.Text()))
			d.UseNumber()
			// What the monitor's own parser refuses (invalid UTF-8, a key
			// given twice, ...) never reaches a handler and is answered
			// without an id; FuzzParser covers that.
			if !utf8.Valid(sc.Bytes()) || d.Decode(&r) != nil || !qmpAllowed[r.Execute] {
				continue
			}
			if _, err := qmp.ParseJSON(sc.Text()); err != nil {
				continue
			}
			var args any
			if len(r.Arguments) > 0 {
				ad := json.NewDecoder(bytes.NewReader(r.Arguments))
				ad.UseNumber()
				if ad.Decode(&args) != nil || unsafeArgs(args) {
					continue
				}
			}
			reqs = append(reqs, r)
		}
		if len(reqs) == 0 {
			return
		}
		logs := &lockedBuffer{}
		lg := logrus.New()
		lg.SetOutput(logs)
		d := daemon.New(logrus.NewEntry(lg), raw.Driver(), null.Driver(), luks.Driver(), qcow2.Driver(), blkdebug.Driver())
		dir := t.TempDir()
		l, err := qmp.ListenUnix(filepath.Join(dir, "q.sock"))
		if err != nil {
			t.Fatal(err)
		}
		go d.QMP.Serve(l)
		defer d.Close()
		q, err := harness.DialQMP(filepath.Join(dir, "q.sock"), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer q.Close()
		q.Timeout = 10 * time.Second
		for _, r := range reqs {
			var args any
			if len(r.Arguments) > 0 {
				args = json.RawMessage(r.Arguments)
			}
			if _, err := q.Exec(r.Execute, args); err != nil {
				if _, ok := err.(*harness.Error); !ok {
					t.Fatalf("%s %s: %v", r.Execute, r.Arguments, err)
				}
			}
		}
		if s := logs.String(); strings.Contains(s, "panicked") {
			t.Fatalf("a command handler panicked:\n%s", s)
		}
	})
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
