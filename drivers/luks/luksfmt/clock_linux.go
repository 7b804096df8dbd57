package luksfmt

import (
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// cpuClock measures the CPU time of the calling goroutine's OS thread, which
// it keeps locked until elapsed is called.
type cpuClock struct {
	start time.Duration
	wall  time.Time
	ok    bool
}

func threadCPU() (time.Duration, bool) {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		return 0, false
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), true
}

func startClock() *cpuClock {
	runtime.LockOSThread()
	c := &cpuClock{wall: time.Now()}
	c.start, c.ok = threadCPU()
	return c
}

// elapsed returns the CPU time used since startClock (wall time when the
// CPU clock is unavailable or reports nothing).
func (c *cpuClock) elapsed() time.Duration {
	defer runtime.UnlockOSThread()
	if c.ok {
		if now, ok := threadCPU(); ok && now > c.start {
			return now - c.start
		}
	}
	return time.Since(c.wall)
}

// physMemoryKiB returns the machine's RAM in KiB, or 0 if unknown.
func physMemoryKiB() uint64 {
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return 0
	}
	return uint64(si.Totalram) * uint64(si.Unit) / 1024
}
