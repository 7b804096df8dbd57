package harness

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

// QMP is a monitor client. One command runs at a time; events are kept in
// an unbounded list, so an unread event never stalls the connection.
// Every byte received is kept in the transcript.
type QMP struct {
	Greeting json.RawMessage
	// Timeout bounds each command (default 60 s).
	Timeout time.Duration

	nc net.Conn
	br *bufio.Reader

	cmdMu sync.Mutex // serialises commands
	id    uint64     // protected by cmdMu

	mu         sync.Mutex // protects the fields below
	cond       *sync.Cond
	replies    map[uint64][]byte
	events     []Event
	transcript bytes.Buffer
	readErr    error
}

// Event is one QMP event.
type Event struct {
	Name string         `json:"event"`
	Data map[string]any `json:"data"`
	Raw  []byte         `json:"-"`
}

// Error is a QMP error reply.
type Error struct {
	Class, Desc string
}

func (e *Error) Error() string { return e.Class + ": " + e.Desc }

// DialQMP connects to a monitor socket and negotiates capabilities.
func DialQMP(path string, timeout time.Duration) (*QMP, error) {
	nc, err := net.DialTimeout("unix", path, timeout)
	if err != nil {
		return nil, err
	}
	q := &QMP{nc: nc, br: bufio.NewReader(nc), replies: map[uint64][]byte{}, Timeout: 60 * time.Second}
	q.cond = sync.NewCond(&q.mu)
	nc.SetReadDeadline(time.Now().Add(timeout))
	line, err := q.br.ReadBytes('\n')
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("qmp greeting: %w", err)
	}
	nc.SetReadDeadline(time.Time{})
	q.transcript.Write(line)
	q.Greeting = bytes.TrimSpace(line)
	go q.reader()
	if _, err := q.Exec("qmp_capabilities", nil); err != nil {
		q.Close()
		return nil, err
	}
	return q, nil
}

func (q *QMP) reader() {
	for {
		line, err := q.br.ReadBytes('\n')
		q.mu.Lock()
		q.transcript.Write(line)
		if err != nil {
			q.readErr = err
			q.cond.Broadcast()
			q.mu.Unlock()
			return
		}
		var msg struct {
			Event *string         `json:"event"`
			ID    json.RawMessage `json:"id"`
		}
		if json.Unmarshal(line, &msg) == nil {
			switch {
			case msg.Event != nil:
				var ev Event
				_ = json.Unmarshal(line, &ev)
				ev.Raw = bytes.TrimSpace(line)
				q.events = append(q.events, ev)
			default:
				var id uint64
				_ = json.Unmarshal(msg.ID, &id)
				q.replies[id] = bytes.TrimSpace(line)
			}
		}
		q.cond.Broadcast()
		q.mu.Unlock()
	}
}

// Close closes the connection.
func (q *QMP) Close() { q.nc.Close() }

// Transcript returns every byte received so far.
func (q *QMP) Transcript() []byte {
	q.mu.Lock()
	defer q.mu.Unlock()
	return append([]byte(nil), q.transcript.Bytes()...)
}

// Events returns the events received so far.
func (q *QMP) Events() []Event {
	q.mu.Lock()
	defer q.mu.Unlock()
	return append([]Event(nil), q.events...)
}

// WaitEvent waits for an event named name for which match (if not nil)
// is true, looking at every event received since the connection opened.
func (q *QMP) WaitEvent(name string, match func(Event) bool, timeout time.Duration) (Event, error) {
	deadline := time.Now().Add(timeout)
	t := time.AfterFunc(timeout, func() { q.mu.Lock(); q.cond.Broadcast(); q.mu.Unlock() })
	defer t.Stop()
	q.mu.Lock()
	defer q.mu.Unlock()
	for {
		for _, ev := range q.events {
			if ev.Name == name && (match == nil || match(ev)) {
				return ev, nil
			}
		}
		if q.readErr != nil {
			return Event{}, fmt.Errorf("waiting for %s: %w", name, q.readErr)
		}
		if time.Now().After(deadline) {
			return Event{}, fmt.Errorf("no %s event within %v", name, timeout)
		}
		q.cond.Wait()
	}
}

// ErrTimeout is returned when a command gets no reply in time.
var ErrTimeout = errors.New("qmp: no reply in time")

// Exec runs a command and returns its "return" member; a QMP error reply
// is an *Error.
func (q *QMP) Exec(cmd string, args any) (json.RawMessage, error) {
	q.cmdMu.Lock()
	defer q.cmdMu.Unlock()
	q.id++
	id := q.id
	req := map[string]any{"execute": cmd, "id": id}
	if rv := reflect.ValueOf(args); args != nil && !(rv.Kind() == reflect.Map && rv.IsNil()) {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	q.nc.SetWriteDeadline(time.Now().Add(q.Timeout))
	if _, err := q.nc.Write(append(b, '\n')); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(q.Timeout)
	t := time.AfterFunc(q.Timeout, func() { q.mu.Lock(); q.cond.Broadcast(); q.mu.Unlock() })
	defer t.Stop()
	q.mu.Lock()
	defer q.mu.Unlock()
	for {
		if raw, ok := q.replies[id]; ok {
			delete(q.replies, id)
			var resp struct {
				Return json.RawMessage `json:"return"`
				Error  *struct {
					Class string `json:"class"`
					Desc  string `json:"desc"`
				} `json:"error"`
			}
			if err := json.Unmarshal(raw, &resp); err != nil {
				return nil, fmt.Errorf("qmp: bad reply %s: %w", raw, err)
			}
			if resp.Error != nil {
				return nil, &Error{Class: resp.Error.Class, Desc: resp.Error.Desc}
			}
			return resp.Return, nil
		}
		if raw, ok := q.replies[0]; ok {
			// An error without id: the server could not parse the request.
			delete(q.replies, 0)
			return nil, fmt.Errorf("qmp %s: reply without id: %s", cmd, raw)
		}
		if q.readErr != nil {
			return nil, fmt.Errorf("qmp %s: %w", cmd, q.readErr)
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%s: %w", cmd, ErrTimeout)
		}
		q.cond.Wait()
	}
}

// Must runs a command that has to succeed.
func Must(t testing.TB, q *QMP, cmd string, args any) []byte {
	t.Helper()
	r, err := q.Exec(cmd, args)
	if err != nil {
		t.Fatalf("%s %v: %v", cmd, args, err)
	}
	return r
}

// MustFail runs a command that has to fail with an error containing want.
func MustFail(t testing.TB, q *QMP, cmd string, args any, want string) {
	t.Helper()
	_, err := q.Exec(cmd, args)
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("%s %v: got %v, want an error containing %q", cmd, args, err, want)
	}
}

// JobInfo is an entry of query-jobs.
type JobInfo struct {
	ID     string `json:"id"`
	Type   string `json:"type"`
	Status string `json:"status"`
	Error  string `json:"error"`
}

// RunJob starts a job command (blockdev-create, x-blockdev-amend), waits
// for it to conclude, dismisses it and returns its error text ("" on
// success).
func RunJob(q *QMP, cmd string, args map[string]any, timeout time.Duration) (string, error) {
	if _, err := q.Exec(cmd, args); err != nil {
		return "", err
	}
	id := args["job-id"].(string)
	deadline := time.Now().Add(timeout)
	for {
		raw, err := q.Exec("query-jobs", nil)
		if err != nil {
			return "", err
		}
		var jobs []JobInfo
		if err := json.Unmarshal(raw, &jobs); err != nil {
			return "", err
		}
		for _, j := range jobs {
			if j.ID == id && j.Status == "concluded" {
				if _, err := q.Exec("job-dismiss", map[string]any{"id": id}); err != nil {
					return "", err
				}
				return j.Error, nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("job %s did not conclude within %v: %+v", id, timeout, jobs)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// SendRaw writes b as is (for malformed input) and waits for a reply
// without an id, which is how QMP answers input it cannot parse.
func (q *QMP) SendRaw(b []byte) ([]byte, error) {
	q.cmdMu.Lock()
	defer q.cmdMu.Unlock()
	q.nc.SetWriteDeadline(time.Now().Add(q.Timeout))
	if _, err := q.nc.Write(b); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(q.Timeout)
	t := time.AfterFunc(q.Timeout, func() { q.mu.Lock(); q.cond.Broadcast(); q.mu.Unlock() })
	defer t.Stop()
	q.mu.Lock()
	defer q.mu.Unlock()
	for {
		if raw, ok := q.replies[0]; ok {
			delete(q.replies, 0)
			return raw, nil
		}
		if q.readErr != nil {
			return nil, q.readErr
		}
		if time.Now().After(deadline) {
			return nil, ErrTimeout
		}
		q.cond.Wait()
	}
}

// DeleteExport removes an export in safe mode and waits for its
// BLOCK_EXPORT_DELETED. A client that has just disconnected may still be
// counted for a moment (the server closes the socket before it forgets
// the client), so "still in use" is retried until timeout.
func DeleteExport(q *QMP, id string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		_, err := q.Exec("block-export-del", map[string]any{"id": id})
		if err == nil {
			break
		}
		if !strings.Contains(err.Error(), "still in use") || time.Now().After(deadline) {
			return err
		}
		time.Sleep(time.Millisecond)
	}
	_, err := q.WaitEvent("BLOCK_EXPORT_DELETED", func(ev Event) bool { return ev.Data["id"] == id }, time.Until(deadline)+time.Second)
	return err
}
