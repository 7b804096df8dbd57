package luksfmt

import (
	"crypto/sha256"
	"testing"
	"time"
)

// BenchmarkPBKDF2SHA256 derives a 32-byte key with 100 000 iterations of
// PBKDF2-HMAC-SHA256 (a LUKS keyslot unlock) and reports iterations per
// second, the figure `cryptsetup benchmark --pbkdf pbkdf2 --hash sha256`
// prints for its own backend:
//
//	go test -run '^$' -bench PBKDF2 -cpu 1 ./drivers/luks/luksfmt
func BenchmarkPBKDF2SHA256(b *testing.B) {
	const iter = 100_000
	out := make([]byte, 32)
	pw, salt := []byte("benchmark passphrase"), make([]byte, 32)
	start := time.Now()
	for b.Loop() {
		pbkdf2Into(out, sha256.New, pw, salt, iter)
	}
	b.ReportMetric(float64(iter)*float64(b.N)/time.Since(start).Seconds(), "iter/s")
}
