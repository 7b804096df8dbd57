package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"blockd/graph"
	"blockd/internal/bufpool"
	"blockd/internal/testutil"
)

// burst sends reads and writes of size bytes on conns connections, depth
// requests in flight on each, rounds×depth in all, and checks every reply.
// Each client sends and reads replies at the same time, as real clients
// do. The server's workers fill buffers faster than the replies go out,
// so without a bound the buffers of all in-flight requests are held at
// once.
func burst(t *testing.T, addr string, m *graph.MemNode, conns, depth, rounds int, size uint64) {
	t.Helper()
	disk := uint64(m.Size())
	var wg sync.WaitGroup
	errs := make(chan error, 2*conns)
	for i := range conns {
		c := connect(t, addr, "d", features{structured: i%2 == 1})
		n := depth * rounds
		// Reads come from the first half, writes go to the second.
		offset := func(k int) uint64 { return uint64(i*depth+k) * size % (disk / 2) }
		isWrite := func(k int) bool { return k%4 == 3 && i%2 == 0 }
		slots := make(chan struct{}, depth)
		wg.Add(2)
		go func() {
			defer wg.Done()
			for k := range n {
				slots <- struct{}{}
				if isWrite(k) {
					c.send(cmdWrite, 0, disk/2+offset(k), size, pattern(int(size), byte(k)))
				} else {
					c.send(cmdRead, 0, offset(k), size, nil)
				}
			}
		}()
		go func() {
			defer wg.Done()
			col := &collector{c: c, partial: map[uint64]*reply{}}
			for range n {
				r, err := col.next()
				if err == nil && r.errno != 0 {
					err = fmt.Errorf("errno %d: %s", r.errno, r.msg)
				}
				k := int(r.cookie - 1) // cookies count from 1
				if off := offset(k); err == nil && !isWrite(k) && !bytes.Equal(r.data, m.Bytes()[off:off+size]) {
					err = fmt.Errorf("read %d: wrong data", r.cookie)
				}
				if err != nil {
					errs <- fmt.Errorf("connection %d: %w", i, err)
					c.nc.Close()
					for range n {
						<-slots // let the sender finish
					}
					return
				}
				<-slots
			}
			c.send(cmdDisc, 0, 0, 0, nil)
			io.Copy(io.Discard, c.r)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestRequestMemoryBounded sends many large requests on several
// connections and checks, with the buffer pool's own count of large
// buffers handed out, that their memory never exceeds the budget; and that
// the pool gives the buffers back once the clients are gone.
func TestRequestMemoryBounded(t *testing.T) {
	const size = 4 * mib
	data := pattern(32*mib, 3)
	for _, tc := range []struct {
		name         string
		server, conn int64
		conns        int
		bound        int64
	}{
		// 4 connections × 16 × 4 MiB: 256 MiB in flight without a bound.
		{"server", 48 * mib, -1, 4, 48 * mib},
		{"connection", -1, 32 * mib, 2, 2 * 32 * mib},
		{"unbounded", -1, -1, 4, -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := graph.NewMemNode(32 * mib)
			copy(m.Bytes(), data)
			s, addr := startServer(t, Options{MaxRequestMemory: tc.server, MaxConnRequestMemory: tc.conn},
				&Export{Name: "d", Node: m})
			if n := bufpool.ReadStats().InUse; n != 0 {
				t.Fatalf("%d bytes of large buffers in use before the test", n)
			}
			bufpool.ResetPeak()
			burst(t, addr, m, tc.conns, DefaultMaxInFlight, 2, size)
			peak := bufpool.ReadStats().Peak
			t.Logf("peak request memory %d MiB", peak/mib)
			if tc.bound < 0 {
				// The workload is heavy enough for the bounds above to
				// matter.
				if peak <= 64*mib {
					t.Fatalf("unbounded peak %d MiB: the workload does not test the bound", peak/mib)
				}
			} else if peak > tc.bound {
				t.Fatalf("%d MiB of request buffers in use at once, budget %d MiB", peak/mib, tc.bound/mib)
			}
			waitFor(t, func() bool { return s.mem.inUse() == 0 && bufpool.ReadStats().InUse == 0 })
		})
	}
	// After the bursts the pool gives its buffers back.
	waitPoolIdle(t)
}

// waitPoolIdle waits until the buffer pool holds no large buffer, handed
// out or idle (it trims every bufpool.IdlePeriod).
func waitPoolIdle(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(3*bufpool.IdlePeriod + 2*time.Second)
	for {
		st := bufpool.ReadStats()
		if st.InUse == 0 && st.Idle == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("buffer pool still holds %d MiB in use, %d MiB idle", st.InUse/mib, st.Idle/mib)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestBudgetWaitSendsInlineReplies: a reader that waits for memory first
// sends the replies it served itself, which its client may be waiting
// for.
func TestBudgetWaitSendsInlineReplies(t *testing.T) {
	g := &gateNode{MemNode: graph.NewMemNode(64 * mib), gate: make(chan struct{}), entered: make(chan struct{}, 1)}
	data := pattern(mib, 4)
	g.MemNode.WriteAt(context.Background(), data, mib, 0)
	s, addr := startServer(t, Options{MaxRequestMemory: maxPayload + mib}, &Export{Name: "g", Node: g})
	// One client holds most of the server budget with a read that stalls.
	a := connect(t, addr, "g", features{})
	stuck := a.send(cmdRead, 0, 0, maxPayload, nil)
	<-g.entered
	waitFor(t, func() bool { return s.mem.inUse() == maxPayload })
	// Another sends a small read (served on its reader) and a large one
	// in one go; the large one waits, the small one is answered.
	b := connect(t, addr, "g", features{structured: true})
	const small, large = 1, 2
	b.pending[small] = pendingReq{typ: cmdRead, off: mib, length: 4096}
	b.pending[large] = pendingReq{typ: cmdRead, off: 2 * mib, length: 2 * mib}
	b.write(append(reqBytes(false, cmdRead, 0, small, mib, 4096, nil), reqBytes(false, cmdRead, 0, large, 2*mib, 2*mib, nil)...))
	bcol := &collector{c: b, partial: map[uint64]*reply{}}
	b.nc.SetReadDeadline(time.Now().Add(2 * time.Second))
	r, err := bcol.next()
	if err != nil || r.cookie != small || !bytes.Equal(r.data, data[:4096]) {
		t.Fatalf("small read behind one waiting for memory: %+v %v", r, err)
	}
	b.nc.SetReadDeadline(time.Time{})
	close(g.gate)
	acol := &collector{c: a, partial: map[uint64]*reply{}}
	if r, err := acol.next(); err != nil || r.errno != 0 || r.cookie != stuck {
		t.Fatalf("stalled read: %+v %v", r, err)
	}
	if r, err := bcol.next(); err != nil || r.errno != 0 || r.cookie != large {
		t.Fatalf("read that waited for memory: %+v %v", r, err)
	}
	a.disc()
	b.disc()
}

// TestBudgetWaitEndsOnDisconnect: a connection waiting for memory is
// released by RemoveExport(hard) and Close, and gives back what it held.
func TestBudgetWaitEndsOnDisconnect(t *testing.T) {
	g := &gateNode{MemNode: graph.NewMemNode(64 * mib), gate: make(chan struct{}), entered: make(chan struct{}, 1)}
	s, addr := startServer(t, Options{MaxRequestMemory: maxPayload}, &Export{Name: "g", Node: g})
	a := connect(t, addr, "g", features{})
	a.send(cmdRead, 0, 0, maxPayload, nil)
	<-g.entered
	b := connect(t, addr, "g", features{})
	b.send(cmdRead, 0, mib, maxPayload, nil)
	time.Sleep(50 * time.Millisecond) // b waits for memory
	done, err := s.RemoveExport("g", true)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("connections not released")
	}
	a.expectEOF()
	b.expectEOF()
	waitFor(t, func() bool { return s.mem.inUse() == 0 })
}

func TestBudget(t *testing.T) {
	b := newBudget(1, 0)
	if b.limit != maxPayload {
		t.Fatalf("limit %d, want it raised to %d", b.limit, maxPayload)
	}
	if !b.tryAcquire(maxPayload) || b.tryAcquire(1) {
		t.Fatal("tryAcquire")
	}
	// Waiters are served in order: a large one is not overtaken by a
	// small one that would fit earlier.
	order := make(chan int64, 2)
	go func() { b.acquire(context.Background(), maxPayload); order <- maxPayload }()
	waitFor(t, func() bool { b.mu.Lock(); defer b.mu.Unlock(); return len(b.waiters) == 1 })
	go func() { b.acquire(context.Background(), 1); order <- 1 }()
	waitFor(t, func() bool { b.mu.Lock(); defer b.mu.Unlock(); return len(b.waiters) == 2 })
	b.release(maxPayload / 2)
	select {
	case n := <-order:
		t.Fatalf("waiter for %d served before the one ahead of it", n)
	case <-time.After(20 * time.Millisecond):
	}
	b.release(maxPayload / 2)
	if n := <-order; n != maxPayload {
		t.Fatalf("served %d first", n)
	}
	b.release(maxPayload)
	if n := <-order; n != 1 {
		t.Fatalf("served %d", n)
	}
	// A cancelled wait leaves nothing behind.
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error)
	go func() { errc <- b.acquire(ctx, maxPayload) }()
	waitFor(t, func() bool { b.mu.Lock(); defer b.mu.Unlock(); return len(b.waiters) == 1 })
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	b.release(1)
	if b.inUse() != 0 || len(b.waiters) != 0 {
		t.Fatalf("used %d, %d waiters", b.inUse(), len(b.waiters))
	}
	if u := newBudget(-1, 0); !u.tryAcquire(1<<40) || u.inUse() != 0 {
		t.Fatal("unlimited budget")
	}
}

// idleSocket connects without sending anything and reads the greeting,
// which shows that the server accepted it.
func idleSocket(t *testing.T, network, addr string) net.Conn {
	t.Helper()
	nc, err := net.Dial(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(nc, make([]byte, greetingSize)); err != nil {
		t.Fatalf("greeting: %v", err)
	}
	nc.SetReadDeadline(time.Time{})
	return nc
}

// closedSoon reports whether the server closes nc within d.
func closedSoon(nc net.Conn, d time.Duration) bool {
	nc.SetReadDeadline(time.Now().Add(d))
	defer nc.SetReadDeadline(time.Time{})
	_, err := nc.Read(make([]byte, 1))
	var ne net.Error
	return err != nil && !(errors.As(err, &ne) && ne.Timeout())
}

// TestIdleHandshakesGiveWayToClients: with max-connections taken by
// sockets that never do their handshake, a real client still gets in at
// once (the oldest idle socket is closed for it), and connections in
// transmission are never closed for this.
func TestIdleHandshakesGiveWayToClients(t *testing.T) {
	e, _ := memExport("disk", mib)
	_, addr := startServer(t, Options{MaxConnections: 3}, e)
	a := connect(t, addr, "disk", features{})
	idle1 := idleSocket(t, "tcp", addr)
	idle2 := idleSocket(t, "tcp", addr)
	// A partial option header does not count as progress.
	idle2.Write([]byte{0, 0, 0, 3, 'I', 'H'})

	for i, idle := range []net.Conn{idle1, idle2} {
		start := time.Now()
		b := connect(t, addr, "disk", features{structured: true})
		if r := b.do(cmdRead, 0, 0, 512, nil); r.errno != 0 {
			t.Fatalf("client %d: errno %d", i, r.errno)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("client %d got in after %v", i, d)
		}
		if !closedSoon(idle, time.Second) {
			t.Fatalf("idle socket %d (the oldest) not closed", i)
		}
	}
	// Now all three are in transmission: a fourth client is refused, and
	// nobody is dropped for it.
	d := newClient(t, rawDial(t, addr))
	d.expectEOF()
	if r := a.do(cmdRead, 0, 0, 512, nil); r.errno != 0 {
		t.Fatal("client in transmission broken")
	}
	a.disc()
}

// TestIdleHandshakesGiveWayToNbdinfo: the same with nbdinfo over a unix
// socket, every slot taken by a silent socket.
func TestIdleHandshakesGiveWayToNbdinfo(t *testing.T) {
	testutil.NeedTool(t, "nbdinfo")
	e, _ := memExport("disk", mib)
	_, sock := peerServer(t, Options{MaxConnections: 2}, e)
	idle := []net.Conn{idleSocket(t, "unix", sock), idleSocket(t, "unix", sock)}
	start := time.Now()
	out := run(t, "nbdinfo", "--size", uri(sock, "disk"))
	if out != fmt.Sprintln(mib) {
		t.Fatalf("nbdinfo: %q", out)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("nbdinfo took %v", d)
	}
	if !closedSoon(idle[0], time.Second) {
		t.Fatal("the oldest idle socket is still open")
	}
}

// badMagic returns a request header of the connection's kind with magic m.
func badMagic(ext bool, m uint32, cookie uint64) []byte {
	b := reqBytes(ext, cmdRead, 0, cookie, 4096, 512, nil)
	binary.BigEndian.PutUint32(b, m)
	return b
}

// TestBadRequestMagic: a request with a bad magic gets EINVAL for its
// cookie, as from qemu-storage-daemon, and then the connection closes;
// other clients are not affected.
func TestBadRequestMagic(t *testing.T) {
	for _, md := range allModes {
		t.Run(md.name, func(t *testing.T) {
			e, _ := memExport("disk", mib)
			s, addr := startServer(t, Options{}, e)
			good := connect(t, addr, "disk", features{structured: true})
			c := connect(t, addr, "disk", md.f)
			// A request in flight before it is still answered.
			ok := c.send(cmdRead, 0, 0, 4096, nil)
			const cookie = 0x1122334455667788
			c.pending[cookie] = pendingReq{typ: cmdRead, off: 4096, length: 512}
			c.write(badMagic(c.mode >= modeExtended, 0xdeadbeef, cookie))
			col := &collector{c: c, partial: map[uint64]*reply{}}
			for range 2 {
				r, err := col.next()
				switch {
				case err != nil:
					t.Fatal(err)
				case r.cookie == ok:
					if r.errno != 0 {
						t.Fatalf("request before the bad one: errno %d", r.errno)
					}
				case r.cookie != cookie || r.errno != errInval || r.simple != (c.mode < modeStructured):
					t.Fatalf("reply %+v", r)
				case !r.simple && r.msg != "invalid magic (got 0xdeadbeef)":
					t.Fatalf("message %q", r.msg)
				}
			}
			c.expectEOF()
			if r := good.do(cmdRead, 0, 0, 512, nil); r.errno != 0 {
				t.Fatal("other client broken")
			}
			good.disc()
			waitFor(t, func() bool { return s.Clients("disk") == 0 })
		})
	}
}

// TestBadRequestMagicLikeQSD sends the same bytes to qemu-storage-daemon and
// to the server after the same handshake and compares every byte they
// answer before closing.
func TestBadRequestMagicLikeQSD(t *testing.T) {
	qsd := testutil.NeedTool(t, "qemu-storage-daemon")
	dir, err := os.MkdirTemp("", "nbdqsd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	img := filepath.Join(dir, "d.img")
	if err := os.WriteFile(img, make([]byte, mib), 0o600); err != nil {
		t.Fatal(err)
	}
	qsock := filepath.Join(dir, "qsd.sock")
	cmd := exec.Command(qsd, "--blockdev", "driver=file,node-name=f,filename="+img,
		"--nbd-server", "addr.type=unix,addr.path="+qsock,
		"--export", "type=nbd,id=e,node-name=f,name=disk")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitFor(t, func() bool { _, err := os.Stat(qsock); return err == nil })

	e, _ := memExport("disk", mib)
	_, bsock := peerServer(t, Options{}, e)

	answer := func(sock string, f features, req []byte) []byte {
		nc, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		c := newClient(t, nc)
		c.handshake("disk", f)
		c.write(req)
		nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(c.r)
		if err != nil && !isConnReset(err) {
			t.Fatalf("%s: %v after %x", sock, err, b)
		}
		return b
	}
	for _, f := range []features{{}, {structured: true}} {
		for _, m := range []uint32{0xdeadbeef, 1, magicExtRequest} {
			req := badMagic(false, m, 0x0102030405060708)
			want := answer(qsock, f, req)
			got := answer(bsock, f, req)
			if len(want) == 0 || !bytes.Equal(got, want) {
				t.Errorf("structured=%v magic 0x%x: qemu-storage-daemon answers %x, blockd %x", f.structured, m, want, got)
			}
		}
	}
}
