package nbd

import (
	"crypto/tls"
	"encoding/binary"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"blockd/graph"
	"blockd/internal/tlscreds"
	"blockd/internal/tlscreds/tlstest"
)

// The fuzz targets drive a server over net.Pipe with arbitrary bytes. The
// server must neither panic nor hang: once the client side is closed,
// ServeConn has to return promptly.

var (
	fuzzTLSOnce sync.Once
	fuzzTLS     *tls.Config
)

func fuzzTLSConfig(t testing.TB) *tls.Config {
	fuzzTLSOnce.Do(func() {
		dir, err := os.MkdirTemp("", "nbdfuzz")
		if err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(dir)
		if err := tlstest.Generate(dir, tlstest.Options{}); err != nil {
			t.Fatal(err)
		}
		fuzzTLS, err = tlscreds.LoadX509(tlscreds.X509Options{Dir: dir, Endpoint: "server"})
		if err != nil {
			t.Fatal(err)
		}
	})
	return fuzzTLS
}

func fuzzServer(t testing.TB, tlsOn bool) *Server {
	o := Options{HandshakeTimeout: 5 * time.Second, MaxInFlight: 4}
	if tlsOn {
		o.TLSConfig = fuzzTLSConfig(t)
	}
	s := NewServer(o)
	sn := &sparseNode{MemNode: graph.NewMemNode(256 << 10)}
	if err := s.AddExport(&Export{Name: "disk", Node: sn}); err != nil {
		t.Fatal(err)
	}
	if err := s.AddExport(&Export{Name: "ro", Description: "d", Node: graph.NewMemNode(64 << 10), ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	return s
}

// feed writes data to the client end, closes it and waits for ServeConn.
func feed(t *testing.T, s *Server, client net.Conn, data []byte, done <-chan error) {
	t.Helper()
	go io.Copy(io.Discard, client)
	client.SetWriteDeadline(time.Now().Add(10 * time.Second))
	client.Write(data)
	client.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("server did not finish after the client closed")
	}
	s.Close()
}

func optBytes(opt uint32, payload []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, magicOpts)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

func FuzzHandshake(f *testing.F) {
	fixed := []byte{0, 0, 0, 1}
	cat := func(parts ...[]byte) []byte {
		var b []byte
		for _, p := range parts {
			b = append(b, p...)
		}
		return b
	}
	f.Add(false, cat(fixed, optBytes(optList, nil), optBytes(optGo, infoPayload("disk", infoName, infoBlockSize))))
	f.Add(false, cat(fixed, optBytes(optStructuredReply, nil), optBytes(optSetMetaContext, metaPayload("disk", "base:allocation")),
		optBytes(optGo, infoPayload("disk"))))
	f.Add(false, cat(fixed, optBytes(optExtendedHeaders, nil), optBytes(optListMetaContext, metaPayload("disk")),
		optBytes(optInfo, infoPayload("ro")), optBytes(optAbort, nil)))
	f.Add(false, cat([]byte{0, 0, 0, 3}, optBytes(optExportName, []byte("disk"))))
	f.Add(false, cat([]byte{0, 0, 0, 0}, optBytes(optExportName, []byte("ro"))))
	f.Add(false, cat(fixed, optBytes(optInfo, []byte{0, 0, 0, 200, 1}), optBytes(99, []byte("junk"))))
	f.Add(false, cat(fixed, optBytes(optStartTLS, nil), optBytes(optListMetaContext, []byte{0, 0, 0, 4, 'd', 'i', 's', 'k', 255, 255, 255, 255})))
	f.Add(true, cat(fixed, optBytes(optList, nil), optBytes(optStartTLS, nil), []byte{0x16, 3, 1, 0, 5, 1, 2, 3}))
	f.Add(true, cat(fixed, optBytes(optExportName, []byte("disk"))))
	f.Add(false, []byte{})
	f.Add(false, cat(fixed, []byte("IHAVEOPT\x00\x00\x00\x07\x01\xff\xff\xff")))

	f.Fuzz(func(t *testing.T, tlsOn bool, data []byte) {
		s := fuzzServer(t, tlsOn)
		a, b := net.Pipe()
		done := make(chan error, 1)
		go func() { done <- s.ServeConn(a) }()
		feed(t, s, b, data, done)
	})
}

func reqBytes(ext bool, typ, flags uint16, cookie, off, length uint64, payload []byte) []byte {
	var b []byte
	if ext {
		b = binary.BigEndian.AppendUint32(nil, magicExtRequest)
	} else {
		b = binary.BigEndian.AppendUint32(nil, magicRequest)
	}
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	if ext {
		b = binary.BigEndian.AppendUint64(b, length)
	} else {
		b = binary.BigEndian.AppendUint32(b, uint32(length))
	}
	return append(b, payload...)
}

func FuzzRequests(f *testing.F) {
	for m := range uint8(3) {
		ext := m == 2
		var seq []byte
		seq = append(seq, reqBytes(ext, cmdWrite, cmdFlagFUA, 1, 4096, 8, []byte("abcdefgh"))...)
		seq = append(seq, reqBytes(ext, cmdRead, 0, 2, 0, 128<<10, nil)...)
		seq = append(seq, reqBytes(ext, cmdBlockStatus, cmdFlagReqOne, 3, 0, 256<<10, nil)...)
		seq = append(seq, reqBytes(ext, cmdWriteZeroes, cmdFlagFastZero|cmdFlagNoHole, 4, 0, 8192, nil)...)
		seq = append(seq, reqBytes(ext, cmdTrim, 0, 5, 0, 4096, nil)...)
		seq = append(seq, reqBytes(ext, cmdCache, 0, 6, 0, 4096, nil)...)
		seq = append(seq, reqBytes(ext, cmdFlush, 0, 7, 0, 0, nil)...)
		seq = append(seq, reqBytes(ext, cmdRead, cmdFlagDF, 8, 1<<40, 1, nil)...)
		seq = append(seq, reqBytes(ext, 77, 0xffff, 9, 0, 0, nil)...)
		f.Add(m, seq)
		f.Add(m, append(seq, reqBytes(ext, cmdDisc, 0, 10, 0, 0, nil)...))
		f.Add(m, reqBytes(ext, cmdWrite, 0, 1, 0, 1<<30, []byte{1, 2, 3}))
		f.Add(m, reqBytes(ext, cmdBlockStatus, cmdFlagPayloadLen, 1, 0, 12, make([]byte, 12)))
	}
	f.Add(uint8(0), []byte{0x25, 0x60, 0x95, 0x13, 0})
	f.Add(uint8(1), []byte("garbage that is not a request at all, certainly"))

	f.Fuzz(func(t *testing.T, m uint8, data []byte) {
		s := fuzzServer(t, false)
		a, b := net.Pipe()
		done := make(chan error, 1)
		go func() { done <- s.ServeConn(a) }()
		c := newClient(t, b)
		switch m % 4 {
		case 0:
			c.handshake("disk", features{})
		case 1:
			c.handshake("disk", features{structured: true, meta: true})
		case 2:
			c.handshake("disk", features{extended: true, meta: true})
		case 3:
			c.handshake("ro", features{structured: true, blockSize: true})
		}
		feed(t, s, b, data, done)
	})
}
