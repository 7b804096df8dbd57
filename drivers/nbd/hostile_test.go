package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"blockd/graph"
)

// fakeServer negotiates like a structured-reply server with
// base:allocation (context id 7) and then answers each request with
// reply(w, cookie, cmd, off, len).
func fakeServer(t *testing.T, size uint64, reply func(w io.Writer, cookie uint64, cmd uint16, off uint64, n uint32)) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "fake.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			nc, err := l.Accept()
			if err != nil {
				return
			}
			go serveFake(nc, size, reply)
		}
	}()
	return sock
}

func optReplyBytes(opt, typ uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, magicRep)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func serveFake(nc net.Conn, size uint64, reply func(w io.Writer, cookie uint64, cmd uint16, off uint64, n uint32)) {
	defer nc.Close()
	br := bufio.NewReader(nc)
	g := binary.BigEndian.AppendUint64(nil, magicNBD)
	g = binary.BigEndian.AppendUint64(g, magicOpts)
	g = binary.BigEndian.AppendUint16(g, flagFixedNewstyle|flagNoZeroes)
	nc.Write(g)
	var b [28]byte
	if _, err := io.ReadFull(br, b[:4]); err != nil {
		return
	}
	for {
		if _, err := io.ReadFull(br, b[:16]); err != nil {
			return
		}
		opt := binary.BigEndian.Uint32(b[8:])
		data := make([]byte, binary.BigEndian.Uint32(b[12:]))
		if _, err := io.ReadFull(br, data); err != nil {
			return
		}
		switch opt {
		case optStructuredReply:
			nc.Write(optReplyBytes(opt, repAck, nil))
		case optSetMetaContext:
			ctx := binary.BigEndian.AppendUint32(nil, 7)
			nc.Write(optReplyBytes(opt, repMetaContext, append(ctx, contextBaseAllocation...)))
			nc.Write(optReplyBytes(opt, repAck, nil))
		case optGo:
			info := binary.BigEndian.AppendUint16(nil, infoExport)
			info = binary.BigEndian.AppendUint64(info, size)
			info = binary.BigEndian.AppendUint16(info, tflagHasFlags|tflagSendFlush)
			nc.Write(optReplyBytes(opt, repInfo, info))
			nc.Write(optReplyBytes(opt, repAck, nil))
			goto transmission
		default:
			nc.Write(optReplyBytes(opt, repErrUnsup, nil))
		}
	}
transmission:
	for {
		if _, err := io.ReadFull(br, b[:]); err != nil {
			return
		}
		cmd := binary.BigEndian.Uint16(b[6:])
		cookie := binary.BigEndian.Uint64(b[8:])
		off := binary.BigEndian.Uint64(b[16:])
		n := binary.BigEndian.Uint32(b[24:])
		switch cmd {
		case cmdDisc:
			return
		case cmdWrite:
			io.CopyN(io.Discard, br, int64(n))
		}
		reply(nc, cookie, cmd, off, n)
	}
}

func chunkHeader(flags, typ uint16, cookie uint64, n uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, magicStructReply)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	return binary.BigEndian.AppendUint32(b, n)
}

func dataChunk(flags uint16, cookie, off uint64, data []byte) []byte {
	b := chunkHeader(flags, replyTypeOffsetData, cookie, uint32(8+len(data)))
	b = binary.BigEndian.AppendUint64(b, off)
	return append(b, data...)
}

// TestHostileReplies: a server that breaks the protocol fails the request
// in flight with EIO, and the node stays failed (QEMU does not reconnect
// after a protocol error) instead of panicking or hanging.
func TestHostileReplies(t *testing.T) {
	for _, tc := range []struct {
		name  string
		reply func(w io.Writer, cookie uint64, cmd uint16, off uint64, n uint32)
	}{
		{"bad magic", func(w io.Writer, cookie uint64, _ uint16, _ uint64, _ uint32) {
			w.Write([]byte("garbage that is no reply at all"))
		}},
		{"unknown cookie", func(w io.Writer, cookie uint64, _ uint16, off uint64, n uint32) {
			w.Write(dataChunk(replyFlagDone, cookie+1<<40, off, make([]byte, n)))
		}},
		{"chunk before the request", func(w io.Writer, cookie uint64, _ uint16, off uint64, n uint32) {
			w.Write(dataChunk(replyFlagDone, cookie, off-1, make([]byte, n)))
		}},
		{"chunk past the request", func(w io.Writer, cookie uint64, _ uint16, off uint64, n uint32) {
			w.Write(dataChunk(replyFlagDone, cookie, off+1, make([]byte, n)))
		}},
		{"hole past the request", func(w io.Writer, cookie uint64, _ uint16, off uint64, n uint32) {
			b := chunkHeader(replyFlagDone, replyTypeOffsetHole, cookie, 12)
			b = binary.BigEndian.AppendUint64(b, off)
			w.Write(binary.BigEndian.AppendUint32(b, n+512))
		}},
		{"short read", func(w io.Writer, cookie uint64, _ uint16, off uint64, n uint32) {
			w.Write(dataChunk(replyFlagDone, cookie, off, make([]byte, n-1)))
		}},
		{"simple reply to a read", func(w io.Writer, cookie uint64, _ uint16, _ uint64, n uint32) {
			b := binary.BigEndian.AppendUint32(nil, magicSimpleReply)
			b = binary.BigEndian.AppendUint32(b, 0)
			b = binary.BigEndian.AppendUint64(b, cookie)
			w.Write(append(b, make([]byte, n)...))
		}},
		{"huge error chunk", func(w io.Writer, cookie uint64, _ uint16, _ uint64, _ uint32) {
			w.Write(chunkHeader(replyFlagDone, replyTypeErrBit|1, cookie, 1<<30))
		}},
		{"error zero", func(w io.Writer, cookie uint64, _ uint16, _ uint64, _ uint32) {
			b := chunkHeader(replyFlagDone, replyTypeErrBit|1, cookie, 6)
			w.Write(append(b, 0, 0, 0, 0, 0, 0))
		}},
		{"unknown chunk type", func(w io.Writer, cookie uint64, _ uint16, _ uint64, _ uint32) {
			w.Write(chunkHeader(replyFlagDone, 77, cookie, 0))
		}},
		{"truncated", func(w io.Writer, cookie uint64, _ uint16, off uint64, n uint32) {
			w.Write(dataChunk(replyFlagDone, cookie, off, make([]byte, n))[:30])
			w.(net.Conn).Close()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock := fakeServer(t, mib, tc.reply)
			opts := unixServer(sock, "")
			opts["reconnect-delay"] = json.Number("1") // a request is not resent for longer
			c, err := tryOpen(opts)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			res := make(chan error, 1)
			go func() { res <- c.ReadAt(context.Background(), make([]byte, 4096), 4096) }()
			select {
			case err := <-res:
				if graph.Errno(err) != syscall.EIO {
					t.Fatalf("read: %v, want EIO", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the read hung")
			}
		})
	}
}

// TestStructuredReplies: data and hole chunks in any order assemble into
// the caller's buffer; an error chunk is the request's errno.
func TestStructuredReplies(t *testing.T) {
	sock := fakeServer(t, mib, func(w io.Writer, cookie uint64, cmd uint16, off uint64, n uint32) {
		switch cmd {
		case cmdRead:
			half := n / 2
			w.Write(dataChunk(0, cookie, off+uint64(half), pattern(int(n-half), 9)))
			b := chunkHeader(replyFlagDone, replyTypeOffsetHole, cookie, 12)
			b = binary.BigEndian.AppendUint64(b, off)
			w.Write(binary.BigEndian.AppendUint32(b, half))
		case cmdBlockStatus:
			b := chunkHeader(replyFlagDone, replyTypeBlockStatus, cookie, 4+3*8)
			b = binary.BigEndian.AppendUint32(b, 7)
			for _, e := range [][2]uint32{{4096, stateHole | stateZero}, {8192, 0}, {1 << 30, stateZero}} {
				b = binary.BigEndian.AppendUint32(b, e[0])
				b = binary.BigEndian.AppendUint32(b, e[1])
			}
			w.Write(b)
		case cmdFlush:
			msg := "disk on fire"
			b := chunkHeader(replyFlagDone, replyTypeErrBit|1, cookie, uint32(6+len(msg)))
			b = binary.BigEndian.AppendUint32(b, 28)
			b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
			w.Write(append(b, msg...))
		}
	})
	c := openNBD(t, unixServer(sock, ""))
	defer c.Close()
	ctx := context.Background()
	p := make([]byte, 8192)
	for i := range p {
		p[i] = 0xff
	}
	if err := c.ReadAt(ctx, p, 4096); err != nil {
		t.Fatal(err)
	}
	want := append(make([]byte, 4096), pattern(4096, 9)...)
	if string(p) != string(want) {
		t.Fatal("chunks were not assembled into the buffer")
	}
	ext, err := c.BlockStatus(ctx, 0, 65536)
	if err != nil {
		t.Fatal(err)
	}
	wantExt := []graph.Extent{{Length: 4096, Flags: graph.ExtentHole | graph.ExtentZero}, {Length: 8192}, {Length: 65536 - 12288, Flags: graph.ExtentZero | graph.ExtentData}}
	if len(ext) != 3 || ext[0] != wantExt[0] || ext[1] != wantExt[1] || ext[2] != wantExt[2] {
		t.Fatalf("extents %+v, want %+v (clamped to the request)", ext, wantExt)
	}
	err = c.Flush(ctx)
	if graph.Errno(err) != syscall.ENOSPC || !errorsIs(err, graph.ErrNoSpace) {
		t.Fatalf("flush: %v, want ENOSPC", err)
	}
	// The connection survives an error reply.
	if err := c.ReadAt(ctx, p, 0); err != nil {
		t.Fatal(err)
	}
}

func errorsIs(err, target error) bool { return errors.Is(err, target) }
