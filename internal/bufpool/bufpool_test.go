package bufpool

import "testing"

func TestGetPut(t *testing.T) {
	for _, n := range []int{0, 1, 4095, 4096, 4097, 65536, 1<<20 + 1, Max, Max + 1} {
		bp := Get(n)
		if len(*bp) != n {
			t.Fatalf("Get(%d): len %d", n, len(*bp))
		}
		if c := cap(*bp); n <= Max && (c < n || c > max(2*n, 4096)) {
			t.Fatalf("Get(%d): cap %d", n, c)
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
	Put(Get(8192))
	if a := testing.AllocsPerRun(100, func() { Put(Get(5000)) }); a != 0 {
		t.Errorf("%v allocations per Get/Put", a)
	}
}
