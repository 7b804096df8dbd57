package harness

import (
	"encoding/binary"
	"os"
	"strconv"
	"time"
)

// Fill fills p with pseudo-random bytes determined by seed (splitmix64),
// so that data written can be checked later from the seed alone.
func Fill(p []byte, seed uint64) {
	x := seed
	var w [8]byte
	for i := 0; i < len(p); i += 8 {
		x += 0x9e3779b97f4a7c15
		z := x
		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
		z = (z ^ (z >> 27)) * 0x94d049bb133111eb
		z ^= z >> 31
		binary.LittleEndian.PutUint64(w[:], z)
		copy(p[i:], w[:])
	}
}

// EnvInt returns the integer in environment variable name, or def.
func EnvInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// EnvDuration returns the number of seconds in environment variable name
// as a duration, or def.
func EnvDuration(name string, def time.Duration) time.Duration {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return time.Duration(v) * time.Second
	}
	return def
}
