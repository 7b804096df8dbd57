package qmp

import (
	"context"
	"io"
	"net"
	"reflect"
	"runtime/debug"
	"sort"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"blockd/internal/qapi"
	"blockd/internal/qjson"
)

// inBandQueueLen is QMP_REQ_QUEUE_LEN_MAX: with oob enabled, up to this
// many in-band requests wait while one runs; without it, the monitor reads
// nothing more until the current request is answered.
const inBandQueueLen = 8

// Monitor is one QMP connection.
type Monitor struct {
	s      *Server
	id     uint64
	conn   net.Conn
	pretty bool
	log    *logrus.Entry
	ctx    context.Context
	cancel context.CancelFunc

	reqs chan *request // in-band requests, in order

	mu          sync.Mutex // protects the fields below
	negotiating bool       // capabilities negotiation pending
	oob         bool       // oob capability enabled
	out         [][]byte   // output queue
	outBytes    int
	closing     bool // no more output will be queued; writer flushes and stops
	dead        bool // connection dropped; output is discarded
	wake        chan struct{}
}

type request struct {
	v    any
	err  error
	done chan struct{} // closed when answered (oob disabled only)
}

func newMonitor(s *Server, id uint64, conn net.Conn, cfg monitorConfig) *Monitor {
	ctx, cancel := context.WithCancel(context.Background())
	return &Monitor{
		s:           s,
		id:          id,
		conn:        conn,
		pretty:      cfg.pretty,
		log:         s.log.WithField("monitor", id),
		ctx:         ctx,
		cancel:      cancel,
		reqs:        make(chan *request, inBandQueueLen),
		negotiating: true,
		wake:        make(chan struct{}, 1),
	}
}

// ID is the monitor's number, unique within its server.
func (m *Monitor) ID() uint64 { return m.id }

// Context is cancelled when the monitor goes away.
func (m *Monitor) Context() context.Context { return m.ctx }

// Server is the server the monitor belongs to.
func (m *Monitor) Server() *Server { return m.s }

// OOB reports whether the client enabled the oob capability.
func (m *Monitor) OOB() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.oob
}

func (m *Monitor) negotiated() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return !m.negotiating
}

// run serves the connection until it is closed: it is the reader.
func (m *Monitor) run() {
	m.log.Debug("qmp: monitor connected")
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); m.writer() }()
	go func() {
		defer wg.Done()
		m.dispatcher()
		m.mu.Lock()
		m.closing = true
		m.mu.Unlock()
		m.kick()
	}()

	m.send(map[string]any{"QMP": map[string]any{"version": m.s.version, "capabilities": []string{"oob"}}})

	p := NewParser(m.onMessage)
	buf := make([]byte, 32<<10)
	for {
		n, err := m.conn.Read(buf)
		if n > 0 {
			p.Feed(buf[:n])
		}
		if err != nil {
			if err != io.EOF && m.ctx.Err() == nil {
				m.log.WithError(err).Debug("qmp: read")
			}
			break
		}
		if m.ctx.Err() != nil {
			break
		}
	}
	// A partial request is dropped; queued ones are still answered.
	close(m.reqs)
	wg.Wait()
	m.conn.Close()
	m.cancel()
	m.log.Debug("qmp: monitor disconnected")
}

// shutdown is the server closing: cancel commands, stop reading, let
// pending output drain for a moment.
func (m *Monitor) shutdown() {
	m.cancel()
	_ = m.conn.SetWriteDeadline(time.Now().Add(time.Second))
	if cr, ok := m.conn.(interface{ CloseRead() error }); ok && cr.CloseRead() == nil {
		_ = m.conn.SetReadDeadline(time.Now())
		return
	}
	m.conn.Close()
}

// drop closes a connection that failed or cannot keep up.
func (m *Monitor) drop(why string) {
	m.mu.Lock()
	already := m.dead
	m.dead = true
	m.out, m.outBytes = nil, 0
	m.mu.Unlock()
	if !already {
		m.log.Debugf("qmp: dropping monitor: %s", why)
		m.cancel()
		m.conn.Close()
		m.kick()
	}
}

func (m *Monitor) kick() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// enqueue adds an encoded message to the output queue without blocking.
func (m *Monitor) enqueue(b []byte) {
	m.mu.Lock()
	if m.dead {
		m.mu.Unlock()
		return
	}
	if len(m.out) > 0 && (len(m.out) >= MaxQueuedMessages || m.outBytes+len(b) > MaxQueuedBytes) {
		m.mu.Unlock()
		m.drop("output queue overflow (client does not read)")
		return
	}
	m.out = append(m.out, b)
	m.outBytes += len(b)
	m.mu.Unlock()
	m.kick()
}

// send encodes and queues one message.
func (m *Monitor) send(v any) {
	var b []byte
	if m.pretty {
		b = qapi.MarshalPretty(v)
	} else {
		b = qapi.Marshal(v)
	}
	m.enqueue(wireFormat(b))
}

func (m *Monitor) writer() {
	for {
		m.mu.Lock()
		out := m.out
		m.out, m.outBytes = nil, 0
		dead, closing := m.dead, m.closing
		m.mu.Unlock()
		if dead {
			return
		}
		if len(out) > 0 {
			bufs := net.Buffers(out)
			if _, err := bufs.WriteTo(m.conn); err != nil {
				m.drop("write: " + err.Error())
				return
			}
			continue
		}
		if closing {
			return
		}
		<-m.wake
	}
}

// onMessage is the parser's emit function, called by the reader.
func (m *Monitor) onMessage(v any, err error) {
	if err == nil {
		if d, ok := v.(map[string]any); ok && isOOB(d) {
			// Out-of-band requests are handled at once, by the reader.
			m.reply(v)
			return
		}
	}
	r := &request{v: v, err: err}
	if !m.OOB() {
		r.done = make(chan struct{})
	}
	select {
	case m.reqs <- r:
	case <-m.ctx.Done():
		return
	}
	if r.done != nil {
		select {
		case <-r.done:
		case <-m.ctx.Done():
		}
	}
}

func isOOB(d map[string]any) bool {
	_, oob := d["exec-oob"]
	_, exec := d["execute"]
	return oob && !exec
}

func (m *Monitor) dispatcher() {
	for r := range m.reqs {
		if m.ctx.Err() == nil {
			if r.err != nil {
				m.send(map[string]any{"error": AsError(r.err)})
			} else {
				// A client that goes away entirely (not just half-closed)
				// cancels the command: nothing waits for its reply.
				stop := watchHangup(m.conn, m.cancel)
				m.reply(r.v)
				stop()
			}
		}
		if r.done != nil {
			close(r.done)
		}
	}
}

// reply answers one request. The quit command's callback runs once its
// reply has been queued.
func (m *Monitor) reply(req any) {
	rsp := m.dispatch(req)
	m.send(rsp)
	if _, ok := rsp["return"]; ok {
		if d, _ := req.(map[string]any); d["execute"] == "quit" {
			m.s.mu.Lock()
			quit := m.s.quit
			m.s.mu.Unlock()
			if quit != nil {
				go quit()
			}
		}
	}
}

// qdictKeys returns the keys of d in the order QEMU iterates a QDict
// (qjson.Bucket). Keys that share a bucket come out newest first in QEMU;
// we do not know the input order, so they are sorted.
func qdictKeys(d map[string]any) []string {
	keys := make([]string, 0, len(d))
	for k := range d {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		bi, bj := qjson.Bucket(keys[i]), qjson.Bucket(keys[j])
		if bi != bj {
			return bi < bj
		}
		return keys[i] < keys[j]
	})
	return keys
}

// dispatch runs one request and returns the reply (qapi/qmp-dispatch.c).
func (m *Monitor) dispatch(req any) map[string]any {
	rsp := map[string]any{}
	dict, ok := req.(map[string]any)
	if !ok {
		rsp["error"] = &Error{Class: GenericError, Desc: "QMP input must be a JSON object"}
		return rsp
	}
	if id, ok := dict["id"]; ok {
		rsp["id"] = canonNumbers(id)
	}
	m.mu.Lock()
	negotiating, allowOOB := m.negotiating, m.oob
	m.mu.Unlock()

	ret, err := m.execute(dict, negotiating, allowOOB)
	if err != nil {
		e := AsError(err)
		m.mu.Lock()
		if m.negotiating && e.Class == CommandNotFound {
			e = &Error{Class: CommandNotFound, Desc: "Expecting capabilities negotiation with 'qmp_capabilities'"}
		}
		m.mu.Unlock()
		rsp["error"] = e
		return rsp
	}
	if ret == nil {
		ret = Empty{}
	} else if v := reflect.ValueOf(ret); v.Kind() == reflect.Pointer && v.IsNil() {
		ret = Empty{} // a command's result is never null
	}
	rsp["return"] = ret
	return rsp
}

func (m *Monitor) execute(dict map[string]any, negotiating, allowOOB bool) (any, error) {
	execKey := ""
	for _, k := range qdictKeys(dict) {
		v := dict[k]
		switch {
		case k == "execute" || (k == "exec-oob" && allowOOB):
			if _, ok := v.(string); !ok {
				return nil, Errorf("QMP input member '%s' must be a string", k)
			}
			if execKey != "" {
				return nil, Errorf("QMP input member '%s' clashes with '%s'", k, execKey)
			}
			execKey = k
		case k == "arguments":
			if _, ok := v.(map[string]any); !ok {
				return nil, Errorf("QMP input member 'arguments' must be an object")
			}
		case k == "id":
		default:
			return nil, Errorf("QMP input member '%s' is unexpected", k)
		}
	}
	if execKey == "" {
		return nil, Errorf("QMP input lacks member 'execute'")
	}
	name, oob := dict["execute"].(string)
	oob = !oob
	if oob {
		name = dict["exec-oob"].(string)
	}
	var cmd *command
	if !negotiating || name == "qmp_capabilities" {
		cmd = m.s.lookup(name)
	}
	if cmd == nil {
		return nil, NewError(CommandNotFound, "The command %s has not been found", name)
	}
	if oob && cmd.flags&AllowOOB == 0 {
		return nil, Errorf("The command %s does not support OOB", name)
	}
	tree, _ := dict["arguments"].(map[string]any)
	if tree == nil {
		tree = map[string]any{}
	}
	var args any
	if cmd.args == nil {
		if err := qapi.Decode(tree, false, &Empty{}); err != nil {
			return nil, err
		}
	} else {
		args = cmd.args()
		if raw, ok := args.(*Args); ok {
			*raw = tree
		} else if err := qapi.Decode(tree, false, args); err != nil {
			return nil, err
		}
	}
	start := time.Now()
	ret, err := m.call(cmd, args)
	if m.log.Logger.IsLevelEnabled(logrus.DebugLevel) {
		e := m.log.WithFields(logrus.Fields{"command": name, "took": time.Since(start)})
		if err != nil {
			e = e.WithField("error", err.Error())
		}
		e.Debug("qmp: command")
	}
	return ret, err
}

// call runs a handler; a panic becomes an error reply, not a crash.
func (m *Monitor) call(cmd *command, args any) (ret any, err error) {
	defer func() {
		if r := recover(); r != nil {
			m.log.WithField("command", cmd.name).Errorf("qmp: command panicked: %v\n%s", r, debug.Stack())
			ret, err = nil, Errorf("internal error in %s: %v", cmd.name, r)
		}
	}()
	return cmd.run(m.ctx, m, args)
}

// QMPCapability is QEMU's QMPCapability enum.
type QMPCapability string

// EnumValues implements qapi.Enum.
func (QMPCapability) EnumValues() []string { return []string{"oob"} }

type capabilitiesArgs struct {
	Enable []QMPCapability `json:"enable,omitempty"`
}

type commandInfo struct {
	Name string `json:"name"`
}

func (s *Server) registerBuiltins() {
	Handle(s, "qmp_capabilities", func(_ context.Context, m *Monitor, a *capabilitiesArgs) (any, error) {
		m.mu.Lock()
		defer m.mu.Unlock()
		if !m.negotiating {
			return nil, NewError(CommandNotFound, "Capabilities negotiation is already complete, command ignored")
		}
		oob := false
		for _, c := range a.Enable {
			// Every capability we know is offered, so none is unavailable.
			if c == "oob" {
				oob = true
			}
		}
		m.oob = oob
		m.negotiating = false
		return nil, nil
	})
	Handle(s, "query-version", func(_ context.Context, m *Monitor, _ *Empty) (Version, error) {
		return m.s.version, nil
	})
	Handle(s, "query-commands", func(_ context.Context, m *Monitor, _ *Empty) ([]commandInfo, error) {
		names := m.s.Commands()
		out := make([]commandInfo, len(names))
		for i, n := range names {
			// QEMU prepends each command, so the list is newest first.
			out[len(names)-1-i] = commandInfo{Name: n}
		}
		return out, nil
	})
	Handle(s, "quit", func(context.Context, *Monitor, *Empty) (any, error) {
		return nil, nil
	})
}
