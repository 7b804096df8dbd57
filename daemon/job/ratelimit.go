package job

import (
	"sync"
	"time"
)

// SliceTime is BLOCK_JOB_SLICE_TIME: block jobs are rate-limited in
// slices of 100 ms.
const SliceTime = 100 * time.Millisecond

// rateLimit is QEMU's RateLimit (include/qemu/ratelimit.h): a quota of
// units per slice; going over it extends the slice, and the caller waits
// for the extended slice to end.
type rateLimit struct {
	mu         sync.Mutex // protects the fields below
	now        func() time.Time
	sliceStart time.Time
	sliceEnd   time.Time
	quota      uint64 // units per slice; 0: no limit
	slice      time.Duration
	dispatched uint64
}

func newRateLimit() *rateLimit { return &rateLimit{now: time.Now} }

// setSpeed is ratelimit_set_speed: speed units per second, 0 for none.
func (r *rateLimit) setSpeed(speed uint64, slice time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.slice = slice
	if speed == 0 {
		r.quota = 0
		return
	}
	q := float64(speed) * float64(slice) / float64(time.Second)
	if q < 1 {
		q = 1
	}
	r.quota = uint64(q)
}

// delay is ratelimit_calculate_delay: record n more units and return how
// long to wait before the next request (0: none).
func (r *rateLimit) delay(n uint64) time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.quota == 0 {
		return 0
	}
	now := r.now()
	if r.sliceEnd.Before(now) {
		// The previous, possibly extended, slice is over.
		r.sliceStart = now
		r.sliceEnd = now.Add(r.slice)
		r.dispatched = 0
	}
	r.dispatched += n
	if r.dispatched < r.quota {
		return 0
	}
	slices := float64(r.dispatched) / float64(r.quota)
	r.sliceEnd = r.sliceStart.Add(time.Duration(slices * float64(r.slice)))
	return r.sliceEnd.Sub(now)
}
