package nbd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"net"
	"testing"
)

// fuzzSlots are the requests in flight while FuzzReplies feeds replies:
// a read, a block status, a write and a flush.
var fuzzSlots = []struct {
	cmd uint16
	off uint64
	n   uint32
}{{cmdRead, 4096, 8192}, {cmdBlockStatus, 0, 1 << 20}, {cmdWrite, 0, 512}, {cmdFlush, 0, 0}}

func fuzzCookie(i int) uint64 { return 1<<32 | uint64(i+1) }

// FuzzReplies feeds arbitrary bytes to the reply reader with four
// requests in flight: it must never panic, write outside a request's
// buffer or leave a request without an answer.
func FuzzReplies(f *testing.F) {
	var seed []byte
	seed = append(seed, dataChunk(0, fuzzCookie(0), 4096, pattern(4096, 1))...)
	hole := chunkHeader(replyFlagDone, replyTypeOffsetHole, fuzzCookie(0), 12)
	hole = binary.BigEndian.AppendUint64(hole, 8192)
	seed = append(seed, binary.BigEndian.AppendUint32(hole, 4096)...)
	bs := chunkHeader(replyFlagDone, replyTypeBlockStatus, fuzzCookie(1), 12)
	bs = binary.BigEndian.AppendUint32(bs, 0)
	bs = binary.BigEndian.AppendUint32(bs, 65536)
	seed = append(seed, binary.BigEndian.AppendUint32(bs, stateHole)...)
	simple := binary.BigEndian.AppendUint32(nil, magicSimpleReply)
	simple = binary.BigEndian.AppendUint32(simple, 0)
	seed = append(seed, binary.BigEndian.AppendUint64(simple, fuzzCookie(2))...)
	e := chunkHeader(replyFlagDone, replyTypeErrBit|1, fuzzCookie(3), 8)
	e = binary.BigEndian.AppendUint32(e, 5)
	seed = append(seed, append(binary.BigEndian.AppendUint16(e, 2), "no"...)...)
	f.Add(seed)
	f.Add(seed[:37])
	f.Add(dataChunk(replyFlagDone, fuzzCookie(0), 4095, make([]byte, 8192)))
	f.Fuzz(fuzzReplies)
}

func fuzzReplies(t *testing.T, data []byte) {
	a := &bytesConn{r: bytes.NewReader(data)}
	c := newConn(a, bufio.NewReader(a), exportInfo{structured: true, baseAlloc: true}, nil)
	bufs := make([][]byte, len(fuzzSlots))
	for i, fs := range fuzzSlots {
		<-c.free
		s := &c.slots[i]
		s.cookie, s.cmd, s.off, s.n = fuzzCookie(i), fs.cmd, fs.off, fs.n
		if fs.cmd == cmdRead {
			// Guard bytes on both sides of the buffer.
			bufs[i] = make([]byte, fs.n+2)
			s.buf = bufs[i][1 : 1+fs.n]
		}
	}
	c.readLoop()
	for i, fs := range fuzzSlots {
		s := &c.slots[i]
		select {
		case <-s.done:
		default:
			t.Fatalf("request %d left without an answer", i)
		}
		if s.err == nil && fs.cmd == cmdRead && s.got != int64(fs.n) {
			t.Fatalf("read completed with %d of %d bytes", s.got, fs.n)
		}
		if s.err == nil && fs.cmd == cmdBlockStatus {
			var total int64
			for _, e := range s.ext {
				if e.Length <= 0 {
					t.Fatalf("extent of length %d", e.Length)
				}
				total += e.Length
			}
			if total == 0 || total > int64(fs.n) {
				t.Fatalf("extents cover %d bytes of a request of %d", total, fs.n)
			}
		}
		if bufs[i] != nil && (bufs[i][0] != 0 || bufs[i][len(bufs[i])-1] != 0) {
			t.Fatal("a reply was written outside the request's buffer")
		}
	}
}

// bytesConn is a net.Conn that reads a fixed input and discards writes.
type bytesConn struct {
	net.Conn
	r *bytes.Reader
}

func (c *bytesConn) Read(p []byte) (int, error)  { return c.r.Read(p) }
func (c *bytesConn) Write(p []byte) (int, error) { return len(p), nil }
func (c *bytesConn) Close() error                { return nil }
