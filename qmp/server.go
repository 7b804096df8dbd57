// Package qmp is blockd's QEMU Machine Protocol server, compatible with the
// monitor of qemu-storage-daemon 7.2: the same framing and JSON dialect
// (QEMU's parser, with its limits and error texts), the same greeting and
// capability negotiation, the same error replies, and output in QEMU's
// JSON style.
//
// Each connection is a Monitor with three goroutines: a reader that parses
// input and answers exec-oob requests at once, a dispatcher that runs the
// monitor's in-band commands one at a time in order, and a writer that
// drains a bounded output queue. Different monitors run their commands
// concurrently, so command handlers must be safe for concurrent use.
package qmp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"blockd/internal/qapi"
)

// VersionTriple is QEMU's VersionTriple.
type VersionTriple struct {
	Major int `json:"major"`
	Minor int `json:"minor"`
	Micro int `json:"micro"`
}

// Version is the result of query-version and part of the greeting.
type Version struct {
	Qemu    VersionTriple `json:"qemu"`
	Package string        `json:"package"`
}

// Flags modify how a command is dispatched.
type Flags uint

const (
	// AllowOOB lets the command run with exec-oob (none of QSD's does).
	AllowOOB Flags = 1 << iota
)

// Args is the argument object of a command that decodes its own arguments
// (boxed commands such as blockdev-add and object-add). A command whose
// args function returns *Args gets the raw tree: map[string]any, []any,
// string, json.Number, bool and nil.
type Args map[string]any

// Empty is the result of a command that returns nothing ({}).
type Empty struct{}

// RunFunc runs a command. args is what the command's args function
// returned, filled from the request (nil when args is nil).
type RunFunc func(ctx context.Context, m *Monitor, args any) (any, error)

type command struct {
	name  string
	args  func() any
	run   RunFunc
	flags Flags
}

// MaxMonitors is how many connections a server serves at once. Further
// clients wait in the listen backlog, as they do for QEMU's socket chardev,
// which serves one.
const MaxMonitors = 64

// Output queue bounds for one monitor. A monitor whose client does not read
// is dropped when its queue overflows, so that it holds up nobody else.
const (
	MaxQueuedMessages = 4096
	MaxQueuedBytes    = 16 << 20 // a single larger message is let through an empty queue
)

// Server is a QMP server. Create it with NewServer, register commands, then
// call Serve for each listener.
type Server struct {
	log     *logrus.Entry
	version Version

	mu        sync.Mutex // protects the fields up to the blank line
	cmds      map[string]*command
	order     []string // registration order
	monitors  map[*Monitor]struct{}
	listeners map[net.Listener]struct{}
	nextID    uint64
	quit      func()
	closed    bool

	slots chan struct{}  // one per running monitor, MaxMonitors in all
	done  chan struct{}  // closed by Close
	wg    sync.WaitGroup // running monitors
}

// NewServer returns a server that reports version in its greeting and in
// query-version. It has the built-in commands qmp_capabilities,
// query-version, query-commands and quit.
func NewServer(log *logrus.Entry, version Version) *Server {
	if log == nil {
		l := logrus.New()
		l.SetOutput(discard{})
		log = logrus.NewEntry(l)
	}
	s := &Server{
		log:       log,
		version:   version,
		cmds:      map[string]*command{},
		monitors:  map[*Monitor]struct{}{},
		listeners: map[net.Listener]struct{}{},
		slots:     make(chan struct{}, MaxMonitors),
		done:      make(chan struct{}),
	}
	s.registerBuiltins()
	return s
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// Register adds a command. args returns a pointer to a fresh argument
// struct, decoded strictly from the request's "arguments" with QEMU's error
// texts (or *Args for the raw tree); nil means the command takes no
// arguments. Registering a name again replaces the command.
func (s *Server) Register(name string, args func() any, run RunFunc, flags Flags) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.cmds[name]; !ok {
		s.order = append(s.order, name)
	}
	s.cmds[name] = &command{name: name, args: args, run: run, flags: flags}
}

// Handle registers a command with typed arguments and result. A is the
// argument struct (qmp.Args for the raw tree, qmp.Empty for none); the
// result R is encoded with its struct fields as members, and a nil result
// (nil interface or nil pointer) is {}.
func Handle[A, R any](s *Server, name string, fn func(ctx context.Context, m *Monitor, a *A) (R, error)) {
	s.Register(name, func() any { return new(A) }, func(ctx context.Context, m *Monitor, args any) (any, error) {
		r, err := fn(ctx, m, args.(*A))
		if err != nil {
			return nil, err
		}
		return r, nil
	}, 0)
}

// Commands returns the registered command names in registration order.
func (s *Server) Commands() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.order)
}

func (s *Server) lookup(name string) *command {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cmds[name]
}

// SetQuit sets the function the quit command calls, after its reply has
// been queued. The daemon shuts down from there (and may call Close).
func (s *Server) SetQuit(fn func()) {
	s.mu.Lock()
	s.quit = fn
	s.mu.Unlock()
}

// MonitorOption configures the monitors of one listener.
type MonitorOption func(*monitorConfig)

type monitorConfig struct {
	pretty bool
}

// Pretty makes the monitors print QEMU's pretty layout (--monitor pretty=on).
func Pretty(on bool) MonitorOption { return func(c *monitorConfig) { c.pretty = on } }

// Serve accepts connections on l until l fails or the server is closed,
// running a monitor for each. It returns nil after Close.
func (s *Server) Serve(l net.Listener, opts ...MonitorOption) error {
	var cfg monitorConfig
	for _, o := range opts {
		o(&cfg)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()
	backoff := 5 * time.Millisecond
	for {
		select {
		case s.slots <- struct{}{}:
		case <-s.done:
			return nil
		}
		conn, err := l.Accept()
		if err != nil {
			<-s.slots
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed || errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
				errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.EINTR) {
				s.log.WithError(err).Warn("qmp: accept")
				time.Sleep(backoff)
				backoff = min(2*backoff, time.Second)
				continue
			}
			return err
		}
		backoff = 5 * time.Millisecond
		if !s.startMonitor(conn, cfg) {
			<-s.slots
			conn.Close()
		}
	}
}

func (s *Server) startMonitor(conn net.Conn, cfg monitorConfig) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.nextID++
	m := newMonitor(s, s.nextID, conn, cfg)
	s.monitors[m] = struct{}{}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		m.run()
		s.mu.Lock()
		delete(s.monitors, m)
		s.mu.Unlock()
		<-s.slots
	}()
	return true
}

// Close stops all listeners and monitors: running commands see their
// context cancelled, queued requests are dropped, and pending output gets
// a moment to drain. It waits for the monitors to finish.
func (s *Server) Close() error {
	s.mu.Lock()
	if !s.closed {
		close(s.done)
	}
	s.closed = true
	ls := make([]net.Listener, 0, len(s.listeners))
	for l := range s.listeners {
		ls = append(ls, l)
	}
	ms := make([]*Monitor, 0, len(s.monitors))
	for m := range s.monitors {
		ms = append(ms, m)
	}
	s.mu.Unlock()
	for _, l := range ls {
		l.Close()
	}
	for _, m := range ms {
		m.shutdown()
	}
	s.wg.Wait()
	return nil
}

// Timestamp is an event's time stamp.
type Timestamp struct {
	Seconds      int64 `json:"seconds"`
	Microseconds int64 `json:"microseconds"`
}

type event struct {
	Event     string    `json:"event"`
	Timestamp Timestamp `json:"timestamp"`
	Data      any       `json:"data,omitempty"`
}

// Emit sends an event to every monitor that has completed capability
// negotiation. data is encoded like a command result; nil leaves "data"
// out. Emit never blocks on a client.
func (s *Server) Emit(name string, data any) {
	now := time.Now()
	ev := event{Event: name, Data: data, Timestamp: Timestamp{now.Unix(), int64(now.Nanosecond() / 1000)}}
	var plain, pretty []byte
	s.mu.Lock()
	defer s.mu.Unlock()
	for m := range s.monitors {
		if !m.negotiated() {
			continue
		}
		var b []byte
		if m.pretty {
			if pretty == nil {
				pretty = wireFormat(qapi.MarshalPretty(ev))
			}
			b = pretty
		} else {
			if plain == nil {
				plain = wireFormat(qapi.Marshal(ev))
			}
			b = plain
		}
		m.enqueue(b)
	}
}

// ListenUnix listens on a unix socket at path, created with mode 0600.
// A stale socket at path (one nobody listens on) is removed first; closing
// the listener removes the socket.
func ListenUnix(path string) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s: %w", path, syscall.EADDRINUSE)
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, err
		}
	}
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	// On Linux the socket file takes the mode of the socket's inode, so
	// this makes the file 0600 from the start, with no window.
	_ = syscall.Fchmod(fd, 0o600)
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
		syscall.Close(fd)
		return nil, &net.OpError{Op: "listen", Net: "unix", Addr: &net.UnixAddr{Name: path, Net: "unix"}, Err: os.NewSyscallError("bind", err)}
	}
	if fi, err := os.Stat(path); err == nil && fi.Mode().Perm() != 0o600 {
		if err := os.Chmod(path, 0o600); err != nil {
			syscall.Close(fd)
			os.Remove(path)
			return nil, err
		}
	}
	if err := syscall.Listen(fd, 64); err != nil {
		syscall.Close(fd)
		os.Remove(path)
		return nil, os.NewSyscallError("listen", err)
	}
	f := os.NewFile(uintptr(fd), path)
	l, err := net.FileListener(f)
	f.Close()
	if err != nil {
		os.Remove(path)
		return nil, err
	}
	return &unixListener{Listener: l, path: path}, nil
}

type unixListener struct {
	net.Listener
	path string
	once sync.Once
}

func (l *unixListener) Close() error {
	err := l.Listener.Close()
	l.once.Do(func() { os.Remove(l.path) })
	return err
}

// ListenTCP listens on a TCP address such as "127.0.0.1:4444" or
// "[::1]:4444", on each address the host resolves to (see ListenInet).
func ListenTCP(addr string) (net.Listener, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	return ListenInet(InetAddr{Host: host, Port: port})
}
