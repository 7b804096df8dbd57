package qmpdiff

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

func TestNormalise(t *testing.T) {
	var v any
	json.Unmarshal([]byte(`{"event": "E", "timestamp": {"seconds": 1, "microseconds": 2},
		"data": {"node-name": "#block123", "file": "/tmp/x/a.img", "image": {"actual-size": 4096, "virtual-size": 9}}}`), &v)
	got := canon(norm(v, "/tmp/x"))
	want := `{"data":{"file":"@TMP@/a.img","image":{"actual-size":0,"virtual-size":9},"node-name":"#block1NN"},"event":"E"}`
	if got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
	// The timestamp of a reply is data, not an event stamp.
	json.Unmarshal([]byte(`{"return": {"timestamp": 5}}`), &v)
	if got := canon(norm(v, "/tmp/x")); got != `{"return":{"timestamp":5}}` {
		t.Errorf("reply: %s", got)
	}
}

func TestDiff(t *testing.T) {
	a := []string{"greeting {}", "> x", `< {"return":{}}`}
	if d := diff(a, a); d != "" {
		t.Errorf("equal transcripts differ: %s", d)
	}
	b := []string{"greeting {}", "> x", `< {"return":[]}`}
	if d := diff(a, b); d == "" {
		t.Error("difference not found")
	}
	if d := diff(a, a[:2]); d == "" {
		t.Error("missing line not found")
	}
	qsd := `<< {"id":1,"return":[{"name":"a"},{"name":"b"},{"name":"c"}]}`
	for _, tc := range []struct {
		got  string
		same bool
	}{
		{`<< {"id":1,"return":[{"name":"b"}]}`, true},
		{`<< {"id":2,"return":[{"name":"b"}]}`, false},
		{`<< {"id":1,"return":[{"name":"z"}]}`, false},
		{`<< {"id":1,"return":[{"name":"b","x":1}]}`, false},
	} {
		if sameCommands(qsd, tc.got) != tc.same {
			t.Errorf("%s: same=%v", tc.got, !tc.same)
		}
	}
}

func TestParseScript(t *testing.T) {
	p := filepath.Join(t.TempDir(), "s.qmp")
	os.WriteFile(p, []byte("# comment\n\n{\"execute\": \"x\"}\n!raw \"a\\x01\"\n!rawrep 3 \"[\"\n!wait JOB_STATUS_CHANGE {\"id\": \"j\"}\n!capture @A@\n"), 0o644)
	items, err := parseScript(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(items) != 5 || string(items[0].send) != "{\"execute\": \"x\"}\n" || string(items[1].send) != "a\x01" ||
		string(items[2].send) != "[[[" || items[3].event != "JOB_STATUS_CHANGE" || items[3].match["id"] != "j" || items[4].capture != "@A@" {
		t.Fatalf("%+v", items)
	}
	os.WriteFile(p, []byte("!bogus\n"), 0o644)
	if _, err := parseScript(p); err == nil {
		t.Error("unknown directive accepted")
	}
}
