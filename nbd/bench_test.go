package nbd

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"blockd/graph"
)

// BenchmarkRequestLoop measures the request loop in process: a pipelined
// client on a unix socket issuing requests against a MemNode. The
// allocation counts cover both the server and the (allocation-free)
// client. The large rows are where the request memory budget and the
// mapped buffers of internal/bufpool come in.
func BenchmarkRequestLoop(b *testing.B) {
	for _, bc := range []struct {
		name  string
		typ   uint16
		f     features
		depth int
		bs    int
	}{
		{"read4k/simple/qd1", cmdRead, features{}, 1, 4096},
		{"read4k/simple/qd16", cmdRead, features{}, 16, 4096},
		{"read4k/structured/qd16", cmdRead, features{structured: true}, 16, 4096},
		{"read4k/extended/qd16", cmdRead, features{extended: true}, 16, 4096},
		{"write4k/simple/qd16", cmdWrite, features{}, 16, 4096},
		{"read1m/simple/qd16", cmdRead, features{}, 16, 1 << 20},
		{"write1m/simple/qd16", cmdWrite, features{}, 16, 1 << 20},
		{"read32m/simple/qd16", cmdRead, features{}, 16, 32 << 20},
	} {
		b.Run(bc.name, func(b *testing.B) { benchLoop(b, bc.typ, bc.f, bc.depth, bc.bs) })
	}
}

// BenchmarkRequestLoopPeer runs the same client against qemu-nbd and
// nbdkit (memory plugin) serving 64 MiB from memory, for comparison.
func BenchmarkRequestLoopPeer(b *testing.B) {
	for _, peer := range []string{"qemu-nbd", "nbdkit"} {
		if _, err := exec.LookPath(peer); err != nil {
			continue
		}
		for _, bc := range []struct {
			name  string
			typ   uint16
			f     features
			depth int
		}{
			{"read4k/simple/qd1", cmdRead, features{}, 1},
			{"read4k/simple/qd16", cmdRead, features{}, 16},
			{"read4k/structured/qd16", cmdRead, features{structured: true}, 16},
			{"write4k/simple/qd16", cmdWrite, features{}, 16},
		} {
			b.Run(peer+"/"+bc.name, func(b *testing.B) {
				dir := b.TempDir()
				sock := filepath.Join(dir, "s")
				var cmd *exec.Cmd
				if peer == "qemu-nbd" {
					img := filepath.Join("/dev/shm", filepath.Base(dir)+".raw")
					data := make([]byte, benchSize)
					fillBench(data)
					if err := os.WriteFile(img, data, 0o600); err != nil {
						b.Fatal(err)
					}
					defer os.Remove(img)
					cmd = exec.Command("qemu-nbd", "-x", "d", "-f", "raw", "-t", "--cache=writeback", "--aio=threads", "-k", sock, img)
				} else {
					cmd = exec.Command("nbdkit", "-f", "-e", "d", "-U", sock, "memory", fmt.Sprint(benchSize))
				}
				if err := cmd.Start(); err != nil {
					b.Fatal(err)
				}
				defer func() { cmd.Process.Kill(); cmd.Wait() }()
				var nc net.Conn
				for i := 0; ; i++ {
					var err error
					if nc, err = net.Dial("unix", sock); err == nil {
						break
					}
					if i > 200 {
						b.Fatal(err)
					}
					time.Sleep(10 * time.Millisecond)
				}
				defer nc.Close()
				benchClient(b, nc, bc.typ, bc.f, bc.depth, 4096)
			})
		}
	}
}

const benchSize = 64 << 20

func benchLoop(b *testing.B, typ uint16, f features, depth, bs int) {
	const size = benchSize
	dir, err := os.MkdirTemp("", "nbdbench")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	l, err := net.Listen("unix", filepath.Join(dir, "s"))
	if err != nil {
		b.Fatal(err)
	}
	s := NewServer(Options{})
	m := graph.NewMemNode(size)
	fillBench(m.Bytes())
	if err := s.AddExport(&Export{Name: "d", Node: m}); err != nil {
		b.Fatal(err)
	}
	go s.Serve(l)
	defer s.Close()
	nc, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	benchClient(b, nc, typ, f, depth, bs)
}

// fillBench gives the benchmark disks non-zero data: reads of zeroes may
// be answered with hole chunks (blockd and qemu-nbd do), and the client
// below expects one data chunk per read.
func fillBench(p []byte) {
	for i := range p {
		p[i] = byte(i*7 + 1)
	}
}

// benchClient pipelines b.N requests of bs bytes with depth in flight.
func benchClient(b *testing.B, nc net.Conn, typ uint16, f features, depth, bs int) {
	const size = benchSize
	defer nc.Close()
	c := newClient(b, nc)
	c.handshake("d", f)

	ext := c.mode >= modeExtended
	hl := 28
	if ext {
		hl = 32
	}
	replyLen := 16 // simple
	switch {
	case ext:
		replyLen = 32
	case c.mode >= modeStructured:
		replyLen = 20
	}
	if typ == cmdRead {
		replyLen += bs
		if c.mode >= modeStructured {
			replyLen += 8
		}
	}
	req := make([]byte, hl+bs)
	if ext {
		binary.BigEndian.PutUint32(req, magicExtRequest)
		binary.BigEndian.PutUint64(req[24:], uint64(bs))
	} else {
		binary.BigEndian.PutUint32(req, magicRequest)
		binary.BigEndian.PutUint32(req[24:], uint32(bs))
	}
	binary.BigEndian.PutUint16(req[6:], typ)
	if ext && typ == cmdWrite {
		binary.BigEndian.PutUint16(req[4:], cmdFlagPayloadLen)
	}
	reqLen := hl
	if typ == cmdWrite {
		reqLen += bs
	}

	sem := make(chan struct{}, depth)
	w := bufio.NewWriterSize(nc, 256<<10)
	r := bufio.NewReaderSize(c.r, 256<<10)
	rbuf := make([]byte, replyLen)
	b.SetBytes(int64(bs))
	b.ReportAllocs()
	b.ResetTimer()
	sendErr := make(chan error, 1)
	go func() {
		for i := 0; i < b.N; i++ {
			select {
			case sem <- struct{}{}:
			default:
				if err := w.Flush(); err != nil {
					sendErr <- err
					return
				}
				sem <- struct{}{}
			}
			binary.BigEndian.PutUint64(req[8:], uint64(i))
			binary.BigEndian.PutUint64(req[16:], uint64(i)*7919*uint64(bs)%size)
			w.Write(req[:reqLen])
		}
		sendErr <- w.Flush()
	}()
	for i := 0; i < b.N; i++ {
		if _, err := io.ReadFull(r, rbuf); err != nil {
			b.Fatal(err)
		}
		if e := binary.BigEndian.Uint32(rbuf[4:]); replyLen == 16 && e != 0 {
			b.Fatalf("errno %d", e)
		}
		<-sem
	}
	b.StopTimer()
	if err := <-sendErr; err != nil {
		b.Fatal(err)
	}
}
