//go:build linux

package attach

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/pmorjan/kmod"
	"golang.org/x/sys/unix"

	"blockd/nbd"
)

// Linux NBD ioctls (include/uapi/linux/nbd.h).
const (
	ioctlSetSock       = 0xab00
	ioctlSetBlksize    = 0xab01
	ioctlDoIt          = 0xab03
	ioctlClearSock     = 0xab04
	ioctlClearQue      = 0xab05
	ioctlSetSizeBlocks = 0xab07
	ioctlDisconnect    = 0xab08
	ioctlSetTimeout    = 0xab09
	ioctlSetFlags      = 0xab0a
)

// Test hooks.
var (
	devDir      = "/dev"
	sysBlockDir = "/sys/block"
)

// Device is an attached /dev/nbdN.
type Device struct {
	// Path is the device node, e.g. /dev/nbd0.
	Path string
	// Size and Flags are what the export announced.
	Size  uint64
	Flags uint16

	f       *os.File   // the device, held open for NBD_DO_IT
	socks   []*os.File // kernel ends of the socket pairs
	conns   []net.Conn // server ends
	done    chan struct{}
	doErr   error // NBD_DO_IT's result, valid after done
	detachM sync.Mutex
}

// Available reports whether the kernel can attach NBD devices, loading the
// nbd module if needed. Its error wraps ErrUnavailable.
func Available() error {
	if _, err := os.Stat(filepath.Join(devDir, "nbd0")); err == nil {
		return nil
	}
	if err := loadModule(); err != nil {
		return fmt.Errorf("%w: /dev/nbd0 is missing and the nbd module cannot be loaded: %v", ErrUnavailable, err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(devDir, "nbd0")); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w: the nbd module is loaded but %s does not exist", ErrUnavailable, filepath.Join(devDir, "nbd0"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func loadModule() error {
	if _, err := os.Stat("/sys/module/nbd"); err == nil {
		return nil // loaded (or built in), yet no device node
	}
	k, err := kmod.New(kmod.SetInitFunc(initModule))
	if err != nil {
		return err
	}
	return k.Load("nbd", "", 0)
}

// initModule loads a module file, handling compressed modules: the kernel
// is asked to decompress (xz, zstd, gzip), then gzip is decompressed here.
func initModule(path, params string, flags int) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	err = unix.FinitModule(int(f.Fd()), params, flags)
	if err == nil || errors.Is(err, unix.EEXIST) {
		return err
	}
	var dec func(io.Reader) ([]byte, error)
	switch {
	case strings.HasSuffix(path, ".gz"):
		dec = func(r io.Reader) ([]byte, error) {
			d, err := gzip.NewReader(r)
			if err != nil {
				return nil, err
			}
			return io.ReadAll(d)
		}
	case strings.HasSuffix(path, ".xz"), strings.HasSuffix(path, ".zst"):
	default:
		return err
	}
	if err2 := unix.FinitModule(int(f.Fd()), params, flags|unix.MODULE_INIT_COMPRESSED_FILE); err2 == nil || errors.Is(err2, unix.EEXIST) {
		return err2
	}
	if dec == nil {
		return fmt.Errorf("%s: the kernel cannot decompress it: %w", path, err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	img, err := dec(f)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return unix.InitModule(img, params)
}

// freeDevice returns the first /dev/nbdN without a connection.
func freeDevice() (string, error) {
	ents, err := os.ReadDir(sysBlockDir)
	if err != nil {
		return "", err
	}
	var ids []int
	for _, e := range ents {
		if n, ok := strings.CutPrefix(e.Name(), "nbd"); ok {
			if id, err := strconv.Atoi(n); err == nil {
				ids = append(ids, id)
			}
		}
	}
	sort.Ints(ids)
	for _, id := range ids {
		if _, err := os.Stat(filepath.Join(sysBlockDir, fmt.Sprintf("nbd%d", id), "pid")); errors.Is(err, os.ErrNotExist) {
			return filepath.Join(devDir, fmt.Sprintf("nbd%d", id)), nil
		}
	}
	return "", errors.New("no free /dev/nbdN device")
}

// Attach connects export to a kernel NBD device. The device stays
// attached until Detach, or until the server drops the connections (for
// instance on RemoveExport(hard) or Close).
func Attach(ctx context.Context, srv *nbd.Server, export string, o Options) (*Device, error) {
	if err := Available(); err != nil {
		return nil, err
	}
	path := o.Device
	if path == "" {
		var err error
		if path, err = freeDevice(); err != nil {
			return nil, err
		}
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	d := &Device{Path: path, f: f, done: make(chan struct{})}
	ok := false
	defer func() {
		if !ok {
			d.closeSockets()
			f.Close()
		}
	}()

	n := max(o.Connections, 1)
	var bs blockSizes
	for i := range n {
		sock, err := d.connect(srv)
		if err != nil {
			return nil, err
		}
		info, err := clientHandshake(ctx, sock, export)
		if err != nil {
			return nil, fmt.Errorf("nbd handshake for %s: %w", export, err)
		}
		if i == 0 {
			d.Size, d.Flags, bs = info.size, info.flags, info.bs
			if d.Flags&flagCanMultiConn == 0 {
				n = 1
			}
		}
		if i+1 >= n {
			break
		}
	}

	fd := int(f.Fd())
	blk := uint64(512)
	if uint64(bs.min) > blk && bs.min <= 4096 {
		blk = uint64(bs.min)
	}
	flags := d.Flags
	if o.ReadOnly {
		flags |= flagReadOnly
	}
	ioctl := func(name string, req uint, v uint64) error {
		if err := unix.IoctlSetInt(fd, req, int(v)); err != nil {
			return fmt.Errorf("%s on %s: %w", name, path, err)
		}
		return nil
	}
	unix.IoctlSetInt(fd, ioctlClearSock, 0)
	if err := ioctl("NBD_SET_BLKSIZE", ioctlSetBlksize, blk); err != nil {
		return nil, err
	}
	if err := ioctl("NBD_SET_SIZE_BLOCKS", ioctlSetSizeBlocks, d.Size/blk); err != nil {
		return nil, err
	}
	if err := ioctl("NBD_SET_FLAGS", ioctlSetFlags, uint64(flags)); err != nil {
		return nil, err
	}
	if o.Timeout > 0 {
		if err := ioctl("NBD_SET_TIMEOUT", ioctlSetTimeout, uint64(o.Timeout/time.Second)); err != nil {
			return nil, err
		}
	}
	for _, s := range d.socks {
		if err := ioctl("NBD_SET_SOCK", ioctlSetSock, uint64(s.Fd())); err != nil {
			return nil, err
		}
	}
	started := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		close(started)
		// Blocks until the device is disconnected.
		err := unix.IoctlSetInt(fd, ioctlDoIt, 0)
		if err != nil && !errors.Is(err, unix.EBUSY) {
			d.doErr = fmt.Errorf("NBD_DO_IT on %s: %w", path, err)
		}
		unix.IoctlSetInt(fd, ioctlClearQue, 0)
		unix.IoctlSetInt(fd, ioctlClearSock, 0)
		d.closeSockets()
		f.Close()
		close(d.done)
	}()
	<-started
	ok = true
	return d, nil
}

// connect creates a socket pair, serves one end and keeps the other.
func (d *Device) connect(srv *nbd.Server) (*os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socketpair: %w", err)
	}
	sf := os.NewFile(uintptr(fds[0]), "nbd-server")
	nc, err := net.FileConn(sf)
	sf.Close()
	if err != nil {
		unix.Close(fds[1])
		return nil, err
	}
	kf := os.NewFile(uintptr(fds[1]), "nbd-kernel")
	d.conns = append(d.conns, nc)
	d.socks = append(d.socks, kf)
	go srv.ServeConn(nc)
	return kf, nil
}

func (d *Device) closeSockets() {
	for _, s := range d.socks {
		s.Close()
	}
	for _, c := range d.conns {
		c.Close()
	}
}

// Detach disconnects the device and waits until the kernel has released
// it.
func (d *Device) Detach() error {
	d.detachM.Lock()
	defer d.detachM.Unlock()
	select {
	case <-d.done:
		return d.doErr
	default:
	}
	f, err := os.OpenFile(d.Path, os.O_RDWR, 0)
	if err == nil {
		unix.IoctlSetInt(int(f.Fd()), ioctlDisconnect, 0)
		f.Close()
	}
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		// The kernel did not let go: drop the sockets.
		d.closeSockets()
		<-d.done
	}
	return d.doErr
}

// Done is closed when the kernel connection has ended.
func (d *Device) Done() <-chan struct{} { return d.done }

// Client side of the handshake.

const (
	magicNBD         = 0x4e42444d41474943
	magicOpts        = 0x49484156454F5054
	magicRep         = 0x3e889045565a9
	optGo            = 7
	repAck           = 1
	repInfo          = 3
	infoExport       = 0
	infoBlockSize    = 3
	flagReadOnly     = 1 << 1
	flagCanMultiConn = 1 << 8
)

type blockSizes struct{ min, pref, max uint32 }

type exportInfo struct {
	size  uint64
	flags uint16
	bs    blockSizes
}

// clientHandshake negotiates NBD_OPT_GO for export on f.
func clientHandshake(ctx context.Context, f *os.File, export string) (exportInfo, error) {
	var info exportInfo
	if dl, ok := ctx.Deadline(); ok {
		f.SetDeadline(dl)
		defer f.SetDeadline(time.Time{})
	}
	be := binary.BigEndian
	g := make([]byte, 18)
	if _, err := io.ReadFull(f, g); err != nil {
		return info, err
	}
	if be.Uint64(g) != magicNBD || be.Uint64(g[8:]) != magicOpts || be.Uint16(g[16:])&1 == 0 {
		return info, errors.New("server does not speak fixed newstyle NBD")
	}
	req := be.AppendUint32(nil, 1|2) // fixed newstyle, no zeroes
	req = be.AppendUint64(req, magicOpts)
	req = be.AppendUint32(req, optGo)
	req = be.AppendUint32(req, uint32(4+len(export)+2+2))
	req = be.AppendUint32(req, uint32(len(export)))
	req = append(req, export...)
	req = be.AppendUint16(req, 1)
	req = be.AppendUint16(req, infoBlockSize)
	if _, err := f.Write(req); err != nil {
		return info, err
	}
	gotExport := false
	for {
		h := make([]byte, 20)
		if _, err := io.ReadFull(f, h); err != nil {
			return info, err
		}
		if be.Uint64(h) != magicRep || be.Uint32(h[8:]) != optGo {
			return info, errors.New("bad option reply")
		}
		typ, n := be.Uint32(h[12:]), be.Uint32(h[16:])
		if n > 64<<10 {
			return info, errors.New("option reply too long")
		}
		p := make([]byte, n)
		if _, err := io.ReadFull(f, p); err != nil {
			return info, err
		}
		switch {
		case typ == repAck:
			if !gotExport {
				return info, errors.New("server sent no NBD_INFO_EXPORT")
			}
			return info, nil
		case typ&(1<<31) != 0:
			return info, fmt.Errorf("server refused: %s", bytes.ToValidUTF8(p, []byte("?")))
		case typ == repInfo && len(p) >= 2:
			switch be.Uint16(p) {
			case infoExport:
				if len(p) == 12 {
					info.size, info.flags = be.Uint64(p[2:]), be.Uint16(p[10:])
					gotExport = true
				}
			case infoBlockSize:
				if len(p) == 14 {
					info.bs = blockSizes{be.Uint32(p[2:]), be.Uint32(p[6:]), be.Uint32(p[10:])}
				}
			}
		}
	}
}
