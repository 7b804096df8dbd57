// Package torture kills blockd with SIGKILL at random moments while a
// verified write workload runs over NBD (and, for LUKS images, keyslots are
// added and erased with x-blockdev-amend), restarts it, and checks that the
// image opens, that cryptsetup finds the LUKS header intact, and that every
// write acknowledged with FUA or before a completed flush reads back.
//
// The run is bounded by TORTURE_SECONDS (default 40) or, when set,
// TORTURE_CYCLES; docs/testing.md has the numbers of a long run.
package torture

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"blockd/internal/testutil"
	"blockd/tests/harness"
)

var blockdBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "blockd-torture")
	if err != nil {
		panic(err)
	}
	blockdBin, err = harness.Build(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

const (
	blockSize   = 4096
	sectorSize  = 512
	sectorsPerB = blockSize / sectorSize
	payloadSize = 16 << 20
	nBlocks     = payloadSize / blockSize
	nSectors    = payloadSize / sectorSize
	extraSlots  = 3 // keyslots 1..3 are added and erased; 0 holds the main passphrase
)

var magic = [8]byte{'T', 'O', 'R', 'T', 'U', 'R', 'E', '1'}

// sectorData fills p (one sector) with the content of version seq of
// sector s.
func sectorData(p []byte, s int, seq uint64) {
	copy(p, magic[:])
	binary.LittleEndian.PutUint64(p[8:], uint64(s))
	binary.LittleEndian.PutUint64(p[16:], seq)
	harness.Fill(p[24:], uint64(s)<<40^seq)
}

// decode returns the version a sector holds, or 0 if it holds no valid
// version of sector s.
func decode(p []byte, s int) uint64 {
	if !bytes.Equal(p[:8], magic[:]) || binary.LittleEndian.Uint64(p[8:]) != uint64(s) {
		return 0
	}
	seq := binary.LittleEndian.Uint64(p[16:])
	var want [sectorSize]byte
	sectorData(want[:], s, seq)
	if !bytes.Equal(p, want[:]) {
		return 0
	}
	return seq
}

func hashOf(p []byte) uint64 {
	h := fnv.New64a()
	h.Write(p)
	return h.Sum64()
}

// version is one write to a block, in issue order.
type version struct {
	seq    uint64
	acked  bool
	serial uint64 // acknowledgement order
}

// model is what the image may contain. All fields are protected by mu.
type model struct {
	mu       sync.Mutex
	base     [nSectors]uint64 // content at the last restart: a version, or
	baseHash [nSectors]uint64 // when base is 0, the hash of whatever was there
	hist     [nBlocks][]version
	durable  [nBlocks]int // index in hist of the newest durable version, -1: base
	busy     [nBlocks]bool
	pending  []pendingAck // acked, not yet durable
	serial   uint64
	seq      uint64
}

type pendingAck struct {
	block, idx int
	serial     uint64
}

func newModel() *model {
	m := &model{}
	for i := range m.durable {
		m.durable[i] = -1
	}
	return m
}

// stats are the numbers a run reports.
type stats struct {
	cycles, startupKills                  int
	writes, acked, fua, flushes, reads    atomic.Int64
	durableChecked, unflushedSurvived     int64
	amends, amendsInFlight, headerResyncs int
	brokenAfterErase                      int
	qcow2Checks, qcow2Leaks               int
}

type slotState int

const (
	slotInactive slotState = iota
	slotActive
	slotBroken // enabled, but its key material was wiped (interrupted erase)
)

type config struct {
	name     string
	luks     string // "", "luks1", "luks2"
	detached bool
	// qcow2: the image file is qcow2 (under the luks node, if any);
	// qemu-img check runs after every kill. Keyslots of LUKS inside qcow2
	// are not amended (cryptsetup cannot read the header there).
	qcow2 bool

	dir, img, hdr string
	pw            [extraSlots + 1]string
	m             *model
	verified      bool // the model holds the image's content
	st            stats
	slots         [extraSlots + 1]slotState
	// inflight is the amend in progress on each slot when the daemon was
	// killed: "add", "erase" or "".
	inflight [extraSlots + 1]string
}

func (c *config) blockdev() string {
	file := fmt.Sprintf(`{"driver":"file","filename":%q}`, c.img)
	// LUKS metadata writes go through a blkdebug filter that makes each
	// write of a header copy (sector 0, and sector 32 for LUKS2's second
	// copy) take 25 ms, so that kills land inside keyslot updates more
	// often: between the key material and the header, or between the two
	// LUKS2 copies.
	slow := `{"iotype":"write","sector":0,"delay-ns":25000000}`
	if c.luks == "luks2" {
		slow += `,{"iotype":"write","sector":32,"delay-ns":25000000}`
	}
	filter := func(img string) string {
		return `{"driver":"blkdebug","image":` + img + `,"inject-error":[` + slow + `]}`
	}
	switch {
	case c.qcow2 && c.luks == "":
		return `{"driver":"qcow2","node-name":"disk","file":` + file + `}`
	case c.qcow2:
		return `{"driver":"luks","node-name":"disk","key-secret":"s0","file":{"driver":"qcow2","file":` + file + `}}`
	case c.luks == "":
		return `{"driver":"raw","node-name":"disk","file":` + file + `}`
	case c.detached:
		hdr := fmt.Sprintf(`{"driver":"file","filename":%q}`, c.hdr)
		return fmt.Sprintf(`{"driver":"luks","node-name":"disk","key-secret":"s0","file":%s,"header":%s}`, file, filter(hdr))
	default:
		return `{"driver":"luks","node-name":"disk","key-secret":"s0","file":` + filter(file) + `}`
	}
}

func (c *config) setup(t *testing.T) {
	c.dir = t.TempDir()
	c.img = filepath.Join(c.dir, "disk.img")
	c.m = newModel()
	for i := range c.pw {
		c.pw[i] = filepath.Join(c.dir, fmt.Sprintf("pw%d", i))
		os.WriteFile(c.pw[i], []byte(fmt.Sprintf("torture passphrase %d", i)), 0o600)
	}
	size := int64(payloadSize)
	var args []string
	switch {
	case c.luks == "":
	case c.detached:
		c.hdr = filepath.Join(c.dir, "disk.hdr")
		args = []string{"--header", c.hdr}
	case c.luks == "luks1":
		size += 2 << 20
	default:
		size += 2 << 20
		args = []string{"--luks2-metadata-size", "16k", "--luks2-keyslots-size", "1m", "--offset", "4096"}
	}
	if err := os.WriteFile(c.img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(c.img, size); err != nil {
		t.Fatal(err)
	}
	if c.luks != "" {
		base := []string{"luksFormat", "-q", "--type", c.luks, "--pbkdf-force-iterations", "1000", "--key-file", c.pw[0]}
		if c.luks == "luks2" {
			base = append(base, "--pbkdf", "pbkdf2")
		}
		testutil.Run(t, "cryptsetup", append(append(base, args...), c.img)...)
	}
	if c.qcow2 {
		// qemu-img makes the qcow2 image, with the LUKS volume (if any)
		// as its guest content.
		raw := c.img + ".raw"
		if err := os.Rename(c.img, raw); err != nil {
			t.Fatal(err)
		}
		testutil.Run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, c.img)
		os.Remove(raw)
	}
}

// checkQcow2 runs qemu-img check on the image of a killed daemon: leaks
// are allowed after a crash, corruption is not.
func (c *config) checkQcow2(t *testing.T) {
	if !c.qcow2 {
		return
	}
	out, err := exec.Command("qemu-img", "check", "-f", "qcow2", "--output=json", c.img).Output()
	var res struct {
		Corruptions int `json:"corruptions"`
		Leaks       int `json:"leaks"`
		CheckErrors int `json:"check-errors"`
	}
	if jerr := json.Unmarshal(out, &res); jerr != nil {
		t.Fatalf("%s: qemu-img check: %v %v\n%s", c.name, err, jerr, out)
	}
	if res.Corruptions != 0 || res.CheckErrors != 0 {
		t.Fatalf("%s: qemu-img check after a crash: %d corruptions, %d check errors\n%s", c.name, res.Corruptions, res.CheckErrors, out)
	}
	c.st.qcow2Checks++
	c.st.qcow2Leaks += res.Leaks
}

func (c *config) args() []string {
	a := []string{}
	for i, pw := range c.pw {
		a = append(a, "--object", fmt.Sprintf("secret,id=s%d,file=%s", i, pw))
	}
	return append(a, "--blockdev", c.blockdev(),
		"--nbd-server", "addr.type=unix,addr.path="+filepath.Join(c.dir, "nbd.sock"),
		"--export", "type=nbd,id=e0,node-name=disk,name=disk,writable=on")
}

func (c *config) dial(p *harness.Proc) (*harness.NBD, error) {
	deadline := time.Now().Add(15 * time.Second)
	for {
		n, err := harness.DialNBD("unix", filepath.Join(c.dir, "nbd.sock"), "disk")
		if err == nil {
			n.Timeout = 30 * time.Second
			return n, nil
		}
		if p.Exited() {
			return nil, fmt.Errorf("blockd exited during startup: %s", p.Logs())
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("NBD not ready: %v\n%s", err, p.Logs())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// verify reads the whole image and checks every sector against the model,
// then makes what it read the new base.
func (c *config) verify(t *testing.T, n *harness.NBD, first bool) {
	if n.Size != payloadSize {
		t.Fatalf("%s: export size %d, want %d", c.name, n.Size, payloadSize)
	}
	const chunk = 1 << 20
	data := make([]byte, payloadSize)
	var wg sync.WaitGroup
	errs := make(chan error, payloadSize/chunk)
	for off := 0; off < payloadSize; off += chunk {
		wg.Add(1)
		go func(off int) {
			defer wg.Done()
			if err := n.ReadAt(data[off:off+chunk], uint64(off)); err != nil {
				errs <- err
			}
		}(off)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("%s: reading the image after restart: %v", c.name, err)
	}
	m := c.m
	m.mu.Lock()
	defer m.mu.Unlock()
	bad := 0
	for b := 0; b < nBlocks; b++ {
		h := m.hist[b]
		d := m.durable[b]
		for i := 0; i < sectorsPerB; i++ {
			s := b*sectorsPerB + i
			p := data[s*sectorSize : (s+1)*sectorSize]
			got := decode(p, s)
			ok := false
			switch {
			case first:
				ok = true
			case got == 0:
				// Only the base content, if nothing durable replaced it.
				ok = d == -1 && m.base[s] == 0 && m.baseHash[s] == hashOf(p)
			default:
				if d == -1 && got == m.base[s] {
					ok = true
				}
				for j := max(d, 0); j < len(h) && !ok; j++ {
					ok = h[j].seq == got
				}
			}
			if !ok {
				bad++
				if bad <= 10 {
					durable := "base"
					if d >= 0 {
						durable = fmt.Sprint(h[d].seq)
					}
					t.Errorf("%s: sector %d (block %d) holds version %d; durable version %s; history %v", c.name, s, b, got, durable, h)
				}
				continue
			}
			if d >= 0 {
				c.st.durableChecked++
			}
			if got != 0 && d >= 0 {
				for j := d + 1; j < len(h); j++ {
					if h[j].seq == got && h[j].acked {
						c.st.unflushedSurvived++
					}
				}
			}
			m.base[s] = got
			m.baseHash[s] = hashOf(p)
		}
		m.hist[b] = nil
		m.durable[b] = -1
	}
	m.pending = nil
	if bad > 0 {
		t.Fatalf("%s: %d sectors lost acknowledged data or hold garbage", c.name, bad)
	}
}

// pick reserves a free run of 1..16 blocks.
func (m *model) pick(r *rand.Rand) (int, int) {
	for {
		l := 1 + r.IntN(16)
		b := r.IntN(nBlocks - l + 1)
		m.mu.Lock()
		free := true
		for i := b; i < b+l; i++ {
			if m.busy[i] {
				free = false
				break
			}
		}
		if free {
			for i := b; i < b+l; i++ {
				m.busy[i] = true
			}
			m.mu.Unlock()
			return b, l
		}
		m.mu.Unlock()
	}
}

func (m *model) release(b, l int) {
	m.mu.Lock()
	for i := b; i < b+l; i++ {
		m.busy[i] = false
	}
	m.mu.Unlock()
}

// writer issues verified writes and reads until the connection fails.
func (c *config) writer(t *testing.T, n *harness.NBD, seed uint64, failed *atomic.Bool) {
	r := rand.New(rand.NewPCG(seed, seed^0x5eed))
	m := c.m
	buf := make([]byte, 16*blockSize)
	for !failed.Load() {
		b, l := m.pick(r)
		p := buf[:l*blockSize]
		if r.IntN(5) == 0 {
			// Read back: a block that is not being written holds its newest
			// acknowledged version.
			c.st.reads.Add(1)
			if err := n.ReadAt(p, uint64(b*blockSize)); err != nil {
				m.release(b, l)
				return
			}
			m.mu.Lock()
			for i := 0; i < l*sectorsPerB; i++ {
				s := b*sectorsPerB + i
				want := m.base[s]
				if h := m.hist[b+i/sectorsPerB]; len(h) > 0 {
					want = h[len(h)-1].seq
				}
				if got := decode(p[i*sectorSize:(i+1)*sectorSize], s); got != want || (want == 0 && hashOf(p[i*sectorSize:(i+1)*sectorSize]) != m.baseHash[s]) {
					t.Errorf("%s: live read of sector %d: version %d, want %d", c.name, s, got, want)
					failed.Store(true)
				}
			}
			m.mu.Unlock()
			m.release(b, l)
			continue
		}
		m.mu.Lock()
		m.seq++
		seq := m.seq
		idx := make([]int, l)
		for i := 0; i < l; i++ {
			m.hist[b+i] = append(m.hist[b+i], version{seq: seq})
			idx[i] = len(m.hist[b+i]) - 1
		}
		m.mu.Unlock()
		for i := 0; i < l*sectorsPerB; i++ {
			sectorData(p[i*sectorSize:(i+1)*sectorSize], b*sectorsPerB+i, seq)
		}
		fua := r.IntN(5) == 0
		c.st.writes.Add(1)
		err := n.WriteAt(p, uint64(b*blockSize), fua)
		if err != nil {
			m.release(b, l)
			return // killed: the write stays unacknowledged
		}
		c.st.acked.Add(1)
		if fua {
			c.st.fua.Add(1)
		}
		m.mu.Lock()
		m.serial++
		for i := 0; i < l; i++ {
			v := &m.hist[b+i][idx[i]]
			v.acked, v.serial = true, m.serial
			if fua {
				m.durable[b+i] = max(m.durable[b+i], idx[i])
			} else {
				m.pending = append(m.pending, pendingAck{b + i, idx[i], m.serial})
			}
		}
		m.mu.Unlock()
		m.release(b, l)
	}
}

// flusher flushes now and then; a completed flush makes durable every
// write acknowledged before it was sent, on any connection (the export
// advertises NBD_FLAG_CAN_MULTI_CONN).
func (c *config) flusher(n *harness.NBD, r *rand.Rand, failed *atomic.Bool) {
	m := c.m
	for !failed.Load() {
		time.Sleep(time.Duration(5+r.IntN(40)) * time.Millisecond)
		m.mu.Lock()
		upTo := m.serial
		m.mu.Unlock()
		if err := n.Flush(); err != nil {
			return
		}
		c.st.flushes.Add(1)
		m.mu.Lock()
		rest := m.pending[:0]
		for _, p := range m.pending {
			if p.serial <= upTo {
				m.durable[p.block] = max(m.durable[p.block], p.idx)
			} else {
				rest = append(rest, p)
			}
		}
		m.pending = rest
		m.mu.Unlock()
	}
}

// amender adds and erases keyslots 1..3 until the daemon dies.
func (c *config) amender(t *testing.T, q *harness.QMP, r *rand.Rand, failed *atomic.Bool, cycle int) {
	for i := 0; !failed.Load(); i++ {
		slot := 1 + r.IntN(extraSlots)
		opts := map[string]any{"driver": "luks", "keyslot": slot}
		op := "add"
		if c.slots[slot] == slotInactive {
			opts["state"], opts["new-secret"], opts["iter-time"], opts["pbkdf"] = "active", fmt.Sprintf("s%d", slot), 5, "pbkdf2"
		} else {
			op = "erase"
			opts["state"] = "inactive"
		}
		c.inflight[slot] = op
		jobErr, err := harness.RunJob(q, "x-blockdev-amend", map[string]any{"job-id": fmt.Sprintf("a%d-%d", cycle, i), "node-name": "disk", "options": opts}, 30*time.Second)
		if err != nil {
			return // killed: the outcome is open
		}
		if jobErr != "" {
			t.Errorf("%s: amend %s keyslot %d: %s", c.name, op, slot, jobErr)
			failed.Store(true)
			return
		}
		c.inflight[slot] = ""
		c.st.amends++
		if op == "add" {
			c.slots[slot] = slotActive
		} else {
			c.slots[slot] = slotInactive
		}
		time.Sleep(time.Duration(r.IntN(30)) * time.Millisecond)
	}
}

// checkHeader runs cryptsetup on a copy of the LUKS header (cryptsetup
// repairs headers it can write to) and compares every keyslot with what
// the amend jobs acknowledged.
func (c *config) checkHeader(t *testing.T) {
	if c.luks == "" || c.qcow2 {
		return
	}
	src, n := c.img, int64(2<<20)
	if c.detached {
		src = c.hdr
		st, err := os.Stat(src)
		if err != nil {
			t.Fatal(err)
		}
		n = st.Size()
	}
	f, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, n)
	_, err = f.ReadAt(b, 0)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	cp := filepath.Join(c.dir, "hdr.copy")
	if err := os.WriteFile(cp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cryptsetup", "luksDump", cp).CombinedOutput(); err != nil {
		t.Fatalf("%s: cryptsetup luksDump after a crash: %v\n%s", c.name, err, out)
	}
	if after, _ := os.ReadFile(cp); !bytes.Equal(after, b) {
		// LUKS2 keeps two metadata copies; a crash between their writes
		// leaves them out of step and cryptsetup rewrites the older one.
		c.st.headerResyncs++
		if c.luks != "luks2" {
			t.Errorf("%s: cryptsetup changed a LUKS1 header while dumping it", c.name)
		}
	}
	for slot := 0; slot <= extraSlots; slot++ {
		cmd := exec.Command("cryptsetup", "open", "--test-passphrase", "--key-slot", fmt.Sprint(slot), "--key-file", c.pw[slot], cp)
		err := cmd.Run()
		rc := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			rc = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		var got slotState
		switch rc {
		case 0:
			got = slotActive
		case 1:
			got = slotInactive // "No usable keyslot is available"
		case 2:
			got = slotBroken // "No key available with this passphrase"
		default:
			t.Fatalf("%s: cryptsetup open --test-passphrase -S %d: exit %d", c.name, slot, rc)
		}
		if slot == 0 {
			if got != slotActive {
				t.Fatalf("%s: the main passphrase no longer opens the volume (state %d)", c.name, got)
			}
			continue
		}
		want := c.slots[slot]
		switch c.inflight[slot] {
		case "":
			if got != want {
				t.Errorf("%s: keyslot %d is in state %d, want %d (no amend was in flight)", c.name, slot, got, want)
			}
		case "add":
			c.st.amendsInFlight++
			if got == slotBroken {
				t.Errorf("%s: an interrupted keyslot add left keyslot %d enabled without usable key material", c.name, slot)
			}
		case "erase":
			c.st.amendsInFlight++
			if got == slotBroken {
				// cryptsetup's luksKillSlot has the same order: the material
				// is wiped before the header disables the slot.
				c.st.brokenAfterErase++
			}
		}
		c.slots[slot] = got
		c.inflight[slot] = ""
	}
}

func (c *config) cycle(t *testing.T, r *rand.Rand, n int) {
	p, err := harness.Start(blockdBin, c.dir, c.args()...)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if !p.Exited() {
			p.Kill()
		}
	}()
	if r.IntN(10) == 0 {
		// Kill during startup (opening the image, binding sockets).
		time.Sleep(time.Duration(r.IntN(40)) * time.Millisecond)
		p.Kill()
		c.st.startupKills++
		c.checkQcow2(t)
		return
	}
	conn, err := c.dial(p)
	if err != nil {
		t.Fatalf("%s cycle %d: %v", c.name, n, err)
	}
	c.verify(t, conn, !c.verified)
	c.verified = true
	c.checkHeader(t)
	conn2, err := c.dial(p)
	if err != nil {
		t.Fatalf("%s cycle %d: %v", c.name, n, err)
	}
	if conn.Flags&harness.TFlagMultiConn == 0 {
		t.Fatalf("%s: export does not advertise multi-conn", c.name)
	}
	var q *harness.QMP
	if c.luks != "" && !c.qcow2 {
		if q, err = p.QMP(10 * time.Second); err != nil {
			t.Fatal(err)
		}
		defer q.Close()
	}
	var failed atomic.Bool
	var wg sync.WaitGroup
	for i, nc := range []*harness.NBD{conn, conn, conn2, conn2} {
		wg.Add(1)
		go func(i int, nc *harness.NBD) {
			defer wg.Done()
			c.writer(t, nc, uint64(n)<<8|uint64(i), &failed)
		}(i, nc)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		c.flusher(conn2, rand.New(rand.NewPCG(uint64(n), 7)), &failed)
	}()
	if q != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.amender(t, q, rand.New(rand.NewPCG(uint64(n), 11)), &failed, n)
		}()
	}
	run := time.Duration(20+r.IntN(600)) * time.Millisecond
	if r.IntN(4) == 0 {
		// Long enough for keyslot updates (their KDF benchmark alone takes
		// a few hundred ms) to complete now and then.
		run = time.Duration(1000+r.IntN(2500)) * time.Millisecond
	}
	select {
	case <-time.After(run):
	case <-p.Done():
		t.Fatalf("%s: blockd exited on its own during the workload:\n%s", c.name, p.Logs())
	}
	p.Kill()
	failed.Store(true)
	wg.Wait()
	conn.Abort()
	conn2.Abort()
	if strings.Contains(p.Logs(), "panic") {
		t.Fatalf("%s: blockd panicked:\n%s", c.name, p.Logs())
	}
	c.checkQcow2(t)
}

// final restarts the daemon once more, verifies, and stops it cleanly.
func (c *config) final(t *testing.T) {
	p, err := harness.Start(blockdBin, c.dir, c.args()...)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := c.dial(p)
	if err != nil {
		t.Fatal(err)
	}
	c.verify(t, conn, false)
	c.checkHeader(t)
	conn.Close()
	if err := p.Stop(10 * time.Second); err != nil {
		t.Fatalf("%v\n%s", err, p.Logs())
	}
	c.checkQcow2(t)
}

func TestCrashTorture(t *testing.T) {
	testutil.NeedTool(t, "cryptsetup")
	testutil.NeedTool(t, "qemu-img")
	maxCycles := harness.EnvInt("TORTURE_CYCLES", 0)
	dur := harness.EnvDuration("TORTURE_SECONDS", 40*time.Second)
	if maxCycles > 0 && os.Getenv("TORTURE_SECONDS") == "" {
		dur = 1000 * time.Hour
	}
	configs := []*config{
		{name: "raw"},
		{name: "luks1", luks: "luks1"},
		{name: "luks2", luks: "luks2"},
		{name: "luks2-detached", luks: "luks2", detached: true},
		{name: "qcow2", qcow2: true},
		{name: "luks-over-qcow2", luks: "luks1", qcow2: true},
	}
	for _, c := range configs {
		c.setup(t)
	}
	seed := uint64(time.Now().UnixNano())
	if s := harness.EnvInt("TORTURE_SEED", 0); s > 0 {
		seed = uint64(s)
	}
	t.Logf("seed %d (TORTURE_SEED)", seed)
	r := rand.New(rand.NewPCG(seed, 1))
	start := time.Now()
	total := 0
	for ; time.Since(start) < dur && (maxCycles == 0 || total < maxCycles); total++ {
		c := configs[total%len(configs)]
		c.cycle(t, r, c.st.cycles)
		c.st.cycles++
		if t.Failed() {
			break
		}
	}
	for _, c := range configs {
		if c.st.cycles > 0 && !t.Failed() {
			c.final(t)
		}
	}
	summary := map[string]any{"seconds": int(time.Since(start).Seconds()), "cycles": total}
	for _, c := range configs {
		st := &c.st
		t.Logf("%-15s cycles %4d (startup kills %d), writes %6d acked %6d (FUA %d), flushes %5d, reads %5d, durable sectors verified %8d, acked-unflushed sectors that survived %7d, amends %4d (%d interrupted, %d left a wiped slot enabled), LUKS2 header copies resynced %d, qemu-img checks %d (leaked clusters %d)",
			c.name, st.cycles, st.startupKills, st.writes.Load(), st.acked.Load(), st.fua.Load(), st.flushes.Load(), st.reads.Load(),
			st.durableChecked, st.unflushedSurvived, st.amends, st.amendsInFlight, st.brokenAfterErase, st.headerResyncs, st.qcow2Checks, st.qcow2Leaks)
		summary[c.name] = map[string]int64{"cycles": int64(st.cycles), "startup-kills": int64(st.startupKills), "writes": st.writes.Load(),
			"acked": st.acked.Load(), "fua": st.fua.Load(), "flushes": st.flushes.Load(), "durable-sectors-verified": st.durableChecked,
			"amends": int64(st.amends), "amends-interrupted": int64(st.amendsInFlight), "header-resyncs": int64(st.headerResyncs),
			"wiped-slot-enabled": int64(st.brokenAfterErase), "qemu-img-checks": int64(st.qcow2Checks), "qcow2-leaks": int64(st.qcow2Leaks),
			"acked-unflushed-survived": st.unflushedSurvived}
	}
	if f := os.Getenv("TORTURE_REPORT"); f != "" {
		b, _ := json.MarshalIndent(summary, "", "  ")
		os.WriteFile(f, b, 0o644)
	}
}
