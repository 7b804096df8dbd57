//go:build !linux

package luksfmt

import "time"

// cpuClock falls back to wall time where per-thread CPU time is not
// available.
type cpuClock struct{ wall time.Time }

func startClock() *cpuClock { return &cpuClock{wall: time.Now()} }

func (c *cpuClock) elapsed() time.Duration { return time.Since(c.wall) }

// physMemoryKiB returns 0: unknown.
func physMemoryKiB() uint64 { return 0 }
