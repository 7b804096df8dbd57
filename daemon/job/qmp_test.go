package job

import (
	"bufio"
	"context"
	"errors"
	"net"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"blockd/qmp"
)

// The QMP commands and events, byte for byte as QSD 7.2 prints them.
func TestQMP(t *testing.T) {
	s := qmp.NewServer(nil, qmp.Version{})
	m := NewManager(s.Emit)
	RegisterQMP(s, m)
	type createArgs struct {
		JobID string `json:"job-id"`
		Fail  string `json:"fail,omitempty"`
	}
	qmp.Handle(s, "x-create", func(_ context.Context, _ *qmp.Monitor, a *createArgs) (any, error) {
		return nil, m.Start(a.JobID, "create", func(context.Context) error {
			if a.Fail != "" {
				return errors.New(a.Fail)
			}
			return nil
		})
	})
	path := filepath.Join(t.TempDir(), "s")
	l, err := qmp.ListenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(l)
	defer s.Close()
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rd := bufio.NewReader(conn)
	ts := regexp.MustCompile(`"seconds": \d+, "microseconds": \d+`)
	next := func() string {
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		l, err := rd.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		return ts.ReplaceAllString(strings.TrimSuffix(l, "\r\n"), `"seconds": S, "microseconds": U`)
	}
	send := func(s string) { conn.Write([]byte(s + "\n")) }
	next() // greeting
	send(`{"execute":"qmp_capabilities"}`)
	next()
	ev := func(id, st string) string {
		return `{"timestamp": {"seconds": S, "microseconds": U}, "event": "JOB_STATUS_CHANGE", "data": {"status": "` + st + `", "id": "` + id + `"}}`
	}
	send(`{"execute":"x-create","arguments":{"job-id":"c1"},"id":1}`)
	var got []string
	for len(got) < 6 {
		got = append(got, next())
	}
	want := map[string]bool{ev("c1", "created"): true, ev("c1", "running"): true, ev("c1", "waiting"): true,
		ev("c1", "pending"): true, ev("c1", "concluded"): true, `{"return": {}, "id": 1}`: true}
	for _, g := range got {
		if !want[g] {
			t.Errorf("unexpected %s", g)
		}
	}
	send(`{"execute":"query-jobs","id":2}`)
	if g := next(); g != `{"return": [{"current-progress": 1, "status": "concluded", "total-progress": 1, "type": "create", "id": "c1"}], "id": 2}` {
		t.Errorf("query-jobs: %s", g)
	}
	send(`{"execute":"job-dismiss","arguments":{"id":"c1"},"id":3}`)
	if g := next(); g != ev("c1", "null") {
		t.Errorf("dismiss event: %s", g)
	}
	if g := next(); g != `{"return": {}, "id": 3}` {
		t.Errorf("dismiss: %s", g)
	}
	send(`{"execute":"x-create","arguments":{"job-id":"c2","fail":"Could not create 'x': No such file or directory"}}`)
	for i := 0; i < 5; i++ {
		next()
	}
	send(`{"execute":"query-jobs"}`)
	if g := next(); g != `{"return": [{"current-progress": 1, "status": "concluded", "total-progress": 1, "type": "create", "id": "c2", "error": "Could not create 'x': No such file or directory"}]}` {
		t.Errorf("query-jobs: %s", g)
	}
	for _, tc := range []struct{ in, want string }{
		{`{"execute":"job-cancel","arguments":{"id":"c2"}}`, `{"error": {"class": "GenericError", "desc": "Job 'c2' in state 'concluded' cannot accept command verb 'cancel'"}}`},
		{`{"execute":"job-finalize","arguments":{"id":"nosuch"}}`, `{"error": {"class": "GenericError", "desc": "Job not found"}}`},
		{`{"execute":"job-pause","arguments":{}}`, `{"error": {"class": "GenericError", "desc": "Parameter 'id' is missing"}}`},
		{`{"execute":"job-resume","arguments":{"id":1}}`, `{"error": {"class": "GenericError", "desc": "Invalid parameter type for 'id', expected: string"}}`},
		{`{"execute":"job-complete","arguments":{"id":"c2","x":1}}`, `{"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}}`},
	} {
		send(tc.in)
		if g := next(); g != tc.want {
			t.Errorf("%s:\n got %s\nwant %s", tc.in, g, tc.want)
		}
	}
}
