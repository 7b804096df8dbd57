package luksfmt

import (
	"context"
	"crypto/sha256"
	"testing"
	"time"
)

// BenchmarkPBKDF2SHA256 derives a 32-byte key with 100 000 iterations of
// PBKDF2-HMAC-SHA256 and reports iterations per second, the figure
// `cryptsetup benchmark --pbkdf pbkdf2 --hash sha256` prints for its own
// backend. BenchmarkPBKDF2SHA256Key64 derives the 64-byte key of an
// aes-xts-plain64 (512-bit) keyslot: two output blocks, which run on two
// cores when there are two.
//
//	go test -run '^$' -bench PBKDF2 -cpu 1,2 ./drivers/luks/luksfmt
func BenchmarkPBKDF2SHA256(b *testing.B)      { benchPBKDF2(b, 32) }
func BenchmarkPBKDF2SHA256Key64(b *testing.B) { benchPBKDF2(b, 64) }

func benchPBKDF2(b *testing.B, keyLen int) {
	const iter = 100_000
	out := make([]byte, keyLen)
	pw, salt := []byte("benchmark passphrase"), make([]byte, 32)
	start := time.Now()
	for b.Loop() {
		pbkdf2Into(context.Background(), out, sha256.New, pw, salt, iter)
	}
	b.ReportMetric(float64(iter)*float64(b.N)/time.Since(start).Seconds(), "iter/s")
}
