package harness

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"
)

// NBD protocol constants (from the NBD protocol document).
const (
	nbdMagic        = 0x4e42444d41474943 // "NBDMAGIC"
	nbdOptMagic     = 0x49484156454f5054 // "IHAVEOPT"
	nbdRepMagic     = 0x3e889045565a9
	nbdReqMagic     = 0x25609513
	nbdSimpleMagic  = 0x67446698
	nbdFlagFixed    = 1
	nbdFlagNoZeroes = 2
	nbdOptGo        = 7
	nbdRepAck       = 1
	nbdRepInfo      = 3
	nbdRepErrBit    = 1 << 31
	nbdInfoExport   = 0

	CmdRead        = 0
	CmdWrite       = 1
	CmdDisc        = 2
	CmdFlush       = 3
	CmdTrim        = 4
	CmdCache       = 5
	CmdWriteZeroes = 6

	FlagFUA    = 1
	FlagNoHole = 2

	// Transmission flags.
	TFlagReadOnly  = 1 << 1
	TFlagMultiConn = 1 << 8
)

// NBDError is an error reply; its value is the NBD errno, which has the
// same number as the Linux errno.
type NBDError uint32

func (e NBDError) Error() string { return "nbd: " + syscall.Errno(e).Error() }

// Errno returns the error as a syscall.Errno.
func (e NBDError) Errno() syscall.Errno { return syscall.Errno(e) }

// ErrnoOf returns the NBD errno in err, or 0.
func ErrnoOf(err error) syscall.Errno {
	var e NBDError
	if errors.As(err, &e) {
		return e.Errno()
	}
	return 0
}

// ErrNBDTimeout is returned when a request gets no reply in time.
var ErrNBDTimeout = errors.New("nbd: no reply in time")

// NBD is a client connection in transmission phase. Requests may be issued
// from several goroutines at once; replies are matched by cookie.
type NBD struct {
	Size  uint64
	Flags uint16
	// Timeout bounds every request (default 60 s).
	Timeout time.Duration

	nc  net.Conn
	br  *bufio.Reader
	wmu sync.Mutex // serialises request writes

	mu      sync.Mutex // protects the fields below
	cookie  uint64
	pending map[uint64]*nbdCall
	err     error // set when the connection failed
	done    chan struct{}
}

type nbdCall struct {
	typ    uint16
	length uint32
	buf    []byte
	errno  uint32
	err    error
	done   chan struct{}
}

// DialNBD connects to addr (network "unix" or "tcp") and opens export name
// with NBD_OPT_GO.
func DialNBD(network, addr, name string) (*NBD, error) {
	nc, err := net.DialTimeout(network, addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	c, err := Handshake(nc, name)
	if err != nil {
		nc.Close()
		return nil, err
	}
	return c, nil
}

// Handshake performs the fixed-newstyle handshake on nc.
func Handshake(nc net.Conn, name string) (*NBD, error) {
	nc.SetDeadline(time.Now().Add(15 * time.Second))
	defer nc.SetDeadline(time.Time{})
	br := bufio.NewReaderSize(nc, 256<<10)
	var g [18]byte
	if _, err := io.ReadFull(br, g[:]); err != nil {
		return nil, fmt.Errorf("nbd greeting: %w", err)
	}
	be := binary.BigEndian
	if be.Uint64(g[:]) != nbdMagic || be.Uint64(g[8:]) != nbdOptMagic {
		return nil, fmt.Errorf("nbd: bad greeting %x", g)
	}
	if be.Uint16(g[16:])&nbdFlagFixed == 0 {
		return nil, errors.New("nbd: server is not fixed newstyle")
	}
	cflags := uint32(nbdFlagFixed)
	if be.Uint16(g[16:])&nbdFlagNoZeroes != 0 {
		cflags |= nbdFlagNoZeroes
	}
	opt := be.AppendUint32(nil, cflags)
	opt = be.AppendUint64(opt, nbdOptMagic)
	opt = be.AppendUint32(opt, nbdOptGo)
	opt = be.AppendUint32(opt, uint32(4+len(name)+2))
	opt = be.AppendUint32(opt, uint32(len(name)))
	opt = append(opt, name...)
	opt = be.AppendUint16(opt, 0)
	if _, err := nc.Write(opt); err != nil {
		return nil, err
	}
	c := &NBD{nc: nc, br: br, pending: map[uint64]*nbdCall{}, done: make(chan struct{}), Timeout: 60 * time.Second}
	for {
		var h [20]byte
		if _, err := io.ReadFull(br, h[:]); err != nil {
			return nil, fmt.Errorf("nbd option reply: %w", err)
		}
		if be.Uint64(h[:]) != nbdRepMagic {
			return nil, fmt.Errorf("nbd: bad option reply magic %x", h[:8])
		}
		typ, n := be.Uint32(h[12:]), be.Uint32(h[16:])
		if n > 64<<10 {
			return nil, fmt.Errorf("nbd: option reply of %d bytes", n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(br, data); err != nil {
			return nil, err
		}
		switch {
		case typ == nbdRepAck:
			if c.Size == 0 && c.Flags == 0 {
				return nil, errors.New("nbd: no NBD_INFO_EXPORT before ACK")
			}
			go c.reader()
			return c, nil
		case typ == nbdRepInfo:
			if len(data) >= 12 && be.Uint16(data) == nbdInfoExport {
				c.Size, c.Flags = be.Uint64(data[2:]), be.Uint16(data[10:])
			}
		case typ&nbdRepErrBit != 0:
			return nil, fmt.Errorf("nbd: export %q refused (reply 0x%x): %s", name, typ, data)
		}
	}
}

func (c *NBD) reader() {
	defer close(c.done)
	var h [16]byte
	be := binary.BigEndian
	for {
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			c.fail(err)
			return
		}
		if be.Uint32(h[:]) != nbdSimpleMagic {
			c.fail(fmt.Errorf("nbd: bad reply magic 0x%x", be.Uint32(h[:])))
			return
		}
		errno, cookie := be.Uint32(h[4:]), be.Uint64(h[8:])
		c.mu.Lock()
		call := c.pending[cookie]
		delete(c.pending, cookie)
		c.mu.Unlock()
		if call == nil {
			c.fail(fmt.Errorf("nbd: reply for unknown cookie %d", cookie))
			return
		}
		call.errno = errno
		if call.typ == CmdRead && errno == 0 {
			if _, err := io.ReadFull(c.br, call.buf[:call.length]); err != nil {
				call.err = err
				close(call.done)
				c.fail(err)
				return
			}
		}
		close(call.done)
	}
}

func (c *NBD) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
	}
	for k, call := range c.pending {
		call.err = err
		close(call.done)
		delete(c.pending, k)
	}
}

// Do sends one request and waits for its reply. For reads, buf receives
// the data (len(buf) must be at least length); for writes it is the
// payload.
func (c *NBD) Do(typ, flags uint16, off uint64, length uint32, buf []byte) error {
	call := &nbdCall{typ: typ, length: length, buf: buf, done: make(chan struct{})}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return err
	}
	c.cookie++
	cookie := c.cookie
	if typ != CmdDisc {
		c.pending[cookie] = call
	}
	c.mu.Unlock()
	be := binary.BigEndian
	var h [28]byte
	be.PutUint32(h[:], nbdReqMagic)
	be.PutUint16(h[4:], flags)
	be.PutUint16(h[6:], typ)
	be.PutUint64(h[8:], cookie)
	be.PutUint64(h[16:], off)
	be.PutUint32(h[24:], length)
	c.wmu.Lock()
	c.nc.SetWriteDeadline(time.Now().Add(c.Timeout))
	_, err := c.nc.Write(h[:])
	if err == nil && typ == CmdWrite {
		_, err = c.nc.Write(buf[:length])
	}
	c.wmu.Unlock()
	if err != nil {
		c.fail(err)
		return err
	}
	if typ == CmdDisc {
		return nil
	}
	t := time.NewTimer(c.Timeout)
	defer t.Stop()
	select {
	case <-call.done:
	case <-t.C:
		return fmt.Errorf("%w (command %d at %d+%d)", ErrNBDTimeout, typ, off, length)
	}
	if call.err != nil {
		return call.err
	}
	if call.errno != 0 {
		return NBDError(call.errno)
	}
	return nil
}

// ReadAt reads len(p) bytes at off.
func (c *NBD) ReadAt(p []byte, off uint64) error {
	return c.Do(CmdRead, 0, off, uint32(len(p)), p)
}

// Read reads n bytes at off.
func (c *NBD) Read(off uint64, n uint32) ([]byte, error) {
	p := make([]byte, n)
	return p, c.ReadAt(p, off)
}

// WriteAt writes p at off, with FUA if fua.
func (c *NBD) WriteAt(p []byte, off uint64, fua bool) error {
	var f uint16
	if fua {
		f = FlagFUA
	}
	return c.Do(CmdWrite, f, off, uint32(len(p)), p)
}

// Flush sends NBD_CMD_FLUSH.
func (c *NBD) Flush() error { return c.Do(CmdFlush, 0, 0, 0, nil) }

// Trim sends NBD_CMD_TRIM.
func (c *NBD) Trim(off uint64, n uint32) error { return c.Do(CmdTrim, 0, off, n, nil) }

// Zero sends NBD_CMD_WRITE_ZEROES (allowing holes unless noHole).
func (c *NBD) Zero(off uint64, n uint32, noHole bool) error {
	var f uint16
	if noHole {
		f = FlagNoHole
	}
	return c.Do(CmdWriteZeroes, f, off, n, nil)
}

// Close sends NBD_CMD_DISC, waits briefly for the server to hang up and
// closes the connection.
func (c *NBD) Close() error {
	err := c.Do(CmdDisc, 0, 0, 0, nil)
	select {
	case <-c.done:
	case <-time.After(5 * time.Second):
		if err == nil {
			err = errors.New("nbd: server did not close the connection after NBD_CMD_DISC")
		}
	}
	c.nc.Close()
	return err
}

// Abort closes the connection without NBD_CMD_DISC.
func (c *NBD) Abort() {
	c.nc.Close()
	<-c.done
}
