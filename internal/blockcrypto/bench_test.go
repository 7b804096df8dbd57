package blockcrypto

// Benchmarks, one sub-benchmark per implementation this CPU supports.
//
// BenchmarkXTS{512,4096,65536} encrypt (and decrypt) one request of that
// many bytes with AES-256-XTS (a 512-bit key): one 512-byte sector, one
// 4096-byte sector, and sixteen 4096-byte sectors. They are the counterparts
// of `openssl speed -evp aes-256-xts -bytes N`, which encrypts one N-byte
// data unit per call. Run on one core:
//
//	go test -run '^$' -bench 'XTS' -benchmem -cpu 1 ./internal/blockcrypto
//	openssl speed -evp aes-256-xts -bytes 512   (and 4096, 65536)
//
// Measured here (AMD EPYC with VAES/VPCLMULQDQ/AVX-512, 2 vCPUs, a noisy
// shared machine; OpenSSL 3.0.19; medians of 5 interleaved runs, MB/s =
// 10^6 bytes/s):
//
//	                    512 B    4 KiB   64 KiB
//	openssl (evp)        5350     6930     6380
//	vaes encrypt         (filled in below)
//	aesni encrypt
//	portable encrypt
//
// All paths make 0 allocations per call.

import (
	"fmt"
	"testing"
)

func benchXTS(b *testing.B, size, ss int) {
	for _, impl := range supportedImpls() {
		for _, op := range []string{"encrypt", "decrypt"} {
			b.Run(fmt.Sprintf("%v/%s", impl, op), func(b *testing.B) {
				key := make([]byte, 64)
				for i := range key {
					key[i] = byte(i * 7)
				}
				c := mustNew(b, Spec{"aes", "xts-plain64"}, key, impl)
				buf := make([]byte, size)
				f := c.Encrypt
				if op == "decrypt" {
					f = c.Decrypt
				}
				b.SetBytes(int64(size))
				b.ReportAllocs()
				for i := 0; b.Loop(); i++ {
					if err := f(buf, buf, uint64(i), ss); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

func BenchmarkXTS512(b *testing.B)   { benchXTS(b, 512, 512) }
func BenchmarkXTS4096(b *testing.B)  { benchXTS(b, 4096, 4096) }
func BenchmarkXTS65536(b *testing.B) { benchXTS(b, 65536, 4096) }

// BenchmarkXTS4096In512 is a 4 KiB request of eight 512-byte sectors, the
// common LUKS layout.
func BenchmarkXTS4096In512(b *testing.B) { benchXTS(b, 4096, 512) }

// BenchmarkXTS1MiB is large enough to be split across goroutines.
func BenchmarkXTS1MiB(b *testing.B) { benchXTS(b, 1<<20, 4096) }

func benchCBC(b *testing.B, mode string, size, ss int) {
	for _, impl := range supportedImpls() {
		for _, op := range []string{"encrypt", "decrypt"} {
			b.Run(fmt.Sprintf("%v/%s", impl, op), func(b *testing.B) {
				c := mustNew(b, Spec{"aes", mode}, make([]byte, 32), impl)
				buf := make([]byte, size)
				f := c.Encrypt
				if op == "decrypt" {
					f = c.Decrypt
				}
				b.SetBytes(int64(size))
				b.ReportAllocs()
				for i := 0; b.Loop(); i++ {
					if err := f(buf, buf, uint64(i), ss); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

func BenchmarkCBCESSIV512(b *testing.B)       { benchCBC(b, "cbc-essiv:sha256", 512, 512) }
func BenchmarkCBCESSIV4096In512(b *testing.B) { benchCBC(b, "cbc-essiv:sha256", 4096, 512) }
func BenchmarkCBCESSIV65536(b *testing.B)     { benchCBC(b, "cbc-essiv:sha256", 65536, 4096) }

func BenchmarkNew(b *testing.B) {
	key := make([]byte, 64)
	b.ReportAllocs()
	for b.Loop() {
		c, err := New(Spec{"aes", "xts-plain64"}, key)
		if err != nil {
			b.Fatal(err)
		}
		c.Wipe()
	}
}
