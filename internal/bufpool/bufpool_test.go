package bufpool

import (
	"errors"
	"fmt"
	"os"
	"testing"
	"time"
)

func TestGetPut(t *testing.T) {
	for _, n := range []int{0, 1, 4095, 4096, 4097, 65535, 65536, 65537, 1<<20 + 1, Max, Max + 1} {
		bp := Get(n)
		if len(*bp) != n {
			t.Fatalf("Get(%d): len %d", n, len(*bp))
		}
		if c := cap(*bp); n <= Max && (c < n || c > max(2*n, 4096)) {
			t.Fatalf("Get(%d): cap %d", n, c)
		}
		if c := cap(*bp); c != Cap(n) {
			t.Fatalf("Get(%d): cap %d, Cap says %d", n, c, Cap(n))
		}
		(*bp)[:cap(*bp)][cap(*bp)-1] = 1
		Put(bp)
	}
	Put(nil)
}

func TestNoAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("sync.Pool drops some buffers on purpose under the race detector")
	}
	for _, n := range []int{5000, 100 << 10, 3 << 20} {
		Put(Get(n))
		if a := testing.AllocsPerRun(100, func() { Put(Get(n)) }); a != 0 {
			t.Errorf("%v allocations per Get/Put of %d bytes", a, n)
		}
	}
}

// shortIdle makes the large free lists trim every d for one test.
func shortIdle(t *testing.T, d time.Duration) {
	large.mu.Lock()
	old := idlePeriod
	idlePeriod = d
	large.mu.Unlock()
	// Start with empty free lists: the first trim marks every idle buffer
	// unused, the second unmaps them.
	trim()
	trim()
	t.Cleanup(func() {
		large.mu.Lock()
		idlePeriod = old
		large.mu.Unlock()
	})
}

func waitStats(t *testing.T, what string, ok func(Stats) bool) Stats {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		s := ReadStats()
		if ok(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: stats %+v", what, s)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// rss returns the process's resident memory in bytes.
func rss(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		t.Fatal(err)
	}
	var size, res int64
	if _, err := fmt.Sscan(string(b), &size, &res); err != nil {
		t.Fatal(err)
	}
	return res * int64(os.Getpagesize())
}

var errNoMem = errors.New("cannot allocate memory")

func TestLargeBuffersReleasedWhenIdle(t *testing.T) {
	shortIdle(t, 50*time.Millisecond)
	base := ReadStats()
	rss0 := rss(t)
	// A burst: 8 buffers of 32 MiB at once, touched as reads fill them.
	var held []*[]byte
	for range 8 {
		bp := Get(Max)
		for i := 0; i < len(*bp); i += 4096 {
			(*bp)[i] = 1
		}
		held = append(held, bp)
	}
	ResetPeak()
	s := ReadStats()
	if s.InUse-base.InUse != 8*Max || s.Peak != s.InUse {
		t.Fatalf("after Get: %+v (before %+v)", s, base)
	}
	rss1 := rss(t)
	for _, bp := range held {
		Put(bp)
		Put(bp) // a second Put is ignored
	}
	s = ReadStats()
	if s.InUse != base.InUse || s.Idle-base.Idle != 8*Max {
		t.Fatalf("after Put: %+v (before %+v)", s, base)
	}
	// Reused while busy...
	bp := Get(Max - 1)
	if got := ReadStats(); got.Idle != s.Idle-Max {
		t.Fatalf("Get did not reuse an idle buffer: %+v", got)
	}
	Put(bp)
	// ...and given back when idle: the pool's count and the process's
	// resident memory drop.
	waitStats(t, "idle buffers kept", func(s Stats) bool { return s.Idle == 0 })
	if rss2 := rss(t); rss1-rss0 < 200<<20 || rss1-rss2 < 200<<20 {
		t.Errorf("resident memory %d MiB before, %d MiB with buffers, %d MiB after", rss0>>20, rss1>>20, rss2>>20)
	}
}

func TestSteadyUseKeepsBuffers(t *testing.T) {
	shortIdle(t, 50*time.Millisecond)
	waitStats(t, "idle buffers kept", func(s Stats) bool { return s.Idle == 0 })
	// Two buffers in use at a time, for several periods: the free list
	// dips to zero in every period, so nothing is unmapped.
	a, b := Get(1<<20), Get(1<<20)
	Put(a)
	Put(b)
	deadline := time.Now().Add(300 * time.Millisecond)
	for time.Now().Before(deadline) {
		a, b = Get(1<<20), Get(1<<20)
		time.Sleep(time.Millisecond)
		Put(a)
		Put(b)
		if s := ReadStats(); s.Idle != 2<<20 {
			t.Fatalf("steady use: %+v", s)
		}
	}
	waitStats(t, "idle buffers kept", func(s Stats) bool { return s.Idle == 0 })
}

func TestMappingFailureFallsBackToHeap(t *testing.T) {
	shortIdle(t, 50*time.Millisecond)
	mmapAnon = func(int) ([]byte, error) { return nil, errNoMem }
	defer func() { mmapAnon = mmapAnonymous }()
	before := ReadStats()
	bp := Get(1 << 20)
	if len(*bp) != 1<<20 || cap(*bp) != 1<<20 {
		t.Fatalf("len %d cap %d", len(*bp), cap(*bp))
	}
	Put(bp) // left to the garbage collector, never unmapped
	if s := ReadStats(); s != before {
		t.Fatalf("stats %+v, before %+v", s, before)
	}
}
