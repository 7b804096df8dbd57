//go:build amd64 && !purego

package blockcrypto

import (
	"bytes"
	"crypto/aes"
	"math/rand/v2"
	"os"
	"strings"
	"testing"
)

// TestEncBlocks checks the ECB kernels (used for XTS tweaks and ESSIV IVs)
// and the key schedule against crypto/aes for every key size and for block
// counts that cover the batch loops and the one-block tails.
func TestEncBlocks(t *testing.T) {
	kernels := map[string]func(rk *byte, rounds int, dst, src *byte, n int){}
	if hasAESNI {
		kernels["aesni"] = encBlocksAESNI
	}
	if hasVAES {
		kernels["vaes"] = encBlocksVAES
	}
	if len(kernels) == 0 {
		t.Skip("no AES-NI")
	}
	r := rand.New(rand.NewPCG(8, 8))
	for name, enc := range kernels {
		for _, keyLen := range []int{16, 24, 32} {
			for n := 1; n <= 40; n++ {
				key := randBytes(r, keyLen)
				var s schedule
				s.expandKey(key)
				ref, _ := aes.NewCipher(key)
				src := randBytes(r, 16*n)
				want := make([]byte, len(src))
				for i := 0; i < len(src); i += 16 {
					ref.Encrypt(want[i:], src[i:])
				}
				got := make([]byte, len(src))
				enc(&s.enc[0], s.rounds, &got[0], &src[0], n)
				if !bytes.Equal(got, want) {
					t.Fatalf("%s: %d-byte key, %d blocks: mismatch at byte %d", name, keyLen, n, firstDiff(got, want))
				}
			}
		}
	}
}

// TestEncBlocksFIPS197 runs the example vectors of FIPS-197 Appendix C.
func TestEncBlocksFIPS197(t *testing.T) {
	if !hasAESNI {
		t.Skip("no AES-NI")
	}
	pt := mustHex(t, "00112233445566778899aabbccddeeff")
	for key, ct := range map[string]string{
		"000102030405060708090a0b0c0d0e0f":                                 "69c4e0d86a7b0430d8cdb78070b4c55a",
		"000102030405060708090a0b0c0d0e0f1011121314151617":                 "dda97ca4864cdfe06eaf70a0ec0d7191",
		"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f": "8ea2b7ca516745bfeafc49904b496089",
	} {
		var s schedule
		s.expandKey(mustHex(t, key))
		got := make([]byte, 16)
		encBlocksAESNI(&s.enc[0], s.rounds, &got[0], &pt[0], 1)
		if !bytes.Equal(got, mustHex(t, ct)) {
			t.Errorf("key %s: got %x, want %s", key, got, ct)
		}
	}
}

// TestCPUDetection compares the detected features with the flags Linux
// reports.
func TestCPUDetection(t *testing.T) {
	info, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		t.Skip("no /proc/cpuinfo")
	}
	var flags map[string]bool
	for _, line := range strings.Split(string(info), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "flags" {
			flags = map[string]bool{}
			for _, f := range strings.Fields(v) {
				flags[f] = true
			}
			break
		}
	}
	if flags == nil {
		t.Skip("no flags line in /proc/cpuinfo")
	}
	if want := flags["aes"] && flags["pclmulqdq"]; hasAESNI != want {
		t.Errorf("hasAESNI = %v, cpuinfo aes+pclmulqdq = %v", hasAESNI, want)
	}
	wantVAES := flags["aes"] && flags["avx2"] && flags["vaes"] && flags["vpclmulqdq"]
	if hasVAES != wantVAES {
		t.Errorf("hasVAES = %v, cpuinfo aes+avx2+vaes+vpclmulqdq = %v", hasVAES, wantVAES)
	}
	t.Logf("aesni %v, vaes %v, default implementation %v", hasAESNI, hasVAES, defaultImpl)
}
