// Package soak runs an in-process blockd under load: dozens of NBD
// connections doing verified mixed I/O on raw, luks and blkdebug-filtered
// exports while other QMP monitors add and remove nodes, exports and
// secrets. Afterwards no data may differ from the clients' models, and the
// goroutines and file descriptors of the process must be back where they
// started.
//
// SOAK_SECONDS sets the load phase (default 20 s); docs/testing.md has the
// numbers of a long run.
package soak

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"blockd/daemon"
	"blockd/drivers/blkdebug"
	"blockd/drivers/file"
	"blockd/drivers/luks"
	"blockd/drivers/null"
	"blockd/drivers/qcow2"
	"blockd/drivers/raw"
	"blockd/qmp"
	"blockd/tests/harness"
)

const (
	mib        = 1 << 20
	exportSize = 8 * mib
	perExport  = 12        // persistent connections per export
	regionSize = 640 << 10 // per connection, two workers each
	errSector  = 16256     // 7.9375 MiB on "d2": writes fail with ENOSPC
	mainPass   = "soak main passphrase"
)

type counters struct {
	ops, verified, errnos, churnConns atomic.Int64
	qmpCmds, nodes, exports, secrets  atomic.Int64
}

type soak struct {
	t     *testing.T
	dir   string
	nbd   string
	qmp   string
	c     counters
	stop  chan struct{}
	mu    sync.Mutex // protects fails
	fails []string
}

func (s *soak) failf(format string, args ...any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.fails) < 20 {
		s.fails = append(s.fails, fmt.Sprintf(format, args...))
	}
}

func (s *soak) stopped() bool {
	select {
	case <-s.stop:
		return true
	default:
		return false
	}
}

func fdCount(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	return len(ents)
}

func TestSoak(t *testing.T) {
	dur := harness.EnvDuration("SOAK_SECONDS", 20*time.Second)
	dir := t.TempDir()
	// Warm up the network poller so that its descriptor is in the baseline.
	if l, err := net.Listen("unix", filepath.Join(dir, "warm.sock")); err == nil {
		l.Close()
	}
	runtime.GC()
	baseG, baseFD := runtime.NumGoroutine(), fdCount(t)

	logs := &bytes.Buffer{}
	var logMu sync.Mutex
	lg := logrus.New()
	lg.SetOutput(lockedWriter{&logMu, logs})
	lg.SetLevel(logrus.WarnLevel)
	d := daemon.New(logrus.NewEntry(lg), file.Driver(), raw.Driver(), null.Driver(), luks.Driver(), qcow2.Driver(), blkdebug.Driver())
	s := &soak{t: t, dir: dir, nbd: filepath.Join(dir, "nbd.sock"), qmp: filepath.Join(dir, "qmp.sock"), stop: make(chan struct{})}
	l, err := qmp.ListenUnix(s.qmp)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { _ = d.QMP.Serve(l); close(served) }()

	setup := s.monitor()
	s.setup(setup)
	start := time.Now()

	var wg sync.WaitGroup
	var conns []*harness.NBD
	for e, name := range []string{"r0", "l1", "d2", "q3"} {
		for i := 0; i < perExport; i++ {
			c, err := harness.DialNBD("unix", s.nbd, name)
			if err != nil {
				t.Fatal(err)
			}
			c.Timeout = 30 * time.Second
			conns = append(conns, c)
			for w := 0; w < 2; w++ {
				wg.Add(1)
				go func(c *harness.NBD, base uint64, seed uint64) {
					defer wg.Done()
					s.worker(c, name, base, regionSize/2, seed)
				}(c, uint64(i*regionSize+w*regionSize/2), uint64(e*1000+i*10+w))
			}
		}
	}
	// d2's faulty sector, on its own connection.
	{
		c, err := harness.DialNBD("unix", s.nbd, "d2")
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		wg.Add(1)
		go func() { defer wg.Done(); s.faulty(c) }()
	}
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func(i int) { defer wg.Done(); s.churnConns(uint64(i)) }(i)
	}
	for m := 0; m < 3; m++ {
		wg.Add(1)
		go func(m int) { defer wg.Done(); s.churnQMP(m) }(m)
	}
	time.Sleep(dur)
	close(s.stop)
	wg.Wait()
	elapsed := time.Since(start)

	// Final check of every region, then a clean teardown.
	for _, c := range conns {
		if err := c.Close(); err != nil {
			s.failf("closing a connection: %v", err)
		}
	}
	var exps []map[string]any
	json.Unmarshal(harness.Must(t, setup, "query-block-exports", nil), &exps)
	if len(exps) != 4 {
		s.failf("exports left at the end: %v", exps)
	}
	harness.Must(t, setup, "nbd-server-stop", nil)
	for _, e := range []string{"r0", "l1", "d2", "q3"} {
		if _, err := setup.WaitEvent("BLOCK_EXPORT_DELETED", func(ev harness.Event) bool { return ev.Data["id"] == e }, 10*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range []string{"r0", "l1", "d2", "q3", "f1", "fq"} {
		harness.Must(t, setup, "blockdev-del", map[string]any{"node-name": n})
	}
	var nodes []map[string]any
	json.Unmarshal(harness.Must(t, setup, "query-named-block-nodes", map[string]any{"flat": true}), &nodes)
	if len(nodes) != 0 {
		s.failf("nodes left at the end: %d", len(nodes))
	}
	setup.Close()
	d.Close()
	<-served

	for _, f := range s.fails {
		t.Error(f)
	}
	t.Logf("soak: %v, %d NBD connections (+%d short-lived), %d I/O requests, %d MiB verified, %d expected errnos; %d QMP commands: %d nodes, %d exports, %d secrets added and removed",
		elapsed.Round(time.Second), len(conns), s.c.churnConns.Load(), s.c.ops.Load(), s.c.verified.Load()>>20, s.c.errnos.Load(),
		s.c.qmpCmds.Load(), s.c.nodes.Load(), s.c.exports.Load(), s.c.secrets.Load())

	// Leaks: goroutines and descriptors come back to their baseline.
	deadline := time.Now().Add(15 * time.Second)
	for {
		g, fd := runtime.NumGoroutine(), fdCount(t)
		if g <= baseG && fd <= baseFD {
			t.Logf("goroutines %d (baseline %d), file descriptors %d (baseline %d)", g, baseG, fd, baseFD)
			break
		}
		if time.Now().After(deadline) {
			var b strings.Builder
			pprof.Lookup("goroutine").WriteTo(&b, 1)
			ents, _ := os.ReadDir("/proc/self/fd")
			var fds []string
			for _, e := range ents {
				l, _ := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
				fds = append(fds, e.Name()+"->"+l)
			}
			t.Fatalf("leak: %d goroutines (baseline %d), %d descriptors (baseline %d)\n%s\n%s", g, baseG, fd, baseFD, b.String(), strings.Join(fds, "\n"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	logMu.Lock()
	defer logMu.Unlock()
	if strings.Contains(logs.String(), "panic") {
		t.Errorf("daemon log has a panic:\n%s", logs.String())
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func (s *soak) monitor() *harness.QMP {
	q, err := harness.DialQMP(s.qmp, 10*time.Second)
	if err != nil {
		s.t.Fatal(err)
	}
	q.Timeout = 60 * time.Second
	return q
}

func (s *soak) job(q *harness.QMP, args map[string]any) {
	s.t.Helper()
	e, err := harness.RunJob(q, "blockdev-create", args, 60*time.Second)
	if err != nil || e != "" {
		s.t.Fatalf("blockdev-create %v: %v %s", args, err, e)
	}
}

// setup makes the persistent exports r0 (raw), l1 (luks), d2 (raw over a
// blkdebug filter that delays every request and fails writes to one
// sector) and q3 (qcow2), and a luks and a qcow2 image per churning
// monitor.
func (s *soak) setup(q *harness.QMP) {
	t := s.t
	harness.Must(t, q, "object-add", map[string]any{"qom-type": "secret", "id": "smain", "data": mainPass})
	harness.Must(t, q, "nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": s.nbd}}, "max-connections": 200})
	img := func(name string, size int64) string {
		p := filepath.Join(s.dir, name)
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, size); err != nil {
			t.Fatal(err)
		}
		return p
	}
	r0, d2 := img("r0.img", exportSize), img("d2.img", exportSize)
	harness.Must(t, q, "blockdev-add", map[string]any{"driver": "raw", "node-name": "r0", "discard": "unmap",
		"file": map[string]any{"driver": "file", "filename": r0, "discard": "unmap"}})
	newLuks := func(node, path string) {
		s.job(q, map[string]any{"job-id": "c-" + node, "options": map[string]any{"driver": "file", "filename": path, "size": 0}})
		harness.Must(t, q, "blockdev-add", map[string]any{"driver": "file", "node-name": node, "filename": path})
		s.job(q, map[string]any{"job-id": "l-" + node, "options": map[string]any{"driver": "luks", "file": node, "size": exportSize,
			"key-secret": "smain", "iter-time": 10}})
	}
	newLuks("f1", filepath.Join(s.dir, "l1.img"))
	harness.Must(t, q, "blockdev-add", map[string]any{"driver": "luks", "node-name": "l1", "file": "f1", "key-secret": "smain"})
	harness.Must(t, q, "blockdev-add", map[string]any{"driver": "raw", "node-name": "d2", "file": map[string]any{
		"driver": "blkdebug", "image": map[string]any{"driver": "file", "filename": d2},
		"inject-error": []any{
			map[string]any{"iotype": []string{"read", "write"}, "delay-ns": 100000},
			map[string]any{"iotype": "write", "sector": errSector, "errno": 28},
		}}})
	newQcow2 := func(node, path string) {
		s.job(q, map[string]any{"job-id": "c-" + node, "options": map[string]any{"driver": "file", "filename": path, "size": 0}})
		harness.Must(t, q, "blockdev-add", map[string]any{"driver": "file", "node-name": node, "filename": path})
		s.job(q, map[string]any{"job-id": "q-" + node, "options": map[string]any{"driver": "qcow2", "file": node, "size": exportSize}})
	}
	newQcow2("fq", filepath.Join(s.dir, "q3.qcow2"))
	harness.Must(t, q, "blockdev-add", map[string]any{"driver": "qcow2", "node-name": "q3", "file": "fq"})
	for m := 0; m < 3; m++ {
		node := fmt.Sprintf("cf%d", m)
		newLuks(node, filepath.Join(s.dir, node+".luks"))
		harness.Must(t, q, "blockdev-del", map[string]any{"node-name": node})
		node = fmt.Sprintf("cq%d", m)
		newQcow2(node, filepath.Join(s.dir, node+".qcow2"))
		harness.Must(t, q, "blockdev-del", map[string]any{"node-name": node})
		img(fmt.Sprintf("c%d.img", m), 2*mib)
	}
	for _, e := range []string{"r0", "l1", "d2", "q3"} {
		harness.Must(t, q, "block-export-add", map[string]any{"type": "nbd", "id": e, "node-name": e, "name": e, "writable": true})
	}
}

// worker does random verified I/O on [base, base+size) of one connection.
func (s *soak) worker(c *harness.NBD, export string, base, size, seed uint64) {
	r := rand.New(rand.NewPCG(seed, 42))
	model := make([]byte, size)
	known := make([]bool, size/512)
	// Fill the region first so that every sector is known.
	for off := uint64(0); off < size; off += 64 << 10 {
		p := model[off : off+64<<10]
		harness.Fill(p, r.Uint64())
		if err := c.WriteAt(p, base+off, false); err != nil {
			s.failf("%s: initial write at %d: %v", export, base+off, err)
			return
		}
	}
	for i := range known {
		known[i] = true
	}
	got := make([]byte, 64<<10)
	for !s.stopped() {
		secs := 1 + r.Uint64N(128)
		off := r.Uint64N(size/512-secs+1) * 512
		n := secs * 512
		var err error
		switch x := r.IntN(100); {
		case x < 45:
			p := model[off : off+n]
			harness.Fill(p, r.Uint64())
			err = c.WriteAt(p, base+off, r.IntN(8) == 0)
			for i := off / 512; i < (off+n)/512; i++ {
				known[i] = true
			}
		case x < 85:
			if err = c.ReadAt(got[:n], base+off); err == nil {
				for i := uint64(0); i < n; i += 512 {
					if known[(off+i)/512] && !bytes.Equal(got[i:i+512], model[off+i:off+i+512]) {
						s.failf("%s: data mismatch at %d", export, base+off+i)
						return
					}
				}
				s.c.verified.Add(int64(n))
			}
		case x < 92:
			err = c.Zero(base+off, uint32(n), r.IntN(2) == 0)
			clear(model[off : off+n])
			for i := off / 512; i < (off+n)/512; i++ {
				known[i] = true
			}
		case x < 96:
			err = c.Trim(base+off, uint32(n))
			for i := off / 512; i < (off+n)/512; i++ {
				known[i] = false
			}
		default:
			err = c.Flush()
		}
		if err != nil {
			s.failf("%s: request at %d+%d: %v", export, base+off, n, err)
			return
		}
		s.c.ops.Add(1)
	}
}

// faulty writes to d2's failing sector (ENOSPC) and next to it (fine).
func (s *soak) faulty(c *harness.NBD) {
	buf := make([]byte, 4096)
	for !s.stopped() {
		if err := c.WriteAt(buf[:512], errSector*512, false); harness.ErrnoOf(err) != syscall.ENOSPC {
			s.failf("d2: write to the faulty sector: %v, want ENOSPC", err)
			return
		}
		if err := c.WriteAt(buf, (errSector+1)*512, false); err != nil {
			s.failf("d2: write next to the faulty sector: %v", err)
			return
		}
		s.c.errnos.Add(1)
		s.c.ops.Add(2)
		time.Sleep(time.Millisecond)
	}
}

// churnConns opens short connections that read a little and leave, half
// of them without NBD_CMD_DISC.
func (s *soak) churnConns(seed uint64) {
	r := rand.New(rand.NewPCG(seed, 9))
	for !s.stopped() {
		name := []string{"r0", "l1", "d2", "q3"}[r.IntN(4)]
		c, err := harness.DialNBD("unix", s.nbd, name)
		if err != nil {
			s.failf("short-lived connection to %s: %v", name, err)
			return
		}
		if _, err := c.Read(uint64(r.IntN(exportSize/4096))*4096, 4096); err != nil {
			s.failf("short-lived read on %s: %v", name, err)
		}
		if r.IntN(2) == 0 {
			c.Close()
		} else {
			c.Abort()
		}
		s.c.churnConns.Add(1)
	}
}

// churnQMP adds a secret, a node using it, an export of the node and a
// client of the export, then removes them all again, in a loop.
func (s *soak) churnQMP(m int) {
	q := s.monitor()
	defer q.Close()
	r := rand.New(rand.NewPCG(uint64(m), 3))
	exec := func(cmd string, args any) ([]byte, error) {
		s.c.qmpCmds.Add(1)
		return q.Exec(cmd, args)
	}
	must := func(cmd string, args any) bool {
		if _, err := exec(cmd, args); err != nil {
			s.failf("monitor %d: %s %v: %v", m, cmd, args, err)
			return false
		}
		return true
	}
	for i := 0; !s.stopped(); i++ {
		sec, node, exp := fmt.Sprintf("cs%d-%d", m, i), fmt.Sprintf("cn%d-%d", m, i), fmt.Sprintf("ce%d-%d", m, i)
		if !must("object-add", map[string]any{"qom-type": "secret", "id": sec, "data": mainPass}) {
			return
		}
		s.c.secrets.Add(1)
		var def map[string]any
		switch i % 3 {
		case 0:
			def = map[string]any{"driver": "luks", "node-name": node, "key-secret": sec,
				"file": map[string]any{"driver": "file", "filename": filepath.Join(s.dir, fmt.Sprintf("cf%d.luks", m))}}
		case 2:
			def = map[string]any{"driver": "qcow2", "node-name": node,
				"file": map[string]any{"driver": "file", "filename": filepath.Join(s.dir, fmt.Sprintf("cq%d.qcow2", m))}}
		default:
			def = map[string]any{"driver": "raw", "node-name": node, "file": map[string]any{"driver": "blkdebug",
				"image":        map[string]any{"driver": "file", "filename": filepath.Join(s.dir, fmt.Sprintf("c%d.img", m))},
				"inject-error": []any{map[string]any{"iotype": "read", "sector": 0, "once": true, "errno": 5}}}}
		}
		if !must("blockdev-add", def) {
			return
		}
		s.c.nodes.Add(1)
		if !must("block-export-add", map[string]any{"type": "nbd", "id": exp, "node-name": node, "name": exp, "writable": true}) {
			return
		}
		s.c.exports.Add(1)
		c, err := harness.DialNBD("unix", s.nbd, exp)
		if err != nil {
			s.failf("monitor %d: connecting to %s: %v", m, exp, err)
			return
		}
		p := make([]byte, 4096)
		harness.Fill(p, uint64(i))
		if err := c.WriteAt(p, 8192, true); err != nil {
			s.failf("monitor %d: write to %s: %v", m, exp, err)
		}
		if got, err := c.Read(8192, 4096); err != nil || !bytes.Equal(got, p) {
			s.failf("monitor %d: read back from %s: %v", m, exp, err)
		}
		if i%3 == 1 {
			// The once rule: the first read of sector 0 fails, the next works.
			if _, err := c.Read(0, 512); harness.ErrnoOf(err) != syscall.EIO {
				s.failf("monitor %d: first read of sector 0 on %s: %v, want EIO", m, exp, err)
			}
			if _, err := c.Read(0, 512); err != nil {
				s.failf("monitor %d: second read of sector 0 on %s: %v", m, exp, err)
			}
		}
		for _, qc := range []string{"query-named-block-nodes", "query-block-exports", "query-jobs"} {
			must(qc, nil)
		}
		hard := r.IntN(2) == 0
		if hard {
			// Remove the export under a connected client.
			must("block-export-del", map[string]any{"id": exp, "mode": "hard"})
		} else {
			// Close sends NBD_CMD_DISC and returns once the server has
			// closed the connection; by then the client has left the
			// export, so a safe removal must succeed at once.
			if err := c.Close(); err != nil {
				s.failf("monitor %d: disconnect from %s: %v", m, exp, err)
				return
			}
			if _, err := exec("block-export-del", map[string]any{"id": exp}); err != nil {
				s.failf("monitor %d: block-export-del %s right after the client saw its connection closed: %v", m, exp, err)
				return
			}
		}
		if _, err := q.WaitEvent("BLOCK_EXPORT_DELETED", func(ev harness.Event) bool { return ev.Data["id"] == exp }, 10*time.Second); err != nil {
			s.failf("monitor %d: %v", m, err)
			return
		}
		if hard {
			if _, err := c.Read(0, 512); err == nil {
				s.failf("monitor %d: a client of a hard-removed export still reads", m)
			}
			c.Abort()
		}
		if !must("blockdev-del", map[string]any{"node-name": node}) || !must("object-del", map[string]any{"id": sec}) {
			return
		}
	}
}
