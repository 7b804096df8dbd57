package nbd

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"blockd/graph"
	"blockd/internal/tlscreds"
	"blockd/internal/tlscreds/tlstest"
)

const mib = 1 << 20

func memExport(name string, size int64) (*Export, *graph.MemNode) {
	m := graph.NewMemNode(size)
	return &Export{Name: name, Node: m}, m
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7+i/251)
	}
	return b
}

// Handshake.

func TestGreetingAndNoZeroes(t *testing.T) {
	e, _ := memExport("disk", mib)
	_, addr := startServer(t, Options{}, e)

	for _, noZeroes := range []bool{false, true} {
		c := newClient(t, rawDial(t, addr))
		cf := uint32(flagCFixedNewstyle)
		if noZeroes {
			cf |= flagCNoZeroes
		}
		if hf := c.greet(cf); hf != flagFixedNewstyle|flagNoZeroes {
			t.Fatalf("handshake flags 0x%x", hf)
		}
		c.sendOpt(optExportName, []byte("disk"))
		n := 134
		if noZeroes {
			n = 10
		}
		b := c.readFull(n)
		if size := binary.BigEndian.Uint64(b); size != mib {
			t.Fatalf("size %d", size)
		}
		fl := binary.BigEndian.Uint16(b[8:])
		want := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendCache | tflagCanMultiConn |
			tflagSendTrim | tflagSendWriteZeroes | tflagSendFastZero)
		if fl != want {
			t.Fatalf("transmission flags 0x%x, want 0x%x", fl, want)
		}
		if !allZero(b[10:]) {
			t.Fatal("reserved bytes not zero")
		}
		c.size = mib
		r := c.do(cmdWrite, 0, 0, 4, []byte("abcd"))
		if !r.simple || r.errno != 0 {
			t.Fatalf("write reply %+v", r)
		}
		if r := c.do(cmdRead, 0, 0, 4, nil); string(r.data) != "abcd" {
			t.Fatalf("read %q", r.data)
		}
		c.disc()
	}
}

func TestNonFixedNewstyle(t *testing.T) {
	e, _ := memExport("disk", mib)
	_, addr := startServer(t, Options{}, e)

	// Only NBD_OPT_EXPORT_NAME is allowed without fixed newstyle.
	c := newClient(t, rawDial(t, addr))
	c.greet(0)
	c.sendOpt(optExportName, []byte("disk"))
	b := c.readFull(134)
	if binary.BigEndian.Uint64(b) != mib {
		t.Fatal("bad size")
	}
	c.disc()

	c = newClient(t, rawDial(t, addr))
	c.greet(0)
	c.sendOpt(optList, nil)
	c.expectEOF()
}

func TestHandshakeViolations(t *testing.T) {
	e, _ := memExport("disk", mib)
	_, addr := startServer(t, Options{}, e)

	cases := map[string]func(c *tclient){
		"unknown client flags": func(c *tclient) { c.greet(flagCFixedNewstyle | 1<<5) },
		"bad option magic": func(c *tclient) {
			c.greet(flagCFixedNewstyle)
			c.write(make([]byte, 16))
		},
		"option longer than 32 MiB": func(c *tclient) {
			c.greet(flagCFixedNewstyle)
			b := binary.BigEndian.AppendUint64(nil, magicOpts)
			b = binary.BigEndian.AppendUint32(b, optInfo)
			b = binary.BigEndian.AppendUint32(b, maxPayload+1)
			c.write(b)
		},
		"unknown export name": func(c *tclient) {
			c.greet(flagCFixedNewstyle)
			c.sendOpt(optExportName, []byte("nope"))
		},
		"export name too long": func(c *tclient) {
			c.greet(flagCFixedNewstyle)
			c.sendOpt(optExportName, bytes.Repeat([]byte("x"), 5000))
		},
		"export name after extended headers": func(c *tclient) {
			c.greet(flagCFixedNewstyle)
			c.expectFinal(c.option(optExtendedHeaders, nil), repAck)
			c.sendOpt(optExportName, []byte("disk"))
		},
		"abort": func(c *tclient) {
			c.greet(flagCFixedNewstyle)
			c.expectFinal(c.option(optAbort, nil), repAck)
		},
		"truncated option": func(c *tclient) {
			c.greet(flagCFixedNewstyle)
			b := binary.BigEndian.AppendUint64(nil, magicOpts)
			b = binary.BigEndian.AppendUint32(b, optGo)
			b = binary.BigEndian.AppendUint32(b, 100)
			c.write(append(b, 1, 2, 3))
			c.nc.(*net.TCPConn).CloseWrite()
		},
		"oldstyle client": func(c *tclient) {
			// An oldstyle client reads 152 bytes of greeting; it gets the
			// newstyle greeting and hangs up.
			c.readFull(greetingSize)
			c.nc.Close()
		},
	}
	for name, f := range cases {
		t.Run(name, func(t *testing.T) {
			c := newClient(t, rawDial(t, addr))
			c.t = t
			f(c)
			if name != "oldstyle client" {
				c.expectEOF()
			}
			// The server keeps serving.
			connect(t, addr, "disk", features{}).disc()
		})
	}
}

func TestOptions(t *testing.T) {
	e1 := &Export{Name: "disk", Description: "the disk", Node: graph.NewMemNode(mib)}
	e2 := &Export{Name: "", Node: graph.NewMemNode(2 * mib), ReadOnly: true}
	_, addr := startServer(t, Options{}, e1, e2)
	c := newClient(t, rawDial(t, addr))
	c.greet(flagCFixedNewstyle)

	// NBD_OPT_LIST, in AddExport order, with descriptions.
	rs := c.option(optList, nil)
	c.expectFinal(rs, repAck)
	if len(rs) != 3 {
		t.Fatalf("LIST replies %+v", rs)
	}
	for i, want := range []struct{ name, desc string }{{"disk", "the disk"}, {"", ""}} {
		d := rs[i].data
		nl := binary.BigEndian.Uint32(d)
		if rs[i].typ != repServer || string(d[4:4+nl]) != want.name || string(d[4+nl:]) != want.desc {
			t.Fatalf("LIST entry %d: %+v", i, rs[i])
		}
	}
	c.expectFinal(c.option(optList, []byte{1}), repErrInvalid)

	// Unknown options are refused and skipped.
	rs = c.option(99, bytes.Repeat([]byte{7}, 1000))
	c.expectFinal(rs, repErrUnsup)
	if !strings.Contains(string(rs[0].data), "Unsupported option 99") {
		t.Fatalf("message %q", rs[0].data)
	}
	c.expectFinal(c.option(optPeekExport, nil), repErrUnsup)

	// STARTTLS without TLS configured; with data.
	c.expectFinal(c.option(optStartTLS, nil), repErrPolicy)
	c.expectFinal(c.option(optStartTLS, []byte{0}), repErrInvalid)

	// NBD_OPT_INFO with every info, on the named and the default export.
	rs = c.option(optInfo, infoPayload("disk", infoName, infoDescription, infoBlockSize, 77))
	c.expectFinal(rs, repAck)
	in := infos(rs)
	if string(in[infoName]) != "disk" || string(in[infoDescription]) != "the disk" {
		t.Fatalf("infos %v", in)
	}
	if bs := in[infoBlockSize]; len(bs) != 12 || binary.BigEndian.Uint32(bs) != 1 ||
		binary.BigEndian.Uint32(bs[4:]) != 4096 || binary.BigEndian.Uint32(bs[8:]) != 32*mib {
		t.Fatalf("block sizes %x", bs)
	}
	rs = c.option(optInfo, infoPayload(""))
	c.expectFinal(rs, repAck)
	ex := infos(rs)[infoExport]
	if binary.BigEndian.Uint64(ex) != 2*mib || binary.BigEndian.Uint16(ex[8:])&tflagReadOnly == 0 ||
		binary.BigEndian.Uint16(ex[8:])&(tflagSendTrim|tflagSendWriteZeroes) != 0 {
		t.Fatalf("read-only export info %x", ex)
	}
	if _, ok := infos(rs)[infoDescription]; ok {
		t.Fatal("description sent for an export without one")
	}

	// Unknown export.
	rs = c.option(optInfo, infoPayload("nope"))
	c.expectFinal(rs, repErrUnknown)
	if string(rs[0].data) != "export 'nope' not present" {
		t.Fatalf("message %q", rs[0].data)
	}
	c.expectFinal(c.option(optGo, infoPayload(strings.Repeat("n", 200))), repErrUnknown)

	// Malformed NBD_OPT_INFO/GO payloads.
	bad := [][]byte{
		{0, 0},                           // short name length
		{0, 0, 0, 9, 'd'},                // name beyond payload
		{0, 0, 0, 4, 'd', 'i', 's', 'k'}, // no request count
		append(infoPayload("disk"), 0),   // trailing byte
		infoPayload("disk", 1)[:11],      // truncated request list
		infoPayload("di\x00k"),           // embedded NUL
		binary.BigEndian.AppendUint32(nil, 5000),
	}
	for _, b := range bad {
		c.expectFinal(c.option(optGo, b), repErrInvalid)
	}
	c.expectFinal(c.option(optInfo, make([]byte, maxInfoOpt+1)), repErrInvalid)

	// Structured replies / extended headers negotiation rules.
	c.expectFinal(c.option(optStructuredReply, []byte{1}), repErrInvalid)
	c.expectFinal(c.option(optStructuredReply, nil), repAck)
	c.expectFinal(c.option(optStructuredReply, nil), repErrInvalid)
	c.expectFinal(c.option(optExtendedHeaders, []byte{1}), repErrInvalid)
	c.expectFinal(c.option(optExtendedHeaders, nil), repAck)
	c.expectFinal(c.option(optExtendedHeaders, nil), repErrInvalid)
	c.expectFinal(c.option(optStructuredReply, nil), repErrExtHeaderReqd)

	// Still able to enter transmission.
	c.mode = modeExtended
	c.expectFinal(c.goExport("disk"), repAck)
	if c.flags&tflagSendDF == 0 {
		t.Fatal("DF not advertised with extended headers")
	}
	c.disc()
}

func TestMetaContextOptions(t *testing.T) {
	e, _ := memExport("disk", mib)
	_, addr := startServer(t, Options{}, e)
	c := newClient(t, rawDial(t, addr))
	c.greet(flagCFixedNewstyle)

	ctxs := func(rs []optReply) []string {
		var s []string
		for _, r := range rs {
			if r.typ == repMetaContext {
				s = append(s, fmt.Sprintf("%d:%s", binary.BigEndian.Uint32(r.data), r.data[4:]))
			}
		}
		return s
	}
	// SET before structured replies.
	c.expectFinal(c.option(optSetMetaContext, metaPayload("disk", "base:allocation")), repErrInvalid)
	// LIST is allowed; zero queries list everything, "base:" is a wildcard.
	for _, q := range [][]string{nil, {"base:"}, {"base:allocation"}, {"qemu:", "base:allocation"}} {
		rs := c.option(optListMetaContext, metaPayload("disk", q...))
		c.expectFinal(rs, repAck)
		if got := ctxs(rs); len(got) != 1 || got[0] != "0:base:allocation" {
			t.Fatalf("LIST %q: %v", q, got)
		}
	}
	rs := c.option(optListMetaContext, metaPayload("disk", "x-foo:bar", "base:nothing", strings.Repeat("q", 5000)))
	c.expectFinal(rs, repAck)
	if len(rs) != 1 {
		t.Fatalf("unexpected contexts %+v", rs)
	}
	c.expectFinal(c.option(optListMetaContext, metaPayload("nope")), repErrUnknown)
	c.expectFinal(c.option(optListMetaContext, metaPayload("disk", "base:allocation")[:12]), repErrInvalid)
	c.expectFinal(c.option(optListMetaContext, append(metaPayload("disk"), 9)), repErrInvalid)
	c.expectFinal(c.option(optListMetaContext, make([]byte, maxOptBuffered+1)), repErrTooBig)

	c.expectFinal(c.option(optStructuredReply, nil), repAck)
	c.mode = modeStructured
	// SET "base:" selects nothing.
	if rs := c.option(optSetMetaContext, metaPayload("disk", "base:")); len(rs) != 1 {
		t.Fatalf("SET base: %+v", rs)
	}
	rs = c.option(optSetMetaContext, metaPayload("disk", "base:allocation"))
	c.expectFinal(rs, repAck)
	if got := ctxs(rs); len(got) != 1 || got[0] != "0:base:allocation" {
		t.Fatalf("SET: %v", got)
	}
	c.expectFinal(c.goExport("disk"), repAck)
	r := c.do(cmdBlockStatus, 0, 0, 4096, nil)
	if r.errno != 0 {
		t.Fatalf("block status errno %d %q", r.errno, r.msg)
	}
	c.disc()

	// A later SET for another export, or a failed SET, drops the selection.
	e2, _ := memExport("other", mib)
	s2, addr2 := startServer(t, Options{}, e2)
	_ = s2
	c = newClient(t, rawDial(t, addr2))
	c.greet(flagCFixedNewstyle)
	c.expectFinal(c.option(optStructuredReply, nil), repAck)
	c.mode = modeStructured
	c.expectFinal(c.option(optSetMetaContext, metaPayload("other", "base:allocation")), repAck)
	c.expectFinal(c.option(optSetMetaContext, metaPayload("nope", "base:allocation")), repErrUnknown)
	c.expectFinal(c.goExport("other"), repAck)
	if r := c.do(cmdBlockStatus, 0, 0, 4096, nil); r.errno != errInval {
		t.Fatalf("block status without contexts: errno %d", r.errno)
	}
	c.disc()
}

func TestBlockSizeConstraints(t *testing.T) {
	m := graph.NewMemNode(mib)
	e := &Export{Name: "disk", Node: limitNode{m, graph.Limits{Align: 4096, MaxTransfer: 256 << 10}}}
	_, addr := startServer(t, Options{}, e)

	c := newClient(t, rawDial(t, addr))
	c.greet(flagCFixedNewstyle)
	// INFO without NBD_INFO_BLOCK_SIZE: the export needs alignment.
	rs := c.option(optInfo, infoPayload("disk"))
	c.expectFinal(rs, repErrBlockSizeReqd)
	if bs := infos(rs)[infoBlockSize]; binary.BigEndian.Uint32(bs) != 4096 || binary.BigEndian.Uint32(bs[8:]) != 256<<10 {
		t.Fatalf("block sizes %x", bs)
	}
	// GO without it is tolerated and advertises 1; requests pass through.
	rs = c.goExport("disk")
	c.expectFinal(rs, repAck)
	if bs := infos(rs)[infoBlockSize]; binary.BigEndian.Uint32(bs) != 1 {
		t.Fatalf("block sizes %x", bs)
	}
	if r := c.do(cmdWrite, 0, 1, 3, []byte("abc")); r.errno != 0 {
		t.Fatalf("unaligned write errno %d", r.errno)
	}
	c.disc()

	// A client that promised alignment gets EINVAL for unaligned requests.
	c = connect(t, addr, "disk", features{structured: true, blockSize: true})
	if r := c.do(cmdRead, 0, 512, 4096, nil); r.errno != errInval {
		t.Fatalf("misaligned read errno %d", r.errno)
	}
	if r := c.do(cmdRead, 0, 4096, 4096, nil); r.errno != 0 || string(r.data[:0]) != "" {
		t.Fatalf("aligned read errno %d", r.errno)
	}
	if r := c.do(cmdRead, 0, 0, 4096, nil); string(r.data[1:4]) != "abc" {
		t.Fatalf("read back %q", r.data[:4])
	}
	c.disc()

	// Bad explicit constraints are refused by AddExport.
	s := NewServer(Options{})
	for _, bad := range []Export{
		{Name: "a", Node: m, MinBlock: 3},
		{Name: "b", Node: m, MinBlock: 128 << 10},
		{Name: "c", Node: m, PrefBlock: 256},
		{Name: "d", Node: m, MinBlock: 4096, MaxBlock: 4097},
	} {
		if err := s.AddExport(&bad); err == nil {
			t.Errorf("AddExport(%+v) succeeded", bad)
		}
	}
	if err := s.AddExport(&Export{Name: "x", Node: m}); err != nil {
		t.Fatal(err)
	}
	if err := s.AddExport(&Export{Name: "x", Node: m}); err == nil || err.Error() != "NBD server already has export named 'x'" {
		t.Fatalf("duplicate: %v", err)
	}
	if err := s.AddExport(&Export{Name: strings.Repeat("n", 4097), Node: m}); err == nil {
		t.Fatal("long name accepted")
	}
}

// Transmission.

var allModes = []struct {
	name string
	f    features
}{
	{"simple", features{}},
	{"structured", features{structured: true, meta: true}},
	{"extended", features{extended: true, meta: true}},
}

func TestCommands(t *testing.T) {
	for _, m := range allModes {
		t.Run(m.name, func(t *testing.T) {
			e, mem := memExport("disk", 4*mib)
			_, addr := startServer(t, Options{}, e)
			c := connect(t, addr, "disk", m.f)
			ok := func(r *reply) {
				t.Helper()
				if r.errno != 0 {
					t.Fatalf("errno %d %q", r.errno, r.msg)
				}
				if c.mode >= modeExtended && r.simple {
					t.Fatal("simple reply with extended headers")
				}
			}
			data := pattern(256<<10, 3)
			ok(c.do(cmdWrite, 0, 4096, uint64(len(data)), data))
			ok(c.do(cmdWrite, cmdFlagFUA, mib, 512, data[:512]))
			r := c.do(cmdRead, 0, 4096, uint64(len(data)), nil)
			ok(r)
			if !bytes.Equal(r.data, data) {
				t.Fatal("read back differs")
			}
			if c.mode >= modeStructured && (r.simple || len(r.chunks) != 1 || r.chunks[0].typ != replyTypeOffsetData) {
				t.Fatalf("structured read chunks %+v", r.chunks)
			}
			if c.mode >= modeExtended && r.chunks[0].off != 4096 {
				t.Fatalf("extended header offset %d", r.chunks[0].off)
			}
			ok(c.do(cmdRead, cmdFlagFUA, 0, 512, nil))
			ok(c.do(cmdFlush, 0, 0, 0, nil))
			ok(c.do(cmdCache, 0, 0, mib, nil))

			// Zero with and without NO_HOLE / FAST_ZERO, trim.
			ok(c.do(cmdWriteZeroes, 0, 4096, 4096, nil))
			ok(c.do(cmdWriteZeroes, cmdFlagNoHole|cmdFlagFUA, 8192, 4096, nil))
			ok(c.do(cmdWriteZeroes, cmdFlagFastZero, 12288, 4096, nil))
			if !allZero(mem.Bytes()[4096:16384]) || mem.Bytes()[16384] != data[16384-4096] {
				t.Fatal("zeroes not written, or too many")
			}
			ok(c.do(cmdTrim, 0, 16384, 4096, nil))
			ok(c.do(cmdTrim, cmdFlagFUA, 20480, 4096, nil))

			// Zero-length read.
			r = c.do(cmdRead, 0, 0, 0, nil)
			ok(r)
			if len(r.data) != 0 {
				t.Fatal("data for zero-length read")
			}
			if c.mode >= modeStructured {
				// DF: exactly one content chunk.
				r = c.do(cmdRead, cmdFlagDF, 0, 64<<10, nil)
				ok(r)
				if len(r.chunks) != 1 {
					t.Fatalf("DF read in %d chunks", len(r.chunks))
				}
				// Block status on a node without BlockStatuser: all data.
				r = c.do(cmdBlockStatus, 0, 0, 4*mib, nil)
				ok(r)
				id, es := r.extents(t)
				if id != metaIDBaseAllocation || len(es) != 1 || es[0].Length != 4*mib || es[0].Flags != 0 {
					t.Fatalf("extents %d %+v", id, es)
				}
			}
			// Read at the very end.
			ok(c.do(cmdRead, 0, 4*mib-1, 1, nil))
			c.disc()
		})
	}
}

func TestRequestErrors(t *testing.T) {
	for _, m := range allModes {
		t.Run(m.name, func(t *testing.T) {
			e, mem := memExport("rw", 1*mib)
			ro := &Export{Name: "ro", Node: graph.NewMemNode(mib), ReadOnly: true}
			_, addr := startServer(t, Options{}, e, ro)
			c := connect(t, addr, "rw", m.f)
			expect := func(errno uint32, r *reply) {
				t.Helper()
				if r.errno != errno {
					t.Fatalf("errno %d (%q), want %d", r.errno, r.msg, errno)
				}
				if errno != 0 && c.mode >= modeStructured && (r.simple || r.msg == "") {
					t.Fatalf("structured error expected, got %+v", r)
				}
			}
			expect(errInval, c.do(cmdRead, 0, mib, 1, nil))
			expect(errInval, c.do(cmdRead, 0, 1<<62, 4096, nil))
			expect(errNoSpc, c.do(cmdWrite, 0, mib-2, 4, []byte("abcd")))
			expect(errNoSpc, c.do(cmdWriteZeroes, 0, mib, 4096, nil))
			expect(errInval, c.do(cmdTrim, 0, mib-512, 1024, nil))
			expect(errInval, c.do(cmdCache, 0, mib, 512, nil))
			expect(errInval, c.do(cmdRead, 0, 0, maxPayload+1, nil))
			expect(errInval, c.do(cmdCache, 0, 0, maxPayload+1, nil))
			expect(errInval, c.do(42, 0, 0, 0, nil))
			expect(errInval, c.do(cmdFlush, cmdFlagNoHole, 0, 0, nil))
			expect(errInval, c.do(cmdWrite, cmdFlagDF, 0, 1, []byte{1}))
			expect(errInval, c.do(cmdTrim, cmdFlagFastZero, 0, 512, nil))
			if c.mode == modeSimple {
				expect(errInval, c.do(cmdRead, cmdFlagDF, 0, 512, nil))
				expect(errInval, c.do(cmdBlockStatus, 0, 0, 512, nil))
			} else {
				expect(errInval, c.do(cmdBlockStatus, 0, 0, 0, nil))
				expect(errInval, c.do(cmdBlockStatus, 0, 0, mib+1, nil))
			}
			if c.mode == modeExtended {
				// A payload on a command without one is consumed and refused.
				expect(errInval, c.do(cmdFlush, cmdFlagPayloadLen, 0, 16, make([]byte, 16)))
				expect(errInval, c.do(cmdBlockStatus, cmdFlagPayloadLen, 0, 12, make([]byte, 12)))
			}
			// The connection is still in sync.
			expect(0, c.do(cmdWrite, 0, 0, 4, []byte("wxyz")))
			if string(mem.Bytes()[:4]) != "wxyz" || !allZero(mem.Bytes()[mib-4:]) {
				t.Fatal("data wrong after errors")
			}
			c.disc()

			c = connect(t, addr, "ro", m.f)
			if c.flags&tflagReadOnly == 0 {
				t.Fatal("read-only flag missing")
			}
			expect(errPerm, c.do(cmdWrite, 0, 0, 4, []byte("abcd")))
			expect(errPerm, c.do(cmdTrim, 0, 0, 4096, nil))
			expect(errPerm, c.do(cmdWriteZeroes, 0, 0, 4096, nil))
			expect(0, c.do(cmdRead, 0, 0, 4096, nil))
			expect(0, c.do(cmdFlush, 0, 0, 0, nil))
			c.disc()
		})
	}
}

func TestOversizedWriteDisconnects(t *testing.T) {
	for _, m := range allModes {
		t.Run(m.name, func(t *testing.T) {
			e, mem := memExport("disk", mib)
			_, addr := startServer(t, Options{}, e)
			c := connect(t, addr, "disk", m.f)
			flags := uint16(0)
			if c.mode == modeExtended {
				flags = cmdFlagPayloadLen
			}
			c.send(cmdWrite, flags, 0, 64*mib, nil)
			c.write(bytes.Repeat([]byte{0xee}, 4096))
			col := &collector{c: c, partial: map[uint64]*reply{}}
			r, err := col.next()
			if err != nil || r.errno != errInval {
				t.Fatalf("reply %+v, %v", r, err)
			}
			c.expectEOF()
			if !allZero(mem.Bytes()) {
				t.Fatal("payload written")
			}
			connect(t, addr, "disk", m.f).disc()
		})
	}
}

func TestNodeErrors(t *testing.T) {
	for _, m := range allModes {
		t.Run(m.name, func(t *testing.T) {
			for _, tc := range []struct {
				err   error
				errno uint32
			}{
				{graph.ErrNoSpace, errNoSpc},
				{&graph.OpError{Op: "write", Err: syscall.EIO}, errIO},
				{graph.ErrReadOnly, errPerm},
				{fmt.Errorf("wrapped: %w", syscall.EDQUOT), errNoSpc},
				{errors.New("mystery"), errIO},
			} {
				f := &faultNode{MemNode: graph.NewMemNode(mib), failAt: 8192, failErr: tc.err}
				_, addr := startServer(t, Options{}, &Export{Name: "f", Node: f})
				c := connect(t, addr, "f", m.f)
				if r := c.do(cmdRead, 0, 0, 16384, nil); r.errno != tc.errno || len(r.data) != 16384 && r.simple && r.data != nil {
					t.Fatalf("%v: read errno %d", tc.err, r.errno)
				}
				if r := c.do(cmdWrite, 0, 8192, 4, []byte("abcd")); r.errno != tc.errno {
					t.Fatalf("%v: write errno %d", tc.err, r.errno)
				}
				// Still in sync, and the rest works.
				if r := c.do(cmdRead, 0, 0, 4096, nil); r.errno != 0 {
					t.Fatalf("read errno %d", r.errno)
				}
				c.disc()
			}
		})
	}
}

// validating serves n through a graph edge, as the daemon does: the
// graph aligns and splits requests to n's limits.
func validating(t *testing.T, n graph.Node) graph.Node {
	t.Helper()
	type noOptions struct{}
	g := graph.New(nil, &graph.Driver{Name: "given", Protocol: true,
		Options: func() any { return new(noOptions) },
		Open:    func(context.Context, *graph.Opener, any) (graph.Node, error) { return n, nil }})
	t.Cleanup(g.Close)
	if _, err := g.Add(context.Background(), map[string]any{"driver": "given", "node-name": "n"}, false); err != nil {
		t.Fatal(err)
	}
	c, err := g.NewBackend("n", "nbd", graph.PermRead|graph.PermWrite, graph.PermAll)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestMaxTransferSplitting: the export advertises the node's maximum
// transfer and larger requests reach the node in pieces (split by the
// graph, not by the server).
func TestMaxTransferSplitting(t *testing.T) {
	f := &faultNode{MemNode: graph.NewMemNode(4 * mib)}
	_, addr := startServer(t, Options{}, &Export{Name: "f", Node: validating(t, f)})
	c := connect(t, addr, "f", features{structured: true})
	if bs := c.goInfo(t, addr); bs != 64<<10 {
		t.Fatalf("advertised max %d", bs)
	}
	data := pattern(mib, 9)
	if r := c.do(cmdWrite, 0, 0, mib, data); r.errno != 0 {
		t.Fatal(r.errno)
	}
	if r := c.do(cmdRead, 0, 0, mib, nil); !bytes.Equal(r.data, data) {
		t.Fatal("data differs")
	}
	if r := c.do(cmdWriteZeroes, 0, 0, 2*mib, nil); r.errno != 0 {
		t.Fatal(r.errno)
	}
	if f.maxSeen > 64<<10 {
		t.Fatalf("node saw a %d byte request", f.maxSeen)
	}
	c.disc()
}

// goInfo returns the maximum block size advertised for export "f".
func (c *tclient) goInfo(t *testing.T, addr string) uint32 {
	d := newClient(t, rawDial(t, addr))
	d.greet(flagCFixedNewstyle)
	rs := d.option(optInfo, infoPayload("f", infoBlockSize))
	return binary.BigEndian.Uint32(infos(rs)[infoBlockSize][8:])
}

func TestZeroFallback(t *testing.T) {
	m := graph.NewMemNode(2 * mib)
	copy(m.Bytes(), pattern(2*mib, 1))
	_, addr := startServer(t, Options{}, &Export{Name: "p", Node: plainNode{m}})
	for _, md := range allModes {
		c := connect(t, addr, "p", md.f)
		if r := c.do(cmdWriteZeroes, cmdFlagFastZero, 0, 4096, nil); r.errno != errNotSup {
			t.Fatalf("fast zero errno %d", r.errno)
		}
		if m.Bytes()[1] == 0 {
			t.Fatal("fast zero failure changed data")
		}
		if r := c.do(cmdWriteZeroes, 0, 0, 3*mib/2-4096, nil); r.errno != 0 {
			t.Fatalf("zero errno %d", r.errno)
		}
		if !allZero(m.Bytes()[:3*mib/2-4096]) || allZero(m.Bytes()[3*mib/2-4096:]) {
			t.Fatal("fallback zeroing wrong")
		}
		if r := c.do(cmdTrim, 0, 0, 4096, nil); r.errno != 0 {
			t.Fatalf("trim errno %d", r.errno)
		}
		copy(m.Bytes(), pattern(2*mib, 1))
		c.disc()
	}
}

func TestSparseReadsAndBlockStatus(t *testing.T) {
	for _, md := range allModes[1:] {
		t.Run(md.name, func(t *testing.T) {
			sn := &sparseNode{MemNode: graph.NewMemNode(4 * mib)}
			// Data in grains 1, 2 and 5; everything else reads as zero.
			for _, g := range []int{1, 2, 5} {
				copy(sn.Bytes()[g*sparseGrain:], pattern(sparseGrain, byte(g)))
			}
			_, addr := startServer(t, Options{}, &Export{Name: "s", Node: sn})
			c := connect(t, addr, "s", md.f)

			r := c.do(cmdRead, 0, 0, mib, nil)
			if r.errno != 0 || !bytes.Equal(r.data, sn.Bytes()[:mib]) {
				t.Fatal("sparse read data wrong")
			}
			var kinds []string
			for _, ch := range r.chunks {
				switch ch.typ {
				case replyTypeOffsetData:
					kinds = append(kinds, fmt.Sprintf("D%d+%d", binary.BigEndian.Uint64(ch.payload)/sparseGrain, (len(ch.payload)-8)/sparseGrain))
				case replyTypeOffsetHole:
					kinds = append(kinds, fmt.Sprintf("H%d+%d", binary.BigEndian.Uint64(ch.payload)/sparseGrain, binary.BigEndian.Uint32(ch.payload[8:])/sparseGrain))
				}
			}
			if got := strings.Join(kinds, " "); got != "H0+1 D1+2 H3+2 D5+1 H6+10" {
				t.Fatalf("chunks %s", got)
			}
			if r.chunks[len(r.chunks)-1].flags&replyFlagDone == 0 {
				t.Fatal("last chunk not DONE")
			}
			// DF and small reads: one chunk, data unless a small read
			// found only zeroes.
			for _, rq := range []struct {
				flags  uint16
				off, n uint64
				typ    uint16
			}{{cmdFlagDF, 0, mib, replyTypeOffsetData}, {0, 0, 4096, replyTypeOffsetHole}, {0, sparseGrain, 4096, replyTypeOffsetData}} {
				r = c.do(cmdRead, rq.flags, rq.off, rq.n, nil)
				if len(r.chunks) != 1 || r.chunks[0].typ != rq.typ || !bytes.Equal(r.data, sn.Bytes()[rq.off:rq.off+rq.n]) {
					t.Fatalf("read %+v: %d chunks", rq, len(r.chunks))
				}
			}

			// Block status.
			r = c.do(cmdBlockStatus, 0, 0, 4*mib, nil)
			_, es := r.extents(t)
			ext := func(n int64, f graph.ExtentFlags) graph.Extent { return graph.Extent{Length: n, Flags: f} }
			want := []graph.Extent{ext(sparseGrain, 3), ext(2*sparseGrain, 0), ext(2*sparseGrain, 3), ext(sparseGrain, 0), ext(58*sparseGrain, 3)}
			if fmt.Sprint(es) != fmt.Sprint(want) {
				t.Fatalf("extents %v, want %v", es, want)
			}
			r = c.do(cmdBlockStatus, cmdFlagReqOne, sparseGrain/2, 4*mib-sparseGrain, nil)
			if _, es = r.extents(t); len(es) != 1 || es[0] != (graph.Extent{Length: sparseGrain / 2, Flags: 3}) {
				t.Fatalf("REQ_ONE extents %v", es)
			}
			r = c.do(cmdBlockStatus, cmdFlagReqOne, sparseGrain, 100, nil)
			if _, es = r.extents(t); len(es) != 1 || es[0] != (graph.Extent{Length: 100}) {
				t.Fatalf("REQ_ONE short extents %v", es)
			}
			c.disc()
		})
	}
}

// TestConcurrency runs several pipelined clients doing random I/O on
// separate regions and checks every byte against a model.
func TestConcurrency(t *testing.T) {
	const (
		clients = 6
		region  = 2 * mib
		ops     = 300
		depth   = 24
	)
	m := graph.NewMemNode(clients * region)
	_, addr := startServer(t, Options{MaxInFlight: 8}, &Export{Name: "d", Node: m})
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := range clients {
		md := allModes[i%len(allModes)]
		c := connect(t, addr, "d", md.f)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- runRandomIO(c, uint64(i*region), region, ops, depth, int64(i))
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
}

// runRandomIO keeps depth requests in flight against [base, base+size).
// Writes to a block are only issued when no other request on that block is
// outstanding, so the expected content is always known.
func runRandomIO(c *tclient, base, size uint64, ops, depth int, seed int64) error {
	const blk = 4096
	rng := rand.New(rand.NewPCG(uint64(seed), 7))
	model := make([]byte, size)
	busy := make([]bool, size/blk)
	type op struct {
		typ        uint16
		first, cnt uint64
		want       []byte
	}
	inflight := map[uint64]op{}
	col := &collector{c: c, partial: map[uint64]*reply{}}
	issued, done := 0, 0
	for done < ops {
		for issued < ops && len(inflight) < depth {
			first := uint64(rng.IntN(int(size/blk) - 16))
			cnt := uint64(1 + rng.IntN(16))
			free := true
			for b := first; b < first+cnt; b++ {
				free = free && !busy[b]
			}
			if !free {
				break
			}
			o := op{first: first, cnt: cnt}
			off, n := base+first*blk, cnt*blk
			switch rng.IntN(4) {
			case 0, 1:
				p := make([]byte, n)
				for i := range p {
					p[i] = byte(rng.Uint32())
				}
				o.typ = cmdWrite
				copy(model[first*blk:], p)
				cookie := c.send(cmdWrite, uint16(rng.IntN(2)), off, n, p)
				inflight[cookie] = o
			case 2:
				o.typ = cmdRead
				o.want = append([]byte(nil), model[first*blk:(first+cnt)*blk]...)
				cookie := c.send(cmdRead, 0, off, n, nil)
				inflight[cookie] = o
			case 3:
				o.typ = cmdWriteZeroes
				clear(model[first*blk : (first+cnt)*blk])
				cookie := c.send(cmdWriteZeroes, 0, off, n, nil)
				inflight[cookie] = o
			}
			for b := first; b < first+cnt; b++ {
				busy[b] = true
			}
			issued++
		}
		r, err := col.next()
		if err != nil {
			return err
		}
		o, ok := inflight[r.cookie]
		if !ok {
			return fmt.Errorf("unexpected cookie %d", r.cookie)
		}
		delete(inflight, r.cookie)
		for b := o.first; b < o.first+o.cnt; b++ {
			busy[b] = false
		}
		if r.errno != 0 {
			return fmt.Errorf("%s errno %d %s", cmdName(o.typ), r.errno, r.msg)
		}
		if o.typ == cmdRead && !bytes.Equal(r.data, o.want) {
			return fmt.Errorf("read of blocks %d+%d differs", o.first, o.cnt)
		}
		done++
	}
	// Final verification through the protocol.
	r, err := c.try(cmdRead, 0, base, size, nil)
	if err != nil {
		return err
	}
	if !bytes.Equal(r.data, model) {
		return errors.New("final content differs")
	}
	c.send(cmdDisc, 0, 0, 0, nil)
	return nil
}

// TestDisconnectMidRequest: a client hangs up while its read is blocked in
// the node; the request's context is cancelled and the server waits for it
// before releasing the client.
func TestDisconnectMidRequest(t *testing.T) {
	f := &faultNode{MemNode: graph.NewMemNode(mib), block: make(chan struct{}), entered: make(chan struct{}, 16)}
	s, addr := startServer(t, Options{}, &Export{Name: "f", Node: f})
	c := connect(t, addr, "f", features{structured: true})
	for i := range 3 {
		c.send(cmdRead, 0, uint64(i)*4096, 4096, nil)
	}
	for range 3 {
		<-f.entered
	}
	if n := s.Clients("f"); n != 1 {
		t.Fatalf("clients %d", n)
	}
	c.nc.Close()
	waitFor(t, func() bool { return s.Clients("f") == 0 })
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.ctxErrs) != 3 {
		t.Fatalf("%d reads returned before the client was released", len(f.ctxErrs))
	}
	for _, e := range f.ctxErrs {
		if !errors.Is(e, context.Canceled) {
			t.Fatalf("read context error %v", e)
		}
	}
}

// gateNode blocks reads at offset 0 until gate closes, and makes every
// read take delay; it records the most reads seen in progress at once.
type gateNode struct {
	*graph.MemNode
	gate    chan struct{}
	entered chan struct{}
	delay   time.Duration
	mu      sync.Mutex
	now     int
	most    int
}

func (g *gateNode) ReadAt(ctx context.Context, p []byte, off int64) error {
	g.mu.Lock()
	g.now++
	g.most = max(g.most, g.now)
	g.mu.Unlock()
	defer func() {
		g.mu.Lock()
		g.now--
		g.mu.Unlock()
	}()
	if off == 0 && g.gate != nil {
		g.entered <- struct{}{}
		select {
		case <-g.gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	time.Sleep(g.delay)
	return g.MemNode.ReadAt(ctx, p, off)
}

// TestStalledRequestHandsOverReading: small requests are served by the
// connection's reader itself; one that does not finish must not hold up
// the requests sent after it, and its reply still comes once it is done.
func TestStalledRequestHandsOverReading(t *testing.T) {
	for _, md := range allModes {
		t.Run(md.name, func(t *testing.T) {
			g := &gateNode{MemNode: graph.NewMemNode(mib), gate: make(chan struct{}), entered: make(chan struct{}, 1)}
			data := pattern(mib, 9)
			g.MemNode.WriteAt(context.Background(), data, 0, 0)
			_, addr := startServer(t, Options{}, &Export{Name: "g", Node: g})
			c := connect(t, addr, "g", md.f)
			col := &collector{c: c, partial: map[uint64]*reply{}}
			stuck := c.send(cmdRead, 0, 0, 4096, nil)
			<-g.entered
			for i := range 40 {
				off := uint64(i+1) * 8192
				var want []byte
				var ck uint64
				if i%2 == 0 {
					ck = c.send(cmdRead, 0, off, 4096, nil)
					want = data[off : off+4096]
				} else {
					w := pattern(4096, byte(i))
					copy(data[off:], w)
					ck = c.send(cmdWrite, 0, off, 4096, w)
				}
				r, err := col.next()
				if err != nil || r.errno != 0 {
					t.Fatalf("request %d behind a stalled one: %+v %v", i, r, err)
				}
				if r.cookie != ck {
					t.Fatalf("reply for cookie %d, want %d (the stalled request is %d)", r.cookie, ck, stuck)
				}
				if want != nil && !bytes.Equal(r.data, want) {
					t.Fatalf("read %d: wrong data", i)
				}
			}
			close(g.gate)
			r, err := col.next()
			if err != nil || r.errno != 0 || r.cookie != stuck || !bytes.Equal(r.data, data[:4096]) {
				t.Fatalf("stalled request's reply: %+v %v", r, err)
			}
			if got := g.MemNode.Bytes(); !bytes.Equal(got, data) {
				t.Fatal("writes behind the stalled read not done")
			}
			c.disc()
		})
	}
}

// TestSlowNodeServedInParallel: once requests take long, a connection
// serves them on its workers, in parallel, rather than one after another
// on its reader.
func TestSlowNodeServedInParallel(t *testing.T) {
	g := &gateNode{MemNode: graph.NewMemNode(mib), delay: 5 * time.Millisecond}
	_, addr := startServer(t, Options{MaxInFlight: 8}, &Export{Name: "g", Node: g})
	c := connect(t, addr, "g", features{structured: true})
	col := &collector{c: c, partial: map[uint64]*reply{}}
	for round := range 3 {
		for i := range 8 {
			c.send(cmdRead, 0, uint64(i)*4096, 4096, nil)
		}
		for range 8 {
			if r, err := col.next(); err != nil || r.errno != 0 {
				t.Fatalf("round %d: %+v %v", round, r, err)
			}
		}
	}
	g.mu.Lock()
	most := g.most
	g.mu.Unlock()
	if most < 4 {
		t.Fatalf("at most %d slow reads in progress at once, want the workers to serve them in parallel", most)
	}
	c.disc()
}

// TestDiscWaitsForInflight: writes sent right before NBD_CMD_DISC are all
// performed and answered before the server closes.
func TestDiscWaitsForInflight(t *testing.T) {
	e, m := memExport("d", 4*mib)
	_, addr := startServer(t, Options{}, e)
	c := connect(t, addr, "d", features{structured: true})
	data := pattern(4*mib, 5)
	var buf bytes.Buffer
	for i := range 64 {
		off := uint64(i) * 64 << 10
		h := make([]byte, 28)
		binary.BigEndian.PutUint32(h, magicRequest)
		binary.BigEndian.PutUint16(h[6:], cmdWrite)
		binary.BigEndian.PutUint64(h[8:], uint64(i+1))
		binary.BigEndian.PutUint64(h[16:], off)
		binary.BigEndian.PutUint32(h[24:], 64<<10)
		buf.Write(h)
		buf.Write(data[off : off+64<<10])
		c.pending[uint64(i+1)] = pendingReq{typ: cmdWrite, off: off, length: 64 << 10}
	}
	h := make([]byte, 28)
	binary.BigEndian.PutUint32(h, magicRequest)
	binary.BigEndian.PutUint16(h[6:], cmdDisc)
	buf.Write(h)
	go c.write(buf.Bytes())
	col := &collector{c: c, partial: map[uint64]*reply{}}
	for range 64 {
		r, err := col.next()
		if err != nil || r.errno != 0 {
			t.Fatalf("reply %+v %v", r, err)
		}
	}
	c.expectEOF()
	if !bytes.Equal(m.Bytes(), data) {
		t.Fatal("not all writes done")
	}
}

func TestRemoveExport(t *testing.T) {
	e, _ := memExport("disk", mib)
	s, addr := startServer(t, Options{}, e)
	if _, err := s.RemoveExport("nope", false); !errors.Is(err, graph.ErrNotFound) || err.Error() != "export 'nope' is not found: not found" {
		t.Fatalf("remove unknown: %v", err)
	}
	c := connect(t, addr, "disk", features{structured: true})
	// A client in the handshake does not count.
	h := newClient(t, rawDial(t, addr))
	h.greet(flagCFixedNewstyle)
	if _, err := s.RemoveExport("disk", false); !errors.Is(err, graph.ErrInUse) {
		t.Fatalf("safe remove with a client: %v", err)
	}
	if s.Clients("disk") != 1 {
		t.Fatal("client count")
	}
	done, err := s.RemoveExport("disk", true)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("hard remove did not finish")
	}
	c.expectEOF()
	if _, err := s.RemoveExport("disk", true); !errors.Is(err, graph.ErrNotFound) {
		t.Fatalf("second remove: %v", err)
	}
	h.expectFinal(h.option(optGo, infoPayload("disk")), repErrUnknown)
	if rs := h.option(optList, nil); len(rs) != 1 {
		t.Fatalf("list after remove %+v", rs)
	}
	// Safe removal without clients completes at once; the name is free again.
	if err := s.AddExport(e); err != nil {
		t.Fatal(err)
	}
	done, err = s.RemoveExport("disk", false)
	if err != nil {
		t.Fatal(err)
	}
	<-done
	if len(s.Exports()) != 0 {
		t.Fatal("exports left")
	}
}

func TestMaxConnections(t *testing.T) {
	e, _ := memExport("disk", mib)
	_, addr := startServer(t, Options{MaxConnections: 1}, e)
	c := connect(t, addr, "disk", features{})
	if c.flags&tflagCanMultiConn != 0 {
		t.Fatal("CAN_MULTI_CONN with max-connections 1")
	}
	d := newClient(t, rawDial(t, addr))
	d.expectEOF() // closed right after accept, no greeting
	if r := c.do(cmdRead, 0, 0, 512, nil); r.errno != 0 {
		t.Fatal("first client broken")
	}
	c.disc()
	// The slot is free again.
	var c2 *tclient
	waitFor(t, func() bool {
		nc, err := net.Dial("tcp", addr)
		if err != nil {
			return false
		}
		c2 = newClient(t, nc)
		nc.SetReadDeadline(time.Now().Add(time.Second))
		g := make([]byte, greetingSize)
		if _, err := c2.r.Read(g[:1]); err != nil {
			nc.Close()
			return false
		}
		c2.r.UnreadByte()
		nc.SetReadDeadline(time.Time{})
		return true
	})
	c2.handshake("disk", features{})
	c2.disc()

	_, addr2 := startServer(t, Options{MaxConnections: 2}, &Export{Name: "x", Node: graph.NewMemNode(mib)})
	if c := connect(t, addr2, "x", features{}); c.flags&tflagCanMultiConn == 0 {
		t.Fatal("CAN_MULTI_CONN missing")
	}
}

func TestHandshakeTimeout(t *testing.T) {
	e, _ := memExport("disk", mib)
	_, addr := startServer(t, Options{HandshakeTimeout: 300 * time.Millisecond}, e)
	start := time.Now()
	stalled := newClient(t, rawDial(t, addr))
	stalled.greet(flagCFixedNewstyle)
	// Half an option header, then nothing.
	stalled.write([]byte("IHAV"))
	stalled.expectEOF()
	if d := time.Since(start); d < 250*time.Millisecond || d > 3*time.Second {
		t.Fatalf("closed after %v", d)
	}
	// A client that completed the handshake is not subject to it.
	c := connect(t, addr, "disk", features{})
	time.Sleep(500 * time.Millisecond)
	if r := c.do(cmdRead, 0, 0, 512, nil); r.errno != 0 {
		t.Fatal("transmission timed out")
	}
	c.disc()
}

func TestCloseServer(t *testing.T) {
	f := &faultNode{MemNode: graph.NewMemNode(mib), block: make(chan struct{}), entered: make(chan struct{}, 16)}
	s := NewServer(Options{})
	if err := s.AddExport(&Export{Name: "f", Node: f}); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l2, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 2)
	go func() { served <- s.Serve(l) }()
	go func() { served <- s.Serve(l2) }()
	c := connect(t, l.Addr().String(), "f", features{})
	c.send(cmdRead, 0, 0, 512, nil)
	<-f.entered
	h := newClient(t, rawDial(t, l2.Addr().String()))
	h.greet(flagCFixedNewstyle)
	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("Close hangs")
	}
	for range 2 {
		if err := <-served; !errors.Is(err, ErrServerClosed) {
			t.Fatalf("Serve: %v", err)
		}
	}
	c.expectEOF()
	h.expectEOF()
	if err := s.Serve(l); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve after Close: %v", err)
	}
	a, b := net.Pipe()
	defer b.Close()
	if err := s.ServeConn(a); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("ServeConn after Close: %v", err)
	}
}

func TestServeConnPipe(t *testing.T) {
	e, _ := memExport("disk", mib)
	s := NewServer(Options{})
	if err := s.AddExport(e); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	a, b := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- s.ServeConn(a) }()
	c := newClient(t, b)
	c.handshake("disk", features{extended: true, meta: true})
	if r := c.do(cmdWrite, 0, 0, 3, []byte("abc")); r.errno != 0 {
		t.Fatal(r.errno)
	}
	c.disc()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TLS.

func tlsFixture(t *testing.T, verifyPeer bool) (srv *tls.Config, dir string) {
	t.Helper()
	dir = t.TempDir()
	if err := tlstest.Generate(dir, tlstest.Options{}); err != nil {
		t.Fatal(err)
	}
	return tlsFixtureDir(t, dir, verifyPeer)
}

func tlsFixtureDir(t *testing.T, dir string, verifyPeer bool) (*tls.Config, string) {
	t.Helper()
	cfg, err := tlscreds.LoadX509(tlscreds.X509Options{Dir: dir, Endpoint: "server", VerifyPeer: verifyPeer})
	if err != nil {
		t.Fatal(err)
	}
	return cfg, dir
}

func clientTLS(t *testing.T, dir string, withCert bool) *tls.Config {
	t.Helper()
	ca, err := os.ReadFile(filepath.Join(dir, "ca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	cfg := &tls.Config{RootCAs: pool, ServerName: "localhost"}
	if withCert {
		kp, err := tls.LoadX509KeyPair(filepath.Join(dir, "client-cert.pem"), filepath.Join(dir, "client-key.pem"))
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{kp}
	}
	return cfg
}

func TestTLS(t *testing.T) {
	srvCfg, dir := tlsFixture(t, true)
	e, _ := memExport("disk", mib)
	_, addr := startServer(t, Options{TLSConfig: srvCfg}, e)

	// Options before STARTTLS are refused; the client may still upgrade.
	c := newClient(t, rawDial(t, addr))
	c.greet(flagCFixedNewstyle)
	for _, o := range []uint32{optList, optGo, optInfo, optStructuredReply, 99} {
		c.expectFinal(c.option(o, infoPayload("disk")), repErrTLSReqd)
	}
	c.expectFinal(c.option(optStartTLS, nil), repAck)
	tc := tls.Client(c.nc, clientTLS(t, dir, true))
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	c.nc, c.r = tc, bufioReader(tc)
	c.expectFinal(c.option(optStartTLS, nil), repErrInvalid)
	c.expectFinal(c.option(optStructuredReply, nil), repAck)
	c.mode = modeStructured
	c.expectFinal(c.goExport("disk"), repAck)
	if r := c.do(cmdWrite, cmdFlagFUA, 0, 5, []byte("hello")); r.errno != 0 {
		t.Fatal(r.errno)
	}
	if r := c.do(cmdRead, 0, 0, 5, nil); string(r.data) != "hello" {
		t.Fatalf("read %q", r.data)
	}
	c.disc()

	// Full helper path.
	connect(t, addr, "disk", features{extended: true, meta: true, tls: clientTLS(t, dir, true)}).disc()

	// EXPORT_NAME before TLS: dropped. Non-fixed newstyle: dropped.
	c = newClient(t, rawDial(t, addr))
	c.greet(flagCFixedNewstyle)
	c.sendOpt(optExportName, []byte("disk"))
	c.expectEOF()
	c = newClient(t, rawDial(t, addr))
	c.greet(0)
	c.sendOpt(optExportName, []byte("disk"))
	c.expectEOF()
	// ABORT before TLS.
	c = newClient(t, rawDial(t, addr))
	c.greet(flagCFixedNewstyle)
	c.expectFinal(c.option(optAbort, nil), repAck)
	c.expectEOF()

	// No client certificate with verify-peer: the TLS handshake fails.
	c = newClient(t, rawDial(t, addr))
	c.greet(flagCFixedNewstyle)
	c.expectFinal(c.option(optStartTLS, nil), repAck)
	tc = tls.Client(c.nc, clientTLS(t, dir, false))
	err := tc.Handshake()
	if err == nil {
		// TLS 1.3: the server's verdict arrives with the first read.
		_, err = tc.Read(make([]byte, 1))
	}
	if err == nil {
		t.Fatal("handshake without client certificate succeeded")
	}
	// A client that does not trust the server's CA refuses the server.
	otherDir := t.TempDir()
	if err := tlstest.Generate(otherDir, tlstest.Options{}); err != nil {
		t.Fatal(err)
	}
	c = newClient(t, rawDial(t, addr))
	c.greet(flagCFixedNewstyle)
	c.expectFinal(c.option(optStartTLS, nil), repAck)
	if err := tls.Client(c.nc, clientTLS(t, otherDir, true)).Handshake(); err == nil {
		t.Fatal("handshake with an unknown CA succeeded")
	}
	// STARTTLS with a payload is fatal.
	c = newClient(t, rawDial(t, addr))
	c.greet(flagCFixedNewstyle)
	c.expectFinal(c.option(optStartTLS, []byte{1}), repErrInvalid)
	c.expectEOF()

	// verify-peer off: no client certificate needed.
	srvCfg2, dir2 := tlsFixture(t, false)
	e2, _ := memExport("disk", mib)
	_, addr2 := startServer(t, Options{TLSConfig: srvCfg2}, e2)
	connect(t, addr2, "disk", features{structured: true, tls: clientTLS(t, dir2, false)}).disc()
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// unixPair returns the two ends of a connected unix socket pair.
func unixPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	fileConn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		nc, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { nc.Close() })
		return nc
	}
	return fileConn(fds[0]), fileConn(fds[1])
}

// TestReaderLooksAgainAfterMisses checks the reader's look for queued
// requests before it flushes: after two misses in a row it skips looking,
// but looks again every 16th time, so a client that goes from one request
// at a time to bursts gets its burst answered with one write again.
func TestReaderLooksAgainAfterMisses(t *testing.T) {
	ours, peer := unixPair(t)
	var flushed bytes.Buffer
	c := &conn{nc: ours}
	c.tx.bw = bufio.NewWriter(&flushed)
	rr := newReqReader(c)
	if rr.rc == nil {
		t.Fatal("no RawConn for a unix socket")
	}
	buf := make([]byte, 16)
	// read has the reader flush (one reply byte pending) and then read:
	// with a request waiting, it returns it; without, the wait ends on a
	// deadline 10 ms ahead. It reports whether the reply was flushed.
	read := func(waiting bool) bool {
		t.Helper()
		if waiting {
			if _, err := peer.Write([]byte{1}); err != nil {
				t.Fatal(err)
			}
			ours.SetReadDeadline(time.Time{})
		} else {
			ours.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
		}
		flushed.Reset()
		c.tx.bw.WriteByte(0)
		c.tx.unsent = true
		n, err := rr.Read(buf)
		if waiting && (n != 1 || err != nil) {
			t.Fatalf("read %d, %v with a request waiting", n, err)
		}
		if !waiting && err == nil {
			t.Fatalf("read %d with nothing waiting", n)
		}
		return flushed.Len() > 0
	}
	// Two misses: the reader looked and flushed each time.
	for i := 0; i < 2; i++ {
		if !read(false) {
			t.Fatal("not flushed with no request waiting")
		}
	}
	// Now it does not look: a waiting request does not stop the flush.
	for i := 0; rr.misses%16 != 0; i++ {
		if i == 16 {
			t.Fatalf("the miss count stays at %d", rr.misses)
		}
		if !read(true) {
			t.Fatalf("miss %d: did not flush though it should not look", rr.misses)
		}
	}
	// Every 16th time it looks again, finds the request and holds the
	// reply back; after a hit it looks every time.
	for i := 0; i < 3; i++ {
		if read(true) {
			t.Fatalf("hit %d: flushed though a request was waiting", i)
		}
	}
}
