package nbd

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"blockd/graph"
)

// Defaults, as qemu-storage-daemon's nbd-server-start.
const (
	DefaultMaxConnections   = 100
	DefaultHandshakeTimeout = 10 * time.Second
	// DefaultMaxInFlight is the number of requests served in parallel per
	// connection (QEMU's MAX_NBD_REQUESTS).
	DefaultMaxInFlight = 16
	// DefaultMaxRequestMemory bounds the request buffers (READ data, WRITE
	// payloads) of all connections together, DefaultMaxConnRequestMemory
	// those of one connection: without them 16 requests of 32 MiB per
	// connection could hold 512 MiB each.
	DefaultMaxRequestMemory     = 512 << 20
	DefaultMaxConnRequestMemory = 128 << 20
)

// ErrServerClosed is returned by Serve and ServeConn after Close.
var ErrServerClosed = errors.New("nbd: server closed")

// ErrTooManyConnections is returned by ServeConn when MaxConnections
// connections are already open.
var ErrTooManyConnections = errors.New("nbd: too many connections")

// Export describes one export. The server keeps its own copy: changing the
// struct after AddExport has no effect.
type Export struct {
	// Name is what clients ask for (NBD_OPT_GO/EXPORT_NAME); "" is a valid
	// name (the "default" export). At most 4096 bytes.
	Name string
	// Description is sent in NBD_OPT_LIST and NBD_INFO_DESCRIPTION when
	// non-empty. At most 4096 bytes.
	Description string
	// Node serves the I/O. It should be the graph's validating top node:
	// clients that did not agree to block sizes may send requests that are
	// not aligned to MinBlock (the graph widens them), and requests up to
	// 32 MiB go to it whole, whatever its MaxTransfer (the graph splits
	// them). The server never closes the node.
	Node graph.Node
	// ReadOnly exports reject WRITE, TRIM and WRITE_ZEROES with EPERM and
	// advertise NBD_FLAG_READ_ONLY.
	ReadOnly bool
	// Block size constraints advertised with NBD_INFO_BLOCK_SIZE. Zero
	// means: derive from graph.Limiter (MinBlock = Align or 1, PrefBlock =
	// max(4096, MinBlock), MaxBlock = min(MaxTransfer, 32 MiB)).
	MinBlock, PrefBlock, MaxBlock uint32
}

// Options configure a Server.
type Options struct {
	// TLSConfig, when non-nil, makes TLS mandatory (FORCEDTLS): every
	// option other than NBD_OPT_STARTTLS and NBD_OPT_ABORT is refused with
	// NBD_REP_ERR_TLS_REQD until the client upgrades, as QEMU does with
	// tls-creds.
	TLSConfig *tls.Config
	// MaxConnections caps the open connections (handshake or transmission).
	// When a client arrives at the limit, the oldest connection that has
	// not finished its handshake is closed to make room, so that sockets
	// left idle before the handshake cannot lock clients out until they
	// time out; when every connection is in transmission, the new one is
	// closed at once. 0 = unlimited. NBD_FLAG_CAN_MULTI_CONN is advertised
	// unless it is 1.
	MaxConnections int
	// HandshakeTimeout bounds the handshake (including the TLS handshake);
	// the connection is closed when it expires. 0 means
	// DefaultHandshakeTimeout, a negative value means no limit.
	HandshakeTimeout time.Duration
	// MaxInFlight is the number of requests served in parallel on one
	// connection; 0 means DefaultMaxInFlight.
	MaxInFlight int
	// MaxRequestMemory bounds the bytes of request buffers (READ data and
	// WRITE payloads, counted at the buffer pool's size class) held by all
	// connections together, MaxConnRequestMemory those held by one
	// connection. A request waits until its bytes are free, and its
	// connection reads nothing more from the socket meanwhile; the bytes
	// come back once the reply is sent. 0 means DefaultMaxRequestMemory
	// and DefaultMaxConnRequestMemory, a negative value no limit, and a
	// positive value below 32 MiB (the largest request) is raised to it.
	MaxRequestMemory     int64
	MaxConnRequestMemory int64
	// Log receives connection-level events (never one line per request).
	// nil discards them.
	Log *logrus.Entry
}

// Server is an NBD server. Its methods are safe for concurrent use.
type Server struct {
	opts Options
	log  *logrus.Entry
	mem  *budget // request buffers of all connections (MaxRequestMemory)

	mu        sync.Mutex // protects the fields below
	exports   map[string]*export
	order     []*export // in AddExport order, for NBD_OPT_LIST
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	seq       uint64 // connections accepted, numbering them
	closed    bool

	wg sync.WaitGroup // connection goroutines
}

// export is the server's copy of an Export plus its clients.
type export struct {
	name, desc string
	node       graph.Node
	ro         bool
	minBlock   uint32
	prefBlock  uint32
	maxBlock   uint32
	bs         graph.BlockStatuser
	zeroer     graph.Zeroer
	discarder  graph.Discarder
	cacher     graph.Cacher
	clients    map[*conn]struct{} // guarded by Server.mu
	removing   bool               // guarded by Server.mu
	done       chan struct{}      // closed when removing and no clients remain
	doneClosed bool               // guarded by Server.mu
}

// NewServer returns a server with no exports and no listeners.
func NewServer(o Options) *Server {
	if o.HandshakeTimeout == 0 {
		o.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = DefaultMaxInFlight
	}
	log := o.Log
	if log == nil {
		l := logrus.New()
		l.SetOutput(discard{})
		log = logrus.NewEntry(l)
	}
	return &Server{
		opts:      o,
		log:       log,
		mem:       newBudget(o.MaxRequestMemory, DefaultMaxRequestMemory),
		exports:   make(map[string]*export),
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*conn]struct{}),
	}
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// AddExport makes an export available to new connections.
func (s *Server) AddExport(e *Export) error {
	if e == nil || e.Node == nil {
		return errors.New("export has no block node")
	}
	if len(e.Name) > maxString {
		return fmt.Errorf("export name '%s' too long", e.Name)
	}
	if len(e.Description) > maxString {
		return fmt.Errorf("description '%s' too long", e.Description)
	}
	x := &export{
		name: e.Name, desc: e.Description, node: e.Node, ro: e.ReadOnly,
		clients: make(map[*conn]struct{}),
		done:    make(chan struct{}),
	}
	if err := x.setBlockSizes(e); err != nil {
		return err
	}
	x.bs, _ = e.Node.(graph.BlockStatuser)
	x.zeroer, _ = e.Node.(graph.Zeroer)
	x.discarder, _ = e.Node.(graph.Discarder)
	x.cacher, _ = e.Node.(graph.Cacher)

	s.mu.Lock()
	defer s.mu.Unlock()
	if _, dup := s.exports[e.Name]; dup {
		return fmt.Errorf("NBD server already has export named '%s'", e.Name)
	}
	s.exports[e.Name] = x
	s.order = append(s.order, x)
	return nil
}

func isPow2(v uint32) bool { return v != 0 && v&(v-1) == 0 }

func (x *export) setBlockSizes(e *Export) error {
	var lim graph.Limits
	if l, ok := e.Node.(graph.Limiter); ok {
		lim = l.Limits()
	}
	min := e.MinBlock
	if min == 0 {
		min = 1
		if lim.Align > 1 {
			if lim.Align > 64<<10 {
				return fmt.Errorf("node alignment %d is larger than NBD allows (65536)", lim.Align)
			}
			min = uint32(lim.Align)
		}
	}
	if !isPow2(min) || min > 64<<10 {
		return fmt.Errorf("minimum block size %d must be a power of two of at most 65536", min)
	}
	pref := e.PrefBlock
	if pref == 0 {
		pref = max(4096, min)
	}
	if !isPow2(pref) || pref < max(512, min) {
		return fmt.Errorf("preferred block size %d must be a power of two of at least %d", pref, max(512, min))
	}
	maxb := e.MaxBlock
	if maxb == 0 {
		maxb = maxPayload
		if lim.MaxTransfer > 0 && lim.MaxTransfer < maxPayload {
			maxb = uint32(lim.MaxTransfer)
		}
		maxb -= maxb % min
	}
	if maxb < pref || maxb%min != 0 {
		return fmt.Errorf("maximum block size %d must be a multiple of %d and at least %d", maxb, min, pref)
	}
	x.minBlock, x.prefBlock, x.maxBlock = min, pref, maxb
	return nil
}

// RemoveExport withdraws an export; new clients no longer see it. In safe
// mode (hard false) it fails, changing nothing, while clients are
// connected to it. In hard mode connected clients are disconnected; done is
// closed once all of them are gone and their in-flight requests have
// finished. The node is not closed.
//
// Errors wrap graph.ErrNotFound (no such export) or graph.ErrInUse (safe
// mode with clients, or already being removed).
func (s *Server) RemoveExport(name string, hard bool) (done <-chan struct{}, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	x, ok := s.exports[name]
	if !ok {
		return nil, fmt.Errorf("export '%s' is not found: %w", name, graph.ErrNotFound)
	}
	if x.removing {
		return nil, fmt.Errorf("export '%s' is already shutting down: %w", name, graph.ErrInUse)
	}
	if !hard && len(x.clients) > 0 {
		return nil, fmt.Errorf("export '%s' still in use: %w", name, graph.ErrInUse)
	}
	s.removeLocked(x)
	return x.done, nil
}

// removeLocked unlists x and disconnects its clients. s.mu must be held.
func (s *Server) removeLocked(x *export) {
	x.removing = true
	delete(s.exports, x.name)
	for i, y := range s.order {
		if y == x {
			s.order = append(s.order[:i], s.order[i+1:]...)
			break
		}
	}
	for c := range x.clients {
		c.kill()
	}
	s.maybeDoneLocked(x)
}

func (s *Server) maybeDoneLocked(x *export) {
	if x.removing && len(x.clients) == 0 && !x.doneClosed {
		x.doneClosed = true
		close(x.done)
	}
}

// Clients returns the number of connections in transmission phase on the
// named export (0 if there is no such export).
func (s *Server) Clients(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if x, ok := s.exports[name]; ok {
		return len(x.clients)
	}
	return 0
}

// Exports returns the names of the current exports in the order they were
// added.
func (s *Server) Exports() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	names := make([]string, len(s.order))
	for i, x := range s.order {
		names[i] = x.name
	}
	return names
}

// lookup finds an export by name for a handshake. It returns nil for
// unknown exports and for exports being removed.
func (s *Server) lookup(name string) *export {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.exports[name]
}

// attach registers c as a client of x. It fails if x was removed meanwhile
// or the server is closing.
func (s *Server) attach(c *conn, x *export) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || x.removing || c.killed.Load() {
		return false
	}
	x.clients[c] = struct{}{}
	c.attached = true
	return true
}

// detach unregisters c from x once its in-flight requests are finished.
func (s *Server) detach(c *conn, x *export) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(x.clients, c)
	s.maybeDoneLocked(x)
}

// listExports snapshots the exports for NBD_OPT_LIST.
func (s *Server) listExports() []*export {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*export(nil), s.order...)
}

// Serve accepts connections on l until l fails or Close is called; it may
// be called for several listeners at once. It returns ErrServerClosed after
// Close. Serve does not close l on other errors.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()

	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || isTemporary(err) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.WithError(err).Warnf("nbd: accept failed; retrying in %v", backoff)
				time.Sleep(backoff)
				continue
			}
			return err
		}
		backoff = 0
		c, err := s.newConn(nc)
		if err != nil {
			s.log.WithField("client", remoteName(nc)).Warnf("nbd: %v; connection closed", err)
			nc.Close()
			if errors.Is(err, ErrServerClosed) {
				return err
			}
			continue
		}
		go c.serve()
	}
}

// isTemporary reports accept errors worth retrying (out of file
// descriptors and similar).
func isTemporary(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

// ServeConn serves one already-connected client and returns when the
// connection ends. It counts against MaxConnections (returning
// ErrTooManyConnections and closing c when over it). Local attachment
// (nbd/attach) uses it with one end of a socket pair.
func (s *Server) ServeConn(nc net.Conn) error {
	c, err := s.newConn(nc)
	if err != nil {
		nc.Close()
		return err
	}
	c.serve()
	return nil
}

// newConn registers a new connection, enforcing MaxConnections.
func (s *Server) newConn(nc net.Conn) (*conn, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrServerClosed
	}
	if s.opts.MaxConnections > 0 && len(s.conns) >= s.opts.MaxConnections {
		old := s.oldestHandshakeLocked()
		if old == nil {
			return nil, fmt.Errorf("%w (limit %d)", ErrTooManyConnections, s.opts.MaxConnections)
		}
		// Its slot is free at once: the socket is closed here, and its
		// goroutine only has to notice.
		delete(s.conns, old)
		old.kill()
		old.log.Warnf("nbd: handshake not finished when a new client arrived at max-connections (%d); connection closed", s.opts.MaxConnections)
	}
	c := newConn(s, nc)
	s.seq++
	c.seq = s.seq
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	return c, nil
}

// oldestHandshakeLocked returns the oldest connection that has not entered
// transmission, or nil. s.mu must be held.
func (s *Server) oldestHandshakeLocked() *conn {
	var old *conn
	for c := range s.conns {
		if !c.attached && !c.killed.Load() && (old == nil || c.seq < old.seq) {
			old = c
		}
	}
	return old
}

// connDone unregisters a finished connection.
func (s *Server) connDone(c *conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.wg.Done()
}

// Close stops all listeners, disconnects every client (cancelling their
// in-flight requests) and waits until all connections have finished.
// Exports stay registered; their nodes are not closed.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for l := range s.listeners {
		l.Close()
	}
	for c := range s.conns {
		c.kill()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

func remoteName(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil && a.String() != "" {
		return a.String()
	}
	return nc.LocalAddr().String()
}
